//! One structured log line per request: request id, principal, role, method, record id,
//! field names, status, the request field a refusal named, and latency. Never a field value:
//! record ids are logged only when they parse as UUIDs, field names only when the schema knows
//! them, and of a refusal's message only the request field it names, when that is a name of the
//! proto or of the schema (the rest of the message may echo what the caller sent).

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Instant;

use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::policy::Caller;

/// Metadata key carrying the request id (taken from the caller if sane, else generated).
pub const REQUEST_ID: &str = "x-request-id";

/// Collects what a request's log line says, and writes it on [`RequestLog::finish`].
pub struct RequestLog {
    start: Instant,
    method: &'static str,
    request_id: String,
    principal: Option<std::sync::Arc<str>>,
    role: Option<String>,
    record_id: Option<String>,
    fields: Vec<String>,
    refused_field: Option<String>,
}

impl RequestLog {
    /// Starts the log of `method`.
    pub fn start<T>(method: &'static str, request: &Request<T>) -> Self {
        Self::started_at(method, request, Instant::now())
    }

    /// The log of `method`, whose request arrived at `start`.
    pub fn started_at<T>(method: &'static str, request: &Request<T>, start: Instant) -> Self {
        let request_id = request
            .metadata()
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= 64
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        Self {
            start,
            method,
            request_id,
            principal: None,
            role: None,
            record_id: None,
            fields: Vec::new(),
            refused_field: None,
        }
    }

    /// Notes the authenticated caller and passes it through.
    pub fn caller(&mut self, caller: Caller) -> Caller {
        self.principal = Some(caller.principal.clone());
        self.role = Some(caller.role.name.clone());
        caller
    }

    /// Notes the record id, if it is a UUID, in its canonical form (lower case, hyphens), as
    /// answers and audit events give it, whichever spelling the caller used.
    pub fn record(&mut self, id: &str) {
        if let Ok(id) = uuid::Uuid::try_parse(id) {
            self.record_id = Some(id.to_string());
        }
    }

    /// Notes the field names involved.
    pub fn fields(&mut self, names: Vec<String>) {
        self.fields = names;
    }

    /// Notes the request field an INVALID_ARGUMENT or RESOURCE_EXHAUSTED refusal names (its
    /// message reads `<field>: <rule>`), if that is safe to log: a field of the proto's
    /// messages (`purpose`, `record_id`), or one of them followed by `.` and a name that
    /// `known` accepts (the schema's field names: `fields.bsn`, `clear.iban`). A name the
    /// caller made up, and so anything a value sent in a name's place, stays out.
    pub fn refusal(&mut self, status: &Status, known: impl Fn(&str) -> bool) {
        if !matches!(
            status.code(),
            tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
        ) {
            return;
        }
        self.refused_field = log_safe_field(status.message(), known).map(str::to_string);
    }

    /// Writes the line and returns the response with the request id attached.
    pub fn finish<T>(self, result: Result<T, Status>) -> Result<Response<T>, Status> {
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        let id = self.write(code);
        match result {
            Ok(body) => {
                let mut response = Response::new(body);
                if let Some(id) = id {
                    response.metadata_mut().insert(REQUEST_ID, id);
                }
                Ok(response)
            }
            Err(status) => Err(with_id(status, id)),
        }
    }

    /// Writes the line of a request refused before it reached a handler and returns `status`
    /// with the request id attached.
    pub fn refuse(self, status: Status) -> Status {
        let id = self.write(status.code());
        with_id(status, id)
    }

    /// Writes the line; returns the request id as metadata.
    fn write(&self, code: tonic::Code) -> Option<MetadataValue<tonic::metadata::Ascii>> {
        tracing::info!(
            request_id = %self.request_id,
            principal = self.principal.as_deref().unwrap_or("-"),
            role = self.role.as_deref().unwrap_or("-"),
            method = self.method,
            record_id = self.record_id.as_deref().unwrap_or("-"),
            fields = %self.fields.join(","),
            status = ?code,
            refused_field = self.refused_field.as_deref().unwrap_or("-"),
            latency_us = self.start.elapsed().as_micros() as u64,
            "request"
        );
        MetadataValue::try_from(self.request_id.as_str()).ok()
    }
}

/// The field a `<field>: <rule>` message names, if it is a proto field name, or a proto field
/// name, `.` and a name `known` accepts.
fn log_safe_field(message: &str, known: impl Fn(&str) -> bool) -> Option<&str> {
    let (field, _rule) = message.split_once(": ")?;
    let (head, tail) = match field.split_once('.') {
        Some((head, tail)) => (head, Some(tail)),
        None => (field, None),
    };
    let safe = proto_field_names().contains(head) && tail.is_none_or(known);
    safe.then_some(field)
}

/// The names of every field of the messages in Kluis's proto (from its compiled-in descriptor).
fn proto_field_names() -> &'static HashSet<String> {
    static NAMES: OnceLock<HashSet<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        use prost::Message;
        fn collect(message: &prost_types::DescriptorProto, names: &mut HashSet<String>) {
            names.extend(message.field.iter().map(|f| f.name().to_string()));
            for nested in &message.nested_type {
                collect(nested, names);
            }
        }
        let mut names = HashSet::new();
        // The descriptor is compiled in from the proto: it decodes (a unit test says so); were
        // it not to, no field would be logged, which is safe.
        if let Ok(set) = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET) {
            for file in &set.file {
                for message in &file.message_type {
                    collect(message, &mut names);
                }
            }
        }
        names
    })
}

fn with_id(mut status: Status, id: Option<MetadataValue<tonic::metadata::Ascii>>) -> Status {
    if let Some(id) = id {
        status.metadata_mut().insert(REQUEST_ID, id);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_logs_its_field_only_if_proto_or_schema_names_it() {
        let known = |name: &str| ["bsn", "iban"].contains(&name);
        for (message, logged) in [
            ("fields.bsn: must pass the 11-test", Some("fields.bsn")),
            ("clear.iban: is required by …", Some("clear.iban")),
            ("purpose: is required", Some("purpose")),
            ("record_id: must be a UUID", Some("record_id")),
            ("principal: a principal is 1 to 160 …", Some("principal")),
            // A name the caller made up (perhaps a surname or a BSN in a name's place).
            ("fields.jansen: unknown field", None),
            ("fields.111222333: unknown field", None),
            ("set.<not a name: not shown>: unknown field", None),
            ("jansen: unknown", None),
            ("fields.bsn.x: …", None),
            ("request body is not a valid message", None),
            ("stale revision: expected_revision is 1", None),
        ] {
            assert_eq!(log_safe_field(message, known), logged, "{message}");
            let mut log = RequestLog::start("CreateRecord", &Request::new(()));
            log.refusal(&Status::invalid_argument(message), known);
            assert_eq!(log.refused_field.as_deref(), logged, "{message}");
        }
        // Only a refusal of the request's content names a field.
        let mut log = RequestLog::start("CreateRecord", &Request::new(()));
        log.refusal(&Status::permission_denied("fields.bsn: …"), known);
        assert_eq!(log.refused_field, None);
        let mut log = RequestLog::start("CreateRecord", &Request::new(()));
        log.refusal(&Status::resource_exhausted("fields.bsn: too large"), known);
        assert_eq!(log.refused_field.as_deref(), Some("fields.bsn"));
    }

    #[test]
    fn the_proto_field_names_come_from_the_descriptor() {
        let names = proto_field_names();
        for name in [
            "purpose",
            "record_id",
            "fields",
            "set",
            "clear",
            "field_names",
            "page_token",
        ] {
            assert!(names.contains(name), "{name}");
        }
        assert!(!names.contains("bsn"));
    }

    #[test]
    fn record_ids_are_logged_in_their_canonical_form_and_only_if_they_are_uuids() {
        let canonical = "3f2a6c1e-8b7d-4e5f-9a0b-1c2d3e4f5a6b";
        for spelling in [
            canonical,
            "3F2A6C1E-8B7D-4E5F-9A0B-1C2D3E4F5A6B",
            "3f2a6c1e8b7d4e5f9a0b1c2d3e4f5a6b",
            "{3f2a6c1e-8b7d-4e5f-9a0b-1c2d3e4f5a6b}",
            "urn:uuid:3f2a6c1e-8b7d-4e5f-9a0b-1c2d3e4f5a6b",
        ] {
            let mut log = RequestLog::start("GetRecord", &Request::new(()));
            log.record(spelling);
            assert_eq!(log.record_id.as_deref(), Some(canonical), "{spelling}");
        }
        let mut log = RequestLog::start("GetRecord", &Request::new(()));
        log.record("111222333");
        assert_eq!(log.record_id, None);
    }
}

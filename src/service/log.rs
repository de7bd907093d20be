//! One structured log line per request: request id, principal, role, method, record id,
//! field names, status and latency. Never a field value: record ids are logged only when they
//! parse as UUIDs, field names only when the schema knows them.

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
            latency_us = self.start.elapsed().as_micros() as u64,
            "request"
        );
        MetadataValue::try_from(self.request_id.as_str()).ok()
    }
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

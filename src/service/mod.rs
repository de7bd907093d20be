//! The gRPC edge: authenticates callers, converts proto messages to domain values and back,
//! logs one line per request, and maps errors to status codes in one place ([`status`]).
//! No business logic lives here: that is [`crate::vault`].

pub mod answer;
pub mod audit_service;
pub mod decode;
pub mod gate;
pub mod health;
pub mod keys_service;
mod log;
pub mod status;

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;
use zeroize::Zeroizing;

use crate::audit;
use crate::policy::{Caller, Policy};
use crate::proto::{self, field_value::Kind};
use crate::store::Store;
use crate::vault::{Change, StateChange, Value, Vault};

pub use log::RequestLog;

/// Metadata key of the bearer token.
pub const AUTHORIZATION: &str = "authorization";

/// Authenticates requests: a bearer token if one is sent, otherwise the common name of a
/// verified TLS client certificate.
#[derive(Clone)]
pub struct Authenticator {
    pub(crate) policy: Arc<Policy>,
}

impl Authenticator {
    /// An authenticator over `policy`.
    pub fn new(policy: Arc<Policy>) -> Self {
        Self { policy }
    }

    /// Starts handling `action`: its log line and its audit event, and the caller (named in
    /// both) or why authentication failed. A caller the [`gate`] authenticated (before the
    /// request's body was read) is taken from the request's extensions, not authenticated
    /// again.
    pub(crate) fn begin<T>(
        &self,
        action: &'static str,
        request: &Request<T>,
    ) -> (RequestLog, audit::Context, Result<Caller, Status>) {
        let mut log = RequestLog::start(action, request);
        let mut ev = audit::Context::new(action);
        let caller = match request.extensions().get::<gate::Authenticated>() {
            Some(gate::Authenticated(caller)) => Ok(caller.clone()),
            None => self.authenticate(request),
        };
        let caller = caller.map(|caller| {
            ev.draft.principal = caller.principal.to_string();
            ev.draft.role = caller.role.name.clone();
            log.caller(caller)
        });
        (log, ev, caller)
    }

    /// Finds the caller of `request`, or says why not.
    pub fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let mut values = request.metadata().get_all(AUTHORIZATION).iter();
        if let Some(value) = values.next() {
            // Which of two credentials would count depends on their order, which a proxy or
            // a client library merging headers may change: neither counts.
            if values.next().is_some() {
                return Err(Status::unauthenticated(
                    "authorization metadata given more than once",
                ));
            }
            let text = value.to_str().map_err(|_| {
                Status::unauthenticated("authorization metadata is not valid ASCII")
            })?;
            let token = bearer_token(text).ok_or_else(|| {
                Status::unauthenticated("authorization metadata must be `Bearer <token>`")
            })?;
            return self
                .policy
                .authenticate_token(token)
                .ok_or_else(|| Status::unauthenticated("invalid bearer token"));
        }
        if let Some(certs) = request.peer_certs() {
            if let Some(cert) = certs.first() {
                // The TLS layer verified it against client_ca_file.
                let cn = common_name(cert.as_ref()).ok_or_else(|| {
                    Status::unauthenticated(
                        "client certificate has no common name (principals map by CN)",
                    )
                })?;
                return self.policy.authenticate_cert(&cn).ok_or_else(|| {
                    Status::unauthenticated("client certificate is not mapped to a principal")
                });
            }
        }
        Err(Status::unauthenticated(
            "missing credentials: send `authorization: Bearer <token>` metadata or a client certificate",
        ))
    }
}

/// The token of an `authorization` value `Bearer <token>`; the scheme's case does not matter
/// (RFC 7235 §2.1: `Bearer`, `bearer`, `BEARER`).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("Bearer") && !token.is_empty()).then_some(token)
}

/// The first common name of a certificate's subject, if it has one as text.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    cn
}

/// The `kluis.v1.Records` service.
pub struct RecordsService<S> {
    vault: Arc<Vault<S>>,
    auth: Authenticator,
    /// The largest answer the transport sends (its `max_encoding_message_size`).
    answer_limit: usize,
    /// The budget large answers are held against until they are sent.
    answers: answer::AnswerBudget,
}

impl<S: Store> RecordsService<S> {
    /// A service over `vault`, authenticating with `auth`, whose transport sends answers of
    /// at most `answer_limit` bytes, holding large ones against `answers` until they are sent.
    pub fn new(
        vault: Arc<Vault<S>>,
        auth: Authenticator,
        answer_limit: usize,
        answers: answer::AnswerBudget,
    ) -> Self {
        Self {
            vault,
            auth,
            answer_limit,
            answers,
        }
    }

    /// The field names of a request as its log line and event name them: each known name
    /// once, in name order (a request's map arrives in no fixed order), then `<unknown>` once
    /// if the request named a field the schema does not know.
    fn known_names<'a>(&self, names: impl Iterator<Item = &'a String>) -> Vec<String> {
        let schema = self.vault.schema();
        let mut known = std::collections::BTreeSet::new();
        let mut unknown = false;
        for n in names {
            if schema.field(n).is_some() {
                known.insert(n.clone());
            } else {
                unknown = true;
            }
        }
        let mut out: Vec<String> = known.into_iter().collect();
        if unknown {
            out.push("<unknown>".to_string());
        }
        out
    }
}

impl<S: Store> RecordsService<S> {
    /// Refuses a value of the wrong shape (text with a content type, no value at all), but
    /// only after the purpose and the rights on every named field, which come first in the
    /// order of checks (an unauthorised caller is `denied`, whatever its values look like).
    fn shapes_after_rights(
        &self,
        caller: &Caller,
        purpose: &str,
        prefix: &str,
        fields: &std::collections::HashMap<String, proto::FieldValue>,
        cleared: &[String],
    ) -> Result<(), Status> {
        // In name order, as every check of a request's names (a map arrives in no fixed order).
        let mut entries: Vec<(&String, &proto::FieldValue)> = fields.iter().collect();
        entries.sort_unstable_by_key(|(name, _)| *name);
        let Some(shape) = entries
            .iter()
            .find_map(|(name, value)| shape_error(prefix, name, value))
        else {
            return Ok(());
        };
        let names: Vec<&str> = entries.iter().map(|(name, _)| name.as_str()).collect();
        let cleared: Vec<&str> = cleared.iter().map(String::as_str).collect();
        if prefix == "fields" {
            // A create's purpose is checked as `Vault::create` checks it.
            self.vault
                .check_create_purpose(caller, purpose)
                .map_err(status::from_vault)?;
        }
        self.vault
            .check_writable(caller, purpose, prefix, &names, &cleared)
            .map_err(status::from_vault)?;
        Err(shape)
    }
}

/// Why a proto field value has the wrong shape, if it has.
fn shape_error(prefix: &str, name: &str, value: &proto::FieldValue) -> Option<Status> {
    match value.kind {
        Some(Kind::Text(_)) if !value.content_type.is_empty() => {
            Some(Status::invalid_argument(format!(
                "{prefix}.{}: content_type applies only to blob values",
                crate::error::printable_name(name)
            )))
        }
        Some(_) => None,
        None => Some(empty_value(prefix, name)),
    }
}

fn empty_value(prefix: &str, name: &str) -> Status {
    Status::invalid_argument(format!(
        "{prefix}.{}: value is empty: set `text` or `blob` (use clear to remove a field)",
        crate::error::printable_name(name)
    ))
}

/// Converts proto field values into domain values; the bytes move, nothing is copied.
fn to_values(
    prefix: &str,
    fields: impl IntoIterator<Item = (String, proto::FieldValue)>,
) -> Result<Vec<(String, Value)>, Status> {
    // In name order (a request's map arrives in no fixed order), so that a request with
    // several bad fields is refused for the same one every time. Sorting moves the values'
    // buffers, it copies none.
    let mut fields: Vec<_> = fields.into_iter().collect();
    fields.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::with_capacity(fields.len());
    for (name, mut value) in fields {
        if let Some(shape) = shape_error(prefix, &name, &value) {
            return Err(shape);
        }
        let v = match value.kind.take() {
            Some(Kind::Blob(bytes)) => Value::Blob {
                bytes: Zeroizing::new(bytes),
                content_type: std::mem::take(&mut value.content_type),
            },
            Some(Kind::Text(text)) => Value::Text(Zeroizing::new(text)),
            None => return Err(empty_value(prefix, &name)),
        };
        out.push((name, v));
    }
    Ok(out)
}

fn to_proto(fields: Vec<(String, Value)>) -> std::collections::HashMap<String, proto::FieldValue> {
    fields
        .into_iter()
        .map(|(name, value)| {
            let fv = match value {
                Value::Text(mut t) => proto::FieldValue {
                    kind: Some(Kind::Text(std::mem::take(&mut *t))),
                    content_type: String::new(),
                },
                Value::Blob {
                    mut bytes,
                    content_type,
                } => proto::FieldValue {
                    kind: Some(Kind::Blob(std::mem::take(&mut *bytes))),
                    content_type,
                },
            };
            (name, fv)
        })
        .collect()
}

fn timestamp(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Converts record metadata to its proto form.
pub fn meta_to_proto(meta: crate::vault::RecordMeta) -> proto::RecordMeta {
    proto::RecordMeta {
        record_id: meta.id.to_string(),
        revision: meta.revision,
        created_at: timestamp(meta.created_ms),
        updated_at: timestamp(meta.updated_ms),
        lifecycle_stage: meta.lifecycle.clone(),
        lifecycle: meta.lifecycle,
        lifecycle_date: meta.lifecycle_date,
        restricted: meta.restricted,
        legal_hold: meta.legal_hold,
        consents: meta
            .consents
            .into_iter()
            .map(|(purpose, granted, changed_ms)| proto::Consent {
                purpose,
                granted,
                changed: Some(prost_types::Timestamp {
                    seconds: changed_ms.div_euclid(1000),
                    nanos: (changed_ms.rem_euclid(1000) * 1_000_000) as i32,
                }),
            })
            .collect(),
        categories: meta.categories,
    }
}

/// A record id as it may appear in an event: a UUID, or `<invalid>` (so that a value sent
/// by mistake in place of an id never lands in the trail).
pub(crate) fn event_record_id(id: &str) -> String {
    match uuid::Uuid::parse_str(id) {
        Ok(u) => u.to_string(),
        Err(_) if id.is_empty() => String::new(),
        Err(_) => audit::INVALID_RECORD_ID.to_string(),
    }
}

impl<S: Store> RecordsService<S> {
    /// Writes the request's event unless its change already did (fail closed: an event that
    /// cannot be written turns the answer into UNAVAILABLE), then logs and answers.
    async fn finish<T>(
        &self,
        log: RequestLog,
        ev: audit::Context,
        result: Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        finish(&self.vault, log, ev, result).await
    }

    fn purpose_name(&self, purpose: &str) -> String {
        if purpose.is_empty() || self.auth.policy.purpose(purpose).is_some() {
            purpose.to_string()
        } else {
            "<unknown>".to_string()
        }
    }
}

/// `answer`, carrying its share of the answer budget to the transport (which sends it in
/// chunks and frees the share once it is handed over).
pub(crate) fn held<T>(
    answer: Result<Response<T>, Status>,
    hold: Option<answer::AnswerHold>,
) -> Result<Response<T>, Status> {
    answer.map(|mut response| {
        if let Some(hold) = hold {
            response.extensions_mut().insert(hold);
        }
        response
    })
}

/// Names a data-subject request (erase, export) on `record_id` in its log line and event: they
/// carry no purpose field and run under `data_subject_request`.
fn data_subject_request(log: &mut RequestLog, ev: &mut audit::Context, record_id: &str) {
    ev.draft.record_id = event_record_id(record_id);
    ev.draft.purpose = crate::vault::PURPOSE_DSR.to_string();
    log.record(record_id);
}

/// See [`RecordsService::finish`].
pub(crate) async fn finish<S: Store, T>(
    vault: &Vault<S>,
    mut log: RequestLog,
    ev: audit::Context,
    result: Result<T, Status>,
) -> Result<Response<T>, Status> {
    let outcome = match &result {
        Ok(_) => audit::Outcome::Ok,
        Err(status) => audit::Outcome::of_code(status.code()),
    };
    let result = match vault.record_event(ev, outcome).await {
        Ok(()) => result,
        Err(e) => {
            // Nothing is returned: the response (and any values in it) is dropped here.
            drop(result);
            Err(status::from_vault(e))
        }
    };
    if let Err(status) = &result {
        log.refusal(status, |name| vault.schema().field(name).is_some());
    }
    log.finish(result)
}

#[tonic::async_trait]
impl<S: Store> proto::records_server::Records for RecordsService<S> {
    #[instrument(skip_all)]
    async fn create_record(
        &self,
        request: Request<proto::CreateRecordRequest>,
    ) -> Result<Response<proto::CreateRecordResponse>, Status> {
        let (mut log, mut ev, caller) = self.auth.begin("CreateRecord", &request);
        let caller = match caller {
            Ok(c) => c,
            Err(e) => return self.finish(log, ev, Err(e)).await,
        };
        let req = request.into_inner();
        let names = self.known_names(req.fields.keys());
        log.fields(names.clone());
        ev.draft.purpose = self.purpose_name(&req.purpose);
        ev.draft.field_names = names;
        let result = async {
            self.shapes_after_rights(&caller, &req.purpose, "fields", &req.fields, &[])?;
            let fields = to_values("fields", req.fields)?;
            let (id, revision) = self
                .vault
                .create(&caller, &req.purpose, fields, &mut ev)
                .await
                .map_err(status::from_vault)?;
            Ok(proto::CreateRecordResponse {
                record_id: id.to_string(),
                revision,
            })
        }
        .await;
        if let Ok(r) = &result {
            log.record(&r.record_id);
        }
        self.finish(log, ev, result).await
    }

    #[instrument(skip_all)]
    async fn get_record(
        &self,
        request: Request<proto::GetRecordRequest>,
    ) -> Result<Response<proto::GetRecordResponse>, Status> {
        let (mut log, mut ev, caller) = self.auth.begin("GetRecord", &request);
        // Named even when authentication fails: probing a record is worth knowing about.
        ev.draft.record_id = event_record_id(&request.get_ref().record_id);
        let caller = match caller {
            Ok(c) => c,
            Err(e) => return self.finish(log, ev, Err(e)).await,
        };
        let peer = request.remote_addr();
        let req = request.into_inner();
        log.record(&req.record_id);
        ev.draft.purpose = self.purpose_name(&req.purpose);
        let result = self
            .vault
            .get(&caller, &req.record_id, &req.purpose, &req.field_names)
            .await
            .map_err(status::from_vault);
        let limit = self.answer_limit;
        let mut hold = None;
        let result = result.and_then(|read| {
            let names: Vec<String> = read.fields.iter().map(|(n, _)| n.clone()).collect();
            log.fields(names.clone());
            ev.draft.field_names = names;
            // Which of them were disclosed only masked: a breach report tells a full BSN
            // from its last digits.
            ev.draft.masked_field_names = read.masked;
            let answer = proto::GetRecordResponse {
                record_id: read.id.to_string(),
                revision: read.revision,
                fields: to_proto(read.fields),
                withheld: read.withheld,
            };
            // Said here, before the read is recorded: past the limit the transport would
            // refuse to send the answer after the event said `ok`.
            let size = prost::Message::encoded_len(&answer);
            if size > limit {
                return Err(Status::resource_exhausted(format!(
                    "field_names: the answer is {size} bytes, more than an answer may hold ({limit} bytes: twice max_request_bytes); name fewer fields (field_names) or raise max_request_bytes"
                )));
            }
            hold = self.answers.hold(size, &caller.principal, peer, "field_names")?;
            Ok(answer)
        });
        if result.is_err() {
            let names = self.known_names(req.field_names.iter());
            log.fields(names.clone());
            ev.draft.field_names = names;
            // Nothing was returned, masked or not.
            ev.draft.masked_field_names.clear();
        }
        held(self.finish(log, ev, result).await, hold)
    }

    #[instrument(skip_all)]
    async fn update_record(
        &self,
        request: Request<proto::UpdateRecordRequest>,
    ) -> Result<Response<proto::UpdateRecordResponse>, Status> {
        let (mut log, mut ev, caller) = self.auth.begin("UpdateRecord", &request);
        // Named even when authentication fails: probing a record is worth knowing about.
        ev.draft.record_id = event_record_id(&request.get_ref().record_id);
        let caller = match caller {
            Ok(c) => c,
            Err(e) => return self.finish(log, ev, Err(e)).await,
        };
        let req = request.into_inner();
        log.record(&req.record_id);
        let names = self.known_names(req.set.keys().chain(req.clear.iter()));
        log.fields(names.clone());
        ev.draft.purpose = self.purpose_name(&req.purpose);
        ev.draft.field_names = names;
        let result = async {
            self.shapes_after_rights(&caller, &req.purpose, "set", &req.set, &req.clear)?;
            let set = to_values("set", req.set)?;
            let updated = self
                .vault
                .update(
                    &caller,
                    &req.record_id,
                    &req.purpose,
                    Change {
                        expected_revision: req.expected_revision,
                        set,
                        clear: req.clear,
                    },
                    &mut ev,
                )
                .await
                .map_err(status::from_vault)?;
            Ok(proto::UpdateRecordResponse {
                revision: updated.revision,
                notify: updated.notify,
            })
        }
        .await;
        self.finish(log, ev, result).await
    }

    #[instrument(skip_all)]
    async fn find_records(
        &self,
        request: Request<proto::FindRecordsRequest>,
    ) -> Result<Response<proto::FindRecordsResponse>, Status> {
        let (mut log, mut ev, caller) = self.auth.begin("FindRecords", &request);
        let caller = match caller {
            Ok(c) => c,
            Err(e) => return self.finish(log, ev, Err(e)).await,
        };
        let mut req = request.into_inner();
        let value = Zeroizing::new(std::mem::take(&mut req.value));
        let names = self.known_names(std::iter::once(&req.field_name));
        log.fields(names.clone());
        ev.draft.purpose = self.purpose_name(&req.purpose);
        ev.draft.field_names = names;
        let result = self
            .vault
            .find(&caller, &req.purpose, &req.field_name, &value)
            .await
            .map_err(status::from_vault)
            .map(|ids| proto::FindRecordsResponse {
                record_ids: ids.into_iter().map(|id| id.to_string()).collect(),
            });
        // A search that finds records touched each of them (it tells the caller that the
        // record holds the value): one event per record found, so that the record's history
        // and a breach report show it; a search that finds nothing is one event without one.
        if let Ok(found) = &result {
            if let Some((first, rest)) = found.record_ids.split_first() {
                ev.draft.record_id = first.clone();
                ev.more_records = rest.to_vec();
            }
        }
        self.finish(log, ev, result).await
    }

    #[instrument(skip_all)]
    async fn list_records(
        &self,
        request: Request<proto::ListRecordsRequest>,
    ) -> Result<Response<proto::ListRecordsResponse>, Status> {
        let (log, mut ev, caller) = self.auth.begin("ListRecords", &request);
        let caller = match caller {
            Ok(c) => c,
            Err(e) => return self.finish(log, ev, Err(e)).await,
        };
        let req = request.into_inner();
        let result = self
            .vault
            .list(&caller, req.page_size, &req.page_token)
            .await
            .map_err(status::from_vault)
            .map(|page| proto::ListRecordsResponse {
                records: page.records.into_iter().map(meta_to_proto).collect(),
                next_page_token: page.next_page_token.unwrap_or_default(),
            });
        // A listing discloses each listed record's metadata (lifecycle, consents,
        // restriction, legal hold, categories): one event per record listed, as for a
        // search; an empty page is one event without a record.
        if let Ok(page) = &result {
            if let Some((first, rest)) = page.records.split_first() {
                ev.draft.record_id = first.record_id.clone();
                ev.more_records = rest.iter().map(|r| r.record_id.clone()).collect();
            }
        }
        self.finish(log, ev, result).await
    }

    #[instrument(skip_all)]
    async fn set_lifecycle(
        &self,
        request: Request<proto::SetLifecycleRequest>,
    ) -> Result<Response<proto::RecordMeta>, Status> {
        let (log, ev, caller) = self.auth.begin("SetLifecycle", &request);
        let req = request.into_inner();
        let change = StateChange::Lifecycle {
            stage: req.stage,
            date: req.date,
        };
        self.set_state(log, ev, caller, &req.record_id, change)
            .await
    }

    #[instrument(skip_all)]
    async fn set_consent(
        &self,
        request: Request<proto::SetConsentRequest>,
    ) -> Result<Response<proto::RecordMeta>, Status> {
        let (log, mut ev, caller) = self.auth.begin("SetConsent", &request);
        let req = request.into_inner();
        ev.draft.purpose = self.purpose_name(&req.purpose);
        let change = StateChange::Consent {
            purpose: req.purpose,
            granted: req.granted,
        };
        self.set_state(log, ev, caller, &req.record_id, change)
            .await
    }

    #[instrument(skip_all)]
    async fn set_restriction(
        &self,
        request: Request<proto::SetRestrictionRequest>,
    ) -> Result<Response<proto::RecordMeta>, Status> {
        let (log, ev, caller) = self.auth.begin("SetRestriction", &request);
        let req = request.into_inner();
        let change = StateChange::Restriction {
            restricted: req.restricted,
            reason: Zeroizing::new(req.reason),
        };
        self.set_state(log, ev, caller, &req.record_id, change)
            .await
    }

    #[instrument(skip_all)]
    async fn erase_record(
        &self,
        request: Request<proto::EraseRecordRequest>,
    ) -> Result<Response<proto::EraseRecordResponse>, Status> {
        let (mut log, mut ev, caller) = self.auth.begin("EraseRecord", &request);
        let caller = match caller {
            Ok(c) => c,
            Err(e) => return self.finish(log, ev, Err(e)).await,
        };
        let req = request.into_inner();
        data_subject_request(&mut log, &mut ev, &req.record_id);
        let today = self.vault.today();
        let result = self
            .vault
            .erase(&caller, &req.record_id, &req.reason, today, &mut ev)
            .await
            .map(|e| proto::EraseRecordResponse {
                erased_categories: e.erased,
                retained: e
                    .retained
                    .into_iter()
                    .map(|(category, until, basis)| proto::Retained {
                        category,
                        until,
                        basis,
                    })
                    .collect(),
            })
            .map_err(status::from_vault);
        self.finish(log, ev, result).await
    }

    #[instrument(skip_all)]
    async fn export_record(
        &self,
        request: Request<proto::ExportRecordRequest>,
    ) -> Result<Response<proto::ExportRecordResponse>, Status> {
        let (mut log, mut ev, caller) = self.auth.begin("ExportRecord", &request);
        let caller = match caller {
            Ok(c) => c,
            Err(e) => return self.finish(log, ev, Err(e)).await,
        };
        let peer = request.remote_addr();
        let req = request.into_inner();
        data_subject_request(&mut log, &mut ev, &req.record_id);
        let limit = self.answer_limit;
        let mut hold = None;
        let result = self
            .vault
            .export(&caller, &req.record_id, &mut ev)
            .await
            .map_err(status::from_vault)
            .and_then(|mut json| {
                // Said here, before the event is written: past the limit the transport would
                // refuse to send the answer after the event said `ok`.
                if json.len().saturating_add(16) > limit {
                    return Err(Status::resource_exhausted(format!(
                        "export: the document is {} bytes, more than an answer may hold ({limit} bytes: twice max_request_bytes); raise max_request_bytes",
                        json.len()
                    )));
                }
                hold = self.answers.hold(json.len(), &caller.principal, peer, "export")?;
                Ok(proto::ExportRecordResponse {
                    json: std::mem::take(&mut *json),
                })
            });
        held(self.finish(log, ev, result).await, hold)
    }

    #[instrument(skip_all)]
    async fn set_legal_hold(
        &self,
        request: Request<proto::SetLegalHoldRequest>,
    ) -> Result<Response<proto::RecordMeta>, Status> {
        let (log, ev, caller) = self.auth.begin("SetLegalHold", &request);
        let req = request.into_inner();
        let change = StateChange::LegalHold {
            hold: req.hold,
            reason: Zeroizing::new(req.reason),
        };
        self.set_state(log, ev, caller, &req.record_id, change)
            .await
    }
}

impl<S: Store> RecordsService<S> {
    /// The shared body of the record-state RPCs.
    async fn set_state(
        &self,
        mut log: RequestLog,
        mut ev: audit::Context,
        caller: Result<Caller, Status>,
        record_id: &str,
        change: StateChange,
    ) -> Result<Response<proto::RecordMeta>, Status> {
        let caller = match caller {
            Ok(c) => c,
            Err(e) => return self.finish(log, ev, Err(e)).await,
        };
        ev.draft.record_id = event_record_id(record_id);
        log.record(record_id);
        let result = self
            .vault
            .set_state(&caller, record_id, change, &mut ev)
            .await
            .map(meta_to_proto)
            .map_err(status::from_vault);
        self.finish(log, ev, result).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_needs_a_token() {
        for value in ["Bearer abc", "bearer abc", "BEARER abc", "Bearer  abc "] {
            assert_eq!(bearer_token(value), Some("abc"), "{value}");
        }
        for value in [
            "Bearer",
            "Bearer ",
            "Bearerabc",
            "Basic abc",
            "Bearer-x abc",
            "",
        ] {
            assert_eq!(bearer_token(value), None, "{value}");
        }
    }
}

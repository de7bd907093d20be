//! The gRPC edge: authenticates callers, converts proto messages to domain values and back,
//! logs one line per request, and maps errors to status codes in one place ([`status`]).
//! No business logic lives here: that is [`crate::vault`].

mod log;
pub mod status;

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;
use zeroize::Zeroizing;

use crate::policy::{Caller, Policy};
use crate::proto::{self, field_value::Kind};
use crate::store::Store;
use crate::vault::{Value, Vault};

pub use log::RequestLog;

/// Metadata key of the bearer token.
pub const AUTHORIZATION: &str = "authorization";

/// Authenticates requests: a bearer token if one is sent, otherwise the common name of a
/// verified TLS client certificate.
#[derive(Clone)]
pub struct Authenticator {
    policy: Arc<Policy>,
}

impl Authenticator {
    /// An authenticator over `policy`.
    pub fn new(policy: Arc<Policy>) -> Self {
        Self { policy }
    }

    /// Finds the caller of `request`, or says why not.
    pub fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        if let Some(value) = request.metadata().get(AUTHORIZATION) {
            let text = value.to_str().map_err(|_| {
                Status::unauthenticated("authorization metadata is not valid ASCII")
            })?;
            let token = text
                .strip_prefix("Bearer ")
                .or_else(|| text.strip_prefix("bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    Status::unauthenticated("authorization metadata must be `Bearer <token>`")
                })?;
            return self
                .policy
                .authenticate_token(token)
                .ok_or_else(|| Status::unauthenticated("invalid bearer token"));
        }
        if let Some(certs) = request.peer_certs() {
            if let Some(cn) = certs.first().and_then(|c| common_name(c.as_ref())) {
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
}

impl<S: Store> RecordsService<S> {
    /// A service over `vault`, authenticating with `auth`.
    pub fn new(vault: Arc<Vault<S>>, auth: Authenticator) -> Self {
        Self { vault, auth }
    }

    fn known_names<'a>(&self, names: impl Iterator<Item = &'a String>) -> Vec<String> {
        let schema = self.vault.schema();
        names
            .map(|n| {
                if schema.field(n).is_some() {
                    n.clone()
                } else {
                    "<unknown>".to_string()
                }
            })
            .collect()
    }
}

/// Converts proto field values into domain values; the bytes move, nothing is copied.
fn to_values(
    prefix: &str,
    fields: impl IntoIterator<Item = (String, proto::FieldValue)>,
) -> Result<Vec<(String, Value)>, Status> {
    let mut out = Vec::new();
    for (name, value) in fields {
        let v = match value.kind {
            Some(Kind::Text(text)) => {
                if !value.content_type.is_empty() {
                    return Err(Status::invalid_argument(format!(
                        "{prefix}.{}: content_type applies only to blob values",
                        crate::error::printable_name(&name)
                    )));
                }
                Value::Text(Zeroizing::new(text))
            }
            Some(Kind::Blob(bytes)) => Value::Blob {
                bytes: Zeroizing::new(bytes),
                content_type: value.content_type,
            },
            None => {
                return Err(Status::invalid_argument(format!(
                "{prefix}.{}: value is empty: set `text` or `blob` (use clear to remove a field)",
                crate::error::printable_name(&name)
            )))
            }
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
        lifecycle: meta.lifecycle,
        categories: meta.categories,
    }
}

#[tonic::async_trait]
impl<S: Store> proto::records_server::Records for RecordsService<S> {
    #[instrument(skip_all)]
    async fn create_record(
        &self,
        request: Request<proto::CreateRecordRequest>,
    ) -> Result<Response<proto::CreateRecordResponse>, Status> {
        let mut log = RequestLog::start("CreateRecord", &request);
        let caller = match self.auth.authenticate(&request) {
            Ok(c) => log.caller(c),
            Err(e) => return log.finish(Err(e)),
        };
        let req = request.into_inner();
        log.fields(self.known_names(req.fields.keys()));
        let result = async {
            let fields = to_values("fields", req.fields)?;
            let (id, revision) = self
                .vault
                .create(&caller, &req.purpose, fields)
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
        log.finish(result)
    }

    #[instrument(skip_all)]
    async fn get_record(
        &self,
        request: Request<proto::GetRecordRequest>,
    ) -> Result<Response<proto::GetRecordResponse>, Status> {
        let mut log = RequestLog::start("GetRecord", &request);
        let caller = match self.auth.authenticate(&request) {
            Ok(c) => log.caller(c),
            Err(e) => return log.finish(Err(e)),
        };
        let req = request.into_inner();
        log.record(&req.record_id);
        let result = self
            .vault
            .get(&caller, &req.record_id, &req.purpose, &req.field_names)
            .await
            .map_err(status::from_vault);
        let result = result.map(|read| {
            log.fields(read.fields.iter().map(|(n, _)| n.clone()).collect());
            proto::GetRecordResponse {
                record_id: read.id.to_string(),
                revision: read.revision,
                fields: to_proto(read.fields),
                withheld: read.withheld,
            }
        });
        if result.is_err() {
            log.fields(self.known_names(req.field_names.iter()));
        }
        log.finish(result)
    }

    #[instrument(skip_all)]
    async fn update_record(
        &self,
        request: Request<proto::UpdateRecordRequest>,
    ) -> Result<Response<proto::UpdateRecordResponse>, Status> {
        let mut log = RequestLog::start("UpdateRecord", &request);
        let caller = match self.auth.authenticate(&request) {
            Ok(c) => log.caller(c),
            Err(e) => return log.finish(Err(e)),
        };
        let req = request.into_inner();
        log.record(&req.record_id);
        log.fields(self.known_names(req.set.keys().chain(req.clear.iter())));
        let result = async {
            let set = to_values("set", req.set)?;
            let revision = self
                .vault
                .update(
                    &caller,
                    &req.record_id,
                    &req.purpose,
                    req.expected_revision,
                    set,
                    req.clear,
                )
                .await
                .map_err(status::from_vault)?;
            Ok(proto::UpdateRecordResponse { revision })
        }
        .await;
        log.finish(result)
    }

    #[instrument(skip_all)]
    async fn find_records(
        &self,
        request: Request<proto::FindRecordsRequest>,
    ) -> Result<Response<proto::FindRecordsResponse>, Status> {
        let mut log = RequestLog::start("FindRecords", &request);
        let caller = match self.auth.authenticate(&request) {
            Ok(c) => log.caller(c),
            Err(e) => return log.finish(Err(e)),
        };
        let req = request.into_inner();
        let value = Zeroizing::new(req.value);
        log.fields(self.known_names(std::iter::once(&req.field_name)));
        let result = self
            .vault
            .find(&caller, &req.purpose, &req.field_name, &value)
            .await
            .map_err(status::from_vault)
            .map(|ids| proto::FindRecordsResponse {
                record_ids: ids.into_iter().map(|id| id.to_string()).collect(),
            });
        log.finish(result)
    }

    #[instrument(skip_all)]
    async fn list_records(
        &self,
        request: Request<proto::ListRecordsRequest>,
    ) -> Result<Response<proto::ListRecordsResponse>, Status> {
        let mut log = RequestLog::start("ListRecords", &request);
        let caller = match self.auth.authenticate(&request) {
            Ok(c) => log.caller(c),
            Err(e) => return log.finish(Err(e)),
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
        log.finish(result)
    }
}

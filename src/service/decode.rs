//! Request bodies that do not decode. tonic decodes a request's message before any handler
//! runs, and answers a message that prost refuses with `INTERNAL`, unlogged and unaudited.
//! Here instead:
//!
//! - [`Codec`], the codec of the kluis services (`build.rs`: `codec_path`), is prost's, but
//!   says why a message does not decode with the message's type, the path of the field and
//!   prost's rule, never a value (see [`describe`]), and marks the status ([`UNDECODABLE`]);
//! - [`DecodeGuard`], between the authentication gate and each kluis service, turns a marked
//!   answer into `INVALID_ARGUMENT` ("request body is not a valid GetRecordRequest: purpose:
//!   invalid string value: data is not UTF-8 encoded"), records the call in the audit trail
//!   (outcome `invalid`; `UNAVAILABLE` if the event cannot be written, as for every call) and
//!   writes its log line, with its `x-request-id`;
//! - [`DecodeGuard`] also refuses, before the body is read, a request whose `content-type` is
//!   not protobuf over gRPC ([`content_type_refusal`]): tonic would decode JSON or plain text
//!   as protobuf and answer with a misleading decoder error, or serve an empty body as an
//!   empty message.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prost::Message;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::server::NamedService;
use tonic::Status;

use super::gate::{self, Authenticated};
use super::{status, RequestLog};
use crate::audit;
use crate::store::Store;
use crate::vault::Vault;

/// Metadata key marking a status as "the request's message did not decode"; [`DecodeGuard`]
/// answers such a status itself, so the key never reaches a client of the server.
pub const UNDECODABLE: &str = "x-kluis-undecodable";

/// prost's codec, saying why a message does not decode without showing any of it.
#[derive(Debug, Clone, Copy)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder(PhantomData)
    }
}

/// The decoder of [`Codec`].
#[derive(Debug)]
pub struct ProstDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for ProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            // INTERNAL, as tonic says it, for a client reading a broken answer; a server's
            // DecodeGuard makes it INVALID_ARGUMENT (the caller sent it).
            let mut status = Status::internal(format!(
                "not a valid {}: {}",
                message_name::<U>(),
                describe(&e)
            ));
            status
                .metadata_mut()
                .insert(UNDECODABLE, MetadataValue::from_static("1"));
            status
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The proto name of message type `U` (`kluis::proto::GetRecordRequest` → `GetRecordRequest`).
fn message_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}

/// Why prost refused a message, without any of its content: the path of the field it was
/// decoding, outermost first (`fields.kind`: names from the proto, never a value or a map
/// key), then prost's rule. A rule that quotes something read from the message (a number
/// such as `invalid key value: 4294967296`, which could be bytes of a value read as a key)
/// is cut before the quote (`invalid key value`).
pub fn describe(e: &prost::DecodeError) -> String {
    let text = e.to_string();
    let mut rest = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&text);
    // `Message.field: ` per level, innermost first.
    let mut path: Vec<&str> = Vec::new();
    while let Some((segment, after)) = rest.split_once(": ") {
        let Some((message, field)) = segment.split_once('.') else {
            break;
        };
        let ident =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !(ident(message) && ident(field)) {
            break;
        }
        path.push(field);
        rest = after;
    }
    path.reverse();
    // prost's rules name the encoding (`UTF-8`), wire types and field paths; a digit or a
    // quote anywhere else is something read from the message.
    let quotes = rest
        .replace("UTF-8", "")
        .chars()
        .any(|c| c.is_ascii_digit() || c == '"' || c == '\'' || !c.is_ascii());
    let rule = if quotes {
        rest.split(':').next().unwrap_or("").trim()
    } else {
        rest.trim()
    };
    let rule = if rule.is_empty() {
        "not a valid protobuf encoding"
    } else {
        rule
    };
    if path.is_empty() {
        rule.to_string()
    } else {
        format!("{}: {rule}", path.join("."))
    }
}

/// Answers, logs and audits a request of an authenticated caller whose message did not
/// decode (see the module): the layer between the gate and a kluis service.
#[derive(Clone)]
pub struct DecodeGuard<Svc, S> {
    inner: Svc,
    vault: Arc<Vault<S>>,
}

impl<Svc, S> DecodeGuard<Svc, S> {
    /// `inner`, whose undecodable requests are audited in `vault`.
    pub fn new(inner: Svc, vault: Arc<Vault<S>>) -> Self {
        Self { inner, vault }
    }
}

impl<Svc: NamedService, S> NamedService for DecodeGuard<Svc, S> {
    const NAME: &'static str = Svc::NAME;
}

type Body = tonic::body::Body;

impl<Svc, S> tower::Service<http::Request<Body>> for DecodeGuard<Svc, S>
where
    Svc: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    Svc::Future: Send + 'static,
    S: Store,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let action = gate::action_in(request.extensions());
        let caller = request
            .extensions()
            .get::<Authenticated>()
            .map(|a| a.0.clone());
        // The log line's time runs from before the body is read. It is made only for a
        // request that did not decode (the service logs every other one itself), so that
        // the others pay for no second request id.
        let started = std::time::Instant::now();
        let request_id = request.headers().get(super::log::REQUEST_ID).cloned();
        let body_owner = request
            .extensions()
            .get::<crate::server::BodyOwner>()
            .cloned();
        let vault = Arc::clone(&self.vault);
        if let Some((status, http_status)) = content_type_refusal(request.headers()) {
            // The body is never read (nor decoded).
            drop(request);
            return Box::pin(async move {
                let log = request_log(action, request_id, started);
                let mut answer = refuse(&vault, log, action, caller, status)
                    .await
                    .into_http();
                *answer.status_mut() = http_status;
                Ok(answer)
            });
        }
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            let status = if response.headers().contains_key(UNDECODABLE) {
                let why = Status::from_header_map(response.headers())
                    .map(|s| s.message().to_string())
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| "not a valid protobuf encoding of its message".into());
                Status::invalid_argument(format!("request body is {why}"))
            } else {
                // Every handler answers with its request id. A refusal without one comes from
                // tonic before any handler ran: a body that is not one gRPC frame (none, cut
                // short, a compressed flag without an encoding), an encoding it does not
                // support, a message over the size limit, or an unknown method. Those are
                // answered, logged and audited here too, with their own code (a framing error,
                // which tonic calls INTERNAL, is the caller's: INVALID_ARGUMENT).
                match Status::from_header_map(response.headers()) {
                    Some(s)
                        if s.code() != tonic::Code::Ok
                            && !response.headers().contains_key(super::log::REQUEST_ID) =>
                    {
                        match s.code() {
                            // The body did not end: the caller reset the stream (a cancel, or
                            // its deadline). Not the caller's invalid input (review 31).
                            _ if body_owner.as_ref().is_some_and(|o| o.was_cut()) => {
                                Status::cancelled(
                                    "the call ended before its request body was whole: the caller cancelled it, or its deadline passed",
                                )
                            }
                            tonic::Code::Internal => Status::invalid_argument(format!(
                                "request body is not one valid gRPC message: {}",
                                s.message()
                            )),
                            // A message over the size limit: the code of every size limit
                            // (the server's outer layer then names the limit).
                            tonic::Code::OutOfRange => Status::resource_exhausted(s.message()),
                            code => {
                                let mut status = Status::new(code, s.message());
                                // An encoding it does not take: the answer says which it
                                // takes, as the gRPC compression spec asks (`identity`).
                                if let Some(accepted) = response
                                    .headers()
                                    .get(ACCEPT_ENCODING)
                                    .and_then(|v| MetadataValue::try_from(v.as_bytes()).ok())
                                {
                                    status.metadata_mut().insert(ACCEPT_ENCODING, accepted);
                                }
                                status
                            }
                        }
                    }
                    _ => return Ok(response),
                }
            };
            drop(response);
            let log = request_log(action, request_id, started);
            Ok(refuse(&vault, log, action, caller, status)
                .await
                .into_http())
        })
    }
}

/// The header in which a gRPC server names the message encodings it takes.
const ACCEPT_ENCODING: &str = "grpc-accept-encoding";

/// The log of a request refused here, with the request id it sent (if it is a sane one).
fn request_log(
    action: &'static str,
    request_id: Option<http::HeaderValue>,
    started: std::time::Instant,
) -> RequestLog {
    let mut metadata = MetadataMap::new();
    if let Some(id) = request_id.and_then(|v| MetadataValue::try_from(v.as_bytes()).ok()) {
        metadata.insert(super::log::REQUEST_ID, id);
    }
    RequestLog::started_at(
        action,
        &tonic::Request::from_parts(metadata, Default::default(), ()),
        started,
    )
}

/// The refusal of a request whose `content-type` is not protobuf over gRPC, and the HTTP
/// status to answer it with: `application/grpc` or `application/grpc+proto` (parameters after
/// `;` allowed, any case) pass. Another gRPC subtype (`application/grpc+json`) is
/// `UNIMPLEMENTED`; a request that is not gRPC at all (`application/json`, none) gets HTTP
/// 415, as the gRPC protocol asks, with the same status in its headers.
fn content_type_refusal(headers: &http::HeaderMap) -> Option<(Status, http::StatusCode)> {
    const RULE: &str = "Kluis serves gRPC with protobuf messages only: `application/grpc` or `application/grpc+proto`";
    const GRPC: &str = "application/grpc";
    let value = headers.get(http::header::CONTENT_TYPE);
    let media = value
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim());
    // Compared without allocating: this runs on every request.
    let grpc_subtype = media.and_then(|m| {
        let head = m.get(..GRPC.len())?;
        head.eq_ignore_ascii_case(GRPC).then(|| &m[GRPC.len()..])
    });
    match grpc_subtype {
        Some("") => None,
        Some(sub) if sub.eq_ignore_ascii_case("+proto") => None,
        Some(sub) if sub.starts_with('+') => Some((
            Status::unimplemented(format!(
                "content-type: the message format `{}` is not served: {RULE}",
                super::super::error::printable_name(&sub[1..].to_ascii_lowercase())
            )),
            http::StatusCode::OK,
        )),
        _ => Some((
            Status::invalid_argument(format!(
                "content-type: {}: {RULE}",
                if value.is_none() {
                    "missing"
                } else {
                    "not a gRPC content type"
                }
            )),
            http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
        )),
    }
}

/// Records the refusal of an undecodable request (fail closed), writes its log line, and
/// returns the status to answer with its request id.
async fn refuse<S: Store>(
    vault: &Vault<S>,
    mut log: RequestLog,
    action: &'static str,
    caller: Option<crate::policy::Caller>,
    status: Status,
) -> Status {
    let mut ev = audit::Context::new(action);
    if let Some(caller) = caller {
        ev.draft.principal = caller.principal.to_string();
        ev.draft.role = caller.role.name.clone();
        log.caller(caller);
    }
    let status = match vault
        .record_event(ev, audit::Outcome::of_code(status.code()))
        .await
    {
        Ok(()) => status,
        Err(e) => status::from_vault(e),
    };
    log.refuse(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message with a string field, a nested message and a map, like the kluis requests.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Outer {
        #[prost(string, tag = "1")]
        id: String,
        #[prost(message, optional, tag = "2")]
        inner: Option<Inner>,
        #[prost(map = "string, message", tag = "3")]
        fields: std::collections::HashMap<String, Inner>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct Inner {
        #[prost(string, tag = "1")]
        text: String,
    }

    fn refusal(bytes: &[u8]) -> String {
        describe(&Outer::decode(bytes).expect_err("does not decode"))
    }

    /// A length-delimited field `tag` holding `body`.
    fn field(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag << 3 | 2, body.len() as u8];
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn only_protobuf_over_grpc_is_served() {
        let headers = |value: Option<&str>| {
            let mut h = http::HeaderMap::new();
            if let Some(v) = value {
                h.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_str(v).expect("header"),
                );
            }
            h
        };
        for ok in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC",
            "application/grpc; charset=utf-8",
        ] {
            assert!(content_type_refusal(&headers(Some(ok))).is_none(), "{ok}");
        }
        let (status, http) =
            content_type_refusal(&headers(Some("application/grpc+json"))).expect("refused");
        assert_eq!(
            (status.code(), http),
            (tonic::Code::Unimplemented, http::StatusCode::OK)
        );
        assert!(
            status
                .message()
                .starts_with("content-type: the message format `json`"),
            "{}",
            status.message()
        );
        for (value, why) in [
            (Some("application/json"), "not a gRPC content type"),
            (Some("text/plain"), "not a gRPC content type"),
            (Some("application/grpcx"), "not a gRPC content type"),
            (None, "missing"),
        ] {
            let (status, http) = content_type_refusal(&headers(value)).expect("refused");
            assert_eq!(
                (status.code(), http),
                (
                    tonic::Code::InvalidArgument,
                    http::StatusCode::UNSUPPORTED_MEDIA_TYPE
                ),
                "{value:?}"
            );
            assert!(
                status
                    .message()
                    .starts_with(&format!("content-type: {why}")),
                "{}",
                status.message()
            );
        }
    }

    #[test]
    fn refusals_name_the_field_path_and_the_rule_never_the_content() {
        assert_eq!(
            refusal(&field(1, b"111222333\xff")),
            "id: invalid string value: data is not UTF-8 encoded"
        );
        assert_eq!(
            refusal(&field(2, &field(1, b"Jan\xc3"))),
            "inner.text: invalid string value: data is not UTF-8 encoded"
        );
        let entry = [field(1, b"full_name"), field(2, &field(1, b"Jan\xc3"))].concat();
        let text = refusal(&field(3, &entry));
        assert!(text.starts_with("fields"), "{text}");
        assert!(text.ends_with("data is not UTF-8 encoded"), "{text}");
        assert!(!text.contains("full_name"), "{text}");
        // Wrong wire type: the types are named.
        assert_eq!(
            refusal(&[0x08, 0x01]),
            "id: invalid wire type: Varint (expected LengthDelimited)"
        );
        // A length past the end.
        assert_eq!(refusal(&[0x0a, 0x05, b'a']), "id: buffer underflow");
        // A key read from the content (here 9 bytes of a would-be value) is not quoted.
        let key = [0xb3, 0xb3, 0xb3, 0xb3, 0xb3, 0xb3, 0xb3, 0xb3, 0x7f, 0x00];
        let text = refusal(&key);
        assert!(!text.chars().any(|c| c.is_ascii_digit()), "{text}");
        assert!(text.starts_with("invalid"), "{text}");
    }

    #[tokio::test]
    async fn a_refusal_is_audited_as_invalid_and_unavailable_when_its_event_cannot_be_written() {
        use crate::crypto::SecretKey;
        use crate::keys::{KeyRing, MasterKey};
        use crate::store::SledStore;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let keys = KeyRing::open(&store, &master).await.expect("keys");
        let vault = Vault::new(
            store,
            Arc::new(crate::schema::Schema::default_schema()),
            Arc::new(keys),
        );
        let policy = crate::policy::Policy::default_policy();
        let role = policy.role("recruiter").expect("default role").clone();
        let caller = crate::policy::Caller {
            principal: "dev-recruiter".into(),
            role,
        };
        let log = || RequestLog::start("GetRecord", &tonic::Request::new(()));
        let invalid = || Status::invalid_argument("request body is not a valid GetRecordRequest");
        let answered = refuse(&vault, log(), "GetRecord", Some(caller.clone()), invalid()).await;
        assert_eq!(answered.code(), tonic::Code::InvalidArgument);
        assert!(answered
            .metadata()
            .get(super::super::log::REQUEST_ID)
            .is_some());
        let page = audit::query(vault.store(), &audit::Filter::default(), 0, 10)
            .await
            .expect("query");
        let rows: Vec<_> = page
            .events
            .iter()
            .map(|e| {
                (
                    e.draft.principal.as_str(),
                    e.draft.role.as_str(),
                    e.draft.action.as_str(),
                    e.draft.record_id.as_str(),
                    e.draft.outcome.as_str(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![("dev-recruiter", "recruiter", "GetRecord", "", "invalid")]
        );
        // Fail closed: no event, no answer but UNAVAILABLE.
        vault.store().fail_next_log_write();
        let answered = refuse(&vault, log(), "GetRecord", Some(caller), invalid()).await;
        assert_eq!(answered.code(), tonic::Code::Unavailable);
        assert!(answered.message().contains("audit trail unavailable"));
    }

    #[test]
    fn the_message_name_is_the_proto_name() {
        assert_eq!(
            message_name::<crate::proto::GetRecordRequest>(),
            "GetRecordRequest"
        );
    }
}

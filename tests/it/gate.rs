//! The authentication gate: a call to `Records`, `Audit` or `Keys` without valid credentials
//! is answered `UNAUTHENTICATED` before its body is read (a body over `max_request_bytes`, or
//! one that never arrives, makes no difference), its refusal still reaches the audit trail
//! (in the background, without a record id), and health and reflection stay open. Also the
//! cap on open connections (`max_connections`).

use std::convert::Infallible;
use std::time::Duration;

use futures::StreamExt;
use kluis::proto::audit_client::AuditClient;
use kluis::proto::keys_client::KeysClient;
use kluis::proto::records_client::RecordsClient;
use kluis::proto::{
    AuditEvent, CreateRecordRequest, GetKeyStatusRequest, GetRecordRequest, ListRecordsRequest,
    VerifyChainRequest,
};
use tonic::codegen::Bytes;
use tonic::Code;
use tower::{Service, ServiceExt};

use crate::helpers::*;

/// (principal, role, purpose, action, record id, field names, outcome)
fn row(e: &AuditEvent) -> (&str, &str, &str, &str, &str, &[String], &str) {
    (
        &e.principal,
        &e.role,
        &e.purpose,
        &e.action,
        &e.record_id,
        &e.field_names,
        &e.outcome,
    )
}

/// The row of a refused unauthenticated call of `action`.
fn refused(action: &str) -> (&str, &str, &str, &str, &str, &[String], &str) {
    ("", "", "", action, "", &[], "denied")
}

#[tokio::test]
async fn an_unauthenticated_request_over_max_request_bytes_is_unauthenticated_not_too_large() {
    let mut v = spawn_vault().await;
    v.stop().await;
    v.tweak = Some(|s| s.max_request_bytes = 1024 * 1024);
    v.start().await.expect("restart with a 1 MiB request limit");
    let big = || CreateRecordRequest {
        purpose: "recruitment".into(),
        fields: fields(&[(
            "cv_document",
            blob(&vec![b'%'; 2 * 1024 * 1024], "application/pdf"),
        )]),
    };
    // Without valid credentials the size never matters: the body is not read.
    for (authorization, needle) in [
        (None, "missing credentials"),
        (
            Some("Bearer kluis_not-a-real-token"),
            "invalid bearer token",
        ),
    ] {
        let mut client = v.client_with_token(authorization).await;
        assert_status(
            client.create_record(big()).await,
            Code::Unauthenticated,
            &[needle],
        );
    }
    // With them the same request is too large (the decoding limit still applies).
    let mut recruiter = v.client("recruiter").await;
    assert_status(
        recruiter.create_record(big()).await,
        Code::ResourceExhausted,
        &["request too large", "max_request_bytes"],
    );
    let listed = recruiter
        .list_records(ListRecordsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.records.is_empty(), "nothing was created");
    // Both refusals are in the trail: the method, `denied`, no principal, no record.
    let events = v.refusals_after(0, 2).await;
    assert_eq!(
        events.iter().map(row).collect::<Vec<_>>(),
        vec![refused("CreateRecord"); 2]
    );
}

#[tokio::test]
async fn an_unauthenticated_request_is_answered_before_its_body_arrives() {
    let v = spawn_vault().await;
    // A message that declares 8 MiB, sends 64 KiB of it and then stalls for good.
    let mut first = vec![0u8];
    first.extend_from_slice(&(8u32 * 1024 * 1024).to_be_bytes());
    first.extend_from_slice(&[0u8; 64 * 1024]);
    let frames = futures::stream::iter([Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(
        first,
    )))])
    .chain(futures::stream::pending());
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/kluis.v1.Records/CreateRecord", v.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::StreamBody::new(
            frames,
        )))
        .expect("request");
    let mut channel = v.channel().await;
    let response = tokio::time::timeout(Duration::from_secs(10), async {
        channel.ready().await?.call(request).await
    })
    .await
    .expect("answered without waiting for the body")
    .expect("a response");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(
        header("grpc-status").as_deref(),
        Some("16"),
        "UNAUTHENTICATED"
    );
    assert!(
        header("x-request-id").is_some(),
        "the refusal names its request id"
    );
    assert_eq!(
        v.refusals_after(0, 1)
            .await
            .iter()
            .map(row)
            .collect::<Vec<_>>(),
        vec![refused("CreateRecord")]
    );
}

#[tokio::test]
async fn health_answers_without_credentials_while_the_kluis_services_refuse() {
    let v = spawn_vault().await;
    let channel = v.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["kluis.v1.Records", "kluis.v1.Audit", "kluis.v1.Keys"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health needs no credentials")
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
    // The same connection, no credentials: each of the three services refuses.
    let refusal = RecordsClient::new(channel.clone())
        .list_records(ListRecordsRequest::default())
        .await
        .expect_err("Records refuses");
    assert_eq!(refusal.code(), Code::Unauthenticated);
    assert!(
        refusal.metadata().get("x-request-id").is_some(),
        "the refusal names its request id"
    );
    assert_status(
        AuditClient::new(channel.clone())
            .verify_chain(VerifyChainRequest {})
            .await,
        Code::Unauthenticated,
        &["missing credentials"],
    );
    assert_status(
        KeysClient::new(channel.clone())
            .get_key_status(GetKeyStatusRequest {})
            .await,
        Code::Unauthenticated,
        &["missing credentials"],
    );
    assert_eq!(
        v.refusals_after(0, 3)
            .await
            .iter()
            .map(row)
            .collect::<Vec<_>>(),
        vec![
            refused("ListRecords"),
            refused("VerifyChain"),
            refused("GetKeyStatus")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_refusals_is_recorded_one_event_each_and_the_chain_holds() {
    let v = spawn_vault().await;
    let anonymous = v.client_with_token(None).await;
    let calls = (0..300).map(|i| {
        let mut client = anonymous.clone();
        async move {
            client
                .get_record(GetRecordRequest {
                    record_id: uuid::Uuid::new_v4().to_string(),
                    purpose: format!("purpose-{i}"),
                    field_names: vec![],
                })
                .await
        }
    });
    for result in futures::future::join_all(calls).await {
        assert_status(result, Code::Unauthenticated, &[]);
    }
    let events = v.refusals_after(0, 300).await;
    assert_eq!(events.len(), 300);
    assert!(events.iter().all(|e| row(e) == refused("GetRecord")));
    // The trail still verifies.
    let verified = AuditClient::with_interceptor(v.channel().await, bearer(&v.tokens["auditor"]))
        .verify_chain(VerifyChainRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(verified.ok, "chain fails at {}", verified.first_bad_seq);
}

#[tokio::test]
async fn past_max_connections_a_new_connection_waits_until_one_closes() {
    let mut v = spawn_vault().await;
    v.stop().await;
    v.tweak = Some(|s| s.max_connections = 1);
    v.start().await.expect("restart with one connection");
    let mut first = v.client("recruiter").await;
    first
        .list_records(ListRecordsRequest::default())
        .await
        .expect("the first connection is served");
    let (addr, token) = (v.addr, v.tokens["recruiter"].clone());
    let second = tokio::spawn(async move {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await?;
        let result = RecordsClient::with_interceptor(channel, bearer(&token))
            .list_records(ListRecordsRequest::default())
            .await
            .map(|_| ());
        Ok::<_, tonic::transport::Error>(result)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "a second connection is not served while the first is open"
    );
    drop(first);
    tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("served once the first connection closed")
        .expect("task")
        .expect("connects")
        .expect("the second connection is served");
}

/// A client that connects and sends nothing (no HTTP/2 preface, no request), or makes only
/// refused calls, is closed once the first-request deadline passes, freeing its
/// `max_connections` slot: 1024 of them used to lock every other client out for good
/// (reviews 13 and 14). A connection that made an authenticated call stays.
#[tokio::test]
async fn a_connection_that_sends_no_request_is_closed_and_frees_its_slot() {
    use tokio::io::AsyncReadExt;
    let mut v = spawn_vault().await;
    v.stop().await;
    v.tweak = Some(|s| {
        s.max_connections = 2;
        s.first_request_timeout = Duration::from_millis(700);
    });
    v.start().await.expect("restart");
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(
            tokio::net::TcpStream::connect(v.addr)
                .await
                .expect("connect"),
        );
    }
    // Both slots are taken; once the deadline passes, the server closes both (EOF after
    // its SETTINGS frame) and a client with a request is served.
    for mut socket in silent {
        let mut buf = vec![0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a silent connection was not closed");
    }
    // A refused call does not keep the slot either (review 14): both slots held by clients
    // without a token, each refused once; a client with a token is served once they are cut.
    let mut refused = Vec::new();
    for _ in 0..2 {
        let mut stranger = v.client_with_token(Some("Bearer kluis_not-a-token")).await;
        assert_status(
            stranger.list_records(ListRecordsRequest::default()).await,
            Code::Unauthenticated,
            &["invalid bearer token"],
        );
        refused.push(stranger);
    }
    let mut client = v.client("recruiter").await;
    tokio::time::timeout(
        Duration::from_secs(10),
        client.list_records(ListRecordsRequest::default()),
    )
    .await
    .expect("served once the refused clients' connections were cut")
    .expect("served once the silent ones were closed");
    drop(refused);
    // A connection in use is not closed by the deadline.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client
        .list_records(ListRecordsRequest::default())
        .await
        .expect("the same connection, past the deadline");
}

#[tokio::test]
async fn the_bearer_scheme_is_matched_without_regard_to_case() {
    let v = spawn_vault().await;
    let token = &v.tokens["recruiter"];
    // RFC 7235 §2.1: the authentication scheme is case-insensitive.
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let mut client = v
            .client_with_token(Some(&format!("{scheme} {token}")))
            .await;
        if let Err(e) = client.list_records(ListRecordsRequest::default()).await {
            panic!("{scheme}: {e}");
        }
    }
    for other in [format!("Bearer{token}"), format!("Basic {token}")] {
        let mut client = v.client_with_token(Some(&other)).await;
        assert_status(
            client.list_records(ListRecordsRequest::default()).await,
            Code::Unauthenticated,
            &["must be `Bearer <token>`"],
        );
    }
}

#[tokio::test]
async fn authorization_metadata_given_twice_is_unauthenticated_whatever_the_order() {
    let v = spawn_vault().await;
    let (recruiter, payroll) = (&v.tokens["recruiter"], &v.tokens["payroll"]);
    for pair in [
        [recruiter.as_str(), payroll.as_str()],
        [payroll.as_str(), recruiter.as_str()],
        [recruiter.as_str(), "kluis_not-a-real-token"],
        [recruiter.as_str(), recruiter.as_str()],
    ] {
        let values: Vec<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = pair
            .iter()
            .map(|t| format!("Bearer {t}").parse().expect("ascii"))
            .collect();
        let mut client = RecordsClient::with_interceptor(
            v.channel().await,
            move |mut request: tonic::Request<()>| {
                for value in &values {
                    request
                        .metadata_mut()
                        .append("authorization", value.clone());
                }
                Ok(request)
            },
        );
        assert_status(
            client.list_records(ListRecordsRequest::default()).await,
            Code::Unauthenticated,
            &["authorization metadata given more than once"],
        );
    }
}

/// A length-delimited protobuf field `tag` holding `body` (under 128 bytes).
fn pb_field(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag << 3 | 2, u8::try_from(body.len()).expect("short")];
    out.extend_from_slice(body);
    out
}

#[tokio::test]
async fn health_answers_an_undecodable_body_invalid_and_echoes_only_names() {
    let v = spawn_vault().await;
    let addr = v.addr.to_string();
    // Health needs no credentials: invalid UTF-8 in `service` is INVALID_ARGUMENT.
    let answer = raw_call(
        &addr,
        "/grpc.health.v1.Health/Check",
        None,
        None,
        &pb_field(1, b"111222333\xff"),
    )
    .await;
    assert_eq!(answer.code, Code::InvalidArgument, "{answer:?}");
    assert!(
        answer
            .message
            .starts_with("request body is not one valid gRPC health request: "),
        "{answer:?}"
    );
    assert!(!answer.message.contains("111222333"), "{answer:?}");
    // A key made of the request's bytes is not shown either (review 29).
    let answer = raw_call(
        &addr,
        "/grpc.health.v1.Health/Check",
        None,
        None,
        &[0xb3, 0xb3, 0xb3, 0xb3, 0xb3, 0xb3, 0xb3, 0xb3, 0x7f, 0x00],
    )
    .await;
    assert_eq!(answer.code, Code::InvalidArgument, "{answer:?}");
    assert!(answer.message.contains("invalid key value"), "{answer:?}");
    assert!(
        !answer.message.bytes().any(|b| b.is_ascii_digit()),
        "{answer:?}"
    );
    // A service name that is not a name's shape (a value, or very long) is not echoed.
    for service in ["111222333".to_string(), "a".repeat(20_000)] {
        let answer = raw_call(
            &addr,
            "/grpc.health.v1.Health/Check",
            None,
            None,
            &prost::Message::encode_to_vec(&tonic_health::pb::HealthCheckRequest { service }),
        )
        .await;
        assert_eq!(answer.code, Code::NotFound, "{}", &answer.message);
        assert!(
            answer.message.contains("<not a name: not shown>") && answer.message.len() < 400,
            "{}",
            answer.message
        );
    }
    // A request over the open services' limit is refused naming it (review 31).
    {
        let answer = raw_call(
            &addr,
            "/grpc.health.v1.Health/Check",
            None,
            None,
            &prost::Message::encode_to_vec(&tonic_health::pb::HealthCheckRequest {
                service: "a".repeat(70_000),
            }),
        )
        .await;
        assert_eq!(answer.code, Code::ResourceExhausted, "{}", &answer.message);
        assert!(
            answer
                .message
                .contains("a health or reflection request may hold at most 65536 bytes"),
            "{}",
            answer.message
        );
    }
    // A name is, and the server's own still answer.
    let answer = raw_call(
        &addr,
        "/grpc.health.v1.Health/Check",
        None,
        None,
        &pb_field(1, b"kluis.v1.nothing"),
    )
    .await;
    assert_eq!(answer.code, Code::NotFound, "{answer:?}");
    assert!(answer.message.contains("`kluis.v1.nothing`"), "{answer:?}");
    let answer = raw_call(&addr, "/grpc.health.v1.Health/Check", None, None, b"").await;
    assert_eq!(answer.code, Code::Ok, "{answer:?}");
}

#[tokio::test]
async fn an_authenticated_request_whose_body_does_not_decode_is_invalid_logged_and_audited() {
    let v = spawn_vault().await;
    let addr = v.addr.to_string();
    let bearer_of = |role: &str| format!("Bearer {}", v.tokens[role]);
    let id = uuid::Uuid::new_v4().to_string();
    // (path, role, body, the message's rule): invalid UTF-8 (with a BSN before it), a map
    // value's text, a wrong wire type, a length past the end.
    let entry = [
        pb_field(1, b"full_name"),
        pb_field(2, &pb_field(1, b"Jan\xc3")),
    ]
    .concat();
    let cases: [(&str, &str, Vec<u8>, &str); 4] = [
        (
            "/kluis.v1.Records/GetRecord",
            "recruiter",
            [pb_field(1, id.as_bytes()), pb_field(2, b"111222333\xff")].concat(),
            "request body is not a valid GetRecordRequest: purpose: invalid string value: data is not UTF-8 encoded",
        ),
        (
            "/kluis.v1.Records/CreateRecord",
            "recruiter",
            [pb_field(1, b"recruitment"), pb_field(2, &entry)].concat(),
            "request body is not a valid CreateRecordRequest: fields.",
        ),
        (
            "/kluis.v1.Audit/QueryEvents",
            "auditor",
            vec![0x0a, 0x01],
            "request body is not a valid QueryEventsRequest: ",
        ),
        (
            "/kluis.v1.Keys/GetKeyStatus",
            "security_officer",
            vec![0x0a, 0x05, b'a'],
            "request body is not a valid GetKeyStatusRequest: buffer underflow",
        ),
    ];
    for (i, (path, role, body, rule)) in cases.iter().enumerate() {
        let request_id = format!("undecodable-{i}");
        let answer = raw_call(&addr, path, Some(&bearer_of(role)), Some(&request_id), body).await;
        assert_eq!(answer.code, Code::InvalidArgument, "{path}: {answer:?}");
        assert!(answer.message.starts_with(rule), "{path}: {answer:?}");
        // Names and types only: no value, no map key.
        for value in ["111222333", "Jan", "full_name", "recruitment"] {
            assert!(!answer.message.contains(value), "{path}: {answer:?}");
        }
        assert_eq!(answer.request_id.as_deref(), Some(request_id.as_str()));
    }
    // Without credentials the body is not read: UNAUTHENTICATED, as for any body.
    let answer = raw_call(&addr, cases[0].0, None, None, &cases[0].2).await;
    assert_eq!(answer.code, Code::Unauthenticated, "{answer:?}");
    assert!(answer.request_id.is_some());
    // Each refused call is in the trail, before it was answered: the caller, the method,
    // `invalid`, nothing else (the body that would name a record or fields never decoded).
    let events = v
        .audit_events(kluis::proto::QueryEventsRequest::default())
        .await;
    let rows: Vec<_> = events
        .iter()
        .filter(|e| !e.principal.is_empty())
        .map(row)
        .collect();
    let empty: &[String] = &[];
    assert_eq!(
        &rows[..4],
        &[
            (
                "test-recruiter",
                "recruiter",
                "",
                "GetRecord",
                "",
                empty,
                "invalid"
            ),
            (
                "test-recruiter",
                "recruiter",
                "",
                "CreateRecord",
                "",
                empty,
                "invalid"
            ),
            (
                "test-auditor",
                "auditor",
                "",
                "QueryEvents",
                "",
                empty,
                "invalid"
            ),
            (
                "test-security_officer",
                "security_officer",
                "",
                "GetKeyStatus",
                "",
                empty,
                "invalid"
            ),
        ]
    );
    // A body that decodes still works on the same path.
    let good = prost::Message::encode_to_vec(&GetRecordRequest {
        record_id: id.clone(),
        purpose: "recruitment".into(),
        field_names: vec![],
    });
    let answer = raw_call(
        &addr,
        cases[0].0,
        Some(&bearer_of("recruiter")),
        None,
        &good,
    )
    .await;
    assert_eq!(answer.code, Code::NotFound, "{answer:?}");
}

#[tokio::test]
async fn a_body_that_is_not_one_grpc_frame_is_refused_audited_and_logged() {
    let v = spawn_vault().await;
    let addr = v.addr.to_string();
    let bearer = format!("Bearer {}", v.tokens["recruiter"]);
    let path = "/kluis.v1.Records/GetRecord";
    let cases: Vec<(&str, Option<&str>, Vec<u8>)> = vec![
        ("no message at all", None, vec![]),
        ("a frame cut short", None, vec![0, 0, 0, 0, 100, 0x0a, 0x01]),
        (
            "compressed flag, no encoding",
            None,
            vec![1, 0, 0, 0, 2, 0x0a, 0x00],
        ),
        (
            "gzip flag, not gzip",
            Some("gzip"),
            vec![1, 0, 0, 0, 2, 0x0a, 0x00],
        ),
        // Review 30: JSON or plain text was decoded as protobuf (an empty body answered as an
        // empty message).
        ("content-type application/json", None, vec![0, 0, 0, 0, 0]),
        (
            "content-type application/grpc+json",
            None,
            vec![0, 0, 0, 0, 0],
        ),
        ("no content-type", None, vec![0, 0, 0, 0, 0]),
    ];
    let mut answers = Vec::new();
    for (what, enc, frames) in cases {
        let mut headers = vec![("authorization", bearer.as_str())];
        headers.extend(enc.map(|e| ("grpc-encoding", e)));
        if let Some(content_type) = what.strip_prefix("content-type ") {
            headers.push(("content-type", content_type));
        }
        if what == "no content-type" {
            headers.push(("content-type", ""));
        }
        let answer = raw_frames(&addr, path, &headers, frames).await;
        eprintln!("{what}: {answer:?}");
        answers.push((what, answer));
    }
    let events = v
        .audit_events(kluis::proto::QueryEventsRequest::default())
        .await;
    let rows: Vec<_> = events
        .iter()
        .filter(|e| e.principal == "test-recruiter")
        .map(row)
        .collect();
    eprintln!("events of the recruiter: {rows:?}");
    for (
        what,
        RawAnswer {
            code,
            message,
            request_id,
            http_status,
            accept_encoding,
        },
    ) in &answers
    {
        // An encoding or message format the server does not take is UNIMPLEMENTED (gRPC's
        // code for it), and the answer names the encodings it takes; the framing errors are
        // the caller's: INVALID_ARGUMENT; a request that is not gRPC is HTTP 415.
        let expected = match *what {
            "gzip flag, not gzip" | "content-type application/grpc+json" => Code::Unimplemented,
            _ => Code::InvalidArgument,
        };
        assert_eq!(*code, expected, "{what}: {message}");
        if *what == "gzip flag, not gzip" {
            assert_eq!(accept_encoding.as_deref(), Some("identity"), "{what}");
        }
        if what.contains("content-type") {
            assert!(message.starts_with("content-type: "), "{what}: {message}");
        }
        let not_grpc = matches!(*what, "content-type application/json" | "no content-type");
        assert_eq!(*http_status, if not_grpc { 415 } else { 200 }, "{what}");
        assert!(
            request_id.is_some(),
            "{what}: the answer carries x-request-id"
        );
    }
    assert_eq!(
        rows.len(),
        answers.len(),
        "each call audited once: {rows:?}"
    );
}

/// A call still in flight when the shutdown's grace period ends (here: its request body never
/// finishes) is cut off then: the server stops at once instead of serving it on, and the
/// client sees its call fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_still_open_after_the_grace_period_is_cut_off() {
    let mut v = spawn_vault().await;
    let token = format!("Bearer {}", v.tokens["recruiter"]);
    // Half a gRPC message: the frame says 100 bytes, 10 come, and the body never ends.
    let mut first = vec![0u8];
    first.extend_from_slice(&100u32.to_be_bytes());
    first.extend_from_slice(&[0u8; 10]);
    let body = futures::stream::once(async move {
        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(first)))
    })
    .chain(futures::stream::pending());
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/kluis.v1.Records/GetRecord", v.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", token)
        .body(tonic::body::Body::new(http_body_util::StreamBody::new(
            body,
        )))
        .expect("request");
    let mut channel = v.channel().await;
    let call = tokio::spawn(async move {
        use http_body_util::BodyExt;
        let response = match channel.ready().await.expect("ready").call(request).await {
            Ok(r) => r,
            Err(e) => return Err(e.to_string()),
        };
        // Headers may come; the answer never does.
        match response.into_body().collect().await {
            // A status in the trailers (no message): not an answer either.
            Ok(collected) => match collected.trailers().and_then(|t| t.get("grpc-status")) {
                Some(status) if status != "0" => Err(format!("grpc-status {status:?}")),
                _ => Ok(()),
            },
            Err(e) => Err(e.to_string()),
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    v.stop_within(std::time::Duration::from_millis(300)).await;
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_secs(4),
        "the shutdown waited {took:?} for a connection it had closed"
    );
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), call)
        .await
        .expect("the client's call ended")
        .expect("task");
    assert!(ended.is_err(), "the cut-off call failed");
}

/// A GetRecord call for `fields` of record `id` as raw HTTP/2 on `channel`: the answer's
/// headers, with its body left unread (the client grants no more flow-control window).
async fn unread_get(
    channel: &mut tonic::transport::Channel,
    addr: std::net::SocketAddr,
    token: &str,
    id: &str,
    fields: &[&str],
) -> http::Response<tonic::body::Body> {
    let message = prost::Message::encode_to_vec(&GetRecordRequest {
        record_id: id.into(),
        purpose: "recruitment".into(),
        field_names: fields.iter().map(|f| f.to_string()).collect(),
    });
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&message);
    let request = grpc_post(
        &addr.to_string(),
        "/kluis.v1.Records/GetRecord",
        &[("authorization", token)],
        frame,
    );
    let response = channel
        .ready()
        .await
        .expect("ready")
        .call(request)
        .await
        .expect("answer headers");
    let response = response.map(tonic::body::Body::new);
    assert!(
        !response.headers().contains_key("grpc-status"),
        "an answer, not a refusal: {:?}",
        response.headers()
    );
    response
}

#[tokio::test]
async fn answers_left_unread_hold_a_bounded_budget_and_their_connection_is_closed() {
    let mut v = spawn_vault().await;
    v.stop().await;
    // Answers may hold max(4 x 8 MiB, 64 MiB) = 64 MiB before they are sent.
    v.tweak = Some(|s| {
        s.max_request_bytes = 8 * 1024 * 1024;
        s.answer_stall_timeout = Duration::from_millis(1500);
    });
    v.start().await.expect("restart");
    let mut recruiter = v.client("recruiter").await;
    let doc = document(6 * 1024 * 1024);
    let id = create_with(
        &mut recruiter,
        "recruitment",
        &[
            ("cv_document", blob(&doc, "application/pdf")),
            ("full_name", text("Anna de Vries")),
        ],
    )
    .await;
    let get = GetRecordRequest {
        record_id: id.clone(),
        purpose: "recruitment".into(),
        field_names: vec!["cv_document".into()],
    };
    // Five answers of 6 MiB on one connection whose client reads none of them: 30 MiB held,
    // of the recruiter's share of 32 MiB (half the budget).
    let token = format!("Bearer {}", v.tokens["recruiter"]);
    let mut stalling = v.channel().await;
    let mut unread = Vec::new();
    for _ in 0..5 {
        unread.push(unread_get(&mut stalling, v.addr, &token, &id, &["cv_document"]).await);
    }
    // A sixth does not fit, on any connection; small answers still do.
    assert_status(
        recruiter.get_record(get.clone()).await,
        Code::ResourceExhausted,
        &[
            "field_names: the answer is",
            "answers to this caller that it has not read yet already hold its share",
        ],
    );
    recruiter
        .get_record(GetRecordRequest {
            field_names: vec!["full_name".into()],
            ..get.clone()
        })
        .await
        .expect("a small answer is not held against the budget");
    // Another caller has the other half (review 17: one slow reader held the whole budget,
    // and every other caller's documents and exports were refused).
    let got = v
        .client("privacy_officer")
        .await
        .get_record(GetRecordRequest {
            purpose: "data_subject_request".into(),
            ..get.clone()
        })
        .await
        .expect("the privacy officer's answer fits")
        .into_inner();
    assert_eq!(got.fields.len(), 1);
    // The stalled connection is closed after answer_stall_timeout: its answers end in an
    // error, and their budget is free again.
    let first = unread.remove(0);
    let ended = tokio::time::timeout(Duration::from_secs(10), async move {
        use http_body_util::BodyExt;
        first.into_body().collect().await.map(|_| ())
    })
    .await
    .expect("the stalled connection was closed");
    assert!(ended.is_err(), "an unread answer is cut off, not completed");
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match recruiter.get_record(get.clone()).await {
                Ok(answer) => return answer.into_inner(),
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await
    .expect("the budget is free again once the stalled connection is closed");
    assert!(got.fields["cv_document"].kind == Some(kluis::proto::field_value::Kind::Blob(doc)));
    // A caller that reads its answer keeps its connection past the stall timeout.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    recruiter
        .get_record(get)
        .await
        .expect("the reading client's connection is open");
}

/// A proxy to `to` that passes the server's bytes on at about `rate` bytes a second (a slow
/// link); the client's bytes pass at once.
async fn slow_link(to: std::net::SocketAddr, rate: u64) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(to).await.expect("connect");
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut server_write).await });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let n = match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_micros(n as u64 * 1_000_000 / rate)).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reading_a_slow_link_keeps_its_connection() {
    // A reader that keeps reading is not cut, however slowly its answer moves, as long as it
    // frees HTTP/2 window within the stall timeout (here 128 KiB at a time, every 0.33 s at
    // 384 KiB/s; README, "Transport limits").
    let mut v = spawn_vault().await;
    v.stop().await;
    v.tweak = Some(|s| s.answer_stall_timeout = Duration::from_millis(1000));
    v.start().await.expect("restart");
    let mut recruiter = v.client("recruiter").await;
    let doc = document(3 * 1024 * 1024);
    let id = create_with(
        &mut recruiter,
        "recruitment",
        &[("cv_document", blob(&doc, "application/pdf"))],
    )
    .await;
    let proxy = slow_link(v.addr, 384 * 1024).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
        .expect("uri")
        .initial_stream_window_size(256 * 1024)
        .initial_connection_window_size(256 * 1024)
        .connect()
        .await
        .expect("connect");
    let token = format!("Bearer {}", v.tokens["recruiter"]);
    let mut client =
        RecordsClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", token.parse().expect("ascii"));
            Ok(request)
        })
        .max_decoding_message_size(16 << 20);
    let started = std::time::Instant::now();
    let got = client
        .get_record(GetRecordRequest {
            record_id: id,
            purpose: "recruitment".into(),
            field_names: vec!["cv_document".into()],
        })
        .await
        .expect("read whole over the slow link")
        .into_inner();
    assert!(got.fields["cv_document"].kind == Some(kluis::proto::field_value::Kind::Blob(doc)));
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "the link was slow: several stall timeouts long"
    );
}

/// A CreateRecord whose message declares `declared` bytes and sends `sent` of them, then
/// stalls for good (the body stays open), as `token`'s caller on `channel`.
async fn stalled_create(
    channel: &mut tonic::transport::Channel,
    addr: std::net::SocketAddr,
    token: &str,
    declared: u32,
    sent: usize,
) -> Result<http::Response<tonic::body::Body>, tonic::transport::Error> {
    let mut first = vec![0u8];
    first.extend_from_slice(&declared.to_be_bytes());
    let mut chunks = vec![Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(
        first,
    )))];
    for _ in 0..sent / (256 * 1024) {
        chunks.push(Ok(http_body::Frame::data(Bytes::from(vec![
            0u8;
            256 * 1024
        ]))));
    }
    let frames = futures::stream::iter(chunks).chain(futures::stream::pending());
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/kluis.v1.Records/CreateRecord"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", token)
        .body(tonic::body::Body::new(http_body_util::StreamBody::new(
            frames,
        )))
        .expect("request");
    channel.ready().await?.call(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_holds_at_most_half_the_request_body_budget() {
    // Review 31: any token holder (here the auditor, who may not even create records) filled
    // the shared budget of request bytes in flight with bodies it never finished, and every
    // other call was refused RESOURCE_EXHAUSTED, health checks included.
    let mut v = spawn_vault().await;
    v.stop().await;
    // Request bodies may hold max(4 x 16 MiB, 64 MiB) = 64 MiB; a caller, 32 MiB.
    v.tweak = Some(|s| s.max_request_bytes = 16 * 1024 * 1024);
    v.start().await.expect("restart");
    let token = format!("Bearer {}", v.tokens["auditor"]);
    // Six bodies of 12 MiB each, stalled: 72 MiB, more than the whole budget.
    let mut calls = futures::stream::FuturesUnordered::new();
    for _ in 0..6 {
        let mut channel = v.channel().await;
        let token = token.clone();
        let addr = v.addr;
        calls.push(async move {
            stalled_create(
                &mut channel,
                addr,
                &token,
                15 * 1024 * 1024,
                12 * 1024 * 1024,
            )
            .await
        });
    }
    // Two whole bodies fit in the auditor's half (32 MiB), a third does not: each body whose
    // next bytes do not fit is refused (and gives back what it held), so four calls are
    // refused, each naming the caller's share, and two stay open holding 24 MiB.
    for _ in 0..4 {
        let response = tokio::time::timeout(Duration::from_secs(60), calls.next())
            .await
            .expect("a refusal while the bodies stall")
            .expect("a call")
            .expect("a response");
        let status =
            tonic::Status::from_header_map(response.headers()).expect("a trailers-only refusal");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("this caller's calls"),
            "{status:?}"
        );
    }
    // Meanwhile the other callers are served: a write, and a health check without credentials.
    let mut recruiter = v.client("recruiter").await;
    let doc = document(4 * 1024 * 1024);
    create_with(
        &mut recruiter,
        "recruitment",
        &[
            ("full_name", text("Anna de Vries")),
            ("cv_document", blob(&doc, "application/pdf")),
        ],
    )
    .await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(v.channel().await);
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers")
        .into_inner();
    assert_eq!(
        answer.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // The stalled calls are still open (none answered): their bodies hold the bytes.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), calls.next())
            .await
            .is_err(),
        "the stalled calls stay open"
    );
    drop(calls);
}

//! `spawn_vault()`: the real server on port 0 with a temp data dir, and typed clients per role.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use kluis::crypto::SecretKey;
use kluis::keys::MasterKey;
use kluis::policy::{self, Policy, DEFAULT_ROLES};
use kluis::proto::records_client::RecordsClient;
use kluis::proto::{field_value::Kind, FieldValue};
use kluis::server::Running;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// An interceptor sending `token` as a bearer token.
pub fn bearer(token: &str) -> Bearer {
    Bearer(Some(
        format!("Bearer {token}").parse().expect("ascii token"),
    ))
}

pub type Client = RecordsClient<InterceptedService<Channel, Bearer>>;

/// A running vault for one test.
pub struct TestVault {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub tokens: BTreeMap<String, String>,
    master_hex: String,
    running: Option<Running>,
    /// Changes applied to the settings of every start (e.g. a key schedule).
    pub tweak: Option<fn(&mut kluis::config::Settings)>,
}

pub fn data_dir(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("data")
}

fn policy_with(tokens: &BTreeMap<String, String>) -> Policy {
    let mut policy = Policy::default_policy();
    for (role, token) in tokens {
        policy
            .add_token_hash(&format!("test-{role}"), role, policy::token_hash(token))
            .expect("default role");
    }
    policy
}

/// Starts a vault with one token per default role.
pub async fn spawn_vault() -> TestVault {
    spawn_vault_tweaked(None).await
}

/// [`spawn_vault`] with `tweak` applied to the settings of its first start and of every
/// restart (see [`TestVault::tweak`]).
pub async fn spawn_vault_with(tweak: fn(&mut kluis::config::Settings)) -> TestVault {
    spawn_vault_tweaked(Some(tweak)).await
}

async fn spawn_vault_tweaked(tweak: Option<fn(&mut kluis::config::Settings)>) -> TestVault {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens: BTreeMap<String, String> = DEFAULT_ROLES
        .iter()
        .map(|r| {
            (
                r.to_string(),
                policy::generate_token().expect("rng").to_string(),
            )
        })
        .collect();
    let master = SecretKey::generate().expect("rng");
    let master_hex = master.to_hex().to_string();
    let mut vault = TestVault {
        dir,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        tokens,
        master_hex,
        running: None,
        tweak,
    };
    vault.start().await.expect("vault starts");
    vault
}

impl TestVault {
    /// The events matching `query` (one page of up to 1000), as the `auditor` reads them.
    pub async fn audit_events(
        &self,
        query: kluis::proto::QueryEventsRequest,
    ) -> Vec<kluis::proto::AuditEvent> {
        kluis::proto::audit_client::AuditClient::with_interceptor(
            self.channel().await,
            bearer(&self.tokens["auditor"]),
        )
        .query_events(kluis::proto::QueryEventsRequest {
            page_size: 1000,
            ..query
        })
        .await
        .expect("query")
        .into_inner()
        .events
    }

    /// The events of unauthenticated calls (no principal) after sequence number `after`, once
    /// at least `want` of them are in the trail (they are written in the background, after
    /// the refusal is answered); what is there after 10 s otherwise.
    pub async fn refusals_after(&self, after: u64, want: usize) -> Vec<kluis::proto::AuditEvent> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let found: Vec<_> = self
                .audit_events(kluis::proto::QueryEventsRequest::default())
                .await
                .into_iter()
                .filter(|e| e.seq > after && e.principal.is_empty())
                .collect();
            if found.len() >= want || tokio::time::Instant::now() >= deadline {
                return found;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    fn settings(&self, master_hex: &str) -> kluis::config::Settings {
        let master = MasterKey::from_secret(SecretKey::from_hex(master_hex).expect("hex"));
        let mut settings =
            kluis::config::ephemeral(&data_dir(&self.dir), master, policy_with(&self.tokens));
        if let Some(tweak) = self.tweak {
            tweak(&mut settings);
        }
        settings
    }

    /// The master key, as 64 hex digits.
    pub fn master_hex(&self) -> &str {
        &self.master_hex
    }

    /// The running server's vault (for looking at stored bytes; panics when stopped).
    pub fn vault(&self) -> &std::sync::Arc<kluis::Vault<kluis::store::SledStore>> {
        &self.running.as_ref().expect("the server is running").vault
    }

    /// Starts (or restarts) the server on the same data dir.
    pub async fn start(&mut self) -> Result<(), kluis::server::ServerError> {
        let running = kluis::server::start(self.settings(&self.master_hex.clone())).await?;
        self.addr = running.local_addr;
        self.running = Some(running);
        Ok(())
    }

    /// Tries to start with another master key.
    pub async fn start_with_master(
        &self,
        master_hex: &str,
    ) -> Result<Running, kluis::server::ServerError> {
        kluis::server::start(self.settings(master_hex)).await
    }

    /// Stops the server gracefully (data dir kept).
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("clean shutdown");
        }
    }

    /// Stops the server gracefully (data dir kept), returning how it ended: an unclean end
    /// (the store refusing writes, the last checkpoint not signed) is an error.
    pub async fn stop_result(&mut self) -> Result<(), kluis::server::ServerError> {
        match self.running.take() {
            Some(r) => r.shutdown().await,
            None => Ok(()),
        }
    }

    /// Stops the server with a grace period of `grace` for calls still in flight.
    pub async fn stop_within(&mut self, grace: std::time::Duration) {
        if let Some(r) = self.running.take() {
            r.shutdown_within(grace).await.expect("clean shutdown");
        }
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await.expect("restart");
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    /// A client authenticated as `role` (one of the default roles).
    pub async fn client(&self, role: &str) -> Client {
        let token = &self.tokens[role];
        self.client_with_token(Some(&format!("Bearer {token}")))
            .await
    }

    /// A client sending exactly this authorization value (or none).
    pub async fn client_with_token(&self, authorization: Option<&str>) -> Client {
        let value = authorization.map(|a| a.parse().expect("ascii"));
        RecordsClient::with_interceptor(self.channel().await, Bearer(value))
            .max_decoding_message_size(96 * 1024 * 1024)
            .max_encoding_message_size(96 * 1024 * 1024)
    }
}

/// `len` bytes that look random (and compress poorly), the same for the same `len`.
pub fn document(len: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

pub fn text(v: &str) -> FieldValue {
    FieldValue {
        kind: Some(Kind::Text(v.to_string())),
        content_type: String::new(),
    }
}

pub fn blob(bytes: &[u8], content_type: &str) -> FieldValue {
    FieldValue {
        kind: Some(Kind::Blob(bytes.to_vec())),
        content_type: content_type.to_string(),
    }
}

pub fn fields(pairs: &[(&str, FieldValue)]) -> HashMap<String, FieldValue> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

pub fn text_of(v: &FieldValue) -> &str {
    match &v.kind {
        Some(Kind::Text(t)) => t,
        _ => panic!("expected a text value"),
    }
}

/// Asserts a status code and that the message mentions every `needle`.
#[track_caller]
pub fn assert_status<T>(result: Result<T, Status>, code: Code, needles: &[&str]) {
    match result {
        Ok(_) => panic!("expected {code:?}, got OK"),
        Err(s) => {
            assert_eq!(s.code(), code, "message: {}", s.message());
            for n in needles {
                assert!(
                    s.message().contains(n),
                    "{:?} does not mention {n:?}",
                    s.message()
                );
            }
        }
    }
}

/// A valid value for a field of the default schema.
pub fn sample_value(field: &str) -> FieldValue {
    match field {
        "email" => text("jan.jansen@example.nl"),
        "phone" => text("+31 6 1234 5678"),
        "postcode" => text("3311 KG"),
        "date_of_birth" | "id_document_expiry" => text("1990-04-01"),
        "bsn" => text("111222333"),
        "iban" => text("NL91ABNA0417164300"),
        "wage" => text("3125.50"),
        "payroll_tax_credit" => text("true"),
        "id_document_type" => text("passport"),
        "absence_periods" => text("2026-01-05/2026-01-09"),
        "photo" => blob(b"\x89PNG fake image", "image/png"),
        "intro_video" => blob(b"fake mp4", "video/mp4"),
        "cv_document" => blob(b"%PDF-1.7 fake cv", "application/pdf"),
        "id_scan" => blob(b"%PDF-1.7 fake scan", "application/pdf"),
        _ => text("Sample text"),
    }
}

/// What a run of the `kluis` binary printed and returned.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Both outputs, for assertion messages.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `kluis <args>` now, in `cwd` if given, with no `KLUIS_*` variable but `KLUIS_TOKEN`
/// set to `token` if given.
pub fn run_kluis_now(cwd: Option<&std::path::Path>, args: &[String], token: Option<&str>) -> Run {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kluis"));
    cmd.args(args)
        .env_remove("KLUIS_TOKEN")
        .env_remove("KLUIS_LOG")
        .env_remove("KLUIS_MASTER_KEY")
        .stdin(std::process::Stdio::null());
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    if let Some(t) = token {
        cmd.env("KLUIS_TOKEN", t);
    }
    let out = cmd.output().expect("run kluis");
    Run {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

/// [`run_kluis_now`] off the async runtime, so that an in-process server keeps serving.
pub async fn run_kluis(
    cwd: Option<&std::path::Path>,
    args: &[impl AsRef<str>],
    token: Option<&str>,
) -> Run {
    let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
    let token = token.map(str::to_string);
    let cwd = cwd.map(std::path::Path::to_path_buf);
    tokio::task::spawn_blocking(move || run_kluis_now(cwd.as_deref(), &args, token.as_deref()))
        .await
        .expect("join")
}

/// A path as a command-line argument.
pub fn path_arg(p: &std::path::Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// Creates a record with `pairs` under `purpose` and returns its id.
pub async fn create_with(
    client: &mut Client,
    purpose: &str,
    pairs: &[(&str, FieldValue)],
) -> String {
    client
        .create_record(kluis::proto::CreateRecordRequest {
            purpose: purpose.into(),
            fields: fields(pairs),
        })
        .await
        .expect("create")
        .into_inner()
        .record_id
}

/// Flips one byte under the MAC of record `id`'s stored header (the server must be stopped):
/// what damage on disk looks like; reading the record then answers DATA_LOSS.
pub async fn damage_header(v: &TestVault, id: &str) {
    damage_header_in(&data_dir(&v.dir), id).await;
}

/// [`damage_header`] in the data directory `data`.
pub async fn damage_header_in(data: &std::path::Path, id: &str) {
    use kluis::store::{Batch, Keyspace, SledStore, Store};
    let store = SledStore::open(data).expect("open store");
    let key = uuid::Uuid::parse_str(id).expect("uuid");
    let mut raw = store
        .get(Keyspace::Records, key.as_bytes())
        .await
        .expect("get")
        .expect("header");
    raw[10] ^= 0x01;
    let mut batch = Batch::default();
    batch.put(Keyspace::Records, key.as_bytes().to_vec(), raw);
    store.commit(batch).await.expect("damage");
}

/// A local TCP server that answers every connection with an HTTP/1.1 error and closes it:
/// something that listens, but no gRPC server. Runs until the test process ends.
pub fn not_grpc_server() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    addr
}

/// What a raw gRPC call ([`raw_call`]) was answered: its status code, message and request id.
#[derive(Debug)]
pub struct RawAnswer {
    pub code: Code,
    pub message: String,
    pub request_id: Option<String>,
    /// The HTTP status of the answer.
    pub http_status: u16,
    /// The `grpc-accept-encoding` the answer names, if any.
    pub accept_encoding: Option<String>,
}

/// Calls `path` (e.g. `/kluis.v1.Records/GetRecord`) on the server at `addr` with `body` as
/// the request message, sent as is (one gRPC frame, any bytes: a message that does not decode),
/// with `authorization` and `x-request-id` metadata if given.
pub async fn raw_call(
    addr: &str,
    path: &str,
    authorization: Option<&str>,
    request_id: Option<&str>,
    body: &[u8],
) -> RawAnswer {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(body);
    let headers: Vec<(&str, &str)> = [
        ("authorization", authorization),
        ("x-request-id", request_id),
    ]
    .into_iter()
    .filter_map(|(name, value)| value.map(|v| (name, v)))
    .collect();
    raw_frames(addr, path, &headers, frame).await
}

/// A gRPC POST of `path` to the server at `addr` with `frames` as its whole body (gRPC framing
/// included) and `headers` beside the gRPC ones (a `content-type` among them replaces
/// `application/grpc`; an empty one sends none).
pub fn grpc_post(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    frames: Vec<u8>,
) -> http::Request<tonic::body::Body> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("te", "trailers");
    let content_type = headers
        .iter()
        .find(|(name, _)| *name == "content-type")
        .map_or("application/grpc", |(_, value)| *value);
    if !content_type.is_empty() {
        request = request.header("content-type", content_type);
    }
    for (name, value) in headers.iter().filter(|(name, _)| *name != "content-type") {
        request = request.header(*name, *value);
    }
    request
        .body(tonic::body::Body::new(http_body_util::Full::new(
            tonic::codegen::Bytes::from(frames),
        )))
        .expect("request")
}

/// Calls `path` on the server at `addr` with `frames` as the whole request body (gRPC framing
/// included, sent as is: none, cut short, flagged compressed, …) and `headers` beside the
/// gRPC ones.
pub async fn raw_frames(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    frames: Vec<u8>,
) -> RawAnswer {
    use http_body_util::BodyExt;
    use tower::{Service, ServiceExt};
    let request = grpc_post(addr, path, headers, frames);
    let mut channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let response = channel
        .ready()
        .await
        .expect("ready")
        .call(request)
        .await
        .expect("a response");
    let (parts, body) = response.into_parts();
    let http_status = parts.status.as_u16();
    // A refusal is trailers-only (the status in the headers); an answer ends with trailers.
    let mut headers = parts.headers;
    if !headers.contains_key("grpc-status") {
        let collected = body.collect().await.expect("body");
        if let Some(trailers) = collected.trailers() {
            headers.extend(trailers.clone());
        }
    }
    let status = Status::from_header_map(&headers).expect("a grpc-status");
    RawAnswer {
        code: status.code(),
        message: status.message().to_string(),
        request_id: headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        http_status,
        accept_encoding: headers
            .get("grpc-accept-encoding")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    }
}

/// Copies the directory tree `from` to `to` (files and their modes, directories and theirs),
/// as a backup would.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
            let mode = std::fs::metadata(entry.path()).expect("meta").permissions();
            std::fs::set_permissions(&target, mode).expect("chmod");
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

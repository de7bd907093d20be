//! `kluis audit …`: tools over the audit trail ([`crate::audit`]).
//!
//! - `verify`: checks the whole chain offline, with the server stopped (what the
//!   `kluis.v1.Audit/VerifyChain` RPC does for a running server).
//! - `export`: events as JSON lines, read from the data directory or asked of a running
//!   server (`kluis.v1.Audit/QueryEvents`, bearer token in `$KLUIS_TOKEN`).
//! - `breach-report`: which records and which fields one principal touched in a time window,
//!   the input to a 72-hour breach notification.
//!
//! `export` and `breach-report` read through one [`EventSource`]: the store or the server.
//! Events hold names, never values, so nothing here can print a field value.
//!
//! Exit codes: 0 ok; [`EXIT_FAILED`] when the chain does not verify or the server refuses a
//! call; [`EXIT_USAGE`] for usage, configuration and IO errors.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde::{Serialize, Serializer};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use zeroize::Zeroizing;

use crate::audit::{self, Filter};
use crate::proto;
use crate::proto::audit_client::AuditClient;
use crate::store::{SledStore, StoreError};

/// Exit code: the chain does not verify, or the server refused the request.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: usage, configuration or IO error.
pub const EXIT_USAGE: u8 = 2;

/// The exit codes, for `--help`.
pub const EXIT_CODES: &str = "Exit codes:\n  0  ok\n  1  the audit chain does not verify, or the server refused the request (its gRPC status is printed)\n  2  usage, configuration, IO or connection error (also: the data directory is in use by a\n     running server, or no gRPC answer came back)";

/// The environment variable holding the bearer token for `--server`.
pub const TOKEN_ENV: &str = "KLUIS_TOKEN";

/// Events asked for per page, offline and online (the server's largest page).
const PAGE_SIZE: u32 = crate::service::audit_service::MAX_PAGE_SIZE;

/// Largest gRPC response accepted (a page of 1000 events with long field lists).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Where `--server` points when neither it nor `--data-dir` is given.
pub fn default_server() -> String {
    format!("http://{}", crate::config::DEFAULT_LISTEN)
}

// ---------------------------------------------------------------------------------------
// Arguments

/// `kluis audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verifies the whole audit chain offline (server stopped).
    ///
    /// Checks every event's hash and link, the stored head, every signed checkpoint and that
    /// recent events are covered by one. Prints `ok: …` or `FAILED: first bad event …`. For a
    /// running server use the kluis.v1.Audit/VerifyChain RPC instead.
    #[command(after_help = EXIT_CODES)]
    Verify(VerifyArgs),
    /// Prints audit events as JSON lines.
    ///
    /// One event per line, in sequence order: seq, time (RFC 3339 UTC), principal, role,
    /// purpose, action, record_id, field_names, outcome, hash (hex), masked_field_names (of
    /// field_names, those returned masked). Names only, never values.
    #[command(after_help = EXIT_CODES)]
    Export(ExportArgs),
    /// Which records and fields one principal touched in a window.
    ///
    /// The input to a breach notification: per record the fields touched (fields disclosed
    /// only masked, e.g. a BSN's last digits, apart), the actions, the number of events,
    /// first and last time and the outcomes, over [--since, --until).
    /// Events that named no record (searches, listings) are counted in the header.
    #[command(after_help = EXIT_CODES)]
    BreachReport(BreachReportArgs),
}

/// `kluis audit verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The data directory (the server must be stopped).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The checkpoint signing public key (64 hex digits) [default: <parent of DIR>/keys/audit-signing.pub].
    #[arg(long, value_name = "FILE")]
    pub public_key: Option<PathBuf>,
    /// The server's `checkpoint_every` setting: at most 2×N+8192 events may follow the newest
    /// signed checkpoint.
    #[arg(
        long,
        value_name = "N",
        default_value_t = crate::config::DEFAULT_CHECKPOINT_EVERY,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub checkpoint_every: u64,
    /// The audit anchor file the server keeps outside the store (its newest checkpoint)
    /// [default: `audit-anchor.<store id>` beside the public key, if present].
    #[arg(long, value_name = "FILE", conflicts_with = "no_anchor")]
    pub anchor: Option<PathBuf>,
    /// Check no anchor file (e.g. an older backup of the data directory, whose chain ends
    /// before the live anchor): only the store's own checkpoints vouch for the chain.
    #[arg(long)]
    pub no_anchor: bool,
}

/// Where `export` and `breach-report` read events.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Read this data directory directly (the server must be stopped).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["server", "ca_cert", "client_cert", "client_key"])]
    pub data_dir: Option<PathBuf>,
    /// Ask this running server (kluis.v1.Audit/QueryEvents), sending $KLUIS_TOKEN as the bearer
    /// token (a role with the audit `query` right, e.g. auditor). Used when --data-dir is not
    /// given [default: http://127.0.0.1:50051].
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// TLS towards an https:// --server.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS towards an https:// `--server`.
#[derive(Debug, Default, Args)]
pub struct TlsArgs {
    /// CA certificate (PEM) that signed the server's certificate, for an https:// --server.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) to present, for a server that requires one
    /// (`[tls] require_client_cert`); with --client-key. The bearer token still says who
    /// calls.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM, readable by its owner only).
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

/// `kluis audit export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Where to read the events.
    #[command(flatten)]
    pub source: SourceArgs,
    /// Only the events of this record (its id, a UUID).
    #[arg(long, value_name = "ID", value_parser = parse_record_id)]
    pub record: Option<String>,
    /// Only the events of this principal (its name in the policy).
    #[arg(long, value_name = "P", value_parser = parse_principal)]
    pub principal: Option<String>,
    /// Only events at or after T: RFC 3339 (2026-11-25T10:00:00Z) or a date (2026-11-25,
    /// midnight UTC).
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub since: Option<i64>,
    /// Only events before T (same forms as --since).
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub until: Option<i64>,
}

/// `kluis audit breach-report`.
#[derive(Debug, Args)]
pub struct BreachReportArgs {
    /// Where to read the events.
    #[command(flatten)]
    pub source: SourceArgs,
    /// The principal (its name in the policy) whose accesses to report.
    #[arg(long, value_name = "P", value_parser = parse_principal)]
    pub principal: String,
    /// Start of the window, inclusive: RFC 3339 (2026-11-25T10:00:00Z) or a date (2026-11-25,
    /// midnight UTC).
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub since: i64,
    /// End of the window, exclusive (same forms as --since).
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub until: i64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Output format of `breach-report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// An aligned text table.
    Table,
    /// One JSON document.
    Json,
}

/// A principal name as the policy writes it: not empty, no surrounding blanks (a name that
/// matches no event would make an empty report look clean).
fn parse_principal(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if s.trim() != s {
        return Err("must not start or end with blanks (principal names are exact)".into());
    }
    // The server's rule for a principal filter, said here too (review 30: offline such a
    // name gave an empty report, exit 0; online "the server refused", exit 1).
    if !crate::service::audit_service::principal_shaped(s) {
        return Err(format!(
            "a principal is 1 to {} printable ASCII characters (no principal has another shape)",
            crate::service::audit_service::MAX_PRINCIPAL_FILTER
        ));
    }
    Ok(s.to_string())
}

/// Parses a time argument: RFC 3339 with any offset, or a date `YYYY-MM-DD` (midnight UTC).
/// Returns Unix milliseconds.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0) {
            return Ok(t.and_utc().timestamp_millis());
        }
    }
    Err(
        "not a time: use RFC 3339 (2026-11-25T10:00:00Z) or a date (2026-11-25, midnight UTC)"
            .into(),
    )
}

/// Parses a record id argument into the form events hold (lower-case, hyphenated UUID).
pub fn parse_record_id(text: &str) -> Result<String, String> {
    uuid::Uuid::parse_str(text.trim())
        .map(|u| u.to_string())
        .map_err(|_| "not a record id (a UUID such as 3f2c9a4e-…)".into())
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds, e.g. `2026-11-25T10:00:00.000Z`.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || format!("{ms}ms"),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}

fn ser_time<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339_ms(*ms))
}

// ---------------------------------------------------------------------------------------
// Errors

/// Why an audit command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or environment.
    #[error("{0}")]
    Usage(String),
    /// A file, the store or the connection failed.
    #[error("{0}")]
    Io(String),
    /// The server answered with an error status.
    #[error("the server refused {method}: {}: {}", code_name(status.code()), status.message())]
    Refused {
        /// The RPC.
        method: &'static str,
        /// Its status.
        status: tonic::Status,
    },
    /// A job's progress stream ended before the job finished (the job goes on in the server).
    #[error("the {method} progress stream ended early, before the job finished ({reason}); the job goes on from its last checkpoint in the server (after a restart, once it runs again): `kluis keys status` shows whether it has finished; while it runs, run this command again to follow it (a rekey run again after its job finished starts a new one)")]
    EndedEarly {
        /// The RPC whose stream ended.
        method: &'static str,
        /// Why, as far as the client knows.
        reason: String,
    },
    /// The chain does not verify (the details were printed).
    #[error("the audit chain does not verify")]
    VerificationFailed,
    /// An audit anchor file does not verify (turned into [`CliError::VerificationFailed`]
    /// once its `FAILED:` line is printed).
    #[error("{0}")]
    AnchorInvalid(String),
    /// The command did its work, but found damage (the details were printed).
    #[error("{0}")]
    Damaged(String),
    /// Standard output was closed (e.g. piped into `head`): not an error, [`run`] ends quietly.
    #[error("standard output closed")]
    OutputClosed,
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Io(_) => EXIT_USAGE,
            CliError::Refused { .. }
            | CliError::EndedEarly { .. }
            | CliError::VerificationFailed
            | CliError::AnchorInvalid(_)
            | CliError::Damaged(_) => EXIT_FAILED,
            CliError::OutputClosed => 0,
        }
    }

    /// The error of a failed call of `method`: [`CliError::Refused`] when a server answered
    /// with a gRPC status, [`CliError::Io`] (a connection error) when the status was made by
    /// the client itself because no gRPC answer came (see [`made_by_the_client`]).
    pub fn from_status(method: &'static str, status: tonic::Status) -> CliError {
        if made_by_the_client(&status) {
            let mut text = format!(
                "connection error in {method}: no gRPC answer from the server: {}: {}",
                code_name(status.code()),
                status.message()
            );
            if let Some(source) = std::error::Error::source(&status) {
                let detail = with_sources(source);
                if detail != status.message() {
                    text.push_str(&format!(" ({detail})"));
                }
            }
            // Review 24: the server's TLS refused the connection for want of a certificate.
            if text.contains("CertificateRequired") {
                text.push_str(
                    "; the server requires a client certificate: pass --client-cert FILE and --client-key FILE",
                );
            }
            CliError::Io(text)
        } else {
            CliError::Refused { method, status }
        }
    }

    /// For `map_err`: [`CliError::from_status`] of `method`.
    pub fn status_of(method: &'static str) -> impl FnOnce(tonic::Status) -> CliError {
        move |status| CliError::from_status(method, status)
    }
}

/// Whether tonic made `status` on the client side rather than reading it from a server's
/// `grpc-status`: a transport or protocol error (it carries the underlying error as its
/// source; a status read from a server's headers never does), or an HTTP answer without a
/// `grpc-status` (not a gRPC server, or a proxy that cut the stream).
pub fn made_by_the_client(status: &tonic::Status) -> bool {
    let message = status.message();
    std::error::Error::source(status).is_some()
        || message.starts_with("grpc-status header missing")
        || message.starts_with("protocol error: missing grpc-status")
}

pub(crate) fn output_error(e: std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CliError::OutputClosed
    } else {
        CliError::Io(format!("writing the output: {e}"))
    }
}

fn store_error(e: StoreError) -> CliError {
    CliError::Io(format!("reading the audit trail: {e}"))
}

/// The canonical name of a gRPC status code, e.g. `PERMISSION_DENIED`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error and its sources, `: `-separated (tonic's transport errors say little on top).
pub(crate) fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    let mut last = text.clone();
    while let Some(s) = source {
        let part = s.to_string();
        // hyper and tonic repeat a message at several levels.
        if part != last {
            text.push_str(": ");
            text.push_str(&part);
        }
        last = part;
        source = s.source();
    }
    text
}

/// `1 event`, `2 events`.
pub(crate) fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

// ---------------------------------------------------------------------------------------
// Events and where they come from

/// One audit event, from the store or from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    /// Sequence number.
    pub seq: u64,
    /// Unix milliseconds.
    pub time_ms: i64,
    /// Who called (empty when authentication failed).
    pub principal: String,
    /// Their role.
    pub role: String,
    /// The purpose stated.
    pub purpose: String,
    /// The RPC method.
    pub action: String,
    /// The record touched (empty when none).
    pub record_id: String,
    /// Names of the fields touched.
    pub field_names: Vec<String>,
    /// `ok`, `denied`, `invalid` or `error`.
    pub outcome: String,
    /// The chain hash.
    pub hash: Vec<u8>,
    /// Of `field_names`, those returned masked.
    pub masked_field_names: Vec<String>,
}

impl From<audit::Event> for AuditRow {
    /// Through the same proto form the server sends, so offline and online rows agree.
    fn from(e: audit::Event) -> AuditRow {
        crate::service::audit_service::event_to_proto(e).into()
    }
}

impl From<proto::AuditEvent> for AuditRow {
    fn from(e: proto::AuditEvent) -> AuditRow {
        let time_ms = e.time.map_or(0, |t| {
            t.seconds
                .saturating_mul(1000)
                .saturating_add(i64::from(t.nanos) / 1_000_000)
        });
        AuditRow {
            seq: e.seq,
            time_ms,
            principal: e.principal,
            role: e.role,
            purpose: e.purpose,
            action: e.action,
            record_id: e.record_id,
            field_names: e.field_names,
            outcome: e.outcome,
            hash: e.hash,
            masked_field_names: e.masked_field_names,
        }
    }
}

/// The JSON form of an event, one line of `export`.
#[derive(Serialize)]
struct JsonEvent<'a> {
    seq: u64,
    time: String,
    principal: &'a str,
    role: &'a str,
    purpose: &'a str,
    action: &'a str,
    record_id: &'a str,
    field_names: &'a [String],
    outcome: &'a str,
    hash: String,
    masked_field_names: &'a [String],
}

impl AuditRow {
    /// Writes the event as one JSON line.
    pub fn write_json_line(&self, out: &mut dyn Write) -> Result<(), CliError> {
        let json = JsonEvent {
            seq: self.seq,
            time: rfc3339_ms(self.time_ms),
            principal: &self.principal,
            role: &self.role,
            purpose: &self.purpose,
            action: &self.action,
            record_id: &self.record_id,
            field_names: &self.field_names,
            outcome: &self.outcome,
            hash: hex::encode(&self.hash),
            masked_field_names: &self.masked_field_names,
        };
        serde_json::to_writer(&mut *out, &json).map_err(|e| match e.io_error_kind() {
            Some(std::io::ErrorKind::BrokenPipe) => CliError::OutputClosed,
            _ => CliError::Io(format!("writing the output: {e}")),
        })?;
        out.write_all(b"\n").map_err(output_error)
    }
}

/// Sends `authorization: Bearer <token>` with every request. No `Debug`: it holds the token.
#[derive(Clone)]
pub struct BearerToken(MetadataValue<Ascii>);

impl BearerToken {
    /// A bearer token.
    pub fn new(token: &str) -> Result<BearerToken, CliError> {
        let header = Zeroizing::new(format!("Bearer {}", token.trim()));
        let mut value: MetadataValue<Ascii> = header.parse().map_err(|_| {
            CliError::Usage(format!(
                "{TOKEN_ENV} is not a valid bearer token (printable ASCII only)"
            ))
        })?;
        value.set_sensitive(true);
        Ok(BearerToken(value))
    }

    /// The token in `$KLUIS_TOKEN`.
    pub fn from_env() -> Result<BearerToken, CliError> {
        let missing = || {
            CliError::Usage(format!(
                "{TOKEN_ENV} is not set: asking a server needs a bearer token of a role with audit rights (e.g. auditor) in {TOKEN_ENV}; or read the data directory with --data-dir while the server is stopped"
            ))
        };
        let token = Zeroizing::new(std::env::var(TOKEN_ENV).map_err(|_| missing())?);
        if token.trim().is_empty() {
            return Err(missing());
        }
        BearerToken::new(&token)
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// The gRPC client of the `Audit` service, authenticated by a bearer token.
pub type Client = AuditClient<InterceptedService<Channel, BearerToken>>;

/// A channel to the server at `url` (http:// or https://; https needs `--ca-cert`, and may
/// present a client certificate).
pub async fn channel(url: &str, tls: &TlsArgs) -> Result<Channel, CliError> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| CliError::Usage(format!("--server {url}: not a URL: {e}")))?
        .connect_timeout(Duration::from_secs(10));
    let client = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        _ => None,
    };
    match (endpoint.uri().scheme_str(), &tls.ca_cert) {
        (Some("https"), Some(path)) => {
            let pem = std::fs::read(path)
                .map_err(|e| CliError::Io(format!("--ca-cert {}: {e}", path.display())))?;
            let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some((cert, key)) = client {
                config = config.identity(client_identity(cert, key)?);
            }
            endpoint = endpoint.tls_config(config).map_err(|e| {
                let why = with_sources(&e);
                match client {
                    Some((cert, key)) if why.contains("KeyMismatch") => CliError::Usage(format!(
                        "--client-key {}: the private key does not belong to --client-cert {}",
                        key.display(),
                        cert.display()
                    )),
                    Some((cert, key)) => CliError::Usage(format!(
                        "--ca-cert {}, --client-cert {} or --client-key {}: {why}",
                        path.display(),
                        cert.display(),
                        key.display()
                    )),
                    None => CliError::Usage(format!("--ca-cert {}: {why}", path.display())),
                }
            })?;
        }
        (Some("https"), None) => {
            return Err(CliError::Usage(format!(
                "--server {url}: https needs --ca-cert FILE (the CA certificate, PEM, that signed the server's certificate)"
            )))
        }
        (Some("http"), ca) if ca.is_some() || client.is_some() => {
            return Err(CliError::Usage(
                "--ca-cert, --client-cert and --client-key apply to an https:// --server only"
                    .into(),
            ))
        }
        (Some("http"), _) => {}
        _ => {
            return Err(CliError::Usage(format!(
                "--server {url}: use http://HOST:PORT or https://HOST:PORT"
            )))
        }
    }
    endpoint
        .connect()
        .await
        .map_err(|e| CliError::Io(format!("cannot connect to {url}: {}", with_sources(&e))))
}

/// The client certificate and key of `--client-cert`/`--client-key`, checked to hold PEM (the
/// key readable by its owner only, as every key file Kluis reads).
fn client_identity(cert: &Path, key: &Path) -> Result<tonic::transport::Identity, CliError> {
    let cert_pem = std::fs::read(cert)
        .map_err(|e| CliError::Io(format!("--client-cert {}: {e}", cert.display())))?;
    if !String::from_utf8_lossy(&cert_pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(CliError::Usage(format!(
            "--client-cert {}: no PEM certificate in it",
            cert.display()
        )));
    }
    match crate::keys::loose_mode(key, crate::keys::SECRET_FORBIDDEN_BITS) {
        Ok(Some(mode)) => {
            return Err(CliError::Usage(format!(
                "--client-key {} is {}",
                key.display(),
                crate::keys::secret_mode_reason(key, mode)
            )))
        }
        Ok(None) => {}
        Err(e) => return Err(CliError::Io(format!("--client-key {}: {e}", key.display()))),
    }
    let key_pem = zeroize::Zeroizing::new(
        std::fs::read(key)
            .map_err(|e| CliError::Io(format!("--client-key {}: {e}", key.display())))?,
    );
    if !String::from_utf8_lossy(&key_pem).contains("PRIVATE KEY-----") {
        return Err(CliError::Usage(format!(
            "--client-key {}: no PEM private key in it",
            key.display()
        )));
    }
    Ok(tonic::transport::Identity::from_pem(
        cert_pem,
        key_pem.as_slice(),
    ))
}

/// Connects to the server at `url` (http:// or https://; https needs `--ca-cert`).
pub async fn connect(url: &str, tls: &TlsArgs, token: BearerToken) -> Result<Client, CliError> {
    let channel = channel(url, tls).await?;
    Ok(AuditClient::with_interceptor(channel, token).max_decoding_message_size(MAX_RESPONSE_BYTES))
}

/// The canonical data directory `dir`, if it holds a Kluis store; never creates one.
fn existing_data_dir(dir: &Path) -> Result<PathBuf, CliError> {
    let canonical = std::fs::canonicalize(dir)
        .map_err(|e| CliError::Usage(format!("--data-dir {}: {e}", dir.display())))?;
    if !canonical.is_dir() || !canonical.join("db").is_file() {
        return Err(CliError::Usage(format!(
            "--data-dir {}: not a Kluis data directory (no database in it)",
            dir.display()
        )));
    }
    Ok(canonical)
}

/// Opens the store in the data directory `dir` (replaying its write-ahead log). `in_use` says
/// what to do instead when a running server holds the directory's lock.
pub fn open_store(dir: &Path, in_use: &str) -> Result<SledStore, CliError> {
    let canonical = existing_data_dir(dir)?;
    SledStore::open(&canonical).map_err(|e| {
        let text = e.to_string();
        if text.contains("in use by another Kluis process") {
            CliError::Usage(format!(
                "the data directory {} is in use by a running server: stop the server first, or {in_use}",
                dir.display()
            ))
        } else {
            CliError::Io(format!("opening the data directory {}: {text}", dir.display()))
        }
    })
}

/// What to do instead of reading a data directory a server holds.
const USE_SERVER: &str = "ask the running server with --server URL (and $KLUIS_TOKEN)";
/// What to do instead of verifying a data directory a server holds.
const USE_VERIFY_CHAIN: &str = "verify the running server's chain with the kluis.v1.Audit/VerifyChain RPC (role auditor or security_officer)";

/// Where `export` and `breach-report` read events: the store, or a running server.
pub enum EventSource {
    /// A data directory opened directly (server stopped).
    Store(SledStore),
    /// A running server's `kluis.v1.Audit/QueryEvents`.
    Server(Client),
}

impl EventSource {
    /// The source `args` name; a server by default.
    pub async fn open(args: &SourceArgs) -> Result<EventSource, CliError> {
        match &args.data_dir {
            Some(dir) => Ok(EventSource::Store(open_store(dir, USE_SERVER)?)),
            None => {
                let url = args.server.clone().unwrap_or_else(default_server);
                let token = BearerToken::from_env()?;
                Ok(EventSource::Server(connect(&url, &args.tls, token).await?))
            }
        }
    }

    /// Calls `each` with every event matching `filter`, in sequence order, page by page;
    /// returns the events of the trail it could not read in order (damaged, missing, out of
    /// sequence), if any: it goes on past them.
    pub async fn for_each(
        &mut self,
        filter: &Filter,
        mut each: impl FnMut(AuditRow) -> Result<(), CliError>,
    ) -> Result<Option<audit::Damage>, CliError> {
        let mut damage: Option<audit::Damage> = None;
        match self {
            EventSource::Store(store) => {
                let mut after = 0;
                loop {
                    let page = audit::query(store, filter, after, PAGE_SIZE as usize)
                        .await
                        .map_err(store_error)?;
                    damage = page.damage.map(|d| d.merge(damage)).or(damage);
                    for event in page.events {
                        each(AuditRow::from(event))?;
                    }
                    match page.next_after {
                        Some(next) if next > after => after = next,
                        _ => return Ok(damage),
                    }
                }
            }
            EventSource::Server(client) => {
                let mut page_token = String::new();
                loop {
                    let request = proto::QueryEventsRequest {
                        record_id: filter.record_id.clone().unwrap_or_default(),
                        principal: filter.principal.clone().unwrap_or_default(),
                        since: filter.since_ms.map(timestamp),
                        until: filter.until_ms.map(timestamp),
                        page_size: PAGE_SIZE,
                        page_token: page_token.clone(),
                    };
                    let page = client
                        .query_events(request)
                        .await
                        .map_err(CliError::status_of("QueryEvents"))?
                        .into_inner();
                    if page.first_damaged_seq != 0 {
                        let found = audit::Damage {
                            first_seq: page.first_damaged_seq,
                            events: page.damaged_events,
                        };
                        damage = Some(found.merge(damage));
                    }
                    for event in page.events {
                        each(AuditRow::from(event))?;
                    }
                    if page.next_page_token.is_empty() {
                        return Ok(damage);
                    }
                    if page.next_page_token == page_token {
                        return Err(CliError::Io(
                            "the server returned the same page token twice".into(),
                        ));
                    }
                    page_token = page.next_page_token;
                }
            }
        }
    }
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn check_window(since: Option<i64>, until: Option<i64>) -> Result<(), CliError> {
    match (since, until) {
        (Some(s), Some(u)) if u <= s => {
            Err(CliError::Usage("--until must be later than --since".into()))
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// Breach report

/// One record in a breach report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordTouch {
    /// The record.
    pub record_id: String,
    /// Names of the fields touched in full by events that succeeded (`ok`: read, written or
    /// erased), sorted.
    pub field_names: Vec<String>,
    /// Names of the fields that events which succeeded disclosed only masked (every one of
    /// them returned the field masked, e.g. a BSN's last digits), sorted. A field also
    /// disclosed in full once is in `field_names` only.
    pub fields_masked: Vec<String>,
    /// Names of the fields only asked for by events that did not succeed (`denied`,
    /// `invalid`, `error`: nothing of them was disclosed or changed), sorted.
    pub fields_attempted: Vec<String>,
    /// The RPC methods, sorted.
    pub actions: Vec<String>,
    /// How many events.
    pub events: u64,
    /// The first event's time.
    #[serde(serialize_with = "ser_time")]
    pub first: i64,
    /// The last event's time.
    #[serde(serialize_with = "ser_time")]
    pub last: i64,
    /// Events per outcome (`ok`, `denied`, `invalid`, `error`).
    pub outcomes: BTreeMap<String, u64>,
}

/// The principal's events that named no record (searches, listings, audit queries).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WithoutRecord {
    /// How many events.
    pub events: u64,
    /// Events per RPC method.
    pub actions: BTreeMap<String, u64>,
    /// Names of the fields that calls which succeeded named (e.g. the field searched), sorted.
    pub field_names: Vec<String>,
    /// Names of the fields only calls that were refused or failed named, sorted.
    pub fields_attempted: Vec<String>,
}

/// Which records and fields one principal touched in a window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BreachReport {
    /// The principal.
    pub principal: String,
    /// Start of the window (inclusive).
    #[serde(serialize_with = "ser_time")]
    pub since: i64,
    /// End of the window (exclusive).
    #[serde(serialize_with = "ser_time")]
    pub until: i64,
    /// Every event of the principal in the window.
    pub total_events: u64,
    /// How many records an event that succeeded touched.
    pub records_touched: u64,
    /// How many records only events that did not succeed named.
    pub records_attempted: u64,
    /// Every field name an event that succeeded disclosed in full (to some record, or
    /// named without a record), sorted.
    pub distinct_fields: Vec<String>,
    /// Every field name events that succeeded disclosed only masked (not in
    /// `distinct_fields`), sorted.
    pub distinct_fields_masked: Vec<String>,
    /// Every field name named only by events that did not succeed (neither disclosed in
    /// full nor masked), sorted.
    pub distinct_fields_attempted: Vec<String>,
    /// The events that named no record.
    pub without_record: WithoutRecord,
    /// The records, in the order the principal first touched them.
    pub records: Vec<RecordTouch>,
}

#[derive(Default)]
struct RecordAcc {
    first_seq: u64,
    /// Disclosed in full by some event.
    fields: BTreeSet<String>,
    /// Disclosed masked by some event (those also in `fields` count as full).
    masked: BTreeSet<String>,
    attempted: BTreeSet<String>,
    actions: BTreeSet<String>,
    events: u64,
    first: i64,
    last: i64,
    outcomes: BTreeMap<String, u64>,
}

/// Builds a [`BreachReport`] one event at a time (events in sequence order). Events of other
/// principals or outside the window are ignored.
pub struct BreachAggregator {
    principal: String,
    since: i64,
    until: i64,
    total: u64,
    records: BTreeMap<String, RecordAcc>,
    without_record: WithoutRecord,
    fields_without_record: BTreeSet<String>,
    attempted_without_record: BTreeSet<String>,
}

impl BreachAggregator {
    /// An empty report of `principal` over [`since`, `until`) (Unix ms).
    pub fn new(principal: &str, since: i64, until: i64) -> BreachAggregator {
        BreachAggregator {
            principal: principal.to_string(),
            since,
            until,
            total: 0,
            records: BTreeMap::new(),
            without_record: WithoutRecord::default(),
            fields_without_record: BTreeSet::new(),
            attempted_without_record: BTreeSet::new(),
        }
    }

    /// Adds one event.
    pub fn add(&mut self, e: &AuditRow) {
        if e.principal != self.principal || e.time_ms < self.since || e.time_ms >= self.until {
            return;
        }
        self.total += 1;
        // An invalid id touched no record.
        if e.record_id.is_empty() || e.record_id == audit::INVALID_RECORD_ID {
            self.without_record.events += 1;
            *self
                .without_record
                .actions
                .entry(e.action.clone())
                .or_default() += 1;
            // A refused search of a field disclosed nothing of it.
            if e.outcome == audit::Outcome::Ok.as_str() {
                self.fields_without_record
                    .extend(e.field_names.iter().cloned());
            } else {
                self.attempted_without_record
                    .extend(e.field_names.iter().cloned());
            }
            return;
        }
        let acc = self
            .records
            .entry(e.record_id.clone())
            .or_insert_with(|| RecordAcc {
                first_seq: e.seq,
                first: e.time_ms,
                last: e.time_ms,
                ..RecordAcc::default()
            });
        acc.events += 1;
        acc.first = acc.first.min(e.time_ms);
        acc.last = acc.last.max(e.time_ms);
        acc.first_seq = acc.first_seq.min(e.seq);
        if e.outcome == audit::Outcome::Ok.as_str() {
            for name in &e.field_names {
                if e.masked_field_names.contains(name) {
                    acc.masked.insert(name.clone());
                } else {
                    acc.fields.insert(name.clone());
                }
            }
        } else {
            acc.attempted.extend(e.field_names.iter().cloned());
        }
        acc.actions.insert(e.action.clone());
        *acc.outcomes.entry(e.outcome.clone()).or_default() += 1;
    }

    /// The report.
    pub fn finish(self) -> BreachReport {
        let mut distinct: BTreeSet<String> = self.fields_without_record.clone();
        let mut masked: BTreeSet<String> = BTreeSet::new();
        let mut attempted = self.attempted_without_record.clone();
        let mut touched = 0;
        let mut records: Vec<(u64, RecordTouch)> = self
            .records
            .into_iter()
            .map(|(record_id, acc)| {
                if acc.outcomes.contains_key(audit::Outcome::Ok.as_str()) {
                    touched += 1;
                }
                let only_masked: BTreeSet<String> =
                    acc.masked.difference(&acc.fields).cloned().collect();
                distinct.extend(acc.fields.iter().cloned());
                masked.extend(only_masked.iter().cloned());
                attempted.extend(acc.attempted.iter().cloned());
                let only_attempted = acc
                    .attempted
                    .iter()
                    .filter(|n| !acc.fields.contains(*n) && !only_masked.contains(*n))
                    .cloned()
                    .collect();
                (
                    acc.first_seq,
                    RecordTouch {
                        record_id,
                        field_names: acc.fields.into_iter().collect(),
                        fields_masked: only_masked.into_iter().collect(),
                        fields_attempted: only_attempted,
                        actions: acc.actions.into_iter().collect(),
                        events: acc.events,
                        first: acc.first,
                        last: acc.last,
                        outcomes: acc.outcomes,
                    },
                )
            })
            .collect();
        records.sort_by_key(|(first_seq, _)| *first_seq);
        let mut without_record = self.without_record;
        without_record.fields_attempted = self
            .attempted_without_record
            .difference(&self.fields_without_record)
            .cloned()
            .collect();
        without_record.field_names = self.fields_without_record.into_iter().collect();
        BreachReport {
            principal: self.principal,
            since: self.since,
            until: self.until,
            total_events: self.total,
            records_touched: touched,
            records_attempted: records.len() as u64 - touched,
            distinct_fields_attempted: attempted
                .iter()
                .filter(|n| !distinct.contains(*n) && !masked.contains(*n))
                .cloned()
                .collect(),
            distinct_fields_masked: masked.difference(&distinct).cloned().collect(),
            distinct_fields: distinct.into_iter().collect(),
            without_record,
            records: records.into_iter().map(|(_, r)| r).collect(),
        }
    }
}

/// The breach report of `principal` over [`since`, `until`) from `events`.
pub fn breach_report<'a>(
    principal: &str,
    since: i64,
    until: i64,
    events: impl IntoIterator<Item = &'a AuditRow>,
) -> BreachReport {
    let mut agg = BreachAggregator::new(principal, since, until);
    for e in events {
        agg.add(e);
    }
    agg.finish()
}

fn counts(map: &BTreeMap<String, u64>, sep: &str) -> String {
    map.iter()
        .map(|(k, n)| format!("{k}{sep}{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fields disclosed in full and those disclosed only masked, as one sorted list in which the
/// latter read `name (masked)`.
fn with_masked(full: &[String], masked: &[String]) -> Vec<String> {
    let mut all: Vec<(&str, bool)> = full
        .iter()
        .map(|n| (n.as_str(), false))
        .chain(masked.iter().map(|n| (n.as_str(), true)))
        .collect();
    all.sort_unstable();
    all.into_iter()
        .map(|(n, m)| {
            if m {
                format!("{n} (masked)")
            } else {
                n.to_string()
            }
        })
        .collect()
}

/// The report as readable text: a header and an aligned table, one row per record.
pub fn render_table(r: &BreachReport) -> String {
    let mut out = String::new();
    let line = |out: &mut String, label: &str, value: String| {
        out.push_str(&format!("{label:<18}{value}\n"));
    };
    line(&mut out, "Principal:", r.principal.clone());
    line(
        &mut out,
        "Window:",
        format!(
            "{} to {} (until exclusive)",
            rfc3339_ms(r.since),
            rfc3339_ms(r.until)
        ),
    );
    line(&mut out, "Events:", r.total_events.to_string());
    line(&mut out, "Records touched:", r.records_touched.to_string());
    line(
        &mut out,
        "Only attempted:",
        format!("{} (every request refused or failed)", r.records_attempted),
    );
    let names = |names: &[String]| {
        if names.is_empty() {
            "0".into()
        } else {
            format!("{} ({})", names.len(), names.join(", "))
        }
    };
    // A field disclosed only masked is listed as `name (masked)`, here and in FIELDS.
    line(
        &mut out,
        "Distinct fields:",
        names(&with_masked(&r.distinct_fields, &r.distinct_fields_masked)),
    );
    line(
        &mut out,
        "Refused fields:",
        names(&r.distinct_fields_attempted),
    );
    let w = &r.without_record;
    let mut without = plural(w.events, "event");
    if w.events > 0 {
        without.push_str(&format!(" ({})", counts(&w.actions, " ")));
    }
    if !w.field_names.is_empty() {
        without.push_str(&format!(", fields named: {}", w.field_names.join(", ")));
    }
    if !w.fields_attempted.is_empty() {
        without.push_str(&format!(
            ", refused fields: {}",
            w.fields_attempted.join(", ")
        ));
    }
    line(&mut out, "Without a record:", without);
    out.push('\n');
    if r.total_events == 0 {
        // Not the same as "touched nothing": a misspelt name also finds no event.
        out.push_str(&format!(
            "No event of principal `{}` in this window. Principal names are exact and case-sensitive: check it against the policy.\n",
            r.principal
        ));
        return out;
    }
    if r.records.is_empty() {
        out.push_str("No record was touched in this window.\n");
        return out;
    }
    let header = [
        "RECORD", "EVENTS", "FIRST", "LAST", "OUTCOMES", "ACTIONS", "FIELDS", "REFUSED",
    ];
    let rows: Vec<[String; 8]> = r
        .records
        .iter()
        .map(|t| {
            [
                t.record_id.clone(),
                t.events.to_string(),
                rfc3339_ms(t.first),
                rfc3339_ms(t.last),
                counts(&t.outcomes, "="),
                t.actions.join(","),
                with_masked(&t.field_names, &t.fields_masked).join(","),
                t.fields_attempted.join(","),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut push_row = |cells: [&str; 8]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let last = i + 1 == cells.len();
            if i > 0 {
                text.push_str("  ");
            }
            if i == 1 {
                text.push_str(&format!("{cell:>width$}", width = widths[i]));
            } else if last {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    push_row(header);
    for row in &rows {
        push_row([
            &row[0], &row[1], &row[2], &row[3], &row[4], &row[5], &row[6], &row[7],
        ]);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Commands

/// Runs an audit command, writing its result to `out` (errors are for the caller to print).
pub async fn run(command: &AuditCommand, out: &mut dyn Write) -> Result<(), CliError> {
    let result = match command {
        AuditCommand::Verify(args) => verify(args, out).await,
        AuditCommand::Export(args) => export(args, out).await,
        AuditCommand::BreachReport(args) => breach(args, out).await,
    };
    let flushed = out.flush().map_err(output_error);
    match result.and(flushed) {
        Err(CliError::OutputClosed) => Ok(()),
        other => other,
    }
}

/// The public key beside the data directory: `<parent of DIR>/keys/audit-signing.pub`.
fn default_public_key(data_dir: &Path) -> Result<PathBuf, CliError> {
    let canonical = existing_data_dir(data_dir)?;
    canonical
        .parent()
        .map(|p| p.join("keys").join(audit::PUBLIC_KEY_FILE))
        .ok_or_else(|| {
            CliError::Usage(format!(
                "--data-dir {} has no parent directory: pass --public-key FILE",
                data_dir.display()
            ))
        })
}

/// `kluis audit verify`.
pub async fn verify(args: &VerifyArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let key_path = match &args.public_key {
        Some(p) => p.clone(),
        None => default_public_key(&args.data_dir)?,
    };
    let public_key = audit::read_public_key(&key_path)
        .map_err(|e| CliError::Io(format!("{e} (pass the key with --public-key FILE)")))?;
    let store = open_store(&args.data_dir, USE_VERIFY_CHAIN)?;
    // The server refuses a store whose recorded checkpoint key is not its key file's; so
    // does this, first: with another key every checkpoint, the id record and the anchor would
    // fail, which reads like tampering (the record was changed, or the key is not this
    // store's: either way the chain is not verified).
    let recorded_key = crate::store::Store::get(
        &store,
        crate::store::Keyspace::Meta,
        audit::META_SIGNING_KEY,
    )
    .await
    .map_err(store_error)?;
    if let Some(recorded) = recorded_key.filter(|r| r.as_slice() != public_key.as_slice()) {
        writeln!(
            out,
            "FAILED: the store records checkpoint key {}, not the key verified with ({}, {}): the key is not this store's (pass --public-key FILE), or the store's record was changed",
            hex::encode(recorded),
            hex::encode(public_key),
            key_path.display()
        )
        .map_err(output_error)?;
        return Err(CliError::VerificationFailed);
    }
    // The store's signed record of its id names the anchor file beside the key (the server
    // checks it against the id its keys give, which this tool, without the master key,
    // cannot; the signature keeps it from being changed with the store alone).
    let recorded = crate::anchor::recorded_store_id(&store, &public_key)
        .await
        .map_err(store_error)?;
    // An anchor that cannot be read is an IO error (exit 2); one that does not verify (its
    // signature, its store, its form) is a failed verification (exit 1, `FAILED:`), as a bad
    // checkpoint in the store is: the anchor is what catches a rewritten trail (review 30).
    let anchor_err = |e: crate::anchor::AnchorError| {
        match e {
        crate::anchor::AnchorError::Io { .. } => CliError::Io(e.to_string()),
        crate::anchor::AnchorError::Invalid { path, reason } => CliError::AnchorInvalid(format!(
            "the audit anchor {path} does not verify: {reason}; it is kept outside the store to catch a rewritten trail: find out who changed it before trusting this store (`--no-anchor` checks the store's own checkpoints only)"
        )),
    }
    };
    let anchor_loaded = |out: &mut dyn Write, e: CliError| -> CliError {
        match e {
            CliError::AnchorInvalid(why) => match writeln!(out, "FAILED: {why}") {
                Ok(()) => CliError::VerificationFailed,
                Err(e) => output_error(e),
            },
            e => e,
        }
    };
    let key_dir = key_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let failed = |out: &mut dyn Write, why: String| -> Result<(), CliError> {
        writeln!(out, "FAILED: {why}").map_err(output_error)?;
        Err(CliError::VerificationFailed)
    };
    let (anchor, anchor_note) = if args.no_anchor {
        (None, "anchor: not checked (--no-anchor)".to_string())
    } else if let Some(path) = &args.anchor {
        let (store_id, cp) = crate::anchor::load_any(path, &public_key)
            .map_err(anchor_err)
            .map_err(|e| anchor_loaded(out, e))?
            .ok_or_else(|| CliError::Usage(format!("--anchor {}: no such file", path.display())))?;
        if let crate::anchor::RecordedId::Signed(recorded) = recorded {
            if recorded != store_id {
                failed(
                    out,
                    format!(
                        "the anchor file {} anchors store {}, but this store's signed id is {}: the file is another store's",
                        path.display(),
                        hex::encode(store_id),
                        hex::encode(recorded)
                    ),
                )?;
            }
        }
        let note = format!("anchor: event {} ({})", cp.seq, path.display());
        (Some(cp), note)
    } else {
        match recorded {
            crate::anchor::RecordedId::Signed(id) => {
                let path = crate::anchor::path(key_dir, &id);
                match crate::anchor::load(&path, &id, &public_key)
                    .map_err(anchor_err)
                    .map_err(|e| anchor_loaded(out, e))?
                {
                    Some(cp) => {
                        let note = format!("anchor: event {} ({})", cp.seq, path.display());
                        (Some(cp), note)
                    }
                    None => (None, no_anchor_note(&path)),
                }
            }
            other => {
                let anchors = crate::anchor::list(key_dir);
                let has_events = audit::Head::load(&store).await.map_err(store_error)?.seq > 0;
                if !anchors.is_empty() && has_events {
                    let what = if other == crate::anchor::RecordedId::Absent {
                        "records no id (`audit/store-id` is missing)"
                    } else {
                        "records an id not signed by this checkpoint key (`audit/store-id` was changed)"
                    };
                    failed(
                        out,
                        format!(
                            "this store {what}, while {} holds audit anchors ({}): with the id gone, no anchor would be checked. Pass --anchor FILE to check the chain against this store's anchor, or --no-anchor for a store that never had one (one no server started on since anchors were introduced)",
                            key_dir.display(),
                            anchors
                                .iter()
                                .map(|p| p.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )?;
                }
                let note = if other == crate::anchor::RecordedId::Absent {
                    "anchor: none (the store records no id: no server with anchors has started on it)"
                } else {
                    "anchor: none (the store's id record is not signed by this checkpoint key, and no anchor is beside it)"
                };
                (None, note.to_string())
            }
        }
    };
    let v = audit::verify(
        &store,
        &public_key,
        anchor.as_ref(),
        audit::max_uncovered(args.checkpoint_every),
        audit::VerifyMode::Offline,
    )
    .await
    .map_err(store_error)?;
    drop(store);
    if v.ok {
        writeln!(
            out,
            "ok: {}, {}, head {}\n{anchor_note}",
            plural(v.events_checked, "event"),
            plural(v.checkpoints_checked, "checkpoint"),
            hex::encode(v.head_hash)
        )
        .map_err(output_error)
    } else {
        writeln!(
            out,
            "FAILED: first bad event {}: {}\n{} and {} checked",
            v.first_bad_seq,
            v.reason,
            plural(v.events_checked, "event"),
            plural(v.checkpoints_checked, "checkpoint")
        )
        .map_err(output_error)?;
        Err(CliError::VerificationFailed)
    }
}

/// What `verify` says when this store's anchor file is absent: other stores' anchor files
/// there may mean this store's recorded id was changed.
fn no_anchor_note(path: &Path) -> String {
    let others = path.parent().map(crate::anchor::list).unwrap_or_default();
    if others.is_empty() {
        format!(
            "anchor: none ({} does not exist: no server has signed a checkpoint of this store with these keys, or the file was moved away)",
            path.display()
        )
    } else {
        format!(
            "anchor: none ({} does not exist; the directory holds other stores' anchors: {})",
            path.display(),
            others
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// `kluis audit export`.
pub async fn export(args: &ExportArgs, out: &mut dyn Write) -> Result<(), CliError> {
    check_window(args.since, args.until)?;
    let filter = Filter {
        record_id: args.record.clone(),
        principal: args.principal.clone(),
        since_ms: args.since,
        until_ms: args.until,
    };
    let mut source = EventSource::open(&args.source).await?;
    let damage = source
        .for_each(&filter, |event| event.write_json_line(out))
        .await?;
    incomplete("export", damage)
}

/// A failure ([`CliError::Damaged`], exit 1) if the trail a command read had `damage`: its
/// output (written already) misses events, and must not pass for whole (review 30).
fn incomplete(what: &str, damage: Option<audit::Damage>) -> Result<(), CliError> {
    match damage {
        None => Ok(()),
        Some(d) => Err(CliError::Damaged(format!(
            "the audit trail is damaged: {} event(s) from sequence number {} on could not be read in order (damaged, missing or out of sequence), so this {what} is incomplete; run `kluis audit verify` (or the VerifyChain RPC) to find the cause, and treat the trail as tampered with until it is explained",
            d.events, d.first_seq
        ))),
    }
}

/// `kluis audit breach-report`.
pub async fn breach(args: &BreachReportArgs, out: &mut dyn Write) -> Result<(), CliError> {
    check_window(Some(args.since), Some(args.until))?;
    let filter = Filter {
        record_id: None,
        principal: Some(args.principal.clone()),
        since_ms: Some(args.since),
        until_ms: Some(args.until),
    };
    let mut source = EventSource::open(&args.source).await?;
    let mut agg = BreachAggregator::new(&args.principal, args.since, args.until);
    let damage = source
        .for_each(&filter, |event| {
            agg.add(&event);
            Ok(())
        })
        .await?;
    let report = agg.finish();
    match args.format {
        Format::Table => out
            .write_all(render_table(&report).as_bytes())
            .map_err(output_error)?,
        Format::Json => {
            let text = serde_json::to_string_pretty(&report)
                .map_err(|e| CliError::Io(format!("encoding the report: {e}")))?;
            writeln!(out, "{text}").map_err(output_error)?
        }
    }
    incomplete("report", damage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_the_client_made_are_connection_errors() {
        // Read from a server's grpc-status: a refusal.
        let refused = CliError::from_status("M", tonic::Status::permission_denied("no"));
        assert_eq!(refused.exit_code(), EXIT_FAILED);
        assert!(
            refused.to_string().contains("PERMISSION_DENIED"),
            "{refused}"
        );
        // A transport error (tonic keeps it as the source), and an HTTP answer without one.
        let transport = tonic::Status::from_error(Box::new(std::io::Error::other("reset")));
        let no_grpc =
            tonic::Status::internal("grpc-status header missing, mapped from HTTP status code 400");
        for status in [transport, no_grpc] {
            let err = CliError::from_status("M", status);
            assert_eq!(err.exit_code(), EXIT_USAGE, "{err}");
            assert!(
                err.to_string().starts_with("connection error in M"),
                "{err}"
            );
        }
        // A server that requires a client certificate: the error says what to pass.
        let alert = tonic::Status::from_error(Box::new(std::io::Error::other(
            "received fatal alert: CertificateRequired",
        )));
        let err = CliError::from_status("M", alert).to_string();
        assert!(
            err.ends_with("pass --client-cert FILE and --client-key FILE"),
            "{err}"
        );
    }

    const R1: &str = "0b5e6f0e-3d4c-4d7e-9a77-1f2e3d4c5b6a";
    const R2: &str = "1c6f7a1f-4e5d-4e8f-8b88-2a3f4e5d6c7b";

    fn row(seq: u64, time_ms: i64, principal: &str, action: &str, record: &str) -> AuditRow {
        AuditRow {
            seq,
            time_ms,
            principal: principal.into(),
            role: "recruiter".into(),
            purpose: "recruitment".into(),
            action: action.into(),
            record_id: record.into(),
            field_names: Vec::new(),
            outcome: "ok".into(),
            hash: vec![seq as u8; 32],
            masked_field_names: Vec::new(),
        }
    }

    fn with(mut r: AuditRow, fields: &[&str], outcome: &str) -> AuditRow {
        r.field_names = fields.iter().map(|f| f.to_string()).collect();
        r.outcome = outcome.into();
        r
    }

    #[test]
    fn a_principal_without_events_is_told_apart_from_one_that_touched_nothing() {
        assert!(parse_principal("dev-recruiter ").is_err());
        assert!(parse_principal(" ").is_err());
        assert_eq!(
            parse_principal("dev-recruiter").as_deref(),
            Ok("dev-recruiter")
        );
        assert_eq!(
            parse_principal("cli:ops (SUDO_USER=jan)").as_deref(),
            Ok("cli:ops (SUDO_USER=jan)")
        );
        for bad in ["dév", "a\tb", &"x".repeat(161)] {
            let err = parse_principal(bad).expect_err("no principal has this shape");
            assert!(err.contains("1 to 160 printable ASCII"), "{err}");
        }
        let events = vec![with(row(1, 1000, "app", "ListRecords", ""), &[], "ok")];
        let none = render_table(&breach_report("App", 0, 9000, &events));
        assert!(
            none.contains("No event of principal `App` in this window"),
            "{none}"
        );
        let listed = render_table(&breach_report("app", 0, 9000, &events));
        assert!(
            listed.contains("No record was touched in this window."),
            "{listed}"
        );
    }

    #[test]
    fn breach_report_aggregates_per_record_and_counts_record_less_events() {
        let events = vec![
            with(
                row(1, 1000, "app", "CreateRecord", R2),
                &["full_name", "email"],
                "ok",
            ),
            with(row(2, 1500, "app", "GetRecord", R1), &["phone"], "ok"),
            with(row(3, 2000, "app", "GetRecord", R2), &["bsn"], "denied"),
            with(row(4, 2500, "app", "FindRecords", ""), &["email"], "ok"),
            // A refused search and a refused create name fields but disclose nothing.
            with(row(4, 2510, "app", "FindRecords", ""), &["iban"], "denied"),
            with(
                row(4, 2520, "app", "CreateRecord", ""),
                &["bsn", "gender"],
                "denied",
            ),
            row(5, 2600, "app", "ListRecords", ""),
            // A request that named no valid record id touched no record.
            row(5, 2650, "app", "GetRecord", audit::INVALID_RECORD_ID),
            // Another principal, and events outside the window: not in the report.
            with(row(6, 2700, "other", "GetRecord", R1), &["iban"], "ok"),
            with(row(7, 9000, "app", "GetRecord", R1), &["wage"], "ok"),
            with(row(0, 999, "app", "GetRecord", R1), &["wage"], "ok"),
            with(
                row(8, 3000, "app", "UpdateRecord", R2),
                &["email", "city"],
                "ok",
            ),
        ];
        let r = breach_report("app", 1000, 9000, &events);
        assert_eq!(r.total_events, 9);
        assert_eq!((r.records_touched, r.records_attempted), (2, 0));
        // The refused calls disclosed nothing: their fields are reported apart, whether they
        // named a record or not.
        assert_eq!(
            r.distinct_fields,
            vec!["city", "email", "full_name", "phone"]
        );
        assert_eq!(r.distinct_fields_attempted, vec!["bsn", "gender", "iban"]);
        assert_eq!(r.without_record.events, 5);
        assert_eq!(
            r.without_record.actions,
            BTreeMap::from([
                ("CreateRecord".into(), 1),
                ("FindRecords".into(), 2),
                ("GetRecord".into(), 1),
                ("ListRecords".into(), 1)
            ])
        );
        assert_eq!(r.without_record.field_names, vec!["email"]);
        assert_eq!(
            r.without_record.fields_attempted,
            vec!["bsn", "gender", "iban"]
        );
        // First touched first.
        assert_eq!(r.records[0].record_id, R2);
        assert_eq!(
            r.records[0],
            RecordTouch {
                record_id: R2.into(),
                field_names: vec!["city".into(), "email".into(), "full_name".into()],
                fields_masked: vec![],
                fields_attempted: vec!["bsn".into()],
                actions: vec![
                    "CreateRecord".into(),
                    "GetRecord".into(),
                    "UpdateRecord".into()
                ],
                events: 3,
                first: 1000,
                last: 3000,
                outcomes: BTreeMap::from([("denied".into(), 1), ("ok".into(), 2)]),
            }
        );
        assert_eq!(r.records[1].record_id, R1);
        assert_eq!(r.records[1].field_names, vec!["phone"]);
        assert_eq!(r.records[1].events, 1);

        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("parses");
        assert_eq!(json["since"], "1970-01-01T00:00:01.000Z");
        assert_eq!(json["records"][0]["last"], "1970-01-01T00:00:03.000Z");
        assert_eq!(json["records"][0]["outcomes"]["denied"], 1);

        let table = render_table(&r);
        assert!(table.contains("Records touched:  2"), "{table}");
        assert!(
            table.contains(
                "5 events (CreateRecord 1 FindRecords 2 GetRecord 1 ListRecords 1), fields named: email, refused fields: bsn, gender, iban"
            ),
            "{table}"
        );
        let lines: Vec<&str> = table.lines().collect();
        let head = lines
            .iter()
            .position(|l| l.starts_with("RECORD"))
            .expect("table header");
        // Columns line up: every row's FIRST column starts where the header's does.
        let col = lines[head].find("FIRST").expect("FIRST");
        for l in &lines[head + 1..] {
            assert_eq!(&l[col..col + 5], "1970-", "{table}");
        }
        assert!(lines[head + 1].starts_with(R2));
        assert!(lines[head + 1].ends_with("city,email,full_name  bsn"));
    }

    #[test]
    fn a_record_only_refused_is_attempted_not_touched() {
        let events = vec![
            with(
                row(1, 1000, "app", "GetRecord", R1),
                &["bsn", "iban"],
                "denied",
            ),
            with(row(2, 1100, "app", "GetRecord", R1), &["iban"], "denied"),
            with(row(3, 1200, "app", "GetRecord", R2), &["email"], "ok"),
            with(
                row(4, 1300, "app", "GetRecord", R2),
                &["email", "bsn"],
                "denied",
            ),
        ];
        let r = breach_report("app", 0, 9000, &events);
        assert_eq!((r.records_touched, r.records_attempted), (1, 1));
        assert_eq!(r.distinct_fields, vec!["email"]);
        assert_eq!(r.distinct_fields_attempted, vec!["bsn", "iban"]);
        assert!(r.records[0].field_names.is_empty());
        assert_eq!(r.records[0].fields_attempted, vec!["bsn", "iban"]);
        assert_eq!(r.records[1].field_names, vec!["email"]);
        assert_eq!(
            r.records[1].fields_attempted,
            vec!["bsn"],
            "email was disclosed"
        );
        let table = render_table(&r);
        assert!(table.contains("Only attempted:   1"), "{table}");
        assert!(table.contains("Refused fields:   2 (bsn, iban)"), "{table}");
    }

    /// `r` disclosing `fields`, of which `masked` only masked.
    fn masked(mut r: AuditRow, fields: &[&str], masked: &[&str]) -> AuditRow {
        r = with(r, fields, "ok");
        r.masked_field_names = masked.iter().map(|f| f.to_string()).collect();
        r
    }

    #[test]
    fn a_field_disclosed_only_masked_is_reported_apart() {
        let events = vec![
            // R1: bsn and iban masked, email in full.
            masked(
                row(1, 1000, "po", "GetRecord", R1),
                &["bsn", "email", "iban"],
                &["bsn", "iban"],
            ),
            // Read masked again, and a refused read of bsn: still masked only.
            masked(row(2, 1100, "po", "GetRecord", R1), &["bsn"], &["bsn"]),
            with(
                row(3, 1200, "po", "GetRecord", R1),
                &["bsn", "wage"],
                "denied",
            ),
            // A failed read that would have masked discloses nothing.
            AuditRow {
                outcome: "error".into(),
                ..masked(row(4, 1300, "po", "GetRecord", R2), &["iban"], &["iban"])
            },
        ];
        let r = breach_report("po", 0, 9000, &events);
        assert_eq!((r.records_touched, r.records_attempted), (1, 1));
        assert_eq!(r.records[0].field_names, vec!["email"]);
        assert_eq!(r.records[0].fields_masked, vec!["bsn", "iban"]);
        assert_eq!(
            r.records[0].fields_attempted,
            vec!["wage"],
            "bsn was disclosed, masked"
        );
        assert!(r.records[1].field_names.is_empty());
        assert!(r.records[1].fields_masked.is_empty());
        assert_eq!(r.records[1].fields_attempted, vec!["iban"]);
        assert_eq!(r.distinct_fields, vec!["email"]);
        assert_eq!(r.distinct_fields_masked, vec!["bsn", "iban"]);
        assert_eq!(r.distinct_fields_attempted, vec!["wage"]);

        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("parses");
        assert_eq!(
            json["records"][0]["fields_masked"],
            serde_json::json!(["bsn", "iban"])
        );
        assert_eq!(json["records"][1]["fields_masked"], serde_json::json!([]));
        assert_eq!(
            json["distinct_fields_masked"],
            serde_json::json!(["bsn", "iban"])
        );
        assert_eq!(json["distinct_fields"], serde_json::json!(["email"]));

        let table = render_table(&r);
        assert!(
            table.contains("Distinct fields:  3 (bsn (masked), email, iban (masked))"),
            "{table}"
        );
        assert!(table.contains("Refused fields:   1 (wage)"), "{table}");
        let row = table
            .lines()
            .find(|l| l.starts_with(R1))
            .expect("row of R1");
        assert!(
            row.ends_with("bsn (masked),email,iban (masked)  wage"),
            "{table}"
        );
    }

    #[test]
    fn a_field_disclosed_in_full_once_counts_as_full() {
        let events = vec![
            masked(row(1, 1000, "app", "GetRecord", R1), &["bsn"], &["bsn"]),
            // The same principal read it in full later (under another role).
            with(row(2, 1100, "app", "GetRecord", R1), &["bsn", "iban"], "ok"),
            masked(
                row(3, 1200, "app", "GetRecord", R1),
                &["bsn", "iban"],
                &["bsn", "iban"],
            ),
            // Another record: masked only there, but in full on R1, so full overall.
            masked(
                row(4, 1300, "app", "GetRecord", R2),
                &["bsn", "phone"],
                &["bsn", "phone"],
            ),
        ];
        let r = breach_report("app", 0, 9000, &events);
        assert_eq!(r.records[0].record_id, R1);
        assert_eq!(r.records[0].field_names, vec!["bsn", "iban"]);
        assert!(r.records[0].fields_masked.is_empty());
        assert!(r.records[1].field_names.is_empty());
        assert_eq!(r.records[1].fields_masked, vec!["bsn", "phone"]);
        assert_eq!(r.distinct_fields, vec!["bsn", "iban"]);
        assert_eq!(r.distinct_fields_masked, vec!["phone"]);
        assert!(r.distinct_fields_attempted.is_empty());
        let table = render_table(&r);
        assert!(
            table.contains("Distinct fields:  3 (bsn, iban, phone (masked))"),
            "{table}"
        );
    }

    #[test]
    fn an_empty_report_says_so() {
        let r = breach_report("app", 0, 10, &[]);
        assert_eq!((r.total_events, r.records_touched), (0, 0));
        // No event at all: said so, with a hint that the name may be wrong.
        assert!(render_table(&r).contains("No event of principal `app` in this window"));
    }

    #[test]
    fn times_parse_as_rfc3339_or_date() {
        assert_eq!(parse_time("1970-01-02"), Ok(86_400_000));
        assert_eq!(parse_time("1970-01-01T00:00:01.5Z"), Ok(1500));
        assert_eq!(parse_time("1970-01-01T01:00:00+01:00"), Ok(0));
        for bad in [
            "",
            "yesterday",
            "2026-13-01",
            "2026-11-25 10:00",
            "1732528800",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
        assert_eq!(rfc3339_ms(1500), "1970-01-01T00:00:01.500Z");
        assert_eq!(
            parse_record_id("0B5E6F0E-3D4C-4D7E-9A77-1F2E3D4C5B6A"),
            Ok(R1.to_string())
        );
        assert!(parse_record_id("not-a-uuid").is_err());
    }

    #[test]
    fn events_export_as_json_lines() {
        let mut out = Vec::new();
        let e = with(row(7, 1500, "app", "GetRecord", R1), &["email"], "ok");
        e.write_json_line(&mut out).expect("written");
        e.write_json_line(&mut out).expect("written");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).expect("json");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["time"], "1970-01-01T00:00:01.500Z");
        assert_eq!(v["record_id"], R1);
        assert_eq!(v["field_names"], serde_json::json!(["email"]));
        assert_eq!(v["hash"], "07".repeat(32));
        assert_eq!(v["masked_field_names"], serde_json::json!([]));
        let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        assert_eq!(keys.len(), 11);
        let mut out = Vec::new();
        let mut m = with(
            row(8, 1500, "app", "GetRecord", R1),
            &["bsn", "email"],
            "ok",
        );
        m.masked_field_names = vec!["bsn".into()];
        m.write_json_line(&mut out).expect("written");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["field_names"], serde_json::json!(["bsn", "email"]));
        assert_eq!(v["masked_field_names"], serde_json::json!(["bsn"]));
    }

    #[tokio::test]
    async fn a_data_dir_held_by_a_server_is_refused_with_advice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let err = open_store(&data, USE_SERVER).err().expect("no dir");
        assert_eq!(err.exit_code(), EXIT_USAGE);
        std::fs::create_dir(&data).expect("mkdir");
        let err = open_store(&data, USE_SERVER).err().expect("no store");
        assert!(
            err.to_string().contains("not a Kluis data directory"),
            "{err}"
        );
        let held = SledStore::open(&data).expect("open");
        let err = open_store(&data, USE_VERIFY_CHAIN).err().expect("locked");
        assert_eq!(err.exit_code(), EXIT_USAGE);
        assert!(err.to_string().contains("stop the server"), "{err}");
        assert!(err.to_string().contains("VerifyChain"), "{err}");
        drop(held);
        assert!(open_store(&data, USE_SERVER).is_ok());
    }
}

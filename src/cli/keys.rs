//! `kluis keys …`: the key lifecycle for the security team.
//!
//! Over a running server (`kluis.v1.Keys`, bearer token of a role with key rights, e.g.
//! `security_officer`, in `$KLUIS_TOKEN`):
//! - `status`: every category's KEK versions, their states and how many records each wraps;
//! - `rotate [CATEGORY]`: a new active KEK version (every category when none is named);
//! - `rewrap [CATEGORY]`, `rekey CATEGORY`: runs (or attaches to) the job and follows its
//!   progress stream to the end, with a progress bar on a terminal;
//! - `retire CATEGORY VERSION`: destroys a KEK version no record needs any more.
//!
//! Offline, with the server stopped:
//! - `rotate-master --new-key FILE`: re-wraps every key the master key protects under a new
//!   master key and installs the new key where the old one was, keeping the old one as
//!   `<file>.retired-<UTC time>`. Each step can be repeated: re-running the same command
//!   after a crash at any point finishes the job, and re-running it after it finished
//!   changes nothing (the receipt beside FILE names the installed key by its fingerprint).
//!
//! None of these prints a key or record data. Exit codes: 0 ok; [`EXIT_FAILED`] when the
//! server refuses or fails a call, or a job's progress stream ends early; [`EXIT_USAGE`] for
//! usage (an unknown category included), configuration, IO and connection errors (a call
//! that got no gRPC answer included), and for everything `rotate-master` cannot do.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde::Serialize;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::audit::{
    channel, code_name, default_server, open_store, output_error, plural, BearerToken, CliError,
    Format, TOKEN_ENV,
};
use crate::audit::{Draft, Outcome};
use crate::keys::{self, KeyRing, MasterKey, MASTER_KEY_ENV};
use crate::proto;
use crate::proto::keys_client::KeysClient;
use crate::store::SledStore;

pub use super::audit::{EXIT_FAILED, EXIT_USAGE};

/// The exit codes, for `--help`.
pub const EXIT_CODES: &str = "Exit codes:\n  0  ok\n  1  the server refused or failed the call (its gRPC status is printed), or a rewrap/rekey\n     progress stream ended early, before the job finished (the job goes on in the server)\n  2  usage error (also: an unknown CATEGORY), configuration, IO or connection error (also: no\n     gRPC answer, e.g. not a Kluis server or the connection dropped); for rotate-master also:\n     the data directory is in use by a running server, neither key opens it, or --data-dir is\n     not the configured one (nothing changed), or a step after the commit failed (the error\n     says so: keep the new key file and run the same command again)";

/// Role named in the audit event of an offline master key rotation: `system`, as for the
/// server's own key jobs; no role of the policy was authenticated (the operator's account
/// is in the principal).
pub const ROTATE_MASTER_ROLE: &str = crate::rotation::SYSTEM_ROLE;
/// Action of the audit event of an offline master key rotation.
pub const ROTATE_MASTER_ACTION: &str = "RotateMasterKey";
/// Suffix of the receipt `rotate-master` leaves beside `--new-key FILE` once the data
/// directory is under the new key: what it did, and the new key's fingerprint
/// ([`MasterKey::fingerprint`]), never the key.
pub const RECEIPT_SUFFIX: &str = ".installed";
/// Suffix of the temporary files `rotate-master` writes a key to before it renames it into
/// place.
const PARTIAL_SUFFIX: &str = ".partial";

/// Largest gRPC response accepted (a status of every category and version is small).
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// What to do instead of rotating the master key of a data directory a server holds.
const STOP_SERVER_FIRST: &str =
    "keep the current master key (it can only be rotated while the server is stopped)";

// ---------------------------------------------------------------------------------------
// Arguments

/// `kluis keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Every category's KEK versions, their states and how many records each wraps.
    ///
    /// One row per category and version: CATEGORY, VERSION (the active one marked `*`),
    /// STATE (active, decrypt_only, retired), CREATED (RFC 3339 UTC, `-` when unknown) and
    /// RECORDS (exactly how many records' data keys of the category the version wraps).
    #[command(after_help = EXIT_CODES)]
    Status(StatusArgs),
    /// Makes a new KEK version active for new data keys.
    ///
    /// Rotates CATEGORY, or every category when none is named. Older versions become
    /// decrypt_only; the records they wrap move to the new version when `kluis keys rewrap`
    /// runs. Prints the new active versions and the resulting status.
    #[command(after_help = EXIT_CODES)]
    Rotate(RotateArgs),
    /// Re-wraps data keys under the active KEK and follows the job to its end.
    ///
    /// Starts the rewrap job of CATEGORY (every category when none is named), or attaches to
    /// the one running, and shows its progress on stderr until it has finished; then prints
    /// `rewrap finished: N of M records`. Field ciphertext is not touched. Interrupting this
    /// command does not stop the job: it runs on in the server; run the command again to
    /// follow it (`keys status` shows whether it has finished).
    #[command(after_help = EXIT_CODES)]
    Rewrap(RewrapArgs),
    /// Replaces a category's data keys, re-encrypting its fields, and follows the job.
    ///
    /// Like rewrap, but every record's data key of CATEGORY is replaced by a fresh one and
    /// the category's fields are re-encrypted under it. Prints `rekey finished: N of M
    /// records` at the end. Run again after its job finished (see `keys status`), it starts
    /// a new re-key.
    #[command(after_help = EXIT_CODES)]
    Rekey(RekeyArgs),
    /// Destroys a KEK version that no record needs any more.
    ///
    /// Refused (FAILED_PRECONDITION) for the active version and while records still need the
    /// version (rewrap first). Prints the resulting status.
    #[command(after_help = EXIT_CODES)]
    Retire(RetireArgs),
    /// Offline: replaces the master key (the server must be stopped).
    ///
    /// Re-wraps every key the master key protects (KEKs, blind-index root, integrity key and
    /// the key check value) under the key in --new-key FILE, in one atomic batch with an audit
    /// event (role `system`, principal `cli:<account>`); FILE is created (random, mode 0600)
    /// when it does not exist, and synced before it is used. Before that it checks that the
    /// key's directory can be written and that FILE can be given the owner of the master key
    /// file. After it, it proves that the new key opens the re-wrapped keys, keeps the old
    /// key as <master key file>.retired-<UTC time> (0600), and moves FILE over the master key
    /// file the configuration names (or, when the key comes from KLUIS_MASTER_KEY, leaves
    /// FILE in place: set the variable to its content). A receipt FILE.installed records the
    /// new key's fingerprint (never the key). With a master key file, --data-dir must be the
    /// configured data directory (another one is refused: it does not use that file).
    ///
    /// Safe to repeat: after a crash at any point, running the same command again finishes
    /// the job (an error after the commit says so); once it has finished, running it again
    /// does nothing while the current key is the one the receipt names (with another current
    /// key it is a new rotation). Start the server with the new key, then destroy every copy
    /// of the old key, the .retired- file and backups included.
    #[command(after_help = EXIT_CODES)]
    RotateMaster(RotateMasterArgs),
}

/// Which server to ask.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The running server, sent $KLUIS_TOKEN as the bearer token (a role with key rights,
    /// e.g. security_officer) [default: http://127.0.0.1:50051].
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// TLS towards an https:// --server.
    #[command(flatten)]
    pub tls: crate::cli::audit::TlsArgs,
}

/// `kluis keys status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The server.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// `kluis keys rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The category to rotate (contact, personal, cv, identity, financial, absence)
    /// [default: every category].
    #[arg(value_name = "CATEGORY", value_parser = parse_category)]
    pub category: Option<String>,
    /// The server.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// `kluis keys rewrap`.
#[derive(Debug, Args)]
pub struct RewrapArgs {
    /// The category to rewrap [default: every category].
    #[arg(value_name = "CATEGORY", value_parser = parse_category)]
    pub category: Option<String>,
    /// The server.
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `kluis keys rekey`.
#[derive(Debug, Args)]
pub struct RekeyArgs {
    /// The category to re-key.
    #[arg(value_name = "CATEGORY", value_parser = parse_category)]
    pub category: String,
    /// The server.
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `kluis keys retire`.
#[derive(Debug, Args)]
pub struct RetireArgs {
    /// The category.
    #[arg(value_name = "CATEGORY", value_parser = parse_category)]
    pub category: String,
    /// The KEK version to destroy.
    #[arg(value_name = "VERSION", value_parser = clap::value_parser!(u32).range(1..))]
    pub version: u32,
    /// The server.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// `kluis keys rotate-master`.
#[derive(Debug, Args)]
pub struct RotateMasterArgs {
    /// The new master key: used if FILE exists (64 hex digits, mode 0600), else created
    /// (random, mode 0600). Moved over the current master key file when done (the old key
    /// is kept beside it as <master key file>.retired-<UTC time>).
    #[arg(long, value_name = "FILE")]
    pub new_key: PathBuf,
    /// Configuration file naming the data directory and the master key file (or none:
    /// then the key is in KLUIS_MASTER_KEY) [default: ./kluis.toml].
    #[arg(long, value_name = "FILE", conflicts_with = "dev")]
    pub config: Option<PathBuf>,
    /// Dev mode layout: the master key in ./keys/master.key, the data in ./data.
    #[arg(long)]
    pub dev: bool,
    /// Data directory. Must be the one the configuration (or --dev) names when the key is
    /// in a master key file: the new key is installed over that file, which only that
    /// directory may use.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------
// Small helpers

fn refused(method: &'static str) -> impl FnOnce(tonic::Status) -> CliError {
    CliError::status_of(method)
}

/// Parses a CATEGORY argument: one of the six fixed categories (checked here, so that a
/// misspelt one is a usage error like any other bad argument, not a refusal by the server).
pub fn parse_category(text: &str) -> Result<String, String> {
    let text = text.trim();
    match crate::schema::Category::parse(text) {
        Some(c) => Ok(c.as_str().to_string()),
        None => Err(format!(
            "not a category: use one of {}",
            crate::schema::Category::ALL.map(|c| c.as_str()).join(", ")
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Connecting

/// The gRPC client of the `Keys` service, authenticated by a bearer token.
pub type Client = KeysClient<InterceptedService<Channel, BearerToken>>;

/// The bearer token in `$KLUIS_TOKEN` (a usage error when unset or empty).
pub fn token_from_env() -> Result<BearerToken, CliError> {
    let missing = || {
        CliError::Usage(format!(
            "{TOKEN_ENV} is not set: the keys commands need the bearer token of a role with key rights (e.g. security_officer) in {TOKEN_ENV}"
        ))
    };
    let token = Zeroizing::new(std::env::var(TOKEN_ENV).map_err(|_| missing())?);
    if token.trim().is_empty() {
        return Err(missing());
    }
    BearerToken::new(&token)
}

/// Connects to the server `args` name, with the token in `$KLUIS_TOKEN`.
pub async fn connect(args: &ServerArgs) -> Result<Client, CliError> {
    let url = args.server.clone().unwrap_or_else(default_server);
    let token = token_from_env()?;
    let channel = channel(&url, &args.tls).await?;
    Ok(KeysClient::with_interceptor(channel, token).max_decoding_message_size(MAX_RESPONSE_BYTES))
}

// ---------------------------------------------------------------------------------------
// Key status: table and JSON

/// A protobuf timestamp as RFC 3339 UTC to the second; `-` when absent or out of range.
pub fn created_text(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| {
        chrono::DateTime::from_timestamp(t.seconds, t.nanos.clamp(0, 999_999_999) as u32)
    })
    .map_or_else(
        || "-".to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

#[derive(Serialize)]
struct JsonStatus<'a> {
    categories: Vec<JsonCategory<'a>>,
    last_job: Option<JsonJob<'a>>,
}

#[derive(Serialize)]
struct JsonJob<'a> {
    kind: &'a str,
    /// `null` when it covers every category.
    category: Option<&'a str>,
    done: u64,
    total: u64,
    started: Option<String>,
    /// `null` while it runs, or once it failed.
    finished: Option<String>,
    /// `null` unless it failed.
    error: Option<&'a str>,
    requested_by: &'a str,
}

/// The last key job in one line: `last key job: rekey of identity, 20031 of 20031 records,
/// started …, finished …` (or `running`, or `failed: …`).
pub fn job_line(job: &proto::KeyJob) -> String {
    let scope = if job.category.is_empty() {
        "every category".to_string()
    } else {
        job.category.clone()
    };
    let state = if !job.error.is_empty() {
        format!("failed: {} (requesting the same job resumes it)", job.error)
    } else if job.finished.is_some() {
        format!("finished {}", created_text(job.finished.as_ref()))
    } else {
        "running (the rewrap or rekey command follows it)".to_string()
    };
    format!(
        "last key job: {} of {scope}, {} of {} records, started {} by {}, {state}",
        job.kind,
        job.done,
        job.total,
        created_text(job.started.as_ref()),
        job.requested_by
    )
}

#[derive(Serialize)]
struct JsonCategory<'a> {
    category: &'a str,
    active_version: u32,
    versions: Vec<JsonVersion<'a>>,
}

#[derive(Serialize)]
struct JsonVersion<'a> {
    version: u32,
    state: &'a str,
    /// RFC 3339 UTC, `null` when unknown.
    created: Option<String>,
    records: u64,
}

fn sorted_versions(c: &proto::CategoryKeys) -> Vec<&proto::KeyVersion> {
    let mut versions: Vec<&proto::KeyVersion> = c.versions.iter().collect();
    versions.sort_by_key(|v| v.version);
    versions
}

/// The status as one pretty-printed JSON document:
/// `{"categories": [{"category", "active_version", "versions": [{"version", "state",
/// "created", "records"}]}], "last_job": null | {"kind", "category", "done", "total",
/// "started", "finished", "error", "requested_by"}}`.
pub fn status_json(status: &proto::KeyStatus) -> String {
    let doc = JsonStatus {
        last_job: status.last_job.as_ref().map(|j| JsonJob {
            kind: &j.kind,
            category: (!j.category.is_empty()).then_some(j.category.as_str()),
            done: j.done,
            total: j.total,
            started: j.started.as_ref().map(|t| created_text(Some(t))),
            finished: j.finished.as_ref().map(|t| created_text(Some(t))),
            error: (!j.error.is_empty()).then_some(j.error.as_str()),
            requested_by: &j.requested_by,
        }),
        categories: status
            .categories
            .iter()
            .map(|c| JsonCategory {
                category: &c.category,
                active_version: c.active_version,
                versions: sorted_versions(c)
                    .into_iter()
                    .map(|v| JsonVersion {
                        version: v.version,
                        state: &v.state,
                        created: v.created.as_ref().map(|t| created_text(Some(t))),
                        records: v.records,
                    })
                    .collect(),
            })
            .collect(),
    };
    serde_json::to_string_pretty(&doc).expect("plain strings and integers serialize")
}

/// The status as an aligned table, one row per category and version, the active version
/// marked `*`.
pub fn render_status(status: &proto::KeyStatus) -> String {
    const HEADER: [&str; 5] = ["CATEGORY", "VERSION", "STATE", "CREATED", "RECORDS"];
    let mut rows: Vec<[String; 5]> = Vec::new();
    for c in &status.categories {
        let versions = sorted_versions(c);
        if versions.is_empty() {
            rows.push([
                c.category.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for v in versions {
            let marker = if v.version == c.active_version {
                " *"
            } else {
                ""
            };
            rows.push([
                c.category.clone(),
                format!("{}{marker}", v.version),
                v.state.clone(),
                created_text(v.created.as_ref()),
                v.records.to_string(),
            ]);
        }
    }
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut push = |cells: [&str; 5]| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            if i == 4 {
                line.push_str(&format!("{cell:>width$}", width = widths[i]));
            } else {
                line.push_str(&format!("{cell:<width$}", width = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push(HEADER);
    for row in &rows {
        push([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
    out.push_str("* the active version: wraps new data keys\n");
    if let Some(job) = &status.last_job {
        out.push_str(&job_line(job));
        out.push('\n');
    }
    out
}

fn write_status(
    status: &proto::KeyStatus,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let text = match format {
        Format::Table => render_status(status),
        Format::Json => format!("{}\n", status_json(status)),
    };
    out.write_all(text.as_bytes()).map_err(output_error)
}

// ---------------------------------------------------------------------------------------
// Job progress

/// How a job's progress is shown on stderr: a redrawn bar on a terminal, otherwise a line
/// now and then.
pub struct ProgressView<W: Write> {
    sink: W,
    kind: &'static str,
    terminal: bool,
    last_drawn: Option<Instant>,
    drawn_width: usize,
    last_line: String,
    interval: Duration,
}

/// Width of the bar, in characters.
const BAR_WIDTH: usize = 30;

impl<W: Write> ProgressView<W> {
    /// A view of a `kind` job (`rewrap`, `rekey`) writing to `sink`; `terminal` draws a bar.
    pub fn new(sink: W, kind: &'static str, terminal: bool) -> Self {
        ProgressView {
            sink,
            kind,
            terminal,
            last_drawn: None,
            drawn_width: 0,
            last_line: String::new(),
            interval: if terminal {
                Duration::from_millis(100)
            } else {
                Duration::from_secs(1)
            },
        }
    }

    /// `rewrap identity`, `rewrap every category`.
    fn label(&self, p: &proto::RewrapProgress) -> String {
        if p.category.is_empty() {
            format!("{} every category", self.kind)
        } else {
            format!("{} {}", self.kind, p.category)
        }
    }

    /// The bar line: `rewrap identity [#####-----] 1200/5000 24%`.
    pub fn bar(&self, p: &proto::RewrapProgress) -> String {
        let filled = if p.total == 0 {
            if p.finished {
                BAR_WIDTH
            } else {
                0
            }
        } else {
            (u128::from(p.done.min(p.total)) * BAR_WIDTH as u128 / u128::from(p.total)) as usize
        };
        let percent = if p.total == 0 {
            if p.finished {
                100
            } else {
                0
            }
        } else {
            u128::from(p.done.min(p.total)) * 100 / u128::from(p.total)
        };
        format!(
            "{} [{}{}] {}/{} {percent}%",
            self.label(p),
            "#".repeat(filled),
            "-".repeat(BAR_WIDTH - filled),
            p.done,
            p.total
        )
    }

    /// The plain line: `rewrap identity: 1200/5000`.
    pub fn line(&self, p: &proto::RewrapProgress) -> String {
        format!("{}: {}/{}", self.label(p), p.done, p.total)
    }

    /// Shows `p` if enough time has passed since the last update (always the first and the
    /// finished one). Progress output is best effort: a failing stderr is ignored.
    pub fn update(&mut self, p: &proto::RewrapProgress) {
        let now = Instant::now();
        let due = p.finished
            || self
                .last_drawn
                .is_none_or(|t| now.duration_since(t) >= self.interval);
        if !due {
            return;
        }
        self.last_drawn = Some(now);
        if self.terminal {
            let text = self.bar(p);
            let width = text.chars().count();
            let pad = self.drawn_width.saturating_sub(width);
            let _ = write!(self.sink, "\r{text}{}", " ".repeat(pad));
            self.drawn_width = width;
        } else {
            // The finished message may repeat the last one shown.
            let line = self.line(p);
            if line == self.last_line {
                return;
            }
            let _ = writeln!(self.sink, "{line}");
            self.last_line = line;
        }
        let _ = self.sink.flush();
    }

    /// Ends the bar's line (on a terminal), so that what follows starts on a new line.
    pub fn end(&mut self) {
        if self.terminal && self.drawn_width > 0 {
            let _ = writeln!(self.sink);
            let _ = self.sink.flush();
            self.drawn_width = 0;
        }
    }

    /// The sink (for tests).
    pub fn into_sink(self) -> W {
        self.sink
    }
}

/// Follows a job's progress stream to its end, showing it in `view`; returns the finished
/// message. A stream that ends without one is an error ([`EXIT_FAILED`]).
pub async fn follow<W: Write>(
    method: &'static str,
    stream: &mut tonic::Streaming<proto::RewrapProgress>,
    view: &mut ProgressView<W>,
) -> Result<proto::RewrapProgress, CliError> {
    loop {
        match stream.message().await {
            Ok(Some(p)) => {
                view.update(&p);
                if p.finished {
                    view.end();
                    return Ok(p);
                }
            }
            Ok(None) => {
                view.end();
                return Err(CliError::EndedEarly {
                    method,
                    reason: "the server closed it without a status".into(),
                });
            }
            Err(status) => {
                view.end();
                return Err(CliError::EndedEarly {
                    method,
                    reason: format!("{}: {}", code_name(status.code()), status.message()),
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Online commands

/// `kluis keys status`.
pub async fn status(args: &StatusArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let mut client = connect(&args.server).await?;
    let status = client
        .get_key_status(proto::GetKeyStatusRequest {})
        .await
        .map_err(refused("GetKeyStatus"))?
        .into_inner();
    write_status(&status, args.format, out)
}

/// `kluis keys rotate`.
pub async fn rotate(args: &RotateArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let mut client = connect(&args.server).await?;
    let status = client
        .rotate_key(proto::RotateKeyRequest {
            category: args.category.clone().unwrap_or_default(),
        })
        .await
        .map_err(refused("RotateKey"))?
        .into_inner();
    if args.format == Format::Table {
        let rotated: Vec<String> = status
            .categories
            .iter()
            .filter(|c| {
                args.category
                    .as_ref()
                    .is_none_or(|name| *name == c.category)
            })
            .map(|c| format!("{} {}", c.category, c.active_version))
            .collect();
        let next = match &args.category {
            Some(c) => format!("kluis keys rewrap {c}"),
            None => "kluis keys rewrap".to_string(),
        };
        writeln!(
            out,
            "rotated: new active KEK versions: {}\nOlder versions are decrypt_only until `{next}` has moved their records.\n",
            rotated.join(", ")
        )
        .map_err(output_error)?;
    }
    write_status(&status, args.format, out)
}

async fn run_job(
    kind: &'static str,
    method: &'static str,
    stream: tonic::Streaming<proto::RewrapProgress>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let mut stream = stream;
    let stderr = std::io::stderr();
    let terminal = stderr.is_terminal();
    let mut view = ProgressView::new(stderr, kind, terminal);
    let p = follow(method, &mut stream, &mut view).await?;
    let scope = if p.category.is_empty() {
        "every category".to_string()
    } else {
        format!("category {}", p.category)
    };
    writeln!(
        out,
        "{kind} finished: {} of {} ({scope})",
        p.done,
        plural(p.total, "record")
    )
    .map_err(output_error)
}

/// `kluis keys rewrap`.
pub async fn rewrap(args: &RewrapArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let mut client = connect(&args.server).await?;
    let stream = client
        .rewrap(proto::RewrapRequest {
            category: args.category.clone().unwrap_or_default(),
        })
        .await
        .map_err(refused("Rewrap"))?
        .into_inner();
    run_job("rewrap", "Rewrap", stream, out).await
}

/// `kluis keys rekey`.
pub async fn rekey(args: &RekeyArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let mut client = connect(&args.server).await?;
    let stream = client
        .rekey(proto::RekeyRequest {
            category: args.category.clone(),
        })
        .await
        .map_err(refused("Rekey"))?
        .into_inner();
    run_job("rekey", "Rekey", stream, out).await
}

/// `kluis keys retire`.
pub async fn retire(args: &RetireArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let mut client = connect(&args.server).await?;
    let status = client
        .retire_key_version(proto::RetireKeyVersionRequest {
            category: args.category.clone(),
            version: args.version,
        })
        .await
        .map_err(refused("RetireKeyVersion"))?
        .into_inner();
    if args.format == Format::Table {
        writeln!(
            out,
            "retired: KEK {} version {} is destroyed\n",
            args.category, args.version
        )
        .map_err(output_error)?;
    }
    write_status(&status, args.format, out)
}

// ---------------------------------------------------------------------------------------
// Offline master key rotation

/// Where the current master key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeySource {
    /// A file (the configuration's `master_key_file`, or `keys/master.key` in dev mode).
    File(PathBuf),
    /// The [`MASTER_KEY_ENV`] environment variable.
    Env,
}

/// The data directory and the current master key, as the server would find them.
#[derive(Debug)]
pub struct MasterKeySetup {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The data directory the configuration (or the dev-mode layout) names, which the key
    /// in `source` belongs to (`data_dir` unless --data-dir overrides it).
    pub configured_data_dir: PathBuf,
    /// Where the current master key comes from.
    pub source: MasterKeySource,
    /// The current master key.
    pub key: MasterKey,
}

/// Resolves the data directory and the current master key of `args`: from the configuration
/// file (relative paths relative to it), or the dev-mode layout under the current directory.
pub fn resolve_setup(args: &RotateMasterArgs) -> Result<MasterKeySetup, CliError> {
    resolve_setup_from(args.config.clone(), args.dev, args.data_dir.clone())
}

/// [`resolve_setup`] for any offline command with `--config FILE | --dev` and `--data-dir
/// DIR`: the configuration file `config` (default `./kluis.toml`; relative paths in it are
/// relative to it), or with `dev` the dev-mode layout under the current directory; `data_dir`
/// overrides the data directory either names.
pub fn resolve_setup_from(
    config: Option<PathBuf>,
    dev: bool,
    data_dir: Option<PathBuf>,
) -> Result<MasterKeySetup, CliError> {
    let (resolved_dir, source) = if dev {
        let root = Path::new(".");
        (
            root.join("data"),
            MasterKeySource::File(root.join("keys").join("master.key")),
        )
    } else {
        let path = config.unwrap_or_else(|| PathBuf::from("kluis.toml"));
        if !path.exists() {
            return Err(CliError::Usage(format!(
                "no configuration at {}: pass --config FILE, or --dev in a dev-mode directory",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| CliError::Io(format!("{}: {e}", path.display())))?;
        let file: crate::config::ConfigFile = toml::from_str(&text).map_err(|e| {
            CliError::Usage(format!(
                "{}: {}",
                path.display(),
                crate::config::toml_message(&e, &text)
            ))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        (
            rel(&file.data_dir),
            match &file.master_key_file {
                Some(p) => MasterKeySource::File(rel(p)),
                None => MasterKeySource::Env,
            },
        )
    };
    let data_dir = data_dir.unwrap_or_else(|| resolved_dir.clone());
    let key = match &source {
        MasterKeySource::File(p) => {
            MasterKey::load_file(p).map_err(|e| CliError::Usage(format!("current {e}")))?
        }
        MasterKeySource::Env => MasterKey::from_env()
            .map_err(|e| CliError::Usage(e.to_string()))?
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "no master key: the configuration names no master_key_file and {MASTER_KEY_ENV} is not set"
                ))
            })?,
    };
    Ok(MasterKeySetup {
        data_dir,
        configured_data_dir: resolved_dir,
        source,
        key,
    })
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> Result<PathBuf, CliError> {
    let name = path
        .file_name()
        .ok_or_else(|| CliError::Usage(format!("{} does not name a file", path.display())))?;
    let mut name = name.to_os_string();
    name.push(suffix);
    Ok(path.with_file_name(name))
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> Result<(), CliError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CliError::Io(format!("syncing directory {}: {e}", dir.display())))
}

fn remove_if_present(path: &Path) -> Result<(), CliError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CliError::Io(format!("removing {}: {e}", path.display()))),
    }
}

/// Loads the new master key from `path`, or creates it there (random, 0600). Created whole
/// or not at all: written to `<path>.partial`, synced, then linked into place (never over
/// an existing file). A `.partial` left by an interrupted run is removed first. An existing
/// file is synced, with its directory, before it is used: the data are committed under the
/// key it holds.
fn load_or_create_new_key(path: &Path) -> Result<(MasterKey, bool), CliError> {
    let partial = sibling(path, PARTIAL_SUFFIX)?;
    remove_if_present(&partial)?;
    if path.exists() {
        let key =
            MasterKey::load_file(path).map_err(|e| CliError::Usage(format!("--new-key: {e}")))?;
        // Planted by someone else (review 13: a file of `nobody`'s in a shared directory).
        if let Some(why) = crate::keys::replaceable_by_others(path)
            .map_err(|e| CliError::Io(format!("--new-key {}: {e}", path.display())))?
        {
            return Err(CliError::Usage(format!(
                "--new-key {} is {why}: a key someone else could have chosen; name a file that does not exist, and rotate-master makes one",
                path.display()
            )));
        }
        // A key someone chose rather than drew (review 13: `000…0007` was installed).
        let distinct = key.distinct_bytes();
        if distinct < crate::keys::MIN_DISTINCT_BYTES {
            return Err(CliError::Usage(format!(
                "--new-key {} holds a key with only {distinct} distinct byte values (a random 32-byte key has about 30): not a randomly made key; name a file that does not exist, and rotate-master makes one",
                path.display()
            )));
        }
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| CliError::Io(format!("--new-key {}: syncing: {e}", path.display())))?;
        sync_dir(parent_dir(path))?;
        return Ok((key, false));
    }
    let key = MasterKey::create_file(&partial)
        .map_err(|e| CliError::Io(format!("--new-key: creating the new {e}")))?;
    let linked = match std::fs::hard_link(&partial, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(CliError::Usage(format!(
            "--new-key {} appeared while it was being created: run the command again",
            path.display()
        ))),
        // A file system without hard links: rename (nothing is there: checked above).
        Err(_) => std::fs::rename(&partial, path)
            .map_err(|e| CliError::Io(format!("--new-key {}: {e}", path.display()))),
    };
    let removed = remove_if_present(&partial);
    linked?;
    removed?;
    sync_dir(parent_dir(path))?;
    Ok((key, true))
}

/// The line of a receipt that names the key it is about.
const RECEIPT_FINGERPRINT: &str = "key-fingerprint: ";

/// The fingerprint ([`MasterKey::fingerprint`]) of the key the receipt at `path` names;
/// `None` when there is no receipt or it names none (one written by an older version).
fn receipt_fingerprint(path: &Path) -> Result<Option<String>, CliError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(RECEIPT_FINGERPRINT))
            .map(|f| f.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CliError::Io(format!("reading {}: {e}", path.display()))),
    }
}

/// Writes the receipt `receipt` (no key in it): `what` happened, to the key with
/// `fingerprint`. Whole or not at all (a synced temporary file renamed into place).
fn write_receipt(receipt: &Path, what: &str, fingerprint: &str) -> Result<(), CliError> {
    let text = format!(
        "`kluis keys rotate-master`, {}:\n{what}\n{RECEIPT_FINGERPRINT}{fingerprint}\n\
         This file holds no key, only a fingerprint of it. Running the same command again while\n\
         the --new-key file is gone does nothing as long as the current master key is this one;\n\
         with another current key it starts a new rotation.\n",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    );
    let partial = sibling(receipt, PARTIAL_SUFFIX)?;
    let io = |e: std::io::Error| CliError::Io(format!("writing {}: {e}", receipt.display()));
    let mut file = std::fs::File::create(&partial).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&partial, receipt).map_err(io)?;
    sync_dir(parent_dir(receipt))
}

/// Checks that files can be created and removed in `dir` (`for_what` says why it matters).
/// The probe has a fixed name, so that one left by a killed run is removed by the next.
fn probe_writable(dir: &Path, for_what: &str) -> Result<(), CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join(".kluis-rotate-master.probe");
    let result = remove_if_present(&probe).and_then(|()| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&probe)
            .map_err(|e| CliError::Io(e.to_string()))?;
        remove_if_present(&probe)
    });
    result.map_err(|e| {
        CliError::Io(format!(
            "cannot write in {} ({for_what}): {e}",
            dir.display()
        ))
    })
}

/// The owner (uid, gid) of `path`.
fn owner(path: &Path) -> Result<(u32, u32), CliError> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| (m.uid(), m.gid()))
        .map_err(|e| CliError::Io(format!("{}: {e}", path.display())))
}

/// Gives `path` the owner `(uid, gid)` (that of the master key file it replaces, so that the
/// server's user can read it), if it has another.
fn give_owner(path: &Path, (uid, gid): (u32, u32), target: &Path) -> Result<(), CliError> {
    let (u, g) = owner(path)?;
    if (u, g) == (uid, gid) {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| {
        CliError::Io(format!(
            "{} is owned by {u}:{g}, the master key file {} by {uid}:{gid} (the server's user must be able to read the new key), and it cannot be given that owner: {e}; run the command as root or as that user, or chown the file first",
            path.display(),
            target.display()
        ))
    })
}

/// Moves the key file `new_key` over `target`, atomically: a rename in the same file system;
/// across file systems a synced copy in `target`'s directory (given `target_owner`) renamed
/// over it, then `new_key` is removed. Both directories are synced.
fn install_key_file(
    new_key: &Path,
    target: &Path,
    target_owner: (u32, u32),
) -> Result<(), CliError> {
    match std::fs::rename(new_key, target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            let contents = Zeroizing::new(
                std::fs::read(new_key)
                    .map_err(|e| CliError::Io(format!("reading {}: {e}", new_key.display())))?,
            );
            let partial = sibling(target, PARTIAL_SUFFIX)?;
            remove_if_present(&partial)?;
            keys::write_secret_file(&partial, &contents)
                .map_err(|e| CliError::Io(format!("writing {}: {e}", partial.display())))?;
            give_owner(&partial, target_owner, target)?;
            std::fs::rename(&partial, target).map_err(|e| {
                CliError::Io(format!(
                    "moving {} to {}: {e}",
                    partial.display(),
                    target.display()
                ))
            })?;
            sync_dir(parent_dir(target))?;
            remove_if_present(new_key)?;
        }
        Err(e) => {
            return Err(CliError::Io(format!(
                "moving {} to {}: {e}",
                new_key.display(),
                target.display()
            )))
        }
    }
    sync_dir(parent_dir(target))?;
    sync_dir(parent_dir(new_key))
}

/// Suffix (before the UTC time) of the name the old master key is kept under.
pub const RETIRED_SUFFIX: &str = ".retired-";

/// Keeps the key in the master key file `target` (the old key) under
/// `<target>.retired-<UTC time>` (0600, file and directory synced) before the new key is
/// moved over it: a hard link to the same file, or where there are none a synced copy. A
/// copy an interrupted run kept already (same content) is used again. Returns its path.
fn keep_old_key(target: &Path) -> Result<PathBuf, CliError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |e: std::io::Error| CliError::Io(format!("keeping the old key: {what}: {e}"))
    };
    let old = Zeroizing::new(std::fs::read(target).map_err(io(target))?);
    let dir = parent_dir(target);
    let name = target
        .file_name()
        .ok_or_else(|| CliError::Usage(format!("{} does not name a file", target.display())))?
        .to_string_lossy()
        .into_owned();
    let prefix = format!("{name}{RETIRED_SUFFIX}");
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let kept = Zeroizing::new(std::fs::read(entry.path()).map_err(io(&entry.path()))?);
        if crate::crypto::ct_eq(&kept, &old) {
            sync_dir(dir)?;
            return Ok(entry.path());
        }
    }
    // A name of its own: another key retired within the same second gets `-2`, `-3`, ….
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let mut n = 1u32;
    let retired = loop {
        let suffix = if n == 1 {
            format!("{RETIRED_SUFFIX}{stamp}")
        } else {
            format!("{RETIRED_SUFFIX}{stamp}-{n}")
        };
        let retired = sibling(target, &suffix)?;
        match std::fs::hard_link(target, &retired) {
            Ok(()) => break retired,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => n += 1,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(io(&retired)(e));
            }
            // A file system without hard links: a copy, owned as the old file (refuses to
            // overwrite: the name is then taken, and the next one tried).
            Err(_) => match keys::write_secret_file(&retired, &old) {
                Ok(()) => {
                    give_owner(&retired, owner(target)?, target)?;
                    break retired;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => n += 1,
                Err(e) => return Err(io(&retired)(e)),
            },
        }
    };
    std::fs::set_permissions(&retired, std::fs::Permissions::from_mode(0o600))
        .map_err(io(&retired))?;
    std::fs::File::open(&retired)
        .and_then(|f| f.sync_all())
        .map_err(io(&retired))?;
    sync_dir(dir)?;
    Ok(retired)
}

/// The principal of the rotation's audit event: `cli:<account>` of the real user id (from
/// /etc/passwd; `cli:uid-<n>` when it has no entry), with `$SUDO_USER` noted when set. The
/// user id comes from the kernel, not from `$USER`, which anyone can set.
pub(crate) fn cli_principal() -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_graphic())
            .take(64)
            .collect()
    };
    let uid = real_uid();
    let base = match uid.and_then(account_name).map(|n| clean(&n)) {
        Some(name) if !name.is_empty() => format!("cli:{name}"),
        _ => match uid {
            Some(uid) => format!("cli:uid-{uid}"),
            None => "cli:uid-unknown".to_string(),
        },
    };
    match std::env::var("SUDO_USER").map(|s| clean(&s)) {
        Ok(sudo) if !sudo.is_empty() => format!("{base} (SUDO_USER={sudo})"),
        _ => base,
    }
}

/// The real user id of this process (Linux: /proc/self/status; else the owner of
/// /proc/self, the effective one).
fn real_uid() -> Option<u32> {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(uid) = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok())
        {
            return Some(uid);
        }
    }
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// The account name of `uid` in /etc/passwd.
fn account_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_string())
    })
}

/// What an offline master key rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateMasterOutcome {
    /// The keys were re-wrapped now (how many) and the new key installed.
    Rotated(usize),
    /// An earlier run had re-wrapped the keys; this run installed the new key.
    Completed,
    /// Everything had been done already.
    NothingToDo,
}

/// Refuses `--data-dir` when it is not the data directory the configuration names and the
/// key is in a file: the new key would be installed over that file, and the configured data
/// directory, still under the old key, could not be opened any more.
fn check_data_dir(setup: &MasterKeySetup, dev: bool) -> Result<(), CliError> {
    let MasterKeySource::File(key_file) = &setup.source else {
        return Ok(());
    };
    let same = match (
        std::fs::canonicalize(&setup.data_dir),
        std::fs::canonicalize(&setup.configured_data_dir),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => setup.data_dir == setup.configured_data_dir,
    };
    if same {
        return Ok(());
    }
    let (named, how) = if dev {
        (
            "the dev-mode data directory",
            "run the command in a directory that holds it as ./data with its own key in ./keys/master.key",
        )
    } else {
        (
            "the data directory the configuration names",
            "give it a configuration of its own (a copy with data_dir naming it and master_key_file naming a copy of its key) and pass that with --config",
        )
    };
    Err(CliError::Usage(format!(
        "--data-dir {} is not {named} ({}): the new key would be installed over the master key file {}, which {} uses, and that directory could not be opened any more. Nothing was changed. To rotate the master key of {}, {how}",
        setup.data_dir.display(),
        setup.configured_data_dir.display(),
        key_file.display(),
        setup.configured_data_dir.display(),
        setup.data_dir.display(),
    )))
}

/// Rotates the master key of `setup`'s data directory to the key in `new_key` (created when
/// absent), installs it, and prints what happened to `out`. See [`KeysCommand::RotateMaster`].
/// `dev` says the setup is the dev-mode layout (for messages only).
pub async fn rotate_master_with(
    setup: MasterKeySetup,
    new_key: &Path,
    principal: &str,
    dev: bool,
    out: &mut dyn Write,
) -> Result<RotateMasterOutcome, CliError> {
    // A bare file name is in the current directory (which is then synced by name).
    let new_key = if new_key.parent().is_some_and(|p| p.as_os_str().is_empty()) {
        Path::new(".").join(new_key)
    } else {
        new_key.to_path_buf()
    };
    check_data_dir(&setup, dev)?;
    // First the data directory: a running server holds it, and then nothing may change.
    let store = open_store(&setup.data_dir, STOP_SERVER_FIRST)?;
    let result = rotate_master_in(&store, setup, &new_key, principal).await;
    // Release the data directory before reporting.
    drop(store);
    let (outcome, message) = result?;
    out.write_all(message.as_bytes()).map_err(output_error)?;
    Ok(outcome)
}

fn key_error(e: keys::KeyError) -> CliError {
    CliError::Io(format!("the data directory's keys: {e}"))
}

/// The error `e` of a step after the data directory went under the new key: says so, and
/// what to do.
fn after_commit(e: CliError, new_path: &Path, target: Option<&Path>, data_dir: &Path) -> CliError {
    let key = match target {
        Some(t) => format!(
            "{} (or, if that file is gone, already in {})",
            new_path.display(),
            t.display()
        ),
        None => new_path.display().to_string(),
    };
    CliError::Io(format!(
        "{e}\nThe data directory {} is now under the new master key in {key}: keep that file (without it no record can be read), and run the same command again to finish.",
        data_dir.display()
    ))
}

async fn rotate_master_in(
    store: &SledStore,
    setup: MasterKeySetup,
    new_path: &Path,
    principal: &str,
) -> Result<(RotateMasterOutcome, String), CliError> {
    let MasterKeySetup {
        data_dir,
        source,
        key: old,
        ..
    } = setup;
    let receipt = sibling(new_path, RECEIPT_SUFFIX)?;
    let current = match &source {
        MasterKeySource::File(p) => format!("the current master key in {}", p.display()),
        MasterKeySource::Env => format!("the current master key in {MASTER_KEY_ENV}"),
    };
    // The real master key file (where the new key goes), and its owner.
    let target = match &source {
        MasterKeySource::File(p) => {
            let real = std::fs::canonicalize(p)
                .map_err(|e| CliError::Io(format!("{}: {e}", p.display())))?;
            if new_path.exists() {
                let new_real = std::fs::canonicalize(new_path)
                    .map_err(|e| CliError::Io(format!("--new-key {}: {e}", new_path.display())))?;
                if new_real == real {
                    return Err(CliError::Usage(format!(
                        "--new-key {} is the current master key file: name a new file (it is created if absent)",
                        new_path.display()
                    )));
                }
            }
            let owner = owner(&real)?;
            Some((real, owner))
        }
        MasterKeySource::Env => None,
    };

    let mut note = String::new();
    if !new_path.exists() {
        // No new key to load: finished before (the receipt names the current key), or a new
        // rotation. Nothing is created unless the current key opens the data directory.
        let named = receipt_fingerprint(&receipt)?;
        let opens = keys::which_master_key(store, &old, &old)
            .await
            .map_err(key_error)?
            == Some(true);
        match (opens, named) {
            (true, Some(f)) if f == old.fingerprint() => {
                // The run may have crashed before it synced the directories.
                if let Some((real, _)) = &target {
                    sync_dir(parent_dir(real))?;
                }
                sync_dir(parent_dir(new_path))?;
                let where_ = match &source {
                    MasterKeySource::File(p) => p.display().to_string(),
                    MasterKeySource::Env => MASTER_KEY_ENV.to_string(),
                };
                return Ok((
                    RotateMasterOutcome::NothingToDo,
                    format!(
                        "nothing to do: the master key was already rotated: {where_} holds the key the receipt {} names, and it opens the data directory {}.\nTo rotate again, pass another --new-key path (or delete the receipt).\n",
                        receipt.display(),
                        data_dir.display()
                    ),
                ));
            }
            (true, _) => {
                if receipt.exists() {
                    note = format!(
                        "note: the receipt {} is from an earlier rotation (it names another key than the current one): this is a new rotation.\n",
                        receipt.display()
                    );
                }
            }
            (false, named) => {
                let hint = if named.as_deref() == Some(old.fingerprint().as_str()) {
                    format!(
                        "; the receipt {} names this very key (was the data directory restored from a copy under another key?)",
                        receipt.display()
                    )
                } else if named.is_some() {
                    format!(
                        "; the receipt {} names the key an earlier run of this command put under it: make that key the current one (in {}) and run the command again",
                        receipt.display(),
                        match &source {
                            MasterKeySource::File(p) => p.display().to_string(),
                            MasterKeySource::Env => MASTER_KEY_ENV.to_string(),
                        }
                    )
                } else {
                    " (a wrong key, or no vault in it)".to_string()
                };
                return Err(CliError::Usage(format!(
                    "{current} does not open the data directory {}{hint}. Nothing was changed (--new-key {} does not exist, and none was created)",
                    data_dir.display(),
                    new_path.display()
                )));
            }
        }
    }

    let (new, created) = load_or_create_new_key(new_path)?;
    let which = keys::which_master_key(store, &old, &new)
        .await
        .map_err(key_error)?;
    let same = old.fingerprint() == new.fingerprint();
    // Before the commit: the directories the key and the receipt go to can be written, and
    // the new key file can be given the owner of the file it replaces.
    let prepare = || -> Result<(), CliError> {
        if let Some((real, target_owner)) = &target {
            probe_writable(
                parent_dir(real),
                "the new master key is installed there, the old one kept there",
            )?;
            give_owner(new_path, *target_owner, real)?;
        }
        probe_writable(
            parent_dir(new_path),
            "the --new-key file is moved from there, its receipt written there",
        )
    };
    let post = |e: CliError| {
        after_commit(
            e,
            new_path,
            target.as_ref().map(|(r, _)| r.as_path()),
            &data_dir,
        )
    };
    let outcome = match which {
        Some(true) if !same => {
            prepare().map_err(|e| {
                CliError::Io(format!(
                    "{e}. Nothing was changed: the data directory is still under the current key"
                ))
            })?;
            let mut draft = Draft::new(ROTATE_MASTER_ACTION, principal, ROTATE_MASTER_ROLE);
            draft.outcome = Outcome::Ok.as_str().to_string();
            let count = keys::rotate_master(store, &old, &new, vec![draft.encode()])
                .await
                .map_err(|e| {
                    CliError::Io(format!(
                        "re-wrapping the keys failed, nothing was changed: {e}"
                    ))
                })?;
            RotateMasterOutcome::Rotated(count)
        }
        Some(true) => {
            // The current key is the new one.
            let named = receipt_fingerprint(&receipt)?;
            match &target {
                // Moved across file systems by an earlier run that stopped before removing
                // --new-key: the master key file holds the new key already.
                Some(_) if named.as_deref() == Some(new.fingerprint().as_str()) => {
                    prepare().map_err(post)?;
                    RotateMasterOutcome::Completed
                }
                Some(_) => {
                    return Err(CliError::Usage(format!(
                        "--new-key {} holds the current master key: name a new file (it is created if absent)",
                        new_path.display()
                    )));
                }
                None => {
                    prepare()?;
                    write_receipt(
                        &receipt,
                        &format!(
                            "the data directory {} is under the key in {}, which {MASTER_KEY_ENV} holds",
                            data_dir.display(),
                            new_path.display()
                        ),
                        &new.fingerprint(),
                    )?;
                    return Ok((
                        RotateMasterOutcome::NothingToDo,
                        format!(
                            "nothing to do: the master key was already rotated: {MASTER_KEY_ENV} holds the key in {}, and it opens the data directory {}\n",
                            new_path.display(),
                            data_dir.display()
                        ),
                    ));
                }
            }
        }
        Some(false) => {
            prepare().map_err(post)?;
            RotateMasterOutcome::Completed
        }
        None => {
            return Err(CliError::Usage(format!(
                "neither key opens this data directory ({}): {current} and --new-key {} both fail its key check",
                data_dir.display(),
                if created {
                    format!("{} (just created)", new_path.display())
                } else {
                    new_path.display().to_string()
                }
            )))
        }
    };

    // The data directory is under the new key now: every error from here on says so.
    let message = finish(
        store,
        &new,
        same,
        &source,
        target.as_ref(),
        new_path,
        &receipt,
        &data_dir,
        &outcome,
    )
    .await
    .map_err(post)?;
    Ok((outcome, format!("{note}{message}")))
}

/// After the commit: proves that the new key opens the key ring, keeps the old key file and
/// installs the new one (key file mode), writes the receipt; returns the report.
#[allow(clippy::too_many_arguments)]
async fn finish(
    store: &SledStore,
    new: &MasterKey,
    same: bool,
    source: &MasterKeySource,
    target: Option<&(PathBuf, (u32, u32))>,
    new_path: &Path,
    receipt: &Path,
    data_dir: &Path,
    outcome: &RotateMasterOutcome,
) -> Result<String, CliError> {
    // Proof before anything is moved: the new key opens every key it now wraps (the store
    // has its key check value, so this only reads).
    KeyRing::open(store, new).await.map_err(|e| {
        CliError::Io(format!(
            "the new key does not open the re-wrapped keys: {e}"
        ))
    })?;
    let fingerprint = new.fingerprint();
    let done = match outcome {
        RotateMasterOutcome::Rotated(n) => format!(
            "master key rotated: {} re-wrapped under the new key",
            plural(*n as u64, "key")
        ),
        _ => "master key rotated: the keys were re-wrapped under the new key by an earlier run"
            .to_string(),
    };
    match (source, target) {
        (MasterKeySource::File(p), Some((real, target_owner))) => {
            write_receipt(
                receipt,
                &format!(
                    "installing the new master key from {} as {} (the data directory {} is under it)",
                    new_path.display(),
                    p.display(),
                    data_dir.display()
                ),
                &fingerprint,
            )?;
            // The master key file holds the new key already when an earlier run copied it
            // across file systems: its old key was kept then.
            let kept = if same {
                None
            } else {
                Some(keep_old_key(real)?)
            };
            install_key_file(new_path, real, *target_owner)?;
            write_receipt(
                receipt,
                &format!(
                    "installed the new master key from {} as {} (the data directory {} is under it)",
                    new_path.display(),
                    p.display(),
                    data_dir.display()
                ),
                &fingerprint,
            )?;
            let kept = match kept {
                Some(k) => format!("The old key is kept in {} (0600). ", k.display()),
                None => String::new(),
            };
            Ok(format!(
                "{done}; {} now holds the new key; the old key no longer opens the data directory {}.\n{kept}Start the server with the new key, then destroy every copy of the old key ({}{RETIRED_SUFFIX}*, backups too). Back up {} offline: without it no record can be read.\n",
                p.display(),
                data_dir.display(),
                real.display(),
                p.display()
            ))
        }
        _ => {
            write_receipt(
                receipt,
                &format!(
                    "the data directory {} is under the key in {}: set {MASTER_KEY_ENV} to it",
                    data_dir.display(),
                    new_path.display()
                ),
                &fingerprint,
            )?;
            Ok(format!(
                "{done}; the old key no longer opens the data directory {}.\nSet {MASTER_KEY_ENV} to the content of {} (64 hex digits) before starting the server; keep {} as the offline backup of the new key.\nStart the server with the new key, then destroy every copy of the old key (backups too).\n",
                data_dir.display(),
                new_path.display(),
                new_path.display()
            ))
        }
    }
}

/// `kluis keys rotate-master`.
pub async fn rotate_master(args: &RotateMasterArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let setup = resolve_setup(args)?;
    rotate_master_with(setup, &args.new_key, &cli_principal(), args.dev, out)
        .await
        .map(drop)
}

// ---------------------------------------------------------------------------------------
// Commands

/// Runs a keys command, writing its result to `out` (errors are for the caller to print as
/// `error: …`; a refused call's text carries the gRPC code name, see
/// [`code_name`](super::audit::code_name)).
pub async fn run(command: &KeysCommand, out: &mut dyn Write) -> Result<(), CliError> {
    let result = match command {
        KeysCommand::Status(args) => status(args, out).await,
        KeysCommand::Rotate(args) => rotate(args, out).await,
        KeysCommand::Rewrap(args) => rewrap(args, out).await,
        KeysCommand::Rekey(args) => rekey(args, out).await,
        KeysCommand::Retire(args) => retire(args, out).await,
        KeysCommand::RotateMaster(args) => rotate_master(args, out).await,
    };
    let flushed = out.flush().map_err(output_error);
    match result.and(flushed) {
        Err(CliError::OutputClosed) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;
    use crate::keys::KeyRing;

    fn version(v: u32, state: &str, created: Option<i64>, records: u64) -> proto::KeyVersion {
        proto::KeyVersion {
            version: v,
            state: state.into(),
            created: created.map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
            records,
        }
    }

    fn sample_status() -> proto::KeyStatus {
        proto::KeyStatus {
            categories: vec![
                proto::CategoryKeys {
                    category: "contact".into(),
                    active_version: 1,
                    versions: vec![version(1, "active", Some(86_400), 12)],
                },
                proto::CategoryKeys {
                    category: "identity".into(),
                    active_version: 2,
                    versions: vec![
                        version(2, "active", Some(172_800), 0),
                        version(1, "decrypt_only", None, 1234),
                    ],
                },
            ],
            last_job: Some(proto::KeyJob {
                kind: "rekey".into(),
                category: "identity".into(),
                done: 1234,
                total: 1234,
                started: Some(prost_types::Timestamp {
                    seconds: 172_800,
                    nanos: 0,
                }),
                finished: Some(prost_types::Timestamp {
                    seconds: 172_860,
                    nanos: 0,
                }),
                error: String::new(),
                requested_by: "sec-1".into(),
            }),
        }
    }

    #[test]
    fn the_status_table_lines_up_and_marks_the_active_version() {
        let table = render_status(&sample_status());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "CATEGORY  VERSION  STATE         CREATED               RECORDS"
        );
        assert_eq!(
            lines[1],
            "contact   1 *      active        1970-01-02T00:00:00Z       12"
        );
        // Versions in order; an unknown creation time is `-`.
        assert_eq!(
            lines[2],
            "identity  1        decrypt_only  -                        1234"
        );
        assert_eq!(
            lines[3],
            "identity  2 *      active        1970-01-03T00:00:00Z        0"
        );
        assert!(lines[4].starts_with("* the active version"));
        assert_eq!(
            lines[5],
            "last key job: rekey of identity, 1234 of 1234 records, started 1970-01-03T00:00:00Z by sec-1, finished 1970-01-03T00:01:00Z"
        );
    }

    #[test]
    fn the_status_json_is_one_document() {
        let v: serde_json::Value =
            serde_json::from_str(&status_json(&sample_status())).expect("json");
        assert_eq!(v["categories"][1]["category"], "identity");
        assert_eq!(v["categories"][1]["active_version"], 2);
        assert_eq!(v["categories"][1]["versions"][0]["version"], 1);
        assert_eq!(
            v["categories"][1]["versions"][0]["created"],
            serde_json::Value::Null
        );
        assert_eq!(v["categories"][1]["versions"][0]["records"], 1234);
        assert_eq!(
            v["categories"][1]["versions"][1]["created"],
            "1970-01-03T00:00:00Z"
        );
        assert_eq!(v["last_job"]["kind"], "rekey");
        assert_eq!(v["last_job"]["finished"], "1970-01-03T00:01:00Z");
        assert_eq!(v["last_job"]["error"], serde_json::Value::Null);
    }

    fn progress(category: &str, done: u64, total: u64, finished: bool) -> proto::RewrapProgress {
        proto::RewrapProgress {
            category: category.into(),
            done,
            total,
            finished,
        }
    }

    #[test]
    fn progress_draws_a_bar_on_a_terminal_and_lines_otherwise() {
        let view = ProgressView::new(Vec::new(), "rewrap", true);
        assert_eq!(
            view.bar(&progress("identity", 1200, 5000, false)),
            format!(
                "rewrap identity [{}{}] 1200/5000 24%",
                "#".repeat(7),
                "-".repeat(23)
            )
        );
        assert_eq!(
            view.bar(&progress("", 0, 0, true)),
            format!("rewrap every category [{}] 0/0 100%", "#".repeat(30))
        );

        let mut lines = ProgressView::new(Vec::new(), "rekey", false);
        lines.update(&progress("cv", 0, 10, false));
        // Within a second of the last line: not shown; the finished one always is.
        lines.update(&progress("cv", 5, 10, false));
        lines.update(&progress("cv", 10, 10, true));
        // The same state again (an empty job's first and finished message): shown once.
        lines.update(&progress("cv", 10, 10, true));
        lines.end();
        let text = String::from_utf8(lines.into_sink()).expect("utf-8");
        assert_eq!(text, "rekey cv: 0/10\nrekey cv: 10/10\n");

        let mut bar = ProgressView::new(Vec::new(), "rewrap", true);
        bar.update(&progress("cv", 10, 100, false));
        bar.update(&progress("cv", 100, 100, true));
        bar.end();
        let text = String::from_utf8(bar.into_sink()).expect("utf-8");
        assert!(text.starts_with("\rrewrap cv ["), "{text:?}");
        assert!(text.ends_with("100/100 100%\n"), "{text:?}");
    }

    /// A data directory whose keys were made with the key in `keys/master.key`.
    async fn vault_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let key_file = dir.path().join("keys").join("master.key");
        let master = MasterKey::create_file(&key_file).expect("key file");
        let store = SledStore::open(&data).expect("open");
        KeyRing::open(&store, &master).await.expect("keys made");
        drop(store);
        (dir, data, key_file)
    }

    fn file_setup(data: &Path, key_file: &Path) -> MasterKeySetup {
        MasterKeySetup {
            data_dir: data.to_path_buf(),
            configured_data_dir: data.to_path_buf(),
            source: MasterKeySource::File(key_file.to_path_buf()),
            key: MasterKey::load_file(key_file).expect("current key"),
        }
    }

    /// Runs a rotation (principal `t`, not dev) that must be refused; `why` names the case.
    async fn rotation_refused(setup: MasterKeySetup, new_key: &Path, why: &str) -> CliError {
        rotate_master_with(setup, new_key, "t", false, &mut Vec::new())
            .await
            .expect_err(why)
    }

    async fn opens(data: &Path, key_file: &Path) -> bool {
        let store = SledStore::open(data).expect("open");
        let key = MasterKey::load_file(key_file).expect("key");
        KeyRing::open(&store, &key).await.is_ok()
    }

    #[tokio::test]
    async fn rotate_master_installs_the_new_key_and_then_does_nothing() {
        let (dir, data, key_file) = vault_dir().await;
        let old_copy = dir.path().join("old.key");
        std::fs::copy(&key_file, &old_copy).expect("copy");
        let new_key = dir.path().join("new.key");
        let mut out = Vec::new();
        let outcome = rotate_master_with(
            file_setup(&data, &key_file),
            &new_key,
            "cli:t",
            false,
            &mut out,
        )
        .await
        .expect("rotated");
        assert_eq!(outcome, RotateMasterOutcome::Rotated(6 + 2));
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains("8 keys re-wrapped"), "{text}");
        assert!(text.contains("destroy every copy of the old key"), "{text}");
        assert!(!new_key.exists(), "moved into place");
        // The old key is kept (0600), not overwritten.
        let kept = retired(&key_file);
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert!(text.contains(&kept[0].display().to_string()), "{text}");
        assert_eq!(
            std::fs::read(&kept[0]).expect("kept"),
            std::fs::read(&old_copy).expect("old")
        );
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&kept[0])
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The receipt names the new key by its fingerprint, never the key.
        let receipt_text =
            std::fs::read_to_string(sibling(&new_key, RECEIPT_SUFFIX).expect("name"))
                .expect("receipt");
        let installed = MasterKey::load_file(&key_file).expect("installed");
        assert!(
            receipt_text.contains(&installed.fingerprint()),
            "{receipt_text}"
        );
        let key_hex = std::fs::read_to_string(&key_file).expect("key");
        assert!(!receipt_text.contains(key_hex.trim()), "{receipt_text}");
        assert!(sibling(&new_key, RECEIPT_SUFFIX).expect("name").exists());
        assert!(opens(&data, &key_file).await, "the installed key opens");
        assert!(!opens(&data, &old_copy).await, "the old key does not");

        let mut out = Vec::new();
        let again = rotate_master_with(
            file_setup(&data, &key_file),
            &new_key,
            "cli:t",
            false,
            &mut out,
        )
        .await
        .expect("repeat");
        assert_eq!(again, RotateMasterOutcome::NothingToDo);
        assert!(!new_key.exists(), "no new key was made");
        assert!(opens(&data, &key_file).await);
        assert_eq!(retired(&key_file).len(), 1);

        // The audit event of the rotation is in the chain.
        let store = SledStore::open(&data).expect("open");
        let page = crate::audit::query(&store, &crate::audit::Filter::default(), 0, 100)
            .await
            .expect("query");
        let event = page
            .events
            .iter()
            .find(|e| e.draft.action == ROTATE_MASTER_ACTION)
            .expect("event");
        assert_eq!(event.draft.principal, "cli:t");
        assert_eq!(event.draft.role, ROTATE_MASTER_ROLE);
        assert_eq!(event.draft.outcome, "ok");
    }

    #[tokio::test]
    async fn rotate_master_finishes_what_an_interrupted_run_started() {
        // Committed, not installed: the new key opens the data, the old file still has the
        // old key.
        let (dir, data, key_file) = vault_dir().await;
        let new_key = dir.path().join("new.key");
        let new = MasterKey::create_file(&new_key).expect("new key");
        {
            let store = SledStore::open(&data).expect("open");
            let old = MasterKey::load_file(&key_file).expect("old");
            keys::rotate_master(&store, &old, &new, Vec::new())
                .await
                .expect("rotated");
        }
        let mut out = Vec::new();
        let outcome = rotate_master_with(
            file_setup(&data, &key_file),
            &new_key,
            "cli:t",
            false,
            &mut out,
        )
        .await
        .expect("finished");
        assert_eq!(outcome, RotateMasterOutcome::Completed);
        assert!(opens(&data, &key_file).await);
        assert!(!new_key.exists());

        // Copied across file systems, not yet removed: both files hold the new key.
        let (dir, data, key_file) = vault_dir().await;
        let new_key = dir.path().join("new.key");
        rotate_master_with(
            file_setup(&data, &key_file),
            &new_key,
            "cli:t",
            false,
            &mut Vec::new(),
        )
        .await
        .expect("rotated");
        std::fs::copy(&key_file, &new_key).expect("copy back");
        let outcome = rotate_master_with(
            file_setup(&data, &key_file),
            &new_key,
            "cli:t",
            false,
            &mut Vec::new(),
        )
        .await
        .expect("finished");
        assert_eq!(outcome, RotateMasterOutcome::Completed);
        assert!(!new_key.exists());
        assert!(opens(&data, &key_file).await);

        // A half-written new key file from a killed run is replaced.
        let (dir, data, key_file) = vault_dir().await;
        let new_key = dir.path().join("new.key");
        std::fs::write(sibling(&new_key, PARTIAL_SUFFIX).expect("name"), "12").expect("partial");
        rotate_master_with(
            file_setup(&data, &key_file),
            &new_key,
            "cli:t",
            false,
            &mut Vec::new(),
        )
        .await
        .expect("rotated");
        assert!(!sibling(&new_key, PARTIAL_SUFFIX).expect("name").exists());
        assert!(opens(&data, &key_file).await);
    }

    #[tokio::test]
    async fn rotate_master_refuses_what_it_cannot_do() {
        let (dir, data, key_file) = vault_dir().await;
        // The current key as the new one: by path, or a copy of it.
        let err = rotation_refused(file_setup(&data, &key_file), &key_file, "same file").await;
        assert_eq!(err.exit_code(), EXIT_USAGE);
        let copy = dir.path().join("copy.key");
        std::fs::copy(&key_file, &copy).expect("copy");
        let err = rotation_refused(file_setup(&data, &key_file), &copy, "same key").await;
        assert!(err.to_string().contains("current master key"), "{err}");
        assert!(copy.exists(), "a copy of the current key is never removed");

        // Neither key opens it.
        let stranger = dir.path().join("stranger.key");
        MasterKey::create_file(&stranger).expect("key");
        let setup = MasterKeySetup {
            key: MasterKey::load_file(&stranger).expect("key"),
            ..file_setup(&data, &key_file)
        };
        let err = rotation_refused(setup, &dir.path().join("n.key"), "neither").await;
        assert_eq!(err.exit_code(), EXIT_USAGE);
        // Found before a new key is made.
        assert!(err.to_string().contains("does not open"), "{err}");
        assert!(!dir.path().join("n.key").exists(), "no key was made");
        // And with a new key given: neither opens it.
        let given = dir.path().join("given.key");
        MasterKey::create_file(&given).expect("key");
        let setup = MasterKeySetup {
            key: MasterKey::load_file(&stranger).expect("key"),
            ..file_setup(&data, &key_file)
        };
        let err = rotation_refused(setup, &given, "neither").await;
        assert_eq!(err.exit_code(), EXIT_USAGE);
        assert!(err.to_string().contains("neither key"), "{err}");

        // Another data directory than the configured one (a restored copy, say): its key
        // file is the configured directory's too. Refused before anything is made.
        let setup = MasterKeySetup {
            data_dir: dir.path().join("elsewhere"),
            ..file_setup(&data, &key_file)
        };
        let err =
            rotation_refused(setup, &dir.path().join("o.key"), "another data directory").await;
        assert_eq!(err.exit_code(), EXIT_USAGE);
        assert!(err.to_string().contains("--data-dir"), "{err}");
        assert!(!dir.path().join("o.key").exists(), "nothing made");

        // A data directory in use.
        let held = SledStore::open(&data).expect("open");
        let err = rotation_refused(
            file_setup(&data, &key_file),
            &dir.path().join("m.key"),
            "in use",
        )
        .await;
        assert_eq!(err.exit_code(), EXIT_USAGE);
        assert!(err.to_string().contains("in use"), "{err}");
        assert!(!dir.path().join("m.key").exists(), "nothing made");
        drop(held);
        assert!(opens(&data, &key_file).await, "nothing changed");
    }

    #[tokio::test]
    async fn with_the_key_in_the_environment_the_new_file_stays() {
        let (dir, data, key_file) = vault_dir().await;
        let env_setup = |key: SecretKey| MasterKeySetup {
            data_dir: data.clone(),
            configured_data_dir: data.clone(),
            source: MasterKeySource::Env,
            key: MasterKey::from_secret(key),
        };
        let old_hex = std::fs::read_to_string(&key_file).expect("read");
        let old = || SecretKey::from_hex(&old_hex).expect("hex");
        let new_key = dir.path().join("new.key");
        let mut out = Vec::new();
        let outcome = rotate_master_with(env_setup(old()), &new_key, "t", false, &mut out)
            .await
            .expect("rotated");
        assert!(matches!(outcome, RotateMasterOutcome::Rotated(_)));
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains(MASTER_KEY_ENV), "{text}");
        assert!(new_key.exists());
        assert!(opens(&data, &new_key).await);
        // Again with the old key in the variable: says so again; with the new one: done.
        let again = rotate_master_with(env_setup(old()), &new_key, "t", false, &mut Vec::new())
            .await
            .expect("again");
        assert_eq!(again, RotateMasterOutcome::Completed);
        let new_hex = std::fs::read_to_string(&new_key).expect("read");
        let new = SecretKey::from_hex(&new_hex).expect("hex");
        let done = rotate_master_with(env_setup(new), &new_key, "t", false, &mut Vec::new())
            .await
            .expect("done");
        assert_eq!(done, RotateMasterOutcome::NothingToDo);

        // FILE moved offline, as told: with the new key in the variable, still nothing to do
        // (the receipt names it), and no second key is made.
        let offline = dir.path().join("offline.key");
        std::fs::rename(&new_key, &offline).expect("offline");
        let new = || SecretKey::from_hex(&new_hex).expect("hex");
        let done = rotate_master_with(env_setup(new()), &new_key, "t", false, &mut Vec::new())
            .await
            .expect("done");
        assert_eq!(done, RotateMasterOutcome::NothingToDo);
        assert!(!new_key.exists(), "no second new key");
        assert!(opens(&data, &offline).await);
        // With the old key still in the variable: refused, nothing made.
        let err = rotation_refused(env_setup(old()), &new_key, "the old key").await;
        assert_eq!(err.exit_code(), EXIT_USAGE);
        assert!(err.to_string().contains("receipt"), "{err}");
        assert!(!new_key.exists());
        assert!(opens(&data, &offline).await);
    }

    /// The `<key file>.retired-*` files beside `key_file`.
    fn retired(key_file: &Path) -> Vec<PathBuf> {
        let prefix = format!(
            "{}{RETIRED_SUFFIX}",
            key_file.file_name().expect("name").to_string_lossy()
        );
        let mut found: Vec<PathBuf> = std::fs::read_dir(parent_dir(key_file))
            .expect("list")
            .map(|e| e.expect("entry").path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            })
            .collect();
        found.sort();
        found
    }

    async fn rotate(data: &Path, key_file: &Path, new_key: &Path) -> RotateMasterOutcome {
        rotate_master_with(
            file_setup(data, key_file),
            new_key,
            "t",
            false,
            &mut Vec::new(),
        )
        .await
        .expect("rotated")
    }

    #[tokio::test]
    async fn a_stale_receipt_does_not_skip_a_new_rotation() {
        let (dir, data, key_file) = vault_dir().await;
        let new_key = dir.path().join("new.key");
        let other = dir.path().join("other.key");
        let first = rotate(&data, &key_file, &new_key).await;
        assert!(matches!(first, RotateMasterOutcome::Rotated(_)));
        // A later rotation with another path: new.key.installed now names an earlier key.
        rotate(&data, &key_file, &other).await;
        let before = std::fs::read(&key_file).expect("key");
        let mut out = Vec::new();
        let third =
            rotate_master_with(file_setup(&data, &key_file), &new_key, "t", false, &mut out)
                .await
                .expect("third");
        assert!(
            matches!(third, RotateMasterOutcome::Rotated(_)),
            "{third:?}"
        );
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains("earlier rotation"), "{text}");
        assert_ne!(std::fs::read(&key_file).expect("key"), before, "rotated");
        assert!(opens(&data, &key_file).await);
        // Every old key is kept.
        assert_eq!(retired(&key_file).len(), 3);
    }

    #[tokio::test]
    async fn a_key_directory_that_cannot_be_written_is_found_before_the_commit() {
        let (dir, data, key_file) = vault_dir().await;
        let new_key = dir.path().join("new.key");
        // Something in the way of the probe (a non-empty directory of its name): to the tool
        // as good as a read-only directory, whatever the user (root ignores modes).
        let probe = parent_dir(&key_file).join(".kluis-rotate-master.probe");
        std::fs::create_dir_all(probe.join("x")).expect("obstacle");
        let err = rotation_refused(file_setup(&data, &key_file), &new_key, "not writable").await;
        assert_eq!(err.exit_code(), EXIT_USAGE);
        let text = err.to_string();
        assert!(text.contains("cannot write in"), "{text}");
        assert!(text.contains("Nothing was changed"), "{text}");
        assert!(opens(&data, &key_file).await, "still under the old key");

        // The same after a commit (an earlier run committed and stopped): the error says the
        // data are under the new key, to keep it, and to run the command again.
        {
            let store = SledStore::open(&data).expect("open");
            let old = MasterKey::load_file(&key_file).expect("old");
            let new = MasterKey::load_file(&new_key).expect("new");
            keys::rotate_master(&store, &old, &new, Vec::new())
                .await
                .expect("rotated");
        }
        let err = rotation_refused(file_setup(&data, &key_file), &new_key, "not writable").await;
        let text = err.to_string();
        assert!(text.contains("is now under the new master key"), "{text}");
        assert!(text.contains(&new_key.display().to_string()), "{text}");
        assert!(text.contains("run the same command again"), "{text}");
        assert!(new_key.exists(), "kept");
        assert!(
            !sibling(&new_key, RECEIPT_SUFFIX).expect("name").exists(),
            "no receipt before the key is installed"
        );

        std::fs::remove_dir_all(&probe).expect("cleared");
        let done = rotate(&data, &key_file, &new_key).await;
        assert_eq!(done, RotateMasterOutcome::Completed);
        assert!(opens(&data, &key_file).await);
        assert_eq!(retired(&key_file).len(), 1);
    }

    #[tokio::test]
    async fn the_new_key_file_gets_the_owner_of_the_old_one() {
        use std::os::unix::fs::MetadataExt;
        let (dir, data, key_file) = vault_dir().await;
        // The service user's key file (only root can give a file away: elsewhere this cannot
        // be tried).
        if std::os::unix::fs::chown(&key_file, Some(4242), Some(4243)).is_err() {
            return;
        }
        let new_key = dir.path().join("new.key");
        rotate(&data, &key_file, &new_key).await;
        let meta = std::fs::metadata(&key_file).expect("meta");
        assert_eq!((meta.uid(), meta.gid()), (4242, 4243));
        assert!(opens(&data, &key_file).await);
    }

    #[test]
    fn the_principal_is_the_real_users_account() {
        let principal = cli_principal();
        assert!(principal.starts_with("cli:"), "{principal}");
        let uid = real_uid().expect("a uid");
        match account_name(uid) {
            Some(name) => assert!(principal.starts_with(&format!("cli:{name}")), "{principal}"),
            None => assert!(
                principal.starts_with(&format!("cli:uid-{uid}")),
                "{principal}"
            ),
        }
    }
}

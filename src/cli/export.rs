//! `kluis export RECORD_ID`: a record's data-subject export, written to a file.
//!
//! Asks a running server for the record's export document (`kluis.v1.Records/ExportRecord`,
//! bearer token of a role with the records `export` right, e.g. `privacy_officer`, in
//! `$KLUIS_TOKEN`) and writes it to `--out FILE` (default `export-<RECORD_ID>.json` in the
//! current directory), mode 0600: the document holds every field of the record in full.
//!
//! The file appears whole or not at all: the document is written to a temporary file in the
//! same directory, synced, and then linked (or, with `--force`, renamed) into place. Without
//! `--force` an existing file is never touched. Only a summary is printed (the path, the size
//! and how many fields and access events the document holds), never a field value.
//!
//! Exit codes: 0 ok; [`EXIT_FAILED`] when the server refuses the call; [`EXIT_USAGE`] for
//! usage, IO and connection errors.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::de::IgnoredAny;
use serde::Deserialize;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::audit::{
    channel, default_server, output_error, parse_record_id, BearerToken, CliError, TOKEN_ENV,
};
use crate::proto;
use crate::proto::records_client::RecordsClient;

pub use super::audit::{EXIT_FAILED, EXIT_USAGE};

/// The exit codes, for `--help`.
pub const EXIT_CODES: &str = "Exit codes:\n  0  ok\n  1  the server refused the call (its gRPC status is printed), e.g. PERMISSION_DENIED for a\n     role without the export right, NOT_FOUND for an unknown record\n  2  usage, IO or connection error (also: the output file exists and --force was not given, or\n     no gRPC answer came back)";

/// The RPC this command calls, as named in refusals.
const METHOD: &str = "ExportRecord";

/// The `format` of a record export document.
pub const EXPORT_FORMAT: &str = "kluis.record-export";

/// Largest gRPC response accepted: whatever the server may send (an export holds every blob
/// of the record, base64-encoded; the server answers up to twice its `max_request_bytes`).
const MAX_RESPONSE_BYTES: usize = 2 * crate::config::MAX_REQUEST_BYTES_LIMIT;

/// Suffix of the temporary file the export is written to before it is moved into place.
const PARTIAL_SUFFIX: &str = ".partial";

// ---------------------------------------------------------------------------------------
// Arguments

/// `kluis export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The record to export (its id, a UUID).
    #[arg(value_name = "RECORD_ID", value_parser = parse_record_id)]
    pub record_id: String,
    /// Where to write the export (created with mode 0600) [default: export-<RECORD_ID>.json in
    /// the current directory].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Replace FILE if it exists (without it an existing file is an error and stays as it is).
    #[arg(long)]
    pub force: bool,
    /// The running server, sent $KLUIS_TOKEN as the bearer token (a role with the records
    /// `export` right, e.g. privacy_officer) [default: http://127.0.0.1:50051].
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate, for an https:// --server.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
}

impl ExportArgs {
    /// The output file: `--out`, or `export-<RECORD_ID>.json` in the current directory.
    pub fn out_path(&self) -> PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| default_out(&self.record_id))
    }
}

/// `export-<RECORD_ID>.json`.
pub fn default_out(record_id: &str) -> PathBuf {
    PathBuf::from(format!("export-{record_id}.json"))
}

// ---------------------------------------------------------------------------------------
// Connecting

/// The gRPC client of the `Records` service, authenticated by a bearer token.
pub type Client = RecordsClient<InterceptedService<Channel, BearerToken>>;

/// The bearer token in `$KLUIS_TOKEN` (a usage error when unset or empty).
pub fn token_from_env() -> Result<BearerToken, CliError> {
    let missing = || {
        CliError::Usage(format!(
            "{TOKEN_ENV} is not set: exporting a record needs the bearer token of a role with the records export right (e.g. privacy_officer) in {TOKEN_ENV}"
        ))
    };
    let token = Zeroizing::new(std::env::var(TOKEN_ENV).map_err(|_| missing())?);
    if token.trim().is_empty() {
        return Err(missing());
    }
    BearerToken::new(&token)
}

/// Connects to the server `args` name, with the token in `$KLUIS_TOKEN`.
pub async fn connect(args: &ExportArgs) -> Result<Client, CliError> {
    let url = args.server.clone().unwrap_or_else(default_server);
    let token = token_from_env()?;
    let channel = channel(&url, args.ca_cert.as_deref()).await?;
    Ok(RecordsClient::with_interceptor(channel, token)
        .max_decoding_message_size(MAX_RESPONSE_BYTES))
}

// ---------------------------------------------------------------------------------------
// The document

/// What the summary line says about an export document. Read without keeping any value: the
/// fields are counted by name, the access events skipped over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The document's size in bytes.
    pub bytes: usize,
    /// How many fields it holds.
    pub fields: usize,
    /// How many access events (its `access_history`) it holds.
    pub access_events: usize,
}

/// The parts of an export document the summary needs.
#[derive(Deserialize)]
struct Shape {
    format: String,
    record_id: String,
    #[serde(default)]
    fields: BTreeMap<String, IgnoredAny>,
    #[serde(default)]
    access_history: Vec<IgnoredAny>,
}

/// Checks that `json` is the export document of `record_id` and summarises it.
pub fn summarise(json: &str, record_id: &str) -> Result<Summary, CliError> {
    // serde_json's messages name a line and column, never the text there.
    let shape: Shape = serde_json::from_str(json).map_err(|e| {
        CliError::Io(format!(
            "the server's answer is not a record export document: {e}"
        ))
    })?;
    if shape.format != EXPORT_FORMAT {
        return Err(CliError::Io(format!(
            "the server's answer is not a record export document (format `{}`, expected `{EXPORT_FORMAT}`)",
            shape.format.escape_debug()
        )));
    }
    if shape.record_id != record_id {
        return Err(CliError::Io(format!(
            "the server exported record {} instead of {record_id}",
            shape.record_id.escape_debug()
        )));
    }
    Ok(Summary {
        bytes: json.len(),
        fields: shape.fields.len(),
        access_events: shape.access_history.len(),
    })
}

// ---------------------------------------------------------------------------------------
// Writing the file

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A usage error when `path` cannot be written: its directory does not exist, it is a
/// directory, or (without `force`) it exists.
pub fn check_target(path: &Path, force: bool) -> Result<(), CliError> {
    let dir = parent_dir(path);
    if !dir.is_dir() {
        return Err(CliError::Usage(format!(
            "--out {}: the directory {} does not exist",
            path.display(),
            dir.display()
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Err(CliError::Usage(format!(
            "--out {}: is a directory",
            path.display()
        ))),
        Ok(_) if !force => Err(CliError::Usage(format!(
            "{} exists: nothing was written (use --force to replace it, or --out FILE)",
            path.display()
        ))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CliError::Io(format!("{}: {e}", path.display()))),
    }
}

/// A temporary file, removed when dropped unless it was moved into place.
struct Partial {
    path: PathBuf,
    keep: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.keep {
            // Best effort: the file is 0600, and an error is being reported already.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes `contents` to `path`, mode 0600, whole or not at all: into a new temporary file in
/// the same directory, synced, then linked into place (never over an existing file) or, with
/// `force`, renamed over it; then the directory is synced.
pub fn write_file(path: &Path, contents: &[u8], force: bool) -> Result<(), CliError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    check_target(path, force)?;
    let name = path
        .file_name()
        .ok_or_else(|| CliError::Usage(format!("--out {}: not a file name", path.display())))?;
    let dir = parent_dir(path);
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(
        ".{}{PARTIAL_SUFFIX}",
        uuid::Uuid::new_v4().simple()
    ));
    let mut partial = Partial {
        path: dir.join(temp_name),
        keep: false,
    };
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |e: std::io::Error| CliError::Io(format!("writing {what}: {e}"))
    };
    let mut file: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial.path)
        .map_err(io(&partial.path))?;
    // Exactly 0600, whatever the umask.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io(&partial.path))?;
    file.write_all(contents).map_err(io(&partial.path))?;
    file.sync_all().map_err(io(&partial.path))?;
    drop(file);

    if force {
        std::fs::rename(&partial.path, path).map_err(io(path))?;
        partial.keep = true;
    } else {
        match std::fs::hard_link(&partial.path, path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(CliError::Usage(format!(
                    "{} appeared while the export was being written: nothing was written (use --force to replace it)",
                    path.display()
                )));
            }
            // A file system without hard links: rename (nothing was there: checked above).
            Err(_) => {
                check_target(path, false)?;
                std::fs::rename(&partial.path, path).map_err(io(path))?;
                partial.keep = true;
            }
        }
        // Linked: `partial` removes the temporary name when dropped.
    }
    drop(partial);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CliError::Io(format!("syncing directory {}: {e}", dir.display())))
}

// ---------------------------------------------------------------------------------------
// The command

/// `kluis export`: asks the server for the record's export and writes it to the output file;
/// prints one summary line to `out` (errors are for the caller to print as `error: …`; a
/// refused call's text carries the gRPC code name, see
/// [`code_name`](super::audit::code_name)).
pub async fn run(args: &ExportArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let result = export(args, out).await;
    let flushed = out.flush().map_err(output_error);
    match result.and(flushed) {
        Err(CliError::OutputClosed) => Ok(()),
        other => other,
    }
}

async fn export(args: &ExportArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let path = args.out_path();
    // Before asking the server: an export that could not be written would still be an access
    // to the record in its audit trail.
    check_target(&path, args.force)?;
    let mut client = connect(args).await?;
    let json = Zeroizing::new(
        client
            .export_record(proto::ExportRecordRequest {
                record_id: args.record_id.clone(),
            })
            .await
            .map_err(CliError::status_of(METHOD))?
            .into_inner()
            .json,
    );
    let summary = summarise(&json, &args.record_id)?;
    write_file(&path, json.as_bytes(), args.force)?;
    writeln!(
        out,
        "exported record {} to {} ({}, {}, {})",
        args.record_id,
        path.display(),
        super::audit::plural(summary.bytes as u64, "byte"),
        super::audit::plural(summary.fields as u64, "field"),
        super::audit::plural(summary.access_events as u64, "access event")
    )
    .map_err(output_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const ID: &str = "3f2c9a4e-1b2c-4d5e-8f90-123456789abc";

    fn doc(format: &str, id: &str) -> String {
        serde_json::json!({
            "format": format,
            "version": 1,
            "record_id": id,
            "fields": {
                "full_name": { "text": "Ilse Bakker" },
                "cv_document": { "blob_base64": "JVBERg==", "content_type": "application/pdf" },
            },
            "access_history": [{ "seq": 1 }, { "seq": 2 }, { "seq": 3 }],
        })
        .to_string()
    }

    #[test]
    fn the_summary_counts_fields_and_access_events_and_checks_the_document() {
        let json = doc(EXPORT_FORMAT, ID);
        assert_eq!(
            summarise(&json, ID).expect("summary"),
            Summary {
                bytes: json.len(),
                fields: 2,
                access_events: 3
            }
        );
        for (bad, needle) in [
            (doc("other", ID), "format"),
            (doc(EXPORT_FORMAT, "x"), "instead of"),
            ("{\"fields\": ".to_string(), "not a record export"),
        ] {
            let err = summarise(&bad, ID).expect_err("refused");
            assert_eq!(err.exit_code(), EXIT_USAGE);
            let text = err.to_string();
            assert!(text.contains(needle), "{text}");
            assert!(!text.contains("Ilse"), "{text}");
        }
    }

    #[test]
    fn the_file_is_0600_whole_and_replaced_only_with_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("e.json");
        write_file(&path, b"first", false).expect("written");
        assert_eq!(std::fs::read(&path).expect("read"), b"first");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let err = write_file(&path, b"second", false).expect_err("exists");
        assert_eq!(err.exit_code(), EXIT_USAGE);
        assert_eq!(std::fs::read(&path).expect("read"), b"first");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_file(&path, b"second", true).expect("replaced");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // No temporary file is left behind, and a directory is never a target.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("e.json")]);
        let err = write_file(dir.path(), b"x", true).expect_err("a directory");
        assert!(err.to_string().contains("directory"), "{err}");
        let err = write_file(&dir.path().join("no/such/e.json"), b"x", false).expect_err("no dir");
        assert_eq!(err.exit_code(), EXIT_USAGE);
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn the_default_output_is_named_after_the_record() {
        assert_eq!(default_out(ID), PathBuf::from(format!("export-{ID}.json")));
    }
}

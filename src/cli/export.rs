//! `kluis export RECORD_ID`: a record's data-subject export, written to a file.
//!
//! Asks a running server for the record's export document (`kluis.v1.Records/ExportRecord`,
//! bearer token of a role with the records `export` right, e.g. `privacy_officer`, in
//! `$KLUIS_TOKEN`) and writes it to `--out FILE` (default `export-<RECORD_ID>.json` in the
//! current directory), mode 0600: the document holds every field of the record in full.
//!
//! The file appears whole or not at all: the document is written to a temporary file in the
//! same directory (`.<name>.partial`, created before the server is asked, so that an
//! unwritable directory fails before the export is performed and audited; one left by a
//! killed run is removed), synced, and then linked (or, with `--force`, renamed) into place. Without
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
    /// TLS towards an https:// --server.
    #[command(flatten)]
    pub tls: crate::cli::audit::TlsArgs,
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
    let channel = channel(&url, &args.tls).await?;
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
    // Never serde_json's own message: it may quote a value of the answer (`invalid type:
    // string "…"`). Only what kind of error, and where.
    let shape: Shape = serde_json::from_str(json).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "not JSON",
            serde_json::error::Category::Data | serde_json::error::Category::Io => {
                "not in the shape of one"
            }
        };
        CliError::Io(format!(
            "the server's answer is not a record export document ({what}: line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    // Nor the answer's own values: only that they are not the expected ones.
    if shape.format != EXPORT_FORMAT {
        return Err(CliError::Io(format!(
            "the server's answer is not a record export document (its format is not `{EXPORT_FORMAT}`)"
        )));
    }
    if shape.record_id != record_id {
        return Err(CliError::Io(format!(
            "the server exported another record instead of {record_id}"
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

/// The temporary file an export to `path` is written to before it is moved into place:
/// `.<name>.partial` beside it. The name is the same for every run, so that a run killed
/// midway leaves its plaintext under a known name, which the next export to `path` removes.
pub fn partial_path(path: &Path) -> Result<PathBuf, CliError> {
    let name = path
        .file_name()
        .ok_or_else(|| CliError::Usage(format!("--out {}: not a file name", path.display())))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(PARTIAL_SUFFIX);
    Ok(parent_dir(path).join(temp_name))
}

/// (device, inode) of a file.
fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// The temporary file of an export to `target` (see [`partial_path`]): new, empty, mode
/// 0600. Removed when dropped unless it was moved into place.
pub struct Partial {
    target: PathBuf,
    force: bool,
    path: PathBuf,
    file: File,
    id: (u64, u64),
    keep: bool,
}

impl Partial {
    /// Creates the temporary file of an export to `target`, after [`check_target`]; one left
    /// by an interrupted run is removed first. Fails (nothing created) when the directory is
    /// not writable: call it before asking the server, so that an export that could not be
    /// written is never performed and recorded.
    pub fn create(target: &Path, force: bool) -> Result<Partial, CliError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

        check_target(target, force)?;
        let path = partial_path(target)?;
        let cannot = |e: std::io::Error| {
            CliError::Io(format!(
                "--out {}: cannot create {} in {}: {e}",
                target.display(),
                path.display(),
                parent_dir(target).display()
            ))
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(cannot(e)),
        }
        let file: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(cannot)?;
        // Exactly 0600, whatever the umask.
        let id = file
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .and_then(|()| file.metadata())
            .map(|m| file_id(&m));
        let id = match id {
            Ok(id) => id,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(cannot(e));
            }
        };
        Ok(Partial {
            target: target.to_path_buf(),
            force,
            id,
            path,
            file,
            keep: false,
        })
    }

    /// Whether the temporary name still names this file (another export to the same target,
    /// started meanwhile, removes it as a leftover).
    fn still_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path).is_ok_and(|m| file_id(&m) == self.id)
    }

    /// Writes `contents`, syncs them, and moves the file into place: linked (never over an
    /// existing file) or, with `force`, renamed over it; then syncs the directory.
    pub fn commit(mut self, contents: &[u8]) -> Result<(), CliError> {
        let io = |what: &Path| {
            let what = what.display().to_string();
            move |e: std::io::Error| CliError::Io(format!("writing {what}: {e}"))
        };
        self.file.write_all(contents).map_err(io(&self.path))?;
        self.file.sync_all().map_err(io(&self.path))?;
        if !self.still_ours() {
            return Err(CliError::Io(format!(
                "{} was replaced by another export to {} while this one was being written: nothing was written",
                self.path.display(),
                self.target.display()
            )));
        }
        let path = self.target.clone();
        if self.force {
            std::fs::rename(&self.path, &path).map_err(io(&path))?;
            self.keep = true;
        } else {
            match std::fs::hard_link(&self.path, &path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(CliError::Usage(format!(
                        "{} appeared while the export was being written: nothing was written (use --force to replace it)",
                        path.display()
                    )));
                }
                // A file system without hard links: rename (nothing was there: checked above).
                Err(_) => {
                    check_target(&path, false)?;
                    std::fs::rename(&self.path, &path).map_err(io(&path))?;
                    self.keep = true;
                }
            }
            // Linked: dropping `self` removes the temporary name.
        }
        drop(self);
        let dir = parent_dir(&path);
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| CliError::Io(format!("syncing directory {}: {e}", dir.display())))
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.keep && self.still_ours() {
            // Best effort: the file is 0600, and an error is being reported already.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes `contents` to `path`, mode 0600, whole or not at all: [`Partial::create`], then
/// [`Partial::commit`].
pub fn write_file(path: &Path, contents: &[u8], force: bool) -> Result<(), CliError> {
    Partial::create(path, force)?.commit(contents)
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
    // to the record in its audit trail. The temporary file is created now, so that a
    // directory that cannot be written to fails here.
    let partial = Partial::create(&path, args.force)?;
    let mut client = connect(args).await?;
    let json = Zeroizing::new(std::mem::take(
        &mut client
            .export_record(proto::ExportRecordRequest {
                record_id: args.record_id.clone(),
            })
            .await
            .map_err(CliError::status_of(METHOD))?
            .into_inner()
            .json,
    ));
    let summary = summarise(&json, &args.record_id)?;
    partial.commit(json.as_bytes())?;
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
            // serde_json would quote the value in its message.
            (
                format!(
                    "{{\"format\":\"{EXPORT_FORMAT}\",\"record_id\":\"{ID}\",\"access_history\":\"Ilse\"}}"
                ),
                "line 1, column",
            ),
            (doc("Ilse", ID), "format"),
            (doc(EXPORT_FORMAT, "Ilse"), "another record"),
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
    fn the_temporary_file_has_a_fixed_name_and_a_leftover_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("e.json");
        let temp = partial_path(&path).expect("name");
        assert_eq!(temp, dir.path().join(".e.json.partial"));
        // Left by a killed run.
        std::fs::write(&temp, b"old plaintext").expect("leftover");
        let partial = Partial::create(&path, false).expect("created");
        assert_eq!(std::fs::read(&temp).expect("read"), b"");
        let mode = std::fs::metadata(&temp).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Dropped (the server refused, say): nothing is left.
        drop(partial);
        assert!(!temp.exists());
        assert!(!path.exists());
        // Replaced by another run meanwhile: refused, and the other run's file is kept.
        let partial = Partial::create(&path, false).expect("created");
        std::fs::remove_file(&temp).expect("rm");
        std::fs::write(&temp, b"other run").expect("other");
        let err = partial.commit(b"mine").expect_err("replaced");
        assert!(err.to_string().contains("another export"), "{err}");
        assert_eq!(std::fs::read(&temp).expect("read"), b"other run");
        assert!(!path.exists());
    }

    #[test]
    fn the_default_output_is_named_after_the_record() {
        assert_eq!(default_out(ID), PathBuf::from(format!("export-{ID}.json")));
    }
}

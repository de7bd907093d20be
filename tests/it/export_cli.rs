//! The real `kluis export RECORD_ID` binary against a real vault: the privacy officer's export
//! lands in a 0600 file holding the whole document (blobs included), the summary names no
//! value; an existing file is kept unless --force; a leftover temporary file is replaced; a
//! directory that cannot be written fails before the server performs (and audits) the
//! export; refusals, usage and connection errors have their exit codes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::Engine;
use kluis::proto::CreateRecordRequest;
use serde_json::Value;

use crate::helpers::*;

/// Runs `kluis <args>` in `cwd` off the async runtime (so that the in-process server keeps
/// serving), with `KLUIS_TOKEN` = `token` if given.
async fn kluis(cwd: &Path, args: &[impl AsRef<str>], token: Option<&str>) -> Run {
    run_kluis(Some(cwd), args, token).await
}

fn path(p: &Path) -> String {
    path_arg(p)
}

/// `kluis export <id> --server <url> <more>`.
fn export_args(url: &str, id: &str, more: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = vec!["export".into(), id.into(), "--server".into(), url.into()];
    all.extend(more.iter().map(|s| s.to_string()));
    all
}

/// The text fields' values and the blob's bytes of the test record.
const NAME: &str = "Ilse Bakker";
const EMAIL: &str = "ilse@example.nl";

fn cv() -> Vec<u8> {
    (0..200_000u32).map(|i| (i % 251) as u8).collect()
}

async fn record_with_cv(vault: &TestVault) -> String {
    vault
        .client("recruiter")
        .await
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[
                ("full_name", text(NAME)),
                ("email", text(EMAIL)),
                ("cv_document", blob(&cv(), "application/pdf")),
            ]),
        })
        .await
        .expect("create")
        .into_inner()
        .record_id
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

/// The names in `dir` (to see that no temporary file stays behind).
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_privacy_officer_exports_a_record_to_a_0600_file_and_force_replaces_it() {
    let vault = spawn_vault().await;
    let url = format!("http://{}", vault.addr);
    let officer = Some(vault.tokens["privacy_officer"].as_str());
    let id = record_with_cv(&vault).await;
    let work = tempfile::tempdir().expect("tempdir");

    // A temporary file left by a killed run (fixed name per target): replaced, then gone.
    let leftover = work.path().join(format!(".export-{id}.json.partial"));
    std::fs::write(&leftover, b"plaintext of a killed run").expect("leftover");

    // The default file name, in the current directory.
    let run = kluis(work.path(), &export_args(&url, &id, &[]), officer).await;
    assert_eq!(run.code, 0, "{}", run.all());
    let default_name = format!("export-{id}.json");
    let file = work.path().join(&default_name);
    assert_eq!(mode(&file), 0o600);
    let bytes = std::fs::read(&file).expect("read");
    let doc: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(doc["format"], "kluis.record-export");
    assert_eq!(doc["record_id"], id.as_str());
    assert_eq!(doc["fields"]["full_name"]["text"], NAME);
    assert_eq!(
        doc["fields"]["cv_document"]["content_type"],
        "application/pdf"
    );
    let back = base64::engine::general_purpose::STANDARD
        .decode(
            doc["fields"]["cv_document"]["blob_base64"]
                .as_str()
                .expect("base64 text"),
        )
        .expect("base64");
    assert_eq!(back, cv());
    let events = doc["access_history"].as_array().expect("history").len();
    assert_eq!(
        run.stdout,
        format!(
            "exported record {id} to {default_name} ({} bytes, 3 fields, {events} access event{})\n",
            bytes.len(),
            if events == 1 { "" } else { "s" }
        )
    );
    for value in [NAME, EMAIL, "JVBERi"] {
        assert!(!run.all().contains(value), "{value}: {}", run.all());
    }
    assert_eq!(names(work.path()), vec![default_name.clone()]);

    // Without --force an existing file stays as it is, and the server is not asked.
    let out = work.path().join("sub").join("mine.json");
    std::fs::create_dir(work.path().join("sub")).expect("mkdir");
    std::fs::write(&out, b"keep me").expect("write");
    let run = kluis(
        work.path(),
        &export_args(&url, &id, &["--out", &path(&out)]),
        officer,
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("--force"), "{}", run.all());
    assert!(run.stdout.is_empty(), "{}", run.all());
    assert_eq!(std::fs::read(&out).expect("read"), b"keep me");
    let run = kluis(work.path(), &export_args(&url, &id, &[]), officer).await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert_eq!(std::fs::read(&file).expect("read"), bytes);

    // With --force it is replaced, 0600 whatever the old file's mode.
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let run = kluis(
        work.path(),
        &export_args(&url, &id, &["--out", &path(&out), "--force"]),
        officer,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(
        run.stdout
            .starts_with(&format!("exported record {id} to {} (", path(&out))),
        "{}",
        run.all()
    );
    assert_eq!(mode(&out), 0o600);
    let doc: Value = serde_json::from_slice(&std::fs::read(&out).expect("read")).expect("json");
    assert_eq!(doc["format"], "kluis.record-export");
    // The earlier export is in this one's access history.
    let history = doc["access_history"].as_array().expect("history");
    assert!(history.len() > events, "{}", history.len());
    assert_eq!(
        names(&work.path().join("sub")),
        vec!["mine.json".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_usage_errors_have_their_exit_codes() {
    let vault = spawn_vault().await;
    let url = format!("http://{}", vault.addr);
    let officer = Some(vault.tokens["privacy_officer"].as_str());
    let id = record_with_cv(&vault).await;
    let work = tempfile::tempdir().expect("tempdir");

    let run = kluis(
        work.path(),
        &export_args(&url, &id, &[]),
        Some(&vault.tokens["recruiter"]),
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(
        run.stderr
            .contains("error: the server refused ExportRecord: PERMISSION_DENIED: "),
        "{}",
        run.all()
    );
    assert!(run.stdout.is_empty(), "{}", run.all());

    let unknown = uuid::Uuid::new_v4().to_string();
    let run = kluis(work.path(), &export_args(&url, &unknown, &[]), officer).await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(
        run.stderr
            .contains("error: the server refused ExportRecord: NOT_FOUND: "),
        "{}",
        run.all()
    );

    let run = kluis(work.path(), &export_args(&url, "not-a-uuid", &[]), officer).await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("not a record id"), "{}", run.all());

    let run = kluis(work.path(), &export_args(&url, &id, &[]), None).await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("KLUIS_TOKEN"), "{}", run.all());

    // Nothing listens on a port just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let run = kluis(
        work.path(),
        &export_args(&format!("http://127.0.0.1:{port}"), &id, &[]),
        officer,
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("cannot connect"), "{}", run.all());

    let run = kluis(
        work.path(),
        &export_args(&format!("https://{}", vault.addr), &id, &[]),
        officer,
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("--ca-cert"), "{}", run.all());

    // A directory as --out, even with --force.
    let run = kluis(
        work.path(),
        &export_args(&url, &id, &["--out", &path(work.path()), "--force"]),
        officer,
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("directory"), "{}", run.all());

    // An --out in a directory that does not exist.
    let missing = work.path().join("no").join("such.json");
    let run = kluis(
        work.path(),
        &export_args(&url, &id, &["--out", &path(&missing)]),
        officer,
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("does not exist"), "{}", run.all());

    // Something that answers, but not in gRPC: a connection error.
    let http1 = not_grpc_server();
    let run = kluis(
        work.path(),
        &export_args(&format!("http://{http1}"), &id, &[]),
        officer,
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("connection error"), "{}", run.all());

    // None of these wrote anything.
    assert!(names(work.path()).is_empty(), "{:?}", names(work.path()));

    let help = kluis(work.path(), &["export", "--help"], None).await;
    assert_eq!(help.code, 0, "{}", help.all());
    assert!(help.stdout.contains("--force"), "{}", help.stdout);
    assert!(help.stdout.contains("Exit codes"), "{}", help.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_directory_fails_before_the_server_records_an_export() {
    let vault = spawn_vault().await;
    let url = format!("http://{}", vault.addr);
    let officer = Some(vault.tokens["privacy_officer"].as_str());
    let id = record_with_cv(&vault).await;
    let work = tempfile::tempdir().expect("tempdir");

    // A directory without write permission; where that does not stop this user (root),
    // /proc, where nobody can create a file.
    let locked = work.path().join("locked");
    std::fs::create_dir(&locked).expect("mkdir");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500)).expect("chmod");
    let probe = locked.join("probe");
    let dir = if std::fs::write(&probe, b"").is_ok() {
        std::fs::remove_file(&probe).expect("rm");
        Path::new("/proc").to_path_buf()
    } else {
        locked.clone()
    };
    let out = dir.join(format!("kluis-test-{id}.json"));
    let run = kluis(
        work.path(),
        &export_args(&url, &id, &["--out", &path(&out)]),
        officer,
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("cannot create"), "{}", run.all());
    assert!(run.stdout.is_empty(), "{}", run.all());
    assert!(!out.exists());

    // The server was not asked: no export of the record in its audit trail.
    let events = vault
        .audit_events(kluis::proto::QueryEventsRequest {
            record_id: id.clone(),
            ..Default::default()
        })
        .await;
    assert!(!events.is_empty(), "the record's creation is audited");
    assert!(
        events.iter().all(|e| e.action != "ExportRecord"),
        "{events:?}"
    );
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).expect("chmod");
}

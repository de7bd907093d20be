//! The real `kluis keys …` binary against a real vault: the status table counts every
//! category's records per KEK version; rotate, rewrap, rekey and retire move the counts and
//! are refused where they must be; refusals and usage errors have their exit codes; and the
//! offline master key rotation re-wraps, installs, repeats harmlessly and survives being
//! killed at any moment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kluis::crypto::SecretKey;
use kluis::keys::{KeyError, KeyRing, MasterKey};
use kluis::proto::records_client::RecordsClient;
use kluis::proto::GetRecordRequest;
use kluis::store::SledStore;
use serde_json::Value;
use tonic::transport::Channel;

use crate::helpers::*;

/// Runs `kluis <args>` off the async runtime, so that an in-process server keeps serving.
async fn kluis(args: &[impl AsRef<str>], token: Option<&str>) -> Run {
    run_kluis(None, args, token).await
}

fn path(p: &Path) -> String {
    path_arg(p)
}

/// `kluis keys <args> --server <url>`.
fn keys_args(url: &str, args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = vec!["keys".into()];
    all.extend(args.iter().map(|s| s.to_string()));
    all.extend(["--server".to_string(), url.to_string()]);
    all
}

/// One row of the status table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    state: String,
    active: bool,
    created: String,
    records: u64,
}

/// The status table in `stdout` (after any header lines): (category, version) → row.
fn status_table(stdout: &str) -> BTreeMap<(String, u32), Row> {
    let mut lines = stdout.lines().skip_while(|l| !l.starts_with("CATEGORY"));
    let header = lines.next().expect("a table header");
    assert!(
        header
            .split_whitespace()
            .eq(["CATEGORY", "VERSION", "STATE", "CREATED", "RECORDS"]),
        "{header}"
    );
    let mut rows = BTreeMap::new();
    for line in lines.take_while(|l| !l.starts_with('*')) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        let active = cells.get(2) == Some(&"*");
        let rest = if active { &cells[3..] } else { &cells[2..] };
        assert_eq!(rest.len(), 3, "{line}");
        rows.insert(
            (cells[0].to_string(), cells[1].parse().expect("a version")),
            Row {
                state: rest[0].to_string(),
                active,
                created: rest[1].to_string(),
                records: rest[2].parse().expect("a count"),
            },
        );
    }
    rows
}

fn row<'a>(table: &'a BTreeMap<(String, u32), Row>, category: &str, version: u32) -> &'a Row {
    table
        .get(&(category.to_string(), version))
        .unwrap_or_else(|| panic!("no row {category} {version}: {table:?}"))
}

const CATEGORIES: [&str; 6] = [
    "contact",
    "personal",
    "cv",
    "identity",
    "financial",
    "absence",
];

/// The text of `field` of record `id`, read for `purpose`.
async fn read(client: &mut Client, id: &str, purpose: &str, field: &str) -> String {
    let got = client
        .get_record(GetRecordRequest {
            record_id: id.into(),
            purpose: purpose.into(),
            field_names: vec![field.to_string()],
        })
        .await
        .expect("get")
        .into_inner();
    text_of(&got.fields[field]).to_string()
}

/// Records with contact and personal fields (recruiter) and with identity and financial
/// fields (payroll); returns the payroll records' ids.
async fn seed(vault: &TestVault, recruited: usize, paid: usize) -> Vec<String> {
    let mut recruiter = vault.client("recruiter").await;
    let mut payroll = vault.client("payroll").await;
    for i in 0..recruited {
        create_with(
            &mut recruiter,
            "recruitment",
            &[
                ("full_name", text(&format!("Kandidaat {i}"))),
                ("email", sample_value("email")),
                ("date_of_birth", sample_value("date_of_birth")),
            ],
        )
        .await;
    }
    let mut ids = Vec::new();
    for _ in 0..paid {
        ids.push(
            create_with(
                &mut payroll,
                "payroll",
                &[("bsn", sample_value("bsn")), ("iban", sample_value("iban"))],
            )
            .await,
        );
    }
    ids
}

#[tokio::test]
async fn status_counts_every_categorys_records_per_version() {
    let vault = spawn_vault().await;
    seed(&vault, 3, 2).await;
    let url = format!("http://{}", vault.addr);
    let officer = Some(vault.tokens["security_officer"].as_str());

    let run = kluis(&keys_args(&url, &["status"]), officer).await;
    assert_eq!(run.code, 0, "{}", run.all());
    let table = status_table(&run.stdout);
    assert_eq!(table.len(), 6, "{}", run.stdout);
    let expected = [
        ("contact", 3),
        ("personal", 3),
        ("cv", 0),
        ("identity", 2),
        ("financial", 2),
        ("absence", 0),
    ];
    for (category, records) in expected {
        let r = row(&table, category, 1);
        assert!(r.active, "{}", run.stdout);
        assert_eq!(r.state, "active");
        assert_eq!(r.records, records, "{category}: {}", run.stdout);
        chrono::DateTime::parse_from_rfc3339(&r.created).expect("created is RFC 3339");
        assert!(r.created.ends_with('Z'), "UTC: {}", r.created);
    }

    let json = kluis(&keys_args(&url, &["status", "--format", "json"]), officer).await;
    assert_eq!(json.code, 0, "{}", json.all());
    let doc: Value = serde_json::from_str(&json.stdout).expect("one JSON document");
    let categories = doc["categories"].as_array().expect("categories");
    let names: Vec<&str> = categories
        .iter()
        .map(|c| c["category"].as_str().expect("name"))
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    let mut all = CATEGORIES.to_vec();
    all.sort_unstable();
    assert_eq!(sorted, all);
    for c in categories {
        assert_eq!(c["active_version"], 1);
        let versions = c["versions"].as_array().expect("versions");
        assert_eq!(versions.len(), 1);
        assert_eq!(versions[0]["state"], "active");
        let want = expected
            .iter()
            .find(|(n, _)| *n == c["category"])
            .expect("known")
            .1;
        assert_eq!(versions[0]["records"], want);
    }
}

#[tokio::test]
async fn rotate_rewrap_retire_and_rekey_move_the_counts() {
    let vault = spawn_vault().await;
    let ids = seed(&vault, 1, 3).await;
    let mut payroll = vault.client("payroll").await;
    let mut before = Vec::new();
    for id in &ids {
        before.push((
            read(&mut payroll, id, "payroll", "bsn").await,
            read(&mut payroll, id, "payroll", "iban").await,
        ));
    }
    let url = format!("http://{}", vault.addr);
    let officer = Some(vault.tokens["security_officer"].as_str());
    let keys = |args: &[&str]| keys_args(&url, args);

    // Rotate one category: a new active version, the old one decrypt_only with the records.
    let rotated = kluis(&keys(&["rotate", "identity"]), officer).await;
    assert_eq!(rotated.code, 0, "{}", rotated.all());
    assert!(rotated.stdout.contains("identity 2"), "{}", rotated.stdout);
    let table = status_table(&rotated.stdout);
    assert!(row(&table, "identity", 2).active);
    assert_eq!(row(&table, "identity", 2).records, 0);
    assert_eq!(row(&table, "identity", 1).state, "decrypt_only");
    assert!(!row(&table, "identity", 1).active);
    assert_eq!(row(&table, "identity", 1).records, 3);
    assert!(row(&table, "financial", 1).active, "only identity rotated");

    // Records still need version 1: it cannot be destroyed yet.
    let early = kluis(&keys(&["retire", "identity", "1"]), officer).await;
    assert_eq!(early.code, 1, "{}", early.all());
    assert!(
        early.stderr.contains("FAILED_PRECONDITION"),
        "{}",
        early.all()
    );
    assert!(early.stdout.is_empty(), "{}", early.stdout);

    let rewrap = kluis(&keys(&["rewrap", "identity"]), officer).await;
    assert_eq!(rewrap.code, 0, "{}", rewrap.all());
    assert!(
        rewrap.stdout.contains("rewrap finished: 3 of 3 records"),
        "{}",
        rewrap.all()
    );
    // Not a terminal: progress as plain lines on stderr.
    assert!(
        rewrap.stderr.contains("rewrap identity: 3/3"),
        "{}",
        rewrap.all()
    );

    let status = kluis(&keys(&["status"]), officer).await;
    assert_eq!(status.code, 0, "{}", status.all());
    let table = status_table(&status.stdout);
    assert_eq!(row(&table, "identity", 1).records, 0);
    assert_eq!(row(&table, "identity", 2).records, 3);

    let retired = kluis(&keys(&["retire", "identity", "1"]), officer).await;
    assert_eq!(retired.code, 0, "{}", retired.all());
    let table = status_table(&retired.stdout);
    assert_eq!(row(&table, "identity", 1).state, "retired");
    assert!(row(&table, "identity", 2).active);

    // The active version, a retired one, one that never existed.
    for (version, code) in [
        ("2", "FAILED_PRECONDITION"),
        ("1", "FAILED_PRECONDITION"),
        ("9", "NOT_FOUND"),
    ] {
        let run = kluis(&keys(&["retire", "identity", version]), officer).await;
        assert_eq!(run.code, 1, "{}", run.all());
        assert!(run.stderr.contains(code), "{version}: {}", run.all());
    }

    // Re-key replaces the financial data keys; the values stay.
    let rekey = kluis(&keys(&["rekey", "financial"]), officer).await;
    assert_eq!(rekey.code, 0, "{}", rekey.all());
    assert!(
        rekey.stdout.contains("rekey finished: 3 of 3 records"),
        "{}",
        rekey.all()
    );

    // Every category at once, in JSON.
    let all = kluis(&keys(&["rotate", "--format", "json"]), officer).await;
    assert_eq!(all.code, 0, "{}", all.all());
    let doc: Value = serde_json::from_str(&all.stdout).expect("json");
    for c in doc["categories"].as_array().expect("categories") {
        let want = if c["category"] == "identity" { 3 } else { 2 };
        assert_eq!(c["active_version"], want, "{c}");
    }
    let rewrap_all = kluis(&keys(&["rewrap"]), officer).await;
    assert_eq!(rewrap_all.code, 0, "{}", rewrap_all.all());
    assert!(
        rewrap_all.stdout.contains("finished"),
        "{}",
        rewrap_all.all()
    );
    let status = kluis(&keys(&["status"]), officer).await;
    for ((category, version), r) in status_table(&status.stdout) {
        if !r.active {
            assert_eq!(r.records, 0, "{category} {version}: {}", status.stdout);
        }
    }

    for (id, (bsn, iban)) in ids.iter().zip(&before) {
        assert_eq!(&read(&mut payroll, id, "payroll", "bsn").await, bsn);
        assert_eq!(&read(&mut payroll, id, "payroll", "iban").await, iban);
    }
}

#[tokio::test]
async fn refusals_and_usage_errors_have_their_exit_codes() {
    let vault = spawn_vault().await;
    let url = format!("http://{}", vault.addr);
    let officer = Some(vault.tokens["security_officer"].as_str());
    let recruiter = Some(vault.tokens["recruiter"].as_str());

    for args in [
        vec!["status"],
        vec!["rotate", "identity"],
        vec!["rewrap"],
        vec!["rekey", "cv"],
        vec!["retire", "cv", "1"],
    ] {
        let run = kluis(&keys_args(&url, &args), recruiter).await;
        assert_eq!(run.code, 1, "{args:?}: {}", run.all());
        assert!(
            run.stderr.contains("PERMISSION_DENIED"),
            "{args:?}: {}",
            run.all()
        );
        assert!(run.stdout.is_empty(), "{}", run.stdout);
    }
    let wrong = kluis(&keys_args(&url, &["status"]), Some("kluis_wrong")).await;
    assert_eq!(wrong.code, 1, "{}", wrong.all());
    assert!(wrong.stderr.contains("UNAUTHENTICATED"), "{}", wrong.all());

    // Like `kluis audit`: a missing token is a usage error, found before any connection.
    let none = kluis(&keys_args(&url, &["status"]), None).await;
    assert_eq!(none.code, 2, "{}", none.all());
    assert!(none.stderr.contains("KLUIS_TOKEN"), "{}", none.all());

    // The six categories are a fixed list: a misspelt one is a usage error, found before any
    // call (like a bad VERSION).
    for args in [
        vec!["rotate", "nosuch"],
        vec!["rewrap", "nosuch"],
        vec!["rekey", "nosuch"],
        vec!["retire", "nosuch", "1"],
        vec!["rekey", ""],
    ] {
        let run = kluis(&keys_args(&url, &args), officer).await;
        assert_eq!(run.code, 2, "{args:?}: {}", run.all());
        assert!(
            run.stderr.contains("not a category"),
            "{args:?}: {}",
            run.all()
        );
        assert!(run.stderr.contains("identity"), "{args:?}: {}", run.all());
    }

    // Something that answers, but not in gRPC: a connection error (2), not a refusal (1).
    let http1 = not_grpc_server();
    let run = kluis(&keys_args(&format!("http://{http1}"), &["status"]), officer).await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("connection error"), "{}", run.all());
    assert!(!run.stderr.contains("refused"), "{}", run.all());

    // Nothing listens on a port just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let down = kluis(
        &keys_args(&format!("http://127.0.0.1:{port}"), &["status"]),
        officer,
    )
    .await;
    assert_eq!(down.code, 2, "{}", down.all());
    assert!(down.stderr.contains("cannot connect"), "{}", down.all());

    let https = kluis(
        &keys_args(&format!("https://{}", vault.addr), &["status"]),
        officer,
    )
    .await;
    assert_eq!(https.code, 2, "{}", https.all());
    assert!(https.stderr.contains("--ca-cert"), "{}", https.all());
    for args in [
        vec!["retire", "cv", "0"],
        vec!["retire", "cv"],
        vec!["rekey"],
        vec!["status", "--format", "xml"],
    ] {
        let run = kluis(&keys_args(&url, &args), officer).await;
        assert_eq!(run.code, 2, "{args:?}: {}", run.all());
    }

    let help = kluis(&["keys", "--help"], None).await;
    assert_eq!(help.code, 0, "{}", help.all());
    assert!(help.stdout.contains("Exit codes"), "{}", help.stdout);
    let help = kluis(&["keys", "rotate-master", "--help"], None).await;
    assert!(help.stdout.contains("--new-key"), "{}", help.stdout);
    assert!(help.stdout.contains("Exit codes"), "{}", help.stdout);
}

// ---------------------------------------------------------------------------------------
// Offline master key rotation

/// A production set-up (`kluis init`) with records, its server stopped.
struct Offline {
    dir: tempfile::TempDir,
    tokens: BTreeMap<String, String>,
    /// Payroll records and their BSN.
    records: Vec<(String, String)>,
}

impl Offline {
    fn config(&self) -> PathBuf {
        self.dir.path().join("kluis.toml")
    }

    fn key_file(&self) -> PathBuf {
        self.dir.path().join("keys").join("master.key")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

async fn payroll_client(addr: std::net::SocketAddr, token: &str) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    RecordsClient::with_interceptor(channel, bearer(token))
}

/// Starts the server of the set-up in `dir`, with `master` instead of the configured key if
/// given.
async fn start(dir: &Path, master: Option<MasterKey>) -> kluis::server::Running {
    let mut settings = kluis::config::load(&dir.join("kluis.toml")).expect("config loads");
    if let Some(m) = master {
        settings.master_key = m;
    }
    kluis::server::start(settings).await.expect("server starts")
}

async fn offline_vault(records: usize) -> Offline {
    let dir = tempfile::tempdir().expect("tempdir");
    let init = kluis::config::init(dir.path(), "127.0.0.1:0").expect("init");
    let tokens: BTreeMap<String, String> = init
        .tokens
        .iter()
        .map(|(_, role, token)| (role.clone(), token.to_string()))
        .collect();
    let running = start(dir.path(), None).await;
    let mut payroll = payroll_client(running.local_addr, &tokens["payroll"]).await;
    let mut out = Vec::new();
    for i in 0..records {
        let bsn = ["111222333", "123456782"][i % 2];
        let id = create_with(
            &mut payroll,
            "payroll",
            &[("bsn", text(bsn)), ("iban", sample_value("iban"))],
        )
        .await;
        out.push((id.clone(), read(&mut payroll, &id, "payroll", "bsn").await));
    }
    drop(payroll);
    running.shutdown().await.expect("clean shutdown");
    Offline {
        dir,
        tokens,
        records: out,
    }
}

fn key_text(path: &Path) -> String {
    std::fs::read_to_string(path)
        .expect("key file")
        .trim()
        .to_string()
}

fn master(hex: &str) -> MasterKey {
    MasterKey::from_secret(SecretKey::from_hex(hex).expect("hex"))
}

fn rotate_master_args(new_key: &Path, config: &Path) -> Vec<String> {
    [
        "keys",
        "rotate-master",
        "--new-key",
        &path(new_key),
        "--config",
        &path(config),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test]
async fn rotate_master_re_wraps_installs_and_repeats_harmlessly() {
    let v = offline_vault(4).await;
    let old_hex = key_text(&v.key_file());
    let new_key = v.dir.path().join("new.key");
    let args = rotate_master_args(&new_key, &v.config());

    let run = kluis(&args, None).await;
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(run.stdout.contains("master key rotated"), "{}", run.all());
    assert!(run.stdout.contains("keys re-wrapped"), "{}", run.all());
    assert!(
        run.stdout.contains("destroy every copy of the old key"),
        "{}",
        run.all()
    );
    let new_hex = key_text(&v.key_file());
    assert_ne!(new_hex, old_hex);
    // The old key is kept beside it (0600), named in the output.
    let kept = retired(&v.key_file());
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(key_text(&kept[0]), old_hex);
    assert!(run.stdout.contains(&path(&kept[0])), "{}", run.all());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&kept[0])
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    for secret in [&old_hex, &new_hex] {
        assert!(!run.all().contains(secret.as_str()), "a key was printed");
    }
    assert!(!new_key.exists(), "the new key was moved into place");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(v.key_file())
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    {
        let store = SledStore::open(&v.data()).expect("open");
        assert!(matches!(
            KeyRing::open(&store, &master(&old_hex)).await,
            Err(KeyError::WrongMasterKey)
        ));
        KeyRing::open(&store, &master(&new_hex))
            .await
            .expect("the new key opens");
    }

    // Again: nothing to do, nothing changes.
    let again = kluis(&args, None).await;
    assert_eq!(again.code, 0, "{}", again.all());
    assert!(again.stdout.contains("nothing to do"), "{}", again.all());
    assert_eq!(key_text(&v.key_file()), new_hex);
    assert!(!new_key.exists());

    // The audit chain, with the rotation's event in it, still verifies.
    let verify = kluis(&["audit", "verify", "--data-dir", &path(&v.data())], None).await;
    assert_eq!(verify.code, 0, "{}", verify.all());
    let export = kluis(&["audit", "export", "--data-dir", &path(&v.data())], None).await;
    assert_eq!(export.code, 0, "{}", export.all());
    let event: Value = export
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json"))
        .find(|e| e["action"] == "RotateMasterKey")
        .expect("the rotation is audited");
    // No role of the policy was authenticated: `system`, as the server's own key jobs; the
    // principal is the operator's account (from the user id, not from $USER).
    assert_eq!(event["role"], "system");
    assert_eq!(event["outcome"], "ok");
    assert!(event["principal"]
        .as_str()
        .expect("principal")
        .starts_with("cli:"));

    // The restarted server reads every record with the new key (from the config's file).
    let running = start(v.dir.path(), None).await;
    let mut payroll = payroll_client(running.local_addr, &v.tokens["payroll"]).await;
    for (id, bsn) in &v.records {
        assert_eq!(&read(&mut payroll, id, "payroll", "bsn").await, bsn);
    }
    // While it runs, the data directory is not the tool's.
    let other = v.dir.path().join("other.key");
    let busy = kluis(&rotate_master_args(&other, &v.config()), None).await;
    assert_eq!(busy.code, 2, "{}", busy.all());
    assert!(busy.stderr.contains("in use"), "{}", busy.all());
    assert!(!other.exists(), "nothing was made");
    drop(payroll);
    running.shutdown().await.expect("clean shutdown");
}

/// The `<key file>.retired-*` files beside `key_file`, sorted.
fn retired(key_file: &Path) -> Vec<PathBuf> {
    let prefix = format!(
        "{}.retired-",
        key_file.file_name().expect("name").to_string_lossy()
    );
    let mut found: Vec<PathBuf> = std::fs::read_dir(key_file.parent().expect("dir"))
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

#[tokio::test]
async fn rotate_master_refuses_another_data_dir_and_a_stale_receipt_starts_a_new_rotation() {
    let v = offline_vault(2).await;
    let old_hex = key_text(&v.key_file());
    let new_key = v.dir.path().join("new.key");

    // A restored copy of the data directory: it uses the configured key file too. Rotating
    // it would install the new key over that file and lock out the configured directory.
    let copy = v.dir.path().join("restored-copy");
    copy_dir(&v.data(), &copy);
    let mut args = rotate_master_args(&new_key, &v.config());
    args.extend(["--data-dir".to_string(), path(&copy)]);
    let run = kluis(&args, None).await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("--data-dir"), "{}", run.all());
    assert!(run.stderr.contains("Nothing was changed"), "{}", run.all());
    assert_eq!(
        key_text(&v.key_file()),
        old_hex,
        "the key file is untouched"
    );
    assert!(!new_key.exists(), "no key was made");
    for dir in [v.data(), copy.clone()] {
        let store = SledStore::open(&dir).expect("open");
        KeyRing::open(&store, &master(&old_hex))
            .await
            .expect("still under the old key");
    }
    let plan = kluis(
        &[
            "retention",
            "plan",
            "--config",
            &path(&v.config()),
            "--format",
            "json",
        ],
        None,
    )
    .await;
    assert_eq!(plan.code, 0, "{}", plan.all());

    // The configured directory itself, named with --data-dir: allowed.
    let mut args = rotate_master_args(&new_key, &v.config());
    args.extend(["--data-dir".to_string(), path(&v.data())]);
    let first = kluis(&args, None).await;
    assert_eq!(first.code, 0, "{}", first.all());
    let first_hex = key_text(&v.key_file());
    assert_ne!(first_hex, old_hex);

    // A later rotation with another --new-key path leaves new.key.installed naming an
    // earlier key. The next rotation with new.key (the README's own example path, say) must
    // rotate, not report that there is nothing to do.
    let second = kluis(
        &rotate_master_args(&v.dir.path().join("other.key"), &v.config()),
        None,
    )
    .await;
    assert_eq!(second.code, 0, "{}", second.all());
    let second_hex = key_text(&v.key_file());
    let third = kluis(&rotate_master_args(&new_key, &v.config()), None).await;
    assert_eq!(third.code, 0, "{}", third.all());
    assert!(!third.stdout.contains("nothing to do"), "{}", third.all());
    assert!(third.stdout.contains("earlier rotation"), "{}", third.all());
    assert!(third.stdout.contains("keys re-wrapped"), "{}", third.all());
    let third_hex = key_text(&v.key_file());
    assert_ne!(third_hex, second_hex, "rotated");
    // Now, and only now, the same command has nothing to do.
    let again = kluis(&rotate_master_args(&new_key, &v.config()), None).await;
    assert_eq!(again.code, 0, "{}", again.all());
    assert!(again.stdout.contains("nothing to do"), "{}", again.all());
    assert_eq!(key_text(&v.key_file()), third_hex);
    // Every old key is kept.
    let kept: Vec<String> = retired(&v.key_file()).iter().map(|p| key_text(p)).collect();
    assert_eq!(kept.len(), 3, "{kept:?}");
    for hex in [&old_hex, &first_hex, &second_hex] {
        assert!(kept.contains(hex));
    }

    let running = start(v.dir.path(), None).await;
    let mut payroll = payroll_client(running.local_addr, &v.tokens["payroll"]).await;
    for (id, bsn) in &v.records {
        assert_eq!(&read(&mut payroll, id, "payroll", "bsn").await, bsn);
    }
    drop(payroll);
    running.shutdown().await.expect("clean shutdown");
}

/// Runs `kluis <args>` with `KLUIS_MASTER_KEY` = `master_hex`.
async fn kluis_with_master(args: Vec<String>, master_hex: String) -> Run {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_kluis"))
            .args(&args)
            .env_remove("KLUIS_TOKEN")
            .env_remove("KLUIS_LOG")
            .env("KLUIS_MASTER_KEY", master_hex)
            .stdin(Stdio::null())
            .output()
            .expect("run kluis");
        Run {
            code: out.status.code().expect("exited"),
            stdout: String::from_utf8(out.stdout).expect("utf-8"),
            stderr: String::from_utf8(out.stderr).expect("utf-8"),
        }
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn with_the_key_in_the_environment_a_rerun_never_makes_a_second_key() {
    let v = offline_vault(1).await;
    let old_hex = key_text(&v.key_file());
    // The same set-up without master_key_file: the key comes from KLUIS_MASTER_KEY.
    let text = std::fs::read_to_string(v.config())
        .expect("config")
        .lines()
        .filter(|l| !l.starts_with("master_key_file"))
        .collect::<Vec<_>>()
        .join("\n");
    let config = v.dir.path().join("env.toml");
    std::fs::write(&config, text).expect("write config");
    let new_key = v.dir.path().join("new.key");
    let args = rotate_master_args(&new_key, &config);

    let run = kluis_with_master(args.clone(), old_hex.clone()).await;
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(run.stdout.contains("KLUIS_MASTER_KEY"), "{}", run.all());
    let new_hex = key_text(&new_key);
    assert!(!run.all().contains(&new_hex) && !run.all().contains(&old_hex));
    assert!(new_key.with_file_name("new.key.installed").exists());

    // As told: the variable set to the new key, the file kept offline (moved away). Running
    // the same command again does nothing; it does not make and commit another key.
    let offline = v.dir.path().join("offline.key");
    std::fs::rename(&new_key, &offline).expect("move offline");
    let again = kluis_with_master(args.clone(), new_hex.clone()).await;
    assert_eq!(again.code, 0, "{}", again.all());
    assert!(again.stdout.contains("nothing to do"), "{}", again.all());
    assert!(!new_key.exists(), "no second key");
    // With the old key still in the variable: refused (2), and nothing made.
    let stale = kluis_with_master(args, old_hex).await;
    assert_eq!(stale.code, 2, "{}", stale.all());
    assert!(!new_key.exists(), "no second key");
    let store = SledStore::open(&v.data()).expect("open");
    KeyRing::open(&store, &master(&new_hex))
        .await
        .expect("the key that was set opens the data");
}

#[tokio::test]
async fn rotate_master_killed_at_any_moment_leaves_one_working_key_and_finishes_on_rerun() {
    let base = offline_vault(6).await;
    let old_hex = key_text(&base.key_file());
    let prepared_new = base.dir.path().join("new.key");
    MasterKey::create_file(&prepared_new).expect("new key");
    let new_hex = key_text(&prepared_new);
    let (id, bsn) = base.records[0].clone();

    // How long one whole run takes here, to spread the kills over it.
    let probe = tempfile::tempdir().expect("tempdir");
    copy_dir(base.dir.path(), probe.path());
    let started = Instant::now();
    let whole = kluis(
        &rotate_master_args(
            &probe.path().join("new.key"),
            &probe.path().join("kluis.toml"),
        ),
        None,
    )
    .await;
    let full = started.elapsed();
    assert_eq!(whole.code, 0, "{}", whole.all());
    let span = (full * 6 / 5).max(Duration::from_millis(40));

    const ROUNDS: u32 = 20;
    let mut seen = BTreeMap::from([("old", 0), ("new", 0)]);
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().expect("tempdir");
        copy_dir(base.dir.path(), dir.path());
        let config = dir.path().join("kluis.toml");
        let new_key = dir.path().join("new.key");
        let key_file = dir.path().join("keys").join("master.key");
        let delay = span * round / (ROUNDS - 1);
        let args = rotate_master_args(&new_key, &config);
        tokio::task::spawn_blocking(move || {
            let mut child = Command::new(env!("CARGO_BIN_EXE_kluis"))
                .args(&args)
                .env_remove("KLUIS_LOG")
                .env_remove("KLUIS_MASTER_KEY")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn");
            std::thread::sleep(delay);
            let _ = child.kill();
            child.wait().expect("reaped");
        })
        .await
        .expect("join");

        // Exactly one of the two keys opens the data, and it is kept somewhere.
        let under_new = {
            let store = SledStore::open(&dir.path().join("data")).expect("open");
            let which = kluis::keys::which_master_key(&store, &master(&old_hex), &master(&new_hex))
                .await
                .expect("readable");
            let under_new = match which {
                Some(true) => false,
                Some(false) => true,
                None => panic!("round {round} ({delay:?}): neither key opens the data"),
            };
            let key = if under_new { &new_hex } else { &old_hex };
            KeyRing::open(&store, &master(key))
                .await
                .expect("the key ring opens");
            under_new
        };
        let installed = key_text(&key_file);
        if under_new {
            assert!(
                installed == new_hex || key_text(&new_key) == new_hex,
                "round {round}: the new key must not be lost"
            );
        } else {
            assert_eq!(
                installed, old_hex,
                "round {round}: installed before the commit"
            );
        }
        *seen
            .get_mut(if under_new { "new" } else { "old" })
            .expect("state") += 1;

        // The server reads a record with that key.
        let key = if under_new { &new_hex } else { &old_hex };
        let running = start(dir.path(), Some(master(key))).await;
        let mut payroll = payroll_client(running.local_addr, &base.tokens["payroll"]).await;
        assert_eq!(read(&mut payroll, &id, "payroll", "bsn").await, bsn);
        drop(payroll);
        running.shutdown().await.expect("clean shutdown");

        // Running it again finishes the job.
        let rerun = kluis(&rotate_master_args(&new_key, &config), None).await;
        assert_eq!(rerun.code, 0, "round {round}: {}", rerun.all());
        assert_eq!(key_text(&key_file), new_hex, "round {round}");
        assert!(!new_key.exists(), "round {round}");
        let store = SledStore::open(&dir.path().join("data")).expect("open");
        assert_eq!(
            kluis::keys::which_master_key(&store, &master(&new_hex), &master(&old_hex))
                .await
                .expect("readable"),
            Some(true),
            "round {round}"
        );
    }
    eprintln!("rotate-master killed within {span:?} (a whole run: {full:?}): data under {seen:?}");
    // Round 0 kills the run at once, before it can commit: the data stays under the old key.
    // (That some round ends under the new key is not asserted: the last rounds wait 6/5 of
    // one probe run, and on a busy machine a run can take longer than that, so every round
    // may end before the commit.)
    assert!(
        seen["old"] >= 1,
        "no round ended under the old key: {seen:?}"
    );
}

#[tokio::test]
async fn serve_exits_2_when_it_cannot_start() {
    let v = offline_vault(1).await;
    // A master key that does not open the data directory.
    let other = v.dir.path().join("keys").join("other.key");
    MasterKey::create_file(&other).expect("another key");
    let text = std::fs::read_to_string(v.config())
        .expect("config")
        .replace("keys/master.key", "keys/other.key");
    let wrong = v.dir.path().join("wrong.toml");
    std::fs::write(&wrong, text).expect("write config");
    let run = kluis(&["serve", "--config", &path(&wrong)], None).await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("does not match"), "{}", run.all());

    // The data directory in use (held here).
    let held = SledStore::open(&v.data()).expect("open");
    let run = kluis(&["serve", "--config", &path(&v.config())], None).await;
    assert_eq!(run.code, 2, "{}", run.all());
    drop(held);

    let help = kluis(&["serve", "--help"], None).await;
    assert_eq!(help.code, 0, "{}", help.all());
    assert!(help.stdout.contains("Exit codes"), "{}", help.stdout);
}

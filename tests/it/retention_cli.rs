//! The real `kluis retention plan` binary against a production set-up (`kluis init`) whose
//! server is stopped: every category with a running clock is listed with its erase date and
//! status, the summary and the JSON document count the same, the configured `[retention]`
//! rules are the ones applied, nothing in the data directory changes, and a data directory in
//! use, a wrong master key, bad rules (a consent purpose the policy lacks included) and a bad
//! `--at` are refused with exit code 2; damaged records are reported apart, with exit code 1.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kluis::proto::records_client::RecordsClient;
use kluis::proto::{
    CreateRecordRequest, SetConsentRequest, SetLegalHoldRequest, SetLifecycleRequest,
    UpdateRecordRequest,
};
use kluis::store::{Keyspace, SledStore, Store};
use serde_json::Value;
use tonic::transport::Channel;

use crate::helpers::*;

/// Runs `kluis <args>` off the async runtime (an in-process server keeps serving), with no
/// `KLUIS_*` variables.
async fn kluis(args: &[&str]) -> Run {
    run_kluis(None, args, None).await
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Starts the server of the set-up in `dir` with its clock on 2026-01-20, so that the
/// sweeper (which runs at start-up) erases nothing the test plans over.
async fn start(dir: &Path) -> kluis::server::Running {
    let mut settings = kluis::config::load(&dir.join("kluis.toml")).expect("config loads");
    settings.clock =
        Arc::new(|| chrono::NaiveDate::from_ymd_opt(2026, 1, 20).expect("a valid date"));
    kluis::server::start(settings).await.expect("server starts")
}

async fn client(addr: std::net::SocketAddr, token: &str) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    RecordsClient::with_interceptor(channel, bearer(token))
}

/// The roles' clients of a running server.
struct Clients {
    recruiter: Client,
    payroll: Client,
    privacy_officer: Client,
}

impl Clients {
    async fn new(addr: std::net::SocketAddr, tokens: &BTreeMap<String, String>) -> Clients {
        Clients {
            recruiter: client(addr, &tokens["recruiter"]).await,
            payroll: client(addr, &tokens["payroll"]).await,
            privacy_officer: client(addr, &tokens["privacy_officer"]).await,
        }
    }

    /// An applicant with contact data.
    async fn applicant(&mut self, email: &str) -> String {
        self.recruiter
            .create_record(CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("full_name", text("Anna de Vries")), ("email", text(email))]),
            })
            .await
            .expect("create")
            .into_inner()
            .record_id
    }

    async fn stage(&mut self, id: &str, stage: &str, date: &str) {
        self.payroll
            .set_lifecycle(SetLifecycleRequest {
                record_id: id.into(),
                stage: stage.into(),
                date: date.into(),
            })
            .await
            .expect("stage");
    }

    /// An applicant given payroll data (identity, financial), then put in `stage` on `date`.
    async fn employee(&mut self, email: &str, stage: &str, date: &str) -> String {
        let id = self.applicant(email).await;
        self.payroll
            .update_record(UpdateRecordRequest {
                record_id: id.clone(),
                purpose: "payroll".into(),
                expected_revision: 0,
                set: fields(&[
                    ("bsn", text("111222333")),
                    ("iban", text("NL91ABNA0417164300")),
                ]),
                clear: vec![],
            })
            .await
            .expect("payroll data");
        if stage == "ended" {
            // Only an employment can end.
            self.stage(&id, "employed", "2015-01-05").await;
        }
        self.stage(&id, stage, date).await;
        id
    }
}

/// The records of the set-up.
struct Ids {
    /// Procedure closed 2026-01-10: erased on 2026-02-07.
    plain: String,
    /// Procedure closed 2026-01-10 with talent pool consent: erased on 2027-01-10.
    pooled: String,
    /// Procedure closed 2026-01-10, under legal hold.
    held: String,
    /// Employment ended 2026-03-31.
    former: String,
}

/// A production set-up with six records (two without a running clock: an applicant in
/// procedure and an employee), its server stopped.
async fn set_up() -> (tempfile::TempDir, Ids) {
    let dir = tempfile::tempdir().expect("tempdir");
    let init = kluis::config::init(dir.path(), "127.0.0.1:0").expect("init");
    let tokens: BTreeMap<String, String> = init
        .tokens
        .iter()
        .map(|(_, role, token)| (role.clone(), token.to_string()))
        .collect();
    let running = start(dir.path()).await;
    let mut c = Clients::new(running.local_addr, &tokens).await;
    let plain = c.applicant("a@example.nl").await;
    let pooled = c.applicant("b@example.nl").await;
    let held = c.applicant("d@example.nl").await;
    for id in [&plain, &pooled, &held] {
        c.recruiter
            .set_lifecycle(SetLifecycleRequest {
                record_id: id.clone(),
                stage: "procedure_closed".into(),
                date: "2026-01-10".into(),
            })
            .await
            .expect("closed");
    }
    c.recruiter
        .set_consent(SetConsentRequest {
            record_id: pooled.clone(),
            purpose: "talent_pool".into(),
            granted: true,
        })
        .await
        .expect("consent");
    c.privacy_officer
        .set_legal_hold(SetLegalHoldRequest {
            record_id: held.clone(),
            hold: true,
            reason: "labour court case 2026/113".into(),
        })
        .await
        .expect("hold");
    let former = c.employee("c@example.nl", "ended", "2026-03-31").await;
    // No clock: still in procedure, and employed.
    c.applicant("e@example.nl").await;
    c.employee("f@example.nl", "employed", "2026-01-05").await;
    drop(c);
    running.shutdown().await.expect("clean shutdown");
    (
        dir,
        Ids {
            plain,
            pooled,
            held,
            former,
        },
    )
}

/// The audit chain head of the data directory (the server must be stopped).
async fn audit_head(data: &Path) -> Vec<u8> {
    let store = SledStore::open(data).expect("open the data directory");
    store
        .get(Keyspace::Meta, b"audit/head")
        .await
        .expect("read")
        .expect("an audit head")
}

/// One row of the plan table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    erase_on: String,
    record: String,
    stage: String,
    category: String,
    status: String,
    basis: String,
}

/// The plan table in `stdout`: its rows (up to the first blank line) and the lines after it.
fn plan_table(stdout: &str) -> (Vec<Row>, Vec<String>) {
    let mut lines = stdout.lines();
    let header = lines.next().expect("a table header");
    assert!(
        header
            .split_whitespace()
            .eq(["ERASE", "ON", "RECORD", "STAGE", "CATEGORY", "STATUS", "BASIS"]),
        "{header}"
    );
    let at = |name: &str| header.find(name).expect("a column");
    let starts = [
        0,
        at("RECORD"),
        at("STAGE"),
        at("CATEGORY"),
        at("STATUS"),
        at("BASIS"),
    ];
    let mut rows = Vec::new();
    for line in lines.by_ref().take_while(|l| !l.is_empty()) {
        let cell = |i: usize| {
            let end = starts.get(i + 1).copied().unwrap_or(line.len());
            line[starts[i]..end].trim().to_string()
        };
        rows.push(Row {
            erase_on: cell(0),
            record: cell(1),
            stage: cell(2),
            category: cell(3),
            status: cell(4),
            basis: cell(5),
        });
    }
    (rows, lines.map(str::to_string).collect())
}

fn plan_args<'a>(config: &'a Path, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["retention", "plan", "--config", path(config)];
    args.extend_from_slice(more);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_lists_each_category_with_its_date_and_changes_nothing() {
    let (dir, ids) = set_up().await;
    let config = dir.path().join("kluis.toml");
    let data = dir.path().join("data");
    let head = audit_head(&data).await;

    let run = kluis(&plan_args(&config, &["--at", "2026-02-07"])).await;
    assert_eq!(run.code, 0, "{}", run.all());
    let (rows, rest) = plan_table(&run.stdout);
    let got: Vec<(&str, &str, &str, &str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r.erase_on.as_str(),
                r.record.as_str(),
                r.stage.as_str(),
                r.category.as_str(),
                r.status.as_str(),
            )
        })
        .collect();
    // Sorted by date, then record id.
    let (first, second) = if ids.plain < ids.held {
        (
            (ids.plain.as_str(), "due"),
            (ids.held.as_str(), "held (legal hold)"),
        )
    } else {
        (
            (ids.held.as_str(), "held (legal hold)"),
            (ids.plain.as_str(), "due"),
        )
    };
    let closed = "procedure_closed";
    assert_eq!(
        got,
        vec![
            ("2026-02-07", first.0, closed, "contact", first.1),
            ("2026-02-07", second.0, closed, "contact", second.1),
            (
                "2027-01-10",
                ids.pooled.as_str(),
                closed,
                "contact",
                "scheduled"
            ),
            (
                "2028-03-31",
                ids.former.as_str(),
                "ended",
                "contact",
                "scheduled"
            ),
            (
                "2031-03-31",
                ids.former.as_str(),
                "ended",
                "identity",
                "scheduled"
            ),
            (
                "2033-03-31",
                ids.former.as_str(),
                "ended",
                "financial",
                "scheduled"
            ),
        ],
        "{}",
        run.stdout
    );
    assert!(rows[0].basis.contains("AP guidance"), "{}", run.stdout);
    assert!(
        rows[5].basis.contains("fiscal retention duty"),
        "{}",
        run.stdout
    );
    assert_eq!(
        rest,
        [
            "2 categories of 2 records due by 2026-02-07 (1 held by legal hold or restriction); 4 more scheduled later",
            "2 records have no running clock (applicants in procedure, employees)",
        ],
        "{}",
        run.stdout
    );
    assert!(run.stderr.is_empty(), "{}", run.stderr);

    // The same as one JSON document.
    let run = kluis(&plan_args(
        &config,
        &["--at", "2026-02-07", "--format", "json"],
    ))
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    let doc: Value = serde_json::from_str(&run.stdout).expect("one JSON document");
    assert_eq!(doc["at"], "2026-02-07");
    assert_eq!(doc["due"], 2);
    assert_eq!(doc["held"], 1);
    assert_eq!(doc["scheduled"], 4);
    assert_eq!(doc["without_clock"], 2);
    let entries = doc["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 6);
    let as_json: Vec<(&str, &str, &str, bool, bool)> = entries
        .iter()
        .map(|e| {
            (
                e["erase_on"].as_str().expect("erase_on"),
                e["record_id"].as_str().expect("record_id"),
                e["category"].as_str().expect("category"),
                e["due"].as_bool().expect("due"),
                e["legal_hold"].as_bool().expect("legal_hold"),
            )
        })
        .collect();
    let from_table: Vec<(&str, &str, &str, bool, bool)> = rows
        .iter()
        .map(|r| {
            (
                r.erase_on.as_str(),
                r.record.as_str(),
                r.category.as_str(),
                r.status != "scheduled",
                r.status.starts_with("held"),
            )
        })
        .collect();
    assert_eq!(as_json, from_table);
    assert_eq!(entries[5]["stage"], "ended");
    assert_eq!(entries[5]["basis"], rows[5].basis.as_str());

    // A later date: more is due.
    let run = kluis(&plan_args(&config, &["--at", "2028-03-31"])).await;
    assert_eq!(run.code, 0, "{}", run.all());
    let (rows, rest) = plan_table(&run.stdout);
    let statuses: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == "due").count(), 3);
    assert_eq!(
        rest[0],
        "4 categories of 4 records due by 2028-03-31 (1 held by legal hold or restriction); 2 more scheduled later"
    );

    // Nothing was written: the audit chain did not move, and every record is still there.
    assert_eq!(audit_head(&data).await, head);
    let verify = kluis(&["audit", "verify", "--data-dir", path(&data)]).await;
    assert_eq!(verify.code, 0, "{}", verify.all());
    let export = kluis(&["audit", "export", "--data-dir", path(&data)]).await;
    assert_eq!(export.code, 0, "{}", export.all());
    assert!(
        !export.stdout.contains("EraseRecord"),
        "nothing was erased: {}",
        export.stdout
    );
}

/// `kluis.toml` of `dir` with `extra` appended, as another file in the same directory.
fn config_with(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(dir.join("kluis.toml")).expect("config");
    let other = dir.join(name);
    std::fs::write(&other, format!("{text}\n{extra}\n")).expect("write config");
    other
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_rules_apply_and_what_cannot_be_planned_is_refused() {
    let (dir, ids) = set_up().await;
    let config = dir.path().join("kluis.toml");
    let data = dir.path().join("data");
    let head = audit_head(&data).await;

    // [retention] in the configuration: applicants 14 days, former employees' contact data 1
    // year.
    let short = config_with(
        dir.path(),
        "short.toml",
        "[retention]\napplicant_max_days = 14\n[retention.former_employee.contact]\nmax_years = 1\nbasis = \"house rule\"\n[retention.former_employee.personal]\nmax_years = 1\nbasis = \"house rule\"\n[retention.former_employee.cv]\nmax_years = 1\nbasis = \"house rule\"\n[retention.former_employee.absence]\nmax_years = 1\nbasis = \"house rule\"\n[retention.former_employee.identity]\nkeep_years = 5\nmax_years = 5\nbasis = \"payroll tax law\"\n[retention.former_employee.financial]\nkeep_years = 7\nmax_years = 7\nbasis = \"fiscal duty\"",
    );
    let run = kluis(&plan_args(&short, &["--at", "2026-01-24"])).await;
    assert_eq!(run.code, 0, "{}", run.all());
    let (rows, rest) = plan_table(&run.stdout);
    let plain = rows
        .iter()
        .find(|r| r.record == ids.plain)
        .expect("the applicant is listed");
    assert_eq!(
        (plain.erase_on.as_str(), plain.status.as_str()),
        ("2026-01-24", "due")
    );
    let contact = rows
        .iter()
        .find(|r| r.record == ids.former && r.category == "contact")
        .expect("the former employee's contact data is listed");
    assert_eq!(
        (contact.erase_on.as_str(), contact.basis.as_str()),
        ("2027-03-31", "house rule")
    );
    assert!(rest[0].starts_with("2 categories of 2 records due by 2026-01-24"));

    // --data-dir overrides the configuration's.
    let elsewhere = config_with(dir.path(), "elsewhere.toml", "");
    let text = std::fs::read_to_string(&elsewhere)
        .expect("config")
        .replace("data_dir = \"data\"", "data_dir = \"nowhere\"");
    std::fs::write(&elsewhere, text).expect("write config");
    let run = kluis(&plan_args(&elsewhere, &["--at", "2026-02-07"])).await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("nowhere"), "{}", run.all());
    let run = kluis(&plan_args(
        &elsewhere,
        &["--at", "2026-02-07", "--data-dir", path(&data)],
    ))
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(plan_table(&run.stdout).0.len(), 6, "{}", run.stdout);

    // Rules that do not validate.
    let bad = config_with(
        dir.path(),
        "bad.toml",
        "[retention]\nkeep_while_employed = [\"shoe_size\"]",
    );
    let run = kluis(&plan_args(&bad, &["--at", "2026-02-07"])).await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("shoe_size"), "{}", run.all());
    assert!(run.stdout.is_empty(), "{}", run.all());

    // A consent purpose the policy does not have: the server refuses to start on it, and the
    // plan is refused the same way (not planned with every consenting applicant at 28 days).
    let typo = config_with(
        dir.path(),
        "typo.toml",
        "[retention]\napplicant_consent_purpose = \"talent_pol\"",
    );
    let run = kluis(&plan_args(&typo, &["--at", "2026-02-07"])).await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("talent_pol"), "{}", run.all());
    assert!(run.stderr.contains("not a purpose"), "{}", run.all());
    assert!(run.stdout.is_empty(), "{}", run.all());
    assert!(
        kluis::config::load(&typo).is_err(),
        "the server refuses it too"
    );

    // A bad --at.
    for at in ["07-02-2026", "2026-02-30", "tomorrow"] {
        let run = kluis(&plan_args(&config, &["--at", at])).await;
        assert_eq!(run.code, 2, "{}", run.all());
        assert!(run.stderr.contains("--at"), "{}", run.all());
        assert!(run.stdout.is_empty(), "{}", run.all());
    }

    // --config and --dev exclude each other; no configuration at all.
    let run = kluis(&plan_args(&config, &["--dev"])).await;
    assert_eq!(run.code, 2, "{}", run.all());
    let missing = dir.path().join("missing.toml");
    let run = kluis(&plan_args(&missing, &[])).await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("no configuration"), "{}", run.all());

    // Another master key does not open the data directory (and creates no keys in it).
    let other_key = dir.path().join("keys").join("other.key");
    kluis::keys::MasterKey::create_file(&other_key).expect("another key");
    let wrong = config_with(dir.path(), "wrong.toml", "");
    let text = std::fs::read_to_string(&wrong)
        .expect("config")
        .replace("keys/master.key", "keys/other.key");
    std::fs::write(&wrong, text).expect("write config");
    let run = kluis(&plan_args(&wrong, &["--at", "2026-02-07"])).await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("master key"), "{}", run.all());

    assert_eq!(audit_head(&data).await, head);

    // While the server runs, the data directory is not the tool's.
    let running = start(dir.path()).await;
    let run = kluis(&plan_args(&config, &["--at", "2026-02-07"])).await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("in use"), "{}", run.all());
    assert!(run.stdout.is_empty(), "{}", run.all());
    running.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_records_are_reported_apart_and_exit_1() {
    let (dir, ids) = set_up().await;
    let config = dir.path().join("kluis.toml");
    damage_header_in(&dir.path().join("data"), &ids.former).await;

    let run = kluis(&plan_args(&config, &["--at", "2026-02-07"])).await;
    assert_eq!(run.code, 1, "{}", run.all());
    let (rows, rest) = plan_table(&run.stdout);
    assert!(
        rows.iter().all(|r| r.record != ids.former),
        "left out: {}",
        run.stdout
    );
    assert_eq!(rows.len(), 3, "{}", run.stdout);
    assert_eq!(
        rest,
        [
            "2 categories of 2 records due by 2026-02-07 (1 held by legal hold or restriction); 1 more scheduled later".to_string(),
            // Not counted as a record without a running clock.
            "2 records have no running clock (applicants in procedure, employees)".to_string(),
            format!("1 record damaged (left out): {}", ids.former),
        ],
        "{}",
        run.stdout
    );
    assert!(
        run.stderr.contains("error: 1 record damaged"),
        "{}",
        run.all()
    );

    let run = kluis(&plan_args(
        &config,
        &["--at", "2026-02-07", "--format", "json"],
    ))
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    let doc: Value = serde_json::from_str(&run.stdout).expect("one JSON document");
    assert_eq!(doc["damaged"], 1);
    assert_eq!(doc["damaged_records"][0], ids.former.as_str());
    assert_eq!(doc["without_clock"], 2);
    assert_eq!(doc["entries"].as_array().expect("entries").len(), 3);
}

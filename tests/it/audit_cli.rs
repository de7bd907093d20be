//! The real `kluis audit …` binary against a real vault: offline verification finds a
//! tampered event, export (online and offline) prints JSON lines with names and never values,
//! the server's refusals and usage errors have their exit codes, and the breach report lists
//! exactly the records and fields one principal touched.

use std::collections::BTreeMap;
use std::path::Path;

use kluis::proto::{FindRecordsRequest, GetRecordRequest};
use kluis::store::{Batch, Keyspace, SledStore, Store};
use serde_json::Value;

use crate::helpers::*;

/// Runs `kluis <args>` off the async runtime, with `KLUIS_TOKEN` = `token` if given.
async fn kluis(args: &[impl AsRef<str>], token: Option<&str>) -> Run {
    run_kluis(None, args, token).await
}

fn path(p: &Path) -> String {
    path_arg(p)
}

fn server(vault: &TestVault) -> String {
    format!("http://{}", vault.addr)
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_str().expect("string").to_string())
        .collect()
}

async fn get(
    client: &mut Client,
    id: &str,
    purpose: &str,
    names: &[&str],
) -> Result<(), tonic::Status> {
    client
        .get_record(GetRecordRequest {
            record_id: id.into(),
            purpose: purpose.into(),
            field_names: names.iter().map(|s| s.to_string()).collect(),
        })
        .await
        .map(drop)
}

/// A date `days` from today (UTC), as `YYYY-MM-DD`.
fn date(days: i64) -> String {
    (chrono::Utc::now().date_naive() + chrono::Duration::days(days))
        .format("%Y-%m-%d")
        .to_string()
}

#[tokio::test]
async fn offline_verify_says_ok_then_names_the_tampered_event() {
    let mut vault = spawn_vault().await;
    let data = path(&data_dir(&vault.dir));
    let mut recruiter = vault.client("recruiter").await;
    let mut payroll = vault.client("payroll").await;
    let a = create_with(
        &mut recruiter,
        "recruitment",
        &[
            ("full_name", text("Jan Jansen")),
            ("email", sample_value("email")),
        ],
    )
    .await;
    get(&mut recruiter, &a, "recruitment", &["email"])
        .await
        .expect("get");
    let b = create_with(
        &mut payroll,
        "payroll",
        &[("bsn", sample_value("bsn")), ("iban", sample_value("iban"))],
    )
    .await;
    get(&mut payroll, &b, "payroll", &[]).await.expect("get");
    get(&mut payroll, &a, "payroll", &["email"])
        .await
        .expect("get");

    // While the server holds the data directory: refused, with what to do instead.
    let busy = kluis(&["audit", "verify", "--data-dir", &data], None).await;
    assert_eq!(busy.code, 2, "{}", busy.all());
    assert!(busy.stderr.contains("stop the server"), "{}", busy.all());
    assert!(busy.stderr.contains("VerifyChain"), "{}", busy.all());

    vault.stop().await;
    let ok = kluis(&["audit", "verify", "--data-dir", &data], None).await;
    assert_eq!(ok.code, 0, "{}", ok.all());
    assert!(ok.stdout.starts_with("ok: 5 events, "), "{}", ok.all());
    // The server signed a last checkpoint when it stopped.
    assert!(
        ok.stdout.contains(" checkpoint, head ") || ok.stdout.contains(" checkpoints, head "),
        "{}",
        ok.all()
    );
    assert!(!ok.stdout.contains(" 0 checkpoints"), "{}", ok.all());

    // Offline export: every event, in order.
    let export = kluis(&["audit", "export", "--data-dir", &data], None).await;
    assert_eq!(export.code, 0, "{}", export.all());
    let seqs: Vec<u64> = json_lines(&export.stdout)
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);

    // Another key did not sign the checkpoints.
    let other = tempfile::tempdir().expect("tempdir");
    kluis::audit::Signer::load_or_create(&other.path().join("audit-signing.key"), true)
        .expect("other key");
    let other_pub = path(&other.path().join("audit-signing.pub"));
    let wrong = kluis(
        &[
            "audit",
            "verify",
            "--data-dir",
            &data,
            "--public-key",
            &other_pub,
        ],
        None,
    )
    .await;
    assert_eq!(wrong.code, 1, "{}", wrong.all());
    // Said as what it is, not as tampering (every checkpoint would have a bad signature).
    assert!(
        wrong.stdout.contains("not the key verified with")
            && wrong.stdout.contains("the key is not this store's"),
        "{}",
        wrong.all()
    );

    // A store whose recorded checkpoint key was replaced: the chain verifies with the key
    // file, but the store is not what the server would open.
    {
        let store = SledStore::open(&data_dir(&vault.dir)).expect("open store");
        let mut batch = Batch::default();
        batch.put(
            Keyspace::Meta,
            kluis::audit::META_SIGNING_KEY.to_vec(),
            vec![0u8; 32],
        );
        store.commit(batch).await.expect("replace the recorded key");
    }
    let replaced = kluis(&["audit", "verify", "--data-dir", &data], None).await;
    assert_eq!(replaced.code, 1, "{}", replaced.all());
    assert!(
        replaced.stdout.contains(&format!(
            "the store records checkpoint key {}",
            "00".repeat(32)
        )),
        "{}",
        replaced.all()
    );
    {
        let store = SledStore::open(&data_dir(&vault.dir)).expect("open store");
        let keys = Path::new(&data).parent().expect("parent").join("keys");
        let public = kluis::audit::read_public_key(&keys.join(kluis::audit::PUBLIC_KEY_FILE))
            .expect("public key");
        let mut batch = Batch::default();
        batch.put(
            Keyspace::Meta,
            kluis::audit::META_SIGNING_KEY.to_vec(),
            public.to_vec(),
        );
        store
            .commit(batch)
            .await
            .expect("put the recorded key back");
    }

    // Flip a byte near the end of event 3.
    {
        let store = SledStore::open(&data_dir(&vault.dir)).expect("open store");
        let mut value = kluis::audit::raw_event(&store, 3)
            .await
            .expect("get")
            .expect("event 3");
        let last = value.len() - 1;
        value[last] ^= 0x01;
        kluis::audit::overwrite_raw_event(&store, 3, Some(value))
            .await
            .expect("tamper");
    }
    let bad = kluis(&["audit", "verify", "--data-dir", &data], None).await;
    assert_eq!(bad.code, 1, "{}", bad.all());
    assert!(
        bad.stdout
            .starts_with("FAILED: first bad event 3: event 3 "),
        "{}",
        bad.all()
    );
    assert!(
        bad.stdout.contains("2 events and 0 checkpoints checked"),
        "{}",
        bad.all()
    );

    // Put event 3 back, then delete event 4, then (restored) swap events 4 and 5.
    async fn edit(data: &str, f: impl FnOnce(&mut BTreeMap<u64, Vec<u8>>)) {
        let store = SledStore::open(Path::new(data)).expect("open store");
        // Every event, each written back under its own key (the format before blocks, which
        // readers still take), so that an event can be deleted and put back.
        let mut batch = Batch::default();
        let mut events = kluis::audit::take_raw_events(&store, &mut batch)
            .await
            .expect("scan");
        f(&mut events);
        for (seq, v) in events {
            batch.put(Keyspace::Audit, kluis::audit::event_key(seq).to_vec(), v);
        }
        store.commit(batch).await.expect("edit");
    }
    let flip_back = |events: &mut BTreeMap<u64, Vec<u8>>| {
        if let Some(v) = events.get_mut(&3) {
            let last = v.len() - 1;
            v[last] ^= 0x01;
        }
    };
    edit(&data, flip_back).await;
    let ok = kluis(&["audit", "verify", "--data-dir", &data], None).await;
    assert_eq!(ok.code, 0, "{}", ok.all());
    let mut kept = None;
    edit(&data, |events| kept = events.remove(&4)).await;
    let deleted = kluis(&["audit", "verify", "--data-dir", &data], None).await;
    assert_eq!(deleted.code, 1, "{}", deleted.all());
    assert!(
        deleted.stdout.starts_with("FAILED: first bad event 4: "),
        "{}",
        deleted.all()
    );
    // Export and breach report go on past the lost event, but fail and say so (review 30:
    // they left it out without a word, exit 0).
    let exported = kluis(&["audit", "export", "--data-dir", &data], None).await;
    assert_eq!(exported.code, 1, "{}", exported.all());
    let seqs: Vec<u64> = json_lines(&exported.stdout)
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert!(
        seqs.contains(&3) && !seqs.contains(&4) && seqs.contains(&5),
        "{seqs:?}"
    );
    assert!(
        exported
            .stderr
            .contains("1 event(s) from sequence number 4 on could not be read in order")
            && exported.stderr.contains("this export is incomplete"),
        "{}",
        exported.all()
    );
    let (since, until) = (date(-1), date(2));
    let report = kluis(
        &[
            "audit",
            "breach-report",
            "--principal",
            "test-recruiter",
            "--since",
            &since,
            "--until",
            &until,
            "--data-dir",
            &data,
        ],
        None,
    )
    .await;
    assert_eq!(report.code, 1, "{}", report.all());
    assert!(
        report.stderr.contains("this report is incomplete"),
        "{}",
        report.all()
    );
    let four = kept.expect("event 4 was there");
    edit(&data, |events| {
        let five = events.remove(&5).expect("event 5");
        events.insert(4, five);
        events.insert(5, four);
    })
    .await;
    let moved = kluis(&["audit", "verify", "--data-dir", &data], None).await;
    assert_eq!(moved.code, 1, "{}", moved.all());
    assert!(
        moved.stdout.starts_with("FAILED: first bad event 4: "),
        "{}",
        moved.all()
    );

    // No such data directory: a usage error, and nothing created.
    let missing = path(&vault.dir.path().join("nowhere"));
    let none = kluis(&["audit", "verify", "--data-dir", &missing], None).await;
    assert_eq!(none.code, 2, "{}", none.all());
    assert!(!vault.dir.path().join("nowhere").exists());
}

/// An older copy of the data directory (a backup) ends before the live anchor: verified
/// against the keys directory as it is now, it fails as "restored from an older backup";
/// `--no-anchor` checks it against its own checkpoints alone.
#[tokio::test]
async fn an_older_backup_fails_against_the_live_anchor_unless_no_anchor() {
    let mut vault = spawn_vault().await;
    let mut recruiter = vault.client("recruiter").await;
    create_with(
        &mut recruiter,
        "recruitment",
        &[("full_name", text("Eerste"))],
    )
    .await;
    vault.stop().await;
    let backup = vault.dir.path().join("backup").join("data");
    copy_dir(&data_dir(&vault.dir), &backup);
    vault.start().await.expect("restart");
    let mut recruiter = vault.client("recruiter").await;
    create_with(
        &mut recruiter,
        "recruitment",
        &[("full_name", text("Tweede"))],
    )
    .await;
    vault.stop().await;
    let public_key = path(
        &vault
            .dir
            .path()
            .join("keys")
            .join(kluis::audit::PUBLIC_KEY_FILE),
    );
    let backup = path(&backup);
    let args = |extra: &[&str]| {
        let mut a = vec![
            "audit",
            "verify",
            "--data-dir",
            backup.as_str(),
            "--public-key",
            public_key.as_str(),
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let anchored = kluis(&args(&[]), None).await;
    assert_eq!(anchored.code, 1, "{}", anchored.all());
    assert!(
        anchored.stdout.contains("restored from an older backup"),
        "{}",
        anchored.all()
    );
    let own = kluis(&args(&["--no-anchor"]), None).await;
    assert_eq!(own.code, 0, "{}", own.all());
    assert!(
        own.stdout.starts_with("ok: ") && own.stdout.contains("anchor: not checked (--no-anchor)"),
        "{}",
        own.all()
    );
    // The live directory verifies with its anchor.
    let live = path(&data_dir(&vault.dir));
    let ok = kluis(&["audit", "verify", "--data-dir", live.as_str()], None).await;
    assert_eq!(ok.code, 0, "{}", ok.all());
    assert!(ok.stdout.contains("\nanchor: event "), "{}", ok.all());
    // An anchor whose signature does not verify is a failed verification, not an IO error
    // (review 30: exit 2, no `FAILED:` line).
    let keys = vault.dir.path().join("keys");
    let anchor = std::fs::read_dir(&keys)
        .expect("keys dir")
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(kluis::anchor::FILE_PREFIX))
        })
        .expect("an anchor file");
    let text = std::fs::read_to_string(&anchor).expect("read anchor");
    let flipped: String = {
        let end = text.trim_end().len() - 1;
        let last = text.as_bytes()[end];
        let swap = if last == b'0' { '1' } else { '0' };
        format!("{}{swap}{}", &text[..end], &text[end + 1..])
    };
    assert_ne!(flipped, text);
    std::fs::write(&anchor, flipped).expect("tamper with the anchor");
    let bad = kluis(&["audit", "verify", "--data-dir", live.as_str()], None).await;
    assert_eq!(bad.code, 1, "{}", bad.all());
    assert!(
        bad.stdout.starts_with("FAILED: the audit anchor ")
            && bad.stdout.contains("does not verify"),
        "{}",
        bad.all()
    );
}

#[tokio::test]
async fn online_export_prints_names_never_values_and_needs_an_audit_role() {
    let vault = spawn_vault().await;
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("Plantedname{marker}");
    let email = format!("planted.{marker}@example.nl");
    let iban = "NL91ABNA0417164300";
    let mut recruiter = vault.client("recruiter").await;
    let mut payroll = vault.client("payroll").await;
    let id = create_with(
        &mut recruiter,
        "recruitment",
        &[("full_name", text(&name)), ("email", text(&email))],
    )
    .await;
    get(&mut recruiter, &id, "recruitment", &["full_name", "email"])
        .await
        .expect("get");
    payroll
        .update_record(kluis::proto::UpdateRecordRequest {
            record_id: id.clone(),
            purpose: "payroll".into(),
            expected_revision: 0,
            set: fields(&[("iban", text(iban))]),
            clear: vec![],
        })
        .await
        .expect("update");
    get(&mut payroll, &id, "payroll", &[]).await.expect("get");
    recruiter
        .find_records(FindRecordsRequest {
            purpose: "recruitment".into(),
            field_name: "email".into(),
            value: email.clone(),
        })
        .await
        .expect("find");

    let url = server(&vault);
    let run = kluis(
        &["audit", "export", "--server", &url],
        Some(&vault.tokens["auditor"]),
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    for planted in [name.as_str(), email.as_str(), iban, &marker] {
        assert!(!run.all().contains(planted), "a field value was printed");
    }
    let events = json_lines(&run.stdout);
    assert_eq!(events.len(), 5, "{}", run.stdout);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"].as_u64(), Some(i as u64 + 1));
        let time = e["time"].as_str().expect("time");
        assert!(time.ends_with('Z') && time.len() == 24, "{time}");
        chrono::DateTime::parse_from_rfc3339(time).expect("RFC 3339");
        let hash = e["hash"].as_str().expect("hash");
        assert_eq!(hex::decode(hash).expect("hex").len(), 32);
        assert_eq!(e["outcome"], "ok");
    }
    let gets: Vec<&Value> = events
        .iter()
        .filter(|e| e["action"] == "GetRecord")
        .collect();
    assert_eq!(gets.len(), 2);
    assert_eq!(gets[0]["principal"], "test-recruiter");
    assert_eq!(gets[0]["role"], "recruiter");
    assert_eq!(gets[0]["purpose"], "recruitment");
    assert_eq!(gets[0]["record_id"], id.as_str());
    let mut names = strings(&gets[0]["field_names"]);
    names.sort();
    assert_eq!(names, vec!["email", "full_name"]);
    assert_eq!(gets[1]["principal"], "test-payroll");
    assert!(strings(&gets[1]["field_names"]).contains(&"iban".to_string()));
    assert_eq!(events[4]["action"], "FindRecords");
    // The search names the record it found.
    assert_eq!(events[4]["record_id"], id.as_str());
    assert_eq!(strings(&events[4]["field_names"]), vec!["email"]);

    // Filters: one record, one principal, a window.
    let upper = id.to_uppercase();
    let since = date(-1);
    let until = date(1);
    let run = kluis(
        &[
            "audit",
            "export",
            "--server",
            &url,
            "--record",
            &upper,
            "--principal",
            "test-payroll",
            "--since",
            &since,
            "--until",
            &until,
        ],
        Some(&vault.tokens["auditor"]),
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    let actions: Vec<String> = json_lines(&run.stdout)
        .iter()
        .map(|e| e["action"].as_str().expect("action").to_string())
        .collect();
    assert_eq!(actions, vec!["UpdateRecord", "GetRecord"]);

    // Roles without the audit query right are refused by the server.
    let refused = kluis(
        &["audit", "export", "--server", &url],
        Some(&vault.tokens["recruiter"]),
    )
    .await;
    assert_eq!(refused.code, 1, "{}", refused.all());
    assert!(
        refused.stderr.contains("PERMISSION_DENIED"),
        "{}",
        refused.all()
    );
    assert!(refused.stdout.is_empty());
    let unknown = kluis(&["audit", "export", "--server", &url], Some("kluis_wrong")).await;
    assert_eq!(unknown.code, 1, "{}", unknown.all());
    assert!(
        unknown.stderr.contains("UNAUTHENTICATED"),
        "{}",
        unknown.all()
    );

    // Usage errors: no token, bad times, bad record id, https without a CA.
    let no_token = kluis(&["audit", "export", "--server", &url], None).await;
    assert_eq!(no_token.code, 2, "{}", no_token.all());
    assert!(
        no_token.stderr.contains("KLUIS_TOKEN"),
        "{}",
        no_token.all()
    );
    let auditor = Some(vault.tokens["auditor"].as_str());
    for (args, needle) in [
        (vec!["--since", "yesterday"], "--since"),
        (vec!["--until", "2026-13-01"], "--until"),
        (
            vec!["--since", "2026-11-26", "--until", "2026-11-25"],
            "--until",
        ),
        (vec!["--record", "not-a-record"], "--record"),
    ] {
        let mut all = vec!["audit", "export", "--server", &url];
        all.extend(args);
        let run = kluis(&all, auditor).await;
        assert_eq!(run.code, 2, "{}", run.all());
        assert!(run.stderr.contains(needle), "{}", run.all());
    }
    let https = format!("https://{}", vault.addr);
    let run = kluis(&["audit", "export", "--server", &https], auditor).await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("--ca-cert"), "{}", run.all());
}

#[tokio::test]
async fn breach_report_lists_exactly_the_records_and_fields_the_principal_touched() {
    let mut vault = spawn_vault().await;
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let email = format!("planted.{marker}@example.nl");
    let mut recruiter = vault.client("recruiter").await;
    let mut payroll = vault.client("payroll").await;
    let r1 = create_with(
        &mut recruiter,
        "recruitment",
        &[
            ("full_name", text(&format!("Name{marker}"))),
            ("email", text(&email)),
        ],
    )
    .await;
    let r2 = create_with(
        &mut recruiter,
        "recruitment",
        &[
            ("full_name", text("Piet")),
            ("phone", sample_value("phone")),
        ],
    )
    .await;
    let r3 = create_with(&mut payroll, "payroll", &[("bsn", sample_value("bsn"))]).await;
    // Payroll only: not in the recruiter's report.
    let r4 = create_with(&mut payroll, "payroll", &[("iban", sample_value("iban"))]).await;
    get(&mut payroll, &r1, "payroll", &["email"])
        .await
        .expect("get");
    get(&mut recruiter, &r1, "recruitment", &["email"])
        .await
        .expect("get");
    let denied = get(&mut recruiter, &r3, "recruitment", &["bsn"]).await;
    assert_eq!(
        denied.expect_err("recruiter may not read bsn").code(),
        tonic::Code::PermissionDenied
    );
    recruiter
        .find_records(FindRecordsRequest {
            purpose: "recruitment".into(),
            field_name: "email".into(),
            value: email.clone(),
        })
        .await
        .expect("find");

    let url = server(&vault);
    let (since, until) = (date(-1), date(2));
    let auditor = Some(vault.tokens["auditor"].as_str());
    let args = |rest: &[&str]| -> Vec<String> {
        [
            "audit",
            "breach-report",
            "--principal",
            "test-recruiter",
            "--since",
            &since,
            "--until",
            &until,
        ]
        .iter()
        .chain(rest)
        .map(|s| s.to_string())
        .collect()
    };

    let online = kluis(&args(&["--format", "json", "--server", &url]), auditor).await;
    assert_eq!(online.code, 0, "{}", online.all());
    assert!(!online.all().contains(&marker), "a field value was printed");
    let report: Value = serde_json::from_str(&online.stdout).expect("one JSON document");
    assert_eq!(report["principal"], "test-recruiter");
    assert_eq!(report["since"], format!("{since}T00:00:00.000Z"));
    assert_eq!(report["until"], format!("{until}T00:00:00.000Z"));
    assert_eq!(report["total_events"], 5);
    // r3 only through a refused read: attempted, and bsn disclosed nothing.
    assert_eq!(report["records_touched"], 2);
    assert_eq!(report["records_attempted"], 1);
    assert_eq!(
        strings(&report["distinct_fields"]),
        vec!["email", "full_name", "phone"]
    );
    assert_eq!(strings(&report["distinct_fields_attempted"]), vec!["bsn"]);
    // The search found r1: it counts there, not as an event without a record.
    assert_eq!(report["without_record"]["events"], 0);
    let records: BTreeMap<String, &Value> = report["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| (r["record_id"].as_str().expect("id").to_string(), r))
        .collect();
    let mut expected_ids = vec![r1.clone(), r2.clone(), r3.clone()];
    expected_ids.sort();
    assert_eq!(records.keys().cloned().collect::<Vec<_>>(), expected_ids);
    assert!(!records.contains_key(&r4));
    let one = records[&r1];
    assert_eq!(strings(&one["field_names"]), vec!["email", "full_name"]);
    assert_eq!(
        strings(&one["actions"]),
        vec!["CreateRecord", "FindRecords", "GetRecord"]
    );
    assert_eq!(one["events"], 3);
    assert_eq!(one["outcomes"], serde_json::json!({"ok": 3}));
    assert!(one["first"].as_str().expect("first") <= one["last"].as_str().expect("last"));
    let two = records[&r2];
    assert_eq!(strings(&two["field_names"]), vec!["full_name", "phone"]);
    assert_eq!(strings(&two["actions"]), vec!["CreateRecord"]);
    let three = records[&r3];
    assert!(strings(&three["field_names"]).is_empty());
    assert_eq!(strings(&three["fields_attempted"]), vec!["bsn"]);
    assert_eq!(three["outcomes"], serde_json::json!({"denied": 1}));
    // In the order first touched.
    assert_eq!(report["records"][0]["record_id"], r1.as_str());

    // The table names the same records.
    let table = kluis(&args(&["--server", &url]), auditor).await;
    assert_eq!(table.code, 0, "{}", table.all());
    assert!(
        table.stdout.contains("Records touched:  2")
            && table.stdout.contains("Only attempted:   1"),
        "{}",
        table.stdout
    );
    for id in [&r1, &r2, &r3] {
        assert!(table.stdout.contains(id.as_str()), "{}", table.stdout);
    }
    assert!(!table.stdout.contains(&r4), "{}", table.stdout);

    // A window before any of it: nothing.
    let empty = kluis(
        &[
            "audit",
            "breach-report",
            "--principal",
            "test-recruiter",
            "--since",
            "2001-01-01",
            "--until",
            "2001-01-02T00:00:00Z",
            "--format",
            "json",
            "--server",
            &url,
        ],
        auditor,
    )
    .await;
    assert_eq!(empty.code, 0, "{}", empty.all());
    let nothing: Value = serde_json::from_str(&empty.stdout).expect("json");
    assert_eq!(nothing["records_touched"], 0);
    assert_eq!(nothing["total_events"], 0);

    // Offline, from the data directory: the same report.
    vault.stop().await;
    let data = path(&data_dir(&vault.dir));
    let offline = kluis(&args(&["--format", "json", "--data-dir", &data]), None).await;
    assert_eq!(offline.code, 0, "{}", offline.all());
    let offline: Value = serde_json::from_str(&offline.stdout).expect("json");
    assert_eq!(offline, report);
}

#[tokio::test]
async fn a_masked_read_is_recorded_and_reported_as_masked() {
    let mut vault = spawn_vault().await;
    let mut payroll = vault.client("payroll").await;
    let mut po = vault.client("privacy_officer").await;
    let pair = [("bsn", sample_value("bsn")), ("iban", sample_value("iban"))];
    let r1 = create_with(&mut payroll, "payroll", &pair).await;
    let r2 = create_with(&mut payroll, "payroll", &pair).await;
    // Payroll reads IBAN in full; the privacy officer sees BSN (and IBAN) only masked.
    get(&mut payroll, &r1, "payroll", &["iban"])
        .await
        .expect("get");
    let answer = po
        .get_record(GetRecordRequest {
            record_id: r1.clone(),
            purpose: "data_subject_request".into(),
            field_names: vec!["bsn".into()],
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(text_of(&answer.fields["bsn"]), "*****2333");
    get(&mut po, &r1, "data_subject_request", &[])
        .await
        .expect("get");
    // r2: read masked, then exported (never masked): disclosed in full.
    get(&mut po, &r2, "data_subject_request", &["bsn"])
        .await
        .expect("get");
    po.export_record(kluis::proto::ExportRecordRequest {
        record_id: r2.clone(),
    })
    .await
    .expect("export");

    let gets: Vec<_> = vault
        .audit_events(kluis::proto::QueryEventsRequest::default())
        .await
        .into_iter()
        .filter(|e| e.action == "GetRecord")
        .collect();
    let masked: Vec<(&str, &str, Vec<&str>, Vec<&str>)> = gets
        .iter()
        .map(|e| {
            (
                e.principal.as_str(),
                e.record_id.as_str(),
                e.field_names.iter().map(String::as_str).collect(),
                e.masked_field_names.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        masked,
        vec![
            ("test-payroll", r1.as_str(), vec!["iban"], vec![]),
            (
                "test-privacy_officer",
                r1.as_str(),
                vec!["bsn"],
                vec!["bsn"]
            ),
            (
                "test-privacy_officer",
                r1.as_str(),
                vec!["bsn", "iban"],
                vec!["bsn", "iban"]
            ),
            (
                "test-privacy_officer",
                r2.as_str(),
                vec!["bsn"],
                vec!["bsn"]
            ),
        ]
    );

    let url = server(&vault);
    let (since, until) = (date(-1), date(2));
    let args = |rest: &[&str]| -> Vec<String> {
        [
            "audit",
            "breach-report",
            "--principal",
            "test-privacy_officer",
            "--since",
            &since,
            "--until",
            &until,
        ]
        .iter()
        .chain(rest)
        .map(|s| s.to_string())
        .collect()
    };
    let auditor = Some(vault.tokens["auditor"].as_str());
    let online = kluis(&args(&["--format", "json", "--server", &url]), auditor).await;
    assert_eq!(online.code, 0, "{}", online.all());
    let report: Value = serde_json::from_str(&online.stdout).expect("one JSON document");
    let records: BTreeMap<String, &Value> = report["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| (r["record_id"].as_str().expect("id").to_string(), r))
        .collect();
    assert!(strings(&records[&r1]["field_names"]).is_empty());
    assert_eq!(strings(&records[&r1]["fields_masked"]), vec!["bsn", "iban"]);
    // The export disclosed r2's BSN in full: full, not masked.
    assert_eq!(strings(&records[&r2]["field_names"]), vec!["bsn", "iban"]);
    assert!(strings(&records[&r2]["fields_masked"]).is_empty());
    assert_eq!(strings(&report["distinct_fields"]), vec!["bsn", "iban"]);
    assert!(strings(&report["distinct_fields_masked"]).is_empty());

    // The table marks r1's fields as masked.
    let table = kluis(&args(&["--server", &url]), auditor).await;
    assert_eq!(table.code, 0, "{}", table.all());
    let row = table
        .stdout
        .lines()
        .find(|l| l.starts_with(r1.as_str()))
        .unwrap_or_else(|| panic!("no row of r1: {}", table.stdout));
    assert!(
        row.contains("bsn (masked),iban (masked)"),
        "{}",
        table.stdout
    );

    // Export lines carry the list, always.
    let export = kluis(&["audit", "export", "--server", &url], auditor).await;
    assert_eq!(export.code, 0, "{}", export.all());
    let lines = json_lines(&export.stdout);
    assert!(lines.iter().all(|e| e["masked_field_names"].is_array()));
    let masked_lines: Vec<Vec<String>> = lines
        .iter()
        .map(|e| strings(&e["masked_field_names"]))
        .filter(|m| !m.is_empty())
        .collect();
    assert_eq!(
        masked_lines,
        vec![vec!["bsn"], vec!["bsn", "iban"], vec!["bsn"]]
    );

    // Offline, from the data directory: the same report.
    vault.stop().await;
    let data = path(&data_dir(&vault.dir));
    let offline = kluis(&args(&["--format", "json", "--data-dir", &data]), None).await;
    assert_eq!(offline.code, 0, "{}", offline.all());
    let offline: Value = serde_json::from_str(&offline.stdout).expect("json");
    assert_eq!(offline, report);
    let ok = kluis(&["audit", "verify", "--data-dir", &data], None).await;
    assert_eq!(ok.code, 0, "{}", ok.all());
}

#[tokio::test]
async fn export_over_tls_trusts_only_the_given_ca() {
    use kluis::config::TlsSettings;
    use kluis::crypto::SecretKey;
    use kluis::keys::MasterKey;
    use kluis::policy::{self, Policy};
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };

    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca")
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let trusted = ca("Kluis audit CLI test CA");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, "kluis.test");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &trusted).expect("sign");
    let token = policy::generate_token().expect("rng").to_string();
    let mut policy = Policy::default_policy();
    policy
        .add_token_hash("tls-auditor", "auditor", policy::token_hash(&token))
        .expect("principal");
    let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
    let mut settings = kluis::config::ephemeral(&dir.path().join("data"), master, policy);
    settings.tls = Some(TlsSettings {
        cert_pem: cert.pem().into_bytes(),
        key_pem: zeroize::Zeroizing::new(key.serialize_pem().into_bytes()),
        client_ca_pem: None,
        require_client_cert: false,
    });
    let running = kluis::server::start(settings)
        .await
        .expect("tls vault starts");
    let url = format!("https://127.0.0.1:{}", running.local_addr.port());
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, trusted.pem()).expect("write CA");
    let other_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_file, ca("Another CA").pem()).expect("write CA");

    let args = [
        "audit",
        "export",
        "--server",
        &url,
        "--ca-cert",
        &path(&ca_file),
    ];
    let first = kluis(&args, Some(&token)).await;
    assert_eq!(first.code, 0, "{}", first.all());
    // The first export's own QueryEvents call, audited.
    let second = kluis(&args, Some(&token)).await;
    assert_eq!(second.code, 0, "{}", second.all());
    let events = json_lines(&second.stdout);
    assert_eq!(events.len(), 1, "{}", second.stdout);
    assert_eq!(events[0]["principal"], "tls-auditor");
    assert_eq!(events[0]["action"], "QueryEvents");

    let untrusted = kluis(
        &[
            "audit",
            "export",
            "--server",
            &url,
            "--ca-cert",
            &path(&other_file),
        ],
        Some(&token),
    )
    .await;
    assert_eq!(untrusted.code, 2, "{}", untrusted.all());
    assert!(
        untrusted.stderr.contains("cannot connect"),
        "{}",
        untrusted.all()
    );
    running.shutdown().await.expect("clean shutdown");
}

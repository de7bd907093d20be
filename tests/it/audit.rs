//! The audit trail through real gRPC: every Records call leaves exactly its event; query
//! rights and filters; VerifyChain finds a changed, deleted, moved or rewritten event; the
//! service fails closed when the event cannot be written; no value reaches an event.

use std::time::Duration;

use kluis::audit::{self, event_key, Event, Head};
use kluis::proto::audit_client::AuditClient;
use kluis::proto::{
    AuditEvent, CreateRecordRequest, ExportRecordRequest, FindRecordsRequest, GetRecordRequest,
    ListRecordsRequest, QueryEventsRequest, SetLegalHoldRequest, SetLifecycleRequest,
    SetRestrictionRequest, UpdateRecordRequest, VerifyChainRequest,
};
use kluis::store::{Batch, Keyspace, SledStore, Store};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

use crate::helpers::*;

type Auditor = AuditClient<InterceptedService<Channel, Bearer>>;

async fn audit_client(addr: &str, token: &str) -> Auditor {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    AuditClient::with_interceptor(channel, bearer(token))
}

async fn auditor(v: &TestVault, role: &str) -> Auditor {
    audit_client(&v.addr.to_string(), &v.tokens[role]).await
}

/// Every event (as the auditor sees them), following page tokens.
async fn all_events(a: &mut Auditor, req: QueryEventsRequest) -> Vec<AuditEvent> {
    let mut out = Vec::new();
    let mut req = req;
    loop {
        let page = a
            .query_events(req.clone())
            .await
            .expect("query")
            .into_inner();
        out.extend(page.events);
        if page.next_page_token.is_empty() {
            return out;
        }
        req.page_token = page.next_page_token;
    }
}

/// (principal, role, purpose, action, record id, sorted field names, outcome)
type Row = (String, String, String, String, String, Vec<String>, String);

fn row(e: &AuditEvent) -> Row {
    let mut names = e.field_names.clone();
    names.sort();
    (
        e.principal.clone(),
        e.role.clone(),
        e.purpose.clone(),
        e.action.clone(),
        e.record_id.clone(),
        names,
        e.outcome.clone(),
    )
}

fn expect(
    principal: &str,
    role: &str,
    purpose: &str,
    action: &str,
    record: &str,
    fields: &[&str],
    outcome: &str,
) -> Row {
    let mut names: Vec<String> = fields.iter().map(|s| s.to_string()).collect();
    names.sort();
    (
        principal.into(),
        role.into(),
        purpose.into(),
        action.into(),
        record.into(),
        names,
        outcome.into(),
    )
}

async fn head_seq(v: &TestVault) -> u64 {
    let mut a = auditor(v, "auditor").await;
    all_events(&mut a, QueryEventsRequest::default())
        .await
        .last()
        .map_or(0, |e| e.seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_records_call_leaves_exactly_its_event() {
    let v = spawn_vault().await;
    let mut recruiter = v.client("recruiter").await;
    let mut payroll = v.client("payroll").await;
    let before = head_seq(&v).await;

    let id = recruiter
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[
                ("full_name", text("Anna Planted-Name")),
                ("email", text("anna.planted@example.nl")),
            ]),
        })
        .await
        .expect("create")
        .into_inner()
        .record_id;
    let get = |names: &[&str], purpose: &str| GetRecordRequest {
        record_id: id.clone(),
        purpose: purpose.into(),
        field_names: names.iter().map(|s| s.to_string()).collect(),
    };
    recruiter
        .get_record(get(&[], "recruitment"))
        .await
        .expect("get");
    assert_status(
        recruiter.get_record(get(&["bsn"], "recruitment")).await,
        Code::PermissionDenied,
        &["bsn"],
    );
    assert_status(
        recruiter.get_record(get(&[], "payroll")).await,
        Code::PermissionDenied,
        &["payroll"],
    );
    assert_status(
        recruiter.get_record(get(&[], "made_up_purpose")).await,
        Code::PermissionDenied,
        &[],
    );
    assert_status(
        recruiter
            .create_record(CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("email", text("not-an-email"))]),
            })
            .await,
        Code::InvalidArgument,
        &["email"],
    );
    payroll
        .update_record(UpdateRecordRequest {
            record_id: id.clone(),
            purpose: "payroll".into(),
            expected_revision: 1,
            set: fields(&[
                ("bsn", text("111222333")),
                ("iban", text("NL91ABNA0417164300")),
            ]),
            clear: vec![],
        })
        .await
        .expect("update");
    assert_status(
        recruiter
            .update_record(UpdateRecordRequest {
                record_id: id.clone(),
                purpose: "recruitment".into(),
                expected_revision: 1,
                set: fields(&[("city", text("Zwolle"))]),
                clear: vec![],
            })
            .await,
        Code::FailedPrecondition,
        &["stale"],
    );
    recruiter
        .find_records(FindRecordsRequest {
            purpose: "recruitment".into(),
            field_name: "email".into(),
            value: "anna.planted@example.nl".into(),
        })
        .await
        .expect("find");
    recruiter
        .list_records(ListRecordsRequest::default())
        .await
        .expect("list");
    let mut anonymous = v.client_with_token(None).await;
    assert_status(
        anonymous.get_record(get(&[], "recruitment")).await,
        Code::Unauthenticated,
        &[],
    );
    // Refused before its body is read, and recorded in the background: wait for the event,
    // so that the order below holds.
    assert_eq!(v.refusals_after(before, 1).await.len(), 1);
    let missing = "00000000-0000-4000-8000-000000000000";
    assert_status(
        recruiter
            .get_record(GetRecordRequest {
                record_id: missing.into(),
                purpose: "recruitment".into(),
                field_names: vec![],
            })
            .await,
        Code::NotFound,
        &[],
    );
    // A value sent where an id belongs never reaches the trail.
    assert_status(
        recruiter
            .get_record(GetRecordRequest {
                record_id: "111222333".into(),
                purpose: "recruitment".into(),
                field_names: vec!["111222333".into()],
            })
            .await,
        Code::InvalidArgument,
        &[],
    );

    let mut a = auditor(&v, "auditor").await;
    let events = all_events(&mut a, QueryEventsRequest::default()).await;
    let ours: Vec<&AuditEvent> = events
        .iter()
        .filter(|e| e.seq > before && e.principal != "test-auditor")
        .collect();
    let (r, p) = ("test-recruiter", "test-payroll");
    let expected = vec![
        expect(
            r,
            "recruiter",
            "recruitment",
            "CreateRecord",
            &id,
            &["email", "full_name"],
            "ok",
        ),
        expect(
            r,
            "recruiter",
            "recruitment",
            "GetRecord",
            &id,
            &["email", "full_name"],
            "ok",
        ),
        expect(
            r,
            "recruiter",
            "recruitment",
            "GetRecord",
            &id,
            &["bsn"],
            "denied",
        ),
        expect(r, "recruiter", "payroll", "GetRecord", &id, &[], "denied"),
        expect(r, "recruiter", "<unknown>", "GetRecord", &id, &[], "denied"),
        expect(
            r,
            "recruiter",
            "recruitment",
            "CreateRecord",
            "",
            &["email"],
            "invalid",
        ),
        expect(
            p,
            "payroll",
            "payroll",
            "UpdateRecord",
            &id,
            &["bsn", "iban"],
            "ok",
        ),
        expect(
            r,
            "recruiter",
            "recruitment",
            "UpdateRecord",
            &id,
            &["city"],
            "invalid",
        ),
        expect(
            r,
            "recruiter",
            "recruitment",
            "FindRecords",
            &id,
            &["email"],
            "ok",
        ),
        // A listing names each record it listed.
        expect(r, "recruiter", "", "ListRecords", &id, &[], "ok"),
        // No record id: the gate refuses the call before the body that names it is read.
        expect("", "", "", "GetRecord", "", &[], "denied"),
        expect(
            r,
            "recruiter",
            "recruitment",
            "GetRecord",
            missing,
            &[],
            "invalid",
        ),
        expect(
            r,
            "recruiter",
            "recruitment",
            "GetRecord",
            "<invalid>",
            &["<unknown>"],
            "invalid",
        ),
    ];
    assert_eq!(
        ours.iter().map(|e| row(e)).collect::<Vec<_>>(),
        expected,
        "events: {:#?}",
        ours.iter().map(|e| row(e)).collect::<Vec<_>>()
    );
    // Gap-free sequence numbers, times that never decrease, a hash on each.
    for pair in events.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1);
        let t = |e: &AuditEvent| e.time.as_ref().map(|t| (t.seconds, t.nanos));
        assert!(t(&pair[1]) >= t(&pair[0]));
    }
    assert!(events.iter().all(|e| e.hash.len() == 32));
    // The auditor's own query is an event too.
    let after = all_events(&mut a, QueryEventsRequest::default()).await;
    let last = after.last().expect("events");
    assert_eq!(
        (last.principal.as_str(), last.action.as_str()),
        ("test-auditor", "QueryEvents")
    );
    // No planted value in any event.
    let dump = format!("{:?}", after.iter().map(row).collect::<Vec<_>>());
    for planted in [
        "Anna Planted-Name",
        "anna.planted",
        "111222333",
        "NL91ABNA0417164300",
    ] {
        assert!(!dump.contains(planted), "{planted} in the trail");
    }
}

/// Issue 3 for the record-state calls and the export: each call that names a record leaves
/// exactly its event, allowed, denied (a role without the right) or rejected (a bad record id,
/// a missing reason, a bad stage or date).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_state_and_export_calls_leave_exactly_their_events() {
    let v = spawn_vault().await;
    let mut recruiter = v.client("recruiter").await;
    let mut payroll = v.client("payroll").await;
    let mut po = v.client("privacy_officer").await;
    let id = create_with(
        &mut recruiter,
        "recruitment",
        &[
            ("full_name", text("Bram Planted-Name")),
            ("email", text("bram.planted@example.nl")),
        ],
    )
    .await;
    let before = head_seq(&v).await;
    let hold = |record_id: &str, reason: &str| SetLegalHoldRequest {
        record_id: record_id.into(),
        hold: true,
        reason: reason.into(),
    };
    let restrict = |record_id: &str, reason: &str| SetRestrictionRequest {
        record_id: record_id.into(),
        restricted: true,
        reason: reason.into(),
    };
    let lifecycle = |record_id: &str, stage: &str, date: &str| SetLifecycleRequest {
        record_id: record_id.into(),
        stage: stage.into(),
        date: date.into(),
    };
    let missing = "00000000-0000-4000-8000-000000000000";

    // SetLegalHold: ok, denied, and invalid (no UUID, no reason, no such record).
    po.set_legal_hold(hold(&id, "labour court case"))
        .await
        .expect("hold");
    assert_status(
        payroll.set_legal_hold(hold(&id, "labour court case")).await,
        Code::PermissionDenied,
        &["set_legal_hold"],
    );
    assert_status(
        po.set_legal_hold(hold("111222333", "labour court case"))
            .await,
        Code::InvalidArgument,
        &["record_id"],
    );
    assert_status(
        po.set_legal_hold(hold(&id, "")).await,
        Code::InvalidArgument,
        &["reason"],
    );
    assert_status(
        po.set_legal_hold(hold(missing, "labour court case")).await,
        Code::NotFound,
        &[],
    );
    // ExportRecord: ok.
    po.export_record(ExportRecordRequest {
        record_id: id.clone(),
    })
    .await
    .expect("export");
    // SetLifecycle: denied (no right at all; `employed` without `set_employment`), invalid.
    assert_status(
        po.set_lifecycle(lifecycle(&id, "procedure_closed", "2026-01-10"))
            .await,
        Code::PermissionDenied,
        &["set_lifecycle"],
    );
    assert_status(
        recruiter
            .set_lifecycle(lifecycle(&id, "employed", "2026-01-10"))
            .await,
        Code::PermissionDenied,
        &["set_employment"],
    );
    assert_status(
        recruiter
            .set_lifecycle(lifecycle(&id, "procedure_closed", "2026-02-30"))
            .await,
        Code::InvalidArgument,
        &["date"],
    );
    assert_status(
        recruiter
            .set_lifecycle(lifecycle(&id, "hired_maybe", "2026-01-10"))
            .await,
        Code::InvalidArgument,
        &["stage"],
    );
    assert_status(
        recruiter
            .set_lifecycle(lifecycle("nope", "procedure_closed", "2026-01-10"))
            .await,
        Code::InvalidArgument,
        &["record_id"],
    );
    // SetRestriction: denied, invalid.
    assert_status(
        recruiter
            .set_restriction(restrict(&id, "accuracy contested"))
            .await,
        Code::PermissionDenied,
        &["set_restriction"],
    );
    assert_status(
        po.set_restriction(restrict(&id, "")).await,
        Code::InvalidArgument,
        &["reason"],
    );
    assert_status(
        po.set_restriction(restrict("nope", "accuracy contested"))
            .await,
        Code::InvalidArgument,
        &["record_id"],
    );

    let mut a = auditor(&v, "auditor").await;
    let events = all_events(&mut a, QueryEventsRequest::default()).await;
    let ours: Vec<Row> = events
        .iter()
        .filter(|e| e.seq > before && e.principal != "test-auditor")
        .map(row)
        .collect();
    let (officer, rec) = (
        ("test-privacy_officer", "privacy_officer"),
        ("test-recruiter", "recruiter"),
    );
    // The record-state calls carry no purpose and name no field.
    let state = |(principal, role): (&str, &str), action: &str, record: &str, outcome: &str| {
        expect(principal, role, "", action, record, &[], outcome)
    };
    let expected = vec![
        state(officer, "SetLegalHold", &id, "ok"),
        state(("test-payroll", "payroll"), "SetLegalHold", &id, "denied"),
        state(officer, "SetLegalHold", "<invalid>", "invalid"),
        state(officer, "SetLegalHold", &id, "invalid"),
        state(officer, "SetLegalHold", missing, "invalid"),
        // The export names every field it returned, under the data subject request.
        expect(
            officer.0,
            officer.1,
            "data_subject_request",
            "ExportRecord",
            &id,
            &["email", "full_name"],
            "ok",
        ),
        state(officer, "SetLifecycle", &id, "denied"),
        state(rec, "SetLifecycle", &id, "denied"),
        state(rec, "SetLifecycle", &id, "invalid"),
        state(rec, "SetLifecycle", &id, "invalid"),
        state(rec, "SetLifecycle", "<invalid>", "invalid"),
        state(rec, "SetRestriction", &id, "denied"),
        state(officer, "SetRestriction", &id, "invalid"),
        state(officer, "SetRestriction", "<invalid>", "invalid"),
    ];
    assert_eq!(ours, expected, "events: {ours:#?}");
    // No planted value, reason or rejected id in any event.
    let dump = format!("{ours:?}");
    for planted in [
        "Bram Planted-Name",
        "bram.planted",
        "labour court",
        "accuracy contested",
        "111222333",
        "nope",
        "hired_maybe",
    ] {
        assert!(!dump.contains(planted), "{planted} in the trail");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_rights_filters_and_pages() {
    let v = spawn_vault().await;
    let mut recruiter = v.client("recruiter").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = recruiter
            .create_record(CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("full_name", text(&format!("Person {i}")))]),
            })
            .await
            .expect("create")
            .into_inner()
            .record_id;
        ids.push(id);
    }
    // Events carry millisecond times and `since` includes its whole millisecond: keep the
    // creates' events and the reads' events apart by more than that.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mid = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for id in &ids {
        recruiter
            .get_record(GetRecordRequest {
                record_id: id.clone(),
                purpose: "recruitment".into(),
                field_names: vec![],
            })
            .await
            .expect("get");
    }
    let mut payroll = v.client("payroll").await;
    payroll
        .get_record(GetRecordRequest {
            record_id: ids[0].clone(),
            purpose: "payroll".into(),
            field_names: vec![],
        })
        .await
        .expect("payroll reads (nothing it may read is there)");

    // Filters combine.
    let mut a = auditor(&v, "auditor").await;
    let since = prost_types::Timestamp {
        seconds: mid.timestamp(),
        nanos: mid.timestamp_subsec_nanos() as i32,
    };
    let recruiter_after = all_events(
        &mut a,
        QueryEventsRequest {
            principal: "test-recruiter".into(),
            since: Some(since),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(recruiter_after.len(), 3);
    assert!(recruiter_after.iter().all(|e| e.action == "GetRecord"));
    let one = all_events(
        &mut a,
        QueryEventsRequest {
            principal: "test-payroll".into(),
            record_id: ids[0].clone(),
            since: Some(since),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(one.len(), 1);
    let before_mid = all_events(
        &mut a,
        QueryEventsRequest {
            principal: "test-recruiter".into(),
            until: Some(since),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(before_mid.len(), 3);
    assert!(before_mid.iter().all(|e| e.action == "CreateRecord"));
    // Pages of one.
    let mut pages = 0;
    let mut req = QueryEventsRequest {
        principal: "test-recruiter".into(),
        page_size: 1,
        ..Default::default()
    };
    let mut seen = Vec::new();
    loop {
        let page = a
            .query_events(req.clone())
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        seen.extend(page.events.into_iter().map(|e| e.seq));
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    assert_eq!(seen.len(), 6);
    assert!(pages >= 6);
    // Bad arguments name the field.
    assert_status(
        a.query_events(QueryEventsRequest {
            record_id: "not-a-uuid".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["record_id"],
    );
    assert_status(
        a.query_events(QueryEventsRequest {
            since: Some(since),
            until: Some(since),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["until"],
    );
    // A principal no caller can have: refused, not answered with an empty page (review 29).
    for principal in [
        "dev\u{0}x".to_string(),
        "x".repeat(161),
        "jos\u{e9}".to_string(),
    ] {
        assert_status(
            a.query_events(QueryEventsRequest {
                principal,
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            &["principal", "printable ASCII"],
        );
    }
    // The longest a CLI principal can be is a filter still.
    let cli = format!("cli:{} (SUDO_USER={})", "a".repeat(64), "b".repeat(64));
    let none = all_events(
        &mut a,
        QueryEventsRequest {
            principal: cli,
            ..Default::default()
        },
    )
    .await;
    assert!(none.is_empty());
    // Malformed, or a bare position (the old form; tokens are tagged now, review 10).
    use base64::Engine;
    let bare = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(2u64.to_be_bytes());
    for token in ["%%%".to_string(), bare] {
        assert_status(
            a.query_events(QueryEventsRequest {
                page_token: token,
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            &["page_token", "QueryEvents"],
        );
    }
    // Rights.
    for role in ["recruiter", "payroll", "absence", "security_officer"] {
        let mut c = auditor(&v, role).await;
        assert_status(
            c.query_events(QueryEventsRequest::default()).await,
            Code::PermissionDenied,
            &["audit"],
        );
    }
    for role in ["recruiter", "payroll", "absence", "privacy_officer"] {
        let mut c = auditor(&v, role).await;
        assert_status(
            c.verify_chain(VerifyChainRequest {}).await,
            Code::PermissionDenied,
            &["verify"],
        );
    }
    let mut po = auditor(&v, "privacy_officer").await;
    assert_status(
        po.query_events(QueryEventsRequest::default()).await,
        Code::PermissionDenied,
        &["record_id"],
    );
    let subject = all_events(
        &mut po,
        QueryEventsRequest {
            record_id: ids[0].clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        subject
            .iter()
            .map(|e| (e.principal.as_str(), e.action.as_str()))
            .collect::<Vec<_>>(),
        vec![
            ("test-recruiter", "CreateRecord"),
            ("test-recruiter", "GetRecord"),
            ("test-payroll", "GetRecord"),
            // Querying the trail about a record is itself an event about that record.
            ("test-auditor", "QueryEvents"),
        ]
    );
    let mut so = auditor(&v, "security_officer").await;
    let verified = so
        .verify_chain(VerifyChainRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(verified.ok);
    assert!(verified.events_checked >= 7);
}

/// Event `seq` as stored (inside its block).
async fn stored_event(store: &SledStore, seq: u64) -> Vec<u8> {
    audit::raw_event(store, seq)
        .await
        .expect("read")
        .expect("event present")
}

/// Overwrites event `seq` inside its block, as an insider could.
async fn put_event(store: &SledStore, seq: u64, value: Vec<u8>) {
    audit::overwrite_raw_event(store, seq, Some(value))
        .await
        .expect("write");
}

async fn verify(v: &TestVault) -> kluis::proto::VerifyChainResponse {
    let mut a = auditor(v, "auditor").await;
    a.verify_chain(VerifyChainRequest {})
        .await
        .expect("verify")
        .into_inner()
}

/// `kluis audit verify --data-dir DATA`, run.
async fn verify_offline(data: &str) -> Run {
    run_kluis(None, &["audit", "verify", "--data-dir", data], None).await
}

/// Creates `n` recruitment records ("Person 0", …) through `recruiter`, `pause` apart.
async fn create_people(recruiter: &mut Client, n: usize, pause: Duration) {
    for i in 0..n {
        recruiter
            .create_record(CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("full_name", text(&format!("Person {i}")))]),
            })
            .await
            .expect("create");
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Runs `f` on the store of the stopped vault, then restarts it.
async fn offline<F, Fut>(v: &mut TestVault, f: F)
where
    F: FnOnce(SledStore) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    v.stop().await;
    let store = SledStore::open(&data_dir(&v.dir)).expect("open store offline");
    f(store).await;
    v.start().await.expect("restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_chain_names_the_first_changed_deleted_or_moved_event() {
    let mut v = spawn_vault().await;
    let mut recruiter = v.client("recruiter").await;
    create_people(&mut recruiter, 6, Duration::ZERO).await;
    let ok = verify(&v).await;
    assert!(ok.ok && ok.first_bad_seq == 0);

    // Changed: one byte of event 3's body.
    offline(&mut v, |store| async move {
        let mut changed = stored_event(&store, 3).await;
        let n = changed.len();
        changed[n - 2] ^= 0x20;
        put_event(&store, 3, changed).await;
    })
    .await;
    let bad = verify(&v).await;
    assert_eq!((bad.ok, bad.first_bad_seq), (false, 3), "{bad:?}");

    // Restore it (recomputing nothing): whole again. Then delete event 4.
    offline(&mut v, |store| async move {
        let raw = stored_event(&store, 3).await;
        let mut fixed = raw.clone();
        let n = fixed.len();
        fixed[n - 2] ^= 0x20;
        put_event(&store, 3, fixed).await;
    })
    .await;
    assert!(verify(&v).await.ok);
    offline(&mut v, |store| async move {
        audit::overwrite_raw_event(&store, 4, None)
            .await
            .expect("delete");
    })
    .await;
    let bad = verify(&v).await;
    assert_eq!((bad.ok, bad.first_bad_seq), (false, 4), "{bad:?}");
    // QueryEvents goes on past it and says so (review 30).
    let page = kluis::proto::audit_client::AuditClient::with_interceptor(
        v.channel().await,
        bearer(&v.tokens["auditor"]),
    )
    .query_events(kluis::proto::QueryEventsRequest {
        page_size: 1000,
        ..Default::default()
    })
    .await
    .expect("query")
    .into_inner();
    assert!(page.events.iter().all(|e| e.seq != 4));
    assert!(page.events.iter().any(|e| e.seq == 5));
    assert_eq!((page.first_damaged_seq, page.damaged_events), (4, 1));

    // Reordered: events 5 and 6 swapped (on a fresh vault, so 4 is intact).
    let mut w = spawn_vault().await;
    let mut recruiter = w.client("recruiter").await;
    create_people(&mut recruiter, 6, Duration::ZERO).await;
    offline(&mut w, |store| async move {
        let five = stored_event(&store, 5).await;
        let six = stored_event(&store, 6).await;
        put_event(&store, 5, six).await;
        put_event(&store, 6, five).await;
    })
    .await;
    let bad = verify(&w).await;
    assert_eq!((bad.ok, bad.first_bad_seq), (false, 5), "{bad:?}");
}

/// An insider rewrites every event (here: blames someone else), recomputing every hash and
/// the head, so the chain itself is consistent; `b` may carry more changes.
async fn rewrite_chain(store: &SledStore, mut b: Batch) {
    let head = Head::load(store).await.expect("head");
    let mut prev = [0u8; 32];
    // Written back as one event per key (the format before blocks, which readers take).
    audit::take_raw_events(store, &mut b).await.expect("scan");
    let mut new_head = Head::default();
    for seq in 1..=head.seq {
        let e = Event::parse(&stored_event(store, seq).await).expect("event");
        let mut d = e.draft.clone();
        d.principal = "someone-else".into();
        let body = d.encode();
        let hash = audit::link(&prev, seq, e.time_ms, &body);
        let mut value = seq.to_be_bytes().to_vec();
        value.extend_from_slice(&e.time_ms.to_be_bytes());
        value.extend_from_slice(&hash);
        value.extend_from_slice(&body);
        b.put(Keyspace::Audit, event_key(seq).to_vec(), value);
        prev = hash;
        new_head = Head {
            seq,
            time_ms: e.time_ms,
            hash,
        };
    }
    b.put(Keyspace::Meta, audit::META_HEAD.to_vec(), new_head.encode());
    store.commit(b).await.expect("rewrite");
}

/// The rewrite a short trail allows with the store alone: every checkpoint deleted with it,
/// so the store's own checks pass. The anchor file beside the signing key (the newest
/// checkpoint the server signed) still names the old chain: the server refuses to sign the
/// forgery, and `VerifyChain` and the offline verifier fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_with_every_checkpoint_deleted_is_caught_by_the_anchor_file() {
    let mut v = spawn_vault().await;
    let mut recruiter = v.client("recruiter").await;
    create_people(&mut recruiter, 4, Duration::ZERO).await;
    assert!(verify(&v).await.ok);
    v.stop().await;
    let keys = v.dir.path().join("keys");
    let anchors: Vec<_> = std::fs::read_dir(&keys)
        .expect("keys dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(kluis::anchor::FILE_PREFIX))
        .collect();
    assert_eq!(anchors.len(), 1, "one anchor file: {anchors:?}");
    {
        let store = SledStore::open(&data_dir(&v.dir)).expect("open");
        let mut b = Batch::default();
        for (k, _) in store
            .scan(Keyspace::Meta, audit::META_CHECKPOINT, None, 1000)
            .await
            .expect("scan")
        {
            b.delete(Keyspace::Meta, k);
        }
        b.delete(Keyspace::Meta, audit::META_CHECKPOINT_LAST.to_vec());
        rewrite_chain(&store, b).await;
    }
    let data = path_arg(&data_dir(&v.dir));
    let offline = verify_offline(&data).await;
    assert_eq!(offline.code, 1, "{}", offline.all());
    assert!(
        offline.stdout.starts_with("FAILED: first bad event 1: ")
            && offline.stdout.contains("anchor file"),
        "{}",
        offline.all()
    );
    // Removing or changing the store's (signed) record of its id, which names the anchor
    // file, does not switch the offline check off.
    let recorded = {
        let store = SledStore::open(&data_dir(&v.dir)).expect("open");
        store
            .get(Keyspace::Meta, kluis::anchor::META_STORE_ID)
            .await
            .expect("get")
            .expect("the server recorded the store id")
    };
    let mut changed = recorded.clone();
    changed[3] ^= 0x40;
    for (value, needle) in [
        (None, "records no id"),
        (Some(changed), "not signed by this checkpoint key"),
    ] {
        {
            let store = SledStore::open(&data_dir(&v.dir)).expect("open");
            let mut b = Batch::default();
            match value {
                Some(value) => b.put(Keyspace::Meta, kluis::anchor::META_STORE_ID.to_vec(), value),
                None => b.delete(Keyspace::Meta, kluis::anchor::META_STORE_ID.to_vec()),
            }
            store.commit(b).await.expect("change the id record");
        }
        let run = verify_offline(&data).await;
        assert_eq!(run.code, 1, "{}", run.all());
        assert!(run.stdout.contains(needle), "{}", run.all());
        // Named explicitly, the anchor still catches the rewrite.
        let anchor = path_arg(&keys.join(&anchors[0]));
        let run = run_kluis(
            None,
            &[
                "audit",
                "verify",
                "--data-dir",
                data.as_str(),
                "--anchor",
                anchor.as_str(),
            ],
            None,
        )
        .await;
        assert_eq!(run.code, 1, "{}", run.all());
        assert!(run.stdout.contains("anchor file"), "{}", run.all());
    }
    v.start().await.expect("restart");
    let bad = verify(&v).await;
    assert_eq!((bad.ok, bad.first_bad_seq), (false, 1), "{bad:?}");
    // Nor did the restarted server sign the forgery, running or stopping; and it says it
    // stopped uncleanly (exit code 1 for `kluis serve`).
    let ended = v.stop_result().await;
    assert!(
        matches!(&ended, Err(kluis::server::ServerError::Unclean(why)) if why.contains("last audit checkpoint was not signed")),
        "{ended:?}"
    );
    let store = SledStore::open(&data_dir(&v.dir)).expect("open");
    let signed = store
        .scan(Keyspace::Meta, audit::META_CHECKPOINT, None, 1000)
        .await
        .expect("scan");
    assert!(signed.is_empty(), "{} checkpoints signed", signed.len());
}

/// `[audit] anchor_dir` puts the anchor elsewhere (created if absent); a place the server
/// cannot write the anchor to stops the start, naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anchor_goes_where_anchor_dir_says_and_must_be_writable() {
    let mut v = spawn_vault_with(|s| {
        s.audit.anchor_dir = s.data_dir.parent().map(|p| p.join("anchors").join("kluis"));
    })
    .await;
    let mut recruiter = v.client("recruiter").await;
    create_with(
        &mut recruiter,
        "recruitment",
        &[("full_name", text("Ergens"))],
    )
    .await;
    v.stop().await;
    let anchors = v.dir.path().join("anchors").join("kluis");
    let names: Vec<String> = std::fs::read_dir(&anchors)
        .expect("the anchor directory was made")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.len() == 1 && names[0].starts_with(kluis::anchor::FILE_PREFIX),
        "{names:?}"
    );
    assert!(!std::fs::read_dir(v.dir.path().join("keys"))
        .expect("keys")
        .any(|e| e
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .starts_with(kluis::anchor::FILE_PREFIX)));
    // A file where the directory should be: refused at start.
    let mut w = spawn_vault().await;
    w.stop().await;
    std::fs::write(w.dir.path().join("not-a-dir"), b"x").expect("write");
    w.tweak = Some(|s| {
        s.audit.anchor_dir = s.data_dir.parent().map(|p| p.join("not-a-dir"));
    });
    let err = w.start().await.expect_err("refused").to_string();
    assert!(
        err.contains("anchor") && err.contains("anchor_dir") && err.contains("not-a-dir"),
        "{err}"
    );
    // Inside the data directory: refused too.
    w.tweak = Some(|s| {
        s.audit.anchor_dir = Some(s.data_dir.join("anchors"));
    });
    let err = w.start().await.expect_err("refused").to_string();
    assert!(err.contains("lies inside the data directory"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consistently_rewritten_chain_fails_checkpoint_verification() {
    let mut v = spawn_vault().await;
    let mut recruiter = v.client("recruiter").await;
    create_people(&mut recruiter, 4, Duration::ZERO).await;
    // Stopping signs a checkpoint of the head.
    offline(&mut v, |store| async move {
        let head = Head::load(&store).await.expect("head");
        assert!(head.seq >= 4);
        rewrite_chain(&store, Batch::default()).await;
    })
    .await;
    let bad = verify(&v).await;
    assert!(!bad.ok, "{bad:?}");
    assert_eq!(bad.first_bad_seq, 1);

    // Deleting the checkpoints as well does not help: the chain is then uncovered.
    let mut w = spawn_vault().await;
    let mut recruiter = w.client("recruiter").await;
    recruiter
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[("full_name", text("Someone"))]),
        })
        .await
        .expect("create");
    w.stop().await;
    // Over `max_uncovered` events with no checkpoint.
    let store = SledStore::open(&data_dir(&w.dir)).expect("open");
    let limit = kluis::audit::max_uncovered(kluis::config::DEFAULT_CHECKPOINT_EVERY);
    // Signed at shutdown, in the store and in the anchor file.
    let anchored = Head::load(&store).await.expect("head").seq;
    let mut b = Batch::default();
    for _ in 0..=limit {
        b.append_event(kluis::audit::Draft::new("GetRecord", "forged", "recruiter").encode());
    }
    store.commit(b).await.expect("append");
    let cps = store
        .scan(Keyspace::Meta, kluis::audit::META_CHECKPOINT, None, 1000)
        .await
        .expect("scan");
    let mut b = Batch::default();
    for (k, _) in cps {
        b.delete(Keyspace::Meta, k);
    }
    b.delete(Keyspace::Meta, kluis::audit::META_CHECKPOINT_LAST.to_vec());
    store.commit(b).await.expect("delete checkpoints");
    drop(store);
    // Started with checkpoints far apart, so the server does not re-cover the tail at once.
    w.start().await.expect("restart");
    let bad = verify(&w).await;
    assert!(!bad.ok, "{bad:?}");
    // The anchor file still vouches for the events up to its checkpoint.
    assert_eq!(bad.first_bad_seq, anchored + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_signed_while_running_and_at_shutdown() {
    let mut v = spawn_vault().await;
    let recruiter = v.client("recruiter").await;
    // More than `checkpoint_every` events: the running server signs a checkpoint.
    let n = kluis::config::DEFAULT_CHECKPOINT_EVERY;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = recruiter.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..(n / 8 + 10) {
                c.list_records(ListRecordsRequest::default())
                    .await
                    .expect("list");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = recruiter.clone();
    c.list_records(ListRecordsRequest::default())
        .await
        .expect("list");
    v.stop().await;
    let store = SledStore::open(&data_dir(&v.dir)).expect("open");
    let head = Head::load(&store).await.expect("head");
    let cps: Vec<u64> = store
        .scan(Keyspace::Meta, audit::META_CHECKPOINT, None, 1000)
        .await
        .expect("scan")
        .into_iter()
        .filter_map(|(_, v)| audit::Checkpoint::decode(&v))
        .map(|cp| cp.seq)
        .collect();
    assert!(
        cps.iter().any(|&s| s >= n && s < head.seq),
        "a checkpoint while running: {cps:?}, head {}",
        head.seq
    );
    assert_eq!(cps.last(), Some(&head.seq), "a checkpoint at shutdown");
    let pk = audit::read_public_key(&v.dir.path().join("keys").join(audit::PUBLIC_KEY_FILE))
        .expect("public key");
    let report = audit::verify(
        &store,
        &pk,
        None,
        audit::max_uncovered(n),
        audit::VerifyMode::Offline,
    )
    .await
    .expect("verify");
    assert!(report.ok, "{report:?}");
    assert_eq!(report.checkpoints_checked as usize, cps.len());
}

/// `[audit] checkpoint_interval_secs`: with few events (far fewer than `checkpoint_every`),
/// the running server still signs a checkpoint once the interval has passed, and again after
/// it for later events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_signed_by_time_when_few_events_arrive() {
    const EVERY: u64 = 1_000_000;
    let started_ms = audit::now_ms();
    let v = spawn_vault_with(|s| {
        s.audit.checkpoint_every = EVERY;
        s.audit.checkpoint_interval = Duration::from_secs(1);
    })
    .await;
    let store = v.vault().store();
    let pk = audit::read_public_key(&v.dir.path().join("keys").join(audit::PUBLIC_KEY_FILE))
        .expect("public key");
    // The newest checkpoint once it covers event `seq` (within 5 s), checked against the key.
    let checkpoint_covering = |seq: u64| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let last = store
                .get(Keyspace::Meta, audit::META_CHECKPOINT_LAST)
                .await
                .expect("get")
                .map(|b| u64::from_be_bytes(b.as_slice().try_into().expect("8 bytes")));
            if let Some(last) = last.filter(|&l| l >= seq) {
                let cp = store
                    .get(Keyspace::Meta, &audit::checkpoint_key(last))
                    .await
                    .expect("get")
                    .and_then(|b| audit::Checkpoint::decode(&b))
                    .expect("the checkpoint `checkpoint-last` names");
                assert_eq!(cp.seq, last);
                assert!(cp.verify(&pk), "signed by the vault's key");
                return cp;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no checkpoint covering event {seq} within 5 s (newest: {last:?})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    let mut recruiter = v.client("recruiter").await;
    for _ in 0..3 {
        recruiter
            .list_records(ListRecordsRequest::default())
            .await
            .expect("list");
    }
    let head = Head::load(store).await.expect("head").seq;
    assert!((3..EVERY).contains(&head), "head {head}");
    let first = checkpoint_covering(head).await;
    assert!(first.seq < EVERY, "not by count: {}", first.seq);
    // Not before the interval had passed since the server started.
    assert!(
        first.signed_ms >= started_ms + 1000,
        "signed {} ms after the start",
        first.signed_ms - started_ms
    );

    // A few more calls: the next checkpoint follows by time too.
    for _ in 0..2 {
        recruiter
            .list_records(ListRecordsRequest::default())
            .await
            .expect("list");
    }
    let head = Head::load(store).await.expect("head").seq;
    assert!(head > first.seq);
    let second = checkpoint_covering(head).await;
    assert!(second.seq > first.seq && second.seq < EVERY);
    assert!(second.signed_ms > first.signed_ms);
}

/// The real binary in dev mode with its log on a pipe (a file-size limit must not hit the log).
struct Piped {
    child: std::process::Child,
    addr: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Piped {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_piped(dir: &std::path::Path) -> Piped {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kluis"))
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn kluis");
    let stderr = child.stderr.take().expect("piped stderr");
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = std::sync::Arc::clone(&log);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(addr) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("local_addr="))
            {
                let _ = tx.send(addr.to_string());
            }
            let mut log = sink.lock().expect("log lock");
            log.push_str(&line);
            log.push('\n');
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(addr) => addr,
        Err(e) => {
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "kluis did not start ({e}): {}",
                log.lock().expect("log lock")
            )
        }
    };
    Piped { child, addr, log }
}

/// The log lines of the request with `request_id`, once there is one (10 s at most).
async fn logged_lines(server: &Piped, request_id: &str) -> Vec<String> {
    let marker = format!("request_id={request_id}");
    let logged = || {
        server
            .log
            .lock()
            .expect("log")
            .lines()
            .filter(|l| l.contains(&marker))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while logged().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    logged()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_no_event_can_be_written_nothing_is_returned_or_changed() {
    use crate::durability::dev_tokens;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_piped(dir.path());
    let tokens = dev_tokens(dir.path());
    let connect = |addr: String, role: &str| {
        let token = tokens[role].clone();
        async move {
            let channel = Channel::from_shared(format!("http://{addr}"))
                .expect("uri")
                .connect()
                .await
                .expect("connect");
            kluis::proto::records_client::RecordsClient::with_interceptor(channel, bearer(&token))
        }
    };
    let mut recruiter = connect(server.addr.clone(), "recruiter").await;
    let id = recruiter
        .create_record(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[("full_name", text("Fail Closed-Planted"))]),
        })
        .await
        .expect("create")
        .into_inner()
        .record_id;
    let get = GetRecordRequest {
        record_id: id.clone(),
        purpose: "recruitment".into(),
        field_names: vec![],
    };
    recruiter.get_record(get.clone()).await.expect("get");
    // A body that does not decode: refused, audited and logged as one request line.
    let authorization = format!("Bearer {}", tokens["recruiter"]);
    let undecodable: Vec<u8> = vec![0x12, 0x03, b'a', 0xff, b'b'];
    let answer = raw_call(
        &server.addr,
        "/kluis.v1.Records/GetRecord",
        Some(&authorization),
        Some("undecodable-logged"),
        &undecodable,
    )
    .await;
    assert_eq!(answer.code, Code::InvalidArgument, "{answer:?}");
    {
        let lines = logged_lines(&server, "undecodable-logged").await;
        assert_eq!(lines.len(), 1, "one line: {lines:?}");
        for part in [
            "principal=\"dev-recruiter\"",
            "method=\"GetRecord\"",
            "status=InvalidArgument",
        ] {
            assert!(lines[0].contains(part), "{part}: {}", lines[0]);
        }
    }
    // A refused request's line names the request field its refusal names, if the proto or
    // the schema does (review 25 #5); a name the caller made up stays out.
    for (request_id, name, value, refused) in [
        (
            "refused-known",
            "email",
            "not an address",
            "refused_field=\"fields.email\"",
        ),
        ("refused-made-up", "jansen", "x", "refused_field=\"-\""),
    ] {
        let mut request = tonic::Request::new(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[("full_name", text("Refused Logged")), (name, text(value))]),
        });
        request
            .metadata_mut()
            .insert("x-request-id", request_id.parse().expect("ascii"));
        let refused_status = recruiter.create_record(request).await.expect_err("refused");
        assert_eq!(refused_status.code(), Code::InvalidArgument);
        let lines = logged_lines(&server, request_id).await;
        assert_eq!(lines.len(), 1, "one line: {lines:?}");
        assert!(lines[0].contains(refused), "{refused}: {}", lines[0]);
        assert!(!lines[0].contains("jansen"), "{}", lines[0]);
    }

    // From now on the server may write no byte past the end of the frames in its log (the
    // zeros after them are written ahead): the next log write fails (EFBIG).
    let wal = dir.path().join("data").join("wal");
    let newest = std::fs::read_dir(&wal)
        .expect("wal dir")
        .filter_map(|e| Some(e.ok()?.path()))
        .max()
        .expect("a log file");
    let log = std::fs::read(&newest).expect("read the log");
    let size = log
        .iter()
        .rposition(|&b| b != 0)
        .expect("frames in the log")
        + 1;
    let limited = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", server.child.id()))
        .arg(format!("--fsize={size}"))
        .status()
        .expect("run prlimit");
    assert!(limited.success(), "prlimit failed");

    // A read whose event cannot be written returns nothing.
    let refused = recruiter.get_record(get.clone()).await;
    assert_status(
        refused,
        Code::Unavailable,
        &["audit trail unavailable", "nothing was changed or returned"],
    );
    // A change whose event cannot be written changes nothing.
    assert_status(
        recruiter
            .create_record(CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[("full_name", text("Never Stored"))]),
            })
            .await,
        Code::Unavailable,
        &[],
    );
    {
        // The server logs the reason before it answers, but this test reads its stderr on
        // another thread: give that thread a moment to catch up.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !server
            .log
            .lock()
            .expect("log")
            .contains("audit event could not be written")
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = server.log.lock().expect("log");
        assert!(
            log.contains("audit event could not be written"),
            "the log says why: {log}"
        );
        assert!(!log.contains("Fail Closed-Planted") && !log.contains("Never Stored"));
    }
    // Not even before a restart.
    let listed = recruiter.list_records(ListRecordsRequest::default()).await;
    assert_status(listed, Code::Unavailable, &[]);
    // Nor for a body that does not decode: its refusal is not answered unrecorded.
    let answer = raw_call(
        &server.addr,
        "/kluis.v1.Records/GetRecord",
        Some(&authorization),
        None,
        &undecodable,
    )
    .await;
    assert_eq!(answer.code, Code::Unavailable, "{answer:?}");
    assert!(
        answer.message.contains("audit trail unavailable"),
        "{answer:?}"
    );
    drop(server);

    let server = start_piped(dir.path());
    let mut recruiter = connect(server.addr.clone(), "recruiter").await;
    let records = recruiter
        .list_records(ListRecordsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .records;
    assert_eq!(records.len(), 1, "the refused create left no record");
    assert_eq!(records[0].record_id, id);
    let mut a = audit_client(&server.addr, &tokens["auditor"]).await;
    let events = all_events(&mut a, QueryEventsRequest::default()).await;
    let reads = events
        .iter()
        .filter(|e| e.action == "GetRecord" && e.outcome == "ok")
        .count();
    assert_eq!(reads, 1, "only the read that answered is in the trail");
    assert!(!events
        .iter()
        .any(|e| e.action == "CreateRecord" && e.outcome == "ok" && e.record_id != id));
    let verified = a
        .verify_chain(VerifyChainRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(verified.ok, "{verified:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_chain_holds_on_a_busy_server() {
    let v = spawn_vault().await;
    let recruiter = v.client("recruiter").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = recruiter.clone();
        let stop = std::sync::Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.list_records(ListRecordsRequest::default())
                    .await
                    .expect("list");
            }
        }));
    }
    let mut so = auditor(&v, "security_officer").await;
    for _ in 0..10 {
        let r = so
            .verify_chain(VerifyChainRequest {})
            .await
            .expect("verify")
            .into_inner();
        assert!(r.ok, "events written meanwhile are not a failure: {r:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.expect("task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_is_an_event_on_every_record_it_found() {
    let v = spawn_vault().await;
    let mut recruiter = v.client("recruiter").await;
    let shared = "shared.inbox@example.nl";
    let mut ids = Vec::new();
    for name in ["One", "Two"] {
        ids.push(
            create_with(
                &mut recruiter,
                "recruitment",
                &[("full_name", text(name)), ("email", text(shared))],
            )
            .await,
        );
    }
    ids.sort();
    let search = |value: &str| FindRecordsRequest {
        purpose: "recruitment".into(),
        field_name: "email".into(),
        value: value.into(),
    };
    let mut found = recruiter
        .find_records(search(shared))
        .await
        .expect("find")
        .into_inner()
        .record_ids;
    found.sort();
    assert_eq!(found, ids);
    recruiter
        .find_records(search("nobody@example.nl"))
        .await
        .expect("find nothing");

    let mut a = auditor(&v, "auditor").await;
    let finds: Vec<AuditEvent> = all_events(&mut a, QueryEventsRequest::default())
        .await
        .into_iter()
        .filter(|e| e.action == "FindRecords")
        .collect();
    let mut named: Vec<&str> = finds.iter().map(|e| e.record_id.as_str()).collect();
    named.sort();
    // One per record found, and one without a record for the search that found none.
    assert_eq!(named, vec!["", ids[0].as_str(), ids[1].as_str()]);
    assert!(finds
        .iter()
        .all(|e| e.field_names == vec!["email".to_string()] && e.outcome == "ok"));
    // The privacy officer sees the search in each record's history.
    let mut po = auditor(&v, "privacy_officer").await;
    for id in &ids {
        let history = all_events(
            &mut po,
            QueryEventsRequest {
                record_id: id.clone(),
                ..Default::default()
            },
        )
        .await;
        assert!(history.iter().any(|e| e.action == "FindRecords"), "{id}");
    }
}

/// Deleting the whole trail (every event, checkpoint, the head and the pointer) leaves the
/// records named by no event: VerifyChain reports it from event 1, and so does the offline
/// verifier.
#[tokio::test]
async fn a_wiped_trail_is_caught_by_the_records_it_no_longer_names() {
    let mut v = spawn_vault().await;
    let mut recruiter = v.client("recruiter").await;
    create_with(
        &mut recruiter,
        "recruitment",
        &[("email", sample_value("email"))],
    )
    .await;
    assert!(verify(&v).await.ok);
    v.stop().await;
    {
        let store = SledStore::open(&data_dir(&v.dir)).expect("open store");
        let mut b = Batch::default();
        audit::take_raw_events(&store, &mut b)
            .await
            .expect("events");
        for (key, _) in store
            .scan(Keyspace::Meta, b"audit/", None, 100_000)
            .await
            .expect("scan")
        {
            if key != audit::META_SIGNING_KEY {
                b.delete(Keyspace::Meta, key);
            }
        }
        store.commit(b).await.expect("wipe");
    }
    let data = path_arg(&data_dir(&v.dir));
    let offline = run_kluis(
        None,
        &["audit".into(), "verify".into(), "--data-dir".into(), data],
        None,
    )
    .await;
    assert_eq!(offline.code, 1, "{}", offline.all());
    assert!(
        offline.stdout.contains("named by no event"),
        "{}",
        offline.all()
    );
    v.start().await.expect("restart");
    let verified = verify(&v).await;
    assert!(!verified.ok);
    assert_eq!(verified.first_bad_seq, 1);
}

/// The unsigned pointer to the newest checkpoint moved back offline stops every later
/// checkpoint (the signer refuses to sign on it): both verifiers say so, offline and through
/// `VerifyChain` while the server runs, rather than `ok` until someone rewrites the unsigned
/// events at the next offline access (review 13).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_pointer_moved_back_fails_verification_offline_and_live() {
    let mut v = spawn_vault_with(|s| {
        s.audit.checkpoint_every = 2;
        s.audit.checkpoint_interval = Duration::from_millis(200);
    })
    .await;
    let mut recruiter = v.client("recruiter").await;
    create_people(&mut recruiter, 6, Duration::from_millis(100)).await;
    drop(recruiter);
    v.stop().await;
    let oldest = {
        let store = SledStore::open(&data_dir(&v.dir)).expect("open");
        let cps: Vec<u64> = store
            .scan(Keyspace::Meta, audit::META_CHECKPOINT, None, 1000)
            .await
            .expect("scan")
            .into_iter()
            .map(|(k, _)| {
                u64::from_be_bytes(k[audit::META_CHECKPOINT.len()..].try_into().expect("8"))
            })
            .collect();
        assert!(cps.len() >= 2, "checkpoints {cps:?}");
        let mut b = Batch::default();
        b.put(
            Keyspace::Meta,
            audit::META_CHECKPOINT_LAST.to_vec(),
            cps[0].to_be_bytes().to_vec(),
        );
        store.commit(b).await.expect("pointer moved back");
        // What is left unsigned: the events after the newest checkpoint.
        cps[cps.len() - 1]
    };
    let data = path_arg(&data_dir(&v.dir));
    let offline = verify_offline(&data).await;
    assert_eq!(offline.code, 1, "{}", offline.all());
    assert!(
        offline
            .stdout
            .starts_with(&format!("FAILED: first bad event {}: ", oldest + 1))
            && offline.stdout.contains("pointer was moved back"),
        "{}",
        offline.all()
    );
    v.start().await.expect("restart");
    v.client("recruiter")
        .await
        .list_records(ListRecordsRequest::default())
        .await
        .expect("list");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let live = verify(&v).await;
    assert!(!live.ok, "{live:?}");
    assert_eq!(live.first_bad_seq, oldest + 1);
}

/// While the anchor file cannot be written, `VerifyChain` answers not ok from the event after
/// the anchored checkpoint: the checkpoints the server goes on signing are not copied outside
/// the store, so someone who can edit the store could rewrite what follows unseen. Once the
/// anchor is written again, it answers ok (review 25: one log line was all there was).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anchor_that_cannot_be_written_fails_verification_until_it_is_written_again() {
    let mut v = spawn_vault_with(|s| {
        s.audit.checkpoint_every = 2;
        s.audit.checkpoint_interval = Duration::from_millis(200);
    })
    .await;
    let mut recruiter = v.client("recruiter").await;
    create_people(&mut recruiter, 3, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(verify(&v).await.ok);
    let keys = v.dir.path().join("keys");
    let name = std::fs::read_dir(&keys)
        .expect("keys dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(kluis::anchor::FILE_PREFIX))
        .expect("an anchor file");
    let pk = audit::read_public_key(&keys.join(audit::PUBLIC_KEY_FILE)).expect("public key");
    let anchored = || {
        kluis::anchor::load_any(&keys.join(&name), &pk)
            .expect("anchor readable")
            .expect("anchor present")
            .1
            .seq
    };
    // The server writes the anchor through a temporary file of its process; a directory
    // there (not empty, so it cannot be removed as a file) makes every write fail.
    let blocker = keys.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::create_dir(&blocker).expect("blocker");
    std::fs::write(blocker.join("x"), b"x").expect("blocker content");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stuck = anchored();
    create_people(&mut recruiter, 4, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(anchored(), stuck, "no anchor written meanwhile");
    let head = Head::load(v.vault().store()).await.expect("head").seq;
    assert!(
        head > stuck + 2,
        "events after the anchor: head {head}, anchor {stuck}"
    );
    let live = verify(&v).await;
    assert!(!live.ok, "{live:?}");
    assert_eq!(live.first_bad_seq, stuck + 1);
    // Stopped while it lasts: an unclean stop, naming the anchor.
    drop(recruiter);
    let ended = v.stop_result().await;
    assert!(
        matches!(&ended, Err(kluis::server::ServerError::Unclean(why)) if why.contains("audit anchor was not written")),
        "{ended:?}"
    );
    assert_eq!(anchored(), stuck);
    // A restart does not forget it: the anchor file is behind the store's newest checkpoint.
    v.start().await.expect("restart");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let restarted = verify(&v).await;
    assert!(!restarted.ok, "{restarted:?}");
    assert_eq!(restarted.first_bad_seq, stuck + 1);
    // Writable again, the server idle: the anchor is written within a few seconds, with no
    // new checkpoint needed, and the trail verifies.
    std::fs::remove_dir_all(&blocker).expect("unblock");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while anchored() == stuck {
        assert!(
            tokio::time::Instant::now() < deadline,
            "anchor not written again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(anchored() > stuck);
    let again = verify(&v).await;
    assert!(again.ok, "{again:?}");
    v.stop_result().await.expect("a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_its_deadline_cuts_off_is_still_logged_and_audited_as_what_it_did() {
    // Review 31: a call the transport dropped (its grpc-timeout passed, or the caller
    // cancelled) was dropped at whatever await it had reached: a write done but answered
    // DEADLINE_EXCEEDED had no log line, and a body cut off was audited `invalid`.
    use crate::durability::dev_tokens;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_piped(dir.path());
    let tokens = dev_tokens(dir.path());
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut recruiter = kluis::proto::records_client::RecordsClient::with_interceptor(
        channel.clone(),
        bearer(&tokens["recruiter"]),
    );
    let doc = document(8 * 1024 * 1024);
    let mut cut_off = Vec::new();
    let calls = 10;
    for n in 0..calls {
        let request_id = format!("deadline-{n}");
        let mut request = tonic::Request::new(CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields(&[
                ("full_name", text("Deadline Passed")),
                ("cv_document", blob(&doc, "application/pdf")),
            ]),
        });
        request.set_timeout(Duration::from_millis(1 + 4 * n));
        request
            .metadata_mut()
            .insert("x-request-id", request_id.parse().expect("ascii"));
        match recruiter.create_record(request).await {
            Ok(_) => {}
            Err(status) => {
                assert!(
                    matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
                    "{status:?}"
                );
                cut_off.push(request_id);
            }
        }
    }
    // The client's own timer may cancel a call before it is sent (then the server never saw
    // it): a call the server saw has its line, and every line is one event below.
    let mut seen = 0usize;
    let mut cut_off_seen = 0usize;
    for n in 0..calls {
        let request_id = format!("deadline-{n}");
        let lines = logged_lines(&server, &request_id).await;
        assert!(lines.len() <= 1, "{request_id}: one line: {lines:?}");
        let Some(line) = lines.first() else {
            assert!(
                cut_off.contains(&request_id),
                "an answered call has its line"
            );
            continue;
        };
        seen += 1;
        cut_off_seen += usize::from(cut_off.contains(&request_id));
        assert!(
            line.contains("method=\"CreateRecord\"")
                && line.contains("principal=\"dev-recruiter\""),
            "{line}"
        );
        assert!(
            !line.contains("status=InvalidArgument"),
            "a body cut off is not the caller's invalid input: {line}"
        );
    }
    assert!(
        cut_off_seen > 0,
        "no call that reached the server was cut off by its deadline ({cut_off:?})"
    );
    // The audit trail has one CreateRecord event per call (written or not), none `invalid`.
    let mut auditor = kluis::proto::audit_client::AuditClient::with_interceptor(
        channel,
        bearer(&tokens["auditor"]),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = auditor
            .query_events(kluis::proto::QueryEventsRequest {
                principal: "dev-recruiter".into(),
                page_size: 100,
                ..Default::default()
            })
            .await
            .expect("query")
            .into_inner()
            .events;
        let creates: Vec<_> = events
            .iter()
            .filter(|e| e.action == "CreateRecord")
            .collect();
        if creates.len() >= seen || std::time::Instant::now() > deadline {
            assert_eq!(creates.len(), seen, "{creates:?}");
            assert!(
                creates.iter().all(|e| e.outcome != "invalid"),
                "{creates:?}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

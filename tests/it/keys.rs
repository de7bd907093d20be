//! The `Keys` service through real gRPC: exact per-version counts, rotate → rewrap → retire,
//! rights, re-key, rotation and rewrap under concurrent traffic, a retired version that no
//! longer opens an old copy of the data, the rotation schedule, and `kill -9` in the middle of
//! a rewrap (the real binary).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kluis::proto::audit_client::AuditClient;
use kluis::proto::keys_client::KeysClient;
use kluis::proto::{
    CreateRecordRequest, GetKeyStatusRequest, GetRecordRequest, KeyStatus, QueryEventsRequest,
    RekeyRequest, RetireKeyVersionRequest, RewrapProgress, RewrapRequest, RotateKeyRequest,
    UpdateRecordRequest,
};
use kluis::record::{RecordBody, StoredRecord};
use kluis::schema::Category;
use kluis::store::{Keyspace, Store};
use prost::Message;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

use crate::helpers::*;

type Keys = KeysClient<InterceptedService<Channel, Bearer>>;

async fn keys_at(addr: &str, token: &str) -> Keys {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    KeysClient::with_interceptor(channel, bearer(token))
}

async fn keys(v: &TestVault, role: &str) -> Keys {
    keys_at(&v.addr.to_string(), &v.tokens[role]).await
}

/// (state, records) of each version of `category`, and its active version.
fn versions(status: &KeyStatus, category: &str) -> (u32, BTreeMap<u32, (String, u64)>) {
    let c = status
        .categories
        .iter()
        .find(|c| c.category == category)
        .unwrap_or_else(|| panic!("category {category} in status"));
    (
        c.active_version,
        c.versions
            .iter()
            .map(|v| (v.version, (v.state.clone(), v.records)))
            .collect(),
    )
}

async fn status(k: &mut Keys) -> KeyStatus {
    k.get_key_status(GetKeyStatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

/// Runs a job's stream to its end; returns every progress message.
async fn drain(
    stream: Result<tonic::Response<tonic::Streaming<RewrapProgress>>, tonic::Status>,
) -> Vec<RewrapProgress> {
    let mut stream = stream.expect("job starts").into_inner();
    let mut out = Vec::new();
    while let Some(p) = stream.message().await.expect("progress") {
        out.push(p);
    }
    out
}

/// Creates `n` records with contact + personal fields (recruiter), and identity + financial
/// fields (payroll) on every other one. Returns the ids.
async fn create_records(v: &TestVault, n: usize) -> Vec<String> {
    let mut recruiter = v.client("recruiter").await;
    let mut payroll = v.client("payroll").await;
    let mut ids = Vec::new();
    for i in 0..n {
        let id = recruiter
            .create_record(CreateRecordRequest {
                purpose: "recruitment".into(),
                fields: fields(&[
                    ("full_name", text(&format!("Kandidaat {i}"))),
                    ("email", text(&format!("k{i}@example.nl"))),
                ]),
            })
            .await
            .expect("create")
            .into_inner()
            .record_id;
        if i % 2 == 0 {
            payroll
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
                .expect("payroll update");
        }
        ids.push(id);
    }
    ids
}

async fn read_all(v: &TestVault, ids: &[String]) {
    let mut payroll = v.client("payroll").await;
    let mut recruiter = v.client("recruiter").await;
    for (i, id) in ids.iter().enumerate() {
        let got = recruiter
            .get_record(GetRecordRequest {
                record_id: id.clone(),
                purpose: "recruitment".into(),
                field_names: vec![],
            })
            .await
            .unwrap_or_else(|e| panic!("record {id} reads back: {e}"))
            .into_inner();
        assert_eq!(text_of(&got.fields["full_name"]), format!("Kandidaat {i}"));
        if i % 2 == 0 {
            let got = payroll
                .get_record(GetRecordRequest {
                    record_id: id.clone(),
                    purpose: "payroll".into(),
                    field_names: vec!["bsn".into(), "iban".into()],
                })
                .await
                .unwrap_or_else(|e| panic!("record {id} identity reads back: {e}"))
                .into_inner();
            assert_eq!(text_of(&got.fields["bsn"]), "111222333");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_rewrap_retire_with_exact_counts_and_audit() {
    let mut v = spawn_vault().await;
    let ids = create_records(&v, 9).await;
    let mut k = keys(&v, "security_officer").await;

    let s = status(&mut k).await;
    assert_eq!(s.categories.len(), 6);
    assert_eq!(
        versions(&s, "contact"),
        (1, BTreeMap::from([(1, ("active".into(), 9))]))
    );
    assert_eq!(
        versions(&s, "identity"),
        (1, BTreeMap::from([(1, ("active".into(), 5))]))
    );
    assert_eq!(versions(&s, "cv").1[&1].1, 0);
    assert!(s.categories[0].versions[0].created.is_some());

    // Rotate identity only: new DEKs use v2, existing ones stay on v1 (decrypt-only).
    let s = k
        .rotate_key(RotateKeyRequest {
            category: "identity".into(),
        })
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(
        versions(&s, "identity"),
        (
            2,
            BTreeMap::from([(1, ("decrypt_only".into(), 5)), (2, ("active".into(), 0))])
        )
    );
    assert_eq!(versions(&s, "contact").0, 1, "other categories unchanged");
    // A new identity data key is wrapped by v2.
    let more = create_records(&v, 1).await;
    assert_eq!(versions(&status(&mut k).await, "identity").1[&2].1, 1);

    // Retire refused while in use, for the active version and for unknown versions.
    assert_status(
        k.retire_key_version(RetireKeyVersionRequest {
            category: "identity".into(),
            version: 1,
        })
        .await,
        Code::FailedPrecondition,
        &["5 records", "Rewrap"],
    );
    assert_status(
        k.retire_key_version(RetireKeyVersionRequest {
            category: "identity".into(),
            version: 2,
        })
        .await,
        Code::FailedPrecondition,
        &["active"],
    );
    assert_status(
        k.retire_key_version(RetireKeyVersionRequest {
            category: "identity".into(),
            version: 7,
        })
        .await,
        Code::NotFound,
        &["version"],
    );
    assert_status(
        k.retire_key_version(RetireKeyVersionRequest {
            category: "bsn".into(),
            version: 1,
        })
        .await,
        Code::InvalidArgument,
        &["category", "unknown"],
    );

    // Rewrap: streams progress to finished; total = the records that needed it.
    let progress = drain(
        k.rewrap(RewrapRequest {
            category: "identity".into(),
        })
        .await,
    )
    .await;
    let last = progress.last().expect("at least one message");
    assert!(last.finished);
    assert_eq!(
        (last.done, last.total, last.category.as_str()),
        (5, 5, "identity")
    );
    assert!(progress.iter().all(|p| p.done <= p.total));
    let s = status(&mut k).await;
    assert_eq!(
        versions(&s, "identity"),
        (
            2,
            BTreeMap::from([(1, ("decrypt_only".into(), 0)), (2, ("active".into(), 6))])
        )
    );
    // A second rewrap has nothing to do and says so.
    let again = drain(
        k.rewrap(RewrapRequest {
            category: "identity".into(),
        })
        .await,
    )
    .await;
    let last = again.last().expect("message");
    assert_eq!((last.done, last.total, last.finished), (0, 0, true));

    // Retire: accepted now; the KEK is gone from the store and shows as retired.
    let s = k
        .retire_key_version(RetireKeyVersionRequest {
            category: "identity".into(),
            version: 1,
        })
        .await
        .expect("retire")
        .into_inner();
    assert_eq!(versions(&s, "identity").1[&1], ("retired".into(), 0));
    assert!(v
        .vault()
        .store()
        .get(
            Keyspace::Meta,
            &kluis::keys::kek_meta_key(Category::Identity, 1)
        )
        .await
        .expect("get")
        .is_none());
    assert_status(
        k.retire_key_version(RetireKeyVersionRequest {
            category: "identity".into(),
            version: 1,
        })
        .await,
        Code::FailedPrecondition,
        &["already retired"],
    );

    // Every record reads back, before and after a restart; the retired state persists. The
    // records made before the rotation (their identity keys rewrapped from v1 to v2) and the
    // one made after it (`more`: its identity key wrapped by v2 from the start; made by
    // `create_records` as its record 0, so named "Kandidaat 0" and given a BSN): read
    // separately, as `read_all` derives each expected name from the index.
    read_all(&v, &ids).await;
    read_all(&v, &more).await;
    v.restart().await;
    read_all(&v, &ids).await;
    read_all(&v, &more).await;
    let mut k = keys(&v, "security_officer").await;
    let s = status(&mut k).await;
    assert_eq!(versions(&s, "identity").1[&1], ("retired".into(), 0));
    assert_eq!(versions(&s, "identity").1[&2], ("active".into(), 6));

    // The trail holds each key operation and each record the job touched.
    let mut auditor =
        AuditClient::with_interceptor(v.channel().await, bearer(&v.tokens["auditor"]));
    let mut events = Vec::new();
    let mut token = String::new();
    loop {
        let page = auditor
            .query_events(QueryEventsRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("query")
            .into_inner();
        events.extend(page.events);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let count = |action: &str, principal: &str, outcome: &str| {
        events
            .iter()
            .filter(|e| e.action == action && e.principal == principal && e.outcome == outcome)
            .count()
    };
    assert_eq!(count("RotateKey", "test-security_officer", "ok"), 1);
    assert_eq!(count("Rewrap", "test-security_officer", "ok"), 2);
    assert_eq!(count("RewrapRecord", "system:key-job", "ok"), 5);
    assert_eq!(count("RewrapFinished", "system:key-job", "ok"), 2);
    assert_eq!(count("RetireKeyVersion", "test-security_officer", "ok"), 1);
    assert_eq!(
        count("RetireKeyVersion", "test-security_officer", "invalid"),
        5
    );
    assert!(count("GetKeyStatus", "test-security_officer", "ok") >= 4);
    let rewrapped: std::collections::BTreeSet<_> = events
        .iter()
        .filter(|e| e.action == "RewrapRecord")
        .map(|e| e.record_id.clone())
        .collect();
    let expected: std::collections::BTreeSet<_> = ids.iter().step_by(2).cloned().collect();
    assert_eq!(rewrapped, expected);
    // The key events name the category, then the version made or asked for: each refused
    // retirement and the one that destroyed v1 can be told apart.
    let named = |action: &str| -> Vec<(Vec<String>, String)> {
        events
            .iter()
            .filter(|e| e.action == action)
            .map(|e| (e.field_names.clone(), e.outcome.clone()))
            .collect()
    };
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        named("RotateKey"),
        vec![(names(&["identity", "identity/v2"]), "ok".into())]
    );
    assert_eq!(
        named("RetireKeyVersion"),
        vec![
            (names(&["identity", "identity/v1"]), "invalid".into()),
            (names(&["identity", "identity/v2"]), "invalid".into()),
            (names(&["identity", "identity/v7"]), "invalid".into()),
            (names(&[]), "invalid".into()),
            (names(&["identity", "identity/v1"]), "ok".into()),
            (names(&["identity", "identity/v1"]), "invalid".into()),
        ]
    );
}

/// `RotateKey` and `RetireKeyVersion` events name the version made or asked for
/// (`<category>/v<version>` after the category): successive rotations and retirements of one
/// category, a rotation of every category, and refused attempts (no right, no version) differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_events_name_the_version_made_or_retired() {
    let v = spawn_vault().await;
    let mut k = keys(&v, "security_officer").await;
    for _ in 0..2 {
        k.rotate_key(RotateKeyRequest {
            category: "identity".into(),
        })
        .await
        .expect("rotate identity");
    }
    k.rotate_key(RotateKeyRequest::default())
        .await
        .expect("rotate every category");
    // No record exists: every older identity version may go.
    for version in [1, 2, 3] {
        k.retire_key_version(RetireKeyVersionRequest {
            category: "identity".into(),
            version,
        })
        .await
        .expect("retire");
    }
    assert_status(
        k.retire_key_version(RetireKeyVersionRequest {
            category: "identity".into(),
            version: 4,
        })
        .await,
        Code::FailedPrecondition,
        &["active"],
    );
    assert_status(
        k.retire_key_version(RetireKeyVersionRequest {
            category: "contact".into(),
            version: 0,
        })
        .await,
        Code::InvalidArgument,
        &["version"],
    );
    assert_status(
        keys(&v, "payroll")
            .await
            .retire_key_version(RetireKeyVersionRequest {
                category: "contact".into(),
                version: 1,
            })
            .await,
        Code::PermissionDenied,
        &["retire"],
    );
    let events = v.audit_events(QueryEventsRequest::default()).await;
    let named: Vec<(&str, &str, Vec<&str>)> = events
        .iter()
        .filter(|e| e.action == "RotateKey" || e.action == "RetireKeyVersion")
        .map(|e| {
            (
                e.action.as_str(),
                e.outcome.as_str(),
                e.field_names.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    let every: Vec<&str> = Category::ALL
        .iter()
        .map(|c| c.as_str())
        .chain([
            "contact/v2",
            "personal/v2",
            "cv/v2",
            "identity/v4",
            "financial/v2",
            "absence/v2",
        ])
        .collect();
    assert_eq!(
        named,
        vec![
            ("RotateKey", "ok", vec!["identity", "identity/v2"]),
            ("RotateKey", "ok", vec!["identity", "identity/v3"]),
            ("RotateKey", "ok", every),
            ("RetireKeyVersion", "ok", vec!["identity", "identity/v1"]),
            ("RetireKeyVersion", "ok", vec!["identity", "identity/v2"]),
            ("RetireKeyVersion", "ok", vec!["identity", "identity/v3"]),
            (
                "RetireKeyVersion",
                "invalid",
                vec!["identity", "identity/v4"]
            ),
            ("RetireKeyVersion", "invalid", vec!["contact"]),
            ("RetireKeyVersion", "denied", vec!["contact", "contact/v1"]),
        ]
    );
    let s = status(&mut k).await;
    assert_eq!(versions(&s, "identity").0, 4);
    assert_eq!(versions(&s, "contact").0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_security_officer_manages_keys_and_it_reads_no_data() {
    let v = spawn_vault().await;
    let ids = create_records(&v, 1).await;
    for role in [
        "recruiter",
        "payroll",
        "absence",
        "privacy_officer",
        "auditor",
    ] {
        let mut k = keys(&v, role).await;
        assert_status(
            k.get_key_status(GetKeyStatusRequest {}).await,
            Code::PermissionDenied,
            &["may not call GetKeyStatus", "keys = [\"status\"]"],
        );
        assert_status(
            k.rotate_key(RotateKeyRequest::default()).await,
            Code::PermissionDenied,
            &["rotate"],
        );
        assert_status(
            k.rewrap(RewrapRequest::default()).await,
            Code::PermissionDenied,
            &["rewrap"],
        );
        assert_status(
            k.rekey(RekeyRequest {
                category: "identity".into(),
            })
            .await,
            Code::PermissionDenied,
            &["rekey"],
        );
        assert_status(
            k.retire_key_version(RetireKeyVersionRequest {
                category: "identity".into(),
                version: 1,
            })
            .await,
            Code::PermissionDenied,
            &["retire"],
        );
    }
    // Each denied job names the category it was asked for, as a denied rotation does
    // (review 29); `Rewrap` without one names every category.
    let events = v.audit_events(QueryEventsRequest::default()).await;
    for action in ["Rewrap", "Rekey", "RotateKey"] {
        let denied: Vec<Vec<&str>> = events
            .iter()
            .filter(|e| e.action == action && e.outcome == "denied")
            .map(|e| e.field_names.iter().map(String::as_str).collect())
            .collect();
        assert_eq!(denied.len(), 5, "{action}");
        let every: Vec<&str> = Category::ALL.iter().map(|c| c.as_str()).collect();
        let expected = if action == "Rekey" {
            vec!["identity"]
        } else {
            every
        };
        assert!(
            denied.iter().all(|n| *n == expected),
            "{action}: {denied:?}"
        );
    }
    let mut nobody = keys_at(&v.addr.to_string(), "not-a-token").await;
    assert_status(
        nobody.get_key_status(GetKeyStatusRequest {}).await,
        Code::Unauthenticated,
        &[],
    );
    // The security officer still cannot read record data.
    let mut so = v.client("security_officer").await;
    for purpose in ["payroll", "recruitment", "data_subject_request"] {
        assert_status(
            so.get_record(GetRecordRequest {
                record_id: ids[0].clone(),
                purpose: purpose.into(),
                field_names: vec![],
            })
            .await,
            Code::PermissionDenied,
            &[],
        );
    }
    let mut k = keys(&v, "security_officer").await;
    assert_status(
        k.rekey(RekeyRequest {
            category: String::new(),
        })
        .await,
        Code::InvalidArgument,
        &["category", "required"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_replaces_data_keys_and_re_encrypts_fields() {
    let v = spawn_vault().await;
    let mut recruiter = v.client("recruiter").await;
    let cv: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let mut ids = Vec::new();
    for i in 0..4 {
        let id = create_with(
            &mut recruiter,
            "recruitment",
            &[
                ("full_name", text(&format!("Kandidaat {i}"))),
                ("cv_document", blob(&cv, "application/pdf")),
            ],
        )
        .await;
        ids.push(id);
    }
    let store = v.vault().store();
    let snapshot = |prefix: Vec<u8>| async move {
        let mut out = store
            .scan(Keyspace::Fields, &prefix, None, usize::MAX)
            .await
            .expect("scan");
        out.sort();
        out
    };
    let first = uuid::Uuid::parse_str(&ids[0]).expect("uuid");
    let before_chunks = snapshot(first.as_bytes().to_vec()).await;
    let before_header = store
        .get(Keyspace::Records, first.as_bytes())
        .await
        .expect("get")
        .expect("record");

    let mut k = keys(&v, "security_officer").await;
    let progress = drain(
        k.rekey(RekeyRequest {
            category: "cv".into(),
        })
        .await,
    )
    .await;
    let last = progress.last().expect("message");
    assert_eq!((last.done, last.total, last.finished), (4, 4, true));
    assert_eq!(last.category, "cv");
    // GetKeyStatus says the job finished (review 16: running Rekey again to "follow" a job
    // that had finished started a second full re-key, and nothing said it had finished).
    let job = status(&mut k).await.last_job.expect("the last job");
    assert_eq!(
        (
            job.kind.as_str(),
            job.category.as_str(),
            job.done,
            job.total,
            job.error.as_str(),
            job.requested_by.as_str()
        ),
        ("rekey", "cv", 4, 4, "", "test-security_officer")
    );
    assert!(job.started.is_some() && job.finished.is_some());
    // A rewrap of every category names all six in its events (review 16: it named none).
    drain(
        k.rewrap(RewrapRequest {
            category: String::new(),
        })
        .await,
    )
    .await;
    let all: Vec<String> = Category::ALL
        .iter()
        .map(|c| c.as_str().to_string())
        .collect();
    let events = v
        .audit_events(QueryEventsRequest {
            principal: "test-security_officer".into(),
            ..Default::default()
        })
        .await;
    let rewrap = events
        .iter()
        .find(|e| e.action == "Rewrap")
        .expect("the rewrap call's event");
    assert_eq!(rewrap.field_names, all);

    let after_chunks = snapshot(first.as_bytes().to_vec()).await;
    assert_eq!(before_chunks.len(), after_chunks.len());
    // The `fields` keyspace holds only the cv chunks: `full_name` (≤ INLINE_MAX bytes) lives
    // in the record header, compared below.
    let cv_chunk = |k: &[u8]| k[16..].starts_with(b"cv_document\0");
    assert!(
        before_chunks.iter().all(|(k, _)| cv_chunk(k)),
        "only cv chunks outside the header"
    );
    for ((k1, c1), (k2, c2)) in before_chunks.iter().zip(&after_chunks) {
        assert_eq!(k1, k2);
        assert_ne!(c1, c2, "cv chunk re-encrypted");
    }
    let after_header = store
        .get(Keyspace::Records, first.as_bytes())
        .await
        .expect("get")
        .expect("record");
    assert_ne!(before_header, after_header);
    // In the header (decoded, MAC not checked): the cv data key is new, while the contact
    // category's wrapped data key and the inline `full_name` ciphertext are the same bytes.
    let decode = |raw: &[u8]| {
        let stored = StoredRecord::decode(raw).expect("decode stored header");
        let body = RecordBody::decode(stored.body.as_slice()).expect("decode body");
        (stored, body)
    };
    let (stored_before, body_before) = decode(&before_header);
    let (stored_after, body_after) = decode(&after_header);
    let categories = |b: &RecordBody| b.deks.keys().cloned().collect::<Vec<_>>();
    assert_eq!(categories(&body_before), ["contact", "cv"]);
    assert_eq!(categories(&body_after), ["contact", "cv"]);
    assert_ne!(
        body_before.deks["cv"].sealed, body_after.deks["cv"].sealed,
        "cv data key replaced"
    );
    assert_eq!(
        body_before.deks["contact"], body_after.deks["contact"],
        "contact data key untouched"
    );
    assert!(body_before.fields["full_name"].in_header);
    assert_eq!(
        body_before.fields["full_name"], body_after.fields["full_name"],
        "full_name entry untouched"
    );
    assert_eq!(
        stored_before.inline["full_name"], stored_after.inline["full_name"],
        "inline full_name ciphertext untouched"
    );
    assert_eq!(
        stored_after.inline.keys().collect::<Vec<_>>(),
        ["full_name"],
        "only full_name inline"
    );
    // Data and revision unchanged.
    for (i, id) in ids.iter().enumerate() {
        let got = recruiter
            .get_record(GetRecordRequest {
                record_id: id.clone(),
                purpose: "recruitment".into(),
                field_names: vec![],
            })
            .await
            .expect("get")
            .into_inner();
        assert_eq!(got.revision, 1);
        assert_eq!(text_of(&got.fields["full_name"]), format!("Kandidaat {i}"));
        match &got.fields["cv_document"].kind {
            Some(kluis::proto::field_value::Kind::Blob(b)) => assert_eq!(b, &cv),
            _ => panic!("cv is a blob"),
        }
    }
    // A second re-key makes fresh keys again (a new job, all 4 records).
    let again = drain(
        k.rekey(RekeyRequest {
            category: "cv".into(),
        })
        .await,
    )
    .await;
    assert_eq!(again.last().map(|p| (p.done, p.total)), Some((4, 4)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_and_rewrap_while_clients_read_and_write() {
    let v = spawn_vault().await;
    let ids = create_records(&v, 200).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let mut recruiter = v.client("recruiter").await;
        let mut payroll = v.client("payroll").await;
        let ids = ids.clone();
        let stop = std::sync::Arc::clone(&stop);
        workers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = &ids[(n * 7 + w) % ids.len()];
                n += 1;
                let name = format!("Worker {w} write {n}");
                recruiter
                    .update_record(UpdateRecordRequest {
                        record_id: id.clone(),
                        purpose: "recruitment".into(),
                        expected_revision: 0,
                        set: fields(&[("full_name", text(&name))]),
                        clear: vec![],
                    })
                    .await
                    .expect("update during rotation");
                let got = payroll
                    .get_record(GetRecordRequest {
                        record_id: id.clone(),
                        purpose: "payroll".into(),
                        field_names: vec![],
                    })
                    .await
                    .expect("read during rotation")
                    .into_inner();
                assert!(got.fields.contains_key("email"));
                let created = payroll
                    .create_record(CreateRecordRequest {
                        purpose: "payroll".into(),
                        fields: fields(&[("bsn", text("111222333"))]),
                    })
                    .await
                    .expect("create during rotation")
                    .into_inner()
                    .record_id;
                written.push((id.clone(), name, created));
            }
            written
        }));
    }
    let mut k = keys(&v, "security_officer").await;
    for _ in 0..2 {
        k.rotate_key(RotateKeyRequest::default())
            .await
            .expect("rotate all");
        let progress = drain(k.rewrap(RewrapRequest::default()).await).await;
        assert!(progress.last().expect("message").finished);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut last_name: BTreeMap<String, String> = BTreeMap::new();
    let mut created = Vec::new();
    let mut writes = 0;
    for w in workers {
        for (id, name, new) in w.await.expect("worker") {
            writes += 1;
            last_name.insert(id, name);
            created.push(new);
        }
    }
    assert!(writes > 10, "traffic ran alongside: {writes} rounds");
    // Nothing left on old versions; counts add up to the records holding each category.
    let s = status(&mut k).await;
    for c in &s.categories {
        assert_eq!(c.active_version, 3, "{}", c.category);
        for ver in &c.versions {
            if ver.version != 3 {
                assert_eq!(ver.records, 0, "{} v{}", c.category, ver.version);
            }
        }
    }
    let (_, identity) = versions(&s, "identity");
    assert_eq!(identity[&3].1, (100 + created.len()) as u64);
    let (_, contact) = versions(&s, "contact");
    assert_eq!(contact[&3].1, 200);
    // Every record reads back: one writer per record id slot, so the last write of each wins
    // unless two workers shared an id; check those the map holds via any reader.
    let mut recruiter = v.client("recruiter").await;
    for id in &ids {
        recruiter
            .get_record(GetRecordRequest {
                record_id: id.clone(),
                purpose: "recruitment".into(),
                field_names: vec![],
            })
            .await
            .unwrap_or_else(|e| panic!("{id} reads back: {e}"));
    }
    let mut payroll = v.client("payroll").await;
    for id in &created {
        let got = payroll
            .get_record(GetRecordRequest {
                record_id: id.clone(),
                purpose: "payroll".into(),
                field_names: vec!["bsn".into()],
            })
            .await
            .unwrap_or_else(|e| panic!("{id} reads back: {e}"))
            .into_inner();
        assert_eq!(text_of(&got.fields["bsn"]), "111222333");
    }
    assert!(!last_name.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_version_no_longer_opens_a_copy_taken_before_the_rotation() {
    let mut v = spawn_vault().await;
    let ids = create_records(&v, 4).await;
    v.stop().await;
    let old_copy = tempfile::tempdir().expect("tempdir");
    copy_dir(&data_dir(&v.dir), old_copy.path());
    v.start().await.expect("start");

    let mut k = keys(&v, "security_officer").await;
    k.rotate_key(RotateKeyRequest {
        category: "identity".into(),
    })
    .await
    .expect("rotate");
    drain(
        k.rewrap(RewrapRequest {
            category: "identity".into(),
        })
        .await,
    )
    .await;
    k.retire_key_version(RetireKeyVersionRequest {
        category: "identity".into(),
        version: 1,
    })
    .await
    .expect("retire");

    // The old copy's identity data keys are wrapped by v1, which the current keys no longer
    // hold; other categories (not rotated) still open.
    let old = kluis::store::SledStore::open(old_copy.path()).expect("open old copy");
    let ring = v.vault().keys();
    let id = uuid::Uuid::parse_str(&ids[0]).expect("uuid");
    let raw = old
        .get(Keyspace::Records, id.as_bytes())
        .await
        .expect("get")
        .expect("record in old copy");
    let (kv, ik) = ring.integrity_key();
    let body = kluis::record::RecordBody::open(id.as_bytes(), &raw, kv, ik).expect("header");
    let identity = &body.deks["identity"];
    assert_eq!(identity.kek_version, 1);
    assert!(matches!(
        ring.unwrap_dek(id.as_bytes(), Category::Identity, 1, &identity.sealed),
        Err(kluis::keys::KeyError::MissingKek(Category::Identity, 1))
    ));
    let contact = &body.deks["contact"];
    ring.unwrap_dek(
        id.as_bytes(),
        Category::Contact,
        contact.kek_version,
        &contact.sealed,
    )
    .expect("contact (not rotated) still opens");
    // The current data still reads.
    read_all(&v, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_rotates_a_due_key_and_rewraps_by_itself() {
    let mut v = spawn_vault().await;
    let ids = create_records(&v, 6).await;
    v.stop().await;
    // Make identity v1 two days old, offline.
    {
        let store = kluis::store::SledStore::open(&data_dir(&v.dir)).expect("open");
        let key = b"kek-info/identity/0000000001".to_vec();
        let old = chrono::Utc::now().timestamp_millis() - 2 * 86_400_000;
        let mut batch = kluis::store::Batch::default();
        batch.put(
            Keyspace::Meta,
            key,
            format!("{{\"created_ms\":{old}}}").into_bytes(),
        );
        store.commit(batch).await.expect("commit");
    }
    v.tweak = Some(|s| {
        s.keys
            .rotate_after
            .insert(Category::Identity, Duration::from_secs(86_400));
        s.keys
            .rotate_after
            .insert(Category::Contact, Duration::from_secs(86_400));
        s.keys.schedule_check = Duration::from_millis(200);
    });
    v.start().await.expect("start");
    let mut k = keys(&v, "security_officer").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(&mut k).await;
        let (active, vs) = versions(&s, "identity");
        if active == 2 && vs[&1].1 == 0 && vs[&2].1 == 3 {
            // contact is fresh (created now): not due, not rotated.
            assert_eq!(versions(&s, "contact").0, 1);
            break;
        }
        assert!(Instant::now() < deadline, "schedule did not rotate: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Not rotated again: v2 is fresh.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(versions(&status(&mut k).await, "identity").0, 2);
    read_all(&v, &ids).await;
    let events = v
        .audit_events(QueryEventsRequest {
            principal: "system:key-schedule".into(),
            ..Default::default()
        })
        .await;
    // The rotation, then the rewrap it asked for (once: not again while the job ran).
    let actions: Vec<(&str, &[String])> = events
        .iter()
        .map(|e| (e.action.as_str(), e.field_names.as_slice()))
        .collect();
    // The rotation names the version it made.
    let made = ["identity".to_string(), "identity/v2".to_string()];
    let identity = ["identity".to_string()];
    assert_eq!(
        actions,
        vec![("RotateKey", &made[..]), ("Rewrap", &identity[..])],
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_a_rewrap_resumes_and_finishes() {
    use crate::durability::{dev_tokens, start_dev};
    use kluis::proto::records_client::RecordsClient;

    let dir = tempfile::tempdir().expect("tempdir");
    let mut process = start_dev(dir.path(), "run1.log");
    let tokens = dev_tokens(dir.path());
    let connect = |addr: String, token: String| async move {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        RecordsClient::with_interceptor(channel, bearer(&token))
    };
    // Enough records that a rewrap of every category takes many pages.
    let per_writer = 125;
    let mut writers = Vec::new();
    for _ in 0..24 {
        let mut c = connect(process.addr.clone(), tokens["payroll"].clone()).await;
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..per_writer {
                let id = c
                    .create_record(CreateRecordRequest {
                        purpose: "payroll".into(),
                        fields: fields(&[
                            ("bsn", text("111222333")),
                            ("wage", text(&format!("{}.00", 2000 + i))),
                        ]),
                    })
                    .await
                    .expect("create")
                    .into_inner()
                    .record_id;
                ids.push((id, format!("{}.00", 2000 + i)));
            }
            ids
        }));
    }
    let mut records = Vec::new();
    for w in writers {
        match w.await {
            Ok(ids) => records.extend(ids),
            Err(e) => panic!(
                "writer: {e}; server log:\n{}",
                std::fs::read_to_string(dir.path().join("run1.log")).unwrap_or_default()
            ),
        }
    }
    let total = records.len() as u64;
    let mut k = keys_at(&process.addr, &tokens["security_officer"]).await;
    k.rotate_key(RotateKeyRequest::default())
        .await
        .expect("rotate");
    let mut stream = k
        .rewrap(RewrapRequest::default())
        .await
        .expect("rewrap starts")
        .into_inner();
    // Kill as soon as the job has started (its state is stored before the first message).
    let first = stream
        .message()
        .await
        .expect("progress")
        .expect("a first message");
    assert_eq!(first.total, total);
    assert!(!first.finished);
    process.child.kill().expect("SIGKILL");
    process.child.wait().expect("reaped");
    // The stored job (after log replay) is unfinished: the kill hit it mid-way.
    {
        let store = kluis::store::SledStore::open(&dir.path().join("data")).expect("open");
        let job = kluis::rotation::stored_job(&store)
            .await
            .expect("read job")
            .expect("a stored job");
        assert!(
            job.finished_ms.is_none(),
            "killed before it finished: {job:?}"
        );
        assert!(job.done < total);
    }

    let process = start_dev(dir.path(), "run2.log");
    let mut k = keys_at(&process.addr, &tokens["security_officer"]).await;
    // Attach to the resumed job and follow it to its end.
    let progress = drain(k.rewrap(RewrapRequest::default()).await).await;
    let last = progress.last().expect("message");
    assert!(last.finished);
    assert_eq!(last.total, total, "the resumed job keeps its total");
    let log = std::fs::read_to_string(dir.path().join("run2.log")).expect("log");
    assert!(log.contains("resuming key job"), "{log}");
    let s = status(&mut k).await;
    for c in &s.categories {
        for ver in &c.versions {
            if ver.version != c.active_version {
                assert_eq!(ver.records, 0, "{} v{}", c.category, ver.version);
            }
        }
    }
    assert_eq!(versions(&s, "identity").1[&2].1, total);
    assert_eq!(versions(&s, "financial").1[&2].1, total);
    // Every record reads back (8 readers in parallel).
    let mut readers = Vec::new();
    for chunk in records.chunks(records.len().div_ceil(8)) {
        let mut c = connect(process.addr.clone(), tokens["payroll"].clone()).await;
        let chunk = chunk.to_vec();
        readers.push(tokio::spawn(async move {
            for (id, wage) in &chunk {
                let got = c
                    .get_record(GetRecordRequest {
                        record_id: id.clone(),
                        purpose: "payroll".into(),
                        field_names: vec!["wage".into(), "bsn".into()],
                    })
                    .await
                    .unwrap_or_else(|e| panic!("{id} reads back after kill -9 mid-rewrap: {e}"))
                    .into_inner();
                assert_eq!(text_of(&got.fields["wage"]), wage);
            }
        }));
    }
    for r in readers {
        r.await.expect("reader");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_meets_a_damaged_record_stops_names_it_and_resumes_once_repaired() {
    let mut v = spawn_vault().await;
    let ids = create_records(&v, 6).await;
    let mut k = keys(&v, "security_officer").await;
    k.rotate_key(RotateKeyRequest {
        category: "identity".into(),
    })
    .await
    .expect("rotate");
    v.stop().await;
    // Flip a byte of one identity record's header MAC, offline.
    let damaged = uuid::Uuid::parse_str(&ids[2]).expect("uuid");
    let original = {
        let store = kluis::store::SledStore::open(&data_dir(&v.dir)).expect("open");
        let raw = store
            .get(Keyspace::Records, damaged.as_bytes())
            .await
            .expect("get")
            .expect("record");
        let mut header = <kluis::record::StoredRecord as prost::Message>::decode(raw.as_slice())
            .expect("decode header");
        header.mac[0] ^= 1;
        let bad = prost::Message::encode_to_vec(&header);
        let mut batch = kluis::store::Batch::default();
        batch.put(Keyspace::Records, damaged.as_bytes().to_vec(), bad);
        store.commit(batch).await.expect("commit");
        raw
    };
    v.start().await.expect("start");
    let mut k = keys(&v, "security_officer").await;
    let mut stream = k
        .rewrap(RewrapRequest {
            category: "identity".into(),
        })
        .await
        .expect("job starts")
        .into_inner();
    let error = loop {
        match stream.message().await {
            Ok(Some(p)) => assert!(!p.finished, "finished over a damaged record"),
            Ok(None) => panic!("stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(error.code(), Code::Aborted, "{}", error.message());
    assert!(error.message().contains(&ids[2]), "{}", error.message());
    assert!(
        error.message().contains("record header"),
        "{}",
        error.message()
    );
    // Repair (restore the header, offline), then Rewrap resumes the same job and finishes.
    v.stop().await;
    {
        let store = kluis::store::SledStore::open(&data_dir(&v.dir)).expect("open");
        let mut batch = kluis::store::Batch::default();
        batch.put(Keyspace::Records, damaged.as_bytes().to_vec(), original);
        store.commit(batch).await.expect("commit");
    }
    v.start().await.expect("start");
    let mut k = keys(&v, "security_officer").await;
    // Once the header reads again (GetKeyStatus counts every record, so it is DATA_LOSS
    // naming the record until then), GetKeyStatus says the job failed, why, and how far it
    // got.
    let job = status(&mut k).await.last_job.expect("the last job");
    assert_eq!(
        (job.kind.as_str(), job.category.as_str(), job.total),
        ("rewrap", "identity", 3)
    );
    assert!(job.error.contains(&ids[2]), "{}", job.error);
    assert!(job.done < job.total, "{job:?}");
    assert!(job.started.is_some() && job.finished.is_none(), "{job:?}");
    assert!(
        kluis::cli::keys::job_line(&job).ends_with(&format!(
            "failed: {} (requesting the same job resumes it)",
            job.error
        )),
        "{}",
        kluis::cli::keys::job_line(&job)
    );

    let progress = drain(
        k.rewrap(RewrapRequest {
            category: "identity".into(),
        })
        .await,
    )
    .await;
    let last = progress.last().expect("message");
    assert_eq!((last.done, last.total, last.finished), (3, 3, true));
    assert_eq!(versions(&status(&mut k).await, "identity").1[&1].1, 0);
    read_all(&v, &ids).await;
    let events = v
        .audit_events(QueryEventsRequest {
            principal: "system:key-job".into(),
            ..Default::default()
        })
        .await;
    let outcomes: Vec<_> = events
        .iter()
        .filter(|e| e.action == "RewrapFinished")
        .map(|e| e.outcome.as_str())
        .collect();
    assert_eq!(outcomes, vec!["error", "ok"]);
}

/// A rotation is committed before the key status is read for the answer: if that read fails
/// (a damaged record header: the counts cannot be exact), the error says the rotation is
/// done, so that nobody repeats it blindly; and the rotation's event is in the trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_whose_status_cannot_be_read_says_it_is_done() {
    let mut v = spawn_vault().await;
    let ids = create_records(&v, 2).await;
    v.stop().await;
    damage_header(&v, &ids[0]).await;
    v.start().await.expect("start");
    let mut k = keys(&v, "security_officer").await;
    let err = k
        .rotate_key(RotateKeyRequest {
            category: "contact".into(),
        })
        .await
        .expect_err("the status cannot be read");
    assert_eq!(err.code(), Code::DataLoss);
    assert!(
        err.message().starts_with("the rotation is done; ") && err.message().contains(&ids[0]),
        "{}",
        err.message()
    );
    let events = v
        .audit_events(QueryEventsRequest {
            principal: "test-security_officer".into(),
            ..Default::default()
        })
        .await;
    assert!(
        events
            .iter()
            .any(|e| e.action == "RotateKey" && e.outcome == "ok"),
        "{events:?}"
    );
}

//! Non-negotiable 6 (secrets are zeroized): no plaintext of a sensitive value and no bearer
//! token is left in freed heap memory by kluis's own code (review 8, secrets).
//!
//! This is a test binary of its own (not a module of `tests/it`) because it installs a global
//! allocator, which must affect no other test. The allocator looks at every heap block as it
//! is freed: a block freed by a `Zeroizing` buffer has been wiped, so a planted value found in
//! a freed block is a copy that stays readable in the process's memory until the allocator
//! reuses the block. A block that a growing `String` or `Vec` leaves behind when it
//! reallocates is freed through `dealloc` too (the default `realloc` allocates, copies and
//! frees), so it is caught as well.
//!
//! `unsafe`: the library forbids it (`#![forbid(unsafe_code)]` in `src/lib.rs`); this file
//! needs it for the allocator only, in three places: implementing `GlobalAlloc` (an unsafe
//! trait) by forwarding every call to `System`, and reading a block's bytes with
//! `slice::from_raw_parts` just before its `dealloc` is forwarded. The block is still
//! allocated and `layout.size()` bytes long. Part of it may never have been written by its
//! owner (a `Vec`'s spare capacity): Rust leaves reading such bytes undefined, and the test
//! accepts that, as every heap-scanning tool does (the bytes are whatever the memory holds, and
//! they are only compared). Nothing else is unsafe.
//!
//! Not asserted on, because kluis cannot wipe it:
//! - the gRPC transport's buffers (tonic, h2, hyper) and prost's decoded request strings
//!   (review 8, finding 5): this test calls the [`Vault`] and the records service's handlers
//!   directly, below the transport;
//! - buffers internal to libraries that kluis hands a value to: ICU4X's normaliser and the
//!   `idna` crate keep up to a few hundred characters in inline (stack) buffers and spill to
//!   the heap only for longer input; `str::to_lowercase` sizes its string to its input and
//!   grows it only for the few capitals that lower-case to more bytes (`İ`, `Ⱥ`, `Ⱦ`). The
//!   values planted here trigger none of these, so a hit is always kluis's own copy.
//!
//! Covered: every vault operation that handles a value (short values in the record header,
//! long ones sealed detached in their own buffer), exports, requests refused after their values
//! were parsed, the service's conversion of request and answer messages, and the bearer tokens
//! that `kluis init` and dev mode make.
//!
//! Determinism: the phases run one after another on one thread (a current-thread runtime,
//! in the one test that scans). The only other test here uses a value that is not planted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use kluis::audit;
use kluis::crypto::SecretKey;
use kluis::keys::{KeyRing, MasterKey};
use kluis::policy::{Caller, Policy};
use kluis::schema::Schema;
use kluis::store::SledStore;
use kluis::vault::{Change, StateChange, Value, Vault};
use zeroize::Zeroizing;

/// The planted values, in the forms kluis makes of them (normalised, lower-cased, …).
const MARKERS: &[(&str, &str)] = &[
    (CANARY, "Canarymarkerzq"),
    ("bsn (normalised)", "273891352"),
    ("iban (normalised)", "NL59ZQXB7305918264"),
    ("email as sent", "Kwadraat.Zqmarker+tag@Voorbeeld-Zq.NL"),
    (
        "email index form (lower case)",
        "kwadraat.zqmarker+tag@voorbeeld-zq.nl",
    ),
    ("email stored form", "Kwadraat.Zqmarker+tag@voorbeeld-zq.nl"),
    ("email domain (idna)", "voorbeeld-zq.nl"),
    ("phone (normalised)", "31698761203"),
    ("postcode (normalised)", "9847 QZ"),
    ("postcode as sent (its characters)", "9847qz"),
    ("date of birth", "1987-06-05"),
    // What a string that grows while the date is written into it leaves behind.
    ("date of birth (a prefix)", "1987-06-"),
    ("absence periods", "2025-03-02/2025-03-06"),
    ("full_name", "Zebulon Quaxmarker"),
    ("restriction reason", "Reasonmarkerzq Jansen"),
    ("legal hold reason", "Holdmarkerzq case 117"),
    ("wage", "4321.77"),
    // Values sealed detached (longer than `record::ENVELOPE_MAX`), each a repeated 12-byte
    // unit, and values of requests refused after they were parsed (review 29).
    ("long blob (detached)", "Blobmarkerzq"),
    ("long blob, base64 (export)", "QmxvYm1hcmtlcnpx"),
    ("long text (detached)", "Textmarkerzq"),
    ("refused long blob", "Refblobmarkq"),
    ("refused long text", "Reftextmarkq"),
    ("service long blob", "Svcblobmarkq"),
    ("service long text", "Svctextmarkq"),
];

/// The label of the value the test frees unwiped itself, to see that the scan finds it.
const CANARY: &str = "canary";

/// 0: off. 1: scan each freed block for the [`NEEDLES`]. 2: keep a copy of each freed block
/// (for tokens, which are known only once made).
static MODE: AtomicUsize = AtomicUsize::new(0);
const SCAN: usize = 1;
const KEEP: usize = 2;
/// Blocks larger than this are not looked at (none of the values is near it).
const SCAN_LIMIT: usize = 1 << 20;
const KEEP_LIMIT: usize = 64 << 10;

static PHASE: AtomicUsize = AtomicUsize::new(0);

/// What a scan looks for: a marker as bytes, as UTF-32 (a `Vec<char>`), and for markers of
/// digits only, as one `u32` per digit value.
struct Needle {
    label: &'static str,
    form: &'static str,
    bytes: Vec<u8>,
}
static NEEDLES: OnceLock<Vec<Needle>> = OnceLock::new();

struct Hit {
    phase: usize,
    label: &'static str,
    form: &'static str,
    size: usize,
    frames: String,
}
static HITS: Mutex<Vec<Hit>> = Mutex::new(Vec::new());
static KEPT: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

thread_local! {
    /// Set while the allocator itself allocates (a backtrace, a kept copy): those blocks are
    /// not looked at.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The kluis frames of the current stack: where a block was freed.
fn kluis_frames() -> String {
    std::backtrace::Backtrace::force_capture()
        .to_string()
        .lines()
        .map(str::trim)
        .filter(|l| {
            (l.contains("kluis::") || l.contains("at ./src/"))
                && !l.contains("residue::")
                && !l.contains("/rustc/")
        })
        .take(8)
        .collect::<Vec<_>>()
        .join("\n      ")
}

/// Looks at `bytes`, a block about to be freed.
fn look_at(bytes: &[u8]) {
    match MODE.load(Ordering::SeqCst) {
        SCAN if bytes.len() <= SCAN_LIMIT => {
            for n in NEEDLES.get().into_iter().flatten() {
                if contains(bytes, &n.bytes) {
                    let hit = Hit {
                        phase: PHASE.load(Ordering::SeqCst),
                        label: n.label,
                        form: n.form,
                        size: bytes.len(),
                        frames: kluis_frames(),
                    };
                    HITS.lock().expect("hits").push(hit);
                }
            }
        }
        KEEP if bytes.len() <= KEEP_LIMIT => KEPT.lock().expect("kept").push(bytes.to_vec()),
        _ => {}
    }
}

struct Scan;

// SAFETY: every call is forwarded to `System` with the same arguments; `dealloc` only reads
// the block first (see the file's doc comment).
unsafe impl GlobalAlloc for Scan {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees for `layout` are `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if MODE.load(Ordering::Relaxed) != 0 && !BUSY.with(|b| b.replace(true)) {
            // SAFETY: `ptr` is a live block of `layout.size()` bytes (the caller's guarantee
            // for `dealloc`), freed only below; the slice does not outlive this call. (Bytes
            // never written are read too: see the file's doc comment.)
            look_at(unsafe { std::slice::from_raw_parts(ptr, layout.size()) });
            BUSY.with(|b| b.set(false));
        }
        // SAFETY: `ptr` was allocated by `System` (through `alloc` above) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Scan = Scan;

fn text(name: &str, v: &str) -> (String, Value) {
    (name.to_string(), Value::Text(Zeroizing::new(v.to_string())))
}

/// Runs `phase` with freed blocks kept, and returns how many kept blocks hold each of the
/// tokens `secrets` gives once the phase is done (labelled). A token is looked for without its
/// `kluis_` prefix: a copy of its random part alone counts too.
fn kept_copies<T>(
    phase: impl FnOnce() -> T,
    secrets: impl FnOnce(&T) -> Vec<(String, Zeroizing<String>)>,
) -> Vec<(String, usize)> {
    KEPT.lock().expect("kept").clear();
    MODE.store(KEEP, Ordering::SeqCst);
    let out = phase();
    MODE.store(0, Ordering::SeqCst);
    let kept = std::mem::take(&mut *KEPT.lock().expect("kept"));
    secrets(&out)
        .into_iter()
        .map(|(label, secret)| {
            let random = secret.strip_prefix("kluis_").unwrap_or(&secret);
            let n = kept
                .iter()
                .filter(|b| contains(b, random.as_bytes()))
                .count();
            (label, n)
        })
        .collect()
}

/// A value of `len` bytes repeating `unit` (12 bytes: base64 stays aligned), built in place.
fn long(unit: &str, len: usize) -> Zeroizing<Vec<u8>> {
    let mut v = Zeroizing::new(Vec::with_capacity(len));
    while v.len() < len {
        let n = (len - v.len()).min(unit.len());
        v.extend_from_slice(&unit.as_bytes()[..n]);
    }
    v
}
fn long_text(unit: &str, len: usize) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::with_capacity(len));
    while s.len() + unit.len() <= len {
        s.push_str(unit);
    }
    s
}
fn blob(name: &str, unit: &str, len: usize) -> (String, Value) {
    (
        name.to_string(),
        Value::Blob {
            bytes: long(unit, len),
            content_type: "text/plain".into(),
        },
    )
}
fn ltext(name: &str, unit: &str, len: usize) -> (String, Value) {
    (name.to_string(), Value::Text(long_text(unit, len)))
}

#[test]
fn no_plaintext_value_or_token_is_left_in_freed_heap_memory() {
    NEEDLES.get_or_init(|| {
        let mut needles = Vec::new();
        for &(label, m) in MARKERS {
            needles.push(Needle {
                label,
                form: "",
                bytes: m.as_bytes().to_vec(),
            });
            needles.push(Needle {
                label,
                form: " (as UTF-32: a Vec<char>)",
                bytes: m.chars().flat_map(|c| u32::from(c).to_le_bytes()).collect(),
            });
            if m.bytes().all(|b| b.is_ascii_digit()) {
                needles.push(Needle {
                    label,
                    form: " (as a u32 per digit value)",
                    bytes: m
                        .bytes()
                        .flat_map(|b| u32::from(b - b'0').to_le_bytes())
                        .collect(),
                });
            }
        }
        needles
    });
    // The scan finds a copy that is not wiped, and so does a search of kept blocks.
    MODE.store(SCAN, Ordering::SeqCst);
    drop(std::hint::black_box(String::from("Canarymarkerzq")));
    MODE.store(0, Ordering::SeqCst);
    let canaries = std::mem::take(&mut *HITS.lock().expect("hits"));
    assert!(
        !canaries.is_empty() && canaries.iter().all(|h| h.label == CANARY),
        "the scan finds an unwiped copy"
    );
    let found = kept_copies(
        || drop(std::hint::black_box(String::from("kluis_Canarymarkerzq"))),
        |_| vec![(CANARY.into(), Zeroizing::new("kluis_Canarymarkerzq".into()))],
    );
    assert_eq!(
        found[0].1, 1,
        "a search of the kept blocks finds an unwiped copy"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut phases = runtime.block_on(values_phases()).to_vec();
    phases.extend(runtime.block_on(long_values_phases(phases.len())));
    MODE.store(0, Ordering::SeqCst);

    let hits = std::mem::take(&mut *HITS.lock().expect("hits"));
    let mut report = String::new();
    let mut seen = std::collections::BTreeSet::new();
    for h in &hits {
        if seen.insert((h.phase, h.label, h.form, h.frames.clone())) {
            report.push_str(&format!(
                "phase {}: {}{}: freed block of {} bytes, not wiped\n      {}\n",
                phases[h.phase], h.label, h.form, h.size, h.frames
            ));
        }
    }

    // Bearer tokens: made by `kluis init` and dev mode's first start, read from
    // keys/dev-tokens.toml at every dev start.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tokens = kept_copies(
        || kluis::policy::generate_token().expect("token"),
        |token| vec![("policy::generate_token".into(), token.clone())],
    );
    let dev_tokens = || {
        let text = std::fs::read_to_string(dir.path().join("keys/dev-tokens.toml"))
            .expect("dev tokens file");
        text.lines()
            .filter_map(|l| Some((l.split(" = ").next()?, l.split('"').nth(1)?)))
            .map(|(role, t)| (role.to_string(), Zeroizing::new(t.to_string())))
            .collect::<Vec<_>>()
    };
    let labelled = |start: &str,
                    tokens: Vec<(String, Zeroizing<String>)>|
     -> Vec<(String, Zeroizing<String>)> {
        assert_eq!(tokens.len(), 6, "a dev token for each default role");
        tokens
            .into_iter()
            .map(|(role, t)| (format!("{start}: token of {role}"), t))
            .collect()
    };
    tokens.extend(kept_copies(
        || kluis::config::dev(dir.path(), None, None).expect("first dev start"),
        |_| {
            labelled(
                "first dev start (writes and reads the tokens)",
                dev_tokens(),
            )
        },
    ));
    tokens.extend(kept_copies(
        || kluis::config::dev(dir.path(), None, None).expect("dev start"),
        |_| labelled("dev start (reads the tokens)", dev_tokens()),
    ));
    let init_dir = tempfile::tempdir().expect("tempdir");
    tokens.extend(kept_copies(
        || kluis::config::init(init_dir.path(), "127.0.0.1:50051").expect("init"),
        |out| {
            assert_eq!(out.tokens.len(), 6, "a token for each default role");
            out.tokens
                .iter()
                .map(|(name, _, t)| (format!("kluis init: token of {name}"), t.clone()))
                .collect()
        },
    ));
    for (label, n) in tokens.iter().filter(|(_, n)| *n > 0) {
        report.push_str(&format!("{label}: {n} freed, unwiped block(s)\n"));
    }

    assert!(
        report.is_empty(),
        "plaintext or tokens left in freed heap memory:\n{report}"
    );
}

/// Every vault operation that handles a planted value, one phase after another. Returns the
/// phases' names.
async fn values_phases() -> [&'static str; 11] {
    let phases = [
        "0 setup",
        "1 CreateRecord (email, phone, postcode, date of birth, full_name)",
        "2 UpdateRecord (bsn, iban, wage)",
        "3 UpdateRecord (absence periods)",
        "4 GetRecord, in full and as privacy_officer (bsn, iban masked)",
        "5 FindRecords (bsn, e-mail as sent)",
        "6 SetRestriction with a reason",
        "7 SetLegalHold with a reason",
        "8 ExportRecord",
        "9 proto messages carrying values, dropped (a refused request, an answer sent)",
        "10 done",
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
    let policy = Arc::new(Policy::default_policy());
    let keys = Arc::new(KeyRing::open(&store, &master).await.expect("keys"));
    let vault = Vault::new(store, Arc::new(Schema::default_schema()), keys)
        .with_policy(Arc::clone(&policy));
    let who = |role: &str| Caller {
        principal: Arc::from(format!("t-{role}")),
        role: Arc::clone(policy.role(role).expect("role")),
    };
    let (recruiter, payroll, absence, officer) = (
        who("recruiter"),
        who("payroll"),
        who("absence"),
        who("privacy_officer"),
    );
    let ctx = audit::Context::new;

    MODE.store(SCAN, Ordering::SeqCst);
    PHASE.store(1, Ordering::SeqCst);
    let (id, _) = vault
        .create(
            &recruiter,
            "recruitment",
            vec![
                text("email", "Kwadraat.Zqmarker+tag@Voorbeeld-Zq.NL"),
                text("phone", "+31 6 9876 1203"),
                text("postcode", " 9847qz"),
                text("date_of_birth", "1987-06-05"),
                text("full_name", "Zebulon Quaxmarker"),
            ],
            &mut ctx("CreateRecord"),
        )
        .await
        .expect("create");
    let id = id.to_string();

    PHASE.store(2, Ordering::SeqCst);
    let updated = vault
        .update(
            &payroll,
            &id,
            "payroll",
            Change {
                expected_revision: 0,
                set: vec![
                    text("bsn", "2738.913 52"),
                    text("iban", "nl59 zqxb 7305 9182 64"),
                    text("wage", "4321.77"),
                ],
                clear: vec![],
            },
            &mut ctx("UpdateRecord"),
        )
        .await
        .expect("update");

    PHASE.store(3, Ordering::SeqCst);
    vault
        .update(
            &absence,
            &id,
            "absence_management",
            Change {
                expected_revision: updated.revision,
                set: vec![text(
                    "absence_periods",
                    "2025-05-11/, 2025-03-02/2025-03-06",
                )],
                clear: vec![],
            },
            &mut ctx("UpdateRecord"),
        )
        .await
        .expect("update absence");

    PHASE.store(4, Ordering::SeqCst);
    let all = ["bsn", "iban", "wage"].map(String::from);
    drop(
        vault
            .get(&payroll, &id, "payroll", &all)
            .await
            .expect("get"),
    );
    let contact = ["email", "phone", "postcode", "date_of_birth", "full_name"].map(String::from);
    drop(
        vault
            .get(&recruiter, &id, "recruitment", &contact)
            .await
            .expect("get contact"),
    );
    let read = vault
        .get(
            &officer,
            &id,
            "data_subject_request",
            &["bsn".into(), "iban".into()],
        )
        .await
        .expect("get masked");
    assert_eq!(
        read.masked.len(),
        2,
        "bsn and iban are masked for the officer"
    );
    drop(read);

    PHASE.store(5, Ordering::SeqCst);
    let found = vault
        .find(&payroll, "payroll", "bsn", "273891352")
        .await
        .expect("find bsn");
    assert_eq!(found.len(), 1);
    let found = vault
        .find(
            &recruiter,
            "recruitment",
            "email",
            "Kwadraat.Zqmarker+tag@Voorbeeld-Zq.NL",
        )
        .await
        .expect("find email");
    assert_eq!(found.len(), 1);

    PHASE.store(6, Ordering::SeqCst);
    vault
        .set_state(
            &officer,
            &id,
            StateChange::Restriction {
                restricted: true,
                reason: String::from("Reasonmarkerzq Jansen").into(),
            },
            &mut ctx("SetRestriction"),
        )
        .await
        .expect("restrict");

    PHASE.store(7, Ordering::SeqCst);
    vault
        .set_state(
            &officer,
            &id,
            StateChange::LegalHold {
                hold: true,
                reason: String::from("Holdmarkerzq case 117").into(),
            },
            &mut ctx("SetLegalHold"),
        )
        .await
        .expect("hold");

    PHASE.store(8, Ordering::SeqCst);
    let doc = vault
        .export(&officer, &id, &mut ctx("ExportRecord"))
        .await
        .expect("export");
    assert!(doc.contains("Holdmarkerzq case 117") && doc.contains("2025-03-02/2025-03-06"));
    drop(doc);

    PHASE.store(9, Ordering::SeqCst);
    {
        use kluis::proto::{field_value::Kind, FieldValue};
        let value = |kind| FieldValue {
            kind: Some(kind),
            content_type: String::new(),
        };
        let answer = kluis::proto::GetRecordResponse {
            fields: [
                (
                    "full_name".to_string(),
                    value(Kind::Text("Zebulon Quaxmarker".into())),
                ),
                ("wage".to_string(), value(Kind::Blob(b"4321.77".to_vec()))),
            ]
            .into(),
            ..Default::default()
        };
        drop(answer);
        drop(kluis::proto::ExportRecordResponse {
            json: "{\"bsn\": \"273891352\"}".into(),
        });
        drop(kluis::proto::FindRecordsRequest {
            purpose: String::new(),
            field_name: String::new(),
            value: "NL59ZQXB7305918264".into(),
        });
    }

    PHASE.store(10, Ordering::SeqCst);
    MODE.store(0, Ordering::SeqCst);
    phases
}

/// A restriction's or legal hold's reason (sealed at rest) is not shown by `Debug`.
#[test]
fn state_change_debug_does_not_show_the_reason() {
    // Not a planted marker: this test may run while the other one scans.
    for change in [
        StateChange::Restriction {
            restricted: true,
            reason: String::from("Debugmarkerzq lawsuit").into(),
        },
        StateChange::LegalHold {
            hold: true,
            reason: String::from("Debugmarkerzq lawsuit").into(),
        },
    ] {
        let shown = format!("{change:?}");
        assert!(
            !shown.contains("Debugmarkerzq"),
            "Debug shows the reason: {shown}"
        );
        assert!(shown.contains("reason: <redacted>"), "{shown}");
    }
}

/// The vault's and the service's handling of long values, sealed detached, and of requests
/// refused after their values were parsed (review 29), as phases numbered from `first`.
/// Returns the phases' names.
async fn long_values_phases(first: usize) -> [&'static str; 12] {
    let phases = [
        "0 setup (long values)",
        "1 create: 40 KB blob + 600-byte text (detached)",
        "2 get (detached read)",
        "3 update: replace blob and text (detached)",
        "4 create refused after parsing (last field invalid)",
        "5 update refused after parsing (stale revision)",
        "6 update refused after parsing (legal hold / erasure state)",
        "7 export (blob base64)",
        "8 service CreateRecord ok + GetRecord",
        "9 service CreateRecord refused by shape (to_values)",
        "10 service UpdateRecord refused after parsing (stale revision)",
        "11 done",
    ];
    use kluis::proto::records_server::Records;
    use kluis::proto::{field_value::Kind, FieldValue};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
    let mut policy = Policy::default_policy();
    policy
        .add_token_hash(
            "t-rec",
            "recruiter",
            kluis::policy::token_hash("tok-recruiter"),
        )
        .expect("token");
    let policy = Arc::new(policy);
    let keys = Arc::new(KeyRing::open(&store, &master).await.expect("keys"));
    let vault = Arc::new(
        Vault::new(store, Arc::new(Schema::default_schema()), keys)
            .with_policy(Arc::clone(&policy)),
    );
    let service = kluis::service::RecordsService::new(
        Arc::clone(&vault),
        kluis::service::Authenticator::new(Arc::clone(&policy)),
        160 << 20,
        kluis::service::answer::AnswerBudget::for_requests(80 << 20),
    );
    let who = |role: &str| Caller {
        principal: Arc::from(format!("t-{role}")),
        role: Arc::clone(policy.role(role).expect("role")),
    };
    let (recruiter, officer) = (who("recruiter"), who("privacy_officer"));
    let ctx = audit::Context::new;

    MODE.store(SCAN, Ordering::SeqCst);
    PHASE.store(first + 1, Ordering::SeqCst);
    let (id, _) = vault
        .create(
            &recruiter,
            "recruitment",
            vec![
                blob("cv_document", "Blobmarkerzq", 40_000),
                ltext("education", "Textmarkerzq", 600),
                text("full_name", "Plain Name"),
            ],
            &mut ctx("CreateRecord"),
        )
        .await
        .expect("create");
    let id = id.to_string();

    PHASE.store(first + 2, Ordering::SeqCst);
    drop(
        vault
            .get(&recruiter, &id, "recruitment", &[])
            .await
            .expect("get"),
    );

    PHASE.store(first + 3, Ordering::SeqCst);
    vault
        .update(
            &recruiter,
            &id,
            "recruitment",
            Change {
                expected_revision: 0,
                set: vec![
                    blob("cv_document", "Blobmarkerzq", 50_000),
                    ltext("education", "Textmarkerzq", 900),
                ],
                clear: vec![],
            },
            &mut ctx("UpdateRecord"),
        )
        .await
        .expect("update");
    drop(
        vault
            .get(&recruiter, &id, "recruitment", &[])
            .await
            .expect("get"),
    );

    PHASE.store(first + 4, Ordering::SeqCst);
    let refused = vault
        .create(
            &recruiter,
            "recruitment",
            vec![
                blob("cv_document", "Refblobmarkq", 40_000),
                ltext("education", "Reftextmarkq", 600),
                text("date_of_birth", "2999-01-01"),
            ],
            &mut ctx("CreateRecord"),
        )
        .await;
    assert!(refused.is_err());

    // The long values of an update that is refused after they were parsed.
    let refused_change = |expected_revision| Change {
        expected_revision,
        set: vec![
            blob("cv_document", "Refblobmarkq", 40_000),
            ltext("education", "Reftextmarkq", 600),
        ],
        clear: vec![],
    };
    PHASE.store(first + 5, Ordering::SeqCst);
    let refused = vault
        .update(
            &recruiter,
            &id,
            "recruitment",
            refused_change(1),
            &mut ctx("UpdateRecord"),
        )
        .await;
    assert!(refused.is_err(), "stale");

    MODE.store(0, Ordering::SeqCst);
    vault
        .set_state(
            &officer,
            &id,
            kluis::vault::StateChange::LegalHold {
                hold: true,
                reason: String::from("some case").into(),
            },
            &mut ctx("SetLegalHold"),
        )
        .await
        .expect("hold");
    vault
        .set_state(
            &officer,
            &id,
            kluis::vault::StateChange::Restriction {
                restricted: true,
                reason: String::from("some reason").into(),
            },
            &mut ctx("SetRestriction"),
        )
        .await
        .expect("restrict");
    MODE.store(SCAN, Ordering::SeqCst);
    PHASE.store(first + 6, Ordering::SeqCst);
    let refused = vault
        .update(
            &recruiter,
            &id,
            "recruitment",
            refused_change(0),
            &mut ctx("UpdateRecord"),
        )
        .await;
    assert!(refused.is_err(), "restricted");

    PHASE.store(first + 7, Ordering::SeqCst);
    let doc = vault
        .export(&officer, &id, &mut ctx("ExportRecord"))
        .await
        .expect("export");
    assert!(doc.contains("QmxvYm1hcmtlcnpx"));
    drop(doc);

    PHASE.store(first + 8, Ordering::SeqCst);
    let req = |fields: Vec<(&str, FieldValue)>| {
        let mut r = tonic::Request::new(kluis::proto::CreateRecordRequest {
            purpose: "recruitment".into(),
            fields: fields
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
        });
        r.metadata_mut().insert(
            "authorization",
            "Bearer tok-recruiter".parse().expect("meta"),
        );
        r
    };
    let fv_blob = |unit: &str, len: usize| FieldValue {
        kind: Some(Kind::Blob(std::mem::take(&mut *long(unit, len)))),
        content_type: "text/plain".into(),
    };
    let fv_text = |unit: &str, len: usize| FieldValue {
        kind: Some(Kind::Text(std::mem::take(&mut *long_text(unit, len)))),
        content_type: String::new(),
    };
    let created = service
        .create_record(req(vec![
            ("cv_document", fv_blob("Svcblobmarkq", 40_000)),
            ("education", fv_text("Svctextmarkq", 600)),
        ]))
        .await
        .expect("service create")
        .into_inner();
    let mut g = tonic::Request::new(kluis::proto::GetRecordRequest {
        record_id: created.record_id.clone(),
        purpose: "recruitment".into(),
        field_names: vec![],
    });
    g.metadata_mut().insert(
        "authorization",
        "Bearer tok-recruiter".parse().expect("meta"),
    );
    drop(service.get_record(g).await.expect("service get"));

    PHASE.store(first + 9, Ordering::SeqCst);
    let shaped = service
        .create_record(req(vec![
            ("cv_document", fv_blob("Svcblobmarkq", 40_000)),
            ("education", fv_text("Svctextmarkq", 600)),
            (
                "full_name",
                FieldValue {
                    kind: Some(Kind::Text("x".into())),
                    content_type: "text/plain".into(),
                },
            ),
        ]))
        .await;
    assert!(shaped.is_err());

    PHASE.store(first + 10, Ordering::SeqCst);
    let mut u = tonic::Request::new(kluis::proto::UpdateRecordRequest {
        record_id: created.record_id.clone(),
        purpose: "recruitment".into(),
        expected_revision: 7,
        set: [
            ("cv_document".to_string(), fv_blob("Svcblobmarkq", 40_000)),
            ("education".to_string(), fv_text("Svctextmarkq", 600)),
        ]
        .into(),
        clear: vec![],
    });
    u.metadata_mut().insert(
        "authorization",
        "Bearer tok-recruiter".parse().expect("meta"),
    );
    assert!(service.update_record(u).await.is_err());

    PHASE.store(first + 11, Ordering::SeqCst);
    MODE.store(0, Ordering::SeqCst);
    phases
}

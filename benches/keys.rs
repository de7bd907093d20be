//! Key-job benchmark (issue 4): how fast the persisted key jobs of `kluis::rotation` run on a
//! real vault (`kluis::server::open_vault`: `SledStore`, default group commit, auditing on as
//! in production), without gRPC.
//!
//! 1. **Rewrap**: a vault with `KLUIS_BENCH_RECORDS` (default 100 000) records, each with
//!    `full_name`, `email` (contact), `bsn` (identity) and `iban` (financial), so 3 data keys
//!    per record. Every category's KEK is rotated (`KeyRing::rotate`), then a rewrap job of
//!    every category (`Jobs::start(JobKind::Rewrap, None, …)`) is timed from `start()` until
//!    its progress says `finished`. Reported: records/s, data keys rewrapped/s, and the time of
//!    `rotation::version_counts` (what `GetKeyStatus` does) over all records.
//! 2. **Re-key**: another vault with `KLUIS_BENCH_BLOB_RECORDS` (default 1024) records holding
//!    a `cv_document` of `KLUIS_BENCH_BLOB_KIB` KiB (default 256; 256 MiB in all). A re-key job
//!    of category `cv` is timed the same way; its rate is field plaintext re-encrypted per
//!    second. In the same run, before and after the job, raw AES-256-GCM in `ring`
//!    (`LessSafeKey::seal_in_place_separate_tag`, one thread, the same total bytes in 16 KiB
//!    chunks = `record::CHUNK_LEN`, an AAD as long as the vault's chunk AAD) is measured, seal
//!    alone and seal + open; the ratios use the faster of the two raw measurements. Also the
//!    disk's sequential write + `fdatasync` rate for the same bytes (the I/O ceiling).
//! 3. Where the time goes: after each job, its parts are re-run in isolation on the same data
//!    (scan, header MAC check, DEK unwrap/wrap, header sealing, event encoding; for re-key the
//!    chunk reads, opening and sealing), and, for rewrap, the store's share is replayed on a
//!    scratch store (batches of the job's shape: per record the header expected unchanged and
//!    rewritten, the KEK-presence expectations and one audit event).
//! 4. What changes to the rewrap would give, measured rather than estimated: the job's page
//!    loop (scan, open, unwrap, re-wrap, seal, event, commit; real crypto) re-run on scratch
//!    stores seeded with the same headers, as the job does it (A), with the KEK-presence
//!    expectations once per page instead of per record and category (B), pipelined with one
//!    commit in flight (C), and with one audit event per page instead of per record (D).
//!
//! Targets: rewrap ≥ 50 000 records/s; re-key ≥ 0.5 × raw AES-GCM seal.
//!
//! Run with `cargo bench --bench keys`. Without `--bench` on the command line (e.g. under
//! `cargo test --benches`) it runs a smoke pass with small counts whose figures mean nothing.
//!
//! Environment: `KLUIS_BENCH_RECORDS`, `KLUIS_BENCH_BLOB_RECORDS`, `KLUIS_BENCH_BLOB_KIB`,
//! `KLUIS_BENCH_IN_FLIGHT` (concurrent creates while filling, default 64),
//! `KLUIS_BENCH_ONLY` (`rewrap` or `rekey`), `KLUIS_BENCH_PERF_CTL` / `KLUIS_BENCH_PERF_ACK`
//! (control and ack FIFOs of `perf record --control=fifo:CTL,ACK -D -1`: profiling is enabled
//! only while a job runs).

mod common;

/// The allocator of the `kluis` binary (src/main.rs), so that the figures are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use common::{machine_busy, process_cpu};

use std::error::Error;
use std::hint::black_box;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kluis::audit;
use kluis::config::ephemeral;
use kluis::crypto::{OpeningKey, SealingKey, SecretKey, HEADER_LEN};
use kluis::keys::{kek_meta_key, MasterKey};
use kluis::policy::{token_hash, Caller, Policy};
use kluis::record::{self, DekHeader, FieldDigest, RecordBody, StoredDek, CHUNK_LEN};
use kluis::rotation::{self, JobKind, Jobs, JOB_PAGE};
use kluis::schema::Category;
use kluis::store::{Batch, Entries, Expect, Keyspace, SledStore, Store};
use kluis::vault::{Value, Vault};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use zeroize::Zeroizing;

type BoxError = Box<dyn Error + Send + Sync>;

/// Bearer token of the benchmark principal (never sent anywhere; it only resolves the caller).
const TOKEN: &str = "kluis_keys-bench-token-not-a-secret-0123456789abcdef";
const PURPOSE: &str = "recruitment";
const PRINCIPAL: &str = "bench";
const ROLE: &str = "bench_writer";
const BLOB_FIELD: &str = "cv_document";
const BLOB_TYPE: &str = "application/pdf";
const IBAN: &str = "NL91ABNA0417164300";
/// Targets of issue 4.
const REWRAP_TARGET: f64 = 50_000.0;
const REKEY_TARGET: f64 = 0.5;

/// The default policy has no role that writes contact, identity and financial together, so
/// the benchmark uses its own role (write rights only matter for filling the vault).
fn bench_policy() -> Result<Policy, BoxError> {
    let toml = format!(
        r#"
[purposes.{PURPOSE}]
legal_basis = "contract"

[roles.{ROLE}]
read = []
write = ["contact", "identity", "financial", "cv"]
purposes = ["{PURPOSE}"]

[[principals]]
name = "{PRINCIPAL}"
role = "{ROLE}"
token_sha256 = "{}"
"#,
        hex::encode(token_hash(TOKEN))
    );
    Ok(Policy::from_toml(&toml)?)
}

// ---------------------------------------------------------------------------------------------
// Configuration.

struct Config {
    records: usize,
    blob_records: usize,
    blob_bytes: usize,
    in_flight: usize,
    rewrap: bool,
    rekey: bool,
    bench_mode: bool,
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Result<Option<T>, BoxError> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}={v} is not a valid value").into()),
        Err(_) => Ok(None),
    }
}

fn config() -> Result<Config, BoxError> {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let (records, blobs) = if bench_mode {
        (100_000, 1024)
    } else {
        (2_000, 16)
    };
    let only = std::env::var("KLUIS_BENCH_ONLY").unwrap_or_default();
    if !only.is_empty() && only != "rewrap" && only != "rekey" {
        return Err("KLUIS_BENCH_ONLY must be `rewrap` or `rekey`".into());
    }
    Ok(Config {
        records: env_parse("KLUIS_BENCH_RECORDS")?.unwrap_or(records).max(1),
        blob_records: env_parse("KLUIS_BENCH_BLOB_RECORDS")?
            .unwrap_or(blobs)
            .max(1),
        blob_bytes: env_parse::<usize>("KLUIS_BENCH_BLOB_KIB")?
            .unwrap_or(256)
            .max(1)
            * 1024,
        in_flight: env_parse("KLUIS_BENCH_IN_FLIGHT")?.unwrap_or(64).max(1),
        rewrap: only != "rekey",
        rekey: only != "rewrap",
        bench_mode,
    })
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

/// Writes `command` to the perf control FIFO (if configured) and waits for perf's ack.
fn perf_control(command: &str) {
    let Ok(ctl) = std::env::var("KLUIS_BENCH_PERF_CTL") else {
        return;
    };
    match std::fs::OpenOptions::new().write(true).open(&ctl) {
        Ok(mut f) => {
            let _ = writeln!(f, "{command}");
        }
        Err(e) => {
            eprintln!("perf control {ctl}: {e}");
            return;
        }
    }
    if let Ok(ack) = std::env::var("KLUIS_BENCH_PERF_ACK") {
        if let Ok(f) = std::fs::File::open(ack) {
            let mut line = String::new();
            let _ = std::io::BufReader::new(f).read_line(&mut line);
        }
    }
}

/// CPU of this process and of the rest of the machine over a stretch of time.
struct CpuWindow {
    start: Instant,
    cpu: Option<Duration>,
    busy: Option<Duration>,
}

impl CpuWindow {
    fn start() -> Self {
        Self {
            start: Instant::now(),
            cpu: process_cpu(),
            busy: machine_busy(),
        }
    }

    /// (this process's cores, the rest of the machine's cores) since `start`.
    fn cores(&self) -> (f64, f64) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let per = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64() / secs,
            _ => f64::NAN,
        };
        let mine = per(self.cpu, process_cpu());
        let all = per(self.busy, machine_busy());
        (mine, (all - mine).max(0.0))
    }
}

fn mb(bytes: f64) -> f64 {
    bytes / 1e6
}

/// The `n`-th valid BSN (9 digits passing the 11-test) at or after seed `n`.
fn bsn(n: usize) -> String {
    let mut k = 10_000_000 + (n as u64 * 7) % 89_999_999;
    loop {
        let digits: Vec<u64> = format!("{k:08}")
            .bytes()
            .map(|b| u64::from(b - b'0'))
            .collect();
        let sum: u64 = digits
            .iter()
            .zip([9, 8, 7, 6, 5, 4, 3, 2])
            .map(|(d, w)| d * w)
            .sum();
        let check = sum % 11;
        if check < 10 {
            return format!("{k:08}{check}");
        }
        k += 1;
    }
}

/// Deterministic filler bytes (not compressible), different per record.
fn blob(seed: usize, len: usize) -> Vec<u8> {
    let mut x = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn text(s: &str) -> Value {
    Value::Text(Zeroizing::new(s.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Vaults and filling them.

struct BenchVault {
    vault: Arc<Vault<SledStore>>,
    caller: Caller,
}

async fn open_bench_vault(dir: &Path) -> Result<BenchVault, BoxError> {
    let master = MasterKey::from_secret(SecretKey::generate()?);
    let settings = ephemeral(&dir.join("data"), master, bench_policy()?);
    let caller = settings
        .policy
        .authenticate_token(TOKEN)
        .ok_or("the bench token does not resolve")?;
    let vault = kluis::server::open_vault(&settings).await?;
    if !vault.auditing() {
        return Err("the vault does not audit: not the production set-up".into());
    }
    Ok(BenchVault { vault, caller })
}

/// Creates `n` records, `in_flight` at a time (each create its own task); returns the time.
async fn fill(
    bv: &BenchVault,
    n: usize,
    in_flight: usize,
    make: impl Fn(usize) -> Vec<(String, Value)> + Send + Sync + 'static,
) -> Result<Duration, BoxError> {
    let make = Arc::new(make);
    let t0 = Instant::now();
    let mut results = futures::stream::iter(0..n)
        .map(|i| {
            let vault = Arc::clone(&bv.vault);
            let caller = bv.caller.clone();
            let make = Arc::clone(&make);
            tokio::spawn(async move {
                let mut event = audit::Context::new("CreateRecord");
                event.draft.principal = PRINCIPAL.into();
                event.draft.role = ROLE.into();
                event.draft.purpose = PURPOSE.into();
                vault.create(&caller, PURPOSE, make(i), &mut event).await
            })
        })
        .buffer_unordered(in_flight);
    while let Some(r) = results.next().await {
        r?.map_err(|e| format!("create failed: {e}"))?;
    }
    Ok(t0.elapsed())
}

fn person(i: usize) -> Vec<(String, Value)> {
    vec![
        ("full_name".into(), text("Johanna de Vries")),
        ("email".into(), text(&format!("cand-{i:07}@example.com"))),
        ("bsn".into(), text(&bsn(i))),
        ("iban".into(), text(IBAN)),
    ]
}

// ---------------------------------------------------------------------------------------------
// Running a job.

struct JobRun {
    /// `start()` call until it returned (initial count of records needing the job, job
    /// state committed).
    start_call: Duration,
    /// `start()` call until the progress said finished.
    total: Duration,
    /// `start()` call until the last page's progress (before the final count and commit),
    /// when it was observed separately from the end.
    pages_done: Option<Duration>,
    /// Records the job counted as needing it.
    records: u64,
    /// Progress updates seen.
    updates: usize,
    cores: f64,
    other: f64,
}

async fn run_job(
    jobs: &Jobs<SledStore>,
    kind: JobKind,
    scope: Option<Category>,
) -> Result<JobRun, BoxError> {
    perf_control("enable");
    let cpu = CpuWindow::start();
    let t0 = Instant::now();
    let mut rx = jobs.start(kind, scope, "bench", Vec::new()).await?;
    let start_call = t0.elapsed();
    let mut pages_done = None;
    let mut updates = 0;
    let records;
    loop {
        let p = rx.borrow_and_update().clone();
        updates += 1;
        if let Some(e) = p.error {
            perf_control("disable");
            return Err(format!("{} job failed: {e}", kind.as_str()).into());
        }
        if p.finished {
            records = p.total;
            break;
        }
        if p.done >= p.total && pages_done.is_none() {
            pages_done = Some(t0.elapsed());
        }
        if rx.changed().await.is_err() {
            let p = rx.borrow().clone();
            if p.finished {
                records = p.total;
                break;
            }
            perf_control("disable");
            return Err(format!("{} job ended without finishing: {p:?}", kind.as_str()).into());
        }
    }
    let total = t0.elapsed();
    let (cores, other) = cpu.cores();
    perf_control("disable");
    Ok(JobRun {
        start_call,
        total,
        pages_done,
        records,
        updates,
        cores,
        other,
    })
}

fn print_job(name: &str, run: &JobRun, pages: usize) {
    println!(
        "  {name}: {} records in {:.3} s (start() {:.3} s{}); {} progress updates; {:.2} cores, other {:.2}",
        run.records,
        run.total.as_secs_f64(),
        run.start_call.as_secs_f64(),
        match run.pages_done {
            Some(p) => format!(
                ", {pages} pages {:.3} s = {:.1} ms/page, final count + commit {:.3} s",
                (p - run.start_call).as_secs_f64(),
                (p - run.start_call).as_secs_f64() * 1e3 / pages.max(1) as f64,
                (run.total - p).as_secs_f64()
            ),
            None => String::new(),
        },
        run.updates,
        run.cores,
        run.other,
    );
}

// ---------------------------------------------------------------------------------------------
// Rewrap.

struct RewrapResult {
    records: usize,
    deks: u64,
    fill: Duration,
    run: JobRun,
    counts_before: Duration,
    counts_after: Duration,
}

impl RewrapResult {
    fn records_per_s(&self) -> f64 {
        self.records as f64 / self.run.total.as_secs_f64()
    }
}

async fn timed_counts(vault: &Arc<Vault<SledStore>>) -> Result<(Duration, u64), BoxError> {
    let t = Instant::now();
    let counts = rotation::version_counts(vault).await?;
    Ok((t.elapsed(), counts.values().sum()))
}

async fn rewrap(cfg: &Config) -> Result<RewrapResult, BoxError> {
    println!(
        "== rewrap: {} records (full_name, email, bsn, iban: 3 data keys each)",
        cfg.records
    );
    let dir = tempfile::tempdir()?;
    let bv = open_bench_vault(dir.path()).await?;
    let fill_time = fill(&bv, cfg.records, cfg.in_flight, person).await?;
    println!(
        "  filled in {:.2} s ({:.0} creates/s, {} in flight)",
        fill_time.as_secs_f64(),
        cfg.records as f64 / fill_time.as_secs_f64(),
        cfg.in_flight
    );
    let vault = Arc::clone(&bv.vault);
    let (counts_before, deks) = timed_counts(&vault).await?;
    println!(
        "  version_counts (GetKeyStatus): {:.3} s over {} records ({deks} data keys)",
        counts_before.as_secs_f64(),
        cfg.records
    );
    let made = vault
        .keys()
        .rotate(vault.store(), &Category::ALL, vec![])
        .await?;
    println!(
        "  rotated: {}",
        made.iter()
            .map(|(c, v)| format!("{c} v{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let jobs = Jobs::new(Arc::clone(&vault));
    let run = run_job(&jobs, JobKind::Rewrap, None).await?;
    print_job("rewrap job", &run, cfg.records.div_ceil(JOB_PAGE));
    if run.records != cfg.records as u64 {
        return Err(format!(
            "rewrap counted {} records needing it, expected {}",
            run.records, cfg.records
        )
        .into());
    }
    let (counts_after, _) = timed_counts(&vault).await?;
    let active = vault.keys().active_versions();
    let counts = rotation::version_counts(&vault).await?;
    if let Some(((c, v), n)) = counts.iter().find(|((c, v), _)| active.get(c) != Some(v)) {
        return Err(format!("after the rewrap {n} data keys of {c} are still under v{v}").into());
    }
    let result = RewrapResult {
        records: cfg.records,
        deks,
        fill: fill_time,
        run,
        counts_before,
        counts_after,
    };
    println!(
        "  rewrap: {:.0} records/s, {:.0} data keys/s (start() to finished); version_counts after: {:.3} s",
        result.records_per_s(),
        deks as f64 / result.run.total.as_secs_f64(),
        counts_after.as_secs_f64()
    );
    let pages = rewrap_breakdown(&vault, &result).await?;
    rewrap_models(&vault, &pages, &result).await?;
    jobs.stop().await;
    drop(jobs);
    drop(vault);
    drop(bv);
    Ok(result)
}

/// Re-runs the parts of a rewrap in isolation on the rewrapped vault and replays its store
/// writes on a scratch store.
async fn rewrap_breakdown(
    vault: &Vault<SledStore>,
    r: &RewrapResult,
) -> Result<Vec<Entries>, BoxError> {
    let store = vault.store();
    let keys = vault.keys();
    let n = r.records as f64;
    let mut parts: Vec<(&str, Duration)> = Vec::new();

    let t = Instant::now();
    let mut pages = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store
            .scan(Keyspace::Records, b"", after.as_deref(), JOB_PAGE)
            .await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        pages.push(page);
    }
    parts.push(("scan headers (sled range, JOB_PAGE at a time)", t.elapsed()));

    let (kv, ik) = keys.integrity_key();
    let t = Instant::now();
    // What the job opens: the data keys alone (`DekHeader`), not the whole body.
    let mut bodies = Vec::with_capacity(r.records);
    for (key, raw) in pages.iter().flatten() {
        bodies.push(DekHeader::open(key, raw, kv, ik).map_err(|_| "header does not open")?);
    }
    parts.push((
        "open headers (DekHeader: HMAC check, data keys)",
        t.elapsed(),
    ));

    // `needs` clones the active-version map once per record, and each header is read and
    // opened once more by the job's start count (a rewrap pass that met no conflict and no
    // rotation is not counted again at its end).
    let t = Instant::now();
    for _ in 0..r.records {
        black_box(keys.active_versions());
    }
    parts.push(("active_versions() per record", t.elapsed()));

    let t = Instant::now();
    let mut plain = Vec::with_capacity(r.deks as usize);
    for body in &bodies {
        for (name, dek) in &body.deks {
            let c = Category::parse(name).ok_or("unknown category")?;
            plain.push((
                c,
                keys.unwrap_dek(body.id, c, dek.kek_version, &dek.sealed)?,
            ));
        }
    }
    parts.push((
        "unwrap data keys (crypto::open, key schedule each)",
        t.elapsed(),
    ));

    let t = Instant::now();
    let mut i = 0;
    for body in &bodies {
        for _ in 0..body.deks.len() {
            let (c, dek) = &plain[i];
            black_box(keys.wrap_dek(body.id, *c, dek)?);
            i += 1;
        }
    }
    parts.push((
        "wrap data keys (crypto::seal: getrandom + key schedule)",
        t.elapsed(),
    ));
    drop(plain);

    let t = Instant::now();
    for body in &bodies {
        black_box(body.seal(kv, ik).map_err(|_| "header does not seal")?);
    }
    parts.push(("seal headers (DekHeader: data keys + HMAC)", t.elapsed()));

    let t = Instant::now();
    for (key, _) in pages.iter().flatten() {
        let mut draft = audit::Draft::new("RewrapRecord", rotation::JOB_PRINCIPAL, "system");
        draft.record_id = uuid::Uuid::from_slice(key)?.to_string();
        draft.outcome = "ok".into();
        black_box(draft.encode());
    }
    parts.push(("audit event drafts (uuid string + encode)", t.elapsed()));

    let cpu_sum: Duration = parts.iter().map(|(_, d)| *d).sum();
    let job = r.run.total;
    println!("  where the time goes (each part re-run alone, one thread, same records):");
    for (name, d) in &parts {
        println!(
            "    {name:<58} {:>8.3} s {:>6.2} µs/record {:>5.1} % of the job",
            d.as_secs_f64(),
            d.as_secs_f64() * 1e6 / n,
            d.as_secs_f64() * 100.0 / job.as_secs_f64()
        );
    }
    println!(
        "    {:<58} {:>8.3} s {:>6.2} µs/record {:>5.1} %  (the job scans and opens every header twice: start count, pass)",
        "sum of the job task's CPU parts above",
        cpu_sum.as_secs_f64(),
        cpu_sum.as_secs_f64() * 1e6 / n,
        cpu_sum.as_secs_f64() * 100.0 / job.as_secs_f64()
    );

    // Store share: the job's commits replayed on a scratch store with the same keys and
    // header values (one batch per page: per record 3 KEK expectations, the header expected
    // unchanged and rewritten, one event; the job state).
    let scratch_dir = tempfile::tempdir()?;
    let scratch = SledStore::open(scratch_dir.path())?;
    let active = keys.active_versions();
    let mut seed = Batch::default();
    for (&c, &v) in &active {
        seed.put(Keyspace::Meta, kek_meta_key(c, v), vec![0; 60]);
    }
    scratch.commit(seed).await?;
    for page in &pages {
        let mut b = Batch::default();
        for (key, raw) in page {
            b.put(Keyspace::Records, key.clone(), raw.clone());
        }
        scratch.commit(b).await?;
    }
    let job_state = vec![b'x'; 300];
    let cpu = CpuWindow::start();
    let t = Instant::now();
    let mut build = Duration::ZERO;
    for (page, chunk) in pages.iter().zip(bodies.chunks(JOB_PAGE)) {
        let tb = Instant::now();
        let mut b = Batch::default();
        for ((key, raw), body) in page.iter().zip(chunk) {
            for name in body.deks.keys() {
                let c = Category::parse(name).ok_or("unknown category")?;
                b.expect(Keyspace::Meta, kek_meta_key(c, active[&c]), Expect::Present);
            }
            b.expect(Keyspace::Records, key.clone(), Expect::Value(raw.clone()));
            b.put(Keyspace::Records, key.clone(), raw.clone());
            let mut draft = audit::Draft::new("RewrapRecord", rotation::JOB_PRINCIPAL, "system");
            draft.record_id = uuid::Uuid::from_slice(key)?.to_string();
            draft.outcome = "ok".into();
            b.append_event(draft.encode());
        }
        b.put(
            Keyspace::Meta,
            rotation::META_JOB.to_vec(),
            job_state.clone(),
        );
        build += tb.elapsed();
        scratch.commit(b).await?;
    }
    let replay = t.elapsed();
    let (cores, _) = cpu.cores();
    let commits = replay.saturating_sub(build);
    println!(
        "    {:<58} {:>8.3} s {:>6.2} µs/record {:>5.1} %  ({} commits, {:.2} cores; batch building {:.3} s of it)",
        "store: the job's commits replayed on a scratch store",
        replay.as_secs_f64(),
        replay.as_secs_f64() * 1e6 / n,
        replay.as_secs_f64() * 100.0 / job.as_secs_f64(),
        pages.len(),
        cores,
        build.as_secs_f64()
    );
    println!(
        "    {:<58} {:>8.3} s {:>6.2} µs/record  (commit alone: {:.2} µs/record, {:.1} ms/page)",
        "job total",
        job.as_secs_f64(),
        job.as_secs_f64() * 1e6 / n,
        commits.as_secs_f64() * 1e6 / n,
        commits.as_secs_f64() * 1e3 / pages.len().max(1) as f64
    );
    drop(scratch);
    Ok(pages)
}

/// A variant of the rewrap's page loop, run on a scratch store (see [`rewrap_models`]).
#[derive(Clone, Copy)]
struct Model {
    name: &'static str,
    /// The KEK-presence expectations once per page instead of once per record and category.
    kek_once: bool,
    /// Page N+1 is scanned and prepared while page N commits (one commit in flight).
    pipelined: bool,
    /// One audit event per page (naming its records) instead of one per record.
    event_per_page: bool,
}

/// A scratch store holding the given record headers and the active KEK keys.
async fn seed_scratch(
    pages: &[Entries],
    active: &std::collections::BTreeMap<Category, u32>,
) -> Result<(tempfile::TempDir, SledStore), BoxError> {
    let dir = tempfile::tempdir()?;
    let scratch = SledStore::open(dir.path())?;
    let mut seed = Batch::default();
    for (&c, &v) in active {
        seed.put(Keyspace::Meta, kek_meta_key(c, v), vec![0; 60]);
    }
    scratch.commit(seed).await?;
    for page in pages {
        let mut b = Batch::default();
        for (key, raw) in page {
            b.put(Keyspace::Records, key.clone(), raw.clone());
        }
        scratch.commit(b).await?;
    }
    Ok((dir, scratch))
}

/// Runs the rewrap's page loop as `rotation` does it (scan a page, open each header, unwrap
/// and re-wrap its data keys, seal the header, one event per record, commit), on a scratch
/// store seeded with the vault's headers, in the variant `m`. Returns the time and the cores.
async fn model_run(
    vault: &Vault<SledStore>,
    pages: &[Entries],
    m: Model,
) -> Result<(Duration, f64), BoxError> {
    let keys = vault.keys();
    let (_dir, scratch) = seed_scratch(pages, &keys.active_versions()).await?;
    let (kv, ik) = keys.integrity_key();
    let job_state = vec![b'x'; 300];
    let cpu = CpuWindow::start();
    let t = Instant::now();
    let mut after: Option<Vec<u8>> = None;
    let mut in_flight: Option<tokio::task::JoinHandle<Result<(), kluis::store::StoreError>>> = None;
    loop {
        let page = scratch
            .scan(Keyspace::Records, b"", after.as_deref(), JOB_PAGE)
            .await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        let mut b = Batch::default();
        let mut expected = std::collections::BTreeSet::new();
        let mut ids = Vec::new();
        for (key, raw) in &page {
            let mut body = DekHeader::open(key, raw, kv, ik).map_err(|_| "header does not open")?;
            black_box(keys.active_versions());
            let due: Vec<Category> = body
                .deks
                .keys()
                .filter_map(|n| Category::parse(n))
                .collect();
            for &c in &due {
                let stored = body.deks.get(c.as_str()).cloned().ok_or("no data key")?;
                let dek = keys.unwrap_dek(body.id, c, stored.kek_version, &stored.sealed)?;
                let w = keys.wrap_dek(body.id, c, &dek)?;
                body.deks.insert(
                    c.as_str().into(),
                    StoredDek {
                        kek_version: w.kek_version,
                        sealed: w.sealed,
                        created_ms: stored.created_ms,
                        dek_generation: stored.dek_generation,
                    },
                );
            }
            for &c in &due {
                let k = kek_meta_key(c, body.deks[c.as_str()].kek_version);
                if !m.kek_once || expected.insert(k.clone()) {
                    b.expect(Keyspace::Meta, k, Expect::Present);
                }
            }
            b.expect(Keyspace::Records, key.clone(), Expect::Value(raw.to_vec()));
            b.put(
                Keyspace::Records,
                key.clone(),
                body.seal(kv, ik).map_err(|_| "header does not seal")?,
            );
            let id = uuid::Uuid::from_slice(key)?.to_string();
            if m.event_per_page {
                ids.push(id);
            } else {
                let mut draft =
                    audit::Draft::new("RewrapRecord", rotation::JOB_PRINCIPAL, "system");
                draft.record_id = id;
                draft.outcome = "ok".into();
                b.append_event(draft.encode());
            }
        }
        if m.event_per_page {
            let mut draft = audit::Draft::new("RewrapPage", rotation::JOB_PRINCIPAL, "system");
            draft.field_names = ids;
            draft.outcome = "ok".into();
            b.append_event(draft.encode());
        }
        b.put(
            Keyspace::Meta,
            rotation::META_JOB.to_vec(),
            job_state.clone(),
        );
        if m.pipelined {
            if let Some(h) = in_flight.take() {
                h.await??;
            }
            let s = scratch.clone();
            in_flight = Some(tokio::spawn(async move { s.commit(b).await }));
        } else {
            scratch.commit(b).await?;
        }
    }
    if let Some(h) = in_flight {
        h.await??;
    }
    let elapsed = t.elapsed();
    Ok((elapsed, cpu.cores().0))
}

/// What the job's page loop would take with the changes this benchmark suggests, each
/// measured (not estimated) on a scratch store holding the same headers.
async fn rewrap_models(
    vault: &Vault<SledStore>,
    pages: &[Entries],
    r: &RewrapResult,
) -> Result<(), BoxError> {
    let models = [
        Model {
            name: "A as the job does it (serial)",
            kek_once: false,
            pipelined: false,
            event_per_page: false,
        },
        Model {
            name: "B = A, KEK expectations once per page",
            kek_once: true,
            pipelined: false,
            event_per_page: false,
        },
        Model {
            name: "C = B, pipelined (1 commit in flight)",
            kek_once: true,
            pipelined: true,
            event_per_page: false,
        },
        Model {
            name: "D = C, one audit event per page",
            kek_once: true,
            pipelined: true,
            event_per_page: true,
        },
    ];
    let n = r.records as f64;
    // The job's one counting scan (its start), as long as a `version_counts`.
    let counts = r.counts_before;
    let pages_time = match r.run.pages_done {
        Some(p) => p - r.run.start_call,
        None => r.run.total,
    };
    println!(
        "  the job's page loop re-run on a scratch store (same headers, real crypto), without the start's counting scan ({:.3} s here):",
        counts.as_secs_f64()
    );
    println!(
        "    {:<40} {:>8} {:>10} {:>6} {:>22}",
        "variant", "s", "records/s", "cores", "records/s incl. counts"
    );
    println!(
        "    {:<40} {:>8.3} {:>10.0} {:>6} {:>22.0}",
        "(the job's own pages, for comparison)",
        pages_time.as_secs_f64(),
        n / pages_time.as_secs_f64(),
        "",
        n / r.run.total.as_secs_f64()
    );
    for m in models {
        let (t, cores) = model_run(vault, pages, m).await?;
        println!(
            "    {:<40} {:>8.3} {:>10.0} {:>6.2} {:>22.0}",
            m.name,
            t.as_secs_f64(),
            n / t.as_secs_f64(),
            cores,
            n / (t + counts).as_secs_f64()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Raw AES-GCM baseline.

/// Raw ring rates in bytes/s over `total` bytes in CHUNK_LEN chunks: (seal, seal + open).
fn raw_aes(total: usize) -> Result<(f64, f64), BoxError> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[0x42; 32]).map_err(|_| "ring key")?);
    // The vault's chunk AAD: envelope header ‖ chunk context.
    let aad = vec![0x17u8; HEADER_LEN + record::chunk_context(&[0; 16], BLOB_FIELD, 0, 16).len()];
    let mut buf = blob(99, total);
    let nonce = |i: usize| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&(i as u64).to_be_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let t = Instant::now();
    for (i, chunk) in buf.chunks_mut(CHUNK_LEN).enumerate() {
        let tag = key
            .seal_in_place_separate_tag(nonce(i), Aad::from(&aad[..]), chunk)
            .map_err(|_| "seal")?;
        let _ = black_box(tag);
    }
    let seal = total as f64 / t.elapsed().as_secs_f64();
    let mut tags: Vec<Tag> = Vec::with_capacity(total / CHUNK_LEN + 1);
    let t = Instant::now();
    for (i, chunk) in buf.chunks_mut(CHUNK_LEN).enumerate() {
        let tag = key
            .seal_in_place_separate_tag(nonce(i), Aad::from(&aad[..]), chunk)
            .map_err(|_| "seal")?;
        let plain = key
            .open_in_place_separate_tag(nonce(i), Aad::from(&aad[..]), tag, chunk, 0..)
            .map_err(|_| "open")?;
        black_box(plain);
        tags.push(tag);
    }
    let seal_open = total as f64 / t.elapsed().as_secs_f64();
    black_box(tags);
    Ok((seal, seal_open))
}

/// Sequential durable write rate of the data directory's disk, in bytes/s: `total` bytes in
/// 1 MiB writes to a new file, then one `fdatasync` (the file is removed afterwards).
fn disk_rate(dir: &Path, total: usize) -> Result<f64, BoxError> {
    let path = dir.join("disk-rate.tmp");
    let block = blob(7, 1 << 20);
    let t = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    let mut left = total;
    while left > 0 {
        let n = left.min(block.len());
        f.write_all(&block[..n])?;
        left -= n;
    }
    f.sync_data()?;
    let rate = total as f64 / t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

// ---------------------------------------------------------------------------------------------
// Re-key.

struct RekeyResult {
    bytes: usize,
    fill: Duration,
    run: JobRun,
    /// Raw ring (seal, seal + open) in bytes/s, before and after the job.
    raw_before: (f64, f64),
    raw_after: (f64, f64),
    /// Sequential write + fdatasync of the same bytes on the data directory's disk, bytes/s.
    disk: f64,
}

impl RekeyResult {
    fn rate(&self) -> f64 {
        self.bytes as f64 / self.run.total.as_secs_f64()
    }
    fn raw_seal(&self) -> f64 {
        self.raw_before.0.max(self.raw_after.0)
    }
    fn raw_seal_open(&self) -> f64 {
        self.raw_before.1.max(self.raw_after.1)
    }
}

async fn rekey(cfg: &Config) -> Result<RekeyResult, BoxError> {
    let bytes = cfg.blob_records * cfg.blob_bytes;
    println!(
        "== re-key: {} records with a {} KiB {BLOB_FIELD} ({:.0} MB of field plaintext)",
        cfg.blob_records,
        cfg.blob_bytes / 1024,
        mb(bytes as f64)
    );
    let dir = tempfile::tempdir()?;
    let bv = open_bench_vault(dir.path()).await?;
    let len = cfg.blob_bytes;
    let fill_time = fill(&bv, cfg.blob_records, cfg.in_flight.min(16), move |i| {
        vec![(
            BLOB_FIELD.into(),
            Value::Blob {
                bytes: Zeroizing::new(blob(i, len)),
                content_type: BLOB_TYPE.into(),
            },
        )]
    })
    .await?;
    println!(
        "  filled in {:.2} s ({:.0} MB/s)",
        fill_time.as_secs_f64(),
        mb(bytes as f64) / fill_time.as_secs_f64()
    );
    let raw_before = raw_aes(bytes)?;
    println!(
        "  raw ring AES-256-GCM before: seal {:.0} MB/s, seal+open {:.0} MB/s",
        mb(raw_before.0),
        mb(raw_before.1)
    );
    let disk = disk_rate(dir.path(), bytes)?;
    println!(
        "  disk: {:.0} MB/s sequential write + fdatasync of the same bytes (re-key writes each byte twice: log and sled)",
        mb(disk)
    );
    let vault = Arc::clone(&bv.vault);
    let jobs = Jobs::new(Arc::clone(&vault));
    let run = run_job(&jobs, JobKind::Rekey, Some(Category::Cv)).await?;
    print_job("re-key job", &run, cfg.blob_records.div_ceil(JOB_PAGE));
    if run.records != cfg.blob_records as u64 {
        return Err(format!(
            "re-key counted {} records needing it, expected {}",
            run.records, cfg.blob_records
        )
        .into());
    }
    let raw_after = raw_aes(bytes)?;
    println!(
        "  raw ring AES-256-GCM after:  seal {:.0} MB/s, seal+open {:.0} MB/s",
        mb(raw_after.0),
        mb(raw_after.1)
    );
    let result = RekeyResult {
        bytes,
        fill: fill_time,
        run,
        raw_before,
        raw_after,
        disk,
    };
    println!(
        "  re-key: {:.0} MB/s of field plaintext; ratio to raw seal {:.3}, to raw seal+open {:.3}",
        mb(result.rate()),
        result.rate() / result.raw_seal(),
        result.rate() / result.raw_seal_open()
    );
    rekey_breakdown(&vault, &result).await?;
    jobs.stop().await;
    Ok(result)
}

/// Re-runs the data path of a re-key in isolation: chunk reads, opening (with the field
/// digest), sealing under a fresh key.
async fn rekey_breakdown(vault: &Vault<SledStore>, r: &RekeyResult) -> Result<(), BoxError> {
    let store = vault.store();
    let keys = vault.keys();
    let (kv, ik) = keys.integrity_key();
    let headers = store.scan(Keyspace::Records, b"", None, usize::MAX).await?;
    let mut read = Duration::ZERO;
    let mut open = Duration::ZERO;
    let mut seal = Duration::ZERO;
    let mut unwrap = Duration::ZERO;
    for (key, raw) in &headers {
        let body = RecordBody::open(key, raw, kv, ik).map_err(|_| "header does not open")?;
        let entry = body.fields.get(BLOB_FIELD).ok_or("no blob field")?;
        let stored = body.deks.get(Category::Cv.as_str()).ok_or("no cv key")?;
        let t = Instant::now();
        let dek = keys.unwrap_dek(&body.id, Category::Cv, stored.kek_version, &stored.sealed)?;
        let fresh = SecretKey::generate()?;
        unwrap += t.elapsed();
        let t = Instant::now();
        let mut chunks = Vec::with_capacity(entry.chunks as usize);
        for i in 0..entry.chunks {
            let k = record::chunk_key(&body.id, BLOB_FIELD, entry.revision, i);
            chunks.push(
                store
                    .get(Keyspace::Fields, &k)
                    .await?
                    .ok_or("chunk missing")?,
            );
        }
        let manifest = if entry.detached {
            let k = record::manifest_key(&body.id, BLOB_FIELD, entry.revision);
            store
                .get(Keyspace::Fields, &k)
                .await?
                .ok_or("manifest missing")?
        } else {
            Vec::new()
        };
        read += t.elapsed();
        let t = Instant::now();
        let opener = OpeningKey::new(&dek);
        let mut out = Zeroizing::new(Vec::with_capacity(entry.size as usize + 16));
        if entry.detached {
            black_box(record::manifest_digest(&manifest));
            for (i, chunk) in chunks.iter().enumerate() {
                let ctx = record::chunk_context(&body.id, BLOB_FIELD, i as u32, entry.chunks);
                opener.open_detached_append(&manifest, i, &ctx, chunk, &mut out)?;
            }
        } else {
            let mut digest = FieldDigest::new();
            for (i, sealed) in chunks.iter().enumerate() {
                digest.add(sealed)?;
                let ctx = record::chunk_context(&body.id, BLOB_FIELD, i as u32, entry.chunks);
                opener.open_append(&ctx, sealed, &mut out)?;
            }
            black_box(digest.finish());
        }
        open += t.elapsed();
        let t = Instant::now();
        black_box(record::seal_field(
            &SealingKey::new(&fresh, 1),
            &body.id,
            BLOB_FIELD,
            out,
        )?);
        seal += t.elapsed();
    }
    let job = r.run.total.as_secs_f64();
    let rate = |d: Duration| mb(r.bytes as f64) / d.as_secs_f64();
    println!("  where the time goes (each part re-run alone, one thread, same records):");
    for (name, d) in [
        ("read chunks (sled get per 16 KiB chunk)", read),
        (
            "open chunks + field digest (OpeningKey::open_detached_append)",
            open,
        ),
        ("seal under a fresh key (record::seal_field)", seal),
        ("unwrap old + generate new data key", unwrap),
    ] {
        println!(
            "    {name:<58} {:>8.3} s {:>7.0} MB/s {:>5.1} % of the job",
            d.as_secs_f64(),
            rate(d),
            d.as_secs_f64() * 100.0 / job
        );
    }
    let sum = read + open + seal + unwrap;
    println!(
        "    {:<58} {:>8.3} s {:>7.0} MB/s {:>5.1} %; the rest ({:.3} s) is the commit: sled transaction, log write + fdatasync of {:.0} MB",
        "sum",
        sum.as_secs_f64(),
        rate(sum),
        sum.as_secs_f64() * 100.0 / job,
        (job - sum.as_secs_f64()).max(0.0),
        mb(r.bytes as f64)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

async fn run() -> Result<(), BoxError> {
    let cfg = config()?;
    println!(
        "kluis key-job bench: {} runtime worker threads; SledStore, group commit, auditing on",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if !cfg.bench_mode {
        println!(
            "smoke pass (no --bench argument): not a measurement; run `cargo bench --bench keys`"
        );
    }
    let whole = CpuWindow::start();
    let rw = if cfg.rewrap {
        Some(rewrap(&cfg).await?)
    } else {
        None
    };
    let rk = if cfg.rekey {
        Some(rekey(&cfg).await?)
    } else {
        None
    };
    let (_, other) = whole.cores();

    println!();
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "figure", "value", "target", "verdict"
    );
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    if let Some(r) = &rw {
        let rate = r.records_per_s();
        println!(
            "{:<44} {:>14.0} {:>14} {:>8}",
            "rewrap records/s",
            rate,
            ">= 50000",
            verdict(rate >= REWRAP_TARGET)
        );
        println!(
            "{:<44} {:>14.0} {:>14} {:>8}",
            "rewrap data keys/s",
            r.deks as f64 / r.run.total.as_secs_f64(),
            "",
            ""
        );
        println!(
            "{:<44} {:>14.3} {:>14} {:>8}",
            "rewrap job seconds",
            r.run.total.as_secs_f64(),
            "",
            ""
        );
        println!(
            "{:<44} {:>14.3} {:>14} {:>8}",
            "version_counts seconds (before / after)",
            r.counts_before.as_secs_f64(),
            format!("{:.3}", r.counts_after.as_secs_f64()),
            ""
        );
        println!(
            "{:<44} {:>14.0} {:>14} {:>8}",
            "fill creates/s",
            r.records as f64 / r.fill.as_secs_f64(),
            "",
            ""
        );
    }
    if let Some(r) = &rk {
        let ratio = r.rate() / r.raw_seal();
        println!(
            "{:<44} {:>14.0} {:>14} {:>8}",
            "re-key MB/s",
            mb(r.rate()),
            "",
            ""
        );
        println!(
            "{:<44} {:>14.0} {:>14} {:>8}",
            "raw ring seal MB/s (best of before/after)",
            mb(r.raw_seal()),
            "",
            ""
        );
        println!(
            "{:<44} {:>14.0} {:>14} {:>8}",
            "raw ring seal+open MB/s (best)",
            mb(r.raw_seal_open()),
            "",
            ""
        );
        println!(
            "{:<44} {:>14.3} {:>14} {:>8}",
            "ratio re-key / raw seal",
            ratio,
            ">= 0.5",
            verdict(ratio >= REKEY_TARGET)
        );
        println!(
            "{:<44} {:>14.3} {:>14} {:>8}",
            "ratio re-key / raw seal+open",
            r.rate() / r.raw_seal_open(),
            "",
            ""
        );
        println!(
            "{:<44} {:>14.0} {:>14} {:>8}",
            "disk write + fdatasync MB/s",
            mb(r.disk),
            "",
            ""
        );
        println!(
            "{:<44} {:>14.3} {:>14} {:>8}",
            "ratio re-key / disk write",
            r.rate() / r.disk,
            "",
            ""
        );
        println!(
            "{:<44} {:>14.0} {:>14} {:>8}",
            "fill MB/s",
            mb(r.bytes as f64) / r.fill.as_secs_f64(),
            "",
            ""
        );
    }
    println!(
        "rest of the machine used {other:.2} cores during the run{}",
        if other > 0.25 { ": DISTURBED" } else { "" }
    );
    Ok(())
}

fn main() {
    // As the `kluis` binary does at start (src/main.rs).
    if let Err(e) = kluis::server::no_huge_pages() {
        eprintln!("keys bench: could not turn off transparent huge pages: {e}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keys bench: cannot build the tokio runtime: {e}");
            std::process::exit(2);
        }
    };
    let outcome = runtime.block_on(run());
    runtime.shutdown_timeout(Duration::from_secs(5));
    if let Err(e) = outcome {
        eprintln!("keys bench failed: {e}");
        std::process::exit(1);
    }
}

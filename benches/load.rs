//! End-to-end load benchmark over gRPC on loopback, in one process:
//!
//! - the real vault (`kluis::server::start`, group commit), on a temporary data directory;
//! - the same vault with auditing off (only the benchmark can turn it off), on a copy of
//!   that data directory taken before the rounds, so that both serve the same records;
//! - a second vault with `Durability::PerWrite` (every write runs its own sync + fdatasync,
//!   one after another): the durability baseline;
//! - a no-op `Records` service (no authentication, no crypto, no storage): the transport ceiling.
//!
//! Scenarios: (a) no-op GetRecord, (b) no-op CreateRecord, (c) vault CreateRecord (group
//! commit), (d) vault GetRecord (each read writes its audit event and waits for it to be
//! durable), (e) per-write-fsync vault CreateRecord, (f) GetRecord of the same records from
//! the unaudited vault. `ratio get audit-on/off` is (d) ÷ (f).
//!
//! The scenarios run in rounds (`KLUIS_LOAD_ROUNDS`, default 5): each round runs all six, one
//! after another, each with a warm-up and then a measured window, and the figures add up the
//! rounds. So every ratio compares scenarios measured within seconds of each other: the speed
//! of the shared VM this runs on drifts by a third over minutes, which, with one long window
//! per scenario, moved a ratio more than the code did. The per-round ratios are printed too.
//!
//! Load: `KLUIS_LOAD_CONCURRENCY` (default 32) client tasks, each sending requests back to
//! back, spread round-robin over `KLUIS_LOAD_CHANNELS` (default 4) HTTP/2 connections per
//! target. Window: `KLUIS_LOAD_SECS` seconds per scenario in all (default 5), split over the
//! rounds, each window after a 0.2 s warm-up. Before the rounds, creates run for 1.5 s to make
//! the records that (d) and (f) read. `KLUIS_LOAD_ONLY` (letters, e.g. `d`) runs only those
//! scenarios, to profile one of them; the ratios are then left out.
//!
//! Run with `cargo bench --bench load`. Without `--bench` on the command line (e.g. under
//! `cargo test --all-targets`) it runs a short smoke pass (one round of 0.2 s windows) instead.
//! Exits non-zero if any request fails.
//!
//! Columns: ops/s (requests started in the windows ÷ time to their last completions), p50/p99
//! latency, errors, requests, `cores` (this process's CPU time per second: clients and servers
//! together), `cpu µs/op`, and `other` (CPU used by the rest of the machine during the window,
//! from `/proc/stat`; a row with more than 0.25 is flagged as disturbed).

mod common;

/// The allocator of the `kluis` binary (src/main.rs), so that the figures are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use common::{machine_busy, process_cpu};

use std::collections::HashMap;
use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kluis::config::ephemeral;
use kluis::crypto::SecretKey;
use kluis::keys::MasterKey;
use kluis::policy::{token_hash, Policy};
use kluis::proto::field_value::Kind;
use kluis::proto::records_client::RecordsClient;
use kluis::proto::records_server::{Records, RecordsServer};
use kluis::proto::{
    CreateRecordRequest, CreateRecordResponse, FieldValue, FindRecordsRequest, FindRecordsResponse,
    GetRecordRequest, GetRecordResponse, ListRecordsRequest, ListRecordsResponse,
    UpdateRecordRequest, UpdateRecordResponse,
};
use kluis::server::Running;
use kluis::store::Durability;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

type BoxError = Box<dyn Error + Send + Sync>;

/// Bearer token of the benchmark principal (role `recruiter`).
const TOKEN: &str = "kluis_load-bench-token-not-a-secret-0123456789abcdef";
const PURPOSE: &str = "recruitment";
/// Warm-up of each scenario in each round.
const WARM_UP: Duration = Duration::from_millis(200);
/// How long creates run to make the records that (d) and (f) read.
const SEED_WINDOW: Duration = Duration::from_millis(1500);
/// Above this many cores used by other processes during a window, the row is flagged.
const OTHER_CORES_WARN: f64 = 0.25;
const NOOP_RECORD_ID: &str = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";

// ---------------------------------------------------------------------------------------------
// The no-op service: the transport ceiling.

/// Answers immediately: no authentication, no parsing, no crypto, no storage.
struct Noop;

fn text(value: &str) -> FieldValue {
    FieldValue {
        kind: Some(Kind::Text(value.to_string())),
        content_type: String::new(),
    }
}

#[tonic::async_trait]
impl Records for Noop {
    async fn create_record(
        &self,
        _request: Request<CreateRecordRequest>,
    ) -> Result<Response<CreateRecordResponse>, Status> {
        Ok(Response::new(CreateRecordResponse {
            record_id: NOOP_RECORD_ID.to_string(),
            revision: 1,
        }))
    }

    async fn get_record(
        &self,
        request: Request<GetRecordRequest>,
    ) -> Result<Response<GetRecordResponse>, Status> {
        // The same shape as the vault's answer to scenario (d): the four contact fields.
        let fields = HashMap::from([
            ("full_name".to_string(), text("Johanna de Vries")),
            ("email".to_string(), text("bench-c-00-0000000@example.com")),
            ("phone".to_string(), text("+31612345678")),
            ("city".to_string(), text("Zwolle")),
        ]);
        Ok(Response::new(GetRecordResponse {
            record_id: request.into_inner().record_id,
            revision: 1,
            fields,
            withheld: Vec::new(),
        }))
    }

    async fn update_record(
        &self,
        _request: Request<UpdateRecordRequest>,
    ) -> Result<Response<UpdateRecordResponse>, Status> {
        Err(Status::unimplemented("no-op benchmark service"))
    }

    async fn find_records(
        &self,
        _request: Request<FindRecordsRequest>,
    ) -> Result<Response<FindRecordsResponse>, Status> {
        Err(Status::unimplemented("no-op benchmark service"))
    }

    async fn list_records(
        &self,
        _request: Request<ListRecordsRequest>,
    ) -> Result<Response<ListRecordsResponse>, Status> {
        Err(Status::unimplemented("no-op benchmark service"))
    }

    async fn set_lifecycle(
        &self,
        _: Request<kluis::proto::SetLifecycleRequest>,
    ) -> Result<Response<kluis::proto::RecordMeta>, Status> {
        Err(Status::unimplemented("no-op benchmark service"))
    }

    async fn set_consent(
        &self,
        _: Request<kluis::proto::SetConsentRequest>,
    ) -> Result<Response<kluis::proto::RecordMeta>, Status> {
        Err(Status::unimplemented("no-op benchmark service"))
    }

    async fn set_restriction(
        &self,
        _: Request<kluis::proto::SetRestrictionRequest>,
    ) -> Result<Response<kluis::proto::RecordMeta>, Status> {
        Err(Status::unimplemented("no-op benchmark service"))
    }

    async fn erase_record(
        &self,
        _: Request<kluis::proto::EraseRecordRequest>,
    ) -> Result<Response<kluis::proto::EraseRecordResponse>, Status> {
        Err(Status::unimplemented("no-op benchmark service"))
    }

    async fn export_record(
        &self,
        _: Request<kluis::proto::ExportRecordRequest>,
    ) -> Result<Response<kluis::proto::ExportRecordResponse>, Status> {
        Err(Status::unimplemented("no-op benchmark service"))
    }

    async fn set_legal_hold(
        &self,
        _: Request<kluis::proto::SetLegalHoldRequest>,
    ) -> Result<Response<kluis::proto::RecordMeta>, Status> {
        Err(Status::unimplemented("no-op benchmark service"))
    }
}

struct NoopServer {
    addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    handle: JoinHandle<Result<(), tonic::transport::Error>>,
}

fn start_noop() -> Result<NoopServer, BoxError> {
    let incoming =
        TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?.with_nodelay(Some(true));
    let addr = incoming.local_addr()?;
    let (shutdown, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RecordsServer::new(Noop))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.await;
            }),
    );
    Ok(NoopServer {
        addr,
        shutdown,
        handle,
    })
}

// ---------------------------------------------------------------------------------------------
// Vaults.

/// Starts a vault over `<dir>/data` (keys in `<dir>/keys`) with master key `master`.
async fn start_vault(
    dir: &std::path::Path,
    master: &SecretKey,
    durability: Durability,
    audit: bool,
) -> Result<Running, BoxError> {
    let mut policy = Policy::default_policy();
    policy.add_token_hash("bench", "recruiter", token_hash(TOKEN))?;
    let master = MasterKey::from_secret(SecretKey::from_bytes(*master.expose_secret()));
    let mut settings = ephemeral(&dir.join("data"), master, policy);
    settings.durability = durability;
    settings.audit.enabled = audit;
    Ok(kluis::server::start(settings).await?)
}

// ---------------------------------------------------------------------------------------------
// Load generation.

#[derive(Clone)]
enum Op {
    /// GetRecord of the fixed id (no-op server).
    NoopGet,
    /// CreateRecord with the benchmark payload (no-op server).
    NoopCreate,
    /// CreateRecord with the benchmark payload; `tag` and `round` keep e-mail addresses
    /// unique.
    Create { tag: &'static str, round: usize },
    /// GetRecord of the given ids, round-robin.
    Get { ids: Arc<Vec<String>> },
}

fn create_request(tag: &str, round: usize, task: usize, seq: u64) -> CreateRecordRequest {
    let fields = HashMap::from([
        ("full_name".to_string(), text("Johanna de Vries")),
        (
            "email".to_string(),
            text(&format!(
                "bench-{tag}{round}-{task:02}-{seq:07}@example.com"
            )),
        ),
        ("phone".to_string(), text("+31612345678")),
        ("city".to_string(), text("Zwolle")),
    ]);
    CreateRecordRequest {
        purpose: PURPOSE.to_string(),
        fields,
    }
}

fn get_request(record_id: String) -> GetRecordRequest {
    GetRecordRequest {
        record_id,
        purpose: PURPOSE.to_string(),
        field_names: Vec::new(),
    }
}

fn with_auth<T>(message: T, auth: &MetadataValue<Ascii>) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", auth.clone());
    request
}

/// One request; returns the created record id for creates.
async fn call(
    client: &mut RecordsClient<Channel>,
    op: &Op,
    auth: &MetadataValue<Ascii>,
    task: usize,
    seq: u64,
    concurrency: usize,
) -> Result<Option<String>, Status> {
    match op {
        Op::NoopGet => {
            let r = client
                .get_record(with_auth(get_request(NOOP_RECORD_ID.to_string()), auth))
                .await?;
            check_get(&r.into_inner())?;
            Ok(None)
        }
        Op::NoopCreate => {
            client
                .create_record(with_auth(create_request("noop", 0, task, seq), auth))
                .await?;
            Ok(None)
        }
        Op::Create { tag, round } => {
            let r = client
                .create_record(with_auth(create_request(tag, *round, task, seq), auth))
                .await?;
            Ok(Some(r.into_inner().record_id))
        }
        Op::Get { ids } => {
            let n = u64::try_from(ids.len()).unwrap_or(u64::MAX);
            let k = (seq * concurrency as u64 + task as u64) % n.max(1);
            let id = ids[usize::try_from(k).unwrap_or(0)].clone();
            let r = client.get_record(with_auth(get_request(id), auth)).await?;
            check_get(&r.into_inner())?;
            Ok(None)
        }
    }
}

/// A GetRecord answer must carry the four fields (so a silently empty read is an error).
fn check_get(response: &GetRecordResponse) -> Result<(), Status> {
    if response.fields.len() == 4 && response.fields.contains_key("email") {
        Ok(())
    } else {
        Err(Status::internal(format!(
            "GetRecord returned {} fields, expected 4",
            response.fields.len()
        )))
    }
}

#[derive(Clone, Copy)]
struct LoadConfig {
    concurrency: usize,
    channels: usize,
    window: Duration,
    warm_up: Duration,
    /// Rounds of all six scenarios, one after another; each scenario runs `window` per round.
    rounds: usize,
    /// Run under `cargo bench` (`--bench`); otherwise a short smoke pass.
    bench_mode: bool,
    /// `KLUIS_LOAD_ONLY`: the letters of the scenarios to run (for profiling one of them);
    /// `None` runs all six and prints the ratios.
    only: Option<&'static str>,
}

struct TaskResult {
    latencies_ns: Vec<u64>,
    measured_started: u64,
    last_done: Option<Instant>,
    errors: u64,
    first_error: Option<String>,
    created: Vec<String>,
}

struct ScenarioResult {
    name: String,
    ops_per_s: f64,
    /// Seconds from the window's start to the last completion.
    elapsed_s: f64,
    /// Measured latencies, sorted.
    latencies_ns: Vec<u64>,
    /// Length of the measured window, seconds.
    window_s: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    requests: u64,
    first_error: Option<String>,
    created: Vec<String>,
    /// Process CPU time (all threads: clients and servers) per second of the window.
    cpu_cores: f64,
    /// CPU time of everything else on the machine per second of the window (other processes,
    /// steal): a disturbed measurement if well above zero.
    other_cores: f64,
}

async fn connect(addr: SocketAddr, channels: usize) -> Result<Vec<Channel>, BoxError> {
    let mut out = Vec::with_capacity(channels);
    for _ in 0..channels {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        out.push(channel);
    }
    Ok(out)
}

/// Nearest-rank percentile of sorted nanosecond latencies, in microseconds.
fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted_ns.len() as f64).ceil() as usize).clamp(1, sorted_ns.len());
    sorted_ns[rank - 1] as f64 / 1000.0
}

async fn run_scenario(
    name: &str,
    addr: SocketAddr,
    op: Op,
    cfg: LoadConfig,
) -> Result<ScenarioResult, BoxError> {
    let channels = connect(addr, cfg.channels).await?;
    let auth: MetadataValue<Ascii> = format!("Bearer {TOKEN}").parse()?;
    let start = Instant::now();
    let measure_from = start + cfg.warm_up;
    let measure_until = measure_from + cfg.window;
    let mut tasks = Vec::with_capacity(cfg.concurrency);
    for task in 0..cfg.concurrency {
        let mut client = RecordsClient::new(channels[task % channels.len()].clone())
            .max_decoding_message_size(usize::MAX);
        let op = op.clone();
        let auth = auth.clone();
        let concurrency = cfg.concurrency;
        tasks.push(tokio::spawn(async move {
            let mut result = TaskResult {
                latencies_ns: Vec::with_capacity(1 << 14),
                measured_started: 0,
                last_done: None,
                errors: 0,
                first_error: None,
                created: Vec::new(),
            };
            let mut seq = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= measure_until {
                    break;
                }
                let outcome = call(&mut client, &op, &auth, task, seq, concurrency).await;
                let t1 = Instant::now();
                seq += 1;
                let measured = t0 >= measure_from;
                match outcome {
                    Ok(created) => {
                        if let Some(id) = created {
                            result.created.push(id);
                        }
                        if measured {
                            result.measured_started += 1;
                            result
                                .latencies_ns
                                .push(u64::try_from((t1 - t0).as_nanos()).unwrap_or(u64::MAX));
                            result.last_done = Some(t1);
                        }
                    }
                    Err(status) => {
                        result.errors += 1;
                        if result.first_error.is_none() {
                            result.first_error =
                                Some(format!("{:?}: {}", status.code(), status.message()));
                        }
                        // Do not spin on a broken target.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            result
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let (cpu_start, busy_start) = (process_cpu(), machine_busy());
    tokio::time::sleep_until(measure_until.into()).await;
    let (cpu_end, busy_end) = (process_cpu(), machine_busy());
    let per_window = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64() / cfg.window.as_secs_f64(),
        _ => f64::NAN,
    };
    let cpu_cores = per_window(cpu_start, cpu_end);
    let other_cores = (per_window(busy_start, busy_end) - cpu_cores).max(0.0);
    let mut latencies = Vec::new();
    let mut requests = 0;
    let mut errors = 0;
    let mut first_error = None;
    let mut last_done = measure_from;
    let mut created = Vec::new();
    for t in tasks {
        let r = t.await?;
        latencies.extend_from_slice(&r.latencies_ns);
        requests += r.measured_started;
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
        if let Some(done) = r.last_done {
            last_done = last_done.max(done);
        }
        created.extend(r.created);
    }
    drop(channels);
    latencies.sort_unstable();
    // Requests started in the window, over the time from the window's start to the last
    // completion (which may run a little past the window's end).
    let elapsed = (last_done - measure_from).as_secs_f64().max(1e-9);
    let latencies_ns = latencies;
    Ok(ScenarioResult {
        name: name.to_string(),
        ops_per_s: requests as f64 / elapsed,
        elapsed_s: elapsed,
        window_s: cfg.window.as_secs_f64(),
        p50_us: percentile_us(&latencies_ns, 0.50),
        p99_us: percentile_us(&latencies_ns, 0.99),
        errors,
        requests,
        first_error,
        created,
        cpu_cores,
        other_cores,
        latencies_ns,
    })
}

impl ScenarioResult {
    /// Folds the next round of the same scenario into this one: ops/s over the summed
    /// windows, percentiles over all latencies, CPU per summed window.
    fn absorb(&mut self, next: ScenarioResult) {
        let requests = self.requests + next.requests;
        let elapsed = self.elapsed_s + next.elapsed_s;
        let window = self.window_s + next.window_s;
        self.cpu_cores = (self.cpu_cores * self.window_s + next.cpu_cores * next.window_s) / window;
        self.other_cores =
            (self.other_cores * self.window_s + next.other_cores * next.window_s) / window;
        self.requests = requests;
        self.elapsed_s = elapsed;
        self.window_s = window;
        self.ops_per_s = requests as f64 / elapsed;
        self.errors += next.errors;
        if self.first_error.is_none() {
            self.first_error = next.first_error;
        }
        self.created.extend(next.created);
        self.latencies_ns.extend(next.latencies_ns);
        self.latencies_ns.sort_unstable();
        self.p50_us = percentile_us(&self.latencies_ns, 0.50);
        self.p99_us = percentile_us(&self.latencies_ns, 0.99);
    }
}

fn print_header() {
    println!(
        "{:<38} {:>10} {:>9} {:>9} {:>7} {:>9} {:>6} {:>9} {:>6}",
        "scenario",
        "ops/s",
        "p50 µs",
        "p99 µs",
        "errors",
        "requests",
        "cores",
        "cpu µs/op",
        "other"
    );
}

fn print_row(r: &ScenarioResult) {
    println!(
        "{:<38} {:>10.1} {:>9.0} {:>9.0} {:>7} {:>9} {:>6.2} {:>9.0} {:>6.2}",
        r.name,
        r.ops_per_s,
        r.p50_us,
        r.p99_us,
        r.errors,
        r.requests,
        r.cpu_cores,
        r.cpu_cores * 1e6 / r.ops_per_s,
        r.other_cores
    );
    if r.other_cores > OTHER_CORES_WARN {
        println!(
            "    warning: the rest of the machine used {:.2} cores during this window: disturbed",
            r.other_cores
        );
    }
    if let Some(e) = &r.first_error {
        println!("    first error: {e}");
    }
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

fn load_config() -> Result<LoadConfig, BoxError> {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let default_secs = if bench_mode { 5.0 } else { 0.2 };
    let secs: f64 = env_parse("KLUIS_LOAD_SECS")?.unwrap_or(default_secs);
    if !(secs > 0.0 && secs.is_finite()) {
        return Err("KLUIS_LOAD_SECS must be a positive number of seconds".into());
    }
    let rounds: usize = env_parse("KLUIS_LOAD_ROUNDS")?
        .unwrap_or(if bench_mode { 5 } else { 1 })
        .max(1);
    let concurrency: usize = env_parse("KLUIS_LOAD_CONCURRENCY")?.unwrap_or(32).max(1);
    let channels: usize = env_parse("KLUIS_LOAD_CHANNELS")?
        .unwrap_or(4)
        .clamp(1, concurrency);
    let only = match std::env::var("KLUIS_LOAD_ONLY") {
        Ok(v) if v.chars().all(|c| ('a'..='f').contains(&c) || c == ',') && !v.is_empty() => {
            Some(&*v.leak())
        }
        Ok(v) => return Err(format!("KLUIS_LOAD_ONLY={v}: give scenario letters a-f").into()),
        Err(_) => None,
    };
    Ok(LoadConfig {
        concurrency,
        channels,
        window: Duration::from_secs_f64(secs / rounds as f64),
        warm_up: if bench_mode { WARM_UP } else { Duration::ZERO },
        rounds,
        bench_mode,
        only,
    })
}

/// Commits and durable syncs (`SledStore::flush_count`) during a create scenario, warm-ups
/// included.
fn flush_line(label: &str, flushes: u64, commits: usize) {
    if flushes == 0 {
        println!("    {label}: {commits} commits (this store does not count its syncs)");
    } else {
        let per = commits as f64 / flushes as f64;
        println!("    {label}: {commits} commits, {flushes} syncs ({per:.1} commits per sync)");
    }
}

/// Copies directory `from` into `to` (created), recursively, keeping file permissions.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::metadata(from)?.permissions())?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The four ratios of one round (or of the totals): get/noop, create/noop,
/// create/fsync-per-write, get audit-on/off.
fn ratios(r: &[ScenarioResult]) -> [f64; 4] {
    let ops = |i: usize| r[i].ops_per_s;
    [
        ops(3) / ops(0),
        ops(2) / ops(1),
        ops(2) / ops(4),
        ops(3) / ops(5),
    ]
}

async fn run() -> Result<(), BoxError> {
    let cfg = load_config()?;
    println!(
        "kluis load bench: {} client tasks over {} HTTP/2 connections per target, {} rounds of {:.2} s windows (each after a {:.2} s warm-up) per scenario, {} runtime worker threads",
        cfg.concurrency,
        cfg.channels,
        cfg.rounds,
        cfg.window.as_secs_f64(),
        cfg.warm_up.as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    if !cfg.bench_mode {
        println!(
            "smoke pass (no --bench argument): not a measurement; run `cargo bench --bench load`"
        );
    }
    let group_dir = tempfile::tempdir()?;
    let unaudited_dir = tempfile::tempdir()?;
    let per_write_dir = tempfile::tempdir()?;
    let master = SecretKey::generate()?;

    // The records that (d) and (f) read: created once, then the data directory is copied, so
    // that the audited vault and the unaudited one serve the same records side by side.
    let seeding = start_vault(group_dir.path(), &master, Durability::GroupCommit, true).await?;
    let seed_cfg = LoadConfig {
        window: SEED_WINDOW.min(cfg.window * 2),
        warm_up: Duration::ZERO,
        ..cfg
    };
    let seed = run_scenario(
        "seed",
        seeding.local_addr,
        Op::Create { tag: "s", round: 0 },
        seed_cfg,
    )
    .await?;
    if seed.errors > 0 || seed.created.is_empty() {
        return Err(format!(
            "seeding the records to read failed: {} errors, first: {:?}",
            seed.errors, seed.first_error
        )
        .into());
    }
    seeding.shutdown().await?;
    copy_dir(group_dir.path(), unaudited_dir.path())?;
    let ids = Arc::new(seed.created);

    let vault = start_vault(group_dir.path(), &master, Durability::GroupCommit, true).await?;
    let unaudited = start_vault(
        unaudited_dir.path(),
        &master,
        Durability::GroupCommit,
        false,
    )
    .await?;
    let per_write = start_vault(per_write_dir.path(), &master, Durability::PerWrite, true).await?;
    let noop = start_noop()?;
    println!(
        "noop {}, vault (group commit) {} on {}, vault (per-write fsync) {} on {}, vault (audit off) {} on {}; {} records to read",
        noop.addr,
        vault.local_addr,
        group_dir.path().display(),
        per_write.local_addr,
        per_write_dir.path().display(),
        unaudited.local_addr,
        unaudited_dir.path().display(),
        ids.len(),
    );
    println!();

    let get = || Op::Get {
        ids: Arc::clone(&ids),
    };
    let scenarios: [(&str, SocketAddr, Op); 6] = [
        ("(a) noop GetRecord", noop.addr, Op::NoopGet),
        ("(b) noop CreateRecord", noop.addr, Op::NoopCreate),
        (
            "(c) vault CreateRecord (group commit)",
            vault.local_addr,
            Op::Create { tag: "c", round: 0 },
        ),
        ("(d) vault GetRecord", vault.local_addr, get()),
        (
            "(e) vault CreateRecord (fsync/write)",
            per_write.local_addr,
            Op::Create { tag: "e", round: 0 },
        ),
        (
            "(f) vault GetRecord, audit off",
            unaudited.local_addr,
            get(),
        ),
    ];
    let mut totals: Vec<ScenarioResult> = Vec::new();
    let mut per_round: Vec<[f64; 4]> = Vec::new();
    let (mut group_flushes, mut per_write_flushes) = (0, 0);
    // Ratios need all six scenarios (`KLUIS_LOAD_ONLY` may leave some out).
    let ratios_run = cfg.only.is_none();
    for round in 0..cfg.rounds {
        let mut this_round = Vec::new();
        for (i, (name, addr, op)) in scenarios.iter().enumerate() {
            let letter = char::from(b'a' + i as u8);
            if cfg.only.is_some_and(|only| !only.contains(letter)) {
                continue;
            }
            let store = match i {
                2 => Some(vault.vault.store()),
                4 => Some(per_write.vault.store()),
                _ => None,
            };
            let before = store.map(|s| s.flush_count());
            // Each round creates new records: the round number keeps e-mail addresses
            // distinct.
            let op = match op {
                Op::Create { tag, .. } => Op::Create { tag, round },
                other => other.clone(),
            };
            let r = run_scenario(name, *addr, op, cfg).await?;
            if let (Some(store), Some(before)) = (store, before) {
                let flushes = store.flush_count() - before;
                if i == 2 {
                    group_flushes += flushes;
                } else {
                    per_write_flushes += flushes;
                }
            }
            if r.errors > 0 {
                print_row(&r);
                return Err(format!("{}: {} requests failed", r.name, r.errors).into());
            }
            this_round.push(r);
        }
        if ratios_run {
            per_round.push(ratios(&this_round));
        }
        if totals.is_empty() {
            totals = this_round;
        } else {
            for (total, r) in totals.iter_mut().zip(this_round) {
                total.absorb(r);
            }
        }
    }
    print_header();
    for r in &totals {
        print_row(r);
    }
    println!();
    if ratios_run {
        flush_line("(c) group commit", group_flushes, totals[2].created.len());
        flush_line("(e) per-write", per_write_flushes, totals[4].created.len());
        println!();
        println!("round  get/noop  create/noop  create/fsync  audit-on/off");
        for (k, r) in per_round.iter().enumerate() {
            println!(
                "{:>5}  {:>8.2}  {:>11.2}  {:>12.2}  {:>12.2}",
                k + 1,
                r[0],
                r[1],
                r[2],
                r[3]
            );
        }
    }
    per_write.shutdown().await?;
    vault.shutdown().await?;
    unaudited.shutdown().await?;
    let _ = noop.shutdown.send(());
    noop.handle.await??;
    if !ratios_run {
        println!("KLUIS_LOAD_ONLY: not every scenario ran, so there are no ratios");
        return Ok(());
    }

    let [get_noop, create_noop, create_fsync, audit_on_off] = ratios(&totals);
    println!();
    if cfg.bench_mode {
        let verdict = |name: &str, x: f64, target: f64| {
            let v = if x >= target { "met" } else { "MISSED" };
            println!("target {name} >= {target:.2}: {v} ({x:.3})");
        };
        verdict("get/noop", get_noop, 0.5);
        verdict("create/noop", create_noop, 0.25);
        verdict("create/fsync-per-write", create_fsync, 5.0);
        verdict("get audit-on/audit-off", audit_on_off, 0.8);
    }
    println!("ratio get/noop {get_noop:.2}");
    println!("ratio create/noop {create_noop:.2}");
    println!("ratio create/fsync-per-write {create_fsync:.2}");
    println!("ratio get audit-on/off {audit_on_off:.2}");
    Ok(())
}

fn main() {
    // As the `kluis` binary does at start (src/main.rs).
    if let Err(e) = kluis::server::no_huge_pages() {
        eprintln!("load bench: could not turn off transparent huge pages: {e}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load bench: cannot build the tokio runtime: {e}");
            std::process::exit(2);
        }
    };
    let outcome = runtime.block_on(run());
    runtime.shutdown_timeout(Duration::from_secs(5));
    if let Err(e) = outcome {
        eprintln!("load bench failed: {e}");
        std::process::exit(1);
    }
}

//! Assembles and runs the gRPC server: the `Records`, `Audit` and `Keys` services behind the
//! authentication gate, `grpc.health.v1`, server reflection, TLS/mTLS through rustls, the
//! transport's limits (streams per connection, keepalive, TLS handshake timeout, open
//! connections), and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::{Connected, TcpIncoming};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::audit::Signer;
use crate::config::{ConfigError, Settings};
use crate::keys::{KeyError, KeyRing};
use crate::proto::audit_server::AuditServer;
use crate::proto::keys_server::KeysServer;
use crate::proto::records_server::RecordsServer;
use crate::rotation::Jobs;
use crate::service::answer::{AnswerBudget, AnswerHold, AnswerTrack};
use crate::service::audit_service::AuditService;
use crate::service::decode::DecodeGuard;
use crate::service::gate::{self, Gate};
use crate::service::keys_service::KeysService;
use crate::service::{Authenticator, RecordsService};
use crate::store::{SledStore, StoreError};
use crate::vault::Vault;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Keys are unusable (e.g. wrong master key).
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The master key does not match the data directory: says which key and which directory
    /// (review 30).
    #[error("{source} (master key from {key}; data directory {data_dir})")]
    WrongMasterKey {
        /// [`KeyError::WrongMasterKey`].
        source: KeyError,
        /// Where the key came from.
        key: String,
        /// The data directory.
        data_dir: String,
    },
    /// The data directory could not be opened.
    #[error("data directory: {0}")]
    Store(#[from] StoreError),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The audit signing key is unusable.
    #[error(transparent)]
    AuditKey(#[from] crate::audit::SignerError),
    /// The vault's state in the store could not be read.
    #[error("opening the vault: {0}")]
    Vault(#[from] crate::error::VaultError),
    /// The server stopped, but not cleanly: the store refused writes, or the last audit
    /// checkpoint or anchor could not be written.
    #[error("stopped uncleanly: {0}")]
    Unclean(String),
}

/// A running server.
pub struct Running {
    /// The bound address (useful with port 0).
    pub local_addr: SocketAddr,
    /// The vault behind it.
    pub vault: Arc<Vault<SledStore>>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    checkpoints: Option<Checkpointer>,
    jobs: Option<Arc<Jobs<SledStore>>>,
    schedule: Option<tokio::task::JoinHandle<()>>,
    sweeper: Option<tokio::task::JoinHandle<()>>,
    refusals: Option<tokio::task::JoinHandle<()>>,
    /// How many refusals are not recorded yet (held without keeping the recorder open).
    backlog: gate::Backlog,
    health_watch: Option<tokio::task::JoinHandle<()>>,
    adopter: Option<tokio::task::JoinHandle<()>>,
    /// Closes every client connection still open when the grace period ends.
    cutoff: Arc<Cutoff>,
    /// Whether the checkpointer signs and anchors: read once it has stopped.
    checkpoint_health: Arc<crate::audit::CheckpointHealth>,
    /// Held by every call running in its own task ([`Detached`]).
    calls: Arc<()>,
}

/// How often the health status is checked against the store.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

/// The background task that signs audit checkpoints.
struct Checkpointer {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Where this server anchors the audit trail outside the store (see [`crate::anchor`]).
struct Anchoring {
    /// The anchor file of this store.
    path: std::path::PathBuf,
    /// The store's id, derived from its keys.
    store_id: [u8; 16],
    /// The anchor the file held at start-up.
    checkpoint: Option<crate::audit::Checkpoint>,
}

/// The audit anchor directory, checked: writable (the anchor is written at every checkpoint:
/// a directory it cannot be written to would leave the trail without it, noticed only in the
/// log; said at start instead), and outside the data directory (whoever can rewrite the store
/// must not reach it). Needs no store: checked before one is opened or made.
fn check_anchor_dir(
    audit: &crate::config::AuditSettings,
    data_dir: &std::path::Path,
) -> Result<std::path::PathBuf, ServerError> {
    let dir = audit.anchor_dir();
    // Real paths where they exist (a data directory not made yet: as written, made absolute).
    let real = |p: &std::path::Path| {
        p.canonicalize()
            .or_else(|_| std::path::absolute(p))
            .unwrap_or_else(|_| p.to_path_buf())
    };
    if real(&dir).starts_with(real(data_dir)) {
        return Err(ConfigError::Rule(format!(
            "[audit] anchor_dir: the audit anchor directory {} lies inside the data directory {}: it must be out of reach of whoever can change the store (set [audit] anchor_dir elsewhere, e.g. beside the signing key)",
            dir.display(),
            data_dir.display()
        ))
        .into());
    }
    crate::anchor::check_writable(&dir).map_err(|e| ConfigError::Rule(e.to_string()))?;
    Ok(dir)
}

impl Anchoring {
    /// The anchor of `vault`'s store: its id recorded (signed) in the store, the anchor
    /// directory checked writable, and the anchor file read.
    async fn prepare(
        vault: &Vault<SledStore>,
        audit: &crate::config::AuditSettings,
        data_dir: &std::path::Path,
        signer: &Signer,
    ) -> Result<Anchoring, ServerError> {
        // Named by the store's id (derived from its keys, so an edit of the store cannot
        // point it elsewhere); the store keeps a signed record of the id for the offline
        // verifier.
        let store_id = vault.keys().store_id();
        if let Some(changed) = crate::anchor::record_store_id(vault.store(), &store_id, signer)
            .await
            .map_err(|e| ConfigError::Rule(format!("recording the store id: {e}")))?
        {
            tracing::error!(
                recorded = %hex::encode(changed),
                store_id = %hex::encode(store_id),
                "the store's recorded id differed from the one its keys give (changed by hand?); mended"
            );
        }
        let dir = check_anchor_dir(audit, data_dir)?;
        let path = crate::anchor::path(&dir, &store_id);
        let checkpoint = crate::anchor::load(&path, &store_id, &signer.public_key())
            .map_err(|e| ConfigError::Rule(e.to_string()))?;
        Ok(Anchoring {
            path,
            store_id,
            checkpoint,
        })
    }
}

/// How long a shutdown waits for open connections (streams that do not end by themselves:
/// a client's stream that stays open, say; health `Watch` streams and key-job progress
/// streams are ended by the shutdown) before it closes them.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// How long a shutdown waits for the events of refused calls still queued to be written.
const REFUSALS_GRACE: Duration = Duration::from_secs(5);

/// Calls one HTTP/2 connection may have open at once (hyper's default is unlimited).
pub const MAX_CONCURRENT_STREAMS: u32 = 128;
/// An HTTP/2 connection is pinged after this long without a frame from the client…
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// …and closed if the ping is not answered within this.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// TCP keepalive: idle time before the first probe, time between probes, and probes
/// unanswered before the kernel drops the connection (a peer gone without a FIN).
pub const TCP_KEEPALIVE: (Duration, Duration, u32) =
    (Duration::from_secs(60), Duration::from_secs(10), 3);
/// A TLS handshake not finished in this time is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Running {
    /// Stops accepting requests, lets in-flight ones finish (for up to [`SHUTDOWN_GRACE`]),
    /// and waits for the server to end, then signs a last checkpoint.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.shutdown_within(SHUTDOWN_GRACE).await
    }

    /// [`Running::shutdown`] with a grace period of `grace`: connections still open then are
    /// closed (their calls fail; none is served afterwards).
    pub async fn shutdown_within(self, grace: Duration) -> Result<(), ServerError> {
        self.shutdown_unless(grace, std::future::pending()).await
    }

    /// [`Running::shutdown_within`], closing the connections still open at once when `force`
    /// completes first (a second termination signal): their calls fail, and none of them
    /// was acknowledged.
    pub async fn shutdown_unless(
        mut self,
        grace: Duration,
        force: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        // A running key job stops first (it resumes from its last page on the next start), so
        // that the streams of the clients watching its progress end and let the server stop.
        if let Some(jobs) = self.jobs.take() {
            jobs.stop().await;
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let waited = tokio::select! {
            waited = tokio::time::timeout(grace, &mut self.handle) => waited.map_err(|_| false),
            () = force => Err(true),
        };
        let served = match waited {
            Ok(joined) => self.served(joined),
            Err(forced) => {
                if forced {
                    tracing::warn!("termination signal again: closing the connections still open now (their calls fail; none of them was acknowledged)");
                } else {
                    tracing::warn!(
                        grace_ms = grace.as_millis() as u64,
                        "connections still open after the grace period (streams that do not end by themselves): closing them"
                    );
                }
                // Aborting the serve task leaves hyper's connection tasks running: their
                // sockets are cut instead, so no call is served after the grace period.
                self.cutoff.cut();
                self.handle.abort();
                let _ = (&mut self.handle).await;
                Ok(())
            }
        };
        self.finish(served).await
    }

    /// Waits for the server to end, then signs a last checkpoint.
    pub async fn wait(mut self) -> Result<(), ServerError> {
        let joined = (&mut self.handle).await;
        let served = self.served(joined);
        self.finish(served).await
    }

    fn served(
        &self,
        joined: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
    ) -> Result<(), ServerError> {
        match joined {
            Ok(r) => r.map_err(ServerError::from),
            Err(e) => Err(ServerError::Bind {
                addr: self.local_addr,
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    /// Stops the background tasks and signs a last checkpoint.
    async fn finish(mut self, served: Result<(), ServerError>) -> Result<(), ServerError> {
        for task in [
            self.schedule.take(),
            self.sweeper.take(),
            self.health_watch.take(),
            self.adopter.take(),
        ]
        .into_iter()
        .flatten()
        {
            task.abort();
            let _ = task.await;
        }
        // A running key job stops here and resumes from its last page on the next start.
        if let Some(jobs) = self.jobs.take() {
            jobs.stop().await;
        }
        // The events of refused calls still queued, before the last checkpoint. The recorder
        // ends once the services (and their gates) are gone; connections a forced shutdown
        // left behind may still hold them.
        if let Some(mut task) = self.refusals.take() {
            if tokio::time::timeout(REFUSALS_GRACE, &mut task)
                .await
                .is_err()
            {
                // Connections closed by force may still hold a gate. Only refusals that were
                // made and are not written are at risk.
                let unrecorded = self.backlog.unrecorded();
                if unrecorded > 0 {
                    tracing::warn!(
                        unrecorded,
                        "the events of unauthenticated calls refused during shutdown may not all be recorded"
                    );
                } else {
                    tracing::debug!("refusal recorder stopped; every refusal was recorded");
                }
                task.abort();
                let _ = task.await;
            }
        }
        // Calls whose callers are gone may still run in their own tasks (review 31: one
        // finished a write after the last checkpoint was signed): wait for them first.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while Arc::strong_count(&self.calls) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        if Arc::strong_count(&self.calls) > 1 {
            tracing::warn!(
                running = Arc::strong_count(&self.calls) - 1,
                "calls still running after the grace period: their events may come after the last checkpoint"
            );
        }
        let checkpointing = self.checkpoints.is_some();
        if let Some(cp) = self.checkpoints.take() {
            let _ = cp.stop.send(());
            let _ = cp.task.await;
        }
        // Connection tasks may still hold the services (and so the vault) for a moment after
        // the server future ends; wait for them, so that the data directory is released when
        // this returns and `self` drops.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&self.vault) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        served?;
        // The last line of a run says how it ended (review 25: a clean stop and a killed
        // process looked alike), and an unclean end is an error (exit code 1).
        let mut faults = Vec::new();
        if let Some(why) = self.vault.store().poisoned() {
            faults.push(format!(
                "the store refused writes ({why}); a restart replays its write-ahead log"
            ));
        }
        if let Some(why) = self.checkpoint_health.refusal() {
            faults.push(format!("the last audit checkpoint was not signed ({why})"));
        }
        if let Some(why) = self.checkpoint_health.anchor_failure() {
            faults.push(format!("the audit anchor was not written ({why})"));
        }
        if faults.is_empty() {
            if checkpointing {
                tracing::info!("stopped cleanly: every acknowledged write is on disk, and the last audit checkpoint is signed and anchored");
            } else {
                tracing::info!("stopped cleanly: every acknowledged write is on disk");
            }
            Ok(())
        } else {
            let faults = faults.join("; ");
            tracing::error!(%faults, "stopped uncleanly");
            Err(ServerError::Unclean(faults))
        }
    }
}

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`). The allocator
/// hands memory back to the kernel in small ranges and takes it again; where the kernel
/// backs such a range with a huge page, every refault zeroes 2 MiB. In profiles of the load
/// benchmark that zeroing (`clear_page_erms`) took 7–10 % of the CPU of durable creates, and
/// under 0.2 % with 4 KiB pages (in runs without the profiler, the difference is within the
/// machine's noise). Called by `kluis` at start, and by the benchmarks that run the vault in
/// their own process. Linux only; elsewhere it does nothing.
pub fn no_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}

/// Opens the vault (store and keys) of `settings`. Refuses a wrong master key.
pub async fn open_vault(settings: &Settings) -> Result<Arc<Vault<SledStore>>, ServerError> {
    let store = SledStore::open_with(&settings.data_dir, settings.durability)?;
    let keys = KeyRing::open(&store, &settings.master_key)
        .await
        .map_err(|e| match e {
            KeyError::WrongMasterKey => ServerError::WrongMasterKey {
                source: e,
                key: settings.master_key_source.clone(),
                data_dir: settings.data_dir.display().to_string(),
            },
            e => ServerError::Key(e),
        })?;
    let vault = Vault::new(store, Arc::new(settings.schema.clone()), Arc::new(keys))
        .with_policy(Arc::new(settings.policy.clone()))
        .with_retention(Arc::new(settings.retention.clone()))
        .with_clock(Arc::clone(&settings.clock));
    let vault = if settings.audit.enabled {
        vault
    } else {
        vault.without_auditing()
    };
    // Else the first write that makes a data key would conflict once to learn it.
    vault.load_dek_floor().await?;
    Ok(Arc::new(vault))
}

/// Signs a checkpoint whenever `every` events or `interval` have passed (with new events),
/// and a last one when stopped.
fn spawn_checkpointer(
    vault: Arc<Vault<SledStore>>,
    signer: Signer,
    own_after: Option<u64>,
    anchor: Anchoring,
    audit: &crate::config::AuditSettings,
    health: Arc<crate::audit::CheckpointHealth>,
) -> Checkpointer {
    let (every, max_uncovered, interval) = (
        audit.checkpoint_every,
        audit.max_uncovered(),
        audit.checkpoint_interval,
    );
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let poll = std::time::Duration::from_millis(25).min(interval);
        let mut last_forced = tokio::time::Instant::now();
        let mut last_error: Option<(String, tokio::time::Instant)> = None;
        let anchored_seq = anchor.checkpoint.as_ref().map(|cp| cp.seq);
        let mut watched = crate::audit::Watched::starting(anchor.checkpoint, own_after);
        let mut anchor_error: Option<(String, tokio::time::Instant)> = None;
        // The newest signed checkpoint the anchor file does not hold yet: tried again every
        // second, not only at the next checkpoint (an idle server would otherwise stay
        // unanchored, and say so, long after the cause was gone; review 26). At start, the
        // store's newest checkpoint when the anchor file is behind it (a run that ended
        // unanchored), so that a restart neither forgets nor hides it.
        let mut unanchored: Option<crate::audit::Checkpoint> =
            match crate::audit::newest_checkpoint(vault.store(), &signer.public_key()).await {
                Ok(Some(cp)) if anchored_seq.is_none_or(|seq| seq < cp.seq) => Some(cp),
                Ok(_) => None,
                Err(e) => {
                    tracing::error!(error = %e, "reading the newest audit checkpoint failed");
                    None
                }
            };
        let mut anchor_tried: Option<tokio::time::Instant> = None;
        loop {
            let stopping = tokio::select! {
                _ = &mut stopped => true,
                _ = tokio::time::sleep(poll) => false,
            };
            let force = stopping || last_forced.elapsed() >= interval;
            if force {
                last_forced = tokio::time::Instant::now();
            }
            match crate::audit::checkpoint_if_due(
                vault.store(),
                &signer,
                every,
                max_uncovered,
                force,
                &mut watched,
            )
            .await
            {
                Ok(Some(cp)) => {
                    tracing::debug!(seq = cp.seq, "signed audit checkpoint");
                    last_error = None;
                    health.signing();
                    // Then outside the store, at once. A failure leaves the older anchor,
                    // which still holds.
                    unanchored = Some(cp);
                    anchor_tried = None;
                }
                // Nothing due; a refusal stands until a checkpoint is signed again.
                Ok(None) => {}
                Err(e) => {
                    // Said once per kind of failure (its text without the event numbers, which
                    // move with every event: review 21 saw 15 lines in 0.4 s), and again every
                    // ten minutes while it lasts; `VerifyChain` says it all along.
                    let text = e.to_string();
                    health.refused(text.clone());
                    let kind: String = text.chars().filter(|c| !c.is_ascii_digit()).collect();
                    let repeat = last_error.as_ref().is_none_or(|(said, at)| {
                        *said != kind || at.elapsed() >= CHECKPOINT_ERROR_REPEAT
                    });
                    if repeat {
                        tracing::error!(error = %text, "audit checkpoint failed");
                        last_error = Some((kind, tokio::time::Instant::now()));
                    }
                }
            }
            let due = anchor_tried.is_none_or(|at| at.elapsed() >= ANCHOR_RETRY);
            if let Some(cp) = unanchored.take_if(|_| due || stopping) {
                anchor_tried = Some(tokio::time::Instant::now());
                match crate::anchor::save(&anchor.path, &anchor.store_id, &cp) {
                    Ok(()) => {
                        if anchor_error.take().is_some() {
                            tracing::info!(seq = cp.seq, "the audit anchor is written again");
                        }
                        watched.set_anchor(cp);
                        health.anchored();
                    }
                    Err(e) => {
                        // Said once per kind of failure and again every ten minutes while it
                        // lasts, like a checkpoint's; `VerifyChain` says it all along.
                        let text = e.to_string();
                        health.anchor_failed(text.clone());
                        let repeat = anchor_error.as_ref().is_none_or(|(said, at)| {
                            *said != text || at.elapsed() >= CHECKPOINT_ERROR_REPEAT
                        });
                        if repeat {
                            tracing::error!(seq = cp.seq, error = %text, "writing the audit anchor failed: events after the anchored checkpoint are not covered outside the store until it is written again (tried every second); VerifyChain answers not ok meanwhile");
                            anchor_error = Some((text, tokio::time::Instant::now()));
                        }
                        unanchored = Some(cp);
                    }
                }
            }
            if stopping {
                return;
            }
        }
    });
    Checkpointer { stop, task }
}

/// How often an anchor write that failed is tried again.
const ANCHOR_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// How often a refusal to sign audit checkpoints that lasts is logged again.
const CHECKPOINT_ERROR_REPEAT: std::time::Duration = std::time::Duration::from_secs(600);

/// Rotates each scheduled category's KEK once it is older than its `rotate_after_days`, then
/// rewraps the category; checks every `schedule_check`. Each rotation, and each rewrap it
/// asks for, is an audit event of [`crate::rotation::SCHEDULE_PRINCIPAL`], committed with the
/// new key or the job's start, and a log line.
fn spawn_key_schedule(
    jobs: Arc<Jobs<SledStore>>,
    settings: crate::config::KeySettings,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for (&category, &age) in &settings.rotate_after {
                if let Err(e) = crate::rotation::scheduled(&jobs, category, age).await {
                    tracing::error!(category = category.as_str(), error = %e, "scheduled key rotation failed; retrying at the next check");
                }
            }
            tokio::time::sleep(settings.schedule_check).await;
        }
    })
}

/// Runs the retention sweeper at start-up and then every `interval`; it pauses while the
/// clock is more than `max_gap_days` past the last sweep's day ([`crate::sweeper::sweep_day`]).
fn spawn_sweeper(
    vault: Arc<Vault<SledStore>>,
    interval: std::time::Duration,
    max_gap_days: u32,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            sweep_once(&vault, max_gap_days).await;
            tokio::time::sleep(interval).await;
        }
    })
}

/// One pass of the retention sweeper, logged.
async fn sweep_once(vault: &Vault<SledStore>, max_gap_days: u32) {
    use crate::sweeper::SweepDay;
    let today = match crate::sweeper::sweep_day(vault.store(), vault.today(), max_gap_days).await {
        Ok(SweepDay::Run(today)) => today,
        Ok(SweepDay::Paused { last, today }) => {
            tracing::error!(%today, last_sweep = %last, sweep_max_gap_days = max_gap_days, "retention sweep paused: the clock is more than [retention] sweep_max_gap_days past the last sweep, and a clock set wrongly ahead would erase data before it is due; if the date is right (the vault was down, or restored from an older backup), confirm it with `kluis retention resume` (server stopped)");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "retention sweep failed; retrying at the next run");
            return;
        }
    };
    match crate::sweeper::sweep(vault, today).await {
        Ok(s) if !s.erased.is_empty() || !s.held.is_empty() || !s.damaged.is_empty() => {
            tracing::info!(
                %today,
                erased = s.erased.len(),
                held = s.held.len(),
                damaged = s.damaged.len(),
                "retention sweep"
            )
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "retention sweep failed; retrying at the next run");
            return;
        }
    }
    if let Err(e) = crate::sweeper::record_sweep_day(vault.store(), today).await {
        tracing::error!(error = %e, "recording the day of the retention sweep failed");
    }
}

/// `e` and its causes, `: `-separated.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Starts the server in the background; it runs until [`Running::shutdown`].
pub async fn start(settings: Settings) -> Result<Running, ServerError> {
    settings.check_listener()?;
    // What can be refused without the store is refused before it is opened (or made).
    if !settings.audit.create_signing_key && !settings.audit.signing_key_file.exists() {
        Signer::load_or_create(&settings.audit.signing_key_file, false)?;
    }
    let tls_config = match &settings.tls {
        Some(tls) => {
            let mut config = ServerTlsConfig::new()
                .identity(Identity::from_pem(&tls.cert_pem, tls.key_pem.as_slice()))
                .timeout(TLS_HANDSHAKE_TIMEOUT);
            if let Some(ca) = &tls.client_ca_pem {
                config = config
                    .client_ca_root(Certificate::from_pem(ca))
                    .client_auth_optional(!tls.require_client_cert);
            }
            // Parsed here, with the error's causes (tonic's own text is "transport error").
            Server::builder().tls_config(config.clone()).map_err(|e| {
                let chain = error_chain(&e);
                ConfigError::Rule(if chain.contains("KeyMismatch") {
                    "[tls] key_file: the private key does not belong to the certificate of cert_file".to_string()
                } else {
                    format!(
                        "[tls]: the certificate, key or client CA could not be used (cert_file, key_file, client_ca_file): {chain}"
                    )
                })
            })?;
            Some(config)
        }
        None => None,
    };
    check_anchor_dir(&settings.audit, &settings.data_dir)?;
    let vault = open_vault(&settings).await?;
    let (keepalive, keepalive_interval, keepalive_retries) = TCP_KEEPALIVE;
    let incoming = TcpIncoming::bind(settings.listen)
        .map_err(|source| ServerError::Bind {
            addr: settings.listen,
            source,
        })?
        .with_nodelay(Some(true))
        .with_keepalive(Some(keepalive))
        .with_keepalive_interval(Some(keepalive_interval))
        .with_keepalive_retries(Some(keepalive_retries));
    let local_addr = incoming.local_addr().map_err(|source| ServerError::Bind {
        addr: settings.listen,
        source,
    })?;
    let cutoff = Arc::new(Cutoff::default());
    let connections = Arc::new(Connections::default());
    let incoming = limit_connections(
        incoming,
        settings.max_connections,
        Arc::clone(&cutoff),
        Arc::clone(&connections),
        settings.first_request_timeout,
        settings.answer_stall_timeout,
    );

    // The transport before any background work starts (TLS was parsed before the store was
    // opened, so that a bad TLS file stops the start before anything is made or run).
    // No request timeout: the key jobs' progress streams run as long as their job.
    let limit = settings.max_request_bytes;
    let budget = BodyBudget::for_requests(limit);
    let answer_budget = AnswerBudget::for_requests(limit);
    let answering = Arc::clone(&connections);
    let mut builder = Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        // hyper's default, stated: request metadata past it is refused by HTTP/2 (README).
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .layer(tower::util::MapRequestLayer::new(
            move |request: http::Request<tonic::body::Body>| budget.wrap_request(request),
        ))
        .layer(tower::util::MapRequestLayer::new(
            gate::note_action::<tonic::body::Body>,
        ))
        .layer(tower::util::MapResponseLayer::new(move |response| {
            request_too_large_status(response, limit)
        }))
        .layer(tower::util::MapResponseLayer::new(
            move |response: http::Response<tonic::body::Body>| answering.send(response),
        ));
    if let Some(config) = tls_config {
        builder = builder.tls_config(config).map_err(|e| {
            ConfigError::Rule(format!(
                "[tls]: the certificate, key or client CA could not be used (cert_file, key_file, client_ca_file): {}",
                error_chain(&e)
            ))
        })?;
    }
    // A missing key file is made afresh only for a store whose checkpoints no key signs yet
    // (making one over a signed store would also overwrite the public key file beside it).
    if !settings.audit.signing_key_file.exists() {
        let recorded = crate::store::Store::get(
            vault.store(),
            crate::store::Keyspace::Meta,
            crate::audit::META_SIGNING_KEY,
        )
        .await
        .map_err(|e| ConfigError::Rule(format!("reading the audit signing key: {e}")))?;
        if let Some(public) = recorded {
            return Err(ConfigError::Rule(format!(
                "{} is missing, and this store's checkpoints are signed with key {}: restore the file (every instance sharing a store uses the same key)",
                settings.audit.signing_key_file.display(),
                hex::encode(public)
            ))
            .into());
        }
        // A store from before the key was recorded: its checkpoints name no key, but a new
        // one would not verify them.
        let signed = crate::store::Store::get(
            vault.store(),
            crate::store::Keyspace::Meta,
            crate::audit::META_CHECKPOINT_LAST,
        )
        .await
        .map_err(|e| ConfigError::Rule(format!("reading the audit checkpoints: {e}")))?;
        if signed.is_some() {
            return Err(ConfigError::Rule(format!(
                "{} is missing, and this store holds audit checkpoints signed with it: restore the file",
                settings.audit.signing_key_file.display()
            ))
            .into());
        }
    }
    let signer = Signer::load_or_create(
        &settings.audit.signing_key_file,
        settings.audit.create_signing_key,
    )?;
    crate::audit::claim_signing_key(vault.store(), &signer.public_key())
        .await
        .map_err(|e| {
            ConfigError::Rule(format!(
                "{e} (file {})",
                settings.audit.signing_key_file.display()
            ))
        })?;
    let anchoring =
        Anchoring::prepare(&vault, &settings.audit, &settings.data_dir, &signer).await?;
    // A policy from before purposes named their stages (an earlier `kluis init`): a
    // contract basis then applies to closed procedures and former employees too.
    for (name, purpose) in settings.policy.purposes() {
        if purpose.legal_basis == crate::policy::LegalBasis::Contract && purpose.stages.is_none() {
            tracing::warn!(
                purpose = name,
                "purpose on a contract basis names no lifecycle stages: it applies to closed procedures and former employees too; add stages = [\"applicant\", \"employed\"] to it in the policy (README, \"Purpose and lifecycle\")"
            );
        }
    }
    // Every call of the three services passes the gate, which authenticates it before its
    // body is read; the size limits stay on the servers inside it. Between the two, the
    // decode guard answers, logs and audits a body that does not decode.
    let auth = Authenticator::new(Arc::new(settings.policy.clone()));
    let checkpoint_health = Arc::new(crate::audit::CheckpointHealth::default());
    let (refusals, refusal_task) = gate::spawn_refusal_recorder(Arc::clone(&vault));
    let backlog = refusals.backlog();
    let gate = Gate::new(auth.clone(), refusals).with_connections(Arc::clone(&connections));
    let audit = AuditServer::new(
        AuditService::new(
            Arc::clone(&vault),
            auth.clone(),
            signer.public_key(),
            anchoring.path.clone(),
            anchoring.store_id,
            settings.audit.max_uncovered(),
        )
        .with_checkpoint_health(Arc::clone(&checkpoint_health))
        .with_answer_budget(answer_budget.clone()),
    )
    .max_decoding_message_size(settings.max_request_bytes);
    let calls = Arc::new(());
    let audit = Detached(
        InterceptedService::new(DecodeGuard::new(audit, Arc::clone(&vault)), gate.clone()),
        Arc::clone(&calls),
    );
    // On a store this process holds alone, every event past today's head is its own.
    let own_after = if crate::store::Store::exclusive(vault.store()) {
        Some(
            crate::audit::Head::load(vault.store())
                .await
                .map_err(|e| ConfigError::Rule(format!("reading the audit chain head: {e}")))?
                .seq,
        )
    } else {
        None
    };
    let checkpoints = spawn_checkpointer(
        Arc::clone(&vault),
        signer,
        own_after,
        anchoring,
        &settings.audit,
        Arc::clone(&checkpoint_health),
    );
    let jobs = Jobs::new(Arc::clone(&vault));
    if jobs
        .resume()
        .await
        .map_err(|e| ConfigError::Rule(format!("resuming the key job: {e}")))?
    {
        tracing::info!("an unfinished key job was resumed");
    }
    // Instances sharing a store take over a job whose runner died (sled is one process's).
    let adopter = (!crate::store::Store::exclusive(vault.store())).then(|| jobs.spawn_adopter());
    let schedule = (!settings.keys.rotate_after.is_empty())
        .then(|| spawn_key_schedule(Arc::clone(&jobs), settings.keys.clone()));
    let sweeper = spawn_sweeper(
        Arc::clone(&vault),
        std::time::Duration::from_secs(settings.retention.sweep_interval_secs.max(1)),
        settings.retention.sweep_max_gap_days,
    );
    let keys = KeysServer::new(KeysService::new(Arc::clone(&jobs), auth.clone()))
        .max_decoding_message_size(settings.max_request_bytes);
    let keys = Detached(
        InterceptedService::new(DecodeGuard::new(keys, Arc::clone(&vault)), gate.clone()),
        Arc::clone(&calls),
    );
    // An answer may be larger than a request: an export holds the record's blobs in base64
    // (4/3 of their size) and its access history.
    let answer_limit = settings.max_request_bytes.saturating_mul(2);
    // A record whose values fill the schema's limits together is written in several calls;
    // its export is one answer (review 16).
    let largest_export = settings.schema.largest_record().saturating_mul(4) / 3;
    if largest_export > answer_limit {
        tracing::warn!(
            largest_export,
            answer_limit,
            "a record holding every field of the schema at its size limit would be exported as more than an answer may hold (twice max_request_bytes): ExportRecord answers RESOURCE_EXHAUSTED for such a record; raise max_request_bytes"
        );
    }
    let records = RecordsServer::new(RecordsService::new(
        Arc::clone(&vault),
        auth,
        answer_limit,
        answer_budget,
    ))
    .max_decoding_message_size(settings.max_request_bytes)
    .max_encoding_message_size(answer_limit);
    let records = Detached(
        InterceptedService::new(DecodeGuard::new(records, Arc::clone(&vault)), gate),
        Arc::clone(&calls),
    );
    let (health_state, health) = crate::service::health::HealthState::new(&HEALTH_SERVICES);
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error =
        |e: tonic_reflection::server::Error| ConfigError::Rule(format!("reflection: {e}"));
    // v1 for current tools, v1alpha for older grpcurl and grpc_cli.
    // Calls without credentials are small: their bodies cannot hold much of the anonymous
    // share of the request-bytes budget either.
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(reflection_error)?
        .max_decoding_message_size(OPEN_SERVICE_MAX_REQUEST_BYTES);
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(reflection_error)?
        .max_decoding_message_size(OPEN_SERVICE_MAX_REQUEST_BYTES);

    let (tx, rx) = oneshot::channel::<()>();
    let router = builder
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(records)
        .add_service(audit)
        .add_service(keys);
    // A store that refuses writes (a failed sync or apply) fails every call that writes,
    // reads included (their audit events): report NOT_SERVING, so that a load balancer
    // stops sending calls here until a restart replays the log.
    let health_watch = {
        let vault = Arc::clone(&vault);
        let health = health_state.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEALTH_EVERY).await;
                if let Some(reason) = vault.store().poisoned() {
                    tracing::error!(%reason, "the store refuses writes: health set to NOT_SERVING until restart");
                    health.set_not_serving();
                    return;
                }
            }
        })
    };
    let handle = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.await;
                // NOT_SERVING to every check until the connections close; a health `Watch`
                // stream, which never ends by itself (it would hold its connection and the
                // shutdown open until the grace period ran out), ends after saying so.
                health_state.stop();
            })
            .await
    });
    tracing::info!(%local_addr, tls = settings.tls.is_some(), "kluis listening");
    Ok(Running {
        local_addr,
        vault,
        shutdown: Some(tx),
        handle,
        checkpoints: Some(checkpoints),
        jobs: Some(jobs),
        schedule,
        sweeper: Some(sweeper),
        refusals: refusal_task,
        backlog,
        health_watch: Some(health_watch),
        adopter,
        cutoff,
        checkpoint_health,
        calls,
    })
}

/// The services whose health is reported: the three kluis services and the overall status
/// (`""`).
const HEALTH_SERVICES: [&str; 4] = [
    <RecordsServer<RecordsService<SledStore>> as tonic::server::NamedService>::NAME,
    <AuditServer<AuditService<SledStore>> as tonic::server::NamedService>::NAME,
    <KeysServer<KeysService<SledStore>> as tonic::server::NamedService>::NAME,
    "",
];

/// Runs the server until `signal` completes, then shuts down gracefully.
pub async fn run(settings: Settings, signal: impl Future<Output = ()>) -> Result<(), ServerError> {
    run_staged(settings, signal).await.map_err(|(_, e)| e)
}

/// Where [`run_staged`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Before it served: configuration, keys, data directory, listener, audit signing key.
    Starting,
    /// After it had started serving (while running or shutting down).
    Serving,
}

/// [`run`], saying whether an error came while starting or after the server had started.
pub async fn run_staged(
    settings: Settings,
    signal: impl Future<Output = ()>,
) -> Result<(), (Stage, ServerError)> {
    // A write past the file-size limit must fail with EFBIG (and the operation fail closed),
    // not kill the process with SIGXFSZ; handling the signal replaces its default action.
    let _xfsz = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(SIGXFSZ));
    let running = start(settings).await.map_err(|e| (Stage::Starting, e))?;
    signal.await;
    // Listening for the second signal from here on (review 26: registered only once the
    // shutdown had stopped the key job, a second signal sent right after the first was lost).
    let again = next_termination_signal();
    tracing::info!(
        grace_secs = SHUTDOWN_GRACE.as_secs(),
        "shutting down: finishing in-flight requests (a second SIGTERM or SIGINT closes them at once)"
    );
    running
        .shutdown_unless(SHUTDOWN_GRACE, again)
        .await
        .map_err(|e| (Stage::Serving, e))
}

/// SIGXFSZ on Linux.
const SIGXFSZ: i32 = 25;

/// Completes on the next SIGTERM or SIGINT delivered after this call: the listeners are
/// registered here, not when the future is first polled. (Signals sent in the same instant
/// may arrive as one.)
pub fn next_termination_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        let recv = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = recv(term) => {}
            () = recv(int) => {}
        }
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A client connection holding one of the server's `max_connections` slots until it closes,
/// and cut (every read and write fails) once the server's [`Cutoff`] is.
struct Limited {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
    cutoff: Arc<Cutoff>,
    /// Woken by the cutoff, so that a connection waiting for its socket sees it.
    waker: Arc<futures::task::AtomicWaker>,
    /// Whether an authenticated call came on it ([`Connections::mark`]), and where it is
    /// registered.
    state: Arc<ConnState>,
    connections: Arc<Connections>,
    /// Until the first request: when the connection is closed if none has come.
    first_request_by: Option<Pin<Box<tokio::time::Sleep>>>,
    /// While large answers are being handed over: the connection is closed once none of them
    /// has moved for `stall_timeout` (its caller reads nothing).
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    stall_timeout: Duration,
}

impl Limited {
    /// Registers the task polling this connection with the cutoff and the first-request
    /// deadline; an error once cut, or once the deadline passed with no request.
    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        self.waker.register(cx.waker());
        if self.cutoff.is_cut() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the server closed the connection at the end of its shutdown grace period",
            ));
        }
        if let Some(deadline) = self.first_request_by.as_mut() {
            if self
                .state
                .requested
                .load(std::sync::atomic::Ordering::Acquire)
            {
                self.first_request_by = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request within FIRST_REQUEST_TIMEOUT of connecting",
                ));
            }
        }
        match self.state.answers.stalled_since() {
            None => self.stall = None,
            Some(since) => {
                let deadline = since + self.stall_timeout;
                let stall = self
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if stall.deadline() != deadline {
                    stall.as_mut().reset(deadline);
                }
                if stall.as_mut().poll(cx).is_ready() {
                    tracing::warn!(
                        peer = ?self.io.peer_addr().ok(),
                        "closing a connection whose caller read nothing of its answers for ANSWER_STALL_TIMEOUT"
                    );
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the answers on this connection were not read for ANSWER_STALL_TIMEOUT",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        self.connections.leave(&self.state);
    }
}

/// The request bytes all calls together may hold while their bodies arrive, as a multiple
/// of `max_request_bytes` (at least [`MIN_BODY_BUDGET`]). A call's body is held whole until
/// it decodes: without a total, any caller with a token could pin `max_request_bytes` per
/// call, 128 calls per connection, by sending bodies slowly (review 13).
pub const BODY_BUDGET_FACTOR: usize = 4;
/// The least budget of request bytes in flight.
pub const MIN_BODY_BUDGET: usize = 64 * 1024 * 1024;

/// The budget of request bytes in flight, in KiB permits, shared by every call; each
/// principal may hold at most half of it, and so may the calls that carry no credentials
/// (health, reflection) together. With one shared total only, any token holder could fill
/// it with bodies it never finished and lock every other caller out, health checks
/// included (review 31).
#[derive(Clone)]
pub(crate) struct BodyBudget(Arc<BodyShares>);

struct BodyShares {
    /// The total, and each principal's share of it.
    budget: crate::service::answer::SharedBudget,
    /// The share of calls without a principal.
    anonymous: Arc<Semaphore>,
}

impl BodyShares {
    /// The share of `owner`'s principal (or the anonymous one).
    fn share_of(&self, owner: &BodyOwner) -> Arc<Semaphore> {
        match owner.0.principal.get() {
            None => Arc::clone(&self.anonymous),
            Some(principal) => self.budget.share_of(principal),
        }
    }
}

/// Whose body a request carries: set by the authentication gate ([`crate::service::gate`])
/// before the body is read, from the request's extensions, where [`BodyBudget::wrap`] put
/// it; a body read without it (health, reflection) counts as anonymous.
/// It also says whether the transport cut the body off (the caller reset the stream: it
/// cancelled the call, or its deadline passed), which the decode guard tells from a body
/// that was whole but held no message.
#[derive(Clone, Default)]
pub(crate) struct BodyOwner(Arc<OwnerState>);

#[derive(Default)]
struct OwnerState {
    principal: std::sync::OnceLock<Arc<str>>,
    cut: std::sync::atomic::AtomicBool,
}

impl BodyOwner {
    /// Names the principal whose call this is.
    pub(crate) fn set(&self, principal: &Arc<str>) {
        // Set once, by the gate; a second set (none happens) would change nothing.
        let _ = self.0.principal.set(Arc::clone(principal));
    }

    /// Whether the transport ended the body with an error (a reset stream).
    pub(crate) fn was_cut(&self) -> bool {
        self.0.cut.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl BodyBudget {
    /// A budget for a server whose calls may carry `max_request_bytes` each.
    pub(crate) fn for_requests(max_request_bytes: usize) -> Self {
        let bytes = max_request_bytes
            .saturating_mul(BODY_BUDGET_FACTOR)
            .max(MIN_BODY_BUDGET);
        Self::of_kib(bytes.div_ceil(1024))
    }

    fn of_kib(kib: usize) -> Self {
        let budget = crate::service::answer::SharedBudget::of_kib(kib);
        let anonymous = Arc::new(Semaphore::new(budget.half()));
        Self(Arc::new(BodyShares { budget, anonymous }))
    }

    /// `request` with its body holding its bytes against the budget until it is dropped,
    /// and the [`BodyOwner`] the gate names its principal in.
    pub(crate) fn wrap_request(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> http::Request<tonic::body::Body> {
        let owner = BodyOwner::default();
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(owner.clone());
        http::Request::from_parts(parts, self.wrap(body, owner))
    }

    /// `body`, holding its bytes against the budget (and its owner's share) until dropped.
    fn wrap(&self, body: tonic::body::Body, owner: BodyOwner) -> tonic::body::Body {
        tonic::body::Body::new(BudgetedBody {
            inner: body,
            budget: Arc::clone(&self.0),
            owner,
            share: None,
            held: None,
        })
    }
}

/// A request body whose data frames take permits (KiB) from the shared budget and from its
/// caller's share; when either has none left, the call fails `RESOURCE_EXHAUSTED` rather
/// than wait holding what it has.
struct BudgetedBody {
    inner: tonic::body::Body,
    budget: Arc<BodyShares>,
    owner: BodyOwner,
    /// The caller's share, looked up at the first data frame (after the gate).
    share: Option<Arc<Semaphore>>,
    /// What the body holds: of the total, and of its caller's share.
    held: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl http_body::Body for BudgetedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => {
                this.owner
                    .0
                    .cut
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                return Poll::Ready(Some(Err(e)));
            }
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            let kib = u32::try_from(data.len().div_ceil(1024)).unwrap_or(u32::MAX);
            let share = this
                .share
                .get_or_insert_with(|| this.budget.share_of(&this.owner));
            let own = match Arc::clone(share).try_acquire_many_owned(kib) {
                Ok(own) => own,
                Err(_) => {
                    return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(
                        if this.owner.0.principal.get().is_some() {
                            "this caller's calls whose bodies are still arriving already hold its share of the server's budget of request bytes in flight (half of it); finish or cancel them, or retry shortly"
                        } else {
                            "calls without credentials whose bodies are still arriving already hold their share of the server's budget of request bytes in flight (half of it); retry shortly"
                        },
                    ))))
                }
            };
            let total = match Arc::clone(this.budget.budget.total()).try_acquire_many_owned(kib) {
                Ok(total) => total,
                Err(_) => {
                    return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(
                        "the server holds as many request bytes in flight as it takes (calls whose bodies are still arriving); retry shortly",
                    ))))
                }
            };
            match this.held.as_mut() {
                Some((held_total, held_own)) => {
                    held_total.merge(total);
                    held_own.merge(own);
                }
                None => this.held = Some((total, own)),
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A gated service whose calls run to their end in a task of their own: a call the
/// transport drops (the caller cancelled it, or its `grpc-timeout` passed) still writes its
/// log line and its audit event, and a write it started is answered to no one but logged
/// with its outcome. Before, the whole call was dropped at whatever await it had reached: a
/// write done but answered `DEADLINE_EXCEEDED` left no log line, and most such calls no
/// trace at all (review 31). A key job's progress stream is the answer's body, which the
/// transport still owns.
#[derive(Clone)]
pub(crate) struct Detached<S>(S, Arc<()>);

impl<S: tonic::server::NamedService> tonic::server::NamedService for Detached<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, RB> tower::Service<http::Request<B>> for Detached<S>
where
    S: tower::Service<
        http::Request<B>,
        Response = http::Response<RB>,
        Error = std::convert::Infallible,
    >,
    S::Future: Send + 'static,
    RB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    RB::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<
        Box<
            dyn Future<Output = Result<http::Response<tonic::body::Body>, std::convert::Infallible>>
                + Send,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = self.0.call(request);
        // The shutdown waits for every call still running before the last checkpoint.
        let running = Arc::clone(&self.1);
        let call = tokio::spawn(async move {
            let answer = call.await;
            drop(running);
            answer
        });
        Box::pin(async move {
            Ok(match call.await {
                Ok(answer) => answer?.map(tonic::body::Body::new),
                // A handler that panicked (none should): the call fails, not the connection.
                Err(e) => {
                    tracing::error!(
                        panicked = e.is_panic(),
                        "a call's task ended without an answer"
                    );
                    tonic::Status::internal("the call failed inside the server").into_http()
                }
            })
        })
    }
}

/// Largest request message of the services open without credentials (health, reflection):
/// their requests name a service or a symbol.
pub const OPEN_SERVICE_MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Most bytes of request metadata (HTTP/2 header list) a call may carry.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// How long a connection may stay open before its first authenticated call. Without it a
/// client that connects and sends nothing, or completes the TLS handshake and then nothing,
/// held one of the `max_connections` slots for good, and 1024 of them locked every other
/// client out (review 13; hyper has no timeout for the HTTP/2 preface, and its keepalive
/// pings start only after it). Refused calls, health checks and reflection do not count:
/// one refused call per connection kept the slot too (review 14).
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// One open client connection's state, shared with the layer that sees its requests.
#[derive(Debug, Default)]
struct ConnState {
    requested: std::sync::atomic::AtomicBool,
    /// Its large answers still being handed over.
    answers: Arc<AnswerTrack>,
}

/// The open client connections by peer address (unique among open TCP connections), so
/// that the gate can mark a connection an authenticated call came on.
#[derive(Debug, Default)]
pub(crate) struct Connections {
    by_peer: parking_lot::Mutex<std::collections::HashMap<SocketAddr, Arc<ConnState>>>,
}

impl Connections {
    fn join(&self, peer: Option<SocketAddr>) -> Arc<ConnState> {
        let state = Arc::new(ConnState::default());
        if let Some(peer) = peer {
            self.by_peer.lock().insert(peer, Arc::clone(&state));
        }
        state
    }

    fn leave(&self, state: &Arc<ConnState>) {
        self.by_peer.lock().retain(|_, s| !Arc::ptr_eq(s, state));
    }

    /// `response`; a large answer (one that holds a share of the answer budget) is sent in
    /// chunks and registered with its connection's answers while it is handed over.
    fn send(
        &self,
        mut response: http::Response<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        let Some(hold) = response.extensions_mut().remove::<AnswerHold>() else {
            return response;
        };
        let track = hold.peer().and_then(|peer| {
            self.by_peer
                .lock()
                .get(&peer)
                .map(|state| Arc::clone(&state.answers))
        });
        response.map(|body| hold.wrap(body, track))
    }

    /// Marks the connection from `peer` as used by an authenticated caller (no first-request
    /// deadline any more).
    pub(crate) fn mark(&self, peer: SocketAddr) {
        if let Some(state) = self.by_peer.lock().get(&peer).cloned() {
            state
                .requested
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

/// Ends the client connections still open when a shutdown's grace period runs out: aborting
/// the serve task does not end hyper's per-connection tasks, which would go on serving.
#[derive(Default)]
struct Cutoff {
    cut: std::sync::atomic::AtomicBool,
    /// The wakers of the open connections (dropped ones are pruned as new ones come).
    wakers: parking_lot::Mutex<Vec<std::sync::Weak<futures::task::AtomicWaker>>>,
}

impl Cutoff {
    fn is_cut(&self) -> bool {
        self.cut.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A waker slot for a new connection.
    fn join(&self) -> Arc<futures::task::AtomicWaker> {
        let waker = Arc::new(futures::task::AtomicWaker::new());
        let mut wakers = self.wakers.lock();
        wakers.retain(|w| w.strong_count() > 0);
        wakers.push(Arc::downgrade(&waker));
        waker
    }

    /// Cuts every connection: their next read or write fails, and each is woken to see it.
    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Release);
        for waker in self
            .wakers
            .lock()
            .iter()
            .filter_map(std::sync::Weak::upgrade)
        {
            waker.wake();
        }
    }
}

impl Connected for Limited {
    type ConnectInfo = <TcpStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        // The TCP stream's own, so that TLS peer certificates and addresses are found as
        // without the limit.
        self.io.connect_info()
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How often at most the log says that the connection limit was reached.
const LIMIT_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Accepts a connection only while fewer than `max` are open (a TLS handshake in progress
/// counts): at the limit the next `accept` waits for a connection to close, and new clients
/// wait in the kernel's listen backlog meanwhile.
fn limit_connections(
    incoming: TcpIncoming,
    max: usize,
    cutoff: Arc<Cutoff>,
    connections: Arc<Connections>,
    first_request_timeout: Duration,
    stall_timeout: Duration,
) -> impl Stream<Item = std::io::Result<Limited>> {
    let slots = Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS)));
    let warned: Option<tokio::time::Instant> = None;
    futures::stream::unfold(
        (incoming, slots, warned),
        move |(mut incoming, slots, mut warned)| {
            let cutoff = Arc::clone(&cutoff);
            let connections = Arc::clone(&connections);
            async move {
                let slot = match Arc::clone(&slots).try_acquire_owned() {
                    Ok(slot) => slot,
                    Err(_) => {
                        if warned.is_none_or(|at| at.elapsed() >= LIMIT_WARNING_EVERY) {
                            tracing::warn!(
                                max_connections = max,
                                "connection limit reached: new connections wait until one closes"
                            );
                            warned = Some(tokio::time::Instant::now());
                        }
                        // Never closed, so this waits for a slot.
                        Arc::clone(&slots).acquire_owned().await.ok()?
                    }
                };
                let accepted = incoming.next().await?;
                let next = accepted.map(|io| {
                    let state = connections.join(io.peer_addr().ok());
                    Limited {
                        io,
                        _slot: slot,
                        waker: cutoff.join(),
                        cutoff: Arc::clone(&cutoff),
                        state,
                        connections,
                        first_request_by: Some(Box::pin(tokio::time::sleep(first_request_timeout))),
                        stall: None,
                        stall_timeout,
                    }
                });
                Some((next, (incoming, slots, warned)))
            }
        },
    )
}

/// Answers a request over the size limit with `RESOURCE_EXHAUSTED`, the code of every size
/// limit, naming the limit. tonic refuses a message over `max_decoding_message_size` while
/// decoding it, before any handler runs, with `OUT_OF_RANGE` ("decoded message length too
/// large"): that trailers-only answer is rewritten here. (Such a request never reaches a
/// handler; the authentication gate has seen it, and the decode guard records it for an
/// authenticated caller, as `RESOURCE_EXHAUSTED`.)
fn request_too_large_status(
    mut response: http::Response<tonic::body::Body>,
    limit: usize,
) -> http::Response<tonic::body::Body> {
    let headers = response.headers_mut();
    // OUT_OF_RANGE from tonic, or RESOURCE_EXHAUSTED once the decode guard has recorded it.
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|v| v == "11" || v == "8");
    let too_large = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| {
            m.contains("decoded%20message%20length%20too%20large")
                || m.contains("decoded message length too large")
        });
    if out_of_range && too_large {
        // tonic's message ends "the limit is: N bytes"; the services open without
        // credentials have their own, smaller limit.
        let open_limit = format!("the limit is: {OPEN_SERVICE_MAX_REQUEST_BYTES} bytes");
        let open_service = limit != OPEN_SERVICE_MAX_REQUEST_BYTES
            && headers
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .is_some_and(|m| {
                    m.contains(&open_limit) || m.contains(&open_limit.replace(' ', "%20"))
                });
        let status = tonic::Status::resource_exhausted(if open_service {
            format!(
                "request too large: a health or reflection request may hold at most {OPEN_SERVICE_MAX_REQUEST_BYTES} bytes"
            )
        } else {
            format!(
                "request too large: a request may hold at most {limit} bytes (max_request_bytes)"
            )
        });
        let replacement = status.into_http::<tonic::body::Body>();
        for name in ["grpc-status", "grpc-message"] {
            if let Some(value) = replacement.headers().get(name) {
                headers.insert(name, value.clone());
            }
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;
    use crate::keys::MasterKey;

    #[tokio::test]
    async fn request_bodies_share_one_budget_each_caller_at_most_half_and_give_it_back() {
        use http_body_util::BodyExt;
        let frames = |n: usize| {
            let chunks: Vec<Result<http_body::Frame<bytes::Bytes>, tonic::Status>> = (0..n)
                .map(|_| Ok(http_body::Frame::data(bytes::Bytes::from(vec![7u8; 1024]))))
                .collect();
            tonic::body::Body::new(http_body_util::StreamBody::new(futures::stream::iter(
                chunks,
            )))
        };
        let owned = |name: &str| {
            let owner = BodyOwner::default();
            owner.set(&Arc::from(name));
            owner
        };
        let drain = |mut body: tonic::body::Body| async move {
            while let Some(frame) = body.frame().await {
                frame?;
            }
            Ok::<_, tonic::Status>(body)
        };
        // 6 KiB in all, 3 KiB for each principal and for the anonymous calls together.
        let budget = BodyBudget::of_kib(6);
        let a = owned("payroll");
        let a1 = drain(budget.wrap(frames(2), a.clone()))
            .await
            .expect("within the budget");
        // Review 31: one principal cannot take more than its share, whatever is left.
        let mut a2 = budget.wrap(frames(2), a.clone());
        a2.frame()
            .await
            .expect("a frame")
            .expect("its share's last KiB");
        let refused = a2.frame().await.expect("a frame").expect_err("over");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("this caller's"), "{refused:?}");
        // Another principal still gets its own share, and the anonymous calls theirs…
        let b1 = drain(budget.wrap(frames(2), owned("recruitment-app")))
            .await
            .expect("its own share");
        let mut anonymous = budget.wrap(frames(2), BodyOwner::default());
        anonymous
            .frame()
            .await
            .expect("a frame")
            .expect("1 KiB left in all");
        // … until the whole budget is held.
        let refused = anonymous
            .frame()
            .await
            .expect("a frame")
            .expect_err("over the total");
        assert!(
            refused.message().contains("the server holds"),
            "{refused:?}"
        );
        // Dropped bodies give their bytes back.
        drop((a1, a2, b1, anonymous));
        drain(budget.wrap(frames(3), a))
            .await
            .expect("a whole share again");
        drain(budget.wrap(frames(3), BodyOwner::default()))
            .await
            .expect("the anonymous share");
        assert!(
            BodyBudget::for_requests(1)
                .0
                .budget
                .total()
                .available_permits()
                >= MIN_BODY_BUDGET / 1024
        );
    }
    use crate::store::{Batch, Keyspace, Store};
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_that_refuses_writes_makes_the_server_not_serving() {
        let dir = tempfile::tempdir().expect("tempdir");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let settings = crate::config::ephemeral(
            &dir.path().join("data"),
            master,
            crate::policy::Policy::default_policy(),
        );
        let running = start(settings).await.expect("start");
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", running.local_addr))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect");
        let mut health = HealthClient::new(channel);
        let status = |service: &str| HealthCheckRequest {
            service: service.into(),
        };
        let serving = health
            .check(status("kluis.v1.Records"))
            .await
            .expect("check")
            .into_inner()
            .status;
        assert_eq!(serving, ServingStatus::Serving as i32);
        running.vault.store().fail_next_log_write();
        let mut b = Batch::default();
        b.put(Keyspace::Records, b"r".to_vec(), b"1".to_vec());
        assert!(running.vault.store().commit(b).await.is_err());
        let mut states = Vec::new();
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            states = Vec::new();
            for service in ["", "kluis.v1.Records", "kluis.v1.Audit", "kluis.v1.Keys"] {
                let s = health
                    .check(status(service))
                    .await
                    .expect("check")
                    .into_inner()
                    .status;
                states.push(s);
            }
            if states
                .iter()
                .all(|&s| s == ServingStatus::NotServing as i32)
            {
                break;
            }
        }
        assert_eq!(states, vec![ServingStatus::NotServing as i32; 4]);
        let _ = running.shutdown().await;
    }
}

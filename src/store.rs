//! Storage: a small trait of keyspaces and atomic, conditional, durable batches, and its
//! embedded sled backend.
//!
//! The trait is shaped for a PostgreSQL backend too: a keyspace is a table `(key bytea primary
//! key, value bytea)`, a [`Batch`] is one transaction whose [`Expect`]s are checked on the
//! primary (`Value`: the whole bytes, under `SELECT … FOR UPDATE`; `Absent` with a `Put` of the
//! same key: an `INSERT` whose unique violation is the conflict; `Present` on a row the batch
//! does not write: `FOR SHARE`; see ARCHITECTURE.md, "Scale-out readiness"), and `commit`
//! returns once the transaction is committed (and so durable). The store only ever sees ciphertext, wrapped keys, MACs and clear metadata.
//!
//! # Durability of the sled backend
//!
//! sled 0.34's `flush()` ends in `sync_file_range`, which neither flushes the device's write
//! cache nor the file's metadata, and values above its blob threshold live in separate files it
//! never fsyncs. Calling it on every commit is also slow: it contends with concurrent writers.
//! [`SledStore`] therefore does not rely on it for acknowledged writes:
//! - writers queue their batches, and whichever writer finds the leader lock free leads
//!   (group commit, on the writer's own thread): it takes every batch queued so far and
//!   checks each batch's conditions in order, against sled and the
//!   writes it accepted before (so a conflicting batch is skipped and reported alone), and
//!   hands the group to the log writer, then checks the next group;
//! - the log writer takes every group waiting, links their accepted batches' audit events
//!   into the chain (in one block of events per sync), appends the batches' writes, the
//!   events and the new chain head to Kluis's own write-ahead log ([`crate::wal`]) as one
//!   frame, with one write and one `fdatasync`, and answers the accepted writers; then it
//!   hands the group to the applier thread, which applies it to sled in log order while the
//!   log writer syncs the next one. Readers wait until the applier has caught up with every
//!   answered write ([`SledStore::visible`]); conflicts are answered after the write they
//!   conflicted with is applied. A write is acknowledged once it is durable, so it
//!   survives power loss, not only `kill -9`, and sled never holds a write the log lacks (a
//!   failed log write has nothing to undo);
//! - writes reach sled as plain inserts and removes, not sled transactions: sled 0.34 rolls
//!   and writes its own log buffer, with `sync_file_range`, at every transaction, a disk write
//!   per group that the log makes useless. Scans take a shared lock that the applier holds
//!   exclusively while it applies a group, so a scan sees a group whole or not at all;
//! - at start-up the log is replayed over sled's recovered state. sled recovers a prefix of
//!   its own log (up to the last contiguous message), and the sequence number of the last
//!   batch applied is written after each group's writes, so replaying every logged frame
//!   above it restores what sled lost. Then sled is flushed and fsynced and the log starts
//!   afresh; every 64 MiB of log the log writer does the same (checkpoint). The log file is
//!   written ahead with zeros, so that most syncs overwrite blocks the file has;
//! - 2 MiB segments (blob threshold ≈ 512 KiB per logged page) and 16 KiB value chunks keep
//!   every sled page below the threshold, so sled's unsynced blob files are never used
//!   (`<dir>/blobs` stays empty; a test checks it).
//!
//! A failed log write or sync poisons the store: after an `fsync` error the page cache can no
//! longer be trusted, so every later write fails until restart (which replays the log).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::wal::LOG_EXTEND;
use crate::{audit, wal};

/// A keyspace: a separate ordered map of byte keys to byte values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Keyspace {
    /// Wrapped keys, key check value, format markers.
    Meta,
    /// One entry per record: its sealed header (metadata, wrapped DEKs, field digests, MAC).
    Records,
    /// Field ciphertext chunks, keyed by record, field, revision and chunk number.
    Fields,
    /// Blind-index entries: field, HMAC of the normalised value, record id → empty.
    Index,
    /// The audit chain: sequence number → event ([`crate::audit`]).
    Audit,
}

impl Keyspace {
    /// Every keyspace.
    pub const ALL: [Keyspace; 5] = [
        Keyspace::Meta,
        Keyspace::Records,
        Keyspace::Fields,
        Keyspace::Index,
        Keyspace::Audit,
    ];

    /// The keyspace's name (sled tree / SQL table).
    pub fn name(self) -> &'static str {
        match self {
            Keyspace::Meta => "meta",
            Keyspace::Records => "records",
            Keyspace::Fields => "fields",
            Keyspace::Index => "index",
            Keyspace::Audit => "audit",
        }
    }
}

/// A condition a batch checks before applying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must hold exactly this value.
    Value(Vec<u8>),
    /// The key must exist (any value).
    Present,
}

/// One write of a batch.
#[derive(Debug, Clone)]
pub enum Op {
    /// Sets `key` to `value` (a view that may share its buffer with other values, e.g. the
    /// chunks of one sealed field).
    Put(Keyspace, Vec<u8>, Bytes),
    /// Removes `key` (no error if absent).
    Delete(Keyspace, Vec<u8>),
}

/// Key–value pairs returned by [`Store::scan`], in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// A set of conditions and writes applied atomically: all or nothing.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Conditions, all checked before any write.
    pub expects: Vec<(Keyspace, Vec<u8>, Expect)>,
    /// Writes, in order.
    pub ops: Vec<Op>,
    /// Audit event bodies ([`crate::audit::Draft::encode`]) to append to the audit chain in
    /// the same transaction: the store gives each the next sequence number, a time and its
    /// chain hash, and moves the chain head.
    pub events: Vec<Vec<u8>>,
}

impl Batch {
    /// Adds a condition. Audit events and the chain head are the store's: no condition
    /// may name them (the store does not track them as pending writes).
    pub fn expect(&mut self, ks: Keyspace, key: Vec<u8>, expect: Expect) {
        debug_assert!(
            ks != Keyspace::Audit && !(ks == Keyspace::Meta && key == audit::META_HEAD),
            "conditions on audit events or the chain head are not supported"
        );
        self.expects.push((ks, key, expect));
    }

    /// Adds a put.
    pub fn put(&mut self, ks: Keyspace, key: Vec<u8>, value: impl Into<Bytes>) {
        self.ops.push(Op::Put(ks, key, value.into()));
    }

    /// Adds a delete.
    pub fn delete(&mut self, ks: Keyspace, key: Vec<u8>) {
        self.ops.push(Op::Delete(ks, key));
    }

    /// Adds an audit event (its encoded body).
    pub fn append_event(&mut self, body: Vec<u8>) {
        self.events.push(body);
    }

    /// Approximate size: keys, values and event bodies.
    pub fn bytes(&self) -> usize {
        ops_bytes(&self.ops, &self.events)
    }
}

/// The bytes of keys, values and event bodies in `ops` and `events`.
fn ops_bytes(ops: &[Op], events: &[Vec<u8>]) -> usize {
    ops.iter()
        .map(|op| match op {
            Op::Put(_, k, v) => k.len() + v.len(),
            Op::Delete(_, k) => k.len(),
        })
        .sum::<usize>()
        + events.iter().map(Vec::len).sum::<usize>()
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A batch's condition did not hold; nothing was written.
    #[error("a batch condition did not hold (concurrent change)")]
    Conflict,
    /// The storage engine or the file system failed.
    #[error("storage failure: {0}")]
    Io(String),
    /// A storage failure (at this write or an earlier one: a log write or sync, or applying
    /// logged writes to sled) made the store refuse writes until restart; the reason names
    /// the file and the operation.
    #[error("storage refuses writes until restart: {0}")]
    Poisoned(String),
}

/// A key–value store with atomic, conditional, durable batches.
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    fn get(
        &self,
        ks: Keyspace,
        key: &[u8],
    ) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;

    /// Reads up to `limit` entries whose key starts with `prefix`, in key order, starting
    /// after `after` when given.
    fn scan(
        &self,
        ks: Keyspace,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> impl Future<Output = Result<Entries, StoreError>> + Send;

    /// Applies `batch` atomically; returns only once it is durable.
    fn commit(&self, batch: Batch) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Whether no other process can use the store while this one has it open (sled locks
    /// its directory). Several instances share a store that is not exclusive.
    fn exclusive(&self) -> bool {
        false
    }
}

/// Segment size for sled: its blob threshold is a quarter of this, minus a header.
pub const SLED_SEGMENT_SIZE: usize = 2 * 1024 * 1024;
/// Log size after which a checkpoint flushes sled and starts a new log file.
pub const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
/// Meta key holding the sequence number of the last batch applied to sled.
const WAL_APPLIED: &[u8] = b"store/wal-applied";

/// How writes are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Concurrent writers share one log write + `fdatasync` (group commit). The default.
    #[default]
    GroupCommit,
    /// Every write runs its own log write + `fdatasync`, one after another. Only a baseline for
    /// the load benchmark; never faster.
    PerWrite,
}

/// The embedded sled backend with Kluis's write-ahead log.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<SledInner>,
}

/// Owns the commit queue and the log writer; dropping it stops and joins the log writer
/// (which joins the applier).
struct SledInner {
    shared: Arc<Shared>,
    /// Batches waiting for a leader.
    queue: Mutex<Vec<Pending>>,
    /// Held by the writer that leads: it checks and hands on every queued batch.
    leader: Mutex<Leader>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// The commit leader's state: no thread of its own, whichever writer holds the lock leads.
struct Leader {
    next_seq: u64,
    job_id: u64,
    /// To the log writer; `None` once the store is closing.
    to_writer: Option<std::sync::mpsc::Sender<SyncJob>>,
}

/// What the commit leader, the log writer and the readers share.
struct Shared {
    db: sled::Db,
    trees: [sled::Tree; 5],
    data_file: std::fs::File,
    dir: PathBuf,
    durability: Durability,
    /// Set after a failed write, sync or apply: the first failure's reason (later ones do not
    /// replace it, so the log's last lines still name the cause; review 28).
    poisoned: Mutex<Option<String>>,
    flushes: AtomicU64,
    /// Writes the leader has accepted but the log writer has not yet applied to sled (they
    /// are not durable yet, or being applied): what later batches' conditions must see.
    pending: Mutex<PendingWrites>,
    /// Held (write) while a group is applied to sled, (read) by every scan: a scan sees a
    /// group entirely or not at all, as a sled transaction would give. (A point read needs
    /// no lock: one key changes atomically.)
    apply: parking_lot::RwLock<()>,
    /// Sequence number of the last group whose writers were answered as soon as it was
    /// durable, before it was applied to sled (see [`SyncJob::answer_durable`]).
    answered: AtomicU64,
    /// The same for groups that hold writes besides audit events: what readers of the
    /// other keyspaces wait for.
    answered_writes: AtomicU64,
    /// The last sequence number applied to sled, for readers waiting for answered groups
    /// to reach sled (watched), and a copy for the check that needs no wait.
    applied: tokio::sync::watch::Sender<u64>,
    applied_seq: AtomicU64,
    /// Applying to sled failed: readers waiting for answered writes get an error.
    apply_failed: std::sync::atomic::AtomicBool,
    /// Test hook: the next log write fails.
    #[cfg(test)]
    fail_next_write: std::sync::atomic::AtomicBool,
    /// Test hook: held by a test to keep the applier from applying.
    #[cfg(test)]
    apply_gate: Mutex<()>,
    /// Test hook: the apply thread panics at its next group.
    #[cfg(test)]
    panic_next_apply: std::sync::atomic::AtomicBool,
    /// Test hook: applying the next group to sled fails.
    #[cfg(test)]
    fail_next_apply: std::sync::atomic::AtomicBool,
    /// Test hook: the next checkpoint's sync of sled's file fails.
    #[cfg(test)]
    fail_next_checkpoint_sync: std::sync::atomic::AtomicBool,
}

/// Accepted, not yet applied writes by key: the job that wrote the key last, and where in
/// that job's operations its write is.
type PendingWrites = std::collections::HashMap<(Keyspace, Vec<u8>), (u64, Arc<Vec<Op>>, usize)>;

/// Where a writer waits for its batch's outcome.
type Reply = tokio::sync::oneshot::Sender<Result<(), StoreError>>;

/// One group on its way from the leader to the log writer: the writes and audit events to
/// make durable (the log writer links the events into the chain and writes one frame for all
/// the jobs it syncs at once), then the answers (accepted writers once durable, conflicts
/// once applied), then the writes to apply to sled.
struct SyncJob {
    /// Leader-assigned number of the group (keys of `pending` written by it carry it).
    id: u64,
    /// The accepted batches' writes, in order (empty if no batch held).
    ops: Arc<Vec<Op>>,
    /// The accepted batches' audit event bodies, in order, not yet linked.
    events: Vec<Vec<u8>>,
    /// Sequence number of the job's last frame (0: none).
    last_seq: u64,
    replies: Vec<(Reply, Result<(), StoreError>)>,
    /// Every batch of the job holds audit events alone (no writes, no conditions): the
    /// audit events of reads.
    events_only: bool,
}

impl SyncJob {
    /// Answers the job's accepted writers now that its frame is durable, before the applier
    /// puts its writes into sled; readers wait for that ([`SledStore::visible`]). Writers
    /// answered `Conflict` stay for the applier, so that a retry reads the write it
    /// conflicted with (answers leave in log order).
    fn answer_durable(&mut self) {
        let mut later = Vec::new();
        for (reply, result) in self.replies.drain(..) {
            if result.is_ok() {
                // A writer that went away (cancelled request) needs no answer.
                let _ = reply.send(result);
            } else {
                later.push((reply, result));
            }
        }
        self.replies = later;
    }

    /// Answers every writer of the job with `f` applied to its result.
    fn answer(self, f: impl Fn(Result<(), StoreError>) -> Result<(), StoreError>) {
        for (reply, result) in self.replies {
            // A writer that went away (cancelled request) needs no answer.
            let _ = reply.send(f(result));
        }
    }
}

/// What the log writer hands the applier, in log order.
enum Durable {
    /// Jobs whose frame is durable, and the frame's event blocks and chain head.
    Group(Vec<SyncJob>, Vec<Op>),
    /// Log file `n` holds nothing that is not applied once the groups before this are.
    Checkpoint(u64),
}

/// A batch waiting for the commit leader.
struct Pending {
    batch: Batch,
    reply: Reply,
}

struct LogFile {
    file: std::fs::File,
    no: u64,
    /// Bytes of frames written (the file's cursor).
    len: u64,
    /// Bytes of the file written so far, frames then zeros ([`LOG_EXTEND`]).
    allocated: u64,
}

impl LogFile {
    fn new(file: std::fs::File, no: u64) -> LogFile {
        LogFile {
            file,
            no,
            len: 0,
            allocated: 0,
        }
    }

    /// Makes room for `more` bytes of frames: zeros are written ahead of the frames, a
    /// [`LOG_EXTEND`] at a time, so that the `fdatasync` of most groups overwrites blocks the
    /// file already has and has no file size or block map to flush as well (measured here:
    /// an append with `fdatasync` ~350 µs, an overwrite ~210 µs). The zeros reach the disk
    /// with the next group's sync; recovery reads zeros after the last frame as the end.
    fn reserve(&mut self, more: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let needed = self.len + more;
        if needed <= self.allocated {
            return Ok(());
        }
        let end = needed.div_ceil(LOG_EXTEND) * LOG_EXTEND + LOG_EXTEND;
        let zeros = vec![0u8; 1 << 16];
        let mut at = self.allocated.max(self.len);
        while at < end {
            let n = (end - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.allocated = end;
        Ok(())
    }
}

impl LogFile {
    /// After a failed write: zeroes whatever part of the failed frames reached the file, so
    /// that a later write-back cannot make the failed batches reappear at the next start,
    /// and keeps the file a multiple of [`LOG_EXTEND`] long, as every sync leaves it (only a
    /// file that something other than the writer cut back is shorter). The zeros are a hole
    /// punched in place (no data written, so neither a full disk nor a file size limit, the
    /// likely causes of the failure, stops it); where holes cannot be punched, the file is cut
    /// back to its frames and extended again.
    fn discard_after_frames(&mut self) {
        let before = self
            .file
            .metadata()
            .map_or(self.allocated, |m| m.len())
            .max(self.allocated);
        let punched = before <= self.len
            || rustix::fs::fallocate(
                &self.file,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                self.len,
                before - self.len,
            )
            .is_ok();
        if !punched {
            // Cut back to the frames, then out to the length it had (a multiple of
            // LOG_EXTEND, and at least one LOG_EXTEND past the first frame, as the writer
            // leaves every file; recovery checks both).
            let _ = self.file.set_len(self.len);
            let _ = self.file.set_len(before.div_ceil(LOG_EXTEND) * LOG_EXTEND);
        }
        let _ = self.file.sync_data();
        if let Ok(m) = self.file.metadata() {
            self.allocated = m.len();
        }
    }
}

/// Groups one writer leads before it hands the rest of the queue to a new task.
const MAX_LEAD_ROUNDS: usize = 8;
/// Most batches one group carries.
const MAX_GROUP: usize = 256;
/// Most bytes one group carries (a group is closed early when it grows past this).
const MAX_GROUP_BYTES: usize = 64 * 1024 * 1024;

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// For `map_err`: a failure of `op` on the file or directory `path`, named (review 25: every
/// start-up failure read "storage failure: Operation not permitted", whatever the file).
fn io_at<'a>(op: &'a str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |e| StoreError::Io(format!("{op} {}: {e}", path.display()))
}

/// For `map_err`: a failure of the embedded sled store in `dir` while `op`.
/// What to do when sled cannot recover its own files (after a power cut or a disk fault;
/// the write-ahead log holds only what came after the last checkpoint, so it cannot rebuild
/// them).
pub const SLED_UNRECOVERABLE: &str = "the store cannot be opened as it is (sled's failed recovery may already have rewritten its file): keep this directory for analysis, restore the newest backup of the data directory (README, \"Backups\"), and check it opens (`kluis audit verify --data-dir DIR`) before serving from it";

fn sled_at<'a>(op: &'a str, dir: &'a Path) -> impl FnOnce(sled::Error) -> StoreError + 'a {
    move |e| {
        StoreError::Io(format!(
            "{op} (sled store in {}): {e}",
            dir.join("db").display()
        ))
    }
}

impl SledStore {
    /// Before a read of `ks`: waits until every group already answered is applied to sled
    /// (writers are answered once their group is durable, see [`SyncJob::answer_durable`]),
    /// so that a reader sees every write whose writer has been answered. Groups of audit
    /// events alone hold nothing outside the audit trail (the `audit` keyspace, and `meta`,
    /// which holds its head), so reads of records, fields and index never wait for them.
    async fn visible(&self, ks: Keyspace) -> Result<(), StoreError> {
        let shared = &self.inner.shared;
        let need = if matches!(ks, Keyspace::Audit | Keyspace::Meta) {
            shared.answered.load(Ordering::Acquire)
        } else {
            shared.answered_writes.load(Ordering::Acquire)
        };
        if shared.applied_seq.load(Ordering::Acquire) >= need {
            return Ok(());
        }
        let mut applied = shared.applied.subscribe();
        // The sender lives as long as the store; an error cannot happen while `self` does.
        let _ = applied
            .wait_for(|&a| a >= need || shared.apply_failed.load(Ordering::Acquire))
            .await;
        if *applied.borrow() >= need {
            Ok(())
        } else {
            Err(StoreError::Poisoned(format!(
                "applying logged writes to the sled store {} failed; a restart replays them",
                shared.dir.join("db").display()
            )))
        }
    }

    /// Makes the next log write fail (tests of failing closed elsewhere in the crate).
    #[cfg(test)]
    pub(crate) fn fail_next_log_write(&self) {
        self.inner
            .shared
            .fail_next_write
            .store(true, Ordering::SeqCst);
    }

    /// Opens (creating if needed) a sled store in `dir`, with group commit.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        SledStore::open_with(dir, Durability::GroupCommit)
    }

    /// Opens (creating if needed) a sled store in `dir` with the given durability mode,
    /// replaying the write-ahead log over sled's recovered state.
    /// A log file found cut back refuses the open unless [`ACCEPT_WAL_CUT_ENV`] names it.
    pub fn open_with(dir: &Path, durability: Durability) -> Result<SledStore, StoreError> {
        SledStore::open_accepting(
            dir,
            durability,
            std::env::var_os(ACCEPT_WAL_CUT_ENV).as_deref(),
        )
    }

    /// [`SledStore::open_with`], with the name of a log file whose cut is accepted.
    fn open_accepting(
        dir: &Path,
        durability: Durability,
        accept_cut: Option<&std::ffi::OsStr>,
    ) -> Result<SledStore, StoreError> {
        claim_data_dir(dir)?;
        // A store of this process that was just dropped may still hold sled's file lock for a
        // moment (sled's background threads release it): retry briefly before reporting the
        // directory as in use.
        drop_unfinished_sled_snapshots(dir)
            .map_err(io_at("removing unfinished sled snapshots in", dir))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let db = loop {
            // sled 0.34 can panic while it recovers its own log after a power cut
            // ("tried to serialize Uninitialized": spacejam/sled#1387; review 31 saw it in
            // 1 of 25 simulated power cuts): an error naming the directory and the remedy,
            // not a panic with sled's backtrace.
            let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                sled::Config::new()
                    .path(dir)
                    .segment_size(SLED_SEGMENT_SIZE)
                    .cache_capacity(256 * 1024 * 1024)
                    .open()
            }))
            .map_err(|panic| {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                StoreError::Io(format!(
                    "opening (sled store in {}): sled failed while recovering its own log ({why}); {SLED_UNRECOVERABLE}",
                    dir.join("db").display()
                ))
            })?;
            match opened {
                Ok(db) => break db,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) if e.to_string().contains("could not acquire lock") => {
                    return Err(StoreError::Io(format!(
                        "the data directory {} is in use by another Kluis process (a running server, or an offline command): stop it first",
                        dir.display()
                    )))
                }
                Err(e @ sled::Error::Corruption { .. }) => {
                    return Err(StoreError::Io(format!(
                        "opening (sled store in {}): {e}; {SLED_UNRECOVERABLE}",
                        dir.join("db").display()
                    )))
                }
                Err(e) => return Err(sled_at("opening", dir)(e)),
            }
        };
        let tree = |ks: Keyspace| {
            db.open_tree(ks.name())
                .map_err(sled_at("opening a tree", dir))
        };
        let trees = [
            tree(Keyspace::Meta)?,
            tree(Keyspace::Records)?,
            tree(Keyspace::Fields)?,
            tree(Keyspace::Index)?,
            tree(Keyspace::Audit)?,
        ];
        let db_path = dir.join("db");
        let data_file = std::fs::File::open(&db_path).map_err(io_at("opening", &db_path))?;
        let wal_dir = wal::dir(dir);
        std::fs::create_dir_all(&wal_dir).map_err(io_at("creating the log directory", &wal_dir))?;

        // Replay the log over sled's recovered state.
        let applied = trees[Keyspace::Meta as usize]
            .get(WAL_APPLIED)
            .map_err(sled_at("reading the log position", dir))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        let files = wal::list(&wal_dir).map_err(io_at("listing the log directory", &wal_dir))?;
        let mut last = applied;
        // A log file that ends in a torn frame or was cut back: only the next frame, in a
        // later file, can show what its end held.
        let mut open_end: Option<OpenEnd> = None;
        for (_, path) in &files {
            let bytes = std::fs::read(path).map_err(io_at("reading the log file", path))?;
            let decoded = wal::decode_frames(&bytes, last);
            // A file without frames (the empty next file the writer makes at a rotation or a
            // start) shows nothing of what an earlier file's end held: that end stands.
            let has_frames = !decoded.frames.is_empty();
            if let Some(first) = decoded.frames.first() {
                if let Some(end) = open_end.take() {
                    end.followed_by(first.seq, last, path)?;
                }
            }
            for s in &decoded.skipped {
                tracing::warn!(
                    file = %path.display(),
                    at = s.at,
                    resumed_at = s.resumed_at,
                    batches_after = s.after,
                    next_batch = s.next,
                    applied = last,
                    "the write-ahead log is damaged from byte `at` to `resumed_at`, but the \
                     frame after the damage shows that every batch it can hold is applied \
                     already; skipped it. Check the disk"
                );
            }
            match decoded.end {
                wal::LogEnd::Corrupt {
                    at,
                    resumed_at,
                    known,
                    next,
                } => {
                    return Err(StoreError::Io(format!(
                        "write-ahead log {} is damaged at byte {at}: the next valid frame (at \
                         byte {resumed_at}) is batch {next}, and only batches up to {known} are \
                         held, so the damaged bytes can hold acknowledged writes (batches {} to \
                         {}) not yet applied; refusing to drop them. Keep a copy of the data \
                         directory, then restore the log file (or the data directory) from a \
                         backup",
                        path.display(),
                        known + 1,
                        next - 1,
                    )));
                }
                wal::LogEnd::Torn { at } if has_frames || open_end.is_none() => {
                    open_end = Some(OpenEnd {
                        path: path.clone(),
                        torn_at: Some(at),
                        cut: decoded.cut,
                    })
                }
                wal::LogEnd::Clean if has_frames || open_end.is_none() => {
                    open_end = decoded.cut.map(|cut| OpenEnd {
                        path: path.clone(),
                        torn_at: None,
                        cut: Some(cut),
                    })
                }
                wal::LogEnd::Torn { .. } | wal::LogEnd::Clean => {}
            }
            for frame in decoded.frames.into_iter().filter(|f| f.seq > applied) {
                // Logged frames hold their events already linked (as plain writes).
                apply_ops(&trees, &frame.ops, frame.seq)?;
                last = last.max(frame.seq);
            }
        }
        if let Some(end) = open_end {
            end.at_the_end(accept_cut)?;
        }
        if last > applied {
            tracing::info!(batches = last - applied, "replayed the write-ahead log");
        }
        // The head is written after its group's events (and logs of earlier versions hold one
        // frame per job of a group): if a crash left events past the stored head, move the
        // head to the last event.
        let recovering = "recovering the audit chain head";
        if let Some((_, value)) = trees[Keyspace::Audit as usize]
            .last()
            .map_err(sled_at(recovering, dir))?
        {
            let stored = trees[Keyspace::Meta as usize]
                .get(audit::META_HEAD)
                .map_err(sled_at(recovering, dir))?
                .and_then(|v| audit::Head::decode(&v))
                .unwrap_or_default();
            let last_event = audit::split_block(&value)
                .and_then(|events| events.last().and_then(|raw| audit::Event::parse(raw)));
            if let Some(e) = last_event.filter(|e| e.seq > stored.seq) {
                let head = audit::Head {
                    seq: e.seq,
                    time_ms: e.time_ms,
                    hash: e.hash,
                };
                trees[Keyspace::Meta as usize]
                    .insert(audit::META_HEAD, head.encode())
                    .map_err(sled_at(recovering, dir))?;
            }
        }
        // Make sled hold everything, then start a fresh log.
        db.flush().map_err(sled_at("flushing", dir))?;
        data_file.sync_all().map_err(io_at("syncing", &db_path))?;
        let conf_path = dir.join("conf");
        if let Ok(conf) = std::fs::File::open(&conf_path) {
            conf.sync_all().map_err(io_at("syncing", &conf_path))?;
        }
        let no = files.last().map_or(1, |(no, _)| no + 1);
        let file = create_log_file(&wal_dir, no)?;
        for (_, path) in &files {
            std::fs::remove_file(path).map_err(io_at("removing the replayed log file", path))?;
        }
        sync_dir(&wal_dir).map_err(io_at("syncing the log directory", &wal_dir))?;
        sync_dir(dir).map_err(io_at("syncing the data directory", dir))?;
        let shared = Arc::new(Shared {
            db,
            trees,
            data_file,
            dir: dir.to_path_buf(),
            durability,
            poisoned: Mutex::new(None),
            flushes: AtomicU64::new(0),
            pending: Mutex::new(PendingWrites::new()),
            apply: parking_lot::RwLock::new(()),
            answered: AtomicU64::new(0),
            answered_writes: AtomicU64::new(0),
            applied: tokio::sync::watch::Sender::new(last),
            applied_seq: AtomicU64::new(last),
            apply_failed: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            fail_next_write: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            apply_gate: Mutex::new(()),
            #[cfg(test)]
            panic_next_apply: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            fail_next_apply: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            fail_next_checkpoint_sync: std::sync::atomic::AtomicBool::new(false),
        });
        let head = match shared.trees[Keyspace::Meta as usize]
            .get(audit::META_HEAD)
            .map_err(io)?
        {
            None => audit::Head::default(),
            Some(v) => audit::Head::decode(&v)
                .ok_or_else(|| StoreError::Io("the audit chain head is malformed".into()))?,
        };
        let (to_writer, jobs) = std::sync::mpsc::channel::<SyncJob>();
        let writer_shared = Arc::clone(&shared);
        let log = LogFile::new(file, no);
        let writer = std::thread::Builder::new()
            .name("kluis-log".into())
            .spawn(move || writer_shared.write_log(jobs, log, head))
            .map_err(io)?;
        Ok(SledStore {
            inner: Arc::new(SledInner {
                shared,
                queue: Mutex::new(Vec::new()),
                leader: Mutex::new(Leader {
                    next_seq: last + 1,
                    job_id: 0,
                    to_writer: Some(to_writer),
                }),
                writer: Some(writer),
            }),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.shared.dir
    }

    /// How many log syncs have run; with concurrent writers this is lower than the number
    /// of commits.
    pub fn flush_count(&self) -> u64 {
        self.inner.shared.flushes.load(Ordering::Relaxed)
    }

    fn tree(&self, ks: Keyspace) -> &sled::Tree {
        &self.inner.shared.trees[ks as usize]
    }
}

/// Set to the name of a write-ahead log file that start-up found cut back (e.g.
/// `0000000000000007.wal`) to open the store anyway, accepting that acknowledged writes
/// logged after its readable frames are lost.
pub const ACCEPT_WAL_CUT_ENV: &str = "KLUIS_ACCEPT_WAL_CUT";

/// The end of a log file that start-up could not read to a clean end: a torn frame, or a
/// file shorter than any crash leaves it ([`wal::Cut`]).
struct OpenEnd {
    path: PathBuf,
    /// Where a torn (or damaged) frame starts.
    torn_at: Option<usize>,
    cut: Option<wal::Cut>,
}

impl OpenEnd {
    /// Where the readable frames end.
    fn at(&self) -> usize {
        self.torn_at
            .or(self.cut.map(|c| c.frames_end))
            .unwrap_or_default()
    }

    /// A later log file's first frame is batch `next`, with batches up to `held` applied or
    /// replayed. A new log file is started only after the last frame of the old one is
    /// synced, so this end is no crash: it is damage. Frames are numbered by their group's
    /// last batch, so what the end lost was below `next`; if that is all held, nothing is lost.
    fn followed_by(self, next: u64, held: u64, later: &Path) -> Result<(), StoreError> {
        if next <= held.saturating_add(1) {
            tracing::warn!(
                file = %self.path.display(),
                at = self.at(),
                cut_back = self.cut.is_some(),
                later_file = %later.display(),
                next_batch = next,
                applied = held,
                "a write-ahead log file ends in damage, but the next log file shows that every \
                 batch it can have held is applied already; continuing. Check the disk"
            );
            return Ok(());
        }
        Err(StoreError::Io(format!(
            "write-ahead log {} is damaged at byte {}{}: the next log file, {}, starts with \
             batch {next}, and only batches up to {held} are held, so acknowledged writes \
             (batches {} to {}) may be lost; refusing to drop them. Keep a copy of the data \
             directory, then restore the log file (or the data directory) from a backup",
            self.path.display(),
            self.at(),
            if self.cut.is_some() {
                " (the file was cut back)"
            } else {
                ""
            },
            later.display(),
            held + 1,
            next - 1,
        )))
    }

    /// The end of the last log file holding frames. A torn frame in a file as long as the
    /// log writer leaves it is a write cut short by a crash, never acknowledged; a file
    /// shorter than that was cut back by something else, and what it lost may have been
    /// acknowledged: opening is refused unless [`ACCEPT_WAL_CUT_ENV`] names the file.
    fn at_the_end(self, accept: Option<&std::ffi::OsStr>) -> Result<(), StoreError> {
        let Some(cut) = self.cut else {
            tracing::warn!(file = %self.path.display(), at = self.at(), "the write-ahead log ends in a torn frame (a write cut short by a crash, never acknowledged); replaying the frames before it");
            return Ok(());
        };
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let what =
            format!(
            "write-ahead log {} was cut back: it is {} bytes long, but the log writer leaves it \
             at least {} (a crash never shortens it); its readable frames end at byte {}{}. \
             Acknowledged writes logged after them, and their audit events, may be lost, and \
             the audit chain would then end early",
            self.path.display(),
            cut.len,
            cut.needed,
            cut.frames_end,
            if self.torn_at.is_some() { ", in a frame cut short" } else { "" },
        );
        if accept.is_some_and(|v| !name.is_empty() && v.to_string_lossy() == name) {
            tracing::error!(
                file = %self.path.display(),
                len = cut.len,
                frames_end = cut.frames_end,
                "{what}; starting anyway, as {ACCEPT_WAL_CUT_ENV}={name} says"
            );
            return Ok(());
        }
        Err(StoreError::Io(format!(
            "{what}. Refusing to start: keep a copy of the data directory; if a backup or \
             snapshot holds this file whole, put it back. To start anyway, accepting the loss, \
             set {ACCEPT_WAL_CUT_ENV}={name}"
        )))
    }
}

fn create_log_file(wal_dir: &Path, no: u64) -> Result<std::fs::File, StoreError> {
    let path = wal::file_path(wal_dir, no);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_at("creating the log file", &path))?;
    if let Err(e) = sync_dir(wal_dir) {
        // Not used: removed, so that the next rotation can create it again (an empty file
        // left behind is harmless at start-up too).
        drop(file);
        let _ = std::fs::remove_file(&path);
        return Err(io_at("syncing the log directory", wal_dir)(e));
    }
    Ok(file)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Drop for SledInner {
    fn drop(&mut self) {
        // Closing the channel ends the log writer's loop (and the applier's); wait for them
        // so that the data dir is released.
        self.leader.lock().to_writer = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The commit leader: takes every batch queued so far (group commit), has each group
/// checked ([`Shared::accept`]: conditions in order against sled and the writes accepted
/// before, audit events linked into the chain) and hands it to the log writer, which makes
/// it durable and only then has it applied to sled; the next group is checked while the
/// writer syncs (a pipeline). In per-write mode every group is a single batch with its own
/// sync. Nothing reaches sled before it is durable in the log, so a failed log write has
/// nothing to undo: it poisons the store and its writers (and those of every later group)
/// get the error.
///
/// The leader is no thread: whichever writer finds the leader lock free leads, on its own
/// thread. A writer that finds the lock held leaves its batch to the holder, which looks at
/// the queue again after letting go of the lock. (A hand-over to a leader thread cost
/// ~0.35 ms of every commit under load on a 2-core VM: the woken thread waited for a core.)
/// After [`MAX_LEAD_ROUNDS`] groups a writer hands what is still queued to a new task, so
/// that no request leads for others for long.
fn lead(inner: &Arc<SledInner>) {
    let shared = &*inner.shared;
    let mut rounds = 0;
    loop {
        let Some(mut state) = inner.leader.try_lock() else {
            return;
        };
        loop {
            let group: Vec<Pending> = {
                let mut queued = inner.queue.lock();
                if queued.is_empty() {
                    break;
                }
                if rounds >= MAX_LEAD_ROUNDS {
                    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                        drop(queued);
                        drop(state);
                        let inner = Arc::clone(inner);
                        runtime.spawn(async move { lead(&inner) });
                        return;
                    }
                }
                rounds += 1;
                if shared.durability == Durability::PerWrite {
                    vec![queued.remove(0)]
                } else {
                    let mut bytes = 0;
                    let take = queued
                        .iter()
                        .take_while(|p| {
                            let fits = bytes < MAX_GROUP_BYTES;
                            bytes += p.batch.bytes();
                            fits
                        })
                        .take(MAX_GROUP)
                        .count()
                        .max(1);
                    queued.drain(..take).collect()
                }
            };
            let Leader {
                next_seq,
                job_id,
                to_writer,
            } = &mut *state;
            *job_id += 1;
            let job = shared.accept(*job_id, next_seq, group);
            let sent = match to_writer {
                Some(tx) => tx.send(job).map_err(|e| e.0),
                None => Err(job),
            };
            if let Err(job) = sent {
                let reason = "the log writer stopped".to_string();
                shared.poisoned.lock().get_or_insert(reason.clone());
                shared.forget(&job);
                job.answer(|_| Err(StoreError::Poisoned(reason.clone())));
            }
        }
        drop(state);
        // A batch queued while this writer still held the lock: lead again.
        if inner.queue.lock().is_empty() {
            return;
        }
    }
}

impl Shared {
    fn check_poisoned(&self) -> Result<(), StoreError> {
        match &*self.poisoned.lock() {
            Some(reason) => Err(StoreError::Poisoned(reason.clone())),
            None => Ok(()),
        }
    }

    /// Checks a group's batches in order and gives each that holds its sequence number; their
    /// writes become pending (seen by the conditions of later batches) until applied.
    fn accept(&self, id: u64, next_seq: &mut u64, group: Vec<Pending>) -> SyncJob {
        let mut job = SyncJob {
            id,
            ops: Arc::new(Vec::new()),
            events: Vec::new(),
            last_seq: 0,
            replies: Vec::with_capacity(group.len()),
            events_only: group
                .iter()
                .all(|p| p.batch.ops.is_empty() && p.batch.expects.is_empty()),
        };
        if let Err(e) = self.check_poisoned() {
            job.replies = group
                .into_iter()
                .map(|p| (p.reply, Err(StoreError::Poisoned(e.to_string()))))
                .collect();
            return job;
        }
        let mut ops: Vec<Op> = Vec::new();
        // This group's writes so far, by key: the index of the last write in `ops`.
        let mut mine: std::collections::HashMap<(Keyspace, Vec<u8>), usize> =
            std::collections::HashMap::new();
        let mut pending = self.pending.lock();
        let batches = group.len();
        for (n, p) in group.into_iter().enumerate() {
            let holds = p
                .batch
                .expects
                .iter()
                .try_fold(true, |holds, (ks, key, expect)| {
                    if !holds {
                        return Ok(false);
                    }
                    let slot = (*ks, key.clone());
                    let mine_op = mine.get(&slot).map(|&i| &ops[i]);
                    let pending_op = || pending.get(&slot).map(|(_, job_ops, i)| &job_ops[*i]);
                    let current: Option<Option<&[u8]>> =
                        mine_op.or_else(pending_op).map(|op| match op {
                            Op::Put(_, _, v) => Some(&v[..]),
                            Op::Delete(..) => None,
                        });
                    let stored;
                    let current = match current {
                        Some(c) => c,
                        None => {
                            stored = self.trees[*ks as usize].get(key).map_err(io)?;
                            stored.as_deref()
                        }
                    };
                    Ok::<_, StoreError>(match expect {
                        Expect::Absent => current.is_none(),
                        Expect::Value(v) => current == Some(v.as_slice()),
                        Expect::Present => current.is_some(),
                    })
                });
            match holds {
                Err(e) => job.replies.push((p.reply, Err(e))),
                Ok(false) => job.replies.push((p.reply, Err(StoreError::Conflict))),
                Ok(true) => {
                    job.events.extend(p.batch.events);
                    let start = ops.len();
                    ops.extend(p.batch.ops);
                    // Only later batches of this group look here.
                    if n + 1 < batches {
                        for (i, op) in ops.iter().enumerate().skip(start) {
                            let (ks, key) = op_key(op);
                            mine.insert((ks, key.to_vec()), i);
                        }
                    }
                    job.last_seq = *next_seq;
                    *next_seq += 1;
                    job.replies.push((p.reply, Ok(())));
                }
            }
        }
        let ops = Arc::new(ops);
        for (i, op) in ops.iter().enumerate() {
            let (ks, key) = op_key(op);
            pending.insert((ks, key.to_vec()), (id, Arc::clone(&ops), i));
        }
        job.ops = ops;
        job
    }

    /// Drops a job's pending writes (those no later job overwrote).
    fn forget(&self, job: &SyncJob) {
        if job.ops.is_empty() {
            return;
        }
        let mut pending = self.pending.lock();
        for op in job.ops.iter() {
            let (ks, key) = op_key(op);
            let slot = (ks, key.to_vec());
            if pending.get(&slot).is_some_and(|(id, _, _)| *id == job.id) {
                pending.remove(&slot);
            }
        }
    }

    /// The log writer: takes every job queued so far, links their audit events into the chain
    /// after `head` (in blocks), appends one frame with the jobs' writes, the blocks and the
    /// new head, syncs once, answers the accepted writers and hands the group to the applier
    /// (which applies it to sled and answers conflicts); starts a new log file every
    /// `CHECKPOINT_BYTES` (the applier checkpoints the old one).
    ///
    /// Linking here rather than in the leader makes one event block (one sled insert) per
    /// sync instead of one per job: the audit event of a read is a job of its own.
    fn write_log(
        self: Arc<Self>,
        jobs: std::sync::mpsc::Receiver<SyncJob>,
        mut log: LogFile,
        mut head: audit::Head,
    ) {
        let (to_applier, durable) = std::sync::mpsc::sync_channel::<Durable>(4);
        let applier_shared = Arc::clone(&self);
        let applier = std::thread::Builder::new()
            .name("kluis-apply".into())
            .spawn(move || applier_shared.apply_durable(durable));
        let Ok(applier) = applier else {
            let reason = "could not start the apply thread".to_string();
            self.poisoned.lock().get_or_insert(reason.clone());
            while let Ok(job) = jobs.recv() {
                self.fail(vec![job], &reason);
            }
            return;
        };
        // A job left over from the last frame, which it would have made too large.
        let mut carried: Option<SyncJob> = None;
        while let Some(first) = carried.take().or_else(|| jobs.recv().ok()) {
            let mut bytes = ops_bytes(&first.ops, &first.events);
            let mut group = vec![first];
            if self.durability == Durability::GroupCommit {
                // Groups the leader accepted while the last sync ran share this one, up to
                // MAX_GROUP_BYTES a frame (frames hold at most 4 GiB; a job alone stays
                // below, being one leader group).
                while let Ok(more) = jobs.try_recv() {
                    let more_bytes = ops_bytes(&more.ops, &more.events);
                    if bytes + more_bytes > MAX_GROUP_BYTES {
                        carried = Some(more);
                        break;
                    }
                    bytes += more_bytes;
                    group.push(more);
                }
            }
            // A group of conflicts and refusals only has nothing to write, but still goes
            // through the applier: answers leave in log order, so a writer that retries after
            // a conflict sees the write it conflicted with.
            // The group's events in blocks, then the new head: no batch conditions on them
            // (they are new keys, and the head is this thread's; `Batch::expect`).
            let mut chain_ops: Vec<Op> = Vec::new();
            let last_seq = group.iter().map(|j| j.last_seq).max().unwrap_or(0);
            if last_seq > 0 {
                if let Err(e) = self.check_poisoned() {
                    // An earlier job failed: nothing of these reached sled; refuse them.
                    self.fail(group, &e.to_string());
                    continue;
                }
                let head_before = head;
                let mut blocks = audit::EventBlocks::default();
                let now = audit::now_ms();
                for job in &mut group {
                    blocks.link(&mut head, now, &std::mem::take(&mut job.events));
                }
                blocks.into_ops(&mut chain_ops);
                if head != head_before {
                    chain_ops.push(Op::Put(
                        Keyspace::Meta,
                        audit::META_HEAD.to_vec(),
                        head.encode().into(),
                    ));
                }
                // One frame for the group: its batches and events are durable, replayed or
                // lost together (a block holds the events of several batches).
                let mut frame = Vec::new();
                wal::encode_frame(
                    &mut frame,
                    last_seq,
                    group.iter().flat_map(|j| j.ops.iter()).chain(&chain_ops),
                );
                let frames_len = frame.len();
                // Which operation failed goes into the reason, with the file.
                let written = (|| {
                    #[cfg(test)]
                    if self.fail_next_write.swap(false, Ordering::SeqCst) {
                        use std::io::Write;
                        let _ = log.file.write_all(&frame[..frame.len() / 2]);
                        return Err((
                            "writing",
                            std::io::Error::other("injected log write failure"),
                        ));
                    }
                    log.reserve(frames_len as u64)
                        .map_err(|e| ("extending", e))?;
                    std::io::Write::write_all(&mut log.file, &frame).map_err(|e| ("writing", e))?;
                    log.file.sync_data().map_err(|e| ("syncing", e))
                })();
                self.flushes.fetch_add(1, Ordering::Relaxed);
                if let Err((op, e)) = written {
                    log.discard_after_frames();
                    {
                        use std::io::Seek;
                        let _ = log.file.seek(std::io::SeekFrom::Start(log.len));
                    }
                    // The events are not in the chain.
                    head = head_before;
                    let file = wal::file_path(&wal::dir(&self.dir), log.no);
                    let reason = format!("{op} the write-ahead log {}: {e}", file.display());
                    tracing::error!(error = %reason, "write-ahead log write failed; the store refuses writes until restart");
                    self.poisoned.lock().get_or_insert(reason.clone());
                    self.fail(group, &reason);
                    continue;
                }
                log.len += frames_len as u64;
                // Durable: the accepted writers are answered now, before their writes are
                // applied; readers wait for the applier instead (`SledStore::visible`).
                for job in group.iter_mut().filter(|j| j.last_seq > 0) {
                    self.answered.fetch_max(job.last_seq, Ordering::AcqRel);
                    if !job.events_only {
                        self.answered_writes
                            .fetch_max(job.last_seq, Ordering::AcqRel);
                    }
                    job.answer_durable();
                }
            }
            // Durable: the applier applies the group to sled and answers its writers while
            // this thread syncs the next one.
            if let Err(std::sync::mpsc::SendError(Durable::Group(group, _))) =
                to_applier.send(Durable::Group(group, chain_ops))
            {
                let reason = "the apply thread stopped".to_string();
                self.poisoned.lock().get_or_insert(reason.clone());
                self.fail(group, &reason);
            }
            if log.len > CHECKPOINT_BYTES {
                // Start a new log file; the applier makes sled durable and deletes the old
                // one once it has applied everything before it.
                let wal_dir = wal::dir(&self.dir);
                match create_log_file(&wal_dir, log.no + 1) {
                    Ok(file) => {
                        let old = log.no;
                        log = LogFile::new(file, old + 1);
                        let _ = to_applier.send(Durable::Checkpoint(old));
                    }
                    // The log file grows on; nothing is lost.
                    Err(e) => tracing::error!(error = %e, "starting a new log file failed"),
                }
            }
        }
        drop(to_applier);
        let _ = applier.join();
    }

    /// The applier: applies durable groups to sled in log order (readers see each job
    /// whole), drops their pending writes, answers their writers; and runs checkpoints.
    fn apply_durable(&self, durable: std::sync::mpsc::Receiver<Durable>) {
        // Should this thread panic (inside sled, say), readers waiting for it get an error
        // instead of waiting forever, and the store refuses writes, as after a failed apply.
        struct OnPanic<'a>(&'a Shared);
        impl Drop for OnPanic<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0
                        .poisoned
                        .lock()
                        .get_or_insert("the apply thread stopped".into());
                    self.0.apply_failed.store(true, Ordering::Release);
                    self.0.applied.send_modify(|_| {});
                }
            }
        }
        let _on_panic = OnPanic(self);
        let mut broken: Option<String> = None;
        while let Ok(next) = durable.recv() {
            match next {
                Durable::Group(group, chain_ops) => {
                    if let Some(reason) = &broken {
                        self.fail(group, reason);
                        continue;
                    }
                    #[cfg(test)]
                    drop(self.apply_gate.lock());
                    #[cfg(test)]
                    if self.panic_next_apply.swap(false, Ordering::SeqCst) {
                        panic!("injected apply thread panic");
                    }
                    let applied = {
                        let _apply = self.apply.write();
                        #[cfg(test)]
                        if self.fail_next_apply.swap(false, Ordering::SeqCst) {
                            Err(StoreError::Io("injected apply failure".into()))
                        } else {
                            apply_group(&self.trees, &group, &chain_ops)
                        }
                        #[cfg(not(test))]
                        apply_group(&self.trees, &group, &chain_ops)
                    };
                    match applied {
                        Ok(()) => {
                            let last = group.iter().map(|j| j.last_seq).max().unwrap_or(0);
                            self.applied_seq.fetch_max(last, Ordering::AcqRel);
                            self.applied.send_if_modified(|a| {
                                let later = last > *a;
                                *a = (*a).max(last);
                                later
                            });
                            for job in group {
                                self.forget(&job);
                                job.answer(|r| r);
                            }
                        }
                        Err(e) => {
                            // The log holds these groups: the next start replays them.
                            // Until then sled may lack them, so refuse every later write.
                            // Named with the database and the operation: the log write and
                            // sync had succeeded (review 27).
                            let reason = format!(
                                "applying logged writes to the sled store {} failed (they are in the write-ahead log: a restart replays them): {e}",
                                self.dir.join("db").display()
                            );
                            tracing::error!(error = %reason, "applying to sled failed; the store refuses writes until restart");
                            self.poisoned.lock().get_or_insert(reason.clone());
                            self.fail(group, &reason);
                            // Readers waiting for answered writes must not wait forever: they
                            // get an error (the log holds those writes for the next start).
                            self.apply_failed.store(true, Ordering::Release);
                            self.applied.send_modify(|_| {});
                            broken = Some(reason);
                        }
                    }
                }
                Durable::Checkpoint(old) if broken.is_none() => match self.checkpoint(old) {
                    Ok(()) => {}
                    Err(Checkpoint::NotDurable(e)) => {
                        // After a failed flush or `fdatasync` the kernel may have dropped
                        // sled's dirty pages and marked them clean: a later sync would
                        // "succeed" without them. So no log file may be deleted again in
                        // this process (the logs hold every write since the last good
                        // checkpoint; the next start replays them), and the store refuses
                        // writes, as after a failed log sync.
                        let reason =
                            format!("making sled's file durable failed at a checkpoint: {e}");
                        tracing::error!(error = %e, "checkpoint sync failed; the store refuses writes until restart");
                        self.poisoned.lock().get_or_insert(reason.clone());
                        self.apply_failed.store(true, Ordering::Release);
                        self.applied.send_modify(|_| {});
                        broken = Some(reason);
                    }
                    // sled is durable; the old log file merely stays (it is skipped at
                    // the next start: every frame in it is applied).
                    Err(Checkpoint::Cleanup(e)) => {
                        tracing::error!(error = %e, "removing an old log file failed");
                    }
                },
                Durable::Checkpoint(_) => {}
            }
        }
    }

    /// Answers every accepted writer of `group` with the poisoning reason (their writes
    /// never reached sled) and drops their pending writes.
    fn fail(&self, group: Vec<SyncJob>, reason: &str) {
        for job in group {
            self.forget(&job);
            job.answer(|r| r.and(Err(StoreError::Poisoned(reason.to_string()))));
        }
    }

    /// Makes sled durable and deletes the log file `old` (every batch in it is applied to
    /// sled when this runs): one sled flush per `CHECKPOINT_BYTES` of log.
    fn checkpoint(&self, old: u64) -> Result<(), Checkpoint> {
        let wal_dir = wal::dir(&self.dir);
        let db_path = self.dir.join("db");
        self.db.flush().map_err(|e| {
            Checkpoint::NotDurable(format!(
                "flushing the sled store {}: {e}",
                db_path.display()
            ))
        })?;
        #[cfg(test)]
        if self.fail_next_checkpoint_sync.swap(false, Ordering::SeqCst) {
            return Err(Checkpoint::NotDurable("injected fdatasync error".into()));
        }
        self.data_file
            .sync_data()
            .map_err(|e| Checkpoint::NotDurable(format!("syncing {}: {e}", db_path.display())))?;
        let path = wal::file_path(&wal_dir, old);
        std::fs::remove_file(&path)
            .map_err(|e| format!("removing the log file {}: {e}", path.display()))
            .and_then(|()| {
                sync_dir(&wal_dir)
                    .map_err(|e| format!("syncing the log directory {}: {e}", wal_dir.display()))
            })
            .map_err(Checkpoint::Cleanup)
    }
}

/// How a checkpoint failed.
enum Checkpoint {
    /// sled's file could not be made durable: fatal for this process.
    NotDurable(String),
    /// The old log file could not be removed: harmless.
    Cleanup(String),
}

/// The keyspace and key an operation writes.
fn op_key(op: &Op) -> (Keyspace, &[u8]) {
    match op {
        Op::Put(ks, key, _) | Op::Delete(ks, key) => (*ks, key.as_slice()),
    }
}

/// Applies a durable group to sled in log order: its jobs' writes, then its event blocks and
/// chain head (`chain_ops`), then records the group's last batch as applied.
fn apply_group(
    trees: &[sled::Tree; 5],
    group: &[SyncJob],
    chain_ops: &[Op],
) -> Result<(), StoreError> {
    for job in group {
        insert_ops(trees, &job.ops)?;
    }
    insert_ops(trees, chain_ops)?;
    let last = group.iter().map(|job| job.last_seq).max().unwrap_or(0);
    if last > 0 {
        trees[Keyspace::Meta as usize]
            .insert(WAL_APPLIED, &last.to_be_bytes())
            .map_err(io)?;
    }
    Ok(())
}

/// Applies durable writes to sled with plain inserts and removes, in order, then records
/// `seq` as the last batch applied. No sled transaction: sled rolls and writes its own
/// log buffer (with `sync_file_range`) at every transaction, which costs a disk write per
/// group for nothing, since the write-ahead log already holds the group. sled recovers a
/// prefix of its log, so after a crash it holds every write up to some point of this
/// sequence, and the replay from `WAL_APPLIED` (written last) redoes the rest.
fn apply_ops(trees: &[sled::Tree; 5], ops: &[Op], seq: u64) -> Result<(), StoreError> {
    insert_ops(trees, ops)?;
    trees[Keyspace::Meta as usize]
        .insert(WAL_APPLIED, &seq.to_be_bytes())
        .map_err(io)?;
    Ok(())
}

/// Makes `dir` the store's directory, mode 0700 (no one else may list or enter it). A missing
/// one is created. An existing one must hold a store already, or be empty (apart from a file
/// system's `lost+found`): a mistyped path naming a shared directory (`/tmp`, `/var`) is
/// refused, not taken over and closed to everyone else (review 13).
fn claim_data_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let set_private = || {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
            StoreError::Io(format!(
                "setting the data directory {} to mode 0700: {e}",
                dir.display()
            ))
        })
    };
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::keys::create_dir_durable(dir).map_err(io)?;
            return set_private();
        }
        Err(e) => {
            return Err(StoreError::Io(format!(
                "the data directory {}: {e}",
                dir.display()
            )))
        }
    };
    if !meta.is_dir() {
        return Err(StoreError::Io(format!(
            "the data directory {} is not a directory",
            dir.display()
        )));
    }
    // A store: sled's `db` and `conf` files, as files (a shared directory with a `conf`
    // directory in it is not one; review 14).
    let holds_store = ["db", "conf"].iter().all(|name| {
        std::fs::symlink_metadata(dir.join(name)).is_ok_and(|m| m.file_type().is_file())
    });
    let names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| StoreError::Io(format!("listing the data directory {}: {e}", dir.display())))?
        .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| {
            StoreError::Io(format!("listing the data directory {}: {e}", dir.display()))
        })?;
    let empty = names.iter().all(|n| n == "lost+found");
    if !holds_store && !empty {
        let mut shown: Vec<&str> = names.iter().map(String::as_str).collect();
        shown.sort_unstable();
        shown.truncate(3);
        return Err(StoreError::Io(format!(
            "the data directory {} holds other files ({} {}, e.g. {}) and no Kluis store: refusing to take it over (it would be made private, mode 0700); name a new or empty directory",
            dir.display(),
            names.len(),
            if names.len() == 1 { "entry" } else { "entries" },
            shown.join(", ")
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode != 0o700 {
        if holds_store {
            tracing::warn!(data_dir = %dir.display(), mode = format!("{mode:o}"), "the data directory was open to others: set to mode 0700");
        }
        set_private()?;
    }
    Ok(())
}

/// Removes sled's unfinished snapshot files from `dir`, unless another process holds the
/// store. sled 0.34 writes a snapshot as `snap.<lsn>.generating` and renames it when whole,
/// but on open it takes the newest `snap.*` file, `.generating` ones included: one cut short
/// by a crash (`kill -9` while sled wrote it) made every later open fail with "Read
/// corrupted data". Without it sled recovers from its previous snapshot and its log, which it
/// keeps until a snapshot is renamed into place.
fn drop_unfinished_sled_snapshots(dir: &Path) -> std::io::Result<()> {
    let lock_path = dir.join("db");
    let Ok(lock) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&lock_path)
    else {
        // A new store: nothing to clean.
        return Ok(());
    };
    // sled holds this lock while a store is open: a running server's snapshot in progress is
    // its own, and left alone (sled's own open then reports the store in use).
    if lock.try_lock().is_err() {
        return Ok(());
    }
    let mut removed = false;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %name, "removing sled's unfinished snapshot (left by a crash)");
            std::fs::remove_file(entry.path())?;
            removed = true;
        }
    }
    if removed {
        std::fs::File::open(dir)?.sync_all()?;
    }
    drop(lock);
    Ok(())
}

/// Puts and removes, in order.
fn insert_ops(trees: &[sled::Tree; 5], ops: &[Op]) -> Result<(), StoreError> {
    for op in ops {
        match op {
            Op::Put(ks, key, value) => {
                trees[*ks as usize]
                    .insert(key.as_slice(), &value[..])
                    .map_err(io)?;
            }
            Op::Delete(ks, key) => {
                trees[*ks as usize].remove(key.as_slice()).map_err(io)?;
            }
        }
    }
    Ok(())
}

impl SledStore {
    /// Why the store refuses writes (a failed log or checkpoint sync, a failed apply), if it
    /// does: until a restart replays the log, every write fails.
    pub fn poisoned(&self) -> Option<String> {
        self.inner.shared.poisoned.lock().clone()
    }
}

impl Store for SledStore {
    fn exclusive(&self) -> bool {
        // sled holds an exclusive lock on its directory.
        true
    }

    async fn get(&self, ks: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.visible(ks).await?;
        // No `apply` lock: one key is read atomically anyway, and sled holds only durable
        // writes. A caller that reads several keys one by one re-checks what it read first
        // (a record's chunks are checked against its header, which is read again).
        Ok(self.tree(ks).get(key).map_err(io)?.map(|v| v.to_vec()))
    }

    async fn scan(
        &self,
        ks: Keyspace,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Entries, StoreError> {
        use std::ops::Bound;
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a.to_vec()),
            _ => Bound::Included(prefix.to_vec()),
        };
        self.visible(ks).await?;
        let mut out = Vec::new();
        let _whole_groups = self.inner.shared.apply.read();
        for item in self.tree(ks).range((start, Bound::Unbounded)) {
            let (k, v) = item.map_err(io)?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Queues the batch for the commit leader and waits for its answer: applied and durable,
    /// or a conflict (nothing written).
    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        self.inner.shared.check_poisoned()?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.inner.queue.lock().push(Pending { batch, reply });
        lead(&self.inner);
        answer
            .await
            .map_err(|_| StoreError::Io("the commit leader stopped".into()))?
    }
}

/// Test stores for the crate's unit tests: a sled store whose scans and commits pass through
/// hooks first (to force interleavings of several "instances" in one process).
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// What a [`Hooked`] store does before its scans and instead of its commits.
    pub(crate) trait Hooks: Send + Sync + 'static {
        /// Runs before a scan of `prefix`.
        fn before_scan(
            &self,
            _store: &SledStore,
            _prefix: &[u8],
        ) -> impl Future<Output = Result<(), StoreError>> + Send {
            async { Ok(()) }
        }

        /// Commits `batch` to `store` (at once, unless a test holds it).
        fn commit(
            &self,
            store: &SledStore,
            batch: Batch,
        ) -> impl Future<Output = Result<(), StoreError>> + Send {
            store.commit(batch)
        }
    }

    /// A sled store behind test hooks; derefs to the hooks, for the test to drive them.
    pub(crate) struct Hooked<H> {
        inner: SledStore,
        hooks: Arc<H>,
    }

    impl<H> Clone for Hooked<H> {
        fn clone(&self) -> Self {
            Self {
                inner: self.inner.clone(),
                hooks: Arc::clone(&self.hooks),
            }
        }
    }

    impl<H> std::ops::Deref for Hooked<H> {
        type Target = H;

        fn deref(&self) -> &H {
            &self.hooks
        }
    }

    impl<H: Hooks> Hooked<H> {
        /// `inner` behind `hooks`.
        pub(crate) fn new(inner: SledStore, hooks: H) -> Self {
            Self {
                inner,
                hooks: Arc::new(hooks),
            }
        }
    }

    impl<H: Hooks> Store for Hooked<H> {
        async fn get(&self, ks: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(ks, key).await
        }

        async fn scan(
            &self,
            ks: Keyspace,
            prefix: &[u8],
            after: Option<&[u8]>,
            limit: usize,
        ) -> Result<Entries, StoreError> {
            self.hooks.before_scan(&self.inner, prefix).await?;
            self.inner.scan(ks, prefix, after, limit).await
        }

        async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
            self.hooks.commit(&self.inner, batch).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A start that fails on a file names the file and what was done to it (review 25: every
    /// such failure read "storage failure: Operation not permitted").
    #[test]
    fn a_failed_start_names_the_file_and_the_operation() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(SledStore::open(dir.path()).expect("a new store"));
        let wal = wal::dir(dir.path());
        std::fs::remove_dir_all(&wal).expect("remove the log directory");
        std::fs::write(&wal, b"not a directory").expect("a file in its place");
        let Err(err) = SledStore::open(dir.path()) else {
            panic!("opened with a file for the log directory");
        };
        let text = err.to_string();
        assert!(
            text.contains("the log directory") && text.contains(&wal.display().to_string()),
            "{text}"
        );
    }
    use std::collections::BTreeMap;

    #[test]
    fn a_data_directory_is_claimed_only_when_new_empty_or_a_store_and_never_shared() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("tempdir");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o7777;
        // A shared directory with someone else's file: refused, left as it was (review 13).
        let shared = root.path().join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        std::fs::write(shared.join("someone-elses-file"), b"x").expect("write");
        let err = SledStore::open(&shared).err().expect("refused").to_string();
        assert!(
            err.contains("holds other files") && err.contains("someone-elses-file"),
            "{err}"
        );
        assert_eq!(mode(&shared), 0o1777);
        assert_eq!(std::fs::read_dir(&shared).expect("list").count(), 1);
        // Nor is an entry named like sled's files a store (review 14: a `conf` directory).
        std::fs::create_dir(shared.join("conf")).expect("mkdir");
        let err = SledStore::open(&shared).err().expect("refused").to_string();
        assert!(err.contains("holds other files"), "{err}");
        assert_eq!(mode(&shared), 0o1777);
        // An empty one (a mount point's `lost+found` aside) is made private and used.
        let empty = root.path().join("empty");
        std::fs::create_dir_all(empty.join("lost+found")).expect("mkdir");
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        drop(SledStore::open(&empty).expect("empty dir"));
        assert_eq!(mode(&empty), 0o700);
        // A store opened to others by hand is made private again.
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        let store = SledStore::open(&empty).expect("a store");
        assert_eq!(mode(&empty), 0o700);
        // A second open while it is held says so plainly.
        let err = SledStore::open(&empty).err().expect("held").to_string();
        assert!(err.contains("in use by another Kluis process"), "{err}");
        drop(store);
        // A new one is made, private.
        let new = root.path().join("a/b/new");
        drop(SledStore::open(&new).expect("new"));
        assert_eq!(mode(&new), 0o700);
        assert_eq!(
            mode(&root.path().join("a")) & 0o022,
            0,
            "parents not writable by others"
        );
    }

    #[tokio::test]
    async fn batches_are_atomic_and_conditional() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let mut b = Batch::default();
        b.expect(Keyspace::Records, b"r1".to_vec(), Expect::Absent);
        b.put(Keyspace::Records, b"r1".to_vec(), b"v1".to_vec());
        b.put(Keyspace::Index, b"i1".to_vec(), vec![]);
        store.commit(b).await.expect("commit");

        let mut b = Batch::default();
        b.expect(
            Keyspace::Records,
            b"r1".to_vec(),
            Expect::Value(b"old".to_vec()),
        );
        b.put(Keyspace::Records, b"r1".to_vec(), b"v2".to_vec());
        b.delete(Keyspace::Index, b"i1".to_vec());
        assert!(matches!(store.commit(b).await, Err(StoreError::Conflict)));
        assert_eq!(
            store.get(Keyspace::Records, b"r1").await.expect("get"),
            Some(b"v1".to_vec())
        );
        assert!(store
            .get(Keyspace::Index, b"i1")
            .await
            .expect("get")
            .is_some());
    }

    #[tokio::test]
    async fn a_head_behind_the_events_moves_to_the_last_event_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).expect("open");
            let mut b = Batch::default();
            b.append_event(audit::Draft::new("GetRecord", "p", "r").encode());
            b.append_event(audit::Draft::new("GetRecord", "p", "r").encode());
            store.commit(b).await.expect("commit");
            // As after a torn group: events replayed, the head write not.
            let mut b = Batch::default();
            b.put(
                Keyspace::Meta,
                audit::META_HEAD.to_vec(),
                audit::Head::default().encode(),
            );
            store.commit(b).await.expect("commit");
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        let head = audit::Head::load(&store).await.expect("head");
        assert_eq!(head.seq, 2);
        let mut b = Batch::default();
        b.append_event(audit::Draft::new("GetRecord", "p", "r").encode());
        store.commit(b).await.expect("commit");
        assert_eq!(audit::Head::load(&store).await.expect("head").seq, 3);
    }

    /// Writers are answered once their batch is durable, before it is applied; a reader
    /// waits for the applier, so it still sees every answered write. Reads of records do not
    /// wait for batches of audit events alone; a writer answered `Conflict` hears it only
    /// once the write it conflicted with is applied.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    // The gate is held across awaits on purpose: it keeps the applier (another thread) out.
    #[allow(clippy::await_holding_lock)]
    async fn writers_are_answered_when_durable_and_readers_wait_for_the_applier() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let ten_s = std::time::Duration::from_secs(10);
        let mut put = Batch::default();
        put.put(Keyspace::Records, b"before".to_vec(), b"0".to_vec());
        store.commit(put).await.expect("commit");
        // Reading it waits until it is applied.
        assert!(store
            .get(Keyspace::Records, b"before")
            .await
            .expect("get")
            .is_some());
        let gate = store.inner.shared.apply_gate.lock();
        let mut read_event = Batch::default();
        read_event.append_event(b"read".to_vec());
        tokio::time::timeout(ten_s, store.commit(read_event))
            .await
            .expect("answered while the applier is held")
            .expect("commit");
        // Records are read without waiting for a batch of audit events alone.
        assert_eq!(
            tokio::time::timeout(ten_s, store.get(Keyspace::Records, b"before"))
                .await
                .expect("no wait")
                .expect("get"),
            Some(b"0".to_vec())
        );
        let mut write = Batch::default();
        write.put(Keyspace::Records, b"r".to_vec(), b"1".to_vec());
        write.append_event(b"write".to_vec());
        tokio::time::timeout(ten_s, store.commit(write))
            .await
            .expect("answered while the applier is held")
            .expect("commit");
        // Durable: both frames are in the log already.
        let log = std::fs::read(wal::list(&wal::dir(dir.path())).expect("logs")[0].1.clone())
            .expect("log");
        assert_eq!(wal::decode_frames(&log, 0).frames.len(), 3);
        let spawn_get = |ks: Keyspace, key: &'static [u8]| {
            let store = store.clone();
            tokio::spawn(async move { store.get(ks, key).await })
        };
        let record = spawn_get(Keyspace::Records, b"r");
        let head = spawn_get(Keyspace::Meta, audit::META_HEAD);
        let conflicting = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut b = Batch::default();
                b.expect(Keyspace::Records, b"r".to_vec(), Expect::Absent);
                b.put(Keyspace::Records, b"r".to_vec(), b"2".to_vec());
                store.commit(b).await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!record.is_finished());
        assert!(!head.is_finished());
        assert!(!conflicting.is_finished());
        drop(gate);
        assert_eq!(
            record.await.expect("task").expect("get"),
            Some(b"1".to_vec())
        );
        let head = head.await.expect("task").expect("get").expect("a head");
        assert_eq!(audit::Head::decode(&head).expect("head").seq, 2);
        assert!(matches!(
            conflicting.await.expect("task"),
            Err(StoreError::Conflict)
        ));
    }

    /// Writes log file `no` of the store in `dir` by hand: frames of batches 1..=n, each
    /// putting `k<seq>`, and returns it with where each frame starts.
    fn hand_written_log(dir: &Path, no: u64, n: u64) -> (Vec<u8>, Vec<usize>) {
        let mut log = Vec::new();
        let mut starts = Vec::new();
        for seq in 1..=n {
            starts.push(log.len());
            let op = Op::Put(
                Keyspace::Records,
                format!("k{seq}").into_bytes(),
                vec![1].into(),
            );
            wal::encode_frame(&mut log, seq, [&op]);
        }
        write_log(dir, no, &log);
        (log, starts)
    }

    /// Writes log file `no` of the store in `dir` as the log writer leaves it: `frames`, then
    /// zeros up to a multiple of [`LOG_EXTEND`].
    fn write_log(dir: &Path, no: u64, frames: &[u8]) {
        let mut log = frames.to_vec();
        log.resize(
            (log.len() as u64).div_ceil(LOG_EXTEND) as usize * LOG_EXTEND as usize,
            0,
        );
        std::fs::write(wal::file_path(&wal::dir(dir), no), &log).expect("write log");
    }

    #[tokio::test]
    async fn a_snapshot_file_sled_left_unfinished_does_not_stop_the_next_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).expect("create");
            let mut b = Batch::default();
            b.put(Keyspace::Records, b"kept".to_vec(), b"1".to_vec());
            store.commit(b).await.expect("commit");
        }
        // What a kill -9 in the middle of sled writing a snapshot leaves.
        std::fs::write(
            dir.path().join("snap.FFFFFFFFFFFFFFF0.generating"),
            b"cut short by a crash",
        )
        .expect("write");
        let store = SledStore::open(dir.path()).expect("opens");
        assert_eq!(
            store.get(Keyspace::Records, b"kept").await.expect("get"),
            Some(b"1".to_vec())
        );
    }

    #[tokio::test]
    async fn a_torn_last_frame_is_dropped_even_if_a_newer_empty_log_follows() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(SledStore::open(dir.path()).expect("create"));
        // A crash tore the write of batch 3; a start-up then created the next (empty) log
        // file and crashed again before it removed this one.
        let (log, starts) = hand_written_log(dir.path(), 100, 3);
        write_log(dir.path(), 100, &log[..starts[2] + 10]);
        std::fs::write(wal::file_path(&wal::dir(dir.path()), 101), b"").expect("empty log");
        let store = SledStore::open(dir.path()).expect("opens");
        for (key, present) in [(&b"k1"[..], true), (b"k2", true), (b"k3", false)] {
            let got = store.get(Keyspace::Records, key).await.expect("get");
            assert_eq!(got.is_some(), present, "{}", String::from_utf8_lossy(key));
        }
    }

    #[tokio::test]
    async fn a_damaged_frame_before_acknowledged_ones_refuses_to_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(SledStore::open(dir.path()).expect("create"));
        // Batch 2's frame is damaged; batch 3 after it was acknowledged (it was written only
        // after 2 was synced): dropping 2 and 3 as a torn tail would lose it.
        let (mut log, starts) = hand_written_log(dir.path(), 100, 3);
        log[starts[1] + wal::FRAME_HEADER + 3] ^= 0x40;
        write_log(dir.path(), 100, &log);
        let err = SledStore::open(dir.path()).err().expect("refused");
        assert!(
            err.to_string().contains("damaged at byte") && err.to_string().contains("100.wal"),
            "{err}"
        );
        // The same damage in the last file's last frame is a torn write: it opens.
        let (mut log, starts) = hand_written_log(dir.path(), 100, 3);
        log[starts[2] + wal::FRAME_HEADER + 3] ^= 0x40;
        write_log(dir.path(), 100, &log);
        let store = SledStore::open(dir.path()).expect("opens");
        assert!(store
            .get(Keyspace::Records, b"k2")
            .await
            .expect("get")
            .is_some());
        assert!(store
            .get(Keyspace::Records, b"k3")
            .await
            .expect("get")
            .is_none());
    }

    #[tokio::test]
    async fn damage_that_sled_already_applied_does_not_stop_the_next_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).expect("create");
            for seq in 1..=3 {
                let mut b = Batch::default();
                b.put(Keyspace::Records, format!("k{seq}").into_bytes(), vec![1]);
                store.commit(b).await.expect("commit");
            }
        }
        // A log of batches 1..=5 whose frame 2 is damaged: frame 3 after it is applied, so
        // batch 2 is too; 4 and 5 are replayed.
        let (mut log, starts) = hand_written_log(dir.path(), 100, 5);
        log[starts[1] + wal::FRAME_HEADER + 3] ^= 0x40;
        write_log(dir.path(), 100, &log);
        let store = SledStore::open(dir.path()).expect("opens");
        for key in [&b"k1"[..], b"k2", b"k3", b"k4", b"k5"] {
            let got = store.get(Keyspace::Records, key).await.expect("get");
            assert!(got.is_some(), "{}", String::from_utf8_lossy(key));
        }
        drop(store);
        // Damage at the end of one file, the next file starting with a batch at most one
        // above what is applied: nothing is lost either.
        let (log, starts) = hand_written_log(dir.path(), 200, 5);
        write_log(dir.path(), 200, &log[..starts[4] + 7]);
        let mut next = Vec::new();
        let op = Op::Put(Keyspace::Records, b"k6".to_vec(), vec![1].into());
        wal::encode_frame(&mut next, 6, [&op]);
        write_log(dir.path(), 201, &next);
        let store = SledStore::open(dir.path()).expect("opens");
        let got = store.get(Keyspace::Records, b"k6").await.expect("get");
        assert!(got.is_some());
    }

    #[tokio::test]
    async fn a_log_cut_back_refuses_to_open_unless_the_cut_is_accepted_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(SledStore::open(dir.path()).expect("create"));
        let (log, starts) = hand_written_log(dir.path(), 100, 4);
        let file = wal::file_path(&wal::dir(dir.path()), 100);
        // Cut back at the start of frame 4, and in the middle of it: no crash leaves a log
        // file without the zeros written ahead of its frames.
        // Also with the empty next file the writer makes at a rotation or a start after it
        // (review 7: that file used to clear the earlier file's cut).
        let empty_next = wal::file_path(&wal::dir(dir.path()), 101);
        for (end, torn, next) in [
            (starts[3], false, false),
            (starts[3] + 9, true, false),
            (starts[3], false, true),
        ] {
            std::fs::write(&file, &log[..end]).expect("cut");
            if next {
                std::fs::write(&empty_next, []).expect("empty next file");
            }
            let err = SledStore::open(dir.path())
                .err()
                .expect("refused")
                .to_string();
            let _ = std::fs::remove_file(&empty_next);
            assert!(
                err.contains("0000000000000100.wal was cut back")
                    && err.contains(&format!("readable frames end at byte {}", starts[3]))
                    && err.contains("KLUIS_ACCEPT_WAL_CUT=0000000000000100.wal")
                    && err.contains("frame cut short") == torn,
                "{err}"
            );
        }
        // The override names the file: another name does not open it.
        let other = std::ffi::OsStr::new("0000000000000099.wal");
        assert!(
            SledStore::open_accepting(dir.path(), Durability::GroupCommit, Some(other)).is_err()
        );
        let name = std::ffi::OsStr::new("0000000000000100.wal");
        let store = SledStore::open_accepting(dir.path(), Durability::GroupCommit, Some(name))
            .expect("opens, accepting the loss");
        for (key, present) in [(&b"k1"[..], true), (b"k3", true), (b"k4", false)] {
            let got = store.get(Keyspace::Records, key).await.expect("get");
            assert_eq!(got.is_some(), present, "{}", String::from_utf8_lossy(key));
        }
        drop(store);
        // Zeroed from the start of frame 4 but not shortened: no different from a crash
        // before frame 4 was written; it opens.
        let mut zeroed = log.clone();
        zeroed[starts[3]..].fill(0);
        write_log(dir.path(), 200, &zeroed);
        drop(SledStore::open(dir.path()).expect("opens"));
    }

    /// With `hook` set, commits one write (acknowledged: durable before it is applied), then
    /// checks that a reader gets an error rather than a wait, that a later writer is refused
    /// (its error returned), and that the next start replays the acknowledged write.
    async fn after_a_failed_apply(hook: impl Fn(&Shared)) -> StoreError {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        hook(&store.inner.shared);
        let mut b = Batch::default();
        b.put(Keyspace::Records, b"r".to_vec(), b"1".to_vec());
        store.commit(b).await.expect("durable: acknowledged");
        let ten_s = std::time::Duration::from_secs(10);
        let read = tokio::time::timeout(ten_s, store.get(Keyspace::Records, b"r"))
            .await
            .expect("the reader is not left waiting");
        assert!(matches!(read, Err(StoreError::Poisoned(_))), "{read:?}");
        let mut b = Batch::default();
        b.put(Keyspace::Records, b"later".to_vec(), b"1".to_vec());
        let later = tokio::time::timeout(ten_s, store.commit(b))
            .await
            .expect("the writer is answered");
        let Err(err) = later else {
            panic!("a write after a failed apply was accepted");
        };
        drop(store);
        // The log holds the acknowledged write: the next start replays it.
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(
            store.get(Keyspace::Records, b"r").await.expect("get"),
            Some(b"1".to_vec())
        );
        match err {
            StoreError::Io(text) | StoreError::Poisoned(text) => {
                StoreError::Poisoned(text.replace(&dir.path().display().to_string(), "<dir>"))
            }
            other => other,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn if_the_apply_thread_dies_readers_get_an_error_not_a_wait() {
        after_a_failed_apply(|shared| shared.panic_next_apply.store(true, Ordering::SeqCst)).await;
    }

    /// A failure to apply logged writes to sled refuses later writes with a reason that names
    /// the database and says the log holds them, not a log failure (review 27).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_apply_names_the_database_and_refuses_later_writes() {
        let err =
            after_a_failed_apply(|shared| shared.fail_next_apply.store(true, Ordering::SeqCst))
                .await;
        let text = err.to_string();
        assert!(
            text.contains("<dir>/db")
                && text.contains("applying logged writes")
                && !text.contains("log write or sync"),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_checkpoint_sync_poisons_the_store_and_keeps_every_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        store
            .inner
            .shared
            .fail_next_checkpoint_sync
            .store(true, Ordering::SeqCst);
        let value = vec![7u8; 256 * 1024];
        let mut acked = Vec::new();
        // Past CHECKPOINT_BYTES of log: the checkpoint of the first file fails its sync.
        let mut refused = None;
        for i in 0u32..(CHECKPOINT_BYTES / (1024 * 1024) + 8) as u32 {
            let mut b = Batch::default();
            for j in 0u32..4 {
                b.put(
                    Keyspace::Records,
                    [i.to_be_bytes(), j.to_be_bytes()].concat(),
                    value.clone(),
                );
            }
            match store.commit(b).await {
                Ok(()) => acked.push(i),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
            // Give the applier its turn, so the checkpoint runs while writes go on.
            tokio::task::yield_now().await;
        }
        let refused = match refused {
            Some(e) => e,
            None => {
                // The checkpoint may run just after the last write: the next one is refused.
                let mut tries = 0;
                loop {
                    let mut b = Batch::default();
                    b.put(Keyspace::Records, b"after".to_vec(), b"1".to_vec());
                    match store.commit(b).await {
                        Ok(()) if tries < 200 => {
                            tries += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        }
                        Ok(()) => panic!("the store kept acknowledging writes"),
                        Err(e) => break e,
                    }
                }
            }
        };
        assert!(
            matches!(&refused, StoreError::Poisoned(r) if r.contains("checkpoint")),
            "{refused:?}"
        );
        assert!(
            wal::list(&wal::dir(dir.path())).expect("list").len() >= 2,
            "no log file was deleted"
        );
        drop(store);
        let store = SledStore::open(dir.path()).expect("reopen");
        for i in acked {
            assert_eq!(
                store
                    .get(
                        Keyspace::Records,
                        &[i.to_be_bytes(), 3u32.to_be_bytes()].concat()
                    )
                    .await
                    .expect("get")
                    .map(|v| v.len()),
                Some(value.len()),
                "acknowledged batch {i}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_log_write_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).expect("open");
            let mut b = Batch::default();
            b.put(Keyspace::Records, b"kept".to_vec(), b"1".to_vec());
            b.append_event(b"event one".to_vec());
            store.commit(b).await.expect("commit");
            store
                .inner
                .shared
                .fail_next_write
                .store(true, Ordering::SeqCst);
            // Several writers at once: whichever groups were applied to sled are undone.
            let mut tasks = Vec::new();
            for i in 0..8u8 {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    let mut b = Batch::default();
                    b.put(Keyspace::Records, vec![b'n', i], b"new".to_vec());
                    b.append_event(b"event".to_vec());
                    store.commit(b).await
                }));
            }
            let mut failed = 0usize;
            for t in tasks {
                if t.await.expect("task").is_err() {
                    failed += 1;
                }
            }
            assert!(failed >= 1);
            // Every write after the failure is refused.
            let mut b = Batch::default();
            b.put(Keyspace::Records, b"later".to_vec(), b"1".to_vec());
            assert!(matches!(
                store.commit(b).await,
                Err(StoreError::Poisoned(_))
            ));
            // What failed is not visible, not even before a restart (writes that were durable
            // before the failure remain).
            let visible_new = store
                .scan(Keyspace::Records, b"n", None, 100)
                .await
                .expect("scan")
                .len();
            assert_eq!(
                8 - failed,
                visible_new,
                "only acknowledged writes are visible"
            );
            let head = audit::Head::load(&store).await.expect("head");
            assert_eq!(head.seq, 1 + (8 - failed) as u64);
            // The failed frame is cut off, and the file left as the writer leaves it (a
            // multiple of LOG_EXTEND), so the next start does not take it for a cut-back log.
            for (_, path) in wal::list(&wal::dir(dir.path())).expect("list") {
                let log = std::fs::read(&path).expect("read log");
                assert_eq!(log.len() as u64 % LOG_EXTEND, 0);
                let decoded = wal::decode_frames(&log, 0);
                assert_eq!((decoded.end, decoded.cut), (wal::LogEnd::Clean, None));
            }
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        assert!(store
            .get(Keyspace::Records, b"later")
            .await
            .expect("get")
            .is_none());
        let new = store
            .scan(Keyspace::Records, b"n", None, 100)
            .await
            .expect("scan");
        let head = audit::Head::load(&store).await.expect("head");
        assert_eq!(head.seq, 1 + new.len() as u64);
        // The store takes writes again, and the chain continues without a gap.
        let mut b = Batch::default();
        b.append_event(b"after restart".to_vec());
        store.commit(b).await.expect("commit");
        let events: usize = store
            .scan(Keyspace::Audit, b"", None, 100)
            .await
            .expect("scan")
            .iter()
            .map(|(_, block)| audit::split_block(block).expect("a block").len())
            .sum();
        assert_eq!(events as u64, head.seq + 1);
    }

    /// Many writers at once: whoever leads hands over after a few groups, and every batch is
    /// still committed and answered (none left in the queue), in one gap-free chain.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_queued_batch_is_led_however_many_writers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let mut tasks = Vec::new();
        for t in 0..64u32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..40u32 {
                    let mut b = Batch::default();
                    let key = [t.to_be_bytes(), i.to_be_bytes()].concat();
                    b.put(Keyspace::Records, key, vec![1]);
                    b.append_event(b"write".to_vec());
                    store.commit(b).await.expect("commit");
                }
            }));
        }
        for t in tasks {
            tokio::time::timeout(std::time::Duration::from_secs(60), t)
                .await
                .expect("every writer is answered")
                .expect("task");
        }
        let stored = store
            .scan(Keyspace::Records, b"", None, 10_000)
            .await
            .expect("scan");
        assert_eq!(stored.len(), 64 * 40);
        let head = audit::Head::load(&store).await.expect("head");
        assert_eq!(head.seq, 64 * 40);
    }

    /// Conditions see the writes accepted before them, also those not yet durable or
    /// applied: concurrent compare-and-set increments never lose one, and of many
    /// concurrent creates of one key exactly one wins.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conditions_see_writes_still_in_the_pipeline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut b = Batch::default();
                b.expect(Keyspace::Meta, b"once".to_vec(), Expect::Absent);
                b.put(Keyspace::Meta, b"once".to_vec(), vec![1]);
                let created = store.commit(b).await;
                let mut conflicts = 0u32;
                for _ in 0..25 {
                    loop {
                        let now = store.get(Keyspace::Meta, b"counter").await.expect("get");
                        let n = now
                            .as_deref()
                            .map_or(0, |v| u64::from_be_bytes(v.try_into().expect("8 bytes")));
                        let mut b = Batch::default();
                        b.expect(
                            Keyspace::Meta,
                            b"counter".to_vec(),
                            match now {
                                Some(v) => Expect::Value(v),
                                None => Expect::Absent,
                            },
                        );
                        b.put(
                            Keyspace::Meta,
                            b"counter".to_vec(),
                            (n + 1).to_be_bytes().to_vec(),
                        );
                        match store.commit(b).await {
                            Ok(()) => break,
                            Err(StoreError::Conflict) => conflicts += 1,
                            Err(e) => panic!("commit: {e}"),
                        }
                    }
                }
                (created.is_ok(), conflicts)
            }));
        }
        let mut winners = 0;
        for t in tasks {
            let (won, _) = t.await.expect("task");
            winners += usize::from(won);
        }
        assert_eq!(winners, 1, "exactly one create of the same key wins");
        let counter = store.get(Keyspace::Meta, b"counter").await.expect("get");
        assert_eq!(counter, Some(400u64.to_be_bytes().to_vec()));
        drop(store);
        let store = SledStore::open(dir.path()).expect("reopen");
        let counter = store.get(Keyspace::Meta, b"counter").await.expect("get");
        assert_eq!(counter, Some(400u64.to_be_bytes().to_vec()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_flushes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let mut tasks = Vec::new();
        for t in 0..32u32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..20u32 {
                    let mut b = Batch::default();
                    b.put(
                        Keyspace::Records,
                        [t.to_be_bytes(), i.to_be_bytes()].concat(),
                        vec![1],
                    );
                    store.commit(b).await.expect("commit");
                }
            }));
        }
        for t in tasks {
            t.await.expect("join");
        }
        assert!(
            store.flush_count() < 640,
            "flushes: {}",
            store.flush_count()
        );
        assert_eq!(
            store
                .scan(Keyspace::Records, b"", None, 10_000)
                .await
                .expect("scan")
                .len(),
            640
        );
    }

    /// Replay after a crash in which sled lost batches the log holds: frames above sled's
    /// applied sequence number are replayed, older ones skipped, a torn tail ignored.
    #[tokio::test]
    async fn log_replay_restores_what_sled_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).expect("open");
            let mut b = Batch::default();
            b.put(Keyspace::Records, b"k1".to_vec(), b"v1".to_vec());
            store.commit(b).await.expect("commit seq 1");
        }
        // As if sled had lost seqs 2 and 3 but the logs kept them (plus a torn frame).
        let mut log = Vec::new();
        wal::encode_frame(
            &mut log,
            1,
            &[Op::Put(
                Keyspace::Records,
                b"k1".to_vec(),
                b"stale".to_vec().into(),
            )],
        );
        wal::encode_frame(
            &mut log,
            2,
            &[Op::Put(
                Keyspace::Records,
                b"k2".to_vec(),
                b"v2".to_vec().into(),
            )],
        );
        // An earlier log file ends in the zeros the log writer puts ahead of its frames.
        write_log(dir.path(), 99, &log);
        let mut log = Vec::new();
        wal::encode_frame(
            &mut log,
            3,
            &[
                Op::Put(Keyspace::Fields, b"k3".to_vec(), b"v3".to_vec().into()),
                Op::Delete(Keyspace::Records, b"k2".to_vec()),
            ],
        );
        let mut torn = Vec::new();
        wal::encode_frame(
            &mut torn,
            4,
            &[Op::Put(
                Keyspace::Records,
                b"k4".to_vec(),
                b"never acked".to_vec().into(),
            )],
        );
        log.extend_from_slice(&torn[..torn.len() - 3]);
        write_log(dir.path(), 100, &log);

        let store = SledStore::open(dir.path()).expect("reopen replays");
        assert_eq!(
            store.get(Keyspace::Records, b"k1").await.expect("get"),
            Some(b"v1".to_vec())
        );
        assert_eq!(
            store.get(Keyspace::Records, b"k2").await.expect("get"),
            None
        );
        assert_eq!(
            store.get(Keyspace::Fields, b"k3").await.expect("get"),
            Some(b"v3".to_vec())
        );
        assert_eq!(
            store.get(Keyspace::Records, b"k4").await.expect("get"),
            None
        );
        let mut b = Batch::default();
        b.put(Keyspace::Records, b"k5".to_vec(), b"v5".to_vec());
        store.commit(b).await.expect("commit after replay");
        assert_eq!(wal::list(&wal::dir(dir.path())).expect("list").len(), 1);
        drop(store);

        // A bad frame followed, in a later log file, by a frame of a later batch (so the bad
        // one was acknowledged, not torn) refuses to open.
        let mut bad = Vec::new();
        wal::encode_frame(
            &mut bad,
            10,
            &[Op::Put(
                Keyspace::Records,
                b"x".to_vec(),
                b"y".to_vec().into(),
            )],
        );
        bad[20] ^= 1;
        std::fs::write(wal::file_path(&wal::dir(dir.path()), 500), &bad).expect("write");
        let mut later = Vec::new();
        wal::encode_frame(
            &mut later,
            11,
            &[Op::Put(
                Keyspace::Records,
                b"z".to_vec(),
                b"y".to_vec().into(),
            )],
        );
        std::fs::write(wal::file_path(&wal::dir(dir.path()), 501), &later).expect("write");
        assert!(matches!(
            SledStore::open(dir.path()),
            Err(StoreError::Io(_))
        ));
    }

    /// Model test: random batches against a BTreeMap, with a reopen in the middle.
    #[test]
    fn store_matches_a_btreemap_model_across_reopen() {
        use proptest::prelude::*;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let config = ProptestConfig {
            cases: 16,
            ..ProptestConfig::default()
        };
        proptest!(config, |(ops in proptest::collection::vec((0u8..2, 0u8..16, proptest::collection::vec(any::<u8>(), 0..64)), 1..60), reopen_at in 0usize..60)| {
            rt.block_on(async {
                let dir = tempfile::tempdir().expect("tempdir");
                let mut store = SledStore::open(dir.path()).expect("open");
                let mut model = BTreeMap::new();
                for (n, (kind, key, value)) in ops.iter().enumerate() {
                    if n == reopen_at {
                        drop(store);
                        store = SledStore::open(dir.path()).expect("reopen");
                    }
                    let mut b = Batch::default();
                    if *kind == 0 {
                        b.put(Keyspace::Fields, vec![*key], value.clone());
                        model.insert(vec![*key], value.clone());
                    } else {
                        b.delete(Keyspace::Fields, vec![*key]);
                        model.remove(&vec![*key]);
                    }
                    store.commit(b).await.expect("commit");
                }
                let got: BTreeMap<_, _> = store.scan(Keyspace::Fields, b"", None, 1000).await.expect("scan").into_iter().collect();
                assert_eq!(got, model);
            });
        });
    }
}

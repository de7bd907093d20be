//! Storage: a small trait of keyspaces and atomic, conditional, durable batches, and its
//! embedded sled backend.
//!
//! The trait is shaped for a PostgreSQL backend too: a keyspace is a table `(key bytea primary
//! key, value bytea)`, a [`Batch`] is one transaction whose [`Expect`]s are checked under
//! `SELECT … FOR UPDATE`, and `commit` returns once the transaction is committed (and so
//! durable). The store only ever sees ciphertext, wrapped keys, MACs and clear metadata.
//!
//! # Durability of the sled backend
//!
//! sled 0.34's `flush()` ends in `sync_file_range`, which neither flushes the device's write
//! cache nor the file's metadata, and values above its blob threshold live in separate files it
//! never fsyncs. Calling it on every commit is also slow: it contends with concurrent writers.
//! [`SledStore`] therefore does not rely on it for acknowledged writes:
//! - every batch is applied to sled and appended, in the same order, to Kluis's own
//!   write-ahead log ([`crate::wal`]); a write is acknowledged once its log frame is written
//!   and `fdatasync`ed, so it survives power loss, not only `kill -9`;
//! - writers queue their batches for one commit-leader thread (group commit): it takes every
//!   batch queued so far, applies the group in a single sled transaction (checking each
//!   batch's conditions in order, so a conflicting batch is skipped and reported alone),
//!   appends the applied batches to the log, syncs it once, and answers every writer; batches
//!   that arrive meanwhile form the next group;
//! - at start-up the log is replayed over sled's recovered state (sled records, in the same
//!   transaction as each batch, the last sequence number it applied), then sled is flushed and
//!   fsynced and the log starts afresh; every 64 MiB of log the leader does the same
//!   (checkpoint);
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

use parking_lot::Mutex;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

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
    /// Sets `key` to `value`.
    Put(Keyspace, Vec<u8>, Vec<u8>),
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
    /// Adds a condition.
    pub fn expect(&mut self, ks: Keyspace, key: Vec<u8>, expect: Expect) {
        self.expects.push((ks, key, expect));
    }

    /// Adds a put.
    pub fn put(&mut self, ks: Keyspace, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::Put(ks, key, value));
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
        self.ops
            .iter()
            .map(|op| match op {
                Op::Put(_, k, v) => k.len() + v.len(),
                Op::Delete(_, k) => k.len(),
            })
            .sum::<usize>()
            + self.events.iter().map(Vec::len).sum::<usize>()
    }
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
    /// An earlier durability failure made the store refuse writes until restart.
    #[error("storage refuses writes after an earlier flush failure: {0}")]
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

/// Owns the queue to the commit leader; dropping it stops and joins the leader.
struct SledInner {
    shared: Arc<Shared>,
    queue: std::sync::mpsc::Sender<Pending>,
    leader: Option<std::thread::JoinHandle<()>>,
}

/// What the commit leader and the readers share.
struct Shared {
    db: sled::Db,
    trees: [sled::Tree; 5],
    data_file: std::fs::File,
    dir: PathBuf,
    durability: Durability,
    /// Set after a failed write or sync.
    poisoned: Mutex<Option<String>>,
    flushes: AtomicU64,
    /// Highest batch sequence number known durable in the log.
    durable_seq: AtomicU64,
    /// Writers inside `commit` (queued, applied or syncing): the log writer waits a little
    /// for those not yet in its group, so that one `fdatasync` serves them all.
    waiting: std::sync::atomic::AtomicUsize,
    /// Writers of groups whose log write failed: the leader answers them once it has undone
    /// those groups in sled.
    failed: Mutex<Failed>,
    /// Test hook: the next log write fails.
    #[cfg(test)]
    fail_next_write: std::sync::atomic::AtomicBool,
}

/// Writers waiting for the leader to undo their failed groups, and how far it has undone.
#[derive(Default)]
struct Failed {
    replies: Vec<Reply>,
    /// Highest batch sequence number undone; jobs at or below it are answered at once.
    undone_through: u64,
}

impl Failed {
    /// Hands a failed job's writers to the leader, or answers them if their groups are
    /// already undone. Under the lock, so that the leader cannot finish undoing (and go to
    /// sleep) between the check and the hand-over.
    fn hand_over(this: &Mutex<Failed>, job: SyncJob, reason: &str) {
        let mut failed = this.lock();
        if job.last_seq <= failed.undone_through {
            drop(failed);
            job.answer(|_| Err(StoreError::Poisoned(reason.to_string())));
        } else {
            failed
                .replies
                .extend(job.replies.into_iter().map(|(r, _)| r));
        }
    }
}

/// What it takes to undo one applied group in sled if its log write fails: the previous
/// value of every key it wrote, in write order, and the chain head and sequence number
/// before it.
struct Undo {
    first_seq: u64,
    last_seq: u64,
    head_before: audit::Head,
    previous: Previous,
}

/// Keys a group wrote, each with its value before the write (`None`: it was absent).
type Previous = Vec<(Keyspace, Vec<u8>, Option<sled::IVec>)>;

/// Where a writer waits for its batch's outcome.
type Reply = tokio::sync::oneshot::Sender<Result<(), StoreError>>;

/// Frames of one applied group on their way to the log writer, with the answers to send
/// once they are durable.
struct SyncJob {
    frames: Vec<u8>,
    /// Sequence number of the job's last frame.
    last_seq: u64,
    replies: Vec<(Reply, Result<(), StoreError>)>,
}

impl SyncJob {
    /// Answers every writer of the job with `f` applied to its result.
    fn answer(self, f: impl Fn(Result<(), StoreError>) -> Result<(), StoreError>) {
        for (reply, result) in self.replies {
            // A writer that went away (cancelled request) needs no answer.
            let _ = reply.send(f(result));
        }
    }
}

/// A batch waiting for the commit leader.
struct Pending {
    batch: Batch,
    reply: Reply,
}

struct LogFile {
    file: std::fs::File,
    no: u64,
    len: u64,
}

/// Longest the log writer waits for writers already inside `commit` to join its group.
const COMMIT_DELAY: std::time::Duration = std::time::Duration::from_micros(1500);
/// Most batches one group applies in a single sled transaction.
const MAX_GROUP: usize = 256;
/// Most bytes one group carries (a group is closed early when it grows past this).
const MAX_GROUP_BYTES: usize = 64 * 1024 * 1024;

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl SledStore {
    /// Opens (creating if needed) a sled store in `dir`, with group commit.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        SledStore::open_with(dir, Durability::GroupCommit)
    }

    /// Opens (creating if needed) a sled store in `dir` with the given durability mode,
    /// replaying the write-ahead log over sled's recovered state.
    pub fn open_with(dir: &Path, durability: Durability) -> Result<SledStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        // A store of this process that was just dropped may still hold sled's file lock for a
        // moment (sled's background threads release it): retry briefly before reporting the
        // directory as in use.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let db = loop {
            match sled::Config::new()
                .path(dir)
                .segment_size(SLED_SEGMENT_SIZE)
                .cache_capacity(256 * 1024 * 1024)
                .open()
            {
                Ok(db) => break db,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(io(e)),
            }
        };
        let tree = |ks: Keyspace| db.open_tree(ks.name()).map_err(io);
        let trees = [
            tree(Keyspace::Meta)?,
            tree(Keyspace::Records)?,
            tree(Keyspace::Fields)?,
            tree(Keyspace::Index)?,
            tree(Keyspace::Audit)?,
        ];
        let data_file = std::fs::File::open(dir.join("db")).map_err(io)?;
        let wal_dir = wal::dir(dir);
        std::fs::create_dir_all(&wal_dir).map_err(io)?;

        // Replay the log over sled's recovered state.
        let applied = trees[Keyspace::Meta as usize]
            .get(WAL_APPLIED)
            .map_err(io)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        let files = wal::list(&wal_dir).map_err(io)?;
        let mut last = applied;
        for (i, (_, path)) in files.iter().enumerate() {
            let bytes = std::fs::read(path).map_err(io)?;
            let (frames, clean) = wal::decode_frames(&bytes);
            if !clean && i + 1 != files.len() {
                return Err(StoreError::Io(format!(
                    "write-ahead log {} is corrupt before its end",
                    path.display()
                )));
            }
            for frame in frames.into_iter().filter(|f| f.seq > applied) {
                let batch = Batch {
                    expects: Vec::new(),
                    ops: frame.ops,
                    events: Vec::new(),
                };
                // Logged frames hold their events already linked (as plain writes).
                let mut head = audit::Head::default();
                apply_batches(&trees, &[&batch], frame.seq, &mut head, None)?;
                last = last.max(frame.seq);
            }
        }
        if last > applied {
            tracing::info!(batches = last - applied, "replayed the write-ahead log");
        }
        // The head is logged once per group, with its last batch: if a crash tore a group's
        // frames, the replayed events may run past the stored head. Move it to the last event.
        if let Some((_, value)) = trees[Keyspace::Audit as usize].last().map_err(io)? {
            let stored = trees[Keyspace::Meta as usize]
                .get(audit::META_HEAD)
                .map_err(io)?
                .and_then(|v| audit::Head::decode(&v))
                .unwrap_or_default();
            if let Some(e) = audit::Event::parse(&value).filter(|e| e.seq > stored.seq) {
                let head = audit::Head {
                    seq: e.seq,
                    time_ms: e.time_ms,
                    hash: e.hash,
                };
                trees[Keyspace::Meta as usize]
                    .insert(audit::META_HEAD, head.encode())
                    .map_err(io)?;
            }
        }
        // Make sled hold everything, then start a fresh log.
        db.flush().map_err(io)?;
        data_file.sync_all().map_err(io)?;
        if let Ok(conf) = std::fs::File::open(dir.join("conf")) {
            conf.sync_all().map_err(io)?;
        }
        let no = files.last().map_or(1, |(no, _)| no + 1);
        let file = create_log_file(&wal_dir, no)?;
        for (_, path) in &files {
            std::fs::remove_file(path).map_err(io)?;
        }
        sync_dir(&wal_dir).map_err(io)?;
        sync_dir(dir).map_err(io)?;
        let shared = Arc::new(Shared {
            db,
            trees,
            data_file,
            dir: dir.to_path_buf(),
            durability,
            poisoned: Mutex::new(None),
            flushes: AtomicU64::new(0),
            durable_seq: AtomicU64::new(last),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            failed: Mutex::new(Failed::default()),
            #[cfg(test)]
            fail_next_write: std::sync::atomic::AtomicBool::new(false),
        });
        let head = match shared.trees[Keyspace::Meta as usize]
            .get(audit::META_HEAD)
            .map_err(io)?
        {
            None => audit::Head::default(),
            Some(v) => audit::Head::decode(&v)
                .ok_or_else(|| StoreError::Io("the audit chain head is malformed".into()))?,
        };
        let (queue, pending) = std::sync::mpsc::channel();
        let leader_shared = Arc::clone(&shared);
        let log = LogFile { file, no, len: 0 };
        let leader = std::thread::Builder::new()
            .name("kluis-commit".into())
            .spawn(move || leader_shared.lead(pending, log, last + 1, head))
            .map_err(io)?;
        Ok(SledStore {
            inner: Arc::new(SledInner {
                shared,
                queue,
                leader: Some(leader),
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

fn create_log_file(wal_dir: &Path, no: u64) -> Result<std::fs::File, StoreError> {
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(wal::file_path(wal_dir, no))
        .map_err(io)?;
    sync_dir(wal_dir).map_err(io)?;
    Ok(file)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Drop for SledInner {
    fn drop(&mut self) {
        // Closing the queue ends the leader's loop; wait for it so the data dir is released.
        let (closed, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.queue, closed));
        if let Some(leader) = self.leader.take() {
            let _ = leader.join();
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

    /// The commit leader: takes every batch queued so far (group commit), applies the group
    /// in one sled transaction and hands the applied batches' frames to the log writer, which
    /// writes and syncs them while the leader applies the next group (a two-stage pipeline).
    /// In per-write mode every group is a single batch with its own sync.
    ///
    /// Until a group is durable the leader keeps its undo record. If a log write fails, the
    /// writer poisons the store and hands the group's writers back; the leader then undoes, in
    /// reverse order, every group applied to sled but not durable, before answering them: a
    /// failed write changes nothing, not even until the next restart.
    fn lead(
        self: Arc<Self>,
        queue: std::sync::mpsc::Receiver<Pending>,
        log: LogFile,
        mut next_seq: u64,
        mut head: audit::Head,
    ) {
        let (to_writer, jobs) = std::sync::mpsc::sync_channel::<SyncJob>(2);
        let writer_shared = Arc::clone(&self);
        let writer = std::thread::Builder::new()
            .name("kluis-log".into())
            .spawn(move || writer_shared.write_log(jobs, log));
        let Ok(writer) = writer else {
            *self.poisoned.lock() = Some("could not start the log writer thread".into());
            return;
        };
        let mut in_flight: std::collections::VecDeque<Undo> = std::collections::VecDeque::new();
        loop {
            self.settle(&mut in_flight, &mut next_seq, &mut head);
            let first = if in_flight.is_empty() {
                match queue.recv() {
                    Ok(p) => p,
                    Err(_) => break,
                }
            } else {
                // Groups in flight: wake up now and then to settle them.
                match queue.recv_timeout(std::time::Duration::from_millis(2)) {
                    Ok(p) => p,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            };
            let mut group = vec![first];
            if self.durability == Durability::GroupCommit {
                let mut bytes = group[0].batch.bytes();
                while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
                    match queue.try_recv() {
                        Ok(p) => {
                            bytes += p.batch.bytes();
                            group.push(p);
                        }
                        Err(_) => break,
                    }
                }
            }
            let (job, undo) = self.apply_and_encode(&mut next_seq, &mut head, group);
            in_flight.extend(undo);
            if let Err(std::sync::mpsc::SendError(job)) = to_writer.send(job) {
                let reason = "the log writer stopped";
                *self.poisoned.lock() = Some(reason.into());
                Failed::hand_over(&self.failed, job, reason);
            }
        }
        drop(to_writer);
        let _ = writer.join();
        self.settle(&mut in_flight, &mut next_seq, &mut head);
    }

    /// Forgets the undo records of durable groups; if log writes failed, undoes every group
    /// still in flight (newest first) and answers the failed writers.
    fn settle(
        &self,
        in_flight: &mut std::collections::VecDeque<Undo>,
        next_seq: &mut u64,
        head: &mut audit::Head,
    ) {
        let durable = self.durable_seq.load(Ordering::Acquire);
        while in_flight.front().is_some_and(|u| u.last_seq <= durable) {
            in_flight.pop_front();
        }
        // Held while undoing: see `Failed::hand_over`.
        let mut failed = self.failed.lock();
        if failed.replies.is_empty() {
            return;
        }
        let reason = self
            .check_poisoned()
            .err()
            .map_or_else(|| "log write failed".to_string(), |e| e.to_string());
        if let Some(oldest) = in_flight.front() {
            *next_seq = oldest.first_seq;
            *head = oldest.head_before;
        }
        let undo: Vec<Undo> = in_flight.drain(..).rev().collect();
        if let Some(newest) = undo.first() {
            failed.undone_through = failed.undone_through.max(newest.last_seq);
        }
        if let Err(e) = undo_groups(&self.trees, &undo) {
            // sled itself failed: the data dir must not be served on; the log (which lacks
            // these groups) is the truth at the next start only if sled did not persist them.
            tracing::error!(error = %e, "undoing groups whose log write failed also failed");
        }
        for reply in std::mem::take(&mut failed.replies) {
            let _ = reply.send(Err(StoreError::Poisoned(reason.clone())));
        }
    }

    /// Applies a group and encodes the applied batches' frames; answers nothing yet.
    fn apply_and_encode(
        &self,
        next_seq: &mut u64,
        head: &mut audit::Head,
        group: Vec<Pending>,
    ) -> (SyncJob, Option<Undo>) {
        let first_seq = *next_seq;
        let head_before = *head;
        let mut previous = Vec::new();
        let mut frames = Vec::new();
        let results: Vec<Result<(), StoreError>> = match self.check_poisoned() {
            Err(e) => group
                .iter()
                .map(|_| Err(StoreError::Poisoned(e.to_string())))
                .collect(),
            Ok(()) => match apply_batches(
                &self.trees,
                &group.iter().map(|p| &p.batch).collect::<Vec<_>>(),
                *next_seq,
                head,
                Some(&mut previous),
            ) {
                Err(e) => group
                    .iter()
                    .map(|_| Err(StoreError::Io(e.to_string())))
                    .collect(),
                Ok(applied) => group
                    .iter()
                    .zip(applied)
                    .map(|(pending, linked)| match linked {
                        Some(linked) => {
                            wal::encode_frame(
                                &mut frames,
                                *next_seq,
                                pending.batch.ops.iter().chain(&linked),
                            );
                            *next_seq += 1;
                            Ok(())
                        }
                        None => Err(StoreError::Conflict),
                    })
                    .collect(),
            },
        };
        let undo = (*next_seq > first_seq).then(|| Undo {
            first_seq,
            last_seq: *next_seq - 1,
            head_before,
            previous,
        });
        let job = SyncJob {
            frames,
            last_seq: *next_seq - 1,
            replies: group.into_iter().map(|p| p.reply).zip(results).collect(),
        };
        (job, undo)
    }

    /// The log writer: appends the frames of every job queued so far, syncs once, answers
    /// their writers, and checkpoints every `CHECKPOINT_BYTES` of log.
    fn write_log(&self, jobs: std::sync::mpsc::Receiver<SyncJob>, mut log: LogFile) {
        while let Ok(mut job) = jobs.recv() {
            if self.durability == Durability::GroupCommit {
                // Groups the leader applied while the last sync ran share this one.
                let merge = |job: &mut SyncJob, more: SyncJob| {
                    job.frames.extend_from_slice(&more.frames);
                    job.replies.extend(more.replies);
                    job.last_seq = job.last_seq.max(more.last_seq);
                };
                while let Ok(more) = jobs.try_recv() {
                    merge(&mut job, more);
                }
                // Other writers are on their way (being applied, or about to be queued):
                // wait up to COMMIT_DELAY for them, so that one sync serves them all. An
                // `fdatasync` costs far more CPU than this wait, and a lone writer never waits.
                let deadline = std::time::Instant::now() + COMMIT_DELAY;
                while job.replies.len() < self.waiting.load(Ordering::Acquire) {
                    let now = std::time::Instant::now();
                    if now >= deadline {
                        break;
                    }
                    match jobs.recv_timeout(deadline - now) {
                        Ok(more) => merge(&mut job, more),
                        Err(_) => break,
                    }
                }
            }
            let any_applied = job.replies.iter().any(|(_, r)| r.is_ok());
            if !any_applied && self.durability == Durability::GroupCommit {
                job.answer(|r| r);
                continue;
            }
            if let Err(e) = self.check_poisoned() {
                // An earlier job failed: the leader undoes this one too, then answers.
                Failed::hand_over(&self.failed, job, &e.to_string());
                continue;
            }
            let written = (|| {
                use std::io::Write;
                #[cfg(test)]
                if self.fail_next_write.swap(false, Ordering::SeqCst) {
                    log.file.write_all(&job.frames[..job.frames.len() / 2])?;
                    return Err(std::io::Error::other("injected log write failure"));
                }
                log.file.write_all(&job.frames)?;
                log.file.sync_data()
            })();
            self.flushes.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = written {
                // Cut off whatever part of the frames reached the file, so that a later
                // write-back cannot make the failed batches reappear at the next start.
                let _ = log.file.set_len(log.len);
                let _ = log.file.sync_data();
                let reason = format!("write-ahead log write or sync failed: {e}");
                tracing::error!(error = %e, "write-ahead log write failed; the store refuses writes until restart");
                *self.poisoned.lock() = Some(reason.clone());
                Failed::hand_over(&self.failed, job, &reason);
                continue;
            }
            log.len += job.frames.len() as u64;
            self.durable_seq.store(job.last_seq, Ordering::Release);
            job.answer(|r| r);
            if log.len > CHECKPOINT_BYTES {
                if let Err(e) = self.checkpoint(&mut log) {
                    // The old log stays and is replayed at the next start; nothing is lost.
                    tracing::error!(error = %e, "checkpoint failed");
                }
            }
        }
    }

    /// Starts a new log file, makes sled durable, and deletes the old log file (every batch
    /// in it was applied to sled before it was written to the log). Runs on the leader, so
    /// commits wait for it: one sled flush per `CHECKPOINT_BYTES` of log.
    fn checkpoint(&self, log: &mut LogFile) -> Result<(), StoreError> {
        let wal_dir = wal::dir(&self.dir);
        let new = create_log_file(&wal_dir, log.no + 1)?;
        let old = wal::file_path(&wal_dir, log.no);
        *log = LogFile {
            file: new,
            no: log.no + 1,
            len: 0,
        };
        self.db.flush().map_err(io)?;
        self.data_file.sync_data().map_err(io)?;
        std::fs::remove_file(&old).map_err(io)?;
        sync_dir(&wal_dir).map_err(io)
    }
}

/// Applies batches in one sled transaction, in order: a batch whose conditions do not hold
/// (seeing the writes of the batches before it) is skipped and reported `None`; an applied
/// batch is reported with the writes that link its audit events into the chain after
/// `head` (which advances), which the log records after the batch's own writes. Records the last applied sequence number
/// (`first_seq` + applied − 1).
fn apply_batches(
    trees: &[sled::Tree; 5],
    batches: &[&Batch],
    first_seq: u64,
    head: &mut audit::Head,
    mut undo: Option<&mut Previous>,
) -> Result<Vec<Option<Vec<Op>>>, StoreError> {
    let [meta, records, fields, index, audit_tree] = trees;
    let now = audit::now_ms();
    let result = (meta, records, fields, index, audit_tree).transaction(|(m, r, f, i, a)| {
        let pick = |ks: Keyspace| [m, r, f, i, a][ks as usize];
        // The closure may run again on a sled conflict: work on a copy of the head.
        let mut chain = *head;
        let mut previous = Vec::new();
        let keep = undo.is_some();
        let mut applied = Vec::with_capacity(batches.len());
        for batch in batches {
            let mut holds = true;
            for (ks, key, expect) in &batch.expects {
                let current = pick(*ks).get(key.as_slice())?;
                holds &= match expect {
                    Expect::Absent => current.is_none(),
                    Expect::Value(v) => current.as_deref() == Some(v.as_slice()),
                    Expect::Present => current.is_some(),
                };
            }
            if !holds {
                applied.push(None);
                continue;
            }
            let mut linked = Vec::new();
            audit::link_events(&mut chain, now, &batch.events, &mut linked);
            for op in batch.ops.iter().chain(&linked) {
                let (ks, key, old) = match op {
                    Op::Put(ks, key, value) => {
                        (ks, key, pick(*ks).insert(key.as_slice(), value.as_slice())?)
                    }
                    Op::Delete(ks, key) => (ks, key, pick(*ks).remove(key.as_slice())?),
                };
                if keep {
                    previous.push((*ks, key.clone(), old));
                }
            }
            applied.push(Some(linked));
        }
        if chain != *head {
            // The head once per group, logged with the group's last applied batch.
            let value = chain.encode();
            let old = m.insert(audit::META_HEAD, value.as_slice())?;
            if keep {
                previous.push((Keyspace::Meta, audit::META_HEAD.to_vec(), old));
            }
            if let Some(last) = applied.iter_mut().rev().find_map(Option::as_mut) {
                last.push(Op::Put(Keyspace::Meta, audit::META_HEAD.to_vec(), value));
            }
        }
        let count = applied.iter().filter(|a| a.is_some()).count() as u64;
        if count > 0 {
            let old = m.insert(WAL_APPLIED, &(first_seq + count - 1).to_be_bytes())?;
            if keep {
                previous.push((Keyspace::Meta, WAL_APPLIED.to_vec(), old));
            }
        }
        Ok::<_, ConflictableTransactionError<()>>((applied, chain, previous))
    });
    match result {
        Ok((applied, chain, previous)) => {
            *head = chain;
            if let Some(undo) = undo.as_mut() {
                undo.extend(previous);
            }
            Ok(applied)
        }
        Err(TransactionError::Abort(())) => Err(StoreError::Conflict),
        Err(TransactionError::Storage(e)) => Err(io(e)),
    }
}

/// Undoes groups (given newest first) in one sled transaction, restoring each key's value
/// from before the group, last write first.
fn undo_groups(trees: &[sled::Tree; 5], groups: &[Undo]) -> Result<(), StoreError> {
    let [meta, records, fields, index, audit_tree] = trees;
    let result = (meta, records, fields, index, audit_tree).transaction(|(m, r, f, i, a)| {
        let pick = |ks: Keyspace| [m, r, f, i, a][ks as usize];
        for group in groups {
            for (ks, key, old) in group.previous.iter().rev() {
                match old {
                    Some(v) => {
                        pick(*ks).insert(key.as_slice(), v.clone())?;
                    }
                    None => {
                        pick(*ks).remove(key.as_slice())?;
                    }
                }
            }
        }
        Ok::<_, ConflictableTransactionError<()>>(())
    });
    result.map_err(|e| StoreError::Io(format!("{e:?}")))
}

impl Store for SledStore {
    async fn get(&self, ks: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
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
        let mut out = Vec::new();
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
        /// Counts this writer in `waiting` until it returns (or is cancelled).
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.inner.shared.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.inner.shared.waiting);
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.inner
            .queue
            .send(Pending { batch, reply })
            .map_err(|_| StoreError::Io("the store is closed".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Io("the commit leader stopped".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

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
        let events = store
            .scan(Keyspace::Audit, b"", None, 100)
            .await
            .expect("scan");
        assert_eq!(events.len() as u64, head.seq + 1);
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
        // As if sled had lost seqs 2 and 3 but the log kept them (plus a torn frame).
        let mut log = Vec::new();
        wal::encode_frame(
            &mut log,
            1,
            &[Op::Put(
                Keyspace::Records,
                b"k1".to_vec(),
                b"stale".to_vec(),
            )],
        );
        wal::encode_frame(
            &mut log,
            2,
            &[Op::Put(Keyspace::Records, b"k2".to_vec(), b"v2".to_vec())],
        );
        wal::encode_frame(
            &mut log,
            3,
            &[
                Op::Put(Keyspace::Fields, b"k3".to_vec(), b"v3".to_vec()),
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
                b"never acked".to_vec(),
            )],
        );
        log.extend_from_slice(&torn[..torn.len() - 3]);
        std::fs::write(wal::file_path(&wal::dir(dir.path()), 100), &log).expect("write log");

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

        // Corruption before the end of a log that is not the last one refuses to open.
        let mut bad = Vec::new();
        wal::encode_frame(
            &mut bad,
            10,
            &[Op::Put(Keyspace::Records, b"x".to_vec(), b"y".to_vec())],
        );
        bad[20] ^= 1;
        std::fs::write(wal::file_path(&wal::dir(dir.path()), 500), &bad).expect("write");
        std::fs::write(wal::file_path(&wal::dir(dir.path()), 501), b"").expect("write");
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

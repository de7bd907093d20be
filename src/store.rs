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
//! - concurrent writers share one log write + `fdatasync` (group commit): a writer waits for
//!   the first sync that starts after its frame was queued; one writer at a time runs it;
//! - at start-up the log is replayed over sled's recovered state (sled records, in the same
//!   transaction as each batch, the last sequence number it applied), then sled is flushed and
//!   fsynced and the log starts afresh; every 64 MiB of log a checkpoint does the same in the
//!   background;
//! - 2 MiB segments (blob threshold ≈ 512 KiB per logged page) and 16 KiB value chunks keep
//!   every sled page below the threshold, so sled's unsynced blob files are never used
//!   (`<dir>/blobs` stays empty; a test checks it).
//!
//! A failed log write or sync poisons the store: after an `fsync` error the page cache can no
//! longer be trusted, so every later write fails until restart (which replays the log).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::wal;

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
}

impl Keyspace {
    /// Every keyspace.
    pub const ALL: [Keyspace; 4] = [
        Keyspace::Meta,
        Keyspace::Records,
        Keyspace::Fields,
        Keyspace::Index,
    ];

    /// The keyspace's name (sled tree / SQL table).
    pub fn name(self) -> &'static str {
        match self {
            Keyspace::Meta => "meta",
            Keyspace::Records => "records",
            Keyspace::Fields => "fields",
            Keyspace::Index => "index",
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

    fn bytes(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Put(_, k, v) => k.len() + v.len(),
                Op::Delete(_, k) => k.len(),
            })
            .sum()
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

struct SledInner {
    db: sled::Db,
    trees: [sled::Tree; 4],
    data_file: std::fs::File,
    dir: PathBuf,
    durability: Durability,
    /// Applies batches to sled and appends their frames, in one order.
    log: Mutex<LogState>,
    /// The open log file; held by whoever writes and syncs it.
    file: Mutex<LogFile>,
    /// Sequence number up to which batches are durable.
    durable: tokio::sync::watch::Sender<u64>,
    /// Whether a group flush is running.
    flushing: AtomicBool,
    /// Whether a checkpoint is running.
    checkpointing: AtomicBool,
    /// Set after a failed write or sync.
    poisoned: Mutex<Option<String>>,
    flushes: AtomicU64,
}

struct LogState {
    next_seq: u64,
    /// Frames applied to sled but not yet written to the log file.
    pending: Vec<u8>,
    /// Sequence number of the last frame in `pending` (or before it).
    last_seq: u64,
}

struct LogFile {
    file: std::fs::File,
    no: u64,
    len: u64,
}

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
        let db = sled::Config::new()
            .path(dir)
            .segment_size(SLED_SEGMENT_SIZE)
            .cache_capacity(256 * 1024 * 1024)
            .open()
            .map_err(io)?;
        let tree = |ks: Keyspace| db.open_tree(ks.name()).map_err(io);
        let trees = [
            tree(Keyspace::Meta)?,
            tree(Keyspace::Records)?,
            tree(Keyspace::Fields)?,
            tree(Keyspace::Index)?,
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
                };
                apply(&trees, &batch, frame.seq)?;
                last = last.max(frame.seq);
            }
        }
        if last > applied {
            tracing::info!(batches = last - applied, "replayed the write-ahead log");
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
        Ok(SledStore {
            inner: Arc::new(SledInner {
                db,
                trees,
                data_file,
                dir: dir.to_path_buf(),
                durability,
                log: Mutex::new(LogState {
                    next_seq: last + 1,
                    pending: Vec::new(),
                    last_seq: last,
                }),
                file: Mutex::new(LogFile { file, no, len: 0 }),
                durable: tokio::sync::watch::channel(last).0,
                flushing: AtomicBool::new(false),
                checkpointing: AtomicBool::new(false),
                poisoned: Mutex::new(None),
                flushes: AtomicU64::new(0),
            }),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// How many log syncs have run; with concurrent writers this is lower than the number
    /// of commits.
    pub fn flush_count(&self) -> u64 {
        self.inner.flushes.load(Ordering::Relaxed)
    }

    fn tree(&self, ks: Keyspace) -> &sled::Tree {
        &self.inner.trees[ks as usize]
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

/// Applies `batch` to sled in one transaction, recording `seq` as the last applied batch.
fn apply(trees: &[sled::Tree; 4], batch: &Batch, seq: u64) -> Result<(), StoreError> {
    let [meta, records, fields, index] = trees;
    let result = (meta, records, fields, index).transaction(|(m, r, f, i)| {
        let pick = |ks: Keyspace| match ks {
            Keyspace::Meta => m,
            Keyspace::Records => r,
            Keyspace::Fields => f,
            Keyspace::Index => i,
        };
        for (ks, key, expect) in &batch.expects {
            let current = pick(*ks).get(key.as_slice())?;
            let holds = match expect {
                Expect::Absent => current.is_none(),
                Expect::Value(v) => current.as_deref() == Some(v.as_slice()),
            };
            if !holds {
                return Err(ConflictableTransactionError::Abort(()));
            }
        }
        for op in &batch.ops {
            match op {
                Op::Put(ks, key, value) => {
                    pick(*ks).insert(key.as_slice(), value.as_slice())?;
                }
                Op::Delete(ks, key) => {
                    pick(*ks).remove(key.as_slice())?;
                }
            }
        }
        m.insert(WAL_APPLIED, &seq.to_be_bytes())?;
        Ok(())
    });
    match result {
        Ok(()) => Ok(()),
        Err(TransactionError::Abort(())) => Err(StoreError::Conflict),
        Err(TransactionError::Storage(e)) => Err(io(e)),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl SledInner {
    fn check_poisoned(&self) -> Result<(), StoreError> {
        match &*self.poisoned.lock() {
            Some(reason) => Err(StoreError::Poisoned(reason.clone())),
            None => Ok(()),
        }
    }

    /// Applies the batch to sled and queues its log frame, under one lock so that the log
    /// order is the apply order. Returns the batch's sequence number.
    fn apply_and_log(&self, batch: &Batch) -> Result<u64, StoreError> {
        let mut log = self.log.lock();
        let seq = log.next_seq;
        apply(&self.trees, batch, seq)?;
        wal::encode_frame(&mut log.pending, seq, &batch.ops);
        log.next_seq += 1;
        log.last_seq = seq;
        Ok(seq)
    }

    /// Writes every queued frame to the log file and syncs it; returns the sequence number
    /// now durable. With `always_sync`, syncs even when nothing was queued.
    fn write_log(self: &Arc<Self>, always_sync: bool) -> Result<u64, StoreError> {
        let mut file = self.file.lock();
        let (frames, upto) = {
            let mut log = self.log.lock();
            (std::mem::take(&mut log.pending), log.last_seq)
        };
        if frames.is_empty() && !always_sync {
            // Everything queued before was written and synced by an earlier flush.
            return Ok(upto);
        }
        let result = (|| {
            use std::io::Write;
            file.file.write_all(&frames)?;
            file.file.sync_data()
        })();
        self.flushes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            let reason = format!("write-ahead log write or sync failed: {e}");
            *self.poisoned.lock() = Some(reason.clone());
            return Err(StoreError::Poisoned(reason));
        }
        file.len += frames.len() as u64;
        if file.len > CHECKPOINT_BYTES && !self.checkpointing.swap(true, Ordering::SeqCst) {
            self.rotate(&mut file)?;
        }
        Ok(upto)
    }

    /// Starts a new log file and, in the background, makes sled durable and deletes the old
    /// one (every batch in it was applied to sled before it was written to the log).
    fn rotate(self: &Arc<Self>, file: &mut LogFile) -> Result<(), StoreError> {
        let wal_dir = wal::dir(&self.dir);
        let new = create_log_file(&wal_dir, file.no + 1)?;
        let old = wal::file_path(&wal_dir, file.no);
        *file = LogFile {
            file: new,
            no: file.no + 1,
            len: 0,
        };
        let inner = Arc::clone(self);
        std::thread::spawn(move || {
            let result = inner
                .db
                .flush()
                .map_err(io)
                .and_then(|_| inner.data_file.sync_data().map_err(io))
                .and_then(|_| std::fs::remove_file(&old).map_err(io))
                .and_then(|_| sync_dir(&wal_dir).map_err(io));
            if let Err(e) = result {
                tracing::error!(error = %e, "checkpoint failed; the log is kept and replayed at the next start");
            }
            inner.checkpointing.store(false, Ordering::SeqCst);
        });
        Ok(())
    }

    /// Group commit: returns once the batch with sequence number `seq` is durable. One writer
    /// at a time writes and syncs the log for every frame queued so far.
    async fn wait_durable(self: &Arc<Self>, seq: u64) -> Result<(), StoreError> {
        let mut rx = self.durable.subscribe();
        loop {
            let durable = *rx.borrow_and_update();
            self.check_poisoned()?;
            if durable >= seq {
                return Ok(());
            }
            if !self.flushing.swap(true, Ordering::SeqCst) {
                let inner = Arc::clone(self);
                let result = tokio::task::spawn_blocking(move || inner.write_log(false))
                    .await
                    .map_err(io)
                    .and_then(|r| r);
                // Reset before publishing, so that a waiter who saw `flushing` set is
                // guaranteed to be woken by the publication below.
                self.flushing.store(false, Ordering::SeqCst);
                self.durable.send_modify(|d| {
                    if let Ok(upto) = &result {
                        *d = (*d).max(*upto);
                    }
                });
                result?;
                continue;
            }
            if rx.changed().await.is_err() {
                return Err(StoreError::Io("group commit channel closed".into()));
            }
        }
    }
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

    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        self.inner.check_poisoned()?;
        let seq = if batch.bytes() > 256 * 1024 {
            let inner = Arc::clone(&self.inner);
            tokio::task::spawn_blocking(move || inner.apply_and_log(&batch))
                .await
                .map_err(io)??
        } else {
            self.inner.apply_and_log(&batch)?
        };
        match self.inner.durability {
            Durability::GroupCommit => self.inner.wait_durable(seq).await,
            Durability::PerWrite => {
                let inner = Arc::clone(&self.inner);
                tokio::task::spawn_blocking(move || inner.write_log(true))
                    .await
                    .map_err(io)?
                    .map(|_| ())
            }
        }
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

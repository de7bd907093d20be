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
//! never fsyncs. [`SledStore`] closes both gaps:
//! - after sled's flush it calls `fdatasync` on sled's data file (`<dir>/db`), in the same group
//!   commit, so an acknowledged write survives power loss, not only `kill -9`;
//! - it configures 2 MiB segments (blob threshold ≈ 512 KiB per logged page) and the vault seals
//!   large values in 16 KiB chunks, so that no page ever crosses the threshold and sled's
//!   unsynced blob files are never used (`<dir>/blobs` stays empty; a test checks it).
//!
//! Concurrent writers share flushes (group commit): a writer whose batch is applied waits for
//! the first flush that *starts* after its batch; one writer at a time runs the flush for all.
//! A failed flush poisons the store: after an `fsync` error the page cache can no longer be
//! trusted, so every later write fails until restart.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

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

/// How writes are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Concurrent writers share one sled flush + `fdatasync` (group commit). The default.
    #[default]
    GroupCommit,
    /// Every write runs its own flush + `fdatasync`, one after another. Only a baseline for
    /// the load benchmark; never faster.
    PerWrite,
}

/// The embedded sled backend.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<SledInner>,
}

struct SledInner {
    db: sled::Db,
    trees: [sled::Tree; 4],
    data_file: std::fs::File,
    dir: PathBuf,
    group: GroupCommit,
    durability: Durability,
    per_write: Mutex<()>,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl SledStore {
    /// Opens (creating if needed) a sled store in `dir`, with group commit.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        SledStore::open_with(dir, Durability::GroupCommit)
    }

    /// Opens (creating if needed) a sled store in `dir` with the given durability mode.
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
        db.flush().map_err(io)?;
        let data_file = std::fs::File::open(dir.join("db")).map_err(io)?;
        data_file.sync_all().map_err(io)?;
        if let Ok(conf) = std::fs::File::open(dir.join("conf")) {
            conf.sync_all().map_err(io)?;
        }
        sync_dir(dir).map_err(io)?;
        Ok(SledStore {
            inner: Arc::new(SledInner {
                db,
                trees,
                data_file,
                dir: dir.to_path_buf(),
                group: GroupCommit::default(),
                durability,
                per_write: Mutex::new(()),
            }),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// How many flushes (sled flush + fdatasync) have run; with concurrent writers this is
    /// lower than the number of commits.
    pub fn flush_count(&self) -> u64 {
        self.inner.group.flushes.load(Ordering::Relaxed)
    }

    fn tree(&self, ks: Keyspace) -> &sled::Tree {
        &self.inner.trees[ks as usize]
    }

    fn apply(inner: &SledInner, batch: &Batch) -> Result<(), StoreError> {
        let [meta, records, fields, index] = &inner.trees;
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
            Ok(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(())) => Err(StoreError::Conflict),
            Err(TransactionError::Storage(e)) => Err(io(e)),
        }
    }

    fn make_durable(inner: &SledInner) -> Result<(), StoreError> {
        inner.db.flush().map_err(io)?;
        inner.data_file.sync_data().map_err(io)
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
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
        self.inner.group.check_poisoned()?;
        if batch.bytes() > 256 * 1024 {
            let inner = Arc::clone(&self.inner);
            tokio::task::spawn_blocking(move || SledStore::apply(&inner, &batch))
                .await
                .map_err(io)??;
        } else {
            SledStore::apply(&self.inner, &batch)?;
        }
        let inner = Arc::clone(&self.inner);
        if self.inner.durability == Durability::PerWrite {
            return tokio::task::spawn_blocking(move || {
                let _one_at_a_time = inner.per_write.lock();
                SledStore::make_durable(&inner)
            })
            .await
            .map_err(io)?;
        }
        self.inner
            .group
            .wait_durable(move || SledStore::make_durable(&inner))
            .await
    }
}

/// Group commit: many writers, one flush at a time, each flush covering every batch applied
/// before it started.
struct GroupCommit {
    /// Sequence number of the last applied batch.
    applied: AtomicU64,
    /// Whether a flush is running.
    flushing: AtomicBool,
    /// Sequence number up to which batches are durable.
    durable: tokio::sync::watch::Sender<u64>,
    /// Set after a failed flush.
    poisoned: Mutex<Option<String>>,
    flushes: AtomicU64,
}

impl Default for GroupCommit {
    fn default() -> Self {
        Self {
            applied: AtomicU64::new(0),
            flushing: AtomicBool::new(false),
            durable: tokio::sync::watch::channel(0).0,
            poisoned: Mutex::new(None),
            flushes: AtomicU64::new(0),
        }
    }
}

impl GroupCommit {
    fn check_poisoned(&self) -> Result<(), StoreError> {
        match &*self.poisoned.lock() {
            Some(reason) => Err(StoreError::Poisoned(reason.clone())),
            None => Ok(()),
        }
    }

    /// Called after a batch was applied: returns once a flush that started after it is done.
    async fn wait_durable<F>(&self, flush: F) -> Result<(), StoreError>
    where
        F: Fn() -> Result<(), StoreError> + Send + Sync + 'static,
    {
        let seq = self.applied.fetch_add(1, Ordering::SeqCst) + 1;
        let flush = Arc::new(flush);
        let mut rx = self.durable.subscribe();
        loop {
            let durable = *rx.borrow_and_update();
            self.check_poisoned()?;
            if durable >= seq {
                return Ok(());
            }
            if !self.flushing.swap(true, Ordering::SeqCst) {
                // Everything applied up to now is covered by this flush.
                let target = self.applied.load(Ordering::SeqCst);
                let f = Arc::clone(&flush);
                let result = tokio::task::spawn_blocking(move || f())
                    .await
                    .map_err(io)
                    .and_then(|r| r);
                self.flushes.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = &result {
                    *self.poisoned.lock() = Some(e.to_string());
                }
                // Reset before publishing, so that a waiter who saw `flushing` set is
                // guaranteed to be woken by the publication below.
                self.flushing.store(false, Ordering::SeqCst);
                self.durable.send_modify(|d| {
                    if result.is_ok() {
                        *d = (*d).max(target);
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

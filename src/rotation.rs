//! Key lifecycle over a vault: exact per-version record counts, and the persisted background
//! jobs that move data keys to the active KEK (rewrap) or replace them (re-key).
//!
//! ```text
//! meta/job/current → JobState (JSON): kind, category, total, done, cursor (last record id
//!                    handled), started, finished, error
//! ```
//!
//! A job walks the `records` keyspace in id order, a page at a time. Each page is one atomic
//! batch: the re-sealed record headers (each expected unchanged since it was read), for a
//! re-key the re-encrypted field chunks, one audit event per record (principal
//! [`JOB_PRINCIPAL`]) and the job state with its new cursor. Up to three (`COMMITS_IN_FLIGHT`)
//! pages commit at once, so a crash loses at most those, and the job resumes from the cursor
//! stored with the last durable page; redoing a record is harmless (idempotent: rewrap skips
//! keys already under the active KEK, re-key skips keys made after the job started). A page
//! that meets a concurrent change is re-read and redone as one batch again; only records that
//! keep conflicting are split off (halving the set, down to single records). Every pass ends
//! with a count: if records still need the job (a rotation during a rewrap, a write from an
//! instance with an older key ring, a page whose redo a crash cut short, a record whose field
//! a re-key found replaced under it), it runs another pass.
//!
//! Counts are exact because they are counted: a scan of every record header (MAC-checked,
//! the data keys alone decoded, on two tasks).
//! That is O(records) per status call; the PostgreSQL store will keep the KEK version in an
//! indexed column instead.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::watch;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::audit;
use crate::crypto::{SealingKey, SecretKey};
use crate::error::VaultError;
use crate::lease::{self, Lease};
use crate::record::{self, RecordBody};
use crate::schema::Category;
use crate::store::{Batch, Expect, Keyspace, Store, StoreError};
use crate::vault::{self, Vault};

/// Principal of the audit events a job writes.
pub const JOB_PRINCIPAL: &str = "system:key-job";
/// Principal of the audit events of scheduled rotations.
pub const SCHEDULE_PRINCIPAL: &str = "system:key-schedule";
/// Role named in system events.
pub const SYSTEM_ROLE: &str = "system";
/// Meta key of the current (or last) job.
pub const META_JOB: &[u8] = b"job/current";
/// Meta key of the job before the current one (kept when a new job replaces it, so that a
/// watcher on another instance still learns how the job it followed ended).
pub const META_JOB_PREVIOUS: &[u8] = b"job/previous";
/// Records per job page (one atomic batch).
pub const JOB_PAGE: usize = 1024;
/// A job batch is committed once it holds this many bytes (re-keyed chunks), even before
/// the end of its page.
pub const JOB_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Passes a rewrap makes before it gives up on records that keep needing it.
const MAX_PASSES: u32 = 8;
/// Tries per record when a page's redo has narrowed a conflict down to that record.
const MAX_RECORD_TRIES: usize = 32;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Re-wraps data keys under the active KEK; field ciphertext is untouched.
    Rewrap,
    /// Replaces a category's data keys and re-encrypts its fields.
    Rekey,
}

impl JobKind {
    /// The job's name (`rewrap`, `rekey`).
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Rewrap => "rewrap",
            JobKind::Rekey => "rekey",
        }
    }

    fn record_action(self) -> &'static str {
        match self {
            JobKind::Rewrap => "RewrapRecord",
            JobKind::Rekey => "RekeyRecord",
        }
    }

    fn resumed_action(self) -> &'static str {
        match self {
            JobKind::Rewrap => "RewrapResumed",
            JobKind::Rekey => "RekeyResumed",
        }
    }

    fn finished_action(self) -> &'static str {
        match self {
            JobKind::Rewrap => "RewrapFinished",
            JobKind::Rekey => "RekeyFinished",
        }
    }
}

/// The categories a key job or call covers, as its audit events name them: its category, or
/// every category for a job over all of them (review 16: those named none).
pub fn category_names(category: Option<&str>) -> Vec<String> {
    match category {
        Some(c) => vec![c.to_string()],
        None => Category::ALL
            .iter()
            .map(|c| c.as_str().to_string())
            .collect(),
    }
}

/// A job as stored in `meta/job/current`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobState {
    /// Job id.
    pub id: String,
    /// What it does.
    pub kind: JobKind,
    /// Its category; `None` = every category (rewrap only).
    pub category: Option<String>,
    /// Records that needed the job when it started.
    pub total: u64,
    /// Records handled so far.
    pub done: u64,
    /// Hex id of the last record handled in the current pass.
    pub cursor: Option<String>,
    /// Pass number, from 1.
    pub pass: u32,
    /// Start, Unix milliseconds.
    pub started_ms: i64,
    /// End, Unix milliseconds, once finished.
    #[serde(default)]
    pub finished_ms: Option<i64>,
    /// Who asked for it.
    pub requested_by: String,
    /// Why it stopped, if it failed (it resumes when the same job is requested again).
    #[serde(default)]
    pub error: Option<String>,
    /// A re-key replaces the data keys made (their `created_ms`) at or before this: its start,
    /// or the newest data key in its scope then if that is later (made while the clock ran
    /// ahead; review 16: such keys were skipped, and the job said it had re-keyed them all).
    /// Absent in jobs stored before it was kept: the start.
    #[serde(default)]
    pub cutoff_ms: Option<i64>,
}

impl JobState {
    /// See [`JobState::cutoff_ms`].
    fn cutoff(&self) -> i64 {
        self.cutoff_ms
            .unwrap_or(self.started_ms)
            .max(self.started_ms)
    }

    fn scope(&self) -> Result<Option<Category>, VaultError> {
        match &self.category {
            None => Ok(None),
            Some(c) => Category::parse(c)
                .map(Some)
                .ok_or_else(|| VaultError::Internal(format!("stored job names category {c}"))),
        }
    }

    fn progress(&self) -> Progress {
        Progress {
            category: self.category.clone().unwrap_or_default(),
            done: self.done.min(self.total),
            total: self.total,
            finished: self.finished_ms.is_some(),
            error: self.error.clone(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("JobState serializes (strings and integers)")
    }
}

/// A job's progress, as streamed to callers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Progress {
    /// The job's category; empty = every category.
    pub category: String,
    /// Records handled.
    pub done: u64,
    /// Records that needed the job when it started.
    pub total: u64,
    /// Whether it has finished.
    pub finished: bool,
    /// Why it stopped, if it failed.
    pub error: Option<String>,
}

/// Re-reads the key ring, so that a job or count started on this instance sees the KEK
/// versions another instance made (a stale ring would take records under the newest version
/// for records under an old one, and a rewrap would find nothing to do).
pub async fn refresh_keys<S: Store>(vault: &Vault<S>) -> Result<(), VaultError> {
    vault
        .keys()
        .reload(vault.store())
        .await
        .map_err(|e| VaultError::Internal(format!("reloading the key ring: {e}")))
}

/// Reads the stored job, if any.
pub async fn stored_job<S: Store>(store: &S) -> Result<Option<JobState>, VaultError> {
    store
        .get(Keyspace::Meta, META_JOB)
        .await?
        .as_deref()
        .map(parse_job)
        .transpose()
}

/// Parses a stored job state.
fn parse_job(bytes: &[u8]) -> Result<JobState, VaultError> {
    serde_json::from_slice(bytes)
        .map_err(|_| VaultError::Internal("stored job state is unreadable".into()))
}

/// Folds `f` over every stored record header (id, raw header) on two tasks, each walking
/// half of the id space (record ids are random, so the halves are about equal), and merges
/// the two results with `merge`. Each task reads its half a key prefix at a time.
async fn fold_headers<S, T, F>(
    vault: &Arc<Vault<S>>,
    f: F,
    merge: impl FnOnce(T, T) -> T,
) -> Result<T, VaultError>
where
    S: Store,
    T: Default + Send + 'static,
    F: Fn(&mut T, &[u8], &[u8]) -> Result<(), VaultError> + Clone + Send + Sync + 'static,
{
    let half = |first: std::ops::RangeInclusive<u8>| {
        let vault = Arc::clone(vault);
        let f = f.clone();
        tokio::spawn(async move {
            let mut acc = T::default();
            for byte in first {
                let prefix = [byte];
                let mut after: Option<Vec<u8>> = None;
                loop {
                    let page = vault
                        .store()
                        .scan(Keyspace::Records, &prefix, after.as_deref(), JOB_PAGE)
                        .await?;
                    for (key, raw) in &page {
                        f(&mut acc, key, raw)?;
                    }
                    match page.into_iter().last() {
                        Some((last, _)) => after = Some(last),
                        None => break,
                    }
                }
            }
            Ok::<T, VaultError>(acc)
        })
    };
    let low = half(0..=127);
    let high = half(128..=255);
    let joined = |r: Result<Result<T, VaultError>, tokio::task::JoinError>| {
        r.map_err(|e| VaultError::Internal(format!("a key count task failed: {e}")))?
    };
    let low = joined(low.await)?;
    let high = joined(high.await)?;
    Ok(merge(low, high))
}

/// The error for record `key`'s header that failed its checks.
fn damaged_header(key: &[u8]) -> VaultError {
    VaultError::DataLoss {
        record_id: vault::uuid_string(key),
        part: "record header".into(),
    }
}

fn open_header<S: Store>(
    vault: &Vault<S>,
    key: &[u8],
    raw: &[u8],
) -> Result<RecordBody, VaultError> {
    let (kv, ik) = vault.keys().integrity_key();
    RecordBody::open(key, raw, kv, ik).map_err(|_| damaged_header(key))
}

/// Exactly how many records each KEK version wraps a data key for, by category and version.
/// Every header is MAC-checked ([`record::DekHeader`]: the data keys alone are decoded).
pub async fn version_counts<S: Store>(
    vault: &Arc<Vault<S>>,
) -> Result<BTreeMap<(Category, u32), u64>, VaultError> {
    let keys = Arc::clone(vault);
    fold_headers(
        vault,
        move |counts: &mut BTreeMap<(Category, u32), u64>, key, raw| {
            let (kv, ik) = keys.keys().integrity_key();
            let header =
                record::DekHeader::open(key, raw, kv, ik).map_err(|_| damaged_header(key))?;
            for (name, dek) in &header.deks {
                if let Some(category) = Category::parse(name) {
                    *counts.entry((category, dek.kek_version)).or_insert(0) += 1;
                }
            }
            Ok(())
        },
        |mut a, b| {
            for (k, n) in b {
                *a.entry(k).or_insert(0) += n;
            }
            a
        },
    )
    .await
}

/// The categories of a record (its wrapped `deks`) that a job of `kind` over `scope` still
/// has to handle, given the `active` KEK versions.
fn needs(
    active: &BTreeMap<Category, u32>,
    kind: JobKind,
    scope: Option<Category>,
    cutoff_ms: i64,
    deks: &BTreeMap<String, record::StoredDek>,
) -> Vec<Category> {
    deks.iter()
        .filter_map(|(name, dek)| {
            due(
                active,
                kind,
                scope,
                cutoff_ms,
                name,
                dek.kek_version,
                dek.created_ms,
            )
        })
        .collect()
}

/// [`needs`] for `job` under the vault's current key ring.
fn job_needs<S: Store>(
    vault: &Vault<S>,
    job: &JobState,
    scope: Option<Category>,
    deks: &BTreeMap<String, record::StoredDek>,
) -> Vec<Category> {
    needs(
        &vault.keys().active_versions(),
        job.kind,
        scope,
        job.cutoff(),
        deks,
    )
}

/// The category of a record's data key (`name`, wrapped under `kek_version`, made at
/// `created_ms`) if a job of `kind` over `scope` whose cutoff is `cutoff_ms`
/// ([`JobState::cutoff_ms`]) still has to handle it.
fn due(
    active: &BTreeMap<Category, u32>,
    kind: JobKind,
    scope: Option<Category>,
    cutoff_ms: i64,
    name: &str,
    kek_version: u32,
    created_ms: i64,
) -> Option<Category> {
    let category = Category::parse(name)?;
    if scope.is_some_and(|s| s != category) {
        return None;
    }
    let due = match kind {
        JobKind::Rewrap => active.get(&category) != Some(&kek_version),
        JobKind::Rekey => created_ms <= cutoff_ms,
    };
    due.then_some(category)
}

/// How many records a job of `kind` over `scope` with cutoff `cutoff_ms` has to handle. Reads
/// only the data keys of each header (no MAC check: the job itself checks every header it
/// changes), so a count costs a fraction of a pass.
pub async fn count_needing<S: Store>(
    vault: &Arc<Vault<S>>,
    kind: JobKind,
    scope: Option<Category>,
    cutoff_ms: i64,
) -> Result<u64, VaultError> {
    let active = vault.keys().active_versions();
    fold_headers(
        vault,
        move |n: &mut u64, key, raw| {
            let mut any = false;
            record::peek_dek_versions(raw, |name, version, created| {
                any |= due(&active, kind, scope, cutoff_ms, name, version, created).is_some();
            })
            .map_err(|_| damaged_header(key))?;
            *n += u64::from(any);
            Ok(())
        },
        |a, b| a + b,
    )
    .await
}

/// For a re-key starting at `since` over `scope`: its cutoff ([`JobState::cutoff_ms`]: the
/// newest data key in scope was made then, or `since` if later) and how many records it has
/// to handle (every record with a data key in scope: each is at or before the cutoff), in
/// one pass over the headers.
async fn rekey_census<S: Store>(
    vault: &Arc<Vault<S>>,
    scope: Option<Category>,
    since: i64,
) -> Result<(i64, u64), VaultError> {
    fold_headers(
        vault,
        move |(newest, n): &mut (i64, u64), key, raw| {
            let mut any = false;
            record::peek_dek_versions(raw, |name, _, created| {
                let in_scope = Category::parse(name).is_some_and(|c| scope.is_none_or(|s| s == c));
                if in_scope {
                    *newest = (*newest).max(created);
                    any = true;
                }
            })
            .map_err(|_| damaged_header(key))?;
            *n += u64::from(any);
            Ok(())
        },
        |a: (i64, u64), b: (i64, u64)| (a.0.max(b.0), a.1 + b.1),
    )
    .await
    .map(|(newest, n)| (newest.max(since), n))
}

/// Re-wraps ([`rewrap_record`]) or re-keys the categories of one record that need it, adding
/// the writes (header expected unchanged, chunks, event) to `batch`. Returns whether the
/// record needed anything.
async fn handle_record<S: Store>(
    vault: &Vault<S>,
    job: &JobState,
    scope: Option<Category>,
    key: &[u8],
    raw: &[u8],
    batch: &mut Batch,
    keks: &mut BTreeSet<(Category, u32)>,
) -> Result<bool, VaultError> {
    if job.kind == JobKind::Rewrap {
        return rewrap_record(vault, job, scope, key, raw, batch, keks);
    }
    let mut body = open_header(vault, key, raw)?;
    let due = job_needs(vault, job, scope, &body.deks);
    if due.is_empty() {
        return Ok(false);
    }
    let id = body.id.clone();
    let mut fields_touched = Vec::new();
    // This record's writes, added to `batch` only once the record is done whole: a record
    // left half-done must leave nothing behind (its new chunks without its new header would
    // be unreadable).
    let mut own = Batch::default();
    for &category in &due {
        let stored = body
            .deks
            .get(category.as_str())
            .cloned()
            .ok_or_else(|| VaultError::Internal("a due category has a data key".into()))?;
        let opener = crate::crypto::OpeningKey::new(&vault.unwrap(&id, category, &stored)?);
        let fresh = SecretKey::generate()?;
        // The next generation: its field envelopes say which data key sealed them.
        let generation = stored.generation().saturating_add(1);
        let sealer = SealingKey::new(&fresh, generation);
        for (name, entry) in body.fields.iter_mut() {
            if entry.category != category.as_str() {
                continue;
            }
            let plaintext: Zeroizing<Vec<u8>> =
                match vault.read_field(&id, name, entry, &opener).await {
                    Ok(p) => p,
                    // An update (or erasure) replaced the field's chunks since the page was read:
                    // not damage. The record is left for the next pass, whose count finds it.
                    Err(VaultError::DataLoss { .. })
                        if vault.store().get(Keyspace::Records, key).await?.as_deref()
                            != Some(raw) =>
                    {
                        return Ok(false);
                    }
                    Err(e) => return Err(e),
                };
            // The opened value is sealed under the fresh key where it lies.
            let sealed = record::seal_field(&sealer, &id, name, plaintext)?;
            entry.digest = sealed.digest.to_vec();
            crate::vault::place_chunks(&mut own, &id, name, entry.revision, sealed, entry.stored())
                .record_in(entry);
            fields_touched.push(name.clone());
        }
        let mut wrapped = vault.wrap(&id, category, &fresh)?;
        // Made after the job's cutoff, so a resumed job never re-keys it again.
        wrapped.created_ms = wrapped.created_ms.max(job.cutoff() + 1);
        wrapped.dek_generation = generation;
        body.deks.insert(category.as_str().into(), wrapped);
    }
    // The KEKs now wrapping this record's new or moved DEKs must still exist at commit
    // (expected once per batch, see `expect_keks`).
    for category in &due {
        if let Some(dek) = body.deks.get(category.as_str()) {
            keks.insert((*category, dek.kek_version));
        }
    }
    let (kv, ik) = vault.keys().integrity_key();
    batch.expect(Keyspace::Records, key.to_vec(), Expect::Value(raw.to_vec()));
    batch.ops.append(&mut own.ops);
    batch.put(Keyspace::Records, key.to_vec(), body.seal(kv, ik));
    if vault.auditing() {
        let mut draft = audit::Draft::new(job.kind.record_action(), JOB_PRINCIPAL, SYSTEM_ROLE);
        draft.record_id = vault::uuid_string(key);
        draft.field_names = fields_touched;
        draft.outcome = audit::Outcome::Ok.as_str().into();
        batch.append_event(draft.encode());
    }
    Ok(true)
}

/// [`handle_record`] for a rewrap: only the header's data keys are decoded and changed
/// ([`record::DekHeader`]); the rest of the header is copied as it was.
fn rewrap_record<S: Store>(
    vault: &Vault<S>,
    job: &JobState,
    scope: Option<Category>,
    key: &[u8],
    raw: &[u8],
    batch: &mut Batch,
    keks: &mut BTreeSet<(Category, u32)>,
) -> Result<bool, VaultError> {
    let (kv, ik) = vault.keys().integrity_key();
    let mut header = record::DekHeader::open(key, raw, kv, ik).map_err(|_| damaged_header(key))?;
    let due = job_needs(vault, job, scope, &header.deks);
    if due.is_empty() {
        return Ok(false);
    }
    for category in due {
        let stored = header
            .deks
            .get(category.as_str())
            .ok_or_else(|| VaultError::Internal("a due category has a data key".into()))?;
        let dek = vault.unwrap(key, category, stored)?;
        let mut wrapped = vault.wrap(key, category, &dek)?;
        // The same data key: keep when it was made, and its generation.
        wrapped.created_ms = stored.created_ms;
        wrapped.dek_generation = stored.dek_generation;
        // The KEK now wrapping it must still exist at commit (see `expect_keks`).
        keks.insert((category, wrapped.kek_version));
        header.deks.insert(category.as_str().into(), wrapped);
    }
    batch.expect(Keyspace::Records, key.to_vec(), Expect::Value(raw.to_vec()));
    batch.put(
        Keyspace::Records,
        key.to_vec(),
        header.seal(kv, ik).map_err(|_| damaged_header(key))?,
    );
    if vault.auditing() {
        let mut draft = audit::Draft::new(job.kind.record_action(), JOB_PRINCIPAL, SYSTEM_ROLE);
        draft.record_id = vault::uuid_string(key);
        draft.outcome = audit::Outcome::Ok.as_str().into();
        batch.append_event(draft.encode());
    }
    Ok(true)
}

/// Adds an `Expect::Present` on each KEK in `keks` (see [`vault::expect_keks`]).
fn expect_keks(batch: &mut Batch, keks: &BTreeSet<(Category, u32)>) {
    for &(category, version) in keks {
        batch.expect(
            Keyspace::Meta,
            crate::keys::kek_meta_key(category, version),
            Expect::Present,
        );
    }
}

/// One job batch, prepared and not yet committed.
struct Prepared {
    batch: Batch,
    /// The records it covers (their headers as read).
    page: Vec<(Vec<u8>, Vec<u8>)>,
    /// How many of them needed the job.
    handled: u64,
}

/// Reads the records after `after` and prepares the batch handling them: up to [`JOB_PAGE`]
/// records or [`JOB_BATCH_BYTES`]. `None` at the end of a pass.
async fn prepare<S: Store>(
    vault: &Arc<Vault<S>>,
    job: &JobState,
    scope: Option<Category>,
    after: Option<Vec<u8>>,
) -> Result<Option<Prepared>, VaultError> {
    let scan = || {
        vault
            .store()
            .scan(Keyspace::Records, b"", after.as_deref(), JOB_PAGE)
    };
    let page = scan().await?;
    if page.is_empty() {
        return Ok(None);
    }
    build_current(vault, job, scope, page, async || Ok(scan().await?))
        .await
        .map(Some)
}

/// [`build`]; if that fails and the page, read again by `reread`, names a KEK version this
/// ring did not hold ([`caught_up`]: the ring is reloaded), [`build`] once more on it.
async fn build_current<S: Store>(
    vault: &Arc<Vault<S>>,
    job: &JobState,
    scope: Option<Category>,
    page: Page,
    reread: impl AsyncFnOnce() -> Result<Page, VaultError>,
) -> Result<Prepared, VaultError> {
    match build(vault, job, scope, page).await {
        Err(e) => {
            let page = reread().await?;
            if page.is_empty() || !caught_up(vault, &page).await? {
                return Err(e);
            }
            build(vault, job, scope, page).await
        }
        built => built,
    }
}

/// The records of `keys` that still exist, in the order given.
async fn read_records<S: Store>(
    store: &S,
    keys: impl IntoIterator<Item = Vec<u8>>,
) -> Result<Page, VaultError> {
    let mut records = Vec::new();
    for key in keys {
        if let Some(raw) = store.get(Keyspace::Records, &key).await? {
            records.push((key, raw));
        }
    }
    Ok(records)
}

/// Whether a record of `page` names a KEK version this ring does not hold: one made by
/// another instance sharing the store (a rotation there while this job runs). If so, the
/// ring is reloaded, as [`Vault::load`] does for a request, and the page can be handled
/// again. Only asked after handling a page failed, so a pass pays nothing for it.
async fn caught_up<S: Store>(vault: &Vault<S>, page: &Page) -> Result<bool, VaultError> {
    let keys = vault.keys();
    let mut unknown = false;
    for (_, raw) in page {
        // A header that does not decode fails the page again, as it did.
        let _ = record::peek_dek_versions(raw, |name, version, _| {
            unknown |= Category::parse(name).is_some_and(|c| !keys.holds(c, version));
        });
    }
    if unknown {
        refresh_keys(vault).await?;
    }
    Ok(unknown)
}

/// Prepares the batch handling `page` (records in id order, headers as read): the records
/// up to [`JOB_BATCH_BYTES`] (the prepared page is cut there; the rest follows in the next
/// batch). A rewrap page of at least `2 * MIN_PARALLEL_HALF` records is prepared in halves
/// ([`prepare_in_halves`]).
async fn build<S: Store>(
    vault: &Arc<Vault<S>>,
    job: &JobState,
    scope: Option<Category>,
    mut page: Page,
) -> Result<Prepared, VaultError> {
    if job.kind == JobKind::Rewrap && page.len() >= 2 * MIN_PARALLEL_HALF {
        return prepare_in_halves(vault, job, scope, page).await;
    }
    let mut batch = Batch::default();
    let mut keks = BTreeSet::new();
    let mut handled = 0u64;
    let mut taken = 0;
    for (key, raw) in &page {
        if handle_record(vault, job, scope, key, raw, &mut batch, &mut keks).await? {
            handled += 1;
        }
        taken += 1;
        // Re-keyed fields make big batches: end the batch early, the rest follows.
        if batch.bytes() >= JOB_BATCH_BYTES {
            break;
        }
    }
    page.truncate(taken);
    expect_keks(&mut batch, &keks);
    Ok(Prepared {
        batch,
        page,
        handled,
    })
}

/// Fewest records of a page half worth a thread of its own.
const MIN_PARALLEL_HALF: usize = 64;

/// Prepares a rewrap page in two halves on two blocking-pool threads, so that both cores
/// open, re-wrap and re-seal headers (pure CPU work, [`rewrap_record`]) while the runtime's
/// workers lead the commits of earlier batches. A rewrap batch stays far below
/// [`JOB_BATCH_BYTES`] (headers only), so the page is never cut short.
async fn prepare_in_halves<S: Store>(
    vault: &Arc<Vault<S>>,
    job: &JobState,
    scope: Option<Category>,
    mut page: Page,
) -> Result<Prepared, VaultError> {
    let second = page.split_off(page.len() / 2);
    let half = |records: Page| {
        let vault = Arc::clone(vault);
        let job = job.clone();
        tokio::task::spawn_blocking(move || {
            let mut batch = Batch::default();
            let mut keks = BTreeSet::new();
            let mut handled = 0u64;
            for (key, raw) in &records {
                if rewrap_record(&vault, &job, scope, key, raw, &mut batch, &mut keks)? {
                    handled += 1;
                }
            }
            Ok::<_, VaultError>((records, batch, keks, handled))
        })
    };
    let first = half(page);
    let second = half(second);
    let joined = |r: Result<_, tokio::task::JoinError>| {
        r.map_err(|e| VaultError::Internal(format!("a key job thread failed: {e}")))
    };
    let (mut page, mut batch, mut keks, mut handled) = joined(first.await)??;
    let (records, more, more_keks, more_handled) = joined(second.await)??;
    page.extend(records);
    batch.expects.extend(more.expects);
    batch.ops.extend(more.ops);
    batch.events.extend(more.events);
    keks.extend(more_keks);
    handled += more_handled;
    expect_keks(&mut batch, &keks);
    Ok(Prepared {
        batch,
        page,
        handled,
    })
}

fn cursor_bytes(job: &JobState) -> Result<Option<Vec<u8>>, VaultError> {
    job.cursor
        .as_deref()
        .map(|h| {
            hex::decode(h).map_err(|_| VaultError::Internal("stored job cursor is not hex".into()))
        })
        .transpose()
}

/// Job batches committing at once. The store's stages run on different threads (the leader
/// checks a batch, the log writer writes and syncs it, the applier puts it into sled, which
/// takes as long as preparing it), so with three in flight the job keeps preparing pages
/// while earlier ones are logged and applied (measured here: 2 in flight 2.1 s per 100 000
/// records, 3 in flight 1.5–2.1 s).
const COMMITS_IN_FLIGHT: usize = 3;
// What a job commits at once must stay well inside what the audit signer allows to follow a
// checkpoint unsigned after a kill (`audit::BURST_MARGIN`).
const _: () = assert!((COMMITS_IN_FLIGHT * JOB_PAGE) as u64 * 2 <= crate::audit::BURST_MARGIN);

/// The records a job batch covers (ids and headers as read).
type Page = Vec<(Vec<u8>, Vec<u8>)>;
/// How a job batch's commit ended, with the records it covers and how many it handled.
type Committed = (Result<(), StoreError>, Page, u64);
/// A job batch being committed.
type InFlight<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Committed> + Send + 'a>>;

/// Runs (or resumes) `job` to its end, publishing progress on `tx` after every batch.
///
/// Up to [`COMMITS_IN_FLIGHT`] batches commit while the next one is prepared (they cover
/// different records, and the store applies them in the order they were handed over). Each
/// batch carries the job state with its cursor. If a batch meets a concurrent change, its
/// page is redone ([`redo_page`]) while a later batch may already be durable; a crash in
/// between leaves the page's records behind the stored cursor, where the count at the end of
/// the pass finds them and another pass handles them.
async fn run<S: Store>(
    vault: &Arc<Vault<S>>,
    mut job: JobState,
    tx: &watch::Sender<Progress>,
    lease: &Lease,
) -> Result<(), VaultError> {
    let scope = job.scope()?;
    tx.send_replace(job.progress());
    let store = vault.store();
    let mut commits: futures::stream::FuturesOrdered<InFlight<'_>> =
        futures::stream::FuturesOrdered::new();
    let mut pass = Pass {
        unsettled: 0,
        // Not resumed behind a crash's redone page.
        clean: job.cursor.is_none(),
        began_with: vault.keys().active_versions(),
    };
    let mut next = prepare(vault, &job, scope, cursor_bytes(&job)?).await?;
    loop {
        let Some(Prepared {
            mut batch,
            page,
            handled,
        }) = next
        else {
            while let Some(done) = commits.next().await {
                settle(vault, &mut job, scope, done, &mut pass, tx, lease).await?;
            }
            // End of a pass: check nothing was left behind (a page redone after a crash, a
            // record changed under a re-key, a rotation on another instance), and go round
            // again if something was.
            refresh_keys(vault).await?;
            let left = if pass.left_nothing(vault, job.kind) {
                0
            } else {
                count_needing(vault, job.kind, scope, job.cutoff()).await?
            };
            if left > 0 {
                if job.pass >= MAX_PASSES {
                    return Err(VaultError::Internal(format!(
                        "{left} records still need the {} job after {MAX_PASSES} passes",
                        job.kind.as_str()
                    )));
                }
                tracing::info!(job = %job.id, kind = job.kind.as_str(), left, "key job: another pass");
                job.pass += 1;
                job.cursor = None;
                pass.clean = true;
                pass.began_with = vault.keys().active_versions();
                next = prepare(vault, &job, scope, None).await?;
                continue;
            }
            job.done = job.total;
            job.finished_ms = Some(vault::now_ms());
            let mut batch = Batch::default();
            lease.release(&mut batch);
            batch.put(Keyspace::Meta, META_JOB.to_vec(), job.encode());
            if vault.auditing() {
                let mut draft =
                    audit::Draft::new(job.kind.finished_action(), JOB_PRINCIPAL, SYSTEM_ROLE);
                draft.field_names = category_names(job.category.as_deref());
                draft.outcome = audit::Outcome::Ok.as_str().into();
                batch.append_event(draft.encode());
            }
            store.commit(batch).await?;
            tracing::info!(job = %job.id, kind = job.kind.as_str(), total = job.total, "key job finished");
            tx.send_replace(job.progress());
            return Ok(());
        };
        let last = page
            .last()
            .map(|(k, _)| k.clone())
            .expect("a prepared batch covers at least one record");
        job.cursor = Some(hex::encode(&last));
        job.done += handled;
        lease.fence(&mut batch);
        batch.put(Keyspace::Meta, META_JOB.to_vec(), job.encode());
        pass.unsettled += handled;
        commits.push_back(Box::pin(async move {
            (store.commit(batch).await, page, handled)
        }));
        // Prepare the next batch while the batches in flight commit; settle those that end.
        let snapshot = job.clone();
        let following = prepare(vault, &snapshot, scope, Some(last));
        tokio::pin!(following);
        let following = loop {
            // The page is read and its halves handed to their threads first; then this
            // task leads the commit just queued while they work.
            tokio::select! {
                biased;
                prepared = &mut following => break prepared,
                Some(done) = commits.next(), if !commits.is_empty() => {
                    settle(vault, &mut job, scope, done, &mut pass, tx, lease).await?;
                }
            }
        };
        while commits.len() >= COMMITS_IN_FLIGHT {
            if let Some(done) = commits.next().await {
                settle(vault, &mut job, scope, done, &mut pass, tx, lease).await?;
            }
        }
        next = following?;
    }
}

/// What [`run`] keeps of the pass it is in.
struct Pass {
    /// Records handled by batches still in flight (counted in `job.done`, not yet published).
    unsettled: u64,
    /// Whether the pass began at the start of the key space in this run and has met no
    /// conflict so far (see [`Pass::left_nothing`]).
    clean: bool,
    /// The active versions the pass began with.
    began_with: BTreeMap<Category, u32>,
}

impl Pass {
    /// Whether this pass of a `kind` job, at its end, can have left no record behind, so
    /// that its end needs no count of the whole key space. Only a rewrap's: every record it
    /// read it either moved or found moved, or met in a conflict (then not clean). A record
    /// written behind its cursor during the pass carries data keys under the version active
    /// at commit, since every write expects its versions to be the active ones
    /// ([`vault::expect_keks`]); if that version changed during the pass (a rotation here
    /// or, seen by the key ring's reload just before, in another instance), the active
    /// versions differ from those it began with. A re-key leaves records changed under it for
    /// the next pass, so its passes are always counted.
    fn left_nothing<S: Store>(&self, vault: &Vault<S>, kind: JobKind) -> bool {
        kind == JobKind::Rewrap && self.clean && vault.keys().active_versions() == self.began_with
    }
}

/// Handles the end of one batch's commit: on a conflict (a concurrent write touched one of
/// its records) its page is redone ([`redo_page`]: re-read and committed as one batch again,
/// split only around records that keep conflicting), and the pass is no longer clean.
/// Then publishes progress, counting only settled batches. A conflict because another
/// instance took the job over ends the run with [`VaultError::Conflict`] (the caller sees
/// the lease is gone).
async fn settle<S: Store>(
    vault: &Arc<Vault<S>>,
    job: &mut JobState,
    scope: Option<Category>,
    (committed, page, handled): Committed,
    pass: &mut Pass,
    tx: &watch::Sender<Progress>,
    lease: &Lease,
) -> Result<(), VaultError> {
    pass.unsettled -= handled;
    match committed {
        Ok(()) => {}
        Err(StoreError::Conflict) => {
            pass.clean = false;
            if !lease.still_ours(vault.store()).await? {
                return Err(VaultError::Conflict(
                    "the key job was taken over by another instance".into(),
                ));
            }
            job.done -= handled;
            job.done += redo_page(vault, job, scope, &page, lease).await?;
            let mut batch = Batch::default();
            lease.fence(&mut batch);
            batch.put(Keyspace::Meta, META_JOB.to_vec(), job.encode());
            vault.store().commit(batch).await?;
        }
        Err(e) => return Err(e.into()),
    }
    let mut progress = job.progress();
    progress.done = progress.done.saturating_sub(pass.unsettled);
    tx.send_replace(progress);
    Ok(())
}

/// Redoes the records of `page`, whose batch met a conflict (a concurrent write changed one
/// of them after the page was read): re-reads them and commits the job's writes for those
/// that still need it as one batch again, built like a page's ([`build`]: each header
/// expected as re-read, the KEKs present, one audit event per record) and fenced. A record
/// changed meanwhile is handled with its new header; one the change moved to the active KEK
/// (or erased) needs nothing. Only if that batch conflicts too (a record written again: a
/// hot record) is the set halved and each half redone the same way, down to single records,
/// each tried up to [`MAX_RECORD_TRIES`] times. So a page with a few hot records costs about
/// two commits per halving around each of them, not one durable commit per record. Returns
/// how many records it handled (each exactly once: a batch that conflicts writes nothing).
async fn redo_page<S: Store>(
    vault: &Arc<Vault<S>>,
    job: &JobState,
    scope: Option<Category>,
    page: &[(Vec<u8>, Vec<u8>)],
    lease: &Lease,
) -> Result<u64, VaultError> {
    let store = vault.store();
    let mut handled = 0;
    // Sets of record ids still to redo, with how many times the set already conflicted as
    // a single record; the last is redone first, so they go in id order.
    let mut sets: Vec<(Vec<Vec<u8>>, usize)> =
        vec![(page.iter().map(|(key, _)| key.clone()).collect(), 0)];
    while let Some((ids, tries)) = sets.pop() {
        let records = read_records(store, ids).await?;
        if records.is_empty() {
            continue;
        }
        let mut read: Vec<Vec<u8>> = records.iter().map(|(key, _)| key.clone()).collect();
        let again = read.clone();
        let Prepared {
            mut batch,
            page: taken,
            handled: n,
        } = build_current(vault, job, scope, records, async || {
            read_records(store, again).await
        })
        .await?;
        // A re-key batch cut short at its size: the rest (the records after the last one
        // taken; ids are in order) is redone after it.
        if let Some((last, _)) = taken.last() {
            read.retain(|key| key > last);
            if !read.is_empty() {
                sets.push((read, 0));
            }
        }
        if n == 0 {
            continue;
        }
        lease.fence(&mut batch);
        match store.commit(batch).await {
            Ok(()) => handled += n,
            Err(StoreError::Conflict) => {
                if !lease.still_ours(store).await? {
                    return Err(VaultError::Conflict(
                        "the key job was taken over by another instance".into(),
                    ));
                }
                let mut ids: Vec<Vec<u8>> = taken.into_iter().map(|(key, _)| key).collect();
                if ids.len() > 1 {
                    let second = ids.split_off(ids.len() / 2);
                    sets.push((second, 0));
                    sets.push((ids, 0));
                } else if tries + 1 < MAX_RECORD_TRIES {
                    sets.push((ids, tries + 1));
                } else {
                    return Err(StoreError::Conflict.into());
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(handled)
}

/// The job running in this process, if any.
struct Active {
    kind: JobKind,
    scope: Option<Category>,
    progress: watch::Receiver<Progress>,
    task: tokio::task::JoinHandle<()>,
    lease: Arc<Lease>,
}

/// How often a watcher of a job that runs on another instance reads its progress.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// How [`Jobs`] shares the job with other instances.
#[derive(Debug, Clone, Copy)]
pub struct JobOptions {
    /// Time to live of the job's lease ([`lease::DEFAULT_TTL`]).
    pub lease_ttl: std::time::Duration,
    /// Whether no other process can open the store (sled): a lease found at start-up was
    /// left by this data directory's previous process and is taken at once.
    pub exclusive: bool,
}

/// Starts, resumes and attaches to key jobs. One job runs at a time, across every instance
/// sharing the store (see [`crate::lease`]).
pub struct Jobs<S> {
    vault: Arc<Vault<S>>,
    active: tokio::sync::Mutex<Option<Active>>,
    /// This instance's id in the job's lease (one per process).
    instance: String,
    options: JobOptions,
}

/// Whether a stored job covers a request for `kind` over `scope`.
fn covers(job: &JobState, kind: JobKind, scope: Option<Category>) -> bool {
    job.kind == kind
        && (job.category.is_none() || job.category.as_deref() == scope.map(Category::as_str))
}

fn running_message(kind: JobKind, scope: Option<&str>, elsewhere: bool) -> String {
    format!(
        "a {} job{} is running{}; wait for it to finish (one key job runs at a time)",
        kind.as_str(),
        scope
            .map(|c| format!(" of category {c}"))
            .unwrap_or_else(|| " of every category".into()),
        if elsewhere {
            " on another instance"
        } else {
            ""
        },
    )
}

/// How the job `id` stands, as another instance sees it: its stored progress (from
/// `job/current`, or `job/previous` once a newer job replaced it); an error once its runner is
/// gone and no instance took it over within `grace` past its lease's expiry (two times to
/// live: the adopters of instances sharing the store look every half; calling again resumes
/// it).
async fn followed<S: Store>(
    vault: &Vault<S>,
    id: &str,
    grace: std::time::Duration,
) -> Result<Progress, VaultError> {
    let store = vault.store();
    let replaced = || VaultError::Internal("the job was replaced by another key job".into());
    let job = match stored_job(store).await? {
        Some(job) if job.id == id => job,
        _ => match store.get(Keyspace::Meta, META_JOB_PREVIOUS).await? {
            Some(bytes) => Some(parse_job(&bytes)?)
                .filter(|job| job.id == id)
                .ok_or_else(replaced)?,
            None => return Err(replaced()),
        },
    };
    let mut progress = job.progress();
    // Runner gone: the lease is dead, and the job is still unfinished when read again after
    // the lease (its end releases the lease in the same batch that finishes it).
    if !progress.finished
        && progress.error.is_none()
        && lease::View::read(store).await?.gone_for(grace)
        && stored_job(store)
            .await?
            .is_some_and(|j| j.id == id && j.finished_ms.is_none())
    {
        progress.error = Some(
            "the instance running it stopped before it finished; request the job again to resume it".into(),
        );
    }
    Ok(progress)
}

/// Publishes the stored progress of job `id` on `tx` until it finishes or fails, its runner is
/// gone for longer than `grace`, or nobody watches any more: a job another instance runs.
async fn follow<S: Store>(
    vault: &Vault<S>,
    id: &str,
    tx: &watch::Sender<Progress>,
    grace: std::time::Duration,
) {
    loop {
        let progress = match followed(vault, id, grace).await {
            Ok(progress) => progress,
            Err(e) => Progress {
                error: Some(match e {
                    VaultError::Internal(m) => m,
                    e => format!("its progress could not be read: {e}"),
                }),
                ..tx.borrow().clone()
            },
        };
        let end = progress.finished || progress.error.is_some();
        tx.send_if_modified(|p| {
            let changed = *p != progress;
            *p = progress;
            changed
        });
        if end {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(FOLLOW_EVERY) => {}
            () = tx.closed() => return,
        }
    }
}

impl<S: Store> Jobs<S> {
    /// Jobs over `vault`, with the default lease and the store's own exclusivity.
    pub fn new(vault: Arc<Vault<S>>) -> Arc<Self> {
        let exclusive = vault.store().exclusive();
        Self::with_options(
            vault,
            JobOptions {
                lease_ttl: lease::DEFAULT_TTL,
                exclusive,
            },
        )
    }

    /// Jobs over `vault` with `options`.
    pub fn with_options(vault: Arc<Vault<S>>, options: JobOptions) -> Arc<Self> {
        Arc::new(Self {
            vault,
            active: tokio::sync::Mutex::new(None),
            instance: Uuid::new_v4().to_string(),
            options,
        })
    }

    /// The vault.
    pub fn vault(&self) -> &Arc<Vault<S>> {
        &self.vault
    }

    /// Starts a job of `kind` over `scope` (or attaches to the running one that covers it,
    /// on this instance or another) and returns its progress. A job of another kind or scope
    /// still running is a FAILED_PRECONDITION. A stored job left unfinished (crash, restart,
    /// failure) is resumed when it covers the request.
    ///
    /// `events` (audit event bodies of the request) are written before the job runs: with the
    /// job's state and lease in one batch, otherwise on their own. If they cannot be written,
    /// nothing starts (fail closed) and the error is returned.
    pub async fn start(
        &self,
        kind: JobKind,
        scope: Option<Category>,
        requested_by: &str,
        events: Vec<Vec<u8>>,
    ) -> Result<watch::Receiver<Progress>, VaultError> {
        let mut active = self.active.lock().await;
        if let Some(a) = active.as_ref() {
            if !a.task.is_finished() {
                if a.kind == kind && (a.scope.is_none() || a.scope == scope) {
                    self.write_events(events).await?;
                    return Ok(a.progress.clone());
                }
                return Err(VaultError::FailedPrecondition(running_message(
                    a.kind,
                    a.scope.map(Category::as_str),
                    false,
                )));
            }
        }
        let store = self.vault.store();
        refresh_keys(&self.vault).await?;
        // Every decision below rests on these bytes: the batch expects them unchanged.
        let stored_bytes = store.get(Keyspace::Meta, META_JOB).await?;
        let stored = stored_bytes.as_deref().map(parse_job).transpose()?;
        let view = lease::View::read(store).await?;
        if let Some(job) = stored.as_ref().filter(|j| j.finished_ms.is_none()) {
            if view.held_elsewhere(&self.instance).is_some() {
                if !covers(job, kind, scope) {
                    return Err(VaultError::FailedPrecondition(running_message(
                        job.kind,
                        job.category.as_deref(),
                        true,
                    )));
                }
                self.write_events(events).await?;
                let (tx, rx) = watch::channel(job.progress());
                let vault = Arc::clone(&self.vault);
                let id = job.id.clone();
                let grace = self.follow_grace();
                tokio::spawn(async move { follow(&vault, &id, &tx, grace).await });
                return Ok(rx);
            }
        }
        let mut batch = Batch::default();
        match &stored_bytes {
            Some(bytes) => batch.expect(
                Keyspace::Meta,
                META_JOB.to_vec(),
                Expect::Value(bytes.clone()),
            ),
            None => batch.expect(Keyspace::Meta, META_JOB.to_vec(), Expect::Absent),
        }
        let lease = view.take(&mut batch, &self.instance, self.options.lease_ttl);
        let job = match stored {
            Some(mut job) if job.finished_ms.is_none() && covers(&job, kind, scope) => {
                job.error = None;
                job
            }
            previous => {
                let started_ms = vault::now_ms();
                let (cutoff_ms, total) = match kind {
                    JobKind::Rekey => {
                        let (cutoff_ms, total) =
                            rekey_census(&self.vault, scope, started_ms).await?;
                        if cutoff_ms > started_ms {
                            tracing::warn!(
                                ahead_ms = cutoff_ms - started_ms,
                                "re-key: data keys in scope were made later than now (the clock ran ahead then, or runs behind now); they are re-keyed too"
                            );
                        }
                        (cutoff_ms, total)
                    }
                    JobKind::Rewrap => (
                        started_ms,
                        count_needing(&self.vault, kind, scope, started_ms).await?,
                    ),
                };
                if let Some(p) = previous.as_ref().filter(|p| p.finished_ms.is_none()) {
                    tracing::warn!(job = %p.id, kind = p.kind.as_str(), "an unfinished key job is replaced by a new one");
                }
                if let Some(bytes) = &stored_bytes {
                    batch.put(Keyspace::Meta, META_JOB_PREVIOUS.to_vec(), bytes.clone());
                }
                JobState {
                    id: Uuid::new_v4().to_string(),
                    kind,
                    category: scope.map(|c| c.as_str().to_string()),
                    total,
                    done: 0,
                    cursor: None,
                    pass: 1,
                    started_ms,
                    finished_ms: None,
                    requested_by: requested_by.to_string(),
                    error: None,
                    cutoff_ms: Some(cutoff_ms),
                }
            }
        };
        batch.put(Keyspace::Meta, META_JOB.to_vec(), job.encode());
        // Data keys made from now on, on any instance, are made after the cutoff, whatever the
        // clock (one made during the census is at most re-keyed needlessly).
        let floor = self.floor_past_cutoff(&job, &mut batch).await?;
        for event in events {
            batch.append_event(event);
        }
        store.commit(batch).await.map_err(|e| match e {
            StoreError::Conflict => VaultError::FailedPrecondition(
                "another key job started at the same moment; retry".into(),
            ),
            e => e.into(),
        })?;
        if let Some(floor) = floor {
            self.vault.note_dek_floor(floor);
        }
        tracing::info!(job = %job.id, kind = kind.as_str(), total = job.total, done = job.done, "key job started");
        Ok(self.spawn(job, Arc::new(lease), &mut active))
    }

    /// For a re-key: adds to `batch` raising the store's data-key floor past the job's cutoff,
    /// so that data keys made from then on, on any instance, are made after it; the floor to
    /// note once `batch` commits ([`Vault::note_dek_floor`]).
    async fn floor_past_cutoff(
        &self,
        job: &JobState,
        batch: &mut Batch,
    ) -> Result<Option<i64>, VaultError> {
        match job.kind {
            JobKind::Rekey => Ok(Some(
                self.vault
                    .raise_dek_floor_in(batch, job.cutoff() + 1)
                    .await?,
            )),
            JobKind::Rewrap => Ok(None),
        }
    }

    /// Whether a key job runs: in this process, or in another instance that holds the
    /// job's lease.
    pub async fn busy(&self) -> Result<bool, VaultError> {
        let local = self
            .active
            .lock()
            .await
            .as_ref()
            .is_some_and(|a| !a.task.is_finished());
        if local {
            return Ok(true);
        }
        let unfinished = stored_job(self.vault.store())
            .await?
            .is_some_and(|j| j.finished_ms.is_none());
        Ok(unfinished
            && lease::View::read(self.vault.store())
                .await?
                .held_elsewhere(&self.instance)
                .is_some())
    }

    /// Writes `events` in a batch of their own (nothing to write: nothing done).
    async fn write_events(&self, events: Vec<Vec<u8>>) -> Result<(), VaultError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::default();
        for event in events {
            batch.append_event(event);
        }
        self.vault.store().commit(batch).await?;
        Ok(())
    }

    /// Resumes a stored job left unfinished (at start-up). Returns whether one was resumed.
    /// On an exclusive store a lease left by the previous process is taken at once; on a
    /// shared store a live lease means another instance runs the job.
    pub async fn resume(&self) -> Result<bool, VaultError> {
        self.adopt(self.options.exclusive).await
    }

    /// Takes over a stored job left unfinished whose runner is gone (its lease expired or was
    /// released), unless this instance runs a job. Returns whether it took one. Instances
    /// sharing a store call this periodically (every half of the lease's time to live).
    pub async fn adopt(&self, ignore_live_lease: bool) -> Result<bool, VaultError> {
        let mut active = self.active.lock().await;
        if active.as_ref().is_some_and(|a| !a.task.is_finished()) {
            return Ok(false);
        }
        let store = self.vault.store();
        let Some(bytes) = store.get(Keyspace::Meta, META_JOB).await? else {
            return Ok(false);
        };
        let job = parse_job(&bytes)?;
        if job.finished_ms.is_some() || job.error.is_some() {
            return Ok(false);
        }
        let view = lease::View::read(store).await?;
        if !ignore_live_lease && view.held_elsewhere(&self.instance).is_some() {
            return Ok(false);
        }
        refresh_keys(&self.vault).await?;
        let mut batch = Batch::default();
        batch.expect(Keyspace::Meta, META_JOB.to_vec(), Expect::Value(bytes));
        let lease = view.take(&mut batch, &self.instance, self.options.lease_ttl);
        // Also for a re-key started by a build that kept the floor in memory only.
        let floor = self.floor_past_cutoff(&job, &mut batch).await?;
        if self.vault.auditing() {
            let mut draft =
                audit::Draft::new(job.kind.resumed_action(), JOB_PRINCIPAL, SYSTEM_ROLE);
            draft.field_names = category_names(job.category.as_deref());
            draft.outcome = audit::Outcome::Ok.as_str().into();
            batch.append_event(draft.encode());
        }
        match store.commit(batch).await {
            Ok(()) => {}
            // Another instance took it first (or raised the floor meanwhile: the next
            // adoption tick tries again).
            Err(StoreError::Conflict) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        if let Some(floor) = floor {
            self.vault.note_dek_floor(floor);
        }
        // As published (`progress`): after a crash, records of batches lost in flight are
        // handled again and counted twice in the stored `done`.
        let progress = job.progress();
        tracing::info!(job = %job.id, kind = job.kind.as_str(), done = progress.done, total = progress.total, "resuming key job");
        self.spawn(job, Arc::new(lease), &mut active);
        Ok(true)
    }

    /// How long a watcher of a job elsewhere waits, past its lease's expiry, for another
    /// instance to take it over before it reports the runner gone: two times to live (the
    /// adopters look every half).
    fn follow_grace(&self) -> std::time::Duration {
        self.options.lease_ttl * 2
    }

    /// For a store several instances share: every half of the lease's time to live, reloads
    /// the key ring (versions made or retired elsewhere) and takes over an unfinished job
    /// whose runner is gone ([`Jobs::adopt`]). The server runs it when its store is not
    /// exclusive.
    pub fn spawn_adopter(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let jobs = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(jobs.options.lease_ttl / 2).await;
                // Key versions made or destroyed elsewhere: a version another instance
                // retired must not live on in this one's memory for as long as it runs
                // (its traffic may never make it reload).
                if let Err(e) = refresh_keys(&jobs.vault).await {
                    tracing::warn!(error = %e, "reloading the key ring failed");
                }
                if let Err(e) = jobs.adopt(false).await {
                    tracing::warn!(error = %e, "looking for a key job to take over failed");
                }
            }
        })
    }

    fn spawn(
        &self,
        job: JobState,
        lease: Arc<Lease>,
        active: &mut Option<Active>,
    ) -> watch::Receiver<Progress> {
        let (tx, rx) = watch::channel(job.progress());
        let kind = job.kind;
        let scope = job.scope().ok().flatten();
        let vault = Arc::clone(&self.vault);
        let held = Arc::clone(&lease);
        let grace = self.follow_grace();
        let task = tokio::spawn(async move {
            let id = job.id.clone();
            let renewing = async {
                loop {
                    tokio::time::sleep(held.renew_every()).await;
                    match held.renew(vault.store()).await {
                        Ok(true) => {}
                        // The job's own end released the lease (the token is still ours):
                        // the run is about to return.
                        Ok(false) if matches!(held.still_ours(vault.store()).await, Ok(true)) => {
                            std::future::pending::<()>().await;
                        }
                        Ok(false) => return,
                        // Fencing keeps a lapsed lease safe; the next tick tries again.
                        Err(e) => {
                            tracing::warn!(job = %id, error = %e, "the key job's lease could not be renewed")
                        }
                    }
                }
            };
            let outcome = tokio::select! {
                biased;
                outcome = run(&vault, job, &tx, &held) => outcome,
                () = renewing => Err(VaultError::Conflict("the key job's lease was taken over".into())),
            };
            let Err(e) = outcome else { return };
            if let Ok(false) = held.still_ours(vault.store()).await {
                // Another instance runs the job now: its watchers here follow it there.
                tracing::warn!(job = %id, "the key job was taken over by another instance");
                follow(&vault, &id, &tx, grace).await;
                return;
            }
            let text = e.to_string();
            tracing::error!(job = %id, error = %text, "key job stopped");
            // Remember why, so that status calls and the next request can say so.
            if let Ok(Some(mut stored)) = stored_job(vault.store()).await {
                if stored.id == id {
                    stored.error = Some(text.clone());
                    let mut batch = Batch::default();
                    held.release(&mut batch);
                    batch.put(Keyspace::Meta, META_JOB.to_vec(), stored.encode());
                    if vault.auditing() {
                        let mut draft = audit::Draft::new(
                            stored.kind.finished_action(),
                            JOB_PRINCIPAL,
                            SYSTEM_ROLE,
                        );
                        draft.field_names = category_names(stored.category.as_deref());
                        draft.outcome = audit::Outcome::Error.as_str().into();
                        batch.append_event(draft.encode());
                    }
                    if let Err(e) = vault.store().commit(batch).await {
                        tracing::error!(job = %id, error = %e, "the key job's failure could not be recorded");
                    }
                }
            }
            tx.send_modify(|p| p.error = Some(text));
        });
        *active = Some(Active {
            kind,
            scope,
            progress: rx.clone(),
            task,
            lease,
        });
        rx
    }

    /// Ends the running job's task as a crash would: the lease is neither renewed nor
    /// released.
    #[cfg(test)]
    async fn abandon(&self) {
        if let Some(a) = self.active.lock().await.take() {
            a.task.abort();
            let _ = a.task.await;
        }
    }

    /// Stops the running job (at shutdown) and releases its lease; it resumes from its last
    /// page on the next start, or on another instance at once.
    pub async fn stop(&self) {
        if let Some(a) = self.active.lock().await.take() {
            a.task.abort();
            let _ = a.task.await;
            let mut batch = Batch::default();
            a.lease.release(&mut batch);
            match self.vault.store().commit(batch).await {
                Ok(()) | Err(StoreError::Conflict) => {}
                Err(e) => tracing::warn!(error = %e, "the key job's lease could not be released"),
            }
        }
    }
}

/// One check of the rotation schedule for `category`: rotates its KEK if the active version
/// is older than `age` (audited as [`SCHEDULE_PRINCIPAL`], in the rotation's own batch), and
/// starts a rewrap of the category while records still need one (audited likewise, with the
/// job's start; unless another job runs: the next check tries again).
pub async fn scheduled<S: Store>(
    jobs: &Jobs<S>,
    category: Category,
    age: std::time::Duration,
) -> Result<(), VaultError> {
    let vault = jobs.vault();
    refresh_keys(vault).await?;
    let keys = vault.keys();
    let active = keys.active_version(category).unwrap_or(0);
    let created = keys
        .versions()
        .into_iter()
        .find(|v| v.category == category && v.version == active)
        .map_or(0, |v| v.info.created_ms);
    let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
    if vault::now_ms().saturating_sub(created) >= age_ms {
        let auditing = vault.auditing();
        // The event names the category and the version made (`identity/v4`), drafted in the
        // rotation's batch once the version is chosen.
        let made = keys
            .rotate_audited(vault.store(), &[category], |made| {
                if !auditing {
                    return Vec::new();
                }
                let mut draft = audit::Draft::new("RotateKey", SCHEDULE_PRINCIPAL, SYSTEM_ROLE);
                draft.field_names = std::iter::once(category.as_str().to_string())
                    .chain(made.iter().map(|&(c, v)| crate::keys::version_name(c, v)))
                    .collect();
                draft.outcome = audit::Outcome::Ok.as_str().into();
                vec![draft.encode()]
            })
            .await
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        for (category, version) in made {
            tracing::info!(
                category = category.as_str(),
                version,
                previous = active,
                "scheduled key rotation: the KEK was due (rotate_after_days); rewrapping the category"
            );
        }
    }
    // While a job runs, the next check tries again (and asks for nothing meanwhile: no event).
    if !jobs.busy().await?
        && count_needing(vault, JobKind::Rewrap, Some(category), vault::now_ms()).await? > 0
    {
        let mut events = Vec::new();
        if vault.auditing() {
            let mut draft = audit::Draft::new("Rewrap", SCHEDULE_PRINCIPAL, SYSTEM_ROLE);
            draft.field_names = vec![category.as_str().to_string()];
            draft.outcome = audit::Outcome::Ok.as_str().into();
            events.push(draft.encode());
        }
        match jobs
            .start(JobKind::Rewrap, Some(category), SCHEDULE_PRINCIPAL, events)
            .await
        {
            Ok(_) | Err(VaultError::FailedPrecondition(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{self, SecretKey};
    use crate::keys::{KeyRing, MasterKey};
    use crate::policy::{Caller, Policy};
    use crate::schema::Schema;
    use crate::store::testing::{Hooked, Hooks};
    use crate::store::SledStore;
    use crate::vault::{Change, Value};

    /// A fresh job state of `kind` over `category`, as a start would make it.
    fn test_job(kind: JobKind, category: &str, total: u64, started_ms: i64) -> JobState {
        JobState {
            id: "t".into(),
            kind,
            category: Some(category.into()),
            total,
            done: 0,
            cursor: None,
            pass: 1,
            started_ms,
            finished_ms: None,
            requested_by: "test".into(),
            error: None,
            cutoff_ms: None,
        }
    }

    fn caller(role: &str) -> Caller {
        Caller {
            principal: Arc::from(format!("t-{role}")),
            role: Arc::clone(Policy::default_policy().role(role).expect("default role")),
        }
    }

    fn text(name: &str, v: &str) -> (String, Value) {
        (name.to_string(), Value::Text(Zeroizing::new(v.to_string())))
    }

    async fn vault_over<S: Store>(store: S, master: &MasterKey) -> Vault<S> {
        let keys = KeyRing::open(&store, master).await.expect("keys");
        Vault::new(store, Arc::new(Schema::default_schema()), Arc::new(keys))
    }

    /// Sets one field of record `id` as `who`, under `purpose`.
    async fn update(
        vault: &Vault<SledStore>,
        who: &Caller,
        id: &str,
        purpose: &str,
        field: (String, Value),
    ) {
        let mut ev = audit::Context::new("UpdateRecord");
        let change = Change {
            set: vec![field],
            ..Change::default()
        };
        vault
            .update(who, id, purpose, change, &mut ev)
            .await
            .expect("update");
    }

    async fn create<S: Store>(vault: &Vault<S>, bsn: &str) -> String {
        let mut ev = audit::Context::new("CreateRecord");
        let (id, _) = vault
            .create(
                &caller("payroll"),
                "payroll",
                vec![text("bsn", bsn), text("wage", "2500.00")],
                &mut ev,
            )
            .await
            .expect("create");
        id.to_string()
    }

    #[tokio::test]
    async fn an_instance_picks_up_another_instances_rotation_and_rewrap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let a = Arc::new(vault_over(store.clone(), &master).await);
        let b = vault_over(store, &master).await;
        let id = create(&a, "111222333").await;
        a.keys()
            .rotate(a.store(), &[Category::Identity], vec![])
            .await
            .expect("rotate");
        let fresh = create(&a, "111222333").await;
        // B has never seen identity v2; it reloads the ring on meeting it.
        assert!(!b.keys().holds(Category::Identity, 2));
        let got = b
            .get(&caller("payroll"), &fresh, "payroll", &["bsn".into()])
            .await
            .expect("B reads a record under A's new KEK");
        assert_eq!(got.fields.len(), 1);
        assert!(b.keys().holds(Category::Identity, 2));
        // A rewrap run by B moves A's old record too; counts agree from both sides.
        let jobs = Jobs::new(Arc::new(b));
        let mut rx = jobs
            .start(JobKind::Rewrap, None, "test", Vec::new())
            .await
            .expect("start");
        while !rx.borrow_and_update().finished {
            rx.changed().await.expect("progress");
        }
        let p = rx.borrow().clone();
        assert_eq!((p.done, p.total, p.error), (1, 1, None));
        let counts = version_counts(&a).await.expect("counts");
        assert_eq!(counts.get(&(Category::Identity, 1)), None);
        assert_eq!(counts[&(Category::Identity, 2)], 2);
        assert_eq!(counts[&(Category::Financial, 1)], 2);
        a.get(&caller("payroll"), &id, "payroll", &[])
            .await
            .expect("A reads its rewrapped record");
    }

    #[tokio::test]
    async fn a_stale_instance_cannot_give_a_retiring_version_a_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let a = vault_over(store.clone(), &master).await;
        let b = Arc::new(vault_over(store, &master).await);
        b.keys()
            .rotate(b.store(), &[Category::Identity], vec![])
            .await
            .expect("B rotates");
        assert_eq!(
            a.keys().active_version(Category::Identity),
            Some(1),
            "A is stale"
        );
        // A creates a record while B retires v1, between B's fence and B's count (the
        // window in which, before the fence, A's write under v1 committed and was then lost).
        let created = std::sync::Mutex::new(None);
        let count = || async {
            let id = create(&a, "111222333").await;
            *created.lock().expect("not poisoned") = Some(id);
            version_counts(&b)
                .await
                .map(|c| c.get(&(Category::Identity, 1)).copied().unwrap_or(0))
                .map_err(|e| e.to_string())
        };
        b.keys()
            .retire(b.store(), Category::Identity, 1, count, vec![])
            .await
            .expect("B retires v1: no record needs it");
        let id = created
            .into_inner()
            .expect("not poisoned")
            .expect("A created a record");
        assert_eq!(
            a.keys().active_version(Category::Identity),
            Some(2),
            "A took up v2"
        );
        for (who, v) in [("A", &a), ("B", &*b)] {
            v.get(&caller("payroll"), &id, "payroll", &["bsn".into()])
                .await
                .unwrap_or_else(|e| panic!("{who} reads the record after the retire: {e}"));
        }
        // A stale rotate conflicts once, takes up the store's ring, and the retry works.
        let c = vault_over(b.store().clone(), &master).await;
        b.keys()
            .rotate(b.store(), &[Category::Identity], vec![])
            .await
            .expect("B rotates to v3");
        // The events are drafted for the version each try makes: the conflicting try's
        // (v3, never stored) and the retry's (v4, committed with it).
        let drafted = std::sync::Mutex::new(Vec::new());
        let audited = |made: &[(Category, u32)]| {
            drafted.lock().expect("not poisoned").push(made.to_vec());
            let mut draft = audit::Draft::new("RotateKey", "test", "security_officer");
            draft.field_names = made
                .iter()
                .map(|&(c, v)| crate::keys::version_name(c, v))
                .collect();
            vec![draft.encode()]
        };
        assert!(matches!(
            c.keys()
                .rotate_audited(c.store(), &[Category::Identity], audited)
                .await,
            Err(crate::keys::KeyOpError::Concurrent)
        ));
        let made = c
            .keys()
            .rotate_audited(c.store(), &[Category::Identity], audited)
            .await
            .expect("the retry rotates");
        assert_eq!(made, vec![(Category::Identity, 4)]);
        assert_eq!(
            drafted.into_inner().expect("not poisoned"),
            vec![vec![(Category::Identity, 3)], vec![(Category::Identity, 4)]]
        );
        let mut scan = audit::EventScan::from(1);
        let mut named = Vec::new();
        while let Some(e) = scan.next(c.store()).await.expect("scan") {
            let event = audit::Event::parse(&e.raw.expect("framed")).expect("event");
            if event.draft.action == "RotateKey" {
                named.push(event.draft.field_names);
            }
        }
        assert_eq!(named, vec![vec!["identity/v4".to_string()]]);
    }

    #[tokio::test]
    async fn a_stale_instance_writes_only_under_the_newest_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let a = vault_over(store.clone(), &master).await;
        let b = vault_over(store, &master).await;
        let old = create(&a, "111222333").await;
        b.keys()
            .rotate(b.store(), &[Category::Identity], vec![])
            .await
            .expect("B rotates");
        assert_eq!(a.keys().active_version(Category::Identity), Some(1));
        // A's create wraps under v1 (still a usable KEK), conflicts on v2's existence, takes
        // up the store's ring and commits under v2: behind a rewrap's cursor it would
        // otherwise be a record the pass never sees.
        let fresh = create(&a, "111222333").await;
        assert_eq!(a.keys().active_version(Category::Identity), Some(2));
        let a = Arc::new(a);
        let counts = version_counts(&a).await.expect("counts");
        assert_eq!(counts[&(Category::Identity, 1)], 1, "only the older record");
        assert_eq!(counts[&(Category::Identity, 2)], 1, "{fresh} under v2");
        // An update of the older record seals identity: it moves the data key to v2.
        let c = vault_over(a.store().clone(), &master).await;
        b.keys()
            .rotate(b.store(), &[Category::Identity], vec![])
            .await
            .expect("B rotates to v3");
        update(
            &c,
            &caller("payroll"),
            &old,
            "payroll",
            text("bsn", "123456782"),
        )
        .await;
        assert_eq!(c.keys().active_version(Category::Identity), Some(3));
        let counts = version_counts(&a).await.expect("counts");
        assert_eq!(counts.get(&(Category::Identity, 1)), None);
        assert_eq!(counts[&(Category::Identity, 3)], 1, "{old} under v3");
    }

    #[tokio::test]
    async fn a_write_rewraps_an_old_data_key_but_a_rekey_still_replaces_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let vault = Arc::new(vault_over(store, &master).await);
        let id = create(&vault, "111222333").await;
        let uuid = uuid::Uuid::parse_str(&id).expect("uuid");
        let (_, before) = vault.load(uuid).await.expect("load");
        vault
            .keys()
            .rotate(vault.store(), &[Category::Identity], vec![])
            .await
            .expect("rotate");
        // A re-key started now (after a suspected compromise) must replace this data key.
        let started_ms = chrono::Utc::now().timestamp_millis();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        update(
            &vault,
            &caller("payroll"),
            &id,
            "payroll",
            text("bsn", "123456782"),
        )
        .await;
        let (_, after) = vault.load(uuid).await.expect("load");
        let (old, new) = (&before.deks["identity"], &after.deks["identity"]);
        assert_eq!(
            (old.kek_version, new.kek_version),
            (1, 2),
            "re-wrapped on write"
        );
        assert_eq!(
            new.created_ms, old.created_ms,
            "the same key, as old as before"
        );
        let active = vault.keys().active_versions();
        let due = |d: &record::StoredDek| {
            due(
                &active,
                JobKind::Rekey,
                None,
                started_ms,
                "identity",
                d.kek_version,
                d.created_ms,
            )
        };
        assert_eq!(
            due(new),
            Some(Category::Identity),
            "a re-key still replaces it"
        );
        // The untouched category keeps its data key where it was.
        assert_eq!(after.deks["financial"].kek_version, 1);
    }

    #[tokio::test]
    async fn a_job_whose_event_cannot_be_written_does_not_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        {
            let store = SledStore::open(dir.path()).expect("open");
            let vault = Arc::new(vault_over(store.clone(), &master).await);
            create(&vault, "111222333").await;
            vault
                .keys()
                .rotate(vault.store(), &[Category::Identity], vec![])
                .await
                .expect("rotate");
            let jobs = Jobs::new(vault);
            store.fail_next_log_write();
            let event = audit::Draft::new("Rewrap", "test", "security_officer").encode();
            assert!(jobs
                .start(JobKind::Rewrap, None, "test", vec![event])
                .await
                .is_err());
            assert!(jobs.active.lock().await.is_none(), "no job runs");
        }
        // Nothing of it is stored: no job to resume, no event, the record still under v1.
        let store = SledStore::open(dir.path()).expect("reopen");
        assert!(stored_job(&store).await.expect("job").is_none());
        let head = audit::Head::load(&store).await.expect("head");
        assert_eq!(head.seq, 1, "the create's event alone");
        let vault = Arc::new(vault_over(store, &master).await);
        let counts = version_counts(&vault).await.expect("counts");
        assert_eq!(counts[&(Category::Identity, 1)], 1);
        assert!(!Jobs::new(vault).resume().await.expect("resume"));
    }

    #[tokio::test]
    async fn a_page_that_meets_a_concurrent_update_is_redone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let vault = Arc::new(vault_over(store, &master).await);
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(create(&vault, "111222333").await);
        }
        vault
            .keys()
            .rotate(vault.store(), &[Category::Identity], vec![])
            .await
            .expect("rotate");
        let job = test_job(JobKind::Rewrap, "identity", 3, vault::now_ms());
        let page = vault
            .store()
            .scan(Keyspace::Records, b"", None, JOB_PAGE)
            .await
            .expect("scan");
        let mut batch = Batch::default();
        let mut keks = BTreeSet::new();
        for (key, raw) in &page {
            assert!(handle_record(
                &vault,
                &job,
                Some(Category::Identity),
                key,
                raw,
                &mut batch,
                &mut keks
            )
            .await
            .expect("handle"));
        }
        expect_keks(&mut batch, &keks);
        // An update lands between reading the page and committing it.
        update(
            &vault,
            &caller("payroll"),
            &ids[1],
            "payroll",
            text("wage", "2600.00"),
        )
        .await;
        assert!(matches!(
            vault.store().commit(batch).await,
            Err(StoreError::Conflict)
        ));
        let redone = redo_page(
            &vault,
            &job,
            Some(Category::Identity),
            &page,
            &held(vault.store()).await,
        )
        .await
        .expect("redo");
        assert_eq!(redone, 3);
        let counts = version_counts(&vault).await.expect("counts");
        assert_eq!(counts.get(&(Category::Identity, 1)), None);
        assert_eq!(counts[&(Category::Identity, 2)], 3);
        let got = vault
            .get(&caller("payroll"), &ids[1], "payroll", &["wage".into()])
            .await
            .expect("read");
        match &got.fields[0].1 {
            Value::Text(t) => assert_eq!(t.as_str(), "2600.00", "the update survives"),
            Value::Blob { .. } => panic!("text"),
        }
        // Idempotent: nothing left to do.
        assert_eq!(
            redo_page(
                &vault,
                &job,
                Some(Category::Identity),
                &page,
                &held(vault.store()).await
            )
            .await
            .expect("redo"),
            0
        );
    }
    #[tokio::test]
    async fn a_rekey_that_meets_a_replaced_field_leaves_the_record_whole_for_the_next_pass() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let vault = Arc::new(vault_over(store, &master).await);
        let recruiter = caller("recruiter");
        let long = |c: char| c.to_string().repeat(4000);
        let mut ev = audit::Context::new("CreateRecord");
        let (id, _) = vault
            .create(
                &recruiter,
                "recruitment",
                vec![text("full_name", "Someone"), text("education", &long('a'))],
                &mut ev,
            )
            .await
            .expect("create");
        let id = id.to_string();
        let job = test_job(JobKind::Rekey, "cv", 1, vault::now_ms() + 1);
        let page = vault
            .store()
            .scan(Keyspace::Records, b"", None, JOB_PAGE)
            .await
            .expect("scan");
        // The long field is replaced (its chunks deleted) after the page was read.
        update(
            &vault,
            &recruiter,
            &id,
            "recruitment",
            text("education", &long('b')),
        )
        .await;
        let (key, raw) = &page[0];
        let mut batch = Batch::default();
        let mut keks = BTreeSet::new();
        let handled = handle_record(
            &vault,
            &job,
            Some(Category::Cv),
            key,
            raw,
            &mut batch,
            &mut keks,
        )
        .await
        .expect("not taken for damage");
        assert!(!handled, "left for the next pass");
        assert!(
            batch.ops.is_empty() && batch.expects.is_empty(),
            "nothing of it written"
        );
        // The next pass re-keys it, with the update in place.
        assert_eq!(
            count_needing(&vault, JobKind::Rekey, Some(Category::Cv), job.started_ms)
                .await
                .expect("count"),
            1
        );
        let redone = redo_page(
            &vault,
            &job,
            Some(Category::Cv),
            &page,
            &held(vault.store()).await,
        )
        .await
        .expect("redo");
        assert_eq!(redone, 1);
        let got = vault
            .get(&recruiter, &id, "recruitment", &["education".into()])
            .await
            .expect("read");
        match &got.fields[0].1 {
            Value::Text(t) => assert_eq!(t.as_str(), long('b')),
            Value::Blob { .. } => panic!("text"),
        }
        // The new data key is the category's second, and its field envelopes say so (their
        // key version); the other category's stays the first (review 10).
        let uuid = uuid::Uuid::parse_str(&id).expect("uuid");
        let (_, body) = vault.load(uuid).await.expect("load");
        assert_eq!(body.deks["cv"].generation(), 2);
        assert_eq!(body.deks["contact"].generation(), 1);
        for (name, generation) in [("education", 2u32), ("full_name", 1)] {
            let entry = &body.fields[name];
            // The header of its envelope, or of its manifest when sealed detached.
            let envelope = if entry.in_header {
                entry.inline.clone()
            } else {
                let key = if entry.detached {
                    record::manifest_key(uuid.as_bytes(), name, entry.revision)
                } else {
                    record::chunk_key(uuid.as_bytes(), name, entry.revision, 0)
                };
                let chunk = vault
                    .store()
                    .get(Keyspace::Fields, &key)
                    .await
                    .expect("get");
                chunk.expect("stored chunk").to_vec()
            };
            assert_eq!(envelope[2..6], generation.to_be_bytes(), "{name}");
        }
    }

    /// A store that counts the key job's record batches (record headers put, fenced by the
    /// job's lease) and, before each of the first `touches` of them that covers a `hot` record,
    /// writes those records (their headers re-sealed with a later `updated_ms`, as an update
    /// that leaves the data keys alone would): that batch conflicts.
    #[derive(Default)]
    struct Hot {
        ring: std::sync::OnceLock<Arc<KeyRing>>,
        hot: std::sync::OnceLock<Vec<Vec<u8>>>,
        touches: std::sync::atomic::AtomicUsize,
        job_commits: std::sync::atomic::AtomicUsize,
        conflicts: std::sync::atomic::AtomicUsize,
    }

    impl Hooks for Hot {
        async fn commit(&self, store: &SledStore, batch: Batch) -> Result<(), StoreError> {
            use std::sync::atomic::Ordering::SeqCst;
            let fenced = batch
                .expects
                .iter()
                .any(|(ks, key, _)| *ks == Keyspace::Meta && key == lease::META_OWNER);
            let puts: Vec<&Vec<u8>> = batch
                .ops
                .iter()
                .filter_map(|op| match op {
                    crate::store::Op::Put(Keyspace::Records, key, _) => Some(key),
                    _ => None,
                })
                .collect();
            if !fenced || puts.is_empty() {
                return store.commit(batch).await;
            }
            self.job_commits.fetch_add(1, SeqCst);
            let hot: Vec<Vec<u8>> = self
                .hot
                .get()
                .map(|hot| hot.iter().filter(|k| puts.contains(k)).cloned().collect())
                .unwrap_or_default();
            if !hot.is_empty()
                && self
                    .touches
                    .fetch_update(SeqCst, SeqCst, |t| t.checked_sub(1))
                    .is_ok()
            {
                let ring = self.ring.get().expect("the test sets the ring first");
                let (kv, ik) = ring.integrity_key();
                let mut touch = Batch::default();
                for key in hot {
                    let raw = store
                        .get(Keyspace::Records, &key)
                        .await?
                        .expect("a hot record exists");
                    let mut body = RecordBody::open(&key, &raw, kv, ik).expect("header opens");
                    body.updated_ms += 1;
                    touch.put(Keyspace::Records, key, body.seal(kv, ik));
                }
                store.commit(touch).await?;
            }
            let committed = store.commit(batch).await;
            if matches!(committed, Err(StoreError::Conflict)) {
                self.conflicts.fetch_add(1, SeqCst);
            }
            committed
        }
    }

    #[tokio::test]
    async fn a_page_that_meets_concurrent_writes_is_redone_in_a_few_batches() {
        use std::sync::atomic::Ordering::SeqCst;
        const RECORDS: usize = 256;
        for kind in [JobKind::Rewrap, JobKind::Rekey] {
            // One conflict: the page is redone as one batch. Six, on two hot records: the
            // set is halved around them.
            for (touches, most) in [(1, 2), (6, 16)] {
                let dir = tempfile::tempdir().expect("tempdir");
                let store = Hooked::new(SledStore::open(dir.path()).expect("open"), Hot::default());
                let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
                let ring = Arc::new(KeyRing::open(&store, &master).await.expect("keys"));
                assert!(store.ring.set(Arc::clone(&ring)).is_ok());
                let vault = Arc::new(Vault::new(
                    store.clone(),
                    Arc::new(Schema::default_schema()),
                    ring,
                ));
                for _ in 0..RECORDS {
                    create(&vault, "111222333").await;
                }
                if kind == JobKind::Rewrap {
                    vault
                        .keys()
                        .rotate(vault.store(), &[Category::Identity], vec![])
                        .await
                        .expect("rotate");
                }
                let ids: Vec<Vec<u8>> = store
                    .scan(Keyspace::Records, b"", None, JOB_PAGE)
                    .await
                    .expect("scan")
                    .into_iter()
                    .map(|(key, _)| key)
                    .collect();
                assert!(store
                    .hot
                    .set(vec![ids[40].clone(), ids[170].clone()])
                    .is_ok());
                store.touches.store(touches, SeqCst);
                let began = std::time::Instant::now();
                let jobs = Jobs::new(Arc::clone(&vault));
                let rx = jobs
                    .start(kind, Some(Category::Identity), "test", Vec::new())
                    .await
                    .expect("start");
                let p = finished(rx).await;
                let (commits, conflicts) =
                    (store.job_commits.load(SeqCst), store.conflicts.load(SeqCst));
                eprintln!(
                    "{} of {RECORDS} records, {touches} conflicting writes: {commits} record batches, {:?}",
                    kind.as_str(),
                    began.elapsed()
                );
                let total = RECORDS as u64;
                assert_eq!((p.done, p.total, p.error), (total, total, None));
                assert_eq!(conflicts, touches, "every touch met a batch");
                assert!(
                    commits <= most,
                    "{commits} batches for {RECORDS} records, {touches} conflicts"
                );
                // Each record handled exactly once: one event each, counts exact.
                let actions = actions(&store).await;
                let count = |a: &str| actions.iter().filter(|x| *x == a).count();
                assert_eq!(count(kind.record_action()), RECORDS, "{kind:?}");
                let counts = version_counts(&vault).await.expect("counts");
                let active = vault.keys().active_version(Category::Identity);
                assert_eq!(active, Some(if kind == JobKind::Rewrap { 2 } else { 1 }));
                let on = |v| counts.get(&(Category::Identity, v)).copied().unwrap_or(0);
                assert_eq!(
                    (on(1), on(2)),
                    if kind == JobKind::Rewrap {
                        (0, total)
                    } else {
                        (total, 0)
                    }
                );
                assert_eq!(counts[&(Category::Financial, 1)], total);
                let job = stored_job(&store).await.expect("job").expect("stored");
                assert_eq!(
                    count_needing(&vault, kind, Some(Category::Identity), job.started_ms)
                        .await
                        .expect("count"),
                    0
                );
                // The hot records keep their data and read back.
                let id = vault::uuid_string(&ids[170]);
                vault
                    .get(&caller("payroll"), &id, "payroll", &["bsn".into()])
                    .await
                    .expect("a hot record reads back");
            }
        }
    }

    /// A store shared by "instances" in one process, whose key job pages (batches that write
    /// the job state but take no lease) wait while the gate (`open`) is closed.
    type Gated = Hooked<Gate>;

    struct Gate {
        open: watch::Sender<bool>,
    }

    impl Hooks for Gate {
        async fn commit(&self, store: &SledStore, batch: Batch) -> Result<(), StoreError> {
            let puts = |key: &[u8]| {
                batch
                    .ops
                    .iter()
                    .any(|op| matches!(op, crate::store::Op::Put(Keyspace::Meta, k, _) if k == key))
            };
            if puts(META_JOB) && !puts(lease::META_OWNER) {
                let mut open = self.open.subscribe();
                open.wait_for(|o| *o)
                    .await
                    .expect("the gate outlives its stores");
            }
            store.commit(batch).await
        }
    }

    /// The job's lease, taken by a test instance.
    async fn held(store: &impl Store) -> Lease {
        let view = lease::View::read(store).await.expect("lease rows");
        let mut batch = Batch::default();
        let lease = view.take(&mut batch, "test", lease::DEFAULT_TTL);
        store.commit(batch).await.expect("take the lease");
        lease
    }

    /// Actions of every stored audit event, in order.
    async fn actions(store: &impl Store) -> Vec<String> {
        let mut scan = audit::EventScan::from(1);
        let mut out = Vec::new();
        while let Some(e) = scan.next(store).await.expect("scan") {
            let event = audit::Event::parse(&e.raw.expect("framed")).expect("event");
            out.push(event.draft.action);
        }
        out
    }

    async fn finished(mut rx: watch::Receiver<Progress>) -> Progress {
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                let p = rx.borrow_and_update().clone();
                if p.finished || p.error.is_some() {
                    return p;
                }
                rx.changed().await.expect("progress until the end");
            }
        })
        .await
        .expect("the job ends")
    }

    /// Three records whose identity data keys an earlier process made while its clock ran
    /// `ahead_ms` ahead (stamped so by a floor that is then taken out of the store again).
    async fn made_while_the_clock_ran_ahead(
        store: &SledStore,
        master: &MasterKey,
        ahead_ms: i64,
    ) -> Vec<String> {
        let ahead = vault_over(store.clone(), master).await;
        let mut batch = Batch::default();
        let floor = ahead
            .raise_dek_floor_in(&mut batch, vault::now_ms() + ahead_ms)
            .await
            .expect("floor");
        store.commit(batch).await.expect("commit");
        ahead.note_dek_floor(floor);
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(create(&ahead, "111222333").await);
        }
        let mut batch = Batch::default();
        batch.delete(Keyspace::Meta, vault::META_DEK_FLOOR.to_vec());
        store.commit(batch).await.expect("commit");
        ids
    }

    /// Review 20: the floor a re-key raises is the store's, so data keys another instance
    /// makes while the job runs are made after its cutoff too (with the floor in the job's
    /// process only, the job re-keyed them, pass after pass, and failed after 8 passes).
    #[tokio::test]
    async fn data_keys_made_on_another_instance_during_a_rekey_are_after_its_cutoff() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        made_while_the_clock_ran_ahead(&store, &master, 86_400_000).await;
        // A runs the re-key, B (opened before it started) serves writes meanwhile.
        let a = Arc::new(vault_over(store.clone(), &master).await);
        let b = Arc::new(vault_over(store.clone(), &master).await);
        let jobs = Jobs::new(Arc::clone(&a));
        let rx = jobs
            .start(JobKind::Rekey, Some(Category::Identity), "test", Vec::new())
            .await
            .expect("start");
        let cutoff = stored_job(a.store())
            .await
            .expect("job")
            .expect("stored")
            .cutoff();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (b, stop) = (Arc::clone(&b), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut ids = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || ids.is_empty() {
                    ids.push(create(&b, "111222333").await);
                }
                ids
            })
        };
        let p = finished(rx).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let made_on_b = writer.await.expect("writer");
        assert_eq!(p.error, None);
        let job = stored_job(a.store()).await.expect("job").expect("stored");
        assert!(job.pass <= 2, "pass {}", job.pass);
        let later = create(&b, "111222333").await;
        for id in made_on_b.iter().chain([&later]) {
            let (_, body) = a
                .load(uuid::Uuid::parse_str(id).expect("uuid"))
                .await
                .expect("load");
            let created = body.deks["identity"].created_ms;
            assert!(created > cutoff, "{id}: made at {created}, cutoff {cutoff}");
        }
        assert_eq!(
            count_needing(&a, JobKind::Rekey, Some(Category::Identity), cutoff)
                .await
                .expect("count"),
            0
        );
    }

    #[tokio::test]
    async fn a_rekey_replaces_data_keys_made_while_the_clock_ran_ahead() {
        // Review 16: a re-key took keys made later than its start for keys made after it, and
        // skipped them while it said it had re-keyed every record.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let day = 86_400_000;
        let mut ids = made_while_the_clock_ran_ahead(&store, &master, day).await;
        let vault = Arc::new(vault_over(store.clone(), &master).await);
        ids.push(create(&vault, "111222333").await);
        let dek = |vault: Arc<Vault<SledStore>>, id: String| async move {
            let (_, body) = vault
                .load(uuid::Uuid::parse_str(&id).expect("uuid"))
                .await
                .expect("load");
            body.deks["identity"].clone()
        };
        let jobs = Jobs::new(Arc::clone(&vault));
        let rx = jobs
            .start(JobKind::Rekey, Some(Category::Identity), "test", Vec::new())
            .await
            .expect("start");
        let p = finished(rx).await;
        assert_eq!((p.done, p.total, p.error), (4, 4, None));
        let cutoff = stored_job(vault.store())
            .await
            .expect("job")
            .expect("stored")
            .cutoff();
        assert!(cutoff >= vault::now_ms() + day - 60_000, "{cutoff}");
        for id in &ids {
            let d = dek(Arc::clone(&vault), id.clone()).await;
            assert_eq!(d.generation(), 2, "{id} re-keyed");
            assert!(d.created_ms > cutoff);
        }
        // A data key made after the job, on the right clock, is made after its cutoff too: a
        // resumed job would not take it for one to replace.
        let later = create(&vault, "111222333").await;
        let d = dek(Arc::clone(&vault), later).await;
        assert_eq!(d.generation(), 1);
        assert!(d.created_ms > cutoff);
        assert_eq!(
            count_needing(&vault, JobKind::Rekey, Some(Category::Identity), cutoff)
                .await
                .expect("count"),
            0
        );
    }

    /// A value stored as whole chunk envelopes (how records written before detached sealing
    /// keep their values) still reads, and a re-key seals it detached: chunks of ciphertext
    /// alone and a manifest, under the new data key.
    #[tokio::test]
    async fn values_stored_as_envelopes_read_and_a_rekey_seals_them_detached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let vault = Arc::new(vault_over(store.clone(), &master).await);
        let recruiter = caller("recruiter");
        let cv: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        let blob = Value::Blob {
            bytes: Zeroizing::new(cv.clone()),
            content_type: "application/pdf".into(),
        };
        let mut ev = audit::Context::new("CreateRecord");
        let (id, _) = vault
            .create(
                &recruiter,
                "recruitment",
                vec![
                    text("full_name", "Someone"),
                    ("cv_document".to_string(), blob),
                ],
                &mut ev,
            )
            .await
            .expect("create");
        let read_cv = |vault: Arc<Vault<SledStore>>| async move {
            let got = vault
                .get(
                    &caller("recruiter"),
                    &id.to_string(),
                    "recruitment",
                    &["cv_document".into()],
                )
                .await
                .expect("read");
            match &got.fields[0].1 {
                Value::Blob { bytes, .. } => bytes.to_vec(),
                Value::Text(_) => panic!("blob"),
            }
        };
        let (_, mut body) = vault.load(id).await.expect("load");
        let mut entry = body.fields["cv_document"].clone();
        assert!(entry.detached && !entry.in_header);
        assert_eq!(entry.chunks, 3);
        // Stored as before: each 16 KiB chunk a whole envelope, no manifest.
        let stored = body.deks["cv"].clone();
        let dek = vault
            .unwrap(id.as_bytes(), Category::Cv, &stored)
            .expect("unwrap");
        let sealer = SealingKey::new(&dek, stored.generation());
        let mut batch = Batch::default();
        let mut digest = record::FieldDigest::new();
        for (i, chunk) in cv.chunks(record::CHUNK_LEN).enumerate() {
            let i = u32::try_from(i).expect("index");
            let ctx = record::chunk_context(id.as_bytes(), "cv_document", i, 3);
            let envelope = sealer.seal(&ctx, chunk).expect("seal");
            digest.add(&envelope).expect("envelope");
            let key = record::chunk_key(id.as_bytes(), "cv_document", entry.revision, i);
            batch.put(Keyspace::Fields, key, envelope);
        }
        let manifest = record::manifest_key(id.as_bytes(), "cv_document", entry.revision);
        batch.delete(Keyspace::Fields, manifest.clone());
        entry.detached = false;
        entry.digest = digest.finish().to_vec();
        body.fields.insert("cv_document".into(), entry.clone());
        let (kv, ik) = vault.keys().integrity_key();
        batch.put(Keyspace::Records, id.as_bytes().to_vec(), body.seal(kv, ik));
        store.commit(batch).await.expect("commit");
        assert_eq!(read_cv(Arc::clone(&vault)).await, cv);

        let jobs = Jobs::new(Arc::clone(&vault));
        let rx = jobs
            .start(JobKind::Rekey, Some(Category::Cv), "test", Vec::new())
            .await
            .expect("start");
        let p = finished(rx).await;
        assert_eq!((p.done, p.total, p.error), (1, 1, None));
        let (_, body) = vault.load(id).await.expect("load");
        let after = &body.fields["cv_document"];
        assert!(after.detached && !after.in_header);
        assert_eq!((after.chunks, after.revision), (3, entry.revision));
        assert_eq!(body.deks["cv"].generation(), 2);
        let held = store
            .get(Keyspace::Fields, &manifest)
            .await
            .expect("get")
            .expect("a manifest");
        assert_eq!(held.len(), crypto::HEADER_LEN + 3 * crypto::SEAL_LEN);
        assert_eq!(
            held[..2],
            [crypto::FORMAT_DETACHED, crypto::ALG_AES_256_GCM]
        );
        assert_eq!(held[2..6], 2u32.to_be_bytes());
        let mut sizes = Vec::new();
        for i in 0..3 {
            let key = record::chunk_key(id.as_bytes(), "cv_document", entry.revision, i);
            let chunk = store.get(Keyspace::Fields, &key).await.expect("get");
            sizes.push(chunk.expect("chunk").len());
        }
        assert_eq!(sizes, [16_384, 16_384, 7_232], "ciphertext alone");
        assert_eq!(read_cv(Arc::clone(&vault)).await, cv);
        jobs.stop().await;
    }

    /// Two instances with a short lease over one gated store, three records needing a rewrap
    /// of identity.
    async fn two_instances(dir: &std::path::Path) -> (Gated, Arc<Jobs<Gated>>, Arc<Jobs<Gated>>) {
        let store = Gated::new(
            SledStore::open(dir).expect("open"),
            Gate {
                open: watch::channel(false).0,
            },
        );
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let a = Arc::new(vault_over(store.clone(), &master).await);
        let b = Arc::new(vault_over(store.clone(), &master).await);
        for _ in 0..3 {
            create(&a, "111222333").await;
        }
        a.keys()
            .rotate(a.store(), &[Category::Identity], vec![])
            .await
            .expect("rotate");
        let options = JobOptions {
            lease_ttl: std::time::Duration::from_millis(600),
            exclusive: false,
        };
        (
            store,
            Jobs::with_options(a, options),
            Jobs::with_options(b, options),
        )
    }

    #[tokio::test]
    async fn a_job_runs_once_across_instances_and_moves_when_its_runner_dies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, a, b) = two_instances(dir.path()).await;
        let _first = a
            .start(JobKind::Rewrap, None, "test", Vec::new())
            .await
            .expect("A starts the rewrap");
        assert!(b.busy().await.expect("busy"), "B sees A's job");
        let refused = b
            .start(JobKind::Rekey, Some(Category::Identity), "test", Vec::new())
            .await
            .expect_err("another kind is refused while A runs");
        assert!(
            matches!(&refused, VaultError::FailedPrecondition(m) if m.contains("on another instance")),
            "{refused}"
        );
        let watching = b
            .start(
                JobKind::Rewrap,
                Some(Category::Identity),
                "test",
                Vec::new(),
            )
            .await
            .expect("B attaches to A's job");
        // A's heartbeat keeps the lease beyond its time to live.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        assert!(!b.adopt(false).await.expect("adopt"), "A's lease is live");
        // A dies with its first page unwritten; once its lease expires, B takes the job over.
        a.abandon().await;
        assert!(!b.adopt(false).await.expect("adopt"), "not expired yet");
        // B's adopter takes it over by itself once the lease has expired.
        let adopter = b.spawn_adopter();
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            // From A's side, the job is busy once another instance holds the lease.
            while !a.busy().await.expect("busy") {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("B takes over");
        adopter.abort();
        store.open.send_replace(true);
        let p = finished(watching).await;
        assert_eq!((p.done, p.total, p.error), (3, 3, None));
        let counts = version_counts(b.vault()).await.expect("counts");
        assert_eq!(counts.get(&(Category::Identity, 1)), None);
        assert_eq!(counts[&(Category::Identity, 2)], 3);
        let actions = actions(&store).await;
        let count = |a: &str| actions.iter().filter(|x| *x == a).count();
        assert_eq!(
            (
                count("RewrapRecord"),
                count("RewrapResumed"),
                count("RewrapFinished")
            ),
            (3, 1, 1),
            "{actions:?}"
        );
        assert!(!b.busy().await.expect("busy"));
        assert!(!a.busy().await.expect("busy"));
    }

    #[tokio::test]
    async fn a_runner_whose_job_was_taken_over_writes_nothing_more() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, a, b) = two_instances(dir.path()).await;
        let first = a
            .start(JobKind::Rewrap, None, "test", Vec::new())
            .await
            .expect("A starts the rewrap");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // B takes the job as if A's lease had expired (a paused VM, a clock jump): A's page
        // is waiting to commit.
        assert!(b.adopt(true).await.expect("adopt"), "B takes over");
        store.open.send_replace(true);
        let p = finished(first).await;
        assert_eq!(
            (p.done, p.total, p.error),
            (3, 3, None),
            "A's watchers follow the job to its end on B"
        );
        let stored = stored_job(&store).await.expect("job").expect("stored");
        assert!(stored.finished_ms.is_some() && stored.error.is_none());
        let actions = actions(&store).await;
        let count = |a: &str| actions.iter().filter(|x| *x == a).count();
        assert_eq!(
            (count("RewrapRecord"), count("RewrapFinished")),
            (3, 1),
            "only B's pages are written: {actions:?}"
        );
        let counts = version_counts(b.vault()).await.expect("counts");
        assert_eq!(counts[&(Category::Identity, 2)], 3);
    }

    #[tokio::test]
    async fn a_stopped_job_is_taken_over_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, a, b) = two_instances(dir.path()).await;
        a.start(JobKind::Rewrap, None, "test", Vec::new())
            .await
            .expect("A starts the rewrap");
        a.stop().await;
        assert!(
            !b.busy().await.expect("busy"),
            "a stopped job is not running"
        );
        assert!(
            b.adopt(false).await.expect("adopt"),
            "the lease was released"
        );
        store.open.send_replace(true);
        let rx = b
            .start(JobKind::Rewrap, None, "test", Vec::new())
            .await
            .expect("attach");
        let p = finished(rx).await;
        assert_eq!((p.done, p.total, p.error), (3, 3, None));
    }

    #[tokio::test]
    async fn a_job_whose_new_runner_dies_ends_its_watchers_and_is_taken_over_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, a, b) = two_instances(dir.path()).await;
        let first = a
            .start(JobKind::Rewrap, None, "test", Vec::new())
            .await
            .expect("A starts the rewrap");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(b.adopt(true).await.expect("adopt"), "B takes over");
        // B dies before writing anything (its first page waits at the gate).
        b.abandon().await;
        store.open.send_replace(true);
        // A's watchers followed the job to B; once B's lease expires they are told.
        let p = finished(first).await;
        assert!(
            p.error
                .as_deref()
                .is_some_and(|e| e.contains("stopped before it finished")),
            "{p:?}"
        );
        assert!(!a.busy().await.expect("busy"), "nobody runs it");
        assert!(
            a.adopt(false).await.expect("adopt"),
            "A takes it over again"
        );
        let rx = a
            .start(JobKind::Rewrap, None, "test", Vec::new())
            .await
            .expect("attach");
        let p = finished(rx).await;
        assert_eq!((p.done, p.total, p.error), (3, 3, None));
    }

    /// A store whose lease renewals (puts of job/lease only) are held until the job's final
    /// batch (job/current with finished) has committed, and whose final batch returns only once
    /// that renewal has failed: both complete at once.
    struct Racy {
        final_done: tokio::sync::Notify,
        renew_done: tokio::sync::Notify,
    }

    impl Hooks for Racy {
        async fn commit(&self, store: &SledStore, batch: Batch) -> Result<(), StoreError> {
            let put_value = |key: &[u8]| {
                batch.ops.iter().find_map(|op| match op {
                    crate::store::Op::Put(Keyspace::Meta, k, v) if k == key => Some(v.clone()),
                    _ => None,
                })
            };
            let job = put_value(META_JOB);
            let lease_put = put_value(lease::META_LEASE);
            let owner_put = put_value(lease::META_OWNER);
            let is_final = job
                .as_deref()
                .and_then(|j| serde_json::from_slice::<JobState>(j).ok())
                .is_some_and(|j| j.finished_ms.is_some() && j.error.is_none());
            let is_renew = job.is_none()
                && owner_put.is_none()
                && lease_put
                    .as_deref()
                    .and_then(|l| serde_json::from_slice::<lease::LeaseRow>(l).ok())
                    .is_some_and(|r| r.expires_ms > 0);
            if is_renew {
                self.final_done.notified().await;
                let r = store.commit(batch).await;
                self.renew_done.notify_one();
                return r;
            }
            if is_final {
                let r = store.commit(batch).await;
                self.final_done.notify_one();
                self.renew_done.notified().await;
                return r;
            }
            store.commit(batch).await
        }
    }

    #[tokio::test]
    async fn a_renewal_that_meets_the_jobs_own_release_is_no_take_over() {
        for _ in 0..4 {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Hooked::new(
                SledStore::open(dir.path()).expect("open"),
                Racy {
                    final_done: tokio::sync::Notify::new(),
                    renew_done: tokio::sync::Notify::new(),
                },
            );
            let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
            let v = Arc::new(vault_over(store.clone(), &master).await);
            for _ in 0..3 {
                create(&v, "111222333").await;
            }
            v.keys()
                .rotate(v.store(), &[Category::Identity], vec![])
                .await
                .expect("rotate");
            let jobs = Jobs::with_options(
                v,
                JobOptions {
                    lease_ttl: std::time::Duration::from_millis(30),
                    exclusive: true,
                },
            );
            let rx = jobs
                .start(JobKind::Rewrap, None, "test", Vec::new())
                .await
                .expect("start");
            let p = finished(rx).await;
            assert_eq!((p.done, p.total, p.error), (3, 3, None));
            let stored = stored_job(&store).await.expect("job").expect("stored");
            assert!(stored.finished_ms.is_some() && stored.error.is_none());
            let actions = actions(&store).await;
            assert_eq!(
                actions.iter().filter(|a| *a == "RewrapFinished").count(),
                1,
                "{actions:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_watcher_elsewhere_learns_the_end_of_a_job_replaced_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, a, b) = two_instances(dir.path()).await;
        let rx_a = a
            .start(JobKind::Rewrap, None, "test", Vec::new())
            .await
            .expect("A starts");
        let watching = b
            .start(JobKind::Rewrap, None, "test", Vec::new())
            .await
            .expect("B attaches");
        store.open.send_replace(true);
        let pa = finished(rx_a).await;
        assert!(pa.finished && pa.error.is_none(), "{pa:?}");
        // A new job at once, before B's watcher polls again.
        a.start(JobKind::Rekey, Some(Category::Contact), "test", Vec::new())
            .await
            .expect("next job");
        let pb = finished(watching).await;
        assert!(pb.finished && pb.error.is_none(), "{pb:?}");
    }

    /// Instance A (sharing B's store) rotates a category and writes a record under the new
    /// version as B's rewrap reads its first page (review 8, races F1).
    #[derive(Default)]
    struct OtherInstance {
        a: std::sync::OnceLock<Arc<Vault<SledStore>>>,
        fired: std::sync::atomic::AtomicBool,
    }

    impl Hooks for OtherInstance {
        async fn before_scan(&self, _store: &SledStore, prefix: &[u8]) -> Result<(), StoreError> {
            // The job's pages scan the whole key space (empty prefix).
            if prefix.is_empty() && !self.fired.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let a = self.a.get().expect("set");
                refresh_keys(a).await.expect("A reloads");
                a.keys()
                    .rotate(a.store(), &[Category::Identity], vec![])
                    .await
                    .expect("A rotates identity");
                create(a, "111222333").await;
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_rotation_elsewhere_during_a_rewrap_is_picked_up_not_taken_for_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sled = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let a = Arc::new(vault_over(sled.clone(), &master).await);
        let store = Hooked::new(sled, OtherInstance::default());
        let b = Arc::new(vault_over(store.clone(), &master).await);
        for _ in 0..3 {
            create(&a, "111222333").await;
        }
        b.keys()
            .rotate(b.store(), &[Category::Identity], vec![])
            .await
            .expect("B rotates");
        assert!(store.a.set(Arc::clone(&a)).is_ok());
        let rx = Jobs::new(Arc::clone(&b))
            .start(
                JobKind::Rewrap,
                Some(Category::Identity),
                "test",
                Vec::new(),
            )
            .await
            .expect("start");
        let p = finished(rx).await;
        assert!(store.fired.load(std::sync::atomic::Ordering::SeqCst));
        assert!(p.finished && p.error.is_none(), "{p:?}");
        // B picked up A's version; every identity key is under it now.
        let v3 = b.keys().active_version(Category::Identity);
        assert_eq!(v3, Some(3));
        let counts = version_counts(&b).await.expect("counts");
        assert_eq!(counts.get(&(Category::Identity, 3)), Some(&4), "{counts:?}");
    }

    /// A version retired elsewhere does not live on in another instance's memory: its
    /// adopter reloads the ring (review 8, races F2).
    #[tokio::test]
    async fn a_kek_retired_elsewhere_leaves_this_instances_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let a = Arc::new(vault_over(store.clone(), &master).await);
        let b = Arc::new(vault_over(store, &master).await);
        a.keys()
            .rotate(a.store(), &[Category::Identity], vec![])
            .await
            .expect("A rotates");
        refresh_keys(&b).await.expect("B learns of v2");
        let id = create(&a, "111222333").await;
        let count = || async {
            version_counts(&a)
                .await
                .map(|c| c.get(&(Category::Identity, 1)).copied().unwrap_or(0))
                .map_err(|e| e.to_string())
        };
        a.keys()
            .retire(a.store(), Category::Identity, 1, count, vec![])
            .await
            .expect("A retires identity v1");
        // B serves on: nothing in its traffic makes it reload.
        b.get(&caller("payroll"), &id, "payroll", &[])
            .await
            .expect("B reads");
        assert!(b.keys().holds(Category::Identity, 1));
        let jobs = Arc::new(Jobs::with_options(
            Arc::clone(&b),
            JobOptions {
                lease_ttl: std::time::Duration::from_millis(40),
                exclusive: false,
            },
        ));
        let adopter = jobs.spawn_adopter();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while b.keys().holds(Category::Identity, 1) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "B still holds identity/v1"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        adopter.abort();
    }
}

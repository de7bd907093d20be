//! The key job's lease: which instance runs the job, so that instances sharing one store run
//! it once, and another takes it over when its runner dies.
//!
//! ```text
//! meta/job/owner → {"instance": id, "epoch": n}                     changes only on a take-over
//! meta/job/lease → {"instance": id, "epoch": n, "expires_ms": t}    renewed by the runner
//! ```
//!
//! - **Fencing.** Every batch a job writes expects `job/owner` unchanged ([`Lease::fence`]).
//!   After a take-over the previous runner's batches conflict, whatever its clock says and
//!   however late they reach the store, so two runners never both write.
//! - **Liveness.** The runner renews `job/lease` every third of its time to live with a
//!   compare-and-set ([`Lease::renew`]). Another instance may take the job over
//!   ([`View::take`]) only once the lease has expired by its own clock, or was released (a
//!   finished, failed or stopped job releases it). Instances' clocks must agree to well within
//!   the time to live (NTP); a clock that runs ahead can only make an instance take over
//!   early, which fencing makes safe (the slower runner's next batch fails).
//! - **One process.** A store that only one process can open (sled locks its directory)
//!   has no other runner: at start-up a lease left by the previous process is taken at once.

use std::time::Duration;

use crate::error::VaultError;
use crate::store::{Batch, Expect, Keyspace, Store};
use crate::vault;

/// Meta key naming the instance that owns the job (fencing token).
pub const META_OWNER: &[u8] = b"job/owner";
/// Meta key holding the owner's lease and its expiry.
pub const META_LEASE: &[u8] = b"job/lease";
/// Default time to live of a lease: a runner that stops renewing it for this long is taken
/// for dead.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15);

/// `job/owner`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Owner {
    instance: String,
    epoch: u64,
}

/// `job/lease`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseRow {
    /// The owning instance.
    pub instance: String,
    /// The owner's epoch (as in `job/owner`).
    pub epoch: u64,
    /// Expiry, Unix milliseconds; 0 once released.
    pub expires_ms: i64,
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("lease rows serialize (strings and integers)")
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

/// The lease rows as read at one moment.
#[derive(Debug, Clone)]
pub struct View {
    owner: Option<Vec<u8>>,
    lease: Option<Vec<u8>>,
    row: Option<LeaseRow>,
}

impl View {
    /// Reads both rows.
    pub async fn read<S: Store>(store: &S) -> Result<Self, VaultError> {
        let owner = store.get(Keyspace::Meta, META_OWNER).await?;
        let lease = store.get(Keyspace::Meta, META_LEASE).await?;
        let row = match &lease {
            None => None,
            Some(bytes) => Some(serde_json::from_slice::<LeaseRow>(bytes).map_err(|_| {
                VaultError::Internal("the stored key job lease is unreadable".into())
            })?),
        };
        Ok(Self { owner, lease, row })
    }

    /// The lease, if another instance than `instance` holds it and it has not expired.
    pub fn held_elsewhere(&self, instance: &str) -> Option<&LeaseRow> {
        self.row
            .as_ref()
            .filter(|r| r.instance != instance && r.expires_ms > vault::now_ms())
    }

    /// Whether no instance has held the lease for longer than `grace` past its expiry (time
    /// enough for another instance to take an abandoned job over): the job's runner is gone.
    /// A released lease (expiry 0) or none at all counts as gone.
    pub fn gone_for(&self, grace: Duration) -> bool {
        self.row
            .as_ref()
            .is_none_or(|r| r.expires_ms.saturating_add(ttl_ms(grace)) < vault::now_ms())
    }

    /// Adds to `batch` the take-over of the lease by `instance`, on the condition that both
    /// rows are still as read; the returned lease is the instance's once the batch commits.
    pub fn take(&self, batch: &mut Batch, instance: &str, ttl: Duration) -> Lease {
        let expect = |bytes: &Option<Vec<u8>>| match bytes {
            Some(b) => Expect::Value(b.clone()),
            None => Expect::Absent,
        };
        batch.expect(Keyspace::Meta, META_OWNER.to_vec(), expect(&self.owner));
        batch.expect(Keyspace::Meta, META_LEASE.to_vec(), expect(&self.lease));
        let epoch = self.row.as_ref().map_or(0, |r| r.epoch) + 1;
        let owner = encode(&Owner {
            instance: instance.to_string(),
            epoch,
        });
        let row = LeaseRow {
            instance: instance.to_string(),
            epoch,
            expires_ms: vault::now_ms().saturating_add(ttl_ms(ttl)),
        };
        let lease = encode(&row);
        batch.put(Keyspace::Meta, META_OWNER.to_vec(), owner.clone());
        batch.put(Keyspace::Meta, META_LEASE.to_vec(), lease.clone());
        Lease {
            owner,
            row: parking_lot::Mutex::new((row, lease)),
            ttl,
        }
    }
}

/// A lease this instance holds (once the batch that took it has committed).
#[derive(Debug)]
pub struct Lease {
    /// `job/owner` as this instance wrote it.
    owner: Vec<u8>,
    /// The lease row as last written, and its bytes.
    row: parking_lot::Mutex<(LeaseRow, Vec<u8>)>,
    ttl: Duration,
}

impl Lease {
    /// Makes `batch` conditional on this instance still owning the job.
    pub fn fence(&self, batch: &mut Batch) {
        batch.expect(
            Keyspace::Meta,
            META_OWNER.to_vec(),
            Expect::Value(self.owner.clone()),
        );
    }

    /// Adds to `batch` the release of the lease (expiry 0), fenced: another instance may take
    /// the job at once.
    pub fn release(&self, batch: &mut Batch) {
        self.fence(batch);
        let row = self.row.lock().0.clone();
        batch.put(
            Keyspace::Meta,
            META_LEASE.to_vec(),
            encode(&LeaseRow {
                expires_ms: 0,
                ..row
            }),
        );
    }

    /// Whether this instance still owns the job (reads `job/owner`).
    pub async fn still_ours<S: Store>(&self, store: &S) -> Result<bool, VaultError> {
        Ok(store.get(Keyspace::Meta, META_OWNER).await?.as_deref() == Some(&self.owner[..]))
    }

    /// How often the runner renews the lease.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Moves the expiry a time to live ahead, on the condition that nobody took the lease.
    /// `Ok(false)`: it was taken over (or released).
    pub async fn renew<S: Store>(&self, store: &S) -> Result<bool, VaultError> {
        let (row, bytes) = self.row.lock().clone();
        let next = LeaseRow {
            expires_ms: vault::now_ms().saturating_add(ttl_ms(self.ttl)),
            ..row
        };
        let next_bytes = encode(&next);
        let mut batch = Batch::default();
        self.fence(&mut batch);
        batch.expect(Keyspace::Meta, META_LEASE.to_vec(), Expect::Value(bytes));
        batch.put(Keyspace::Meta, META_LEASE.to_vec(), next_bytes.clone());
        match store.commit(batch).await {
            Ok(()) => {
                *self.row.lock() = (next, next_bytes);
                Ok(true)
            }
            Err(crate::store::StoreError::Conflict) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

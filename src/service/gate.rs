//! The authentication gate in front of `Records`, `Audit` and `Keys` (health and reflection
//! stay open): a tonic interceptor that authenticates a request on its metadata and TLS peer
//! certificates *before its body is read*, so that a caller without valid credentials is
//! answered `UNAUTHENTICATED` at once and never makes the server buffer or decode a message.
//!
//! An authenticated request carries its [`Caller`] on in the request's extensions, where
//! [`super::Authenticator::begin`] finds it (no second authentication). A refusal writes the
//! request's log line at once; its audit event (action, outcome `denied`, no principal and no
//! record id: the body that would name one is never read) goes to one background task over a
//! bounded queue, which commits every event queued so far in one batch (one log sync for many
//! refusals). When the queue is full a refusal is counted instead, and the task writes one
//! summary event ([`NOT_RECORDED_ACTION`]) saying how many refusals it did not record one by
//! one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::{Authenticator, RequestLog};
use crate::audit;
use crate::policy::Caller;
use crate::store::{Batch, Store};
use crate::vault::Vault;

/// The methods behind the gate, by gRPC service: the actions their events name.
pub const GATED: &[(&str, &[&str])] = &[
    (
        "kluis.v1.Records",
        &[
            "CreateRecord",
            "GetRecord",
            "UpdateRecord",
            "FindRecords",
            "ListRecords",
            "SetLifecycle",
            "SetConsent",
            "SetRestriction",
            "EraseRecord",
            "ExportRecord",
            "SetLegalHold",
        ],
    ),
    ("kluis.v1.Audit", &["QueryEvents", "VerifyChain"]),
    (
        "kluis.v1.Keys",
        &[
            "GetKeyStatus",
            "RotateKey",
            "Rewrap",
            "Rekey",
            "RetireKeyVersion",
        ],
    ),
];

/// The action of a refused call to a method a gated service does not have.
pub const UNKNOWN_ACTION: &str = "<unknown>";

/// Principal of the summary event of refusals that were not recorded one by one.
pub const GATE_PRINCIPAL: &str = "system:auth-gate";

/// Action of the summary event: `field_names` holds one entry, how many unauthenticated
/// refusals (since the previous such event) were not recorded as events of their own, in
/// decimal.
pub const NOT_RECORDED_ACTION: &str = "UnauthenticatedNotRecorded";

/// Refusals waiting for the recorder; beyond this they are counted.
pub const REFUSAL_QUEUE: usize = 4096;

/// Unauthenticated refusals recorded one by one, per second (with a burst of
/// [`REFUSAL_BURST`]); beyond that they are counted in a summary event, written at most
/// once per [`SUMMARY_EVERY`]. One anonymous client refused 5 400 times a second grew the
/// audit trail by 1.6 MB a second, an event each (review 13).
pub const REFUSALS_PER_SECOND: f64 = 200.0;
/// The burst of [`REFUSALS_PER_SECOND`].
pub const REFUSAL_BURST: f64 = 2000.0;
/// How often at most a summary of refusals not recorded one by one is written.
pub const SUMMARY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A token bucket: `REFUSALS_PER_SECOND`, up to `REFUSAL_BURST` saved.
struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

impl Bucket {
    fn full() -> Self {
        Self {
            tokens: REFUSAL_BURST,
            at: std::time::Instant::now(),
        }
    }

    /// Takes a token, if one is there.
    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * REFUSALS_PER_SECOND;
        self.tokens = (self.tokens + refill).min(REFUSAL_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The action a request names (its method), noted by [`note_action`] before the gate runs:
/// an interceptor does not see the request's path.
#[derive(Debug, Clone, Copy)]
struct Action(&'static str);

/// A caller the gate authenticated, carried to the handler in the request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct Authenticated(pub(crate) Caller);

/// Notes the action of a request to a gated service in its extensions (a transport layer in
/// front of every service: the interceptor sees metadata and extensions, not the path).
pub fn note_action<B>(mut request: http::Request<B>) -> http::Request<B> {
    if let Some(action) = action_of(request.uri().path()) {
        request.extensions_mut().insert(Action(action));
    }
    request
}

/// The action [`note_action`] noted in a request's `extensions` ([`UNKNOWN_ACTION`] if none).
pub(crate) fn action_in(extensions: &http::Extensions) -> &'static str {
    extensions.get::<Action>().map_or(UNKNOWN_ACTION, |a| a.0)
}

/// The action of a gated service's method at `path` (`/kluis.v1.Records/GetRecord` →
/// `GetRecord`; an unknown method → [`UNKNOWN_ACTION`]); `None` for other services.
fn action_of(path: &str) -> Option<&'static str> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let (_, methods) = GATED.iter().find(|(s, _)| *s == service)?;
    Some(
        methods
            .iter()
            .find(|m| **m == method)
            .copied()
            .unwrap_or(UNKNOWN_ACTION),
    )
}

/// The interceptor of the gated services.
#[derive(Clone)]
pub struct Gate {
    auth: Authenticator,
    refusals: Refusals,
    connections: Option<Arc<crate::server::Connections>>,
}

impl Gate {
    /// A gate authenticating with `auth` and recording refusals through `refusals`.
    pub fn new(auth: Authenticator, refusals: Refusals) -> Self {
        Self {
            auth,
            refusals,
            connections: None,
        }
    }

    /// Marks the connections authenticated calls come on in `connections` (they then keep
    /// their slot past the first-request deadline).
    pub(crate) fn with_connections(mut self, connections: Arc<crate::server::Connections>) -> Self {
        self.connections = Some(connections);
        self
    }
}

impl Interceptor for Gate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        match self.auth.authenticate(&request) {
            Ok(caller) => {
                if let (Some(connections), Some(peer)) = (&self.connections, request.remote_addr())
                {
                    connections.mark(peer);
                }
                // The body, read after this, counts against this principal's share of the
                // request-bytes budget.
                if let Some(owner) = request.extensions().get::<crate::server::BodyOwner>() {
                    owner.set(&caller.principal);
                }
                request.extensions_mut().insert(Authenticated(caller));
                Ok(request)
            }
            Err(status) => {
                let action = action_in(request.extensions());
                self.refusals.record(action);
                Err(RequestLog::start(action, &request).refuse(status))
            }
        }
    }
}

/// What the gate and the recorder share.
struct Shared {
    /// Refusals made and not yet written (queued, being written, or counted in `overflow`).
    pending: AtomicU64,
    /// Refusals not queued (over the rate, queue full or recorder gone) and not yet
    /// summarised.
    overflow: AtomicU64,
    /// Wakes the recorder when `overflow` grew.
    wake: Notify,
    /// The rate of refusals recorded one by one.
    bucket: parking_lot::Mutex<Bucket>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            pending: AtomicU64::new(0),
            overflow: AtomicU64::new(0),
            wake: Notify::new(),
            bucket: parking_lot::Mutex::new(Bucket::full()),
        }
    }
}

/// The sending side of the refusal recorder.
#[derive(Clone)]
pub struct Refusals {
    tx: Option<mpsc::Sender<&'static str>>,
    shared: Arc<Shared>,
}

impl Refusals {
    /// Records nothing (a vault without auditing).
    pub fn disabled() -> Self {
        Self {
            tx: None,
            shared: Arc::default(),
        }
    }

    /// How many refusals are not recorded yet, without keeping the recorder open.
    pub fn backlog(&self) -> Backlog {
        Backlog(Arc::clone(&self.shared))
    }

    /// Queues the event of a refused call of `action`, or counts it when the queue is full.
    fn record(&self, action: &'static str) {
        let Some(tx) = &self.tx else { return };
        // Counted before it is queued: the recorder subtracts it once written.
        self.shared.pending.fetch_add(1, Ordering::Relaxed);
        let queued = self.shared.bucket.lock().take() && tx.try_send(action).is_ok();
        if !queued {
            self.shared.overflow.fetch_add(1, Ordering::Relaxed);
            self.shared.wake.notify_one();
        }
    }
}

/// How many refusals the gate made that are not in the audit trail yet (see
/// [`Refusals::backlog`]): what a shutdown that cannot wait for the recorder leaves
/// unrecorded.
pub struct Backlog(Arc<Shared>);

impl Backlog {
    /// Refusals made and not written yet.
    pub fn unrecorded(&self) -> u64 {
        self.0.pending.load(Ordering::Relaxed)
    }
}

/// Starts the task that writes the events of refused calls into `vault`'s audit trail.
/// It ends once every [`Refusals`] handle is gone (the server stopped), after writing what
/// was queued. Without auditing nothing is started.
pub fn spawn_refusal_recorder<S: Store>(
    vault: Arc<Vault<S>>,
) -> (Refusals, Option<tokio::task::JoinHandle<()>>) {
    spawn_with(vault, REFUSAL_QUEUE)
}

/// [`spawn_refusal_recorder`] with a queue of `capacity` refusals.
fn spawn_with<S: Store>(
    vault: Arc<Vault<S>>,
    capacity: usize,
) -> (Refusals, Option<tokio::task::JoinHandle<()>>) {
    if !vault.auditing() {
        return (Refusals::disabled(), None);
    }
    let (tx, mut rx) = mpsc::channel::<&'static str>(capacity);
    let shared = Arc::new(Shared::default());
    let refusals = Refusals {
        tx: Some(tx),
        shared: Arc::clone(&shared),
    };
    let task = tokio::spawn(async move {
        let mut open = true;
        let mut actions: Vec<&'static str> = Vec::new();
        let mut last_summary: Option<tokio::time::Instant> = None;
        while open {
            // A summary waits for its time (one per `SUMMARY_EVERY`); events do not.
            let summary_at = last_summary.map(|t| t + SUMMARY_EVERY);
            let overflowing = shared.overflow.load(Ordering::Relaxed) > 0;
            tokio::select! {
                got = rx.recv() => match got {
                    Some(action) => actions.push(action),
                    None => open = false,
                },
                () = shared.wake.notified(), if !overflowing => {}
                () = tokio::time::sleep_until(summary_at.unwrap_or_else(tokio::time::Instant::now)),
                    if overflowing => {}
            }
            while actions.len() < capacity {
                match rx.try_recv() {
                    Ok(action) => actions.push(action),
                    Err(_) => break,
                }
            }
            let due = !open || summary_at.is_none_or(|at| tokio::time::Instant::now() >= at);
            let dropped = if due {
                shared.overflow.swap(0, Ordering::Relaxed)
            } else {
                0
            };
            if dropped > 0 {
                last_summary = Some(tokio::time::Instant::now());
            }
            match write_refusals(vault.store(), &actions, dropped).await {
                Ok(()) => {
                    let written = (actions.len() as u64).saturating_add(dropped);
                    shared.pending.fetch_sub(written, Ordering::Relaxed);
                }
                // Counted again (and still pending): the next summary event says they were
                // not recorded.
                Err(lost) => {
                    shared.overflow.fetch_add(lost, Ordering::Relaxed);
                }
            }
            actions.clear();
        }
    });
    (refusals, Some(task))
}

/// The event of a refused call of `action`: no principal, no role, no record.
fn refusal_event(action: &str) -> audit::Draft {
    let mut draft = audit::Draft::new(action, "", "");
    draft.outcome = audit::Outcome::Denied.as_str().into();
    draft
}

/// The event saying that `count` refusals were not recorded one by one.
fn not_recorded_event(count: u64) -> audit::Draft {
    let mut draft = audit::Draft::new(
        NOT_RECORDED_ACTION,
        GATE_PRINCIPAL,
        crate::rotation::SYSTEM_ROLE,
    );
    draft.field_names = vec![count.to_string()];
    draft.outcome = audit::Outcome::Denied.as_str().into();
    draft
}

/// Commits one event per refused call in `actions`, and a summary of `dropped` more, in one
/// batch. On failure (logged) returns how many refusals went unrecorded.
async fn write_refusals<S: Store>(
    store: &S,
    actions: &[&'static str],
    dropped: u64,
) -> Result<(), u64> {
    if actions.is_empty() && dropped == 0 {
        return Ok(());
    }
    let mut batch = Batch::default();
    for action in actions {
        batch.append_event(refusal_event(action).encode());
    }
    if dropped > 0 {
        batch.append_event(not_recorded_event(dropped).encode());
    }
    store.commit(batch).await.map_err(|e| {
        tracing::error!(
            events = actions.len(),
            not_recorded = dropped,
            error = %e,
            "audit trail: the events of unauthenticated calls could not be written"
        );
        (actions.len() as u64).saturating_add(dropped)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gated_methods_are_exactly_the_methods_of_the_kluis_services() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("the compiled-in descriptor set decodes");
        let mut found: Vec<(String, Vec<String>)> = Vec::new();
        for file in &set.file {
            for service in &file.service {
                let name = format!("{}.{}", file.package(), service.name());
                let methods = service
                    .method
                    .iter()
                    .map(|m| m.name().to_string())
                    .collect();
                found.push((name, methods));
            }
        }
        let gated: Vec<(String, Vec<String>)> = GATED
            .iter()
            .map(|(s, ms)| (s.to_string(), ms.iter().map(|m| m.to_string()).collect()))
            .collect();
        let sorted = |mut v: Vec<(String, Vec<String>)>| {
            for (_, ms) in &mut v {
                ms.sort();
            }
            v.sort();
            v
        };
        assert_eq!(sorted(gated), sorted(found));
    }

    #[test]
    fn actions_come_from_the_path_of_gated_services_only() {
        assert_eq!(action_of("/kluis.v1.Records/GetRecord"), Some("GetRecord"));
        assert_eq!(action_of("/kluis.v1.Keys/Rewrap"), Some("Rewrap"));
        assert_eq!(
            action_of("/kluis.v1.Audit/NoSuchMethod"),
            Some(UNKNOWN_ACTION)
        );
        assert_eq!(action_of("/grpc.health.v1.Health/Check"), None);
        assert_eq!(action_of("/kluis.v1.Records"), None);
        assert_eq!(action_of(""), None);
    }

    #[test]
    fn refusal_events_name_the_action_alone_and_summaries_the_count() {
        let d = refusal_event("GetRecord");
        assert_eq!(
            (d.principal.as_str(), d.role.as_str(), d.record_id.as_str()),
            ("", "", "")
        );
        assert_eq!(
            (d.action.as_str(), d.outcome.as_str()),
            ("GetRecord", "denied")
        );
        let s = not_recorded_event(17);
        assert_eq!(s.principal, GATE_PRINCIPAL);
        assert_eq!(s.action, NOT_RECORDED_ACTION);
        assert_eq!(s.field_names, vec!["17"]);
        assert_eq!(audit::Draft::decode(&s.encode()), Some(s));
    }

    #[tokio::test]
    async fn queued_refusals_are_written_in_one_batch_and_the_overflow_as_one_summary() {
        use crate::crypto::SecretKey;
        use crate::keys::{KeyRing, MasterKey};
        use crate::store::SledStore;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let keys = KeyRing::open(&store, &master).await.expect("keys");
        let vault = Arc::new(Vault::new(
            store,
            Arc::new(crate::schema::Schema::default_schema()),
            Arc::new(keys),
        ));
        let (refusals, task) = spawn_with(Arc::clone(&vault), 2);
        // The recorder runs only once this (single-threaded) test awaits: two refusals are
        // queued, eight find the queue full.
        for action in ["GetRecord", "QueryEvents"]
            .into_iter()
            .chain(std::iter::repeat_n("RotateKey", 8))
        {
            refusals.record(action);
        }
        let backlog = refusals.backlog();
        assert_eq!(backlog.unrecorded(), 10);
        drop(refusals);
        task.expect("the vault audits")
            .await
            .expect("the recorder ends once the gates are gone");
        // Every refusal is recorded (two events, one summary of eight): none is at risk.
        assert_eq!(backlog.unrecorded(), 0);
        let page = audit::query(vault.store(), &audit::Filter::default(), 0, 100)
            .await
            .expect("query");
        let rows: Vec<_> = page
            .events
            .iter()
            .map(|e| {
                (
                    e.draft.principal.as_str(),
                    e.draft.role.as_str(),
                    e.draft.action.as_str(),
                    e.draft.record_id.as_str(),
                    e.draft.field_names.clone(),
                    e.draft.outcome.as_str(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                ("", "", "GetRecord", "", vec![], "denied"),
                ("", "", "QueryEvents", "", vec![], "denied"),
                (
                    GATE_PRINCIPAL,
                    "system",
                    NOT_RECORDED_ACTION,
                    "",
                    vec!["8".to_string()],
                    "denied"
                ),
            ]
        );
        // One batch: consecutive events of one sync, one time.
        let first = &page.events[0];
        assert!(page
            .events
            .iter()
            .enumerate()
            .all(|(i, e)| e.seq == first.seq + i as u64 && e.time_ms == first.time_ms));
    }

    #[test]
    fn refusals_beyond_the_rate_are_counted_not_recorded_one_by_one() {
        let mut bucket = Bucket::full();
        let taken = (0..5000).filter(|_| bucket.take()).count();
        // The burst, and what refilled meanwhile (a few at most).
        assert!(
            (REFUSAL_BURST as usize..REFUSAL_BURST as usize + 50).contains(&taken),
            "{taken}"
        );
        assert!(!bucket.take());
        bucket.at -= std::time::Duration::from_millis(100);
        let refilled = (0..100).filter(|_| bucket.take()).count();
        assert!((19..=21).contains(&refilled), "{refilled}");
    }
}

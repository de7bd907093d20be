//! The `kluis.v1.Keys` service: key status, rotation, rewrap and re-key jobs, retirement.
//! Rights are policy data (`keys = [...]`, by default only `security_officer`); none of these
//! calls reads or returns record data. Every call is an audit event; a rotation or retirement
//! commits its event in the same atomic batch as the key change.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::{finish, status, Authenticator};
use crate::audit;
use crate::error::{printable_name, VaultError};
use crate::policy::{Caller, KeyRight};
use crate::proto;
use crate::rotation::{self, JobKind, Jobs, Progress};
use crate::schema::Category;
use crate::store::Store;

/// The `kluis.v1.Keys` service.
pub struct KeysService<S> {
    jobs: Arc<Jobs<S>>,
    auth: Authenticator,
}

impl<S: Store> KeysService<S> {
    /// A service running key jobs through `jobs`, authenticating with `auth`.
    pub fn new(jobs: Arc<Jobs<S>>, auth: Authenticator) -> Self {
        Self { jobs, auth }
    }
}

fn require(caller: &Caller, right: KeyRight) -> Result<(), Status> {
    if caller.role.keys.contains(&right) {
        Ok(())
    } else {
        let call = match right {
            KeyRight::Status => "GetKeyStatus",
            KeyRight::Rotate => "RotateKey",
            KeyRight::Rewrap => "Rewrap",
            KeyRight::Rekey => "Rekey",
            KeyRight::Retire => "RetireKeyVersion",
        };
        Err(Status::permission_denied(format!(
            "role `{}` may not call {call} (policy right keys = [\"{}\"] is not granted)",
            caller.role.name,
            right.as_str()
        )))
    }
}

/// Parses a request's category; empty means every category where `empty_ok`.
fn parse_category(text: &str, empty_ok: bool) -> Result<Option<Category>, Status> {
    if text.is_empty() {
        return if empty_ok {
            Ok(None)
        } else {
            Err(Status::invalid_argument("category: is required"))
        };
    }
    Category::parse(text).map(Some).ok_or_else(|| {
        Status::invalid_argument(format!(
            "category: unknown category `{}` (categories: {})",
            printable_name(text),
            Category::ALL.map(Category::as_str).join(", ")
        ))
    })
}

/// How the events of `RotateKey` name the versions it made (`identity/v4`).
fn version_names(made: &[(Category, u32)]) -> impl Iterator<Item = String> + '_ {
    made.iter()
        .map(|&(category, version)| crate::keys::version_name(category, version))
}

/// The category names an event records for `scope`.
fn scope_names(scope: Option<Category>) -> Vec<String> {
    crate::rotation::category_names(scope.map(|c| c.as_str()))
}

fn timestamp(ms: i64) -> Option<prost_types::Timestamp> {
    (ms > 0).then(|| prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

/// The request's `ok` event body, to be committed with the change it records (none when the
/// vault does not audit).
fn ok_event<S: Store>(vault: &crate::vault::Vault<S>, draft: &audit::Draft) -> Vec<Vec<u8>> {
    if !vault.auditing() {
        return Vec::new();
    }
    let mut draft = draft.clone();
    draft.outcome = audit::Outcome::Ok.as_str().into();
    vec![draft.encode()]
}

/// The key status after a change that is already committed (`done` says what): if reading it
/// fails, the error says that the change happened, so that nobody retries it blindly.
async fn status_after<S: Store>(jobs: &Jobs<S>, done: &str) -> Result<proto::KeyStatus, Status> {
    key_status(jobs).await.map_err(|e| {
        let status = status::from_vault(e);
        Status::new(
            status.code(),
            format!(
                "{done}; only reading the key status afterwards failed: {}",
                status.message()
            ),
        )
    })
}

/// Every category's KEK versions with their states and exact record counts.
pub async fn key_status<S: Store>(jobs: &Jobs<S>) -> Result<proto::KeyStatus, VaultError> {
    let vault = jobs.vault();
    // Another instance may have rotated or retired since this one last looked.
    rotation::refresh_keys(vault).await?;
    let counts = rotation::version_counts(vault).await?;
    let versions = vault.keys().versions();
    let active = vault.keys().active_versions();
    let categories = Category::ALL
        .iter()
        .map(|&category| proto::CategoryKeys {
            category: category.as_str().to_string(),
            active_version: active.get(&category).copied().unwrap_or(0),
            versions: versions
                .iter()
                .filter(|v| v.category == category)
                .map(|v| proto::KeyVersion {
                    version: v.version,
                    state: v.state.as_str().to_string(),
                    created: timestamp(v.info.created_ms),
                    records: counts.get(&(category, v.version)).copied().unwrap_or(0),
                })
                .collect(),
        })
        .collect();
    let last_job = rotation::stored_job(vault.store())
        .await?
        .map(|job| proto::KeyJob {
            kind: job.kind.as_str().to_string(),
            category: job.category.clone().unwrap_or_default(),
            done: job.done.min(job.total),
            total: job.total,
            started: timestamp(job.started_ms),
            finished: job.finished_ms.and_then(timestamp),
            error: job.error.clone().unwrap_or_default(),
            requested_by: job.requested_by,
        });
    Ok(proto::KeyStatus {
        categories,
        last_job,
    })
}

fn progress_to_proto(p: &Progress) -> proto::RewrapProgress {
    proto::RewrapProgress {
        category: p.category.clone(),
        done: p.done,
        total: p.total,
        finished: p.finished,
    }
}

/// The stream of a job's progress: the current state at once, then every change, until it
/// finishes (or stops with an error, which ends the stream with ABORTED; or is stopped by a
/// shutdown, which ends it with UNAVAILABLE).
pub type ProgressStream =
    Pin<Box<dyn Stream<Item = Result<proto::RewrapProgress, Status>> + Send + 'static>>;

/// Where a progress stream is.
enum Watch {
    /// About to send the job's current state.
    Start(tokio::sync::watch::Receiver<Progress>),
    /// Waiting for the job's next state.
    Next(tokio::sync::watch::Receiver<Progress>),
    /// Ended.
    Done,
}

fn progress_stream(rx: tokio::sync::watch::Receiver<Progress>) -> ProgressStream {
    let stream = futures::stream::unfold(Watch::Start(rx), |state| async move {
        let mut rx = match state {
            Watch::Start(rx) => rx,
            Watch::Next(mut rx) => {
                if rx.changed().await.is_err() {
                    // Closed before the end: the job was stopped (the server is shutting
                    // down).
                    return Some((
                        Err(Status::unavailable(
                            "the key job was stopped (the server is shutting down); it resumes from its last page when the server starts again",
                        )),
                        Watch::Done,
                    ));
                }
                rx
            }
            Watch::Done => return None,
        };
        let p = rx.borrow_and_update().clone();
        if let Some(error) = p.error {
            return Some((
                Err(Status::aborted(format!(
                    "the key job stopped: {error}; it resumes from its last checkpoint when the same request is made again"
                ))),
                Watch::Done,
            ));
        }
        let next = if p.finished {
            Watch::Done
        } else {
            Watch::Next(rx)
        };
        Some((Ok(progress_to_proto(&p)), next))
    });
    Box::pin(stream)
}

impl<S: Store> KeysService<S> {
    async fn start_job(
        &self,
        action: &'static str,
        kind: JobKind,
        request: Request<String>,
        empty_ok: bool,
    ) -> Result<Response<ProgressStream>, Status> {
        let (log, mut ev, caller) = self.auth.begin(action, &request);
        let caller = match caller {
            Ok(c) => c,
            Err(e) => return finish(self.jobs.vault(), log, ev, Err(e)).await,
        };
        let category = request.into_inner();
        let result = async {
            // Named in the event even when the right is missing (as a rotation's are).
            let scope = parse_category(&category, empty_ok);
            if let Ok(scope) = scope {
                ev.draft.field_names = scope_names(scope);
            }
            require(
                &caller,
                match kind {
                    JobKind::Rewrap => KeyRight::Rewrap,
                    JobKind::Rekey => KeyRight::Rekey,
                },
            )?;
            let scope = scope?;
            // The event goes with the job's start (fail closed: no event, no job).
            let vault = self.jobs.vault();
            let events = ok_event(vault, &ev.draft);
            let rx = self
                .jobs
                .start(kind, scope, &caller.principal, events)
                .await
                .map_err(status::from_vault)?;
            ev.written = vault.auditing();
            Ok(progress_stream(rx))
        }
        .await;
        finish(self.jobs.vault(), log, ev, result).await
    }
}

#[tonic::async_trait]
impl<S: Store> proto::keys_server::Keys for KeysService<S> {
    #[instrument(skip_all)]
    async fn get_key_status(
        &self,
        request: Request<proto::GetKeyStatusRequest>,
    ) -> Result<Response<proto::KeyStatus>, Status> {
        let (log, ev, caller) = self.auth.begin("GetKeyStatus", &request);
        let result = async {
            require(&caller?, KeyRight::Status)?;
            key_status(&self.jobs).await.map_err(status::from_vault)
        }
        .await;
        finish(self.jobs.vault(), log, ev, result).await
    }

    #[instrument(skip_all)]
    async fn rotate_key(
        &self,
        request: Request<proto::RotateKeyRequest>,
    ) -> Result<Response<proto::KeyStatus>, Status> {
        let (log, mut ev, caller) = self.auth.begin("RotateKey", &request);
        let req = request.into_inner();
        let result = async {
            let caller = caller?;
            // Named in the event even when the right is missing (as a retirement's are).
            let scope = parse_category(&req.category, true);
            let categories: Vec<Category> = match &scope {
                Ok(Some(c)) => vec![*c],
                Ok(None) => Category::ALL.to_vec(),
                Err(_) => Vec::new(),
            };
            ev.draft.field_names = categories.iter().map(|c| c.as_str().into()).collect();
            require(&caller, KeyRight::Rotate)?;
            scope?;
            let vault = self.jobs.vault();
            // The event names each version made (`identity/v4`, after the categories): it is
            // drafted when the versions are chosen, in the rotation's batch.
            let draft = &ev.draft;
            let made = vault
                .keys()
                .rotate_audited(vault.store(), &categories, |made| {
                    let mut draft = draft.clone();
                    draft.field_names.extend(version_names(made));
                    ok_event(vault, &draft)
                })
                .await
                .map_err(key_op_status)?;
            ev.draft.field_names.extend(version_names(&made));
            ev.written = vault.auditing();
            for (category, version) in made {
                tracing::info!(category = category.as_str(), version, "KEK rotated");
            }
            status_after(&self.jobs, "the rotation is done").await
        }
        .await;
        finish(self.jobs.vault(), log, ev, result).await
    }

    type RewrapStream = ProgressStream;

    #[instrument(skip_all)]
    async fn rewrap(
        &self,
        request: Request<proto::RewrapRequest>,
    ) -> Result<Response<Self::RewrapStream>, Status> {
        let request = request.map(|r| r.category);
        self.start_job("Rewrap", JobKind::Rewrap, request, true)
            .await
    }

    type RekeyStream = ProgressStream;

    #[instrument(skip_all)]
    async fn rekey(
        &self,
        request: Request<proto::RekeyRequest>,
    ) -> Result<Response<Self::RekeyStream>, Status> {
        let request = request.map(|r| r.category);
        self.start_job("Rekey", JobKind::Rekey, request, false)
            .await
    }

    #[instrument(skip_all)]
    async fn retire_key_version(
        &self,
        request: Request<proto::RetireKeyVersionRequest>,
    ) -> Result<Response<proto::KeyStatus>, Status> {
        let (log, mut ev, caller) = self.auth.begin("RetireKeyVersion", &request);
        let req = request.into_inner();
        let result = async {
            let caller = caller?;
            // The event names the category and the version asked for (`identity/v4`), also
            // when the request is refused, for want of the right included; a category that
            // does not parse, or no version, is not named.
            if let Ok(Some(category)) = parse_category(&req.category, false) {
                ev.draft.field_names = vec![category.as_str().to_string()];
                if req.version != 0 {
                    ev.draft
                        .field_names
                        .push(crate::keys::version_name(category, req.version));
                }
            }
            require(&caller, KeyRight::Retire)?;
            let category = parse_category(&req.category, false)?
                .expect("a required category is present");
            if req.version == 0 {
                return Err(Status::invalid_argument("version: is required (1 or more)"));
            }
            let vault = self.jobs.vault();
            vault
                .keys()
                .retirable(category, req.version)
                .map_err(key_op_status)?;
            // A running job may have pages in flight that wrap data keys under this version
            // (prepared while it was still active) and commit after the count below.
            if self.jobs.busy().await.map_err(status::from_vault)? {
                return Err(Status::failed_precondition(
                    "version: a key job is running; retire once it has finished (its pages in flight may still use this version)",
                ));
            }
            // The version is fenced before its records are counted, so that no write (of
            // this instance or another) can give it a record between the count and the
            // destruction (see `KeyRing::retire`).
            let count = || async {
                rotation::version_counts(vault)
                    .await
                    .map(|counts| counts.get(&(category, req.version)).copied().unwrap_or(0))
                    .map_err(|e| e.to_string())
            };
            let events = ok_event(vault, &ev.draft);
            vault
                .keys()
                .retire(vault.store(), category, req.version, count, events)
                .await
                .map_err(key_op_status)?;
            ev.written = vault.auditing();
            tracing::info!(
                category = category.as_str(),
                version = req.version,
                "KEK retired (destroyed)"
            );
            status_after(&self.jobs, "the version is retired (destroyed)").await
        }
        .await;
        finish(self.jobs.vault(), log, ev, result).await
    }
}

fn key_op_status(e: crate::keys::KeyOpError) -> Status {
    use crate::keys::KeyOpError;
    match e {
        KeyOpError::NoSuchVersion(..) => Status::not_found(format!("version: {e}")),
        KeyOpError::Active(..) | KeyOpError::AlreadyRetired(..) => {
            Status::failed_precondition(format!("version: {e}"))
        }
        KeyOpError::InUse(..) => Status::failed_precondition(format!("version: {e}")),
        KeyOpError::Concurrent => Status::aborted(e.to_string()),
        KeyOpError::Count(detail) => {
            tracing::error!(error = %detail, "counting the records on a KEK version failed");
            Status::unavailable("counting the records on the version failed; nothing was changed")
        }
        KeyOpError::Key(inner) => {
            tracing::error!(error = %inner, "key operation failed");
            Status::unavailable("the key operation failed; nothing was changed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn at(done: u64, finished: bool) -> Progress {
        Progress {
            category: "identity".into(),
            done,
            total: 10,
            finished,
            error: None,
        }
    }

    #[tokio::test]
    async fn a_progress_stream_sends_the_state_at_once_and_follows_the_job_to_its_end() {
        let (tx, rx) = tokio::sync::watch::channel(at(0, false));
        let mut stream = progress_stream(rx);
        assert_eq!(stream.next().await.expect("first").expect("ok").done, 0);
        tx.send_replace(at(10, true));
        drop(tx);
        let last = stream.next().await.expect("last").expect("ok");
        assert!(last.finished && last.done == 10);
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_progress_stream_of_a_stopped_job_ends_with_unavailable() {
        let (tx, rx) = tokio::sync::watch::channel(at(3, false));
        let mut stream = progress_stream(rx);
        assert_eq!(stream.next().await.expect("state").expect("ok").done, 3);
        // The job is stopped (its task aborted: the sender goes) before it finishes.
        drop(tx);
        let end = stream.next().await.expect("end").expect_err("stopped");
        assert_eq!(end.code(), tonic::Code::Unavailable);
        assert!(end.message().contains("resumes"), "{}", end.message());
        assert!(stream.next().await.is_none(), "and nothing after it");
    }
}

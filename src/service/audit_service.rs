//! The `kluis.v1.Audit` service: querying and verifying the audit trail. Its own calls are
//! audited too.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::{event_record_id, finish, Authenticator};
use crate::audit::{self, Filter};
use crate::policy::AuditRight;
use crate::proto;
use crate::store::Store;
use crate::vault::Vault;

/// Default page size of `QueryEvents`.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest page of `QueryEvents`; larger requests are reduced to it.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// The `kluis.v1.Audit` service.
pub struct AuditService<S> {
    vault: Arc<Vault<S>>,
    auth: Authenticator,
    public_key: [u8; 32],
    anchor_path: std::path::PathBuf,
    store_id: [u8; 16],
    max_uncovered: u64,
    checkpoints: Arc<audit::CheckpointHealth>,
    /// The budget large pages are held against until they are sent.
    answers: Option<super::answer::AnswerBudget>,
}

impl<S: Store> AuditService<S> {
    /// A service over `vault`'s store, verifying checkpoints with `public_key`, the anchor
    /// file at `anchor_path` (of store `store_id`, when present) like a checkpoint, and
    /// allowing at most `max_uncovered` events after the newest checkpoint.
    pub fn new(
        vault: Arc<Vault<S>>,
        auth: Authenticator,
        public_key: [u8; 32],
        anchor_path: std::path::PathBuf,
        store_id: [u8; 16],
        max_uncovered: u64,
    ) -> Self {
        Self {
            vault,
            auth,
            public_key,
            anchor_path,
            store_id,
            max_uncovered,
            checkpoints: Arc::default(),
            answers: None,
        }
    }

    /// Holds pages of `QueryEvents` of 64 KiB or more against `answers` until they are sent.
    pub fn with_answer_budget(mut self, answers: super::answer::AnswerBudget) -> Self {
        self.answers = Some(answers);
        self
    }

    /// Reports the checkpointer's refusals (`health`) through `VerifyChain`.
    pub fn with_checkpoint_health(mut self, health: Arc<audit::CheckpointHealth>) -> Self {
        self.checkpoints = health;
        self
    }
}

fn to_ms(field: &str, ts: Option<prost_types::Timestamp>) -> Result<Option<i64>, Status> {
    let Some(ts) = ts else { return Ok(None) };
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(Status::invalid_argument(format!(
            "{field}: nanos must be in 0..999999999"
        )));
    }
    // The protobuf Timestamp range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
    const SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;
    if !SECONDS.contains(&ts.seconds) {
        return Err(Status::invalid_argument(format!(
            "{field}: seconds must be in {}..={} (years 0001 to 9999, the protobuf Timestamp range)",
            SECONDS.start(),
            SECONDS.end()
        )));
    }
    ts.seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(ts.nanos / 1_000_000)))
        .map(Some)
        .ok_or_else(|| Status::invalid_argument(format!("{field}: out of range")))
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// The proto form of a stored event.
pub fn event_to_proto(e: audit::Event) -> proto::AuditEvent {
    proto::AuditEvent {
        seq: e.seq,
        time: Some(timestamp(e.time_ms)),
        principal: e.draft.principal,
        role: e.draft.role,
        purpose: e.draft.purpose,
        action: e.draft.action,
        record_id: e.draft.record_id,
        field_names: e.draft.field_names,
        outcome: e.draft.outcome,
        hash: e.hash.to_vec(),
        masked_field_names: e.draft.masked_field_names,
    }
}

/// The longest `principal` filter: a principal is at most `cli:` with a 64-character account
/// and ` (SUDO_USER=…)` with another (`cli::keys::cli_principal`); policy names are at most 64.
pub const MAX_PRINCIPAL_FILTER: usize = 160;

/// Whether `name` has the shape of a principal (1 to [`MAX_PRINCIPAL_FILTER`] printable ASCII
/// characters): no principal has another (policy names, `system:…`, `cli:<account> …`).
pub fn principal_shaped(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_PRINCIPAL_FILTER
        && name.bytes().all(|b| (0x20..0x7f).contains(&b))
}

#[tonic::async_trait]
impl<S: Store> proto::audit_server::Audit for AuditService<S> {
    #[instrument(skip_all)]
    async fn query_events(
        &self,
        request: Request<proto::QueryEventsRequest>,
    ) -> Result<Response<proto::QueryEventsResponse>, Status> {
        let (mut log, mut ev, caller) = self.auth.begin("QueryEvents", &request);
        let caller = match caller {
            Ok(c) => c,
            Err(e) => return finish(&self.vault, log, ev, Err(e)).await,
        };
        let peer = request.remote_addr();
        let req = request.into_inner();
        log.record(&req.record_id);
        ev.draft.record_id = event_record_id(&req.record_id);
        let mut hold = None;
        let result = async {
            let rights = &caller.role.audit;
            if !rights.contains(&AuditRight::Query) {
                if !rights.contains(&AuditRight::QueryByRecord) {
                    return Err(Status::permission_denied(format!(
                        "role `{}` may not query the audit trail",
                        caller.role.name
                    )));
                }
                if req.record_id.is_empty() {
                    return Err(Status::permission_denied(format!(
                        "role `{}` may query the audit trail only by record_id: set record_id",
                        caller.role.name
                    )));
                }
            }
            if !req.record_id.is_empty() && uuid::Uuid::parse_str(&req.record_id).is_err() {
                return Err(Status::invalid_argument(
                    "record_id: not a record id (a UUID such as 3f2c…-…)",
                ));
            }
            // No principal has another shape (policy names, `system:…`, `cli:<account> …`): a
            // filter that cannot match is refused rather than answered with an empty page.
            if !req.principal.is_empty() && !principal_shaped(&req.principal) {
                return Err(Status::invalid_argument(format!(
                    "principal: a principal is 1 to {MAX_PRINCIPAL_FILTER} printable ASCII characters"
                )));
            }
            let since_ms = to_ms("since", req.since)?;
            let until_ms = to_ms("until", req.until)?;
            if let (Some(s), Some(u)) = (since_ms, until_ms) {
                if u <= s {
                    return Err(Status::invalid_argument("until: must be later than since"));
                }
            }
            let after = if req.page_token.is_empty() {
                0
            } else {
                self.vault
                    .keys()
                    .page_position("events", &req.page_token)
                    .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| {
                        Status::invalid_argument(
                            "page_token: not a token returned by QueryEvents (pass it back unchanged)",
                        )
                    })?
            };
            let size = match req.page_size {
                0 => DEFAULT_PAGE_SIZE,
                n => n.min(MAX_PAGE_SIZE),
            } as usize;
            let filter = Filter {
                record_id: (!req.record_id.is_empty()).then(|| event_record_id(&req.record_id)),
                principal: (!req.principal.is_empty()).then_some(req.principal),
                since_ms,
                until_ms,
            };
            let page = audit::query(self.vault.store(), &filter, after, size)
                .await
                .map_err(|e| super::status::from_vault(e.into()))?;
            if let Some(damage) = page.damage {
                tracing::error!(
                    first_seq = damage.first_seq,
                    events = damage.events,
                    "audit query: events of the trail could not be read in order (damaged or tampered with): the answer says so; run VerifyChain"
                );
            }
            let answer = proto::QueryEventsResponse {
                first_damaged_seq: page.damage.map_or(0, |d| d.first_seq),
                damaged_events: page.damage.map_or(0, |d| d.events),
                events: page.events.into_iter().map(event_to_proto).collect(),
                next_page_token: page
                    .next_after
                    .map(|after| self.vault.keys().page_token("events", &after.to_be_bytes()))
                    .unwrap_or_default(),
            };
            if let Some(answers) = &self.answers {
                let size = prost::Message::encoded_len(&answer);
                hold = answers.hold(size, &caller.principal, peer, "page_size")?;
            }
            Ok(answer)
        }
        .await;
        super::held(finish(&self.vault, log, ev, result).await, hold)
    }

    #[instrument(skip_all)]
    async fn verify_chain(
        &self,
        request: Request<proto::VerifyChainRequest>,
    ) -> Result<Response<proto::VerifyChainResponse>, Status> {
        let (log, ev, caller) = self.auth.begin("VerifyChain", &request);
        let caller = match caller {
            Ok(c) => c,
            Err(e) => return finish(&self.vault, log, ev, Err(e)).await,
        };
        let result = async {
            if !caller.role.audit.contains(&AuditRight::Verify) {
                return Err(Status::permission_denied(format!(
                    "role `{}` may not verify the audit trail",
                    caller.role.name
                )));
            }
            // Read afresh: the checkpointer replaces it as it signs.
            let anchor =
                crate::anchor::load(&self.anchor_path, &self.store_id, &self.public_key)
                    .map_err(|e| {
                        tracing::error!(error = %e, "the audit anchor file is unusable");
                        Status::failed_precondition(e.to_string())
                    })?;
            let v = audit::verify(
                self.vault.store(),
                &self.public_key,
                anchor.as_ref(),
                self.max_uncovered,
                audit::VerifyMode::Live,
            )
                .await
                .map_err(|e| super::status::from_vault(e.into()))?;
            let mut v = v;
            // The chain holds, but this server has stopped signing checkpoints: what follows
            // the newest one is not vouched for.
            if let (true, Some(why)) = (v.ok, self.checkpoints.refusal()) {
                v.ok = false;
                v.first_bad_seq = v.last_checkpoint + 1;
                v.reason = format!(
                    "events after the checkpoint of event {} are not signed: the server refuses or fails to sign checkpoints ({why})",
                    v.last_checkpoint
                );
            }
            // Nor are they while the anchor file cannot be written: past the anchored
            // checkpoint, someone who can edit the store could rewrite them unseen.
            if let (true, Some(why)) = (v.ok, self.checkpoints.anchor_failure()) {
                let anchored = anchor.as_ref().map_or(0, |cp| cp.seq);
                v.ok = false;
                v.first_bad_seq = anchored + 1;
                v.reason = format!(
                    "events after the anchored checkpoint of event {anchored} are not anchored outside the store: writing the audit anchor fails ({why})"
                );
            }
            if !v.ok {
                tracing::error!(first_bad_seq = v.first_bad_seq, reason = %v.reason, "audit chain verification failed");
            }
            Ok(proto::VerifyChainResponse {
                ok: v.ok,
                events_checked: v.events_checked,
                first_bad_seq: v.first_bad_seq,
                head_hash: v.head_hash.to_vec(),
            })
        }
        .await;
        finish(&self.vault, log, ev, result).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_outside_the_timestamp_range_are_refused_by_name() {
        let at = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
        assert_eq!(to_ms("since", None).expect("none"), None);
        assert_eq!(to_ms("since", at(1, 5_000_000)).expect("ok"), Some(1005));
        assert!(to_ms("since", at(-62_135_596_800, 0)).is_ok());
        assert!(to_ms("until", at(253_402_300_799, 999_999_999)).is_ok());
        for (seconds, nanos, needle) in [
            (1_000_000_000_000_000, 0, "until: seconds must be in"),
            (-1_000_000_000_000_000, 0, "until: seconds must be in"),
            (253_402_300_800, 0, "until: seconds must be in"),
            (0, -1, "until: nanos must be in"),
        ] {
            let e = to_ms("until", at(seconds, nanos)).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(needle), "{}", e.message());
        }
    }
}

//! The retention sweeper: erases each category of each record once its maximum retention
//! period ends ([`crate::retention`]), honouring legal hold and restriction, audited as
//! [`SWEEPER_PRINCIPAL`]; and the plan of what it would erase and when, changing nothing.
//!
//! A sweep walks every record header (MAC-checked). Each record with an expired category is
//! one atomic batch: the erased categories' data keys, chunks and blind-index entries go (the
//! record itself when nothing is left), with an `EraseRecord` event naming the erased fields,
//! conditional on the header being unchanged since it was read (a concurrent change is swept
//! at the next run).

use chrono::NaiveDate;
use uuid::Uuid;

use crate::audit;
use crate::error::VaultError;
use crate::record::RecordBody;
use crate::retention;
use crate::store::{Keyspace, Store, StoreError};
use crate::vault::Vault;

/// Principal of the sweeper's audit events.
pub const SWEEPER_PRINCIPAL: &str = "system:retention";
/// Records read per page.
const PAGE: usize = 1024;

/// One category's fate, in a plan.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Planned {
    /// The record.
    pub record_id: String,
    /// Its lifecycle stage.
    pub stage: String,
    /// The category.
    pub category: String,
    /// When the sweeper erases it (ISO date).
    pub erase_on: String,
    /// Whether that date has come (as of the plan's date).
    pub due: bool,
    /// Whether a legal hold stops it.
    pub legal_hold: bool,
    /// Whether a restriction (GDPR Art. 18: only stored) stops it.
    pub restricted: bool,
    /// The legal basis of the period.
    pub basis: String,
}

/// Calls `f` with every record's id, raw header and opened body, in id order. A record whose
/// key or header is damaged is left out (and logged) rather than stopping the walk: one bad
/// record must not keep every other record past its retention period. Returns the keys of
/// those left out (hex).
async fn each<S: Store>(
    vault: &Vault<S>,
    mut f: impl FnMut(Uuid, Vec<u8>, RecordBody),
) -> Result<Vec<String>, VaultError> {
    let mut damaged = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = vault
            .store()
            .scan(Keyspace::Records, b"", after.as_deref(), PAGE)
            .await?;
        let Some((last, _)) = page.last() else {
            return Ok(damaged);
        };
        after = Some(last.clone());
        for (key, raw) in page {
            let (kv, ik) = vault.keys().integrity_key();
            let opened = Uuid::from_slice(&key)
                .ok()
                .and_then(|id| Some((id, RecordBody::open(&key, &raw, kv, ik).ok()?)));
            match opened {
                Some((id, body)) => f(id, raw, body),
                None => {
                    let record = Uuid::from_slice(&key)
                        .map_or_else(|_| hex::encode(&key), |id| id.to_string());
                    tracing::error!(record_id = %record, "retention: the record's header is damaged (DATA_LOSS); left out of this walk");
                    damaged.push(record);
                }
            }
        }
    }
}

/// Every category that has a maximum-period date, with that date, as of `at`; sorted by date.
/// Also returns the records left out because their header is damaged (DATA_LOSS; logged by
/// the walk): their ids, or their keys in hex when a key is not a record id.
pub async fn plan<S: Store>(
    vault: &Vault<S>,
    at: NaiveDate,
) -> Result<(Vec<Planned>, Vec<String>), VaultError> {
    let mut out = Vec::new();
    let damaged = each(vault, |id, _, body| {
        for d in retention::deadlines(vault.retention(), &body) {
            if let Some(on) = d.erase_on {
                out.push(Planned {
                    record_id: id.to_string(),
                    stage: body.lifecycle.clone(),
                    category: d.category.as_str().to_string(),
                    erase_on: on.format("%Y-%m-%d").to_string(),
                    due: on <= at,
                    legal_hold: body.legal_hold,
                    restricted: body.restricted,
                    basis: d.basis.clone(),
                });
            }
        }
    })
    .await?;
    out.sort_by(|a, b| {
        (&a.erase_on, &a.record_id, &a.category).cmp(&(&b.erase_on, &b.record_id, &b.category))
    });
    Ok((out, damaged))
}

/// What one sweep erased: per record, the categories.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// (record, categories erased, whether the whole record went).
    pub erased: Vec<(Uuid, Vec<String>, bool)>,
    /// Records with an expired category left alone because of a legal hold or a
    /// restriction (Art. 18: a restricted record is only stored, and erasing is processing;
    /// the data subject's own erasure request still erases it).
    pub held: Vec<Uuid>,
    /// Records whose header is damaged (DATA_LOSS), left out; the others are swept.
    pub damaged: Vec<String>,
}

/// Erases every category whose maximum period has ended by `today`.
pub async fn sweep<S: Store>(vault: &Vault<S>, today: NaiveDate) -> Result<Swept, VaultError> {
    let mut due = Vec::new();
    let mut swept = Swept::default();
    let mut held = Vec::new();
    let damaged = each(vault, |id, raw, body| {
        let expired = retention::deadlines(vault.retention(), &body)
            .iter()
            .any(|d| d.expired_on(today));
        if expired && (body.legal_hold || body.restricted) {
            held.push(id);
        } else if expired {
            due.push((id, raw, body));
        }
    })
    .await?;
    swept.held = held;
    swept.damaged = damaged;
    for (id, raw, mut body) in due {
        let idb = id.as_bytes().to_vec();
        let shredded = vault.shred(&idb, &raw, &mut body, |d| {
            (!d.expired_on(today)).then(String::new)
        });
        let (mut batch, erasure, names) = match shredded {
            Ok(s) => s,
            // This record alone: the others are still swept.
            Err(e) => {
                tracing::error!(record_id = %id, error = %e, "retention: erasing the record failed; left for the next sweep");
                swept.damaged.push(id.to_string());
                continue;
            }
        };
        if vault.auditing() {
            let mut draft = audit::Draft::new("EraseRecord", SWEEPER_PRINCIPAL, "system");
            draft.record_id = id.to_string();
            draft.field_names = names;
            draft.outcome = audit::Outcome::Ok.as_str().into();
            batch.append_event(draft.encode());
        }
        match vault.store().commit(batch).await {
            Ok(()) => {
                let gone = erasure.retained.is_empty();
                tracing::info!(record_id = %id, categories = ?erasure.erased, record_gone = gone, "retention: maximum period ended, erased");
                swept.erased.push((id, erasure.erased, gone));
            }
            // Changed since it was read: the next sweep sees the new state.
            Err(StoreError::Conflict) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(swept)
}

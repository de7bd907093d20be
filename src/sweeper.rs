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
use crate::store::{Batch, Expect, Keyspace, Store, StoreError};
use crate::vault::Vault;

/// Principal of the sweeper's audit events.
pub const SWEEPER_PRINCIPAL: &str = "system:retention";
/// Meta key holding the day the last sweep ran as of (`YYYY-MM-DD`): in the store, so that
/// every instance sharing it, and every restart, sees the same.
pub const META_SWEEP_DAY: &[u8] = b"retention/sweep-day";
/// Audit action of an operator's confirmation of the date (`kluis retention resume`).
pub const RESUME_ACTION: &str = "ResumeRetentionSweeps";
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
    /// Whether a restriction (GDPR Art. 18: only stored) stops it (none does once the data
    /// subject asked for erasure: [`RecordBody::restriction_holds`]).
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
                    restricted: body.restriction_holds(),
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

/// Whether an automatic sweep runs, and as of which day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepDay {
    /// Sweep as of this day.
    Run(NaiveDate),
    /// The clock says `today`, more than the allowed gap after `last`, the day of the last
    /// sweep: erase nothing until an operator confirms the date.
    Paused {
        /// The day of the last sweep.
        last: NaiveDate,
        /// The clock's date.
        today: NaiveDate,
    },
}

/// The day of the last sweep, as the store holds it (none before the first).
pub async fn last_sweep_day<S: Store>(store: &S) -> Result<Option<NaiveDate>, VaultError> {
    let raw = store.get(Keyspace::Meta, META_SWEEP_DAY).await?;
    raw.as_deref().map(parse_sweep_day).transpose()
}

fn parse_sweep_day(raw: &[u8]) -> Result<NaiveDate, VaultError> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|text| NaiveDate::parse_from_str(text, "%Y-%m-%d").ok())
        .ok_or_else(|| {
            VaultError::Internal("the stored day of the last retention sweep is not a date".into())
        })
}

/// Whether the automatic sweep runs as of `today` (the clock's date): it does unless the
/// clock moved more than `max_gap_days` past the day of the last sweep. Erasure cannot be
/// undone: a clock set wrongly ahead (by years, say) would have the sweeper erase at once
/// every category due by then. A clock moved back sweeps as of its own date (that erases
/// less).
pub async fn sweep_day<S: Store>(
    store: &S,
    today: NaiveDate,
    max_gap_days: u32,
) -> Result<SweepDay, VaultError> {
    Ok(match last_sweep_day(store).await? {
        Some(last)
            if last
                .checked_add_days(chrono::Days::new(u64::from(max_gap_days)))
                .is_some_and(|limit| today > limit) =>
        {
            SweepDay::Paused { last, today }
        }
        _ => SweepDay::Run(today),
    })
}

/// Records `day` as the day of the last sweep, unless a later one is recorded already (by
/// another instance, or before the clock moved back).
pub async fn record_sweep_day<S: Store>(store: &S, day: NaiveDate) -> Result<(), VaultError> {
    write_sweep_day(store, day, None).await.map(|_| ())
}

/// An operator's confirmation of `day` (`kluis retention resume`): recorded as it is, also
/// earlier than the recorded day (after a clock that ran ahead was set right), with the audit
/// event `event(previous day)` in the same batch. Returns the day recorded before.
pub async fn confirm_sweep_day<S: Store>(
    store: &S,
    day: NaiveDate,
    event: impl Fn(Option<NaiveDate>) -> Vec<u8> + Send + Sync,
) -> Result<Option<NaiveDate>, VaultError> {
    write_sweep_day(store, day, Some(&event)).await
}

async fn write_sweep_day<S: Store>(
    store: &S,
    day: NaiveDate,
    event: Option<&(dyn Fn(Option<NaiveDate>) -> Vec<u8> + Send + Sync)>,
) -> Result<Option<NaiveDate>, VaultError> {
    loop {
        let stored = store.get(Keyspace::Meta, META_SWEEP_DAY).await?;
        let last = stored.as_deref().map(parse_sweep_day).transpose()?;
        if last.is_some_and(|last| last >= day) && event.is_none() {
            return Ok(last);
        }
        let mut batch = Batch::default();
        batch.expect(
            Keyspace::Meta,
            META_SWEEP_DAY.to_vec(),
            stored.map_or(Expect::Absent, Expect::Value),
        );
        // Automatic: the later day; confirmed: the day given.
        let recorded = match event {
            Some(_) => day,
            None => last.map_or(day, |last| last.max(day)),
        };
        batch.put(
            Keyspace::Meta,
            META_SWEEP_DAY.to_vec(),
            recorded.format("%Y-%m-%d").to_string().into_bytes(),
        );
        if let Some(event) = event {
            batch.append_event(event(last));
        }
        match store.commit(batch).await {
            Ok(()) => return Ok(last),
            // Another instance recorded its sweep meanwhile: read it again.
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
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
        if expired && (body.legal_hold || body.restriction_holds()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("date")
    }

    #[tokio::test]
    async fn the_sweep_pauses_when_the_clock_moves_past_the_gap_and_the_day_never_goes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("store");
        // The first sweep ever runs as of the clock's date.
        assert_eq!(
            sweep_day(&store, d("2026-11-26"), 7).await.expect("day"),
            SweepDay::Run(d("2026-11-26"))
        );
        record_sweep_day(&store, d("2026-11-26"))
            .await
            .expect("recorded");
        for (today, gap, runs) in [
            ("2026-12-03", 7, true),
            ("2026-12-04", 7, false),
            ("2036-11-26", 7, false),
            ("2036-11-26", u32::MAX, true),
            // A clock moved back sweeps as of its own date (that erases less).
            ("2020-01-01", 7, true),
        ] {
            let got = sweep_day(&store, d(today), gap).await.expect("day");
            let want = if runs {
                SweepDay::Run(d(today))
            } else {
                SweepDay::Paused {
                    last: d("2026-11-26"),
                    today: d(today),
                }
            };
            assert_eq!(got, want, "{today} with a gap of {gap}");
        }
        // The recorded day only moves forward.
        record_sweep_day(&store, d("2020-01-01"))
            .await
            .expect("recorded");
        assert_eq!(
            last_sweep_day(&store).await.expect("day"),
            Some(d("2026-11-26"))
        );
        record_sweep_day(&store, d("2026-11-30"))
            .await
            .expect("recorded");
        assert_eq!(
            last_sweep_day(&store).await.expect("day"),
            Some(d("2026-11-30"))
        );
    }
}

//! The core: records in, records out. Checks the caller's purpose and rights, parses values
//! at the edge, seals and opens fields, keeps blind indexes consistent, and commits every
//! change as one atomic, durable batch. The main test boundary below the gRPC layer.
//!
//! Role-scoped decryption is cryptographic: a read unwraps only the DEKs of the categories it
//! returns, and opens only the fields it returns.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use uuid::Uuid;
use zeroize::{Zeroize, Zeroizing};

use crate::audit;
use crate::crypto::{self, SealingKey, SecretKey};
use crate::error::{printable_name, VaultError};
use crate::keys::KeyRing;
use crate::policy::{Caller, LegalBasis, Policy, RecordRight};
use crate::record::{self, FieldEntry, RecordBody, StoredDek, RECORD_FORMAT};
use crate::retention::{self, Duty, RetentionRules};
use crate::schema::{Category, FieldDef, Parsed, RawValue, Schema, ValueError};
use crate::store::{Batch, Expect, Keyspace, Store, StoreError};
use crate::wipe::WipingVec;

/// Default and maximum page sizes of [`Vault::list`].
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest page [`Vault::list`] returns; larger requests are reduced to it.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Most record ids [`Vault::find`] returns.
pub const MAX_FIND_RESULTS: usize = 1000;
/// Index entries one FindRecords examines at most (entries left out — restricted records,
/// records the purpose may not use, stale or damaged ones — do not shorten the answer below
/// [`MAX_FIND_RESULTS`] until this many were examined).
pub const MAX_FIND_EXAMINED: usize = 10 * MAX_FIND_RESULTS;
/// Lifecycle of a newly created record.
pub const LIFECYCLE_APPLICANT: &str = "applicant";
const MAX_RETRIES: usize = 32;

/// A field value going in or coming out. Its bytes are zeroized on drop and never printed.
pub enum Value {
    /// Text (typed values are normalised text).
    Text(Zeroizing<String>),
    /// Bytes with a content type.
    Blob {
        /// The bytes.
        bytes: Zeroizing<Vec<u8>>,
        /// The content type.
        content_type: String,
    },
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Text(_) => f.write_str("Text(...)"),
            Value::Blob {
                bytes,
                content_type,
            } => {
                write!(f, "Blob({} bytes, {content_type})", bytes.len())
            }
        }
    }
}

/// A record's clear metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    /// Record id.
    pub id: Uuid,
    /// Revision.
    pub revision: u64,
    /// Created, Unix milliseconds.
    pub created_ms: i64,
    /// Last updated, Unix milliseconds.
    pub updated_ms: i64,
    /// Lifecycle state.
    pub lifecycle: String,
    /// ISO date the lifecycle stage began (empty: the creation date).
    pub lifecycle_date: String,
    /// Restricted (Art. 18).
    pub restricted: bool,
    /// Under legal hold.
    pub legal_hold: bool,
    /// Purpose → (granted, changed ms).
    pub consents: Vec<(String, bool, i64)>,
    /// Categories holding data.
    pub categories: Vec<String>,
}

/// A change of a record's processing state ([`Vault::set_state`]). A restriction's or legal
/// hold's reason may hold personal data (it is sealed at rest): it is zeroized on drop and
/// `Debug` does not show it.
#[derive(Clone)]
pub enum StateChange {
    /// New lifecycle stage and the ISO date it began.
    Lifecycle {
        /// `applicant`, `procedure_closed`, `employed` or `ended`.
        stage: String,
        /// ISO date.
        date: String,
    },
    /// Consent given or withdrawn (objection, for a legitimate-interest purpose).
    Consent {
        /// The purpose.
        purpose: String,
        /// Given?
        granted: bool,
    },
    /// Restriction set or lifted.
    Restriction {
        /// Restricted?
        restricted: bool,
        /// Why.
        reason: Zeroizing<String>,
    },
    /// Legal hold set or lifted.
    LegalHold {
        /// Held?
        hold: bool,
        /// Why.
        reason: Zeroizing<String>,
    },
}

impl std::fmt::Debug for StateChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = format_args!("<redacted>");
        match self {
            StateChange::Lifecycle { stage, date } => f
                .debug_struct("Lifecycle")
                .field("stage", stage)
                .field("date", date)
                .finish(),
            StateChange::Consent { purpose, granted } => f
                .debug_struct("Consent")
                .field("purpose", purpose)
                .field("granted", granted)
                .finish(),
            StateChange::Restriction { restricted, .. } => f
                .debug_struct("Restriction")
                .field("restricted", restricted)
                .field("reason", &redacted)
                .finish(),
            StateChange::LegalHold { hold, .. } => f
                .debug_struct("LegalHold")
                .field("hold", hold)
                .field("reason", &redacted)
                .finish(),
        }
    }
}

/// What [`Vault::update`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Updated {
    /// The new revision.
    pub revision: u64,
    /// Principals (other than the caller) who read a changed field since it was last written
    /// before this change: the recipients to inform of a rectification.
    pub notify: Vec<String>,
}

/// What [`Vault::erase`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Erasure {
    /// Categories whose data keys and ciphertext were deleted.
    pub erased: Vec<String>,
    /// Categories kept under a legal duty: (category, until ISO date or "", basis).
    pub retained: Vec<(String, String, String)>,
}

/// What a record says about a blind-index entry naming it ([`Vault::check_hit`]).
enum Hit {
    /// Its header holds the entry's tag.
    Holds(Box<RecordBody>),
    /// The entry is gone: the record changed after the index was read.
    Gone,
    /// The entry is there, and the header does not hold its tag.
    OutOfPlace,
}

pub use crate::policy::LIFECYCLE_STAGES;

/// After the data subject's erasure request the record keeps only what legal duties require:
/// no procedure reopens and no employment begins on it (review 16: a reopened procedure, or
/// a new hire dated ahead, kept the retained BSN with no clock), and the start of an
/// employment moves no later than today or where it was (review 17: a hire that had not begun,
/// moved on again and again, kept it with no clock too).
fn check_stage_after_erasure_request(
    id: Uuid,
    body: &RecordBody,
    stage: &str,
    date: chrono::NaiveDate,
    today: chrono::NaiveDate,
) -> Result<(), VaultError> {
    if body.erasure_requested_ms == 0 {
        return Ok(());
    }
    let reopens = stage == "applicant" || (stage == "employed" && body.lifecycle != "employed");
    if reopens {
        return Err(VaultError::FailedPrecondition(format!(
            "stage: record {id}'s data subject asked for erasure on {}: what stays is kept for a legal duty only, so the record cannot become `{stage}` again; a new application or employment is a new record (CreateRecord)",
            iso(body.erasure_requested_ms)
        )));
    }
    if stage == "employed" {
        let latest = body
            .lifecycle_day()
            .map_or(today, |begins| begins.max(today));
        if date > latest {
            return Err(VaultError::FailedPrecondition(format!(
                "date: record {id}'s data subject asked for erasure on {}: the employment's start may move no later than {latest} (today, or where it is), as a start ahead keeps what the duty keeps with no clock",
                iso(body.erasure_requested_ms)
            )));
        }
    }
    Ok(())
}

/// Refuses a lifecycle change that would drop a legal duty to keep: a record that is or was
/// employed keeps identity and financial data for years after the employment ends, so it
/// never goes back to an applicant stage (whose data may go within weeks); and an employment
/// cannot end before it began. Refuses, too, what would keep an applicant's data longer than
/// their closed procedure allows (`rules`: its periods, and the consent that keeps applicant
/// data after the procedure, [`retention::RetentionRules::applicant_consent_purpose`]).
fn check_lifecycle_step(
    id: Uuid,
    body: &RecordBody,
    stage: &str,
    date: chrono::NaiveDate,
    rules: &retention::RetentionRules,
    today: chrono::NaiveDate,
) -> Result<(), VaultError> {
    let consent_purpose = rules.applicant_consent_purpose.as_str();
    // A hire whose employment has not begun, after no earlier one, has no legal duty yet: if
    // it falls through, the procedure is closed again (review 15: ending it made the
    // applicant a former employee, kept for years).
    let not_begun = body.lifecycle == "employed"
        && body.lifecycle_day().is_some_and(|begins| begins > today)
        && body.latest_end().is_none();
    if not_begun && stage == "procedure_closed" {
        // A hire that followed a closed procedure resumed it, and the close of the hire that
        // fell through re-closes it: a new clock, once, as a reopening gives (it counts as
        // the reopening). After a reopening, that close keeps the earlier close date or an
        // earlier one (review 30: hired ahead, fallen through and closed "today" again and
        // again, an applicant's 28 days were renewed with no end).
        if let Some(closed) = body.closed_procedure_day() {
            if body.reopened && date > closed {
                return Err(VaultError::FailedPrecondition(format!(
                    "date: record {id}'s procedure closed on {closed}, and a hire that followed the close resumes it: it was reopened or resumed once already, so the hire that fell through closes it on {closed} at the latest (a later close would restart its retention period); a new application is a new record (CreateRecord)"
                )));
            }
        }
        return Ok(());
    }
    let worked = matches!(body.lifecycle.as_str(), "employed" | "ended");
    if worked && matches!(stage, "applicant" | "procedure_closed") {
        return Err(VaultError::FailedPrecondition(format!(
            "stage: record {id} is `{}`: a record of someone who works or has worked here stays `employed` or `ended` (its identity and financial data are kept under a legal duty); it cannot become `{stage}`",
            body.lifecycle
        )));
    }
    // A reopened procedure stops the closed one's retention clock, and its re-closing starts
    // a new one. That corrects a mistaken close, or resumes the procedure, once; more often
    // would keep the applicant's data as long as anyone liked (a new application is a new
    // record). And not at all when the subject withdrew the consent that keeps their data
    // after the procedure: that would keep it against their withdrawal. (Other withdrawals
    // and objections stay in force in an open procedure: each is checked at every use.)
    if body.lifecycle == "procedure_closed" && stage == "applicant" {
        if body.reopened {
            return Err(VaultError::FailedPrecondition(format!(
                "stage: record {id}'s procedure was reopened once already: a closed procedure is reopened at most once (to correct its close, or to resume it), as each re-closing starts its retention period anew; a new application is a new record (CreateRecord)"
            )));
        }
        if body
            .consents
            .get(consent_purpose)
            .is_some_and(|c| !c.granted)
        {
            return Err(VaultError::FailedPrecondition(format!(
                "stage: record {id}'s procedure is closed and its subject withdrew consent for `{consent_purpose}` (keeping their data after the procedure): reopening it would keep the data against that; a new application is a new record (CreateRecord)"
            )));
        }
    }
    // Closing a closed procedure again with a later date would restart the applicant's
    // retention clock (28 days, or a year with consent) as often as anyone liked; an
    // earlier date (a correction) only shortens it.
    // Dates compare as days: a header may hold a date in a looser form (`record::stored_day`).
    let since = body.lifecycle_day();
    if body.lifecycle == "procedure_closed" && stage == "procedure_closed" {
        if let Some(closed) = since.filter(|closed| date > *closed) {
            return Err(VaultError::FailedPrecondition(format!(
                "date: record {id}'s procedure closed on {closed}: a later close date would restart its retention period; it may only move earlier"
            )));
        }
    }
    if stage == "ended" && !worked {
        return Err(VaultError::FailedPrecondition(format!(
            "stage: record {id} is `{}`: only an employment can end; set `employed` (with the date it began) first",
            body.lifecycle
        )));
    }
    // An employment dated ahead stops every clock until it begins. So it may not begin after
    // the data it finds would fall due under the clocks that run without it (the closed
    // procedure's, or the last employment's), counted without the withdrawable consent; nor
    // be moved there later (reviews 12 and 14: a start a year ahead, moved on again and
    // again, kept a closed applicant's data with no clock).
    if stage == "employed" && date > today {
        let held: BTreeSet<&str> = body.fields.values().map(|f| f.category.as_str()).collect();
        let mut without = body.clone();
        if without.lifecycle == "employed" {
            let (stage, since) = match (record::stored_day(&body.closed_on), body.latest_end()) {
                (_, Some(ended)) => ("ended", Some(ended)),
                (Some(closed), None) => ("procedure_closed", Some(closed)),
                (None, None) => ("applicant", None),
            };
            without.lifecycle = stage.into();
            without.lifecycle_date = since.map(|d| d.to_string()).unwrap_or_default();
        }
        if let Some(c) = without.consents.get_mut(consent_purpose) {
            c.granted = false;
        }
        let due = retention::deadlines(rules, &without)
            .into_iter()
            .filter(|d| held.contains(d.category.as_str()))
            .filter_map(|d| d.erase_on.map(|on| (on, d.category)))
            .min();
        // (Data due already: the new-clock rule below says so.)
        if let Some((due, category)) = due.filter(|(due, _)| date > *due && *due > today) {
            return Err(VaultError::FailedPrecondition(format!(
                "date: record {id}'s data of category {category} falls due on {due} ({}): an employment dated ahead stops its clock until it begins, so it may begin on {due} at the latest (counted without consent for `{consent_purpose}`, which can be withdrawn). Date the start on or before {due}, or reopen a closed procedure (stage `applicant`) first",
                if without.lifecycle == "ended" {
                    "counted from the last employment's end"
                } else {
                    "counted from the close of the procedure"
                }
            )));
        }
    }
    // An employment that has not begun does not end: a hire that fell through is dated to
    // begin today and ended today, so that no end dated ahead moves the legal duties' years
    // on without anyone having worked (review 14).
    if body.lifecycle == "employed" && stage == "ended" {
        if let Some(begins) = since.filter(|begins| *begins > today) {
            return Err(VaultError::FailedPrecondition(format!(
                "stage: record {id}'s employment begins on {begins}, after today: it cannot end before it began; if the hire fell through, close the procedure (stage `procedure_closed`, dated today)"
            )));
        }
    }
    if body.lifecycle == "employed" && stage == "ended" {
        if let Some(began) = since.filter(|began| date < *began) {
            return Err(VaultError::FailedPrecondition(format!(
                "date: record {id} is employed since {began}: the employment cannot end before it began"
            )));
        }
    }
    // Across stages too (ended → employed → ended): an end, and a rehire, are never dated
    // before the latest end already recorded.
    if let Some(ended) = body.latest_end() {
        if stage == "ended" && date < ended {
            return Err(VaultError::FailedPrecondition(format!(
                "date: record {id} ended on {ended}: the end date may only move later (the legal duties to keep its data count from it)"
            )));
        }
        // An end dated ahead is notice given while employed; an end already past is corrected
        // at most to today (review 15: moved a year ahead, it restarted every clock).
        if stage == "ended" && body.lifecycle == "ended" && date > today && date > ended {
            return Err(VaultError::FailedPrecondition(format!(
                "date: record {id} ended on {ended}: an end already recorded is corrected at most to today ({today}); an end dated ahead is set while the record is `employed`"
            )));
        }
        if stage == "employed" && date < ended {
            return Err(VaultError::FailedPrecondition(format!(
                "date: record {id} ended on {ended}: a new employment cannot begin before the last one ended (the legal duties to keep its data count from that end)"
            )));
        }
    }
    Ok(())
}

/// Refuses a lifecycle change that leaves data of a category the caller may not write less
/// time before the sweeper erases it than the shortest period the rules give any data once
/// its clock runs (`applicant_max_days`, 28 days by default; reviews 10–12). Lifecycle dates
/// start the clocks that erase every category: backdated (a close in 2000, an employment
/// ended in 1900, or dated just far enough back for the erasure to fall due tomorrow), they
/// had the sweeper erase, say, payroll's BSN at the recruiter's word, or the recruiter's
/// applicant data at payroll's. The period is taken without the consent that lengthens an
/// applicant's (a later withdrawal shortens it back; review 12). A role may still date what
/// is all its own data as it likes (a correction); closing today the procedure of a hire that
/// fell through passes (its BSN goes with the rest, 28 days on), and so does an end of
/// employment entered months late (the rest of the personnel file is kept two years from it).
/// `before` are the categories already due before the change.
fn check_lifecycle_reach(
    caller: &Caller,
    id: Uuid,
    body: &RecordBody,
    rules: &retention::RetentionRules,
    before: &BTreeMap<Category, chrono::NaiveDate>,
    today: chrono::NaiveDate,
) -> Result<(), VaultError> {
    let held: BTreeSet<&str> = body.fields.values().map(|f| f.category.as_str()).collect();
    let mut worst = body.clone();
    if let Some(c) = worst.consents.get_mut(&rules.applicant_consent_purpose) {
        c.granted = false;
    }
    let least = today + chrono::Days::new(u64::from(rules.applicant_max_days));
    let beyond: Vec<(Category, chrono::NaiveDate)> = retention::deadlines(rules, &worst)
        .into_iter()
        .filter(|d| held.contains(d.category.as_str()) && !before.contains_key(&d.category))
        .filter(|d| !caller.role.may_write(d.category))
        .filter_map(|d| {
            d.erase_on
                .filter(|on| *on < least)
                .map(|on| (d.category, on))
        })
        .collect();
    if beyond.is_empty() {
        return Ok(());
    }
    Err(VaultError::PermissionDenied(format!(
        "date: role `{}` may not date stage `{}` {} for record {id}: that leaves data the role may not write less than {} days before the sweeper erases it ({}; counted without consent for `{}`, which can be withdrawn). Date it later; if the early date is true, have a role that writes those categories clear them, or the privacy officer erase them (EraseRecord), first",
        caller.role.name,
        body.lifecycle,
        body.lifecycle_date,
        rules.applicant_max_days,
        beyond
            .iter()
            .map(|(c, on)| format!("category {c}, due on {on}"))
            .collect::<Vec<_>>()
            .join("; "),
        rules.applicant_consent_purpose
    )))
}

/// Earliest lifecycle date accepted.
const LIFECYCLE_EARLIEST: (i32, u32, u32) = (1900, 1, 1);
/// How far ahead an employment may be dated (a signed contract, a notice given).
const LIFECYCLE_AHEAD_DAYS: i64 = 366;

/// Bounds a lifecycle date: a procedure closes when it closes (not later than today: a date
/// ahead would keep applicant data past its maximum period); an employment may be dated up to
/// a year ahead; nothing before 1900.
fn check_lifecycle_date(
    stage: &str,
    day: chrono::NaiveDate,
    today: chrono::NaiveDate,
) -> Result<(), VaultError> {
    let (y, m, d) = LIFECYCLE_EARLIEST;
    if chrono::NaiveDate::from_ymd_opt(y, m, d).is_some_and(|earliest| day < earliest) {
        return Err(VaultError::invalid(
            "date",
            format!("must be {y}-01-01 or later"),
        ));
    }
    let latest = match stage {
        "applicant" | "procedure_closed" => today,
        _ => today + chrono::Days::new(LIFECYCLE_AHEAD_DAYS as u64),
    };
    if day > latest {
        return Err(VaultError::invalid(
            "date",
            if latest == today {
                format!("stage `{stage}` cannot be dated after today ({today})")
            } else {
                format!(
                    "stage `{stage}` can be dated at most {LIFECYCLE_AHEAD_DAYS} days ahead (until {latest})"
                )
            },
        ));
    }
    Ok(())
}
/// Longest reason for a restriction or legal hold.
pub const MAX_REASON_CHARS: usize = 500;
/// The purpose under which data-subject requests run (never blocked by restriction).
pub const PURPOSE_DSR: &str = "data_subject_request";

impl StateChange {
    fn right(&self) -> RecordRight {
        match self {
            StateChange::Lifecycle { .. } => RecordRight::SetLifecycle,
            StateChange::Consent { .. } => RecordRight::SetConsent,
            StateChange::Restriction { .. } => RecordRight::SetRestriction,
            StateChange::LegalHold { .. } => RecordRight::SetLegalHold,
        }
    }
}

/// What a read returns.
#[derive(Debug)]
pub struct ReadResult {
    /// Record id.
    pub id: Uuid,
    /// Revision read.
    pub revision: u64,
    /// The readable fields asked for (all readable ones when none were named).
    pub fields: Vec<(String, Value)>,
    /// Fields on the record the caller's role may not read.
    pub withheld: Vec<String>,
    /// Of `fields`, the names of those returned masked (the role sees them only masked, e.g.
    /// a BSN's last digits); in the order of `fields`.
    pub masked: Vec<String>,
}

/// Fields opened by [`Vault::read_fields`]: names and values, and which of them were masked.
struct Opened {
    fields: Vec<(String, Value)>,
    masked: Vec<String>,
}

/// What [`Vault::update`] changes.
#[derive(Debug, Default)]
pub struct Change {
    /// The revision the caller read; 0 means no check.
    pub expected_revision: u64,
    /// Fields to set.
    pub set: Vec<(String, Value)>,
    /// Fields to clear.
    pub clear: Vec<String>,
}

/// One page of [`Vault::list`].
#[derive(Debug)]
pub struct Page {
    /// The records' metadata.
    pub records: Vec<RecordMeta>,
    /// Token for the next page; `None` at the end.
    pub next_page_token: Option<String>,
}

/// The vault over a store.
pub struct Vault<S> {
    store: S,
    schema: Arc<Schema>,
    keys: Arc<KeyRing>,
    auditing: bool,
    policy: Arc<Policy>,
    retention: Arc<RetentionRules>,
    clock: Clock,
    /// Data keys are made (their `created_ms`) no earlier than this: a re-key raises it past
    /// its cutoff, so that a key made during or after the job is never taken for one made
    /// before it, whatever the clock does (`rotation::JobState::cutoff_ms`). This instance's
    /// copy of the store's [`META_DEK_FLOOR`]: every write that makes a data key expects the
    /// store to hold this value ([`Vault::expect_dek_floor`]), so a floor another instance's
    /// re-key raised meanwhile conflicts the write, which reads it and is retried (review 20:
    /// a floor in one process's memory let other instances make keys under the cutoff, and
    /// the job never finished while they took writes).
    dek_floor: std::sync::atomic::AtomicI64,
}

/// Meta key of the data-key floor ([`Vault::expect_dek_floor`]): milliseconds since the epoch,
/// i64 big-endian; absent means none.
pub const META_DEK_FLOOR: &[u8] = b"dek-floor";

/// What a batch expects of [`META_DEK_FLOOR`] when the floor is `floor`.
fn dek_floor_expect(floor: i64) -> Expect {
    if floor == 0 {
        Expect::Absent
    } else {
        Expect::Value(floor.to_be_bytes().to_vec())
    }
}

/// Today's date, as the vault sees it (UTC). Injectable so that tests can move time.
pub type Clock = Arc<dyn Fn() -> chrono::NaiveDate + Send + Sync>;

/// The real clock: today in UTC.
pub fn system_clock() -> Clock {
    Arc::new(|| chrono::Utc::now().date_naive())
}

impl<S: Store> Vault<S> {
    /// A vault over `store` with `schema`, using `keys`; it writes audit events.
    pub fn new(store: S, schema: Arc<Schema>, keys: Arc<KeyRing>) -> Self {
        Self {
            store,
            schema,
            keys,
            auditing: true,
            policy: Arc::new(Policy::default_policy()),
            retention: Arc::new(RetentionRules::default()),
            clock: system_clock(),
            dek_floor: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Reads the store's data-key floor into this instance's copy; returns it.
    pub async fn load_dek_floor(&self) -> Result<i64, VaultError> {
        let floor = match self.store.get(Keyspace::Meta, META_DEK_FLOOR).await? {
            None => 0,
            Some(raw) => i64::from_be_bytes(raw.as_slice().try_into().map_err(|_| {
                VaultError::Internal(format!(
                    "meta/{} is {} bytes, not 8",
                    String::from_utf8_lossy(META_DEK_FLOOR),
                    raw.len()
                ))
            })?),
        };
        self.dek_floor
            .fetch_max(floor, std::sync::atomic::Ordering::AcqRel);
        Ok(floor)
    }

    /// Adds to `batch` raising the store's data-key floor to at least `ms` (expecting the floor
    /// as read now); once it commits, [`Vault::note_dek_floor`] with the returned value.
    pub(crate) async fn raise_dek_floor_in(
        &self,
        batch: &mut Batch,
        ms: i64,
    ) -> Result<i64, VaultError> {
        let stored = self.load_dek_floor().await?;
        batch.expect(
            Keyspace::Meta,
            META_DEK_FLOOR.to_vec(),
            dek_floor_expect(stored),
        );
        let raised = stored.max(ms);
        if raised != stored {
            batch.put(
                Keyspace::Meta,
                META_DEK_FLOOR.to_vec(),
                raised.to_be_bytes().to_vec(),
            );
        }
        Ok(raised)
    }

    /// Takes `floor`, committed to the store, as this instance's copy.
    pub(crate) fn note_dek_floor(&self, floor: i64) {
        self.dek_floor
            .fetch_max(floor, std::sync::atomic::Ordering::AcqRel);
    }

    /// Makes `batch`, which makes data keys stamped by this instance's floor, expect the store's
    /// floor to be that one (see [`Vault::dek_floor`]'s field).
    fn expect_dek_floor(&self, batch: &mut Batch) {
        batch.expect(
            Keyspace::Meta,
            META_DEK_FLOOR.to_vec(),
            dek_floor_expect(self.dek_floor.load(std::sync::atomic::Ordering::Acquire)),
        );
    }

    /// Uses `clock` for today's date (retention deadlines) instead of the system clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Today, by the vault's clock.
    pub fn today(&self) -> chrono::NaiveDate {
        (self.clock)()
    }

    /// Uses `rules` for retention instead of the defaults.
    pub fn with_retention(mut self, rules: Arc<RetentionRules>) -> Self {
        self.retention = rules;
        self
    }

    /// The retention rules in force.
    pub fn retention(&self) -> &RetentionRules {
        &self.retention
    }

    /// Uses `policy`'s purposes (consent, legal basis) instead of the default policy's.
    pub fn with_policy(mut self, policy: Arc<Policy>) -> Self {
        self.policy = policy;
        self
    }

    /// Turns audit events off. Only for measuring what auditing costs (the load benchmark):
    /// the server always audits.
    pub fn without_auditing(mut self) -> Self {
        self.auditing = false;
        self
    }

    /// Writes the event of an operation that did not write it in its own batch (reads,
    /// refusals, failures), with `outcome`. Fails closed: if the event cannot be written the
    /// caller must not return data or report success.
    pub async fn record_event(
        &self,
        mut event: audit::Context,
        outcome: audit::Outcome,
    ) -> Result<(), VaultError> {
        if event.written || !self.auditing {
            return Ok(());
        }
        event.draft.outcome = outcome.as_str().to_string();
        let mut batch = Batch::default();
        for body in event.encode_all() {
            batch.append_event(body);
        }
        self.store
            .commit(batch)
            .await
            .map_err(VaultError::AuditUnavailable)
    }

    /// Adds the `ok` event of a change to the change's own batch.
    fn attach_event(&self, batch: &mut Batch, event: &mut audit::Context) {
        if self.auditing {
            event.draft.outcome = audit::Outcome::Ok.as_str().to_string();
            batch.append_event(event.draft.encode());
        }
    }

    /// The schema in force.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The store (for tools and tests).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The key ring.
    pub fn keys(&self) -> &Arc<KeyRing> {
        &self.keys
    }

    /// Whether this vault writes audit events.
    pub fn auditing(&self) -> bool {
        self.auditing
    }

    /// Creates a record holding `fields`; every field must be writable by the caller's role.
    pub async fn create(
        &self,
        caller: &Caller,
        purpose: &str,
        fields: Vec<(String, Value)>,
        event: &mut audit::Context,
    ) -> Result<(Uuid, u64), VaultError> {
        self.check_create_purpose(caller, purpose)?;
        if fields.is_empty() {
            return Err(VaultError::invalid(
                "fields",
                "at least one field is required",
            ));
        }
        let mut parsed = self.parse_writes(caller, "fields", fields)?;
        for _ in 0..MAX_RETRIES {
            match self.try_create(&mut parsed, event).await {
                Err(VaultError::Conflict(_)) => continue,
                done => return done,
            }
        }
        Err(VaultError::Conflict("the key ring".into()))
    }

    /// One attempt of [`Vault::create`]: a conflict means a KEK version it wrapped under is
    /// no longer the active one (another instance rotated); the key ring has then been
    /// re-read.
    async fn try_create(
        &self,
        parsed: &mut [(&FieldDef, Parsed)],
        event: &mut audit::Context,
    ) -> Result<(Uuid, u64), VaultError> {
        let id = Uuid::new_v4();
        let idb = id.as_bytes().to_vec();
        let now = now_ms();
        let mut body = RecordBody {
            format: RECORD_FORMAT,
            id: idb.clone(),
            revision: 1,
            created_ms: now,
            updated_ms: now,
            lifecycle: LIFECYCLE_APPLICANT.into(),
            deks: BTreeMap::new(),
            fields: BTreeMap::new(),
            ..RecordBody::default()
        };
        let mut batch = Batch::default();
        let mut sealers = BTreeMap::new();
        for (def, value) in parsed.iter_mut() {
            let sealer = self.sealer(&mut sealers, &mut body, def.category)?;
            let entry = self.write_field(&mut batch, sealer, &idb, def, value, 1)?;
            body.fields.insert(def.name.clone(), entry);
        }
        expect_keks(&mut batch, &body, sealers.keys());
        self.expect_dek_floor(&mut batch);
        let (kv, key) = self.keys.integrity_key();
        batch.expect(Keyspace::Records, idb.clone(), Expect::Absent);
        batch.put(Keyspace::Records, idb, body.seal(kv, key));
        event.draft.record_id = id.to_string();
        event.draft.field_names = parsed.iter().map(|(d, _)| d.name.clone()).collect();
        self.attach_event(&mut batch, event);
        match self.store.commit(batch).await {
            Ok(()) => {
                event.written = true;
                Ok((id, 1))
            }
            Err(StoreError::Conflict) => {
                self.refresh_keys_if_gone(&body, sealers.keys()).await?;
                self.load_dek_floor().await?;
                Err(VaultError::Conflict(format!("record {id}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// After a write conflicted: if a KEK it wrapped a data key under is no longer in the
    /// store (another instance rotated and retired, or is retiring, it) or no longer the
    /// newest version (another instance rotated), re-reads the key ring so that the retry
    /// wraps under the store's active version.
    async fn refresh_keys_if_gone<'a>(
        &self,
        body: &RecordBody,
        categories: impl Iterator<Item = &'a Category>,
    ) -> Result<(), VaultError> {
        for category in categories {
            let Some(dek) = body.deks.get(category.as_str()) else {
                continue;
            };
            let key = crate::keys::active_kek_key(*category);
            let active = crate::keys::active_kek_value(dek.kek_version);
            if self.store.get(Keyspace::Meta, &key).await?.as_deref() != Some(active.as_slice()) {
                return self
                    .keys
                    .reload(&self.store)
                    .await
                    .map_err(|e| VaultError::Internal(format!("reloading the key ring: {e}")));
            }
        }
        Ok(())
    }

    /// Reads fields of a record. With no `field_names`, returns every field the role may read.
    pub async fn get(
        &self,
        caller: &Caller,
        record_id: &str,
        purpose: &str,
        field_names: &[String],
    ) -> Result<ReadResult, VaultError> {
        self.check_purpose(caller, purpose)?;
        // Every name known, then the right on each, in name order (ARCHITECTURE.md, "Order
        // of checks").
        let names: Vec<&str> = field_names.iter().map(String::as_str).collect();
        let mut defs = Vec::with_capacity(names.len());
        for name in sorted(&names) {
            defs.push(self.field_def("field_names", name)?);
        }
        let mut wanted = BTreeSet::new();
        for def in defs {
            if !self.visible(caller, def) {
                return Err(denied_field(caller, "read", def));
            }
            wanted.insert(def.name.as_str());
        }
        // The id after the purpose and the rights (ARCHITECTURE.md, "Order of checks"): a
        // caller without them is `denied`, whatever id it sent.
        let id = parse_record_id(record_id)?;
        let idb = id.as_bytes();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (raw, body) = self.load(id).await?;
            self.check_processing(id, &body, purpose)?;
            match self.read_fields(caller, idb, &body, &wanted, true).await {
                Ok(Opened { fields, masked }) => {
                    let withheld = body
                        .fields
                        .iter()
                        .filter(|(n, entry)| {
                            match (self.schema.field(n), Category::parse(&entry.category)) {
                                (Some(d), Some(c)) => !self.entry_visible(caller, d, c, entry),
                                _ => true,
                            }
                        })
                        .map(|(n, _)| n.clone())
                        .collect();
                    return Ok(ReadResult {
                        id,
                        revision: body.revision,
                        fields,
                        withheld,
                        masked,
                    });
                }
                // A concurrent update may have replaced the chunks between reading the header
                // and the chunks: re-read; if the header did not change, the data is damaged.
                Err(e @ VaultError::DataLoss { .. }) => {
                    let now = self.store.get(Keyspace::Records, idb).await?;
                    if now.as_deref() == Some(raw.as_slice()) || attempt >= MAX_RETRIES {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sets and clears fields (`change.expected_revision` 0 means no check).
    pub async fn update(
        &self,
        caller: &Caller,
        record_id: &str,
        purpose: &str,
        change: Change,
        event: &mut audit::Context,
    ) -> Result<Updated, VaultError> {
        let Change {
            expected_revision,
            set,
            clear,
        } = change;
        self.check_purpose(caller, purpose)?;
        if set.is_empty() && clear.is_empty() {
            return Err(VaultError::invalid(
                "set",
                "nothing to update: set or clear at least one field",
            ));
        }
        let set_names: Vec<&str> = set.iter().map(|(n, _)| n.as_str()).collect();
        let clear_names: Vec<&str> = clear.iter().map(String::as_str).collect();
        self.check_writable(caller, purpose, "set", &set_names, &clear_names)?;
        let mut cleared: BTreeMap<&str, &FieldDef> = BTreeMap::new();
        for name in sorted(&clear_names) {
            let def = self.field_def("clear", name)?;
            if set.iter().any(|(n, _)| n == name) {
                return Err(VaultError::invalid(
                    format!("clear.{name}"),
                    "a field cannot be both set and cleared",
                ));
            }
            if cleared.insert(def.name.as_str(), def).is_some() {
                return Err(VaultError::invalid(
                    format!("clear.{name}"),
                    "names a field twice (name each field once)",
                ));
            }
        }
        let mut parsed = self.parse_writes(caller, "set", set)?;
        // The id after the purpose and the rights, as in `get`.
        let id = parse_record_id(record_id)?;
        let idb = id.as_bytes().to_vec();
        for _ in 0..MAX_RETRIES {
            let (raw, mut body) = self.load(id).await?;
            let had_keys: BTreeSet<String> = body.deks.keys().cloned().collect();
            self.check_processing(id, &body, purpose)?;
            if body.erasure_requested_ms != 0 && !parsed.is_empty() {
                return Err(VaultError::FailedPrecondition(format!(
                    "record {id}: its data subject asked for erasure on {}; what stays is kept for a legal duty only, so no new data may be written to it (clearing fields is allowed)",
                    iso(body.erasure_requested_ms)
                )));
            }
            if expected_revision != 0 && body.revision != expected_revision {
                return Err(VaultError::StaleRevision {
                    record_id: id.to_string(),
                    expected: expected_revision,
                    actual: body.revision,
                });
            }
            // A field the schema moved keeps its stored value under the old category until
            // it is written: replacing or clearing it needs that category's write right too.
            for def in parsed
                .iter()
                .map(|(d, _)| *d)
                .chain(cleared.values().copied())
            {
                if let Some(denied) = body
                    .fields
                    .get(&def.name)
                    .and_then(|entry| moved_out_of_reach(caller, "write", def, entry))
                {
                    return Err(denied);
                }
            }
            let revision = body.revision + 1;
            // Who read a changed field since it was last written (before this change).
            let changed: BTreeMap<String, i64> = parsed
                .iter()
                .map(|(d, _)| d.name.as_str())
                .chain(cleared.keys().copied())
                .filter_map(|n| body.fields.get(n).map(|e| (n.to_string(), e.written_ms)))
                .collect();
            // Where the chain stood when the readers were looked up: reads recorded between
            // here and the commit are looked up after it (they returned the old value too).
            let looked_to = if self.auditing && !changed.is_empty() {
                Some(audit::Head::load(&self.store).await?.seq)
            } else {
                None
            };
            let notify = self.readers_since(id, &changed, &caller.principal).await?;
            let mut batch = Batch::default();
            let mut sealers: BTreeMap<Category, SealingKey> = BTreeMap::new();
            let mut sealed = Ok(());
            for (def, value) in &mut parsed {
                if let Some(old) = body.fields.remove(&def.name) {
                    self.delete_field(&mut batch, &idb, &def.name, &old);
                }
                let entry = self
                    .sealer(&mut sealers, &mut body, def.category)
                    .and_then(|sealer| {
                        self.write_field(&mut batch, sealer, &idb, def, value, revision)
                    });
                match entry {
                    Ok(entry) => {
                        body.fields.insert(def.name.clone(), entry);
                    }
                    Err(e) => {
                        sealed = Err(e);
                        break;
                    }
                }
            }
            if let Err(e) = sealed {
                // A data key that no longer opens because the record was rewrapped (and the
                // old KEK retired) since it was read: start again from the new header.
                if matches!(e, VaultError::DataLoss { .. })
                    && self.store.get(Keyspace::Records, &idb).await?.as_deref()
                        != Some(raw.as_slice())
                {
                    continue;
                }
                return Err(e);
            }
            for name in cleared.keys() {
                if let Some(old) = body.fields.remove(*name) {
                    self.delete_field(&mut batch, &idb, name, &old);
                }
            }
            // A category whose last field is gone (cleared, or rewritten under the category
            // the schema moved it to: review 22) takes its data key with it.
            let fields = &body.fields;
            body.deks
                .retain(|cat, _| fields.values().any(|e| e.category == *cat));
            expect_keks(&mut batch, &body, sealers.keys());
            if body.deks.keys().any(|k| !had_keys.contains(k)) {
                self.expect_dek_floor(&mut batch);
            }
            body.revision = revision;
            body.updated_ms = now_ms().max(body.updated_ms);
            self.seal_legacy_notes(&mut body)?;
            let (kv, key) = self.keys.integrity_key();
            batch.expect(Keyspace::Records, idb.clone(), Expect::Value(raw));
            batch.put(Keyspace::Records, idb.clone(), body.seal(kv, key));
            self.attach_event(&mut batch, event);
            match self.store.commit(batch).await {
                Ok(()) => {
                    event.written = true;
                    let notify = match looked_to {
                        Some(seq) => {
                            self.late_readers(
                                id,
                                &changed,
                                &caller.principal,
                                seq,
                                &event.draft,
                                notify,
                            )
                            .await
                        }
                        None => notify,
                    };
                    return Ok(Updated { revision, notify });
                }
                Err(StoreError::Conflict) => {
                    self.refresh_keys_if_gone(&body, sealers.keys()).await?;
                    self.load_dek_floor().await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(VaultError::Conflict(format!("record {id}")))
    }

    /// Finds records whose searchable `field_name` equals `value` (after normalisation).
    pub async fn find(
        &self,
        caller: &Caller,
        purpose: &str,
        field_name: &str,
        value: &str,
    ) -> Result<Vec<Uuid>, VaultError> {
        self.check_purpose(caller, purpose)?;
        if field_name.is_empty() {
            return Err(VaultError::invalid("field_name", "is required"));
        }
        let def = self.field_def("field_name", field_name)?;
        if !def.searchable {
            return Err(VaultError::invalid(
                "field_name",
                format!(
                    "field `{}` is not searchable (searchable: {})",
                    def.name,
                    self.searchable_names()
                ),
            ));
        }
        if !caller.role.may_read(def.category) {
            return Err(denied_field(caller, "search", def));
        }
        if !caller.role.may_search(def.category, &def.name) {
            return Err(VaultError::PermissionDenied(format!(
                "role `{}` sees field `{}` only masked and may not search it (searching the values its mask leaves open would unmask it; roles with the export right may)",
                caller.role.name, def.name
            )));
        }
        let form = def
            .parse_search(value, self.today())
            .map_err(|e| value_error("value", e))?;
        let tag = crypto::hmac_sha256(&self.keys.index_key(&def.name), &[form.as_bytes()]);
        let prefix = record::index_prefix(&def.name, &tag);
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        let mut examined = 0;
        // Pages of index entries until the answer is full, the entries end, or the bound of
        // entries examined is reached (entries left out do not shorten the answer).
        while out.len() < MAX_FIND_RESULTS && examined < MAX_FIND_EXAMINED {
            let hits = self
                .store
                .scan(Keyspace::Index, &prefix, after.as_deref(), MAX_FIND_RESULTS)
                .await?;
            let Some((last, _)) = hits.last() else {
                break;
            };
            after = Some(last.clone());
            let ended = hits.len() < MAX_FIND_RESULTS;
            examined += hits.len();
            self.find_hits(caller, def, &tag, &prefix, purpose, hits, &mut out)
                .await?;
            if ended {
                break;
            }
        }
        out.truncate(MAX_FIND_RESULTS);
        Ok(out)
    }

    /// Adds to `out` the records of index `hits` whose MACed header holds `tag` for `def`
    /// and that `purpose` may process, unless the field's stored value is sealed under a
    /// category (the schema moved it) that `caller` may not read.
    #[allow(clippy::too_many_arguments)]
    async fn find_hits(
        &self,
        caller: &Caller,
        def: &FieldDef,
        tag: &[u8; 32],
        prefix: &[u8],
        purpose: &str,
        hits: crate::store::Entries,
        out: &mut Vec<Uuid>,
    ) -> Result<(), VaultError> {
        for (k, _) in hits {
            let Ok(id) = Uuid::from_slice(&k[prefix.len()..]) else {
                continue;
            };
            // Restricted records, and records this purpose may not be used for, are left out.
            // The index keyspace is not MACed: a hit counts only if the record's MACed header
            // holds the same tag for the field, so an entry planted or left behind in the
            // store cannot make a search return another person's record.
            let field = def.name.as_str();
            match self.check_hit(id, &k, field, tag).await {
                Ok(Hit::Holds(body)) => {
                    let entry = body.fields.get(field);
                    if entry.is_some_and(|e| moved_out_of_reach(caller, "search", def, e).is_some())
                    {
                        continue;
                    }
                    if self.check_processing(id, &body, purpose).is_ok() {
                        out.push(id);
                    }
                }
                Ok(Hit::Gone) => {}
                Ok(Hit::OutOfPlace) => tracing::warn!(
                    record_id = %id,
                    field = %field,
                    "a blind-index entry does not match the record's header; left out"
                ),
                Err(VaultError::NotFound(_)) => {}
                // One damaged record must not make every other record with the value
                // unfindable (nor name a record the search would have left out): it is left
                // out and logged, as in a listing; reading it answers DATA_LOSS.
                Err(VaultError::DataLoss { record_id, part }) => tracing::error!(
                    %record_id,
                    %part,
                    field = %def.name,
                    "find: a record's stored header is damaged (DATA_LOSS); left out"
                ),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether record `id`'s MACed header holds `tag` for `field`, as the index entry `key`
    /// (read from the store a moment ago) says. A header without it may have changed after
    /// the entry was read (an update moves header and entry in one batch): then the entry is
    /// gone, or the header read again holds the tag. Only an entry still there that the
    /// header does not hold is out of place (planted, or left behind).
    async fn check_hit(
        &self,
        id: Uuid,
        key: &[u8],
        field: &str,
        tag: &[u8; 32],
    ) -> Result<Hit, VaultError> {
        let holds = |body: &RecordBody| {
            body.fields
                .get(field)
                .is_some_and(|entry| crypto::ct_eq(&entry.index_tag, tag))
        };
        let (_, body) = self.load(id).await?;
        if holds(&body) {
            return Ok(Hit::Holds(Box::new(body)));
        }
        if self.store.get(Keyspace::Index, key).await?.is_none() {
            return Ok(Hit::Gone);
        }
        let (_, body) = self.load(id).await?;
        Ok(if holds(&body) {
            Hit::Holds(Box::new(body))
        } else {
            Hit::OutOfPlace
        })
    }

    /// Erases a record on request (crypto-shredding), as of `today`: deletes the data keys,
    /// field ciphertext and blind-index entries of every category not under a legal duty to
    /// keep; the record itself goes when nothing is kept. Legal hold refuses it.
    pub async fn erase(
        &self,
        caller: &Caller,
        record_id: &str,
        reason: &str,
        today: chrono::NaiveDate,
        event: &mut audit::Context,
    ) -> Result<Erasure, VaultError> {
        // The right first: a role without it is told which right it lacks, not that a
        // purpose it did not send (data subject requests run under one) is not allowed.
        if !caller.role.records.contains(&RecordRight::Erase) {
            return Err(VaultError::PermissionDenied(format!(
                "role `{}` may not call EraseRecord (policy right records = [\"erase\"] is not granted)",
                caller.role.name
            )));
        }
        self.check_purpose(caller, PURPOSE_DSR)?;
        if !crate::schema::has_visible_char(reason) {
            return Err(VaultError::invalid(
                "reason",
                "is required (why the record is erased)",
            ));
        }
        check_reason(reason)?;
        // The id after the right, the purpose and the other values, as in `get`.
        let id = parse_record_id(record_id)?;
        event.draft.record_id = id.to_string();
        let idb = id.as_bytes().to_vec();
        for _ in 0..MAX_RETRIES {
            let (raw, mut body) = self.load(id).await?;
            if body.legal_hold {
                return Err(VaultError::FailedPrecondition(format!(
                    "record {id} is under legal hold: it cannot be erased until the hold is lifted"
                )));
            }
            // What a legal duty keeps stays for that duty only (see `update`).
            if body.erasure_requested_ms == 0 {
                body.erasure_requested_ms = now_ms();
            }
            let (batch, erasure, names) = self.shred(&idb, &raw, &mut body, |d| {
                if d.retained_on(today) {
                    Some(match d.duty {
                        Duty::Until(date) => date.format("%Y-%m-%d").to_string(),
                        _ => String::new(),
                    })
                } else {
                    None
                }
            })?;
            let mut batch = batch;
            event.draft.field_names = names;
            self.attach_event(&mut batch, event);
            match self.store.commit(batch).await {
                Ok(()) => {
                    event.written = self.auditing;
                    return Ok(erasure);
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(VaultError::Conflict(format!("record {id}")))
    }

    /// The whole record as one versioned JSON document for its data subject (access and
    /// portability): every field (blobs base64 with content type; never masked), metadata,
    /// lifecycle, consents, retention deadlines per category and the access history from the
    /// audit trail (who, role, purpose, when, which fields — never values). The document is
    /// zeroized when dropped.
    pub async fn export(
        &self,
        caller: &Caller,
        record_id: &str,
        event: &mut audit::Context,
    ) -> Result<Zeroizing<String>, VaultError> {
        use base64::Engine;
        // The right first: a role without it is told which right it lacks, not that a
        // purpose it did not send (data subject requests run under one) is not allowed.
        if !caller.role.records.contains(&RecordRight::Export) {
            return Err(VaultError::PermissionDenied(format!(
                "role `{}` may not call ExportRecord (policy right records = [\"export\"] is not granted)",
                caller.role.name
            )));
        }
        self.check_purpose(caller, PURPOSE_DSR)?;
        // The id after the right and the purpose, as in `get`.
        let id = parse_record_id(record_id)?;
        // As in `get`: a concurrent update may replace the chunks between reading the header
        // and the chunks; re-read, and only an unchanged header makes it damage.
        let mut attempt = 0;
        let (body, names, values) = loop {
            attempt += 1;
            let (raw, body) = self.load(id).await?;
            let names: Vec<String> = body.fields.keys().cloned().collect();
            let wanted: BTreeSet<&str> = names.iter().map(String::as_str).collect();
            match self
                .read_fields(caller, id.as_bytes(), &body, &wanted, false)
                .await
            {
                // `masking` is false: an export returns every field in full.
                Ok(Opened { fields: values, .. }) => break (body, names, values),
                Err(e @ VaultError::DataLoss { .. }) => {
                    let now = self.store.get(Keyspace::Records, id.as_bytes()).await?;
                    if now.as_deref() == Some(raw.as_slice()) || attempt >= MAX_RETRIES {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        };
        event.draft.record_id = id.to_string();
        event.draft.field_names = names;
        // Blobs in base64, each into a buffer of exactly its size (no reallocation leaves an
        // unwiped copy behind).
        let encoded: Vec<Zeroizing<String>> = values
            .iter()
            .map(|(_, value)| match value {
                Value::Blob { bytes, .. } => {
                    let engine = base64::engine::general_purpose::STANDARD;
                    let mut out = Zeroizing::new(String::with_capacity(
                        base64::encoded_len(bytes.len(), true).unwrap_or(0),
                    ));
                    engine.encode_string(bytes.as_slice(), &mut out);
                    out
                }
                Value::Text(_) => Zeroizing::new(String::new()),
            })
            .collect();
        let retention: Vec<_> = retention::deadlines(&self.retention, &body)
            .into_iter()
            .map(|d| {
                serde_json::json!({
                    "category": d.category.as_str(),
                    "keep_until": match d.duty {
                        Duty::Until(date) => serde_json::Value::String(date.format("%Y-%m-%d").to_string()),
                        Duty::Ongoing => serde_json::Value::String(crate::retention::BASIS_EMPLOYMENT_ONGOING.into()),
                        Duty::None => serde_json::Value::Null,
                    },
                    "erase_on": d.erase_on.map(|e| e.format("%Y-%m-%d").to_string()),
                    "rule": crate::retention::pending_rule(&self.retention, &body, &d),
                    "basis": d.basis,
                })
            })
            .collect();
        let mut history = Vec::new();
        let filter = audit::Filter {
            record_id: Some(id.to_string()),
            ..audit::Filter::default()
        };
        let mut after = 0;
        loop {
            let page = audit::query(&self.store, &filter, after, 1000).await?;
            for e in page.events {
                history.push(serde_json::json!({
                    "seq": e.seq,
                    "time": iso(e.time_ms),
                    "principal": e.draft.principal,
                    "role": e.draft.role,
                    "purpose": e.draft.purpose,
                    "action": e.draft.action,
                    "fields": e.draft.field_names,
                    // Of `fields`, those the caller got masked (the last digits of a BSN
                    // are not the BSN: review 29).
                    "masked_fields": e.draft.masked_field_names,
                    "outcome": e.draft.outcome,
                }));
            }
            match page.next_after {
                Some(n) => after = n,
                None => break,
            }
        }
        // The reasons hold personal data: they are written from their zeroizing buffers, as the
        // field values are, not through the metadata's value tree.
        let restriction_reason = self.open_note(
            &body,
            "restriction_reason",
            &body.restriction_reason_sealed,
            &body.restriction_reason,
        )?;
        let legal_hold_reason = self.open_note(
            &body,
            "legal_hold_reason",
            &body.legal_hold_reason_sealed,
            &body.legal_hold_reason,
        )?;
        let doc = serde_json::json!({
            "format": "kluis.record-export",
            "version": 1,
            "exported_at": iso(now_ms()),
            "record_id": id.to_string(),
            "revision": body.revision,
            "created_at": iso(body.created_ms),
            "updated_at": iso(body.updated_ms),
            // With the dates the vault keeps across stages and uses in its decisions (review 16).
            "lifecycle": {
                "stage": body.lifecycle,
                "date": record::canonical_date(&body.lifecycle_date),
                "last_employment_ended": body.latest_end().map(|d| d.to_string()),
                "procedure_closed_on": record::stored_day(&body.closed_on).map(|d| d.to_string()),
                "reopened": body.reopened,
            },
            "restricted": body.restricted,
            "legal_hold": body.legal_hold,
            "erasure_requested": (body.erasure_requested_ms != 0).then(|| iso(body.erasure_requested_ms)),
            "consents": body.consents.iter().map(|(p, c)| serde_json::json!({
                "purpose": p, "granted": c.granted, "changed": iso(c.changed_ms),
            })).collect::<Vec<_>>(),
            "retention": retention,
            "access_history": history,
        });
        // The metadata holds no plaintext (ids, dates, stages, purposes, the access history).
        // The field values and the reasons are written from where they are (zeroizing
        // buffers) straight into one zeroizing buffer, sized up front from a bound of the
        // document so that it does not grow (and if it had to, it would wipe what it leaves).
        let serde_json::Value::Object(meta) = doc else {
            return Err(VaultError::Internal(
                "export: document is not an object".into(),
            ));
        };
        let document = export::Document {
            meta: &meta,
            fields: export::Fields {
                values: &values,
                encoded: &encoded,
            },
            notes: &[
                ("restriction_reason", restriction_reason.as_str()),
                ("legal_hold_reason", legal_hold_reason.as_str()),
            ],
        };
        let bound = document.bound();
        let mut out = WipingVec::with_capacity(bound);
        serde_json::to_writer_pretty(&mut out, &document)
            .map_err(|_| VaultError::Internal("export: encoding the document failed".into()))?;
        let mut out = out.into_inner();
        debug_assert!(out.len() <= bound, "the export buffer never grows");
        let bytes = std::mem::take(&mut *out);
        let text = String::from_utf8(bytes).map_err(|e| {
            let mut bytes = e.into_bytes();
            bytes.zeroize();
            VaultError::Internal("export: the document is not UTF-8".into())
        })?;
        Ok(Zeroizing::new(text))
    }

    /// Builds the batch that deletes every category of `body` for which `keep` answers `None`
    /// (`Some(until)` keeps it). Returns the batch (expecting the header `raw`), what was
    /// erased and kept, and the names of the erased fields.
    pub(crate) fn shred(
        &self,
        idb: &[u8],
        raw: &[u8],
        body: &mut RecordBody,
        keep: impl Fn(&retention::Deadlines) -> Option<String>,
    ) -> Result<(Batch, Erasure, Vec<String>), VaultError> {
        let mut batch = Batch::default();
        let mut erasure = Erasure::default();
        let mut names = Vec::new();
        for d in retention::deadlines(&self.retention, body) {
            let cat = d.category.as_str();
            if let Some(until) = keep(&d) {
                erasure
                    .retained
                    .push((cat.to_string(), until, d.basis.clone()));
                continue;
            }
            let doomed: Vec<String> = body
                .fields
                .iter()
                .filter(|(_, e)| e.category == cat)
                .map(|(n, _)| n.clone())
                .collect();
            for name in doomed {
                if let Some(entry) = body.fields.remove(&name) {
                    self.delete_field(&mut batch, idb, &name, &entry);
                }
                names.push(name);
            }
            body.deks.remove(cat);
            erasure.erased.push(cat.to_string());
        }
        batch.expect(Keyspace::Records, idb.to_vec(), Expect::Value(raw.to_vec()));
        if body.deks.is_empty() {
            batch.delete(Keyspace::Records, idb.to_vec());
        } else {
            body.revision += 1;
            body.updated_ms = now_ms().max(body.updated_ms);
            self.seal_legacy_notes(body)?;
            let (kv, key) = self.keys.integrity_key();
            batch.put(Keyspace::Records, idb.to_vec(), body.seal(kv, key));
        }
        Ok((batch, erasure, names))
    }

    /// `notify` and the principals of reads recorded after event `after` and before this
    /// update's own event `ours` (the first `UpdateRecord` of the same principal and fields
    /// after `after`): they raced the update and returned the old value. The update is
    /// committed: if the chain cannot be read now, the list found before stands (logged).
    async fn late_readers(
        &self,
        id: Uuid,
        fields: &BTreeMap<String, i64>,
        except: &str,
        after: u64,
        ours: &audit::Draft,
        notify: Vec<String>,
    ) -> Vec<String> {
        let filter = audit::Filter {
            record_id: Some(id.to_string()),
            ..audit::Filter::default()
        };
        let mut readers: BTreeSet<String> = notify.into_iter().collect();
        let mut from = after;
        loop {
            let page = match audit::query(&self.store, &filter, from, 1000).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(record_id = %id, error = %e, "update: reads that raced it could not be looked up; notify lists those found before it");
                    break;
                }
            };
            for e in page.events {
                let own = e.draft.action == ours.action
                    && e.draft.principal == ours.principal
                    && e.draft.field_names == ours.field_names
                    && e.draft.outcome == audit::Outcome::Ok.as_str();
                if own {
                    return readers.into_iter().collect();
                }
                if read_one_of(&e, fields, except) {
                    readers.insert(e.draft.principal);
                }
            }
            match page.next_after {
                Some(n) => from = n,
                None => break,
            }
        }
        readers.into_iter().collect()
    }

    /// The principals other than `except` with a successful `GetRecord` of record `id` that
    /// returned one of `fields` at or after that field's write time. Reads the record's events
    /// from the oldest write time on (binary search by time, then a scan of the chain).
    async fn readers_since(
        &self,
        id: Uuid,
        fields: &BTreeMap<String, i64>,
        except: &str,
    ) -> Result<Vec<String>, VaultError> {
        let Some(since) = fields.values().min().copied() else {
            return Ok(Vec::new());
        };
        let filter = audit::Filter {
            record_id: Some(id.to_string()),
            since_ms: Some(since),
            ..audit::Filter::default()
        };
        let mut readers = BTreeSet::new();
        let mut after = 0;
        loop {
            let page = audit::query(&self.store, &filter, after, 1000).await?;
            for e in page.events {
                if read_one_of(&e, fields, except) {
                    readers.insert(e.draft.principal);
                }
            }
            match page.next_after {
                Some(n) => after = n,
                None => break,
            }
        }
        Ok(readers.into_iter().collect())
    }

    /// Whether the record may be processed for `purpose`: not restricted (except for a
    /// data-subject request), consent given where the purpose requires it, no objection to a
    /// legitimate-interest purpose.
    fn check_processing(
        &self,
        id: Uuid,
        body: &RecordBody,
        purpose: &str,
    ) -> Result<(), VaultError> {
        if body.restricted && purpose != PURPOSE_DSR {
            return Err(VaultError::FailedPrecondition(format!(
                "record {id} is restricted (GDPR Art. 18): it is only stored; processing is refused until the privacy officer lifts the restriction"
            )));
        }
        let Some(p) = self.policy.purpose(purpose) else {
            return Ok(());
        };
        if !p.applies_in(&body.lifecycle) {
            return Err(VaultError::FailedPrecondition(format!(
                "record {id} is in lifecycle stage `{}`: purpose `{purpose}` applies only in stage(s) {} (policy: [purposes.{purpose}] stages)",
                body.lifecycle,
                p.stages.as_deref().unwrap_or_default().join(", ")
            )));
        }
        let consent = body.consents.get(purpose).map(|c| c.granted);
        if p.requires_consent && consent != Some(true) {
            return Err(VaultError::FailedPrecondition(format!(
                "record {id}: purpose `{purpose}` requires the data subject's consent, which is {}",
                if consent == Some(false) {
                    "withdrawn"
                } else {
                    "not recorded"
                }
            )));
        }
        if p.legal_basis == LegalBasis::LegitimateInterest && consent == Some(false) {
            return Err(VaultError::FailedPrecondition(format!(
                "record {id}: the data subject objected to purpose `{purpose}` (GDPR Art. 21)"
            )));
        }
        Ok(())
    }

    /// Changes a record's processing state (lifecycle, consent, restriction, legal hold) and
    /// returns its metadata. Bumps the revision; the event rides in the change's batch.
    pub async fn set_state(
        &self,
        caller: &Caller,
        record_id: &str,
        change: StateChange,
        event: &mut audit::Context,
    ) -> Result<RecordMeta, VaultError> {
        let right = change.right();
        if !caller.role.records.contains(&right) {
            return Err(VaultError::PermissionDenied(format!(
                "role `{}` may not call {} (policy right records = [\"{}\"] is not granted)",
                caller.role.name,
                match right {
                    RecordRight::SetLifecycle | RecordRight::SetEmployment => "SetLifecycle",
                    RecordRight::SetConsent => "SetConsent",
                    RecordRight::SetRestriction => "SetRestriction",
                    RecordRight::SetLegalHold => "SetLegalHold",
                    RecordRight::Erase => "EraseRecord",
                    RecordRight::Export => "ExportRecord",
                },
                right.as_str()
            )));
        }
        match &change {
            StateChange::Lifecycle { stage, date } => {
                if !LIFECYCLE_STAGES.contains(&stage.as_str()) {
                    return Err(VaultError::invalid(
                        "stage",
                        format!("must be one of {}", LIFECYCLE_STAGES.join(", ")),
                    ));
                }
                if matches!(stage.as_str(), "employed" | "ended")
                    && !caller.role.records.contains(&RecordRight::SetEmployment)
                {
                    return Err(VaultError::PermissionDenied(format!(
                        "role `{}` may not set stage `{stage}` (policy right records = [\"set_employment\"] is not granted): the employment dates start the legal duties to keep identity and financial data",
                        caller.role.name
                    )));
                }
                if date.is_empty() {
                    return Err(VaultError::invalid(
                        "date",
                        "is required (ISO date, YYYY-MM-DD)",
                    ));
                }
                let Some(day) = record::parse_request_day(date) else {
                    return Err(VaultError::invalid(
                        "date",
                        "must be an existing day written YYYY-MM-DD (ASCII digits, nothing around it)",
                    ));
                };
                check_lifecycle_date(stage, day, chrono::Utc::now().date_naive())?;
            }
            StateChange::Consent { purpose, .. } => {
                if purpose.is_empty() {
                    return Err(VaultError::invalid("purpose", "is required"));
                }
                let p = self.policy.purpose(purpose).ok_or_else(|| {
                    VaultError::invalid(
                        "purpose",
                        format!("unknown purpose `{}`", printable_name(purpose)),
                    )
                })?;
                if !(p.requires_consent
                    || matches!(
                        p.legal_basis,
                        LegalBasis::Consent | LegalBasis::LegitimateInterest
                    ))
                {
                    return Err(VaultError::invalid(
                        "purpose",
                        format!("purpose `{purpose}` rests on neither consent nor legitimate interest: there is no consent or objection to record"),
                    ));
                }
            }
            StateChange::Restriction {
                restricted: on,
                reason,
            }
            | StateChange::LegalHold { hold: on, reason } => {
                if *on && !crate::schema::has_visible_char(reason) {
                    return Err(VaultError::invalid("reason", "is required when setting it"));
                }
                check_reason(reason)?;
            }
        }
        // The id after the rights and the other values, as in `get` (a stage that needs
        // `set_employment` is such a right).
        let id = parse_record_id(record_id)?;
        event.draft.record_id = id.to_string();
        let idb = id.as_bytes().to_vec();
        for _ in 0..MAX_RETRIES {
            let (raw, mut body) = self.load(id).await?;
            let processing = match &change {
                StateChange::Lifecycle { .. } => true,
                StateChange::Consent { granted, .. } => *granted,
                _ => false,
            };
            if processing && body.restricted {
                return Err(VaultError::FailedPrecondition(format!(
                    "record {id} is restricted (GDPR Art. 18): it is only stored; processing is refused until the privacy officer lifts the restriction"
                )));
            }
            let now = now_ms().max(body.updated_ms);
            // Data past its maximum period must go (the sweeper erases it, a legal hold only
            // delays that): reopening or re-closing a procedure, or a consent, must not start
            // a new clock for it. (An employment is a new basis of its own.)
            if body.erasure_requested_ms != 0
                && matches!(change, StateChange::Consent { granted: true, .. })
            {
                return Err(VaultError::FailedPrecondition(format!(
                    "record {id}: its data subject asked for erasure on {}; what stays is kept for a legal duty only, so no consent may be recorded for other processing",
                    iso(body.erasure_requested_ms)
                )));
            }
            if let StateChange::Lifecycle { stage, date } = &change {
                let day = record::parse_request_day(date).ok_or_else(|| {
                    VaultError::Internal("a lifecycle date was checked before".into())
                })?;
                check_stage_after_erasure_request(id, &body, stage, day, self.today())?;
            }
            let extends = match &change {
                StateChange::Lifecycle { stage, .. } => {
                    matches!(stage.as_str(), "applicant" | "procedure_closed")
                }
                StateChange::Consent { granted, .. } => *granted,
                _ => false,
            };
            if extends {
                let today = self.today();
                if let Some(d) = retention::deadlines(&self.retention, &body)
                    .into_iter()
                    .find(|d| d.expired_on(today) && !d.retained_on(today))
                {
                    return Err(VaultError::FailedPrecondition(format!(
                        "record {id} is past its maximum retention period for category {} (it was due for erasure on {}): its data must go, so no reopened procedure or consent may keep it longer",
                        d.category,
                        d.erase_on.map(|e| e.to_string()).unwrap_or_default()
                    )));
                }
            }
            match &change {
                StateChange::Lifecycle { stage, date } => {
                    let day = record::parse_request_day(date).ok_or_else(|| {
                        VaultError::Internal("a lifecycle date was checked before".into())
                    })?;
                    let today = self.today();
                    // The categories holding data past its maximum period already, and since when.
                    let held: BTreeSet<&str> =
                        body.fields.values().map(|f| f.category.as_str()).collect();
                    let due_before: BTreeMap<Category, chrono::NaiveDate> =
                        retention::deadlines(&self.retention, &body)
                            .into_iter()
                            .filter(|d| held.contains(d.category.as_str()))
                            .filter_map(|d| {
                                d.erase_on
                                    .filter(|on| *on <= today)
                                    .map(|on| (d.category, on))
                            })
                            .collect();
                    check_lifecycle_step(id, &body, stage, day, &self.retention, today)?;
                    // A reopening, and the close of a hire that followed a closed procedure
                    // and fell through (`check_lifecycle_step`), each restart the applicant's
                    // clock: once.
                    let resumed_close = body.lifecycle == "employed"
                        && stage == "procedure_closed"
                        && body.closed_procedure_day().is_some();
                    if (body.lifecycle == "procedure_closed" && stage == "applicant")
                        || resumed_close
                    {
                        body.reopened = true;
                    }
                    let iso_day = |d: chrono::NaiveDate| d.format("%Y-%m-%d").to_string();
                    if let Some(ended) = body.latest_end() {
                        body.last_ended = iso_day(ended);
                    }
                    if stage == "ended" {
                        body.last_ended = iso_day(day);
                    }
                    // Kept while a hire follows the close (`RecordBody::closed_procedure_day`).
                    body.closed_on = match (body.closed_procedure_day(), stage.as_str()) {
                        (Some(closed), "employed") => iso_day(closed),
                        _ => String::new(),
                    };
                    body.lifecycle = stage.clone();
                    body.lifecycle_date = iso_day(day);
                    check_lifecycle_reach(caller, id, &body, &self.retention, &due_before, today)?;
                    // Data past its maximum period must go: no lifecycle change gives it a new
                    // clock, whatever its date (an end moved later, an employment dated ahead,
                    // or either dated just before the data fell due; reviews 11 and 12), as no
                    // reopened procedure or consent may (above). Such data is still there only
                    // under a legal hold or restriction, or until the sweeper's next pass.
                    if let Some((d, due)) = retention::deadlines(&self.retention, &body)
                        .into_iter()
                        .filter(|d| !d.expired_on(today))
                        .find_map(|d| due_before.get(&d.category).map(|due| (d, *due)))
                    {
                        return Err(VaultError::FailedPrecondition(format!(
                            "date: record {id} is past its maximum retention period for category {} (due on {due}): its data must go first (the retention sweeper erases it at its next pass, or when a legal hold or restriction is lifted), so no lifecycle change may give it a new clock",
                            d.category
                        )));
                    }
                }
                StateChange::Consent { purpose, granted } => {
                    body.consents.insert(
                        purpose.clone(),
                        record::ConsentEntry {
                            granted: *granted,
                            changed_ms: now,
                        },
                    );
                }
                StateChange::Restriction { restricted, reason } => {
                    body.restricted = *restricted;
                    body.restriction_reason.clear();
                    body.restriction_reason_sealed = if *restricted {
                        self.seal_note(&idb, "restriction_reason", reason)?
                    } else {
                        Vec::new()
                    };
                }
                StateChange::LegalHold { hold, reason } => {
                    body.legal_hold = *hold;
                    body.legal_hold_reason.clear();
                    body.legal_hold_reason_sealed = if *hold {
                        self.seal_note(&idb, "legal_hold_reason", reason)?
                    } else {
                        Vec::new()
                    };
                }
            }
            body.revision += 1;
            body.updated_ms = now;
            self.seal_legacy_notes(&mut body)?;
            let mut batch = Batch::default();
            let (kv, key) = self.keys.integrity_key();
            batch.expect(Keyspace::Records, idb.clone(), Expect::Value(raw));
            batch.put(Keyspace::Records, idb.clone(), body.seal(kv, key));
            self.attach_event(&mut batch, event);
            match self.store.commit(batch).await {
                Ok(()) => {
                    event.written = self.auditing;
                    return Ok(meta_of(id, &body));
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(VaultError::Conflict(format!("record {id}")))
    }

    /// Lists record metadata in id order. Any role that may read some category may list.
    pub async fn list(
        &self,
        caller: &Caller,
        page_size: u32,
        page_token: &str,
    ) -> Result<Page, VaultError> {
        if caller.role.read.is_empty() {
            return Err(VaultError::PermissionDenied(format!(
                "role `{}` may not list records (it may read no category)",
                caller.role.name
            )));
        }
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        } as usize;
        let after = if page_token.is_empty() {
            None
        } else {
            let position = self.keys.page_position("records", page_token);
            Some(
                position
                    .and_then(|b| Uuid::from_slice(&b).ok())
                    .ok_or_else(|| {
                        VaultError::invalid(
                            "page_token",
                            "is not a token from a previous ListRecords response of this vault (pass it back unchanged)",
                        )
                    })?,
            )
        };
        let rows = self
            .store
            .scan(
                Keyspace::Records,
                b"",
                after.as_ref().map(|u| u.as_bytes().as_slice()),
                size + 1,
            )
            .await?;
        let more = rows.len() > size;
        let mut records = Vec::with_capacity(size);
        let mut last = None;
        for (key, raw) in rows.into_iter().take(size) {
            let id = Uuid::from_slice(&key).map_err(|_| VaultError::DataLoss {
                record_id: hex::encode(&key),
                part: "record key".into(),
            })?;
            last = Some(id);
            let (kv, key) = self.keys.integrity_key();
            match RecordBody::open(id.as_bytes(), &raw, kv, key) {
                Ok(body) => records.push(meta_of(id, &body)),
                // One damaged header must not hide every record after it: it is left out
                // (and logged; reading it answers DATA_LOSS), and paging goes on past it.
                Err(_) => tracing::error!(
                    record_id = %id,
                    "list: the record's header is damaged (DATA_LOSS); left out"
                ),
            }
        }
        let next_page_token = if more {
            last.map(|id| self.keys.page_token("records", id.as_bytes()))
        } else {
            None
        };
        Ok(Page {
            records,
            next_page_token,
        })
    }

    fn field_def(&self, prefix: &str, name: &str) -> Result<&FieldDef, VaultError> {
        self.schema.field(name).ok_or_else(|| {
            VaultError::invalid(
                format!("{prefix}.{}", printable_name(name)),
                "unknown field (not in the schema)",
            )
        })
    }

    fn searchable_names(&self) -> String {
        self.schema
            .fields()
            .filter(|f| f.searchable)
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The purpose checks of a create: allowed to the caller, and not one that needs consent
    /// (a new record has none).
    pub fn check_create_purpose(&self, caller: &Caller, purpose: &str) -> Result<(), VaultError> {
        self.check_purpose(caller, purpose)?;
        if self
            .policy
            .purpose(purpose)
            .is_some_and(|p| p.requires_consent)
        {
            return Err(VaultError::FailedPrecondition(format!(
                "purpose `{purpose}` requires the data subject's consent, which a new record cannot have: create it under another purpose, then record consent with SetConsent"
            )));
        }
        Ok(())
    }

    /// The checks before values, for the names to set (under `prefix`) and to clear: the
    /// purpose, every name known (those to set, then those to clear, each in name order), then
    /// the caller's right to write each. Nothing is parsed for a request refused here.
    pub fn check_writable(
        &self,
        caller: &Caller,
        purpose: &str,
        prefix: &str,
        set: &[&str],
        clear: &[&str],
    ) -> Result<(), VaultError> {
        self.check_purpose(caller, purpose)?;
        let mut defs = Vec::with_capacity(set.len() + clear.len());
        for (prefix, names) in [(prefix, set), ("clear", clear)] {
            for name in sorted(names) {
                defs.push(self.field_def(prefix, name)?);
            }
        }
        for def in defs {
            if !caller.role.may_write(def.category) {
                return Err(denied_field(caller, "write", def));
            }
        }
        Ok(())
    }

    fn parse_writes(
        &self,
        caller: &Caller,
        prefix: &str,
        fields: Vec<(String, Value)>,
    ) -> Result<Vec<(&FieldDef, Parsed)>, VaultError> {
        let mut defs = Vec::with_capacity(fields.len());
        for (name, _) in &fields {
            defs.push(self.field_def(prefix, name)?);
        }
        for def in &defs {
            if !caller.role.may_write(def.category) {
                return Err(denied_field(caller, "write", def));
            }
        }
        let today = self.today();
        let mut out = Vec::with_capacity(fields.len());
        for (def, (_, value)) in defs.into_iter().zip(fields) {
            // A blob's bytes move into the parsed value (sealing turns them into its
            // ciphertext where they lie).
            let parsed = match value {
                Value::Text(t) => def.parse(RawValue::Text(&t), today),
                Value::Blob {
                    bytes,
                    content_type,
                } => def.parse(RawValue::Blob(bytes, &content_type), today),
            }
            .map_err(|e| value_error(&format!("{prefix}.{}", def.name), e))?;
            out.push((def, parsed));
        }
        Ok(out)
    }

    pub(crate) fn wrap(
        &self,
        id: &[u8],
        category: Category,
        dek: &SecretKey,
    ) -> Result<StoredDek, VaultError> {
        let w = self
            .keys
            .wrap_dek(id, category, dek)
            .map_err(|e| VaultError::Internal(e.to_string()))?;
        Ok(StoredDek {
            kek_version: w.kek_version,
            sealed: w.sealed,
            created_ms: now_ms().max(self.dek_floor.load(std::sync::atomic::Ordering::Acquire)),
            dek_generation: 1,
        })
    }

    pub(crate) fn unwrap(
        &self,
        id: &[u8],
        category: Category,
        stored: &StoredDek,
    ) -> Result<SecretKey, VaultError> {
        self.keys
            .unwrap_dek(id, category, stored.kek_version, &stored.sealed)
            .map_err(|_| VaultError::DataLoss {
                record_id: uuid_string(id),
                part: format!("data key of category {category}"),
            })
    }

    /// The sealing key of `category` in this write: the record's DEK of that category,
    /// unwrapped once, or a fresh DEK wrapped into the header when the category is new.
    fn sealer<'a>(
        &self,
        sealers: &'a mut BTreeMap<Category, SealingKey>,
        body: &mut RecordBody,
        category: Category,
    ) -> Result<&'a SealingKey, VaultError> {
        match sealers.entry(category) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                let (dek, generation) = match body.deks.get(category.as_str()) {
                    // A data key under an older KEK version is re-wrapped under the active one
                    // as the record is written anyway: a write never depends on a version
                    // that may be retiring (see `expect_keks`).
                    Some(stored)
                        if self.keys.active_version(category) != Some(stored.kek_version) =>
                    {
                        let dek = self.unwrap(&body.id, category, stored)?;
                        let mut wrapped = self.wrap(&body.id, category, &dek)?;
                        // The same data key, as old as before: a re-key still replaces it.
                        wrapped.created_ms = stored.created_ms;
                        wrapped.dek_generation = stored.dek_generation;
                        let generation = stored.generation();
                        body.deks.insert(category.as_str().into(), wrapped);
                        (dek, generation)
                    }
                    Some(stored) => (
                        self.unwrap(&body.id, category, stored)?,
                        stored.generation(),
                    ),
                    None => {
                        let dek = SecretKey::generate()?;
                        let wrapped = self.wrap(&body.id, category, &dek)?;
                        body.deks.insert(category.as_str().into(), wrapped);
                        (dek, 1)
                    }
                };
                // Field envelopes carry the data key's generation as their key version.
                Ok(e.insert(SealingKey::new(&dek, generation)))
            }
        }
    }

    /// Refuses a request whose purpose is missing or not one the caller's role may use. A
    /// purpose the policy defines is named as it is (review 24: `Vacatures@Web` read
    /// `<not a name: not shown>`); anything else only if it has a name's shape.
    fn check_purpose(&self, caller: &Caller, purpose: &str) -> Result<(), VaultError> {
        if purpose.is_empty() {
            return Err(VaultError::invalid(
                "purpose",
                "is required: name the purpose of this request",
            ));
        }
        if !caller.role.may_use(purpose) {
            let shown = if self.policy.purpose(purpose).is_some() {
                purpose.to_string()
            } else {
                printable_name(purpose)
            };
            return Err(VaultError::PermissionDenied(format!(
                "purpose `{shown}` is not allowed for role `{}`",
                caller.role.name
            )));
        }
        Ok(())
    }

    fn write_field(
        &self,
        batch: &mut Batch,
        sealer: &SealingKey,
        id: &[u8],
        def: &FieldDef,
        value: &mut Parsed,
        revision: u64,
    ) -> Result<FieldEntry, VaultError> {
        // In place the first time; a retry after a conflict opens the first attempt's
        // envelopes and seals them again (its data key or record id may differ).
        let sealed = value.plaintext.seal(sealer, id, &def.name)?;
        let (size, digest) = (sealed.size, sealed.digest);
        let placed = place_chunks(batch, id, &def.name, revision, sealed, (0, false));
        let index_tag = match &value.index_form {
            Some(form) => {
                let tag = crypto::hmac_sha256(&self.keys.index_key(&def.name), &[form.as_bytes()]);
                batch.put(
                    Keyspace::Index,
                    record::index_key(&def.name, &tag, id),
                    Vec::new(),
                );
                tag.to_vec()
            }
            None => Vec::new(),
        };
        let mut entry = FieldEntry {
            category: def.category.as_str().into(),
            revision,
            size: size as u64,
            digest: digest.to_vec(),
            content_type: value.content_type.clone().unwrap_or_default(),
            index_tag,
            written_ms: now_ms(),
            ..FieldEntry::default()
        };
        placed.record_in(&mut entry);
        Ok(entry)
    }

    fn delete_field(&self, batch: &mut Batch, id: &[u8], name: &str, entry: &FieldEntry) {
        let (stored_chunks, manifest) = entry.stored();
        for i in 0..stored_chunks {
            batch.delete(
                Keyspace::Fields,
                record::chunk_key(id, name, entry.revision, i),
            );
        }
        if manifest {
            batch.delete(
                Keyspace::Fields,
                record::manifest_key(id, name, entry.revision),
            );
        }
        if !entry.index_tag.is_empty() {
            batch.delete(
                Keyspace::Index,
                record::index_key(name, &entry.index_tag, id),
            );
        }
    }

    pub(crate) async fn load(&self, id: Uuid) -> Result<(Vec<u8>, RecordBody), VaultError> {
        let raw = self
            .store
            .get(Keyspace::Records, id.as_bytes())
            .await?
            .ok_or_else(|| VaultError::NotFound(id.to_string()))?;
        let (kv, key) = self.keys.integrity_key();
        let body = RecordBody::open(id.as_bytes(), &raw, kv, key).map_err(|_| header_loss(id))?;
        // A KEK version this ring has not seen was made by another instance sharing the store
        // (or an offline tool): pick up the store's key ring once.
        let unknown = body.deks.iter().any(|(name, dek)| {
            Category::parse(name).is_some_and(|c| !self.keys.holds(c, dek.kek_version))
        });
        if unknown {
            self.keys
                .reload(&self.store)
                .await
                .map_err(|e| VaultError::Internal(format!("reloading the key ring: {e}")))?;
        }
        Ok((raw, body))
    }

    /// Seals the privacy officer's reason `text` as note `name` of record `id`.
    fn seal_note(&self, id: &[u8], name: &str, text: &str) -> Result<Vec<u8>, VaultError> {
        crypto::seal(
            self.keys.notes_key(),
            1,
            &record::note_context(id, name),
            text.as_bytes(),
        )
        .map_err(|e| VaultError::Internal(format!("sealing the {name}: {e}")))
    }

    /// Seals the plaintext reasons of a header written before reasons were sealed (tags 11
    /// and 13), so that every header this vault writes holds them sealed only.
    fn seal_legacy_notes(&self, body: &mut RecordBody) -> Result<(), VaultError> {
        if !body.restriction_reason.is_empty() {
            if body.restriction_reason_sealed.is_empty() {
                body.restriction_reason_sealed =
                    self.seal_note(&body.id, "restriction_reason", &body.restriction_reason)?;
            }
            body.restriction_reason.clear();
        }
        if !body.legal_hold_reason.is_empty() {
            if body.legal_hold_reason_sealed.is_empty() {
                body.legal_hold_reason_sealed =
                    self.seal_note(&body.id, "legal_hold_reason", &body.legal_hold_reason)?;
            }
            body.legal_hold_reason.clear();
        }
        Ok(())
    }

    /// The reason kept as note `name` of `body`: `sealed` opened, or the plaintext `legacy` of
    /// a header written before reasons were sealed; empty when there is none.
    fn open_note(
        &self,
        body: &RecordBody,
        name: &str,
        sealed: &[u8],
        legacy: &str,
    ) -> Result<Zeroizing<String>, VaultError> {
        if sealed.is_empty() {
            return Ok(Zeroizing::new(legacy.to_owned()));
        }
        let loss = || VaultError::DataLoss {
            record_id: uuid_string(&body.id),
            part: format!("record header ({name})"),
        };
        let mut text = crypto::open(
            self.keys.notes_key(),
            &record::note_context(&body.id, name),
            sealed,
        )
        .map_err(|_| loss())?;
        // Move the bytes into the string (no copy); invalid UTF-8 is zeroized on drop.
        let text = String::from_utf8(std::mem::take(&mut *text)).map_err(|e| {
            drop(Zeroizing::new(e.into_bytes()));
            loss()
        })?;
        Ok(Zeroizing::new(text))
    }

    /// Whether `caller` gets field `def` at all: in full, or masked (blobs are never returned
    /// masked, so a role that sees a blob only masked does not get it).
    fn visible(&self, caller: &Caller, def: &FieldDef) -> bool {
        visible_as(caller, def.category, def)
    }

    /// [`Vault::visible`] for a stored field whose entry says it is sealed under `stored`: the
    /// role must also be allowed the category whose data key opens it. They differ only when
    /// the schema moved a field that has stored data to another category; the data key that
    /// would be opened is still the old category's.
    fn entry_visible(
        &self,
        caller: &Caller,
        def: &FieldDef,
        stored: Category,
        entry: &FieldEntry,
    ) -> bool {
        self.visible(caller, def)
            && (stored == def.category || visible_as(caller, stored, def))
            && !masked_blob(caller, def, stored, entry)
    }

    /// Opens the selected fields (`wanted`, or every visible one when empty); with `masking`,
    /// fields the role sees only masked are returned masked, and named in `masked` (without
    /// `masking`, none is).
    async fn read_fields(
        &self,
        caller: &Caller,
        id: &[u8],
        body: &RecordBody,
        wanted: &BTreeSet<&str>,
        masking: bool,
    ) -> Result<Opened, VaultError> {
        let mut selected = Vec::new();
        for (name, entry) in &body.fields {
            let Some(category) = Category::parse(&entry.category) else {
                return Err(VaultError::DataLoss {
                    record_id: uuid_string(id),
                    part: format!("field {name} (unknown category)"),
                });
            };
            let asked = if wanted.is_empty() {
                self.schema
                    .field(name)
                    .is_some_and(|d| self.entry_visible(caller, d, category, entry))
            } else if wanted.contains(name.as_str()) {
                // Named fields were checked against the schema; the data key opened is the
                // stored category's. (An export, the one unmasked read, applies no read right
                // to any field: the export right covers the whole record.)
                if let Some(denied) = self.schema.field(name).filter(|_| masking).and_then(|d| {
                    moved_out_of_reach(caller, "read", d, entry).or_else(|| {
                        masked_blob(caller, d, category, entry).then(|| {
                            VaultError::PermissionDenied(format!(
                                "role `{}` sees field `{}` only masked, and its stored value is a blob, which is never returned masked",
                                caller.role.name, d.name
                            ))
                        })
                    })
                }) {
                    return Err(denied);
                }
                true
            } else {
                false
            };
            if asked {
                selected.push((name, entry, category));
            }
        }
        // One opening key (AES key schedule) per category, not per field.
        let mut openers: BTreeMap<Category, crypto::OpeningKey> = BTreeMap::new();
        let mut out = Vec::with_capacity(selected.len());
        let mut masked = Vec::new();
        for (name, entry, category) in selected {
            let opener = match openers.entry(category) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let stored =
                        body.deks
                            .get(category.as_str())
                            .ok_or_else(|| VaultError::DataLoss {
                                record_id: uuid_string(id),
                                part: format!("data key of category {category} (missing)"),
                            })?;
                    e.insert(crypto::OpeningKey::new(&self.unwrap(id, category, stored)?))
                }
            };
            let mut plaintext = self.read_field(id, name, entry, opener).await?;
            let value = if entry.content_type.is_empty() {
                // Move the bytes into the string (no copy); invalid UTF-8 is zeroized on drop.
                let text = String::from_utf8(std::mem::take(&mut *plaintext)).map_err(|e| {
                    drop(Zeroizing::new(e.into_bytes()));
                    field_loss(id, name)
                })?;
                let text = Zeroizing::new(text);
                match self.schema.field(name) {
                    // Masked if either category masks it: the stored one (whose key opened
                    // it) or the one the schema gives it now (they differ after a move).
                    Some(def)
                        if masking
                            && (caller.role.masks(category, name)
                                || caller.role.masks(def.category, name)) =>
                    {
                        masked.push(name.clone());
                        // Part of a value of the field's type; a value of another type (stored
                        // before the schema changed it) hidden whole.
                        Value::Text(Zeroizing::new(def.kind.mask_stored(&text)))
                    }
                    _ => Value::Text(text),
                }
            } else {
                Value::Blob {
                    bytes: plaintext,
                    content_type: entry.content_type.clone(),
                }
            };
            out.push((name.clone(), value));
        }
        Ok(Opened {
            fields: out,
            masked,
        })
    }

    pub(crate) async fn read_field(
        &self,
        id: &[u8],
        name: &str,
        entry: &FieldEntry,
        opener: &crypto::OpeningKey,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let size = usize::try_from(entry.size).map_err(|_| field_loss(id, name))?;
        if entry.detached {
            return self.read_detached(id, name, entry, opener, size).await;
        }
        let mut digest = record::FieldDigest::new();
        // Room for the last chunk's tag too, so `out` never reallocates (see `open_append`).
        let mut out = Zeroizing::new(Vec::with_capacity(size + crypto::TAG_LEN));
        for i in 0..entry.chunks {
            let stored;
            let sealed: &[u8] = if entry.in_header {
                if entry.chunks != 1 || entry.inline.is_empty() {
                    return Err(field_loss(id, name));
                }
                &entry.inline
            } else {
                let key = record::chunk_key(id, name, entry.revision, i);
                stored = self
                    .store
                    .get(Keyspace::Fields, &key)
                    .await?
                    .ok_or_else(|| field_loss(id, name))?;
                &stored
            };
            digest.add(sealed).map_err(|_| field_loss(id, name))?;
            if out.len() + sealed.len().saturating_sub(crypto::OVERHEAD) > size {
                return Err(field_loss(id, name));
            }
            let ctx = record::chunk_context(id, name, i, entry.chunks);
            opener
                .open_append(&ctx, sealed, &mut out)
                .map_err(|_| field_loss(id, name))?;
        }
        if !crypto::ct_eq(&digest.finish(), &entry.digest) || out.len() != size {
            return Err(field_loss(id, name));
        }
        Ok(out)
    }
}

impl<S: Store> Vault<S> {
    /// [`Vault::read_field`] for a value sealed detached: its manifest is checked against the
    /// header's digest before any chunk is read, then each chunk is opened with its nonce and
    /// tag from the manifest. Anything missing, misplaced or altered is loss of this field.
    async fn read_detached(
        &self,
        id: &[u8],
        name: &str,
        entry: &FieldEntry,
        opener: &crypto::OpeningKey,
        size: usize,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let loss = || field_loss(id, name);
        let count = usize::try_from(entry.chunks).map_err(|_| loss())?;
        if entry.in_header || count == 0 || entry.chunks == record::MANIFEST_CHUNK {
            return Err(loss());
        }
        let manifest = self
            .store
            .get(
                Keyspace::Fields,
                &record::manifest_key(id, name, entry.revision),
            )
            .await?
            .ok_or_else(loss)?;
        crypto::EnvelopeHeader::parse_manifest(&manifest).map_err(|_| loss())?;
        if manifest.len() != crypto::HEADER_LEN + count * crypto::SEAL_LEN
            || !crypto::ct_eq(&record::manifest_digest(&manifest), &entry.digest)
        {
            return Err(loss());
        }
        let mut out = Zeroizing::new(Vec::with_capacity(size));
        for i in 0..entry.chunks {
            let key = record::chunk_key(id, name, entry.revision, i);
            let chunk = self
                .store
                .get(Keyspace::Fields, &key)
                .await?
                .ok_or_else(loss)?;
            if out.len() + chunk.len() > size {
                return Err(loss());
            }
            let ctx = record::chunk_context(id, name, i, entry.chunks);
            let at = usize::try_from(i).map_err(|_| loss())?;
            opener
                .open_detached_append(&manifest, at, &ctx, &chunk, &mut out)
                .map_err(|_| loss())?;
        }
        if out.len() != size {
            return Err(loss());
        }
        Ok(out)
    }
}

/// Where [`place_chunks`] put a field's value.
pub(crate) struct Placed {
    /// Number of chunks.
    pub chunks: u32,
    /// The envelope kept in the header (empty when the chunks are stored).
    pub inline: Vec<u8>,
    /// The value is sealed detached, with a manifest ([`record::manifest_key`]).
    pub detached: bool,
}

impl Placed {
    /// Sets where the value is in its header entry.
    pub fn record_in(self, entry: &mut FieldEntry) {
        entry.chunks = self.chunks;
        entry.in_header = !self.inline.is_empty();
        entry.inline = self.inline;
        entry.detached = self.detached;
    }
}

/// Puts a sealed field value into `batch` under `revision`: an envelope (a short value, at
/// most [`record::INLINE_MAX`] bytes sealed) stays for the header; detached chunks and their manifest go to the `fields`
/// keyspace (the chunks as views of the sealed buffer). `stored_before` is what the same
/// revision held before ([`FieldEntry::stored`], e.g. for a re-key; `(0, false)` for a new
/// revision): chunks past the new count, and a manifest the new value has no use for, are
/// deleted.
pub(crate) fn place_chunks(
    batch: &mut Batch,
    id: &[u8],
    name: &str,
    revision: u64,
    sealed: record::SealedField,
    stored_before: (u32, bool),
) -> Placed {
    let (chunks_before, manifest_before) = stored_before;
    let count = u32::try_from(sealed.chunk_count()).expect("values are far below 2^32 chunks");
    let delete_from = |batch: &mut Batch, first: u32| {
        for i in first..chunks_before {
            batch.delete(Keyspace::Fields, record::chunk_key(id, name, revision, i));
        }
    };
    match sealed.value {
        // At most `record::ENVELOPE_MAX` bytes sealed: the envelope fits the header.
        record::SealedValue::Envelope(envelope) => {
            debug_assert!(
                envelope.len() <= record::INLINE_MAX,
                "an envelope fits the header"
            );
            delete_from(batch, 0);
            if manifest_before {
                batch.delete(Keyspace::Fields, record::manifest_key(id, name, revision));
            }
            Placed {
                chunks: 1,
                inline: envelope,
                detached: false,
            }
        }
        record::SealedValue::Detached(detached) => {
            delete_from(batch, count);
            for (i, chunk) in record::detached_chunks(&detached).into_iter().enumerate() {
                let i = u32::try_from(i).expect("chunk index below chunk count");
                batch.put(
                    Keyspace::Fields,
                    record::chunk_key(id, name, revision, i),
                    chunk,
                );
            }
            batch.put(
                Keyspace::Fields,
                record::manifest_key(id, name, revision),
                detached.manifest,
            );
            Placed {
                chunks: count,
                inline: Vec::new(),
                detached: true,
            }
        }
    }
}

/// A write that seals with a category's DEK expects the KEK wrapping it to be the active
/// version ([`crate::keys::active_kek_key`]): so a version being retired (never the active
/// one; checked unused, then destroyed) cannot gain a record meanwhile, and a write whose key
/// ring was read before a rotation (here or in another instance) cannot put a data key under
/// the old version behind a rewrap's cursor. Such a write conflicts and is retried under the
/// active version. (A rewrap pass that met no conflict and no rotation therefore leaves
/// nothing behind, see `rotation::run`.)
pub(crate) fn expect_keks<'a>(
    batch: &mut Batch,
    body: &RecordBody,
    categories: impl Iterator<Item = &'a Category>,
) {
    for category in categories {
        if let Some(dek) = body.deks.get(category.as_str()) {
            batch.expect(
                Keyspace::Meta,
                crate::keys::active_kek_key(*category),
                Expect::Value(crate::keys::active_kek_value(dek.kek_version)),
            );
        }
    }
}

/// Unix milliseconds as RFC 3339 (UTC, milliseconds); empty if out of range.
fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// A privacy officer's reason (restriction, legal hold, erasure): at most
/// [`MAX_REASON_CHARS`] characters of one line, without control or invisible format
/// characters (they would hide what a reader of the export or the log sees).
fn check_reason(reason: &str) -> Result<(), VaultError> {
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(VaultError::invalid(
            "reason",
            format!("at most {MAX_REASON_CHARS} characters"),
        ));
    }
    if reason.chars().any(|c| {
        c.is_control() || crate::schema::is_format_char(c) || matches!(c, '\u{2028}' | '\u{2029}')
    }) {
        return Err(VaultError::invalid(
            "reason",
            "must be one line (no line or paragraph separators) without control characters or invisible format characters (Unicode category Cf or Default_Ignorable_Code_Point: zero-width characters, bidi controls, fillers)",
        ));
    }
    Ok(())
}

/// Whether a stored field entry is a blob that `caller` may see only masked (in the category
/// it is sealed under, or the one the schema gives it now): blobs are never returned masked,
/// so it is withheld, whatever type the schema gives the field now (review 22: a blob field
/// retyped as text was returned whole to a role that sees it masked).
fn masked_blob(caller: &Caller, def: &FieldDef, stored: Category, entry: &FieldEntry) -> bool {
    !entry.content_type.is_empty()
        && (caller.role.masks(stored, &def.name) || caller.role.masks(def.category, &def.name))
}

/// Whether `caller` gets field `def` if it were in `category` (see [`Vault::visible`]).
fn visible_as(caller: &Caller, category: Category, def: &FieldDef) -> bool {
    // Masking narrows the read right and grants nothing (review 30).
    caller.role.may_read(category)
        && !(caller.role.masks(category, &def.name) && def.kind.is_blob())
}

/// The category a stored field entry is sealed under (its data key's), if it differs from
/// the one the schema gives the field now and the caller may not `action` (read, search or
/// write) fields of it: read as [`Vault::visible`] (masked will do), search and write with
/// the full right, as for an unmoved field. `None` when the entry's category is unknown
/// (the reader reports damage).
fn moved_out_of_reach(
    caller: &Caller,
    action: &str,
    def: &FieldDef,
    entry: &FieldEntry,
) -> Option<VaultError> {
    let stored = Category::parse(&entry.category)?;
    let allowed = match action {
        "read" => visible_as(caller, stored, def),
        "search" => caller.role.may_search(stored, &def.name),
        _ => caller.role.may_write(stored),
    };
    (stored != def.category && !allowed).then(|| {
        VaultError::PermissionDenied(format!(
            "role `{}` may not {action} field `{}`: its stored value is sealed under category {stored} (the schema now puts it in {}), which the role may not {action}",
            caller.role.name, def.name, def.category
        ))
    })
}

fn denied_field(caller: &Caller, action: &str, def: &FieldDef) -> VaultError {
    VaultError::PermissionDenied(format!(
        "role `{}` may not {action} field `{}` (category {})",
        caller.role.name, def.name, def.category
    ))
}

fn value_error(field: &str, e: ValueError) -> VaultError {
    match e {
        ValueError::Invalid(rule) => VaultError::invalid(field, rule),
        ValueError::TooLarge(rule) => VaultError::TooLarge {
            field: field.into(),
            rule,
        },
    }
}

/// `names` in name order: a request's names are checked in this order, so that a request naming
/// several bad fields is refused for the same one whatever order they came in.
fn sorted<'a>(names: &[&'a str]) -> Vec<&'a str> {
    let mut names = names.to_vec();
    names.sort_unstable();
    names
}

fn parse_record_id(text: &str) -> Result<Uuid, VaultError> {
    if text.is_empty() {
        return Err(VaultError::invalid("record_id", "is required"));
    }
    Uuid::try_parse(text).map_err(|_| VaultError::invalid("record_id", "must be a UUID"))
}

fn meta_of(id: Uuid, body: &RecordBody) -> RecordMeta {
    RecordMeta {
        id,
        revision: body.revision,
        created_ms: body.created_ms,
        updated_ms: body.updated_ms,
        lifecycle: body.lifecycle.clone(),
        lifecycle_date: record::canonical_date(&body.lifecycle_date),
        restricted: body.restricted,
        legal_hold: body.legal_hold,
        consents: body
            .consents
            .iter()
            .map(|(p, c)| (p.clone(), c.granted, c.changed_ms))
            .collect(),
        categories: body.deks.keys().cloned().collect(),
    }
}

pub(crate) fn uuid_string(id: &[u8]) -> String {
    Uuid::from_slice(id).map_or_else(|_| hex::encode(id), |u| u.to_string())
}

/// Whether `e` is a successful `GetRecord` by someone other than `except` that returned one
/// of `fields` (name → write time) at or after its write time.
fn read_one_of(e: &audit::Event, fields: &BTreeMap<String, i64>, except: &str) -> bool {
    e.draft.action == "GetRecord"
        && e.draft.outcome == audit::Outcome::Ok.as_str()
        && e.draft.principal != except
        && e.draft
            .field_names
            .iter()
            .any(|n| fields.get(n).is_some_and(|written| e.time_ms >= *written))
}

pub(crate) fn header_loss(id: Uuid) -> VaultError {
    VaultError::DataLoss {
        record_id: id.to_string(),
        part: "record header".into(),
    }
}

pub(crate) fn field_loss(id: &[u8], name: &str) -> VaultError {
    VaultError::DataLoss {
        record_id: uuid_string(id),
        part: format!("field {name}"),
    }
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Serialising an export without copying field values out of their zeroizing buffers.
mod export {
    use serde::ser::{Serialize, SerializeMap, Serializer};

    use super::Value;

    /// The field values of an export: `{"name": {"text": …}}` or
    /// `{"name": {"blob_base64": …, "content_type": …}}`, borrowed.
    pub(super) struct Fields<'a> {
        pub(super) values: &'a [(String, Value)],
        /// Base64 of each blob, in the order of `values` (empty for text).
        pub(super) encoded: &'a [zeroize::Zeroizing<String>],
    }

    impl Fields<'_> {
        /// An upper bound of their pretty-printed JSON size: JSON escapes a character in at
        /// most 6 bytes, and each entry's keys, quotes and indentation take well under 128.
        pub(super) fn bound(&self) -> usize {
            self.values
                .iter()
                .zip(self.encoded)
                .map(|((name, value), b64)| {
                    let payload = match value {
                        Value::Text(t) => t.len().saturating_mul(6),
                        Value::Blob { content_type, .. } => b64
                            .len()
                            .saturating_add(content_type.len().saturating_mul(6)),
                    };
                    payload
                        .saturating_add(name.len().saturating_mul(6))
                        .saturating_add(128)
                })
                .fold(16, usize::saturating_add)
        }
    }

    struct Text<'a> {
        text: &'a str,
    }

    impl Serialize for Text<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut map = s.serialize_map(Some(1))?;
            map.serialize_entry("text", self.text)?;
            map.end()
        }
    }

    struct Blob<'a> {
        base64: &'a str,
        content_type: &'a str,
    }

    impl Serialize for Blob<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut map = s.serialize_map(Some(2))?;
            map.serialize_entry("blob_base64", self.base64)?;
            map.serialize_entry("content_type", self.content_type)?;
            map.end()
        }
    }

    impl Serialize for Fields<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut map = s.serialize_map(Some(self.values.len()))?;
            for ((name, value), b64) in self.values.iter().zip(self.encoded) {
                match value {
                    Value::Text(t) => map.serialize_entry(name, &Text { text: t.as_str() })?,
                    Value::Blob { content_type, .. } => map.serialize_entry(
                        name,
                        &Blob {
                            base64: b64.as_str(),
                            content_type,
                        },
                    )?,
                }
            }
            map.end()
        }
    }

    /// The document: the metadata's entries, `fields` and the `notes` (text entries that
    /// hold plaintext, borrowed), keys sorted.
    pub(super) struct Document<'a> {
        pub(super) meta: &'a serde_json::Map<String, serde_json::Value>,
        pub(super) fields: Fields<'a>,
        pub(super) notes: &'a [(&'static str, &'a str)],
    }

    /// One top-level entry of a [`Document`].
    enum Entry<'a> {
        Meta(&'a serde_json::Value),
        Fields,
        Note(&'a str),
    }

    /// Bytes of pretty-printed indentation at `depth`.
    const INDENT: usize = 2;

    /// An upper bound of a JSON string's encoded size: quotes, and at most 6 bytes for each
    /// byte (`\u00XX`).
    fn string_bound(s: &str) -> usize {
        s.len().saturating_mul(6).saturating_add(2)
    }

    /// An upper bound of an entry's or element's framing at `depth`: the newline, the
    /// indentation and the comma (and for an entry, the key's bound and `": "`).
    fn item_bound(depth: usize, key: Option<&str>) -> usize {
        depth
            .saturating_mul(INDENT)
            .saturating_add(2)
            .saturating_add(key.map_or(0, |k| string_bound(k).saturating_add(2)))
    }

    /// An upper bound of `value`'s pretty-printed size, written at `depth`.
    fn value_bound(value: &serde_json::Value, depth: usize) -> usize {
        use serde_json::Value as V;
        // The brackets, the last newline and the closing bracket's indentation.
        let container = || depth.saturating_mul(INDENT).saturating_add(3);
        match value {
            V::Null | V::Bool(_) => 5,
            // An i64, u64 or f64 (ryu) takes at most 24 characters.
            V::Number(_) => 32,
            V::String(s) => string_bound(s),
            V::Array(items) => items
                .iter()
                .map(|v| item_bound(depth + 1, None).saturating_add(value_bound(v, depth + 1)))
                .fold(container(), usize::saturating_add),
            V::Object(map) => map
                .iter()
                .map(|(k, v)| {
                    item_bound(depth + 1, Some(k)).saturating_add(value_bound(v, depth + 1))
                })
                .fold(container(), usize::saturating_add),
        }
    }

    impl Document<'_> {
        /// The top-level entries, in key order.
        fn entries(&self) -> Vec<(&str, Entry<'_>)> {
            let mut entries: Vec<(&str, Entry<'_>)> = self
                .meta
                .iter()
                .map(|(k, v)| (k.as_str(), Entry::Meta(v)))
                .chain(std::iter::once(("fields", Entry::Fields)))
                .chain(self.notes.iter().map(|&(k, t)| (k, Entry::Note(t))))
                .collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            entries
        }

        /// An upper bound of its pretty-printed JSON size.
        pub(super) fn bound(&self) -> usize {
            self.entries()
                .iter()
                .map(|(key, entry)| {
                    item_bound(1, Some(key)).saturating_add(match entry {
                        Entry::Meta(v) => value_bound(v, 1),
                        Entry::Fields => self.fields.bound(),
                        Entry::Note(t) => string_bound(t),
                    })
                })
                // `{`, the last newline and `}`.
                .fold(3, usize::saturating_add)
        }
    }

    impl Serialize for Document<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let entries = self.entries();
            let mut map = s.serialize_map(Some(entries.len()))?;
            for (key, entry) in entries {
                match entry {
                    Entry::Meta(value) => map.serialize_entry(key, value)?,
                    Entry::Fields => map.serialize_entry(key, &self.fields)?,
                    Entry::Note(text) => map.serialize_entry(key, text)?,
                }
            }
            map.end()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;
    use crate::keys::{KeyRing, MasterKey};
    use crate::store::SledStore;

    #[test]
    fn an_export_document_is_written_in_place_with_its_keys_sorted() {
        let values = vec![
            (
                "full_name".to_string(),
                Value::Text(Zeroizing::new("Jan \"de\" Vries\u{1}é".to_string())),
            ),
            (
                "photo".to_string(),
                Value::Blob {
                    bytes: Zeroizing::new(vec![0xff; 100]),
                    content_type: "image/png".into(),
                },
            ),
        ];
        let encoded = vec![
            Zeroizing::new(String::new()),
            Zeroizing::new(base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                [0xffu8; 100],
            )),
        ];
        let meta = serde_json::json!({"access_history": [], "format": "x", "version": 1});
        let serde_json::Value::Object(meta) = meta else {
            panic!("object");
        };
        let fields = export::Fields {
            values: &values,
            encoded: &encoded,
        };
        let bound = fields.bound();
        let doc = export::Document {
            meta: &meta,
            fields,
            notes: &[],
        };
        let text = serde_json::to_string_pretty(&doc).expect("encodes");
        let fields_json = serde_json::to_string_pretty(&doc.fields).expect("encodes");
        assert!(
            fields_json.len() <= bound,
            "{} > {bound}",
            fields_json.len()
        );
        let back: serde_json::Value = serde_json::from_str(&text).expect("parses");
        assert_eq!(
            back["fields"]["full_name"]["text"],
            "Jan \"de\" Vries\u{1}é"
        );
        assert_eq!(back["fields"]["photo"]["content_type"], "image/png");
        assert_eq!(back["fields"]["photo"]["blob_base64"], encoded[1].as_str());
        let keys: Vec<&str> = back
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["access_history", "fields", "format", "version"]);
        let at = |k: &str| text.find(&format!("\"{k}\"")).expect("key");
        assert!(at("access_history") < at("fields") && at("fields") < at("format"));
    }

    #[test]
    fn an_export_document_places_its_notes_by_key_within_its_bound() {
        let values = vec![(
            "full_name".to_string(),
            Value::Text(Zeroizing::new("Jan\n\u{7}".to_string())),
        )];
        let encoded = vec![Zeroizing::new(String::new())];
        let meta = serde_json::json!({
            "access_history": [{"seq": 1, "fields": ["a", "b"], "outcome": "ok"}, {}],
            "consents": [],
            "lifecycle": {"stage": "applicant", "date": "2026-11-26"},
            "restricted": true,
            "revision": u64::MAX,
            "version": -1.5e-300,
            "x": null,
        });
        let serde_json::Value::Object(meta) = meta else {
            panic!("object");
        };
        for notes in [
            &[][..],
            &[("restriction_reason", "Lawsuit \"Jansen\"\u{1}\u{2}\u{3}")][..],
            &[("restriction_reason", ""), ("legal_hold_reason", "\u{0}é")][..],
        ] {
            let doc = export::Document {
                meta: &meta,
                fields: export::Fields {
                    values: &values,
                    encoded: &encoded,
                },
                notes,
            };
            let text = serde_json::to_string_pretty(&doc).expect("encodes");
            assert!(
                text.len() <= doc.bound(),
                "{} > {}",
                text.len(),
                doc.bound()
            );
            let back: serde_json::Value = serde_json::from_str(&text).expect("parses");
            let keys: Vec<&str> = back
                .as_object()
                .expect("object")
                .keys()
                .map(String::as_str)
                .collect();
            let mut sorted = keys.clone();
            sorted.sort_unstable();
            assert_eq!(keys.len(), meta.len() + 1 + notes.len());
            for (key, text) in notes {
                assert_eq!(back[key], *text);
            }
            // Written in key order, as serde_json writes a map.
            let at = |k: &str| text.find(&format!("\n  \"{k}\"")).expect("key");
            assert!(sorted.windows(2).all(|w| at(w[0]) < at(w[1])), "{text}");
        }
    }

    /// [`check_lifecycle_step`] with the default consent purpose, its error as text.
    fn lifecycle_step(id: Uuid, body: &RecordBody, stage: &str, date: &str) -> Result<(), String> {
        let day = crate::record::parse_request_day(date).expect("a test date");
        check_lifecycle_step(
            id,
            body,
            stage,
            day,
            &retention::RetentionRules::default(),
            chrono::Utc::now().date_naive(),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_closed_procedure_reopens_once_and_not_against_a_withdrawn_consent() {
        let id = Uuid::new_v4();
        let step =
            |body: &RecordBody, stage: &str, date: &str| lifecycle_step(id, body, stage, date);
        let consent = |granted| crate::record::ConsentEntry {
            granted,
            changed_ms: 1,
        };
        let mut body = RecordBody {
            lifecycle: "procedure_closed".into(),
            lifecycle_date: "2026-11-20".into(),
            ..RecordBody::default()
        };
        step(&body, "applicant", "2026-11-26").expect("reopened");
        // An objection to another purpose stays in force in the open procedure: no bar.
        body.consents
            .insert("personal_offers".into(), consent(false));
        step(&body, "applicant", "2026-11-26").expect("objection elsewhere");
        body.consents.insert("talent_pool".into(), consent(true));
        step(&body, "applicant", "2026-11-26").expect("consent given");
        body.consents.insert("talent_pool".into(), consent(false));
        let err = step(&body, "applicant", "2026-11-26").expect_err("withdrawn");
        assert!(
            err.starts_with("stage:")
                && err.contains("`talent_pool`")
                && !err.contains("SetConsent"),
            "{err}"
        );
        // Reopened once already: never again, whatever the consents say.
        body.consents.clear();
        body.reopened = true;
        let err = step(&body, "applicant", "2026-11-26").expect_err("second reopening");
        assert!(err.contains("reopened once already"), "{err}");
        // Hiring is not a reopening; closing again may only move the close date earlier
        // (a later one would restart the retention clock).
        step(&body, "employed", "2026-11-26").expect("hired");
        step(&body, "procedure_closed", "2026-11-20").expect("same date");
        step(&body, "procedure_closed", "2026-11-10").expect("earlier");
        let err = step(&body, "procedure_closed", "2026-11-26").expect_err("later");
        assert!(
            err.starts_with("date:") && err.contains("2026-11-20"),
            "{err}"
        );
    }

    #[test]
    fn a_hire_after_a_closed_procedure_that_fell_through_restarts_its_clock_once() {
        let id = Uuid::new_v4();
        let step =
            |body: &RecordBody, stage: &str, date: &str| lifecycle_step(id, body, stage, date);
        let day = |days: i64| {
            (chrono::Utc::now().date_naive() + chrono::Duration::days(days))
                .format("%Y-%m-%d")
                .to_string()
        };
        // Closed 20 days ago, then hired to begin in 8 days (its data's due date).
        let mut hired = RecordBody {
            lifecycle: "employed".into(),
            lifecycle_date: day(8),
            closed_on: day(-20),
            ..RecordBody::default()
        };
        // The hire falls through: the procedure closes again today, a new clock (once).
        step(&hired, "procedure_closed", &day(0)).expect("the first fall-through");
        // Reopened (or resumed) once already: the close keeps the earlier date, or moves
        // earlier (review 30: the loop renewed the 28 days with no end).
        hired.reopened = true;
        let err = step(&hired, "procedure_closed", &day(0)).expect_err("a second restart");
        assert!(
            err.starts_with("date:")
                && err.contains(&format!("closed on {}", day(-20)))
                && err.contains("CreateRecord"),
            "{err}"
        );
        step(&hired, "procedure_closed", &day(-20)).expect("the earlier close date");
        step(&hired, "procedure_closed", &day(-25)).expect("earlier still");
        // A hire that followed an open procedure (no close kept) closes it as any close does.
        hired.closed_on.clear();
        step(&hired, "procedure_closed", &day(0)).expect("the close of an open procedure");
    }

    #[test]
    fn lifecycle_dates_compare_as_days_even_in_headers_with_loose_dates() {
        // Request dates: exactly YYYY-MM-DD.
        for bad in [
            " 2026-1-05",
            "+2026-1-05",
            "\t2026-1-05",
            "2026-01- 5",
            "2026-1-5",
        ] {
            assert!(crate::record::parse_request_day(bad).is_none(), "{bad:?}");
        }
        assert!(crate::record::parse_request_day("2026-02-29").is_none());
        assert!(crate::record::parse_request_day("2024-02-29").is_some());
        // A header an older build wrote with a padded date is read as that day: the rules
        // hold against it (as text, "2020-01-01" sorted after " 2026-1-05").
        let id = Uuid::new_v4();
        let step =
            |body: &RecordBody, stage: &str, date: &str| lifecycle_step(id, body, stage, date);
        let ended = RecordBody {
            lifecycle: "ended".into(),
            lifecycle_date: " 2026-1-05".into(),
            last_ended: " 2026-1-05".into(),
            ..RecordBody::default()
        };
        let err = step(&ended, "ended", "2020-01-01").expect_err("end moved earlier");
        assert!(err.contains("ended on 2026-01-05"), "{err}");
        step(&ended, "ended", "2026-01-06").expect("a later end");
        let err = step(&ended, "employed", "2025-12-31").expect_err("rehired before the end");
        assert!(err.contains("2026-01-05"), "{err}");
        let employed = RecordBody {
            lifecycle: "employed".into(),
            lifecycle_date: "+2025-6-01".into(),
            ..RecordBody::default()
        };
        let err = step(&employed, "ended", "2019-01-01").expect_err("ended before it began");
        assert!(err.contains("employed since 2025-06-01"), "{err}");
        let closed = RecordBody {
            lifecycle: "procedure_closed".into(),
            lifecycle_date: "2026-11-01".into(),
            ..RecordBody::default()
        };
        step(&closed, "procedure_closed", "2026-11-05").expect_err("a later close");
        // Answers and exports show such a date as Kluis writes it.
        assert_eq!(crate::record::canonical_date(" 2026-1-05"), "2026-01-05");
        assert_eq!(crate::record::canonical_date(""), "");
        assert_eq!(
            meta_of(id, &ended).lifecycle_date,
            "2026-01-05",
            "the answer's form"
        );
        assert_eq!(
            crate::retention::stage_date(&ended),
            chrono::NaiveDate::from_ymd_opt(2026, 1, 5).expect("a day")
        );
    }

    #[test]
    fn a_reason_is_one_visible_line() {
        check_reason("Verzoek van betrokkene, zaak 2026-113").expect("a plain reason");
        for bad in [
            "regel een\u{2028}regel twee",
            "regel een\u{2029}regel twee",
            "regel een\nregel twee",
            "zaak\u{85}",
            "zaak\u{3164}",
            "zaak\u{200B}",
        ] {
            let err = check_reason(bad).expect_err("refused").to_string();
            assert!(
                err.contains("reason") && err.contains("one line"),
                "{bad:?}: {err}"
            );
        }
        // A required reason of blank characters only is no reason (the callers' check).
        for blank in ["\u{2800}\u{2800}", " \u{00A0} "] {
            assert!(!crate::schema::has_visible_char(blank), "{blank:?}");
        }
    }

    #[test]
    fn lifecycle_dates_are_bounded() {
        let day = |s: &str| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("date");
        let today = day("2026-11-26");
        for (stage, date, ok) in [
            ("procedure_closed", "2026-11-26", true),
            ("procedure_closed", "2026-11-27", false),
            ("applicant", "2026-12-01", false),
            ("employed", "2027-11-27", true),
            ("employed", "2027-11-28", false),
            ("ended", "2027-11-27", true),
            ("ended", "9999-12-31", false),
            ("employed", "1900-01-01", true),
            ("ended", "1899-12-31", false),
        ] {
            assert_eq!(
                check_lifecycle_date(stage, day(date), today).is_ok(),
                ok,
                "{stage} {date}"
            );
        }
    }

    fn text(name: &str, v: &str) -> (String, Value) {
        (name.to_string(), Value::Text(Zeroizing::new(v.into())))
    }

    /// A record payroll created with `fields` (BSN 111222333 among them) under the default
    /// schema, and two vaults over its store: `before` with that schema, `after` with `bsn`
    /// moved from identity to cv (as an operator might edit schema.toml); the default roles
    /// plus `extra_roles` (policy TOML).
    struct MovedBsn {
        _dir: tempfile::TempDir,
        policy: crate::policy::Policy,
        before: Vault<SledStore>,
        after: Vault<SledStore>,
        id: String,
    }

    impl MovedBsn {
        async fn new(extra_roles: &str, fields: &[(&str, &str)]) -> MovedBsn {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = SledStore::open(dir.path()).expect("open");
            let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
            let policy = crate::policy::Policy::from_toml(&format!(
                "{}\n{extra_roles}",
                crate::policy::DEFAULT_POLICY_TOML
            ))
            .expect("policy");
            let keys = Arc::new(KeyRing::open(&store, &master).await.expect("keys"));
            let before = Vault::new(
                store.clone(),
                Arc::new(Schema::default_schema()),
                Arc::clone(&keys),
            );
            let moved = crate::schema::DEFAULT_SCHEMA_TOML.replace(
                "[fields.bsn]\ncategory = \"identity\"",
                "[fields.bsn]\ncategory = \"cv\"",
            );
            assert_ne!(
                moved,
                crate::schema::DEFAULT_SCHEMA_TOML,
                "the schema moved"
            );
            let after = Vault::new(
                store,
                Arc::new(Schema::from_toml(&moved).expect("moved schema")),
                keys,
            );
            let mut fixture = MovedBsn {
                _dir: dir,
                policy,
                before,
                after,
                id: String::new(),
            };
            let (id, _) = fixture
                .before
                .create(
                    &fixture.who("payroll"),
                    "payroll",
                    fields.iter().map(|(n, v)| text(n, v)).collect(),
                    &mut audit::Context::new("CreateRecord"),
                )
                .await
                .expect("create");
            fixture.id = id.to_string();
            fixture
        }

        fn who(&self, role: &str) -> Caller {
            Caller {
                principal: Arc::from(format!("t-{role}")),
                role: Arc::clone(self.policy.role(role).expect("role")),
            }
        }
    }

    /// Review 8: a search that read an index entry just before an update moved the value
    /// on is no sign of tampering; an entry still there that the header does not hold is.
    #[tokio::test]
    async fn an_index_entry_an_update_removed_meanwhile_is_gone_not_out_of_place() {
        let f = MovedBsn::new("", &[("bsn", "111222333")]).await;
        let (vault, recruiter) = (&f.before, f.who("recruiter"));
        let (id, _) = vault
            .create(
                &recruiter,
                "recruitment",
                vec![text("full_name", "Anna"), text("email", "a@example.nl")],
                &mut audit::Context::new("CreateRecord"),
            )
            .await
            .expect("create");
        let entry = || async {
            let entries = vault
                .store()
                .scan(Keyspace::Index, b"email\0", None, 10)
                .await
                .expect("scan");
            assert_eq!(entries.len(), 1, "one e-mail entry");
            let key = entries[0].0.clone();
            let tag: [u8; 32] = key[6..38].try_into().expect("32-byte tag");
            (key, tag)
        };
        let (old_key, old_tag) = entry().await;
        assert!(matches!(
            vault.check_hit(id, &old_key, "email", &old_tag).await,
            Ok(Hit::Holds(_))
        ));
        let change = Change {
            set: vec![text("email", "b@example.nl")],
            ..Change::default()
        };
        vault
            .update(
                &recruiter,
                &id.to_string(),
                "recruitment",
                change,
                &mut audit::Context::new("UpdateRecord"),
            )
            .await
            .expect("update");
        // The search read the old entry before the update: gone now, not out of place.
        assert!(matches!(
            vault.check_hit(id, &old_key, "email", &old_tag).await,
            Ok(Hit::Gone)
        ));
        let (new_key, new_tag) = entry().await;
        assert!(matches!(
            vault.check_hit(id, &new_key, "email", &new_tag).await,
            Ok(Hit::Holds(_))
        ));
        // The old entry planted back: out of place.
        let mut b = Batch::default();
        b.put(Keyspace::Index, old_key.clone(), Vec::new());
        vault.store().commit(b).await.expect("plant");
        assert!(matches!(
            vault.check_hit(id, &old_key, "email", &old_tag).await,
            Ok(Hit::OutOfPlace)
        ));
    }

    #[tokio::test]
    async fn data_past_its_maximum_period_gets_no_new_clock() {
        let f = MovedBsn::new("", &[("bsn", "111222333")]).await;
        let vault = &f.before;
        let (id, _) = vault
            .create(
                &f.who("recruiter"),
                "recruitment",
                vec![text("full_name", "Anna"), text("email", "anna@example.nl")],
                &mut audit::Context::new("CreateRecord"),
            )
            .await
            .expect("create");
        let id = id.to_string();
        let recruiter = f.who("recruiter");
        let set = |change: StateChange| {
            let recruiter = recruiter.clone();
            let id = id.clone();
            async move {
                vault
                    .set_state(
                        &recruiter,
                        &id,
                        change,
                        &mut audit::Context::new("SetState"),
                    )
                    .await
            }
        };
        let closed = (vault.today() - chrono::Days::new(60)).to_string();
        set(StateChange::Lifecycle {
            stage: "procedure_closed".into(),
            date: closed,
        })
        .await
        .expect("closed 60 days ago: 28 days past its 4 weeks");
        for change in [
            StateChange::Consent {
                purpose: "talent_pool".into(),
                granted: true,
            },
            StateChange::Lifecycle {
                stage: "applicant".into(),
                date: vault.today().to_string(),
            },
            StateChange::Lifecycle {
                stage: "procedure_closed".into(),
                date: vault.today().to_string(),
            },
        ] {
            let refused = set(change).await;
            assert!(
                matches!(&refused, Err(VaultError::FailedPrecondition(m)) if m.contains("past its maximum retention period")),
                "{refused:?}"
            );
        }
        // What keeps nothing longer is still taken.
        set(StateChange::Consent {
            purpose: "talent_pool".into(),
            granted: false,
        })
        .await
        .expect("a withdrawal");
    }

    #[tokio::test]
    async fn a_field_the_schema_moved_stays_behind_its_stored_category() {
        // The recruiter may read and write cv, where the schema now puts bsn.
        let f = MovedBsn::new("", &[("bsn", "111222333"), ("wage", "2500.00")]).await;
        let recruiter = f.who("recruiter");
        let got = f
            .after
            .get(&recruiter, &f.id, "recruitment", &[])
            .await
            .expect("read");
        assert!(
            got.fields.iter().all(|(n, _)| n != "bsn"),
            "bsn not returned"
        );
        assert!(got.withheld.contains(&"bsn".to_string()), "bsn withheld");
        let named = f
            .after
            .get(&recruiter, &f.id, "recruitment", &["bsn".into()])
            .await;
        assert!(
            matches!(&named, Err(VaultError::PermissionDenied(m)) if m.contains("identity")),
            "{named:?}"
        );
        let found = f
            .after
            .find(&recruiter, "recruitment", "bsn", "111222333")
            .await
            .expect("find");
        assert!(found.is_empty(), "the search does not reveal the record");
        let change = Change {
            clear: vec!["bsn".into()],
            ..Change::default()
        };
        let cleared = f
            .after
            .update(
                &recruiter,
                &f.id,
                "recruitment",
                change,
                &mut audit::Context::new("UpdateRecord"),
            )
            .await;
        assert!(
            matches!(cleared, Err(VaultError::PermissionDenied(_))),
            "{cleared:?}"
        );
        // Payroll still reads it (identity), and the record is unchanged.
        let got = f
            .before
            .get(&f.who("payroll"), &f.id, "payroll", &["bsn".into()])
            .await
            .expect("payroll reads");
        assert_eq!(got.revision, 1);
    }

    #[tokio::test]
    async fn a_field_seen_only_masked_is_searched_only_by_a_role_that_may_export() {
        // Review 16: the mask leaves 4 digits of a BSN, ~9 100 values to try.
        let f = MovedBsn::new(
            "[roles.clerk]\nread = [\"identity\"]\nwrite = []\npurposes = [\"payroll\"]\nmasked = [\"bsn\"]\n\n[roles.officer]\nread = [\"identity\"]\nwrite = []\npurposes = [\"payroll\"]\nmasked = [\"bsn\"]\nrecords = [\"export\"]\n",
            &[("bsn", "111222333")],
        )
        .await;
        let refused = f
            .before
            .find(&f.who("clerk"), "payroll", "bsn", "111222333")
            .await;
        match refused {
            Err(VaultError::PermissionDenied(m)) => assert!(
                m.contains("sees field `bsn` only masked and may not search it"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        // Reading it masked is still allowed; an exporting role and a full reader may search.
        let read = f
            .before
            .get(&f.who("clerk"), &f.id, "payroll", &["bsn".into()])
            .await
            .expect("masked read");
        assert_eq!(read.masked, vec!["bsn".to_string()]);
        for role in ["officer", "payroll"] {
            let found = f
                .before
                .find(&f.who(role), "payroll", "bsn", "111222333")
                .await
                .expect("find");
            assert_eq!(found.len(), 1, "{role}");
        }
    }

    #[tokio::test]
    async fn a_moved_field_is_searched_only_with_the_read_right_on_its_stored_category() {
        let f = MovedBsn::new(
            "[roles.screener]\nread = [\"cv\", \"identity\"]\nwrite = []\npurposes = [\"recruitment\"]\nmasked = [\"identity\"]\n",
            &[("bsn", "111222333")],
        )
        .await;
        // Before the move the screener (identity masked only) may not search bsn at all.
        let refused = f
            .before
            .find(&f.who("screener"), "recruitment", "bsn", "111222333")
            .await;
        assert!(
            matches!(refused, Err(VaultError::PermissionDenied(_))),
            "{refused:?}"
        );
        // After the move the record's BSN is still sealed under identity, which the screener
        // sees only masked: a search by the full value must not confirm it.
        let found = f
            .after
            .find(&f.who("screener"), "recruitment", "bsn", "111222333")
            .await
            .expect("find");
        assert!(
            found.is_empty(),
            "search by the full value of a field the role sees only masked found {found:?}"
        );
    }

    #[tokio::test]
    async fn a_moved_field_is_masked_if_either_category_masks_it() {
        let f = MovedBsn::new(
            "[roles.hr]\nread = [\"identity\", \"cv\"]\nwrite = []\npurposes = [\"recruitment\"]\nmasked = [\"cv\"]\n",
            &[("bsn", "111222333")],
        )
        .await;
        let got = f
            .after
            .get(&f.who("hr"), &f.id, "recruitment", &["bsn".into()])
            .await
            .expect("read");
        let value = got
            .fields
            .iter()
            .find(|(n, _)| n == "bsn")
            .map(|(_, v)| match v {
                Value::Text(t) => t.to_string(),
                _ => String::new(),
            })
            .expect("bsn");
        assert_ne!(
            value, "111222333",
            "bsn (now cv, which hr sees only masked) returned in full"
        );
        // And said to be masked (the audit event records it); before the move, in full.
        assert_eq!(got.masked, vec!["bsn"]);
        let before = f
            .before
            .get(&f.who("hr"), &f.id, "recruitment", &["bsn".into()])
            .await
            .expect("read");
        assert_eq!(before.fields.len(), 1);
        assert!(before.masked.is_empty(), "{:?}", before.masked);
    }

    /// Review 24: a purpose the policy defines is named in a refusal as it is; another is
    /// named only if it has a name's shape.
    #[tokio::test]
    async fn a_refused_purpose_is_named_if_the_policy_defines_it() {
        let f = MovedBsn::new(
            "[purposes.\"Vacatures@Web\"]\nlegal_basis = \"contract\"\n",
            &[("bsn", "111222333")],
        )
        .await;
        let recruiter = f.who("recruiter");
        let vault = f.before.with_policy(Arc::new(f.policy.clone()));
        for (purpose, shown) in [
            ("Vacatures@Web", "Vacatures@Web"),
            ("jan@example.nl", "<not a name: not shown>"),
        ] {
            let refused = vault.get(&recruiter, &f.id, purpose, &[]).await;
            assert!(
                matches!(&refused, Err(VaultError::PermissionDenied(m)) if m == &format!("purpose `{shown}` is not allowed for role `recruiter`")),
                "{refused:?}"
            );
        }
    }

    /// Review 22: clearing a moved field that was its stored category's last takes that
    /// category's data key with it, as for an unmoved field.
    #[tokio::test]
    async fn clearing_a_moved_field_drops_its_stored_categorys_data_key() {
        let f = MovedBsn::new(
            "[roles.both]\nread = [\"identity\", \"cv\"]\nwrite = [\"identity\", \"cv\"]\npurposes = [\"payroll\"]\n",
            &[("bsn", "111222333"), ("wage", "2500.00")],
        )
        .await;
        let uuid = uuid::Uuid::parse_str(&f.id).expect("uuid");
        assert!(f
            .after
            .load(uuid)
            .await
            .expect("load")
            .1
            .deks
            .contains_key("identity"));
        f.after
            .update(
                &f.who("both"),
                &f.id,
                "payroll",
                Change {
                    expected_revision: 0,
                    set: Vec::new(),
                    clear: vec!["bsn".into()],
                },
                &mut audit::Context::new("UpdateRecord"),
            )
            .await
            .expect("cleared");
        let (_, body) = f.after.load(uuid).await.expect("load");
        assert!(!body.fields.contains_key("bsn"));
        assert!(
            !body.deks.contains_key("identity"),
            "{:?}",
            body.deks.keys()
        );
        assert!(body.deks.contains_key("financial"), "wage keeps its key");
    }

    /// Review 22: a stored blob is withheld from a role that sees its field only masked, also
    /// once the schema calls the field text; and a text value that is not of the field's
    /// type now is masked whole.
    #[tokio::test]
    async fn a_retyped_field_shows_a_masked_role_nothing_of_its_old_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let keys = Arc::new(KeyRing::open(&store, &master).await.expect("keys"));
        let policy = crate::policy::Policy::from_toml(&format!(
            "{}\n[roles.masker]\nread = [\"identity\"]\nwrite = [\"identity\"]\npurposes = [\"payroll\"]\nmasked = [\"id_scan\", \"tax_ref\"]\n",
            crate::policy::DEFAULT_POLICY_TOML
        ))
        .expect("policy");
        let with = |schema: &str| {
            Vault::new(
                store.clone(),
                Arc::new(Schema::from_toml(schema).expect("schema")),
                Arc::clone(&keys),
            )
        };
        let before_toml = format!(
            "{}\n[fields.tax_ref]\ncategory = \"identity\"\ntype = \"text\"\nmax_len = 20\n",
            crate::schema::DEFAULT_SCHEMA_TOML
        );
        let before = with(&before_toml);
        let masker = Caller {
            principal: "test-masker".into(),
            role: Arc::clone(policy.role("masker").expect("role")),
        };
        let (id, _) = before
            .create(
                &masker,
                "payroll",
                vec![
                    (
                        "id_scan".to_string(),
                        Value::Blob {
                            bytes: Zeroizing::new(b"%PDF PASSPORT 123456789".to_vec()),
                            content_type: "application/pdf".into(),
                        },
                    ),
                    text("tax_ref", "TX-777"),
                ],
                &mut audit::Context::new("CreateRecord"),
            )
            .await
            .expect("create");
        let id = id.to_string();
        let after_toml = before_toml
            .replace(
                "[fields.id_scan]\ncategory = \"identity\"\ntype = \"blob\"\nmax_bytes = 16777216\ncontent_types = [\"image/jpeg\", \"image/png\", \"application/pdf\"]",
                "[fields.id_scan]\ncategory = \"identity\"\ntype = \"text\"\nmax_len = 100",
            )
            .replace(
                "[fields.tax_ref]\ncategory = \"identity\"\ntype = \"text\"\nmax_len = 20",
                "[fields.tax_ref]\ncategory = \"identity\"\ntype = \"bsn\"",
            );
        assert_ne!(after_toml, before_toml);
        let after = with(&after_toml);
        let got = after.get(&masker, &id, "payroll", &[]).await.expect("read");
        assert!(
            !got.fields.iter().any(|(n, _)| n == "id_scan"),
            "{:?}",
            got.fields
        );
        assert!(got.withheld.contains(&"id_scan".to_string()));
        let tax = got
            .fields
            .iter()
            .find_map(|(n, v)| match v {
                Value::Text(t) if n == "tax_ref" => Some(t.to_string()),
                _ => None,
            })
            .expect("tax_ref, masked");
        assert_eq!(tax, "***");
        let named = after
            .get(&masker, &id, "payroll", &["id_scan".into()])
            .await;
        assert!(
            matches!(&named, Err(VaultError::PermissionDenied(m)) if m.contains("sees field `id_scan` only masked")),
            "{named:?}"
        );
    }

    #[tokio::test]
    async fn an_export_role_exports_a_moved_field() {
        let f = MovedBsn::new(
            "[roles.dsr]\nread = [\"cv\"]\nwrite = []\npurposes = [\"data_subject_request\"]\nrecords = [\"export\"]\n",
            &[("bsn", "111222333"), ("wage", "2500.00")],
        )
        .await;
        // The export right covers the whole record, whatever the role may read: before the
        // schema move and after it.
        for (when, vault) in [("before", &f.before), ("after", &f.after)] {
            let got = vault
                .export(
                    &f.who("dsr"),
                    &f.id,
                    &mut audit::Context::new("ExportRecord"),
                )
                .await;
            assert!(
                got.as_ref().is_ok_and(|j| j.contains("111222333")),
                "{when} the move: {:?}",
                got.map(|j| j.len())
            );
        }
    }

    #[tokio::test]
    async fn a_legacy_plaintext_reason_is_sealed_by_the_next_header_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let who = |role: &str| Caller {
            principal: Arc::from(format!("t-{role}")),
            role: Arc::clone(
                crate::policy::Policy::default_policy()
                    .role(role)
                    .expect("role"),
            ),
        };
        let text = |name: &str, v: &str| (name.to_string(), Value::Text(Zeroizing::new(v.into())));
        let keys = Arc::new(KeyRing::open(&store, &master).await.expect("keys"));
        let vault = Vault::new(
            store.clone(),
            Arc::new(Schema::default_schema()),
            Arc::clone(&keys),
        );
        let (id, _) = vault
            .create(
                &who("payroll"),
                "payroll",
                vec![text("wage", "2500.00")],
                &mut audit::Context::new("CreateRecord"),
            )
            .await
            .expect("create");
        // A header as written before reasons were sealed: legal hold with a plaintext reason.
        let raw = store
            .get(Keyspace::Records, id.as_bytes())
            .await
            .expect("get")
            .expect("stored");
        let (kv, ik) = keys.integrity_key();
        let mut body = RecordBody::open(id.as_bytes(), &raw, kv, ik).expect("open");
        body.legal_hold = true;
        body.legal_hold_reason = "Lawsuit Jansen v Agency case 2024-117".into();
        let mut b = Batch::default();
        b.put(Keyspace::Records, id.as_bytes().to_vec(), body.seal(kv, ik));
        store.commit(b).await.expect("legacy header");
        // Writes after the upgrade: a field update, and a restriction change.
        vault
            .update(
                &who("payroll"),
                &id.to_string(),
                "payroll",
                Change {
                    set: vec![text("wage", "2600.00")],
                    ..Change::default()
                },
                &mut audit::Context::new("UpdateRecord"),
            )
            .await
            .expect("update");
        let raw = store
            .get(Keyspace::Records, id.as_bytes())
            .await
            .expect("get")
            .expect("stored");
        let hay = String::from_utf8_lossy(&raw);
        assert!(
            !hay.contains("Lawsuit Jansen"),
            "the legacy reason is still in plaintext in the stored header after an update"
        );
    }

    #[tokio::test]
    async fn reads_recorded_between_the_lookup_and_the_update_are_notified_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let master = MasterKey::from_secret(SecretKey::generate().expect("rng"));
        let keys = KeyRing::open(&store, &master).await.expect("keys");
        let vault = Vault::new(store, Arc::new(Schema::default_schema()), Arc::new(keys));
        let id = Uuid::new_v4();
        let draft = |action: &str, principal: &str| {
            let mut d = audit::Draft::new(action, principal, "recruiter");
            d.record_id = id.to_string();
            d.field_names = vec!["email".into()];
            d.outcome = audit::Outcome::Ok.as_str().into();
            d
        };
        let append = |d: audit::Draft| {
            let mut b = Batch::default();
            b.append_event(d.encode());
            vault.store().commit(b)
        };
        append(draft("GetRecord", "early")).await.expect("event");
        let looked_to = audit::Head::load(vault.store()).await.expect("head").seq;
        append(draft("GetRecord", "racing")).await.expect("event");
        let ours = draft("UpdateRecord", "writer");
        append(ours.clone()).await.expect("event");
        append(draft("GetRecord", "later")).await.expect("event");
        let fields = BTreeMap::from([("email".to_string(), 0i64)]);
        let notify = vault
            .late_readers(
                id,
                &fields,
                "writer",
                looked_to,
                &ours,
                vec!["early".into()],
            )
            .await;
        // The read that raced the update is added; the one after the update is not.
        assert_eq!(notify, vec!["early".to_string(), "racing".to_string()]);
    }
}

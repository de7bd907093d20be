//! Retention rules as data, and the two deadlines each category of a record gets from its
//! lifecycle: the **legal duty to keep** (blocks erasure on request until it ends) and the
//! **maximum period** (after it the data must go, request or not). Pure logic, no IO.
//!
//! Defaults (`../shared/domain.md`; configurable in `[retention]`, not legal advice):
//!
//! | who | category | clock starts | duty to keep | maximum period |
//! |---|---|---|---|---|
//! | applicant never hired | all | procedure closed | none | 28 days; 365 with `talent_pool` consent |
//! | employee | identity, financial | — | while employed (`employment_ongoing`) | — |
//! | former employee | identity | employment ended | 5 years | 5 years |
//! | former employee | financial | employment ended | 7 years | 7 years |
//! | former employee | absence, contact, personal, cv | employment ended | none | 2 years |
//!
//! An applicant still in procedure has no clock yet: nothing is kept under a duty, and the
//! maximum period starts when the procedure closes.

use std::collections::BTreeMap;

use chrono::{Months, NaiveDate};
use serde::Deserialize;

use crate::record::RecordBody;
use crate::schema::Category;

/// Basis named for data kept while someone is employed.
pub const BASIS_EMPLOYMENT_ONGOING: &str = "employment_ongoing";

/// What happens to a former employee's category.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormerEmployeeRule {
    /// Years after employment ended during which erasure on request is refused (0 = none).
    #[serde(default)]
    pub keep_years: u32,
    /// Years after employment ended after which the sweeper erases the category.
    pub max_years: u32,
    /// The legal basis of the duty (or of the period), as shown to the data subject.
    pub basis: String,
    /// When the years start: the day the employment ended (`end_date`, the default), or the
    /// end of the calendar year it ended in (`end_of_year`: "five full calendar years after
    /// the year of leaving", as Dutch law words the duty to keep the ID copy and a work
    /// permit; review 11).
    #[serde(default)]
    pub counts_from: CountsFrom,
}

/// Where a former employee's years start counting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CountsFrom {
    /// The day the employment ended.
    #[default]
    EndDate,
    /// The end of the calendar year the employment ended in: N years later is 1 January of
    /// the year N + 1 after it (kept through 31 December of the Nth full year).
    EndOfYear,
}

impl FormerEmployeeRule {
    /// The day the duty to keep ends (None: no duty) for an employment that ended on `ended`.
    pub fn keep_until(&self, ended: NaiveDate) -> Option<NaiveDate> {
        (self.keep_years > 0).then(|| self.after(ended, self.keep_years))
    }

    /// The day the sweeper erases the category, for an employment that ended on `ended`.
    pub fn erase_on(&self, ended: NaiveDate) -> NaiveDate {
        self.after(ended, self.max_years)
    }

    fn after(&self, ended: NaiveDate, years: u32) -> NaiveDate {
        match self.counts_from {
            CountsFrom::EndDate => plus_years(ended, years),
            CountsFrom::EndOfYear => {
                use chrono::Datelike;
                NaiveDate::from_ymd_opt(ended.year().saturating_add(1), 1, 1)
                    .map_or(NaiveDate::MAX, |next| plus_years(next, years))
            }
        }
    }
}

/// The retention rules (`[retention]` in kluis.toml).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRules {
    /// Days after the procedure closed that an applicant never hired is kept.
    #[serde(default = "default_applicant_days")]
    pub applicant_max_days: u32,
    /// With consent for this purpose, an applicant is kept longer…
    #[serde(default = "default_consent_purpose")]
    pub applicant_consent_purpose: String,
    /// …this many days after the procedure closed.
    #[serde(default = "default_consent_days")]
    pub applicant_consent_max_days: u32,
    /// Basis of the applicant periods.
    #[serde(default = "default_applicant_basis")]
    pub applicant_basis: String,
    /// Categories kept while someone is employed (the contract needs them).
    #[serde(default = "default_ongoing")]
    pub keep_while_employed: Vec<String>,
    /// Per category: what happens after employment ended.
    #[serde(default = "default_former")]
    pub former_employee: BTreeMap<String, FormerEmployeeRule>,
    /// Seconds between runs of the retention sweeper (it also runs at start-up).
    #[serde(default = "default_sweep_secs")]
    pub sweep_interval_secs: u64,
    /// Days the clock may move past the day of the last sweep before the sweeper pauses
    /// (erasing nothing) until an operator confirms the date (`kluis retention resume`): a
    /// clock set wrongly ahead would otherwise erase data before it is due.
    #[serde(default = "default_sweep_gap_days")]
    pub sweep_max_gap_days: u32,
}

fn default_sweep_secs() -> u64 {
    3600
}

fn default_sweep_gap_days() -> u32 {
    7
}

fn default_applicant_days() -> u32 {
    28
}
fn default_consent_purpose() -> String {
    "talent_pool".into()
}
fn default_consent_days() -> u32 {
    365
}
fn default_applicant_basis() -> String {
    "AP guidance on applicant data: 4 weeks after the procedure, 1 year with consent".into()
}
fn default_ongoing() -> Vec<String> {
    vec!["identity".into(), "financial".into()]
}
fn default_former() -> BTreeMap<String, FormerEmployeeRule> {
    let rule = |keep, max, basis: &str| FormerEmployeeRule {
        keep_years: keep,
        max_years: max,
        basis: basis.into(),
        counts_from: CountsFrom::EndDate,
    };
    BTreeMap::from([
        (
            "identity".into(),
            rule(5, 5, "payroll tax law (Wet op de loonbelasting 1964): BSN and ID copy kept 5 years after employment"),
        ),
        (
            "financial".into(),
            rule(7, 7, "fiscal retention duty (Algemene wet inzake rijksbelastingen art. 52): 7 years"),
        ),
        (
            "absence".into(),
            rule(0, 2, "AP guidance on absence data: 2 years after employment"),
        ),
        (
            "contact".into(),
            rule(0, 2, "personnel file practice: 2 years after employment"),
        ),
        (
            "personal".into(),
            rule(0, 2, "personnel file practice: 2 years after employment"),
        ),
        (
            "cv".into(),
            rule(0, 2, "personnel file practice: 2 years after employment"),
        ),
    ])
}

impl Default for RetentionRules {
    fn default() -> Self {
        RetentionRules {
            applicant_max_days: default_applicant_days(),
            applicant_consent_purpose: default_consent_purpose(),
            applicant_consent_max_days: default_consent_days(),
            applicant_basis: default_applicant_basis(),
            keep_while_employed: default_ongoing(),
            former_employee: default_former(),
            sweep_interval_secs: default_sweep_secs(),
            sweep_max_gap_days: default_sweep_gap_days(),
        }
    }
}

impl RetentionRules {
    /// Checks that every category named exists and every former-employee category has a rule.
    pub fn validate(&self) -> Result<(), String> {
        // A period of 0 would have the sweeper erase data the day its clock starts (a
        // procedure closing, an employment ending): surely a mistake, so refused.
        for (key, value) in [
            ("applicant_max_days", u64::from(self.applicant_max_days)),
            (
                "applicant_consent_max_days",
                u64::from(self.applicant_consent_max_days),
            ),
        ] {
            if value == 0 {
                return Err(format!("[retention] {key} = 0: must be at least 1"));
            }
            if value > crate::config::MAX_DAYS_SETTING {
                return Err(format!(
                    "[retention] {key} = {value}: must be at most {} (ten years)",
                    crate::config::MAX_DAYS_SETTING
                ));
            }
        }
        // The basis is what a data subject is shown (exports, plans): it may not be blank.
        if self.applicant_basis.trim().is_empty() {
            return Err(
                "[retention] applicant_basis is empty: name the legal basis of the applicant periods (it is shown to the data subject)".into(),
            );
        }
        // Consent lets applicant data stay longer (the talent pool), never shorter.
        if self.applicant_consent_max_days < self.applicant_max_days {
            return Err(format!(
                "[retention] applicant_consent_max_days ({}) is below applicant_max_days ({}): consent may keep applicant data longer, never shorter",
                self.applicant_consent_max_days, self.applicant_max_days
            ));
        }
        for name in self
            .keep_while_employed
            .iter()
            .chain(self.former_employee.keys())
        {
            if Category::parse(name).is_none() {
                return Err(format!("[retention] names unknown category `{name}`"));
            }
        }
        for c in Category::ALL {
            let Some(rule) = self.former_employee.get(c.as_str()) else {
                return Err(format!(
                    "[retention.former_employee.{c}] is missing: every category needs a maximum period"
                ));
            };
            if rule.max_years == 0 {
                return Err(format!(
                    "[retention.former_employee.{c}] max_years = 0: must be at least 1"
                ));
            }
            if rule.keep_years > rule.max_years {
                return Err(format!(
                    "[retention.former_employee.{c}] keep_years exceeds max_years"
                ));
            }
            if rule.basis.trim().is_empty() {
                return Err(format!(
                    "[retention.former_employee.{c}] basis is empty: name the legal basis of the period (it is shown to the data subject)"
                ));
            }
        }
        Ok(())
    }
}

/// The legal duty to keep a category.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Duty {
    /// None: erasure on request removes it.
    None,
    /// Kept while employed (no end date yet).
    Ongoing,
    /// Kept until this date (exclusive: erasable on it).
    Until(NaiveDate),
}

/// A category's deadlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadlines {
    /// The category.
    pub category: Category,
    /// The duty to keep.
    pub duty: Duty,
    /// When the maximum period ends (the sweeper erases on this date), if the clock runs.
    pub erase_on: Option<NaiveDate>,
    /// The legal basis.
    pub basis: String,
}

impl Deadlines {
    /// Whether erasure on request must keep the category on `today`.
    pub fn retained_on(&self, today: NaiveDate) -> bool {
        match self.duty {
            Duty::None => false,
            Duty::Ongoing => true,
            Duty::Until(d) => today < d,
        }
    }

    /// Whether the sweeper erases the category on `today`.
    pub fn expired_on(&self, today: NaiveDate) -> bool {
        self.erase_on.is_some_and(|d| d <= today)
    }
}

/// The date a record's current stage began: its `lifecycle_date`, else its creation date.
pub fn stage_date(body: &RecordBody) -> NaiveDate {
    crate::record::stored_day(&body.lifecycle_date).unwrap_or_else(|| {
        chrono::DateTime::from_timestamp_millis(body.created_ms)
            .map(|t| t.date_naive())
            .unwrap_or_default()
    })
}

fn plus_years(d: NaiveDate, years: u32) -> NaiveDate {
    d.checked_add_months(Months::new(years.saturating_mul(12)))
        .unwrap_or(NaiveDate::MAX)
}

fn plus_days(d: NaiveDate, days: u32) -> NaiveDate {
    d.checked_add_days(chrono::Days::new(u64::from(days)))
        .unwrap_or(NaiveDate::MAX)
}

/// For a category of `body` on which no clock runs yet (`deadlines` gives neither a duty nor
/// an erasure date), the rule that will set its period, in words for the data subject
/// (GDPR Art. 15(1)(d): the criteria used to determine the period). `None` when a clock runs.
pub fn pending_rule(rules: &RetentionRules, body: &RecordBody, d: &Deadlines) -> Option<String> {
    if d.erase_on.is_some() || d.duty != Duty::None {
        return None;
    }
    let after_end = |category: Category| {
        let from = |r: &FormerEmployeeRule| match r.counts_from {
            CountsFrom::EndDate => "the end",
            CountsFrom::EndOfYear => "the end of the year it ends in",
        };
        match rules.former_employee.get(category.as_str()) {
            Some(r) if r.keep_years > 0 => format!(
            "after the employment ends: kept {} years ({}), erased at the latest {} years after {}",
            r.keep_years, r.basis, r.max_years, from(r)
        ),
            Some(r) => format!(
                "after the employment ends: erased at the latest {} years after {} ({})",
                r.max_years,
                from(r),
                r.basis
            ),
            None => "after the employment ends: erased on request".to_string(),
        }
    };
    Some(match body.lifecycle.as_str() {
        "employed" => format!("kept while it is needed for the employment; {}", after_end(d.category)),
        "ended" => after_end(d.category),
        _ => format!(
            "no period runs while the application procedure is open; once it closes, erased {} days later ({} days with consent for `{}`) ({})",
            rules.applicant_max_days,
            rules.applicant_consent_max_days,
            rules.applicant_consent_purpose,
            rules.applicant_basis
        ),
    })
}

/// The deadlines of every category holding data on `body`. Once the data subject asked for
/// erasure, what a duty keeps goes when the duty ends, even if the maximum period is longer
/// (review 11); and what no duty keeps any more (a hire that fell through after the request:
/// the stage that ended the duty began on [`stage_date`]) is due from then on, whatever
/// period the stage would give it otherwise (review 16: a closed procedure's 28 or 365 days,
/// or a reopened one's none).
pub fn deadlines(rules: &RetentionRules, body: &RecordBody) -> Vec<Deadlines> {
    let mut all = table_deadlines(rules, body);
    if body.erasure_requested_ms != 0 {
        let requested = chrono::DateTime::from_timestamp_millis(body.erasure_requested_ms)
            .map(|t| t.date_naive())
            .unwrap_or_default();
        let no_duty_since = requested.max(stage_date(body));
        for d in &mut all {
            let ends = match d.duty {
                Duty::Until(until) => until,
                Duty::None => no_duty_since,
                Duty::Ongoing => continue,
            };
            d.erase_on = Some(d.erase_on.map_or(ends, |on| on.min(ends)));
        }
    }
    all
}

/// The deadlines of the retention table, stage by stage.
fn table_deadlines(rules: &RetentionRules, body: &RecordBody) -> Vec<Deadlines> {
    let since = stage_date(body);
    body.deks
        .keys()
        .filter_map(|name| Category::parse(name))
        .map(|category| {
            let former = rules.former_employee.get(category.as_str());
            let (duty, erase_on, basis) = match body.lifecycle.as_str() {
                "employed"
                    if rules
                        .keep_while_employed
                        .iter()
                        .any(|c| c == category.as_str()) =>
                {
                    (Duty::Ongoing, None, BASIS_EMPLOYMENT_ONGOING.to_string())
                }
                "employed" => (Duty::None, None, String::new()),
                "ended" => match former {
                    Some(r) => (
                        r.keep_until(since).map_or(Duty::None, Duty::Until),
                        Some(r.erase_on(since)),
                        r.basis.clone(),
                    ),
                    None => (Duty::None, None, String::new()),
                },
                "procedure_closed" => {
                    let consent = body
                        .consents
                        .get(&rules.applicant_consent_purpose)
                        .is_some_and(|c| c.granted);
                    let days = if consent {
                        rules.applicant_consent_max_days
                    } else {
                        rules.applicant_max_days
                    };
                    (
                        Duty::None,
                        Some(plus_days(since, days)),
                        rules.applicant_basis.clone(),
                    )
                }
                // An applicant in procedure: no clock yet.
                _ => (Duty::None, None, String::new()),
            };
            Deadlines {
                category,
                duty,
                erase_on,
                basis,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ConsentEntry, StoredDek};

    fn body(stage: &str, date: &str, cats: &[Category]) -> RecordBody {
        RecordBody {
            lifecycle: stage.into(),
            lifecycle_date: date.into(),
            deks: cats
                .iter()
                .map(|c| (c.as_str().to_string(), StoredDek::default()))
                .collect(),
            ..RecordBody::default()
        }
    }

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("date")
    }

    #[test]
    fn a_rehire_stops_the_last_employments_clocks_whatever_the_gap() {
        // Review 12: data entered for the new employment must not inherit the old one's
        // dates (ended 2020: contact was due in 2022).
        let cats = [Category::Contact, Category::Identity, Category::Financial];
        let mut b = body("employed", "2026-11-01", &cats);
        b.last_ended = "2020-01-01".into();
        let all = deadlines(&RetentionRules::default(), &b);
        assert!(all.iter().all(|d| d.erase_on.is_none()), "{:?}", all.len());
    }

    #[test]
    fn after_an_erasure_request_a_duty_keeps_data_until_it_ends_not_to_the_maximum() {
        let mut rules = RetentionRules::default();
        if let Some(r) = rules.former_employee.get_mut("identity") {
            (r.keep_years, r.max_years) = (5, 7);
        }
        let mut b = body("ended", "2020-01-01", &[Category::Identity]);
        let erase_on = |b: &RecordBody| deadlines(&rules, b)[0].erase_on;
        assert_eq!(erase_on(&b), Some(d("2027-01-01")));
        b.erasure_requested_ms = 1;
        assert_eq!(erase_on(&b), Some(d("2025-01-01")), "the duty's end");
    }

    #[test]
    fn after_an_erasure_request_what_no_duty_keeps_is_due_from_the_stage_that_ended_it() {
        // Review 16: a hire dated ahead kept BSN and IBAN at the request; it fell through and
        // the procedure closed, with consent for the talent pool still granted.
        let cats = [Category::Identity, Category::Financial];
        let mut b = body("procedure_closed", "2026-12-10", &cats);
        b.consents.insert(
            RetentionRules::default().applicant_consent_purpose,
            ConsentEntry {
                granted: true,
                changed_ms: 0,
            },
        );
        let on = |b: &RecordBody| {
            deadlines(&RetentionRules::default(), b)
                .iter()
                .map(|d| d.erase_on)
                .collect::<Vec<_>>()
        };
        assert_eq!(on(&b), [Some(d("2027-12-10")); 2], "a year with consent");
        // Requested on 2026-11-26: due from the close on.
        b.erasure_requested_ms = 1_795_651_200_000;
        assert_eq!(on(&b), [Some(d("2026-12-10")); 2]);
        // A stage dated before the request: due from the request.
        b.lifecycle_date = "2026-11-01".into();
        assert_eq!(on(&b), [Some(d("2026-11-26")); 2]);
        // An applicant in procedure has no clock, unless its subject asked for erasure.
        b.lifecycle = "applicant".into();
        assert_eq!(on(&b), [Some(d("2026-11-26")); 2]);
        // An employment keeps them while it lasts.
        b.lifecycle = "employed".into();
        assert_eq!(on(&b), [None, None]);
    }

    #[test]
    fn years_count_from_the_end_date_or_from_the_end_of_its_year() {
        let mut rules = RetentionRules::default();
        if let Some(r) = rules.former_employee.get_mut("identity") {
            r.counts_from = CountsFrom::EndOfYear;
        }
        let on = |rules: &RetentionRules, ended: &str| {
            let b = body("ended", ended, &[Category::Identity]);
            let d = deadlines(rules, &b).remove(0);
            (d.duty, d.erase_on)
        };
        // Five full calendar years after the year of leaving: kept through 2029-12-31.
        for ended in ["2024-01-01", "2024-02-29", "2024-06-30", "2024-12-31"] {
            assert_eq!(
                on(&rules, ended),
                (Duty::Until(d("2030-01-01")), Some(d("2030-01-01"))),
                "{ended}"
            );
        }
        // The default counts from the day itself (domain.md's table).
        assert_eq!(
            on(&RetentionRules::default(), "2024-06-30"),
            (Duty::Until(d("2029-06-30")), Some(d("2029-06-30")))
        );
        let parsed: FormerEmployeeRule = toml::from_str(
            "keep_years = 5\nmax_years = 5\nbasis = \"Wav\"\ncounts_from = \"end_of_year\"",
        )
        .expect("parses");
        assert_eq!(parsed.counts_from, CountsFrom::EndOfYear);
        assert!(toml::from_str::<FormerEmployeeRule>(
            "max_years = 5\nbasis = \"x\"\ncounts_from = \"year\""
        )
        .is_err());
    }

    #[test]
    fn default_rules_are_valid() {
        RetentionRules::default().validate().expect("valid");
        let shorter = RetentionRules {
            applicant_consent_max_days: 14,
            ..RetentionRules::default()
        };
        let err = shorter.validate().expect_err("consent never shortens");
        assert!(err.contains("applicant_consent_max_days"), "{err}");
        // A period of 0 would erase data the day its clock starts.
        let none = RetentionRules {
            applicant_max_days: 0,
            ..RetentionRules::default()
        };
        let err = none.validate().expect_err("0 days refused");
        assert!(err.contains("applicant_max_days = 0"), "{err}");
        let mut zero_years = RetentionRules::default();
        if let Some(rule) = zero_years.former_employee.get_mut("contact") {
            rule.max_years = 0;
        }
        let err = zero_years.validate().expect_err("0 years refused");
        assert!(
            err.contains("[retention.former_employee.contact] max_years = 0"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_basis_is_refused() {
        for blank in ["", "  "] {
            let applicant = RetentionRules {
                applicant_basis: blank.into(),
                ..RetentionRules::default()
            };
            let err = applicant.validate().expect_err("refused");
            assert!(
                err.contains("[retention] applicant_basis is empty"),
                "{err}"
            );
            let mut former = RetentionRules::default();
            if let Some(rule) = former.former_employee.get_mut("cv") {
                rule.basis = blank.into();
            }
            let err = former.validate().expect_err("refused");
            assert!(
                err.contains("[retention.former_employee.cv] basis is empty"),
                "{err}"
            );
        }
    }

    #[test]
    fn former_employee_identity_5_years_financial_7_others_2() {
        let rules = RetentionRules::default();
        let b = body(
            "ended",
            "2026-03-31",
            &[
                Category::Identity,
                Category::Financial,
                Category::Contact,
                Category::Absence,
            ],
        );
        let ds: BTreeMap<_, _> = deadlines(&rules, &b)
            .into_iter()
            .map(|x| (x.category, x))
            .collect();
        assert_eq!(ds[&Category::Identity].duty, Duty::Until(d("2031-03-31")));
        assert_eq!(ds[&Category::Identity].erase_on, Some(d("2031-03-31")));
        assert_eq!(ds[&Category::Financial].erase_on, Some(d("2033-03-31")));
        assert_eq!(ds[&Category::Contact].duty, Duty::None);
        assert_eq!(ds[&Category::Contact].erase_on, Some(d("2028-03-31")));
        assert_eq!(ds[&Category::Absence].erase_on, Some(d("2028-03-31")));
        assert!(ds[&Category::Identity].retained_on(d("2031-03-30")));
        assert!(!ds[&Category::Identity].retained_on(d("2031-03-31")));
        assert!(!ds[&Category::Identity].expired_on(d("2031-03-30")));
        assert!(ds[&Category::Identity].expired_on(d("2031-03-31")));
    }

    #[test]
    fn applicants_4_weeks_or_a_year_with_consent_and_employees_keep_their_contract_data() {
        let rules = RetentionRules::default();
        let mut b = body("procedure_closed", "2026-01-10", &[Category::Contact]);
        assert_eq!(deadlines(&rules, &b)[0].erase_on, Some(d("2026-02-07")));
        b.consents.insert(
            "talent_pool".into(),
            ConsentEntry {
                granted: true,
                changed_ms: 0,
            },
        );
        assert_eq!(deadlines(&rules, &b)[0].erase_on, Some(d("2027-01-10")));
        // Withdrawal takes the period back to 4 weeks.
        b.consents.insert(
            "talent_pool".into(),
            ConsentEntry {
                granted: false,
                changed_ms: 1,
            },
        );
        assert_eq!(deadlines(&rules, &b)[0].erase_on, Some(d("2026-02-07")));
        let applicant = body("applicant", "", &[Category::Contact]);
        assert_eq!(deadlines(&rules, &applicant)[0].erase_on, None);
        let employed = body(
            "employed",
            "2026-01-05",
            &[Category::Identity, Category::Cv],
        );
        let ds = deadlines(&rules, &employed);
        assert_eq!(ds[0].category, Category::Cv);
        assert_eq!(ds[0].duty, Duty::None);
        assert_eq!(ds[1].duty, Duty::Ongoing);
        assert_eq!(ds[1].basis, BASIS_EMPLOYMENT_ONGOING);
    }
}

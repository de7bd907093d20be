//! `kluis retention …`: what the retention sweeper ([`crate::sweeper`]) would do.
//!
//! - `plan`: offline, with the server stopped: every category of every record whose maximum
//!   retention period has a date, with that date and whether it has come (as of `--at`,
//!   default today UTC), under the retention rules of the configuration (`[retention]`; the
//!   defaults with `--dev`). Nothing is erased and no record changes: the data directory is
//!   opened (which replays and renews the store's write-ahead log), read and released.
//!
//! Exit codes: 0 ok; [`EXIT_FAILED`] when records are damaged (their header fails its
//! integrity check: they are left out of the plan, which is printed all the same);
//! [`EXIT_USAGE`] for usage, configuration and IO errors, a data directory in use by a
//! running server, and a master key that does not open the data directory.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::NaiveDate;
use clap::{Args, Subcommand};
use serde::Serialize;

use super::audit::{open_store, output_error, CliError, Format};
use super::keys::{resolve_setup_from, MasterKeySetup};
use crate::config::ConfigFile;
use crate::keys::{self, KeyRing};
use crate::policy::Policy;
use crate::retention::RetentionRules;
use crate::schema::Schema;
use crate::store::{Keyspace, SledStore, Store};
use crate::sweeper::{self, Planned};
use crate::vault::Vault;

pub use super::audit::{EXIT_FAILED, EXIT_USAGE};

/// The exit codes, for `--help`.
pub const EXIT_CODES: &str = "Exit codes:\n  0  ok\n  1  the plan was printed, but records are damaged (their header fails its integrity check):\n     they are left out of it (`N records damaged (left out)`), and the sweeper leaves them too\n  2  usage, configuration or IO error (also: the data directory is in use by a running\n     server, or the master key does not open it)";
/// The exit codes of `resume`, for `--help`.
pub const RESUME_EXIT_CODES: &str = "Exit codes:\n  0  the date was recorded\n  2  usage, configuration or IO error (also: the data directory is in use by a running\n     server, or the master key does not open it); nothing was changed";

/// What to do instead of planning over a data directory a server holds.
const STOP_SERVER_FIRST: &str = "plan on a backup of it restored elsewhere (--data-dir DIR)";

/// Records read per page when counting them.
const PAGE: usize = 1024;

/// The status of a category that is due and not held.
pub const STATUS_DUE: &str = "due";
/// The status of a category that is due but kept by a legal hold.
pub const STATUS_HELD: &str = "held (legal hold)";
/// The status of a category that is due but kept by a restriction (and no legal hold).
pub const STATUS_HELD_RESTRICTED: &str = "held (restricted)";
/// The status of a category whose date has not come.
pub const STATUS_SCHEDULED: &str = "scheduled";
/// The status of a category whose date has not come, on a record under legal hold.
pub const STATUS_SCHEDULED_HELD: &str = "scheduled (legal hold)";
/// The status of a category whose date has not come, on a restricted record.
pub const STATUS_SCHEDULED_RESTRICTED: &str = "scheduled (restricted)";

// ---------------------------------------------------------------------------------------
// Arguments

/// `kluis retention` subcommands.
#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// Offline: what the retention sweeper would erase and when (changes nothing).
    ///
    /// One row per category of a record whose maximum retention period has a date, sorted by
    /// that date: ERASE ON, RECORD, STAGE, CATEGORY, STATUS and BASIS. STATUS is `due` when the
    /// date is on or before --at, `held (legal hold)` or `held (restricted)` when it is due
    /// but a legal hold or a restriction (GDPR Art. 18) keeps the record, `scheduled` when
    /// the date is later (`scheduled (legal hold)`, `scheduled (restricted)` on such a
    /// record). Then a summary, how many records have no running clock (applicants still in
    /// procedure, employees: their data is kept until the stage changes), and how many are
    /// damaged: their header fails its integrity check, so they are left out (exit code 1).
    ///
    /// The rules come from the configuration's [retention] section (the defaults with --dev).
    /// The server must be stopped: the data directory is read directly. No record changes,
    /// but opening the store replays and renews its write-ahead log, so it needs write access
    /// (run it on a copy to leave evidence untouched).
    #[command(after_help = EXIT_CODES)]
    Plan(PlanArgs),
    /// Offline: confirms the date after the sweeper paused, so that it sweeps again.
    ///
    /// The server's sweeper pauses, erasing nothing, while the clock is more than
    /// `[retention] sweep_max_gap_days` (default 7) past the day of its last sweep: a clock
    /// set wrongly ahead would erase data before it is due. If the date is right (the vault
    /// was down, or a backup older than that was restored), check the clock, look at what
    /// becomes due (`kluis retention plan --at DATE`), and confirm it here: the day is
    /// recorded, with an audit event `ResumeRetentionSweeps` (role `system`, principal
    /// `cli:<account>`), and the next pass erases every category due by the server's date
    /// (unless that is still more than `sweep_max_gap_days` after the day confirmed: then it
    /// pauses again). The server must be stopped.
    #[command(after_help = RESUME_EXIT_CODES)]
    Resume(ResumeArgs),
}

/// Where the offline retention commands find the data directory and its master key.
#[derive(Debug, Args)]
pub struct OfflineSetup {
    /// Configuration file naming the data directory, the master key file (or none: then the
    /// key is in KLUIS_MASTER_KEY) and, for `plan`, the schema and the retention rules
    /// [default: ./kluis.toml].
    #[arg(long, value_name = "FILE", conflicts_with = "dev")]
    pub config: Option<PathBuf>,
    /// Dev mode layout: the master key in ./keys/master.key, the data in ./data, the default
    /// retention rules.
    #[arg(long)]
    pub dev: bool,
    /// Data directory (overrides the configuration's).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl OfflineSetup {
    fn resolve(&self) -> Result<MasterKeySetup, CliError> {
        resolve_setup_from(self.config.clone(), self.dev, self.data_dir.clone())
    }
}

/// `kluis retention resume`.
#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The date to confirm, YYYY-MM-DD: the date the clock now says [default: today, UTC].
    #[arg(long, value_name = "DATE", value_parser = parse_date)]
    pub at: Option<NaiveDate>,
    /// Where the data directory and its key are.
    #[command(flatten)]
    pub setup: OfflineSetup,
}

/// `kluis retention plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The date to plan for, YYYY-MM-DD: categories whose date is on or before it are due
    /// [default: today, UTC].
    #[arg(long, value_name = "DATE", value_parser = parse_date)]
    pub at: Option<NaiveDate>,
    /// Where the data directory and its key are.
    #[command(flatten)]
    pub setup: OfflineSetup,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Parses `--at`: an ISO date `YYYY-MM-DD`.
pub fn parse_date(text: &str) -> Result<NaiveDate, String> {
    let text = text.trim();
    match NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        Ok(d) if text.len() == 10 => Ok(d),
        _ => Err("not a date: use YYYY-MM-DD (e.g. 2026-11-25)".into()),
    }
}

// ---------------------------------------------------------------------------------------
// The plan

/// A retention plan as of one date.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The date the plan is for.
    pub at: NaiveDate,
    /// Every category with a date, sorted by date ([`sweeper::plan`]).
    pub entries: Vec<Planned>,
    /// How many records the data directory holds (damaged ones included).
    pub records: u64,
    /// Records left out because their header is damaged (ids; keys in hex when not an id).
    pub damaged: Vec<String>,
}

impl Plan {
    /// Categories due by the plan's date, held ones included.
    pub fn due(&self) -> u64 {
        count(self.entries.iter().filter(|e| e.due))
    }

    /// Records with a category due by the plan's date.
    pub fn due_records(&self) -> u64 {
        let ids: BTreeSet<&str> = self
            .entries
            .iter()
            .filter(|e| e.due)
            .map(|e| e.record_id.as_str())
            .collect();
        count(ids.into_iter())
    }

    /// Due categories that a legal hold or a restriction keeps.
    pub fn held(&self) -> u64 {
        count(
            self.entries
                .iter()
                .filter(|e| e.due && (e.legal_hold || e.restricted)),
        )
    }

    /// Categories whose date comes after the plan's date.
    pub fn scheduled(&self) -> u64 {
        count(self.entries.iter().filter(|e| !e.due))
    }

    /// Records none of whose categories has a date (applicants in procedure, employees);
    /// damaged records are not among them.
    pub fn without_clock(&self) -> u64 {
        let with: BTreeSet<&str> = self.entries.iter().map(|e| e.record_id.as_str()).collect();
        self.records
            .saturating_sub(count(with.into_iter()))
            .saturating_sub(count(self.damaged.iter()))
    }
}

fn count<T>(items: impl Iterator<Item = T>) -> u64 {
    u64::try_from(items.count()).unwrap_or(u64::MAX)
}

/// The STATUS cell of an entry.
pub fn status(entry: &Planned) -> &'static str {
    match (entry.due, entry.legal_hold, entry.restricted) {
        (true, true, _) => STATUS_HELD,
        (true, false, true) => STATUS_HELD_RESTRICTED,
        (true, false, false) => STATUS_DUE,
        (false, true, _) => STATUS_SCHEDULED_HELD,
        (false, false, true) => STATUS_SCHEDULED_RESTRICTED,
        (false, false, false) => STATUS_SCHEDULED,
    }
}

/// `1 category`, `2 categories`.
fn counted(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

/// The plan as an aligned table, a summary line and (when there are any) a line on the
/// records without a running clock and one on the damaged records left out.
pub fn render_plan(plan: &Plan) -> String {
    const HEADER: [&str; 6] = ["ERASE ON", "RECORD", "STAGE", "CATEGORY", "STATUS", "BASIS"];
    let at = plan.at.format("%Y-%m-%d");
    let mut out = String::new();
    if plan.entries.is_empty() {
        out.push_str("Nothing is scheduled for erasure.\n");
    } else {
        let rows: Vec<[&str; 6]> = plan
            .entries
            .iter()
            .map(|e| {
                [
                    e.erase_on.as_str(),
                    e.record_id.as_str(),
                    e.stage.as_str(),
                    e.category.as_str(),
                    status(e),
                    e.basis.as_str(),
                ]
            })
            .collect();
        let mut widths = HEADER.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for row in std::iter::once(&HEADER).chain(&rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(&format!("{cell:<width$}", width = widths[i]));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "{} of {} due by {at} ({} held by legal hold or restriction); {} more scheduled later\n",
        counted(plan.due(), "category", "categories"),
        counted(plan.due_records(), "record", "records"),
        plan.held(),
        plan.scheduled(),
    ));
    let without = plan.without_clock();
    if without > 0 {
        out.push_str(&format!(
            "{} no running clock (applicants in procedure, employees)\n",
            counted(without, "record has", "records have"),
        ));
    }
    if !plan.damaged.is_empty() {
        out.push_str(&format!(
            "{} damaged (left out): {}\n",
            counted(count(plan.damaged.iter()), "record", "records"),
            plan.damaged.join(", ")
        ));
    }
    out
}

#[derive(Serialize)]
struct JsonPlan<'a> {
    at: String,
    entries: &'a [Planned],
    due: u64,
    held: u64,
    scheduled: u64,
    without_clock: u64,
    damaged: u64,
    damaged_records: &'a [String],
}

/// The plan as one pretty-printed JSON document: `{"at", "entries": [{"record_id", "stage",
/// "category", "erase_on", "due", "legal_hold", "restricted", "basis"}], "due", "held", "scheduled",
/// "without_clock", "damaged", "damaged_records"}` (the counts as in the table's summary;
/// `damaged_records` the ids of the damaged records left out).
pub fn plan_json(plan: &Plan) -> String {
    let doc = JsonPlan {
        at: plan.at.format("%Y-%m-%d").to_string(),
        entries: &plan.entries,
        due: plan.due(),
        held: plan.held(),
        scheduled: plan.scheduled(),
        without_clock: plan.without_clock(),
        damaged: count(plan.damaged.iter()),
        damaged_records: &plan.damaged,
    };
    serde_json::to_string_pretty(&doc).expect("plain strings, booleans and integers serialize")
}

// ---------------------------------------------------------------------------------------
// Reading the data directory

/// `p` from the configuration file `config`: relative to its directory unless absolute.
fn relative_to(config: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// The retention rules and schema of the configuration (the defaults in dev mode), the
/// rules validated and their consent purpose checked against the policy, as the server
/// does.
fn load_rules(config: Option<&Path>, dev: bool) -> Result<(RetentionRules, Schema), CliError> {
    if dev {
        let rules = RetentionRules::default();
        // What the server checks, against the dev-mode policy (the default one).
        crate::config::check_consent_purpose(&rules, &Policy::default_policy())
            .map_err(|e| CliError::Usage(e.to_string()))?;
        return Ok((rules, Schema::default_schema()));
    }
    let path = config.unwrap_or(Path::new("kluis.toml"));
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Io(format!("{}: {e}", path.display())))?;
    let file: ConfigFile = toml::from_str(&text).map_err(|e| {
        CliError::Usage(format!(
            "{}: {}",
            path.display(),
            crate::config::toml_message(&e, &text)
        ))
    })?;
    file.retention
        .validate()
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    let schema = match &file.schema_file {
        Some(p) => {
            let p = relative_to(path, p);
            let text = std::fs::read_to_string(&p)
                .map_err(|e| CliError::Io(format!("{}: {e}", p.display())))?;
            Schema::from_toml(&text)
                .map_err(|e| CliError::Usage(format!("{}: {}", p.display(), e.detail())))?
        }
        None => Schema::default_schema(),
    };
    // As the server checks it at start: the consent that extends an applicant's period must
    // be a purpose of the policy.
    let policy_path = relative_to(path, &file.policy_file);
    let policy_text = std::fs::read_to_string(&policy_path)
        .map_err(|e| CliError::Io(format!("{}: {e}", policy_path.display())))?;
    let policy = Policy::from_toml(&policy_text)
        .map_err(|e| CliError::Usage(format!("{}: {}", policy_path.display(), e.detail())))?;
    crate::config::check_consent_purpose(&file.retention, &policy)
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    Ok((file.retention, schema))
}

/// How many records `store` holds.
async fn count_records(store: &SledStore) -> Result<u64, CliError> {
    let mut total: u64 = 0;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store
            .scan(Keyspace::Records, b"", after.as_deref(), PAGE)
            .await
            .map_err(|e| CliError::Io(format!("reading the records: {e}")))?;
        let Some((last, _)) = page.last() else {
            return Ok(total);
        };
        after = Some(last.clone());
        total = total.saturating_add(count(page.iter()));
    }
}

/// Opens the data directory `setup` names (refused while a server holds it: `in_use` says
/// what to do instead), checking that its master key opens it; writes nothing.
async fn open_with_key(setup: &MasterKeySetup, in_use: &str) -> Result<SledStore, CliError> {
    let store = open_store(&setup.data_dir, in_use)?;
    let opens = keys::which_master_key(&store, &setup.key, &setup.key)
        .await
        .map_err(|e| CliError::Io(format!("the data directory's keys: {e}")))?;
    if opens != Some(true) {
        return Err(CliError::Usage(format!(
            "the master key does not open the data directory {} (a wrong key, or no vault in it)",
            setup.data_dir.display()
        )));
    }
    Ok(store)
}

/// The plan of the data directory `setup` names, as of `at`, under `rules`. Opens the
/// directory (refused while a server holds it), reads and releases it; writes nothing.
pub async fn plan_offline(
    setup: MasterKeySetup,
    rules: RetentionRules,
    schema: Schema,
    at: NaiveDate,
) -> Result<Plan, CliError> {
    // `KeyRing::open` would create the keys of an empty store: the key is checked first, so
    // that nothing is written.
    let store = open_with_key(&setup, STOP_SERVER_FIRST).await?;
    let ring = KeyRing::open(&store, &setup.key)
        .await
        .map_err(|e| CliError::Io(format!("the data directory's keys: {e}")))?;
    let records = count_records(&store).await?;
    let vault = Vault::new(store, Arc::new(schema), Arc::new(ring)).with_retention(Arc::new(rules));
    let (entries, damaged) = sweeper::plan(&vault, at)
        .await
        .map_err(|e| CliError::Io(format!("reading the records: {e}")))?;
    // Release the data directory before reporting.
    drop(vault);
    Ok(Plan {
        at,
        entries,
        records,
        damaged,
    })
}

// ---------------------------------------------------------------------------------------
// Commands

/// `kluis retention plan`.
pub async fn plan(args: &PlanArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let at = args.at.unwrap_or_else(|| chrono::Utc::now().date_naive());
    let setup = args.setup.resolve()?;
    let (rules, schema) = load_rules(args.setup.config.as_deref(), args.setup.dev)?;
    let plan = plan_offline(setup, rules, schema, at).await?;
    let text = match args.format {
        Format::Table => render_plan(&plan),
        Format::Json => format!("{}\n", plan_json(&plan)),
    };
    out.write_all(text.as_bytes()).map_err(output_error)?;
    if plan.damaged.is_empty() {
        return Ok(());
    }
    Err(CliError::Damaged(format!(
        "{} damaged (DATA_LOSS: the stored header fails its integrity check): left out of the plan, and the sweeper leaves them alone too; restore them from a backup",
        counted(count(plan.damaged.iter()), "record", "records"),
    )))
}

/// Records `at` as the day of the last sweep in the data directory `setup` names, with its
/// audit event by `principal`; returns the day recorded before (if any).
pub async fn resume_offline(
    setup: MasterKeySetup,
    at: NaiveDate,
    principal: &str,
) -> Result<Option<NaiveDate>, CliError> {
    // A date the machine's clock has not reached would turn the pause off until then (a
    // typo, 2206 for 2026; review 14). A day of slack for time zones.
    let today = chrono::Utc::now().date_naive();
    if at > today + chrono::Days::new(1) {
        return Err(CliError::Usage(format!(
            "--at {at} is more than a day after this machine's date ({today}): confirm the date the clock says, not a later one"
        )));
    }
    // Nor one the clock has left behind (1899 for 2026, review 24): the sweeper compares its
    // own date with it and would pause again at once, having recorded a date no one meant.
    if at + chrono::Days::new(1) < today {
        return Err(CliError::Usage(format!(
            "--at {at} is more than a day before this machine's date ({today}): confirm the date the clock says (if the clock is wrong, set it right first)"
        )));
    }
    let store = open_with_key(&setup, "stop the server first").await?;
    let principal = principal.to_string();
    // The event names the day recorded before and the day confirmed.
    let event = move |last: Option<NaiveDate>| {
        let mut draft = crate::audit::Draft::new(
            sweeper::RESUME_ACTION,
            &principal,
            crate::rotation::SYSTEM_ROLE,
        );
        draft.field_names = vec![
            format!(
                "previous:{}",
                last.map_or_else(|| "none".to_string(), |d| d.to_string())
            ),
            format!("confirmed:{at}"),
        ];
        draft.outcome = crate::audit::Outcome::Ok.as_str().to_string();
        draft.encode()
    };
    sweeper::confirm_sweep_day(&store, at, event)
        .await
        .map_err(|e| {
            CliError::Io(format!(
                "recording the date failed, nothing was changed: {e}"
            ))
        })
}

/// `kluis retention resume`.
pub async fn resume(args: &ResumeArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let at = args.at.unwrap_or_else(|| chrono::Utc::now().date_naive());
    let setup = args.setup.resolve()?;
    let last = resume_offline(setup, at, &super::keys::cli_principal()).await?;
    let before = last.map_or_else(|| "none recorded".to_string(), |d| d.to_string());
    let text = format!(
        "Confirmed {at} (last sweep: {before}). At its next pass the sweeper erases every category due by the server's date, unless that date is more than [retention] sweep_max_gap_days after {at} (then it pauses again).\n"
    );
    out.write_all(text.as_bytes()).map_err(output_error)
}

/// Runs a retention command, writing its result to `out` (errors are for the caller to print
/// as `error: …`).
pub async fn run(command: &RetentionCommand, out: &mut dyn Write) -> Result<(), CliError> {
    let result = match command {
        RetentionCommand::Plan(args) => plan(args, out).await,
        RetentionCommand::Resume(args) => resume(args, out).await,
    };
    let flushed = out.flush().map_err(output_error);
    match result.and(flushed) {
        Err(CliError::OutputClosed) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, on: &str, category: &str, due: bool, held: bool) -> Planned {
        Planned {
            record_id: id.into(),
            stage: "ended".into(),
            category: category.into(),
            erase_on: on.into(),
            due,
            legal_hold: held,
            restricted: false,
            basis: "some basis".into(),
        }
    }

    fn sample() -> Plan {
        Plan {
            at: NaiveDate::from_ymd_opt(2026, 2, 7).expect("date"),
            entries: vec![
                entry("a", "2026-02-07", "contact", true, false),
                entry("h", "2026-02-07", "contact", true, true),
                entry("b", "2027-01-10", "contact", false, false),
                entry("c", "2028-03-31", "contact", false, true),
            ],
            records: 6,
            damaged: vec![],
        }
    }

    #[test]
    fn dates_are_iso() {
        assert_eq!(
            parse_date("2026-02-07"),
            Ok(NaiveDate::from_ymd_opt(2026, 2, 7).expect("date"))
        );
        for bad in ["2026-2-7", "07-02-2026", "2026-02-30", "", "tomorrow"] {
            assert!(parse_date(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_table_has_a_status_per_row_and_a_summary() {
        let text = render_plan(&sample());
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0]
                .split_whitespace()
                .eq(["ERASE", "ON", "RECORD", "STAGE", "CATEGORY", "STATUS", "BASIS"]),
            "{text}"
        );
        let status_at = lines[0].find("STATUS").expect("STATUS column");
        let statuses: Vec<&str> = lines[1..5]
            .iter()
            .map(|l| l[status_at..].split("  ").next().expect("a cell"))
            .collect();
        assert_eq!(
            statuses,
            [
                STATUS_DUE,
                STATUS_HELD,
                STATUS_SCHEDULED,
                STATUS_SCHEDULED_HELD
            ]
        );
        assert_eq!(lines[5], "");
        assert_eq!(
            lines[6],
            "2 categories of 2 records due by 2026-02-07 (1 held by legal hold or restriction); 2 more scheduled later"
        );
        assert_eq!(
            lines[7],
            "2 records have no running clock (applicants in procedure, employees)"
        );
        assert_eq!(lines.len(), 8);
    }

    #[test]
    fn an_empty_plan_says_so() {
        let plan = Plan {
            at: NaiveDate::from_ymd_opt(2026, 2, 7).expect("date"),
            entries: vec![],
            records: 1,
            damaged: vec![],
        };
        assert_eq!(
            render_plan(&plan),
            "Nothing is scheduled for erasure.\n0 categories of 0 records due by 2026-02-07 (0 held by legal hold or restriction); 0 more scheduled later\n1 record has no running clock (applicants in procedure, employees)\n"
        );
    }

    #[test]
    fn damaged_records_are_counted_apart() {
        let plan = Plan {
            damaged: vec!["d1".into()],
            records: 7,
            ..sample()
        };
        let text = render_plan(&plan);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[7],
            "2 records have no running clock (applicants in procedure, employees)"
        );
        assert_eq!(lines[8], "1 record damaged (left out): d1");
        let doc: serde_json::Value = serde_json::from_str(&plan_json(&plan)).expect("json");
        assert_eq!(doc["without_clock"], 2);
        assert_eq!(doc["damaged"], 1);
        assert_eq!(doc["damaged_records"][0], "d1");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&plan_json(&sample())).expect("json")
                ["damaged"],
            0
        );
    }

    #[test]
    fn the_json_is_one_document_with_the_counts() {
        let doc: serde_json::Value =
            serde_json::from_str(&plan_json(&sample())).expect("one JSON document");
        assert_eq!(doc["at"], "2026-02-07");
        assert_eq!(doc["due"], 2);
        assert_eq!(doc["held"], 1);
        assert_eq!(doc["scheduled"], 2);
        assert_eq!(doc["without_clock"], 2);
        let entries = doc["entries"].as_array().expect("entries");
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[1]["record_id"], "h");
        assert_eq!(entries[1]["legal_hold"], true);
        assert_eq!(entries[1]["due"], true);
    }
}

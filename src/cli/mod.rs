//! The `kluis` command line beyond `serve` and `init`: each subcommand group's arguments
//! (clap derive) and logic live here, so that `main.rs` stays thin and the logic is testable.
//!
//! - [`audit`]: `kluis audit verify | export | breach-report`.
//! - [`export`]: `kluis export RECORD_ID` (a record's data-subject export, written to a file).
//! - [`keys`]: `kluis keys status | rotate | rewrap | rekey | retire | rotate-master`.
//! - [`retention`]: `kluis retention plan` (what the retention sweeper would erase, and when).

pub mod audit;
pub mod export;
pub mod keys;
pub mod retention;

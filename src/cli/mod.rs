//! The `kluis` command line beyond `serve` and `init`: each subcommand group's arguments
//! (clap derive) and logic live here, so that `main.rs` stays thin and the logic is testable.
//!
//! - [`audit`]: `kluis audit verify | export | breach-report`.
//! - [`keys`]: `kluis keys status | rotate | rewrap | rekey | retire | rotate-master`.
//! - [`retention`]: `kluis retention plan` (what the retention sweeper would erase, and when).

pub mod audit;
pub mod keys;
pub mod retention;

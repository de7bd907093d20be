//! The `kluis` command line: `serve` runs the vault, `init` sets up production key material
//! and configuration, `audit` verifies, exports and reports on the audit trail, `keys` manages
//! the key lifecycle, `retention` shows what the retention sweeper would erase, `export` writes
//! a record's data-subject export to a file. Thin:
//! everything happens in the library ([`kluis::cli`] for the subcommands' logic).

#![forbid(unsafe_code)]
#![warn(clippy::unwrap_used)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: the request path allocates and frees across
/// threads (tokio workers, the commit pipeline), where glibc malloc spent ~15 % of the CPU of
/// an audited read in the load benchmark; with mimalloc every load scenario ran 30–40 % faster.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Kluis: encrypted candidate-records vault (gRPC).
#[derive(Parser)]
#[command(name = "kluis", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The exit codes of `serve`, for `--help` (the tools' scheme: 2 for what stops it from
/// starting, 1 for a failure once it runs).
const SERVE_EXIT_CODES: &str = "Exit codes:\n  0  stopped cleanly (SIGTERM or SIGINT)\n  1  failed after it had started serving, or stopped uncleanly (the store refused writes,\n     or the last audit checkpoint or anchor could not be written: the last lines say which)\n  2  could not start: usage, configuration, keys (e.g. a master key file readable by others,\n     or a master key that does not open the data directory), the data directory (e.g. in use\n     by another server), the listen address, or the async runtime";

/// `serve`: could not start.
const SERVE_EXIT_START: u8 = 2;
/// `serve`: failed after it had started.
const SERVE_EXIT_FAILED: u8 = 1;

#[derive(Subcommand)]
enum Command {
    /// Runs the vault.
    #[command(after_help = SERVE_EXIT_CODES)]
    Serve {
        /// Configuration file (default: ./kluis.toml). Not used with --dev.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Dev mode: keys, dev tokens and data under the current directory, created on first
        /// start; loopback only.
        #[arg(long)]
        dev: bool,
        /// Listen address (overrides the config), e.g. 127.0.0.1:50051.
        #[arg(long)]
        listen: Option<String>,
        /// Data directory (overrides the config).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Production set-up: master key, policy with one principal per default role (token
    /// hashes only) and kluis.toml; prints the tokens once. Never overwrites.
    Init {
        /// Directory to set up.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Listen address written into kluis.toml.
        #[arg(long, default_value = kluis::config::DEFAULT_LISTEN)]
        listen: String,
    },
    /// Audit trail tools: verify the chain offline, export events, breach reports.
    #[command(after_help = kluis::cli::audit::EXIT_CODES)]
    Audit {
        #[command(subcommand)]
        command: kluis::cli::audit::AuditCommand,
    },
    /// Key lifecycle for the security team: KEK status, rotation, rewrap, re-key and
    /// retirement on a running server; offline master key rotation.
    #[command(after_help = kluis::cli::keys::EXIT_CODES)]
    Keys {
        #[command(subcommand)]
        command: kluis::cli::keys::KeysCommand,
    },
    /// Retention, offline: what the retention sweeper would erase and when (`plan`, changes
    /// nothing), and confirming the date after the sweeper paused (`resume`).
    #[command(after_help = kluis::cli::retention::EXIT_CODES)]
    Retention {
        #[command(subcommand)]
        command: kluis::cli::retention::RetentionCommand,
    },
    /// Writes a record's data-subject export (every field in full, metadata, consents,
    /// retention deadlines, access history) to a file, mode 0600; prints a summary, never a
    /// value.
    #[command(after_help = kluis::cli::export::EXIT_CODES)]
    Export(kluis::cli::export::ExportArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The audit, key, retention and export tools print results, not a running log: warnings
    // only unless KLUIS_LOG says.
    let default_level = match cli.command {
        Command::Audit { .. }
        | Command::Keys { .. }
        | Command::Retention { .. }
        | Command::Export(_) => "warn",
        _ => "info",
    };
    {
        use tracing_subscriber::filter::{LevelFilter, Targets};
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let filter = tracing_subscriber::EnvFilter::try_from_env("KLUIS_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
        // Whatever KLUIS_LOG says: sled logs the pages it writes at debug and trace, i.e.
        // every stored value (wrapped keys, record headers, field ciphertext), which would
        // make the log a copy of the store that erasure cannot reach (review 25); h2 logs
        // frames at trace.
        let cap = Targets::new()
            .with_default(LevelFilter::TRACE)
            .with_target("sled", LevelFilter::INFO)
            .with_target("h2", LevelFilter::DEBUG);
        tracing_subscriber::registry()
            .with(filter)
            .with(cap)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr)
                    // An unwritable log (full disk, file-size limit) must not turn into a
                    // panic in a request handler: tracing-subscriber would otherwise
                    // `eprintln!` about it.
                    .log_internal_errors(false),
            )
            .init();
    }
    // Key material must not leave the process in a core file or through a debugger.
    if let Err(e) = kluis::keys::keep_out_of_dumps() {
        tracing::warn!(error = %e, "could not turn off core dumps; key material may end up in one if the process crashes");
    }
    if let Err(e) = kluis::server::no_huge_pages() {
        tracing::warn!(error = %e, "could not turn off transparent huge pages; the vault may spend more CPU zeroing memory");
    }
    match cli.command {
        Command::Serve {
            config,
            dev,
            listen,
            data_dir,
        } => serve(config, dev, listen, data_dir),
        Command::Init { dir, listen } => init(dir, &listen),
        // Each future owns its arguments and borrows only the output.
        Command::Audit { command } => {
            tool(move |out| Box::pin(async move { kluis::cli::audit::run(&command, out).await }))
        }
        Command::Keys { command } => {
            tool(move |out| Box::pin(async move { kluis::cli::keys::run(&command, out).await }))
        }
        Command::Retention { command } => tool(move |out| {
            Box::pin(async move { kluis::cli::retention::run(&command, out).await })
        }),
        Command::Export(args) => {
            tool(move |out| Box::pin(async move { kluis::cli::export::run(&args, out).await }))
        }
    }
}

/// Runs a tool subcommand: its result on stdout, progress and errors on stderr, exit code 0,
/// 1 (refused, or the chain does not verify) or 2 (usage, configuration, IO).
fn tool(
    run: impl for<'a> FnOnce(
        &'a mut dyn Write,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), kluis::cli::audit::CliError>> + 'a>,
    >,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(kluis::cli::audit::EXIT_USAGE);
        }
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match runtime.block_on(run(&mut out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            drop(out);
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn serve(
    config: Option<PathBuf>,
    dev: bool,
    listen: Option<String>,
    data_dir: Option<PathBuf>,
) -> ExitCode {
    let settings = if dev {
        if config.is_some() {
            eprintln!("error: --dev and --config exclude each other");
            return ExitCode::from(SERVE_EXIT_START);
        }
        kluis::config::dev(
            std::path::Path::new("."),
            listen.as_deref(),
            data_dir.as_deref(),
        )
    } else {
        let path = config.unwrap_or_else(|| PathBuf::from("kluis.toml"));
        if !path.exists() {
            eprintln!(
                "error: no configuration at {}: run `kluis serve --dev` for a local vault, or `kluis init` to set up production",
                path.display()
            );
            return ExitCode::from(SERVE_EXIT_START);
        }
        kluis::config::load(&path).and_then(|mut s| {
            if let Some(l) = &listen {
                s.listen = kluis::config::parse_listen(l, "--listen")?;
            }
            if let Some(d) = data_dir {
                s.data_dir = d;
            }
            Ok(s)
        })
    };
    let settings = match settings {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(SERVE_EXIT_START);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(SERVE_EXIT_START);
        }
    };
    match runtime.block_on(kluis::server::run_staged(
        settings,
        kluis::server::termination_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err((stage, e)) => {
            eprintln!("error: {e}");
            ExitCode::from(match stage {
                kluis::server::Stage::Starting => SERVE_EXIT_START,
                kluis::server::Stage::Serving => SERVE_EXIT_FAILED,
            })
        }
    }
}

fn init(dir: PathBuf, listen: &str) -> ExitCode {
    match kluis::config::init(&dir, listen) {
        Ok(out) => {
            println!(
                "Created {} with a master key (keys/master.key, 0600) and policy.toml.",
                out.config_path.display()
            );
            println!("Bearer tokens, shown once (only their SHA-256 is stored):");
            for (name, role, token) in &out.tokens {
                println!("  {name:<22} role {role:<17} {}", token.as_str());
            }
            println!("Back up keys/master.key offline: without it no record can be read.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

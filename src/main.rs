//! The `kluis` command line: `serve` runs the vault, `init` sets up production key material
//! and configuration. Thin: everything happens in the library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Kluis: encrypted candidate-records vault (gRPC).
#[derive(Parser)]
#[command(name = "kluis", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the vault.
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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KLUIS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            dev,
            listen,
            data_dir,
        } => serve(config, dev, listen, data_dir),
        Command::Init { dir, listen } => init(dir, &listen),
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
            return ExitCode::from(2);
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
            return ExitCode::from(2);
        }
        kluis::config::load(&path).and_then(|mut s| {
            if let Some(l) = &listen {
                s.listen = kluis::config::parse_listen(l)?;
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
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kluis::server::run(
        settings,
        kluis::server::termination_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
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

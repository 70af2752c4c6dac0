//! The command line: parsing and dispatch only; behaviour lives in the library.

pub mod check;
pub mod demo;
pub mod invalidate;
pub mod run;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Exit code for success.
pub const EXIT_OK: u8 = 0;
/// Exit code for a failed check or a failed run.
pub const EXIT_FAILED: u8 = 1;
/// Exit code for a usage or config error.
pub const EXIT_USAGE: u8 = 2;

/// walbust: invalidates Redis cache keys from Postgres' logical replication stream.
#[derive(Debug, Parser)]
#[command(name = "walbust", version, about, max_term_width = 100)]
pub struct Cli {
    /// Log level or filter (overrides RUST_LOG), e.g. `info` or `walbust=debug`.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream changes from the slot and invalidate Redis keys until stopped (SIGINT/SIGTERM).
    Run {
        /// The config file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Validate the config and rule files offline; one status line per file.
    Check {
        /// The config file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Treat warnings as failures.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Start a throwaway Postgres and Redis, run the pipeline over scripted writes, and show what it invalidates.
    Demo,
    /// Invalidate keys, patterns or index sets in Redis right now, outside the stream (emergencies).
    Invalidate {
        /// The config file (for `[redis]`).
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// An exact key to UNLINK (repeatable).
        #[arg(long = "key", value_name = "KEY")]
        keys: Vec<String>,
        /// A glob to SCAN and UNLINK (repeatable).
        #[arg(long = "pattern", value_name = "GLOB")]
        patterns: Vec<String>,
        /// An index set to bust: its members, then the set (repeatable).
        #[arg(long = "tag", value_name = "SET")]
        tags: Vec<String>,
    },
}

/// Sets up `tracing` from the flags.
pub fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let filter = match &cli.log_level {
        Some(f) => EnvFilter::new(f),
        // The demo's own output is the point; its logs stay quiet unless asked for.
        None if matches!(cli.command, Command::Demo) => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"))
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

//! The command line: parsing and dispatch only; behaviour lives in the library.

pub mod check;
pub mod demo;
pub mod health;
pub mod invalidate;
pub mod record;
pub mod replay;
pub mod run;
pub mod setup;
pub mod status;
pub mod test;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use walbust::config::{Config, ConfigError};

// Exit codes: the one policy of every subcommand (README, "Exit codes"). A supervisor
// restarts on 1 and never on 2 or 3 (deploy/walbust.service: RestartPreventExitStatus=2 3),
// since restarting cannot fix a file, a password or the database's settings: it only buries
// the message under a restart loop.

/// Exit code for success.
pub const EXIT_OK: u8 = 0;
/// Exit code for a failed check or test, or a run stopped by an error that a restart may
/// clear (a slot another instance holds, a replication message walbust cannot decode).
pub const EXIT_FAILED: u8 = 1;
/// Exit code for a usage or config error: bad flags, an invalid config or rule file, a
/// rules glob matching nothing, a metrics address that cannot be parsed.
pub const EXIT_USAGE: u8 = 2;
/// Exit code for a database or credentials problem only a person can fix: authentication
/// failed, `wal_level` is not `logical`, the server is older than PostgreSQL 14, the
/// publication is missing or leaves out a rule's table, the slot is missing, unusable or lost.
pub const EXIT_NEEDS_PERSON: u8 = 3;

/// The exit code of `walbust run` for the error that stopped the pipeline.
pub fn exit_code(e: &walbust::pipeline::PipelineError) -> u8 {
    if e.needs_person() { EXIT_NEEDS_PERSON } else { EXIT_FAILED }
}

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
    /// Validate the config and rule files offline (with --online, against the database too); one status line per file.
    Check {
        /// The config file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Also check the rules against the live catalog: tables, columns, publication, replica identity.
        #[arg(long)]
        online: bool,
        /// Treat warnings as failures.
        #[arg(long)]
        deny_warnings: bool,
        /// With --online: an application role allowed to send manual invalidations, as given to `walbust setup` (repeatable).
        #[arg(long = "app-role", value_name = "ROLE")]
        app_roles: Vec<String>,
    },
    /// Ask a running walbust's /healthz (on `[metrics] listen`); exit 0 when healthy, 1 when not or unreachable.
    Health {
        /// The config file (for `[metrics] listen`).
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Start a throwaway Postgres and Redis, run the pipeline over scripted writes, and show what it invalidates.
    Demo,
    /// Run rule tests (`*.test.toml`): changes through the production router, compared with expected actions.
    Test {
        /// Test files, or directories searched for `*.test.toml` files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Run only the tests whose names match this regular expression.
        #[arg(long, value_name = "REGEX")]
        run: Option<String>,
        /// Also write the results as JUnit XML to this file.
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
    },
    /// Show the slot: active pid, confirmed flush LSN, retained WAL, wal_status, lag; exit 1 when it is missing or lost.
    Status {
        /// The config file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Print one JSON object instead of aligned lines.
        #[arg(long)]
        json: bool,
    },
    /// Print (or, with --apply, run) the SQL a DBA needs: publication, replica identity, role, grants.
    Setup {
        /// The config file.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// An application role allowed to write manual invalidation messages (repeatable).
        #[arg(long = "app-role", value_name = "ROLE")]
        app_roles: Vec<String>,
        /// Connection URL of an administrator: runs --apply, and reads replica identities for the printed script (defaults to `[source] url`).
        #[arg(long, value_name = "URL", env = ADMIN_URL_ENV, hide_env_values = true)]
        admin_url: Option<String>,
        /// Run the statements in one transaction instead of printing them.
        #[arg(long)]
        apply: bool,
    },
    /// Record the committed change stream to a file, from a temporary slot of its own, until Ctrl-C or a limit.
    Record {
        /// The config file (for `[source]`).
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// The recording to write (JSON Lines; created or truncated).
        #[arg(long, short, value_name = "FILE")]
        output: PathBuf,
        /// Stop after this long, as in 30s, 5m or 1h.
        #[arg(long, value_name = "D")]
        duration: Option<String>,
        /// Stop after this many transactions.
        #[arg(long, value_name = "N")]
        max_transactions: Option<u64>,
        /// Stop once every transaction committed before this LSN is recorded.
        #[arg(long, value_name = "L")]
        until_lsn: Option<String>,
    },
    /// Replay a recording through rule files: each transaction's actions and a summary, or with --against only what differs.
    Replay {
        /// The recording.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// A glob of rule files (repeatable).
        #[arg(long = "rules", value_name = "GLOB", required = true)]
        rules: Vec<String>,
        /// A glob of the rule files to compare with (repeatable): print only the actions --rules adds and drops.
        #[arg(long, value_name = "GLOB")]
        against: Vec<String>,
        /// Also execute the actions in Redis, batched as `walbust run` does.
        #[arg(long, requires = "redis", conflicts_with = "against")]
        apply: bool,
        /// The Redis URL for --apply.
        #[arg(long, value_name = "URL", env = REDIS_URL_ENV, hide_env_values = true)]
        redis: Option<String>,
    },
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

/// The environment variable that may give `replay --redis`, so that a password stays out of `ps`.
pub const REDIS_URL_ENV: &str = "WALBUST_REDIS_URL";
/// The environment variable that may give `setup --admin-url`, so that a password stays out of `ps`.
pub const ADMIN_URL_ENV: &str = "WALBUST_ADMIN_URL";

/// Warns when `url`, given as `flag` on the command line rather than through `env`, holds a
/// password: every local user can read it with `ps`.
/// `also` is said after the hint to use `env`.
pub fn warn_password_on_command_line(flag: &str, env: &str, also: &str, url: Option<&str>) {
    let Some(url) = url else { return };
    let from_env = std::env::var(env).is_ok_and(|v| v == url);
    if !from_env && walbust::config::redact_secrets(url) != url {
        eprintln!(
            "warning: {flag} holds a password, which every local user can read with ps\n  \
             hint: give the url in {env} instead{also}"
        );
    }
}

/// Loads the config file; on failure prints why (every problem in the file, or the read
/// error with the operating system's reason) and returns the exit code.
pub fn load_config(path: &Path) -> Result<Config, u8> {
    Config::load(path).map_err(|e| {
        print_config_error(&e);
        EXIT_USAGE
    })
}

/// Prints a config error: each problem with its place, or `error: ` and the whole chain.
pub fn print_config_error(e: &ConfigError) {
    match e {
        ConfigError::Invalid(problems) => eprintln!("{problems}"),
        other => eprintln!("error: {}", walbust::pipeline::error_chain(other)),
    }
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

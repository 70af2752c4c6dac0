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
use walbust::domain::config::{Config, ConfigError};
use walbust::domain::diagnostic::Diagnostics;
use walbust::domain::rules::manual::ManualPolicy;
use walbust::errors::exit;

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
        /// Apply this config's manual-message policy (`manual_prefixes`, `manual_match_all`) instead of the default.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
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
        /// Apply this config's manual-message policy (`manual_prefixes`, `manual_match_all`) instead of the default.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
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
    if !from_env && walbust::domain::config::redact_secrets(url) != url {
        eprintln!(
            "warning: {flag} holds a password, which every local user can read with ps\n  \
             hint: give the url in {env} instead{also}"
        );
    }
}

/// Why a subcommand stopped: the exit code and the error, printed once by [`report`].
#[derive(Debug)]
pub struct CliError {
    /// The exit code, one of [`walbust::errors::exit`].
    pub code: u8,
    error: anyhow::Error,
    /// Lines printed after the error, indented: hints and notes.
    after: Vec<String>,
}

impl CliError {
    /// `error`, exiting with `code`.
    pub fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
        CliError { code, error: error.into(), after: Vec::new() }
    }

    /// A usage or config error ([`exit::USAGE`]).
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        CliError::new(exit::USAGE, error)
    }

    /// A failure a retry may clear ([`exit::FAILED`]).
    pub fn failed(error: impl Into<anyhow::Error>) -> Self {
        CliError::new(exit::FAILED, error)
    }

    /// Adds what to do about it, printed after the error as `  hint: ...`.
    pub fn hint(self, hint: impl std::fmt::Display) -> Self {
        self.note(format!("hint: {hint}"))
    }

    /// Adds a line said after the error, indented.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.after.push(note.into());
        self
    }
}

/// What a subcommand returns: the exit code of an outcome it has printed itself, or the
/// error that stopped it.
pub type Outcome = Result<u8, CliError>;

/// Prints `error: ` and the error with its causes, each once (the operating system's
/// reason included; see [`chain`]), then the hints and notes. Problems listed with their
/// places (an invalid config or rule file) print as they are: each carries its own
/// `error:` and hint.
pub fn report(e: &CliError) {
    let problems = match e.error.downcast_ref::<ConfigError>() {
        Some(ConfigError::Invalid(problems)) => Some(problems),
        _ => e.error.downcast_ref::<Diagnostics>(),
    };
    match problems {
        Some(problems) => eprintln!("{problems}"),
        None => eprintln!("error: {}", walbust::errors::causes::error_chain(e.error.as_ref())),
    }
    for line in &e.after {
        eprintln!("  {line}");
    }
}

/// Loads the config file; the error is every problem in the file, or the read error.
pub fn load_config(path: &Path) -> Result<Config, CliError> {
    Config::load(path).map_err(CliError::usage)
}

/// The manual-message policy of the config at `path` (read as the offline `check` reads it:
/// no secret, an unset `${VAR}` no error), or `walbust run`'s default without one.
pub fn manual_policy(path: Option<&Path>) -> Result<ManualPolicy, CliError> {
    let Some(path) = path else { return Ok(ManualPolicy::default()) };
    let (config, _notes) = Config::load_offline(path).map_err(CliError::usage)?;
    Ok(config.source.manual)
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
    // Colour only for a person at a terminal: never into a file, a pipe or the journal.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use walbust::errors::causes::error_chain;

    /// An error whose message repeats its source's, as redis-rs' errors do.
    #[derive(Debug, thiserror::Error)]
    #[error("failed while sending: {source}")]
    struct Repeats {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_the_message_already_says_is_printed_once() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let error = anyhow::Error::new(Repeats { source: io }).context("redis at localhost");
        assert_eq!(error_chain(error.as_ref()), "redis at localhost: failed while sending: connection refused");
    }

    #[test]
    fn each_cause_is_printed_after_the_error() {
        let io = std::io::Error::from_raw_os_error(2);
        let error = anyhow::Error::new(io).context("cannot read config file /missing");
        assert_eq!(
            error_chain(error.as_ref()),
            "cannot read config file /missing: No such file or directory (os error 2)"
        );
    }
}

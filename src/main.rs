//! The `walbust` binary: parses arguments, dispatches, and turns outcomes into exit codes;
//! an error that stops a subcommand is printed here, once ([`cli::report`]).

mod cli;

use clap::Parser;
use cli::{Cli, CliError, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    quiet_on_broken_pipe();
    let cli = Cli::parse();
    cli::init_logging(&cli);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            cli::report(&e);
            ExitCode::from(e.code)
        }
    }
}

/// Runs the subcommand; the exit code of its outcome, or the error that stopped it.
fn run(cli: Cli) -> Result<ExitCode, CliError> {
    // One thread: the pipeline is a reader and an applier handing batches to each other,
    // mostly waiting on sockets. On one thread a hand-over is a local wake-up rather than a
    // cross-thread one (a futex call and a second thread's epoll), and walbust leaves the
    // other cores to the database it sits beside.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(anyhow::Error::new(e).context("cannot start the async runtime")))?;
    let code = match cli.command {
        Command::Run { config } => runtime.block_on(cli::run::run(&config)),
        Command::Check { config, online, deny_warnings, app_roles } => {
            runtime.block_on(cli::check::check(&config, online, deny_warnings, &app_roles))
        }
        Command::Health { config } => runtime.block_on(cli::health::health(&config)),
        Command::Demo => runtime.block_on(cli::demo::demo()),
        Command::Status { config, json } => runtime.block_on(cli::status::status(&config, json)),
        Command::Setup { config, app_roles, admin_url, apply } => {
            let also = ", or leave the password out of it and set PGPASSWORD";
            cli::warn_password_on_command_line("--admin-url", cli::ADMIN_URL_ENV, also, admin_url.as_deref());
            runtime.block_on(cli::setup::setup(&config, &app_roles, admin_url.as_deref(), apply))
        }
        Command::Test { files, run, junit, config } => {
            cli::test::test(&files, run.as_deref(), junit.as_deref(), config.as_deref())
        }
        Command::Record { config, output, duration, max_transactions, until_lsn } => runtime.block_on(
            cli::record::record(&config, &output, duration.as_deref(), max_transactions, until_lsn.as_deref()),
        ),
        Command::Replay { file, rules, against, config, apply, redis } => {
            cli::warn_password_on_command_line("--redis", cli::REDIS_URL_ENV, "", redis.as_deref().filter(|_| apply));
            let redis = redis.as_deref().filter(|_| apply);
            runtime.block_on(cli::replay::replay(&file, &rules, &against, config.as_deref(), redis))
        }
        Command::Invalidate { config, keys, patterns, tags } => {
            runtime.block_on(cli::invalidate::invalidate(&config, keys, patterns, tags))
        }
    }?;
    Ok(ExitCode::from(code))
}

/// `walbust check | head -1`: once the reader is gone, printing fails with EPIPE, and
/// `println!` panics. Die of SIGPIPE instead, quietly, as other command-line tools do.
/// Only stdout and stderr are concerned: sockets keep getting EPIPE as an error (Rust
/// ignores SIGPIPE), so a dropped database or Redis connection never kills walbust.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to std") && message.contains("Broken pipe") {
            // SAFETY: restoring the default disposition of SIGPIPE and raising it in this
            // process; nothing else is running that relies on the ignored disposition.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
        }
        default(info);
    }));
}

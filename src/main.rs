//! The `walbust` binary: parses arguments, dispatches, and turns outcomes into exit codes.

mod cli;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging(&cli);
    // One thread: the pipeline is a reader and an applier handing batches to each other,
    // mostly waiting on sockets. On one thread a hand-over is a local wake-up rather than a
    // cross-thread one (a futex call and a second thread's epoll), and walbust leaves the
    // other cores to the database it sits beside.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_FAILED);
        }
    };
    let code = match cli.command {
        Command::Run { config } => runtime.block_on(cli::run::run(&config)),
        Command::Check { config, online, deny_warnings } => {
            runtime.block_on(cli::check::check(&config, online, deny_warnings))
        }
        Command::Health { config } => runtime.block_on(cli::health::health(&config)),
        Command::Demo => runtime.block_on(cli::demo::demo()),
        Command::Status { config, json } => runtime.block_on(cli::status::status(&config, json)),
        Command::Setup { config, app_roles, admin_url, apply } => {
            runtime.block_on(cli::setup::setup(&config, &app_roles, admin_url.as_deref(), apply))
        }
        Command::Test { files, run, junit } => cli::test::test(&files, run.as_deref(), junit.as_deref()),
        Command::Record { config, output, duration, max_transactions, until_lsn } => runtime.block_on(
            cli::record::record(&config, &output, duration.as_deref(), max_transactions, until_lsn.as_deref()),
        ),
        Command::Replay { file, rules, against, apply, redis } => {
            runtime.block_on(cli::replay::replay(&file, &rules, &against, redis.as_deref().filter(|_| apply)))
        }
        Command::Invalidate { config, keys, patterns, tags } => {
            runtime.block_on(cli::invalidate::invalidate(&config, keys, patterns, tags))
        }
    };
    ExitCode::from(code)
}

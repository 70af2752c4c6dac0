//! The `walbust` binary: parses arguments, dispatches, and turns outcomes into exit codes.

mod cli;

use clap::Parser;
use cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_FAILED);
        }
    };
    let code = match cli.command {
        Command::Run { config } => runtime.block_on(cli::run::run(&config)),
        Command::Check { config, deny_warnings } => cli::check::check(&config, deny_warnings),
        Command::Demo => runtime.block_on(cli::demo::demo()),
        Command::Invalidate { config, keys, patterns, tags } => {
            runtime.block_on(cli::invalidate::invalidate(&config, keys, patterns, tags))
        }
    };
    ExitCode::from(code)
}

//! `walbust record`: the committed change stream written to a recording file.

use super::{CliError, Outcome};
use anyhow::anyhow;
use std::path::Path;
use walbust::domain::config::parse_duration;
use walbust::domain::diagnostic::plural;
use walbust::errors::exit;
use walbust::offline::recording::recorder::{Event, Limits, RecordOptions, Totals};
use walbust::postgres::lsn::Lsn;

/// Records from a temporary slot of its own until SIGINT/SIGTERM or a limit; returns the
/// exit code: 0 stopped cleanly (the file is a complete recording), 1 the stream failed
/// (the file holds every transaction before the failure), 2 a usage or config error.
pub async fn record(
    config_path: &Path,
    output: &Path,
    duration: Option<&str>,
    max_transactions: Option<u64>,
    until_lsn: Option<&str>,
) -> Outcome {
    let duration = duration.map(|d| parse_duration(d).ok_or(d)).transpose().map_err(|d| {
        CliError::usage(anyhow!("invalid --duration `{d}`")).hint("write a number and a unit, as in 30s, 5m or 1h")
    })?;
    let until_lsn = until_lsn.map(str::parse::<Lsn>).transpose().map_err(|e| {
        CliError::usage(anyhow!("invalid --until-lsn: {e}"))
            .hint("SELECT pg_current_wal_lsn(); prints the current position")
    })?;
    if max_transactions == Some(0) {
        return Err(CliError::usage(anyhow!("--max-transactions 0 would record nothing"))
            .hint("give at least 1, or leave it out"));
    }
    let config = super::load_config(config_path)?;
    let options = RecordOptions {
        output: output.to_path_buf(),
        limits: Limits { duration, max_transactions, until_lsn },
        slot: None,
    };
    let file = output.display().to_string();
    let on_event = |event: Event| match event {
        Event::Started { slot, start, relations } => eprintln!(
            "recording publication `{}` from temporary slot `{slot}` at {start} ({}) into {file}; stop with Ctrl-C",
            config.source.publication,
            plural(relations as u64, "published table", "published tables")
        ),
        Event::Progress(t) => eprintln!("recorded {}", totals(&t)),
        Event::Stopping(reason) => eprintln!("stopping ({reason}); finishing the transaction in hand"),
    };
    let outcome = walbust::offline::recording::record(&config.source, &options, shutdown_signal(), on_event).await;
    let outcome = outcome.map_err(|e| CliError::new(if e.is_usage() { exit::USAGE } else { exit::FAILED }, e))?;
    let Some(o) = outcome else {
        eprintln!("stopped before the recording started; nothing was written");
        return Ok(exit::OK);
    };
    if o.dropped_open {
        eprintln!("warning: the transaction in hand did not commit in time and is not in the recording");
    }
    match o.ended {
        Ok(reason) => {
            eprintln!("recorded {} into {file} ({reason})", totals(&o.totals));
            Ok(exit::OK)
        }
        Err(e) => Err(CliError::failed(e).note(format!("{file} holds the {} before the failure", totals(&o.totals)))),
    }
}

fn totals(t: &Totals) -> String {
    format!(
        "{}, {}, {}, {} changed; through {}",
        plural(t.transactions, "transaction", "transactions"),
        plural(t.changes, "row change", "row changes"),
        plural(t.messages, "message", "messages"),
        plural(t.relations, "table definition", "table definitions"),
        t.flushed
    )
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without handlers the default action stops the process; lines written are complete.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

//! `walbust run`: the daemon.

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use std::path::Path;
use std::sync::Arc;
use tracing::{error, info, warn};
use walbust::config::Config;
use walbust::pipeline::{self, Stats, error_chain};
use walbust::rules::RuleSet;
use walbust::sink::RedisSink;

/// Runs until SIGINT or SIGTERM; returns the exit code.
pub async fn run(config_path: &Path) -> u8 {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_USAGE;
        }
    };
    let loaded = match RuleSet::load(&config.rules) {
        Ok(l) => l,
        Err(problems) => {
            eprintln!("{problems}");
            return EXIT_USAGE;
        }
    };
    for w in loaded.warnings.warnings() {
        warn!("{w}");
    }
    let sink = match RedisSink::new(&config.redis.url, config.redis.ca_pem.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return EXIT_USAGE;
        }
    };
    info!(source = %config.source.conninfo.describe(), redis = %sink.description(), rules = loaded.rules.rules().len(),
        slot = %config.source.slot, "starting");
    let stats = Arc::new(Stats::default());
    let result = pipeline::run(&config, Arc::new(loaded.rules), sink, shutdown_signal(), None, stats.clone()).await;
    match result {
        Ok(()) => {
            info!(changes = Stats::get(&stats.changes), commits = Stats::get(&stats.commits), "stopped");
            EXIT_OK
        }
        Err(e) => {
            error!("{}", error_chain(&e));
            eprintln!("error: {}", error_chain(&e));
            EXIT_FAILED
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the process can still be stopped; it just replays more on restart.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: finishing the batch in hand"),
        _ = int.recv() => info!("SIGINT: finishing the batch in hand"),
    }
}

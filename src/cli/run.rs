//! `walbust run`: the daemon.

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{error, info, warn};
use walbust::config::{Config, ConfigError};
use walbust::pipeline::{self, Options, Stats, error_chain};
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
    let rules = Arc::new(loaded.rules);
    let (reload_tx, reload) = watch::channel(rules.clone());
    let reloader = tokio::spawn(reload_on_sighup(config_path.to_path_buf(), reload_tx));
    let options = Options { observer: None, stats: stats.clone(), reload: Some(reload) };
    let result = pipeline::run(&config, rules, sink, shutdown_signal(), options).await;
    reloader.abort();
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

/// On each SIGHUP, re-reads the config's rule files; a valid set replaces the running one
/// at the next transaction boundary, an invalid one is logged in full and ignored.
async fn reload_on_sighup(config_path: PathBuf, rules: watch::Sender<Arc<RuleSet>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot listen for SIGHUP; rule reloads need a restart");
        return;
    };
    while hup.recv().await.is_some() {
        info!(config = %config_path.display(), "SIGHUP: reloading rules");
        let config = match Config::load(&config_path) {
            Ok(c) => c,
            Err(ConfigError::Invalid(problems)) => {
                for p in problems.errors() {
                    error!("{p}");
                }
                error!("reload rejected: the config file has errors; the rules in use stay");
                continue;
            }
            Err(e) => {
                error!("reload rejected: {}; the rules in use stay", error_chain(&e));
                continue;
            }
        };
        match RuleSet::load(&config.rules) {
            Ok(loaded) => {
                for w in loaded.warnings.warnings() {
                    warn!("{w}");
                }
                info!(rules = loaded.rules.rules().len(), files = loaded.files.len(), "new rules accepted");
                let _ = rules.send(Arc::new(loaded.rules));
            }
            Err(problems) => {
                for p in problems.errors() {
                    error!("{p}");
                }
                error!(
                    errors = problems.errors().count(),
                    "reload rejected: the rule files have errors; the rules in use stay"
                );
            }
        }
    }
}

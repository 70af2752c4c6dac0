//! `walbust run`: the daemon.

use super::{CliError, Outcome};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{error, info, warn};
use walbust::daemon::pipeline::{self, Options};
use walbust::domain::config::{Config, ConfigError};
use walbust::domain::rules::{Loaded, RuleSet};
use walbust::errors::causes::error_chain;
use walbust::errors::exit;
use walbust::ops::catalog::StartupCheck;
use walbust::sink::RedisSink;
use walbust::telemetry::health::Health;
use walbust::telemetry::metrics::Metrics;

/// Runs until SIGINT or SIGTERM; returns the exit code.
pub async fn run(config_path: &Path) -> Outcome {
    let config = super::load_config(config_path)?;
    let loaded = RuleSet::load(&config.rules).map_err(CliError::usage)?;
    for w in loaded.warnings.warnings() {
        warn!("{w}");
    }
    if let Err(refused) = validate_against_database(&config, &loaded.rules).await {
        for unmet in &refused.server {
            eprintln!("error: {}\n  hint: {}", unmet.problem, unmet.fix);
        }
        if !refused.diagnostics.0.is_empty() {
            eprintln!("{}", refused.diagnostics);
        }
        // The database needs fixing rather than the files: see exit::NEEDS_PERSON.
        let database = refused.publication_unfit || !refused.server.is_empty();
        return Ok(if database { exit::NEEDS_PERSON } else { exit::USAGE });
    }
    let sink = RedisSink::from_config(&config.redis).map_err(CliError::usage)?;
    info!(source = %config.source.conninfo.describe(), redis = %sink.description(), rules = loaded.rules.rules().len(),
        slot = %config.source.slot, "starting");
    let rules = Arc::new(loaded.rules);
    let (reload_tx, reload) = watch::channel(rules.clone());
    let (metrics, health) = (Metrics::new(), Health::new());
    let (stop_tx, stop) = watch::channel(false);
    let mut background = vec![tokio::spawn(reload_on_sighup(config.clone(), reload_tx, metrics.clone()))];
    if let Some(listen) = &config.metrics.listen {
        // A busy port is retried in the background: invalidation does not wait for metrics.
        background.push(tokio::spawn(walbust::telemetry::health::serve_when_bound(
            listen.clone(),
            metrics.clone(),
            health.clone(),
            stopped(stop.clone()),
        )));
    }
    background.push(tokio::spawn({
        let (config, metrics, stop) = (config.clone(), metrics.clone(), stop.clone());
        async move { walbust::ops::status::monitor(&config, metrics, SLOT_CHECK_INTERVAL, stopped(stop)).await }
    }));
    let options = Options { observer: None, reload: Some(reload), metrics: metrics.clone(), health };
    let shutdown = async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    };
    let result = pipeline::run(&config, rules, sink, shutdown, options).await;
    for task in background {
        task.abort();
    }
    match result {
        Ok(()) => {
            info!(changes = metrics.changes_total(), commits = metrics.commits(), "stopped");
            Ok(exit::OK)
        }
        // Logged here, once, with its causes; the exit code tells a supervisor whether to restart.
        Err(e) => {
            error!(slot = %config.source.slot, error = %error_chain(&e), "stopping: the error is not one that retrying can fix");
            Ok(if e.needs_person() { exit::NEEDS_PERSON } else { exit::FAILED })
        }
    }
}

/// How often the slot's retained WAL and wal_status are read for the metrics.
const SLOT_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);

/// Resolves once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
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
/// at the next transaction boundary, an invalid one is logged in full and ignored. Other
/// settings take effect on restart; a warning names those that changed.
async fn reload_on_sighup(running: Config, rules: watch::Sender<Arc<RuleSet>>, metrics: Arc<Metrics>) {
    let config_path = running.path.clone();
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot listen for SIGHUP; rule reloads need a restart");
        return;
    };
    while hup.recv().await.is_some() {
        info!(config = %config_path.display(), "SIGHUP: reloading rules");
        // Reading and compiling a large rule set takes a while; on the runtime's one thread
        // it would stall invalidation and /metrics meanwhile.
        let path = config_path.clone();
        let (config, loaded) = match tokio::task::spawn_blocking(move || load_for_reload(&path)).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                metrics.reload_failed();
                continue;
            }
            Err(e) => {
                metrics.reload_failed();
                error!(error = %e, "reload rejected: loading the rules failed; the rules in use stay");
                continue;
            }
        };
        let unapplied = walbust::domain::config::restart_only_changes(&running, &config);
        if !unapplied.is_empty() {
            warn!(settings = %unapplied.join(", "), "these changed settings take effect only on restart; the running ones stay");
        }
        for w in loaded.warnings.warnings() {
            warn!("{w}");
        }
        if let Err(refused) = validate_against_database(&config, &loaded.rules).await {
            for p in refused.diagnostics.errors() {
                error!("{p}");
            }
            for unmet in &refused.server {
                error!("{unmet}");
            }
            metrics.reload_failed();
            error!(
                "reload rejected: the rules name columns the tables lack, or tables the publication leaves out; the rules in use stay"
            );
            continue;
        }
        info!(rules = loaded.rules.rules().len(), files = loaded.files.len(), "new rules accepted");
        let _ = rules.send(Arc::new(loaded.rules));
    }
}

/// Reads the config and its rule files for a reload; `None` (with the problems logged)
/// when either has errors.
fn load_for_reload(config_path: &Path) -> Option<(Config, Loaded)> {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(ConfigError::Invalid(problems)) => {
            for p in problems.errors() {
                error!("{p}");
            }
            error!("reload rejected: the config file has errors; the rules in use stay");
            return None;
        }
        Err(e) => {
            error!("reload rejected: {}; the rules in use stay", error_chain(&e));
            return None;
        }
    };
    match RuleSet::load(&config.rules) {
        Ok(loaded) => Some((config, loaded)),
        Err(problems) => {
            for p in problems.errors() {
                error!("{p}");
            }
            error!(
                errors = problems.errors().count(),
                "reload rejected: the rule files have errors; the rules in use stay"
            );
            None
        }
    }
}

/// Checks the rules against the live catalog (see [`walbust::ops::catalog::validate_startup`]):
/// a misspelt column is an error at load rather than a widened pattern at run time, and a
/// table the publication leaves out (whose changes would never be invalidated) stops the
/// start with the statement that fixes it. When the database cannot be reached the check
/// is skipped with a warning: the pipeline then waits for the database, and still widens
/// (and logs) any column a table lacks.
async fn validate_against_database(config: &Config, rules: &RuleSet) -> Result<(), StartupCheck> {
    let client = match walbust::postgres::connect_sql(&config.source.conninfo).await {
        Ok(c) => c,
        // A failure retrying may clear is worth a warning: the pipeline then waits for the
        // database. Any other (a refused password) stops the pipeline, which reports it once.
        Err(e) if e.is_transient() => {
            warn!(error = %error_chain(&e), "cannot check the rules against the database now");
            return Ok(());
        }
        Err(e) => {
            tracing::debug!(error = %error_chain(&e), "cannot check the rules against the database");
            return Ok(());
        }
    };
    match walbust::ops::catalog::validate_startup(&client, config, rules).await {
        Ok(found) if found.diagnostics.has_errors() || !found.server.is_empty() => Err(found),
        Ok(found) => {
            for w in found.diagnostics.warnings() {
                warn!("{w}");
            }
            Ok(())
        }
        Err(e) => {
            warn!(error = %error_chain(&e), "cannot check the rules against the database now");
            Ok(())
        }
    }
}

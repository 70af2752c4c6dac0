//! `walbust check`: the config and every rule file, validated offline, and with `--online`
//! against the database's catalog too (tables, columns, publication, replica identity) and
//! the Redis side (one node, every cluster primary, or the master the Sentinels name).

use super::{CliError, Outcome};
use std::path::Path;
use std::time::Duration;
use walbust::daemon::slot::{self, ServerSettings};
use walbust::domain::config::{Config, ConfigError};
use walbust::domain::diagnostic::{Diagnostic, Diagnostics, plural};
use walbust::domain::rules::RuleSet;
use walbust::errors::exit;
use walbust::ops::catalog;
use walbust::ops::setup::extra_emitters;
use walbust::postgres::connect_sql;

/// How long `--online` waits for the database when the config sets no `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Prints one status line per file, then the problems; returns the exit code.
pub async fn check(config_path: &Path, online: bool, deny_warnings: bool, app_roles: &[String]) -> Outcome {
    // Offline, no secret is read: the check runs in CI without production credentials.
    let loaded = if online {
        Config::load(config_path).map(|c| (c, Diagnostics::default()))
    } else {
        Config::load_offline(config_path)
    };
    let (config, unread) = loaded.map_err(|e| {
        if let ConfigError::Invalid(_) = e {
            println!("FAIL {}", config_path.display());
        }
        CliError::usage(e)
    })?;
    println!("ok   {}", config_path.display());
    if !unread.0.is_empty() {
        // Not counted as warnings: --deny-warnings in CI must not need production secrets.
        eprintln!("{unread}");
    }
    let loaded = match RuleSet::load(&config.rules) {
        Ok(loaded) => loaded,
        Err(problems) => {
            let mut files: Vec<&Path> = problems.0.iter().map(|d| d.file.as_path()).collect();
            files.dedup();
            for f in files {
                println!("FAIL {}", f.display());
            }
            eprintln!("{problems}");
            if online {
                eprintln!("note: the online check did not run; fix the rule files first");
            }
            // A glob that matches nothing (or a file that cannot be read) is the config's
            // `rules` list at fault, a config error as in `walbust run`; the rule files'
            // own problems are a failed check.
            let config_problem = problems.errors().any(|d| d.line == 0 && !d.file.is_file());
            return Ok(if config_problem { exit::USAGE } else { exit::FAILED });
        }
    };
    let mut diagnostics = loaded.warnings;
    let mut server_ok = true;
    if online {
        match check_database(&config, &loaded.rules, app_roles).await {
            Ok((found, settings)) => {
                let unmet = slot::requirements(&settings, &config.source.slot);
                server_ok = unmet.is_empty();
                println!(
                    "{} server PostgreSQL {}: wal_level {}, replication slots {} of {} in use, wal senders {} of {} in use",
                    if server_ok { "ok  " } else { "FAIL" },
                    settings.version,
                    settings.wal_level,
                    settings.slots.len(),
                    settings.max_replication_slots,
                    settings.wal_senders,
                    settings.max_wal_senders,
                );
                for u in &unmet {
                    eprintln!("error: {}\n  hint: {}", u.problem, u.fix);
                }
                if config.source.failover {
                    server_ok &= check_failover(&config.source.conninfo).await;
                }
                let tables = loaded.rules.tables().len();
                let publication_missing = found.0.iter().any(|d| d.file == config.path && d.is_error());
                println!(
                    "{} database {}, publication `{}` ({tables} table{})",
                    if publication_missing { "FAIL" } else { "ok  " },
                    config.source.conninfo.describe(),
                    config.source.publication,
                    if tables == 1 { "" } else { "s" }
                );
                diagnostics.0.extend(found.0);
                let redis = walbust::sink::inspect(&config.redis).await;
                println!("{} redis {}", if redis.problems.is_empty() { "ok  " } else { "FAIL" }, redis.summary);
                for problem in &redis.problems {
                    eprintln!("error: {problem}");
                }
                server_ok &= redis.problems.is_empty();
            }
            Err(e) => {
                println!("FAIL database {}", config.source.conninfo.describe());
                return Err(e);
            }
        }
    }
    for file in &loaded.files {
        let n = loaded.rules.rules().iter().filter(|r| r.file == *file).count();
        let mut here = diagnostics.0.iter().filter(|d| d.file == *file);
        let status = if here.clone().any(|d| d.is_error()) {
            "FAIL"
        } else if here.next().is_some() {
            "warn"
        } else {
            "ok  "
        };
        println!("{status} {} ({})", file.display(), plural(n as u64, "rule", "rules"));
    }
    if !diagnostics.0.is_empty() {
        eprintln!("{diagnostics}");
    }
    if !server_ok || diagnostics.has_errors() || (deny_warnings && !diagnostics.0.is_empty()) {
        Ok(exit::FAILED)
    } else {
        Ok(exit::OK)
    }
}

/// Prints what `failover = true` needs of the primary and the standbys in `[source] url`;
/// true when nothing is missing.
async fn check_failover(info: &walbust::postgres::ConnInfo) -> bool {
    match walbust::ops::failover::check(info).await {
        Ok(found) => {
            let standbys: Vec<&str> = found.servers.iter().filter(|s| s.standby).map(|s| s.endpoint.as_str()).collect();
            println!(
                "{} failover slot: standbys {}",
                if found.unmet.is_empty() { "ok  " } else { "FAIL" },
                if standbys.is_empty() { "none".to_string() } else { standbys.join(", ") }
            );
            for u in &found.unmet {
                eprintln!("error: {}\n  hint: {}", u.problem, u.fix);
            }
            found.unmet.is_empty()
        }
        Err(e) => {
            println!("FAIL failover slot");
            eprintln!("error: {}", walbust::errors::causes::error_chain(&e));
            false
        }
    }
}

/// Connects with `[source]`, checks the rules against the catalog, reads the server's
/// settings and who may send manual invalidations; the error says why the database could
/// not be checked.
async fn check_database(
    config: &Config,
    rules: &RuleSet,
    app_roles: &[String],
) -> Result<(Diagnostics, ServerSettings), CliError> {
    let info = &config.source.conninfo;
    let limit = if info.connect_timeout.is_zero() { CONNECT_TIMEOUT } else { info.connect_timeout * 2 };
    let client = match tokio::time::timeout(limit, connect_sql(info)).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => {
            let error = anyhow::Error::new(e)
                .context(format!("cannot reach the database {} for the online check", info.describe()));
            return Err(CliError::usage(error).hint(
                "check [source] url, the password (PGPASSWORD or password_file) and that the server is up, \
                 or run check without --online",
            ));
        }
        Err(_) => {
            let error = anyhow::anyhow!(
                "timed out after {limit:?} connecting to the database {} for the online check",
                info.describe()
            );
            return Err(CliError::usage(error)
                .hint("check [source] url and that the server is reachable, or run check without --online"));
        }
    };
    let unreadable = |e: catalog::CatalogError| {
        CliError::usage(anyhow::Error::new(e).context(format!("cannot read the catalog of {}", info.describe())))
    };
    let settings = catalog::read_server(&client, &config.source.slot).await.map_err(unreadable)?;
    let mut found = catalog::check_online(&client, config, rules).await.map_err(unreadable)?;
    let extra = extra_emitters(&client, &info.user, app_roles).await.map_err(|e| {
        CliError::usage(anyhow::Error::new(e).context("cannot read the grants of pg_logical_emit_message"))
    })?;
    if !extra.is_empty() {
        found.0.push(Diagnostic::warning(&config.path, "", None, extra.message()).with_hint(format!(
            "name the application roles with --app-role and run walbust setup --apply, or run as a superuser:\n{}",
            extra.fix_sql(&info.user, app_roles)
        )));
    }
    Ok((found, settings))
}

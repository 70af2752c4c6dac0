//! `walbust setup`: prints (or applies) the SQL that prepares a database; the logic is `walbust::ops::setup`.

use super::{CliError, Outcome};
use anyhow::anyhow;
use std::path::Path;
use std::time::Duration;
use walbust::domain::config::Config;
use walbust::domain::rules::RuleSet;
use walbust::errors::causes::error_chain;
use walbust::errors::exit;
use walbust::ops::setup::{apply, read_live, setup_sql_with};
use walbust::postgres::{ConnInfo, connect_sql};

/// How long printing the script waits for the database before printing it unchecked.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Prints the setup script, checking replica identities and the publication when it can connect (as
/// `admin_url`, else as `[source] url`); with `apply` it runs everything as that role in
/// one transaction instead. Returns the exit code.
pub async fn setup(config_path: &Path, app_roles: &[String], admin_url: Option<&str>, run: bool) -> Outcome {
    // Printing, or applying as another role, never logs in as the walbust role: its
    // password file need not exist yet.
    let loaded =
        if run && admin_url.is_none() { Config::load(config_path) } else { Config::load_without_password(config_path) };
    let config = loaded.map_err(CliError::usage)?;
    let rules = RuleSet::load(&config.rules).map_err(CliError::usage)?.rules;
    let admin = match admin_url {
        None => config.source.conninfo.clone(),
        Some(url) => match ConnInfo::parse(url, |name| std::env::var(name).ok()) {
            Ok(mut a) => {
                if a.password_from.as_deref() == Some("the connection string") {
                    a.password_from = Some("--admin-url".into());
                }
                a
            }
            Err(e) => return Err(CliError::usage(anyhow::Error::new(e).context("invalid --admin-url"))),
        },
    };
    let result = if run {
        apply(&admin, &config, &rules, app_roles).await.map(|applied| {
            for line in &applied.done {
                println!("done    {line}");
            }
            for line in &applied.skipped {
                println!("skipped {line}");
            }
            for line in &applied.warnings {
                eprintln!("warning: {line}");
            }
            for line in &applied.server_unready {
                eprintln!("error: {line}");
            }
            applied.server_unready.is_empty()
        })
    } else {
        let who = if admin_url.is_some() { "--admin-url" } else { "[source] url" };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect_sql(&admin)).await {
            Ok(Ok(client)) => read_live(&client, &config.source.publication, &rules).await.map(|live| {
                print!("{}", setup_sql_with(&config, &rules, app_roles, Ok(&live)));
                true
            }),
            Ok(Err(e)) => {
                let why = format!("cannot connect as {who} ({}): {}", admin.describe(), error_chain(&e));
                print!("{}", setup_sql_with(&config, &rules, app_roles, Err(&why)));
                Ok(true)
            }
            Err(_) => {
                let why = format!("no connection as {who} ({}) within {CONNECT_TIMEOUT:?}", admin.describe());
                print!("{}", setup_sql_with(&config, &rules, app_roles, Err(&why)));
                Ok(true)
            }
        }
    };
    match result {
        Ok(true) => Ok(exit::OK),
        // The database is set up, but the server needs a setting and a restart first.
        Ok(false) => Err(CliError::new(
            exit::NEEDS_PERSON,
            anyhow!("the database is set up, but walbust cannot stream until the server settings above are changed"),
        )),
        Err(e) => Err(CliError::new(e.exit_code(), e)),
    }
}

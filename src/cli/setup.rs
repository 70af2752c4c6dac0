//! `walbust setup`: prints (or applies) the SQL that prepares a database; the logic is `walbust::setup`.

use super::{EXIT_OK, EXIT_USAGE};
use std::path::Path;
use walbust::config::Config;
use walbust::rules::RuleSet;
use walbust::setup::{apply, replica_identity_advice, setup_sql, setup_sql_with};
use walbust::source::{ConnInfo, connect_sql};

/// Prints the setup script; with `admin_url` it also checks replica identities, and with
/// `apply` it runs everything as that admin in one transaction. Returns the exit code.
pub async fn setup(config_path: &Path, app_roles: &[String], admin_url: Option<&str>, run: bool) -> u8 {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    let rules = match RuleSet::load(&config.rules) {
        Ok(loaded) => loaded.rules,
        Err(problems) => {
            eprintln!("{problems}");
            return EXIT_USAGE;
        }
    };
    let Some(url) = admin_url else {
        if run {
            eprintln!("error: --apply needs --admin-url, a superuser connection to the application database");
            return EXIT_USAGE;
        }
        print!("{}", setup_sql(&config, &rules, app_roles));
        return EXIT_OK;
    };
    let admin = match ConnInfo::parse(url, |name| std::env::var(name).ok()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: invalid --admin-url: {e}");
            return EXIT_USAGE;
        }
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
        })
    } else {
        match connect_sql(&admin).await {
            Ok(client) => replica_identity_advice(&client, &rules)
                .await
                .map(|advice| print!("{}", setup_sql_with(&config, &rules, app_roles, Some(&advice)))),
            Err(e) => Err(walbust::setup::ApplyError::Connect(e)),
        }
    };
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            let code = e.exit_code();
            eprintln!("error: {:#}", anyhow::Error::from(e));
            code
        }
    }
}

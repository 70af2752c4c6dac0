//! `walbust invalidate`: manual invalidation straight to Redis, for emergencies.

use super::{CliError, Outcome};
use std::path::Path;
use walbust::domain::action::Invalidation;
use walbust::errors::exit;
use walbust::sink::{RedisSink, Sink};

/// Applies the given keys, patterns and tags to the config's Redis; returns the exit code.
pub async fn invalidate(config_path: &Path, keys: Vec<String>, patterns: Vec<String>, tags: Vec<String>) -> Outcome {
    let asked = Invalidation { keys, patterns, tags };
    if let Some(what) = asked.empty_entry() {
        return Err(CliError::usage(anyhow::anyhow!(
            "an empty --{what}; an empty key or pattern does nothing or everything"
        )));
    }
    let actions = asked.into_actions();
    if actions.is_empty() {
        return Err(CliError::usage(anyhow::anyhow!(
            "nothing to invalidate; give at least one --key, --pattern or --tag"
        )));
    }
    let config = super::load_config(config_path)?;
    let mut sink = RedisSink::from_config(&config.redis).map_err(CliError::usage)?;
    sink.apply(&actions).await.map_err(CliError::failed)?;
    for a in &actions {
        println!("{a}");
    }
    println!("{} deleted", walbust::domain::diagnostic::plural(sink.take_deleted(), "key", "keys"));
    Ok(exit::OK)
}

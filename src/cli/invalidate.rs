//! `walbust invalidate`: manual invalidation straight to Redis, for emergencies.

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use std::path::Path;
use walbust::action::Invalidation;
use walbust::pipeline::error_chain;
use walbust::sink::{RedisSink, Sink};

/// Applies the given keys, patterns and tags to the config's Redis; returns the exit code.
pub async fn invalidate(config_path: &Path, keys: Vec<String>, patterns: Vec<String>, tags: Vec<String>) -> u8 {
    let asked = Invalidation { keys, patterns, tags };
    if let Some(what) = asked.empty_entry() {
        eprintln!("error: an empty --{what}; an empty key or pattern does nothing or everything");
        return EXIT_USAGE;
    }
    let actions = asked.into_actions();
    if actions.is_empty() {
        eprintln!("error: nothing to invalidate; give at least one --key, --pattern or --tag");
        return EXIT_USAGE;
    }
    let config = match super::load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut sink = match RedisSink::new(&config.redis.url, config.redis.ca_pem.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return EXIT_USAGE;
        }
    };
    match sink.apply(&actions).await {
        Ok(()) => {
            for a in &actions {
                println!("{a}");
            }
            println!("{} deleted", walbust::diagnostic::plural(sink.take_deleted(), "key", "keys"));
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            EXIT_FAILED
        }
    }
}

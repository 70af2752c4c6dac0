//! `walbust check`: the config and every rule file, validated offline.

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use std::path::Path;
use walbust::config::{Config, ConfigError};
use walbust::rules::RuleSet;

/// Prints one status line per file, then the problems; returns the exit code.
pub fn check(config_path: &Path, deny_warnings: bool) -> u8 {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(ConfigError::Invalid(d)) => {
            println!("FAIL {}", config_path.display());
            eprintln!("{d}");
            return EXIT_USAGE;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    println!("ok   {}", config_path.display());
    match RuleSet::load(&config.rules) {
        Ok(loaded) => {
            for file in &loaded.files {
                let n = loaded.rules.rules().iter().filter(|r| r.file == *file).count();
                let warned = loaded.warnings.0.iter().any(|w| w.file == *file);
                println!("{} {} ({n} rules)", if warned { "warn" } else { "ok  " }, file.display());
            }
            if !loaded.warnings.0.is_empty() {
                eprintln!("{}", loaded.warnings);
            }
            if deny_warnings && !loaded.warnings.0.is_empty() { EXIT_FAILED } else { EXIT_OK }
        }
        Err(problems) => {
            let mut files: Vec<&Path> = problems.0.iter().map(|d| d.file.as_path()).collect();
            files.dedup();
            for f in files {
                println!("FAIL {}", f.display());
            }
            eprintln!("{problems}");
            EXIT_FAILED
        }
    }
}

//! The config loader: the input is a `config.toml`, validated with a fixed environment
//! (`walbust_fuzz::env`). It sits in a directory that does not exist, so a relative
//! `password_file` or `ca_file` is missing; an absolute one goes through the bounded
//! reader for files a user names (regular files only, under a size cap).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use walbust::domain::config::{Config, ConfigError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(Path::new("/nonexistent/walbust/config.toml"), text, &walbust_fuzz::env) {
        Ok(config) => {
            let _ = format!("{config:?}");
            let _ = config.source.conninfo.describe();
        }
        Err(ConfigError::Invalid(diagnostics)) => {
            assert!(diagnostics.has_errors(), "a config was refused without an error");
            let _ = diagnostics.to_string();
        }
        Err(e) => panic!("parsing text failed to read a file: {e}"),
    }
});

//! `walbust status`: the replication slot as the server sees it; the logic is `walbust::status`.

use super::EXIT_USAGE;
use std::path::Path;
use walbust::config::Config;
use walbust::status::slot_status;

/// Prints the slot's state (aligned lines, or one JSON object with `--json`); returns the exit code.
pub async fn status(config_path: &Path, json: bool) -> u8 {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    match slot_status(&config).await {
        Ok(s) => {
            print!("{}", if json { s.render_json() } else { s.render_human() });
            if let Some(problem) = s.problem() {
                eprintln!("error: {problem}");
            } else if let Some(warning) = s.warning() {
                eprintln!("warning: {warning}");
            }
            s.exit_code()
        }
        Err(e) => {
            let code = e.exit_code();
            eprintln!("error: {:#}", anyhow::Error::from(e));
            code
        }
    }
}

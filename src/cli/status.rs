//! `walbust status`: the replication slot as the server sees it; the logic is `walbust::status`.

use std::path::Path;
use walbust::status::slot_status;

/// Prints the slot's state (aligned lines, or one JSON object with `--json`); returns the exit code.
pub async fn status(config_path: &Path, json: bool) -> u8 {
    let config = match super::load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
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

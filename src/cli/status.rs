//! `walbust status`: the replication slot as the server sees it; the logic is `walbust::ops::status`.

use super::{CliError, Outcome};
use std::path::Path;
use walbust::ops::status::slot_status;

/// Prints the slot's state (aligned lines, or one JSON object with `--json`); returns the exit code.
pub async fn status(config_path: &Path, json: bool) -> Outcome {
    let config = super::load_config(config_path)?;
    let s = slot_status(&config).await.map_err(|e| CliError::new(e.exit_code(), e))?;
    print!("{}", if json { s.render_json() } else { s.render_human() });
    if !json {
        // The Redis side too: one node, the cluster's state and slot coverage, or Sentinel's master.
        let redis = walbust::sink::inspect(&config.redis).await;
        println!("{:<20} {}", "redis:", redis.summary);
        for problem in &redis.problems {
            eprintln!("warning: {problem}");
        }
    }
    if let Some(problem) = s.problem() {
        return Err(CliError::new(s.exit_code(), anyhow::anyhow!(problem)));
    }
    if let Some(warning) = s.warning() {
        eprintln!("warning: {warning}");
    }
    Ok(s.exit_code())
}

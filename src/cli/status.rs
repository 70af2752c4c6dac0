//! `walbust status`: the replication slot as the server sees it; the logic is `walbust::ops::status`.

use super::{CliError, Outcome};
use std::path::Path;
use walbust::ops::status::{SlotStatus, slot_status};

/// `status --json`: the slot's fields, in their order, then `redis`.
#[derive(serde::Serialize)]
struct Json<'a> {
    #[serde(flatten)]
    slot: &'a SlotStatus,
    redis: RedisJson<'a>,
}

/// What `status` found on the Redis side.
#[derive(serde::Serialize)]
struct RedisJson<'a> {
    summary: &'a str,
    problems: &'a [String],
}

/// Prints the slot's state (aligned lines, or one JSON object with `--json`); returns the exit code.
pub async fn status(config_path: &Path, json: bool) -> Outcome {
    let config = super::load_config(config_path)?;
    let s = slot_status(&config).await.map_err(|e| CliError::new(e.exit_code(), e))?;
    // The Redis side too: one node, the cluster's state and slot coverage, or Sentinel's master.
    let redis = walbust::sink::inspect(&config.redis).await;
    if json {
        let both = Json { slot: &s, redis: RedisJson { summary: &redis.summary, problems: &redis.problems } };
        println!("{}", serde_json::to_string(&both).expect("plain fields only"));
    } else {
        print!("{}", s.render_human());
        println!("{:<20} {}", "redis:", redis.summary);
    }
    for problem in &redis.problems {
        eprintln!("warning: {problem}");
    }
    if let Some(problem) = s.problem() {
        return Err(CliError::new(s.exit_code(), anyhow::anyhow!(problem)));
    }
    if let Some(warning) = s.warning() {
        eprintln!("warning: {warning}");
    }
    Ok(s.exit_code())
}

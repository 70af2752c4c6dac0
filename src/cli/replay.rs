//! `walbust replay`: a recording through rule files, or the difference two rule sets make.

use super::{CliError, Outcome};
use anyhow::anyhow;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use walbust::domain::config::BatchConfig;
use walbust::domain::config::redact_url;
use walbust::domain::diagnostic::plural;
use walbust::domain::rules::RuleSet;
use walbust::errors::exit;
use walbust::offline::recording::replay as replayer;
use walbust::sink::RedisSink;

/// Replays `file` through the rules `rules` (globs) and prints each transaction's actions
/// and a summary; with `against`, prints only what `rules` adds and drops compared with
/// `against`; with `redis`, applies the actions there too. Returns the exit code: 0 done,
/// 1 applying failed, 2 a usage, rule file or recording error (nothing printed to stdout).
pub async fn replay(
    file: &Path,
    rules: &[String],
    against: &[String],
    config: Option<&Path>,
    redis: Option<&str>,
) -> Outcome {
    let policy = super::manual_policy(config)?;
    let new = load(rules, "--rules")?;
    let old = if against.is_empty() { None } else { Some(load(against, "--against")?) };
    let input = walbust::input::user_file::open(file, walbust::input::user_file::Kind::Recording)
        .map_err(|e| CliError::usage(e).hint("record one with `walbust record --config config.toml --output FILE`"))?;
    let input = std::io::BufReader::with_capacity(1 << 16, input);
    let (report, replayed) = match old {
        Some(old) => {
            let diff = replayer::replay_against(input, new, old, &policy);
            (diff.map_err(|e| bad_recording(file, &e))?.render(), None)
        }
        None => {
            let r = replayer::replay_with_policy(input, new, &policy).map_err(|e| bad_recording(file, &e))?;
            (r.render(), Some(r))
        }
    };
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(report.as_bytes()).and_then(|()| out.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(CliError::failed(anyhow::Error::new(e).context("cannot write the report")));
    }
    let (Some(url), Some(replayed)) = (redis, replayed) else { return Ok(exit::OK) };
    let mut sink = RedisSink::new(url, None).map_err(CliError::usage)?;
    let (actions, batches) =
        replayer::apply(&replayed, &mut sink, BatchConfig::default().max_actions).await.map_err(|e| {
            CliError::failed(e)
                .hint("actions are idempotent; run the replay with --apply again once Redis is reachable")
        })?;
    eprintln!(
        "applied {} in {} to {}",
        plural(actions as u64, "action", "actions"),
        plural(batches as u64, "batch", "batches"),
        redact_url(url)
    );
    Ok(exit::OK)
}

fn load(globs: &[String], flag: &str) -> Result<Arc<RuleSet>, CliError> {
    match RuleSet::load(globs) {
        Ok(loaded) => {
            for w in loaded.warnings.warnings() {
                eprintln!("{w}");
            }
            Ok(Arc::new(loaded.rules))
        }
        Err(problems) => {
            eprintln!("{problems}");
            Err(CliError::usage(anyhow!("the {flag} rule files have errors; nothing was replayed")))
        }
    }
}

/// Prints where the recording is bad; the error says nothing was replayed.
fn bad_recording(file: &Path, e: &walbust::offline::recording::RecordingError) -> CliError {
    eprintln!("{}", e.report(file));
    CliError::usage(anyhow!("nothing was replayed: the whole recording is checked first"))
}

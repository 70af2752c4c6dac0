//! `walbust replay`: a recording through rule files, or the difference two rule sets make.

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use walbust::config::BatchConfig;
use walbust::diagnostic::plural;
use walbust::pipeline::error_chain;
use walbust::recording::replay as replayer;
use walbust::rules::RuleSet;
use walbust::sink::{RedisSink, redact_url};

/// Replays `file` through the rules `rules` (globs) and prints each transaction's actions
/// and a summary; with `against`, prints only what `rules` adds and drops compared with
/// `against`; with `redis`, applies the actions there too. Returns the exit code: 0 done,
/// 1 applying failed, 2 a usage, rule file or recording error (nothing printed to stdout).
pub async fn replay(file: &Path, rules: &[String], against: &[String], redis: Option<&str>) -> u8 {
    let Some(new) = load(rules, "--rules") else { return EXIT_USAGE };
    let old = if against.is_empty() {
        None
    } else {
        let Some(old) = load(against, "--against") else { return EXIT_USAGE };
        Some(old)
    };
    let input = match walbust::user_file::open(file, walbust::user_file::Kind::Recording) {
        Ok(f) => std::io::BufReader::with_capacity(1 << 16, f),
        Err(e) => {
            eprintln!("error: {}", e.with_reason());
            eprintln!("  hint: record one with `walbust record --config config.toml --output FILE`");
            return EXIT_USAGE;
        }
    };
    let (report, replayed) = match old {
        Some(old) => match replayer::replay_against(input, new, old) {
            Ok(d) => (d.render(), None),
            Err(e) => return bad_recording(file, &e),
        },
        None => match replayer::replay(input, new) {
            Ok(r) => (r.render(), Some(r)),
            Err(e) => return bad_recording(file, &e),
        },
    };
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(report.as_bytes()).and_then(|()| out.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("error: cannot write the report: {e}");
        return EXIT_FAILED;
    }
    let (Some(url), Some(replayed)) = (redis, replayed) else { return EXIT_OK };
    let mut sink = match RedisSink::new(url, None) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return EXIT_USAGE;
        }
    };
    match replayer::apply(&replayed, &mut sink, BatchConfig::default().max_actions).await {
        Ok((actions, batches)) => {
            eprintln!(
                "applied {} in {} to {}",
                plural(actions as u64, "action", "actions"),
                plural(batches as u64, "batch", "batches"),
                redact_url(url)
            );
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            eprintln!("  hint: actions are idempotent; run the replay with --apply again once Redis is reachable");
            EXIT_FAILED
        }
    }
}

fn load(globs: &[String], flag: &str) -> Option<Arc<RuleSet>> {
    match RuleSet::load(globs) {
        Ok(loaded) => {
            for w in loaded.warnings.warnings() {
                eprintln!("{w}");
            }
            Some(Arc::new(loaded.rules))
        }
        Err(problems) => {
            eprintln!("{problems}");
            eprintln!("error: the {flag} rule files have errors; nothing was replayed");
            None
        }
    }
}

fn bad_recording(file: &Path, e: &walbust::recording::RecordingError) -> u8 {
    eprintln!("{}", e.report(file));
    eprintln!("error: nothing was replayed: the whole recording is checked first");
    EXIT_USAGE
}

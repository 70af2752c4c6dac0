//! `instructions`: the instructions walbust executes per change over one drain, counted by
//! callgrind. Unlike CPU time, the count does not move with what else the machine runs, so
//! two builds (this one and `--baseline`, a build of an earlier commit) can be compared on
//! a shared or virtual machine, on the same WAL in the same run.

use crate::Cli;
use crate::env::*;
use anyhow::{Context, bail, ensure};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;
use walbust::offline::throwaway::find_in_path;
use walbust::postgres::lsn::Lsn;

/// Longest a counted drain may take: callgrind runs the binary some 50 times slower.
const LIMIT: Duration = Duration::from_secs(1800);

pub(crate) async fn instructions(cli: &Cli, env: &Env, bin: &Path) -> anyhow::Result<()> {
    let n = cli.cost_changes;
    let valgrind = find_in_path("valgrind").context("valgrind is not installed: apt-get install valgrind")?;
    let mut builds: Vec<(&str, PathBuf)> = vec![("this build", bin.to_path_buf())];
    if let Some(baseline) = &cli.baseline {
        ensure!(baseline.is_file(), "--baseline {} is not a file", baseline.display());
        builds.insert(0, ("baseline", baseline.clone()));
    }
    println!(
        "## instructions: walbust per change under callgrind (10 rows/txn inserts, {n} changes, the same WAL for every build)\n"
    );
    // Every table of the database, so that a build from before the publication checks
    // changed still starts.
    env.db.batch_execute("DROP PUBLICATION IF EXISTS bench; CREATE PUBLICATION bench FOR ALL TABLES").await?;
    env.db.batch_execute("TRUNCATE bench_items").await?;
    let create = "SELECT pg_create_logical_replication_slot($1, 'pgoutput')";
    let slot = |build: usize, run: usize| format!("bench_instr_{build}_{run}");
    for b in 0..builds.len() {
        for run in 0..cli.runs {
            env.drop_slot(&slot(b, run)).await?;
            env.db.execute(create, &[&slot(b, run)]).await?;
        }
    }
    env.db.execute("CALL bench_write($1, $2, $3, false)", &[&1_i64, &n, &10_i32]).await?;
    let target = env.current_lsn().await?;
    let mut rows = Vec::new();
    for (b, (name, path)) in builds.iter().enumerate() {
        // Start-up and shutdown on a slot with nothing to read, subtracted from each drain.
        let idle = format!("bench_instr_{b}_idle");
        env.drop_slot(&idle).await?;
        env.db.execute(create, &[&idle]).await?;
        let fixed = counted(env, &valgrind, path, &idle, None).await?;
        env.drop_slot(&idle).await?;
        let mut per_change = Vec::new();
        for run in 0..cli.runs {
            let total = counted(env, &valgrind, path, &slot(b, run), Some(target)).await?;
            env.drop_slot(&slot(b, run)).await?;
            let per = total.saturating_sub(fixed) as f64 / n as f64;
            eprintln!(
                "  instructions {name} run {}: {total} in all, {fixed} start-up and stop, {per:.0} per change",
                run + 1
            );
            per_change.push(per);
        }
        per_change.sort_by(f64::total_cmp);
        rows.push((*name, path.clone(), fixed, per_change));
    }
    env.publish().await?;
    println!(
        "| build | instructions per change, median (min-max) | start-up and stop | vs baseline |\n|---|---|---|---|"
    );
    let base = cli.baseline.as_ref().map(|_| crate::measure::median(&rows[0].3));
    for (name, path, fixed, per) in &rows {
        let median = crate::measure::median(per);
        let versus = base.map_or("-".to_string(), |b| format!("{:+.1}%", (median / b - 1.0) * 100.0));
        println!(
            "| {name} ({}) | {median:.0} ({:.0}-{:.0}) | {fixed} | {versus} |",
            path.display(),
            per[0],
            per[per.len() - 1]
        );
    }
    println!();
    Ok(())
}

/// Runs `bin` on `slot` under callgrind until the slot confirms `target` (or, with none,
/// until it streams), stops it with SIGTERM and returns the instructions it executed.
async fn counted(env: &Env, valgrind: &Path, bin: &Path, slot: &str, target: Option<Lsn>) -> anyhow::Result<u64> {
    let out = env.dir.join(format!("callgrind.{slot}.out"));
    let wrapper: Vec<OsString> =
        vec![valgrind.into(), "--tool=callgrind".into(), format!("--callgrind-out-file={}", out.display()).into()];
    let mut child = env.spawn_walbust_wrapped(&wrapper, bin, slot, false, None, "")?;
    env.wait_active(slot, &mut child).await?;
    match target {
        Some(target) => {
            wait_confirmed(env, slot, target, LIMIT).await?;
        }
        None => tokio::time::sleep(Duration::from_secs(1)).await,
    }
    stop_child(&mut child).await;
    let text = std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    let Some(total) = text.lines().find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
    else {
        bail!("{} has no summary line: did callgrind finish?", out.display());
    };
    total.trim().parse().with_context(|| format!("the summary of {}", out.display()))
}

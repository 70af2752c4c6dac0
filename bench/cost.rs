//! `cost`: CPU time, context switches and memory per change.

use crate::Cli;
use crate::env::*;
use crate::measure::*;
use crate::pgbench::pgbench;
use anyhow::Context;
use std::path::Path;
use std::time::{Duration, Instant};

pub(crate) async fn cost(cli: &Cli, env: &Env, bin: &Path) -> anyhow::Result<()> {
    let n = cli.cost_changes;
    println!("## cost: walbust CPU per change and memory (release binary, 10 rows/txn inserts, {n} changes per run)\n");
    env.publish().await?;
    env.db.batch_execute("TRUNCATE bench_items").await?;
    env.drop_slot("bench_cost").await?;
    env.flushdb().await?;
    let mut child = env.spawn_walbust(bin, "bench_cost", true, None)?;
    let pid = child.id().context("walbust has no pid")?;
    env.wait_active("bench_cost", &mut child).await?;
    let rss_idle = vm_mib(pid, "VmRSS")?;
    let (mut per_change, mut load, mut rates, mut wakeups) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (drain_us, drain_hwm, startup) = cost_drain(cli, env, bin, &mut load).await?;
    let mut next = 1_i64;
    for run in 0..cli.runs {
        env.db.batch_execute("TRUNCATE bench_items").await?;
        load.push(settle(cli).await);
        let (user0, sys0) = cpu_user_sys(pid)?;
        let switches0 = context_switches(pid)?;
        let before = user0 + sys0;
        let start = Instant::now();
        let per_txn = 10_i32;
        env.db.execute("CALL bench_write($1, $2, $3, false)", &[&next, &n, &per_txn]).await?;
        next += n;
        let target = env.current_lsn().await?;
        wait_confirmed(env, "bench_cost", target, Duration::from_secs(600)).await?;
        let elapsed = start.elapsed();
        let (user1, sys1) = cpu_user_sys(pid)?;
        let switches = (context_switches(pid)? - switches0) as f64 * 1000.0 / n as f64;
        let cpu = user1 + sys1 - before;
        let us = cpu * 1e6 / n as f64;
        eprintln!(
            "  cost run {} (while writing): {cpu:.2}s CPU ({:.2}s user, {:.2}s sys) for {n} changes in {:.2}s = {us:.2} us/change, {switches:.1} context switches per 1,000 changes",
            run + 1,
            user1 - user0,
            sys1 - sys0,
            elapsed.as_secs_f64()
        );
        per_change.push(us);
        wakeups.push(switches);
        rates.push(n as f64 / elapsed.as_secs_f64());
    }
    let hwm = vm_mib(pid, "VmHWM")?;
    let rss = vm_mib(pid, "VmRSS")?;
    let us = |v: f64| format!("{v:.2} us");
    let mib = |v: f64| format!("{v:.1} MiB");
    println!("| figure | value | target | verdict |\n|---|---|---|---|");
    println!(
        "| walbust CPU per change, drain of pre-written WAL (user+sys, {:.0} ms start-up subtracted) | {} | <= 5 us | {} |",
        startup * 1e3,
        spread(&drain_us, us),
        verdict(median(&drain_us) <= 5.0)
    );
    println!(
        "| walbust peak RSS during a drain (VmHWM) | {} | <= 32 MiB | {} |",
        mib(drain_hwm),
        verdict(drain_hwm <= 32.0)
    );
    println!(
        "| walbust CPU per change, steady state while the writer runs | {} | <= 5 us | {} |",
        spread(&per_change, us),
        verdict(median(&per_change) <= 5.0)
    );
    println!(
        "| walbust context switches per 1,000 changes, steady state (its wake-ups) | {} | - | - |",
        spread(&wakeups, |v| format!("{v:.1}"))
    );
    println!("| end-to-end rate while writing (writer + walbust) | {} changes/s | - | - |", spread(&rates, thousands));
    println!("| RSS idle after start | {} | - | - |", mib(rss_idle));
    println!(
        "| RSS after the runs / peak (VmHWM) | {} / {} | <= 32 MiB | {} |",
        mib(rss),
        mib(hwm),
        verdict(hwm <= 32.0)
    );
    println!("| load avg at runs | {} | | |", loads(&load));
    stop_child(&mut child).await;
    env.drop_slot("bench_cost").await?;
    if cli.pgbench_secs == 0 {
        println!("\npgbench skipped (--pgbench-secs 0).\n");
        return Ok(());
    }
    pgbench(cli, env, bin).await
}

/// CPU per change of walbust draining WAL written before it started, with the CPU of
/// starting up (measured on an idle slot) subtracted. Returns the figures per run, the
/// peak RSS and the start-up CPU in seconds.
pub(crate) async fn cost_drain(
    cli: &Cli,
    env: &Env,
    bin: &Path,
    load: &mut Vec<Load>,
) -> anyhow::Result<(Vec<f64>, f64, f64)> {
    let n = cli.cost_changes;
    let per_txn = 10_i32;
    let first = 1_i64;
    let create = "SELECT pg_create_logical_replication_slot($1, 'pgoutput')";
    env.drop_slot("bench_cost_idle").await?;
    env.db.execute(create, &[&"bench_cost_idle"]).await?;
    let mut idle = env.spawn_walbust(bin, "bench_cost_idle", false, None)?;
    env.wait_active("bench_cost_idle", &mut idle).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let startup = cpu_seconds(idle.id().context("walbust has no pid")?)?;
    stop_child(&mut idle).await;
    env.drop_slot("bench_cost_idle").await?;
    let (mut per_change, mut hwm) = (Vec::new(), 0.0_f64);
    for run in 0..cli.runs {
        env.db.batch_execute("TRUNCATE bench_items").await?;
        env.drop_slot("bench_cost_drain").await?;
        env.db.execute(create, &[&"bench_cost_drain"]).await?;
        env.db.execute("CALL bench_write($1, $2, $3, false)", &[&first, &n, &per_txn]).await?;
        let target = env.current_lsn().await?;
        load.push(settle(cli).await);
        let mut child = env.spawn_walbust(bin, "bench_cost_drain", false, None)?;
        let pid = child.id().context("walbust has no pid")?;
        let took = wait_confirmed(env, "bench_cost_drain", target, Duration::from_secs(600)).await?;
        let (user, sys) = cpu_user_sys(pid)?;
        let cpu = user + sys - startup;
        hwm = hwm.max(vm_mib(pid, "VmHWM")?);
        stop_child(&mut child).await;
        env.drop_slot("bench_cost_drain").await?;
        let us = cpu * 1e6 / n as f64;
        eprintln!(
            "  cost drain run {}: {cpu:.2}s CPU ({user:.2}s user, {sys:.2}s sys; start-up {startup:.2}s subtracted) for {n} changes in {:.2}s = {us:.2} us/change",
            run + 1,
            took.as_secs_f64()
        );
        per_change.push(us);
    }
    env.db.batch_execute("TRUNCATE bench_items").await?;
    Ok((per_change, hwm, startup))
}

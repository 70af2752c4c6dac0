//! `pgbench`: the cost of walbust to a write-heavy workload beside it.

use crate::Cli;
use crate::env::*;
use crate::measure::*;
use anyhow::{Context, ensure};
use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// pgbench's TPC-B transaction without the SELECT: three updates and an insert.
pub(crate) const PGBENCH_SCRIPT: &str = r"\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
";

pub(crate) async fn pgbench(cli: &Cli, env: &Env, bin: &Path) -> anyhow::Result<()> {
    let pgbench = env.pg_tool("pgbench")?;
    let port = env.pg.port().to_string();
    let conn_args = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
    let out = tokio::process::Command::new(&pgbench)
        .args(conn_args)
        .args(["-i", "-q", "-s", &cli.pgbench_scale.to_string(), "bench"])
        .output()
        .await?;
    ensure!(out.status.success(), "pgbench -i failed: {}", String::from_utf8_lossy(&out.stderr));
    env.publish().await?;
    // One statement each: VACUUM cannot run in the implicit transaction of a multi-statement query.
    env.db.batch_execute("VACUUM ANALYZE").await?;
    env.db.batch_execute("CHECKPOINT").await?;
    let script = env.dir.join("write-only.sql");
    std::fs::write(&script, PGBENCH_SCRIPT)?;
    let (mut load, mut cpu_per_change, mut recv_cpu_per_change, mut steal) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut tps: HashMap<Consumer, Vec<f64>> = HashMap::new();
    let mut hwm = 0.0_f64;
    for run in 0..cli.runs {
        for consumer in [Consumer::Nothing, Consumer::Recvlogical, Consumer::Walbust] {
            let slot = "bench_pgbench";
            env.drop_slot(slot).await?;
            let mut child = match consumer {
                Consumer::Nothing => None,
                Consumer::Recvlogical => {
                    env.db.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await?;
                    let bin = env.pg_tool("pg_recvlogical")?;
                    let c = tokio::process::Command::new(&bin)
                        .args(conn_args)
                        .args(["-d", "bench", "--slot", slot, "--start", "--no-loop", "-o", "proto_version=1"])
                        .args(["-o", "publication_names=bench", "-f", "/dev/null"])
                        .stdin(Stdio::null())
                        .kill_on_drop(true)
                        .spawn()
                        .with_context(|| format!("starting {}", bin.display()))?;
                    Some(c)
                }
                Consumer::Walbust => Some(env.spawn_walbust(bin, slot, true, None)?),
            };
            if let Some(c) = child.as_mut() {
                env.wait_active(slot, c).await?;
            }
            load.push(settle(cli).await);
            let cpu_before = match &child {
                Some(c) => cpu_seconds(c.id().context("no pid")?)?,
                None => 0.0,
            };
            let clock = CpuClock::now();
            let out = tokio::process::Command::new(&pgbench)
                .args(conn_args)
                .args(["-n", "-M", "prepared", "-j", "2", "-c", &cli.pgbench_clients.to_string()])
                .args(["-T", &cli.pgbench_secs.to_string(), "-f"])
                .arg(&script)
                .arg("bench")
                .output()
                .await?;
            ensure!(out.status.success(), "pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
            let stolen = clock.map_or(f64::NAN, CpuClock::steal_percent_since);
            steal.push(stolen);
            let text = String::from_utf8_lossy(&out.stdout);
            let rate: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()?.parse().ok()))
                .with_context(|| format!("no tps in pgbench output:\n{text}"))?;
            let txns: f64 = text
                .lines()
                .find_map(|l| {
                    l.strip_prefix("number of transactions actually processed: ")
                        .and_then(|r| r.split('/').next()?.trim().parse().ok())
                })
                .unwrap_or(f64::NAN);
            // Three row changes per pgbench transaction are published (history is not).
            let changes = txns * 3.0;
            let mut note = format!(", steal {stolen:.1}%");
            if let (Some(c), Consumer::Walbust) = (child.as_mut(), consumer) {
                let target = env.current_lsn().await?;
                let caught_up = wait_confirmed(env, slot, target, Duration::from_secs(300)).await?;
                let pid = c.id().context("no pid")?;
                let cpu = cpu_seconds(pid)? - cpu_before;
                hwm = hwm.max(vm_mib(pid, "VmHWM")?);
                cpu_per_change.push(cpu * 1e6 / changes);
                note += &format!("; walbust caught up {:.0} ms after pgbench ended", caught_up.as_secs_f64() * 1e3);
            }
            if let (Some(c), Consumer::Recvlogical) = (child.as_ref(), consumer) {
                // pg_recvlogical confirms only every 10 s, so wait for the server to have sent it
                // everything, then give it a moment to read that before taking its CPU time.
                let target = env.current_lsn().await?;
                wait_sent(env, slot, target, Duration::from_secs(60)).await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                let cpu = cpu_seconds(c.id().context("no pid")?)? - cpu_before;
                recv_cpu_per_change.push(cpu * 1e6 / changes);
            }
            if let Some(mut c) = child {
                stop_child(&mut c).await;
            }
            env.drop_slot(slot).await?;
            eprintln!("  pgbench run {} {}: {rate:.0} tps{note}", run + 1, consumer.label());
            tps.entry(consumer).or_default().push(rate);
        }
    }
    let of = |c: Consumer| tps.get(&c).cloned().unwrap_or_default();
    let base = median(&of(Consumer::Nothing));
    println!(
        "| pgbench write-only tps, no slot ({} clients, {} s, scale {}) | {} | | |",
        cli.pgbench_clients,
        cli.pgbench_secs,
        cli.pgbench_scale,
        spread(&of(Consumer::Nothing), thousands)
    );
    let recv_loss = 1.0 - median(&of(Consumer::Recvlogical)) / base;
    println!(
        "| pgbench tps with pg_recvlogical draining a slot (the walsender's own cost) | {} ({:.1}% less) | | |",
        spread(&of(Consumer::Recvlogical), thousands),
        recv_loss * 100.0
    );
    let loss = 1.0 - median(&of(Consumer::Walbust)) / base;
    println!(
        "| pgbench tps with walbust (slot + walsender + walbust + Redis) | {} ({:.1}% less) | within 15% of no slot | {} |",
        spread(&of(Consumer::Walbust), thousands),
        loss * 100.0,
        verdict(loss <= 0.15)
    );
    let own = 1.0 - median(&of(Consumer::Walbust)) / median(&of(Consumer::Recvlogical));
    println!("| of which walbust's own share (walbust vs pg_recvlogical) | {:.1}% | | |", own * 100.0);
    let us = |v: f64| format!("{v:.2} us");
    println!("| walbust CPU per change under pgbench | {} | | |", spread(&cpu_per_change, us));
    println!(
        "| pg_recvlogical CPU per change under pgbench, for comparison | {} | | |",
        spread(&recv_cpu_per_change, us)
    );
    println!("| walbust peak RSS under pgbench | {hwm:.1} MiB | <= 32 MiB | {} |", verdict(hwm <= 32.0));
    println!("| load avg at runs (no slot, recvlogical, walbust, ...) | {} | | |", loads(&load));
    println!("| host steal time during runs (same order) | {} | | |", steals(&steal));
    println!(
        "\nCPU is utime+stime from /proc/PID/stat of the walbust process, read before and after; RSS is VmRSS and \
         VmHWM from /proc/PID/status. All consumers share the 2 cores with Postgres and pgbench. \"No slot\" has no \
         logical decoding at all; \"pg_recvlogical\" adds a slot, its walsender decoding every change, and a consumer \
         that only discards; \"walbust\" replaces that consumer with walbust applying to Redis.\n"
    );
    Ok(())
}

/// What consumes the slot while pgbench runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Consumer {
    Nothing,
    Recvlogical,
    Walbust,
}

impl Consumer {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Consumer::Nothing => "without a slot",
            Consumer::Recvlogical => "with pg_recvlogical",
            Consumer::Walbust => "with walbust",
        }
    }
}

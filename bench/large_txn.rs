//! `large-txn`: one transaction of many changes.

use crate::Cli;
use crate::env::*;
use crate::measure::*;
use anyhow::{Context, ensure};
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

pub(crate) async fn large_txn(cli: &Cli, env: &Env, bin: &Path) -> anyhow::Result<()> {
    let rows = cli.large_rows;
    println!("## large transaction: one UPDATE of {rows} rows (two keys per row)\n");
    env.publish().await?;
    let mut report = String::new();
    let (mut peaks, mut times, mut load) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..cli.large_runs {
        env.db.batch_execute("TRUNCATE bench_large").await?;
        env.flushdb().await?;
        env.db
            .execute("INSERT INTO bench_large SELECT g % 10000, g, 0 FROM generate_series(1, $1::bigint) g", &[&rows])
            .await?;
        env.db.batch_execute("VACUUM ANALYZE bench_large").await?;
        env.db.batch_execute("CHECKPOINT").await?;
        // Seed a sample: every 1,000th row key and every org key.
        let sample: Vec<String> = (1..=rows)
            .step_by(1000)
            .map(|id| format!("large:{id}"))
            .chain((0..ORGS.min(rows)).map(|o| format!("org:{o}:large")))
            .collect();
        let seeded = env.seed(sample.into_iter()).await?;
        env.drop_slot("bench_large").await?;
        let metrics_port = free_port()?;
        let mut child = env.spawn_walbust(bin, "bench_large", true, Some(metrics_port))?;
        let pid = child.id().context("walbust has no pid")?;
        env.wait_active("bench_large", &mut child).await?;
        let rss_before = vm_mib(pid, "VmRSS")?;
        load.push(settle(cli).await);
        // Sample RSS throughout, to show it stays flat rather than only its peak.
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let sampler = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Ok(v) = vm_mib(pid, "VmRSS") { samples.push(v) }
                    }
                    _ = &mut stop_rx => break,
                }
            }
            samples
        });
        let start = Instant::now();
        env.db.batch_execute("UPDATE bench_large SET n = n + 1").await?;
        let committed = start.elapsed();
        let target = env.current_lsn().await?;
        let limit = Duration::from_secs(600 + (rows / 5_000) as u64);
        let drained = wait_confirmed(env, "bench_large", target, limit).await?;
        let _ = stop_tx.send(());
        let samples = sampler.await?;
        let hwm = vm_mib(pid, "VmHWM")?;
        let left = env.dbsize().await?;
        let changes = scrape_changes(metrics_port).await;
        stop_child(&mut child).await;
        env.drop_slot("bench_large").await?;
        let after_commit = drained.as_secs_f64();
        let _ = writeln!(
            report,
            "| {} | {:.1} s | {:.1} s ({}/s) | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} of {seeded} left | {} |",
            run + 1,
            committed.as_secs_f64(),
            after_commit,
            thousands(rows as f64 / after_commit),
            rss_before,
            samples.iter().copied().fold(0.0, f64::max),
            hwm,
            left,
            changes.map_or("n/a".to_string(), |c| c.to_string())
        );
        ensure!(left == 0, "{left} of {seeded} sampled keys survived the large transaction");
        if let Some(c) = changes {
            ensure!(c >= rows as u64, "walbust routed {c} changes, expected {rows}");
        }
        peaks.push(hwm);
        times.push(after_commit);
    }
    println!(
        "| run | UPDATE took | walbust done after commit | RSS before | RSS max sampled | VmHWM | sampled keys | walbust_changes_total |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    print!("{report}");
    println!(
        "\npeak RSS {} against the 32 MiB bound: {}; load avg at runs: {}. Every 1,000th row key and every org key \
         were seeded and checked deleted; walbust's own change counter (from /metrics) is compared with the row count.\n",
        spread(&peaks, |v| format!("{v:.1} MiB")),
        verdict(peaks.iter().all(|&p| p <= 32.0)),
        loads(&load)
    );
    Ok(())
}

//! `drain`: how fast walbust empties a slot of a backlog, against `pg_recvlogical`.

use crate::Cli;
use crate::env::*;
use crate::measure::*;
use anyhow::{Context, bail, ensure};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use walbust::daemon::pipeline::{self, Options};
use walbust::domain::config::Config;
use walbust::domain::rules::RuleSet;
use walbust::postgres::lsn::Lsn;
use walbust::sink::RedisSink;
use walbust::telemetry::metrics::Metrics;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Variant {
    pub(crate) name: &'static str,
    pub(crate) per_txn: i32,
    pub(crate) mixed: bool,
}

pub(crate) const VARIANTS: [Variant; 4] = [
    Variant { name: "1 row/txn, inserts", per_txn: 1, mixed: false },
    Variant { name: "10 rows/txn, inserts", per_txn: 10, mixed: false },
    Variant { name: "100 rows/txn, inserts", per_txn: 100, mixed: false },
    Variant { name: "10 rows/txn, mixed ins/upd/del", per_txn: 10, mixed: true },
];

pub(crate) async fn drain(cli: &Cli, env: &Env) -> anyhow::Result<()> {
    let w = cli.changes;
    println!("## drain: {w} pre-written changes, pg_recvlogical vs walbust (two keys per change, real Redis)\n");
    println!(
        "| variant | pg_recvlogical changes/s | walbust changes/s | ratio walbust/recvlogical | target >= 0.9 | load avg at runs |"
    );
    println!("|---|---|---|---|---|---|");
    env.db.batch_execute("DROP PUBLICATION IF EXISTS bench; CREATE PUBLICATION bench FOR TABLE bench_items").await?;
    for (_, variant) in VARIANTS.iter().enumerate().filter(|(i, _)| cli.variants.contains(&(i + 1))) {
        let mut recv_rates = Vec::new();
        let mut walbust_rates = Vec::new();
        let mut ratios = Vec::new();
        let mut load = Vec::new();
        for run in 0..cli.runs {
            // Prepare: a clean table (and rows to update and delete), then both slots at one LSN.
            env.db.batch_execute("TRUNCATE bench_items").await?;
            env.flushdb().await?;
            let first = 1_i64;
            if variant.mixed {
                env.db
                    .execute(
                        "INSERT INTO bench_items (org_id, id, name, payload) \
                         SELECT g % 10000, g, 'item ' || g, repeat('p', 80) FROM generate_series($1::bigint, $2::bigint) g",
                        &[&first, &(first + w - 1)],
                    )
                    .await?;
            }
            env.db.batch_execute("CHECKPOINT").await?;
            for slot in ["bench_recv", "bench_walbust"] {
                env.drop_slot(slot).await?;
                env.db.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await?;
            }
            let call = "CALL bench_write($1, $2, $3, $4)";
            env.db.execute(call, &[&first, &w, &variant.per_txn, &variant.mixed]).await?;
            let target = env.current_lsn().await?;
            // Seed every key the changes invalidate, so that the deletes are real.
            let ids: Vec<i64> =
                (first..first + w).map(|g| if variant.mixed && g % 3 == 0 { g + w } else { g }).collect();
            let seeded = env
                .seed(
                    ids.iter().map(|id| format!("item:{id}")).chain((0..ORGS.min(w)).map(|o| format!("org:{o}:items"))),
                )
                .await?;
            // Alternate which consumer goes first, so that neither always gets a warmer cache.
            let mut recv = Duration::ZERO;
            let mut wal = Duration::ZERO;
            for step in 0..2 {
                let l = settle(cli).await;
                if step == 0 {
                    load.push(l);
                }
                if (step + run) % 2 == 0 {
                    recv = recvlogical(env, "bench_recv", target).await?;
                } else {
                    wal = walbust_in_process(env, "bench_walbust", target).await?;
                }
            }
            let left = env.dbsize().await?;
            ensure!(left == 0, "{left} of {seeded} seeded keys were not invalidated ({})", variant.name);
            let (r, b) = (w as f64 / recv.as_secs_f64(), w as f64 / wal.as_secs_f64());
            eprintln!(
                "  drain {} run {}: recvlogical {:.3}s ({:.0}/s), walbust {:.3}s ({:.0}/s), ratio {:.2}",
                variant.name,
                run + 1,
                recv.as_secs_f64(),
                r,
                wal.as_secs_f64(),
                b,
                b / r
            );
            recv_rates.push(r);
            walbust_rates.push(b);
            ratios.push(b / r);
            for slot in ["bench_recv", "bench_walbust"] {
                env.drop_slot(slot).await?;
            }
        }
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            variant.name,
            spread(&recv_rates, thousands),
            spread(&walbust_rates, thousands),
            spread(&ratios, |v| format!("{v:.2}")),
            verdict(median(&ratios) >= 0.9),
            loads(&load)
        );
    }
    println!(
        "\nTimes run from starting the consumer to pg_recvlogical exiting at --endpos, and to walbust's flushed LSN \
         (`walbust_applied_lsn_bytes`: every first delete applied, sent to the server as the write position) reaching the \
         same position. Every seeded key was checked deleted.\n"
    );
    Ok(())
}

/// `pg_recvlogical --start ... --endpos` into /dev/null; returns the time until it exits.
pub(crate) async fn recvlogical(env: &Env, slot: &str, target: Lsn) -> anyhow::Result<Duration> {
    let bin = env.pg_tool("pg_recvlogical")?;
    let start = Instant::now();
    let mut child = tokio::process::Command::new(&bin)
        .args(["-h", "127.0.0.1", "-p", &env.pg.port().to_string(), "-U", "postgres", "-d", "bench"])
        .args(["--slot", slot, "--start", "--no-loop", "-o", "proto_version=1", "-o", "publication_names=bench"])
        .arg(format!("--endpos={target}"))
        .args(["-f", "/dev/null"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let status = tokio::time::timeout(Duration::from_secs(600), child.wait())
        .await
        .context("pg_recvlogical did not reach --endpos within 600s")??;
    let elapsed = start.elapsed();
    ensure!(status.success(), "pg_recvlogical exited with {status}");
    Ok(elapsed)
}

/// Runs the pipeline in this process until every first delete up to `target` is applied
/// (`walbust_applied_lsn_bytes`; the flushed position trails it by `redelete_after`), on a
/// thread of its own with a single-threaded runtime, as the `walbust` binary runs it.
pub(crate) async fn walbust_in_process(env: &Env, slot: &str, target: Lsn) -> anyhow::Result<Duration> {
    walbust_in_process_with(env, slot, target, "").await
}

/// [`walbust_in_process`] with `extra` config sections (`[consistency]`).
pub(crate) async fn walbust_in_process_with(
    env: &Env,
    slot: &str,
    target: Lsn,
    extra: &str,
) -> anyhow::Result<Duration> {
    let text = env.config_text_with(slot, false, None, extra);
    let config = Config::parse(&env.dir.join("config.toml"), &text, &|_| None)?;
    let rules = RuleSet::from_sources(&[(PathBuf::from("rules.toml"), RULES.to_string())])
        .map_err(|d| anyhow::anyhow!("{d}"))?
        .rules;
    let sink = RedisSink::new(&config.redis.url, None)?;
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<pipeline::StopHandle>();
    let start = Instant::now();
    // Its own thread and runtime, as `walbust run` has: the bench's polling stays out of its way.
    let handle = std::thread::spawn({
        let metrics = metrics.clone();
        move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async move {
                let running = pipeline::spawn(config, Arc::new(rules), sink, Options { metrics, ..Default::default() });
                let _ = stop_tx.send(running.stop_handle());
                running.join().await.map_err(|e| anyhow::anyhow!(walbust::errors::causes::error_chain(&e)))
            })
        }
    });
    let join = |handle: std::thread::JoinHandle<anyhow::Result<()>>| {
        handle.join().map_err(|_| anyhow::anyhow!("the pipeline thread panicked"))?
    };
    let deadline = start + Duration::from_secs(600);
    while metrics.applied() < target {
        if handle.is_finished() {
            bail!("the pipeline stopped early: {:?}", join(handle));
        }
        ensure!(Instant::now() < deadline, "walbust did not reach {target} within 600s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    if let Ok(stop) = stop_rx.recv() {
        stop.stop();
    }
    tokio::task::spawn_blocking(move || join(handle)).await??;
    Ok(elapsed)
}

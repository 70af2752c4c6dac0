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
    let cluster = match cli.cluster {
        true => Some(ClusterCache::start().await?),
        false => None,
    };
    println!("## drain: {w} pre-written changes, pg_recvlogical vs walbust (two keys per change, real Redis)\n");
    if cluster.is_some() {
        println!(
            "| variant | pg_recvlogical changes/s | walbust changes/s | ratio walbust/recvlogical | target >= 0.9 | walbust, Redis Cluster changes/s | cluster/single | load avg at runs |"
        );
        println!("|---|---|---|---|---|---|---|---|");
    } else {
        println!(
            "| variant | pg_recvlogical changes/s | walbust changes/s | ratio walbust/recvlogical | target >= 0.9 | load avg at runs |"
        );
        println!("|---|---|---|---|---|---|");
    }
    env.db.batch_execute("DROP PUBLICATION IF EXISTS bench; CREATE PUBLICATION bench FOR TABLE bench_items").await?;
    for (_, variant) in VARIANTS.iter().enumerate().filter(|(i, _)| cli.variants.contains(&(i + 1))) {
        let mut recv_rates = Vec::new();
        let mut walbust_rates = Vec::new();
        let mut ratios = Vec::new();
        let mut cluster_rates = Vec::new();
        let mut cluster_ratios = Vec::new();
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
            if let Some(c) = &cluster {
                c.flushall().await?;
            }
            for slot in ["bench_recv", "bench_walbust", "bench_cluster"] {
                env.drop_slot(slot).await?;
                if slot != "bench_cluster" || cluster.is_some() {
                    env.db.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await?;
                }
            }
            let call = "CALL bench_write($1, $2, $3, $4)";
            env.db.execute(call, &[&first, &w, &variant.per_txn, &variant.mixed]).await?;
            let target = env.current_lsn().await?;
            // Seed every key the changes invalidate, so that the deletes are real.
            let ids: Vec<i64> =
                (first..first + w).map(|g| if variant.mixed && g % 3 == 0 { g + w } else { g }).collect();
            let keys =
                || ids.iter().map(|id| format!("item:{id}")).chain((0..ORGS.min(w)).map(|o| format!("org:{o}:items")));
            let seeded = env.seed(keys()).await?;
            if let Some(c) = &cluster {
                c.seed(keys()).await?;
            }
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
                    wal = walbust_in_process(env, "bench_walbust", target, None).await?;
                }
            }
            let left = env.dbsize().await?;
            ensure!(left == 0, "{left} of {seeded} seeded keys were not invalidated ({})", variant.name);
            if let Some(c) = &cluster {
                settle(cli).await;
                let took = walbust_in_process(env, "bench_cluster", target, Some(&c.url())).await?;
                let left = c.dbsize().await?;
                ensure!(
                    left == 0,
                    "{left} of {seeded} keys seeded in the cluster were not invalidated ({})",
                    variant.name
                );
                let rate = w as f64 / took.as_secs_f64();
                eprintln!(
                    "  drain {} run {}: walbust into the cluster {:.3}s ({rate:.0}/s)",
                    variant.name,
                    run + 1,
                    took.as_secs_f64()
                );
                cluster_rates.push(rate);
                cluster_ratios.push(rate / (w as f64 / wal.as_secs_f64()));
            }
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
            for slot in ["bench_recv", "bench_walbust", "bench_cluster"] {
                env.drop_slot(slot).await?;
            }
        }
        let cluster_columns = match cluster {
            Some(_) => {
                format!(" {} | {} |", spread(&cluster_rates, thousands), spread(&cluster_ratios, |v| format!("{v:.2}")))
            }
            None => String::new(),
        };
        println!(
            "| {} | {} | {} | {} | {} |{cluster_columns} {} |",
            variant.name,
            spread(&recv_rates, thousands),
            spread(&walbust_rates, thousands),
            spread(&ratios, |v| format!("{v:.2}")),
            verdict(median(&ratios) >= 0.9),
            loads(&load)
        );
    }
    if cluster.is_some() {
        println!(
            "\nThe cluster: three primaries without replicas on this machine, one slot of its own for walbust, \
             the same WAL and keys; every key seeded there was checked deleted."
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
/// thread of its own with a single-threaded runtime, as the `walbust` binary runs it; into
/// the Redis Cluster seeded by `cluster` when given.
pub(crate) async fn walbust_in_process(
    env: &Env,
    slot: &str,
    target: Lsn,
    cluster: Option<&str>,
) -> anyhow::Result<Duration> {
    walbust_in_process_with(env, slot, target, cluster, "").await
}

/// [`walbust_in_process`] with `extra` config sections (`[consistency]`).
pub(crate) async fn walbust_in_process_with(
    env: &Env,
    slot: &str,
    target: Lsn,
    cluster: Option<&str>,
    extra: &str,
) -> anyhow::Result<Duration> {
    let mut text = env.config_text_with(slot, false, None, extra);
    if let Some(url) = cluster {
        text = text.replace(&format!("url = \"{}\"\n", env.redis.url()), &format!("url = \"{url}\"\ncluster = true\n"));
    }
    let config = Config::parse(&env.dir.join("config.toml"), &text, &|_| None)?;
    let rules = RuleSet::from_sources(&[(PathBuf::from("rules.toml"), RULES.to_string())])
        .map_err(|d| anyhow::anyhow!("{d}"))?
        .rules;
    let sink = RedisSink::from_config(&config.redis)?;
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

/// A throwaway Redis Cluster for the drain, and a connection to seed and count its keys.
struct ClusterCache {
    cluster: walbust::offline::throwaway::ThrowawayRedisCluster,
    conn: redis::cluster_async::ClusterConnection,
}

impl ClusterCache {
    async fn start() -> anyhow::Result<ClusterCache> {
        let cluster =
            tokio::task::spawn_blocking(|| walbust::offline::throwaway::ThrowawayRedisCluster::start(3, 0)).await??;
        let conn = redis::cluster::ClusterClient::new(vec![cluster.url()])?.get_async_connection().await?;
        println!("redis cluster: three primaries, seed {}\n", cluster.url());
        Ok(ClusterCache { cluster, conn })
    }

    fn url(&self) -> String {
        self.cluster.url()
    }

    async fn seed(&self, keys: impl Iterator<Item = String>) -> anyhow::Result<()> {
        use futures_util::StreamExt;
        let sets = futures_util::stream::iter(keys.map(|k| {
            let mut conn = self.conn.clone();
            async move { redis::cmd("SET").arg(k).arg("cached").exec_async(&mut conn).await }
        }))
        .buffer_unordered(512);
        let failed: Vec<redis::RedisError> = sets.filter_map(|r| async move { r.err() }).collect().await;
        ensure!(failed.is_empty(), "seeding the cluster failed: {}", failed[0]);
        Ok(())
    }

    /// Keys on all nodes together.
    async fn dbsize(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for node in &self.cluster.nodes {
            let mut conn = redis::Client::open(node.url())?.get_multiplexed_async_connection().await?;
            total +=
                redis::cmd("DBSIZE").query_async::<u64>(&mut conn).await? - crate::env::fence_keys(&mut conn).await?;
        }
        Ok(total)
    }

    async fn flushall(&self) -> anyhow::Result<()> {
        for node in &self.cluster.nodes {
            let mut conn = redis::Client::open(node.url())?.get_multiplexed_async_connection().await?;
            redis::cmd("FLUSHALL").exec_async(&mut conn).await?;
        }
        Ok(())
    }
}

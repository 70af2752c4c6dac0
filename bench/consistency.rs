//! `consistency`: the oracle at length, and what never-stale costs.
//!
//! First the cost, in one run: drain rate and commit-to-first-delete latency with the
//! visibility gate and the second delete on (the defaults) beside both off, and the
//! `walbust.wait()` time an application sees after its own commit. Then the oracle:
//! cache-aside readers (think times 0, 1 and 5 ms) and writers over 200 hot rows, without a
//! standby, with a synchronous standby that stalls in bursts, and with one that never
//! stalls; walbust is killed with SIGKILL half way and restarted. Every cached key is
//! compared with its row at the end, with both on and with both off.

use crate::Cli;
use crate::drain::walbust_in_process_with;
use crate::env::*;
use crate::latency::latency_run;
use crate::measure::*;
use anyhow::{Context, ensure};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use walbust::offline::oracle;
use walbust::offline::throwaway::{PostgresOptions, ThrowawayPostgres, ThrowawayStandby};
use walbust::postgres::lsn::Lsn;

/// Everything on: the defaults.
const ON: &str = "";
/// The visibility gate and the second delete both off.
const OFF: &str = "[consistency]\nvisibility_gate = false\nredelete_after = \"off\"\n";

fn modes() -> [(&'static str, &'static str); 2] {
    [("off", OFF), ("on", ON)]
}

/// Arguments of the `consistency` scenario.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ConsistencyArgs {
    /// Seconds per oracle run.
    #[arg(long, default_value_t = 30)]
    pub(crate) oracle_secs: u64,
    /// Hot rows the oracle reads and writes.
    #[arg(long, default_value_t = 200)]
    pub(crate) oracle_rows: i32,
    /// Skip the cost half and run only the oracle.
    #[arg(long)]
    pub(crate) oracle_only: bool,
    /// Skip the oracle and run only the cost half.
    #[arg(long)]
    pub(crate) cost_only: bool,
}

pub(crate) async fn consistency(cli: &Cli, env: &Env, bin: &Path) -> anyhow::Result<()> {
    if !cli.consistency.oracle_only {
        cost(cli, env, bin).await?;
    }
    if !cli.consistency.cost_only {
        oracle_scenarios(cli, bin).await?;
    }
    Ok(())
}

async fn cost(cli: &Cli, env: &Env, bin: &Path) -> anyhow::Result<()> {
    let w = cli.changes;
    println!(
        "## consistency cost: visibility gate and second delete on (defaults) beside both off, in one run\n\n\
         ### drain: {w} pre-written single-row commits, time until every first delete is applied\n"
    );
    println!("| off changes/s | on changes/s | ratio on/off | target >= 0.9 | load avg at runs |");
    println!("|---|---|---|---|---|");
    env.publish().await?;
    let (mut off_rates, mut on_rates, mut ratios, mut load) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..cli.runs {
        env.db.batch_execute("TRUNCATE bench_items").await?;
        env.flushdb().await?;
        env.db.batch_execute("CHECKPOINT").await?;
        for (name, _) in modes() {
            let slot = format!("bench_{name}");
            env.drop_slot(&slot).await?;
            env.db.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await?;
        }
        env.db.execute("CALL bench_write($1, $2, $3, $4)", &[&1_i64, &w, &1_i32, &false]).await?;
        let target = env.current_lsn().await?;
        let mut rate = [0.0; 2];
        // Alternate which mode goes first, so that neither always gets a warmer cache.
        for step in 0..2 {
            let m = (step + run) % 2;
            let (name, extra) = modes()[m];
            // Every key is cached before each drain, so both delete for real.
            env.seed((1..=w).map(|id| format!("item:{id}")).chain((0..ORGS.min(w)).map(|o| format!("org:{o}:items"))))
                .await?;
            let l = settle(cli).await;
            if step == 0 {
                load.push(l);
            }
            let took = walbust_in_process_with(env, &format!("bench_{name}"), target, None, extra).await?;
            ensure!(env.dbsize().await? == 0, "keys left after the {name} drain");
            rate[m] = w as f64 / took.as_secs_f64();
            eprintln!("  consistency drain run {} {name}: {:.3}s ({:.0}/s)", run + 1, took.as_secs_f64(), rate[m]);
        }
        off_rates.push(rate[0]);
        on_rates.push(rate[1]);
        ratios.push(rate[1] / rate[0]);
        for (name, _) in modes() {
            env.drop_slot(&format!("bench_{name}")).await?;
        }
    }
    println!(
        "| {} | {} | {} | {} | {} |",
        spread(&off_rates, thousands),
        spread(&on_rates, thousands),
        spread(&ratios, |v| format!("{v:.2}")),
        verdict(median(&ratios) >= 0.9),
        loads(&load)
    );

    println!(
        "\n### latency: single-row commits, commit returned -> first delete in Redis; and walbust.wait() after a commit\n"
    );
    println!(
        "| commits/s | mode | p50 | p99 | max | p99 on - p99 off (target <= 1 ms) | wait() p50 | wait() p99 | wait() timed out |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    env.db.batch_execute("TRUNCATE bench_items").await?;
    env.flushdb().await?;
    let mut conn = env.cache.clone();
    redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg("KEA").exec_async(&mut conn).await?;
    let mut next_id = 1_i64;
    for &rate in &cli.rates {
        let mut p99s = [Vec::new(), Vec::new()];
        let mut rows = [Vec::new(), Vec::new()];
        for run in 0..cli.runs {
            for step in 0..2 {
                let m = (step + run) % 2;
                let (name, extra) = modes()[m];
                let slot = format!("bench_latency_{name}");
                env.drop_slot(&slot).await?;
                let metrics_port = free_port()?;
                let mut child = env.spawn_walbust_with(bin, &slot, true, Some(metrics_port), extra)?;
                env.wait_active(&slot, &mut child).await?;
                env.db.batch_execute(&walbust::daemon::fix::wait_function(&slot)).await?;
                let count = i64::from(rate) * cli.latency_secs as i64;
                let first = next_id;
                // The waiter's own rows sit past the paced writer's.
                next_id += count + 100_000;
                env.seed((first..first + count).map(|id| format!("item:{id}"))).await?;
                settle(cli).await;
                let waiter = waiter(env.pg.url("bench"), first + count, Duration::from_secs(cli.latency_secs));
                let (r, waits) = tokio::join!(latency_run(env, rate, first, count), waiter);
                let (r, (waits, timed_out)) = (r?, waits?);
                let gate = scrape(metrics_port).await.map(|page| gate_figures(&page)).unwrap_or_default();
                stop_child(&mut child).await;
                env.drop_slot(&slot).await?;
                eprintln!(
                    "  consistency latency {rate}/s run {} {name}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, {} missing; wait() p50 {:.3} ms, p99 {:.3} ms over {} calls, {timed_out} timed out{gate}",
                    run + 1,
                    r.p50,
                    r.p99,
                    r.max,
                    r.missing,
                    percentile(&waits, 0.5),
                    percentile(&waits, 0.99),
                    waits.len()
                );
                ensure!(r.missing == 0, "{} commits were never invalidated ({name}, {rate}/s)", r.missing);
                p99s[m].push(r.p99);
                rows[m].push(Row {
                    p50: r.p50,
                    p99: r.p99,
                    max: r.max,
                    wait_p50: percentile(&waits, 0.5),
                    wait_p99: percentile(&waits, 0.99),
                    timed_out,
                });
            }
        }
        let diff: Vec<f64> = p99s[1].iter().zip(&p99s[0]).map(|(on, off)| on - off).collect();
        let ms = |v: f64| format!("{v:.2} ms");
        for (m, (name, _)) in modes().iter().enumerate() {
            let col = |f: fn(&Row) -> f64| rows[m].iter().map(f).collect::<Vec<f64>>();
            let verdict_cell = if m == 1 {
                format!("{}: {}", spread(&diff, ms), verdict(median(&diff) <= 1.0))
            } else {
                String::new()
            };
            println!(
                "| {rate} | {name} | {} | {} | {} | {verdict_cell} | {} | {} | {} |",
                spread(&col(|r| r.p50), ms),
                spread(&col(|r| r.p99), ms),
                spread(&col(|r| r.max), ms),
                spread(&col(|r| r.wait_p50), ms),
                spread(&col(|r| r.wait_p99), ms),
                rows[m].iter().map(|r| r.timed_out).sum::<usize>(),
            );
        }
    }
    println!(
        "\nDrain runs the pipeline in this process on both slots, which start at the same position over the same WAL; \
         each drain's keys are cached before it starts. Latency runs the release binary; the writer times its autocommit \
         INSERT returning, a keyspace-notification subscriber the key's first UNLINK. Beside the paced writer, one more \
         session commits an INSERT and calls `SELECT walbust.wait('5s')` in a loop: the wait() columns are that call's \
         duration (in the off mode the write position is the first delete's too).\n"
    );
    Ok(())
}

/// What the visibility gate did in a run, from walbust's metrics page: transactions held,
/// and how long they were held in all.
fn gate_figures(page: &str) -> String {
    let held =
        match (sample(page, "walbust_gate_held_transactions_total "), sample(page, "walbust_gate_wait_seconds_sum ")) {
            (Some(held), Some(wait)) => format!("; gate held {held} transactions, {:.1} ms in all", wait * 1e3),
            _ => String::new(),
        };
    match (sample(page, "walbust_gate_query_seconds_count "), sample(page, "walbust_gate_query_seconds_sum ")) {
        (Some(n), Some(sum)) if n > 0.0 => format!("{held}; {n} gate queries, {:.3} ms each on average", sum * 1e3 / n),
        _ => held,
    }
}

/// One latency run's figures: p50, p99, max, wait() p50, wait() p99 (ms), and wait() timeouts.
struct Row {
    p50: f64,
    p99: f64,
    max: f64,
    wait_p50: f64,
    wait_p99: f64,
    timed_out: usize,
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

/// An application committing and then calling `walbust.wait()`, for `secs`: returns each
/// wait's duration in milliseconds and how many timed out.
async fn waiter(url: String, first: i64, run: Duration) -> anyhow::Result<(Vec<f64>, usize)> {
    let client = connect(&url).await?;
    let insert =
        client.prepare("INSERT INTO bench_items (org_id, id, name, payload) VALUES ($1, $2, 'w', 'w')").await?;
    let wait = client.prepare("SELECT walbust.wait('5s')").await?;
    let (mut waits, mut timed_out) = (Vec::new(), 0);
    let until = Instant::now() + run;
    let mut id = first;
    // Let the paced writer start first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    while Instant::now() < until {
        client.execute(&insert, &[&((id % ORGS) as i32), &id]).await?;
        id += 1;
        let started = Instant::now();
        let done: bool = client.query_one(&wait, &[]).await?.get(0);
        waits.push(started.elapsed().as_secs_f64() * 1e3);
        timed_out += usize::from(!done);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((waits, timed_out))
}

/// How the synchronous standby behaves in one oracle scenario.
#[derive(Debug, Clone, Copy)]
enum Standby {
    /// Writers commit without waiting for a standby.
    None,
    /// A synchronous standby stopped (SIGSTOP) for 60 ms every 150 ms.
    Stalling,
    /// A synchronous standby that never stops.
    Steady,
}

async fn oracle_scenarios(cli: &Cli, bin: &Path) -> anyhow::Result<()> {
    let args = &cli.consistency;
    println!(
        "## consistency oracle: {} s runs, {} hot rows, 6 cache-aside readers (think 0/1/5 ms, two each), 2 writers, \
         walbust killed with SIGKILL half way\n",
        args.oracle_secs, args.oracle_rows
    );
    println!(
        "| scenario | stale keys, gate and second delete on (per run) | stale keys, both off (per run) | target: 0 on |"
    );
    println!("|---|---|---|---|");
    let settings = vec![
        "synchronous_standby_names = 'oracle_standby'".to_string(),
        "synchronous_commit = local".to_string(),
        "autovacuum = off".to_string(),
    ];
    let mut pg = tokio::task::spawn_blocking(move || {
        ThrowawayPostgres::start(&PostgresOptions { settings, ..Default::default() })
    })
    .await??;
    let standby = pg.start_sync_standby("oracle_standby")?;
    let redis = tokio::task::spawn_blocking(walbust::offline::throwaway::ThrowawayRedis::start).await??;
    connect(&pg.url("postgres")).await?.batch_execute("CREATE DATABASE oracle").await?;
    let db = connect(&pg.url("oracle")).await?;
    db.batch_execute(&oracle::schema(args.oracle_rows)).await?;
    db.batch_execute(&format!("CREATE PUBLICATION oracle FOR TABLE {}", oracle::TABLE)).await?;
    let dir = std::env::temp_dir().join(format!("walbust-oracle-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut all_on_clean = true;
    for (label, standby_mode) in [
        ("no standby", Standby::None),
        ("synchronous standby, stalling", Standby::Stalling),
        ("synchronous standby, steady", Standby::Steady),
    ] {
        let mut counts = [Vec::new(), Vec::new()];
        for run in 0..cli.runs {
            for (m, (name, extra)) in modes().iter().enumerate().rev() {
                let tag = format!("o{}{name}{run}", label.len());
                let stale = oracle_run(&pg, &standby, &redis, bin, &dir, &tag, extra, standby_mode, args).await?;
                eprintln!("  oracle {label} run {} {name}: {} stale", run + 1, stale.len());
                for s in &stale {
                    eprintln!("    {s}");
                }
                counts[m].push(stale.len());
            }
        }
        let show = |c: &[usize]| c.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        let clean = counts[1].iter().all(|&n| n == 0);
        all_on_clean &= clean;
        println!("| {label} | {} | {} | {} |", show(&counts[1]), show(&counts[0]), verdict(clean));
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "\nReaders GET a row's key; on a miss they SELECT the row, wait their think time and SET the key. Writers run \
         single-row UPDATEs (`synchronous_commit = on` in the standby scenarios). At the end, once the slot has \
         confirmed every write (second deletes included), every key is compared with its row; each stale key is \
         explained in the run log.\n"
    );
    ensure!(all_on_clean, "the oracle found stale keys with the gate and the second delete on");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn oracle_run(
    pg: &ThrowawayPostgres,
    standby: &ThrowawayStandby,
    redis: &walbust::offline::throwaway::ThrowawayRedis,
    bin: &Path,
    dir: &Path,
    tag: &str,
    extra: &str,
    mode: Standby,
    args: &ConsistencyArgs,
) -> anyhow::Result<Vec<oracle::Stale>> {
    let admin = connect(&pg.url("oracle")).await?;
    std::fs::write(dir.join(format!("{tag}.rules.toml")), oracle::rules(tag))?;
    let config = dir.join(format!("{tag}.toml"));
    std::fs::write(
        &config,
        format!(
            "rules = [\"{tag}.rules.toml\"]\n[source]\nurl = \"{}\"\nslot = \"{tag}\"\npublication = \"oracle\"\n\
             status_interval = \"1s\"\n[redis]\nurl = \"{}\"\n[metrics]\nlisten = \"off\"\n{extra}",
            pg.url("oracle"),
            redis.url()
        ),
    )?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("walbust.log"))?;
    let spawn = || -> anyhow::Result<tokio::process::Child> {
        tokio::process::Command::new(bin)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .kill_on_drop(true)
            .spawn()
            .context("starting walbust")
    };
    let mut child = spawn()?;
    let active = "SELECT active FROM pg_replication_slots WHERE slot_name = $1";
    let deadline = Instant::now() + Duration::from_secs(60);
    while !admin.query(active, &[&tag]).await?.first().is_some_and(|r| r.get::<_, bool>(0)) {
        ensure!(Instant::now() < deadline, "walbust did not stream within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let think = [0, 1, 5, 0, 1, 5].map(Duration::from_millis).to_vec();
    let writer_setup = match mode {
        Standby::None => "SET synchronous_commit = local",
        Standby::Stalling | Standby::Steady => "SET synchronous_commit = on",
    };
    let mut workload = oracle::Workload {
        db_url: pg.url("oracle"),
        redis_url: redis.url(),
        prefix: tag.to_string(),
        rows: args.oracle_rows,
        readers: think,
        writers: 2,
        writer_setup: writer_setup.into(),
    }
    .start()
    .await?;
    let run = Duration::from_secs(args.oracle_secs);
    let (start, mut killed) = (Instant::now(), false);
    while start.elapsed() < run {
        tokio::time::sleep(Duration::from_millis(150)).await;
        if matches!(mode, Standby::Stalling) {
            standby.pause();
            tokio::time::sleep(Duration::from_millis(60)).await;
            standby.resume();
        }
        if !killed && start.elapsed() >= run / 2 {
            killed = true;
            child.kill().await?;
            child = spawn()?;
        }
    }
    workload.finish().await?;
    let end: String = admin.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    let end: Lsn = parse_lsn(&end)?;
    let confirmed = "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1";
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let at: String = admin.query_one(confirmed, &[&tag]).await?.get(0);
        if parse_lsn(&at)? >= end {
            break;
        }
        ensure!(Instant::now() < deadline, "walbust did not confirm every write within 120 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stale = workload.stale().await?;
    stop_child(&mut child).await;
    admin.execute("SELECT pg_drop_replication_slot($1)", &[&tag]).await?;
    Ok(stale)
}

//! `latency`: commit-to-invalidation delay at steady commit rates.

use crate::Cli;
use crate::env::*;
use crate::measure::*;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

pub(crate) async fn latency(cli: &Cli, env: &Env, bin: &Path) -> anyhow::Result<()> {
    println!(
        "## latency: single-row commits, commit returned to the writer -> key deleted in Redis (keyspace notification)\n"
    );
    println!(
        "| commits/s | achieved/s | p50 | p99 | max | target p99 | p99 from INSERT sent (upper bound) | missing | commits past the target: arrived / acknowledged | load avg at runs | steal during runs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    env.publish().await?;
    env.db.batch_execute("TRUNCATE bench_items").await?;
    env.drop_slot("bench_latency").await?;
    env.flushdb().await?;
    let metrics_port = free_port()?;
    let mut child = env.spawn_walbust(bin, "bench_latency", true, Some(metrics_port))?;
    env.wait_active("bench_latency", &mut child).await?;
    let mut conn = env.cache.clone();
    redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg("KEA").exec_async(&mut conn).await?;
    let mut next_id = 1_i64;
    let mut outcome = Ok(());
    for &rate in &cli.rates {
        let (mut p50, mut p99, mut max, mut achieved, mut missing, mut load) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0usize, Vec::new());
        let (mut p99_sent, mut steal, mut late) = (Vec::new(), Vec::new(), Vec::new());
        let target = if rate <= 500 { 1.0 } else { 2.0 };
        let bound = format!("{}", target / 1e3);
        for run in 0..cli.runs {
            let count = i64::from(rate) * cli.latency_secs as i64;
            let first = next_id;
            next_id += count;
            env.seed((first..first + count).map(|id| format!("item:{id}"))).await?;
            load.push(settle(cli).await);
            let clock = CpuClock::now();
            let before = scrape(metrics_port).await.unwrap_or_default();
            let r = match latency_run(env, rate, first, count).await {
                Ok(r) => r,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
            let stolen = clock.map_or(f64::NAN, CpuClock::steal_percent_since);
            steal.push(stolen);
            // walbust's own histograms: how many commits arrived later than the target after
            // committing (the server sent them late) and how many were acknowledged later.
            let after = scrape(metrics_port).await.unwrap_or_default();
            let past = |histogram: &str| {
                let count = |page: &str| later_than(page, histogram, &bound);
                match (count(&before), count(&after)) {
                    (Some(b), Some(a)) => format!("{:.0}", a - b),
                    _ => "?".to_string(),
                }
            };
            let (arrived, acknowledged) = (past("walbust_receive_lag_seconds"), past("walbust_ack_lag_seconds"));
            late.push(format!("{arrived} / {acknowledged}"));
            eprintln!(
                "  latency {rate}/s run {}: achieved {:.0}/s, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, p99 from sent {:.3} ms, {} missing, {} early, past {target} ms: {arrived} arrived, {acknowledged} acknowledged, steal {stolen:.1}%",
                run + 1,
                r.achieved,
                r.p50,
                r.p99,
                r.max,
                r.p99_from_sent,
                r.missing,
                r.early
            );
            p50.push(r.p50);
            p99.push(r.p99);
            p99_sent.push(r.p99_from_sent);
            max.push(r.max);
            achieved.push(r.achieved);
            missing += r.missing;
        }
        if outcome.is_err() {
            break;
        }
        let ms = |v: f64| format!("{v:.2} ms");
        println!(
            "| {rate} | {} | {} | {} | {} | <= {target} ms: {} | {} | {missing} | {} | {} | {} |",
            spread(&achieved, thousands),
            spread(&p50, ms),
            spread(&p99, ms),
            spread(&max, ms),
            verdict(median(&p99) <= target && missing == 0),
            spread(&p99_sent, ms),
            late.join(", "),
            loads(&load),
            steals(&steal)
        );
    }
    stop_child(&mut child).await;
    env.drop_slot("bench_latency").await?;
    outcome?;
    println!(
        "\nwalbust ran as the release binary (child process). The writer takes each commit's time when its \
         autocommit INSERT returns; the subscriber takes the time a `__keyevent@0__:unlink` notification for \
         `item:{{id}}` arrives; both in this process, on one monotonic clock. A notification that arrives before \
         the writer has seen its commit return counts as 0 (\"early\" in the run log); the upper-bound column \
         measures from just before the INSERT was sent, so it includes the commit and its round trip.\n"
    );
    Ok(())
}

pub(crate) struct LatencyRun {
    pub(crate) achieved: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    /// p99 measured from when the INSERT was sent: an upper bound that includes the commit itself.
    pub(crate) p99_from_sent: f64,
    pub(crate) missing: usize,
    pub(crate) early: usize,
}

pub(crate) async fn latency_run(env: &Env, rate: u32, first: i64, count: i64) -> anyhow::Result<LatencyRun> {
    // Subscriber: the time each item key is deleted.
    let mut pubsub = redis::Client::open(env.redis.url())?.get_async_pubsub().await?;
    pubsub.subscribe("__keyevent@0__:unlink").await?;
    pubsub.subscribe("__keyevent@0__:del").await?;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let subscriber = tokio::spawn(async move {
        let mut seen: HashMap<i64, Instant> = HashMap::with_capacity(count as usize);
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                m = messages.next() => {
                    let Some(m) = m else { break };
                    let at = Instant::now();
                    if let Ok(key) = m.get_payload::<String>()
                        && let Some(id) = key.strip_prefix("item:").and_then(|i| i.parse::<i64>().ok())
                    {
                        seen.entry(id).or_insert(at);
                        if seen.len() as i64 >= count {
                            break;
                        }
                    }
                }
                _ = &mut stop_rx => break,
            }
        }
        seen
    });
    // Writers: one connection per 1,000 commits/s, each paced on its own schedule.
    let connections = rate.div_ceil(1000).max(1) as i64;
    let period = Duration::from_secs_f64(connections as f64 / f64::from(rate));
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut writers = Vec::new();
    for c in 0..connections {
        let client = connect(&env.pg.url("bench")).await?;
        writers.push(tokio::spawn(async move {
            let stmt =
                client.prepare("INSERT INTO bench_items (org_id, id, name, payload) VALUES ($1, $2, $3, $4)").await?;
            let mut committed = Vec::new();
            let mut k = 0i64;
            loop {
                let id = first + c + k * connections;
                if id >= first + count {
                    break;
                }
                tokio::time::sleep_until(start + period * k as u32).await;
                let org = (id % ORGS) as i32;
                let sent = Instant::now();
                client.execute(&stmt, &[&org, &id, &"item", &"payload"]).await?;
                committed.push((id, (sent, Instant::now())));
                k += 1;
            }
            Ok::<_, anyhow::Error>(committed)
        }));
    }
    let began = Instant::now();
    let mut committed: HashMap<i64, (Instant, Instant)> = HashMap::with_capacity(count as usize);
    for w in writers {
        committed.extend(w.await??);
    }
    let achieved = count as f64 / began.elapsed().as_secs_f64();
    // Let the last invalidations arrive (bounded), then stop the subscriber.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !subscriber.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(());
    let seen = subscriber.await?;
    let mut lat = Vec::with_capacity(committed.len());
    let mut from_sent = Vec::with_capacity(committed.len());
    let (mut missing, mut early) = (0, 0);
    for (id, (sent, at)) in &committed {
        match seen.get(id) {
            Some(deleted) => {
                if deleted < at {
                    early += 1;
                }
                lat.push(deleted.saturating_duration_since(*at).as_secs_f64() * 1e3);
                from_sent.push(deleted.saturating_duration_since(*sent).as_secs_f64() * 1e3);
            }
            None => missing += 1,
        }
    }
    lat.sort_by(f64::total_cmp);
    from_sent.sort_by(f64::total_cmp);
    let p99_from_sent =
        from_sent.get(((from_sent.len() as f64 - 1.0) * 0.99).round() as usize).copied().unwrap_or(f64::NAN);
    let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    Ok(LatencyRun {
        achieved,
        p50: pct(0.50),
        p99: pct(0.99),
        max: lat.last().copied().unwrap_or(f64::NAN),
        p99_from_sent,
        missing,
        early,
    })
}

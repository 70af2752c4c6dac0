//! `walbust run` serves /metrics and /healthz: counters and positions move under writes,
//! and health follows Redis going away and coming back.

use crate::support::{self, Walbust, fresh_db, wait_until, write_config_with};
use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;
use walbust::throwaway::ThrowawayRedis;

/// GET `path` from 127.0.0.1:`port`; returns the status code and body.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    Some((code, body))
}

/// The value of the first sample line starting with `prefix`.
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_under_writes_and_healthz_follows_redis() {
    let s = support::shared();
    let mut redis = tokio::task::spawn_blocking(ThrowawayRedis::start).await.unwrap().expect("own redis");
    let db = fresh_db(&s.pg, "CREATE TABLE items (id int PRIMARY KEY);").await;
    let n = &db.name;
    let port = free_port();
    let rules = format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\n");
    let files = write_config_with(&db, &redis.url(), &rules, "", "", &format!("127.0.0.1:{port}"));
    let walbust = Walbust::spawn(&["--log-level", "warn", "run", "--config"], &files.path, Stdio::inherit());
    let healthy = move || async move { get(port, "/healthz").is_some_and(|(code, _)| code == 200) };
    wait_until(Duration::from_secs(30), "/healthz to report healthy", healthy).await;
    // The container health check: `walbust health` finds /healthz through the same config.
    let probe = std::process::Command::new(env!("CARGO_BIN_EXE_walbust"))
        .args(["health", "--config"])
        .arg(&files.path)
        .output()
        .expect("walbust health runs");
    assert_eq!(probe.status.code(), Some(0), "{probe:?}");
    assert_eq!(String::from_utf8_lossy(&probe.stdout), "ok\n");

    let before = get(port, "/metrics").expect("metrics").1;
    for i in 1..=20 {
        db.client.execute("INSERT INTO items VALUES ($1)", &[&i]).await.unwrap();
    }
    let (received, flushed) = (sample(&before, "walbust_received_lsn"), sample(&before, "walbust_flushed_lsn"));
    let moved = move || async move {
        let m = get(port, "/metrics").map(|(_, b)| b).unwrap_or_default();
        sample(&m, "walbust_changes_total{") >= 20.0
            && sample(&m, "walbust_actions_total{") >= 20.0
            && sample(&m, "walbust_receive_lag_seconds_count") >= 20.0
            && sample(&m, "walbust_ack_lag_seconds_count") >= 20.0
            && sample(&m, "walbust_received_lsn") > received
            && sample(&m, "walbust_flushed_lsn") > flushed
    };
    wait_until(
        Duration::from_secs(20),
        "change and action counters to count the writes, and both positions to move",
        moved,
    )
    .await;
    let after = get(port, "/metrics").expect("metrics").1;
    assert!(after.contains("table=\"public.items\""), "{after}");
    // Every commit's arrival is timed once.
    let commits = sample(&after, "walbust_commits_total");
    assert_eq!(sample(&after, "walbust_receive_lag_seconds_count"), commits, "{after}");
    assert!(commits >= 20.0, "{after}");
    assert!(after.contains("rule=\"items\""), "{after}");

    // Redis goes away: health says so within seconds, then recovers.
    redis = tokio::task::spawn_blocking(move || {
        redis.stop().expect("stop redis");
        redis
    })
    .await
    .unwrap();
    db.client.execute("INSERT INTO items VALUES (100)", &[]).await.unwrap();
    let down =
        move || async move { get(port, "/healthz").is_some_and(|(code, body)| code == 503 && body.contains("redis")) };
    wait_until(Duration::from_secs(10), "/healthz to turn unhealthy after Redis stopped", down).await;
    let _redis = tokio::task::spawn_blocking(move || {
        redis.start_again().expect("restart redis");
        redis
    })
    .await
    .unwrap();
    wait_until(Duration::from_secs(20), "/healthz to turn healthy after Redis returned", healthy).await;

    assert_eq!(walbust.terminate(), Some(0));
}

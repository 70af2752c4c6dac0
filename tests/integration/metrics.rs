//! `walbust run` serves /metrics and /healthz: counters and positions move under writes,
//! and health follows Redis going away and coming back.

use crate::support::{self, Walbust, free_port, fresh_db, http_get, wait_until, write_config_with};
use std::process::Stdio;
use std::time::Duration;
use walbust::offline::throwaway::ThrowawayRedis;

/// The value of the first sample line starting with `prefix`.
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
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
    let healthy = move || async move { http_get(port, "/healthz").is_some_and(|(code, _)| code == 200) };
    wait_until(Duration::from_secs(60), "/healthz to report healthy", healthy).await;
    // The container health check: `walbust health` finds /healthz through the same config.
    let probe = std::process::Command::new(env!("CARGO_BIN_EXE_walbust"))
        .args(["health", "--config"])
        .arg(&files.path)
        .output()
        .expect("walbust health runs");
    assert_eq!(probe.status.code(), Some(0), "{probe:?}");
    assert_eq!(String::from_utf8_lossy(&probe.stdout), "ok\n");

    let before = http_get(port, "/metrics").expect("metrics").1;
    for i in 1..=20 {
        db.client.execute("INSERT INTO items VALUES ($1)", &[&i]).await.unwrap();
    }
    let (received, flushed) = (sample(&before, "walbust_received_lsn"), sample(&before, "walbust_flushed_lsn"));
    let moved = move || async move {
        let m = http_get(port, "/metrics").map(|(_, b)| b).unwrap_or_default();
        sample(&m, "walbust_changes_total{") >= 20.0
            && sample(&m, "walbust_actions_total{") >= 20.0
            && sample(&m, "walbust_receive_lag_seconds_count") >= 20.0
            && sample(&m, "walbust_ack_lag_seconds_count") >= 20.0
            && sample(&m, "walbust_received_lsn") > received
            && sample(&m, "walbust_flushed_lsn") > flushed
    };
    wait_until(
        Duration::from_secs(60),
        "change and action counters to count the writes, and both positions to move",
        moved,
    )
    .await;
    let after = http_get(port, "/metrics").expect("metrics").1;
    assert!(after.contains("table=\"public.items\""), "{after}");
    // Every commit's arrival is timed once.
    let commits = sample(&after, "walbust_commits_total");
    assert_eq!(sample(&after, "walbust_receive_lag_seconds_count"), commits, "{after}");
    assert!(commits >= 20.0, "{after}");
    assert!(after.contains("rule=\"items\""), "{after}");
    // The visibility gate looked at least once for the writes, and each look is timed.
    assert!(sample(&after, "walbust_gate_query_seconds_count") >= 1.0, "{after}");
    assert!(sample(&after, "walbust_gate_query_seconds_sum") > 0.0, "{after}");

    // Redis goes away: health says so within seconds, then recovers.
    redis = tokio::task::spawn_blocking(move || {
        redis.stop().expect("stop redis");
        redis
    })
    .await
    .unwrap();
    db.client.execute("INSERT INTO items VALUES (100)", &[]).await.unwrap();
    let down = move || async move {
        http_get(port, "/healthz").is_some_and(|(code, body)| code == 503 && body.contains("redis"))
    };
    wait_until(Duration::from_secs(60), "/healthz to turn unhealthy after Redis stopped", down).await;
    let _redis = tokio::task::spawn_blocking(move || {
        redis.start_again().expect("restart redis");
        redis
    })
    .await
    .unwrap();
    wait_until(Duration::from_secs(60), "/healthz to turn healthy after Redis returned", healthy).await;

    assert_eq!(walbust.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_metrics_port_is_retried_while_invalidation_runs() {
    let s = support::shared();
    let db = fresh_db(&s.pg, "CREATE TABLE items (id int PRIMARY KEY);").await;
    let n = &db.name;
    // Someone else holds the port when walbust starts.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let port = squatter.local_addr().expect("addr").port();
    let rules = format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\n");
    let files = write_config_with(&db, &s.redis.url(), &rules, "", "", &format!("127.0.0.1:{port}"));
    let mut walbust = Walbust::spawn(&["--log-level", "warn", "run", "--config"], &files.path, Stdio::inherit());

    // Invalidation works although /metrics cannot be served.
    let redis = support::redis_conn(&s.redis.url()).await;
    let key = format!("{n}:item:1");
    let invalidated = || {
        let (mut redis, key, client) = (redis.clone(), key.clone(), &db.client);
        async move {
            support::cache(&mut redis, std::slice::from_ref(&key)).await;
            // Each attempt writes a fresh row: a change made before the slot existed is not streamed.
            let _ = client.execute("INSERT INTO items VALUES (1) ON CONFLICT (id) DO UPDATE SET id = 1", &[]).await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while tokio::time::Instant::now() < deadline {
                if support::existing(&mut redis, std::slice::from_ref(&key)).await.is_empty() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        }
    };
    wait_until(Duration::from_secs(60), "an insert to be invalidated while the metrics port is busy", invalidated)
        .await;
    assert!(matches!(walbust.0.try_wait(), Ok(None)), "walbust stopped because the metrics port was busy");
    assert!(http_get(port, "/metrics").is_none(), "the squatter still holds the port");

    // Once the port is free, /metrics comes up without a restart.
    drop(squatter);
    let served = move || async move {
        http_get(port, "/metrics").is_some_and(|(code, body)| code == 200 && body.contains("walbust_"))
    };
    wait_until(Duration::from_secs(60), "/metrics to come up after the port was freed", served).await;
    assert_eq!(walbust.terminate(), Some(0));
}

/// Raises this process's open-file limit to at least `wanted` (up to the hard limit).
fn raise_fd_limit(wanted: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0, "getrlimit");
        if limit.rlim_cur >= wanted {
            return;
        }
        assert!(
            limit.rlim_max >= wanted,
            "the hard open-file limit {} is below the {wanted} this test needs; raise it with ulimit -Hn",
            limit.rlim_max
        );
        limit.rlim_cur = wanted;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0, "setrlimit");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_do_not_starve_a_scrape() {
    use walbust::telemetry::health::{Health, serve};
    use walbust::telemetry::metrics::Metrics;
    // Both ends of every connection live in this process.
    raise_fd_limit(4096);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, Metrics::new(), Health::new(), async {
        let _ = stopped.await;
    }));
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("idle connection"));
    }
    // Every idle connection has been accepted and waits for a request head.
    let scrape = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let answer = http_get(port, "/metrics");
        (answer, started.elapsed())
    });
    let (answer, took) = tokio::time::timeout(Duration::from_secs(5), scrape)
        .await
        .expect("a scrape must answer within 5 s beside 1,000 idle connections")
        .expect("scrape thread");
    let (code, body) = answer.expect("a /metrics answer");
    assert_eq!(code, 200);
    assert!(body.contains("# TYPE walbust_"), "{body}");
    println!("scrape beside 1,000 idle connections answered in {took:?}");
    drop(idle);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(60), server).await.expect("server stops").expect("no panic");
}

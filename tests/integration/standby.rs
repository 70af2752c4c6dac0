//! Two walbust processes on one slot: the second stands by (healthy, saying "standby"),
//! and takes over within seconds of a kill -9 of the first, losing no invalidation.

use crate::support::markers::{Markers, write_load};
use crate::support::{self, Walbust, free_port, fresh_db, http_get, redis_conn, wait_until, write_config_with};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_within_seconds_of_a_kill_9_and_loses_no_invalidation() {
    let s = support::shared();
    let db = fresh_db(&s.pg, "CREATE TABLE items (id int PRIMARY KEY);").await;
    let n = db.name.clone();
    let rules = format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\n");
    let takeover = "standby_takeover = \"2s\"";
    let (active_port, standby_port) = (free_port(), free_port());
    let active_files =
        write_config_with(&db, &s.redis.url(), &rules, takeover, "", &format!("127.0.0.1:{active_port}"));
    let standby_files =
        write_config_with(&db, &s.redis.url(), &rules, takeover, "", &format!("127.0.0.1:{standby_port}"));
    let args = ["--log-level", "info", "run", "--config"];
    let mut active = Walbust::spawn(&args, &active_files.path, std::process::Stdio::null());
    wait_until(Duration::from_secs(60), "the active instance to hold the slot", || async {
        support::streaming_walsender(&db.client, &n).await.is_some()
    })
    .await;
    let first = support::streaming_walsender(&db.client, &n).await;

    let log = standby_files.path.with_file_name("standby.log");
    let standby = Walbust::spawn(&args, &standby_files.path, std::fs::File::create(&log).unwrap().into());
    wait_until(Duration::from_secs(60), "the standby to say standby on /healthz", || {
        let answer = http_get(standby_port, "/healthz");
        async move { answer.is_some_and(|(code, body)| code == 200 && body == "standby\n") }
    })
    .await;
    let metrics = |port| http_get(port, "/metrics").map(|(_, body)| body).unwrap_or_default();
    assert!(metrics(standby_port).contains("\nwalbust_active 0"), "{}", metrics(standby_port));
    assert!(metrics(active_port).contains("\nwalbust_active 1"), "{}", metrics(active_port));

    let markers = Markers::Node(redis_conn(&s.redis.url()).await);
    let load = tokio::spawn({
        let (url, markers, n) = (db.url.clone(), markers.clone(), n.clone());
        async move { write_load(&url, &markers, Duration::from_secs(12), |id| vec![format!("{n}:item:{id}")]).await }
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    active.0.kill().expect("SIGKILL the active instance");
    active.0.wait().expect("reap");
    let killed = Instant::now();
    wait_until(Duration::from_secs(30), "the standby to hold the slot", || async {
        support::streaming_walsender(&db.client, &n).await.is_some_and(|pid| Some(pid) != first)
    })
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(10), "the standby streamed {took:?} after the kill");

    let cached = load.await.unwrap();
    markers.all_gone(&cached, Duration::from_secs(60)).await;
    assert_eq!(http_get(standby_port, "/healthz"), Some((200, "ok\n".to_string())));
    assert!(metrics(standby_port).contains("\nwalbust_active 1"));
    let said = std::fs::read_to_string(&log).unwrap();
    assert_eq!(said.matches("standing by").count(), 1, "one line while standing by:\n{said}");
    assert!(said.contains("taking over from standby"), "{said}");
    drop(standby);
}

/// The old instance's write-through, sent after the new instance claimed the slot, is
/// refused: on one node and on a cluster (where each hash slot has its own owner key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_from_the_instance_that_held_the_slot_before_never_lands_after_a_newer_one() {
    use walbust::domain::action::Action;
    use walbust::domain::config::{RedisConfig, RedisTopology};
    use walbust::sink::{RedisSink, Sink};
    let s = support::shared();
    let cluster = crate::cluster::cluster();
    let single =
        RedisConfig { url: s.redis.url(), ca_pem: None, dead_letter_file: None, topology: RedisTopology::Single };
    let clustered =
        RedisConfig { url: cluster.url(), topology: RedisTopology::Cluster { nodes: vec![] }, ..single.clone() };
    let slot = format!("fence_{}", std::process::id());
    for config in [single, clustered] {
        let set = |key: &str, value: &str| Action::Set { key: key.into(), value: value.into(), ttl: Some(60) };
        let keys: Vec<String> = (0..50).map(|i| format!("{slot}:row:{i}")).collect();
        let mut old = RedisSink::from_config(&config).unwrap();
        old.claim(&slot).await.expect("the old instance claims");
        old.apply(&keys.iter().map(|k| set(k, "v1")).collect::<Vec<_>>()).await.unwrap();
        let mut new = RedisSink::from_config(&config).unwrap();
        new.claim(&slot).await.expect("the new instance claims");
        new.apply(&keys.iter().map(|k| set(k, "v2")).collect::<Vec<_>>()).await.unwrap();
        // The old instance's batch was still in flight: it lands now, and must change nothing.
        old.apply(&keys.iter().map(|k| set(k, "v1")).collect::<Vec<_>>()).await.unwrap();
        let markers = match config.topology {
            RedisTopology::Cluster { .. } => Markers::cluster(&config.url).await,
            _ => Markers::Node(redis_conn(&config.url).await),
        };
        let values = markers.each(&keys, |k| redis::cmd("GET").arg(k).clone()).await;
        let old_values = values.iter().filter(|v| **v != redis::Value::BulkString(b"v2".to_vec())).count();
        assert_eq!(old_values, 0, "an old write-through overwrote a newer one ({})", config.url);
    }
}

//! Against a real Redis Cluster of three primaries with a replica each: every action kind
//! on keys spread over all primaries, a 20,000-change drain, and a primary failover and a
//! slot migration under a write load, each checked with marker keys.

use crate::routing::{drained, drained_within};
use crate::support::markers::{Markers, write_load};
use crate::support::{Running, fresh_db, wait_until, write_config_with};
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;
use walbust::offline::throwaway::ThrowawayRedisCluster;

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, org text NOT NULL DEFAULT 'acme', name text);
                     ALTER TABLE items REPLICA IDENTITY FULL;";

/// The cluster the tests that do not change its layout share.
pub(crate) fn cluster() -> &'static ThrowawayRedisCluster {
    static CLUSTER: OnceLock<ThrowawayRedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        ThrowawayRedisCluster::start(3, 1).unwrap_or_else(|e| panic!("cannot start the test Redis Cluster: {e}"))
    })
}

fn config(db: &crate::support::TestDb, cluster: &ThrowawayRedisCluster, rules: &str) -> crate::support::ConfigFiles {
    write_config_with(db, &cluster.url(), rules, "", "cluster = true", "off")
}

/// The cluster's nodes as `CLUSTER NODES` lists them: id to (port, is primary, primary's id).
fn nodes(cluster: &ThrowawayRedisCluster) -> BTreeMap<String, (u16, bool, String)> {
    let text = cluster.cli(cluster.nodes[0].port(), &["CLUSTER", "NODES"]).expect("cluster nodes");
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let port = f.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
            // A primary that serves slots: right after `--cluster create`, a node can still
            // look like a primary to the others for a moment before it turns replica.
            let primary = f.get(2)?.contains("master") && !f[2].contains("fail") && f.len() > 8;
            Some((f[0].to_string(), (port, primary, f.get(3)?.to_string())))
        })
        .collect()
}

fn primary_ports(cluster: &ThrowawayRedisCluster) -> Vec<u16> {
    nodes(cluster).values().filter(|(_, primary, _)| *primary).map(|(port, _, _)| *port).collect()
}

/// Asserts that keys matching `pattern` live on every primary.
async fn on_every_primary(cluster: &ThrowawayRedisCluster, pattern: &str) {
    let primaries = primary_ports(cluster);
    assert_eq!(primaries.len(), 3, "three primaries");
    for port in primaries {
        let found = cluster.cli(port, &["--scan", "--pattern", pattern]).expect("scan");
        assert!(!found.trim().is_empty(), "no key matching {pattern} on the primary at port {port}");
    }
}

fn keys(prefix: &str, ids: std::ops::RangeInclusive<i32>) -> Vec<String> {
    ids.map(|i| format!("{prefix}:{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_keys_on_every_primary_are_unlinked() {
    let (s, c) = (crate::support::shared(), cluster());
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = &db.name;
    let files =
        config(&db, c, &format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\n"));
    let markers = Markers::cluster(&c.url()).await;
    let items = keys(&format!("{n}:item"), 1..=300);
    let control = vec![format!("{n}:item:999")];
    markers.cache(&items).await;
    markers.cache(&control).await;
    on_every_primary(c, &format!("{n}:item:*")).await;
    let run = Running::start(&files.path).await;

    db.client.batch_execute("INSERT INTO items (id) SELECT generate_series(1, 300)").await.unwrap();
    drained(&run, &db.client).await;
    markers.all_gone(&items, Duration::from_secs(5)).await;
    assert_eq!(markers.existing(&control).await, control, "a key no change touched stays");
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_patterns_are_deleted_on_every_primary() {
    let (s, c) = (crate::support::shared(), cluster());
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = &db.name;
    let files = config(
        &db,
        c,
        &format!("[[rule]]\nname = \"lists\"\ntable = \"items\"\npatterns = [\"{n}:list:{{org}}:*\"]\n"),
    );
    let markers = Markers::cluster(&c.url()).await;
    let pages = keys(&format!("{n}:list:acme"), 1..=300);
    let control = keys(&format!("{n}:list:other"), 1..=3);
    markers.cache(&pages).await;
    markers.cache(&control).await;
    on_every_primary(c, &format!("{n}:list:acme:*")).await;
    let run = Running::start(&files.path).await;

    db.client.batch_execute("INSERT INTO items (id) VALUES (1)").await.unwrap();
    drained(&run, &db.client).await;
    markers.all_gone(&pages, Duration::from_secs(5)).await;
    assert_eq!(markers.existing(&control).await, control, "keys of another org stay");
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_tag_bust_deletes_members_on_every_primary_and_keeps_a_concurrent_sadd() {
    let (s, c) = (crate::support::shared(), cluster());
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let files =
        config(&db, c, &format!("[[rule]]\nname = \"org index\"\ntable = \"items\"\ntags = [\"{n}:idx:{{org}}\"]\n"));
    let markers = Markers::cluster(&c.url()).await;
    let tag = format!("{n}:idx:acme");
    let old = keys(&format!("{n}:old"), 1..=500);
    markers.cache(&old).await;
    on_every_primary(c, &format!("{n}:old:*")).await;
    let Markers::Cluster(mut conn) = markers.clone() else { unreachable!() };
    let _: () = redis::cmd("SADD").arg(&tag).arg(&old).query_async(&mut conn).await.unwrap();
    let run = Running::start(&files.path).await;

    // The application keeps caching: SET a key, then SADD it to the index.
    let writer = tokio::spawn({
        let (mut conn, n, tag) = (conn.clone(), n.clone(), tag.clone());
        async move {
            for i in 0..1000 {
                let key = format!("{n}:new:{i}");
                let _: () = redis::cmd("SET").arg(&key).arg("cached").query_async(&mut conn).await.unwrap();
                let _: () = redis::cmd("SADD").arg(&tag).arg(&key).query_async(&mut conn).await.unwrap();
            }
        }
    });
    db.client.batch_execute("INSERT INTO items (id) VALUES (1)").await.unwrap();
    drained(&run, &db.client).await;
    writer.await.unwrap();

    markers.all_gone(&old, Duration::from_secs(5)).await;
    let new: Vec<String> = (0..1000).map(|i| format!("{n}:new:{i}")).collect();
    let members: std::collections::HashSet<String> =
        redis::cmd("SMEMBERS").arg(&tag).query_async(&mut conn).await.unwrap();
    let orphans: Vec<String> = markers.existing(&new).await.into_iter().filter(|k| !members.contains(k)).collect();
    assert!(
        orphans.is_empty(),
        "cached keys outside the index would never be busted: {:?}",
        &orphans[..orphans.len().min(5)]
    );
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_bump_increments_versions_on_every_primary() {
    let (s, c) = (crate::support::shared(), cluster());
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = &db.name;
    let files =
        config(&db, c, &format!("[[rule]]\nname = \"versions\"\ntable = \"items\"\nbump = [\"{n}:ver:{{id}}\"]\n"));
    let markers = Markers::cluster(&c.url()).await;
    let versions = keys(&format!("{n}:ver"), 1..=300);
    markers.each(&versions, |k| redis::cmd("SET").arg(k).arg(41).clone()).await;
    on_every_primary(c, &format!("{n}:ver:*")).await;
    let run = Running::start(&files.path).await;

    db.client.batch_execute("INSERT INTO items (id) SELECT generate_series(1, 300)").await.unwrap();
    drained(&run, &db.client).await;
    let values = markers.each(&versions, |k| redis::cmd("GET").arg(k).clone()).await;
    let wrong: Vec<(&String, &redis::Value)> =
        versions.iter().zip(&values).filter(|(_, v)| **v != redis::Value::BulkString(b"42".to_vec())).collect();
    assert!(wrong.is_empty(), "every version bumped once: {:?}", &wrong[..wrong.len().min(5)]);
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_publish_reaches_a_subscriber_on_any_node() {
    let (s, c) = (crate::support::shared(), cluster());
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = &db.name;
    let files = config(
        &db,
        c,
        &format!(
            "[[rule]]\nname = \"items\"\ntable = \"items\"\npublish = [{{ channel = \"{n}-ids\", message = \"{{op}}:{{id}}\" }}]\n"
        ),
    );
    let mut received = Vec::new();
    let mut pubsubs = Vec::new();
    for node in &c.nodes {
        let mut pubsub = redis::Client::open(node.url()).unwrap().get_async_pubsub().await.unwrap();
        pubsub.subscribe(format!("{n}-ids")).await.unwrap();
        pubsubs.push(pubsub);
    }
    let run = Running::start(&files.path).await;

    db.client.batch_execute("INSERT INTO items (id) VALUES (1), (2), (3)").await.unwrap();
    drained(&run, &db.client).await;
    for pubsub in &mut pubsubs {
        let mut stream = pubsub.on_message();
        let mut got = Vec::new();
        for _ in 0..3 {
            let msg = tokio::time::timeout(Duration::from_secs(30), futures_util::StreamExt::next(&mut stream))
                .await
                .expect("a published message on every node")
                .expect("pubsub open");
            got.push(msg.get_payload::<String>().unwrap());
        }
        got.sort();
        received.push(got);
    }
    for got in received {
        assert_eq!(got, ["insert:1", "insert:2", "insert:3"]);
    }
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_refresh_writes_rows_through_on_every_primary() {
    let (s, c) = (crate::support::shared(), cluster());
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = &db.name;
    let files = config(
        &db,
        c,
        &format!(
            "[[rule]]\nname = \"item cache\"\ntable = \"items\"\nrefresh = [{{ key = \"{n}:item:{{id}}\", columns = [\"id\", \"name\"] }}]\n"
        ),
    );
    let markers = Markers::cluster(&c.url()).await;
    let items = keys(&format!("{n}:item"), 1..=300);
    let run = Running::start(&files.path).await;

    db.client
        .batch_execute("INSERT INTO items (id, name) SELECT i, 'n' || i FROM generate_series(1, 300) i")
        .await
        .unwrap();
    drained(&run, &db.client).await;
    on_every_primary(c, &format!("{n}:item:*")).await;
    let values = markers.each(&items, |k| redis::cmd("GET").arg(k).clone()).await;
    for (i, value) in (1..=300).zip(values) {
        let expected = format!(r#"{{"id":{i},"name":"n{i}"}}"#);
        assert_eq!(value, redis::Value::BulkString(expected.into_bytes()), "{n}:item:{i}");
    }
    db.client.batch_execute("DELETE FROM items").await.unwrap();
    drained(&run, &db.client).await;
    markers.all_gone(&items, Duration::from_secs(5)).await;
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_drain_of_20000_changes_leaves_no_marker() {
    let (s, c) = (crate::support::shared(), cluster());
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = &db.name;
    let files =
        config(&db, c, &format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\n"));
    let markers = Markers::cluster(&c.url()).await;
    let items = keys(&format!("{n}:item"), 1..=20_000);
    markers.cache(&items).await;
    on_every_primary(c, &format!("{n}:item:*")).await;
    // The slot first, so that the backlog written before walbust starts is in it.
    db.client.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[n]).await.unwrap();
    db.client.batch_execute("INSERT INTO items (id) SELECT generate_series(1, 20000)").await.unwrap();

    let run = Running::start(&files.path).await;
    drained(&run, &db.client).await;
    markers.all_gone(&items, Duration::from_secs(5)).await;
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_and_slot_migration_under_writes_leave_no_marker() {
    let s = crate::support::shared();
    let c = tokio::task::spawn_blocking(|| ThrowawayRedisCluster::start(3, 1)).await.unwrap().expect("own cluster");
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let files = config(
        &db,
        &c,
        &format!(
            "[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\npatterns = [\"{n}:page:{{id}}:*\"]\n"
        ),
    );
    let markers = Markers::cluster(&c.url()).await;
    let run = Running::start(&files.path).await;

    let load = tokio::spawn({
        let (url, markers, n) = (db.url.clone(), markers.clone(), n.clone());
        async move {
            write_load(&url, &markers, Duration::from_secs(20), |id| {
                vec![format!("{n}:item:{id}"), format!("{n}:page:{id}:1"), format!("{n}:page:{id}:2")]
            })
            .await
        }
    });

    // A manual failover of one primary to its replica, five seconds in.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = nodes(&c);
    let (replica_id, (replica_port, _, _)) =
        before.iter().find(|(_, (_, primary, _))| !primary).map(|(id, v)| (id.clone(), v.clone())).expect("a replica");
    assert_eq!(c.cli(replica_port, &["CLUSTER", "FAILOVER"]).unwrap().trim(), "OK");
    wait_until(Duration::from_secs(30), "the replica to become a primary", || {
        let primary = nodes(&c).get(&replica_id).is_some_and(|(_, p, _)| *p);
        async move { primary }
    })
    .await;

    // Then 1,000 slots, with their keys, move from one primary to another.
    let primaries: Vec<(String, u16)> =
        nodes(&c).into_iter().filter(|(_, (_, p, _))| *p).map(|(id, (port, _, _))| (id, port)).collect();
    let (from, to) = (primaries[0].clone(), primaries[1].clone());
    let seed = format!("127.0.0.1:{}", to.1);
    // redis-cli refuses to reshard while the nodes disagree about the failover.
    wait_until(Duration::from_secs(60), "every node to agree on the slots after the failover", || {
        let seed = seed.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new("redis-cli")
                    .args(["--cluster", "check", &seed])
                    .output()
                    .is_ok_and(|out| out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("[ERR]"))
            })
            .await
            .unwrap()
        }
    })
    .await;
    let reshard = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli")
            .args(["--cluster", "reshard", &seed, "--cluster-from", &from.0, "--cluster-to", &to.0])
            .args(["--cluster-slots", "1000", "--cluster-yes"])
            .output()
            .expect("running redis-cli --cluster reshard")
    })
    .await
    .unwrap();
    assert!(reshard.status.success(), "reshard: {}", String::from_utf8_lossy(&reshard.stderr));

    let cached = load.await.unwrap();
    // A floor, not a rate: writes stall while the failover is under way, and a loaded
    // machine writes fewer; a hundred still spread over the whole 20 s.
    assert!(cached.len() > 100, "the load wrote {} markers", cached.len());
    // Pattern deletes wait while slots move, so the reshard leaves a backlog of them, each a
    // SCAN of every primary: on a loaded machine it takes longer than the usual minute.
    drained_within(&run, &db.client, Duration::from_secs(240)).await;
    markers.all_gone(&cached, Duration::from_secs(5)).await;
    run.stop().await.expect("clean stop");
}

/// Runs the built binary with `args` and the config; exit code, stdout and stderr.
pub(crate) fn walbust(args: &[&str], config: &std::path::Path) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walbust"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running walbust");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_online_and_status_report_the_cluster_state_and_slot_coverage() {
    let (s, c) = (crate::support::shared(), cluster());
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = &db.name;
    let files =
        config(&db, c, &format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\n"));
    let expected = format!("cluster {}: state ok, 16384 of 16384 slots covered, 3 of 3 primaries reachable", c.url());
    let (code, out, err) = tokio::task::spawn_blocking({
        let path = files.path.clone();
        move || walbust(&["check", "--online"], &path)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("ok   redis {expected}")), "{out}{err}");

    // A node that is not in cluster mode: the check fails and says so.
    let single = write_config_with(
        &db,
        &s.redis.url(),
        &format!("[[rule]]\nname = \"i\"\ntable = \"items\"\nkeys = [\"{n}:i\"]\n"),
        "",
        "cluster = true",
        "off",
    );
    let (code, out, err) = tokio::task::spawn_blocking({
        let path = single.path.clone();
        move || walbust(&["check", "--online"], &path)
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("FAIL redis cluster"), "{out}{err}");
    assert!(err.contains("cluster = true needs a Redis Cluster"), "{out}{err}");

    db.client.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[n]).await.unwrap();
    let (_, out, err) = tokio::task::spawn_blocking({
        let path = files.path.clone();
        move || walbust(&["status"], &path)
    })
    .await
    .unwrap();
    assert!(out.contains(&format!("redis:               {expected}")), "{out}{err}");
    let (_, out, err) = tokio::task::spawn_blocking({
        let path = files.path.clone();
        move || walbust(&["status", "--json"], &path)
    })
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert_eq!(json["redis"]["summary"], expected, "{out}");
    assert_eq!(json["redis"]["problems"], serde_json::json!([]), "{out}");
    assert_eq!(json["slot"], *n, "the slot's fields stay at the top level: {out}");
}

//! A lost slot (dropped under a running walbust, or invalidated by
//! max_slot_wal_keep_size) leads to the configured behaviour: stop, or recreate and flush.

use crate::routing::drained;
use crate::support::{self, Running, cache, existing, fresh_db, redis_conn, wait_until, write_config};
use std::time::Duration;
use walbust::daemon::pipeline::PipelineError;
use walbust::errors::causes::error_chain;
use walbust::offline::throwaway::{PostgresOptions, ThrowawayPostgres};

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY);";

fn rules(n: &str) -> String {
    format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\n")
}

/// Ends the walsender holding `slot` and drops the slot before walbust reconnects.
async fn drop_slot_under_walbust(client: &tokio_postgres::Client, slot: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        client
            .execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL", &[&slot])
            .await
            .unwrap();
        if client.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.is_ok() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "could not drop the slot");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn is_slot_lost(e: &PipelineError) -> bool {
    error_chain(e).contains("was lost")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_under_walbust_stops_it_by_default() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let files = write_config(&db, &s.redis.url(), &rules(&db.name), "");
    let run = Running::start(&files.path).await;
    drop_slot_under_walbust(&db.client, &db.name).await;
    let err = run.stopped_by_itself(Duration::from_secs(60)).await.expect_err("walbust must stop");
    assert!(is_slot_lost(&err), "{}", error_chain(&err));
    assert!(error_chain(&err).contains("dropped"), "{}", error_chain(&err));
    let slot =
        db.client.query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&db.name]).await.unwrap();
    assert!(slot.is_none(), "the slot is not silently recreated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_under_walbust_is_recreated_and_flushed_when_asked() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let extra = format!("on_slot_lost = \"recreate\"\nflush = {{ patterns = [\"{n}:item:*\"] }}");
    let files = write_config(&db, &s.redis.url(), &rules(&n), &extra);
    let mut redis = redis_conn(&s.redis.url()).await;
    let run = Running::start(&files.path).await;
    let stale: Vec<String> = (1..=5).map(|i| format!("{n}:item:{i}")).collect();
    let bystander = vec![format!("{n}:other")];
    cache(&mut redis, &[stale.clone(), bystander.clone()].concat()).await;

    drop_slot_under_walbust(&db.client, &n).await;
    wait_until(Duration::from_secs(60), "the flush actions to run", || {
        let (url, stale) = (s.redis.url(), stale.clone());
        async move { existing(&mut redis_conn(&url).await, &stale).await.is_empty() }
    })
    .await;
    assert_eq!(existing(&mut redis, &bystander).await, bystander, "only the flush patterns are deleted");

    // Streaming goes on from the new slot.
    let key = vec![format!("{n}:item:9")];
    cache(&mut redis, &key).await;
    db.client.batch_execute("INSERT INTO items VALUES (9)").await.unwrap();
    drained(&run, &db.client).await;
    assert!(existing(&mut redis, &key).await.is_empty());
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_by_max_slot_wal_keep_size_follows_each_policy() {
    let s = support::shared();
    let options = PostgresOptions {
        settings: vec!["max_slot_wal_keep_size = '1MB'".into(), "wal_keep_size = 0".into()],
        ..Default::default()
    };
    let pg =
        tokio::task::spawn_blocking(move || ThrowawayPostgres::start(&options)).await.unwrap().expect("own postgres");
    let db = fresh_db(&pg, ITEMS).await;
    let n = db.name.clone();
    let files = write_config(&db, &s.redis.url(), &rules(&n), "");
    Running::start(&files.path).await.stop().await.expect("clean stop");

    // With walbust stopped, WAL moves on past the slot's limit and a checkpoint removes it.
    let lost = || async {
        db.client.batch_execute("INSERT INTO items SELECT g FROM generate_series(1, 1000) g ON CONFLICT DO NOTHING; SELECT pg_switch_wal(); CHECKPOINT;").await.unwrap();
        let row = db
            .client
            .query_one("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", &[&n])
            .await
            .unwrap();
        row.get::<_, Option<String>>(0).as_deref() == Some("lost")
    };
    wait_until(Duration::from_secs(60), "the slot to be invalidated", lost).await;

    let err = match Running::try_start(&files.path).await {
        Ok(_) => panic!("walbust must refuse a lost slot by default"),
        Err(e) => e,
    };
    assert!(is_slot_lost(&err) && error_chain(&err).contains("wal_status = lost"), "{}", error_chain(&err));

    let extra = format!("on_slot_lost = \"recreate\"\nflush = {{ patterns = [\"{n}:item:*\"] }}");
    let files = write_config(&db, &s.redis.url(), &rules(&n), &extra);
    let mut redis = redis_conn(&s.redis.url()).await;
    let stale = vec![format!("{n}:item:1")];
    cache(&mut redis, &stale).await;
    let run = Running::start(&files.path).await;
    wait_until(Duration::from_secs(60), "the flush actions to run", || {
        let (url, stale) = (s.redis.url(), stale.clone());
        async move { existing(&mut redis_conn(&url).await, &stale).await.is_empty() }
    })
    .await;
    let status: String = db
        .client
        .query_one("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", &[&n])
        .await
        .unwrap()
        .get(0);
    assert_ne!(status, "lost", "the slot was recreated");
    run.stop().await.expect("clean stop");
}

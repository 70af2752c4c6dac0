//! A failover with a failover slot (PostgreSQL 17): a primary and a streaming standby that
//! synchronizes walbust's slot; rows are written continuously, each after a marker key is
//! cached; the old primary stops mid-stream and the standby is promoted. walbust, given
//! both hosts with target_session_attrs=primary, finds the new primary by itself, resumes
//! from the synchronized slot, and every marker of a committed write is invalidated.

use crate::config_files::{stderr, walbust};
use crate::support::{self, Running, connect, redis_conn, wait_until, write_config};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use walbust::daemon::pipeline::Event;
use walbust::offline::throwaway::{PostgresOptions, ThrowawayPostgres};

const WAIT: Duration = Duration::from_secs(120);
const STANDBY_SLOT: &str = "standby1";

/// The slot's `synced` and `confirmed_flush_lsn` on `client`'s server, when it exists.
async fn slot_on(client: &tokio_postgres::Client, slot: &str) -> Option<(bool, String)> {
    let row = client
        .query_opt(
            "SELECT synced AND NOT temporary, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("reading pg_replication_slots")?;
    Some((row.get(0), row.get::<_, Option<String>>(1).unwrap_or_default()))
}

/// Runs each statement of `sql` on its own, as psql does with a script (ALTER SYSTEM cannot
/// share a query with another statement).
async fn run_each(client: &tokio_postgres::Client, sql: &str) {
    for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        client.batch_execute(statement).await.unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

/// `synchronized_standby_slots` as a new session sees it.
async fn standby_slots(admin: &tokio_postgres::Client) -> String {
    admin.query_one("SHOW synchronized_standby_slots", &[]).await.expect("SHOW").get(0)
}

fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').expect("an LSN");
    (u64::from_str_radix(hi, 16).expect("hex") << 32) | u64::from_str_radix(lo, 16).expect("hex")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_resumes_from_the_synchronized_slot_and_loses_no_invalidation() {
    let s = support::shared();
    let options = PostgresOptions {
        bin: Some(support::pg_bin(17)),
        settings: vec![format!("synchronized_standby_slots = '{STANDBY_SLOT}'"), "wal_sender_timeout = '10s'".into()],
        ..Default::default()
    };
    let mut primary = tokio::task::spawn_blocking(move || ThrowawayPostgres::start(&options))
        .await
        .expect("start-up thread")
        .expect("the primary (PostgreSQL 17)");
    let name = format!("failover_{}", std::process::id());
    let admin = connect(&primary.url("postgres")).await;
    admin
        .batch_execute(&format!("SELECT pg_create_physical_replication_slot('{STANDBY_SLOT}')"))
        .await
        .expect("the standby's slot");
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("database");
    drop(admin);
    let client = connect(&primary.url(&name)).await;
    client
        .batch_execute(&format!(
            "CREATE TABLE items (id bigint PRIMARY KEY, at timestamptz DEFAULT now());
             CREATE PUBLICATION {name} FOR ALL TABLES;"
        ))
        .await
        .expect("schema");
    drop(client);
    let (primary, standby) = tokio::task::spawn_blocking(move || {
        let standby = primary.start_standby(&[
            format!("primary_slot_name = '{STANDBY_SLOT}'"),
            "hot_standby_feedback = on".into(),
            "sync_replication_slots = on".into(),
            // The copy carries the primary's setting; once promoted, the standby has no
            // standbys of its own to wait for.
            "synchronized_standby_slots = ''".into(),
        ]);
        (primary, standby)
    })
    .await
    .expect("standby thread");
    let mut primary = primary;
    let standby = standby.expect("the streaming standby");

    // Both hosts: walbust settles on whichever is the primary.
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{name}?sslmode=disable&target_session_attrs=primary&connect_timeout=2",
        primary.port(),
        standby.port()
    );
    let db = support::TestDb { name: name.clone(), url: url.clone(), client: connect(&primary.url(&name)).await };
    let rules = format!(
        "[[rule]]\nname = \"items\"\ntable = \"items\"\non = [\"insert\", \"update\", \"delete\"]\nkeys = [\"{name}:item:{{id}}\"]\n"
    );
    let files = write_config(&db, &s.redis.url(), &rules, "failover = true\nheartbeat_interval = \"1s\"");

    // check --online names a missing setting with its fix and the server to run it on; the
    // fix it prints makes it pass.
    let config = files.path.to_str().expect("utf-8 path");
    let admin = connect(&primary.url("postgres")).await;
    run_each(&admin, "ALTER SYSTEM SET synchronized_standby_slots = ''; SELECT pg_reload_conf();").await;
    let admin = &admin;
    wait_until(WAIT, "the primary to reload", || async move { standby_slots(admin).await.is_empty() }).await;
    let out = walbust(&["check", "--online", "--config", config]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let on_primary = format!("  hint: on the primary 127.0.0.1:{}: ", primary.port());
    let fix = err
        .lines()
        .find_map(|l| l.strip_prefix(&on_primary))
        .unwrap_or_else(|| panic!("no fix for the primary:\n{err}"));
    assert_eq!(
        fix,
        format!("ALTER SYSTEM SET synchronized_standby_slots = '{STANDBY_SLOT}'; SELECT pg_reload_conf();")
    );
    assert!(
        err.contains(&format!("does not name `{STANDBY_SLOT}`, the slot of the standby 127.0.0.1:{}", standby.port())),
        "{err}"
    );
    run_each(admin, fix).await;
    wait_until(WAIT, "the primary to reload", || async move { standby_slots(admin).await == STANDBY_SLOT }).await;
    let out = walbust(&["check", "--online", "--config", config]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", stderr(&out));
    assert!(stdout.contains(&format!("ok   failover slot: standbys 127.0.0.1:{}", standby.port())), "{stdout}");

    let (running, mut events) = Running::start_observed(&files.path).await;

    // The standby keeps the failover slot in step before anything else happens.
    let on_standby = connect(&standby.url(&name)).await;
    let on_standby = &on_standby;
    let slot = name.as_str();
    wait_until(WAIT, "the standby to synchronize walbust's failover slot", || async move {
        slot_on(on_standby, slot).await.is_some_and(|(synced, _)| synced)
    })
    .await;

    // The writer: cache a marker, then commit the row it stands for, on whichever server is
    // the primary; a write whose outcome is unknown is retried as an upsert, which changes
    // the row either way.
    let writer_url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname={name} target_session_attrs=read-write connect_timeout=2",
        primary.port(),
        standby.port()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, committed, redis_url, name) = (stop.clone(), committed.clone(), s.redis.url(), name.clone());
        tokio::spawn(async move {
            let mut redis = redis_conn(&redis_url).await;
            let mut client: Option<tokio_postgres::Client> = None;
            let mut id: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let c = match client.take() {
                    Some(c) if !c.is_closed() => c,
                    _ => match tokio_postgres::connect(&writer_url, tokio_postgres::NoTls).await {
                        Ok((c, conn)) => {
                            tokio::spawn(conn);
                            c
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let key = format!("{name}:item:{id}");
                let _: () = redis::cmd("SET").arg(&key).arg("cached").query_async(&mut redis).await.expect("marker");
                // A retry after a commit whose answer was lost still changes the row, so the
                // marker set again before it is busted again.
                let upsert = "INSERT INTO items (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET at = now()";
                match c.execute(upsert, &[&id]).await {
                    Ok(_) => {
                        id += 1;
                        committed.store(id as u64, Ordering::Relaxed);
                        client = Some(c);
                    }
                    // The connection broke: retry the same row on the server that is primary now.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            id as u64
        })
    };
    let before = committed.load(Ordering::Relaxed);
    wait_until(WAIT, "writes to flow before the failover", || {
        let committed = committed.clone();
        async move { committed.load(Ordering::Relaxed) >= before + 200 }
    })
    .await;

    // The failover: the old primary stops mid-stream, the standby is promoted.
    while events.try_recv().is_ok() {}
    let counted = committed.clone();
    let promoted = tokio::task::spawn_blocking(move || {
        primary.stop().expect("stopping the old primary");
        let at_promotion = counted.load(Ordering::Relaxed);
        let at = Instant::now();
        standby.promote().expect("pg_ctl promote");
        (primary, standby, at, at_promotion)
    })
    .await
    .expect("failover thread");
    let (_old_primary, standby, promoted_at, at_promotion) = promoted;
    let streaming_again = tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Some(Event::Streaming { .. }) => return Instant::now(),
                Some(_) => {}
                None => panic!("the pipeline stopped after the failover"),
            }
        }
    })
    .await
    .expect("walbust did not stream from the new primary in time");
    let to_streaming = streaming_again.duration_since(promoted_at);

    let new_primary = connect(&standby.url(&name)).await;
    wait_until(WAIT, "writes to flow on the new primary", || {
        let committed = committed.clone();
        async move { committed.load(Ordering::Relaxed) >= at_promotion + 200 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.expect("the writer");
    let end: String = new_primary.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("wal end").get(0);

    // Every marker of a committed write is invalidated...
    let mut redis = redis_conn(&s.redis.url()).await;
    let keys: Vec<String> = (0..writes).map(|i| format!("{name}:item:{i}")).collect();
    let keys = &keys;
    let redis_ref = &mut redis;
    let deadline = tokio::time::Instant::now() + WAIT;
    let lost = loop {
        let left = support::existing(redis_ref, keys).await;
        if left.is_empty() || tokio::time::Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // ...and the slot on the new primary advances past the last write.
    let (new_primary, end) = (&new_primary, end.as_str());
    wait_until(WAIT, "the slot on the new primary to confirm the last write", || async move {
        slot_on(new_primary, slot)
            .await
            .is_some_and(|(_, confirmed)| !confirmed.is_empty() && lsn(&confirmed) >= lsn(end))
    })
    .await;
    running.stop().await.expect("clean stop");
    eprintln!(
        "failover: {writes} writes committed ({at_promotion} before the promotion), {} invalidations checked, {} lost, \
         {:.2} s from promotion to streaming again",
        keys.len(),
        lost.len(),
        to_streaming.as_secs_f64()
    );
    assert!(lost.is_empty(), "{} of {writes} committed writes were not invalidated: {lost:?}", lost.len());
}

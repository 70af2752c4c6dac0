//! Nothing committed is lost: not to a SIGKILL, a Redis outage, or a Postgres restart;
//! and an idle database does not pin WAL.

use crate::routing::current_lsn;
use crate::support::{
    self, Running, StderrLog, Walbust, cache, existing, fresh_db, redis_conn, wait_until, write_config,
};
use std::process::Stdio;
use std::time::Duration;
use walbust::daemon::pipeline::Event;
use walbust::offline::throwaway::{PostgresOptions, ThrowawayPostgres, ThrowawayRedis};
use walbust::postgres::lsn::Lsn;

const ITEMS_SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);";

fn item_rules(prefix: &str) -> String {
    format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{prefix}:item:{{id}}\"]\n")
}

fn item_keys(prefix: &str, ids: impl IntoIterator<Item = i32>) -> Vec<String> {
    ids.into_iter().map(|i| format!("{prefix}:item:{i}")).collect()
}

/// Waits until every key in `keys` is gone from Redis.
async fn all_gone(redis_url: &str, keys: &[String], timeout: Duration) {
    let mut conn = redis_conn(redis_url).await;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = existing(&mut conn, keys).await;
        if left.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} keys never invalidated, e.g. {:?}",
            left.len(),
            &left[..left.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn confirmed_flush(client: &tokio_postgres::Client, slot: &str) -> Lsn {
    let row = client
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .expect("slot query");
    row.get::<_, String>(0).parse().expect("lsn")
}

/// Runs `insert` (one `INSERT` statement) in a transaction of its own, and returns a WAL
/// position read inside that transaction: its commit lies past it, in the server's WAL and
/// in the replication stream (a Commit message carries the commit record's end).
async fn before_commit(client: &tokio_postgres::Client, insert: &str) -> Lsn {
    let sql = format!("WITH ins AS ({insert} RETURNING 1) SELECT pg_current_wal_insert_lsn()::text FROM ins");
    let row = client.query_one(&sql, &[]).await.expect("insert");
    row.get::<_, String>(0).parse().expect("lsn")
}

fn spawn_walbust(config: &std::path::Path) -> Walbust {
    Walbust::spawn(&["--log-level", "warn", "run", "--config"], config, Stdio::inherit())
}

/// Waits until walbust streams its slot: a slot is listed as active from the start of its
/// creation, before it decodes anything committed.
async fn wait_for_slot(client: &tokio_postgres::Client, slot: &str) {
    wait_until(Duration::from_secs(60), "walbust to stream its slot", || async {
        support::streaming_walsender(client, slot).await.is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_writes_then_restart_loses_no_invalidation() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS_SCHEMA).await;
    let files = write_config(&db, &s.redis.url(), &item_rules(&db.name), "");
    let keys = item_keys(&db.name, 1..=300);
    cache(&mut redis_conn(&s.redis.url()).await, &keys).await;

    let mut walbust = spawn_walbust(&files.path);
    wait_for_slot(&db.client, &db.name).await;
    for i in 1..=120 {
        db.client.execute("INSERT INTO items (id) VALUES ($1)", &[&i]).await.expect("insert");
    }
    walbust.0.kill().expect("SIGKILL");
    walbust.0.wait().expect("reap");
    for i in 121..300 {
        db.client.execute("INSERT INTO items (id) VALUES ($1)", &[&i]).await.expect("insert");
    }
    // The last write's commit lies past a position read inside its transaction, so that
    // position is a lower bound of what walbust must acknowledge, whatever other databases
    // of the shared cluster write meanwhile.
    let before_last_commit = before_commit(&db.client, "INSERT INTO items (id) VALUES (300)").await;
    let walbust = spawn_walbust(&files.path);
    all_gone(&s.redis.url(), &keys, Duration::from_secs(60)).await;

    // SIGTERM: finish, acknowledge, exit 0.
    assert_eq!(walbust.terminate(), Some(0), "SIGTERM ends walbust with exit code 0");
    let confirmed = confirmed_flush(&db.client, &db.name).await;
    assert!(
        confirmed > before_last_commit,
        "acknowledged on exit: the slot confirms {confirmed}, the last commit lies past {before_last_commit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_for_seconds_under_writes_loses_no_invalidation() {
    let s = support::shared();
    let mut redis = tokio::task::spawn_blocking(ThrowawayRedis::start).await.unwrap().expect("own redis");
    let db = fresh_db(&s.pg, ITEMS_SCHEMA).await;
    let files = write_config(&db, &redis.url(), &item_rules(&db.name), "");
    let keys = item_keys(&db.name, 1..=200);
    cache(&mut redis_conn(&redis.url()).await, &keys).await;
    let run = Running::start(&files.path).await;

    for i in 1..=60 {
        db.client.execute("INSERT INTO items (id) VALUES ($1)", &[&i]).await.unwrap();
    }
    // An operator stops Redis (saving its data), writes go on, Redis comes back.
    redis = tokio::task::spawn_blocking(move || {
        redis.stop().expect("stop redis");
        redis
    })
    .await
    .unwrap();
    let outage = tokio::time::Instant::now();
    for i in 61..=200 {
        db.client.execute("INSERT INTO items (id) VALUES ($1)", &[&i]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    tokio::time::sleep_until(outage + Duration::from_secs(4)).await;
    wait_until(Duration::from_secs(60), "applies to fail while Redis is down", || {
        let errors = run.metrics.redis_errors();
        async move { errors > 0 }
    })
    .await;
    let redis = tokio::task::spawn_blocking(move || {
        redis.start_again().expect("restart redis");
        redis
    })
    .await
    .unwrap();
    all_gone(&redis.url(), &keys, Duration::from_secs(60)).await;
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_reconnects_and_loses_no_invalidation() {
    let s = support::shared();
    let pg = tokio::task::spawn_blocking(|| ThrowawayPostgres::start(&PostgresOptions::default()))
        .await
        .unwrap()
        .expect("own postgres");
    let db = fresh_db(&pg, ITEMS_SCHEMA).await;
    let files = write_config(&db, &s.redis.url(), &item_rules(&db.name), "");
    let keys = item_keys(&db.name, 1..=150);
    cache(&mut redis_conn(&s.redis.url()).await, &keys).await;
    let run = Running::start(&files.path).await;

    for i in 1..=75 {
        db.client.execute("INSERT INTO items (id) VALUES ($1)", &[&i]).await.unwrap();
    }
    let mut pg = tokio::task::spawn_blocking(move || {
        let mut pg = pg;
        pg.restart().expect("restart postgres");
        pg
    })
    .await
    .unwrap();
    let client = support::connect(&db.url).await;
    for i in 76..=150 {
        client.execute("INSERT INTO items (id) VALUES ($1)", &[&i]).await.unwrap();
    }
    all_gone(&s.redis.url(), &keys, Duration::from_secs(60)).await;
    assert!(run.metrics.reconnects() >= 1, "walbust reconnected");
    run.stop().await.expect("clean stop");
    pg.stop().expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_database_keeps_confirming_while_another_database_writes() {
    let s = support::shared();
    let idle = fresh_db(&s.pg, ITEMS_SCHEMA).await;
    let busy = fresh_db(&s.pg, "CREATE TABLE noise (id serial PRIMARY KEY, pad text);").await;
    let files = write_config(&idle, &s.redis.url(), &item_rules(&idle.name), "");
    let run = Running::start(&files.path).await;
    let before = confirmed_flush(&idle.client, &idle.name).await;
    // About 32 MB of WAL in the other database, two segments' worth.
    for _ in 0..40 {
        busy.client
            .batch_execute(
                "INSERT INTO noise (pad) SELECT repeat(md5(random()::text), 25) FROM generate_series(1, 1000)",
            )
            .await
            .unwrap();
    }
    let target = current_lsn(&busy.client).await;
    assert!(target.0 - before.0 > 16 << 20, "the other database wrote {} bytes of WAL", target.0 - before.0);
    wait_until(
        Duration::from_secs(60),
        "the idle slot's confirmed_flush_lsn to pass the other database's writes",
        || async { confirmed_flush(&idle.client, &idle.name).await >= target },
    )
    .await;
    // The slot's restart point follows (a checkpoint logs the running transactions it needs),
    // so the slot no longer retains the other database's WAL.
    let released = || async {
        busy.client.batch_execute("CHECKPOINT").await.unwrap();
        let sql = "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1";
        let restart: Lsn =
            idle.client.query_one(sql, &[&idle.name]).await.unwrap().get::<_, String>(0).parse().unwrap();
        restart >= target
    };
    wait_until(Duration::from_secs(60), "the idle slot's restart point to pass the other database's writes", released)
        .await;
    run.stop().await.expect("clean stop");
}

/// While Redis works on one batch, the transactions that arrive meanwhile wait together in
/// the next batch instead of queueing one round trip each; none of them is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_arriving_while_redis_is_busy_share_the_next_batch() {
    let s = support::shared();
    let redis = tokio::task::spawn_blocking(ThrowawayRedis::start).await.unwrap().expect("own redis");
    let db = fresh_db(&s.pg, ITEMS_SCHEMA).await;
    let files = write_config(&db, &redis.url(), &item_rules(&db.name), "");
    // Only a transaction's Commit, not the batch's age, may end its batch here.
    let mut config = std::fs::read_to_string(&files.path).unwrap();
    config.push_str("[batch]\nmax_delay = \"10s\"\n");
    std::fs::write(&files.path, config).unwrap();
    let keys = item_keys(&db.name, 1..=40);
    let mut conn = redis_conn(&redis.url()).await;
    cache(&mut conn, &keys).await;
    let (run, mut events) = Running::start_observed(&files.path).await;
    db.client.execute("INSERT INTO items (id) VALUES (1)", &[]).await.unwrap();
    // Once that transaction's batch is applied the applier is idle.
    loop {
        let event = tokio::time::timeout(Duration::from_secs(60), events.recv()).await;
        match event.expect("the first insert was not applied within 60s").expect("pipeline stopped") {
            Event::Applied { actions, .. } if !actions.is_empty() => break,
            _ => {}
        }
    }

    // Redis holds every write back until walbust has read the 39 transactions that commit
    // meanwhile (its reader goes on while the applier waits for Redis).
    redis::cmd("CLIENT").arg("PAUSE").arg(120_000).arg("WRITE").query_async::<()>(&mut conn).await.unwrap();
    for i in 2..40 {
        db.client.execute("INSERT INTO items (id) VALUES ($1)", &[&i]).await.unwrap();
    }
    let before_last_commit = before_commit(&db.client, "INSERT INTO items (id) VALUES (40)").await;
    wait_until(Duration::from_secs(60), "walbust to read the last transaction's commit", || {
        let received = run.metrics.received();
        async move { received > before_last_commit }
    })
    .await;
    redis::cmd("CLIENT").arg("UNPAUSE").query_async::<()>(&mut conn).await.unwrap();
    all_gone(&redis.url(), &keys, Duration::from_secs(60)).await;
    // Once Redis is idle again, one transaction of 300 rows goes whole in one batch: the
    // server sends it in one burst after its commit, and walbust waits for that Commit.
    let big = item_keys(&db.name, [1300]);
    cache(&mut conn, &big).await;
    db.client.batch_execute("INSERT INTO items (id) SELECT g FROM generate_series(1001, 1300) g").await.unwrap();
    all_gone(&redis.url(), &big, Duration::from_secs(60)).await;
    run.stop().await.expect("clean stop");

    let mut batches = Vec::new();
    while let Some(event) = events.recv().await {
        if let Event::Applied { actions, commits, .. } = event
            && !actions.is_empty()
        {
            batches.push((actions.len(), commits.len()));
        }
    }
    // The first batch went to Redis as the pause began, holding whatever had arrived by
    // then (one transaction, or a few when they landed in the same read), and everything
    // after it waited in one; the large transaction came whole in a third. A batch that
    // holds a commit goes even when the next transaction has begun to arrive, so the first
    // may also hold the insert of the transaction whose Commit rides in the second.
    assert_eq!(batches.len(), 3, "batches with actions as (actions, commits): {batches:?}");
    let (first, waited) = (batches[0], batches[1]);
    assert!(
        first.0 == first.1 || first.0 == first.1 + 1,
        "one action per transaction, and at most the next one begun: {batches:?}"
    );
    assert_eq!(first.0 + waited.0, 39, "one action per single-row transaction: {batches:?}");
    assert_eq!(first.1 + waited.1, 39, "every transaction of the pause, once: {batches:?}");
    assert!(waited.1 > first.1, "most transactions waited for the busy batch: {batches:?}");
    assert_eq!(batches[2], (300, 1), "the large transaction, whole: {batches:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_redis_is_down_and_the_walsender_goes_away_exits_0_without_panicking() {
    let s = support::shared();
    let redis = tokio::task::spawn_blocking(ThrowawayRedis::start).await.unwrap().expect("own redis");
    let db = fresh_db(&s.pg, ITEMS_SCHEMA).await;
    let files = write_config(&db, &redis.url(), &item_rules(&db.name), "");
    let keys = item_keys(&db.name, [1]);
    cache(&mut redis_conn(&redis.url()).await, &keys).await;
    let mut walbust = Walbust::spawn(&["--log-level", "info", "run", "--config"], &files.path, Stdio::piped());
    let log = StderrLog::capture(&mut walbust.0);
    wait_for_slot(&db.client, &db.name).await;

    // Redis stops taking writes (paused, so its port is never handed to another server), a row
    // changes, and a stop is requested while the batch waits for Redis.
    let mut admin = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(120_000).arg("WRITE").query_async(&mut admin).await.unwrap();
    db.client.execute("INSERT INTO items (id) VALUES (1)", &[]).await.expect("insert");
    log.wait_for("applying a batch failed", Duration::from_secs(60)).await;
    walbust.signal(libc::SIGTERM);
    log.wait_for("SIGTERM", Duration::from_secs(60)).await;
    // The server side of the replication connection goes away meanwhile.
    let pid: i32 = db
        .client
        .query_one("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&db.name])
        .await
        .expect("walsender pid")
        .get(0);
    db.client.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.expect("terminate walsender");
    let _: () = redis::cmd("CLIENT").arg("UNPAUSE").query_async(&mut admin).await.unwrap();

    let code = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = walbust.0.try_wait().expect("waiting for walbust") {
                return status.code();
            }
            assert!(std::time::Instant::now() < deadline, "walbust did not stop within 60 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "a requested stop exits 0 (101 is a panic)");
    all_gone(&redis.url(), &keys, Duration::from_secs(60)).await;
}

//! Never stale, not only never lost: the visibility gate, the delayed second delete, the
//! two positions walbust reports, and `walbust.wait()`.

use crate::durability::confirmed_flush;
use crate::routing::current_lsn;
use crate::support::{
    self, Running, Walbust, cache, connect, existing, fresh_db, redis_conn, wait_until, write_config_with,
};
use redis::AsyncCommands;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;
use walbust::daemon::visibility::{Passed, VisibilityGate};
use walbust::offline::oracle;
use walbust::offline::throwaway::{PostgresOptions, ThrowawayPostgres, ThrowawayRedis, ThrowawayStandby};
use walbust::postgres::ConnInfo;
use walbust::postgres::lsn::Lsn;

const WAIT: Duration = Duration::from_secs(60);
const ITEMS: &str =
    "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0); INSERT INTO items VALUES (1, 0);";

fn rules(prefix: &str) -> String {
    format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{prefix}:item:{{id}}\"]\n")
}

/// A cluster whose synchronous standby never connects: a session with
/// `synchronous_commit = on` commits locally, then waits in the window where its commit is
/// decoded but not yet visible, until its wait is cancelled. Other sessions commit at once.
fn stalled_standby_cluster() -> &'static ThrowawayPostgres {
    static PG: OnceLock<ThrowawayPostgres> = OnceLock::new();
    PG.get_or_init(|| {
        support::shared();
        let options = PostgresOptions {
            settings: vec![
                "synchronous_standby_names = 'stalled_standby'".into(),
                "synchronous_commit = local".into(),
                "wal_sender_timeout = '30s'".into(),
            ],
            hba: vec![],
            files: vec![],
            bin: None,
        };
        ThrowawayPostgres::start(&options).unwrap_or_else(|e| panic!("cannot start the stalled-standby Postgres: {e}"))
    })
}

fn config(db: &support::TestDb, redis_url: &str, consistency: &str) -> support::ConfigFiles {
    write_config_with(db, redis_url, &rules(&db.name), "", &format!("[consistency]\n{consistency}\n"), "off")
}

async fn write_lsn(client: &tokio_postgres::Client, slot: &str) -> Option<Lsn> {
    let row = client
        .query_opt(
            "SELECT r.write_lsn::text FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .expect("walsender query")?;
    row.get::<_, Option<String>>(0).map(|l| l.parse().expect("lsn"))
}

/// Waits for `key`'s first delete, then plays a reader that read the old row before the
/// commit at `commit` and fills the cache after that delete; returns once walbust reports
/// the first delete's position in `pg_stat_replication.write_lsn`.
async fn late_fill_after_the_first_delete(
    db: &support::TestDb,
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    commit: Lsn,
) {
    gone(conn, key, "the first delete").await;
    let _: () = conn.set(key, "old row").await.expect("late fill");
    wait_until(WAIT, "the first delete's position in pg_stat_replication.write_lsn", || async {
        write_lsn(&db.client, &db.name).await.is_some_and(|l| l >= commit)
    })
    .await;
}

/// Waits until `key` is gone from Redis.
#[track_caller]
fn gone<'a>(
    conn: &'a redis::aio::MultiplexedConnection,
    key: &'a str,
    what: &'a str,
) -> impl std::future::Future<Output = ()> + 'a {
    wait_until(WAIT, what, move || {
        let (key, mut conn) = (key.to_string(), conn.clone());
        async move { existing(&mut conn, &[key]).await.is_empty() }
    })
}

async fn get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    conn.get(key).await.expect("redis GET")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_not_deleted_while_its_commit_waits_for_a_synchronous_standby() {
    let s = support::shared();
    let pg = stalled_standby_cluster();
    let db = fresh_db(pg, ITEMS).await;
    let files = config(&db, &s.redis.url(), "");
    let key = format!("{}:item:1", db.name);
    let mut conn = redis_conn(&s.redis.url()).await;
    cache(&mut conn, std::slice::from_ref(&key)).await;
    let running = Running::start(&files.path).await;

    let writer = connect(&db.url).await;
    writer.batch_execute("SET synchronous_commit = on").await.expect("set");
    let pid: i32 = writer.query_one("SELECT pg_backend_pid()", &[]).await.expect("pid").get(0);
    let update = tokio::spawn(async move {
        writer.execute("UPDATE items SET v = 1 WHERE id = 1", &[]).await.expect("update");
        writer
    });
    wait_until(WAIT, "walbust to receive the commit", || async { running.metrics.commits() >= 1 }).await;
    let metrics = running.metrics.clone();
    let mut probe = redis_conn(&s.redis.url()).await;
    let probe_key = key.clone();
    wait_until(WAIT, "the gate to hold the invisible commit, or the key to go", || {
        let (metrics, key) = (metrics.clone(), probe_key.clone());
        let mut probe = probe.clone();
        async move { metrics.gate_held_total() >= 1 || existing(&mut probe, &[key]).await.is_empty() }
    })
    .await;
    let reader = connect(&db.url).await;
    let seen: i32 = reader.query_one("SELECT v FROM items WHERE id = 1", &[]).await.expect("read").get(0);
    assert_eq!(seen, 0, "the commit is not yet visible to other sessions");
    assert_eq!(
        existing(&mut probe, std::slice::from_ref(&key)).await.len(),
        1,
        "the key was deleted while its commit was not visible: a reader would cache the old row again"
    );
    assert!(!update.is_finished(), "the commit still waits for the standby");

    // Cancelling the wait leaves the commit in place and makes it visible.
    reader.execute("SELECT pg_cancel_backend($1)", &[&pid]).await.expect("cancel");
    update.await.expect("the update finishes once its wait is cancelled");
    gone(&conn, &key, "the key to be deleted once the commit is visible").await;
    running.stop().await.expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_fill_after_the_first_delete_is_removed_by_the_second_and_the_slot_waits_for_it() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let files = config(&db, &s.redis.url(), "redelete_after = \"8s\"");
    let key = format!("{}:item:1", db.name);
    let mut conn = redis_conn(&s.redis.url()).await;
    cache(&mut conn, std::slice::from_ref(&key)).await;
    let running = Running::start(&files.path).await;

    db.client.execute("UPDATE items SET v = 1 WHERE id = 1", &[]).await.expect("update");
    let commit = current_lsn(&db.client).await;
    late_fill_after_the_first_delete(&db, &mut conn, &key, commit).await;
    // Read before the key: a slot that had confirmed the commit while the stale fill is
    // still there confirmed it before its second delete.
    let confirmed = confirmed_flush(&db.client, &db.name).await;
    if get(&mut conn, &key).await.is_some() {
        assert!(confirmed < commit, "the slot confirmed a commit whose second delete is still pending");
    }
    gone(&conn, &key, "the second delete to remove the stale fill").await;
    wait_until(WAIT, "the slot to confirm the commit after its second delete", || async {
        confirmed_flush(&db.client, &db.name).await >= commit
    })
    .await;
    assert!(running.metrics.redeletes_applied_total() >= 1);
    running.stop().await.expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_second_delete_survives_sigkill() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let files = config(&db, &s.redis.url(), "redelete_after = \"50s\"");
    let key = format!("{}:item:1", db.name);
    let mut conn = redis_conn(&s.redis.url()).await;
    cache(&mut conn, std::slice::from_ref(&key)).await;
    let spawn = || Walbust::spawn(&["--log-level", "warn", "run", "--config"], &files.path, Stdio::inherit());
    let mut walbust = spawn();
    wait_until(WAIT, "walbust to stream", || async { write_lsn(&db.client, &db.name).await.is_some() }).await;

    db.client.execute("UPDATE items SET v = 1 WHERE id = 1", &[]).await.expect("update");
    let commit = current_lsn(&db.client).await;
    late_fill_after_the_first_delete(&db, &mut conn, &key, commit).await;
    // The second delete is 50 s away.
    walbust.0.kill().expect("SIGKILL");
    walbust.0.wait().expect("reap");
    assert!(
        confirmed_flush(&db.client, &db.name).await < commit,
        "a commit with a pending second delete was confirmed"
    );

    // The slot replays the commit: its deletes run again.
    let walbust = spawn();
    gone(&conn, &key, "the replayed commit to remove the stale fill").await;
    drop(walbust);
}

/// `walbust.wait()` in the test database, for the test's slot.
async fn install_wait(db: &support::TestDb) {
    db.client.batch_execute(&walbust::daemon::fix::wait_function(&db.name)).await.expect("install walbust.wait()");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_wait_returns_the_application_never_reads_the_old_value() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    install_wait(&db).await;
    let files = config(&db, &s.redis.url(), "");
    let key = format!("{}:item:1", db.name);
    let mut conn = redis_conn(&s.redis.url()).await;
    let running = Running::start(&files.path).await;
    let app = connect(&db.url).await;
    for v in 1..=30 {
        let _: () = conn.set(&key, format!("v={}", v - 1)).await.expect("cache the current row");
        app.execute("UPDATE items SET v = $1 WHERE id = 1", &[&v]).await.expect("update");
        let done: bool = app.query_one("SELECT walbust.wait('30s')", &[]).await.expect("wait").get(0);
        assert!(done, "wait() timed out with walbust and Redis up");
        assert_eq!(get(&mut conn, &key).await, None, "after wait() the cache still held v={}", v - 1);
    }
    running.stop().await.expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_false_on_timeout_while_redis_is_down() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    install_wait(&db).await;
    let mut redis = ThrowawayRedis::start().expect("a Redis of its own");
    let files = config(&db, &redis.url(), "");
    let running = Running::start(&files.path).await;
    redis.stop().expect("stop Redis");
    let app = connect(&db.url).await;
    app.execute("UPDATE items SET v = 1 WHERE id = 1", &[]).await.expect("update");
    let done: bool = app.query_one("SELECT walbust.wait('1s')", &[]).await.expect("wait").get(0);
    assert!(!done, "wait() returned true although Redis is down and nothing was invalidated");
    redis.start_again().expect("start Redis again");
    let done: bool = app.query_one("SELECT walbust.wait('60s')", &[]).await.expect("wait").get(0);
    assert!(done, "wait() did not return true once Redis was back");
    let counts = app
        .query_one(
            "SELECT (SELECT last_value FROM walbust.wait_answered), (SELECT last_value FROM walbust.wait_timed_out)",
            &[],
        )
        .await
        .expect("counts");
    assert_eq!((counts.get::<_, i64>(0), counts.get::<_, i64>(1)), (1, 1), "each call counted once");
    running.stop().await.expect("stops cleanly");
}

/// A cluster whose synchronous standby (a streaming replica) the oracle stalls in bursts.
fn oracle_cluster() -> &'static (ThrowawayPostgres, ThrowawayStandby) {
    static PG: OnceLock<(ThrowawayPostgres, ThrowawayStandby)> = OnceLock::new();
    PG.get_or_init(|| {
        support::shared();
        let options = PostgresOptions {
            settings: vec![
                format!("synchronous_standby_names = '{ORACLE_STANDBY}'"),
                // Set-up sessions commit at once; the oracle's writers ask for the standby.
                "synchronous_commit = local".into(),
                "wal_sender_timeout = '30s'".into(),
            ],
            hba: vec![],
            files: vec![],
            bin: None,
        };
        let mut pg =
            ThrowawayPostgres::start(&options).unwrap_or_else(|e| panic!("cannot start the oracle's Postgres: {e}"));
        let standby = pg.start_sync_standby(ORACLE_STANDBY).unwrap_or_else(|e| panic!("cannot start the standby: {e}"));
        (pg, standby)
    })
}

const ORACLE_STANDBY: &str = "oracle_standby";

/// Runs the oracle for `run` against walbust with `consistency` settings: readers with
/// think times 0, 1 and 5 ms, writers waiting for the synchronous standby, which stalls in
/// bursts, and a `kill -9` of walbust half way. Returns the stale keys.
async fn oracle(consistency: &str, run: Duration) -> Vec<oracle::Stale> {
    let s = support::shared();
    let (pg, standby) = oracle_cluster();
    let db = fresh_db(pg, &oracle::schema(100)).await;
    let files = write_config_with(
        &db,
        &s.redis.url(),
        &oracle::rules(&db.name),
        "",
        &format!("[consistency]\n{consistency}\n"),
        "off",
    );
    let spawn = || Walbust::spawn(&["--log-level", "warn", "run", "--config"], &files.path, Stdio::inherit());
    let mut walbust = spawn();
    wait_until(WAIT, "walbust to stream", || async { write_lsn(&db.client, &db.name).await.is_some() }).await;
    let think = [0, 1, 5, 0, 1, 5].map(Duration::from_millis).to_vec();
    let mut workload = oracle::Workload {
        db_url: db.url.clone(),
        redis_url: s.redis.url(),
        prefix: db.name.clone(),
        rows: 100,
        readers: think,
        writers: 2,
        writer_setup: "SET synchronous_commit = on".into(),
    }
    .start()
    .await
    .expect("the oracle's workload starts");
    let stalls = async {
        let until = tokio::time::Instant::now() + run;
        let mut killed = false;
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(150)).await;
            standby.pause();
            tokio::time::sleep(Duration::from_millis(60)).await;
            standby.resume();
            if !killed && tokio::time::Instant::now() + run / 2 >= until {
                killed = true;
                walbust.0.kill().expect("SIGKILL");
                walbust.0.wait().expect("reap");
                walbust = spawn();
            }
        }
    };
    stalls.await;
    let counts = workload.finish().await.expect("the oracle's workload ran without errors");
    assert!(counts.writes > 0 && counts.fills > 0, "{counts:?}");
    // Everything written is applied, second deletes included, once the slot confirms it.
    let end = current_lsn(&db.client).await;
    wait_until(WAIT, "walbust to confirm every write", || async { confirmed_flush(&db.client, &db.name).await >= end })
        .await;
    let stale = workload.stale().await.expect("compare the cache with the database");
    drop(walbust);
    stale
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oracle_finds_no_stale_key_with_a_stalling_standby_and_a_sigkill() {
    let stale = oracle("", Duration::from_secs(8)).await;
    let lines: Vec<String> = stale.iter().map(ToString::to_string).collect();
    assert!(lines.is_empty(), "{} stale keys:\n{}", lines.len(), lines.join("\n"));
}

/// The gate asks the primary even when the connection string names a standby first and
/// lets any server do: a standby's snapshot can show a commit before the primary's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_asks_the_primary_when_the_connection_string_names_a_standby_first() {
    support::shared();
    let (primary, standby) = tokio::task::spawn_blocking(|| {
        let mut primary =
            ThrowawayPostgres::start(&PostgresOptions::default()).unwrap_or_else(|e| panic!("the primary: {e}"));
        let standby = primary.start_standby(&[]).unwrap_or_else(|e| panic!("the standby: {e}"));
        (primary, standby)
    })
    .await
    .expect("start-up thread");
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?sslmode=disable&target_session_attrs=any&connect_timeout=5",
        standby.port(),
        primary.port()
    );
    let info = ConnInfo::parse(&url, |_| None).expect("conninfo");
    let admin = connect(&primary.url("postgres")).await;
    // An autocommit statement that takes an xid commits it.
    let xid: String = admin.query_one("SELECT txid_current()::text", &[]).await.expect("xid").get(0);
    let xid = xid.parse::<u64>().expect("xid8") as u32;

    let metrics = walbust::telemetry::metrics::Metrics::new();
    let mut gate = VisibilityGate::new(info, "walbust".into(), metrics);
    gate.connected().await;
    let passed = gate.pass(&[xid], &tokio::sync::Notify::new()).await;
    assert!(matches!(passed, Passed::Visible { .. }), "the gate did not ask: {passed:?}");
    let asked = |client: tokio_postgres::Client| async move {
        let row = client
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_current_snapshot()::text'", &[])
            .await
            .expect("pg_stat_activity");
        row.get::<_, i64>(0)
    };
    assert_eq!(asked(connect(&standby.url("postgres")).await).await, 0, "the gate asked the standby");
    assert_eq!(asked(admin).await, 1, "the gate did not ask the primary");
}

/// A backlog's transaction known visible `redelete_after` before its first delete went out
/// gets no second delete: a reader that filled the cache after that delete with a row read
/// before the commit took longer than `redelete_after`, which no second delete covers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_known_visible_long_before_its_first_delete_is_not_deleted_twice() {
    let s = support::shared();
    let db = fresh_db(
        &s.pg,
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0); INSERT INTO items VALUES (1, 0), (2, 0);",
    )
    .await;
    let mut redis = ThrowawayRedis::start().expect("a Redis of its own");
    // One transaction per batch, so the second one is sent after Redis comes back.
    let extra = "\n[batch]\nmax_actions = 1\n[consistency]\nredelete_after = \"5s\"\n";
    let files = write_config_with(&db, &redis.url(), &rules(&db.name), "", extra, "off");
    Running::start(&files.path).await.stop().await.expect("stops cleanly");

    // The backlog: two transactions walbust will find both visible at its first look.
    db.client.execute("UPDATE items SET v = 1 WHERE id = 1", &[]).await.expect("update 1");
    db.client.execute("UPDATE items SET v = 1 WHERE id = 2", &[]).await.expect("update 2");
    let commit = current_lsn(&db.client).await;
    redis.stop().expect("stop Redis");
    let running = Running::start(&files.path).await;
    wait_until(WAIT, "the first batch to reach Redis and fail", || async { running.metrics.redis_errors() >= 1 }).await;
    // The first batch retries until Redis is back; the second goes out more than
    // `redelete_after` after the snapshot that showed it visible.
    tokio::time::sleep(Duration::from_secs(6)).await;
    redis.start_again().expect("start Redis again");
    wait_until(WAIT, "the slot to confirm both commits, second deletes included", || async {
        confirmed_flush(&db.client, &db.name).await >= commit
    })
    .await;
    assert_eq!(
        running.metrics.redeletes_applied_total(),
        1,
        "the first batch went out as its transactions showed visible, so its delete is repeated; the second went out late and is not"
    );
    running.stop().await.expect("stops cleanly");
}

//! Postgres major versions: the oldest supported one (14) works end to end, and an older
//! one (13) is refused by every subcommand that talks to it, naming both versions. Each
//! test starts a server of its version from `support::pg_bin`.

use crate::config_files::{stderr, walbust};
use crate::support::{self, Running, cache, existing, fresh_db, redis_conn, wait_until, write_config};
use std::time::Duration;
use walbust::offline::throwaway::{PostgresOptions, ThrowawayPostgres};
use walbust::postgres::{ConnInfo, ReplicationConn};

const WAIT: Duration = Duration::from_secs(60);

async fn start(major: u32) -> ThrowawayPostgres {
    let options = PostgresOptions { bin: Some(support::pg_bin(major)), ..Default::default() };
    tokio::task::spawn_blocking(move || ThrowawayPostgres::start(&options))
        .await
        .expect("start-up thread")
        .unwrap_or_else(|e| panic!("cannot start PostgreSQL {major}: {e}"))
}

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text);";

/// Invalidates `{prefix}:item:{id}` for every change to `items`.
fn rules(prefix: &str) -> String {
    format!(
        "[[rule]]\nname = \"items\"\ntable = \"items\"\non = [\"insert\", \"update\", \"delete\"]\n\
         keys = [\"{prefix}:item:{{id}}\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_14_creates_the_slot_streams_and_records() {
    let s = support::shared();
    let pg = start(14).await;
    let db = fresh_db(&pg, ITEMS).await;
    let files = write_config(&db, &s.redis.url(), &rules(&db.name), "");
    let running = Running::start(&files.path).await;
    let mut redis = redis_conn(&s.redis.url()).await;
    let keys = vec![format!("{}:item:1", db.name)];
    cache(&mut redis, &keys).await;
    db.client.batch_execute("INSERT INTO items VALUES (1, 'a')").await.expect("insert");
    let redis = &redis;
    let keys = &keys;
    wait_until(WAIT, "the insert's key to be invalidated on PostgreSQL 14", || async move {
        existing(&mut redis.clone(), keys).await.is_empty()
    })
    .await;
    running.stop().await.expect("clean stop");

    // `walbust record` creates a temporary slot of its own the same way.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("rec.jsonl");
    let config = files.path.to_str().expect("utf-8 path");
    let rec =
        walbust(&["record", "--output", out.to_str().expect("utf-8 path"), "--duration", "1s", "--config", config]);
    assert_eq!(rec.status.code(), Some(0), "record on PostgreSQL 14:\n{}", stderr(&rec));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_replication_command_names_the_command_and_the_server_version() {
    let pg = start(14).await;
    let info = ConnInfo::parse(&pg.url("postgres"), |_| None).expect("conninfo");
    let mut conn = ReplicationConn::connect(&info, true).await.expect("replication connection");
    // The option list form is PostgreSQL 15 and later.
    let command = "CREATE_REPLICATION_SLOT \"x\" LOGICAL pgoutput (SNAPSHOT 'nothing')";
    let err = conn.replication_command(command).await.expect_err("PostgreSQL 14 refuses the option list");
    let text = walbust::errors::causes::error_chain(&err);
    assert!(
        text.starts_with(&format!(
            "PostgreSQL 14.{} at 127.0.0.1:{} rejected the replication command `{command}`",
            conn.parameter("server_version").and_then(|v| v.strip_prefix("14.")).unwrap_or("?"),
            pg.port()
        )),
        "{text}"
    );
    assert!(text.contains("syntax error"), "{text}");
    assert_eq!(err.code(), Some("42601"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_13_is_refused_by_run_record_status_and_check_naming_its_version_and_the_minimum() {
    let s = support::shared();
    let pg = start(13).await;
    let db = fresh_db(&pg, ITEMS).await;
    let files = write_config(&db, &s.redis.url(), &rules(&db.name), "");
    let config = files.path.to_str().expect("utf-8 path");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("rec.jsonl");
    let out = out.to_str().expect("utf-8 path");
    for args in [
        &["run", "--config", config][..],
        &["record", "--output", out, "--duration", "1s", "--config", config],
        &["status", "--config", config],
        &["check", "--online", "--config", config],
    ] {
        let got = walbust(args);
        let text = stderr(&got);
        assert_ne!(got.status.code(), Some(0), "{args:?} must fail on PostgreSQL 13:\n{text}");
        assert!(
            text.contains("the server runs PostgreSQL 13.")
                && text.contains("but walbust supports PostgreSQL 14 and later")
                && text.contains("upgrade the server to PostgreSQL 14 or later"),
            "{args:?}:\n{text}"
        );
    }
}

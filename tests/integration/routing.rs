//! Each kind of change busts exactly the keys its rules name, in a real Redis.

use crate::support::{
    self, Running, cache, existing, fresh_db, redis_conn, wait_until, write_config, write_config_with,
};

use std::time::Duration;
use walbust::postgres::lsn::Lsn;

const WAIT: Duration = Duration::from_secs(60);

fn keys(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The server's current WAL position, after a write.
pub async fn current_lsn(client: &tokio_postgres::Client) -> Lsn {
    let row = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("current lsn");
    row.get::<_, String>(0).parse().expect("lsn")
}

/// Waits until the pipeline has applied and acknowledged everything up to the current position.
pub async fn drained(run: &Running, client: &tokio_postgres::Client) {
    drained_within(run, client, WAIT).await;
}

/// [`drained`], for a backlog that takes longer than the usual deadline.
pub async fn drained_within(run: &Running, client: &tokio_postgres::Client, deadline: Duration) {
    let target = current_lsn(client).await;
    wait_until(deadline, "the pipeline to acknowledge the last write", || {
        let flushed = run.metrics.flushed();
        async move { flushed >= target }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_update_delete_and_truncate_bust_exactly_their_keys() {
    let s = support::shared();
    let db = fresh_db(
        &s.pg,
        "CREATE TABLE members (id int PRIMARY KEY, org_id text NOT NULL, name text);
                              ALTER TABLE members REPLICA IDENTITY FULL;",
    )
    .await;
    let n = &db.name;
    let rules = format!(
        "[[rule]]\nname = \"members\"\ntable = \"public.members\"\nkeys = [\"{n}:member:{{id}}\", \"{n}:org:{{org_id}}:members\"]\n"
    );
    let files = write_config(&db, &s.redis.url(), &rules, "");
    let p = |k: &str| format!("{}:{k}", db.name);
    let all: Vec<String> =
        ["member:1", "member:2", "member:3", "org:a:members", "org:b:members", "org:c:members", "unrelated"]
            .iter()
            .map(|k| p(k))
            .collect();
    let mut redis = redis_conn(&s.redis.url()).await;
    let run = Running::start(&files.path).await;

    let steps: &[(&str, &[&str])] = &[
        (
            "INSERT INTO members VALUES (1, 'a', 'x'), (2, 'b', 'y')",
            &["member:1", "member:2", "org:a:members", "org:b:members"],
        ),
        ("UPDATE members SET name = 'z' WHERE id = 1", &["member:1", "org:a:members"]),
        ("DELETE FROM members WHERE id = 2", &["member:2", "org:b:members"]),
        ("TRUNCATE members", &["member:1", "member:2", "member:3", "org:a:members", "org:b:members", "org:c:members"]),
    ];
    for (sql, gone) in steps {
        cache(&mut redis, &all).await;
        db.client.batch_execute(sql).await.expect(sql);
        drained(&run, &db.client).await;
        let gone: Vec<String> = gone.iter().map(|k| p(k)).collect();
        let expected: Vec<String> = all.iter().filter(|k| !gone.contains(k)).cloned().collect();
        assert_eq!(existing(&mut redis, &all).await, expected, "after `{sql}`");
    }
    assert!(run.metrics.widened_total() >= 2, "truncate widens both keys");
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_moving_a_row_busts_old_and_new_keys_and_default_identity_widens_the_old() {
    let s = support::shared();
    let db = fresh_db(
        &s.pg,
        "CREATE TABLE full_rows (id int PRIMARY KEY, org_id text NOT NULL);
                              ALTER TABLE full_rows REPLICA IDENTITY FULL;
                              CREATE TABLE default_rows (id int PRIMARY KEY, org_id text NOT NULL);
                              INSERT INTO full_rows VALUES (1, 'a'); INSERT INTO default_rows VALUES (1, 'a');",
    )
    .await;
    let n = &db.name;
    let rules = format!(
        "[[rule]]\nname = \"full\"\ntable = \"full_rows\"\nkeys = [\"{n}:full:{{org_id}}:list\"]\n\
         [[rule]]\nname = \"default\"\ntable = \"default_rows\"\nkeys = [\"{n}:default:{{org_id}}:list\"]\n"
    );
    let files = write_config(&db, &s.redis.url(), &rules, "");
    let mut redis = redis_conn(&s.redis.url()).await;
    let run = Running::start(&files.path).await;

    let full: Vec<String> = ["a", "b", "c"].iter().map(|o| format!("{n}:full:{o}:list")).collect();
    let default: Vec<String> = ["a", "b", "c"].iter().map(|o| format!("{n}:default:{o}:list")).collect();
    let bystander = keys(&[&format!("{n}:other")]);
    cache(&mut redis, &[full.clone(), default.clone(), bystander.clone()].concat()).await;

    db.client.batch_execute("UPDATE full_rows SET org_id = 'b' WHERE id = 1").await.unwrap();
    drained(&run, &db.client).await;
    assert_eq!(existing(&mut redis, &full).await, [full[2].clone()], "old (a) and new (b) busted, c survives");

    let widened_before = run.metrics.widened_total();
    db.client.batch_execute("UPDATE default_rows SET org_id = 'b' WHERE id = 1").await.unwrap();
    drained(&run, &db.client).await;
    assert!(existing(&mut redis, &default).await.is_empty(), "new key exact, old side widened to {n}:default:*:list");
    assert_eq!(existing(&mut redis, &bystander).await, bystander, "keys outside the pattern survive");
    assert_eq!(run.metrics.widened_total(), widened_before + 1, "the widening is counted");
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_values_with_glob_characters_delete_only_their_literal_match() {
    let s = support::shared();
    let db = fresh_db(&s.pg, "CREATE TABLE tags (id int PRIMARY KEY, label text NOT NULL);").await;
    let n = &db.name;
    let rules = format!("[[rule]]\nname = \"tag lists\"\ntable = \"tags\"\npatterns = [\"{n}:list:{{label}}:*\"]\n");
    let files = write_config(&db, &s.redis.url(), &rules, "");
    let mut redis = redis_conn(&s.redis.url()).await;
    let run = Running::start(&files.path).await;
    let all = keys(&[
        &format!("{n}:list:*:1"),
        &format!("{n}:list:a:1"),
        &format!("{n}:list:[a-z]:1"),
        &format!("{n}:list:b:2"),
    ]);
    cache(&mut redis, &all).await;
    db.client.batch_execute("INSERT INTO tags VALUES (1, '*'), (2, '[a-z]')").await.unwrap();
    drained(&run, &db.client).await;
    assert_eq!(existing(&mut redis, &all).await, [all[1].clone(), all[3].clone()]);
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_reach_a_redis_that_only_speaks_tls() {
    let s = support::shared();
    let tls = walbust::offline::throwaway::RedisTls {
        cert_pem: s.certs.server_cert_pem.clone(),
        key_pem: s.certs.server_key_pem.clone(),
        ca_pem: s.certs.ca_pem.clone(),
    };
    let redis = tokio::task::spawn_blocking(move || walbust::offline::throwaway::ThrowawayRedis::start_tls(&tls))
        .await
        .unwrap()
        .expect("TLS redis");
    let db = fresh_db(&s.pg, "CREATE TABLE items (id int PRIMARY KEY);").await;
    let n = &db.name;
    let rules = format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\n");
    let files = write_config_with(&db, &redis.url(), &rules, "", "ca_file = \"ca.pem\"", "off");
    std::fs::write(files.path.with_file_name("ca.pem"), &s.certs.ca_pem).unwrap();
    let client = redis::Client::build_with_tls(
        redis.url(),
        redis::TlsCertificates { client_tls: None, root_cert: Some(s.certs.ca_pem.clone().into_bytes()) },
    )
    .unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.expect("TLS connection");
    let all = keys(&[&format!("{n}:item:1"), &format!("{n}:item:2")]);
    cache(&mut conn, &all).await;
    let run = Running::start(&files.path).await;
    db.client.batch_execute("INSERT INTO items VALUES (1)").await.unwrap();
    drained(&run, &db.client).await;
    assert_eq!(existing(&mut conn, &all).await, [all[1].clone()]);
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_rules_naming_a_column_the_table_lacks() {
    let s = support::shared();
    let db = fresh_db(&s.pg, "CREATE TABLE users (id int PRIMARY KEY, email text);").await;
    let rules = "[[rule]]\nname = \"user profile\"\ntable = \"users\"\nkeys = [\"user:{emial}\"]\n";
    let files = write_config(&db, &s.redis.url(), rules, "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walbust"))
        .args(["run", "--config"])
        .arg(&files.path)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unknown column `emial`") && stderr.contains("did you mean `email`?"), "{stderr}");
    assert!(stderr.contains("test.toml:4:"), "the message names the file and line: {stderr}");
}

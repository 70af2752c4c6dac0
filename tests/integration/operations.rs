//! Operations against real servers: `status` on missing, idle, streaming, lost and
//! unreachable slots; the slot monitor feeding metrics; `setup` applied (a least-privilege
//! role that really streams, heartbeats and takes manual invalidations from granted roles
//! only); the generated script run as is; replica identity advice read from the catalog.

use crate::routing::{current_lsn, drained};
use crate::support::{self, Running, TestDb, cache, connect, existing, fresh_db, redis_conn, wait_until, write_config};
use std::path::PathBuf;
use std::time::Duration;
use walbust::domain::config::Config;
use walbust::domain::rules::RuleSet;
use walbust::errors::exit;
use walbust::offline::throwaway::{PostgresOptions, ThrowawayPostgres};
use walbust::ops::setup::{self, ApplyError, read_live, replica_identity_advice, setup_sql_with};
use walbust::ops::status::{self, StatusError, WalStatus, slot_status};
use walbust::postgres::ConnInfo;
use walbust::telemetry::metrics::Metrics;

const WAIT: Duration = Duration::from_secs(60);

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, org text NOT NULL DEFAULT 'acme');";

fn item_rules(n: &str) -> String {
    format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\", \"{n}:org:{{org}}\"]\n")
}

fn load(files: &support::ConfigFiles) -> Config {
    Config::load(&files.path).unwrap_or_else(|e| panic!("config: {e}"))
}

fn rule_set(text: &str) -> RuleSet {
    RuleSet::from_sources(&[(PathBuf::from("rules/test.toml"), text.to_string())])
        .unwrap_or_else(|e| panic!("rules: {e}"))
        .rules
}

async fn create_slot(client: &tokio_postgres::Client, slot: &str) {
    client.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await.expect("create slot");
}

/// The URL of `db` as `user` (the shared cluster trusts local TCP).
fn url_as(db: &TestDb, user: &str) -> String {
    db.url.replacen("postgres://postgres@", &format!("postgres://{user}@"), 1)
}

/// `db` with its URL as `user`, for a config file; the role need not exist yet.
async fn as_user(db: &TestDb, user: &str) -> TestDb {
    TestDb { name: db.name.clone(), client: connect(&db.url).await, url: url_as(db, user) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_missing_slot_exits_1_and_says_how_to_create_it() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let files = write_config(&db, &s.redis.url(), &item_rules(&db.name), "");
    let st = slot_status(&load(&files)).await.expect("status reads a missing slot");
    assert!(!st.exists, "{st:?}");
    assert_eq!(st.database, db.name);
    assert_eq!(st.exit_code(), exit::FAILED);
    let problem = st.problem().expect("a missing slot is a problem");
    assert!(problem.contains(&format!("pg_create_logical_replication_slot('{}', 'pgoutput')", db.name)), "{problem}");
    assert!(st.render_human().contains("exists:   no\n"), "{}", st.render_human());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_an_idle_slot_reports_positions_lag_and_retained_wal_and_feeds_the_metrics() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let files = write_config(&db, &s.redis.url(), &item_rules(&db.name), "");
    create_slot(&db.client, &db.name).await;
    db.client.batch_execute("INSERT INTO items SELECT g FROM generate_series(1, 1000) g").await.expect("insert");
    let written = current_lsn(&db.client).await;

    let config = load(&files);
    let st = slot_status(&config).await.expect("status");
    assert!(st.exists && !st.active && st.active_pid.is_none(), "{st:?}");
    assert_eq!(st.plugin.as_deref(), Some("pgoutput"));
    assert_eq!(st.slot_type.as_deref(), Some("logical"));
    assert_eq!(st.slot_database.as_deref(), Some(db.name.as_str()));
    assert_eq!(st.wal_status, Some(WalStatus::Reserved));
    assert_eq!(st.safe_wal_size_bytes, None, "the shared cluster keeps WAL for slots without limit");
    assert_eq!(st.last_heartbeat, None, "nobody streams");
    let (confirmed, restart, current) =
        (st.confirmed_flush_lsn.unwrap(), st.restart_lsn.unwrap(), st.current_wal_lsn.unwrap());
    assert!(restart <= confirmed && confirmed < written && written <= current, "{st:?}");
    assert_eq!(st.lag_bytes, Some((current.0 - confirmed.0) as i64), "lag is current minus confirmed, read at once");
    assert_eq!(st.retained_wal_bytes, Some((current.0 - restart.0) as i64));
    assert!(st.lag_bytes.unwrap() >= (written.0 - confirmed.0) as i64, "the insert is not acknowledged: {st:?}");
    assert_eq!(st.exit_code(), exit::OK, "{:?}", st.problem());
    let human = st.render_human();
    assert!(
        human.contains("plugin:              pgoutput\n") && human.contains("active:              no\n"),
        "{human}"
    );
    assert!(human.contains("last_heartbeat:      unknown\n"), "{human}");
    let json: serde_json::Value = serde_json::from_str(&st.render_json()).expect("json");
    assert_eq!(json["exists"], true);
    assert_eq!(json["confirmed_flush_lsn"], confirmed.to_string());
    assert_eq!(json["lag_bytes"], st.lag_bytes.unwrap());

    let metrics = Metrics::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let monitor = tokio::spawn({
        let metrics = metrics.clone();
        async move {
            status::monitor(&config, metrics, Duration::from_millis(100), async {
                let _ = stopped.await;
            })
            .await
        }
    });
    wait_until(WAIT, "the slot monitor to publish the slot gauges", || {
        let text = metrics.render();
        async move {
            text.contains("walbust_slot_wal_status{status=\"reserved\"} 1\n")
                && text.lines().any(|l| l.starts_with("walbust_slot_retained_wal_bytes "))
        }
    })
    .await;
    let _ = stop.send(());
    tokio::time::timeout(WAIT, monitor).await.expect("the monitor stops on shutdown").expect("no panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_while_walbust_streams_shows_the_walsender_and_its_last_heartbeat() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let files = write_config(&db, &s.redis.url(), &item_rules(&db.name), "");
    let config = load(&files);
    let run = Running::start(&files.path).await;
    db.client.batch_execute("INSERT INTO items VALUES (1)").await.expect("insert");
    drained(&run, &db.client).await;
    wait_until(WAIT, "status to show the walsender and a reply", || {
        let config = config.clone();
        async move {
            let st = slot_status(&config).await.expect("status");
            st.active && st.active_pid.is_some() && st.last_heartbeat.is_some()
        }
    })
    .await;
    let st = slot_status(&config).await.expect("status");
    assert!(st.last_heartbeat_age_seconds.is_some_and(|a| a < 30.0), "{st:?}");
    assert!(st.render_human().contains("active:              yes\n"), "{}", st.render_human());
    let pid: Option<i32> = db
        .client
        .query_one("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&db.name])
        .await
        .expect("slot")
        .get(0);
    assert_eq!(st.active_pid, pid);
    assert_eq!(st.exit_code(), exit::OK);
    run.stop().await.expect("clean stop");
    wait_until(WAIT, "the slot to be released", || {
        let config = config.clone();
        async move { !slot_status(&config).await.expect("status").active }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_an_unreachable_server_is_an_error_with_exit_code_2() {
    let port = support::free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        format!(
            "rules = [\"rules/*.toml\"]\n[source]\nurl = \"postgres://walbust@127.0.0.1:{port}/app?sslmode=disable\"\n\
             [redis]\nurl = \"redis://127.0.0.1:1/0\"\n"
        ),
    )
    .expect("config");
    let config = Config::load(&path).expect("config parses");
    let err = tokio::time::timeout(WAIT, slot_status(&config)).await.expect("fails fast").expect_err("no server");
    assert!(matches!(err, StatusError::Connect { .. }), "{err:?}");
    assert_eq!(err.exit_code(), exit::USAGE);
    assert!(err.to_string().contains("slot `walbust`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_slot_that_lost_its_wal_exits_1_and_says_to_drop_it() {
    let s = support::shared();
    let options = PostgresOptions {
        settings: vec!["max_slot_wal_keep_size = '1MB'".into(), "wal_keep_size = 0".into()],
        ..Default::default()
    };
    let pg =
        tokio::task::spawn_blocking(move || ThrowawayPostgres::start(&options)).await.unwrap().expect("own postgres");
    let db = fresh_db(&pg, ITEMS).await;
    let files = write_config(&db, &s.redis.url(), &item_rules(&db.name), "");
    let config = load(&files);
    create_slot(&db.client, &db.name).await;
    let st = slot_status(&config).await.expect("status");
    assert!(st.safe_wal_size_bytes.is_some(), "a limited slot has a safe size: {st:?}");

    wait_until(Duration::from_secs(60), "the slot to lose its WAL", || {
        let (client, config) = (&db.client, config.clone());
        async move {
            client
                .batch_execute(
                    "INSERT INTO items SELECT g FROM generate_series(1, 1000) g ON CONFLICT DO NOTHING; \
                     SELECT pg_switch_wal(); CHECKPOINT;",
                )
                .await
                .expect("write and checkpoint");
            slot_status(&config).await.expect("status").wal_status == Some(WalStatus::Lost)
        }
    })
    .await;
    let st = slot_status(&config).await.expect("status");
    assert_eq!(st.exit_code(), exit::FAILED);
    let problem = st.problem().expect("a lost slot is a problem");
    assert!(problem.contains("wal_status = lost"), "{problem}");
    assert!(problem.contains(&format!("pg_drop_replication_slot('{}')", db.name)), "{problem}");
    assert_eq!(st.health().wal_status, Some(WalStatus::Lost));
    assert!(st.render_human().contains("wal_status:          lost\n"), "{}", st.render_human());
}

/// Checks that `role` may (or may not) call every overload of pg_logical_emit_message.
async fn may_emit(client: &tokio_postgres::Client, role: &str) -> bool {
    client
        .query_one(
            "SELECT bool_and(has_function_privilege($1, p.oid, 'EXECUTE')) FROM pg_proc p \
             WHERE p.proname = 'pg_logical_emit_message' AND p.pronamespace = 'pg_catalog'::regnamespace",
            &[&role],
        )
        .await
        .expect("privilege check")
        .get::<_, Option<bool>>(0)
        .expect("pg_logical_emit_message exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_apply_creates_a_least_privilege_role_that_streams_heartbeats_and_invalidates() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let (role, app, other) = (format!("{n}_walbust"), format!("{n}_app"), format!("{n}_other"));
    db.client
        .batch_execute(&format!("DROP PUBLICATION {n}; CREATE ROLE {app} LOGIN; CREATE ROLE {other} LOGIN;"))
        .await
        .expect("roles");
    let as_role = as_user(&db, &role).await;
    let files = write_config(&as_role, &s.redis.url(), &item_rules(&n), "heartbeat_interval = \"200ms\"");
    let config = load(&files);
    let rules = rule_set(&item_rules(&n));
    let admin = ConnInfo::parse(&db.url, |_| None).expect("admin url");

    let applied = setup::apply(&admin, &config, &rules, std::slice::from_ref(&app)).await.expect("setup applies");
    let done = applied.done.join("\n");
    assert!(done.contains(&format!("created role \"{role}\" with LOGIN REPLICATION")), "{done}");
    assert!(applied.done.contains(&format!("created publication \"{n}\" over 1 table")), "{done}");
    assert!(done.contains(&format!("granted it to \"{role}\", \"{app}\"")), "{done}");
    assert!(done.contains("set REPLICA IDENTITY FULL on public.items (rules read org)"), "{done}");
    assert!(applied.skipped.is_empty() && applied.warnings.is_empty(), "{applied:?}");

    let r = db
        .client
        .query_one(
            "SELECT rolcanlogin, rolreplication, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await
        .expect("role exists");
    let attrs: (bool, bool, bool, bool, bool) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
    assert_eq!(attrs, (true, true, false, false, false), "login and replication only");
    let p = db
        .client
        .query_one("SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1", &[&n])
        .await
        .expect("publication exists");
    assert!(p.get::<_, bool>(0) && p.get::<_, bool>(1) && p.get::<_, bool>(2) && p.get::<_, bool>(3));
    let tables: Vec<String> = db
        .client
        .query("SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1", &[&n])
        .await
        .expect("publication tables")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, ["public.items"]);
    let ident: String = db
        .client
        .query_one("SELECT relreplident::text FROM pg_class WHERE relname = 'items'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ident, "f");
    assert!(may_emit(&db.client, &role).await && may_emit(&db.client, &app).await);
    assert!(!may_emit(&db.client, &other).await, "PUBLIC lost EXECUTE");
    let denied =
        connect(&url_as(&db, &other)).await.execute("SELECT pg_logical_emit_message(true, 'walbust', '{}')", &[]).await;
    let code = denied.expect_err("other roles may not emit").code().cloned();
    assert_eq!(code, Some(tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE));

    let again = setup::apply(&admin, &config, &rules, std::slice::from_ref(&app)).await.expect("setup applies twice");
    assert_eq!(again.skipped, [format!("role \"{role}\" exists"), format!("publication \"{n}\" exists")]);
    assert_eq!(again.done.len(), 2, "only the idempotent grants and walbust.wait() run again: {again:?}");

    // The role is enough for walbust: it streams, heartbeats, and applies what granted roles emit.
    let mut redis = redis_conn(&s.redis.url()).await;
    let keys: Vec<String> = ["item:1", "org:acme", "org:beta", "manual"].iter().map(|k| format!("{n}:{k}")).collect();
    cache(&mut redis, &keys).await;
    let run = Running::start(&files.path).await;
    db.client.batch_execute("INSERT INTO items VALUES (1, 'acme'); UPDATE items SET org = 'beta'").await.unwrap();
    let manual = format!("{{\"keys\":[\"{n}:manual\"]}}");
    connect(&url_as(&db, &app))
        .await
        .execute("SELECT pg_logical_emit_message(true, 'walbust', $1)", &[&manual])
        .await
        .expect("the application role may emit");
    drained(&run, &db.client).await;
    wait_until(WAIT, "every key to be invalidated", || {
        let (url, keys) = (s.redis.url(), keys.clone());
        async move { existing(&mut redis_conn(&url).await, &keys).await.is_empty() }
    })
    .await;
    assert_eq!(run.metrics.widened_total(), 0, "REPLICA IDENTITY FULL keeps the old org exact");
    wait_until(WAIT, "a heartbeat written by the walbust role", || {
        let heartbeats = run.metrics.heartbeats();
        async move { heartbeats > 0 }
    })
    .await;
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_apply_names_missing_tables_and_changes_nothing() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let role = format!("{n}_walbust");
    let as_role = as_user(&db, &role).await;
    let text = format!("{}[[rule]]\nname = \"gone\"\ntable = \"public.nope\"\nkeys = [\"x:{{id}}\"]\n", item_rules(&n));
    let files = write_config(&as_role, &s.redis.url(), &text, "");
    let admin = ConnInfo::parse(&db.url, |_| None).expect("admin url");
    let err = setup::apply(&admin, &load(&files), &rule_set(&text), &[]).await.expect_err("a table is missing");
    assert!(matches!(&err, ApplyError::MissingTables { tables, .. } if tables == &["public.nope"]), "{err:?}");
    assert_eq!(err.exit_code(), exit::FAILED);
    assert!(err.to_string().contains(&format!("in database `{n}` does not exist")), "{err}");
    let role_row = db.client.query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role]).await.unwrap();
    assert!(role_row.is_none(), "nothing was created");

    let err = setup::apply(&admin, &load(&files), &rule_set(&item_rules(&n)), &["no_such_role".into()])
        .await
        .expect_err("an application role is missing");
    assert_eq!(err.to_string(), "application role `no_such_role` does not exist; create it or leave it out");
}

const IDENTITY_SCHEMA: &str = r#"
CREATE TABLE by_pk (id int PRIMARY KEY, org text);
CREATE TABLE by_org (id int PRIMARY KEY, org text);
CREATE TABLE full_already (id int PRIMARY KEY, org text);
ALTER TABLE full_already REPLICA IDENTITY FULL;
CREATE TABLE no_pk (id int, org text);
CREATE TABLE by_index (id int PRIMARY KEY, org text NOT NULL);
CREATE UNIQUE INDEX by_index_org ON by_index (org);
ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_org;
CREATE TABLE insert_only (id int PRIMARY KEY, org text);
CREATE TABLE new_only (id int PRIMARY KEY, org text);
CREATE TABLE nothing_sent (id int PRIMARY KEY, org text);
ALTER TABLE nothing_sent REPLICA IDENTITY NOTHING;
CREATE TABLE "Mixed Case" (id int PRIMARY KEY, "Org" text);
"#;

const IDENTITY_RULES: &str = r#"
[[rule]]
name = "by pk"
table = "by_pk"
keys = ["pk:{id}"]

[[rule]]
name = "by org"
table = "by_org"
keys = ["org:{org}", "org:{id}"]

[[rule]]
name = "full already"
table = "full_already"
keys = ["full:{org}"]

[[rule]]
name = "no pk"
table = "no_pk"
keys = ["nopk:{id}"]

[[rule]]
name = "by index"
table = "by_index"
keys = ["ix:{org}"]

[[rule]]
name = "insert only"
table = "insert_only"
on = ["insert"]
keys = ["ins:{org}"]

[[rule]]
name = "new only"
table = "new_only"
keys = ["new:{new.org}"]

[[rule]]
name = "nothing sent"
table = "nothing_sent"
keys = ["nothing:{id}"]

[[rule]]
name = "mixed"
table = "Mixed Case"
patterns = ["mixed:{Org}:*"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_advice_names_only_tables_whose_identity_leaves_out_rule_columns() {
    let s = support::shared();
    let db = fresh_db(&s.pg, IDENTITY_SCHEMA).await;
    let rules = rule_set(IDENTITY_RULES);
    let advice = replica_identity_advice(&db.client, &rules).await.expect("advice");
    let summary: Vec<(String, String, Vec<String>)> =
        advice.iter().map(|a| (a.table.to_string(), a.identity.clone(), a.columns.clone())).collect();
    assert_eq!(
        summary,
        [
            ("public.Mixed Case".into(), "DEFAULT (primary key \"Mixed Case_pkey\": id)".into(), vec!["Org".into()]),
            ("public.by_org".into(), "DEFAULT (primary key by_org_pkey: id)".into(), vec!["org".into()]),
            ("public.no_pk".into(), "DEFAULT (no primary key)".into(), vec!["id".into()]),
            ("public.nothing_sent".into(), "NOTHING".into(), vec!["id".into()]),
        ]
    );
    assert_eq!(advice[1].rules, ["by org"]);
    for a in &advice {
        db.client.batch_execute(&a.sql()).await.unwrap_or_else(|e| panic!("{}: {e}", a.sql()));
    }
    let after = replica_identity_advice(&db.client, &rules).await.expect("advice");
    assert!(after.is_empty(), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_setup_script_runs_as_is_with_odd_names() {
    let s = support::shared();
    let db = fresh_db(&s.pg, "CREATE TABLE \"Odd \"\"Table\" (id int PRIMARY KEY, org text);").await;
    let n = db.name.clone();
    let role = format!("{n}_walbust");
    let app = format!("{n} app \"x'y\" $walbust$");
    db.client
        .batch_execute(&format!("DROP PUBLICATION {n}; CREATE ROLE {};", walbust::postgres::quote::quote_ident(&app)))
        .await
        .expect("app role");
    let rules_text = "[[rule]]\nname = \"odd\"\ntable = 'public.Odd \"Table'\nkeys = [\"odd:{org}\"]\n";
    let as_role = as_user(&db, &role).await;
    let files = write_config(&as_role, &s.redis.url(), rules_text, "");
    let rules = rule_set(rules_text);
    let live = read_live(&db.client, &n, &rules).await.expect("advice");
    assert_eq!(live.replica_identity.len(), 1, "{live:?}");
    assert_eq!(live.publication, None);
    let script = setup_sql_with(&load(&files), &rules, std::slice::from_ref(&app), Ok(&live));
    db.client.batch_execute(&script).await.unwrap_or_else(|e| panic!("the script fails: {e}\n{script}"));
    assert!(may_emit(&db.client, &app).await && may_emit(&db.client, &role).await, "{script}");
    let published: i64 = db
        .client
        .query_one("SELECT count(*) FROM pg_publication_tables WHERE pubname = $1 AND tablename = 'Odd \"Table'", &[&n])
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 1, "{script}");
    assert!(replica_identity_advice(&db.client, &rules).await.expect("advice").is_empty());
    // Run again, as a DBA re-running a saved script would: the role and the publication
    // exist now, and the script printed without a connection still creates both.
    let offline = setup_sql_with(&load(&files), &rules, std::slice::from_ref(&app), Err("no connection"));
    for again in [&script, &offline] {
        db.client.batch_execute(again).await.unwrap_or_else(|e| panic!("the script fails a second time: {e}\n{again}"));
    }
}

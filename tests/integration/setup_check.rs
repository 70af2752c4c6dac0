//! `walbust setup --apply` on a fresh database, then `walbust check --online`, passes with
//! no warnings for the example config's rules.

use crate::support::{self, fresh_db, write_config};
use std::path::Path;
use walbust::domain::config::Config;
use walbust::domain::rules::RuleSet;
use walbust::ops::setup::{read_live, setup_sql_with};

/// The demo schema's tables, without the publication and replica identity `setup` provides.
fn tables_only() -> String {
    include_str!("../../sql/demo.sql")
        .lines()
        .filter(|l| !l.starts_with("CREATE PUBLICATION") && !l.starts_with("ALTER TABLE"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn walbust(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walbust")).args(args).output().expect("walbust");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_apply_on_a_fresh_database_then_check_online_passes_without_warnings() {
    let s = support::shared();
    let db = fresh_db(&s.pg, &tables_only()).await;
    db.client.batch_execute(&format!("DROP PUBLICATION {}", db.name)).await.unwrap();
    let files = write_config(&db, &s.redis.url(), include_str!("../../rules/demo.toml"), "");
    let config = files.path.to_str().unwrap();

    let (code, before) = walbust(&["check", "--online", "--config", config]);
    assert_eq!(code, Some(1), "a fresh database is not ready: {before}");
    assert!(before.contains("publication"), "{before}");

    let (code, out) = walbust(&["setup", "--apply", "--config", config, "--admin-url", &db.url]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = walbust(&["check", "--online", "--deny-warnings", "--config", config]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("warning"), "{out}");
    let identity: String = db
        .client
        .query_one("SELECT relreplident::text FROM pg_class WHERE oid = 'public.plans'::regclass", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(identity, "f", "plans rules key on non-key columns: setup made its identity FULL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_setup_sql_is_what_walbust_setup_prints_for_the_example_config_and_holds_no_password() {
    let s = support::shared();
    let db = fresh_db(&s.pg, &tables_only()).await;
    let config = Config::load_without_password(Path::new("config.toml")).expect("the example config loads");
    let rules = RuleSet::load(&config.rules).expect("the example rules load").rules;
    let live = read_live(&db.client, &config.source.publication, &rules).await.expect("the demo tables exist");
    let expected = setup_sql_with(&config, &rules, &["app".to_string()], Ok(&live));
    let file = std::fs::read_to_string("sql/setup.sql").expect("sql/setup.sql");
    assert!(file == expected, "sql/setup.sql differs from what walbust setup prints; it should read:\n{expected}");
    assert!(!file.to_uppercase().contains("PASSWORD '"), "{file}");
    assert!(file.contains("REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC"), "{file}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_apply_without_admin_url_connects_as_source_url() {
    let s = support::shared();
    let db = fresh_db(&s.pg, &tables_only()).await;
    db.client.batch_execute(&format!("DROP PUBLICATION {}", db.name)).await.unwrap();
    // `[source] url` is the test's superuser here, as a DBA may set it for the first run.
    let files = write_config(&db, &s.redis.url(), include_str!("../../rules/demo.toml"), "");
    let config = files.path.to_str().unwrap();
    let (code, out) = walbust(&["setup", "--apply", "--config", config]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("created publication \"{}\"", db.name)), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_prints_the_script_without_the_password_file_and_says_why_identity_was_not_checked() {
    let s = support::shared();
    let db = fresh_db(&s.pg, &tables_only()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = support::free_port();
    let config = dir.path().join("config.toml");
    std::fs::write(dir.path().join("demo.toml"), include_str!("../../rules/demo.toml")).unwrap();
    // Nothing listens on `port`, and the password file does not exist yet.
    std::fs::write(
        &config,
        format!(
            "rules = [\"demo.toml\"]\n[source]\nurl = \"postgres://walbust@127.0.0.1:{port}/app\"\n\
             password_file = \"walbust.password\"\n[redis]\nurl = \"{}\"\n",
            s.redis.url()
        ),
    )
    .unwrap();
    let (code, out) = walbust(&["setup", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("CREATE ROLE \"walbust\" LOGIN REPLICATION"), "{out}");
    assert!(
        out.contains(&format!(
            "-- Replica identity: not checked: cannot connect as [source] url (walbust@127.0.0.1:{port}/app): "
        )),
        "{out}"
    );

    let (code, out) = walbust(&["setup", "--config", config.to_str().unwrap(), "--admin-url", &db.url]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ALTER TABLE public.plans REPLICA IDENTITY FULL;"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_and_check_online_agree_that_a_write_through_only_table_needs_no_full_identity() {
    let s = support::shared();
    let schema = "CREATE TABLE profiles (id int PRIMARY KEY, bio text, avatar text);\
                  CREATE TABLE plans (id int PRIMARY KEY, code text);";
    let db = fresh_db(&s.pg, schema).await;
    // The row written through comes from the new image, so profiles' old row needs only
    // its key; plans' key reads `code`, which a delete's old row lacks without FULL.
    let rules = "[[rule]]\nname = \"profiles\"\ntable = \"profiles\"\n\
                 refresh = [{ key = \"profile:{id}\", columns = [\"id\", \"bio\", \"avatar\"] }]\n\
                 [[rule]]\nname = \"plans\"\ntable = \"plans\"\nkeys = [\"plan:{code}\"]\n";
    let files = write_config(&db, &s.redis.url(), rules, "");
    let config = files.path.to_str().unwrap();

    // Both give the one statement for plans, and none for profiles.
    let fix = "ALTER TABLE public.plans REPLICA IDENTITY FULL;";
    let (code, script) = walbust(&["setup", "--config", config, "--admin-url", &db.url]);
    assert_eq!(code, Some(0), "{script}");
    assert!(script.contains(fix) && script.matches("REPLICA IDENTITY FULL;").count() == 1, "{script}");

    let (_, check) = walbust(&["check", "--online", "--config", config]);
    assert!(check.contains(fix) && check.matches("REPLICA IDENTITY FULL;").count() == 1, "{check}");
    assert!(!check.contains("rule `profiles`"), "{check}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_script_runs_where_walbusts_role_already_exists() {
    let s = support::shared();
    let db = fresh_db(&s.pg, &tables_only()).await;
    db.client.batch_execute(&format!("DROP PUBLICATION {}", db.name)).await.unwrap();
    // A role the DBA made beforehand, with a password of their choosing.
    let role = format!("{}_walbust", db.name);
    db.client.batch_execute(&format!("CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'chosen'")).await.unwrap();
    let url = db.url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    assert_ne!(url, db.url, "the test database's URL names the postgres user");
    let as_role = support::TestDb { name: db.name.clone(), url, client: support::connect(&db.url).await };
    let files = write_config(&as_role, &s.redis.url(), include_str!("../../rules/demo.toml"), "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walbust"))
        .args(["setup", "--config", files.path.to_str().unwrap(), "--admin-url", &db.url])
        .output()
        .expect("walbust setup");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let script = String::from_utf8(out.stdout).expect("utf-8 script");
    db.client.batch_execute(&script).await.unwrap_or_else(|e| panic!("the script failed: {e:?}\n{script}"));
    let row = db
        .client
        .query_one("SELECT rolreplication, rolpassword IS NOT NULL FROM pg_authid WHERE rolname = $1", &[&role])
        .await
        .expect("the role");
    assert_eq!((row.get::<_, bool>(0), row.get::<_, bool>(1)), (true, true), "the existing role is left as it was");
    let published: i64 = db
        .client
        .query_one("SELECT count(*) FROM pg_publication WHERE pubname = $1", &[&db.name])
        .await
        .expect("publication")
        .get(0);
    assert_eq!(published, 1, "the rest of the script ran");
}

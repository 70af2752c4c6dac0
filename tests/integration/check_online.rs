//! `walbust check --online` against the harness's real Postgres: the built binary, run on
//! a config from `write_config`, with its status lines, diagnostics and exit codes.

use crate::support::{self, TestDb, fresh_db, write_config};
use std::path::Path;
use walbust::domain::rules::RuleSet;
use walbust::ops::catalog;

/// What one run of the binary printed, and how it exited.
struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

async fn walbust_check(config: &Path, extra: &[&str]) -> Outcome {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_walbust"))
        .args(["check", "--config"])
        .arg(config)
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("running the walbust binary");
    Outcome {
        code: output.status.code().expect("walbust exited by a signal"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn rule_file(config: &Path) -> String {
    config.parent().expect("config dir").join("rules/test.toml").display().to_string()
}

const MEMBERS: &str = "CREATE TABLE members (id int PRIMARY KEY, org_id int NOT NULL, email text);";

/// `schema`, then the grants `walbust setup` leaves: pg_logical_emit_message revoked from PUBLIC.
fn prepared(schema: &str) -> String {
    format!("{schema}\n{}", walbust::daemon::fix::emit_message_grants(&[], &[]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_identity_with_a_non_key_column_warns_of_widening_and_gives_the_sql() {
    let s = support::shared();
    let db = fresh_db(&s.pg, &prepared(MEMBERS)).await;
    let rules = "[[rule]]\nname = \"org members\"\ntable = \"members\"\non = [\"update\", \"delete\"]\n\
                 keys = [\"member:{id}\", \"org:{org_id}:members\"]\n";
    let files = write_config(&db, &s.redis.url(), rules, "");

    let out = walbust_check(&files.path, &["--online"]).await;
    assert_eq!(out.code, 0, "warnings alone pass:\n{out}");
    let file = rule_file(&files.path);
    assert!(out.stdout.contains(&format!("warn {file} (1 rule)")), "{out}");
    assert!(out.stdout.contains("ok   database postgres@127.0.0.1:"), "{out}");
    assert!(out.stdout.contains(&format!("/{}, publication `{}` (1 table)", db.name, db.name)), "{out}");
    assert!(out.stdout.contains(&format!("ok   redis {}: single node, master", s.redis.url())), "{out}");
    // The warning points at `{org_id}` in the second key: line 5, column 30.
    assert!(
        out.stderr.contains(&format!(
            "warning: {file}:5:30: rule `org members` reads `org_id` from the old row, but `public.members` has \
             REPLICA IDENTITY DEFAULT, whose old row carries only the primary key (`id`)"
        )),
        "{out}"
    );
    assert!(out.stderr.contains("widened to patterns"), "{out}");
    assert!(out.stderr.contains("on update and delete: keys `org:{org_id}:members`"), "{out}");
    assert!(!out.stderr.contains("`member:{id}`"), "the primary key is in the old row:\n{out}");
    assert!(out.stderr.contains("hint: run ALTER TABLE public.members REPLICA IDENTITY FULL;"), "{out}");

    let out = walbust_check(&files.path, &["--online", "--deny-warnings"]).await;
    assert_eq!(out.code, 1, "--deny-warnings fails on the warning:\n{out}");

    // The SQL the warning gives fixes it.
    db.client.batch_execute("ALTER TABLE public.members REPLICA IDENTITY FULL").await.expect("replica identity");
    let out = walbust_check(&files.path, &["--online", "--deny-warnings"]).await;
    assert_eq!(out.code, 0, "{out}");
    assert!(!out.stderr.contains("warning"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_column_fails_with_did_you_mean_at_file_line_col() {
    let s = support::shared();
    let db = fresh_db(&s.pg, &format!("{MEMBERS} ALTER TABLE members REPLICA IDENTITY FULL;")).await;
    let rules = "# members\n[[rule]]\nname = \"member profile\"\ntable = \"public.members\"\n\
                 keys = [\"member:{id}\", \"profile:{emial}\"]\n";
    let files = write_config(&db, &s.redis.url(), rules, "");

    let offline = walbust_check(&files.path, &[]).await;
    assert_eq!(offline.code, 0, "offline, the column cannot be known:\n{offline}");

    let out = walbust_check(&files.path, &["--online"]).await;
    assert_eq!(out.code, 1, "{out}");
    let file = rule_file(&files.path);
    assert!(out.stdout.contains(&format!("FAIL {file}")), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "error: {file}:5:34: unknown column `emial` in rule `member profile`: table `public.members` has no such column\n  \
             hint: did you mean `email`?"
        )),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_missing_from_the_publication_fails_with_the_alter_publication_fix() {
    let s = support::shared();
    let db = fresh_db(
        &s.pg,
        &prepared("CREATE TABLE plans (id int PRIMARY KEY, name text); CREATE TABLE other (id int PRIMARY KEY);"),
    )
    .await;
    let n = &db.name;
    db.client
        .batch_execute(&format!("DROP PUBLICATION {n}; CREATE PUBLICATION {n} FOR TABLE other;"))
        .await
        .expect("narrow publication");
    let rules = "[[rule]]\nname = \"plans\"\ntable = \"plans\"\nkeys = [\"plan:{id}\"]\n";
    let files = write_config(&db, &s.redis.url(), rules, "");

    let out = walbust_check(&files.path, &["--online"]).await;
    assert_eq!(out.code, 1, "{out}");
    let file = rule_file(&files.path);
    assert!(
        out.stderr.contains(&format!(
            "error: {file}:3:9: table `public.plans` of rule `plans` is not in publication `{n}`, so its changes never reach walbust\n  \
             hint: run ALTER PUBLICATION {n} ADD TABLE public.plans;"
        )),
        "{out}"
    );

    db.client.batch_execute(&format!("ALTER PUBLICATION {n} ADD TABLE public.plans")).await.expect("add table");
    let out = walbust_check(&files.path, &["--online", "--deny-warnings"]).await;
    assert_eq!(out.code, 0, "the fix it gave works:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_setup_passes_with_no_warnings() {
    let s = support::shared();
    let db = fresh_db(
        &s.pg,
        &prepared(
            "CREATE TABLE user_settings (user_id int, key text, value text, PRIMARY KEY (user_id, key));
             CREATE TABLE plans (id int PRIMARY KEY, org_slug text, provider text);
             ALTER TABLE plans REPLICA IDENTITY FULL;",
        ),
    )
    .await;
    let rules = "[[rule]]\nname = \"user settings\"\ntable = \"public.user_settings\"\n\
                 keys = [\"user:{user_id}:settings:all\", \"user:{user_id}:settings:{key|lower}\"]\n\n\
                 [[rule]]\nname = \"plans\"\ntable = \"plans\"\nwhen = { provider = [\"stripe\", \"paddle\"] }\n\
                 patterns = [\"plans_list_{org_slug}_*\"]\ntags = [\"idx:plans:{org_slug}\"]\n";
    let files = write_config(&db, &s.redis.url(), rules, "");
    let out = walbust_check(&files.path, &["--online", "--deny-warnings"]).await;
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains(&format!("ok   {} (2 rules)", rule_file(&files.path))), "{out}");
    assert!(!out.stderr.contains("warning") && !out.stderr.contains("error"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_is_a_usage_error_with_a_clear_message() {
    let s = support::shared();
    let db = fresh_db(&s.pg, "CREATE TABLE plans (id int PRIMARY KEY);").await;
    // A port nobody listens on: bound, then released.
    let port = support::free_port();
    let gone = TestDb { url: format!("postgres://postgres@127.0.0.1:{port}/{}?sslmode=disable", db.name), ..db };
    let files = write_config(&gone, &s.redis.url(), "[[rule]]\nname = \"p\"\ntable = \"plans\"\nkeys = [\"p\"]\n", "");
    let out = walbust_check(&files.path, &["--online"]).await;
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stdout.contains("FAIL database"), "{out}");
    assert!(out.stderr.contains(&format!("error: cannot reach the database postgres@127.0.0.1:{port}/")), "{out}");
    assert!(out.stderr.contains("check [source] url"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_nothing_and_unpublished_truncate_are_reported_with_their_fixes() {
    let s = support::shared();
    let db = fresh_db(
        &s.pg,
        "CREATE TABLE events (id int PRIMARY KEY, org_id int); ALTER TABLE events REPLICA IDENTITY NOTHING;",
    )
    .await;
    let n = &db.name;
    db.client
        .batch_execute(&format!(
            "INSERT INTO events VALUES (1, 1); ALTER PUBLICATION {n} SET (publish = 'insert, update, delete');"
        ))
        .await
        .expect("publication without truncate");
    // What the error claims: Postgres refuses the application's updates.
    let refused = db.client.execute("UPDATE events SET org_id = 2", &[]).await.expect_err("update refused");
    assert!(refused.to_string().contains("replica identity") || format!("{refused:?}").contains("replica identity"));

    let rules = "[[rule]]\nname = \"org events\"\ntable = \"events\"\nkeys = [\"org:{org_id}:events\"]\n";
    let files = write_config(&db, &s.redis.url(), rules, "");
    let out = walbust_check(&files.path, &["--online"]).await;
    assert_eq!(out.code, 1, "{out}");
    let file = rule_file(&files.path);
    assert!(out.stderr.contains(&format!("error: {file}:3:9: `public.events` has REPLICA IDENTITY NOTHING")), "{out}");
    assert!(out.stderr.contains("Postgres rejects every UPDATE and DELETE on it"), "{out}");
    assert!(out.stderr.contains("carry no old row at all"), "{out}");
    assert!(out.stderr.contains("ALTER TABLE public.events REPLICA IDENTITY FULL;"), "{out}");
    assert!(
        out.stderr
            .contains(&format!("publication `{n}` does not publish truncate, but rule `org events` fires on truncate")),
        "{out}"
    );
    assert!(
        out.stderr.contains(&format!("ALTER PUBLICATION {n} SET (publish = 'insert, update, delete, truncate');")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_columns_rejects_unknown_columns_and_tolerates_missing_tables() {
    let s = support::shared();
    let db = fresh_db(&s.pg, MEMBERS).await;
    let text = "[[rule]]\nname = \"members\"\ntable = \"members\"\nkeys = [\"org:{orgid}\"]\n\n\
                [[rule]]\nname = \"later\"\ntable = \"invoices\"\nkeys = [\"invoice:{id}\"]\n";
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("members.toml");
    std::fs::write(&file, text).expect("rule file");
    let rules = RuleSet::load(&[file.display().to_string()]).expect("rules load").rules;
    let d = catalog::validate_columns(&db.client, &rules).await.expect("catalog read");
    let shown = d.to_string();
    let file = file.display();
    assert_eq!(d.errors().count(), 1, "{shown}");
    assert!(shown.contains(&format!("error: {file}:4:15: unknown column `orgid` in rule `members`")), "{shown}");
    assert!(shown.contains("hint: did you mean `org_id`?"), "{shown}");
    assert_eq!(d.warnings().count(), 1, "{shown}");
    assert!(
        shown.contains(&format!("warning: {file}:8:9: table `public.invoices` of rule `later` does not exist")),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_logical_emit_message_open_to_public_or_other_roles_is_a_warning_with_the_fix() {
    let s = support::shared();
    let db = fresh_db(&s.pg, "CREATE TABLE plans (id int PRIMARY KEY);").await;
    let rules = "[[rule]]\nname = \"plans\"\ntable = \"plans\"\nkeys = [\"plan:{id}\"]\n";
    let files = write_config(&db, &s.redis.url(), rules, "");

    // A fresh database: PUBLIC may execute it, as Postgres ships.
    let out = walbust_check(&files.path, &["--online", "--deny-warnings"]).await;
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("PUBLIC (every role that can connect) can execute pg_logical_emit_message"), "{out}");
    assert!(out.stderr.contains("REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC"), "{out}");

    // PUBLIC revoked, but one role granted it besides the application role named.
    let (app, other) = (format!("{}_app", db.name), format!("{}_reports", db.name));
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {app}; CREATE ROLE {other}; {}{}",
            walbust::daemon::fix::emit_message_grants(std::slice::from_ref(&app), &[]),
            // Every overload: PostgreSQL 17 adds a `flush` argument to each.
            walbust::daemon::fix::emit_message_grants(std::slice::from_ref(&other), &[])
        ))
        .await
        .expect("grants");
    let out = walbust_check(&files.path, &["--online", "--deny-warnings", "--app-role", &app]).await;
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains(&format!("role `{other}` can execute pg_logical_emit_message")), "{out}");
    assert!(!out.stderr.contains("PUBLIC ("), "{out}");
    assert!(!out.stderr.contains(&format!("role `{app}`")), "an --app-role is allowed: {out}");

    // The fix it gives leaves only the allowed roles.
    let fix = out.stderr.split_once("run as a superuser:\n").expect("a fix").1;
    let fix = &fix[..fix.find("$walbust$;").expect("the DO block ends") + "$walbust$;".len()];
    db.client.batch_execute(fix).await.expect("the fix runs");
    let out = walbust_check(&files.path, &["--online", "--deny-warnings", "--app-role", &app]).await;
    assert_eq!(out.code, 0, "{out}");
}

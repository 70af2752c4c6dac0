//! What `walbust run` and `walbust check --online` do before streaming: the server's
//! settings, the publication, and the exit codes a supervisor acts on (README, "Exit
//! codes"): 2 for files a person must fix, 3 for a database or credentials a person must
//! fix, 1 for what a restart may clear.

use crate::support::{self, PASSWORD, SCRAM_USER, TestDb, fresh_db, postgres_options, write_config};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use walbust::offline::throwaway::ThrowawayPostgres;

/// How long a command may take on a loaded machine before the test gives up on it.
const DEADLINE: Duration = Duration::from_secs(60);

/// What one run of the binary printed, and how it exited.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Runs `walbust <args> --config <config>` to completion (killed after [`DEADLINE`]).
async fn walbust(args: &[&str], config: &Path) -> Outcome {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_walbust"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(DEADLINE, child).await.expect("walbust did not exit in time").expect("spawn");
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

const PLANS: &str = "CREATE TABLE plans (id int PRIMARY KEY); CREATE TABLE other (id int PRIMARY KEY);";
const PLAN_RULE: &str = "[[rule]]\nname = \"plans\"\ntable = \"plans\"\nkeys = [\"plan:{id}\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_to_start_when_a_rule_table_is_not_in_the_publication() {
    let s = support::shared();
    let db = fresh_db(&s.pg, PLANS).await;
    let n = &db.name;
    db.client
        .batch_execute(&format!("DROP PUBLICATION {n}; CREATE PUBLICATION {n} FOR TABLE other;"))
        .await
        .expect("narrow publication");
    let files = write_config(&db, &s.redis.url(), PLAN_RULE, "");
    let out = walbust(&["run"], &files.path).await;
    assert_eq!(out.code, Some(3), "a person must fix the publication:\n{out}");
    assert!(
        out.stderr.contains(&format!(
            "table `public.plans` of rule `plans` is not in publication `{n}`, so its changes never reach walbust\n  \
             hint: run ALTER PUBLICATION {n} ADD TABLE public.plans;"
        )),
        "{out}"
    );
    // The same advice as check --online, and the statement setup's script runs.
    let check = walbust(&["check", "--online"], &files.path).await;
    assert!(check.stderr.contains(&format!("hint: run ALTER PUBLICATION {n} ADD TABLE public.plans;")), "{check}");
    let setup = walbust(&["setup"], &files.path).await;
    assert_eq!(setup.code, Some(0), "{setup}");
    assert!(setup.stdout.contains(&format!("\nALTER PUBLICATION {n} ADD TABLE public.plans;\n")), "{setup}");
    assert!(!setup.stdout.contains("CREATE PUBLICATION"), "the publication exists: {setup}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misspelt_publication_is_reported_against_the_config_with_did_you_mean() {
    let s = support::shared();
    let db = fresh_db(&s.pg, PLANS).await;
    let n = db.name.clone();
    let misspelt = TestDb { url: db.url.clone(), name: format!("{n}x"), client: db.client };
    let mut files = write_config(&misspelt, &s.redis.url(), PLAN_RULE, "");
    // The slot keeps its own name; only the publication is misspelt.
    let text = std::fs::read_to_string(&files.path).expect("config");
    std::fs::write(&files.path, text.replacen(&format!("slot = \"{n}x\""), &format!("slot = \"{n}\""), 1))
        .expect("config");
    files.path = files.path.clone();
    let config = files.path.display().to_string();
    for args in [&["check", "--online"][..], &["run"]] {
        let out = walbust(args, &files.path).await;
        assert_eq!(out.code, Some(if args[0] == "run" { 3 } else { 1 }), "{args:?}:\n{out}");
        assert!(
            out.stderr.contains(&format!(
                "error: {config}:5:15: publication `{n}x` does not exist in database `{n}`, so no change reaches walbust\n  \
                 hint: did you mean `{n}`? Otherwise create it with: CREATE PUBLICATION {n}x FOR TABLE public.plans"
            )),
            "{args:?}:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_exits_3_so_systemd_does_not_restart_it_and_is_logged_once() {
    let s = support::shared();
    let db = fresh_db(&s.pg, PLANS).await;
    let url =
        format!("postgres://{SCRAM_USER}:not-{}@127.0.0.1:{}/{}?sslmode=disable", "the-password", s.pg.port(), db.name);
    assert!(!url.contains(PASSWORD));
    let wrong = TestDb { url, ..db };
    // The heartbeat and the slot monitor connect too, and meet the same refusal.
    let files = write_config(&wrong, &s.redis.url(), PLAN_RULE, "heartbeat_interval = \"100ms\"");
    let out = walbust(&["run"], &files.path).await;
    assert_eq!(out.code, Some(3), "{out}");
    assert_eq!(out.stderr.matches("28P01").count(), 1, "the failure, once, with its cause:\n{out}");
    assert!(out.stderr.contains(" ERROR ") && out.stderr.contains("stopping:"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_run_agree_that_a_rules_glob_matching_nothing_is_a_config_error() {
    let s = support::shared();
    let db = fresh_db(&s.pg, PLANS).await;
    let files = write_config(&db, &s.redis.url(), PLAN_RULE, "");
    let text = std::fs::read_to_string(&files.path).expect("config");
    std::fs::write(&files.path, text.replace("rules/*.toml", "rulez/*.toml")).expect("config");
    for args in [&["check"][..], &["check", "--online"], &["run"]] {
        let out = walbust(args, &files.path).await;
        assert_eq!(out.code, Some(2), "{args:?}:\n{out}");
        assert!(out.stderr.contains("rulez/*.toml` matches no files"), "{args:?}:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_piped_into_head_exits_quietly_on_a_broken_pipe() {
    let s = support::shared();
    let db = fresh_db(&s.pg, PLANS).await;
    let files = write_config(&db, &s.redis.url(), PLAN_RULE, "");
    // The reading end is closed before walbust prints its first line, as `| head -0` would.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_walbust"))
        .args(["check", "--online", "--config"])
        .arg(&files.path)
        .stdout(writer)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn")
        .wait_with_output();
    let output = tokio::time::timeout(DEADLINE, child).await.expect("walbust did not exit in time").expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{:?}", output.status);
}

/// A cluster set up the way a stock `postgresql.conf` leaves it for walbust: replication
/// for standbys only, and no room for another slot or walsender.
fn unready_cluster() -> ThrowawayPostgres {
    let mut options = postgres_options(&support::shared().certs);
    options.settings.extend([
        "wal_level = replica".into(),
        "max_replication_slots = 1".into(),
        "max_wal_senders = 0".into(),
    ]);
    ThrowawayPostgres::start(&options)
        .unwrap_or_else(|e| panic!("cannot start a Postgres with wal_level = replica: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_online_fails_on_wal_level_replica_and_full_slots_and_senders_with_the_fixes() {
    let s = support::shared();
    let pg = tokio::task::spawn_blocking(unready_cluster).await.expect("cluster thread");
    let db = fresh_db(&pg, PLANS).await;
    db.client
        .batch_execute("SELECT pg_create_physical_replication_slot('standby')")
        .await
        .expect("a standby's slot fills the only one");
    let files = write_config(&db, &s.redis.url(), PLAN_RULE, "");

    let out = walbust(&["check", "--online"], &files.path).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stdout.contains("FAIL server PostgreSQL ")
            && out.stdout.contains(": wal_level replica, replication slots 1 of 1 in use, wal senders 0 of 0 in use"),
        "{out}"
    );
    for expected in [
        "error: wal_level is `replica` on the server, but logical decoding needs `logical`\n  hint: run ALTER SYSTEM SET wal_level = logical; and restart Postgres (a reload is not enough)",
        "error: max_replication_slots is 1 and 1 slot is in use (`standby`), so walbust cannot create slot",
        "hint: run ALTER SYSTEM SET max_replication_slots = 2; and restart Postgres",
        "error: max_wal_senders is 0 and 0 walsenders are running (see pg_stat_replication), so the server refuses walbust's replication connection\n  hint: run ALTER SYSTEM SET max_wal_senders = 1; and restart Postgres",
    ] {
        assert!(out.stderr.contains(expected), "missing {expected:?}:\n{out}");
    }

    // run notices too, and exits with the code a supervisor does not restart.
    let started = Instant::now();
    let out = walbust(&["run"], &files.path).await;
    assert_eq!(out.code, Some(3), "after {:?}:\n{out}", started.elapsed());

    // setup --apply creates what it can, and says what the server still needs.
    let out = walbust(&["setup", "--apply"], &files.path).await;
    assert_eq!(out.code, Some(3), "{out}");
    assert!(
        out.stderr.contains("error: wal_level is `replica` on the server, but logical decoding needs `logical`"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_says_the_busy_slot_is_held_by_the_servers_walsender_with_its_pid() {
    let s = support::shared();
    let db = fresh_db(&s.pg, PLANS).await;
    let n = &db.name;
    let files = write_config(&db, &s.redis.url(), PLAN_RULE, "");
    let first = support::Walbust::spawn(&["--log-level", "warn", "run", "--config"], &files.path, Stdio::null());
    let walsender = || support::streaming_walsender(&db.client, n);
    support::wait_until(DEADLINE, "the first instance to stream its slot", || async { walsender().await.is_some() })
        .await;
    let pid = walsender().await.expect("the slot is streamed");

    let log = files.path.with_file_name("second.log");
    let second = support::Walbust::spawn(
        &["--log-level", "warn", "run", "--config"],
        &files.path,
        std::fs::File::create(&log).expect("log file").into(),
    );
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    support::wait_until(DEADLINE, "the second instance to find the slot busy", || {
        std::future::ready(said().contains("is in use"))
    })
    .await;
    let text = said();
    assert!(
        text.contains(&format!(
            "replication slot `{n}` is in use: it is held by the server process (walsender) with pid {pid}, which streams it to another client"
        )),
        "{text}"
    );
    assert!(text.contains(&format!("FROM pg_stat_replication WHERE pid = {pid}")), "{text}");
    let first_os_pid = first.0.id() as i32;
    assert_ne!(pid, first_os_pid, "the pid is the server's backend, not the first walbust's");
    drop(second);
}

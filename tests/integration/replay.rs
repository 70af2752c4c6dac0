//! Recording and replay: golden recordings of scripted workloads, recording beside a
//! running walbust, and the `replay` command's difference, errors and determinism.
//!
//! Golden recordings live in tests/fixtures/replay/. Each golden test records its workload
//! again and compares the new recording with the checked-in one, apart from LSNs, xids,
//! times, OIDs and names that differ per run; then it replays the checked-in recording and
//! compares the report with `<name>.expected`. `WALBUST_BLESS=1` rewrites both instead.

use crate::routing::current_lsn;
use crate::support::{self, Running, Walbust, fresh_db, wait_until, write_config};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use walbust::daemon::pipeline::Event;
use walbust::domain::config::Config;
use walbust::domain::rules::RuleSet;
use walbust::offline::recording::replay::{self, Unit};
use walbust::offline::ruletest::recording::line_diff;
use walbust::postgres::lsn::Lsn;

const WAIT: Duration = Duration::from_secs(60);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/replay")
}

fn fixture_rules() -> Arc<RuleSet> {
    let glob = fixtures().join("rules.toml").display().to_string();
    Arc::new(RuleSet::load(&[glob]).unwrap_or_else(|d| panic!("fixture rules: {d}")).rules)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `walbust record` as a child process, recording `db` into `output`.
struct Recorder {
    child: Walbust,
    slot: String,
    log: PathBuf,
}

/// The state of a replication slot: active pid, confirmed flush LSN, temporary.
async fn slot_state(client: &tokio_postgres::Client, slot: &str) -> Option<(Option<i32>, Lsn, bool)> {
    let row = client
        .query_opt(
            "SELECT active_pid, confirmed_flush_lsn::text, temporary FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("reading pg_replication_slots")?;
    let lsn: Option<String> = row.get(1);
    Some((row.get(0), lsn.and_then(|l| l.parse().ok()).unwrap_or_default(), row.get(2)))
}

impl Recorder {
    /// Starts the recorder and waits until its slot is active and the header is written.
    async fn start(config: &Path, output: &Path) -> Recorder {
        Recorder::start_with(config, output, &[]).await
    }

    /// [`Recorder::start`] with extra arguments (limits).
    async fn start_with(config: &Path, output: &Path, extra: &[&str]) -> Recorder {
        let log = output.with_extension("log");
        let stderr = std::fs::File::create(&log).expect("recorder log");
        let out = output.to_str().expect("utf-8 path");
        let mut args = vec!["record", "--output", out];
        args.extend_from_slice(extra);
        args.push("--config");
        let child = Walbust::spawn(&args, config, Stdio::from(stderr));
        let slot = format!("walbust_record_{}", child.0.id());
        let r = Recorder { child, slot, log };
        let log = r.log.as_path();
        // The recorder says so once it streams from its slot (and a limit may end it at once).
        wait_until(WAIT, "the recorder to write the header and stream from its slot", move || async move {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            assert!(!log.contains("error"), "the recorder failed:\n{log}");
            let header = std::fs::read_to_string(output).is_ok_and(|t| t.ends_with('\n'));
            header && log.contains(" from temporary slot `")
        })
        .await;
        r
    }

    /// Waits until the recorder has written (and confirmed) everything up to `target`.
    async fn wait_written(&self, client: &tokio_postgres::Client, target: Lsn) {
        let slot = self.slot.as_str();
        wait_until(WAIT, "the recorder to write everything up to the last commit", move || async move {
            slot_state(client, slot).await.is_some_and(|(_, lsn, _)| lsn >= target)
        })
        .await;
    }

    /// SIGINT, then the exit code (within a deadline) and the recorder's stderr.
    async fn interrupt(self) -> (Option<i32>, String) {
        self.child.signal(libc::SIGINT);
        self.exited().await
    }

    /// The exit code once the recorder exits (within a deadline), and its stderr.
    async fn exited(mut self) -> (Option<i32>, String) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.0.try_wait().expect("waiting for the recorder") {
                return (status.code(), std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            assert!(tokio::time::Instant::now() < deadline, "the recorder did not exit within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Fields that differ from one recording of the same workload to the next.
const VOLATILE: &[&str] = &[
    "xid",
    "commit_lsn",
    "end_lsn",
    "lsn",
    "start_lsn",
    "commit_time",
    "captured_at",
    "oid",
    "database",
    "publication",
    "slot",
    "server_version",
];

fn scrub(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, x) in map.iter_mut() {
                if VOLATILE.contains(&k.as_str()) {
                    *x = serde_json::Value::String(format!("<{k}>"));
                } else {
                    scrub(x);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(scrub),
        _ => {}
    }
}

/// The recording with its volatile fields replaced by placeholders, one line per record.
fn normalize(recording: &str) -> String {
    recording
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("recording line {}: {e}", i + 1));
            scrub(&mut v);
            format!("{v}\n")
        })
        .collect()
}

struct Workload {
    name: &'static str,
    schema: &'static str,
    steps: &'static [&'static str],
}

const OPS: Workload = Workload {
    name: "ops",
    schema: "CREATE TABLE items (id int PRIMARY KEY, org text NOT NULL, name text);
             CREATE TABLE members (id int PRIMARY KEY, org text NOT NULL, role text NOT NULL);
             ALTER TABLE members REPLICA IDENTITY FULL;
             CREATE TABLE audit (id int PRIMARY KEY, note text);",
    steps: &[
        "INSERT INTO items VALUES (1, 'acme', 'one')",
        "INSERT INTO items VALUES (2, 'acme', 'two'), (3, 'globex', NULL)",
        "BEGIN; INSERT INTO members VALUES (1, 'acme', 'admin'), (2, 'acme', 'viewer');
         UPDATE items SET name = 'uno' WHERE id = 1; INSERT INTO audit VALUES (1, '@ops: renamed'); COMMIT",
        "UPDATE items SET id = 20 WHERE id = 2",
        "UPDATE members SET org = 'globex' WHERE id = 1",
        "DELETE FROM items WHERE id = 3",
        "DELETE FROM members WHERE role = 'viewer'",
        "UPDATE items SET org = 'globex'",
    ],
};

const TOAST: Workload = Workload {
    name: "toast",
    schema: "CREATE TABLE docs (id int PRIMARY KEY, org text NOT NULL, title text, body text);
             ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;",
    steps: &[
        "INSERT INTO docs VALUES (1, 'acme', 'draft', repeat('0123456789', 250))",
        "UPDATE docs SET title = 'final' WHERE id = 1",
        "UPDATE docs SET body = 'short' WHERE id = 1",
        "DELETE FROM docs WHERE id = 1",
    ],
};

const TRUNCATE: Workload = Workload {
    name: "truncate",
    schema: "CREATE TABLE carts (id int PRIMARY KEY, user_id int NOT NULL);
             CREATE TABLE cart_lines (cart_id int NOT NULL, n int NOT NULL);",
    steps: &[
        "INSERT INTO carts VALUES (1, 7), (2, 8)",
        "INSERT INTO cart_lines VALUES (1, 1), (1, 2)",
        "TRUNCATE carts, cart_lines",
        "INSERT INTO carts VALUES (3, 9)",
        "TRUNCATE carts RESTART IDENTITY CASCADE",
    ],
};

const MESSAGE: Workload = Workload {
    name: "message",
    schema: "CREATE TABLE plans (id int PRIMARY KEY, org text NOT NULL);",
    steps: &[
        r#"SELECT pg_logical_emit_message(true, 'walbust', '{"keys":["admin:defaults"],"patterns":["plans_*"],"tags":["idx:plans"]}')"#,
        r#"BEGIN; INSERT INTO plans VALUES (1, 'acme');
           SELECT pg_logical_emit_message(true, 'walbust', '{"keys":["plans:acme:featured"]}'); COMMIT"#,
        r#"SELECT pg_logical_emit_message(true, 'walbust', '{"key":["typo"]}')"#,
        "SELECT pg_logical_emit_message(true, 'other-app', 'hello')",
        r#"SELECT pg_logical_emit_message(false, 'walbust', '{"keys":["right:now"]}')"#,
        r#"BEGIN; INSERT INTO plans VALUES (2, 'globex');
           SELECT pg_logical_emit_message(true, 'walbust', '{"keys":["rolled:back"]}'); ROLLBACK"#,
        "INSERT INTO plans VALUES (3, 'initech')",
    ],
};

const DDL: Workload = Workload {
    name: "ddl",
    schema: "CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL);",
    steps: &[
        "INSERT INTO products VALUES (1, 'lamp')",
        "ALTER TABLE products ADD COLUMN color text",
        "INSERT INTO products VALUES (2, 'desk', 'red')",
        "UPDATE products SET color = 'blue' WHERE id = 1",
        "BEGIN; INSERT INTO products VALUES (3, 'chair', 'green'); ALTER TABLE products ADD COLUMN size int;
         INSERT INTO products VALUES (4, 'sofa', 'grey', 3); COMMIT",
    ],
};

/// Records `w` on the throwaway server and checks the recording and its replay against the
/// golden files (or rewrites them under `WALBUST_BLESS=1`).
async fn golden(w: &Workload) {
    let s = support::shared();
    let db = fresh_db(&s.pg, w.schema).await;
    let rules = std::fs::read_to_string(fixtures().join("rules.toml")).expect("fixture rules");
    let files = write_config(&db, &s.redis.url(), &rules, "");
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join(format!("{}.jsonl", w.name));
    let recorder = Recorder::start(&files.path, &output).await;
    for step in w.steps {
        db.client.batch_execute(step).await.unwrap_or_else(|e| panic!("`{step}`: {e}"));
    }
    let target = current_lsn(&db.client).await;
    recorder.wait_written(&db.client, target).await;
    let (code, log) = recorder.interrupt().await;
    assert_eq!(code, Some(0), "SIGINT stops the recorder cleanly:\n{log}");
    assert!(log.contains("recorded ") && log.contains("(stopped by a signal)"), "{log}");
    let fresh = std::fs::read_to_string(&output).expect("the recording");

    let golden_path = fixtures().join(format!("{}.jsonl", w.name));
    let expected_path = fixtures().join(format!("{}.expected", w.name));
    if std::env::var_os("WALBUST_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&golden_path, &fresh).expect("writing the golden recording");
        let report = replay::replay(fresh.as_bytes(), fixture_rules()).expect("the fresh recording replays").render();
        std::fs::write(&expected_path, report).expect("writing the expected report");
        return;
    }
    let golden = std::fs::read_to_string(&golden_path).unwrap_or_else(|e| {
        panic!("cannot read {}: {e}; create the golden files with WALBUST_BLESS=1", golden_path.display())
    });
    let (want, got) = (normalize(&golden), normalize(&fresh));
    if want != got {
        let diff = line_diff(&want, &got).join("\n");
        panic!(
            "the new recording of `{}` differs from {} (- golden, + new); if the change is intended, run with WALBUST_BLESS=1:\n{diff}",
            w.name,
            golden_path.display()
        );
    }
    let expected = std::fs::read_to_string(&expected_path).expect("the expected report");
    let report = replay::replay(golden.as_bytes(), fixture_rules()).expect("the golden recording replays").render();
    if report != expected {
        let diff = line_diff(&expected, &report).join("\n");
        panic!(
            "the replay of {} differs from {} (- expected, + actual):\n{diff}",
            golden_path.display(),
            expected_path.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_every_op_multi_row_transactions_and_a_key_changing_update() {
    golden(&OPS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_an_unchanged_toasted_value_is_recorded_as_not_sent() {
    golden(&TOAST).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_truncate_of_two_tables() {
    golden(&TRUNCATE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_manual_messages_in_and_outside_transactions() {
    golden(&MESSAGE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_a_column_added_mid_stream_and_mid_transaction() {
    golden(&DDL).await;
}

/// A pipeline in this process that collects every action it applies.
struct Observed {
    running: Running,
    applied: Arc<Mutex<BTreeSet<String>>>,
}

impl Observed {
    async fn start(config: &Path) -> Observed {
        let (running, mut events) = Running::start_observed(config).await;
        let applied = Arc::new(Mutex::new(BTreeSet::new()));
        let sink = applied.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let Event::Applied { actions, .. } = event {
                    sink.lock().expect("collector lock").extend(actions.iter().map(ToString::to_string));
                }
            }
        });
        Observed { running, applied }
    }

    async fn stop(self) -> BTreeSet<String> {
        self.running.stop().await.expect("clean stop");
        let applied = self.applied.lock().expect("collector lock");
        applied.clone()
    }
}

/// The mixed workload of one connection: 2,500 transactions, each one statement.
fn mixed_workload(n: &str, connection: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(2_500);
    for j in 0..500 {
        let a = connection * 100_000 + 2 * j;
        let b = a + 1;
        out.push(format!("INSERT INTO items VALUES ({a}, 'org{connection}', 'x'), ({b}, 'org{connection}', 'y')"));
        out.push(format!("UPDATE items SET name = 'z{j}' WHERE id = {a}"));
        out.push(format!("UPDATE items SET org = 'moved{}' WHERE id = {b}", j % 7));
        out.push(format!("DELETE FROM items WHERE id = {a}"));
        if j % 2 == 0 {
            out.push(format!("INSERT INTO events VALUES ({}, {b})", connection * 100_000 + j));
        } else {
            out.push(format!(
                r#"SELECT pg_logical_emit_message(true, 'walbust', '{{"keys":["{n}:manual:{connection}:{j}"]}}')"#
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_beside_walbust_run_leaves_its_slot_alone_and_replays_to_the_same_actions() {
    let s = support::shared();
    let db = fresh_db(
        &s.pg,
        "CREATE TABLE items (id int PRIMARY KEY, org text NOT NULL, name text);
         ALTER TABLE items REPLICA IDENTITY FULL;
         CREATE TABLE events (id int PRIMARY KEY, item int NOT NULL);",
    )
    .await;
    let n = &db.name;
    let rules = format!(
        "[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\", \"{n}:org:{{org}}:items\"]\n\
         [[rule]]\nname = \"events\"\ntable = \"events\"\nkeys = [\"{n}:item:{{item}}:events\"]\n"
    );
    let files = write_config(&db, &s.redis.url(), &rules, "");
    let run = Observed::start(&files.path).await;
    let (production_pid, _, temporary) = slot_state(&db.client, n).await.expect("walbust's slot exists");
    let production_pid = production_pid.expect("walbust streams from its slot");
    assert!(!temporary);

    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("mixed.jsonl");
    let recorder = Recorder::start(&files.path, &output).await;
    let (recorder_pid, _, temporary) = slot_state(&db.client, &recorder.slot).await.expect("the recorder's slot");
    assert!(temporary, "the recorder's slot is temporary");
    assert_ne!(recorder_pid, Some(production_pid), "the recorder streams from its own slot");

    // 10,000 transactions, pipelined over four connections.
    let mut writers = Vec::new();
    for c in 0..4 {
        let (url, statements) = (db.url.clone(), mixed_workload(n, c));
        writers.push(tokio::spawn(async move {
            let client = support::connect(&url).await;
            let pending = statements.iter().map(|sql| client.batch_execute(sql));
            futures_util::future::try_join_all(pending).await.expect("workload statement");
        }));
    }
    for w in writers {
        w.await.expect("workload task");
    }
    let target = current_lsn(&db.client).await;
    let metrics = run.running.metrics.clone();
    wait_until(Duration::from_secs(60), "walbust run to acknowledge the workload", move || {
        let flushed = metrics.flushed();
        async move { flushed >= target }
    })
    .await;
    recorder.wait_written(&db.client, target).await;

    // walbust's slot is held by walbust, and its position is only ever what walbust reported.
    let (pid, confirmed, _) = slot_state(&db.client, n).await.expect("walbust's slot");
    assert_eq!(pid, Some(production_pid), "walbust still holds its slot");
    assert!(confirmed <= run.running.metrics.flushed(), "the slot is never ahead of walbust's acknowledgement");
    let slot = recorder.slot.clone();
    let (code, log) = recorder.interrupt().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains(&format!("temporary slot `{slot}`")), "the recorder names its slot: {log}");
    let client = &db.client;
    wait_until(WAIT, "the temporary slot to go with its connection", move || {
        let slot = slot.clone();
        async move { slot_state(client, &slot).await.is_none() }
    })
    .await;
    let metrics = run.running.metrics.clone();
    wait_until(WAIT, "walbust's slot to confirm what walbust acknowledged", move || {
        let metrics = metrics.clone();
        async move {
            // Other databases' writes keep moving what walbust acknowledges: the slot's
            // position is read between two readings of it.
            let before = metrics.flushed();
            let (pid, confirmed, _) = slot_state(client, n).await.expect("walbust's slot");
            assert_eq!(pid, Some(production_pid), "walbust's slot stays with walbust");
            before <= confirmed && confirmed <= metrics.flushed()
        }
    })
    .await;
    let applied = run.stop().await;

    let recording = std::fs::read_to_string(&output).expect("the recording");
    let transactions = recording.lines().filter(|l| l.starts_with("{\"tx\":")).count();
    assert_eq!(transactions, 10_000, "every transaction is recorded once");
    let rules = RuleSet::load(&Config::load(&files.path).expect("config").rules).expect("rules").rules;
    let replayed = replay::replay(recording.as_bytes(), Arc::new(rules)).expect("the recording replays");
    assert!(replayed.outcomes.iter().all(|o| matches!(o.unit, Unit::Tx { .. })));
    let actions: BTreeSet<String> =
        replayed.outcomes.iter().flat_map(|o| o.actions.iter().map(ToString::to_string)).collect();
    let missing: Vec<&String> = applied.difference(&actions).take(5).collect();
    let extra: Vec<&String> = actions.difference(&applied).take(5).collect();
    assert!(missing.is_empty() && extra.is_empty(), "applied but not replayed: {missing:?}; replayed only: {extra:?}");
    assert!(actions.len() > 5_000, "the workload produces many distinct actions: {}", actions.len());
}

fn walbust(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_walbust")).args(args).current_dir(dir).output().expect("the walbust binary runs")
}

#[test]
fn replay_against_prints_exactly_the_added_and_dropped_actions_of_the_one_changed_rule() {
    let dir = tempfile::tempdir().expect("temp dir");
    let common = "[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"item:{id}\"]\n\
                  [[rule]]\nname = \"members\"\ntable = \"members\"\nkeys = [\"member:{id}\"]\n";
    let old_rule = "[[rule]]\nname = \"org items\"\ntable = \"items\"\nkeys = [\"org:{org}:items\"]\n";
    let new_rule = "[[rule]]\nname = \"org items\"\ntable = \"items\"\nkeys = [\"org:{org}:list\"]\n";
    for (file, body) in [("old.toml", format!("{common}{old_rule}")), ("new.toml", format!("{common}{new_rule}"))] {
        std::fs::write(dir.path().join(file), body).expect("rules");
    }
    std::fs::write(dir.path().join("old-only.toml"), old_rule).expect("rules");
    std::fs::write(dir.path().join("new-only.toml"), new_rule).expect("rules");
    let recording = fixtures().join("ops.jsonl");
    let rec = recording.to_str().expect("utf-8 path");
    let out = walbust(&["replay", "--rules", "new.toml", "--against", "old.toml", rec], dir.path());
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));

    // What the changed rule alone does, old and new: the rest of the rules cannot collide.
    let alone = |file: &str| {
        let rules = RuleSet::load(&[dir.path().join(file).display().to_string()]).expect("rules").rules;
        replay::replay_file(&recording, Arc::new(rules)).expect("replay")
    };
    let (new_only, old_only) = (alone("new-only.toml"), alone("old-only.toml"));
    let mut want = BTreeSet::new();
    for (n, o) in new_only.outcomes.iter().zip(&old_only.outcomes) {
        for a in &n.actions {
            want.insert(format!("{} + {a}  (rule `org items` on public.items)", n.line));
        }
        for a in &o.actions {
            want.insert(format!("{} - {a}  (rule `org items` on public.items)", o.line));
        }
    }
    let mut got = BTreeSet::new();
    let mut line = 0;
    for l in stdout.lines() {
        if let Some(rest) = l.strip_prefix("tx ") {
            line = rest.rsplit("line ").next().and_then(|n| n.trim().parse().ok()).expect("tx line number");
        } else if l.starts_with("  + ") || l.starts_with("  - ") {
            got.insert(format!("{line} {}", l.trim_start()));
        }
    }
    assert!(!want.is_empty());
    assert_eq!(got, want, "stdout:\n{stdout}");
    assert!(!stdout.contains("rule `items`") && !stdout.contains("rule `members`"), "{stdout}");
    let (added, dropped) =
        (want.iter().filter(|l| l.contains(" + ")).count(), want.iter().filter(|l| l.contains(" - ")).count());
    assert!(
        stdout.contains(&format!("added per rule and table:\n  rule `org items` on public.items: {added}\n")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("dropped per rule and table:\n  rule `org items` on public.items: {dropped}\n")),
        "{stdout}"
    );

    let same = walbust(&["replay", "--rules", "old.toml", "--against", "old.toml", rec], dir.path());
    assert!(text(&same.stdout).starts_with("no difference"), "{}", text(&same.stdout));
}

#[test]
fn a_truncated_or_corrupted_recording_is_an_error_at_its_line_and_prints_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let golden = std::fs::read_to_string(fixtures().join("ops.jsonl")).expect("golden recording");
    let lines: Vec<&str> = golden.lines().collect();
    assert!(lines.len() >= 5, "the golden recording has a header and transactions");
    let rules = fixtures().join("rules.toml").display().to_string();

    // Cut mid-way through the last line, as a copy made while recording would be.
    let cut = &golden[..golden.len() - 1 - lines[lines.len() - 1].len() / 2];
    std::fs::write(dir.path().join("cut.jsonl"), cut).expect("write");
    let out = walbust(&["replay", "--rules", &rules, "cut.jsonl"], dir.path());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("error: cut.jsonl:{}: the line is cut short", lines.len())), "{stderr}");
    assert!(stderr.contains("hint: "), "{stderr}");
    assert!(out.stdout.is_empty(), "no partial report: {}", text(&out.stdout));

    // A corrupted line in the middle: nothing before it is printed either.
    let mut corrupted = lines.clone();
    let broken = lines[3].replacen("{\"tx\":{", "{\"tx\":}{", 1);
    assert_ne!(broken, lines[3], "line 4 is a transaction");
    corrupted[3] = &broken;
    std::fs::write(dir.path().join("bad.jsonl"), corrupted.join("\n") + "\n").expect("write");
    let out = walbust(&["replay", "--rules", &rules, "bad.jsonl"], dir.path());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("error: bad.jsonl:4: the line is not valid JSON"), "{stderr}");
    assert!(out.stdout.is_empty(), "no partial report: {}", text(&out.stdout));

    // A change naming a column its relation lacks is caught too, with its line.
    let edited = golden.replacen("\"name\":\"one\"", "\"nmae\":\"one\"", 1);
    assert_ne!(edited, golden);
    std::fs::write(dir.path().join("edited.jsonl"), &edited).expect("write");
    let out = walbust(&["replay", "--rules", &rules, "edited.jsonl"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("edited.jsonl:2: `new` of a change of `public.items` gives column `nmae`"),
        "{}",
        text(&out.stderr)
    );

    // `walbust test` refuses the broken recording before running anything.
    std::fs::copy(fixtures().join("rules.toml"), dir.path().join("rules.toml")).expect("copy rules");
    std::fs::write(dir.path().join("ops.expected"), "").expect("write");
    std::fs::write(
        dir.path().join("bad.test.toml"),
        "rules = [\"rules.toml\"]\n[[test]]\nname = \"bad\"\nrecording = \"bad.jsonl\"\nexpect_file = \"ops.expected\"\n",
    )
    .expect("write");
    let out = walbust(&["test", "bad.test.toml"], dir.path());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad.test.toml:4:13: the recording is malformed: bad.jsonl:4:"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}

#[test]
fn replay_output_is_byte_identical_run_to_run_and_matches_the_golden_report() {
    let rules = fixtures().join("rules.toml").display().to_string();
    for name in ["ops", "toast", "truncate", "message", "ddl"] {
        let file = format!("{name}.jsonl");
        let first = walbust(&["replay", "--rules", &rules, &file], &fixtures());
        let second = walbust(&["replay", "--rules", &rules, &file], &fixtures());
        assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
        assert_eq!(first.stdout, second.stdout, "{name}: same inputs, same bytes");
        let expected = std::fs::read(fixtures().join(format!("{name}.expected"))).expect("expected report");
        assert_eq!(text(&first.stdout), text(&expected), "{name}");
    }
}

#[test]
fn walbust_test_replays_the_golden_recordings_and_shows_a_diff_when_one_differs() {
    let out = walbust(&["test", "tests/fixtures/replay/"], Path::new(env!("CARGO_MANIFEST_DIR")));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    assert!(stdout.ends_with("5 passed, 0 failed\n"), "{stdout}");

    let dir = tempfile::tempdir().expect("temp dir");
    for f in
        ["rules.toml", "golden.test.toml", "ops.jsonl", "toast.jsonl", "truncate.jsonl", "message.jsonl", "ddl.jsonl"]
    {
        std::fs::copy(fixtures().join(f), dir.path().join(f)).expect("copy fixture");
    }
    for name in ["toast", "truncate", "message", "ddl"] {
        std::fs::copy(fixtures().join(format!("{name}.expected")), dir.path().join(format!("{name}.expected")))
            .expect("copy");
    }
    let expected = std::fs::read_to_string(fixtures().join("ops.expected")).expect("expected");
    let altered = expected.replacen("  UNLINK item:1\n", "  UNLINK item:100\n", 1);
    assert_ne!(altered, expected, "the ops report unlinks item:1");
    std::fs::write(dir.path().join("ops.expected"), altered).expect("write");
    let out = walbust(&["test", "golden.test.toml"], dir.path());
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    assert!(stdout.contains("FAIL every op, multi-row transactions, a key-changing update\n"), "{stdout}");
    assert!(
        stdout.contains("the replay of `ops.jsonl` differs from `ops.expected` (- expected, + actual):"),
        "{stdout}"
    );
    assert!(stdout.contains("     -   UNLINK item:100\n") && stdout.contains("     +   UNLINK item:1\n"), "{stdout}");
    assert!(stdout.ends_with("4 passed, 1 failed\n"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_apply_executes_the_actions_in_redis() {
    let s = support::shared();
    let mut redis = support::redis_conn(&s.redis.url()).await;
    let keys: Vec<String> =
        ["item:1", "org:acme:items", "member:2", "replay-apply:bystander"].map(String::from).to_vec();
    support::cache(&mut redis, &keys).await;
    let rules = fixtures().join("rules.toml").display().to_string();
    let url = s.redis.url();
    let out = walbust(&["replay", "--rules", &rules, "ops.jsonl", "--apply", "--redis", &url], &fixtures());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("applied ") && stderr.contains(" in 1 batch to redis://"), "{stderr}");
    assert_eq!(support::existing(&mut redis, &keys).await, ["replay-apply:bystander"]);
    let out = walbust(&["replay", "--rules", &rules, "ops.jsonl", "--apply"], &fixtures());
    assert_eq!(out.status.code(), Some(2), "--apply needs --redis: {}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_stops_by_itself_at_each_limit_with_a_complete_file() {
    let s = support::shared();
    let db = fresh_db(&s.pg, "CREATE TABLE t (id int PRIMARY KEY);").await;
    let files = write_config(&db, &s.redis.url(), "", "");
    let dir = tempfile::tempdir().expect("temp dir");
    let lines = |p: &Path| std::fs::read_to_string(p).expect("recording").lines().count();

    let out = dir.path().join("max.jsonl");
    let recorder = Recorder::start_with(&files.path, &out, &["--max-transactions", "2"]).await;
    for i in 0..3 {
        db.client.batch_execute(&format!("INSERT INTO t VALUES ({i})")).await.expect("insert");
    }
    let (code, log) = recorder.exited().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("(1 published table) into ")
            && log
                .contains("recorded 2 transactions, 2 row changes, 0 messages, 0 table definitions changed; through ")
            && log.contains("(the transaction limit was reached)"),
        "{log}"
    );
    assert_eq!(lines(&out), 3, "the header and two transactions");

    let out = dir.path().join("duration.jsonl");
    let recorder = Recorder::start_with(&files.path, &out, &["--duration", "300ms"]).await;
    let (code, log) = recorder.exited().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("(the duration elapsed)"), "{log}");
    assert_eq!(lines(&out), 1, "only the header");

    let out = dir.path().join("until.jsonl");
    let until = Lsn(current_lsn(&db.client).await.0 + 64 * 1024).to_string();
    let recorder = Recorder::start_with(&files.path, &out, &["--until-lsn", &until]).await;
    db.client.batch_execute("INSERT INTO t SELECT g FROM generate_series(10, 3000) g").await.expect("insert");
    let (code, log) = recorder.exited().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("(the LSN limit was reached)"), "{log}");
    let recording = std::fs::read_to_string(&out).expect("recording");
    assert!(replay::validate(recording.as_bytes()).is_ok());

    for (args, want) in [
        (&["--until-lsn", "nope"][..], "error: invalid --until-lsn: invalid LSN `nope`"),
        (&["--duration", "5 parsecs"][..], "error: invalid --duration `5 parsecs`"),
        (&["--max-transactions", "0"][..], "error: --max-transactions 0 would record nothing"),
    ] {
        let mut all = vec!["record", "--output", "x.jsonl"];
        all.extend_from_slice(args);
        all.extend(["--config", files.path.to_str().expect("utf-8 path")]);
        let out = walbust(&all, dir.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(text(&out.stderr).contains(want), "{}", text(&out.stderr));
    }
}

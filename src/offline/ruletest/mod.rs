//! Rule tests: `*.test.toml` files that feed changes through the production routing step
//! ([`Routing`]) and [`Batch`] and compare the actions with what the file expects, as
//! `walbust test` does.
//!
//! ```toml
//! rules = ["settings.toml"]                 # globs relative to this file; a test may override
//!
//! [[tables]]                                # optional; otherwise inferred from the changes
//! table = "public.user_settings"
//! columns = ["user_id", "key", "value"]
//! key = ["user_id", "key"]
//! identity = "default"                      # default | full | nothing | index; default "full"
//!
//! [[test]]
//! name = "a theme change busts the theme key"
//! [[test.tx]]
//! changes = [
//!   { table = "user_settings", op = "update", new = { user_id = 7, key = "theme", value = "dark" } },
//! ]
//! expect = ["UNLINK user:7:settings:all", "UNLINK user:7:settings:theme"]
//! ```
//!
//! Loading runs in two steps, like every user file: serde structs, then validated
//! [`Suite`]s holding ready [`Relation`]s and tuples, so running a test cannot fail on
//! its input. Every problem in every file is reported at once, at `file:line:col`.

use crate::domain::action::Action;
use crate::domain::batch::Batch;
use crate::domain::diagnostic::{self, Diagnostic, Diagnostics, LineIndex, did_you_mean};
use crate::domain::routing::{Routing, Tally};
use crate::domain::rules::manual::{ManualError, ManualPolicy, Refusal};
use crate::domain::rules::{Change, Op, Routed, RuleSet, TableName, Widening};
use crate::postgres::lsn::Lsn;
use crate::postgres::pgoutput::{Column, OldTuple, Relation, ReplicaIdentity, Tuple, Value};
use recording::RecordingCase;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use toml::Spanned;

pub use crate::domain::rules::TEST_SUFFIX as SUFFIX;
use crate::domain::value_text::{NULL, TOAST};

mod load;
pub mod recording;
mod report;
mod run;

pub use load::{discover, load, parse};
pub use report::{failure_report, junit, totals};
pub use run::{CaseResult, Origin, SuiteResult, TxResult, run};

// ---------------------------------------------------------------------------------------
// Validated tests.

/// The tests of one file, validated and ready to run.
#[derive(Debug)]
pub struct Suite {
    /// The test file.
    pub file: PathBuf,
    /// Its tests, in file order.
    pub cases: Vec<Case>,
}

/// One `[[test]]`: tables, rules and transactions whose actions are checked.
#[derive(Debug)]
pub struct Case {
    /// The test's name, unique within its file.
    pub name: String,
    /// The line of its `[[test]]` header.
    pub line: usize,
    rules: Arc<RuleSet>,
    tables: Vec<TestTable>,
    txs: Vec<Tx>,
    recording: Option<RecordingCase>,
}

#[derive(Debug)]
struct TestTable {
    relation: Relation,
    /// True when the file listed the columns, so a rule naming another one is a mistake.
    declared: bool,
}

#[derive(Debug)]
struct Tx {
    line: usize,
    steps: Vec<Step>,
    expect: Vec<Action>,
}

#[derive(Debug)]
pub(crate) enum Step {
    Row { table: usize, op: Op, old: Option<OldTuple>, new: Option<Tuple> },
    Message { line: usize, body: Vec<u8> },
}

/// Validated test files together with the warnings their rule files gave.
#[derive(Debug)]
pub struct Loaded {
    /// One suite per test file, in the order given.
    pub suites: Vec<Suite>,
    /// Rule file warnings: reported, not fatal.
    pub warnings: Diagnostics,
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"
[[rule]]
name = "members"
table = "members"
keys = ["org:{org_id}:members", "member:{id}"]

[[rule]]
name = "active"
table = "members"
when = { active = true }
keys = ["active:{org_id}"]

[[rule]]
name = "cards"
table = "members"
on = ["insert"]
refresh = [{ key = "card:{id}", columns = ["id", "active", "bio"] }]
"#;

    /// A directory holding `rules.toml` and `t.test.toml`; returns the parsed suite or its problems.
    fn suite(test: &str) -> (tempfile::TempDir, Result<Suite, Diagnostics>) {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("rules.toml"), RULES).expect("rules");
        let path = dir.path().join("t.test.toml");
        std::fs::write(&path, test).expect("test file");
        let parsed = parse(&path, test);
        (dir, parsed)
    }

    fn run_one(test: &str) -> CaseResult {
        let (_dir, parsed) = suite(test);
        let suite = parsed.unwrap_or_else(|d| panic!("test file should load:\n{d}"));
        suite.cases[0].run()
    }

    fn actual(result: &CaseResult) -> Vec<String> {
        let mut v: Vec<String> = result.txs[0].actual.iter().map(|(a, _)| a.to_string()).collect();
        v.sort();
        v
    }

    fn errors(test: &str) -> String {
        let (_dir, parsed) = suite(test);
        let problems = parsed.expect_err("the test file should be rejected");
        problems.errors().map(|d| format!("{}:{}: {}", d.line, d.col, d.message)).collect::<Vec<_>>().join("\n")
    }

    fn one_tx(changes: &str, expect: &str) -> String {
        with_tables("", changes, expect)
    }

    fn with_tables(tables: &str, changes: &str, expect: &str) -> String {
        format!(
            "rules = [\"rules.toml\"]\n{tables}[[test]]\nname = \"t\"\n[[test.tx]]\nchanges = [{changes}]\nexpect = [{expect}]\n"
        )
    }

    #[test]
    fn expectations_are_an_unordered_set_of_canonical_actions() {
        let r = run_one(&one_tx(
            "{ table = \"members\", op = \"insert\", new = { id = 1, org_id = \"acme\", active = false, bio = \"x\" } }",
            "\"UNLINK   member:1 \", \"UNLINK org:acme:members\", 'SET card:1 {\"id\":1,\"active\":false,\"bio\":\"x\"}'",
        ));
        assert!(r.passed(), "{}", failure_report(Path::new("t"), &r));
    }

    #[test]
    fn integers_and_booleans_are_text_as_postgres_prints_them() {
        let r = run_one(&one_tx(
            "{ table = \"members\", op = \"insert\", new = { id = 1, org_id = 2, active = true, bio = \"x\" } }",
            "",
        ));
        let got = actual(&r);
        assert!(got.contains(&"UNLINK active:2".to_string()), "`when = {{ active = true }}` matches t: {got:?}");
        assert!(got.contains(&r#"SET card:1 {"id":1,"active":true,"bio":"x"}"#.to_string()), "{got:?}");
    }

    #[test]
    fn null_toast_and_escaped_at_signs() {
        let r = run_one(&one_tx(
            "{ table = \"members\", op = \"insert\", new = { id = \"@@1\", org_id = \"@null\", active = false, bio = \"@toast\" } }",
            "",
        ));
        let got = actual(&r);
        assert_eq!(got, ["SCAN-UNLINK org:*:members", "UNLINK card:@1", "UNLINK member:@1"], "{got:?}");
        let origins: Vec<_> = r.txs[0].actual.iter().map(|(_, o)| o.clone()).collect();
        assert!(origins.contains(&Origin::Rule { name: "members".into(), widened: Some(Widening::NullValue) }));
    }

    #[test]
    fn identity_default_sends_key_images_and_no_old_row_for_same_key_updates() {
        let tables = "[[tables]]\ntable = \"members\"\ncolumns = [\"id\", \"org_id\", \"active\", \"bio\"]\nkey = [\"id\"]\nidentity = \"default\"\n";
        let test = |changes: &str| actual(&run_one(&with_tables(tables, changes, "")));
        let got = test("{ table = \"members\", op = \"delete\", old = { id = 1 } }");
        assert_eq!(got, ["SCAN-UNLINK active:*", "SCAN-UNLINK org:*:members", "UNLINK member:1"]);
        let got = test("{ table = \"members\", op = \"update\", new = { id = 1, org_id = \"a\", active = false } }");
        assert!(got.contains(&"UNLINK member:1".to_string()), "the key comes from the new row: {got:?}");
        assert!(got.contains(&"SCAN-UNLINK org:*:members".to_string()), "the old org is unknown: {got:?}");
    }

    #[test]
    fn a_failure_shows_missing_and_unexpected_lines_side_by_side() {
        let r = run_one(&one_tx(
            "{ table = \"members\", op = \"delete\", old = { id = 1, org_id = \"acme\", active = false } }",
            "\"UNLINK member:1\", \"UNLINK org:globex:members\"",
        ));
        assert!(!r.passed());
        let report = failure_report(Path::new("t.test.toml"), &r);
        assert!(report.contains("tx 1 of 1 (t.test.toml:5): 1 missing, 1 unexpected"), "{report}");
        let line =
            |prefix: &str| report.lines().find(|l| l.trim_start().starts_with(prefix)).map(str::trim).map(String::from);
        assert_eq!(line("- UNLINK org:globex").as_deref(), Some("- UNLINK org:globex:members  |"), "{report}");
        assert_eq!(line("| + UNLINK").as_deref(), Some("| + UNLINK org:acme:members  (rule `members`)"), "{report}");
        let both = line("UNLINK member:1").map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "));
        assert_eq!(both.as_deref(), Some("UNLINK member:1 | UNLINK member:1"), "{report}");
    }

    #[test]
    fn messages_are_applied_and_malformed_ones_skipped_with_a_note() {
        let r = run_one(&one_tx(
            "{ message = { keys = [\"a\"], tags = [\"t\"] } }, { message = '{\"keys\": \"a\"}' }",
            "\"UNLINK a\", \"BUST-TAG t\"",
        ));
        assert!(r.passed());
        assert_eq!(r.txs[0].notes.len(), 1, "{:?}", r.txs[0].notes);
        assert!(r.txs[0].notes[0].contains("line 5 was skipped"), "{:?}", r.txs[0].notes);
    }

    #[test]
    fn a_match_all_pattern_in_a_message_is_left_out_with_a_note_as_run_leaves_it_out() {
        let r = run_one(&one_tx("{ message = { keys = [\"a\"], patterns = [\"*\"] } }", "\"UNLINK a\""));
        assert!(r.passed(), "{:?}", r.txs[0]);
        assert_eq!(r.txs[0].notes.len(), 1, "{:?}", r.txs[0].notes);
        assert!(r.txs[0].notes[0].contains("manual_match_all"), "{:?}", r.txs[0].notes);
    }

    #[test]
    fn a_rule_column_missing_from_declared_columns_fails_the_test() {
        let tables = "[[tables]]\ntable = \"members\"\ncolumns = [\"id\", \"org_id\", \"active\"]\n";
        let r = run_one(&with_tables(tables, "{ table = \"members\", op = \"truncate\" }", ""));
        assert!(!r.passed());
        assert!(r.problems.iter().any(|p| p.contains("column `bio`")), "{:?}", r.problems);
    }

    #[test]
    fn inferred_tables_take_the_columns_rules_read_and_leave_them_out_of_the_stream() {
        let r = run_one(&one_tx("{ table = \"members\", op = \"insert\", new = { id = 1, active = false } }", ""));
        assert!(r.passed() || r.problems.is_empty(), "{:?}", r.problems);
        let got = actual(&r);
        assert!(got.contains(&"SCAN-UNLINK org:*:members".to_string()), "{got:?}");
        assert!(got.contains(&"UNLINK card:1".to_string()), "a partial row is not written through: {got:?}");
    }

    #[test]
    fn several_transactions_are_checked_one_by_one() {
        let text = "rules = [\"rules.toml\"]\n[[test]]\nname = \"t\"\n\
            [[test.tx]]\nchanges = [{ message = { keys = [\"a\"] } }]\nexpect = [\"UNLINK a\"]\n\
            [[test.tx]]\nchanges = [{ message = { keys = [\"b\"] } }]\nexpect = [\"UNLINK a\"]\n";
        let r = run_one(text);
        assert!(r.txs[0].passed());
        assert!(!r.txs[1].passed(), "each transaction has its own batch");
    }

    #[test]
    fn bad_test_files_give_every_problem_with_line_and_column() {
        let got = errors(&one_tx("{ tabel = \"members\" }", ""));
        assert!(got.starts_with("5:14: unknown field `tabel`"), "{got}");

        let text = "rules = [\"missing.toml\"]\n[[tables]]\ntable = \"members\"\nkey = [\"id\"]\nidentity = \"defualt\"\n\
            [[test]]\nname = \"t\"\n[[test.tx]]\nchanges = [\n\
            { table = \"members\", op = \"insrt\" },\n\
            { table = \"members\", op = \"update\", new = { id = 1.5 } },\n\
            { table = \"members\", op = \"delete\" },\n\
            { table = \"members\", op = \"insert\", new = { id = \"@nul\" }, message = { keys = [\"a\"] } },\n\
            ]\nexpect = [\"DEL x\", \"UNLINK a\", \"UNLINK a\"]\n";
        let got = errors(text);
        for want in [
            "1:10: rules glob `missing.toml` matches no files",
            "5:12: unknown replica identity `defualt`",
            "10:27: unknown op `insrt`",
            "11:1: an update of `public.members` under identity full always carries the old row",
            "12:1: delete of `members` needs its old row",
            "13:1: a message change cannot have `table`",
            "15:11: invalid expectation `DEL x`",
            "15:32: expectation `UNLINK a` is listed twice",
        ] {
            assert!(got.contains(want), "missing {want:?} in:\n{got}");
        }
    }

    #[test]
    fn old_rows_under_a_key_identity_hold_exactly_the_key_columns() {
        let tables = "[[tables]]\ntable = \"members\"\nkey = [\"id\", \"org_id\"]\nidentity = \"index\"\n";
        let got =
            errors(&with_tables(tables, "{ table = \"members\", op = \"delete\", old = { id = 1, bio = \"x\" } }", ""));
        assert!(
            got.contains("gives `bio`, but under identity index Postgres sends only the key columns (id, org_id)"),
            "{got}"
        );
        assert!(got.contains("lacks key column `org_id`"), "{got}");
        let got = errors(&with_tables(tables, "{ table = \"members\", op = \"insert\", new = { id = 1.5 } }", ""));
        assert!(got.contains("unsupported float value `1.5` for column `id`"), "{got}");
    }

    #[test]
    fn rule_file_errors_fail_loading() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("rules.toml"), "[[rule]]\nname = \"x\"\ntabel = \"t\"\n").expect("rules");
        let path = dir.path().join("t.test.toml");
        let text = one_tx("{ message = { keys = [\"a\"] } }", "\"UNLINK a\"");
        std::fs::write(&path, &text).expect("test file");
        let err = load(std::slice::from_ref(&path)).expect_err("bad rules");
        assert!(err.to_string().contains("rules.toml:3:1: unknown field `tabel`"), "{err}");
    }

    #[test]
    fn rule_globs_skip_test_files_beside_the_rules() {
        let (dir, _) = suite(&one_tx("{ message = { keys = [\"a\"] } }", "\"UNLINK a\""));
        let glob = format!("{}/*.toml", glob::Pattern::escape(&dir.path().to_string_lossy()));
        let loaded = RuleSet::load(&[glob]).unwrap_or_else(|d| panic!("only rules.toml loads:\n{d}"));
        assert_eq!(loaded.files, [dir.path().join("rules.toml")]);
    }

    #[test]
    fn discover_finds_test_files_in_directories_sorted() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("sub")).expect("sub");
        for f in ["b.test.toml", "a.test.toml", "rules.toml", "sub/c.test.toml"] {
            std::fs::write(dir.path().join(f), "").expect("file");
        }
        let found = discover(&[dir.path().to_path_buf()]).expect("found");
        let names: Vec<String> =
            found.iter().map(|p| p.strip_prefix(dir.path()).expect("under dir").display().to_string()).collect();
        assert_eq!(names, ["a.test.toml", "b.test.toml", "sub/c.test.toml"]);
        let empty = tempfile::tempdir().expect("temp dir");
        let err = discover(&[empty.path().to_path_buf(), dir.path().join("nope")]).expect_err("nothing found");
        assert_eq!(err.0.len(), 2, "{err}");
    }

    #[test]
    fn junit_escapes_names_and_reports() {
        let r = run_one(&one_tx("{ message = { keys = [\"a<&>\\\"'\"] } }", "\"UNLINK b\""));
        let xml = junit(&[SuiteResult { file: PathBuf::from("x&y.test.toml"), cases: vec![r] }]);
        assert!(
            xml.contains("<testsuite name=\"x&amp;y.test.toml\" tests=\"1\" skipped=\"0\" errors=\"0\" failures=\"1\""),
            "{xml}"
        );
        assert!(xml.contains("+ UNLINK a&lt;&amp;&gt;&quot;&apos;"), "{xml}");
        assert!(xml.contains("<failure message=\"1 of 1 transactions produced other actions than expected\""), "{xml}");
        let mut r = run_one(&one_tx("{ message = { keys = [\"a\"] } }", "\"UNLINK b\""));
        r.name = "a\u{1}b".into();
        let xml = junit(&[SuiteResult { file: PathBuf::from("x.test.toml"), cases: vec![r] }]);
        assert!(!xml.contains('\u{1}'), "a character XML cannot hold is dropped or replaced: {xml}");
    }
}

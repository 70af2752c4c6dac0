//! `walbust test`: the built binary over the example rules in `rules/`, a failing copy of
//! one example, and a malformed test file. No servers are needed.

use std::path::Path;
use std::process::{Command, Output};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn walbust_test(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_walbust"))
        .arg("test")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the walbust binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_example_rules_pass_their_tests() {
    let out = walbust_test(&["rules/"], Path::new(ROOT));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for file in ["demo", "franchise", "ledger", "plans", "settings"] {
        assert!(stdout.contains(&format!("rules/{file}.test.toml\n")), "{file} was not run:\n{stdout}");
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.ends_with(" passed, 0 failed"), "summary: {summary}");
    let passed: usize = summary.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(passed >= 4 * 4, "every example has at least four tests: {summary}");
}

#[test]
fn an_altered_expectation_fails_with_a_side_by_side_diff() {
    let dir = tempfile::tempdir().expect("temp dir");
    for f in ["plans.toml", "plans.test.toml"] {
        std::fs::copy(Path::new(ROOT).join("rules").join(f), dir.path().join(f)).expect("copy example");
    }
    let test_file = dir.path().join("plans.test.toml");
    let original = std::fs::read_to_string(&test_file).expect("read");
    let altered = original.replacen("\"UNLINK providers_list_acme\",", "\"UNLINK providers_list_acme_eu\",", 1);
    assert_ne!(altered, original, "the example still has the line this test alters");
    std::fs::write(&test_file, altered).expect("write");
    let junit = dir.path().join("report.xml");

    let out = walbust_test(&["plans.test.toml", "--junit", "report.xml"], dir.path());
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    assert!(stdout.contains("FAIL creating a plan busts its org's lists and the providers list\n"), "{stdout}");
    assert!(stdout.contains("ok   repricing a plan busts the lists but not the providers list\n"), "{stdout}");
    assert!(stdout.contains("tx 1 of 1 (plans.test.toml:"), "{stdout}");
    assert!(stdout.contains("1 missing, 1 unexpected"), "{stdout}");
    let row = |marker: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().collect::<Vec<_>>().join(" ").contains(marker))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    assert_eq!(
        row("- UNLINK providers_list_acme_eu").as_deref(),
        Some("- UNLINK providers_list_acme_eu |"),
        "{stdout}"
    );
    assert_eq!(
        row("| + UNLINK providers_list_acme").as_deref(),
        Some("| + UNLINK providers_list_acme (rule `provider list`)"),
        "{stdout}"
    );
    assert_eq!(
        row("SCAN-UNLINK all_plans_acme_* |").as_deref(),
        Some("SCAN-UNLINK all_plans_acme_* | SCAN-UNLINK all_plans_acme_*"),
        "lines in both columns are unmarked: {stdout}"
    );
    assert!(stdout.ends_with("7 passed, 1 failed\n"), "{stdout}");

    let xml = std::fs::read_to_string(&junit).expect("the JUnit report is written");
    assert!(
        xml.contains("<testsuite name=\"plans.test.toml\" tests=\"8\" skipped=\"0\" errors=\"0\" failures=\"1\""),
        "{xml}"
    );
    assert!(xml.contains("- UNLINK providers_list_acme_eu"), "{xml}");

    let out = walbust_test(&["plans.test.toml", "--run", "^repricing"], dir.path());
    assert_eq!(out.status.code(), Some(0), "--run selects the passing test only:\n{}", text(&out.stdout));
    assert!(text(&out.stdout).ends_with("1 passed, 0 failed (7 not matching --run)\n"), "{}", text(&out.stdout));
    let out = walbust_test(&["plans.test.toml", "--run", "no such test"], dir.path());
    assert_eq!(out.status.code(), Some(2), "no test matched: {}", text(&out.stderr));
}

#[test]
fn a_malformed_test_file_is_a_usage_error_at_file_line_col() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy(Path::new(ROOT).join("rules/plans.toml"), dir.path().join("plans.toml")).expect("copy rules");
    std::fs::write(
        dir.path().join("bad.test.toml"),
        "rules = [\"plans.toml\"]\n\n[[test]]\nname = \"typo\"\n[[test.tx]]\nchanges = [\n  { table = \"plans\", op = \"insrt\", new = { id = 1 } },\n]\nexpect = []\n",
    )
    .expect("write");
    let out = walbust_test(&["."], dir.path());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stdout:\n{}\nstderr:\n{stderr}", text(&out.stdout));
    assert!(stderr.contains("error: ./bad.test.toml:7:27: unknown op `insrt`"), "{stderr}");
    assert!(stderr.contains("hint: did you mean `insert`?"), "{stderr}");
    assert!(stderr.contains("no test was run"), "{stderr}");
    assert!(text(&out.stdout).is_empty(), "nothing runs: {}", text(&out.stdout));
}

#[test]
fn with_config_a_test_applies_its_manual_prefixes_as_walbust_run_does() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("rules.toml"), "[[rule]]\nname = \"t\"\ntable = \"t\"\nkeys = [\"t:{id}\"]\n")
        .expect("rules");
    std::fs::write(
        dir.path().join("m.test.toml"),
        "rules = [\"rules.toml\"]\n[[test]]\nname = \"admin keys only\"\n[[test.tx]]\n\
         changes = [{ message = { keys = [\"admin:x\", \"other:y\"] } }]\nexpect = [\"UNLINK admin:x\"]\n",
    )
    .expect("test file");
    std::fs::write(
        dir.path().join("config.toml"),
        "rules = [\"rules.toml\"]\n[source]\nurl = \"postgres://walbust@127.0.0.1:5432/app\"\n\
         manual_prefixes = [\"admin:\"]\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n",
    )
    .expect("config");

    // The default policy lets `other:y` through: the expectation does not hold.
    let out = walbust_test(&["m.test.toml"], dir.path());
    assert_eq!(out.status.code(), Some(1), "stdout:\n{}\nstderr:\n{}", text(&out.stdout), text(&out.stderr));
    // The config's manual_prefixes leave it out, as `walbust run` with that config would.
    let out = walbust_test(&["m.test.toml", "--config", "config.toml"], dir.path());
    assert_eq!(out.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", text(&out.stdout), text(&out.stderr));
    let out = walbust_test(&["m.test.toml", "--config", "missing.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2), "stdout:\n{}\nstderr:\n{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stderr).contains("missing.toml"), "{}", text(&out.stderr));
}

//! The catalogue of bad rule files in `tests/fixtures/bad-rules/`, loaded offline.
//!
//! Each `NN-what.toml` sits beside `NN-what.expected`: one expected message substring a
//! line, every one of which must appear in the diagnostics. A first line `# warning`
//! marks a file that loads with warnings; every other file must fail to load. Files named
//! `NN-what.<part>.toml` are loaded together with `NN-what.toml` (duplicate names across
//! files). Every diagnostic must be pinned to `file:line:col` with line and column from 1.
//! No servers are needed; `walbust check` itself runs over a few of the same mistakes.

use std::path::{Path, PathBuf};
use walbust::domain::diagnostic::Diagnostics;
use walbust::domain::rules::RuleSet;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bad-rules");

/// One fixture: its rule files, whether it only warns, and the substrings expected.
struct Case {
    name: String,
    files: Vec<PathBuf>,
    warning: bool,
    expected: Vec<String>,
}

fn cases() -> Vec<Case> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(DIR)
        .unwrap_or_else(|e| panic!("reading {DIR}: {e}"))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    let file_name = |p: &Path| p.file_name().and_then(|n| n.to_str()).expect("utf-8 fixture name").to_string();
    let mut cases = Vec::new();
    for path in &entries {
        let name = file_name(path);
        let Some(stem) = name.strip_suffix(".toml") else { continue };
        if stem.contains('.') {
            // A companion file: loaded with its main file.
            let main = stem.split('.').next().expect("split yields one piece");
            assert!(Path::new(DIR).join(format!("{main}.toml")).is_file(), "{name} has no main file {main}.toml");
            continue;
        }
        let expected_path = path.with_extension("expected");
        let text = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{name} needs {}: {e}", expected_path.display()));
        let warning = text.lines().next().is_some_and(|l| l.trim() == "# warning");
        let expected: Vec<String> =
            text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).map(str::to_string).collect();
        assert!(!expected.is_empty(), "{} expects nothing", expected_path.display());
        let mut files = vec![path.clone()];
        files.extend(
            entries
                .iter()
                .filter(|p| file_name(p).starts_with(&format!("{stem}.")) && file_name(p).ends_with(".toml"))
                .cloned(),
        );
        cases.push(Case { name: stem.to_string(), files, warning, expected });
    }
    for path in &entries {
        if path.extension().is_some_and(|e| e == "expected") {
            assert!(path.with_extension("toml").is_file(), "{} has no rule file beside it", path.display());
        }
    }
    cases
}

/// Loads the case's files as `walbust check` would, returning (failed, diagnostics).
fn load(case: &Case) -> (bool, Diagnostics) {
    let globs: Vec<String> = case.files.iter().map(|p| p.display().to_string()).collect();
    match RuleSet::load(&globs) {
        Ok(loaded) => (false, loaded.warnings),
        Err(problems) => (true, problems),
    }
}

/// What is wrong with one case, if anything.
fn problems_with(case: &Case) -> Vec<String> {
    let (failed, diagnostics) = load(case);
    let shown = diagnostics.to_string();
    let mut wrong = Vec::new();
    match (case.warning, failed) {
        (true, true) => wrong.push("expected warnings only, but loading failed".to_string()),
        (false, false) => wrong.push("expected loading to fail, but it succeeded".to_string()),
        _ => {}
    }
    if case.warning && diagnostics.warnings().next().is_none() {
        wrong.push("expected a warning, got none".to_string());
    }
    for want in &case.expected {
        if !shown.contains(want.as_str()) {
            wrong.push(format!("missing expected text `{want}`"));
        }
    }
    for d in &diagnostics.0 {
        if d.line == 0 || d.col == 0 {
            wrong.push(format!("not pinned to a line and column (line {}, col {}): {d}", d.line, d.col));
        }
        if !case.files.contains(&d.file) {
            wrong.push(format!("names a file outside the case: {d}"));
        }
        let place = format!("{}:{}:{}: ", d.file.display(), d.line, d.col);
        if !d.to_string().contains(&place) {
            wrong.push(format!("does not show `{place}`: {d}"));
        }
    }
    if !wrong.is_empty() {
        wrong.push(format!("diagnostics were:\n{shown}"));
    }
    wrong
}

#[test]
fn every_bad_rule_file_is_reported_with_its_message_at_file_line_col() {
    let cases = cases();
    assert!(cases.len() >= 25, "the catalogue holds {} cases; keep at least 25", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let wrong = problems_with(case);
        if !wrong.is_empty() {
            failures.push(format!("{}:\n  {}", case.name, wrong.join("\n  ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad-rule cases are wrong:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn the_catalogue_covers_both_failures_and_warnings() {
    let cases = cases();
    let warnings = cases.iter().filter(|c| c.warning).count();
    assert!(warnings >= 5, "only {warnings} warning cases");
    assert!(cases.len() - warnings >= 20, "only {} failing cases", cases.len() - warnings);
    assert!(cases.iter().any(|c| c.files.len() > 1), "no case spans two files");
}

#[test]
fn walbust_check_shows_every_problem_of_every_rule_file_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    // Two unknown keys, then a syntax error in the file's next rule.
    let a = "[[rule]]\nname = \"users\"\ntabel = \"users\"\nkyes = [\"user:{id}\"]\n\n\
             [[rule]]\nname = \"settings\ntable = \"user_settings\"\nkeys = [\"settings:{user_id}\"]\n";
    // A duplicate of the broken rule's name, with an error of its own.
    let b = "[[rule]]\nname = \"users\"\ntable = \"users\"\non = [\"updte\"]\nkeys = [\"user:{id}\"]\n";
    std::fs::write(rules.join("a.toml"), a).unwrap();
    std::fs::write(rules.join("b.toml"), b).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "rules = [\"rules/*.toml\"]\n[source]\nurl = \"postgres://u@127.0.0.1:1/db\"\n\
         [redis]\nurl = \"redis://127.0.0.1:1/0\"\n[metrics]\nlisten = \"off\"\n",
    )
    .unwrap();
    let out = super::config_files::walbust(&["check", "--config", config.to_str().unwrap()]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), super::config_files::stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let (a, b) = (rules.join("a.toml"), rules.join("b.toml"));
    let (a, b) = (a.display(), b.display());
    for file in [&a, &b] {
        assert!(stdout.contains(&format!("FAIL {file}\n")), "{stdout}");
    }
    let expected = [
        format!("error: {a}:1:1: missing field `table` in rule `users`"),
        format!("error: {a}:3:1: unknown field `tabel`"),
        format!("error: {a}:4:1: unknown field `kyes`"),
        format!("error: {a}:7:17: invalid basic string"),
        format!("error: {b}:1:1: duplicate rule name `users`\n  hint: the name is already used at {a}:1"),
        format!("error: {b}:4:7: unknown op `updte` in rule `users`"),
    ];
    for want in &expected {
        assert!(stderr.contains(want.as_str()), "missing:\n{want}\nin:\n{stderr}");
    }
    assert_eq!(stderr.matches("error: ").count(), expected.len(), "{stderr}");
}

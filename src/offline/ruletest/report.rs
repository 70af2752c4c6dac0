//! Reporting: the side-by-side failure report, totals and JUnit XML.

use super::*;

/// Widest left column before its cells overflow into the right one.
pub(super) const MAX_LEFT: usize = 60;

/// Why a test failed, as indented lines: problems, then each failing transaction with its
/// expected and actual actions side by side (missing lines `-`, unexpected `+`).
pub fn failure_report(file: &Path, case: &CaseResult) -> String {
    let mut out = String::new();
    for p in &case.problems {
        let _ = writeln!(out, "     {p}");
    }
    for tx in case.txs.iter().filter(|t| !t.passed()) {
        let missing = tx.expected.iter().filter(|e| !tx.actual.iter().any(|(a, _)| a == *e)).count();
        let unexpected = tx.actual.iter().filter(|(a, _)| !tx.expected.contains(a)).count();
        let _ = writeln!(
            out,
            "     tx {} of {} ({}:{}): {missing} missing, {unexpected} unexpected",
            tx.index,
            case.txs.len(),
            file.display(),
            tx.line
        );
        out.push_str(&side_by_side(tx));
        for n in &tx.notes {
            let _ = writeln!(out, "       note: {n}");
        }
    }
    out
}

/// The two-column diff of one transaction, sorted by action.
pub(super) fn side_by_side(tx: &TxResult) -> String {
    let actual: BTreeMap<String, &Origin> = tx.actual.iter().map(|(a, o)| (a.to_string(), o)).collect();
    let expected: BTreeSet<String> = tx.expected.iter().map(Action::to_string).collect();
    let mut lines: BTreeSet<&String> = expected.iter().collect();
    lines.extend(actual.keys());
    let rows: Vec<(String, String)> = lines
        .into_iter()
        .map(|l| match actual.get(l) {
            Some(_) if expected.contains(l) => (format!("  {l}"), format!("  {l}")),
            Some(origin) => (String::new(), format!("+ {l}  {}", describe(origin))),
            None => (format!("- {l}"), String::new()),
        })
        .collect();
    let width = rows.iter().map(|(l, _)| l.chars().count()).chain([8]).max().unwrap_or(8).min(MAX_LEFT);
    let mut out = String::new();
    let _ = writeln!(out, "       {:<width$}  |   actual", "  expected");
    for (left, right) in rows {
        let _ = writeln!(out, "       {left:<width$}  | {right}");
    }
    // Trailing spaces of rows with an empty right cell are noise.
    out.lines().map(|l| format!("{}\n", l.trim_end())).collect()
}

pub(super) fn describe(origin: &Origin) -> String {
    match origin {
        Origin::Rule { name, widened: None } => format!("(rule `{name}`)"),
        Origin::Rule { name, widened: Some(why) } => format!("(rule `{name}`, widened: {why})"),
        Origin::Message => "(message)".into(),
    }
}

/// Totals over every suite: passed and failed tests.
pub fn totals(results: &[SuiteResult]) -> (usize, usize) {
    let ran: usize = results.iter().map(|s| s.cases.len()).sum();
    let failed: usize = results.iter().map(SuiteResult::failures).sum();
    (ran - failed, failed)
}

/// JUnit XML: a testsuite per file, a testcase per test, the failure report in each failure.
pub fn junit(results: &[SuiteResult]) -> String {
    use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
    let mut report = Report::new("walbust");
    report.set_time(results.iter().flat_map(|s| &s.cases).map(|c| c.duration).sum());
    for s in results.iter().filter(|s| !s.cases.is_empty()) {
        let file = s.file.display().to_string();
        let mut suite = TestSuite::new(file.as_str());
        suite.set_time(s.cases.iter().map(|c| c.duration).sum());
        for c in &s.cases {
            let status = if c.passed() {
                TestCaseStatus::success()
            } else {
                let failing = c.txs.iter().filter(|t| !t.passed()).count();
                let message = match (c.problems.first(), failing) {
                    (Some(p), _) => p.clone(),
                    (None, n) => format!("{n} of {} transactions produced other actions than expected", c.txs.len()),
                };
                let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
                status.set_message(message).set_type("mismatch").set_description(failure_report(&s.file, c));
                status
            };
            let mut case = TestCase::new(c.name.as_str(), status);
            case.set_classname(file.as_str()).set_time(c.duration);
            suite.add_test_case(case);
        }
        report.add_test_suite(suite);
    }
    report.to_string().expect("a JUnit report of strings serializes")
}

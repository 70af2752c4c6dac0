//! Recordings as `walbust test` inputs: a `[[test]]` with `recording` and `expect_file`
//! replays the recording through the test's rules and compares the report, byte for byte,
//! with the expected file (written by `walbust replay --rules ... FILE > FILE.expected`).

use crate::domain::rules::RuleSet;
use crate::domain::rules::manual::ManualPolicy;
use crate::input::user_file::{self, Kind};
use crate::offline::recording::format::RecordingError;
use crate::offline::recording::replay;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Most differing lines shown for one failing recording test.
const MAX_SHOWN: usize = 40;

/// A recording test, its files read and the recording checked.
#[derive(Debug, Clone)]
pub struct RecordingCase {
    /// The recording, as the test file names it.
    pub recording: PathBuf,
    /// The expected report, as the test file names it.
    pub expect_file: PathBuf,
    contents: Vec<u8>,
    expected: String,
}

/// Why a recording test cannot run: what is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// What is wrong, naming the file.
    pub message: String,
    /// What to do about it.
    pub hint: String,
}

impl RecordingCase {
    /// Reads both files (`dir` is the test file's directory) and checks the whole recording.
    pub fn load(dir: &Path, recording: &str, expect_file: &str) -> Result<Self, LoadError> {
        let read = |name: &str, kind: Kind| {
            user_file::read(&dir.join(name), kind).map_err(|e| LoadError {
                message: e.with_reason(),
                hint: "paths are relative to the test file's directory".into(),
            })
        };
        let contents = read(recording, Kind::Recording)?;
        let expected = read(expect_file, Kind::Expected)?;
        let expected = String::from_utf8(expected).map_err(|_| LoadError {
            message: format!("the expected output `{expect_file}` is not UTF-8 text"),
            hint: format!("write it with: walbust replay --rules RULES {recording} > {expect_file}"),
        })?;
        if let Err(e) = replay::validate(&contents[..]) {
            let (message, hint) = match &e {
                RecordingError::Line { line, message, hint } => {
                    (format!("{recording}:{line}: {message}"), hint.clone())
                }
                RecordingError::Read(e) => (format!("{recording}: {e}"), "check the file".into()),
            };
            return Err(LoadError { message: format!("the recording is malformed: {message}"), hint });
        }
        Ok(RecordingCase { recording: recording.into(), expect_file: expect_file.into(), contents, expected })
    }

    /// Replays the recording through `rules`; returns the problems (none when the report
    /// equals the expected output), each one line.
    pub fn run(&self, rules: Arc<RuleSet>, policy: &ManualPolicy) -> Vec<String> {
        let actual = match replay::replay_with_policy(&self.contents[..], rules, policy) {
            Ok(r) => r.render(),
            // Checked at load; reading from memory cannot fail otherwise.
            Err(e) => return vec![format!("replaying `{}` failed: {e}", self.recording.display())],
        };
        if actual == self.expected {
            return Vec::new();
        }
        let mut problems = vec![format!(
            "the replay of `{}` differs from `{}` (- expected, + actual):",
            self.recording.display(),
            self.expect_file.display()
        )];
        let lines = line_diff(&self.expected, &actual);
        let shown = lines.len().min(MAX_SHOWN);
        problems.extend(lines[..shown].iter().cloned());
        if lines.len() > shown {
            problems.push(format!("... and {} more differing lines", lines.len() - shown));
        }
        problems.push(format!(
            "if the new output is right, write it with: walbust replay --rules RULES {} > {}",
            self.recording.display(),
            self.expect_file.display()
        ));
        problems
    }
}

/// The lines that differ between `expected` and `actual`, marked `-` and `+`, in order.
pub fn line_diff(expected: &str, actual: &str) -> Vec<String> {
    similar::TextDiff::from_lines(expected, actual)
        .iter_all_changes()
        .filter_map(|change| {
            let mark = match change.tag() {
                similar::ChangeTag::Equal => return None,
                similar::ChangeTag::Delete => '-',
                similar::ChangeTag::Insert => '+',
            };
            Some(format!("{mark} {}", change.value().trim_end_matches(['\n', '\r'])))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offline::recording::format::{Header, Line, to_line};
    use crate::offline::ruletest;

    /// A directory with rules, a one-message recording, its report, and `t.test.toml`.
    fn suite(test: &str) -> (tempfile::TempDir, Result<ruletest::Suite, crate::domain::diagnostic::Diagnostics>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let rules = "[[rule]]\nname = \"t\"\ntable = \"t\"\nkeys = [\"t:{id}\"]\n";
        std::fs::write(dir.path().join("rules.toml"), rules).expect("rules");
        let header = Header {
            format: crate::offline::recording::FORMAT_VERSION,
            server_version: "15".into(),
            database: "d".into(),
            captured_at: "t".into(),
            publication: "p".into(),
            message_prefix: "walbust".into(),
            slot: "s".into(),
            start_lsn: crate::postgres::lsn::Lsn(1),
            relations: Vec::new(),
        };
        let message = r#"{"message":{"lsn":"0/2","prefix":"walbust","content":"{\"keys\":[\"a\"]}"}}"#;
        let recording = format!("{}\n{message}\n", to_line(&Line::Header(header)));
        std::fs::write(dir.path().join("r.jsonl"), &recording).expect("recording");
        let set = Arc::new(RuleSet::load(&[dir.path().join("rules.toml").display().to_string()]).expect("rules").rules);
        let report = replay::replay(recording.as_bytes(), set).expect("replay").render();
        std::fs::write(dir.path().join("r.expected"), report).expect("report");
        let path = dir.path().join("t.test.toml");
        let text = format!("rules = [\"rules.toml\"]\n[[test]]\nname = \"rec\"\n{test}");
        let parsed = ruletest::parse(&path, &text);
        (dir, parsed)
    }

    #[test]
    fn a_recording_test_passes_when_the_report_matches_and_shows_the_diff_when_not() {
        let test = "recording = \"r.jsonl\"\nexpect_file = \"r.expected\"\n";
        let (dir, parsed) = suite(test);
        assert!(parsed.unwrap_or_else(|d| panic!("{d}")).cases[0].run().passed());
        let expected = std::fs::read_to_string(dir.path().join("r.expected")).expect("report");
        std::fs::write(dir.path().join("r.expected"), expected.replace("UNLINK a", "UNLINK b")).expect("write");
        let text = format!("rules = [\"rules.toml\"]\n[[test]]\nname = \"rec\"\n{test}");
        let result =
            ruletest::parse(&dir.path().join("t.test.toml"), &text).unwrap_or_else(|d| panic!("{d}")).cases[0].run();
        assert!(!result.passed());
        assert!(
            result.problems[0].starts_with("the replay of `r.jsonl` differs from `r.expected`"),
            "{:?}",
            result.problems
        );
        assert!(result.problems.contains(&"-   UNLINK b".to_string()), "{:?}", result.problems);
        assert!(result.problems.contains(&"+   UNLINK a".to_string()), "{:?}", result.problems);
    }

    #[test]
    fn a_recording_test_needs_both_files_and_no_transactions() {
        let errors = |test: &str| {
            let (_dir, parsed) = suite(test);
            parsed.expect_err("rejected").errors().map(|d| d.message.clone()).collect::<Vec<_>>().join("\n")
        };
        assert!(errors("recording = \"r.jsonl\"\n").contains("needs both `recording` and `expect_file`"));
        let with_tx = "recording = \"r.jsonl\"\nexpect_file = \"r.expected\"\n[[test.tx]]\nchanges = [{ message = { keys = [\"a\"] } }]\nexpect = []\n";
        assert!(errors(with_tx).contains("also lists transactions or tables"));
        assert!(
            errors("recording = \"nope.jsonl\"\nexpect_file = \"r.expected\"\n").contains("cannot read recording ")
        );
    }

    #[test]
    fn the_diff_marks_only_changed_lines() {
        let d = line_diff("a\nb\nc\nd\n", "a\nc\nx\nd\n");
        assert_eq!(d, ["- b", "+ x"]);
        assert!(line_diff("same\n", "same\n").is_empty());
        assert_eq!(line_diff("", "new\n"), ["+ new"]);
    }
}

//! `walbust test`: rule tests in `*.test.toml` files, run through the production router.

use super::{CliError, Outcome};
use anyhow::anyhow;
use std::path::{Path, PathBuf};
use walbust::domain::diagnostic::plural;
use walbust::errors::exit;
use walbust::offline::ruletest::{self, SuiteResult};

/// Runs the tests in `files` (directories are searched for `*.test.toml`) whose names match
/// `run`, prints one line per test and a diff per failure, writes JUnit XML to `junit` when
/// asked, and returns the exit code: 0 all passed, 1 a test failed, 2 a usage or file error.
pub fn test(files: &[PathBuf], run: Option<&str>, junit: Option<&Path>, config: Option<&Path>) -> Outcome {
    let policy = super::manual_policy(config)?;
    let filter = run.map(regex::Regex::new).transpose().map_err(|e| {
        CliError::usage(anyhow::Error::new(e).context(format!("invalid --run regex `{}`", run.unwrap_or_default())))
            .hint("--run takes a regular expression searched for in test names, as in --run 'reset|defaults'")
    })?;
    let loaded = ruletest::discover(files).and_then(|paths| ruletest::load(&paths)).map_err(|problems| {
        eprintln!("{problems}");
        let errors = problems.errors().count();
        CliError::usage(anyhow!(
            "{errors} problem{} in test or rule files; no test was run",
            if errors == 1 { "" } else { "s" }
        ))
    })?;
    if !loaded.warnings.0.is_empty() {
        eprintln!("{}", loaded.warnings);
    }
    let results = ruletest::run(&loaded.suites, &policy, |name| filter.as_ref().is_none_or(|r| r.is_match(name)));
    let (passed, failed) = ruletest::totals(&results);
    let total: usize = loaded.suites.iter().map(|s| s.cases.len()).sum();
    if passed + failed == 0 {
        return Err(match run {
            Some(r) => CliError::usage(anyhow!(
                "no test name matches --run `{r}` ({} in all)",
                plural(total as u64, "test", "tests")
            ))
            .hint("--run is a regular expression searched for in test names; leave it out to run every test"),
            None => CliError::usage(anyhow!("the test files hold no tests")),
        });
    }
    print_results(&results);
    let skipped = total - passed - failed;
    if skipped > 0 {
        println!("{passed} passed, {failed} failed ({skipped} not matching --run)");
    } else {
        println!("{passed} passed, {failed} failed");
    }
    if let Some(path) = junit
        && let Err(e) = std::fs::write(path, ruletest::junit(&results))
    {
        let error = anyhow::Error::new(e).context(format!("cannot write the JUnit report `{}`", path.display()));
        return Err(CliError::usage(error).hint("check that its directory exists and is writable"));
    }
    Ok(if failed > 0 { exit::FAILED } else { exit::OK })
}

fn print_results(results: &[SuiteResult]) {
    for suite in results.iter().filter(|s| !s.cases.is_empty()) {
        println!("{}", suite.file.display());
        for case in &suite.cases {
            if case.passed() {
                println!("ok   {}", case.name);
            } else {
                println!("FAIL {}", case.name);
                print!("{}", ruletest::failure_report(&suite.file, case));
            }
        }
    }
}

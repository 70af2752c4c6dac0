//! `walbust test`: rule tests in `*.test.toml` files, run through the production router.

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use std::path::{Path, PathBuf};
use walbust::diagnostic::plural;
use walbust::ruletest::{self, SuiteResult};

/// Runs the tests in `files` (directories are searched for `*.test.toml`) whose names match
/// `run`, prints one line per test and a diff per failure, writes JUnit XML to `junit` when
/// asked, and returns the exit code: 0 all passed, 1 a test failed, 2 a usage or file error.
pub fn test(files: &[PathBuf], run: Option<&str>, junit: Option<&Path>) -> u8 {
    let filter = match run.map(regex::Regex::new).transpose() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: invalid --run regex `{}`: {e}", run.unwrap_or_default());
            eprintln!(
                "  hint: --run takes a regular expression searched for in test names, as in --run 'reset|defaults'"
            );
            return EXIT_USAGE;
        }
    };
    let loaded = match ruletest::discover(files).and_then(|paths| ruletest::load(&paths)) {
        Ok(l) => l,
        Err(problems) => {
            eprintln!("{problems}");
            let errors = problems.errors().count();
            eprintln!(
                "error: {errors} problem{} in test or rule files; no test was run",
                if errors == 1 { "" } else { "s" }
            );
            return EXIT_USAGE;
        }
    };
    if !loaded.warnings.0.is_empty() {
        eprintln!("{}", loaded.warnings);
    }
    let results = ruletest::run(&loaded.suites, |name| filter.as_ref().is_none_or(|r| r.is_match(name)));
    let (passed, failed) = ruletest::totals(&results);
    let total: usize = loaded.suites.iter().map(|s| s.cases.len()).sum();
    if passed + failed == 0 {
        match run {
            Some(r) => {
                eprintln!("error: no test name matches --run `{r}` ({} in all)", plural(total as u64, "test", "tests"));
                eprintln!(
                    "  hint: --run is a regular expression searched for in test names; leave it out to run every test"
                );
            }
            None => eprintln!("error: the test files hold no tests"),
        }
        return EXIT_USAGE;
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
        eprintln!("error: cannot write the JUnit report `{}`: {e}", path.display());
        eprintln!("  hint: check that its directory exists and is writable");
        return EXIT_USAGE;
    }
    if failed > 0 { EXIT_FAILED } else { EXIT_OK }
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

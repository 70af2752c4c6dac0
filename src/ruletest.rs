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

use crate::action::Action;
use crate::batch::Batch;
use crate::diagnostic::{self, Diagnostic, Diagnostics, LineIndex, did_you_mean};
use crate::lsn::Lsn;
use crate::pgoutput::{Column, OldTuple, Relation, ReplicaIdentity, Tuple, Value};
use crate::recording::expected::RecordingCase;
use crate::routing::{Routing, Tally};
use crate::rules::manual::ManualError;
use crate::rules::{Change, Op, Routed, RuleSet, TableName, Widening};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use toml::Spanned;

pub use crate::rules::TEST_SUFFIX as SUFFIX;
use crate::value_text::{NULL, TOAST};

/// The first OID given to test tables, as Postgres gives the first user objects.
const FIRST_OID: u32 = 16384;

/// Type OIDs by the names a test file may give in `types`.
const TYPES: &[(&str, u32)] = &[
    ("bool", 16),
    ("boolean", 16),
    ("bytea", 17),
    ("int8", 20),
    ("bigint", 20),
    ("int2", 21),
    ("smallint", 21),
    ("int4", 23),
    ("int", 23),
    ("integer", 23),
    ("text", 25),
    ("oid", 26),
    ("json", 114),
    ("float4", 700),
    ("real", 700),
    ("float8", 701),
    ("double precision", 701),
    ("varchar", 1043),
    ("date", 1082),
    ("timestamp", 1114),
    ("timestamptz", 1184),
    ("numeric", 1700),
    ("decimal", 1700),
    ("uuid", 2950),
    ("jsonb", 3802),
];
const TEXT_OID: u32 = 25;
const INT8_OID: u32 = 20;
const BOOL_OID: u32 = 16;

// ---------------------------------------------------------------------------------------
// The serde shape of a test file.

type Image = BTreeMap<Spanned<String>, Spanned<toml::Value>>;
type Names = Spanned<Vec<Spanned<String>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rules: Option<Names>,
    #[serde(default)]
    tables: Vec<Spanned<RawTable>>,
    #[serde(default)]
    test: Vec<Spanned<RawTest>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    name: Spanned<String>,
    #[serde(default)]
    rules: Option<Names>,
    #[serde(default)]
    tables: Vec<Spanned<RawTable>>,
    #[serde(default)]
    tx: Vec<Spanned<RawTx>>,
    /// A recording to replay instead of `tx`, relative to the test file.
    #[serde(default)]
    recording: Option<Spanned<String>>,
    /// The expected `walbust replay` output for `recording`.
    #[serde(default)]
    expect_file: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    table: Spanned<String>,
    #[serde(default)]
    columns: Option<Names>,
    #[serde(default)]
    key: Option<Names>,
    #[serde(default)]
    identity: Option<Spanned<String>>,
    #[serde(default)]
    types: Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTx {
    changes: Spanned<Vec<Spanned<RawChange>>>,
    expect: Spanned<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChange {
    #[serde(default)]
    table: Option<Spanned<String>>,
    #[serde(default)]
    op: Option<Spanned<String>>,
    #[serde(default)]
    old: Option<Spanned<Image>>,
    #[serde(default)]
    new: Option<Spanned<Image>>,
    #[serde(default)]
    message: Option<Spanned<toml::Value>>,
}

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

/// The test files named by `paths`: files as given, directories searched (recursively)
/// for `*.test.toml`, each directory's files sorted.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Diagnostics> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found = Vec::new();
            if let Err(e) = walk(path, &mut found) {
                problems.push(Diagnostic::error(path, "", None, format!("cannot read directory: {e}")));
                continue;
            }
            if found.is_empty() {
                problems.push(
                    Diagnostic::error(path, "", None, format!("no `*{SUFFIX}` files under `{}`", path.display()))
                        .with_hint(format!("name test files like `settings{SUFFIX}`, or pass the files themselves")),
                );
            }
            found.sort();
            files.extend(found);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            problems.push(
                Diagnostic::error(path, "", None, format!("no such test file or directory `{}`", path.display()))
                    .with_hint("pass test files or directories holding `*.test.toml` files"),
            );
        }
    }
    let mut seen = BTreeSet::new();
    files.retain(|f| seen.insert(f.clone()));
    if problems.is_empty() { Ok(files) } else { Err(Diagnostics(problems)) }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(SUFFIX)) {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads and validates every test file and the rule files they name, collecting every
/// problem before failing.
pub fn load(files: &[PathBuf]) -> Result<Loaded, Diagnostics> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut rule_sets = RuleCache::default();
    let mut suites = Vec::new();
    for file in files {
        match crate::user_file::read_to_string(file, crate::user_file::Kind::RuleTest) {
            Ok(text) => {
                if let Some(suite) = parse_file(file, &text, &mut rule_sets, &mut problems) {
                    suites.push(suite);
                }
            }
            Err(e) => problems.push(
                Diagnostic::error(file, "", None, e.with_reason()).with_hint("check the path and its permissions"),
            ),
        }
    }
    for d in rule_sets.diagnostics {
        let list = if d.is_error() { &mut problems } else { &mut warnings };
        if !list.contains(&d) {
            list.push(d);
        }
    }
    if problems.iter().any(Diagnostic::is_error) {
        problems.extend(warnings);
        return Err(Diagnostics(problems));
    }
    Ok(Loaded { suites, warnings: Diagnostics(warnings) })
}

/// Validates the test file `path` whose contents are `text`, loading the rule files it names.
pub fn parse(path: &Path, text: &str) -> Result<Suite, Diagnostics> {
    let mut problems = Vec::new();
    let mut rule_sets = RuleCache::default();
    let suite = parse_file(path, text, &mut rule_sets, &mut problems);
    problems.extend(rule_sets.diagnostics.into_iter().filter(Diagnostic::is_error));
    match suite {
        Some(s) if problems.is_empty() => Ok(s),
        _ => Err(Diagnostics(problems)),
    }
}

/// Rule sets already loaded, by their resolved globs: tests of one file usually share one.
#[derive(Default)]
struct RuleCache {
    sets: HashMap<Vec<String>, Option<Arc<RuleSet>>>,
    diagnostics: Vec<Diagnostic>,
}

impl RuleCache {
    fn get(&mut self, globs: Vec<String>) -> Option<Arc<RuleSet>> {
        if let Some(set) = self.sets.get(&globs) {
            return set.clone();
        }
        let set = match RuleSet::load(&globs) {
            Ok(loaded) => {
                self.diagnostics.extend(loaded.warnings.0);
                Some(Arc::new(loaded.rules))
            }
            Err(d) => {
                self.diagnostics.extend(d.0);
                None
            }
        };
        self.sets.insert(globs, set.clone());
        set
    }
}

fn parse_file(path: &Path, text: &str, rule_sets: &mut RuleCache, problems: &mut Vec<Diagnostic>) -> Option<Suite> {
    let raw: RawFile = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            problems.push(diagnostic::from_toml(path, text, &e));
            return None;
        }
    };
    let lines = LineIndex::new(text);
    let mut v = Validator { path, lines: &lines, problems, failed: false };
    if raw.test.is_empty() {
        v.error(
            0..0,
            "test file holds no tests".into(),
            "add a [[test]] table with name, [[test.tx]] changes and expect",
        );
    }
    let file_tables = v.declarations(&raw.tables);
    let file_rules = raw.rules.as_ref().map(|g| v.globs(g));
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut cases = Vec::new();
    for test in &raw.test {
        let line = v.line(test.span().start);
        let name = test.get_ref().name.get_ref().trim().to_string();
        if name.is_empty() {
            v.error(test.get_ref().name.span(), "test name is empty".into(), "give every test a short unique name");
        } else if let Some(first) = names.get(&name) {
            v.error(
                test.get_ref().name.span(),
                format!("duplicate test name `{name}`"),
                format!("the name is already used on line {first}; test names must be unique within a file"),
            );
        }
        names.insert(name.clone(), line);
        if let Some(case) = v.case(test.get_ref(), name, line, file_rules.as_ref(), &file_tables, rule_sets) {
            cases.push(case);
        }
    }
    if v.failed { None } else { Some(Suite { file: path.to_path_buf(), cases }) }
}

/// A `[[tables]]` entry, checked but not yet completed with the columns changes use.
#[derive(Debug, Clone)]
struct Declared {
    name: TableName,
    columns: Option<Vec<String>>,
    key: Vec<String>,
    identity: ReplicaIdentity,
    types: BTreeMap<String, u32>,
}

struct Validator<'a> {
    path: &'a Path,
    lines: &'a LineIndex<'a>,
    problems: &'a mut Vec<Diagnostic>,
    failed: bool,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, message: String, hint: impl Into<String>) {
        self.failed = true;
        self.problems.push(Diagnostic::error_in(self.path, self.lines, Some(span), message).with_hint(hint));
    }

    fn line(&self, at: usize) -> usize {
        self.lines.line_col(at).0
    }

    fn table_name(&mut self, raw: &Spanned<String>) -> Option<TableName> {
        match TableName::parse(raw.get_ref()) {
            Ok(t) => Some(t),
            Err(why) => {
                self.error(
                    raw.span(),
                    format!("invalid table `{}`: {why}", raw.get_ref()),
                    "write schema.table, or a bare table name for the public schema",
                );
                None
            }
        }
    }

    /// Checks `[[tables]]` entries; a table declared twice at one level is an error.
    fn declarations(&mut self, raw: &[Spanned<RawTable>]) -> Vec<Declared> {
        let mut out: Vec<Declared> = Vec::new();
        for t in raw {
            let Some(d) = self.declaration(t.get_ref()) else { continue };
            if out.iter().any(|o| o.name == d.name) {
                self.error(
                    t.get_ref().table.span(),
                    format!("table `{}` is declared twice", d.name),
                    "declare each table once; a test's [[test.tables]] replaces a file-level declaration",
                );
                continue;
            }
            out.push(d);
        }
        out
    }

    fn declaration(&mut self, raw: &RawTable) -> Option<Declared> {
        let name = self.table_name(&raw.table)?;
        let identity = match &raw.identity {
            None => ReplicaIdentity::Full,
            Some(s) => match s.get_ref().as_str() {
                "full" => ReplicaIdentity::Full,
                "default" => ReplicaIdentity::Default,
                "index" => ReplicaIdentity::Index,
                "nothing" => ReplicaIdentity::Nothing,
                other => {
                    let hint = match did_you_mean(other, ["default", "full", "nothing", "index"]) {
                        Some(m) => format!("did you mean `{m}`?"),
                        None => "use default, full, nothing or index, as in ALTER TABLE ... REPLICA IDENTITY".into(),
                    };
                    self.error(s.span(), format!("unknown replica identity `{other}` for table `{name}`"), hint);
                    return None;
                }
            },
        };
        let columns = raw.columns.as_ref().map(|c| {
            let mut seen = Vec::new();
            for col in c.get_ref() {
                if seen.contains(col.get_ref()) {
                    self.error(
                        col.span(),
                        format!("column `{}` listed twice for table `{name}`", col.get_ref()),
                        "list each column once",
                    );
                } else {
                    seen.push(col.get_ref().clone());
                }
            }
            if seen.is_empty() {
                self.error(
                    c.span(),
                    format!("`columns = []` for table `{name}` declares no column"),
                    "list the columns, or remove `columns` to infer them from the changes",
                );
            }
            seen
        });
        let known = |this: &mut Self, col: &Spanned<String>, what: &str| {
            if let Some(cols) = &columns
                && !cols.contains(col.get_ref())
            {
                let hint = match did_you_mean(col.get_ref(), cols.iter().map(String::as_str)) {
                    Some(m) => format!("did you mean `{m}`?"),
                    None => format!("add it to `columns`, which are: {}", cols.join(", ")),
                };
                this.error(col.span(), format!("{what} `{}` is not a column of table `{name}`", col.get_ref()), hint);
            }
        };
        let key: Vec<String> = match &raw.key {
            None => Vec::new(),
            Some(k) => {
                for col in k.get_ref() {
                    known(self, col, "key column");
                }
                k.get_ref().iter().map(|c| c.get_ref().clone()).collect()
            }
        };
        match (identity, &raw.key) {
            (ReplicaIdentity::Default | ReplicaIdentity::Index, None) => {
                self.error(
                    raw.table.span(),
                    format!("table `{name}` has identity default or index but no `key`"),
                    "list the replica identity key columns (the primary key, or the index's columns): key = [\"id\"]",
                );
            }
            (ReplicaIdentity::Default | ReplicaIdentity::Index, Some(k)) if k.get_ref().is_empty() => {
                self.error(k.span(), format!("`key = []` for table `{name}`"), "list the key columns");
            }
            (ReplicaIdentity::Full | ReplicaIdentity::Nothing, Some(k)) => {
                self.error(
                    k.span(),
                    format!("`key` has no effect for table `{name}`, whose identity is not default or index"),
                    "under identity full Postgres marks every column as key, under nothing none; remove `key` or set identity = \"default\"",
                );
            }
            _ => {}
        }
        let mut types = BTreeMap::new();
        if let Some(t) = &raw.types {
            for (col, ty) in t.get_ref() {
                known(self, col, "typed column");
                match TYPES.iter().find(|(n, _)| *n == ty.get_ref().as_str()) {
                    Some((_, oid)) => {
                        types.insert(col.get_ref().clone(), *oid);
                    }
                    None => {
                        let hint = match did_you_mean(ty.get_ref(), TYPES.iter().map(|(n, _)| *n)) {
                            Some(m) => format!("did you mean `{m}`?"),
                            None => "types matter only to refresh JSON: use bool, int2, int4, int8, numeric, float8, json, jsonb or text".into(),
                        };
                        self.error(
                            ty.span(),
                            format!("unknown type `{}` for column `{}`", ty.get_ref(), col.get_ref()),
                            hint,
                        );
                    }
                }
            }
        }
        Some(Declared { name, columns, key, identity, types })
    }

    fn case(
        &mut self,
        raw: &RawTest,
        name: String,
        line: usize,
        file_rules: Option<&Option<Vec<String>>>,
        file_tables: &[Declared],
        rule_sets: &mut RuleCache,
    ) -> Option<Case> {
        let failed_before = self.failed;
        self.failed = false;
        let globs = match (&raw.rules, file_rules) {
            (Some(own), _) => self.globs(own),
            (None, Some(file)) => {
                // Problems with the file-level list were reported once, where it is written.
                self.failed |= file.is_none();
                file.clone()
            }
            (None, None) => {
                self.error(
                    raw.name.span(),
                    format!("test `{name}` names no rule files"),
                    "add rules = [\"settings.toml\"] to the test, or once at the top of the file for every test",
                );
                None
            }
        };
        let rules = globs.and_then(|g| self.rules(g, rule_sets));
        if raw.recording.is_some() || raw.expect_file.is_some() {
            let case = self.recording_case(raw, name, line, rules);
            self.failed |= failed_before;
            return case;
        }
        let mut declared: Vec<Declared> = file_tables.to_vec();
        for d in self.declarations(&raw.tables) {
            declared.retain(|f| f.name != d.name);
            declared.push(d);
        }
        if raw.tx.is_empty() {
            self.error(
                raw.name.span(),
                format!("test `{name}` has no transactions"),
                "add a [[test.tx]] with changes and expect",
            );
        }
        let mut tables = TableBuilder { declared, used: Vec::new() };
        let mut raw_txs = Vec::new();
        for tx in &raw.tx {
            let mut steps = Vec::new();
            let tx = tx.get_ref();
            if tx.changes.get_ref().is_empty() {
                self.error(
                    tx.changes.span(),
                    "`changes = []`: a transaction without changes".into(),
                    "list at least one change or message",
                );
            }
            for change in tx.changes.get_ref() {
                if let Some(step) = self.change(change, &mut tables) {
                    steps.push(step);
                }
            }
            let expect = self.expectations(&tx.expect);
            raw_txs.push((self.line(tx.changes.span().start), steps, expect));
        }
        let result = match rules {
            Some(rules) if !self.failed => {
                let tables = self.relations(tables, &rules);
                let txs = raw_txs
                    .into_iter()
                    .map(|(line, steps, expect)| Tx {
                        line,
                        steps: steps.into_iter().map(|s| s.finish(&tables)).collect(),
                        expect,
                    })
                    .collect();
                Some(Case { name, line, rules, tables, txs, recording: None })
            }
            _ => None,
        };
        self.failed |= failed_before;
        result
    }

    /// A test replaying a recording: `recording` and `expect_file`, and no `tx` or `tables`.
    fn recording_case(
        &mut self,
        raw: &RawTest,
        name: String,
        line: usize,
        rules: Option<Arc<RuleSet>>,
    ) -> Option<Case> {
        let (Some(recording), Some(expect_file)) = (&raw.recording, &raw.expect_file) else {
            let at = raw.recording.as_ref().or(raw.expect_file.as_ref()).map_or(raw.name.span(), Spanned::span);
            self.error(
                at,
                format!("test `{name}` needs both `recording` and `expect_file`"),
                "write the expected output with: walbust replay --rules RULES FILE.jsonl > FILE.expected",
            );
            return None;
        };
        if !raw.tx.is_empty() || !raw.tables.is_empty() {
            self.error(
                recording.span(),
                format!("test `{name}` replays a recording and also lists transactions or tables"),
                "a test either replays a recording or lists [[test.tx]]; split it in two",
            );
            return None;
        }
        let dir = self.path.parent().unwrap_or(Path::new(""));
        match RecordingCase::load(dir, recording.get_ref(), expect_file.get_ref()) {
            Ok(r) if !self.failed => {
                Some(Case { name, line, rules: rules?, tables: Vec::new(), txs: Vec::new(), recording: Some(r) })
            }
            Ok(_) => None,
            Err(e) => {
                self.error(recording.span(), e.message, e.hint);
                None
            }
        }
    }

    /// Resolves `rules` globs against the test file's directory; `None` after reporting a problem.
    fn globs(&mut self, globs: &Names) -> Option<Vec<String>> {
        if globs.get_ref().is_empty() {
            self.error(
                globs.span(),
                "`rules = []` names no rule files".into(),
                "list rule files, as in rules = [\"settings.toml\"]",
            );
            return None;
        }
        let failed_before = std::mem::replace(&mut self.failed, false);
        let dir = self.path.parent().map(|p| glob::Pattern::escape(&p.to_string_lossy())).unwrap_or_default();
        let mut resolved = Vec::new();
        for g in globs.get_ref() {
            let full = if dir.is_empty() || Path::new(g.get_ref()).is_absolute() {
                g.get_ref().clone()
            } else {
                format!("{dir}/{}", g.get_ref())
            };
            let matched = glob::glob(&full).map(|paths| paths.filter_map(Result::ok).any(|p| p.is_file()));
            match matched {
                Ok(true) => resolved.push(full),
                Ok(false) => self.error(
                    g.span(),
                    format!("rules glob `{}` matches no files", g.get_ref()),
                    format!("globs are relative to the test file's directory; this one looked for `{full}`"),
                ),
                Err(e) => self.error(
                    g.span(),
                    format!("invalid rules glob `{}`: {}", g.get_ref(), e.msg),
                    "write a glob such as `*.toml` or a file name",
                ),
            }
        }
        let ok = !self.failed;
        self.failed |= failed_before;
        ok.then_some(resolved)
    }

    fn rules(&mut self, resolved: Vec<String>, rule_sets: &mut RuleCache) -> Option<Arc<RuleSet>> {
        let set = rule_sets.get(resolved);
        if set.is_none() {
            // The rule files' own diagnostics say what is wrong; the test only fails with them.
            self.failed = true;
        }
        set
    }

    fn change(&mut self, raw: &Spanned<RawChange>, tables: &mut TableBuilder) -> Option<PendingStep> {
        let span = raw.span();
        let c = raw.get_ref();
        if let Some(message) = &c.message {
            for (present, field) in [
                (c.table.is_some(), "table"),
                (c.op.is_some(), "op"),
                (c.old.is_some(), "old"),
                (c.new.is_some(), "new"),
            ] {
                if present {
                    self.error(
                        span.clone(),
                        format!("a message change cannot have `{field}`"),
                        "write a row change { table, op, old, new } and a message { message = {...} } as two entries",
                    );
                    return None;
                }
            }
            let body = match message.get_ref() {
                toml::Value::String(s) => s.clone().into_bytes(),
                v @ toml::Value::Table(_) => match serde_json::to_vec(v) {
                    Ok(b) => b,
                    Err(e) => {
                        self.error(
                            message.span(),
                            format!("message cannot be written as JSON: {e}"),
                            "use lists of strings under keys, patterns and tags",
                        );
                        return None;
                    }
                },
                _ => {
                    self.error(
                        message.span(),
                        "a message is a table or a JSON string".into(),
                        "write message = { keys = [\"admin:defaults\"] }, or message = '{\"keys\":[\"admin:defaults\"]}' for a raw body",
                    );
                    return None;
                }
            };
            return Some(PendingStep::Message { line: self.line(span.start), body });
        }
        let (Some(table), Some(op)) = (&c.table, &c.op) else {
            self.error(
                span,
                "a change needs `table` and `op`, or `message`".into(),
                "write { table = \"users\", op = \"insert\", new = { id = 1 } }, or { message = { keys = [...] } }",
            );
            return None;
        };
        let name = self.table_name(table)?;
        let Some(op_value) = Op::ALL.into_iter().find(|o| o.as_str() == op.get_ref()) else {
            let names = Op::ALL.map(Op::as_str);
            let hint = match did_you_mean(op.get_ref(), names) {
                Some(m) => format!("did you mean `{m}`?"),
                None => format!("use one of {}", names.join(", ")),
            };
            self.error(op.span(), format!("unknown op `{}`", op.get_ref()), hint);
            return None;
        };
        let op = op_value;
        // Whether each image is required (Some(true)), forbidden (Some(false)) or optional.
        let (old_rule, new_rule) = match op {
            Op::Insert => (Some(false), Some(true)),
            Op::Update => (None, Some(true)),
            Op::Delete => (Some(true), Some(false)),
            Op::Truncate => (Some(false), Some(false)),
        };
        for (image, rule, field) in [(&c.old, old_rule, "old"), (&c.new, new_rule, "new")] {
            match (image.is_some(), rule) {
                (true, Some(false)) => {
                    let at = image.as_ref().map_or(span.clone(), Spanned::span);
                    self.error(
                        at,
                        format!("{op} of `{}` has no {field} row, but the change gives `{field}`", table.get_ref()),
                        "insert takes `new`, update `new` and maybe `old`, delete `old`, truncate neither",
                    );
                    return None;
                }
                (false, Some(true)) => {
                    self.error(
                        span.clone(),
                        format!(
                            "{op} of `{}` needs its {field} row, but the change gives no `{field}`",
                            table.get_ref()
                        ),
                        format!("add {field} = {{ ... }} with the row's values"),
                    );
                    return None;
                }
                _ => {}
            }
        }
        let index = tables.use_table(&name);
        let identity = tables.declared(&name).map_or(ReplicaIdentity::Full, |d| d.identity);
        let key = tables.declared(&name).map(|d| d.key.clone()).unwrap_or_default();
        match (identity, op, &c.old) {
            (ReplicaIdentity::Nothing, Op::Update | Op::Delete, _) => {
                self.error(
                    span,
                    format!("table `{name}` has identity nothing, and Postgres refuses to {op} its rows while a publication publishes {op}s"),
                    "give the table identity default (with key) or full",
                );
                return None;
            }
            (ReplicaIdentity::Full, Op::Update, None) => {
                self.error(
                    span,
                    format!(
                        "an update of `{name}` under identity full always carries the old row; this one has no `old`"
                    ),
                    "add old = { ... }, or declare the table with identity = \"default\" and its key in [[tables]]",
                );
                return None;
            }
            _ => {}
        }
        let old = c.old.as_ref().and_then(|img| self.image(img, &name, identity, &key, true, tables, index));
        let new = c.new.as_ref().and_then(|img| self.image(img, &name, identity, &key, false, tables, index));
        if (c.old.is_some() && old.is_none()) || (c.new.is_some() && new.is_none()) {
            return None;
        }
        Some(PendingStep::Row { table: index, op, old, new })
    }

    /// Reads one row image: values as text, `@null`, `@toast`; checks its columns.
    #[allow(clippy::too_many_arguments)]
    fn image(
        &mut self,
        raw: &Spanned<Image>,
        table: &TableName,
        identity: ReplicaIdentity,
        key: &[String],
        is_old: bool,
        tables: &mut TableBuilder,
        index: usize,
    ) -> Option<Vec<(String, Value)>> {
        let mut out = Vec::new();
        let keyed = is_old && matches!(identity, ReplicaIdentity::Default | ReplicaIdentity::Index);
        let declared = tables.declared(table).cloned();
        let mut ok = true;
        for (col, value) in raw.get_ref() {
            if let Some(cols) = declared.as_ref().and_then(|d| d.columns.as_ref())
                && !cols.contains(col.get_ref())
            {
                let hint = match did_you_mean(col.get_ref(), cols.iter().map(String::as_str)) {
                    Some(m) => format!("did you mean `{m}`?"),
                    None => format!("the declared columns are: {}", cols.join(", ")),
                };
                self.error(col.span(), format!("unknown column `{}` in a change of `{table}`", col.get_ref()), hint);
                ok = false;
                continue;
            }
            if keyed && !key.contains(col.get_ref()) {
                self.error(
                    col.span(),
                    format!("old row of `{table}` gives `{}`, but under identity {} Postgres sends only the key columns ({})", col.get_ref(), identity_name(identity), key.join(", ")),
                    "remove it from `old`, or declare identity = \"full\" to test with whole old rows",
                );
                ok = false;
                continue;
            }
            match cell(value.get_ref()) {
                Ok(v) => {
                    tables.note(index, col.get_ref(), value.get_ref());
                    out.push((col.get_ref().clone(), v));
                }
                Err((message, hint)) => {
                    self.error(
                        value.span(),
                        format!("unsupported {message} for column `{}` of `{table}`", col.get_ref()),
                        hint,
                    );
                    ok = false;
                }
            }
        }
        if keyed {
            let given: Vec<&String> = raw.get_ref().keys().map(Spanned::get_ref).collect();
            let missing: Vec<&str> = key.iter().filter(|k| !given.contains(k)).map(String::as_str).collect();
            if !missing.is_empty() {
                self.error(
                    raw.span(),
                    format!(
                        "old row of `{table}` lacks key column `{}`; Postgres always sends every key column",
                        missing.join("`, `")
                    ),
                    format!("give every key column in `old`: {}", key.join(", ")),
                );
                ok = false;
            }
        }
        ok.then_some(out)
    }

    fn expectations(&mut self, raw: &Spanned<Vec<Spanned<String>>>) -> Vec<Action> {
        let mut out: Vec<Action> = Vec::new();
        for line in raw.get_ref() {
            match Action::parse(line.get_ref()) {
                Ok(a) if out.contains(&a) => self.error(
                    line.span(),
                    format!("expectation `{}` is listed twice", line.get_ref()),
                    "actions are deduplicated, as in a batch; list each once",
                ),
                Ok(a) => out.push(a),
                Err(e) => self.error(
                    line.span(),
                    format!("invalid expectation `{}`: {e}", line.get_ref()),
                    "write the canonical form, as in \"UNLINK user:7\", \"SCAN-UNLINK plans_*\", \"BUST-TAG idx:1\" or \"PUBLISH chan message\"",
                ),
            }
        }
        out
    }

    /// Completes every used or declared table into a relation, OIDs by order.
    fn relations(&mut self, builder: TableBuilder, rules: &RuleSet) -> Vec<TestTable> {
        let TableBuilder { declared, used } = builder;
        let mut out = Vec::new();
        for (n, used) in used.into_iter().enumerate() {
            let decl = declared.iter().find(|d| d.name == used.name);
            let identity = decl.map_or(ReplicaIdentity::Full, |d| d.identity);
            let key: &[String] = decl.map_or(&[], |d| &d.key);
            let names: Vec<String> = match decl.and_then(|d| d.columns.clone()) {
                Some(cols) => cols,
                None => {
                    // Inferred: key columns, the columns the changes give, and those the rules read.
                    let mut cols: Vec<String> = key.to_vec();
                    let mut add = |c: &str| {
                        if !cols.iter().any(|x| x == c) {
                            cols.push(c.to_string());
                        }
                    };
                    decl.into_iter().flat_map(|d| d.types.keys()).for_each(|c| add(c));
                    used.seen.iter().for_each(|(c, _)| add(c));
                    rules.for_table(&used.name).iter().flat_map(|r| r.columns.iter()).for_each(|c| add(&c.name));
                    cols
                }
            };
            let columns = names
                .iter()
                .map(|c| Column {
                    key: match identity {
                        ReplicaIdentity::Full => true,
                        ReplicaIdentity::Nothing => false,
                        ReplicaIdentity::Default | ReplicaIdentity::Index => key.contains(c),
                    },
                    name: c.clone(),
                    type_oid: decl
                        .and_then(|d| d.types.get(c).copied())
                        .or_else(|| used.seen.iter().find(|(s, _)| s == c).map(|(_, t)| *t))
                        .unwrap_or(TEXT_OID),
                    type_modifier: -1,
                })
                .collect();
            out.push(TestTable {
                relation: Relation {
                    xid: None,
                    oid: FIRST_OID + n as u32,
                    namespace: used.name.schema.clone(),
                    name: used.name.table.clone(),
                    replica_identity: identity,
                    columns,
                },
                declared: decl.is_some_and(|d| d.columns.is_some()),
            });
        }
        out
    }
}

fn identity_name(identity: ReplicaIdentity) -> &'static str {
    match identity {
        ReplicaIdentity::Default => "default",
        ReplicaIdentity::Full => "full",
        ReplicaIdentity::Index => "index",
        ReplicaIdentity::Nothing => "nothing",
    }
}

/// One column value from the file: text as Postgres prints it, with the markers of
/// [`value_text`](crate::value_text) (`@null`, `@toast`, ...) that recordings use too.
fn cell(v: &toml::Value) -> Result<Value, (String, String)> {
    let text = |s: String| Value::Text(bytes::Bytes::from(s));
    match v {
        toml::Value::String(s) if s.starts_with('@') => crate::value_text::decode_value(s.clone()).map_err(|_| {
            (
                format!("special value `{s}`"),
                match did_you_mean(s, [NULL, TOAST]) {
                    Some(m) => format!("did you mean `{m}`? write `@{s}` for the text `{s}` itself"),
                    None => format!(
                        "special values are {NULL}, {TOAST}, @bytes:<hex> and @binary:<hex>; write `@{s}` for the text `{s}` itself"
                    ),
                },
            )
        }),
        toml::Value::String(s) => Ok(text(s.clone())),
        toml::Value::Integer(i) => Ok(text(i.to_string())),
        // Postgres prints booleans as t and f.
        toml::Value::Boolean(b) => Ok(text(if *b { "t" } else { "f" }.to_string())),
        toml::Value::Float(f) => Err((
            format!("float value `{f}`"),
            "a float may not print as Postgres prints it; write the text, as in \"12.50\" for numeric(10,2)".into(),
        )),
        toml::Value::Datetime(d) => Err((
            format!("TOML date `{d}`"),
            "write the text as Postgres prints it (DateStyle ISO, UTC), as in \"2024-05-01 12:00:00+00\"".into(),
        )),
        toml::Value::Array(_) | toml::Value::Table(_) => Err((
            format!("{} value", v.type_str()),
            "write the text as Postgres prints it: \"{a,b}\" for an array, '{\"a\":1}' for json".into(),
        )),
    }
}

/// The tables one test uses, gathered while its changes are read.
struct TableBuilder {
    declared: Vec<Declared>,
    used: Vec<UsedTable>,
}

struct UsedTable {
    name: TableName,
    /// Columns given in changes, with the type their first value suggests.
    seen: Vec<(String, u32)>,
}

impl TableBuilder {
    fn declared(&self, name: &TableName) -> Option<&Declared> {
        self.declared.iter().find(|d| d.name == *name)
    }

    fn use_table(&mut self, name: &TableName) -> usize {
        match self.used.iter().position(|u| u.name == *name) {
            Some(i) => i,
            None => {
                self.used.push(UsedTable { name: name.clone(), seen: Vec::new() });
                self.used.len() - 1
            }
        }
    }

    fn note(&mut self, index: usize, column: &str, value: &toml::Value) {
        let ty = match value {
            toml::Value::Integer(_) => INT8_OID,
            toml::Value::Boolean(_) => BOOL_OID,
            _ => TEXT_OID,
        };
        let seen = &mut self.used[index].seen;
        match seen.iter_mut().find(|(c, _)| c == column) {
            // A NULL or TOAST marker says nothing of the type; a later value may.
            Some((_, t)) if *t == TEXT_OID && ty != TEXT_OID => *t = ty,
            Some(_) => {}
            None => seen.push((column.to_string(), ty)),
        }
    }
}

/// A step whose row values are still by name, until the table's columns are known.
enum PendingStep {
    Row { table: usize, op: Op, old: Option<Vec<(String, Value)>>, new: Option<Vec<(String, Value)>> },
    Message { line: usize, body: Vec<u8> },
}

impl PendingStep {
    fn finish(self, tables: &[TestTable]) -> Step {
        match self {
            PendingStep::Message { line, body } => Step::Message { line, body },
            PendingStep::Row { table, op, old, new } => {
                let relation = &tables[table].relation;
                let keyed = matches!(relation.replica_identity, ReplicaIdentity::Default | ReplicaIdentity::Index);
                let tuple = |values: &[(String, Value)], keyed: bool| {
                    Tuple(
                        relation
                            .columns
                            .iter()
                            .map(|c| match values.iter().find(|(n, _)| *n == c.name) {
                                Some((_, v)) => v.clone(),
                                // pgoutput sends NULL for the non-key columns of a key image.
                                None if keyed => Value::Null,
                                // Not given: not in the stream, as an unchanged TOASTed value.
                                None => Value::UnchangedToast,
                            })
                            .collect(),
                    )
                };
                let old =
                    old.map(|o| if keyed { OldTuple::Key(tuple(&o, true)) } else { OldTuple::Full(tuple(&o, false)) });
                let new = new.map(|n| tuple(&n, false));
                Step::Row { table, op, old, new }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running.

/// Where an actual action came from, shown next to unexpected lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A rule, and the reason when it was widened to a pattern.
    Rule {
        /// The rule's name.
        name: Arc<str>,
        /// Set when an exact action was widened.
        widened: Option<Widening>,
    },
    /// A manual invalidation message.
    Message,
}

/// One transaction's outcome.
#[derive(Debug, Clone)]
pub struct TxResult {
    /// 1-based position of the transaction in its test.
    pub index: usize,
    /// The line its `changes` start on.
    pub line: usize,
    /// The expected actions.
    pub expected: BTreeSet<Action>,
    /// The actions the batch holds after the transaction, with where each came from.
    pub actual: Vec<(Action, Origin)>,
    /// Things worth knowing when it fails, such as skipped malformed messages.
    pub notes: Vec<String>,
}

impl TxResult {
    /// True when the actual actions are exactly the expected ones.
    pub fn passed(&self) -> bool {
        self.actual.len() == self.expected.len() && self.actual.iter().all(|(a, _)| self.expected.contains(a))
    }
}

/// One test's outcome.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The test's name.
    pub name: String,
    /// The line of its `[[test]]` header.
    pub line: usize,
    /// Problems that fail the test whatever its actions, such as a rule naming a column
    /// the declared table lacks.
    pub problems: Vec<String>,
    /// Each transaction's outcome.
    pub txs: Vec<TxResult>,
    /// How long it took.
    pub duration: Duration,
}

impl CaseResult {
    /// True when the test passed.
    pub fn passed(&self) -> bool {
        self.problems.is_empty() && self.txs.iter().all(TxResult::passed)
    }
}

impl Case {
    /// Runs the test: binds its tables, routes each transaction's changes through the
    /// production router, deduplicates through a batch per transaction, and compares.
    pub fn run(&self) -> CaseResult {
        let started = Instant::now();
        if let Some(r) = &self.recording {
            let problems = r.run(self.rules.clone());
            return CaseResult {
                name: self.name.clone(),
                line: self.line,
                problems,
                txs: Vec::new(),
                duration: started.elapsed(),
            };
        }
        let mut routing = Routing::new(self.rules.clone());
        let mut problems = Vec::new();
        for t in &self.tables {
            for m in routing.bind(&t.relation) {
                if t.declared {
                    problems.push(format!(
                        "rule `{}` names column `{}`, which the declared columns of `{}` lack; its keys are widened to patterns",
                        m.rule, m.column, m.table
                    ));
                }
            }
        }
        let txs = self
            .txs
            .iter()
            .enumerate()
            .map(|(i, tx)| {
                let mut batch = Batch::new();
                let mut tally = CaseTally { origins: HashMap::new(), notes: Vec::new(), line: 0 };
                for step in &tx.steps {
                    match step {
                        Step::Row { table, op, old, new } => {
                            let change = Change {
                                relation: &self.tables[*table].relation,
                                op: *op,
                                old: old.as_ref(),
                                new: new.as_ref(),
                            };
                            routing.change(&change, Lsn::ZERO, &mut batch, &mut tally);
                        }
                        Step::Message { line, body } => {
                            tally.line = *line;
                            routing.message(body, None, Lsn::ZERO, &mut batch, &mut tally);
                        }
                    }
                }
                let CaseTally { origins, notes, .. } = tally;
                let actual =
                    batch.actions().map(|a| (a.clone(), origins.get(a).cloned().unwrap_or(Origin::Message))).collect();
                TxResult { index: i + 1, line: tx.line, expected: tx.expect.iter().cloned().collect(), actual, notes }
            })
            .collect();
        CaseResult { name: self.name.clone(), line: self.line, problems, txs, duration: started.elapsed() }
    }
}

#[cfg(test)]
impl Case {
    /// A test of `tables` (taken as inferred, so a column a rule names may be missing)
    /// whose transactions are `txs`, expecting no action.
    pub(crate) fn from_steps(rules: Arc<RuleSet>, tables: Vec<Relation>, txs: Vec<Vec<Step>>) -> Case {
        Case {
            name: "from steps".into(),
            line: 1,
            rules,
            tables: tables.into_iter().map(|relation| TestTable { relation, declared: false }).collect(),
            txs: txs.into_iter().map(|steps| Tx { line: 1, steps, expect: Vec::new() }).collect(),
            recording: None,
        }
    }
}

/// Where each action of a test's transaction came from, and what is worth knowing.
struct CaseTally {
    origins: HashMap<Action, Origin>,
    notes: Vec<String>,
    /// The line of the message being applied.
    line: usize,
}

impl Tally for CaseTally {
    fn routed(&mut self, _: &Change<'_>, routed: &[Routed], _: &mut Batch) {
        for r in routed {
            if !self.origins.contains_key(&r.action) {
                self.origins.insert(r.action.clone(), Origin::Rule { name: r.rule.clone(), widened: r.widened });
            }
        }
    }

    fn manual(&mut self, actions: &[Action], _: &mut Batch) {
        for a in actions {
            self.origins.entry(a.clone()).or_insert(Origin::Message);
        }
    }

    fn malformed(&mut self, error: &ManualError) {
        self.notes.push(format!("the message on line {} was skipped, as walbust run skips it: {error}", self.line));
    }
}

/// One test file's outcomes.
#[derive(Debug, Clone)]
pub struct SuiteResult {
    /// The test file.
    pub file: PathBuf,
    /// The outcomes of the tests that ran.
    pub cases: Vec<CaseResult>,
}

impl SuiteResult {
    /// Number of failed tests.
    pub fn failures(&self) -> usize {
        self.cases.iter().filter(|c| !c.passed()).count()
    }
}

/// Runs every test of `suites` whose name `selected` accepts.
pub fn run(suites: &[Suite], selected: impl Fn(&str) -> bool) -> Vec<SuiteResult> {
    suites
        .iter()
        .map(|s| SuiteResult {
            file: s.file.clone(),
            cases: s.cases.iter().filter(|c| selected(&c.name)).map(Case::run).collect(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Reporting.

/// Widest left column before its cells overflow into the right one.
const MAX_LEFT: usize = 60;

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
fn side_by_side(tx: &TxResult) -> String {
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

fn describe(origin: &Origin) -> String {
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

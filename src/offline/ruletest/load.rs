//! Loading: test files read, parsed and validated into [`Suite`]s, every problem at once.

use super::*;

/// The first OID given to test tables, as Postgres gives the first user objects.
pub(super) const FIRST_OID: u32 = 16384;

/// Type OIDs by the names a test file may give in `types`.
pub(super) const TYPES: &[(&str, u32)] = &[
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
pub(super) const TEXT_OID: u32 = 25;
pub(super) const INT8_OID: u32 = 20;
pub(super) const BOOL_OID: u32 = 16;

// ---------------------------------------------------------------------------------------
// The serde shape of a test file.

pub(super) type Image = BTreeMap<Spanned<String>, Spanned<toml::Value>>;
pub(super) type Names = Spanned<Vec<Spanned<String>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    #[serde(default)]
    rules: Option<Names>,
    #[serde(default)]
    tables: Vec<Spanned<RawTable>>,
    #[serde(default)]
    test: Vec<Spanned<RawTest>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTest {
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
pub(super) struct RawTable {
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
pub(super) struct RawTx {
    changes: Spanned<Vec<Spanned<RawChange>>>,
    expect: Spanned<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChange {
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

pub(super) fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
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
        match crate::input::user_file::read_to_string(file, crate::input::user_file::Kind::RuleTest) {
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
pub(super) struct RuleCache {
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

pub(super) fn parse_file(
    path: &Path,
    text: &str,
    rule_sets: &mut RuleCache,
    problems: &mut Vec<Diagnostic>,
) -> Option<Suite> {
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
pub(super) struct Declared {
    name: TableName,
    columns: Option<Vec<String>>,
    key: Vec<String>,
    identity: ReplicaIdentity,
    types: BTreeMap<String, u32>,
}

pub(super) struct Validator<'a> {
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

pub(super) fn identity_name(identity: ReplicaIdentity) -> &'static str {
    match identity {
        ReplicaIdentity::Default => "default",
        ReplicaIdentity::Full => "full",
        ReplicaIdentity::Index => "index",
        ReplicaIdentity::Nothing => "nothing",
    }
}

/// One column value from the file: text as Postgres prints it, with the markers of
/// [`value_text`](crate::domain::value_text) (`@null`, `@toast`, ...) that recordings use too.
pub(super) fn cell(v: &toml::Value) -> Result<Value, (String, String)> {
    let text = |s: String| Value::Text(bytes::Bytes::from(s));
    match v {
        toml::Value::String(s) if s.starts_with('@') => crate::domain::value_text::decode_value(s.clone()).map_err(|_| {
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
pub(super) struct TableBuilder {
    declared: Vec<Declared>,
    used: Vec<UsedTable>,
}

pub(super) struct UsedTable {
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
pub(super) enum PendingStep {
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

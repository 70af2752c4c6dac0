//! Rule files: the DBA's mapping from changed tables and rows to cache keys.
//!
//! Raw serde structs (`raw`) become a validated [`RuleSet`] here; the [`router`] binds
//! the set to the relations the stream announces and turns each change into actions.
//!
//! ```toml
//! [[rule]]
//! name = "user settings"
//! table = "public.user_settings"
//! on = ["insert", "update", "delete", "truncate"]
//! keys = ["user:{user_id}:settings:all"]
//! patterns = ["plans_list_{org_slug}_*"]
//! ```

pub mod manual;
mod raw;
pub mod router;
pub mod template;

pub use router::{Change, Routed, Router, Widening};
pub use template::Template;

use crate::domain::diagnostic::{Diagnostic, Diagnostics, did_you_mean};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Rule test files end with this; a rules glob that matches one leaves it out.
pub const TEST_SUFFIX: &str = ".test.toml";

/// A kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// A new row.
    Insert,
    /// A changed row.
    Update,
    /// A removed row.
    Delete,
    /// Every row of the table removed.
    Truncate,
}

impl Op {
    /// Every op, in the order rules list them.
    pub const ALL: [Op; 4] = [Op::Insert, Op::Update, Op::Delete, Op::Truncate];

    /// The lowercase name used in rule files and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of ops a rule fires on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpSet(u8);

impl OpSet {
    /// All four ops: the default when a rule gives no `on`.
    pub const ALL: OpSet = OpSet(0b1111);
    /// No op: a rule with `on = []`.
    pub const NONE: OpSet = OpSet(0);

    /// True when `op` is in the set.
    pub fn contains(self, op: Op) -> bool {
        self.0 & op.bit() != 0
    }

    /// The set with `op` added.
    pub fn with(self, op: Op) -> OpSet {
        OpSet(self.0 | op.bit())
    }
}

/// A table, schema-qualified.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    /// Schema; `public` when the rule gave a bare name.
    pub schema: String,
    /// Table.
    pub table: String,
}

impl TableName {
    /// Parses `schema.table`, or a bare `table` in schema `public`, as rule files name tables.
    pub fn parse(s: &str) -> Result<TableName, &'static str> {
        let (schema, table) = match s.split_once('.') {
            Some((schema, table)) => (schema.trim(), table.trim()),
            None => ("public", s.trim()),
        };
        if schema.is_empty() || table.is_empty() {
            return Err("schema and table must not be empty");
        }
        if table.contains('.') {
            return Err("too many dots");
        }
        Ok(TableName { schema: schema.to_string(), table: table.to_string() })
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// One validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Unique name, shown in logs and test output.
    pub name: Arc<str>,
    /// The table whose changes it routes.
    pub table: TableName,
    /// The ops it fires on.
    pub on: OpSet,
    /// Conditions on column values that must all hold.
    pub when: Vec<Condition>,
    /// For updates: fire only when one of these columns changed.
    pub changed: Vec<String>,
    /// Exact keys to UNLINK.
    pub keys: Vec<Template>,
    /// Globs to SCAN and UNLINK; row values in them are escaped.
    pub patterns: Vec<Template>,
    /// Index sets to bust: their members, then the set.
    pub tags: Vec<Template>,
    /// Version keys to INCR.
    pub bump: Vec<Template>,
    /// Channels to PUBLISH to.
    pub publish: Vec<Publish>,
    /// Keys to write through with the new row.
    pub refresh: Vec<Refresh>,
    /// Every column the rule names, with where.
    pub columns: Vec<ColumnRef>,
    /// The file the rule is written in.
    pub file: PathBuf,
    /// The line its `[[rule]]` header is on.
    pub line: usize,
}

/// A condition of `when`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// The column tested.
    pub column: String,
    /// The test.
    pub test: Test,
}

/// What a `when` condition requires of a column's text value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Test {
    /// Equal to one of these (a single value is a list of one).
    OneOf(Vec<String>),
    /// NULL (`true`) or not NULL (`false`).
    Null(bool),
}

/// A `publish` action.
#[derive(Debug, Clone)]
pub struct Publish {
    /// The channel.
    pub channel: String,
    /// The message template; `None` sends JSON naming table, op, rule and keys.
    pub message: Option<Template>,
}

/// A `refresh` (write-through) action.
#[derive(Debug, Clone)]
pub struct Refresh {
    /// The key written.
    pub key: Template,
    /// The columns written as JSON; `None` for all.
    pub columns: Option<Vec<String>>,
    /// Expiry in seconds.
    pub ttl: Option<u64>,
}

/// A column named somewhere in a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnRef {
    /// The column.
    pub name: String,
    /// The image it is read from.
    pub image: template::Image,
    /// Line of the mention.
    pub line: usize,
    /// Column of the mention.
    pub col: usize,
}

impl Rule {
    /// Where the rule is written: `file:line`.
    pub fn origin(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }
}

/// Every rule, indexed by table.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<Arc<Rule>>,
    by_table: HashMap<TableName, Vec<Arc<Rule>>>,
}

/// A rule set together with the warnings found while loading it.
#[derive(Debug)]
pub struct Loaded {
    /// The rules.
    pub rules: RuleSet,
    /// Problems that do not stop the rules from running.
    pub warnings: Diagnostics,
    /// The files read, in load order.
    pub files: Vec<PathBuf>,
}

impl RuleSet {
    /// Loads every file matched by `globs`; fails with all errors (and warnings) found.
    pub fn load(globs: &[String]) -> Result<Loaded, Diagnostics> {
        let mut problems = Vec::new();
        let mut files = Vec::new();
        for pattern in globs {
            let mut matched: Vec<PathBuf> = match glob::glob(pattern) {
                // Rule tests (`*.test.toml`) sit beside the rules; `rules/*.toml` must not load them.
                Ok(paths) => paths
                    .filter_map(Result::ok)
                    .filter(|p| p.is_file() && !p.to_string_lossy().ends_with(TEST_SUFFIX))
                    .collect(),
                Err(e) => {
                    problems.push(Diagnostic::error(
                        Path::new(pattern),
                        "",
                        None,
                        format!("invalid rules glob: {}", e.msg),
                    ));
                    continue;
                }
            };
            if matched.is_empty() {
                problems.push(
                    Diagnostic::error(Path::new(pattern), "", None, format!("rules glob `{pattern}` matches no files"))
                        .with_hint("check the `rules` list in config.toml; globs are relative to the config file"),
                );
            }
            matched.sort();
            files.extend(matched.into_iter().filter(|p| !files.contains(p)).collect::<Vec<_>>());
        }
        let mut sources = Vec::new();
        for file in &files {
            match crate::input::user_file::read_to_string(file, crate::input::user_file::Kind::Rules) {
                Ok(text) => sources.push((file.clone(), text)),
                Err(e) => problems.push(Diagnostic::error(file, "", None, e.with_reason())),
            }
        }
        let mut loaded = RuleSet::from_sources(&sources).map_err(|mut d| {
            problems.append(&mut d.0);
            Diagnostics(std::mem::take(&mut problems))
        })?;
        if !problems.is_empty() {
            problems.append(&mut loaded.warnings.0);
            return Err(Diagnostics(problems));
        }
        loaded.files = files;
        Ok(loaded)
    }

    /// Validates rule files given as `(path, contents)`, collecting every problem.
    pub fn from_sources(sources: &[(PathBuf, String)]) -> Result<Loaded, Diagnostics> {
        let mut problems = Vec::new();
        let mut rules: Vec<Arc<Rule>> = Vec::new();
        // Names are checked as written, so a duplicate shows beside the rules' other errors.
        let mut names: BTreeMap<String, String> = BTreeMap::new();
        for (path, text) in sources {
            let first_problem = problems.len();
            for written in raw::parse_file(path, text, &mut problems) {
                if let Some(name) = written.name {
                    if let Some(first) = names.get(&name) {
                        let mut d = Diagnostic::error(path, "", None, format!("duplicate rule name `{name}`"))
                            .with_hint(format!("the name is already used at {first}; rule names must be unique"));
                        (d.line, d.col) = (written.line, 1);
                        problems.push(d);
                        continue;
                    }
                    names.insert(name, format!("{}:{}", path.display(), written.line));
                }
                rules.extend(written.rule.map(Arc::new));
            }
            // Top to bottom within a file, whichever check found each problem.
            problems[first_problem..].sort_by_key(|d| (d.line, d.col));
        }
        let diagnostics = Diagnostics(problems);
        if diagnostics.has_errors() {
            return Err(diagnostics);
        }
        let mut by_table: HashMap<TableName, Vec<Arc<Rule>>> = HashMap::new();
        for rule in &rules {
            by_table.entry(rule.table.clone()).or_default().push(rule.clone());
        }
        Ok(Loaded {
            rules: RuleSet { rules, by_table },
            warnings: diagnostics,
            files: sources.iter().map(|(p, _)| p.clone()).collect(),
        })
    }

    /// Every rule, in file order.
    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    /// The rules for one table.
    pub fn for_table(&self, table: &TableName) -> &[Arc<Rule>] {
        self.by_table.get(table).map_or(&[], Vec::as_slice)
    }

    /// Every table some rule names, sorted.
    pub fn tables(&self) -> Vec<&TableName> {
        let mut t: Vec<&TableName> = self.by_table.keys().collect();
        t.sort();
        t
    }
}

/// Parses an op name, suggesting the closest one when it is misspelt.
fn parse_op(s: &str) -> Result<Op, String> {
    Op::ALL.into_iter().find(|op| op.as_str() == s).ok_or_else(|| {
        let names = Op::ALL.map(Op::as_str);
        match did_you_mean(s, names) {
            Some(m) => format!("did you mean `{m}`?"),
            None => format!("use any of {}", names.join(", ")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One rule with `n` keys, one key per line, each naming a column.
    fn rule_with_keys(n: usize, one_line: bool) -> String {
        let sep = if one_line { ", " } else { ",\n  " };
        let keys: Vec<String> = (0..n).map(|i| format!("\"k:{{id}}:{i}\"")).collect();
        format!("[[rule]]\nname = \"big\"\ntable = \"t\"\nkeys = [\n  {}\n]\n", keys.join(sep))
    }

    /// Every problem found in `files`, one `file:line:col: message` line each, hints indented.
    fn problems(files: &[(&str, &str)]) -> String {
        let sources: Vec<(PathBuf, String)> = files.iter().map(|(p, t)| (PathBuf::from(p), t.to_string())).collect();
        match RuleSet::from_sources(&sources) {
            Ok(loaded) => panic!("loaded, with warnings:\n{}", loaded.warnings),
            Err(problems) => problems.to_string(),
        }
    }

    /// Asserts `shown` holds each of `expected` and no other error.
    fn assert_errors(shown: &str, expected: &[impl AsRef<str>]) {
        for want in expected {
            assert!(shown.contains(want.as_ref()), "missing:\n{}\nin:\n{shown}", want.as_ref());
        }
        assert_eq!(shown.matches("error: ").count(), expected.len(), "{shown}");
    }

    const EXPECTED_RULE_KEYS: &str = "expected one of `name`, `table`, `on`, `when`, `changed`, `keys`, `patterns`, `tags`, `bump`, `publish`, `refresh`";

    #[test]
    fn a_rule_with_two_unknown_fields_reports_both() {
        let text = "[[rule]]\nname = \"users\"\ntabel = \"users\"\nkyes = [\"user:{id}\"]\npatterns = [\"user:{id\"]\n";
        let shown = problems(&[("r.toml", text)]);
        let expected = [
            "error: r.toml:1:1: missing field `table` in rule `users`\n  hint: add the required `table` key to the table that starts here".to_string(),
            format!("error: r.toml:3:1: unknown field `tabel`, {EXPECTED_RULE_KEYS}\n  hint: did you mean `table`?"),
            format!("error: r.toml:4:1: unknown field `kyes`, {EXPECTED_RULE_KEYS}\n  hint: did you mean `keys`?"),
            // The rest of the rule is still validated.
            "error: r.toml:5:19: unclosed `{` in template `user:{id` in patterns of rule `users`".to_string(),
        ];
        assert_errors(&shown, &expected);
    }

    #[test]
    fn unknown_keys_at_every_level_are_all_reported() {
        let text = "[[rules]]\nname = \"x\"\n\n[[rule]]\nname = \"r\"\ntable = \"t\"\nkeys = [\"k\"]\n\
                    publish = [{ channel = \"c\", mesage = \"m\" }]\n\
                    refresh = [{ key = \"k\", colums = [\"a\"] }, { key = \"k2\", tl = \"5s\" }]\n";
        let shown = problems(&[("r.toml", text)]);
        assert_errors(
            &shown,
            &[
                "r.toml:1:3: unknown field `rules`, expected `rule`\n  hint: did you mean `rule`?",
                "r.toml:8:29: unknown field `mesage`, expected `channel` or `message`\n  hint: did you mean `message`?",
                "r.toml:9:25: unknown field `colums`, expected one of `key`, `columns`, `ttl`\n  hint: did you mean `columns`?",
                "r.toml:9:57: unknown field `tl`, expected one of `key`, `columns`, `ttl`\n  hint: did you mean `ttl`?",
            ],
        );
    }

    #[test]
    fn a_rule_with_two_values_of_the_wrong_type_reports_both() {
        let text = "[[rule]]\nname = \"users\"\ntable = \"users\"\non = \"insert\"\nkeys = \"user:{id}\"\nbump = [\"v:{id\"]\n";
        let shown = problems(&[("r.toml", text)]);
        assert_errors(
            &shown,
            &[
                "r.toml:4:6: invalid type: string \"insert\", expected a sequence",
                "r.toml:5:8: invalid type: string \"user:{id}\", expected a sequence",
                "r.toml:6:12: unclosed `{` in template `v:{id` in bump of rule `users`",
            ],
        );
    }

    #[test]
    fn a_duplicate_name_is_reported_beside_another_rules_errors() {
        let a = "[[rule]]\nname = \"users\"\ntable = \"users\"\nkeys = [\"user:{id\"]\n";
        let b = "[[rule]]\nname = \"users\"\ntable = \"users\"\nkyes = [\"user:{id}\"]\non = [\"updte\"]\n";
        let shown = problems(&[("a.toml", a), ("b.toml", b)]);
        assert_errors(
            &shown,
            &[
                "error: a.toml:4:15: unclosed `{` in template `user:{id` in keys of rule `users`",
                "error: b.toml:1:1: duplicate rule name `users`\n  hint: the name is already used at a.toml:1; rule names must be unique",
                "error: b.toml:4:1: unknown field `kyes`",
                "error: b.toml:5:7: unknown op `updte` in rule `users`",
            ],
        );
    }

    #[test]
    fn a_syntax_error_does_not_hide_problems_in_other_rules_of_the_file() {
        let text = "\
# users and their settings
[[rule]]
name = \"usérs\"
tabel = \"users\"
keys = [\"user:{id}\"]

[[rule]]
name = \"settings
table = \"user_settings\"
keys = [\"settings:{user_id}\"]

  [[ rule ]]  # a third
name = \"usérs\"
table = \"users\"
on = [\"updte\"]
keys = [\"é:{id\"]
";
        let shown = problems(&[("r.toml", text)]);
        // The syntax error is reported once, though both the file and its piece hold it.
        assert_errors(
            &shown,
            &[
                "error: r.toml:2:1: missing field `table` in rule `usérs`",
                "error: r.toml:4:1: unknown field `tabel`",
                "error: r.toml:8:17: invalid basic string",
                "error: r.toml:12:1: duplicate rule name `usérs`\n  hint: the name is already used at r.toml:2; rule names must be unique",
                "error: r.toml:15:7: unknown op `updte` in rule `usérs`",
                // Columns count characters, in the pieces parsed apart too.
                "error: r.toml:16:12: unclosed `{` in template `é:{id` in keys of rule `usérs`",
            ],
        );
    }

    #[test]
    fn a_refresh_ttl_beyond_a_year_is_refused_at_load_not_by_redis_at_run_time() {
        let rule = |ttl: &str| {
            format!("[[rule]]\nname = \"r\"\ntable = \"t\"\nrefresh = [{{ key = \"k:{{id}}\", ttl = \"{ttl}\" }}]\n")
        };
        let load = |ttl: &str| RuleSet::from_sources(&[(PathBuf::from("r.toml"), rule(ttl))]);
        assert!(load("8760h").is_ok());
        for bad in ["8761h", "99999999999999h", "0s"] {
            let problems = load(bad).unwrap_err().to_string();
            assert!(problems.contains(&format!("invalid ttl `{bad}`")), "{problems}");
            assert!(problems.contains("from 1s to 8760h"), "{problems}");
        }
    }

    #[test]
    fn a_garbage_rule_file_over_the_cap_is_refused_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("garbage.toml");
        std::fs::write(&file, vec![b'['; (16 << 20) + 1]).unwrap();
        let problems = RuleSet::load(&[dir.path().join("*.toml").display().to_string()]).unwrap_err();
        assert_eq!(problems.0.len(), 1, "{problems}");
        assert!(problems.to_string().contains("is larger than 16 MiB (the cap for a rule file)"), "{problems}");
    }

    #[test]
    fn a_rule_with_100k_keys_loads_in_linear_time() {
        for one_line in [false, true] {
            let text = rule_with_keys(100_000, one_line);
            let started = std::time::Instant::now();
            let loaded = RuleSet::from_sources(&[(PathBuf::from("big.toml"), text.clone())]).unwrap();
            // Placing each key's column rescanned the file before: 30 s and more for this case.
            let took = started.elapsed();
            assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
            let rule = &loaded.rules.rules()[0];
            assert_eq!(rule.keys.len(), 100_000);
            let last = rule.columns.last().unwrap();
            // The last `id` placeholder, found by a plain scan.
            let line = text.lines().filter(|l| l.contains("{id}")).count() + 4;
            let last_line = text.lines().nth(line - 1).unwrap();
            let expected = (line, last_line.rfind("{id}").unwrap() + 2);
            assert_eq!((last.line, last.col), expected, "one line: {one_line}");
        }
    }
}

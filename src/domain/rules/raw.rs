//! The serde shape of a rule file, and its validation into [`Rule`]s.
//!
//! A file is parsed into a spanned TOML table first and each `[[rule]]` is deserialized on
//! its own, so one mistake never hides another: every unknown key is reported and dropped
//! before serde sees the table, a value of the wrong type is reported and its key dropped,
//! and what is left of the rule is still validated. A file that is not valid TOML is split
//! at its `[[rule]]` header lines and each piece is parsed alone, so the rules beside a
//! syntax error are checked too.

use super::template::{Image, Template};
use super::{ColumnRef, Op};
use super::{Condition, OpSet, Publish, Refresh, Rule, TableName, Test, parse_op};
use crate::domain::config::parse_duration;
use crate::domain::diagnostic::{self, Diagnostic, LineIndex};
use serde::Deserialize;
use serde::de::IgnoredAny;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::LazyLock;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

/// The keys a rule file holds at its top level.
const FILE_FIELDS: &[&str] = &["rule"];

// The keys of each table, as serde's derive lists them, so the unknown-key check cannot
// drift from the structs.
static RULE_FIELDS: LazyLock<&'static [&'static str]> = LazyLock::new(fields_of::<RawRule>);
static PUBLISH_FIELDS: LazyLock<&'static [&'static str]> = LazyLock::new(fields_of::<RawPublish>);
static REFRESH_FIELDS: LazyLock<&'static [&'static str]> = LazyLock::new(fields_of::<RawRefresh>);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    // Required, but optional here so that a rule without them is still validated; the
    // validator reports them missing.
    #[serde(default)]
    name: Option<Spanned<String>>,
    #[serde(default)]
    table: Option<Spanned<String>>,
    #[serde(default)]
    on: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    when: Option<Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>>,
    #[serde(default)]
    changed: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    keys: Vec<Spanned<String>>,
    #[serde(default)]
    patterns: Vec<Spanned<String>>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    #[serde(default)]
    bump: Vec<Spanned<String>>,
    #[serde(default)]
    publish: Vec<Spanned<RawPublish>>,
    #[serde(default)]
    refresh: Vec<Spanned<RawRefresh>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPublish {
    channel: Spanned<String>,
    #[serde(default)]
    message: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRefresh {
    key: Spanned<String>,
    #[serde(default)]
    columns: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    ttl: Option<Spanned<String>>,
}

/// The longest `ttl` of a refresh: a year. Longer is a typo, or a wish for no expiry,
/// which leaving `ttl` out gives.
const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

/// One `[[rule]]` table as written.
pub(super) struct Written {
    /// Its trimmed name when it gives a non-empty one, valid rule or not, so duplicates are
    /// found beside every other problem.
    pub name: Option<String>,
    /// The line of its header.
    pub line: usize,
    /// The validated rule; `None` when it has an error.
    pub rule: Option<Rule>,
}

/// Parses one rule file, pushing every problem found onto `problems`.
pub(super) fn parse_file(path: &Path, text: &str, problems: &mut Vec<Diagnostic>) -> Vec<Written> {
    let lines = LineIndex::new(text);
    let mut file = FileChecker { path, lines: &lines, problems, written: Vec::new() };
    match DeTable::parse(text) {
        Ok(table) => {
            let errors = file.problems.len();
            if file.document(table, text, 0) == 0 && file.problems.len() == errors {
                file.problems.push(
                    // Pinned to the file's first line, so every diagnostic names a line and column.
                    Diagnostic::warning_in(path, &lines, Some(0..0), "rule file holds no rules")
                        .with_hint("add a [[rule]] table with name, table and keys"),
                );
            }
        }
        Err(e) => {
            let whole = diagnostic::from_toml_in(path, &lines, text, 0, &e);
            let place = (whole.line, whole.col, whole.message.clone());
            file.problems.push(whole);
            for (base, piece) in pieces(text) {
                match DeTable::parse(piece) {
                    Ok(table) => {
                        file.document(table, piece, base);
                    }
                    Err(e) => {
                        let d = diagnostic::from_toml_in(path, &lines, piece, base, &e);
                        if (d.line, d.col, &d.message) != (place.0, place.1, &place.2) {
                            file.problems.push(d);
                        }
                    }
                }
            }
        }
    }
    file.written
}

/// The text before the first `[[rule]]` header line and from each such line to the next,
/// with the byte offset each starts at.
fn pieces(text: &str) -> Vec<(usize, &str)> {
    let is_header = |line: &str| {
        let rest = line.trim_start().strip_prefix("[[").map(str::trim_start);
        let rest = rest.and_then(|r| r.strip_prefix("rule")).map(str::trim_start);
        rest.is_some_and(|r| r.starts_with("]]"))
    };
    let mut starts = vec![0];
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if at > 0 && is_header(line) {
            starts.push(at);
        }
        at += line.len();
    }
    starts.push(text.len());
    starts.windows(2).map(|w| (w[0], &text[w[0]..w[1]])).collect()
}

/// The field names serde's derive gives `T`, read from the `deserialize_struct` call it makes.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Fields(&'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for &mut Fields {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = fields;
            Err(serde::de::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields = Fields(&[]);
    let _ = T::deserialize(&mut fields);
    fields.0
}

/// True when `inner` lies within `outer`.
fn within(outer: Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// True when the error at `at` lies in `value`: its own span, or that of anything in it (the
/// span of an array of tables is its first header only).
fn holds(value: &Spanned<DeValue<'_>>, at: &Range<usize>) -> bool {
    within(value.span(), at)
        || match value.get_ref() {
            DeValue::Array(items) => items.iter().any(|i| holds(i, at)),
            DeValue::Table(t) => t.iter().any(|(k, v)| within(k.span(), at) || holds(v, at)),
            _ => false,
        }
}

/// Checks the tables of one file, or of one piece of it.
struct FileChecker<'a> {
    path: &'a Path,
    lines: &'a LineIndex<'a>,
    problems: &'a mut Vec<Diagnostic>,
    written: Vec<Written>,
}

impl FileChecker<'_> {
    /// Checks a parsed document: `piece` of the file's text, starting at byte `base`.
    /// Returns how many `[[rule]]` tables it holds.
    fn document(&mut self, table: Spanned<DeTable<'_>>, piece: &str, base: usize) -> usize {
        let mut rules = 0;
        for (key, value) in table.into_inner() {
            if key.get_ref() != "rule" {
                self.unknown(&key, base, FILE_FIELDS);
                continue;
            }
            let span = value.span();
            match value.into_inner() {
                DeValue::Array(items) => {
                    rules += items.len();
                    for item in items {
                        self.rule(item, piece, base);
                    }
                }
                // Serde's words for what a list of tables was expected instead of.
                other => {
                    let not_a_list = Vec::<IgnoredAny>::deserialize(ValueDeserializer::from(Spanned::new(span, other)));
                    if let Err(e) = not_a_list {
                        self.problems.push(diagnostic::from_toml_in(self.path, self.lines, piece, base, &e));
                    }
                }
            }
        }
        rules
    }

    fn unknown(&mut self, key: &Spanned<std::borrow::Cow<'_, str>>, base: usize, expected: &'static [&'static str]) {
        let span = key.span();
        let d = diagnostic::unknown_field(
            self.path,
            self.lines,
            span.start + base..span.end + base,
            key.get_ref(),
            expected,
        );
        self.problems.push(d);
    }

    /// Reports and drops every key of `table` not in `expected`.
    fn drop_unknown(&mut self, table: &mut DeTable<'_>, base: usize, expected: &'static [&'static str]) {
        let unknown: Vec<_> = table.keys().filter(|k| !expected.contains(&&**k.get_ref())).cloned().collect();
        for key in unknown {
            self.unknown(&key, base, expected);
            table.remove(&**key.get_ref());
        }
    }

    /// Checks one `[[rule]]` table, written in `piece` of the file's text at byte `base`.
    fn rule(&mut self, mut item: Spanned<DeValue<'_>>, piece: &str, base: usize) {
        let span = item.span();
        let (line, _) = self.lines.line_col(span.start + base);
        let mut name = None;
        let before = self.problems.len();
        if let DeValue::Table(table) = item.get_mut() {
            let given = table.get("name").and_then(|n| n.get_ref().as_str()).map(str::trim);
            name = given.filter(|n| !n.is_empty()).map(str::to_string);
            self.drop_unknown(table, base, *RULE_FIELDS);
            for (key, fields) in [("publish", *PUBLISH_FIELDS), ("refresh", *REFRESH_FIELDS)] {
                if let Some(DeValue::Array(items)) = table.get_mut(key).map(Spanned::get_mut) {
                    for item in items.iter_mut() {
                        if let DeValue::Table(t) = item.get_mut() {
                            self.drop_unknown(t, base, fields);
                        }
                    }
                }
            }
        }
        // A value of the wrong type: report it, drop its key and try again, once per key.
        let mut dropped = Vec::new();
        let raw = loop {
            let e = match RawRule::deserialize(ValueDeserializer::from(item.clone())) {
                Ok(raw) => break Some(raw),
                Err(e) => e,
            };
            self.problems.push(diagnostic::from_toml_in(self.path, self.lines, piece, base, &e));
            let DeValue::Table(table) = item.get_mut() else { break None };
            let at = e.span().unwrap_or(span.clone());
            let Some(key) = table
                .iter()
                .find(|(k, v)| within(k.span(), &at) || holds(v, &at))
                .map(|(k, _)| k.get_ref().to_string())
            else {
                break None;
            };
            table.remove(key.as_str());
            dropped.push(key);
        };
        let failed = self.problems.len() > before;
        let rule = raw.and_then(|raw| {
            let mut v = Validator {
                path: self.path,
                lines: self.lines,
                base,
                problems: &mut *self.problems,
                // An unknown key is an error too: no "no actions" warning for `kyes`.
                failed,
                name: String::new(),
                columns: Vec::new(),
            };
            v.rule(span, raw, &dropped)
        });
        self.written.push(Written { name, line, rule });
    }
}

struct Validator<'a> {
    path: &'a Path,
    lines: &'a LineIndex<'a>,
    /// Where the parsed text starts in the file: spans are relative to it.
    base: usize,
    problems: &'a mut Vec<Diagnostic>,
    failed: bool,
    name: String,
    columns: Vec<ColumnRef>,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, message: String, hint: impl Into<String>) {
        self.failed = true;
        let span = span.start + self.base..span.end + self.base;
        self.problems.push(Diagnostic::error_in(self.path, self.lines, Some(span), message).with_hint(hint));
    }

    fn warning(&mut self, span: Range<usize>, message: String, hint: impl Into<String>) {
        let span = span.start + self.base..span.end + self.base;
        self.problems.push(Diagnostic::warning_in(self.path, self.lines, Some(span), message).with_hint(hint));
    }

    fn column(&mut self, name: &str, image: Image, at: usize) {
        let (line, col) = self.lines.line_col(at + self.base);
        self.columns.push(ColumnRef { name: name.to_string(), image, line, col });
    }

    /// A required key the rule lacks, unless it was dropped for an error already reported.
    fn missing(&mut self, key: &str, rule_span: Range<usize>, dropped: &[String]) {
        if dropped.iter().any(|d| d == key) {
            return;
        }
        let message = match self.name.as_str() {
            "" => format!("missing field `{key}`"),
            name => format!("missing field `{key}` in rule `{name}`"),
        };
        self.error(rule_span, message, format!("add the required `{key}` key to the table that starts here"));
    }

    /// Validates a rule written at `rule_span`, whose keys `dropped` had errors.
    fn rule(&mut self, rule_span: Range<usize>, raw: RawRule, dropped: &[String]) -> Option<Rule> {
        self.name = raw.name.as_ref().map_or("", |n| n.get_ref().trim()).to_string();
        let name = self.name.clone();
        match &raw.name {
            Some(n) if name.is_empty() => {
                self.error(n.span(), "rule name is empty".into(), "give every rule a short unique name")
            }
            Some(_) => {}
            None => self.missing("name", rule_span.clone(), dropped),
        }
        let table = match &raw.table {
            None => {
                self.missing("table", rule_span.clone(), dropped);
                None
            }
            Some(t) => match TableName::parse(t.get_ref()) {
                Ok(t) => Some(t),
                Err(why) => {
                    self.error(
                        t.span(),
                        format!("invalid table `{}` in rule `{name}`: {why}", t.get_ref()),
                        "write schema.table, or a bare table name for the public schema",
                    );
                    None
                }
            },
        };
        let on = self.on(raw.on.as_ref());
        let when = raw.when.map(|w| self.when(w)).unwrap_or_default();
        let changed = self.changed(raw.changed, on);
        let keys = self.templates(&raw.keys, "keys");
        let patterns = self.templates(&raw.patterns, "patterns");
        let tags = self.templates(&raw.tags, "tags");
        let bump = self.templates(&raw.bump, "bump");
        let publish = raw.publish.into_iter().filter_map(|p| self.publish(p)).collect::<Vec<_>>();
        let refresh = raw.refresh.into_iter().filter_map(|r| self.refresh(r)).collect::<Vec<_>>();
        if keys.is_empty()
            && patterns.is_empty()
            && tags.is_empty()
            && bump.is_empty()
            && publish.is_empty()
            && refresh.is_empty()
            && !self.failed
        {
            self.warning(
                rule_span.clone(),
                format!("rule `{name}` has no actions"),
                "add keys, patterns, tags, bump, publish or refresh",
            );
        }
        self.image_warnings(&name, on, rule_span.clone());
        if self.failed {
            return None;
        }
        let (line, _) = self.lines.line_col(rule_span.start + self.base);
        Some(Rule {
            name: name.into(),
            table: table?,
            on,
            when,
            changed,
            keys,
            patterns,
            tags,
            bump,
            publish,
            refresh,
            columns: std::mem::take(&mut self.columns),
            file: self.path.to_path_buf(),
            line,
        })
    }

    fn on(&mut self, raw: Option<&Spanned<Vec<Spanned<String>>>>) -> OpSet {
        let Some(list) = raw else { return OpSet::ALL };
        let mut on = OpSet::NONE;
        for op in list.get_ref() {
            match parse_op(op.get_ref()) {
                Ok(op) => on = on.with(op),
                Err(hint) => {
                    self.error(op.span(), format!("unknown op `{}` in rule `{}`", op.get_ref(), self.name), hint)
                }
            }
        }
        if list.get_ref().is_empty() {
            let name = self.name.clone();
            self.warning(
                list.span(),
                format!("rule `{name}` has `on = []` and never fires"),
                "remove `on` to fire on every op, or list the ops",
            );
        }
        on
    }

    fn when(&mut self, raw: Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>) -> Vec<Condition> {
        let mut out = Vec::new();
        for (column, value) in raw.into_inner() {
            self.column(column.get_ref(), Image::Row, column.span().start);
            let text = |v: &toml::Value| -> Option<String> {
                match v {
                    toml::Value::String(s) => Some(s.clone()),
                    toml::Value::Integer(i) => Some(i.to_string()),
                    // Postgres prints booleans as t and f.
                    toml::Value::Boolean(b) => Some(if *b { "t" } else { "f" }.to_string()),
                    _ => None,
                }
            };
            let bad = |this: &mut Self, what: &str| {
                this.error(
                    value.span(),
                    format!(
                        "unsupported `when` value for column `{}` in rule `{}`: {what}",
                        column.get_ref(),
                        this.name
                    ),
                    "use a string, integer or boolean, a list of them (one of), or { null = true } / { null = false }",
                )
            };
            let test = match value.get_ref() {
                toml::Value::Array(items) => match items.iter().map(text).collect::<Option<Vec<_>>>() {
                    Some(list) if !list.is_empty() => Test::OneOf(list),
                    Some(_) => {
                        bad(self, "an empty list never matches");
                        continue;
                    }
                    None => {
                        bad(self, "list items must be strings, integers or booleans");
                        continue;
                    }
                },
                toml::Value::Table(t) => match (t.get("null"), t.len()) {
                    (Some(toml::Value::Boolean(b)), 1) => Test::Null(*b),
                    _ => {
                        bad(self, "a table must be exactly { null = true } or { null = false }");
                        continue;
                    }
                },
                v => match text(v) {
                    Some(s) => Test::OneOf(vec![s]),
                    None => {
                        bad(self, "floats and dates are compared as text; write them as strings");
                        continue;
                    }
                },
            };
            out.push(Condition { column: column.into_inner(), test });
        }
        out
    }

    fn changed(&mut self, raw: Option<Spanned<Vec<Spanned<String>>>>, on: OpSet) -> Vec<String> {
        let Some(list) = raw else { return Vec::new() };
        if !on.contains(Op::Update) {
            let name = self.name.clone();
            self.warning(
                list.span(),
                format!("`changed` in rule `{name}` has no effect: the rule does not fire on update"),
                "add \"update\" to `on`, or remove `changed`",
            );
        }
        if list.get_ref().is_empty() {
            let name = self.name.clone();
            self.error(
                list.span(),
                format!("`changed = []` in rule `{name}` never matches"),
                "list columns, or remove `changed`",
            );
        }
        list.into_inner()
            .into_iter()
            .map(|c| {
                self.column(c.get_ref(), Image::Row, c.span().start);
                c.into_inner()
            })
            .collect()
    }

    fn template(&mut self, t: &Spanned<String>, what: &str) -> Option<Template> {
        match Template::parse(t.get_ref()) {
            Ok(tpl) => {
                for (image, column) in tpl.columns_with_image() {
                    // Point at the placeholder itself (not a literal that happens to hold the
                    // same text): the span starts at the opening quote.
                    let src = t.get_ref();
                    let at = src
                        .match_indices(column)
                        .map(|(o, _)| o)
                        .find(|&o| src[..o].ends_with(['{', '.', ' ']))
                        .map_or(t.span().start, |o| t.span().start + 1 + o);
                    self.column(column, image, at);
                }
                Some(tpl)
            }
            Err(e) => {
                let at = t.span().start + 1 + e.offset;
                let name = self.name.clone();
                // "empty template in template ``" says nothing; name the list instead.
                let problem = if e.template.is_empty() { e.message.clone() } else { e.to_string() };
                self.error(at..at, format!("{problem} in {what} of rule `{name}`"), e.hint);
                None
            }
        }
    }

    fn templates(&mut self, list: &[Spanned<String>], what: &str) -> Vec<Template> {
        list.iter().filter_map(|t| self.template(t, what)).collect()
    }

    fn publish(&mut self, raw: Spanned<RawPublish>) -> Option<Publish> {
        let raw = raw.into_inner();
        let channel = raw.channel.get_ref().trim().to_string();
        if channel.is_empty() || channel.contains(['{', '}', ' ']) {
            let name = self.name.clone();
            self.error(
                raw.channel.span(),
                format!("invalid publish channel `{channel}` in rule `{name}`"),
                "a channel is a plain name without spaces or braces, such as `cache-invalidations`",
            );
            return None;
        }
        let message = match &raw.message {
            None => None,
            Some(m) => Some(self.template(m, "publish message")?),
        };
        Some(Publish { channel, message })
    }

    fn refresh(&mut self, raw: Spanned<RawRefresh>) -> Option<Refresh> {
        let raw = raw.into_inner();
        let key = self.template(&raw.key, "refresh key");
        let columns = match raw.columns {
            None => None,
            Some(list) => {
                if list.get_ref().is_empty() {
                    let name = self.name.clone();
                    self.error(
                        list.span(),
                        format!("`columns = []` in a refresh of rule `{name}` writes nothing"),
                        "list columns, or remove `columns` to write every column",
                    );
                }
                Some(
                    list.into_inner()
                        .into_iter()
                        .map(|c| {
                            self.column(c.get_ref(), Image::Row, c.span().start);
                            c.into_inner()
                        })
                        .collect(),
                )
            }
        };
        let ttl = match &raw.ttl {
            None => None,
            Some(t) => match parse_duration(t.get_ref()) {
                Some(d) if d.as_secs() > 0 && d.as_secs() <= MAX_TTL_SECS && d.subsec_nanos() == 0 => Some(d.as_secs()),
                _ => {
                    let name = self.name.clone();
                    self.error(
                        t.span(),
                        format!("invalid ttl `{}` in a refresh of rule `{name}`", t.get_ref()),
                        "write whole seconds with a unit, from 1s to 8760h (a year): 300s, 5m or 1h",
                    );
                    None
                }
            },
        };
        Some(Refresh { key: key?, columns, ttl })
    }

    /// Warns where a rule reads an image that some of its ops never have.
    fn image_warnings(&mut self, name: &str, on: OpSet, span: Range<usize>) {
        let reads_old = self.columns.iter().any(|c| c.image == Image::Old);
        let reads_new = self.columns.iter().any(|c| c.image == Image::New);
        if reads_old && on.contains(Op::Insert) {
            self.warning(
                span.clone(),
                format!("rule `{name}` reads `{{old.…}}` but fires on insert, which has no old row; those keys are widened to patterns"),
                "limit the rule with on = [\"update\", \"delete\"]",
            );
        }
        if reads_new && on.contains(Op::Delete) {
            self.warning(
                span,
                format!("rule `{name}` reads `{{new.…}}` but fires on delete, which has no new row; those keys are widened to patterns"),
                "limit the rule with on = [\"insert\", \"update\"]",
            );
        }
    }
}

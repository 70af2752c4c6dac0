//! The serde shape of a rule file, and its validation into [`Rule`]s.

use super::template::{Image, Template};
use super::{ColumnRef, Op};
use super::{Condition, OpSet, Publish, Refresh, Rule, TableName, Test, parse_op};
use crate::config::parse_duration;
use crate::diagnostic::{self, Diagnostic, LineIndex};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    table: Spanned<String>,
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

/// Parses one rule file, pushing every problem found onto `problems`.
pub(super) fn parse_file(path: &Path, text: &str, problems: &mut Vec<Diagnostic>) -> Vec<Rule> {
    let raw: RawFile = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            problems.push(diagnostic::from_toml(path, text, &e));
            return Vec::new();
        }
    };
    if raw.rule.is_empty() {
        problems.push(
            // Pinned to the file's first line, so every diagnostic names a line and column.
            Diagnostic::warning(path, text, Some(0..0), "rule file holds no rules")
                .with_hint("add a [[rule]] table with name, table and keys"),
        );
    }
    let lines = LineIndex::new(text);
    raw.rule
        .into_iter()
        .filter_map(|r| {
            let mut v = Validator {
                path,
                lines: &lines,
                problems: &mut *problems,
                failed: false,
                name: String::new(),
                columns: Vec::new(),
            };
            v.rule(r)
        })
        .collect()
}

struct Validator<'a> {
    path: &'a Path,
    lines: &'a LineIndex<'a>,
    problems: &'a mut Vec<Diagnostic>,
    failed: bool,
    name: String,
    columns: Vec<ColumnRef>,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, message: String, hint: impl Into<String>) {
        self.failed = true;
        self.problems.push(Diagnostic::error_in(self.path, self.lines, Some(span), message).with_hint(hint));
    }

    fn warning(&mut self, span: Range<usize>, message: String, hint: impl Into<String>) {
        self.problems.push(Diagnostic::warning_in(self.path, self.lines, Some(span), message).with_hint(hint));
    }

    fn column(&mut self, name: &str, image: Image, at: usize) {
        let (line, col) = self.lines.line_col(at);
        self.columns.push(ColumnRef { name: name.to_string(), image, line, col });
    }

    fn rule(&mut self, spanned: Spanned<RawRule>) -> Option<Rule> {
        let rule_span = spanned.span();
        let raw = spanned.into_inner();
        self.name = raw.name.get_ref().trim().to_string();
        let name = self.name.clone();
        if name.is_empty() {
            self.error(raw.name.span(), "rule name is empty".into(), "give every rule a short unique name");
        }
        let table = match TableName::parse(raw.table.get_ref()) {
            Ok(t) => Some(t),
            Err(why) => {
                self.error(
                    raw.table.span(),
                    format!("invalid table `{}` in rule `{name}`: {why}", raw.table.get_ref()),
                    "write schema.table, or a bare table name for the public schema",
                );
                None
            }
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
        let (line, _) = self.lines.line_col(rule_span.start);
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

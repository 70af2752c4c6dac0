//! The serde shape of a rule file, and its validation into [`Rule`]s.

use super::template::Template;
use super::{OpSet, Rule, TableName, parse_op};
use crate::diagnostic::{self, Diagnostic, line_col};
use serde::Deserialize;
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
    keys: Vec<Spanned<String>>,
    #[serde(default)]
    patterns: Vec<Spanned<String>>,
}

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
            Diagnostic::warning(path, text, None, "rule file holds no rules")
                .with_hint("add a [[rule]] table with name, table and keys"),
        );
    }
    raw.rule.into_iter().filter_map(|r| validate(path, text, r, problems)).collect()
}

fn validate(path: &Path, text: &str, spanned: Spanned<RawRule>, problems: &mut Vec<Diagnostic>) -> Option<Rule> {
    let rule_span = spanned.span();
    let raw = spanned.into_inner();
    let before = problems.iter().filter(|d| d.is_error()).count();
    let name = raw.name.get_ref().trim().to_string();
    let error = |span: std::ops::Range<usize>, msg: String, hint: &str| {
        Diagnostic::error(path, text, Some(span), msg).with_hint(hint.to_string())
    };
    if name.is_empty() {
        problems.push(error(raw.name.span(), "rule name is empty".into(), "give every rule a short unique name"));
    }
    let table = match parse_table(raw.table.get_ref()) {
        Ok(t) => Some(t),
        Err(why) => {
            problems.push(error(
                raw.table.span(),
                format!("invalid table `{}` in rule `{name}`: {why}", raw.table.get_ref()),
                "write schema.table, or a bare table name for the public schema",
            ));
            None
        }
    };
    let mut on = OpSet(0);
    match &raw.on {
        None => on = OpSet::ALL,
        Some(list) => {
            for op in list.get_ref() {
                match parse_op(op.get_ref()) {
                    Ok(op) => on.0 |= op.bit(),
                    Err(hint) => problems.push(error(
                        op.span(),
                        format!("unknown op `{}` in rule `{name}`", op.get_ref()),
                        &hint,
                    )),
                }
            }
            if list.get_ref().is_empty() {
                problems.push(
                    Diagnostic::warning(
                        path,
                        text,
                        Some(list.span()),
                        format!("rule `{name}` has `on = []` and never fires"),
                    )
                    .with_hint("remove `on` to fire on every op, or list the ops"),
                );
            }
        }
    }
    let mut templates = |list: &[Spanned<String>], what: &str| -> Vec<Template> {
        let mut out = Vec::new();
        for t in list {
            match Template::parse(t.get_ref()) {
                Ok(tpl) => out.push(tpl),
                Err(e) => {
                    // The span starts at the opening quote; the offset counts from the text after it.
                    let at = t.span().start + 1 + e.offset;
                    problems.push(error(at..at, format!("{} in {what} of rule `{name}`", e), e.hint));
                }
            }
        }
        out
    };
    let keys = templates(&raw.keys, "keys");
    let patterns = templates(&raw.patterns, "patterns");
    if raw.keys.is_empty() && raw.patterns.is_empty() {
        problems.push(
            Diagnostic::warning(path, text, Some(rule_span.clone()), format!("rule `{name}` has no actions"))
                .with_hint("add keys = [...] or patterns = [...]"),
        );
    }
    if problems.iter().filter(|d| d.is_error()).count() > before {
        return None;
    }
    let (line, _) = line_col(text, rule_span.start);
    Some(Rule { name: name.into(), table: table?, on, keys, patterns, file: path.to_path_buf(), line })
}

/// `schema.table` or a bare `table` (schema `public`).
fn parse_table(s: &str) -> Result<TableName, &'static str> {
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

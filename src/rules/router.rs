//! The router: turns one decoded change into invalidation actions.
//!
//! Rules are bound to a relation when its Relation message arrives (and bound again when
//! DDL re-sends it), so routing a change never looks up a column by name. The router sees
//! the old and the new image and invalidates the union. Where a value a key needs is not
//! in the stream, that placeholder becomes `*` and the key becomes a pattern delete:
//! walbust over-invalidates rather than skip, and counts why.

use super::template::{Part, Template};
use super::{Op, Rule, RuleSet, TableName};
use crate::action::{Action, glob_escape_into};
use crate::pgoutput::{OldTuple, Relation, Tuple, Value};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// Why an action was widened from exact keys to a pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Widening {
    /// TRUNCATE carries no rows.
    Truncate,
    /// An unchanged TOASTed value was not sent and no old image holds it.
    UnchangedToast,
    /// The old image lacks the column (REPLICA IDENTITY DEFAULT or INDEX, non-key column).
    OldImageMissing,
    /// The column is NULL, so no key can be built from it.
    NullValue,
    /// The rule names a column the table does not have.
    UnknownColumn,
    /// The value is not valid UTF-8 text.
    NotText,
}

impl Widening {
    /// The reason as used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Widening::Truncate => "truncate",
            Widening::UnchangedToast => "unchanged_toast",
            Widening::OldImageMissing => "old_image_missing",
            Widening::NullValue => "null_value",
            Widening::UnknownColumn => "unknown_column",
            Widening::NotText => "not_text",
        }
    }
}

impl fmt::Display for Widening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change as the router sees it.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// The changed table.
    pub relation: &'a Relation,
    /// What happened.
    pub op: Op,
    /// The old image, when the stream carries one.
    pub old: Option<&'a OldTuple>,
    /// The new image, for inserts and updates.
    pub new: Option<&'a Tuple>,
}

/// One action produced by one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The rule that produced it.
    pub rule: Arc<str>,
    /// What to do.
    pub action: Action,
    /// Set when a key was widened to a pattern, with the reason.
    pub widened: Option<Widening>,
}

#[derive(Debug)]
enum Slot {
    Literal(String),
    Column(usize),
    Missing,
}

#[derive(Debug)]
struct BoundTemplate {
    slots: Vec<Slot>,
}

#[derive(Debug)]
struct BoundRule {
    rule: Arc<Rule>,
    keys: Vec<BoundTemplate>,
    patterns: Vec<BoundTemplate>,
}

/// Compiled rules bound to the relations seen on the stream.
#[derive(Debug)]
pub struct Router {
    rules: Arc<RuleSet>,
    bound: HashMap<u32, Vec<BoundRule>>,
    scratch: String,
}

/// A column named by a rule that the table lacks, reported when the relation is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingColumn {
    /// The rule.
    pub rule: Arc<str>,
    /// The table.
    pub table: String,
    /// The column it names.
    pub column: String,
}

enum Lookup<'a> {
    Known(&'a str),
    Unknown(Widening),
}

impl Router {
    /// A router over `rules`, with no relation bound yet.
    pub fn new(rules: Arc<RuleSet>) -> Self {
        Router { rules, bound: HashMap::new(), scratch: String::new() }
    }

    /// The rule set in use.
    pub fn rules(&self) -> &Arc<RuleSet> {
        &self.rules
    }

    /// Forgets every bound relation, as at the start of a new replication session.
    pub fn clear(&mut self) {
        self.bound.clear();
    }

    /// Binds the rules for `relation`, replacing an earlier binding for its OID.
    /// Returns the columns rules name that the table lacks: their keys will be widened.
    pub fn bind(&mut self, relation: &Relation) -> Vec<MissingColumn> {
        let table = TableName { schema: relation.namespace.clone(), table: relation.name.clone() };
        let mut missing = Vec::new();
        let mut bind = |rule: &Rule, t: &Template| BoundTemplate {
            slots: t
                .parts()
                .iter()
                .map(|p| match p {
                    Part::Literal(s) => Slot::Literal(s.clone()),
                    Part::Column(c) => match relation.columns.iter().position(|col| col.name == *c) {
                        Some(i) => Slot::Column(i),
                        None => {
                            missing.push(MissingColumn {
                                rule: rule.name.clone(),
                                table: table.to_string(),
                                column: c.clone(),
                            });
                            Slot::Missing
                        }
                    },
                })
                .collect(),
        };
        let rules: Vec<BoundRule> = self
            .rules
            .for_table(&table)
            .iter()
            .map(|r| BoundRule {
                rule: r.clone(),
                keys: r.keys.iter().map(|t| bind(r, t)).collect(),
                patterns: r.patterns.iter().map(|t| bind(r, t)).collect(),
            })
            .collect();
        self.bound.insert(relation.oid, rules);
        missing
    }

    /// Appends the actions for `change` to `out`. The relation must have been bound.
    pub fn route(&mut self, change: &Change<'_>, out: &mut Vec<Routed>) {
        let Some(rules) = self.bound.get(&change.relation.oid) else { return };
        for bound in rules.iter().filter(|b| b.rule.on.contains(change.op)) {
            let sides: &[Side] = match change.op {
                Op::Insert => &[Side::New],
                Op::Update => &[Side::Old, Side::New],
                Op::Delete => &[Side::Old],
                Op::Truncate => &[Side::Nothing],
            };
            for &side in sides {
                let look = |i: usize| lookup(change, side, i);
                for t in &bound.keys {
                    out.push(render(&mut self.scratch, &bound.rule.name, t, false, &look));
                }
                for t in &bound.patterns {
                    out.push(render(&mut self.scratch, &bound.rule.name, t, true, &look));
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Old,
    New,
    Nothing,
}

fn text(v: &Value) -> Option<Lookup<'_>> {
    match v {
        Value::Text(b) | Value::Binary(b) => {
            Some(std::str::from_utf8(b).map_or(Lookup::Unknown(Widening::NotText), Lookup::Known))
        }
        Value::Null => Some(Lookup::Unknown(Widening::NullValue)),
        Value::UnchangedToast => None,
    }
}

fn lookup<'a>(change: &Change<'a>, side: Side, i: usize) -> Lookup<'a> {
    let is_key = change.relation.columns.get(i).is_some_and(|c| c.key);
    let new = || change.new.and_then(|t| t.0.get(i));
    match (side, change.old) {
        (Side::Nothing, _) => Lookup::Unknown(Widening::Truncate),
        (Side::New, old) => match new().map(text) {
            Some(Some(l)) => l,
            // Unchanged TOAST: the value is the old one, if the old image carries it.
            Some(None) => match old {
                Some(OldTuple::Full(t)) => {
                    t.0.get(i).and_then(text).unwrap_or(Lookup::Unknown(Widening::UnchangedToast))
                }
                Some(OldTuple::Key(t)) if is_key => {
                    t.0.get(i).and_then(text).unwrap_or(Lookup::Unknown(Widening::UnchangedToast))
                }
                _ => Lookup::Unknown(Widening::UnchangedToast),
            },
            None => Lookup::Unknown(Widening::UnknownColumn),
        },
        (Side::Old, Some(OldTuple::Full(t))) => {
            t.0.get(i).and_then(text).unwrap_or(Lookup::Unknown(Widening::UnchangedToast))
        }
        (Side::Old, Some(OldTuple::Key(t))) if is_key => {
            t.0.get(i).and_then(text).unwrap_or(Lookup::Unknown(Widening::UnchangedToast))
        }
        // Without an old image the key columns did not change, so the new values hold.
        (Side::Old, None) if is_key && change.op == Op::Update => {
            new().and_then(text).unwrap_or(Lookup::Unknown(Widening::UnchangedToast))
        }
        (Side::Old, _) => Lookup::Unknown(Widening::OldImageMissing),
    }
}

fn render<'a>(
    buf: &mut String,
    rule: &Arc<str>,
    t: &BoundTemplate,
    pattern: bool,
    look: &dyn Fn(usize) -> Lookup<'a>,
) -> Routed {
    buf.clear();
    let mut widened = None;
    if !pattern {
        // Fast path: every value known, the key is the plain concatenation.
        for slot in &t.slots {
            match slot {
                Slot::Literal(s) => buf.push_str(s),
                Slot::Column(i) => match look(*i) {
                    Lookup::Known(v) => buf.push_str(v),
                    Lookup::Unknown(why) => {
                        widened = Some(why);
                        break;
                    }
                },
                Slot::Missing => {
                    widened = Some(Widening::UnknownColumn);
                    break;
                }
            }
        }
        if widened.is_none() {
            return Routed { rule: rule.clone(), action: Action::Unlink(buf.clone()), widened: None };
        }
        buf.clear();
    }
    for slot in &t.slots {
        match slot {
            Slot::Literal(s) if pattern => buf.push_str(s),
            Slot::Literal(s) => glob_escape_into(buf, s),
            Slot::Column(i) => match look(*i) {
                Lookup::Known(v) => glob_escape_into(buf, v),
                Lookup::Unknown(why) => {
                    widened.get_or_insert(why);
                    buf.push('*');
                }
            },
            Slot::Missing => {
                widened.get_or_insert(Widening::UnknownColumn);
                buf.push('*');
            }
        }
    }
    Routed { rule: rule.clone(), action: Action::ScanUnlink(buf.clone()), widened }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Column, ReplicaIdentity};
    use std::path::PathBuf;

    const RULES: &str = r#"
[[rule]]
name = "org users"
table = "members"
keys = ["org:{org_id}:users", "user:{id}"]

[[rule]]
name = "profile"
table = "members"
on = ["update"]
patterns = ["profile_{bio}_*"]
"#;

    fn relation() -> Relation {
        let col = |name: &str, key: bool| Column { key, name: name.into(), type_oid: 25, type_modifier: -1 };
        Relation {
            xid: None,
            oid: 42,
            namespace: "public".into(),
            name: "members".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![col("id", true), col("org_id", false), col("bio", false)],
        }
    }

    fn tuple(values: &[Option<&str>]) -> Tuple {
        Tuple(
            values
                .iter()
                .map(|v| match v {
                    Some("<toast>") => Value::UnchangedToast,
                    Some(s) => Value::Text(bytes::Bytes::copy_from_slice(s.as_bytes())),
                    None => Value::Null,
                })
                .collect(),
        )
    }

    fn route(op: Op, old: Option<OldTuple>, new: Option<Tuple>) -> Vec<String> {
        let rules = RuleSet::from_sources(&[(PathBuf::from("r.toml"), RULES.into())]).unwrap().rules;
        let mut router = Router::new(Arc::new(rules));
        let rel = relation();
        assert!(router.bind(&rel).is_empty());
        let mut out = Vec::new();
        router.route(&Change { relation: &rel, op, old: old.as_ref(), new: new.as_ref() }, &mut out);
        let mut lines: Vec<String> = out
            .iter()
            .map(|r| match r.widened {
                Some(w) => format!("{} [{w}]", r.action),
                None => r.action.to_string(),
            })
            .collect();
        lines.sort();
        lines.dedup();
        lines
    }

    #[test]
    fn insert_busts_the_new_rows_keys() {
        let got = route(Op::Insert, None, Some(tuple(&[Some("7"), Some("acme"), Some("hi")])));
        assert_eq!(got, ["UNLINK org:acme:users", "UNLINK user:7"]);
    }

    #[test]
    fn update_with_full_old_image_busts_old_and_new() {
        let old = OldTuple::Full(tuple(&[Some("7"), Some("acme"), Some("a")]));
        let got = route(Op::Update, Some(old), Some(tuple(&[Some("7"), Some("globex"), Some("a")])));
        assert_eq!(
            got,
            ["SCAN-UNLINK profile_a_*", "UNLINK org:acme:users", "UNLINK org:globex:users", "UNLINK user:7"]
        );
    }

    #[test]
    fn update_without_old_image_widens_non_key_columns_only() {
        let got = route(Op::Update, None, Some(tuple(&[Some("7"), Some("globex"), Some("b")])));
        assert_eq!(
            got,
            [
                "SCAN-UNLINK org:*:users [old_image_missing]",
                "SCAN-UNLINK profile_*_* [old_image_missing]",
                "SCAN-UNLINK profile_b_*",
                "UNLINK org:globex:users",
                "UNLINK user:7",
            ]
        );
    }

    #[test]
    fn key_changing_update_under_default_identity_uses_the_key_image() {
        let old = OldTuple::Key(tuple(&[Some("6"), None, None]));
        let got = route(Op::Update, Some(old), Some(tuple(&[Some("7"), Some("acme"), Some("b")])));
        assert!(got.contains(&"UNLINK user:6".to_string()), "{got:?}");
        assert!(got.contains(&"SCAN-UNLINK org:*:users [old_image_missing]".to_string()), "{got:?}");
    }

    #[test]
    fn unchanged_toast_takes_the_old_value_or_widens() {
        let full = OldTuple::Full(tuple(&[Some("7"), Some("acme"), Some("long")]));
        let got = route(Op::Update, Some(full), Some(tuple(&[Some("7"), Some("acme"), Some("<toast>")])));
        assert_eq!(got, ["SCAN-UNLINK profile_long_*", "UNLINK org:acme:users", "UNLINK user:7"]);
        let got = route(Op::Update, None, Some(tuple(&[Some("7"), Some("acme"), Some("<toast>")])));
        assert!(got.contains(&"SCAN-UNLINK profile_*_* [unchanged_toast]".to_string()), "{got:?}");
    }

    #[test]
    fn delete_uses_the_old_image() {
        let got = route(Op::Delete, Some(OldTuple::Key(tuple(&[Some("7"), None, None]))), None);
        assert_eq!(got, ["SCAN-UNLINK org:*:users [old_image_missing]", "UNLINK user:7"]);
    }

    #[test]
    fn truncate_widens_every_placeholder() {
        let got = route(Op::Truncate, None, None);
        assert_eq!(got, ["SCAN-UNLINK org:*:users [truncate]", "SCAN-UNLINK user:* [truncate]"]);
    }

    #[test]
    fn row_values_cannot_widen_a_pattern() {
        let old = OldTuple::Full(tuple(&[Some("7"), Some("a*"), Some("[a-z]")]));
        let got = route(Op::Update, Some(old), Some(tuple(&[Some("7"), Some("a*"), Some("*")])));
        assert!(got.contains(&r"SCAN-UNLINK profile_\[a-z\]_*".to_string()), "{got:?}");
        assert!(got.contains(&r"SCAN-UNLINK profile_\*_*".to_string()), "{got:?}");
        assert!(got.contains(&"UNLINK org:a*:users".to_string()), "exact keys are not escaped: {got:?}");
    }

    #[test]
    fn null_values_widen() {
        let got = route(Op::Insert, None, Some(tuple(&[Some("7"), None, Some("x")])));
        assert_eq!(got, ["SCAN-UNLINK org:*:users [null_value]", "UNLINK user:7"]);
    }

    #[test]
    fn a_column_the_table_lacks_is_reported_and_widened() {
        let rules = RuleSet::from_sources(&[(
            PathBuf::from("r.toml"),
            "[[rule]]\nname = \"x\"\ntable = \"members\"\nkeys = [\"m:{emial}:{id}\"]\n".into(),
        )])
        .unwrap()
        .rules;
        let mut router = Router::new(Arc::new(rules));
        let rel = relation();
        let missing = router.bind(&rel);
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].column, "emial");
        let mut out = Vec::new();
        let new = tuple(&[Some("7"), Some("acme"), Some("hi")]);
        router.route(&Change { relation: &rel, op: Op::Insert, old: None, new: Some(&new) }, &mut out);
        assert_eq!(out[0].action, Action::ScanUnlink("m:*:7".into()));
        assert_eq!(out[0].widened, Some(Widening::UnknownColumn));
    }

    #[test]
    fn rebinding_after_ddl_follows_the_new_column_order() {
        let rules = RuleSet::from_sources(&[(PathBuf::from("r.toml"), RULES.into())]).unwrap().rules;
        let mut router = Router::new(Arc::new(rules));
        let mut rel = relation();
        router.bind(&rel);
        rel.columns.swap(1, 2);
        router.bind(&rel);
        let mut out = Vec::new();
        let new = tuple(&[Some("7"), Some("bio"), Some("acme")]);
        router.route(&Change { relation: &rel, op: Op::Insert, old: None, new: Some(&new) }, &mut out);
        assert!(out.iter().any(|r| r.action == Action::Unlink("org:acme:users".into())), "{out:?}");
    }
}

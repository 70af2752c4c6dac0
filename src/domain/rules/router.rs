//! The router: turns one decoded change into invalidation actions.
//!
//! Rules are bound to a relation when its Relation message arrives (and bound again when
//! DDL re-sends it), so routing a change never looks up a column by name. The router sees
//! the old and the new image and invalidates the union. Where a value an action needs is
//! not in the stream, that placeholder becomes `*` and the action becomes its pattern
//! form (`SCAN-UNLINK`, `SCAN-BUST-TAG`, `SCAN-INCR`): walbust over-invalidates rather
//! than skip, and counts why.

use super::template::{Filter, Image, Part, Template, Value as Placeholder};
use super::{Op, Rule, RuleSet, TableName, Test};
use crate::domain::action::{Action, MAX_KEY_BYTES, MAX_VALUE_BYTES, glob_escape_into};
use crate::postgres::pgoutput::{OldTuple, Relation, Tuple, Value};
use foldhash::{HashMap, HashMapExt};
use std::fmt;
use std::fmt::Write as _;
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
    /// The change has no new image (`{new.col}` on a delete).
    NewImageMissing,
    /// The column is NULL, so no key can be built from it.
    NullValue,
    /// The rule names a column the table does not have.
    UnknownColumn,
    /// The value is not valid UTF-8 text.
    NotText,
    /// The key would be longer than [`MAX_KEY_BYTES`] (a huge value in the template), or a
    /// write-through value longer than [`MAX_VALUE_BYTES`].
    TooLong,
}

impl Widening {
    /// The reason as used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Widening::Truncate => "truncate",
            Widening::UnchangedToast => "unchanged_toast",
            Widening::OldImageMissing => "old_image_missing",
            Widening::NewImageMissing => "new_image_missing",
            Widening::NullValue => "null_value",
            Widening::UnknownColumn => "unknown_column",
            Widening::NotText => "not_text",
            Widening::TooLong => "too_long",
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
    /// Set when an exact action was widened to a pattern, with the reason.
    pub widened: Option<Widening>,
}

#[derive(Debug)]
enum Slot {
    Literal(String),
    Value(Bound, Vec<Filter>),
}

#[derive(Debug, Clone, Copy)]
enum Bound {
    Column(usize, Image),
    Missing,
    Table,
    Schema,
    Op,
}

#[derive(Debug)]
struct BoundTemplate {
    slots: Vec<Slot>,
}

#[derive(Debug)]
struct BoundRefresh {
    key: BoundTemplate,
    columns: Vec<(String, Option<usize>)>,
    ttl: Option<u64>,
}

#[derive(Debug)]
struct BoundRule {
    rule: Arc<Rule>,
    when: Vec<(Option<usize>, Test)>,
    changed: Vec<Option<usize>>,
    keys: Vec<BoundTemplate>,
    patterns: Vec<BoundTemplate>,
    tags: Vec<BoundTemplate>,
    bump: Vec<BoundTemplate>,
    publish: Vec<(String, Option<BoundTemplate>)>,
    refresh: Vec<BoundRefresh>,
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

#[derive(Debug, Clone, Copy)]
enum Lookup<'a> {
    Known(&'a str),
    Null,
    Unknown(Widening),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Old,
    New,
    Nothing,
}

/// What a rendered template came to.
enum Rendered {
    Exact(String),
    Pattern(String, Widening),
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

    /// Swaps in a new rule set; relations must be bound again.
    pub fn replace_rules(&mut self, rules: Arc<RuleSet>) {
        self.rules = rules;
        self.bound.clear();
    }

    /// Binds the rules for `relation`, replacing an earlier binding for its OID.
    /// Returns the columns rules name that the table lacks: their actions will be widened.
    pub fn bind(&mut self, relation: &Relation) -> Vec<MissingColumn> {
        let table = TableName { schema: relation.namespace.clone(), table: relation.name.clone() };
        let mut missing = Vec::new();
        let mut index = |rule: &Rule, name: &str| -> Option<usize> {
            let i = relation.columns.iter().position(|c| c.name == name);
            if i.is_none() {
                let m = MissingColumn { rule: rule.name.clone(), table: table.to_string(), column: name.to_string() };
                if !missing.contains(&m) {
                    missing.push(m);
                }
            }
            i
        };
        let mut rules = Vec::new();
        for r in self.rules.for_table(&table) {
            let mut bind = |t: &Template| BoundTemplate {
                slots: t
                    .parts()
                    .iter()
                    .map(|p| match p {
                        Part::Literal(s) => Slot::Literal(s.clone()),
                        Part::Placeholder { value, filters } => {
                            let bound = match value {
                                Placeholder::Column { image, name } => {
                                    index(r, name).map_or(Bound::Missing, |i| Bound::Column(i, *image))
                                }
                                Placeholder::Table => Bound::Table,
                                Placeholder::Schema => Bound::Schema,
                                Placeholder::Op => Bound::Op,
                            };
                            Slot::Value(bound, filters.clone())
                        }
                    })
                    .collect(),
            };
            let keys = r.keys.iter().map(&mut bind).collect();
            let patterns = r.patterns.iter().map(&mut bind).collect();
            let tags = r.tags.iter().map(&mut bind).collect();
            let bump = r.bump.iter().map(&mut bind).collect();
            let publish = r.publish.iter().map(|p| (p.channel.clone(), p.message.as_ref().map(&mut bind))).collect();
            let refresh_keys: Vec<BoundTemplate> = r.refresh.iter().map(|f| bind(&f.key)).collect();
            let refresh = r
                .refresh
                .iter()
                .zip(refresh_keys)
                .map(|(f, key)| {
                    let names: Vec<String> = match &f.columns {
                        Some(c) => c.clone(),
                        None => relation.columns.iter().map(|c| c.name.clone()).collect(),
                    };
                    let columns = names.into_iter().map(|n| (n.clone(), index(r, &n))).collect();
                    BoundRefresh { key, columns, ttl: f.ttl }
                })
                .collect();
            let when = r.when.iter().map(|c| (index(r, &c.column), c.test.clone())).collect();
            let changed = r.changed.iter().map(|c| index(r, c)).collect();
            rules.push(BoundRule { rule: r.clone(), when, changed, keys, patterns, tags, bump, publish, refresh });
        }
        self.bound.insert(relation.oid, rules);
        missing
    }

    /// Appends the actions for `change` to `out`. The relation must have been bound.
    pub fn route(&mut self, change: &Change<'_>, out: &mut Vec<Routed>) {
        let Some(rules) = self.bound.get(&change.relation.oid) else { return };
        let buf = &mut self.scratch;
        for bound in rules.iter().filter(|b| b.rule.on.contains(change.op)) {
            if !when_holds(bound, change) || !changed_holds(bound, change) {
                continue;
            }
            let sides: &[Side] = match change.op {
                Op::Insert => &[Side::New],
                Op::Update => &[Side::Old, Side::New],
                Op::Delete => &[Side::Old],
                Op::Truncate => &[Side::Nothing],
            };
            let rule = &bound.rule.name;
            let start = out.len();
            let push = |out: &mut Vec<Routed>, r: Rendered, exact: fn(String) -> Action, wide: fn(String) -> Action| {
                out.push(match r {
                    Rendered::Exact(k) => Routed { rule: rule.clone(), action: exact(k), widened: None },
                    Rendered::Pattern(p, why) => Routed { rule: rule.clone(), action: wide(p), widened: Some(why) },
                })
            };
            for &side in sides {
                for t in &bound.keys {
                    push(out, render(buf, t, change, side, false), Action::Unlink, Action::ScanUnlink);
                }
                for t in &bound.patterns {
                    match render(buf, t, change, side, true) {
                        Rendered::Exact(p) => {
                            out.push(Routed { rule: rule.clone(), action: Action::ScanUnlink(p), widened: None })
                        }
                        r => push(out, r, Action::ScanUnlink, Action::ScanUnlink),
                    }
                }
                for t in &bound.tags {
                    push(out, render(buf, t, change, side, false), Action::BustTag, Action::ScanBustTag);
                }
                for t in &bound.bump {
                    push(out, render(buf, t, change, side, false), Action::Incr, Action::ScanIncr);
                }
            }
            for f in &bound.refresh {
                refresh(buf, f, change, rule, out);
            }
            for (channel, message) in &bound.publish {
                let (message, widened) = match message {
                    Some(t) => message_text(buf, t, change),
                    None => (default_message(change, rule, &out[start..]), None),
                };
                out.push(Routed {
                    rule: rule.clone(),
                    action: Action::Publish { channel: channel.clone(), message },
                    widened,
                });
            }
        }
    }
}

/// The image a row-level condition or message reads: the new row, or the old for deletes.
fn row_side(op: Op) -> Side {
    match op {
        Op::Delete => Side::Old,
        Op::Truncate => Side::Nothing,
        Op::Insert | Op::Update => Side::New,
    }
}

/// `when`: every condition holds on the new image (the old for deletes). For updates a
/// row leaving the condition must still invalidate, so the old image counts too when it is
/// sent. A value the stream lacks counts as a match.
fn when_holds(bound: &BoundRule, change: &Change<'_>) -> bool {
    let holds_on = |side: Side| {
        bound.when.iter().all(|(idx, test)| {
            let Some(i) = idx else { return true };
            match (lookup(change, side, *i, Image::Row), test) {
                (Lookup::Unknown(_), _) => true,
                (Lookup::Null, Test::Null(want)) => *want,
                (Lookup::Known(_), Test::Null(want)) => !*want,
                (Lookup::Null, Test::OneOf(_)) => false,
                (Lookup::Known(v), Test::OneOf(list)) => list.iter().any(|x| x == v),
            }
        })
    };
    match change.op {
        Op::Truncate => true,
        Op::Update if matches!(change.old, Some(OldTuple::Full(_))) => holds_on(Side::New) || holds_on(Side::Old),
        op => holds_on(row_side(op)),
    }
}

/// `changed`: an update fires only when a listed column changed; when the stream cannot
/// tell, it counts as changed.
fn changed_holds(bound: &BoundRule, change: &Change<'_>) -> bool {
    if change.op != Op::Update || bound.changed.is_empty() {
        return true;
    }
    bound.changed.iter().any(|idx| {
        let Some(i) = *idx else { return true };
        let new = change.new.and_then(|t| t.0.get(i));
        if matches!(new, Some(Value::UnchangedToast)) {
            return false;
        }
        let is_key = change.relation.columns.get(i).is_some_and(|c| c.key);
        let old = match change.old {
            Some(OldTuple::Full(t)) => t.0.get(i),
            Some(OldTuple::Key(t)) if is_key => t.0.get(i),
            // No old image: key columns did not change, others cannot be told.
            None if is_key => return false,
            _ => return true,
        };
        match (old, new) {
            (Some(Value::Text(a) | Value::Binary(a)), Some(Value::Text(b) | Value::Binary(b))) => a != b,
            (Some(Value::Null), Some(Value::Null)) => false,
            _ => true,
        }
    })
}

fn text(v: &Value) -> Option<Lookup<'_>> {
    match v {
        Value::Text(b) | Value::Binary(b) => {
            Some(std::str::from_utf8(b).map_or(Lookup::Unknown(Widening::NotText), Lookup::Known))
        }
        Value::Null => Some(Lookup::Null),
        Value::UnchangedToast => None,
    }
}

fn lookup<'a>(change: &Change<'a>, side: Side, i: usize, image: Image) -> Lookup<'a> {
    let side = match (image, side) {
        (_, Side::Nothing) => return Lookup::Unknown(Widening::Truncate),
        (Image::Row, s) => s,
        (Image::Old, _) => Side::Old,
        (Image::New, _) => Side::New,
    };
    let is_key = change.relation.columns.get(i).is_some_and(|c| c.key);
    let new = || change.new.and_then(|t| t.0.get(i));
    let old_or_toast = |t: &'a Tuple| t.0.get(i).and_then(text).unwrap_or(Lookup::Unknown(Widening::UnchangedToast));
    match (side, change.old) {
        (Side::New, _) if change.new.is_none() => Lookup::Unknown(Widening::NewImageMissing),
        (Side::New, old) => match new().map(text) {
            Some(Some(l)) => l,
            // Unchanged TOAST: the value is the old one, if the old image carries it.
            Some(None) => match old {
                Some(OldTuple::Full(t)) => old_or_toast(t),
                Some(OldTuple::Key(t)) if is_key => old_or_toast(t),
                _ => Lookup::Unknown(Widening::UnchangedToast),
            },
            None => Lookup::Unknown(Widening::UnknownColumn),
        },
        (Side::Old, Some(OldTuple::Full(t))) => old_or_toast(t),
        (Side::Old, Some(OldTuple::Key(t))) if is_key => old_or_toast(t),
        // Without an old image the key columns did not change, so the new values hold.
        (Side::Old, None) if is_key && change.op == Op::Update => {
            new().and_then(text).unwrap_or(Lookup::Unknown(Widening::UnchangedToast))
        }
        (Side::Old, _) => Lookup::Unknown(Widening::OldImageMissing),
        (Side::Nothing, _) => Lookup::Unknown(Widening::Truncate),
    }
}

fn value_of<'a>(bound: Bound, change: &Change<'a>, side: Side) -> Lookup<'a> {
    match bound {
        Bound::Column(i, image) => lookup(change, side, i, image),
        Bound::Missing => Lookup::Unknown(Widening::UnknownColumn),
        Bound::Table => Lookup::Known(&change.relation.name),
        Bound::Schema => Lookup::Known(&change.relation.namespace),
        Bound::Op => Lookup::Known(change.op.as_str()),
    }
}

fn filtered<'v>(v: &'v str, filters: &[Filter], owned: &'v mut String) -> &'v str {
    if filters.is_empty() {
        return v;
    }
    *owned = filters.iter().fold(v.to_string(), |s, f| f.apply(&s));
    owned
}

/// Renders `t` for one side. Keys come out exact when every value is known; otherwise
/// (and always for `pattern` templates) as a glob with row values escaped.
fn render(buf: &mut String, t: &BoundTemplate, change: &Change<'_>, side: Side, pattern: bool) -> Rendered {
    let rendered = render_values(buf, t, change, side, pattern);
    if buf.len() <= MAX_KEY_BYTES {
        return rendered;
    }
    // Too long to send: every value becomes `*`, which still covers the key.
    buf.clear();
    for slot in &t.slots {
        match slot {
            Slot::Literal(s) if pattern => buf.push_str(s),
            Slot::Literal(s) => glob_escape_into(buf, s),
            Slot::Value(..) if buf.ends_with('*') => {}
            Slot::Value(..) => buf.push('*'),
        }
    }
    buf.shrink_to(MAX_KEY_BYTES);
    Rendered::Pattern(buf.clone(), Widening::TooLong)
}

/// [`render`] before the length cap.
fn render_values(buf: &mut String, t: &BoundTemplate, change: &Change<'_>, side: Side, pattern: bool) -> Rendered {
    let mut owned = String::new();
    buf.clear();
    let mut widened = None;
    if !pattern {
        // Fast path: every value known, the key is the plain concatenation.
        for slot in &t.slots {
            match slot {
                Slot::Literal(s) => buf.push_str(s),
                Slot::Value(b, filters) => match value_of(*b, change, side) {
                    Lookup::Known(v) if buf.len() + v.len() > MAX_KEY_BYTES => {
                        widened = Some(Widening::TooLong);
                        break;
                    }
                    Lookup::Known(v) => buf.push_str(filtered(v, filters, &mut owned)),
                    Lookup::Null => {
                        widened = Some(Widening::NullValue);
                        break;
                    }
                    Lookup::Unknown(why) => {
                        widened = Some(why);
                        break;
                    }
                },
            }
        }
        if widened.is_none() {
            return Rendered::Exact(buf.clone());
        }
        buf.clear();
    }
    for slot in &t.slots {
        match slot {
            Slot::Literal(s) if pattern => buf.push_str(s),
            Slot::Literal(s) => glob_escape_into(buf, s),
            Slot::Value(b, filters) => match value_of(*b, change, side) {
                Lookup::Known(v) if v.len() > MAX_KEY_BYTES => {
                    widened.get_or_insert(Widening::TooLong);
                    buf.push('*');
                }
                Lookup::Known(v) => glob_escape_into(buf, filtered(v, filters, &mut owned)),
                Lookup::Null => {
                    widened.get_or_insert(Widening::NullValue);
                    buf.push('*');
                }
                Lookup::Unknown(why) => {
                    widened.get_or_insert(why);
                    buf.push('*');
                }
            },
        }
    }
    match widened {
        Some(why) => Rendered::Pattern(buf.clone(), why),
        None => Rendered::Exact(buf.clone()),
    }
}

/// Write-through: SET the new row as JSON; UNLINK where the row went away, moved, or
/// cannot be written whole.
fn refresh(buf: &mut String, f: &BoundRefresh, change: &Change<'_>, rule: &Arc<str>, out: &mut Vec<Routed>) {
    let routed = |action, widened| Routed { rule: rule.clone(), action, widened };
    let unlink = |r: Rendered| match r {
        Rendered::Exact(k) => routed(Action::Unlink(k), None),
        Rendered::Pattern(p, why) => routed(Action::ScanUnlink(p), Some(why)),
    };
    match change.op {
        Op::Truncate => out.push(unlink(render(buf, &f.key, change, Side::Nothing, false))),
        Op::Delete => out.push(unlink(render(buf, &f.key, change, Side::Old, false))),
        Op::Insert | Op::Update => {
            let new_key = render(buf, &f.key, change, Side::New, false);
            if change.op == Op::Update {
                // A row whose key changed leaves its old key behind: drop it first.
                match render(buf, &f.key, change, Side::Old, false) {
                    Rendered::Exact(old) if matches!(&new_key, Rendered::Exact(new) if *new == old) => {}
                    old => out.push(unlink(old)),
                }
            }
            match new_key {
                Rendered::Exact(key) => match row_json(f, change) {
                    Some(value) if value.len() > MAX_VALUE_BYTES => {
                        out.push(routed(Action::Unlink(key), Some(Widening::TooLong)))
                    }
                    Some(value) => out.push(routed(Action::Set { key, value, ttl: f.ttl }, None)),
                    None => out.push(routed(Action::Unlink(key), Some(Widening::UnchangedToast))),
                },
                wide => out.push(unlink(wide)),
            }
        }
    }
}

/// The new row as a JSON object of the refresh's columns, typed by column type; `None`
/// when a value is not in the stream.
fn row_json(f: &BoundRefresh, change: &Change<'_>) -> Option<String> {
    let mut json = String::from("{");
    for (n, (name, idx)) in f.columns.iter().enumerate() {
        let i = (*idx)?;
        if n > 0 {
            json.push(',');
        }
        json.push_str(&serde_json::to_string(name).ok()?);
        json.push(':');
        match lookup(change, Side::New, i, Image::Row) {
            Lookup::Null => json.push_str("null"),
            Lookup::Unknown(_) => return None,
            Lookup::Known(v) => {
                let type_oid = change.relation.columns.get(i).map_or(0, |c| c.type_oid);
                push_typed(&mut json, type_oid, v);
            }
        }
    }
    json.push('}');
    Some(json)
}

/// Writes a Postgres text value as JSON: booleans and numbers as such, json as itself,
/// everything else as a string.
fn push_typed(json: &mut String, type_oid: u32, v: &str) {
    const BOOL: u32 = 16;
    const NUMBERS: [u32; 7] = [20, 21, 23, 26, 700, 701, 1700];
    const JSON: [u32; 2] = [114, 3802];
    match type_oid {
        BOOL if v == "t" || v == "f" => json.push_str(if v == "t" { "true" } else { "false" }),
        t if NUMBERS.contains(&t)
            && v.parse::<f64>().is_ok_and(f64::is_finite)
            && !v.contains(['N', 'n', 'I', 'i']) =>
        {
            json.push_str(v)
        }
        t if JSON.contains(&t) => json.push_str(v),
        _ => json.push_str(&serde_json::Value::String(v.to_string()).to_string()),
    }
}

/// A `publish` message template, rendered from the new row (the old for deletes);
/// a value the stream lacks renders as `*`, and so does a value that would make the
/// message longer than [`MAX_VALUE_BYTES`] (counted as a `too_long` widening), so that one
/// huge row value never becomes a huge message.
fn message_text(buf: &mut String, t: &BoundTemplate, change: &Change<'_>) -> (String, Option<Widening>) {
    let side = row_side(change.op);
    let mut owned = String::new();
    let mut widened = None;
    buf.clear();
    for slot in &t.slots {
        match slot {
            Slot::Literal(s) => buf.push_str(s),
            Slot::Value(b, filters) => match value_of(*b, change, side) {
                Lookup::Known(v) => {
                    let v = filtered(v, filters, &mut owned);
                    if buf.len() + v.len() > MAX_VALUE_BYTES {
                        buf.push('*');
                        widened = Some(Widening::TooLong);
                    } else {
                        buf.push_str(v);
                    }
                }
                Lookup::Null | Lookup::Unknown(_) => buf.push('*'),
            },
        }
    }
    (buf.clone(), widened)
}

/// `{"keys":[...],"op":"update","rule":"...","table":"schema.table"}`, keys being what the
/// rule busted for this change.
fn default_message(change: &Change<'_>, rule: &Arc<str>, busted: &[Routed]) -> String {
    let mut keys: Vec<&str> = Vec::new();
    for r in busted {
        let k = match &r.action {
            Action::Unlink(k) | Action::ScanUnlink(k) | Action::BustTag(k) | Action::ScanBustTag(k) => k,
            Action::Incr(k) | Action::ScanIncr(k) | Action::Set { key: k, .. } => k,
            Action::Publish { .. } => continue,
        };
        if !keys.contains(&k.as_str()) {
            keys.push(k);
        }
    }
    let mut m = String::new();
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let _ = write!(
        m,
        "{{\"keys\":[{}],\"op\":{},\"rule\":{},\"table\":{}}}",
        keys.iter().map(|k| q(k)).collect::<Vec<_>>().join(","),
        q(change.op.as_str()),
        q(rule),
        q(&change.relation.qualified_name())
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::pgoutput::{Column, ReplicaIdentity};
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

    fn route_with(rules: &str, op: Op, old: Option<OldTuple>, new: Option<Tuple>) -> Vec<String> {
        let rules = RuleSet::from_sources(&[(PathBuf::from("r.toml"), rules.into())]).unwrap().rules;
        let mut router = Router::new(Arc::new(rules));
        let rel = relation();
        router.bind(&rel);
        let mut out = Vec::new();
        router.route(&Change { relation: &rel, op, old: old.as_ref(), new: new.as_ref() }, &mut out);
        out.iter().map(|r| r.action.to_string()).collect()
    }

    fn row(id: &str, org: &str, bio: &str) -> Tuple {
        tuple(&[Some(id), Some(org), Some(bio)])
    }

    #[test]
    fn a_publish_message_rendered_from_a_huge_value_stays_under_the_value_cap() {
        let rules = "[[rule]]\nname = \"r\"\ntable = \"members\"\nkeys = [\"k:{id}\"]\n\
                     publish = [{ channel = \"bios\", message = \"{id}:{bio}\" }]\n";
        let rules = RuleSet::from_sources(&[(PathBuf::from("r.toml"), rules.into())]).unwrap().rules;
        let mut router = Router::new(Arc::new(rules));
        let rel = relation();
        router.bind(&rel);
        for (bio, message, widened) in [
            ("x".repeat(MAX_VALUE_BYTES + 1), "1:*".to_string(), Some(Widening::TooLong)),
            ("short".to_string(), "1:short".to_string(), None),
        ] {
            let new = row("1", "o", &bio);
            let mut out = Vec::new();
            router.route(&Change { relation: &rel, op: Op::Insert, old: None, new: Some(&new) }, &mut out);
            let publish = out.iter().find(|r| matches!(r.action, Action::Publish { .. })).expect("a publish");
            assert_eq!(publish.action, Action::Publish { channel: "bios".into(), message });
            assert_eq!(publish.widened, widened);
        }
    }

    #[test]
    fn a_key_rendered_from_a_huge_value_is_widened_instead_of_sent() {
        let rules = "[[rule]]\nname = \"r\"\ntable = \"members\"\nkeys = [\"bio:{bio}:{id}\"]\npatterns = [\"p:{bio}:*\"]\n\
                     refresh = [{ key = \"row:{id}\", columns = [\"id\", \"bio\"] }]\n";
        let huge = "x".repeat(MAX_KEY_BYTES + 1);
        let got = route_with(rules, Op::Insert, None, Some(row("1", "o", &huge)));
        assert_eq!(got[..2], ["SCAN-UNLINK bio:*:1", "SCAN-UNLINK p:*:*"]);
        assert!(
            got[2].starts_with("SET row:1 "),
            "a value under its own cap is still written through: {}",
            &got[2][..40]
        );
        let too_big = "y".repeat(MAX_VALUE_BYTES);
        let got = route_with(rules, Op::Insert, None, Some(row("1", "o", &too_big)));
        assert_eq!(got[2], "UNLINK row:1", "a write-through value over the cap is unlinked instead");
        // Below the cap the key is exact.
        let long = "z".repeat(1000);
        let got = route_with(rules, Op::Insert, None, Some(row("1", "o", &long)));
        assert_eq!(got[0], format!("UNLINK bio:{long}:1"));
    }

    #[test]
    fn when_conditions_filter_on_the_new_row_and_the_old_for_deletes() {
        let rules = "[[rule]]\nname = \"a\"\ntable = \"members\"\nwhen = { org_id = [\"acme\", \"globex\"], bio = { null = false } }\nkeys = [\"k:{id}\"]\n";
        assert_eq!(route_with(rules, Op::Insert, None, Some(row("1", "acme", "x"))), ["UNLINK k:1"]);
        assert!(route_with(rules, Op::Insert, None, Some(row("1", "initech", "x"))).is_empty());
        assert!(route_with(rules, Op::Insert, None, Some(tuple(&[Some("1"), Some("acme"), None]))).is_empty());
        let old = OldTuple::Full(row("1", "globex", "x"));
        assert_eq!(route_with(rules, Op::Delete, Some(old), None), ["UNLINK k:1"]);
        // A row leaving the condition still invalidates, when the old image shows it was inside.
        let old = OldTuple::Full(row("1", "acme", "x"));
        assert_eq!(
            route_with(rules, Op::Update, Some(old), Some(row("1", "initech", "x"))),
            ["UNLINK k:1", "UNLINK k:1"]
        );
        // A value the stream lacks counts as a match.
        let old = OldTuple::Key(tuple(&[Some("1"), None, None]));
        assert_eq!(route_with(rules, Op::Delete, Some(old), None), ["UNLINK k:1"]);
    }

    #[test]
    fn changed_fires_only_when_a_listed_column_changed_or_cannot_be_told() {
        let rules = "[[rule]]\nname = \"a\"\ntable = \"members\"\nchanged = [\"bio\"]\nkeys = [\"k:{id}\"]\n";
        let old = || Some(OldTuple::Full(row("1", "acme", "x")));
        assert!(route_with(rules, Op::Update, old(), Some(row("1", "globex", "x"))).is_empty());
        assert_eq!(route_with(rules, Op::Update, old(), Some(row("1", "acme", "y"))), ["UNLINK k:1", "UNLINK k:1"]);
        assert!(
            !route_with(rules, Op::Update, None, Some(row("1", "acme", "x"))).is_empty(),
            "no old image: assume changed"
        );
        let toast = tuple(&[Some("1"), Some("acme"), Some("<toast>")]);
        assert!(route_with(rules, Op::Update, None, Some(toast)).is_empty(), "unchanged TOAST did not change");
        assert_eq!(
            route_with(rules, Op::Insert, None, Some(row("1", "a", "b"))),
            ["UNLINK k:1"],
            "inserts ignore changed"
        );
    }

    #[test]
    fn old_new_table_schema_op_and_filters_render() {
        let rules = "[[rule]]\nname = \"a\"\ntable = \"members\"\nkeys = [\"{schema}.{table}:{op}:{old.org_id|upper}>{new.org_id}\"]\n";
        let old = OldTuple::Full(row("1", "acme", "x"));
        let got = route_with(rules, Op::Update, Some(old), Some(row("1", "globex", "x")));
        assert_eq!(got, ["UNLINK public.members:update:ACME>globex", "UNLINK public.members:update:ACME>globex"]);
        let got = route_with(rules, Op::Insert, None, Some(row("1", "acme", "x")));
        assert_eq!(got, [r"SCAN-UNLINK public.members:insert:*>acme"], "no old row on insert: widened");
    }

    #[test]
    fn tags_and_bumps_have_exact_and_pattern_forms() {
        let rules =
            "[[rule]]\nname = \"a\"\ntable = \"members\"\ntags = [\"idx:{org_id}\"]\nbump = [\"ver:{org_id}\"]\n";
        assert_eq!(
            route_with(rules, Op::Insert, None, Some(row("1", "acme", "x"))),
            ["BUST-TAG idx:acme", "INCR ver:acme"]
        );
        assert_eq!(route_with(rules, Op::Truncate, None, None), ["SCAN-BUST-TAG idx:*", "SCAN-INCR ver:*"]);
    }

    #[test]
    fn refresh_sets_typed_json_and_unlinks_on_delete_move_or_missing_value() {
        let rules = "[[rule]]\nname = \"a\"\ntable = \"members\"\nrefresh = [{ key = \"m:{id}\", columns = [\"id\", \"bio\"], ttl = \"5m\" }]\n";
        let mut rel_row = row("7", "acme", "say \"hi\"");
        let got = route_with(rules, Op::Insert, None, Some(rel_row.clone()));
        assert_eq!(got, [r#"SET m:7 {"id":"7","bio":"say \"hi\""} EX 300"#], "text columns are strings");
        assert_eq!(
            route_with(rules, Op::Delete, Some(OldTuple::Key(tuple(&[Some("7"), None, None]))), None),
            ["UNLINK m:7"]
        );
        let moved =
            route_with(rules, Op::Update, Some(OldTuple::Full(row("6", "acme", "b"))), Some(row("7", "acme", "b")));
        assert_eq!(moved, ["UNLINK m:6", r#"SET m:7 {"id":"7","bio":"b"} EX 300"#]);
        rel_row.0[2] = Value::UnchangedToast;
        assert_eq!(route_with(rules, Op::Update, None, Some(rel_row)), ["UNLINK m:7"], "cannot write a partial row");
        assert_eq!(route_with(rules, Op::Truncate, None, None), ["SCAN-UNLINK m:*"]);
    }

    #[test]
    fn refresh_types_booleans_numbers_and_json() {
        let mut json = String::new();
        push_typed(&mut json, 16, "t");
        push_typed(&mut json, 23, "42");
        push_typed(&mut json, 1700, "NaN");
        push_typed(&mut json, 3802, r#"{"a":1}"#);
        push_typed(&mut json, 25, "x");
        assert_eq!(json, r#"true42"NaN"{"a":1}"x""#);
    }

    #[test]
    fn publish_sends_the_busted_keys_or_a_template() {
        let rules = "[[rule]]\nname = \"a\"\ntable = \"members\"\nkeys = [\"k:{id}\"]\npublish = [{ channel = \"events\" }, { channel = \"ids\", message = \"{op}:{id}\" }]\n";
        let got = route_with(rules, Op::Insert, None, Some(row("1", "acme", "x")));
        assert_eq!(
            got,
            [
                "UNLINK k:1",
                r#"PUBLISH events {"keys":["k:1"],"op":"insert","rule":"a","table":"public.members"}"#,
                "PUBLISH ids insert:1"
            ]
        );
    }
}

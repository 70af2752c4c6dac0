//! Replay: a recording fed through the production routing step ([`Routing`]) and [`Batch`], one
//! transaction at a time, with the actions each produced and a summary; or through two
//! rule sets at once, keeping only what differs.
//!
//! The whole file is read and checked before anything is reported, so a truncated or
//! corrupted line is an error naming its line, never a partial result that looks complete.

use super::format::{ChangeOp, ChangeRecord, Header, Image, Line, Reader, RecordingError, RelationRecord};
use crate::domain::action::Action;
use crate::domain::batch::Batch;
use crate::domain::diagnostic::plural;
use crate::domain::routing::{Routing, Tally};
use crate::domain::rules::manual::{ManualError, ManualPolicy, Refusal};
use crate::domain::rules::{Change, Op, Routed, RuleSet};
use crate::postgres::lsn::Lsn;
use crate::postgres::pgoutput::{OldTuple, Relation, Tuple, Value};
use crate::sink::Sink;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;

/// Where an action came from, for the difference between two rule sets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// A rule, routing a change of a table.
    Rule {
        /// The rule's name.
        rule: Arc<str>,
        /// `schema.table`.
        table: Arc<str>,
    },
    /// A manual invalidation message.
    Message,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Rule { rule, table } => write!(f, "rule `{rule}` on {table}"),
            Source::Message => f.write_str("manual message"),
        }
    }
}

/// What a replayed unit was: a transaction, or a message outside any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A committed transaction.
    Tx {
        /// 1-based position among the recording's transactions.
        number: usize,
        /// Transaction id.
        xid: u32,
        /// End of its commit record.
        end_lsn: Lsn,
    },
    /// A non-transactional message.
    Message {
        /// Its position.
        lsn: Lsn,
    },
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unit::Tx { number, xid, end_lsn } => write!(f, "tx {number}  xid {xid}  end {end_lsn}"),
            Unit::Message { lsn } => write!(f, "message  lsn {lsn}"),
        }
    }
}

/// One transaction (or message) and the actions it produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The recording line it is on.
    pub line: usize,
    /// What it was.
    pub unit: Unit,
    /// Its row changes and messages.
    pub changes: usize,
    /// Its actions, deduplicated through a batch of its own and sorted by canonical text.
    pub actions: Vec<Action>,
    /// Where each action came from, parallel to `actions` (empty unless asked for).
    pub sources: Vec<Vec<Source>>,
    /// What is worth knowing, such as skipped malformed messages.
    pub notes: Vec<String>,
}

/// Totals over a replay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Committed transactions.
    pub transactions: u64,
    /// Non-transactional messages outside transactions.
    pub messages_outside: u64,
    /// Row changes (a TRUNCATE counts once per table).
    pub changes: u64,
    /// Manual invalidation messages applied.
    pub manual_messages: u64,
    /// Manual invalidation messages skipped because their body is malformed.
    pub malformed_messages: u64,
    /// Actions after each transaction's deduplication, summed.
    pub actions: u64,
    /// Row changes per table, by op (insert, update, delete, truncate).
    pub per_table: BTreeMap<String, [u64; 4]>,
    /// Actions per rule and kind, before deduplication (as `walbust_actions_total` counts).
    pub per_rule: BTreeMap<String, BTreeMap<&'static str, u64>>,
    /// Widened actions per rule and reason.
    pub widened: BTreeMap<String, BTreeMap<&'static str, u64>>,
    /// Row changes no rule produced an action for, per table, by op.
    pub unmatched: BTreeMap<String, [u64; 4]>,
    /// Columns rules name that a table definition lacks: (rule, table, column, relation number).
    pub missing_columns: BTreeSet<(String, String, String, u32)>,
    /// Messages with other prefixes, left to their consumers, per prefix.
    pub other_messages: BTreeMap<String, u64>,
}

/// A recording replayed through one rule set.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The recording's header.
    pub header: Header,
    /// Every transaction and message outside transactions, in recording order.
    pub outcomes: Vec<Outcome>,
    /// Totals.
    pub summary: Summary,
}

/// What one transaction does differently under the new rules.
#[derive(Debug, Clone)]
pub struct TxDiff {
    /// The recording line it is on.
    pub line: usize,
    /// What it was.
    pub unit: Unit,
    /// Actions only the new rules produce, with their sources under the new rules.
    pub added: Vec<(Action, Vec<Source>)>,
    /// Actions only the old rules produce, with their sources under the old rules.
    pub dropped: Vec<(Action, Vec<Source>)>,
}

/// The difference between what two rule sets do with one recording.
#[derive(Debug, Clone)]
pub struct Diff {
    /// Transactions and messages outside transactions replayed.
    pub units: usize,
    /// The units whose actions differ, in recording order.
    pub txs: Vec<TxDiff>,
    /// Added actions per source.
    pub added: BTreeMap<Source, u64>,
    /// Dropped actions per source.
    pub dropped: BTreeMap<Source, u64>,
}

/// Replays the recording read from `input` through `rules`, with `walbust run`'s default
/// manual-message policy.
pub fn replay(input: impl BufRead, rules: Arc<RuleSet>) -> Result<Replay, RecordingError> {
    replay_with_policy(input, rules, &ManualPolicy::default())
}

/// [`replay`] with the manual-message policy of a config (`manual_prefixes`, `manual_match_all`).
pub fn replay_with_policy(
    input: impl BufRead,
    rules: Arc<RuleSet>,
    policy: &ManualPolicy,
) -> Result<Replay, RecordingError> {
    let mut out = run(input, &[rules], false, policy)?;
    Ok(out.pop().expect("one replay per rule set"))
}

/// Replays the recording at `path` through `rules`.
pub fn replay_file(path: &Path, rules: Arc<RuleSet>) -> Result<Replay, RecordingError> {
    let file = crate::input::user_file::open(path, crate::input::user_file::Kind::Recording)
        .map_err(|e| RecordingError::Read(std::io::Error::other(e)))?;
    replay(std::io::BufReader::with_capacity(1 << 16, file), rules)
}

/// Reads and checks a whole recording without routing it.
pub fn validate(input: impl BufRead) -> Result<Header, RecordingError> {
    let mut engine = Engine::open(input, &[], false, &ManualPolicy::default())?;
    engine.run()?;
    Ok(engine.header)
}

/// Replays the recording through `new` and `old` and keeps what differs: the actions the
/// new rules add and the ones they drop, per transaction; manual messages as `policy` says.
pub fn replay_against(
    input: impl BufRead,
    new: Arc<RuleSet>,
    old: Arc<RuleSet>,
    policy: &ManualPolicy,
) -> Result<Diff, RecordingError> {
    let mut out = run(input, &[new, old], true, policy)?;
    let old = out.pop().expect("two replays");
    let new = out.pop().expect("two replays");
    Ok(diff(&new, &old))
}

/// The difference between two replays of the same recording.
pub fn diff(new: &Replay, old: &Replay) -> Diff {
    let mut d = Diff { units: new.outcomes.len(), txs: Vec::new(), added: BTreeMap::new(), dropped: BTreeMap::new() };
    for (n, o) in new.outcomes.iter().zip(&old.outcomes) {
        let only = |a: &Outcome, b: &Outcome| -> Vec<(Action, Vec<Source>)> {
            let other: HashSet<&Action> = b.actions.iter().collect();
            a.actions
                .iter()
                .enumerate()
                .filter(|(_, x)| !other.contains(x))
                .map(|(i, x)| (x.clone(), a.sources.get(i).cloned().unwrap_or_default()))
                .collect()
        };
        let (added, dropped) = (only(n, o), only(o, n));
        if added.is_empty() && dropped.is_empty() {
            continue;
        }
        for (list, counts) in [(&added, &mut d.added), (&dropped, &mut d.dropped)] {
            for (_, sources) in list {
                for s in sources {
                    *counts.entry(s.clone()).or_default() += 1;
                }
            }
        }
        d.txs.push(TxDiff { line: n.line, unit: n.unit, added, dropped });
    }
    d
}

/// Applies every action of `replay` to `sink` in recording order, batched as `walbust run`
/// batches: deduplicated across transactions, sent every `max_actions` distinct actions.
/// Returns the actions and batches applied.
pub async fn apply<S: Sink>(replay: &Replay, sink: &mut S, max_actions: usize) -> Result<(usize, usize), S::Error> {
    let (mut actions, mut batches) = (0, 0);
    let mut batch = Batch::new();
    for outcome in &replay.outcomes {
        for a in &outcome.actions {
            batch.push(a.clone());
        }
        if batch.len() >= max_actions.max(1) {
            let taken = batch.take_actions();
            sink.apply(&taken).await?;
            (actions, batches) = (actions + taken.len(), batches + 1);
        }
    }
    let taken = batch.take_actions();
    if !taken.is_empty() {
        sink.apply(&taken).await?;
        (actions, batches) = (actions + taken.len(), batches + 1);
    }
    Ok((actions, batches))
}

/// Replays through every rule set in one pass over the file.
fn run(
    input: impl BufRead,
    sets: &[Arc<RuleSet>],
    sources: bool,
    policy: &ManualPolicy,
) -> Result<Vec<Replay>, RecordingError> {
    let mut engine = Engine::open(input, sets, sources, policy)?;
    engine.run()?;
    let header = engine.header;
    Ok(engine.lanes.into_iter().map(|l| l.finish(header.clone())).collect())
}

// ---------------------------------------------------------------------------------------
// The engine.

/// A relation definition from the header or a relation line.
#[derive(Debug)]
struct Definition {
    relation: Relation,
    table: Arc<str>,
}

/// A checked change, ready for every rule set.
enum Step {
    Row { rel: u32, definition: Arc<Definition>, op: Op, old: Option<OldTuple>, new: Option<Tuple> },
    Message { prefix: String, content: Bytes },
}

struct Engine<R> {
    reader: Reader<R>,
    header: Header,
    definitions: HashMap<u32, (Arc<Definition>, usize)>,
    lanes: Vec<Lane>,
    transactions: usize,
}

impl<R: BufRead> Engine<R> {
    fn open(input: R, sets: &[Arc<RuleSet>], sources: bool, policy: &ManualPolicy) -> Result<Self, RecordingError> {
        let reader = Reader::open(input)?;
        let header = reader.header().clone();
        let mut engine = Engine {
            reader,
            header: header.clone(),
            definitions: HashMap::new(),
            lanes: sets.iter().map(|s| Lane::new(s.clone(), sources, &header.message_prefix, policy)).collect(),
            transactions: 0,
        };
        for r in &header.relations {
            engine.define(1, r)?;
        }
        Ok(engine)
    }

    fn define(&mut self, line: usize, r: &RelationRecord) -> Result<(), RecordingError> {
        if let Some((_, first)) = self.definitions.get(&r.rel) {
            return Err(RecordingError::at(
                line,
                format!("relation {} is defined twice (first on line {first})", r.rel),
                "each relation line has a number of its own; the file is corrupted or two recordings were joined",
            ));
        }
        let mut names = HashSet::new();
        if let Some(c) = r.columns.iter().find(|c| !names.insert(c.name.as_str())) {
            return Err(RecordingError::at(
                line,
                format!("relation {} (`{}.{}`) lists column `{}` twice", r.rel, r.schema, r.name, c.name),
                "a table's columns have distinct names; the file is corrupted",
            ));
        }
        let relation = r.to_relation();
        let table: Arc<str> = relation.qualified_name().into();
        self.definitions.insert(r.rel, (Arc::new(Definition { relation, table }), line));
        Ok(())
    }

    fn run(&mut self) -> Result<(), RecordingError> {
        let mut steps = Vec::new();
        while let Some((line, record)) = self.reader.next_record()? {
            match record {
                Line::Header(_) => {
                    // The reader refuses a second header; kept as an error rather than a panic.
                    return Err(RecordingError::at(line, "a second header", CORRUPT));
                }
                Line::Relation(r) => self.define(line, &r)?,
                Line::Tx(tx) => {
                    self.transactions += 1;
                    steps.clear();
                    for change in tx.changes {
                        steps.push(self.step(line, change)?);
                    }
                    let unit = Unit::Tx { number: self.transactions, xid: tx.xid, end_lsn: tx.end_lsn };
                    for lane in &mut self.lanes {
                        lane.unit(line, unit, &steps);
                    }
                }
                Line::Message(m) => {
                    let content = super::format::decode_text(m.content).map_err(|e| {
                        RecordingError::at(line, format!("the message content is malformed: {e}"), CORRUPT)
                    })?;
                    let steps = [Step::Message { prefix: m.prefix, content }];
                    for lane in &mut self.lanes {
                        lane.unit(line, Unit::Message { lsn: m.lsn }, &steps);
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks one change against its relation definition and builds its tuples.
    fn step(&self, line: usize, c: ChangeRecord) -> Result<Step, RecordingError> {
        let op = match row_op(c.op) {
            Some(op) => op,
            None => {
                let stray = [
                    (c.table.is_some(), "table"),
                    (c.rel.is_some(), "rel"),
                    (c.old.is_some(), "old"),
                    (c.old_key.is_some(), "old_key"),
                    (c.new.is_some(), "new"),
                ];
                if let Some((_, field)) = stray.iter().find(|(present, _)| *present) {
                    return Err(RecordingError::at(line, format!("a message change has `{field}`"), CORRUPT));
                }
                let (Some(prefix), Some(content)) = (c.prefix, c.content) else {
                    return Err(RecordingError::at(line, "a message change lacks `prefix` or `content`", CORRUPT));
                };
                let content = super::format::decode_text(content)
                    .map_err(|e| RecordingError::at(line, format!("the message content is malformed: {e}"), CORRUPT))?;
                return Ok(Step::Message { prefix, content });
            }
        };
        let Some(rel) = c.rel else {
            return Err(RecordingError::at(
                line,
                format!("{op} of `{}` has no `rel`", c.table.as_deref().unwrap_or("?")),
                "every row change names the relation definition it was decoded with",
            ));
        };
        let Some((definition, _)) = self.definitions.get(&rel) else {
            return Err(RecordingError::at(
                line,
                format!(
                    "{op} of `{}` names relation {rel}, which no earlier line defines",
                    c.table.as_deref().unwrap_or("?")
                ),
                "relations are defined in the header or on a relation line before the changes that use them; the file is truncated at the start or reordered",
            ));
        };
        if let Some(t) = &c.table
            && **t != *definition.table
        {
            return Err(RecordingError::at(
                line,
                format!("{op} names table `{t}`, but relation {rel} is `{}`", definition.table),
                CORRUPT,
            ));
        }
        if c.prefix.is_some() || c.content.is_some() {
            return Err(RecordingError::at(
                line,
                format!("{op} of `{t}` has a message `prefix` or `content`", t = definition.table),
                CORRUPT,
            ));
        }
        if (c.cascade || c.restart_identity) && op != Op::Truncate {
            return Err(RecordingError::at(
                line,
                format!("{op} of `{}` has truncate options", definition.table),
                CORRUPT,
            ));
        }
        // Which images each op carries: (old, new); None means optional.
        let (want_old, want_new) = match op {
            Op::Insert => (Some(false), true),
            Op::Update => (None, true),
            Op::Delete => (Some(true), false),
            Op::Truncate => (Some(false), false),
        };
        let has_old = c.old.is_some() || c.old_key.is_some();
        if c.old.is_some() && c.old_key.is_some() {
            return Err(RecordingError::at(
                line,
                format!("{op} of `{}` has both `old` and `old_key`", definition.table),
                "an old row is either whole (`old`) or its key columns (`old_key`)",
            ));
        }
        if want_old.is_some_and(|w| w != has_old) || want_new != c.new.is_some() {
            return Err(RecordingError::at(
                line,
                format!(
                    "{op} of `{}` {} old row and {} new row",
                    definition.table,
                    if has_old { "has an" } else { "has no" },
                    if c.new.is_some() { "a" } else { "no" }
                ),
                "inserts carry `new`, updates `new` and maybe `old` or `old_key`, deletes `old` or `old_key`, truncates neither; the file is corrupted",
            ));
        }
        let table = &definition.table;
        let old = match (c.old, c.old_key) {
            (Some(img), _) => Some(OldTuple::Full(tuple(line, definition, table, img, "old", false)?)),
            (_, Some(img)) => Some(OldTuple::Key(tuple(line, definition, table, img, "old_key", true)?)),
            _ => None,
        };
        let new = c.new.map(|img| tuple(line, definition, table, img, "new", false)).transpose()?;
        Ok(Step::Row { rel, definition: definition.clone(), op, old, new })
    }
}

/// The op of a recorded row change; `None` for a message.
pub(crate) fn row_op(op: ChangeOp) -> Option<Op> {
    match op {
        ChangeOp::Insert => Some(Op::Insert),
        ChangeOp::Update => Some(Op::Update),
        ChangeOp::Delete => Some(Op::Delete),
        ChangeOp::Truncate => Some(Op::Truncate),
        ChangeOp::Message => None,
    }
}

const CORRUPT: &str = "the file is corrupted or was edited by hand; docs/REPLAY.md describes each record";

/// Builds a positional tuple from an image by name. Key images leave out the columns
/// pgoutput sends as NULL (those outside the key); the other images list every column.
fn tuple(
    line: usize,
    definition: &Definition,
    table: &str,
    image: Image,
    which: &str,
    keyed: bool,
) -> Result<Tuple, RecordingError> {
    let columns = &definition.relation.columns;
    let mut values: Vec<Option<Value>> = vec![None; columns.len()];
    for (name, text) in image {
        let Some(i) = columns.iter().position(|c| c.name == name) else {
            return Err(RecordingError::at(
                line,
                format!("`{which}` of a change of `{table}` gives column `{name}`, which its relation lacks"),
                CORRUPT,
            ));
        };
        let value = super::format::decode_value(text).map_err(|e| {
            RecordingError::at(line, format!("column `{name}` of `{table}` in `{which}`: {e}"), CORRUPT)
        })?;
        values[i] = Some(value);
    }
    let mut out = Vec::with_capacity(values.len());
    for (v, c) in values.into_iter().zip(columns) {
        match v {
            Some(v) => out.push(v),
            None if keyed => out.push(Value::Null),
            None => {
                return Err(RecordingError::at(
                    line,
                    format!("`{which}` of a change of `{table}` lacks column `{}`", c.name),
                    "a recorded row lists every column, with \"@toast\" for a value the stream did not send",
                ));
            }
        }
    }
    Ok(Tuple(out))
}

/// Counters with cheap keys while replaying; sorted into a [`Summary`] at the end.
#[derive(Default)]
struct Counts {
    summary: Summary,
    per_table: HashMap<Arc<str>, [u64; 4]>,
    unmatched: HashMap<Arc<str>, [u64; 4]>,
    per_rule: HashMap<(Arc<str>, &'static str), u64>,
    widened: HashMap<(Arc<str>, &'static str), u64>,
}

/// One rule set's router, with its outcomes.
struct Lane {
    routing: Routing,
    /// The relation definition bound for each OID.
    bound: HashMap<u32, u32>,
    outcomes: Vec<Outcome>,
    counts: Counts,
    sources: bool,
    prefix: String,
    /// Which actions of manual messages are applied, as `walbust run` decides.
    policy: ManualPolicy,
}

fn op_index(op: Op) -> usize {
    match op {
        Op::Insert => 0,
        Op::Update => 1,
        Op::Delete => 2,
        Op::Truncate => 3,
    }
}

impl Lane {
    fn new(rules: Arc<RuleSet>, sources: bool, prefix: &str, policy: &ManualPolicy) -> Self {
        Lane {
            routing: Routing::new(rules),
            bound: HashMap::new(),
            outcomes: Vec::new(),
            counts: Counts::default(),
            sources,
            prefix: prefix.to_string(),
            policy: policy.clone(),
        }
    }

    /// Routes one transaction's steps through a batch of its own, as `walbust test` does.
    fn unit(&mut self, line: usize, unit: Unit, steps: &[Step]) {
        let mut batch = Batch::new();
        let mut sources: HashMap<Action, Vec<Source>> = HashMap::new();
        let mut notes = Vec::new();
        match unit {
            Unit::Tx { .. } => self.counts.summary.transactions += 1,
            Unit::Message { .. } => self.counts.summary.messages_outside += 1,
        }
        for step in steps {
            let mut tally = LaneTally {
                counts: &mut self.counts,
                sources: self.sources.then_some(&mut sources),
                notes: &mut notes,
                table: None,
            };
            match step {
                Step::Row { rel, definition, op, old, new } => {
                    let relation = &definition.relation;
                    if self.bound.get(&relation.oid) != Some(rel) {
                        for m in self.routing.bind(relation) {
                            tally.counts.summary.missing_columns.insert((m.rule.to_string(), m.table, m.column, *rel));
                        }
                        self.bound.insert(relation.oid, *rel);
                    }
                    let change = Change { relation, op: *op, old: old.as_ref(), new: new.as_ref() };
                    tally.table = Some(&definition.table);
                    self.routing.change(&change, Lsn::ZERO, &mut batch, &mut tally);
                }
                Step::Message { prefix, content } if *prefix == self.prefix => {
                    self.routing.message(content, &self.policy, Lsn::ZERO, &mut batch, &mut tally);
                }
                Step::Message { prefix, .. } => {
                    *tally.counts.summary.other_messages.entry(prefix.clone()).or_default() += 1;
                }
            }
        }
        let mut actions = batch.take_actions();
        actions.sort_by_cached_key(Action::to_string);
        let sources = if self.sources {
            actions
                .iter()
                .map(|a| {
                    let mut s = sources.remove(a).unwrap_or_default();
                    s.sort();
                    s.dedup();
                    s
                })
                .collect()
        } else {
            Vec::new()
        };
        self.counts.summary.actions += actions.len() as u64;
        self.outcomes.push(Outcome { line, unit, changes: steps.len(), actions, sources, notes });
    }

    fn finish(self, header: Header) -> Replay {
        let Counts { mut summary, per_table, unmatched, per_rule, widened } = self.counts;
        summary.per_table = per_table.into_iter().map(|(t, c)| (t.to_string(), c)).collect();
        summary.unmatched = unmatched.into_iter().map(|(t, c)| (t.to_string(), c)).collect();
        for ((rule, kind), n) in per_rule {
            summary.per_rule.entry(rule.to_string()).or_default().insert(kind, n);
        }
        for ((rule, why), n) in widened {
            summary.widened.entry(rule.to_string()).or_default().insert(why, n);
        }
        Replay { header, outcomes: self.outcomes, summary }
    }
}

/// The name manual messages are counted under among the rules.
const MESSAGE_RULE: &str = "(manual messages)";

/// What a replay counts for each change and message of one unit.
struct LaneTally<'l> {
    counts: &'l mut Counts,
    /// Where each action came from, when asked for.
    sources: Option<&'l mut HashMap<Action, Vec<Source>>>,
    notes: &'l mut Vec<String>,
    /// The changed table, for a row change.
    table: Option<&'l Arc<str>>,
}

impl Tally for LaneTally<'_> {
    fn routed(&mut self, change: &Change<'_>, routed: &[Routed], _: &mut Batch) {
        let Some(table) = self.table else { return };
        let counts = &mut *self.counts;
        counts.summary.changes += 1;
        let i = op_index(change.op);
        count_table(&mut counts.per_table, table, i);
        if routed.is_empty() {
            count_table(&mut counts.unmatched, table, i);
        }
        for r in routed {
            *counts.per_rule.entry((r.rule.clone(), r.action.kind())).or_default() += 1;
            if let Some(why) = r.widened {
                *counts.widened.entry((r.rule.clone(), why.as_str())).or_default() += 1;
            }
            if let Some(sources) = self.sources.as_deref_mut() {
                let s = Source::Rule { rule: r.rule.clone(), table: table.clone() };
                sources.entry(r.action.clone()).or_default().push(s);
            }
        }
    }

    fn manual(&mut self, actions: &[Action], _: &mut Batch) {
        self.counts.summary.manual_messages += 1;
        for a in actions {
            *self.counts.per_rule.entry((MESSAGE_RULE.into(), a.kind())).or_default() += 1;
            if let Some(sources) = self.sources.as_deref_mut() {
                sources.entry(a.clone()).or_default().push(Source::Message);
            }
        }
    }

    fn malformed(&mut self, error: &ManualError) {
        self.counts.summary.malformed_messages += 1;
        self.notes.push(format!("a malformed manual message was skipped, as walbust run skips it: {error}"));
    }

    fn refused(&mut self, action: &Action, refusal: Refusal) {
        self.notes
            .push(format!("a manual message asks for {action}, which walbust run leaves out: {}", refusal.describe()));
    }
}

fn count_table(map: &mut HashMap<Arc<str>, [u64; 4]>, table: &Arc<str>, op: usize) {
    match map.get_mut(table) {
        Some(c) => c[op] += 1,
        None => {
            let mut c = [0; 4];
            c[op] = 1;
            map.insert(table.clone(), c);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reports.

fn ops(counts: &[u64; 4]) -> String {
    Op::ALL
        .iter()
        .zip(counts)
        .filter(|(_, n)| **n > 0)
        .map(|(op, n)| format!("{op} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn kinds(counts: &BTreeMap<&'static str, u64>) -> String {
    counts.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
}

impl Replay {
    /// The report: each transaction with its actions in canonical form, sorted, then the
    /// summary. The same recording and rules always give the same bytes.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for o in &self.outcomes {
            let _ = write!(out, "{}  line {}", o.unit, o.line);
            if matches!(o.unit, Unit::Tx { .. }) {
                let _ = write!(out, "  {}", plural(o.changes as u64, "change", "changes"));
            }
            out.push('\n');
            if o.actions.is_empty() {
                out.push_str("  (no actions)\n");
            }
            for a in &o.actions {
                let _ = writeln!(out, "  {a}");
            }
            for n in &o.notes {
                let _ = writeln!(out, "  note: {n}");
            }
        }
        out.push('\n');
        out.push_str(&self.summary.render());
        out
    }
}

impl Summary {
    /// The summary section of a replay report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "summary: {}, {}, {}, {}, {}",
            plural(self.transactions, "transaction", "transactions"),
            plural(self.messages_outside, "message outside transactions", "messages outside transactions"),
            plural(self.changes, "row change", "row changes"),
            plural(self.manual_messages, "manual message", "manual messages"),
            plural(self.actions, "action", "actions"),
        );
        let section = |out: &mut String, title: &str, lines: Vec<String>| {
            let _ = writeln!(out, "{title}:");
            if lines.is_empty() {
                out.push_str("  none\n");
            }
            for l in lines {
                let _ = writeln!(out, "  {l}");
            }
        };
        section(
            &mut out,
            "changes per table",
            self.per_table.iter().map(|(t, c)| format!("{t}: {}", ops(c))).collect(),
        );
        section(
            &mut out,
            "actions per rule and kind (before deduplication)",
            self.per_rule.iter().map(|(r, k)| format!("{r}: {}", kinds(k))).collect(),
        );
        section(
            &mut out,
            "widened actions per rule and reason",
            self.widened.iter().map(|(r, k)| format!("{r}: {}", kinds(k))).collect(),
        );
        section(
            &mut out,
            "changes no rule matched",
            self.unmatched.iter().map(|(t, c)| format!("{t}: {}", ops(c))).collect(),
        );
        if !self.missing_columns.is_empty() {
            section(
                &mut out,
                "rules naming columns their table lacks (their actions widen)",
                self.missing_columns
                    .iter()
                    .map(|(r, t, c, rel)| format!("rule `{r}` names `{c}`, which {t} lacks in relation {rel}"))
                    .collect(),
            );
        }
        if self.malformed_messages > 0 {
            let _ = writeln!(out, "malformed manual messages skipped: {}", self.malformed_messages);
        }
        if !self.other_messages.is_empty() {
            section(
                &mut out,
                "messages for other consumers (not routed)",
                self.other_messages.iter().map(|(p, n)| format!("{p}: {n}")).collect(),
            );
        }
        out
    }
}

fn sources_text(sources: &[Source]) -> String {
    sources.iter().map(Source::to_string).collect::<Vec<_>>().join("; ")
}

impl Diff {
    /// The report: each differing transaction with `+` for added and `-` for dropped
    /// actions (sorted, with the rule and table behind each), then totals per rule and table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let (mut added, mut dropped) = (0, 0);
        for tx in &self.txs {
            let _ = writeln!(out, "{}  line {}", tx.unit, tx.line);
            let mut lines: Vec<(String, char, &[Source])> = Vec::new();
            lines.extend(tx.added.iter().map(|(a, s)| (a.to_string(), '+', s.as_slice())));
            lines.extend(tx.dropped.iter().map(|(a, s)| (a.to_string(), '-', s.as_slice())));
            lines.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
            for (text, mark, sources) in lines {
                let _ = writeln!(out, "  {mark} {text}  ({})", sources_text(sources));
            }
            added += tx.added.len();
            dropped += tx.dropped.len();
        }
        if self.txs.is_empty() {
            let _ = writeln!(
                out,
                "no difference: both rule sets produce the same actions in all {}",
                plural(self.units as u64, "transaction or message", "transactions and messages")
            );
            return out;
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "difference: {added} added, {dropped} dropped, in {} of {} transactions and messages",
            self.txs.len(),
            self.units
        );
        for (title, counts) in [("added", &self.added), ("dropped", &self.dropped)] {
            let _ = writeln!(out, "{title} per rule and table:");
            if counts.is_empty() {
                out.push_str("  none\n");
            }
            for (s, n) in counts {
                let _ = writeln!(out, "  {s}: {n}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offline::recording::format::{ColumnRecord, Identity, TxRecord, to_line};
    use std::path::PathBuf;

    fn rules(text: &str) -> Arc<RuleSet> {
        let loaded = RuleSet::from_sources(&[(PathBuf::from("r.toml"), text.to_string())])
            .unwrap_or_else(|d| panic!("rules: {d}"));
        Arc::new(loaded.rules)
    }

    const RULES: &str = "[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"item:{id}\", \"org:{org}\"]\n";

    fn relation(rel: u32, columns: &[&str]) -> RelationRecord {
        RelationRecord {
            rel,
            oid: 16384,
            schema: "public".into(),
            name: "items".into(),
            replica_identity: Identity::Default,
            columns: columns
                .iter()
                .map(|c| ColumnRecord { name: c.to_string(), type_oid: 25, type_modifier: -1, key: *c == "id" })
                .collect(),
        }
    }

    fn header(relations: Vec<RelationRecord>) -> String {
        to_line(&Line::Header(Header {
            format: 1,
            server_version: "15".into(),
            database: "d".into(),
            captured_at: "t".into(),
            publication: "p".into(),
            message_prefix: "walbust".into(),
            slot: "s".into(),
            start_lsn: Lsn(1),
            relations,
        }))
    }

    fn image(pairs: &[(&str, &str)]) -> Option<Image> {
        Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    fn tx(xid: u32, changes: Vec<ChangeRecord>) -> String {
        to_line(&Line::Tx(TxRecord {
            xid,
            commit_lsn: Lsn(u64::from(xid) * 16),
            end_lsn: Lsn(u64::from(xid) * 16 + 8),
            commit_time: "t".into(),
            changes,
        }))
    }

    fn insert(rel: u32, id: &str, org: &str) -> ChangeRecord {
        ChangeRecord {
            op: ChangeOp::Insert,
            table: Some("public.items".into()),
            rel: Some(rel),
            new: image(&[("id", id), ("org", org)]),
            ..Default::default()
        }
    }

    fn recording() -> String {
        let update = ChangeRecord {
            op: ChangeOp::Update,
            table: Some("public.items".into()),
            rel: Some(1),
            old_key: image(&[("id", "1")]),
            new: image(&[("id", "2"), ("org", "@toast")]),
            ..Default::default()
        };
        let message = ChangeRecord {
            op: ChangeOp::Message,
            prefix: Some("walbust".into()),
            content: Some(r#"{"keys":["admin"]}"#.into()),
            ..Default::default()
        };
        let mut with_color = relation(2, &["id", "org", "color"]);
        with_color.columns[2].type_oid = 25;
        [
            header(vec![relation(1, &["id", "org"])]),
            tx(10, vec![insert(1, "1", "a"), insert(1, "1", "a"), message]),
            tx(11, vec![update]),
            to_line(&Line::Relation(with_color)),
            tx(12, vec![ChangeRecord { op: ChangeOp::Truncate, rel: Some(2), ..Default::default() }]),
        ]
        .join("\n")
            + "\n"
    }

    #[test]
    fn each_transaction_is_deduplicated_sorted_and_summarised() {
        let r = replay(recording().as_bytes(), rules(RULES)).unwrap();
        let text = r.render();
        let expected = "\
tx 1  xid 10  end 0/A8  line 2  3 changes
  UNLINK admin
  UNLINK item:1
  UNLINK org:a
tx 2  xid 11  end 0/B8  line 3  1 change
  SCAN-UNLINK org:*
  UNLINK item:1
  UNLINK item:2
tx 3  xid 12  end 0/C8  line 5  1 change
  SCAN-UNLINK item:*
  SCAN-UNLINK org:*

summary: 3 transactions, 0 messages outside transactions, 4 row changes, 1 manual message, 8 actions
changes per table:
  public.items: insert 2, update 1, truncate 1
actions per rule and kind (before deduplication):
  (manual messages): unlink 1
  items: scan_unlink 4, unlink 6
widened actions per rule and reason:
  items: old_image_missing 1, truncate 2, unchanged_toast 1
changes no rule matched:
  none
";
        assert_eq!(text, expected, "\n{text}");
        assert_eq!(replay(recording().as_bytes(), rules(RULES)).unwrap().render(), text, "deterministic");
    }

    #[test]
    fn a_match_all_pattern_in_a_message_is_left_out_with_a_note_as_run_leaves_it_out() {
        let with = |content: &str| {
            let message = ChangeRecord {
                op: ChangeOp::Message,
                prefix: Some("walbust".into()),
                content: Some(content.into()),
                ..Default::default()
            };
            [header(vec![relation(1, &["id", "org"])]), tx(10, vec![message])].join("\n") + "\n"
        };
        let r = replay(with(r#"{"keys":["admin"],"patterns":["*"]}"#).as_bytes(), rules(RULES)).unwrap();
        assert_eq!(r.outcomes[0].actions, [Action::Unlink("admin".into())]);
        assert_eq!(r.outcomes[0].notes.len(), 1, "{:?}", r.outcomes[0].notes);
        assert!(r.outcomes[0].notes[0].contains("manual_match_all"), "{:?}", r.outcomes[0].notes);

        // A config's prefixes narrow it further, as they narrow `walbust run`.
        let policy = ManualPolicy { prefixes: vec!["adm".into()], match_all: true };
        let r = replay_with_policy(with(r#"{"keys":["other"],"patterns":["o*"]}"#).as_bytes(), rules(RULES), &policy);
        let r = r.unwrap();
        assert!(r.outcomes[0].actions.is_empty(), "{:?}", r.outcomes[0].actions);
        assert_eq!(r.outcomes[0].notes.len(), 2, "{:?}", r.outcomes[0].notes);
        assert!(r.outcomes[0].notes[0].contains("manual_prefixes"), "{:?}", r.outcomes[0].notes);
    }

    #[test]
    fn the_difference_names_only_what_one_changed_rule_adds_and_drops() {
        let new = format!("{RULES}[[rule]]\nname = \"lists\"\ntable = \"items\"\nkeys = [\"list:{{org}}\"]\n");
        let old = format!("{RULES}[[rule]]\nname = \"lists\"\ntable = \"items\"\nkeys = [\"lists:{{org}}\"]\n");
        let d = replay_against(recording().as_bytes(), rules(&new), rules(&old), &ManualPolicy::default()).unwrap();
        let text = d.render();
        assert!(text.contains("  + UNLINK list:a  (rule `lists` on public.items)\n"), "{text}");
        assert!(text.contains("  - UNLINK lists:a  (rule `lists` on public.items)\n"), "{text}");
        assert!(!text.contains("rule `items`"), "only the changed rule shows: {text}");
        assert!(text.contains("difference: 3 added, 3 dropped, in 3 of 3 transactions and messages"), "{text}");
        let same =
            replay_against(recording().as_bytes(), rules(RULES), rules(RULES), &ManualPolicy::default()).unwrap();
        assert!(same.render().starts_with("no difference"), "{}", same.render());
    }

    #[test]
    fn bad_changes_are_errors_at_their_line() {
        let base = recording();
        let err = |text: &str| replay(text.as_bytes(), rules(RULES)).unwrap_err().to_string();
        let cases = [
            (
                "\"truncate\",\"rel\":2",
                "\"truncate\",\"rel\":7",
                "line 5: truncate of `?` names relation 7, which no earlier line defines",
            ),
            (
                "\"org\":\"a\"}",
                "\"org\":\"a\",\"zip\":\"1\"}",
                "line 2: `new` of a change of `public.items` gives column `zip`",
            ),
            (
                "\"org\":\"@toast\"",
                "\"org\":\"@toasty\"",
                "line 3: column `org` of `public.items` in `new`: unknown marker `@toasty`",
            ),
            (
                "{\"id\":\"2\",\"org\":\"@toast\"}",
                "{\"id\":\"2\"}",
                "line 3: `new` of a change of `public.items` lacks column `org`",
            ),
            ("\"op\":\"update\"", "\"op\":\"delete\"", "line 3: delete of `public.items` has an old row and a new row"),
            (
                "\"table\":\"public.items\",\"rel\":1,\"old_key\"",
                "\"table\":\"public.other\",\"rel\":1,\"old_key\"",
                "line 3: update names table `public.other`, but relation 1 is `public.items`",
            ),
        ];
        for (from, to, want) in cases {
            let bad = base.replacen(from, to, 1);
            assert_ne!(bad, base, "{from}");
            let got = err(&bad);
            assert!(got.starts_with(want), "want {want:?}, got {got:?}");
        }
        let twice = base.replace("{\"rel\":2", "{\"rel\":1");
        assert!(err(&twice).starts_with("line 4: relation 1 is defined twice (first on line 1)"), "{}", err(&twice));
        assert!(validate(base.as_bytes()).is_ok());
    }

    #[test]
    fn apply_batches_across_transactions_in_order() {
        let r = replay(recording().as_bytes(), rules(RULES)).unwrap();
        let mut sink = crate::sink::MemorySink::new();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (actions, batches) = rt.block_on(apply(&r, &mut sink, 3)).unwrap();
        assert_eq!((actions, batches), (8, 3), "each batch holds three distinct actions or the rest");
        assert_eq!(sink.applied().len(), 8);
    }
}

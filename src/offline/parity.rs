//! `walbust run`, `walbust replay` and `walbust test` give one recording identical actions.
//!
//! Each recording of `tests/fixtures/replay` goes through all three: as the frames the
//! server sent through the pipeline's reader, as a recording through replay, and as a
//! rule test whose tables are the recording's table definitions.

use crate::daemon::pipeline::FrameHarness;
use crate::domain::action::Action;
use crate::domain::config::Config;
use crate::domain::rules::Op;
use crate::domain::rules::RuleSet;
use crate::offline::recording::format::{Image, Line, Reader, decode_text, decode_value};
use crate::offline::recording::replay;
use crate::offline::ruletest::{Case, Step};
use crate::postgres::pgoutput::Relation;
use crate::postgres::pgoutput::{OldTuple, ReplicaIdentity, Tuple, Value};
use crate::postgres::stream::xlog;
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The recordings of `tests/fixtures/replay`, each captured by `walbust record`.
const RECORDINGS: [&str; 5] = ["ops", "message", "truncate", "toast", "ddl"];

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/replay").join(name)
}

/// One change of a recording, decoded: a row change under the definition `rel`, or a
/// logical decoding message.
enum Item {
    Row { rel: u32, op: Op, old: Option<OldTuple>, new: Option<Tuple>, options: u8 },
    Message { prefix: String, body: Bytes },
}

/// A recording's definitions by number, and its units: (transactional, items).
struct Decoded {
    prefix: String,
    definitions: HashMap<u32, Relation>,
    units: Vec<(bool, Vec<Item>)>,
}

fn tuple(relation: &Relation, image: Option<Image>, keyed: bool) -> Option<Tuple> {
    let mut image = image?;
    let values = relation.columns.iter().map(|c| match image.remove(&c.name) {
        Some(text) => decode_value(text).expect("the fixture's values decode"),
        None if keyed => Value::Null,
        None => panic!("column {} missing from a full image", c.name),
    });
    Some(Tuple(values.collect()))
}

fn decode(recording: &[u8]) -> Decoded {
    let mut reader = Reader::open(recording).expect("the fixture opens");
    let header = reader.header().clone();
    let mut definitions: HashMap<u32, Relation> = header.relations.iter().map(|r| (r.rel, r.to_relation())).collect();
    let mut units = Vec::new();
    while let Some((_, line)) = reader.next_record().expect("the fixture reads") {
        match line {
            Line::Header(_) => unreachable!("the reader refuses a second header"),
            Line::Relation(r) => {
                definitions.insert(r.rel, r.to_relation());
            }
            Line::Message(m) => {
                let body = decode_text(m.content).expect("the fixture's message decodes");
                units.push((false, vec![Item::Message { prefix: m.prefix, body }]));
            }
            Line::Tx(tx) => {
                let items = tx.changes.into_iter().map(|c| {
                    let Some(op) = replay::row_op(c.op) else {
                        let body = decode_text(c.content.expect("a message has content")).expect("decodes");
                        return Item::Message { prefix: c.prefix.expect("a message has a prefix"), body };
                    };
                    let rel = c.rel.expect("a row change names its definition");
                    let relation = &definitions[&rel];
                    let old = match (tuple(relation, c.old, false), tuple(relation, c.old_key, true)) {
                        (Some(full), _) => Some(OldTuple::Full(full)),
                        (_, Some(key)) => Some(OldTuple::Key(key)),
                        _ => None,
                    };
                    let new = tuple(relation, c.new, false);
                    let options = u8::from(c.cascade) | (u8::from(c.restart_identity) << 1);
                    Item::Row { rel, op, old, new, options }
                });
                units.push((true, items.collect()));
            }
        }
    }
    Decoded { prefix: header.message_prefix, definitions, units }
}

fn put_tuple(b: &mut BytesMut, tuple: &Tuple) {
    b.put_u16(tuple.len() as u16);
    for v in tuple.values() {
        match v {
            Value::Null => b.put_u8(b'n'),
            Value::UnchangedToast => b.put_u8(b'u'),
            Value::Text(t) | Value::Binary(t) => {
                b.put_u8(if matches!(v, Value::Text(_)) { b't' } else { b'b' });
                b.put_u32(t.len() as u32);
                b.put_slice(t);
            }
        }
    }
}

/// The pgoutput messages the server sends for one unit, announcing a definition
/// whenever a change uses one other than the last announced for its table.
fn encode(d: &Decoded, transactional: bool, items: &[Item], announced: &mut HashMap<u32, u32>) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut m = BytesMut::new();
    if transactional {
        m.put_u8(b'B');
        m.put_u64(0);
        m.put_i64(0);
        m.put_u32(1);
        out.push(m.split().freeze());
    }
    for item in items {
        match item {
            Item::Row { rel, op, old, new, options } => {
                let relation = &d.definitions[rel];
                if announced.insert(relation.oid, *rel) != Some(*rel) {
                    m.put_u8(b'R');
                    m.put_u32(relation.oid);
                    for name in [&relation.namespace, &relation.name] {
                        m.put_slice(name.as_bytes());
                        m.put_u8(0);
                    }
                    m.put_u8(match relation.replica_identity {
                        ReplicaIdentity::Default => b'd',
                        ReplicaIdentity::Nothing => b'n',
                        ReplicaIdentity::Full => b'f',
                        ReplicaIdentity::Index => b'i',
                    });
                    m.put_u16(relation.columns.len() as u16);
                    for c in &relation.columns {
                        m.put_u8(u8::from(c.key));
                        m.put_slice(c.name.as_bytes());
                        m.put_u8(0);
                        m.put_u32(c.type_oid);
                        m.put_i32(c.type_modifier);
                    }
                    out.push(m.split().freeze());
                }
                let tag = match op {
                    Op::Insert => b'I',
                    Op::Update => b'U',
                    Op::Delete => b'D',
                    Op::Truncate => b'T',
                };
                m.put_u8(tag);
                if *op == Op::Truncate {
                    m.put_u32(1);
                    m.put_u8(*options);
                }
                m.put_u32(relation.oid);
                match old {
                    Some(OldTuple::Key(_)) => m.put_u8(b'K'),
                    Some(OldTuple::Full(_)) => m.put_u8(b'O'),
                    None => {}
                }
                if let Some(t) = old.as_ref().map(OldTuple::tuple) {
                    put_tuple(&mut m, t);
                }
                if let Some(t) = new {
                    m.put_u8(b'N');
                    put_tuple(&mut m, t);
                }
            }
            Item::Message { prefix, body } => {
                m.put_u8(b'M');
                m.put_u8(u8::from(transactional));
                m.put_u64(0);
                m.put_slice(prefix.as_bytes());
                m.put_u8(0);
                m.put_u32(body.len() as u32);
                m.put_slice(body);
            }
        }
        out.push(m.split().freeze());
    }
    if transactional {
        m.put_u8(b'C');
        m.put_u8(0);
        m.put_u64(0);
        m.put_u64(0);
        m.put_i64(0);
        out.push(m.split().freeze());
    }
    out
}

fn sorted<'a>(actions: impl Iterator<Item = &'a Action>) -> Vec<String> {
    let mut out: Vec<String> = actions.map(Action::to_string).collect();
    out.sort();
    out
}

/// Each unit's actions as `walbust run` produces them: the recording as the frames the
/// server sent, through the reader, one batch per unit.
fn run(d: &Decoded, rules: Arc<RuleSet>) -> Vec<Vec<String>> {
    let text = format!(
        "rules = [\"r/*.toml\"]\n[source]\nurl = \"postgres://u@localhost/db\"\nmessage_prefix = \"{}\"\n[redis]\nurl = \"redis://localhost\"\n",
        d.prefix
    );
    let config = Config::parse(Path::new("config.toml"), &text, &|_| None).expect("test config");
    let mut harness = FrameHarness::new(&config, rules);
    let (mut announced, mut lsn) = (HashMap::new(), 0x100);
    let mut out = Vec::new();
    for (transactional, items) in &d.units {
        for message in encode(d, *transactional, items, &mut announced) {
            lsn += 0x10;
            harness.frame(Bytes::from(xlog(lsn, lsn, 0, &message))).expect("the frame is taken");
        }
        out.push(sorted(harness.pending()));
        harness.apply();
    }
    out
}

/// Each unit's actions as `walbust test` produces them: the recording as a test whose
/// tables are its definitions.
fn test(d: &Decoded, rules: Arc<RuleSet>) -> Vec<Vec<String>> {
    let mut rels: Vec<u32> = d.definitions.keys().copied().collect();
    rels.sort_unstable();
    let index = |rel: &u32| rels.iter().position(|r| r == rel).expect("a known definition");
    // A test's tables are distinct: each definition gets an OID of its own.
    let tables = rels.iter().map(|rel| Relation { oid: *rel, ..d.definitions[rel].clone() }).collect();
    let txs = d.units.iter().map(|(_, items)| {
        let steps = items.iter().filter_map(|item| match item {
            Item::Row { rel, op, old, new, .. } => {
                Some(Step::Row { table: index(rel), op: *op, old: old.clone(), new: new.clone() })
            }
            Item::Message { prefix, body } if *prefix == d.prefix => {
                Some(Step::Message { line: 1, body: body.to_vec() })
            }
            Item::Message { .. } => None,
        });
        steps.collect()
    });
    let result = Case::from_steps(rules, tables, txs.collect()).run();
    assert!(result.problems.is_empty(), "{:?}", result.problems);
    result.txs.iter().map(|tx| sorted(tx.actual.iter().map(|(a, _)| a))).collect()
}

#[test]
fn run_replay_and_test_give_one_recording_identical_actions() {
    let rules =
        crate::domain::rules::RuleSet::load(&[fixture("rules.toml").display().to_string()]).expect("rules load");
    let rules = Arc::new(rules.rules);
    for name in RECORDINGS {
        let recording = std::fs::read(fixture(&format!("{name}.jsonl"))).expect("the fixture reads");
        let replayed = replay::replay(&recording[..], rules.clone()).expect("the fixture replays");
        let replayed: Vec<Vec<String>> = replayed.outcomes.iter().map(|o| sorted(o.actions.iter())).collect();
        assert!(replayed.iter().any(|a| !a.is_empty()), "{name}: the recording routes to some action");
        let decoded = decode(&recording);
        assert_eq!(run(&decoded, rules.clone()), replayed, "{name}: run and replay differ");
        assert_eq!(test(&decoded, rules.clone()), replayed, "{name}: test and replay differ");
    }
}

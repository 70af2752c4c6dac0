//! The pgoutput decoder: the first byte picks the protocol version (1 to 4), the rest is a
//! sequence of messages framed as in `src/postgres/pgoutput/testdata` (4-byte length, then the
//! message), decoded in order by one decoder with relations cached across messages.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walbust::offline::recording::format::{decode_value, encode_value};
use walbust::postgres::pgoutput::{
    Decoder, LogicalMessage, OldTuple, Relation, RelationCache, Tuple, pg_time_to_system,
};

fuzz_target!(|data: &[u8]| {
    let Some((&version, rest)) = data.split_first() else { return };
    let mut decoder = Decoder::new(u32::from(version % 4) + 1);
    let mut relations = RelationCache::new();
    let input = Bytes::copy_from_slice(rest);
    for message in walbust_fuzz::frames(&input) {
        let before = decoder.clone();
        match decoder.decode(message) {
            Ok(decoded) => consume(&decoded, &mut relations),
            Err(e) => {
                assert_eq!(decoder, before, "a rejected message changed the decoder's state");
                let _ = e.to_string();
            }
        }
    }
});

/// Uses a message as the pipeline and the recorder do.
fn consume(message: &LogicalMessage, relations: &mut RelationCache) {
    let _ = format!("{message:?}");
    match message {
        LogicalMessage::Relation(r) => {
            let cached = relations.insert(r.clone());
            let _ = cached.qualified_name();
            for c in &cached.columns {
                assert!(cached.column_index(&c.name).is_some());
            }
        }
        LogicalMessage::Begin(b) => drop(pg_time_to_system(b.commit_time)),
        LogicalMessage::Commit(c) => drop(pg_time_to_system(c.commit_time)),
        LogicalMessage::Insert(i) => row(relations.get(i.relation).map(|r| &**r), &i.new),
        LogicalMessage::Update(u) => {
            let relation = relations.get(u.relation).map(|r| &**r);
            if let Some(OldTuple::Key(t) | OldTuple::Full(t)) = &u.old {
                row(relation, t);
            }
            row(relation, &u.new);
        }
        LogicalMessage::Delete(d) => {
            let (OldTuple::Key(t) | OldTuple::Full(t)) = &d.old;
            row(relations.get(d.relation).map(|r| &**r), t);
        }
        LogicalMessage::Truncate(t) => {
            for oid in &t.relations {
                let _ = relations.get(*oid);
            }
        }
        _ => {}
    }
}

/// Reads a tuple against its relation, and checks that the recording format keeps every value.
fn row(relation: Option<&Relation>, tuple: &Tuple) {
    for (i, value) in tuple.values().iter().enumerate() {
        let _ = relation.and_then(|r| r.columns.get(i)).map(|c| &c.name);
        let _ = value.as_str();
        let encoded = encode_value(value);
        assert_eq!(decode_value(encoded).as_ref(), Ok(value), "a recorded value does not read back as it was");
    }
}

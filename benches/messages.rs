//! Realistic pgoutput messages and rules shared by the decoder and router benchmarks:
//! the `bench_items` table of `bench/main.rs`, with a rule giving two keys per change.

#![allow(dead_code)]

use bytes::{BufMut, Bytes, BytesMut};
use std::path::PathBuf;
use walbust::domain::rules::RuleSet;
use walbust::postgres::pgoutput::{Column, Relation, ReplicaIdentity};

/// Relation OID used throughout.
pub const OID: u32 = 16_384;

/// The rule of the drain benchmark.
pub const RULES: &str = r#"
[[rule]]
name = "items"
table = "public.bench_items"
keys = ["item:{id}", "org:{org_id}:items"]
"#;

/// `bench_items`: (org_id, id) is the primary key.
pub fn relation() -> Relation {
    let column = |name: &str, key: bool, type_oid: u32| Column { key, name: name.into(), type_oid, type_modifier: -1 };
    Relation {
        xid: None,
        oid: OID,
        namespace: "public".into(),
        name: "bench_items".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            column("org_id", true, 23),
            column("id", true, 20),
            column("name", false, 25),
            column("updated_at", false, 1184),
            column("payload", false, 25),
        ],
    }
}

/// The compiled rule set.
pub fn rules() -> RuleSet {
    RuleSet::from_sources(&[(PathBuf::from("rules.toml"), RULES.to_string())])
        .expect("the benchmark rules are valid")
        .rules
}

fn tuple(b: &mut BytesMut, values: &[Option<&str>]) {
    b.put_u16(values.len() as u16);
    for v in values {
        match v {
            Some(text) => {
                b.put_u8(b't');
                b.put_i32(text.len() as i32);
                b.put_slice(text.as_bytes());
            }
            None => b.put_u8(b'n'),
        }
    }
}

const PAYLOAD: &str = "pppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppp";

fn row(id: u64) -> [String; 5] {
    [
        (id % 10_000).to_string(),
        id.to_string(),
        format!("item {id}"),
        "2026-11-22 21:31:51.123456+00".to_string(),
        PAYLOAD.to_string(),
    ]
}

/// An Insert of row `id`, as pgoutput sends it (text format).
pub fn insert(id: u64) -> Bytes {
    let r = row(id);
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(OID);
    b.put_u8(b'N');
    tuple(&mut b, &r.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>());
    b.freeze()
}

/// An Update of row `id` under REPLICA IDENTITY DEFAULT (no old image: the key did not change).
pub fn update(id: u64) -> Bytes {
    let r = row(id);
    let mut b = BytesMut::new();
    b.put_u8(b'U');
    b.put_u32(OID);
    b.put_u8(b'N');
    tuple(&mut b, &r.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>());
    b.freeze()
}

/// An Update of row `id` under REPLICA IDENTITY FULL: the whole old row, then the new.
pub fn update_full(id: u64) -> Bytes {
    let old = row(id);
    let mut new = row(id);
    new[2] = format!("renamed {id}");
    let mut b = BytesMut::new();
    b.put_u8(b'U');
    b.put_u32(OID);
    b.put_u8(b'O');
    tuple(&mut b, &old.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>());
    b.put_u8(b'N');
    tuple(&mut b, &new.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>());
    b.freeze()
}

/// A Delete of row `id` under REPLICA IDENTITY DEFAULT: key columns only.
pub fn delete(id: u64) -> Bytes {
    let r = row(id);
    let mut b = BytesMut::new();
    b.put_u8(b'D');
    b.put_u32(OID);
    b.put_u8(b'K');
    tuple(&mut b, &[Some(&r[0]), Some(&r[1]), None, None, None]);
    b.freeze()
}

/// Begin of transaction `xid`.
pub fn begin(xid: u32) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'B');
    b.put_u64(0x1_6B37_4D48);
    b.put_i64(817_000_000_000_000);
    b.put_u32(xid);
    b.freeze()
}

/// Commit ending at `end`.
pub fn commit(end: u64) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'C');
    b.put_u8(0);
    b.put_u64(end - 48);
    b.put_u64(end);
    b.put_i64(817_000_000_000_000);
    b.freeze()
}

/// The Relation message announcing `bench_items`.
pub fn relation_message() -> Bytes {
    let rel = relation();
    let mut b = BytesMut::new();
    b.put_u8(b'R');
    b.put_u32(OID);
    b.put_slice(b"public\0bench_items\0");
    b.put_u8(b'd');
    b.put_u16(rel.columns.len() as u16);
    for c in &rel.columns {
        b.put_u8(u8::from(c.key));
        b.put_slice(c.name.as_bytes());
        b.put_u8(0);
        b.put_u32(c.type_oid);
        b.put_i32(c.type_modifier);
    }
    b.freeze()
}

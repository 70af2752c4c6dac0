//! Replay throughput: a synthetic recording of 100,000 row changes (10,000 transactions of
//! ten changes over two tables) parsed, checked and routed through the production router
//! and a batch per transaction, as `walbust replay` does. The target is at least 200,000
//! changes per second; criterion reports the figure as `thrpt` in elements (changes) per second.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use walbust::domain::rules::RuleSet;
use walbust::offline::recording::format::{
    ChangeOp, ChangeRecord, ColumnRecord, Header, Identity, Image, Line, RelationRecord, TxRecord, to_line,
};
use walbust::offline::recording::replay;
use walbust::postgres::lsn::Lsn;

const TRANSACTIONS: u64 = 10_000;
const CHANGES_PER_TX: u64 = 10;

const RULES: &str = r#"
[[rule]]
name = "items"
table = "items"
keys = ["item:{id}", "org:{org_id}:items"]

[[rule]]
name = "active lists"
table = "items"
when = { status = "active" }
patterns = ["list:{org_id}:*"]

[[rule]]
name = "members"
table = "members"
keys = ["member:{id}"]
tags = ["idx:org:{org_id}"]
"#;

fn relation(rel: u32, oid: u32, name: &str, identity: Identity, columns: &[&str]) -> RelationRecord {
    RelationRecord {
        rel,
        oid,
        schema: "public".into(),
        name: name.into(),
        replica_identity: identity,
        columns: columns
            .iter()
            .map(|c| ColumnRecord {
                name: c.to_string(),
                type_oid: if c.ends_with("id") { 20 } else { 25 },
                type_modifier: -1,
                key: identity == Identity::Full || *c == "id",
            })
            .collect(),
    }
}

fn item(id: u64, status: &str) -> Image {
    [
        ("id", id.to_string()),
        ("org_id", (id % 97).to_string()),
        ("status", status.to_string()),
        ("name", format!("item number {id}")),
        ("body", "@toast".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The recording, as `walbust record` writes it.
fn recording() -> String {
    let header = Header {
        format: walbust::offline::recording::FORMAT_VERSION,
        server_version: "15.6".into(),
        database: "bench".into(),
        captured_at: "2024-05-01T12:00:00.000000Z".into(),
        publication: "walbust".into(),
        message_prefix: "walbust".into(),
        slot: "walbust_record_1".into(),
        start_lsn: Lsn(0x100_0000),
        relations: vec![
            relation(1, 16384, "items", Identity::Full, &["id", "org_id", "status", "name", "body"]),
            relation(2, 16390, "members", Identity::Default, &["id", "org_id", "role"]),
        ],
    };
    let mut out = to_line(&Line::Header(header));
    out.push('\n');
    let change = |op, rel: u32, table: &str| ChangeRecord {
        op,
        table: Some(table.into()),
        rel: Some(rel),
        ..ChangeRecord::default()
    };
    for t in 0..TRANSACTIONS {
        let mut changes = Vec::with_capacity(CHANGES_PER_TX as usize);
        for k in 0..4 {
            let mut c = change(ChangeOp::Insert, 1, "public.items");
            c.new = Some(item(t * 10 + k, "active"));
            changes.push(c);
        }
        for k in 4..7 {
            let mut c = change(ChangeOp::Update, 1, "public.items");
            c.old = Some(item(t * 10 + k, "active"));
            c.new = Some(item(t * 10 + k, if k == 5 { "archived" } else { "active" }));
            changes.push(c);
        }
        for k in 7..9 {
            let mut c = change(ChangeOp::Delete, 1, "public.items");
            c.old = Some(item(t * 10 + k, "archived"));
            changes.push(c);
        }
        let mut c = change(ChangeOp::Insert, 2, "public.members");
        c.new = Some(
            [("id", t.to_string()), ("org_id", (t % 97).to_string()), ("role", "admin".into())]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        );
        changes.push(c);
        let lsn = 0x100_0000 + t * 0x400;
        let tx = TxRecord {
            xid: 1000 + t as u32,
            commit_lsn: Lsn(lsn),
            end_lsn: Lsn(lsn + 0x30),
            commit_time: "2024-05-01T12:00:00.000000Z".into(),
            changes,
        };
        out.push_str(&to_line(&Line::Tx(tx)));
        out.push('\n');
    }
    out
}

fn bench(c: &mut Criterion) {
    let text = recording();
    let rules = Arc::new(
        RuleSet::from_sources(&[(PathBuf::from("bench.toml"), RULES.to_string())]).expect("benchmark rules").rules,
    );
    let changes = TRANSACTIONS * CHANGES_PER_TX;
    let check = replay::replay(text.as_bytes(), rules.clone()).expect("the synthetic recording replays");
    assert_eq!(check.summary.changes, changes);
    eprintln!(
        "replay benchmark: {changes} changes in {TRANSACTIONS} transactions, {} MB of JSON Lines, {} actions",
        text.len() / 1_000_000,
        check.summary.actions
    );
    let mut group = c.benchmark_group("replay");
    group.sample_size(10);
    group.measurement_time(std::time::Duration::from_secs(12));
    group.throughput(Throughput::Elements(changes));
    group.bench_function("parse_route_100k_changes", |b| {
        b.iter(|| black_box(replay::replay(black_box(text.as_bytes()), rules.clone()).expect("replays")))
    });
    group.bench_function("parse_route_render_100k_changes", |b| {
        b.iter(|| {
            let r = replay::replay(black_box(text.as_bytes()), rules.clone()).expect("replays");
            black_box(r.render())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

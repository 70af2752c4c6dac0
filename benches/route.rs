//! Router microbenchmarks: one change routed to its two keys per iteration, alone and
//! with the decoder and batcher around it as the pipeline's reader runs them.

#[path = "messages.rs"]
mod messages;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use walbust::domain::batch::Batch;
use walbust::domain::rules::{Change, Op, Router};
use walbust::postgres::pgoutput::{Decoder, LogicalMessage, OldTuple, Tuple};

/// Changes per sealed batch: the default `max_actions` of 5000 at two keys per change.
const BATCH_CHANGES: u64 = 2_500;

fn decoded(bytes: bytes::Bytes) -> LogicalMessage {
    Decoder::new(1).decode(bytes).expect("the benchmark message decodes")
}

fn route(c: &mut Criterion) {
    let relation = messages::relation();
    let mut router = Router::new(Arc::new(messages::rules()));
    assert!(router.bind(&relation).is_empty());
    let LogicalMessage::Insert(insert) = decoded(messages::insert(1_234_567)) else { unreachable!() };
    let LogicalMessage::Update(update) = decoded(messages::update(1_234_567)) else { unreachable!() };
    let LogicalMessage::Update(update_full) = decoded(messages::update_full(1_234_567)) else { unreachable!() };
    let LogicalMessage::Delete(delete) = decoded(messages::delete(1_234_567)) else { unreachable!() };
    let cases: [(&str, Op, Option<&OldTuple>, Option<&Tuple>); 4] = [
        ("insert", Op::Insert, None, Some(&insert.new)),
        ("update", Op::Update, None, Some(&update.new)),
        ("update_full", Op::Update, update_full.old.as_ref(), Some(&update_full.new)),
        ("delete", Op::Delete, Some(&delete.old), None),
    ];
    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));
    let mut out = Vec::new();
    for (name, op, old, new) in cases {
        let change = Change { relation: &relation, op, old, new };
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                router.route(black_box(&change), &mut out);
                black_box(out.len())
            })
        });
    }
    group.finish();

    // The reader's work per change: decode, route, add to the batch; a batch is sealed
    // (its actions taken for the sink) every BATCH_CHANGES changes.
    let mut group = c.benchmark_group("reader");
    group.throughput(Throughput::Elements(1));
    let inserts: Vec<bytes::Bytes> = (0..BATCH_CHANGES).map(|i| messages::insert(1_000_000 + i)).collect();
    let mut decoder = Decoder::new(1);
    let mut batch = Batch::new();
    let mut n = 0usize;
    group.bench_function("decode_route_batch_insert", |b| {
        b.iter(|| {
            let bytes = inserts[n % inserts.len()].clone();
            n += 1;
            let Ok(LogicalMessage::Insert(i)) = decoder.decode(bytes) else { unreachable!() };
            let change = Change { relation: &relation, op: Op::Insert, old: None, new: Some(&i.new) };
            out.clear();
            router.route(&change, &mut out);
            for r in &out {
                batch.push(r.action.clone());
            }
            if n.is_multiple_of(inserts.len()) {
                black_box(batch.take_actions());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, route);
criterion_main!(benches);

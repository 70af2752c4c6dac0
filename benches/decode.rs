//! Decoder microbenchmarks: one pgoutput message per iteration.

#[path = "messages.rs"]
mod messages;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use walbust::postgres::pgoutput::Decoder;

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    let cases = [
        ("begin", messages::begin(7)),
        ("commit", messages::commit(0x1_6B37_4D78)),
        ("insert", messages::insert(1_234_567)),
        ("update", messages::update(1_234_567)),
        ("update_full", messages::update_full(1_234_567)),
        ("delete", messages::delete(1_234_567)),
        ("relation", messages::relation_message()),
    ];
    for (name, bytes) in cases {
        let mut decoder = Decoder::new(1);
        decoder.decode(bytes.clone()).expect("the benchmark message decodes");
        group.bench_function(name, |b| b.iter(|| black_box(decoder.decode(black_box(bytes.clone())))));
    }
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);

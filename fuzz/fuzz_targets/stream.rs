//! The replication stream's frame handling in the pipeline: a sequence of CopyData payloads
//! (XLogData carrying pgoutput messages, and primary keepalives) through the frame parser,
//! the decoder, the transaction rules, the keepalive rule, the example rules' router and the
//! batch. Each frame is framed as `walbust_fuzz::frames` says; its first byte is a control
//! byte (bit 0: the applier acknowledges the batch in hand after this frame), the rest the
//! CopyData payload. The first error ends the input, as it ends a replication session.

#![no_main]

use std::path::Path;
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walbust::daemon::pipeline::FrameHarness;
use walbust::domain::config::Config;
use walbust::domain::rules::RuleSet;

static CONFIG: LazyLock<Config> = LazyLock::new(|| {
    let text = "rules = [\"rules/*.toml\"]\n[source]\nurl = \"postgres://u@localhost/db\"\n[redis]\nurl = \"redis://localhost\"\n[batch]\nmax_actions = 64\n";
    Config::parse(Path::new("config.toml"), text, &|_| None).expect("the fuzz config is valid")
});

static RULES: LazyLock<Arc<RuleSet>> = LazyLock::new(|| {
    let sources: Vec<_> = walbust_fuzz::EXAMPLE_RULES.iter().map(|(p, t)| (p.into(), t.to_string())).collect();
    Arc::new(RuleSet::from_sources(&sources).expect("the example rules load").rules)
});

fuzz_target!(|data: &[u8]| {
    let mut harness = FrameHarness::new(&CONFIG, RULES.clone());
    let input = Bytes::copy_from_slice(data);
    for frame in walbust_fuzz::frames(&input) {
        let Some(&control) = frame.first() else { continue };
        let payload = frame.slice(1..);
        let keepalive = payload.first() == Some(&b'k');
        let (open, flushed) = (harness.open_transaction(), harness.flushed());
        if harness.frame(payload).is_err() {
            return;
        }
        // Only a keepalive outside a transaction may move the flushed position by itself.
        if !keepalive || open.is_some() {
            assert_eq!(harness.flushed(), flushed, "a frame moved the flushed position (open transaction: {open:?})");
        }
        if control & 1 != 0 {
            harness.apply();
        }
        assert!(harness.flushed() >= flushed, "the flushed position went back");
        assert!(harness.flushed() <= harness.received(), "flushed past what was received");
    }
});

//! The recording reader: the input is a recording (JSON Lines), read record by record as
//! `walbust replay` reads it, then replayed through the router over the example rules.

#![no_main]

use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use walbust::domain::rules::RuleSet;
use walbust::offline::recording::format::{Line, Reader, to_line};
use walbust::offline::recording::replay;

static RULES: LazyLock<Arc<RuleSet>> = LazyLock::new(|| {
    let sources: Vec<_> = walbust_fuzz::EXAMPLE_RULES.iter().map(|(p, t)| (p.into(), t.to_string())).collect();
    Arc::new(RuleSet::from_sources(&sources).expect("the example rules load").rules)
});

fuzz_target!(|data: &[u8]| {
    if let Ok(mut reader) = Reader::open(data) {
        let header = to_line(&Line::Header(reader.header().clone()));
        loop {
            match reader.next_record() {
                Ok(Some((_, line))) => {
                    // What the recorder would write reads back as the same record.
                    let written = to_line(&line);
                    assert_eq!(read_back(&header, &written), line, "a record does not read back as written: {written}");
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = e.report(std::path::Path::new("fuzz.jsonl"));
                    break;
                }
            }
        }
    }
    if let Ok(replayed) = replay::replay(data, RULES.clone()) {
        let _ = replayed.render();
    }
});

/// Reads `line` back through a reader, after `header`.
fn read_back(header: &str, line: &str) -> Line {
    let text = format!("{header}\n{line}\n");
    let mut reader = Reader::open(text.as_bytes()).expect("a written header reads back");
    match reader.next_record() {
        Ok(Some((_, again))) => again,
        other => panic!("a written record does not read back: {line}: {other:?}"),
    }
}

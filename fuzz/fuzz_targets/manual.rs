//! The manual invalidation body parser: the input is the content of a
//! `pg_logical_emit_message(true, 'walbust', ...)` message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use walbust::domain::action::Action;
use walbust::domain::rules::manual;

fuzz_target!(|data: &[u8]| {
    match manual::actions(data) {
        Ok(actions) => {
            for a in &actions {
                match a {
                    Action::Unlink(k) | Action::ScanUnlink(k) | Action::BustTag(k) => {
                        assert!(!k.is_empty(), "an empty key or pattern became an action")
                    }
                    other => panic!("a manual message produced {other:?}"),
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});

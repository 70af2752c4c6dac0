//! Manual invalidation through the WAL: a logical decoding message written in the
//! writer's own transaction, applied in commit order with its row changes.
//!
//! ```sql
//! SELECT pg_logical_emit_message(true, 'walbust', '{"keys":["admin:defaults"]}');
//! ```

use crate::action::Action;
use serde::Deserialize;

/// The JSON body of a manual invalidation message.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    patterns: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
}

/// Why a message body was skipped.
#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    /// The body is not JSON of the expected shape.
    #[error("malformed manual invalidation body; expected {{\"keys\":[...],\"patterns\":[...],\"tags\":[...]}}")]
    Json(#[source] serde_json::Error),
    /// An empty key or pattern, which would do nothing or everything.
    #[error("manual invalidation body names an empty {0}")]
    Empty(&'static str),
}

/// The actions a message body asks for: `UNLINK` keys, `SCAN-UNLINK` patterns (taken as
/// globs, as written), `BUST-TAG` tags.
pub fn actions(body: &[u8]) -> Result<Vec<Action>, ManualError> {
    let body: Body = serde_json::from_slice(body).map_err(ManualError::Json)?;
    for (list, what) in [(&body.keys, "key"), (&body.patterns, "pattern"), (&body.tags, "tag")] {
        if list.iter().any(|s| s.is_empty()) {
            return Err(ManualError::Empty(what));
        }
    }
    let keys = body.keys.into_iter().map(Action::Unlink);
    let patterns = body.patterns.into_iter().map(Action::ScanUnlink);
    let tags = body.tags.into_iter().map(Action::BustTag);
    Ok(keys.chain(patterns).chain(tags).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_patterns_and_tags_become_actions() {
        let got = actions(br#"{"keys":["admin:defaults"],"patterns":["plans_*"],"tags":["idx:1"]}"#).unwrap();
        assert_eq!(
            got,
            [
                Action::Unlink("admin:defaults".into()),
                Action::ScanUnlink("plans_*".into()),
                Action::BustTag("idx:1".into())
            ]
        );
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for body in [&b"not json"[..], br#"{"key":["a"]}"#, br#"{"keys":"a"}"#, br#"{"keys":[""]}"#, b"\xff"] {
            assert!(actions(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
    }
}

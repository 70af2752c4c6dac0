//! Manual invalidation through the WAL: a logical decoding message written in the
//! writer's own transaction, applied in commit order with its row changes.
//!
//! ```sql
//! SELECT pg_logical_emit_message(true, 'walbust', '{"keys":["admin:defaults"]}');
//! ```

use crate::domain::action::{Action, Invalidation, MAX_KEY_BYTES};

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
    let body: Invalidation = serde_json::from_slice(body).map_err(ManualError::Json)?;
    if let Some(what) = body.empty_entry() {
        return Err(ManualError::Empty(what));
    }
    Ok(body.into_actions())
}

/// Which manual invalidations are applied. Any role that may execute
/// `pg_logical_emit_message` can write a message, so by default a pattern must start with
/// a literal prefix (never `*` alone), and `manual_prefixes` narrows every key, pattern and
/// tag to the caches manual messages are meant for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManualPolicy {
    /// Prefixes every key, tag and pattern must start with; empty for any.
    pub prefixes: Vec<String>,
    /// Also apply patterns with no literal prefix, such as `*` or `[a-z]*`.
    pub match_all: bool,
}

/// Why one action of a manual message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Outside every prefix of `manual_prefixes`.
    NotAllowed,
    /// A pattern with no literal prefix, without `manual_match_all = true`.
    MatchAll,
    /// Longer than a key may be ([`MAX_KEY_BYTES`]).
    TooLong,
}

impl Refusal {
    /// The label value of `walbust_manual_refused_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "not_allowed",
            Refusal::MatchAll => "match_all",
            Refusal::TooLong => "too_long",
        }
    }

    /// Why, in words, with the setting that decides it.
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "outside every prefix of manual_prefixes",
            Refusal::MatchAll => "a pattern with no literal prefix, refused unless manual_match_all = true",
            Refusal::TooLong => "longer than a key may be (64 KiB)",
        }
    }
}

impl ManualPolicy {
    /// Whether `action`, from a manual message, may be applied.
    pub fn check(&self, action: &Action) -> Result<(), Refusal> {
        let (text, pattern) = match action {
            Action::ScanUnlink(p) => (p.as_str(), true),
            other => (other.key().unwrap_or_default(), false),
        };
        if text.len() > MAX_KEY_BYTES {
            return Err(Refusal::TooLong);
        }
        let literal = if pattern { literal_prefix(text) } else { text.to_owned() };
        if pattern && literal.is_empty() && !self.match_all {
            return Err(Refusal::MatchAll);
        }
        if !self.prefixes.is_empty() && !self.prefixes.iter().any(|p| literal.starts_with(p.as_str())) {
            return Err(Refusal::NotAllowed);
        }
        Ok(())
    }
}

/// The characters a glob matches literally before its first wildcard, with escapes resolved.
fn literal_prefix(glob: &str) -> String {
    let mut out = String::new();
    let mut chars = glob.chars();
    while let Some(c) = chars.next() {
        match c {
            '*' | '?' | '[' => break,
            '\\' => match chars.next() {
                Some(escaped) => out.push(escaped),
                None => break,
            },
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_match_everything_pattern_is_refused_unless_allowed() {
        let default = ManualPolicy::default();
        for p in ["*", "?*", "[a-z]*", "\\"] {
            let got = default.check(&Action::ScanUnlink(p.into()));
            assert_eq!(got, Err(Refusal::MatchAll), "{p}");
        }
        assert_eq!(default.check(&Action::ScanUnlink("plans_*".into())), Ok(()));
        assert_eq!(default.check(&Action::ScanUnlink("\\**".into())), Ok(()), "an escaped star is a literal");
        assert_eq!(default.check(&Action::BustTag("x".into())), Ok(()));
        let open = ManualPolicy { match_all: true, ..ManualPolicy::default() };
        assert_eq!(open.check(&Action::ScanUnlink("*".into())), Ok(()));
    }

    #[test]
    fn prefixes_narrow_keys_patterns_and_tags() {
        let policy = ManualPolicy { prefixes: vec!["admin:".into(), "idx:".into()], match_all: false };
        assert_eq!(policy.check(&Action::Unlink("admin:defaults".into())), Ok(()));
        assert_eq!(policy.check(&Action::ScanUnlink("admin:plans:*".into())), Ok(()));
        assert_eq!(policy.check(&Action::BustTag("idx:1".into())), Ok(()));
        assert_eq!(policy.check(&Action::Unlink("session:42".into())), Err(Refusal::NotAllowed));
        assert_eq!(policy.check(&Action::ScanUnlink("adm*".into())), Err(Refusal::NotAllowed));
        assert_eq!(policy.check(&Action::BustTag("queue".into())), Err(Refusal::NotAllowed));
        let long = "admin:".to_owned() + &"x".repeat(MAX_KEY_BYTES);
        assert_eq!(policy.check(&Action::Unlink(long)), Err(Refusal::TooLong));
    }

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

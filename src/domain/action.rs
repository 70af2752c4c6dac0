//! Invalidation actions: what the router asks the sink to do, in a canonical text form.

use serde::Deserialize;
use std::fmt;

/// The longest key or pattern walbust sends. A rendered key longer than this (a huge row
/// value in a template) is widened to a pattern instead: Redis refuses a command whose
/// argument exceeds `proto-max-bulk-len` and drops the connection, and a key this long
/// cannot be a cache key anyone reads.
pub const MAX_KEY_BYTES: usize = 64 * 1024;

/// The longest write-through value walbust sends; a longer row is unlinked instead, so the
/// next read fills the cache. 1 MiB is the smallest `proto-max-bulk-len` Redis allows.
pub const MAX_VALUE_BYTES: usize = 1 << 20;

/// One idempotent thing to do in Redis. Applying an action twice has the effect of once,
/// which is what makes at-least-once delivery safe (a version bump twice is two bumps,
/// which readers of versioned keys cannot tell from one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// `UNLINK key`: delete one exact key.
    Unlink(String),
    /// `SCAN MATCH pattern` then `UNLINK` every match.
    ScanUnlink(String),
    /// Delete every member of the index set `key`, then the set, atomically with respect
    /// to a concurrent `SADD` (a member added meanwhile is deleted now or stays in the set).
    BustTag(String),
    /// Bust every index set whose name matches the pattern.
    ScanBustTag(String),
    /// `INCR key`: bump a version key.
    Incr(String),
    /// `INCR` every key the pattern matches.
    ScanIncr(String),
    /// `PUBLISH channel message`.
    Publish {
        /// The channel.
        channel: String,
        /// The message.
        message: String,
    },
    /// Write-through: `SET key value [EX ttl]`; when the SET fails, the key is unlinked.
    Set {
        /// The key.
        key: String,
        /// The value (the row as JSON).
        value: String,
        /// Expiry in seconds.
        ttl: Option<u64>,
    },
}

/// Keys, patterns and tags to invalidate by hand, in one shape wherever a person names
/// them: the body of a manual invalidation message, the `flush` of a recreated slot, and
/// `walbust invalidate`'s arguments.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invalidation {
    /// Exact keys, `UNLINK`ed.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Globs, as written: every match is `UNLINK`ed.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Index sets, busted with their members.
    #[serde(default)]
    pub tags: Vec<String>,
}

impl Invalidation {
    /// What the first empty entry is (`key`, `pattern` or `tag`): an empty key or pattern
    /// would do nothing or everything, so it is refused.
    pub fn empty_entry(&self) -> Option<&'static str> {
        [(&self.keys, "key"), (&self.patterns, "pattern"), (&self.tags, "tag")]
            .into_iter()
            .find(|(list, _)| list.iter().any(String::is_empty))
            .map(|(_, what)| what)
    }

    /// `UNLINK` for the keys, `SCAN-UNLINK` for the patterns, `BUST-TAG` for the tags, in
    /// that order.
    pub fn into_actions(self) -> Vec<Action> {
        let keys = self.keys.into_iter().map(Action::Unlink);
        let patterns = self.patterns.into_iter().map(Action::ScanUnlink);
        let tags = self.tags.into_iter().map(Action::BustTag);
        keys.chain(patterns).chain(tags).collect()
    }
}

impl Action {
    /// The action's kind as used in logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Unlink(_) => "unlink",
            Action::ScanUnlink(_) => "scan_unlink",
            Action::BustTag(_) => "bust_tag",
            Action::ScanBustTag(_) => "scan_bust_tag",
            Action::Incr(_) => "incr",
            Action::ScanIncr(_) => "scan_incr",
            Action::Publish { .. } => "publish",
            Action::Set { .. } => "set",
        }
    }

    /// The bytes of its keys, patterns and values: what it costs to hold and to send.
    pub fn size(&self) -> usize {
        match self {
            Action::Unlink(k)
            | Action::ScanUnlink(k)
            | Action::BustTag(k)
            | Action::ScanBustTag(k)
            | Action::Incr(k)
            | Action::ScanIncr(k) => k.len(),
            Action::Publish { channel, message } => channel.len() + message.len(),
            Action::Set { key, value, .. } => key.len() + value.len(),
        }
    }

    /// The exact key the action writes or deletes, for actions on one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            Action::Unlink(k) | Action::BustTag(k) | Action::Incr(k) | Action::Set { key: k, .. } => Some(k),
            _ => None,
        }
    }

    /// Parses the canonical one-line form, as written in test expectations.
    pub fn parse(line: &str) -> Result<Action, String> {
        let line = line.trim();
        let (verb, rest) = line.split_once(' ').ok_or_else(|| format!("`{line}` has no argument"))?;
        let arg = rest.trim().to_string();
        Ok(match verb {
            "UNLINK" => Action::Unlink(arg),
            "SCAN-UNLINK" => Action::ScanUnlink(arg),
            "BUST-TAG" => Action::BustTag(arg),
            "SCAN-BUST-TAG" => Action::ScanBustTag(arg),
            "INCR" => Action::Incr(arg),
            "SCAN-INCR" => Action::ScanIncr(arg),
            "PUBLISH" => {
                let (channel, message) =
                    arg.split_once(' ').ok_or_else(|| format!("`{line}`: PUBLISH needs a channel and a message"))?;
                Action::Publish { channel: channel.to_string(), message: message.to_string() }
            }
            "SET" => {
                let (key, rest) =
                    arg.split_once(' ').ok_or_else(|| format!("`{line}`: SET needs a key and a value"))?;
                let (value, ttl) = match rest.rsplit_once(" EX ") {
                    Some((v, t)) if t.trim().parse::<u64>().is_ok() => (v, t.trim().parse().ok()),
                    _ => (rest, None),
                };
                Action::Set { key: key.to_string(), value: value.to_string(), ttl }
            }
            other => {
                return Err(format!(
                    "unknown action `{other}`; expected UNLINK, SCAN-UNLINK, BUST-TAG, SCAN-BUST-TAG, INCR, SCAN-INCR, PUBLISH or SET"
                ));
            }
        })
    }
}

/// The canonical one-line form: `UNLINK user:7:settings:all`, `SCAN-UNLINK plans_list_acme_*`,
/// `BUST-TAG idx:1`, `INCR ver:org:1`, `PUBLISH chan {...}`, `SET user:7 {...} EX 300`.
impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Unlink(k) => write!(f, "UNLINK {k}"),
            Action::ScanUnlink(p) => write!(f, "SCAN-UNLINK {p}"),
            Action::BustTag(k) => write!(f, "BUST-TAG {k}"),
            Action::ScanBustTag(p) => write!(f, "SCAN-BUST-TAG {p}"),
            Action::Incr(k) => write!(f, "INCR {k}"),
            Action::ScanIncr(p) => write!(f, "SCAN-INCR {p}"),
            Action::Publish { channel, message } => write!(f, "PUBLISH {channel} {message}"),
            Action::Set { key, value, ttl: None } => write!(f, "SET {key} {value}"),
            Action::Set { key, value, ttl: Some(t) } => write!(f, "SET {key} {value} EX {t}"),
        }
    }
}

/// Escapes Redis glob metacharacters so that `value` matches only itself inside a pattern.
pub fn glob_escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalidation_names_its_first_empty_entry_and_orders_keys_patterns_tags() {
        let asked: Invalidation = serde_json::from_str(r#"{"tags":["t"],"patterns":["p:*"],"keys":["k"]}"#).unwrap();
        assert_eq!(asked.empty_entry(), None);
        assert_eq!(
            asked.into_actions(),
            [Action::Unlink("k".into()), Action::ScanUnlink("p:*".into()), Action::BustTag("t".into())]
        );
        let with_empty = Invalidation { patterns: vec!["p:*".into(), String::new()], ..Invalidation::default() };
        assert_eq!(with_empty.empty_entry(), Some("pattern"));
        assert!(serde_json::from_str::<Invalidation>(r#"{"kyes":["k"]}"#).is_err(), "unknown fields are refused");
    }

    #[test]
    fn canonical_text_form_round_trips() {
        let actions = [
            Action::Unlink("user:7".into()),
            Action::ScanUnlink("p_*".into()),
            Action::BustTag("idx:fr:budgets:ORG1".into()),
            Action::ScanBustTag("idx:*".into()),
            Action::Incr("ver:org:1".into()),
            Action::ScanIncr("ver:*".into()),
            Action::Publish { channel: "cache".into(), message: r#"{"table":"public.t"}"#.into() },
            Action::Set { key: "user:7".into(), value: r#"{"id":7,"n":"a b"}"#.into(), ttl: Some(300) },
            Action::Set { key: "user:8".into(), value: "{}".into(), ttl: None },
        ];
        for a in actions {
            assert_eq!(Action::parse(&a.to_string()).unwrap(), a, "{a}");
        }
        assert!(Action::parse("DEL x").unwrap_err().contains("unknown action `DEL`"));
    }

    #[test]
    fn glob_metacharacters_are_escaped() {
        let mut s = String::new();
        glob_escape_into(&mut s, r"a*b?[c-d]\e^");
        assert_eq!(s, r"a\*b\?\[c-d\]\\e\^");
    }
}

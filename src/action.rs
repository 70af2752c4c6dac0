//! Invalidation actions: what the router asks the sink to do, in a canonical text form.

use std::fmt;

/// One idempotent thing to do in Redis. Applying an action twice has the effect of once,
/// which is what makes at-least-once delivery safe.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// `UNLINK key`: delete one exact key.
    Unlink(String),
    /// `SCAN MATCH pattern` then `UNLINK` every match: delete every key the glob matches.
    ScanUnlink(String),
}

impl Action {
    /// The action's kind as used in logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Unlink(_) => "unlink",
            Action::ScanUnlink(_) => "scan_unlink",
        }
    }
}

/// The canonical one-line form: `UNLINK user:7:settings:all`, `SCAN-UNLINK plans_list_acme_*`.
impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Unlink(key) => write!(f, "UNLINK {key}"),
            Action::ScanUnlink(pattern) => write!(f, "SCAN-UNLINK {pattern}"),
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
    fn canonical_text_form() {
        assert_eq!(Action::Unlink("user:7".into()).to_string(), "UNLINK user:7");
        assert_eq!(Action::ScanUnlink("p_*".into()).to_string(), "SCAN-UNLINK p_*");
    }

    #[test]
    fn glob_metacharacters_are_escaped() {
        let mut s = String::new();
        glob_escape_into(&mut s, r"a*b?[c-d]\e^");
        assert_eq!(s, r"a\*b\?\[c-d\]\\e\^");
    }
}

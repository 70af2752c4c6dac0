//! An error and its causes on one line, for logs and messages.

use std::error::Error;

/// The error and its sources joined by `: `, leaving out a cause whose text is already
/// said: many errors (redis-rs', for one) print their source in their own message too, and
/// the operating system's reason would otherwise appear twice.
pub fn error_chain(e: &dyn Error) -> String {
    let mut said = e.to_string();
    let mut cur = e.source();
    while let Some(cause) = cur {
        let text = cause.to_string();
        if !said.contains(&text) {
            said.push_str(": ");
            said.push_str(&text);
        }
        cur = cause.source();
    }
    said
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{message}")]
    struct Layer {
        message: String,
        #[source]
        source: Option<Box<Layer>>,
    }

    fn layers(texts: &[&str]) -> Layer {
        texts
            .iter()
            .rev()
            .fold(None, |source, t| Some(Layer { message: t.to_string(), source: source.map(Box::new) }))
            .unwrap()
    }

    #[test]
    fn each_cause_is_said_once() {
        assert_eq!(error_chain(&layers(&["a", "b", "c"])), "a: b: c");
        let refused = "Connection refused (os error 111)";
        let e = layers(&[&format!("redis failed: {refused}"), refused]);
        assert_eq!(error_chain(&e), format!("redis failed: {refused}"));
    }
}

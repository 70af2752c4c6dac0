//! A column value as text, as recordings and rule test files write it: text as Postgres
//! prints it, with markers for what is not text. One encoding for both, so a value written
//! by `walbust record` reads the same in a `*.test.toml` file.
//!
//! | written | value |
//! |---|---|
//! | `@null` | SQL NULL |
//! | `@toast` | an unchanged TOASTed value the stream did not carry |
//! | `@bytes:<hex>` | text that is not valid UTF-8 |
//! | `@binary:<hex>` | a value sent in binary format |
//! | `@@...` | text starting with `@` (one `@` added) |
//! | anything else | the text itself |

use crate::postgres::pgoutput::Value;
use bytes::Bytes;

/// The marker for SQL NULL .
pub const NULL: &str = "@null";

/// The marker for an unchanged TOASTed value that the stream did not carry.
pub const TOAST: &str = "@toast";

/// The marker prefix for text that is not valid UTF-8, followed by its bytes in hex.
pub const BYTES: &str = "@bytes:";

/// The marker prefix for a value sent in binary format, followed by its bytes in hex.
pub const BINARY: &str = "@binary:";

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes().chunks_exact(2).map(|p| Some((digit(p[0])? << 4) | digit(p[1])?)).collect()
}

/// Encodes text from the stream: as is, with one more `@` when it starts with `@`, or as
/// `@bytes:<hex>` when it is not UTF-8.
pub fn encode_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if s.starts_with('@') => format!("@{s}"),
        Ok(s) => s.to_string(),
        Err(_) => format!("{BYTES}{}", hex(bytes)),
    }
}

/// Encodes one column value.
pub fn encode_value(value: &Value) -> String {
    match value {
        Value::Null => NULL.to_string(),
        Value::UnchangedToast => TOAST.to_string(),
        Value::Text(b) => encode_text(b),
        Value::Binary(b) => format!("{BINARY}{}", hex(b)),
    }
}

/// Decodes one column value; the error says what is wrong with the marker.
pub fn decode_value(text: String) -> Result<Value, String> {
    if !text.starts_with('@') {
        return Ok(Value::Text(Bytes::from(text)));
    }
    match text.as_str() {
        NULL => Ok(Value::Null),
        TOAST => Ok(Value::UnchangedToast),
        t if t.starts_with(BINARY) => {
            unhex(&t[BINARY.len()..]).map(|b| Value::Binary(Bytes::from(b))).ok_or_else(|| bad_hex(t))
        }
        _ => decode_text(text).map(Value::Text),
    }
}

/// Decodes text encoded by [`encode_text`] (a message content); `@null` and `@toast` are
/// not text and are refused.
pub fn decode_text(text: String) -> Result<Bytes, String> {
    if !text.starts_with('@') {
        return Ok(Bytes::from(text));
    }
    if text.starts_with("@@") {
        return Ok(Bytes::copy_from_slice(&text.as_bytes()[1..]));
    }
    if let Some(h) = text.strip_prefix(BYTES) {
        return unhex(h).map(Bytes::from).ok_or_else(|| bad_hex(&text));
    }
    Err(format!(
        "unknown marker `{}`; the markers are {NULL}, {TOAST}, {BYTES}<hex> and {BINARY}<hex>, and text starting with @ is written with @@",
        text.chars().take(40).collect::<String>()
    ))
}

fn bad_hex(t: &str) -> String {
    format!("`{}` does not hold an even number of hex digits", t.chars().take(40).collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_their_text_with_markers() {
        let values = [
            Value::Null,
            Value::UnchangedToast,
            Value::Text(Bytes::from_static(b"plain")),
            Value::Text(Bytes::from_static(b"@null")),
            Value::Text(Bytes::from_static(b"@@x")),
            Value::Text(Bytes::from_static(b"")),
            Value::Text(Bytes::from_static(b"\xff\x00a")),
            Value::Binary(Bytes::from_static(&[0, 1, 254])),
        ];
        let texts: Vec<String> = values.iter().map(encode_value).collect();
        assert_eq!(texts, ["@null", "@toast", "plain", "@@null", "@@@x", "", "@bytes:ff0061", "@binary:0001fe"]);
        for (v, t) in values.iter().zip(texts) {
            assert_eq!(&decode_value(t).unwrap(), v);
        }
        assert!(decode_value("@nul".into()).unwrap_err().contains("unknown marker `@nul`"));
        assert!(decode_value("@bytes:abc".into()).unwrap_err().contains("even number of hex digits"));
        assert!(decode_text("@null".into()).is_err(), "NULL is not a message content");
    }

    #[test]
    fn a_rule_test_cell_and_a_recording_read_the_same_markers() {
        // One decoder for both: `@bytes:` and `@binary:` are values in test files too.
        assert_eq!(decode_value("@binary:00ff".into()).unwrap(), Value::Binary(Bytes::from_static(&[0, 255])));
        assert_eq!(decode_value("@bytes:ff".into()).unwrap(), Value::Text(Bytes::from_static(b"\xff")));
    }
}

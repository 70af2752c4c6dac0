//! Problems found in user files, each pinned to `file:line:col`, errors kept apart from warnings.

pub use crate::input::spelling::did_you_mean;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// How bad a problem is: errors stop loading, warnings are reported and loading goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The file cannot be used as written.
    Error,
    /// The file works but probably not as intended.
    Warning,
}

/// One problem in a user file, with where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line; 0 when the problem concerns the whole file.
    pub line: usize,
    /// 1-based column; 0 when the problem concerns the whole file.
    pub col: usize,
    /// What is wrong, naming the offending value.
    pub message: String,
    /// What to do about it, when there is something to say.
    pub hint: Option<String>,
}

impl Diagnostic {
    /// An error at the byte `span` of `source`, the text of `file`.
    pub fn error(file: &Path, source: &str, span: Option<Range<usize>>, message: impl Into<String>) -> Self {
        Self::error_in(file, &LineIndex::new(source), span, message)
    }

    /// An error at the byte `span` of the text `lines` indexes, the text of `file`.
    pub fn error_in(
        file: &Path,
        lines: &LineIndex<'_>,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> Self {
        let (line, col) = span.map_or((0, 0), |s| lines.line_col(s.start));
        Diagnostic {
            severity: Severity::Error,
            file: file.to_path_buf(),
            line,
            col,
            message: message.into(),
            hint: None,
        }
    }

    /// A warning at the byte `span` of the text `lines` indexes, the text of `file`.
    pub fn warning_in(
        file: &Path,
        lines: &LineIndex<'_>,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic { severity: Severity::Warning, ..Self::error_in(file, lines, span, message) }
    }

    /// A warning at the byte `span` of `source`, the text of `file`.
    pub fn warning(file: &Path, source: &str, span: Option<Range<usize>>, message: impl Into<String>) -> Self {
        Diagnostic { severity: Severity::Warning, ..Self::error(file, source, span, message) }
    }

    /// Adds the hint that says how to fix the problem.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// True for errors, false for warnings.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{kind}: {}:{}:{}: {}", self.file.display(), self.line.max(1), self.col.max(1), self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Several problems reported together, so a user fixes them in one pass.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// True when any problem is an error.
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }

    /// The errors only.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| d.is_error())
    }

    /// The warnings only.
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| !d.is_error())
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// The 1-based line and column (in characters) of byte `offset` in `source`.
///
/// Scans `source` once; a caller that places many offsets in the same text builds a
/// [`LineIndex`] instead.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    LineIndex::new(source).line_col(offset)
}

/// Where each line of a text starts, built in one pass, so that placing an offset costs a
/// binary search rather than a scan of everything before it: a rule file with 100,000
/// keys is placed in linear time, not quadratic.
#[derive(Debug, Clone)]
pub struct LineIndex<'a> {
    text: &'a str,
    /// Byte offset of each line's first character.
    starts: Vec<usize>,
    /// Whether each line is pure ASCII, so its columns are byte counts.
    ascii: Vec<bool>,
}

impl<'a> LineIndex<'a> {
    /// Indexes the lines of `text`.
    pub fn new(text: &'a str) -> Self {
        let mut starts = vec![0];
        let mut ascii = Vec::new();
        let mut line_ascii = true;
        for (i, b) in text.bytes().enumerate() {
            line_ascii &= b.is_ascii();
            if b == b'\n' {
                starts.push(i + 1);
                ascii.push(line_ascii);
                line_ascii = true;
            }
        }
        ascii.push(line_ascii);
        LineIndex { text, starts, ascii }
    }

    /// The text indexed.
    pub fn text(&self) -> &'a str {
        self.text
    }

    /// The 1-based line and column (in characters) of byte `offset`.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.starts.partition_point(|&s| s <= offset);
        let start = self.starts[line - 1];
        let col = if self.ascii[line - 1] { offset - start } else { self.text[start..offset].chars().count() };
        (line, col + 1)
    }
}

/// Turns a TOML parse or schema error into a diagnostic at the place it names.
pub fn from_toml(file: &Path, source: &str, err: &toml::de::Error) -> Diagnostic {
    from_toml_in(file, &LineIndex::new(source), source, 0, err)
}

/// Turns a TOML error found in `piece`, the part of a file's text that starts at byte `base`,
/// into a diagnostic placed in the whole text, which `lines` indexes.
pub fn from_toml_in(file: &Path, lines: &LineIndex<'_>, piece: &str, base: usize, err: &toml::de::Error) -> Diagnostic {
    let message = err.message().trim_end().to_string();
    let hint = unknown_field_hint(&message).or_else(|| value_hint(&message, piece, err.span()));
    let d = Diagnostic::error_in(file, lines, err.span().map(|s| s.start + base..s.end + base), message);
    match hint {
        Some(h) => d.with_hint(h),
        None => d,
    }
}

/// An unknown key at byte `span` of the text `lines` indexes, worded as serde words it
/// ("unknown field `tabel`, expected one of `name`, `table`, ..."), with a suggestion.
pub fn unknown_field(
    file: &Path,
    lines: &LineIndex<'_>,
    span: Range<usize>,
    field: &str,
    expected: &'static [&'static str],
) -> Diagnostic {
    let message = <serde::de::value::Error as serde::de::Error>::unknown_field(field, expected).to_string();
    let d = Diagnostic::error_in(file, lines, Some(span), message);
    match did_you_mean(field, expected.iter().copied()) {
        Some(s) => d.with_hint(format!("did you mean `{s}`?")),
        None => d.with_hint("remove the key, or rename it to one of the expected fields"),
    }
}

/// For serde's "unknown field `x`, expected one of `a`, `b`", suggests the closest known name.
fn unknown_field_hint(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    did_you_mean(field, expected.iter().copied()).map(|s| format!("did you mean `{s}`?"))
}

/// For serde's "missing field" and "invalid type" errors, which name no key: says which key
/// the value belongs to and what to write instead.
fn value_hint(message: &str, source: &str, span: Option<Range<usize>>) -> Option<String> {
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next()?;
        return Some(format!("add the required `{field}` key to the table that starts here"));
    }
    let expected = message.strip_prefix("invalid type: ")?.rsplit_once(", expected ")?.1;
    let span = span?;
    let key = key_before(source, span.start)?;
    let value = source.get(span)?.trim();
    Some(match expected {
        _ if key == "rule" => "rules are tables: start each with a [[rule]] header line".to_string(),
        "a sequence" => format!("`{key}` takes a list: write {key} = [{value}]"),
        "a string" => format!("`{key}` takes a string in quotes, as in {key} = \"{}\"", value.trim_matches('"')),
        other => format!("`{key}` takes {other}"),
    })
}

/// The key of `key = value` when `offset` is where the value starts.
fn key_before(source: &str, offset: usize) -> Option<&str> {
    let before = source.get(..offset)?;
    let line = &before[before.rfind('\n').map_or(0, |i| i + 1)..];
    let lhs = line.trim_end().strip_suffix('=')?.trim_end();
    let is_key = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    let start = lhs.char_indices().rev().find(|&(_, c)| !is_key(c)).map_or(0, |(i, c)| i + c.len_utf8());
    Some(&lhs[start..]).filter(|k| !k.is_empty())
}

/// `n` and the noun that goes with it: `1 rule`, `2 rules`.
pub fn plural(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let src = "a = 1\nbb = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, 9), (2, 4));
        assert_eq!(line_col(src, 99), (3, 1));
    }

    #[test]
    fn line_index_counts_characters_on_non_ascii_lines() {
        let src = "a = 1\né = \"ü\"\nx";
        let lines = LineIndex::new(src);
        assert_eq!(lines.line_col(6), (2, 1));
        // `=` is the third character of line 2 but its fourth byte.
        assert_eq!(lines.line_col(9), (2, 3));
        // An offset inside a character is placed at that character.
        assert_eq!(lines.line_col(8), (2, 2));
        assert_eq!(lines.line_col(src.len()), (3, 2));
        for at in 0..=src.len() {
            if src.is_char_boundary(at) {
                let before = &src[..at];
                let line = before.matches('\n').count() + 1;
                let col = before[before.rfind('\n').map_or(0, |i| i + 1)..].chars().count() + 1;
                assert_eq!(lines.line_col(at), (line, col), "offset {at}");
            }
        }
    }

    #[test]
    fn counts_are_not_printed_as_1_rules() {
        assert_eq!(plural(1u64, "rule", "rules"), "1 rule");
        assert_eq!(plural(0u64, "rule", "rules"), "0 rules");
        assert_eq!(plural(2u64, "message", "messages"), "2 messages");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_key() {
        let src = "[[rule]]\nname = 42\nkeys = \"k\"\n";
        let hint = |at: usize, message: &str| value_hint(message, src, Some(at..at + 3));
        assert_eq!(
            hint(16, "invalid type: integer `42`, expected a string").as_deref(),
            Some("`name` takes a string in quotes, as in name = \"42\"")
        );
        assert_eq!(
            hint(26, "invalid type: string \"k\", expected a sequence").as_deref(),
            Some("`keys` takes a list: write keys = [\"k\"]")
        );
        assert_eq!(key_before("refresh = [{ key = \"k\", ttl = 5 }]", 30), Some("ttl"));
    }

    #[test]
    fn unknown_field_gets_a_suggestion() {
        let hint = unknown_field_hint("unknown field `tabel`, expected one of `name`, `table`, `keys`");
        assert_eq!(hint.as_deref(), Some("did you mean `table`?"));
    }
}

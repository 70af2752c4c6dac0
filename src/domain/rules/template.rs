//! Templates: `user:{user_id}:settings`, with `{old.col}`, `{new.col}`, `{table}`,
//! `{schema}`, `{op}`, filters such as `{email|lower}`, and `{{`/`}}` for literal braces.

use crate::domain::diagnostic::did_you_mean;
use std::fmt;

/// Which row image a column placeholder reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// The image being rendered: the old row for the old side, the new row for the new side.
    Row,
    /// Always the old row (`{old.col}`).
    Old,
    /// Always the new row (`{new.col}`).
    New,
}

/// What a placeholder stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A column's text value.
    Column {
        /// Which image it is read from.
        image: Image,
        /// The column name.
        name: String,
    },
    /// The table name.
    Table,
    /// The schema name.
    Schema,
    /// The op: insert, update, delete or truncate.
    Op,
}

/// A transformation applied to a placeholder's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Lowercase.
    Lower,
    /// Uppercase.
    Upper,
}

impl Filter {
    const NAMES: [&'static str; 2] = ["lower", "upper"];

    /// Applies the filter.
    pub fn apply(self, s: &str) -> String {
        match self {
            Filter::Lower => s.to_lowercase(),
            Filter::Upper => s.to_uppercase(),
        }
    }
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text copied as written.
    Literal(String),
    /// A value, with its filters in order.
    Placeholder {
        /// What it stands for.
        value: Value,
        /// Filters applied left to right.
        filters: Vec<Filter>,
    },
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// A template that does not parse, with the byte offset of the problem inside it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} in template `{template}`")]
pub struct TemplateError {
    /// The template as written.
    pub template: String,
    /// Byte offset of the problem within the template.
    pub offset: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: String,
}

impl Template {
    /// Parses placeholders; `{{` and `}}` stand for literal braces.
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let fail = |offset: usize, message: String, hint: &str| TemplateError {
            template: source.to_string(),
            offset,
            message,
            hint: hint.to_string(),
        };
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => return Err(fail(i, "unmatched `}`".into(), "write `}}` for a literal brace")),
                '{' => {
                    let rest = &source[i + 1..];
                    let Some(len) = rest.find(['}', '{']).filter(|&l| rest.as_bytes()[l] == b'}') else {
                        return Err(fail(
                            i,
                            "unclosed `{`".into(),
                            "close the placeholder with `}`, or write `{{` for a literal brace",
                        ));
                    };
                    let inner = &rest[..len];
                    let part = placeholder(inner).map_err(|(message, hint)| fail(i, message, &hint))?;
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(part);
                    while chars.peek().is_some_and(|&(j, _)| j <= i + 1 + len) {
                        chars.next();
                    }
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if parts.is_empty() {
            return Err(fail(0, "empty template".into(), "write the key, as in `user:{user_id}:settings`"));
        }
        Ok(Template { source: source.to_string(), parts })
    }

    /// The pieces of the template in order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The columns the template names, in order of appearance.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.columns_with_image().map(|(_, c)| c)
    }

    /// The columns the template names, with the image each is read from.
    pub fn columns_with_image(&self) -> impl Iterator<Item = (Image, &str)> {
        self.parts.iter().filter_map(|p| match p {
            Part::Placeholder { value: Value::Column { image, name }, .. } => Some((*image, name.as_str())),
            _ => None,
        })
    }

    /// True when the template has no placeholders.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }
}

/// Parses the inside of `{...}`: `col`, `old.col`, `new.col`, `table`, `schema`, `op`, then `|filter`s.
fn placeholder(inner: &str) -> Result<Part, (String, String)> {
    let mut pieces = inner.split('|').map(str::trim);
    let name = pieces.next().unwrap_or_default();
    if name.is_empty() {
        return Err((
            format!("empty placeholder `{{{inner}}}`"),
            "name a column inside the braces, as in `{user_id}`".into(),
        ));
    }
    let value = match name {
        "table" => Value::Table,
        "schema" => Value::Schema,
        "op" => Value::Op,
        _ => {
            let (image, column) = match name.split_once('.') {
                Some(("old", c)) => (Image::Old, c),
                Some(("new", c)) => (Image::New, c),
                Some((prefix, _)) => {
                    return Err((
                        format!("unknown image `{prefix}` in placeholder `{{{inner}}}`"),
                        "write `{old.column}`, `{new.column}` or just `{column}`".into(),
                    ));
                }
                None => (Image::Row, name),
            };
            if column.is_empty() || column.contains(char::is_whitespace) {
                return Err((format!("invalid column name in placeholder `{{{inner}}}`"), "write `{column}`".into()));
            }
            Value::Column { image, name: column.to_string() }
        }
    };
    let mut filters = Vec::new();
    for f in pieces {
        match f {
            "lower" => filters.push(Filter::Lower),
            "upper" => filters.push(Filter::Upper),
            other => {
                let hint = match did_you_mean(other, Filter::NAMES) {
                    Some(m) => format!("did you mean `{m}`?"),
                    None => format!("filters are: {}", Filter::NAMES.join(", ")),
                };
                return Err((format!("unknown filter `{other}` in placeholder `{{{inner}}}`"), hint));
            }
        }
    }
    Ok(Part::Placeholder { value, filters })
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lit(s: &str) -> Part {
        Part::Literal(s.into())
    }
    fn col(s: &str) -> Part {
        Part::Placeholder { value: Value::Column { image: Image::Row, name: s.into() }, filters: vec![] }
    }

    #[test]
    fn placeholders_and_literals() {
        let t = Template::parse("user:{user_id}:settings:{ kind }").unwrap();
        assert_eq!(t.parts(), [lit("user:"), col("user_id"), lit(":settings:"), col("kind")]);
    }

    #[test]
    fn doubled_braces_are_literal_hash_tags() {
        let t = Template::parse("{{org:{org_id}}}:plans").unwrap();
        assert_eq!(t.parts(), [lit("{org:"), col("org_id"), lit("}:plans")]);
    }

    #[test]
    fn images_names_and_filters() {
        let t = Template::parse("{schema}.{table}:{op}:{old.email|lower}:{new.code|upper|lower}").unwrap();
        let p = t.parts();
        assert_eq!(p[0], Part::Placeholder { value: Value::Schema, filters: vec![] });
        assert_eq!(p[2], Part::Placeholder { value: Value::Table, filters: vec![] });
        assert_eq!(p[4], Part::Placeholder { value: Value::Op, filters: vec![] });
        assert_eq!(
            p[6],
            Part::Placeholder {
                value: Value::Column { image: Image::Old, name: "email".into() },
                filters: vec![Filter::Lower]
            }
        );
        assert_eq!(
            p[8],
            Part::Placeholder {
                value: Value::Column { image: Image::New, name: "code".into() },
                filters: vec![Filter::Upper, Filter::Lower]
            }
        );
        assert_eq!(t.columns().collect::<Vec<_>>(), ["email", "code"]);
    }

    #[test]
    fn broken_templates_name_the_offset_and_a_hint() {
        let cases = [
            ("user:{id", 5, "unclosed"),
            ("a}b", 1, "unmatched"),
            ("x{}y", 1, "empty placeholder"),
            ("{a{b}", 0, "unclosed"),
            ("", 0, "empty template"),
            ("k:{id|lowr}", 2, "unknown filter `lowr`"),
            ("k:{older.id}", 2, "unknown image `older`"),
        ];
        for (src, offset, msg) in cases {
            let e = Template::parse(src).unwrap_err();
            assert_eq!(e.offset, offset, "{src}");
            assert!(e.message.contains(msg), "{src}: {}", e.message);
        }
        assert_eq!(Template::parse("k:{id|lowr}").unwrap_err().hint, "did you mean `lower`?");
    }
}

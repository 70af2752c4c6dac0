//! Key templates: `user:{user_id}:settings`, with `{{` and `}}` for literal braces.

use std::fmt;

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text copied as written.
    Literal(String),
    /// The text value of the named column.
    Column(String),
}

/// A parsed key or pattern template.
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
    pub hint: &'static str,
}

impl Template {
    /// Parses `{column}` placeholders; `{{` and `}}` stand for literal braces.
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let fail = |offset: usize, message: String, hint: &'static str| TemplateError {
            template: source.to_string(),
            offset,
            message,
            hint,
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
                '}' => {
                    return Err(fail(i, "unmatched `}`".into(), "write `}}` for a literal brace"));
                }
                '{' => {
                    let rest = &source[i + 1..];
                    let Some(len) = rest.find(['}', '{']).filter(|&l| rest.as_bytes()[l] == b'}') else {
                        return Err(fail(
                            i,
                            "unclosed `{`".into(),
                            "close the placeholder with `}`, or write `{{` for a literal brace",
                        ));
                    };
                    let name = rest[..len].trim();
                    if name.is_empty() {
                        return Err(fail(
                            i,
                            "empty placeholder `{}`".into(),
                            "name a column inside the braces, as in `{user_id}`",
                        ));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Column(name.to_string()));
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
        self.parts.iter().filter_map(|p| match p {
            Part::Column(c) => Some(c.as_str()),
            Part::Literal(_) => None,
        })
    }
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
        Part::Column(s.into())
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
    fn broken_templates_name_the_offset() {
        let cases = [
            ("user:{id", 5, "unclosed"),
            ("a}b", 1, "unmatched"),
            ("x{}y", 1, "empty placeholder"),
            ("{a{b}", 0, "unclosed"),
            ("", 0, "empty template"),
        ];
        for (src, offset, msg) in cases {
            let e = Template::parse(src).unwrap_err();
            assert_eq!(e.offset, offset, "{src}");
            assert!(e.message.contains(msg), "{src}: {}", e.message);
        }
    }
}

//! SQL quoting: identifiers and string literals, for the statements walbust runs and the
//! ones it shows users. Every quote in the crate goes through here.

/// Quotes an identifier for SQL or the replication grammar: always double-quoted, inner
/// double quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal (standard-conforming, on since Postgres 9.1: backslashes are
/// literal).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// An identifier as a person would write it: bare when it is a plain lowercase name that
/// is no reserved keyword, quoted otherwise. For statements shown to users.
pub fn sql_ident(s: &str) -> String {
    let plain = s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !RESERVED.split_whitespace().any(|k| k == s);
    if plain { s.to_string() } else { quote_ident(s) }
}

/// Keywords that cannot name a table or column unquoted (reserved, and reserved but
/// allowed as function or type names).
const RESERVED: &str = "\
     all analyse analyze and any array as asc asymmetric authorization binary both case cast check \
     collate collation column concurrently constraint create cross current_catalog current_date \
     current_role current_schema current_time current_timestamp current_user default deferrable desc \
     distinct do else end except false fetch for foreign freeze from full grant group having ilike \
     in initially inner intersect into is isnull join lateral leading left like limit localtime \
     localtimestamp natural not notnull null offset on only or order outer overlaps placing primary \
     references returning right select session_user similar some symmetric system_user table \
     tablesample then to trailing true union unique user using variadic verbose when where window \
     with";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_the_quote_character() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn identifiers_are_quoted_only_when_needed() {
        assert_eq!(sql_ident("user_settings"), "user_settings");
        assert_eq!(sql_ident("user"), "\"user\"");
        assert_eq!(sql_ident("Users"), "\"Users\"");
        assert_eq!(sql_ident("1x"), "\"1x\"");
    }
}

//! What the fuzz targets share: the framing of inputs that carry several messages, and
//! the repository's example rules and config.

use bytes::Bytes;

/// Splits `input` into frames, each a 4-byte big-endian length and that many bytes (the
/// layout of `src/postgres/pgoutput/testdata/*.bin`). A length that runs past the end takes what is left.
pub fn frames(input: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        let rest = input.len().checked_sub(pos)?;
        if rest < 4 {
            return None;
        }
        let len = u32::from_be_bytes(input[pos..pos + 4].try_into().ok()?) as usize;
        let start = pos + 4;
        let end = start + len.min(rest - 4);
        pos = end;
        Some(input.slice(start..end))
    })
}

/// The example rule files (`rules/demo.toml` repeats rules of the others, so it is left out).
pub const EXAMPLE_RULES: &[(&str, &str)] = &[
    ("rules/franchise.toml", include_str!("../../rules/franchise.toml")),
    ("rules/ledger.toml", include_str!("../../rules/ledger.toml")),
    ("rules/plans.toml", include_str!("../../rules/plans.toml")),
    ("rules/settings.toml", include_str!("../../rules/settings.toml")),
    ("tests/fixtures/replay/rules.toml", include_str!("../../tests/fixtures/replay/rules.toml")),
];

/// A fixed environment for `${VAR}` and `PG*` lookups: a few names are set, the rest are not.
pub fn env(name: &str) -> Option<String> {
    match name {
        "PGPASSWORD" => Some("secret".into()),
        "PGHOST" => Some("/tmp,127.0.0.1".into()),
        "PGPORT" => Some("5433".into()),
        "PGUSER" => Some("walbust".into()),
        "PGSSLMODE" => Some("prefer".into()),
        "WALBUST_URL" => Some("postgres://u@h/db".into()),
        "EMPTY" => Some(String::new()),
        _ => None,
    }
}

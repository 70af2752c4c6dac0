//! "Did you mean": the known name closest to a misspelt one, for every message that
//! suggests a name (config keys, rule fields, columns, tables, connection keywords).

/// The candidate closest to `word`, when it is close enough to be a typo: within two
/// edits, or a third of the candidate's length for longer names. Edits are counted as
/// optimal string alignment distance (an insertion, deletion, substitution or swap of
/// two adjacent characters each counts one).
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::osa_distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.chars().count() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(did_you_mean("kyes", ["name", "table", "keys"]), Some("keys"));
        assert_eq!(did_you_mean("zzzzzz", ["name", "table", "keys"]), None);
    }

    #[test]
    fn a_swap_of_two_letters_counts_as_one_edit() {
        assert_eq!(strsim::osa_distance("sslmdoe", "sslmode"), 1);
        assert_eq!(did_you_mean("sslmdoe", ["sslmode", "sslcert"]), Some("sslmode"));
        assert_eq!(did_you_mean("tabel", ["name", "table"]), Some("table"));
    }
}

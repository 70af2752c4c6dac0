//! The rule loader and templates: the input up to the first NUL byte is a rule file; it is
//! validated and compiled, and on success every rule is bound to a relation holding the
//! columns its rules name and routed for each op against a row made from the rest of the
//! input. Row values are separated by NUL bytes and written as in recordings (`@null`,
//! `@toast`, `@binary:<hex>`); the first byte after the rule file picks the old image.

#![no_main]

use std::path::PathBuf;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use walbust::domain::rules::template::{self, Filter, Image, Part, Template};
use walbust::domain::rules::{Change, Op, Router, RuleSet};
use walbust::offline::recording::format::decode_value;
use walbust::postgres::pgoutput::{Column, OldTuple, Relation, ReplicaIdentity, Tuple, Value};

fuzz_target!(|data: &[u8]| {
    let (text, row) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else { return };
    // The input as one template: writing its parts back out must give the same parts.
    if let Ok(t) = Template::parse(text) {
        let written = source_of(t.parts());
        let again = Template::parse(&written).unwrap_or_else(|e| panic!("`{written}` no longer parses: {e}"));
        assert_eq!(again.parts(), t.parts(), "`{text}` written back as `{written}`");
    }
    let loaded = match RuleSet::from_sources(&[(PathBuf::from("rules/fuzz.toml"), text.to_string())]) {
        Ok(loaded) => loaded,
        Err(diagnostics) => {
            assert!(diagnostics.has_errors(), "a rule set was refused without an error");
            let _ = diagnostics.to_string();
            return;
        }
    };
    let _ = loaded.warnings.to_string();
    let rules = Arc::new(loaded.rules);
    let (&choice, values) = row.split_first().unwrap_or((&0, &[]));
    let values: Vec<Value> = values
        .split(|&b| b == 0)
        .map(|v| decode_value(String::from_utf8_lossy(v).into_owned()).unwrap_or(Value::Null))
        .collect();
    let mut router = Router::new(rules.clone());
    let mut out = Vec::new();
    for (oid, table) in (1u32..).zip(rules.tables()) {
        let mut names: Vec<String> = Vec::new();
        for rule in rules.for_table(table) {
            for c in &rule.columns {
                if !names.contains(&c.name) {
                    names.push(c.name.clone());
                }
            }
        }
        // Leave one named column out now and then, as a table that lacks it would.
        if choice & 8 != 0 {
            names.pop();
        }
        let relation = Relation {
            xid: None,
            oid,
            namespace: table.schema.clone(),
            name: table.table.clone(),
            replica_identity: ReplicaIdentity::Default,
            columns: names
                .iter()
                .enumerate()
                .map(|(i, n)| Column {
                    key: (choice >> 4) as usize & (1 << (i % 4)) != 0,
                    name: n.clone(),
                    type_oid: [25, 23, 16, 3802, 701][i % 5],
                    type_modifier: -1,
                })
                .collect(),
        };
        let _ = router.bind(&relation);
        let pick = |skip: usize| {
            let mut t: Vec<Value> = (0..names.len())
                .map(|i| values.get((i + skip) % values.len().max(1)).cloned().unwrap_or(Value::Null))
                .collect();
            // A tuple shorter than its relation, which only a broken stream would send.
            if choice & 64 != 0 {
                t.pop();
            }
            Tuple(t)
        };
        let new = pick(0);
        let old = match choice & 3 {
            0 => None,
            1 => Some(OldTuple::Key(pick(1))),
            _ => Some(OldTuple::Full(pick(1))),
        };
        let no_old = OldTuple::Key(Tuple::default());
        for op in Op::ALL {
            let (old, new) = match op {
                Op::Insert => (None, Some(&new)),
                Op::Update => (old.as_ref(), Some(&new)),
                Op::Delete => (Some(old.as_ref().unwrap_or(&no_old)), None),
                Op::Truncate => (None, None),
            };
            out.clear();
            router.route(&Change { relation: &relation, op, old, new }, &mut out);
            for r in &out {
                let _ = r.action.to_string();
            }
        }
    }
});

/// Template source for `parts`, with literal braces doubled.
fn source_of(parts: &[Part]) -> String {
    let mut s = String::new();
    for part in parts {
        match part {
            Part::Literal(l) => s.push_str(&l.replace('{', "{{").replace('}', "}}")),
            Part::Placeholder { value, filters } => {
                s.push('{');
                match value {
                    template::Value::Table => s.push_str("table"),
                    template::Value::Schema => s.push_str("schema"),
                    template::Value::Op => s.push_str("op"),
                    template::Value::Column { image, name } => {
                        s.push_str(match image {
                            Image::Row => "",
                            Image::Old => "old.",
                            Image::New => "new.",
                        });
                        s.push_str(name);
                    }
                }
                for f in filters {
                    s.push_str(match f {
                        Filter::Lower => "|lower",
                        Filter::Upper => "|upper",
                    });
                }
                s.push('}');
            }
        }
    }
    s
}

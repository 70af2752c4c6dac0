//! A cache of the table schemas announced by Relation messages.

use foldhash::HashMap;
use std::sync::Arc;

use super::message::Relation;

/// Maps relation oids to the latest schema the server sent for them.
///
/// Change messages name their table only by oid and carry positional tuples,
/// so a consumer needs the most recent Relation for that oid to interpret them.
/// The server re-sends Relation after DDL and at the start of each streamed
/// transaction, so inserting always replaces.
#[derive(Debug, Clone, Default)]
pub struct RelationCache {
    relations: HashMap<u32, Arc<Relation>>,
}

impl RelationCache {
    /// Creates an empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `relation`, replacing any earlier schema for its oid, and returns the shared copy.
    pub fn insert(&mut self, relation: Relation) -> Arc<Relation> {
        let relation = Arc::new(relation);
        self.relations.insert(relation.oid, Arc::clone(&relation));
        relation
    }

    /// The latest schema for `oid`, if one was announced.
    pub fn get(&self, oid: u32) -> Option<&Arc<Relation>> {
        self.relations.get(&oid)
    }

    /// Forgets the schema for `oid`, returning it if there was one.
    pub fn remove(&mut self, oid: u32) -> Option<Arc<Relation>> {
        self.relations.remove(&oid)
    }

    /// Every cached relation, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Relation>> {
        self.relations.values()
    }

    /// Forgets every schema; the server re-sends them after a new START_REPLICATION.
    pub fn clear(&mut self) {
        self.relations.clear();
    }

    /// Number of cached schemas.
    pub fn len(&self) -> usize {
        self.relations.len()
    }

    /// Whether no schema is cached.
    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::pgoutput::{Column, ReplicaIdentity};

    fn relation(oid: u32, namespace: &str, columns: &[&str]) -> Relation {
        Relation {
            xid: None,
            oid,
            namespace: namespace.to_owned(),
            name: "t".to_owned(),
            replica_identity: ReplicaIdentity::Default,
            columns: columns
                .iter()
                .map(|name| Column { key: *name == "id", name: (*name).to_owned(), type_oid: 23, type_modifier: -1 })
                .collect(),
        }
    }

    #[test]
    fn insert_replaces_earlier_schema_for_the_same_oid() {
        let mut cache = RelationCache::new();
        assert!(cache.is_empty());
        let old = cache.insert(relation(1, "public", &["id"]));
        let new = cache.insert(relation(1, "public", &["id", "extra"]));
        assert_eq!(cache.len(), 1);
        assert!(Arc::ptr_eq(cache.get(1).unwrap(), &new));
        assert_eq!(old.columns.len(), 1);
        assert_eq!(cache.get(1).unwrap().column_index("extra"), Some(1));
    }

    #[test]
    fn get_remove_and_clear() {
        let mut cache = RelationCache::new();
        cache.insert(relation(1, "public", &["id"]));
        cache.insert(relation(2, "public", &["id"]));
        assert!(cache.get(3).is_none());
        assert_eq!(cache.remove(2).map(|r| r.oid), Some(2));
        assert!(cache.get(2).is_none());
        cache.clear();
        assert!(cache.is_empty());
        assert!(cache.get(1).is_none());
    }

    #[test]
    fn qualified_name_is_schema_dot_table() {
        assert_eq!(relation(1, "app", &[]).qualified_name(), "app.t");
    }

    #[test]
    fn column_index_finds_columns_by_exact_name() {
        let rel = relation(1, "public", &["id", "name"]);
        assert_eq!(rel.column_index("name"), Some(1));
        assert_eq!(rel.column_index("Name"), None);
        assert_eq!(rel.column_index("missing"), None);
    }
}

//! Batches: deduplicated actions on their way to the sink, with the WAL position they cover.
//!
//! A batch spans transactions. It is handed to the sink when it is full, when it is older
//! than the configured delay, or as soon as the stream goes idle, whichever comes first.
//! Its `ack` is the end of the last commit whose every action is in this batch or an
//! earlier one: once the sink has applied the batch, that position may be reported flushed.

use crate::action::Action;
use crate::lsn::Lsn;
use indexmap::IndexSet;
use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

/// A commit whose actions end in a batch, for acknowledgement and latency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRecord {
    /// Transaction id.
    pub xid: u32,
    /// The end of the commit record: the position acknowledged once applied.
    pub end_lsn: Lsn,
    /// When the transaction committed on the server.
    pub commit_time: SystemTime,
}

/// One routed change, kept only when an observer wants to see changes (the demo, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    /// Transaction id.
    pub xid: u32,
    /// `schema.table`.
    pub table: String,
    /// `insert`, `update`, `delete` or `truncate`.
    pub op: &'static str,
    /// The actions the change produced, before deduplication.
    pub actions: Vec<Action>,
}

/// Deduplicated actions plus the position and commits they cover.
#[derive(Debug, Default)]
pub struct Batch {
    actions: IndexSet<Action>,
    /// Keys with a pending write-through `SET`, whose order against `UNLINK` matters.
    writes: HashSet<String>,
    /// The end LSN this batch acknowledges once applied, if it completes any commit.
    pub ack: Option<Lsn>,
    /// The commits completed in this batch.
    pub commits: Vec<CommitRecord>,
    /// Changes with their actions, when recording was asked for.
    pub changes: Vec<ChangeRecord>,
    opened: Option<Instant>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an action unless the batch already holds the same one. A write-through `SET`
    /// and an `UNLINK` of the same key depend on their order, so the later one replaces
    /// the earlier and goes to the end.
    pub fn push(&mut self, action: Action) {
        self.opened.get_or_insert_with(Instant::now);
        match &action {
            Action::Set { key, .. } | Action::Unlink(key) if self.writes.contains(key) => {
                let key = key.clone();
                self.actions.retain(|a| !matches!(a, Action::Set { key: k, .. } | Action::Unlink(k) if *k == key));
            }
            _ => {}
        }
        if let Action::Set { key, .. } = &action {
            self.writes.insert(key.clone());
        }
        self.actions.insert(action);
    }

    /// Records that every action up to `lsn` is now in this batch or an earlier one.
    pub fn acknowledge_through(&mut self, lsn: Lsn) {
        self.opened.get_or_insert_with(Instant::now);
        self.ack = Some(self.ack.map_or(lsn, |a| a.max(lsn)));
    }

    /// Records a completed commit.
    pub fn commit(&mut self, record: CommitRecord) {
        self.acknowledge_through(record.end_lsn);
        self.commits.push(record);
    }

    /// The distinct actions, in first-seen order.
    pub fn actions(&self) -> impl ExactSizeIterator<Item = &Action> {
        self.actions.iter()
    }

    /// The distinct actions as a vector, for the sink.
    pub fn take_actions(&mut self) -> Vec<Action> {
        self.writes.clear();
        std::mem::take(&mut self.actions).into_iter().collect()
    }

    /// Number of distinct actions.
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    /// True when there is nothing to apply and nothing to acknowledge.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty() && self.ack.is_none() && self.changes.is_empty()
    }

    /// True when the batch has been open longer than `delay`.
    pub fn older_than(&self, delay: Duration) -> bool {
        self.opened.is_some_and(|t| t.elapsed() >= delay)
    }

    /// When the first action or acknowledgement went in, if any has.
    pub fn opened(&self) -> Option<Instant> {
        self.opened
    }

    /// Takes the batch out, leaving an empty one.
    pub fn take(&mut self) -> Batch {
        std::mem::take(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_actions_are_kept_once_in_first_seen_order() {
        let mut b = Batch::new();
        b.push(Action::Unlink("b".into()));
        b.push(Action::Unlink("a".into()));
        b.push(Action::Unlink("b".into()));
        let keys: Vec<String> = b.actions().map(|a| a.to_string()).collect();
        assert_eq!(keys, ["UNLINK b", "UNLINK a"]);
    }

    #[test]
    fn a_write_through_and_an_unlink_of_one_key_keep_the_last_order() {
        let set = |v: &str| Action::Set { key: "k".into(), value: v.into(), ttl: None };
        let mut b = Batch::new();
        b.push(set("1"));
        b.push(Action::Unlink("other".into()));
        b.push(Action::Unlink("k".into()));
        b.push(set("1"));
        let got: Vec<String> = b.actions().map(|a| a.to_string()).collect();
        assert_eq!(got, ["UNLINK other", "SET k 1"], "the key ends with the last write");
        b.push(Action::Unlink("k".into()));
        let got: Vec<String> = b.actions().map(|a| a.to_string()).collect();
        assert_eq!(got, ["UNLINK other", "UNLINK k"], "and deleted when the row was deleted last");
    }

    #[test]
    fn acknowledgement_only_moves_forward() {
        let mut b = Batch::new();
        assert!(b.is_empty());
        b.acknowledge_through(Lsn(20));
        b.acknowledge_through(Lsn(10));
        assert_eq!(b.ack, Some(Lsn(20)));
        assert!(!b.is_empty());
    }
}

//! Batches: deduplicated actions on their way to the sink, with the WAL position they cover.
//!
//! A batch spans transactions. It is handed to the sink when it is full, when it is older
//! than the configured delay, or as soon as the stream goes idle, whichever comes first.
//! Its `ack` is the end of the last commit whose every action is in this batch or an
//! earlier one: once the sink has applied the batch, that position may be reported flushed.

use crate::domain::action::Action;
use crate::postgres::lsn::Lsn;
use foldhash::HashSet;
use foldhash::fast::RandomState;
use indexmap::IndexSet;
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

/// Where an action came from: for the log line and dead letter of an action Redis refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The rule that produced it, or `(manual message)`.
    pub rule: std::sync::Arc<str>,
    /// The position of the change or message that produced it.
    pub lsn: Lsn,
}

/// Deduplicated actions plus the position and commits they cover.
#[derive(Debug, Default)]
pub struct Batch {
    /// Hashed with foldhash, seeded per process: keys carry row values, so the hash must
    /// not be predictable, and SipHash cost a tenth of the per-change CPU here.
    actions: IndexSet<Action, RandomState>,
    /// The origin of each action, by position in `actions`.
    origins: Vec<Option<Origin>>,
    /// The bytes of keys, patterns and values held, so that rows with huge values cannot
    /// make a batch of a few thousand actions take unbounded memory.
    bytes: usize,
    /// Keys with a pending write-through `SET`, whose order against `UNLINK` matters.
    writes: HashSet<String>,
    /// The end LSN this batch acknowledges once applied, if it completes any commit.
    pub ack: Option<Lsn>,
    /// The commits completed in this batch.
    pub commits: Vec<CommitRecord>,
    /// Changes with their actions, when recording was asked for.
    pub changes: Vec<ChangeRecord>,
    /// The transactions that produced actions in this batch, each once, in commit order:
    /// the visibility gate waits for these before the batch is applied.
    pub xids: Vec<u32>,
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
        self.push_from(action, None);
    }

    /// [`Batch::push`], remembering where the action came from.
    pub fn push_from(&mut self, action: Action, origin: Option<Origin>) {
        self.opened.get_or_insert_with(Instant::now);
        match &action {
            Action::Set { key, .. } | Action::Unlink(key) if self.writes.contains(key) => {
                let key = key.clone();
                let (mut i, mut removed, origins) = (0, 0, &mut self.origins);
                let mut kept = Vec::with_capacity(origins.len());
                self.actions.retain(|a| {
                    let keep = !matches!(a, Action::Set { key: k, .. } | Action::Unlink(k) if *k == key);
                    if keep {
                        kept.push(origins[i].take());
                    } else {
                        removed += a.size();
                    }
                    i += 1;
                    keep
                });
                *origins = kept;
                self.bytes -= removed;
            }
            _ => {}
        }
        if let Action::Set { key, .. } = &action {
            self.writes.insert(key.clone());
        }
        let size = action.size();
        if self.actions.insert(action) {
            self.origins.push(origin);
            self.bytes += size;
        }
    }

    /// Notes that transaction `xid` produced actions for this batch (deduplicated actions
    /// included: a later transaction's change needs its own visibility). The invalid xid 0
    /// (a non-transactional message) is not noted.
    pub fn note_xid(&mut self, xid: u32) {
        // Transactions arrive one after another, so a repeat is always the last one noted.
        if xid != 0 && self.xids.last() != Some(&xid) {
            self.xids.push(xid);
        }
    }

    /// The bytes of keys, patterns and values this batch holds.
    pub fn bytes(&self) -> usize {
        self.bytes
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
        self.take_actions_with_origins().0
    }

    /// The distinct actions and, by position, where each came from.
    pub fn take_actions_with_origins(&mut self) -> (Vec<Action>, Vec<Option<Origin>>) {
        self.writes.clear();
        self.bytes = 0;
        (std::mem::take(&mut self.actions).into_iter().collect(), std::mem::take(&mut self.origins))
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
    fn origins_follow_their_actions_through_reordering() {
        let origin = |rule: &str, lsn| Some(Origin { rule: rule.into(), lsn: Lsn(lsn) });
        let set = |v: &str| Action::Set { key: "k".into(), value: v.into(), ttl: None };
        let mut b = Batch::new();
        b.push_from(set("1"), origin("a", 1));
        b.push_from(Action::Unlink("other".into()), origin("b", 2));
        b.push_from(Action::Unlink("other".into()), origin("c", 3));
        b.push_from(Action::Unlink("k".into()), origin("d", 4));
        assert_eq!(b.bytes(), "other".len() + "k".len());
        let (actions, origins) = b.take_actions_with_origins();
        let got: Vec<(String, String)> =
            actions.iter().zip(origins).map(|(a, o)| (a.to_string(), o.unwrap().rule.to_string())).collect();
        assert_eq!(got, [("UNLINK other".into(), "b".into()), ("UNLINK k".into(), "d".into())]);
        assert_eq!(b.bytes(), 0);
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

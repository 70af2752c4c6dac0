//! Second deletes: every delete-type action applied again `redelete_after` after its
//! transaction became visible, so that a cache-aside reader that read the old row before
//! the first delete and filled the cache after it leaves no stale entry behind.
//!
//! The queue is in due order (batches are applied in commit order and the delay is
//! constant). An action already pending moves to the later entry, so Redis gets it once per
//! window and memory holds each pending action once. Each entry carries the position its
//! batch acknowledges: that position becomes durable (reported flushed, so the slot no
//! longer replays it) only once the entry and every one before it are applied. A crash
//! before then replays the batch, first and second delete alike.
//!
//! Memory is bounded by [`Redeletes::max_bytes`]: past it, the oldest entries are handed
//! out before they are due (counted as early), which keeps invalidation going and shortens
//! the protection of only those actions.

use crate::domain::action::Action;
use crate::postgres::lsn::Lsn;
use foldhash::fast::RandomState;
use foldhash::{HashMap, HashMapExt};
use indexmap::IndexSet;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What one pending action costs beyond its bytes: the entry's slot and the index's.
const PER_ACTION_OVERHEAD: usize = 96;

/// The default memory bound of the queue: at 100-byte keys, about 300,000 pending second
/// deletes, some 60 times what 5,000 commits/s with a few keys each leave pending in a second.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

/// Whether an action is one that a second delete repeats: deletes of keys, patterns and
/// tags. Version bumps, publishes and write-through are not repeated: a second bump or
/// message is another event, and a write-through carries its own value.
pub fn is_delete(action: &Action) -> bool {
    matches!(action, Action::Unlink(_) | Action::ScanUnlink(_) | Action::BustTag(_) | Action::ScanBustTag(_))
}

#[derive(Debug)]
struct Entry {
    due: Instant,
    actions: IndexSet<Action, RandomState>,
    ack: Option<Lsn>,
}

/// Second deletes waiting for their time, in due order.
#[derive(Debug)]
pub struct Redeletes {
    after: Duration,
    max_bytes: usize,
    entries: VecDeque<Entry>,
    /// The sequence number of `entries[0]`; entries are numbered consecutively.
    front_seq: u64,
    /// Each pending action and the sequence number of the entry that holds it.
    pending: HashMap<Action, u64>,
    bytes: usize,
}

/// Second deletes taken out of the queue, to apply now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// The actions, each once.
    pub actions: Vec<Action>,
    /// The furthest position the taken entries acknowledge, if any does.
    pub ack: Option<Lsn>,
    /// How many of the actions were taken before their time because memory was at its bound.
    pub early: usize,
    /// How many entries (one per batch) were taken.
    pub entries: usize,
}

impl Redeletes {
    /// An empty queue repeating deletes `after` their transaction became visible, holding at
    /// most about `max_bytes`.
    pub fn new(after: Duration, max_bytes: usize) -> Self {
        Redeletes { after, max_bytes, entries: VecDeque::new(), front_seq: 0, pending: HashMap::new(), bytes: 0 }
    }

    /// The delay after which deletes are repeated.
    pub fn after(&self) -> Duration {
        self.after
    }

    /// The memory bound, in bytes.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Schedules the delete-type actions of a batch whose transactions were visible by
    /// `visible_at` and whose first deletes went to Redis at `sent_at`, and the position
    /// the batch acknowledges. Returns false when nothing was queued: the batch had no
    /// delete to repeat and nothing was pending before it, so its position is durable at once.
    ///
    /// A batch sent `after` or more past `visible_at` (a backlog being caught up) needs no
    /// second delete: a reader that read a row before its transaction became visible and
    /// filled the cache after the first delete took longer than `after` from read to fill,
    /// which a second delete at `after` would not cover either.
    pub fn schedule(&mut self, actions: &[Action], visible_at: Instant, sent_at: Instant, ack: Option<Lsn>) -> bool {
        let repeat = sent_at < visible_at + self.after;
        let seq = self.front_seq + self.entries.len() as u64;
        // Batches are applied in order, but a clock step must not reorder the queue.
        let due = self.entries.back().map_or(visible_at + self.after, |last| last.due.max(visible_at + self.after));
        self.entries.push_back(Entry { due, actions: IndexSet::default(), ack });
        // In the batch's order, which is the order Redis applies it in.
        for action in actions {
            if let Action::Set { key, .. } = action {
                // A later write-through of a key supersedes its pending second delete: the
                // key now holds the new row, which a second delete would only throw away.
                self.cancel(&Action::Unlink(key.clone()));
                continue;
            }
            if !repeat || !is_delete(action) {
                continue;
            }
            match self.pending.insert(action.clone(), seq) {
                // Coalesced: pending already; it moves to this later entry.
                Some(earlier) if earlier != seq => {
                    let index = (earlier - self.front_seq) as usize;
                    self.entries[index].actions.swap_remove(action);
                }
                Some(_) => continue,
                None => self.bytes += action.size() + PER_ACTION_OVERHEAD,
            }
            self.entries.back_mut().expect("this batch's entry was just pushed").actions.insert(action.clone());
        }
        if self.entries.len() == 1 && self.entries[0].actions.is_empty() {
            // Nothing to repeat and nothing before it: its position is durable now.
            self.entries.clear();
            return false;
        }
        true
    }

    /// Drops `action` from the queue if it is pending.
    fn cancel(&mut self, action: &Action) {
        if let Some(seq) = self.pending.remove(action) {
            self.entries[(seq - self.front_seq) as usize].actions.swap_remove(action);
            self.bytes -= action.size() + PER_ACTION_OVERHEAD;
        }
    }

    /// When the first pending entry is due, if any is pending.
    pub fn next_due(&self) -> Option<Instant> {
        self.entries.front().map(|e| e.due)
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when the pending actions take more memory than the bound.
    pub fn over_bound(&self) -> bool {
        self.bytes > self.max_bytes
    }

    /// Pending actions.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Takes every entry due at `now` and, while memory is over its bound, the oldest
    /// entries before they are due.
    pub fn take_due(&mut self, now: Instant) -> Due {
        let mut due = Due::default();
        while let Some(front) = self.entries.front() {
            let early = front.due > now;
            if early && self.bytes <= self.max_bytes {
                break;
            }
            let entry = self.entries.pop_front().expect("the front entry exists");
            self.front_seq += 1;
            due.entries += 1;
            for action in entry.actions {
                self.pending.remove(&action);
                self.bytes -= action.size() + PER_ACTION_OVERHEAD;
                due.early += usize::from(early);
                due.actions.push(action);
            }
            due.ack = due.ack.max(entry.ack);
        }
        due
    }

    /// Takes everything pending, due or not.
    pub fn take_all(&mut self) -> Due {
        let mut due = self.take_due(Instant::now());
        let rest = std::mem::replace(self, Redeletes::new(self.after, self.max_bytes));
        for entry in rest.entries {
            due.entries += 1;
            due.early += entry.actions.len();
            due.actions.extend(entry.actions);
            due.ack = due.ack.max(entry.ack);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unlink(k: &str) -> Action {
        Action::Unlink(k.into())
    }

    #[test]
    fn only_deletes_are_repeated_and_a_batch_without_any_is_durable_at_once() {
        let mut q = Redeletes::new(Duration::from_secs(1), DEFAULT_MAX_BYTES);
        let t = Instant::now();
        let bump = Action::Incr("v".into());
        let publish = Action::Publish { channel: "c".into(), message: "m".into() };
        assert!(!q.schedule(&[bump.clone(), publish], t, t, Some(Lsn(10))), "nothing to repeat, nothing pending");
        assert!(q.schedule(&[bump, unlink("a"), Action::BustTag("t".into())], t, t, Some(Lsn(20))));
        assert_eq!(q.len(), 2);
        assert_eq!(q.next_due(), Some(t + Duration::from_secs(1)));
        assert_eq!(q.take_due(t + Duration::from_millis(999)), Due::default(), "not due yet");
        let due = q.take_due(t + Duration::from_secs(1));
        assert_eq!(due.actions, [unlink("a"), Action::BustTag("t".into())]);
        assert_eq!((due.ack, due.early), (Some(Lsn(20)), 0));
        assert!(q.is_empty());
    }

    #[test]
    fn a_batch_without_deletes_behind_pending_ones_waits_for_them() {
        let mut q = Redeletes::new(Duration::from_secs(1), DEFAULT_MAX_BYTES);
        let t = Instant::now();
        q.schedule(&[unlink("a")], t, t, Some(Lsn(10)));
        assert!(q.schedule(
            &[Action::Incr("v".into())],
            t + Duration::from_millis(5),
            t + Duration::from_millis(5),
            Some(Lsn(20))
        ));
        let first = q.take_due(t + Duration::from_secs(1));
        assert_eq!(first.ack, Some(Lsn(10)), "the later position is not durable before its turn");
        let second = q.take_due(t + Duration::from_millis(1005));
        assert_eq!((second.actions.len(), second.ack), (0, Some(Lsn(20))));
    }

    #[test]
    fn a_key_pending_twice_is_deleted_once_at_the_later_time() {
        let mut q = Redeletes::new(Duration::from_secs(1), DEFAULT_MAX_BYTES);
        let t = Instant::now();
        q.schedule(&[unlink("hot"), unlink("a")], t, t, Some(Lsn(10)));
        q.schedule(&[unlink("hot")], t + Duration::from_millis(300), t + Duration::from_millis(300), Some(Lsn(20)));
        assert_eq!(q.len(), 2, "held once");
        let first = q.take_due(t + Duration::from_secs(1));
        assert_eq!(first.actions, [unlink("a")], "moved to the later entry");
        assert_eq!(first.ack, Some(Lsn(10)));
        let second = q.take_due(t + Duration::from_millis(1300));
        assert_eq!(second.actions, [unlink("hot")]);
        assert!(q.is_empty() && q.pending.is_empty());
    }

    #[test]
    fn a_batch_sent_redelete_after_past_its_visibility_is_not_repeated_but_keeps_its_turn() {
        let mut q = Redeletes::new(Duration::from_secs(1), DEFAULT_MAX_BYTES);
        let t = Instant::now();
        let late = t + Duration::from_secs(1);
        assert!(!q.schedule(&[unlink("a")], t, late, Some(Lsn(10))), "a backlog's batch: nothing to repeat");
        assert!(q.schedule(&[unlink("b")], t, late - Duration::from_millis(1), Some(Lsn(20))), "just in time");
        assert!(q.schedule(&[unlink("c")], t, late, Some(Lsn(30))), "not repeated, but its position waits for b's");
        assert_eq!(q.len(), 1);
        let due = q.take_due(late);
        assert_eq!((due.actions, due.ack), (vec![unlink("b")], Some(Lsn(30))));
    }

    #[test]
    fn a_later_write_through_of_a_key_cancels_its_pending_second_delete() {
        let mut q = Redeletes::new(Duration::from_secs(1), DEFAULT_MAX_BYTES);
        let t = Instant::now();
        q.schedule(&[unlink("k"), unlink("other")], t, t, Some(Lsn(10)));
        let set = Action::Set { key: "k".into(), value: "new row".into(), ttl: None };
        q.schedule(&[set], t, t, Some(Lsn(20)));
        let due = q.take_due(t + Duration::from_secs(2));
        assert_eq!(due.actions, [unlink("other")], "the written key keeps its new value");
        assert_eq!(due.ack, Some(Lsn(20)));
        assert!(q.pending.is_empty() && q.bytes == 0);
    }

    #[test]
    fn a_write_through_after_a_delete_in_the_same_batch_is_not_deleted_again() {
        let mut q = Redeletes::new(Duration::from_secs(1), DEFAULT_MAX_BYTES);
        let set = Action::Set { key: "k".into(), value: "new row".into(), ttl: None };
        assert!(
            !q.schedule(&[unlink("k"), set], Instant::now(), Instant::now(), Some(Lsn(10))),
            "nothing left to repeat"
        );
        assert!(q.is_empty() && q.pending.is_empty() && q.bytes == 0);
    }

    #[test]
    fn past_the_memory_bound_the_oldest_go_early_and_memory_stays_bounded() {
        let bound = 10 * (PER_ACTION_OVERHEAD + 4);
        let mut q = Redeletes::new(Duration::from_secs(60), bound);
        let t = Instant::now();
        let mut early = 0;
        for i in 0..1000u64 {
            q.schedule(&[unlink(&format!("{i:04}"))], t, t, Some(Lsn(i)));
            let due = q.take_due(t);
            early += due.early;
            assert!(q.bytes <= bound, "over the bound after {i}");
        }
        assert_eq!(early, 990);
        assert_eq!(q.len(), 10);
        let rest = q.take_all();
        assert_eq!((rest.actions.len(), rest.ack), (10, Some(Lsn(999))));
    }
}

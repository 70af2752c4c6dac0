//! Sinks execute invalidation actions: Redis in production, memory for tests and replays.
//!
//! A sink applies a whole batch or reports an error; the pipeline retries a failed batch
//! until it succeeds, and only then acknowledges the WAL behind it. Every action is
//! idempotent, so a batch applied partly and then again in full is harmless.

mod memory;
mod redis;

pub use self::memory::MemorySink;
pub use self::redis::{RedisReport, RedisSink, RedisSinkError, inspect, refused_for_good};

use crate::domain::action::Action;
use std::future::Future;
use std::time::Duration;

/// Something that can carry out invalidation actions.
pub trait Sink: Send + 'static {
    /// The error a failed apply reports; the pipeline logs it and retries.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Applies every action of a batch, returning only once all are acknowledged or
    /// refused for good (see [`Sink::take_dead_letters`]).
    fn apply(&mut self, actions: &[Action]) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Makes this process the only writer of write-throughs for `slot`, before its first
    /// batch after taking the slot: from then on, a write-through that another instance
    /// (one that held the slot before) still has in flight is refused, so an old value can
    /// never land after a newer one. The default does nothing.
    fn claim(&mut self, slot: &str) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = slot;
        async { Ok(()) }
    }

    /// The actions of the last successful apply that the target refused for good: an error
    /// reply that retrying cannot fix. The batch counts as applied without them.
    fn take_dead_letters(&mut self) -> Vec<DeadLetter> {
        Vec::new()
    }

    /// What the applies since the last call cost and did, failed ones included.
    fn take_costs(&mut self) -> ApplyCosts {
        ApplyCosts::default()
    }

    /// Checks that the target answers, without changing anything: the pipeline pings at
    /// start and while idle, so a target that is down shows in `/healthz` before a batch fails.
    fn ping(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        std::future::ready(Ok(()))
    }
}

/// What applying batches cost and did, as counted by a sink.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApplyCosts {
    /// Keys the target reported deleted.
    pub deleted_keys: u64,
    /// Keys `SCAN` returned for pattern actions.
    pub scanned_keys: u64,
    /// How long each pattern action took, over all its `SCAN` pages.
    pub scans: Vec<Duration>,
}

/// An action the target refused for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its position in the batch given to [`Sink::apply`].
    pub action: usize,
    /// What the target replied.
    pub error: String,
}

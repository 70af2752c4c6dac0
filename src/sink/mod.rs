//! Sinks execute invalidation actions: Redis in production, memory for tests and replays.
//!
//! A sink applies a whole batch or reports an error; the pipeline retries a failed batch
//! until it succeeds, and only then acknowledges the WAL behind it. Every action is
//! idempotent, so a batch applied partly and then again in full is harmless.

mod memory;
mod redis;

pub use self::memory::MemorySink;
pub use self::redis::{RedisSink, RedisSinkError, redact_url};

use crate::action::Action;
use std::future::Future;

/// Something that can carry out invalidation actions.
pub trait Sink: Send + 'static {
    /// The error a failed apply reports; the pipeline logs it and retries.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Applies every action of a batch, returning only once all are acknowledged.
    fn apply(&mut self, actions: &[Action]) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

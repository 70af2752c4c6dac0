//! An in-memory sink that records what it was asked to do.

use super::Sink;
use crate::domain::action::Action;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

/// Records every call to apply, in order; clones share the record.
#[derive(Debug, Clone, Default)]
pub struct MemorySink {
    calls: Arc<Mutex<Vec<Vec<Action>>>>,
}

impl MemorySink {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every action applied so far, in order.
    pub fn applied(&self) -> Vec<Action> {
        self.calls().concat()
    }

    /// The actions of each call to apply (one round trip to a real Redis), in order.
    pub fn calls(&self) -> Vec<Vec<Action>> {
        self.calls.lock().expect("memory sink lock poisoned by a panicking test").clone()
    }
}

impl Sink for MemorySink {
    type Error = Infallible;

    async fn apply(&mut self, actions: &[Action]) -> Result<(), Infallible> {
        self.calls.lock().expect("memory sink lock poisoned by a panicking test").push(actions.to_vec());
        Ok(())
    }
}

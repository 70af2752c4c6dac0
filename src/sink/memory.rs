//! An in-memory sink that records what it was asked to do.

use super::Sink;
use crate::domain::action::Action;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

/// Records every applied action in order; clones share the record.
#[derive(Debug, Clone, Default)]
pub struct MemorySink {
    applied: Arc<Mutex<Vec<Action>>>,
}

impl MemorySink {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every action applied so far, in order.
    pub fn applied(&self) -> Vec<Action> {
        self.applied.lock().expect("memory sink lock poisoned by a panicking test").clone()
    }
}

impl Sink for MemorySink {
    type Error = Infallible;

    async fn apply(&mut self, actions: &[Action]) -> Result<(), Infallible> {
        self.applied.lock().expect("memory sink lock poisoned by a panicking test").extend_from_slice(actions);
        Ok(())
    }
}

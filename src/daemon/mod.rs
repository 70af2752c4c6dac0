//! The long-running `walbust run`: the pipeline that wires the stages and owns shutdown
//! ([`pipeline`]), the heartbeat it writes ([`heartbeat`]), the slot and publication checks
//! with the server requirements ([`slot`]), the gate that holds a transaction's
//! invalidations until it is visible ([`visibility`]), the reader of the server's
//! `walbust.wait()` counts ([`wait_calls`]), the statements that fix the database
//! ([`fix`]), and how an outage is logged ([`outage`]).

pub mod fix;
pub mod heartbeat;
pub mod outage;
pub mod pipeline;
pub mod slot;
pub mod visibility;
pub mod wait_calls;

//! The long-running `walbust run`: the pipeline that wires the stages and owns shutdown
//! ([`pipeline`]), the heartbeat it writes ([`heartbeat`]), the slot and publication checks
//! with the server requirements ([`slot`]), the statements that fix the database
//! ([`fix`]), and how an outage is logged ([`outage`]).

pub mod fix;
pub mod heartbeat;
pub mod outage;
pub mod pipeline;
pub mod slot;

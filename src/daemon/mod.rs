//! The long-running `walbust run`: the pipeline that wires the stages and owns shutdown
//! ([`pipeline`]), the heartbeat it writes ([`heartbeat`]), the slot and publication checks
//! with the server requirements ([`slot`]), and the statements that fix the database
//! ([`fix`]).

pub mod fix;
pub mod heartbeat;
pub mod pipeline;
pub mod slot;

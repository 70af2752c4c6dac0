//! What walbust is about, independent of any server: the rules and the router that turns
//! a change into actions, the actions and the batches they are gathered in, the one
//! routing step every path shares, positions that only move forward, the second deletes
//! waiting for their time, the configuration and the diagnostics that report its problems.
//! It imports only the Postgres wire layer and the input and error layers.

pub mod action;
pub mod batch;
pub mod config;
pub mod diagnostic;
pub mod progress;
pub mod redelete;
pub mod routing;
pub mod rules;
pub mod value_text;

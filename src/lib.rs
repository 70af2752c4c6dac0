//! walbust: a Postgres change-data-capture cache invalidator.
pub mod action;
pub mod batch;
pub mod config;
pub mod diagnostic;
pub mod lsn;
pub mod pgoutput;
pub mod pipeline;
pub mod progress;
pub mod rules;
pub mod sink;
pub mod source;
pub mod throwaway;

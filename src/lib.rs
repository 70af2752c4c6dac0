//! walbust: a Postgres change-data-capture cache invalidator.
//!
//! # Layout
//!
//! Changes flow through the modules in this order. [`source`] opens a replication
//! connection (`replication=database`) built on `postgres-protocol`, checks the slot and
//! publication ([`source::slot`]) and yields CopyBoth frames. [`pgoutput`] decodes each
//! frame into a typed logical replication message, purely and without panicking on any
//! input; [`source::LogicalStream`] holds the stream's transaction rules and turns frames
//! into Begin, change, message, Commit and keepalive events for `run` and `record` alike. [`rules`] loads the DBA's rule files and its [`rules::Router`] turns each
//! change into [`action::Action`]s, widening a key to a pattern whenever the stream
//! lacks a value it needs; [`routing`] is the one step that routes a change, or applies a
//! manual invalidation message, into a batch for `run`, `replay` and `test` alike. [`batch`] deduplicates actions and records the commit
//! position they complete; [`sink`] applies batches to Redis (or to memory in tests).
//! [`progress`] keeps the received and flushed positions, each only moving forward, and
//! [`pipeline`] wires the stages together, sends standby status updates, reconnects
//! after failures and owns shutdown. [`config`] reads `config.toml`, reporting every
//! problem with [`diagnostic`]s at `file:line:col`. [`catalog`] checks the rules against the
//! live catalog (tables, columns, publication, replica identity) for `walbust check --online`
//! and before the pipeline starts; [`setup`] writes (or applies) the SQL that prepares a
//! database. Every statement a user is shown to fix the database (the publication, replica
//! identity, the role and its grants) comes from [`fix`], so `run`, `check --online` and
//! `setup` give the same advice; SQL quoting is [`source::quote`]. [`ruletest`] runs `*.test.toml`
//! rule tests offline through the same routing step and batch. [`recording`] captures the
//! change stream to a file from a temporary slot of its own (`walbust record`, through the
//! same [`source::LogicalStream`]) and replays it through the same routing step and batch
//! (`walbust replay`). [`throwaway`] starts disposable
//! Postgres and Redis servers for `walbust demo`, the tests and the benchmarks. Every file a
//! user names is read through [`user_file`], regular files only and with a size cap per kind.
//! [`exit`] holds the exit codes every subcommand shares.

pub mod action;
pub mod batch;
pub mod catalog;
pub mod causes;
pub mod config;
pub mod diagnostic;
pub mod exit;
pub mod fix;
pub mod health;
pub mod lsn;
pub mod metrics;
pub mod pgoutput;
pub mod pipeline;
pub mod progress;
pub mod recording;
pub mod routing;
pub mod rules;
pub mod ruletest;
pub mod setup;
pub mod sink;
pub mod source;
pub mod spelling;
pub mod status;
pub mod throwaway;
pub mod user_file;
pub mod value_text;

#[cfg(test)]
mod parity;

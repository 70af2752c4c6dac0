//! walbust: a Postgres change-data-capture cache invalidator.
//!
//! # Layout
//!
//! The folders are layers, and imports point down only: each layer may use those below it
//! and none above. From the bottom:
//!
//! [`input`] and [`errors`] import nothing of walbust. Every file a user names is read
//! through [`input::user_file`], regular files only and with a size cap per kind;
//! [`input::spelling`] suggests the name a user probably meant. [`errors::causes`] prints an
//! error's cause chain with each cause said once, and [`errors::exit`] holds the exit codes
//! every subcommand shares.
//!
//! [`postgres`] is the wire layer. It opens a replication connection
//! (`replication=database`) built on `postgres-protocol`, with libpq's conninfo
//! ([`postgres::conninfo`]) and TLS ([`postgres::tls`]), and yields CopyBoth frames
//! ([`postgres::stream`]). [`postgres::pgoutput`] decodes each frame into a typed logical
//! replication message, purely and without panicking on any input;
//! [`postgres::LogicalStream`] holds the stream's transaction rules and turns frames into
//! Begin, change, message, Commit and keepalive events for `run` and `record` alike. SQL
//! quoting is [`postgres::quote`]; WAL positions are [`postgres::lsn`].
//!
//! [`domain`] is what walbust is about. [`domain::rules`] loads the DBA's rule files and its
//! [`domain::rules::Router`] turns each change into [`domain::action::Action`]s, widening a
//! key to a pattern whenever the stream lacks a value it needs; [`domain::routing`] is the
//! one step that routes a change, or applies a manual invalidation message, into a batch for
//! `run`, `replay` and `test` alike. [`domain::batch`] deduplicates actions and records the
//! commit position they complete; [`domain::progress`] keeps the received and flushed
//! positions, each only moving forward. [`domain::config`] reads `config.toml`, reporting
//! every problem with [`domain::diagnostic`]s at `file:line:col`.
//!
//! Beside each other above the domain: [`sink`] applies batches to Redis (or to memory in
//! tests), and [`telemetry`] keeps the metrics registry ([`telemetry::metrics`]), reads the
//! process's own memory and CPU time ([`telemetry::process`]) and serves the metrics with
//! the health check ([`telemetry::health`]).
//!
//! [`daemon`] is `walbust run`: [`daemon::pipeline`] wires the stages together, sends
//! standby status updates, writes heartbeats ([`daemon::heartbeat`]), reconnects after
//! failures and owns shutdown; [`daemon::slot`] checks the slot and publication before
//! streaming and owns the server settings walbust needs. Every statement a user is shown to
//! fix the database (the publication, replica identity, the role and its grants) comes from
//! [`daemon::fix`], so `run`, `check --online` and `setup` give the same advice.
//!
//! [`ops`] and [`offline`] sit on the daemon. [`ops::catalog`] checks the rules against the
//! live catalog (tables, columns, publication, replica identity) for
//! `walbust check --online` and before the pipeline starts; [`ops::failover`] checks a
//! primary and its standbys for `[source] failover = true`; [`ops::setup`] writes (or
//! applies) the SQL that prepares a database; [`ops::status`] reports a slot's state.
//! [`offline::ruletest`] runs `*.test.toml` rule tests through the same routing step and
//! batch. [`offline::recording`] captures the change stream to a file from a temporary slot
//! of its own (`walbust record`, through the same [`postgres::LogicalStream`]) and replays
//! it through the same routing step and batch (`walbust replay`). [`offline::throwaway`]
//! starts disposable Postgres and Redis servers for `walbust demo`, the tests and the
//! benchmarks.
//!
//! The CLI (`src/cli`, in the binary) is on top: one file per subcommand.

pub mod daemon;
pub mod domain;
pub mod errors;
pub mod input;
pub mod offline;
pub mod ops;
pub mod postgres;
pub mod sink;
pub mod telemetry;

//! Operations on a database, run by a person: the catalog checks of
//! `walbust check --online` ([`catalog`]) and its check of a primary and standbys for
//! failover slots ([`failover`]), `walbust setup` ([`setup`]) and `walbust status` ([`status`]).

pub mod catalog;
pub mod failover;
pub mod setup;
pub mod status;

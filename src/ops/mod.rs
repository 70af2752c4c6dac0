//! Operations on a database, run by a person: the catalog checks of
//! `walbust check --online` ([`catalog`]), `walbust setup` ([`setup`]) and
//! `walbust status` ([`status`]).

pub mod catalog;
pub mod setup;
pub mod status;

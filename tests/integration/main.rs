//! Integration tests against real Postgres and Redis servers started by the harness.

mod actions;
mod connection;
mod durability;
mod routing;
mod slot_safety;
mod support;

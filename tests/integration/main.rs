//! Integration tests against real Postgres and Redis servers started by the harness.

mod actions;
mod bad_rules;
mod check_online;
mod cluster;
mod config_files;
mod connection;
mod consistency;
mod demo;
mod durability;
mod failover;
mod metrics;
mod observability;
mod operations;
mod poison;
mod replay;
mod routing;
mod ruletest;
mod sentinel;
mod setup_check;
mod slot_safety;
mod standby;
mod startup;
mod support;
mod versions;

//! Integration tests against real Postgres and Redis servers started by the harness.

mod actions;
mod bad_rules;
mod check_online;
mod config_files;
mod connection;
mod consistency;
mod demo;
mod durability;
mod metrics;
mod operations;
mod poison;
mod replay;
mod routing;
mod ruletest;
mod setup_check;
mod slot_safety;
mod startup;
mod support;

//! Tools beside the daemon, for trying rules before they run: rule tests
//! ([`ruletest`]), recording a change stream to a file and replaying it without a database
//! ([`recording`]), and throwaway servers for the demo, the tests and the benchmarks
//! ([`throwaway`]).

#[cfg(test)]
mod parity;
pub mod recording;
pub mod ruletest;
pub mod throwaway;

//! Tools beside the daemon, for trying rules before they run: rule tests
//! ([`ruletest`]), recording a change stream to a file and replaying it without a database
//! ([`recording`]), throwaway servers for the demo, the tests and the benchmarks
//! ([`throwaway`]), and the consistency oracle that the tests and the benchmarks run
//! against walbust ([`oracle`]).

pub mod oracle;
#[cfg(test)]
mod parity;
pub mod recording;
pub mod ruletest;
pub mod throwaway;

//! What operators see of a running process: the metrics registry ([`metrics`]), this
//! process's memory and CPU time ([`process`]), and the HTTP server that serves the
//! metrics with the health check ([`health`]).

pub mod health;
pub mod metrics;
pub mod process;

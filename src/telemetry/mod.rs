//! What operators see of a running process: the metrics registry ([`metrics`]) and the
//! HTTP server that serves it with the health check ([`health`]).

pub mod health;
pub mod metrics;

//! How a failure is told: an error's cause chain with each cause said once ([`causes`]),
//! and the exit codes every subcommand shares ([`exit`]). It imports nothing else of
//! walbust.

pub mod causes;
pub mod exit;

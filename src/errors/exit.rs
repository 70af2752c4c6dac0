//! Exit codes: the one policy of every subcommand (README, "Exit codes").
//!
//! A supervisor restarts on [`FAILED`] and never on [`USAGE`] or [`NEEDS_PERSON`]
//! (deploy/walbust.service: `RestartPreventExitStatus=2 3`), since restarting cannot fix a
//! file, a password or the database's settings: it only buries the message under a
//! restart loop.

/// Success.
pub const OK: u8 = 0;
/// A failed check or test, or a run stopped by an error that a restart may clear (a slot
/// another instance holds, a replication message walbust cannot decode).
pub const FAILED: u8 = 1;
/// A usage or config error: bad flags, an invalid config or rule file, a rules glob
/// matching nothing, a metrics address that cannot be parsed, a server that cannot be
/// reached for a one-off command.
pub const USAGE: u8 = 2;
/// A database or credentials problem only a person can fix: authentication failed,
/// `wal_level` is not `logical`, the server is older than PostgreSQL 14, the publication is
/// missing or leaves out a rule's table, the slot is missing, unusable or lost.
pub const NEEDS_PERSON: u8 = 3;

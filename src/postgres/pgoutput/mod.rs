//! Decoder for the built-in `pgoutput` logical replication plugin, protocol versions 1 to 4.
//!
//! Each XLogData frame of a pgoutput replication stream carries one message:
//! transaction boundaries (Begin/Commit, their streaming and two-phase
//! counterparts), table schemas (Relation, Type) and row changes (Insert,
//! Update, Delete, Truncate), plus `pg_logical_emit_message` payloads. This
//! module turns those bytes into [`LogicalMessage`] values and nothing else: it
//! does no I/O, never panics on malformed input (every failure is a
//! [`DecodeError`] naming the field, tag and byte offset), and hands out tuple
//! values and message contents as zero-copy slices of the input [`bytes::Bytes`].
//! [`Decoder`] keeps the one bit of state the format needs (whether a streamed
//! transaction chunk is open, which adds an xid to change messages), and
//! [`RelationCache`] keeps the schemas needed to interpret positional tuples.
//! The format is documented in the PostgreSQL manual, "Logical Replication
//! Message Formats".

mod decode;
mod message;
mod relation;

pub use decode::{DecodeError, Decoder};
pub use message::{
    Begin, BeginPrepare, Column, Commit, CommitPrepared, Delete, Insert, LogicalDecodingMessage, LogicalMessage,
    OldTuple, Origin, Prepare, Relation, ReplicaIdentity, RollbackPrepared, StreamAbort, StreamCommit, StreamPrepare,
    StreamStart, Truncate, Tuple, TypeMessage, Update, Value, pg_time_to_system,
};
pub use relation::RelationCache;

#[cfg(test)]
mod tests;

//! Typed pgoutput messages, one struct per wire message.

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::postgres::lsn::Lsn;

/// Seconds from the Unix epoch to the Postgres epoch, 2000-01-01 00:00:00 UTC.
const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// Converts a Postgres timestamp (microseconds since 2000-01-01 UTC) to a `SystemTime`.
///
/// Values the platform's `SystemTime` cannot hold saturate to the Postgres epoch
/// rather than panic; that cannot happen on Unix, where every `i64` fits.
pub fn pg_time_to_system(t: i64) -> SystemTime {
    // Checked even here so that no input, on no platform, can panic.
    let unix = SystemTime::UNIX_EPOCH;
    let Some(epoch) = unix.checked_add(Duration::from_secs(PG_EPOCH_UNIX_SECS)) else {
        return unix;
    };
    let delta = Duration::from_micros(t.unsigned_abs());
    let shifted = if t >= 0 { epoch.checked_add(delta) } else { epoch.checked_sub(delta) };
    shifted.unwrap_or(epoch)
}

/// One decoded pgoutput message: the payload of one XLogData frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    /// 'B': start of a (non-streamed) transaction.
    Begin(Begin),
    /// 'C': end of a (non-streamed) transaction.
    Commit(Commit),
    /// 'O': the replication origin the current transaction came from.
    Origin(Origin),
    /// 'R': a table's schema, sent before its first change and after DDL.
    Relation(Relation),
    /// 'Y': a non-builtin column type referenced by a following Relation.
    Type(TypeMessage),
    /// 'I': a row was inserted.
    Insert(Insert),
    /// 'U': a row was updated.
    Update(Update),
    /// 'D': a row was deleted.
    Delete(Delete),
    /// 'T': one or more tables were truncated.
    Truncate(Truncate),
    /// 'M': a message written with `pg_logical_emit_message`.
    Message(LogicalDecodingMessage),
    /// 'S': start of a chunk of an in-progress (streamed) transaction.
    StreamStart(StreamStart),
    /// 'E': end of a chunk of a streamed transaction.
    StreamStop,
    /// 'c': a streamed transaction committed.
    StreamCommit(StreamCommit),
    /// 'A': a streamed transaction or one of its subtransactions aborted.
    StreamAbort(StreamAbort),
    /// 'b': start of a transaction being prepared for two-phase commit.
    BeginPrepare(BeginPrepare),
    /// 'P': a transaction was prepared (PREPARE TRANSACTION).
    Prepare(Prepare),
    /// 'K': a prepared transaction was committed (COMMIT PREPARED).
    CommitPrepared(CommitPrepared),
    /// 'r': a prepared transaction was rolled back (ROLLBACK PREPARED).
    RollbackPrepared(RollbackPrepared),
    /// 'p': a streamed transaction was prepared.
    StreamPrepare(StreamPrepare),
}

impl LogicalMessage {
    /// The wire tag byte this message was decoded from.
    pub fn tag(&self) -> u8 {
        match self {
            LogicalMessage::Begin(_) => b'B',
            LogicalMessage::Commit(_) => b'C',
            LogicalMessage::Origin(_) => b'O',
            LogicalMessage::Relation(_) => b'R',
            LogicalMessage::Type(_) => b'Y',
            LogicalMessage::Insert(_) => b'I',
            LogicalMessage::Update(_) => b'U',
            LogicalMessage::Delete(_) => b'D',
            LogicalMessage::Truncate(_) => b'T',
            LogicalMessage::Message(_) => b'M',
            LogicalMessage::StreamStart(_) => b'S',
            LogicalMessage::StreamStop => b'E',
            LogicalMessage::StreamCommit(_) => b'c',
            LogicalMessage::StreamAbort(_) => b'A',
            LogicalMessage::BeginPrepare(_) => b'b',
            LogicalMessage::Prepare(_) => b'P',
            LogicalMessage::CommitPrepared(_) => b'K',
            LogicalMessage::RollbackPrepared(_) => b'r',
            LogicalMessage::StreamPrepare(_) => b'p',
        }
    }
}

/// 'B': start of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC (see [`pg_time_to_system`]).
    pub commit_time: i64,
    /// Transaction id.
    pub xid: u32,
}

/// 'C': end of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Flags; currently always 0.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: the position to confirm as flushed.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// 'O': the replication origin of the current transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// LSN of the commit on the origin server.
    pub commit_lsn: Lsn,
    /// Name of the origin.
    pub name: String,
}

/// A table's replica identity: which old values Update and Delete carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// 'd': the primary key.
    Default,
    /// 'n': nothing; updates and deletes carry no old values.
    Nothing,
    /// 'f': every column.
    Full,
    /// 'i': the columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// Maps the wire byte to a replica identity, `None` for unknown bytes.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Whether the column is part of the replica identity key (flag bit 1).
    pub key: bool,
    /// Column name.
    pub name: String,
    /// Oid of the column's type.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
}

/// 'R': a table's schema as of the changes that follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Xid of the streamed (sub)transaction; `Some` only between Stream Start and Stream Stop.
    pub xid: Option<u32>,
    /// Oid of the table; changes refer to the table by this number.
    pub oid: u32,
    /// Schema name (the decoder turns the empty string the server sends for `pg_catalog` into `pg_catalog`).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Which old values Update and Delete messages carry.
    pub replica_identity: ReplicaIdentity,
    /// Published columns in table order; tuples are positional against this.
    pub columns: Vec<Column>,
}

impl Relation {
    /// The unquoted `schema.table` name.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }

    /// Position of the column called `name`, which is also its position in tuples.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// 'Y': a non-builtin type used by a column of a following Relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMessage {
    /// Xid of the streamed (sub)transaction; `Some` only between Stream Start and Stream Stop.
    pub xid: Option<u32>,
    /// Oid of the type.
    pub oid: u32,
    /// Schema name (the decoder turns the empty string the server sends for `pg_catalog` into `pg_catalog`).
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// 'n': SQL NULL.
    Null,
    /// 'u': an unchanged out-of-line (TOASTed) value whose bytes were not sent.
    UnchangedToast,
    /// 't': the value in the type's text output format.
    Text(Bytes),
    /// 'b': the value in the type's binary send format.
    Binary(Bytes),
}

impl Value {
    /// Whether this is SQL NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The raw bytes of a text or binary value.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Value::Text(b) | Value::Binary(b) => Some(b),
            Value::Null | Value::UnchangedToast => None,
        }
    }

    /// A text-format value as `&str`, `None` for other kinds or invalid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

/// A row's column values, positional against the table's [`Relation`] columns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<Value>);

impl Tuple {
    /// The value at column position `index`.
    pub fn get(&self, index: usize) -> Option<&Value> {
        self.0.get(index)
    }

    /// Number of columns in the tuple.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the tuple has no columns.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The values in column order.
    pub fn values(&self) -> &[Value] {
        &self.0
    }
}

/// The old row carried by Update and Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// 'K': only the replica identity key columns are set; the others are NULL.
    Key(Tuple),
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

impl OldTuple {
    /// The old values, whichever kind they are.
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// 'I': a row was inserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// Xid of the streamed (sub)transaction; `Some` only between Stream Start and Stream Stop.
    pub xid: Option<u32>,
    /// Oid of the table, as announced by an earlier Relation.
    pub relation: u32,
    /// The new row.
    pub new: Tuple,
}

/// 'U': a row was updated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// Xid of the streamed (sub)transaction; `Some` only between Stream Start and Stream Stop.
    pub xid: Option<u32>,
    /// Oid of the table, as announced by an earlier Relation.
    pub relation: u32,
    /// The old row: absent unless the key changed or the identity is FULL.
    pub old: Option<OldTuple>,
    /// The new row; unchanged TOAST columns are [`Value::UnchangedToast`].
    pub new: Tuple,
}

/// 'D': a row was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// Xid of the streamed (sub)transaction; `Some` only between Stream Start and Stream Stop.
    pub xid: Option<u32>,
    /// Oid of the table, as announced by an earlier Relation.
    pub relation: u32,
    /// The deleted row's key columns or, for REPLICA IDENTITY FULL, all of it.
    pub old: OldTuple,
}

/// 'T': tables were truncated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Xid of the streamed (sub)transaction; `Some` only between Stream Start and Stream Stop.
    pub xid: Option<u32>,
    /// Option bits: [`Truncate::CASCADE`] and [`Truncate::RESTART_IDENTITY`].
    pub options: u8,
    /// Oids of the truncated tables.
    pub relations: Vec<u32>,
}

impl Truncate {
    /// Option bit set by `TRUNCATE ... CASCADE`.
    pub const CASCADE: u8 = 1;
    /// Option bit set by `TRUNCATE ... RESTART IDENTITY`.
    pub const RESTART_IDENTITY: u8 = 2;

    /// Whether the truncate was `CASCADE`.
    pub fn cascade(&self) -> bool {
        self.options & Self::CASCADE != 0
    }

    /// Whether the truncate was `RESTART IDENTITY`.
    pub fn restart_identity(&self) -> bool {
        self.options & Self::RESTART_IDENTITY != 0
    }
}

/// 'M': a message written with `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalDecodingMessage {
    /// Xid of the streamed (sub)transaction; `Some` only between Stream Start and Stream Stop.
    pub xid: Option<u32>,
    /// Whether the message is part of a transaction (flags bit 1) or was sent immediately.
    pub transactional: bool,
    /// LSN of the message.
    pub lsn: Lsn,
    /// The prefix the writer chose, used to tell message producers apart.
    pub prefix: String,
    /// The message body, a slice of the input.
    pub content: Bytes,
}

/// 'S': start of a chunk of a streamed transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// The streamed (top-level) transaction id.
    pub xid: u32,
    /// Whether this is the transaction's first chunk.
    pub first_segment: bool,
}

/// 'c': a streamed transaction committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    /// The streamed transaction id.
    pub xid: u32,
    /// Flags; currently always 0.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// 'A': a streamed transaction, or one of its subtransactions, aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    /// The streamed (top-level) transaction id.
    pub xid: u32,
    /// The aborted subtransaction; equal to `xid` when the whole transaction aborted.
    pub subxid: u32,
    /// LSN of the abort; sent only by protocol 4+ with parallel streaming.
    pub abort_lsn: Option<Lsn>,
    /// Abort time; sent only by protocol 4+ with parallel streaming.
    pub abort_time: Option<i64>,
}

/// 'b': start of a transaction being prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginPrepare {
    /// LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// LSN just past the prepare record.
    pub end_lsn: Lsn,
    /// Prepare time, microseconds since 2000-01-01 UTC.
    pub prepare_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// The user-chosen global transaction identifier.
    pub gid: String,
}

/// 'P': a transaction was prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepare {
    /// Flags; currently always 0.
    pub flags: u8,
    /// LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// LSN just past the prepare record.
    pub end_lsn: Lsn,
    /// Prepare time, microseconds since 2000-01-01 UTC.
    pub prepare_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// The user-chosen global transaction identifier.
    pub gid: String,
}

/// 'K': a prepared transaction was committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPrepared {
    /// Flags; currently always 0.
    pub flags: u8,
    /// LSN of the COMMIT PREPARED record.
    pub commit_lsn: Lsn,
    /// LSN just past the COMMIT PREPARED record.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// The user-chosen global transaction identifier.
    pub gid: String,
}

/// 'r': a prepared transaction was rolled back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPrepared {
    /// Flags; currently always 0.
    pub flags: u8,
    /// LSN just past the prepare record.
    pub prepare_end_lsn: Lsn,
    /// LSN just past the ROLLBACK PREPARED record.
    pub rollback_end_lsn: Lsn,
    /// Prepare time, microseconds since 2000-01-01 UTC.
    pub prepare_time: i64,
    /// Rollback time, microseconds since 2000-01-01 UTC.
    pub rollback_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// The user-chosen global transaction identifier.
    pub gid: String,
}

/// 'p': a streamed transaction was prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPrepare {
    /// Flags; currently always 0.
    pub flags: u8,
    /// LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// LSN just past the prepare record.
    pub end_lsn: Lsn,
    /// Prepare time, microseconds since 2000-01-01 UTC.
    pub prepare_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// The user-chosen global transaction identifier.
    pub gid: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_time_zero_is_the_postgres_epoch() {
        let epoch = SystemTime::UNIX_EPOCH + Duration::from_secs(946_684_800);
        assert_eq!(pg_time_to_system(0), epoch);
        assert_eq!(pg_time_to_system(1_500_000), epoch + Duration::from_micros(1_500_000));
        assert_eq!(pg_time_to_system(-1_000_000), epoch - Duration::from_secs(1));
    }

    #[test]
    fn pg_time_extremes_do_not_panic() {
        // The server uses these for +/-infinity.
        for t in [i64::MIN, i64::MIN + 1, i64::MAX] {
            let _ = pg_time_to_system(t);
        }
    }

    #[test]
    fn value_accessors() {
        let text = Value::Text(Bytes::from_static(b"abc"));
        assert_eq!(text.as_str(), Some("abc"));
        assert_eq!(text.as_bytes().map(|b| &b[..]), Some(&b"abc"[..]));
        assert!(!text.is_null());
        assert_eq!(Value::Text(Bytes::from_static(b"\xff")).as_str(), None);
        let binary = Value::Binary(Bytes::from_static(&[0, 1]));
        assert_eq!(binary.as_str(), None);
        assert_eq!(binary.as_bytes().map(|b| b.len()), Some(2));
        assert!(Value::Null.is_null());
        assert_eq!(Value::UnchangedToast.as_bytes(), None);
    }

    #[test]
    fn truncate_option_bits() {
        let t = |options| Truncate { xid: None, options, relations: vec![] };
        assert!(!t(0).cascade() && !t(0).restart_identity());
        assert!(t(1).cascade() && !t(1).restart_identity());
        assert!(!t(2).cascade() && t(2).restart_identity());
    }

    #[test]
    fn replica_identity_bytes() {
        assert_eq!(ReplicaIdentity::from_byte(b'd'), Some(ReplicaIdentity::Default));
        assert_eq!(ReplicaIdentity::from_byte(b'n'), Some(ReplicaIdentity::Nothing));
        assert_eq!(ReplicaIdentity::from_byte(b'f'), Some(ReplicaIdentity::Full));
        assert_eq!(ReplicaIdentity::from_byte(b'i'), Some(ReplicaIdentity::Index));
        assert_eq!(ReplicaIdentity::from_byte(b'x'), None);
    }

    #[test]
    fn old_tuple_exposes_its_values_either_way() {
        let tuple = Tuple(vec![Value::Null]);
        assert_eq!(OldTuple::Key(tuple.clone()).tuple(), &tuple);
        assert_eq!(OldTuple::Full(tuple.clone()).tuple(), &tuple);
        assert!(Tuple::default().is_empty());
    }
}

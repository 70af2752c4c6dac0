//! The pgoutput wire decoder: bounds-checked reads from a `Bytes` buffer.

use std::fmt;

use bytes::Bytes;

use super::message::{
    Begin, BeginPrepare, Column, Commit, CommitPrepared, Delete, Insert, LogicalDecodingMessage, LogicalMessage,
    OldTuple, Origin, Prepare, Relation, ReplicaIdentity, RollbackPrepared, StreamAbort, StreamCommit, StreamPrepare,
    StreamStart, Truncate, Tuple, TypeMessage, Update, Value,
};
use crate::postgres::lsn::Lsn;

/// Why a pgoutput message could not be decoded; offsets count from the tag byte (0).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message had no bytes at all, not even a tag.
    #[error("empty pgoutput message")]
    Empty,
    /// The first byte is not a pgoutput message tag.
    #[error("unknown pgoutput message tag {}", TagName(*tag))]
    UnknownTag {
        /// The unrecognised tag byte.
        tag: u8,
    },
    /// The message ended before a field was complete.
    #[error("truncated {} message: {field} at byte {offset} runs past the end ({len} bytes)", TagName(*tag))]
    Truncated {
        /// Tag of the message being decoded.
        tag: u8,
        /// The field being read.
        field: &'static str,
        /// Offset at which the field starts.
        offset: usize,
        /// Total length of the message.
        len: usize,
    },
    /// A name or other string field is not valid UTF-8.
    #[error("invalid utf-8 in {} message: {field} at byte {offset}", TagName(*tag))]
    InvalidUtf8 {
        /// Tag of the message being decoded.
        tag: u8,
        /// The field being read.
        field: &'static str,
        /// Offset at which the field starts.
        offset: usize,
    },
    /// A length or count field is negative.
    #[error("negative {field} {value} in {} message at byte {offset}", TagName(*tag))]
    NegativeLength {
        /// Tag of the message being decoded.
        tag: u8,
        /// The field being read.
        field: &'static str,
        /// Offset of the length field.
        offset: usize,
        /// The value found.
        value: i32,
    },
    /// A one-byte field (tuple kind, tuple marker, replica identity) has an unknown value.
    #[error("invalid {field} {} in {} message at byte {offset}", TagName(*value), TagName(*tag))]
    InvalidByte {
        /// Tag of the message being decoded.
        tag: u8,
        /// The field being read.
        field: &'static str,
        /// Offset of the byte.
        offset: usize,
        /// The byte found.
        value: u8,
    },
    /// Bytes remain after a complete message.
    #[error("{count} trailing bytes after complete {} message at byte {offset}", TagName(*tag))]
    TrailingBytes {
        /// Tag of the message being decoded.
        tag: u8,
        /// Offset of the first unread byte.
        offset: usize,
        /// How many bytes were left unread.
        count: usize,
    },
}

/// Shows a tag byte as `'B'` when printable and as `0x00` otherwise.
struct TagName(u8);

impl fmt::Display for TagName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() { write!(f, "'{}'", char::from(self.0)) } else { write!(f, "{:#04x}", self.0) }
    }
}

/// Decodes pgoutput messages, tracking whether a streamed transaction chunk is open.
///
/// The state matters because Relation, Type, Insert, Update, Delete, Truncate and
/// Message carry a leading xid only between Stream Start and Stream Stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoder {
    protocol_version: u32,
    in_stream: bool,
}

impl Decoder {
    /// Creates a decoder for the `proto_version` passed to START_REPLICATION.
    pub fn new(protocol_version: u32) -> Self {
        Decoder { protocol_version, in_stream: false }
    }

    /// The protocol version this decoder was created for.
    pub fn protocol_version(&self) -> u32 {
        self.protocol_version
    }

    /// Whether a Stream Start has been decoded without its Stream Stop yet.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// Forgets any open stream chunk, for a fresh START_REPLICATION after reconnecting.
    pub fn reset(&mut self) {
        self.in_stream = false;
    }

    /// Decodes one pgoutput message (the payload of one XLogData frame).
    ///
    /// The state changes only when a Stream Start or Stream Stop decodes
    /// successfully, so a rejected message leaves the decoder as it was.
    pub fn decode(&mut self, data: Bytes) -> Result<LogicalMessage, DecodeError> {
        let &tag = data.first().ok_or(DecodeError::Empty)?;
        let mut r = Reader { data, pos: 1, tag };
        let msg = match tag {
            b'B' => LogicalMessage::Begin(Begin {
                final_lsn: r.lsn("final lsn")?,
                commit_time: r.i64("commit timestamp")?,
                xid: r.u32("xid")?,
            }),
            b'C' => LogicalMessage::Commit(Commit {
                flags: r.u8("flags")?,
                commit_lsn: r.lsn("commit lsn")?,
                end_lsn: r.lsn("end lsn")?,
                commit_time: r.i64("commit timestamp")?,
            }),
            b'O' => LogicalMessage::Origin(Origin {
                commit_lsn: r.lsn("origin commit lsn")?,
                name: r.string("origin name")?,
            }),
            b'R' => LogicalMessage::Relation(self.relation(&mut r)?),
            b'Y' => LogicalMessage::Type(TypeMessage {
                xid: self.stream_xid(&mut r)?,
                oid: r.u32("type oid")?,
                namespace: schema_name(r.string("type namespace")?),
                name: r.string("type name")?,
            }),
            b'I' => {
                let xid = self.stream_xid(&mut r)?;
                let relation = r.u32("relation oid")?;
                r.expect_new_tuple_marker()?;
                let new = r.tuple()?;
                LogicalMessage::Insert(Insert { xid, relation, new })
            }
            b'U' => LogicalMessage::Update(self.update(&mut r)?),
            b'D' => {
                let xid = self.stream_xid(&mut r)?;
                let relation = r.u32("relation oid")?;
                let offset = r.pos;
                let old = match r.u8("old tuple marker")? {
                    b'K' => OldTuple::Key(r.tuple()?),
                    b'O' => OldTuple::Full(r.tuple()?),
                    value => return Err(r.invalid_byte("old tuple marker", offset, value)),
                };
                LogicalMessage::Delete(Delete { xid, relation, old })
            }
            b'T' => LogicalMessage::Truncate(self.truncate(&mut r)?),
            b'M' => {
                let xid = self.stream_xid(&mut r)?;
                let flags = r.u8("flags")?;
                let lsn = r.lsn("message lsn")?;
                let prefix = r.string("message prefix")?;
                let content = r.sized_bytes("message content length", "message content")?;
                LogicalMessage::Message(LogicalDecodingMessage {
                    xid,
                    transactional: flags & 1 != 0,
                    lsn,
                    prefix,
                    content,
                })
            }
            b'S' => LogicalMessage::StreamStart(StreamStart {
                xid: r.u32("xid")?,
                first_segment: r.u8("first segment flag")? == 1,
            }),
            b'E' => LogicalMessage::StreamStop,
            b'c' => LogicalMessage::StreamCommit(StreamCommit {
                xid: r.u32("xid")?,
                flags: r.u8("flags")?,
                commit_lsn: r.lsn("commit lsn")?,
                end_lsn: r.lsn("end lsn")?,
                commit_time: r.i64("commit timestamp")?,
            }),
            b'A' => {
                let xid = r.u32("xid")?;
                let subxid = r.u32("subtransaction xid")?;
                // Protocol 4 appends these only when the subscriber asked for
                // parallel streaming, so their absence is not an error.
                let (abort_lsn, abort_time) = if self.protocol_version >= 4 && r.remaining() > 0 {
                    (Some(r.lsn("abort lsn")?), Some(r.i64("abort timestamp")?))
                } else {
                    (None, None)
                };
                LogicalMessage::StreamAbort(StreamAbort { xid, subxid, abort_lsn, abort_time })
            }
            b'b' => LogicalMessage::BeginPrepare(BeginPrepare {
                prepare_lsn: r.lsn("prepare lsn")?,
                end_lsn: r.lsn("end lsn")?,
                prepare_time: r.i64("prepare timestamp")?,
                xid: r.u32("xid")?,
                gid: r.string("gid")?,
            }),
            b'P' => LogicalMessage::Prepare(Prepare {
                flags: r.u8("flags")?,
                prepare_lsn: r.lsn("prepare lsn")?,
                end_lsn: r.lsn("end lsn")?,
                prepare_time: r.i64("prepare timestamp")?,
                xid: r.u32("xid")?,
                gid: r.string("gid")?,
            }),
            b'K' => LogicalMessage::CommitPrepared(CommitPrepared {
                flags: r.u8("flags")?,
                commit_lsn: r.lsn("commit lsn")?,
                end_lsn: r.lsn("end lsn")?,
                commit_time: r.i64("commit timestamp")?,
                xid: r.u32("xid")?,
                gid: r.string("gid")?,
            }),
            b'r' => LogicalMessage::RollbackPrepared(RollbackPrepared {
                flags: r.u8("flags")?,
                prepare_end_lsn: r.lsn("prepare end lsn")?,
                rollback_end_lsn: r.lsn("rollback end lsn")?,
                prepare_time: r.i64("prepare timestamp")?,
                rollback_time: r.i64("rollback timestamp")?,
                xid: r.u32("xid")?,
                gid: r.string("gid")?,
            }),
            b'p' => LogicalMessage::StreamPrepare(StreamPrepare {
                flags: r.u8("flags")?,
                prepare_lsn: r.lsn("prepare lsn")?,
                end_lsn: r.lsn("end lsn")?,
                prepare_time: r.i64("prepare timestamp")?,
                xid: r.u32("xid")?,
                gid: r.string("gid")?,
            }),
            tag => return Err(DecodeError::UnknownTag { tag }),
        };
        r.finish()?;
        match msg {
            LogicalMessage::StreamStart(_) => self.in_stream = true,
            LogicalMessage::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(msg)
    }

    /// Reads the leading xid that change messages carry only inside a stream chunk.
    fn stream_xid(&self, r: &mut Reader) -> Result<Option<u32>, DecodeError> {
        if self.in_stream { r.u32("xid").map(Some) } else { Ok(None) }
    }

    fn relation(&self, r: &mut Reader) -> Result<Relation, DecodeError> {
        let xid = self.stream_xid(r)?;
        let oid = r.u32("relation oid")?;
        let namespace = schema_name(r.string("relation namespace")?);
        let name = r.string("relation name")?;
        let offset = r.pos;
        let identity = r.u8("replica identity")?;
        let replica_identity =
            ReplicaIdentity::from_byte(identity).ok_or_else(|| r.invalid_byte("replica identity", offset, identity))?;
        let count = r.u16("column count")?;
        // Each column takes at least 10 bytes, so a lying count cannot make us
        // reserve more memory than the message could possibly describe.
        let mut columns = Vec::with_capacity(usize::from(count).min(r.remaining() / 10));
        for _ in 0..count {
            columns.push(Column {
                key: r.u8("column flags")? & 1 != 0,
                name: r.string("column name")?,
                type_oid: r.u32("column type oid")?,
                type_modifier: r.i32("column type modifier")?,
            });
        }
        Ok(Relation { xid, oid, namespace, name, replica_identity, columns })
    }

    fn update(&self, r: &mut Reader) -> Result<Update, DecodeError> {
        let xid = self.stream_xid(r)?;
        let relation = r.u32("relation oid")?;
        let offset = r.pos;
        let old = match r.u8("tuple marker")? {
            b'K' => Some(OldTuple::Key(r.tuple()?)),
            b'O' => Some(OldTuple::Full(r.tuple()?)),
            b'N' => None,
            value => return Err(r.invalid_byte("tuple marker", offset, value)),
        };
        if old.is_some() {
            r.expect_new_tuple_marker()?;
        }
        let new = r.tuple()?;
        Ok(Update { xid, relation, old, new })
    }

    fn truncate(&self, r: &mut Reader) -> Result<Truncate, DecodeError> {
        let xid = self.stream_xid(r)?;
        let count = r.count("relation count")?;
        let options = r.u8("truncate options")?;
        let mut relations = Vec::with_capacity(count.min(r.remaining() / 4));
        for _ in 0..count {
            relations.push(r.u32("truncated relation oid")?);
        }
        Ok(Truncate { xid, options, relations })
    }
}

/// A cursor over one message; every read checks bounds and reports the tag and offset.
struct Reader {
    data: Bytes,
    pos: usize,
    tag: u8,
}

impl Reader {
    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    fn truncated(&self, field: &'static str, offset: usize) -> DecodeError {
        DecodeError::Truncated { tag: self.tag, field, offset, len: self.data.len() }
    }

    fn invalid_byte(&self, field: &'static str, offset: usize, value: u8) -> DecodeError {
        DecodeError::InvalidByte { tag: self.tag, field, offset, value }
    }

    /// Returns the byte range of the next `n` bytes and advances past them.
    fn advance(&mut self, n: usize, field: &'static str) -> Result<(usize, usize), DecodeError> {
        let start = self.pos;
        match start.checked_add(n) {
            Some(end) if end <= self.data.len() => {
                self.pos = end;
                Ok((start, end))
            }
            _ => Err(self.truncated(field, start)),
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let start = self.pos;
        let (s, e) = self.advance(N, field)?;
        self.data.get(s..e).and_then(|b| <[u8; N]>::try_from(b).ok()).ok_or_else(|| self.truncated(field, start))
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.array(field).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    /// Reads a signed Int32 length or count, rejecting negative values.
    fn count(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let value = self.i32(field)?;
        usize::try_from(value).map_err(|_| DecodeError::NegativeLength { tag: self.tag, field, offset, value })
    }

    /// Reads an Int32 length and that many bytes, as a zero-copy slice of the input.
    fn sized_bytes(&mut self, len_field: &'static str, data_field: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.count(len_field)?;
        let (start, end) = self.advance(len, data_field)?;
        Ok(self.data.slice(start..end))
    }

    /// Reads a NUL-terminated UTF-8 string.
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let start = self.pos;
        let rest = self.data.get(start..).unwrap_or_default();
        let nul = rest.iter().position(|&b| b == 0).ok_or_else(|| self.truncated(field, start))?;
        let raw = rest.get(..nul).unwrap_or_default();
        let text =
            std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8 { tag: self.tag, field, offset: start })?;
        let text = text.to_owned();
        // Cannot saturate: the NUL lies inside the buffer.
        self.pos = start.saturating_add(nul).saturating_add(1);
        Ok(text)
    }

    fn expect_new_tuple_marker(&mut self) -> Result<(), DecodeError> {
        let offset = self.pos;
        match self.u8("new tuple marker")? {
            b'N' => Ok(()),
            value => Err(self.invalid_byte("new tuple marker", offset, value)),
        }
    }

    /// Reads TupleData: an Int16 column count, then one kind byte and value per column.
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.u16("tuple column count")?;
        // Each column takes at least its kind byte; see `Decoder::relation`.
        let mut values = Vec::with_capacity(usize::from(count).min(self.remaining()));
        for _ in 0..count {
            let offset = self.pos;
            let value = match self.u8("tuple value kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => Value::Text(self.sized_bytes("tuple value length", "tuple text value")?),
                b'b' => Value::Binary(self.sized_bytes("tuple value length", "tuple binary value")?),
                kind => return Err(self.invalid_byte("tuple value kind", offset, kind)),
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { tag: self.tag, offset: self.pos, count }),
        }
    }
}

/// pgoutput sends `pg_catalog` as the empty string; every later stage sees the real name.
fn schema_name(sent: String) -> String {
    if sent.is_empty() { "pg_catalog".to_owned() } else { sent }
}

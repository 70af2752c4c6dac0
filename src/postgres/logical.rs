//! The logical replication stream: replication frames in, transaction events out.
//!
//! [`LogicalStream`] decodes the pgoutput message of each XLogData frame, keeps the table
//! definitions Relation messages announce, and holds the transaction rules that `walbust
//! run` and `walbust record` both follow:
//!
//! - a Begin opens a transaction, and none may already be open;
//! - a Commit closes the open transaction, and there must be one;
//! - a row change belongs to the open transaction and to a table a Relation message
//!   announced;
//! - a keepalive's position is safe to acknowledge only between transactions;
//! - a keepalive may ask for a status update at once;
//! - a server silent for longer than the read timeout is a dead link.
//!
//! It does no I/O: the caller reads frames from a
//! [`ReplicationStream`](super::ReplicationStream), hands each one in, and acts on the
//! [`Event`] it gets back. Every rule broken is a [`StreamError`] carrying the position
//! of the message that broke it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::stream::ReplicationFrame;
use crate::postgres::lsn::Lsn;
use crate::postgres::pgoutput::{
    Begin, Commit, DecodeError, Decoder, LogicalDecodingMessage, LogicalMessage, OldTuple, Relation, RelationCache,
    Truncate, Tuple,
};

/// A rule of the logical replication stream broken.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// A replication message could not be decoded.
    #[error("cannot decode the replication message at {lsn}")]
    Decode {
        /// Where the message starts.
        lsn: Lsn,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// A well-formed message that does not belong where it came.
    #[error("unexpected replication message at {lsn}: {what}")]
    Unexpected {
        /// Where the message starts.
        lsn: Lsn,
        /// What it was.
        what: String,
    },
    /// The server sent nothing for longer than the read timeout.
    #[error("no message from the server for {0:?}, although a reply was requested")]
    Silent(Duration),
}

/// The transaction between a Begin and its Commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenTransaction {
    /// Transaction id.
    pub xid: u32,
    /// Commit time from the Begin, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// A row change of the open transaction, with the table it changed.
#[derive(Debug)]
pub enum RowChange<'a> {
    /// A row was inserted.
    Insert {
        /// The table.
        relation: &'a Arc<Relation>,
        /// The new row.
        new: Tuple,
    },
    /// A row was updated.
    Update {
        /// The table.
        relation: &'a Arc<Relation>,
        /// The old row, when the stream carries it.
        old: Option<OldTuple>,
        /// The new row.
        new: Tuple,
    },
    /// A row was deleted.
    Delete {
        /// The table.
        relation: &'a Arc<Relation>,
        /// The old row's key columns, or all of it.
        old: OldTuple,
    },
    /// Tables were truncated.
    Truncate(Truncated<'a>),
}

/// The tables of one TRUNCATE, every one announced by a Relation message.
#[derive(Debug)]
pub struct Truncated<'a> {
    /// The message, with its options.
    pub truncate: Truncate,
    relations: &'a RelationCache,
}

impl<'a> Truncated<'a> {
    /// The truncated tables, in message order.
    pub fn relations(&self) -> impl Iterator<Item = &'a Arc<Relation>> + '_ {
        let relations = self.relations;
        self.truncate
            .relations
            .iter()
            .map(move |oid| relations.get(*oid).expect("every truncated table was checked to be announced"))
    }
}

/// What one frame brought.
#[derive(Debug)]
pub enum Event<'a> {
    /// A transaction began.
    Begin {
        /// Where the message starts.
        lsn: Lsn,
        /// The message.
        begin: Begin,
    },
    /// The open transaction committed; its end position may be acknowledged once
    /// everything it did is applied.
    Commit {
        /// Where the message starts.
        lsn: Lsn,
        /// The transaction id from its Begin.
        xid: u32,
        /// The message.
        commit: Commit,
    },
    /// A table's definition, first seen or changed by DDL.
    Relation {
        /// Where the message starts.
        lsn: Lsn,
        /// The definition, as cached.
        relation: &'a Arc<Relation>,
    },
    /// A row change of the open transaction `xid`.
    Change {
        /// Where the message starts.
        lsn: Lsn,
        /// The open transaction.
        xid: u32,
        /// What changed.
        change: RowChange<'a>,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    Message {
        /// Where the message starts.
        lsn: Lsn,
        /// The open transaction, if the message came inside one.
        xid: Option<u32>,
        /// The message.
        message: LogicalDecodingMessage,
    },
    /// A message with nothing to act on (Origin, Type).
    Other {
        /// Where the message starts.
        lsn: Lsn,
    },
    /// A primary keepalive.
    Keepalive {
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// `Some(wal_end)` between transactions, when everything before the position has
        /// arrived; `None` while a transaction is open.
        acknowledge: Option<Lsn>,
        /// The server wants a status update now.
        reply_requested: bool,
    },
}

/// The state of one logical replication session: the decoder, the tables announced, the
/// open transaction and when the server was last heard from.
#[derive(Debug)]
pub struct LogicalStream {
    decoder: Decoder,
    relations: RelationCache,
    open: Option<OpenTransaction>,
    last_received: Instant,
}

impl Default for LogicalStream {
    fn default() -> Self {
        LogicalStream::new()
    }
}

impl LogicalStream {
    /// A session just started: pgoutput protocol [`PGOUTPUT_VERSION`](super::PGOUTPUT_VERSION),
    /// no table known, no transaction open.
    pub fn new() -> Self {
        LogicalStream {
            decoder: Decoder::new(super::PGOUTPUT_VERSION),
            relations: RelationCache::new(),
            open: None,
            last_received: Instant::now(),
        }
    }

    /// Takes one frame of the stream.
    pub fn frame(&mut self, frame: ReplicationFrame) -> Result<Event<'_>, StreamError> {
        self.last_received = Instant::now();
        match frame {
            ReplicationFrame::XLogData { wal_start, data, .. } => self.message(wal_start, data),
            ReplicationFrame::Keepalive { wal_end, reply_requested, .. } => {
                Ok(Event::Keepalive { wal_end, acknowledge: self.open.is_none().then_some(wal_end), reply_requested })
            }
        }
    }

    /// Takes the pgoutput message of an XLogData frame starting at `lsn`.
    pub fn message(&mut self, lsn: Lsn, data: bytes::Bytes) -> Result<Event<'_>, StreamError> {
        let message = self.decoder.decode(data).map_err(|source| StreamError::Decode { lsn, source })?;
        let unexpected = |what: String| StreamError::Unexpected { lsn, what };
        Ok(match message {
            LogicalMessage::Begin(begin) => {
                if self.open.is_some() {
                    return Err(unexpected("Begin inside an open transaction".into()));
                }
                self.open = Some(OpenTransaction { xid: begin.xid, commit_time: begin.commit_time });
                Event::Begin { lsn, begin }
            }
            LogicalMessage::Commit(commit) => {
                let Some(open) = self.open.take() else { return Err(unexpected("Commit without Begin".into())) };
                Event::Commit { lsn, xid: open.xid, commit }
            }
            LogicalMessage::Relation(r) => {
                let oid = r.oid;
                self.relations.insert(r);
                let relation = self.relations.get(oid).expect("the relation was just cached");
                Event::Relation { lsn, relation }
            }
            LogicalMessage::Insert(i) => {
                let (xid, relation) = self.change_of(lsn, "insert", i.relation)?;
                Event::Change { lsn, xid, change: RowChange::Insert { relation, new: i.new } }
            }
            LogicalMessage::Update(u) => {
                let (xid, relation) = self.change_of(lsn, "update", u.relation)?;
                Event::Change { lsn, xid, change: RowChange::Update { relation, old: u.old, new: u.new } }
            }
            LogicalMessage::Delete(d) => {
                let (xid, relation) = self.change_of(lsn, "delete", d.relation)?;
                Event::Change { lsn, xid, change: RowChange::Delete { relation, old: d.old } }
            }
            LogicalMessage::Truncate(truncate) => {
                let mut xid = None;
                for oid in &truncate.relations {
                    xid = Some(self.change_of(lsn, "truncate", *oid)?.0);
                }
                // A TRUNCATE naming no table changes nothing, but still needs a transaction.
                let xid = match xid {
                    Some(xid) => xid,
                    None => self.in_transaction(lsn, "truncate")?,
                };
                Event::Change {
                    lsn,
                    xid,
                    change: RowChange::Truncate(Truncated { truncate, relations: &self.relations }),
                }
            }
            LogicalMessage::Message(message) => Event::Message { lsn, xid: self.open.map(|t| t.xid), message },
            LogicalMessage::Origin(_) | LogicalMessage::Type(_) => Event::Other { lsn },
            other => {
                // Neither streaming nor two-phase decoding is requested.
                return Err(unexpected(format!("{other:?}").chars().take(120).collect()));
            }
        })
    }

    /// The open transaction and the announced table `oid` a change of `op` needs.
    fn change_of(&self, lsn: Lsn, op: &str, oid: u32) -> Result<(u32, &Arc<Relation>), StreamError> {
        let Some(relation) = self.relations.get(oid) else {
            return Err(StreamError::Unexpected {
                lsn,
                what: format!("{op} for relation OID {oid}, which no Relation message announced"),
            });
        };
        Ok((self.in_transaction(lsn, op)?, relation))
    }

    fn in_transaction(&self, lsn: Lsn, op: &str) -> Result<u32, StreamError> {
        match self.open {
            Some(open) => Ok(open.xid),
            None => Err(StreamError::Unexpected { lsn, what: format!("{op} outside a transaction") }),
        }
    }

    /// The transaction between a Begin and its Commit, if one is open.
    pub fn open(&self) -> Option<OpenTransaction> {
        self.open
    }

    /// True while a Begin has arrived without its Commit.
    pub fn in_open_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// The tables announced so far, by OID.
    pub fn relations(&self) -> &RelationCache {
        &self.relations
    }

    /// How long the server has been silent; an error once that is longer than
    /// `read_timeout`. Called when a status update is due.
    pub fn silence(&self, read_timeout: Duration) -> Result<Duration, StreamError> {
        let silent = self.last_received.elapsed();
        if silent > read_timeout {
            return Err(StreamError::Silent(silent));
        }
        Ok(silent)
    }
}

/// pgoutput messages for tests.
#[cfg(test)]
pub(crate) mod messages {
    use bytes::{BufMut, Bytes, BytesMut};

    /// Begin of transaction `xid`.
    pub(crate) fn begin(xid: u32) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'B');
        b.put_u64(500);
        b.put_i64(0);
        b.put_u32(xid);
        b.freeze()
    }

    /// Commit ending at `end`.
    pub(crate) fn commit(end: u64) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'C');
        b.put_u8(0);
        b.put_u64(end - 10);
        b.put_u64(end);
        b.put_i64(0);
        b.freeze()
    }

    /// Relation `public.name` with one key column `id int4`.
    pub(crate) fn relation(oid: u32, name: &str) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(oid);
        b.put_slice(b"public\0");
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_u8(b'd');
        b.put_u16(1);
        b.put_u8(1);
        b.put_slice(b"id\0");
        b.put_u32(23);
        b.put_i32(-1);
        b.freeze()
    }

    /// Insert of `id = 1` into relation `oid`.
    pub(crate) fn insert(oid: u32) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(oid);
        b.put_u8(b'N');
        b.put_u16(1);
        b.put_u8(b't');
        b.put_u32(1);
        b.put_u8(b'1');
        b.freeze()
    }

    /// A `pg_logical_emit_message` with `prefix` and `body`.
    pub(crate) fn logical_message(transactional: bool, prefix: &str, body: &str) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'M');
        b.put_u8(u8::from(transactional));
        b.put_u64(100);
        b.put_slice(prefix.as_bytes());
        b.put_u8(0);
        b.put_u32(body.len() as u32);
        b.put_slice(body.as_bytes());
        b.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::messages::{begin, commit, insert, relation};
    use super::*;
    use bytes::{BufMut, Bytes, BytesMut};

    fn truncate(oids: &[u32]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'T');
        b.put_u32(oids.len() as u32);
        b.put_u8(Truncate::CASCADE);
        for oid in oids {
            b.put_u32(*oid);
        }
        b.freeze()
    }

    fn keepalive(end: u64, reply: bool) -> ReplicationFrame {
        ReplicationFrame::Keepalive { wal_end: Lsn(end), send_time: 0, reply_requested: reply }
    }

    fn unexpected(result: Result<Event<'_>, StreamError>) -> (Lsn, String) {
        match result {
            Err(StreamError::Unexpected { lsn, what }) => (lsn, what),
            other => panic!("expected an unexpected-message error, got {other:?}"),
        }
    }

    #[test]
    fn a_transaction_opens_at_begin_and_closes_at_commit() {
        let mut s = LogicalStream::new();
        assert!(
            matches!(s.message(Lsn(10), relation(5, "t")).unwrap(), Event::Relation { relation, .. } if relation.oid == 5)
        );
        assert!(matches!(s.message(Lsn(20), begin(7)).unwrap(), Event::Begin { begin, .. } if begin.xid == 7));
        assert_eq!(s.open(), Some(OpenTransaction { xid: 7, commit_time: 0 }));
        match s.message(Lsn(30), insert(5)).unwrap() {
            Event::Change { lsn, xid, change: RowChange::Insert { relation, new } } => {
                assert_eq!((lsn, xid, relation.oid, new.len()), (Lsn(30), 7, 5, 1));
            }
            other => panic!("{other:?}"),
        }
        match s.message(Lsn(40), commit(600)).unwrap() {
            Event::Commit { xid, commit, .. } => assert_eq!((xid, commit.end_lsn), (7, Lsn(600))),
            other => panic!("{other:?}"),
        }
        assert!(!s.in_open_transaction());
    }

    #[test]
    fn transaction_rules_are_errors_with_the_position() {
        let mut s = LogicalStream::new();
        assert_eq!(unexpected(s.message(Lsn(1), commit(600))), (Lsn(1), "Commit without Begin".into()));
        s.message(Lsn(2), relation(5, "t")).unwrap();
        assert_eq!(unexpected(s.message(Lsn(3), insert(5))), (Lsn(3), "insert outside a transaction".into()));
        assert_eq!(unexpected(s.message(Lsn(4), truncate(&[5]))), (Lsn(4), "truncate outside a transaction".into()));
        assert_eq!(unexpected(s.message(Lsn(4), truncate(&[]))), (Lsn(4), "truncate outside a transaction".into()));
        s.message(Lsn(5), begin(7)).unwrap();
        assert_eq!(unexpected(s.message(Lsn(6), begin(8))), (Lsn(6), "Begin inside an open transaction".into()));
        let (lsn, what) = unexpected(s.message(Lsn(7), insert(9)));
        assert_eq!((lsn, what.as_str()), (Lsn(7), "insert for relation OID 9, which no Relation message announced"));
        let (_, what) = unexpected(s.message(Lsn(8), truncate(&[5, 9])));
        assert!(what.starts_with("truncate for relation OID 9"), "{what}");
        let err = s.message(Lsn(9), Bytes::from_static(b"C\0")).unwrap_err();
        assert!(matches!(err, StreamError::Decode { lsn: Lsn(9), .. }), "{err:?}");
        assert_eq!(err.to_string(), "cannot decode the replication message at 0/9");
    }

    #[test]
    fn a_truncate_names_every_table() {
        let mut s = LogicalStream::new();
        for (lsn, data) in [(1, relation(5, "t")), (2, relation(6, "t")), (3, begin(7))] {
            s.message(Lsn(lsn), data).unwrap();
        }
        match s.message(Lsn(4), truncate(&[6, 5])).unwrap() {
            Event::Change { xid: 7, change: RowChange::Truncate(t), .. } => {
                assert!(t.truncate.cascade());
                assert_eq!(t.relations().map(|r| r.oid).collect::<Vec<_>>(), [6, 5]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_keepalive_is_acknowledgeable_only_between_transactions() {
        let mut s = LogicalStream::new();
        let ack = |e: Event<'_>| match e {
            Event::Keepalive { acknowledge, reply_requested, .. } => (acknowledge, reply_requested),
            other => panic!("{other:?}"),
        };
        assert_eq!(ack(s.frame(keepalive(100, false)).unwrap()), (Some(Lsn(100)), false));
        s.message(Lsn(200), begin(7)).unwrap();
        assert_eq!(ack(s.frame(keepalive(300, true)).unwrap()), (None, true));
        s.message(Lsn(400), commit(500)).unwrap();
        assert_eq!(ack(s.frame(keepalive(600, true)).unwrap()), (Some(Lsn(600)), true));
    }

    #[test]
    fn a_message_carries_the_open_transaction() {
        let mut s = LogicalStream::new();
        let message = |transactional: bool| {
            let mut b = BytesMut::new();
            b.put_u8(b'M');
            b.put_u8(u8::from(transactional));
            b.put_u64(100);
            b.put_slice(b"walbust\0");
            b.put_u32(2);
            b.put_slice(b"{}");
            b.freeze()
        };
        assert!(matches!(s.message(Lsn(1), message(false)).unwrap(), Event::Message { xid: None, .. }));
        s.message(Lsn(2), begin(7)).unwrap();
        assert!(matches!(s.message(Lsn(3), message(true)).unwrap(), Event::Message { xid: Some(7), .. }));
    }

    #[test]
    fn silence_past_the_read_timeout_is_an_error() {
        let mut s = LogicalStream::new();
        s.last_received = Instant::now() - Duration::from_secs(5);
        assert!(s.silence(Duration::from_secs(60)).unwrap() >= Duration::from_secs(5));
        let err = s.silence(Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, StreamError::Silent(d) if d >= Duration::from_secs(5)), "{err:?}");
        s.frame(keepalive(1, false)).unwrap();
        assert!(s.silence(Duration::from_secs(1)).is_ok(), "a frame resets the silence");
    }
}

//! The CopyBoth stream of `START_REPLICATION`: XLogData and primary keepalive
//! frames in, standby status updates out.
//!
//! Times on the wire are microseconds since 2000-01-01 00:00:00 UTC (the
//! Postgres epoch); [`now_pg_micros`] gives the client clock in that unit.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::SourceError;
use super::conn::{Backend, ReplicationConn, Wire, server_error};
use crate::postgres::lsn::Lsn;

/// Seconds from the Unix epoch to the Postgres epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_SECS: i64 = 946_684_800;

/// How long [`ReplicationStream::finish`] waits for the server to end the copy.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

const XLOG_DATA_HEADER: usize = 1 + 8 + 8 + 8;
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;

/// The client clock as microseconds since the Postgres epoch.
pub fn now_pg_micros() -> i64 {
    let since_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_unix.as_micros()).unwrap_or(i64::MAX) - PG_EPOCH_OFFSET_SECS * 1_000_000
}

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationFrame {
    /// `w`: a chunk of WAL data (for pgoutput, one pgoutput message).
    XLogData {
        /// Where the data starts in the WAL.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The server clock when sent, microseconds since 2000-01-01.
        send_time: i64,
        /// The payload, sharing the read buffer (no copy).
        data: Bytes,
    },
    /// `k`: a primary keepalive.
    Keepalive {
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The server clock when sent, microseconds since 2000-01-01.
        send_time: i64,
        /// The server wants a status update now (or it will time us out).
        reply_requested: bool,
    },
}

impl ReplicationConn {
    /// Sends `START_REPLICATION SLOT slot LOGICAL start (options)` and, once the
    /// server answers with CopyBothResponse, returns the replication stream.
    ///
    /// Option names are quoted as identifiers and values as literals, e.g.
    /// `&[("proto_version", "1"), ("publication_names", "p")]`.
    pub async fn start_replication(
        self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream, SourceError> {
        let (wire, pid) = self.start_copy_both(slot, start, options).await?;
        Ok(ReplicationStream::new(wire, pid))
    }
}

/// A replication connection in CopyBoth mode, from [`ReplicationConn::start_replication`].
pub struct ReplicationStream {
    wire: Wire,
    backend_pid: Option<i32>,
    /// The server sent CopyDone.
    server_done: bool,
    /// We sent CopyDone.
    client_done: bool,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("endpoint", &self.wire.endpoint)
            .field("server_done", &self.server_done)
            .field("client_done", &self.client_done)
            .finish_non_exhaustive()
    }
}

impl ReplicationStream {
    pub(crate) fn new(wire: Wire, backend_pid: Option<i32>) -> ReplicationStream {
        ReplicationStream { wire, backend_pid, server_done: false, client_done: false }
    }

    /// Next frame, or None when the server ended the copy (CopyDone) cleanly.
    /// Cancellation-safe: dropping the future loses no data.
    pub async fn next(&mut self) -> Result<Option<ReplicationFrame>, SourceError> {
        if self.server_done {
            return Ok(None);
        }
        match self.wire.read_message("while streaming").await? {
            Backend::Msg(Message::CopyData(body)) => {
                decode_frame(body.into_bytes()).map(Some).map_err(|what| self.wire.protocol(&what, None))
            }
            Backend::Msg(Message::CopyDone) => {
                tracing::info!(server = %self.wire.endpoint, "server ended the replication stream");
                self.server_done = true;
                Ok(None)
            }
            // A walsender that shuts down (server stop or restart) ends the copy with a bare
            // CommandComplete once the client has confirmed everything it sent.
            Backend::Msg(Message::CommandComplete(_)) => {
                tracing::info!(server = %self.wire.endpoint, "server ended the replication stream (shutting down)");
                self.server_done = true;
                Ok(None)
            }
            Backend::Msg(Message::ErrorResponse(body)) => Err(server_error(&self.wire, &body)),
            other => Err(self.wire.unexpected(&other, "in the replication stream")),
        }
    }

    /// True when a whole frame is already buffered (so the caller can tell the
    /// stream is idle when false).
    pub fn has_buffered_frame(&self) -> bool {
        self.wire.has_complete_message()
    }

    /// True when the last read took everything the socket held, so whatever the server
    /// sends next has not arrived yet.
    pub fn caught_up(&self) -> bool {
        self.wire.drained()
    }

    /// Standby status update `r`: written, flushed, applied LSN, client clock
    /// now, reply-request flag. If cancelled, the update is still queued
    /// whole and goes out with the next write.
    pub async fn send_status(&mut self, write: Lsn, flush: Lsn, apply: Lsn, reply: bool) -> Result<(), SourceError> {
        if self.client_done {
            return Err(self.wire.protocol("cannot send a status update after finishing the stream", None));
        }
        let payload = status_update(write, flush, apply, now_pg_micros(), reply);
        frontend::CopyData::new(&payload[..])
            .map_err(|e| self.wire.protocol("could not frame a status update", Some(e)))?
            .write(&mut self.wire.wbuf);
        self.wire.flush().await
    }

    /// CopyDone, drain until CommandComplete/ReadyForQuery (bounded by a short
    /// timeout), Terminate.
    pub async fn finish(self) -> Result<(), SourceError> {
        self.finish_within(FINISH_TIMEOUT).await
    }

    /// [`ReplicationStream::finish`] with an explicit limit for the drain.
    pub async fn finish_within(mut self, limit: Duration) -> Result<(), SourceError> {
        let endpoint = self.wire.endpoint.clone();
        let drained = tokio::time::timeout(limit, self.drain()).await;
        self.wire.terminate().await;
        match drained {
            Ok(Ok(())) => {
                tracing::debug!(server = %endpoint, "replication stream finished");
                Ok(())
            }
            // The server hanging up after our CopyDone is a finished stream too.
            Ok(Err(SourceError::Closed { .. })) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SourceError::Timeout {
                what: "waiting for the end of the replication stream from",
                host: endpoint,
                after: limit,
                hint: "the connection was closed anyway",
            }),
        }
    }

    async fn drain(&mut self) -> Result<(), SourceError> {
        if !self.client_done {
            frontend::copy_done(&mut self.wire.wbuf);
            self.client_done = true;
        }
        self.wire.flush().await?;
        let mut error = None;
        loop {
            match self.wire.read_message("while finishing the stream").await? {
                // WAL sent before the server saw our CopyDone, and its own CopyDone.
                Backend::Msg(Message::CopyData(_) | Message::CopyDone) => {}
                Backend::Msg(Message::CommandComplete(_)) => {}
                Backend::Msg(Message::ErrorResponse(body)) => {
                    error.get_or_insert_with(|| server_error(&self.wire, &body));
                }
                Backend::Msg(Message::ReadyForQuery(_)) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                }
                other => return Err(self.wire.unexpected(&other, "while finishing the stream")),
            }
        }
    }

    /// A server parameter reported by ParameterStatus.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.wire.params.get(name).map(String::as_str)
    }

    /// The walsender's process id (the `active_pid` of the slot).
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    /// The server as `host:port` or the Unix socket path.
    pub fn endpoint(&self) -> &str {
        &self.wire.endpoint
    }
}

/// The 34-byte payload of a standby status update.
fn status_update(write: Lsn, flush: Lsn, apply: Lsn, now: i64, reply: bool) -> [u8; 34] {
    let mut p = [0u8; 34];
    p[0] = b'r';
    p[1..9].copy_from_slice(&write.0.to_be_bytes());
    p[9..17].copy_from_slice(&flush.0.to_be_bytes());
    p[17..25].copy_from_slice(&apply.0.to_be_bytes());
    p[25..33].copy_from_slice(&now.to_be_bytes());
    p[33] = u8::from(reply);
    p
}

/// Decodes one CopyData payload; the error is a description for
/// [`SourceError::Protocol`].
pub(crate) fn decode_frame(mut payload: Bytes) -> Result<ReplicationFrame, String> {
    let Some(&tag) = payload.first() else {
        return Err("empty CopyData message in the replication stream".into());
    };
    match tag {
        b'w' => {
            if payload.len() < XLOG_DATA_HEADER {
                return Err(format!(
                    "XLogData message cut short: {} bytes, the header alone needs {XLOG_DATA_HEADER}",
                    payload.len()
                ));
            }
            payload.advance(1);
            let wal_start = Lsn(payload.get_u64());
            let wal_end = Lsn(payload.get_u64());
            let send_time = payload.get_i64();
            Ok(ReplicationFrame::XLogData { wal_start, wal_end, send_time, data: payload })
        }
        b'k' => {
            if payload.len() < KEEPALIVE_LEN {
                return Err(format!(
                    "primary keepalive message cut short: {} bytes, expected {KEEPALIVE_LEN}",
                    payload.len()
                ));
            }
            payload.advance(1);
            let wal_end = Lsn(payload.get_u64());
            let send_time = payload.get_i64();
            let reply_requested = payload.get_u8() != 0;
            Ok(ReplicationFrame::Keepalive { wal_end, send_time, reply_requested })
        }
        other => Err(format!("unknown replication message `{}` in CopyData", char::from(other).escape_default())),
    }
}

/// The payload of an XLogData frame (`w`) carrying `data`, as the server sends it.
#[cfg(test)]
pub(crate) fn xlog(start: u64, end: u64, time: i64, data: &[u8]) -> Vec<u8> {
    let mut p = vec![b'w'];
    p.extend_from_slice(&start.to_be_bytes());
    p.extend_from_slice(&end.to_be_bytes());
    p.extend_from_slice(&time.to_be_bytes());
    p.extend_from_slice(data);
    p
}

/// A stream over an in-memory pipe, and the pipe's server end to play the server on.
#[cfg(test)]
pub(crate) fn in_memory() -> (ReplicationStream, tokio::io::DuplexStream) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let wire = Wire::new(super::conn::Transport::Mem(client), "test:1".into());
    (ReplicationStream::new(wire, None), server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::conn::backend_message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn keepalive(end: u64, time: i64, reply: bool) -> Vec<u8> {
        let mut p = vec![b'k'];
        p.extend_from_slice(&end.to_be_bytes());
        p.extend_from_slice(&time.to_be_bytes());
        p.push(u8::from(reply));
        p
    }

    fn copy_data(payload: &[u8]) -> Bytes {
        backend_message(b'd', payload)
    }

    #[test]
    fn decodes_xlog_data_without_copying() {
        let payload = Bytes::from(xlog(0x1_0000_0010, 0x1_0000_0100, 12345, b"BEGIN"));
        let data_ptr = payload[XLOG_DATA_HEADER..].as_ptr();
        match decode_frame(payload).unwrap() {
            ReplicationFrame::XLogData { wal_start, wal_end, send_time, data } => {
                assert_eq!(wal_start, Lsn(0x1_0000_0010));
                assert_eq!(wal_end, Lsn(0x1_0000_0100));
                assert_eq!(send_time, 12345);
                assert_eq!(&data[..], b"BEGIN");
                assert_eq!(data.as_ptr(), data_ptr);
            }
            other => panic!("{other:?}"),
        }
        // An empty WAL chunk is legal.
        assert!(matches!(
            decode_frame(Bytes::from(xlog(1, 2, 3, b""))).unwrap(),
            ReplicationFrame::XLogData { data, .. } if data.is_empty()
        ));
    }

    #[test]
    fn decodes_keepalive() {
        assert_eq!(
            decode_frame(Bytes::from(keepalive(0xABCD, -7, true))).unwrap(),
            ReplicationFrame::Keepalive { wal_end: Lsn(0xABCD), send_time: -7, reply_requested: true }
        );
        assert!(matches!(
            decode_frame(Bytes::from(keepalive(1, 1, false))).unwrap(),
            ReplicationFrame::Keepalive { reply_requested: false, .. }
        ));
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        assert!(decode_frame(Bytes::new()).unwrap_err().contains("empty"));
        for cut in 0..XLOG_DATA_HEADER {
            let p = xlog(1, 2, 3, b"")[..cut].to_vec();
            assert!(decode_frame(Bytes::from(p)).is_err(), "w cut at {cut}");
        }
        for cut in 1..KEEPALIVE_LEN {
            let p = keepalive(1, 2, true)[..cut].to_vec();
            let err = decode_frame(Bytes::from(p)).unwrap_err();
            assert!(err.contains("cut short"), "{err}");
        }
        let err = decode_frame(Bytes::from_static(b"zzzz")).unwrap_err();
        assert_eq!(err, "unknown replication message `z` in CopyData");
    }

    #[test]
    fn status_update_layout() {
        let p = status_update(Lsn(1), Lsn(2), Lsn(3), 4, true);
        assert_eq!(p[0], b'r');
        assert_eq!(u64::from_be_bytes(p[1..9].try_into().unwrap()), 1);
        assert_eq!(u64::from_be_bytes(p[9..17].try_into().unwrap()), 2);
        assert_eq!(u64::from_be_bytes(p[17..25].try_into().unwrap()), 3);
        assert_eq!(i64::from_be_bytes(p[25..33].try_into().unwrap()), 4);
        assert_eq!(p[33], 1);
    }

    #[test]
    fn pg_clock_is_near_now() {
        // 2024-01-01 is 757_382_400 s after the Postgres epoch.
        assert!(now_pg_micros() > 757_382_400 * 1_000_000);
    }

    #[tokio::test]
    async fn frames_split_across_reads_and_cancellation() {
        let (mut s, mut server) = in_memory();
        let mut bytes = copy_data(&xlog(10, 20, 30, b"hello")).to_vec();
        bytes.extend_from_slice(&copy_data(&keepalive(20, 31, false)));
        assert!(!s.has_buffered_frame());

        // Half a frame, then a cancelled next(): nothing may be lost.
        server.write_all(&bytes[..7]).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(50), s.next()).await;
        assert!(waited.is_err(), "no frame should be complete yet");
        assert!(!s.has_buffered_frame());
        for b in &bytes[7..] {
            server.write_all(&[*b]).await.unwrap();
        }
        match s.next().await.unwrap().unwrap() {
            ReplicationFrame::XLogData { data, wal_start, .. } => {
                assert_eq!(&data[..], b"hello");
                assert_eq!(wal_start, Lsn(10));
            }
            other => panic!("{other:?}"),
        }
        // The keepalive arrived in the same reads.
        assert!(s.has_buffered_frame());
        assert!(matches!(s.next().await.unwrap().unwrap(), ReplicationFrame::Keepalive { wal_end: Lsn(20), .. }));
        assert!(!s.has_buffered_frame());
    }

    #[tokio::test]
    async fn a_huge_message_does_not_keep_its_memory_in_the_read_buffer() {
        let (mut s, mut server) = in_memory();
        let huge = copy_data(&xlog(10, 20, 30, &vec![b'x'; 8 << 20]));
        let writer = tokio::spawn(async move {
            server.write_all(&huge).await.unwrap();
            server.write_all(&copy_data(&keepalive(20, 31, false))).await.unwrap();
            server
        });
        let ReplicationFrame::XLogData { data, .. } = s.next().await.unwrap().unwrap() else { panic!("not data") };
        assert_eq!(data.len(), 8 << 20);
        drop(data);
        let mut server = writer.await.unwrap();
        assert!(matches!(s.next().await.unwrap().unwrap(), ReplicationFrame::Keepalive { .. }));
        server.write_all(&copy_data(&keepalive(21, 32, false))).await.unwrap();
        assert!(matches!(s.next().await.unwrap().unwrap(), ReplicationFrame::Keepalive { .. }));
        assert!(s.wire.read_capacity() < 1 << 20, "read buffer kept {} bytes", s.wire.read_capacity());
    }

    #[tokio::test]
    async fn notices_and_parameters_are_skipped() {
        let (mut s, mut server) = in_memory();
        let mut bytes = backend_message(b'N', b"SNOTICE\0Mhi\0\0").to_vec();
        bytes.extend_from_slice(&backend_message(b'S', b"application_name\0x\0"));
        bytes.extend_from_slice(&copy_data(&keepalive(5, 6, true)));
        server.write_all(&bytes).await.unwrap();
        assert!(matches!(s.next().await.unwrap().unwrap(), ReplicationFrame::Keepalive { reply_requested: true, .. }));
        assert_eq!(s.parameter("application_name"), Some("x"));
    }

    #[tokio::test]
    async fn error_response_mid_stream() {
        let (mut s, mut server) = in_memory();
        server
            .write_all(&backend_message(
                b'E',
                b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0",
            ))
            .await
            .unwrap();
        let err = s.next().await.unwrap_err();
        assert_eq!(err.code(), Some("57P01"));
        assert!(err.is_transient());
    }

    #[tokio::test]
    async fn malformed_frame_and_unexpected_message() {
        let (mut s, mut server) = in_memory();
        server.write_all(&copy_data(b"w\0\0")).await.unwrap();
        let err = s.next().await.unwrap_err();
        assert!(matches!(&err, SourceError::Protocol { what, .. } if what.contains("cut short")), "{err:?}");

        let (mut s, mut server) = in_memory();
        server.write_all(&backend_message(b'Z', b"I")).await.unwrap();
        let err = s.next().await.unwrap_err();
        assert!(matches!(err, SourceError::Protocol { .. }), "{err:?}");

        let (mut s, mut server) = in_memory();
        server.write_all(b"d\x7f\xff\xff\xff").await.unwrap();
        let err = s.next().await.unwrap_err();
        assert!(err.to_string().contains("more than the protocol allows"), "{err}");
    }

    #[tokio::test]
    async fn closed_connection() {
        let (mut s, server) = in_memory();
        drop(server);
        let err = s.next().await.unwrap_err();
        assert!(matches!(err, SourceError::Closed { .. }), "{err:?}");
        assert!(err.is_transient());
    }

    #[tokio::test]
    async fn copy_done_ends_the_stream_and_finish_drains() {
        let (mut s, mut server) = in_memory();
        let mut bytes = copy_data(&keepalive(1, 1, false)).to_vec();
        bytes.extend_from_slice(&backend_message(b'c', b""));
        server.write_all(&bytes).await.unwrap();
        assert!(s.next().await.unwrap().is_some());
        assert_eq!(s.next().await.unwrap(), None);
        assert_eq!(s.next().await.unwrap(), None);

        let server_task = tokio::spawn(async move {
            let mut got = vec![0u8; 5];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, b"c\0\0\0\x04");
            let mut out = backend_message(b'C', b"COPY 0\0").to_vec();
            out.extend_from_slice(&backend_message(b'Z', b"I"));
            server.write_all(&out).await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"X\0\0\0\x04");
        });
        s.finish().await.unwrap();
        server_task.await.unwrap();
    }

    #[tokio::test]
    async fn send_status_writes_copy_data() {
        let (mut s, mut server) = in_memory();
        s.send_status(Lsn(0x10), Lsn(0x20), Lsn(0x30), true).await.unwrap();
        let mut got = [0u8; 39];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got[0], b'd');
        assert_eq!(i32::from_be_bytes(got[1..5].try_into().unwrap()), 38);
        assert_eq!(got[5], b'r');
        assert_eq!(u64::from_be_bytes(got[6..14].try_into().unwrap()), 0x10);
        assert_eq!(u64::from_be_bytes(got[14..22].try_into().unwrap()), 0x20);
        assert_eq!(u64::from_be_bytes(got[22..30].try_into().unwrap()), 0x30);
        let clock = i64::from_be_bytes(got[30..38].try_into().unwrap());
        assert!((clock - now_pg_micros()).abs() < 10_000_000);
        assert_eq!(got[38], 1);
    }

    #[tokio::test]
    async fn finish_times_out_on_a_silent_server() {
        let (s, _server) = in_memory();
        let err = s.finish_within(Duration::from_millis(50)).await.unwrap_err();
        assert!(matches!(err, SourceError::Timeout { .. }), "{err:?}");
    }
}

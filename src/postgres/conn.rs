//! A Postgres connection spoken by hand with `postgres_protocol`, for
//! replication: connect (TCP or Unix socket, TLS negotiation, authentication),
//! simple queries, and the switch to CopyBoth with `START_REPLICATION`.
//!
//! All reads go through one `BytesMut` buffer with `read_buf`, and a message is
//! parsed only once it is fully buffered, so every await point that reads is
//! cancellation-safe. NoticeResponse (logged at info) and ParameterStatus
//! (remembered, see [`ReplicationConn::parameter`]) are handled wherever they
//! arrive.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{ErrorFields, ErrorResponseBody, Header, Message};
use postgres_protocol::message::frontend;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::fallible_iterator::FallibleIterator;

use super::conninfo::{ConnInfo, SessionState, SslMode, TargetSessionAttrs, is_unix_host, socket_path};
use super::quote::{quote_ident, quote_literal};
use super::tls;
use super::{SESSION_SETTINGS, SourceError};
use crate::postgres::lsn::Lsn;

/// The default limit for one simple query (and for `START_REPLICATION` to answer).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest backend message accepted (Postgres' own limit is 1 GiB of data).
const MAX_MESSAGE_LEN: usize = (1 << 30) + 1024;

/// How much buffer space to make available before each read.
const READ_RESERVE: usize = 64 * 1024;

/// A message larger than this leaves the read buffer replaced by one of the usual size.
const SHRINK_AFTER: usize = 1 << 20;

/// The CopyBothResponse tag, which `postgres_protocol` does not parse.
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// How a [`ReplicationConn`] is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Open a logical replication connection (`replication=database`), which
    /// accepts replication commands as well as SQL.
    pub replication: bool,
    /// Limit for each [`ReplicationConn::simple_query`] and for the answer to
    /// `START_REPLICATION`.
    pub read_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions { replication: false, read_timeout: DEFAULT_READ_TIMEOUT }
    }
}

/// The byte stream under a connection.
pub(crate) enum Transport {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Unix(UnixStream),
    #[cfg(test)]
    Mem(tokio::io::DuplexStream),
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(test)]
            Transport::Mem(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Unix(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(test)]
            Transport::Mem(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s).poll_flush(cx),
            Transport::Unix(s) => Pin::new(s).poll_flush(cx),
            #[cfg(test)]
            Transport::Mem(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Unix(s) => Pin::new(s).poll_shutdown(cx),
            #[cfg(test)]
            Transport::Mem(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A backend message, including the one `postgres_protocol` cannot parse.
pub(crate) enum Backend {
    Msg(Message),
    CopyBothResponse,
}

/// Buffered message I/O, shared by [`ReplicationConn`] and the replication stream.
pub(crate) struct Wire {
    transport: Transport,
    rbuf: BytesMut,
    pub(crate) wbuf: BytesMut,
    /// `host:port` or the socket path, for messages.
    pub(crate) endpoint: String,
    pub(crate) params: HashMap<String, String>,
    /// The last read took less than it had room for: the socket held nothing more then.
    drained: bool,
    /// A message larger than [`SHRINK_AFTER`] went through the read buffer, which has grown
    /// to hold it: the next read starts a buffer of the usual size.
    grown: bool,
}

impl Wire {
    pub(crate) fn new(transport: Transport, endpoint: String) -> Wire {
        Wire {
            transport,
            rbuf: BytesMut::with_capacity(READ_RESERVE),
            wbuf: BytesMut::new(),
            endpoint,
            params: HashMap::new(),
            drained: false,
            grown: false,
        }
    }

    /// Whether a complete message sits in the read buffer.
    pub(crate) fn has_complete_message(&self) -> bool {
        match Header::parse(&self.rbuf) {
            Ok(Some(h)) => self.rbuf.len() > h.len() as usize,
            // A malformed header is "something to report", so not idle.
            Err(_) => true,
            Ok(None) => false,
        }
    }

    /// The read buffer's room, for tests of its size.
    #[cfg(test)]
    pub(crate) fn read_capacity(&self) -> usize {
        self.rbuf.capacity()
    }

    /// True when the last read emptied the socket: the server had sent nothing more by then.
    pub(crate) fn drained(&self) -> bool {
        self.drained
    }

    /// Takes one complete message off the read buffer, if there is one.
    fn parse_buffered(&mut self) -> Result<Option<Backend>, SourceError> {
        let header = match Header::parse(&self.rbuf) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(None),
            Err(e) => return Err(self.protocol("invalid message header", Some(e))),
        };
        let total = header.len() as usize + 1;
        if total > MAX_MESSAGE_LEN {
            return Err(self.protocol(
                &format!(
                    "message `{}` claims {} bytes, more than the protocol allows",
                    char::from(header.tag()),
                    header.len()
                ),
                None,
            ));
        }
        if self.rbuf.len() < total {
            return Ok(None);
        }
        self.grown |= total > SHRINK_AFTER;
        if header.tag() == COPY_BOTH_RESPONSE_TAG {
            let _ = self.rbuf.split_to(total);
            return Ok(Some(Backend::CopyBothResponse));
        }
        match Message::parse(&mut self.rbuf) {
            Ok(Some(m)) => Ok(Some(Backend::Msg(m))),
            Ok(None) => Ok(None),
            Err(e) => Err(self.protocol(&format!("malformed `{}` message", char::from(header.tag())), Some(e))),
        }
    }

    /// The next message other than NoticeResponse and ParameterStatus, which
    /// are handled here. Cancellation-safe.
    pub(crate) async fn read_message(&mut self, during: &'static str) -> Result<Backend, SourceError> {
        loop {
            while let Some(m) = self.parse_buffered()? {
                match m {
                    Backend::Msg(Message::ParameterStatus(body)) => {
                        let (Ok(name), Ok(value)) = (body.name(), body.value()) else {
                            return Err(self.protocol("ParameterStatus is not valid utf-8", None));
                        };
                        tracing::debug!(parameter = name, value, "server parameter");
                        self.params.insert(name.to_string(), value.to_string());
                    }
                    Backend::Msg(Message::NoticeResponse(body)) => {
                        log_notice(&self.endpoint, body.fields());
                    }
                    Backend::Msg(Message::NotificationResponse(body)) => {
                        tracing::debug!(
                            server = %self.endpoint,
                            channel = body.channel().unwrap_or("?"),
                            "ignoring a NOTIFY"
                        );
                    }
                    other => return Ok(other),
                }
            }
            if self.grown {
                // Otherwise one row with a huge value keeps its memory for the life of the
                // connection: the buffer would reuse its allocation rather than free it.
                let mut fresh = BytesMut::with_capacity(READ_RESERVE.max(self.rbuf.len()));
                fresh.extend_from_slice(&self.rbuf);
                self.rbuf = fresh;
                self.grown = false;
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_RESERVE / 4 {
                self.rbuf.reserve(READ_RESERVE);
            }
            let room = self.rbuf.capacity() - self.rbuf.len();
            match self.transport.read_buf(&mut self.rbuf).await {
                Ok(0) => return Err(self.closed(during)),
                Ok(n) => self.drained = n < room,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(self.closed(during));
                }
                Err(e) => return Err(self.io("could not read from server at", e)),
            }
        }
    }

    /// Writes everything queued in the write buffer, then flushes. If this is
    /// cancelled the unwritten rest stays queued and goes out with the next flush.
    pub(crate) async fn flush(&mut self) -> Result<(), SourceError> {
        while !self.wbuf.is_empty() {
            match self.transport.write_buf(&mut self.wbuf).await {
                Ok(0) => return Err(self.closed("while writing")),
                Ok(_) => {}
                Err(e) => return Err(self.io("could not write to server at", e)),
            }
        }
        self.transport.flush().await.map_err(|e| self.io("could not write to server at", e))
    }

    /// Sends Terminate and shuts the transport down, ignoring errors (the
    /// connection is going away either way).
    pub(crate) async fn terminate(&mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.transport.shutdown().await;
    }

    pub(crate) fn protocol(&self, what: &str, source: Option<io::Error>) -> SourceError {
        SourceError::Protocol { what: what.to_string(), host: self.endpoint.clone(), source }
    }

    pub(crate) fn closed(&self, during: &'static str) -> SourceError {
        SourceError::Closed { host: self.endpoint.clone(), during }
    }

    fn io(&self, action: &'static str, source: io::Error) -> SourceError {
        SourceError::Io { action, host: self.endpoint.clone(), source }
    }

    pub(crate) fn unexpected(&self, m: &Backend, during: &str) -> SourceError {
        let tag = match m {
            Backend::CopyBothResponse => "CopyBothResponse",
            Backend::Msg(m) => message_name(m),
        };
        self.protocol(&format!("unexpected {tag} {during}"), None)
    }
}

fn message_name(m: &Message) -> &'static str {
    match m {
        Message::AuthenticationOk => "AuthenticationOk",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::EmptyQueryResponse => "EmptyQueryResponse",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::NotificationResponse(_) => "NotificationResponse",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::RowDescription(_) => "RowDescription",
        _ => "message",
    }
}

/// The fields of an ErrorResponse or NoticeResponse.
#[derive(Default)]
struct ErrorParts {
    severity: Option<String>,
    localized_severity: Option<String>,
    code: Option<String>,
    message: Option<String>,
    detail: Option<String>,
    hint: Option<String>,
}

fn error_parts(mut fields: ErrorFields<'_>) -> io::Result<ErrorParts> {
    let mut parts = ErrorParts::default();
    while let Some(field) = fields.next()? {
        let value = Some(String::from_utf8_lossy(field.value_bytes()).into_owned());
        match field.type_() {
            b'V' => parts.severity = value,
            b'S' => parts.localized_severity = value,
            b'C' => parts.code = value,
            b'M' => parts.message = value,
            b'D' => parts.detail = value,
            b'H' => parts.hint = value,
            _ => {}
        }
    }
    Ok(parts)
}

/// Turns an ErrorResponse into [`SourceError::Server`].
pub(crate) fn server_error(wire: &Wire, body: &ErrorResponseBody) -> SourceError {
    match error_parts(body.fields()) {
        Ok(p) => {
            let code = p.code.unwrap_or_else(|| "XX000".to_string());
            let message = p.message.unwrap_or_default();
            // Postgres 15 says only "must be superuser or replication role to start walsender".
            let hint = p.hint.or_else(|| {
                (code == "42501" && (message.contains("walsender") || message.contains("WAL sender"))).then(|| {
                    "give the role walbust logs in as the REPLICATION attribute: ALTER ROLE name REPLICATION;"
                        .to_string()
                })
            });
            SourceError::Server {
                severity: p.severity.or(p.localized_severity).unwrap_or_else(|| "ERROR".to_string()),
                code,
                message,
                detail: p.detail,
                hint,
            }
        }
        Err(e) => wire.protocol("malformed ErrorResponse", Some(e)),
    }
}

fn log_notice(endpoint: &str, fields: ErrorFields<'_>) {
    match error_parts(fields) {
        Ok(p) => tracing::info!(
            server = endpoint,
            severity = p.severity.or(p.localized_severity).as_deref().unwrap_or("NOTICE"),
            code = p.code.as_deref().unwrap_or(""),
            detail = p.detail.as_deref(),
            hint = p.hint.as_deref(),
            "postgres notice: {}",
            p.message.as_deref().unwrap_or("")
        ),
        Err(_) => tracing::info!(server = endpoint, "postgres sent a malformed notice"),
    }
}

/// One row of a simple query result, all values as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimpleRow {
    columns: Arc<[String]>,
    values: Vec<Option<String>>,
}

impl SimpleRow {
    /// The value of the named column; `None` if the column is missing or NULL.
    pub fn get(&self, name: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == name)?;
        self.get_idx(i)
    }

    /// The value of the `i`th column; `None` if out of range or NULL.
    pub fn get_idx(&self, i: usize) -> Option<&str> {
        self.values.get(i)?.as_deref()
    }

    /// The column names, in order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The number of columns.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the row has no columns.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// How TLS is attempted on one TCP connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TlsAttempt {
    /// No SSLRequest.
    Off,
    /// SSLRequest; a plain connection if the server declines.
    Try,
    /// SSLRequest; an error if the server declines.
    Require,
}

/// A hand-rolled Postgres connection, usually a replication connection.
pub struct ReplicationConn {
    wire: Wire,
    options: ConnectOptions,
    backend_key: Option<(i32, i32)>,
    tls: bool,
    auth_method: &'static str,
    /// A query was sent and its ReadyForQuery has not been read: the
    /// connection is out of step (after a timeout, cancellation or protocol error).
    in_query: bool,
}

impl std::fmt::Debug for ReplicationConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConn")
            .field("endpoint", &self.wire.endpoint)
            .field("tls", &self.tls)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl ReplicationConn {
    /// Connects to the first host of `info` that accepts, as a logical
    /// replication connection when `replication` (with the default read timeout).
    pub async fn connect(info: &ConnInfo, replication: bool) -> Result<Self, SourceError> {
        Self::connect_with(info, ConnectOptions { replication, ..ConnectOptions::default() }).await
    }

    /// Connects with explicit [`ConnectOptions`]. Hosts are tried in order, and the
    /// first whose server suits `target_session_attrs` is kept (a standby first on every
    /// host, for `prefer-standby`); otherwise the last host's error is returned. Each host's
    /// attempt (connect, TLS, authentication) is bounded by `info.connect_timeout`.
    pub async fn connect_with(info: &ConnInfo, options: ConnectOptions) -> Result<Self, SourceError> {
        let mut tls_config = None;
        let mut last_error = None;
        let passes = info.target_session_attrs.passes();
        for (pass, &wanted) in passes.iter().enumerate() {
            let last_pass = pass + 1 == passes.len();
            for (host, port) in info.targets() {
                let endpoint = info.endpoint(host, port);
                match Self::connect_one(info, host, port, &endpoint, options, &mut tls_config).await {
                    Ok(mut conn) => {
                        if wanted == TargetSessionAttrs::Any {
                            return Ok(conn);
                        }
                        let state = match conn.session_state().await {
                            Ok(state) => state,
                            Err(e) => {
                                last_error = Some(e);
                                continue;
                            }
                        };
                        if wanted.accepts(state) {
                            return Ok(conn);
                        }
                        conn.close().await;
                        if let Some(e) = super::passed_over(info, endpoint, state, last_pass) {
                            last_error = Some(e);
                        }
                    }
                    Err(e) => {
                        if info.hosts.len() > 1 {
                            tracing::warn!(server = %endpoint, error = %e, "could not connect; trying the next host");
                        }
                        last_error = Some(e);
                    }
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            SourceError::ConnInfo(super::ConnInfoError::Syntax("no host to connect to; set host".into()))
        }))
    }

    /// Whether the server is a standby and whether it takes writes: from the
    /// `in_hot_standby` and `default_transaction_read_only` parameters servers from
    /// PostgreSQL 14 report at start-up, else by asking.
    pub async fn session_state(&mut self) -> Result<SessionState, SourceError> {
        let on = |v: &str| v == "on";
        if let (Some(standby), Some(read_only)) =
            (self.parameter("in_hot_standby"), self.parameter("default_transaction_read_only"))
        {
            return Ok(SessionState { in_recovery: on(standby), read_only: on(standby) || on(read_only) });
        }
        let rows = self
            .simple_query(
                "SELECT pg_is_in_recovery()::text AS standby, current_setting('default_transaction_read_only') AS ro",
            )
            .await?;
        let row = rows.first();
        let standby = row.and_then(|r| r.get("standby")) == Some("true");
        let read_only = row.and_then(|r| r.get("ro")).is_some_and(on);
        Ok(SessionState { in_recovery: standby, read_only: standby || read_only })
    }

    /// One host's attempt, bounded by `info.connect_timeout`.
    async fn connect_one(
        info: &ConnInfo,
        host: &str,
        port: u16,
        endpoint: &str,
        options: ConnectOptions,
        tls_config: &mut Option<Arc<ClientConfig>>,
    ) -> Result<Self, SourceError> {
        let attempt = connect_host(info, host, port, endpoint, options, tls_config);
        let result = if info.connect_timeout.is_zero() {
            attempt.await
        } else {
            match tokio::time::timeout(info.connect_timeout, attempt).await {
                Ok(r) => r,
                Err(_) => Err(SourceError::Timeout {
                    what: "connecting to",
                    host: endpoint.to_string(),
                    after: info.connect_timeout,
                    hint: "check that the server is up and reachable, or raise connect_timeout",
                }),
            }
        };
        if let Ok(conn) = &result {
            tracing::debug!(server = %endpoint, tls = conn.tls, replication = options.replication, "connected to postgres");
        }
        result
    }

    /// Runs `sql` with the simple query protocol and returns all rows as text.
    ///
    /// An ErrorResponse becomes [`SourceError::Server`] after reading on to
    /// ReadyForQuery, so the connection stays usable. Bounded by the read
    /// timeout; after a timeout or cancellation the connection is out of step
    /// and further queries fail: reconnect.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<SimpleRow>, SourceError> {
        let limit = self.options.read_timeout;
        match tokio::time::timeout(limit, self.simple_query_inner(sql)).await {
            Ok(r) => r,
            Err(_) => Err(SourceError::Timeout {
                what: "waiting for a query result from",
                host: self.wire.endpoint.clone(),
                after: limit,
                hint: "the server or network is slow or stuck; reconnect and retry",
            }),
        }
    }

    async fn simple_query_inner(&mut self, sql: &str) -> Result<Vec<SimpleRow>, SourceError> {
        self.send_query(sql).await?;
        let mut rows = Vec::new();
        let mut columns: Option<Arc<[String]>> = None;
        let mut error = None;
        loop {
            let m = self.wire.read_message("while running a query").await?;
            match m {
                Backend::Msg(Message::RowDescription(body)) => {
                    let names = body
                        .fields()
                        .map(|f| Ok(f.name().to_string()))
                        .collect::<Vec<_>>()
                        .map_err(|e| self.wire.protocol("malformed RowDescription", Some(e)))?;
                    columns = Some(names.into());
                }
                Backend::Msg(Message::DataRow(body)) => {
                    let Some(cols) = columns.clone() else {
                        return Err(self.wire.protocol("DataRow before RowDescription", None));
                    };
                    let buf = body.buffer();
                    let ranges = body
                        .ranges()
                        .collect::<Vec<_>>()
                        .map_err(|e| self.wire.protocol("malformed DataRow", Some(e)))?;
                    let mut values = Vec::with_capacity(ranges.len());
                    for range in ranges {
                        values.push(match range {
                            None => None,
                            Some(r) => Some(
                                std::str::from_utf8(&buf[r])
                                    .map_err(|_| self.wire.protocol("DataRow value is not valid utf-8", None))?
                                    .to_string(),
                            ),
                        });
                    }
                    if values.len() != cols.len() {
                        return Err(self.wire.protocol("DataRow column count differs from RowDescription", None));
                    }
                    rows.push(SimpleRow { columns: cols, values });
                }
                Backend::Msg(Message::CommandComplete(_) | Message::EmptyQueryResponse) => {
                    columns = None;
                }
                Backend::Msg(Message::ErrorResponse(body)) => {
                    if error.is_none() {
                        error = Some(server_error(&self.wire, &body));
                    }
                }
                Backend::Msg(Message::ReadyForQuery(_)) => {
                    self.in_query = false;
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                Backend::CopyBothResponse | Backend::Msg(Message::CopyInResponse(_) | Message::CopyOutResponse(_)) => {
                    return Err(self.wire.protocol(
                        "the query started a COPY, which simple_query cannot serve; use start_replication for START_REPLICATION",
                        None,
                    ));
                }
                other => return Err(self.wire.unexpected(&other, "in a query result")),
            }
        }
    }

    /// Runs a replication command (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`, ...) like
    /// [`simple_query`](Self::simple_query). When the server refuses it, the error names the
    /// command and the server version ([`SourceError::Rejected`]), since the commands differ
    /// between major versions.
    pub async fn replication_command(&mut self, command: &str) -> Result<Vec<SimpleRow>, SourceError> {
        self.simple_query(command).await.map_err(|e| self.rejected(command, e))
    }

    /// Wraps a server error in answer to `command` as [`SourceError::Rejected`].
    fn rejected(&self, command: &str, e: SourceError) -> SourceError {
        match e {
            e @ SourceError::Server { .. } => SourceError::Rejected {
                command: command.to_string(),
                server_version: self.parameter("server_version").unwrap_or("(version unknown)").to_string(),
                host: self.wire.endpoint.clone(),
                source: Box::new(e),
            },
            other => other,
        }
    }

    async fn send_query(&mut self, sql: &str) -> Result<(), SourceError> {
        if self.in_query {
            return Err(self
                .wire
                .protocol("the connection is out of step after an interrupted query; reconnect", None));
        }
        frontend::query(sql, &mut self.wire.wbuf)
            .map_err(|e| self.wire.protocol("the query text contains a NUL byte", Some(e)))?;
        self.in_query = true;
        self.wire.flush().await
    }

    /// Sends `START_REPLICATION SLOT slot LOGICAL start (options)` and, once the
    /// server answers with CopyBothResponse, gives up the connection's wire and the
    /// walsender's process id for [`ReplicationConn::start_replication`] to stream on.
    pub(crate) async fn start_copy_both(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<(Wire, Option<i32>), SourceError> {
        let sql = start_replication_sql(slot, start, options);
        let limit = self.options.read_timeout;
        let endpoint = self.wire.endpoint.clone();
        let started = tokio::time::timeout(limit, async {
            self.send_query(&sql).await?;
            let mut error = None;
            loop {
                match self.wire.read_message("while starting replication").await? {
                    Backend::CopyBothResponse => return Ok(()),
                    Backend::Msg(Message::ErrorResponse(body)) => {
                        error.get_or_insert_with(|| server_error(&self.wire, &body));
                    }
                    Backend::Msg(Message::ReadyForQuery(_)) => {
                        self.in_query = false;
                        return Err(error.unwrap_or_else(|| {
                            self.wire.protocol("server finished START_REPLICATION without streaming", None)
                        }));
                    }
                    other => {
                        return Err(self.wire.unexpected(&other, "in answer to START_REPLICATION"));
                    }
                }
            }
        })
        .await;
        match started {
            Ok(Ok(())) => {
                tracing::info!(server = %endpoint, slot, start = %start, "replication started");
                let pid = self.backend_pid();
                Ok((self.wire, pid))
            }
            Ok(Err(e)) => Err(self.rejected(&sql, e)),
            Err(_) => Err(SourceError::Timeout {
                what: "waiting for START_REPLICATION to be answered by",
                host: endpoint,
                after: limit,
                hint: "the server is slow or stuck; reconnect and retry",
            }),
        }
    }

    /// A server parameter reported by ParameterStatus, e.g. `server_version`,
    /// `TimeZone`, `DateStyle`, `integer_datetimes`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.wire.params.get(name).map(String::as_str)
    }

    /// The server process id, from BackendKeyData.
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_key.map(|(pid, _)| pid)
    }

    /// How the server authenticated us: `trust` (no password asked),
    /// `password`, `md5`, `SCRAM-SHA-256` or `SCRAM-SHA-256-PLUS` (with
    /// tls-server-end-point channel binding).
    pub fn auth_method(&self) -> &'static str {
        self.auth_method
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The server as `host:port` or the Unix socket path.
    pub fn endpoint(&self) -> &str {
        &self.wire.endpoint
    }

    /// Sends Terminate and closes the connection.
    pub async fn close(mut self) {
        self.wire.terminate().await;
    }

    #[cfg(test)]
    pub(crate) fn for_test(transport: Transport) -> ReplicationConn {
        ReplicationConn {
            wire: Wire::new(transport, "test:1".into()),
            options: ConnectOptions::default(),
            backend_key: None,
            tls: false,
            auth_method: "trust",
            in_query: false,
        }
    }
}

/// `START_REPLICATION SLOT "slot" LOGICAL X/Y ("k" 'v', ...)`.
pub(crate) fn start_replication_sql(slot: &str, start: Lsn, options: &[(&str, &str)]) -> String {
    let mut sql = format!("START_REPLICATION SLOT {} LOGICAL {start}", quote_ident(slot));
    if !options.is_empty() {
        let opts: Vec<String> =
            options.iter().map(|(k, v)| format!("{} {}", quote_ident(k), quote_literal(v))).collect();
        sql.push_str(" (");
        sql.push_str(&opts.join(", "));
        sql.push(')');
    }
    sql
}

async fn connect_host(
    info: &ConnInfo,
    host: &str,
    port: u16,
    endpoint: &str,
    options: ConnectOptions,
    tls_config: &mut Option<Arc<ClientConfig>>,
) -> Result<ReplicationConn, SourceError> {
    if is_unix_host(host) {
        // Postgres never offers TLS on Unix sockets, and libpq does not ask.
        let path = socket_path(host, port);
        let stream = UnixStream::connect(&path).await.map_err(|e| SourceError::Io {
            action: unix_action(&e),
            host: endpoint.to_string(),
            source: e,
        })?;
        return startup(Wire::new(Transport::Unix(stream), endpoint.to_string()), info, options, None).await;
    }

    match tls::effective_sslmode(info) {
        SslMode::Disable => attempt(info, host, port, endpoint, options, TlsAttempt::Off, tls_config).await,
        SslMode::Allow => {
            match attempt(info, host, port, endpoint, options, TlsAttempt::Off, tls_config).await {
                // Refused without encryption (pg_hba `hostssl`): try with it.
                Err(SourceError::Server { code, .. }) if code.starts_with("28") => {
                    tracing::debug!(server = %endpoint, "plain connection refused; retrying with tls (sslmode=allow)");
                    attempt(info, host, port, endpoint, options, TlsAttempt::Require, tls_config).await
                }
                other => other,
            }
        }
        SslMode::Prefer => {
            match attempt(info, host, port, endpoint, options, TlsAttempt::Try, tls_config).await {
                // The handshake itself failed (not our configuration): as libpq, retry in plain text.
                Err(e @ SourceError::Tls { .. }) if tls_config.is_some() => {
                    tracing::debug!(server = %endpoint, error = %e, "tls handshake failed; retrying without tls (sslmode=prefer)");
                    attempt(info, host, port, endpoint, options, TlsAttempt::Off, tls_config).await
                }
                other => other,
            }
        }
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            attempt(info, host, port, endpoint, options, TlsAttempt::Require, tls_config).await
        }
    }
}

fn unix_action(e: &io::Error) -> &'static str {
    if e.kind() == io::ErrorKind::NotFound {
        "no server socket (is the server running, with this port and unix_socket_directories?) at"
    } else {
        "could not connect to server socket"
    }
}

async fn attempt(
    info: &ConnInfo,
    host: &str,
    port: u16,
    endpoint: &str,
    options: ConnectOptions,
    tls_mode: TlsAttempt,
    tls_config: &mut Option<Arc<ClientConfig>>,
) -> Result<ReplicationConn, SourceError> {
    let mut tcp = connect_tcp(info, host, port, endpoint).await?;
    if tls_mode == TlsAttempt::Off {
        let wire = Wire::new(Transport::Tcp(tcp), endpoint.to_string());
        return startup(wire, info, options, None).await;
    }

    let config = match tls_config {
        Some(c) => c.clone(),
        None => tls_config.insert(Arc::new(tls::client_config(info)?)).clone(),
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    let io_err = |action, source| SourceError::Io { action, host: endpoint.to_string(), source };
    tcp.write_all(&request).await.map_err(|e| io_err("could not send the tls request to", e))?;
    // Exactly one byte: anything after it must come through TLS.
    let mut answer = [0u8; 1];
    match tcp.read_exact(&mut answer).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(SourceError::Closed { host: endpoint.to_string(), during: "in answer to the tls request" });
        }
        Err(e) => return Err(io_err("could not read the tls answer from", e)),
    }
    match answer[0] {
        b'S' => {}
        b'N' if tls_mode == TlsAttempt::Try => {
            tracing::debug!(server = %endpoint, "server does not offer tls; continuing without (sslmode=prefer)");
            let wire = Wire::new(Transport::Tcp(tcp), endpoint.to_string());
            return startup(wire, info, options, None).await;
        }
        b'N' => {
            return Err(SourceError::Tls {
                host: endpoint.to_string(),
                message: format!(
                    "server at {endpoint} does not accept TLS, but sslmode={}; enable ssl on the server or lower sslmode",
                    info.sslmode
                ),
                source: None,
            });
        }
        other => {
            return Err(SourceError::Protocol {
                what: format!(
                    "unexpected answer `{}` to the tls request; is this a postgres server?",
                    char::from(other).escape_default()
                ),
                host: endpoint.to_string(),
                source: None,
            });
        }
    }

    let mode = tls::effective_sslmode(info);
    let name = match tls::server_name(host) {
        Some(name) => name,
        None if mode == SslMode::VerifyFull => {
            return Err(SourceError::Tls {
                host: endpoint.to_string(),
                message: format!(
                    "host `{host}` is not a dns name or ip address, so sslmode=verify-full cannot check it; use the name in the server certificate"
                ),
                source: None,
            });
        }
        None => {
            let ip = tcp.peer_addr().map_err(|e| io_err("could not get the address of", e))?.ip();
            ServerName::IpAddress(ip.into())
        }
    };
    let stream =
        tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await.map_err(|e| SourceError::Tls {
            host: endpoint.to_string(),
            message: describe_handshake_failure(&e, info, host, endpoint),
            source: Some(Box::new(e)),
        })?;
    let binding = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| tls::tls_server_end_point(cert, config.crypto_provider()));
    let wire = Wire::new(Transport::Tls(Box::new(stream)), endpoint.to_string());
    startup(wire, info, options, Some(binding)).await
}

pub(crate) fn describe_handshake_failure(e: &io::Error, info: &ConnInfo, host: &str, endpoint: &str) -> String {
    use rustls::CertificateError as C;
    let mode = tls::effective_sslmode(info);
    let root = info.sslrootcert.as_deref().unwrap_or("");
    let cert_error = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).and_then(|r| match r {
        rustls::Error::InvalidCertificate(c) => Some(c),
        _ => None,
    });
    let what = match cert_error {
        Some(C::UnknownIssuer) => format!(
            "the server certificate is not signed by a CA in sslrootcert `{root}`; set sslrootcert to the CA that signed the server certificate"
        ),
        Some(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "the server certificate is not valid for host `{host}`; connect with a name the certificate lists, or use sslmode=verify-ca"
        ),
        Some(C::Expired | C::ExpiredContext { .. }) => {
            "the server certificate has expired; renew it on the server".to_string()
        }
        Some(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "the server certificate is not valid yet; check the clocks".to_string()
        }
        Some(_) => "the server certificate was rejected".to_string(),
        None => return format!("tls handshake with {endpoint} failed (sslmode={mode})"),
    };
    format!("could not verify the tls certificate of {endpoint} (sslmode={mode}): {what}")
}

async fn connect_tcp(info: &ConnInfo, host: &str, port: u16, endpoint: &str) -> Result<TcpStream, SourceError> {
    let addrs = tokio::net::lookup_host((host, port)).await.map_err(|e| SourceError::Io {
        action: "could not resolve the host name of",
        host: endpoint.to_string(),
        source: e,
    })?;
    let mut last_error = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                configure_tcp(&stream, info).map_err(|e| SourceError::Io {
                    action: "could not set socket options for",
                    host: endpoint.to_string(),
                    source: e,
                })?;
                return Ok(stream);
            }
            Err(e) => {
                tracing::debug!(server = %endpoint, %addr, error = %e, "tcp connect failed");
                last_error = Some(e);
            }
        }
    }
    Err(SourceError::Io {
        action: "could not connect to server at",
        host: endpoint.to_string(),
        source: last_error
            .unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the host name resolved to no addresses")),
    })
}

fn configure_tcp(stream: &TcpStream, info: &ConnInfo) -> io::Result<()> {
    stream.set_nodelay(true)?;
    if info.keepalives {
        let keepalive = socket2::TcpKeepalive::new().with_time(info.keepalives_idle);
        socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)?;
    }
    Ok(())
}

/// Sends the startup message, authenticates, and waits for ReadyForQuery.
/// `tls_binding` is `None` without TLS, else the channel binding data if any.
async fn startup(
    mut wire: Wire,
    info: &ConnInfo,
    options: ConnectOptions,
    tls_binding: Option<Option<Vec<u8>>>,
) -> Result<ReplicationConn, SourceError> {
    let mut params: Vec<(&str, &str)> =
        vec![("user", &info.user), ("database", &info.dbname), ("application_name", &info.application_name)];
    if options.replication {
        params.push(("replication", "database"));
    }
    params.extend_from_slice(SESSION_SETTINGS);
    frontend::startup_message(params, &mut wire.wbuf)
        .map_err(|e| wire.protocol("a connection setting contains a NUL byte", Some(e)))?;
    wire.flush().await?;

    let auth_method = authenticate(&mut wire, info, tls_binding.as_ref()).await?;

    let mut backend_key = None;
    loop {
        match wire.read_message("while starting the session").await? {
            Backend::Msg(Message::BackendKeyData(body)) => {
                backend_key = Some((body.process_id(), body.secret_key()));
            }
            Backend::Msg(Message::ReadyForQuery(_)) => break,
            Backend::Msg(Message::ErrorResponse(body)) => return Err(server_error(&wire, &body)),
            other => return Err(wire.unexpected(&other, "while starting the session")),
        }
    }
    Ok(ReplicationConn { wire, options, backend_key, tls: tls_binding.is_some(), auth_method, in_query: false })
}

async fn authenticate(
    wire: &mut Wire,
    info: &ConnInfo,
    tls_binding: Option<&Option<Vec<u8>>>,
) -> Result<&'static str, SourceError> {
    const DURING: &str = "during authentication";
    let user = info.user.as_str();
    let password = || {
        info.password.as_deref().ok_or_else(|| SourceError::Auth {
            user: user.to_string(),
            message: format!(
                "server requested a password for user {user} but none was given; set PGPASSWORD or a password in the source url"
            ),
            source: None,
        })
    };
    let auth_error = |message: String, source: Option<super::BoxError>| SourceError::Auth {
        user: user.to_string(),
        message,
        source,
    };

    let mut method = "trust";
    loop {
        let m = wire.read_message(DURING).await?;
        let Backend::Msg(m) = m else {
            return Err(wire.unexpected(&m, DURING));
        };
        match m {
            Message::AuthenticationOk => return Ok(method),
            Message::ErrorResponse(body) => return Err(server_error(wire, &body).naming_password_origin(info)),
            Message::AuthenticationCleartextPassword => {
                let pw = password()?;
                method = "password";
                frontend::password_message(pw.as_bytes(), &mut wire.wbuf)
                    .map_err(|e| wire.protocol("the password contains a NUL byte", Some(e)))?;
                wire.flush().await?;
            }
            Message::AuthenticationMd5Password(body) => {
                let pw = password()?;
                method = "md5";
                let hash = postgres_protocol::authentication::md5_hash(user.as_bytes(), pw.as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), &mut wire.wbuf)
                    .map_err(|e| wire.protocol("could not encode the md5 password", Some(e)))?;
                wire.flush().await?;
            }
            Message::AuthenticationSasl(body) => {
                let pw = password()?;
                let mechanisms = body
                    .mechanisms()
                    .map(|m| Ok(m.to_string()))
                    .collect::<Vec<_>>()
                    .map_err(|e| wire.protocol("malformed AuthenticationSASL", Some(e)))?;
                let offers = |m: &str| mechanisms.iter().any(|x| x == m);
                let binding_data = tls_binding.and_then(|b| b.clone());
                let (mechanism, binding) = match binding_data {
                    Some(data) if offers(sasl::SCRAM_SHA_256_PLUS) => {
                        (sasl::SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(data))
                    }
                    // We could bind but the server did not offer it.
                    Some(_) if offers(sasl::SCRAM_SHA_256) => (sasl::SCRAM_SHA_256, ChannelBinding::unrequested()),
                    None if offers(sasl::SCRAM_SHA_256) => (sasl::SCRAM_SHA_256, ChannelBinding::unsupported()),
                    _ => {
                        return Err(auth_error(
                            format!(
                                "server at {} offered only sasl mechanisms walbust does not support ({}); allow scram-sha-256 for user {user}",
                                wire.endpoint,
                                mechanisms.join(", ")
                            ),
                            None,
                        ));
                    }
                };
                tracing::debug!(server = %wire.endpoint, mechanism, "scram authentication");
                method = mechanism;
                let mut scram = ScramSha256::new(pw.as_bytes(), binding);
                frontend::sasl_initial_response(mechanism, scram.message(), &mut wire.wbuf)
                    .map_err(|e| wire.protocol("could not encode the sasl response", Some(e)))?;
                wire.flush().await?;

                match wire.read_message(DURING).await? {
                    Backend::Msg(Message::AuthenticationSaslContinue(body)) => {
                        scram.update(body.data()).map_err(|e| {
                            auth_error(
                                format!("invalid scram challenge from server at {}", wire.endpoint),
                                Some(e.into()),
                            )
                        })?;
                    }
                    Backend::Msg(Message::ErrorResponse(body)) => {
                        return Err(server_error(wire, &body).naming_password_origin(info));
                    }
                    other => return Err(wire.unexpected(&other, DURING)),
                }
                frontend::sasl_response(scram.message(), &mut wire.wbuf)
                    .map_err(|e| wire.protocol("could not encode the sasl response", Some(e)))?;
                wire.flush().await?;

                match wire.read_message(DURING).await? {
                    Backend::Msg(Message::AuthenticationSaslFinal(body)) => {
                        scram.finish(body.data()).map_err(|e| {
                            auth_error(
                                format!(
                                    "server at {} failed to prove it knows the password of user {user} (scram server signature mismatch)",
                                    wire.endpoint
                                ),
                                Some(e.into()),
                            )
                        })?;
                    }
                    Backend::Msg(Message::ErrorResponse(body)) => {
                        return Err(server_error(wire, &body).naming_password_origin(info));
                    }
                    other => return Err(wire.unexpected(&other, DURING)),
                }
            }
            Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationGss
            | Message::AuthenticationSspi
            | Message::AuthenticationGssContinue(_) => {
                return Err(auth_error(
                    format!(
                        "server at {} asked for an authentication method walbust does not support (gss, sspi or kerberos); use scram-sha-256, md5, password or trust for user {user} in pg_hba.conf",
                        wire.endpoint
                    ),
                    None,
                ));
            }
            other => return Err(wire.unexpected(&Backend::Msg(other), DURING)),
        }
    }
}

/// Bytes of a backend message, for tests that play the server.
#[cfg(test)]
pub(crate) fn backend_message(tag: u8, body: &[u8]) -> bytes::Bytes {
    let mut b = BytesMut::new();
    b.extend_from_slice(&[tag]);
    b.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    b.extend_from_slice(body);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::io::duplex;

    fn row_description(names: &[&str]) -> Bytes {
        let mut body = Vec::new();
        body.extend_from_slice(&(names.len() as i16).to_be_bytes());
        for n in names {
            body.extend_from_slice(n.as_bytes());
            body.push(0);
            body.extend_from_slice(&[0; 18]);
        }
        backend_message(b'T', &body)
    }

    fn data_row(values: &[Option<&str>]) -> Bytes {
        let mut body = Vec::new();
        body.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v.as_bytes());
                }
            }
        }
        backend_message(b'D', &body)
    }

    fn error_response(fields: &[(u8, &str)]) -> Bytes {
        let mut body = Vec::new();
        for (t, v) in fields {
            body.push(*t);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        backend_message(b'E', &body)
    }

    fn notice(fields: &[(u8, &str)]) -> Bytes {
        let mut m = error_response(fields).to_vec();
        m[0] = b'N';
        Bytes::from(m)
    }

    fn ready() -> Bytes {
        backend_message(b'Z', b"I")
    }

    #[test]
    fn builds_start_replication() {
        assert_eq!(
            start_replication_sql(
                "walbust",
                Lsn(0x1_0000_00A0),
                &[("proto_version", "1"), ("publication_names", "p'q")]
            ),
            r#"START_REPLICATION SLOT "walbust" LOGICAL 1/A0 ("proto_version" '1', "publication_names" 'p''q')"#
        );
        assert_eq!(start_replication_sql("a\"b", Lsn::ZERO, &[]), r#"START_REPLICATION SLOT "a""b" LOGICAL 0/0"#);
    }

    #[test]
    fn simple_row_access() {
        let row =
            SimpleRow { columns: vec!["a".to_string(), "b".to_string()].into(), values: vec![Some("1".into()), None] };
        assert_eq!(row.get("a"), Some("1"));
        assert_eq!(row.get("b"), None);
        assert_eq!(row.get("c"), None);
        assert_eq!(row.get_idx(0), Some("1"));
        assert_eq!(row.len(), 2);
        assert!(!row.is_empty());
        assert_eq!(row.columns(), ["a", "b"]);
    }

    #[tokio::test]
    async fn simple_query_collects_rows_and_handles_async_messages() {
        let (client, mut server) = duplex(1 << 16);
        let mut conn = ReplicationConn::for_test(Transport::Mem(client));
        let server_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            let n = server.read(&mut buf).await.unwrap();
            assert_eq!(buf[0], b'Q');
            assert_eq!(&buf[5..n], b"SELECT 1\0");
            let mut out = Vec::new();
            out.extend_from_slice(&backend_message(b'S', b"TimeZone\0UTC\0"));
            out.extend_from_slice(&row_description(&["a", "b"]));
            out.extend_from_slice(&notice(&[(b'S', "NOTICE"), (b'M', "hello")]));
            out.extend_from_slice(&data_row(&[Some("x"), None]));
            out.extend_from_slice(&data_row(&[Some("y"), Some("z")]));
            out.extend_from_slice(&backend_message(b'C', b"SELECT 2\0"));
            out.extend_from_slice(&ready());
            // Dribble it out a few bytes at a time.
            for chunk in out.chunks(3) {
                server.write_all(chunk).await.unwrap();
            }
            server
        });
        let rows = conn.simple_query("SELECT 1").await.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].get("a"), Some("x"));
        assert_eq!(rows[0].get("b"), None);
        assert_eq!(rows[1].get("b"), Some("z"));
        assert_eq!(conn.parameter("TimeZone"), Some("UTC"));
        let _server = server_task.await.unwrap();
    }

    #[tokio::test]
    async fn simple_query_error_keeps_the_connection_usable() {
        let (client, mut server) = duplex(1 << 16);
        let mut conn = ReplicationConn::for_test(Transport::Mem(client));
        let server_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 1024];
            assert!(server.read(&mut buf).await.unwrap() > 0);
            let mut out = notice(&[(b'S', "NOTICE"), (b'C', "00000"), (b'M', "note")]).to_vec();
            out.extend_from_slice(&error_response(&[
                (b'S', "ERROR"),
                (b'V', "ERROR"),
                (b'C', "42P01"),
                (b'M', "relation \"nope\" does not exist"),
                (b'D', "some detail"),
                (b'H', "some hint"),
            ]));
            out.extend_from_slice(&ready());
            server.write_all(&out).await.unwrap();

            assert!(server.read(&mut buf).await.unwrap() > 0);
            let mut out = Vec::new();
            out.extend_from_slice(&row_description(&["n"]));
            out.extend_from_slice(&data_row(&[Some("42")]));
            out.extend_from_slice(&backend_message(b'C', b"SELECT 1\0"));
            out.extend_from_slice(&ready());
            server.write_all(&out).await.unwrap();
            server
        });
        match conn.simple_query("SELECT * FROM nope").await.unwrap_err() {
            SourceError::Server { severity, code, message, detail, hint } => {
                assert_eq!(severity, "ERROR");
                assert_eq!(code, "42P01");
                assert_eq!(message, "relation \"nope\" does not exist");
                assert_eq!(detail.as_deref(), Some("some detail"));
                assert_eq!(hint.as_deref(), Some("some hint"));
            }
            other => panic!("{other:?}"),
        }
        let rows = conn.simple_query("SELECT 42 AS n").await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get("n"), Some("42"));
        let _server = server_task.await.unwrap();
    }

    #[tokio::test]
    async fn tcp_options_are_applied() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let info = ConnInfo::parse(&format!("host=127.0.0.1 port={port} keepalives_idle=17"), |_| None).unwrap();
        let stream = connect_tcp(&info, "127.0.0.1", port, "x").await.unwrap();
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(17));

        let info = ConnInfo::parse(&format!("host=127.0.0.1 port={port} keepalives=0"), |_| None).unwrap();
        let stream = connect_tcp(&info, "127.0.0.1", port, "x").await.unwrap();
        assert!(!socket2::SockRef::from(&stream).keepalive().unwrap());
    }

    #[tokio::test]
    async fn interrupted_query_poisons_the_connection() {
        let (client, _server) = duplex(1 << 16);
        let mut conn = ReplicationConn::for_test(Transport::Mem(client));
        conn.options.read_timeout = Duration::from_millis(50);
        let err = conn.simple_query("SELECT 1").await.unwrap_err();
        assert!(matches!(err, SourceError::Timeout { .. }), "{err:?}");
        assert!(err.is_transient());
        let err = conn.simple_query("SELECT 1").await.unwrap_err();
        assert!(err.to_string().contains("out of step"), "{err}");
    }

    #[tokio::test]
    async fn closed_and_garbage_are_typed_errors() {
        let (client, server) = duplex(1 << 16);
        let mut conn = ReplicationConn::for_test(Transport::Mem(client));
        drop(server);
        let err = conn.simple_query("SELECT 1").await.unwrap_err();
        assert!(matches!(err, SourceError::Closed { .. } | SourceError::Io { .. }), "{err:?}");

        let (client, mut server) = duplex(1 << 16);
        let mut conn = ReplicationConn::for_test(Transport::Mem(client));
        server.write_all(b"Q\0\0\0\x02").await.unwrap();
        let err = conn.simple_query("SELECT 1").await.unwrap_err();
        assert!(matches!(err, SourceError::Protocol { .. }), "{err:?}");
        assert!(!err.is_transient());
    }
}

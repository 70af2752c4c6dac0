//! The Postgres wire layer: connecting to the source database, reading its replication
//! stream and decoding it. It imports nothing of the rest of walbust but the
//! [`input`](crate::input) hygiene below it.
//!
//! This module speaks the Postgres wire protocol itself, on top of
//! [`postgres_protocol`], for the one connection tokio-postgres cannot serve:
//! the logical replication connection (`replication=database`), whose
//! `START_REPLICATION` answer is a CopyBoth stream. The pieces:
//!
//! - [`conninfo`]: libpq-compatible connection strings (URL and `key=value`
//!   forms, `PG*` environment variables, libpq defaults).
//! - [`tls`]: a rustls client configuration with libpq `sslmode` semantics,
//!   shared by both kinds of connection.
//! - [`conn`]: [`ReplicationConn`], the hand-rolled connection (TCP or Unix
//!   socket, TLS, trust/cleartext/md5/SCRAM-SHA-256 authentication, simple
//!   queries such as `IDENTIFY_SYSTEM` and `CREATE_REPLICATION_SLOT`).
//! - [`stream`]: [`ReplicationStream`], the CopyBoth framing of
//!   `START_REPLICATION` (XLogData, primary keepalives, standby status updates).
//! - [`logical`]: [`LogicalStream`], the transaction rules of the stream: frames in,
//!   Begin, change, message, Commit and keepalive events out; `run` and `record` both
//!   read through it.
//! - [`sql`]: [`connect_sql`], an ordinary tokio-postgres client built from the
//!   same [`ConnInfo`] with the same TLS and session settings.
//! - [`quote`]: SQL quoting of identifiers and literals, for every statement
//!   walbust runs or shows.
//! - [`pgoutput`]: the pure decoder of pgoutput messages (fuzzed).
//! - [`lsn`]: WAL positions.
//! - [`WalStatus`]: a slot's `wal_status`, as the server names it.
//!
//! Every connection pins the session settings the decoder relies on:
//! `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=postgres`,
//! `extra_float_digits=3` and `client_encoding=UTF8`.
//!
//! Errors are one type, [`SourceError`]; [`SourceError::is_transient`] tells a
//! retry loop whether trying again can help. Display texts describe this layer
//! only and keep the cause as [`std::error::Error::source`], so print the whole
//! chain (for example anyhow's `{:#}`) in logs. No error, log line or `Debug`
//! output contains the password.

pub mod conn;
pub mod conninfo;
pub mod logical;
pub mod lsn;
pub mod pgoutput;
pub mod quote;
pub mod sql;
pub mod stream;
pub mod tls;

use std::error::Error as StdError;
use std::io;
use std::time::Duration;

pub use conn::{ConnectOptions, ReplicationConn, SimpleRow};
pub use conninfo::{ConnInfo, ConnInfoError, SessionState, SslMode, TargetSessionAttrs};
pub use logical::{Event as StreamEvent, LogicalStream, RowChange, StreamError};
pub use sql::connect_sql;
pub use stream::{ReplicationFrame, ReplicationStream, now_pg_micros};

/// The pgoutput protocol version walbust requests; `run` and `record` decode the same stream.
pub const PGOUTPUT_VERSION: u32 = 1;

/// The logical decoding message prefix of walbust's heartbeats; `[source] message_prefix`
/// may not take it.
pub const HEARTBEAT_PREFIX: &str = "walbust-heartbeat";

/// The START_REPLICATION options of `run` and `record`: pgoutput protocol 1 over the
/// publication, with logical decoding messages (manual invalidations, heartbeats).
/// `quoted_publication` is the publication name as an identifier, double-quoted.
pub fn pgoutput_options(quoted_publication: &str) -> [(&'static str, &str); 3] {
    [("proto_version", "1"), ("publication_names", quoted_publication), ("messages", "true")]
}

/// A boxed error kept as the cause of a [`SourceError`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The session settings every source connection pins, as `(name, value)`.
///
/// Sent as startup parameters by [`ReplicationConn`] and as `-c` options by
/// [`connect_sql`] (which sets `client_encoding=UTF8` itself).
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("client_encoding", "UTF8"),
];

/// Everything that can go wrong talking to the source database.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A network read, write or connect failed.
    #[error("{action} {host}")]
    Io {
        /// What was being done, e.g. "could not connect to server at".
        action: &'static str,
        /// The server, as `host:port` or the Unix socket path.
        host: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// An operation did not finish in time.
    #[error("timed out after {after:?} {what} {host}; {hint}")]
    Timeout {
        /// What timed out, e.g. "connecting to".
        what: &'static str,
        /// The server, as `host:port` or the Unix socket path.
        host: String,
        /// The limit that was exceeded.
        after: Duration,
        /// What to check or change.
        hint: &'static str,
    },
    /// TLS could not be set up: configuration, negotiation or handshake
    /// (including certificate verification).
    #[error("{message}")]
    Tls {
        /// The server, as `host:port` (empty for configuration errors).
        host: String,
        /// What failed and what to do about it.
        message: String,
        /// The underlying rustls or I/O error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// Authentication failed on the client side (missing password,
    /// unsupported method, server signature mismatch).
    #[error("{message}")]
    Auth {
        /// The user being authenticated.
        user: String,
        /// What failed and what to do about it.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The server answered with an ErrorResponse.
    #[error("{}", server_display(severity, code, message, detail.as_deref(), hint.as_deref()))]
    Server {
        /// `ERROR`, `FATAL` or `PANIC` (never localized).
        severity: String,
        /// The SQLSTATE code, e.g. `28P01`.
        code: String,
        /// The primary message.
        message: String,
        /// The optional detail message.
        detail: Option<String>,
        /// The optional hint.
        hint: Option<String>,
    },
    /// The server sent something the protocol does not allow here.
    #[error("protocol error from {host}: {what}")]
    Protocol {
        /// What was wrong.
        what: String,
        /// The server, as `host:port` or the Unix socket path.
        host: String,
        /// The underlying parse error, if any.
        #[source]
        source: Option<io::Error>,
    },
    /// The server closed the connection.
    #[error("server at {host} closed the connection {during}")]
    Closed {
        /// The server, as `host:port` or the Unix socket path.
        host: String,
        /// When, e.g. "during authentication".
        during: &'static str,
    },
    /// The connection settings are invalid.
    #[error(transparent)]
    ConnInfo(#[from] ConnInfoError),
    /// Every host answered, but none is the kind of server `target_session_attrs` asks
    /// for (during a failover, until the standby is promoted).
    #[error(
        "server at {host} is {found}, and no host of the connection string is the server target_session_attrs={wanted} asks for"
    )]
    SessionAttrs {
        /// The last host tried, as `host:port` or the Unix socket path.
        host: String,
        /// What it is, e.g. "a standby (in recovery)".
        found: &'static str,
        /// The `target_session_attrs` asked for.
        wanted: &'static str,
    },
    /// The server refused a replication command (`IDENTIFY_SYSTEM`,
    /// `CREATE_REPLICATION_SLOT`, `START_REPLICATION`): names the command and the server
    /// version, since the commands' syntax and options differ between major versions.
    #[error("PostgreSQL {server_version} at {host} rejected the replication command `{command}`")]
    Rejected {
        /// The command as sent.
        command: String,
        /// `server_version` as the server reported it, e.g. `14.23`.
        server_version: String,
        /// The server, as `host:port` or the Unix socket path.
        host: String,
        /// The server's error.
        #[source]
        source: Box<SourceError>,
    },
}

fn server_display(severity: &str, code: &str, message: &str, detail: Option<&str>, hint: Option<&str>) -> String {
    let mut s = format!("server error {code} ({}): {message}", severity.to_ascii_lowercase());
    if let Some(detail) = detail {
        s.push_str("; detail: ");
        s.push_str(detail);
    }
    if let Some(hint) = hint {
        s.push_str("; hint: ");
        s.push_str(hint);
    }
    s
}

impl SourceError {
    /// For a refused password (SQLSTATE 28P01), names in the hint where the password
    /// came from, so that the DBA knows which one to fix; other errors are returned as
    /// they are.
    pub(crate) fn naming_password_origin(self, info: &ConnInfo) -> SourceError {
        match self {
            SourceError::Server { severity, code, message, detail, hint } if code == "28P01" => {
                let origin = match &info.password_from {
                    Some(from) => format!(
                        "the password walbust sent came from {from}; check that it is role {}'s current password",
                        info.user
                    ),
                    None => "walbust sent no password; set PGPASSWORD, password_file or a password in the url".into(),
                };
                let hint = Some(match hint {
                    Some(h) => format!("{h}; {origin}"),
                    None => origin,
                });
                SourceError::Server { severity, code, message, detail, hint }
            }
            other => other,
        }
    }

    /// Whether retrying the same operation later may succeed.
    ///
    /// Transient: network errors, timeouts, closed connections, and server
    /// errors of class 08 (connection exception), 57P01/57P02/57P03
    /// (shutdown, crash, cannot connect now), 53300 (too many connections) and
    /// 55006 (object in use, e.g. a replication slot held by another process).
    /// Everything else (authentication, TLS verification, SQL errors such as
    /// 42xxx, configuration) needs a person and is not transient.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Io { .. }
            | SourceError::Timeout { .. }
            | SourceError::Closed { .. }
            | SourceError::SessionAttrs { .. } => true,
            SourceError::Server { code, .. } => is_transient_sqlstate(code),
            SourceError::Tls { source, .. } => source.as_deref().is_some_and(tls_cause_is_transient),
            SourceError::Auth { .. } | SourceError::Protocol { .. } | SourceError::ConnInfo(_) => false,
            SourceError::Rejected { source, .. } => source.is_transient(),
        }
    }

    /// True when only a person can fix it: the password or the authentication method, TLS
    /// verification, the connection settings, or a server error of class 28 (authorization),
    /// 3D (no such database), 42 (permission, undefined object), 0A (not supported) or
    /// 55 (object not in prerequisite state). Restarting walbust cannot help with these.
    pub fn needs_person(&self) -> bool {
        match self {
            SourceError::Auth { .. } | SourceError::ConnInfo(_) => true,
            SourceError::Tls { .. } => !self.is_transient(),
            SourceError::Server { code, .. } => {
                !is_transient_sqlstate(code) && ["28", "3D", "42", "0A", "55"].iter().any(|c| code.starts_with(c))
            }
            SourceError::Io { .. }
            | SourceError::Timeout { .. }
            | SourceError::Closed { .. }
            | SourceError::Protocol { .. }
            | SourceError::SessionAttrs { .. } => false,
            SourceError::Rejected { source, .. } => source.needs_person(),
        }
    }

    /// The SQLSTATE code when this is a [`SourceError::Server`] error (or a rejected
    /// replication command).
    pub fn code(&self) -> Option<&str> {
        match self {
            SourceError::Server { code, .. } => Some(code),
            SourceError::Rejected { source, .. } => source.code(),
            _ => None,
        }
    }

    /// The server's primary message when this is a [`SourceError::Server`] error (or a
    /// rejected replication command).
    pub fn server_message(&self) -> Option<&str> {
        match self {
            SourceError::Server { message, .. } => Some(message),
            SourceError::Rejected { source, .. } => source.server_message(),
            _ => None,
        }
    }
}

/// Logs that the server at `endpoint`, in `state`, is not the one `target_session_attrs`
/// asks for; on the last pass over the hosts, the error to return if no later host suits.
pub(crate) fn passed_over(
    info: &ConnInfo,
    endpoint: String,
    state: SessionState,
    last_pass: bool,
) -> Option<SourceError> {
    tracing::info!(
        server = %endpoint,
        target_session_attrs = %info.target_session_attrs,
        "the server is {}; trying the next host",
        state.describe()
    );
    last_pass.then(|| SourceError::SessionAttrs {
        host: endpoint,
        found: state.describe(),
        wanted: info.target_session_attrs.as_str(),
    })
}

/// Whether a SQLSTATE code names a condition that can clear up by itself.
pub fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "55006")
}

/// A TLS failure is transient only when the network broke during the
/// handshake; certificate and protocol failures are not. Looks at the first
/// I/O error in the cause chain.
fn tls_cause_is_transient(err: &(dyn StdError + Send + Sync + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) {
                return false;
            }
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::TimedOut
            );
        }
        cur = e.source();
    }
    false
}

/// The `wal_status` of a replication slot (Postgres 13 and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WalStatus {
    /// The slot's WAL is within `max_wal_size`.
    Reserved,
    /// Beyond `max_wal_size`, but kept by `max_slot_wal_keep_size` or `wal_keep_size`.
    Extended,
    /// Beyond what is guaranteed: it will be lost at the next checkpoint unless consumed.
    Unreserved,
    /// Required WAL was removed; the slot can no longer be used.
    Lost,
}

impl WalStatus {
    /// Every status, in order of increasing danger.
    pub const ALL: [WalStatus; 4] = [WalStatus::Reserved, WalStatus::Extended, WalStatus::Unreserved, WalStatus::Lost];

    /// The name the server uses.
    pub fn as_str(self) -> &'static str {
        match self {
            WalStatus::Reserved => "reserved",
            WalStatus::Extended => "extended",
            WalStatus::Unreserved => "unreserved",
            WalStatus::Lost => "lost",
        }
    }

    /// Parses the server's name; `None` for anything else.
    pub fn parse(s: &str) -> Option<WalStatus> {
        WalStatus::ALL.into_iter().find(|w| w.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> SourceError {
        SourceError::Server {
            severity: "FATAL".into(),
            code: code.into(),
            message: "m".into(),
            detail: None,
            hint: None,
        }
    }

    #[test]
    fn types_cross_threads() {
        fn send_sync<T: Send + Sync + 'static>() {}
        fn send<T: Send + 'static>() {}
        send_sync::<SourceError>();
        send_sync::<ConnInfo>();
        send::<ReplicationConn>();
        send::<ReplicationStream>();
        send::<ReplicationFrame>();
    }

    #[test]
    fn classifies_server_codes() {
        for code in ["08006", "08001", "57P01", "57P02", "57P03", "53300", "55006"] {
            assert!(server(code).is_transient(), "{code}");
        }
        for code in ["28P01", "28000", "42501", "42704", "3D000", "XX000", "53200"] {
            assert!(!server(code).is_transient(), "{code}");
        }
    }

    #[test]
    fn classifies_tls_causes() {
        let verify = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let tls = |source: Option<BoxError>| SourceError::Tls { host: "h:1".into(), message: "m".into(), source };
        assert!(!tls(Some(Box::new(verify))).is_transient());
        assert!(!tls(None).is_transient());
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(tls(Some(Box::new(reset))).is_transient());
    }

    #[test]
    fn server_display_includes_detail_and_hint() {
        let e = SourceError::Server {
            severity: "ERROR".into(),
            code: "55006".into(),
            message: "replication slot \"s\" is active for PID 7".into(),
            detail: Some("d".into()),
            hint: Some("h".into()),
        };
        assert_eq!(
            e.to_string(),
            "server error 55006 (error): replication slot \"s\" is active for PID 7; detail: d; hint: h"
        );
        assert!(e.is_transient());
        assert_eq!(e.code(), Some("55006"));
    }
}

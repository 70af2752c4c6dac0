//! An ordinary tokio-postgres client built from the same [`ConnInfo`], TLS
//! configuration and pinned session settings as the replication connection.

use std::time::Duration;

use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::conninfo::{ConnInfo, SessionState, SslMode, TargetSessionAttrs, is_unix_host};
use super::{SESSION_SETTINGS, SourceError, tls};

/// The `options` startup parameter that pins the session settings
/// (`client_encoding=UTF8` is always sent by tokio-postgres itself).
pub fn session_options() -> String {
    SESSION_SETTINGS
        .iter()
        .filter(|(name, _)| *name != "client_encoding")
        .map(|(name, value)| format!("-c {name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The tokio-postgres configuration for one host of `info`.
///
/// tokio-postgres only knows disable/prefer/require: `allow` maps to prefer,
/// and `verify-ca`/`verify-full` map to require, the verification itself being
/// done by the rustls configuration. Unix sockets never use TLS.
pub fn pg_config(info: &ConnInfo, host: &str, port: u16) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    if is_unix_host(host) {
        config.host_path(host);
    } else {
        config.host(host);
    }
    config
        .port(port)
        .user(&info.user)
        .dbname(&info.dbname)
        .application_name(&info.application_name)
        .options(session_options())
        .keepalives(info.keepalives)
        .keepalives_idle(info.keepalives_idle)
        .ssl_mode(if is_unix_host(host) {
            PgSslMode::Disable
        } else {
            match info.sslmode {
                SslMode::Disable => PgSslMode::Disable,
                SslMode::Allow | SslMode::Prefer => PgSslMode::Prefer,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
            }
        });
    if let Some(password) = &info.password {
        config.password(password);
    }
    if !info.connect_timeout.is_zero() {
        config.connect_timeout(info.connect_timeout);
    }
    config
}

/// Connects a tokio-postgres client, trying the hosts of `info` in order until one is the
/// server `target_session_attrs` asks for (as [`ReplicationConn`](super::ReplicationConn)
/// does), and spawns its connection task (whose error, if any, is logged).
pub async fn connect_sql(info: &ConnInfo) -> Result<tokio_postgres::Client, SourceError> {
    let tls = MakeRustlsConnect::new(tls::client_config(info)?);
    let mut last_error = None;
    let passes = info.target_session_attrs.passes();
    for (pass, &wanted) in passes.iter().enumerate() {
        for (host, port) in info.targets() {
            match connect_one(info, host, port, &tls).await {
                Ok(client) if wanted == TargetSessionAttrs::Any => return Ok(client),
                Ok(client) => {
                    let endpoint = info.endpoint(host, port);
                    let state = match session_state(&client).await {
                        Ok(state) => state,
                        Err(e) => {
                            last_error = Some(connect_error(e, info, host, endpoint));
                            continue;
                        }
                    };
                    if wanted.accepts(state) {
                        return Ok(client);
                    }
                    if let Some(e) = super::passed_over(info, endpoint, state, pass + 1 == passes.len()) {
                        last_error = Some(e);
                    }
                }
                Err(e) => last_error = Some(e),
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        SourceError::ConnInfo(super::ConnInfoError::Syntax("no host to connect to; set host".into()))
    }))
}

/// Whether the server is a standby and whether it takes writes.
async fn session_state(client: &tokio_postgres::Client) -> Result<SessionState, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only') = 'on'", &[])
        .await?;
    let standby: bool = row.get(0);
    Ok(SessionState { in_recovery: standby, read_only: standby || row.get::<_, bool>(1) })
}

/// One host's attempt; tokio-postgres bounds the socket connect, this bounds TLS and
/// authentication too.
async fn connect_one(
    info: &ConnInfo,
    host: &str,
    port: u16,
    tls: &MakeRustlsConnect,
) -> Result<tokio_postgres::Client, SourceError> {
    let endpoint = info.endpoint(host, port);
    let config = pg_config(info, host, port);
    let connecting = config.connect(tls.clone());
    let result = if info.connect_timeout.is_zero() {
        Ok(connecting.await)
    } else {
        tokio::time::timeout(info.connect_timeout + Duration::from_millis(100), connecting).await
    };
    match result {
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    // Its users open a new one when they next need it (the slot monitor,
                    // the heartbeat), so this is a warning; the SQLSTATE says why.
                    let e = from_pg_error(e, &endpoint);
                    tracing::warn!(server = %endpoint, error = %crate::errors::causes::error_chain(&e),
                        "sql connection to postgres ended");
                }
            });
            Ok(client)
        }
        Ok(Err(e)) => {
            let e = connect_error(e, info, host, endpoint.clone()).naming_password_origin(info);
            if info.hosts.len() > 1 {
                tracing::warn!(server = %endpoint, error = %crate::errors::causes::error_chain(&e), "could not connect; trying the next host");
            }
            Err(e)
        }
        Err(_) => Err(SourceError::Timeout {
            what: "connecting to",
            host: endpoint,
            after: info.connect_timeout,
            hint: "check that the server is up and reachable, or raise connect_timeout",
        }),
    }
}

/// The I/O error carrying a rustls error in the cause chain of `e`, if any.
fn rustls_failure(e: &tokio_postgres::Error) -> Option<&std::io::Error> {
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && io.get_ref().is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return Some(io);
        }
        cur = c.source();
    }
    None
}

/// Maps a tokio-postgres error onto [`SourceError`], keeping it as the source:
/// server errors become [`SourceError::Server`], a closed connection
/// [`SourceError::Closed`], TLS failures [`SourceError::Tls`], network
/// failures [`SourceError::Io`], and anything else (type conversion,
/// configuration, unexpected messages) a non-transient [`SourceError::Protocol`].
pub fn from_pg_error(e: tokio_postgres::Error, endpoint: &str) -> SourceError {
    if let Some(db) = e.as_db_error() {
        return SourceError::Server {
            severity: db.severity().to_string(),
            code: db.code().code().to_string(),
            message: db.message().to_string(),
            detail: db.detail().map(str::to_string),
            hint: db.hint().map(str::to_string),
        };
    }
    if e.is_closed() {
        return SourceError::Closed { host: endpoint.to_string(), during: "(sql connection)" };
    }
    // tokio-postgres tells its error kinds apart only in the text
    // ("error performing TLS handshake", "server does not support TLS").
    let text = e.to_string();
    if text.contains("TLS") || rustls_failure(&e).is_some() {
        return SourceError::Tls {
            host: endpoint.to_string(),
            message: format!("tls with {endpoint} failed (sql connection); check sslmode and sslrootcert"),
            source: Some(Box::new(e)),
        };
    }
    let network = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    if network {
        return SourceError::Io {
            action: "sql connection failed to",
            host: endpoint.to_string(),
            source: std::io::Error::other(e),
        };
    }
    SourceError::Protocol {
        what: "tokio-postgres reported an error".into(),
        host: endpoint.to_string(),
        source: Some(std::io::Error::other(e)),
    }
}

/// Maps an error from connecting through tokio-postgres, with the same
/// messages as [`ReplicationConn`](super::ReplicationConn) where it can tell.
fn connect_error(e: tokio_postgres::Error, info: &ConnInfo, host: &str, endpoint: String) -> SourceError {
    if let Some(tls_io) = rustls_failure(&e) {
        return SourceError::Tls {
            message: super::conn::describe_handshake_failure(tls_io, info, host, &endpoint),
            host: endpoint,
            source: Some(Box::new(e)),
        };
    }
    let io_kind =
        std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>()).map(std::io::Error::kind);
    // tokio-postgres' Display names only the kind; the detail is the source.
    let text = e.to_string();
    let cause = std::error::Error::source(&e).map(|c| c.to_string()).unwrap_or_default();
    if io_kind == Some(std::io::ErrorKind::TimedOut) || text == "timeout waiting for server" {
        return SourceError::Timeout {
            what: "connecting to",
            host: endpoint,
            after: info.connect_timeout,
            hint: "check that the server is up and reachable, or raise connect_timeout",
        };
    }
    if text == "invalid configuration" && cause == "password missing" {
        let user = &info.user;
        return SourceError::Auth {
            user: user.clone(),
            message: format!(
                "server requested a password for user {user} but none was given; set PGPASSWORD or a password in the source url"
            ),
            source: Some(Box::new(e)),
        };
    }
    if text == "authentication error" {
        let user = &info.user;
        return SourceError::Auth {
            user: user.clone(),
            message: format!("authentication of user {user} at {endpoint} failed (sql connection)"),
            source: Some(Box::new(e)),
        };
    }
    if cause == "server does not support TLS" {
        return SourceError::Tls {
            message: format!(
                "server at {endpoint} does not accept TLS, but sslmode={}; enable ssl on the server or lower sslmode",
                info.sslmode
            ),
            host: endpoint,
            source: Some(Box::new(e)),
        };
    }
    if text == "error connecting to server" {
        return SourceError::Io {
            action: "could not connect to server at",
            host: endpoint,
            source: std::io::Error::other(e),
        };
    }
    from_pg_error(e, &endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_pin_the_session() {
        assert_eq!(
            session_options(),
            "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres -c extra_float_digits=3"
        );
    }

    #[test]
    fn config_maps_sslmode_and_hosts() {
        let info = ConnInfo::parse(
            "host=db,/tmp/sock port=6000 user=u password=pw dbname=d sslmode=verify-full connect_timeout=0",
            |_| None,
        )
        .unwrap();
        let c = pg_config(&info, "db", 6000);
        assert_eq!(c.get_ssl_mode(), PgSslMode::Require);
        assert_eq!(c.get_ports(), [6000]);
        assert_eq!(c.get_user(), Some("u"));
        assert_eq!(c.get_password(), Some(&b"pw"[..]));
        assert_eq!(c.get_dbname(), Some("d"));
        assert_eq!(c.get_connect_timeout(), None);
        assert_eq!(c.get_application_name(), Some("walbust"));
        assert!(c.get_options().unwrap().contains("TimeZone=UTC"));
        let c = pg_config(&info, "/tmp/sock", 6000);
        assert_eq!(c.get_ssl_mode(), PgSslMode::Disable);
        assert!(matches!(c.get_hosts(), [tokio_postgres::config::Host::Unix(_)]));
        let info = ConnInfo::parse("sslmode=allow", |_| None).unwrap();
        assert_eq!(pg_config(&info, "h", 5432).get_ssl_mode(), PgSslMode::Prefer);
        assert_eq!(pg_config(&info, "h", 5432).get_connect_timeout(), Some(&Duration::from_secs(10)));
    }
}

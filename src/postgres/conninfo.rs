//! libpq-compatible connection settings.
//!
//! [`ConnInfo::parse`] reads either a URL (`postgres://user:pass@host:5432/db?sslmode=require`)
//! or a `key=value` string (`host=db port=5432 password='a b'`), fills what the
//! string leaves out from the `PG*` environment variables, then applies libpq's
//! defaults. Several hosts are tried in order, each with its own port or one port for all
//! (`host=a,b port=5432,5433`, `postgres://a:5432,b:5433/db`), and `target_session_attrs`
//! picks the kind of server to settle on (the primary, a standby, a writable one), as
//! libpq. Unlike libpq, an empty value counts as "not given", and there are no
//! `~/.pgpass` or `~/.postgresql/root.crt` look-ups.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// How hard to insist on TLS and how much of the server certificate to check,
/// as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Try without TLS first; use TLS only if the server refuses the plain connection.
    Allow,
    /// Try TLS first; fall back to a plain connection if the server does not offer it.
    #[default]
    Prefer,
    /// Insist on TLS but do not verify the certificate (unless `sslrootcert` is set,
    /// which makes it behave like [`SslMode::VerifyCa`]).
    Require,
    /// Insist on TLS and verify the certificate chain against `sslrootcert`.
    VerifyCa,
    /// Like [`SslMode::VerifyCa`], and also check the host name against the certificate.
    VerifyFull,
}

impl SslMode {
    /// Every mode, in libpq's order.
    pub const ALL: [SslMode; 6] =
        [SslMode::Disable, SslMode::Allow, SslMode::Prefer, SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull];

    /// The libpq spelling, e.g. `verify-full`.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a connection without TLS is an error.
    pub fn requires_tls(self) -> bool {
        matches!(self, SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = ConnInfoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SslMode::ALL.into_iter().find(|m| m.as_str() == s).ok_or_else(|| ConnInfoError::InvalidValue {
            key: "sslmode",
            value: s.to_string(),
            origin: None,
            expected: format!("one of {}", SslMode::ALL.map(SslMode::as_str).join(", ")),
        })
    }
}

/// Which server of several a connection settles on, as libpq's `target_session_attrs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TargetSessionAttrs {
    /// The first server that accepts the connection.
    #[default]
    Any,
    /// A server that accepts writes: not a standby, and `default_transaction_read_only` off.
    ReadWrite,
    /// A server that refuses writes: a standby, or `default_transaction_read_only` on.
    ReadOnly,
    /// A server that is not in recovery: the primary.
    Primary,
    /// A server in recovery: a standby.
    Standby,
    /// A standby if any host is one, else any server.
    PreferStandby,
}

impl TargetSessionAttrs {
    /// Every value, in libpq's order.
    pub const ALL: [TargetSessionAttrs; 6] = [
        TargetSessionAttrs::Any,
        TargetSessionAttrs::ReadWrite,
        TargetSessionAttrs::ReadOnly,
        TargetSessionAttrs::Primary,
        TargetSessionAttrs::Standby,
        TargetSessionAttrs::PreferStandby,
    ];

    /// The libpq spelling, e.g. `read-write`.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    /// The passes over the host list: `prefer-standby` looks for a standby on every host
    /// first, then takes any; the others make one pass.
    pub fn passes(self) -> &'static [TargetSessionAttrs] {
        match self {
            TargetSessionAttrs::PreferStandby => &[TargetSessionAttrs::Standby, TargetSessionAttrs::Any],
            TargetSessionAttrs::Any => &[TargetSessionAttrs::Any],
            TargetSessionAttrs::ReadWrite => &[TargetSessionAttrs::ReadWrite],
            TargetSessionAttrs::ReadOnly => &[TargetSessionAttrs::ReadOnly],
            TargetSessionAttrs::Primary => &[TargetSessionAttrs::Primary],
            TargetSessionAttrs::Standby => &[TargetSessionAttrs::Standby],
        }
    }

    /// Whether a server in `state` is one to settle on (in one pass of [`passes`](Self::passes)).
    pub fn accepts(self, state: SessionState) -> bool {
        match self {
            TargetSessionAttrs::Any | TargetSessionAttrs::PreferStandby => true,
            TargetSessionAttrs::ReadWrite => !state.in_recovery && !state.read_only,
            TargetSessionAttrs::ReadOnly => state.in_recovery || state.read_only,
            TargetSessionAttrs::Primary => !state.in_recovery,
            TargetSessionAttrs::Standby => state.in_recovery,
        }
    }
}

impl fmt::Display for TargetSessionAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a server is, for [`TargetSessionAttrs::accepts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionState {
    /// The server is a standby (`pg_is_in_recovery()`, `in_hot_standby`).
    pub in_recovery: bool,
    /// New transactions are read-only (`default_transaction_read_only`, or a standby).
    pub read_only: bool,
}

impl SessionState {
    /// How a server in this state is named in messages.
    pub fn describe(self) -> &'static str {
        match (self.in_recovery, self.read_only) {
            (true, _) => "a standby (in recovery)",
            (false, true) => "a primary with default_transaction_read_only = on",
            (false, false) => "a primary (read-write)",
        }
    }
}

/// Where the Postgres server is and how to log in, as libpq understands it.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Host names, IP addresses, or Unix socket directories (values starting
    /// with `/`), tried in order.
    pub hosts: Vec<String>,
    /// The port of each host, as many as [`hosts`](Self::hosts) (a port also names the
    /// Unix socket file `.s.PGSQL.{port}`).
    pub ports: Vec<u16>,
    /// Which server of the hosts to settle on.
    pub target_session_attrs: TargetSessionAttrs,
    /// The user to log in as.
    pub user: String,
    /// The password, if any. Never printed by `Debug` or [`ConnInfo::describe`].
    pub password: Option<String>,
    /// Where the password came from, named in the error when the server refuses it:
    /// `PGPASSWORD`, `the connection string`, or what the caller knows better (such as
    /// `password_file /run/secrets/pg`). Never the password itself.
    pub password_from: Option<String>,
    /// The database to connect to.
    pub dbname: String,
    /// TLS policy.
    pub sslmode: SslMode,
    /// A PEM file of CA certificates, or the literal `system` for the
    /// operating system's trust store.
    pub sslrootcert: Option<String>,
    /// A PEM client certificate (chain) file.
    pub sslcert: Option<String>,
    /// The PEM private key file for `sslcert`.
    pub sslkey: Option<String>,
    /// Limit for connecting, TLS and authentication to one host;
    /// [`Duration::ZERO`] waits indefinitely.
    pub connect_timeout: Duration,
    /// Reported to the server as `application_name`.
    pub application_name: String,
    /// Whether to enable TCP keepalives.
    pub keepalives: bool,
    /// Idle time before the first TCP keepalive probe.
    pub keepalives_idle: Duration,
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnInfo")
            .field("hosts", &self.hosts)
            .field("ports", &self.ports)
            .field("target_session_attrs", &self.target_session_attrs)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_from", &self.password_from)
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("sslcert", &self.sslcert)
            .field("sslkey", &self.sslkey)
            .field("connect_timeout", &self.connect_timeout)
            .field("application_name", &self.application_name)
            .field("keepalives", &self.keepalives)
            .field("keepalives_idle", &self.keepalives_idle)
            .finish()
    }
}

/// The longest `connect_timeout`: an hour. Beyond it a dead host holds walbust's
/// reconnect loop for longer than any outage it should wait out; `0` waits indefinitely.
const MAX_CONNECT_TIMEOUT_SECS: i64 = 3600;

/// A connection string that cannot be used. Never contains the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnInfoError {
    /// A key that libpq (or walbust) does not know.
    #[error("unknown connection option `{key}`{}", match suggestion {
        Some(s) => format!("; did you mean `{s}`?"),
        None => format!("; known options are {}", KEYS.join(", ")),
    })]
    UnknownKey {
        /// The key as written.
        key: String,
        /// The closest known key, if one is close.
        suggestion: Option<&'static str>,
    },
    /// A known key with a value that does not parse.
    #[error("invalid {key} `{value}`{}; expected {expected}", match origin {
        Some(var) => format!(" (from {var})"),
        None => String::new(),
    })]
    InvalidValue {
        /// The key.
        key: &'static str,
        /// The value as written.
        value: String,
        /// The environment variable it came from, if not the string.
        origin: Option<&'static str>,
        /// What would have been accepted.
        expected: String,
    },
    /// The string is not a well-formed URL or `key=value` list.
    #[error("{0}")]
    Syntax(String),
}

/// Every key [`ConnInfo::parse`] accepts.
pub const KEYS: &[&str] = &[
    "host",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "connect_timeout",
    "application_name",
    "keepalives",
    "keepalives_idle",
    "target_session_attrs",
];

/// The environment variable libpq reads for a key, if any.
fn env_var(key: &str) -> Option<&'static str> {
    Some(match key {
        "host" => "PGHOST",
        "port" => "PGPORT",
        "user" => "PGUSER",
        "password" => "PGPASSWORD",
        "dbname" => "PGDATABASE",
        "sslmode" => "PGSSLMODE",
        "sslrootcert" => "PGSSLROOTCERT",
        "sslcert" => "PGSSLCERT",
        "sslkey" => "PGSSLKEY",
        "connect_timeout" => "PGCONNECT_TIMEOUT",
        "application_name" => "PGAPPNAME",
        "target_session_attrs" => "PGTARGETSESSIONATTRS",
        _ => return None,
    })
}

/// Common misspellings and other drivers' names for known keys.
const ALIASES: &[(&str, &str)] = &[
    ("database", "dbname"),
    ("db", "dbname"),
    ("username", "user"),
    ("pass", "password"),
    ("passwd", "password"),
    ("pwd", "password"),
    ("hostname", "host"),
    ("hostaddr", "host"),
    ("server", "host"),
    ("timeout", "connect_timeout"),
    ("connecttimeout", "connect_timeout"),
    ("appname", "application_name"),
    ("application", "application_name"),
    ("ssl_mode", "sslmode"),
    ("tls", "sslmode"),
    ("sslca", "sslrootcert"),
    ("sslrootca", "sslrootcert"),
    ("keepalive", "keepalives"),
    ("targetsessionattrs", "target_session_attrs"),
    ("target_session_attr", "target_session_attrs"),
];

/// The default TCP keepalive idle time.
pub const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(60);
/// The default `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default `application_name`.
pub const DEFAULT_APPLICATION_NAME: &str = "walbust";

/// Where a raw value came from, for error messages.
#[derive(Clone, Copy)]
enum Origin {
    Text,
    Env(&'static str),
}

impl ConnInfo {
    /// Parses a libpq URL or `key=value` string, then fills the gaps from the
    /// environment (through `env`, so tests never read the real one) and from
    /// libpq's defaults.
    pub fn parse(s: &str, env: impl Fn(&str) -> Option<String>) -> Result<ConnInfo, ConnInfoError> {
        let trimmed = s.trim();
        let pairs = if let Some(rest) =
            trimmed.strip_prefix("postgresql://").or_else(|| trimmed.strip_prefix("postgres://"))
        {
            parse_url(rest)?
        } else if trimmed.contains("://") {
            return Err(ConnInfoError::Syntax("unsupported url scheme; expected postgres:// or postgresql://".into()));
        } else {
            parse_key_values(trimmed)?
        };

        // Later keys win, as in libpq; empty values count as not given.
        let mut raw: HashMap<&'static str, (String, Origin)> = HashMap::new();
        for (key, value) in pairs {
            let canonical = canonical_key(&key)?;
            if value.is_empty() {
                raw.remove(canonical);
            } else {
                raw.insert(canonical, (value, Origin::Text));
            }
        }
        for key in KEYS {
            if raw.contains_key(key) {
                continue;
            }
            if let Some(var) = env_var(key)
                && let Some(value) = env(var).filter(|v| !v.is_empty())
            {
                raw.insert(key, (value, Origin::Env(var)));
            }
        }

        let take = |key: &str| raw.get(key).map(|(v, o)| (v.as_str(), *o));
        let invalid = |key: &'static str, value: &str, origin: Origin, expected: &str| ConnInfoError::InvalidValue {
            key,
            value: value.to_string(),
            origin: match origin {
                Origin::Text => None,
                Origin::Env(var) => Some(var),
            },
            expected: expected.to_string(),
        };

        let hosts = match take("host") {
            Some((v, _)) => v.split(',').map(str::trim).filter(|h| !h.is_empty()).map(str::to_string).collect(),
            None => Vec::new(),
        };
        let hosts: Vec<String> = if hosts.is_empty() { vec!["localhost".to_string()] } else { hosts };

        let ports = match take("port") {
            Some((v, origin)) => {
                let expected = format!(
                    "port numbers between 1 and 65535: one for all hosts, or one per host ({} here)",
                    hosts.len()
                );
                let ports = parse_ports(v).ok_or_else(|| invalid("port", v, origin, &expected))?;
                match ports.len() {
                    1 => vec![ports[0]; hosts.len()],
                    n if n == hosts.len() => ports,
                    _ => return Err(invalid("port", v, origin, &expected)),
                }
            }
            None => vec![5432; hosts.len()],
        };

        let target_session_attrs = match take("target_session_attrs") {
            Some((v, origin)) => {
                TargetSessionAttrs::ALL.into_iter().find(|a| a.as_str() == v.trim()).ok_or_else(|| {
                    let names = TargetSessionAttrs::ALL.map(TargetSessionAttrs::as_str).join(", ");
                    invalid("target_session_attrs", v, origin, &format!("one of {names}"))
                })?
            }
            None => TargetSessionAttrs::Any,
        };

        let user = match take("user") {
            Some((v, _)) => v.to_string(),
            None => env("USER").filter(|u| !u.is_empty()).unwrap_or_else(|| "postgres".to_string()),
        };
        let (password, password_from) = match take("password") {
            Some((v, Origin::Env(var))) => (Some(v.to_string()), Some(var.to_string())),
            Some((v, Origin::Text)) => (Some(v.to_string()), Some("the connection string".to_string())),
            None => (None, None),
        };
        let dbname = take("dbname").map_or_else(|| user.clone(), |(v, _)| v.to_string());

        let sslmode = match take("sslmode") {
            Some((v, origin)) => v.parse::<SslMode>().map_err(|_| {
                invalid("sslmode", v, origin, &format!("one of {}", SslMode::ALL.map(SslMode::as_str).join(", ")))
            })?,
            None => SslMode::Prefer,
        };

        let connect_timeout = match take("connect_timeout") {
            Some((v, origin)) => {
                let secs: i64 = v.trim().parse().ok().filter(|n| *n <= MAX_CONNECT_TIMEOUT_SECS).ok_or_else(|| {
                    invalid("connect_timeout", v, origin, "a whole number of seconds up to 3600 (0 waits indefinitely)")
                })?;
                // libpq: zero or negative waits forever, and the minimum is 2 s.
                match secs {
                    ..=0 => Duration::ZERO,
                    1 => Duration::from_secs(2),
                    n => Duration::from_secs(n.unsigned_abs()),
                }
            }
            None => DEFAULT_CONNECT_TIMEOUT,
        };

        let keepalives = match take("keepalives") {
            Some((v, origin)) => {
                parse_bool(v).ok_or_else(|| invalid("keepalives", v, origin, "1 or 0 (or on/off, true/false)"))?
            }
            None => true,
        };
        let keepalives_idle = match take("keepalives_idle") {
            Some((v, origin)) => match v.trim().parse::<u64>() {
                Ok(n) if n > 0 => Duration::from_secs(n),
                _ => {
                    return Err(invalid("keepalives_idle", v, origin, "a whole number of seconds greater than 0"));
                }
            },
            None => DEFAULT_KEEPALIVES_IDLE,
        };

        Ok(ConnInfo {
            hosts,
            ports,
            target_session_attrs,
            user,
            password,
            password_from,
            dbname,
            sslmode,
            sslrootcert: take("sslrootcert").map(|(v, _)| v.to_string()),
            sslcert: take("sslcert").map(|(v, _)| v.to_string()),
            sslkey: take("sslkey").map(|(v, _)| v.to_string()),
            connect_timeout,
            application_name: take("application_name")
                .map_or_else(|| DEFAULT_APPLICATION_NAME.to_string(), |(v, _)| v.to_string()),
            keepalives,
            keepalives_idle,
        })
    }

    /// A description safe for logs: `user@host:port/db` (`user@a:1,b:2/db` for several
    /// hosts), never the password.
    pub fn describe(&self) -> String {
        let hosts: Vec<String> = self.targets().map(|(host, port)| format!("{host}:{port}")).collect();
        format!("{}@{}/{}", self.user, hosts.join(","), self.dbname)
    }

    /// Each host with its port, in the order they are tried.
    pub fn targets(&self) -> impl Iterator<Item = (&str, u16)> {
        self.hosts.iter().enumerate().map(|(i, h)| (h.as_str(), self.ports.get(i).copied().unwrap_or(5432)))
    }

    /// How one host of this `ConnInfo` is named in messages: `host:port`,
    /// `[v6]:port`, or the Unix socket path.
    pub fn endpoint(&self, host: &str, port: u16) -> String {
        if is_unix_host(host) {
            socket_path(host, port).display().to_string()
        } else if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }
}

/// Whether a host value names a Unix socket directory (starts with `/`).
pub fn is_unix_host(host: &str) -> bool {
    host.starts_with('/')
}

/// The Unix socket file of a server in `dir` listening on `port`.
pub fn socket_path(dir: &str, port: u16) -> PathBuf {
    PathBuf::from(dir).join(format!(".s.PGSQL.{port}"))
}

/// A comma list of ports; an empty entry is the default port, as in libpq.
fn parse_ports(v: &str) -> Option<Vec<u16>> {
    v.split(',')
        .map(|p| match p.trim() {
            "" => Some(5432),
            p => p.parse::<u16>().ok().filter(|&p| p > 0),
        })
        .collect()
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => Some(true),
        "0" | "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

fn canonical_key(key: &str) -> Result<&'static str, ConnInfoError> {
    if let Some(k) = KEYS.iter().find(|k| **k == key) {
        return Ok(k);
    }
    Err(ConnInfoError::UnknownKey { key: key.to_string(), suggestion: suggest(key) })
}

/// The known key closest to `key`, if it is close enough to be a typo.
fn suggest(key: &str) -> Option<&'static str> {
    let lower = key.to_ascii_lowercase();
    if let Some(k) = KEYS.iter().find(|k| **k == lower) {
        return Some(k);
    }
    if let Some((_, k)) = ALIASES.iter().find(|(alias, _)| *alias == lower) {
        return Some(k);
    }
    crate::input::spelling::did_you_mean(&lower, KEYS.iter().copied())
}

/// Splits a libpq `key=value` string into pairs, with libpq's quoting: values
/// may be single-quoted, and a backslash escapes the next character.
fn parse_key_values(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    // The previous value was an unquoted password: text that does not parse
    // next is probably part of it and must not be echoed.
    let mut after_bare_password = false;
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            if after_bare_password {
                return Err(after_password());
            }
            return Err(ConnInfoError::Syntax(format!(
                "missing `=` after `{key}` in connection string; expected key=value pairs or a postgres:// url"
            )));
        }
        if key.is_empty() {
            return Err(ConnInfoError::Syntax("missing key before `=` in connection string".into()));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = chars.next_if_eq(&'\'').is_some();
        if quoted {
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(unterminated(&key)),
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(unterminated(&key)),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if after_bare_password && canonical_key(&key).is_err() {
            // Most likely the rest of a password with a space in it.
            return Err(after_password());
        }
        after_bare_password = key == "password" && !quoted;
        pairs.push((key, value));
    }
    Ok(pairs)
}

fn after_password() -> ConnInfoError {
    ConnInfoError::Syntax(
        "unexpected text after the password in the connection string; quote a password containing spaces, e.g. password='a b'".into(),
    )
}

fn unterminated(key: &str) -> ConnInfoError {
    ConnInfoError::Syntax(format!("unterminated quoted value for `{key}` in connection string"))
}

/// Splits the part of a libpq URL after `postgres://` into `key=value` pairs:
/// `[user[:password]@][host[:port]][,...][/dbname][?key=value&...]`.
fn parse_url(rest: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut pairs = Vec::new();
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (before_query, None),
    };
    // The user info ends at the last `@`, so an unencoded `@` in a password works.
    let hostlist = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            pairs.push(("user".into(), percent_decode(user, "user name")?));
            if let Some(p) = password {
                pairs.push(("password".into(), percent_decode(p, "password")?));
            }
            hosts
        }
        None => authority,
    };

    let mut hosts = Vec::new();
    // One entry per host; empty where the host has no port of its own.
    let mut ports: Vec<String> = Vec::new();
    if !hostlist.is_empty() {
        for entry in hostlist.split(',') {
            let (host, port) = if let Some(v6) = entry.strip_prefix('[') {
                let (addr, after) = v6
                    .split_once(']')
                    .ok_or_else(|| ConnInfoError::Syntax("missing `]` after an IPv6 address in the url host".into()))?;
                let port = match after {
                    "" => None,
                    p => Some(p.strip_prefix(':').ok_or_else(|| {
                        ConnInfoError::Syntax(format!(
                            "unexpected `{p}` after IPv6 address `[{addr}]` in url; expected `:port`"
                        ))
                    })?),
                };
                (addr.to_string(), port)
            } else {
                match entry.split_once(':') {
                    Some((h, p)) => (percent_decode(h, "host")?, Some(p)),
                    None => (percent_decode(entry, "host")?, None),
                }
            };
            let port = match port {
                Some(p) => percent_decode(p, "port")?,
                None => String::new(),
            };
            if host.is_empty() && port.is_empty() {
                continue;
            }
            hosts.push(if host.is_empty() { "localhost".to_string() } else { host });
            ports.push(port);
        }
    }
    if !hosts.is_empty() {
        pairs.push(("host".into(), hosts.join(",")));
    }
    if ports.iter().any(|p| !p.is_empty()) {
        pairs.push(("port".into(), ports.join(",")));
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        pairs.push(("dbname".into(), percent_decode(db, "database name")?));
    }

    if let Some(query) = query {
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = param.split_once('=').ok_or_else(|| {
                ConnInfoError::Syntax(format!("missing `=` in url parameter `{param}`; expected key=value"))
            })?;
            let key = percent_decode(key, "parameter name")?;
            let what = if key == "password" { "password" } else { "parameter value" };
            let value = percent_decode(value, what)?;
            // libpq's alias from other drivers.
            if key == "ssl" && value == "true" {
                pairs.push(("sslmode".into(), "require".into()));
            } else {
                pairs.push((key, value));
            }
        }
    }
    Ok(pairs)
}

/// Decodes `%XX` escapes (not `+`, as libpq). `what` names the part in errors,
/// which never echo the text so a password cannot leak.
fn percent_decode(s: &str, what: &str) -> Result<String, ConnInfoError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    ConnInfoError::Syntax(format!(
                        "invalid percent-encoding in the url {what}; `%` must be followed by two hexadecimal digits"
                    ))
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| ConnInfoError::Syntax(format!("the url {what} is not valid utf-8 after percent-decoding")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| vars.get(k).cloned()
    }

    #[test]
    fn url_with_everything() {
        let c = ConnInfo::parse(
            "postgres://al%40ice:p%40ss%3Aw%2Frd@db.example.com:6543/my%20db?sslmode=verify-full&sslrootcert=/etc/ca.pem&connect_timeout=7&application_name=walbust-test",
            no_env,
        )
        .unwrap();
        assert_eq!(c.hosts, ["db.example.com"]);
        assert_eq!(c.ports, [6543]);
        assert_eq!(c.user, "al@ice");
        assert_eq!(c.password.as_deref(), Some("p@ss:w/rd"));
        assert_eq!(c.dbname, "my db");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(c.connect_timeout, Duration::from_secs(7));
        assert_eq!(c.application_name, "walbust-test");
        assert_eq!(c.describe(), "al@ice@db.example.com:6543/my db");
    }

    #[test]
    fn url_schemes_and_defaults() {
        for url in ["postgresql://", "postgres://", "postgresql:///", "postgres://?"] {
            let c = ConnInfo::parse(url, env_of(&[("USER", "carol")])).unwrap();
            assert_eq!(c.hosts, ["localhost"], "{url}");
            assert_eq!(c.ports, [5432]);
            assert_eq!(c.user, "carol");
            assert_eq!(c.dbname, "carol");
            assert_eq!(c.password, None);
            assert_eq!(c.sslmode, SslMode::Prefer);
            assert_eq!(c.connect_timeout, Duration::from_secs(10));
            assert_eq!(c.application_name, "walbust");
            assert!(c.keepalives);
            assert_eq!(c.keepalives_idle, DEFAULT_KEEPALIVES_IDLE);
        }
        let c = ConnInfo::parse("", no_env).unwrap();
        assert_eq!(c.user, "postgres");
        assert_eq!(c.dbname, "postgres");
    }

    #[test]
    fn url_unix_socket_hosts() {
        let c = ConnInfo::parse("postgresql:///app?host=/var/run/postgresql", no_env).unwrap();
        assert_eq!(c.hosts, ["/var/run/postgresql"]);
        assert_eq!(c.dbname, "app");
        assert!(is_unix_host(&c.hosts[0]));
        assert_eq!(c.endpoint(&c.hosts[0], c.ports[0]), "/var/run/postgresql/.s.PGSQL.5432");
        let c = ConnInfo::parse("postgresql://%2Ftmp%2Fpg:5433/app", no_env).unwrap();
        assert_eq!(c.hosts, ["/tmp/pg"]);
        assert_eq!(c.ports, [5433]);
    }

    #[test]
    fn url_multiple_hosts_and_ipv6() {
        let c = ConnInfo::parse("postgres://u@h1:5433,[::1]:5434,h3/db", no_env).unwrap();
        assert_eq!(c.hosts, ["h1", "::1", "h3"]);
        assert_eq!(c.ports, [5433, 5434, 5432], "a host without a port has the default");
        assert_eq!(c.endpoint("::1", 5434), "[::1]:5434");
        assert_eq!(c.describe(), "u@h1:5433,::1:5434,h3:5432/db");
        let c = ConnInfo::parse("postgres://h1:1,h2:2/db?target_session_attrs=read-write", no_env).unwrap();
        assert_eq!(c.targets().collect::<Vec<_>>(), [("h1", 1), ("h2", 2)]);
        assert_eq!(c.target_session_attrs, TargetSessionAttrs::ReadWrite);
    }

    #[test]
    fn key_value_hosts_with_a_port_each_or_one_for_all() {
        let c = ConnInfo::parse("host=a,b port=5432,5433 target_session_attrs=primary", no_env).unwrap();
        assert_eq!(c.targets().collect::<Vec<_>>(), [("a", 5432), ("b", 5433)]);
        assert_eq!(c.target_session_attrs, TargetSessionAttrs::Primary);
        let c = ConnInfo::parse("host=a,b,c port=6000", no_env).unwrap();
        assert_eq!(c.ports, [6000, 6000, 6000]);
        let c = ConnInfo::parse("host=a,b port=,6000", no_env).unwrap();
        assert_eq!(c.ports, [5432, 6000]);
        let err = ConnInfo::parse("host=a,b,c port=1,2", no_env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid port `1,2`; expected port numbers between 1 and 65535: one for all hosts, or one per host (3 here)"
        );
        let c = ConnInfo::parse("", env_of(&[("PGHOST", "a,b"), ("PGPORT", "1,2")])).unwrap();
        assert_eq!(c.targets().collect::<Vec<_>>(), [("a", 1), ("b", 2)]);
        assert_eq!(ConnInfo::parse("", no_env).unwrap().target_session_attrs, TargetSessionAttrs::Any);
    }

    #[test]
    fn target_session_attrs_as_libpq() {
        for a in TargetSessionAttrs::ALL {
            let c = ConnInfo::parse(&format!("target_session_attrs={a}"), no_env).unwrap();
            assert_eq!(c.target_session_attrs, a);
        }
        let c = ConnInfo::parse("", env_of(&[("PGTARGETSESSIONATTRS", "standby")])).unwrap();
        assert_eq!(c.target_session_attrs, TargetSessionAttrs::Standby);
        let err = ConnInfo::parse("target_session_attrs=master", no_env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid target_session_attrs `master`; expected one of any, read-write, read-only, primary, standby, prefer-standby"
        );
        let primary = SessionState { in_recovery: false, read_only: false };
        let read_only_primary = SessionState { in_recovery: false, read_only: true };
        let standby = SessionState { in_recovery: true, read_only: true };
        let accepted = |a: TargetSessionAttrs| [primary, read_only_primary, standby].map(|s| a.accepts(s));
        assert_eq!(accepted(TargetSessionAttrs::Any), [true, true, true]);
        assert_eq!(accepted(TargetSessionAttrs::ReadWrite), [true, false, false]);
        assert_eq!(accepted(TargetSessionAttrs::ReadOnly), [false, true, true]);
        assert_eq!(accepted(TargetSessionAttrs::Primary), [true, true, false]);
        assert_eq!(accepted(TargetSessionAttrs::Standby), [false, false, true]);
        assert_eq!(TargetSessionAttrs::PreferStandby.passes(), [TargetSessionAttrs::Standby, TargetSessionAttrs::Any]);
        assert_eq!(TargetSessionAttrs::Primary.passes(), [TargetSessionAttrs::Primary]);
    }

    #[test]
    fn url_ssl_true_alias_and_password_param() {
        let c = ConnInfo::parse("postgres://h/db?ssl=true&password=s%26cret", no_env).unwrap();
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(c.password.as_deref(), Some("s&cret"));
    }

    #[test]
    fn url_errors_never_echo_the_password() {
        let err = ConnInfo::parse("postgres://u:hunter2%zz@h/db", no_env).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("password"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        let err = ConnInfo::parse("postgres://h/db?password=hunter2%", no_env).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
        assert!(ConnInfo::parse("mysql://h/db", no_env).is_err());
    }

    #[test]
    fn key_value_form_with_quoting() {
        let c = ConnInfo::parse(
            r"host=db.internal port = 6000 user=bob password='a b\'c\\d' dbname=app sslmode=require application_name=x\ y",
            no_env,
        )
        .unwrap();
        assert_eq!(c.hosts, ["db.internal"]);
        assert_eq!(c.ports, [6000]);
        assert_eq!(c.user, "bob");
        assert_eq!(c.password.as_deref(), Some(r"a b'c\d"));
        assert_eq!(c.dbname, "app");
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(c.application_name, "x y");
    }

    #[test]
    fn key_value_empty_quoted_and_later_wins() {
        let c = ConnInfo::parse("password='' port=1 port=2 host=a,b", no_env).unwrap();
        assert_eq!(c.password, None);
        assert_eq!(c.ports, [2, 2], "one port for both hosts");
        assert_eq!(c.hosts, ["a", "b"]);
    }

    #[test]
    fn key_value_syntax_errors() {
        let err = ConnInfo::parse("host", no_env).unwrap_err();
        assert!(err.to_string().contains("missing `=` after `host`"), "{err}");
        let err = ConnInfo::parse("password='hunter2", no_env).unwrap_err();
        assert_eq!(err.to_string(), "unterminated quoted value for `password` in connection string");
        assert!(ConnInfo::parse("=x", no_env).is_err());
    }

    #[test]
    fn text_after_an_unquoted_password_is_not_echoed() {
        for input in ["password=hunter two", "password=hunter two=x", "user=u password=a secret=1"] {
            let err = ConnInfo::parse(input, no_env).unwrap_err().to_string();
            assert!(err.contains("quote a password containing spaces"), "{input}: {err}");
            assert!(!err.contains("two") && !err.contains("secret"), "{err}");
        }
        // A real key after the password is fine.
        let c = ConnInfo::parse("password=pw user=u", no_env).unwrap();
        assert_eq!(c.password.as_deref(), Some("pw"));
    }

    #[test]
    fn unknown_keys_suggest_the_closest() {
        let cases = [
            ("sslmdoe=require", "sslmode"),
            ("SSLMODE=require", "sslmode"),
            ("database=x", "dbname"),
            ("dbnmae=x", "dbname"),
            ("usr=x", "user"),
            ("connect_timout=3", "connect_timeout"),
            ("postgres://h/db?sslrootcrt=x", "sslrootcert"),
        ];
        for (input, want) in cases {
            match ConnInfo::parse(input, no_env) {
                Err(ConnInfoError::UnknownKey { suggestion, .. }) => {
                    assert_eq!(suggestion, Some(want), "{input}")
                }
                other => panic!("{input}: {other:?}"),
            }
        }
        let err = ConnInfo::parse("sslmdoe=require", no_env).unwrap_err();
        assert_eq!(err.to_string(), "unknown connection option `sslmdoe`; did you mean `sslmode`?");
        let err = ConnInfo::parse("zzzzzzzz=1", no_env).unwrap_err();
        assert!(err.to_string().contains("known options are host, port"), "{err}");
    }

    #[test]
    fn bad_values_name_value_and_choices() {
        let err = ConnInfo::parse("sslmode=verify_full", no_env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid sslmode `verify_full`; expected one of disable, allow, prefer, require, verify-ca, verify-full"
        );
        let err = ConnInfo::parse("port=abc", no_env).unwrap_err();
        assert!(err.to_string().starts_with("invalid port `abc`; expected port numbers"), "{err}");
        assert!(ConnInfo::parse("port=0", no_env).is_err());
        assert!(ConnInfo::parse("port=70000", no_env).is_err());
        assert!(ConnInfo::parse("port=1,2", no_env).is_err(), "two ports for one host");
        assert_eq!(ConnInfo::parse("port=7", no_env).unwrap().ports, [7]);
        let err = ConnInfo::parse("connect_timeout=10s", no_env).unwrap_err();
        assert!(err.to_string().contains("whole number of seconds"), "{err}");
        assert!(ConnInfo::parse("keepalives=maybe", no_env).is_err());
        assert!(ConnInfo::parse("keepalives_idle=0", no_env).is_err());
        let err = ConnInfo::parse("", env_of(&[("PGSSLMODE", "strict")])).unwrap_err();
        assert!(err.to_string().contains("`strict` (from PGSSLMODE)"), "{err}");
    }

    #[test]
    fn connect_timeout_follows_libpq() {
        let t = |v: &str| ConnInfo::parse(&format!("connect_timeout={v}"), no_env).unwrap().connect_timeout;
        assert_eq!(t("0"), Duration::ZERO);
        assert_eq!(t("-5"), Duration::ZERO);
        assert_eq!(t("1"), Duration::from_secs(2));
        assert_eq!(t("30"), Duration::from_secs(30));
    }

    #[test]
    fn a_connect_timeout_beyond_an_hour_is_refused() {
        assert_eq!(ConnInfo::parse("connect_timeout=3600", no_env).unwrap().connect_timeout, Duration::from_secs(3600));
        for bad in ["3601", "9223372036854775807", "99999999999999999999"] {
            let err = ConnInfo::parse(&format!("connect_timeout={bad}"), no_env).unwrap_err().to_string();
            assert!(err.contains("up to 3600"), "{err}");
        }
    }

    #[test]
    fn keepalive_settings() {
        let c = ConnInfo::parse("keepalives=0 keepalives_idle=15", no_env).unwrap();
        assert!(!c.keepalives);
        assert_eq!(c.keepalives_idle, Duration::from_secs(15));
        assert!(ConnInfo::parse("keepalives=on", no_env).unwrap().keepalives);
    }

    #[test]
    fn env_fills_only_what_the_string_leaves_out() {
        let env = env_of(&[
            ("PGHOST", "envhost"),
            ("PGPORT", "7777"),
            ("PGUSER", "envuser"),
            ("PGPASSWORD", "envpw"),
            ("PGDATABASE", "envdb"),
            ("PGSSLMODE", "verify-ca"),
            ("PGSSLROOTCERT", "system"),
            ("PGCONNECT_TIMEOUT", "4"),
            ("PGAPPNAME", "envapp"),
            ("USER", "osuser"),
        ]);
        let c = ConnInfo::parse("", &env).unwrap();
        assert_eq!(c.hosts, ["envhost"]);
        assert_eq!(c.ports, [7777]);
        assert_eq!(c.user, "envuser");
        assert_eq!(c.password.as_deref(), Some("envpw"));
        assert_eq!(c.dbname, "envdb");
        assert_eq!(c.sslmode, SslMode::VerifyCa);
        assert_eq!(c.sslrootcert.as_deref(), Some("system"));
        assert_eq!(c.connect_timeout, Duration::from_secs(4));
        assert_eq!(c.application_name, "envapp");

        let c = ConnInfo::parse("postgres://me:pw@h:1/db?sslmode=disable&application_name=a", &env).unwrap();
        assert_eq!(c.hosts, ["h"]);
        assert_eq!(c.ports, [1]);
        assert_eq!(c.user, "me");
        assert_eq!(c.password.as_deref(), Some("pw"));
        assert_eq!(c.dbname, "db");
        assert_eq!(c.sslmode, SslMode::Disable);
        assert_eq!(c.application_name, "a");
        // Not in the string, so still from the environment.
        assert_eq!(c.sslrootcert.as_deref(), Some("system"));
        assert_eq!(c.connect_timeout, Duration::from_secs(4));

        // dbname defaults to the user, whichever way the user was given.
        let c = ConnInfo::parse("user=zed", env_of(&[("USER", "osuser")])).unwrap();
        assert_eq!(c.dbname, "zed");
        let c = ConnInfo::parse("", env_of(&[("USER", "osuser")])).unwrap();
        assert_eq!((c.user.as_str(), c.dbname.as_str()), ("osuser", "osuser"));
    }

    #[test]
    fn debug_and_describe_redact_the_password() {
        let c = ConnInfo::parse("postgres://u:hunter2@h/db", no_env).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("<redacted>"));
        assert!(!c.describe().contains("hunter2"));
        assert_eq!(c.describe(), "u@h:5432/db");
    }

    #[test]
    fn sslmode_round_trips() {
        for m in SslMode::ALL {
            assert_eq!(m.as_str().parse::<SslMode>().unwrap(), m);
            assert_eq!(m.to_string(), m.as_str());
        }
        assert!(SslMode::VerifyCa.requires_tls());
        assert!(!SslMode::Prefer.requires_tls());
    }
}

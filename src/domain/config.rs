//! `config.toml`: where to read changes from, where the rules are, and where Redis is.
//!
//! Loading is two steps, as for all user input: plain serde structs that deny unknown
//! fields, then a validated [`Config`]. Every problem found is collected and reported
//! together, each at its `file:line:col`.

use crate::domain::diagnostic::{self, Diagnostic, Diagnostics, LineIndex};
use crate::input::user_file::{self, Kind, ReadError};
use crate::postgres::ConnInfo;
use serde::Deserialize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// The validated configuration the pipeline runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// Rule file globs, made absolute relative to the config file's directory.
    pub rules: Vec<String>,
    /// The Postgres side.
    pub source: SourceConfig,
    /// The Redis side.
    pub redis: RedisConfig,
    /// Batching of actions on their way to Redis.
    pub batch: BatchConfig,
    /// The metrics and health endpoint.
    pub metrics: MetricsConfig,
    /// What keeps caches from going stale although no invalidation was lost.
    pub consistency: ConsistencyConfig,
}

/// `[consistency]`: the visibility gate and the delayed second delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistencyConfig {
    /// Apply a transaction's actions only once it is visible to new snapshots.
    pub visibility_gate: bool,
    /// Apply every delete-type action again this long after its transaction became
    /// visible; `None` when `redelete_after = "off"`.
    pub redelete_after: Option<Duration>,
}

/// The default `redelete_after`: longer than any cache-aside reader's SELECT-to-SET time
/// seen under load (well under a second), short enough that the flushed position, which
/// waits for the second delete, trails by about a second.
pub const DEFAULT_REDELETE_AFTER: Duration = Duration::from_secs(1);

impl Default for ConsistencyConfig {
    fn default() -> Self {
        ConsistencyConfig { visibility_gate: true, redelete_after: Some(DEFAULT_REDELETE_AFTER) }
    }
}

/// `[source]`: the database, slot and publication.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Connection parameters, with `PG*` environment variables filled in.
    pub conninfo: ConnInfo,
    /// The logical replication slot walbust holds.
    pub slot: String,
    /// The publication whose tables are streamed.
    pub publication: String,
    /// Create the slot when it is missing.
    pub create_slot: bool,
    /// Make the slot a failover slot (PostgreSQL 17 and later), which standbys with
    /// `sync_replication_slots = on` keep in step, so that it survives a promotion.
    pub failover: bool,
    /// How often a standby status update is sent even when nothing changed.
    pub status_interval: Duration,
    /// How long the stream may stay silent (after a status update asking for a reply)
    /// before the connection is considered dead and re-established.
    pub read_timeout: Duration,
    /// The logical decoding message prefix that carries manual invalidations.
    pub message_prefix: String,
    /// Which manual invalidations are applied.
    pub manual: crate::domain::rules::manual::ManualPolicy,
    /// What to do when the slot is lost.
    pub on_slot_lost: OnSlotLost,
    /// Actions run after a lost slot is recreated, since invalidations in between are gone.
    pub flush: Vec<crate::domain::action::Action>,
    /// How often a heartbeat message is written; `None` when disabled.
    pub heartbeat_interval: Option<Duration>,
    /// While another process holds the slot, walbust stands by and takes the slot over
    /// within this long of its release.
    pub standby_takeover: Duration,
}

/// `on_slot_lost`: the policy for a slot that was invalidated, dropped, or left behind by a failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnSlotLost {
    /// Stop with a clear message and a non-zero exit code.
    #[default]
    Error,
    /// Recreate the slot, run the `flush` actions, and go on.
    Recreate,
}

/// Where /metrics and /healthz are served unless `[metrics] listen` says otherwise. Port
/// 19187 lies outside 9100-9999, the range the Prometheus exporters' default ports are
/// allocated from (9187 there is postgres_exporter's, which often runs beside walbust).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:19187";

/// `[metrics]`: where /metrics and /healthz are served.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Address to listen on; `None` when disabled with `listen = "off"`.
    pub listen: Option<String>,
}

/// `[redis]`: where invalidations go.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URL.
    pub url: String,
    /// PEM CA bundle trusted for `rediss://`, read from `ca_file`; public roots when absent.
    pub ca_pem: Option<Vec<u8>>,
    /// JSON Lines file that actions Redis refused for good are appended to, if any.
    pub dead_letter_file: Option<PathBuf>,
    /// One node, a cluster, or a master found through Sentinel.
    pub topology: RedisTopology,
}

/// How the Redis behind `[redis]` is laid out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RedisTopology {
    /// One node at `url`.
    #[default]
    Single,
    /// A Redis Cluster (`cluster = true`): `url` and these URLs are seed nodes.
    Cluster {
        /// More seed nodes from `nodes`, besides `url`.
        nodes: Vec<String>,
    },
    /// A master found through Sentinel: `url` gives its credentials, database and TLS only.
    Sentinel {
        /// The Sentinel URLs from `sentinels`.
        sentinels: Vec<String>,
        /// The name the Sentinels monitor the master under (`master_name`).
        master_name: String,
        /// Replicas that must confirm a batch (`WAIT`) before it counts as applied.
        wait_replicas: u32,
    },
}

/// `[batch]`: how actions are grouped before they are sent.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Distinct actions after which a batch is sent even while changes keep arriving.
    pub max_actions: usize,
    /// Age after which a batch is sent even while changes keep arriving.
    pub max_delay: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { max_actions: 5000, max_delay: Duration::from_millis(50) }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    rules: Vec<Spanned<String>>,
    source: Spanned<RawSource>,
    redis: Spanned<RawRedis>,
    #[serde(default)]
    batch: Option<RawBatch>,
    #[serde(default)]
    metrics: Option<RawMetrics>,
    #[serde(default)]
    consistency: Option<RawConsistency>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsistency {
    #[serde(default)]
    visibility_gate: Option<bool>,
    #[serde(default)]
    redelete_after: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    #[serde(default)]
    listen: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    url: Spanned<String>,
    #[serde(default)]
    password_file: Option<Spanned<String>>,
    #[serde(default)]
    slot: Option<Spanned<String>>,
    #[serde(default)]
    publication: Option<Spanned<String>>,
    #[serde(default)]
    create_slot: Option<bool>,
    #[serde(default)]
    failover: bool,
    #[serde(default)]
    status_interval: Option<Spanned<String>>,
    #[serde(default)]
    read_timeout: Option<Spanned<String>>,
    #[serde(default)]
    message_prefix: Option<Spanned<String>>,
    #[serde(default)]
    manual_prefixes: Vec<String>,
    #[serde(default)]
    manual_match_all: bool,
    #[serde(default)]
    on_slot_lost: Option<Spanned<String>>,
    #[serde(default)]
    flush: Option<crate::domain::action::Invalidation>,
    #[serde(default)]
    heartbeat_interval: Option<Spanned<String>>,
    #[serde(default)]
    standby_takeover: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Spanned<String>,
    #[serde(default)]
    ca_file: Option<Spanned<String>>,
    #[serde(default)]
    dead_letter_file: Option<String>,
    #[serde(default)]
    cluster: bool,
    #[serde(default)]
    nodes: Vec<Spanned<String>>,
    #[serde(default)]
    sentinels: Vec<Spanned<String>>,
    #[serde(default)]
    master_name: Option<Spanned<String>>,
    #[serde(default)]
    wait_replicas: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    #[serde(default)]
    max_actions: Option<Spanned<i64>>,
    #[serde(default)]
    max_delay: Option<Spanned<String>>,
}

/// Why a config file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The file has problems, listed with their places.
    #[error("{0}")]
    Invalid(Diagnostics),
}

impl Config {
    /// Reads and validates `path`, taking `${VAR}` values and `PG*` defaults from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = user_file::read_to_string(path, Kind::Config)?;
        Config::parse(path, &text, &|name| std::env::var(name).ok())
    }

    /// [`Config::load`] for commands that never log in as the walbust role (printing the
    /// setup script): a `password_file` that cannot be read leaves the password unset
    /// instead of failing, so the walbust role's secret need not exist on this host yet.
    pub fn load_without_password(path: &Path) -> Result<Config, ConfigError> {
        let text = user_file::read_to_string(path, Kind::Config)?;
        Config::parse_with(path, &text, &|name| std::env::var(name).ok(), false, true).map(|(c, _)| c)
    }

    /// [`Config::load`] for the offline `check`, which connects nowhere and so reads no
    /// secret: `password_file` is not read, and an unset `${VAR}` is a note (returned
    /// beside the config) instead of an error. Nothing from it may be used to connect.
    pub fn load_offline(path: &Path) -> Result<(Config, Diagnostics), ConfigError> {
        let text = user_file::read_to_string(path, Kind::Config)?;
        Config::parse_with(path, &text, &|name| std::env::var(name).ok(), false, false)
    }

    /// Validates `text`, the contents of `path`, with `env` standing in for the environment.
    pub fn parse(path: &Path, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Config::parse_with(path, text, env, true, true).map(|(c, _)| c)
    }

    fn parse_with(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        need_password: bool,
        secrets: bool,
    ) -> Result<(Config, Diagnostics), ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let mut d = diagnostic::from_toml(path, text, &e);
            d.message = redact_secrets(&d.message);
            d.hint = d.hint.map(|h| redact_secrets(&h));
            ConfigError::Invalid(Diagnostics(vec![d]))
        })?;
        let lines = LineIndex::new(text);
        let mut v = Validator { path, lines, env, need_password, secrets, deferred: Vec::new(), problems: Vec::new() };
        let config = v.config(raw);
        match config {
            Some(c) if v.problems.is_empty() => Ok((c, Diagnostics(v.deferred))),
            _ => Err(ConfigError::Invalid(Diagnostics(v.problems))),
        }
    }
}

struct Validator<'a> {
    path: &'a Path,
    lines: LineIndex<'a>,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Whether an unreadable `password_file` is an error.
    need_password: bool,
    /// Whether secrets are read; the offline `check` reads none.
    secrets: bool,
    /// Secrets left unread, as warnings for the offline `check`.
    deferred: Vec<Diagnostic>,
    problems: Vec<Diagnostic>,
}

impl Validator<'_> {
    /// Records an error; URL passwords and `password=` values in the message and hint are
    /// masked, since messages quote values from the file and its `${VAR}`s.
    fn error(&mut self, span: Range<usize>, message: String, hint: Option<&str>) {
        let mut d = Diagnostic::error_in(self.path, &self.lines, Some(span), redact_secrets(&message));
        if let Some(h) = hint {
            d = d.with_hint(redact_secrets(h));
        }
        self.problems.push(d);
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let base = self.path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut rules = Vec::new();
        for glob in &raw.rules {
            if let Err(e) = glob::Pattern::new(glob.get_ref()) {
                self.error(glob.span(), format!("invalid rules glob `{}`: {}", glob.get_ref(), e.msg), None);
            }
            let p = Path::new(glob.get_ref());
            rules.push(if p.is_absolute() { p.to_path_buf() } else { base.join(p) }.display().to_string());
        }
        if raw.rules.is_empty() {
            self.problems.push(
                Diagnostic::error_in(self.path, &self.lines, Some(0..0), "no rule files: `rules` is missing or empty")
                    .with_hint("add rules = [\"rules/*.toml\"] at the top of the file"),
            );
        }
        let source_span = raw.source.span();
        let source = self.source(raw.source.into_inner(), source_span);
        let redis = self.redis(raw.redis.into_inner());
        let batch = raw.batch.map(|b| self.batch(b)).unwrap_or_default();
        let consistency = raw.consistency.map(|c| self.consistency(c)).unwrap_or_default();
        let listen = match raw.metrics.and_then(|m| m.listen) {
            None => Some(DEFAULT_METRICS_LISTEN.to_string()),
            Some(l) if l.get_ref() == "off" => None,
            Some(l) => {
                if l.get_ref().parse::<std::net::SocketAddr>().is_err() {
                    self.error(
                        l.span(),
                        format!("invalid metrics listen address `{}`", l.get_ref()),
                        Some("write host:port, such as 127.0.0.1:19187, or \"off\""),
                    );
                }
                Some(l.into_inner())
            }
        };
        Some(Config {
            path: self.path.to_path_buf(),
            rules,
            source: source?,
            redis: redis?,
            batch,
            metrics: MetricsConfig { listen },
            consistency,
        })
    }

    fn source(&mut self, raw: RawSource, span: Range<usize>) -> Option<SourceConfig> {
        let url = self.interpolate(&raw.url)?;
        let mut conninfo = match ConnInfo::parse(&url, self.env) {
            Ok(c) => c,
            Err(e) => {
                self.error(raw.url.span(), format!("invalid source url: {e}"), None);
                return None;
            }
        };
        if conninfo.password_from.as_deref() == Some("the connection string") {
            conninfo.password_from = Some(self.url_password_origin(raw.url.get_ref(), conninfo.password.as_deref()));
        }
        if let Some(file) = raw.password_file.as_ref().filter(|_| self.secrets) {
            match user_file::read_to_string(&self.relative(file.get_ref()), Kind::Password) {
                Ok(pw) => {
                    conninfo.password = Some(pw.trim_end_matches(['\r', '\n']).to_string());
                    conninfo.password_from = Some(format!("password_file `{}`", file.get_ref()));
                }
                Err(_) if !self.need_password => {}
                Err(e) => self.error(
                    file.span(),
                    format!("cannot use password_file `{}`: {}", file.get_ref(), e.with_reason()),
                    Some("give a readable file holding only the password"),
                ),
            }
        }
        let name = |v: &Option<Spanned<String>>, what: &str, this: &mut Self| -> String {
            match v {
                None => "walbust".to_string(),
                Some(s) => {
                    let ok = !s.get_ref().is_empty()
                        && s.get_ref().len() <= 63
                        && s.get_ref().bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                    if !ok {
                        this.error(
                            s.span(),
                            format!("invalid {what} name `{}`", s.get_ref()),
                            Some("use 1 to 63 lowercase letters, digits or underscores"),
                        );
                    }
                    s.get_ref().clone()
                }
            }
        };
        let slot = name(&raw.slot, "slot", self);
        let publication = name(&raw.publication, "publication", self);
        let status_interval =
            self.duration("status_interval", raw.status_interval.as_ref(), Duration::from_secs(10), STATUS_INTERVAL);
        let read_timeout =
            self.duration("read_timeout", raw.read_timeout.as_ref(), Duration::from_secs(60), READ_TIMEOUT);
        if read_timeout <= status_interval {
            self.error(
                raw.read_timeout.as_ref().map_or(span.clone(), |r| r.span()),
                format!("read_timeout ({read_timeout:?}) must be longer than status_interval ({status_interval:?})"),
                Some("the server answers a status update within status_interval; give read_timeout several of them"),
            );
        }
        let on_slot_lost = match raw.on_slot_lost.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
            None | Some(("error", _)) => OnSlotLost::Error,
            Some(("recreate", _)) => OnSlotLost::Recreate,
            Some((other, span)) => {
                self.error(
                    span,
                    format!("invalid on_slot_lost `{other}`"),
                    Some("use \"error\" (the default) or \"recreate\""),
                );
                OnSlotLost::Error
            }
        };
        let flush = raw.flush.map(crate::domain::action::Invalidation::into_actions);
        if on_slot_lost == OnSlotLost::Recreate && flush.as_ref().is_none_or(Vec::is_empty) {
            let at = raw.on_slot_lost.as_ref().map_or(span.clone(), |s| s.span());
            self.problems.push(
                Diagnostic::warning_in(self.path, &self.lines, Some(at), "on_slot_lost = \"recreate\" without `flush` actions")
                    .with_hint("invalidations lost with the slot are not replayed; add flush = { patterns = [\"...\"] } for the caches the rules serve"),
            );
        }
        let heartbeat_interval = match raw.heartbeat_interval.as_ref() {
            Some(s) if s.get_ref() == "off" => None,
            other => Some(self.duration("heartbeat_interval", other, Duration::from_secs(30), HEARTBEAT_INTERVAL)),
        };
        let standby_takeover =
            self.duration("standby_takeover", raw.standby_takeover.as_ref(), Duration::from_secs(5), STANDBY_TAKEOVER);
        Some(SourceConfig {
            conninfo,
            standby_takeover,
            on_slot_lost,
            flush: flush.unwrap_or_default(),
            heartbeat_interval,
            slot,
            publication,
            create_slot: raw.create_slot.unwrap_or(true),
            failover: raw.failover,
            status_interval,
            read_timeout,
            message_prefix: self.message_prefix(raw.message_prefix),
            manual: crate::domain::rules::manual::ManualPolicy {
                prefixes: raw.manual_prefixes,
                match_all: raw.manual_match_all,
            },
        })
    }

    /// The manual invalidation prefix; never the heartbeats' own, which would turn every
    /// heartbeat into a malformed manual message (prefixes are matched exactly).
    fn message_prefix(&mut self, raw: Option<Spanned<String>>) -> String {
        let Some(raw) = raw else { return "walbust".to_string() };
        if raw.get_ref().is_empty() || raw.get_ref() == crate::postgres::HEARTBEAT_PREFIX {
            self.error(
                raw.span(),
                format!("message_prefix = \"{}\" cannot carry manual invalidations", raw.get_ref()),
                Some(&format!(
                    "choose another non-empty prefix, such as \"walbust\" (the default); \"{}\" carries walbust's heartbeats",
                    crate::postgres::HEARTBEAT_PREFIX
                )),
            );
        }
        raw.into_inner()
    }

    fn redis(&mut self, raw: RawRedis) -> Option<RedisConfig> {
        let url = self.interpolate(&raw.url)?;
        if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis+unix://")) {
            self.error(
                raw.url.span(),
                format!("invalid redis url `{}`", redact_url(&url)),
                Some("use redis://host:port/db, or rediss://host:port/db for TLS"),
            );
            return None;
        }
        // redis-rs' own parser, so that `check` rejects exactly what `run` would, and what
        // would fail on every connection attempt is an error now rather than a retry loop.
        let tls = match redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
            Err(e) => {
                self.error(
                    raw.url.span(),
                    format!("invalid redis url `{}`: {e}", redact_url(&url)),
                    Some("use redis://host:port/db, rediss://host:port/db for TLS, or redis+unix:///path"),
                );
                return None;
            }
            Ok(info) => match info.addr() {
                redis::ConnectionAddr::TcpTls { insecure: true, .. } => {
                    self.error(
                        raw.url.span(),
                        format!(
                            "redis url `{}` asks for #insecure TLS, which walbust does not support",
                            redact_url(&url)
                        ),
                        Some("remove #insecure, and set ca_file to the CA that signed the Redis server certificate"),
                    );
                    return None;
                }
                addr => matches!(addr, redis::ConnectionAddr::TcpTls { .. }),
            },
        };
        let ca_pem = match &raw.ca_file {
            None => None,
            Some(file) if !tls => {
                self.error(
                    file.span(),
                    format!("ca_file `{}` is set but the redis url is not rediss://", file.get_ref()),
                    Some("use a rediss:// url for TLS, or remove ca_file"),
                );
                None
            }
            Some(file) => match user_file::read(&self.relative(file.get_ref()), Kind::Pem) {
                Ok(pem) if !holds_a_certificate(&pem) => {
                    self.error(
                        file.span(),
                        format!("ca_file `{}` holds no PEM certificate", file.get_ref()),
                        Some("give the PEM file (-----BEGIN CERTIFICATE-----) of the CA that signed the Redis server certificate"),
                    );
                    None
                }
                Ok(pem) => Some(pem),
                Err(e) => {
                    self.error(
                        file.span(),
                        format!("cannot use ca_file `{}`: {}", file.get_ref(), e.with_reason()),
                        Some("give the PEM file of the CA that signed the Redis server certificate"),
                    );
                    None
                }
            },
        };
        let topology = self.topology(&raw, &url, tls)?;
        let dead_letter_file = raw.dead_letter_file.map(|f| self.relative(&f));
        Some(RedisConfig { url, ca_pem, dead_letter_file, topology })
    }

    /// `cluster`, `nodes`, `sentinels` and `master_name`: at most one topology, and URLs
    /// redis-rs accepts, with TLS the same as `url`'s for the seed nodes.
    fn topology(&mut self, raw: &RawRedis, url: &str, tls: bool) -> Option<RedisTopology> {
        if let Some(n) = raw.wait_replicas.as_ref().filter(|_| raw.sentinels.is_empty()) {
            self.error(
                n.span(),
                "`wait_replicas` is set without `sentinels`".into(),
                Some("wait_replicas applies to a master found through Sentinel; remove it"),
            );
            return None;
        }
        let nodes = self.urls(&raw.nodes, "nodes", url, tls)?;
        let sentinels = self.urls(&raw.sentinels, "sentinels", url, tls)?;
        if !raw.nodes.is_empty() && !raw.cluster {
            self.error(
                raw.nodes[0].span(),
                "`nodes` is set but `cluster` is not".into(),
                Some("add cluster = true for a Redis Cluster, or remove nodes"),
            );
            return None;
        }
        match (raw.cluster, sentinels.is_empty(), &raw.master_name) {
            (false, true, None) => Some(RedisTopology::Single),
            (true, true, None) => {
                if url.starts_with("redis+unix://") {
                    self.error(
                        raw.url.span(),
                        "a cluster cannot be reached over a Unix socket".into(),
                        Some("give a cluster node as redis://host:port"),
                    );
                    return None;
                }
                Some(RedisTopology::Cluster { nodes })
            }
            (false, false, Some(name)) if !name.get_ref().is_empty() => {
                let wait_replicas = match &raw.wait_replicas {
                    None => 1,
                    Some(n) => match u32::try_from(*n.get_ref()) {
                        Ok(n) if n <= 16 => n,
                        _ => {
                            self.error(
                                n.span(),
                                format!("wait_replicas = {} is out of range", n.get_ref()),
                                Some("give how many replicas must confirm a batch, 0 to 16 (default 1)"),
                            );
                            return None;
                        }
                    },
                };
                Some(RedisTopology::Sentinel { sentinels, master_name: name.get_ref().clone(), wait_replicas })
            }
            (false, false, _) => {
                self.error(
                    raw.sentinels[0].span(),
                    "`sentinels` is set without `master_name`".into(),
                    Some("add master_name = \"mymaster\", the name the Sentinels monitor the master under"),
                );
                None
            }
            (false, true, Some(name)) => {
                self.error(
                    name.span(),
                    "`master_name` is set without `sentinels`".into(),
                    Some("add sentinels = [\"redis://sentinel-1:26379\", ...], or remove master_name"),
                );
                None
            }
            (true, _, _) => {
                self.error(
                    raw.url.span(),
                    "`cluster = true` and `sentinels` both set: a Redis Cluster is not run with Sentinel".into(),
                    Some("keep cluster = true for a Redis Cluster, or sentinels and master_name for Sentinel"),
                );
                None
            }
        }
    }

    /// The URLs of `nodes` or `sentinels`, each one redis-rs accepts; cluster nodes with
    /// the same TLS as `url`.
    fn urls(&mut self, list: &[Spanned<String>], what: &str, url: &str, tls: bool) -> Option<Vec<String>> {
        let mut out = Vec::new();
        for item in list {
            let value = self.interpolate(item)?;
            match redis::IntoConnectionInfo::into_connection_info(value.as_str()) {
                Ok(info) if what == "nodes" && matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) != tls => {
                    self.error(
                        item.span(),
                        format!("node `{}` and url `{}` differ in TLS", redact_url(&value), redact_url(url)),
                        Some("give every cluster node as rediss:// when url is rediss://, and as redis:// otherwise"),
                    );
                    return None;
                }
                Ok(_) => out.push(value),
                Err(e) => {
                    self.error(
                        item.span(),
                        format!("invalid {what} url `{}`: {e}", redact_url(&value)),
                        Some("use redis://host:port, or rediss://host:port for TLS"),
                    );
                    return None;
                }
            }
        }
        Some(out)
    }

    /// A path from the file, relative to the config file's directory.
    fn relative(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() { p.to_path_buf() } else { self.path.parent().unwrap_or(Path::new("")).join(p) }
    }

    fn batch(&mut self, raw: RawBatch) -> BatchConfig {
        let default = BatchConfig::default();
        let max_actions = match raw.max_actions {
            None => default.max_actions,
            Some(n) if (1..=1_000_000).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                self.error(
                    n.span(),
                    format!("max_actions = {} is out of range", n.get_ref()),
                    Some("use 1 to 1000000"),
                );
                default.max_actions
            }
        };
        let max_delay = self.duration("max_delay", raw.max_delay.as_ref(), default.max_delay, MAX_DELAY);
        BatchConfig { max_actions, max_delay }
    }

    fn consistency(&mut self, raw: RawConsistency) -> ConsistencyConfig {
        let default = ConsistencyConfig::default();
        let redelete_after = match raw.redelete_after.as_ref() {
            Some(s) if s.get_ref() == "off" => None,
            other => Some(self.duration("redelete_after", other, DEFAULT_REDELETE_AFTER, REDELETE_AFTER)),
        };
        ConsistencyConfig { visibility_gate: raw.visibility_gate.unwrap_or(default.visibility_gate), redelete_after }
    }

    /// The duration `raw` gives for the setting `key`, or `default`; a value outside `bounds`
    /// is an error, so that no setting overflows a deadline or spins in a loop.
    fn duration(&mut self, key: &str, raw: Option<&Spanned<String>>, default: Duration, bounds: Bounds) -> Duration {
        let Some(raw) = raw else { return default };
        match parse_duration(raw.get_ref()) {
            Some(d) if bounds.contains(&d) => d,
            Some(_) => {
                self.error(
                    raw.span(),
                    format!("{key} = \"{}\" is out of range", raw.get_ref()),
                    Some(&format!("use {} to {}", show_duration(*bounds.start()), show_duration(*bounds.end()))),
                );
                default
            }
            None => {
                self.error(
                    raw.span(),
                    format!("invalid duration `{}`", raw.get_ref()),
                    Some("write a number and a unit: 250ms, 10s, 5m or 1h"),
                );
                default
            }
        }
    }

    /// Where a password written in `[source] url` came from: the `${VAR}` whose value it
    /// holds, or the url itself.
    fn url_password_origin(&self, url: &str, password: Option<&str>) -> String {
        let mut rest = url;
        while let Some(start) = rest.find("${") {
            let Some(len) = rest[start + 2..].find('}') else { break };
            let name = &rest[start + 2..start + 2 + len];
            let value = (self.env)(name).unwrap_or_default();
            if !value.is_empty() && password.is_some_and(|p| p.contains(value.as_str())) {
                return format!("`${{{name}}}` in [source] url");
            }
            rest = &rest[start + 3 + len..];
        }
        format!("[source] url in {}", self.path.display())
    }

    /// Replaces `${VAR}` with the variable's value, so that secrets stay out of the file.
    fn interpolate(&mut self, raw: &Spanned<String>) -> Option<String> {
        let s = raw.get_ref();
        let mut out = String::with_capacity(s.len());
        let mut rest = s.as_str();
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let Some(len) = rest[start + 2..].find('}') else {
                self.error(raw.span(), format!("unclosed `${{` in `{s}`"), Some("write ${NAME}"));
                return None;
            };
            let name = &rest[start + 2..start + 2 + len];
            match (self.env)(name) {
                Some(v) => out.push_str(&v),
                None if !self.secrets => {
                    self.deferred.push(
                        Diagnostic::warning_in(
                            self.path,
                            &self.lines,
                            Some(raw.span()),
                            format!("environment variable `{name}` is not set (not needed offline)"),
                        )
                        .with_hint("run and check --online need it"),
                    );
                    // A stand-in that keeps a URL parsable in any position (port, host, password).
                    out.push('0');
                }
                None => {
                    self.error(
                        raw.span(),
                        format!("environment variable `{name}` is not set"),
                        Some("export it before starting walbust"),
                    );
                    return None;
                }
            }
            rest = &rest[start + 3 + len..];
        }
        out.push_str(rest);
        Some(out)
    }
}

/// Removes the password from a `redis://user:password@host` URL for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

/// `text` with every URL password (`scheme://user:PASSWORD@host`) and every `password=`
/// value of a `key=value` connection string replaced by `***`.
pub fn redact_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    // A URL's authority ends at the first character that cannot be in a URL written in a
    // message; its password sits between the first `:` and the last `@` of it.
    while let Some(at) = rest.find("://") {
        let (head, url) = rest.split_at(at + 3);
        out.push_str(head);
        let end = url.find(|c: char| c.is_whitespace() || matches!(c, '`' | '"' | '\'')).unwrap_or(url.len());
        let (authority, tail) = url.split_at(end);
        match authority.rfind('@').and_then(|a| authority[..a].find(':').map(|c| (c, a))) {
            Some((colon, at)) => {
                out.push_str(&authority[..=colon]);
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = tail;
    }
    out.push_str(rest);
    redact_password_values(&out)
}

/// `password=VALUE` (any case, quoted or not) with the value replaced by `***`.
fn redact_password_values(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    let mut search = 0;
    while let Some(found) = lower[search..].find("password") {
        let key_end = search + found + "password".len();
        let after = &text[key_end..];
        let eq = after.len() - after.trim_start().len();
        search = key_end;
        if !after[eq..].starts_with('=') {
            continue;
        }
        let value_start = key_end + eq + 1;
        let value = &text[value_start..];
        let skip = value.len() - value.trim_start().len();
        let value = &value[skip..];
        let len = if let Some(quoted) = value.strip_prefix('\'') {
            quoted.find('\'').map_or(value.len(), |q| q + 2)
        } else {
            value.find(|c: char| c.is_whitespace() || matches!(c, '`' | '"' | '&')).unwrap_or(value.len())
        };
        out.push_str(&text[from..value_start + skip]);
        out.push_str("***");
        from = value_start + skip + len;
        search = from;
    }
    out.push_str(&text[from..]);
    out
}

/// True when `pem` holds at least one certificate rustls can use as a root.
fn holds_a_certificate(pem: &[u8]) -> bool {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem).filter_map(Result::ok).collect();
    rustls::RootCertStore::empty().add_parsable_certificates(certs).0 > 0
}

/// The range a duration setting accepts, both ends included.
pub type Bounds = std::ops::RangeInclusive<Duration>;

/// `[source] status_interval`: often enough to be cheap, seldom enough that the server's
/// `wal_sender_timeout` (60 s by default) never fires.
pub const STATUS_INTERVAL: Bounds = Duration::from_millis(100)..=Duration::from_secs(600);
/// `[source] read_timeout`: a silent server is noticed within an hour at most, and a
/// timeout shorter than a second would drop healthy connections in a loop.
pub const READ_TIMEOUT: Bounds = Duration::from_secs(1)..=Duration::from_secs(3600);
/// `[source] standby_takeover`: a standby asks for the slot at least twice a second at
/// most, and takes over within ten minutes at worst.
pub const STANDBY_TAKEOVER: Bounds = Duration::from_secs(1)..=Duration::from_secs(600);
/// `[source] heartbeat_interval` (unless `"off"`).
pub const HEARTBEAT_INTERVAL: Bounds = Duration::from_millis(100)..=Duration::from_secs(3600);
/// `[batch] max_delay`: a batch older than a minute is a stale cache for a minute.
pub const MAX_DELAY: Bounds = Duration::ZERO..=Duration::from_secs(60);

/// `[consistency] redelete_after` (unless `"off"`): shutdown waits for pending second
/// deletes, so a minute at most.
pub const REDELETE_AFTER: Bounds = Duration::from_millis(1)..=Duration::from_secs(60);

/// `d` as a config file writes it: `250ms`, `10s`, `5m`, `1h`.
fn show_duration(d: Duration) -> String {
    match (d.as_millis(), d.as_secs()) {
        (ms, _) if ms % 1000 != 0 => format!("{ms}ms"),
        (_, s) if s != 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        (_, s) if s != 0 && s % 60 == 0 => format!("{}m", s / 60),
        (_, s) => format!("{s}s"),
    }
}

/// Parses `250ms`, `10s`, `5m` or `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" | "min" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

/// The settings of `new` that differ from `old` and take effect only on restart (every
/// setting but `rules`), as `[section] key`, so a reload can say what it left alone.
/// Compares values without ever returning them: URLs and flush actions may hold secrets.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let (a, b) = (&old.source, &new.source);
    let url_changed = differs(&a.conninfo, &b.conninfo) || a.conninfo.password != b.conninfo.password;
    [
        ("[source] url", url_changed),
        ("[source] slot", a.slot != b.slot),
        ("[source] publication", a.publication != b.publication),
        ("[source] create_slot", a.create_slot != b.create_slot),
        ("[source] failover", a.failover != b.failover),
        ("[source] status_interval", a.status_interval != b.status_interval),
        ("[source] read_timeout", a.read_timeout != b.read_timeout),
        ("[source] message_prefix", a.message_prefix != b.message_prefix),
        ("[source] on_slot_lost", a.on_slot_lost != b.on_slot_lost),
        ("[source] flush", differs(&a.flush, &b.flush)),
        ("[source] heartbeat_interval", a.heartbeat_interval != b.heartbeat_interval),
        ("[source] standby_takeover", a.standby_takeover != b.standby_takeover),
        ("[redis] url", old.redis.url != new.redis.url),
        ("[redis] ca_file", old.redis.ca_pem != new.redis.ca_pem),
        ("[redis] cluster, nodes, sentinels, master_name", old.redis.topology != new.redis.topology),
        ("[batch] max_actions", old.batch.max_actions != new.batch.max_actions),
        ("[batch] max_delay", old.batch.max_delay != new.batch.max_delay),
        ("[metrics] listen", old.metrics.listen != new.metrics.listen),
        ("[consistency] visibility_gate", old.consistency.visibility_gate != new.consistency.visibility_gate),
        ("[consistency] redelete_after", old.consistency.redelete_after != new.consistency.redelete_after),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_descriptions() {
        assert_eq!(redact_url("redis://:s3cret@cache:6379/0"), "redis://:***@cache:6379/0");
        assert_eq!(redact_url("rediss://app:pw@cache/1"), "rediss://app:***@cache/1");
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let env = |name: &str| match name {
            "REDIS_PASSWORD" => Some("pw".to_string()),
            _ => None,
        };
        Config::parse(Path::new("/etc/walbust/config.toml"), text, &env)
    }

    fn problems(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Invalid(d)) => d.to_string(),
            other => panic!("expected problems, got {other:?}"),
        }
    }

    const GOOD: &str = r#"
rules = ["rules/*.toml"]
[source]
url = "postgres://walbust@db:5432/app?sslmode=disable"
status_interval = "2s"
[redis]
url = "redis://:${REDIS_PASSWORD}@cache:6379/0"
"#;

    #[test]
    fn a_refused_password_can_be_traced_to_the_url_the_variable_or_the_password_file() {
        let env = |name: &str| match name {
            "PG_PW" => Some("s3cret".to_string()),
            "PGPASSWORD" => Some("from-env".to_string()),
            "REDIS_PASSWORD" => Some("pw".to_string()),
            _ => None,
        };
        let from = |url: &str| {
            let text = GOOD.replace("postgres://walbust@db:5432/app?sslmode=disable", url);
            let c = Config::parse(Path::new("/etc/walbust/config.toml"), &text, &env).expect("valid");
            c.source.conninfo.password_from.expect("a password was given")
        };
        assert_eq!(from("postgres://walbust:${PG_PW}@db/app"), "`${PG_PW}` in [source] url");
        assert_eq!(from("postgres://walbust:inline@db/app"), "[source] url in /etc/walbust/config.toml");
        assert_eq!(from("postgres://walbust@db/app"), "PGPASSWORD");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pg.pw");
        std::fs::write(&file, "p\n").unwrap();
        let text = GOOD.replace("status_interval = \"2s\"", &format!("password_file = \"{}\"", file.display()));
        let c = Config::parse(Path::new("/etc/walbust/config.toml"), &text, &env).expect("valid");
        assert_eq!(c.source.conninfo.password_from, Some(format!("password_file `{}`", file.display())));
    }

    #[test]
    fn a_good_file_gets_defaults_and_absolute_globs() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.rules, ["/etc/walbust/rules/*.toml"]);
        assert_eq!(c.source.slot, "walbust");
        assert_eq!(c.source.publication, "walbust");
        assert!(c.source.create_slot);
        assert_eq!(c.source.status_interval, Duration::from_secs(2));
        assert_eq!(c.redis.url, "redis://:pw@cache:6379/0");
        assert_eq!(c.batch.max_actions, 5000);
        assert_eq!(c.metrics.listen.as_deref(), Some("127.0.0.1:19187"));
    }

    #[test]
    fn default_metrics_port_does_not_collide_with_postgres_exporters_9187() {
        let c = parse(GOOD).unwrap();
        let listen: std::net::SocketAddr = c.metrics.listen.expect("on by default").parse().expect("an address");
        // 9100-9999 holds the Prometheus exporters' default ports, 9187 postgres_exporter's.
        assert!(!(9100..=9999).contains(&listen.port()), "{listen}");
        assert!(listen.ip().is_loopback(), "{listen}");
    }

    #[test]
    fn unknown_field_names_place_and_suggestion() {
        let text = GOOD.replace("status_interval", "status_intervall");
        let p = problems(&text);
        assert!(p.contains("config.toml:5:1"), "{p}");
        assert!(p.contains("did you mean `status_interval`?"), "{p}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = GOOD
            .replace("status_interval = \"2s\"", "status_interval = \"2 parsecs\"\nslot = \"Bad-Slot\"")
            .replace("${REDIS_PASSWORD}", "${MISSING}");
        let p = problems(&text);
        assert!(p.contains("invalid duration `2 parsecs`"), "{p}");
        assert!(p.contains("invalid slot name `Bad-Slot`"), "{p}");
        assert!(p.contains("environment variable `MISSING` is not set"), "{p}");
        assert_eq!(p.matches("error:").count(), 3, "{p}");
    }

    #[test]
    fn an_absurd_max_delay_is_a_config_error_not_a_panic_in_run() {
        let text = format!("{GOOD}[batch]\nmax_delay = \"18446744073709551615s\"\n");
        let p = problems(&text);
        assert!(p.contains("config.toml:9:13: max_delay = \"18446744073709551615s\" is out of range"), "{p}");
        assert!(p.contains("hint: use 0s to 1m"), "{p}");
    }

    #[test]
    fn every_duration_setting_has_bounds() {
        let cases = [
            ("status_interval = \"2s\"", "status_interval = \"0s\"", "use 100ms to 10m"),
            ("status_interval = \"2s\"", "status_interval = \"18446744073709551615s\"", "use 100ms to 10m"),
            ("status_interval = \"2s\"", "status_interval = \"50ms\"\nread_timeout = \"1ms\"", "use 1s to 1h"),
            ("status_interval = \"2s\"", "read_timeout = \"9999h\"", "use 1s to 1h"),
            ("status_interval = \"2s\"", "heartbeat_interval = \"0s\"", "use 100ms to 1h"),
            ("status_interval = \"2s\"", "heartbeat_interval = \"18446744073709551615s\"", "use 100ms to 1h"),
        ];
        for (from, to, hint) in cases {
            let p = problems(&GOOD.replace(from, to));
            assert!(p.contains("is out of range") && p.contains(hint), "{to}: {p}");
        }
        let c = parse(&format!("{GOOD}[batch]\nmax_delay = \"1m\"\n")).unwrap();
        assert_eq!(c.batch.max_delay, Duration::from_secs(60));
        assert!(parse(&GOOD.replace("status_interval = \"2s\"", "heartbeat_interval = \"off\"")).is_ok());
    }

    #[test]
    fn password_file_dev_zero_and_ca_file_dev_urandom_are_refused_instead_of_read_until_oom() {
        let text = GOOD.replace("status_interval = \"2s\"", "password_file = \"/dev/zero\"").replace(
            "redis://:${REDIS_PASSWORD}@cache:6379/0\"",
            "rediss://cache:6379/0\"\nca_file = \"/dev/urandom\"",
        );
        let p = problems(&text);
        assert!(
            p.contains("config.toml:5:17: cannot use password_file `/dev/zero`: password file /dev/zero is a device"),
            "{p}"
        );
        assert!(
            p.contains("config.toml:8:11: cannot use ca_file `/dev/urandom`: PEM file /dev/urandom is a device"),
            "{p}"
        );
    }

    #[test]
    fn a_missing_or_hostile_config_file_is_a_read_error_with_the_reason() {
        let e = Config::load(Path::new("/dev/zero")).unwrap_err();
        assert!(matches!(e, ConfigError::Read(ReadError::NotRegular { .. })), "{e}");
        let e = Config::load(Path::new("/missing/config.toml")).unwrap_err();
        let ConfigError::Read(e) = e else { panic!("{e}") };
        assert_eq!(
            e.with_reason(),
            "cannot read config file /missing/config.toml: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn message_prefix_walbust_heartbeat_is_a_config_error() {
        let p = problems(&GOOD.replace("status_interval = \"2s\"", "message_prefix = \"walbust-heartbeat\""));
        assert!(
            p.contains("config.toml:5:18: message_prefix = \"walbust-heartbeat\" cannot carry manual invalidations"),
            "{p}"
        );
        assert!(p.contains("carries walbust's heartbeats"), "{p}");
        let p = problems(&GOOD.replace("status_interval = \"2s\"", "message_prefix = \"\""));
        assert!(p.contains("message_prefix = \"\" cannot carry"), "{p}");
        let c = parse(&GOOD.replace("status_interval = \"2s\"", "message_prefix = \"walbust-heartbeats\"")).unwrap();
        assert_eq!(c.source.message_prefix, "walbust-heartbeats");
    }

    #[test]
    fn unclosed_interpolation_in_a_url_never_echoes_its_password() {
        let text =
            GOOD.replace("postgres://walbust@db:5432/app?sslmode=disable", "postgresql://user:S3cr3t@host/db${X");
        let p = problems(&text);
        assert!(p.contains("unclosed `${` in `postgresql://user:***@host/db${X`"), "{p}");
        assert!(!p.contains("S3cr3t"), "{p}");
        let text =
            GOOD.replace("postgres://walbust@db:5432/app?sslmode=disable", "host=db user=u password=S3cr3t dbname=${X");
        let p = problems(&text);
        assert!(p.contains("password=***"), "{p}");
        assert!(!p.contains("S3cr3t"), "{p}");
    }

    #[test]
    fn redaction_masks_url_passwords_and_password_values_only() {
        assert_eq!(redact_secrets("`redis://:pw@cache:6379/0` and more"), "`redis://:***@cache:6379/0` and more");
        assert_eq!(redact_secrets("postgres://u:p/w@h/db?x=1"), "postgres://u:***@h/db?x=1");
        assert_eq!(redact_secrets("postgres://u@h:5432/db"), "postgres://u@h:5432/db");
        assert_eq!(redact_secrets("user=a PASSWORD = 'x y' host=h"), "user=a PASSWORD = *** host=h");
        assert_eq!(redact_secrets("a?password=s3&sslmode=require"), "a?password=***&sslmode=require");
        assert_eq!(redact_secrets("password_file `x`; password is unset"), "password_file `x`; password is unset");
    }

    #[test]
    fn redis_settings_that_run_rejects_or_retries_forever_fail_check() {
        let redis = |url: &str, extra: &str| {
            problems(&GOOD.replace("\"redis://:${REDIS_PASSWORD}@cache:6379/0\"", &format!("\"{url}\"\n{extra}")))
        };
        let p = redis("redis://cache:notaport/0", "");
        assert!(p.contains("config.toml:7:7: invalid redis url `redis://cache:notaport/0`"), "{p}");
        let p = redis("rediss://:pw@cache:6380/0#insecure", "");
        assert!(p.contains("asks for #insecure TLS"), "{p}");
        assert!(!p.contains("pw@"), "{p}");
        let p = redis("redis://cache:6379/0", "ca_file = \"/etc/hostname\"");
        assert!(
            p.contains("config.toml:8:11: ca_file `/etc/hostname` is set but the redis url is not rediss://"),
            "{p}"
        );
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate\n").unwrap();
        let p = redis("rediss://cache:6380/0", &format!("ca_file = \"{}\"", not_pem.display()));
        assert!(p.contains("holds no PEM certificate"), "{p}");
    }

    #[test]
    fn sighup_names_changed_settings_that_need_a_restart_but_never_their_values() {
        let old = parse(GOOD).unwrap();
        let new = parse(
            &GOOD
                .replace("status_interval = \"2s\"", "status_interval = \"3s\"\nslot = \"other\"")
                .replace("redis://:${REDIS_PASSWORD}@cache:6379/0", "redis://:${REDIS_PASSWORD}@cache2:6379/0"),
        )
        .unwrap();
        assert_eq!(restart_only_changes(&old, &new), ["[source] slot", "[source] status_interval", "[redis] url"]);
        assert_eq!(restart_only_changes(&old, &old.clone()), Vec::<&str>::new());
    }

    #[test]
    fn offline_check_needs_no_password_file_and_no_secret_variables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let text = GOOD
            .replace("status_interval = \"2s\"", "password_file = \"/run/secrets/missing\"")
            .replace("${REDIS_PASSWORD}", "${WALBUST_TEST_UNSET_SECRET}");
        std::fs::write(&path, &text).unwrap();
        let (config, notes) = Config::load_offline(&path).unwrap();
        assert_eq!(config.source.conninfo.password, None);
        assert_eq!(notes.0.len(), 1, "{notes}");
        assert!(!notes.has_errors());
        assert!(notes.to_string().contains("environment variable `WALBUST_TEST_UNSET_SECRET` is not set"), "{notes}");
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("cannot use password_file `/run/secrets/missing`"), "{e}");
        assert!(e.contains("environment variable `WALBUST_TEST_UNSET_SECRET` is not set"), "{e}");
    }

    #[test]
    fn the_gate_and_the_second_delete_are_on_by_default_and_each_can_be_turned_off() {
        let c = parse(GOOD).expect("loads");
        assert_eq!(
            c.consistency,
            ConsistencyConfig { visibility_gate: true, redelete_after: Some(Duration::from_secs(1)) }
        );
        let off = format!("{GOOD}\n[consistency]\nvisibility_gate = false\nredelete_after = \"off\"\n");
        let c = parse(&off).expect("loads");
        assert_eq!(c.consistency, ConsistencyConfig { visibility_gate: false, redelete_after: None });
        let short = format!("{GOOD}\n[consistency]\nredelete_after = \"250ms\"\n");
        assert_eq!(parse(&short).expect("loads").consistency.redelete_after, Some(Duration::from_millis(250)));
        let long = format!("{GOOD}\n[consistency]\nredelete_after = \"2h\"\n");
        assert!(problems(&long).contains("redelete_after = \"2h\" is out of range"), "{}", problems(&long));
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[test]
    fn a_missing_password_file_fails_loading_unless_the_password_is_not_needed() {
        let text = GOOD.replace("status_interval = \"2s\"", "password_file = \"no/such/file\"");
        assert!(problems(&text).contains("cannot use password_file `no/such/file`"));
        let env = |name: &str| (name == "REDIS_PASSWORD").then(|| "pw".to_string());
        let c = Config::parse_with(Path::new("/etc/walbust/config.toml"), &text, &env, false, true).expect("loads").0;
        assert_eq!(c.source.conninfo.password, None);
    }

    #[test]
    fn redis_topologies_load_and_mixed_or_half_given_ones_are_errors() {
        let with = |extra: &str| GOOD.replace("cache:6379/0\"", &format!("cache:6379/0\"\n{extra}"));
        assert_eq!(parse(GOOD).unwrap().redis.topology, RedisTopology::Single);
        let c = parse(&with("cluster = true\nnodes = [\"redis://:${REDIS_PASSWORD}@cache-2:6379\"]")).unwrap();
        assert_eq!(c.redis.topology, RedisTopology::Cluster { nodes: vec!["redis://:pw@cache-2:6379".into()] });
        let c = parse(&with("sentinels = [\"redis://s1:26379\", \"redis://s2:26379\"]\nmaster_name = \"mymaster\""))
            .unwrap();
        assert_eq!(
            c.redis.topology,
            RedisTopology::Sentinel {
                sentinels: vec!["redis://s1:26379".into(), "redis://s2:26379".into()],
                master_name: "mymaster".into(),
                wait_replicas: 1
            }
        );
        let p = problems(&with("nodes = [\"redis://cache-2:6379\"]"));
        assert!(p.contains("`nodes` is set but `cluster` is not"), "{p}");
        let p = problems(&with("cluster = true\nnodes = [\"rediss://cache-2:6379\"]"));
        assert!(p.contains("node `rediss://cache-2:6379` and url `redis://:***@cache:6379/0` differ in TLS"), "{p}");
        let p = problems(&with("sentinels = [\"redis://s1:26379\"]"));
        assert!(p.contains("`sentinels` is set without `master_name`"), "{p}");
        let p = problems(&with("master_name = \"m\""));
        assert!(p.contains("`master_name` is set without `sentinels`"), "{p}");
        let p = problems(&with("cluster = true\nsentinels = [\"redis://s1:26379\"]\nmaster_name = \"m\""));
        assert!(p.contains("a Redis Cluster is not run with Sentinel"), "{p}");
        let p = problems(&with("sentinels = [\"redis://s1:26379\"]\nmaster_name = \"m\"\nwait_replicas = -1"));
        assert!(p.contains("wait_replicas = -1 is out of range"), "{p}");
        let p = problems(&with("wait_replicas = 1"));
        assert!(p.contains("`wait_replicas` is set without `sentinels`"), "{p}");
        let p = problems(&with("sentinels = [\"redis://s1:notaport\"]\nmaster_name = \"m\""));
        assert!(p.contains("invalid sentinels url `redis://s1:notaport`"), "{p}");
    }
}

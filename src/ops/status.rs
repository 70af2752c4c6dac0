//! `walbust status`: the replication slot as the server sees it, and a slot monitor for metrics.
//!
//! [`slot_status`] reads `pg_replication_slots` (and `pg_stat_replication` for the
//! walsender serving it) over an ordinary SQL connection. [`SlotStatus`] renders as
//! aligned `key: value` lines or one JSON object, and decides the exit code: a missing,
//! unusable or lost slot is a failure a person has to act on. [`monitor`] polls the same
//! query for the running daemon and feeds [`crate::telemetry::metrics::Metrics`].

use crate::domain::config::Config;
use crate::errors::exit;
pub use crate::postgres::WalStatus;
use crate::postgres::lsn::Lsn;
use crate::postgres::quote::quote_literal;
use crate::postgres::{SourceError, connect_sql};
use crate::telemetry::metrics::{Metrics, SlotHealth};
use serde::Serialize;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Why the slot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The server could not be reached, or refused the connection.
    #[error(
        "cannot connect to the source database to read slot `{slot}`; check `[source] url` and that the server is up"
    )]
    Connect {
        /// The slot asked about.
        slot: String,
        /// Why.
        #[source]
        source: SourceError,
    },
    /// The status query failed.
    #[error("reading replication slot `{slot}` failed; the role in `[source] url` needs to read pg_replication_slots")]
    Query {
        /// The slot asked about.
        slot: String,
        /// Why (with the SQLSTATE when the server refused).
        #[source]
        source: SourceError,
    },
    /// The server is older than walbust supports.
    #[error("{0}")]
    UnsupportedServer(crate::daemon::slot::Unmet),
}

impl StatusError {
    /// The exit code for `walbust status`: [`exit::FAILED`] for a server walbust does not
    /// support, else [`exit::USAGE`], as for a bad config.
    pub fn exit_code(&self) -> u8 {
        match self {
            StatusError::UnsupportedServer(_) => exit::FAILED,
            StatusError::Connect { .. } | StatusError::Query { .. } => exit::USAGE,
        }
    }
}

/// The replication slot as the server sees it. Serialized in field order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlotStatus {
    /// The slot's name (from the config).
    pub slot: String,
    /// The database connected to.
    pub database: String,
    /// Whether the slot exists.
    pub exists: bool,
    /// Its output plugin.
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    pub slot_type: Option<String>,
    /// The database the slot belongs to.
    pub slot_database: Option<String>,
    /// Whether a walsender is streaming from it.
    pub active: bool,
    /// The walsender's process id.
    pub active_pid: Option<i32>,
    /// The position the consumer acknowledged.
    #[serde(serialize_with = "lsn_text")]
    pub confirmed_flush_lsn: Option<Lsn>,
    /// The oldest WAL the slot may still need.
    #[serde(serialize_with = "lsn_text")]
    pub restart_lsn: Option<Lsn>,
    /// The server's current WAL position.
    #[serde(serialize_with = "lsn_text")]
    pub current_wal_lsn: Option<Lsn>,
    /// `pg_current_wal_lsn() - restart_lsn`.
    pub retained_wal_bytes: Option<i64>,
    /// `wal_status`.
    pub wal_status: Option<WalStatus>,
    /// `safe_wal_size`; `None` when unlimited or lost.
    pub safe_wal_size_bytes: Option<i64>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`.
    pub lag_bytes: Option<i64>,
    /// When the server last received a standby status update from the consumer
    /// (`pg_stat_replication.reply_time`), in UTC; `None` when nobody streams.
    pub last_heartbeat: Option<String>,
    /// Seconds since [`last_heartbeat`](Self::last_heartbeat).
    pub last_heartbeat_age_seconds: Option<f64>,
}

fn lsn_text<S: serde::Serializer>(lsn: &Option<Lsn>, s: S) -> Result<S::Ok, S::Error> {
    match lsn {
        Some(l) => s.serialize_str(&l.to_string()),
        None => s.serialize_none(),
    }
}

impl SlotStatus {
    /// What is wrong with the slot and what to do, when something is.
    pub fn problem(&self) -> Option<String> {
        let slot = &self.slot;
        let lit = quote_literal(slot);
        if !self.exists {
            return Some(format!(
                "replication slot `{slot}` does not exist in database `{}`; start `walbust run` with \
                 create_slot = true, or create it with SELECT pg_create_logical_replication_slot({lit}, 'pgoutput');",
                self.database
            ));
        }
        let drop = format!("drop it with SELECT pg_drop_replication_slot({lit}); and let walbust create it again");
        if self.slot_type.as_deref() != Some("logical") || self.plugin.as_deref() != Some("pgoutput") {
            return Some(format!(
                "replication slot `{slot}` uses plugin `{}`, but walbust needs a logical slot with `pgoutput`; \
                 {drop}, or pick another `slot` in config.toml",
                self.plugin.as_deref().unwrap_or("none")
            ));
        }
        if self.slot_database.as_deref() != Some(self.database.as_str()) {
            return Some(format!(
                "replication slot `{slot}` belongs to database `{}`, not `{}`; connect to that database in \
                 `[source] url`, or pick another `slot`",
                self.slot_database.as_deref().unwrap_or("?"),
                self.database
            ));
        }
        if self.wal_status == Some(WalStatus::Lost) {
            return Some(format!(
                "replication slot `{slot}` has lost required WAL (wal_status = lost): invalidations since it \
                 fell behind are gone; {drop}, then flush the caches it served (or set on_slot_lost = \"recreate\" \
                 with a `flush` list)"
            ));
        }
        None
    }

    /// True when less than a fifth of max_slot_wal_keep_size is left before the slot is
    /// lost, or it is already past its reservation.
    pub fn near_wal_limit(&self) -> bool {
        if self.wal_status == Some(WalStatus::Unreserved) {
            return true;
        }
        match (self.retained_wal_bytes, self.safe_wal_size_bytes) {
            (Some(retained), Some(safe)) => safe.max(0) < (retained.max(0) + safe.max(0)) / 5,
            _ => false,
        }
    }

    /// A warning worth printing although the slot works.
    pub fn warning(&self) -> Option<String> {
        (self.wal_status == Some(WalStatus::Unreserved)).then(|| {
            format!(
                "replication slot `{}` is past its WAL reservation (wal_status = unreserved) and will be lost at \
                 the next checkpoint unless walbust catches up; check that walbust runs and Redis is reachable",
                self.slot
            )
        })
    }

    /// [`exit::OK`] when the slot exists and is usable, else [`exit::FAILED`].
    pub fn exit_code(&self) -> u8 {
        if self.problem().is_some() { exit::FAILED } else { exit::OK }
    }

    /// What the metrics expose about the slot.
    pub fn health(&self) -> SlotHealth {
        SlotHealth {
            retained_wal_bytes: self.retained_wal_bytes.map(|b| b.max(0) as u64),
            wal_status: self.wal_status,
            safe_wal_size_bytes: self.safe_wal_size_bytes,
        }
    }

    /// Aligned `key: value` lines, one per field, ending in a newline.
    pub fn render_human(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "unknown".into());
        let lsn = |l: Option<Lsn>| opt(l.map(|l| l.to_string()));
        let bytes = |b: Option<i64>| opt(b.map(human_bytes));
        let mut rows: Vec<(&str, String)> = vec![("slot", self.slot.clone()), ("database", self.database.clone())];
        if !self.exists {
            rows.push(("exists", "no".into()));
        } else {
            rows.extend([
                ("plugin", opt(self.plugin.clone())),
                ("active", if self.active { "yes" } else { "no" }.into()),
                ("active_pid", self.active_pid.map_or_else(|| "none".into(), |p| p.to_string())),
                ("confirmed_flush_lsn", lsn(self.confirmed_flush_lsn)),
                ("restart_lsn", lsn(self.restart_lsn)),
                ("current_wal_lsn", lsn(self.current_wal_lsn)),
                ("retained_wal_bytes", bytes(self.retained_wal_bytes)),
                ("wal_status", opt(self.wal_status.map(|w| w.as_str().to_string()))),
                (
                    "safe_wal_size",
                    match (self.safe_wal_size_bytes, self.wal_status) {
                        (Some(b), _) => human_bytes(b),
                        (None, Some(WalStatus::Lost)) => "none (lost)".into(),
                        (None, Some(_)) => "unlimited (max_slot_wal_keep_size = -1)".into(),
                        (None, None) => "unknown".into(),
                    },
                ),
                ("lag_bytes", bytes(self.lag_bytes)),
                (
                    "last_heartbeat",
                    match (&self.last_heartbeat, self.last_heartbeat_age_seconds) {
                        (Some(t), Some(age)) => format!("{t} ({age:.1}s ago)"),
                        (Some(t), None) => t.clone(),
                        (None, _) if self.active => "unknown: pg_stat_replication shows reply_time only to roles with \
                                                     pg_read_all_stats (GRANT pg_read_all_stats TO the role in [source] url)"
                            .into(),
                        (None, _) => "unknown".into(),
                    },
                ),
            ]);
        }
        let width = rows.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
        let mut out = String::new();
        for (key, value) in rows {
            let _ = writeln!(out, "{:<width$} {value}", format!("{key}:"));
        }
        out
    }

    /// One JSON object with the fields in declaration order, ending in a newline.
    pub fn render_json(&self) -> String {
        let mut s = serde_json::to_string(self).expect("a SlotStatus always serializes: plain fields only");
        s.push('\n');
        s
    }
}

/// `16777216 (16.0 MiB)`; small values as plain bytes.
fn human_bytes(b: i64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b.unsigned_abs() as f64;
    if v < 1024.0 {
        return b.to_string();
    }
    let mut unit = "";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    let sign = if b < 0 { "-" } else { "" };
    format!("{b} ({sign}{v:.1} {unit})")
}

const SLOT_QUERY: &str = "\
SELECT current_database()::text,
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END::text,
       s.plugin::text, s.slot_type::text, s.database::text, s.active, s.active_pid,
       s.confirmed_flush_lsn::text, s.restart_lsn::text,
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END
          - s.restart_lsn)::int8,
       s.wal_status::text, s.safe_wal_size::int8,
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END
          - s.confirmed_flush_lsn)::int8,
       r.reply_time::text,
       extract(epoch FROM clock_timestamp() - r.reply_time)::float8
FROM (SELECT 1) AS one
LEFT JOIN pg_replication_slots s ON s.slot_name = $1
LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid";

/// Reads the slot named in `config` over one SQL connection.
pub async fn slot_status(config: &Config) -> Result<SlotStatus, StatusError> {
    let slot = &config.source.slot;
    let client = connect_sql(&config.source.conninfo)
        .await
        .map_err(|source| StatusError::Connect { slot: slot.clone(), source })?;
    let version = client
        .query_one("SELECT current_setting('server_version'), current_setting('server_version_num')::int", &[])
        .await
        .map_err(|e| StatusError::Query {
            slot: slot.clone(),
            source: crate::postgres::sql::from_pg_error(e, "the source database"),
        })?;
    let version_num = u32::try_from(version.get::<_, i32>(1)).unwrap_or(0);
    if let Some(unmet) = crate::daemon::slot::unsupported_server(version.get(0), version_num) {
        return Err(StatusError::UnsupportedServer(unmet));
    }
    query_status(&client, slot).await
}

/// Reads `slot` with an open client.
pub async fn query_status(client: &tokio_postgres::Client, slot: &str) -> Result<SlotStatus, StatusError> {
    let row = client.query_one(SLOT_QUERY, &[&slot]).await.map_err(|e| StatusError::Query {
        slot: slot.to_string(),
        source: crate::postgres::sql::from_pg_error(e, "the source database"),
    })?;
    let lsn = |i: usize| row.get::<_, Option<String>>(i).and_then(|s| s.parse::<Lsn>().ok());
    let slot_type: Option<String> = row.get(3);
    Ok(SlotStatus {
        slot: slot.to_string(),
        database: row.get(0),
        exists: slot_type.is_some(),
        current_wal_lsn: lsn(1),
        plugin: row.get(2),
        slot_type,
        slot_database: row.get(4),
        active: row.get::<_, Option<bool>>(5).unwrap_or(false),
        active_pid: row.get(6),
        confirmed_flush_lsn: lsn(7),
        restart_lsn: lsn(8),
        retained_wal_bytes: row.get(9),
        wal_status: row.get::<_, Option<String>>(10).as_deref().and_then(WalStatus::parse),
        safe_wal_size_bytes: row.get(11),
        lag_bytes: row.get(12),
        last_heartbeat: row.get(13),
        last_heartbeat_age_seconds: row.get(14),
    })
}

/// Polls the slot every `every` until `shutdown` resolves, updating the slot gauges and
/// the server's WAL end in `metrics`. Failures are logged (once until the next success)
/// and retried on the next tick with a new connection; they never stop the daemon.
pub async fn monitor(config: &Config, metrics: Arc<Metrics>, every: Duration, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let slot = &config.source.slot;
    let mut client: Option<tokio_postgres::Client> = None;
    let mut failing = crate::daemon::outage::Outage::default();
    let mut read_once = false;
    let mut near_limit = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.as_mut() => return,
        }
        let poll = async {
            let c = match client.take() {
                Some(c) if !c.is_closed() => c,
                _ => connect_sql(&config.source.conninfo)
                    .await
                    .map_err(|source| StatusError::Connect { slot: slot.clone(), source })?,
            };
            let status = query_status(&c, slot).await?;
            Ok::<_, StatusError>((c, status))
        };
        let result = tokio::select! {
            r = poll => r,
            _ = shutdown.as_mut() => return,
        };
        match result {
            Ok((c, status)) => {
                client = Some(c);
                read_once = true;
                if let Some(lsn) = status.current_wal_lsn {
                    metrics.set_server_wal_end(lsn);
                }
                metrics.set_slot(status.health());
                let now_near = status.near_wal_limit();
                if now_near && !near_limit {
                    tracing::warn!(slot = %slot, retained_wal_bytes = ?status.retained_wal_bytes,
                        safe_wal_size_bytes = ?status.safe_wal_size_bytes, wal_status = ?status.wal_status,
                        "the slot's retained WAL nears max_slot_wal_keep_size; past it the slot is lost. Check that walbust keeps up and Redis is reachable");
                } else if near_limit && !now_near {
                    tracing::info!(slot = %slot, "the slot's retained WAL is back under the warning level");
                }
                near_limit = now_near;
                if let Some(outage) = failing.ended() {
                    tracing::info!(slot = %slot, outage = ?outage,
                        "slot monitor reads the slot again after {}", crate::daemon::outage::rounded(outage));
                }
            }
            // Before the first read, a connection refused for good (a wrong password) also stops
            // the pipeline, which reports it: said once, not once per task.
            Err(StatusError::Connect { source, .. }) if !read_once && !source.is_transient() => {
                tracing::debug!(slot = %slot, error = %crate::errors::causes::error_chain(&source),
                    "slot monitor cannot connect; the pipeline reports why");
            }
            Err(e) => {
                if failing.failed() {
                    tracing::warn!(slot = %slot, error = %crate::errors::causes::error_chain(&e), retry_in = ?every,
                        "slot monitor cannot read the slot; its gauges keep their last values");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> SlotStatus {
        SlotStatus {
            slot: "walbust".into(),
            database: "app".into(),
            exists: true,
            plugin: Some("pgoutput".into()),
            slot_type: Some("logical".into()),
            slot_database: Some("app".into()),
            active: true,
            active_pid: Some(4242),
            confirmed_flush_lsn: Some(Lsn(0x16B3748)),
            restart_lsn: Some(Lsn(0x16B3710)),
            current_wal_lsn: Some(Lsn(0x26B3748)),
            retained_wal_bytes: Some(16_777_272),
            wal_status: Some(WalStatus::Reserved),
            safe_wal_size_bytes: None,
            lag_bytes: Some(16_777_216),
            last_heartbeat: Some("2024-05-01 12:00:00.5+00".into()),
            last_heartbeat_age_seconds: Some(2.04),
        }
    }

    fn missing() -> SlotStatus {
        SlotStatus {
            exists: false,
            plugin: None,
            slot_type: None,
            slot_database: None,
            active: false,
            active_pid: None,
            confirmed_flush_lsn: None,
            restart_lsn: None,
            retained_wal_bytes: None,
            wal_status: None,
            lag_bytes: None,
            last_heartbeat: None,
            last_heartbeat_age_seconds: None,
            ..healthy()
        }
    }

    #[test]
    fn last_heartbeat_unknown_while_streaming_says_pg_read_all_stats_is_needed() {
        let hidden = SlotStatus { last_heartbeat: None, last_heartbeat_age_seconds: None, ..healthy() };
        let text = hidden.render_human();
        assert!(text.contains("last_heartbeat:      unknown: pg_stat_replication shows reply_time only"), "{text}");
        assert!(text.contains("GRANT pg_read_all_stats"), "{text}");
        let idle = SlotStatus { active: false, active_pid: None, ..hidden };
        assert!(idle.render_human().contains("last_heartbeat:      unknown\n"), "nobody streams: plain unknown");
    }

    #[test]
    fn human_output_is_aligned_key_value_lines() {
        let text = healthy().render_human();
        let expected = "\
slot:                walbust
database:            app
plugin:              pgoutput
active:              yes
active_pid:          4242
confirmed_flush_lsn: 0/16B3748
restart_lsn:         0/16B3710
current_wal_lsn:     0/26B3748
retained_wal_bytes:  16777272 (16.0 MiB)
wal_status:          reserved
safe_wal_size:       unlimited (max_slot_wal_keep_size = -1)
lag_bytes:           16777216 (16.0 MiB)
last_heartbeat:      2024-05-01 12:00:00.5+00 (2.0s ago)
";
        assert_eq!(text, expected);
    }

    #[test]
    fn json_keeps_field_order_and_writes_lsns_as_text() {
        let json = healthy().render_json();
        assert!(json.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["confirmed_flush_lsn"], "0/16B3748");
        assert_eq!(v["wal_status"], "reserved");
        assert_eq!(v["safe_wal_size_bytes"], serde_json::Value::Null);
        assert_eq!(v["lag_bytes"], 16_777_216);
        let order = [
            "slot",
            "database",
            "exists",
            "plugin",
            "slot_type",
            "slot_database",
            "active",
            "active_pid",
            "confirmed_flush_lsn",
            "restart_lsn",
            "current_wal_lsn",
            "retained_wal_bytes",
            "wal_status",
            "safe_wal_size_bytes",
            "lag_bytes",
            "last_heartbeat",
            "last_heartbeat_age_seconds",
        ];
        assert_eq!(v.as_object().unwrap().len(), order.len());
        let positions: Vec<usize> =
            order.iter().map(|k| json.find(&format!("\"{k}\":")).unwrap_or_else(|| panic!("{k}"))).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "fields out of order: {json}");
    }

    #[test]
    fn a_healthy_slot_exits_0() {
        assert_eq!(healthy().problem(), None);
        assert_eq!(healthy().exit_code(), exit::OK);
        let near = SlotStatus { retained_wal_bytes: Some(90), safe_wal_size_bytes: Some(10), ..healthy() };
        assert!(near.near_wal_limit(), "10 of 100 bytes of headroom left");
        let far = SlotStatus { retained_wal_bytes: Some(10), safe_wal_size_bytes: Some(90), ..healthy() };
        assert!(!far.near_wal_limit());
        let unlimited = SlotStatus { safe_wal_size_bytes: None, ..healthy() };
        assert!(!unlimited.near_wal_limit());
        let unreserved = SlotStatus { wal_status: Some(WalStatus::Unreserved), ..healthy() };
        assert!(unreserved.near_wal_limit());
        assert_eq!(unreserved.exit_code(), exit::OK);
        assert!(unreserved.warning().unwrap().contains("unreserved"));
    }

    #[test]
    fn a_missing_slot_exits_1_and_says_how_to_create_it() {
        let s = missing();
        assert_eq!(s.exit_code(), exit::FAILED);
        let p = s.problem().unwrap();
        assert!(p.contains("pg_create_logical_replication_slot('walbust', 'pgoutput')"), "{p}");
        assert_eq!(s.render_human(), "slot:     walbust\ndatabase: app\nexists:   no\n");
    }

    #[test]
    fn a_lost_slot_exits_1_and_says_to_drop_it() {
        let s = SlotStatus { wal_status: Some(WalStatus::Lost), ..healthy() };
        assert_eq!(s.exit_code(), exit::FAILED);
        let p = s.problem().unwrap();
        assert!(p.contains("wal_status = lost") && p.contains("pg_drop_replication_slot('walbust')"), "{p}");
        assert!(s.render_human().contains("safe_wal_size:       none (lost)"));
    }

    #[test]
    fn a_slot_of_another_plugin_or_database_exits_1() {
        let s = SlotStatus { plugin: Some("test_decoding".into()), ..healthy() };
        assert!(s.problem().unwrap().contains("uses plugin `test_decoding`"));
        let s = SlotStatus { slot_database: Some("other".into()), ..healthy() };
        assert!(s.problem().unwrap().contains("belongs to database `other`"));
    }

    #[test]
    fn wal_status_names_round_trip() {
        for w in WalStatus::ALL {
            assert_eq!(WalStatus::parse(w.as_str()), Some(w));
        }
        assert_eq!(WalStatus::parse("bogus"), None);
    }

    #[test]
    fn byte_sizes_read_well() {
        assert_eq!(human_bytes(0), "0");
        assert_eq!(human_bytes(1023), "1023");
        assert_eq!(human_bytes(1536), "1536 (1.5 KiB)");
        assert_eq!(human_bytes(-2048), "-2048 (-2.0 KiB)");
        assert_eq!(human_bytes(5 << 30), "5368709120 (5.0 GiB)");
    }
}

//! The slot and the publication: checked, and the slot created, before streaming starts.

use super::{ReplicationConn, SourceError};
use crate::config::SourceConfig;
use crate::lsn::Lsn;
use crate::rules::RuleSet;

/// Why the database is not ready for walbust, with the statement or setting that fixes it.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A query during setup failed.
    #[error("{doing} failed")]
    Query {
        /// What was being checked.
        doing: &'static str,
        /// The error.
        #[source]
        source: SourceError,
    },
    /// `wal_level` is not `logical`.
    #[error(
        "wal_level is `{actual}` on the server, but logical decoding needs `logical`; run ALTER SYSTEM SET wal_level = logical; and restart Postgres"
    )]
    WalLevel {
        /// The current setting.
        actual: String,
    },
    /// The publication does not exist.
    #[error("publication `{publication}` does not exist in database `{database}`; create it with: {fix}")]
    MissingPublication {
        /// Its name.
        publication: String,
        /// The database connected to.
        database: String,
        /// The statement that creates it for the tables the rules name.
        fix: String,
    },
    /// The slot does not exist and `create_slot = false`.
    #[error(
        "replication slot `{slot}` does not exist and create_slot = false; create it with: SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput'); or set create_slot = true"
    )]
    MissingSlot {
        /// Its name.
        slot: String,
    },
    /// The slot exists but cannot be used by walbust.
    #[error("replication slot `{slot}` {problem}; {fix}")]
    UnusableSlot {
        /// Its name.
        slot: String,
        /// What is wrong with it.
        problem: String,
        /// What to do.
        fix: String,
    },
    /// The slot was lost: invalidated (`wal_status = lost`), dropped while walbust held it,
    /// or left behind by a timeline change. Invalidations since then cannot be recovered.
    #[error(
        "replication slot `{slot}` was lost: {reason}; invalidations since then are gone. With on_slot_lost = \"recreate\" walbust recreates the slot and runs the configured `flush` actions; otherwise flush the caches it served, drop the slot (SELECT pg_drop_replication_slot('{slot}');) and restart walbust"
    )]
    SlotLost {
        /// Its name.
        slot: String,
        /// What happened to it.
        reason: String,
    },
    /// Another process is streaming from the slot.
    #[error(
        "replication slot `{slot}` is in use by process {pid}; stop the other consumer, or end it with SELECT pg_terminate_backend({pid});"
    )]
    SlotBusy {
        /// Its name.
        slot: String,
        /// The walsender holding it.
        pid: String,
    },
}

impl SetupError {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            SetupError::Query { source, .. } => source.is_transient(),
            SetupError::SlotBusy { .. } => true,
            _ => false,
        }
    }
}

/// Where streaming starts, and whether the slot was just created.
#[derive(Debug, Clone, Copy)]
pub struct SlotPosition {
    /// The slot's confirmed flush position (or its consistent point when new).
    pub start: Lsn,
    /// True when this call created the slot.
    pub created: bool,
    /// The server's timeline.
    pub timeline: u32,
}

/// What [`prepare`] may do about the slot.
#[derive(Debug, Clone, Copy, Default)]
pub struct SlotPolicy {
    /// Create the slot when it is missing.
    pub may_create: bool,
    /// Drop a lost slot and create it anew (on_slot_lost = "recreate").
    pub replace_lost: bool,
    /// The timeline seen on an earlier connection, when there was one.
    pub known_timeline: Option<u32>,
    /// True once walbust has streamed from the slot: a missing slot is then a lost one.
    pub held_before: bool,
}

/// Quotes a string literal for SQL (standard_conforming_strings is on since Postgres 9.1).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Quotes an identifier for SQL.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Checks wal_level and the publication, creates the slot when allowed, and returns where to start.
pub async fn prepare(
    conn: &mut ReplicationConn,
    config: &SourceConfig,
    rules: &RuleSet,
    policy: SlotPolicy,
) -> Result<SlotPosition, SetupError> {
    let query = |doing: &'static str| move |source| SetupError::Query { doing, source };
    let lost = |reason: String| SetupError::SlotLost { slot: config.slot.clone(), reason };
    let rows = conn.simple_query("IDENTIFY_SYSTEM").await.map_err(query("identifying the server"))?;
    let timeline = rows.first().and_then(|r| r.get("timeline")).and_then(|t| t.parse().ok()).unwrap_or(0);
    let mut replace = false;
    if let Some(known) = policy.known_timeline.filter(|&t| t != timeline) {
        if !policy.replace_lost {
            return Err(lost(format!(
                "the server's timeline changed from {known} to {timeline} (a failover or a restore)"
            )));
        }
        replace = true;
    }
    let rows = conn.simple_query("SHOW wal_level").await.map_err(query("reading wal_level"))?;
    let wal_level = rows.first().and_then(|r| r.get("wal_level")).unwrap_or_default().to_string();
    if wal_level != "logical" {
        return Err(SetupError::WalLevel { actual: wal_level });
    }
    let sql = format!("SELECT pubname FROM pg_publication WHERE pubname = {}", quote_literal(&config.publication));
    let rows = conn.simple_query(&sql).await.map_err(query("looking up the publication"))?;
    if rows.is_empty() {
        let database = conn.parameter("database").map(str::to_string).unwrap_or_else(|| config.conninfo.dbname.clone());
        return Err(SetupError::MissingPublication {
            publication: config.publication.clone(),
            database,
            fix: create_publication_sql(&config.publication, rules),
        });
    }
    let sql = format!(
        "SELECT plugin, slot_type, database, active_pid, confirmed_flush_lsn, wal_status, current_database() AS current \
         FROM pg_replication_slots WHERE slot_name = {}",
        quote_literal(&config.slot)
    );
    let rows = conn.simple_query(&sql).await.map_err(query("looking up the replication slot"))?;
    let mut slot = rows.first();
    if let Some(existing) = slot {
        let is_lost = existing.get("wal_status") == Some("lost");
        if (is_lost || replace) && policy.replace_lost && existing.get("active_pid").is_none() {
            let sql = format!("SELECT pg_drop_replication_slot({})", quote_literal(&config.slot));
            conn.simple_query(&sql).await.map_err(query("dropping the lost replication slot"))?;
            tracing::warn!(slot = %config.slot, "dropped the lost replication slot to recreate it");
            slot = None;
        } else if is_lost {
            return Err(lost("it has lost required WAL (wal_status = lost, max_slot_wal_keep_size exceeded)".into()));
        }
    }
    let Some(slot) = slot else {
        if policy.held_before && !policy.replace_lost {
            return Err(lost("it no longer exists (it was dropped while walbust held it)".into()));
        }
        if !policy.may_create && !policy.replace_lost {
            return Err(SetupError::MissingSlot { slot: config.slot.clone() });
        }
        let sql =
            format!("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'nothing')", quote_ident(&config.slot));
        let rows = conn.simple_query(&sql).await.map_err(query("creating the replication slot"))?;
        let start =
            rows.first().and_then(|r| r.get("consistent_point")).and_then(|s| s.parse().ok()).unwrap_or(Lsn::ZERO);
        tracing::info!(slot = %config.slot, lsn = %start, "created replication slot");
        return Ok(SlotPosition { start, created: true, timeline });
    };
    let unusable = |problem: String, fix: String| SetupError::UnusableSlot { slot: config.slot.clone(), problem, fix };
    let drop_hint = format!(
        "drop it with SELECT pg_drop_replication_slot({}); and let walbust create it, or pick another `slot` in config.toml",
        quote_literal(&config.slot)
    );
    if slot.get("slot_type") != Some("logical") || slot.get("plugin") != Some("pgoutput") {
        let plugin = slot.get("plugin").unwrap_or("none");
        return Err(unusable(format!("uses plugin `{plugin}`, but walbust needs `pgoutput`"), drop_hint));
    }
    if slot.get("database") != slot.get("current") {
        let db = slot.get("database").unwrap_or("?");
        return Err(unusable(
            format!("belongs to database `{db}`"),
            "connect to that database in `[source] url`, or pick another `slot`".into(),
        ));
    }
    if let Some(pid) = slot.get("active_pid") {
        return Err(SetupError::SlotBusy { slot: config.slot.clone(), pid: pid.to_string() });
    }
    let start = slot.get("confirmed_flush_lsn").and_then(|s| s.parse().ok()).unwrap_or(Lsn::ZERO);
    Ok(SlotPosition { start, created: false, timeline })
}

/// `CREATE PUBLICATION` over the tables the rules name.
pub fn create_publication_sql(publication: &str, rules: &RuleSet) -> String {
    let tables: Vec<String> =
        rules.tables().iter().map(|t| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.table))).collect();
    if tables.is_empty() {
        format!("CREATE PUBLICATION {} FOR ALL TABLES;", quote_ident(publication))
    } else {
        format!("CREATE PUBLICATION {} FOR TABLE {};", quote_ident(publication), tables.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_the_quote_character() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}

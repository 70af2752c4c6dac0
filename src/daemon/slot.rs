//! The slot and the publication: checked, and the slot created, before streaming starts.
//!
//! This module also owns the server settings walbust needs ([`requirements`]), so
//! `walbust check --online`, `walbust setup` and `walbust run` give the same advice. The
//! statements that fix the publication come from the caller (see `crate::daemon::fix`), which
//! knows the rules.

use crate::postgres::lsn::Lsn;
use crate::postgres::quote::{quote_ident, quote_literal};
use crate::postgres::{ReplicationConn, SourceError};

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
    #[error("{}", Unmet::wal_level(actual))]
    WalLevel {
        /// The current setting.
        actual: String,
    },
    /// The server is older than [`MIN_SERVER_VERSION_NUM`].
    #[error("{}", Unmet::server_version(version, *version_num))]
    UnsupportedServer {
        /// `server_version`, e.g. `13.16`.
        version: String,
        /// `server_version_num`, e.g. `130016`.
        version_num: u32,
    },
    /// `failover = true` on a server older than PostgreSQL 17, which has no failover slots.
    #[error(
        "failover = true needs failover slots, which PostgreSQL 17 added, but the server runs PostgreSQL {version}; upgrade the server to 17 or later, or set failover = false in [source] (after a failover, on_slot_lost then applies)"
    )]
    FailoverUnsupported {
        /// `server_version`.
        version: String,
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
        "replication slot `{slot}` is in use: it is held by the server process (walsender) with pid {pid}, which streams it to another client; find that client with SELECT application_name, client_addr, backend_start FROM pg_stat_replication WHERE pid = {pid}; then stop it, or end the walsender with SELECT pg_terminate_backend({pid});"
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

    /// True when only a person can fix it (a setting, the publication, the slot), so
    /// restarting walbust cannot help.
    pub fn needs_person(&self) -> bool {
        match self {
            SetupError::Query { source, .. } => source.needs_person(),
            SetupError::SlotBusy { .. } => false,
            SetupError::WalLevel { .. }
            | SetupError::UnsupportedServer { .. }
            | SetupError::FailoverUnsupported { .. }
            | SetupError::MissingPublication { .. }
            | SetupError::MissingSlot { .. }
            | SetupError::UnusableSlot { .. }
            | SetupError::SlotLost { .. } => true,
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
    /// Create the slot as a failover slot, or make an existing one so (`[source] failover`).
    pub failover: bool,
}

/// What [`prepare`] checks: the slot and the publication, by name.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// The replication slot.
    pub slot: &'a str,
    /// The publication.
    pub publication: &'a str,
    /// The database the connection string names, for messages when the server does not say.
    pub dbname: &'a str,
    /// The statement that creates the publication, shown when it does not exist.
    pub create_publication: String,
}

/// True when `publication` exists in the database `conn` is connected to.
pub async fn publication_exists(conn: &mut ReplicationConn, publication: &str) -> Result<bool, SourceError> {
    let sql = format!("SELECT 1 AS found FROM pg_publication WHERE pubname = {}", quote_literal(publication));
    Ok(!conn.simple_query(&sql).await?.is_empty())
}

/// Checks wal_level and the publication, creates the slot when allowed, and returns where to start.
pub async fn prepare(
    conn: &mut ReplicationConn,
    target: &Target<'_>,
    policy: SlotPolicy,
) -> Result<SlotPosition, SetupError> {
    let query = |doing: &'static str| move |source| SetupError::Query { doing, source };
    let lost = |reason: String| SetupError::SlotLost { slot: target.slot.to_string(), reason };
    let rows = conn.replication_command("IDENTIFY_SYSTEM").await.map_err(query("identifying the server"))?;
    let timeline = rows.first().and_then(|r| r.get("timeline")).and_then(|t| t.parse().ok()).unwrap_or(0);
    let timeline_change = policy.known_timeline.filter(|&t| t != timeline);
    let rows = conn.simple_query("SHOW server_version_num").await.map_err(query("reading server_version_num"))?;
    let version_num: u32 =
        rows.first().and_then(|r| r.get("server_version_num")).and_then(|v| v.parse().ok()).unwrap_or(0);
    let version = conn.parameter("server_version").unwrap_or("?").to_string();
    if version_num < MIN_SERVER_VERSION_NUM {
        return Err(SetupError::UnsupportedServer { version, version_num });
    }
    let failover_slots = version_num >= FAILOVER_SLOTS_VERSION_NUM;
    if policy.failover && !failover_slots {
        return Err(SetupError::FailoverUnsupported { version });
    }
    let rows = conn.simple_query("SHOW wal_level").await.map_err(query("reading wal_level"))?;
    let wal_level = rows.first().and_then(|r| r.get("wal_level")).unwrap_or_default().to_string();
    if wal_level != "logical" {
        return Err(SetupError::WalLevel { actual: wal_level });
    }
    if !publication_exists(conn, target.publication).await.map_err(query("looking up the publication"))? {
        let database = conn.parameter("database").unwrap_or(target.dbname).to_string();
        return Err(SetupError::MissingPublication {
            publication: target.publication.to_string(),
            database,
            fix: target.create_publication.clone(),
        });
    }
    let sql = format!(
        "SELECT plugin, slot_type, database, active_pid, confirmed_flush_lsn, wal_status, current_database() AS current, \
         {} FROM pg_replication_slots WHERE slot_name = {}",
        if failover_slots { "failover::text, synced::text" } else { "NULL AS failover, NULL AS synced" },
        quote_literal(target.slot)
    );
    let rows = conn.simple_query(&sql).await.map_err(query("looking up the replication slot"))?;
    let mut slot = rows.first();
    let mut replace = false;
    if let Some(known) = timeline_change {
        // A failover slot the standby kept in step survives the promotion: the primary sent
        // walbust nothing the standby had not received (synchronized_standby_slots), so
        // resuming from it loses nothing.
        if slot.is_some_and(|s| s.get("synced") == Some("true")) {
            tracing::info!(
                slot = %target.slot,
                from = known,
                to = timeline,
                "the server's timeline changed (a failover); resuming from the failover slot synchronized to this server"
            );
        } else if !policy.replace_lost {
            return Err(lost(format!(
                "the server's timeline changed from {known} to {timeline} (a failover or a restore), and the slot on this server is not one a standby kept in step (a failover slot with sync_replication_slots on the standby, PostgreSQL 17 and later)"
            )));
        } else {
            replace = true;
        }
    }
    if let Some(existing) = slot {
        let is_lost = existing.get("wal_status") == Some("lost");
        if (is_lost || replace) && policy.replace_lost && existing.get("active_pid").is_none() {
            let sql = format!("SELECT pg_drop_replication_slot({})", quote_literal(target.slot));
            conn.simple_query(&sql).await.map_err(query("dropping the lost replication slot"))?;
            tracing::warn!(slot = %target.slot, "dropped the lost replication slot to recreate it");
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
            return Err(SetupError::MissingSlot { slot: target.slot.to_string() });
        }
        let kind = if policy.failover { SlotKind::Failover } else { SlotKind::Permanent };
        let sql = create_slot_sql(target.slot, kind);
        let rows = conn.replication_command(&sql).await.map_err(query("creating the replication slot"))?;
        let start =
            rows.first().and_then(|r| r.get("consistent_point")).and_then(|s| s.parse().ok()).unwrap_or(Lsn::ZERO);
        tracing::info!(slot = %target.slot, lsn = %start, "created replication slot");
        return Ok(SlotPosition { start, created: true, timeline });
    };
    let unusable =
        |problem: String, fix: String| SetupError::UnusableSlot { slot: target.slot.to_string(), problem, fix };
    let drop_hint = format!(
        "drop it with SELECT pg_drop_replication_slot({}); and let walbust create it, or pick another `slot` in config.toml",
        quote_literal(target.slot)
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
        return Err(SetupError::SlotBusy { slot: target.slot.to_string(), pid: pid.to_string() });
    }
    if policy.failover && slot.get("failover") == Some("false") {
        let sql = format!("ALTER_REPLICATION_SLOT {} (FAILOVER true)", quote_ident(target.slot));
        conn.replication_command(&sql).await.map_err(query("making the replication slot a failover slot"))?;
        tracing::info!(slot = %target.slot, "made the replication slot a failover slot (failover = true)");
    }
    let start = slot.get("confirmed_flush_lsn").and_then(|s| s.parse().ok()).unwrap_or(Lsn::ZERO);
    Ok(SlotPosition { start, created: false, timeline })
}

/// The oldest server walbust supports: PostgreSQL 14 (`server_version_num` 140000), the
/// first with pgoutput's streaming and logical decoding messages.
pub const MIN_SERVER_VERSION_NUM: u32 = 140000;

/// The first server with failover slots: PostgreSQL 17.
pub const FAILOVER_SLOTS_VERSION_NUM: u32 = 170000;

/// Which slot [`create_slot_sql`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// A slot that outlives the connection (`walbust run`).
    Permanent,
    /// A permanent slot that standbys keep in step (PostgreSQL 17 and later).
    Failover,
    /// A slot dropped with the connection (`walbust record`).
    Temporary,
}

/// `CREATE_REPLICATION_SLOT "slot" [TEMPORARY] LOGICAL pgoutput NOEXPORT_SNAPSHOT`: the
/// keyword form, which every supported server accepts (the parenthesized option list is
/// PostgreSQL 15 and later). No snapshot is exported: walbust reads changes only. A
/// failover slot needs the option list, `(SNAPSHOT 'nothing', FAILOVER)`, of PostgreSQL 17.
pub fn create_slot_sql(slot: &str, kind: SlotKind) -> String {
    let slot = quote_ident(slot);
    match kind {
        SlotKind::Permanent => format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput NOEXPORT_SNAPSHOT"),
        SlotKind::Temporary => format!("CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT"),
        SlotKind::Failover => {
            format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT 'nothing', FAILOVER)")
        }
    }
}

/// The requirement a server older than [`MIN_SERVER_VERSION_NUM`] fails, naming its version
/// and the minimum; `None` for a supported server.
pub fn unsupported_server(version: &str, version_num: u32) -> Option<Unmet> {
    (version_num < MIN_SERVER_VERSION_NUM).then(|| Unmet::server_version(version, version_num))
}

/// The server settings walbust depends on, as read from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// `server_version`, e.g. `16.4`.
    pub version: String,
    /// `server_version_num`, e.g. `160004`.
    pub version_num: u32,
    /// `wal_level`.
    pub wal_level: String,
    /// `max_replication_slots`.
    pub max_replication_slots: u32,
    /// The replication slots that exist, walbust's own included.
    pub slots: Vec<String>,
    /// `max_wal_senders`.
    pub max_wal_senders: u32,
    /// Walsender processes running now (physical standbys and logical consumers).
    pub wal_senders: u32,
    /// True when walbust's slot exists.
    pub slot_exists: bool,
    /// True when a walsender streams walbust's slot now (walbust itself, usually).
    pub slot_active: bool,
}

/// A requirement the server does not meet, with the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmet {
    /// What is wrong, naming the setting and its value.
    pub problem: String,
    /// What to run or change.
    pub fix: String,
    /// True when only a person can fix it; false when it may clear as other clients let go
    /// of slots or walsenders.
    pub lasting: bool,
}

impl std::fmt::Display for Unmet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; {}", self.problem, self.fix)
    }
}

const RESTART: &str = "and restart Postgres (a reload is not enough)";

impl Unmet {
    fn wal_level(actual: &str) -> Unmet {
        Unmet {
            problem: format!("wal_level is `{actual}` on the server, but logical decoding needs `logical`"),
            fix: format!("run ALTER SYSTEM SET wal_level = logical; {RESTART}"),
            lasting: true,
        }
    }

    fn server_version(version: &str, version_num: u32) -> Unmet {
        Unmet {
            problem: format!(
                "the server runs PostgreSQL {version} (server_version_num {version_num}), but walbust supports PostgreSQL {} and later",
                MIN_SERVER_VERSION_NUM / 10000
            ),
            fix: format!("upgrade the server to PostgreSQL {} or later", MIN_SERVER_VERSION_NUM / 10000),
            lasting: true,
        }
    }
}

/// What `settings` lacks for walbust: a server of [`MIN_SERVER_VERSION_NUM`] or later,
/// `wal_level = logical`, a free replication slot unless walbust's exists, and a free
/// walsender unless one already streams walbust's slot.
pub fn requirements(settings: &ServerSettings, slot: &str) -> Vec<Unmet> {
    let mut unmet = Vec::new();
    unmet.extend(unsupported_server(&settings.version, settings.version_num));
    if settings.wal_level != "logical" {
        unmet.push(Unmet::wal_level(&settings.wal_level));
    }
    let used = settings.slots.len() as u32;
    if !settings.slot_exists && used >= settings.max_replication_slots {
        let names = if settings.slots.is_empty() {
            String::new()
        } else {
            format!(" ({})", settings.slots.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", "))
        };
        unmet.push(Unmet {
            problem: format!(
                "max_replication_slots is {} and {used} slot{} in use{names}, so walbust cannot create slot `{slot}`",
                settings.max_replication_slots,
                if used == 1 { " is" } else { "s are" },
            ),
            fix: format!(
                "run ALTER SYSTEM SET max_replication_slots = {}; {RESTART}, or drop a slot nobody uses with SELECT pg_drop_replication_slot('name');",
                used + 1
            ),
            lasting: used == 0,
        });
    }
    if !settings.slot_active && settings.wal_senders >= settings.max_wal_senders {
        unmet.push(Unmet {
            problem: format!(
                "max_wal_senders is {} and {} walsender{} running (see pg_stat_replication), so the server refuses walbust's replication connection",
                settings.max_wal_senders,
                settings.wal_senders,
                if settings.wal_senders == 1 { " is" } else { "s are" },
            ),
            fix: format!("run ALTER SYSTEM SET max_wal_senders = {}; {RESTART}", settings.wal_senders + 1),
            lasting: settings.wal_senders == 0,
        });
    }
    unmet
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ServerSettings {
        ServerSettings {
            version: "16.4".into(),
            version_num: 160004,
            wal_level: "logical".into(),
            max_replication_slots: 10,
            slots: vec!["standby".into()],
            max_wal_senders: 10,
            wal_senders: 1,
            slot_exists: false,
            slot_active: false,
        }
    }

    #[test]
    fn slots_are_created_in_the_keyword_form_every_supported_server_accepts() {
        assert_eq!(
            create_slot_sql("walbust", SlotKind::Permanent),
            r#"CREATE_REPLICATION_SLOT "walbust" LOGICAL pgoutput NOEXPORT_SNAPSHOT"#
        );
        assert_eq!(
            create_slot_sql("rec\"x", SlotKind::Temporary),
            r#"CREATE_REPLICATION_SLOT "rec""x" TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT"#
        );
        assert_eq!(
            create_slot_sql("walbust", SlotKind::Failover),
            r#"CREATE_REPLICATION_SLOT "walbust" LOGICAL pgoutput (SNAPSHOT 'nothing', FAILOVER)"#
        );
    }

    #[test]
    fn a_ready_server_meets_every_requirement() {
        assert_eq!(requirements(&settings(), "walbust"), []);
    }

    #[test]
    fn wal_level_replica_old_servers_and_full_slots_and_senders_are_named_with_their_fixes() {
        let s = ServerSettings {
            version: "13.16".into(),
            version_num: 130016,
            wal_level: "replica".into(),
            max_replication_slots: 1,
            max_wal_senders: 1,
            ..settings()
        };
        let got: Vec<String> = requirements(&s, "walbust").iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "the server runs PostgreSQL 13.16 (server_version_num 130016), but walbust supports PostgreSQL 14 and later; upgrade the server to PostgreSQL 14 or later",
                "wal_level is `replica` on the server, but logical decoding needs `logical`; run ALTER SYSTEM SET wal_level = logical; and restart Postgres (a reload is not enough)",
                "max_replication_slots is 1 and 1 slot is in use (`standby`), so walbust cannot create slot `walbust`; run ALTER SYSTEM SET max_replication_slots = 2; and restart Postgres (a reload is not enough), or drop a slot nobody uses with SELECT pg_drop_replication_slot('name');",
                "max_wal_senders is 1 and 1 walsender is running (see pg_stat_replication), so the server refuses walbust's replication connection; run ALTER SYSTEM SET max_wal_senders = 2; and restart Postgres (a reload is not enough)",
            ]
        );
        // walbust's own slot and walsender need no room of their own.
        let running = ServerSettings { slot_exists: true, slot_active: true, ..s };
        assert_eq!(requirements(&running, "walbust").len(), 2);
    }
}

//! The slot and the publication: checked, and the slot created, before streaming starts.
//!
//! This module also owns SQL quoting and the fix statements users are shown
//! ([`create_publication_sql`], [`add_tables_sql`]), and the server settings walbust
//! needs ([`requirements`]), so `walbust check --online`, `walbust setup` and `walbust run`
//! give the same advice.

use super::{ReplicationConn, SourceError};
use crate::config::SourceConfig;
use crate::lsn::Lsn;
use crate::rules::{RuleSet, TableName};

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
    let rows = conn.simple_query("SHOW server_version_num").await.map_err(query("reading server_version_num"))?;
    let version_num = rows.first().and_then(|r| r.get("server_version_num")).and_then(|v| v.parse().ok());
    if let Some(version_num) = version_num.filter(|&n| n < MIN_SERVER_VERSION_NUM) {
        let version = conn.parameter("server_version").unwrap_or("?").to_string();
        return Err(SetupError::UnsupportedServer { version, version_num });
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
            fix: create_publication_sql(&config.publication, &rules.tables()),
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

/// The ops a publication must publish for walbust.
pub const PUBLISH: &str = "insert, update, delete, truncate";

/// `CREATE PUBLICATION` over `tables` (every table when there are none), publishing every
/// op walbust routes: the one statement every command shows or runs.
pub fn create_publication_sql(publication: &str, tables: &[&TableName]) -> String {
    let target = if tables.is_empty() {
        "ALL TABLES".to_string()
    } else {
        format!("TABLE {}", tables.iter().map(|t| sql_table(t)).collect::<Vec<_>>().join(", "))
    };
    format!("CREATE PUBLICATION {} FOR {target} WITH (publish = {});", sql_ident(publication), quote_literal(PUBLISH))
}

/// `ALTER PUBLICATION ... ADD TABLE` for `tables` the publication lacks.
pub fn add_tables_sql(publication: &str, tables: &[&TableName]) -> String {
    let names: Vec<String> = tables.iter().map(|t| sql_table(t)).collect();
    format!("ALTER PUBLICATION {} ADD TABLE {};", sql_ident(publication), names.join(", "))
}

/// An identifier as SQL: bare when it is a plain lowercase name, quoted otherwise.
pub fn sql_ident(s: &str) -> String {
    let plain = s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !RESERVED.split_whitespace().any(|k| k == s);
    if plain { s.to_string() } else { quote_ident(s) }
}

/// `schema.table` as SQL.
pub fn sql_table(t: &TableName) -> String {
    format!("{}.{}", sql_ident(&t.schema), sql_ident(&t.table))
}

/// Keywords that cannot name a table or column unquoted (reserved, and reserved but
/// allowed as function or type names).
const RESERVED: &str = "\
     all analyse analyze and any array as asc asymmetric authorization binary both case cast check \
     collate collation column concurrently constraint create cross current_catalog current_date \
     current_role current_schema current_time current_timestamp current_user default deferrable desc \
     distinct do else end except false fetch for foreign freeze from full grant group having ilike \
     in initially inner intersect into is isnull join lateral leading left like limit localtime \
     localtimestamp natural not notnull null offset on only or order outer overlaps placing primary \
     references returning right select session_user similar some symmetric system_user table \
     tablesample then to trailing true union unique user using variadic verbose when where window \
     with";

/// The oldest server walbust supports: PostgreSQL 14 (`server_version_num` 140000), the
/// first with pgoutput's streaming and logical decoding messages.
pub const MIN_SERVER_VERSION_NUM: u32 = 140000;

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
    if settings.version_num < MIN_SERVER_VERSION_NUM {
        unmet.push(Unmet::server_version(&settings.version, settings.version_num));
    }
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

    #[test]
    fn one_create_publication_statement_quotes_only_what_needs_it() {
        let t = |schema: &str, table: &str| TableName { schema: schema.into(), table: table.into() };
        let (a, b) = (t("public", "users"), t("App", "order"));
        assert_eq!(
            create_publication_sql("walbust", &[&a, &b]),
            "CREATE PUBLICATION walbust FOR TABLE public.users, \"App\".\"order\" WITH (publish = 'insert, update, delete, truncate');"
        );
        assert_eq!(
            create_publication_sql("Pub", &[]),
            "CREATE PUBLICATION \"Pub\" FOR ALL TABLES WITH (publish = 'insert, update, delete, truncate');"
        );
        assert_eq!(add_tables_sql("walbust", &[&a]), "ALTER PUBLICATION walbust ADD TABLE public.users;");
    }

    #[test]
    fn quoting_doubles_the_quote_character() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}

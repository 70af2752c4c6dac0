//! What `[source] failover = true` needs of the primary and its standbys, checked for
//! `walbust check --online`.
//!
//! A failover slot (PostgreSQL 17 and later) survives a promotion only when each standby
//! synchronizes it (`sync_replication_slots`, `hot_standby_feedback`, a `primary_slot_name`,
//! a `dbname` in `primary_conninfo`) and the primary sends walbust no change its standbys
//! have not received (`synchronized_standby_slots` naming their slots). [`check`] connects
//! to every host of `[source] url` in turn, tells the primary from the standbys, and
//! returns each missing setting with the statement that fixes it, from
//! [`crate::daemon::fix`].

use crate::daemon::fix;
use crate::daemon::slot::{FAILOVER_SLOTS_VERSION_NUM, Unmet};
use crate::postgres::{ConnInfo, TargetSessionAttrs, connect_sql};

/// One server of the connection string, as the check found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// `host:port`.
    pub endpoint: String,
    /// True for a standby.
    pub standby: bool,
}

/// What [`check`] found: the servers it reached, and what is missing.
#[derive(Debug, Clone, Default)]
pub struct FailoverCheck {
    /// The servers reached, in the connection string's order.
    pub servers: Vec<Server>,
    /// Each missing setting, with its fix (which server to run it on is in the text).
    pub unmet: Vec<Unmet>,
}

/// One standby's settings, as read from it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StandbySettings {
    /// `host:port`.
    pub endpoint: String,
    /// `sync_replication_slots`.
    pub sync_replication_slots: bool,
    /// `hot_standby_feedback`.
    pub hot_standby_feedback: bool,
    /// `primary_slot_name`; empty when unset.
    pub primary_slot_name: String,
    /// Whether `primary_conninfo` names a database; `None` when the role may not read it.
    pub conninfo_has_dbname: Option<bool>,
    /// `wal_level`.
    pub wal_level: String,
}

/// The primary's settings, as read from it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrimarySettings {
    /// `host:port`.
    pub endpoint: String,
    /// `server_version`.
    pub version: String,
    /// `server_version_num`.
    pub version_num: u32,
    /// `synchronized_standby_slots`, split at commas.
    pub synchronized_standby_slots: Vec<String>,
}

/// What the primary and `standbys` lack for a failover slot in `database`.
pub fn requirements(primary: &PrimarySettings, standbys: &[StandbySettings], database: &str) -> Vec<Unmet> {
    let mut unmet = Vec::new();
    let lasting = |problem: String, fix: String| Unmet { problem, fix, lasting: true };
    if primary.version_num < FAILOVER_SLOTS_VERSION_NUM {
        unmet.push(lasting(
            format!(
                "failover = true, but the primary {} runs PostgreSQL {}, and failover slots need PostgreSQL 17 or later",
                primary.endpoint, primary.version
            ),
            "upgrade to PostgreSQL 17 or later, or set failover = false (after a failover, on_slot_lost then applies)"
                .into(),
        ));
        return unmet;
    }
    if standbys.is_empty() {
        unmet.push(lasting(
            format!(
                "failover = true, but no host in [source] url is a standby (only the primary {})",
                primary.endpoint
            ),
            format!(
                "list the standbys in [source] url with target_session_attrs=primary, as in host={},standby target_session_attrs=primary, so that walbust finds the new primary after a failover and this check reaches the standbys",
                primary.endpoint.rsplit_once(':').map_or(primary.endpoint.as_str(), |(h, _)| h)
            ),
        ));
    }
    for s in standbys {
        let on_standby =
            |name: &str, value: &str| format!("on the standby {}: {}", s.endpoint, fix::set_and_reload(name, value));
        for (name, on) in
            [("sync_replication_slots", s.sync_replication_slots), ("hot_standby_feedback", s.hot_standby_feedback)]
        {
            if !on {
                unmet.push(lasting(
                    format!(
                        "{name} is off on the standby {}, so it does not keep walbust's failover slot in step",
                        s.endpoint
                    ),
                    on_standby(name, "on"),
                ));
            }
        }
        if s.wal_level != "logical" {
            unmet.push(Unmet {
                problem: format!(
                    "wal_level is `{}` on the standby {}, but slot synchronization needs `logical`",
                    s.wal_level, s.endpoint
                ),
                fix: format!(
                    "on the standby {}: ALTER SYSTEM SET wal_level = logical; and restart it (a reload is not enough)",
                    s.endpoint
                ),
                lasting: true,
            });
        }
        let slot_name = if s.primary_slot_name.is_empty() {
            let name = "walbust_standby";
            unmet.push(lasting(
                format!("the standby {} streams without a physical slot (primary_slot_name is empty)", s.endpoint),
                format!(
                    "on the primary {}: {} then {}",
                    primary.endpoint,
                    fix::create_physical_slot(name),
                    on_standby("primary_slot_name", name)
                ),
            ));
            name.to_string()
        } else {
            s.primary_slot_name.clone()
        };
        if s.conninfo_has_dbname == Some(false) {
            unmet.push(lasting(
                format!("primary_conninfo on the standby {} names no database, which slot synchronization needs", s.endpoint),
                format!(
                    "on the standby {}: add {} to primary_conninfo (ALTER SYSTEM SET primary_conninfo = '...'; SELECT pg_reload_conf();)",
                    s.endpoint,
                    fix::primary_conninfo_dbname(database)
                ),
            ));
        }
        if !primary.synchronized_standby_slots.contains(&slot_name) {
            let mut names = primary.synchronized_standby_slots.clone();
            names.push(slot_name.clone());
            unmet.push(lasting(
                format!(
                    "synchronized_standby_slots on the primary {} does not name `{slot_name}`, the slot of the standby {}, so walbust may receive changes the standby has not, and lose them in a failover",
                    primary.endpoint, s.endpoint
                ),
                format!(
                    "on the primary {}: {}",
                    primary.endpoint,
                    fix::set_and_reload("synchronized_standby_slots", &names.join(","))
                ),
            ));
        }
    }
    unmet
}

/// Why the servers could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum FailoverCheckError {
    /// No host of the connection string is a primary that answered.
    #[error("no host of [source] url ({hosts}) is a primary that answered, so the failover settings cannot be checked")]
    NoPrimary {
        /// The hosts, for the message.
        hosts: String,
    },
    /// A settings query failed.
    #[error("reading the failover settings of {endpoint} failed")]
    Query {
        /// The server.
        endpoint: String,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
}

const STANDBY_QUERY: &str = "\
SELECT current_setting('sync_replication_slots', true), current_setting('hot_standby_feedback'),
       current_setting('primary_slot_name'), current_setting('wal_level'),
       CASE WHEN pg_has_role('pg_read_all_settings', 'member') OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
            THEN current_setting('primary_conninfo') ~ '(^|\\s)dbname\\s*=' END";

const PRIMARY_QUERY: &str = "\
SELECT current_setting('server_version'), current_setting('server_version_num')::int,
       coalesce(current_setting('synchronized_standby_slots', true), '')";

/// Connects to each host of `info` alone, reads the primary's and the standbys' settings
/// and returns what is missing. Hosts that do not answer are logged and left out.
pub async fn check(info: &ConnInfo) -> Result<FailoverCheck, FailoverCheckError> {
    let mut primary = None;
    let mut standbys = Vec::new();
    let mut servers = Vec::new();
    for (host, port) in info.targets() {
        let endpoint = info.endpoint(host, port);
        let one = ConnInfo {
            hosts: vec![host.to_string()],
            ports: vec![port],
            target_session_attrs: TargetSessionAttrs::Any,
            ..info.clone()
        };
        let client = match connect_sql(&one).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(server = %endpoint, error = %crate::errors::causes::error_chain(&e), "cannot check this host's failover settings");
                continue;
            }
        };
        let query = |source| FailoverCheckError::Query { endpoint: endpoint.clone(), source };
        let standby: bool = client.query_one("SELECT pg_is_in_recovery()", &[]).await.map_err(query)?.get(0);
        servers.push(Server { endpoint: endpoint.clone(), standby });
        if standby {
            let row = client.query_one(STANDBY_QUERY, &[]).await.map_err(query)?;
            let on = |i: usize| row.get::<_, Option<String>>(i).as_deref() == Some("on");
            standbys.push(StandbySettings {
                endpoint,
                sync_replication_slots: on(0),
                hot_standby_feedback: on(1),
                primary_slot_name: row.get::<_, Option<String>>(2).unwrap_or_default(),
                wal_level: row.get::<_, Option<String>>(3).unwrap_or_default(),
                conninfo_has_dbname: row.get(4),
            });
        } else if primary.is_none() {
            let row = client.query_one(PRIMARY_QUERY, &[]).await.map_err(query)?;
            let slots: String = row.get(2);
            primary = Some(PrimarySettings {
                endpoint,
                version: row.get(0),
                version_num: u32::try_from(row.get::<_, i32>(1)).unwrap_or(0),
                synchronized_standby_slots: slots
                    .split(',')
                    .map(|s| s.trim().trim_matches('"').to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            });
        }
    }
    let primary = primary.ok_or_else(|| FailoverCheckError::NoPrimary { hosts: info.describe() })?;
    let unmet = requirements(&primary, &standbys, &info.dbname);
    Ok(FailoverCheck { servers, unmet })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary() -> PrimarySettings {
        PrimarySettings {
            endpoint: "db1:5432".into(),
            version: "17.10".into(),
            version_num: 170010,
            synchronized_standby_slots: vec!["standby1".into()],
        }
    }

    fn standby() -> StandbySettings {
        StandbySettings {
            endpoint: "db2:5432".into(),
            sync_replication_slots: true,
            hot_standby_feedback: true,
            primary_slot_name: "standby1".into(),
            conninfo_has_dbname: Some(true),
            wal_level: "logical".into(),
        }
    }

    #[test]
    fn a_ready_pair_meets_every_requirement() {
        assert_eq!(requirements(&primary(), &[standby()], "app"), []);
    }

    #[test]
    fn each_missing_setting_is_named_with_its_fix_on_the_right_server() {
        let s = StandbySettings {
            sync_replication_slots: false,
            hot_standby_feedback: false,
            primary_slot_name: String::new(),
            conninfo_has_dbname: Some(false),
            ..standby()
        };
        let p = PrimarySettings { synchronized_standby_slots: vec![], ..primary() };
        let got: Vec<String> = requirements(&p, &[s], "app").iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "sync_replication_slots is off on the standby db2:5432, so it does not keep walbust's failover slot in step; on the standby db2:5432: ALTER SYSTEM SET sync_replication_slots = 'on'; SELECT pg_reload_conf();",
                "hot_standby_feedback is off on the standby db2:5432, so it does not keep walbust's failover slot in step; on the standby db2:5432: ALTER SYSTEM SET hot_standby_feedback = 'on'; SELECT pg_reload_conf();",
                "the standby db2:5432 streams without a physical slot (primary_slot_name is empty); on the primary db1:5432: SELECT pg_create_physical_replication_slot('walbust_standby'); then on the standby db2:5432: ALTER SYSTEM SET primary_slot_name = 'walbust_standby'; SELECT pg_reload_conf();",
                "primary_conninfo on the standby db2:5432 names no database, which slot synchronization needs; on the standby db2:5432: add dbname=app to primary_conninfo (ALTER SYSTEM SET primary_conninfo = '...'; SELECT pg_reload_conf();)",
                "synchronized_standby_slots on the primary db1:5432 does not name `walbust_standby`, the slot of the standby db2:5432, so walbust may receive changes the standby has not, and lose them in a failover; on the primary db1:5432: ALTER SYSTEM SET synchronized_standby_slots = 'walbust_standby'; SELECT pg_reload_conf();",
            ]
        );
    }

    #[test]
    fn no_standby_or_an_old_primary_is_named() {
        let got = requirements(&primary(), &[], "app");
        assert_eq!(got.len(), 1);
        assert!(got[0].problem.contains("no host in [source] url is a standby"), "{}", got[0]);
        assert!(got[0].fix.contains("host=db1,standby target_session_attrs=primary"), "{}", got[0]);
        let old = PrimarySettings { version: "16.4".into(), version_num: 160004, ..primary() };
        let got = requirements(&old, &[standby()], "app");
        assert_eq!(got.len(), 1);
        assert!(got[0].problem.contains("runs PostgreSQL 16.4, and failover slots need PostgreSQL 17"), "{}", got[0]);
    }
}

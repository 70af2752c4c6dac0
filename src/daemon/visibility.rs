//! The visibility gate: a transaction's actions are applied only once it is visible to new
//! snapshots on the server.
//!
//! Postgres writes and flushes a commit record, so logical decoding may send it, before the
//! transaction leaves the proc array and becomes visible to other sessions; with a
//! synchronous standby the backend waits for the standby in between, for as long as the
//! standby takes. A key deleted in that window is refilled with the old row by the next
//! cache-aside reader. The gate asks the primary, on an ordinary SQL connection, for
//! `pg_current_snapshot()` and holds the batch until every one of its transactions is
//! visible in it (`pg_visible_in_snapshot()`'s rule, evaluated here so that one query
//! covers any number of transactions). The batch behind it waits too, so the flushed
//! position never passes an unapplied commit.
//!
//! A gate that cannot ask lets the batch through: when the SQL connection is down, or when
//! walbust's own walsender is a synchronous standby (the commit would wait for walbust,
//! which would wait for the commit). Each such batch is logged and counted.

use crate::postgres::{ConnInfo, SourceError, TargetSessionAttrs, sql};
use crate::telemetry::metrics::{self, Metrics};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

/// The longest the gate waits for one query before it takes the connection for down.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The gate's one query, prepared once per connection: each look is then one round trip
/// that the server neither parses nor plans.
const SNAPSHOT_QUERY: &str = "SELECT pg_current_snapshot()::text";

/// How soon a lost connection is tried again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// For this long a held batch is looked at again as soon as the last answer arrives: a
/// transaction is usually visible within microseconds of its commit record, and tokio's
/// timers cannot sleep less than a millisecond.
const ASK_AGAIN_AT_ONCE: Duration = Duration::from_millis(2);

/// The first pause between two looks at a held transaction after [`ASK_AGAIN_AT_ONCE`],
/// doubled up to [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(1);

/// The longest pause between two looks at a held transaction.
const MAX_POLL: Duration = Duration::from_millis(10);

/// How long a batch is held before the gate checks that walbust is not a synchronous standby.
const SYNC_CHECK_AFTER: Duration = Duration::from_secs(1);

/// A snapshot as `pg_current_snapshot()` shows it: `xmin:xmax:xip,...`, full 64-bit xids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Every xid below is finished.
    pub xmin: u64,
    /// Every xid at or above is not yet finished as far as this snapshot knows.
    pub xmax: u64,
    /// The xids between that were still running.
    pub xip: Vec<u64>,
}

impl Snapshot {
    /// Parses the text form of `pg_snapshot`.
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list.split(',').map(|x| x.parse().ok()).collect::<Option<Vec<u64>>>()?,
        };
        Some(Snapshot { xmin, xmax, xip })
    }

    /// The 32-bit `xid` of the replication stream widened to its 64-bit `xid8`: the one
    /// with those low bits nearest to `xmax`. A transaction the stream sends is less than
    /// 2^31 xids from the current one, since the slot holds back freezing.
    pub fn widen(&self, xid: u32) -> u64 {
        let behind = (self.xmax as u32).wrapping_sub(xid) as i32;
        self.xmax.wrapping_sub(behind as i64 as u64)
    }

    /// Whether `xid` is visible in this snapshot: `pg_visible_in_snapshot()`'s rule. A
    /// committed transaction visible in one snapshot is visible in every later one.
    pub fn visible(&self, xid: u32) -> bool {
        let full = self.widen(xid);
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }
}

/// What the gate did with one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passed {
    /// Every transaction is visible; `held` is how long the gate waited beyond its first look.
    Visible {
        /// Time spent waiting for transactions that were not yet visible.
        held: Duration,
        /// By when every transaction was visible: when the snapshot that showed the last of
        /// them arrived (earlier than now for a backlog, whose first snapshot covers it).
        at: Instant,
    },
    /// The gate could not ask and let the batch through.
    Bypassed,
    /// Shutdown gave up on the batch while it was held.
    Abandoned,
}

/// The gate, with its own SQL connection.
pub struct VisibilityGate {
    conninfo: ConnInfo,
    slot: String,
    metrics: Arc<Metrics>,
    /// The connection, with [`SNAPSHOT_QUERY`] prepared on it.
    client: Option<(tokio_postgres::Client, tokio_postgres::Statement)>,
    /// The last snapshot read and when it arrived: a transaction visible in it needs no
    /// new query, and was visible by then.
    last: Option<(Snapshot, Instant)>,
    connecting: Option<tokio::task::JoinHandle<Result<tokio_postgres::Client, SourceError>>>,
    last_attempt: Option<Instant>,
    /// The connection was down at the last batch: logged once until it is back.
    down_logged: bool,
    /// A connection was made at least once.
    connected_once: bool,
}

impl VisibilityGate {
    /// A gate asking the primary among the servers `conninfo` names, whatever its
    /// `target_session_attrs`: readers see a commit there, and a standby's snapshot can
    /// show a transaction before the primary's does (a synchronous standby with
    /// `remote_apply` replays the commit while the primary's backend still waits for it).
    /// `slot` is walbust's, to find its walsender. It connects in the background; batches
    /// go through ungated until it is connected.
    pub fn new(mut conninfo: ConnInfo, slot: String, metrics: Arc<Metrics>) -> Self {
        conninfo.target_session_attrs = TargetSessionAttrs::Primary;
        let mut gate = VisibilityGate {
            conninfo,
            slot,
            metrics,
            client: None,
            last: None,
            connecting: None,
            last_attempt: None,
            down_logged: false,
            connected_once: false,
        };
        gate.reconnect();
        gate
    }

    /// Waits for the first connection attempt, so that the first batches are gated too;
    /// bounded by the connection's own timeout.
    pub async fn connected(&mut self) {
        let Some(mut task) = self.connecting.take() else { return };
        let limit = match self.conninfo.connect_timeout {
            t if t.is_zero() => Duration::from_secs(10),
            t => t + Duration::from_millis(100),
        };
        match tokio::time::timeout(limit, &mut task).await {
            Ok(result) => self.connection_made(result).await,
            Err(_) => self.connecting = Some(task),
        }
    }

    async fn connection_made(
        &mut self,
        result: Result<Result<tokio_postgres::Client, SourceError>, tokio::task::JoinError>,
    ) {
        match result {
            Ok(Ok(client)) => {
                let statement = match tokio::time::timeout(QUERY_TIMEOUT, client.prepare(SNAPSHOT_QUERY)).await {
                    Ok(Ok(statement)) => statement,
                    Ok(Err(e)) => {
                        return warn!(error = %crate::errors::causes::error_chain(&e), "visibility gate cannot prepare its query; it connects again");
                    }
                    Err(_) => {
                        return warn!(timeout = ?QUERY_TIMEOUT, "visibility gate timed out preparing its query; it connects again");
                    }
                };
                if self.down_logged {
                    info!("visibility gate connected again");
                }
                self.down_logged = false;
                self.connected_once = true;
                self.client = Some((client, statement));
                // A new connection may reach another server (after a failover): what the
                // last one saw proves nothing there.
                self.last = None;
            }
            // Before the first connection, one refused for good (a wrong password) also
            // stops the pipeline, which reports it: said once, not once per task.
            Ok(Err(e)) if !self.connected_once && !e.is_transient() => {
                debug!(error = %crate::errors::causes::error_chain(&e), "visibility gate cannot connect; the pipeline reports why");
            }
            Ok(Err(e)) if !self.down_logged => {
                self.down_logged = true;
                warn!(error = %crate::errors::causes::error_chain(&e), "visibility gate cannot connect; batches are applied without it meanwhile, and it retries every second");
            }
            Ok(Err(_)) => {}
            Err(e) => error!(error = %e, "visibility gate connection task failed"),
        }
    }

    fn reconnect(&mut self) {
        let info = self.conninfo.clone();
        self.last_attempt = Some(Instant::now());
        self.connecting = Some(tokio::spawn(async move { sql::connect_sql(&info).await }));
    }

    /// The connection if it is up; starts a new attempt when one is due.
    async fn client(&mut self) -> Option<&(tokio_postgres::Client, tokio_postgres::Statement)> {
        if self.client.as_ref().is_some_and(|(client, _)| client.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            if let Some(task) = self.connecting.take_if(|t| t.is_finished()) {
                let result = task.await;
                self.connection_made(result).await;
            }
            if self.client.is_none()
                && self.connecting.is_none()
                && self.last_attempt.is_none_or(|t| t.elapsed() >= RECONNECT_EVERY)
            {
                self.reconnect();
            }
        }
        self.client.as_ref()
    }

    async fn snapshot(&mut self) -> Option<Snapshot> {
        let (client, statement) = self.client().await?;
        let asked = Instant::now();
        match tokio::time::timeout(QUERY_TIMEOUT, client.query_one(statement, &[])).await {
            Ok(Ok(row)) => {
                self.metrics.observe_gate_query(asked.elapsed());
                let text: Option<&str> = row.try_get(0).ok();
                let snapshot = text.and_then(Snapshot::parse);
                if snapshot.is_none() {
                    error!(snapshot = ?text, "visibility gate cannot read the server's snapshot");
                }
                snapshot
            }
            Ok(Err(e)) => {
                warn!(error = %e, "visibility gate query failed; reconnecting");
                self.client = None;
                None
            }
            Err(_) => {
                warn!(timeout = ?QUERY_TIMEOUT, "visibility gate query timed out; reconnecting");
                self.client = None;
                None
            }
        }
    }

    /// True when walbust's own walsender is a synchronous standby: then a commit waits for
    /// walbust's acknowledgement, and holding its invalidation until it is visible would
    /// stall both.
    async fn walsender_is_synchronous(&mut self) -> bool {
        let slot = self.slot.clone();
        let Some((client, _)) = self.client().await else { return false };
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&slot];
        let query = client.query_opt(
            "SELECT r.sync_state::text FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &params,
        );
        match tokio::time::timeout(QUERY_TIMEOUT, query).await {
            Ok(Ok(Some(row))) => matches!(row.get::<_, Option<String>>(0).as_deref(), Some("sync" | "quorum")),
            _ => false,
        }
    }

    /// Waits until every transaction of `xids` is visible to new snapshots, or lets the
    /// batch through when the gate cannot ask; `abandon` gives up at shutdown.
    pub async fn pass(&mut self, xids: &[u32], abandon: &Notify) -> Passed {
        if xids.is_empty() {
            return Passed::Visible { held: Duration::ZERO, at: Instant::now() };
        }
        let mut waiting = xids.to_vec();
        if let Some((last, at)) = &self.last {
            waiting.retain(|&xid| !last.visible(xid));
            if waiting.is_empty() {
                return Passed::Visible { held: Duration::ZERO, at: *at };
            }
        }
        let mut poll = FIRST_POLL;
        let mut held_since: Option<Instant> = None;
        let mut held_count = 0;
        let mut sync_checked = false;
        loop {
            let Some(snapshot) = self.snapshot().await else {
                self.metrics.gate_bypassed(metrics::BYPASS_CONNECTION);
                if !self.down_logged {
                    warn!(
                        transactions = waiting.len(),
                        "visibility gate has no connection; applying without waiting for visibility"
                    );
                    self.down_logged = true;
                }
                return Passed::Bypassed;
            };
            let at = Instant::now();
            waiting.retain(|&xid| !snapshot.visible(xid));
            self.last = Some((snapshot, at));
            let Some(since) = held_since else {
                if waiting.is_empty() {
                    return Passed::Visible { held: Duration::ZERO, at };
                }
                held_since = Some(Instant::now());
                held_count = waiting.len();
                self.metrics.gate_held(waiting.len() as u64);
                continue;
            };
            if waiting.is_empty() {
                let held = since.elapsed();
                self.metrics.observe_gate_wait(held);
                return Passed::Visible { held, at };
            }
            if !sync_checked && since.elapsed() >= SYNC_CHECK_AFTER {
                sync_checked = true;
                if self.walsender_is_synchronous().await {
                    self.metrics.gate_bypassed(metrics::BYPASS_SYNCHRONOUS_WALSENDER);
                    error!(slot = %self.slot, transactions = held_count,
                        "walbust's walsender is a synchronous standby, so a commit waits for walbust; applying without the visibility gate (remove walbust's application_name from synchronous_standby_names)");
                    return Passed::Bypassed;
                }
            }
            if since.elapsed() < ASK_AGAIN_AT_ONCE {
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = abandon.notified() => return Passed::Abandoned,
            }
            poll = (poll * 2).min(MAX_POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_parse_in_the_servers_text_form() {
        assert_eq!(Snapshot::parse("10:20:"), Some(Snapshot { xmin: 10, xmax: 20, xip: vec![] }));
        assert_eq!(Snapshot::parse("10:20:10,14"), Some(Snapshot { xmin: 10, xmax: 20, xip: vec![10, 14] }));
        assert_eq!(Snapshot::parse("10:20"), None);
        assert_eq!(Snapshot::parse("a:20:"), None);
        assert_eq!(Snapshot::parse("10:20:1,x"), None);
    }

    #[test]
    fn visibility_follows_pg_visible_in_snapshot() {
        let s = Snapshot::parse("100:110:100,105").unwrap();
        assert!(s.visible(99), "below xmin");
        assert!(!s.visible(100), "running");
        assert!(s.visible(101), "finished between");
        assert!(!s.visible(105), "running");
        assert!(!s.visible(110), "at xmax: committed but not yet visible");
        assert!(!s.visible(111));
    }

    #[tokio::test]
    async fn a_transaction_visible_in_the_last_snapshot_needs_no_query() {
        // Nothing listens on port 1: every query the gate would make finds no connection.
        let conninfo = ConnInfo::parse("host=127.0.0.1 port=1 dbname=x user=x connect_timeout=1", |_| None).unwrap();
        let metrics = Metrics::new();
        let mut gate = VisibilityGate::new(conninfo, "slot".into(), metrics);
        gate.connected().await;
        let abandon = Notify::new();
        let seen = Instant::now();
        gate.last = Snapshot::parse("100:110:105").map(|s| (s, seen));
        assert_eq!(gate.pass(&[99, 101, 109], &abandon).await, Passed::Visible { held: Duration::ZERO, at: seen });
        assert_eq!(gate.pass(&[101, 105], &abandon).await, Passed::Bypassed, "105 was running: the gate must ask");
        assert_eq!(gate.pass(&[110], &abandon).await, Passed::Bypassed, "110 was not yet visible");
    }

    #[test]
    fn xids_widen_across_an_epoch_boundary() {
        let epoch = 1u64 << 32;
        // The snapshot is just past a wraparound; the stream's xid is just before it.
        let s = Snapshot { xmin: epoch + 3, xmax: epoch + 10, xip: vec![] };
        assert_eq!(s.widen(u32::MAX - 1), epoch - 2);
        assert!(s.visible(u32::MAX - 1));
        assert_eq!(s.widen(12), epoch + 12, "a committed xid not yet below xmax stays ahead");
        assert!(!s.visible(12));
        // The snapshot is just before a wraparound; the stream's xid is just after it.
        let s = Snapshot { xmin: epoch - 5, xmax: epoch - 2, xip: vec![] };
        assert_eq!(s.widen(1), epoch + 1);
        assert!(!s.visible(1));
    }
}

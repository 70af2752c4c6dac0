//! The Redis sink: pipelined `UNLINK`s and `SCAN`-based pattern deletes through redis-rs,
//! against one node, a master found through Sentinel ([`sentinel`]), or a Redis Cluster
//! ([`cluster`]).

mod cluster;
mod sentinel;

use super::{ApplyCosts, DeadLetter, Sink};
use crate::domain::action::Action;
use crate::domain::config::{RedisConfig, RedisTopology, redact_url};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use std::time::{Duration, Instant};

/// Keys per `UNLINK` command; large enough to amortise round trips, small enough not to
/// stall Redis on one command.
const UNLINK_CHUNK: usize = 256;

/// Keys asked for per `SCAN` step of a pattern delete.
const SCAN_COUNT: usize = 1000;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one reply may take.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A Redis connection that applies invalidation batches.
#[derive(Clone)]
pub struct RedisSink {
    target: Target,
    /// Set by [`Sink::claim`]: write-throughs then go through the fence.
    fence: Option<Fence>,
    description: String,
    /// The actions of the batch in hand that Redis refused for good.
    dead: Vec<DeadLetter>,
    /// Keys Redis reported deleted since the last [`RedisSink::take_deleted`].
    deleted: u64,
    /// Keys deleted, keys scanned and pattern action times since the last [`Sink::take_costs`].
    costs: ApplyCosts,
    /// On a cluster, the slot map the last pattern delete of this batch ended with.
    layout: Option<cluster::Layout>,
}

/// Why a batch could not be applied to Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisSinkError {
    /// The URL in `[redis] url` could not be used.
    #[error("invalid redis url `{url}`; expected redis://host:port/db or rediss://host:port/db")]
    Url {
        /// The URL with any password removed.
        url: String,
        /// What redis-rs said about it.
        #[source]
        source: redis::RedisError,
    },
    /// Fewer replicas than `wait_replicas` confirmed a batch; it will be retried, on
    /// whichever node is master by then.
    #[error(
        "redis at {target} applied a batch but only {acked} of {wanted} replicas confirmed it within {timeout_ms} ms"
    )]
    Unreplicated {
        /// Where the sink points, without credentials.
        target: String,
        /// Replicas asked for.
        wanted: u32,
        /// Replicas that confirmed.
        acked: i64,
        /// How long walbust waited.
        timeout_ms: u64,
    },
    /// A pattern delete met a cluster whose slots kept moving; it will be retried.
    #[error("redis cluster at {target} kept moving slots during a pattern delete ({passes} passes)")]
    Resharding {
        /// Where the sink points, without credentials.
        target: String,
        /// Passes over every primary tried.
        passes: usize,
    },
    /// A command failed or the connection was lost; the batch will be retried.
    #[error("redis at {target} failed while {doing}")]
    Command {
        /// Where the sink points, without credentials.
        target: String,
        /// Which step of the batch failed.
        doing: &'static str,
        /// The redis-rs error.
        #[source]
        source: redis::RedisError,
    },
}

/// Where batches go: the connection of each topology. Clones share the connections.
#[derive(Clone)]
enum Target {
    /// One node, through a connection manager that reconnects by itself.
    Node(ConnectionManager),
    /// The master the Sentinels name, found again after every failure.
    Sentinel(sentinel::Master),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

/// The connection a batch runs on, for one node (the single node or Sentinel's master).
#[derive(Clone)]
enum Conn {
    Manager(ConnectionManager),
    Multiplexed(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Multiplexed(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Multiplexed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Multiplexed(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisSink {
    /// A sink for `[redis]`: one node, a Redis Cluster or a master found through Sentinel.
    /// It connects on first use and reconnects by itself after failures.
    pub fn from_config(config: &RedisConfig) -> Result<Self, RedisSinkError> {
        let root_cert = config.ca_pem.as_deref();
        match &config.topology {
            RedisTopology::Single => RedisSink::new(&config.url, root_cert),
            RedisTopology::Cluster { nodes } => {
                let description = redact_url(&config.url);
                let conn = cluster::connect(&config.url, nodes, root_cert)
                    .map_err(|source| RedisSinkError::Url { url: description.clone(), source })?;
                Ok(RedisSink::with_target(Target::Cluster(conn), format!("cluster {description}")))
            }
            RedisTopology::Sentinel { sentinels, master_name, wait_replicas } => {
                let description = format!("master `{master_name}` of sentinels {}", redact_url(&sentinels.join(",")));
                let master = sentinel::Master::new(&config.url, sentinels, master_name, root_cert, *wait_replicas)
                    .map_err(|source| RedisSinkError::Url { url: description.clone(), source })?;
                Ok(RedisSink::with_target(Target::Sentinel(master), description))
            }
        }
    }

    /// A sink for one node at `url`; it connects on first use and reconnects by itself after
    /// failures. `root_cert` is a PEM CA bundle to trust for `rediss://` instead of the public roots.
    pub fn new(url: &str, root_cert: Option<&[u8]>) -> Result<Self, RedisSinkError> {
        let description = redact_url(url);
        let client =
            client(url, root_cert).map_err(|source| RedisSinkError::Url { url: description.clone(), source })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|source| RedisSinkError::Url { url: description.clone(), source })?;
        Ok(RedisSink::with_target(Target::Node(conn), description))
    }

    fn with_target(target: Target, description: String) -> Self {
        RedisSink {
            target,
            fence: None,
            description,
            dead: Vec::new(),
            deleted: 0,
            costs: ApplyCosts::default(),
            layout: None,
        }
    }

    /// How many keys Redis reported deleted (by `UNLINK`s, pattern deletes and tag busts,
    /// members and sets alike) since the last call.
    pub fn take_deleted(&mut self) -> u64 {
        std::mem::take(&mut self.deleted)
    }

    /// Counts `n` keys Redis reported deleted.
    fn count_deleted(&mut self, n: u64) {
        self.deleted += n;
        self.costs.deleted_keys += n;
    }

    /// The target, safe to log: `redis://host:port/db` without a password.
    pub fn description(&self) -> &str {
        &self.description
    }

    fn failed(&self, doing: &'static str) -> impl FnOnce(redis::RedisError) -> RedisSinkError + '_ {
        move |source| RedisSinkError::Command { target: self.description.clone(), doing, source }
    }

    /// Sorts the error reply of one command: one that retrying cannot fix sets the action
    /// aside as a dead letter; any other fails the batch, which is then retried.
    fn refused(&mut self, action: usize, doing: &'static str, e: redis::RedisError) -> Result<(), RedisSinkError> {
        if refused_for_good(&e) {
            self.dead.push(DeadLetter { action, error: e.to_string() });
            Ok(())
        } else {
            Err(self.failed(doing)(e))
        }
    }

    /// Applies actions in order on `conn`: runs of simple commands go as one pipeline (one
    /// per hash slot on a cluster); pattern actions and tag busts run between them, so a
    /// write-through SET and an UNLINK of the same key keep their order.
    async fn apply_on(&mut self, conn: &mut Conn, actions: &[Action]) -> Result<(), RedisSinkError> {
        self.layout = None;
        let mut queued: Vec<(usize, &Action)> = Vec::new();
        for (index, action) in actions.iter().enumerate() {
            match action {
                Action::Unlink(_) | Action::Incr(_) | Action::Publish { .. } | Action::Set { .. } => {
                    queued.push((index, action))
                }
                Action::ScanUnlink(p) => {
                    self.flush(conn, &mut queued).await?;
                    self.scan(conn, index, p, None, PageStep::Unlink).await?;
                }
                Action::BustTag(k) => {
                    self.flush(conn, &mut queued).await?;
                    self.bust_tag(conn, index, k.as_bytes()).await?;
                }
                Action::ScanBustTag(p) => {
                    self.flush(conn, &mut queued).await?;
                    self.scan(conn, index, p, Some("set"), PageStep::BustTag).await?;
                }
                Action::ScanIncr(p) => {
                    self.flush(conn, &mut queued).await?;
                    self.scan(conn, index, p, None, PageStep::Incr).await?;
                }
            }
        }
        self.flush(conn, &mut queued).await
    }

    /// Runs the queued simple commands as one pipeline, then the follow-ups their failures need.
    async fn flush(&mut self, conn: &mut Conn, queued: &mut Vec<(usize, &Action)>) -> Result<(), RedisSinkError> {
        if queued.is_empty() {
            return Ok(());
        }
        if let Conn::Cluster(cluster) = conn {
            return self.flush_cluster(cluster, queued).await;
        }
        let (pipe, owners) = simple_pipeline(queued, self.fence.as_ref());
        let results: Vec<redis::RedisResult<redis::Value>> =
            pipe.query_async(conn).await.map_err(self.failed("sending a pipeline"))?;
        let mut fallback: Vec<(usize, &[u8])> = Vec::new();
        self.settle(results, &owners, &mut fallback)?;
        self.unlink_instead(conn, &fallback).await?;
        queued.clear();
        Ok(())
    }

    /// Reads the replies of a pipeline from [`simple_pipeline`]: counts deletes, sets aside
    /// the keys whose write or bump failed, and sorts the other errors.
    fn settle<'a>(
        &mut self,
        results: Vec<redis::RedisResult<redis::Value>>,
        owners: &[&'a [(usize, &'a Action)]],
        fallback: &mut Vec<(usize, &'a [u8])>,
    ) -> Result<(), RedisSinkError> {
        for (result, actions) in results.into_iter().zip(owners) {
            let e = match result {
                Ok(reply) => {
                    match actions {
                        [(_, Action::Unlink(_)), ..] => self.count_deleted(count(&reply)),
                        [(_, Action::Set { .. })] if reply == redis::Value::Int(0) => {
                            tracing::warn!("a write-through was refused: another walbust instance took the slot over");
                        }
                        _ => {}
                    }
                    continue;
                }
                Err(e) => e,
            };
            match actions {
                // A write-through that cannot be written must not leave the old value readable
                // (out of memory, deletes still work); when the UNLINK fails too, the batch waits.
                [(index, Action::Set { key, .. })] => {
                    tracing::warn!(error = %e, "write-through SET failed; unlinking the key instead");
                    fallback.push((*index, key.as_bytes()));
                }
                [(index, Action::Incr(key))] if refused_for_good(&e) => {
                    tracing::error!(error = %e, "version bump failed (the key does not hold an integer); unlinking it");
                    fallback.push((*index, key.as_bytes()));
                }
                _ => {
                    for (index, _) in actions.iter() {
                        self.refused(*index, "running a pipeline", e.clone())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// UNLINKs the keys whose write or bump failed.
    async fn unlink_instead(&mut self, conn: &mut Conn, keys: &[(usize, &[u8])]) -> Result<(), RedisSinkError> {
        let Some(&(first, _)) = keys.first() else { return Ok(()) };
        let names: Vec<&[u8]> = keys.iter().map(|(_, k)| *k).collect();
        if let Conn::Cluster(cluster) = conn {
            for result in cluster::unlink_by_slot(cluster, &names).await {
                self.unlinked(first, "unlinking keys whose write failed", result)?;
            }
            return Ok(());
        }
        let result = redis::cmd("UNLINK").arg(&names).query_async(conn).await;
        self.unlinked(first, "unlinking keys whose write failed", result)
    }

    /// Counts what an UNLINK deleted, or sorts its error.
    fn unlinked(
        &mut self,
        action: usize,
        doing: &'static str,
        result: redis::RedisResult<redis::Value>,
    ) -> Result<(), RedisSinkError> {
        match result {
            Ok(reply) => {
                self.count_deleted(count(&reply));
                Ok(())
            }
            Err(e) if e.code().is_some() => self.refused(action, doing, e),
            Err(e) => Err(self.failed(doing)(e)),
        }
    }

    /// Applies `step` to the keys matching `pattern` (of `kind`, when given), one SCAN page
    /// at a time; on a cluster, on every primary. Keys are read as bytes: Redis keys are
    /// binary-safe, and a key that is not UTF-8 must be deleted like any other, not stop the batch.
    async fn scan(
        &mut self,
        conn: &mut Conn,
        action: usize,
        pattern: &str,
        kind: Option<&str>,
        step: PageStep,
    ) -> Result<(), RedisSinkError> {
        let started = Instant::now();
        let scanned = self.scan_pages(conn, action, pattern, kind, step).await;
        self.costs.scans.push(started.elapsed());
        scanned
    }

    /// The SCAN loops of [`RedisSink::scan`].
    async fn scan_pages(
        &mut self,
        conn: &mut Conn,
        action: usize,
        pattern: &str,
        kind: Option<&str>,
        step: PageStep,
    ) -> Result<(), RedisSinkError> {
        if let Conn::Cluster(cluster) = conn {
            let mut cluster = cluster.clone();
            return self.scan_cluster(&mut cluster, action, pattern, kind, step).await;
        }
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = scan_command(cursor, pattern, kind)
                .query_async(conn)
                .await
                .map_err(self.failed("scanning for a pattern"))?;
            self.costs.scanned_keys += keys.len() as u64;
            self.page(conn, action, step, &keys).await?;
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// The per-page step of a pattern action.
    async fn page(
        &mut self,
        conn: &mut Conn,
        action: usize,
        step: PageStep,
        keys: &[Vec<u8>],
    ) -> Result<(), RedisSinkError> {
        if keys.is_empty() {
            return Ok(());
        }
        if let PageStep::BustTag = step {
            for key in keys {
                self.bust_tag(conn, action, key).await?;
            }
            return Ok(());
        }
        let names: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        if let Conn::Cluster(cluster) = conn {
            let results = match step {
                PageStep::Unlink => cluster::unlink_by_slot(cluster, &names).await,
                _ => cluster::incr_each(cluster, &names).await,
            };
            return self.settle_page(conn, action, step, &names, results).await;
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        match step {
            PageStep::Unlink => {
                for chunk in names.chunks(UNLINK_CHUNK) {
                    pipe.cmd("UNLINK").arg(chunk);
                }
            }
            _ => {
                for key in &names {
                    pipe.cmd("INCR").arg(key);
                }
            }
        }
        let results: Vec<redis::RedisResult<redis::Value>> =
            pipe.query_async(conn).await.map_err(self.failed("sending a pipeline"))?;
        self.settle_page(conn, action, step, &names, results).await
    }

    /// Reads the replies of a page's UNLINKs (counted) or INCRs (one per key, in order;
    /// a key that cannot be bumped is unlinked instead).
    async fn settle_page(
        &mut self,
        conn: &mut Conn,
        action: usize,
        step: PageStep,
        names: &[&[u8]],
        results: Vec<redis::RedisResult<redis::Value>>,
    ) -> Result<(), RedisSinkError> {
        let mut fallback: Vec<(usize, &[u8])> = Vec::new();
        for (i, result) in results.into_iter().enumerate() {
            match (step, result) {
                (PageStep::Unlink, result) => self.unlinked(action, "deleting the keys of a pattern", result)?,
                (_, Ok(_)) => {}
                (_, Err(e)) if refused_for_good(&e) => {
                    tracing::error!(error = %e, "version bump failed (the key does not hold an integer); unlinking it");
                    fallback.push((action, names[i]));
                }
                (_, Err(e)) => return Err(self.failed("bumping the keys of a pattern")(e)),
            }
        }
        self.unlink_instead(conn, &fallback).await
    }

    async fn bust_tag(&mut self, conn: &mut Conn, action: usize, key: &[u8]) -> Result<(), RedisSinkError> {
        if let Conn::Cluster(cluster) = conn {
            let mut cluster = cluster.clone();
            return self.bust_tag_cluster(&mut cluster, action, key).await;
        }
        let script = redis::Script::new(BUST_TAG);
        match script.key(key).invoke_async::<i64>(conn).await {
            Ok(deleted) => {
                self.count_deleted(u64::try_from(deleted).unwrap_or(0));
                Ok(())
            }
            Err(e) => self.refused(action, "busting a tag set", e),
        }
    }
}

/// A redis-rs client for `url`, trusting `root_cert` (PEM) for `rediss://` when given.
fn client(url: &str, root_cert: Option<&[u8]>) -> redis::RedisResult<redis::Client> {
    match root_cert {
        None => redis::Client::open(url),
        Some(pem) => redis::Client::build_with_tls(url, certificates(pem)),
    }
}

/// TLS material trusting `pem` instead of the public roots.
fn certificates(pem: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) }
}

/// `SCAN cursor MATCH pattern COUNT n [TYPE kind]`.
fn scan_command(cursor: u64, pattern: &str, kind: Option<&str>) -> redis::Cmd {
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(SCAN_COUNT);
    if let Some(kind) = kind {
        cmd.arg("TYPE").arg(kind);
    }
    cmd
}

/// The simple commands of `queued` as one pipeline that reports each command's error
/// apart; consecutive UNLINKs travel as one multi-key command, and write-throughs go
/// through `fence` once one is claimed. The second part maps each command to its actions.
fn simple_pipeline<'a>(
    queued: &'a [(usize, &'a Action)],
    fence: Option<&Fence>,
) -> (redis::Pipeline, Vec<&'a [(usize, &'a Action)]>) {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut owners: Vec<&[(usize, &Action)]> = Vec::new();
    let mut i = 0;
    while i < queued.len() {
        let run = queued[i..].iter().take(UNLINK_CHUNK).take_while(|(_, a)| matches!(a, Action::Unlink(_))).count();
        if run > 0 {
            let keys: Vec<&str> = queued[i..i + run].iter().filter_map(|(_, a)| a.key()).collect();
            pipe.cmd("UNLINK").arg(keys);
            owners.push(&queued[i..i + run]);
            i += run;
            continue;
        }
        match (queued[i].1, fence) {
            (Action::Set { key, value, ttl }, Some(fence)) => {
                let ttl = ttl.map_or(String::new(), |t| t.to_string());
                pipe.cmd("EVAL")
                    .arg(FENCED_SET)
                    .arg(2)
                    .arg(key)
                    .arg(fence.owner_key(key))
                    .arg(&fence.token)
                    .arg(value)
                    .arg(ttl)
            }
            (action, _) => match action {
                Action::Incr(k) => pipe.cmd("INCR").arg(k),
                Action::Publish { channel, message } => pipe.cmd("PUBLISH").arg(channel).arg(message),
                Action::Set { key, value, ttl: Some(t) } => pipe.cmd("SET").arg(key).arg(value).arg("EX").arg(*t),
                Action::Set { key, value, ttl: None } => pipe.cmd("SET").arg(key).arg(value),
                other => unreachable!("only simple commands are queued, not {other}"),
            },
        };
        owners.push(&queued[i..i + 1]);
        i += 1;
    }
    (pipe, owners)
}

/// The integer an `UNLINK` replies with: how many of its keys existed.
fn count(reply: &redis::Value) -> u64 {
    match reply {
        redis::Value::Int(n) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

/// True for an error reply that retrying the same command cannot fix: the command is
/// malformed for this server (a key or value over its size limits, a wrong type, an
/// unknown command or a failing script). A connection error, a timeout, and the replies
/// that say "not now" (loading, busy, read-only replica, cluster redirections and
/// outages, out of memory, persistence failing, authentication and ACL refusals, which
/// an operator fixes) are not: the batch waits for them.
pub fn refused_for_good(e: &redis::RedisError) -> bool {
    const NOT_NOW: &[&str] = &[
        "LOADING",
        "BUSY",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "MASTERDOWN",
        "READONLY",
        "MOVED",
        "ASK",
        "MISCONF",
        "OOM",
        "NOAUTH",
        "WRONGPASS",
        "NOPERM",
        "NOREPLICAS",
    ];
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return false;
    }
    e.code().is_some_and(|code| !NOT_NOW.contains(&code))
}

/// Deletes every member of the set at KEYS[1], then the set, in one atomic step, so a
/// concurrent SADD lands either before (and is deleted) or after (and stays). A key that
/// is not a set is deleted outright. Returns how many keys existed and were deleted.
const BUST_TAG: &str = r"
if redis.call('TYPE', KEYS[1]).ok ~= 'set' then
  return redis.call('UNLINK', KEYS[1])
end
local members = redis.call('SMEMBERS', KEYS[1])
local deleted = 0
for i = 1, #members, 500 do
  deleted = deleted + redis.call('UNLINK', unpack(members, i, math.min(i + 499, #members)))
end
return deleted + redis.call('UNLINK', KEYS[1])
";

/// The per-page step of a pattern action.
#[derive(Clone, Copy)]
enum PageStep {
    Unlink,
    BustTag,
    Incr,
}

impl Sink for RedisSink {
    type Error = RedisSinkError;

    /// Applies actions in order (see `RedisSink::apply_on`); under Sentinel, on the
    /// master of the moment, and the batch counts as applied only once enough replicas
    /// confirmed it (`WAIT`), so that a failover cannot drop it after it was acknowledged.
    async fn apply(&mut self, actions: &[Action]) -> Result<(), RedisSinkError> {
        self.dead.clear();
        match self.target.clone() {
            Target::Node(conn) => self.apply_on(&mut Conn::Manager(conn), actions).await,
            Target::Cluster(conn) => self.apply_on(&mut Conn::Cluster(conn), actions).await,
            Target::Sentinel(master) => {
                let conn = master.connection().await.map_err(self.failed("asking the sentinels for the master"))?;
                let mut conn = Conn::Multiplexed(conn);
                let mut result = self.apply_on(&mut conn, actions).await;
                if result.is_ok() {
                    result = master.confirm(&mut conn, &self.description).await;
                }
                if result.is_err() {
                    // The master may have changed: ask the Sentinels again before the retry.
                    master.forget().await;
                }
                result
            }
        }
    }

    /// Writes a fresh token into the fence key (on a cluster, one per hash slot), so that
    /// from now on a write-through sent by an instance that held the slot before is refused.
    async fn claim(&mut self, slot: &str) -> Result<(), RedisSinkError> {
        let fence = Fence::new(slot, matches!(self.target, Target::Cluster(_)));
        let owners = fence.owner_keys();
        let mut sets: Vec<redis::Cmd> =
            owners.iter().map(|owner| redis::cmd("SET").arg(owner).arg(&fence.token).clone()).collect();
        let claimed = match self.target.clone() {
            Target::Cluster(conn) => cluster::each(&conn, sets).await.into_iter().try_for_each(|r| r.map(drop)),
            Target::Node(mut conn) => sets.remove(0).exec_async(&mut conn).await,
            Target::Sentinel(master) => {
                let conn = master.connection().await.map_err(self.failed("asking the sentinels for the master"))?;
                let mut conn = Conn::Multiplexed(conn);
                let claimed = sets.remove(0).exec_async(&mut conn).await;
                let mut result = Ok(());
                if claimed.is_ok() {
                    result = master.confirm(&mut conn, &self.description).await;
                }
                if result.is_err() || claimed.is_err() {
                    master.forget().await;
                }
                result?;
                claimed
            }
        };
        match claimed {
            Ok(()) => {
                tracing::info!(slot, "write-throughs fenced for this instance");
                self.fence = Some(fence);
                Ok(())
            }
            // Redis takes no writes but deletes (out of memory, or a failing disk):
            // invalidation must go on; write-throughs stay unfenced until the next claim.
            Err(e) if matches!(e.code(), Some("OOM" | "MISCONF")) => {
                tracing::warn!(slot, error = %e, "cannot claim the write-through fence; write-throughs are not fenced until the next start of streaming");
                self.fence = None;
                Ok(())
            }
            Err(e) => Err(self.failed("claiming the write-through fence")(e)),
        }
    }

    fn take_dead_letters(&mut self) -> Vec<DeadLetter> {
        std::mem::take(&mut self.dead)
    }

    fn take_costs(&mut self) -> ApplyCosts {
        std::mem::take(&mut self.costs)
    }

    async fn ping(&mut self) -> Result<(), RedisSinkError> {
        let ping = redis::cmd("PING");
        let answered = match self.target.clone() {
            Target::Node(mut conn) => ping.exec_async(&mut conn).await,
            Target::Cluster(mut conn) => ping.exec_async(&mut conn).await,
            Target::Sentinel(master) => {
                let mut conn = master.connection().await.map_err(self.failed("asking the sentinels for the master"))?;
                let answered = ping.exec_async(&mut conn).await;
                if answered.is_err() {
                    master.forget().await;
                }
                answered
            }
        };
        answered.map_err(self.failed("answering a ping"))
    }
}

/// The write-through fence: a token this process wrote into `walbust:owner:<slot>` (on a
/// cluster, into one such key per hash slot, `{N}walbust:owner:<slot>`) when it took the
/// slot. Each write-through runs [`FENCED_SET`] against the owner key of its own slot.
#[derive(Debug, Clone)]
struct Fence {
    token: String,
    slot: String,
    cluster: bool,
}

impl Fence {
    /// A fence with a token no other process has: the time and this process's id.
    fn new(slot: &str, cluster: bool) -> Fence {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        Fence { token: format!("{nanos:x}-{}", std::process::id()), slot: slot.to_string(), cluster }
    }

    /// The owner key that `key`'s write-through is checked against: in `key`'s hash slot on a cluster.
    fn owner_key(&self, key: &str) -> String {
        match self.cluster {
            true => cluster::in_slot_of(key.as_bytes(), &format!("walbust:owner:{}", self.slot)),
            false => format!("walbust:owner:{}", self.slot),
        }
    }

    /// Every owner key: one, or one per hash slot on a cluster.
    fn owner_keys(&self) -> Vec<String> {
        match self.cluster {
            true => cluster::in_every_slot(&format!("walbust:owner:{}", self.slot)),
            false => vec![format!("walbust:owner:{}", self.slot)],
        }
    }
}

/// A write-through (`SET KEYS[1] ARGV[2]`, with `EX ARGV[3]` unless empty) made only while
/// the owner key KEYS[2] holds this process's token ARGV[1] (or nothing, as before any
/// claim). Returns 1 when written, 0 when refused.
const FENCED_SET: &str = r"
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then
  return 0
end
if ARGV[3] == '' then
  redis.call('SET', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return 1
";

/// What `walbust check --online` and `walbust status` say about the Redis side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisReport {
    /// One line: the topology and what was found.
    pub summary: String,
    /// What is wrong, each with what to do; empty when all is well.
    pub problems: Vec<String>,
}

/// How long each probe of [`inspect`] may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Reaches the Redis side of `config` as `run` would: one node (PING), every primary of a
/// cluster (state, slot coverage), or the Sentinels (the master they name now, and how many
/// replicas it has against `wait_replicas`).
pub async fn inspect(config: &RedisConfig) -> RedisReport {
    let root_cert = config.ca_pem.as_deref();
    let outcome = tokio::time::timeout(PROBE_TIMEOUT * 3, async {
        match &config.topology {
            RedisTopology::Single => inspect_node(&config.url, root_cert).await,
            RedisTopology::Cluster { nodes } => cluster::inspect(&config.url, nodes, root_cert).await,
            RedisTopology::Sentinel { sentinels, master_name, wait_replicas } => {
                sentinel::inspect(&config.url, sentinels, master_name, root_cert, *wait_replicas).await
            }
        }
    })
    .await;
    outcome.unwrap_or_else(|_| RedisReport {
        summary: format!("{}: no answer within {:?}", redact_url(&config.url), PROBE_TIMEOUT * 3),
        problems: vec![format!(
            "redis at {} did not answer within {:?}; check [redis] and that the servers are reachable",
            redact_url(&config.url),
            PROBE_TIMEOUT * 3
        )],
    })
}

/// PING and ROLE on one node.
async fn inspect_node(url: &str, root_cert: Option<&[u8]>) -> RedisReport {
    let description = redact_url(url);
    let probe = async {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(PROBE_TIMEOUT))
            .set_response_timeout(Some(PROBE_TIMEOUT));
        let mut conn = client(url, root_cert)?.get_multiplexed_async_connection_with_config(&config).await?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        Ok::<_, redis::RedisError>(match role.first() {
            Some(redis::Value::BulkString(r)) => String::from_utf8_lossy(r).into_owned(),
            _ => "unknown".into(),
        })
    };
    match probe.await {
        Ok(role) if role == "master" => {
            RedisReport { summary: format!("{description}: single node, master"), problems: vec![] }
        }
        Ok(role) => RedisReport {
            summary: format!("{description}: single node, {role}"),
            problems: vec![format!(
                "redis at {description} is a {role}, which refuses deletes; point [redis] url at the master, or use sentinels and master_name"
            )],
        },
        Err(e) => RedisReport {
            summary: format!("{description}: unreachable"),
            problems: vec![format!(
                "cannot reach redis at {description}: {e}; check [redis] url and that the server is up"
            )],
        },
    }
}

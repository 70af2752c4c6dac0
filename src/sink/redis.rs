//! The Redis sink: pipelined `UNLINK`s and `SCAN`-based pattern deletes through redis-rs.

use super::{ApplyCosts, DeadLetter, Sink};
use crate::domain::action::Action;
use crate::domain::config::redact_url;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::{Duration, Instant};

/// Keys per `UNLINK` command; large enough to amortise round trips, small enough not to
/// stall Redis on one command.
const UNLINK_CHUNK: usize = 256;

/// Keys asked for per `SCAN` step of a pattern delete.
const SCAN_COUNT: usize = 1000;

/// A Redis connection that applies invalidation batches.
#[derive(Clone)]
pub struct RedisSink {
    conn: ConnectionManager,
    description: String,
    /// The actions of the batch in hand that Redis refused for good.
    dead: Vec<DeadLetter>,
    /// Keys Redis reported deleted since the last [`RedisSink::take_deleted`].
    deleted: u64,
    /// Keys deleted, keys scanned and pattern action times since the last [`Sink::take_costs`].
    costs: ApplyCosts,
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

impl RedisSink {
    /// A sink for `url`; it connects on first use and reconnects by itself after failures.
    /// `root_cert` is a PEM CA bundle to trust for `rediss://` instead of the public roots.
    pub fn new(url: &str, root_cert: Option<&[u8]>) -> Result<Self, RedisSinkError> {
        let description = redact_url(url);
        let client = match root_cert {
            None => redis::Client::open(url),
            Some(pem) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) },
            ),
        }
        .map_err(|source| RedisSinkError::Url { url: description.clone(), source })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|source| RedisSinkError::Url { url: description.clone(), source })?;
        Ok(RedisSink { conn, description, dead: Vec::new(), deleted: 0, costs: ApplyCosts::default() })
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

    /// Runs the queued simple commands as one pipeline, then the follow-ups their failures need.
    async fn flush(&mut self, queued: &mut Vec<(usize, &Action)>) -> Result<(), RedisSinkError> {
        if queued.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        // Consecutive UNLINKs travel as one multi-key command; `owners` maps each command to its actions.
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
            match queued[i].1 {
                Action::Incr(k) => pipe.cmd("INCR").arg(k),
                Action::Publish { channel, message } => pipe.cmd("PUBLISH").arg(channel).arg(message),
                Action::Set { key, value, ttl: Some(t) } => pipe.cmd("SET").arg(key).arg(value).arg("EX").arg(*t),
                Action::Set { key, value, ttl: None } => pipe.cmd("SET").arg(key).arg(value),
                other => unreachable!("only simple commands are queued, not {other}"),
            };
            owners.push(&queued[i..i + 1]);
            i += 1;
        }
        let results: Vec<redis::RedisResult<redis::Value>> =
            pipe.query_async(&mut self.conn).await.map_err(self.failed("sending a pipeline"))?;
        let mut fallback: Vec<(usize, &[u8])> = Vec::new();
        for (result, actions) in results.into_iter().zip(owners) {
            let e = match result {
                Ok(reply) => {
                    if let [(_, Action::Unlink(_)), ..] = actions {
                        self.count_deleted(count(&reply));
                    }
                    continue;
                }
                Err(e) => e,
            };
            match actions {
                // A write-through that cannot be written must not leave the old value readable.
                [(index, Action::Set { key, .. })] => {
                    tracing::warn!(error = %e, "write-through SET failed; unlinking the key instead");
                    fallback.push((*index, key.as_bytes()));
                }
                [(index, Action::Incr(key))] => {
                    tracing::error!(error = %e, "version bump failed (the key does not hold an integer); unlinking it");
                    fallback.push((*index, key.as_bytes()));
                }
                _ => {
                    for (index, _) in actions {
                        self.refused(*index, "running a pipeline", e.clone())?;
                    }
                }
            }
        }
        queued.clear();
        self.unlink_instead(&fallback).await
    }

    /// UNLINKs the keys whose write or bump failed.
    async fn unlink_instead(&mut self, keys: &[(usize, &[u8])]) -> Result<(), RedisSinkError> {
        let Some(&(first, _)) = keys.first() else { return Ok(()) };
        let names: Vec<&[u8]> = keys.iter().map(|(_, k)| *k).collect();
        match redis::cmd("UNLINK").arg(&names).exec_async(&mut self.conn).await {
            Ok(()) => Ok(()),
            Err(e) if e.code().is_some() => self.refused(first, "unlinking keys whose write failed", e),
            Err(e) => Err(self.failed("unlinking keys whose write failed")(e)),
        }
    }

    /// Applies `step` to the keys matching `pattern` (of `kind`, when given), one SCAN page
    /// at a time. Keys are read as bytes: Redis keys are binary-safe, and a key that is not
    /// UTF-8 must be deleted like any other, not stop the batch.
    async fn scan(
        &mut self,
        action: usize,
        pattern: &str,
        kind: Option<&str>,
        step: PageStep,
    ) -> Result<(), RedisSinkError> {
        let started = Instant::now();
        let scanned = self.scan_pages(action, pattern, kind, step).await;
        self.costs.scans.push(started.elapsed());
        scanned
    }

    /// The SCAN loop of [`RedisSink::scan`].
    async fn scan_pages(
        &mut self,
        action: usize,
        pattern: &str,
        kind: Option<&str>,
        step: PageStep,
    ) -> Result<(), RedisSinkError> {
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(SCAN_COUNT);
            if let Some(kind) = kind {
                cmd.arg("TYPE").arg(kind);
            }
            let (next, keys): (u64, Vec<Vec<u8>>) =
                cmd.query_async(&mut self.conn).await.map_err(self.failed("scanning for a pattern"))?;
            self.costs.scanned_keys += keys.len() as u64;
            self.page(action, step, &keys).await?;
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// The per-page step of a pattern action.
    async fn page(&mut self, action: usize, step: PageStep, keys: &[Vec<u8>]) -> Result<(), RedisSinkError> {
        if keys.is_empty() {
            return Ok(());
        }
        if let PageStep::BustTag = step {
            for key in keys {
                self.bust_tag(action, key).await?;
            }
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        match step {
            PageStep::Unlink => {
                for chunk in keys.chunks(UNLINK_CHUNK) {
                    pipe.cmd("UNLINK").arg(chunk);
                }
            }
            _ => {
                for key in keys {
                    pipe.cmd("INCR").arg(key);
                }
            }
        }
        let results: Vec<redis::RedisResult<redis::Value>> =
            pipe.query_async(&mut self.conn).await.map_err(self.failed("sending a pipeline"))?;
        let mut fallback: Vec<(usize, &[u8])> = Vec::new();
        for (i, result) in results.into_iter().enumerate() {
            let e = match result {
                Ok(reply) => {
                    if let PageStep::Unlink = step {
                        self.count_deleted(count(&reply));
                    }
                    continue;
                }
                Err(e) => e,
            };
            match step {
                PageStep::Incr => {
                    tracing::error!(error = %e, "version bump failed (the key does not hold an integer); unlinking it");
                    fallback.push((action, &keys[i]));
                }
                _ => self.refused(action, "deleting the keys of a pattern", e)?,
            }
        }
        self.unlink_instead(&fallback).await
    }

    async fn bust_tag(&mut self, action: usize, key: &[u8]) -> Result<(), RedisSinkError> {
        let script = redis::Script::new(BUST_TAG);
        match script.key(key).invoke_async::<i64>(&mut self.conn).await {
            Ok(deleted) => {
                self.count_deleted(u64::try_from(deleted).unwrap_or(0));
                Ok(())
            }
            Err(e) => self.refused(action, "busting a tag set", e),
        }
    }
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

    /// Applies actions in order: runs of simple commands go as one pipeline; pattern
    /// actions and tag busts run between them, so a write-through SET and an UNLINK of the
    /// same key keep their order.
    async fn apply(&mut self, actions: &[Action]) -> Result<(), RedisSinkError> {
        self.dead.clear();
        let mut queued: Vec<(usize, &Action)> = Vec::new();
        for (index, action) in actions.iter().enumerate() {
            match action {
                Action::Unlink(_) | Action::Incr(_) | Action::Publish { .. } | Action::Set { .. } => {
                    queued.push((index, action))
                }
                Action::ScanUnlink(p) => {
                    self.flush(&mut queued).await?;
                    self.scan(index, p, None, PageStep::Unlink).await?;
                }
                Action::BustTag(k) => {
                    self.flush(&mut queued).await?;
                    self.bust_tag(index, k.as_bytes()).await?;
                }
                Action::ScanBustTag(p) => {
                    self.flush(&mut queued).await?;
                    self.scan(index, p, Some("set"), PageStep::BustTag).await?;
                }
                Action::ScanIncr(p) => {
                    self.flush(&mut queued).await?;
                    self.scan(index, p, None, PageStep::Incr).await?;
                }
            }
        }
        self.flush(&mut queued).await
    }

    fn take_dead_letters(&mut self) -> Vec<DeadLetter> {
        std::mem::take(&mut self.dead)
    }

    fn take_costs(&mut self) -> ApplyCosts {
        std::mem::take(&mut self.costs)
    }

    async fn ping(&mut self) -> Result<(), RedisSinkError> {
        redis::cmd("PING").exec_async(&mut self.conn).await.map_err(self.failed("answering a ping"))
    }
}

//! Redis Cluster: every command addressed to the hash slot of its keys.
//!
//! redis-rs' async cluster client keeps one multiplexed connection per node, follows
//! `MOVED` and `ASK` redirections, and re-reads the slot map when they come. On top of it:
//!
//! - **Simple commands** (UNLINK, INCR, SET) are grouped by hash slot: one pipeline per slot,
//!   all sent at once, so a batch costs one round trip to every primary however many keys
//!   it has. Within a slot they keep their order. `PUBLISH` is cluster-wide and goes last.
//! - **Patterns** run `SCAN` on every primary; matching keys are deleted grouped by slot.
//!   A slot that moves while the SCAN runs could carry a key from a primary not yet
//!   scanned to one already scanned, so a pass counts only when it starts with no slot
//!   migrating and ends with the same slot map; otherwise the pattern is scanned again.
//! - **Tags**: the index set is renamed atomically to a key in its own slot, so a
//!   concurrent SADD lands either before (and its key is deleted) or after (in a new set);
//!   the members are then deleted grouped by slot, wherever they live.
//!
//! Any error that is not the command's own fault fails the batch, which the pipeline
//! retries: every step is idempotent, and nothing is acknowledged before every primary
//! confirmed its part.

use super::{PageStep, RedisReport, RedisSink, RedisSinkError, UNLINK_CHUNK, simple_pipeline};
use crate::domain::action::Action;
use crate::domain::config::redact_url;
use futures_util::StreamExt;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::{RedisResult, Value};
use std::collections::HashMap;
use std::sync::OnceLock;

/// Slot pipelines in flight at once.
const IN_FLIGHT: usize = 512;

/// Passes over every primary a pattern delete tries before the batch fails and is retried later.
const SCAN_PASSES: usize = 5;

/// A connection to the cluster seeded by `url` and `nodes`; it connects on first use.
pub(super) fn connect(url: &str, nodes: &[String], root_cert: Option<&[u8]>) -> RedisResult<ClusterConnection> {
    let (client, config) = client(url, nodes, root_cert, 6, super::CONNECT_TIMEOUT, super::RESPONSE_TIMEOUT)?;
    Ok(client.get_pending_async_connection_with_config(config))
}

/// A cluster client seeded by `url` and `nodes`, with its connection settings.
fn client(
    url: &str,
    nodes: &[String],
    root_cert: Option<&[u8]>,
    retries: u32,
    connect: std::time::Duration,
    response: std::time::Duration,
) -> RedisResult<(redis::cluster::ClusterClient, redis::cluster::ClusterConfig)> {
    let seeds: Vec<&str> = std::iter::once(url).chain(nodes.iter().map(String::as_str)).collect();
    let mut builder = redis::cluster::ClusterClientBuilder::new(seeds).retries(retries);
    if let Some(pem) = root_cert {
        builder = builder.certs(super::certificates(pem));
    }
    let config = redis::cluster::ClusterConfig::new().set_connection_timeout(connect).set_response_timeout(response);
    Ok((builder.build()?, config))
}

/// UNLINKs `keys` with one command per hash slot (at most [`UNLINK_CHUNK`] keys each), all
/// sent at once. Returns each command's reply.
pub(super) async fn unlink_by_slot(conn: &ClusterConnection, keys: &[&[u8]]) -> Vec<RedisResult<Value>> {
    let mut by_slot: HashMap<Slot, Vec<&[u8]>> = HashMap::new();
    for key in keys {
        by_slot.entry(Slot::for_key(key)).or_default().push(key);
    }
    let mut commands = Vec::new();
    for keys in by_slot.values() {
        for chunk in keys.chunks(UNLINK_CHUNK) {
            let mut cmd = redis::cmd("UNLINK");
            cmd.arg(chunk);
            commands.push(cmd);
        }
    }
    each(conn, commands).await
}

/// INCRs each of `keys`, all at once. Returns the replies in the order of `keys`.
pub(super) async fn incr_each(conn: &ClusterConnection, keys: &[&[u8]]) -> Vec<RedisResult<Value>> {
    let mut commands = Vec::with_capacity(keys.len());
    for key in keys {
        let mut cmd = redis::cmd("INCR");
        cmd.arg(key);
        commands.push(cmd);
    }
    each(conn, commands).await
}

/// Sends `commands` at once (each to the node of its keys) and returns their replies in order.
pub(super) async fn each(conn: &ClusterConnection, commands: Vec<redis::Cmd>) -> Vec<RedisResult<Value>> {
    // The futures are built before the first await: a stream that maps lazily would hold
    // its closure across awaits, which the Send check on the sink's futures rejects.
    let mut sends = Vec::with_capacity(commands.len());
    for cmd in commands {
        let mut conn = conn.clone();
        sends.push(async move { cmd.query_async::<Value>(&mut conn).await });
    }
    futures_util::stream::iter(sends).buffered(IN_FLIGHT).collect().await
}

/// The cluster as a pattern delete sees it: the primaries, and whether any slot moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Layout {
    /// Each slot range and its primary's address, as `CLUSTER SLOTS` gives them.
    ranges: Vec<(i64, i64, String, u16)>,
    /// A primary reports a slot migrating or importing.
    moving: bool,
}

impl Layout {
    /// The primaries, each once.
    fn primaries(&self) -> Vec<(String, u16)> {
        let mut primaries: Vec<(String, u16)> = self.ranges.iter().map(|(_, _, h, p)| (h.clone(), *p)).collect();
        primaries.sort();
        primaries.dedup();
        primaries
    }
}

/// Reads the slot map, then asks every primary whether it migrates or imports a slot
/// (`CLUSTER NODES` marks them on the node's own line as `[slot->-id]` and `[slot-<-id]`).
async fn layout(conn: &mut ClusterConnection) -> RedisResult<Layout> {
    let reply = conn
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
        )
        .await?;
    let mut ranges = slot_ranges(&reply);
    ranges.sort();
    let mut layout = Layout { ranges, moving: false };
    for (host, port) in layout.primaries() {
        let nodes = conn.route_command(redis::cmd("CLUSTER").arg("NODES").clone(), by_address(&host, port)).await?;
        let text: String = redis::from_redis_value(nodes)?;
        layout.moving |= text.lines().filter(|l| l.contains("myself")).any(|l| l.contains("->-") || l.contains("-<-"));
    }
    Ok(layout)
}

/// The `(start, end, host, port)` of each range in a `CLUSTER SLOTS` reply.
fn slot_ranges(reply: &Value) -> Vec<(i64, i64, String, u16)> {
    let Value::Array(ranges) = reply else { return Vec::new() };
    ranges
        .iter()
        .filter_map(|range| {
            let Value::Array(fields) = range else { return None };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return None;
            };
            let host = match primary.first()? {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::SimpleString(s) => s.clone(),
                _ => return None,
            };
            let Some(Value::Int(port)) = primary.get(1) else { return None };
            Some((*start, *end, host, u16::try_from(*port).ok()?))
        })
        .collect()
}

fn by_address(host: &str, port: u16) -> RoutingInfo {
    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.to_string(), port })
}

/// A string whose hash slot is `slot`, to build a key in the same slot as another.
fn tag_for(slot: Slot) -> &'static str {
    tag_table().get(&slot).map(String::as_str).expect("the tag table covers every slot")
}

/// For each hash slot, a short string that hashes to it.
fn tag_table() -> &'static HashMap<Slot, String> {
    static TAGS: OnceLock<HashMap<Slot, String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        // Numbers hash evenly: the first ~170,000 cover all 16,384 slots; built once.
        let mut tags = HashMap::with_capacity(16384);
        let mut n: u64 = 0;
        while tags.len() < 16384 {
            let tag = n.to_string();
            tags.entry(Slot::for_key(tag.as_bytes())).or_insert(tag);
            n += 1;
        }
        tags
    })
}

/// `{N}name`, with N chosen so that the key hashes to the slot of `key`.
pub(super) fn in_slot_of(key: &[u8], name: &str) -> String {
    format!("{{{}}}{name}", tag_for(Slot::for_key(key)))
}

/// `{N}name` for every hash slot: one key in each.
pub(super) fn in_every_slot(name: &str) -> Vec<String> {
    tag_table().values().map(|tag| format!("{{{tag}}}{name}")).collect()
}

/// The key an index set is renamed to while its members are deleted: in the set's own
/// slot, and the same for every attempt, so that a retry after a crash finishes the bust
/// the crash interrupted.
fn busting_key(set: &[u8]) -> Vec<u8> {
    let mut key = in_slot_of(set, "walbust:busting:").into_bytes();
    key.extend_from_slice(set);
    key
}

/// Moves the set at KEYS[1] into KEYS[2] (the busting key of its slot) in one atomic
/// step, adding to what an interrupted earlier bust left there. A key that is not a set
/// is deleted outright. Returns how many keys a non-set delete removed, or -1 when KEYS[2]
/// holds members to delete.
const STAGE_TAG: &str = r"
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'set' then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('SUNIONSTORE', KEYS[2], KEYS[2], KEYS[1])
    redis.call('UNLINK', KEYS[1])
  else
    redis.call('RENAME', KEYS[1], KEYS[2])
  end
  return -1
end
local deleted = 0
if kind ~= 'none' then
  deleted = redis.call('UNLINK', KEYS[1])
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return -1
end
return deleted
";

impl RedisSink {
    /// [`RedisSink::flush`] on a cluster: a pipeline per hash slot, all at once, then the
    /// PUBLISHes, then UNLINKs in place of failed writes.
    pub(super) async fn flush_cluster(
        &mut self,
        conn: &ClusterConnection,
        queued: &mut Vec<(usize, &Action)>,
    ) -> Result<(), RedisSinkError> {
        let mut by_slot: HashMap<Slot, Vec<(usize, &Action)>> = HashMap::new();
        let mut publishes: Vec<(usize, &Action)> = Vec::new();
        for &(index, action) in queued.iter() {
            match action.key() {
                Some(key) => by_slot.entry(Slot::for_key(key)).or_default().push((index, action)),
                None => publishes.push((index, action)),
            }
        }
        let groups: Vec<Vec<(usize, &Action)>> = by_slot.into_values().collect();
        let mut owners = Vec::with_capacity(groups.len());
        let mut sends = Vec::with_capacity(groups.len());
        for group in &groups {
            let (pipe, owned) = simple_pipeline(group, self.fence.as_ref());
            owners.push(owned);
            let mut conn = conn.clone();
            sends.push(async move { pipe.query_async::<Vec<RedisResult<Value>>>(&mut conn).await });
        }
        let replies: Vec<_> = futures_util::stream::iter(sends).buffered(IN_FLIGHT).collect().await;
        let mut fallback: Vec<(usize, &[u8])> = Vec::new();
        for (owned, results) in owners.iter().zip(replies) {
            let results = results.map_err(self.failed("sending a slot's pipeline"))?;
            self.settle(results, owned, &mut fallback)?;
        }
        // Announcements follow the deletes they announce.
        if !publishes.is_empty() {
            let (pipe, owners) = simple_pipeline(&publishes, None);
            let results = pipe.query_async(&mut conn.clone()).await.map_err(self.failed("publishing"))?;
            self.settle(results, &owners, &mut fallback)?;
        }
        self.unlink_instead(&mut super::Conn::Cluster(conn.clone()), &fallback).await?;
        queued.clear();
        Ok(())
    }

    /// [`RedisSink::scan`] on a cluster: every primary, until one pass saw no slot move
    /// (the same slot map before and after it, and no slot migrating at either end). The
    /// map read after one pattern is the map before the next one of the same batch.
    pub(super) async fn scan_cluster(
        &mut self,
        conn: &mut ClusterConnection,
        action: usize,
        pattern: &str,
        kind: Option<&str>,
        step: PageStep,
    ) -> Result<(), RedisSinkError> {
        for _ in 0..SCAN_PASSES {
            let before = match self.layout.take() {
                Some(known) => known,
                None => layout(conn).await.map_err(self.failed("reading the cluster's slots"))?,
            };
            for (host, port) in before.primaries() {
                let mut cursor: u64 = 0;
                loop {
                    let reply = conn
                        .route_command(super::scan_command(cursor, pattern, kind), by_address(&host, port))
                        .await
                        .map_err(self.failed("scanning a primary for a pattern"))?;
                    let (next, keys): (u64, Vec<Vec<u8>>) =
                        redis::from_redis_value(reply).map_err(|e| self.failed("reading a SCAN reply")(e.into()))?;
                    self.costs.scanned_keys += keys.len() as u64;
                    self.page(&mut super::Conn::Cluster(conn.clone()), action, step, &keys).await?;
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            let after = layout(conn).await.map_err(self.failed("reading the cluster's slots"))?;
            if !before.moving && !after.moving && before == after {
                self.layout = Some(after);
                return Ok(());
            }
            tracing::info!(pattern, "slots moved while a pattern was scanned; scanning again");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Err(RedisSinkError::Resharding { target: self.description.clone(), passes: SCAN_PASSES })
    }

    /// [`RedisSink::bust_tag`] on a cluster: stage the set under its busting key, delete
    /// its members grouped by slot, then remove exactly those members from the staged set
    /// (Redis drops it once empty). A member another bust staged meanwhile stays for it.
    pub(super) async fn bust_tag_cluster(
        &mut self,
        conn: &mut ClusterConnection,
        action: usize,
        key: &[u8],
    ) -> Result<(), RedisSinkError> {
        let staged = busting_key(key);
        let outcome = redis::Script::new(STAGE_TAG).key(key).key(&staged).invoke_async::<i64>(conn).await;
        match outcome {
            Ok(deleted) if deleted >= 0 => {
                self.count_deleted(u64::try_from(deleted).unwrap_or(0));
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => return self.refused(action, "busting a tag set", e),
        }
        let members: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
            .arg(&staged)
            .query_async(conn)
            .await
            .map_err(self.failed("reading a tag set's members"))?;
        let names: Vec<&[u8]> = members.iter().map(Vec::as_slice).collect();
        for result in unlink_by_slot(conn, &names).await {
            self.unlinked(action, "deleting a tag set's members", result)?;
        }
        for chunk in names.chunks(UNLINK_CHUNK) {
            redis::cmd("SREM")
                .arg(&staged)
                .arg(chunk)
                .exec_async(conn)
                .await
                .map_err(self.failed("emptying a busted tag set"))?;
        }
        // The set itself.
        self.count_deleted(1);
        Ok(())
    }
}

/// What `check --online` and `status` say about the cluster: its state, how many of the
/// 16,384 slots have a primary, and whether every primary answers.
pub(super) async fn inspect(url: &str, nodes: &[String], root_cert: Option<&[u8]>) -> RedisReport {
    let description = redact_url(url);
    let probe = async {
        let (client, config) = client(url, nodes, root_cert, 1, super::PROBE_TIMEOUT, super::PROBE_TIMEOUT)?;
        let mut conn = client.get_async_connection_with_config(config).await?;
        let info = conn
            .route_command(
                redis::cmd("CLUSTER").arg("INFO").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
            )
            .await?;
        let info: String = redis::from_redis_value(info)?;
        let state = info.lines().find_map(|l| l.strip_prefix("cluster_state:")).unwrap_or("unknown").trim().to_string();
        let layout = layout(&mut conn).await?;
        let mut unreachable = Vec::new();
        for (host, port) in layout.primaries() {
            if let Err(e) = conn.route_command(redis::cmd("PING"), by_address(&host, port)).await {
                unreachable.push(format!("{host}:{port} ({e})"));
            }
        }
        Ok::<_, redis::RedisError>((state, layout, unreachable))
    };
    let (state, layout, unreachable) = match probe.await {
        Ok(found) => found,
        Err(e) => {
            return RedisReport {
                summary: format!("cluster {description}: unreachable"),
                problems: vec![format!(
                    "cannot reach the redis cluster through {description}: {e}; check [redis] url and nodes, and that cluster mode is on (cluster = true needs a Redis Cluster)"
                )],
            };
        }
    };
    let covered: i64 = layout.ranges.iter().map(|(start, end, _, _)| end - start + 1).sum();
    let primaries = layout.primaries();
    let mut problems = Vec::new();
    if state != "ok" {
        problems.push(format!(
            "the redis cluster reports cluster_state:{state}; invalidations wait until every slot is served again"
        ));
    }
    if covered < 16384 {
        problems.push(format!(
            "only {covered} of 16384 hash slots have a primary; keys in the others cannot be invalidated until they are assigned (redis-cli --cluster fix)"
        ));
    }
    for node in &unreachable {
        problems.push(format!("the cluster primary {node} does not answer"));
    }
    let summary = format!(
        "cluster {description}: state {state}, {covered} of 16384 slots covered, {} of {} primaries reachable{}",
        primaries.len() - unreachable.len(),
        primaries.len(),
        if layout.moving { ", a slot migration in progress" } else { "" }
    );
    RedisReport { summary, problems }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busting_key_shares_its_sets_slot_whatever_braces_the_set_has() {
        for set in ["idx:org:1", "{user:7}:idx", "a{}b}", "x}{y", "", "{", "tags:{{org}}"] {
            let staged = busting_key(set.as_bytes());
            assert_eq!(
                Slot::for_key(&staged),
                Slot::for_key(set.as_bytes()),
                "{set} -> {}",
                String::from_utf8_lossy(&staged)
            );
        }
    }

    #[test]
    fn cluster_slots_replies_become_ranges_per_primary() {
        let node = |h: &str, p: i64| {
            Value::Array(vec![Value::BulkString(h.into()), Value::Int(p), Value::BulkString(b"id".to_vec())])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(5460), node("10.0.0.1", 7000), node("10.0.0.4", 7003)]),
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node("10.0.0.2", 7001)]),
            Value::Int(3),
        ]);
        assert_eq!(
            slot_ranges(&reply),
            [(0, 5460, "10.0.0.1".to_string(), 7000), (5461, 16383, "10.0.0.2".to_string(), 7001)]
        );
    }
}

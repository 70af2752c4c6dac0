//! The consistency oracle: concurrent cache-aside readers and writers over a few hot rows,
//! then every cached key compared with the database, each stale one explained.
//!
//! Readers do what applications do: `GET` the row's key; on a miss, `SELECT` the row, wait
//! their think time (the application's work between reading and caching), and `SET` the
//! key. Writers update one row per transaction. walbust invalidates the row's key through
//! [`rules`]. At the end, once walbust has applied everything, a cached value that differs
//! from the row is stale. The integration tests run it briefly; the bench runs it long,
//! with a stalling synchronous standby and a `kill -9` of walbust.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The table the oracle writes and reads; `rows` rows are created by [`schema`].
pub const TABLE: &str = "oracle_rows";

/// The tables and rows: `rows` rows, each with a counter that every write increments.
pub fn schema(rows: i32) -> String {
    format!(
        "CREATE TABLE {TABLE} (id int PRIMARY KEY, v bigint NOT NULL DEFAULT 0);\n\
         INSERT INTO {TABLE} (id) SELECT g FROM generate_series(1, {rows}) g;"
    )
}

/// The rule deleting a row's key, `{prefix}:row:{id}`.
pub fn rules(prefix: &str) -> String {
    format!("[[rule]]\nname = \"oracle\"\ntable = \"{TABLE}\"\nkeys = [\"{prefix}:row:{{id}}\"]\n")
}

/// The key of row `id`.
pub fn key(prefix: &str, id: i32) -> String {
    format!("{prefix}:row:{id}")
}

/// The workload's shape.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Postgres URL of the database holding [`TABLE`].
    pub db_url: String,
    /// Redis URL of the cache walbust invalidates.
    pub redis_url: String,
    /// Key prefix of [`rules`].
    pub prefix: String,
    /// Rows read and written, ids 1 to `rows`.
    pub rows: i32,
    /// Each reader's think time between its SELECT and its SET; one reader per entry.
    pub readers: Vec<Duration>,
    /// Concurrent writers.
    pub writers: usize,
    /// SQL each writer's session runs first (`SET synchronous_commit = on`, for example).
    pub writer_setup: String,
}

/// Why the workload could not run.
#[derive(Debug, thiserror::Error)]
pub enum OracleError {
    /// Postgres refused or failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// Redis refused or failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// One reader's fill of the cache.
#[derive(Debug, Clone, Copy)]
struct Fill {
    value: i64,
    read_at: Instant,
    set_at: Instant,
}

/// What happened to each row: the fills and when each write's COMMIT returned.
#[derive(Debug, Default)]
struct History {
    fills: HashMap<i32, Vec<Fill>>,
    /// By row: (value written, when its COMMIT returned to the writer).
    writes: HashMap<i32, Vec<(i64, Instant)>>,
}

/// A running workload; [`Running::finish`] stops it.
pub struct Running {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Result<u64, OracleError>>>,
    history: Arc<Mutex<History>>,
    workload: Workload,
    started: Instant,
}

/// Counts of a finished workload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Writes committed.
    pub writes: u64,
    /// Cache fills (misses followed by a SELECT and a SET).
    pub fills: u64,
}

/// A cached value that differs from its row, with what the history says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// The key.
    pub key: String,
    /// The value in the cache.
    pub cached: i64,
    /// The value in the database.
    pub current: i64,
    /// How it came to be there.
    pub explanation: String,
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} holds v={} but the row has v={}: {}", self.key, self.cached, self.current, self.explanation)
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, OracleError> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

impl Workload {
    /// Starts the readers and writers.
    pub async fn start(self) -> Result<Running, OracleError> {
        let stop = Arc::new(AtomicBool::new(false));
        let history = Arc::new(Mutex::new(History::default()));
        let redis = redis::Client::open(self.redis_url.as_str())?;
        let mut tasks = Vec::new();
        for (n, &think) in self.readers.iter().enumerate() {
            let db = connect(&self.db_url).await?;
            let mut cache = redis.get_multiplexed_async_connection().await?;
            let (stop, history, prefix, rows) = (stop.clone(), history.clone(), self.prefix.clone(), self.rows);
            let mut rng = fastrand::Rng::with_seed(n as u64 + 1);
            tasks.push(tokio::spawn(async move {
                let select = db.prepare(&format!("SELECT v FROM {TABLE} WHERE id = $1")).await?;
                let mut fills = 0;
                while !stop.load(Ordering::Relaxed) {
                    let id = rng.i32(1..=rows);
                    let key = key(&prefix, id);
                    let cached: Option<i64> = redis::cmd("GET").arg(&key).query_async(&mut cache).await?;
                    if cached.is_some() {
                        // A hit costs the reader a little time, as real work would.
                        tokio::task::yield_now().await;
                        continue;
                    }
                    let read_at = Instant::now();
                    let value: i64 = db.query_one(&select, &[&id]).await?.get(0);
                    if !think.is_zero() {
                        tokio::time::sleep(think).await;
                    }
                    let () = redis::cmd("SET").arg(&key).arg(value).query_async(&mut cache).await?;
                    let set_at = Instant::now();
                    fills += 1;
                    let mut h = history.lock().unwrap_or_else(|e| e.into_inner());
                    h.fills.entry(id).or_default().push(Fill { value, read_at, set_at });
                }
                Ok(fills)
            }));
        }
        for n in 0..self.writers {
            let db = connect(&self.db_url).await?;
            if !self.writer_setup.is_empty() {
                db.batch_execute(&self.writer_setup).await?;
            }
            let (stop, history, rows) = (stop.clone(), history.clone(), self.rows);
            let mut rng = fastrand::Rng::with_seed(1000 + n as u64);
            tasks.push(tokio::spawn(async move {
                let update = db.prepare(&format!("UPDATE {TABLE} SET v = v + 1 WHERE id = $1 RETURNING v")).await?;
                let mut writes = 0;
                while !stop.load(Ordering::Relaxed) {
                    let id = rng.i32(1..=rows);
                    let value: i64 = db.query_one(&update, &[&id]).await?.get(0);
                    let committed = Instant::now();
                    writes += 1;
                    let mut h = history.lock().unwrap_or_else(|e| e.into_inner());
                    h.writes.entry(id).or_default().push((value, committed));
                }
                Ok(writes)
            }));
        }
        Ok(Running { stop, tasks, history, workload: self, started: Instant::now() })
    }
}

impl Running {
    /// Stops every reader and writer and waits for them; the first error any met is returned.
    pub async fn finish(&mut self) -> Result<Counts, OracleError> {
        self.stop.store(true, Ordering::Relaxed);
        let mut counts = Counts::default();
        let readers = self.workload.readers.len();
        for (i, task) in self.tasks.drain(..).enumerate() {
            let n = task.await.expect("an oracle task panicked")?;
            if i < readers {
                counts.fills += n;
            } else {
                counts.writes += n;
            }
        }
        Ok(counts)
    }

    /// Compares every cached key with its row; call it after [`Running::finish`] and once
    /// walbust has applied everything written.
    pub async fn stale(&self) -> Result<Vec<Stale>, OracleError> {
        let w = &self.workload;
        let db = connect(&w.db_url).await?;
        let mut cache = redis::Client::open(w.redis_url.as_str())?.get_multiplexed_async_connection().await?;
        let rows: HashMap<i32, i64> = db
            .query(&format!("SELECT id, v FROM {TABLE}"), &[])
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut differ = Vec::new();
        for id in 1..=w.rows {
            let key = key(&w.prefix, id);
            let cached: Option<i64> = redis::cmd("GET").arg(&key).query_async(&mut cache).await?;
            let current = rows.get(&id).copied().unwrap_or_default();
            if let Some(cached) = cached.filter(|&c| c != current) {
                differ.push((id, key, cached, current));
            }
        }
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let stale = differ
            .into_iter()
            .map(|(id, key, cached, current)| {
                let explanation = self.explain(&history, id, cached);
                Stale { key, cached, current, explanation }
            })
            .collect();
        Ok(stale)
    }

    /// How a stale `cached` value of row `id` came to be in the cache.
    fn explain(&self, history: &History, id: i32, cached: i64) -> String {
        let ms = |t: Instant| t.duration_since(self.started).as_secs_f64() * 1000.0;
        let fill = history.fills.get(&id).and_then(|f| f.iter().rev().find(|f| f.value == cached));
        // The write that made `cached` old: the first with a higher value.
        let next = history.writes.get(&id).and_then(|w| w.iter().filter(|(v, _)| *v > cached).min_by_key(|(v, _)| *v));
        match (fill, next) {
            (None, _) => format!("no reader set v={cached}"),
            (Some(_), None) => format!("no write after v={cached} was recorded"),
            (Some(f), Some(&(v, committed))) if f.read_at < committed && f.set_at > committed => format!(
                "stale fill: a reader SELECTed v={cached} at {:.1} ms, before the COMMIT of v={v} returned at {:.1} ms, \
                 and SET it at {:.1} ms, {:.1} ms after that COMMIT ({:.1} ms from SELECT to SET)",
                ms(f.read_at),
                ms(committed),
                ms(f.set_at),
                ms(f.set_at) - ms(committed),
                ms(f.set_at) - ms(f.read_at),
            ),
            (Some(f), Some(&(v, committed))) if f.set_at <= committed => format!(
                "visibility window: a reader SELECTed v={cached} at {:.1} ms and SET it at {:.1} ms, while the COMMIT \
                 of v={v} had not yet returned (it did at {:.1} ms): its invalidation ran before the commit was visible \
                 to the reader",
                ms(f.read_at),
                ms(f.set_at),
                ms(committed),
            ),
            (Some(f), Some(&(v, committed))) => format!(
                "a reader SELECTed v={cached} at {:.1} ms, after the COMMIT of v={v} returned at {:.1} ms: it read an \
                 old row after the commit",
                ms(f.read_at),
                ms(committed),
            ),
        }
    }
}

//! The benchmark environment: a throwaway Postgres and Redis, the schema and rules every
//! scenario shares, and the helpers that talk to them.

use anyhow::{Context, bail, ensure};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use walbust::offline::throwaway::{PostgresOptions, ThrowawayPostgres, ThrowawayRedis, postgres_bin_dir};
use walbust::postgres::lsn::Lsn;

/// Two keys per change: the row's own key and its org's list key (both from primary-key
/// columns, so every op renders exact keys under REPLICA IDENTITY DEFAULT).
pub(crate) const RULES: &str = r#"
[[rule]]
name = "items"
table = "public.bench_items"
keys = ["item:{id}", "org:{org_id}:items"]

[[rule]]
name = "large"
table = "public.bench_large"
keys = ["large:{id}", "org:{org_id}:large"]

[[rule]]
name = "accounts"
table = "public.pgbench_accounts"
keys = ["account:{aid}"]

[[rule]]
name = "tellers"
table = "public.pgbench_tellers"
keys = ["teller:{tid}"]

[[rule]]
name = "branches"
table = "public.pgbench_branches"
keys = ["branch:{bid}"]
"#;

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE bench_items (
    org_id int NOT NULL,
    id bigint NOT NULL,
    name text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    payload text NOT NULL,
    PRIMARY KEY (org_id, id)
);
CREATE TABLE bench_large (org_id int NOT NULL, id bigint NOT NULL, n int NOT NULL, PRIMARY KEY (org_id, id));
-- Writes `total` changes from id `first` on, committing every `per_txn` rows. Plain: inserts.
-- Mixed: by id mod 3, an insert of a new row, an update or a delete of an existing one.
CREATE PROCEDURE bench_write(first bigint, total bigint, per_txn int, mixed bool) LANGUAGE plpgsql AS $$
DECLARE
    i bigint := 0;
    n bigint;
BEGIN
    WHILE i < total LOOP
        n := least(per_txn, total - i);
        IF NOT mixed THEN
            INSERT INTO bench_items (org_id, id, name, payload)
                SELECT g % 10000, g, 'item ' || g, repeat('p', 80) FROM generate_series(first + i, first + i + n - 1) g;
        ELSE
            INSERT INTO bench_items (org_id, id, name, payload)
                SELECT g % 10000, g + total, 'item ' || g, repeat('p', 80)
                FROM generate_series(first + i, first + i + n - 1) g WHERE g % 3 = 0;
            UPDATE bench_items SET name = 'renamed ' || id, updated_at = now()
                WHERE (org_id, id) IN (SELECT g % 10000, g FROM generate_series(first + i, first + i + n - 1) g WHERE g % 3 = 1);
            DELETE FROM bench_items
                WHERE (org_id, id) IN (SELECT g % 10000, g FROM generate_series(first + i, first + i + n - 1) g WHERE g % 3 = 2);
        END IF;
        COMMIT;
        i := i + n;
    END LOOP;
END $$;
"#;

/// Orgs in the data set: `org_id = id % ORGS`.
pub(crate) const ORGS: i64 = 10_000;

/// The throwaway servers and a SQL connection to the `bench` database.
pub(crate) struct Env {
    pub(crate) pg: ThrowawayPostgres,
    pub(crate) redis: ThrowawayRedis,
    pub(crate) db: Client,
    pub(crate) cache: redis::aio::MultiplexedConnection,
    pub(crate) dir: PathBuf,
}

impl Env {
    pub(crate) async fn start() -> anyhow::Result<Env> {
        let settings = [
            "shared_buffers = 512MB",
            "max_wal_size = 8GB",
            "checkpoint_timeout = 30min",
            "autovacuum = off",
            "wal_sender_timeout = 5min",
        ]
        .map(String::from)
        .to_vec();
        let pg = tokio::task::spawn_blocking(move || {
            ThrowawayPostgres::start(&PostgresOptions { settings, ..Default::default() })
        })
        .await??;
        let redis = tokio::task::spawn_blocking(ThrowawayRedis::start).await??;
        let admin = connect(&pg.url("postgres")).await?;
        admin.batch_execute("CREATE DATABASE bench").await?;
        let db = connect(&pg.url("bench")).await?;
        db.batch_execute(SCHEMA).await?;
        let cache = redis::Client::open(redis.url())?.get_multiplexed_async_connection().await?;
        let dir = std::env::temp_dir().join(format!("walbust-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("rules.toml"), RULES)?;
        println!(
            "servers: postgres 127.0.0.1:{} (data in a temporary directory), redis 127.0.0.1:{}\n",
            pg.port(),
            redis.port()
        );
        Ok(Env { pg, redis, db, cache, dir })
    }

    /// config.toml for walbust over `slot` and `publication`, written next to the rules, with
    /// `extra` sections at the end (`[consistency]`).
    pub(crate) fn config_text_with(&self, slot: &str, create_slot: bool, metrics: Option<u16>, extra: &str) -> String {
        let listen = metrics.map_or("off".to_string(), |p| format!("127.0.0.1:{p}"));
        format!(
            "rules = [\"rules.toml\"]\n[source]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"bench\"\n\
             create_slot = {create_slot}\nheartbeat_interval = \"off\"\n[redis]\nurl = \"{}\"\n[metrics]\nlisten = \"{listen}\"\n{extra}",
            self.pg.url("bench"),
            self.redis.url()
        )
    }

    pub(crate) async fn current_lsn(&self) -> anyhow::Result<Lsn> {
        let row = self.db.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?;
        parse_lsn(row.get(0))
    }

    pub(crate) async fn confirmed(&self, slot: &str) -> anyhow::Result<Option<Lsn>> {
        let rows = self
            .db
            .query("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await?;
        match rows.first().and_then(|r| r.get::<_, Option<&str>>(0)) {
            Some(text) => Ok(Some(parse_lsn(text)?)),
            None => Ok(None),
        }
    }

    /// (Re)creates publication `bench` over every rule table that exists: `walbust run`
    /// refuses to start when a rule's table is left out of the publication, and a published
    /// table that nobody writes during a scenario costs nothing.
    pub(crate) async fn publish(&self) -> anyhow::Result<()> {
        let row = self
            .db
            .query_one(
                "SELECT string_agg(format('%I.%I', n.nspname, c.relname), ', ' ORDER BY c.relname) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname IN \
                 ('bench_items', 'bench_large', 'pgbench_accounts', 'pgbench_tellers', 'pgbench_branches')",
                &[],
            )
            .await?;
        let tables: String = row.get(0);
        self.db
            .batch_execute(&format!("DROP PUBLICATION IF EXISTS bench; CREATE PUBLICATION bench FOR TABLE {tables}"))
            .await?;
        Ok(())
    }

    /// Drops `slot` if it exists, first waiting (bounded) for a consumer that just stopped to let go of it.
    pub(crate) async fn drop_slot(&self, slot: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rows = self.db.query("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await?;
            if !rows.first().is_some_and(|r| r.get::<_, bool>(0)) {
                break;
            }
            ensure!(Instant::now() < deadline, "slot {slot} is still in use 30s after its consumer stopped");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.db
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        Ok(())
    }

    /// Waits until the slot is held by a walsender (walbust is streaming).
    pub(crate) async fn wait_active(&self, slot: &str, child: &mut tokio::process::Child) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let rows = self.db.query("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await?;
            if rows.first().is_some_and(|r| r.get::<_, bool>(0)) {
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                // The bench directory goes when the bench exits, so the log's end goes into the error.
                let log = std::fs::read_to_string(self.dir.join("walbust.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "the consumer of slot {slot} exited with {status} before streaming; its log ends:\n{}",
                    tail.join("\n")
                );
            }
            ensure!(Instant::now() < deadline, "nothing started streaming from slot {slot} within 60s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sets `keys` in Redis, so that their deletion is real work (and observable).
    pub(crate) async fn seed(&self, keys: impl Iterator<Item = String>) -> anyhow::Result<usize> {
        let mut conn = self.cache.clone();
        let mut n = 0;
        let keys: Vec<String> = keys.collect();
        for chunk in keys.chunks(5000) {
            let mut cmd = redis::cmd("MSET");
            for k in chunk {
                cmd.arg(k).arg("cached");
            }
            cmd.exec_async(&mut conn).await?;
            n += chunk.len();
        }
        Ok(n)
    }

    pub(crate) async fn dbsize(&self) -> anyhow::Result<u64> {
        let mut conn = self.cache.clone();
        let all: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await?;
        Ok(all - fence_keys(&mut conn).await?)
    }

    pub(crate) async fn flushdb(&self) -> anyhow::Result<()> {
        let mut conn = self.cache.clone();
        redis::cmd("FLUSHDB").exec_async(&mut conn).await?;
        Ok(())
    }

    /// Starts the release binary on `slot`; its output goes to walbust.log in the bench directory.
    pub(crate) fn spawn_walbust(
        &self,
        bin: &Path,
        slot: &str,
        create_slot: bool,
        metrics: Option<u16>,
    ) -> anyhow::Result<tokio::process::Child> {
        self.spawn_walbust_with(bin, slot, create_slot, metrics, "")
    }

    /// [`Env::spawn_walbust`] with `extra` config sections (`[consistency]`).
    pub(crate) fn spawn_walbust_with(
        &self,
        bin: &Path,
        slot: &str,
        create_slot: bool,
        metrics: Option<u16>,
        extra: &str,
    ) -> anyhow::Result<tokio::process::Child> {
        self.spawn_walbust_wrapped(&[], bin, slot, create_slot, metrics, extra)
    }

    /// [`Env::spawn_walbust_with`] run under `wrapper`, a program and its arguments that
    /// take the binary and its arguments next (callgrind), or directly when it is empty.
    pub(crate) fn spawn_walbust_wrapped(
        &self,
        wrapper: &[OsString],
        bin: &Path,
        slot: &str,
        create_slot: bool,
        metrics: Option<u16>,
        extra: &str,
    ) -> anyhow::Result<tokio::process::Child> {
        let config = self.dir.join(format!("{slot}.toml"));
        std::fs::write(&config, self.config_text_with(slot, create_slot, metrics, extra))?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("walbust.log"))?;
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = tokio::process::Command::new(program);
                command.args(args).arg(bin);
                command
            }
            None => tokio::process::Command::new(bin),
        };
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(child)
    }

    pub(crate) fn pg_tool(&self, name: &str) -> anyhow::Result<PathBuf> {
        Ok(postgres_bin_dir()?.join(name))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

pub(crate) fn parse_lsn(text: &str) -> anyhow::Result<Lsn> {
    text.parse().map_err(|_| anyhow::anyhow!("not an LSN: {text}"))
}

/// Stops a child walbust with SIGTERM (it finishes its batch and exits) and waits, bounded.
pub(crate) async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) on our own child's pid with a valid signal.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(20), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Polls the slot until its confirmed flush LSN reaches `target`.
pub(crate) async fn wait_confirmed(env: &Env, slot: &str, target: Lsn, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if env.confirmed(slot).await?.is_some_and(|l| l >= target) {
            return Ok(start.elapsed());
        }
        ensure!(start.elapsed() < limit, "slot {slot} did not confirm {target} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until the walsender serving `slot` has sent WAL up to `target`.
pub(crate) async fn wait_sent(env: &Env, slot: &str, target: Lsn, limit: Duration) -> anyhow::Result<()> {
    let sql = "SELECT r.sent_lsn::text FROM pg_stat_replication r \
               JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1";
    let deadline = Instant::now() + limit;
    loop {
        let rows = env.db.query(sql, &[&slot]).await?;
        if let Some(sent) = rows.first().and_then(|r| r.get::<_, Option<&str>>(0))
            && parse_lsn(sent)? >= target
        {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "slot {slot}'s walsender had not sent {target} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(walbust::offline::throwaway::free_port()?)
}

/// walbust's metrics page, if it answers within 5 s.
pub(crate) async fn scrape(port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await.ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    tokio::time::timeout(Duration::from_secs(5), fetch).await.ok()?
}

/// Commits of a `walbust_*_lag_seconds` histogram later than the bucket bound `le`:
/// its count minus that bucket, from a metrics page.
pub(crate) fn later_than(page: &str, histogram: &str, le: &str) -> Option<f64> {
    Some(sample(page, &format!("{histogram}_count "))? - sample(page, &format!("{histogram}_bucket{{le=\"{le}\"}}"))?)
}

/// The value of the first sample on a metrics page whose line starts with `prefix` (the
/// name and labels, then a space).
pub(crate) fn sample(page: &str, prefix: &str) -> Option<f64> {
    page.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
}

/// The sum of `walbust_changes_total` on the metrics endpoint, if it answers.
pub(crate) async fn scrape_changes(port: u16) -> Option<u64> {
    let body = scrape(port).await?;
    let total: f64 = body
        .lines()
        .filter(|l| l.starts_with("walbust_changes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    (total > 0.0).then_some(total as u64)
}

/// The write-through fence keys walbust keeps (`walbust:owner:<slot>`, one per hash slot on
/// a cluster): not cache entries, so not counted as keys left behind.
pub(crate) async fn fence_keys(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let mut cursor: u64 = 0;
    let mut n = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("*walbust:owner:*")
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await?;
        n += keys.len() as u64;
        if next == 0 {
            return Ok(n);
        }
        cursor = next;
    }
}

//! walbust benchmarks against the physical limit: `pg_recvlogical` draining the same WAL.
//!
//! `cargo run --release --example bench -- all` starts a throwaway Postgres and Redis
//! (`walbust::throwaway`), runs every scenario, and prints one results table per scenario.
//! See `bench/README.md` for what each scenario measures and how.

use anyhow::{Context, bail, ensure};
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use walbust::config::Config;
use walbust::lsn::Lsn;
use walbust::pipeline::{self, Options, Stats};
use walbust::rules::RuleSet;
use walbust::sink::RedisSink;
use walbust::throwaway::{PostgresOptions, ThrowawayPostgres, ThrowawayRedis, postgres_bin_dir};

mod soak;

/// Two keys per change: the row's own key and its org's list key (both from primary-key
/// columns, so every op renders exact keys under REPLICA IDENTITY DEFAULT).
const RULES: &str = r#"
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

const SCHEMA: &str = r#"
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

/// pgbench's TPC-B transaction without the SELECT: three updates and an insert.
const PGBENCH_SCRIPT: &str = r"\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
";

/// Orgs in the data set: `org_id = id % ORGS`.
const ORGS: i64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Drain pre-written WAL: walbust against pg_recvlogical.
    Drain,
    /// Commit-to-invalidation latency at paced commit rates.
    Latency,
    /// walbust CPU per change, RSS, and pgbench throughput with and without walbust.
    Cost,
    /// One very large transaction: bounded RSS, every key invalidated.
    LargeTxn,
    /// Drain, latency, cost and large-txn, in that order.
    All,
    /// Committed writes under a seeded schedule of faults; fails if an invalidation is lost.
    Soak,
}

/// walbust benchmarks; every scenario starts its own throwaway Postgres and Redis.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Cli {
    /// Which scenario to run.
    scenario: Scenario,
    /// Repetitions of each measurement; medians are quoted.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Drain variants to run, by number: 1 (1 row/txn), 2 (10), 3 (100), 4 (mixed, 10 rows/txn).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    variants: Vec<usize>,
    /// Changes pre-written per drain variant.
    #[arg(long, default_value_t = 200_000)]
    changes: i64,
    /// Commit rates for the latency scenario (commits per second).
    #[arg(long, value_delimiter = ',', default_value = "500,5000")]
    rates: Vec<u32>,
    /// Seconds of paced writing per latency run.
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// Changes written while walbust's CPU time is measured.
    #[arg(long, default_value_t = 200_000)]
    cost_changes: i64,
    /// Seconds per pgbench run; 0 skips pgbench.
    #[arg(long, default_value_t = 20)]
    pgbench_secs: u64,
    /// pgbench clients.
    #[arg(long, default_value_t = 4)]
    pgbench_clients: u32,
    /// pgbench scale factor (100,000 accounts per unit).
    #[arg(long, default_value_t = 10)]
    pgbench_scale: u32,
    /// Rows updated by the one large transaction.
    #[arg(long, default_value_t = 10_000_000)]
    large_rows: i64,
    /// Runs of the large-transaction scenario (it is long; one by default).
    #[arg(long, default_value_t = 1)]
    large_runs: usize,
    /// Wait before each measurement until the 1-minute load average is below this.
    #[arg(long, default_value_t = 0.7)]
    load_below: f64,
    /// Longest wait for the load to settle, in seconds; then measure anyway and say so.
    #[arg(long, default_value_t = 600)]
    load_wait_secs: u64,
    #[command(flatten)]
    soak: soak::SoakArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let walbust_bin = build_walbust()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if cli.scenario == Scenario::Soak {
        if !runtime.block_on(soak::run(&cli.soak, &walbust_bin))? {
            std::process::exit(1);
        }
        return Ok(());
    }
    runtime.block_on(run(cli, walbust_bin))
}

async fn run(cli: Cli, walbust_bin: PathBuf) -> anyhow::Result<()> {
    let all = cli.scenario == Scenario::All;
    println!(
        "# walbust benchmarks\n\nmachine: {} cores, {}; runs per figure: {}; figures are median (min-max).",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        first_line("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown cpu".into()),
        cli.runs
    );
    println!(
        "Postgres: throwaway cluster with fsync=off and full_page_writes=off (both consumers drain the same WAL), synchronous_commit=on, autovacuum=off.\n"
    );
    let env = Env::start().await?;
    if all || cli.scenario == Scenario::Drain {
        drain(&cli, &env).await?;
    }
    if all || cli.scenario == Scenario::Latency {
        latency(&cli, &env, &walbust_bin).await?;
    }
    if all || cli.scenario == Scenario::Cost {
        cost(&cli, &env, &walbust_bin).await?;
    }
    if all || cli.scenario == Scenario::LargeTxn {
        large_txn(&cli, &env, &walbust_bin).await?;
    }
    Ok(())
}

/// Builds the release binary the child-process scenarios run, and returns its path.
fn build_walbust() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    // Built together with this example, so both share one feature resolution: the binary
    // alone would resolve dependencies without the dev-dependencies' features and rebuild
    // most of them a second time.
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "--quiet", "--bin", "walbust", "--example", "bench", "--manifest-path"])
        .arg(&manifest)
        .status()
        .context("running cargo build for the walbust binary")?;
    ensure!(status.success(), "cargo build --release --bin walbust failed");
    // This example runs from target/release/examples/bench; the binary sits in target/release.
    let exe = std::env::current_exe()?;
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("walbust")).context("locating target/release")?;
    ensure!(bin.is_file(), "{} is missing after the build", bin.display());
    Ok(bin)
}

fn first_line(path: &str, prefix: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(prefix))?;
    Some(line.split_once(':').map_or(line, |(_, v)| v).trim().to_string())
}

/// The throwaway servers and a SQL connection to the `bench` database.
struct Env {
    pg: ThrowawayPostgres,
    redis: ThrowawayRedis,
    db: Client,
    cache: redis::aio::MultiplexedConnection,
    dir: PathBuf,
}

impl Env {
    async fn start() -> anyhow::Result<Env> {
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

    /// config.toml for walbust over `slot` and `publication`, written next to the rules.
    fn config_text(&self, slot: &str, create_slot: bool, metrics: Option<u16>) -> String {
        let listen = metrics.map_or("off".to_string(), |p| format!("127.0.0.1:{p}"));
        format!(
            "rules = [\"rules.toml\"]\n[source]\nurl = \"{}\"\nslot = \"{slot}\"\npublication = \"bench\"\n\
             create_slot = {create_slot}\nheartbeat_interval = \"off\"\n[redis]\nurl = \"{}\"\n[metrics]\nlisten = \"{listen}\"\n",
            self.pg.url("bench"),
            self.redis.url()
        )
    }

    async fn current_lsn(&self) -> anyhow::Result<Lsn> {
        let row = self.db.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?;
        parse_lsn(row.get(0))
    }

    async fn confirmed(&self, slot: &str) -> anyhow::Result<Option<Lsn>> {
        let rows = self
            .db
            .query("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await?;
        match rows.first().and_then(|r| r.get::<_, Option<&str>>(0)) {
            Some(text) => Ok(Some(parse_lsn(text)?)),
            None => Ok(None),
        }
    }

    /// Drops `slot` if it exists, first waiting (bounded) for a consumer that just stopped to let go of it.
    async fn drop_slot(&self, slot: &str) -> anyhow::Result<()> {
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
    async fn wait_active(&self, slot: &str, child: &mut tokio::process::Child) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let rows = self.db.query("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await?;
            if rows.first().is_some_and(|r| r.get::<_, bool>(0)) {
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the consumer of slot {slot} exited with {status} before streaming; see {}",
                    self.dir.join("walbust.log").display()
                );
            }
            ensure!(Instant::now() < deadline, "nothing started streaming from slot {slot} within 60s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sets `keys` in Redis, so that their deletion is real work (and observable).
    async fn seed(&self, keys: impl Iterator<Item = String>) -> anyhow::Result<usize> {
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

    async fn dbsize(&self) -> anyhow::Result<u64> {
        let mut conn = self.cache.clone();
        Ok(redis::cmd("DBSIZE").query_async(&mut conn).await?)
    }

    async fn flushdb(&self) -> anyhow::Result<()> {
        let mut conn = self.cache.clone();
        redis::cmd("FLUSHDB").exec_async(&mut conn).await?;
        Ok(())
    }

    /// Starts the release binary on `slot`; its output goes to walbust.log in the bench directory.
    fn spawn_walbust(
        &self,
        bin: &Path,
        slot: &str,
        create_slot: bool,
        metrics: Option<u16>,
    ) -> anyhow::Result<tokio::process::Child> {
        let config = self.dir.join(format!("{slot}.toml"));
        std::fs::write(&config, self.config_text(slot, create_slot, metrics))?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("walbust.log"))?;
        let child = tokio::process::Command::new(bin)
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

    fn pg_tool(&self, name: &str) -> anyhow::Result<PathBuf> {
        Ok(postgres_bin_dir()?.join(name))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

fn parse_lsn(text: &str) -> anyhow::Result<Lsn> {
    text.parse().map_err(|_| anyhow::anyhow!("not an LSN: {text}"))
}

/// Stops a child walbust with SIGTERM (it finishes its batch and exits) and waits, bounded.
async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) on our own child's pid with a valid signal.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(20), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Waits until the 1-minute load average is below the threshold (bounded), and returns it.
async fn settle(cli: &Cli) -> Load {
    let deadline = Instant::now() + Duration::from_secs(cli.load_wait_secs);
    loop {
        let load = loadavg();
        if load < cli.load_below {
            return Load { value: load, settled: true };
        }
        if Instant::now() >= deadline {
            return Load { value: load, settled: false };
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

#[derive(Debug, Clone, Copy)]
struct Load {
    value: f64,
    settled: bool,
}

/// The machine's CPU time so far, in clock ticks from `/proc/stat`: all of it, and the part
/// the hypervisor gave to other guests (steal).
#[derive(Debug, Clone, Copy)]
struct CpuClock {
    total: u64,
    steal: u64,
}

impl CpuClock {
    fn now() -> Option<CpuClock> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> =
            stat.lines().next()?.strip_prefix("cpu ")?.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal (guest time is already in user).
        Some(CpuClock { total: fields.iter().take(8).sum(), steal: *fields.get(7)? })
    }

    /// Percent of the machine's CPU time stolen since `self`; NaN when unknown.
    fn steal_percent_since(self) -> f64 {
        match CpuClock::now() {
            Some(now) if now.total > self.total => {
                100.0 * (now.steal - self.steal) as f64 / (now.total - self.total) as f64
            }
            _ => f64::NAN,
        }
    }
}

/// Steal time of each run: `0.0% 3.9% 0.2%`.
fn steals(values: &[f64]) -> String {
    values.iter().map(|v| format!("{v:.1}%")).collect::<Vec<_>>().join(" ")
}

/// Load averages at the start of each run: `0.41 0.52 0.60`, with `!` after one that never settled.
fn loads(loads: &[Load]) -> String {
    loads.iter().map(|l| format!("{:.2}{}", l.value, if l.settled { "" } else { "!" })).collect::<Vec<_>>().join(" ")
}

/// `median (min-max)` of the values, formatted with `fmt`.
fn spread(values: &[f64], fmt: impl Fn(f64) -> String) -> String {
    if values.is_empty() {
        return "n/a".into();
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.len() == 1 {
        return fmt(v[0]);
    }
    format!("{} ({}-{})", fmt(median(&v)), fmt(v[0]), fmt(v[v.len() - 1]))
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

// ---------------------------------------------------------------------------------------
// drain

#[derive(Debug, Clone, Copy)]
struct Variant {
    name: &'static str,
    per_txn: i32,
    mixed: bool,
}

const VARIANTS: [Variant; 4] = [
    Variant { name: "1 row/txn, inserts", per_txn: 1, mixed: false },
    Variant { name: "10 rows/txn, inserts", per_txn: 10, mixed: false },
    Variant { name: "100 rows/txn, inserts", per_txn: 100, mixed: false },
    Variant { name: "10 rows/txn, mixed ins/upd/del", per_txn: 10, mixed: true },
];

async fn drain(cli: &Cli, env: &Env) -> anyhow::Result<()> {
    let w = cli.changes;
    println!("## drain: {w} pre-written changes, pg_recvlogical vs walbust (two keys per change, real Redis)\n");
    println!(
        "| variant | pg_recvlogical changes/s | walbust changes/s | ratio walbust/recvlogical | target >= 0.9 | load avg at runs |"
    );
    println!("|---|---|---|---|---|---|");
    env.db.batch_execute("DROP PUBLICATION IF EXISTS bench; CREATE PUBLICATION bench FOR TABLE bench_items").await?;
    for (_, variant) in VARIANTS.iter().enumerate().filter(|(i, _)| cli.variants.contains(&(i + 1))) {
        let mut recv_rates = Vec::new();
        let mut walbust_rates = Vec::new();
        let mut ratios = Vec::new();
        let mut load = Vec::new();
        for run in 0..cli.runs {
            // Prepare: a clean table (and rows to update and delete), then both slots at one LSN.
            env.db.batch_execute("TRUNCATE bench_items").await?;
            env.flushdb().await?;
            let first = 1_i64;
            if variant.mixed {
                env.db
                    .execute(
                        "INSERT INTO bench_items (org_id, id, name, payload) \
                         SELECT g % 10000, g, 'item ' || g, repeat('p', 80) FROM generate_series($1::bigint, $2::bigint) g",
                        &[&first, &(first + w - 1)],
                    )
                    .await?;
            }
            env.db.batch_execute("CHECKPOINT").await?;
            for slot in ["bench_recv", "bench_walbust"] {
                env.drop_slot(slot).await?;
                env.db.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await?;
            }
            let call = "CALL bench_write($1, $2, $3, $4)";
            env.db.execute(call, &[&first, &w, &variant.per_txn, &variant.mixed]).await?;
            let target = env.current_lsn().await?;
            // Seed every key the changes invalidate, so that the deletes are real.
            let ids: Vec<i64> =
                (first..first + w).map(|g| if variant.mixed && g % 3 == 0 { g + w } else { g }).collect();
            let seeded = env
                .seed(
                    ids.iter().map(|id| format!("item:{id}")).chain((0..ORGS.min(w)).map(|o| format!("org:{o}:items"))),
                )
                .await?;
            // Alternate which consumer goes first, so that neither always gets a warmer cache.
            let mut recv = Duration::ZERO;
            let mut wal = Duration::ZERO;
            for step in 0..2 {
                let l = settle(cli).await;
                if step == 0 {
                    load.push(l);
                }
                if (step + run) % 2 == 0 {
                    recv = recvlogical(env, "bench_recv", target).await?;
                } else {
                    wal = walbust_in_process(env, "bench_walbust", target).await?;
                }
            }
            let left = env.dbsize().await?;
            ensure!(left == 0, "{left} of {seeded} seeded keys were not invalidated ({})", variant.name);
            let (r, b) = (w as f64 / recv.as_secs_f64(), w as f64 / wal.as_secs_f64());
            eprintln!(
                "  drain {} run {}: recvlogical {:.3}s ({:.0}/s), walbust {:.3}s ({:.0}/s), ratio {:.2}",
                variant.name,
                run + 1,
                recv.as_secs_f64(),
                r,
                wal.as_secs_f64(),
                b,
                b / r
            );
            recv_rates.push(r);
            walbust_rates.push(b);
            ratios.push(b / r);
            for slot in ["bench_recv", "bench_walbust"] {
                env.drop_slot(slot).await?;
            }
        }
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            variant.name,
            spread(&recv_rates, thousands),
            spread(&walbust_rates, thousands),
            spread(&ratios, |v| format!("{v:.2}")),
            verdict(median(&ratios) >= 0.9),
            loads(&load)
        );
    }
    println!(
        "\nTimes run from starting the consumer to pg_recvlogical exiting at --endpos, and to walbust's flushed LSN \
         (`Stats::flushed_lsn`, sent to the server) reaching the same position. Every seeded key was checked deleted.\n"
    );
    Ok(())
}

/// `pg_recvlogical --start ... --endpos` into /dev/null; returns the time until it exits.
async fn recvlogical(env: &Env, slot: &str, target: Lsn) -> anyhow::Result<Duration> {
    let bin = env.pg_tool("pg_recvlogical")?;
    let start = Instant::now();
    let mut child = tokio::process::Command::new(&bin)
        .args(["-h", "127.0.0.1", "-p", &env.pg.port().to_string(), "-U", "postgres", "-d", "bench"])
        .args(["--slot", slot, "--start", "--no-loop", "-o", "proto_version=1", "-o", "publication_names=bench"])
        .arg(format!("--endpos={target}"))
        .args(["-f", "/dev/null"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let status = tokio::time::timeout(Duration::from_secs(600), child.wait())
        .await
        .context("pg_recvlogical did not reach --endpos within 600s")??;
    let elapsed = start.elapsed();
    ensure!(status.success(), "pg_recvlogical exited with {status}");
    Ok(elapsed)
}

/// Runs the pipeline in this process until its flushed LSN reaches `target`, on a thread of
/// its own with a single-threaded runtime, as the `walbust` binary runs it.
async fn walbust_in_process(env: &Env, slot: &str, target: Lsn) -> anyhow::Result<Duration> {
    let config = Config::parse(&env.dir.join("config.toml"), &env.config_text(slot, false, None), &|_| None)?;
    let rules = RuleSet::from_sources(&[(PathBuf::from("rules.toml"), RULES.to_string())])
        .map_err(|d| anyhow::anyhow!("{d}"))?
        .rules;
    let sink = RedisSink::new(&config.redis.url, None)?;
    let stats = Arc::new(Stats::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let start = Instant::now();
    let handle = std::thread::spawn({
        let stats = stats.clone();
        move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async move {
                let stop = async {
                    let _ = stop_rx.await;
                };
                let options = Options { stats, ..Default::default() };
                pipeline::run(&config, Arc::new(rules), sink, stop, options)
                    .await
                    .map_err(|e| anyhow::anyhow!(pipeline::error_chain(&e)))
            })
        }
    });
    let join = |handle: std::thread::JoinHandle<anyhow::Result<()>>| {
        handle.join().map_err(|_| anyhow::anyhow!("the pipeline thread panicked"))?
    };
    let deadline = start + Duration::from_secs(600);
    while Stats::get(&stats.flushed_lsn) < target.0 {
        if handle.is_finished() {
            bail!("the pipeline stopped early: {:?}", join(handle));
        }
        ensure!(Instant::now() < deadline, "walbust did not reach {target} within 600s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    let _ = stop_tx.send(());
    tokio::task::spawn_blocking(move || join(handle)).await??;
    Ok(elapsed)
}

// ---------------------------------------------------------------------------------------
// latency

async fn latency(cli: &Cli, env: &Env, bin: &Path) -> anyhow::Result<()> {
    println!(
        "## latency: single-row commits, commit returned to the writer -> key deleted in Redis (keyspace notification)\n"
    );
    println!(
        "| commits/s | achieved/s | p50 | p99 | max | target p99 | p99 from INSERT sent (upper bound) | missing | commits past the target: arrived / acknowledged | load avg at runs | steal during runs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    env.db.batch_execute("DROP PUBLICATION IF EXISTS bench; CREATE PUBLICATION bench FOR TABLE bench_items").await?;
    env.db.batch_execute("TRUNCATE bench_items").await?;
    env.drop_slot("bench_latency").await?;
    env.flushdb().await?;
    let metrics_port = free_port()?;
    let mut child = env.spawn_walbust(bin, "bench_latency", true, Some(metrics_port))?;
    env.wait_active("bench_latency", &mut child).await?;
    let mut conn = env.cache.clone();
    redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg("KEA").exec_async(&mut conn).await?;
    let mut next_id = 1_i64;
    let mut outcome = Ok(());
    for &rate in &cli.rates {
        let (mut p50, mut p99, mut max, mut achieved, mut missing, mut load) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0usize, Vec::new());
        let (mut p99_sent, mut steal, mut late) = (Vec::new(), Vec::new(), Vec::new());
        let target = if rate <= 500 { 1.0 } else { 2.0 };
        let bound = format!("{}", target / 1e3);
        for run in 0..cli.runs {
            let count = i64::from(rate) * cli.latency_secs as i64;
            let first = next_id;
            next_id += count;
            env.seed((first..first + count).map(|id| format!("item:{id}"))).await?;
            load.push(settle(cli).await);
            let clock = CpuClock::now();
            let before = scrape(metrics_port).await.unwrap_or_default();
            let r = match latency_run(env, rate, first, count).await {
                Ok(r) => r,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
            let stolen = clock.map_or(f64::NAN, CpuClock::steal_percent_since);
            steal.push(stolen);
            // walbust's own histograms: how many commits arrived later than the target after
            // committing (the server sent them late) and how many were acknowledged later.
            let after = scrape(metrics_port).await.unwrap_or_default();
            let past = |histogram: &str| {
                let count = |page: &str| later_than(page, histogram, &bound);
                match (count(&before), count(&after)) {
                    (Some(b), Some(a)) => format!("{:.0}", a - b),
                    _ => "?".to_string(),
                }
            };
            let (arrived, acknowledged) = (past("walbust_receive_lag_seconds"), past("walbust_ack_lag_seconds"));
            late.push(format!("{arrived} / {acknowledged}"));
            eprintln!(
                "  latency {rate}/s run {}: achieved {:.0}/s, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, p99 from sent {:.3} ms, {} missing, {} early, past {target} ms: {arrived} arrived, {acknowledged} acknowledged, steal {stolen:.1}%",
                run + 1,
                r.achieved,
                r.p50,
                r.p99,
                r.max,
                r.p99_from_sent,
                r.missing,
                r.early
            );
            p50.push(r.p50);
            p99.push(r.p99);
            p99_sent.push(r.p99_from_sent);
            max.push(r.max);
            achieved.push(r.achieved);
            missing += r.missing;
        }
        if outcome.is_err() {
            break;
        }
        let ms = |v: f64| format!("{v:.2} ms");
        println!(
            "| {rate} | {} | {} | {} | {} | <= {target} ms: {} | {} | {missing} | {} | {} | {} |",
            spread(&achieved, thousands),
            spread(&p50, ms),
            spread(&p99, ms),
            spread(&max, ms),
            verdict(median(&p99) <= target && missing == 0),
            spread(&p99_sent, ms),
            late.join(", "),
            loads(&load),
            steals(&steal)
        );
    }
    stop_child(&mut child).await;
    env.drop_slot("bench_latency").await?;
    outcome?;
    println!(
        "\nwalbust ran as the release binary (child process). The writer takes each commit's time when its \
         autocommit INSERT returns; the subscriber takes the time a `__keyevent@0__:unlink` notification for \
         `item:{{id}}` arrives; both in this process, on one monotonic clock. A notification that arrives before \
         the writer has seen its commit return counts as 0 (\"early\" in the run log); the upper-bound column \
         measures from just before the INSERT was sent, so it includes the commit and its round trip.\n"
    );
    Ok(())
}

struct LatencyRun {
    achieved: f64,
    p50: f64,
    p99: f64,
    max: f64,
    /// p99 measured from when the INSERT was sent: an upper bound that includes the commit itself.
    p99_from_sent: f64,
    missing: usize,
    early: usize,
}

async fn latency_run(env: &Env, rate: u32, first: i64, count: i64) -> anyhow::Result<LatencyRun> {
    // Subscriber: the time each item key is deleted.
    let mut pubsub = redis::Client::open(env.redis.url())?.get_async_pubsub().await?;
    pubsub.subscribe("__keyevent@0__:unlink").await?;
    pubsub.subscribe("__keyevent@0__:del").await?;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let subscriber = tokio::spawn(async move {
        let mut seen: HashMap<i64, Instant> = HashMap::with_capacity(count as usize);
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                m = messages.next() => {
                    let Some(m) = m else { break };
                    let at = Instant::now();
                    if let Ok(key) = m.get_payload::<String>()
                        && let Some(id) = key.strip_prefix("item:").and_then(|i| i.parse::<i64>().ok())
                    {
                        seen.entry(id).or_insert(at);
                        if seen.len() as i64 >= count {
                            break;
                        }
                    }
                }
                _ = &mut stop_rx => break,
            }
        }
        seen
    });
    // Writers: one connection per 1,000 commits/s, each paced on its own schedule.
    let connections = rate.div_ceil(1000).max(1) as i64;
    let period = Duration::from_secs_f64(connections as f64 / f64::from(rate));
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut writers = Vec::new();
    for c in 0..connections {
        let client = connect(&env.pg.url("bench")).await?;
        writers.push(tokio::spawn(async move {
            let stmt =
                client.prepare("INSERT INTO bench_items (org_id, id, name, payload) VALUES ($1, $2, $3, $4)").await?;
            let mut committed = Vec::new();
            let mut k = 0i64;
            loop {
                let id = first + c + k * connections;
                if id >= first + count {
                    break;
                }
                tokio::time::sleep_until(start + period * k as u32).await;
                let org = (id % ORGS) as i32;
                let sent = Instant::now();
                client.execute(&stmt, &[&org, &id, &"item", &"payload"]).await?;
                committed.push((id, (sent, Instant::now())));
                k += 1;
            }
            Ok::<_, anyhow::Error>(committed)
        }));
    }
    let began = Instant::now();
    let mut committed: HashMap<i64, (Instant, Instant)> = HashMap::with_capacity(count as usize);
    for w in writers {
        committed.extend(w.await??);
    }
    let achieved = count as f64 / began.elapsed().as_secs_f64();
    // Let the last invalidations arrive (bounded), then stop the subscriber.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !subscriber.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(());
    let seen = subscriber.await?;
    let mut lat = Vec::with_capacity(committed.len());
    let mut from_sent = Vec::with_capacity(committed.len());
    let (mut missing, mut early) = (0, 0);
    for (id, (sent, at)) in &committed {
        match seen.get(id) {
            Some(deleted) => {
                if deleted < at {
                    early += 1;
                }
                lat.push(deleted.saturating_duration_since(*at).as_secs_f64() * 1e3);
                from_sent.push(deleted.saturating_duration_since(*sent).as_secs_f64() * 1e3);
            }
            None => missing += 1,
        }
    }
    lat.sort_by(f64::total_cmp);
    from_sent.sort_by(f64::total_cmp);
    let p99_from_sent =
        from_sent.get(((from_sent.len() as f64 - 1.0) * 0.99).round() as usize).copied().unwrap_or(f64::NAN);
    let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    Ok(LatencyRun {
        achieved,
        p50: pct(0.50),
        p99: pct(0.99),
        max: lat.last().copied().unwrap_or(f64::NAN),
        p99_from_sent,
        missing,
        early,
    })
}

// ---------------------------------------------------------------------------------------
// cost

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let (user, sys) = cpu_user_sys(pid)?;
    Ok(user + sys)
}

/// utime and stime of a process, in seconds.
fn cpu_user_sys(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3, utime field 14, stime field 15.
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((utime / ticks, stime / ticks))
}

/// Context switches of every thread of a process (voluntary and not): each time it went to
/// sleep waiting for work or was preempted. A figure of wake-ups that, unlike CPU time,
/// does not depend on how fast the machine is.
fn context_switches(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<u64>()?;
            }
        }
    }
    Ok(total)
}

/// A `Vm*` figure of /proc/PID/status, in MiB.
fn vm_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
    let kb: f64 = line.split_whitespace().nth(1).context("malformed status line")?.parse()?;
    Ok(kb / 1024.0)
}

/// Polls the slot until its confirmed flush LSN reaches `target`.
async fn wait_confirmed(env: &Env, slot: &str, target: Lsn, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if env.confirmed(slot).await?.is_some_and(|l| l >= target) {
            return Ok(start.elapsed());
        }
        ensure!(start.elapsed() < limit, "slot {slot} did not confirm {target} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn cost(cli: &Cli, env: &Env, bin: &Path) -> anyhow::Result<()> {
    let n = cli.cost_changes;
    println!("## cost: walbust CPU per change and memory (release binary, 10 rows/txn inserts, {n} changes per run)\n");
    env.db.batch_execute("DROP PUBLICATION IF EXISTS bench; CREATE PUBLICATION bench FOR TABLE bench_items").await?;
    env.db.batch_execute("TRUNCATE bench_items").await?;
    env.drop_slot("bench_cost").await?;
    env.flushdb().await?;
    let mut child = env.spawn_walbust(bin, "bench_cost", true, None)?;
    let pid = child.id().context("walbust has no pid")?;
    env.wait_active("bench_cost", &mut child).await?;
    let rss_idle = vm_mib(pid, "VmRSS")?;
    let (mut per_change, mut load, mut rates, mut wakeups) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (drain_us, drain_hwm, startup) = cost_drain(cli, env, bin, &mut load).await?;
    let mut next = 1_i64;
    for run in 0..cli.runs {
        env.db.batch_execute("TRUNCATE bench_items").await?;
        load.push(settle(cli).await);
        let (user0, sys0) = cpu_user_sys(pid)?;
        let switches0 = context_switches(pid)?;
        let before = user0 + sys0;
        let start = Instant::now();
        let per_txn = 10_i32;
        env.db.execute("CALL bench_write($1, $2, $3, false)", &[&next, &n, &per_txn]).await?;
        next += n;
        let target = env.current_lsn().await?;
        wait_confirmed(env, "bench_cost", target, Duration::from_secs(600)).await?;
        let elapsed = start.elapsed();
        let (user1, sys1) = cpu_user_sys(pid)?;
        let switches = (context_switches(pid)? - switches0) as f64 * 1000.0 / n as f64;
        let cpu = user1 + sys1 - before;
        let us = cpu * 1e6 / n as f64;
        eprintln!(
            "  cost run {} (while writing): {cpu:.2}s CPU ({:.2}s user, {:.2}s sys) for {n} changes in {:.2}s = {us:.2} us/change, {switches:.1} context switches per 1,000 changes",
            run + 1,
            user1 - user0,
            sys1 - sys0,
            elapsed.as_secs_f64()
        );
        per_change.push(us);
        wakeups.push(switches);
        rates.push(n as f64 / elapsed.as_secs_f64());
    }
    let hwm = vm_mib(pid, "VmHWM")?;
    let rss = vm_mib(pid, "VmRSS")?;
    let us = |v: f64| format!("{v:.2} us");
    let mib = |v: f64| format!("{v:.1} MiB");
    println!("| figure | value | target | verdict |\n|---|---|---|---|");
    println!(
        "| walbust CPU per change, drain of pre-written WAL (user+sys, {:.0} ms start-up subtracted) | {} | <= 5 us | {} |",
        startup * 1e3,
        spread(&drain_us, us),
        verdict(median(&drain_us) <= 5.0)
    );
    println!(
        "| walbust peak RSS during a drain (VmHWM) | {} | <= 32 MiB | {} |",
        mib(drain_hwm),
        verdict(drain_hwm <= 32.0)
    );
    println!(
        "| walbust CPU per change, steady state while the writer runs | {} | <= 5 us | {} |",
        spread(&per_change, us),
        verdict(median(&per_change) <= 5.0)
    );
    println!(
        "| walbust context switches per 1,000 changes, steady state (its wake-ups) | {} | - | - |",
        spread(&wakeups, |v| format!("{v:.1}"))
    );
    println!("| end-to-end rate while writing (writer + walbust) | {} changes/s | - | - |", spread(&rates, thousands));
    println!("| RSS idle after start | {} | - | - |", mib(rss_idle));
    println!(
        "| RSS after the runs / peak (VmHWM) | {} / {} | <= 32 MiB | {} |",
        mib(rss),
        mib(hwm),
        verdict(hwm <= 32.0)
    );
    println!("| load avg at runs | {} | | |", loads(&load));
    stop_child(&mut child).await;
    env.drop_slot("bench_cost").await?;
    if cli.pgbench_secs == 0 {
        println!("\npgbench skipped (--pgbench-secs 0).\n");
        return Ok(());
    }
    pgbench(cli, env, bin).await
}

/// CPU per change of walbust draining WAL written before it started, with the CPU of
/// starting up (measured on an idle slot) subtracted. Returns the figures per run, the
/// peak RSS and the start-up CPU in seconds.
async fn cost_drain(cli: &Cli, env: &Env, bin: &Path, load: &mut Vec<Load>) -> anyhow::Result<(Vec<f64>, f64, f64)> {
    let n = cli.cost_changes;
    let per_txn = 10_i32;
    let first = 1_i64;
    let create = "SELECT pg_create_logical_replication_slot($1, 'pgoutput')";
    env.drop_slot("bench_cost_idle").await?;
    env.db.execute(create, &[&"bench_cost_idle"]).await?;
    let mut idle = env.spawn_walbust(bin, "bench_cost_idle", false, None)?;
    env.wait_active("bench_cost_idle", &mut idle).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let startup = cpu_seconds(idle.id().context("walbust has no pid")?)?;
    stop_child(&mut idle).await;
    env.drop_slot("bench_cost_idle").await?;
    let (mut per_change, mut hwm) = (Vec::new(), 0.0_f64);
    for run in 0..cli.runs {
        env.db.batch_execute("TRUNCATE bench_items").await?;
        env.drop_slot("bench_cost_drain").await?;
        env.db.execute(create, &[&"bench_cost_drain"]).await?;
        env.db.execute("CALL bench_write($1, $2, $3, false)", &[&first, &n, &per_txn]).await?;
        let target = env.current_lsn().await?;
        load.push(settle(cli).await);
        let mut child = env.spawn_walbust(bin, "bench_cost_drain", false, None)?;
        let pid = child.id().context("walbust has no pid")?;
        let took = wait_confirmed(env, "bench_cost_drain", target, Duration::from_secs(600)).await?;
        let (user, sys) = cpu_user_sys(pid)?;
        let cpu = user + sys - startup;
        hwm = hwm.max(vm_mib(pid, "VmHWM")?);
        stop_child(&mut child).await;
        env.drop_slot("bench_cost_drain").await?;
        let us = cpu * 1e6 / n as f64;
        eprintln!(
            "  cost drain run {}: {cpu:.2}s CPU ({user:.2}s user, {sys:.2}s sys; start-up {startup:.2}s subtracted) for {n} changes in {:.2}s = {us:.2} us/change",
            run + 1,
            took.as_secs_f64()
        );
        per_change.push(us);
    }
    env.db.batch_execute("TRUNCATE bench_items").await?;
    Ok((per_change, hwm, startup))
}

async fn pgbench(cli: &Cli, env: &Env, bin: &Path) -> anyhow::Result<()> {
    let pgbench = env.pg_tool("pgbench")?;
    let port = env.pg.port().to_string();
    let conn_args = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
    let out = tokio::process::Command::new(&pgbench)
        .args(conn_args)
        .args(["-i", "-q", "-s", &cli.pgbench_scale.to_string(), "bench"])
        .output()
        .await?;
    ensure!(out.status.success(), "pgbench -i failed: {}", String::from_utf8_lossy(&out.stderr));
    env.db
        .batch_execute(
            "DROP PUBLICATION IF EXISTS bench; \
             CREATE PUBLICATION bench FOR TABLE pgbench_accounts, pgbench_tellers, pgbench_branches",
        )
        .await?;
    // One statement each: VACUUM cannot run in the implicit transaction of a multi-statement query.
    env.db.batch_execute("VACUUM ANALYZE").await?;
    env.db.batch_execute("CHECKPOINT").await?;
    let script = env.dir.join("write-only.sql");
    std::fs::write(&script, PGBENCH_SCRIPT)?;
    let (mut load, mut cpu_per_change, mut recv_cpu_per_change, mut steal) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut tps: HashMap<Consumer, Vec<f64>> = HashMap::new();
    let mut hwm = 0.0_f64;
    for run in 0..cli.runs {
        for consumer in [Consumer::Nothing, Consumer::Recvlogical, Consumer::Walbust] {
            let slot = "bench_pgbench";
            env.drop_slot(slot).await?;
            let mut child = match consumer {
                Consumer::Nothing => None,
                Consumer::Recvlogical => {
                    env.db.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await?;
                    let bin = env.pg_tool("pg_recvlogical")?;
                    let c = tokio::process::Command::new(&bin)
                        .args(conn_args)
                        .args(["-d", "bench", "--slot", slot, "--start", "--no-loop", "-o", "proto_version=1"])
                        .args(["-o", "publication_names=bench", "-f", "/dev/null"])
                        .stdin(Stdio::null())
                        .kill_on_drop(true)
                        .spawn()
                        .with_context(|| format!("starting {}", bin.display()))?;
                    Some(c)
                }
                Consumer::Walbust => Some(env.spawn_walbust(bin, slot, true, None)?),
            };
            if let Some(c) = child.as_mut() {
                env.wait_active(slot, c).await?;
            }
            load.push(settle(cli).await);
            let cpu_before = match &child {
                Some(c) => cpu_seconds(c.id().context("no pid")?)?,
                None => 0.0,
            };
            let clock = CpuClock::now();
            let out = tokio::process::Command::new(&pgbench)
                .args(conn_args)
                .args(["-n", "-M", "prepared", "-j", "2", "-c", &cli.pgbench_clients.to_string()])
                .args(["-T", &cli.pgbench_secs.to_string(), "-f"])
                .arg(&script)
                .arg("bench")
                .output()
                .await?;
            ensure!(out.status.success(), "pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
            let stolen = clock.map_or(f64::NAN, CpuClock::steal_percent_since);
            steal.push(stolen);
            let text = String::from_utf8_lossy(&out.stdout);
            let rate: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()?.parse().ok()))
                .with_context(|| format!("no tps in pgbench output:\n{text}"))?;
            let txns: f64 = text
                .lines()
                .find_map(|l| {
                    l.strip_prefix("number of transactions actually processed: ")
                        .and_then(|r| r.split('/').next()?.trim().parse().ok())
                })
                .unwrap_or(f64::NAN);
            // Three row changes per pgbench transaction are published (history is not).
            let changes = txns * 3.0;
            let mut note = format!(", steal {stolen:.1}%");
            if let (Some(c), Consumer::Walbust) = (child.as_mut(), consumer) {
                let target = env.current_lsn().await?;
                let caught_up = wait_confirmed(env, slot, target, Duration::from_secs(300)).await?;
                let pid = c.id().context("no pid")?;
                let cpu = cpu_seconds(pid)? - cpu_before;
                hwm = hwm.max(vm_mib(pid, "VmHWM")?);
                cpu_per_change.push(cpu * 1e6 / changes);
                note += &format!("; walbust caught up {:.0} ms after pgbench ended", caught_up.as_secs_f64() * 1e3);
            }
            if let (Some(c), Consumer::Recvlogical) = (child.as_ref(), consumer) {
                // pg_recvlogical confirms only every 10 s, so wait for the server to have sent it
                // everything, then give it a moment to read that before taking its CPU time.
                let target = env.current_lsn().await?;
                wait_sent(env, slot, target, Duration::from_secs(60)).await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                let cpu = cpu_seconds(c.id().context("no pid")?)? - cpu_before;
                recv_cpu_per_change.push(cpu * 1e6 / changes);
            }
            if let Some(mut c) = child {
                stop_child(&mut c).await;
            }
            env.drop_slot(slot).await?;
            eprintln!("  pgbench run {} {}: {rate:.0} tps{note}", run + 1, consumer.label());
            tps.entry(consumer).or_default().push(rate);
        }
    }
    let of = |c: Consumer| tps.get(&c).cloned().unwrap_or_default();
    let base = median(&of(Consumer::Nothing));
    println!(
        "| pgbench write-only tps, no slot ({} clients, {} s, scale {}) | {} | | |",
        cli.pgbench_clients,
        cli.pgbench_secs,
        cli.pgbench_scale,
        spread(&of(Consumer::Nothing), thousands)
    );
    let recv_loss = 1.0 - median(&of(Consumer::Recvlogical)) / base;
    println!(
        "| pgbench tps with pg_recvlogical draining a slot (the walsender's own cost) | {} ({:.1}% less) | | |",
        spread(&of(Consumer::Recvlogical), thousands),
        recv_loss * 100.0
    );
    let loss = 1.0 - median(&of(Consumer::Walbust)) / base;
    println!(
        "| pgbench tps with walbust (slot + walsender + walbust + Redis) | {} ({:.1}% less) | within 15% of no slot | {} |",
        spread(&of(Consumer::Walbust), thousands),
        loss * 100.0,
        verdict(loss <= 0.15)
    );
    let own = 1.0 - median(&of(Consumer::Walbust)) / median(&of(Consumer::Recvlogical));
    println!("| of which walbust's own share (walbust vs pg_recvlogical) | {:.1}% | | |", own * 100.0);
    let us = |v: f64| format!("{v:.2} us");
    println!("| walbust CPU per change under pgbench | {} | | |", spread(&cpu_per_change, us));
    println!(
        "| pg_recvlogical CPU per change under pgbench, for comparison | {} | | |",
        spread(&recv_cpu_per_change, us)
    );
    println!("| walbust peak RSS under pgbench | {hwm:.1} MiB | <= 32 MiB | {} |", verdict(hwm <= 32.0));
    println!("| load avg at runs (no slot, recvlogical, walbust, ...) | {} | | |", loads(&load));
    println!("| host steal time during runs (same order) | {} | | |", steals(&steal));
    println!(
        "\nCPU is utime+stime from /proc/PID/stat of the walbust process, read before and after; RSS is VmRSS and \
         VmHWM from /proc/PID/status. All consumers share the 2 cores with Postgres and pgbench. \"No slot\" has no \
         logical decoding at all; \"pg_recvlogical\" adds a slot, its walsender decoding every change, and a consumer \
         that only discards; \"walbust\" replaces that consumer with walbust applying to Redis.\n"
    );
    Ok(())
}

/// Waits (bounded) until the walsender serving `slot` has sent WAL up to `target`.
async fn wait_sent(env: &Env, slot: &str, target: Lsn, limit: Duration) -> anyhow::Result<()> {
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

/// What consumes the slot while pgbench runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Consumer {
    Nothing,
    Recvlogical,
    Walbust,
}

impl Consumer {
    fn label(self) -> &'static str {
        match self {
            Consumer::Nothing => "without a slot",
            Consumer::Recvlogical => "with pg_recvlogical",
            Consumer::Walbust => "with walbust",
        }
    }
}

// ---------------------------------------------------------------------------------------
// large transaction

async fn large_txn(cli: &Cli, env: &Env, bin: &Path) -> anyhow::Result<()> {
    let rows = cli.large_rows;
    println!("## large transaction: one UPDATE of {rows} rows (two keys per row)\n");
    env.db.batch_execute("DROP PUBLICATION IF EXISTS bench; CREATE PUBLICATION bench FOR TABLE bench_large").await?;
    let mut report = String::new();
    let (mut peaks, mut times, mut load) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..cli.large_runs {
        env.db.batch_execute("TRUNCATE bench_large").await?;
        env.flushdb().await?;
        env.db
            .execute("INSERT INTO bench_large SELECT g % 10000, g, 0 FROM generate_series(1, $1::bigint) g", &[&rows])
            .await?;
        env.db.batch_execute("VACUUM ANALYZE bench_large").await?;
        env.db.batch_execute("CHECKPOINT").await?;
        // Seed a sample: every 1,000th row key and every org key.
        let sample: Vec<String> = (1..=rows)
            .step_by(1000)
            .map(|id| format!("large:{id}"))
            .chain((0..ORGS.min(rows)).map(|o| format!("org:{o}:large")))
            .collect();
        let seeded = env.seed(sample.into_iter()).await?;
        env.drop_slot("bench_large").await?;
        let metrics_port = free_port()?;
        let mut child = env.spawn_walbust(bin, "bench_large", true, Some(metrics_port))?;
        let pid = child.id().context("walbust has no pid")?;
        env.wait_active("bench_large", &mut child).await?;
        let rss_before = vm_mib(pid, "VmRSS")?;
        load.push(settle(cli).await);
        // Sample RSS throughout, to show it stays flat rather than only its peak.
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let sampler = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Ok(v) = vm_mib(pid, "VmRSS") { samples.push(v) }
                    }
                    _ = &mut stop_rx => break,
                }
            }
            samples
        });
        let start = Instant::now();
        env.db.batch_execute("UPDATE bench_large SET n = n + 1").await?;
        let committed = start.elapsed();
        let target = env.current_lsn().await?;
        let limit = Duration::from_secs(600 + (rows / 5_000) as u64);
        let drained = wait_confirmed(env, "bench_large", target, limit).await?;
        let _ = stop_tx.send(());
        let samples = sampler.await?;
        let hwm = vm_mib(pid, "VmHWM")?;
        let left = env.dbsize().await?;
        let changes = scrape_changes(metrics_port).await;
        stop_child(&mut child).await;
        env.drop_slot("bench_large").await?;
        let after_commit = drained.as_secs_f64();
        let _ = writeln!(
            report,
            "| {} | {:.1} s | {:.1} s ({}/s) | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} of {seeded} left | {} |",
            run + 1,
            committed.as_secs_f64(),
            after_commit,
            thousands(rows as f64 / after_commit),
            rss_before,
            samples.iter().copied().fold(0.0, f64::max),
            hwm,
            left,
            changes.map_or("n/a".to_string(), |c| c.to_string())
        );
        ensure!(left == 0, "{left} of {seeded} sampled keys survived the large transaction");
        if let Some(c) = changes {
            ensure!(c >= rows as u64, "walbust routed {c} changes, expected {rows}");
        }
        peaks.push(hwm);
        times.push(after_commit);
    }
    println!(
        "| run | UPDATE took | walbust done after commit | RSS before | RSS max sampled | VmHWM | sampled keys | walbust_changes_total |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    print!("{report}");
    println!(
        "\npeak RSS {} against the 32 MiB bound: {}; load avg at runs: {}. Every 1,000th row key and every org key \
         were seeded and checked deleted; walbust's own change counter (from /metrics) is compared with the row count.\n",
        spread(&peaks, |v| format!("{v:.1} MiB")),
        verdict(peaks.iter().all(|&p| p <= 32.0)),
        loads(&load)
    );
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// walbust's metrics page, if it answers within 5 s.
async fn scrape(port: u16) -> Option<String> {
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
fn later_than(page: &str, histogram: &str, le: &str) -> Option<f64> {
    let value =
        |name: &str| page.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    Some(value(&format!("{histogram}_count "))? - value(&format!("{histogram}_bucket{{le=\"{le}\"}}"))?)
}

/// The sum of `walbust_changes_total` on the metrics endpoint, if it answers.
async fn scrape_changes(port: u16) -> Option<u64> {
    let body = scrape(port).await?;
    let total: f64 = body
        .lines()
        .filter(|l| l.starts_with("walbust_changes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    (total > 0.0).then_some(total as u64)
}

//! The `soak` scenario: committed writes while walbust, Redis and Postgres are killed,
//! paused and restarted on a seeded schedule, then a check that no invalidation was lost.
//!
//! Before each transaction a writer sets a marker key in Redis for every change it is about
//! to make; the rules delete exactly those keys. The transaction records its markers in
//! `soak_log`, atomically with the writes, so the markers of committed transactions are
//! known from the database itself, whatever the client saw when a fault broke its
//! connection. At the end every such marker must be gone. See bench/README.md.

use crate::env::{connect, parse_lsn};
use anyhow::{Context, bail, ensure};
use clap::ValueEnum;
use redis::AsyncCommands as _;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_postgres::Client;
use walbust::offline::throwaway::{PostgresOptions, ThrowawayPostgres, ThrowawayRedis};
use walbust::postgres::lsn::Lsn;

/// One rule per op, each deleting the marker of exactly that change. Writer and seq are
/// the primary key, so every op renders an exact key under REPLICA IDENTITY DEFAULT.
const RULES: &str = r#"
[[rule]]
name = "inserted"
table = "public.soak_events"
on = ["insert"]
keys = ["i:{writer}:{seq}"]

[[rule]]
name = "updated"
table = "public.soak_events"
on = ["update"]
keys = ["u:{writer}:{seq}"]

[[rule]]
name = "deleted"
table = "public.soak_events"
on = ["delete"]
keys = ["d:{writer}:{seq}"]
"#;

const SCHEMA: &str = r#"
CREATE TABLE soak_events (writer int NOT NULL, seq bigint NOT NULL, payload text NOT NULL, PRIMARY KEY (writer, seq));
-- The markers of each committed transaction; not published.
CREATE TABLE soak_log (writer int NOT NULL, txn bigint NOT NULL, key text NOT NULL, PRIMARY KEY (writer, txn, key));
CREATE PUBLICATION soak FOR TABLE soak_events;
"#;

const SLOT: &str = "soak";

/// A key set at the start that nothing deletes: it must still be there at the end, or
/// Redis lost data across a restart and the marker check would be blind.
const CONTROL_KEY: &str = "soak:control";

/// How long a SIGTERM'd walbust may take to exit (its own grace for the last batch is 10 s).
const SIGTERM_WAIT: Duration = Duration::from_secs(30);

/// How long to wait for walbust to stream (or a server to come back) before going on.
const READY_WAIT: Duration = Duration::from_secs(60);

/// What the soak does to the system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Fault {
    /// kill -9 walbust, then start it again.
    Kill,
    /// SIGTERM walbust (it must exit 0), then start it again.
    Sigterm,
    /// SIGTERM walbust and at once terminate its walsender (it must still exit 0).
    SigtermReconnecting,
    /// Terminate walbust's walsender with pg_terminate_backend.
    Walsender,
    /// SIGSTOP Redis for 1 to 5 seconds, then SIGCONT.
    RedisPause,
    /// Stop Redis (SHUTDOWN SAVE) and start it again on the same port.
    RedisRestart,
    /// Restart Postgres with a fast shutdown (pg_ctl restart -m fast).
    PgFast,
    /// Restart Postgres with an immediate shutdown (pg_ctl restart -m immediate): crash recovery.
    PgImmediate,
}

impl Fault {
    fn name(self) -> String {
        self.to_possible_value().map_or_else(|| format!("{self:?}"), |v| v.get_name().to_string())
    }
}

/// Options of the `soak` scenario.
#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// soak: how long the writers write, e.g. 60s or 15m.
    #[arg(long, value_parser = duration, default_value = "5m")]
    pub duration: Duration,
    /// soak: mean time between faults; each gap is drawn from half to one and a half of it.
    #[arg(long, value_parser = duration, default_value = "5s")]
    pub fault_every: Duration,
    /// soak: seed of the fault schedule and of the writers' choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// soak: concurrent writer connections.
    #[arg(long, default_value_t = 4)]
    pub writers: u32,
    /// soak: commits per second over all writers, when nothing is down (0: as fast as they go).
    #[arg(long, default_value_t = 200)]
    pub commit_rate: u32,
    /// soak: the faults to draw from (default: every kind).
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<Fault>,
    /// soak: how long walbust may take to catch up once the writers stop.
    #[arg(long, value_parser = duration, default_value = "120s")]
    pub catch_up: Duration,
}

fn duration(s: &str) -> Result<Duration, String> {
    walbust::domain::config::parse_duration(s)
        .ok_or_else(|| format!("`{s}` is not a duration; write e.g. 500ms, 60s or 15m"))
}

/// Runs the soak and prints its report; returns whether it passed.
pub async fn run(args: &SoakArgs, bin: &Path) -> anyhow::Result<bool> {
    ensure!(args.writers > 0, "--writers must be at least 1");
    ensure!(!args.fault_every.is_zero(), "--fault-every must be longer than 0");
    let faults = if args.faults.is_empty() { Fault::value_variants().to_vec() } else { args.faults.clone() };
    let mut pg = tokio::task::spawn_blocking(|| ThrowawayPostgres::start(&PostgresOptions::default())).await??;
    let mut redis = tokio::task::spawn_blocking(ThrowawayRedis::start).await??;
    connect(&pg.url("postgres")).await?.batch_execute("CREATE DATABASE soak").await?;
    let url = pg.url("soak");
    connect(&url).await?.batch_execute(SCHEMA).await?;
    let dir = std::env::temp_dir().join(format!("walbust-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("rules.toml"), RULES)?;
    let config = dir.join("walbust.toml");
    // Metrics off: a restarted walbust must not depend on its old port being free again.
    std::fs::write(
        &config,
        format!(
            "rules = [\"rules.toml\"]\n[source]\nurl = \"{url}\"\nslot = \"{SLOT}\"\npublication = \"soak\"\n\
             create_slot = true\n[redis]\nurl = \"{}\"\n[metrics]\nlisten = \"off\"\n",
            redis.url()
        ),
    )?;
    redis_conn(&redis.url()).await?.set::<_, _, ()>(CONTROL_KEY, "never invalidated").await?;
    println!(
        "## soak\n\nseed {}, writing for {:?}, a fault every {:?} on average, {} writers at {} commits/s; faults: {}.\n\
         postgres 127.0.0.1:{}, redis 127.0.0.1:{}, walbust logs in {}\n",
        args.seed,
        args.duration,
        args.fault_every,
        args.writers,
        args.commit_rate,
        faults.iter().map(|f| f.name()).collect::<Vec<_>>().join(", "),
        pg.port(),
        redis.port(),
        dir.display()
    );

    let mut walbust = Walbust::start(bin, &config, &dir)?;
    walbust.wait_streaming(&url).await.context("walbust did not start streaming")?;

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (1..=i32::try_from(args.writers)?)
        .map(|w| {
            let writer = Writer::new(w, args, &url, &redis.url());
            tokio::spawn(writer.run(stop.clone()))
        })
        .collect();

    let mut report = Report::default();
    let mut schedule = Schedule::new(args.seed, faults, args.fault_every);
    let started = Instant::now();
    let end = started + args.duration;
    let mut next = started + schedule.gap();
    while Instant::now() < end {
        tokio::time::sleep_until(next.min(end).into()).await;
        walbust.check_alive(&mut report, started.elapsed().as_secs_f64())?;
        if Instant::now() >= end {
            break;
        }
        let fault = schedule.next();
        let t = started.elapsed().as_secs_f64();
        eprintln!("soak: {t:7.1}s fault {} ({})", report.faults.values().sum::<usize>() + 1, fault.name());
        inject(fault, &mut schedule, &mut walbust, &mut pg, &mut redis, &url, &mut report, t).await?;
        *report.faults.entry(fault).or_default() += 1;
        next = Instant::now() + schedule.gap();
    }

    eprintln!("soak: stopping the writers");
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let stats = tokio::time::timeout(READY_WAIT, w).await.context("a writer did not stop within 60s")???;
        report.writers.add(&stats);
    }
    walbust.check_alive(&mut report, started.elapsed().as_secs_f64())?;
    let db = connect(&url).await?;
    let target = current_lsn(&db).await?;
    let waited = Instant::now();
    report.caught_up = loop {
        if confirmed(&db).await?.is_some_and(|l| l >= target) {
            break Some(waited.elapsed());
        }
        if waited.elapsed() > args.catch_up {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    check_markers(&db, &redis.url(), &mut report).await?;
    let exit = walbust.sigterm(None).await?;
    report.sigterm(exit, "final stop", started.elapsed().as_secs_f64(), &walbust);
    drop(walbust);

    print!("{}", report.table(&db).await?);
    let passed = report.passed();
    if passed {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("\nwalbust logs kept in {}", dir.display());
    }
    Ok(passed)
}

/// Draws faults in rounds: each round is every kind once, in a seeded order, so a short
/// run still meets every kind.
struct Schedule {
    rng: fastrand::Rng,
    kinds: Vec<Fault>,
    round: Vec<Fault>,
    every: Duration,
}

impl Schedule {
    fn new(seed: u64, kinds: Vec<Fault>, every: Duration) -> Self {
        Schedule { rng: fastrand::Rng::with_seed(seed), kinds, round: Vec::new(), every }
    }

    fn next(&mut self) -> Fault {
        if self.round.is_empty() {
            self.round = self.kinds.clone();
            self.rng.shuffle(&mut self.round);
        }
        self.round.pop().expect("a round holds every kind, and there is at least one")
    }

    fn gap(&mut self) -> Duration {
        self.every.mul_f64(0.5 + self.rng.f64())
    }
}

#[allow(clippy::too_many_arguments)]
async fn inject(
    fault: Fault,
    schedule: &mut Schedule,
    walbust: &mut Walbust,
    pg: &mut ThrowawayPostgres,
    redis: &mut ThrowawayRedis,
    url: &str,
    report: &mut Report,
    t: f64,
) -> anyhow::Result<()> {
    match fault {
        Fault::Kill => {
            walbust.child.start_kill()?;
            walbust.child.wait().await?;
            walbust.restart()?;
        }
        Fault::Sigterm | Fault::SigtermReconnecting => {
            walbust.ready(url, report, fault, t).await?;
            let cut = (fault == Fault::SigtermReconnecting).then_some(url);
            let exit = walbust.sigterm(cut).await?;
            report.sigterm(exit, &fault.name(), t, walbust);
            walbust.restart()?;
        }
        Fault::Walsender => {
            walbust.ready(url, report, fault, t).await?;
            terminate_walsender(url).await?;
        }
        Fault::RedisPause => {
            let pid = redis.pid().context("redis is not running")?;
            let pause = Duration::from_millis(schedule.rng.u64(1000..=5000));
            signal(pid, libc::SIGSTOP);
            tokio::time::sleep(pause).await;
            signal(pid, libc::SIGCONT);
        }
        Fault::RedisRestart => tokio::task::block_in_place(|| {
            redis.stop()?;
            redis.start_again()
        })?,
        Fault::PgFast => tokio::task::block_in_place(|| pg.restart())?,
        Fault::PgImmediate => tokio::task::block_in_place(|| {
            pg.stop_immediate()?;
            pg.start_again()
        })?,
    }
    Ok(())
}

/// walbust's release binary running as a child process, one log file per start.
struct Walbust {
    bin: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    child: tokio::process::Child,
    starts: usize,
    started_at: SystemTime,
}

impl Walbust {
    fn start(bin: &Path, config: &Path, dir: &Path) -> anyhow::Result<Self> {
        let (child, started_at) = spawn(bin, config, &dir.join("walbust-1.log"))?;
        Ok(Walbust {
            bin: bin.to_path_buf(),
            config: config.to_path_buf(),
            dir: dir.to_path_buf(),
            child,
            starts: 1,
            started_at,
        })
    }

    fn log(&self) -> PathBuf {
        self.dir.join(format!("walbust-{}.log", self.starts))
    }

    fn restart(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        (self.child, self.started_at) = spawn(&self.bin, &self.config, &self.log())?;
        Ok(())
    }

    /// Records an exit nobody asked for, and starts walbust again.
    fn check_alive(&mut self, report: &mut Report, t: f64) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            eprintln!("soak: {t:7.1}s walbust exited by itself: {}; see {}", describe(status), self.log().display());
            report.unexpected.push(format!("{t:.1}s: {} ({})", describe(status), self.log().display()));
            self.restart()?;
        }
        Ok(())
    }

    /// Waits until this start of walbust holds the slot: its walsender began after the spawn.
    async fn wait_streaming(&mut self, url: &str) -> anyhow::Result<()> {
        let since = self.started_at.duration_since(UNIX_EPOCH)?.as_secs_f64() - 0.5;
        let deadline = Instant::now() + READY_WAIT;
        loop {
            if let Ok(db) = connect(url).await {
                let row = db
                    .query_opt(
                        "SELECT extract(epoch FROM a.backend_start)::float8 FROM pg_replication_slots s \
                         JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = $1",
                        &[&SLOT],
                    )
                    .await;
                if let Ok(Some(row)) = row
                    && row.get::<_, f64>(0) >= since
                {
                    return Ok(());
                }
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("walbust exited with {} before streaming; see {}", describe(status), self.log().display());
            }
            ensure!(Instant::now() < deadline, "walbust did not hold the slot within {READY_WAIT:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for walbust to stream before a fault aimed at it; a walbust that exited
    /// meanwhile is recorded and started again.
    async fn ready(&mut self, url: &str, report: &mut Report, fault: Fault, t: f64) -> anyhow::Result<()> {
        if let Err(e) = self.wait_streaming(url).await {
            report.problems.push(format!("{t:.1}s before {}: {e:#}", fault.name()));
            self.check_alive(report, t)?;
        }
        Ok(())
    }

    /// SIGTERMs walbust (then, given a database URL, terminates its walsender at once) and
    /// waits for it to exit; one that does not is killed.
    async fn sigterm(&mut self, cut_walsender: Option<&str>) -> anyhow::Result<String> {
        let pid = self.child.id().context("walbust already exited")?;
        signal(pid, libc::SIGTERM);
        if let Some(url) = cut_walsender {
            terminate_walsender(url).await?;
        }
        match tokio::time::timeout(SIGTERM_WAIT, self.child.wait()).await {
            Ok(status) => Ok(describe(status?)),
            Err(_) => {
                self.child.start_kill()?;
                self.child.wait().await?;
                Ok(format!("no exit within {SIGTERM_WAIT:?} (killed)"))
            }
        }
    }
}

fn spawn(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<(tokio::process::Child, SystemTime)> {
    let out = std::fs::File::create(log)?;
    let started_at = SystemTime::now();
    let child = tokio::process::Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok((child, started_at))
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        (None, None) => format!("{status}"),
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) on a child process of ours with a valid signal number.
        unsafe { libc::kill(pid, sig) };
    }
}

async fn terminate_walsender(url: &str) -> anyhow::Result<()> {
    connect(url)
        .await?
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&SLOT],
        )
        .await?;
    Ok(())
}

async fn current_lsn(db: &Client) -> anyhow::Result<Lsn> {
    parse_lsn(db.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0))
}

async fn confirmed(db: &Client) -> anyhow::Result<Option<Lsn>> {
    let rows =
        db.query("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&SLOT]).await?;
    rows.first().and_then(|r| r.get::<_, Option<&str>>(0)).map(parse_lsn).transpose()
}

/// A Redis connection that waits as long as the server does: a paused server answers
/// late, and a command given up on could still land after walbust's delete.
async fn redis_conn(url: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(url)?.get_multiplexed_async_connection_with_config(&config).await
}

/// Every marker of a committed transaction must be gone; the control key must not.
async fn check_markers(db: &Client, redis_url: &str, report: &mut Report) -> anyhow::Result<()> {
    let mut conn = redis_conn(redis_url).await?;
    report.control_kept = conn.exists(CONTROL_KEY).await?;
    let rows = db.query("SELECT writer, txn, key FROM soak_log ORDER BY writer, txn", &[]).await?;
    for chunk in rows.chunks(1000) {
        let mut pipe = redis::pipe();
        for row in chunk {
            pipe.exists(row.get::<_, &str>(2));
        }
        let found: Vec<bool> = pipe.query_async(&mut conn).await?;
        for (row, found) in chunk.iter().zip(found) {
            if found {
                let (w, txn, key) = (row.get::<_, i32>(0), row.get::<_, i64>(1), row.get::<_, &str>(2));
                report.lost.push(format!("{key} (writer {w}, transaction {txn})"));
            }
        }
    }
    report.markers = rows.len();
    Ok(())
}

/// What one writer did.
#[derive(Debug, Default)]
struct WriterStats {
    committed: u64,
    /// Attempts that failed and, checked afterwards, had not committed.
    abandoned: u64,
    /// Attempts whose connection broke during the commit and that had committed.
    confirmed_after_error: u64,
}

impl WriterStats {
    fn add(&mut self, other: &WriterStats) {
        self.committed += other.committed;
        self.abandoned += other.abandoned;
        self.confirmed_after_error += other.confirmed_after_error;
    }
}

/// One writer connection: sets the markers of a transaction, then commits it.
struct Writer {
    id: i32,
    rng: fastrand::Rng,
    period: Option<Duration>,
    url: String,
    redis_url: String,
    next_seq: i64,
    txn: i64,
    /// Committed rows not yet updated.
    fresh: Vec<i64>,
    /// Committed rows updated once (each row is updated at most once, so its marker is unique).
    updated: Vec<i64>,
    stats: WriterStats,
}

impl Writer {
    fn new(id: i32, args: &SoakArgs, url: &str, redis_url: &str) -> Self {
        let period = (args.commit_rate > 0).then(|| Duration::from_secs(1) * args.writers / args.commit_rate);
        Writer {
            id,
            rng: fastrand::Rng::with_seed(args.seed.wrapping_mul(1_000_003).wrapping_add(id.unsigned_abs().into())),
            period,
            url: url.to_string(),
            redis_url: redis_url.to_string(),
            next_seq: 0,
            txn: 0,
            fresh: Vec::new(),
            updated: Vec::new(),
            stats: WriterStats::default(),
        }
    }

    async fn run(mut self, stop: Arc<AtomicBool>) -> anyhow::Result<WriterStats> {
        let mut ticks = self.period.map(|p| {
            let mut i = tokio::time::interval(p);
            // After an outage, carry on at the rate rather than catch up in a burst.
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        let mut db: Option<Client> = None;
        let mut cache: Option<redis::aio::MultiplexedConnection> = None;
        while !stop.load(Ordering::Relaxed) {
            if let Some(t) = ticks.as_mut() {
                t.tick().await;
            }
            let plan = self.plan();
            // The markers go first: a delete that walbust sends after the commit must find them.
            if !self.set_markers(&mut cache, &plan.keys, &stop).await {
                break;
            }
            let Some(client) = Self::connected(&mut db, &self.url, &stop).await else { break };
            match client.batch_execute(&plan.sql).await {
                Ok(()) => self.committed(&plan),
                Err(_) => {
                    db = None;
                    // The connection broke somewhere before or during COMMIT: the log says which.
                    let Some(client) = Self::connected(&mut db, &self.url, &stop).await else { break };
                    let row = client
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM soak_log WHERE writer = $1 AND txn = $2)",
                            &[&self.id, &plan.txn],
                        )
                        .await?;
                    if row.get(0) {
                        self.stats.confirmed_after_error += 1;
                        self.committed(&plan);
                    } else {
                        self.stats.abandoned += 1;
                    }
                }
            }
        }
        Ok(self.stats)
    }

    /// Opens the connection if needed, retrying until it works or the soak stops.
    async fn connected<'a>(db: &'a mut Option<Client>, url: &str, stop: &AtomicBool) -> Option<&'a Client> {
        while db.as_ref().is_none_or(Client::is_closed) {
            match connect(url).await {
                Ok(c) => *db = Some(c),
                Err(_) if stop.load(Ordering::Relaxed) => return None,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        db.as_ref()
    }

    /// Sets every key, retrying through Redis restarts; false once the soak stops first.
    async fn set_markers(
        &self,
        cache: &mut Option<redis::aio::MultiplexedConnection>,
        keys: &[String],
        stop: &AtomicBool,
    ) -> bool {
        loop {
            if cache.is_none() {
                *cache = redis_conn(&self.redis_url).await.ok();
            }
            if let Some(conn) = cache.as_mut() {
                let pairs: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "stale")).collect();
                match conn.mset::<_, _, ()>(&pairs).await {
                    Ok(()) => return true,
                    // Only a broken connection fails (no response timeout), so the MSET is
                    // either applied before the next attempt or never.
                    Err(_) => *cache = None,
                }
            }
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The next transaction: 1 to 3 inserts (now and then 200), maybe an update of a row
    /// inserted earlier, maybe a delete, now and then a manual invalidation message.
    fn plan(&mut self) -> Plan {
        self.txn += 1;
        let (w, txn) = (self.id, self.txn);
        let inserts = if self.rng.u32(0..100) == 0 { 200 } else { self.rng.i64(1..=3) };
        let (first, last) = (self.next_seq, self.next_seq + inserts - 1);
        self.next_seq += inserts;
        let mut keys: Vec<String> = (first..=last).map(|s| format!("i:{w}:{s}")).collect();
        let mut sql = format!(
            "BEGIN;\nINSERT INTO soak_events (writer, seq, payload) SELECT {w}, g, md5(g::text) FROM generate_series({first}, {last}) g;\n"
        );
        let update = (!self.fresh.is_empty() && self.rng.u32(0..10) < 4).then(|| self.rng.usize(..self.fresh.len()));
        let mut updated = None;
        if let Some(i) = update {
            let s = self.fresh[i];
            updated = Some(s);
            keys.push(format!("u:{w}:{s}"));
            let _ = writeln!(sql, "UPDATE soak_events SET payload = 'updated' WHERE writer = {w} AND seq = {s};");
        }
        let alive = self.fresh.len() + self.updated.len();
        let mut deleted = None;
        if alive > 1 && self.rng.u32(0..10) < 3 {
            let i = self.rng.usize(..alive);
            let s = if i < self.fresh.len() { self.fresh[i] } else { self.updated[i - self.fresh.len()] };
            if Some(s) != updated {
                deleted = Some(s);
                keys.push(format!("d:{w}:{s}"));
                let _ = writeln!(sql, "DELETE FROM soak_events WHERE writer = {w} AND seq = {s};");
            }
        }
        if self.rng.u32(0..10) == 0 {
            let key = format!("e:{w}:{txn}");
            let _ = writeln!(sql, "SELECT pg_logical_emit_message(true, 'walbust', '{{\"keys\":[\"{key}\"]}}');");
            keys.push(key);
        }
        let _ = write!(sql, "INSERT INTO soak_log (writer, txn, key) VALUES ");
        let values: Vec<String> = keys.iter().map(|k| format!("({w}, {txn}, '{k}')")).collect();
        let _ = writeln!(sql, "{};\nCOMMIT;", values.join(", "));
        Plan { txn, sql, keys, inserted: (first, last), updated, deleted }
    }

    fn committed(&mut self, plan: &Plan) {
        self.stats.committed += 1;
        if let Some(s) = plan.updated {
            self.fresh.retain(|&x| x != s);
            self.updated.push(s);
        }
        if let Some(s) = plan.deleted {
            self.fresh.retain(|&x| x != s);
            self.updated.retain(|&x| x != s);
        }
        self.fresh.extend(plan.inserted.0..=plan.inserted.1);
    }
}

/// One transaction as SQL, with the markers it must invalidate.
struct Plan {
    txn: i64,
    sql: String,
    keys: Vec<String>,
    inserted: (i64, i64),
    updated: Option<i64>,
    deleted: Option<i64>,
}

#[derive(Default)]
struct Report {
    faults: BTreeMap<Fault, usize>,
    /// Exit description to count, over every SIGTERM including the final stop.
    sigterm_exits: BTreeMap<String, usize>,
    /// SIGTERMs that did not exit 0: when, which fault, where the log is.
    bad_sigterms: Vec<String>,
    unexpected: Vec<String>,
    problems: Vec<String>,
    writers: WriterStats,
    caught_up: Option<Duration>,
    control_kept: bool,
    markers: usize,
    lost: Vec<String>,
}

impl Report {
    fn sigterm(&mut self, exit: String, what: &str, t: f64, walbust: &Walbust) {
        if exit != "exit 0" {
            eprintln!("soak: {t:7.1}s SIGTERM ({what}) ended walbust with {exit}; see {}", walbust.log().display());
            self.bad_sigterms.push(format!("{t:.1}s {what}: {exit} ({})", walbust.log().display()));
        }
        *self.sigterm_exits.entry(exit).or_default() += 1;
    }

    fn passed(&self) -> bool {
        self.lost.is_empty()
            && self.bad_sigterms.is_empty()
            && self.unexpected.is_empty()
            && self.caught_up.is_some()
            && self.control_kept
    }

    async fn table(&self, db: &Client) -> anyhow::Result<String> {
        let commits: i64 =
            db.query_one("SELECT count(*) FROM (SELECT DISTINCT writer, txn FROM soak_log) t", &[]).await?.get(0);
        let w = &self.writers;
        let list = |m: &BTreeMap<String, usize>| m.iter().map(|(k, n)| format!("{n} × {k}")).collect::<Vec<_>>();
        let faults: Vec<String> = self.faults.iter().map(|(f, n)| format!("{} {n}", f.name())).collect();
        let mut out = String::new();
        let _ = writeln!(out, "| figure | value |\n|---|---|");
        let _ = writeln!(out, "| committed transactions (soak_log) | {commits} |");
        let _ = writeln!(
            out,
            "| committed, as the writers counted | {} ({} confirmed after a broken connection) |",
            w.committed, w.confirmed_after_error
        );
        let _ = writeln!(out, "| attempts that did not commit (markers not counted) | {} |", w.abandoned);
        let _ = writeln!(out, "| markers of committed transactions | {} |", self.markers);
        let _ = writeln!(out, "| faults | {}: {} |", self.faults.values().sum::<usize>(), faults.join(", "));
        let _ = writeln!(out, "| SIGTERM exits (with the final stop) | {} |", list(&self.sigterm_exits).join(", "));
        let _ = writeln!(out, "| walbust exits nobody asked for | {} |", self.unexpected.len());
        let caught = self
            .caught_up
            .map_or("no: the slot never confirmed the end".into(), |d| format!("{:.1} s", d.as_secs_f64()));
        let _ = writeln!(out, "| catch-up after the writers stopped | {caught} |");
        let _ = writeln!(
            out,
            "| control key kept through Redis restarts | {} |",
            if self.control_kept { "yes" } else { "NO" }
        );
        let _ = writeln!(out, "| lost invalidations | {} |", self.lost.len());
        let _ = writeln!(out, "| verdict | {} |", if self.passed() { "pass" } else { "FAIL" });
        for (title, items) in [
            ("lost invalidations (markers still in Redis)", &self.lost),
            ("SIGTERMs that did not exit 0", &self.bad_sigterms),
            ("walbust exits nobody asked for", &self.unexpected),
            ("notes", &self.problems),
        ] {
            if !items.is_empty() {
                let _ = writeln!(out, "\n{title}:");
                for item in items.iter().take(50) {
                    let _ = writeln!(out, "- {item}");
                }
                if items.len() > 50 {
                    let _ = writeln!(out, "- ... and {} more", items.len() - 50);
                }
            }
        }
        Ok(out)
    }
}

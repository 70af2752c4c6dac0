//! The test harness: throwaway Postgres and Redis servers, started once per test binary,
//! a fresh database, slot and publication per test, and waits with deadlines.

pub mod certs;
pub mod markers;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;
use walbust::daemon::pipeline::{self, Event, Options, PipelineError};
use walbust::domain::config::Config;
use walbust::domain::rules::RuleSet;
use walbust::offline::throwaway::{PostgresOptions, ThrowawayPostgres, ThrowawayRedis};
use walbust::sink::RedisSink;
use walbust::telemetry::metrics::Metrics;

/// Users the shared cluster authenticates with passwords, for the connection tests.
pub const SCRAM_USER: &str = "scram_user";
/// Password of [`SCRAM_USER`] and [`MD5_USER`].
pub const PASSWORD: &str = "s3cret pass'word";
/// A user whose password is stored as md5.
pub const MD5_USER: &str = "md5_user";

/// The servers shared by every test of this binary.
pub struct Shared {
    /// Postgres with TLS on, trust for `postgres`, SCRAM and md5 users.
    pub pg: ThrowawayPostgres,
    /// Redis.
    pub redis: ThrowawayRedis,
    /// The CA that signed the server certificate (for `localhost` only).
    pub certs: certs::TestCerts,
}

/// Starts the shared servers on first use; panics with the install hint when binaries are missing.
pub fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        // Pipeline logs show up in a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "walbust=info".into()),
            )
            .with_test_writer()
            .try_init();
        let certs = certs::TestCerts::generate();
        let options = postgres_options(&certs);
        let pg = ThrowawayPostgres::start(&options).unwrap_or_else(|e| panic!("cannot start the test Postgres: {e}"));
        let redis = ThrowawayRedis::start().unwrap_or_else(|e| panic!("cannot start the test Redis: {e}"));
        let setup = format!(
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE {SCRAM_USER} LOGIN REPLICATION PASSWORD '{pw}';
             SET password_encryption = 'md5'; CREATE ROLE {MD5_USER} LOGIN REPLICATION PASSWORD '{pw}';
             CREATE ROLE no_replication LOGIN;",
            pw = PASSWORD.replace('\'', "''")
        );
        block_on(async {
            let client = connect(&pg.url("postgres")).await;
            client.batch_execute(&setup).await.expect("creating test roles");
        });
        Shared { pg, redis, certs }
    })
}

/// The directory holding `initdb` and `postgres` of one Postgres major version, for the
/// tests that need a version other than the suite's: `WALBUST_PG{major}_BIN`, else where
/// `.ci/pg-matrix install` puts it (under `WALBUST_PG_CACHE`, by default
/// /var/tmp/walbust-postgres). Panics with the install command when it is missing.
pub fn pg_bin(major: u32) -> PathBuf {
    let var = format!("WALBUST_PG{major}_BIN");
    let dir = match std::env::var_os(&var) {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("WALBUST_PG_CACHE")
            .map_or_else(|| PathBuf::from("/var/tmp/walbust-postgres"), PathBuf::from)
            .join(format!("{major}/bin")),
    };
    if !dir.join("initdb").is_file() || !dir.join("postgres").is_file() {
        panic!(
            "no PostgreSQL {major} server binaries in {}; install them with `.ci/pg-matrix install {major}` \
             (or set {var} to the directory holding initdb and postgres)",
            dir.display()
        );
    }
    dir
}

/// Options for a cluster like the shared one: TLS and password users.
pub fn postgres_options(certs: &certs::TestCerts) -> PostgresOptions {
    PostgresOptions {
        settings: vec![
            "ssl = on".into(),
            "ssl_cert_file = 'server.crt'".into(),
            "ssl_key_file = 'server.key'".into(),
            "wal_sender_timeout = '30s'".into(),
        ],
        hba: vec![
            format!("host all,replication {SCRAM_USER} 127.0.0.1/32 scram-sha-256"),
            format!("host all,replication {MD5_USER} 127.0.0.1/32 md5"),
        ],
        files: vec![
            ("server.crt".into(), certs.server_cert_pem.clone().into_bytes()),
            ("server.key".into(), certs.server_key_pem.clone().into_bytes()),
        ],
        bin: None,
    }
}

/// Runs a future to completion on a private runtime (for set-up outside any test runtime).
fn block_on<F: Future + Send>(f: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f))
            .join()
            .expect("set-up thread panicked")
    })
}

/// A plain SQL connection for test set-up and writes.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// A Redis connection for test assertions.
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).expect("redis url").get_multiplexed_async_connection().await.expect("connecting to redis")
}

/// A database of its own for one test, with names for its slot and publication.
pub struct TestDb {
    /// The database name, also used for the slot and publication.
    pub name: String,
    /// Its URL as the superuser.
    pub url: String,
    /// A connection for writes.
    pub client: tokio_postgres::Client,
}

/// Creates a database on `pg`, runs `schema` in it and publishes all its tables.
pub async fn fresh_db(pg: &ThrowawayPostgres, schema: &str) -> TestDb {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!("t{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    connect(&pg.url("postgres"))
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let url = pg.url(&name);
    let client = connect(&url).await;
    client.batch_execute(schema).await.expect("schema");
    client.batch_execute(&format!("CREATE PUBLICATION {name} FOR ALL TABLES")).await.expect("publication");
    TestDb { name, url, client }
}

/// A config file (and rule file) in a temporary directory.
pub struct ConfigFiles {
    /// Keeps the directory until the files are dropped.
    _dir: tempfile::TempDir,
    /// config.toml.
    pub path: PathBuf,
}

/// Writes config.toml and rules/test.toml for `db`, with extra `[source]` lines.
pub fn write_config(db: &TestDb, redis_url: &str, rules: &str, source_extra: &str) -> ConfigFiles {
    write_config_with(db, redis_url, rules, source_extra, "", "off")
}

/// [`write_config`] with extra `[redis]` lines and a `[metrics] listen` address ("off" for none).
pub fn write_config_with(
    db: &TestDb,
    redis_url: &str,
    rules: &str,
    source_extra: &str,
    redis_extra: &str,
    metrics_listen: &str,
) -> ConfigFiles {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("rules")).expect("rules dir");
    std::fs::write(dir.path().join("rules/test.toml"), rules).expect("rule file");
    let text = format!(
        "rules = [\"rules/*.toml\"]\n[source]\nurl = \"{url}\"\nslot = \"{name}\"\npublication = \"{name}\"\n\
         status_interval = \"200ms\"\n{source_extra}\n[redis]\nurl = \"{redis_url}\"\n{redis_extra}\n[metrics]\nlisten = \"{metrics_listen}\"\n",
        url = db.url,
        name = db.name,
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).expect("config file");
    ConfigFiles { _dir: dir, path }
}

/// A pipeline running in this process against real servers.
pub struct Running {
    /// The pipeline's metrics, as `/metrics` would serve them.
    pub metrics: Arc<Metrics>,
    /// Sends a new rule set, as SIGHUP does in `walbust run`.
    pub reload: tokio::sync::watch::Sender<Arc<RuleSet>>,
    pipeline: pipeline::Spawned,
}

impl Running {
    /// Loads `config` and its rules and starts the pipeline with a Redis sink; waits until it streams.
    pub async fn start(config: &Path) -> Running {
        Running::start_observed(config).await.0
    }

    /// Like [`Running::start`], and returns the pipeline's events from the moment it streams.
    pub async fn start_observed(config: &Path) -> (Running, mpsc::UnboundedReceiver<Event>) {
        match Running::start_inner(config).await {
            Ok(r) => r,
            Err(e) => panic!("pipeline stopped at start: {}", walbust::errors::causes::error_chain(&e)),
        }
    }

    /// Like [`Running::start`], but returns the error when the pipeline stops before streaming.
    pub async fn try_start(config: &Path) -> Result<Running, PipelineError> {
        // Events are dropped unread from here on.
        Running::start_inner(config).await.map(|(running, _)| running)
    }

    async fn start_inner(config: &Path) -> Result<(Running, mpsc::UnboundedReceiver<Event>), PipelineError> {
        let config = Config::load(config).unwrap_or_else(|e| panic!("config: {e}"));
        let rules = RuleSet::load(&config.rules).unwrap_or_else(|e| panic!("rules: {e}")).rules;
        let sink = RedisSink::from_config(&config.redis).expect("redis sink");
        let (tx, mut events) = mpsc::unbounded_channel();
        let metrics = Metrics::new();
        let (reload_tx, reload) = tokio::sync::watch::channel(Arc::new(rules.clone()));
        let options =
            Options { observer: Some(tx), reload: Some(reload), metrics: metrics.clone(), ..Options::default() };
        let pipeline = pipeline::spawn(config, Arc::new(rules), sink, options);
        let streaming = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match events.recv().await {
                    Some(Event::Streaming { .. }) => return true,
                    Some(_) => {}
                    // The pipeline dropped its observer: it has stopped.
                    None => return false,
                }
            }
        })
        .await
        .expect("pipeline did not start streaming within 60s");
        if !streaming {
            return Err(pipeline.join().await.expect_err("a pipeline that stops before shutdown has failed"));
        }
        Ok((Running { metrics, reload: reload_tx, pipeline }, events))
    }

    /// Waits for the pipeline to stop by itself and returns its result.
    pub async fn stopped_by_itself(self, timeout: Duration) -> Result<(), PipelineError> {
        tokio::time::timeout(timeout, self.pipeline.join()).await.expect("pipeline did not stop by itself in time")
    }

    /// Asks the pipeline to stop as on SIGTERM and returns its result.
    pub async fn stop(self) -> Result<(), PipelineError> {
        tokio::time::timeout(Duration::from_secs(60), self.pipeline.stop())
            .await
            .expect("pipeline did not stop within 60s")
    }
}

/// Waits until `cond` holds, polling; panics at the caller's line after `timeout`.
#[track_caller]
pub fn wait_until<'a, F, Fut>(timeout: Duration, what: &'a str, mut cond: F) -> impl Future<Output = ()> + 'a
where
    F: FnMut() -> Fut + 'a,
    Fut: Future<Output = bool> + 'a,
{
    let caller = std::panic::Location::caller();
    async move {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if cond().await {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {what} (at {caller})");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Sets `keys` in Redis to "cached".
pub async fn cache(conn: &mut redis::aio::MultiplexedConnection, keys: &[String]) {
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.set(k, "cached").ignore();
    }
    let _: () = pipe.query_async(conn).await.expect("set keys");
}

/// Which of `keys` exist.
pub async fn existing(conn: &mut redis::aio::MultiplexedConnection, keys: &[String]) -> Vec<String> {
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.exists(k);
    }
    let flags: Vec<bool> = pipe.query_async(conn).await.expect("exists");
    keys.iter().zip(flags).filter(|(_, e)| *e).map(|(k, _)| k.clone()).collect()
}

/// A `walbust` child process, killed when dropped so that a failing test leaves none behind.
pub struct Walbust(pub std::process::Child);

impl Walbust {
    /// Starts the built binary with `args`.
    pub fn spawn(args: &[&str], config: &Path, stderr: std::process::Stdio) -> Walbust {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_walbust"))
            .args(args)
            .arg(config)
            .stdin(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawning walbust");
        Walbust(child)
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, signal) };
    }

    /// SIGTERM, then the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        self.0.wait().expect("waiting for walbust").code()
    }
}

impl Drop for Walbust {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The lines of `lines` that contain `needle`.
pub fn containing(lines: &[String], needle: &str) -> Vec<String> {
    lines.iter().filter(|l| l.contains(needle)).cloned().collect()
}

/// Every line a child process writes to stderr, collected as it comes and echoed, so a
/// failing test shows them.
pub struct StderrLog {
    lines: Arc<std::sync::Mutex<Vec<String>>>,
    reader: std::thread::JoinHandle<()>,
}

impl StderrLog {
    /// Starts collecting the piped stderr of `child`.
    pub fn capture(child: &mut std::process::Child) -> StderrLog {
        use std::io::BufRead;
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let collected = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                collected.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        StderrLog { lines, reader }
    }

    /// Every line, once the process has exited: waits (up to 30 s) until the pipe is read to
    /// its end, since the last lines may still be in it when the exit is seen.
    pub fn read_to_end(self) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.reader.is_finished() {
            assert!(std::time::Instant::now() < deadline, "stderr still open 30 s after the exit");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.lines()
    }

    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The lines so far that contain `needle`.
    pub fn matching(&self, needle: &str) -> Vec<String> {
        containing(&self.lines(), needle)
    }

    /// Waits for a line containing `needle`; panics at the caller's line after `timeout`.
    #[track_caller]
    pub fn wait_for<'a>(&'a self, needle: &'a str, timeout: Duration) -> impl Future<Output = ()> + 'a {
        wait_until(timeout, needle, move || {
            let found = !self.matching(needle).is_empty();
            async move { found }
        })
    }
}

/// GET `path` from 127.0.0.1:`port` over HTTP/1.1: the status code and the body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    Some((code, body))
}

/// The pid of the walsender that streams `slot` (past `START_REPLICATION`), if one does. A
/// walsender that only created the slot holds it a moment before the streaming one does.
pub async fn streaming_walsender(client: &tokio_postgres::Client, slot: &str) -> Option<i32> {
    let row = client
        .query_opt(
            "SELECT s.active_pid FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
             WHERE s.slot_name = $1 AND r.state IN ('catchup', 'streaming')",
            &[&slot],
        )
        .await
        .expect("slot query");
    row.map(|r| r.get(0))
}

/// A TCP port on 127.0.0.1 that was free a moment ago, handed out once.
pub fn free_port() -> u16 {
    walbust::offline::throwaway::free_port().expect("a free port")
}

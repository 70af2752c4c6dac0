//! Throwaway Postgres and Redis servers for `walbust demo`, the test suite and benchmarks.
//!
//! Each server lives in its own temporary directory on a free loopback port, with
//! `wal_level=logical` for Postgres. When walbust runs as root, Postgres runs as the
//! `postgres` OS user, since `initdb` refuses root. A watchdog process stops each server
//! and removes its directory when the process that started it exits, however it exits,
//! so a crashed test run leaves nothing behind.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to come up before start-up is called failed.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a throwaway server could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ThrowawayError {
    /// A server binary is not installed.
    #[error("cannot find `{name}`; {hint}")]
    MissingBinary {
        /// The binary looked for.
        name: &'static str,
        /// The install command.
        hint: &'static str,
    },
    /// A file or process operation failed.
    #[error("{doing} ({path}) failed")]
    Io {
        /// What was being done.
        doing: &'static str,
        /// The path or command involved.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The server did not become ready.
    #[error("{what} did not start: {reason}\n--- last lines of {log} ---\n{tail}")]
    Startup {
        /// Which server.
        what: &'static str,
        /// Why it is considered failed.
        reason: String,
        /// Its log file.
        log: String,
        /// The end of its log.
        tail: String,
    },
    /// Running as root without a `postgres` user to run the server as.
    #[error(
        "running as root and there is no `postgres` OS user to run the throwaway Postgres as; create one (useradd --system postgres) or run as an ordinary user"
    )]
    NoPostgresUser,
}

fn io(doing: &'static str, path: impl AsRef<Path>) -> impl FnOnce(std::io::Error) -> ThrowawayError {
    let path = path.as_ref().display().to_string();
    move |source| ThrowawayError::Io { doing, path, source }
}

/// Options for a throwaway Postgres cluster.
#[derive(Debug, Clone, Default)]
pub struct PostgresOptions {
    /// Extra `postgresql.conf` settings, as `name = value` lines.
    pub settings: Vec<String>,
    /// Lines placed at the top of `pg_hba.conf`, before the default trust lines.
    pub hba: Vec<String>,
    /// Files written into the data directory before start (certificates, keys), mode 0600.
    pub files: Vec<(String, Vec<u8>)>,
}

/// A Postgres cluster in a temporary directory, stopped and removed on drop.
pub struct ThrowawayPostgres {
    root: PathBuf,
    bin: PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
    child: Option<Child>,
}

impl ThrowawayPostgres {
    /// Creates a cluster with `initdb` and starts it.
    pub fn start(options: &PostgresOptions) -> Result<Self, ThrowawayError> {
        let bin = postgres_bin_dir()?;
        let owner = if is_root() { Some(postgres_user()?) } else { None };
        let root = temp_root("pg")?;
        let mut pg = ThrowawayPostgres { root, bin, port: free_port()?, owner, child: None };
        pg.chown(&pg.root.clone())?;
        spawn_watchdog(
            &pg.root,
            &format!("kill -QUIT $(head -n1 '{}/data/postmaster.pid' 2>/dev/null) 2>/dev/null", pg.root.display()),
        );
        pg.initdb(options)?;
        pg.start_again()?;
        Ok(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database` as the superuser `postgres`, over TCP, without TLS.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable", self.port)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd.env_remove("PGDATA").env("LC_ALL", "C");
        cmd
    }

    fn chown(&self, path: &Path) -> Result<(), ThrowawayError> {
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io("chown to postgres", path))?;
        }
        Ok(())
    }

    fn initdb(&self, options: &PostgresOptions) -> Result<(), ThrowawayError> {
        let data = self.data_dir();
        let out = self
            .command("initdb")
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .map_err(io("running initdb", self.bin.join("initdb")))?;
        if !out.status.success() {
            return Err(ThrowawayError::Startup {
                what: "initdb",
                reason: format!("exited with {}", out.status),
                log: "initdb output".into(),
                tail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let mut conf = format!(
            "\n# throwaway cluster\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_wal_senders = 64\nmax_replication_slots = 64\nmax_connections = 200\n\
             fsync = off\nfull_page_writes = off\nshared_buffers = 64MB\nlog_min_messages = warning\n",
            self.port,
            self.root.display()
        );
        for s in &options.settings {
            conf.push_str(s);
            conf.push('\n');
        }
        append(&data.join("postgresql.conf"), conf.as_bytes())?;
        if !options.hba.is_empty() {
            let hba_path = data.join("pg_hba.conf");
            let existing = fs::read_to_string(&hba_path).map_err(io("reading pg_hba.conf", &hba_path))?;
            let mut hba = options.hba.join("\n");
            hba.push('\n');
            hba.push_str(&existing);
            fs::write(&hba_path, hba).map_err(io("writing pg_hba.conf", &hba_path))?;
        }
        for (name, contents) in &options.files {
            let path = data.join(name);
            fs::write(&path, contents).map_err(io("writing a data directory file", &path))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io("chmod 600", &path))?;
            self.chown(&path)?;
        }
        Ok(())
    }

    /// Starts the server (again, after [`stop`](Self::stop)) and waits until it accepts connections.
    pub fn start_again(&mut self) -> Result<(), ThrowawayError> {
        let log_path = self.log_path();
        let log = fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(io("opening", &log_path))?;
        let from = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log.try_clone().map_err(io("opening", &log_path))?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io("starting postgres", self.bin.join("postgres")))?;
        self.child = Some(child);
        let socket = self.root.join(format!(".s.PGSQL.{}", self.port));
        self.wait_ready("postgres", &log_path, from, |text| {
            text.contains("database system is ready to accept connections") && socket.exists()
        })
    }

    fn wait_ready(
        &mut self,
        what: &'static str,
        log: &Path,
        from: u64,
        ready: impl Fn(&str) -> bool,
    ) -> Result<(), ThrowawayError> {
        wait_ready(self.child.as_mut(), what, log, from, ready)
    }

    /// Stops the server with a fast shutdown and waits for it to exit.
    pub fn stop(&mut self) -> Result<(), ThrowawayError> {
        // SIGINT is Postgres' fast shutdown: sessions are ended, data is kept.
        self.stop_with(libc::SIGINT)
    }

    /// Stops the server with an immediate shutdown, as a crash would: no checkpoint, so the
    /// next start runs crash recovery. Committed data is kept.
    pub fn stop_immediate(&mut self) -> Result<(), ThrowawayError> {
        self.stop_with(libc::SIGQUIT)
    }

    fn stop_with(&mut self, sig: libc::c_int) -> Result<(), ThrowawayError> {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), sig);
            child.wait().map_err(io("waiting for postgres to stop", &self.root))?;
        }
        Ok(())
    }

    /// Stops and starts the server, keeping its data.
    pub fn restart(&mut self) -> Result<(), ThrowawayError> {
        self.stop()?;
        self.start_again()
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT is the immediate shutdown: nothing here needs keeping.
            signal(child.id(), libc::SIGQUIT);
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// A synchronous standby for a [`ThrowawayPostgres`]: `pg_receivewal --synchronous` on a
/// physical slot, under an `application_name` that `synchronous_standby_names` can name.
/// [`ThrowawayStandby::pause`] (SIGSTOP) stalls every commit waiting for it until
/// [`ThrowawayStandby::resume`] (SIGCONT). Stopped and removed on drop.
pub struct ThrowawayStandby {
    root: PathBuf,
    child: Child,
}

impl ThrowawayPostgres {
    /// Starts a synchronous standby named `name` (its slot and `application_name`).
    pub fn start_standby(&self, name: &str) -> Result<ThrowawayStandby, ThrowawayError> {
        let receivewal = self.bin.join("pg_receivewal");
        let conn = format!("host=127.0.0.1 port={} user=postgres application_name={name}", self.port);
        let out = Command::new(&receivewal)
            .args(["--create-slot", "--if-not-exists", "--slot", name, "--dbname", &conn])
            .output()
            .map_err(io("running pg_receivewal --create-slot", &receivewal))?;
        if !out.status.success() {
            return Err(ThrowawayError::Startup {
                what: "pg_receivewal",
                reason: format!("creating its slot exited with {}", out.status),
                log: "pg_receivewal output".into(),
                tail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let root = temp_root("standby")?;
        let child = Command::new(&receivewal)
            .args(["--synchronous", "--no-loop", "--slot", name, "--dbname", &conn, "--directory"])
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("starting pg_receivewal", &receivewal))?;
        spawn_watchdog(&root, &format!("kill -CONT {pid}; kill {pid}", pid = child.id()));
        Ok(ThrowawayStandby { root, child })
    }
}

impl ThrowawayStandby {
    /// Stalls the standby (SIGSTOP): synchronous commits wait until [`Self::resume`].
    pub fn pause(&self) {
        signal(self.child.id(), libc::SIGSTOP);
    }

    /// Lets the standby go on (SIGCONT).
    pub fn resume(&self) {
        signal(self.child.id(), libc::SIGCONT);
    }

    /// Whether `pg_receivewal` still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ThrowawayStandby {
    fn drop(&mut self) {
        self.resume();
        signal(self.child.id(), libc::SIGTERM);
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// A Redis server in a temporary directory, stopped and removed on drop.
pub struct ThrowawayRedis {
    root: PathBuf,
    bin: PathBuf,
    port: u16,
    tls: bool,
    child: Option<Child>,
}

/// PEM texts for a Redis server that only accepts TLS.
#[derive(Debug, Clone)]
pub struct RedisTls {
    /// The server certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// The CA that signed it.
    pub ca_pem: String,
}

impl ThrowawayRedis {
    /// Starts `redis-server` on a free loopback port.
    pub fn start() -> Result<Self, ThrowawayError> {
        Self::start_with(None)
    }

    /// Starts `redis-server` accepting only TLS connections, with the given certificate.
    pub fn start_tls(tls: &RedisTls) -> Result<Self, ThrowawayError> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<&RedisTls>) -> Result<Self, ThrowawayError> {
        let bin = find_in_path("redis-server").ok_or(ThrowawayError::MissingBinary {
            name: "redis-server",
            hint: "install Redis: apt-get install redis-server",
        })?;
        let root = temp_root("redis")?;
        spawn_watchdog(&root, &format!("kill -9 $(cat '{}/redis.pid' 2>/dev/null) 2>/dev/null", root.display()));
        if let Some(tls) = tls {
            for (name, pem) in [("redis.crt", &tls.cert_pem), ("redis.key", &tls.key_pem), ("ca.crt", &tls.ca_pem)] {
                let path = root.join(name);
                fs::write(&path, pem).map_err(io("writing a TLS file", &path))?;
            }
        }
        let mut redis = ThrowawayRedis { root, bin, port: free_port()?, tls: tls.is_some(), child: None };
        redis.start_again()?;
        Ok(redis)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0`, or `rediss://localhost:PORT/0` for a TLS server.
    pub fn url(&self) -> String {
        match self.tls {
            false => format!("redis://127.0.0.1:{}/0", self.port),
            true => format!("rediss://localhost:{}/0", self.port),
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the server (again, after [`stop`](Self::stop)), loading what it saved on stop.
    pub fn start_again(&mut self) -> Result<(), ThrowawayError> {
        let log = self.root.join("redis.log");
        let from = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let port = self.port.to_string();
        let ports: Vec<&str> = match self.tls {
            false => vec!["--port", &port],
            true => vec!["--port", "0", "--tls-port", &port, "--tls-auth-clients", "no"],
        };
        let mut cmd = Command::new(&self.bin);
        if self.tls {
            cmd.arg("--tls-cert-file").arg(self.root.join("redis.crt"));
            cmd.arg("--tls-key-file").arg(self.root.join("redis.key"));
            cmd.arg("--tls-ca-cert-file").arg(self.root.join("ca.crt"));
        }
        let child = cmd
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&ports)
            .args(["--daemonize", "no", "--dir"])
            .arg(&self.root)
            .arg("--pidfile")
            .arg(self.root.join("redis.pid"))
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("starting redis-server", &self.bin))?;
        self.child = Some(child);
        wait_ready(self.child.as_mut(), "redis-server", &log, from, |text| {
            text.contains("Ready to accept connections")
        })?;
        Ok(())
    }

    /// Stops the server as an operator would, saving its data so that a restart keeps the keys.
    pub fn stop(&mut self) -> Result<(), ThrowawayError> {
        if let Some(mut child) = self.child.take() {
            let asked =
                TcpStream::connect(("127.0.0.1", self.port)).and_then(|mut s| s.write_all(b"SHUTDOWN SAVE\r\n"));
            if asked.is_err() {
                signal(child.id(), libc::SIGTERM);
            }
            child.wait().map_err(io("waiting for redis-server to stop", &self.root))?;
        }
        Ok(())
    }
}

impl Drop for ThrowawayRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn wait_ready(
    mut child: Option<&mut Child>,
    what: &'static str,
    log: &Path,
    from: u64,
    ready: impl Fn(&str) -> bool,
) -> Result<(), ThrowawayError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let text = read_from(log, from);
        if ready(&text) {
            return Ok(());
        }
        let exited = child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        let reason = match exited {
            Some(status) => format!("exited with {status}"),
            None if Instant::now() > deadline => format!("not ready after {}s", START_TIMEOUT.as_secs()),
            None => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        return Err(ThrowawayError::Startup { what, reason, log: log.display().to_string(), tail });
    }
}

fn read_from(path: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        use std::io::Seek;
        let _ = f.seek(std::io::SeekFrom::Start(from));
        let _ = f.read_to_string(&mut text);
    }
    text
}

fn append(path: &Path, bytes: &[u8]) -> Result<(), ThrowawayError> {
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(io("appending to", path))
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a pid of our own child and a valid signal number.
        unsafe { libc::kill(pid, sig) };
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The uid and gid of the `postgres` OS user, read from /etc/passwd.
fn postgres_user() -> Result<(u32, u32), ThrowawayError> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(io("reading", "/etc/passwd"))?;
    passwd
        .lines()
        .find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() > 3 && f[0] == "postgres").then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
        .ok_or(ThrowawayError::NoPostgresUser)
}

/// Where `initdb` and `postgres` live: `WALBUST_PG_BIN`, Debian's versioned directories, or PATH.
pub fn postgres_bin_dir() -> Result<PathBuf, ThrowawayError> {
    let has_initdb = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("WALBUST_PG_BIN").map(PathBuf::from).filter(|d| has_initdb(d)) {
        return Ok(dir);
    }
    let mut versioned: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, d)| has_initdb(d))
        .collect();
    versioned.sort();
    if let Some((_, dir)) = versioned.pop() {
        return Ok(dir);
    }
    find_in_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf)).filter(|d| has_initdb(d)).ok_or(
        ThrowawayError::MissingBinary {
            name: "initdb",
            hint: "install the PostgreSQL server: apt-get install postgresql (or set WALBUST_PG_BIN to the directory holding initdb and postgres)",
        },
    )
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn free_port() -> Result<u16, ThrowawayError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port", "127.0.0.1:0"))?;
    listener.local_addr().map(|a| a.port()).map_err(io("finding a free port", "127.0.0.1:0"))
}

fn temp_root(kind: &str) -> Result<PathBuf, ThrowawayError> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "walbust-{kind}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).map_err(io("creating a temporary directory", &dir))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io("chmod 700", &dir))?;
    Ok(dir)
}

/// Starts a shell that waits for this process to exit, then runs `kill` and removes `root`.
fn spawn_watchdog(root: &Path, kill: &str) {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {kill}; sleep 2; rm -rf '{root}'",
        pid = std::process::id(),
        root = root.display()
    );
    // The watchdog is best effort: without it, Drop still cleans up on an orderly exit.
    let _ = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
}

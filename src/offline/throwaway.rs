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
    /// The directory holding `initdb` and `postgres`; [`postgres_bin_dir`] when `None`.
    pub bin: Option<PathBuf>,
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
        let bin = match &options.bin {
            Some(dir) => dir.clone(),
            None => postgres_bin_dir()?,
        };
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
             wal_level = logical\nmax_wal_senders = 64\nmax_replication_slots = 256\nmax_connections = 200\n\
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
            (text.contains("database system is ready to accept connections")
                || text.contains("database system is ready to accept read-only connections"))
                && socket.exists()
        })
    }

    /// A streaming standby of this cluster, as `pg_basebackup -R` makes one: a copy of the
    /// data directory with `standby.signal` and a `primary_conninfo` pointing here, started
    /// on a port of its own with `settings` added (`primary_slot_name`, ...). The copy is
    /// taken with this server stopped (a fast shutdown, then started again), which needs no
    /// `pg_basebackup` of the server's version; replication slots are left out of the copy,
    /// as `pg_basebackup` leaves them out.
    pub fn start_standby(&mut self, settings: &[String]) -> Result<ThrowawayPostgres, ThrowawayError> {
        let root = temp_root("pg")?;
        let mut standby =
            ThrowawayPostgres { root, bin: self.bin.clone(), port: free_port()?, owner: self.owner, child: None };
        standby.chown(&standby.root.clone())?;
        spawn_watchdog(
            &standby.root,
            &format!("kill -QUIT $(head -n1 '{}/data/postmaster.pid' 2>/dev/null) 2>/dev/null", standby.root.display()),
        );
        self.stop()?;
        let copied = Command::new("cp")
            .arg("-a")
            .arg(self.data_dir())
            .arg(standby.data_dir())
            .status()
            .map_err(io("copying the data directory", self.data_dir()));
        self.start_again()?;
        if !copied?.success() {
            return Err(ThrowawayError::Startup {
                what: "standby",
                reason: "cp -a of the primary's data directory failed".into(),
                log: "cp".into(),
                tail: String::new(),
            });
        }
        let slots = standby.data_dir().join("pg_replslot");
        for entry in fs::read_dir(&slots).map_err(io("reading", &slots))?.flatten() {
            fs::remove_dir_all(entry.path()).map_err(io("removing a copied slot", entry.path()))?;
        }
        let _ = fs::remove_file(standby.data_dir().join("postmaster.pid"));
        let _ = fs::remove_file(standby.log_path());
        let signal = standby.data_dir().join("standby.signal");
        fs::write(&signal, b"").map_err(io("writing", &signal))?;
        standby.chown(&signal)?;
        let mut conf = format!(
            "\n# standby\nport = {}\nunix_socket_directories = '{}'\nhot_standby = on\n\
             primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres application_name=standby'\n",
            standby.port,
            standby.root.display(),
            self.port
        );
        for line in settings {
            conf.push_str(line);
            conf.push('\n');
        }
        append(&standby.data_dir().join("postgresql.conf"), conf.as_bytes())?;
        standby.start_again()?;
        Ok(standby)
    }

    /// Promotes a standby with `pg_ctl promote`, waiting until it accepts writes.
    pub fn promote(&self) -> Result<(), ThrowawayError> {
        let out = self
            .command("pg_ctl")
            .arg("promote")
            .arg("-w")
            .arg("-D")
            .arg(self.data_dir())
            .output()
            .map_err(io("running pg_ctl promote", self.bin.join("pg_ctl")))?;
        if !out.status.success() {
            return Err(ThrowawayError::Startup {
                what: "pg_ctl promote",
                reason: format!("exited with {}", out.status),
                log: "pg_ctl output".into(),
                tail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
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

/// A synchronous standby for a [`ThrowawayPostgres`]: a streaming replica
/// ([`ThrowawayPostgres::start_standby`]) under an `application_name` that
/// `synchronous_standby_names` can name. A full server rather than `pg_receivewal`, since the
/// server builds of other majors the tests run against (`WALBUST_PG_BIN`) ship no
/// `pg_receivewal`, and one of another major refuses a newer server.
/// [`ThrowawayStandby::pause`] (SIGSTOP of the standby's processes, its WAL receiver among
/// them) stalls every commit waiting for it until [`ThrowawayStandby::resume`] (SIGCONT).
/// Stopped and removed on drop.
pub struct ThrowawayStandby {
    server: ThrowawayPostgres,
}

impl ThrowawayPostgres {
    /// Starts a synchronous standby named `name` (its `application_name`). This server
    /// restarts once, as [`start_standby`](Self::start_standby) copies its data directory.
    pub fn start_sync_standby(&mut self, name: &str) -> Result<ThrowawayStandby, ThrowawayError> {
        let conninfo = format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres application_name={name}'",
            self.port
        );
        Ok(ThrowawayStandby { server: self.start_standby(&[conninfo])? })
    }
}

impl ThrowawayStandby {
    /// The standby's postmaster and its children, read from `/proc`.
    fn processes(&self) -> Vec<u32> {
        let Some(postmaster) = self.server.child.as_ref().map(Child::id) else { return Vec::new() };
        let mut pids = vec![postmaster];
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
            // The parent is the second field after the command name, which ends at the last ')'.
            let parent =
                stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if parent == Some(postmaster) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Stalls the standby (SIGSTOP): synchronous commits wait until [`Self::resume`].
    pub fn pause(&self) {
        for pid in self.processes() {
            signal(pid, libc::SIGSTOP);
        }
    }

    /// Lets the standby go on (SIGCONT).
    pub fn resume(&self) {
        for pid in self.processes() {
            signal(pid, libc::SIGCONT);
        }
    }
}

impl Drop for ThrowawayStandby {
    fn drop(&mut self) {
        // A stopped server would not act on the shutdown signal its own drop sends.
        self.resume();
    }
}

/// A Redis server in a temporary directory, stopped and removed on drop.
pub struct ThrowawayRedis {
    root: PathBuf,
    bin: PathBuf,
    port: u16,
    tls: bool,
    /// Extra command-line settings (cluster mode, Sentinel).
    args: Vec<String>,
    /// Sentinel's config file, given first on the command line; `None` for a server.
    conf: Option<PathBuf>,
    /// The line of its log that says it is ready.
    ready: &'static str,
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
        Self::start_with(None, &[])
    }

    /// [`start`](Self::start) with extra `redis-server` arguments (config directives such
    /// as `--rename-command PUBLISH ""`), kept for every restart.
    pub fn start_with_args(args: &[&str]) -> Result<Self, ThrowawayError> {
        Self::start_with(None, args)
    }

    /// Starts `redis-server` accepting only TLS connections, with the given certificate.
    pub fn start_tls(tls: &RedisTls) -> Result<Self, ThrowawayError> {
        Self::start_with(Some(tls), &[])
    }

    fn start_with(tls: Option<&RedisTls>, args: &[&str]) -> Result<Self, ThrowawayError> {
        Self::start_configured(tls, args.iter().map(|a| a.to_string()).collect(), "Ready to accept connections")
    }

    /// Starts `redis-server` with extra settings (`--name value` pairs), on a free port
    /// unless they give one.
    fn start_configured(
        tls: Option<&RedisTls>,
        args: Vec<String>,
        ready: &'static str,
    ) -> Result<Self, ThrowawayError> {
        let bin = redis_binary("redis-server")?;
        let root = temp_root("redis")?;
        spawn_watchdog(&root, &format!("kill -9 $(cat '{}/redis.pid' 2>/dev/null) 2>/dev/null", root.display()));
        if let Some(tls) = tls {
            for (name, pem) in [("redis.crt", &tls.cert_pem), ("redis.key", &tls.key_pem), ("ca.crt", &tls.ca_pem)] {
                let path = root.join(name);
                fs::write(&path, pem).map_err(io("writing a TLS file", &path))?;
            }
        }
        let mut redis =
            ThrowawayRedis { root, bin, port: free_port()?, tls: tls.is_some(), args, conf: None, ready, child: None };
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
        if let Some(conf) = &self.conf {
            cmd.arg(conf).arg("--sentinel");
        }
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
            .args(&self.args)
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
        let ready = self.ready;
        wait_ready(self.child.as_mut(), "redis-server", &log, from, |text| text.contains(ready))?;
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

/// A Redis Cluster of throwaway nodes: primaries, each with its replicas.
pub struct ThrowawayRedisCluster {
    /// Every node, primaries and replicas alike, in start order.
    pub nodes: Vec<ThrowawayRedis>,
}

impl ThrowawayRedisCluster {
    /// Starts `primaries * (1 + replicas)` nodes in cluster mode and joins them with
    /// `redis-cli --cluster create`; returns once every node says the cluster is ok.
    pub fn start(primaries: usize, replicas: usize) -> Result<Self, ThrowawayError> {
        let cli = redis_binary("redis-cli")?;
        let mut nodes = Vec::new();
        for _ in 0..primaries * (1 + replicas) {
            let args = vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                "nodes.conf".into(),
                "--cluster-node-timeout".into(),
                "3000".into(),
                // The bus port is chosen too: the default, port + 10000, may be taken or out of range.
                "--cluster-port".into(),
                free_port()?.to_string(),
            ];
            nodes.push(ThrowawayRedis::start_configured(None, args, "Ready to accept connections")?);
        }
        let mut create = Command::new(&cli);
        create.arg("--cluster").arg("create");
        create.args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        run_tool(create, "redis-cli --cluster create")?;
        let cluster = ThrowawayRedisCluster { nodes };
        for node in &cluster.nodes {
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                let info = redis_cli(&cli, node.port, &["CLUSTER", "INFO"])?;
                let nodes = redis_cli(&cli, node.port, &["CLUSTER", "NODES"])?;
                // Every node sees every replica as one: replicas turn so after the slots are assigned.
                let replicas_seen =
                    nodes.lines().filter(|l| l.split(' ').nth(2).is_some_and(|f| f.contains("slave"))).count();
                if info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{}", cluster.nodes.len()))
                    && replicas_seen == primaries * replicas
                {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(ThrowawayError::Startup {
                        what: "redis cluster",
                        reason: format!("node {} not ok after {}s", node.port, START_TIMEOUT.as_secs()),
                        log: node.root.join("redis.log").display().to_string(),
                        tail: format!("{info}{nodes}"),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(cluster)
    }

    /// The seed URL walbust is given: the first node.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// Runs `redis-cli -p PORT args...` against `port` and returns what it printed.
    pub fn cli(&self, port: u16, args: &[&str]) -> Result<String, ThrowawayError> {
        redis_cli(&redis_binary("redis-cli")?, port, args)
    }
}

/// Sentinel over a throwaway master and its replicas.
pub struct ThrowawaySentinel {
    /// The master first, then its replicas.
    pub servers: Vec<ThrowawayRedis>,
    /// The Sentinels watching them.
    pub sentinels: Vec<ThrowawayRedis>,
    /// The name the master is monitored under.
    pub master_name: String,
}

impl ThrowawaySentinel {
    /// Starts a master, `replicas` replicas of it and `sentinels` Sentinels (quorum: a
    /// majority) monitoring it; returns once every Sentinel knows every replica.
    pub fn start(replicas: usize, sentinels: usize) -> Result<Self, ThrowawayError> {
        let cli = redis_binary("redis-cli")?;
        let master = ThrowawayRedis::start()?;
        let mut servers = vec![];
        for _ in 0..replicas {
            let args = vec!["--replicaof".into(), "127.0.0.1".into(), master.port.to_string()];
            servers.push(ThrowawayRedis::start_configured(None, args, "Ready to accept connections")?);
        }
        servers.insert(0, master);
        let master_name = "walbust-master".to_string();
        let quorum = sentinels / 2 + 1;
        let mut watching = Vec::new();
        for _ in 0..sentinels {
            let text = format!(
                "sentinel monitor {master_name} 127.0.0.1 {port} {quorum}\n\
                 sentinel down-after-milliseconds {master_name} 2000\n\
                 sentinel failover-timeout {master_name} 10000\n\
                 sentinel parallel-syncs {master_name} 1\n",
                port = servers[0].port
            );
            watching.push(ThrowawayRedis::start_sentinel(&text)?);
        }
        let all = ThrowawaySentinel { servers, sentinels: watching, master_name };
        for s in &all.sentinels {
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                let replicas_seen =
                    redis_cli(&cli, s.port, &["SENTINEL", "REPLICAS", &all.master_name]).unwrap_or_default();
                let others = redis_cli(&cli, s.port, &["SENTINEL", "SENTINELS", &all.master_name]).unwrap_or_default();
                let seen = all.servers[1..].iter().all(|r| replicas_seen.contains(&r.port.to_string()));
                let peers =
                    all.sentinels.iter().filter(|o| o.port != s.port).all(|o| others.contains(&o.port.to_string()));
                if seen && peers {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(ThrowawayError::Startup {
                        what: "redis sentinel",
                        reason: format!("sentinel {} does not see every replica and sentinel", s.port),
                        log: s.root.join("redis.log").display().to_string(),
                        tail: format!("{replicas_seen}\n{others}"),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(all)
    }

    /// The Sentinels' URLs.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(|s| format!("redis://127.0.0.1:{}", s.port)).collect()
    }

    /// The port of the master as the first Sentinel names it now.
    pub fn master_port(&self) -> Result<u16, ThrowawayError> {
        let out = redis_cli(
            &redis_binary("redis-cli")?,
            self.sentinels[0].port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.master_name],
        )?;
        out.lines().nth(1).and_then(|p| p.trim().parse().ok()).ok_or_else(|| ThrowawayError::Startup {
            what: "redis sentinel",
            reason: "no master address".into(),
            log: String::new(),
            tail: out.clone(),
        })
    }

    /// Runs `redis-cli -p PORT args...` and returns what it printed.
    pub fn cli(&self, port: u16, args: &[&str]) -> Result<String, ThrowawayError> {
        redis_cli(&redis_binary("redis-cli")?, port, args)
    }
}

impl ThrowawayRedis {
    /// Starts a Sentinel with `conf` as its config file (Sentinel rewrites it).
    fn start_sentinel(conf: &str) -> Result<Self, ThrowawayError> {
        let bin = redis_binary("redis-server")?;
        let root = temp_root("sentinel")?;
        spawn_watchdog(&root, &format!("kill -9 $(cat '{}/redis.pid' 2>/dev/null) 2>/dev/null", root.display()));
        let path = root.join("sentinel.conf");
        fs::write(&path, conf).map_err(io("writing sentinel.conf", &path))?;
        let mut sentinel = ThrowawayRedis {
            root,
            bin,
            port: free_port()?,
            tls: false,
            args: Vec::new(),
            conf: Some(path),
            ready: "+monitor master",
            child: None,
        };
        sentinel.start_again()?;
        Ok(sentinel)
    }
}

/// A Redis binary on PATH, or the install hint.
fn redis_binary(name: &'static str) -> Result<PathBuf, ThrowawayError> {
    find_in_path(name)
        .ok_or(ThrowawayError::MissingBinary { name, hint: "install Redis: apt-get install redis-server" })
}

/// `redis-cli -p port args...`, its output.
fn redis_cli(cli: &Path, port: u16, args: &[&str]) -> Result<String, ThrowawayError> {
    let mut cmd = Command::new(cli);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]).args(args);
    run_tool(cmd, "redis-cli")
}

/// Runs a tool to completion; its standard output, or an error with what it said.
fn run_tool(mut cmd: Command, what: &'static str) -> Result<String, ThrowawayError> {
    let out = cmd.stdin(Stdio::null()).output().map_err(io("running", what))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(ThrowawayError::Startup {
            what,
            reason: format!("exited with {}", out.status),
            log: String::new(),
            tail: format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(text)
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

/// The first file called `name` in a directory of `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The ports [`free_port`] hands out: below Linux's default ephemeral range
/// (32768-60999), so that the local end of some outgoing connection cannot take a port
/// between the moment it was found free and the moment its server binds it.
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port that was free a moment ago and that no earlier call of this process
/// returned. Each process starts at its own place in 20000-31999, so that two test or bench
/// processes running at once rarely try the same ports.
pub fn free_port() -> Result<u16, ThrowawayError> {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let span = usize::from(PORTS.end - PORTS.start);
    let start = std::process::id() as usize * 97;
    for _ in 0..span {
        let offset = (start + CALLS.fetch_add(1, Ordering::Relaxed)) % span;
        let port = PORTS.start + offset as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    // Every port of the range is taken: let the kernel pick one.
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

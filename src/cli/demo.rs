//! `walbust demo`: the whole pipeline on throwaway servers, over a scripted series of writes.

use super::{CliError, Outcome};
use indexmap::IndexMap;
use redis::AsyncCommands;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use walbust::daemon::pipeline::{self, Event, Options};
use walbust::domain::action::Action;
use walbust::domain::batch::ChangeRecord;
use walbust::domain::config::Config;
use walbust::domain::diagnostic::plural;
use walbust::domain::rules::RuleSet;
use walbust::errors::exit;
use walbust::offline::throwaway::{PostgresOptions, ThrowawayPostgres, ThrowawayRedis};
use walbust::sink::{DeadLetter, RedisSink, RedisSinkError, Sink};

const SCHEMA: &str = include_str!("../../sql/demo.sql");
const RULES: &str = include_str!("../../rules/demo.toml");

/// Plans per cached page of a plan list.
const PAGE: usize = 2;

/// One transaction of the script.
struct Write {
    what: &'static str,
    sql: &'static str,
    /// A cached key to read before and after the write: the stale read it prevents.
    read: Option<&'static str>,
}

/// What the demo writes, in order.
const WRITES: &[Write] = &[
    Write {
        what: "a user changes a setting",
        sql: "UPDATE user_settings SET value = 'dark' WHERE user_id = 2 AND key = 'theme'",
        read: Some("user:2:settings:theme"),
    },
    Write {
        what: "a plan moves to another org: the lists of both",
        sql: "UPDATE plans SET org_slug = 'globex' WHERE name = 'Pro'",
        read: None,
    },
    Write {
        what: "a plan is created",
        sql: "INSERT INTO plans (org_slug, provider, name) VALUES ('initech', 'paddle', 'Scale')",
        read: None,
    },
    Write {
        what: "a user resets to defaults: several rows in one transaction",
        sql: "BEGIN; DELETE FROM user_settings WHERE user_id = 1; \
              INSERT INTO user_settings VALUES (1, 'theme', 'light'), (1, 'locale', 'en'); COMMIT",
        read: None,
    },
];

/// The cached keys that no write of the script concerns.
const UNTOUCHED: &[&str] = &["user:2:settings:locale", "plans_list_acme_paddle_page1"];

/// Runs the demo; returns the exit code.
pub async fn demo() -> Outcome {
    match tokio::time::timeout(Duration::from_secs(55), run_demo()).await {
        Ok(Ok(())) => Ok(exit::OK),
        Ok(Err(e)) => Err(CliError::failed(e.context("the demo failed"))),
        Err(_) => Err(CliError::failed(anyhow::anyhow!("the demo failed: it did not finish within 55 seconds"))),
    }
}

async fn run_demo() -> anyhow::Result<()> {
    println!("starting a throwaway Postgres (wal_level=logical) and Redis ...");
    let pg = tokio::task::spawn_blocking(|| ThrowawayPostgres::start(&PostgresOptions::default())).await??;
    let redis_server = tokio::task::spawn_blocking(ThrowawayRedis::start).await??;
    let (db, conn) = tokio_postgres::connect(&pg.url("postgres"), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    db.batch_execute("CREATE DATABASE demo").await?;
    let (db, conn) = tokio_postgres::connect(&pg.url("demo"), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    db.batch_execute(SCHEMA).await?;
    println!("loaded sql/demo.sql: tables user_settings and plans with their rows, publication walbust");

    let mut cache = redis::Client::open(redis_server.url())?.get_multiplexed_async_connection().await?;
    let cached = cache_aside(&db).await?;
    println!("the application caches what it reads (cache-aside: on a miss, read the rows, SET the key):");
    let width = cached.keys().map(String::len).max().unwrap_or(0);
    for (key, value) in &cached {
        let _: () = cache.set(key, value).await?;
        println!("   {key:<width$}  {value}");
    }
    println!();

    let config_text = format!(
        "rules = [\"rules/demo.toml\"]\n[source]\nurl = \"{}\"\nstatus_interval = \"1s\"\n[redis]\nurl = \"{}\"\n",
        pg.url("demo"),
        redis_server.url()
    );
    let config = Config::parse(Path::new("demo/config.toml"), &config_text, &|_| None)?;
    let rules = RuleSet::from_sources(&[(PathBuf::from("rules/demo.toml"), RULES.to_string())])
        .map_err(|d| anyhow::anyhow!("{d}"))?
        .rules;
    let pattern_deletes = Arc::new(Mutex::new(Vec::new()));
    let sink = CountingSink {
        inner: RedisSink::from_config(&config.redis)?,
        deleted: pattern_deletes.clone(),
        dead: Vec::new(),
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let pipeline =
        pipeline::spawn(config, Arc::new(rules), sink, Options { observer: Some(events_tx), ..Options::default() });
    loop {
        match events.recv().await {
            Some(Event::Streaming { start }) => {
                println!("walbust is streaming from slot `walbust` at {start}\n");
                break;
            }
            Some(_) => {}
            None => return Err(pipeline_failure(pipeline).await),
        }
    }

    let mut routed = 0;
    for write in WRITES {
        println!("-- {}", write.what);
        let statements: Vec<&str> = write.sql.split("; ").collect();
        println!("   {}", statements.join(";\n   "));
        let before: Option<String> = match write.read {
            Some(key) => cache.get(key).await?,
            None => None,
        };
        db.batch_execute(write.sql).await?;
        let mut changes = Vec::new();
        let mut applied = Vec::new();
        let mut delay = None;
        let mut seen_commits = 0;
        while seen_commits < commits_in(write.sql) {
            let Some(event) = tokio::time::timeout(Duration::from_secs(10), events.recv()).await? else {
                return Err(pipeline_failure(pipeline).await);
            };
            if let Event::Applied { changes: more, commits, actions, at } = event {
                if let Some(commit) = commits.last() {
                    delay = at.duration_since(commit.commit_time).ok();
                }
                seen_commits += commits.len();
                changes.extend(more);
                applied.extend(actions);
            }
        }
        let deleted: HashMap<String, u64> = std::mem::take(&mut *lock(&pattern_deletes)).into_iter().collect();
        show_applied(&changes, &applied, &deleted, delay);
        routed += changes.len();
        if let Some(key) = write.read {
            let after: Option<String> = cache.get(key).await?;
            let fresh = cache_aside(&db).await?.swap_remove(key).unwrap_or_default();
            let (Some(before), None) = (&before, &after) else {
                anyhow::bail!(
                    "stale read not prevented: GET {key} gave {before:?} before the write and {after:?} after it"
                );
            };
            println!("   stale read prevented:");
            println!("      before the write  GET {key} -> {before:?}");
            println!(
                "      after it          GET {key} -> (nil): a miss, so the application reads {fresh:?} from Postgres"
            );
        }
        println!();
    }

    let mut survivors = Vec::new();
    for key in cached.keys() {
        let exists: bool = cache.exists(key).await?;
        if exists {
            survivors.push(key.as_str());
        }
    }
    pipeline.stop().await?;
    println!(
        "{} changes routed; {} of {} cached keys invalidated; untouched: {}",
        routed,
        cached.len() - survivors.len(),
        cached.len(),
        if survivors.is_empty() { "none".to_string() } else { survivors.join(", ") }
    );
    anyhow::ensure!(survivors == UNTOUCHED, "unexpected cache state: {survivors:?} survived, not {UNTOUCHED:?}");
    println!("stopped walbust cleanly; removing the throwaway servers");
    drop(db);
    drop(pg);
    drop(redis_server);

    let walbust = this_binary();
    let next = [
        (
            format!("{walbust} test rules/demo.test.toml"),
            "the demo's rules against the actions they should produce; no servers",
        ),
        (format!("{walbust} check"), "config.toml and the rule files it names, offline"),
    ];
    let width = next.iter().map(|(command, _)| command.len()).max().unwrap_or(0);
    println!("\nwhat to try next, from the repository root:");
    for (command, what) in &next {
        println!("   {command:<width$}  {what}");
    }
    println!("   then README.md, \"Quick start against your own database\"");
    Ok(())
}

/// What the application caches from the current rows, by key in the order it first names
/// them: each setting and all of a user's settings; per org, its providers, all its plans
/// and its plan lists by provider, page by page.
async fn cache_aside(db: &tokio_postgres::Client) -> anyhow::Result<IndexMap<String, String>> {
    let mut values: IndexMap<String, Vec<String>> = IndexMap::new();
    let mut add = |key: String, value: String| {
        let list = values.entry(key).or_default();
        // A provider is listed once however many plans it has.
        if !list.contains(&value) {
            list.push(value);
        }
    };
    for row in db.query("SELECT user_id, key, value FROM user_settings ORDER BY user_id, key", &[]).await? {
        let (user, key, value): (i32, String, String) = (row.get(0), row.get(1), row.get(2));
        add(format!("user:{user}:settings:all"), format!("{key}={value}"));
        add(format!("user:{user}:settings:{key}"), value);
    }
    let mut listed: HashMap<String, usize> = HashMap::new();
    let plans = "SELECT org_slug, provider, name FROM plans WHERE enabled ORDER BY org_slug, provider, id";
    for row in db.query(plans, &[]).await? {
        let (org, provider, name): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        add(format!("providers_list_{org}"), provider.clone());
        add(format!("all_plans_{org}_v2"), name.clone());
        let n = listed.entry(format!("{org}_{provider}")).or_default();
        add(format!("plans_list_{org}_{provider}_page{}", *n / PAGE + 1), name);
        *n += 1;
    }
    Ok(values.into_iter().map(|(key, list)| (key, list.join(", "))).collect())
}

/// Prints a write's changes and the actions Redis got for them: each once, however many
/// changes named it, and for each pattern how many keys it deleted.
fn show_applied(changes: &[ChangeRecord], applied: &[Action], deleted: &HashMap<String, u64>, delay: Option<Duration>) {
    let mut ops: IndexMap<(&str, &str), usize> = IndexMap::new();
    for change in changes {
        *ops.entry((change.op, change.table.as_str())).or_default() += 1;
    }
    let ops: Vec<String> = ops
        .iter()
        .map(|((op, table), n)| if *n == 1 { format!("{op} {table}") } else { format!("{n} {op}s on {table}") })
        .collect();
    let delay =
        delay.map_or("commit time unknown".to_string(), |d| format!("{:.1} ms after commit", d.as_secs_f64() * 1e3));
    println!("   {} ({delay})", ops.join(", "));
    let named: Vec<&Action> = changes.iter().flat_map(|c| &c.actions).collect();
    if named.len() > applied.len() {
        println!(
            "   {} named, {} sent to Redis: each one once",
            plural(named.len() as u64, "action", "actions"),
            applied.len()
        );
    }
    let width = applied.iter().map(|a| a.to_string().len()).max().unwrap_or(0);
    for action in applied {
        let times = named.iter().filter(|a| **a == action).count();
        let note = match action {
            Action::ScanUnlink(pattern) => {
                format!("{} deleted", plural(deleted.get(pattern).copied().unwrap_or(0), "key", "keys"))
            }
            _ if times > 1 => format!("named by {times} changes, sent once"),
            _ => String::new(),
        };
        if note.is_empty() {
            println!("      {action}");
        } else {
            println!("      {:<width$}  ({note})", action.to_string());
        }
    }
}

/// The Redis sink, sending each pattern delete on its own so that the keys Redis reports
/// deleted are that pattern's.
struct CountingSink {
    inner: RedisSink,
    /// Keys deleted by each pattern of the batches applied since the demo last looked.
    deleted: Arc<Mutex<Vec<(String, u64)>>>,
    dead: Vec<DeadLetter>,
}

impl Sink for CountingSink {
    type Error = RedisSinkError;

    async fn apply(&mut self, actions: &[Action]) -> Result<(), RedisSinkError> {
        self.dead.clear();
        let mut counts = Vec::new();
        let mut start = 0;
        while start < actions.len() {
            let end = match &actions[start] {
                Action::ScanUnlink(_) => start + 1,
                _ => actions[start..]
                    .iter()
                    .position(|a| matches!(a, Action::ScanUnlink(_)))
                    .map_or(actions.len(), |n| start + n),
            };
            self.inner.apply(&actions[start..end]).await?;
            let deleted = self.inner.take_deleted();
            if let Action::ScanUnlink(pattern) = &actions[start] {
                counts.push((pattern.clone(), deleted));
            }
            let dead = self.inner.take_dead_letters().into_iter();
            self.dead.extend(dead.map(|d| DeadLetter { action: start + d.action, error: d.error }));
            start = end;
        }
        lock(&self.deleted).extend(counts);
        Ok(())
    }

    fn take_dead_letters(&mut self) -> Vec<DeadLetter> {
        std::mem::take(&mut self.dead)
    }

    async fn ping(&mut self) -> Result<(), RedisSinkError> {
        self.inner.ping().await
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How to run this binary from here: its path relative to the current directory, `walbust`
/// when that is what PATH finds, or else its full path.
fn this_binary() -> String {
    let Ok(exe) = std::env::current_exe() else { return "walbust".to_string() };
    if let Ok(here) = std::env::current_dir()
        && let Ok(relative) = exe.strip_prefix(&here)
    {
        return relative.display().to_string();
    }
    let on_path =
        std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("walbust") == exe));
    if on_path { "walbust".to_string() } else { exe.display().to_string() }
}

fn commits_in(sql: &str) -> usize {
    sql.matches("COMMIT").count().max(1)
}

async fn pipeline_failure(pipeline: pipeline::Spawned) -> anyhow::Error {
    match pipeline.join().await {
        Err(e) => anyhow::Error::new(e).context("the pipeline stopped"),
        Ok(()) => anyhow::anyhow!("the pipeline stopped early"),
    }
}

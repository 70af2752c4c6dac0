//! `walbust demo`: the whole pipeline on throwaway servers, over a scripted series of writes.

use super::{EXIT_FAILED, EXIT_OK};
use redis::AsyncCommands;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use walbust::config::Config;
use walbust::pipeline::{self, Event, Options, Stats, error_chain};
use walbust::rules::RuleSet;
use walbust::sink::RedisSink;
use walbust::throwaway::{PostgresOptions, ThrowawayPostgres, ThrowawayRedis};

const SCHEMA: &str = include_str!("../../sql/demo.sql");
const RULES: &str = include_str!("../../rules/demo.toml");

/// Keys an application would have cached before the writes.
const CACHED: &[&str] = &[
    "user:1:settings:all",
    "user:1:settings:theme",
    "user:2:settings:all",
    "user:2:settings:locale",
    "plans_list_acme_stripe_page1",
    "plans_list_acme_paddle_page1",
    "all_plans_acme_v2",
    "providers_list_acme",
    "plans_list_globex_stripe_page1",
    "providers_list_globex",
    "providers_list_initech",
];

/// What the demo writes, one transaction per line.
const WRITES: &[(&str, &str)] = &[
    ("a user saves a setting", "INSERT INTO user_settings VALUES (1, 'theme', 'dark')"),
    ("the user changes it", "UPDATE user_settings SET value = 'light' WHERE user_id = 1 AND key = 'theme'"),
    ("a plan is created", "INSERT INTO plans (org_slug, provider, name) VALUES ('acme', 'stripe', 'Pro')"),
    ("the plan is disabled", "UPDATE plans SET enabled = false WHERE id = 1"),
    ("the plan moves to another org", "UPDATE plans SET org_slug = 'globex' WHERE id = 1"),
    (
        "reset to defaults, in one transaction",
        "BEGIN; DELETE FROM user_settings WHERE user_id = 2; INSERT INTO user_settings VALUES (2, 'locale', 'en'); COMMIT",
    ),
];

/// Runs the demo; returns the exit code.
pub async fn demo() -> u8 {
    match tokio::time::timeout(Duration::from_secs(55), run_demo()).await {
        Ok(Ok(())) => EXIT_OK,
        Ok(Err(e)) => {
            eprintln!("demo failed: {e:#}");
            EXIT_FAILED
        }
        Err(_) => {
            eprintln!("demo failed: it did not finish within 55 seconds");
            EXIT_FAILED
        }
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
    println!("loaded sql/demo.sql: tables user_settings and plans, publication walbust");

    let mut cache = redis::Client::open(redis_server.url())?.get_multiplexed_async_connection().await?;
    for key in CACHED {
        let _: () = cache.set(*key, "cached").await?;
    }
    println!("cached {} keys in Redis, as the application would have\n", CACHED.len());

    let config_text = format!(
        "rules = [\"rules/demo.toml\"]\n[source]\nurl = \"{}\"\nstatus_interval = \"1s\"\n[redis]\nurl = \"{}\"\n",
        pg.url("demo"),
        redis_server.url()
    );
    let config = Config::parse(Path::new("demo/config.toml"), &config_text, &|_| None)?;
    let rules = RuleSet::from_sources(&[(PathBuf::from("rules/demo.toml"), RULES.to_string())])
        .map_err(|d| anyhow::anyhow!("{d}"))?
        .rules;
    let sink = RedisSink::new(&config.redis.url, config.redis.ca_pem.as_deref())?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stats = Arc::new(Stats::default());
    let pipeline = tokio::spawn({
        let stats = stats.clone();
        async move {
            let stop = async {
                let _ = stop_rx.await;
            };
            pipeline::run(
                &config,
                Arc::new(rules),
                sink,
                stop,
                Options { observer: Some(events_tx), stats, ..Options::default() },
            )
            .await
        }
    });
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

    let mut shown = 0;
    for (what, sql) in WRITES {
        println!("-- {what}\n   {sql}");
        db.batch_execute(sql).await?;
        let committed = commits_in(sql);
        let mut seen_commits = 0;
        while seen_commits < committed {
            let Some(event) = tokio::time::timeout(Duration::from_secs(10), events.recv()).await? else {
                return Err(pipeline_failure(pipeline).await);
            };
            if let Event::Applied { changes, commits, at, .. } = event {
                let times: HashMap<u32, SystemTime> = commits.iter().map(|c| (c.xid, c.commit_time)).collect();
                for change in &changes {
                    let delay = times
                        .get(&change.xid)
                        .and_then(|t| at.duration_since(*t).ok())
                        .map_or("commit pending".to_string(), |d| {
                            format!("{:.1} ms after commit", d.as_secs_f64() * 1e3)
                        });
                    println!("   {} {} ({delay})", change.op, change.table);
                    for a in &change.actions {
                        println!("      {a}");
                    }
                    shown += 1;
                }
                seen_commits += commits.len();
            }
        }
        println!();
    }

    let mut survivors = Vec::new();
    for key in CACHED {
        let exists: bool = cache.exists(*key).await?;
        if exists {
            survivors.push(*key);
        }
    }
    let _ = stop_tx.send(());
    pipeline.await??;
    println!(
        "{shown} changes routed; {} of {} cached keys invalidated; untouched: {}",
        CACHED.len() - survivors.len(),
        CACHED.len(),
        if survivors.is_empty() { "none".to_string() } else { survivors.join(", ") }
    );
    anyhow::ensure!(
        survivors == ["plans_list_acme_paddle_page1", "providers_list_initech"],
        "unexpected cache state: {survivors:?} survived"
    );
    println!("stopped walbust cleanly; removing the throwaway servers");
    drop(db);
    drop(pg);
    drop(redis_server);
    Ok(())
}

fn commits_in(sql: &str) -> usize {
    sql.matches("COMMIT").count().max(1)
}

async fn pipeline_failure(handle: tokio::task::JoinHandle<Result<(), pipeline::PipelineError>>) -> anyhow::Error {
    match handle.await {
        Ok(Err(e)) => anyhow::anyhow!("the pipeline stopped: {}", error_chain(&e)),
        Ok(Ok(())) => anyhow::anyhow!("the pipeline stopped early"),
        Err(e) => anyhow::anyhow!("the pipeline panicked: {e}"),
    }
}

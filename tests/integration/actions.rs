//! Every action against a real Redis: tags (with a concurrent SADD), version bumps,
//! publish, write-through refresh (including a failing SET), manual invalidation
//! messages in commit order, and rule reloads.

use crate::routing::drained;
use crate::support::{self, Running, cache, existing, fresh_db, redis_conn, wait_until, write_config};
use redis::AsyncCommands;
use std::sync::Arc;
use std::time::Duration;
use walbust::domain::rules::RuleSet;

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, org text NOT NULL DEFAULT 'acme', name text);
                     ALTER TABLE items REPLICA IDENTITY FULL;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_bust_deletes_members_and_loses_nothing_to_a_concurrent_sadd() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let rules = format!("[[rule]]\nname = \"org index\"\ntable = \"items\"\ntags = [\"{n}:idx:{{org}}\"]\n");
    let files = write_config(&db, &s.redis.url(), &rules, "");
    let mut redis = redis_conn(&s.redis.url()).await;
    let tag = format!("{n}:idx:acme");
    let old: Vec<String> = (0..1000).map(|i| format!("{n}:old:{i}")).collect();
    cache(&mut redis, &old).await;
    let _: () = redis.sadd(&tag, &old).await.unwrap();
    let run = Running::start(&files.path).await;

    // The application keeps caching: SET a key, then SADD it to the index, as cache-aside code does.
    let writer = tokio::spawn({
        let (url, n, tag) = (s.redis.url(), n.clone(), tag.clone());
        async move {
            let mut conn = redis_conn(&url).await;
            for i in 0..3000 {
                let key = format!("{n}:new:{i}");
                let _: () = conn.set(&key, "cached").await.unwrap();
                let _: () = conn.sadd(&tag, &key).await.unwrap();
            }
        }
    });
    db.client.batch_execute("INSERT INTO items (id) VALUES (1)").await.unwrap();
    drained(&run, &db.client).await;
    writer.await.unwrap();

    assert!(existing(&mut redis, &old).await.is_empty(), "every member at bust time is deleted");
    let new: Vec<String> = (0..3000).map(|i| format!("{n}:new:{i}")).collect();
    let members: std::collections::HashSet<String> = redis.smembers(&tag).await.unwrap();
    let orphans: Vec<String> = existing(&mut redis, &new).await.into_iter().filter(|k| !members.contains(k)).collect();
    assert!(
        orphans.is_empty(),
        "cached keys outside the index would never be busted: {:?}",
        &orphans[..orphans.len().min(5)]
    );
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bump_increments_versions_and_publish_announces_the_busted_keys() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let rules = format!(
        "[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\nbump = [\"{n}:ver:{{org}}\"]\n\
         publish = [{{ channel = \"{n}-events\" }}, {{ channel = \"{n}-ids\", message = \"{{op}}:{{id}}\" }}]\n"
    );
    let files = write_config(&db, &s.redis.url(), &rules, "");
    let mut redis = redis_conn(&s.redis.url()).await;
    let _: () = redis.set(format!("{n}:ver:acme"), 41).await.unwrap();
    let mut pubsub = redis::Client::open(s.redis.url()).unwrap().get_async_pubsub().await.unwrap();
    pubsub.subscribe(&[format!("{n}-events"), format!("{n}-ids")]).await.unwrap();
    let run = Running::start(&files.path).await;

    db.client.batch_execute("INSERT INTO items (id) VALUES (5)").await.unwrap();
    drained(&run, &db.client).await;
    let version: i64 = redis.get(format!("{n}:ver:acme")).await.unwrap();
    assert_eq!(version, 42);

    let mut messages = Vec::new();
    let mut stream = pubsub.on_message();
    for _ in 0..2 {
        let msg = tokio::time::timeout(Duration::from_secs(60), futures_util::StreamExt::next(&mut stream))
            .await
            .expect("a published message")
            .expect("pubsub open");
        messages.push((msg.get_channel_name().to_string(), msg.get_payload::<String>().unwrap()));
    }
    messages.sort();
    assert_eq!(
        messages,
        [
            (
                format!("{n}-events"),
                format!(
                    r#"{{"keys":["{n}:item:5","{n}:ver:acme"],"op":"insert","rule":"items","table":"public.items"}}"#
                )
            ),
            (format!("{n}-ids"), "insert:5".to_string()),
        ]
    );
    drop(stream);
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_writes_the_row_through_and_unlinks_it_on_delete() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let rules = format!(
        "[[rule]]\nname = \"item cache\"\ntable = \"items\"\nrefresh = [{{ key = \"{n}:item:{{id}}\", columns = [\"id\", \"name\"], ttl = \"300s\" }}]\n"
    );
    let files = write_config(&db, &s.redis.url(), &rules, "");
    let mut redis = redis_conn(&s.redis.url()).await;
    let run = Running::start(&files.path).await;
    let key = format!("{n}:item:1");

    db.client.batch_execute("INSERT INTO items (id, name) VALUES (1, 'first')").await.unwrap();
    drained(&run, &db.client).await;
    let value: String = redis.get(&key).await.unwrap();
    assert_eq!(value, r#"{"id":1,"name":"first"}"#);
    let ttl: i64 = redis.ttl(&key).await.unwrap();
    assert!((290..=300).contains(&ttl), "ttl {ttl}");

    db.client.batch_execute("UPDATE items SET name = 'second' WHERE id = 1").await.unwrap();
    drained(&run, &db.client).await;
    let value: String = redis.get(&key).await.unwrap();
    assert_eq!(value, r#"{"id":1,"name":"second"}"#);

    db.client.batch_execute("DELETE FROM items WHERE id = 1").await.unwrap();
    drained(&run, &db.client).await;
    assert!(existing(&mut redis, std::slice::from_ref(&key)).await.is_empty());
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_whose_set_fails_leaves_the_key_absent() {
    let s = support::shared();
    let redis_server =
        tokio::task::spawn_blocking(walbust::offline::throwaway::ThrowawayRedis::start).await.unwrap().unwrap();
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let rules =
        format!("[[rule]]\nname = \"item cache\"\ntable = \"items\"\nrefresh = [{{ key = \"{n}:item:{{id}}\" }}]\n");
    let files = write_config(&db, &redis_server.url(), &rules, "");
    let mut redis = redis_conn(&redis_server.url()).await;
    let key = format!("{n}:item:1");
    let _: () = redis.set(&key, "stale").await.unwrap();
    // Out of memory with no eviction: writes fail, deletes still work.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1").query_async(&mut redis).await.unwrap();
    let run = Running::start(&files.path).await;

    db.client.batch_execute("INSERT INTO items (id, name) VALUES (1, 'fresh')").await.unwrap();
    drained(&run, &db.client).await;
    assert!(existing(&mut redis, std::slice::from_ref(&key)).await.is_empty(), "the stale value is gone");
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_messages_apply_in_commit_order_and_rolled_back_ones_never_arrive() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let rules = format!(
        "[[rule]]\nname = \"item cache\"\ntable = \"items\"\nrefresh = [{{ key = \"{n}:item:{{id}}\", columns = [\"id\"] }}]\n"
    );
    let files = write_config(&db, &s.redis.url(), &rules, "");
    let mut redis = redis_conn(&s.redis.url()).await;
    let (admin, rolled_back) = (format!("{n}:admin:defaults"), format!("{n}:never"));
    cache(&mut redis, &[admin.clone(), rolled_back.clone()]).await;
    let run = Running::start(&files.path).await;
    let emit = |keys: &str| format!("SELECT pg_logical_emit_message(true, 'walbust', '{{\"keys\":[{keys}]}}')");

    // The row's write-through comes first, the message's UNLINK of the same key second.
    let k1 = format!("{n}:item:1");
    db.client
        .batch_execute(&format!(
            "BEGIN; INSERT INTO items (id) VALUES (1); {}; COMMIT",
            emit(&format!("\"{k1}\", \"{admin}\""))
        ))
        .await
        .unwrap();
    // And the other way round: UNLINK first, then the row's SET.
    let k2 = format!("{n}:item:2");
    db.client
        .batch_execute(&format!("BEGIN; {}; INSERT INTO items (id) VALUES (2); COMMIT", emit(&format!("\"{k2}\""))))
        .await
        .unwrap();
    db.client.batch_execute(&format!("BEGIN; {}; ROLLBACK", emit(&format!("\"{rolled_back}\"")))).await.unwrap();
    db.client
        .batch_execute(&format!("BEGIN; {}; COMMIT", "SELECT pg_logical_emit_message(true, 'walbust', 'not json')"))
        .await
        .unwrap();
    db.client.batch_execute("INSERT INTO items (id) VALUES (3)").await.unwrap();
    drained(&run, &db.client).await;

    assert_eq!(existing(&mut redis, &[k1, admin, k2.clone(), rolled_back.clone()]).await, [k2, rolled_back]);
    let metrics = &run.metrics;
    assert_eq!(metrics.manual_messages(), 3, "the committed messages, the malformed one included");
    assert_eq!(metrics.manual_refused_count("malformed"), 1, "the malformed body is skipped, not fatal");
    assert_eq!(metrics.actions_count("(manual message)", "unlink"), 3, "each key a committed message named");
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_rule_set_applies_from_the_next_transaction() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let rules =
        |prefix: &str| format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:{prefix}:{{id}}\"]\n");
    let files = write_config(&db, &s.redis.url(), &rules("a"), "");
    let mut redis = redis_conn(&s.redis.url()).await;
    let all: Vec<String> = ["a:1", "a:2", "b:1", "b:2"].iter().map(|k| format!("{n}:{k}")).collect();
    cache(&mut redis, &all).await;
    let run = Running::start(&files.path).await;

    db.client.batch_execute("INSERT INTO items (id) VALUES (1)").await.unwrap();
    drained(&run, &db.client).await;
    let new = RuleSet::from_sources(&[("b.toml".into(), rules("b"))]).unwrap().rules;
    run.reload.send(Arc::new(new)).unwrap();
    wait_until(Duration::from_secs(60), "the reload to be taken", || async { run.metrics.reloads() == 1 }).await;
    db.client.batch_execute("INSERT INTO items (id) VALUES (2)").await.unwrap();
    drained(&run, &db.client).await;
    assert_eq!(
        existing(&mut redis, &all).await,
        [all[1].clone(), all[2].clone()],
        "a:1 by the old rules, b:2 by the new"
    );
    run.stop().await.expect("clean stop");
}

/// `walbust run` on `config`, logging at info to walbust.log beside it.
fn run_logged(config: &std::path::Path) -> (support::Walbust, std::path::PathBuf) {
    let log = config.with_file_name("walbust.log");
    let child = support::Walbust::spawn(
        &["--log-level", "info", "run", "--config"],
        config,
        std::fs::File::create(&log).unwrap().into(),
    );
    (child, log)
}

/// A condition for [`wait_until`]: the log holds `needle`.
fn log_has(log: &std::path::Path, needle: &'static str) -> impl FnMut() -> std::future::Ready<bool> {
    let log = log.to_path_buf();
    move || std::future::ready(std::fs::read_to_string(&log).unwrap_or_default().contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_broken_rules_keeps_the_old_ones_and_with_good_rules_swaps_them_in() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let rules =
        |prefix: &str| format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:{prefix}:{{id}}\"]\n");
    let files = write_config(&db, &s.redis.url(), &rules("old"), "");
    let rule_file = files.path.with_file_name("rules").join("test.toml");
    let mut redis = redis_conn(&s.redis.url()).await;
    let all: Vec<String> = ["old:1", "old:2", "new:1", "new:2"].iter().map(|k| format!("{n}:{k}")).collect();
    cache(&mut redis, &all).await;
    let (walbust, log) = run_logged(&files.path);
    wait_until(Duration::from_secs(60), "walbust to stream its slot", || async {
        support::streaming_walsender(&db.client, &n).await.is_some()
    })
    .await;
    let hup = |child: &support::Walbust| child.signal(libc::SIGHUP);
    let log_has = |needle: &'static str| log_has(&log, needle);

    std::fs::write(&rule_file, rules("new").replace("{id}", "{id").replace("name = ", "nmae = ")).unwrap();
    hup(&walbust);
    wait_until(Duration::from_secs(60), "the broken reload to be rejected", log_has("reload rejected")).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("unknown field `nmae`"), "every error is logged:\n{text}");
    db.client.batch_execute("INSERT INTO items (id) VALUES (1)").await.unwrap();
    let old_1 = all[0].clone();
    wait_until(Duration::from_secs(60), "the old rules to bust old:1", || {
        let (url, key) = (s.redis.url(), old_1.clone());
        async move { existing(&mut redis_conn(&url).await, &[key]).await.is_empty() }
    })
    .await;

    std::fs::write(&rule_file, rules("new")).unwrap();
    hup(&walbust);
    wait_until(Duration::from_secs(60), "the good reload to be accepted", log_has("new rules accepted")).await;
    wait_until(Duration::from_secs(60), "the pipeline to swap the rules in", log_has("reloaded rules")).await;
    db.client.batch_execute("INSERT INTO items (id) VALUES (2)").await.unwrap();

    let expected = [all[1].clone(), all[2].clone()];
    let mut left = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        left = existing(&mut redis, &all).await;
        if left == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(left, expected, "old:1 busted by the old rules, new:2 by the new ones");
    assert_eq!(walbust.terminate(), Some(0));
}

/// Whether a log line renders the changed value 4711 ms (`4711ms`, `4.711s`, `4s 711ms`).
/// Timestamps are left out, and a match must start a number, so that a port such as 44711 or
/// an LSN such as 0/3924711 does not count.
fn mentions_value(log: &str) -> bool {
    log.lines().filter_map(|line| line.split_once(' ').map(|(_, rest)| rest)).any(|line| {
        ["4711", "4.711", "4s 711"].iter().any(|value| {
            line.match_indices(value)
                .any(|(at, _)| !line[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '.' || c == '/'))
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_says_which_changed_settings_take_effect_only_on_restart_without_their_values() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let rules = format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\n");
    let files = write_config(&db, &s.redis.url(), &rules, "");
    let (walbust, log) = run_logged(&files.path);
    let log_has = |needle: &'static str| log_has(&log, needle);
    wait_until(Duration::from_secs(60), "walbust to stream", log_has("streaming")).await;

    let text = std::fs::read_to_string(&files.path).unwrap();
    let changed = text.replace("status_interval = \"200ms\"", "status_interval = \"4711ms\"");
    assert_ne!(changed, text);
    std::fs::write(&files.path, changed).unwrap();
    walbust.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(60), "the reload to be accepted", log_has("new rules accepted")).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("these changed settings take effect only on restart; the running ones stay"), "{text}");
    assert!(text.contains("[source] status_interval"), "the setting is named:\n{text}");
    assert!(!mentions_value(&text), "its value is not:\n{text}");
    assert_eq!(walbust.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_goes_on_while_sighup_reloads_a_large_rule_set() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let files = write_config(
        &db,
        &s.redis.url(),
        &format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\n"),
        "",
    );
    let (walbust, log) = run_logged(&files.path);
    let log_has = |needle: &'static str| log_has(&log, needle);
    wait_until(Duration::from_secs(60), "walbust to stream", log_has("streaming")).await;
    // 600,000 keys in 40 files (11 MB): seconds of work to read and compile, which must not
    // hold up the stream. A last file with an error makes the reload end in a rejection
    // logged as soon as reading and compiling are done, with nothing to wait on in between:
    // on the runtime's thread, the load would let no change through before that line.
    let rules_dir = files.path.with_file_name("rules");
    for f in 0..40 {
        let mut text = format!("[[rule]]\nname = \"big {f}\"\ntable = \"items\"\nkeys = [\n");
        for i in 0..15_000 {
            text.push_str(&format!("  \"{n}:big:{{id}}:{i}\",\n"));
        }
        text.push_str("]\n");
        std::fs::write(rules_dir.join(format!("big{f}.toml")), text).unwrap();
    }
    let broken = rules_dir.join("zz_broken.toml");
    std::fs::write(&broken, "[[rule]]\nname = \"broken\"\ntable = \"items\"\nkeys = [\"{id\"]\n").unwrap();
    let mut redis = redis_conn(&s.redis.url()).await;
    let key = vec![format!("{n}:item:1")];
    cache(&mut redis, &key).await;
    walbust.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(60), "the reload to start", log_has("SIGHUP: reloading rules")).await;
    db.client.batch_execute("INSERT INTO items (id) VALUES (1)").await.unwrap();
    wait_until(Duration::from_secs(60), "the running rules to bust item:1 during the reload", || {
        let (url, key) = (s.redis.url(), key.clone());
        async move { existing(&mut redis_conn(&url).await, &key).await.is_empty() }
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("reload rejected"), "the stream waited for the reload to be over:\n{text}");
    wait_until(Duration::from_secs(300), "the large broken rule set to be rejected", log_has("reload rejected")).await;

    std::fs::remove_file(&broken).unwrap();
    walbust.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(300), "the large rule set to be accepted", log_has("new rules accepted")).await;
    assert_eq!(walbust.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invalidate_command_applies_keys_patterns_and_tags_at_once() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let files = write_config(
        &db,
        &s.redis.url(),
        &format!("[[rule]]\nname = \"x\"\ntable = \"items\"\nkeys = [\"{n}:x\"]\n"),
        "",
    );
    let mut redis = redis_conn(&s.redis.url()).await;
    let all: Vec<String> = ["k", "p:1", "p:2", "member", "keep"].iter().map(|k| format!("{n}:{k}")).collect();
    cache(&mut redis, &all).await;
    let _: () = redis.sadd(format!("{n}:tag"), &all[3]).await.unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walbust"))
        .args(["invalidate", "--config"])
        .arg(&files.path)
        .args(["--key", &all[0], "--pattern", &format!("{n}:p:*"), "--tag", &format!("{n}:tag")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains(&format!("UNLINK {n}:k")) && printed.contains(&format!("BUST-TAG {n}:tag")), "{printed}");
    // k, p:1 and p:2, the tag's member and the tag set itself.
    assert!(printed.ends_with("5 keys deleted\n"), "the count of deleted keys is printed: {printed}");
    assert_eq!(existing(&mut redis, &all).await, [all[4].clone()]);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walbust"))
        .args(["invalidate", "--config"])
        .arg(&files.path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "nothing to do is a usage error");
}

//! What an operator sees: the Grafana dashboard and the alert rules name only metrics a
//! running walbust serves, /healthz finds a Redis that is down without waiting for a write,
//! and the logs say each thing once, plainly, at the right level.

use crate::support::{
    self, StderrLog, TestDb, Walbust, containing, free_port, fresh_db, http_get as get, wait_until, write_config_with,
};
use regex::Regex;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use walbust::offline::throwaway::{ThrowawayPostgres, ThrowawayRedis};
use walbust::telemetry::metrics;

fn repo_file(path: &str) -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (path, text)
}

/// PromQL's functions, aggregations and keywords: every other name in a query is a metric.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "resets",
    "changes",
    "histogram_quantile",
    "time",
    "vector",
    "scalar",
    "abs",
    "clamp_min",
    "clamp_max",
    "absent",
    "absent_over_time",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "sum_over_time",
    "last_over_time",
    "label_replace",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
];

/// The metric names a PromQL query (or a Grafana target) reads: what is left once strings,
/// label matchers, ranges, grouping clauses, Grafana variables, numbers and PromQL's own
/// words are taken out.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut text = expr.to_string();
    for pattern in [
        r#""(?:[^"\\]|\\.)*""#,
        r"'(?:[^'\\]|\\.)*'",
        r"\{[^}]*\}",
        r"\[[^\]]*\]",
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
        r"\$\{?\w+\}?",
        r"\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b",
    ] {
        text = Regex::new(pattern).unwrap().replace_all(&text, " ").into_owned();
    }
    let word = Regex::new(r"[A-Za-z_:][A-Za-z0-9_:]*").unwrap();
    word.find_iter(&text).map(|m| m.as_str()).filter(|w| !PROMQL_WORDS.contains(w)).map(str::to_string).collect()
}

/// The metric of walbust a series name belongs to: a histogram's `_bucket`, `_sum` and
/// `_count` series belong to the histogram.
fn walbust_metric(series: &str) -> Option<&'static str> {
    metrics::ALL.iter().copied().find(|&m| {
        series == m || ["_bucket", "_sum", "_count"].iter().any(|suffix| series.strip_suffix(suffix) == Some(m))
    })
}

/// Prometheus' own series for each scrape target, which alert rules may use besides walbust's.
const SCRAPE_SERIES: &[&str] = &["up"];

/// The queries of every panel of the dashboard, by panel title.
fn dashboard_queries() -> Vec<(String, Vec<String>)> {
    let (path, text) = repo_file("deploy/grafana/walbust.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    assert!(dashboard["title"].is_string() && dashboard["schemaVersion"].as_u64().is_some(), "not a dashboard");
    let panels = dashboard["panels"].as_array().expect("panels");
    // What Grafana needs to import it: unique panel ids, panels inside the 24-column grid,
    // and every data source reference to the dashboard's own data source variable.
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(variables.contains(&"datasource"), "no data source variable: {variables:?}");
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64().expect("a numeric panel id")), "duplicate id in {panel}");
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().expect("x"), grid["w"].as_u64().expect("w"));
        assert!(x + w <= 24 && grid["h"].as_u64().is_some_and(|h| h > 0), "off the grid: {panel}");
    }
    let mut queries = Vec::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().expect("every panel has a title").to_string();
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {title:?}'s data source");
        let exprs: Vec<String> = panel["targets"]
            .as_array()
            .map(|targets| targets.iter().filter_map(|t| t["expr"].as_str()).map(str::to_string).collect())
            .unwrap_or_default();
        assert!(!exprs.is_empty(), "panel {title:?} has no query");
        assert!(exprs.iter().all(|e| !e.trim().is_empty()), "panel {title:?} has an empty query");
        queries.push((title, exprs));
    }
    assert!(queries.len() >= 10, "a dashboard of {} panels", queries.len());
    queries
}

/// Each alert of the rules file: its name and its whole text.
fn alert_rules() -> Vec<(String, String)> {
    let (_, text) = repo_file("deploy/prometheus/walbust.rules.yml");
    let mut alerts = Vec::new();
    for block in text.split("- alert: ").skip(1) {
        let name = block.lines().next().expect("a name").trim().to_string();
        alerts.push((name, block.to_string()));
    }
    alerts
}

fn alert_expr(block: &str) -> String {
    block.lines().find_map(|l| l.trim().strip_prefix("expr: ")).expect("every alert has an expr").to_string()
}

#[test]
fn the_dashboard_parses_and_every_panel_queries_walbust_metrics_that_exist() {
    for (title, exprs) in dashboard_queries() {
        for expr in exprs {
            let names = metric_names(&expr);
            assert!(names.iter().any(|n| n.starts_with("walbust_")), "panel {title:?}: {expr} reads no walbust metric");
            for name in names {
                assert!(walbust_metric(&name).is_some(), "panel {title:?}: {name} is not a walbust metric ({expr})");
            }
        }
    }
}

#[test]
fn every_alert_has_for_severity_a_runbook_and_only_existing_metrics() {
    let (_, operations) = repo_file("docs/OPERATIONS.md");
    let alerts = alert_rules();
    for wanted in [
        "WalbustDown",
        "WalbustSlotLost",
        "WalbustSlotUnreserved",
        "WalbustRetainedWalNearLimit",
        "WalbustLagHigh",
        "WalbustInvalidationSlow",
        "WalbustRedisFailing",
        "WalbustNotStreaming",
        "WalbustNoHeartbeat",
    ] {
        assert!(alerts.iter().any(|(name, _)| name == wanted), "no alert {wanted}");
    }
    let (for_, severity) =
        (Regex::new(r"\n\s+for: \d+[smh]").unwrap(), Regex::new(r"\n\s+severity: (critical|warning)").unwrap());
    for (name, block) in &alerts {
        assert!(for_.is_match(block), "{name} has no `for:`");
        assert!(severity.is_match(block), "{name} has no severity");
        let anchor = format!("docs/OPERATIONS.md#{}", name.to_lowercase());
        assert!(block.contains(&format!("runbook_url: \"{anchor}\"")), "{name}'s runbook_url is not {anchor}");
        assert!(operations.contains(&format!("\n### {name}\n")), "docs/OPERATIONS.md has no runbook for {name}");
        let expr = alert_expr(block);
        for metric in metric_names(&expr) {
            assert!(
                walbust_metric(&metric).is_some() || SCRAPE_SERIES.contains(&metric.as_str()),
                "{name}: {metric} is not a walbust metric ({expr})"
            );
        }
    }
}

#[test]
fn the_query_parser_finds_metrics_and_skips_labels_functions_and_variables() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (instance, le) (rate(walbust_ack_lag_seconds_bucket{instance=~"$instance", x="a b"}[$__rate_interval]))) > 5e3 and on (job) up == 0"#,
    );
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["up", "walbust_ack_lag_seconds_bucket"]);
    assert_eq!(walbust_metric("walbust_ack_lag_seconds_bucket"), Some(metrics::ACK_LAG));
    assert_eq!(walbust_metric("walbust_no_such_thing"), None);
}

/// Every metric the dashboard or an alert reads, as walbust names it (histograms by base name).
fn metrics_in_use() -> BTreeSet<&'static str> {
    let mut exprs: Vec<String> = dashboard_queries().into_iter().flat_map(|(_, e)| e).collect();
    exprs.extend(alert_rules().iter().map(|(_, block)| alert_expr(block)));
    let mut used = BTreeSet::new();
    for expr in exprs {
        for name in metric_names(&expr) {
            if let Some(m) = walbust_metric(&name) {
                used.insert(m);
            }
        }
    }
    used
}

/// The metrics a scrape lists (by their `# TYPE` lines).
fn scraped(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_walbust_serves_every_metric_the_dashboard_and_the_alerts_use() {
    // A cluster with max_slot_wal_keep_size set, so the slot has a safe_wal_size; a Redis
    // without PUBLISH, so a publish action is refused for good and set aside.
    let mut options = support::postgres_options(&support::shared().certs);
    options.settings.push("max_slot_wal_keep_size = '1GB'".into());
    let pg =
        tokio::task::spawn_blocking(move || ThrowawayPostgres::start(&options)).await.unwrap().expect("own postgres");
    let redis = tokio::task::spawn_blocking(|| ThrowawayRedis::start_with_args(&["--rename-command", "PUBLISH", ""]))
        .await
        .unwrap()
        .expect("own redis");
    let db = fresh_db(&pg, "CREATE TABLE items (id int PRIMARY KEY); CREATE TABLE audit (id int PRIMARY KEY);").await;
    let n = &db.name;
    let rules = format!(
        "[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\npublish = [{{ channel = \"{n}:changed\" }}]\n"
    );
    let port = free_port();
    let files = write_config_with(
        &db,
        &redis.url(),
        &rules,
        "heartbeat_interval = \"200ms\"",
        "",
        &format!("127.0.0.1:{port}"),
    );
    let mut walbust = Walbust::spawn(&["--log-level", "info", "run", "--config"], &files.path, Stdio::piped());
    let log = StderrLog::capture(&mut walbust.0);
    log.wait_for("streaming changes", Duration::from_secs(60)).await;

    db.client
        .batch_execute(
            "INSERT INTO items VALUES (1); INSERT INTO audit VALUES (1); TRUNCATE items; \
             SELECT pg_logical_emit_message(true, 'walbust', 'not json');",
        )
        .await
        .expect("writes");
    walbust.signal(libc::SIGHUP);
    log.wait_for("reloaded rules", Duration::from_secs(60)).await;

    let used = metrics_in_use();
    let all_there = || async {
        let text = get(port, "/metrics").map(|(_, body)| body).unwrap_or_default();
        let have = scraped(&text);
        used.iter().all(|m| have.contains(*m))
    };
    let deadline = Duration::from_secs(60);
    if tokio::time::timeout(deadline, async {
        while !all_there().await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .is_err()
    {
        let have = scraped(&get(port, "/metrics").map(|(_, body)| body).unwrap_or_default());
        let missing: Vec<_> = used.iter().filter(|m| !have.contains(**m)).collect();
        panic!("after {deadline:?}, /metrics still lacks {missing:?}");
    }
    assert!(used.len() >= 20, "the dashboard and alerts use {} metrics: {used:?}", used.len());
    assert_eq!(walbust.terminate(), Some(0));
}

/// Starts walbust with `--log-level filter` on `db`, its stderr captured.
fn spawn_logged(filter: &str, files: &support::ConfigFiles) -> (Walbust, StderrLog) {
    let mut walbust = Walbust::spawn(&["--log-level", filter, "run", "--config"], &files.path, Stdio::piped());
    let log = StderrLog::capture(&mut walbust.0);
    (walbust, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_redis_is_down_at_start_without_a_write_and_recovers_within_seconds() {
    let s = support::shared();
    let mut redis = tokio::task::spawn_blocking(ThrowawayRedis::start).await.unwrap().expect("own redis");
    redis = tokio::task::spawn_blocking(move || {
        redis.stop().expect("stop redis");
        redis
    })
    .await
    .unwrap();
    let db = fresh_db(&s.pg, "CREATE TABLE items (id int PRIMARY KEY);").await;
    let rules = format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{}:item:{{id}}\"]\n", db.name);
    let port = free_port();
    let files = write_config_with(&db, &redis.url(), &rules, "", "", &format!("127.0.0.1:{port}"));
    let (walbust, log) = spawn_logged("info", &files);

    let redis_down = move || async move {
        get(port, "/healthz").is_some_and(|(code, body)| code == 503 && body.contains("redis unreachable"))
    };
    wait_until(Duration::from_secs(10), "/healthz to say Redis is unreachable, with no write", redis_down).await;
    let (_, body) = get(port, "/healthz").expect("healthz");
    assert!(body.contains("failed while answering a ping"), "the reason: {body}");
    // Streaming starts meanwhile; only Redis keeps it unhealthy.
    let only_redis = move || async move {
        get(port, "/healthz").is_some_and(|(code, body)| code == 503 && !body.contains("not streaming"))
    };
    wait_until(Duration::from_secs(60), "walbust to stream while Redis is down", only_redis).await;

    let _redis = tokio::task::spawn_blocking(move || {
        redis.start_again().expect("start redis");
        redis
    })
    .await
    .unwrap();
    let healthy = move || async move { get(port, "/healthz").is_some_and(|(code, _)| code == 200) };
    wait_until(Duration::from_secs(10), "/healthz to turn healthy after Redis started", healthy).await;
    let text = get(port, "/metrics").expect("metrics").1;
    assert!(text.contains("\nwalbust_redis_reachable 1\n") && text.contains("\nwalbust_streaming 1\n"), "{text}");
    log.wait_for("redis reachable again after", Duration::from_secs(30)).await;
    assert_eq!(walbust.terminate(), Some(0));

    let lines = log.read_to_end();
    assert!(lines.iter().all(|l| !l.contains('\u{1b}')), "no colour codes into a pipe:\n{}", lines.join("\n"));
    let pings = containing(&lines, "redis does not answer a ping");
    // Pings fail every second while Redis is down; the outage is logged when it starts (and
    // again only after a minute).
    assert!((1..=2).contains(&pings.len()), "the outage is logged once when it starts:\n{}", lines.join("\n"));
    assert!(pings[0].contains(" WARN "), "{}", pings[0]);
    assert!(
        !pings[0].contains("(os error 111): Connection refused (os error 111)"),
        "the cause is said once: {}",
        pings[0]
    );
    let stopped = containing(&lines, "stopped; everything applied is acknowledged");
    assert_eq!(stopped.len(), 1, "{}", lines.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_one_debug_line_without_keys_and_its_keys_show_only_at_trace() {
    let s = support::shared();
    let schema = "CREATE TABLE items (id int PRIMARY KEY); CREATE TABLE audit (id int PRIMARY KEY);";
    for (filter, keys_shown) in
        [("info,walbust::transactions=debug", false), ("info,walbust::transactions=trace", true)]
    {
        let db: TestDb = fresh_db(&s.pg, schema).await;
        let n = db.name.clone();
        let rules = format!("[[rule]]\nname = \"item cache\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\n");
        let files = write_config_with(&db, &s.redis.url(), &rules, "", "", "off");
        let (walbust, log) = spawn_logged(filter, &files);
        log.wait_for("streaming changes", Duration::from_secs(60)).await;
        db.client
            .batch_execute("BEGIN; INSERT INTO items VALUES (41), (42); INSERT INTO audit VALUES (1); COMMIT;")
            .await
            .expect("a transaction");
        log.wait_for(" transaction ", Duration::from_secs(60)).await;
        assert_eq!(walbust.terminate(), Some(0));
        let lines = log.read_to_end();
        let transaction = containing(&lines, " transaction ");
        assert_eq!(transaction.len(), 1, "{}", lines.join("\n"));
        let line = &transaction[0];
        assert!(line.contains(" DEBUG "), "{line}");
        assert!(line.contains("public.items insert x2, public.audit insert"), "{line}");
        assert!(line.contains("rules=item cache") && line.contains("actions=2") && line.contains("lsn="), "{line}");
        let key = format!("{n}:item:42");
        assert!(!line.contains(&key), "no keys at debug: {line}");
        assert_eq!(
            lines.iter().any(|l| l.contains(&key)),
            keys_shown,
            "keys only at trace ({filter}):\n{}",
            lines.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_backend_is_a_warning_with_its_sqlstate_and_streaming_resumes_with_the_outage_length() {
    let s = support::shared();
    let db = fresh_db(&s.pg, "CREATE TABLE items (id int PRIMARY KEY);").await;
    let rules = format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{}:item:{{id}}\"]\n", db.name);
    let files = write_config_with(&db, &s.redis.url(), &rules, "heartbeat_interval = \"200ms\"", "", "off");
    let (walbust, log) = spawn_logged("info", &files);
    log.wait_for("streaming changes", Duration::from_secs(60)).await;
    // Every backend of walbust in this database: the walsender and the heartbeat's connection.
    let walbust_backends = || async {
        db.client
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() \
                 AND backend_type IN ('walsender', 'client backend')",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .len()
            >= 2
    };
    wait_until(Duration::from_secs(60), "the walsender and the heartbeat connection", walbust_backends).await;
    db.client
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND backend_type IN ('walsender', 'client backend')",
        )
        .await
        .expect("terminate");
    log.wait_for("streaming changes again after", Duration::from_secs(60)).await;
    log.wait_for("heartbeat written again after", Duration::from_secs(60)).await;
    log.wait_for("57P01", Duration::from_secs(60)).await;
    assert_eq!(walbust.terminate(), Some(0));

    let lines = log.read_to_end();
    let all = lines.join("\n");
    let sqlstate = containing(&lines, "57P01");
    assert!(sqlstate.iter().all(|l| l.contains(" WARN ")), "a transient failure is a warning:\n{all}");
    assert!(
        sqlstate.iter().any(|l| l.contains("terminating connection due to administrator command")),
        "the server's message:\n{all}"
    );
    assert!(lines.iter().all(|l| !l.contains("db error")), "never a bare `db error`:\n{all}");
    let interrupted = containing(&lines, "replication interrupted");
    assert_eq!(interrupted.len(), 1, "{all}");
    assert!(
        interrupted[0].contains("the replication stream failed") && !interrupted[0].contains("connection failed"),
        "a stream cut mid-way is no connection failure: {}",
        interrupted[0]
    );
}

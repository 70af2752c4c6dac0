//! Prometheus metrics, kept in a `prometheus-client` registry and rendered in the text
//! format (version 0.0.4), which every Prometheus version scrapes.
//!
//! One [`Metrics`] is shared by the pipeline, the slot monitor and the HTTP server
//! ([`crate::telemetry::health`]). Every update is an atomic operation or a short lock; labelled
//! counters are [`Counter`] handles (an `Arc` around one atomic) that the caller caches per
//! relation or rule binding in a [`CounterCache`], so the per-change path never hashes label
//! strings or takes the registry's lock. Labels carry only rule names, table names, ops,
//! action kinds and widening reasons, never keys or row values, so the number of series
//! stays small and nothing private leaks into scrapes.

use crate::postgres::WalStatus;
use crate::postgres::lsn::Lsn;
use foldhash::HashMap;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A monotonically increasing count; cheap to clone and to increment from any thread.
pub type Counter = prometheus_client::metrics::counter::Counter;
/// The content type of what [`Metrics::render`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Gauge: the end of the last WAL record received from the server, as a byte position.
pub const RECEIVED_LSN: &str = "walbust_received_lsn_bytes";
/// Gauge: the position last reported to the server as flushed (every action before it applied).
pub const FLUSHED_LSN: &str = "walbust_flushed_lsn_bytes";
/// Gauge: the server's current WAL end minus the flushed position.
pub const LAG: &str = "walbust_lag_bytes";
/// Histogram: seconds from a transaction's commit on the server to walbust acknowledging it.
pub const ACK_LAG: &str = "walbust_ack_lag_seconds";
/// Histogram: seconds from a transaction's commit on the server to its Commit message
/// reaching walbust: the server's and the network's part of [`ACK_LAG`].
pub const RECEIVE_LAG: &str = "walbust_receive_lag_seconds";
/// Counter, labels `table` and `op`: row changes routed (a TRUNCATE counts once per table).
pub const CHANGES: &str = "walbust_changes_total";
/// Counter: commits seen on the stream.
pub const COMMITS: &str = "walbust_commits_total";
/// Counter, labels `rule` and `kind`: actions produced, before deduplication; those of manual
/// invalidation messages under the rule `(manual message)`.
pub const ACTIONS: &str = "walbust_actions_total";
/// Counter, labels `rule` and `reason`: actions widened to a pattern because a value was missing.
pub const WIDENED: &str = "walbust_widened_actions_total";
/// Counter, labels `rule` and `kind`: actions Redis refused for good (an error reply that
/// retrying cannot fix), set aside as dead letters so the stream goes on.
pub const DEAD_LETTERS: &str = "walbust_dead_letters_total";
/// Counter, label `reason`: actions of manual invalidation messages refused (outside
/// `manual_prefixes`, a match-everything pattern, too long) or whole messages skipped (malformed).
pub const MANUAL_REFUSED: &str = "walbust_manual_refused_total";
/// Counter: batches Redis acknowledged.
pub const BATCHES: &str = "walbust_batches_total";
/// Counter: failed batch applies to Redis (each is retried).
pub const REDIS_ERRORS: &str = "walbust_redis_errors_total";
/// Histogram: seconds one batch apply to Redis took, successful or not.
pub const REDIS_APPLY: &str = "walbust_redis_apply_seconds";
/// Counter: replication reconnects.
pub const RECONNECTS: &str = "walbust_reconnects_total";
/// Gauge: 1 while this instance holds the slot (the active one), 0 while it stands by or
/// reconnects.
pub const ACTIVE: &str = "walbust_active";
/// Gauge: WAL the slot keeps on the server (current WAL position minus `restart_lsn`).
pub const SLOT_RETAINED_WAL: &str = "walbust_slot_retained_wal_bytes";
/// Gauge, label `status`: 1 for the slot's current `wal_status`, 0 for the others.
pub const SLOT_WAL_STATUS: &str = "walbust_slot_wal_status";
/// Gauge: WAL that can still be written before the slot is in danger of being lost.
pub const SLOT_SAFE_WAL_SIZE: &str = "walbust_slot_safe_wal_size_bytes";
/// Counter: manual invalidation messages read from the stream, malformed ones included.
pub const MANUAL_MESSAGES: &str = "walbust_manual_messages_total";
/// Counter: rule sets swapped in after a reload.
pub const RELOADS: &str = "walbust_rule_reloads_total";
/// Counter: heartbeats this process wrote that came back through the replication stream.
pub const HEARTBEATS: &str = "walbust_heartbeats_total";
/// Gauge: Unix time carried by the last heartbeat that came back through the replication stream.
pub const LAST_HEARTBEAT: &str = "walbust_last_heartbeat_timestamp_seconds";
/// Counter: reloads (SIGHUP) rejected because the config or the rules had an error; the
/// rules in use stayed.
pub const RELOAD_FAILURES: &str = "walbust_rule_reload_failures_total";
/// Gauge: Unix time of the last rule set swapped in after a reload.
pub const LAST_RELOAD: &str = "walbust_last_rule_reload_timestamp_seconds";
/// Gauge: 1 while the replication stream is running, 0 otherwise.
pub const STREAMING: &str = "walbust_streaming";
/// Gauge: 1 while Redis answers (the last batch or ping succeeded), 0 otherwise.
pub const REDIS_REACHABLE: &str = "walbust_redis_reachable";
/// Counter: keys Redis reported deleted (unlinked keys that existed, keys of pattern
/// deletes, tag sets and their members).
pub const DELETED_KEYS: &str = "walbust_redis_deleted_keys_total";
/// Counter: keys `SCAN` returned for pattern actions.
pub const SCANNED_KEYS: &str = "walbust_redis_scanned_keys_total";
/// Histogram: seconds one pattern action took, over all its `SCAN` pages.
pub const SCAN: &str = "walbust_redis_scan_seconds";
/// Counter, label `table`: row changes that no rule turned into an action.
pub const UNMATCHED: &str = "walbust_unmatched_changes_total";
/// Gauge, label `version`: always 1; the version of this walbust.
pub const BUILD_INFO: &str = "walbust_build_info";
/// Gauge: this process's resident memory in bytes (Linux).
pub const PROCESS_RESIDENT_MEMORY: &str = "walbust_process_resident_memory_bytes";
/// Counter: CPU time this process used, user and system, in seconds (Linux).
pub const PROCESS_CPU: &str = "walbust_process_cpu_seconds_total";
/// Gauge: when this process started, in Unix seconds (Linux).
pub const PROCESS_START_TIME: &str = "walbust_process_start_time_seconds";

/// Every metric name walbust can expose, in the order a scrape lists them (histograms by
/// their base name): the dashboard and alert rule checks accept no other.
pub const ALL: &[&str] = &[
    BUILD_INFO,
    PROCESS_START_TIME,
    PROCESS_RESIDENT_MEMORY,
    PROCESS_CPU,
    STREAMING,
    REDIS_REACHABLE,
    RECEIVED_LSN,
    FLUSHED_LSN,
    LAG,
    ACK_LAG,
    RECEIVE_LAG,
    CHANGES,
    UNMATCHED,
    COMMITS,
    ACTIONS,
    WIDENED,
    DEAD_LETTERS,
    MANUAL_MESSAGES,
    MANUAL_REFUSED,
    BATCHES,
    REDIS_ERRORS,
    REDIS_APPLY,
    DELETED_KEYS,
    SCANNED_KEYS,
    SCAN,
    RECONNECTS,
    ACTIVE,
    RELOADS,
    RELOAD_FAILURES,
    LAST_RELOAD,
    SLOT_RETAINED_WAL,
    SLOT_WAL_STATUS,
    SLOT_SAFE_WAL_SIZE,
    HEARTBEATS,
    LAST_HEARTBEAT,
    APPLIED_LSN,
    GATE_HELD,
    GATE_WAIT,
    GATE_QUERY,
    GATE_BYPASSED,
    REDELETES_PENDING,
    REDELETES_APPLIED,
    REDELETES_EARLY,
    WAIT_CALLS,
];
/// Position where every first delete is applied: the status update's write position.
pub const APPLIED_LSN: &str = "walbust_applied_lsn_bytes";
/// Transactions the visibility gate found not yet visible, and held.
pub const GATE_HELD: &str = "walbust_gate_held_transactions_total";
/// How long the visibility gate held a batch whose transactions were not yet visible.
pub const GATE_WAIT: &str = "walbust_gate_wait_seconds";
/// How long each of the visibility gate's snapshot queries took to answer.
pub const GATE_QUERY: &str = "walbust_gate_query_seconds";
/// Batches applied without the visibility gate, by reason.
pub const GATE_BYPASSED: &str = "walbust_gate_bypassed_total";
/// The `reason` label values of [`GATE_BYPASSED`]: the gate's connection is down; walbust's
/// walsender is a synchronous standby.
pub const BYPASS_REASONS: [&str; 2] = [BYPASS_CONNECTION, BYPASS_SYNCHRONOUS_WALSENDER];
/// [`GATE_BYPASSED`]'s reason when the gate has no connection.
pub const BYPASS_CONNECTION: &str = "connection";
/// [`GATE_BYPASSED`]'s reason when walbust's walsender is a synchronous standby.
pub const BYPASS_SYNCHRONOUS_WALSENDER: &str = "synchronous_walsender";
/// Second deletes waiting for their time.
pub const REDELETES_PENDING: &str = "walbust_redeletes_pending";
/// Second deletes applied.
pub const REDELETES_APPLIED: &str = "walbust_redeletes_applied_total";
/// Second deletes applied before their time because the queue was at its memory bound.
pub const REDELETES_EARLY: &str = "walbust_redeletes_early_total";
/// `walbust.wait()` calls on the server, by result, as the server counts them.
pub const WAIT_CALLS: &str = "walbust_wait_calls_total";

/// Bucket bounds of [`GATE_WAIT`], in seconds.
pub const GATE_WAIT_BUCKETS: &[f64] =
    &[0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0];

/// Bucket bounds of [`GATE_QUERY`], in seconds: a round trip on the same host is tens of
/// microseconds; past its 2 s timeout the gate lets batches through.
pub const GATE_QUERY_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0];

/// Bucket bounds of [`ACK_LAG`] and [`RECEIVE_LAG`], in seconds.
pub const ACK_LAG_BUCKETS: &[f64] =
    &[0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// Bucket bounds of [`REDIS_APPLY`] and [`SCAN`], in seconds.
pub const REDIS_APPLY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// [`Counter`] handles found again by a small key (an OID and op, a rule's address and an
/// action kind), hashed with foldhash rather than SipHash: the per-change path
/// counts without hashing label strings or taking the registry's lock. Two keys resolving
/// to the same label set share one counter, so a key only has to be stable, not unique.
#[derive(Debug)]
pub struct CounterCache<K> {
    map: HashMap<K, Counter>,
}

impl<K: Hash + Eq> Default for CounterCache<K> {
    fn default() -> Self {
        CounterCache { map: HashMap::default() }
    }
}

impl<K: Hash + Eq> CounterCache<K> {
    /// The counter for `key`, resolved by `make` the first time.
    pub fn get(&mut self, key: K, make: impl FnOnce() -> Counter) -> &Counter {
        self.map.entry(key).or_insert_with(make)
    }

    /// Forgets every handle (the counters themselves keep their counts in the registry).
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// What the slot monitor last read about the replication slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotHealth {
    /// `pg_current_wal_lsn() - restart_lsn`: WAL the server keeps for the slot.
    pub retained_wal_bytes: Option<u64>,
    /// `wal_status`; `None` when the server did not say.
    pub wal_status: Option<WalStatus>,
    /// `safe_wal_size`; `None` when unlimited (`max_slot_wal_keep_size = -1`) or lost.
    pub safe_wal_size_bytes: Option<i64>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableOp {
    table: String,
    op: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleKind {
    rule: String,
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleReason {
    rule: String,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Table {
    table: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: String,
}

/// The counters of one labelled metric, one per label set, made on first use. Each is
/// also kept in a list, so their sum is read without a scrape.
#[derive(Debug)]
struct Labelled<L> {
    family: Family<L, Counter, Made>,
    made: Made,
}

/// Makes the counters of a [`Labelled`] metric and keeps a handle to each.
#[derive(Debug, Clone, Default)]
struct Made(Arc<Mutex<Vec<Counter>>>);

impl MetricConstructor<Counter> for Made {
    fn new_metric(&self) -> Counter {
        let counter = Counter::default();
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(counter.clone());
        counter
    }
}

impl<L: Clone + Hash + Eq> Default for Labelled<L> {
    fn default() -> Self {
        let made = Made::default();
        Labelled { family: Family::new_with_constructor(made.clone()), made }
    }
}

impl<L: Clone + Hash + Eq> Labelled<L> {
    /// The counter of `labels`, made the first time.
    fn counter(&self, labels: L) -> Counter {
        self.family.get_or_create_owned(&labels)
    }

    /// The count of `labels`; 0 when never counted.
    fn count(&self, labels: &L) -> u64 {
        self.family.get(labels).map_or(0, |c| c.get())
    }

    /// The sum over every label set.
    fn total(&self) -> u64 {
        self.made.0.lock().unwrap_or_else(|e| e.into_inner()).iter().map(Counter::get).sum()
    }
}

/// A gauge read when scraped: no sample, and no HELP or TYPE either, while `read` says `None`.
struct Computed<N> {
    read: Box<dyn Fn() -> Option<N> + Send + Sync>,
}

impl<N> Computed<N> {
    fn new(read: impl Fn() -> Option<N> + Send + Sync + 'static) -> Self {
        Computed { read: Box::new(read) }
    }
}

impl<N> std::fmt::Debug for Computed<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Computed").finish_non_exhaustive()
    }
}

impl<N: prometheus_client::encoding::EncodeGaugeValue> EncodeMetric for Computed<N> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        match (self.read)() {
            Some(value) => encoder.encode_gauge(&value),
            None => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }

    fn is_empty(&self) -> bool {
        (self.read)().is_none()
    }
}

/// A counter read when scraped, as [`Computed`] is a gauge.
struct ComputedCounter(Box<dyn Fn() -> Option<f64> + Send + Sync>);

impl std::fmt::Debug for ComputedCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputedCounter").finish_non_exhaustive()
    }
}

impl EncodeMetric for ComputedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        match (self.0)() {
            Some(value) => encoder.encode_counter::<NoLabelSet, _, u64>(&value, None),
            None => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }

    fn is_empty(&self) -> bool {
        (self.0)().is_none()
    }
}

/// [`BUILD_INFO`]: one series, its `version` label this crate's version, always 1.
#[derive(Debug)]
struct BuildInfo;

impl EncodeMetric for BuildInfo {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?.encode_gauge(&1i64)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// A gauge of what the slot monitor last read; no sample while `field` is unknown.
fn slot_gauge<N: 'static>(slot: &Arc<Mutex<Option<SlotHealth>>>, field: fn(&SlotHealth) -> Option<N>) -> Computed<N> {
    let slot = slot.clone();
    Computed::new(move || slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(field))
}

/// [`SLOT_WAL_STATUS`]: one series per `wal_status`, in [`WalStatus::ALL`] order, 1 for the
/// current one; none while the slot's status is unknown.
#[derive(Debug)]
struct WalStatusGauge(Arc<Mutex<Option<SlotHealth>>>);

impl WalStatusGauge {
    fn current(&self) -> Option<WalStatus> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|s| s.wal_status)
    }
}

impl EncodeMetric for WalStatusGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let Some(current) = self.current() else { return Ok(()) };
        for status in WalStatus::ALL {
            encoder.encode_family(&[("status", status.as_str())])?.encode_gauge(&i64::from(status == current))?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }

    fn is_empty(&self) -> bool {
        self.current().is_none()
    }
}

/// Every walbust metric. Create one with [`Metrics::new`] and share it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    received_lsn: Gauge<u64, AtomicU64>,
    flushed_lsn: Gauge<u64, AtomicU64>,
    server_wal_end: Arc<AtomicU64>,
    ack_lag: Histogram,
    receive_lag: Histogram,
    changes: Labelled<TableOp>,
    commits: Counter,
    actions: Labelled<RuleKind>,
    widened: Labelled<RuleReason>,
    dead_letters: Labelled<RuleKind>,
    manual_messages: Counter,
    manual_refused: Labelled<Reason>,
    batches: Counter,
    redis_errors: Counter,
    redis_apply: Histogram,
    reconnects: Counter,
    active: Gauge,
    reloads: Counter,
    slot: Arc<Mutex<Option<SlotHealth>>>,
    heartbeats: Counter,
    // f64 bits of the Unix time; 0 means never.
    heartbeat: Arc<AtomicU64>,
    reload_failures: Counter,
    // f64 bits of the Unix time; 0 means never.
    last_reload: Arc<AtomicU64>,
    streaming: Gauge,
    redis_reachable: Gauge,
    deleted_keys: Counter,
    scanned_keys: Counter,
    scan: Histogram,
    unmatched: Labelled<Table>,
    applied_lsn: Gauge<u64, AtomicU64>,
    gate_held: Counter,
    gate_wait: Histogram,
    gate_query: Histogram,
    gate_bypassed: Labelled<Reason>,
    redeletes_pending: Gauge<u64, AtomicU64>,
    redeletes_applied: Counter,
    redeletes_early: Counter,
    wait_calls: Labelled<Outcome>,
}

/// Lag from the server's WAL end and the flushed position; `None` until both are known.
fn lag(server_wal_end: u64, flushed: u64) -> Option<u64> {
    (server_wal_end != 0 && flushed != 0).then(|| server_wal_end.saturating_sub(flushed))
}

/// Registers `metric` as `name` (the crate adds a counter's `_total` itself) with `help`
/// (the crate adds the full stop).
fn register(registry: &mut Registry, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
    let name = match metric.metric_type() {
        MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    };
    registry.register(name, help.strip_suffix('.').unwrap_or(help), metric);
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Registry::default(),
            received_lsn: Gauge::default(),
            flushed_lsn: Gauge::default(),
            server_wal_end: Arc::default(),
            ack_lag: Histogram::new(ACK_LAG_BUCKETS.iter().copied()),
            receive_lag: Histogram::new(ACK_LAG_BUCKETS.iter().copied()),
            changes: Labelled::default(),
            commits: Counter::default(),
            actions: Labelled::default(),
            widened: Labelled::default(),
            dead_letters: Labelled::default(),
            manual_messages: Counter::default(),
            manual_refused: Labelled::default(),
            batches: Counter::default(),
            redis_errors: Counter::default(),
            redis_apply: Histogram::new(REDIS_APPLY_BUCKETS.iter().copied()),
            reconnects: Counter::default(),
            active: Gauge::default(),
            reloads: Counter::default(),
            slot: Arc::default(),
            heartbeats: Counter::default(),
            heartbeat: Arc::default(),
            reload_failures: Counter::default(),
            last_reload: Arc::default(),
            streaming: Gauge::default(),
            redis_reachable: Gauge::default(),
            deleted_keys: Counter::default(),
            scanned_keys: Counter::default(),
            scan: Histogram::new(REDIS_APPLY_BUCKETS.iter().copied()),
            unmatched: Labelled::default(),
            applied_lsn: Gauge::default(),
            gate_held: Counter::default(),
            gate_wait: Histogram::new(GATE_WAIT_BUCKETS.iter().copied()),
            gate_query: Histogram::new(GATE_QUERY_BUCKETS.iter().copied()),
            gate_bypassed: Labelled::default(),
            redeletes_pending: Gauge::default(),
            redeletes_applied: Counter::default(),
            redeletes_early: Counter::default(),
            wait_calls: Labelled::default(),
        };
        // Every reason exists from the start at 0, so that `increase()` sees the first one.
        for reason in BYPASS_REASONS {
            m.gate_bypassed.counter(Reason { reason: reason.to_string() });
        }
        m.registered()
    }
}
impl Metrics {
    /// A fresh registry, every count at zero.
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// Registers every metric, in the order a scrape lists them.
    fn registered(mut self) -> Self {
        let r = &mut self.registry;
        register(r, BUILD_INFO, "Always 1; the label version is this walbust's version.", BuildInfo);
        register(
            r,
            PROCESS_START_TIME,
            "When this process started, in Unix seconds.",
            Computed::new(crate::telemetry::process::start_time_seconds),
        );
        register(
            r,
            PROCESS_RESIDENT_MEMORY,
            "Resident memory of this process, in bytes.",
            Computed::new(|| crate::telemetry::process::stat().map(|s| s.resident_bytes)),
        );
        register(
            r,
            PROCESS_CPU,
            "CPU time this process used, user and system, in seconds.",
            ComputedCounter(Box::new(|| crate::telemetry::process::stat().map(|s| s.cpu_seconds))),
        );
        register(r, STREAMING, "1 while the replication stream is running, else 0.", self.streaming.clone());
        register(
            r,
            REDIS_REACHABLE,
            "1 while Redis answers (the last batch or ping succeeded), else 0.",
            self.redis_reachable.clone(),
        );
        register(
            r,
            RECEIVED_LSN,
            "End of the last WAL received from the server, as a byte position.",
            self.received_lsn.clone(),
        );
        register(
            r,
            FLUSHED_LSN,
            "Position last reported to the server as flushed: every action before it is applied in Redis.",
            self.flushed_lsn.clone(),
        );
        let (server, flushed) = (self.server_wal_end.clone(), self.flushed_lsn.clone());
        register(
            r,
            LAG,
            "Server's current WAL end minus the flushed position, in bytes.",
            Computed::new(move || lag(server.load(Ordering::Relaxed), flushed.get())),
        );
        register(r, ACK_LAG, "Seconds from a commit on the server to walbust acknowledging it.", self.ack_lag.clone());
        register(
            r,
            RECEIVE_LAG,
            "Seconds from a commit on the server to its Commit message reaching walbust.",
            self.receive_lag.clone(),
        );
        register(
            r,
            CHANGES,
            "Row changes routed, by table and op (a TRUNCATE counts once per table).",
            self.changes.family.clone(),
        );
        register(
            r,
            UNMATCHED,
            "Row changes that no rule turned into an action, by table.",
            self.unmatched.family.clone(),
        );
        register(r, COMMITS, "Commits seen on the replication stream.", self.commits.clone());
        register(
            r,
            ACTIONS,
            "Invalidation actions produced, by rule and kind, before deduplication; rule \"(manual message)\" for manual invalidation messages.",
            self.actions.family.clone(),
        );
        register(
            r,
            WIDENED,
            "Actions widened to a pattern because a value was missing, by rule and reason.",
            self.widened.family.clone(),
        );
        register(
            r,
            DEAD_LETTERS,
            "Actions Redis refused for good (an error reply retrying cannot fix), by rule and kind; the stream went on.",
            self.dead_letters.family.clone(),
        );
        register(
            r,
            MANUAL_MESSAGES,
            "Manual invalidation messages read from the replication stream, malformed ones included.",
            self.manual_messages.clone(),
        );
        register(
            r,
            MANUAL_REFUSED,
            "Refused parts of manual invalidation messages, by reason.",
            self.manual_refused.family.clone(),
        );
        register(r, BATCHES, "Batches Redis acknowledged.", self.batches.clone());
        register(r, REDIS_ERRORS, "Failed batch applies to Redis; each is retried.", self.redis_errors.clone());
        register(r, REDIS_APPLY, "Seconds one batch apply to Redis took, successful or not.", self.redis_apply.clone());
        register(
            r,
            DELETED_KEYS,
            "Keys Redis reported deleted: unlinked keys that existed, keys of pattern deletes, tag sets and their members.",
            self.deleted_keys.clone(),
        );
        register(r, SCANNED_KEYS, "Keys SCAN returned for pattern actions.", self.scanned_keys.clone());
        register(r, SCAN, "Seconds one pattern action took, over all its SCAN pages.", self.scan.clone());
        register(r, RECONNECTS, "Replication reconnects.", self.reconnects.clone());
        register(
            r,
            ACTIVE,
            "1 while this instance holds the slot and streams (the active one); 0 while it stands by or reconnects.",
            self.active.clone(),
        );
        register(r, RELOADS, "Rule sets swapped in after a reload.", self.reloads.clone());
        register(
            r,
            RELOAD_FAILURES,
            "Reloads rejected because the config or the rules had an error; the rules in use stayed.",
            self.reload_failures.clone(),
        );
        let last_reload = self.last_reload.clone();
        register(
            r,
            LAST_RELOAD,
            "Unix time of the last rule set swapped in after a reload.",
            Computed::new(move || Some(f64::from_bits(last_reload.load(Ordering::Relaxed))).filter(|&t| t > 0.0)),
        );
        register(
            r,
            SLOT_RETAINED_WAL,
            "WAL the server keeps for the slot: current position minus restart_lsn.",
            slot_gauge(&self.slot, |s| s.retained_wal_bytes),
        );
        register(
            r,
            SLOT_WAL_STATUS,
            "1 for the slot's wal_status, 0 for the others.",
            WalStatusGauge(self.slot.clone()),
        );
        register(
            r,
            SLOT_SAFE_WAL_SIZE,
            "WAL that can be written before the slot risks being lost; absent when unlimited.",
            slot_gauge(&self.slot, |s| s.safe_wal_size_bytes),
        );
        register(
            r,
            HEARTBEATS,
            "Heartbeats this process wrote that came back through the replication stream.",
            self.heartbeats.clone(),
        );
        let heartbeat = self.heartbeat.clone();
        register(
            r,
            LAST_HEARTBEAT,
            "Unix time carried by the last heartbeat that came back through the replication stream.",
            Computed::new(move || Some(f64::from_bits(heartbeat.load(Ordering::Relaxed))).filter(|&t| t > 0.0)),
        );
        register(
            r,
            APPLIED_LSN,
            "Position where every first delete is applied in Redis (the status update's write position, which walbust.wait() waits for).",
            self.applied_lsn.clone(),
        );
        register(
            r,
            GATE_HELD,
            "Transactions the visibility gate held because they were not yet visible to new snapshots.",
            self.gate_held.clone(),
        );
        register(
            r,
            GATE_WAIT,
            "Seconds the visibility gate held a batch until its transactions were visible.",
            self.gate_wait.clone(),
        );
        register(
            r,
            GATE_QUERY,
            "Seconds each of the visibility gate's snapshot queries took to answer.",
            self.gate_query.clone(),
        );
        register(
            r,
            GATE_BYPASSED,
            "Batches applied without the visibility gate, by reason (connection: the gate's SQL connection was down; synchronous_walsender: walbust is a synchronous standby).",
            self.gate_bypassed.family.clone(),
        );
        register(
            r,
            REDELETES_PENDING,
            "Second deletes waiting for redelete_after to pass.",
            self.redeletes_pending.clone(),
        );
        register(r, REDELETES_APPLIED, "Second deletes applied.", self.redeletes_applied.clone());
        register(
            r,
            REDELETES_EARLY,
            "Second deletes applied before redelete_after had passed because the queue was at its memory bound.",
            self.redeletes_early.clone(),
        );
        register(
            r,
            WAIT_CALLS,
            "walbust.wait() calls on the server, by result (answered or timed_out), as the server's counters show them.",
            self.wait_calls.family.clone(),
        );
        self
    }

    /// Records the end of the last WAL received; only ever moves forward.
    pub fn set_received(&self, lsn: Lsn) {
        self.received_lsn.inner().fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// Records the position reported to the server as flushed; only ever moves forward.
    pub fn set_flushed(&self, lsn: Lsn) {
        self.flushed_lsn.inner().fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// Records the server's current WAL end (from a keepalive's or XLogData's `wal_end`,
    /// or `pg_current_wal_lsn()`); the lag gauge is this minus the flushed position.
    pub fn set_server_wal_end(&self, lsn: Lsn) {
        self.server_wal_end.fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// The flushed position recorded so far.
    pub fn flushed(&self) -> Lsn {
        Lsn(self.flushed_lsn.get())
    }

    /// The received position recorded so far.
    pub fn received(&self) -> Lsn {
        Lsn(self.received_lsn.get())
    }

    /// Bytes of WAL the server has written that walbust has not acknowledged; `None`
    /// until both positions are known.
    pub fn lag_bytes(&self) -> Option<u64> {
        lag(self.server_wal_end.load(Ordering::Relaxed), self.flushed_lsn.get())
    }

    /// Records the time from a commit on the server to its acknowledgement.
    pub fn observe_ack_lag(&self, lag: Duration) {
        self.ack_lag.observe(lag.as_secs_f64());
    }

    /// Records the time from a commit on the server to its Commit message arriving.
    pub fn observe_receive_lag(&self, lag: Duration) {
        self.receive_lag.observe(lag.as_secs_f64());
    }

    /// Counts one routed change of `table` (`schema.table`) by `op` (`insert`, ...).
    pub fn changes(&self, table: &str, op: &str) {
        self.changes_counter(table, op).inc();
    }

    /// The counter behind [`changes`](Self::changes), to cache per relation and op.
    pub fn changes_counter(&self, table: &str, op: &str) -> Counter {
        self.changes.counter(TableOp { table: table.into(), op: op.into() })
    }

    /// Counts one commit.
    pub fn commit(&self) {
        self.commits.inc();
    }

    /// Counts `n` actions of `kind` (`unlink`, `scan_unlink`, ...) produced by `rule`.
    pub fn actions(&self, rule: &str, kind: &str, n: u64) {
        self.actions_counter(rule, kind).inc_by(n);
    }

    /// The counter behind [`actions`](Self::actions), to cache per rule and kind.
    pub fn actions_counter(&self, rule: &str, kind: &str) -> Counter {
        self.actions.counter(RuleKind { rule: rule.into(), kind: kind.into() })
    }

    /// Counts one action of `rule` widened to a pattern for `reason` (`truncate`, `null_value`, ...).
    pub fn widened(&self, rule: &str, reason: &str) {
        self.widened_counter(rule, reason).inc();
    }

    /// The counter behind [`widened`](Self::widened), to cache per rule and reason.
    pub fn widened_counter(&self, rule: &str, reason: &str) -> Counter {
        self.widened.counter(RuleReason { rule: rule.into(), reason: reason.into() })
    }

    /// Counts one action of `rule` and `kind` that Redis refused for good.
    pub fn dead_letter(&self, rule: &str, kind: &str) {
        self.dead_letters.counter(RuleKind { rule: rule.into(), kind: kind.into() }).inc();
    }

    /// Counts one manual invalidation message read, malformed or not.
    pub fn manual_message(&self) {
        self.manual_messages.inc();
    }

    /// Counts one refused part of a manual invalidation message.
    pub fn manual_refused(&self, reason: &str) {
        self.manual_refused.counter(Reason { reason: reason.into() }).inc();
    }

    /// Counts one batch Redis acknowledged.
    pub fn batch_applied(&self) {
        self.batches.inc();
    }

    /// Counts one failed batch apply.
    pub fn redis_error(&self) {
        self.redis_errors.inc();
    }

    /// Records how long one batch apply took, successful or not.
    pub fn observe_redis_apply(&self, took: Duration) {
        self.redis_apply.observe(took.as_secs_f64());
    }

    /// Counts one replication reconnect.
    pub fn reconnect(&self) {
        self.reconnects.inc();
    }

    /// Counts one rule set swapped in after a reload, and notes when.
    pub fn reload(&self) {
        self.reloads.inc();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.last_reload.store(now.to_bits(), Ordering::Relaxed);
    }

    /// Counts one reload rejected for an error in the config or the rules.
    pub fn reload_failed(&self) {
        self.reload_failures.inc();
    }

    /// Counts the reloads rejected so far.
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.get()
    }

    /// Sets whether the replication stream is running.
    pub fn set_streaming(&self, streaming: bool) {
        self.streaming.set(i64::from(streaming));
    }

    /// Sets whether Redis answers.
    pub fn set_redis_reachable(&self, reachable: bool) {
        self.redis_reachable.set(i64::from(reachable));
    }

    /// Counts keys Redis reported deleted.
    pub fn keys_deleted(&self, n: u64) {
        self.deleted_keys.inc_by(n);
    }

    /// Counts the keys deleted so far.
    pub fn deleted_keys(&self) -> u64 {
        self.deleted_keys.get()
    }

    /// Counts keys SCAN returned for pattern actions.
    pub fn keys_scanned(&self, n: u64) {
        self.scanned_keys.inc_by(n);
    }

    /// Counts the keys SCAN returned so far.
    pub fn scanned_keys(&self) -> u64 {
        self.scanned_keys.get()
    }

    /// Records how long one pattern action took, over all its SCAN pages.
    pub fn observe_scan(&self, took: Duration) {
        self.scan.observe(took.as_secs_f64());
    }

    /// The counter of changes of `table` that no rule turned into an action, to cache per relation.
    pub fn unmatched_counter(&self, table: &str) -> Counter {
        self.unmatched.counter(Table { table: table.into() })
    }

    /// Counts the changes that no rule turned into an action so far, every table.
    pub fn unmatched_total(&self) -> u64 {
        self.unmatched.total()
    }

    /// Replaces what is known about the slot.
    pub fn set_slot(&self, slot: SlotHealth) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(slot);
    }

    /// Records one of this process's heartbeats back through the stream, written at `at`:
    /// counts it and sets the last heartbeat's time.
    pub fn set_heartbeat(&self, at: SystemTime) {
        self.heartbeats.inc();
        let secs = at.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.heartbeat.store(secs.to_bits(), Ordering::Relaxed);
    }

    /// Counts the row changes routed so far, every table and op.
    pub fn changes_total(&self) -> u64 {
        self.changes.total()
    }

    /// Counts the actions produced so far, every rule and kind.
    pub fn actions_total(&self) -> u64 {
        self.actions.total()
    }

    /// Counts the actions of `kind` produced by `rule` so far.
    pub fn actions_count(&self, rule: &str, kind: &str) -> u64 {
        self.actions.count(&RuleKind { rule: rule.into(), kind: kind.into() })
    }

    /// Counts the actions widened so far, every rule and reason.
    pub fn widened_total(&self) -> u64 {
        self.widened.total()
    }

    /// Counts the refused parts of manual invalidation messages for `reason` so far.
    pub fn manual_refused_count(&self, reason: &str) -> u64 {
        self.manual_refused.count(&Reason { reason: reason.into() })
    }

    /// Counts the commits so far.
    pub fn commits(&self) -> u64 {
        self.commits.get()
    }

    /// Counts the batches Redis acknowledged so far.
    pub fn batches(&self) -> u64 {
        self.batches.get()
    }

    /// Counts the failed batch applies so far.
    pub fn redis_errors(&self) -> u64 {
        self.redis_errors.get()
    }

    /// Records whether this instance holds the slot and streams.
    pub fn set_active(&self, active: bool) {
        self.active.set(i64::from(active));
    }

    /// Whether this instance holds the slot and streams.
    pub fn active(&self) -> bool {
        self.active.get() == 1
    }

    /// Counts the reconnects so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.get()
    }

    /// Counts the manual invalidation messages read so far, malformed ones included.
    pub fn manual_messages(&self) -> u64 {
        self.manual_messages.get()
    }

    /// Records the position where every first delete is applied; only ever moves forward.
    pub fn set_applied(&self, lsn: Lsn) {
        self.applied_lsn.inner().fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// Counts `n` transactions the visibility gate held.
    pub fn gate_held(&self, n: u64) {
        self.gate_held.inc_by(n);
    }

    /// Records how long the visibility gate held a batch.
    pub fn observe_gate_wait(&self, held: Duration) {
        self.gate_wait.observe(held.as_secs_f64());
    }

    /// Observes one of the gate's snapshot queries, answered after `took`.
    pub fn observe_gate_query(&self, took: Duration) {
        self.gate_query.observe(took.as_secs_f64());
    }

    /// Counts a batch applied without the visibility gate, for `reason`.
    pub fn gate_bypassed(&self, reason: &str) {
        self.gate_bypassed.counter(Reason { reason: reason.into() }).inc();
    }

    /// Sets how many second deletes are pending.
    pub fn set_redeletes_pending(&self, n: usize) {
        self.redeletes_pending.set(n as u64);
    }

    /// Counts `applied` second deletes, `early` of them before their time.
    pub fn redeletes_applied(&self, applied: usize, early: usize) {
        self.redeletes_applied.inc_by(applied as u64);
        self.redeletes_early.inc_by(early as u64);
    }

    /// Raises the `walbust.wait()` count for `result` (`answered` or `timed_out`) to
    /// `server_count`, the server's own count; a lower count (the counters were reset) is ignored.
    pub fn set_wait_calls(&self, result: &str, server_count: u64) {
        let counter = self.wait_calls.counter(Outcome { result: result.into() });
        counter.inc_by(server_count.saturating_sub(counter.get()));
    }

    /// The position where every first delete is applied, as last reported.
    pub fn applied(&self) -> Lsn {
        Lsn(self.applied_lsn.get())
    }

    /// The transactions the visibility gate held so far.
    pub fn gate_held_total(&self) -> u64 {
        self.gate_held.get()
    }

    /// The batches applied without the visibility gate so far, every reason.
    pub fn gate_bypassed_total(&self) -> u64 {
        self.gate_bypassed.total()
    }

    /// The second deletes applied so far.
    pub fn redeletes_applied_total(&self) -> u64 {
        self.redeletes_applied.get()
    }

    /// The `walbust.wait()` calls with `result` the server has counted, as last read.
    pub fn wait_calls(&self, result: &str) -> u64 {
        self.wait_calls.count(&Outcome { result: result.into() })
    }

    /// Counts the rule sets swapped in so far.
    pub fn reloads(&self) -> u64 {
        self.reloads.get()
    }

    /// Counts this process's heartbeats received back so far.
    pub fn heartbeats(&self) -> u64 {
        self.heartbeats.get()
    }

    /// Every metric in the Prometheus text format, version 0.0.4 ([`CONTENT_TYPE`]).
    /// Metrics without a sample yet (a labelled counter nothing counted, a gauge not known)
    /// are left out whole.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail, and no metric here fails on its own.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample lines of `name` (with labels), without HELP and TYPE.
    fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines().filter(|l| !l.starts_with('#') && l.split(['{', ' ']).next() == Some(name)).collect()
    }

    /// [`samples`], sorted: a labelled metric's series come in no particular order.
    fn sorted<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        let mut lines = samples(text, name);
        lines.sort_unstable();
        lines
    }

    /// A registry where every metric has at least one sample.
    fn everything_counted() -> Arc<Metrics> {
        let m = Metrics::new();
        m.set_received(Lsn(2));
        m.set_flushed(Lsn(1));
        m.set_server_wal_end(Lsn(3));
        m.changes("public.t", "insert");
        m.commit();
        m.actions("r", "unlink", 1);
        m.widened("r", "truncate");
        m.dead_letter("r", "unlink");
        m.manual_message();
        m.manual_refused("malformed");
        m.batch_applied();
        m.redis_error();
        m.reconnect();
        m.reload();
        m.reload_failed();
        m.keys_deleted(1);
        m.keys_scanned(1);
        m.observe_scan(Duration::from_millis(1));
        m.unmatched_counter("public.t").inc();
        m.set_slot(SlotHealth {
            retained_wal_bytes: Some(1),
            wal_status: Some(WalStatus::Reserved),
            safe_wal_size_bytes: Some(1),
        });
        m.set_heartbeat(SystemTime::now());
        m.set_applied(Lsn(1));
        m.gate_held(1);
        m.observe_gate_wait(Duration::from_millis(1));
        m.gate_bypassed("connection");
        m.set_redeletes_pending(1);
        m.redeletes_applied(1, 0);
        m.set_wait_calls("answered", 1);
        m
    }

    #[test]
    fn every_metric_has_help_and_type_and_a_conventional_name() {
        let text = everything_counted().render();
        let all = ALL;
        for name in all {
            assert!(name.starts_with("walbust_"), "{name}");
            assert!(text.contains(&format!("# HELP {name} ")), "{name} has no HELP:\n{text}");
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} has no TYPE:\n{text}");
            let counter = text.contains(&format!("# TYPE {name} counter"));
            assert_eq!(counter, name.ends_with("_total"), "{name}: only counters end in _total");
        }
        let helps: Vec<&str> = text.lines().filter(|l| l.starts_with("# HELP ")).collect();
        assert_eq!(helps.len(), all.len(), "a metric not listed here:\n{text}");
        for help in helps {
            assert!(help.ends_with('.') && !help.ends_with(".."), "one full stop: {help}");
        }
        assert!(
            text.contains("# HELP walbust_last_heartbeat_timestamp_seconds Unix time carried by the last heartbeat"),
            "{text}"
        );
    }

    #[test]
    fn a_fresh_registry_lists_only_what_it_can_know() {
        let text = Metrics::new().render();
        for absent in [LAG, CHANGES, ACTIONS, WIDENED, DEAD_LETTERS, MANUAL_REFUSED, SLOT_RETAINED_WAL, LAST_HEARTBEAT]
        {
            assert!(!text.contains(absent), "{absent} before anything was counted:\n{text}");
        }
        assert_eq!(samples(&text, COMMITS), ["walbust_commits_total 0"]);
        assert_eq!(samples(&text, MANUAL_MESSAGES), ["walbust_manual_messages_total 0"]);
        assert_eq!(samples(&text, RELOADS), ["walbust_rule_reloads_total 0"]);
        assert_eq!(samples(&text, HEARTBEATS), ["walbust_heartbeats_total 0"]);
        assert_eq!(samples(&text, "walbust_ack_lag_seconds_count"), ["walbust_ack_lag_seconds_count 0"]);
        for absent in [UNMATCHED, LAST_RELOAD] {
            assert!(!text.contains(absent), "{absent} before anything was counted:\n{text}");
        }
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(samples(&text, BUILD_INFO), [format!("walbust_build_info{{version=\"{version}\"}} 1")]);
        assert_eq!(samples(&text, STREAMING), ["walbust_streaming 0"]);
        assert_eq!(samples(&text, REDIS_REACHABLE), ["walbust_redis_reachable 0"], "unknown until Redis answers");
        assert_eq!(samples(&text, RELOAD_FAILURES), ["walbust_rule_reload_failures_total 0"]);
        assert_eq!(samples(&text, DELETED_KEYS), ["walbust_redis_deleted_keys_total 0"]);
        assert_eq!(samples(&text, SCANNED_KEYS), ["walbust_redis_scanned_keys_total 0"]);
    }

    #[test]
    fn process_metrics_read_this_process() {
        let text = Metrics::new().render();
        let value = |name: &str| -> f64 {
            let line = samples(&text, name).first().copied().unwrap_or_else(|| panic!("no {name}:\n{text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!(value(PROCESS_RESIDENT_MEMORY) > 1e6, "{text}");
        assert!(value(PROCESS_CPU) >= 0.0, "{text}");
        assert!(text.contains("# TYPE walbust_process_cpu_seconds_total counter"), "{text}");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        let started = value(PROCESS_START_TIME);
        assert!(started <= now + 1.0 && started > now - 86_400.0, "{started} vs {now}");
    }

    #[test]
    fn reloads_gauges_and_redis_costs_are_counted() {
        let m = Metrics::new();
        m.reload();
        m.reload_failed();
        m.reload_failed();
        m.set_streaming(true);
        m.set_redis_reachable(true);
        m.keys_deleted(3);
        m.keys_deleted(2);
        m.keys_scanned(1000);
        m.observe_scan(Duration::from_millis(30));
        m.unmatched_counter("public.audit").inc_by(4);
        let text = m.render();
        assert_eq!(samples(&text, RELOADS), ["walbust_rule_reloads_total 1"]);
        assert_eq!(samples(&text, RELOAD_FAILURES), ["walbust_rule_reload_failures_total 2"]);
        let last: f64 = samples(&text, LAST_RELOAD)[0].rsplit(' ').next().unwrap().parse().unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        assert!((now - last).abs() < 60.0, "{last} vs {now}");
        assert_eq!(samples(&text, STREAMING), ["walbust_streaming 1"]);
        assert_eq!(samples(&text, REDIS_REACHABLE), ["walbust_redis_reachable 1"]);
        assert_eq!(samples(&text, DELETED_KEYS), ["walbust_redis_deleted_keys_total 5"]);
        assert_eq!(samples(&text, SCANNED_KEYS), ["walbust_redis_scanned_keys_total 1000"]);
        assert_eq!(samples(&text, "walbust_redis_scan_seconds_count"), ["walbust_redis_scan_seconds_count 1"]);
        assert_eq!(samples(&text, UNMATCHED), [r#"walbust_unmatched_changes_total{table="public.audit"} 4"#]);
        assert_eq!((m.deleted_keys(), m.scanned_keys(), m.unmatched_total(), m.reload_failures()), (5, 1000, 4, 2));
    }

    #[test]
    fn positions_only_move_forward_and_lag_is_server_end_minus_flushed() {
        let m = Metrics::new();
        assert_eq!(m.lag_bytes(), None, "unknown until both positions are known");
        m.set_received(Lsn(500));
        m.set_received(Lsn(400));
        m.set_flushed(Lsn(300));
        m.set_flushed(Lsn(200));
        m.set_server_wal_end(Lsn(1000));
        assert_eq!(m.received(), Lsn(500));
        assert_eq!(m.flushed(), Lsn(300));
        assert_eq!(m.lag_bytes(), Some(700));
        let text = m.render();
        assert_eq!(samples(&text, RECEIVED_LSN), ["walbust_received_lsn_bytes 500"]);
        assert_eq!(samples(&text, FLUSHED_LSN), ["walbust_flushed_lsn_bytes 300"]);
        assert_eq!(samples(&text, LAG), ["walbust_lag_bytes 700"]);
        m.set_flushed(Lsn(2000));
        assert_eq!(m.lag_bytes(), Some(0), "a flushed position past the last known server end is no lag");
        assert_eq!(samples(&m.render(), LAG), ["walbust_lag_bytes 0"]);
    }

    #[test]
    fn labelled_counters_are_one_series_per_label_set() {
        let m = Metrics::new();
        m.changes("public.users", "update");
        m.changes("public.users", "insert");
        m.changes("public.users", "insert");
        let cached = m.changes_counter("public.orgs", "delete");
        cached.inc_by(3);
        m.actions("user settings", "unlink", 4);
        m.widened("user settings", "truncate");
        m.manual_refused("match_all");
        m.manual_refused("match_all");
        let text = m.render();
        assert_eq!(
            sorted(&text, CHANGES),
            [
                r#"walbust_changes_total{table="public.orgs",op="delete"} 3"#,
                r#"walbust_changes_total{table="public.users",op="insert"} 2"#,
                r#"walbust_changes_total{table="public.users",op="update"} 1"#,
            ]
        );
        assert_eq!(samples(&text, ACTIONS), [r#"walbust_actions_total{rule="user settings",kind="unlink"} 4"#]);
        assert_eq!(
            samples(&text, WIDENED),
            [r#"walbust_widened_actions_total{rule="user settings",reason="truncate"} 1"#]
        );
        assert_eq!(samples(&text, MANUAL_REFUSED), [r#"walbust_manual_refused_total{reason="match_all"} 2"#]);
        assert_eq!(m.changes_total(), 6);
        assert_eq!((m.actions_total(), m.actions_count("user settings", "unlink")), (4, 4));
        assert_eq!(m.actions_count("user settings", "scan_unlink"), 0);
        assert_eq!(m.widened_total(), 1);
        assert_eq!((m.manual_refused_count("match_all"), m.manual_refused_count("malformed")), (2, 0));
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.actions("say \"hi\"\\\nnow", "unlink", 1);
        let text = m.render();
        assert_eq!(samples(&text, ACTIONS), [r#"walbust_actions_total{rule="say \"hi\"\\\nnow",kind="unlink"} 1"#]);
    }

    #[test]
    fn counters_from_many_threads_add_up() {
        let m = Metrics::new();
        let cached = m.changes_counter("public.a", "insert");
        std::thread::scope(|s| {
            for t in 0..4 {
                let (m, cached) = (&m, cached.clone());
                s.spawn(move || {
                    for i in 0..1000 {
                        if i % 2 == 0 {
                            cached.inc();
                        } else {
                            m.changes("public.b", "insert");
                        }
                        m.redis_error();
                        if t == 0 {
                            m.reconnect();
                        }
                    }
                });
            }
        });
        assert_eq!(m.changes_counter("public.a", "insert").get(), 2000);
        assert_eq!(m.changes_counter("public.b", "insert").get(), 2000);
        assert_eq!(m.changes_total(), 4000);
        assert_eq!(m.redis_errors(), 4000);
        assert_eq!(m.reconnects(), 1000);
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_matches_inf() {
        let m = Metrics::new();
        for secs in [0.001_f64, 0.004, 0.2, 7.0, 1000.0, 0.0] {
            m.observe_ack_lag(Duration::from_secs_f64(secs));
        }
        let text = m.render();
        let lines = samples(&text, "walbust_ack_lag_seconds_bucket");
        assert_eq!(lines.len(), ACK_LAG_BUCKETS.len() + 1);
        assert_eq!(lines[0], r#"walbust_ack_lag_seconds_bucket{le="0.001"} 2"#);
        assert!(lines.contains(&r#"walbust_ack_lag_seconds_bucket{le="0.002"} 2"#), "{lines:?}");
        assert!(lines.contains(&r#"walbust_ack_lag_seconds_bucket{le="0.005"} 3"#), "{lines:?}");
        assert!(lines.contains(&r#"walbust_ack_lag_seconds_bucket{le="0.25"} 4"#), "{lines:?}");
        assert!(lines.contains(&r#"walbust_ack_lag_seconds_bucket{le="10"} 5"#), "{lines:?}");
        assert_eq!(lines.last().copied(), Some(r#"walbust_ack_lag_seconds_bucket{le="+Inf"} 6"#));
        assert_eq!(samples(&text, "walbust_ack_lag_seconds_count"), ["walbust_ack_lag_seconds_count 6"]);
        let sum = samples(&text, "walbust_ack_lag_seconds_sum")[0].rsplit(' ').next().unwrap();
        assert!((sum.parse::<f64>().unwrap() - 1007.205).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn slot_gauges_appear_once_known_with_one_status_set() {
        let m = Metrics::new();
        let text = m.render();
        assert!(samples(&text, SLOT_WAL_STATUS).is_empty());
        assert!(samples(&text, SLOT_RETAINED_WAL).is_empty());
        assert!(samples(&text, LAST_HEARTBEAT).is_empty());
        m.set_slot(SlotHealth {
            retained_wal_bytes: Some(4096),
            wal_status: Some(WalStatus::Extended),
            safe_wal_size_bytes: None,
        });
        m.set_heartbeat(UNIX_EPOCH + Duration::from_millis(1_700_000_000_500));
        let text = m.render();
        assert_eq!(samples(&text, SLOT_RETAINED_WAL), ["walbust_slot_retained_wal_bytes 4096"]);
        assert_eq!(
            samples(&text, SLOT_WAL_STATUS),
            [
                r#"walbust_slot_wal_status{status="reserved"} 0"#,
                r#"walbust_slot_wal_status{status="extended"} 1"#,
                r#"walbust_slot_wal_status{status="unreserved"} 0"#,
                r#"walbust_slot_wal_status{status="lost"} 0"#,
            ]
        );
        assert!(!text.contains(SLOT_SAFE_WAL_SIZE), "unlimited has no sample");
        assert_eq!(samples(&text, LAST_HEARTBEAT), ["walbust_last_heartbeat_timestamp_seconds 1700000000.5"]);
        assert_eq!(samples(&text, HEARTBEATS), ["walbust_heartbeats_total 1"]);
        assert_eq!(m.heartbeats(), 1);
    }

    #[test]
    fn the_text_format_is_well_formed() {
        let text = everything_counted().render();
        assert!(text.ends_with('\n'));
        assert!(!text.contains("# EOF"), "the 0.0.4 text format has no end marker");
        let mut typed = None;
        for line in text.lines() {
            if line.starts_with('#') {
                let words: Vec<&str> = line.splitn(4, ' ').collect();
                assert!(matches!(words[1], "HELP" | "TYPE"), "{line}");
                if words[1] == "TYPE" {
                    typed = Some(words[2].to_string());
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            let family = typed.as_deref().expect("a TYPE line before every sample");
            assert!(series.starts_with(family), "{line} under TYPE {family}");
            assert!(value == "+Inf" || value.parse::<f64>().is_ok(), "{line}");
        }
    }
}

//! Prometheus metrics: counters, gauges and histograms rendered in the text format (0.0.4).
//!
//! One [`Metrics`] is shared by the pipeline, the slot monitor and the HTTP server
//! ([`crate::health`]). Every update is an atomic operation; labelled counters keep one
//! atomic per label set in a map, and [`Counter`] handles can be cached by the caller (per
//! relation or rule binding) so the per-change path never touches the map. Labels carry
//! only rule names, table names, ops, action kinds and widening reasons, never keys or row
//! values, so the number of series stays small and nothing private leaks into scrapes.

use crate::lsn::Lsn;
use crate::status::WalStatus;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
/// Counter, labels `rule` and `kind`: actions produced, before deduplication.
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
/// Gauge: WAL the slot keeps on the server (current WAL position minus `restart_lsn`).
pub const SLOT_RETAINED_WAL: &str = "walbust_slot_retained_wal_bytes";
/// Gauge, label `status`: 1 for the slot's current `wal_status`, 0 for the others.
pub const SLOT_WAL_STATUS: &str = "walbust_slot_wal_status";
/// Gauge: WAL that can still be written before the slot is in danger of being lost.
pub const SLOT_SAFE_WAL_SIZE: &str = "walbust_slot_safe_wal_size_bytes";
/// Gauge: Unix time of the last message (data or keepalive) received on the replication stream.
pub const LAST_HEARTBEAT: &str = "walbust_last_heartbeat_timestamp_seconds";

/// Bucket bounds of [`ACK_LAG`] and [`RECEIVE_LAG`], in seconds.
pub const ACK_LAG_BUCKETS: &[f64] =
    &[0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// Bucket bounds of [`REDIS_APPLY`], in seconds.
pub const REDIS_APPLY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// [`Counter`] handles found again by a small key (an OID and op, a rule's address and an
/// action kind), hashed with a multiply-rotate mix rather than SipHash: the per-change path
/// counts without hashing label strings or taking the registry's lock. Two keys resolving
/// to the same label set share one counter, so a key only has to be stable, not unique.
#[derive(Debug)]
pub struct CounterCache<K> {
    map: HashMap<K, Counter, BuildHasherDefault<MixHasher>>,
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

/// A fast, unkeyed hasher for small integer keys the process itself chooses (never for
/// data from outside, which could be crafted to collide).
#[derive(Debug, Default, Clone, Copy)]
pub struct MixHasher(u64);

impl MixHasher {
    const K: u64 = 0x517c_c1b7_2722_0a95;

    fn mix(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(Self::K);
    }
}

impl Hasher for MixHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A monotonically increasing count; cheap to clone and to increment from any thread.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The series sharing one hash: label values and their counter.
type Bucket<const N: usize> = Vec<([Box<str>; N], Counter)>;

/// Counters of one metric, one per label set, created on first use.
#[derive(Debug)]
struct Family<const N: usize> {
    labels: [&'static str; N],
    // Keyed by a hash of the label values so a lookup needs no allocation; collisions
    // share the bucket and are told apart by comparing the values.
    series: RwLock<HashMap<u64, Bucket<N>>>,
}

impl<const N: usize> Family<N> {
    fn new(labels: [&'static str; N]) -> Self {
        Family { labels, series: RwLock::new(HashMap::new()) }
    }

    fn counter(&self, values: [&str; N]) -> Counter {
        let mut h = DefaultHasher::new();
        values.hash(&mut h);
        let hash = h.finish();
        let same = |stored: &[Box<str>; N]| stored.iter().zip(values).all(|(a, b)| **a == *b);
        {
            let series = self.series.read().unwrap_or_else(|e| e.into_inner());
            if let Some((_, c)) = series.get(&hash).and_then(|bucket| bucket.iter().find(|(v, _)| same(v))) {
                return c.clone();
            }
        }
        let mut series = self.series.write().unwrap_or_else(|e| e.into_inner());
        let bucket = series.entry(hash).or_default();
        if let Some((_, c)) = bucket.iter().find(|(v, _)| same(v)) {
            return c.clone();
        }
        let c = Counter::default();
        bucket.push((values.map(Box::from), c.clone()));
        c
    }

    /// Every series, sorted by label values, with its count.
    fn snapshot(&self) -> Vec<([Box<str>; N], u64)> {
        let series = self.series.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = series.values().flatten().map(|(v, c)| (v.clone(), c.get())).collect();
        all.sort();
        all
    }
}

/// A histogram with fixed bucket bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    // Per bucket, not cumulative; the last one is +Inf.
    counts: Vec<AtomicU64>,
    // The sum as f64 bits, updated with compare-and-swap.
    sum: AtomicU64,
}

impl Histogram {
    /// A histogram with `bounds` as bucket upper bounds (ascending); +Inf is implied.
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum: AtomicU64::new(0) }
    }

    /// Records one observation; negative and NaN values count as zero.
    pub fn observe(&self, value: f64) {
        let value = if value.is_nan() || value < 0.0 { 0.0 } else { value };
        let i = self.bounds.iter().position(|&b| value <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| Some((f64::from_bits(bits) + value).to_bits()));
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// The number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str) {
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = self.bounds.get(i).map_or_else(|| "+Inf".to_string(), |b| format_float(*b));
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum {}", format_float(f64::from_bits(self.sum.load(Ordering::Relaxed))));
        // The count is the +Inf bucket, so the two always agree within one scrape.
        let _ = writeln!(out, "{name}_count {cumulative}");
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

/// Every walbust metric. Create one with [`Metrics::new`] and share it.
#[derive(Debug)]
pub struct Metrics {
    received_lsn: AtomicU64,
    flushed_lsn: AtomicU64,
    server_wal_end: AtomicU64,
    ack_lag: Histogram,
    receive_lag: Histogram,
    changes: Family<2>,
    commits: Counter,
    actions: Family<2>,
    widened: Family<2>,
    dead_letters: Family<2>,
    manual_refused: Family<1>,
    batches: Counter,
    redis_errors: Counter,
    redis_apply: Histogram,
    reconnects: Counter,
    slot: Mutex<Option<SlotHealth>>,
    // f64 bits of the Unix time; 0 means never.
    heartbeat: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            received_lsn: AtomicU64::new(0),
            flushed_lsn: AtomicU64::new(0),
            server_wal_end: AtomicU64::new(0),
            ack_lag: Histogram::new(ACK_LAG_BUCKETS),
            receive_lag: Histogram::new(ACK_LAG_BUCKETS),
            changes: Family::new(["table", "op"]),
            commits: Counter::default(),
            actions: Family::new(["rule", "kind"]),
            widened: Family::new(["rule", "reason"]),
            dead_letters: Family::new(["rule", "kind"]),
            manual_refused: Family::new(["reason"]),
            batches: Counter::default(),
            redis_errors: Counter::default(),
            redis_apply: Histogram::new(REDIS_APPLY_BUCKETS),
            reconnects: Counter::default(),
            slot: Mutex::new(None),
            heartbeat: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// A fresh registry, every count at zero.
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// Records the end of the last WAL received; only ever moves forward.
    pub fn set_received(&self, lsn: Lsn) {
        self.received_lsn.fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// Records the position reported to the server as flushed; only ever moves forward.
    pub fn set_flushed(&self, lsn: Lsn) {
        self.flushed_lsn.fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// Records the server's current WAL end (from a keepalive's or XLogData's `wal_end`,
    /// or `pg_current_wal_lsn()`); the lag gauge is this minus the flushed position.
    pub fn set_server_wal_end(&self, lsn: Lsn) {
        self.server_wal_end.fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// The flushed position recorded so far.
    pub fn flushed(&self) -> Lsn {
        Lsn(self.flushed_lsn.load(Ordering::Relaxed))
    }

    /// The received position recorded so far.
    pub fn received(&self) -> Lsn {
        Lsn(self.received_lsn.load(Ordering::Relaxed))
    }

    /// Bytes of WAL the server has written that walbust has not acknowledged; `None`
    /// until both positions are known.
    pub fn lag_bytes(&self) -> Option<u64> {
        let server = self.server_wal_end.load(Ordering::Relaxed);
        let flushed = self.flushed_lsn.load(Ordering::Relaxed);
        (server != 0 && flushed != 0).then(|| server.saturating_sub(flushed))
    }

    /// Records the time from a commit on the server to its acknowledgement.
    pub fn observe_ack_lag(&self, lag: Duration) {
        self.ack_lag.observe_duration(lag);
    }

    /// Records the time from a commit on the server to its Commit message arriving.
    pub fn observe_receive_lag(&self, lag: Duration) {
        self.receive_lag.observe_duration(lag);
    }

    /// Counts one routed change of `table` (`schema.table`) by `op` (`insert`, ...).
    pub fn changes(&self, table: &str, op: &str) {
        self.changes.counter([table, op]).inc();
    }

    /// The counter behind [`changes`](Self::changes), to cache per relation and op.
    pub fn changes_counter(&self, table: &str, op: &str) -> Counter {
        self.changes.counter([table, op])
    }

    /// Counts one commit.
    pub fn commit(&self) {
        self.commits.inc();
    }

    /// Counts `n` actions of `kind` (`unlink`, `scan_unlink`, ...) produced by `rule`.
    pub fn actions(&self, rule: &str, kind: &str, n: u64) {
        self.actions.counter([rule, kind]).add(n);
    }

    /// The counter behind [`actions`](Self::actions), to cache per rule and kind.
    pub fn actions_counter(&self, rule: &str, kind: &str) -> Counter {
        self.actions.counter([rule, kind])
    }

    /// Counts one action of `rule` widened to a pattern for `reason` (`truncate`, `null_value`, ...).
    pub fn widened(&self, rule: &str, reason: &str) {
        self.widened.counter([rule, reason]).inc();
    }

    /// The counter behind [`widened`](Self::widened), to cache per rule and reason.
    pub fn widened_counter(&self, rule: &str, reason: &str) -> Counter {
        self.widened.counter([rule, reason])
    }

    /// Counts one action of `rule` and `kind` that Redis refused for good.
    pub fn dead_letter(&self, rule: &str, kind: &str) {
        self.dead_letters.counter([rule, kind]).inc();
    }

    /// Counts one refused part of a manual invalidation message.
    pub fn manual_refused(&self, reason: &str) {
        self.manual_refused.counter([reason]).inc();
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
        self.redis_apply.observe_duration(took);
    }

    /// Counts one replication reconnect.
    pub fn reconnect(&self) {
        self.reconnects.inc();
    }

    /// Replaces what is known about the slot.
    pub fn set_slot(&self, slot: SlotHealth) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(slot);
    }

    /// Records a sign of life on the replication stream at `at`.
    pub fn set_heartbeat(&self, at: SystemTime) {
        let secs = at.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.heartbeat.store(secs.to_bits(), Ordering::Relaxed);
    }

    /// Counts the failed batch applies so far.
    pub fn redis_errors(&self) -> u64 {
        self.redis_errors.get()
    }

    /// Counts the reconnects so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.get()
    }

    /// Every metric in the Prometheus text format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let received = self.received_lsn.load(Ordering::Relaxed);
        let flushed = self.flushed_lsn.load(Ordering::Relaxed);
        header(&mut out, RECEIVED_LSN, "gauge", "End of the last WAL received from the server, as a byte position.");
        let _ = writeln!(out, "{RECEIVED_LSN} {received}");
        header(
            &mut out,
            FLUSHED_LSN,
            "gauge",
            "Position last reported to the server as flushed: every action before it is applied in Redis.",
        );
        let _ = writeln!(out, "{FLUSHED_LSN} {flushed}");
        header(&mut out, LAG, "gauge", "Server's current WAL end minus the flushed position, in bytes.");
        if let Some(lag) = self.lag_bytes() {
            let _ = writeln!(out, "{LAG} {lag}");
        }
        header(&mut out, ACK_LAG, "histogram", "Seconds from a commit on the server to walbust acknowledging it.");
        self.ack_lag.render(&mut out, ACK_LAG);
        header(
            &mut out,
            RECEIVE_LAG,
            "histogram",
            "Seconds from a commit on the server to its Commit message reaching walbust.",
        );
        self.receive_lag.render(&mut out, RECEIVE_LAG);
        header(&mut out, CHANGES, "counter", "Row changes routed, by table and op (a TRUNCATE counts once per table).");
        render_family(&mut out, CHANGES, &self.changes);
        header(&mut out, COMMITS, "counter", "Commits seen on the replication stream.");
        let _ = writeln!(out, "{COMMITS} {}", self.commits.get());
        header(&mut out, ACTIONS, "counter", "Invalidation actions produced, by rule and kind, before deduplication.");
        render_family(&mut out, ACTIONS, &self.actions);
        header(
            &mut out,
            WIDENED,
            "counter",
            "Actions widened to a pattern because a value was missing, by rule and reason.",
        );
        render_family(&mut out, WIDENED, &self.widened);
        header(
            &mut out,
            DEAD_LETTERS,
            "counter",
            "Actions Redis refused for good (an error reply retrying cannot fix), by rule and kind; the stream went on.",
        );
        render_family(&mut out, DEAD_LETTERS, &self.dead_letters);
        header(&mut out, MANUAL_REFUSED, "counter", "Refused parts of manual invalidation messages, by reason.");
        render_family(&mut out, MANUAL_REFUSED, &self.manual_refused);
        header(&mut out, BATCHES, "counter", "Batches Redis acknowledged.");
        let _ = writeln!(out, "{BATCHES} {}", self.batches.get());
        header(&mut out, REDIS_ERRORS, "counter", "Failed batch applies to Redis; each is retried.");
        let _ = writeln!(out, "{REDIS_ERRORS} {}", self.redis_errors.get());
        header(&mut out, REDIS_APPLY, "histogram", "Seconds one batch apply to Redis took, successful or not.");
        self.redis_apply.render(&mut out, REDIS_APPLY);
        header(&mut out, RECONNECTS, "counter", "Replication reconnects.");
        let _ = writeln!(out, "{RECONNECTS} {}", self.reconnects.get());
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let slot = slot.unwrap_or_default();
        header(
            &mut out,
            SLOT_RETAINED_WAL,
            "gauge",
            "WAL the server keeps for the slot: current position minus restart_lsn.",
        );
        if let Some(b) = slot.retained_wal_bytes {
            let _ = writeln!(out, "{SLOT_RETAINED_WAL} {b}");
        }
        header(&mut out, SLOT_WAL_STATUS, "gauge", "1 for the slot's wal_status, 0 for the others.");
        if let Some(current) = slot.wal_status {
            for status in WalStatus::ALL {
                let _ = writeln!(
                    out,
                    "{SLOT_WAL_STATUS}{{status=\"{}\"}} {}",
                    status.as_str(),
                    u8::from(status == current)
                );
            }
        }
        header(
            &mut out,
            SLOT_SAFE_WAL_SIZE,
            "gauge",
            "WAL that can be written before the slot risks being lost; absent when unlimited.",
        );
        if let Some(b) = slot.safe_wal_size_bytes {
            let _ = writeln!(out, "{SLOT_SAFE_WAL_SIZE} {b}");
        }
        header(&mut out, LAST_HEARTBEAT, "gauge", "Unix time of the last message received on the replication stream.");
        let heartbeat = f64::from_bits(self.heartbeat.load(Ordering::Relaxed));
        if heartbeat > 0.0 {
            let _ = writeln!(out, "{LAST_HEARTBEAT} {}", format_float(heartbeat));
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn render_family<const N: usize>(out: &mut String, name: &str, family: &Family<N>) {
    for (values, count) in family.snapshot() {
        out.push_str(name);
        out.push('{');
        for (i, (label, value)) in family.labels.iter().zip(values.iter()).enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{label}=\"");
            escape_label_value(out, value);
            out.push('"');
        }
        let _ = writeln!(out, "}} {count}");
    }
}

/// Escapes a label value as the text format requires: backslash, double quote, newline.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A float as Prometheus writes it: integers without a fraction, `+Inf`, `NaN`.
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample lines of `name` (with labels), without HELP and TYPE.
    fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines().filter(|l| !l.starts_with('#') && l.split(['{', ' ']).next() == Some(name)).collect()
    }

    #[test]
    fn every_metric_has_help_and_type_and_a_conventional_name() {
        let text = Metrics::new().render();
        for name in [
            RECEIVED_LSN,
            FLUSHED_LSN,
            LAG,
            ACK_LAG,
            RECEIVE_LAG,
            CHANGES,
            COMMITS,
            ACTIONS,
            WIDENED,
            BATCHES,
            REDIS_ERRORS,
            REDIS_APPLY,
            RECONNECTS,
            SLOT_RETAINED_WAL,
            SLOT_WAL_STATUS,
            SLOT_SAFE_WAL_SIZE,
            LAST_HEARTBEAT,
        ] {
            assert!(name.starts_with("walbust_"), "{name}");
            assert!(text.contains(&format!("# HELP {name} ")), "{name} has no HELP:\n{text}");
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} has no TYPE:\n{text}");
            let counter = text.contains(&format!("# TYPE {name} counter"));
            assert_eq!(counter, name.ends_with("_total"), "{name}: only counters end in _total");
        }
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
    }

    #[test]
    fn labelled_counters_are_one_series_per_label_set_sorted() {
        let m = Metrics::new();
        m.changes("public.users", "update");
        m.changes("public.users", "insert");
        m.changes("public.users", "insert");
        let cached = m.changes_counter("public.orgs", "delete");
        cached.add(3);
        m.actions("user settings", "unlink", 4);
        m.widened("user settings", "truncate");
        let text = m.render();
        assert_eq!(
            samples(&text, CHANGES),
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
        std::thread::scope(|s| {
            for t in 0..4 {
                let m = &m;
                s.spawn(move || {
                    for i in 0..1000 {
                        m.changes(if i % 2 == 0 { "public.a" } else { "public.b" }, "insert");
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
        assert_eq!(m.redis_errors(), 4000);
        assert_eq!(m.reconnects(), 1000);
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_matches_inf() {
        let m = Metrics::new();
        for secs in [0.001_f64, 0.004, 0.2, 7.0, 1000.0, -1.0] {
            m.observe_ack_lag(Duration::from_secs_f64(secs.max(0.0)));
        }
        m.ack_lag.observe(f64::NAN);
        let text = m.render();
        let lines = samples(&text, "walbust_ack_lag_seconds_bucket");
        assert_eq!(lines.len(), ACK_LAG_BUCKETS.len() + 1);
        assert_eq!(lines[0], r#"walbust_ack_lag_seconds_bucket{le="0.001"} 3"#);
        assert!(lines.contains(&r#"walbust_ack_lag_seconds_bucket{le="0.002"} 3"#), "{lines:?}");
        assert!(lines.contains(&r#"walbust_ack_lag_seconds_bucket{le="0.005"} 4"#), "{lines:?}");
        assert!(lines.contains(&r#"walbust_ack_lag_seconds_bucket{le="0.25"} 5"#), "{lines:?}");
        assert!(lines.contains(&r#"walbust_ack_lag_seconds_bucket{le="10"} 6"#), "{lines:?}");
        assert_eq!(lines.last().copied(), Some(r#"walbust_ack_lag_seconds_bucket{le="+Inf"} 7"#));
        assert_eq!(samples(&text, "walbust_ack_lag_seconds_count"), ["walbust_ack_lag_seconds_count 7"]);
        let sum = samples(&text, "walbust_ack_lag_seconds_sum")[0].rsplit(' ').next().unwrap();
        assert!((sum.parse::<f64>().unwrap() - 1007.205).abs() < 1e-9, "{sum}");
        assert_eq!(m.ack_lag.count(), 7);
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
        assert!(samples(&text, SLOT_SAFE_WAL_SIZE).is_empty(), "unlimited has no sample");
        assert_eq!(samples(&text, LAST_HEARTBEAT), ["walbust_last_heartbeat_timestamp_seconds 1700000000.5"]);
    }

    #[test]
    fn the_text_format_is_well_formed() {
        let m = Metrics::new();
        m.changes("public.t", "insert");
        m.observe_redis_apply(Duration::from_millis(3));
        let text = m.render();
        assert!(text.ends_with('\n'));
        for line in text.lines() {
            if line.starts_with('#') {
                let words: Vec<&str> = line.splitn(4, ' ').collect();
                assert!(matches!(words[1], "HELP" | "TYPE"), "{line}");
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            assert!(series.starts_with("walbust_"), "{line}");
            assert!(value == "+Inf" || value.parse::<f64>().is_ok(), "{line}");
        }
    }
}

//! The pipeline: replication stream -> decoder -> router -> batcher -> sink, and progress back.
//!
//! Two tasks share the work. The reader owns the replication connection: it decodes,
//! routes and batches, hands a sealed batch to the applier whenever the applier is idle
//! (over a channel of one), and sends standby status updates. The applier owns the sink:
//! it applies each batch, retrying with backoff until Redis acknowledges it, then
//! publishes the position the batch covers. Only that position is ever reported to
//! Postgres as flushed, so a crash at any point replays from the last commit Redis has
//! fully applied.
//!
//! Before it applies a batch, the applier waits until the batch's transactions are visible
//! to new snapshots ([`crate::daemon::visibility`]); after it, it schedules every delete of
//! the batch to be applied again `redelete_after` later ([`crate::domain::redelete`]). Two
//! positions come back: where the first deletes are applied (the status update's write
//! position, which `walbust.wait()` waits on, sent as soon as it moves) and where the second
//! deletes are applied too (the flush position, the slot's confirmed position). A crash
//! before a second delete replays its batch.
//!
//! The reader keeps reading while the applier waits on Redis, so under load one batch
//! carries many transactions for one round trip. Once a batch is full it stops reading
//! but still sends status updates, so the server neither times the connection out nor
//! sees a position that has not been applied.

use crate::daemon::heartbeat::{heartbeat, heartbeat_nonce, heartbeat_time};
use crate::daemon::outage::{Outage, rounded};
use crate::daemon::slot::{self, SetupError, SlotPolicy};
use crate::daemon::visibility::{Passed, VisibilityGate};
use crate::domain::action::Action;
use crate::domain::batch::{Batch, ChangeRecord, CommitRecord, Origin};
use crate::domain::config::Config;
use crate::domain::config::OnSlotLost;
use crate::domain::progress::Progress;
use crate::domain::redelete::{self, Due, Redeletes};
use crate::domain::routing::{MANUAL_RULE, Routing, Tally};
use crate::domain::rules::manual::{ManualError, Refusal};
use crate::domain::rules::{Change, Op, Routed, RuleSet};
use crate::errors::causes::error_chain;
use crate::postgres::lsn::Lsn;
use crate::postgres::pgoutput::{self, DecodeError, Relation};
use crate::postgres::{
    LogicalStream, ReplicationConn, ReplicationFrame, ReplicationStream, RowChange, SourceError, StreamError,
    StreamEvent,
};
use crate::sink::{DeadLetter, Sink};
use crate::telemetry::health::Health;
use crate::telemetry::metrics::{CounterCache, Metrics};
use futures_util::FutureExt;
use futures_util::future::FusedFuture;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

/// Shortest pause between two status updates sent because the flushed position moved.
const STATUS_COALESCE: Duration = Duration::from_millis(50);

/// Bytes of keys, patterns and values after which a batch is sent whatever its action
/// count, so rows with huge values keep memory bounded.
const MAX_BATCH_BYTES: usize = 16 << 20;

/// How long shutdown waits for Redis to take the last batch before giving up on it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub use crate::postgres::HEARTBEAT_PREFIX;

/// Frames already in the read buffer handled in one go before timers, shutdown and the
/// applier are looked at again.
const BUFFERED_FRAMES_PER_ROUND: usize = 256;

/// How long the reader waits, mid-transaction, once it has read everything the server had
/// sent. The server writes every message of a transaction separately, a few microseconds
/// apart; reading each as it lands costs a wake-up per message, while a short wait takes
/// the rest of the burst in one read.
const MID_TRANSACTION_PAUSE: Duration = Duration::from_micros(20);

/// Why the pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Connecting to Postgres for replication failed.
    #[error("replication connection failed")]
    Connect(#[source] SourceError),
    /// The server refused to start streaming from the slot (an option it rejects, a slot
    /// another process holds).
    #[error("the server refused to start replication")]
    Start(#[source] SourceError),
    /// The replication stream failed once it was running: cut mid-way, ended by the server,
    /// or a status update that could not be sent.
    #[error("the replication stream failed")]
    Source(#[from] SourceError),
    /// The database is not set up for walbust.
    #[error(transparent)]
    Setup(Box<SetupError>),
    /// A replication message could not be decoded; nothing past `lsn` was acknowledged.
    #[error("cannot decode the replication message at {lsn}; nothing at or after it was acknowledged")]
    Decode {
        /// Where the message starts.
        lsn: Lsn,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// A well-formed message that walbust does not expect here.
    #[error("unexpected replication message at {lsn}: {what}; nothing at or after it was acknowledged")]
    Unexpected {
        /// Where the message starts.
        lsn: Lsn,
        /// What it was.
        what: String,
    },
    /// The read side went silent longer than `read_timeout`.
    #[error("no message from the server for {0:?}, although a reply was requested")]
    Silent(Duration),
    /// Shutdown could not apply the last batch in time; it was not acknowledged and will replay.
    #[error(
        "redis did not take the last batch within {0:?}; it was not acknowledged and will be replayed on the next start"
    )]
    ShutdownUnapplied(Duration),
}

impl From<SetupError> for PipelineError {
    fn from(e: SetupError) -> Self {
        PipelineError::Setup(Box::new(e))
    }
}

impl From<StreamError> for PipelineError {
    fn from(e: StreamError) -> Self {
        match e {
            StreamError::Decode { lsn, source } => PipelineError::Decode { lsn, source },
            StreamError::Unexpected { lsn, what } => PipelineError::Unexpected { lsn, what },
            StreamError::Silent(silent) => PipelineError::Silent(silent),
        }
    }
}

impl PipelineError {
    /// True when only a person can fix the cause (credentials, server settings, the
    /// publication, the slot): `walbust run` then exits with its own code, so a supervisor
    /// does not restart it in a loop.
    pub fn needs_person(&self) -> bool {
        match self {
            PipelineError::Connect(e) | PipelineError::Start(e) | PipelineError::Source(e) => e.needs_person(),
            PipelineError::Setup(e) => e.needs_person(),
            PipelineError::Decode { .. }
            | PipelineError::Unexpected { .. }
            | PipelineError::Silent(_)
            | PipelineError::ShutdownUnapplied(_) => false,
        }
    }

    /// True when reconnecting may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            PipelineError::Connect(e) | PipelineError::Start(e) | PipelineError::Source(e) => e.is_transient(),
            PipelineError::Setup(e) => e.is_transient(),
            PipelineError::Silent(_) => true,
            PipelineError::Decode { .. } | PipelineError::Unexpected { .. } | PipelineError::ShutdownUnapplied(_) => {
                false
            }
        }
    }
}

/// What the pipeline reports to an observer (the demo, tests).
#[derive(Debug, Clone)]
pub enum Event {
    /// Streaming started (or restarted after a reconnect) at `start`.
    Streaming {
        /// The position streaming resumed from.
        start: Lsn,
    },
    /// A batch was applied by the sink.
    Applied {
        /// The routed changes whose actions were in the batch.
        changes: Vec<ChangeRecord>,
        /// The commits the batch completed.
        commits: Vec<CommitRecord>,
        /// The deduplicated actions applied.
        actions: Vec<Action>,
        /// When the sink acknowledged the batch.
        at: SystemTime,
    },
}

/// A batch on its way to the applier.
struct Sealed {
    seq: u64,
    actions: Vec<Action>,
    /// Where each action came from, by position (none for flush actions).
    origins: Vec<Option<Origin>>,
    ack: Option<Lsn>,
    commits: Vec<CommitRecord>,
    changes: Vec<ChangeRecord>,
    /// The transactions whose actions are in the batch, for the visibility gate.
    xids: Vec<u32>,
}

/// What the applier has done, as the reader sees it.
#[derive(Debug, Clone, Copy, Default)]
struct Applied {
    /// The last batch applied.
    seq: u64,
    /// Where every first delete is applied.
    applied: Lsn,
    /// Where every second delete is applied too.
    durable: Lsn,
    /// Second deletes are pending: a position received now is not durable before them.
    pending: bool,
}

impl Applied {
    /// Notes batch `seq` applied, and the position it acknowledges if it has one; that
    /// position is durable too unless second deletes wait before it.
    fn record(&mut self, seq: u64, ack: Option<Lsn>, pending: bool) {
        self.seq = seq;
        self.pending = pending;
        if let Some(lsn) = ack {
            self.applied = self.applied.max(lsn);
        }
        if !pending {
            self.durable = self.applied;
        }
    }

    /// Notes second deletes applied through `ack`.
    fn redeleted(&mut self, ack: Option<Lsn>, pending: bool) {
        self.pending = pending;
        if let Some(lsn) = ack {
            self.durable = self.durable.max(lsn);
        }
        if !pending {
            self.durable = self.applied;
        }
    }
}

/// What the caller can attach to a running pipeline.
pub struct Options {
    /// Receives an [`Event`] per applied batch (the demo, tests).
    pub observer: Option<mpsc::UnboundedSender<Event>>,
    /// New rule sets (SIGHUP); each is swapped in at the next transaction boundary.
    pub reload: Option<watch::Receiver<Arc<RuleSet>>>,
    /// Where the pipeline counts (`walbust run` serves it on `[metrics] listen`); keep a
    /// clone to read the counts, as the tests and the bench do.
    pub metrics: Arc<Metrics>,
    /// What /healthz reports.
    pub health: Arc<Health>,
}

impl Default for Options {
    fn default() -> Self {
        Options { observer: None, reload: None, metrics: Metrics::new(), health: Health::new() }
    }
}

/// A pipeline running on a task of its own: how `walbust demo`, the tests and the
/// benchmarks start one. It runs until [`Spawned::stop`] (which stops it as SIGTERM does)
/// or an error.
#[derive(Debug)]
pub struct Spawned {
    stop: StopHandle,
    handle: tokio::task::JoinHandle<Result<(), PipelineError>>,
}

/// Asks a [`Spawned`] pipeline to stop, from any task or thread.
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<watch::Sender<bool>>);

impl StopHandle {
    /// Asks the pipeline to stop; it finishes as on SIGTERM.
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

/// Starts [`run`] on a task of the current runtime.
pub fn spawn<S: Sink + Send + 'static>(config: Config, rules: Arc<RuleSet>, sink: S, options: Options) -> Spawned {
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let handle = tokio::spawn(async move {
        let stop = async move {
            // A dropped handle stops nothing: the pipeline runs until asked or failing.
            if stop_rx.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        run(&config, rules, sink, stop, options).await
    });
    Spawned { stop: StopHandle(Arc::new(stop_tx)), handle }
}

impl Spawned {
    /// A handle that asks the pipeline to stop.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Whether the pipeline has stopped.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Asks the pipeline to stop, as SIGTERM does, and returns how it ended.
    pub async fn stop(self) -> Result<(), PipelineError> {
        self.stop.stop();
        self.join().await
    }

    /// Waits for the pipeline to stop, by itself or when asked, and returns how it ended.
    pub async fn join(self) -> Result<(), PipelineError> {
        match self.handle.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("the pipeline task was cancelled: {e}"),
        }
    }
}

/// Runs the pipeline until `shutdown` resolves or a fatal error occurs.
pub async fn run<S: Sink>(
    config: &Config,
    rules: Arc<RuleSet>,
    sink: S,
    shutdown: impl Future<Output = ()>,
    options: Options,
) -> Result<(), PipelineError> {
    let Options { observer, reload, metrics, health } = options;
    let (mut reader, rx, applied_tx) = Reader::detached(config, rules, Progress::default());
    let abandon = Arc::new(tokio::sync::Notify::new());
    let consistency = &config.consistency;
    let gate = consistency
        .visibility_gate
        .then(|| VisibilityGate::new(config.source.conninfo.clone(), config.source.slot.clone(), metrics.clone()));
    let redeletes = consistency.redelete_after.map(|after| Redeletes::new(after, redelete::DEFAULT_MAX_BYTES));
    let applier = tokio::spawn(apply_loop(
        sink,
        rx,
        applied_tx,
        Observers {
            events: observer.clone(),
            dead_letter_file: config.redis.dead_letter_file.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            sessions: reader.sessions.clone(),
            slot: config.source.slot.clone(),
        },
        Consistency { gate, redeletes },
        abandon.clone(),
    ));
    reader.observer = observer;
    reader.reload = reload;
    reader.metrics = metrics;
    reader.health = health;
    let nonce = reader.heartbeat_nonce;
    let heartbeat = config
        .source
        .heartbeat_interval
        .map(|every| tokio::spawn(heartbeat(config.source.conninfo.clone(), every, nonce)));
    let wait_calls = tokio::spawn(crate::daemon::wait_calls::read_wait_calls(
        config.source.conninfo.clone(),
        reader.metrics.clone(),
    ));
    // Fused: after a stop is requested, a failure while finishing must not poll it again.
    let shutdown = shutdown.fuse();
    tokio::pin!(shutdown);
    let result = reader.run(shutdown.as_mut()).await;
    if let Some(h) = heartbeat {
        h.abort();
    }
    wait_calls.abort();
    drop(reader.tx);
    // Let the applier finish what it holds; if Redis is down, stop waiting after a grace period.
    let wait = tokio::time::timeout(SHUTDOWN_GRACE, applier);
    match wait.await {
        Ok(_) => result,
        Err(_) => {
            abandon.notify_one();
            if result.is_ok() {
                let unapplied = PipelineError::ShutdownUnapplied(SHUTDOWN_GRACE);
                warn!(error = %unapplied, "stopped with a batch unapplied");
            }
            result
        }
    }
}

/// Where the applier reports what it did.
struct Observers {
    events: Option<mpsc::UnboundedSender<Event>>,
    dead_letter_file: Option<std::path::PathBuf>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// The reader's session count, and the slot the fence is claimed for.
    sessions: Arc<AtomicU64>,
    slot: String,
}

/// How often the applier pings Redis while no batch comes and Redis answers.
const PING_IDLE: Duration = Duration::from_secs(5);

/// How often it pings while Redis does not answer, so a recovery shows within seconds.
const PING_DOWN: Duration = Duration::from_secs(1);

/// How long a ping may take before Redis counts as unreachable.
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// What the applier keeps across batches: whether Redis answers (it keeps `/healthz` and
/// the reachable gauge current and logs each outage as [`Outage`] says), and the session
/// the write-through fence was last claimed for.
#[derive(Default)]
struct RedisState {
    outage: Outage,
    claimed: u64,
}

impl RedisState {
    fn answered(&mut self, observers: &Observers) {
        observers.metrics.set_redis_reachable(true);
        observers.health.redis_reachable();
        if let Some(outage) = self.outage.ended() {
            info!(outage = ?outage, "redis reachable again after {}", rounded(outage));
        }
    }

    /// Redis failed for `reason`; true when this is worth a WARN.
    fn failed(&mut self, observers: &Observers, reason: &str) -> bool {
        observers.metrics.set_redis_reachable(false);
        observers.health.redis_unreachable(reason);
        self.outage.failed()
    }

    /// Pings Redis while no batch comes, so that a Redis that is down shows without a write.
    async fn ping<S: Sink>(&mut self, sink: &mut S, observers: &Observers) {
        let reason = match tokio::time::timeout(PING_TIMEOUT, sink.ping()).await {
            Ok(Ok(())) => return self.answered(observers),
            Ok(Err(e)) => error_chain(&e),
            Err(_) => format!("no answer to PING within {}", rounded(PING_TIMEOUT)),
        };
        if self.failed(observers, &reason) {
            warn!(error = %reason, down_for = ?self.outage.length(), "redis does not answer a ping; /healthz reports it until it does");
        } else {
            debug!(error = %reason, "redis still does not answer a ping");
        }
    }
}

/// The visibility gate and the second deletes, each absent when turned off.
struct Consistency {
    gate: Option<VisibilityGate>,
    redeletes: Option<Redeletes>,
}

async fn apply_loop<S: Sink>(
    mut sink: S,
    mut rx: mpsc::Receiver<Sealed>,
    applied: watch::Sender<Applied>,
    observers: Observers,
    consistency: Consistency,
    abandon: Arc<tokio::sync::Notify>,
) {
    let Consistency { mut gate, mut redeletes } = consistency;
    let mut redis = RedisState::default();
    // The first ping goes at once, before the gate's first connection is waited for: a wrong
    // URL or a Redis that is down shows before any write, however slow Postgres answers.
    redis.ping(&mut sink, &observers).await;
    let mut next_ping = tokio::time::Instant::now() + if redis.outage.is_on() { PING_DOWN } else { PING_IDLE };
    if let Some(gate) = gate.as_mut() {
        gate.connected().await;
    }
    loop {
        let due = redeletes.as_ref().and_then(Redeletes::next_due).map(tokio::time::Instant::from_std);
        // A batch goes first: second deletes that are due ride along with it.
        let batch = tokio::select! {
            biased;
            batch = rx.recv() => batch,
            _ = sleep_until_some(due), if due.is_some() => {
                let queue = redeletes.as_mut().expect("a second delete is due only when they are on");
                if !redelete_due(&mut sink, queue, &applied, &observers, &mut redis, &abandon).await {
                    return;
                }
                continue;
            }
            _ = tokio::time::sleep_until(next_ping) => {
                redis.ping(&mut sink, &observers).await;
                next_ping = tokio::time::Instant::now() + if redis.outage.is_on() { PING_DOWN } else { PING_IDLE };
                continue;
            }
        };
        let Some(mut batch) = batch else { break };
        let visible_at = match gate.as_mut() {
            Some(gate) => match gate.pass(&batch.xids, &abandon).await {
                Passed::Abandoned => return,
                Passed::Visible { at, .. } => at,
                Passed::Bypassed => Instant::now(),
            },
            None => Instant::now(),
        };
        // Second deletes already due go in the same round trip, after the batch's own
        // actions: a batch never waits behind a separate one.
        let mut due = redeletes.as_mut().map(|q| q.take_due(Instant::now())).unwrap_or_default();
        let own = batch.actions.len();
        batch.actions.append(&mut due.actions);
        let sent_at = Instant::now();
        if !apply_with_retry(&mut sink, &batch.actions, &observers, &mut redis, &abandon).await {
            return;
        }
        next_ping = tokio::time::Instant::now() + PING_IDLE;
        let Observers { events, dead_letter_file, metrics, .. } = &observers;
        for dead in sink.take_dead_letters() {
            // Past the batch's own actions there are no origins: a second delete shows as one.
            set_aside(&batch.actions, &batch.origins, &dead, metrics, dead_letter_file.as_deref());
        }
        due.actions = batch.actions.split_off(own);
        if let Some(queue) = redeletes.as_ref() {
            redeletes_done(queue, &due, &applied, &observers);
        }
        metrics.batch_applied();
        let now = SystemTime::now();
        for c in &batch.commits {
            metrics.observe_ack_lag(now.duration_since(c.commit_time).unwrap_or_default());
        }
        // Queued when it has deletes or second deletes wait before it: then its position is
        // not durable yet.
        let queued = redeletes.as_mut().is_some_and(|q| q.schedule(&batch.actions, visible_at, sent_at, batch.ack));
        applied.send_modify(|a| a.record(batch.seq, batch.ack, queued));
        if let Some(queue) = redeletes.as_mut() {
            metrics.set_redeletes_pending(queue.len());
            // Past the memory bound, the oldest second deletes go now rather than wait.
            if queue.over_bound() && !redelete_due(&mut sink, queue, &applied, &observers, &mut redis, &abandon).await {
                return;
            }
        }
        if let Some(obs) = events {
            let _ = obs.send(Event::Applied {
                changes: batch.changes,
                commits: batch.commits,
                actions: batch.actions,
                at: now,
            });
        }
    }
    // The reader is gone: pending second deletes still go at their time, until shutdown
    // gives up on them (they are not acknowledged, so the slot replays their batches).
    while let Some(queue) = redeletes.as_mut().filter(|q| !q.is_empty()) {
        let due = queue.next_due().map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = sleep_until_some(due) => {}
            _ = abandon.notified() => return,
        }
        if !redelete_due(&mut sink, queue, &applied, &observers, &mut redis, &abandon).await {
            return;
        }
    }
}

/// Applies `actions`, retrying with backoff until Redis takes them; false when shutdown
/// gave up first. A new replication session may follow another instance's: the
/// write-through fence is claimed for it before anything is written.
async fn apply_with_retry<S: Sink>(
    sink: &mut S,
    actions: &[Action],
    observers: &Observers,
    redis: &mut RedisState,
    abandon: &tokio::sync::Notify,
) -> bool {
    let Observers { metrics, sessions, slot, .. } = observers;
    let mut backoff = Duration::from_millis(50);
    loop {
        let started = Instant::now();
        let session = sessions.load(Ordering::Acquire);
        let mut result = Ok(());
        if session != redis.claimed {
            result = sink.claim(slot).await;
            if result.is_ok() {
                redis.claimed = session;
            }
        }
        if result.is_ok() {
            result = sink.apply(actions).await;
        }
        metrics.observe_redis_apply(started.elapsed());
        let costs = sink.take_costs();
        metrics.keys_deleted(costs.deleted_keys);
        metrics.keys_scanned(costs.scanned_keys);
        for took in costs.scans {
            metrics.observe_scan(took);
        }
        let e = match result {
            Ok(()) => {
                redis.answered(observers);
                return true;
            }
            Err(e) => e,
        };
        metrics.redis_error();
        let reason = error_chain(&e);
        if redis.failed(observers, &reason) {
            warn!(error = %reason, retry_in = ?backoff, actions = actions.len(), failing_for = ?redis.outage.length(),
                "applying a batch failed; retrying, nothing is acknowledged meanwhile");
        } else {
            debug!(error = %reason, retry_in = ?backoff, failing_for = ?redis.outage.length(), "applying a batch failed again");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = abandon.notified() => return false,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Applies the second deletes that are due (or over the memory bound) and moves the
/// durable position past them; false when shutdown gave up first.
async fn redelete_due<S: Sink>(
    sink: &mut S,
    queue: &mut Redeletes,
    applied: &watch::Sender<Applied>,
    observers: &Observers,
    redis: &mut RedisState,
    abandon: &tokio::sync::Notify,
) -> bool {
    let due = queue.take_due(Instant::now());
    if !due.actions.is_empty() {
        if !apply_with_retry(sink, &due.actions, observers, redis, abandon).await {
            return false;
        }
        for dead in sink.take_dead_letters() {
            set_aside(&due.actions, &[], &dead, &observers.metrics, observers.dead_letter_file.as_deref());
        }
    }
    redeletes_done(queue, &due, applied, observers);
    true
}

/// Counts the second deletes `due`, just applied, and moves the durable position past them.
fn redeletes_done(queue: &Redeletes, due: &Due, applied: &watch::Sender<Applied>, observers: &Observers) {
    if due.entries == 0 {
        return;
    }
    if due.early > 0 {
        warn!(
            early = due.early,
            bound_bytes = queue.max_bytes(),
            "second deletes applied before redelete_after passed: the queue is at its memory bound"
        );
    }
    observers.metrics.redeletes_applied(due.actions.len(), due.early);
    observers.metrics.set_redeletes_pending(queue.len());
    let pending = !queue.is_empty();
    applied.send_modify(|a| a.redeleted(due.ack, pending));
}

/// Logs, counts and (when configured) writes down an action Redis refused for good. The
/// batch counts as applied: retrying the same command would fail the same way and stop
/// every invalidation behind it.
fn set_aside(
    actions: &[Action],
    origins: &[Option<Origin>],
    dead: &DeadLetter,
    metrics: &Metrics,
    file: Option<&std::path::Path>,
) {
    let Some(action) = actions.get(dead.action) else { return };
    let origin = origins.get(dead.action).cloned().flatten();
    // Flush actions and second deletes carry no origin.
    let rule = origin.as_ref().map_or("(flush)", |o| &*o.rule);
    let lsn = origin.as_ref().map(|o| o.lsn.to_string()).unwrap_or_default();
    metrics.dead_letter(rule, action.kind());
    error!(rule = %rule, lsn = %lsn, kind = action.kind(), error = %dead.error,
        "redis refused an action for good; it is set aside as a dead letter and the stream goes on");
    let Some(path) = file else { return };
    let line = serde_json::json!({
        "unix_time": SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64(),
        "rule": rule,
        "lsn": lsn,
        "action": action.to_string(),
        "error": dead.error,
    });
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()));
    if let Err(e) = written {
        error!(file = %path.display(), error = %e, "cannot append to dead_letter_file");
    }
}

enum SessionEnd {
    Shutdown,
    ServerClosed,
}

/// What woke the reader's loop.
enum Wake {
    Shutdown,
    Applied,
    StatusDue,
    BatchDue,
    StatusTick,
    Frame(Option<ReplicationFrame>),
    Reload(Arc<RuleSet>),
}

async fn next_rules(reload: &mut Option<watch::Receiver<Arc<RuleSet>>>) -> Arc<RuleSet> {
    let Some(rx) = reload else { return std::future::pending().await };
    match rx.changed().await {
        Ok(()) => rx.borrow_and_update().clone(),
        // The reloader is gone: no more rule sets will come.
        Err(_) => std::future::pending().await,
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What the reader counts, logs and shows the observer for one change or manual message.
struct ReaderTally<'r> {
    metrics: &'r Metrics,
    counters: &'r mut CounterCache<(usize, usize)>,
    widened_counters: &'r mut CounterCache<(usize, usize)>,
    change_counters: &'r mut CounterCache<(u32, Op)>,
    unmatched_counters: &'r mut CounterCache<u32>,
    transaction: &'r mut TransactionLog,
    /// An observer wants each change with its actions.
    observe: bool,
    xid: u32,
    lsn: Lsn,
}

impl Tally for ReaderTally<'_> {
    fn routed(&mut self, change: &Change<'_>, routed: &[Routed], batch: &mut Batch) {
        let (metrics, relation, op, lsn) = (self.metrics, change.relation, change.op, self.lsn);
        if !routed.is_empty() {
            batch.note_xid(self.xid);
        }
        self.change_counters
            .get((relation.oid, op), || metrics.changes_counter(&relation.qualified_name(), op.as_str()))
            .inc();
        if routed.is_empty() {
            self.unmatched_counters.get(relation.oid, || metrics.unmatched_counter(&relation.qualified_name())).inc();
        }
        if self.transaction.on {
            self.transaction.change(relation, op, routed);
        }
        // Keys may carry row values: only at TRACE, which the docs warn about.
        tracing::trace!(target: TRANSACTIONS, table = %relation.qualified_name(), op = op.as_str(), lsn = %lsn,
            actions = %ActionList(routed), "change");
        if self.observe {
            let mut actions: Vec<Action> = Vec::with_capacity(routed.len());
            for r in routed {
                if !actions.contains(&r.action) {
                    actions.push(r.action.clone());
                }
            }
            let (xid, table) = (self.xid, relation.qualified_name());
            batch.changes.push(ChangeRecord { xid, table, op: op.as_str(), actions });
        }
        for r in routed {
            let kind = r.action.kind();
            // The rule's address is stable while its rule set is in use; the cache is cleared
            // when rules are swapped.
            let key = (Arc::as_ptr(&r.rule).cast::<u8>() as usize, kind.as_ptr() as usize);
            self.counters.get(key, || metrics.actions_counter(&r.rule, kind)).inc();
            if let Some(why) = r.widened {
                let key = (key.0, why.as_str().as_ptr() as usize);
                self.widened_counters.get(key, || metrics.widened_counter(&r.rule, why.as_str())).inc();
                debug!(rule = %r.rule, table = %relation.qualified_name(), reason = %why, lsn = %lsn, "key widened to a pattern");
            }
        }
    }

    fn manual(&mut self, actions: &[Action], batch: &mut Batch) {
        let metrics = self.metrics;
        metrics.manual_message();
        if self.transaction.on {
            self.transaction.message(actions.len());
        }
        if !actions.is_empty() {
            batch.note_xid(self.xid);
        }
        for a in actions {
            let kind = a.kind();
            let key = (MANUAL_RULE.as_ptr() as usize, kind.as_ptr() as usize);
            self.counters.get(key, || metrics.actions_counter(MANUAL_RULE, kind)).inc();
        }
        if self.observe {
            let (xid, actions) = (self.xid, actions.to_vec());
            batch.changes.push(ChangeRecord { xid, table: "(message)".into(), op: "message", actions });
        }
    }

    fn refused(&mut self, action: &Action, refusal: Refusal) {
        self.metrics.manual_refused(refusal.as_str());
        warn!(lsn = %self.lsn, kind = action.kind(), reason = refusal.as_str(),
            "refusing part of a manual invalidation message; see manual_prefixes and manual_match_all in the config");
    }

    fn malformed(&mut self, error: &ManualError) {
        self.metrics.manual_message();
        self.metrics.manual_refused("malformed");
        warn!(lsn = %self.lsn, error = %error_chain(error), "skipping a manual invalidation message");
    }
}

/// The target of the per-transaction log lines: one at DEBUG per transaction (tables, ops,
/// rules fired, number of actions), and one at TRACE per change with its actions, keys
/// included. Off unless asked for, e.g. `--log-level info,walbust::transactions=debug`.
pub const TRANSACTIONS: &str = "walbust::transactions";

/// What one transaction did, gathered for its DEBUG line only while that line is enabled.
#[derive(Debug, Default)]
struct TransactionLog {
    /// Gathering for the transaction in progress.
    on: bool,
    /// `(table, op)` and how many changes of it, in order of first appearance.
    changes: Vec<(String, &'static str, u64)>,
    /// The rules that produced an action, in order of first appearance.
    rules: Vec<Arc<str>>,
    actions: usize,
}

impl TransactionLog {
    fn begin(&mut self) {
        self.on = tracing::enabled!(target: TRANSACTIONS, tracing::Level::DEBUG);
        self.changes.clear();
        self.rules.clear();
        self.actions = 0;
    }

    fn change(&mut self, relation: &Relation, op: Op, routed: &[Routed]) {
        self.change_named(&relation.qualified_name(), op.as_str());
        for r in routed {
            if !self.rules.contains(&r.rule) {
                self.rules.push(r.rule.clone());
            }
        }
        self.actions += routed.len();
    }

    fn message(&mut self, actions: usize) {
        self.change_named(MANUAL_RULE, "message");
        if actions > 0 && !self.rules.iter().any(|r| &**r == MANUAL_RULE) {
            self.rules.push(MANUAL_RULE.into());
        }
        self.actions += actions;
    }

    fn change_named(&mut self, table: &str, op: &'static str) {
        match self.changes.iter_mut().find(|(t, o, _)| t == table && *o == op) {
            Some((_, _, n)) => *n += 1,
            None => self.changes.push((table.to_string(), op, 1)),
        }
    }

    /// Logs the transaction that committed at `lsn`, when gathering.
    fn commit(&mut self, xid: u32, lsn: Lsn) {
        if !std::mem::take(&mut self.on) {
            return;
        }
        let changes = self
            .changes
            .iter()
            .map(|(t, o, n)| if *n == 1 { format!("{t} {o}") } else { format!("{t} {o} x{n}") })
            .collect::<Vec<_>>()
            .join(", ");
        let rules = self.rules.iter().map(|r| &**r).collect::<Vec<_>>().join(", ");
        debug!(target: TRANSACTIONS, xid, lsn = %lsn, changes = %changes, rules = %rules, actions = self.actions, "transaction");
    }
}

/// The actions of routed changes, for a TRACE line.
struct ActionList<'a>(&'a [Routed]);

impl std::fmt::Display for ActionList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} ({})", r.action, r.rule)?;
        }
        Ok(())
    }
}

struct Reader<'a> {
    config: &'a Config,
    routing: Routing,
    progress: Progress,
    tx: mpsc::Sender<Sealed>,
    applied: watch::Receiver<Applied>,
    applied_seq: u64,
    /// Second deletes are pending in the applier.
    redeletes_pending: bool,
    sent_seq: u64,
    observer: Option<mpsc::UnboundedSender<Event>>,
    last_status: Instant,
    status_due: Option<Instant>,
    reload: Option<watch::Receiver<Arc<RuleSet>>>,
    pending_rules: Option<Arc<RuleSet>>,
    slot: SlotState,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Action counters by (address of the rule's name, address of the kind's name).
    counters: CounterCache<(usize, usize)>,
    /// Widening counters by (address of the rule's name, address of the reason's name).
    widened_counters: CounterCache<(usize, usize)>,
    /// Change counters by (relation OID, op).
    change_counters: CounterCache<(u32, Op)>,
    /// Counters of changes no rule acted on, by relation OID.
    unmatched_counters: CounterCache<u32>,
    /// The transaction in progress, for its DEBUG line.
    transaction: TransactionLog,
    /// Replication is down and being retried.
    outage: Outage,
    /// Identifies this process's own heartbeats.
    heartbeat_nonce: u64,
    /// Sessions that reached streaming; when it changes, the applier claims the Redis
    /// fence before the next batch, so a write-through from an instance that held the slot
    /// before is refused from then on.
    sessions: Arc<AtomicU64>,
}

/// What the reader knows about its slot across reconnects.
#[derive(Debug, Clone, Copy, Default)]
struct SlotState {
    /// Streaming from the slot has started at least once: if it vanishes, it was lost.
    held: bool,
    /// The slot was lost and on_slot_lost = "recreate": the next connection recreates it.
    replace_lost: bool,
    /// The server timeline seen at the last connection.
    timeline: Option<u32>,
}

/// The state of one replication session: the stream's transaction state and what is batched.
struct Session {
    logical: LogicalStream,
    batch: Batch,
}

impl Session {
    fn new() -> Self {
        Session { logical: LogicalStream::new(), batch: Batch::new() }
    }

    fn in_transaction(&self) -> bool {
        self.logical.in_open_transaction()
    }
}

impl<'a> Reader<'a> {
    /// A reader at `progress` with no applier behind its channel, no observer and no reload:
    /// whoever holds the receiver and the sender plays the applier.
    fn detached(
        config: &'a Config,
        rules: Arc<RuleSet>,
        progress: Progress,
    ) -> (Reader<'a>, mpsc::Receiver<Sealed>, watch::Sender<Applied>) {
        let (tx, rx) = mpsc::channel(1);
        let (applied_tx, applied) = watch::channel(Applied::default());
        let reader = Reader {
            config,
            routing: Routing::new(rules),
            progress,
            tx,
            applied,
            applied_seq: 0,
            redeletes_pending: false,
            sent_seq: 0,
            observer: None,
            last_status: Instant::now(),
            status_due: None,
            reload: None,
            pending_rules: None,
            slot: SlotState::default(),
            metrics: Metrics::new(),
            health: Health::new(),
            counters: CounterCache::default(),
            widened_counters: CounterCache::default(),
            change_counters: CounterCache::default(),
            unmatched_counters: CounterCache::default(),
            transaction: TransactionLog::default(),
            outage: Outage::default(),
            heartbeat_nonce: heartbeat_nonce(),
            sessions: Arc::default(),
        };
        (reader, rx, applied_tx)
    }
}

impl Reader<'_> {
    async fn run(&mut self, mut shutdown: Pin<&mut impl FusedFuture<Output = ()>>) -> Result<(), PipelineError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = self.session(shutdown.as_mut()).await;
            if shutdown.is_terminated() {
                // A stop was requested: whatever went wrong while finishing, nothing is lost,
                // since only what Redis applied was ever acknowledged.
                if let Err(e) = attempt {
                    warn!(slot = %self.config.source.slot, flushed = %self.progress.flushed(), error = %error_chain(&e),
                        "stopped without acknowledging the last applied commits; they will be replayed on the next start");
                }
                return Ok(());
            }
            let err = match attempt {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Ok(SessionEnd::ServerClosed) => {
                    warn!(slot = %self.config.source.slot, "server ended the replication stream; reconnecting");
                    backoff = Duration::from_millis(100);
                    None
                }
                Err(PipelineError::Setup(e)) if matches!(*e, SetupError::SlotLost { .. }) => {
                    match self.config.source.on_slot_lost {
                        // The caller reports the error that stops the pipeline, once.
                        OnSlotLost::Error => return Err(PipelineError::Setup(e)),
                        OnSlotLost::Recreate => {
                            error!(slot = %self.config.source.slot, error = %error_chain(&*e), "the replication slot was lost; recreating it (on_slot_lost = \"recreate\")");
                            self.slot.replace_lost = true;
                            None
                        }
                    }
                }
                Err(e) if e.is_transient() => Some(e),
                // Not one that retrying can fix: the caller reports it, once.
                Err(e) => return Err(e),
            };
            self.metrics.set_active(false);
            if let Some(e) = err {
                if matches!(&e, PipelineError::Setup(s) if matches!(**s, SetupError::SlotBusy { .. })) {
                    // Another instance holds the slot: stand by, saying so once, and ask
                    // again often enough to take over within standby_takeover of its release.
                    let every = self.config.source.standby_takeover / 2;
                    if !self.health.is_standby() {
                        warn!(slot = %self.config.source.slot, error = %error_chain(&e), takeover = ?self.config.source.standby_takeover,
                            "standing by: another process holds the slot; taking it over once it lets go");
                        self.health.standby();
                    } else {
                        debug!(slot = %self.config.source.slot, "still standing by");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = shutdown.as_mut() => return Ok(()),
                    }
                    backoff = Duration::from_millis(100);
                    continue;
                }
                self.health.not_streaming(&format!("reconnecting after: {}", error_chain(&e)));
                self.metrics.set_streaming(false);
                if self.outage.failed() {
                    warn!(slot = %self.config.source.slot, error = %error_chain(&e), retry_in = ?backoff, down_for = ?self.outage.length(),
                        "replication interrupted; reconnecting");
                } else {
                    debug!(slot = %self.config.source.slot, error = %error_chain(&e), retry_in = ?backoff, down_for = ?self.outage.length(),
                        "replication still interrupted; reconnecting");
                }
            }
            self.metrics.reconnect();
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.as_mut() => return Ok(()),
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn session(&mut self, mut shutdown: Pin<&mut impl Future<Output = ()>>) -> Result<SessionEnd, PipelineError> {
        let source = &self.config.source;
        let rules = self.routing.rules().clone();
        let policy = SlotPolicy {
            may_create: source.create_slot && !self.slot.held,
            replace_lost: self.slot.replace_lost,
            known_timeline: self.slot.timeline,
            held_before: self.slot.held,
            failover: source.failover,
        };
        let connect = async {
            let mut conn = ReplicationConn::connect(&source.conninfo, true).await.map_err(PipelineError::Connect)?;
            let target = slot::Target {
                slot: &source.slot,
                publication: &source.publication,
                dbname: &source.conninfo.dbname,
                create_publication: crate::daemon::fix::create_publication(&source.publication, &rules.tables()),
            };
            let position = slot::prepare(&mut conn, &target, policy).await?;
            Ok::<_, PipelineError>((conn, position))
        };
        let (conn, position) = tokio::select! {
            r = connect => r?,
            _ = shutdown.as_mut() => return Ok(SessionEnd::Shutdown),
        };
        self.absorb_applied();
        if position.created && self.slot.replace_lost {
            self.flush_after_recreate().await;
        }
        self.slot = SlotState { held: true, replace_lost: false, timeline: Some(position.timeline) };
        let start = self.progress.flushed().max(position.start);
        self.progress.flush(start);
        let publication = crate::postgres::quote::quote_ident(&source.publication);
        let options = crate::postgres::pgoutput_options(&publication);
        let mut stream = conn.start_replication(&source.slot, start, &options).await.map_err(|e| {
            match e.server_message() {
                // The slot exists but its WAL is gone (invalidated between the check and the start).
                Some(message) if e.code() == Some("55000") && message.contains("no longer get changes") => {
                    PipelineError::from(SetupError::SlotLost { slot: source.slot.clone(), reason: message.to_string() })
                }
                _ => PipelineError::Start(e),
            }
        })?;
        if self.health.is_standby() {
            info!(slot = %source.slot, "the slot was released; taking over from standby");
        }
        self.sessions.fetch_add(1, Ordering::AcqRel);
        match self.outage.ended() {
            Some(outage) => info!(slot = %source.slot, lsn = %start, outage = ?outage,
                "streaming changes again after {}", rounded(outage)),
            None => info!(slot = %source.slot, lsn = %start, created = position.created, "streaming changes"),
        }
        self.health.streaming();
        self.metrics.set_streaming(true);
        self.metrics.set_active(true);
        if let Some(obs) = &self.observer {
            let _ = obs.send(Event::Streaming { start });
        }
        self.routing.clear();
        let mut session = Session::new();
        let end = self.stream(&mut stream, &mut session, shutdown.as_mut()).await;
        match end {
            Ok(SessionEnd::Shutdown) => {
                self.finish(&mut stream, &mut session).await?;
                // The final status update is written: only now is everything applied acknowledged.
                info!(slot = %self.config.source.slot, flushed = %self.progress.flushed(), "stopped; everything applied is acknowledged");
                if let Err(e) = stream.finish().await {
                    debug!(error = %error_chain(&e), "closing the replication stream after the final acknowledgement");
                }
                Ok(SessionEnd::Shutdown)
            }
            other => other,
        }
    }

    /// After a lost slot is recreated: the invalidations in between are gone, so run the
    /// configured `flush` actions before streaming from the new slot.
    async fn flush_after_recreate(&mut self) {
        let actions = self.config.source.flush.clone();
        warn!(slot = %self.config.source.slot, actions = actions.len(), "running the flush actions for the recreated slot");
        self.sent_seq += 1;
        let batch = Sealed {
            seq: self.sent_seq,
            actions,
            origins: Vec::new(),
            ack: None,
            commits: Vec::new(),
            changes: Vec::new(),
            xids: Vec::new(),
        };
        // The applier holds the receiver for as long as the reader runs.
        let _ = self.tx.send(batch).await;
    }

    /// On shutdown: hand over the batch in hand, wait for it to apply, acknowledge it.
    async fn finish(&mut self, stream: &mut ReplicationStream, session: &mut Session) -> Result<(), PipelineError> {
        if !session.batch.is_empty() {
            let batch = self.seal(&mut session.batch);
            let sent = tokio::time::timeout(SHUTDOWN_GRACE, self.tx.send(batch)).await;
            if !matches!(sent, Ok(Ok(()))) {
                return Err(PipelineError::ShutdownUnapplied(SHUTDOWN_GRACE));
            }
        }
        // Pending second deletes are waited for at their time, so that their position is
        // acknowledged too; past the grace period they are left to replay.
        let grace = SHUTDOWN_GRACE + self.config.consistency.redelete_after.unwrap_or_default();
        let deadline = tokio::time::Instant::now() + grace;
        while self.applied_seq < self.sent_seq || self.redeletes_pending {
            if tokio::time::timeout_at(deadline, self.applied.changed()).await.is_err() {
                // Acknowledge what is durable; the rest replays.
                self.send_status(stream, false).await?;
                return Err(PipelineError::ShutdownUnapplied(grace));
            }
            self.absorb_applied();
        }
        self.send_status(stream, false).await
    }

    async fn stream(
        &mut self,
        stream: &mut ReplicationStream,
        session: &mut Session,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> Result<SessionEnd, PipelineError> {
        let batch_config = &self.config.batch;
        let status_interval = self.config.source.status_interval;
        let mut status = tokio::time::interval(status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let full = |batch: &Batch| batch.len() >= batch_config.max_actions || batch.bytes() >= MAX_BATCH_BYTES;
        loop {
            if !session.in_transaction()
                && let Some(rules) = self.pending_rules.take()
            {
                self.swap_rules(session, rules);
            }
            // Hand the batch over to an idle applier once it is full, old, or the stream is idle
            // between transactions. While Redis works on one batch the next keeps filling, so a
            // busy stream costs one round trip per batch rather than per transaction. The server
            // sends a transaction only once it has committed, all in one burst, so waiting for
            // its Commit costs no latency; a very large one goes in full batches meanwhile. A
            // batch that holds a commit goes even when the next transaction has begun to arrive,
            // so a steady stream never keeps a committed transaction waiting on the next one.
            let applier_idle = self.applied_seq == self.sent_seq;
            let settled =
                !stream.has_buffered_frame() && (!session.in_transaction() || !session.batch.commits.is_empty());
            if applier_idle
                && !session.batch.is_empty()
                && (full(&session.batch) || settled || session.batch.older_than(batch_config.max_delay))
            {
                let batch = self.seal(&mut session.batch);
                // The applier has taken every batch sent so far, so the channel has room.
                self.tx.try_send(batch).expect("the applier holds an empty channel while the reader runs");
            }
            // A batch held back only by an open transaction still goes once it is old.
            let batch_due = match session.batch.opened() {
                // Checked: a delay past the clock's range means the age alone never sends it.
                Some(opened) if applier_idle && session.in_transaction() => {
                    opened.checked_add(batch_config.max_delay).map(tokio::time::Instant::from_std)
                }
                _ => None,
            };
            let status_due = self.status_due.map(tokio::time::Instant::from_std);
            let wake = tokio::select! {
                biased;
                _ = shutdown.as_mut() => Wake::Shutdown,
                changed = self.applied.changed() => {
                    // The applier only stops when this reader drops its sender.
                    changed.expect("applier stopped while the reader still holds its channel");
                    Wake::Applied
                }
                _ = sleep_until_some(status_due), if status_due.is_some() => Wake::StatusDue,
                _ = sleep_until_some(batch_due), if batch_due.is_some() => Wake::BatchDue,
                _ = status.tick() => Wake::StatusTick,
                frame = stream.next(), if !full(&session.batch) => Wake::Frame(frame?),
                rules = next_rules(&mut self.reload) => Wake::Reload(rules),
            };
            match wake {
                Wake::Shutdown => return Ok(SessionEnd::Shutdown),
                Wake::Applied => self.absorb_applied(),
                // The next round hands the batch over.
                Wake::BatchDue => {}
                Wake::StatusDue => self.send_status(stream, false).await?,
                Wake::StatusTick => {
                    let silent = session.logical.silence(self.config.source.read_timeout)?;
                    // Ask for a reply when the server has been quiet, so a dead link shows up.
                    self.send_status(stream, silent >= status_interval).await?;
                }
                Wake::Reload(rules) => self.pending_rules = Some(rules),
                Wake::Frame(frame) => {
                    if let Some(end) = self.on_frame(stream, session, frame).await? {
                        return Ok(end);
                    }
                    // Frames already buffered are taken here rather than by another round of
                    // the select: no I/O is involved, and a backlog drains without rebuilding
                    // every branch per frame. The budget keeps timers and shutdown prompt.
                    for _ in 0..BUFFERED_FRAMES_PER_ROUND {
                        if full(&session.batch) || !stream.has_buffered_frame() {
                            break;
                        }
                        // A buffered frame is ready without waiting on the socket.
                        let Some(frame) = stream.next().now_or_never() else { break };
                        if let Some(end) = self.on_frame(stream, session, frame?).await? {
                            return Ok(end);
                        }
                    }
                    if session.in_transaction() && stream.caught_up() && !stream.has_buffered_frame() {
                        // A blocking wait on purpose: an await would wake for the very next
                        // message. The applier shares this thread and loses at most this long.
                        std::thread::sleep(MID_TRANSACTION_PAUSE);
                    }
                }
            }
        }
    }

    /// Handles one frame of the stream; `Some` when it ends the session.
    async fn on_frame(
        &mut self,
        stream: &mut ReplicationStream,
        session: &mut Session,
        frame: Option<ReplicationFrame>,
    ) -> Result<Option<SessionEnd>, PipelineError> {
        let Some(frame) = frame else { return Ok(Some(SessionEnd::ServerClosed)) };
        if self.take_frame(session, frame)? {
            self.send_status(stream, false).await?;
        }
        Ok(None)
    }

    /// The part of [`Reader::on_frame`] that needs no connection; true when the server
    /// asked for a status update.
    fn take_frame(&mut self, session: &mut Session, frame: ReplicationFrame) -> Result<bool, PipelineError> {
        if let ReplicationFrame::XLogData { wal_start, wal_end, .. } = frame {
            self.progress.receive(wal_start);
            self.metrics.set_received(wal_start);
            self.metrics.set_server_wal_end(wal_end);
        }
        let Session { logical, batch } = session;
        let event = logical.frame(frame)?;
        self.on_event(batch, event)
    }

    /// Acts on one event of the stream; true when the server asked for a status update.
    fn on_event(&mut self, batch: &mut Batch, event: StreamEvent<'_>) -> Result<bool, PipelineError> {
        match event {
            StreamEvent::Keepalive { wal_end, acknowledge, reply_requested } => {
                self.metrics.set_server_wal_end(wal_end);
                self.progress.receive(wal_end);
                if let Some(lsn) = acknowledge {
                    self.on_keepalive(batch, lsn);
                }
                return Ok(reply_requested);
            }
            StreamEvent::Begin { .. } => self.transaction.begin(),
            StreamEvent::Other { .. } => {}
            StreamEvent::Commit { xid, commit, .. } => {
                self.metrics.commit();
                self.transaction.commit(xid, commit.end_lsn);
                let commit_time = pgoutput::pg_time_to_system(commit.commit_time);
                // A server clock ahead of this one counts as no lag, as for the acknowledgement.
                self.metrics.observe_receive_lag(SystemTime::now().duration_since(commit_time).unwrap_or_default());
                batch.commit(CommitRecord { xid, end_lsn: commit.end_lsn, commit_time });
            }
            StreamEvent::Relation { lsn, relation } => {
                // A Relation message after RENAME or SET SCHEMA brings a new name for a known
                // OID: counters resolved under the old name must be looked up again.
                self.change_counters.clear();
                self.unmatched_counters.clear();
                for m in self.routing.bind(relation) {
                    error!(rule = %m.rule, table = %m.table, column = %m.column, lsn = %lsn,
                        "rule names a column the table does not have; its keys are widened to patterns");
                }
            }
            StreamEvent::Change { lsn, xid, change } => {
                let (routing, mut tally) = self.routing(xid, lsn);
                let mut route = |relation: &Relation, op, old, new| {
                    routing.change(&Change { relation, op, old, new }, lsn, batch, &mut tally);
                };
                match change {
                    RowChange::Insert { relation, new } => route(relation, Op::Insert, None, Some(&new)),
                    RowChange::Update { relation, old, new } => route(relation, Op::Update, old.as_ref(), Some(&new)),
                    RowChange::Delete { relation, old } => route(relation, Op::Delete, Some(&old), None),
                    RowChange::Truncate(truncated) => {
                        for relation in truncated.relations() {
                            route(relation, Op::Truncate, None, None);
                        }
                    }
                }
            }
            StreamEvent::Message { lsn, xid, message } if message.prefix == self.config.source.message_prefix => {
                // A manual invalidation: applied in order with the transaction's row changes.
                let policy = &self.config.source.manual;
                let (routing, mut tally) = self.routing(xid.unwrap_or(0), lsn);
                routing.message(&message.content, policy, lsn, batch, &mut tally);
            }
            StreamEvent::Message { lsn, message, .. } if message.prefix == HEARTBEAT_PREFIX => {
                let sent = heartbeat_time(self.heartbeat_nonce, &message.content);
                if sent.is_none() {
                    debug!(lsn = %lsn, "ignoring a heartbeat message this process did not write");
                }
                if let Some(sent) = sent {
                    let lag = SystemTime::now().duration_since(pgoutput::pg_time_to_system(sent)).unwrap_or_default();
                    self.metrics.set_heartbeat(pgoutput::pg_time_to_system(sent));
                    debug!(lsn = %lsn, lag = ?lag, "heartbeat");
                }
            }
            StreamEvent::Message { lsn, message, .. } => {
                debug!(prefix = %message.prefix, lsn = %lsn, "logical decoding message for another consumer");
            }
        }
        Ok(false)
    }

    /// The routing step, and what the reader keeps for a change or message of `xid` at `lsn`.
    fn routing(&mut self, xid: u32, lsn: Lsn) -> (&mut Routing, ReaderTally<'_>) {
        let tally = ReaderTally {
            metrics: &self.metrics,
            counters: &mut self.counters,
            widened_counters: &mut self.widened_counters,
            change_counters: &mut self.change_counters,
            unmatched_counters: &mut self.unmatched_counters,
            transaction: &mut self.transaction,
            observe: self.observer.is_some(),
            xid,
            lsn,
        };
        (&mut self.routing, tally)
    }

    /// A keepalive between transactions: its position is reported at once when nothing
    /// received is unapplied and no second delete is pending; otherwise it rides on the
    /// batch in hand, behind them.
    fn on_keepalive(&mut self, batch: &mut Batch, wal_end: Lsn) {
        if batch.is_empty() && self.applied_seq == self.sent_seq && !self.redeletes_pending {
            self.flushed(wal_end);
        } else {
            batch.acknowledge_through(wal_end);
        }
    }

    /// Swaps in a reloaded rule set between transactions and binds it to every known relation.
    fn swap_rules(&mut self, session: &Session, rules: Arc<RuleSet>) {
        let count = rules.rules().len();
        self.routing.replace_rules(rules);
        self.counters.clear();
        self.widened_counters.clear();
        self.metrics.reload();
        for relation in session.logical.relations().iter() {
            for m in self.routing.bind(relation) {
                error!(rule = %m.rule, table = %m.table, column = %m.column,
                    "rule names a column the table does not have; its keys are widened to patterns");
            }
        }
        info!(rules = count, lsn = %self.progress.received(), "reloaded rules; they apply from the next transaction");
    }

    fn seal(&mut self, batch: &mut Batch) -> Sealed {
        let mut b = batch.take();
        self.sent_seq += 1;
        let (actions, origins) = b.take_actions_with_origins();
        let (ack, commits, changes, xids) = (b.ack, b.commits, b.changes, b.xids);
        Sealed { seq: self.sent_seq, actions, origins, ack, commits, changes, xids }
    }

    fn absorb_applied(&mut self) {
        let a = *self.applied.borrow_and_update();
        self.applied_seq = a.seq;
        self.redeletes_pending = a.pending;
        // A move of the applied position goes out at once: walbust.wait() callers watch it.
        if self.progress.apply(a.applied) {
            self.status_due = Some(Instant::now());
        }
        self.flushed(a.durable);
    }

    fn flushed(&mut self, lsn: Lsn) {
        if self.progress.flush(lsn) && self.status_due.is_none() {
            self.status_due = Some(self.last_status + STATUS_COALESCE);
        }
    }

    async fn send_status(&mut self, stream: &mut ReplicationStream, reply: bool) -> Result<(), PipelineError> {
        let (applied, flushed) = (self.progress.applied(), self.progress.flushed());
        stream.send_status(applied, flushed, flushed, reply).await?;
        self.metrics.set_applied(applied);
        self.metrics.set_flushed(flushed);
        self.last_status = Instant::now();
        self.status_due = None;
        Ok(())
    }
}

/// The reader's frame handling without a connection, an applier task or timers, for the
/// fuzz targets in `fuzz/` and for tests.
///
/// Each CopyData payload goes through the same frame parser, [`LogicalStream`] (decoder,
/// transaction rules, keepalive rule), router and batch as in [`run`]. When batches are handed
/// over, status updates sent and reconnects made depends on time and the socket, so that
/// part is not here: [`FrameHarness::apply`] stands in for an applier that takes the batch in
/// hand and has Redis acknowledge it at once.
pub struct FrameHarness<'a> {
    reader: Reader<'a>,
    session: Session,
    applied: watch::Sender<Applied>,
    /// Kept so that the reader's channel stays open; sealed batches are acknowledged, not applied.
    _sealed: mpsc::Receiver<Sealed>,
}

impl<'a> FrameHarness<'a> {
    /// A reader at position 0 routing with `rules`, as at the start of a replication session.
    pub fn new(config: &'a Config, rules: Arc<RuleSet>) -> Self {
        let (reader, sealed, applied) = Reader::detached(config, rules, Progress::default());
        FrameHarness { reader, session: Session::new(), applied, _sealed: sealed }
    }

    /// Handles one CopyData payload of the replication stream as the reader does. A
    /// keepalive's reply request is ignored: there is no server to reply to.
    pub fn frame(&mut self, payload: bytes::Bytes) -> Result<(), PipelineError> {
        let frame = crate::postgres::stream::decode_frame(payload).map_err(|what| SourceError::Protocol {
            what,
            host: "(no server)".into(),
            source: None,
        })?;
        self.reader.take_frame(&mut self.session, frame)?;
        Ok(())
    }

    /// Hands the batch in hand to the applier, which has it acknowledged at once.
    pub fn apply(&mut self) {
        if !self.session.batch.is_empty() {
            let sealed = self.reader.seal(&mut self.session.batch);
            self.applied.send_modify(|a| a.record(sealed.seq, sealed.ack, false));
        }
        self.reader.absorb_applied();
    }

    /// The furthest position received.
    pub fn received(&self) -> Lsn {
        self.reader.progress.received()
    }

    /// The position that would be reported to the server as flushed.
    pub fn flushed(&self) -> Lsn {
        self.reader.progress.flushed()
    }

    /// The xid of the open transaction, if a Begin has arrived without its Commit.
    pub fn open_transaction(&self) -> Option<u32> {
        self.session.logical.open().map(|t| t.xid)
    }

    /// Distinct actions in the batch in hand.
    pub fn pending_actions(&self) -> usize {
        self.session.batch.len()
    }

    /// The actions of the batch in hand, in the order the sink would get them.
    pub fn pending(&self) -> impl Iterator<Item = &Action> {
        self.session.batch.actions()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::heartbeat::heartbeat_body;
    use crate::postgres::logical::messages::{begin, commit, insert, logical_message, relation};
    use bytes::Bytes;
    use std::path::Path;

    fn config() -> Config {
        let text = "rules = [\"r/*.toml\"]\n[source]\nurl = \"postgres://u@localhost/db\"\n[redis]\nurl = \"redis://localhost\"\n";
        Config::parse(Path::new("config.toml"), text, &|_| None).expect("test config")
    }

    impl Reader<'_> {
        /// Takes a pgoutput message as the payload of an XLogData frame at `lsn`.
        fn on_message(&mut self, session: &mut Session, lsn: Lsn, data: Bytes) -> Result<(), PipelineError> {
            let frame = ReplicationFrame::XLogData { wal_start: lsn, wal_end: lsn, send_time: 0, data };
            self.take_frame(session, frame).map(|_| ())
        }

        /// Takes a keepalive reporting `wal_end`.
        fn keepalive(&mut self, session: &mut Session, wal_end: Lsn) {
            let frame = ReplicationFrame::Keepalive { wal_end, send_time: 0, reply_requested: false };
            self.take_frame(session, frame).expect("a keepalive breaks no rule");
        }
    }

    fn reader(config: &Config) -> (Reader<'_>, mpsc::Receiver<Sealed>, watch::Sender<Applied>) {
        let (mut reader, rx, applied_tx) =
            Reader::detached(config, Arc::new(RuleSet::default()), Progress::starting_at(Lsn(100)));
        reader.heartbeat_nonce = 7;
        (reader, rx, applied_tx)
    }

    #[test]
    fn a_message_cut_short_is_a_typed_error_with_its_lsn_and_nothing_is_acknowledged() {
        let config = config();
        let (mut r, _rx, _applied) = reader(&config);
        let mut s = Session::new();
        r.on_message(&mut s, Lsn(200), begin(7)).unwrap();
        let cut = commit(600).slice(..10);
        let err = r.on_message(&mut s, Lsn(300), cut).unwrap_err();
        assert!(matches!(err, PipelineError::Decode { lsn: Lsn(300), .. }), "{err:?}");
        assert!(err.to_string().contains("0/12C"), "{err}");
        assert!(!err.is_transient(), "a malformed message is not skipped by reconnecting past it");
        assert_eq!(s.batch.ack, None);
        assert_eq!(r.progress.flushed(), Lsn(100));
    }

    #[test]
    fn an_unknown_tag_is_a_typed_error() {
        let config = config();
        let (mut r, _rx, _applied) = reader(&config);
        let mut s = Session::new();
        let err = r.on_message(&mut s, Lsn(300), Bytes::from_static(b"Zjunk")).unwrap_err();
        assert!(matches!(err, PipelineError::Decode { source: DecodeError::UnknownTag { tag: b'Z' }, .. }), "{err:?}");
        assert_eq!(r.progress.flushed(), Lsn(100));
    }

    #[test]
    fn a_keepalive_inside_a_transaction_is_not_acknowledged() {
        let config = config();
        let (mut r, _rx, _applied) = reader(&config);
        let mut s = Session::new();
        r.on_message(&mut s, Lsn(200), begin(7)).unwrap();
        r.keepalive(&mut s, Lsn(900));
        assert_eq!(r.progress.flushed(), Lsn(100));
        assert_eq!(s.batch.ack, None);
        r.on_message(&mut s, Lsn(210), commit(950)).unwrap();
        assert_eq!(s.batch.ack, Some(Lsn(950)), "the commit's end is acknowledged once its batch applies");
        assert_eq!(r.progress.flushed(), Lsn(100), "not before");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_committed_transaction_does_not_wait_for_the_next_one_to_commit() {
        use crate::postgres::conn::backend_message;
        use crate::postgres::stream::{in_memory, xlog};
        use tokio::io::AsyncWriteExt;
        let mut config = config();
        // Only the hand-over rule can send this batch: its age never comes due here.
        config.batch.max_delay = Duration::from_secs(3600);
        let (mut r, mut rx, _applied) = reader(&config);
        let (mut stream, mut server) = in_memory();
        let mut session = Session::new();
        // Transaction 7 commits; transaction 8 has begun to arrive but not yet committed.
        for (lsn, data) in [(200, begin(7)), (300, commit(600)), (700, begin(8))] {
            server.write_all(&backend_message(b'd', &xlog(lsn, lsn, 0, &data))).await.unwrap();
        }
        let shutdown = std::future::pending::<()>();
        tokio::pin!(shutdown);
        let sealed = tokio::select! {
            end = r.stream(&mut stream, &mut session, shutdown.as_mut()) => panic!("stream ended: {:?}", end.map(|_| ())),
            sealed = tokio::time::timeout(Duration::from_secs(60), rx.recv()) => sealed,
        };
        let sealed = sealed.expect("transaction 7's batch was not handed over within 60 s").expect("channel open");
        assert_eq!(sealed.ack, Some(Lsn(600)));
        assert_eq!(sealed.commits.iter().map(|c| c.xid).collect::<Vec<_>>(), [7]);
        assert_eq!(session.logical.open().map(|t| t.xid), Some(8), "transaction 8 is still open");
    }

    #[test]
    fn a_forged_heartbeat_does_not_move_the_heartbeat_gauge() {
        let config = config();
        let (mut r, _rx, _applied) = reader(&config);
        let mut s = Session::new();
        let message = |body: &str| logical_message(false, HEARTBEAT_PREFIX, body);
        // Any role may emit with the heartbeat prefix: a time in 2100, bare or with another nonce.
        let year_2100 = "3155760000000000";
        r.on_message(&mut s, Lsn(200), message(year_2100)).unwrap();
        r.on_message(&mut s, Lsn(210), message(&heartbeat_body(8, 3_155_760_000_000_000))).unwrap();
        assert_eq!(r.metrics.heartbeats(), 0, "forged heartbeats are ignored");
        r.on_message(&mut s, Lsn(220), message(&heartbeat_body(7, crate::postgres::now_pg_micros()))).unwrap();
        assert_eq!(r.metrics.heartbeats(), 1, "the process's own heartbeat counts");
    }

    #[test]
    fn manual_messages_and_their_actions_are_counted() {
        let config = config();
        let (mut r, _rx, _applied) = reader(&config);
        let mut s = Session::new();
        let message = |body: &str| logical_message(true, "walbust", body);
        r.on_message(&mut s, Lsn(200), begin(7)).unwrap();
        r.on_message(&mut s, Lsn(210), message(r#"{"keys":["a","b"],"patterns":["p:*","*"]}"#)).unwrap();
        r.on_message(&mut s, Lsn(220), message("not json")).unwrap();
        r.on_message(&mut s, Lsn(230), commit(300)).unwrap();
        let m = &r.metrics;
        assert_eq!(m.manual_messages(), 2, "the malformed one included");
        assert_eq!(m.manual_refused_count("malformed"), 1);
        assert_eq!(m.manual_refused_count("match_all"), 1, "`*` is refused by default");
        assert_eq!(m.actions_count(MANUAL_RULE, "unlink"), 2);
        assert_eq!(m.actions_count(MANUAL_RULE, "scan_unlink"), 1, "the refused pattern is no action");
        assert_eq!(m.actions_total(), 3);
    }

    #[test]
    fn changes_total_follows_a_table_renamed_mid_stream() {
        let config = config();
        let (mut r, _rx, _applied) = reader(&config);
        let mut s = Session::new();
        for (lsn, data) in [(200, relation(5, "before")), (210, begin(7)), (220, insert(5)), (230, commit(300))] {
            r.on_message(&mut s, Lsn(lsn), data).unwrap();
        }
        // ALTER TABLE before RENAME TO after: the server re-sends the relation under its new name.
        for (lsn, data) in [(400, relation(5, "after")), (410, begin(8)), (420, insert(5)), (430, commit(500))] {
            r.on_message(&mut s, Lsn(lsn), data).unwrap();
        }
        let text = r.metrics.render();
        let count = |table: &str| {
            text.lines()
                .find(|l| l.starts_with("walbust_changes_total{") && l.contains(&format!("table=\"{table}\"")))
                .map(|l| l.rsplit(' ').next().unwrap().to_owned())
        };
        assert_eq!(count("public.before").as_deref(), Some("1"), "{text}");
        assert_eq!(
            count("public.after").as_deref(),
            Some("1"),
            "the change after the rename counts under the new name\n{text}"
        );
    }

    #[test]
    fn frame_harness_applies_the_transaction_and_keepalive_rules_to_raw_frames() {
        use crate::postgres::stream::xlog;
        let keepalive = |end: u64| {
            let mut p = vec![b'k'];
            p.extend_from_slice(&end.to_be_bytes());
            p.extend_from_slice(&0i64.to_be_bytes());
            p.push(1);
            Bytes::from(p)
        };
        let config = config();
        let mut h = FrameHarness::new(&config, Arc::new(RuleSet::default()));
        let commit_without_begin = h.frame(Bytes::from(xlog(300, 300, 0, &commit(600)))).unwrap_err();
        assert!(commit_without_begin.to_string().contains("Commit without Begin"), "{commit_without_begin}");

        let mut h = FrameHarness::new(&config, Arc::new(RuleSet::default()));
        h.frame(Bytes::from(xlog(200, 200, 0, &begin(7)))).unwrap();
        assert_eq!(h.open_transaction(), Some(7));
        h.frame(keepalive(900)).unwrap();
        assert_eq!(h.flushed(), Lsn(0), "a keepalive inside a transaction is not acknowledged");
        let nested = h.frame(Bytes::from(xlog(250, 250, 0, &begin(8)))).unwrap_err();
        assert!(nested.to_string().contains("Begin inside an open transaction"), "{nested}");
        h.frame(Bytes::from(xlog(300, 300, 0, &commit(600)))).unwrap();
        assert_eq!(h.flushed(), Lsn(0), "nothing is acknowledged before the applier has the batch");
        h.apply();
        assert_eq!(h.flushed(), Lsn(600));
        h.frame(keepalive(1000)).unwrap();
        assert_eq!(h.flushed(), Lsn(1000), "a keepalive with nothing pending is acknowledged at once");
        assert_eq!(h.received(), Lsn(1000));
        assert!(h.frame(Bytes::from_static(b"w\0")).is_err(), "a frame cut short is an error");
    }

    #[test]
    fn a_keepalive_is_not_reported_flushed_past_a_pending_second_delete() {
        let config = config();
        let (mut r, _rx, applied) = reader(&config);
        let mut s = Session::new();
        r.sent_seq = 1;
        applied.send_modify(|a| a.record(1, Some(Lsn(300)), true));
        r.absorb_applied();
        assert_eq!((r.progress.applied(), r.progress.flushed()), (Lsn(300), Lsn(100)), "applied, not yet durable");
        r.keepalive(&mut s, Lsn(400));
        assert_eq!(r.progress.flushed(), Lsn(100), "a keepalive must not jump past the pending second delete");
        assert_eq!(s.batch.ack, Some(Lsn(400)), "it rides behind it instead");
        applied.send_modify(|a| a.redeleted(Some(Lsn(300)), false));
        r.absorb_applied();
        assert_eq!(r.progress.flushed(), Lsn(300));
    }

    #[test]
    fn a_transaction_is_noted_for_the_gate_only_when_it_produced_actions() {
        let config = config();
        let (mut r, _rx, _applied) = reader(&config);
        let mut s = Session::new();
        let message = |body: &str| logical_message(true, "walbust", body);
        r.on_message(&mut s, Lsn(200), begin(7)).unwrap();
        r.on_message(&mut s, Lsn(210), message(r#"{"keys":["a"]}"#)).unwrap();
        r.on_message(&mut s, Lsn(230), commit(300)).unwrap();
        r.on_message(&mut s, Lsn(400), begin(8)).unwrap();
        r.on_message(&mut s, Lsn(410), message(r#"{"keys":["a"]}"#)).unwrap();
        r.on_message(&mut s, Lsn(430), commit(500)).unwrap();
        r.on_message(&mut s, Lsn(600), begin(9)).unwrap();
        r.on_message(&mut s, Lsn(610), message("not json")).unwrap();
        r.on_message(&mut s, Lsn(630), commit(700)).unwrap();
        assert_eq!(s.batch.len(), 1, "one action after deduplication");
        assert_eq!(s.batch.xids, [7, 8], "the deduplicated action needs transaction 8 visible too; 9 routed nothing");
    }

    /// An applier over a memory sink with second deletes 20 ms after visibility and no gate:
    /// the sink, the batch channel, the applier's loop to spawn, what it reports, its metrics.
    fn applier_parts()
    -> (crate::sink::MemorySink, mpsc::Sender<Sealed>, impl Future<Output = ()>, watch::Receiver<Applied>, Arc<Metrics>)
    {
        let sink = crate::sink::MemorySink::new();
        let (tx, rx) = mpsc::channel(1);
        let (applied_tx, applied) = watch::channel(Applied::default());
        let observers = Observers {
            events: None,
            dead_letter_file: None,
            metrics: Metrics::new(),
            health: Health::new(),
            sessions: Arc::default(),
            slot: "walbust".into(),
        };
        let consistency = Consistency {
            gate: None,
            redeletes: Some(Redeletes::new(Duration::from_millis(20), redelete::DEFAULT_MAX_BYTES)),
        };
        let metrics = observers.metrics.clone();
        let applier = apply_loop(sink.clone(), rx, applied_tx, observers, consistency, Arc::default());
        (sink, tx, applier, applied, metrics)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn deletes_are_applied_twice_and_their_position_is_durable_only_after_the_second() {
        let (sink, tx, apply, mut applied, metrics) = applier_parts();
        let applier = tokio::spawn(apply);
        let batch = |seq, actions: Vec<Action>, ack| Sealed {
            seq,
            actions,
            origins: Vec::new(),
            ack: Some(Lsn(ack)),
            commits: Vec::new(),
            changes: Vec::new(),
            xids: vec![7],
        };
        let bump = Action::Incr("v".into());
        tx.send(batch(1, vec![Action::Unlink("k".into()), bump.clone()], 300)).await.unwrap();
        let a = *applied.wait_for(|a| a.seq == 1).await.unwrap();
        assert_eq!((a.applied, a.durable, a.pending), (Lsn(300), Lsn(0), true), "applied once, not durable");
        let a = *applied.wait_for(|a| !a.pending).await.unwrap();
        assert_eq!(a.durable, Lsn(300), "durable after the second delete");
        assert_eq!(
            sink.applied(),
            [Action::Unlink("k".into()), bump, Action::Unlink("k".into())],
            "the bump is not repeated"
        );
        assert_eq!(metrics.redeletes_applied_total(), 1);
        drop(tx);
        applier.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn second_deletes_already_due_ride_with_the_next_batch_in_one_round_trip() {
        let (sink, tx, apply, mut applied, metrics) = applier_parts();
        let unlink = |k: &str| Action::Unlink(k.into());
        let batch = |seq, key: &str, ack| Sealed {
            seq,
            actions: vec![unlink(key)],
            origins: Vec::new(),
            ack: Some(Lsn(ack)),
            commits: Vec::new(),
            changes: Vec::new(),
            xids: Vec::new(),
        };
        // Both batches wait in the channel before the applier runs; the first one's second
        // delete falls due while the applier is held up, then the second batch arrives.
        tx.send(batch(1, "a", 100)).await.unwrap();
        let applier = tokio::spawn(apply);
        applied.wait_for(|a| a.seq == 1).await.unwrap();
        std::thread::sleep(Duration::from_millis(30));
        tx.send(batch(2, "b", 200)).await.unwrap();
        let a = *applied.wait_for(|a| a.seq == 2).await.unwrap();
        assert_eq!(
            sink.calls(),
            [vec![unlink("a")], vec![unlink("b"), unlink("a")]],
            "one call: the batch, then what is due"
        );
        assert_eq!((a.applied, a.durable, a.pending), (Lsn(200), Lsn(100), true), "a is durable, b is not yet");
        assert_eq!(metrics.redeletes_applied_total(), 1);
        let a = *applied.wait_for(|a| !a.pending).await.unwrap();
        assert_eq!(a.durable, Lsn(200));
        drop(tx);
        applier.await.unwrap();
    }

    #[test]
    fn a_keepalive_with_nothing_pending_is_acknowledged_at_once_and_otherwise_rides_the_batch() {
        let config = config();
        let (mut r, _rx, _applied) = reader(&config);
        let mut s = Session::new();
        r.keepalive(&mut s, Lsn(400));
        assert_eq!(r.progress.flushed(), Lsn(400));
        s.batch.push(Action::Unlink("k".into()));
        r.keepalive(&mut s, Lsn(800));
        assert_eq!(r.progress.flushed(), Lsn(400), "an unapplied action holds the position back");
        assert_eq!(s.batch.ack, Some(Lsn(800)));
    }
}

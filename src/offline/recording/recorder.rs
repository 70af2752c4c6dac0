//! `walbust record`: the committed change stream, written to a recording.
//!
//! The recorder creates a TEMPORARY logical slot of its own on its replication connection
//! (Postgres drops it when the connection ends), so it never reads, moves or holds the slot
//! `walbust run` uses. It streams with the options and decoder `walbust run` uses, keeps
//! one transaction in memory until its Commit arrives, then writes it as one line and
//! flushes, so the file is a valid recording at every moment. On stop it finishes the
//! transaction in hand, if any, and ends the stream.

use super::format::{
    ChangeOp, ChangeRecord, ColumnRecord, Header, Identity, Image, Line, MessageRecord, RelationRecord, TxRecord,
    encode_text, encode_value, pg_time_text, system_time_text, to_line,
};
use crate::domain::config::SourceConfig;
use crate::postgres::lsn::Lsn;
use crate::postgres::pgoutput::{DecodeError, OldTuple, Relation, ReplicaIdentity, Tuple};
use crate::postgres::quote::{quote_ident, quote_literal};
use crate::postgres::{
    HEARTBEAT_PREFIX, LogicalStream, ReplicationConn, ReplicationFrame, RowChange, SourceError, StreamError,
    StreamEvent,
};
use std::collections::HashMap;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

/// How long a stop waits for the Commit of the transaction in hand.
const FINISH_GRACE: Duration = Duration::from_secs(10);

/// How often progress is reported while transactions arrive.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// When to stop recording, besides a signal; the first that is reached wins.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Stop after writing this many transactions.
    pub max_transactions: Option<u64>,
    /// Stop once every transaction committed before this position is written.
    pub until_lsn: Option<Lsn>,
}

/// What to record and where.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    /// The recording file, created or truncated.
    pub output: PathBuf,
    /// When to stop.
    pub limits: Limits,
    /// The temporary slot's name; `walbust_record_<pid>` when `None`.
    pub slot: Option<String>,
}

/// Running totals of a recording.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Transactions written.
    pub transactions: u64,
    /// Row changes written (a TRUNCATE counts once per table).
    pub changes: u64,
    /// Logical decoding messages written, in and outside transactions.
    pub messages: u64,
    /// Relation lines written (tables first seen or altered after the header).
    pub relations: u64,
    /// The position everything before which is in the file.
    pub flushed: Lsn,
}

/// Why a recording stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGINT or SIGTERM (the `shutdown` future).
    Signal,
    /// `--duration` elapsed.
    Duration,
    /// `--max-transactions` reached.
    MaxTransactions,
    /// `--until-lsn` reached.
    UntilLsn,
    /// The server ended the stream.
    ServerClosed,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Signal => "stopped by a signal",
            StopReason::Duration => "the duration elapsed",
            StopReason::MaxTransactions => "the transaction limit was reached",
            StopReason::UntilLsn => "the LSN limit was reached",
            StopReason::ServerClosed => "the server ended the stream",
        })
    }
}

/// What the recorder reports while it runs.
#[derive(Debug, Clone)]
pub enum Event {
    /// The slot exists and the header is written.
    Started {
        /// The temporary slot.
        slot: String,
        /// Its start position.
        start: Lsn,
        /// Published tables listed in the header.
        relations: usize,
    },
    /// Totals so far, every few seconds while something arrives.
    Progress(Totals),
    /// A stop was asked for or a limit reached; the transaction in hand is being finished.
    Stopping(StopReason),
}

/// How a recording that started ended.
#[derive(Debug)]
pub struct Outcome {
    /// The temporary slot it used.
    pub slot: String,
    /// What was written.
    pub totals: Totals,
    /// Why it stopped, or the failure that ended it (the file still holds every complete
    /// transaction before it).
    pub ended: Result<StopReason, RecordError>,
    /// True when a transaction in hand had to be left out because its Commit did not come in time.
    pub dropped_open: bool,
}

/// Why recording failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Talking to Postgres failed.
    #[error("{doing} failed")]
    Source {
        /// What was being done.
        doing: &'static str,
        /// The error.
        #[source]
        source: Box<SourceError>,
    },
    /// The configured publication does not exist.
    #[error(
        "publication `{publication}` does not exist in database `{database}`; create it (`walbust setup --config FILE` prints the statement) or set `[source] publication`"
    )]
    MissingPublication {
        /// Its name.
        publication: String,
        /// The database.
        database: String,
    },
    /// The server is older than walbust supports.
    #[error("{0}")]
    UnsupportedServer(crate::daemon::slot::Unmet),
    /// The recording file cannot be written.
    #[error("cannot write the recording `{path}`; check that its directory exists and is writable")]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A replication message does not decode.
    #[error("cannot decode the replication message at {lsn}; the recording holds every transaction before it")]
    Decode {
        /// Where the message starts.
        lsn: Lsn,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// A well-formed message that does not belong where it came.
    #[error("unexpected replication message at {lsn}: {what}; the recording holds every transaction before it")]
    Unexpected {
        /// Where the message starts.
        lsn: Lsn,
        /// What it was.
        what: String,
    },
    /// The server went silent.
    #[error(
        "no message from the server for {0:?}, although a reply was requested; check the network, or raise `[source] read_timeout`"
    )]
    Silent(Duration),
}

impl From<StreamError> for RecordError {
    fn from(e: StreamError) -> Self {
        match e {
            StreamError::Decode { lsn, source } => RecordError::Decode { lsn, source },
            StreamError::Unexpected { lsn, what } => RecordError::Unexpected { lsn, what },
            StreamError::Silent(silent) => RecordError::Silent(silent),
        }
    }
}

impl RecordError {
    /// True for problems with the configuration or the output path, rather than the run.
    pub fn is_usage(&self) -> bool {
        matches!(self, RecordError::MissingPublication { .. } | RecordError::Write { .. })
    }
}

/// The default slot name: `walbust_record_<pid>`, with a counter after the first in a process.
fn default_slot_name() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    match N.fetch_add(1, Ordering::Relaxed) {
        0 => format!("walbust_record_{}", std::process::id()),
        n => format!("walbust_record_{}_{n}", std::process::id()),
    }
}

fn source_error(doing: &'static str) -> impl FnOnce(SourceError) -> RecordError {
    move |source| RecordError::Source { doing, source: Box::new(source) }
}

/// Records the stream of `source`'s publication into `options.output` until `shutdown`
/// resolves or a limit is reached. Errors before the file is written are returned as
/// `Err`; later ones end the recording and are reported in [`Outcome::ended`].
pub async fn record(
    source: &SourceConfig,
    options: &RecordOptions,
    shutdown: impl Future<Output = ()>,
    mut on_event: impl FnMut(Event),
) -> Result<Option<Outcome>, RecordError> {
    tokio::pin!(shutdown);
    let slot = options.slot.clone().unwrap_or_else(default_slot_name);
    let setup = async {
        let mut conn = ReplicationConn::connect(&source.conninfo, true)
            .await
            .map_err(source_error("connecting for replication"))?;
        let header = prepare(&mut conn, source, &slot).await?;
        Ok::<_, RecordError>((conn, header))
    };
    let (conn, header) = tokio::select! {
        r = setup => r?,
        // Stopped before anything was recorded: nothing to write.
        _ = shutdown.as_mut() => return Ok(None),
    };
    let start = header.start_lsn;
    let relations = header.relations.len();
    let writer = Writer::create(&options.output, header)?;
    let publication = quote_ident(&source.publication);
    let stream_options = crate::postgres::pgoutput_options(&publication);
    let mut stream = conn
        .start_replication(&slot, start, &stream_options)
        .await
        .map_err(source_error("starting replication from the temporary slot"))?;
    on_event(Event::Started { slot: slot.clone(), start, relations });
    let mut session = Session {
        writer,
        logical: LogicalStream::new(),
        changes: Vec::new(),
        totals: Totals { flushed: start, ..Totals::default() },
        limits: options.limits,
    };
    let ended = session.stream(&mut stream, source, shutdown.as_mut(), &mut on_event).await;
    let dropped_open = session.logical.in_open_transaction();
    let flushed = session.totals.flushed;
    if ended.is_ok() {
        // A temporary slot vanishes with the connection; the status only frees WAL early.
        let _ = stream.send_status(flushed, flushed, flushed, false).await;
        if let Err(e) = stream.finish().await {
            tracing::debug!(error = %e, "ending the recording stream");
        }
    }
    let ended = match (ended, session.writer.flush()) {
        (Ok(r), Ok(())) => Ok(r),
        (Err(e), _) | (Ok(_), Err(e)) => Err(e),
    };
    Ok(Some(Outcome { slot, totals: session.totals, ended, dropped_open }))
}

/// Checks the publication, creates the temporary slot and reads the published tables.
async fn prepare(conn: &mut ReplicationConn, source: &SourceConfig, slot: &str) -> Result<Header, RecordError> {
    let rows = conn
        .simple_query("SELECT current_database() AS db, current_setting('server_version_num') AS num")
        .await
        .map_err(source_error("identifying the database"))?;
    let database = rows.first().and_then(|r| r.get("db")).unwrap_or_default().to_string();
    let version_num: u32 = rows.first().and_then(|r| r.get("num")).and_then(|n| n.parse().ok()).unwrap_or(0);
    let version = conn.parameter("server_version").unwrap_or("?");
    if let Some(unmet) = crate::daemon::slot::unsupported_server(version, version_num) {
        return Err(RecordError::UnsupportedServer(unmet));
    }
    let found = crate::daemon::slot::publication_exists(conn, &source.publication)
        .await
        .map_err(source_error("looking up the publication"))?;
    if !found {
        return Err(RecordError::MissingPublication { publication: source.publication.clone(), database });
    }
    let sql = crate::daemon::slot::create_slot_sql(slot, crate::daemon::slot::SlotKind::Temporary);
    let rows = conn.replication_command(&sql).await.map_err(source_error("creating the temporary replication slot"))?;
    let start = rows.first().and_then(|r| r.get("consistent_point")).and_then(|s| s.parse().ok()).unwrap_or(Lsn::ZERO);
    let relations = published_relations(conn, &source.publication, version_num).await?;
    Ok(Header {
        format: super::FORMAT_VERSION,
        server_version: conn.parameter("server_version").unwrap_or_default().to_string(),
        database,
        captured_at: system_time_text(SystemTime::now()),
        publication: source.publication.clone(),
        message_prefix: source.message_prefix.clone(),
        slot: slot.to_string(),
        start_lsn: start,
        relations,
    })
}

/// The publication's tables as pgoutput would describe them: published, non-generated
/// columns in order; key flags from the replica identity (every column under FULL).
async fn published_relations(
    conn: &mut ReplicationConn,
    publication: &str,
    version_num: u32,
) -> Result<Vec<RelationRecord>, RecordError> {
    // Column lists (and `attnames`) arrived in Postgres 15.
    let column_list =
        if version_num >= 150_000 { "AND (pt.attnames IS NULL OR a.attname = ANY(pt.attnames))" } else { "" };
    let sql = format!(
        "SELECT c.oid, n.nspname, c.relname, c.relreplident, a.attname, a.atttypid, a.atttypmod, \
           (c.relreplident = 'f' OR EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND a.attnum = ANY(i.indkey) \
              AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident)))) AS key \
         FROM pg_publication_tables pt \
         JOIN pg_namespace n ON n.nspname = pt.schemaname \
         JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
         WHERE pt.pubname = {} {column_list} \
         ORDER BY n.nspname, c.relname, a.attnum",
        quote_literal(publication)
    );
    let rows = conn.simple_query(&sql).await.map_err(source_error("reading the published tables"))?;
    let mut out: Vec<RelationRecord> = Vec::new();
    for row in &rows {
        let get = |name: &str| row.get(name).unwrap_or_default();
        let oid: u32 = get("oid").parse().unwrap_or(0);
        if out.last().is_none_or(|r| r.oid != oid) {
            let identity = get("relreplident").bytes().next().and_then(ReplicaIdentity::from_byte);
            out.push(RelationRecord {
                rel: out.len() as u32 + 1,
                oid,
                schema: get("nspname").to_string(),
                name: get("relname").to_string(),
                replica_identity: Identity::from(identity.unwrap_or(ReplicaIdentity::Default)),
                columns: Vec::new(),
            });
        }
        let relation = out.last_mut().expect("a relation was pushed for this row");
        relation.columns.push(ColumnRecord {
            name: get("attname").to_string(),
            type_oid: get("atttypid").parse().unwrap_or(0),
            type_modifier: get("atttypmod").parse().unwrap_or(-1),
            key: get("key") == "t",
        });
    }
    Ok(out)
}

/// Writes the recording: the header at once, then lines as they complete.
struct Writer {
    out: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    next_rel: u32,
    /// The current definition of each table: its number and record.
    current: HashMap<u32, RelationRecord>,
}

impl Writer {
    fn create(path: &Path, header: Header) -> Result<Self, RecordError> {
        let write_error = |source| RecordError::Write { path: path.to_path_buf(), source };
        let file = std::fs::File::create(path).map_err(write_error)?;
        let current = header.relations.iter().map(|r| (r.oid, r.clone())).collect();
        let mut w = Writer {
            out: std::io::BufWriter::with_capacity(1 << 16, file),
            path: path.to_path_buf(),
            next_rel: header.relations.len() as u32 + 1,
            current,
        };
        w.line(&Line::Header(header), true)?;
        Ok(w)
    }

    fn line(&mut self, line: &Line, flush: bool) -> Result<(), RecordError> {
        let mut text = to_line(line);
        text.push('\n');
        let result = self.out.write_all(text.as_bytes()).and_then(|()| if flush { self.out.flush() } else { Ok(()) });
        result.map_err(|source| RecordError::Write { path: self.path.clone(), source })
    }

    fn flush(&mut self) -> Result<(), RecordError> {
        self.out.flush().map_err(|source| RecordError::Write { path: self.path.clone(), source })
    }

    /// The number of `relation`'s definition, writing a relation line when it is new.
    fn relation(&mut self, relation: &Relation) -> Result<bool, RecordError> {
        if self.current.get(&relation.oid).is_some_and(|r| r.describes(relation)) {
            return Ok(false);
        }
        let record = RelationRecord::new(self.next_rel, relation);
        self.next_rel += 1;
        // Flushed with the transaction line that follows it.
        self.line(&Line::Relation(record.clone()), false)?;
        self.current.insert(relation.oid, record);
        Ok(true)
    }

    fn rel(&self, oid: u32) -> Option<u32> {
        self.current.get(&oid).map(|r| r.rel)
    }
}

struct Session {
    writer: Writer,
    logical: LogicalStream,
    /// The changes of the open transaction, written when its Commit arrives.
    changes: Vec<ChangeRecord>,
    totals: Totals,
    limits: Limits,
}

enum Wake {
    Stop(StopReason),
    Grace,
    Status,
    Progress,
    Frame(Option<ReplicationFrame>),
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Session {
    async fn stream(
        &mut self,
        stream: &mut crate::postgres::ReplicationStream,
        source: &SourceConfig,
        mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
        on_event: &mut impl FnMut(Event),
    ) -> Result<StopReason, RecordError> {
        let mut status = tokio::time::interval(source.status_interval);
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Checked: a --duration past the clock's range is no deadline at all.
        let deadline = self.limits.duration.and_then(|d| tokio::time::Instant::now().checked_add(d));
        let mut stop: Option<StopReason> = None;
        let mut grace: Option<tokio::time::Instant> = None;
        let mut signalled = false;
        let mut reported = self.totals;
        loop {
            if let Some(reason) = stop
                && !self.logical.in_open_transaction()
            {
                return Ok(reason);
            }
            let wake = tokio::select! {
                biased;
                _ = shutdown.as_mut(), if !signalled => Wake::Stop(StopReason::Signal),
                _ = sleep_until_some(deadline), if deadline.is_some() && stop.is_none() => Wake::Stop(StopReason::Duration),
                _ = sleep_until_some(grace), if grace.is_some() => Wake::Grace,
                _ = status.tick() => Wake::Status,
                _ = progress.tick() => Wake::Progress,
                frame = stream.next() => Wake::Frame(frame.map_err(source_error("reading the replication stream"))?),
            };
            match wake {
                Wake::Stop(reason) => {
                    signalled |= reason == StopReason::Signal;
                    if stop.is_none() {
                        on_event(Event::Stopping(reason));
                        stop = Some(reason);
                        grace = Some(tokio::time::Instant::now() + FINISH_GRACE);
                    }
                }
                Wake::Grace => {
                    let xid = self.logical.open().map_or(0, |t| t.xid);
                    tracing::warn!(
                        xid,
                        "the transaction in hand did not commit in time; it is left out of the recording"
                    );
                    return Ok(stop.unwrap_or(StopReason::Signal));
                }
                Wake::Status => {
                    self.logical.silence(source.read_timeout)?;
                    // Asking for a reply brings a keepalive with the server's position, so an
                    // idle stream still reaches `until_lsn` and shows a dead link.
                    let flushed = self.totals.flushed;
                    stream
                        .send_status(flushed, flushed, flushed, true)
                        .await
                        .map_err(source_error("sending a status update"))?;
                }
                Wake::Progress => {
                    if self.totals != reported {
                        reported = self.totals;
                        on_event(Event::Progress(reported));
                    }
                }
                Wake::Frame(None) => {
                    return Ok(StopReason::ServerClosed);
                }
                Wake::Frame(Some(frame)) => {
                    let (reached, reply_requested) = self.on_frame(frame)?;
                    if let Some(reason) = reached
                        && stop.is_none()
                    {
                        on_event(Event::Stopping(reason));
                        stop = Some(reason);
                    }
                    if reply_requested {
                        let flushed = self.totals.flushed;
                        stream
                            .send_status(flushed, flushed, flushed, false)
                            .await
                            .map_err(source_error("sending a status update"))?;
                    }
                }
            }
        }
    }

    /// Takes one frame; returns the limit it reached, if any, and whether the server asked
    /// for a status update.
    fn on_frame(&mut self, frame: ReplicationFrame) -> Result<(Option<StopReason>, bool), RecordError> {
        let Session { writer, logical, changes, totals, limits } = self;
        let event = logical.frame(frame)?;
        match event {
            // Everything before a keepalive's position is written, unless a transaction is open.
            StreamEvent::Keepalive { acknowledge, reply_requested, .. } => {
                let mut reached = None;
                if let Some(lsn) = acknowledge {
                    totals.flushed = totals.flushed.max(lsn);
                    if limits.until_lsn.is_some_and(|l| lsn >= l) {
                        reached = Some(StopReason::UntilLsn);
                    }
                }
                return Ok((reached, reply_requested));
            }
            StreamEvent::Begin { .. } => changes.clear(),
            StreamEvent::Commit { xid, commit, .. } => {
                if !changes.is_empty() {
                    let changes = std::mem::take(changes);
                    let rows = changes.iter().filter(|c| c.op != ChangeOp::Message).count() as u64;
                    totals.changes += rows;
                    totals.messages += changes.len() as u64 - rows;
                    let record = TxRecord {
                        xid,
                        commit_lsn: commit.commit_lsn,
                        end_lsn: commit.end_lsn,
                        commit_time: pg_time_text(commit.commit_time),
                        changes,
                    };
                    writer.line(&Line::Tx(record), true)?;
                    totals.transactions += 1;
                }
                totals.flushed = totals.flushed.max(commit.end_lsn);
                if limits.max_transactions.is_some_and(|n| totals.transactions >= n) {
                    return Ok((Some(StopReason::MaxTransactions), false));
                }
                if limits.until_lsn.is_some_and(|l| commit.end_lsn >= l) {
                    return Ok((Some(StopReason::UntilLsn), false));
                }
            }
            StreamEvent::Relation { relation, .. } => {
                if writer.relation(relation)? {
                    totals.relations += 1;
                }
            }
            StreamEvent::Change { lsn, change, .. } => match change {
                RowChange::Insert { relation, new } => {
                    let mut c = change_record(writer, relation, ChangeOp::Insert);
                    c.new = Some(image(lsn, relation, &new, false)?);
                    changes.push(c);
                }
                RowChange::Update { relation, old, new } => {
                    let mut c = change_record(writer, relation, ChangeOp::Update);
                    old_image(lsn, relation, old.as_ref(), &mut c)?;
                    c.new = Some(image(lsn, relation, &new, false)?);
                    changes.push(c);
                }
                RowChange::Delete { relation, old } => {
                    let mut c = change_record(writer, relation, ChangeOp::Delete);
                    old_image(lsn, relation, Some(&old), &mut c)?;
                    changes.push(c);
                }
                RowChange::Truncate(truncated) => {
                    for relation in truncated.relations() {
                        let mut c = change_record(writer, relation, ChangeOp::Truncate);
                        c.cascade = truncated.truncate.cascade();
                        c.restart_identity = truncated.truncate.restart_identity();
                        changes.push(c);
                    }
                }
            },
            // Heartbeats measure `walbust run`'s latency; they carry nothing to replay.
            StreamEvent::Message { message, .. } if message.prefix == HEARTBEAT_PREFIX => {}
            StreamEvent::Message { xid: Some(_), message, .. } if message.transactional => {
                changes.push(ChangeRecord {
                    op: ChangeOp::Message,
                    prefix: Some(message.prefix),
                    content: Some(encode_text(&message.content)),
                    ..ChangeRecord::default()
                });
            }
            StreamEvent::Message { message: m, .. } => {
                let record = MessageRecord { lsn: m.lsn, prefix: m.prefix, content: encode_text(&m.content) };
                writer.line(&Line::Message(record), true)?;
                totals.messages += 1;
            }
            StreamEvent::Other { .. } => {}
        }
        Ok((None, false))
    }
}

/// A change of `relation`, naming the definition the recording gave it.
fn change_record(writer: &Writer, relation: &Relation, op: ChangeOp) -> ChangeRecord {
    ChangeRecord {
        op,
        table: Some(relation.qualified_name()),
        rel: writer.rel(relation.oid),
        ..ChangeRecord::default()
    }
}

fn old_image(lsn: Lsn, relation: &Relation, old: Option<&OldTuple>, c: &mut ChangeRecord) -> Result<(), RecordError> {
    match old {
        Some(OldTuple::Full(t)) => c.old = Some(image(lsn, relation, t, false)?),
        Some(OldTuple::Key(t)) => c.old_key = Some(image(lsn, relation, t, true)?),
        None => {}
    }
    Ok(())
}

/// A tuple by column name. A key image leaves out the columns pgoutput sends as NULL
/// because they are not in the key.
fn image(lsn: Lsn, relation: &Relation, tuple: &Tuple, keyed: bool) -> Result<Image, RecordError> {
    if tuple.len() != relation.columns.len() {
        return Err(RecordError::Unexpected {
            lsn,
            what: format!(
                "a row of {} with {} values, but its Relation has {} columns",
                relation.qualified_name(),
                tuple.len(),
                relation.columns.len()
            ),
        });
    }
    let mut image = Image::new();
    for (column, value) in relation.columns.iter().zip(tuple.values()) {
        if keyed && !column.key && value.is_null() {
            continue;
        }
        image.insert(column.name.clone(), encode_value(value));
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_slot_names_are_unique_in_a_process() {
        let a = default_slot_name();
        let b = default_slot_name();
        assert!(a.starts_with("walbust_record_"), "{a}");
        assert_ne!(a, b);
    }
}

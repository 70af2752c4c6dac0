//! The recording format: JSON Lines, one record per line, written with a stable field order.
//!
//! ```text
//! {"header":{"format":1,"server_version":"15.6",...,"relations":[{"rel":1,...}]}}
//! {"tx":{"xid":735,"commit_lsn":"0/1549E48","end_lsn":"0/1549F10","commit_time":"...","changes":[...]}}
//! {"relation":{"rel":2,"oid":16385,"schema":"public","name":"items",...}}
//! {"message":{"lsn":"0/154A1B0","prefix":"walbust","content":"{\"keys\":[\"a\"]}"}}
//! ```
//!
//! Every record is a struct, so serde_json writes its fields in declaration order, and row
//! images are `BTreeMap`s, so their columns come sorted: the same stream always gives the
//! same bytes. Values are the text Postgres sends; `@null`, `@toast` (an unchanged TOASTed
//! value that was not sent), `@bytes:<hex>` (text that is not UTF-8) and `@binary:<hex>`
//! are markers, and a value that itself starts with `@` is written with one more `@`.

use crate::postgres::lsn::Lsn;
use crate::postgres::pgoutput::{Column, Relation, ReplicaIdentity};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::Path;
use std::time::SystemTime;

/// The format version written in the header; readers refuse other versions.
pub const FORMAT_VERSION: u32 = 1;

pub use crate::domain::value_text::{BINARY, BYTES, NULL, TOAST, decode_text, decode_value, encode_text, encode_value};

/// A row image: column name to encoded value, sorted by name.
pub type Image = BTreeMap<String, String>;

/// One line of a recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Line {
    /// The first line: what was recorded, where and when.
    Header(Header),
    /// A table definition announced by the stream that the header or an earlier line lacks.
    Relation(RelationRecord),
    /// One committed transaction.
    Tx(TxRecord),
    /// A non-transactional logical decoding message, outside any transaction.
    Message(MessageRecord),
}

/// The header: line 1 of every recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// The server's `server_version`.
    pub server_version: String,
    /// The database recorded.
    pub database: String,
    /// When the recording started, RFC 3339 in UTC.
    pub captured_at: String,
    /// The publication streamed.
    pub publication: String,
    /// The prefix of manual invalidation messages (`[source] message_prefix`).
    pub message_prefix: String,
    /// The temporary slot the recording was made from.
    pub slot: String,
    /// Where the slot started: changes committed before it are not in the recording.
    #[serde(with = "lsn_text")]
    pub start_lsn: Lsn,
    /// The published tables as the catalog described them when the recording started.
    pub relations: Vec<RelationRecord>,
}

/// A table definition, as a pgoutput Relation message carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelationRecord {
    /// This definition's number in the recording; changes name the definition they were
    /// decoded with by this number, so a table altered mid-stream keeps both.
    pub rel: u32,
    /// The table's OID.
    pub oid: u32,
    /// Schema.
    pub schema: String,
    /// Table.
    pub name: String,
    /// Which old values updates and deletes carry.
    pub replica_identity: Identity,
    /// Published columns in table order.
    pub columns: Vec<ColumnRecord>,
}

/// One column of a [`RelationRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnRecord {
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier, -1 for none.
    pub type_modifier: i32,
    /// Part of the replica identity key (every column under identity full).
    pub key: bool,
}

/// A replica identity, as `ALTER TABLE ... REPLICA IDENTITY` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Identity {
    /// The primary key.
    Default,
    /// Nothing.
    Nothing,
    /// The whole row.
    Full,
    /// A chosen unique index.
    Index,
}

impl From<ReplicaIdentity> for Identity {
    fn from(r: ReplicaIdentity) -> Self {
        match r {
            ReplicaIdentity::Default => Identity::Default,
            ReplicaIdentity::Nothing => Identity::Nothing,
            ReplicaIdentity::Full => Identity::Full,
            ReplicaIdentity::Index => Identity::Index,
        }
    }
}

impl From<Identity> for ReplicaIdentity {
    fn from(r: Identity) -> Self {
        match r {
            Identity::Default => ReplicaIdentity::Default,
            Identity::Nothing => ReplicaIdentity::Nothing,
            Identity::Full => ReplicaIdentity::Full,
            Identity::Index => ReplicaIdentity::Index,
        }
    }
}

impl RelationRecord {
    /// The record of `relation` under the number `rel`.
    pub fn new(rel: u32, relation: &Relation) -> Self {
        RelationRecord {
            rel,
            oid: relation.oid,
            schema: relation.namespace.clone(),
            name: relation.name.clone(),
            replica_identity: relation.replica_identity.into(),
            columns: relation
                .columns
                .iter()
                .map(|c| ColumnRecord {
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                    type_modifier: c.type_modifier,
                    key: c.key,
                })
                .collect(),
        }
    }

    /// The Relation message this record stands for.
    pub fn to_relation(&self) -> Relation {
        Relation {
            xid: None,
            oid: self.oid,
            namespace: self.schema.clone(),
            name: self.name.clone(),
            replica_identity: self.replica_identity.into(),
            columns: self
                .columns
                .iter()
                .map(|c| Column {
                    key: c.key,
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                    type_modifier: c.type_modifier,
                })
                .collect(),
        }
    }

    /// True when `relation` has exactly this definition (whatever the record's number).
    pub fn describes(&self, relation: &Relation) -> bool {
        self.oid == relation.oid
            && self.schema == relation.namespace
            && self.name == relation.name
            && self.replica_identity == Identity::from(relation.replica_identity)
            && self.columns.len() == relation.columns.len()
            && self.columns.iter().zip(&relation.columns).all(|(a, b)| {
                a.name == b.name && a.type_oid == b.type_oid && a.type_modifier == b.type_modifier && a.key == b.key
            })
    }
}

/// One committed transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxRecord {
    /// Transaction id.
    pub xid: u32,
    /// Position of the commit record.
    #[serde(with = "lsn_text")]
    pub commit_lsn: Lsn,
    /// Position just past the commit record (what `walbust run` acknowledges).
    #[serde(with = "lsn_text")]
    pub end_lsn: Lsn,
    /// Commit time, RFC 3339 in UTC with microseconds.
    pub commit_time: String,
    /// Row changes and transactional messages, in stream order.
    pub changes: Vec<ChangeRecord>,
}

/// What a [`ChangeRecord`] is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeOp {
    /// A new row.
    #[default]
    Insert,
    /// A changed row.
    Update,
    /// A removed row.
    Delete,
    /// Every row of a table removed (one record per table of a TRUNCATE).
    Truncate,
    /// A transactional logical decoding message.
    Message,
}

impl ChangeOp {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Insert => "insert",
            ChangeOp::Update => "update",
            ChangeOp::Delete => "delete",
            ChangeOp::Truncate => "truncate",
            ChangeOp::Message => "message",
        }
    }
}

/// One entry of a transaction: a row change or a transactional message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeRecord {
    /// What happened.
    pub op: ChangeOp,
    /// `schema.table`, for readers; `rel` is what counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// The number of the relation definition the change was decoded with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rel: Option<u32>,
    /// The whole old row (REPLICA IDENTITY FULL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Image>,
    /// The old row's key columns (identity default or index, when the key changed, and deletes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_key: Option<Image>,
    /// The new row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<Image>,
    /// `TRUNCATE ... CASCADE`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cascade: bool,
    /// `TRUNCATE ... RESTART IDENTITY`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub restart_identity: bool,
    /// A message's prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// A message's content, encoded as a value is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A non-transactional logical decoding message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageRecord {
    /// Its position.
    #[serde(with = "lsn_text")]
    pub lsn: Lsn,
    /// The writer's prefix.
    pub prefix: String,
    /// The content, encoded as a value is.
    pub content: String,
}

/// LSNs as `X/Y` text, as the server prints them.
mod lsn_text {
    use crate::postgres::lsn::Lsn;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(lsn: &Lsn, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(lsn)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------
// Times.

/// Microseconds from the Unix epoch to the Postgres epoch (2000-01-01 UTC).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A Postgres timestamp (microseconds since 2000-01-01 UTC) as RFC 3339 text in UTC.
pub fn pg_time_text(pg_micros: i64) -> String {
    unix_micros_text(pg_micros.saturating_add(PG_EPOCH_UNIX_MICROS))
}

/// A `SystemTime` as RFC 3339 text in UTC.
pub fn system_time_text(t: SystemTime) -> String {
    let micros = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    };
    unix_micros_text(micros)
}

/// Microseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn unix_micros_text(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rest = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

// ---------------------------------------------------------------------------------------
// Reading.

/// A recording that cannot be read: the line and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    /// The file could not be read.
    #[error("cannot read the recording; check that it exists and is readable")]
    Read(#[source] std::io::Error),
    /// A line is malformed.
    #[error("line {line}: {message}; {hint}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong, naming the value.
        message: String,
        /// What to do about it.
        hint: String,
    },
}

impl RecordingError {
    /// An error on `line`.
    pub fn at(line: usize, message: impl Into<String>, hint: impl Into<String>) -> Self {
        RecordingError::Line { line, message: message.into(), hint: hint.into() }
    }

    /// The line the problem is on, when it is on one.
    pub fn line(&self) -> Option<usize> {
        match self {
            RecordingError::Read(_) => None,
            RecordingError::Line { line, .. } => Some(*line),
        }
    }

    /// The problem as `error: FILE:LINE: message` and a hint line, as diagnostics print.
    pub fn report(&self, file: &Path) -> String {
        match self {
            RecordingError::Read(e) => format!(
                "error: {}: cannot read the recording: {e}\n  hint: check the path and its permissions",
                file.display()
            ),
            RecordingError::Line { line, message, hint } => {
                format!("error: {}:{line}: {message}\n  hint: {hint}", file.display())
            }
        }
    }
}

/// Reads a recording line by line, checking each as it goes.
#[derive(Debug)]
pub struct Reader<R> {
    input: R,
    line: usize,
    buf: String,
    header: Header,
    /// [`MAX_LINE_BYTES`], smaller in tests.
    max_line: u64,
}

const RECORD_HINT: &str = "each line after the header is a {\"tx\":...}, {\"relation\":...} or {\"message\":...} record, as docs/REPLAY.md describes";

/// The longest line a recording may hold: a reader holds one line at a time, so this
/// bounds its memory whatever the file. Postgres keeps no field longer than 1 GB.
pub const MAX_LINE_BYTES: u64 = 1 << 30;

impl<R: BufRead> Reader<R> {
    /// Reads and checks the header.
    pub fn open(input: R) -> Result<Self, RecordingError> {
        Self::open_with_max_line(input, MAX_LINE_BYTES)
    }

    fn open_with_max_line(input: R, max_line: u64) -> Result<Self, RecordingError> {
        let mut reader = Reader { input, line: 0, buf: String::new(), header: empty_header(), max_line };
        let not_recording = |line| {
            RecordingError::at(
                line,
                "the first line is not a walbust recording header",
                "record one with `walbust record --config config.toml --output FILE`",
            )
        };
        match reader.next_raw()? {
            Some((_, Line::Header(h))) => {
                if h.format != FORMAT_VERSION {
                    return Err(RecordingError::at(
                        reader.line,
                        format!(
                            "recording format {} is not supported (this walbust reads format {FORMAT_VERSION})",
                            h.format
                        ),
                        "replay it with the walbust version that recorded it, or record again",
                    ));
                }
                reader.header = h;
                Ok(reader)
            }
            Some((line, _)) => Err(not_recording(line)),
            None => Err(not_recording(1)),
        }
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next record with its line number, or `None` at the end of the file.
    pub fn next_record(&mut self) -> Result<Option<(usize, Line)>, RecordingError> {
        match self.next_raw()? {
            Some((line, Line::Header(_))) => Err(RecordingError::at(
                line,
                "a second header",
                "a recording has one header, on line 1; split concatenated recordings apart",
            )),
            other => Ok(other),
        }
    }

    fn next_raw(&mut self) -> Result<Option<(usize, Line)>, RecordingError> {
        loop {
            self.buf.clear();
            self.line += 1;
            let n = (&mut self.input).take(self.max_line + 1).read_line(&mut self.buf).map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => RecordingError::at(
                    self.line,
                    "the line is not valid UTF-8",
                    "the file is corrupted; record it again or restore it from a copy",
                ),
                _ => RecordingError::Read(e),
            })?;
            if n == 0 {
                return Ok(None);
            }
            if self.buf.len() as u64 > self.max_line {
                return Err(RecordingError::at(
                    self.line,
                    format!("the line is longer than {} bytes", self.max_line),
                    "a line holds one record, and no row makes one this long: is this a recording?",
                ));
            }
            let text = self.buf.trim_end_matches(['\n', '\r']);
            if text.trim().is_empty() {
                continue;
            }
            let complete = self.buf.ends_with('\n');
            return match serde_json::from_str::<Line>(text) {
                Ok(record) => Ok(Some((self.line, record))),
                Err(e) => Err(self.json_error(&e, complete)),
            };
        }
    }

    fn json_error(&self, e: &serde_json::Error, complete: bool) -> RecordingError {
        let message = e.to_string();
        let message = match message.rfind(" at line ") {
            Some(i) => &message[..i],
            None => &message,
        };
        if e.is_eof() {
            let hint = if complete {
                "the line ends before its record does: the file is corrupted; restore it or record again"
            } else {
                "the recording was cut off mid-line (copied while `walbust record` was still writing?); delete the incomplete last line or record again"
            };
            return RecordingError::at(self.line, format!("the line is cut short after {} bytes", e.column()), hint);
        }
        if e.is_syntax() {
            return RecordingError::at(
                self.line,
                format!("the line is not valid JSON at column {}: {message}", e.column()),
                "the file is corrupted; restore it or record again",
            );
        }
        RecordingError::at(self.line, format!("the record is malformed: {message}"), RECORD_HINT)
    }
}

fn empty_header() -> Header {
    Header {
        format: FORMAT_VERSION,
        server_version: String::new(),
        database: String::new(),
        captured_at: String::new(),
        publication: String::new(),
        message_prefix: String::new(),
        slot: String::new(),
        start_lsn: Lsn::ZERO,
        relations: Vec::new(),
    }
}

/// Serializes a line as one line of JSON, without the newline.
pub fn to_line(line: &Line) -> String {
    // Serializing these structs cannot fail: every map key is a string.
    serde_json::to_string(line).expect("recording records serialize to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_utc_with_microseconds() {
        assert_eq!(pg_time_text(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(unix_micros_text(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(unix_micros_text(1_709_251_199_123_456), "2024-02-29T23:59:59.123456Z");
        assert_eq!(unix_micros_text(-1), "1969-12-31T23:59:59.999999Z");
        let _ = pg_time_text(i64::MAX);
        let _ = pg_time_text(i64::MIN);
    }

    #[test]
    fn fields_are_written_in_declaration_order_and_images_sorted() {
        let mut new = Image::new();
        new.insert("name".into(), "a".into());
        new.insert("id".into(), "1".into());
        let tx = Line::Tx(TxRecord {
            xid: 7,
            commit_lsn: Lsn(0x10),
            end_lsn: Lsn(0x20),
            commit_time: pg_time_text(0),
            changes: vec![ChangeRecord {
                op: ChangeOp::Insert,
                table: Some("public.t".into()),
                rel: Some(1),
                new: Some(new),
                ..ChangeRecord::default()
            }],
        });
        let text = to_line(&tx);
        assert_eq!(
            text,
            r#"{"tx":{"xid":7,"commit_lsn":"0/10","end_lsn":"0/20","commit_time":"2000-01-01T00:00:00.000000Z","changes":[{"op":"insert","table":"public.t","rel":1,"new":{"id":"1","name":"a"}}]}}"#
        );
        assert_eq!(serde_json::from_str::<Line>(&text).unwrap(), tx);
    }

    #[test]
    fn a_line_longer_than_the_cap_is_an_error_not_an_unbounded_read() {
        let text = format!("{}\n{}", header_line(), "x".repeat(5000));
        let mut r = Reader::open_with_max_line(text.as_bytes(), 1000).expect("the header fits");
        let err = r.next_record().unwrap_err();
        assert_eq!(err.line(), Some(2));
        assert!(err.to_string().contains("the line is longer than 1000 bytes"), "{err}");
        assert!(r.buf.capacity() < 5000, "read no more than the cap and a byte");
    }

    fn header_line() -> String {
        to_line(&Line::Header(Header { relations: Vec::new(), ..empty_header() }))
    }

    fn read_all(text: &str) -> Result<Vec<(usize, Line)>, RecordingError> {
        let mut r = Reader::open(text.as_bytes())?;
        let mut out = Vec::new();
        while let Some(l) = r.next_record()? {
            out.push(l);
        }
        Ok(out)
    }

    #[test]
    fn problems_name_their_line() {
        let h = header_line();
        let msg = r#"{"message":{"lsn":"0/1","prefix":"p","content":"c"}}"#;
        assert_eq!(read_all(&format!("{h}\n\n{msg}\n")).unwrap()[0].0, 3, "blank lines count");
        let cut = &msg[..20];
        let err = read_all(&format!("{h}\n{msg}\n{cut}")).unwrap_err();
        assert_eq!(err.line(), Some(3));
        assert!(err.to_string().contains("cut short"), "{err}");
        assert!(err.to_string().contains("cut off mid-line"), "{err}");
        let err = read_all(&format!("{h}\n{{\"tx\":{{\"xid\":\"x\"}}}}\n")).unwrap_err();
        assert_eq!(err.line(), Some(2));
        assert!(err.to_string().contains("malformed"), "{err}");
        let err = read_all(&format!("{h}\nnot json\n")).unwrap_err();
        assert!(err.to_string().starts_with("line 2: the line is not valid JSON"), "{err}");
        let err = read_all(&format!("{h}\n{h}\n")).unwrap_err();
        assert!(err.to_string().contains("a second header"), "{err}");
        let err = read_all(&format!("{msg}\n")).unwrap_err();
        assert!(err.to_string().starts_with("line 1: the first line is not a walbust recording header"), "{err}");
        let err = read_all("").unwrap_err();
        assert_eq!(err.line(), Some(1));
        let future = h.replace("\"format\":1", "\"format\":99");
        assert!(read_all(&future).unwrap_err().to_string().contains("format 99 is not supported"));
        let mut bad = format!("{h}\n").into_bytes();
        bad.extend_from_slice(b"\xff\n");
        let err = Reader::open(&bad[..]).and_then(|mut r| r.next_record().map(|_| ())).unwrap_err();
        assert!(err.to_string().starts_with("line 2: the line is not valid UTF-8"), "{err}");
        assert_eq!(
            err.report(Path::new("r.jsonl")).lines().next(),
            Some("error: r.jsonl:2: the line is not valid UTF-8")
        );
    }
}

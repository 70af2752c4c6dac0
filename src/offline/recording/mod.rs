//! Recordings: the committed change stream captured to a file, and replayed through rules.
//!
//! A recording is JSON Lines (see `docs/REPLAY.md`): a header naming the server, the
//! database and the published tables, then one line per committed transaction with its
//! row changes and messages as text, and a line whenever a table's definition changes.
//!
//! - [`format`](mod@format): the line types, written with a stable field order so recordings diff well,
//!   and [`format::Reader`], which reads and checks a recording line by line.
//! - [`recorder`]: `walbust record`, which decodes the stream of a temporary slot of its own
//!   with the same decoder and options as `walbust run`, and writes a recording.
//! - [`replay`](mod@replay): `walbust replay`, which feeds a recording through the production
//!   [`Router`](crate::domain::rules::Router) and [`Batch`](crate::domain::batch::Batch), reports the
//!   actions per transaction, and diffs what two rule sets do.
//! - recordings as `walbust test` inputs, checked against an expected output, are
//!   [`ruletest::recording`](crate::offline::ruletest::recording).

pub mod format;
pub mod recorder;
pub mod replay;

pub use format::{FORMAT_VERSION, RecordingError};
pub use recorder::{Limits, RecordError, RecordOptions, record};
pub use replay::{Diff, Replay, replay, replay_file};

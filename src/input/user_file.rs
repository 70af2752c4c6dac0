//! Reading a file a user names (config, rules, rule tests, passwords, certificates), with
//! a size cap per kind and regular files only.
//!
//! A path in a config file or on the command line may point anywhere: `/dev/zero` would be
//! read until memory runs out, a FIFO would block for ever, a 100 MB file of garbage would
//! be parsed into gigabytes. Each kind of file gets a cap far above any real file of that
//! kind; the metadata is checked before the file is opened, and the read itself is bounded
//! too, so a file that grows in between still stops at the cap.

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// What a file is for; each kind has its own size cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `config.toml`.
    Config,
    /// A rule file.
    Rules,
    /// A rule test file (`*.test.toml`).
    RuleTest,
    /// A recording a rule test replays.
    Recording,
    /// The expected output of a recording a rule test replays.
    Expected,
    /// `[source] password_file`.
    Password,
    /// A PEM certificate, bundle or private key: `ca_file`, `sslrootcert`, `sslcert`, `sslkey`.
    Pem,
}

impl Kind {
    /// The largest file of this kind that is read, in bytes.
    pub fn cap(self) -> u64 {
        match self {
            Kind::Config => 1 << 20,
            Kind::Rules | Kind::RuleTest | Kind::Expected => 16 << 20,
            Kind::Password => 4 << 10,
            Kind::Pem => 1 << 20,
            Kind::Recording => 1 << 30,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Config => "config file",
            Kind::Rules => "rule file",
            Kind::RuleTest => "rule test file",
            Kind::Recording => "recording",
            Kind::Expected => "expected-output file",
            Kind::Password => "password file",
            Kind::Pem => "PEM file",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a user-named file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be opened or read.
    #[error("cannot read {kind} {}", path.display())]
    Io {
        /// What the file is for.
        kind: Kind,
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A directory, device, FIFO or socket.
    #[error("{kind} {} is {what}, not a regular file; give the path of a regular file", path.display())]
    NotRegular {
        /// What the file is for.
        kind: Kind,
        /// The path given.
        path: PathBuf,
        /// What it is instead.
        what: &'static str,
    },
    /// Larger than the kind's cap.
    #[error("{kind} {} is larger than {} (the cap for a {kind}); is it the right file?", path.display(), show_size(kind.cap()))]
    TooLarge {
        /// What the file is for.
        kind: Kind,
        /// The path given.
        path: PathBuf,
    },
    /// Not UTF-8 text.
    #[error("{kind} {} is not UTF-8 text", path.display())]
    NotText {
        /// What the file is for.
        kind: Kind,
        /// The path given.
        path: PathBuf,
    },
}

impl ReadError {
    /// The message with the operating system's reason, when there is one, for diagnostics
    /// (which are text): `cannot read config file /x: No such file or directory (os error 2)`.
    pub fn with_reason(&self) -> String {
        match self {
            ReadError::Io { source, .. } => format!("{self}: {source}"),
            _ => self.to_string(),
        }
    }

    /// True when the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// Reads `path`, a file of `kind`: a regular file no larger than the kind's cap.
pub fn read(path: &Path, kind: Kind) -> Result<Vec<u8>, ReadError> {
    let io_error = |source| ReadError::Io { kind, path: path.to_path_buf(), source };
    // Before opening: opening a FIFO blocks until someone writes to it.
    let meta = std::fs::metadata(path).map_err(io_error)?;
    check_metadata(&meta, path, kind)?;
    let file = std::fs::File::open(path).map_err(io_error)?;
    // The path may have been swapped for something else since; the open file decides.
    check_metadata(&file.metadata().map_err(io_error)?, path, kind)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(kind.cap() + 1).read_to_end(&mut bytes).map_err(io_error)?;
    if bytes.len() as u64 > kind.cap() {
        return Err(ReadError::TooLarge { kind, path: path.to_path_buf() });
    }
    Ok(bytes)
}

/// Opens `path`, a file of `kind` read as a stream (a recording): a regular file, of any
/// size; the reader bounds what it holds at once.
pub fn open(path: &Path, kind: Kind) -> Result<std::fs::File, ReadError> {
    let io_error = |source| ReadError::Io { kind, path: path.to_path_buf(), source };
    let regular = |meta: &std::fs::Metadata| match check_metadata(meta, path, kind) {
        Err(ReadError::TooLarge { .. }) => Ok(()),
        other => other,
    };
    regular(&std::fs::metadata(path).map_err(io_error)?)?;
    let file = std::fs::File::open(path).map_err(io_error)?;
    regular(&file.metadata().map_err(io_error)?)?;
    Ok(file)
}

/// [`read`] for a text file.
pub fn read_to_string(path: &Path, kind: Kind) -> Result<String, ReadError> {
    String::from_utf8(read(path, kind)?).map_err(|_| ReadError::NotText { kind, path: path.to_path_buf() })
}

fn check_metadata(meta: &std::fs::Metadata, path: &Path, kind: Kind) -> Result<(), ReadError> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let what = if t.is_file() {
        if meta.len() > kind.cap() {
            return Err(ReadError::TooLarge { kind, path: path.to_path_buf() });
        }
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(ReadError::NotRegular { kind, path: path.to_path_buf(), what })
}

/// `n` bytes as the docs write caps: `4 KiB`, `1 MiB`.
fn show_size(n: u64) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_from_dev_zero_is_refused_without_reading() {
        let e = read(Path::new("/dev/zero"), Kind::Config).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config file /dev/zero is a device, not a regular file; give the path of a regular file"
        );
    }

    #[test]
    fn a_fifo_as_config_is_refused_instead_of_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("config.toml");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) on a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read(&fifo, Kind::Config).unwrap_err();
        assert!(matches!(e, ReadError::NotRegular { what: "a FIFO", .. }), "{e}");
        let e = read(dir.path(), Kind::Rules).unwrap_err();
        assert!(matches!(e, ReadError::NotRegular { what: "a directory", .. }), "{e}");
    }

    #[test]
    fn a_garbage_file_over_the_cap_is_refused_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("password");
        std::fs::write(&big, vec![b'x'; 4097]).unwrap();
        let e = read(&big, Kind::Password).unwrap_err();
        assert!(
            e.to_string().ends_with("is larger than 4 KiB (the cap for a password file); is it the right file?"),
            "{e}"
        );
        std::fs::write(&big, vec![b'x'; 4096]).unwrap();
        assert_eq!(read(&big, Kind::Password).unwrap().len(), 4096);
    }

    #[test]
    fn a_missing_file_keeps_the_os_reason() {
        let e = read_to_string(Path::new("/missing/config.toml"), Kind::Config).unwrap_err();
        assert!(e.is_not_found());
        let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert_eq!(chain, "cannot read config file /missing/config.toml: No such file or directory (os error 2)");
    }
}

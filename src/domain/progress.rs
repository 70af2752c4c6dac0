//! Progress through the WAL: what was received and what is safely applied.

use crate::postgres::lsn::Lsn;

/// The two positions walbust reports to the server, each only moving forward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    received: Lsn,
    flushed: Lsn,
}

impl Progress {
    /// Starts at `flushed`, the slot's confirmed position.
    pub fn starting_at(flushed: Lsn) -> Self {
        Progress { received: flushed, flushed }
    }

    /// The furthest position received from the server.
    pub fn received(&self) -> Lsn {
        self.received
    }

    /// The furthest position whose every action the sink has acknowledged.
    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    /// Notes data received up to `lsn`.
    pub fn receive(&mut self, lsn: Lsn) {
        self.received = self.received.max(lsn);
    }

    /// Notes everything up to `lsn` applied; returns true when the flushed position moved.
    pub fn flush(&mut self, lsn: Lsn) -> bool {
        self.receive(lsn);
        if lsn > self.flushed {
            self.flushed = lsn;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_never_move_backwards() {
        let mut p = Progress::starting_at(Lsn(100));
        assert!(!p.flush(Lsn(50)));
        assert_eq!(p.flushed(), Lsn(100));
        p.receive(Lsn(300));
        assert!(p.flush(Lsn(200)));
        assert_eq!((p.received(), p.flushed()), (Lsn(300), Lsn(200)));
    }
}

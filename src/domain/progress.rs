//! Progress through the WAL: what was received, what is applied, and what is durable.

use crate::postgres::lsn::Lsn;

/// The positions walbust reports to the server, each only moving forward.
///
/// `applied` is where every first delete is applied (reported as the status update's write
/// position, which `walbust.wait()` waits on); `flushed` is where every second delete is
/// applied too (reported as the flush position: the slot's confirmed position, from which
/// a restart replays). `received >= applied >= flushed`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    received: Lsn,
    applied: Lsn,
    flushed: Lsn,
}

impl Progress {
    /// Starts at `flushed`, the slot's confirmed position.
    pub fn starting_at(flushed: Lsn) -> Self {
        Progress { received: flushed, applied: flushed, flushed }
    }

    /// The furthest position received from the server.
    pub fn received(&self) -> Lsn {
        self.received
    }

    /// The furthest position whose every first delete the sink has acknowledged.
    pub fn applied(&self) -> Lsn {
        self.applied
    }

    /// The furthest position whose every action, second deletes included, the sink has
    /// acknowledged.
    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    /// Notes data received up to `lsn`.
    pub fn receive(&mut self, lsn: Lsn) {
        self.received = self.received.max(lsn);
    }

    /// Notes every first delete up to `lsn` applied; returns true when the applied position moved.
    pub fn apply(&mut self, lsn: Lsn) -> bool {
        self.receive(lsn);
        if lsn > self.applied {
            self.applied = lsn;
            true
        } else {
            false
        }
    }

    /// Notes everything up to `lsn` applied for good; returns true when the flushed position moved.
    pub fn flush(&mut self, lsn: Lsn) -> bool {
        self.apply(lsn);
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

    #[test]
    fn the_applied_position_runs_ahead_of_the_flushed_one_and_never_behind() {
        let mut p = Progress::starting_at(Lsn(100));
        assert!(p.apply(Lsn(300)));
        assert_eq!((p.received(), p.applied(), p.flushed()), (Lsn(300), Lsn(300), Lsn(100)));
        assert!(p.flush(Lsn(200)));
        assert_eq!(p.applied(), Lsn(300), "flushing behind it leaves it");
        assert!(p.flush(Lsn(400)));
        assert_eq!((p.applied(), p.flushed()), (Lsn(400), Lsn(400)), "flushed implies applied");
    }
}

//! How a failure that goes on is logged: at WARN when it starts, at most once a minute
//! while it lasts (at DEBUG in between), and at INFO with its length when it ends, so a
//! log shows each outage, how long it lasted, and not a line per retry.

use std::time::{Duration, Instant};

/// How often a failure that goes on is logged again at WARN.
pub const STILL_FAILING_EVERY: Duration = Duration::from_secs(60);

/// A run of failures of one thing (Redis, the replication stream, the heartbeat).
#[derive(Debug, Default)]
pub struct Outage {
    /// When it began, and when it was last logged at WARN.
    since: Option<(Instant, Instant)>,
}

impl Outage {
    /// One more failure; true when it is worth a WARN: the first of the outage, or the
    /// first after [`STILL_FAILING_EVERY`] since the last WARN.
    pub fn failed(&mut self) -> bool {
        self.failed_at(Instant::now())
    }

    fn failed_at(&mut self, now: Instant) -> bool {
        match &mut self.since {
            None => {
                self.since = Some((now, now));
                true
            }
            Some((_, warned)) if now.saturating_duration_since(*warned) >= STILL_FAILING_EVERY => {
                *warned = now;
                true
            }
            Some(_) => false,
        }
    }

    /// A success: how long the outage it ends lasted, if there was one.
    pub fn ended(&mut self) -> Option<Duration> {
        self.since.take().map(|(since, _)| since.elapsed())
    }

    /// How long the current outage has lasted; zero when there is none.
    pub fn length(&self) -> Duration {
        self.since.map_or(Duration::ZERO, |(since, _)| since.elapsed())
    }

    /// Whether an outage is going on.
    pub fn is_on(&self) -> bool {
        self.since.is_some()
    }
}

/// A duration as a person reads it in a log line: `850 ms`, `16 s`, `3 min 20 s`.
pub fn rounded(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{} ms", d.as_millis()),
        1..=119 => format!("{secs} s"),
        _ => format!("{} min {} s", secs / 60, secs % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_warns_when_it_starts_then_once_a_minute_and_ends_with_its_length() {
        let mut o = Outage::default();
        let t0 = Instant::now();
        assert!(!o.is_on() && o.ended().is_none());
        assert!(o.failed_at(t0), "the first failure");
        assert!(!o.failed_at(t0 + Duration::from_secs(1)) && !o.failed_at(t0 + Duration::from_secs(59)));
        assert!(o.failed_at(t0 + Duration::from_secs(60)), "a minute on");
        assert!(!o.failed_at(t0 + Duration::from_secs(61)));
        assert!(o.is_on());
        assert!(o.ended().is_some());
        assert!(!o.is_on() && o.ended().is_none(), "ended once");
        assert!(o.failed(), "a new outage warns again");
    }

    #[test]
    fn durations_read_as_a_person_says_them() {
        assert_eq!(rounded(Duration::from_millis(850)), "850 ms");
        assert_eq!(rounded(Duration::from_millis(16_400)), "16 s");
        assert_eq!(rounded(Duration::from_secs(200)), "3 min 20 s");
    }
}

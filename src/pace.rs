//! When the replication index is written without an event: a pure decision on an injected
//! clock, tested over hours of simulated bursts and silences.

use std::time::{Duration, Instant};

/// Record an index that moved without an applied event at most this often...
pub const RECORD_EVERY: Duration = Duration::from_secs(1);
/// ...unless it has moved this many source events since the last record, so that a
/// restart finds its index well inside the source's 1000-event history.
pub const RECORD_EVENTS: u64 = 100;

/// The index write schedule. An applied event is always recorded at once (that write is
/// what makes a restart resume after it); skipped events and proofs of silence are batched.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// The index the destination holds, as far as this process knows.
    pub written: u64,
    last: Instant,
}

impl Recorder {
    pub fn new(written: u64, now: Instant) -> Recorder {
        Recorder { written, last: now }
    }

    /// Whether `index` should be written now; `applied` when an event was just written.
    pub fn due(&self, index: u64, applied: bool, now: Instant) -> bool {
        if index <= self.written {
            return false;
        }
        applied
            || index.saturating_sub(self.written) >= RECORD_EVENTS
            || now.saturating_duration_since(self.last) >= RECORD_EVERY
    }

    /// Note that `index` was written at `now`.
    pub fn recorded(&mut self, index: u64, now: Instant) {
        self.written = self.written.max(index);
        self.last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn events_at_once_skips_batched() {
        let t0 = Instant::now();
        let mut r = Recorder::new(10, t0);
        assert!(r.due(11, true, t0));
        assert!(!r.due(50, false, t0));
        assert!(r.due(110, false, t0));
        assert!(r.due(11, false, t0 + RECORD_EVERY));
        r.recorded(11, t0 + RECORD_EVERY);
        assert!(!r.due(11, true, t0 + RECORD_EVERY * 5));
        assert!(!r.due(5, true, t0 + RECORD_EVERY * 5));
        // A clock that goes backwards (an Instant from before) is not a panic.
        assert!(!r.due(12, false, t0));
    }

    /// One step of a simulated source: time passes, then some events arrive (or a proof).
    #[derive(Debug, Clone)]
    struct Step {
        gap_ms: u64,
        events: u64,
        applied: bool,
    }

    fn step() -> impl Strategy<Value = Step> {
        (
            prop_oneof![
                0..50u64,
                0..5_000u64,
                0..200_000u64,
                Just(0),
                Just(u64::MAX >> 24)
            ],
            prop_oneof![Just(0u64), 1..3u64, 1..2_000u64, Just(u64::MAX >> 8)],
            any::<bool>(),
        )
            .prop_map(|(gap_ms, events, applied)| Step {
                gap_ms,
                events,
                applied,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Over hours of bursts and silences: never a panic; the destination never holds an
        /// index ahead of the mirror's; writes never go backwards; after every decision the
        /// unrecorded part is small or recent; and without applied events, index writes are
        /// at most one per second or one per 100 source events.
        #[test]
        fn records_often_enough_and_never_too_often(
            start in 0u64..u64::MAX / 2,
            steps in proptest::collection::vec(step(), 1..400),
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut index = start;
            let mut r = Recorder::new(start, t0);
            let mut writes = 0u64;
            let mut moved = 0u64;
            for s in &steps {
                now = now.checked_add(Duration::from_millis(s.gap_ms)).unwrap_or(now);
                let before = index;
                index = index.saturating_add(s.events);
                moved = moved.saturating_add(index - before);
                let written_before = r.written;
                if r.due(index, s.applied && index > before, now) {
                    r.recorded(index, now);
                    writes += 1;
                }
                prop_assert!(r.written >= written_before);
                prop_assert!(r.written <= index);
                let pending = index - r.written;
                prop_assert!(pending == 0 || (pending < RECORD_EVENTS
                    && now.saturating_duration_since(r.last) < RECORD_EVERY));
            }
            let applied = steps.iter().filter(|s| s.applied && s.events > 0).count() as u64;
            let secs = now.saturating_duration_since(t0).as_secs();
            prop_assert!(writes <= applied + secs + 1 + moved / RECORD_EVENTS);
        }
    }
}

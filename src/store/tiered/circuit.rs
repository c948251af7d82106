//! The circuit breaker around Redis. It opens on *repeated* failures (a streak of at least
//! `failures` that has lasted at least `window`), not on one slow reply, so a single
//! `DEBUG SLEEP` or a burst of time-outs does not send the instance to its memory tier. It
//! also opens at once when correctness needs it (an invalidation that could not reach Redis,
//! or a Redis that came back from a snapshot) and when a failure proves Redis gone (a refused
//! connection: no streak would tell more, and each request meanwhile would fall on the
//! origin). Only the probe closes it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::names;

/// When the circuit opens.
#[derive(Debug, Clone, Copy)]
pub struct CircuitOptions {
    /// Consecutive failures needed.
    pub failures: u32,
    /// How long the streak must have lasted.
    pub window: Duration,
}

/// Open (serving from memory) or closed (serving from Redis).
#[derive(Debug)]
pub struct Circuit {
    open: AtomicBool,
    /// Opens and closes so far: what near-cache copies are tied to.
    transitions: AtomicU64,
    streak: AtomicU32,
    streak_started: Mutex<Option<Instant>>,
    opened: AtomicU64,
    opts: CircuitOptions,
    gauge: metrics::Gauge,
}

impl Circuit {
    /// A circuit that starts open: nothing is served from Redis before a probe found it.
    pub fn new(opts: CircuitOptions) -> Self {
        let gauge = metrics::gauge!(names::CIRCUIT_OPEN);
        gauge.set(1.0);
        Self {
            open: AtomicBool::new(true),
            transitions: AtomicU64::new(0),
            streak: AtomicU32::new(0),
            streak_started: Mutex::new(None),
            opened: AtomicU64::new(0),
            opts,
            gauge,
        }
    }

    /// Whether reads and writes go to memory.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Opens and closes so far.
    pub fn transitions(&self) -> u64 {
        self.transitions.load(Ordering::Acquire)
    }

    /// Times it opened.
    pub fn openings(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// A Redis command succeeded: the streak ends. One relaxed load on the hot path.
    pub fn success(&self) {
        if self.streak.load(Ordering::Relaxed) > 0 {
            self.streak.store(0, Ordering::Relaxed);
            *self
                .streak_started
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// A Redis command failed as if Redis were unreachable. Returns whether the circuit
    /// opened now.
    pub fn failure(&self, why: &str) -> bool {
        let count = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
        let lasted = {
            let mut started = self
                .streak_started
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            started.get_or_insert_with(Instant::now).elapsed()
        };
        if count >= self.opts.failures && lasted >= self.opts.window {
            self.open(why)
        } else {
            false
        }
    }

    /// Opens now; returns whether it was closed. Logs only on the transition.
    pub fn open(&self, why: &str) -> bool {
        if self.open.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.transitions.fetch_add(1, Ordering::AcqRel);
        self.gauge.set(1.0);
        self.opened.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(names::CACHE_FALLBACK_TOTAL).increment(1);
        tracing::warn!(reason = why, "redis unusable; serving from the memory tier");
        true
    }

    /// Closes (the probe found Redis, and the journal is replayed).
    pub fn close(&self) {
        self.success();
        self.transitions.fetch_add(1, Ordering::AcqRel);
        self.open.store(false, Ordering::Release);
        self.gauge.set(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_slow_reply_does_not_open_it_a_lasting_streak_does() {
        let c = Circuit::new(CircuitOptions {
            failures: 3,
            window: Duration::from_millis(50),
        });
        c.close();
        for _ in 0..10 {
            assert!(!c.failure("timeout"), "a burst shorter than the window");
        }
        c.success();
        assert!(!c.failure("timeout"));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!c.failure("timeout"), "long enough, but only two failures");
        assert!(c.failure("timeout"));
        assert!(c.is_open() && c.openings() == 1);
    }

    #[test]
    fn correctness_opens_it_at_once() {
        let c = Circuit::new(CircuitOptions {
            failures: 100,
            window: Duration::from_secs(60),
        });
        c.close();
        assert!(c.open("an invalidation could not reach redis"));
        assert!(!c.open("again"));
    }
}

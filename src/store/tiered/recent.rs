//! The invalidations applied to Redis recently (by this instance, or heard from others), so
//! that a Redis that comes back from an older snapshot (with entries and counters from before
//! them) gets them again before it serves. `redis.rollback_window_secs` is how far back the
//! ring vouches for: a snapshot older than that, a ring that overflowed within it, or a
//! process younger than it, and everything is cleared instead.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::Invalidation;

/// Most invalidations kept.
const CAPACITY: usize = 20_000;

/// A time-bounded ring of recent invalidations.
#[derive(Debug)]
pub struct Recent {
    window: Duration,
    started: Instant,
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    ops: VecDeque<(Instant, Invalidation)>,
    /// When an operation younger than the window last had to be dropped for room.
    overflowed_at: Option<Instant>,
}

impl Recent {
    /// A ring vouching for the last `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            started: Instant::now(),
            ring: Mutex::default(),
        }
    }

    /// Remembers `inv`, applied now.
    pub fn push(&self, inv: &Invalidation) {
        let now = Instant::now();
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        while ring
            .ops
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > self.window)
        {
            ring.ops.pop_front();
        }
        if ring.ops.len() >= CAPACITY {
            ring.ops.pop_front();
            ring.overflowed_at = Some(now);
        }
        ring.ops.push_back((now, inv.clone()));
    }

    /// What to replay to a Redis restored from a snapshot: every invalidation of the window,
    /// or `None` when the ring cannot vouch for all of it (then everything must be cleared).
    pub fn replay(&self) -> Option<Vec<Invalidation>> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let covers = self.started.elapsed() >= self.window
            && ring
                .overflowed_at
                .is_none_or(|at| at.elapsed() > self.window);
        covers.then(|| {
            ring.ops
                .iter()
                .filter(|(at, _)| at.elapsed() <= self.window)
                .map(|(_, op)| op.clone())
                .collect()
        })
    }

    /// Invalidations held.
    pub fn len(&self) -> usize {
        self.ring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ops
            .len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_young_process_cannot_vouch_for_the_window() {
        let recent = Recent::new(Duration::from_secs(3600));
        recent.push(&Invalidation::default());
        assert_eq!(recent.replay(), None);
        let short = Recent::new(Duration::ZERO);
        short.push(&Invalidation {
            bump: vec!["g".into()],
            ..Invalidation::default()
        });
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(
            short.replay().map(|ops| ops.len()),
            Some(0),
            "outside the window"
        );
    }
}

//! Recent reads per key: refresh-ahead decides from them which entries are hot, and a
//! near-cache copy carries its key's counter so that a hit counts without a lookup.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

/// Most keys counted at once: past it, new keys are counted on a counter nobody keeps.
pub const MAX_KEYS: usize = 100_000;

/// How long a counter is kept without a read: it is forgotten between one and two of these
/// after its last one.
pub const IDLE: Duration = Duration::from_secs(600);

/// How often counters are swept while [`MAX_KEYS`] are counted.
const FULL_SWEEP: Duration = Duration::from_secs(60);

/// A counter and its value at the last sweep (a counter that did not move over a whole
/// [`IDLE`] was not read in it).
type Counted = (Arc<AtomicU32>, u32);

/// Reads per key, forgotten after 10 to 20 minutes without one (1 to 2 minutes while
/// [`MAX_KEYS`] are counted), at most [`MAX_KEYS`] keys.
/// Cloning shares the same counters.
///
/// A sharded map rather than a cache crate: the memory tier and Redis-only hits look their
/// counter up on every hit, and moka's read bookkeeping (its clock, its read log) cost about
/// 900 instructions of it, where a shard's read lock and one hash cost a fifth of that. Idle
/// counters are swept by the housekeeping task ([`ReadCounters::sweep`]).
#[derive(Clone)]
pub struct ReadCounters {
    // foldhash, seeded per process: keys come from clients, and SipHash would cost more
    // than the rest of a near-cache hit's counting.
    hits: Arc<DashMap<String, Counted, foldhash::fast::RandomState>>,
    len: Arc<AtomicUsize>,
    last_sweep: Arc<Mutex<Instant>>,
}

impl std::fmt::Debug for ReadCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCounters").finish_non_exhaustive()
    }
}

impl Default for ReadCounters {
    fn default() -> Self {
        Self {
            hits: Arc::new(DashMap::with_hasher(foldhash::fast::RandomState::default())),
            len: Arc::default(),
            last_sweep: Arc::new(Mutex::new(Instant::now())),
        }
    }
}

impl ReadCounters {
    /// The counter of `key` (created at 0). When [`MAX_KEYS`] keys are counted already, a new
    /// key's counter is not kept (its reads count toward nothing until a sweep makes room).
    pub fn of(&self, key: &str) -> Arc<AtomicU32> {
        if let Some(counted) = self.hits.get(key) {
            return counted.0.clone();
        }
        if self.len.load(Ordering::Relaxed) >= MAX_KEYS {
            return Arc::default();
        }
        match self.hits.entry(key.to_owned()) {
            Entry::Occupied(e) => e.get().0.clone(),
            Entry::Vacant(e) => {
                self.len.fetch_add(1, Ordering::Relaxed);
                e.insert((Arc::default(), 0)).0.clone()
            }
        }
    }

    /// Keys counted now.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether no key is counted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets the counters not read since the previous sweep, once per [`IDLE`], or once a
    /// minute while [`MAX_KEYS`] are counted (so that keys read now get a counter again,
    /// at the cost of forgetting those not read in the last minute). The housekeeping task
    /// calls it every few seconds. Walks every counter: never on a request.
    pub fn sweep(&self) {
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|e| e.into_inner());
            let due = if self.len() >= MAX_KEYS {
                FULL_SWEEP
            } else {
                IDLE
            };
            if last.elapsed() < due {
                return;
            }
            *last = Instant::now();
        }
        self.forget_unread();
    }

    /// Forgets every counter that did not move since the last call, and notes where the
    /// others stand.
    fn forget_unread(&self) {
        self.hits.retain(|_, (counter, seen)| {
            let now = counter.load(Ordering::Relaxed);
            let read = now != *seen;
            *seen = now;
            if !read {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
            read
        });
    }

    /// The `n` most read keys, most read first, among those `keep` accepts. Walks every
    /// counter (at most [`MAX_KEYS`]), so it is for a background task (see
    /// [`crate::metrics::history`]), never a request.
    pub fn hottest(&self, n: usize, keep: impl Fn(&str) -> bool) -> Vec<(String, u32)> {
        if n == 0 {
            return Vec::new();
        }
        let mut top: Vec<(String, u32)> = self
            .hits
            .iter()
            .map(|e| (e.key().clone(), e.value().0.load(Ordering::Relaxed)))
            .filter(|(k, c)| *c > 0 && keep(k))
            .collect();
        let order =
            |a: &(String, u32), b: &(String, u32)| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0));
        if top.len() > n {
            top.select_nth_unstable_by(n - 1, order);
            top.truncate(n);
        }
        top.sort_unstable_by(order);
        top
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hottest_keys_come_most_read_first() {
        let counters = ReadCounters::default();
        for (key, reads) in [("a", 3), ("b", 7), ("c", 1), ("other:d", 9)] {
            counters.of(key).fetch_add(reads, Ordering::Relaxed);
        }
        counters.of("never-read");
        let top = counters.hottest(2, |k| !k.starts_with("other:"));
        let top: Vec<_> = top.iter().map(|(k, c)| (k.as_str(), *c)).collect();
        assert_eq!(top, [("b", 7), ("a", 3)]);
    }

    #[test]
    fn a_counter_is_shared_until_a_whole_sweep_passes_without_a_read() {
        let counters = ReadCounters::default();
        let held = counters.of("a");
        held.fetch_add(1, Ordering::Relaxed);
        assert!(Arc::ptr_eq(&held, &counters.of("a")), "one counter per key");
        counters.of("never-read");
        // Read since the last sweep: kept; never read: forgotten.
        counters.forget_unread();
        assert_eq!(counters.len(), 1);
        assert!(Arc::ptr_eq(&held, &counters.of("a")));
        // A read through a counter someone holds (a near-cache copy) counts as a read.
        held.fetch_add(1, Ordering::Relaxed);
        counters.forget_unread();
        assert!(Arc::ptr_eq(&held, &counters.of("a")));
        // A whole sweep without one: forgotten, and counted afresh.
        counters.forget_unread();
        assert_eq!(counters.len(), 0);
        assert_eq!(counters.of("a").load(Ordering::Relaxed), 0);
        // `sweep` itself waits for IDLE to pass since the last one.
        counters.of("b");
        counters.sweep();
        assert_eq!(counters.len(), 2, "no sweep before IDLE has passed");
    }

    #[test]
    fn past_the_bound_new_keys_are_counted_on_nothing_kept() {
        let counters = ReadCounters::default();
        counters.len.store(MAX_KEYS, Ordering::Relaxed);
        let loose = counters.of("new");
        loose.fetch_add(5, Ordering::Relaxed);
        assert!(counters.hottest(10, |_| true).is_empty());
        assert!(!Arc::ptr_eq(&loose, &counters.of("new")));
    }
}

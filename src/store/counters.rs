//! Recent reads per key: refresh-ahead decides from them which entries are hot, and a
//! near-cache copy carries its key's counter so that a hit counts without a lookup.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Reads per key, forgotten after 10 minutes without one, at most 100 000 keys.
#[derive(Clone)]
pub struct ReadCounters {
    // A sync cache: the hit path counts every read and should not pay for an async lookup.
    // foldhash, seeded per process: keys come from clients, and SipHash would cost more
    // than the rest of a near-cache hit's counting.
    hits: moka::sync::Cache<String, Arc<AtomicU32>, foldhash::fast::RandomState>,
}

impl std::fmt::Debug for ReadCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCounters").finish_non_exhaustive()
    }
}

impl Default for ReadCounters {
    fn default() -> Self {
        Self {
            hits: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build_with_hasher(foldhash::fast::RandomState::default()),
        }
    }
}

impl ReadCounters {
    /// The counter of `key` (created at 0).
    pub fn of(&self, key: &str) -> Arc<AtomicU32> {
        self.hits.get_with_by_ref(key, Arc::default)
    }

    /// The `n` most read keys, most read first, among those `keep` accepts. Walks every
    /// counter (at most 100 000), so it is for a background task (see
    /// [`crate::metrics::history`]), never a request.
    pub fn hottest(&self, n: usize, keep: impl Fn(&str) -> bool) -> Vec<(Arc<String>, u32)> {
        let mut top: Vec<(Arc<String>, u32)> = self
            .hits
            .iter()
            .map(|(k, c)| (k, c.load(Ordering::Relaxed)))
            .filter(|(k, c)| *c > 0 && keep(k))
            .collect();
        let order = |a: &(Arc<String>, u32), b: &(Arc<String>, u32)| {
            b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0))
        };
        if n == 0 {
            return Vec::new();
        }
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
}

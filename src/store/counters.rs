//! Recent reads per key: refresh-ahead decides from them which entries are hot, and a
//! near-cache copy carries its key's counter so that a hit counts without a lookup.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Reads per key, forgotten after 10 minutes without one, at most 100 000 keys.
#[derive(Clone)]
pub struct ReadCounters {
    // A sync cache: the hit path counts every read and should not pay for an async lookup.
    hits: moka::sync::Cache<String, Arc<AtomicU32>>,
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
                .build(),
        }
    }
}

impl ReadCounters {
    /// The counter of `key` (created at 0).
    pub fn of(&self, key: &str) -> Arc<AtomicU32> {
        self.hits.get_with_by_ref(key, Arc::default)
    }
}

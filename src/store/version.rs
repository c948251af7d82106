//! The key version shared by every instance on one Redis. It lives in Redis
//! (`{prefix}:_meta:version`); each instance re-reads it every `redis.version_poll_ms`, and
//! `cache.version` is only the starting value when Redis holds none.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use super::{Keyspace, Shared, StoreError};

/// The version this instance builds keys with. Reading it is a lock-free pointer load.
#[derive(Debug)]
pub struct KeyVersion {
    current: ArcSwap<String>,
    /// Whether `current` was read from (or written to) Redis: until then it is only the
    /// configured starting value, which must never overwrite the shared one.
    shared: AtomicBool,
}

impl KeyVersion {
    /// Starts at `initial` (from settings).
    pub fn new(initial: &str) -> Self {
        Self {
            current: ArcSwap::from_pointee(initial.to_owned()),
            shared: AtomicBool::new(false),
        }
    }

    /// The version in use.
    pub fn get(&self) -> Arc<String> {
        self.current.load_full()
    }

    /// The version in use, borrowed: no reference count shared between threads is touched
    /// (the hit lane reads it on every request).
    pub fn current(&self) -> arc_swap::Guard<Arc<String>> {
        self.current.load()
    }

    /// Uses `version`, which Redis holds, from now on; returns whether it changed.
    pub fn set(&self, version: &str) -> bool {
        let old = self.current.swap(Arc::new(version.to_owned()));
        self.shared.store(true, Ordering::Release);
        *old != version
    }

    /// Whether the version in use is the shared one (read from or written to Redis), not
    /// just the configured starting value.
    pub fn is_shared(&self) -> bool {
        self.shared.load(Ordering::Acquire)
    }

    /// Adopts the version stored in Redis, or stores ours when Redis has none. Does nothing
    /// but fail while Redis is unreachable.
    pub async fn sync(&self, store: &dyn Shared, keys: &Keyspace) -> Result<(), StoreError> {
        let key = keys.version_key();
        match store.meta_get(&key).await? {
            Some(stored) => {
                if self.set(&stored) {
                    tracing::info!(version = %stored, "key version changed");
                }
                Ok(())
            }
            None => {
                store.meta_set(&key, &self.get(), true).await?;
                self.shared.store(true, Ordering::Release);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_reports_changes() {
        let v = KeyVersion::new("v1");
        assert!(!v.is_shared());
        assert!(!v.set("v1"));
        assert!(v.is_shared());
        assert!(v.set("v2"));
        assert_eq!(v.get().as_str(), "v2");
    }
}

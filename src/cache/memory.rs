//! The bounded in-process tier: a moka cache weighed in bytes, with per-entry expiry and LRU
//! eviction (moka's default TinyLFU admission could refuse fresh entries when full).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use wildmatch::WildMatch;

use super::{CacheEntry, Lookup, Store, StoreError};
use crate::metrics::names;

#[derive(Debug)]
struct Slot {
    entry: CacheEntry,
    ttl: Duration,
    /// When the store drops it, in Unix milliseconds (for snapshots).
    expires_at_ms: u64,
}

/// Everything the memory tier holds, for snapshots.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemoryContents {
    /// `(physical key, expires at in Unix ms, entry)`.
    pub entries: Vec<(String, u64, CacheEntry)>,
    /// Generation counters.
    pub gens: Vec<(String, u64)>,
}

struct PerEntryTtl;

impl moka::Expiry<String, Arc<Slot>> for PerEntryTtl {
    fn expire_after_create(&self, _: &String, v: &Arc<Slot>, _: Instant) -> Option<Duration> {
        Some(v.ttl)
    }

    fn expire_after_update(
        &self,
        _: &String,
        v: &Arc<Slot>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

/// Entries the memory tier dropped on its own.
#[derive(Debug, Default)]
pub struct Removals {
    /// Evicted to stay within the byte bound.
    pub evicted: AtomicU64,
    /// Expired.
    pub expired: AtomicU64,
}

/// In-process store bounded in bytes. Cloning shares the same cache.
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<String, Arc<Slot>>,
    max_bytes: u64,
    gens: Arc<Mutex<HashMap<String, u64>>>,
    removals: Arc<Removals>,
    changes: Arc<AtomicU64>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// A store holding at most `max_bytes` of entries (keys and bodies counted).
    pub fn new(max_bytes: u64) -> Self {
        let removals = Arc::new(Removals::default());
        let listener_removals = removals.clone();
        let evicted = metrics::counter!(names::MEMORY_REMOVALS_TOTAL, "cause" => "size");
        let expired = metrics::counter!(names::MEMORY_REMOVALS_TOTAL, "cause" => "expired");
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &String, v: &Arc<Slot>| {
                u32::try_from(k.len() + v.entry.weight()).unwrap_or(u32::MAX)
            })
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(PerEntryTtl)
            .eviction_listener(move |_, _, cause| match cause {
                RemovalCause::Size => {
                    listener_removals.evicted.fetch_add(1, Ordering::Relaxed);
                    evicted.increment(1);
                }
                RemovalCause::Expired => {
                    listener_removals.expired.fetch_add(1, Ordering::Relaxed);
                    expired.increment(1);
                }
                RemovalCause::Explicit | RemovalCause::Replaced => {}
            })
            .build();
        Self {
            cache,
            max_bytes,
            gens: Arc::default(),
            removals,
            changes: Arc::default(),
        }
    }

    /// Writes, deletes and bumps so far (snapshots are taken after enough of them).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of every live entry and generation (bodies are shared, not copied).
    pub fn export(&self) -> MemoryContents {
        let now = crate::cache::policy::now_ms();
        let entries = self
            .cache
            .iter()
            .filter(|(_, slot)| slot.expires_at_ms > now)
            .map(|(k, slot)| {
                (
                    k.as_str().to_owned(),
                    slot.expires_at_ms,
                    slot.entry.clone(),
                )
            })
            .collect();
        let gens = self
            .gens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        MemoryContents { entries, gens }
    }

    /// Loads entries (each kept until its own expiry) and generations, e.g. from a snapshot.
    pub async fn import(&self, contents: MemoryContents) {
        let now = crate::cache::policy::now_ms();
        {
            let mut gens = self.gens.lock().unwrap_or_else(|e| e.into_inner());
            for (k, v) in contents.gens {
                let g = gens.entry(k).or_insert(0);
                *g = (*g).max(v);
            }
        }
        for (key, expires_at_ms, entry) in contents.entries {
            if expires_at_ms > now {
                let ttl = Duration::from_millis(expires_at_ms - now);
                let _ = self.set(&key, &entry, ttl).await;
            }
        }
    }

    /// Entries evicted and expired so far.
    pub fn removals(&self) -> &Removals {
        &self.removals
    }

    fn read_gens(&self, deps: &[String]) -> Vec<u64> {
        let gens = self.gens.lock().unwrap_or_else(|e| e.into_inner());
        deps.iter()
            .map(|d| gens.get(d).copied().unwrap_or(0))
            .collect()
    }

    /// Entries currently held (after pending maintenance).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Bytes currently held (after pending maintenance).
    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// The configured bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Runs moka's housekeeping: expired entries are removed and counts become exact.
    pub async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }

    /// Drops everything (used when returning to Redis, so the memory tier never serves an
    /// entry that missed invalidations made by other instances while this one used Redis).
    pub fn clear(&self) {
        self.cache.invalidate_all();
        self.changed();
    }

    async fn remove_where(&self, pred: impl Fn(&str, &Slot) -> bool) -> u64 {
        let keys: Vec<Arc<String>> = self
            .cache
            .iter()
            .filter(|(k, v)| pred(k, v))
            .map(|(k, _)| k)
            .collect();
        let mut removed = 0;
        for key in keys {
            if self.cache.remove(key.as_str()).await.is_some() {
                removed += 1;
            }
        }
        if removed > 0 {
            self.changed();
        }
        removed
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str, deps: &[String]) -> Result<Lookup, StoreError> {
        Ok(Lookup {
            entry: self.cache.get(key).await.map(|slot| slot.entry.clone()),
            gens: self.read_gens(deps),
            expires_in: None,
        })
    }

    async fn touch(
        &self,
        key: &str,
        entry: &CacheEntry,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        // In process, re-inserting shares the body (`Bytes`), so nothing large is copied.
        let existed = self.cache.contains_key(key);
        if existed {
            self.set(key, entry, retention).await?;
        }
        Ok(existed)
    }

    async fn generations(&self, deps: &[String]) -> Result<Vec<u64>, StoreError> {
        Ok(self.read_gens(deps))
    }

    async fn bump(&self, deps: &[String]) -> Result<(), StoreError> {
        let mut gens = self.gens.lock().unwrap_or_else(|e| e.into_inner());
        for dep in deps {
            *gens.entry(dep.clone()).or_insert(0) += 1;
        }
        drop(gens);
        self.changed();
        Ok(())
    }

    async fn set(&self, key: &str, entry: &CacheEntry, ttl: Duration) -> Result<(), StoreError> {
        let expires_at_ms = crate::cache::policy::now_ms()
            .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let slot = Arc::new(Slot {
            entry: entry.clone(),
            ttl,
            expires_at_ms,
        });
        self.cache.insert(key.to_owned(), slot).await;
        self.changed();
        Ok(())
    }

    async fn delete(&self, keys: &[String]) -> Result<u64, StoreError> {
        let mut removed = 0;
        for key in keys {
            if self.cache.remove(key.as_str()).await.is_some() {
                removed += 1;
            }
        }
        if removed > 0 {
            self.changed();
        }
        Ok(removed)
    }

    async fn delete_tagged(&self, tag: &str) -> Result<u64, StoreError> {
        Ok(self
            .remove_where(|_, slot| slot.entry.tags.iter().any(|t| t == tag))
            .await)
    }

    async fn delete_matching(&self, pattern: &str) -> Result<u64, StoreError> {
        let glob = WildMatch::new(pattern);
        Ok(self.remove_where(|k, _| glob.matches(k)).await)
    }

    async fn count_matching(&self, pattern: &str) -> Result<u64, StoreError> {
        let glob = WildMatch::new(pattern);
        Ok(self.cache.iter().filter(|(k, _)| glob.matches(k)).count() as u64)
    }

    async fn health_check(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn entry(body: &'static [u8], tags: &[&str]) -> CacheEntry {
        CacheEntry::new(
            200,
            "application/json".into(),
            Bytes::from_static(body),
            0,
            Duration::from_secs(60),
            tags.iter().map(|t| (*t).to_owned()).collect(),
        )
    }

    #[tokio::test]
    async fn set_get_delete_round_trip() {
        let store = MemoryStore::new(1 << 20);
        let e = entry(b"{}", &[]);
        store
            .set("k", &e, Duration::from_secs(60))
            .await
            .expect("set");
        assert_eq!(store.get("k", &[]).await.expect("get").current(), Some(e));
        assert_eq!(
            store
                .delete(&["k".into(), "nope".into()])
                .await
                .expect("delete"),
            1
        );
        assert_eq!(store.get("k", &[]).await.expect("get").current(), None);
    }

    #[tokio::test]
    async fn tagged_and_pattern_deletes_are_precise() {
        let store = MemoryStore::new(1 << 20);
        let ttl = Duration::from_secs(60);
        store
            .set("p:v1:a", &entry(b"1", &["t:1"]), ttl)
            .await
            .expect("set");
        store
            .set("p:v1:b", &entry(b"2", &["t:1", "t:2"]), ttl)
            .await
            .expect("set");
        store
            .set("p:v1:c", &entry(b"3", &["t:2"]), ttl)
            .await
            .expect("set");
        store
            .set("other:x", &entry(b"4", &[]), ttl)
            .await
            .expect("set");
        assert_eq!(store.delete_tagged("t:1").await.expect("tagged"), 2);
        assert!(store.get("p:v1:c", &[]).await.expect("get").entry.is_some());
        assert_eq!(store.count_matching("p:v1:*").await.expect("count"), 1);
        assert_eq!(store.delete_matching("p:v1:*").await.expect("clear"), 1);
        assert!(
            store
                .get("other:x", &[])
                .await
                .expect("get")
                .entry
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_bump_makes_older_stamps_unservable() {
        let store = MemoryStore::new(1 << 20);
        let deps = vec!["gen:run:1".to_owned()];
        let mut e = entry(b"{}", &[]);
        e.gens = store.generations(&deps).await.expect("gens");
        store.bump(&deps).await.expect("bump");
        // A fetch that began before the bump stores afterwards: never served.
        store
            .set("k", &e, Duration::from_secs(60))
            .await
            .expect("set");
        assert!(
            store
                .get("k", &deps)
                .await
                .expect("get")
                .current()
                .is_none()
        );
        e.gens = store.generations(&deps).await.expect("gens");
        store
            .set("k", &e, Duration::from_secs(60))
            .await
            .expect("set");
        assert!(
            store
                .get("k", &deps)
                .await
                .expect("get")
                .current()
                .is_some()
        );
    }

    #[tokio::test]
    async fn byte_bound_evicts() {
        let store = MemoryStore::new(4096);
        let big = CacheEntry::new(
            200,
            "application/json".into(),
            Bytes::from(vec![b'x'; 1000]),
            0,
            Duration::from_secs(60),
            vec![],
        );
        for i in 0..20 {
            store
                .set(&format!("k{i}"), &big, Duration::from_secs(60))
                .await
                .expect("set");
        }
        store.run_pending_tasks().await;
        assert!(store.weighted_size() <= 4096, "{}", store.weighted_size());
        assert!(store.entry_count() < 20);
        assert!(store.removals().evicted.load(Ordering::Relaxed) > 0);
    }
}

//! Redis first, memory when Redis is unreachable. A failed Redis command opens the circuit at
//! once (later requests go straight to memory, never waiting on a dead Redis); a background
//! probe closes it. Invalidations made while Redis is down are applied to memory and kept in a
//! journal that is replayed to Redis before any read is served from Redis again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use super::{CacheEntry, MemoryStore, RedisStore, Store, StoreError, Tier};
use crate::metrics::names;

/// An invalidation waiting to be applied to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalOp {
    /// Delete these physical keys.
    Delete(Vec<String>),
    /// Delete the members of this tag set, and the set.
    DeleteTagged(String),
    /// Delete the keys matching this physical glob.
    DeleteMatching(String),
}

/// Above this many pending operations the journal collapses into one "delete every entry"
/// operation, so an outage under a storm of events cannot exhaust memory or lose anything.
const JOURNAL_CAP: usize = 10_000;

/// The two tiers behind one `Store`.
#[derive(Debug)]
pub struct FallbackStore {
    redis: RedisStore,
    memory: MemoryStore,
    up: AtomicBool,
    journal: Mutex<Vec<JournalOp>>,
    overflow_pattern: String,
    fallbacks: AtomicU64,
}

impl FallbackStore {
    /// Starts in the memory tier until [`FallbackStore::probe`] finds Redis.
    /// `all_entries_pattern` is the Redis glob matching every entry of every version of this
    /// service (used when the journal overflows).
    pub fn new(redis: RedisStore, memory: MemoryStore, all_entries_pattern: String) -> Self {
        Self {
            redis,
            memory,
            up: AtomicBool::new(false),
            journal: Mutex::new(Vec::new()),
            overflow_pattern: all_entries_pattern,
            fallbacks: AtomicU64::new(0),
        }
    }

    /// The tier reads and writes currently go to.
    pub fn tier(&self) -> Tier {
        if self.up.load(Ordering::Acquire) {
            Tier::Redis
        } else {
            Tier::Memory
        }
    }

    /// The Redis tier, for Redis-only work (version, INFO); callers check [`Self::tier`].
    pub fn redis(&self) -> &RedisStore {
        &self.redis
    }

    /// The memory tier.
    pub fn memory(&self) -> &MemoryStore {
        &self.memory
    }

    /// How many times the service has fallen back to memory.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Invalidations waiting for Redis.
    pub fn pending_invalidations(&self) -> usize {
        self.lock_journal().len()
    }

    fn lock_journal(&self) -> std::sync::MutexGuard<'_, Vec<JournalOp>> {
        self.journal.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens the circuit after `err`; logs only on the transition.
    pub fn mark_down(&self, err: &StoreError) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(names::CACHE_FALLBACK_TOTAL).increment(1);
            tracing::warn!(error = %err, "redis unreachable; serving from the memory tier");
        }
    }

    /// Checks Redis when the circuit is open; on success replays the journal, empties the
    /// memory tier (its entries never saw other instances' invalidations) and closes the
    /// circuit. Returns whether Redis is in use afterwards.
    pub async fn probe(&self) -> bool {
        if self.up.load(Ordering::Acquire) {
            return true;
        }
        if self.redis.health_check().await.is_err() {
            return false;
        }
        loop {
            let ops = std::mem::take(&mut *self.lock_journal());
            if ops.is_empty() {
                let journal = self.lock_journal();
                if !journal.is_empty() {
                    continue;
                }
                // Closing the circuit under the journal lock: an invalidation either sees the
                // circuit closed and goes to Redis, or is journaled before this point.
                self.memory.clear();
                self.up.store(true, Ordering::Release);
                drop(journal);
                tracing::info!("redis reachable; serving from redis");
                return true;
            }
            let count = ops.len();
            for (i, op) in ops.iter().enumerate() {
                if let Err(e) = self.apply_to_redis(op).await {
                    let mut journal = self.lock_journal();
                    let rest: Vec<JournalOp> = ops[i..].to_vec();
                    journal.splice(0..0, rest);
                    tracing::warn!(error = %e, "replaying invalidations to redis failed; will retry");
                    return false;
                }
            }
            tracing::info!(count, "replayed invalidations made while redis was down");
        }
    }

    async fn apply_to_redis(&self, op: &JournalOp) -> Result<u64, StoreError> {
        match op {
            JournalOp::Delete(keys) => self.redis.delete(keys).await,
            JournalOp::DeleteTagged(tag) => self.redis.delete_tagged(tag).await,
            JournalOp::DeleteMatching(pattern) => self.redis.delete_matching(pattern).await,
        }
    }

    async fn apply_to_memory(&self, op: &JournalOp) -> u64 {
        let result = match op {
            JournalOp::Delete(keys) => self.memory.delete(keys).await,
            JournalOp::DeleteTagged(tag) => self.memory.delete_tagged(tag).await,
            JournalOp::DeleteMatching(pattern) => self.memory.delete_matching(pattern).await,
        };
        result.unwrap_or(0)
    }

    /// Journals `op` unless the circuit closed meanwhile; returns whether it was journaled.
    fn journal(&self, op: &JournalOp) -> bool {
        let mut journal = self.lock_journal();
        if self.up.load(Ordering::Acquire) {
            return false;
        }
        if journal.len() >= JOURNAL_CAP {
            journal.clear();
            journal.push(JournalOp::DeleteMatching(self.overflow_pattern.clone()));
        } else {
            journal.push(op.clone());
        }
        true
    }

    /// Applies an invalidation to every tier: memory now, Redis now or after the outage.
    /// Returns how many entries were dropped.
    pub async fn invalidate(&self, op: JournalOp) -> Result<u64, StoreError> {
        let from_memory = self.apply_to_memory(&op).await;
        for _ in 0..3 {
            if self.up.load(Ordering::Acquire) {
                match self.apply_to_redis(&op).await {
                    Ok(n) => return Ok(n + from_memory),
                    Err(e) if e.is_unavailable() => self.mark_down(&e),
                    Err(e) => return Err(e),
                }
            }
            if self.journal(&op) {
                return Ok(from_memory);
            }
        }
        Err(StoreError::Unavailable(
            "redis kept flapping during an invalidation".into(),
        ))
    }
}

#[async_trait]
impl Store for FallbackStore {
    async fn get(&self, key: &str) -> Result<Option<CacheEntry>, StoreError> {
        if self.up.load(Ordering::Acquire) {
            match self.redis.get(key).await {
                Err(e) if e.is_unavailable() => self.mark_down(&e),
                other => return other,
            }
        }
        self.memory.get(key).await
    }

    async fn set(&self, key: &str, entry: &CacheEntry, ttl: Duration) -> Result<(), StoreError> {
        if self.up.load(Ordering::Acquire) {
            match self.redis.set(key, entry, ttl).await {
                Err(e) if e.is_unavailable() => self.mark_down(&e),
                other => return other,
            }
        }
        self.memory.set(key, entry, ttl).await
    }

    async fn delete(&self, keys: &[String]) -> Result<u64, StoreError> {
        self.invalidate(JournalOp::Delete(keys.to_vec())).await
    }

    async fn delete_tagged(&self, tag: &str) -> Result<u64, StoreError> {
        self.invalidate(JournalOp::DeleteTagged(tag.to_owned()))
            .await
    }

    async fn delete_matching(&self, pattern: &str) -> Result<u64, StoreError> {
        self.invalidate(JournalOp::DeleteMatching(pattern.to_owned()))
            .await
    }

    async fn count_matching(&self, pattern: &str) -> Result<u64, StoreError> {
        if self.up.load(Ordering::Acquire) {
            match self.redis.count_matching(pattern).await {
                Err(e) if e.is_unavailable() => self.mark_down(&e),
                other => return other,
            }
        }
        self.memory.count_matching(pattern).await
    }

    async fn health_check(&self) -> Result<(), StoreError> {
        // The memory tier always answers, so the store as a whole is healthy.
        Ok(())
    }
}

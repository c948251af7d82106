//! Redis first, memory when Redis is unreachable. A failed Redis command opens the circuit at
//! once (later requests go straight to memory, never waiting on a dead Redis); a background
//! probe closes it. Invalidations made while Redis is down are applied to memory and kept in a
//! journal (in memory and appended to a file, fsynced, so it survives a restart) that is
//! replayed to Redis before any read is served from Redis again.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::near::bus::{Bus, NearOp};
use super::near::{NearCache, NearCounts, NearSlot};
use super::{CacheEntry, Lookup, MemoryStore, RedisStore, Store, StoreError, Tier};
use crate::metrics::names;

/// An invalidation waiting to be applied to Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalOp {
    /// Bump these generation counters.
    Bump(Vec<String>),
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

/// Pending operations, mirrored in an append-only file of JSON lines.
#[derive(Debug, Default)]
struct Journal {
    ops: Vec<JournalOp>,
    path: Option<PathBuf>,
}

impl Journal {
    /// Loads the operations a previous process left; a corrupt line is skipped with a warning.
    fn load(path: Option<PathBuf>) -> Self {
        let mut ops = Vec::new();
        if let Some(p) = &path {
            match std::fs::read_to_string(p) {
                Ok(text) => {
                    for line in text.lines().filter(|l| !l.trim().is_empty()) {
                        match serde_json::from_str(line) {
                            Ok(op) => ops.push(op),
                            Err(e) => {
                                tracing::warn!(path = %p.display(), error = %e, "skipping a corrupt journal line")
                            }
                        }
                    }
                    if !ops.is_empty() {
                        tracing::warn!(count = ops.len(), path = %p.display(), "invalidations from a previous run will be replayed to redis before it serves");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(path = %p.display(), error = %e, "cannot read the journal")
                }
            }
        }
        Self { ops, path }
    }

    /// Appends `op`, durably when a file is configured. A write failure is logged: the
    /// operation stays journaled in memory.
    fn push(&mut self, op: JournalOp) {
        if let Some(p) = &self.path {
            let result = (|| -> std::io::Result<()> {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?;
                let mut line = serde_json::to_vec(&op).map_err(std::io::Error::other)?;
                line.push(b'\n');
                f.write_all(&line)?;
                f.sync_data()
            })();
            if let Err(e) = result {
                tracing::error!(path = %p.display(), error = %e, "cannot write the journal; the invalidation is kept in memory only");
            }
        }
        self.ops.push(op);
    }

    /// Replaces the file's content with the operations still pending.
    fn rewrite(&self) {
        let Some(p) = &self.path else { return };
        let result = (|| -> std::io::Result<()> {
            let tmp = p.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp)?;
            for op in &self.ops {
                let mut line = serde_json::to_vec(op).map_err(std::io::Error::other)?;
                line.push(b'\n');
                f.write_all(&line)?;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, p)
        })();
        if let Err(e) = result {
            tracing::error!(path = %p.display(), error = %e, "cannot rewrite the journal");
        }
    }
}

/// The two tiers behind one `Store`.
#[derive(Debug)]
pub struct FallbackStore {
    redis: RedisStore,
    memory: MemoryStore,
    up: AtomicBool,
    journal: Mutex<Journal>,
    overflow_pattern: String,
    fallbacks: AtomicU64,
    redis_calls: AtomicU64,
    redis_errors: AtomicU64,
    memory_calls: AtomicU64,
    prom: TierHandles,
    near: Option<Near>,
}

/// The near cache in front of Redis and the bus that keeps it coherent.
#[derive(Debug)]
pub struct Near {
    /// This instance's copies of hot entries.
    pub cache: Arc<NearCache>,
    /// Invalidation messages to and from the other instances.
    pub bus: Arc<Bus>,
}

/// Prometheus handles, registered once.
#[derive(Debug)]
struct TierHandles {
    redis_ops: metrics::Counter,
    redis_errors: metrics::Counter,
    memory_ops: metrics::Counter,
    circuit_open: metrics::Gauge,
}

/// Operations and errors per tier, for `/cache/stats`.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct TierCounts {
    /// Operations sent to Redis.
    pub redis_operations: u64,
    /// Redis operations that failed.
    pub redis_errors: u64,
    /// Operations served by the memory tier.
    pub memory_operations: u64,
    /// Times the circuit opened (Redis to memory).
    pub circuit_opened: u64,
}

impl FallbackStore {
    /// Starts in the memory tier until [`FallbackStore::probe`] finds Redis.
    /// `all_entries_pattern` is the Redis glob matching every entry of every version of this
    /// service (used when the journal overflows). `journal_path` is where invalidations made
    /// during an outage are kept; operations found there are replayed before Redis serves.
    /// `near`, when given, keeps hot Redis entries in process (see [`super::near`]).
    pub fn new(
        redis: RedisStore,
        memory: MemoryStore,
        all_entries_pattern: String,
        journal_path: Option<PathBuf>,
        near: Option<Near>,
    ) -> Self {
        // Until the first probe finds Redis, the circuit is open.
        metrics::gauge!(names::CIRCUIT_OPEN).set(1.0);
        Self {
            redis,
            memory,
            up: AtomicBool::new(false),
            journal: Mutex::new(Journal::load(journal_path)),
            overflow_pattern: all_entries_pattern,
            fallbacks: AtomicU64::new(0),
            redis_calls: AtomicU64::new(0),
            redis_errors: AtomicU64::new(0),
            memory_calls: AtomicU64::new(0),
            prom: TierHandles {
                redis_ops: metrics::counter!(names::STORE_OPERATIONS_TOTAL, "tier" => "redis"),
                redis_errors: metrics::counter!(names::STORE_ERRORS_TOTAL, "tier" => "redis"),
                memory_ops: metrics::counter!(names::STORE_OPERATIONS_TOTAL, "tier" => "memory"),
                circuit_open: metrics::gauge!(names::CIRCUIT_OPEN),
            },
            near,
        }
    }

    /// The near cache and its bus, when `l1.enabled`.
    pub fn near(&self) -> Option<&Near> {
        self.near.as_ref()
    }

    /// Near-cache figures for `/cache/stats`.
    pub fn near_counts(&self) -> NearCounts {
        self.near
            .as_ref()
            .map_or_else(NearCounts::disabled, |n| n.cache.counts())
    }

    /// The near cache, while reads go to Redis (the memory tier is in process already).
    fn near_cache(&self) -> Option<&NearCache> {
        self.near
            .as_ref()
            .filter(|_| self.up.load(Ordering::Acquire))
            .map(|n| n.cache.as_ref())
    }

    /// The near-cache copy of `key`, if there is one to serve.
    pub fn near_get(&self, key: &str) -> Option<Arc<NearSlot>> {
        self.near_cache()?.get(key)
    }

    /// The near cache's epoch, read before a Redis read whose result may be kept.
    pub fn near_epoch(&self) -> u64 {
        self.near.as_ref().map_or(0, |n| n.cache.epoch())
    }

    /// Keeps a fresh entry just read from Redis in the near cache (see [`NearCache::insert`]).
    pub fn near_keep(
        &self,
        key: &str,
        entry: &CacheEntry,
        deps: &[String],
        hits: Arc<AtomicU32>,
        fresh_for: Duration,
        epoch_before: u64,
    ) {
        if let Some(near) = self.near_cache() {
            near.insert(key, entry, deps, hits, fresh_for, epoch_before);
        }
    }

    /// Drops what `op` invalidates from this instance's near cache.
    fn near_apply(&self, op: &JournalOp) {
        if let Some(near) = &self.near {
            near.cache.apply(op);
        }
    }

    /// Empties every instance's near cache (a version switch, a replayed journal).
    pub async fn flush_near_everywhere(&self) {
        if let Some(near) = &self.near {
            near.cache.flush();
            near.bus
                .publish(&self.redis, &near.cache, NearOp::Flush)
                .await;
        }
    }

    fn near_forget(&self, key: &str) {
        if let Some(near) = &self.near {
            near.cache.forget(key);
        }
    }

    /// Operations and errors per tier.
    pub fn counts(&self) -> TierCounts {
        TierCounts {
            redis_operations: self.redis_calls.load(Ordering::Relaxed),
            redis_errors: self.redis_errors.load(Ordering::Relaxed),
            memory_operations: self.memory_calls.load(Ordering::Relaxed),
            circuit_opened: self.fallbacks.load(Ordering::Relaxed),
        }
    }

    fn memory_op(&self) {
        self.memory_calls.fetch_add(1, Ordering::Relaxed);
        self.prom.memory_ops.increment(1);
    }

    /// Store operations sent to Redis so far (the circuit breaker's tests watch this stay
    /// still while the circuit is open).
    pub fn redis_calls(&self) -> u64 {
        self.redis_calls.load(Ordering::Relaxed)
    }

    /// Runs `redis` while the circuit is closed; on an unavailable Redis opens the circuit and
    /// runs `memory` instead (as it does while the circuit is open). Only the future of the
    /// tier used is ever built.
    async fn tiered<T, R, M, RF, MF>(&self, redis: R, memory: M) -> Result<T, StoreError>
    where
        R: FnOnce() -> RF,
        M: FnOnce() -> MF,
        RF: Future<Output = Result<T, StoreError>>,
        MF: Future<Output = Result<T, StoreError>>,
    {
        if self.use_redis() {
            match redis().await {
                Err(e) if e.is_unavailable() => self.mark_down(&e),
                other => return other,
            }
        }
        memory().await
    }

    fn use_redis(&self) -> bool {
        let up = self.up.load(Ordering::Acquire);
        if up {
            self.redis_calls.fetch_add(1, Ordering::Relaxed);
            self.prom.redis_ops.increment(1);
        } else {
            self.memory_op();
        }
        up
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

    /// Applies the journaled invalidations to the memory tier (after a snapshot load: the
    /// snapshot may predate them).
    pub async fn replay_journal_into_memory(&self) {
        let ops = self.journal.lock().await.ops.clone();
        for op in &ops {
            self.apply_to_memory(op).await;
        }
    }

    /// Invalidations waiting for Redis.
    pub async fn pending_invalidations(&self) -> usize {
        self.journal.lock().await.ops.len()
    }

    /// Opens the circuit after `err`; logs only on the transition.
    pub fn mark_down(&self, err: &StoreError) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
        self.prom.redis_errors.increment(1);
        if self.up.swap(false, Ordering::AcqRel) {
            self.prom.circuit_open.set(1.0);
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
            let ops = std::mem::take(&mut self.journal.lock().await.ops);
            if ops.is_empty() {
                let journal = self.journal.lock().await;
                if !journal.ops.is_empty() {
                    continue;
                }
                // Closing the circuit under the journal lock: an invalidation either sees the
                // circuit closed and goes to Redis, or is journaled before this point.
                journal.rewrite();
                self.memory.clear();
                if let Some(near) = &self.near {
                    // Whatever it held predates the outage.
                    near.cache.flush();
                }
                self.up.store(true, Ordering::Release);
                self.prom.circuit_open.set(0.0);
                drop(journal);
                tracing::info!("redis reachable; serving from redis");
                return true;
            }
            let count = ops.len();
            for (i, op) in ops.iter().enumerate() {
                if let Err(e) = self.apply_to_redis(op).await {
                    let mut journal = self.journal.lock().await;
                    journal.ops.splice(0..0, ops[i..].iter().cloned());
                    tracing::warn!(error = %e, "replaying invalidations to redis failed; will retry");
                    return false;
                }
            }
            tracing::info!(count, "replayed invalidations made while redis was down");
            // Other instances kept serving through the outage and never heard of these.
            self.flush_near_everywhere().await;
        }
    }

    async fn apply_to_redis(&self, op: &JournalOp) -> Result<u64, StoreError> {
        match op {
            JournalOp::Bump(deps) => self.redis.bump(deps).await.map(|()| 0),
            JournalOp::Delete(keys) => self.redis.delete(keys).await,
            JournalOp::DeleteTagged(tag) => self.redis.delete_tagged(tag).await,
            JournalOp::DeleteMatching(pattern) => self.redis.delete_matching(pattern).await,
        }
    }

    async fn apply_to_memory(&self, op: &JournalOp) -> u64 {
        self.memory_op();
        let result = match op {
            JournalOp::Bump(deps) => self.memory.bump(deps).await.map(|()| 0),
            JournalOp::Delete(keys) => self.memory.delete(keys).await,
            JournalOp::DeleteTagged(tag) => self.memory.delete_tagged(tag).await,
            JournalOp::DeleteMatching(pattern) => self.memory.delete_matching(pattern).await,
        };
        result.unwrap_or(0)
    }

    /// Journals `op` unless the circuit closed meanwhile; returns whether it was journaled.
    async fn journal(&self, op: &JournalOp) -> bool {
        let mut journal = self.journal.lock().await;
        if self.up.load(Ordering::Acquire) {
            return false;
        }
        if journal.ops.len() >= JOURNAL_CAP {
            journal.ops = vec![JournalOp::DeleteMatching(self.overflow_pattern.clone())];
            journal.rewrite();
            tracing::warn!("journal overflow: every entry will be deleted when redis returns");
        } else {
            journal.push(op.clone());
        }
        true
    }

    /// Applies an invalidation to every tier: memory now, Redis now or after the outage.
    /// Returns how many entries were dropped.
    /// With a near cache, the operation is applied to it after Redis (so a read racing the
    /// Redis change cannot keep an old copy, see [`NearCache::insert`]) and then published,
    /// waiting for every instance to confirm.
    pub async fn invalidate(&self, op: JournalOp) -> Result<u64, StoreError> {
        let from_memory = self.apply_to_memory(&op).await;
        for _ in 0..3 {
            if self.use_redis() {
                match self.apply_to_redis(&op).await {
                    Ok(n) => {
                        self.near_apply(&op);
                        if let Some(near) = &self.near {
                            near.bus
                                .publish(&self.redis, &near.cache, NearOp::Op(op))
                                .await;
                        }
                        return Ok(n + from_memory);
                    }
                    Err(e) if e.is_unavailable() => self.mark_down(&e),
                    Err(e) => {
                        self.near_apply(&op);
                        return Err(e);
                    }
                }
            }
            if self.journal(&op).await {
                self.near_apply(&op);
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
    async fn get(&self, key: &str, deps: &[String]) -> Result<Lookup, StoreError> {
        self.tiered(|| self.redis.get(key, deps), || self.memory.get(key, deps))
            .await
    }

    async fn generations(&self, deps: &[String]) -> Result<Vec<u64>, StoreError> {
        self.tiered(
            || self.redis.generations(deps),
            || self.memory.generations(deps),
        )
        .await
    }

    async fn bump(&self, deps: &[String]) -> Result<(), StoreError> {
        self.invalidate(JournalOp::Bump(deps.to_vec()))
            .await
            .map(|_| ())
    }

    async fn touch(
        &self,
        key: &str,
        entry: &CacheEntry,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        self.near_forget(key);
        self.tiered(
            || self.redis.touch(key, entry, retention),
            || self.memory.touch(key, entry, retention),
        )
        .await
    }

    async fn set(&self, key: &str, entry: &CacheEntry, ttl: Duration) -> Result<(), StoreError> {
        self.near_forget(key);
        self.tiered(
            || self.redis.set(key, entry, ttl),
            || self.memory.set(key, entry, ttl),
        )
        .await
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
        self.tiered(
            || self.redis.count_matching(pattern),
            || self.memory.count_matching(pattern),
        )
        .await
    }

    async fn health_check(&self) -> Result<(), StoreError> {
        // The memory tier always answers, so the store as a whole is healthy.
        Ok(())
    }
}

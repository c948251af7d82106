//! The L1 near cache as a wrapper around the tiered store: [`NearStore`] is what the rest of
//! the service uses as its store. It keeps fresh entries read from Redis in process
//! ([`cache`]) and keeps every instance's copies coherent over Redis pub/sub ([`bus`]).
//!
//! A copy is served only while the tiered store serves from the same Redis incarnation the
//! copy was read from (its stamp names it), so a circuit transition or a restarted Redis
//! makes every copy unservable at once, without a sweep.

pub mod bus;
pub mod cache;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use cache::{NearCache, NearCounts, NearSlot, ReadMark};

use self::bus::{Bus, NearOp};
use super::counters::ReadCounters;
use super::memory::MemoryHit;
use super::tiered::{Applied, FallbackStore};
use super::{
    CacheEntry, Deps, FetchLock, Invalidation, Lock, Lookup, Shared, Source, Stamp, Store,
    StoreError, Tier,
};
use crate::domain::policy::now_ms;

/// The near cache and the bus that keeps it coherent.
#[derive(Debug)]
pub struct Near {
    /// This instance's copies of hot entries.
    pub cache: Arc<NearCache>,
    /// Invalidation messages to and from the other instances.
    pub bus: Arc<Bus>,
}

/// The store the service uses: the tiered store, with the near cache in front when
/// `l1.enabled`.
#[derive(Debug)]
pub struct NearStore {
    inner: Arc<FallbackStore>,
    near: Option<Near>,
    counters: ReadCounters,
}

impl NearStore {
    /// `inner` with `near` in front of it; `counters` are the per-key read counts a copy
    /// carries.
    pub fn new(inner: Arc<FallbackStore>, near: Option<Near>, counters: ReadCounters) -> Self {
        Self {
            inner,
            near,
            counters,
        }
    }

    /// The tiered store behind it.
    pub fn tiered(&self) -> &Arc<FallbackStore> {
        &self.inner
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

    /// Per-key read counts.
    pub fn counters(&self) -> &ReadCounters {
        &self.counters
    }

    /// Probes Redis (see [`FallbackStore::probe`]); after a replay, every instance's near
    /// cache is emptied, since the other instances never heard of what was replayed.
    pub async fn probe(&self) -> bool {
        let probe = self.inner.probe().await;
        if probe.replayed > 0 {
            self.flush_everywhere().await;
        }
        probe.serving_redis
    }

    /// Applies an invalidation another instance sent directly (it could not reach Redis, or
    /// this instance did not confirm it on the bus). Once Redis has it, it is published too,
    /// for the instances the sender does not know of (registered after it last read the
    /// list); the sender tells the ones it knows itself, so no one is sent it again from here.
    pub async fn apply_from_peer(&self, inv: &Invalidation) -> Result<u64, StoreError> {
        let result = self.inner.apply_from_peer(inv).await;
        if let Some(near) = &self.near {
            near.cache.apply(inv);
            if let Ok((_, Applied::Redis)) = result {
                near.bus
                    .publish(&self.inner, &near.cache, NearOp::Op(inv.clone()))
                    .await;
            }
        }
        result.map(|(n, _)| n)
    }

    /// Drops this instance's copies of what `inv` names and, if Redis took it, every other
    /// instance's: it is published, and every known instance that did not confirm it (not
    /// subscribed, as one serving from memory is; too slow; or all, when publishing failed)
    /// is sent it directly before the invalidation is acknowledged.
    async fn after(&self, inv: &Invalidation, result: &Result<(u64, Applied), StoreError>) {
        let Some(near) = &self.near else {
            return;
        };
        near.cache.apply(inv);
        if let Ok((_, Applied::Redis)) = result {
            let confirmed = near
                .bus
                .publish(&self.inner, &near.cache, NearOp::Op(inv.clone()))
                .await;
            // `all` counts the subscribers PUBLISH reached: an instance without a
            // subscription is not among them, so what decides is who confirmed.
            self.inner.peers().tell_all_but(inv, &confirmed.by).await;
        }
    }

    async fn flush_everywhere(&self) {
        if let Some(near) = &self.near {
            near.cache.flush();
            near.bus
                .publish(&self.inner, &near.cache, NearOp::Flush)
                .await;
        }
    }
}

#[async_trait]
impl Store for NearStore {
    fn source(&self) -> Source {
        self.inner.source()
    }

    fn peek(&self, key: &str) -> Option<Arc<NearSlot>> {
        let slot = self.near.as_ref()?.cache.get(key)?;
        let current = slot.entry.stamp.source() == self.inner.source()
            && slot.serving == self.inner.serving_epoch();
        current.then_some(slot)
    }

    fn copy_served(&self, lane: bool) {
        if let Some(near) = &self.near {
            near.cache.served(lane);
        }
    }

    fn memory_servable(&self, key: &str, deps: &dyn Fn() -> Deps) -> Option<Option<MemoryHit>> {
        // Never kept in the near cache (`get` keeps Redis reads only): nothing to insert.
        self.inner.memory_servable(key, deps)
    }

    fn forget_validated(&self, key: &str) {
        if let Some(slot) = self.peek(key) {
            slot.validated.store(None);
        }
        self.inner.forget_validated(key);
    }

    fn reads_memory(&self) -> bool {
        self.inner.reads_memory()
    }

    async fn get(&self, key: &str, deps: &Deps) -> Result<Lookup, StoreError> {
        let mark = ReadMark {
            epoch: self.near.as_ref().map_or(0, |n| n.cache.epoch()),
            serving: self.inner.serving_epoch(),
        };
        let lookup = self.inner.get(key, deps).await?;
        if let Some(near) = &self.near
            && lookup.current.source().tier == Tier::Redis
            && let Some(entry) = lookup
                .entry
                .as_ref()
                .filter(|e| e.stamp.serves(&lookup.current))
        {
            let fresh_for = Duration::from_millis(entry.fresh_until_ms().saturating_sub(now_ms()));
            let hits = self.counters.of(key);
            near.cache.insert(key, entry, deps, hits, fresh_for, mark);
        }
        Ok(lookup)
    }

    async fn stamp(&self, deps: &Deps) -> Result<Stamp, StoreError> {
        self.inner.stamp(deps).await
    }

    async fn put(
        &self,
        key: &str,
        entry: &CacheEntry,
        deps: &Deps,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        if let Some(near) = &self.near {
            near.cache.forget(key);
        }
        self.inner.put(key, entry, deps, retention).await
    }

    async fn touch(
        &self,
        key: &str,
        entry: &CacheEntry,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        if let Some(near) = &self.near {
            near.cache.forget(key);
        }
        self.inner.touch(key, entry, retention).await
    }

    /// Applies `inv` to the tiers, then to this instance's copies (after Redis, so a read
    /// racing the change cannot keep an old copy), then publishes it and waits (bounded) until
    /// every instance it reached has dropped its copies.
    async fn invalidate(&self, inv: &Invalidation) -> Result<u64, StoreError> {
        let result = self.inner.invalidate(inv).await;
        self.after(inv, &result).await;
        result.map(|(n, _)| n)
    }
}

#[async_trait]
impl FetchLock for NearStore {
    async fn try_lock(&self, key: &str, token: &str, ttl: Duration) -> Result<Lock, StoreError> {
        self.inner.try_lock(key, token, ttl).await
    }

    async fn unlock(&self, key: &str, token: &str) -> Result<(), StoreError> {
        self.inner.unlock(key, token).await
    }
}

#[async_trait]
impl Shared for NearStore {
    async fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.meta_get(key).await
    }

    async fn meta_set(
        &self,
        key: &str,
        value: &str,
        only_if_absent: bool,
    ) -> Result<bool, StoreError> {
        self.inner.meta_set(key, value, only_if_absent).await
    }

    async fn lookup_get(&self, key: &str, field: &str) -> Result<Option<String>, StoreError> {
        self.inner.lookup_get(key, field).await
    }

    async fn lookup_put(
        &self,
        key: &str,
        field: &str,
        value: &str,
        max: usize,
    ) -> Result<(), StoreError> {
        self.inner.lookup_put(key, field, value, max).await
    }

    async fn purge(&self, pattern: &str) -> Result<u64, StoreError> {
        self.inner.purge(pattern).await
    }

    async fn count_matching(&self, pattern: &str) -> Result<u64, StoreError> {
        self.inner.count_matching(pattern).await
    }

    async fn flush_copies(&self) {
        self.inner.memory().clear();
        self.flush_everywhere().await;
    }
}

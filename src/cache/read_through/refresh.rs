//! Refresh-ahead with change detection. An entry read at least `refresh.min_hits` times
//! (per instance, recently) that enters the last `refresh.ahead_percent` of its TTL is fetched
//! again in the background, with bounded concurrency and jitter, before it expires. The
//! fresh body is compared with the cached one by content hash, ignoring volatile JSON fields:
//! unchanged, the entry's life is extended without rewriting it; changed, the run's dependent
//! entries are invalidated and the new body stored; gone (404), the run's entries are removed.
//! Failures back off exponentially per key and never evict a servable entry.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use http::StatusCode;
use serde_json::Value;
use tokio::sync::Semaphore;

use super::{CacheOutcome, Ctx, ReadThrough, ViewRequest, ViewResponse};
use crate::cache::policy::{self, Storability};
use crate::cache::{CacheEntry, Store, Tier, View};
use crate::invalidation::Cause;
use crate::metrics::RefreshResult;
use crate::origin::OriginError;

/// Refresh-ahead settings.
#[derive(Debug, Clone)]
pub struct RefreshOptions {
    /// Reads that make an entry hot; 0 disables refresh-ahead.
    pub min_hits: u32,
    /// Refresh within this last share of the TTL, in percent.
    pub ahead_percent: u8,
    /// Refreshes running at once.
    pub concurrency: usize,
    /// Up to this random delay before a refresh, so instances and keys do not align.
    pub jitter: Duration,
    /// Longest back-off after failed refreshes of one key.
    pub max_backoff: Duration,
    /// JSON fields (at any depth) ignored when comparing bodies, e.g. `generated_at`.
    pub volatile_fields: Vec<String>,
}

/// Refresh-ahead bookkeeping of one instance.
pub(super) struct Refresher {
    opts: RefreshOptions,
    /// Reads per key: a sync cache, because the hit path counts every read and should not
    /// pay for an async lookup.
    hits: moka::sync::Cache<String, Arc<AtomicU32>>,
    scheduled: Mutex<HashSet<String>>,
    backoff: Mutex<HashMap<String, (u32, Instant)>>,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresher")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl Refresher {
    pub(super) fn new(opts: RefreshOptions) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(opts.concurrency.max(1))),
            // "Recently": a key unread for 10 minutes starts counting from zero again.
            hits: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
            scheduled: Mutex::default(),
            backoff: Mutex::default(),
            opts,
        }
    }

    fn in_backoff(&self, key: &str) -> bool {
        let backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        backoff
            .get(key)
            .is_some_and(|(_, until)| Instant::now() < *until)
    }

    fn failed(&self, key: &str) {
        let mut backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        let failures = backoff.get(key).map_or(0, |(n, _)| *n) + 1;
        let delay = Duration::from_secs(1 << failures.min(20)).min(self.opts.max_backoff);
        backoff.insert(key.to_owned(), (failures, Instant::now() + delay));
    }

    fn succeeded(&self, key: &str) {
        self.backoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    fn jitter(&self, key: &str) -> Duration {
        let max = u64::try_from(self.opts.jitter.as_millis()).unwrap_or(0);
        if max == 0 {
            return Duration::ZERO;
        }
        let seed = policy::now_ms() ^ xxhash_rust::xxh3::xxh3_64(key.as_bytes());
        Duration::from_millis(xxhash_rust::xxh3::xxh3_64(&seed.to_le_bytes()) % max)
    }
}

/// Hash of a body for change detection: JSON with the volatile fields removed at any depth
/// (object keys are sorted, so key order does not matter), or the raw bytes otherwise.
pub fn content_hash(body: &[u8], volatile: &[String]) -> u128 {
    fn strip(v: &mut Value, volatile: &[String]) {
        match v {
            Value::Object(map) => {
                map.retain(|k, _| !volatile.iter().any(|f| f == k));
                map.values_mut().for_each(|x| strip(x, volatile));
            }
            Value::Array(items) => items.iter_mut().for_each(|x| strip(x, volatile)),
            _ => {}
        }
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(mut v) => {
            strip(&mut v, volatile);
            xxhash_rust::xxh3::xxh3_128(&serde_json::to_vec(&v).unwrap_or_default())
        }
        Err(_) => xxhash_rust::xxh3::xxh3_128(body),
    }
}

impl ReadThrough {
    /// The read counter of `key` (a near-cache copy keeps it, so its hits count without a
    /// lookup).
    pub(super) fn hit_counter(&self, key: &str) -> Arc<AtomicU32> {
        self.refresher.hits.get_with_by_ref(key, Arc::default)
    }

    /// Counts a fresh hit (on `counter` when the caller has it) and schedules a refresh when
    /// the entry is hot and near expiry. `req` is built only when a refresh is scheduled.
    pub(super) fn note_hit(
        &self,
        key: &str,
        entry: &CacheEntry,
        ttl_left: u64,
        counter: Option<&AtomicU32>,
        req: impl FnOnce() -> ViewRequest,
    ) {
        let r = &self.refresher;
        if r.opts.min_hits == 0 {
            return;
        }
        let hits = match counter {
            Some(c) => c.fetch_add(1, Ordering::Relaxed) + 1,
            None => self.hit_counter(key).fetch_add(1, Ordering::Relaxed) + 1,
        };
        let near_expiry = ttl_left * 100 <= entry.ttl_secs * u64::from(r.opts.ahead_percent);
        if hits < r.opts.min_hits || !near_expiry || r.in_backoff(key) {
            return;
        }
        if !r
            .scheduled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned())
        {
            return;
        }
        let this = self.clone();
        let req = req();
        let ctx = self.context(&req);
        let entry = entry.clone();
        tokio::spawn(async move {
            let Ok(_permit) = this.refresher.permits.clone().acquire_owned().await else {
                return;
            };
            tokio::time::sleep(this.refresher.jitter(&ctx.key)).await;
            let key = ctx.key.clone();
            let _ = this.refresh_now(req, ctx, entry).await;
            this.refresher
                .scheduled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        });
    }

    /// Refreshes `entry` through the single flight of its key (a running fetch is joined).
    pub(super) fn refresh_now(
        &self,
        req: ViewRequest,
        ctx: Ctx,
        entry: CacheEntry,
    ) -> impl Future<Output = Result<ViewResponse, OriginError>> + use<> {
        let key = ctx.flight.clone();
        let this = self.clone();
        let (flight, _) = self.flights.join_or_start(&key, move || {
            async move { this.refresh(req, ctx, entry).await }.boxed()
        });
        flight
    }

    async fn refresh(
        &self,
        req: ViewRequest,
        ctx: Ctx,
        old: CacheEntry,
    ) -> Result<ViewResponse, OriginError> {
        let view = req.view;
        let unchanged_answer = |this: &Self, e: CacheEntry| {
            let now = policy::now_ms();
            let ttl = policy::remaining_ttl_secs(e.stored_at_ms, e.ttl_secs, now).unwrap_or(0);
            let age = policy::age_secs(e.stored_at_ms, now);
            this.entry_response(
                &e,
                CacheOutcome::Hit {
                    ttl,
                    age,
                    collapsed: true,
                },
            )
        };
        let Ok(gens_before) = self.store.generations(&ctx.deps).await else {
            self.refresher.failed(&ctx.key);
            self.stats.record_refresh(view, RefreshResult::Error);
            return Ok(unchanged_answer(self, old));
        };
        // Another instance refreshing the same entry: leave it to that one.
        let token = uuid::Uuid::new_v4().to_string();
        let lock = self.keys.fetch_lock(&ctx.version, &req.logical_key);
        let locked = self.store.tier() == Tier::Redis
            && match self
                .store
                .redis()
                .try_lock(&lock, &token, self.coalesce.lock_ttl)
                .await
            {
                Ok(true) => true,
                Ok(false) => return Ok(unchanged_answer(self, old)),
                Err(_) => false,
            };
        let result = self
            .refresh_locked(&req, &ctx, old.clone(), gens_before)
            .await;
        if locked {
            let _ = self.store.redis().unlock(&lock, &token).await;
        }
        let outcome = match &result {
            Ok(r) => r,
            Err(_) => &RefreshResult::Error,
        };
        self.stats.record_refresh(view, *outcome);
        if *outcome == RefreshResult::Error {
            self.refresher.failed(&ctx.key);
            tracing::warn!(key = %req.logical_key, "refresh failed; the cached entry stays servable");
        } else {
            self.refresher.succeeded(&ctx.key);
        }
        result.map(|_| unchanged_answer(self, old))
    }

    async fn refresh_locked(
        &self,
        req: &ViewRequest,
        ctx: &Ctx,
        old: CacheEntry,
        gens_before: Vec<u64>,
    ) -> Result<RefreshResult, OriginError> {
        let resp = self.fetch(req.view, req.origin.clone()).await?;
        if matches!(
            resp.status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ) {
            // These credentials lost their access: the entry stays for others.
            return Ok(RefreshResult::Error);
        }
        self.access.accepted(&ctx.key, ctx.cred);
        let run_scoped = req.view != View::Comparison;
        let run_id = req.run_ids.first().cloned().unwrap_or_default();
        if resp.status == StatusCode::NOT_FOUND && run_scoped {
            // The run is gone: drop everything about it, as a model-deleted event would.
            self.invalidator
                .run(&run_id, Cause::Refresh)
                .await
                .map_err(|e| OriginError::Unreachable(e.to_string()))?;
            return Ok(RefreshResult::Gone);
        }
        if resp.status != StatusCode::OK {
            return Ok(RefreshResult::Error);
        }
        let ttl = match policy::storability(resp.cache_control.as_deref(), ctx.policy.ttl) {
            Storability::Store(ttl) => ttl,
            Storability::DoNotStore(_) => return Ok(RefreshResult::Error),
        };
        let stale_window = Duration::from_millis(old.stale_ms);
        let volatile = &self.refresher.opts.volatile_fields;
        if content_hash(&resp.body, volatile) == content_hash(&old.body, volatile) {
            let mut touched = old;
            touched.stored_at_ms = policy::now_ms();
            touched.ttl_secs = ttl.as_secs();
            let _ = self
                .store
                .touch(&ctx.key, &touched, ttl + stale_window)
                .await;
            return Ok(RefreshResult::Unchanged);
        }
        let mut expected = gens_before;
        if run_scoped {
            // The run changed without an event: its comparisons (and other views) are stale.
            self.invalidator
                .run(&run_id, Cause::Refresh)
                .await
                .map_err(|e| OriginError::Unreachable(e.to_string()))?;
            if let Some(g) = expected.get_mut(1) {
                *g += 1;
            }
        }
        // Store only if no other invalidation landed while fetching.
        let gens_now = self.store.generations(&ctx.deps).await.unwrap_or_default();
        if gens_now == expected {
            let (entry, retention) = self.new_entry(&req.run_ids, ctx, resp, ttl, gens_now);
            if self.store.set(&ctx.key, &entry, retention).await.is_ok() {
                self.stats.record_set();
            }
        }
        Ok(RefreshResult::Changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volatile_fields_are_ignored_at_any_depth() {
        let volatile = vec!["generated_at".to_owned(), "timestamp".to_owned()];
        let a =
            br#"{"a": 1, "generated_at": "x", "n": {"timestamp": 1, "b": [ {"timestamp": 2} ]}}"#;
        let b = br#"{"n": {"b": [{"timestamp": 9}], "timestamp": 5}, "generated_at": "y", "a": 1}"#;
        let c =
            br#"{"a": 2, "generated_at": "x", "n": {"timestamp": 1, "b": [ {"timestamp": 2} ]}}"#;
        assert_eq!(content_hash(a, &volatile), content_hash(b, &volatile));
        assert_ne!(content_hash(a, &volatile), content_hash(c, &volatile));
        assert_ne!(content_hash(a, &[]), content_hash(b, &[]));
        assert_eq!(
            content_hash(b"plain", &volatile),
            content_hash(b"plain", &volatile)
        );
    }
}

//! Refresh-ahead with change detection. An entry read at least `refresh.min_hits` times
//! (per instance, recently) that enters the last `refresh.ahead_percent` of its TTL is fetched
//! again in the background before it expires; so is an entry served stale within its grace
//! period. At most one refresh per key runs in this process, with bounded concurrency and
//! jitter, and its result is never handed to a request (a refresh is not a flight requests
//! can join).
//!
//! The fresh body is compared with the cached one by content hash, ignoring volatile JSON
//! fields:
//! - unchanged: the entry's life is extended without rewriting it;
//! - changed: the run is invalidated (its comparisons and other views, as an event would) and
//!   the new body stored, unless another invalidation happened while it was fetched;
//! - gone (404, with public views): the run's entries are removed; with access control, a 404
//!   only says the origin hides the run from the credential that refreshed, whose acceptance
//!   is withdrawn, as after any refusal;
//! - failed: the entry stays servable and the key backs off exponentially.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value;
use tokio::sync::Semaphore;

use super::{Ctx, ReadThrough, ViewRequest};
use crate::domain::FrontendAuth;
use crate::domain::policy;
use crate::invalidation::Cause;
use crate::metrics::RefreshResult;
use crate::store::counters::ReadCounters;
use crate::store::{CacheEntry, Lock};

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
    counters: ReadCounters,
    /// Keys with a refresh scheduled or running: at most one each.
    scheduled: Mutex<HashSet<String>>,
    /// Failures per key and until when it backs off; entries expire after the longest
    /// back-off, so the map stays bounded whatever happens to the keys.
    backoff: moka::sync::Cache<String, (u32, Instant)>,
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
    pub(super) fn new(opts: RefreshOptions, counters: ReadCounters) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(opts.concurrency.max(1))),
            counters,
            scheduled: Mutex::default(),
            backoff: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(opts.max_backoff.max(Duration::from_secs(1)))
                .build(),
            opts,
        }
    }

    fn in_backoff(&self, key: &str) -> bool {
        self.backoff
            .get(key)
            .is_some_and(|(_, until)| Instant::now() < until)
    }

    fn failed(&self, key: &str) {
        let failures = self.backoff.get(key).map_or(0, |(n, _)| n) + 1;
        let delay = Duration::from_secs(1 << failures.min(20)).min(self.opts.max_backoff);
        self.backoff
            .insert(key.to_owned(), (failures, Instant::now() + delay));
    }

    fn succeeded(&self, key: &str) {
        self.backoff.invalidate(key);
    }

    /// Keys in back-off now.
    pub(super) fn backoff_keys(&self) -> u64 {
        self.backoff.run_pending_tasks();
        self.backoff.entry_count()
    }

    fn jitter(&self, key: &str) -> Duration {
        let max = u64::try_from(self.opts.jitter.as_millis()).unwrap_or(0);
        if max == 0 {
            return Duration::ZERO;
        }
        let seed = policy::now_ms() ^ xxhash_rust::xxh3::xxh3_64(key.as_bytes());
        Duration::from_millis(xxhash_rust::xxh3::xxh3_64(&seed.to_le_bytes()) % max)
    }

    fn schedule(&self, key: &str) -> bool {
        self.scheduled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned())
    }

    fn done(&self, key: &str) {
        self.scheduled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
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
            None => r.counters.of(key).fetch_add(1, Ordering::Relaxed) + 1,
        };
        let near_expiry = ttl_left * 100 <= entry.ttl_secs * u64::from(r.opts.ahead_percent);
        if hits < r.opts.min_hits || !near_expiry || r.in_backoff(key) {
            return;
        }
        let req = req();
        let ctx = self.context(&req);
        self.spawn_refresh(req, ctx, entry.clone(), true);
    }

    /// Stale-while-revalidate: one background refresh of an entry served stale.
    pub(super) fn revalidate(&self, req: ViewRequest, ctx: Ctx, entry: CacheEntry) {
        self.spawn_refresh(req, ctx, entry, false);
    }

    fn spawn_refresh(&self, req: ViewRequest, ctx: Ctx, entry: CacheEntry, jitter: bool) {
        if !self.refresher.schedule(&ctx.key) {
            return;
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            let key = ctx.key.clone();
            if let Ok(_permit) = this.refresher.permits.clone().acquire_owned().await {
                if jitter {
                    tokio::time::sleep(this.refresher.jitter(&key)).await;
                }
                this.refresh(req, ctx, entry).await;
            }
            this.refresher.done(&key);
        });
    }

    async fn refresh(&self, req: ViewRequest, ctx: Ctx, old: CacheEntry) {
        let view = req.view;
        // Another instance refreshing the same entry: leave it to that one.
        let token = uuid::Uuid::new_v4().to_string();
        let lock = self.keys.fetch_lock(&ctx.version, &req.logical_key);
        // A `SET NX` that failed (timed out) may still have run: release it afterwards too.
        let locked = match self
            .locks
            .try_lock(&lock, &token, self.coalesce.lock_ttl)
            .await
        {
            Ok(Lock::Taken) | Err(_) => true,
            Ok(Lock::Unshared) => false,
            Ok(Lock::Held) => return,
        };
        let result = self.refresh_locked(&req, &ctx, old).await;
        if locked {
            self.release(lock, token).await;
        }
        self.stats.record_refresh(view, result);
        match result {
            RefreshResult::Error => {
                self.refresher.failed(&ctx.key);
                tracing::warn!(key = %req.logical_key, "refresh failed; the cached entry stays servable");
            }
            _ => self.refresher.succeeded(&ctx.key),
        }
    }

    async fn refresh_locked(&self, req: &ViewRequest, ctx: &Ctx, old: CacheEntry) -> RefreshResult {
        // Read before the origin is asked: what the new body may be stored under.
        let Ok(stamp) = self.store.stamp(&ctx.deps).await else {
            return RefreshResult::Error;
        };
        let Ok(resp) = self.fetch(req.view, req.origin.clone()).await else {
            return RefreshResult::Error;
        };
        // A view of one entity (a run's metrics, a dataset's statistics) names one tag; a
        // comparison names several, and no single one of them is what changed.
        let own_tag = match req.tags.as_slice() {
            [tag] => Some(tag.clone()),
            _ => None,
        };
        if resp.status == StatusCode::NOT_FOUND
            && let Some(tag) = &own_tag
            && self.access.mode() == FrontendAuth::None
        {
            // Public views: the entity is gone. Drop everything about it, as an event would.
            return match self
                .invalidator
                .tags(std::slice::from_ref(tag), Cause::Refresh)
                .await
            {
                Ok(_) => RefreshResult::Gone,
                Err(_) => RefreshResult::Error,
            };
        }
        // An answer that now varies otherwise than the entry does (a plain entry whose origin
        // began to vary, a variant whose marker names other headers, `Vary: *`) is not
        // stored by a refresh: the next miss stores it as it should be.
        let spec = super::vary::spec(resp.vary.as_deref(), &self.origin);
        let vary_matches = match (&spec, &req.variant) {
            (super::vary::Spec::None, _) => true,
            (super::vary::Spec::Fields(f), Some(of)) => {
                of.marker.vary.as_ref().is_some_and(|m| &m.headers == f)
            }
            _ => false,
        };
        if !vary_matches {
            return RefreshResult::Error;
        }
        let ttl = match self.storable(&resp, ctx.policy) {
            Ok(ttl) if resp.status == StatusCode::OK => ttl,
            _ => {
                // Not an answer the entry holds: these credentials are no longer accepted
                // for it, and nothing changes for anyone else.
                self.revoke(ctx);
                let refused = matches!(
                    resp.status,
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
                );
                return if refused {
                    RefreshResult::Refused
                } else {
                    RefreshResult::Error
                };
            }
        };
        self.access.accept(&ctx.key, ctx.cred, resp.status.as_u16());
        let volatile = &self.refresher.opts.volatile_fields;
        if content_hash(&resp.body, volatile) == content_hash(&old.body, volatile) {
            // Only its freshness and life are extended (on Redis, in place: the value's
            // extension field and a PEXPIRE): headers and stale windows stay those stored.
            let mut touched = old;
            touched.stored_at_ms = policy::now_ms();
            touched.ttl_secs = ttl.as_secs();
            let retention = ttl.saturating_add(Duration::from_millis(touched.stale_ms));
            let _ = self.store.touch(&ctx.key, &touched, retention).await;
            return RefreshResult::Unchanged;
        }
        // Changed without an event. The entity's other views and comparisons are stale too:
        // its tag is invalidated as an event would, and the new body stored only if no other
        // invalidation happened since the stamp was read (ours is the one bump allowed: its
        // tag's generation and the learned-tags sequence).
        let Ok(tags) = self.entry_tags(req, ctx, &resp.body) else {
            return RefreshResult::Error;
        };
        let mut stamp = stamp;
        if let Some(tag) = &own_tag {
            if self
                .invalidator
                .tags(std::slice::from_ref(tag), Cause::Refresh)
                .await
                .is_err()
            {
                return RefreshResult::Error;
            }
            stamp = stamp.after_own_bumps(
                &ctx.deps,
                &[
                    self.keys.tag_gen(&ctx.version, tag),
                    self.keys.learned(&ctx.version),
                ],
            );
        }
        let learned = self.learned_stamp(ctx, &tags, &stamp).await;
        let (entry, retention) = self.new_entry(tags, ctx, resp, ttl, stamp);
        let mut entry = super::vary::with_vary_header(entry, &spec);
        let put = match learned {
            super::fetch::Learned::No => {
                self.store.put(&ctx.key, &entry, &ctx.deps, retention).await
            }
            super::fetch::Learned::Yes(deps, stamp) => {
                entry.stamp = stamp;
                self.store.put(&ctx.key, &entry, &deps, retention).await
            }
            super::fetch::Learned::Unknown => Ok(false),
        };
        if let Ok(true) = put {
            self.stats.record_set();
        }
        RefreshResult::Changed
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
        assert_ne!(content_hash(a, &[]), content_hash(b, &[]));
        assert_ne!(content_hash(a, &volatile), content_hash(c, &volatile));
        assert_eq!(
            content_hash(b"plain", &volatile),
            content_hash(b"plain", &volatile)
        );
    }
}

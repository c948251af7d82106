//! The near cache's copies: hot, fresh entries read from Redis, kept in process so that a hit
//! costs no Redis round trip. Only a copy: Redis stays the shared truth, and a copy must never
//! be served after an invalidation on any instance has dropped it.
//!
//! How it stays coherent (see [`super::bus`] for the wire side):
//! - every invalidation is applied here and published on a Redis channel; every instance
//!   drops the affected entries and confirms, and the invalidating request waits (bounded)
//!   for every confirmation before it answers;
//! - it serves only while its subscription is live: a lost subscription empties it, and it
//!   stays off until resubscribed (messages may have been missed meanwhile);
//! - it holds only fresh entries, each for at most `l1.max_lifetime_ms`, which bounds the
//!   staleness should a message ever be lost on a connection that still looks healthy;
//! - a read from Redis that raced an invalidation is not kept: an epoch counter, bumped by
//!   every invalidation before it drops entries, is read before the Redis read and checked
//!   after the insert.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use serde::Serialize;
use wildmatch::WildMatch;

use crate::store::{CacheEntry, Deps, Invalidation};

/// One near-cache entry: the entry as read from Redis (its store time already derived from
/// the key's remaining life, its stamp naming the Redis incarnation it was read from) and the
/// counters it depends on.
#[derive(Debug)]
pub struct NearSlot {
    /// The entry.
    pub entry: CacheEntry,
    /// Its read counter for refresh-ahead, shared with the refresher's.
    pub hits: Arc<AtomicU32>,
    /// The last credential found accepted for it (`auth.frontend = forward`) and until when,
    /// so repeated hits by one caller skip the lookup.
    pub validated: crate::store::Validated,
    /// Physical keys of the counters it depends on (view, runs, clear sequence).
    deps: Vec<String>,
    /// The tiered store's serving epoch when it was read (see `NearStore::peek`).
    pub(super) serving: u64,
    /// When it stops being served.
    expires_at: Instant,
    /// Bytes it holds (approximate), for the `l1.max_bytes` bound.
    weight: u64,
}

/// What a copy read from Redis is checked against before it is kept: the near cache's epoch
/// and the tiered store's serving epoch, both read before the Redis read.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadMark {
    /// [`NearCache::epoch`].
    pub epoch: u64,
    /// The tiered store's serving epoch.
    pub serving: u64,
}

/// Near-cache figures for `/cache/stats`.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct NearCounts {
    /// `l1.enabled`.
    pub enabled: bool,
    /// Whether the invalidation subscription is live (the near cache serves only then).
    pub subscribed: bool,
    /// Entries held.
    pub entries: u64,
    /// Bytes held (approximate).
    pub bytes: u64,
    /// `l1.max_bytes`.
    pub max_bytes: u64,
    /// Hits served from the near cache.
    pub hits: u64,
    /// Of those, hits answered by the hit lane, before routing and middleware.
    pub lane_hits: u64,
    /// Invalidation messages applied (from this and other instances).
    pub invalidations: u64,
    /// Times the near cache was emptied (lost subscription, return from the memory tier,
    /// version switch).
    pub flushes: u64,
    /// Invalidations that did not get every instance's confirmation within
    /// `l1.ack_timeout_ms`.
    pub ack_timeouts: u64,
}

/// The near cache of one instance.
/// A sharded map rather than moka: with every copy living at most `l1.max_lifetime_ms`,
/// moka's per-read policy bookkeeping bought nothing and cost a measured 6 % of a hit
/// (README, Performance). Expiry is checked on read; expired copies are swept by the
/// housekeeping task, and before an insert that would pass the byte bound. When the bound is
/// reached even so, new copies are not kept until old ones expire.
pub struct NearCache {
    cache: DashMap<String, Arc<NearSlot>>,
    bytes: AtomicU64,
    max_bytes: u64,
    max_lifetime: Duration,
    epoch: AtomicU64,
    inserts: AtomicU64,
    live: AtomicBool,
    /// Whether copies are kept (see [`NearCache::hold_copies`]).
    keeping: AtomicBool,
    hits: AtomicU64,
    lane_hits: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
    ack_timeouts: AtomicU64,
}

impl std::fmt::Debug for NearCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCache")
            .field("max_bytes", &self.max_bytes)
            .field("max_lifetime", &self.max_lifetime)
            .field("live", &self.is_live())
            .finish_non_exhaustive()
    }
}

impl NearCache {
    /// A near cache of at most `max_bytes`, keeping each entry at most `max_lifetime`. It
    /// serves nothing until [`NearCache::set_live`] says the subscription is up.
    pub fn new(max_bytes: u64, max_lifetime: Duration) -> Self {
        Self {
            cache: DashMap::new(),
            bytes: AtomicU64::new(0),
            max_bytes,
            max_lifetime,
            epoch: AtomicU64::new(0),
            inserts: AtomicU64::new(0),
            live: AtomicBool::new(false),
            keeping: AtomicBool::new(true),
            hits: AtomicU64::new(0),
            lane_hits: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            ack_timeouts: AtomicU64::new(0),
        }
    }

    /// Whether the invalidation subscription is live.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    /// The entry held for `key`, while the subscription is live.
    pub fn get(&self, key: &str) -> Option<Arc<NearSlot>> {
        if !self.is_live() {
            return None;
        }
        let slot = self.cache.get(key)?.value().clone();
        if Instant::now() >= slot.expires_at {
            return None;
        }
        Some(slot)
    }

    /// The epoch to read before a Redis read whose result may be kept (see [`Self::insert`]).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Keeps `entry` (read from Redis and servable under `deps`, fresh for `fresh_for` more,
    /// its reads counted on `hits`) unless an invalidation happened since `mark` was
    /// read.
    pub fn insert(
        &self,
        key: &str,
        entry: &CacheEntry,
        deps: &Deps,
        hits: Arc<AtomicU32>,
        fresh_for: Duration,
        mark: ReadMark,
    ) {
        let epoch_before = mark.epoch;
        let life = fresh_for.min(self.jittered_lifetime(key));
        if life.is_zero()
            || !self.is_live()
            || !self.keeping.load(Ordering::SeqCst)
            || self.epoch() != epoch_before
        {
            return;
        }
        let Some(expires_at) = Instant::now().checked_add(life) else {
            return;
        };
        let weight = (key.len() + entry.weight()) as u64;
        if self.bytes.load(Ordering::Relaxed) + weight > self.max_bytes {
            self.sweep();
            if self.bytes.load(Ordering::Relaxed) + weight > self.max_bytes {
                return;
            }
        }
        let slot = NearSlot {
            entry: entry.clone(),
            hits,
            validated: ArcSwapOption::empty(),
            deps: deps
                .counters()
                .iter()
                .cloned()
                .chain(std::iter::once(deps.clears_key().to_owned()))
                .collect(),
            serving: mark.serving,
            expires_at,
            weight,
        };
        self.bytes.fetch_add(weight, Ordering::Relaxed);
        if let Some(old) = self.cache.insert(key.to_owned(), Arc::new(slot)) {
            self.bytes.fetch_sub(old.weight, Ordering::Relaxed);
        }
        // An invalidation that bumped the epoch after the check above may have looked for
        // entries before this insert: take it back.
        if self.epoch() != epoch_before {
            self.remove(key);
        }
    }

    /// `l1.max_lifetime_ms` less up to a quarter, varying by key and insert: entries warmed
    /// together would otherwise all expire, and be read from Redis again, at the same moment.
    fn jittered_lifetime(&self, key: &str) -> Duration {
        let salt = self.inserts.fetch_add(1, Ordering::Relaxed);
        let spread = xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), salt) % 1024;
        self.max_lifetime - self.max_lifetime / 4 * u32::try_from(spread).unwrap_or(0) / 1024
    }

    /// Forgets `key` (this instance just rewrote or extended it in Redis).
    pub fn forget(&self, key: &str) {
        self.remove(key);
    }

    fn remove(&self, key: &str) {
        if let Some((_, old)) = self.cache.remove(key) {
            self.bytes.fetch_sub(old.weight, Ordering::Relaxed);
        }
    }

    /// Drops every copy `inv` invalidates.
    pub fn apply(&self, inv: &Invalidation) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        if inv.everything {
            self.remove_where(|_, _| true);
            return;
        }
        for key in &inv.delete {
            self.remove(key);
        }
        if !inv.bump.is_empty() {
            self.remove_where(|_, slot| slot.deps.iter().any(|d| inv.bump.contains(d)));
        }
        if !inv.tagged.is_empty() {
            self.remove_where(|_, slot| slot.entry.tags.iter().any(|t| inv.tagged.contains(t)));
        }
        for pattern in &inv.matching {
            let glob = WildMatch::new(pattern);
            self.remove_where(|key, _| glob.matches(key));
        }
    }

    fn remove_where(&self, pred: impl Fn(&str, &NearSlot) -> bool) {
        self.cache.retain(|key, slot| {
            let drop = pred(key, slot);
            if drop {
                self.bytes.fetch_sub(slot.weight, Ordering::Relaxed);
            }
            !drop
        });
    }

    /// Drops expired copies.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.remove_where(|_, slot| slot.expires_at <= now);
    }

    /// Drops everything.
    pub fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.remove_where(|_, _| true);
    }

    /// Records whether the subscription is live. Either way the cache is emptied: going down,
    /// because messages will be missed; coming up, because some may have been.
    pub fn set_live(&self, live: bool) {
        if live {
            self.flush();
            self.live.store(true, Ordering::SeqCst);
        } else {
            self.live.store(false, Ordering::SeqCst);
            self.flush();
        }
    }

    /// Keeps no new copy until [`NearCache::keep_copies`] (a cluster subscription's warm-up,
    /// see [`super::bus::WARM_UP`]).
    pub fn hold_copies(&self) {
        self.keeping.store(false, Ordering::SeqCst);
    }

    /// Keeps copies again, of reads that start from now on only (the epoch moves, so a read
    /// already under way is not kept).
    pub fn keep_copies(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.keeping.store(true, Ordering::SeqCst);
    }

    /// Counts a hit served from a copy; `lane`: answered by the hit lane.
    pub fn served(&self, lane: bool) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        if lane {
            self.lane_hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts an invalidation not confirmed by every instance in time.
    pub fn ack_timed_out(&self) {
        self.ack_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Housekeeping: expired copies go.
    pub fn run_pending_tasks(&self) {
        self.sweep();
    }

    /// Figures for `/cache/stats`.
    pub fn counts(&self) -> NearCounts {
        NearCounts {
            enabled: true,
            subscribed: self.is_live(),
            entries: self.cache.len() as u64,
            bytes: self.bytes.load(Ordering::Relaxed),
            max_bytes: self.max_bytes,
            hits: self.hits.load(Ordering::Relaxed),
            lane_hits: self.lane_hits.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            ack_timeouts: self.ack_timeouts.load(Ordering::Relaxed),
        }
    }
}

impl NearCounts {
    /// The figures of a disabled near cache.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            subscribed: false,
            entries: 0,
            bytes: 0,
            max_bytes: 0,
            hits: 0,
            lane_hits: 0,
            invalidations: 0,
            flushes: 0,
            ack_timeouts: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Keyspace, Source, Stamp, Tier};
    use bytes::Bytes;

    fn deps(run: &str) -> Deps {
        Keyspace::new("p").deps(
            "v1",
            crate::domain::View::new(0, "metrics"),
            &[format!("run:{run}")],
            false,
        )
    }

    fn entry(tags: &[&str]) -> CacheEntry {
        let source = Source {
            tier: Tier::Redis,
            incarnation: 0,
        };
        CacheEntry::new(
            200,
            "application/json",
            Bytes::from_static(b"{}"),
            crate::domain::policy::now_ms(),
            Duration::from_secs(60),
            tags.iter().map(|t| (*t).to_owned()).collect(),
            Stamp::new(source, vec![0, 0], 0),
        )
    }

    fn mark(epoch: u64) -> ReadMark {
        ReadMark { epoch, serving: 0 }
    }

    fn live() -> NearCache {
        let near = NearCache::new(1 << 20, Duration::from_secs(60));
        near.set_live(true);
        near
    }

    /// Keeps an untagged entry of run 0 under `key`, fresh for 10 s, read at `epoch`.
    fn keep(near: &NearCache, key: &str, epoch: u64) {
        let fresh = Duration::from_secs(10);
        near.insert(
            key,
            &entry(&[]),
            &deps("0"),
            Arc::default(),
            fresh,
            mark(epoch),
        );
    }

    #[test]
    fn serves_only_while_live_and_empties_on_each_change() {
        let near = live();
        keep(&near, "k", near.epoch());
        assert!(near.get("k").is_some());
        near.set_live(false);
        assert!(near.get("k").is_none());
        near.set_live(true);
        assert!(near.get("k").is_none(), "a resubscription starts empty");
    }

    #[test]
    fn while_held_nothing_is_kept_nor_afterwards_from_a_read_begun_while_held() {
        let near = NearCache::new(1 << 20, Duration::from_secs(60));
        near.hold_copies();
        near.set_live(true);
        let during = near.epoch();
        keep(&near, "k", during);
        assert!(near.get("k").is_none(), "kept while held");
        near.keep_copies();
        keep(&near, "k", during);
        assert!(near.get("k").is_none(), "kept a read begun while held");
        keep(&near, "k", near.epoch());
        assert!(near.get("k").is_some());
    }

    #[test]
    fn a_read_that_raced_an_invalidation_is_not_kept() {
        let near = live();
        let before = near.epoch();
        near.apply(&Invalidation {
            delete: vec!["other".into()],
            ..Invalidation::default()
        });
        keep(&near, "k", before);
        assert!(near.get("k").is_none());
    }

    #[test]
    fn invalidations_drop_exactly_what_they_name() {
        let near = live();
        let e = near.epoch();
        let put = |key: &str, tag: &str, run: &str| {
            let fresh = Duration::from_secs(10);
            near.insert(
                key,
                &entry(&[tag]),
                &deps(run),
                Arc::default(),
                fresh,
                mark(e),
            );
        };
        put("p:v1:a", "tag:1", "1");
        put("p:v1:b", "tag:2", "2");
        put("p:v1:c", "tag:3", "3");
        keep(&near, "p:v1:d", e);
        let apply = |inv: Invalidation| near.apply(&inv);
        apply(Invalidation {
            tagged: vec!["tag:1".into()],
            ..Invalidation::default()
        });
        assert!(near.get("p:v1:a").is_none());
        assert!(near.get("p:v1:b").is_some());
        apply(Invalidation {
            bump: vec!["p:_gen:v1:run:2".into()],
            ..Invalidation::default()
        });
        assert!(near.get("p:v1:b").is_none());
        assert!(near.get("p:v1:c").is_some());
        apply(Invalidation {
            matching: vec!["p:v1:c*".into()],
            ..Invalidation::default()
        });
        assert!(near.get("p:v1:c").is_none());
        assert!(near.get("p:v1:d").is_some());
        apply(Invalidation {
            delete: vec!["p:v1:d".into()],
            ..Invalidation::default()
        });
        assert!(near.get("p:v1:d").is_none());
        keep(&near, "p:v1:e", near.epoch());
        apply(Invalidation {
            bump: vec!["p:_gen:v1:clears".into()],
            ..Invalidation::default()
        });
        assert!(
            near.get("p:v1:e").is_none(),
            "a clear drops every copy of its version"
        );
    }

    #[test]
    fn entries_live_no_longer_than_their_freshness_or_the_cap() {
        let near = NearCache::new(1 << 20, Duration::from_millis(30));
        near.set_live(true);
        let e = near.epoch();
        keep(&near, "capped", e);
        near.insert(
            "stale",
            &entry(&[]),
            &deps("0"),
            Arc::default(),
            Duration::ZERO,
            mark(e),
        );
        assert!(near.get("capped").is_some());
        assert!(
            near.get("stale").is_none(),
            "nothing that is not fresh is kept"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(near.get("capped").is_none());
    }

    #[test]
    fn the_byte_bound_holds_and_is_accounted_exactly() {
        let near = NearCache::new(1000, Duration::from_millis(30));
        near.set_live(true);
        let e = near.epoch();
        // Replacing a key does not count it twice.
        keep(&near, "k0", e);
        let one = near.counts().bytes;
        keep(&near, "k0", e);
        assert_eq!(near.counts().bytes, one);
        for i in 1..20 {
            keep(&near, &format!("k{i}"), e);
        }
        let full = near.counts();
        assert!(full.bytes <= 1000 && full.entries < 20, "{full:?}");
        assert_eq!(full.bytes, one * full.entries);
        std::thread::sleep(Duration::from_millis(60));
        // Expired copies make room again.
        keep(&near, "late", e);
        assert!(near.get("late").is_some());
        near.flush();
        assert_eq!((near.counts().entries, near.counts().bytes), (0, 0));
    }
}

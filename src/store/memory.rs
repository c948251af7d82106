//! The bounded in-process tier: a quick_cache table weighed in bytes (CLOCK-Pro eviction,
//! which admits every new entry, unlike moka's default TinyLFU), with per-entry expiry checked
//! on read and swept by the housekeeping task, and its own counters. Its counters are independent of Redis's, so its stamps carry
//! [`Tier::Memory`] and an incarnation that changes whenever it is emptied.
//!
//! Every write (conditional put, touch, invalidation) happens under one lock, so a write can
//! never land between an invalidation's bump and its deletes. Reads do not take it: a read
//! takes the entry, then the counters (held only for that look-up), and an invalidation bumps
//! before it deletes, so a read that races one finds the entry gone or its counters moved.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use quick_cache::sync::Cache;
use wildmatch::WildMatch;

use super::{CacheEntry, Deps, Invalidation, Keyspace, Lookup, Source, Stamp, Tier, Validated};
use crate::domain::policy::now_ms;
use crate::metrics::names;

/// The hasher of its maps: seeded per process (keys come from clients), and cheaper than
/// SipHash on the hit path, which hashes the entry's key and each counter's.
type Hasher = foldhash::fast::RandomState;

/// Most counters the memory tier keeps: past it, it empties itself (a new incarnation) rather
/// than grow, which is always safe for a cache.
pub const MAX_COUNTERS: usize = 100_000;

#[derive(Debug)]
struct Slot {
    entry: CacheEntry,
    /// When it stops being served (and the next sweep drops it).
    expires_at: Instant,
    /// The same, in Unix milliseconds (for snapshots).
    expires_at_ms: u64,
    /// The counters' epoch at which the entry's stamp was last found to serve (0: never):
    /// while no counter has changed since, it still does (see [`MemoryStore::servable`]).
    serves_at: AtomicU64,
    /// The last credential found accepted for it (`auth.frontend = forward`) and until when,
    /// as a near-cache copy remembers it.
    validated: Validated,
}

/// An entry the memory tier may serve (see [`MemoryStore::servable`]), shared, not copied.
#[derive(Debug, Clone)]
pub struct MemoryHit(Arc<Slot>);

impl MemoryHit {
    /// The entry.
    pub fn entry(&self) -> &CacheEntry {
        &self.0.entry
    }

    /// The credential last found accepted for it, which its next hits may skip looking up.
    pub fn validated(&self) -> &Validated {
        &self.0.validated
    }
}

/// Everything the memory tier holds, for snapshots.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemoryContents {
    /// `(physical key, expires at in Unix ms, entry)`.
    pub entries: Vec<(String, u64, CacheEntry)>,
    /// Counters.
    pub gens: Vec<(String, u64)>,
    /// Whether other instances were known when it was taken (its entries are then held to
    /// `memory.degraded_max_age_ms` after a restart, until the registry says otherwise).
    pub others_known: bool,
}

/// An entry's weight: its key and what [`CacheEntry::weight`] counts.
#[derive(Clone)]
struct ByteWeight;

impl quick_cache::Weighter<String, Arc<Slot>> for ByteWeight {
    fn weight(&self, key: &String, slot: &Arc<Slot>) -> u64 {
        // Never 0 (a key is never empty): quick_cache never evicts an entry weighing 0.
        (key.len() + slot.entry.weight()).max(1) as u64
    }
}

/// Counts the entries the table evicts to stay within its bound.
#[derive(Clone)]
struct Evictions {
    removals: Arc<Removals>,
    metric: metrics::Counter,
}

impl quick_cache::Lifecycle<String, Arc<Slot>> for Evictions {
    /// The key being written: its own former entry is replaced, not evicted (quick_cache
    /// reports both alike).
    type RequestState = Option<String>;

    fn on_evict(&self, writing: &mut Option<String>, key: String, _: Arc<Slot>) {
        if writing.as_deref() == Some(key.as_str()) {
            return;
        }
        self.removals.evicted.fetch_add(1, Ordering::Relaxed);
        self.metric.increment(1);
    }
}

/// Shards of the table: each holds an equal share of the bound, and an entry heavier than
/// about a share is never kept, so there are as many as the cores use (4 per core), but
/// fewer where a share would hold less than 64 MiB or 4 of the largest entry stored.
fn shards(max_bytes: u64, largest_entry: u64) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = (64 << 20).max(largest_entry.saturating_mul(4));
    let fit = usize::try_from(max_bytes / share).unwrap_or(usize::MAX);
    let shards = fit.clamp(1, cores * 4);
    // A power of two (quick_cache rounds up otherwise), not above what fits.
    1 << shards.ilog2()
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
    cache: Arc<Cache<String, Arc<Slot>, ByteWeight, Hasher, Evictions>>,
    max_bytes: u64,
    keys: Keyspace,
    counters: Arc<Mutex<HashMap<String, u64, Hasher>>>,
    /// Held by every write, for its whole length (see the module doc).
    writes: Arc<Mutex<()>>,
    incarnation: Arc<AtomicU64>,
    /// Moves (after the change) whenever a counter or the incarnation changes; starts at 1.
    epoch: Arc<AtomicU64>,
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
    /// A store holding at most `max_bytes` of entries (keys and bodies counted), for the
    /// keyspace `keys`, whose largest body is `largest_entry` bytes (`cache.max_entry_bytes`).
    pub fn new(max_bytes: u64, largest_entry: u64, keys: Keyspace) -> Self {
        let removals = Arc::new(Removals::default());
        let evictions = Evictions {
            removals: removals.clone(),
            metric: metrics::counter!(names::MEMORY_REMOVALS_TOTAL, "cause" => "size"),
        };
        let mut options = quick_cache::OptionsBuilder::new();
        options
            .weight_capacity(max_bytes)
            // Room for entries of 16 KiB at first: the table grows as it fills.
            .estimated_items_capacity(usize::try_from(max_bytes / 16_384).unwrap_or(1 << 20))
            .shards(shards(max_bytes, largest_entry));
        let options = options
            .build()
            .unwrap_or_else(|_| unreachable!("weight and items capacity are both set"));
        let cache = Cache::with_options(options, ByteWeight, Hasher::default(), evictions);
        Self {
            cache: Arc::new(cache),
            max_bytes,
            keys,
            counters: Arc::default(),
            writes: Arc::default(),
            incarnation: Arc::default(),
            epoch: Arc::new(AtomicU64::new(1)),
            removals,
            changes: Arc::default(),
        }
    }

    /// Where its reads come from: the memory tier, in its current incarnation.
    pub fn source(&self) -> Source {
        Source {
            tier: Tier::Memory,
            incarnation: self.incarnation.load(Ordering::Acquire),
        }
    }

    fn write(&self) -> MutexGuard<'_, ()> {
        self.writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, u64, Hasher>> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes, deletes and bumps so far (snapshots are taken after enough of them).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of every live entry and counter (bodies are shared, not copied).
    pub fn export(&self) -> MemoryContents {
        let now = now_ms();
        let entries = self
            .cache
            .iter()
            .filter(|(_, slot)| slot.expires_at_ms > now)
            .map(|(k, slot)| (k, slot.expires_at_ms, slot.entry.clone()))
            .collect();
        let gens = self.lock().iter().map(|(k, v)| (k.clone(), *v)).collect();
        MemoryContents {
            entries,
            gens,
            others_known: false,
        }
    }

    /// Loads entries (each kept until its own expiry) and counters, e.g. from a snapshot.
    /// Entries keep the counter values they were stamped with, now of this incarnation.
    pub fn import(&self, contents: MemoryContents) {
        let _writes = self.write();
        let now = now_ms();
        let source = self.source();
        let mut counters = self.lock();
        for (k, v) in contents.gens {
            let c = counters.entry(k).or_insert(0);
            *c = (*c).max(v);
        }
        self.moved();
        for (key, expires_at_ms, mut entry) in contents.entries {
            if expires_at_ms > now {
                entry.stamp = entry.stamp.moved_to(source);
                let ttl = Duration::from_millis(expires_at_ms - now);
                self.insert(&key, entry, ttl);
            }
        }
    }

    /// Entries evicted and expired so far.
    pub fn removals(&self) -> &Removals {
        &self.removals
    }

    /// Counters currently held (bounded by [`MAX_COUNTERS`]).
    pub fn counter_count(&self) -> u64 {
        self.lock().len() as u64
    }

    fn read(counters: &HashMap<String, u64, Hasher>, source: Source, deps: &Deps) -> Stamp {
        let get = |k: &String| counters.get(k).copied().unwrap_or(0);
        Stamp::new(
            source,
            deps.counters().iter().map(get).collect(),
            counters.get(deps.clears_key()).copied().unwrap_or(0),
        )
    }

    /// Entries currently held (expired ones until the next sweep).
    pub fn entry_count(&self) -> u64 {
        self.cache.len() as u64
    }

    /// Bytes currently held (expired entries' until the next sweep).
    pub fn weighted_size(&self) -> u64 {
        self.cache.weight()
    }

    /// The configured bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Housekeeping: expired entries are removed (and counted), without waiting for a write.
    /// Found under a shard's read lock taken per entry, and removed one by one: a sweep never
    /// holds a shard's write lock across the whole shard, which would stall its hits.
    pub fn run_pending_tasks(&self) {
        let now = Instant::now();
        let found: Vec<String> = self
            .cache
            .iter()
            .filter(|(_, slot)| slot.expires_at <= now)
            .map(|(key, _)| key)
            .collect();
        let mut expired = 0;
        for key in found {
            // Unless it was written again meanwhile.
            let gone = self
                .cache
                .remove_if(key.as_str(), |slot| slot.expires_at <= now);
            expired += u64::from(gone.is_some());
        }
        self.removals.expired.fetch_add(expired, Ordering::Relaxed);
        metrics::counter!(names::MEMORY_REMOVALS_TOTAL, "cause" => "expired").increment(expired);
    }

    /// The slot of `key`, unless it expired.
    fn live(&self, key: &str) -> Option<Arc<Slot>> {
        self.cache
            .get(key)
            .filter(|slot| slot.expires_at > Instant::now())
    }

    /// Drops every entry and counter and starts a new incarnation (returning to Redis: its
    /// entries never saw other instances' invalidations, and its counters mean nothing there).
    pub fn clear(&self) {
        let _writes = self.write();
        self.cache.clear();
        self.renew();
        self.changed();
    }

    fn insert(&self, key: &str, entry: CacheEntry, ttl: Duration) {
        let expires_at_ms =
            now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        // A life too long for the clock is a day short of forever: as good as one.
        let expires_at = Instant::now()
            .checked_add(ttl)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86_400));
        let slot = Arc::new(Slot {
            entry,
            expires_at,
            expires_at_ms,
            serves_at: AtomicU64::new(0),
            validated: ArcSwapOption::empty(),
        });
        let mut writing = Some(key.to_owned());
        self.cache
            .insert_with_lifecycle(key.to_owned(), slot, &mut writing);
        self.changed();
    }

    /// Removes the live entries `pred` picks; returns how many.
    fn remove_where(&self, pred: impl Fn(&str, &Slot) -> bool) -> u64 {
        let now = Instant::now();
        let keys: Vec<String> = self
            .cache
            .iter()
            .filter(|(k, v)| v.expires_at > now && pred(k, v))
            .map(|(k, _)| k)
            .collect();
        let mut removed = 0;
        for key in keys {
            if self.cache.remove(key.as_str()).is_some() {
                removed += 1;
            }
        }
        removed
    }

    /// Reads `key` and the current stamp of `deps`.
    pub fn get(&self, key: &str, deps: &Deps) -> Lookup {
        let entry = self.live(key).map(|slot| Box::new(slot.entry.clone()));
        Lookup {
            entry,
            current: self.stamp(deps),
        }
    }

    /// The entry of `key` if its stamp serves the current counters of its dependencies
    /// (what [`Lookup::servable`] of [`Self::get`] keeps), without building them (`deps`)
    /// or reading the counters when no counter has changed since this entry's stamp was last
    /// found to serve: the hit path of the memory tier.
    pub fn servable(&self, key: &str, deps: impl FnOnce() -> Deps) -> Option<MemoryHit> {
        let slot = self.live(key)?;
        // Read before the counters: a change after this read moves the epoch past it, so
        // what is recorded below never stands for a stamp read before that change.
        let epoch = self.epoch.load(Ordering::SeqCst);
        if slot.serves_at.load(Ordering::Acquire) != epoch {
            if !slot.entry.stamp.serves(&self.stamp(&deps())) {
                return None;
            }
            slot.serves_at.store(epoch, Ordering::Release);
        }
        Some(MemoryHit(slot))
    }

    /// Forgets the credential `key`'s entry remembers as accepted (its acceptance was
    /// withdrawn).
    pub fn forget_validated(&self, key: &str) {
        if let Some(slot) = self.cache.peek(key) {
            slot.validated.store(None);
        }
    }

    /// The current stamp of `deps`.
    pub fn stamp(&self, deps: &Deps) -> Stamp {
        // Counters and incarnation change together under this lock (see `renew`).
        let counters = self.lock();
        Self::read(&counters, self.source(), deps)
    }

    /// Forgets every counter and starts a new incarnation, in one step as seen by `stamp`.
    fn renew(&self) {
        let mut counters = self.lock();
        counters.clear();
        self.incarnation.fetch_add(1, Ordering::AcqRel);
        self.moved();
    }

    /// Marks a change of the counters or the incarnation, once it is made: every stamp found
    /// to serve before is looked at again.
    fn moved(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Writes `entry` unless its stamp is of another tier or incarnation or anything it
    /// depends on moved; returns whether it was written.
    pub fn put(&self, key: &str, entry: &CacheEntry, deps: &Deps, ttl: Duration) -> bool {
        let _writes = self.write();
        if !entry.stamp.unchanged_at(&self.stamp(deps)) {
            return false;
        }
        self.insert(key, entry.clone(), ttl);
        true
    }

    /// Writes `entry`, fetched under another tier's stamp, stamped with this tier's current
    /// counters for `deps` (its age still counts from when its own stamp was read), if this
    /// tier is still in incarnation `incarnation` and `allowed` holds, both checked under the
    /// write lock, so no invalidation or emptying lands between the check and the write.
    /// Returns whether it was written (see `FallbackStore::put` for when that is safe).
    pub fn put_fenced(
        &self,
        key: &str,
        entry: &CacheEntry,
        deps: &Deps,
        ttl: Duration,
        incarnation: u64,
        allowed: impl FnOnce() -> bool,
    ) -> bool {
        let _writes = self.write();
        if self.source().incarnation != incarnation || !allowed() {
            return false;
        }
        let current = self.stamp(deps);
        let mut kept = entry.clone();
        kept.stamp = Stamp::read_at(
            current.source(),
            current.counters().to_vec(),
            current.clears(),
            entry.stamp.read_at_ms(),
        );
        self.insert(key, kept, ttl);
        true
    }

    /// Extends the life of `key` (re-inserting shares the body) if it still holds the same
    /// entry (same body, same stamp): never brings back an entry that was replaced or deleted
    /// meanwhile. Returns whether it did.
    pub fn touch(&self, key: &str, entry: &CacheEntry, retention: Duration) -> bool {
        let _writes = self.write();
        let same = self
            .live(key)
            .is_some_and(|slot| slot.entry.etag == entry.etag && slot.entry.stamp == entry.stamp);
        if same {
            self.insert(key, entry.clone(), retention);
        }
        same
    }

    /// Applies `inv`; returns how many entries it dropped.
    pub fn apply(&self, inv: &Invalidation) -> u64 {
        let _writes = self.write();
        let counted = {
            let mut counters = self.lock();
            for counter in &inv.bump {
                *counters.entry(counter.clone()).or_insert(0) += 1;
            }
            counters.len()
        };
        if !inv.bump.is_empty() {
            self.moved();
        }
        let dropped = if inv.everything || counted > MAX_COUNTERS {
            // Everything goes, and a new incarnation makes every stamp read so far stale.
            let n = self.cache.len() as u64;
            self.cache.clear();
            self.renew();
            n
        } else {
            let mut n = 0;
            for key in &inv.delete {
                n += u64::from(self.cache.remove(key.as_str()).is_some());
            }
            for tag in &inv.tagged {
                n += self.remove_where(|_, slot| slot.entry.tags.iter().any(|t| t == tag));
            }
            for pattern in &inv.matching {
                let glob = WildMatch::new(pattern);
                n += self.remove_where(|k, _| glob.matches(k) && self.keys.is_entry(k));
            }
            n
        };
        self.changed();
        dropped
    }

    /// Counts the entries matching `pattern`.
    pub fn count_matching(&self, pattern: &str) -> u64 {
        let glob = WildMatch::new(pattern);
        let now = Instant::now();
        self.cache
            .iter()
            .filter(|(k, slot)| slot.expires_at > now && glob.matches(k))
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn store() -> MemoryStore {
        MemoryStore::new(1 << 20, 1 << 16, Keyspace::new("p"))
    }

    fn deps(run: &str) -> Deps {
        Keyspace::new("p").deps(
            "v1",
            crate::domain::View::new(0, "metrics"),
            &[format!("run:{run}")],
            false,
        )
    }

    fn entry(store: &MemoryStore, deps: &Deps, body: &'static [u8], tags: &[&str]) -> CacheEntry {
        CacheEntry::new(
            200,
            "application/json",
            Bytes::from_static(body),
            now_ms(),
            TTL,
            tags.iter().map(|t| (*t).to_owned()).collect(),
            store.stamp(deps),
        )
    }

    #[test]
    fn put_get_invalidate_round_trip() {
        let store = store();
        let d = deps("1");
        let e = entry(&store, &d, b"{}", &[]);
        assert!(store.put("p:v1:k", &e, &d, TTL));
        assert_eq!(store.get("p:v1:k", &d).servable().0, Some(Box::new(e)));
        let gone = Invalidation {
            delete: vec!["p:v1:k".into(), "p:v1:nope".into()],
            ..Invalidation::default()
        };
        assert_eq!(store.apply(&gone), 1);
        assert_eq!(store.get("p:v1:k", &d).servable().0, None);
    }

    /// The hit path's read skips the counters while none changed, and never serves an entry
    /// once one it depends on did (a bump without the delete, an import, an emptying).
    #[test]
    fn servable_reads_the_counters_again_after_any_change() {
        let store = store();
        let d = deps("1");
        let e = entry(&store, &d, b"{}", &[]);
        assert!(store.put("p:v1:k", &e, &d, TTL));
        let built = std::cell::Cell::new(0);
        let read = || {
            store
                .servable("p:v1:k", || {
                    built.set(built.get() + 1);
                    d.clone()
                })
                .map(|hit| hit.entry().clone())
        };
        assert_eq!(read(), Some(e.clone()));
        assert_eq!(read(), Some(e.clone()));
        assert_eq!(built.get(), 1, "no counter changed: read once");
        // A bump of another entry's counter: read again, and it still serves.
        let other = Invalidation {
            bump: deps("2").counters()[1..].to_vec(),
            ..Invalidation::default()
        };
        store.apply(&other);
        assert_eq!(read(), Some(e.clone()));
        assert_eq!(built.get(), 2);
        // Its own counter, without the delete: never served again.
        let bump = Invalidation {
            bump: d.counters()[1..].to_vec(),
            ..Invalidation::default()
        };
        store.apply(&bump);
        assert_eq!(read(), None);
        assert_eq!(read(), None);
        // Stamped again and put back: serves; an import moving its counter: does not.
        let e = entry(&store, &d, b"{}", &[]);
        assert!(store.put("p:v1:k", &e, &d, TTL));
        assert_eq!(read(), Some(e.clone()));
        let mut moved = store.export();
        moved.entries.clear();
        for (_, v) in &mut moved.gens {
            *v += 1;
        }
        store.import(moved);
        assert_eq!(read(), None);
        // A new incarnation (emptied, then the same entry written back by hand): does not.
        let e = entry(&store, &d, b"{}", &[]);
        assert!(store.put("p:v1:k", &e, &d, TTL));
        assert_eq!(read(), Some(e.clone()));
        store.renew();
        store.insert("p:v1:k", e, TTL);
        assert_eq!(read(), None);
    }

    #[test]
    fn a_fenced_put_is_stamped_here_and_refused_once_emptied_or_disallowed() {
        let store = store();
        let d = deps("1");
        let redis = Source {
            tier: Tier::Redis,
            incarnation: 3,
        };
        let mut e = entry(&store, &d, b"{}", &[]);
        e.stamp = Stamp::read_at(redis, vec![9, 9], 9, 1_234);
        let before = store.source().incarnation;
        assert!(!store.put_fenced("p:v1:k", &e, &d, TTL, before, || false));
        assert!(store.put_fenced("p:v1:k", &e, &d, TTL, before, || true));
        let kept = store.get("p:v1:k", &d).servable().0.expect("servable here");
        assert_eq!(kept.stamp.source(), store.source());
        assert_eq!(
            kept.stamp.read_at_ms(),
            1_234,
            "its age counts from its own stamp"
        );
        store.clear();
        assert!(!store.put_fenced("p:v1:k", &e, &d, TTL, before, || true));
    }

    #[test]
    fn tagged_and_pattern_deletes_are_precise() {
        let store = store();
        let d = deps("1");
        for (key, body, tags) in [
            ("p:v1:a", b"1", &["t:1"][..]),
            ("p:v1:b", b"2", &["t:1", "t:2"][..]),
            ("p:v1:c", b"3", &["t:2"][..]),
            ("other:x", b"4", &[][..]),
        ] {
            let e = entry(&store, &d, body, tags);
            assert!(store.put(key, &e, &d, TTL));
        }
        let tagged = Invalidation {
            tagged: vec!["t:1".into()],
            ..Invalidation::default()
        };
        assert_eq!(store.apply(&tagged), 2);
        assert!(store.get("p:v1:c", &d).entry.is_some());
        assert_eq!(store.count_matching("p:v1:*"), 1);
        let clear = Invalidation {
            matching: vec!["*".into()],
            ..Invalidation::default()
        };
        assert_eq!(store.apply(&clear), 1, "only this keyspace's entries");
        assert!(store.get("other:x", &d).entry.is_some());
    }

    #[test]
    fn a_bump_refuses_stores_and_serves_of_older_stamps() {
        let store = store();
        let d = deps("1");
        let before = entry(&store, &d, b"{}", &[]);
        assert!(store.put("p:v1:k", &before, &d, TTL));
        store.apply(&Invalidation {
            bump: d.counters()[1..].to_vec(),
            ..Invalidation::default()
        });
        assert!(store.get("p:v1:k", &d).servable().0.is_none());
        // A fetch that began before the bump cannot store afterwards.
        assert!(!store.put("p:v1:k", &before, &d, TTL));
        let after = entry(&store, &d, b"{}", &[]);
        assert!(store.put("p:v1:k", &after, &d, TTL));
        assert!(store.get("p:v1:k", &d).servable().0.is_some());
    }

    #[test]
    fn a_clear_refuses_stores_that_overlapped_it() {
        let store = store();
        let d = deps("1");
        let during = entry(&store, &d, b"{}", &[]);
        store.apply(&Invalidation {
            bump: vec![d.clears_key().to_owned()],
            delete: vec!["p:v1:k".into()],
            ..Invalidation::default()
        });
        assert!(!store.put("p:v1:k", &during, &d, TTL));
    }

    #[test]
    fn stamps_of_another_incarnation_never_validate() {
        let store = store();
        let d = deps("1");
        let old = entry(&store, &d, b"{}", &[]);
        store.clear();
        assert!(
            !store.put("p:v1:k", &old, &d, TTL),
            "counters read before the clear"
        );
        let everything = Invalidation {
            everything: true,
            ..Invalidation::default()
        };
        let fresh = entry(&store, &d, b"{}", &[]);
        store.apply(&everything);
        assert!(!store.put("p:v1:k", &fresh, &d, TTL));
    }

    #[test]
    fn counters_stay_bounded() {
        let store = store();
        for i in 0..=MAX_COUNTERS {
            store.apply(&Invalidation {
                bump: vec![format!("p:_gen:v1:run:{i}")],
                ..Invalidation::default()
            });
        }
        assert!(store.counter_count() <= MAX_COUNTERS as u64);
    }

    #[test]
    fn expired_entries_are_never_served_and_are_swept_without_a_write() {
        let store = store();
        let d = deps("1");
        let e = entry(&store, &d, b"{}", &[]);
        assert!(store.put("p:v1:k", &e, &d, Duration::from_millis(40)));
        assert!(store.servable("p:v1:k", || d.clone()).is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(store.get("p:v1:k", &d).entry, None);
        assert!(store.servable("p:v1:k", || d.clone()).is_none());
        assert!(
            !store.touch("p:v1:k", &e, TTL),
            "an expired entry is not brought back"
        );
        assert!(store.export().entries.is_empty());
        store.run_pending_tasks();
        assert_eq!(store.entry_count(), 0);
        assert_eq!(store.removals().expired.load(Ordering::Relaxed), 1);
    }

    /// Replacing an entry (a new store, a refresh's touch) is no eviction: the eviction
    /// count tells operators the bound is too small.
    #[test]
    fn an_overwrite_is_not_counted_as_an_eviction() {
        let store = store();
        let d = deps("1");
        let e = entry(&store, &d, b"{}", &[]);
        assert!(store.put("p:v1:k", &e, &d, TTL));
        assert!(store.put("p:v1:k", &e, &d, TTL));
        assert!(store.touch("p:v1:k", &e, TTL));
        assert!(store.servable("p:v1:k", || d.clone()).is_some());
        assert_eq!(store.removals().evicted.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_table_admits_every_new_entry() {
        let store = MemoryStore::new(4096, 1024, Keyspace::new("p"));
        let d = deps("1");
        for i in 0..20 {
            let e = entry(&store, &d, &[b'x'; 900], &[]);
            assert!(store.put(&format!("p:v1:k{i}"), &e, &d, TTL));
            // Read the older ones often: the newest is still kept.
            for _ in 0..3 {
                let _ = store.servable("p:v1:k0", || d.clone());
            }
            assert!(
                store
                    .servable(&format!("p:v1:k{i}"), || d.clone())
                    .is_some()
            );
        }
    }

    #[test]
    fn shards_hold_a_share_of_several_of_the_largest_entries() {
        for (max, largest) in [
            (1 << 20, 1 << 20),
            (256 << 20, 1 << 20),
            (1 << 34, 32 << 20),
        ] {
            let n = shards(max, largest) as u64;
            assert!(n.is_power_of_two());
            assert!(
                n == 1 || max / n >= (64 << 20).max(4 * largest),
                "{max} {largest} {n}"
            );
        }
        assert_eq!(shards(1 << 20, 1 << 20), 1);
    }

    #[test]
    fn byte_bound_evicts() {
        let store = MemoryStore::new(4096, 1024, Keyspace::new("p"));
        let d = deps("1");
        let big = CacheEntry::new(
            200,
            "application/json",
            Bytes::from(vec![b'x'; 1000]),
            0,
            TTL,
            vec![],
            store.stamp(&d),
        );
        for i in 0..20 {
            assert!(store.put(&format!("p:v1:k{i}"), &big, &d, TTL));
        }
        store.run_pending_tasks();
        assert!(store.weighted_size() <= 4096, "{}", store.weighted_size());
        assert!(store.entry_count() < 20);
        assert!(store.removals().evicted.load(Ordering::Relaxed) > 0);
    }
}

//! Storage: where entries live and how they are invalidated, with no knowledge of HTTP or of
//! the origin.
//!
//! - [`entry`]: an entry and its byte encoding; [`keyspace`]: the physical key layout;
//! - [`redis`] and [`memory`]: the two tiers; [`tiered`]: Redis first, memory when Redis is
//!   unreachable (circuit breaker, single-flight probe, the outage journal, peers);
//! - [`near`]: the in-process near cache in front of it, kept coherent over Redis pub/sub;
//! - [`snapshot`], [`version`], [`counters`]: memory-tier snapshots, the shared key version,
//!   and per-key read counts.
//!
//! One type owns protection against staleness: the [`Stamp`]. Every entry carries the stamp
//! read *before* its origin fetch began; a store refuses to write it if anything it depends on
//! moved since ([`Store::put`]), and a read serves it only while its counters are still
//! current ([`Lookup::servable`]). Flights and near-cache copies carry stamps too. A stamp
//! names the tier (and that tier's incarnation) it was read from, so counters of one tier
//! never validate an entry of the other, nor of a Redis that was restarted.

pub mod counters;
pub mod entry;
pub mod keyspace;
pub mod memory;
pub mod near;
pub mod redis;
pub mod snapshot;
pub mod tiered;
pub mod version;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Deserializer, Serialize};

pub use entry::{CacheEntry, CopyMark, Headers, VaryMarker, headers_of};
pub use keyspace::Keyspace;
pub use near::{NearSlot, NearStore};
pub use tiered::FallbackStore;
pub use version::KeyVersion;

/// A store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached in time (connection refused, time-out, broken pipe).
    #[error("redis is unavailable: {0}")]
    Unavailable(String),
    /// Redis refused a new connection: nothing listens at its address (the process died or
    /// was stopped). Unlike a time-out or one broken connection this proves it gone, so the
    /// circuit opens at once instead of waiting out a streak of failures.
    #[error("redis refused the connection: {0}")]
    Refused(String),
    /// The store answered, but not as expected.
    #[error("redis command failed: {0}")]
    Command(String),
    /// A stored value could not be decoded.
    #[error("stored entry is corrupt: {0}")]
    Corrupt(&'static str),
    /// Admin work (SCAN, INFO, on the admin pool) failed or found every admin connection in
    /// use. Never taken for Redis being down: admin work never opens the request path's
    /// circuit, and an invalidation that needed it is not acknowledged (a 503).
    #[error("redis admin work failed: {0}")]
    Busy(String),
}

impl StoreError {
    /// Whether the store should be considered down (as opposed to one bad answer).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Refused(_))
    }

    /// Whether it proves Redis gone (a refused connection), not merely slow or flaky.
    pub fn proves_down(&self) -> bool {
        matches!(self, StoreError::Refused(_))
    }
}

/// Which tier answered or holds an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// The shared Redis.
    Redis,
    /// The bounded in-process store.
    Memory,
}

impl Tier {
    /// Lowercase name, as reported in stats and `/ready`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Redis => "redis",
            Tier::Memory => "memory",
        }
    }
}

/// Where counters were read: a tier, and which incarnation of it. Redis's incarnation changes
/// when runcache finds it restarted; the memory tier's whenever it is emptied. Counters of
/// two sources are never comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source {
    /// The tier.
    pub tier: Tier,
    /// The tier's incarnation, as counted by this process.
    pub incarnation: u64,
}

/// The last credential found accepted for a stored entry (`auth.frontend = forward`) and
/// until when, kept with a near-cache copy or a memory-tier entry so that one caller's
/// repeated hits skip the acceptance lookup.
pub type Validated = arc_swap::ArcSwapOption<(crate::security::Credential, std::time::Instant)>;

/// The counters an entry depends on: its view's and each of its runs', plus the clear
/// sequence of its version. Built by [`Keyspace::deps`]; a [`Stamp`] holds their values, in
/// this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deps {
    counters: Vec<String>,
    clears: String,
}

impl Deps {
    /// The generation counters, view first.
    pub fn counters(&self) -> &[String] {
        &self.counters
    }

    /// The clear sequence.
    pub fn clears_key(&self) -> &str {
        &self.clears
    }

    /// These dependencies and the counters `more`, after them (those already among them are
    /// left out): what an entry with answer-learned tags depends on (see `Keyspace::deps`).
    pub fn extended(&self, more: impl IntoIterator<Item = String>) -> Deps {
        let mut counters = self.counters.clone();
        for c in more {
            if !counters.contains(&c) {
                counters.push(c);
            }
        }
        Deps {
            counters,
            clears: self.clears.clone(),
        }
    }
}

/// The invalidation state something was computed under: the values of its [`Deps`] read
/// from one [`Source`].
///
/// - An entry is servable while the counters read with it equal its stamp's
///   ([`Stamp::serves`]); an invalidation bumps one of them before it answers.
/// - A store writes an entry only if its stamp is still current, clear sequence included
///   ([`Stamp::unchanged_at`]): a clear or key invalidation deletes what exists and bumps the
///   sequence, so a fetch that overlapped it cannot store behind it.
/// - A request joins a flight only if the flight's stamp is at least as recent as its own
///   ([`Stamp::covers`]).
///
/// It also records when it was read: how old the data behind an entry can be, whatever
/// refreshed its store time since (`memory.degraded_max_age_ms` is measured from it). Two
/// stamps of the same values are equal whenever they were read.
#[derive(Debug, Clone)]
pub struct Stamp {
    source: Source,
    counters: Vec<u64>,
    clears: u64,
    read_at_ms: u64,
    /// Set by the tiered store on a stamp read from Redis: what an answer fetched under it
    /// needs to be kept in the memory tier instead, should Redis fail before it is stored.
    fence: Option<Fence>,
}

/// What the tiered store knew, just before it read a stamp from Redis, of what its memory
/// tier could miss: the invalidations begun on this instance so far (applied to Redis, to
/// memory, or heard from others) and the memory tier's incarnation. An answer fetched under
/// that stamp may go to the memory tier only if neither moved since (see
/// [`FallbackStore::put`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    /// Invalidations begun on this instance.
    pub invalidations: u64,
    /// The memory tier's incarnation.
    pub memory: u64,
}

impl PartialEq for Stamp {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
            && self.counters == other.counters
            && self.clears == other.clears
    }
}

impl Eq for Stamp {}

impl Stamp {
    /// A stamp of `counters` (in [`Deps`] order) and the clear sequence, read from `source`
    /// now.
    pub fn new(source: Source, counters: Vec<u64>, clears: u64) -> Self {
        Self::read_at(source, counters, clears, crate::domain::policy::now_ms())
    }

    /// A stamp read at `read_at_ms` (Unix milliseconds), as stored with an entry.
    pub fn read_at(source: Source, counters: Vec<u64>, clears: u64, read_at_ms: u64) -> Self {
        Self {
            source,
            counters,
            clears,
            read_at_ms,
            fence: None,
        }
    }

    /// The same stamp, with what the tiered store knew before reading it (see [`Fence`]).
    pub fn fenced(mut self, fence: Fence) -> Self {
        self.fence = Some(fence);
        self
    }

    /// What the tiered store knew before reading it from Redis, if it was.
    pub fn fence(&self) -> Option<Fence> {
        self.fence
    }

    /// When it was read, in Unix milliseconds.
    pub fn read_at_ms(&self) -> u64 {
        self.read_at_ms
    }

    /// The same values, now of `source` (an entry loaded into another tier's incarnation).
    pub fn moved_to(&self, source: Source) -> Stamp {
        Stamp {
            source,
            fence: None,
            ..self.clone()
        }
    }

    /// Where it was read.
    pub fn source(&self) -> Source {
        self.source
    }

    /// The counter values, in [`Deps`] order.
    pub fn counters(&self) -> &[u64] {
        &self.counters
    }

    /// The clear sequence.
    pub fn clears(&self) -> u64 {
        self.clears
    }

    /// Whether an entry stamped `self` may be served, `current` being read now from the same
    /// store for the same dependencies. The clear sequence is not compared: a clear deletes
    /// the entries it names.
    pub fn serves(&self, current: &Stamp) -> bool {
        self.source == current.source && self.counters == current.counters
    }

    /// Whether nothing `self` depends on changed by the time `later` was read, clear
    /// sequence included.
    pub fn unchanged_at(&self, later: &Stamp) -> bool {
        self.serves(later) && self.clears == later.clears
    }

    /// The stamp of something fetched under `self` by a holder that then bumped each of
    /// `bumped` exactly once itself (those of `deps`' counters, and its clear sequence, that
    /// are among them): storing under it succeeds only if nobody else moved anything since
    /// `self` was read.
    pub fn after_own_bumps(&self, deps: &Deps, bumped: &[String]) -> Stamp {
        let mut next = self.clone();
        for counter in bumped {
            if let Some(i) = deps.counters().iter().position(|c| c == counter)
                && let Some(v) = next.counters.get_mut(i)
            {
                *v += 1;
            }
            if deps.clears_key() == counter && !deps.counters().contains(counter) {
                next.clears += 1;
            }
        }
        next
    }

    /// This stamp with the values of counters added after its own (`later`, a stamp of the
    /// extended dependencies, read from the same source afterwards: see [`Deps::extended`]).
    /// `None` when `later` was read from another source or has no more counters.
    pub fn extended_by(&self, later: &Stamp) -> Option<Stamp> {
        if later.source != self.source || later.counters.len() < self.counters.len() {
            return None;
        }
        let mut next = self.clone();
        next.counters
            .extend_from_slice(&later.counters[self.counters.len()..]);
        Some(next)
    }

    /// Whether work started under `self` saw at least what a request that read `other` saw:
    /// the same source and every value at least as high.
    pub fn covers(&self, other: &Stamp) -> bool {
        self.source == other.source
            && self.counters.len() == other.counters.len()
            && self
                .counters
                .iter()
                .zip(&other.counters)
                .all(|(mine, theirs)| mine >= theirs)
            && self.clears >= other.clears
    }
}

/// An entry read together with the current stamp of its dependencies.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The stored entry, if any (servable or not).
    pub entry: Option<Box<CacheEntry>>,
    /// The current stamp of the dependencies asked for.
    pub current: Stamp,
}

impl Lookup {
    /// The entry, if an invalidation did not happen after its fetch began, and the current
    /// stamp (what a fetch starting now is stamped with).
    pub fn servable(self) -> (Option<Box<CacheEntry>>, Stamp) {
        let current = self.current;
        let entry = self.entry.filter(|e| e.stamp.serves(&current));
        (entry, current)
    }
}

/// One invalidation, applied as a unit to every tier: first the counters are bumped (which
/// makes every entry stamped under them unservable at once), then entries are deleted.
/// Operations carry physical keys and globs (only `*` and `?`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invalidation {
    /// Counters to increment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bump: Vec<String>,
    /// Entries to delete.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delete: Vec<String>,
    /// Tag sets whose members are deleted, with the set.
    #[serde(
        default,
        rename = "delete_tagged",
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tagged: Vec<String>,
    /// Globs whose matching entries are deleted.
    #[serde(
        default,
        rename = "delete_matching",
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub matching: Vec<String>,
    /// Every entry of every version is deleted (a journal that overflowed, a Redis that came
    /// back from an older snapshot).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub everything: bool,
}

/// Journal lines written before invalidations were batched name one tag set or glob.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(s) => vec![s],
        Raw::Many(v) => v,
    })
}

impl Invalidation {
    /// Whether it does nothing.
    pub fn is_empty(&self) -> bool {
        self.bump.is_empty()
            && self.delete.is_empty()
            && self.tagged.is_empty()
            && self.matching.is_empty()
            && !self.everything
    }

    /// Whether it has the shape of an invalidation this service makes, within the keyspace
    /// under `prefix`: what another instance may ask of this one. Counters bumped are
    /// generation counters; keys deleted are entries; tag sets are tag sets; globs cover
    /// entries of one version, tag sets or fetch locks. Nothing else of the keyspace (the
    /// version, the marker, the registry, counters) can be deleted this way.
    pub fn is_within(&self, prefix: &str) -> bool {
        // `{` and `}`: the hash tags of a cluster keyspace.
        let key_byte = |b: u8| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':' | b'{' | b'}')
        };
        let rest = |k: &str, glob: bool| -> Option<String> {
            let ok = k.len() <= 1024
                && k.bytes()
                    .all(|b| key_byte(b) || (glob && matches!(b, b'*' | b'?')));
            ok.then(|| k.strip_prefix(prefix)?.strip_prefix(':').map(str::to_owned))
                .flatten()
        };
        let under = |k: &str, part: &str| rest(k, false).is_some_and(|r| r.starts_with(part));
        let entry = |r: &str| {
            r.split_once(':').is_some_and(|(version, logical)| {
                crate::domain::validate_version(version).is_ok() && !logical.is_empty()
            })
        };
        let glob_ok = |k: &String| {
            rest(k, true)
                .is_some_and(|r| entry(&r) || r.starts_with("_tags:") || r.starts_with("_lock:"))
        };
        self.bump.iter().all(|k| under(k, "_gen:"))
            && self
                .delete
                .iter()
                .all(|k| rest(k, false).is_some_and(|r| entry(&r)))
            && self.tagged.iter().all(|k| under(k, "_tags:"))
            && self.matching.iter().all(glob_ok)
    }

    /// Adds what `other` names: one invalidation standing for both (for a peer that missed
    /// several while a delivery to it was under way). Past `max` keys and globs it becomes
    /// "every entry", which covers anything it named.
    pub fn absorb(&mut self, other: &Invalidation, max: usize) {
        for (mine, theirs) in [
            (&mut self.bump, &other.bump),
            (&mut self.delete, &other.delete),
            (&mut self.tagged, &other.tagged),
            (&mut self.matching, &other.matching),
        ] {
            mine.extend(theirs.iter().cloned());
            mine.sort_unstable();
            mine.dedup();
        }
        self.everything |= other.everything;
        let size = self.bump.len() + self.delete.len() + self.tagged.len() + self.matching.len();
        if size > max {
            *self = Invalidation {
                everything: true,
                ..Invalidation::default()
            };
        }
    }

    /// Read from a journal written by an older version: a glob with a character class (the
    /// old overflow marker, `{prefix}:[^_]*`) means "every entry", which the memory tier's
    /// matcher could not express.
    pub fn normalised(mut self) -> Self {
        if self.matching.iter().any(|g| g.contains('[')) {
            self.matching.retain(|g| !g.contains('['));
            self.everything = true;
        }
        self
    }
}

/// A cache tier, or tiers behind one face. Keys are physical keys.
#[async_trait]
pub trait Store: Send + Sync {
    /// Where reads and writes go now.
    fn source(&self) -> Source;

    /// A fresh near-cache copy of `key`, without I/O (`None` unless a near cache holds one).
    fn peek(&self, _key: &str) -> Option<Arc<NearSlot>> {
        None
    }

    /// Counts a hit served from a near-cache copy (`lane`: by the hit lane).
    fn copy_served(&self, _lane: bool) {}

    /// The entry of `key` the memory tier may serve, without I/O, when reads go there now (no
    /// Redis, or its circuit open): what [`Store::get`] and [`Lookup::servable`] would find
    /// (`Some(None)`: none). `deps` builds the dependencies, called only if the counters must
    /// be read. `None` when reads go to Redis: only `get` can answer then.
    fn memory_servable(
        &self,
        _key: &str,
        _deps: &dyn Fn() -> Deps,
    ) -> Option<Option<memory::MemoryHit>> {
        None
    }

    /// Forgets the credential that a near-cache copy or memory-tier entry of `key`
    /// remembers as accepted (its acceptance was withdrawn).
    fn forget_validated(&self, _key: &str) {}

    /// Whether reads go to the memory tier now ([`Store::memory_servable`] may answer),
    /// without I/O: a cheap test before building what it needs.
    fn reads_memory(&self) -> bool {
        false
    }

    /// Reads `key` and the current stamp of `deps`.
    async fn get(&self, key: &str, deps: &Deps) -> Result<Lookup, StoreError>;

    /// The current stamp of `deps`, read before an origin fetch begins.
    async fn stamp(&self, deps: &Deps) -> Result<Stamp, StoreError>;

    /// Writes `entry` for `retention`, and adds it to each of its tag sets, unless anything
    /// it depends on moved since its stamp was read (or the stamp is of another tier):
    /// `Ok(false)` then.
    async fn put(
        &self,
        key: &str,
        entry: &CacheEntry,
        deps: &Deps,
        retention: Duration,
    ) -> Result<bool, StoreError>;

    /// Extends the life of `key` to `retention` from now without rewriting its value
    /// (`entry` is the entry as refreshed). Returns whether it existed.
    async fn touch(
        &self,
        key: &str,
        entry: &CacheEntry,
        retention: Duration,
    ) -> Result<bool, StoreError>;

    /// Applies `inv` everywhere it must be applied before it is acknowledged. Returns how
    /// many entries were dropped.
    async fn invalidate(&self, inv: &Invalidation) -> Result<u64, StoreError>;
}

/// What an attempt at the cross-instance fetch lock found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// Taken: release it afterwards.
    Taken,
    /// Another instance holds it.
    Held,
    /// No shared store is in use (Redis unusable): nobody else can hold it, nothing was sent.
    Unshared,
}

/// The cross-instance fetch lock (Redis `SET NX PX`); without Redis, nobody else can hold it.
#[async_trait]
pub trait FetchLock: Send + Sync {
    /// Takes `key` for `ttl` unless another instance holds it. An error means the attempt was
    /// sent and its outcome is unknown (a `SET NX` that timed out may still run): release it
    /// afterwards all the same.
    async fn try_lock(&self, key: &str, token: &str, ttl: Duration) -> Result<Lock, StoreError>;
    /// Releases `key` if it still holds `token`.
    async fn unlock(&self, key: &str, token: &str) -> Result<(), StoreError>;
}

/// What is shared between instances besides entries: the key version, and copies of entries
/// held in process.
#[async_trait]
pub trait Shared: Send + Sync {
    /// Reads a shared value (`Unavailable` unless Redis is in use).
    async fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Writes a shared value; with `only_if_absent` keeps an existing one. Returns whether it
    /// was written.
    async fn meta_set(
        &self,
        key: &str,
        value: &str,
        only_if_absent: bool,
    ) -> Result<bool, StoreError>;
    /// Reads `field` of the shared hash `key` (a lookup table; `Unavailable` unless Redis is
    /// in use).
    async fn lookup_get(&self, key: &str, field: &str) -> Result<Option<String>, StoreError>;
    /// Writes `field` of the shared hash `key`, which is dropped whole past `max` fields.
    async fn lookup_put(
        &self,
        key: &str,
        field: &str,
        value: &str,
        max: usize,
    ) -> Result<(), StoreError>;
    /// Deletes the keys matching `pattern` in Redis (cleanup of an old version).
    async fn purge(&self, pattern: &str) -> Result<u64, StoreError>;
    /// Counts the entries matching `pattern` in the tier in use (SCAN in batches on Redis).
    async fn count_matching(&self, pattern: &str) -> Result<u64, StoreError>;
    /// Empties every copy of entries held in process, here and on every other instance
    /// (near caches; this instance's memory tier).
    async fn flush_copies(&self);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(tier: Tier, incarnation: u64, counters: &[u64], clears: u64) -> Stamp {
        Stamp::new(Source { tier, incarnation }, counters.to_vec(), clears)
    }

    #[test]
    fn absorbing_names_both_and_overflows_to_everything() {
        let one = |k: &str| Invalidation {
            bump: vec![format!("g:{k}")],
            delete: vec![format!("e:{k}")],
            ..Invalidation::default()
        };
        let mut merged = one("1");
        merged.absorb(&one("2"), 10);
        merged.absorb(&one("1"), 10);
        assert_eq!(merged.bump, ["g:1", "g:2"]);
        assert_eq!(merged.delete, ["e:1", "e:2"]);
        assert!(!merged.everything);
        merged.absorb(&one("3"), 5);
        assert!(merged.everything && merged.bump.is_empty());
    }

    #[test]
    fn stamps_compare_only_within_one_source() {
        let redis = stamp(Tier::Redis, 0, &[0, 0], 0);
        assert!(redis.serves(&stamp(Tier::Redis, 0, &[0, 0], 5)));
        assert!(!redis.unchanged_at(&stamp(Tier::Redis, 0, &[0, 0], 5)));
        assert!(
            !redis.serves(&stamp(Tier::Memory, 0, &[0, 0], 0)),
            "another tier"
        );
        assert!(
            !redis.serves(&stamp(Tier::Redis, 1, &[0, 0], 0)),
            "a restarted redis"
        );
        assert!(!redis.serves(&stamp(Tier::Redis, 0, &[0, 1], 0)));
    }

    #[test]
    fn an_own_bump_advances_exactly_its_counter() {
        let deps = Keyspace::new("p").deps(
            "v1",
            crate::domain::View::new(0, "metrics"),
            &["run:1".into()],
            false,
        );
        let before = stamp(Tier::Redis, 0, &[3, 7], 1);
        let after = before.after_own_bumps(&deps, &["p:_gen:v1:run:1".into()]);
        assert_eq!(after, stamp(Tier::Redis, 0, &[3, 8], 1));
        assert_eq!(
            before.after_own_bumps(&deps, &["p:_gen:v1:run:2".into()]),
            before
        );
    }

    #[test]
    fn a_flight_covers_requests_that_saw_no_more_than_it() {
        let flight = stamp(Tier::Redis, 0, &[1, 4], 2);
        assert!(flight.covers(&stamp(Tier::Redis, 0, &[1, 4], 2)));
        assert!(flight.covers(&stamp(Tier::Redis, 0, &[0, 3], 2)));
        assert!(!flight.covers(&stamp(Tier::Redis, 0, &[1, 5], 2)));
        assert!(!flight.covers(&stamp(Tier::Redis, 0, &[1, 4], 3)));
        assert!(!flight.covers(&stamp(Tier::Memory, 0, &[1, 4], 2)));
    }

    #[test]
    fn old_journal_lines_still_read() {
        let read = |line: &str| {
            serde_json::from_str::<Invalidation>(line)
                .expect("parses")
                .normalised()
        };
        assert_eq!(read(r#"{"bump":["a"]}"#).bump, ["a"]);
        assert_eq!(read(r#"{"delete":["k"]}"#).delete, ["k"]);
        assert_eq!(read(r#"{"delete_tagged":"t"}"#).tagged, ["t"]);
        assert_eq!(read(r#"{"delete_matching":"p:v1:*"}"#).matching, ["p:v1:*"]);
        let overflow = read(r#"{"delete_matching":"p:[^_]*"}"#);
        assert!(overflow.everything && overflow.matching.is_empty());
        let batch = Invalidation {
            bump: vec!["g".into()],
            tagged: vec!["t".into()],
            ..Invalidation::default()
        };
        let line = serde_json::to_string(&batch).expect("serialises");
        assert_eq!(read(&line), batch);
    }

    #[test]
    fn a_peer_may_only_name_this_keyspace() {
        let ok = Invalidation {
            bump: vec!["p:_gen:v1:run:1".into()],
            delete: vec!["p:v1:model:metrics:1".into()],
            tagged: vec!["p:_tags:v1:run:1".into()],
            matching: vec!["p:v1:model:*".into(), "p:_lock:*".into()],
            everything: true,
        };
        assert!(ok.is_within("p"));
        for bad in [
            "q:v1:a",
            "pp:v1:a",
            "p",
            "p:v1:a b",
            "*",
            "p:_meta:version",
            "p:_gen:v1:run:1",
            "p:_instances",
        ] {
            let inv = Invalidation {
                delete: vec![bad.into()],
                ..Invalidation::default()
            };
            assert!(!inv.is_within("p"), "{bad}");
        }
        let glob_in_delete = Invalidation {
            delete: vec!["p:v1:*".into()],
            ..Invalidation::default()
        };
        assert!(!glob_in_delete.is_within("p"));
        for bad in ["p:*", "p:_meta:*", "p:_gen:*"] {
            let inv = Invalidation {
                matching: vec![bad.into()],
                ..Invalidation::default()
            };
            assert!(!inv.is_within("p"), "{bad}");
        }
        let meta_bump = Invalidation {
            bump: vec!["p:_meta:version".into()],
            ..Invalidation::default()
        };
        assert!(!meta_bump.is_within("p"));
        assert!(serde_json::from_str::<Invalidation>(r#"{"flush_all": true}"#).is_err());
    }
}

//! Redis first, memory when Redis is unusable.
//!
//! - [`circuit`]: opens on repeated failures, or at once when correctness needs it; only the
//!   probe closes it, at most one probe runs at a time, and it closes only once every
//!   operation journaled before Redis came back has been applied.
//! - [`journal`]: invalidations made while Redis is unusable, durable, replayed before Redis
//!   serves again; file I/O on a writer thread of its own.
//! - [`peers`]: the other instances, told directly of invalidations made during an outage.
//!
//! While the circuit is closed the memory tier holds nothing: entries are written to memory
//! only while it serves, and it is emptied (a new incarnation) when the circuit closes.

pub mod circuit;
pub mod journal;
pub mod peers;
mod recovery;
mod shared;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use self::circuit::{Circuit, CircuitOptions};
use self::journal::{Appended, Journal, durable};
use self::peers::Peers;
use super::memory::{MemoryHit, MemoryStore};
use super::redis::RedisStore;
use super::{
    CacheEntry, Deps, Fence, Invalidation, KeyVersion, Keyspace, Lookup, Source, Stamp, StoreError,
    Tier,
};
use crate::domain::policy::now_ms;
use crate::metrics::names;

/// Tuning of [`FallbackStore`].
#[derive(Debug, Clone)]
pub struct TieredOptions {
    /// Where the outage journal is kept (none: memory only).
    pub journal_path: Option<PathBuf>,
    /// Pending operations before the journal collapses into "invalidate everything".
    pub journal_max_ops: usize,
    /// When the circuit opens.
    pub circuit: CircuitOptions,
    /// Oldest entry served from memory while other instances are known.
    pub degraded_max_age: Duration,
}

/// Where an invalidation was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// To Redis (and so, for every instance, through it).
    Redis,
    /// To this instance's memory tier and its journal (Redis was unusable), and sent to the
    /// instances it knows.
    Journaled,
}

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Whether reads go to Redis afterwards.
    pub serving_redis: bool,
    /// Journaled operations it replayed to Redis.
    pub replayed: usize,
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
    /// Redis restarts noticed (a new `run_id` behind a new connection).
    pub redis_restarts: u64,
    /// Other instances known (for invalidations made while Redis is unreachable), whether
    /// or not `peers.allowed` lets this one tell them directly.
    pub known_instances: u64,
    /// Direct invalidations sent to other instances, by outcome.
    pub peer_sends: peers::PeerSends,
}

/// How `keys` in `/cache/stats` was obtained.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct KeyCount {
    /// Entries of the current version.
    pub keys: u64,
    /// `scan`: counted by a SCAN of Redis, at most once per 10 s whatever the number of
    /// callers (`age_ms` old); `memory`: counted now in the memory tier; `pending`: no SCAN
    /// of this version has finished yet (`keys` is 0 and means nothing).
    pub method: &'static str,
    /// Milliseconds since it was counted.
    pub age_ms: u64,
}

#[derive(Debug)]
struct Calls {
    redis_ops: AtomicU64,
    redis_errors: AtomicU64,
    memory_ops: AtomicU64,
    redis_ops_metric: metrics::Counter,
    redis_errors_metric: metrics::Counter,
    memory_ops_metric: metrics::Counter,
}

impl Calls {
    fn new() -> Self {
        Self {
            redis_ops: AtomicU64::new(0),
            redis_errors: AtomicU64::new(0),
            memory_ops: AtomicU64::new(0),
            redis_ops_metric: metrics::counter!(names::STORE_OPERATIONS_TOTAL, "tier" => "redis"),
            redis_errors_metric: metrics::counter!(names::STORE_ERRORS_TOTAL, "tier" => "redis"),
            memory_ops_metric: metrics::counter!(names::STORE_OPERATIONS_TOTAL, "tier" => "memory"),
        }
    }

    fn redis(&self) {
        self.redis_ops.fetch_add(1, Ordering::Relaxed);
        self.redis_ops_metric.increment(1);
    }

    fn redis_error(&self) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
        self.redis_errors_metric.increment(1);
    }

    fn memory(&self) {
        self.memory_ops.fetch_add(1, Ordering::Relaxed);
        self.memory_ops_metric.increment(1);
    }
}

/// The two tiers behind one face.
#[derive(Debug)]
pub struct FallbackStore {
    redis: RedisStore,
    memory: MemoryStore,
    keys: Keyspace,
    version: Arc<KeyVersion>,
    circuit: Circuit,
    journal: Journal,
    probing: tokio::sync::Mutex<()>,
    /// The Redis incarnation that may serve: recovered (or found empty) after a restart.
    accepted: AtomicU64,
    /// The incarnation a recovery was last prepared for (so it is prepared once).
    recovering: AtomicU64,
    restarts: AtomicU64,
    /// The incarnation whose marker and version were claimed after its recovery.
    claimed: AtomicU64,
    peers: Peers,
    degraded_max_age: Duration,
    /// The last SCAN count: version, entries, when.
    key_counted: std::sync::Mutex<Option<(String, u64, Instant)>>,
    counting: tokio::sync::Mutex<()>,
    calls: Calls,
    /// Invalidations begun on this instance (applied here, sent by a peer, or heard on the
    /// bus), counted before anything is applied: see [`Fence`].
    invalidations: AtomicU64,
    /// Whether the near-cache subscription is live: the other instances' invalidations then
    /// reach this one before they are acknowledged (on the bus, or sent directly to an
    /// instance that did not confirm).
    hears_others: AtomicBool,
}

impl FallbackStore {
    /// Both tiers; the circuit starts open until [`FallbackStore::probe`] finds Redis.
    /// `peers` are the other instances, told directly of invalidations during an outage.
    pub fn new(
        redis: RedisStore,
        memory: MemoryStore,
        keys: Keyspace,
        version: Arc<KeyVersion>,
        peers: Peers,
        opts: TieredOptions,
    ) -> Self {
        Self {
            redis,
            memory,
            keys,
            version,
            circuit: Circuit::new(opts.circuit),
            journal: Journal::open(opts.journal_path, opts.journal_max_ops),
            probing: tokio::sync::Mutex::new(()),
            accepted: AtomicU64::new(0),
            recovering: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            peers,
            degraded_max_age: opts.degraded_max_age,
            key_counted: std::sync::Mutex::new(None),
            counting: tokio::sync::Mutex::new(()),
            calls: Calls::new(),
            invalidations: AtomicU64::new(0),
            hears_others: AtomicBool::new(false),
        }
    }

    /// The Redis tier, for this layer's own connections (the near cache's bus).
    pub(crate) fn redis(&self) -> &RedisStore {
        &self.redis
    }

    /// The memory tier (snapshots).
    pub fn memory(&self) -> &MemoryStore {
        &self.memory
    }

    /// The other instances.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// The tier reads and writes go to now.
    pub fn tier(&self) -> Tier {
        if self.circuit.is_open() {
            Tier::Memory
        } else {
            Tier::Redis
        }
    }

    /// Where reads come from now, with the incarnation that may serve.
    pub fn source(&self) -> Source {
        if self.circuit.is_open() {
            self.memory.source()
        } else {
            Source {
                tier: Tier::Redis,
                incarnation: self.accepted.load(Ordering::Acquire),
            }
        }
    }

    /// Changes every time the circuit opens or closes: a near-cache copy read before the
    /// last change is never served (while Redis was unusable, invalidations may have missed
    /// it).
    pub fn serving_epoch(&self) -> u64 {
        self.circuit.transitions()
    }

    /// Operations and errors per tier.
    pub fn counts(&self) -> TierCounts {
        TierCounts {
            redis_operations: self.calls.redis_ops.load(Ordering::Relaxed),
            redis_errors: self.calls.redis_errors.load(Ordering::Relaxed),
            memory_operations: self.calls.memory_ops.load(Ordering::Relaxed),
            circuit_opened: self.circuit.openings(),
            redis_restarts: self.restarts.load(Ordering::Relaxed),
            known_instances: self.peers.count() as u64,
            peer_sends: self.peers.sends(),
        }
    }

    /// Store operations sent to Redis so far (tests watch this stay still while the circuit
    /// is open).
    pub fn redis_calls(&self) -> u64 {
        self.calls.redis_ops.load(Ordering::Relaxed)
    }

    /// Invalidations waiting for Redis.
    pub fn pending_invalidations(&self) -> usize {
        self.journal.len()
    }

    /// Where the journal is kept.
    pub fn journal_path(&self) -> Option<&std::path::Path> {
        self.journal.path()
    }

    /// Applies the journaled invalidations to the memory tier (after a snapshot load: the
    /// snapshot may predate them).
    pub fn replay_journal_into_memory(&self) {
        for op in self.journal.pending() {
            self.memory.apply(&op);
        }
    }

    /// The invalidation that stands for everything: every entry of every version deleted,
    /// and the counters that every stamp of the current version depends on bumped.
    fn everything(&self) -> Invalidation {
        let v = self.version.get();
        let mut bump: Vec<String> = self
            .keys
            .views()
            .iter()
            .map(|&view| self.keys.view_gen(&v, view))
            .collect();
        bump.push(self.keys.learned(&v));
        bump.push(self.keys.clears(&v));
        Invalidation {
            bump,
            everything: true,
            ..Invalidation::default()
        }
    }

    /// A Redis command failed; returns whether the circuit is open now. A failure that
    /// proves Redis gone (a refused connection) opens it at once: every request meanwhile
    /// would otherwise go to the origin and store nothing.
    fn redis_failed(&self, e: &StoreError) -> bool {
        if e.is_unavailable() {
            self.calls.redis_error();
            if e.proves_down() {
                self.circuit.open(&e.to_string());
            } else {
                self.circuit.failure(&e.to_string());
            }
        }
        self.circuit.is_open()
    }

    /// What a stamp about to be read from Redis is fenced with (see [`Fence`]): read before
    /// the Redis read, so that an invalidation racing it counts as after it. None while other
    /// instances are known and this one does not hear their invalidations (no near-cache
    /// subscription, `l1.enabled = false` among them): one they make through Redis would
    /// reach it by no path, and an answer fetched across it must not outlive Redis.
    fn fence(&self) -> Option<Fence> {
        if self.peers.any() && !self.hears_others.load(Ordering::Acquire) {
            return None;
        }
        Some(Fence {
            invalidations: self.invalidations.load(Ordering::Acquire),
            memory: self.memory.source().incarnation,
        })
    }

    /// Records whether the near-cache subscription is live (see `fence`).
    pub fn hearing(&self, live: bool) {
        self.hears_others.store(live, Ordering::Release);
    }

    /// An answer fetched under a Redis stamp that Redis cannot take (its write failed, or the
    /// circuit opened during the fetch) goes to the memory tier instead when that is as safe
    /// as a write there under a memory stamp:
    /// - the circuit is open, so every later invalidation reaches the memory tier until the
    ///   probe empties it on closing;
    /// - the memory tier was not emptied since the stamp was read (so the circuit did not
    ///   close in between);
    /// - no invalidation at all began on this instance since the stamp was read: one applied
    ///   to Redis alone, which the memory tier never saw, could concern it.
    ///
    /// All three are checked under the memory tier's write lock, and the entry is stamped
    /// there with its current counters; its age still counts from the Redis stamp, so the
    /// degraded bound (`memory.degraded_max_age_ms`) holds it as any other.
    fn keep_in_memory(
        &self,
        key: &str,
        entry: &CacheEntry,
        deps: &Deps,
        retention: Duration,
    ) -> bool {
        let Some(fence) = entry.stamp.fence() else {
            return false;
        };
        if entry.stamp.source().tier != Tier::Redis {
            return false;
        }
        let kept = self
            .memory
            .put_fenced(key, entry, deps, retention, fence.memory, || {
                self.circuit.is_open()
                    && self.invalidations.load(Ordering::Acquire) == fence.invalidations
            });
        if kept {
            self.calls.memory();
        }
        kept
    }

    /// Drops entries whose data is older than `memory.degraded_max_age_ms` while serving from
    /// memory with other instances known: an invalidation they could not send is late by at
    /// most that. Age counts from when the entry's stamp was read, before its fetch began.
    /// Until this process has read the registry, a snapshot written while others were known
    /// holds every entry to the bound (those instances may still be there, telling the old
    /// address).
    fn degraded(&self, mut lookup: Lookup) -> Lookup {
        lookup.entry = lookup.entry.filter(|e| self.young_enough(e));
        lookup
    }

    /// Whether the memory tier may serve `entry` for its age (see [`Self::degraded`]).
    fn young_enough(&self, entry: &CacheEntry) -> bool {
        let bounded = self.peers.any() || (!self.peers.ever_read() && self.peers.assumed());
        if !bounded {
            return true;
        }
        let max_age = u64::try_from(self.degraded_max_age.as_millis()).unwrap_or(u64::MAX);
        now_ms().saturating_sub(entry.stamp.read_at_ms()) <= max_age
    }

    /// Whether reads go to the memory tier now (the circuit is open).
    pub fn reads_memory(&self) -> bool {
        self.circuit.is_open()
    }

    /// The entry of `key` the memory tier may serve now, when it is the tier in use (the
    /// circuit is open), as [`Self::get`] and [`Lookup::servable`] would find it; `deps`
    /// builds its dependencies, if they must be read. `None` when reads go to Redis.
    pub fn memory_servable(
        &self,
        key: &str,
        deps: impl FnOnce() -> Deps,
    ) -> Option<Option<MemoryHit>> {
        if !self.reads_memory() {
            return None;
        }
        self.calls.memory();
        Some(
            self.memory
                .servable(key, deps)
                .filter(|hit| self.young_enough(hit.entry())),
        )
    }

    /// Forgets the credential the memory tier's entry of `key` remembers as accepted.
    pub fn forget_validated(&self, key: &str) {
        self.memory.forget_validated(key);
    }

    /// Reads `key` and the current stamp of `deps` from the tier in use.
    pub async fn get(&self, key: &str, deps: &Deps) -> Result<Lookup, StoreError> {
        let fence = self.fence();
        // Boxed once: the Redis read's future is large, and each await below would copy it.
        let read = Box::pin(self.redis.get(key, deps));
        if let Some(mut l) = self.read_redis(read, |l| l.current.source()).await? {
            if let Some(fence) = fence {
                l.current = l.current.fenced(fence);
            }
            return Ok(l);
        }
        self.calls.memory();
        Ok(self.degraded(self.memory.get(key, deps)))
    }

    /// The current stamp of `deps` in the tier in use.
    pub async fn stamp(&self, deps: &Deps) -> Result<Stamp, StoreError> {
        let fence = self.fence();
        if let Some(s) = self
            .read_redis(self.redis.stamp(deps), Stamp::source)
            .await?
        {
            return Ok(match fence {
                Some(fence) => s.fenced(fence),
                None => s,
            });
        }
        self.calls.memory();
        Ok(self.memory.stamp(deps))
    }

    /// A read from Redis while the circuit is closed: `Some` when Redis answered from an
    /// incarnation that may serve, `None` when the memory tier must answer instead (circuit
    /// open, a failure that opened it, or a restarted Redis not yet made safe), `Err` for a
    /// failure that leaves the circuit closed. `read` is not polled when the circuit is open.
    async fn read_redis<T>(
        &self,
        read: impl Future<Output = Result<T, StoreError>>,
        source: impl Fn(&T) -> Source,
    ) -> Result<Option<T>, StoreError> {
        if self.circuit.is_open() {
            return Ok(None);
        }
        self.calls.redis();
        match read.await {
            Ok(t) if self.usable(source(&t).incarnation) => {
                self.circuit.success();
                Ok(Some(t))
            }
            Ok(_) => Ok(None),
            Err(e) if self.redis_failed(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `entry` into the tier its stamp was read from, if that tier still serves and
    /// nothing it depends on moved. An answer fetched under a Redis stamp that Redis cannot
    /// take goes to the memory tier instead, when that is safe (see `keep_in_memory`).
    pub async fn put(
        &self,
        key: &str,
        entry: &CacheEntry,
        deps: &Deps,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        if entry.stamp.source() != self.source() {
            return Ok(self.keep_in_memory(key, entry, deps, retention));
        }
        match entry.stamp.source().tier {
            Tier::Redis => {
                self.calls.redis();
                match self.redis.put(key, entry, deps, retention).await {
                    Ok(stored) => {
                        self.circuit.success();
                        Ok(stored)
                    }
                    Err(e) => {
                        if self.redis_failed(&e) && self.keep_in_memory(key, entry, deps, retention)
                        {
                            return Ok(true);
                        }
                        Err(e)
                    }
                }
            }
            Tier::Memory => {
                self.calls.memory();
                Ok(self.memory.put(key, entry, deps, retention))
            }
        }
    }

    /// Extends the life of `key` in the tier `entry` was read from.
    pub async fn touch(
        &self,
        key: &str,
        entry: &CacheEntry,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        if entry.stamp.source() != self.source() {
            return Ok(false);
        }
        match entry.stamp.source().tier {
            Tier::Redis => {
                self.calls.redis();
                self.redis
                    .touch(key, entry.fresh_until_ms(), retention)
                    .await
                    .inspect_err(|e| {
                        self.redis_failed(e);
                    })
            }
            Tier::Memory => {
                self.calls.memory();
                Ok(self.memory.touch(key, entry, retention))
            }
        }
    }

    /// Applies `inv` to Redis, or, while Redis is unusable, to the memory tier, the journal
    /// (durably) and every other instance known. An invalidation that cannot reach Redis
    /// opens the circuit at once: Redis must not serve before it has been applied there.
    pub async fn invalidate(&self, inv: &Invalidation) -> Result<(u64, Applied), StoreError> {
        self.apply(inv, true).await
    }

    /// An invalidation another instance applied to Redis, heard on the bus: while this one
    /// serves from memory, its memory tier drops what it names too.
    pub fn heard(&self, inv: &Invalidation) {
        // Counted whatever the circuit says: an answer fetched before it must not go to the
        // memory tier (see `keep_in_memory`).
        self.invalidations.fetch_add(1, Ordering::AcqRel);
        if self.circuit.is_open() {
            self.memory.apply(inv);
        }
    }

    /// Applies an invalidation another instance made while it could not reach Redis: as
    /// [`FallbackStore::invalidate`], but without telling the others again. Journaled here
    /// too when Redis is unusable from here: this instance must not serve from Redis again
    /// before the invalidation is there, whenever the sender gets to replay its own journal.
    pub async fn apply_from_peer(&self, inv: &Invalidation) -> Result<(u64, Applied), StoreError> {
        self.apply(inv, false).await
    }

    async fn apply(&self, inv: &Invalidation, tell: bool) -> Result<(u64, Applied), StoreError> {
        // Before anything is applied: see `keep_in_memory`.
        self.invalidations.fetch_add(1, Ordering::AcqRel);
        for _ in 0..3 {
            if !self.circuit.is_open() {
                self.calls.redis();
                match self.redis.apply(inv).await {
                    Ok((n, replicated)) => {
                        self.circuit.success();
                        if !replicated && tell {
                            // It may be lost in a failover, while other instances already
                            // read from the new master: they hear of it directly.
                            self.peers.tell(inv).await;
                        }
                        return Ok((n, Applied::Redis));
                    }
                    Err(e) if e.is_unavailable() => {
                        self.calls.redis_error();
                        tracing::warn!(error = %e, "an invalidation could not reach redis");
                        self.circuit.open("an invalidation could not reach redis");
                    }
                    Err(e) => return Err(e),
                }
            }
            let appended =
                self.journal
                    .append_if(inv, || self.circuit.is_open(), || self.everything());
            let Appended::Queued(written) = appended else {
                // The probe closed the circuit meanwhile: Redis again.
                continue;
            };
            self.calls.memory();
            let dropped = self.memory.apply(inv);
            let told = async {
                if tell {
                    self.peers.tell(inv).await;
                }
            };
            let (_, written) = tokio::join!(told, durable(written));
            if let Err(e) = written {
                tracing::error!(error = %e, "the invalidation is journaled in memory only");
            }
            return Ok((dropped, Applied::Journaled));
        }
        Err(StoreError::Unavailable(
            "redis kept flapping during an invalidation".into(),
        ))
    }
}

fn unreachable_redis() -> StoreError {
    StoreError::Unavailable("redis is unreachable".into())
}

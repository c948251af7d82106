//! Recovery: the probe that brings the circuit back to Redis (one at a time, closing only
//! once the journal is replayed), and what a restarted Redis must get before it serves.
//!
//! A Redis that came back empty is taken at once: nothing stale can be in it, and no stamp of
//! the process before it validates anything in it. One that came back from a snapshot (or a
//! replica promoted in its place) holds entries and counters from before invalidations it had
//! applied, and which of them it lost cannot be known: every entry is invalidated (and the
//! fetch locks that came back with nobody holding them purged) before it serves, the keyspace
//! marker is claimed for the new process, and the key version this instance uses is written
//! back. A cold cache is safe; a revived entry is not.

use std::sync::atomic::Ordering;

use super::{FallbackStore, Probe};
use crate::store::Invalidation;
use crate::store::redis::link::Restart;

impl FallbackStore {
    /// Whether a reply from Redis incarnation `incarnation` may be used: the one accepted, or
    /// a Redis restarted empty. A restored one opens the circuit, and the probe recovers it.
    pub(super) fn usable(&self, incarnation: u64) -> bool {
        if incarnation == self.accepted.load(Ordering::Acquire) {
            return true;
        }
        match self.redis.last_restart() {
            Some((inc, Restart::Empty)) if inc == incarnation && self.journal.is_empty() => {
                if self.accepted.swap(incarnation, Ordering::AcqRel) != incarnation {
                    self.restarts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("redis came back empty; serving from it");
                }
                true
            }
            _ => {
                self.prepare_recovery(incarnation);
                self.circuit.open("redis restarted");
                false
            }
        }
    }

    /// Puts the recovery of a Redis restored from a snapshot in front of the journal, once per
    /// incarnation.
    pub(super) fn prepare_recovery(&self, incarnation: u64) {
        if incarnation == self.accepted.load(Ordering::Acquire)
            || self.recovering.swap(incarnation, Ordering::AcqRel) == incarnation
        {
            return;
        }
        self.restarts.fetch_add(1, Ordering::Relaxed);
        let restored =
            !matches!(self.redis.last_restart(), Some((inc, Restart::Empty)) if inc == incarnation);
        if !restored {
            return;
        }
        tracing::warn!(
            "redis came back from a snapshot: invalidating every entry before it serves"
        );
        let locks = Invalidation {
            matching: vec![self.keys.lock_pattern()],
            ..Invalidation::default()
        };
        self.journal.prepend(vec![locks, self.everything()]);
    }

    /// Once a restored Redis has been recovered: the marker names the new process (so no
    /// other instance takes it for a snapshot again), and the version is this instance's if
    /// it knew the shared one (the snapshot may predate a switch). A process that has only
    /// its configured starting value leaves the restored one alone.
    async fn claim(&self, incarnation: u64) -> Result<(), crate::store::StoreError> {
        if self.recovering.load(Ordering::Acquire) != incarnation
            || self.claimed.swap(incarnation, Ordering::AcqRel) == incarnation
        {
            return Ok(());
        }
        let claimed = async {
            self.redis.claim_marker(incarnation).await?;
            if self.version.is_shared() {
                self.redis
                    .set_string(&self.keys.version_key(), &self.version.get(), false)
                    .await?;
            }
            Ok(())
        };
        let result = claimed.await;
        if result.is_err() {
            self.claimed.store(0, Ordering::Release);
        }
        result
    }

    /// Checks Redis while the circuit is open (at most one probe at a time); when it answers,
    /// replays the journal and closes the circuit once nothing is pending, emptying the memory
    /// tier (its entries never saw other instances' invalidations). A replay that fails keeps
    /// the circuit open.
    pub async fn probe(&self) -> Probe {
        let Ok(_only_one) = self.probing.try_lock() else {
            return Probe {
                serving_redis: !self.circuit.is_open(),
                replayed: 0,
            };
        };
        let mut replayed = 0;
        if !self.circuit.is_open() {
            return Probe {
                serving_redis: true,
                replayed,
            };
        }
        if self.redis.ping().await.is_err() {
            return Probe {
                serving_redis: false,
                replayed,
            };
        }
        loop {
            let incarnation = self.redis.source().incarnation;
            self.prepare_recovery(incarnation);
            let ops = self.journal.take();
            if ops.is_empty() {
                if let Err(e) = self.claim(incarnation).await {
                    tracing::warn!(error = %e, "cannot claim the restarted redis; the circuit stays open");
                    return Probe {
                        serving_redis: false,
                        replayed,
                    };
                }
                let closed = self.journal.close_if_empty(|| {
                    if self.redis.source().incarnation != incarnation {
                        return false;
                    }
                    self.memory.clear();
                    self.accepted.store(incarnation, Ordering::Release);
                    self.circuit.close();
                    true
                });
                if closed {
                    tracing::info!("redis reachable; serving from redis");
                    return Probe {
                        serving_redis: true,
                        replayed,
                    };
                }
                if self.redis.ping().await.is_err() {
                    return Probe {
                        serving_redis: false,
                        replayed,
                    };
                }
                continue;
            }
            let count = ops.len();
            for (i, op) in ops.iter().enumerate() {
                if let Err(e) = self.redis.apply(op).await {
                    self.journal.prepend(ops[i..].to_vec());
                    tracing::warn!(error = %e, "replaying invalidations to redis failed; the circuit stays open");
                    return Probe {
                        serving_redis: false,
                        replayed,
                    };
                }
                replayed += 1;
            }
            self.journal.compact();
            tracing::info!(
                count,
                "replayed invalidations made while redis was unusable"
            );
        }
    }
}

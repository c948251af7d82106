//! Recovery: the probe that brings the circuit back to Redis (one at a time, closing only
//! once the journal is replayed), and what a restarted Redis must get again before it serves.

use std::sync::atomic::Ordering;

use super::{FallbackStore, Probe};
use crate::store::Invalidation;
use crate::store::redis::link::Restart;

impl FallbackStore {
    /// Whether a reply from Redis incarnation `incarnation` may be used. A Redis restarted
    /// empty is taken at once (nothing stale can be in it, and no stamp of the old one
    /// validates in it); one restored from a snapshot first gets the recent invalidations
    /// again (the circuit opens, and the probe replays them).
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

    /// Puts what a Redis restored from a snapshot may have lost in front of the journal,
    /// once per incarnation.
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
        // Fetch locks came back too, with nobody holding them: waiters would poll them out.
        let locks = Invalidation {
            matching: vec![self.keys.lock_pattern()],
            ..Invalidation::default()
        };
        let mut ops = match self.recent.replay() {
            Some(ops) => {
                tracing::warn!(
                    count = ops.len(),
                    "redis came back from a snapshot; replaying the invalidations of redis.rollback_window_secs before it serves"
                );
                ops
            }
            None => {
                tracing::warn!(
                    "redis came back from a snapshot older than this instance can vouch for; invalidating every entry before it serves"
                );
                vec![self.everything()]
            }
        };
        ops.insert(0, locks);
        self.journal.prepend(ops);
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
                self.recent.push(op);
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

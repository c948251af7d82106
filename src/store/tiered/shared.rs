//! What the tiered store shares with other instances or admin work, besides entries: the
//! instance registry, the key version, fetch locks, and the figures of `/cache/stats`.

use std::time::{Duration, Instant};

use super::peers::{MAX_MEMBERS, SEEN_WINDOW};
use super::{FallbackStore, KeyCount, unreachable_redis};
use crate::store::redis::RedisInfo;
use crate::store::{Lock, StoreError};

impl FallbackStore {
    /// While Redis serves: registers this instance and reads who else is there.
    pub async fn heartbeat(&self) {
        if self.circuit.is_open() {
            return;
        }
        // A marker that went (evicted, deleted) is written again within a heartbeat, so that
        // a snapshot taken later does not come back looking empty.
        // Sentinel mode: a master demoted without the watcher hearing of it is left.
        self.redis.check_master().await;
        if let Err(e) = self.redis.keep_marker().await {
            tracing::debug!(error = %e, "could not keep the keyspace marker");
        }
        let Some(member) = self.peers.member() else {
            return;
        };
        match self
            .redis
            .heartbeat(&member, SEEN_WINDOW, MAX_MEMBERS)
            .await
        {
            Ok(others) => self.peers.set_members(others),
            Err(e) => tracing::debug!(error = %e, "instance registration failed"),
        }
    }

    /// Removes this instance from the registry (a graceful stop; the heartbeat has stopped):
    /// the others stop telling it once their last read of it is `SEEN_WINDOW` old, instead of
    /// after it ages out of the registry too.
    /// Never touches the circuit: a Redis that is down has nothing to forget, and the
    /// member ages out of the registry by itself.
    pub async fn leave(&self) {
        let Some(member) = self.peers.member() else {
            return;
        };
        if self.circuit.is_open() {
            return;
        }
        if let Err(e) = self.redis.leave(&member).await {
            tracing::debug!(error = %e, "could not leave the instance registry");
        }
    }

    /// Reads a shared value from Redis.
    pub async fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.on_redis(self.redis.get_string(key)).await
    }

    /// Writes a shared value to Redis.
    pub async fn meta_set(
        &self,
        key: &str,
        value: &str,
        only_if_absent: bool,
    ) -> Result<bool, StoreError> {
        self.on_redis(self.redis.set_string(key, value, only_if_absent))
            .await
    }

    /// Reads a field of a shared hash (a lookup table) from Redis.
    pub async fn lookup_get(&self, key: &str, field: &str) -> Result<Option<String>, StoreError> {
        self.on_redis(self.redis.hash_get(key, field)).await
    }

    /// Writes a field of a shared hash (a lookup table) to Redis, bounded at `max` fields.
    pub async fn lookup_put(
        &self,
        key: &str,
        field: &str,
        value: &str,
        max: usize,
    ) -> Result<(), StoreError> {
        self.on_redis(self.redis.hash_put_bounded(key, field, value, max))
            .await
    }

    /// Deletes what matches `pattern` in Redis (background cleanup; never touches the
    /// circuit).
    pub async fn purge(&self, pattern: &str) -> Result<u64, StoreError> {
        if self.circuit.is_open() {
            return Err(unreachable_redis());
        }
        self.redis.delete_matching(pattern).await
    }

    /// Counts the entries matching `pattern` in the tier in use (never touches the circuit).
    pub async fn count_matching(&self, pattern: &str) -> Result<u64, StoreError> {
        if self.circuit.is_open() {
            return Ok(self.memory.count_matching(pattern));
        }
        self.redis.count_matching(pattern).await
    }

    /// Takes the cross-instance fetch lock (see [`crate::store::FetchLock`]).
    pub async fn try_lock(
        &self,
        key: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<Lock, StoreError> {
        if self.circuit.is_open() {
            return Ok(Lock::Unshared);
        }
        let taken = self.on_redis(self.redis.try_lock(key, token, ttl)).await?;
        Ok(if taken { Lock::Taken } else { Lock::Held })
    }

    /// Releases the fetch lock. Sent whatever the circuit says, and never counted against
    /// it: a `SET NX` that timed out while Redis hung still runs once it resumes, and only a
    /// release sent after it frees the entry for the other instances.
    pub async fn unlock(&self, key: &str, token: &str) -> Result<(), StoreError> {
        self.redis.unlock(key, token).await
    }

    async fn on_redis<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if self.circuit.is_open() {
            return Err(unreachable_redis());
        }
        self.calls.redis();
        let result = call.await;
        match &result {
            // A restarted Redis that has not been made safe: its answer is not used (the
            // version it holds may predate a switch). A write has already run; what it wrote
            // (a lock, a version set only if absent) is harmless, and locks are purged by the
            // recovery.
            Ok(_) if !self.usable(self.redis.source().incarnation) => {
                return Err(StoreError::Unavailable(
                    "redis restarted; recovering".into(),
                ));
            }
            Ok(_) => self.circuit.success(),
            Err(e) => {
                self.redis_failed(e);
            }
        }
        result
    }

    /// Entries of `version` in the tier in use. On Redis the count comes from one SCAN at a
    /// time, at most every 10 s: admin calls never scan the keyspace per call, and never
    /// touch the request path's circuit.
    pub async fn key_count(&self, version: &str) -> KeyCount {
        let pattern = self.keys.entry_pattern(version, "*");
        if self.circuit.is_open() {
            return KeyCount {
                keys: self.memory.count_matching(&pattern),
                method: "memory",
                age_ms: 0,
            };
        }
        // A count of another version (before a switch) says nothing about this one.
        let last = || {
            self.key_counted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .filter(|(v, _, _)| v == version)
                .map(|&(_, n, at)| (n, at))
        };
        let cached = |c: Option<(u64, Instant)>| match c {
            Some((keys, at)) => KeyCount {
                keys,
                method: "scan",
                age_ms: at.elapsed().as_millis() as u64,
            },
            None => KeyCount {
                keys: 0,
                method: "pending",
                age_ms: 0,
            },
        };
        if let Some((_, at)) = last()
            && at.elapsed() < Duration::from_secs(10)
        {
            return cached(last());
        }
        let Ok(_counting) = self.counting.try_lock() else {
            // Another caller is counting: this one gets the last figure.
            return cached(last());
        };
        if let Ok(n) = self.redis.count_matching(&pattern).await {
            *self.key_counted.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((version.to_owned(), n, Instant::now()));
        }
        cached(last())
    }

    /// Redis `INFO` figures (through the admin pool), while Redis is in use.
    pub async fn info(&self) -> Option<RedisInfo> {
        if self.circuit.is_open() {
            return None;
        }
        self.redis.info().await.ok()
    }

    /// Whether Redis answers now (for `/ready`; never touches the circuit).
    pub async fn redis_reachable(&self) -> bool {
        self.redis.ping().await.is_ok()
    }
}

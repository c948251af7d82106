//! Entries on Redis: the read of an entry with its counters, the conditional write, and the
//! application of an invalidation (counters first, then deletes).

use std::time::Duration;

use bytes::Bytes;

use super::link::{classify, is_connection_error};
use super::{RedisStore, counter_of};
use crate::domain::policy::now_ms;
use crate::store::{CacheEntry, Deps, Invalidation, Lookup, Stamp, StoreError};

/// Writes an entry only if the counters it depends on, and the clear sequence, still hold
/// the values its stamp read. KEYS: the entry, the `n` counters, the clear sequence, then the
/// tag sets. ARGV: `n`, the `n` expected values, the expected sequence, the encoded entry, its
/// life in ms, the tag sets' life in seconds. A tag set lives as long as its longest-lived
/// member: NX gives a new set a TTL, GT extends an existing one (GT alone treats "no TTL" as
/// infinite).
const PUT: &str = r"
local n = tonumber(ARGV[1])
for i = 1, n + 1 do
  local v = tonumber(redis.call('GET', KEYS[1 + i])) or 0
  if v ~= tonumber(ARGV[1 + i]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[n + 3], 'PX', ARGV[n + 4])
for i = n + 3, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  redis.call('EXPIRE', KEYS[i], ARGV[n + 5], 'NX')
  redis.call('EXPIRE', KEYS[i], ARGV[n + 5], 'GT')
end
return 1
";

impl RedisStore {
    /// Reads an entry and the current stamp of `deps` in one round trip. The entry's store
    /// time is taken from the key's remaining life, so an entry whose life an unchanged
    /// refresh extended (without rewriting it) counts as fresh again.
    pub async fn get(&self, key: &str, deps: &Deps) -> Result<Lookup, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
        for dep in deps.counters() {
            pipe.cmd("GET").arg(dep);
        }
        pipe.cmd("GET").arg(deps.clears_key());
        let (replies, source): (Vec<redis::Value>, _) = self.run_pipe(pipe).await?;
        let [raw, pttl, counters @ .., clears] = replies.as_slice() else {
            return Err(StoreError::Command("short pipeline reply".into()));
        };
        let parse_err = |e: redis::ParsingError| StoreError::Command(e.to_string());
        let raw: Option<Vec<u8>> = redis::from_redis_value_ref(raw).map_err(parse_err)?;
        let pttl: i64 = redis::from_redis_value_ref(pttl).map_err(parse_err)?;
        let current = Stamp::new(
            source,
            counters.iter().map(counter_of).collect(),
            counter_of(clears),
        );
        // A value that does not decode is no entry: the next fetch overwrites it.
        let mut entry = raw.and_then(|r| match CacheEntry::decode(Bytes::from(r), source) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(key, error = %e, "ignoring an undecodable entry");
                None
            }
        });
        if let (Some(e), Ok(left_ms)) = (entry.as_mut(), u64::try_from(pttl)) {
            let fresh_left = left_ms.saturating_sub(e.stale_ms);
            e.stored_at_ms = (now_ms() + fresh_left)
                .saturating_sub(e.ttl_secs.saturating_mul(1000))
                .max(e.stored_at_ms);
        }
        Ok(Lookup { entry, current })
    }

    /// The current stamp of `deps`.
    pub async fn stamp(&self, deps: &Deps) -> Result<Stamp, StoreError> {
        let mut pipe = redis::pipe();
        for dep in deps.counters() {
            pipe.cmd("GET").arg(dep);
        }
        pipe.cmd("GET").arg(deps.clears_key());
        let (replies, source): (Vec<redis::Value>, _) = self.run_pipe(pipe).await?;
        let Some((clears, counters)) = replies.split_last() else {
            return Err(StoreError::Command("short pipeline reply".into()));
        };
        Ok(Stamp::new(
            source,
            counters.iter().map(counter_of).collect(),
            counter_of(clears),
        ))
    }

    /// Writes `entry` unless its stamp is of another incarnation or anything it depends on
    /// moved (atomically, in one script). Returns whether it was written.
    pub async fn put(
        &self,
        key: &str,
        entry: &CacheEntry,
        deps: &Deps,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let stamp = &entry.stamp;
        if stamp.counters().len() != deps.counters().len() {
            return Ok(false);
        }
        // Sent whole (`EVAL`): one round trip whatever Redis's script cache holds.
        let mut call = redis::cmd("EVAL");
        call.arg(PUT)
            .arg(2 + deps.counters().len() + entry.tags.len())
            .arg(key)
            .arg(deps.counters())
            .arg(deps.clears_key())
            .arg(&entry.tags)
            .arg(stamp.counters().len())
            .arg(stamp.counters())
            .arg(stamp.clears())
            .arg(entry.encode().as_ref())
            .arg(retention.as_millis().max(1) as u64)
            .arg(retention.as_secs().max(1));
        let conn = self.link.conn().await?;
        // A stamp read from an earlier incarnation of Redis says nothing about this one.
        if Self::source_of(&conn) != stamp.source() {
            return Ok(false);
        }
        let mut c = conn.conn.clone();
        match tokio::time::timeout(self.timeout, call.query_async::<i64>(&mut c)).await {
            Ok(Ok(stored)) => Ok(stored == 1),
            Ok(Err(e)) => {
                if is_connection_error(&e) {
                    self.link.broken(&conn);
                }
                Err(classify(e))
            }
            Err(_) => Err(StoreError::Unavailable("redis write timed out".into())),
        }
    }

    /// Extends the life of `key`; returns whether it existed.
    pub async fn touch(&self, key: &str, retention: Duration) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("PEXPIRE");
        cmd.arg(key).arg(retention.as_millis().max(1) as u64);
        let existed: i64 = self.run(cmd).await?;
        Ok(existed == 1)
    }

    /// Applies `inv`: counters first (one pipeline), then the deletes. Returns entries
    /// dropped, and whether the counters are known to have reached a replica (always `true`
    /// outside sentinel mode, where there is no failover to lose them in).
    pub async fn apply(&self, inv: &Invalidation) -> Result<(u64, bool), StoreError> {
        let mut replicated = true;
        if !inv.bump.is_empty() {
            let mut pipe = redis::pipe();
            for counter in &inv.bump {
                pipe.cmd("INCR").arg(counter).ignore();
                pipe.cmd("EXPIRE")
                    .arg(counter)
                    .arg(self.gen_ttl_secs)
                    .ignore();
            }
            if self.sentinels.is_some() {
                replicated = self.bump_replicated(pipe).await?;
            } else {
                self.run_pipe::<()>(pipe).await?;
            }
        }
        let mut dropped = self.unlink_each(&inv.delete).await?;
        for tag in &inv.tagged {
            dropped += self.delete_tagged(tag).await?;
        }
        for pattern in &inv.matching {
            dropped += self.delete_matching(pattern).await?;
        }
        if inv.everything {
            let keys = self.keys.clone();
            dropped += self
                .scan_batches(&keys.everything_pattern(), |batch| {
                    let keys = keys.clone();
                    async move {
                        let entries: Vec<String> =
                            batch.into_iter().filter(|k| keys.is_entry(k)).collect();
                        self.unlink_each(&entries).await
                    }
                })
                .await?;
        }
        Ok((dropped, replicated))
    }

    /// Sentinel mode: runs the counter bumps, then `WAIT 1`, on a connection of their own
    /// (`WAIT` counts the writes of its connection, and would hold up whatever is multiplexed
    /// behind it). A master that no replica confirms within the command time-out may be the
    /// old master of a failover, still taking writes that the new one will never see: the
    /// caller then tells the other instances directly. With no admin connection free, the
    /// bumps go over the request path's connection and count as unconfirmed.
    async fn bump_replicated(&self, pipe: redis::Pipeline) -> Result<bool, StoreError> {
        let Ok(mut conn) = self.admin_conn().await else {
            self.run_pipe::<()>(pipe).await?;
            return Ok(false);
        };
        let wait_ms = u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let work = async {
            pipe.query_async::<()>(&mut *conn).await?;
            redis::cmd("WAIT")
                .arg(1)
                .arg(wait_ms)
                .query_async::<i64>(&mut *conn)
                .await
        };
        match tokio::time::timeout(self.timeout * 2 + self.timeout, work).await {
            Ok(Ok(replicas)) => Ok(replicas >= 1),
            Ok(Err(e)) => Err(classify(e)),
            Err(_) => Err(StoreError::Unavailable(
                "redis invalidation timed out".into(),
            )),
        }
    }

    async fn delete_tagged(&self, tag: &str) -> Result<u64, StoreError> {
        // SPOP removes members atomically, so a member added while we work stays tagged
        // for the next invalidation instead of being dropped with the set.
        let mut deleted = 0;
        loop {
            let mut cmd = redis::cmd("SPOP");
            cmd.arg(tag).arg(self.scan_batch);
            let members: Vec<String> = self.run(cmd).await?;
            if members.is_empty() {
                return Ok(deleted);
            }
            deleted += self.unlink_each(&members).await?;
        }
    }
}

//! Entries on Redis: the read of an entry with its counters, the conditional write, and the
//! application of an invalidation (counters first, then deletes).

use std::time::Duration;

use bytes::Bytes;

use super::cluster::Handle;
use super::link::{classify, is_connection_error};
use super::{RedisStore, counter_of};
use crate::store::keyspace::hash_part;
use crate::store::{CacheEntry, Deps, Invalidation, Lookup, Source, Stamp, StoreError};

/// Writes an entry only if the counters it is checked against still hold the values its
/// stamp read. KEYS: the entry, the `n` checked counters, then the tag sets. ARGV: `n`, the `n`
/// expected values, the encoded entry, its life in ms, the tag sets' life in seconds. A tag set
/// lives as long as its longest-lived member: NX gives a new set a TTL, GT extends an existing
/// one (GT alone treats "no TTL" as infinite).
///
/// On one Redis the checked counters are every counter the entry depends on and the clear
/// sequence. On a cluster a script runs over one slot: they are those of the entry's slot (its
/// run's counter); the tag sets of other slots are added to afterwards, and the counters of
/// other slots read behind them, the entry deleted again if one moved (see
/// [`RedisStore::put`]). A read checks every counter, the view's clear sequence included.
const PUT: &str = r"
local n = tonumber(ARGV[1])
for i = 1, n do
  local v = tonumber(redis.call('GET', KEYS[1 + i])) or 0
  if v ~= tonumber(ARGV[1 + i]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[n + 2], 'PX', ARGV[n + 3])
for i = n + 2, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  redis.call('EXPIRE', KEYS[i], ARGV[n + 4], 'NX')
  redis.call('EXPIRE', KEYS[i], ARGV[n + 4], 'GT')
end
return 1
";

/// Extends an entry's freshness in place: writes the Unix millisecond it is fresh until into
/// the value (see [`crate::store::entry::EXTENDED_TO_AT`]) and its life in Redis, if the key
/// holds an `RC3` value (a missing key is not created; an older value is left to expire).
/// KEYS: the entry. ARGV: the 8-byte big-endian time, the life in ms.
const TOUCH: &str = r"
if redis.call('GETRANGE', KEYS[1], 0, 2) ~= 'RC3' then return 0 end
redis.call('SETRANGE', KEYS[1], 3, ARGV[1])
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
";

/// `GET key` as a command of a grouped batch.
fn get(key: &str) -> (&str, redis::Cmd) {
    let mut cmd = redis::cmd("GET");
    cmd.arg(key);
    (key, cmd)
}

/// The counters of `deps`, then its clear sequence unless it is one of them (on a cluster,
/// where it is the view's, checked like a counter): the keys a stamp is read from.
fn counter_keys(deps: &Deps) -> impl Iterator<Item = &str> {
    let clears =
        (!deps.counters().iter().any(|c| c == deps.clears_key())).then(|| deps.clears_key());
    deps.counters().iter().map(String::as_str).chain(clears)
}

/// The stamp read from the values of [`counter_keys`], in its order.
fn stamp_of(source: Source, deps: &Deps, values: &[redis::Value]) -> Result<Stamp, StoreError> {
    let n = deps.counters().len();
    let counters: Vec<u64> = values.iter().take(n).map(counter_of).collect();
    let clears = match deps.counters().iter().position(|c| c == deps.clears_key()) {
        Some(i) => counters.get(i).copied(),
        None => values.get(n).map(counter_of),
    };
    match clears {
        Some(clears) if counters.len() == n => Ok(Stamp::new(source, counters, clears)),
        _ => Err(StoreError::Command("short pipeline reply".into())),
    }
}

impl RedisStore {
    /// The values of `keys`, in their order (`Nil` where absent), in one round trip: one
    /// `MGET` on one Redis (single or Sentinel mode), a single snapshot; on a cluster, where
    /// they lie in several slots, one `MGET` per hash tag, sent at once.
    async fn read_values(&self, keys: &[&str]) -> Result<(Vec<redis::Value>, Source), StoreError> {
        let values_of = |reply: redis::Value, n: usize| match reply {
            redis::Value::Array(values) if values.len() == n => Ok(values),
            _ => Err(StoreError::Command(
                "MGET answered no array of its keys".into(),
            )),
        };
        if !self.keys.is_clustered() {
            let mut read = redis::cmd("MGET");
            for key in keys {
                read.arg(*key);
            }
            let (reply, source) = self
                .on_link(|mut c| async move { read.query_async::<redis::Value>(&mut c).await })
                .await?;
            return Ok((values_of(reply, keys.len())?, source));
        }
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let tag = hash_part(key);
            match groups.iter_mut().find(|(t, _)| *t == tag) {
                Some((_, at)) => at.push(i),
                None => groups.push((tag, vec![i])),
            }
        }
        let reads: Vec<redis::Cmd> = groups
            .iter()
            .map(|(_, at)| {
                let mut read = redis::cmd("MGET");
                for &i in at {
                    read.arg(keys[i]);
                }
                read
            })
            .collect();
        let (replies, source) = self
            .on_link(|conn| async move {
                let sent = reads.iter().map(|read| {
                    let mut conn = conn.clone();
                    async move { super::cluster::send_mget(&mut conn, read).await }
                });
                futures_util::future::try_join_all(sent).await
            })
            .await?;
        let mut out = vec![redis::Value::Nil; keys.len()];
        for ((_, at), reply) in groups.iter().zip(replies) {
            for (&i, value) in at.iter().zip(values_of(reply, at.len())?) {
                out[i] = value;
            }
        }
        Ok((out, source))
    }

    /// Reads an entry and the current stamp of `deps` in one round trip: one `MGET` on one
    /// Redis (on a cluster one per hash tag). An unchanged refresh's extension of the entry's
    /// freshness is written in the value itself (see [`Self::touch`]), so no `PTTL` is needed.
    pub async fn get(&self, key: &str, deps: &Deps) -> Result<Lookup, StoreError> {
        let keys: Vec<&str> = std::iter::once(key).chain(counter_keys(deps)).collect();
        let (mut values, source) = self.read_values(&keys).await?;
        let [raw, counters @ ..] = values.as_mut_slice() else {
            return Err(StoreError::Command("short MGET reply".into()));
        };
        // The entry's bytes are moved out of the reply, never copied (a 4 MB body stays in
        // the one buffer the client read it into).
        let raw = match std::mem::replace(raw, redis::Value::Nil) {
            redis::Value::Nil => None,
            redis::Value::BulkString(bytes) => Some(bytes),
            _ => return Err(StoreError::Command("an entry that is not a string".into())),
        };
        let current = stamp_of(source, deps, counters)?;
        // A value that does not decode is no entry: the next fetch overwrites it.
        let entry = raw.and_then(|r| match CacheEntry::decode(Bytes::from(r), source) {
            Ok(e) => Some(Box::new(e)),
            Err(e) => {
                tracing::warn!(key, error = %e, "ignoring an undecodable entry");
                None
            }
        });
        Ok(Lookup { entry, current })
    }

    /// The current stamp of `deps`.
    pub async fn stamp(&self, deps: &Deps) -> Result<Stamp, StoreError> {
        let keys: Vec<&str> = counter_keys(deps).collect();
        let (values, source) = self.read_values(&keys).await?;
        stamp_of(source, deps, &values)
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
        // What the script checks and tags: everything, or on a cluster what shares the
        // entry's slot.
        let slot = hash_part(key);
        let local = |k: &str| !self.keys.is_clustered() || hash_part(k) == slot;
        let mut checked: Vec<(&str, u64)> = deps
            .counters()
            .iter()
            .map(String::as_str)
            .zip(stamp.counters().iter().copied())
            .filter(|(k, _)| local(k))
            .collect();
        if !self.keys.is_clustered() {
            checked.push((deps.clears_key(), stamp.clears()));
        }
        let (tags, elsewhere): (Vec<&String>, Vec<&String>) =
            entry.tags.iter().partition(|t| local(t));
        // Sent whole (`EVAL`): one round trip whatever Redis's script cache holds.
        let mut call = redis::cmd("EVAL");
        call.arg(PUT).arg(1 + checked.len() + tags.len()).arg(key);
        for (counter, _) in &checked {
            call.arg(*counter);
        }
        call.arg(&tags).arg(checked.len());
        for (_, value) in &checked {
            call.arg(*value);
        }
        call.arg(entry.encode().as_ref())
            .arg(retention.as_millis().max(1) as u64)
            .arg(retention.as_secs().max(1));
        let conn = self.link.conn().await?;
        // A stamp read from an earlier incarnation of Redis says nothing about this one.
        if Self::source_of(&conn) != stamp.source() {
            return Ok(false);
        }
        let mut c = conn.conn.clone();
        let stored = match tokio::time::timeout(self.timeout, call.query_async::<i64>(&mut c)).await
        {
            Ok(Ok(_)) if conn.redialed() => return Err(self.redialed(&conn)),
            Ok(Ok(stored)) => stored == 1,
            Ok(Err(e)) => {
                if is_connection_error(&e) {
                    self.link.broken(&conn);
                }
                return Err(classify(e));
            }
            Err(_) => return Err(StoreError::Unavailable("redis write timed out".into())),
        };
        if !stored || !self.keys.is_clustered() {
            return Ok(stored);
        }
        // On a cluster the script checked the counters of the entry's own slot only. Those
        // of other slots (the global view counters, a comparison's runs) are read now, after
        // the write and behind the entry's tag sets there: an invalidation bumps a counter
        // before it deletes through the run's tag set or SCANs for entries, so either this
        // read sees the bump and the entry is deleted here, or the invalidation's deletes come
        // after the entry is written and tagged, and find it. Nothing written behind an
        // invalidation is left to its counters alone (single mode refuses it in the script).
        let remote: Vec<(&str, u64)> = deps
            .counters()
            .iter()
            .map(String::as_str)
            .zip(stamp.counters().iter().copied())
            .filter(|(k, _)| !local(k))
            .collect();
        let secs = retention.as_secs().max(1);
        let mut cmds = Vec::with_capacity(elsewhere.len() * 3 + remote.len());
        for tag in &elsewhere {
            let mut add = redis::cmd("SADD");
            add.arg(tag.as_str()).arg(key);
            let mut nx = redis::cmd("EXPIRE");
            nx.arg(tag.as_str()).arg(secs).arg("NX");
            let mut gt = redis::cmd("EXPIRE");
            gt.arg(tag.as_str()).arg(secs).arg("GT");
            cmds.extend([(tag.as_str(), add), (tag.as_str(), nx), (tag.as_str(), gt)]);
        }
        // After the tag sets: a run's counter shares its tag set's slot, and one slot's
        // commands run in order.
        cmds.extend(remote.iter().map(|(counter, _)| get(counter)));
        if cmds.is_empty() {
            return Ok(true);
        }
        let (replies, source) = self.run_each(cmds).await?;
        let read = replies.get(elsewhere.len() * 3..).unwrap_or_default();
        let current = source == stamp.source()
            && read.len() == remote.len()
            && read
                .iter()
                .zip(&remote)
                .all(|(value, (_, expected))| counter_of(value) == *expected);
        if current {
            return Ok(true);
        }
        // Superseded while it was fetched: deleted, as the script would have refused it. Should
        // this fail, the entry stays unservable: every read checks every counter, and a bumped
        // counter outlives any entry it hides (`gen_ttl`).
        self.unlink_each(&[key.to_owned()]).await?;
        Ok(false)
    }

    /// Extends the freshness of `key`'s entry to `fresh_until_ms` and its life to `retention`
    /// (one script: `SETRANGE` of the value's extension field and `PEXPIRE`, only on an `RC3`
    /// value, never creating the key); returns whether it did.
    pub async fn touch(
        &self,
        key: &str,
        fresh_until_ms: u64,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(TOUCH)
            .arg(1)
            .arg(key)
            .arg(&fresh_until_ms.to_be_bytes()[..])
            .arg(retention.as_millis().max(1) as u64);
        let extended: i64 = self.run(cmd).await?;
        Ok(extended == 1)
    }

    /// Applies `inv`: counters first (one pipeline), then the deletes. Returns entries
    /// dropped, and whether the counters are known to have reached a replica (always `true`
    /// in single mode, where there is no failover to lose them in). In sentinel mode a master
    /// the sentinels do not name any more after the bumps (or that no majority of them answers for)
    /// is an [`StoreError::Unavailable`]: the caller journals the invalidation and tells the
    /// other instances.
    pub async fn apply(&self, inv: &Invalidation) -> Result<(u64, bool), StoreError> {
        let mut replicated = true;
        if !inv.bump.is_empty() {
            let mut cmds = Vec::with_capacity(inv.bump.len() * 2);
            for counter in &inv.bump {
                let mut incr = redis::cmd("INCR");
                incr.arg(counter);
                let mut expire = redis::cmd("EXPIRE");
                expire.arg(counter).arg(self.gen_ttl_secs);
                cmds.extend([(counter.as_str(), incr), (counter.as_str(), expire)]);
            }
            if self.sentinels.is_some() || self.cluster.is_some() {
                replicated = self.bump_replicated(cmds).await?;
            } else {
                self.run_each(cmds).await?;
            }
        }
        let mut dropped = self.unlink_each(&inv.delete).await?;
        // Concurrently: a batch of events from the stream names one tag set per run, and the
        // connection pipelines them.
        let tagged = futures_util::future::try_join_all(
            inv.tagged.iter().map(|tag| self.delete_tagged(tag)),
        )
        .await?;
        dropped += tagged.iter().sum::<u64>();
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

    /// Sentinel and cluster modes: runs the counter bumps, then `WAIT 1`, on a connection of
    /// their own (`WAIT` counts the writes of its connection, and would hold up whatever is
    /// multiplexed behind it); on a cluster, bumps and `WAIT` per slot, on the admin connection.
    /// A master that no replica confirms within the command time-out may be the old master of
    /// a failover, still taking writes that the new one will never see: the caller then tells
    /// the other instances directly. With no admin connection free, the bumps go over the
    /// request path's connection and count as unconfirmed.
    async fn bump_replicated(&self, cmds: Vec<(&str, redis::Cmd)>) -> Result<bool, StoreError> {
        let wait_ms = u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let wait = || {
            let mut cmd = redis::cmd("WAIT");
            cmd.arg(1).arg(wait_ms);
            cmd
        };
        let limit = self.timeout * 2 + self.timeout;
        let timed_out = || StoreError::Unavailable("redis invalidation timed out".into());
        if self.cluster.is_some() {
            // A shard whose primary has no replica has none to promote: no failover can lose
            // its bumps, and a restarted node is a changed identity, taken for a restore.
            // `WAIT` there would only time out. Shards with a replica wait.
            let (waited, alone): (Vec<_>, Vec<_>) = cmds
                .into_iter()
                .partition(|(key, _)| self.link.cluster_waits_for(key));
            let alone = async {
                if !alone.is_empty() {
                    self.run_each(alone).await?;
                }
                Ok(())
            };
            let waited = async {
                if waited.is_empty() {
                    return Ok(true);
                }
                self.bump_waited(waited, wait, limit).await
            };
            let (alone, waited) = tokio::join!(alone, waited);
            return alone.and(waited);
        }
        // Where the bumps go: the master the link connected to last (the admin pool follows it).
        let master = self.link.client().get_connection_info().addr().to_string();
        let Ok(mut conn) = self.admin_conn().await else {
            self.run_each(cmds).await?;
            self.confirm_master(&master).await?;
            return Ok(false);
        };
        let mut pipe = redis::pipe();
        for (_, cmd) in cmds {
            pipe.add_command(cmd).ignore();
        }
        // In the same round trip: the replicas connected now. With none, `WAIT` could only
        // time out (a whole command time-out per invalidation): the bumps count as
        // unconfirmed at once.
        pipe.cmd("ROLE");
        let work = async {
            let (role,): (redis::Value,) = pipe.query_async(&mut *conn).await?;
            if connected_replicas(&role) == Some(0) {
                return Ok(0);
            }
            wait().query_async::<i64>(&mut *conn).await
        };
        let replicated = match tokio::time::timeout(limit, work).await {
            Ok(Ok(replicas)) => replicas >= 1,
            Ok(Err(e)) => return Err(classify(e)),
            Err(_) => return Err(timed_out()),
        };
        self.confirm_master(&master).await?;
        Ok(replicated)
    }

    /// Sentinel mode, after an invalidation's bumps and `WAIT`: whether `master`, the server
    /// they were written to, is the master in the newest configuration the sentinels report
    /// now. `WAIT 1` alone proves little: the replica that acknowledged may be one the
    /// sentinels re-point to a master they promoted already (it then drops what it
    /// acknowledged), while other instances read from that new master. A server the sentinels
    /// no longer name, or that no majority of them answers for, is treated as unreachable: the caller
    /// applies the invalidation to memory, journals it, tells the other instances directly,
    /// and replays it to the master the sentinels name before serving from Redis again (the
    /// link is dropped so that the next connection asks them).
    async fn confirm_master(&self, master: &str) -> Result<(), StoreError> {
        let Some(sentinels) = &self.sentinels else {
            return Ok(());
        };
        match sentinels.named(self.pool_opts.connect).await {
            // A majority must have answered: a sentinel cut off with this master and one of
            // its replicas would still name it while the others promoted another.
            Ok(named) if named.is(master) && named.answered >= sentinels.majority() => Ok(()),
            Ok(named) if named.is(master) => Err(StoreError::Unavailable(format!(
                "only {} of the sentinels confirmed the master an invalidation went to; a majority must",
                named.answered
            ))),
            Ok(named) => {
                self.link.reset();
                Err(StoreError::Unavailable(format!(
                    "the sentinels no longer name the server an invalidation went to as the master (configuration epoch {}, {}:{}{})",
                    named.epoch,
                    named.host,
                    named.port,
                    if named.agreed { "" } else { ", disputed" }
                )))
            }
            Err(e) => Err(StoreError::Unavailable(format!(
                "no sentinel confirmed the master an invalidation went to: {e}"
            ))),
        }
    }

    /// Cluster mode: `cmds` (bumps on primaries that have a replica) and a `WAIT` per slot,
    /// on the admin connection; whether every slot's `WAIT` was answered by a replica.
    async fn bump_waited(
        &self,
        cmds: Vec<(&str, redis::Cmd)>,
        wait: impl Fn() -> redis::Cmd,
        limit: Duration,
    ) -> Result<bool, StoreError> {
        let timed_out = || StoreError::Unavailable("redis invalidation timed out".into());
        let Ok(Some(admin)) = self.cluster_admin().await else {
            self.run_each(cmds).await?;
            return Ok(false);
        };
        let mut groups: Vec<(&str, redis::Pipeline)> = Vec::new();
        for (key, cmd) in cmds {
            let tag = hash_part(key);
            match groups.iter_mut().find(|(t, _)| *t == tag) {
                Some((_, pipe)) => {
                    pipe.add_command(cmd);
                }
                None => {
                    let mut pipe = redis::pipe();
                    pipe.add_command(cmd);
                    groups.push((tag, pipe));
                }
            }
        }
        // `WAIT` has no key: in a pipeline it goes to the node of the pipeline's keys. A
        // slot being migrated answers with a redirection: its bumps then go one by one,
        // unconfirmed.
        let sent = groups.into_iter().map(|(_, pipe)| {
            let mut conn = Handle::Cluster(admin.clone());
            let mut waited = pipe.clone();
            waited.add_command(wait());
            async move {
                match waited.query_async::<Vec<redis::Value>>(&mut conn).await {
                    Ok(replies) => {
                        Ok(matches!(replies.last(), Some(redis::Value::Int(n)) if *n >= 1))
                    }
                    Err(e) if super::cluster::is_redirect(&e) => {
                        super::cluster::send_group(&mut conn, pipe).await?;
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            }
        });
        let result =
            match tokio::time::timeout(limit, futures_util::future::try_join_all(sent)).await {
                Ok(Ok(confirmed)) => Ok(confirmed.into_iter().all(|c| c)),
                Ok(Err(e)) => Err(classify(e)),
                Err(_) => Err(timed_out()),
            };
        if result.is_err() {
            self.forget_cluster_admin().await;
        }
        result
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

/// How many replicas a master's `ROLE` reply lists (`["master", offset, [[ip, port,
/// offset], …]]`); `None` when it is not a master's reply.
fn connected_replicas(role: &redis::Value) -> Option<usize> {
    let redis::Value::Array(parts) = role else {
        return None;
    };
    match parts.get(2) {
        Some(redis::Value::Array(replicas)) => Some(replicas.len()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::TOUCH;
    use crate::store::entry::{ENTRY_MAGIC, EXTENDED_TO_AT};

    #[test]
    fn the_touch_script_writes_where_an_entry_keeps_its_extension() {
        let magic = std::str::from_utf8(ENTRY_MAGIC).expect("ascii");
        assert!(TOUCH.contains(&format!("GETRANGE', KEYS[1], 0, 2) ~= '{magic}'")));
        assert!(TOUCH.contains(&format!("SETRANGE', KEYS[1], {EXTENDED_TO_AT}, ARGV[1])")));
    }
}

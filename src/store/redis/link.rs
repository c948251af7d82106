//! The request path's connection to Redis: one multiplexed connection, replaced when it
//! breaks, and checked before use each time it is (re)opened.
//!
//! A Redis that restarts comes back empty, or from an older RDB snapshot with entries and
//! counters from before invalidations it had applied. Either way every connection to it
//! broke, so each new connection asks `INFO server` for the process's `run_id`: a new one
//! starts a new *incarnation*, and stamps read from the old one never validate anything in
//! the new one (see [`crate::store::Source`]). Whether the new process came back holding this
//! keyspace (our marker key survived: it was loaded from a snapshot) or empty is recorded with
//! the incarnation, so the tiered store can replay what may have been lost before it serves.
//! The marker holds the `run_id` of the process it was written in, so a marker another
//! instance wrote after the restart does not look like one that came back from a snapshot.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use redis::{AsyncConnectionConfig, RedisError};

use super::cluster::{Dials, Handle, Seeds};
use super::promotion;
use super::sentinel::{Sentinels, is_master};
use crate::store::StoreError;

/// One open, checked connection.
pub(crate) struct Conn {
    pub(crate) conn: Handle,
    /// The incarnation of the Redis process it is connected to.
    pub(crate) incarnation: u64,
    /// That process's `run_id`.
    run_id: String,
    /// Cluster mode: the connections the cluster client opened, and how many it had when
    /// this connection was checked.
    dials: Option<(Dials, u64)>,
}

impl Conn {
    /// Cluster mode: whether the client opened a connection since this one was checked (a
    /// node reconnected, a failover followed): what it answers since may come from a process
    /// that lost writes, and is not used before the primaries are checked again.
    pub(crate) fn redialed(&self) -> bool {
        self.dials
            .as_ref()
            .is_some_and(|(dials, checked)| dials.count() != *checked)
    }
}

/// What a new incarnation came back with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// The process answered without this keyspace: nothing stale can be in it.
    Empty,
    /// The process holds this keyspace's marker from before: it was restored from a snapshot.
    Restored,
}

/// The request path's connection.
pub(crate) struct Link {
    /// The client of the Redis connected to: fixed, or the master the sentinels named last.
    client: ArcSwap<redis::Client>,
    /// In sentinel mode, who names the master.
    sentinels: Option<Arc<Sentinels>>,
    /// In cluster mode, the seed nodes (the connection is to the whole cluster; its
    /// "`run_id`" is the identity of its primaries, see [`super::cluster::ClusterFacts`]).
    cluster: Option<Arc<Seeds>>,
    config: AsyncConnectionConfig,
    command_timeout: Duration,
    connect_timeout: Duration,
    marker_key: String,
    current: ArcSwapOption<Conn>,
    connecting: tokio::sync::Mutex<()>,
    /// Bumped by [`Link::reset`]: a connection opened across a reset (to the master named
    /// before a switch) is not kept.
    resets: AtomicU64,
    run_id: std::sync::Mutex<Option<String>>,
    incarnation: AtomicU64,
    /// `(incarnation, what it came back with)` of the latest restart seen.
    restart: std::sync::Mutex<Option<(u64, Restart)>>,
    /// Whether the last connection was refused (eviction policy, version; logged once).
    refused: std::sync::atomic::AtomicBool,
    /// Cluster mode: the slot ranges of the primaries that had no replica at the last
    /// connection or heartbeat (see [`super::cluster::ClusterFacts::unreplicated`]).
    cluster_unreplicated: ArcSwap<Vec<(u16, u16)>>,
    /// Cluster mode: a change of primaries found not yet proven complete, waited for (see
    /// [`promotion`]).
    promotion: promotion::Pending,
}

/// Whether `redis_version` (from `INFO server`) is below 7.0. An unparseable one (some
/// Redis-compatible servers) is given the benefit of the doubt: its commands fail loudly.
fn older_than_7(redis_version: &str) -> bool {
    redis_version
        .split('.')
        .next()
        .and_then(|major| major.trim().parse::<u32>().ok())
        .is_some_and(|major| major < 7)
}

/// Why a server (or a cluster's primaries) is not used: older than 7.0, or evicting (its
/// policy named). An evicting Redis may drop the counters that make invalidated entries
/// unservable (they carry a TTL, so `volatile-*` policies may pick them too), which would
/// revive what they invalidated; an older one lacks commands the store relies on.
fn refusal(version: &str, evicting: Option<&str>) -> Option<String> {
    if older_than_7(version) {
        Some(format!(
            "redis {version} is older than 7.0, which runcache needs (SET … NX GET, EXPIRE … NX/GT): not using it"
        ))
    } else {
        evicting.map(|policy| format!(
            "redis maxmemory-policy {policy} may evict keys, runcache's invalidation counters among them: not using it; set maxmemory-policy noeviction (or no maxmemory)"
        ))
    }
}

/// Whether `e` means the connection itself is gone (as opposed to one failed command).
pub(crate) fn is_connection_error(e: &RedisError) -> bool {
    // A replica (a master demoted by a failover) refuses writes: the connection is to the
    // wrong server, and the next one goes to the master the sentinels name.
    // On a cluster: slots moving, a failover under way, or a node the client cannot reach
    // (its retries spent). The next connection reads the new topology, and checks it.
    let wrong_server = matches!(
        e.kind(),
        redis::ErrorKind::Server(
            redis::ServerErrorKind::ReadOnly
                | redis::ServerErrorKind::MasterDown
                | redis::ServerErrorKind::Moved
                | redis::ServerErrorKind::Ask
                | redis::ServerErrorKind::TryAgain
                | redis::ServerErrorKind::ClusterDown
                | redis::ServerErrorKind::BusyLoading
        ) | redis::ErrorKind::ClusterConnectionNotFound
    );
    wrong_server
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

/// A connection-level error (so the store takes Redis for unreachable) with `message`.
fn unreachable(message: String) -> RedisError {
    RedisError::from(std::io::Error::other(message))
}

/// Whether `e` is a master refusing writes because too few replicas are connected
/// (`min-replicas-to-write`): it may be an old master cut off from the others, and what it
/// would take may be lost, so it counts as unreachable (the invalidation is journaled and
/// told to the other instances) without dropping the connection.
fn refuses_writes(e: &RedisError) -> bool {
    const CODE: &str = "NOREPLICAS";
    // In a pipeline, each command's own error.
    e.code() == Some(CODE)
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, error)| error.code() == CODE))
}

/// Maps a Redis error to a store error: unreachable, or a bad answer.
pub(crate) fn classify(e: RedisError) -> StoreError {
    if is_connection_error(&e) || e.is_timeout() || refuses_writes(&e) {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Command(e.to_string())
    }
}

impl Link {
    pub(crate) fn new(
        client: redis::Client,
        sentinels: Option<Arc<Sentinels>>,
        cluster: Option<Arc<Seeds>>,
        connect_timeout: Duration,
        command_timeout: Duration,
        marker_key: String,
    ) -> Self {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(command_timeout));
        Self {
            client: ArcSwap::from_pointee(client),
            sentinels,
            cluster,
            config,
            command_timeout,
            connect_timeout,
            marker_key,
            current: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            resets: AtomicU64::new(0),
            run_id: std::sync::Mutex::new(None),
            incarnation: AtomicU64::new(0),
            restart: std::sync::Mutex::new(None),
            refused: std::sync::atomic::AtomicBool::new(false),
            cluster_unreplicated: ArcSwap::from_pointee(Vec::new()),
            promotion: promotion::Pending::default(),
        }
    }

    /// The client of the Redis last connected to (in sentinel mode, of the master named last):
    /// for connections of their own.
    pub(crate) fn client(&self) -> Arc<redis::Client> {
        self.client.load_full()
    }

    /// Drops the open connection, so the next command connects again (in sentinel mode, to
    /// the master the sentinels name then).
    pub(crate) fn reset(&self) {
        self.resets.fetch_add(1, Ordering::AcqRel);
        self.current.store(None);
    }

    /// In sentinel mode, drops the open connection if its server is no longer a master (a
    /// failover the watcher missed). Nothing to do otherwise, or with no connection open.
    pub(crate) async fn check_master(&self) {
        let Some(c) = self.current.load_full() else {
            return;
        };
        if let Handle::Cluster(conn) = &c.conn {
            // A primary restarted or replaced (a failover) since this connection was opened:
            // the next connection takes the cluster for restored (see `conn`).
            let mut conn = conn.clone();
            let facts =
                tokio::time::timeout(self.connect_timeout, super::cluster::facts(&mut conn)).await;
            if let Ok(Ok(facts)) = facts {
                if facts.identity != c.run_id {
                    tracing::warn!("a primary of the redis cluster changed; reconnecting");
                    self.broken(&c);
                } else {
                    // Replicas come and go without changing the identity.
                    self.cluster_unreplicated
                        .store(Arc::new(facts.unreplicated));
                }
            }
            return;
        }
        let Some(sentinels) = &self.sentinels else {
            return;
        };
        // The sentinels' newest configuration names another master: a failover the watcher
        // did not hear of (the old master may still take writes, so `ROLE` alone would not
        // tell).
        if let Ok(named) = sentinels.named(self.connect_timeout).await {
            let addr = self.client.load().get_connection_info().addr().to_string();
            if !named.is(&addr) {
                tracing::warn!(master = %format!("{}:{}", named.host, named.port), agreed = named.agreed, "the sentinels name another master; reconnecting");
                self.broken(&c);
                return;
            }
        }
        let mut conn = c.conn.clone();
        let role = tokio::time::timeout(
            self.connect_timeout,
            redis::cmd("ROLE").query_async::<redis::Value>(&mut conn),
        )
        .await;
        match role {
            Ok(Ok(role)) if is_master(&role) => {}
            Ok(Ok(_)) => {
                tracing::warn!("the redis connected to is no longer a master; reconnecting");
                self.broken(&c);
            }
            // Failures are the request path's to notice.
            Ok(Err(_)) | Err(_) => {}
        }
    }

    /// Cluster mode: whether a bump of `key` is confirmed with `WAIT`, i.e. its primary had a
    /// replica when last connected (with none, no failover can lose a write there: a restart
    /// is a change of identity, taken for a restore).
    pub(crate) fn cluster_waits_for(&self, key: &str) -> bool {
        super::cluster::waits_for(&self.cluster_unreplicated.load(), key)
    }

    /// The incarnation of the Redis process last connected to.
    pub(crate) fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::Acquire)
    }

    /// The latest restart seen: its incarnation and what it came back with.
    pub(crate) fn last_restart(&self) -> Option<(u64, Restart)> {
        *self.restart.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open connection, or a new one, checked. One caller connects (within twice the
    /// connect time-out); the others do not queue behind it, which could add up to far more
    /// than any request may wait: they fail at once, as if Redis were down.
    pub(crate) async fn conn(&self) -> Result<Arc<Conn>, StoreError> {
        self.open(false).await
    }

    /// Like [`Link::conn`], but waits for a connection attempt under way, then makes its own
    /// if that one failed: for a caller that must know whether Redis is there (its own
    /// connection was just closed by the server), within a bound of its own.
    pub(crate) async fn reconnect(&self) -> Result<Arc<Conn>, StoreError> {
        self.open(true).await
    }

    async fn open(&self, wait: bool) -> Result<Arc<Conn>, StoreError> {
        if let Some(c) = self.current.load_full() {
            return Ok(c);
        }
        let _connecting = if wait {
            self.connecting.lock().await
        } else {
            let Ok(connecting) = self.connecting.try_lock() else {
                return Err(StoreError::Unavailable("redis is reconnecting".into()));
            };
            connecting
        };
        let resets = self.resets.load(Ordering::Acquire);
        if let Some(c) = self.current.load_full() {
            return Ok(c);
        }
        let open = async {
            if let Some(sentinels) = &self.sentinels {
                let (host, port) = sentinels
                    .master(self.connect_timeout)
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
                let current = self.client.load();
                let addr = current.get_connection_info().addr().to_string();
                let named = format!("{host}:{port}");
                if addr != named {
                    let client = sentinels
                        .client_for(&host, port)
                        .map_err(|e| unreachable(e.to_string()))?;
                    tracing::info!(master = %named, "sentinel names the master");
                    self.client.store(Arc::new(client));
                }
            }
            if let Some(seeds) = &self.cluster {
                let dials = Dials::default();
                let mut cluster = seeds
                    .connect(
                        self.connect_timeout,
                        self.command_timeout,
                        Some(dials.clone()),
                    )
                    .await?;
                let opened = dials.count();
                let facts = super::cluster::facts(&mut cluster).await?;
                let refusal = refusal(&facts.oldest_version, facts.evicting.as_deref());
                let mut conn = Handle::Cluster(cluster);
                if refusal.is_some() {
                    return Ok::<_, RedisError>((conn, facts.identity, false, refusal, None));
                }
                self.cluster_unreplicated
                    .store(Arc::new(facts.unreplicated.clone()));
                // Only a marker of these very primaries says nothing was lost. An absent one
                // says nothing either: the primary holding it (and the global counters) may
                // have restarted empty while the others kept their entries.
                let before = self.set_marker_nx_get(&mut conn, &facts.identity).await?;
                let mut fresh = before.as_deref() == Some(facts.identity.as_str());
                if dials.count() != opened {
                    return Err(unreachable(
                        "a cluster node was reconnected while the cluster was checked".into(),
                    ));
                }
                if let (false, Some(old), Handle::Cluster(c)) =
                    (fresh, before.as_deref(), &mut conn)
                {
                    let verdict = promotion::judge_cluster(
                        c,
                        seeds,
                        &self.config,
                        old,
                        &facts.identity,
                        &facts.masters,
                    )
                    .await;
                    fresh = self.promoted(&mut conn, &facts.identity, verdict).await?;
                }
                return Ok((conn, facts.identity, fresh, None, Some((dials, opened))));
            }
            let client = self.client.load_full();
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await?;
            if self.sentinels.is_some() {
                let role: redis::Value = redis::cmd("ROLE").query_async(&mut conn).await?;
                if !is_master(&role) {
                    return Err(unreachable(
                        "the server the sentinels named is not a master (yet)".into(),
                    ));
                }
            }
            let info: String = redis::cmd("INFO")
                .arg("server")
                .arg("memory")
                .query_async(&mut conn)
                .await?;
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            let run_id = field("run_id");
            // Eviction happens only with a memory limit (0: none) and a policy other than
            // `noeviction`.
            let policy = field("maxmemory_policy");
            let evicting = (field("maxmemory") != "0" && policy != "noeviction").then_some(policy);
            let refusal = refusal(&field("redis_version"), evicting.as_deref());
            let mut conn = Handle::Single(conn);
            if refusal.is_some() {
                return Ok::<_, RedisError>((conn, run_id, false, refusal, None));
            }
            // The marker holds the run_id of the process it was written in. Absent, or this
            // process's: everything here was written since it started. Another process's: it
            // was loaded from a snapshot, with whatever else that snapshot held.
            let before = self.set_marker_nx_get(&mut conn, &run_id).await?;
            // Without a run_id nothing tells a restart apart from a reconnection: every new
            // connection is then taken for a restore.
            let fresh = !run_id.is_empty() && before.is_none_or(|b| b == run_id);
            Ok::<_, RedisError>((conn, run_id, fresh, None, None))
        };
        // The connect time-out covers connecting and the checks; redis-rs's own connection
        // time-out is not enough on its own (redis-rs #1953).
        let (conn, run_id, fresh, refusal, dials) =
            match tokio::time::timeout(self.connect_timeout * 2, open).await {
                Ok(Ok(opened)) => opened,
                Ok(Err(e)) => return Err(self.connect_failed(e)),
                Err(_) => return Err(StoreError::Unavailable("redis connect timed out".into())),
            };
        if let Some(why) = refusal {
            if !self.refused.swap(true, Ordering::Relaxed) {
                tracing::error!("{why}");
            }
            return Err(StoreError::Unavailable(why));
        }
        self.refused.store(false, Ordering::Relaxed);
        if self.resets.load(Ordering::Acquire) != resets {
            // The master changed while this connection was opened: it may be to the old one.
            return Err(StoreError::Unavailable(
                "the master changed while connecting".into(),
            ));
        }
        let restarted = {
            let mut known = self.run_id.lock().unwrap_or_else(|e| e.into_inner());
            // A new process; or, on this runcache process's first connection, a marker of
            // another process: Redis came back from a snapshot while nobody watched.
            let restarted = match known.as_ref() {
                Some(k) => *k != run_id || run_id.is_empty(),
                None => !fresh,
            };
            *known = Some(run_id.clone());
            restarted
        };
        if restarted {
            let incarnation = self.incarnation.fetch_add(1, Ordering::AcqRel) + 1;
            let kind = if fresh {
                Restart::Empty
            } else {
                Restart::Restored
            };
            *self.restart.lock().unwrap_or_else(|e| e.into_inner()) = Some((incarnation, kind));
            tracing::warn!(incarnation, restored = !fresh, "redis was restarted");
        }
        let c = Arc::new(Conn {
            conn,
            incarnation: self.incarnation(),
            run_id,
            dials,
        });
        self.current.store(Some(c.clone()));
        // A reset between the check above and the store: undo the store (the reset's own
        // clearing may have come first).
        if self.resets.load(Ordering::Acquire) != resets {
            self.broken(&c);
            return Err(StoreError::Unavailable(
                "the master changed while connecting".into(),
            ));
        }
        Ok(c)
    }

    /// Why a new connection could not be opened. A refusal proves the server gone (nothing
    /// listens at its address), except in cluster mode, where one node refusing says nothing
    /// of the others (the cluster client goes on to the other seeds and to the replicas
    /// promoted in its place).
    fn connect_failed(&self, e: RedisError) -> StoreError {
        if self.cluster.is_none() && e.is_connection_refusal() {
            StoreError::Refused(e.to_string())
        } else {
            classify(e)
        }
    }

    /// Acts on a promotion's verdict for the change to `identity` (the primaries' identity):
    /// proven complete, the marker is rewritten for it and the
    /// connection is taken as it is (no restore); not yet, the connection is refused for now
    /// (the instance serves from memory and asks again at the next probe, within
    /// [`promotion::WAIT`]); unproven, it is a restore. Returns whether nothing was lost.
    async fn promoted(
        &self,
        conn: &mut Handle,
        identity: &str,
        verdict: promotion::Verdict,
    ) -> Result<bool, RedisError> {
        match self.promotion.settle(identity, verdict) {
            promotion::Verdict::Complete => {
                let () = redis::cmd("SET")
                    .arg(&self.marker_key)
                    .arg(identity)
                    .query_async(conn)
                    .await?;
                tracing::info!(
                    "every former redis primary continued its successor's history: a promotion that lost nothing, not a restore"
                );
                Ok(true)
            }
            promotion::Verdict::NotYet => Err(unreachable(
                "a former redis primary has not followed its successor yet: waiting before deciding whether the promotion lost writes".into(),
            )),
            promotion::Verdict::Unproven => Ok(false),
        }
    }

    /// `SET marker run_id NX GET`: what the marker held before, if anything.
    async fn set_marker_nx_get(
        &self,
        conn: &mut Handle,
        run_id: &str,
    ) -> Result<Option<String>, RedisError> {
        redis::cmd("SET")
            .arg(&self.marker_key)
            .arg(run_id)
            .arg("NX")
            .arg("GET")
            .query_async(conn)
            .await
    }

    /// Writes this process's `run_id` into the marker (after a restored Redis has been made
    /// safe: it is this keyspace's own from now on). Refused when the connection is to a
    /// later process than `incarnation`, the one that was made safe.
    pub(crate) async fn claim_marker(&self, incarnation: u64) -> Result<(), StoreError> {
        let c = self.conn().await?;
        if c.incarnation != incarnation {
            return Err(StoreError::Unavailable(
                "redis restarted again before its marker was claimed".into(),
            ));
        }
        let mut conn = c.conn.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(&self.marker_key).arg(&c.run_id);
        match tokio::time::timeout(self.connect_timeout, cmd.query_async::<()>(&mut conn)).await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(StoreError::Unavailable("redis command timed out".into())),
        }
    }

    /// Sets the marker again, with `NX`, on the open connection (none open: nothing to do; the
    /// next connection writes it).
    pub(crate) async fn keep_marker(&self) -> Result<(), StoreError> {
        let Some(c) = self.current.load_full() else {
            return Ok(());
        };
        let mut conn = c.conn.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(&self.marker_key).arg(&c.run_id).arg("NX");
        match tokio::time::timeout(self.connect_timeout, cmd.query_async::<()>(&mut conn)).await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(StoreError::Unavailable("redis command timed out".into())),
        }
    }

    /// Forgets `c` after a connection-level error, so the next command reconnects.
    pub(crate) fn broken(&self, c: &Arc<Conn>) {
        let current = self.current.load();
        if current.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, c)) {
            self.current.compare_and_swap(&current, None::<Arc<Conn>>);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::older_than_7;

    #[test]
    fn servers_before_7_0_are_refused() {
        for old in ["6.2.14", "5.0.7", "2.8"] {
            assert!(older_than_7(old), "{old}");
        }
        for new in ["7.0.15", "7.2.4", "8.0.0", "", "valkey"] {
            assert!(!older_than_7(new), "{new}");
        }
    }
}

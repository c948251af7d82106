//! The Redis tier. The request path uses one shared multiplexed connection ([`link`]: a pool
//! checkout costs an extra PING round trip, and the link checks every new connection for a
//! restarted Redis); SCAN and INFO use a small deadpool pool so long admin work never queues
//! behind, or ahead of, request traffic. Every command names one key, except the conditional
//! write, whose keys are one entry and the counters it depends on.

pub mod cluster;
mod data;
pub mod link;
mod promotion;
pub mod sentinel;

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::AsyncConnectionConfig;

use self::cluster::{Handle, Seeds};
use self::link::{Conn, Link, Restart, classify, is_connection_error};
use self::sentinel::{SentinelOptions, Sentinels};
use super::keyspace::hash_part;
use super::{Keyspace, Source, StoreError, Tier};

/// Connection settings for [`RedisStore::new`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Redis URL (may hold a password; never logged).
    pub url: String,
    /// PEM roots a `rediss://` server is verified against, instead of the system's.
    pub tls_roots: Option<Vec<u8>>,
    /// Per-command time-out on the request path.
    pub command_timeout: Duration,
    /// TCP connect time-out.
    pub connect_timeout: Duration,
    /// Admin pool size.
    pub pool_max_size: usize,
    /// Wait for an admin connection.
    pub pool_timeout: Duration,
    /// Opening an admin connection.
    pub pool_create_timeout: Duration,
    /// Health check of an idle admin connection.
    pub pool_recycle_timeout: Duration,
    /// SCAN COUNT hint.
    pub scan_batch: usize,
    /// Lifetime of generation counters; longer than any entry lives.
    pub gen_ttl: Duration,
    /// Sentinel mode: the master is the one these sentinels name (`url` then gives only the
    /// credentials, TLS and database).
    pub sentinel: Option<SentinelOptions>,
    /// Cluster mode: the seed nodes (`url` is then not used).
    pub cluster_urls: Option<Vec<String>>,
}

/// Figures from Redis `INFO` shown in `/cache/stats`.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct RedisInfo {
    /// Bytes Redis uses.
    pub used_memory: u64,
    /// Successful key lookups since Redis started.
    pub keyspace_hits: u64,
    /// Failed key lookups since Redis started.
    pub keyspace_misses: u64,
    /// Keys evicted by `maxmemory`.
    pub evicted_keys: u64,
}

/// Redis-backed store. Cloning shares the connections.
#[derive(Clone)]
pub struct RedisStore {
    link: Arc<Link>,
    /// The admin pool, and the address it connects to (rebuilt when the master moves).
    pool: Arc<arc_swap::ArcSwap<(String, Pool)>>,
    pool_opts: PoolOptions,
    sentinels: Option<Arc<Sentinels>>,
    /// Cluster mode: the seeds, and the admin work's own connection (opened when first
    /// needed; SCAN, INFO and replicated bumps, with the admin time-out).
    cluster: Option<Arc<Seeds>>,
    cluster_admin: Arc<tokio::sync::Mutex<Option<redis::cluster_async::ClusterConnection>>>,
    keys: Keyspace,
    timeout: Duration,
    scan_batch: usize,
    gen_ttl_secs: u64,
}

/// How the admin pool is built.
#[derive(Debug, Clone, Copy)]
struct PoolOptions {
    max_size: usize,
    wait: Duration,
    create: Duration,
    recycle: Duration,
    connect: Duration,
    response: Duration,
}

impl PoolOptions {
    /// A pool connecting as `client` does (TLS roots included), with the address it goes to.
    fn build(&self, client: &redis::Client) -> Result<(String, Pool), StoreError> {
        let info = client.get_connection_info().clone();
        let addr = info.addr().to_string();
        let manager = Manager::new_with_config(
            info,
            AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.connect))
                .set_response_timeout(Some(self.response)),
        )
        .map_err(classify)?;
        let pool = Pool::builder(manager)
            .max_size(self.max_size)
            .wait_timeout(Some(self.wait))
            .create_timeout(Some(self.create))
            .recycle_timeout(Some(self.recycle))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Command(e.to_string()))?;
        Ok((addr, pool))
    }
}

/// Registers `ARGV[1]` as seen now, by Redis' own clock (so an instance whose clock is
/// behind is not invisible to the others), drops members unseen for ten windows and members
/// claiming a time beyond now plus the skew (nothing honest writes one: a forged member could
/// otherwise stay for ever), and returns the members seen within the window, the most
/// recently seen first, at most `ARGV[4]` of them.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
local skew = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('(%d', now - window * 10))
redis.call('ZREMRANGEBYSCORE', KEYS[1], string.format('(%d', now + skew), '+inf')
return redis.call('ZREVRANGEBYSCORE', KEYS[1], string.format('%d', now + skew),
    string.format('%d', now - window), 'LIMIT', 0, tonumber(ARGV[4]))
";

/// How far ahead of Redis' clock a registry member's last-seen time may be (members are
/// scored by Redis' clock, so only a failover to a node whose clock differs moves it).
const REGISTRY_SKEW: Duration = Duration::from_secs(2);

/// Deletes the lock only if it still holds our token (single key: cluster-safe).
const UNLOCK: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A counter's value; absent or unreadable counts as 0 (never bumped).
fn parse_counter(raw: Option<&[u8]>) -> u64 {
    raw.and_then(|r| std::str::from_utf8(r).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// An integer reply (an `UNLINK` count); anything else counts as 0.
fn counter_of_int(value: &redis::Value) -> u64 {
    match value {
        redis::Value::Int(n) => u64::try_from(*n).unwrap_or(0),
        other => counter_of(other),
    }
}

fn counter_of(value: &redis::Value) -> u64 {
    // A counter is read on every hit: its digits are parsed where they lie.
    if let redis::Value::BulkString(raw) = value {
        return parse_counter(Some(raw));
    }
    let raw: Option<Vec<u8>> = redis::from_redis_value_ref(value).ok().flatten();
    parse_counter(raw.as_deref())
}

impl RedisStore {
    /// Creates the store without connecting: Redis may be absent at start, and the first
    /// command (or the health probe) connects.
    pub fn new(opts: &RedisOptions, keys: Keyspace) -> Result<Self, StoreError> {
        let client = match &opts.tls_roots {
            Some(roots) => redis::Client::build_with_tls(
                opts.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(roots.clone()),
                },
            ),
            None => redis::Client::open(opts.url.as_str()),
        }
        .map_err(|_| StoreError::Command("invalid redis url or TLS roots".into()))?;
        let sentinels = match &opts.sentinel {
            Some(s) => Some(Arc::new(Sentinels::new(
                s,
                &opts.url,
                opts.tls_roots.clone(),
            )?)),
            None => None,
        };
        let cluster = opts
            .cluster_urls
            .clone()
            .map(|urls| Arc::new(Seeds::new(urls, opts.tls_roots.clone())));
        let link = Arc::new(Link::new(
            client.clone(),
            sentinels.clone(),
            cluster.clone(),
            opts.connect_timeout,
            opts.command_timeout,
            keys.marker_key(),
        ));
        let pool_opts = PoolOptions {
            max_size: opts.pool_max_size,
            wait: opts.pool_timeout,
            create: opts.pool_create_timeout,
            recycle: opts.pool_recycle_timeout,
            connect: opts.connect_timeout,
            // Admin commands may legitimately take longer than request-path commands.
            response: opts.command_timeout.max(Duration::from_secs(5)),
        };
        let pool = pool_opts.build(&client)?;
        Ok(Self {
            link,
            pool: Arc::new(arc_swap::ArcSwap::from_pointee(pool)),
            pool_opts,
            sentinels,
            cluster,
            cluster_admin: Arc::default(),
            keys,
            timeout: opts.command_timeout,
            scan_batch: opts.scan_batch,
            gen_ttl_secs: opts.gen_ttl.as_secs().max(1),
        })
    }

    /// Where the request path's reads come from now.
    pub fn source(&self) -> Source {
        Source {
            tier: Tier::Redis,
            incarnation: self.link.incarnation(),
        }
    }

    /// Claims the keyspace marker for the Redis process of `incarnation`, if still connected
    /// to it (see [`link`]).
    pub async fn claim_marker(&self, incarnation: u64) -> Result<(), StoreError> {
        self.link.claim_marker(incarnation).await
    }

    /// Writes the keyspace marker again if it went (evicted, deleted): a snapshot taken
    /// without it would come back looking empty. Only on the connection the request path
    /// already holds, so the `run_id` written is the one of the process it runs in.
    pub async fn keep_marker(&self) -> Result<(), StoreError> {
        self.link.keep_marker().await
    }

    /// The latest restart of Redis seen, with its incarnation.
    pub fn last_restart(&self) -> Option<(u64, Restart)> {
        self.link.last_restart()
    }

    fn source_of(conn: &Conn) -> Source {
        Source {
            tier: Tier::Redis,
            incarnation: conn.incarnation,
        }
    }

    /// Runs `query` on the shared connection within the command time-out; returns its result
    /// and the incarnation it ran against.
    async fn on_link<T, F, Fut>(&self, query: F) -> Result<(T, Source), StoreError>
    where
        F: FnOnce(Handle) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.link.conn().await?;
        let source = Self::source_of(&conn);
        match tokio::time::timeout(self.timeout, query(conn.conn.clone())).await {
            Ok(Ok(_)) if conn.redialed() => Err(self.redialed(&conn)),
            Ok(Ok(v)) => Ok((v, source)),
            Ok(Err(e)) => {
                if is_connection_error(&e) {
                    self.link.broken(&conn);
                    if let Some(gone) = self.gone_after(&e).await {
                        return Err(gone);
                    }
                }
                Err(classify(e))
            }
            Err(_) => Err(StoreError::Unavailable("redis command timed out".into())),
        }
    }

    /// After the server closed the link's connection (reset, end of stream, broken pipe: not a
    /// time-out), one attempt to connect again (or the outcome of one under way), within the
    /// command time-out, tells whether it is gone: a refusal proves it (returned, so the
    /// circuit opens at once rather than after a streak of failed requests; every request the
    /// dropped connection carried learns it, not only the first). Any other outcome leaves
    /// the failure as it was; a new connection is kept for the next command.
    async fn gone_after(&self, e: &redis::RedisError) -> Option<StoreError> {
        if !e.is_connection_dropped() || e.is_timeout() || self.cluster.is_some() {
            return None;
        }
        match tokio::time::timeout(self.timeout, self.link.reconnect()).await {
            Ok(Err(gone)) if gone.proves_down() => Some(gone),
            _ => None,
        }
    }

    /// A reply that came after the cluster client reconnected a node is not used: the link is
    /// dropped, and the next connection checks the primaries' identity (a restarted or
    /// replaced primary is taken for a restore) before anything is served from it.
    fn redialed(&self, conn: &Arc<Conn>) -> StoreError {
        self.link.broken(conn);
        StoreError::Unavailable("a redis cluster node was reconnected; checking the cluster".into())
    }

    /// Runs `cmd` on the shared connection.
    async fn run<T: redis::FromRedisValue + Send>(&self, cmd: redis::Cmd) -> Result<T, StoreError> {
        self.on_link(|mut c| async move { cmd.query_async::<T>(&mut c).await })
            .await
            .map(|(v, _)| v)
    }

    /// Runs a non-atomic pipeline on the shared connection.
    async fn run_pipe<T: redis::FromRedisValue + Send>(
        &self,
        pipe: redis::Pipeline,
    ) -> Result<(T, Source), StoreError> {
        self.on_link(|mut c| async move { pipe.query_async::<T>(&mut c).await })
            .await
    }

    /// Runs `cmds` (each given with the key it touches) and returns their replies in order:
    /// one pipeline on one server; on a cluster, one pipeline per hash tag, all at once (a
    /// cluster client refuses a pipeline that crosses slots).
    async fn run_each(
        &self,
        cmds: Vec<(&str, redis::Cmd)>,
    ) -> Result<(Vec<redis::Value>, Source), StoreError> {
        if !self.keys.is_clustered() {
            let mut pipe = redis::pipe();
            for (_, cmd) in cmds {
                pipe.add_command(cmd);
            }
            return self.run_pipe(pipe).await;
        }
        let total = cmds.len();
        let mut groups: Vec<(&str, Vec<usize>, redis::Pipeline)> = Vec::new();
        for (i, (key, cmd)) in cmds.into_iter().enumerate() {
            let tag = hash_part(key);
            let at = match groups.iter().position(|(t, _, _)| *t == tag) {
                Some(at) => at,
                None => {
                    groups.push((tag, Vec::new(), redis::pipe()));
                    groups.len() - 1
                }
            };
            groups[at].1.push(i);
            groups[at].2.add_command(cmd);
        }
        self.on_link(|conn| async move {
            let sent = groups.into_iter().map(|(_, indices, pipe)| {
                let mut conn = conn.clone();
                async move {
                    let replies = cluster::send_group(&mut conn, pipe).await?;
                    Ok::<_, redis::RedisError>((indices, replies))
                }
            });
            let mut out = vec![redis::Value::Nil; total];
            for (indices, replies) in futures_util::future::try_join_all(sent).await? {
                if replies.len() != indices.len() {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "short pipeline reply",
                    )));
                }
                for (i, reply) in indices.into_iter().zip(replies) {
                    out[i] = reply;
                }
            }
            Ok(out)
        })
        .await
    }

    /// The cluster's admin connection (cluster mode only), opened when first needed. Its
    /// failures are [`StoreError::Busy`], as the admin pool's are.
    async fn cluster_admin(
        &self,
    ) -> Result<Option<redis::cluster_async::ClusterConnection>, StoreError> {
        let Some(seeds) = &self.cluster else {
            return Ok(None);
        };
        let mut held = self.cluster_admin.lock().await;
        if let Some(c) = held.as_ref() {
            return Ok(Some(c.clone()));
        }
        let conn = seeds
            .connect(self.pool_opts.connect, self.pool_opts.response, None)
            .await
            .map_err(|e| StoreError::Busy(format!("redis cluster admin connection: {e}")))?;
        *held = Some(conn.clone());
        Ok(Some(conn))
    }

    /// Drops the cluster's admin connection after a failure: the next admin work opens a new
    /// one, with the topology as it is then.
    async fn forget_cluster_admin(&self) {
        self.cluster_admin.lock().await.take();
    }

    /// An admin connection. Its failures are [`StoreError::Busy`], whatever their cause: the
    /// request path's own connection decides whether Redis is down. It goes where the request
    /// path's goes: in sentinel mode, a master that moved gets a new pool.
    async fn admin_conn(&self) -> Result<deadpool_redis::Connection, StoreError> {
        let client = self.link.client();
        let addr = client.get_connection_info().addr().to_string();
        let mut pool = self.pool.load_full();
        if pool.0 != addr {
            let fresh = Arc::new(self.pool_opts.build(&client)?);
            self.pool.store(fresh.clone());
            pool = fresh;
        }
        pool.1.get().await.map_err(|e| match e {
            deadpool_redis::PoolError::Timeout(deadpool_redis::TimeoutType::Wait) => {
                StoreError::Busy("every admin connection to redis is in use".into())
            }
            other => StoreError::Busy(format!("redis pool: {other}")),
        })
    }

    /// The client of the Redis in use (in sentinel mode, of the master named last), for
    /// connections of their own (the event stream outside cluster mode).
    pub fn client(&self) -> redis::Client {
        (*self.link.client()).clone()
    }

    /// A client to subscribe with: the Redis in use, or on a cluster a seed node, another one
    /// at each call (a `PUBLISH` anywhere in a cluster reaches every node's subscribers).
    pub fn pubsub_client(&self) -> Result<redis::Client, StoreError> {
        match &self.cluster {
            Some(seeds) => seeds.pubsub_client().map_err(classify),
            None => Ok(self.client()),
        }
    }

    /// A connection of its own whose commands time out after `response` (for blocking reads,
    /// which would hold up every command multiplexed behind them), with where it goes (it is
    /// opened again when that changes: the master moved). On a cluster, a cluster connection.
    pub async fn dedicated(
        &self,
        connect: Duration,
        response: Duration,
    ) -> Result<(Handle, String), redis::RedisError> {
        if let Some(seeds) = &self.cluster {
            let conn = seeds.connect(connect, response, None).await?;
            return Ok((Handle::Cluster(conn), "cluster".to_owned()));
        }
        let client = self.client();
        let target = client.get_connection_info().addr().to_string();
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect))
            .set_response_timeout(Some(response));
        let open = client.get_multiplexed_async_connection_with_config(&config);
        // redis-rs's own connection time-out does not cover every step (redis-rs #1953).
        match tokio::time::timeout(connect * 2, open).await {
            Ok(conn) => Ok((Handle::Single(conn?), target)),
            Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "redis connect timed out",
            ))),
        }
    }

    /// Where a dedicated connection would go now (see [`RedisStore::dedicated`]).
    pub fn dedicated_target(&self) -> String {
        if self.cluster.is_some() {
            return "cluster".to_owned();
        }
        self.client().get_connection_info().addr().to_string()
    }

    /// In sentinel mode: follows `+switch-master` announcements until `cancel`, dropping the
    /// request path's connection at each, so the next command connects to the new master.
    /// Returns at once in the other modes.
    pub async fn follow_master(
        &self,
        retry: Duration,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let Some(sentinels) = &self.sentinels else {
            return;
        };
        let link = self.link.clone();
        sentinels.watch(retry, cancel, move || link.reset()).await;
    }

    /// In sentinel mode, drops the connection if its server is no longer a master.
    pub async fn check_master(&self) {
        self.link.check_master().await;
    }

    /// Checks that Redis answers (and, through the link, notices a restarted one). On a
    /// cluster, every primary must answer.
    pub async fn ping(&self) -> Result<(), StoreError> {
        if self.cluster.is_some() {
            return self
                .on_link(|conn| async move {
                    let Handle::Cluster(mut conn) = conn else {
                        return Err(redis::RedisError::from((
                            redis::ErrorKind::Client,
                            "not a cluster connection",
                        )));
                    };
                    cluster::on_primaries(&mut conn, redis::cmd("PING")).await
                })
                .await
                .map(|_| ());
        }
        let pong: String = self.run(redis::cmd("PING")).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Command(format!(
                "unexpected PING reply {pong:?}"
            )))
        }
    }

    /// Publishes `payload` on `channel`; returns how many subscribers of the node that took it
    /// received it: all of them on one Redis. On a cluster, classic `PUBLISH` reaches every
    /// node's subscribers but counts its own node's only (see [`RedisStore::subscribers`]).
    pub async fn publish(&self, channel: &str, payload: &str) -> Result<u64, StoreError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(payload);
        self.run(cmd).await
    }

    /// On a cluster, how many clients are subscribed to `channel` on every node together
    /// (`PUBSUB NUMSUB` on each); `None` on one Redis, where `PUBLISH` counts them all.
    pub async fn subscribers(&self, channel: &str) -> Result<Option<u64>, StoreError> {
        if self.cluster.is_none() {
            return Ok(None);
        }
        let channel = channel.to_owned();
        self.on_link(|conn| async move {
            let Handle::Cluster(mut conn) = conn else {
                return Ok(None);
            };
            cluster::subscribers(&mut conn, &channel).await.map(Some)
        })
        .await
        .map(|(n, _)| n)
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Reads a plain string value (the shared version).
    pub async fn get_string(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        self.run(cmd).await
    }

    /// Reads `field` of the hash `key`.
    pub async fn hash_get(&self, key: &str, field: &str) -> Result<Option<String>, StoreError> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(key).arg(field);
        self.run(cmd).await
    }

    /// Sets `field` of the hash `key`; a hash grown past `max` fields is dropped whole (it
    /// is learned again).
    pub async fn hash_put_bounded(
        &self,
        key: &str,
        field: &str,
        value: &str,
        max: usize,
    ) -> Result<(), StoreError> {
        let mut set = redis::cmd("HSET");
        set.arg(key).arg(field).arg(value);
        let _: i64 = self.run(set).await?;
        let mut len = redis::cmd("HLEN");
        len.arg(key);
        let n: u64 = self.run(len).await?;
        if n > max as u64 {
            let mut del = redis::cmd("DEL");
            del.arg(key);
            let _: i64 = self.run(del).await?;
        }
        Ok(())
    }

    /// Writes a plain string value; with `only_if_absent`, keeps an existing one.
    /// Returns whether the value was written.
    pub async fn set_string(
        &self,
        key: &str,
        value: &str,
        only_if_absent: bool,
    ) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        if only_if_absent {
            cmd.arg("NX");
        }
        let reply: Option<String> = self.run(cmd).await?;
        Ok(reply.is_some())
    }

    /// Takes the cross-instance fetch lock `key` for `ttl` unless another instance holds it.
    pub async fn try_lock(
        &self,
        key: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        let reply: Option<String> = self.run(cmd).await?;
        Ok(reply.is_some())
    }

    /// Releases the fetch lock `key` if it still holds `token`. The script is sent whole
    /// (`EVAL`, not `EVALSHA`): a restarted Redis has no script cache, and a time-out between
    /// `NOSCRIPT` and the retry would leave the lock held.
    pub async fn unlock(&self, key: &str, token: &str) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(UNLOCK).arg(1).arg(key).arg(token);
        self.run::<i64>(cmd).await.map(|_| ())
    }

    /// Records this instance (`member`) as seen now in the registry and returns at most
    /// `max` other members seen within `window`, by Redis' clock; members unseen for ten
    /// windows, or claiming a last-seen time in the future, are removed.
    pub async fn heartbeat(
        &self,
        member: &str,
        window: Duration,
        max: usize,
    ) -> Result<Vec<String>, StoreError> {
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        let skew_ms = u64::try_from(REGISTRY_SKEW.as_millis()).unwrap_or(u64::MAX);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(HEARTBEAT)
            .arg(1)
            .arg(self.keys.instances_key())
            .arg(member)
            .arg(window_ms)
            .arg(skew_ms)
            // This instance is among the members read.
            .arg(max.saturating_add(1));
        let members: Vec<String> = self.run(cmd).await?;
        Ok(members.into_iter().filter(|m| m != member).collect())
    }

    /// Removes this instance (`member`) from the registry (a graceful stop), so that the
    /// others stop telling it of invalidations at once rather than after it ages out.
    pub async fn leave(&self, member: &str) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(self.keys.instances_key()).arg(member);
        self.run::<i64>(cmd).await.map(|_| ())
    }

    /// Calls `each` with every batch of keys matching `pattern` and sums what it returns,
    /// SCANning `scan_batch` keys per step on a pooled connection, so Redis is never blocked
    /// by one long command. This is the one place pattern work goes through.
    pub async fn scan_batches<F, Fut>(&self, pattern: &str, mut each: F) -> Result<u64, StoreError>
    where
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = Result<u64, StoreError>>,
    {
        let busy = |e: redis::RedisError| StoreError::Busy(e.to_string());
        if let Some(mut conn) = self.cluster_admin().await? {
            let scanned = self.scan_primaries(&mut conn, pattern, &mut each).await;
            if matches!(scanned, Err(StoreError::Busy(_))) {
                self.forget_cluster_admin().await;
            }
            return scanned;
        }
        let mut conn = self.admin_conn().await?;
        let mut cursor: u64 = 0;
        let mut total = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(self.scan_batch)
                .query_async(&mut *conn)
                .await
                .map_err(busy)?;
            if !keys.is_empty() {
                total += each(keys).await?;
            }
            if next == 0 {
                return Ok(total);
            }
            cursor = next;
        }
    }

    /// [`RedisStore::scan_batches`] on a cluster: a SCAN through a cluster client sees one
    /// node, so the cursor runs on each primary in turn (progress logged per node).
    async fn scan_primaries<F, Fut>(
        &self,
        conn: &mut redis::cluster_async::ClusterConnection,
        pattern: &str,
        each: &mut F,
    ) -> Result<u64, StoreError>
    where
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = Result<u64, StoreError>>,
    {
        let busy = |e: redis::RedisError| StoreError::Busy(e.to_string());
        let mut total = 0;
        for node in cluster::primaries(conn).await.map_err(busy)? {
            let mut cursor: u64 = 0;
            let mut seen = 0;
            loop {
                let (next, keys) =
                    cluster::scan_node(conn, &node, cursor, pattern, self.scan_batch)
                        .await
                        .map_err(busy)?;
                if !keys.is_empty() {
                    seen += keys.len();
                    total += each(keys).await?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            tracing::debug!(node = %node, pattern, matched = seen, "scanned a cluster primary");
        }
        Ok(total)
    }

    /// Deletes keys one command each, pipelined; returns how many existed.
    async fn unlink_each(&self, keys: &[String]) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let cmds = keys
            .iter()
            .map(|key| {
                let mut cmd = redis::cmd("UNLINK");
                cmd.arg(key);
                (key.as_str(), cmd)
            })
            .collect();
        let (counts, _) = self.run_each(cmds).await?;
        Ok(counts.iter().map(counter_of_int).sum())
    }

    /// Deletes every key matching `pattern`, in SCAN batches; returns how many.
    pub async fn delete_matching(&self, pattern: &str) -> Result<u64, StoreError> {
        self.scan_batches(pattern, |keys| async move { self.unlink_each(&keys).await })
            .await
    }

    /// Counts the entries matching `pattern` (SCAN in batches).
    pub async fn count_matching(&self, pattern: &str) -> Result<u64, StoreError> {
        self.scan_batches(pattern, |keys| async move { Ok(keys.len() as u64) })
            .await
    }

    /// `used_memory`, `keyspace_hits`, `keyspace_misses` and `evicted_keys` from `INFO`.
    /// On a cluster, the sums over its primaries.
    pub async fn info(&self) -> Result<RedisInfo, StoreError> {
        let busy = |e: redis::RedisError| StoreError::Busy(e.to_string());
        let mut cmd = redis::cmd("INFO");
        cmd.arg("memory").arg("stats");
        let texts: Vec<String> = match self.cluster_admin().await? {
            Some(mut conn) => {
                let replies = cluster::on_primaries(&mut conn, cmd).await;
                if replies.is_err() {
                    self.forget_cluster_admin().await;
                }
                replies
                    .map_err(busy)?
                    .into_iter()
                    .map(|(_, v)| {
                        redis::from_redis_value(v).map_err(|e| StoreError::Busy(e.to_string()))
                    })
                    .collect::<Result<_, _>>()?
            }
            None => {
                let mut conn = self.admin_conn().await?;
                vec![cmd.query_async(&mut *conn).await.map_err(busy)?]
            }
        };
        let field = |name: &str| -> u64 {
            texts
                .iter()
                .map(|text| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(0)
                })
                .sum()
        };
        Ok(RedisInfo {
            used_memory: field("used_memory"),
            keyspace_hits: field("keyspace_hits"),
            keyspace_misses: field("keyspace_misses"),
            evicted_keys: field("evicted_keys"),
        })
    }
}

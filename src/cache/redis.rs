//! The Redis tier. The request path uses one shared multiplexed `ConnectionManager` (a pool
//! checkout costs an extra PING round trip); SCAN and INFO use a small deadpool pool so long
//! admin work never queues behind, or ahead of, request traffic. Every command names one key,
//! so the layer works unchanged on Redis Cluster; pattern work goes through `scan_batches`.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_redis::{Manager, Pool, Runtime};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncConnectionConfig, RedisError};

use super::{CacheEntry, Lookup, Store, StoreError};

/// A generation counter's value; absent or unreadable counts as 0 (never bumped).
fn parse_gen(raw: Option<&[u8]>) -> u64 {
    raw.and_then(|r| std::str::from_utf8(r).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Connection settings for [`RedisStore::new`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Redis URL (may hold a password; never logged).
    pub url: String,
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
    client: redis::Client,
    conn: ConnectionManager,
    pool: Pool,
    timeout: Duration,
    scan_batch: usize,
    gen_ttl_secs: u64,
}

/// Deletes the lock only if it still holds our token (single key: cluster-safe).
const UNLOCK: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn classify(e: RedisError) -> StoreError {
    if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Command(e.to_string())
    }
}

impl RedisStore {
    /// Creates the store without connecting: Redis may be absent at start, and the first
    /// command (or the health probe) connects.
    pub fn new(opts: &RedisOptions) -> Result<Self, StoreError> {
        let client = redis::Client::open(opts.url.as_str())
            .map_err(|_| StoreError::Command("invalid redis url".into()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(opts.connect_timeout))
            .set_response_timeout(Some(opts.command_timeout))
            // Retries would make a request wait on a dead Redis; the fallback's probe
            // reconnects instead.
            .set_number_of_retries(0);
        let conn =
            ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(classify)?;
        // Admin commands may legitimately take longer than request-path commands.
        let admin_timeout = opts.command_timeout.max(Duration::from_secs(5));
        let manager = Manager::new_with_config(
            opts.url.as_str(),
            AsyncConnectionConfig::new()
                .set_connection_timeout(Some(opts.connect_timeout))
                .set_response_timeout(Some(admin_timeout)),
        )
        .map_err(classify)?;
        let pool = Pool::builder(manager)
            .max_size(opts.pool_max_size)
            .wait_timeout(Some(opts.pool_timeout))
            .create_timeout(Some(opts.pool_create_timeout))
            .recycle_timeout(Some(opts.pool_recycle_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Command(e.to_string()))?;
        Ok(Self {
            client,
            conn,
            pool,
            timeout: opts.command_timeout,
            scan_batch: opts.scan_batch,
            gen_ttl_secs: opts.gen_ttl.as_secs().max(1),
        })
    }

    /// Runs `cmd` on the shared connection within the command time-out.
    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(StoreError::Unavailable("redis command timed out".into())),
        }
    }

    /// Runs a non-atomic pipeline on the shared connection within the command time-out.
    async fn run_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, pipe.query_async::<T>(&mut conn)).await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(StoreError::Unavailable("redis pipeline timed out".into())),
        }
    }

    async fn admin_conn(&self) -> Result<deadpool_redis::Connection, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("redis pool: {e}")))
    }

    /// The client, for connections of their own (the near cache's subscription).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Publishes `payload` on `channel`; returns how many subscribers received it.
    pub async fn publish(&self, channel: &str, payload: &str) -> Result<u64, StoreError> {
        self.run(redis::cmd("PUBLISH").arg(channel).arg(payload))
            .await
    }

    /// Reads a plain string value (used for the shared version).
    pub async fn get_string(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.run(redis::cmd("GET").arg(key)).await
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
        let reply: Option<String> = self.run(&cmd).await?;
        Ok(reply.is_some())
    }

    /// Takes the cross-instance fetch lock `key` for `ttl` unless another instance holds it.
    pub async fn try_lock(
        &self,
        key: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let reply: Option<String> = self
            .run(
                redis::cmd("SET")
                    .arg(key)
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis().max(1) as u64),
            )
            .await?;
        Ok(reply.is_some())
    }

    /// Releases the fetch lock `key` if it still holds `token`.
    pub async fn unlock(&self, key: &str, token: &str) -> Result<(), StoreError> {
        let script = redis::Script::new(UNLOCK);
        let mut invocation = script.key(key);
        invocation.arg(token);
        let mut conn = self.conn.clone();
        let call = invocation.invoke_async::<i64>(&mut conn);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map(|_| ()).map_err(classify),
            Err(_) => Err(StoreError::Unavailable("redis unlock timed out".into())),
        }
    }

    /// Calls `each` with every batch of keys matching `pattern` and sums what it returns,
    /// SCANning `scan_batch` keys per step on a pooled connection, so Redis is never blocked
    /// by one long command. This is the one place pattern work goes through (on a cluster it
    /// must visit every primary).
    pub async fn scan_batches<F, Fut>(&self, pattern: &str, mut each: F) -> Result<u64, StoreError>
    where
        F: FnMut(Vec<String>) -> Fut,
        Fut: Future<Output = Result<u64, StoreError>>,
    {
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
                .map_err(classify)?;
            if !keys.is_empty() {
                total += each(keys).await?;
            }
            if next == 0 {
                return Ok(total);
            }
            cursor = next;
        }
    }

    /// Deletes keys one command each (cluster-safe), pipelined; returns how many existed.
    async fn unlink_each(&self, keys: &[String]) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("UNLINK").arg(key);
        }
        let counts: Vec<u64> = self.run_pipe(&pipe).await?;
        Ok(counts.iter().sum())
    }

    /// `used_memory`, `keyspace_hits`, `keyspace_misses` and `evicted_keys` from `INFO`.
    pub async fn info(&self) -> Result<RedisInfo, StoreError> {
        let mut conn = self.admin_conn().await?;
        let text: String = redis::cmd("INFO")
            .arg("memory")
            .arg("stats")
            .query_async(&mut *conn)
            .await
            .map_err(classify)?;
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        Ok(RedisInfo {
            used_memory: field("used_memory"),
            keyspace_hits: field("keyspace_hits"),
            keyspace_misses: field("keyspace_misses"),
            evicted_keys: field("evicted_keys"),
        })
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &str, deps: &[String]) -> Result<Lookup, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
        for dep in deps {
            pipe.cmd("GET").arg(dep);
        }
        let replies: Vec<redis::Value> = self.run_pipe(&pipe).await?;
        let [raw, pttl, gens @ ..] = replies.as_slice() else {
            return Err(StoreError::Command("short pipeline reply".into()));
        };
        let parse_err = |e: redis::ParsingError| StoreError::Command(e.to_string());
        let raw: Option<Vec<u8>> = redis::from_redis_value_ref(raw).map_err(parse_err)?;
        let pttl: i64 = redis::from_redis_value_ref(pttl).map_err(parse_err)?;
        let gens = gens
            .iter()
            .map(|v| {
                let raw: Option<Vec<u8>> = redis::from_redis_value_ref(v).ok().flatten();
                parse_gen(raw.as_deref())
            })
            .collect();
        let entry = raw
            .map(|r| CacheEntry::decode(Bytes::from(r)))
            .transpose()?;
        Ok(Lookup {
            entry,
            gens,
            expires_in: u64::try_from(pttl).ok().map(Duration::from_millis),
        })
    }

    async fn touch(
        &self,
        key: &str,
        _entry: &CacheEntry,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let ms = retention.as_millis().max(1) as u64;
        let existed: i64 = self.run(redis::cmd("PEXPIRE").arg(key).arg(ms)).await?;
        Ok(existed == 1)
    }

    async fn generations(&self, deps: &[String]) -> Result<Vec<u64>, StoreError> {
        if deps.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for dep in deps {
            pipe.cmd("GET").arg(dep);
        }
        let replies: Vec<Option<Vec<u8>>> = self.run_pipe(&pipe).await?;
        Ok(replies.iter().map(|r| parse_gen(r.as_deref())).collect())
    }

    async fn bump(&self, deps: &[String]) -> Result<(), StoreError> {
        if deps.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for dep in deps {
            pipe.cmd("INCR").arg(dep).ignore();
            pipe.cmd("EXPIRE").arg(dep).arg(self.gen_ttl_secs).ignore();
        }
        self.run_pipe::<()>(&pipe).await
    }

    async fn set(&self, key: &str, entry: &CacheEntry, ttl: Duration) -> Result<(), StoreError> {
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let tag_secs = ttl.as_secs().max(1);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(key)
            .arg(entry.encode().as_ref())
            .arg("PX")
            .arg(ttl_ms)
            .ignore();
        for tag in &entry.tags {
            // A tag set lives as long as its longest-lived member: NX gives a new set a TTL,
            // GT extends an existing one (GT alone treats "no TTL" as infinite).
            pipe.cmd("SADD").arg(tag).arg(key).ignore();
            pipe.cmd("EXPIRE").arg(tag).arg(tag_secs).arg("NX").ignore();
            pipe.cmd("EXPIRE").arg(tag).arg(tag_secs).arg("GT").ignore();
        }
        self.run_pipe::<()>(&pipe).await
    }

    async fn delete(&self, keys: &[String]) -> Result<u64, StoreError> {
        self.unlink_each(keys).await
    }

    async fn delete_tagged(&self, tag: &str) -> Result<u64, StoreError> {
        // SPOP removes members atomically, so a member added while we work stays tagged
        // for the next invalidation instead of being dropped with the set.
        let mut deleted = 0;
        loop {
            let members: Vec<String> = self
                .run(redis::cmd("SPOP").arg(tag).arg(self.scan_batch))
                .await?;
            if members.is_empty() {
                return Ok(deleted);
            }
            deleted += self.unlink_each(&members).await?;
        }
    }

    async fn delete_matching(&self, pattern: &str) -> Result<u64, StoreError> {
        self.scan_batches(pattern, |keys| async move { self.unlink_each(&keys).await })
            .await
    }

    async fn count_matching(&self, pattern: &str) -> Result<u64, StoreError> {
        self.scan_batches(pattern, |keys| async move { Ok(keys.len() as u64) })
            .await
    }

    async fn health_check(&self) -> Result<(), StoreError> {
        let pong: String = self.run(&redis::cmd("PING")).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Command(format!(
                "unexpected PING reply {pong:?}"
            )))
        }
    }
}

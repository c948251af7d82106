//! Redis Cluster (`redis.mode = "cluster"`): the connection every Redis command goes through
//! ([`Handle`]: one node, or the whole cluster), and the work a cluster client does not do by
//! itself.
//!
//! - A cluster client refuses a pipeline whose keys cross slots, so multi-key work is grouped
//!   by hash tag (see [`crate::store::keyspace`]) and each group is sent on its own, at once.
//! - SCAN through a cluster client sees one node: pattern work lists the primaries and runs
//!   the cursor on each ([`primaries`], [`scan_node`]).
//! - Classic pub/sub is broadcast to every node, so the near cache subscribes on one node of
//!   its own choosing ([`Seeds::pubsub_client`]) and moves to the next when that one is lost.
//! - The connection call gets its own time-out (redis-rs #1953), internal retries are few and
//!   short, and each command is bounded by the caller's time-out: a request during a failover
//!   either succeeds or falls back to the memory tier, never hangs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// A connection to one Redis server, or to a whole cluster. Both are multiplexed and cheap to
/// clone; commands and single-slot pipelines go through either the same way.
#[derive(Clone)]
pub enum Handle {
    /// One server (single or sentinel mode).
    Single(MultiplexedConnection),
    /// Every node of a cluster, routed by key.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Handle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Handle::Single(c) => c.req_packed_command(cmd),
            Handle::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Handle::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Handle::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Handle::Single(c) => c.get_db(),
            Handle::Cluster(c) => c.get_db(),
        }
    }
}

/// Whether `e` is a redirection: the slot moved (`MOVED`), or is being migrated and the key
/// is already on the other side (`ASK`), or is split between both (`TRYAGAIN`).
pub fn is_redirect(e: &redis::RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::Server(
            redis::ServerErrorKind::Moved
                | redis::ServerErrorKind::Ask
                | redis::ServerErrorKind::TryAgain
        )
    )
}

/// Sends `pipe` (one slot's commands) and returns its replies. A cluster client follows a
/// redirection for a command but not for commands inside a pipeline: while the slot
/// migrates, the group is sent again one command at a time, each followed to where its key
/// is. (Reads are `MGET`s, sent alone: [`send_mget`].)
pub async fn send_group(conn: &mut Handle, pipe: Pipeline) -> RedisResult<Vec<Value>> {
    match pipe.query_async::<Vec<Value>>(conn).await {
        Err(e) if is_redirect(&e) => {
            let mut out = Vec::with_capacity(pipe.len());
            for cmd in pipe.cmd_iter() {
                out.push(cmd.query_async::<Value>(conn).await?);
            }
            Ok(out)
        }
        other => other,
    }
}

/// Sends `mget` (one slot's keys) as a single command, which the cluster client routes and
/// follows through a redirection itself (cheaper to route than a pipeline of one). An `MGET`
/// whose keys a migration has split (`TRYAGAIN`, however often it is sent) is answered by a
/// `GET` of each key, each followed, as one `MGET` reply.
pub async fn send_mget(conn: &mut Handle, mget: &redis::Cmd) -> RedisResult<Value> {
    match mget.query_async::<Value>(conn).await {
        Err(e) if is_redirect(&e) => get_each(conn, mget).await,
        other => other,
    }
}

/// The reply `mget` would give, from one `GET` per key.
async fn get_each(conn: &mut Handle, mget: &redis::Cmd) -> RedisResult<Value> {
    let mut values = Vec::new();
    for key in mget.args_iter().skip(1) {
        if let redis::Arg::Simple(key) = key {
            values.push(
                redis::cmd("GET")
                    .arg(key)
                    .query_async::<Value>(conn)
                    .await?,
            );
        }
    }
    Ok(Value::Array(values))
}

/// Counts the connections a cluster client opens (it resolves a node's address for each, the
/// first ones and every reconnection alike). A cluster client reconnects to a node by itself,
/// a restarted one included, and follows a failover: an answer that came after a new
/// connection may come from a process that lost writes, so the request path does not use it
/// before the primaries' identity has been checked again (see `link`).
#[derive(Debug, Clone, Default)]
pub struct Dials(Arc<AtomicU64>);

impl Dials {
    /// Connections opened so far.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

impl redis::io::AsyncDNSResolver for Dials {
    fn resolve<'a, 'b: 'a>(
        &'a self,
        host: &'b str,
        port: u16,
    ) -> RedisFuture<'a, Box<dyn Iterator<Item = SocketAddr> + Send + 'a>> {
        self.0.fetch_add(1, Ordering::AcqRel);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
            Ok(Box::new(addrs.into_iter()) as Box<dyn Iterator<Item = SocketAddr> + Send + 'a>)
        })
    }
}

/// The seed nodes of a cluster (`redis.cluster_urls`) and how to connect to them.
pub struct Seeds {
    urls: Vec<String>,
    tls_roots: Option<Vec<u8>>,
    next_pubsub: AtomicUsize,
}

impl std::fmt::Debug for Seeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seeds")
            .field("nodes", &self.urls.len())
            .finish_non_exhaustive()
    }
}

impl Seeds {
    /// Seeds from `urls` (validated by settings; they may hold passwords, never logged).
    pub fn new(urls: Vec<String>, tls_roots: Option<Vec<u8>>) -> Self {
        Self {
            urls,
            tls_roots,
            next_pubsub: AtomicUsize::new(0),
        }
    }

    /// A cluster connection whose commands each time out after `response`, opened within
    /// `connect` (the whole call, slot map included, is bounded: redis-rs #1953).
    /// `dials`, when given, counts the connections it opens.
    pub async fn connect(
        &self,
        connect: Duration,
        response: Duration,
        dials: Option<Dials>,
    ) -> RedisResult<ClusterConnection> {
        let mut builder = ClusterClientBuilder::new(self.urls.iter().map(String::as_str))
            .connection_timeout(connect)
            .response_timeout(response)
            // A few short retries follow an ASK or MOVED during a slot migration; whatever
            // they reconnect is seen through `dials`.
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(100);
        if let Some(dials) = dials {
            builder = builder.async_dns_resolver(dials);
        }
        if let Some(roots) = &self.tls_roots {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(roots.clone()),
            });
        }
        let client = builder.build()?;
        match tokio::time::timeout(connect * 2, client.get_async_connection()).await {
            Ok(conn) => conn,
            Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "redis cluster connect timed out",
            ))),
        }
    }

    /// A client of the node at `host:port`, with the first seed's credentials and TLS: only
    /// for a node the cluster itself lists (never an address read from the keyspace).
    pub fn node_client(&self, host: &str, port: u16) -> RedisResult<redis::Client> {
        let bad = || redis::RedisError::from((redis::ErrorKind::Client, "bad node address"));
        let seed = self.urls.first().ok_or_else(bad)?;
        let mut url = reqwest::Url::parse(seed).map_err(|_| bad())?;
        url.set_host(Some(host)).map_err(|_| bad())?;
        url.set_port(Some(port)).map_err(|()| bad())?;
        match &self.tls_roots {
            Some(roots) => redis::Client::build_with_tls(
                url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(roots.clone()),
                },
            ),
            None => redis::Client::open(url.as_str()),
        }
    }

    /// A client of one seed node, a different one at each call: classic `SUBSCRIBE` on any
    /// node of a cluster receives every `PUBLISH` made on any other, and a subscription lost
    /// with its node is taken up again on the next.
    pub fn pubsub_client(&self) -> RedisResult<redis::Client> {
        let i = self.next_pubsub.fetch_add(1, Ordering::Relaxed) % self.urls.len().max(1);
        let url = self.urls.get(i).map(String::as_str).unwrap_or_default();
        match &self.tls_roots {
            Some(roots) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(roots.clone()),
                },
            ),
            None => redis::Client::open(url),
        }
    }
}

/// `cmd` run on every primary: each one's address (`host:port`) and answer.
pub async fn on_primaries(
    conn: &mut ClusterConnection,
    cmd: Cmd,
) -> RedisResult<Vec<(String, Value)>> {
    let reply = conn
        .route_command(
            cmd,
            RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
        )
        .await?;
    let Value::Map(pairs) = reply else {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "unexpected reply from the cluster's primaries",
        )));
    };
    pairs
        .into_iter()
        .map(|(addr, value)| {
            let addr: String = redis::from_redis_value(addr)?;
            if let Value::ServerError(e) = value {
                return Err(redis::RedisError::from(e));
            }
            Ok((addr, value))
        })
        .collect()
}

/// How many clients are subscribed to `channel` on every node of the cluster together (a
/// `PUBLISH` counts those of its own node only).
pub async fn subscribers(conn: &mut ClusterConnection, channel: &str) -> RedisResult<u64> {
    let mut cmd = redis::cmd("PUBSUB");
    cmd.arg("NUMSUB").arg(channel);
    let reply = conn
        .route_command(
            cmd,
            RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllNodes, None)),
        )
        .await?;
    let Value::Map(pairs) = reply else {
        return Ok(0);
    };
    let mut total = 0;
    for (_, value) in pairs {
        if let Ok((_, n)) = redis::from_redis_value::<(String, u64)>(value) {
            total += n;
        }
    }
    Ok(total)
}

/// The primaries' addresses, as the cluster reports them (`host:port`).
pub async fn primaries(conn: &mut ClusterConnection) -> RedisResult<Vec<String>> {
    let mut addrs: Vec<String> = on_primaries(conn, redis::cmd("PING"))
        .await?
        .into_iter()
        .map(|(addr, _)| addr)
        .collect();
    addrs.sort();
    Ok(addrs)
}

/// One `SCAN` step on the node at `addr` (`host:port`, the bare host as the cluster reports
/// it: a `redis://` form is not found).
pub async fn scan_node(
    conn: &mut ClusterConnection,
    addr: &str,
    cursor: u64,
    pattern: &str,
    count: usize,
) -> RedisResult<(u64, Vec<String>)> {
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Client, "bad node address")))?;
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(count);
    let reply = conn
        .route_command(
            cmd,
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port }),
        )
        .await?;
    Ok(redis::from_redis_value(reply)?)
}

/// What the primaries' `INFO server memory` says, for the checks every new connection makes:
/// one identity for the set of processes (each primary's address and `run_id`: any restart or
/// failover changes it), whether any may evict keys, and the oldest version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterFacts {
    /// `addr=run_id/replid` of every primary, sorted, comma-separated: a restart changes its
    /// `run_id`, a promotion its replication ID.
    pub identity: String,
    /// A primary with a `maxmemory` and a policy other than `noeviction`, and that policy.
    pub evicting: Option<String>,
    /// The oldest `redis_version` among the primaries.
    pub oldest_version: String,
    /// The slot ranges (inclusive) of the primaries that have no replica connected and none
    /// that the cluster could promote: a bump there has nothing to `WAIT` for.
    pub unreplicated: Vec<(u16, u16)>,
    /// Each primary's replication state, to tell a complete promotion from a restore.
    pub(crate) masters: Vec<super::promotion::Replication>,
}

/// Whether a bump of `key` is to be confirmed with `WAIT`, given the slot ranges of the
/// primaries seen with no replica ([`ClusterFacts::unreplicated`]): unless its slot is in one
/// of them. A slot moved since to a primary with a replica and then failed over is a change
/// of the primaries' identity, taken for a restore, like a restarted primary.
pub fn waits_for(unreplicated: &[(u16, u16)], key: &str) -> bool {
    let slot = slot_of(key);
    !unreplicated
        .iter()
        .any(|&(from, to)| (from..=to).contains(&slot))
}

/// The cluster slot of `key` (CRC16/XMODEM of its hash tag, modulo 16384, as Redis Cluster
/// computes it).
pub fn slot_of(key: &str) -> u16 {
    let mut crc: u16 = 0;
    for &byte in super::super::keyspace::hash_part(key).as_bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// The slot ranges of the primaries at `addrs` (`host:port`) that the cluster lists with no
/// replica, from `CLUSTER SLOTS` (which leaves out replicas marked failed). A replica that is
/// listed but not connected could still be promoted: its shard keeps waiting.
async fn slots_of(conn: &mut ClusterConnection, addrs: &[String]) -> RedisResult<Vec<(u16, u16)>> {
    let reply = conn
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
        )
        .await?;
    let ranges: Vec<Vec<Value>> = redis::from_redis_value(reply)?;
    let mut out = Vec::new();
    for range in ranges {
        let [from, to, primary] = range.as_slice() else {
            continue;
        };
        let (from, to) = (
            redis::from_redis_value_ref::<u16>(from)?,
            redis::from_redis_value_ref::<u16>(to)?,
        );
        let node: Vec<Value> = redis::from_redis_value_ref(primary)?;
        let (Some(host), Some(port)) = (node.first(), node.get(1)) else {
            continue;
        };
        let host: String = redis::from_redis_value_ref(host)?;
        let port: u16 = redis::from_redis_value_ref(port)?;
        if addrs.contains(&format!("{host}:{port}")) {
            out.push((from, to));
        }
    }
    Ok(out)
}

/// Reads [`ClusterFacts`] from every primary.
pub async fn facts(conn: &mut ClusterConnection) -> RedisResult<ClusterFacts> {
    let mut cmd = redis::cmd("INFO");
    cmd.arg("server").arg("memory").arg("replication");
    let mut ids = Vec::new();
    let mut masters = Vec::new();
    let mut alone = Vec::new();
    let mut evicting = None;
    let mut oldest: Option<String> = None;
    for (addr, value) in on_primaries(conn, cmd).await? {
        let text: String = redis::from_redis_value(value)?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        ids.push(format!(
            "{addr}={}/{}",
            field("run_id"),
            field("master_replid")
        ));
        masters.push(super::promotion::Replication::parse(&text));
        if field("maxmemory") != "0" && field("maxmemory_policy") != "noeviction" {
            evicting = Some(field("maxmemory_policy"));
        }
        if field("connected_slaves").parse::<u64>().unwrap_or(0) == 0 {
            alone.push(addr.clone());
        }
        let version = field("redis_version");
        if oldest.as_ref().is_none_or(|o| major(&version) < major(o)) {
            oldest = Some(version);
        }
    }
    ids.sort();
    let unreplicated = if alone.is_empty() {
        Vec::new()
    } else {
        slots_of(conn, &alone).await?
    };
    Ok(ClusterFacts {
        identity: ids.join(","),
        evicting,
        oldest_version: oldest.unwrap_or_default(),
        unreplicated,
        masters,
    })
}

fn major(version: &str) -> u32 {
    version
        .split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_computed_as_redis_cluster_does() {
        // Values from the `CLUSTER KEYSLOT` documentation and the CRC16/XMODEM check value.
        assert_eq!(slot_of("somekey"), 11058);
        assert_eq!(slot_of("foo{hash_tag}"), 2515);
        assert_eq!(slot_of("123456789"), 0x31C3);
        assert_eq!(slot_of("a{run:7}"), slot_of("b{run:7}"));
    }

    #[test]
    fn only_slots_of_a_primary_without_a_replica_skip_wait() {
        let slot = slot_of("x{run:1}");
        assert!(!waits_for(&[(slot, slot)], "y{run:1}"));
        assert!(waits_for(&[(0, slot.saturating_sub(1))], "y{run:1}"));
        assert!(waits_for(&[], "y{run:1}"));
    }
}

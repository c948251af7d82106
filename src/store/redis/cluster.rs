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

use std::sync::atomic::{AtomicUsize, Ordering};
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
    pub async fn connect(
        &self,
        connect: Duration,
        response: Duration,
    ) -> RedisResult<ClusterConnection> {
        let mut builder = ClusterClientBuilder::new(self.urls.iter().map(String::as_str))
            .connection_timeout(connect)
            .response_timeout(response)
            // Retries are the caller's to decide: a few short ones ride out a MOVED or a
            // reconnect, and nothing waits on a failed node for long.
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(100);
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
    /// `addr=run_id` of every primary, sorted, comma-separated.
    pub identity: String,
    /// A primary with a `maxmemory` and a policy other than `noeviction`, and that policy.
    pub evicting: Option<String>,
    /// The oldest `redis_version` among the primaries.
    pub oldest_version: String,
}

/// Reads [`ClusterFacts`] from every primary.
pub async fn facts(conn: &mut ClusterConnection) -> RedisResult<ClusterFacts> {
    let mut cmd = redis::cmd("INFO");
    cmd.arg("server").arg("memory");
    let mut ids = Vec::new();
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
        ids.push(format!("{addr}={}", field("run_id")));
        if field("maxmemory") != "0" && field("maxmemory_policy") != "noeviction" {
            evicting = Some(field("maxmemory_policy"));
        }
        let version = field("redis_version");
        if oldest.as_ref().is_none_or(|o| major(&version) < major(o)) {
            oldest = Some(version);
        }
    }
    ids.sort();
    Ok(ClusterFacts {
        identity: ids.join(","),
        evicting,
        oldest_version: oldest.unwrap_or_default(),
    })
}

fn major(version: &str) -> u32 {
    version
        .split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(u32::MAX)
}

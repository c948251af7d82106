//! The fault schedule: planned up front from the seed (kinds, order, parameters and planned
//! start times), then executed one fault at a time. A fault starts at its planned time, or as
//! soon as the previous one has ended; every fault undoes itself (a stopped Redis is always
//! continued, a killed one always restarted) before the next begins, and the executor restores
//! Redis at the end whatever happened.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::Cluster;
use crate::history::{FaultKind, FaultOp, now_us};
use crate::redis_server::{TestRedis, TestSentinels};
use crate::rng::{Rng, STREAM_FAULTS};
use crate::stream::StreamSide;

#[derive(Debug, Clone)]
pub struct Planned {
    /// Planned start, µs after the workload starts.
    pub at_us: u64,
    pub kind: FaultKind,
    /// The instance (instance restarts).
    pub instance: Option<usize>,
    /// How long the fault holds: Redis down or stopped, `DEBUG SLEEP`, or an instance's pause
    /// between stop and start, in ms.
    pub hold_ms: u64,
}

impl Planned {
    pub fn describe(&self) -> String {
        format!(
            "+{:.1}s {}{} hold={}ms",
            self.at_us as f64 / 1e6,
            self.kind.name(),
            self.instance.map_or_else(String::new, |i| match self.kind {
                FaultKind::PrimaryFailover
                | FaultKind::PausePrimary
                | FaultKind::PlannedFailover => {
                    format!(" primary#{i}")
                }
                _ => format!(" instance={i}"),
            }),
            self.hold_ms
        )
    }
}

/// Plans faults over a workload of `duration_us` (none in its last 1.5 s, so the end is read
/// in a quiet state too).
pub fn plan(seed: u64, duration_us: u64, instances: usize) -> Vec<Planned> {
    let mut rng = Rng::derive(seed, STREAM_FAULTS, 0);
    let mut out = Vec::new();
    let mut t = rng.range(1_000, 2_500) * 1_000;
    let last = duration_us.saturating_sub(1_500_000);
    while t < last {
        let kind = [
            FaultKind::KillRestartEmpty,
            FaultKind::KillRestartStale,
            FaultKind::Pause,
            FaultKind::ClientKillPubsub,
            FaultKind::DebugSleep,
            FaultKind::InstanceRestart,
            FaultKind::PoisonedStreamEntry,
        ][rng.weighted(&[14, 14, 24, 16, 16, 16, 12])];
        let (instance, hold_ms) = match kind {
            // Outages up to 3 s: longer than SPEC 2's 2 s bound on what the memory tier may
            // serve, so the bound is actually exercised.
            FaultKind::KillRestartEmpty | FaultKind::KillRestartStale => {
                (None, rng.range(300, 3_000))
            }
            FaultKind::Pause => (None, rng.range(300, 1_500)),
            FaultKind::DebugSleep => (None, rng.range(300, 600)),
            FaultKind::ClientKillPubsub | FaultKind::PoisonedStreamEntry => (None, 0),
            FaultKind::InstanceRestart => (
                Some(rng.below(instances as u64) as usize),
                rng.range(0, 500),
            ),
            FaultKind::SaveCopy
            | FaultKind::PrimaryFailover
            | FaultKind::PausePrimary
            | FaultKind::PlannedFailover
            | FaultKind::SentinelFailover => {
                unreachable!()
            }
        };
        if kind == FaultKind::KillRestartStale {
            // The RDB file it restarts from is saved a few seconds earlier.
            out.push(Planned {
                at_us: t,
                kind: FaultKind::SaveCopy,
                instance: None,
                hold_ms: 0,
            });
            t += rng.range(2_000, 4_000) * 1_000;
            if t >= last {
                break;
            }
        }
        out.push(Planned {
            at_us: t,
            kind,
            instance,
            hold_ms,
        });
        t += (hold_ms + rng.range(1_000, 3_000)) * 1_000;
    }
    with_a_poisoned_entry(&mut out, &mut rng);
    out
}

/// Makes sure a run has at least one poisoned stream entry: the draw may give none.
fn with_a_poisoned_entry(out: &mut Vec<Planned>, rng: &mut Rng) {
    if out.is_empty() || out.iter().any(|p| p.kind == FaultKind::PoisonedStreamEntry) {
        return;
    }
    let at = rng.below(out.len() as u64) as usize;
    let at_us = out[at].at_us;
    out.insert(
        at,
        Planned {
            at_us,
            kind: FaultKind::PoisonedStreamEntry,
            instance: None,
            hold_ms: 0,
        },
    );
}

/// Bounds every step that talks to Redis, so a fault can never hang the run.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(STEP_TIMEOUT, f)
        .await
        .map_err(|_| format!("{what} did not finish within {STEP_TIMEOUT:?}"))
}

/// `DEBUG SLEEP secs` on a connection of its own, whose response time-out (redis-rs defaults to
/// 500 ms) outlasts the sleep.
async fn debug_sleep(redis: &TestRedis, secs: &str) -> redis::RedisResult<redis::Value> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    redis::cmd("DEBUG")
        .arg("SLEEP")
        .arg(secs)
        .query_async(&mut conn)
        .await
}

/// Executes `plan` against `redis` and `cluster`, starting at `start_us`, never starting a
/// fault at or after `end_us`. Returns Redis (running and continued) and the faults done.
pub async fn run(
    plan: Vec<Planned>,
    mut redis: TestRedis,
    cluster: Arc<Cluster>,
    stream: StreamSide,
    start_us: u64,
    end_us: u64,
) -> (TestRedis, Vec<FaultOp>) {
    let mut done = Vec::new();
    let mut saved: Option<(PathBuf, u64)> = None;
    for (id, p) in plan.into_iter().enumerate() {
        let at = start_us + p.at_us;
        let now = now_us();
        if at > now {
            tokio::time::sleep(Duration::from_micros(at - now)).await;
        }
        if now_us() >= end_us {
            break;
        }
        let hold = Duration::from_millis(p.hold_ms);
        let start = now_us();
        let detail = match p.kind {
            FaultKind::SaveCopy => match bounded("SAVE", redis.try_save_copy()).await {
                Ok(Ok(path)) => {
                    saved = Some((path, now_us()));
                    "saved".to_owned()
                }
                Ok(Err(e)) | Err(e) => format!("not saved: {e}"),
            },
            FaultKind::KillRestartEmpty => {
                redis.kill();
                tokio::time::sleep(hold).await;
                redis.restart_empty().await;
                format!("down {}ms, restarted empty", p.hold_ms)
            }
            FaultKind::KillRestartStale => {
                redis.kill();
                tokio::time::sleep(hold).await;
                match &saved {
                    Some((path, at)) => {
                        let age = (start - at) / 1_000;
                        redis.restart_from(path).await;
                        // Fetch locks held when the file was saved come back with it.
                        let locks = redis
                            .cmd::<Vec<String>>(&["KEYS", "*:_lock:*"])
                            .await
                            .map_or_else(|e| format!("? ({e})"), |k| k.len().to_string());
                        format!(
                            "down {}ms, restarted from an RDB saved {age}ms before the kill ({locks} fetch lock(s) back with it)",
                            p.hold_ms
                        )
                    }
                    None => {
                        redis.restart_empty().await;
                        format!("down {}ms, no saved RDB: restarted empty", p.hold_ms)
                    }
                }
            }
            FaultKind::Pause => {
                redis.pause();
                tokio::time::sleep(hold).await;
                redis.resume();
                format!("stopped {}ms", p.hold_ms)
            }
            FaultKind::ClientKillPubsub => {
                match bounded(
                    "CLIENT KILL",
                    redis.cmd::<redis::Value>(&["CLIENT", "KILL", "TYPE", "pubsub"]),
                )
                .await
                {
                    Ok(Ok(v)) => format!("killed {v:?}"),
                    Ok(Err(e)) => format!("failed: {e}"),
                    Err(e) => e,
                }
            }
            FaultKind::DebugSleep => {
                let secs = format!("{:.3}", p.hold_ms as f64 / 1000.0);
                match bounded("DEBUG SLEEP", debug_sleep(&redis, &secs)).await {
                    Ok(Ok(_)) => format!("slept {secs}s"),
                    Ok(Err(e)) => format!("failed: {e}"),
                    Err(e) => e,
                }
            }
            FaultKind::InstanceRestart => {
                let i = p.instance.expect("instance");
                let d = cluster.slots[i].restart(hold).await;
                format!("pause {}ms, {d}", p.hold_ms)
            }
            FaultKind::PoisonedStreamEntry => stream.poison(id as u64).await,
            FaultKind::PrimaryFailover
            | FaultKind::PausePrimary
            | FaultKind::PlannedFailover
            | FaultKind::SentinelFailover => {
                unreachable!("a cluster or sentinel fault against one redis")
            }
        };
        done.push(FaultOp {
            id: id as u64,
            kind: p.kind,
            instance: p.instance,
            start_us: start,
            end_us: now_us(),
            detail,
        });
    }
    // Whatever happened, leave Redis up and continued.
    if redis.is_running() {
        redis.resume();
    } else {
        redis.restart_empty().await;
    }
    (redis, done)
}

/// Plans faults for a Redis Cluster (three primaries with a replica each): primary
/// failovers, short pauses of a primary, lost near-cache subscriptions, instance restarts.
pub fn plan_cluster(seed: u64, duration_us: u64, instances: usize) -> Vec<Planned> {
    let mut rng = Rng::derive(seed, STREAM_FAULTS, 0);
    let mut out = Vec::new();
    let mut t = rng.range(1_000, 2_500) * 1_000;
    let last = duration_us.saturating_sub(1_500_000);
    while t < last {
        let kind = [
            FaultKind::PrimaryFailover,
            FaultKind::PausePrimary,
            FaultKind::ClientKillPubsub,
            FaultKind::InstanceRestart,
            FaultKind::PoisonedStreamEntry,
            FaultKind::PlannedFailover,
        ][rng.weighted(&[30, 20, 15, 15, 15, 30])];
        let (instance, hold_ms) = match kind {
            // Which primary: drawn here, by index among the primaries when the fault runs.
            FaultKind::PrimaryFailover | FaultKind::PlannedFailover => {
                (Some(rng.below(3) as usize), 0)
            }
            // Under the node time-out (1 s): no failover, just a stall.
            FaultKind::PausePrimary => (Some(rng.below(3) as usize), rng.range(200, 700)),
            FaultKind::ClientKillPubsub | FaultKind::PoisonedStreamEntry => (None, 0),
            _ => (
                Some(rng.below(instances as u64) as usize),
                rng.range(0, 500),
            ),
        };
        out.push(Planned {
            at_us: t,
            kind,
            instance,
            hold_ms,
        });
        t += (hold_ms + rng.range(2_000, 4_000)) * 1_000;
    }
    with_a_poisoned_entry(&mut out, &mut rng);
    out
}

/// Executes a cluster `plan` (see [`plan_cluster`]) as [`run`] does for one Redis, and
/// leaves every node running and the cluster settled.
pub async fn run_cluster(
    plan: Vec<Planned>,
    mut redis: crate::redis_server::TestCluster,
    cluster: Arc<Cluster>,
    stream: StreamSide,
    start_us: u64,
    end_us: u64,
) -> (crate::redis_server::TestCluster, Vec<FaultOp>) {
    let mut done = Vec::new();
    for (id, p) in plan.into_iter().enumerate() {
        let at = start_us + p.at_us;
        let now = now_us();
        if at > now {
            tokio::time::sleep(Duration::from_micros(at - now)).await;
        }
        if now_us() >= end_us {
            break;
        }
        let start = now_us();
        let primaries = redis.primary_ports().await;
        let pick = |i: Option<usize>| {
            primaries
                .get(i.unwrap_or(0) % primaries.len().max(1))
                .copied()
        };
        let detail = match p.kind {
            FaultKind::PrimaryFailover => match pick(p.instance) {
                Some(port) => {
                    redis.node(port).kill();
                    let promoted = bounded("a failover", async {
                        loop {
                            let now = redis.primary_ports().await;
                            if now.len() == 3 && !now.contains(&port) {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    })
                    .await;
                    redis.node(port).restart().await;
                    let settled = bounded("the cluster settling", redis.wait_ok(3, 1)).await;
                    format!(
                        "killed primary {port}; {}; restarted as a replica; {}",
                        promoted.map_or_else(|e| e, |()| "replica promoted".to_owned()),
                        settled.map_or_else(|e| e, |()| "settled".to_owned())
                    )
                }
                None => "no primary found".to_owned(),
            },
            FaultKind::PlannedFailover => match pick(p.instance) {
                Some(port) => match redis.replica_of(port).await {
                    Some(replica) => {
                        let asked = bounded(
                            "CLUSTER FAILOVER",
                            redis.node_cmd::<String>(replica, &["CLUSTER", "FAILOVER"]),
                        )
                        .await;
                        let promoted = bounded("a planned failover", async {
                            while !redis.primary_ports().await.contains(&replica) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        })
                        .await;
                        let settled = bounded("the cluster settling", redis.wait_ok(3, 1)).await;
                        format!(
                            "CLUSTER FAILOVER of primary {port} to {replica}: {:?}; {}; {}",
                            asked,
                            promoted.map_or_else(|e| e, |()| "replica promoted".to_owned()),
                            settled.map_or_else(|e| e, |()| "settled".to_owned())
                        )
                    }
                    None => format!("primary {port} has no replica"),
                },
                None => "no primary found".to_owned(),
            },
            FaultKind::PausePrimary => match pick(p.instance) {
                Some(port) => {
                    redis.node(port).pause();
                    tokio::time::sleep(Duration::from_millis(p.hold_ms)).await;
                    redis.node(port).resume();
                    format!("stopped primary {port} {}ms", p.hold_ms)
                }
                None => "no primary found".to_owned(),
            },
            FaultKind::ClientKillPubsub => {
                let mut killed = 0;
                for node in redis.nodes.iter().filter(|n| n.is_running()) {
                    if let Ok(Ok(n)) = bounded(
                        "CLIENT KILL",
                        node.cmd::<i64>(&["CLIENT", "KILL", "TYPE", "pubsub"]),
                    )
                    .await
                    {
                        killed += n;
                    }
                }
                format!("killed {killed} subscription(s)")
            }
            FaultKind::InstanceRestart => {
                let i = p.instance.expect("instance");
                let d = cluster.slots[i]
                    .restart(Duration::from_millis(p.hold_ms))
                    .await;
                format!("pause {}ms, {d}", p.hold_ms)
            }
            FaultKind::PoisonedStreamEntry => stream.poison(id as u64).await,
            other => format!("{} does not apply to a cluster", other.name()),
        };
        done.push(FaultOp {
            id: id as u64,
            kind: p.kind,
            instance: p.instance,
            start_us: start,
            end_us: now_us(),
            detail,
        });
    }
    for node in redis.nodes.iter_mut() {
        if node.is_running() {
            node.resume();
        } else {
            node.restart().await;
        }
    }
    (redis, done)
}

/// Plans faults for a master and replica under three sentinels: planned failovers while the
/// old master keeps taking writes and holding subscriptions, short stops of the master (under
/// the sentinels' 1 s `down-after-milliseconds`), lost near-cache subscriptions, instance
/// restarts.
pub fn plan_sentinel(seed: u64, duration_us: u64, instances: usize) -> Vec<Planned> {
    let mut rng = Rng::derive(seed, STREAM_FAULTS, 0);
    let mut out = Vec::new();
    let mut t = rng.range(1_000, 2_500) * 1_000;
    let last = duration_us.saturating_sub(1_500_000);
    while t < last {
        let kind = [
            FaultKind::SentinelFailover,
            FaultKind::Pause,
            FaultKind::ClientKillPubsub,
            FaultKind::InstanceRestart,
        ][rng.weighted(&[40, 20, 20, 20])];
        let (instance, hold_ms) = match kind {
            // How long the old master stays a writable master after the switch.
            FaultKind::SentinelFailover => (None, rng.range(500, 3_000)),
            FaultKind::Pause => (None, rng.range(200, 700)),
            FaultKind::ClientKillPubsub => (None, 0),
            _ => (
                Some(rng.below(instances as u64) as usize),
                rng.range(0, 500),
            ),
        };
        out.push(Planned {
            at_us: t,
            kind,
            instance,
            hold_ms,
        });
        t += (hold_ms + rng.range(2_000, 4_000)) * 1_000;
    }
    out
}

/// Whether `redis` is a replica whose link to its master is up.
async fn synced(redis: &TestRedis) -> bool {
    let info: String = redis
        .cmd(&["INFO", "replication"])
        .await
        .unwrap_or_default();
    info.contains("role:slave") && info.contains("master_link_status:up")
}

/// One planned failover (see [`FaultKind::SentinelFailover`]); returns what happened.
async fn sentinel_failover(s: &TestSentinels, hold: Duration) -> String {
    let Some(old) = s.master_port().await else {
        return "no master named".to_owned();
    };
    let new = if old == s.master.port {
        s.replica.port
    } else {
        s.master.port
    };
    // The previous failover's old master must have caught up before it can be promoted.
    if let Err(e) = bounded("the replica syncing", async {
        while !synced(s.node(new)).await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    {
        return e;
    }
    // Kept from being reconfigured: it stays a writable master with its subscribers until
    // this fault makes it a replica.
    let acl = |slaveof: &'static str, replicaof: &'static str| async move {
        s.node(old)
            .cmd::<String>(&["ACL", "SETUSER", "default", slaveof, replicaof])
            .await
    };
    if let Err(e) = acl("-slaveof", "-replicaof").await {
        return format!("ACL SETUSER failed: {e}");
    }
    let mut detail = match s.try_failover().await {
        Ok(()) => {
            let switched = bounded("the switch", async {
                while s.master_port().await != Some(new) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            match switched {
                Ok(()) => format!("master {old} -> {new}"),
                Err(e) => e,
            }
        }
        Err(e) => format!("SENTINEL FAILOVER refused: {e}"),
    };
    tokio::time::sleep(hold).await;
    let _ = acl("+slaveof", "+replicaof").await;
    if s.master_port().await == Some(new) {
        let of = new.to_string();
        let demoted = s
            .node(old)
            .cmd::<String>(&["REPLICAOF", "127.0.0.1", &of])
            .await;
        let rejoined = bounded("the old master rejoining", async {
            while !synced(s.node(old)).await {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        detail = format!(
            "{detail}; old master writable {}ms more, then {}; {}",
            hold.as_millis(),
            demoted.map_or_else(
                |e| format!("REPLICAOF failed: {e}"),
                |_| "made a replica".to_owned()
            ),
            rejoined.map_or_else(|e| e, |()| "synced".to_owned())
        );
    }
    detail
}

/// Executes a sentinel `plan` (see [`plan_sentinel`]) as [`run`] does for one Redis, and
/// leaves both data nodes running, continued and replicating.
pub async fn run_sentinel(
    plan: Vec<Planned>,
    s: TestSentinels,
    cluster: Arc<Cluster>,
    start_us: u64,
    end_us: u64,
) -> (TestSentinels, Vec<FaultOp>) {
    let mut done = Vec::new();
    for (id, p) in plan.into_iter().enumerate() {
        let at = start_us + p.at_us;
        let now = now_us();
        if at > now {
            tokio::time::sleep(Duration::from_micros(at - now)).await;
        }
        if now_us() >= end_us {
            break;
        }
        let start = now_us();
        let hold = Duration::from_millis(p.hold_ms);
        let master = s.master_port().await;
        let detail = match (p.kind, master) {
            (FaultKind::SentinelFailover, _) => sentinel_failover(&s, hold).await,
            (FaultKind::Pause, Some(port)) => {
                s.node(port).pause();
                tokio::time::sleep(hold).await;
                s.node(port).resume();
                format!("stopped master {port} {}ms", p.hold_ms)
            }
            (FaultKind::ClientKillPubsub, Some(port)) => match bounded(
                "CLIENT KILL",
                s.node(port)
                    .cmd::<i64>(&["CLIENT", "KILL", "TYPE", "pubsub"]),
            )
            .await
            {
                Ok(Ok(n)) => format!("killed {n} subscription(s) on master {port}"),
                Ok(Err(e)) => format!("failed: {e}"),
                Err(e) => e,
            },
            (FaultKind::InstanceRestart, _) => {
                let i = p.instance.expect("instance");
                let d = cluster.slots[i].restart(hold).await;
                format!("pause {}ms, {d}", p.hold_ms)
            }
            (_, None) => "no master named".to_owned(),
            (other, _) => format!("{} does not apply to sentinel mode", other.name()),
        };
        done.push(FaultOp {
            id: id as u64,
            kind: p.kind,
            instance: p.instance,
            start_us: start,
            end_us: now_us(),
            detail,
        });
    }
    for node in [&s.master, &s.replica] {
        node.resume();
        let _ = node
            .cmd::<String>(&["ACL", "SETUSER", "default", "+slaveof", "+replicaof"])
            .await;
    }
    (s, done)
}

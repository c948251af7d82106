//! Telling a promotion that kept every write from a restore.
//!
//! When the master (or a cluster primary) changes, the new one may lack writes the old one
//! acknowledged: a replica promoted while behind, or a process restarted from an older file.
//! Such a change is taken for a restore, and every entry is invalidated before the new one
//! serves (see `link` and `tiered::recovery`). That makes the whole cache cold at every
//! failover, planned ones included, so a promotion is recognised as complete when Redis'
//! own replication proves it:
//!
//! - the old master, the very process the keyspace's marker names (same `run_id`), is now a
//!   replica whose history continues the new master's: it reconnected with a *partial*
//!   resynchronisation, which Redis grants only when everything the old master ever wrote is
//!   part of the new master's history (`PSYNC` is accepted when the old master's replication
//!   ID is the new one's `master_replid2` and its offset is within `second_repl_offset`; the
//!   replica then keeps that ID as its own `master_replid2`, whereas a full
//!   resynchronisation clears it);
//! - so every write the old master acknowledged, invalidations included, whoever made them,
//!   is in the new master. Nothing else is taken for proof: an old master that is gone,
//!   restarted, still a master (not yet reconfigured, so still taking writes), or that had to
//!   resynchronise in full (it wrote something after the promotion, even an expiry) leaves
//!   the change a restore.
//!
//! This is used in cluster mode, where a planned `CLUSTER FAILOVER` pauses the old primary's
//! writes until its replica has caught up and makes it a replica at once: it passes. A
//! primary that died, or restarted, does not. Sentinel mode does not use it: a
//! `SENTINEL FAILOVER` does not stop the old master's writes, which goes on taking them (an
//! expiry is one) until the sentinels reconfigure it seconds later, so its resynchronisation
//! is a full one and nothing would be proven.

use std::time::{Duration, Instant};

use std::collections::{HashMap, HashSet};

use redis::AsyncConnectionConfig;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

use super::cluster::Seeds;

/// What the check reads of one server's `INFO replication` (and `INFO server`'s `run_id`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Replication {
    /// `run_id`.
    pub(crate) run_id: String,
    /// `role:master`.
    pub(crate) master: bool,
    /// `master_replid`.
    pub(crate) replid: String,
    /// `master_replid2`.
    pub(crate) replid2: String,
    /// `second_repl_offset`.
    pub(crate) second_offset: i64,
    /// `master_link_status:up` (a replica).
    pub(crate) link_up: bool,
}

impl Replication {
    /// Reads the fields from `INFO` text (any sections; unknown fields ignored).
    pub(crate) fn parse(info: &str) -> Self {
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        Self {
            run_id: field("run_id"),
            master: field("role") == "master",
            replid: field("master_replid"),
            replid2: field("master_replid2"),
            second_offset: field("second_repl_offset").parse().unwrap_or(-1),
            link_up: field("master_link_status") == "up",
        }
    }

    /// Whether it holds a second replication ID (it continued another history).
    fn has_second_id(&self) -> bool {
        !self.replid2.is_empty()
            && self.replid2.bytes().any(|b| b != b'0')
            && self.second_offset > 0
    }
}

/// What the old master's state says of a promotion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Every write of the old master is in a current master: nothing was lost.
    Complete,
    /// The old master has not followed the new one yet (still a master, or still syncing):
    /// ask again shortly.
    NotYet,
    /// Nothing proves the promotion kept every write: a restore.
    Unproven,
}

/// Judges a promotion from the old master's state (`old`, or `None` when it could not be
/// asked) and the current masters' (`masters`). `old_run_id` and `old_replid` are the process
/// the keyspace's marker names and the replication ID it recorded for it: only that very
/// process's history, as the marker knew it, counts.
pub(crate) fn judge(
    old_run_id: &str,
    old_replid: &str,
    old: Option<&Replication>,
    masters: &[Replication],
) -> Verdict {
    let Some(old) = old else {
        return Verdict::Unproven;
    };
    if old_run_id.is_empty() || old.run_id != old_run_id {
        return Verdict::Unproven;
    }
    if old.master {
        return Verdict::NotYet;
    }
    let follows = masters.iter().find(|m| m.master && m.replid == old.replid);
    let Some(new) = follows else {
        // Following none of them (yet): still connecting, or another node's history.
        return if old.link_up {
            Verdict::Unproven
        } else {
            Verdict::NotYet
        };
    };
    // A partial resynchronisation onto the new master's history: the old master kept its own
    // former ID as its second one, which is also the new master's (the history they share),
    // and nothing of it lies beyond where the new master's own began. That former ID must be
    // the one the marker recorded for the old master: the new master continued the very
    // history the marker knew, not one of a primary in between (a failover to P, then P lost
    // and R promoted from P's history, before any instance rewrote the marker).
    let partial = old.has_second_id()
        && new.has_second_id()
        && !old_replid.is_empty()
        && old.replid2 == old_replid
        && new.replid2 == old_replid
        && old.second_offset <= new.second_offset;
    if partial {
        Verdict::Complete
    } else {
        Verdict::Unproven
    }
}

/// How long a former primary that has not followed its successor yet is waited for, counted
/// from when this instance first found the change; the instance serves from its memory tier
/// meanwhile. After a `CLUSTER FAILOVER` the old primary follows within a second, a few on a
/// loaded host; one that does not by then (cut off, still taking writes) makes the change a
/// restore. A former primary that is gone or restarted is a restore at once, with no wait.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// The change waited for, and since when.
#[derive(Debug, Default)]
pub(crate) struct Pending(std::sync::Mutex<Option<(String, Instant)>>);

impl Pending {
    /// The verdict to act on for the change to `identity`: [`Verdict::NotYet`] stays so for
    /// at most [`WAIT`] after it was first given for that change, and is then
    /// [`Verdict::Unproven`].
    pub(crate) fn settle(&self, identity: &str, verdict: Verdict) -> Verdict {
        let mut since = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if verdict != Verdict::NotYet {
            *since = None;
            return verdict;
        }
        let first = match since.as_ref() {
            Some((id, at)) if id == identity => *at,
            _ => {
                let now = Instant::now();
                *since = Some((identity.to_owned(), now));
                now
            }
        };
        if first.elapsed() < WAIT {
            Verdict::NotYet
        } else {
            *since = None;
            Verdict::Unproven
        }
    }
}

/// Cluster mode: judges the change from the primaries the keyspace's marker names (`before`:
/// `addr=run_id/replid`, comma-separated, as [`super::cluster::ClusterFacts::identity`] writes them)
/// to the current ones (`current`, and `masters`, their replication state). Every former
/// primary that is no longer one (a failover moved its slots) must be found, as the same
/// process, continuing a current primary's history; primaries only added (slots migrated to
/// a new node, which moves keys whole) need nothing. The marker is anyone's text: an address
/// in it is asked only when `CLUSTER NODES` lists it, with the seeds' credentials and the
/// connection settings `config`.
pub(crate) async fn judge_cluster(
    conn: &mut ClusterConnection,
    seeds: &Seeds,
    config: &AsyncConnectionConfig,
    before: &str,
    current: &str,
    masters: &[Replication],
) -> Verdict {
    let now: HashSet<&str> = current.split(',').collect();
    let formers: Vec<&str> = before.split(',').filter(|e| !now.contains(e)).collect();
    if formers.is_empty() {
        return Verdict::Complete;
    }
    let Ok(listed) = cluster_nodes(conn).await else {
        return Verdict::Unproven;
    };
    let mut verdict = Verdict::Complete;
    for former in formers {
        // `addr=run_id/replid`; a marker of another form proves nothing.
        let Some((addr, process)) = former.rsplit_once('=') else {
            return Verdict::Unproven;
        };
        let Some((run_id, replid)) = process.split_once('/') else {
            return Verdict::Unproven;
        };
        let state = match listed.get(addr) {
            Some((host, port)) => node_replication(seeds, config, host, *port).await,
            None => None,
        };
        match judge(run_id, replid, state.as_ref(), masters) {
            Verdict::Complete => {}
            Verdict::NotYet => verdict = Verdict::NotYet,
            Verdict::Unproven => return Verdict::Unproven,
        }
    }
    verdict
}

/// Every node `CLUSTER NODES` lists as reachable (not failed, in a handshake or without an
/// address), by `host:port`: replicas still synchronising included, which `CLUSTER SLOTS`
/// leaves out.
async fn cluster_nodes(
    conn: &mut ClusterConnection,
) -> redis::RedisResult<HashMap<String, (String, u16)>> {
    let reply = conn
        .route_command(
            redis::cmd("CLUSTER").arg("NODES").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
        )
        .await?;
    let text: String = redis::from_redis_value(reply)?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let addr = fields.nth(1)?.split(['@', ',']).next()?;
            let flags = fields.next()?;
            if flags
                .split(',')
                .any(|f| matches!(f, "fail" | "fail?" | "handshake" | "noaddr"))
            {
                return None;
            }
            let (host, port) = addr.rsplit_once(':')?;
            let port: u16 = port.parse().ok()?;
            Some((addr.to_owned(), (host.to_owned(), port)))
        })
        .collect())
}

/// `INFO server replication` of the node at `host:port`, if it answers.
async fn node_replication(
    seeds: &Seeds,
    config: &AsyncConnectionConfig,
    host: &str,
    port: u16,
) -> Option<Replication> {
    let client = seeds.node_client(host, port).ok()?;
    let mut conn = client
        .get_multiplexed_async_connection_with_config(config)
        .await
        .ok()?;
    let text: String = redis::cmd("INFO")
        .arg("server")
        .arg("replication")
        .query_async(&mut conn)
        .await
        .ok()?;
    Some(Replication::parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "aaaa";
    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const ZERO: &str = "0000000000000000000000000000000000000000";

    fn info(
        run_id: &str,
        role: &str,
        replid: &str,
        replid2: &str,
        second: i64,
        up: bool,
    ) -> Replication {
        Replication::parse(&format!(
            "# Server\r\nrun_id:{run_id}\r\n# Replication\r\nrole:{role}\r\nmaster_link_status:{}\r\nmaster_replid:{replid}\r\nmaster_replid2:{replid2}\r\nsecond_repl_offset:{second}\r\n",
            if up { "up" } else { "down" }
        ))
    }

    #[test]
    fn a_partial_resynchronisation_proves_the_promotion() {
        // The new master continued the old one's history A from offset 1001; the old one
        // reconnected at 901 (it had written nothing beyond) and took B.
        let new = info("bbbb", "master", B, A, 1001, false);
        let old = info(OLD, "slave", B, A, 901, true);
        assert_eq!(
            judge(OLD, A, Some(&old), std::slice::from_ref(&new)),
            Verdict::Complete
        );
        // Equal offsets too (nothing written after the promotion point).
        let old = info(OLD, "slave", B, A, 1001, true);
        assert_eq!(
            judge(OLD, A, Some(&old), std::slice::from_ref(&new)),
            Verdict::Complete
        );
    }

    #[test]
    fn anything_else_is_no_proof() {
        let new = info("bbbb", "master", B, A, 1001, false);
        // A full resynchronisation clears the second ID.
        let full = info(OLD, "slave", B, ZERO, -1, true);
        assert_eq!(
            judge(OLD, A, Some(&full), std::slice::from_ref(&new)),
            Verdict::Unproven
        );
        // Another process at the old address (restarted).
        let other = info("cccc", "slave", B, A, 901, true);
        assert_eq!(
            judge(OLD, A, Some(&other), std::slice::from_ref(&new)),
            Verdict::Unproven
        );
        // Beyond the new master's start of history.
        let beyond = info(OLD, "slave", B, A, 1002, true);
        assert_eq!(
            judge(OLD, A, Some(&beyond), std::slice::from_ref(&new)),
            Verdict::Unproven
        );
        // Gone.
        assert_eq!(
            judge(OLD, A, None, std::slice::from_ref(&new)),
            Verdict::Unproven
        );
        // A new master that continued another history than the one the marker recorded (a
        // primary in between).
        assert_eq!(
            judge(
                OLD,
                B,
                Some(&info(OLD, "slave", B, A, 901, true)),
                std::slice::from_ref(&new)
            ),
            Verdict::Unproven
        );
        // A marker without a run id.
        let old = info("", "slave", B, A, 901, true);
        assert_eq!(
            judge("", A, Some(&old), std::slice::from_ref(&new)),
            Verdict::Unproven
        );
    }

    #[test]
    fn an_old_master_not_yet_following_is_asked_again() {
        let new = info("bbbb", "master", B, A, 1001, false);
        let still_master = info(OLD, "master", A, ZERO, -1, false);
        assert_eq!(
            judge(OLD, A, Some(&still_master), std::slice::from_ref(&new)),
            Verdict::NotYet
        );
        let syncing = info(OLD, "slave", A, ZERO, -1, false);
        assert_eq!(
            judge(OLD, A, Some(&syncing), std::slice::from_ref(&new)),
            Verdict::NotYet
        );
    }
}

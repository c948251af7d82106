//! The event stream in the checker: every instance reads `{prefix}:events` (with
//! `events.max_deliveries = 2`), the writer delivers some of its events there instead of over
//! HTTP (acknowledged when the group has delivered the entry and nothing of it is pending:
//! applied, or dead-lettered after its fallback), and the poisoned-entry fault appends an
//! event whose invalidation always fails (its run's tag set is a string), for a run no reader
//! reads, so that it is dead-lettered while the entries behind it must still be applied.

use std::time::Duration;

use runcache::store::Keyspace;

use crate::history::now_us;

/// The consumer group (runcache's default).
pub const GROUP: &str = "runcache";

/// How a poisoned-entry fault's detail starts when the entry was set aside in time, and when
/// it was not (a violation, `check.rs`, unless a fault could have lost the entry).
pub const DEAD_LETTERED: &str = "dead-lettered:";
pub const NOT_DEAD_LETTERED: &str = "not dead-lettered:";

/// How long the writer waits for a stream entry to be applied; one not applied by then, with
/// no fault that could have lost it, is a violation (`check.rs`).
pub const ACK_WAIT: Duration = Duration::from_secs(10);

/// Whether the group has delivered `ARGV[2]` and it is not pending: `KEYS[1]` the stream,
/// `ARGV[1]` the group. Returns the group's last-delivered ID, or 0 while it is pending (or
/// the stream or group is gone).
const ACKED: &str = r#"
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) > 0 then return 0 end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] end
    if g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  if name == ARGV[1] then return last end
end
return 0
"#;

/// The stream every instance reads, and how to reach its Redis.
#[derive(Debug, Clone)]
pub struct StreamSide {
    pub name: String,
    prefix: String,
    /// One Redis (`Single`) or a cluster's seeds.
    urls: Vec<String>,
    clustered: bool,
}

fn id_of(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

impl StreamSide {
    pub fn new(prefix: &str, urls: Vec<String>, clustered: bool) -> Self {
        Self {
            name: format!("{prefix}:events"),
            prefix: prefix.to_owned(),
            urls,
            clustered,
        }
    }

    /// Whether events may go through the stream. Not in Sentinel mode, where the stream's
    /// master moves under the writer (an entry lost in a failover is not what that run checks).
    pub fn enabled(&self) -> bool {
        !self.urls.is_empty()
    }

    /// One command on a connection of its own (Redis restarts under the checker), bounded.
    async fn cmd<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> redis::RedisResult<T> {
        let run = async {
            if self.clustered {
                let mut conn = redis::cluster::ClusterClient::builder(self.urls.clone())
                    .connection_timeout(Duration::from_secs(1))
                    .response_timeout(Duration::from_secs(2))
                    .build()?
                    .get_async_connection()
                    .await?;
                cmd.query_async(&mut conn).await
            } else {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    .set_response_timeout(Some(Duration::from_secs(2)));
                let mut conn = redis::Client::open(self.urls[0].as_str())?
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                cmd.query_async(&mut conn).await
            }
        };
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .unwrap_or_else(|_| Err((redis::ErrorKind::Io, "timed out").into()))
    }

    /// Appends a `training-completed` event for `run_id`; its entry ID.
    pub async fn append(&self, run_id: &str) -> redis::RedisResult<String> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.name)
            .arg("*")
            .arg("kind")
            .arg("training-completed")
            .arg("model_run_id")
            .arg(run_id);
        self.cmd(cmd).await
    }

    /// Whether entry `id` is applied and acknowledged.
    pub async fn acked(&self, id: &str) -> bool {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(ACKED).arg(1).arg(&self.name).arg(GROUP).arg(id);
        match self.cmd::<redis::Value>(cmd).await {
            Ok(redis::Value::BulkString(last)) => {
                let last = String::from_utf8_lossy(&last).into_owned();
                matches!((id_of(&last), id_of(id)), (Some(l), Some(i)) if l >= i)
            }
            _ => false,
        }
    }

    /// Polls until entry `id` is acknowledged or `within` passes; the time it was seen
    /// acknowledged (later than it was: a late acknowledgement constrains fewer reads, so the
    /// check stays sound).
    pub async fn wait_acked(&self, id: &str, within: Duration) -> Option<u64> {
        let deadline = now_us() + u64::try_from(within.as_micros()).unwrap_or(u64::MAX);
        while now_us() < deadline {
            if self.acked(id).await {
                return Some(now_us());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// The poisoned-entry fault: the tag set of run `poison-{n}` becomes a string (every
    /// invalidation of that run fails with `WRONGTYPE`), an event for it is appended, and once
    /// it is acknowledged (dead-lettered) the key is removed. Returns what happened.
    pub async fn poison(&self, n: u64) -> String {
        let run = format!("poison-{n}");
        let keys = if self.clustered {
            Keyspace::clustered(self.prefix.clone())
        } else {
            Keyspace::new(self.prefix.clone())
        };
        let tag = keys.run_tag("v1", &run);
        let mut set = redis::cmd("SET");
        set.arg(&tag).arg("poisoned");
        if let Err(e) = self.cmd::<()>(set).await {
            return format!("SET failed: {e}");
        }
        let started = now_us();
        let outcome = match self.append(&run).await {
            Ok(id) => match self.wait_acked(&id, ACK_WAIT).await {
                Some(t) => format!(
                    "{DEAD_LETTERED} entry {id} for {run} acknowledged after {}ms",
                    (t - started) / 1_000
                ),
                None => format!(
                    "{NOT_DEAD_LETTERED} entry {id} for {run} not acknowledged within {ACK_WAIT:?}"
                ),
            },
            Err(e) => format!("XADD failed: {e}"),
        };
        let mut del = redis::cmd("DEL");
        del.arg(&tag);
        let _ = self.cmd::<i64>(del).await;
        outcome
    }
}

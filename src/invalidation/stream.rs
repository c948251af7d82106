//! Durable event intake: the training system appends events to a Redis stream
//! (`events.stream`) whether or not any runcache is up, and every instance reads them through
//! one consumer group.
//!
//! - An instance reads its own pending entries first (ID `0`: those it read and did not
//!   acknowledge before it stopped or failed), then new ones (`>`).
//! - An entry is acknowledged (`XACK`) only once its invalidation is applied, so an entry
//!   whose instance dies is still pending, and `XAUTOCLAIM` hands it to a live one after
//!   `events.stream_claim_idle_ms`. Applying an event twice is harmless.
//! - Trimming (`MAXLEN ~ N`) may drop entries nobody read, without an error. Each read runs in
//!   one Lua script with the check for that (see [`READ`]), so the evidence cannot be read
//!   past unnoticed; a gap is recorded in a flag key beside the stream, and whichever instance
//!   sees the flag drops every entry and empties every near cache before it clears the flag.
//!   The flag outlives an instance that dies before it has handled it.
//!
//! The loop has its own connection: a blocking read would hold up every command multiplexed
//! behind it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::Value;
use tokio_util::sync::CancellationToken;

use super::dead_letter::{self, DeadLetter};
use super::{Cause, Invalidator};
use crate::domain::EventKinds;
use crate::metrics::audit::AuditTrail;
use crate::metrics::names;
use crate::store::redis::RedisStore;

/// One read step, atomic: creates the group if it is missing, checks for a gap, reads.
///
/// `KEYS`: the stream, the gap flag, the delivered counter. `ARGV`: group, consumer, count,
/// start ID (`0` for this consumer's pending entries, `>` for new ones), whether this process
/// has seen the group before (`1`: its disappearance, with the stream deleted or Redis
/// restarted empty, may have lost events).
///
/// A gap: every entry left in the stream (or none is left) comes after the group's
/// last-delivered ID, and more entries were added than were delivered and are left. The
/// count of deliveries is kept by this script itself (the delivered counter, bumped by every
/// `>` read), not taken from `XINFO GROUPS`: Redis 7.0 leaves the group's `entries-read` and
/// `lag` too high or too low once a trim passed its last-delivered ID, and later versions
/// compute them otherwise. A counter that is missing (a group created by another client) is
/// set from the group's `entries-read`. Once a gap is flagged the counter is set as if every
/// entry removed had been read, so one gap is flagged once. Entries that were delivered here
/// but trimmed before they were acknowledged come back without fields: a gap too.
///
/// Returns `{created, flag, entries, last-generated-id, lag (-1: unknown), pending}`.
pub const READ: &str = r#"
local stream, flag, delivered = KEYS[1], KEYS[2], KEYS[3]
local group, consumer, count, start, seen = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local function field(arr, name)
  for i = 1, #arr, 2 do if arr[i] == name then return arr[i + 1] end end
  return nil
end
-- Stream IDs compared exactly (as decimal strings: Lua numbers lose precision past 2^53).
local function less(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local function after(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if am ~= bm then return less(bm, am) end
  return less(bs, as)
end
local created = 0
local made = redis.pcall('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
if type(made) == 'table' and made.err then
  if not string.find(made.err, 'BUSYGROUP', 1, true) then return redis.error_reply(made.err) end
else
  created = 1
end
local st = redis.call('XINFO', 'STREAM', stream)
local added, length = field(st, 'entries-added'), field(st, 'length')
local lag, pending = -1, 0
if created == 1 then
  -- Entries removed before the group existed were nobody's to read.
  redis.call('SET', delivered, added - length)
  if seen == '1' then redis.call('INCR', flag) end
else
  local info
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    if field(g, 'name') == group then info = g end
  end
  local l = field(info, 'lag')
  if l then lag = l end
  pending = field(info, 'pending')
  local read = tonumber(redis.call('GET', delivered))
  if not read then
    read = field(info, 'entries-read') or (added - length)
    redis.call('SET', delivered, read)
  end
  local first = field(st, 'first-entry')
  local past = (not first) or after(first[1], field(info, 'last-delivered-id'))
  if past and added - read > length then
    redis.call('INCR', flag)
    redis.call('SET', delivered, added - length)
  end
end
local got = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', stream, start)
if got then
  if start == '0' then
    for _, e in ipairs(got[1][2]) do
      if not e[2] then redis.call('INCR', flag) break end
    end
  else
    redis.call('INCRBY', delivered, #got[1][2])
  end
end
return {created, redis.call('GET', flag), got, field(st, 'last-generated-id'), lag, pending}
"#;

/// Takes over entries other consumers left pending for `min-idle` ms. `KEYS`: the stream, the
/// gap flag; `ARGV`: group, consumer, min-idle, start, count. Entries trimmed while pending
/// (`XAUTOCLAIM`'s third list) were never applied: a gap. Returns `{next, entries, flag}`.
pub const CLAIM: &str = r#"
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
if r[3] and #r[3] > 0 then redis.call('INCR', KEYS[2]) end
return {r[1], r[2], redis.call('GET', KEYS[2])}
"#;

/// Clears the gap flag if it still holds the value that was handled: a gap flagged meanwhile
/// stays flagged.
const CLEAR_FLAG: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// What the loop needs.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// The stream's key.
    pub stream: String,
    /// The consumer group.
    pub group: String,
    /// This instance's consumer name.
    pub consumer: String,
    /// Longest blocking wait for new entries.
    pub block: Duration,
    /// Pending time after which another consumer's entries are taken over.
    pub claim_idle: Duration,
    /// Entries per read.
    pub batch: usize,
    /// Deliveries after which an entry that still fails is dead-lettered.
    pub max_deliveries: u64,
    /// Connect time-out, and the pause before trying again after a failure.
    pub retry: Duration,
    /// Time-out of one command (the blocking read gets `block` on top).
    pub command_timeout: Duration,
    /// The event kinds (`events.kinds`): what each entry's `kind` invalidates.
    pub kinds: Arc<EventKinds>,
}

/// The key of the group's gap flag (`what` = `gap`) or delivered counter (`delivered`):
/// named after the stream, so an ACL that grants the stream's pattern grants them too, and in
/// the stream's hash slot (a Redis Cluster runs a script only over keys of one slot): a
/// stream name without a hash tag is hashed whole, which the `{stream}` tag added here
/// matches; a name with one keeps it first.
pub fn side_key(stream: &str, what: &str, group: &str) -> String {
    format!("{stream}:{what}:{{{stream}}}:{group}")
}

/// One stream entry: its ID and its fields (none: trimmed while pending here).
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    id: String,
    fields: Option<Vec<(String, String)>>,
}

/// An entry that names tags to invalidate.
#[derive(Debug)]
struct Event {
    id: String,
    /// The tags its kind and fields name (two for an id that may be a float: `run:42` and
    /// `run:42.0`).
    tags: Vec<String>,
    fields: Vec<(String, String)>,
}

impl Event {
    /// Its tags, as one text for logs and audit lines.
    fn runs(&self) -> String {
        self.tags.join(" ")
    }

    /// Its kind.
    fn kind(&self) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == "kind")
            .map_or("event", |(_, v)| v.as_str())
    }
}

/// Events applied in one invalidation (one round of counter bumps, one publication).
const APPLY_TOGETHER: usize = 100;

/// The outcome of one read step.
#[derive(Debug, Default)]
struct Read {
    created: bool,
    flag: Option<String>,
    entries: Vec<Entry>,
    last_id: String,
    lag: i64,
    pending: i64,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => text(other).and_then(|t| t.parse().ok()).unwrap_or(0),
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

/// Entries from a list of `[id, [field, value, …] | nil]`.
fn entries(list: &Value) -> Vec<Entry> {
    items(list)
        .iter()
        .filter_map(|e| {
            let parts = items(e);
            let id = text(parts.first()?)?;
            let fields = match parts.get(1) {
                Some(Value::Array(kv)) => Some(
                    kv.chunks(2)
                        .filter_map(|p| Some((text(p.first()?)?, text(p.get(1)?)?)))
                        .collect(),
                ),
                _ => None,
            };
            Some(Entry { id, fields })
        })
        .collect()
}

fn parse_read(v: &Value) -> Read {
    let parts = items(v);
    let get = |i: usize| parts.get(i).unwrap_or(&Value::Nil);
    // XREADGROUP's reply: `[[stream, [entries…]]]`, or nil when nothing is there.
    let listed = items(get(2))
        .first()
        .and_then(|s| items(s).get(1))
        .map(entries)
        .unwrap_or_default();
    Read {
        created: int(get(0)) == 1,
        flag: text(get(1)),
        entries: listed,
        last_id: text(get(3)).unwrap_or_else(|| "0-0".into()),
        lag: int(get(4)),
        pending: int(get(5)),
    }
}

/// What an entry asks for: the tags to invalidate, or why it cannot be applied. Its `kind`
/// is one of `events.kinds`, and its other fields are those the kind's tags name. A stream
/// field is untyped text, read by the one id parser as every id it may name (`42.0` is the id
/// `42`, as in a JSON event, and may be the string id `42.0`: both are invalidated).
fn event_of(kinds: &EventKinds, fields: &[(String, String)]) -> Result<Vec<String>, String> {
    let mut named = std::collections::BTreeMap::new();
    for (k, v) in fields {
        named.insert(k.clone(), v.clone());
    }
    let kind = named.remove("kind").ok_or("no kind field")?;
    match kinds.tags_of_text(&kind, &named) {
        Some(result) => result,
        None => Err(format!(
            "kind {:?} is not one of events.kinds ({})",
            kind.chars().take(64).collect::<String>(),
            kinds.names().collect::<Vec<_>>().join(", ")
        )),
    }
}

/// The consumer loop.
pub struct StreamIntake {
    /// Where the client comes from at each connection (in sentinel mode, the master moves).
    redis: RedisStore,
    invalidator: Invalidator,
    /// Applied events are recorded there, as the HTTP events are.
    audit: Arc<AuditTrail>,
    opts: StreamOptions,
    flag: String,
    /// The group's delivered counter (see [`READ`]).
    delivered: String,
    /// Set once start-up is done: the shared key version is known, so events invalidate the
    /// keys readers use (an event applied under the configured version, after an operator
    /// switched it, would be acknowledged and invalidate nothing that is served).
    started: Arc<AtomicBool>,
    conn: Option<crate::store::redis::cluster::Handle>,
    /// The address `conn` goes to.
    conn_target: Option<String>,
    /// Whether this process has seen the group (its disappearance is then a gap).
    seen: bool,
    /// Whether this consumer's own pending entries are still to be read (at start, and after
    /// a failure left some unacknowledged).
    own_pending: bool,
    /// When they are read again (`None`: at once). An entry whose invalidation failed is
    /// retried at this pace, not at every step: each read of it resets its idle time and
    /// counts a delivery, and new entries are read in between.
    retry_at: Option<Instant>,
    /// The group's dead-letter stream (see [`dead_letter`]).
    dead: String,
    last_claim: Option<Instant>,
    /// Whether the last failure was logged (one line per outage).
    failing: bool,
}

impl std::fmt::Debug for StreamIntake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamIntake")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// Why a step stopped early.
#[derive(Debug)]
enum StepError {
    /// Redis failed or is unreachable.
    Redis(redis::RedisError),
    /// A command timed out.
    Timeout,
    /// An invalidation failed; its entry stays pending.
    Apply(String),
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Redis(e) => write!(f, "redis: {e}"),
            StepError::Timeout => f.write_str("redis command timed out"),
            StepError::Apply(e) => write!(f, "invalidation failed: {e}"),
        }
    }
}

impl From<redis::RedisError> for StepError {
    fn from(e: redis::RedisError) -> Self {
        StepError::Redis(e)
    }
}

impl StreamIntake {
    /// A loop over `opts.stream`, connecting to the Redis `redis` uses and applying through
    /// `invalidator`.
    pub fn new(
        redis: RedisStore,
        invalidator: Invalidator,
        opts: StreamOptions,
        started: Arc<AtomicBool>,
        audit: Arc<AuditTrail>,
    ) -> Self {
        let flag = side_key(&opts.stream, "gap", &opts.group);
        let delivered = side_key(&opts.stream, "delivered", &opts.group);
        let dead = side_key(&opts.stream, "dead", &opts.group);
        Self {
            redis,
            invalidator,
            opts,
            flag,
            delivered,
            started,
            audit,
            conn: None,
            conn_target: None,
            seen: false,
            own_pending: true,
            retry_at: None,
            dead,
            last_claim: None,
            failing: false,
        }
    }

    /// Reads and applies events until `cancel`; Redis failures are retried every
    /// `opts.retry`. An entry being applied when `cancel` fires stays pending, for the next
    /// start or another instance.
    pub async fn run(mut self, cancel: CancellationToken) {
        while !self.started.load(Ordering::Acquire) {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        tracing::info!(stream = %self.opts.stream, group = %self.opts.group, consumer = %self.opts.consumer, "reading events from the stream");
        loop {
            let step = tokio::select! {
                () = cancel.cancelled() => return,
                step = self.step() => step,
            };
            match step {
                Ok(Some(last_id)) => {
                    // Not past the next retry of a failed entry.
                    let block = match self.retry_at {
                        Some(at) if self.own_pending => at
                            .saturating_duration_since(Instant::now())
                            .min(self.opts.block),
                        _ => self.opts.block,
                    };
                    let waited = tokio::select! {
                        () = cancel.cancelled() => return,
                        ok = self.wait_for_entries(&last_id, block) => ok,
                    };
                    if !waited {
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(self.opts.retry) => {}
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    if !self.failing {
                        tracing::warn!(stream = %self.opts.stream, error = %e, "event stream: reading failed; retrying");
                    }
                    self.failing = true;
                    self.own_pending = true;
                    self.retry_at = None;
                    if !matches!(e, StepError::Apply(_)) {
                        self.conn = None;
                    }
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(self.opts.retry) => {}
                    }
                }
            }
        }
    }

    async fn conn(&mut self) -> Result<crate::store::redis::cluster::Handle, StepError> {
        // In sentinel mode the request path follows the master; so does this loop.
        let target = self.redis.dedicated_target();
        if self.conn_target.as_deref() != Some(target.as_str()) {
            self.conn = None;
        }
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let (c, target) = self
            .redis
            .dedicated(self.opts.retry, self.opts.block + self.opts.command_timeout)
            .await?;
        self.conn = Some(c.clone());
        self.conn_target = Some(target);
        Ok(c)
    }

    async fn query<T: redis::FromRedisValue + Send>(
        &mut self,
        cmd: redis::Cmd,
    ) -> Result<T, StepError> {
        let mut c = self.conn().await?;
        tokio::time::timeout(self.opts.command_timeout, cmd.query_async(&mut c))
            .await
            .map_err(|_| StepError::Timeout)?
            .map_err(StepError::Redis)
    }

    /// One step: a read (own pending entries when they are due, else new ones), the gap it
    /// may have found, the entries applied and acknowledged, and now and then a claim of
    /// entries dead consumers left. Returns the stream's last ID when nothing new was there
    /// (the loop then waits for more).
    async fn step(&mut self) -> Result<Option<String>, StepError> {
        let retry = self.own_pending && self.retry_at.is_none_or(|at| Instant::now() >= at);
        let start = if retry { "0" } else { ">" };
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(READ)
            .arg(3)
            .arg(&self.opts.stream)
            .arg(&self.flag)
            .arg(&self.delivered)
            .arg(&self.opts.group)
            .arg(&self.opts.consumer)
            .arg(self.opts.batch)
            .arg(start)
            .arg(if self.seen { "1" } else { "0" });
        let reply: Value = self.query(cmd).await?;
        let read = parse_read(&reply);
        if read.created {
            tracing::info!(stream = %self.opts.stream, group = %self.opts.group, "event stream: consumer group created");
        }
        self.seen = true;
        if self.failing {
            tracing::info!(stream = %self.opts.stream, "event stream: reading again");
            self.failing = false;
        }
        metrics::gauge!(names::STREAM_LAG).set(read.lag as f64);
        metrics::gauge!(names::STREAM_PENDING).set(read.pending as f64);
        self.handle_gap(read.flag.as_deref()).await?;
        let empty = read.entries.is_empty();
        let failed = self.apply(read.entries).await? + self.claim().await?;
        if retry {
            if empty {
                self.own_pending = false;
                self.retry_at = None;
            } else {
                // Read again at once while they are applied (there may be more than a read
                // holds); after a failure, at the retry pace, reading new ones meanwhile.
                self.retry_at = (failed > 0).then(|| Instant::now() + self.opts.retry);
            }
            return Ok(None);
        }
        if failed > 0 && !self.own_pending {
            self.own_pending = true;
            self.retry_at = Some(Instant::now() + self.opts.retry);
        }
        Ok(empty.then_some(read.last_id))
    }

    /// Drops everything if a gap is flagged, then clears the flag (if no newer gap was).
    async fn handle_gap(&mut self, flag: Option<&str>) -> Result<(), StepError> {
        let Some(value) = flag else {
            return Ok(());
        };
        tracing::warn!(stream = %self.opts.stream, "event stream: entries were trimmed before any instance read them; dropping every entry");
        let dropped = self
            .invalidator
            .everything(Cause::StreamGap)
            .await
            .map_err(|e| StepError::Apply(e.to_string()))?;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(CLEAR_FLAG).arg(1).arg(&self.flag).arg(value);
        let cleared: i64 = self.query(cmd).await?;
        if cleared == 1 {
            metrics::counter!(names::STREAM_GAPS_TOTAL).increment(1);
        }
        tracing::warn!(stream = %self.opts.stream, dropped, "event stream: gap handled");
        Ok(())
    }

    /// Applies `entries` and acknowledges those applied (and those that cannot be: malformed,
    /// or trimmed while pending, which the gap flag covers). Runs are invalidated together,
    /// [`APPLY_TOGETHER`] to one invalidation (applying an event twice is harmless, and so is
    /// applying them out of order); when that fails, one by one, so that one entry that fails
    /// holds up no other. An entry that fails stays pending, to be read again, until its
    /// deliveries reach `max_deliveries`: then it is dead-lettered. Returns the entries left
    /// pending.
    async fn apply(&mut self, entries: Vec<Entry>) -> Result<usize, StepError> {
        let mut done = Vec::with_capacity(entries.len());
        let mut events = Vec::with_capacity(entries.len());
        for entry in entries {
            let Some(fields) = entry.fields else {
                done.push(entry.id);
                continue;
            };
            match event_of(&self.opts.kinds, &fields) {
                Ok(tags) => events.push(Event {
                    id: entry.id,
                    tags,
                    fields,
                }),
                Err(why) => {
                    tracing::warn!(stream_id = %entry.id, reason = %why, "event-stream entry ignored (acknowledged, so it does not come back)");
                    metrics::counter!(names::STREAM_EVENTS_TOTAL, "outcome" => "invalid")
                        .increment(1);
                    done.push(entry.id);
                }
            }
        }
        let mut failed = Vec::new();
        for chunk in events.chunks(APPLY_TOGETHER) {
            let tags: Vec<String> = chunk.iter().flat_map(|e| e.tags.clone()).collect();
            match self.invalidator.tags(&tags, Cause::Event).await {
                Ok(n) => {
                    tracing::info!(
                        events = chunk.len(),
                        invalidated = n,
                        "events from the stream applied"
                    );
                    for (i, event) in chunk.iter().enumerate() {
                        // The entries dropped are counted once, on the first of the batch.
                        self.applied(event, if i == 0 { n } else { 0 });
                        done.push(event.id.clone());
                    }
                }
                Err(_) => {
                    for event in chunk {
                        match self.invalidator.tags(&event.tags, Cause::Event).await {
                            Ok(n) => {
                                self.applied(event, n);
                                done.push(event.id.clone());
                            }
                            Err(e) => failed.push((event, e.to_string())),
                        }
                    }
                }
            }
        }
        for ids in done.chunks(APPLY_TOGETHER.max(1)) {
            let mut ack = redis::cmd("XACK");
            ack.arg(&self.opts.stream).arg(&self.opts.group).arg(ids);
            let _: i64 = self.query(ack).await?;
        }
        let mut pending = 0;
        for (event, error) in failed {
            if !self.dead_letter_if_due(event, &error).await? {
                pending += 1;
            }
        }
        Ok(pending)
    }

    /// Records one event applied (`n` entries dropped).
    fn applied(&self, event: &Event, n: u64) {
        self.audit
            .record("stream", &event.id, event.kind(), &event.runs(), n);
        metrics::counter!(names::STREAM_EVENTS_TOTAL, "outcome" => "applied").increment(1);
    }

    /// Sets `event`, whose invalidation failed with `error`, aside in the dead-letter stream
    /// once it has been delivered `max_deliveries` times: first every view its kind's tags can
    /// touch is invalidated instead (promise 1 holds without the tags' own keys, which may be
    /// what fails), then the entry is acknowledged and copied to the dead-letter stream, in
    /// one script. Returns whether it is no longer pending.
    async fn dead_letter_if_due(&mut self, event: &Event, error: &str) -> Result<bool, StepError> {
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(&self.opts.stream)
            .arg(&self.opts.group)
            .arg(&event.id)
            .arg(&event.id)
            .arg(1);
        let reply: Value = self.query(cmd).await?;
        let deliveries = dead_letter::deliveries(&reply);
        if deliveries < self.opts.max_deliveries {
            tracing::debug!(stream_id = %event.id, deliveries, error, "event-stream entry failed; it is read again");
            return Ok(false);
        }
        let tag_kinds = self.opts.kinds.tag_kinds(event.kind());
        if let Err(e) = self
            .invalidator
            .views_of_kinds(&tag_kinds, Cause::StreamDeadLetter)
            .await
        {
            tracing::warn!(stream_id = %event.id, error = %e, "event stream: the fallback for an entry that keeps failing failed too; it stays pending");
            return Ok(false);
        }
        let letter = DeadLetter {
            id: &event.id,
            error,
            deliveries,
            consumer: &self.opts.consumer,
            fields: &event.fields,
        };
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(dead_letter::SET_ASIDE)
            .arg(2)
            .arg(&self.opts.stream)
            .arg(&self.dead)
            .arg(&self.opts.group)
            .arg(&event.id)
            .arg(dead_letter::MAX_LEN)
            .arg(letter.fields());
        let kept = letter.fields();
        let moved: i64 = match self.query(cmd).await {
            Ok(moved) => moved,
            // The dead-letter stream refused the entry (a key of another type, an ACL without
            // XADD on it): the fallback is applied, so the entry is acknowledged all the same,
            // counted and logged whole, rather than lost silently or read again for ever.
            Err(StepError::Redis(e)) if !crate::store::redis::link::is_connection_error(&e) => {
                let mut ack = redis::cmd("XACK");
                ack.arg(&self.opts.stream)
                    .arg(&self.opts.group)
                    .arg(&event.id);
                // 0 when the script acknowledged it before its XADD was refused (an ACL):
                // given up here either way.
                let _: i64 = self.query(ack).await?;
                self.invalidator.record_dead_letter();
                tracing::error!(stream = %self.opts.stream, dead_letter = %self.dead, stream_id = %event.id, fields = ?kept, deliveries, error, refused = %e, "event stream: an entry kept failing and the dead-letter stream refused it; it is acknowledged and logged here instead, and every view its kind's tags can touch was invalidated");
                return Ok(true);
            }
            Err(e) => return Err(e),
        };
        if moved == 1 {
            self.invalidator.record_dead_letter();
            tracing::error!(stream = %self.opts.stream, dead_letter = %self.dead, stream_id = %event.id, tags = %event.runs(), deliveries, error, "event stream: an entry kept failing; it is set aside in the dead-letter stream, and every view its kind's tags can touch was invalidated instead");
        }
        Ok(true)
    }

    /// Every `claim_idle / 2`, takes over and applies the entries other consumers have left
    /// pending for `claim_idle` (an instance that died after reading them).
    /// Returns the entries taken over and left pending (now this consumer's own).
    async fn claim(&mut self) -> Result<usize, StepError> {
        let every = self.opts.claim_idle / 2;
        if self.last_claim.is_some_and(|t| t.elapsed() < every) {
            return Ok(0);
        }
        let mut failed = 0;
        self.last_claim = Some(Instant::now());
        let idle = u64::try_from(self.opts.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let mut cursor = "0-0".to_owned();
        // Bounded: a stream with more pending entries than this is claimed over later steps.
        for _ in 0..100 {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(CLAIM)
                .arg(2)
                .arg(&self.opts.stream)
                .arg(&self.flag)
                .arg(&self.opts.group)
                .arg(&self.opts.consumer)
                .arg(idle)
                .arg(&cursor)
                .arg(self.opts.batch);
            let reply: Value = self.query(cmd).await?;
            let parts = items(&reply);
            let next = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
            let claimed = parts.get(1).map(entries).unwrap_or_default();
            let flag = parts.get(2).and_then(text);
            if !claimed.is_empty() {
                tracing::info!(stream = %self.opts.stream, entries = claimed.len(), "event stream: took over entries another consumer left pending");
                metrics::counter!(names::STREAM_CLAIMED_TOTAL).increment(claimed.len() as u64);
            }
            self.handle_gap(flag.as_deref()).await?;
            failed += self.apply(claimed).await?;
            if next == "0-0" {
                break;
            }
            cursor = next;
        }
        Ok(failed)
    }

    /// Waits until the stream has an entry after `last_id`, or `block` passes (then the loop
    /// runs its claim and gap checks again). Returns `false` when the wait failed (a Redis
    /// that refuses blocking commands, say): the loop then pauses as after any failure.
    async fn wait_for_entries(&mut self, last_id: &str, block: Duration) -> bool {
        let block = u64::try_from(block.as_millis()).unwrap_or(u64::MAX);
        // `BLOCK 0` would wait for ever: a retry is due now.
        if block == 0 {
            return true;
        }
        let Ok(mut c) = self.conn().await else {
            return false;
        };
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(block)
            .arg("STREAMS")
            .arg(&self.opts.stream)
            .arg(last_id);
        let wait = self.opts.block + self.opts.command_timeout;
        match tokio::time::timeout(wait, cmd.query_async::<Value>(&mut c)).await {
            Ok(Ok(_)) => true,
            Ok(Err(_)) | Err(_) => {
                self.conn = None;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn side_keys_start_with_the_stream_and_share_its_hash_slot() {
        assert_eq!(
            side_key("runcache:events", "gap", "g"),
            "runcache:events:gap:{runcache:events}:g"
        );
        // The stream's own tag comes first, so it decides the slot.
        assert_eq!(side_key("ev{42}", "gap", "g"), "ev{42}:gap:{ev{42}}:g");
    }

    #[test]
    fn events_are_validated() {
        let kinds = crate::config::Settings::load_from(None, Some(Default::default()))
            .expect("default settings")
            .event_kinds()
            .expect("the shipped kinds");
        let event_of = |fields: &[(String, String)]| event_of(&kinds, fields);
        let f = |kind: &str, id: &str| {
            vec![
                ("kind".to_owned(), kind.to_owned()),
                ("model_run_id".to_owned(), id.to_owned()),
            ]
        };
        assert_eq!(
            event_of(&f("training-completed", "42")),
            Ok(vec!["run:42".into()])
        );
        assert_eq!(
            event_of(&f("model-deleted", "r-1")),
            Ok(vec!["run:r-1".into()])
        );
        assert_eq!(
            event_of(&f("model-deleted", "42.0")),
            Ok(vec!["run:42".into(), "run:42.0".into()])
        );
        assert_eq!(
            event_of(&[
                ("kind".into(), "dataset-updated".into()),
                ("dataset_id".into(), "7".into())
            ]),
            Ok(vec!["dataset:7".into()])
        );
        assert!(event_of(&f("training-started", "42")).is_err());
        assert!(event_of(&f("training-failed", "")).is_err());
        assert!(event_of(&[("kind".into(), "model-deleted".into())]).is_err());
    }

    #[test]
    fn a_read_reply_is_parsed_with_trimmed_entries_kept() {
        let reply = Value::Array(vec![
            Value::Int(0),
            bulk("3"),
            Value::Array(vec![Value::Array(vec![
                bulk("s"),
                Value::Array(vec![
                    Value::Array(vec![
                        bulk("1-0"),
                        Value::Array(vec![bulk("kind"), bulk("model-deleted")]),
                    ]),
                    Value::Array(vec![bulk("2-0"), Value::Nil]),
                ]),
            ])]),
            bulk("5-0"),
            Value::Int(-1),
            Value::Int(2),
        ]);
        let read = parse_read(&reply);
        assert!(!read.created);
        assert_eq!(read.flag.as_deref(), Some("3"));
        assert_eq!(read.last_id, "5-0");
        assert_eq!((read.lag, read.pending), (-1, 2));
        assert_eq!(
            read.entries,
            [
                Entry {
                    id: "1-0".into(),
                    fields: Some(vec![("kind".into(), "model-deleted".into())]),
                },
                Entry {
                    id: "2-0".into(),
                    fields: None
                },
            ]
        );
        let nothing = parse_read(&Value::Array(vec![
            Value::Int(1),
            Value::Nil,
            Value::Nil,
            bulk("0-0"),
            Value::Int(-1),
            Value::Int(0),
        ]));
        assert!(nothing.created && nothing.entries.is_empty() && nothing.flag.is_none());
    }
}

//! What the checker records: every read, every event (write) and every fault, with start and
//! end times in microseconds on one monotonic clock started with the test.

use std::sync::OnceLock;
use std::time::Instant;

static T0: OnceLock<Instant> = OnceLock::new();

/// Starts the clock (idempotent).
pub fn start_clock() {
    T0.get_or_init(Instant::now);
}

/// Microseconds since the clock started (monotonic).
pub fn now_us() -> u64 {
    u64::try_from(T0.get_or_init(Instant::now).elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// `us` as seconds with millisecond precision, for the summary.
pub fn secs(us: u64) -> String {
    format!("{:.3}s", us as f64 / 1e6)
}

/// The credentials readers use. The origin's rules for them are in [`Cred::refusal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cred {
    Alice,
    Bob,
    Carol,
    Anonymous,
}

impl Cred {
    pub const ALL: [Cred; 4] = [Cred::Alice, Cred::Bob, Cred::Carol, Cred::Anonymous];

    pub fn name(self) -> &'static str {
        match self {
            Cred::Alice => "alice",
            Cred::Bob => "bob",
            Cred::Carol => "carol",
            Cred::Anonymous => "anonymous",
        }
    }

    /// The `Authorization` header sent, if any.
    pub fn header(self) -> Option<&'static str> {
        match self {
            Cred::Alice => Some("Bearer alice"),
            Cred::Bob => Some("Bearer bob"),
            Cred::Carol => Some("Bearer carol"),
            Cred::Anonymous => None,
        }
    }

    /// Parses the `Authorization` header the origin received: `None` is a credential the
    /// origin does not know (refused with 401).
    pub fn from_header(h: Option<&str>) -> Option<Cred> {
        match h {
            None => Some(Cred::Anonymous),
            Some("Bearer alice") => Some(Cred::Alice),
            Some("Bearer bob") => Some(Cred::Bob),
            Some("Bearer carol") => Some(Cred::Carol),
            Some(_) => None,
        }
    }

    /// The origin's static access rule: the status it refuses `run` with for this credential,
    /// or `None` when it answers 200. Bob is forbidden odd runs; the origin hides multiples of
    /// 3 from Carol (404); Alice and anonymous callers may read everything.
    pub fn refusal(self, run: u32) -> Option<u16> {
        match self {
            Cred::Bob if run % 2 == 1 => Some(403),
            Cred::Carol if run.is_multiple_of(3) => Some(404),
            _ => None,
        }
    }

    /// The refusal of a view over `runs`: refused if any run is refused.
    pub fn refusal_of(self, runs: &[u32]) -> Option<u16> {
        runs.iter().find_map(|r| self.refusal(*r))
    }
}

/// Which view a read asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewKind {
    Metrics,
    FeatureImportance {
        top_n: Option<u32>,
    },
    Comparison,
    /// `GET /api/v1/models/rankings/{id}`: its answer lists runs (`ReadOp::runs`, fixed per
    /// ranking), each with its revision, and is checked as a read of each of them.
    Ranking {
        id: u32,
    },
    /// A read of a real MLflow server's view (`mlflow.rs`): its name says which, and through
    /// which prefix.
    Mlflow {
        view: &'static str,
    },
}

impl ViewKind {
    /// The view, without its parameters (to count reads by view).
    pub fn family(self) -> &'static str {
        match self {
            ViewKind::Metrics => "metrics",
            ViewKind::FeatureImportance { .. } => "feature-importance",
            ViewKind::Comparison => "comparison",
            ViewKind::Ranking { .. } => "ranking",
            ViewKind::Mlflow { view } => view,
        }
    }

    pub fn name(self) -> String {
        match self {
            ViewKind::Metrics => "metrics".into(),
            ViewKind::FeatureImportance { top_n: None } => "feature-importance".into(),
            ViewKind::FeatureImportance { top_n: Some(n) } => {
                format!("feature-importance?top_n={n}")
            }
            ViewKind::Comparison => "comparison".into(),
            ViewKind::Ranking { id } => format!("ranking/{id}"),
            ViewKind::Mlflow { view } => view.to_owned(),
        }
    }
}

/// One read of a cached view.
#[derive(Debug, Clone, Default)]
pub struct ReadOp {
    /// Index of the read in its reader's sequence (`read#{reader}.{id}`).
    pub id: u64,
    pub reader: usize,
    pub instance: usize,
    pub cred: Option<Cred>,
    pub view: Option<ViewKind>,
    /// The runs the view covers: the one run, the compared runs, or the runs the ranking
    /// lists.
    pub runs: Vec<u32>,
    pub start_us: u64,
    pub end_us: u64,
    /// HTTP status; `None` when no answer came (connection error, time-out).
    pub status: Option<u16>,
    pub x_cache: String,
    pub cache_status: String,
    /// Revisions observed in a 200 body, per run, in the order of `runs`.
    pub revisions: Vec<(u32, u64)>,
    /// runcache's own JSON error code on a non-200 answer (`{"error": {"code"}}`).
    pub error_code: Option<String>,
    /// Whether a non-200 body is the origin's own (`{"detail": …}`), passed through.
    pub origin_body: bool,
    /// Transport error, or what is wrong with a 200 body.
    pub error: Option<String>,
    /// The transport error was a failure to connect.
    pub connect_error: bool,
    pub timed_out: bool,
}

impl ReadOp {
    pub fn describe(&self) -> String {
        format!(
            "read#{}.{} instance={} cred={} view={} runs={:?} [{} .. {}] status={} x-cache={:?} cache-status={:?} observed={:?}{}{}",
            self.reader,
            self.id,
            self.instance,
            self.cred.map_or("?", Cred::name),
            self.view.map_or_else(|| "?".into(), ViewKind::name),
            self.runs,
            secs(self.start_us),
            secs(self.end_us),
            self.status.map_or_else(|| "none".into(), |s| s.to_string()),
            self.x_cache,
            self.cache_status,
            self.revisions,
            self.error_code
                .as_ref()
                .map_or_else(String::new, |c| format!(" code={c}")),
            self.error
                .as_ref()
                .map_or_else(String::new, |e| format!(" error={e:?}")),
        )
    }

    /// Served by an instance that was on its memory tier (`Cache-Status` says so).
    pub fn memory_fallback(&self) -> bool {
        self.cache_status.contains("memory-fallback")
    }
}

/// One attempt to deliver an event.
#[derive(Debug, Clone, Default)]
pub struct Attempt {
    pub instance: usize,
    pub start_us: u64,
    pub end_us: u64,
    pub status: Option<u16>,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub connect_error: bool,
    pub timed_out: bool,
}

/// One write: the origin's revision of `run` went up to `revision` at `t_change_us`, then
/// `training-completed` was delivered (acknowledged at `t_ack_us`, if ever).
#[derive(Debug, Clone, Default)]
pub struct EventOp {
    pub id: u64,
    pub run: u32,
    pub revision: u64,
    /// Just before the origin's revision changed.
    pub t_change_us: u64,
    /// End of the request that got `200`; `None`: never acknowledged (imposes nothing).
    pub t_ack_us: Option<u64>,
    /// The instance that acknowledged it.
    pub instance: Option<usize>,
    pub attempts: Vec<Attempt>,
    /// Delivered through the event stream instead: the entry's ID (acknowledged when seen
    /// applied and `XACK`ed).
    pub stream_id: Option<String>,
}

impl EventOp {
    pub fn describe(&self) -> String {
        format!(
            "event#{} run={} revision={} changed={} acked={} by instance {} after {} attempt(s){}",
            self.id,
            self.run,
            self.revision,
            secs(self.t_change_us),
            self.t_ack_us.map_or_else(|| "never".into(), secs),
            self.instance.map_or_else(|| "-".into(), |i| i.to_string()),
            self.attempts.len(),
            self.stream_id
                .as_ref()
                .map_or_else(String::new, |id| format!(", through stream entry {id}")),
        )
    }
}

/// Kinds of fault (and the snapshot action that stale restarts need).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// `SAVE` and keep a copy of the RDB file, for a later stale restart (not a fault).
    SaveCopy,
    /// SIGKILL, pause, restart with no data.
    KillRestartEmpty,
    /// SIGKILL, pause, restart from an RDB file saved seconds earlier.
    KillRestartStale,
    /// SIGSTOP, pause, SIGCONT.
    Pause,
    /// `CLIENT KILL TYPE pubsub`.
    ClientKillPubsub,
    /// `DEBUG SLEEP` on its own connection.
    DebugSleep,
    /// Graceful stop of one instance, then a new one with the same settings.
    InstanceRestart,
    /// Cluster: SIGKILL of a primary; its replica is promoted, and the killed node is
    /// restarted (it rejoins as a replica).
    PrimaryFailover,
    /// Cluster: SIGSTOP of a primary for less than the node time-out, then SIGCONT.
    PausePrimary,
    /// Cluster: a planned `CLUSTER FAILOVER` (the replica takes over once caught up; the old
    /// primary follows it): a promotion that lost nothing, so entries survive it.
    PlannedFailover,
    /// Sentinel: a planned `SENTINEL FAILOVER` while the old master, kept from being
    /// reconfigured for a while, stays a writable master holding the instances' near-cache
    /// subscriptions; then it is made a replica of the new master.
    SentinelFailover,
    /// An event-stream entry whose invalidation always fails (its run's tag set made a
    /// string), dead-lettered while the entries behind it are applied.
    PoisonedStreamEntry,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::SaveCopy => "save-copy",
            FaultKind::KillRestartEmpty => "kill-restart-empty",
            FaultKind::KillRestartStale => "kill-restart-stale-rdb",
            FaultKind::Pause => "sigstop-sigcont",
            FaultKind::ClientKillPubsub => "client-kill-pubsub",
            FaultKind::DebugSleep => "debug-sleep",
            FaultKind::InstanceRestart => "instance-restart",
            FaultKind::PrimaryFailover => "primary-failover",
            FaultKind::PausePrimary => "sigstop-sigcont-primary",
            FaultKind::PlannedFailover => "cluster-failover",
            FaultKind::SentinelFailover => "sentinel-failover",
            FaultKind::PoisonedStreamEntry => "poisoned-stream-entry",
        }
    }
}

/// One injected fault, as executed.
#[derive(Debug, Clone)]
pub struct FaultOp {
    pub id: u64,
    pub kind: FaultKind,
    /// The instance restarted (`InstanceRestart`).
    pub instance: Option<usize>,
    pub start_us: u64,
    pub end_us: u64,
    pub detail: String,
}

impl FaultOp {
    pub fn describe(&self) -> String {
        format!(
            "fault#{} {}{} [{} .. {}] {}",
            self.id,
            self.kind.name(),
            self.instance.map_or_else(String::new, |i| match self.kind {
                FaultKind::PrimaryFailover
                | FaultKind::PausePrimary
                | FaultKind::PlannedFailover => {
                    format!(" primary#{i}")
                }
                _ => format!(" instance={i}"),
            }),
            secs(self.start_us),
            secs(self.end_us),
            self.detail
        )
    }
}

/// Everything recorded in one run.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub reads: Vec<ReadOp>,
    pub events: Vec<EventOp>,
    pub faults: Vec<FaultOp>,
}

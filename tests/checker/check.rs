//! Checking a recorded history against runcache's two promises, and classifying failures.
//!
//! 1. Staleness: a read that starts after an invalidation was acknowledged never returns the
//!    data that invalidation removed (on any instance). The one allowance is SPEC 2's bound for
//!    reads served from an instance's memory tier during a Redis outage.
//! 2. Access: a cached answer goes only to credentials the origin accepted for it.
//! 3. Failures: every read that is not a 200 is classified; those the SPEC does not allow are
//!    violations.

use std::collections::BTreeMap;

use crate::history::{Cred, FaultKind, FaultOp, History, ReadOp};

/// SPEC 2: "While an instance serves from memory and knows of other instances, it never
/// serves an entry older than `memory.degraded_max_age_ms` (default 2000)." The instances run
/// with this value (`cluster::instance_settings`): a read served from the memory tier
/// (`Cache-Status` … `memory-fallback`) may lag an acknowledged invalidation by less than
/// this, and is then counted as an allowed lag, not a violation.
pub const DEGRADED_MAX_AGE_US: u64 = 2_000_000;

/// Latency is not checked: the SPEC bounds how long a request waits on a dead Redis ("a
/// short, configured time-out", `redis.command_timeout_ms`), but a read may make several store
/// calls and a fetch, so there is no crisp per-read bound to assert. The summary lists reads
/// slower than 1 s with the faults around them instead, for a person to judge; a read that
/// exceeds the client time-out (5 s) is a violation (`no answer: time-out`).
///
/// Violation kinds, in the order the summary lists them.
pub const KINDS: [&str; 6] = [
    "stale",
    "access",
    "failure",
    "bad-body",
    "event",
    "impossible",
];

#[derive(Debug, Clone)]
pub struct Violation {
    /// One of [`KINDS`].
    pub kind: &'static str,
    /// A finer class (for failures: status and code).
    pub class: String,
    /// Index into `History::reads`.
    pub read: Option<usize>,
    /// Index into `History::events`.
    pub event: Option<usize>,
    /// For staleness: how long after the missed event's acknowledgement the read started.
    pub lag_us: Option<u64>,
    pub note: String,
}

/// A memory-tier read that lagged an invalidation within [`DEGRADED_MAX_AGE_US`].
#[derive(Debug, Clone)]
pub struct AllowedLag {
    pub read: usize,
    pub event: usize,
    pub lag_us: u64,
}

#[derive(Debug, Default)]
pub struct Report {
    pub violations: Vec<Violation>,
    pub allowed_lags: Vec<AllowedLag>,
    /// Every non-200 read and every failed event attempt, by class (violations included).
    pub failures: BTreeMap<String, usize>,
    /// The classes of `failures` that are not violations.
    pub excused: BTreeMap<String, usize>,
    /// 200 reads whose revisions were checked.
    pub checked_reads: usize,
    /// The same, by view ([`crate::history::ViewKind::family`]).
    pub checked_by_view: BTreeMap<&'static str, usize>,
    /// Revisions checked (one per run a read covers: a ranking's answer lists several).
    pub checked_revisions: usize,
    /// Of those, the revisions listed in ranking answers.
    pub checked_ranking_revisions: usize,
}

impl Report {
    pub fn count(&self, kind: &str) -> usize {
        self.violations.iter().filter(|v| v.kind == kind).count()
    }
}

/// How one non-200 read (or event attempt) is judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judgement {
    /// Not a violation: the origin's own refusal, an instance restarting, a rate limit.
    Excused(String),
    /// A violation of the SPEC.
    Violation(String),
}

/// Restart windows of each instance (`[start, end]` of an instance-restart fault).
fn restart_windows(faults: &[FaultOp]) -> Vec<(usize, u64, u64)> {
    faults
        .iter()
        .filter(|f| f.kind == FaultKind::InstanceRestart)
        .filter_map(|f| f.instance.map(|i| (i, f.start_us, f.end_us)))
        .collect()
}

fn during_restart(windows: &[(usize, u64, u64)], instance: usize, start: u64, end: u64) -> bool {
    windows
        .iter()
        .any(|(i, ws, we)| *i == instance && start <= *we && end >= *ws)
}

fn transport_class(connect: bool, timed_out: bool) -> &'static str {
    if timed_out {
        "time-out"
    } else if connect {
        "connect error"
    } else {
        "connection lost"
    }
}

/// Judges a read that did not get 200.
///
/// - No answer: excused while its instance restarts (`unavailable`), unless it is a client
///   time-out (a hang); otherwise a violation.
/// - The origin's own 403/404 (its body passed through) where the origin refuses that
///   credential: excused (the expected refusal).
/// - 5xx: a violation. The origin in the checker never fails and answers within 40 ms, so a
///   `502`/`504` has no origin cause; the SPEC says requests never wait on a dead Redis longer
///   than a short time-out and are answered from memory, so a `504` during a Redis hang is a
///   violation too; a `503` is load shedding (`server.max_concurrent_requests`, 1024, far above
///   the few readers here) or a store error without fallback, and the views have a fallback:
///   a violation. Each is reported by status and code.
/// - Any other status (a refusal of an accepted credential, a runcache-made refusal, a 304
///   nobody asked for): a violation.
pub fn judge_read(read: &ReadOp, windows: &[(usize, u64, u64)]) -> Judgement {
    let Some(status) = read.status else {
        let class = transport_class(read.connect_error, read.timed_out);
        // A restart refuses connections or closes them (a graceful stop cuts what is still
        // in flight after `server.shutdown_timeout_ms`); it never leaves a request hanging
        // for the client's whole time-out, so a time-out is never excused.
        let excused =
            !read.timed_out && during_restart(windows, read.instance, read.start_us, read.end_us);
        return if excused {
            Judgement::Excused(format!("unavailable: {class} while the instance restarted"))
        } else {
            Judgement::Violation(format!("no answer: {class}"))
        };
    };
    let code = read.error_code.as_deref().unwrap_or("-");
    let expected = read.cred.and_then(|c| c.refusal_of(&read.runs));
    if expected == Some(status) && read.origin_body {
        return Judgement::Excused(format!(
            "origin refusal {status} for {}",
            read.cred.map_or("?", Cred::name)
        ));
    }
    if status >= 500 {
        return Judgement::Violation(format!("{status} {code}"));
    }
    if expected == Some(status) {
        return Judgement::Violation(format!(
            "refusal {status} not the origin's own (code {code})"
        ));
    }
    let who = if read.origin_body {
        "origin body"
    } else {
        code
    };
    Judgement::Violation(format!("unexpected {status} ({who})"))
}

/// Judges one failed event attempt. SPEC 1: an event is answered `200` once applied, also
/// while Redis is down (memory tier plus journal). A connection failure while the instance
/// restarts (not a time-out), a `503` while it starts again, and a `429` (rate limit) are
/// excused; anything else is a violation.
pub fn judge_attempt(a: &crate::history::Attempt, windows: &[(usize, u64, u64)]) -> Judgement {
    match a.status {
        None => {
            let class = transport_class(a.connect_error, a.timed_out);
            if !a.timed_out && during_restart(windows, a.instance, a.start_us, a.end_us) {
                Judgement::Excused(format!(
                    "event unavailable: {class} while the instance restarted"
                ))
            } else {
                Judgement::Violation(format!("event without answer: {class}"))
            }
        }
        Some(429) => Judgement::Excused("event 429 rate_limited".into()),
        // An instance refuses events until it has started (it may not know the others yet).
        Some(503) if during_restart(windows, a.instance, a.start_us, a.end_us) => {
            Judgement::Excused("event 503 while the instance restarted (starting)".into())
        }
        Some(s) => Judgement::Violation(format!(
            "event {s} {}",
            a.error_code.as_deref().unwrap_or("-")
        )),
    }
}

/// Acknowledged events of one run, by acknowledgement time.
struct Acked {
    /// `(t_ack, revision, index into events)`, sorted by `t_ack`.
    list: Vec<(u64, u64, usize)>,
}

pub fn check(h: &History) -> Report {
    let mut report = Report::default();
    let windows = restart_windows(&h.faults);

    let mut acked: BTreeMap<u32, Acked> = BTreeMap::new();
    // Every revision the writer created: (run, revision) → event index.
    let mut by_revision: BTreeMap<(u32, u64), usize> = BTreeMap::new();
    for (i, e) in h.events.iter().enumerate() {
        by_revision.insert((e.run, e.revision), i);
        if let Some(t) = e.t_ack_us {
            acked
                .entry(e.run)
                .or_insert_with(|| Acked { list: Vec::new() })
                .list
                .push((t, e.revision, i));
        }
    }
    for a in acked.values_mut() {
        a.list.sort();
    }

    for (ri, read) in h.reads.iter().enumerate() {
        if read.status != Some(200) {
            let judgement = judge_read(read, &windows);
            match judgement {
                Judgement::Excused(class) => {
                    *report.failures.entry(class.clone()).or_default() += 1;
                    *report.excused.entry(class).or_default() += 1;
                }
                Judgement::Violation(class) => {
                    *report.failures.entry(class.clone()).or_default() += 1;
                    report.violations.push(Violation {
                        kind: "failure",
                        class,
                        read: Some(ri),
                        event: None,
                        lag_us: None,
                        note: String::new(),
                    });
                }
            }
            continue;
        }
        // Access: a 200 to credentials the origin refuses for any run of the view.
        if let Some(cred) = read.cred
            && let Some(refusal) = cred.refusal_of(&read.runs)
        {
            report.violations.push(Violation {
                kind: "access",
                class: format!("200 to {} (origin answers {refusal})", cred.name()),
                read: Some(ri),
                event: None,
                lag_us: None,
                note: "a body reached credentials the origin refused".into(),
            });
        }
        if let Some(problem) = &read.error {
            report.violations.push(Violation {
                kind: "bad-body",
                class: "200 body does not match the request".into(),
                read: Some(ri),
                event: None,
                lag_us: None,
                note: problem.clone(),
            });
        }
        report.checked_reads += 1;
        if let Some(view) = read.view {
            *report.checked_by_view.entry(view.family()).or_default() += 1;
            if matches!(view, crate::history::ViewKind::Ranking { .. }) {
                report.checked_ranking_revisions += read.revisions.len();
            }
        }
        report.checked_revisions += read.revisions.len();
        // Every revision is checked alike, whatever the view: a ranking that lists run X is a
        // read of X, and must not be older than an invalidation of X acknowledged before it
        // started, although its entry learned that it depends on X only from its answer.
        for &(run, observed) in &read.revisions {
            // Sanity: the observed revision existed before the read ended.
            if observed > 0 {
                match by_revision.get(&(run, observed)) {
                    Some(&ei) if h.events[ei].t_change_us <= read.end_us => {}
                    other => report.violations.push(Violation {
                        kind: "impossible",
                        class: "revision not yet written when the read ended".into(),
                        read: Some(ri),
                        event: other.copied(),
                        lag_us: None,
                        note: format!("run {run} revision {observed}"),
                    }),
                }
            }
            let Some(a) = acked.get(&run) else { continue };
            // Acknowledged before the read started; the first one the read is behind is the
            // invalidation it missed (the entry it got is older than that acknowledgement).
            let before = a.list.partition_point(|(t, _, _)| *t < read.start_us);
            let missed: Vec<&(u64, u64, usize)> = a.list[..before]
                .iter()
                .filter(|(_, rev, _)| *rev > observed)
                .collect();
            let Some(&&(t_ack, _, ei)) = missed.first() else {
                continue;
            };
            let lag = read.start_us - t_ack;
            if read.memory_fallback() && lag < DEGRADED_MAX_AGE_US {
                report.allowed_lags.push(AllowedLag {
                    read: ri,
                    event: ei,
                    lag_us: lag,
                });
                continue;
            }
            let latest = missed.last().map_or(observed, |m| m.1);
            report.violations.push(Violation {
                kind: "stale",
                class: if read.memory_fallback() {
                    "stale read from the memory tier beyond the bound".into()
                } else {
                    format!("stale {}", read.x_cache)
                },
                read: Some(ri),
                event: Some(ei),
                lag_us: Some(lag),
                note: format!(
                    "run {run}: observed revision {observed}, {} acknowledged invalidation(s) missed (latest revision {latest})",
                    missed.len()
                ),
            });
        }
    }

    for (ei, e) in h.events.iter().enumerate() {
        for a in e.attempts.iter().filter(|a| a.status != Some(200)) {
            match judge_attempt(a, &windows) {
                Judgement::Excused(class) => {
                    *report.failures.entry(class.clone()).or_default() += 1;
                    *report.excused.entry(class).or_default() += 1;
                }
                Judgement::Violation(class) => {
                    *report.failures.entry(class.clone()).or_default() += 1;
                    report.violations.push(Violation {
                        kind: "event",
                        class,
                        read: None,
                        event: Some(ei),
                        lag_us: None,
                        note: format!(
                            "attempt on instance {} [{} .. {}]{}",
                            a.instance,
                            crate::history::secs(a.start_us),
                            crate::history::secs(a.end_us),
                            a.error
                                .as_ref()
                                .map_or_else(String::new, |e| format!(" error={e:?}"))
                        ),
                    });
                }
            }
        }
    }
    stream_events(h, &mut report);
    report
}

/// An event appended to the stream is applied (and acknowledged) within the writer's wait,
/// whatever entry is stuck before it (a poisoned one is dead-lettered), unless a fault could
/// lose the entry itself: Redis restarted empty or from an older file, or a primary killed
/// before it replicated.
/// A poisoned entry (that fault) is dead-lettered within that wait too, on the same terms.
fn stream_events(h: &History, report: &mut Report) {
    let wait = u64::try_from(crate::stream::ACK_WAIT.as_micros()).unwrap_or(u64::MAX);
    let lost = |start: u64| {
        let end = start + wait;
        h.faults.iter().any(|f| {
            matches!(
                f.kind,
                FaultKind::KillRestartEmpty
                    | FaultKind::KillRestartStale
                    | FaultKind::PrimaryFailover
            ) && f.start_us <= end
                && f.end_us >= start
        })
    };
    for f in &h.faults {
        if f.kind != FaultKind::PoisonedStreamEntry
            || !f.detail.starts_with(crate::stream::NOT_DEAD_LETTERED)
        {
            continue;
        }
        let class = if lost(f.start_us) {
            "poisoned entry not dead-lettered: a fault may have lost it".to_owned()
        } else {
            "poisoned entry not dead-lettered within the wait".to_owned()
        };
        *report.failures.entry(class.clone()).or_default() += 1;
        if lost(f.start_us) {
            *report.excused.entry(class).or_default() += 1;
            continue;
        }
        report.violations.push(Violation {
            kind: "event",
            class,
            read: None,
            event: None,
            lag_us: None,
            note: f.describe(),
        });
    }
    for (ei, e) in h.events.iter().enumerate() {
        let (Some(id), None) = (&e.stream_id, e.t_ack_us) else {
            continue;
        };
        if lost(e.t_change_us) {
            let class = "stream event not applied: a fault may have lost the entry".to_owned();
            *report.failures.entry(class.clone()).or_default() += 1;
            *report.excused.entry(class).or_default() += 1;
            continue;
        }
        let class = "stream event not applied within the writer's wait".to_owned();
        *report.failures.entry(class.clone()).or_default() += 1;
        report.violations.push(Violation {
            kind: "event",
            class,
            read: None,
            event: Some(ei),
            lag_us: None,
            note: format!("stream entry {id}"),
        });
    }
}

/// The faults in force during `[start, end]` or ended within `before_us` before `start`, for
/// attributing a violation.
pub fn nearby_faults(faults: &[FaultOp], start: u64, end: u64, before_us: u64) -> Vec<&FaultOp> {
    faults
        .iter()
        .filter(|f| f.kind != FaultKind::SaveCopy)
        .filter(|f| f.start_us <= end && f.end_us + before_us >= start)
        .collect()
}

//! The printed summary of a run.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::check::{KINDS, Report, nearby_faults};
use crate::cluster::SlotTotals;
use crate::history::{History, ViewKind, secs};

/// Reads slower than this are listed (1 s: several times the Redis command time-out of 250 ms
/// plus the origin's 40 ms).
const SLOW_US: u64 = 1_000_000;

pub struct RunInfo {
    pub seed: u64,
    pub secs: u64,
    pub instances: usize,
    pub readers: usize,
    pub runs: u32,
    pub show: usize,
    pub elapsed_total: std::time::Duration,
    pub totals: Vec<SlotTotals>,
    /// Requests the origin answered, and how many it refused; `None` for a real MLflow server,
    /// which counts nothing for the checker.
    pub origin_calls: Option<(u64, u64)>,
    pub reproduce: String,
}

/// `Cache-Status` without its numbers, to group answers.
fn shape(cache_status: &str) -> String {
    cache_status
        .split(';')
        .map(str::trim)
        .map(|p| match p.split_once('=') {
            Some(("ttl", _)) => "ttl=…".to_owned(),
            _ => p.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A violation's class and the shape of its read's `Cache-Status`, to group by.
fn class_of(v: &crate::check::Violation, h: &History) -> String {
    let mut class = v.class.clone();
    if let Some(rd) = v.read.map(|i| &h.reads[i]) {
        let _ = write!(class, " | {}", shape(&rd.cache_status));
    }
    class
}

pub fn render(info: &RunInfo, h: &History, r: &Report) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(
        w,
        "\n================ runcache consistency checker ================"
    );
    let _ = writeln!(
        w,
        "seed {}  workload {} s  instances {}  readers {}  runs {}  (whole test {:.1} s)",
        info.seed,
        info.secs,
        info.instances,
        info.readers,
        info.runs,
        info.elapsed_total.as_secs_f64()
    );

    let mut by_cache: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut memory = 0;
    let mut slow = 0;
    let mut max_latency = 0;
    for rd in &h.reads {
        let x = if rd.x_cache.is_empty() {
            "-"
        } else {
            &rd.x_cache
        };
        *by_cache.entry(x.to_owned()).or_default() += 1;
        *by_status
            .entry(rd.status.map_or_else(|| "none".into(), |s| s.to_string()))
            .or_default() += 1;
        memory += usize::from(rd.memory_fallback());
        let lat = rd.end_us.saturating_sub(rd.start_us);
        max_latency = max_latency.max(lat);
        slow += usize::from(lat > SLOW_US);
    }
    let _ = writeln!(
        w,
        "reads: {}  by X-Cache {by_cache:?}  by status {by_status:?}",
        h.reads.len()
    );
    let _ = writeln!(
        w,
        "       {} served with memory-fallback; {} slower than 1 s; slowest {:.0} ms; {} checked for staleness",
        memory,
        slow,
        max_latency as f64 / 1e3,
        r.checked_reads
    );
    let mut by_view: BTreeMap<&str, (usize, BTreeMap<&str, usize>)> = BTreeMap::new();
    for rd in &h.reads {
        let view = by_view
            .entry(rd.view.map_or("?", ViewKind::family))
            .or_default();
        view.0 += 1;
        if rd.status == Some(200) {
            *view.1.entry(rd.x_cache.as_str()).or_default() += 1;
        }
    }
    for (view, (n, answered)) in &by_view {
        let _ = writeln!(
            w,
            "       {view}: {n} reads, {} checked for staleness, 200s by X-Cache {answered:?}",
            r.checked_by_view.get(view).copied().unwrap_or(0)
        );
    }
    let _ = writeln!(
        w,
        "       {} revisions checked, {} of them listed in ranking answers",
        r.checked_revisions, r.checked_ranking_revisions
    );
    let mut slowest: Vec<&crate::history::ReadOp> = h
        .reads
        .iter()
        .filter(|rd| rd.end_us.saturating_sub(rd.start_us) > SLOW_US)
        .collect();
    if !slowest.is_empty() {
        slowest.sort_by_key(|rd| std::cmp::Reverse(rd.end_us - rd.start_us));
        let _ = writeln!(
            w,
            "       slow reads (over {} ms; not violations, see the note in check.rs), slowest first:",
            SLOW_US / 1_000
        );
        for rd in slowest.iter().take(info.show.min(5)) {
            let _ = writeln!(
                w,
                "         {:.0} ms  {}",
                (rd.end_us - rd.start_us) as f64 / 1e3,
                rd.describe()
            );
            for f in nearby_faults(&h.faults, rd.start_us, rd.end_us, 1_000_000) {
                let _ = writeln!(w, "           near {}", f.describe());
            }
        }
    }
    match info.origin_calls {
        Some((calls, refused)) => {
            let _ = writeln!(w, "origin: {calls} calls ({refused} refused)");
        }
        None => {
            let _ = writeln!(
                w,
                "origin: a real MLflow server (its calls are not counted)"
            );
        }
    }
    let acked = h.events.iter().filter(|e| e.t_ack_us.is_some()).count();
    let attempts: usize = h.events.iter().map(|e| e.attempts.len()).sum();
    let ack_latency = h
        .events
        .iter()
        .filter_map(|e| {
            let a = e.attempts.last()?;
            e.t_ack_us.map(|t| t - a.start_us)
        })
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        w,
        "events: {} written, {} acknowledged, {} never acknowledged, {} delivery attempts; slowest acknowledgement {:.0} ms",
        h.events.len(),
        acked,
        h.events.len() - acked,
        attempts,
        ack_latency as f64 / 1e3
    );
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &h.faults {
        *faults.entry(f.kind.name()).or_default() += 1;
    }
    let _ = writeln!(w, "faults: {} {faults:?}", h.faults.len());
    for f in &h.faults {
        let _ = writeln!(w, "   {}", f.describe());
    }
    for (i, t) in info.totals.iter().enumerate() {
        let _ = writeln!(
            w,
            "instance {i}: {} process(es); near hits {}, near invalidations {}, near flushes {}, ack time-outs {}, circuit opened {}, redis errors {}{}",
            t.generations,
            t.near_hits,
            t.near_invalidations,
            t.near_flushes,
            t.ack_timeouts,
            t.circuit_opened,
            t.redis_errors,
            if t.notes.is_empty() {
                String::new()
            } else {
                format!("; notes: {}", t.notes.join("; "))
            }
        );
    }
    let _ = writeln!(
        w,
        "failures (non-200 reads, failed event attempts) by class:"
    );
    for (class, n) in &r.failures {
        let tag = if r.excused.contains_key(class) {
            "excused"
        } else {
            "VIOLATION"
        };
        let _ = writeln!(w, "   {n:>6}  {class}  [{tag}]");
    }
    let max_lag = r.allowed_lags.iter().map(|l| l.lag_us).max().unwrap_or(0);
    let _ = writeln!(
        w,
        "allowed lags (memory tier, within {} ms): {} (largest {:.0} ms)",
        crate::check::DEGRADED_MAX_AGE_US / 1_000,
        r.allowed_lags.len(),
        max_lag as f64 / 1e3
    );
    if let Some(l) = r.allowed_lags.iter().max_by_key(|l| l.lag_us) {
        let _ = writeln!(w, "   largest: {}", h.reads[l.read].describe());
        let _ = writeln!(w, "            behind {}", h.events[l.event].describe());
    }
    let _ = writeln!(w, "violations: {}", r.violations.len());
    for kind in KINDS {
        let of_kind: Vec<_> = r.violations.iter().filter(|v| v.kind == kind).collect();
        if of_kind.is_empty() {
            continue;
        }
        let mut classes: BTreeMap<String, usize> = BTreeMap::new();
        for v in &of_kind {
            *classes.entry(class_of(v, h)).or_default() += 1;
        }
        let _ = writeln!(w, "  {kind}: {}", of_kind.len());
        for (class, n) in &classes {
            let _ = writeln!(w, "     {n:>6}  {class}");
        }
        if kind == "stale" {
            let mut lags: Vec<u64> = of_kind.iter().filter_map(|v| v.lag_us).collect();
            lags.sort_unstable();
            if !lags.is_empty() {
                let _ = writeln!(
                    w,
                    "     lag after the ack: median {:.0} ms, max {:.0} ms",
                    lags[lags.len() / 2] as f64 / 1e3,
                    lags[lags.len() - 1] as f64 / 1e3
                );
            }
        }
        // One example of each class first, then more in order, up to `show` (at least one
        // per class).
        let mut examples: Vec<usize> = Vec::new();
        let mut seen: Vec<String> = Vec::new();
        for (i, v) in of_kind.iter().enumerate() {
            let class = class_of(v, h);
            if !seen.contains(&class) {
                seen.push(class);
                examples.push(i);
            }
        }
        for i in 0..of_kind.len() {
            if examples.len() >= info.show {
                break;
            }
            if !examples.contains(&i) {
                examples.push(i);
            }
        }
        examples.sort_unstable();
        for v in examples.iter().map(|&i| of_kind[i]) {
            let _ = writeln!(w, "   - [{kind}] {} {}", v.class, v.note);
            if let Some(rd) = v.read.map(|i| &h.reads[i]) {
                let _ = writeln!(w, "       {}", rd.describe());
                if let Some(lag) = v.lag_us {
                    let _ = writeln!(
                        w,
                        "       started {:.1} ms after the missed event's ack",
                        lag as f64 / 1e3
                    );
                }
                for f in nearby_faults(&h.faults, rd.start_us, rd.end_us, 3_000_000) {
                    let _ = writeln!(w, "       near {}", f.describe());
                }
            }
            if let Some(e) = v.event.map(|i| &h.events[i]) {
                let _ = writeln!(w, "       {}", e.describe());
            }
        }
        if of_kind.len() > examples.len() {
            let _ = writeln!(
                w,
                "   … {} more (CHECKER_SHOW=n shows more)",
                of_kind.len() - examples.len()
            );
        }
    }
    let _ = writeln!(w, "reproduce: {}", info.reproduce);
    let _ = writeln!(
        w,
        "(the same seed gives the same operations and fault schedule; real timing decides their interleaving)"
    );
    let _ = writeln!(
        w,
        "=============================================================="
    );
    s
}

/// Every operation, one line each, ordered by start time (for `CHECKER_HISTORY`).
pub fn history_lines(h: &History) -> String {
    let mut lines: Vec<(u64, String)> = Vec::new();
    for f in &h.faults {
        lines.push((f.start_us, f.describe()));
    }
    for e in &h.events {
        lines.push((e.t_change_us, e.describe()));
        for a in &e.attempts {
            lines.push((
                a.start_us,
                format!(
                    "  attempt event#{} instance={} [{} .. {}] status={:?} code={:?} error={:?}",
                    e.id,
                    a.instance,
                    secs(a.start_us),
                    secs(a.end_us),
                    a.status,
                    a.error_code,
                    a.error
                ),
            ));
        }
    }
    for rd in &h.reads {
        lines.push((rd.start_us, rd.describe()));
    }
    lines.sort_by_key(|l| l.0);
    let mut out = String::new();
    for (_, l) in lines {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

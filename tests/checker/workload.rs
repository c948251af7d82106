//! The readers and the writer. Each draws the choices of its `k`-th operation from its own
//! stream (`Rng::derive(seed, stream, k)`), all of them before sending anything, so neither
//! timing nor retries change what later operations choose.

use std::sync::Arc;
use std::time::Duration;

use http::header;
use serde_json::{Value, json};

use crate::cluster::{ADMIN_TOKEN, Cluster};
use crate::history::{Attempt, Cred, EventOp, ReadOp, ViewKind, now_us};
use crate::origin::Origin;
use crate::rng::{READER_BASE, Rng, STREAM_WRITER};

/// Client time-out of a read or an event delivery. Far above anything the SPEC allows (a
/// short Redis time-out, an origin answering within 40 ms): hitting it is a hang.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Delivery attempts of one event before giving up (it then imposes nothing).
const EVENT_ATTEMPTS: usize = 10;

pub struct Workload {
    pub seed: u64,
    pub runs: u32,
    /// The comparisons readers ask for (a few, so they are hit).
    pub comparisons: Vec<Vec<u32>>,
    /// The runs ranking `i + 1` lists (the origin's [`plan_rankings`]).
    pub rankings: Vec<Vec<u32>>,
    pub cluster: Arc<Cluster>,
    pub origin: Origin,
    /// The event stream every instance reads; a quarter of the events go there.
    pub stream: crate::stream::StreamSide,
    /// No operation starts at or after this time (µs).
    pub end_us: u64,
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .no_proxy()
        .build()
        .expect("client")
}

/// What one read will do, drawn from its stream.
struct ReadPlan {
    instance: usize,
    cred: Cred,
    view: ViewKind,
    runs: Vec<u32>,
    think: Duration,
}

fn plan_read(w: &Workload, reader: usize, k: u64) -> ReadPlan {
    let mut rng = Rng::derive(w.seed, READER_BASE + reader as u64, k);
    let instance = rng.below(w.cluster.len() as u64) as usize;
    let cred = Cred::ALL[rng.weighted(&[30, 25, 25, 20])];
    let (view, runs) = match rng.weighted(&[30, 25, 25, 20]) {
        0 => (
            ViewKind::Metrics,
            vec![rng.range(1, u64::from(w.runs)) as u32],
        ),
        1 => {
            let top_n = [None, Some(5), Some(20)][rng.below(3) as usize];
            (
                ViewKind::FeatureImportance { top_n },
                vec![rng.range(1, u64::from(w.runs)) as u32],
            )
        }
        2 => (
            ViewKind::Comparison,
            w.comparisons[rng.below(w.comparisons.len() as u64) as usize].clone(),
        ),
        _ => {
            let i = rng.below(w.rankings.len() as u64) as usize;
            (
                ViewKind::Ranking { id: i as u32 + 1 },
                w.rankings[i].clone(),
            )
        }
    };
    let think = Duration::from_millis(rng.range(0, 8));
    ReadPlan {
        instance,
        cred,
        view,
        runs,
        think,
    }
}

/// The comparisons of a run: `count` distinct sorted sets of 2 or 3 runs.
pub fn plan_comparisons(rng: &mut Rng, runs: u32, count: usize) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    while out.len() < count {
        let size = rng.range(2, 3) as usize;
        let mut set: Vec<u32> = Vec::new();
        while set.len() < size {
            let r = rng.range(1, u64::from(runs)) as u32;
            if !set.contains(&r) {
                set.push(r);
            }
        }
        // Sorted as strings, as runcache normalises them (single digits here, but be exact).
        set.sort_by_key(|r| r.to_string());
        if !out.contains(&set) {
            out.push(set);
        }
    }
    out
}

/// The rankings of a run: ranking `i + 1` lists `out[i]`, best first, 3 to 5 distinct runs.
/// The first lists only runs that every credential may read (see [`Cred::refusal`]), so that
/// accepted credentials other than Alice's are served rankings too; the others draw from
/// every run, so most of their readers are refused some of them.
pub fn plan_rankings(rng: &mut Rng, runs: u32, count: usize) -> Vec<Vec<u32>> {
    let open: Vec<u32> = (1..=runs)
        .filter(|r| Cred::ALL.iter().all(|c| c.refusal(*r).is_none()))
        .collect();
    let all: Vec<u32> = (1..=runs).collect();
    (0..count)
        .map(|i| {
            let mut pool = if i == 0 { open.clone() } else { all.clone() };
            let size = (rng.range(3, 5) as usize).min(pool.len());
            (0..size)
                .map(|_| pool.remove(rng.below(pool.len() as u64) as usize))
                .collect()
        })
        .collect()
}

/// Reads until the end of the workload; returns the reads in order.
pub async fn reader(w: Arc<Workload>, reader: usize) -> Vec<ReadOp> {
    let client = client();
    let mut ops = Vec::new();
    let mut k = 0u64;
    while now_us() < w.end_us {
        let plan = plan_read(&w, reader, k);
        let mut op = ReadOp {
            id: k,
            reader,
            instance: plan.instance,
            cred: Some(plan.cred),
            view: Some(plan.view),
            runs: plan.runs.clone(),
            ..ReadOp::default()
        };
        let base = w.cluster.addr(plan.instance);
        let mut req = match plan.view {
            ViewKind::Metrics => client.get(format!(
                "{base}/api/v1/models/train/{}/metrics",
                plan.runs[0]
            )),
            ViewKind::FeatureImportance { top_n } => {
                let q = top_n.map_or_else(String::new, |n| format!("?top_n={n}"));
                client.get(format!(
                    "{base}/api/v1/models/train/{}/feature-importance{q}",
                    plan.runs[0]
                ))
            }
            ViewKind::Comparison => {
                let ids: Vec<String> = plan.runs.iter().map(u32::to_string).collect();
                client
                    .post(format!("{base}/api/v1/models/compare"))
                    .json(&json!({ "model_run_ids": ids }))
            }
            ViewKind::Ranking { id } => client.get(format!("{base}/api/v1/models/rankings/{id}")),
            ViewKind::Mlflow { .. } => unreachable!("plan_read draws the in-process views only"),
        };
        if let Some(h) = plan.cred.header() {
            req = req.header(header::AUTHORIZATION, h);
        }
        send_read(&mut op, req, interpret).await;
        ops.push(op);
        k += 1;
        tokio::time::sleep(plan.think).await;
    }
    ops
}

/// Sends a read and records it in `op`: its times, status, cache headers and transport errors;
/// a body that came whole goes to `interpret`.
pub async fn send_read(
    op: &mut ReadOp,
    req: reqwest::RequestBuilder,
    interpret: impl FnOnce(&mut ReadOp, &[u8]),
) {
    op.start_us = now_us();
    match req.send().await {
        Ok(resp) => {
            op.status = Some(resp.status().as_u16());
            let h = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            op.x_cache = h("x-cache");
            op.cache_status = h("cache-status");
            match resp.bytes().await {
                Ok(body) => {
                    op.end_us = now_us();
                    interpret(op, &body);
                }
                Err(e) => {
                    op.end_us = now_us();
                    // The status came, the body did not: no answer.
                    op.status = None;
                    op.timed_out = e.is_timeout();
                    op.error = Some(format!("body: {e}"));
                }
            }
        }
        Err(e) => {
            op.end_us = now_us();
            op.timed_out = e.is_timeout();
            op.connect_error = e.is_connect();
            op.error = Some(error_chain(&e));
        }
    }
}

/// Sends one write or event delivery to `instance` and records the attempt: a non-200 keeps
/// runcache's error code and the start of the body.
pub async fn send_attempt(instance: usize, req: reqwest::RequestBuilder) -> Attempt {
    let mut a = Attempt {
        instance,
        start_us: now_us(),
        ..Attempt::default()
    };
    match req.send().await {
        Ok(resp) => {
            a.status = Some(resp.status().as_u16());
            let body = resp.bytes().await;
            a.end_us = now_us();
            match body {
                Ok(b) if a.status != Some(200) => {
                    a.error_code = serde_json::from_slice::<Value>(&b)
                        .ok()
                        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
                    a.error = Some(String::from_utf8_lossy(&b[..b.len().min(200)]).into());
                }
                Ok(_) => {}
                Err(err) => {
                    a.status = None;
                    a.timed_out = err.is_timeout();
                    a.error = Some(format!("body: {err}"));
                }
            }
        }
        Err(err) => {
            a.end_us = now_us();
            a.connect_error = err.is_connect();
            a.timed_out = err.is_timeout();
            a.error = Some(error_chain(&err));
        }
    }
    a
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Reads the body: revisions of a 200, or the error code / origin refusal of another status.
pub fn interpret(op: &mut ReadOp, body: &[u8]) {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if op.status != Some(200) {
        if let Some(v) = &parsed {
            op.error_code = v["error"]["code"].as_str().map(str::to_owned);
            op.origin_body = v["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("origin:"));
        }
        return;
    }
    let Some(v) = parsed else {
        op.error = Some(format!(
            "200 body is not JSON: {:?}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        ));
        return;
    };
    let mut problems = Vec::new();
    match op.view {
        Some(ViewKind::Comparison) => {
            let revs = v["revisions"].as_object();
            let keys: Vec<String> = revs
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            let mut want: Vec<String> = op.runs.iter().map(u32::to_string).collect();
            want.sort();
            let mut got = keys.clone();
            got.sort();
            if got != want {
                problems.push(format!("comparison of {got:?}, asked for {want:?}"));
            }
            for run in op.runs.clone() {
                match revs
                    .and_then(|m| m.get(&run.to_string()))
                    .and_then(Value::as_u64)
                {
                    Some(rev) => op.revisions.push((run, rev)),
                    None => problems.push(format!("no revision for run {run}")),
                }
            }
        }
        Some(ViewKind::Ranking { id }) => {
            if v["ranking_id"].as_str() != Some(id.to_string().as_str()) {
                problems.push(format!("ranking_id {} for ranking {id}", v["ranking_id"]));
            }
            let mut listed = v["runs"].as_array().cloned().unwrap_or_default();
            let ids: Vec<&str> = listed
                .iter()
                .map(|r| r["model_run_id"].as_str().unwrap_or("?"))
                .collect();
            let want: Vec<String> = op.runs.iter().map(u32::to_string).collect();
            if ids != want {
                // Which revision belongs to which run is then unclear: none is recorded.
                problems.push(format!(
                    "ranking lists {ids:?}, the origin's lists {want:?}"
                ));
                listed.clear();
            }
            for (run, listed) in op.runs.clone().into_iter().zip(&listed) {
                match listed["revision"].as_u64() {
                    Some(rev) => op.revisions.push((run, rev)),
                    None => problems.push(format!("no revision for run {run}")),
                }
            }
        }
        // Read by `mlflow.rs`, never here.
        Some(ViewKind::Mlflow { .. }) | None => {}
        Some(view) => {
            let run = op.runs[0];
            if v["model_run_id"].as_str() != Some(run.to_string().as_str()) {
                problems.push(format!("model_run_id {} for run {run}", v["model_run_id"]));
            }
            if let ViewKind::FeatureImportance { top_n } = view
                && v["top_n"].as_u64() != top_n.map(u64::from)
            {
                problems.push(format!("top_n {} for {top_n:?}", v["top_n"]));
            }
            match v["revision"].as_u64() {
                Some(rev) => op.revisions.push((run, rev)),
                None => problems.push("no revision".into()),
            }
        }
    }
    if !problems.is_empty() {
        op.error = Some(problems.join("; "));
    }
}

/// Bumps a run's revision at the origin and delivers `training-completed`, until the end of
/// the workload; returns the events in order.
pub async fn writer(w: Arc<Workload>) -> Vec<EventOp> {
    let client = client();
    let mut events = Vec::new();
    let mut i = 0u64;
    while now_us() < w.end_us {
        let mut rng = Rng::derive(w.seed, STREAM_WRITER, i);
        let run = rng.range(1, u64::from(w.runs)) as u32;
        let instances: Vec<usize> = (0..EVENT_ATTEMPTS)
            .map(|_| rng.below(w.cluster.len() as u64) as usize)
            .collect();
        let backoff = Duration::from_millis(rng.range(50, 150));
        let pause = Duration::from_millis(rng.range(50, 200));
        let via_stream = rng.below(4) == 0 && w.stream.enabled();

        let mut e = EventOp {
            id: i,
            run,
            t_change_us: now_us(),
            ..EventOp::default()
        };
        e.revision = w.origin.bump(run);
        if via_stream {
            // Acknowledged once an instance has applied it (or dead-lettered it) and XACKed.
            for _ in 0..EVENT_ATTEMPTS {
                match w.stream.append(&run.to_string()).await {
                    Ok(id) => {
                        e.t_ack_us = w.stream.wait_acked(&id, crate::stream::ACK_WAIT).await;
                        e.stream_id = Some(id);
                        break;
                    }
                    Err(_) => tokio::time::sleep(backoff).await,
                }
            }
            events.push(e);
            i += 1;
            tokio::time::sleep(pause).await;
            continue;
        }
        for instance in instances {
            let req = client
                .post(format!(
                    "{}/events/training-completed",
                    w.cluster.addr(instance)
                ))
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({ "model_run_id": run.to_string() }));
            let a = send_attempt(instance, req).await;
            let ok = a.status == Some(200);
            let end = a.end_us;
            e.attempts.push(a);
            if ok {
                e.t_ack_us = Some(end);
                e.instance = Some(instance);
                break;
            }
            tokio::time::sleep(backoff).await;
        }
        events.push(e);
        i += 1;
        tokio::time::sleep(pause).await;
    }
    events
}

//! The checker with a real MLflow tracking server as the origin (SPEC 9, issue 22).
//!
//! `tests/mlflow/run.sh` starts `mlflow server` and runs this with `CHECKER_MLFLOW_URL` set.
//! The checker starts its own `redis-server` and two runcache instances in process, configured
//! by the shipped `config/mlflow.toml` (only addresses, the prefix, the admin token and the
//! journal are set here, plus the graceful-stop allowance an instance restart needs). Then:
//!
//! - **Set-up**, straight at MLflow: two experiments of three runs each; every run starts at
//!   revision 0 on each of its three *channels*: the tag `rev`, the metric `rev` (value = step
//!   = revision) and the run name `r<i>-<revision>`.
//! - **Writers** (`CHECKER_WRITERS`, default 2), each owning a disjoint set of runs, make the
//!   MLflow client's writes through a random instance and prefix (`/api/2.0/mlflow/` or
//!   `/ajax-api/2.0/mlflow/`): `runs/set-tag` (the tag channel), `runs/log-metric` (metric),
//!   `runs/log-batch` (tag and metric at once) and `runs/update` (the name). A write sets its
//!   channels to the run's next revision; it is acknowledged when runcache returns MLflow's
//!   `200`, and retried with the same body (MLflow's writes are idempotent for it) on a failure.
//! - **Readers** read through a random instance, prefix and `Authorization` (none, or one of two
//!   basic-auth users MLflow without its auth app ignores: each gets entries of its own, as
//!   every view is `per_credential`): `runs/get`, `runs/search` of an experiment (three bodies,
//!   two of them canonically equal), `metrics/get-history`, `get-history-bulk-interval` and the
//!   run page's GraphQL `GetRun`. Each 200 yields the revision of every channel it shows.
//! - **Faults** from the single-Redis schedule (`faults::plan`): Redis killed and restarted
//!   empty or from an older RDB file, SIGSTOP/SIGCONT, `DEBUG SLEEP`, `CLIENT KILL TYPE
//!   pubsub`, instance restarts. Poisoned stream entries are left out: no event stream here.
//!
//! MLflow 3.17.2 itself answers some concurrent `runs/search` requests with a 500 (its handler
//! imports `mlflow.server.auth` on every call, the import fails without Flask-WTF, and a
//! concurrent call sees the half-imported module: `AttributeError: ... auth_config`). runcache
//! passes that on as a `502 origin_error`. With `CHECKER_MLFLOW_LOG` (MLflow's log, which
//! `tests/mlflow/run.sh` gives) such a 502 is excused when MLflow logged a 5xx on the same route
//! within a second of it ([`excuse_origin_failures`]); any other 502, or every 502 without the
//! log, is a violation.
//!
//! The history is checked by `check.rs` as any other: each (run, channel) is one of its "runs"
//! (`object`), each write one event per channel it sets. So a read that starts after a write's
//! answer returned and shows an older revision of anything that write changed (a run's tag,
//! its latest metric, its history, its name, or its line in a search page) is a violation.
//! Promise 2 is not exercised here: MLflow without its auth app accepts every caller (the
//! in-process runs check it, and `tests/api` checks `per_credential` views with refusals).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::check::Report;
use crate::cluster::{ADMIN_TOKEN, Cluster, SlotTotals};
use crate::history::{EventOp, History, ReadOp, ViewKind, now_us};
use crate::rng::{READER_BASE, Rng, WRITER_BASE};
use crate::workload::{client, error_chain, send_attempt, send_read};

pub const EXPERIMENTS: usize = 2;
pub const RUNS_PER_EXPERIMENT: usize = 3;
pub const RUNS: usize = EXPERIMENTS * RUNS_PER_EXPERIMENT;
/// Attempts of one write before it is given up (it then imposes nothing).
const WRITE_ATTEMPTS: usize = 10;
/// Metric timestamps (ms): fixed, so a retried write is the same write.
const T0_MS: u64 = 1_700_000_000_000;
const KEY: &str = "rev";

/// What of a run a write changes and a read shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The tag `rev`.
    Tag,
    /// The metric `rev`: its latest value, its history, its bulk history.
    Metric,
    /// The run's name, `r<i>-<revision>`.
    Name,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Tag, Channel::Metric, Channel::Name];

    fn index(self) -> usize {
        match self {
            Channel::Tag => 0,
            Channel::Metric => 1,
            Channel::Name => 2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Channel::Tag => "tag",
            Channel::Metric => "metric",
            Channel::Name => "name",
        }
    }
}

/// The checker's id of one run's channel: `check.rs` tracks revisions per id.
pub fn object(run: usize, ch: Channel) -> u32 {
    u32::try_from(run * Channel::ALL.len() + ch.index() + 1).expect("few runs")
}

/// The legend of [`object`] ids, for the summary.
pub fn legend() -> String {
    (0..RUNS)
        .map(|r| {
            let ids: Vec<String> = Channel::ALL
                .iter()
                .map(|c| format!("{}={}", object(r, *c), c.name()))
                .collect();
            format!(
                "run r{r} (experiment {}): {}",
                r / RUNS_PER_EXPERIMENT,
                ids.join(" ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n   ")
}

/// The experiments and runs made at set-up: run `i` is in experiment `i / RUNS_PER_EXPERIMENT`.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub experiments: Vec<String>,
    pub runs: Vec<String>,
}

impl Fixture {
    fn runs_of(&self, exp: usize) -> std::ops::Range<usize> {
        exp * RUNS_PER_EXPERIMENT..(exp + 1) * RUNS_PER_EXPERIMENT
    }

    fn index_of(&self, run_id: &str) -> Option<usize> {
        self.runs.iter().position(|r| r == run_id)
    }
}

async fn post_ok(client: &reqwest::Client, url: &str, body: Value) -> Value {
    let resp = client
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("set-up POST {url}: {}", error_chain(&e)));
    let status = resp.status();
    let text = resp.text().await.expect("set-up answer");
    assert!(status.is_success(), "set-up POST {url}: {status} {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("set-up POST {url}: {e}: {text}"))
}

/// Makes the experiments and runs straight at MLflow, every channel at revision 0.
pub async fn setup(mlflow: &str, name: &str) -> Fixture {
    let client = client();
    let api = format!("{mlflow}/api/2.0/mlflow");
    let mut experiments = Vec::new();
    let mut runs = Vec::new();
    for e in 0..EXPERIMENTS {
        let v = post_ok(
            &client,
            &format!("{api}/experiments/create"),
            json!({ "name": format!("{name}-{e}") }),
        )
        .await;
        let exp = v["experiment_id"]
            .as_str()
            .expect("experiment_id")
            .to_owned();
        for r in 0..RUNS_PER_EXPERIMENT {
            let i = e * RUNS_PER_EXPERIMENT + r;
            let v = post_ok(
                &client,
                &format!("{api}/runs/create"),
                json!({ "experiment_id": exp, "run_name": run_name(i, 0), "start_time": T0_MS + i as u64 }),
            )
            .await;
            let id = v["run"]["info"]["run_id"]
                .as_str()
                .expect("run_id")
                .to_owned();
            post_ok(
                &client,
                &format!("{api}/runs/log-batch"),
                write_body(WriteKind::LogBatch, &id, i, 0),
            )
            .await;
            runs.push(id);
        }
        experiments.push(exp);
    }
    Fixture { experiments, runs }
}

fn run_name(i: usize, revision: u64) -> String {
    format!("r{i}-{revision}")
}

fn prefix(ajax: bool) -> &'static str {
    if ajax {
        "/ajax-api/2.0/mlflow"
    } else {
        "/api/2.0/mlflow"
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteKind {
    SetTag,
    LogMetric,
    LogBatch,
    Update,
}

impl WriteKind {
    fn route(self) -> &'static str {
        match self {
            WriteKind::SetTag => "runs/set-tag",
            WriteKind::LogMetric => "runs/log-metric",
            WriteKind::LogBatch => "runs/log-batch",
            WriteKind::Update => "runs/update",
        }
    }

    fn channels(self) -> &'static [Channel] {
        match self {
            WriteKind::SetTag => &[Channel::Tag],
            WriteKind::LogMetric => &[Channel::Metric],
            WriteKind::LogBatch => &[Channel::Tag, Channel::Metric],
            WriteKind::Update => &[Channel::Name],
        }
    }
}

/// The JSON body of a write setting `run`'s channels to `revision`, as the client sends it.
fn write_body(kind: WriteKind, run_id: &str, run: usize, revision: u64) -> Value {
    let metric = json!({
        "key": KEY,
        "value": revision as f64,
        "step": revision,
        "timestamp": T0_MS + revision,
    });
    match kind {
        WriteKind::SetTag => {
            json!({ "run_id": run_id, "key": KEY, "value": revision.to_string() })
        }
        WriteKind::LogMetric => {
            let mut m = metric;
            m["run_id"] = json!(run_id);
            m
        }
        WriteKind::LogBatch => json!({
            "run_id": run_id,
            "metrics": [metric],
            "tags": [{ "key": KEY, "value": revision.to_string() }],
        }),
        WriteKind::Update => json!({ "run_id": run_id, "run_name": run_name(run, revision) }),
    }
}

pub struct MlflowWorkload {
    pub seed: u64,
    pub writers: usize,
    pub fixture: Fixture,
    pub cluster: Arc<Cluster>,
    pub end_us: u64,
}

/// One writer: the runs `i` with `i % writers == writer` are its own, so each channel's
/// revisions rise in the order their writes are acknowledged. Returns its events.
pub async fn writer(w: Arc<MlflowWorkload>, writer: usize) -> Vec<EventOp> {
    let client = client();
    let owned: Vec<usize> = (0..RUNS).filter(|r| r % w.writers == writer).collect();
    let mut revision = [0u64; RUNS];
    let mut events = Vec::new();
    let mut i = 0u64;
    while now_us() < w.end_us && !owned.is_empty() {
        let mut rng = Rng::derive(w.seed, WRITER_BASE + writer as u64, i);
        let run = owned[rng.below(owned.len() as u64) as usize];
        let kind = [
            WriteKind::SetTag,
            WriteKind::LogMetric,
            WriteKind::LogBatch,
            WriteKind::Update,
        ][rng.weighted(&[25, 25, 30, 20])];
        let ajax = rng.below(4) == 0;
        let instances: Vec<usize> = (0..WRITE_ATTEMPTS)
            .map(|_| rng.below(w.cluster.len() as u64) as usize)
            .collect();
        let backoff = Duration::from_millis(rng.range(50, 150));
        let pause = Duration::from_millis(rng.range(50, 300));
        revision[run] += 1;
        let rev = revision[run];
        let body = write_body(kind, &w.fixture.runs[run], run, rev);

        let t_change_us = now_us();
        let mut attempts = Vec::new();
        let mut acked = None;
        for instance in instances {
            let url = format!(
                "{}{}/{}",
                w.cluster.addr(instance),
                prefix(ajax),
                kind.route()
            );
            let a = send_attempt(instance, client.post(url).json(&body)).await;
            let ok = a.status == Some(200);
            let end = a.end_us;
            attempts.push(a);
            if ok {
                acked = Some((end, instance));
                break;
            }
            tokio::time::sleep(backoff).await;
        }
        // One event per channel the write set; the attempts are judged once, on the first.
        for (c, ch) in kind.channels().iter().enumerate() {
            events.push(EventOp {
                id: writer as u64 * 1_000_000 + i,
                run: object(run, *ch),
                revision: rev,
                t_change_us,
                t_ack_us: acked.map(|(t, _)| t),
                instance: acked.map(|(_, inst)| inst),
                attempts: if c == 0 {
                    std::mem::take(&mut attempts)
                } else {
                    Vec::new()
                },
                stream_id: None,
            });
        }
        i += 1;
        tokio::time::sleep(pause).await;
    }
    events
}

#[derive(Debug, Clone, Copy)]
enum Read {
    RunsGet { run: usize, ajax: bool },
    Search { exp: usize, body: usize, ajax: bool },
    History { run: usize, ajax: bool },
    Bulk { run: usize, ajax: bool },
    GetRun { run: usize },
}

impl Read {
    fn view(self) -> &'static str {
        match self {
            Read::RunsGet { ajax: false, .. } => "api runs/get",
            Read::RunsGet { ajax: true, .. } => "ajax runs/get",
            Read::Search { ajax: false, .. } => "api runs/search",
            Read::Search { ajax: true, .. } => "ajax runs/search",
            Read::History { ajax: false, .. } => "api metrics/get-history",
            Read::History { ajax: true, .. } => "ajax metrics/get-history",
            Read::Bulk { ajax: false, .. } => "api metrics/get-history-bulk-interval",
            Read::Bulk { ajax: true, .. } => "ajax metrics/get-history-bulk-interval",
            Read::GetRun { .. } => "graphql GetRun",
        }
    }

    /// The (run, channel) pairs the answer shows.
    fn shows(self, f: &Fixture) -> Vec<(usize, Channel)> {
        let all = |run: usize| Channel::ALL.iter().map(move |c| (run, *c));
        match self {
            Read::RunsGet { run, .. } | Read::GetRun { run } => all(run).collect(),
            Read::Search { exp, .. } => f.runs_of(exp).flat_map(all).collect(),
            Read::History { run, .. } | Read::Bulk { run, .. } => vec![(run, Channel::Metric)],
        }
    }
}

/// The search bodies: the UI's and the client's shapes; 0 and 2 are canonically equal (2
/// spells out the defaults), so they share an entry.
fn search_body(exp_id: &str, body: usize) -> Value {
    match body {
        0 => json!({ "experiment_ids": [exp_id], "max_results": 100 }),
        1 => json!({
            "experiment_ids": [exp_id],
            "max_results": 100,
            "order_by": ["attributes.start_time DESC"],
        }),
        _ => json!({
            "filter": "",
            "max_results": 100,
            "run_view_type": "ACTIVE_ONLY",
            "experiment_ids": [exp_id],
        }),
    }
}

/// A compact `GetRun`: the view keys by the whole body, so any query text of that operation is
/// cached (the UI's is longer).
const GET_RUN: &str = "query GetRun($data: MlflowGetRunInput!) { mlflowGetRun(input: $data) { run { info { runName runUuid experimentId } data { metrics { key value step } tags { key value } } } } }";

/// Readers' credentials: MLflow without its auth app ignores them; runcache keys by them.
const CREDENTIALS: [Option<&str>; 3] = [
    None,
    Some("Basic YWxpY2U6YWxpY2UtcGFzc3dvcmQ="),
    Some("Basic Ym9iOmJvYi1wYXNzd29yZA=="),
];

/// Reads until the end of the workload; returns the reads in order.
pub async fn reader(w: Arc<MlflowWorkload>, reader: usize) -> Vec<ReadOp> {
    let client = client();
    let f = &w.fixture;
    let mut ops = Vec::new();
    let mut k = 0u64;
    while now_us() < w.end_us {
        let mut rng = Rng::derive(w.seed, READER_BASE + reader as u64, k);
        let instance = rng.below(w.cluster.len() as u64) as usize;
        let cred = CREDENTIALS[rng.below(CREDENTIALS.len() as u64) as usize];
        let ajax = rng.below(2) == 0;
        let run = rng.below(RUNS as u64) as usize;
        let read = match rng.weighted(&[30, 25, 20, 10, 15]) {
            0 => Read::RunsGet { run, ajax },
            1 => Read::Search {
                exp: rng.below(EXPERIMENTS as u64) as usize,
                body: rng.below(3) as usize,
                ajax,
            },
            2 => Read::History { run, ajax },
            3 => Read::Bulk { run, ajax },
            _ => Read::GetRun { run },
        };
        let think = Duration::from_millis(rng.range(0, 8));
        let shows = read.shows(f);
        let mut op = ReadOp {
            id: k,
            reader,
            instance,
            cred: None,
            view: Some(ViewKind::Mlflow { view: read.view() }),
            runs: shows.iter().map(|(r, c)| object(*r, *c)).collect(),
            ..ReadOp::default()
        };
        let base = w.cluster.addr(instance);
        let mut req = match read {
            Read::RunsGet { run, ajax } => client.get(format!(
                "{base}{}/runs/get?run_id={}",
                prefix(ajax),
                f.runs[run]
            )),
            Read::Search { exp, body, ajax } => client
                .post(format!("{base}{}/runs/search", prefix(ajax)))
                .json(&search_body(&f.experiments[exp], body)),
            Read::History { run, ajax } => client.get(format!(
                "{base}{}/metrics/get-history?run_id={}&metric_key={KEY}",
                prefix(ajax),
                f.runs[run]
            )),
            Read::Bulk { run, ajax } => client.get(format!(
                "{base}{}/metrics/get-history-bulk-interval?run_ids={}&metric_key={KEY}&max_results=1000",
                prefix(ajax),
                f.runs[run]
            )),
            Read::GetRun { run } => client.post(format!("{base}/graphql")).json(&json!({
                "operationName": "GetRun",
                "query": GET_RUN,
                "variables": { "data": { "runId": f.runs[run] } },
            })),
        };
        if let Some(h) = cred {
            req = req.header(http::header::AUTHORIZATION, h);
        }
        send_read(&mut op, req, |op, body| {
            interpret(op, read, &shows, f, body)
        })
        .await;
        ops.push(op);
        k += 1;
        tokio::time::sleep(think).await;
    }
    ops
}

/// The revision in a tag list (`[{key, value}]`) under [`KEY`].
fn tag_revision(tags: &Value) -> Option<u64> {
    tags.as_array()?
        .iter()
        .find(|t| t["key"] == KEY)?
        .get("value")?
        .as_str()?
        .parse()
        .ok()
}

/// The highest value of [`KEY`] in a metric list (`[{key, value, …}]`): the latest metric of a
/// run, or the newest point of a history.
fn metric_revision<'a>(metrics: impl IntoIterator<Item = &'a Value>) -> Option<u64> {
    metrics
        .into_iter()
        .filter(|m| m["key"] == KEY)
        .filter_map(|m| m["value"].as_f64())
        .filter(|v| v.fract() == 0.0 && *v >= 0.0)
        .map(|v| v as u64)
        .max()
}

fn name_revision(name: &Value, run: usize) -> Option<u64> {
    name.as_str()?
        .strip_prefix(&format!("r{run}-"))?
        .parse()
        .ok()
}

/// One run as `runs/get` and `runs/search` show it (`{info, data}`): its three revisions.
fn run_revisions(run: usize, r: &Value) -> [Option<u64>; 3] {
    [
        tag_revision(&r["data"]["tags"]),
        metric_revision(r["data"]["metrics"].as_array().into_iter().flatten()),
        name_revision(&r["info"]["run_name"], run),
    ]
}

/// Reads a 200 body: the revision of every (run, channel) the read shows, or what is wrong.
fn interpret(op: &mut ReadOp, read: Read, shows: &[(usize, Channel)], f: &Fixture, body: &[u8]) {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if op.status != Some(200) {
        if let Some(v) = &parsed {
            op.error_code = v["error"]["code"].as_str().map(str::to_owned);
        }
        op.error = Some(String::from_utf8_lossy(&body[..body.len().min(200)]).into());
        return;
    }
    let Some(v) = parsed else {
        op.error = Some(format!(
            "200 body is not JSON: {:?}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        ));
        return;
    };
    // (run, channel) -> revision, from the answer.
    let mut seen: Vec<((usize, Channel), Option<u64>)> = Vec::new();
    let mut problems = Vec::new();
    match read {
        Read::RunsGet { run, .. } => {
            let r = &v["run"];
            if r["info"]["run_id"] != f.runs[run].as_str() {
                problems.push(format!("runs/get answered run {}", r["info"]["run_id"]));
            }
            for (c, rev) in Channel::ALL.iter().zip(run_revisions(run, r)) {
                seen.push(((run, *c), rev));
            }
        }
        Read::Search { exp, .. } => {
            let listed = v["runs"].as_array().cloned().unwrap_or_default();
            let mut ids: Vec<usize> = Vec::new();
            for r in &listed {
                match r["info"]["run_id"].as_str().and_then(|id| f.index_of(id)) {
                    Some(i) => {
                        ids.push(i);
                        for (c, rev) in Channel::ALL.iter().zip(run_revisions(i, r)) {
                            seen.push(((i, *c), rev));
                        }
                    }
                    None => problems.push(format!("search lists {}", r["info"]["run_id"])),
                }
            }
            ids.sort_unstable();
            let want: Vec<usize> = f.runs_of(exp).collect();
            if ids != want {
                problems.push(format!("search lists runs {ids:?}, not {want:?}"));
            }
        }
        Read::History { run, .. } => {
            seen.push((
                (run, Channel::Metric),
                metric_revision(v["metrics"].as_array().into_iter().flatten()),
            ));
        }
        Read::Bulk { run, .. } => {
            let points = v["metrics"].as_array().into_iter().flatten();
            let own: Vec<&Value> = points
                .filter(|m| m["run_id"] == f.runs[run].as_str())
                .collect();
            seen.push(((run, Channel::Metric), metric_revision(own)));
        }
        Read::GetRun { run } => {
            let r = &v["data"]["mlflowGetRun"]["run"];
            if r["info"]["runUuid"] != f.runs[run].as_str() {
                problems.push(format!(
                    "GetRun answered run {} ({})",
                    r["info"]["runUuid"],
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ));
            }
            seen.push(((run, Channel::Tag), tag_revision(&r["data"]["tags"])));
            seen.push((
                (run, Channel::Metric),
                metric_revision(r["data"]["metrics"].as_array().into_iter().flatten()),
            ));
            seen.push((
                (run, Channel::Name),
                name_revision(&r["info"]["runName"], run),
            ));
        }
    }
    for want in shows {
        match seen.iter().find(|(k, _)| k == want) {
            Some((_, Some(rev))) => op.revisions.push((object(want.0, want.1), *rev)),
            _ => problems.push(format!("no {} revision for run r{}", want.1.name(), want.0)),
        }
    }
    if !problems.is_empty() {
        op.error = Some(problems.join("; "));
    }
}

/// Sums the instances' own counters (`/cache/stats` under the profile's admin prefix) for the
/// summary: hits, misses and what the writes invalidated.
pub async fn stats(cluster: &Cluster, admin_prefix: &str) -> String {
    let client = client();
    let mut out = Vec::new();
    for i in 0..cluster.len() {
        let url = format!("{}{admin_prefix}/cache/stats", cluster.addr(i));
        let got = client.get(url).bearer_auth(ADMIN_TOKEN).send().await;
        let line = match got {
            Ok(r) => match r.json::<Value>().await {
                Ok(v) => {
                    let s = &v["stats"];
                    format!(
                        "instance {i} (since its last start): hits {} misses {} invalidations {} origin fetches {}",
                        s["hits"], s["misses"], s["invalidations"], s["origin_fetches"]
                    )
                }
                Err(e) => format!("instance {i}: stats unreadable: {e}"),
            },
            Err(e) => format!("instance {i}: stats unreadable: {}", error_chain(&e)),
        };
        out.push(line);
    }
    out.join("\n   ")
}

/// Instances that ran, for the summary's totals.
pub fn totals(cluster: &Cluster) -> Vec<SlotTotals> {
    cluster.slots.iter().map(|s| s.totals()).collect()
}

/// Waits up to 10 s for MLflow to answer `/health`.
pub async fn wait_healthy(mlflow: &str) {
    let client = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = client.get(format!("{mlflow}/health")).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no MLflow server answers {mlflow}/health (CHECKER_MLFLOW_URL)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where MLflow's log ends now (`CHECKER_MLFLOW_LOG`), so only the run's lines are read.
pub fn log_offset(log: Option<&str>) -> u64 {
    log.and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len())
}

/// One 5xx answer in MLflow's log (uvicorn's access line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged5xx {
    /// When it was logged, in whole seconds since the epoch (the log's time is UTC:
    /// `tests/mlflow/run.sh` starts MLflow with `TZ=UTC`).
    pub at_secs: i64,
    /// The route: the path after `/2.0/mlflow/` (`runs/search`), or `graphql`.
    pub route: String,
}

/// The route of a request path, as [`Logged5xx::route`] and [`read_route`] spell it.
fn route_of(path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    match path.split_once("/2.0/mlflow/") {
        Some((_, route)) => route.to_owned(),
        None => path.trim_start_matches('/').to_owned(),
    }
}

/// The route a read's view asks (`api runs/search` → `runs/search`, `graphql GetRun` →
/// `graphql`).
fn read_route(view: &str) -> &str {
    match view.split_once(' ') {
        Some(("graphql", _)) => "graphql",
        Some((_, route)) => route,
        None => view,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026/12/06 10:57:13` (UTC) as seconds since the epoch.
fn parse_log_time(s: &str) -> Option<i64> {
    let (date, time) = s.get(..19)?.split_once(' ')?;
    let mut d = date.split('/').map(str::parse::<i64>);
    let (y, mo, da) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':').map(str::parse::<i64>);
    let (h, mi, se) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    Some(days_from_civil(y, mo, da) * 86_400 + h * 3_600 + mi * 60 + se)
}

/// The 5xx answers MLflow logged after `offset`: lines such as
/// `2026/12/06 10:57:13 INFO:     127.0.0.1:39870 - "POST /api/2.0/mlflow/runs/search HTTP/1.1" 500 Internal Server Error`.
pub fn logged_5xx(log: &str, offset: u64) -> Vec<Logged5xx> {
    let Ok(bytes) = std::fs::read(log) else {
        return Vec::new();
    };
    let from = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    parse_5xx(&String::from_utf8_lossy(&bytes[from..]))
}

fn parse_5xx(text: &str) -> Vec<Logged5xx> {
    text.lines()
        .filter_map(|line| {
            let (request, status) = line.split_once(" HTTP/1.1\" ")?;
            let digits = status.as_bytes().get(..3)?;
            if digits[0] != b'5' || !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let (_, path) = request.rsplit_once(' ')?;
            Some(Logged5xx {
                at_secs: parse_log_time(line)?,
                route: route_of(path),
            })
        })
        .collect()
}

/// Class of a `502` runcache answered for MLflow's own 5xx, once matched against MLflow's log.
pub const ORIGIN_5XX: &str = "502 origin_error: MLflow answered 5xx (matched in its log)";

/// MLflow's own failures are not runcache's. A `502 origin_error` whose message says the origin
/// answered 5xx is excused when MLflow logged a 5xx answer on the same route within a second
/// of the read (`wall_at(us)` gives a checker time as seconds since the epoch). Several reads
/// may match one logged answer: runcache gives one fetch's answer to the requests waiting on
/// it. A 502 with no such line stays a violation. Returns how many were excused.
pub fn excuse_origin_failures(
    report: &mut Report,
    h: &History,
    logged: &[Logged5xx],
    wall_at: impl Fn(u64) -> f64,
) -> usize {
    let mut excused = 0;
    report.violations.retain(|v| {
        let Some(read) = v.read.map(|i| &h.reads[i]) else {
            return true;
        };
        let says_origin_5xx = v.kind == "failure"
            && v.class == "502 origin_error"
            && read
                .error
                .as_deref()
                .is_some_and(|e| e.contains("the origin answered 5"));
        let Some(ViewKind::Mlflow { view }) = read.view else {
            return true;
        };
        let (from, to) = (
            wall_at(read.start_us).floor() as i64 - 1,
            wall_at(read.end_us).ceil() as i64 + 1,
        );
        let matched = logged
            .iter()
            .any(|l| l.route == read_route(view) && (from..=to).contains(&l.at_secs));
        if says_origin_5xx && matched {
            excused += 1;
            return false;
        }
        true
    });
    if excused > 0 {
        if let Some(n) = report.failures.get_mut("502 origin_error") {
            *n -= excused;
            if *n == 0 {
                report.failures.remove("502 origin_error");
            }
        }
        *report.failures.entry(ORIGIN_5XX.into()).or_default() += excused;
        *report.excused.entry(ORIGIN_5XX.into()).or_default() += excused;
    }
    excused
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlflow_log_lines_give_5xx_answers_with_their_route_and_time() {
        let log = "\
2026/12/06 10:57:12 INFO:     127.0.0.1:39856 - \"GET /ajax-api/2.0/mlflow/metrics/get-history?metric_key=rev&run_id=b2 HTTP/1.1\" 200 OK
Traceback (most recent call last):
AttributeError: module 'mlflow.server.auth' has no attribute 'auth_config'
2026/12/06 10:57:13 INFO:     127.0.0.1:39870 - \"POST /api/2.0/mlflow/runs/search HTTP/1.1\" 500 Internal Server Error
1970/01/02 00:00:01 INFO:     127.0.0.1:1 - \"POST /graphql HTTP/1.1\" 503 Service Unavailable
";
        let got = parse_5xx(log);
        assert_eq!(
            got,
            vec![
                Logged5xx {
                    at_secs: 1_796_554_633,
                    route: "runs/search".into()
                },
                Logged5xx {
                    at_secs: 86_401,
                    route: "graphql".into()
                },
            ]
        );
        assert_eq!(read_route("ajax runs/search"), "runs/search");
        assert_eq!(read_route("graphql GetRun"), "graphql");
        assert_eq!(
            read_route("api metrics/get-history-bulk-interval"),
            "metrics/get-history-bulk-interval"
        );
    }
}

//! A Jepsen-style consistency checker for runcache.
//!
//! It starts a real `redis-server`, 2–3 runcache instances in process on it (one prefix, near
//! cache on, short TTLs so refresh-ahead and stale-while-revalidate happen), and an in-process
//! origin whose data changes. Readers read four views with four credentials (metrics, feature
//! importance, comparisons, and rankings, whose entries learn the runs they depend on from the
//! origin's answer), a writer bumps a run's revision at the origin and delivers
//! `training-completed`, and faults are injected from a seeded schedule (Redis SIGKILL and
//! restart, empty or from an older RDB file; SIGSTOP/SIGCONT; `CLIENT KILL TYPE pubsub`;
//! `DEBUG SLEEP`; an instance restart; a poisoned event-stream entry: a quarter of the
//! writer's events go through the stream, see `stream.rs`). Every
//! operation's start and end is recorded on one monotonic clock, and the history is checked
//! afterwards against runcache's promises (see `check.rs`):
//!
//! 1. after an invalidation is acknowledged, no read that starts later, on any instance,
//!    returns the old data (SPEC 1 "Events"; the only allowance is SPEC 2's
//!    `memory.degraded_max_age_ms` for reads served from the memory tier);
//! 2. a cached answer goes only to credentials the origin accepted for it (SPEC 4);
//! 3. reads do not fail: the origin here never does, so runcache's 5xx answers, hangs and
//!    refusals of accepted credentials are violations (connection failures while an instance
//!    restarts are not).
//!
//! The test fails when there are violations, and prints a summary with every kind of
//! violation, examples (the read, the event behind it, the faults around it) and the command
//! that reproduces the run.
//!
//! # Running
//!
//! ```text
//! cargo test --locked --test checker -- --nocapture                 # CI: ~30 s of workload
//! CHECKER_SECS=120 cargo test --locked --test checker -- --nocapture   # a longer run
//! cargo test --locked --test checker check_tests                    # the checking logic only
//! ```
//!
//! Environment variables:
//! - `CHECKER_SEED`: the seed (default 20250611); `random` picks one from the clock (printed).
//! - `CHECKER_SECS`: seconds of workload (default 30).
//! - `CHECKER_INSTANCES`: runcache instances, 1–5 (default 3).
//! - `CHECKER_READERS`: reader tasks (default 8).
//! - `CHECKER_SHOW`: examples printed per violation kind (default 8).
//! - `CHECKER_HISTORY`: a file to write the whole history to, one operation per line.
//! - `CHECKER_LOG`: a file to write runcache's own logs to (JSON lines; `RUST_LOG` filters).
//! - `CHECKER_REDIS`: `single` (one `redis-server` and its faults), `cluster` (a Redis Cluster
//!   of three primaries with a replica each, `redis.mode = "cluster"`, with primary failovers
//!   in the schedule), `sentinel` (a master and a replica under three sentinels,
//!   `redis.mode = "sentinel"`, with planned failovers while the old master stays writable and
//!   holds the instances' near-cache subscriptions), `both` (single and cluster) or `all` (the
//!   default: one run of each of the three, one after the other).
//!
//! # With a real MLflow server as the origin
//!
//! `mlflow_consistency_under_faults` (ignored by a plain `cargo test`: it needs a running
//! `mlflow server`) runs the same checks with MLflow as the origin, two instances configured by
//! `config/mlflow.toml`, writes made through them with MLflow's own routes, and the
//! single-Redis fault schedule (see `mlflow.rs`). `tests/mlflow/run.sh` starts MLflow and runs
//! it:
//!
//! ```text
//! CHECKER_MLFLOW_URL=http://127.0.0.1:5000 cargo test --locked --test checker \
//!     mlflow_consistency_under_faults -- --ignored --nocapture
//! ```
//!
//! It reads the same variables (`CHECKER_INSTANCES` defaults to 2 there), and
//! `CHECKER_WRITERS` (default 2): concurrent writers, each with runs of its own; and
//! `CHECKER_MLFLOW_LOG`: MLflow's log, to excuse runcache's 502s for MLflow's own 5xx answers
//! (each matched with a 5xx MLflow logged on its route within a second; see `mlflow.rs`).
//!
//! # Reproducibility
//!
//! Everything the checker chooses comes from the seed: the fault schedule (kinds, order,
//! parameters, planned times) is planned up front; each reader, the writer and the origin's
//! delays have their own stream, and the `k`-th operation of a task draws all its choices from
//! `derive(seed, task, k)` before it starts, so neither scheduling nor retries shift later
//! choices. A failing seed therefore replays the same operations and faults. Timing is real,
//! though: how the operations interleave with each other and with the faults, how many
//! operations fit in the duration, and which origin request gets which delay (drawn in arrival
//! order) can differ from run to run, so a violation may need a few runs of its seed to recur.
#![allow(unreachable_pub, missing_docs)]

// Shared with tests/api, which uses other parts of it.
#[allow(dead_code)]
#[path = "../support/redis.rs"]
mod redis_server;

mod check;
#[cfg(test)]
mod check_tests;
mod cluster;
mod faults;
mod history;
mod mlflow;
mod origin;
mod rng;
mod stream;
mod summary;
mod workload;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::check::check;
use crate::cluster::{Cluster, instance_settings};
use crate::history::{History, now_us, start_clock};
use crate::origin::Origin;
use crate::redis_server::{TestCluster, TestRedis, TestSentinels};
use crate::rng::{Rng, STREAM_SETUP};
use crate::workload::Workload;
use runcache::config::Settings;

/// Runs `1..=RUNS`: few, so reads hit.
const RUNS: u32 = 8;
/// Distinct comparisons readers ask for.
const COMPARISONS: usize = 6;
/// Rankings readers ask for (`1..=RANKINGS`), each listing 3–5 runs.
const RANKINGS: usize = 4;
const DEFAULT_SEED: u64 = 20_250_611;

#[derive(Debug, Clone)]
struct Config {
    seed: u64,
    secs: u64,
    instances: usize,
    readers: usize,
    show: usize,
}

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

impl Config {
    fn from_env() -> Self {
        let seed = match std::env::var("CHECKER_SEED").as_deref().map(str::trim) {
            Ok("random") => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 % 1_000_000_000)
                .unwrap_or(DEFAULT_SEED),
            Ok(_) => env_num("CHECKER_SEED", DEFAULT_SEED),
            Err(_) => DEFAULT_SEED,
        };
        let instances = env_num("CHECKER_INSTANCES", 3) as usize;
        assert!(
            (1..=5).contains(&instances),
            "CHECKER_INSTANCES must be 1-5"
        );
        let readers = (env_num("CHECKER_READERS", 8) as usize).max(1);
        Self {
            seed,
            secs: env_num("CHECKER_SECS", 30).max(1),
            instances,
            readers,
            show: env_num("CHECKER_SHOW", 8) as usize,
        }
    }

    fn reproduce(&self) -> String {
        format!(
            "CHECKER_SEED={} CHECKER_SECS={} CHECKER_INSTANCES={} CHECKER_READERS={} cargo test --locked --test checker -- --nocapture",
            self.seed, self.secs, self.instances, self.readers
        )
    }
}

/// runcache's logs to `CHECKER_LOG`, when set.
fn init_logs() {
    let Ok(path) = std::env::var("CHECKER_LOG") else {
        return;
    };
    let file = std::fs::File::create(&path).expect("CHECKER_LOG file");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("runcache=info"));
    runcache::telemetry::init_with(runcache::config::LogFormat::Json, filter, move || {
        file.try_clone().expect("log file")
    });
}

/// What runcache runs on in one run of the checker.
enum Backend {
    Single(TestRedis),
    Cluster(TestCluster),
    Sentinel(TestSentinels),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistency_under_faults() {
    start_clock();
    init_logs();
    let which = std::env::var("CHECKER_REDIS").unwrap_or_else(|_| "all".into());
    let modes: &[&str] = match which.as_str() {
        "single" => &["single"],
        "cluster" => &["cluster"],
        "sentinel" => &["sentinel"],
        "both" => &["single", "cluster"],
        "all" => &["single", "cluster", "sentinel"],
        _ => panic!("CHECKER_REDIS must be single, cluster, sentinel, both or all"),
    };
    for mode in modes {
        match *mode {
            "single" => run(Backend::Single(TestRedis::start().await)).await,
            "cluster" => run(Backend::Cluster(TestCluster::start(3, 1).await)).await,
            _ => run(Backend::Sentinel(TestSentinels::start().await)).await,
        }
    }
}

/// The checker with a real MLflow tracking server as the origin: see `mlflow.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real MLflow server: tests/mlflow/run.sh starts one and runs this"]
async fn mlflow_consistency_under_faults() {
    start_clock();
    init_logs();
    let url = std::env::var("CHECKER_MLFLOW_URL")
        .expect("CHECKER_MLFLOW_URL: the MLflow server to check against (tests/mlflow/run.sh)");
    run_mlflow(
        url.trim_end_matches('/').to_owned(),
        TestRedis::start().await,
    )
    .await;
}

/// Settings of MLflow instance `index`: the shipped `config/mlflow.toml`, then only what the
/// harness must choose (addresses, prefix, token, journal, graceful-stop allowance).
fn mlflow_settings(mlflow: &str, redis_url: &str, prefix: &str, index: usize) -> Settings {
    let mut s = Settings::load_from(Some("config/mlflow.toml"), Some(HashMap::new()))
        .expect("config/mlflow.toml loads");
    let checker = instance_settings(mlflow, redis_url, prefix, index);
    s.server.addr = checker.server.addr;
    s.server.shutdown_timeout_ms = checker.server.shutdown_timeout_ms;
    s.origin.base_url = mlflow.into();
    s.redis.url = checker.redis.url;
    s.cache.prefix = checker.cache.prefix;
    s.admin.token = checker.admin.token;
    s.journal.path = checker.journal.path;
    s.memory.degraded_max_age_ms = checker.memory.degraded_max_age_ms;
    s.validate().expect("valid MLflow checker settings");
    s
}

async fn run_mlflow(url: String, redis: TestRedis) {
    let began = Instant::now();
    let mut cfg = Config::from_env();
    if std::env::var("CHECKER_INSTANCES").is_err() {
        cfg.instances = 2;
    }
    let writers = (env_num("CHECKER_WRITERS", 2) as usize).clamp(1, mlflow::RUNS);
    let reproduce = format!(
        "CHECKER_MLFLOW_URL=<an mlflow server> CHECKER_WRITERS={writers} {} mlflow_consistency_under_faults -- --ignored",
        cfg.reproduce().trim_end_matches(" -- --nocapture")
    );
    println!(
        "checker (MLflow at {url}, single redis): {cfg:?}, writers {writers}\nchecker: reproduce with {reproduce}"
    );
    mlflow::wait_healthy(&url).await;
    let mlflow_log = std::env::var("CHECKER_MLFLOW_LOG").ok();
    let log_from = mlflow::log_offset(mlflow_log.as_deref());
    // The checker's clock against the wall clock, to match reads with MLflow's log lines.
    let mono0 = now_us();
    let wall0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    let prefix = format!("checker-mlflow-{}", uuid::Uuid::new_v4().simple());
    let fixture = mlflow::setup(&url, &prefix).await;
    println!(
        "checker: experiments {:?}, runs {:?}\nchecker: revisions tracked per run and channel:\n   {}",
        fixture.experiments,
        fixture.runs,
        mlflow::legend()
    );
    let settings: Vec<Settings> = (0..cfg.instances)
        .map(|i| mlflow_settings(&url, &redis.url(), &prefix, i))
        .collect();
    let admin_prefix = settings[0].server.admin_prefix.clone();
    let journals: Vec<String> = settings.iter().map(|s| s.journal.path.clone()).collect();
    let cluster = Arc::new(Cluster::start(settings).await);
    cluster.wait_near_live().await;

    let duration_us = cfg.secs * 1_000_000;
    let mut plan = faults::plan(cfg.seed, duration_us, cfg.instances);
    // No event stream here: writes are MLflow's own requests.
    plan.retain(|p| p.kind != crate::history::FaultKind::PoisonedStreamEntry);
    println!("checker: {} planned faults", plan.len());
    for p in &plan {
        println!("   {}", p.describe());
    }
    let start_us = now_us();
    let end_us = start_us + duration_us;
    let w = Arc::new(mlflow::MlflowWorkload {
        seed: cfg.seed,
        writers,
        fixture,
        cluster: cluster.clone(),
        end_us,
    });
    println!(
        "checker: setup took {:.1} s; workload of {} s begins",
        began.elapsed().as_secs_f64(),
        cfg.secs
    );
    let readers: Vec<_> = (0..cfg.readers)
        .map(|j| tokio::spawn(mlflow::reader(w.clone(), j)))
        .collect();
    let writer_tasks: Vec<_> = (0..writers)
        .map(|j| tokio::spawn(mlflow::writer(w.clone(), j)))
        .collect();
    let stream = stream::StreamSide::new(&prefix, vec![redis.url()], false);
    let fault_task = tokio::spawn(faults::run(
        plan,
        redis,
        cluster.clone(),
        stream,
        start_us,
        end_us,
    ));
    let stuck_after = Duration::from_secs(cfg.secs + 90);
    let joined = tokio::time::timeout(stuck_after, async {
        let mut reads = Vec::new();
        for r in readers {
            reads.extend(r.await.expect("reader task"));
        }
        let mut events = Vec::new();
        for t in writer_tasks {
            events.extend(t.await.expect("writer task"));
        }
        let (redis, faults) = fault_task.await.expect("fault task");
        (reads, events, redis, faults)
    })
    .await;
    let Ok((reads, events, redis, faults)) = joined else {
        panic!(
            "the MLflow run did not finish within {stuck_after:?} (stuck); reproduce with {reproduce}"
        );
    };
    let counters = mlflow::stats(&cluster, &admin_prefix).await;
    cluster.stop_all().await;
    drop(redis);
    let history = finish(journals, reads, events, faults);
    let mut report = check(&history);
    let logged = mlflow_log
        .as_deref()
        .map_or_else(Vec::new, |log| mlflow::logged_5xx(log, log_from));
    let wall_at = |us: u64| wall0 + (us as f64 - mono0 as f64) / 1e6;
    let excused = mlflow::excuse_origin_failures(&mut report, &history, &logged, wall_at);
    let info = summary::RunInfo {
        seed: cfg.seed,
        secs: cfg.secs,
        instances: cfg.instances,
        readers: cfg.readers,
        runs: u32::try_from(mlflow::RUNS).expect("few runs"),
        show: cfg.show,
        elapsed_total: began.elapsed(),
        totals: mlflow::totals(&cluster),
        origin_calls: None,
        reproduce: reproduce.clone(),
    };
    println!("{}", summary::render(&info, &history, &report));
    let writes = history
        .events
        .iter()
        .filter(|e| !e.attempts.is_empty())
        .count();
    let acked = history
        .events
        .iter()
        .filter(|e| !e.attempts.is_empty() && e.t_ack_us.is_some())
        .count();
    println!(
        "checker (MLflow): {} reads, {writes} writes ({acked} acknowledged), {} faults, {} violations\n   MLflow logged {} 5xx answer(s) during the run{}; {excused} 502(s) of runcache's for them excused\n   {counters}",
        history.reads.len(),
        history
            .faults
            .iter()
            .filter(|f| f.kind != crate::history::FaultKind::SaveCopy)
            .count(),
        report.violations.len(),
        logged.len(),
        if mlflow_log.is_some() {
            ""
        } else {
            " (no CHECKER_MLFLOW_LOG: not counted)"
        },
    );
    assert!(
        history.reads.iter().any(|r| r.status == Some(200)) && acked > 0,
        "the workload did nothing: no answered reads or no acknowledged writes"
    );
    assert!(
        report.violations.is_empty(),
        "{} violation(s) with MLflow as the origin (see the summary above); reproduce with {reproduce}",
        report.violations.len()
    );
}

async fn run(backend: Backend) {
    let began = Instant::now();
    let cfg = Config::from_env();
    let mode = match &backend {
        Backend::Single(_) => "single",
        Backend::Cluster(_) => "cluster",
        Backend::Sentinel(_) => "sentinel",
    };
    println!(
        "checker ({mode} redis): {cfg:?}\nchecker: reproduce with CHECKER_REDIS={mode} {}",
        cfg.reproduce()
    );
    let mut setup = Rng::derive(cfg.seed, STREAM_SETUP, 0);
    let comparisons = workload::plan_comparisons(&mut setup, RUNS, COMPARISONS);
    let rankings = workload::plan_rankings(&mut setup, RUNS, RANKINGS);
    println!("checker: rankings list runs {rankings:?}");
    let origin = Origin::start(cfg.seed, RUNS, rankings.clone()).await;
    let prefix = format!("checker-{}", uuid::Uuid::new_v4().simple());
    let settings: Vec<_> = (0..cfg.instances)
        .map(|i| match &backend {
            Backend::Single(redis) => instance_settings(&origin.url, &redis.url(), &prefix, i),
            Backend::Cluster(nodes) => {
                let mut s = instance_settings(&origin.url, "redis://unused:1", &prefix, i);
                s.redis.mode = "cluster".into();
                s.redis.cluster_urls = nodes
                    .urls()
                    .into_iter()
                    .map(secrecy::SecretString::from)
                    .collect();
                s.validate().expect("valid cluster settings");
                s
            }
            Backend::Sentinel(sentinels) => {
                // Only the credentials and database of this URL are used.
                let mut s = instance_settings(&origin.url, "redis://placeholder:1/0", &prefix, i);
                s.redis.mode = "sentinel".into();
                s.redis.sentinel_urls = sentinels
                    .urls()
                    .into_iter()
                    .map(secrecy::SecretString::from)
                    .collect();
                s.redis.master_name = Some(sentinels.name.clone());
                s.validate().expect("valid sentinel settings");
                s
            }
        })
        .collect();
    let journals: Vec<String> = settings.iter().map(|s| s.journal.path.clone()).collect();
    let stream = match &backend {
        Backend::Single(redis) => stream::StreamSide::new(&prefix, vec![redis.url()], false),
        Backend::Cluster(nodes) => stream::StreamSide::new(&prefix, nodes.urls(), true),
        Backend::Sentinel(_) => stream::StreamSide::new(&prefix, Vec::new(), false),
    };
    let cluster = Arc::new(Cluster::start(settings).await);
    cluster.wait_near_live().await;

    let duration_us = cfg.secs * 1_000_000;
    let plan = match &backend {
        Backend::Single(_) => faults::plan(cfg.seed, duration_us, cfg.instances),
        Backend::Cluster(_) => faults::plan_cluster(cfg.seed, duration_us, cfg.instances),
        Backend::Sentinel(_) => faults::plan_sentinel(cfg.seed, duration_us, cfg.instances),
    };
    println!("checker: {} planned faults", plan.len());
    for p in &plan {
        println!("   {}", p.describe());
    }
    let start_us = now_us();
    let end_us = start_us + duration_us;
    let w = Arc::new(Workload {
        seed: cfg.seed,
        runs: RUNS,
        comparisons,
        rankings,
        cluster: cluster.clone(),
        origin: origin.clone(),
        stream: stream.clone(),
        end_us,
    });
    println!(
        "checker: setup took {:.1} s; workload of {} s begins",
        began.elapsed().as_secs_f64(),
        cfg.secs
    );

    let readers: Vec<_> = (0..cfg.readers)
        .map(|j| tokio::spawn(workload::reader(w.clone(), j)))
        .collect();
    let writer = tokio::spawn(workload::writer(w.clone()));
    let faulted = cluster.clone();
    let fault_task = tokio::spawn(async move {
        match backend {
            Backend::Single(redis) => {
                let (redis, faults) =
                    faults::run(plan, redis, faulted, stream, start_us, end_us).await;
                (Backend::Single(redis), faults)
            }
            Backend::Cluster(nodes) => {
                let (nodes, faults) =
                    faults::run_cluster(plan, nodes, faulted, stream, start_us, end_us).await;
                (Backend::Cluster(nodes), faults)
            }
            Backend::Sentinel(sentinels) => {
                let (sentinels, faults) =
                    faults::run_sentinel(plan, sentinels, faulted, start_us, end_us).await;
                (Backend::Sentinel(sentinels), faults)
            }
        }
    });

    // Nothing may keep the run going: a read or an event is bounded by the client time-out,
    // a fault step by its own; a generous margin over that catches a harness bug.
    let stuck_after = Duration::from_secs(cfg.secs + 90);
    let joined = tokio::time::timeout(stuck_after, async {
        let mut reads = Vec::new();
        for r in readers {
            reads.extend(r.await.expect("reader task"));
        }
        let events = writer.await.expect("writer task");
        let (redis, faults) = fault_task.await.expect("fault task");
        (reads, events, redis, faults)
    })
    .await;
    let Ok((reads, events, redis, faults)) = joined else {
        panic!(
            "the {mode} run did not finish within {stuck_after:?} (stuck); reproduce with CHECKER_REDIS={mode} {}",
            cfg.reproduce()
        );
    };
    cluster.stop_all().await;
    drop(redis);
    let history = finish(journals, reads, events, faults);
    let report = check(&history);
    let info = summary::RunInfo {
        seed: cfg.seed,
        secs: cfg.secs,
        instances: cfg.instances,
        readers: cfg.readers,
        runs: RUNS,
        show: cfg.show,
        elapsed_total: began.elapsed(),
        totals: cluster.slots.iter().map(|s| s.totals()).collect(),
        origin_calls: Some((
            origin.state.calls.load(Ordering::Relaxed),
            origin.state.refusals.load(Ordering::Relaxed),
        )),
        reproduce: format!("CHECKER_REDIS={mode} {}", cfg.reproduce()),
    };
    println!("{}", summary::render(&info, &history, &report));
    assert!(
        !history.reads.is_empty() && history.events.iter().any(|e| e.t_ack_us.is_some()),
        "the workload did nothing: no reads or no acknowledged events"
    );
    assert!(
        report.violations.is_empty(),
        "{} violation(s) on {mode} redis (see the summary above); reproduce with CHECKER_REDIS={mode} {}",
        report.violations.len(),
        cfg.reproduce()
    );
}

/// After a run: removes the instances' journals, and makes the history (written to
/// `CHECKER_HISTORY` when set).
fn finish(
    journals: Vec<String>,
    reads: Vec<history::ReadOp>,
    events: Vec<history::EventOp>,
    faults: Vec<history::FaultOp>,
) -> History {
    for j in journals {
        let _ = std::fs::remove_file(j);
    }
    let history = History {
        reads,
        events,
        faults,
    };
    if let Ok(path) = std::env::var("CHECKER_HISTORY") {
        std::fs::write(&path, summary::history_lines(&history)).expect("CHECKER_HISTORY file");
        println!("checker: history written to {path}");
    }
    history
}

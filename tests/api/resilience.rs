//! Behaviour under concurrency and failure (SPEC section 3): coalescing within and across
//! instances, stale-while-revalidate, stale-if-error, the write-back race, the on-disk outage
//! journal, the circuit breaker and graceful shutdown. Every fault is provoked for real.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{
    TestApp, TestOrigin, TestRedis, assert_error, free_port, header, spawn_app, spawn_app_with,
    spawn_with_settings, test_settings, wait_for,
};

async fn fetch_count(resp: reqwest::Response) -> u64 {
    let body: Value = resp.json().await.expect("json");
    body["fetch"].as_u64().expect("fetch counter")
}

#[tokio::test]
async fn a_hundred_concurrent_misses_make_one_origin_call() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.origin.set_delay(300);

    let requests = (0..100).map(|_| app.metrics("cold"));
    let responses = futures_util::future::join_all(requests).await;

    assert_eq!(app.origin.calls("/api/v1/models/train/cold/metrics"), 1);
    let mut collapsed = 0;
    for resp in responses {
        assert_eq!(resp.status(), 200);
        if header(&resp, "cache-status").contains("collapsed") || header(&resp, "x-cache") == "HIT"
        {
            collapsed += 1;
        }
        assert_eq!(
            fetch_count(resp).await,
            1,
            "everyone gets the one fetch's body"
        );
    }
    assert_eq!(collapsed, 99);
    let stats = app.stats().await;
    assert!(
        stats["stats"]["coalesced"].as_u64() >= Some(90),
        "{}",
        stats["stats"]
    );
}

#[tokio::test]
async fn a_waiter_that_times_out_gets_a_clean_504_not_a_second_fetch() {
    let app = spawn_app_with(None, |s| s.coalesce.wait_timeout_ms = 200).await;
    app.origin.set_delay(1_000);
    let (a, b) = tokio::join!(app.metrics("slow"), app.metrics("slow"));
    assert_error(a, 504, "origin_timeout").await;
    assert_error(b, 504, "origin_timeout").await;
    assert_eq!(app.origin.calls("/api/v1/models/train/slow/metrics"), 1);
}

#[tokio::test]
async fn two_instances_sharing_redis_make_one_origin_call() {
    let redis = TestRedis::start().await;
    // Public views: with `forward`, each instance validates each credential with the origin
    // once (access::another_instance_revalidates_before_serving covers that).
    let (a, b) = crate::helpers::two_public_instances(&redis).await;
    a.origin.set_delay(300);

    let from_a = (0..20).map(|_| a.metrics("shared"));
    let from_b = (0..20).map(|_| b.metrics("shared"));
    let (ra, rb) = tokio::join!(
        futures_util::future::join_all(from_a),
        futures_util::future::join_all(from_b)
    );

    assert_eq!(a.origin.calls("/api/v1/models/train/shared/metrics"), 1);
    for resp in ra.into_iter().chain(rb) {
        assert_eq!(resp.status(), 200);
        assert_eq!(fetch_count(resp).await, 1);
    }
}

/// An app whose metrics live 1 s, with the given grace and stale-if-error windows.
async fn short_ttl_app(redis: &TestRedis, grace: u64, stale_if_error: u64) -> TestApp {
    spawn_app_with(Some(redis), |s| {
        s.views.metrics.ttl = runcache::config::Ttl(Duration::from_secs(1));
        s.views.metrics.grace = grace;
        s.views.metrics.stale_if_error = stale_if_error;
        s.origin.timeout_ms = 500;
    })
    .await
}

#[tokio::test]
async fn stale_is_served_at_once_while_exactly_one_refresh_runs() {
    let redis = TestRedis::start().await;
    let app = short_ttl_app(&redis, 60, 0).await;
    assert_eq!(fetch_count(app.metrics("1").await).await, 1);
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    app.origin.set_delay(300);
    let started = Instant::now();
    let responses = futures_util::future::join_all((0..10).map(|_| app.metrics("1"))).await;
    let waited = started.elapsed();
    for resp in responses {
        assert_eq!(header(&resp, "x-cache"), "STALE");
        assert_eq!(header(&resp, "cache-status"), "runcache; fwd=stale; hit");
        assert!(!header(&resp, "age").is_empty());
        assert_eq!(fetch_count(resp).await, 1, "the stale body");
    }
    println!("10 stale answers took {waited:?} while the origin takes 300 ms");

    wait_for(|| async { header(&app.metrics("1").await, "x-cache") == "HIT" }).await;
    assert_eq!(
        app.origin.calls("/api/v1/models/train/1/metrics"),
        2,
        "exactly one refresh"
    );
    assert_eq!(fetch_count(app.metrics("1").await).await, 2);
    assert!(app.stats().await["stats"]["stale_served"].as_u64() >= Some(10));
}

#[tokio::test]
async fn stale_if_error_serves_the_old_copy_when_the_origin_fails() {
    let redis = TestRedis::start().await;
    let app = short_ttl_app(&redis, 0, 60).await;
    app.metrics("1").await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    app.origin.set_fail(503);
    let resp = app.metrics("1").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "STALE");
    assert_eq!(
        header(&resp, "cache-status"),
        "runcache; fwd=stale; hit; detail=stale-if-error"
    );
    assert_eq!(fetch_count(resp).await, 1);

    app.origin.set_fail(0);
    app.origin.set_delay(2_000);
    let timed_out = app.metrics("1").await;
    assert_eq!(
        header(&timed_out, "x-cache"),
        "STALE",
        "a time-out also serves stale"
    );

    // No stale copy: a clean JSON error.
    app.origin.set_delay(0);
    app.origin.set_fail(500);
    assert_error(app.metrics("never-cached").await, 502, "origin_error").await;
    assert_eq!(app.stats().await["stats"]["stale_served"], 2);
}

#[tokio::test]
async fn an_event_during_a_slow_fetch_never_lets_its_result_be_served() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.origin.set_delay(500);

    let client = app.client.clone();
    let url = app.url("/api/v1/models/train/7/metrics");
    let in_flight = tokio::spawn(async move { client.get(url).send().await });
    wait_for(|| async { app.origin.total_calls() == 1 }).await;
    // The origin has started answering with pre-event data; the run changes now.
    let event = app.event("training-completed", json!("7")).await;
    assert_eq!(event.status(), 200);
    let first = in_flight.await.expect("task").expect("response");
    assert_eq!(fetch_count(first).await, 1);

    app.origin.set_delay(0);
    let after = app.metrics("7").await;
    assert_eq!(
        header(&after, "x-cache"),
        "MISS",
        "the pre-event fetch must not be served"
    );
    assert_eq!(fetch_count(after).await, 2);
    assert_eq!(header(&app.metrics("7").await, "x-cache"), "HIT");
}

#[tokio::test]
async fn a_namespace_invalidation_during_a_slow_fetch_wins_too() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.origin.set_delay(500);
    let client = app.client.clone();
    let url = app.url("/api/v1/models/compare");
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"model_run_ids": ["1", "2"]}))
            .send()
            .await
    });
    wait_for(|| async { app.origin.total_calls() == 1 }).await;
    let resp = app
        .admin(
            Method::POST,
            "/cache/invalidate",
            Some(json!({"namespace": "comparison"})),
        )
        .await;
    assert_eq!(resp.status(), 200);
    in_flight.await.expect("task").expect("response");
    app.origin.set_delay(0);
    assert_eq!(
        header(&app.compare(json!(["2", "1"])).await, "x-cache"),
        "MISS"
    );
}

#[tokio::test]
async fn the_outage_journal_survives_a_runcache_restart() {
    let mut redis = TestRedis::start().await;
    let journal =
        std::env::temp_dir().join(format!("runcache-journal-{}.log", uuid::Uuid::new_v4()));
    let journal_path = journal.display().to_string();
    let mut first = spawn_app_with(Some(&redis), |s| s.journal.path = journal_path.clone()).await;
    first.metrics("1").await;
    first.compare(json!(["1", "2"])).await;
    let _: () = redis::cmd("SAVE")
        .query_async(&mut redis.conn().await)
        .await
        .expect("SAVE");

    redis.kill();
    assert_eq!(first.event("model-deleted", json!("1")).await.status(), 200);
    first.stop().await;
    let written = std::fs::read_to_string(&journal).expect("journal on disk");
    assert!(written.contains("_gen:v1:run:1"), "{written}");

    // Redis returns from the snapshot, with the invalidated entries back in it; a new
    // runcache process must replay the journal before serving from Redis.
    redis.restart().await;
    let mut settings = test_settings(&first.origin.url, &redis.url());
    settings.cache.prefix = first.prefix.clone();
    settings.journal.path = journal_path;
    let second = spawn_with_settings(settings, first.origin.clone()).await;
    wait_for(|| async { second.stats().await["backend"] == "redis" }).await;
    assert_eq!(header(&second.metrics("1").await, "x-cache"), "MISS");
    assert_eq!(
        header(&second.compare(json!(["1", "2"])).await, "x-cache"),
        "MISS"
    );
    assert_eq!(
        std::fs::read_to_string(&journal).expect("journal").trim(),
        "",
        "replayed, then emptied"
    );
    let _ = std::fs::remove_file(&journal);
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99).div_ceil(100) - 1]
}

async fn timed_hits(app: &TestApp, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let resp = app.metrics("hot").await;
        assert_eq!(resp.status(), 200);
        out.push(t.elapsed());
    }
    out
}

#[tokio::test]
async fn with_redis_hung_the_circuit_opens_and_requests_stop_waiting_on_it() {
    let redis = TestRedis::start().await;
    // Without the near cache: hits from it never touch Redis, so they would not notice it
    // hung (near::no_entry_outlives_the_near_cache_lifetime_cap bounds what they serve).
    let app = spawn_app_with(Some(&redis), |s| {
        s.redis.probe_interval_ms = 200;
        s.l1.enabled = false;
    })
    .await;
    app.metrics("hot").await;
    let healthy = timed_hits(&app, 200).await;

    redis.pause();
    // Requests wait out at most one command time-out (250 ms) each and are answered from the
    // origin; once the failures have lasted `redis.circuit_window_ms` the circuit opens.
    let mut waited = 0;
    while app.stats().await["backend"] != "memory" {
        assert_eq!(app.metrics("hot").await.status(), 200);
        waited += 1;
        assert!(waited < 50, "the circuit never opened");
    }
    let calls_when_open = app.state.store.tiered().redis_calls();
    let degraded = timed_hits(&app, 200).await;
    assert_eq!(
        app.state.store.tiered().redis_calls(),
        calls_when_open,
        "no request may touch redis while the circuit is open"
    );
    let (h, d) = (p99(healthy), p99(degraded));
    println!(
        "p99 of 200 sequential hits: redis healthy {h:?}, redis hung (circuit open) {d:?}, ratio {:.2}",
        d.as_secs_f64() / h.as_secs_f64()
    );

    redis.resume();
    wait_for(|| async { app.stats().await["backend"] == "redis" }).await;
    // A paused Redis kept its data: the entry is served from Redis again.
    let back = app.metrics("hot").await;
    assert_eq!(header(&back, "x-cache"), "HIT");
    assert!(!header(&back, "cache-status").contains("memory-fallback"));
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish() {
    let origin = TestOrigin::start().await;
    origin.set_delay(1_000);
    let port = free_port();
    let journal =
        std::env::temp_dir().join(format!("runcache-journal-{}.log", uuid::Uuid::new_v4()));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_runcache"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUNCACHE__SERVER__ADDR", format!("127.0.0.1:{port}"))
        .env("RUNCACHE__ORIGIN__BASE_URL", &origin.url)
        .env(
            "RUNCACHE__REDIS__URL",
            format!("redis://127.0.0.1:{}", free_port()),
        )
        .env("RUNCACHE__ADMIN__TOKEN", "t")
        .env("RUNCACHE__JOURNAL__PATH", journal.display().to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start runcache");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_for(|| async { client.get(format!("{base}/health")).send().await.is_ok() }).await;

    let slow = tokio::spawn({
        let client = client.clone();
        let url = format!("{base}/api/v1/models/train/1/metrics");
        async move { client.get(url).send().await }
    });
    wait_for(|| async { origin.total_calls() == 1 }).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());

    let resp = slow
        .await
        .expect("task")
        .expect("the in-flight request is answered");
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-cache"), "MISS");
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(exit.success(), "{exit:?}");
    assert!(
        client.get(format!("{base}/health")).send().await.is_err(),
        "no longer accepting"
    );
    let _ = std::fs::remove_file(&journal);
}

/// Two instances replay their journals to Redis at once. An event acknowledged by A while
/// Redis hung is journaled by A and, told directly, by B. When Redis answers again both
/// probes replay the same invalidation concurrently: applying it twice is harmless (it only
/// bumps counters and deletes), both close their circuits, and neither serves the entry
/// Redis still held from before the event.
#[tokio::test]
async fn two_instances_replaying_the_same_journal_at_once_serve_nothing_stale() {
    let redis = TestRedis::start().await;
    let (a, b) = crate::helpers::two_public_instances(&redis).await;
    let revision = |resp: reqwest::Response| async move {
        let x_cache = header(&resp, "x-cache").to_owned();
        let body: Value = resp.json().await.expect("json");
        (x_cache, body["revision"].as_u64())
    };
    assert_eq!(
        revision(a.metrics("r").await).await,
        ("MISS".into(), Some(0))
    );
    assert_eq!(revision(b.metrics("r").await).await.1, Some(0));
    // Both registered while Redis is up, so each knows whom to tell.
    tokio::time::sleep(Duration::from_secs(2)).await;

    redis.pause();
    a.origin.set_revision(1);
    let event = a.event("training-completed", json!("r")).await;
    assert_eq!(event.status(), 200);
    for app in [&a, &b] {
        wait_for(|| async { app.stats().await["pending_invalidations"].as_u64() >= Some(1) }).await;
    }
    redis.resume();
    for app in [&a, &b] {
        wait_for(|| async {
            let stats = app.stats().await;
            stats["backend"] == "redis" && stats["pending_invalidations"] == 0
        })
        .await;
    }
    for app in [&a, &b] {
        let (x_cache, rev) = revision(app.metrics("r").await).await;
        assert_eq!(rev, Some(1), "served the invalidated revision ({x_cache})");
    }
}

//! Keeping warm and fresh: warming (named runs, the origin's recent runs), refresh-ahead with
//! change detection (unchanged, changed, volatile fields, gone), and the metric names.

use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestRedis, header, spawn_app, spawn_app_with, wait_for};

/// Metrics live 2 s; an entry read twice is refreshed in the last half of its life, at once.
async fn refreshing_app(redis: &TestRedis, volatile: &[&str]) -> TestApp {
    refreshing_app_with(redis, volatile, |_| {}).await
}

async fn refreshing_app_with(
    redis: &TestRedis,
    volatile: &[&str],
    tweak: impl FnOnce(&mut runcache::config::Settings),
) -> TestApp {
    let volatile: Vec<String> = volatile.iter().map(|v| (*v).to_owned()).collect();
    spawn_app_with(Some(redis), move |s| {
        tweak(s);
        s.views.metrics.ttl = runcache::config::Ttl(Duration::from_secs(2));
        s.views.metrics.grace = 0;
        s.views.metrics.stale_if_error = 0;
        s.refresh.min_hits = 2;
        s.refresh.ahead_percent = 50;
        s.refresh.jitter_ms = 0;
        s.refresh.volatile_fields = volatile;
    })
    .await
}

async fn body(resp: reqwest::Response) -> Value {
    resp.json().await.expect("json")
}

async fn pttl(redis: &TestRedis, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut redis.conn().await)
        .await
        .expect("PTTL")
}

/// Reads run 1's metrics until its entry is in the refresh window, which triggers a refresh.
async fn read_into_refresh_window(app: &TestApp) {
    app.metrics("1").await;
    app.metrics("1").await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "HIT");
}

#[tokio::test]
async fn an_unchanged_refresh_extends_the_entry_without_rewriting_it() {
    let redis = TestRedis::start().await;
    // `fetch` changes on every origin call, like a generated_at timestamp.
    let app = refreshing_app(&redis, &["fetch"]).await;
    let key = format!("{}:v1:model:metrics:1", app.prefix);
    read_into_refresh_window(&app).await;
    wait_for(|| async { app.stats().await["stats"]["refresh_unchanged"] == 1 }).await;

    assert_eq!(
        app.origin.calls("/api/v1/models/train/1/metrics"),
        2,
        "one refresh"
    );
    let stats = app.stats().await;
    assert_eq!(stats["stats"]["sets"], 1, "the value was not written again");
    assert!(
        pttl(&redis, &key).await > 1_500,
        "the entry's life was extended"
    );
    let hit = app.metrics("1").await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    assert_eq!(
        body(hit).await["fetch"],
        1,
        "still the first body, byte for byte"
    );
    // Past the first store's TTL (2 s; it was stored before the 1.1 s wait), within the
    // extended one: still fresh, from the extension written in the value itself.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let hit = app.metrics("1").await;
    assert_eq!(
        header(&hit, "x-cache"),
        "HIT",
        "the extension made it fresh again"
    );
    assert_eq!(body(hit).await["fetch"], 1);
}

#[tokio::test]
async fn without_volatile_fields_the_same_change_counts_as_changed() {
    let redis = TestRedis::start().await;
    let app = refreshing_app(&redis, &[]).await;
    read_into_refresh_window(&app).await;
    wait_for(|| async { app.stats().await["stats"]["refresh_changed"] == 1 }).await;
    assert_eq!(
        body(app.metrics("1").await).await["fetch"],
        2,
        "the new body is served"
    );
}

#[tokio::test]
async fn a_changed_refresh_stores_the_new_body_and_drops_the_runs_comparisons() {
    let redis = TestRedis::start().await;
    let app = refreshing_app(&redis, &["fetch"]).await;
    app.compare(json!(["1", "2"])).await;
    app.compare(json!(["2", "3"])).await;
    app.origin.control.revision.store(0, Ordering::SeqCst);
    app.metrics("1").await;
    app.metrics("1").await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // The run was retrained, and nobody fired an event.
    app.origin.control.revision.store(1, Ordering::SeqCst);
    app.metrics("1").await;
    wait_for(|| async { app.stats().await["stats"]["refresh_changed"] == 1 }).await;

    let fresh = app.metrics("1").await;
    assert_eq!(header(&fresh, "x-cache"), "HIT");
    assert_eq!(body(fresh).await["revision"], 1);
    assert_eq!(
        header(&app.compare(json!(["2", "1"])).await, "x-cache"),
        "MISS",
        "dependent comparison dropped"
    );
    assert_eq!(
        header(&app.compare(json!(["3", "2"])).await, "x-cache"),
        "HIT",
        "unrelated comparison kept"
    );
}

#[tokio::test]
async fn a_refresh_that_finds_the_run_gone_removes_its_entries() {
    let redis = TestRedis::start().await;
    // Public views: a 404 means the run is gone. (With access control it only says the origin
    // hides the run from the credential that refreshed: regressions.rs covers that.)
    let app = refreshing_app_with(&redis, &["fetch"], |s| s.auth.frontend = "none".into()).await;
    app.compare(json!(["1", "2"])).await;
    app.metrics("1").await;
    app.metrics("1").await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    app.origin.set_fail(404);
    app.metrics("1").await;
    wait_for(|| async { app.stats().await["stats"]["refresh_gone"] == 1 }).await;
    app.origin.set_fail(0);
    assert_eq!(
        header(&app.compare(json!(["1", "2"])).await, "x-cache"),
        "MISS"
    );
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "MISS");
}

#[tokio::test]
async fn a_failing_refresh_keeps_the_entry_and_backs_off() {
    let redis = TestRedis::start().await;
    let app = refreshing_app(&redis, &["fetch"]).await;
    app.metrics("1").await;
    app.metrics("1").await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    app.origin.set_fail(500);
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "HIT");
    wait_for(|| async { app.stats().await["stats"]["refresh_errors"].as_u64() >= Some(1) }).await;
    for _ in 0..5 {
        assert_eq!(
            header(&app.metrics("1").await, "x-cache"),
            "HIT",
            "still servable"
        );
    }
    let calls = app.origin.calls("/api/v1/models/train/1/metrics");
    assert!(
        calls <= 3,
        "backing off, not hammering the origin: {calls} calls"
    );
}

#[tokio::test]
async fn warming_at_start_covers_named_and_recent_runs() {
    let redis = TestRedis::start().await;
    let origin = crate::helpers::TestOrigin::start().await;
    origin.control.list_runs.store(true, Ordering::SeqCst);
    let mut settings = crate::helpers::test_settings(&origin.url, &redis.url());
    settings.warm.model_run_ids = vec!["named".into()];
    settings.warm.recent_runs = 2;
    let app = crate::helpers::spawn_with_settings(settings, origin).await;
    wait_for(|| async { app.stats().await["stats"]["warmed"] == 6 }).await;
    for id in ["named", "r1", "r2"] {
        assert_eq!(header(&app.metrics(id).await, "x-cache"), "HIT", "{id}");
    }
    assert_eq!(app.origin.calls("/api/v1/models/train/r3/metrics"), 0);
}

#[tokio::test]
async fn warming_carries_on_when_the_origin_cannot_list_runs() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| {
        s.warm.model_run_ids = vec!["5".into()];
        s.warm.recent_runs = 10;
    })
    .await;
    wait_for(|| async { app.stats().await["stats"]["warmed"] == 2 }).await;
    let warm: Value = app
        .admin(
            Method::POST,
            "/cache/warm",
            Some(json!({"model_run_ids": ["5", "missing"]})),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(warm["skipped"], 2);
    assert_eq!(app.stats().await["stats"]["warm_errors"], 2);
}

#[tokio::test]
async fn metrics_exposes_every_documented_family() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.metrics("1").await;
    app.metrics("1").await;
    app.event("training-completed", json!("1")).await;
    let text = app.get("/metrics").await.text().await.expect("text");
    for name in [
        "runcache_view_requests_total",
        "runcache_view_request_duration_seconds_bucket{view=\"metrics\",result=\"hit\"",
        "runcache_origin_requests_total",
        "runcache_origin_request_duration_seconds_bucket",
        "runcache_store_operations_total{tier=\"redis\"}",
        "runcache_store_errors_total",
        "runcache_memory_removals_total",
        "runcache_invalidations_total{cause=\"event\"}",
        "runcache_entries_deleted_total",
        "runcache_coalesced_total",
        "runcache_refreshes_total",
        "runcache_warmed_total",
        "runcache_cache_sets_total",
        "runcache_cache_fallback_total",
        "runcache_circuit_open",
        "runcache_redis_up",
        "runcache_memory_entries",
        "runcache_memory_bytes",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    for help in [
        "# HELP runcache_refreshes_total",
        "# HELP runcache_circuit_open",
    ] {
        assert!(text.contains(help), "{help}");
    }
}

//! Operations routes, the OpenAPI document and its checked-in copy, and start-up errors.

use std::sync::atomic::Ordering;

use serde_json::Value;

use crate::helpers::{TestRedis, header, spawn_app};

#[tokio::test]
async fn health_and_ready_report_the_store_and_dependencies() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    let health = app.get("/health").await;
    assert_eq!(health.status(), 200);
    assert_eq!(health.json::<Value>().await.expect("json")["status"], "ok");

    let ready = app.get("/ready").await;
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["store"], "redis");
    assert_eq!(body["redis"]["reachable"], true);
    assert_eq!(body["origin"]["reachable"], true);
}

/// `/ready` answers from the background probe: a load balancer polling it sends nothing to
/// the origin (nor to Redis, probed by the same code).
#[tokio::test]
async fn ready_answers_from_the_last_background_probe() {
    let redis = TestRedis::start().await;
    let app = crate::helpers::spawn_app_with(Some(&redis), |s| {
        s.server.ready_probe_interval_ms = 3_600_000;
    })
    .await;
    let health = || app.origin.control.health_calls.load(Ordering::SeqCst);
    // The start-up probe (the next one is an hour away).
    crate::helpers::wait_for(|| async { health() >= 1 }).await;
    let before = health();
    for _ in 0..50 {
        let ready = app.get("/ready").await;
        assert_eq!(ready.status(), 200);
        let body: Value = ready.json().await.expect("json");
        assert_eq!(body["redis"]["reachable"], true);
        assert_eq!(body["origin"]["reachable"], true);
        assert!(body["origin"]["checked_ms_ago"].is_u64(), "{body}");
    }
    assert_eq!(health(), before, "/ready called the origin itself");
}

#[tokio::test]
async fn ready_stays_200_when_redis_and_origin_are_down() {
    let app = crate::helpers::spawn_app_with(None, |s| {
        s.origin.base_url = format!("http://127.0.0.1:{}", crate::helpers::free_port());
    })
    .await;
    let ready = app.get("/ready").await;
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.expect("json");
    assert_eq!(body["store"], "memory");
    assert_eq!(body["redis"]["reachable"], false);
    assert_eq!(body["origin"]["reachable"], false);
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_view_counters() {
    let app = spawn_app(None).await;
    app.metrics("1").await;
    app.metrics("1").await;
    let resp = app.get("/metrics").await;
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, "content-type").starts_with("text/plain"));
    let text = resp.text().await.expect("text");
    for name in [
        "runcache_view_requests_total{view=\"metrics\",result=\"hit\"}",
        "runcache_view_request_duration_seconds_bucket",
        "runcache_origin_requests_total",
        "runcache_redis_up",
        "# HELP runcache_view_requests_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test]
async fn openapi_json_and_docs_are_served() {
    let app = spawn_app(None).await;
    let doc: Value = app.get("/openapi.json").await.json().await.expect("json");
    for path in [
        "/api/v1/models/train/{model_run_id}/metrics",
        "/api/v1/models/train/{model_run_id}/feature-importance",
        "/api/v1/models/compare",
        "/api/v1/models/train/{model_run_id}",
        "/cache/stats",
        "/cache/clear",
        "/cache/invalidate",
        "/cache/warm",
        "/cache/version",
        "/api/v1/models/cache/stats",
        "/api/v1/models/cache/clear",
        "/events/training-completed",
        "/events/training-failed",
        "/events/model-deleted",
        "/health",
        "/ready",
        "/metrics",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from openapi"
        );
    }
    let docs = app.get("/docs/").await;
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.expect("html").contains("swagger"));
}

#[test]
fn openapi_yaml_is_generated_from_the_code() {
    let generated = runcache::http::openapi_yaml();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
    if std::env::var("UPDATE_OPENAPI").is_ok() {
        std::fs::write(path, &generated).expect("write openapi.yaml");
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi.yaml is out of date: run `UPDATE_OPENAPI=1 cargo test --test api openapi` and commit it"
    );
}

#[test]
fn a_bad_setting_stops_the_start_with_one_line_naming_it() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runcache"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUNCACHE__VIEWS__METRICS__TTL", "FOREVER")
        .output()
        .expect("run binary");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("views.metrics.ttl") && stderr.contains("FOREVER"),
        "{stderr}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runcache"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUNCACHE__SERVER__TYPO", "1")
        .output()
        .expect("run binary");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("typo"), "{stderr}");
}

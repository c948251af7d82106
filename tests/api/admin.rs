//! Admin routes: auth, stats, pattern clears (scope!), invalidation, warming, version switch.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TOKEN, TestRedis, assert_error, header, spawn_app, spawn_app_with, wait_for};

#[tokio::test]
async fn admin_routes_refuse_missing_and_wrong_tokens() {
    let app = spawn_app(None).await;
    for (method, path) in [
        (Method::GET, "/cache/stats"),
        (Method::GET, "/api/v1/models/cache/stats"),
        (Method::DELETE, "/cache/clear"),
        (Method::DELETE, "/api/v1/models/cache/clear"),
        (Method::POST, "/cache/invalidate"),
        (Method::POST, "/cache/warm"),
        (Method::POST, "/cache/version"),
    ] {
        let none = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .expect("request");
        assert_error(none, 401, "unauthorized").await;
        let wrong = app
            .client
            .request(method.clone(), app.url(path))
            .bearer_auth(format!("{TOKEN}x"))
            .send()
            .await
            .expect("request");
        assert_error(wrong, 401, "unauthorized").await;
    }
}

#[tokio::test]
async fn stats_count_requests_per_view_and_report_redis() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.metrics("1").await;
    app.metrics("1").await;
    app.get("/api/v1/models/train/1/metrics?use_cache=false")
        .await;
    app.compare(json!(["1", "2"])).await;

    let s = app.stats().await;
    assert_eq!(s["available"], true);
    assert_eq!(s["backend"], "redis");
    assert_eq!(s["version"], "v1");
    let st = &s["stats"];
    assert_eq!(st["hits"], 1);
    assert_eq!(st["misses"], 2);
    assert_eq!(st["bypasses"], 1);
    assert_eq!(st["total_requests"], 4);
    assert_eq!(st["origin_fetches"], 3);
    assert_eq!(st["sets"], 2);
    assert_eq!(st["keys"], 2);
    assert_eq!(st["hit_rate_percent"], 33.33);
    for field in [
        "stale_served",
        "deletes",
        "invalidations",
        "origin_errors",
        "coalesced",
        "avg_latency_ms",
        "p50_latency_ms",
        "p95_latency_ms",
        "p99_latency_ms",
        "time_saved_ms_estimate",
    ] {
        assert!(st[field].is_number(), "stats.{field}");
    }
    assert_eq!(s["views"]["metrics"]["hits"], 1);
    assert_eq!(s["views"]["comparison"]["misses"], 1);
    assert_eq!(s["views"]["feature_importance"]["hits"], 0);
    for field in [
        "used_memory",
        "keyspace_hits",
        "keyspace_misses",
        "evicted_keys",
    ] {
        assert!(s["redis"][field].is_number(), "redis.{field}");
    }
    assert!(s["memory"]["entries"].is_number() && s["memory"]["bytes"].is_number());
    assert_eq!(s["config"]["ttl_very_short"], 300);
    assert_eq!(s["config"]["ttl_week"], 604_800);
    assert!(s["message"].is_string());

    let alias: Value = app
        .admin(Method::GET, "/api/v1/models/cache/stats", None)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(alias["stats"]["hits"], 1);
}

#[tokio::test]
async fn the_key_count_is_pending_until_a_scan_has_finished() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.metrics("1").await;
    // Redis hangs before any count: the figure says it is not known, not that there are none.
    redis.pause();
    let s = app.stats().await;
    redis.resume();
    assert_eq!(s["backend"], "redis", "admin calls never open the circuit");
    assert_eq!(s["stats"]["keys_method"], "pending");
    assert_eq!(s["stats"]["keys"], 0);
    let s = app.stats().await;
    assert_eq!(s["stats"]["keys_method"], "scan");
    assert_eq!(s["stats"]["keys"], 1);
}

#[tokio::test]
async fn clear_by_glob_counts_and_never_touches_other_keys() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    let mut conn = redis.conn().await;
    // Another application, and another runcache deployment, share this Redis.
    let _: () = redis::cmd("SET")
        .arg("other-app:model:metrics:1")
        .arg("x")
        .query_async(&mut conn)
        .await
        .expect("set");
    let _: () = redis::cmd("SET")
        .arg(format!("{}x:v1:model:metrics:1", app.prefix))
        .arg("x")
        .query_async(&mut conn)
        .await
        .expect("set");
    app.metrics("1").await;
    app.metrics("2").await;
    app.get("/api/v1/models/train/1/feature-importance").await;
    app.compare(json!(["1", "2"])).await;

    // A dry run counts what a clear would delete, and deletes nothing.
    let resp = app
        .admin(
            Method::DELETE,
            "/cache/clear?pattern=model:metrics:*&dry_run=true",
            None,
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body = resp.json::<Value>().await.expect("json");
    assert_eq!(body["deleted_count"], 2, "{body}");
    assert_eq!(body["pattern"], "model:metrics:*");
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "HIT");

    let resp = app
        .admin(Method::DELETE, "/cache/clear?pattern=model:metrics:*", None)
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"message": "Cleared 2 cache entries matching pattern: model:metrics:*", "deleted_count": 2, "pattern": "model:metrics:*"})
    );
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "MISS");

    let all = app
        .admin(Method::DELETE, "/api/v1/models/cache/clear?pattern=*", None)
        .await;
    assert_eq!(all.json::<Value>().await.expect("json")["deleted_count"], 3);
    app.metrics("3").await;
    let none_given = app.admin(Method::DELETE, "/cache/clear", None).await;
    let body: Value = none_given.json().await.expect("json");
    assert_eq!(body["deleted_count"], 1);
    assert_eq!(body["pattern"], "*");

    assert_eq!(
        redis.keys("other-app:*").await.len(),
        1,
        "another app's key survived"
    );
    assert_eq!(
        redis.keys(&format!("{}x:*", app.prefix)).await.len(),
        1,
        "another prefix survived"
    );

    for bad in ["model:[ab]*", "a\\*", "a%20b"] {
        let resp = app
            .admin(Method::DELETE, &format!("/cache/clear?pattern={bad}"), None)
            .await;
        assert_error(resp, 400, "invalid_argument").await;
    }
}

#[tokio::test]
async fn invalidate_by_run_namespace_or_keys() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.metrics("1").await;
    app.metrics("2").await;
    app.get("/api/v1/models/train/2/feature-importance").await;
    app.compare(json!(["1", "3"])).await;

    let by_run = app
        .admin(
            Method::POST,
            "/cache/invalidate",
            Some(json!({"model_run_id": 1})),
        )
        .await;
    assert_eq!(
        by_run.json::<Value>().await.expect("json"),
        json!({"invalidated": 2})
    );
    let by_ns = app
        .admin(
            Method::POST,
            "/cache/invalidate",
            Some(json!({"namespace": "feature_importance"})),
        )
        .await;
    assert_eq!(
        by_ns.json::<Value>().await.expect("json"),
        json!({"invalidated": 1})
    );
    let by_keys = app
        .admin(
            Method::POST,
            "/cache/invalidate",
            Some(json!({"keys": ["model:metrics:2", "model:metrics:404"]})),
        )
        .await;
    assert_eq!(
        by_keys.json::<Value>().await.expect("json"),
        json!({"invalidated": 1})
    );
    assert!(redis.keys(&format!("{}:v1:*", app.prefix)).await.is_empty());

    for body in [
        json!({}),
        json!({"model_run_id": "1", "namespace": "metrics"}),
        json!({"namespace": "everything"}),
        json!({"keys": []}),
        json!({"keys": ["model:*"]}),
        json!({"model_run_id": "../x"}),
        json!({"unknown": 1}),
        // The schema's fields are never null (schemathesis --checks all found this one
        // accepted).
        json!({"keys": ["model:metrics:1"], "namespace": null}),
        json!({"model_run_id": null, "namespace": "metrics"}),
        json!({"model_run_id": 1060.5}),
        json!({"model_run_id": -1.0}),
        json!({"model_run_id": 9_007_199_254_740_992_u64}),
        json!({"model_run_id": 8.245_713_320_181_86e25}),
    ] {
        let resp = app
            .admin(Method::POST, "/cache/invalidate", Some(body.clone()))
            .await;
        assert_error(resp, 400, "invalid_argument").await;
    }
}

/// `1060.0` is a JSON Schema integer, so it is the run `1060` (schemathesis --checks all
/// found it refused).
#[tokio::test]
async fn an_integral_number_with_a_fraction_is_that_run() {
    let app = spawn_app(None).await;
    let resp = app
        .admin(
            Method::POST,
            "/cache/invalidate",
            Some(json!({"model_run_id": 1060.0})),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let compared = app.compare(json!([41.0, "42"])).await;
    assert_eq!(compared.status(), 200);
    assert_eq!(header(&compared, "x-cache"), "MISS");
    let again = app.compare(json!(["41", 42])).await;
    assert_eq!(header(&again, "x-cache"), "HIT", "41.0 and 41 are one id");
}

#[tokio::test]
async fn warm_fetches_what_is_missing_and_skips_the_rest() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.metrics("1").await;

    let resp = app
        .admin(
            Method::POST,
            "/cache/warm",
            Some(json!({"model_run_ids": ["1", 2]})),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let report: Value = resp.json().await.expect("json");
    assert_eq!(report["warmed"], 3);
    assert_eq!(report["skipped"], 1);
    assert_eq!(report["failed"], json!([]));
    assert_eq!(app.origin.calls("/api/v1/models/train/1/metrics"), 1);
    assert!(
        !app.origin.last_headers().contains_key("authorization"),
        "warming is anonymous"
    );
    assert_eq!(header(&app.metrics("2").await, "x-cache"), "HIT");

    let again: Value = app
        .admin(
            Method::POST,
            "/cache/warm",
            Some(json!({"model_run_ids": ["1", "2", "missing"]})),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(again["warmed"], 0);
    assert_eq!(again["skipped"], 4);
    assert_eq!(again["failed"].as_array().map(Vec::len), Some(2));

    for body in [
        json!({"model_run_ids": []}),
        json!({"model_run_ids": [".."]}),
        json!({}),
    ] {
        assert_error(
            app.admin(Method::POST, "/cache/warm", Some(body)).await,
            400,
            "invalid_argument",
        )
        .await;
    }
}

#[tokio::test]
async fn warm_at_start_fills_the_configured_runs() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| s.warm.model_run_ids = vec!["5".into()]).await;
    wait_for(|| async { app.origin.total_calls() >= 2 }).await;
    wait_for(|| async { header(&app.metrics("5").await, "x-cache") == "HIT" }).await;
}

#[tokio::test]
async fn version_switch_reaches_every_instance_and_never_revives_old_entries() {
    let redis = TestRedis::start().await;
    // Public views: the point here is the shared version, not per-instance validation.
    let public = |s: &mut runcache::config::Settings| s.auth.frontend = "none".into();
    let a = spawn_app_with(Some(&redis), public).await;
    let prefix = a.prefix.clone();
    let b = spawn_app_with(Some(&redis), |s| {
        public(s);
        s.cache.prefix = prefix.clone();
    })
    .await;
    a.metrics("1").await;
    assert_eq!(
        header(&b.metrics("1").await, "x-cache"),
        "HIT",
        "instances share entries"
    );

    let resp = a
        .admin(
            Method::POST,
            "/cache/version",
            Some(json!({"version": "v2"})),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["version"], "v2");
    assert_eq!(body["previous"], "v1");
    let stored: String = redis::cmd("GET")
        .arg(format!("{prefix}:_meta:version"))
        .query_async(&mut redis.conn().await)
        .await
        .expect("get");
    assert_eq!(stored, "v2");

    assert_eq!(header(&a.metrics("1").await, "x-cache"), "MISS");
    wait_for(|| async { b.stats().await["version"] == "v2" }).await;
    assert_eq!(
        header(&b.metrics("1").await, "x-cache"),
        "HIT",
        "b reads a's v2 entry"
    );

    // Back to v1: the v1 entry stored earlier must not come back.
    let _ = a
        .admin(
            Method::POST,
            "/cache/version",
            Some(json!({"version": "v1"})),
        )
        .await;
    assert_eq!(header(&a.metrics("1").await, "x-cache"), "MISS");

    for bad in [
        json!({"version": ""}),
        json!({"version": "_meta"}),
        json!({"version": "v 2"}),
        json!({"v": "x"}),
    ] {
        assert_error(
            a.admin(Method::POST, "/cache/version", Some(bad)).await,
            400,
            "invalid_argument",
        )
        .await;
    }
}

#[tokio::test]
async fn version_switch_needs_redis() {
    let app = spawn_app(None).await;
    let resp = app
        .admin(
            Method::POST,
            "/cache/version",
            Some(json!({"version": "v2"})),
        )
        .await;
    assert_error(resp, 503, "unavailable").await;
}

//! The three cached views and the DELETE pass-through, against a real Redis and origin.

use std::io::Read;

use serde_json::{Value, json};

use crate::helpers::{TestRedis, assert_error, header, spawn_app, spawn_app_with};

/// The `ttl=` parameter of a `Cache-Status` hit.
fn ttl_of(cache_status: &str) -> u64 {
    cache_status
        .split(';')
        .find_map(|p| p.trim().strip_prefix("ttl="))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no ttl in {cache_status:?}"))
}

#[tokio::test]
async fn metrics_miss_then_hit_calls_the_origin_once_and_returns_its_bytes() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;

    let first = app.metrics("42").await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-cache"), "MISS");
    assert_eq!(header(&first, "cache-status"), "runcache; fwd=miss; stored");
    assert_eq!(
        header(&first, "content-type"),
        "application/json; charset=utf-8"
    );
    let etag = header(&first, "etag").to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let first_body = first.bytes().await.expect("body");

    let second = app.metrics("42").await;
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "x-cache"), "HIT");
    let status = header(&second, "cache-status").to_owned();
    assert!(status.starts_with("runcache; hit; ttl="), "{status}");
    let ttl = ttl_of(&status);
    assert!(ttl > 3500 && ttl <= 3600, "{ttl}");
    assert!(header(&second, "age").parse::<u64>().is_ok());
    assert_eq!(header(&second, "etag"), etag);
    assert_eq!(
        header(&second, "content-type"),
        "application/json; charset=utf-8"
    );
    assert!(!header(&second, "x-request-id").is_empty());
    assert_eq!(
        second.bytes().await.expect("body"),
        first_body,
        "byte for byte"
    );

    assert_eq!(app.origin.calls("/api/v1/models/train/42/metrics"), 1);
    let keys = redis.keys(&format!("{}:v1:*", app.prefix)).await;
    assert_eq!(keys, [format!("{}:v1:model:metrics:42", app.prefix)]);
}

#[tokio::test]
async fn use_cache_false_neither_reads_nor_writes() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    let path = "/api/v1/models/train/7/metrics";

    let bypass = app.get(&format!("{path}?use_cache=false")).await;
    assert_eq!(header(&bypass, "x-cache"), "BYPASS");
    assert_eq!(header(&bypass, "cache-status"), "runcache; fwd=bypass");
    assert!(
        redis.keys(&format!("{}:v1:*", app.prefix)).await.is_empty(),
        "bypass wrote"
    );

    assert_eq!(header(&app.get(path).await, "x-cache"), "MISS");
    let again = app.get(&format!("{path}?use_cache=false")).await;
    assert_eq!(header(&again, "x-cache"), "BYPASS");
    let body: Value = again.json().await.expect("json");
    assert_eq!(
        body["fetch"], 3,
        "bypass must read the origin, not the cache"
    );
    assert_eq!(header(&app.get(path).await, "x-cache"), "HIT");
    assert_eq!(app.origin.calls(path), 3);
}

#[tokio::test]
async fn feature_importance_variants_are_cached_separately() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    let base = "/api/v1/models/train/5/feature-importance";

    for path in [
        base.to_owned(),
        format!("{base}?top_n=10"),
        format!("{base}?top_n=3"),
    ] {
        assert_eq!(header(&app.get(&path).await, "x-cache"), "MISS", "{path}");
        assert_eq!(header(&app.get(&path).await, "x-cache"), "HIT", "{path}");
    }
    let body: Value = app
        .get(&format!("{base}?top_n=10"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["top_n"], "10", "top_n reaches the origin");
    assert_eq!(app.origin.calls(base), 3);
    let keys = redis.keys(&format!("{}:v1:*", app.prefix)).await;
    let p = &app.prefix;
    assert_eq!(
        keys,
        [
            format!("{p}:v1:model:feature_importance:5"),
            format!("{p}:v1:model:feature_importance:5:top_10"),
            format!("{p}:v1:model:feature_importance:5:top_3"),
        ]
    );
}

#[tokio::test]
async fn comparisons_ignore_order_duplicates_and_number_form() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;

    let first = app.compare(json!(["b", 2, "10"])).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-cache"), "MISS");
    assert_eq!(
        app.origin.last_body(),
        Some(json!({"model_run_ids": ["10", "2", "b"]}))
    );

    let second = app.compare(json!(["10", "b", "2", 2, "b"])).await;
    assert_eq!(header(&second, "x-cache"), "HIT");
    assert_eq!(app.origin.calls("/api/v1/models/compare"), 1);
    let keys = redis
        .keys(&format!("{}:v1:model:comparison:*", app.prefix))
        .await;
    assert_eq!(keys.len(), 1);
    assert_eq!(
        keys[0].rsplit(':').next().map(str::len),
        Some(64),
        "sha-256 hex"
    );
}

#[tokio::test]
async fn invalid_input_is_a_json_400_and_never_reaches_the_origin() {
    let app = spawn_app(None).await;
    let long = "a".repeat(129);
    for path in [
        "/api/v1/models/train/../metrics".to_owned(),
        "/api/v1/models/train/.hidden/metrics".to_owned(),
        "/api/v1/models/train/a%20b/metrics".to_owned(),
        "/api/v1/models/train/a%2Fb/metrics".to_owned(),
        format!("/api/v1/models/train/{long}/metrics"),
        "/api/v1/models/train/1/metrics?use_cache=maybe".to_owned(),
        "/api/v1/models/train/1/metrics?unknown=1".to_owned(),
        "/api/v1/models/train/1/feature-importance?top_n=0".to_owned(),
        "/api/v1/models/train/1/feature-importance?top_n=1001".to_owned(),
        "/api/v1/models/train/1/feature-importance?top_n=ten".to_owned(),
    ] {
        let resp = app.get(&path).await;
        let status = resp.status().as_u16();
        // `..` may be normalised away by the client into another (unknown) route.
        if status == 404 {
            assert_error(resp, 404, "not_found").await;
        } else {
            assert_error(resp, 400, "invalid_argument").await;
        }
    }
    let msg = assert_error(
        app.get("/api/v1/models/train/1/feature-importance?top_n=0")
            .await,
        400,
        "invalid_argument",
    )
    .await;
    assert_eq!(msg, "top_n must be between 1 and 1000");

    let too_many: Vec<Value> = (0..51).map(|i| json!(i)).collect();
    for ids in [
        json!(["1"]),
        json!(["1", 1]),
        json!(too_many),
        json!(["1", -2]),
        json!(["1", 2.5]),
        json!(["1", null]),
        json!(["1", ".."]),
    ] {
        assert_error(app.compare(ids).await, 400, "invalid_argument").await;
    }
    for body in [
        "{",
        "[]",
        r#"{"model_run_ids": ["1","2"], "extra": true}"#,
        r#"{"ids": ["1","2"]}"#,
    ] {
        let resp = app
            .client
            .post(app.url("/api/v1/models/compare"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        assert_error(resp, 400, "invalid_argument").await;
    }
    assert_eq!(app.origin.total_calls(), 0);
}

#[tokio::test]
async fn matching_if_none_match_gets_304_without_body() {
    let app = spawn_app(None).await;
    let etag = header(&app.metrics("9").await, "etag").to_owned();
    // The 304 names the validator in the form the client holds: the weak one is what a client
    // that took a compressed body was given.
    let weak = format!("W/{etag}");
    for (inm, encoding, expected) in [
        (etag.clone(), "identity", &etag),
        (weak.clone(), "identity", &weak),
        (weak.clone(), "gzip", &weak),
        (format!("\"other\", {etag}"), "identity", &etag),
    ] {
        let resp = app
            .client
            .get(app.url("/api/v1/models/train/9/metrics"))
            .header("if-none-match", inm)
            .header("accept-encoding", encoding)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 304);
        assert_eq!(header(&resp, "etag"), expected.as_str());
        assert_eq!(header(&resp, "x-cache"), "HIT");
        assert!(resp.bytes().await.expect("body").is_empty());
    }
    let resp = app
        .client
        .get(app.url("/api/v1/models/train/9/metrics"))
        .header("if-none-match", "\"stale\"")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn compressed_bodies_carry_a_weak_etag_and_vary() {
    let app = spawn_app(None).await;
    let plain = app.metrics("3").await;
    let strong = header(&plain, "etag").to_owned();
    let plain_body = plain.bytes().await.expect("body");

    let resp = app
        .client
        .get(app.url("/api/v1/models/train/3/metrics"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("request");
    assert_eq!(header(&resp, "content-encoding"), "gzip");
    assert_eq!(header(&resp, "etag"), format!("W/{strong}"));
    assert!(
        header(&resp, "vary")
            .to_ascii_lowercase()
            .contains("accept-encoding")
    );
    let gz = resp.bytes().await.expect("body");
    let mut decoded = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut decoded)
        .expect("gunzip");
    assert_eq!(decoded, plain_body);

    let resp = app
        .client
        .get(app.url("/api/v1/models/train/3/metrics"))
        .header("accept-encoding", "br")
        .header("if-none-match", strong)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 304);
}

#[tokio::test]
async fn a_large_hit_is_gzipped_from_a_copy_made_once() {
    let app = spawn_app(None).await;
    let ids: Vec<String> = (0..50)
        .map(|i| format!("run-with-a-long-name-{i:03}"))
        .collect();
    let plain = app.compare(json!(ids)).await;
    let strong = header(&plain, "etag").to_owned();
    let plain_body = plain.bytes().await.expect("body");
    assert!(plain_body.len() >= 1024, "{} bytes", plain_body.len());
    assert!(app.state.precompressed.is_empty());
    for round in 0..3 {
        let resp = app
            .client
            .post(app.url("/api/v1/models/compare"))
            .header("accept-encoding", "gzip, br")
            .json(&json!({ "model_run_ids": ids }))
            .send()
            .await
            .expect("request");
        assert_eq!(header(&resp, "x-cache"), "HIT");
        assert_eq!(header(&resp, "content-encoding"), "gzip");
        assert_eq!(header(&resp, "etag"), format!("W/{strong}"));
        let gz = resp.bytes().await.expect("body");
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut decoded)
            .expect("gunzip");
        assert_eq!(decoded, plain_body, "round {round}");
        // One copy, made by the first of them and used by the others.
        assert_eq!(app.state.precompressed.len(), 1);
    }
}

#[tokio::test]
async fn origin_4xx_pass_through_unchanged_and_are_not_cached() {
    let app = spawn_app(None).await;
    for _ in 0..2 {
        let resp = app.metrics("missing").await;
        assert_eq!(resp.status(), 404);
        assert_eq!(header(&resp, "x-cache"), "MISS");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body, json!({"detail": "Model run missing not found"}));
    }
    assert_eq!(app.origin.calls("/api/v1/models/train/missing/metrics"), 2);

    let resp = app.metrics("forbidden").await;
    assert_eq!(resp.status(), 403);
    assert_eq!(header(&resp, "content-type"), "text/plain");
    assert_eq!(resp.text().await.expect("text"), "nope");
}

#[tokio::test]
async fn origin_404_is_cached_briefly_when_configured() {
    let app = spawn_app_with(None, |s| {
        s.cache.not_found_ttl = 30;
        s.auth.frontend = "none".into();
    })
    .await;
    assert_eq!(header(&app.metrics("missing").await, "x-cache"), "MISS");
    let again = app.metrics("missing").await;
    assert_eq!(again.status(), 404);
    assert_eq!(header(&again, "x-cache"), "HIT");
    assert_eq!(app.origin.calls("/api/v1/models/train/missing/metrics"), 1);

    // With access control only a 2xx accepts a credential: a 404 may be the origin hiding
    // the run from this caller, so the cached one goes to no one.
    let guarded = spawn_app_with(None, |s| s.cache.not_found_ttl = 30).await;
    for _ in 0..2 {
        let resp = guarded.metrics("missing").await;
        assert_eq!(
            (resp.status().as_u16(), header(&resp, "x-cache")),
            (404, "MISS")
        );
    }
}

#[tokio::test]
async fn origin_failures_become_502_and_504_without_internals() {
    let app = spawn_app_with(None, |s| s.origin.timeout_ms = 300).await;
    app.origin.set_fail(500);
    let msg = assert_error(app.metrics("1").await, 502, "origin_error").await;
    assert!(!msg.contains("10.1.2.3"), "{msg}");
    assert_error(
        app.get("/api/v1/models/train/1/metrics?use_cache=false")
            .await,
        502,
        "origin_error",
    )
    .await;

    app.origin.set_fail(0);
    app.origin.set_delay(2_000);
    assert_error(app.metrics("2").await, 504, "origin_timeout").await;
}

#[tokio::test]
async fn unreachable_origin_is_a_502() {
    let app = spawn_app_with(None, |s| {
        s.origin.base_url = format!("http://127.0.0.1:{}", crate::helpers::free_port());
    })
    .await;
    let msg = assert_error(app.metrics("1").await, 502, "origin_error").await;
    assert!(!msg.contains("127.0.0.1"), "{msg}");
}

#[tokio::test]
async fn origin_cache_control_is_respected() {
    let app = spawn_app(None).await;
    for cc in ["no-store", "private, max-age=600", "max-age=0"] {
        app.origin.set_cache_control(Some(cc));
        let id = format!("cc{}", cc.len());
        assert_eq!(header(&app.metrics(&id).await, "x-cache"), "MISS");
        let second = app.metrics(&id).await;
        assert_eq!(
            header(&second, "x-cache"),
            "MISS",
            "{cc} must not be stored"
        );
        assert!(header(&second, "cache-status").starts_with("runcache; fwd=miss; detail="));
    }
    app.origin.set_cache_control(Some("public, max-age=5"));
    app.metrics("short").await;
    let hit = app.metrics("short").await;
    let status = header(&hit, "cache-status");
    let ttl = ttl_of(status);
    assert!(ttl <= 5, "{status}");
}

#[tokio::test]
async fn listed_headers_are_forwarded_to_the_origin() {
    let app = spawn_app(None).await;
    app.client
        .get(app.url("/api/v1/models/train/1/metrics"))
        .header("authorization", "Bearer user-token")
        .header("accept-language", "fr")
        .header("x-request-id", "req-123")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .header("cookie", "session=secret")
        .send()
        .await
        .expect("request");
    let seen = app.origin.last_headers();
    assert_eq!(seen["authorization"], "Bearer user-token");
    assert_eq!(seen["accept-language"], "fr");
    assert_eq!(seen["x-request-id"], "req-123");
    assert!(seen.contains_key("traceparent"));
    assert!(!seen.contains_key("cookie"));
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = spawn_app(None).await;
    let echoed = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "abc-1")
        .send()
        .await
        .expect("request");
    assert_eq!(header(&echoed, "x-request-id"), "abc-1");
    for path in [
        "/health",
        "/no/such/route",
        "/api/v1/models/train/1/metrics",
    ] {
        assert!(
            !header(&app.get(path).await, "x-request-id").is_empty(),
            "{path}"
        );
    }
}

#[tokio::test]
async fn delete_is_passed_through_and_invalidates_the_run() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.metrics("8").await;
    app.get("/api/v1/models/train/8/feature-importance?top_n=2")
        .await;
    app.compare(json!(["8", "9"])).await;
    app.compare(json!(["1", "9"])).await;

    let resp = app
        .client
        .delete(app.url("/api/v1/models/train/8"))
        .header("authorization", "Bearer user")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-invalidated"), "3");
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"deleted": true, "model_run_id": "8"})
    );
    assert_eq!(app.origin.calls("DELETE /api/v1/models/train/8"), 1);
    assert_eq!(app.origin.last_headers()["authorization"], "Bearer user");

    assert_eq!(header(&app.metrics("8").await, "x-cache"), "MISS");
    assert_eq!(
        header(&app.compare(json!(["1", "9"])).await, "x-cache"),
        "HIT"
    );

    let missing = app
        .client
        .delete(app.url("/api/v1/models/train/missing"))
        .send()
        .await
        .expect("request");
    assert_eq!(missing.status(), 404);
    assert_error(
        app.client
            .delete(app.url("/api/v1/models/train/.x"))
            .send()
            .await
            .expect("request"),
        400,
        "invalid_argument",
    )
    .await;
}

#[tokio::test]
async fn unknown_routes_wrong_methods_and_big_bodies_get_json_errors() {
    let app = spawn_app(None).await;
    assert_error(app.get("/nope").await, 404, "not_found").await;
    let resp = app
        .client
        .put(app.url("/api/v1/models/train/1/metrics"))
        .send()
        .await
        .expect("request");
    assert_error(resp, 405, "method_not_allowed").await;
    let big = json!({ "model_run_ids": ["1", "2"], "pad": "x".repeat(70_000) });
    let resp = app
        .client
        .post(app.url("/api/v1/models/compare"))
        .json(&big)
        .send()
        .await
        .expect("request");
    assert_error(resp, 413, "payload_too_large").await;
    assert_eq!(app.origin.total_calls(), 0);
}

#[tokio::test]
async fn cors_preflight_is_answered_and_cache_headers_are_exposed() {
    let app = spawn_app_with(None, |s| {
        s.cors.allowed_origins = vec!["https://ui.example".into()]
    })
    .await;
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/api/v1/models/compare"))
        .header("origin", "https://ui.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .expect("request");
    assert!(preflight.status().is_success());
    assert_eq!(
        header(&preflight, "access-control-allow-origin"),
        "https://ui.example"
    );

    let resp = app
        .client
        .get(app.url("/api/v1/models/train/1/metrics"))
        .header("origin", "https://ui.example")
        .send()
        .await
        .expect("request");
    assert_eq!(
        header(&resp, "access-control-allow-origin"),
        "https://ui.example"
    );
    let exposed = header(&resp, "access-control-expose-headers").to_ascii_lowercase();
    for h in ["x-cache", "cache-status", "age", "etag", "x-request-id"] {
        assert!(exposed.contains(h), "{h} not in {exposed}");
    }
    let other = app
        .client
        .get(app.url("/health"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("request");
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn without_cors_settings_no_cors_headers_are_sent() {
    let app = spawn_app(None).await;
    let resp = app
        .client
        .get(app.url("/health"))
        .header("origin", "https://ui.example")
        .send()
        .await
        .expect("request");
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

//! Limits (431, 429, 503 + Retry-After, 504, oversized origin answers), audit lines, and
//! secrets that must never reach logs, `Debug` output or `/cache/stats`.

use reqwest::Method;
use serde_json::json;

use crate::helpers::{TestRedis, assert_error, header, logs, spawn_app, spawn_app_with};

#[tokio::test]
async fn too_many_or_too_large_headers_get_431() {
    let app = spawn_app(None).await;
    let mut req = app.client.get(app.url("/api/v1/models/train/1/metrics"));
    for i in 0..70 {
        req = req.header(format!("x-extra-{i}"), "1");
    }
    assert_error(req.send().await.expect("request"), 431, "headers_too_large").await;
    let big = app
        .client
        .get(app.url("/health"))
        .header("x-big", "y".repeat(20_000))
        .send()
        .await
        .expect("request");
    assert_error(big, 431, "headers_too_large").await;
    assert_eq!(app.origin.total_calls(), 0);
}

#[tokio::test]
async fn admin_routes_and_events_are_rate_limited_per_client() {
    let app = spawn_app_with(None, |s| {
        s.server.admin_rate_per_sec = 1;
        s.server.admin_burst = 2;
        s.server.event_rate_per_sec = 1;
        s.server.event_burst = 3;
    })
    .await;
    for _ in 0..2 {
        assert_eq!(
            app.admin(Method::GET, "/cache/stats", None).await.status(),
            200
        );
    }
    let limited = app.admin(Method::GET, "/cache/stats", None).await;
    assert!(
        header(&limited, "retry-after")
            .parse::<u64>()
            .is_ok_and(|s| s >= 1)
    );
    assert_error(limited, 429, "rate_limited").await;
    // Events draw from their own allowance: the admin one is used up, theirs is not.
    for run in 1..=3 {
        let event = app.event("training-completed", json!(run)).await;
        assert_eq!(event.status(), 200);
    }
    let event = app.event("training-completed", json!("4")).await;
    assert_error(event, 429, "rate_limited").await;
    assert_eq!(
        app.metrics("1").await.status(),
        200,
        "views are not rate-limited"
    );
}

#[tokio::test]
async fn past_the_concurrency_limit_requests_are_shed_with_503() {
    let app = spawn_app_with(None, |s| s.server.max_concurrent_requests = 1).await;
    app.origin.set_delay(500);
    let client = app.client.clone();
    let url = app.url("/api/v1/models/train/1/metrics");
    let slow = tokio::spawn(async move { client.get(url).send().await });
    crate::helpers::wait_for(|| async { app.origin.total_calls() == 1 }).await;

    let shed = app.metrics("2").await;
    assert_eq!(header(&shed, "retry-after"), "1");
    assert_error(shed, 503, "unavailable").await;
    assert_eq!(app.get("/health").await.status(), 200, "probes are exempt");
    assert_eq!(slow.await.expect("task").expect("response").status(), 200);
    assert_eq!(app.metrics("2").await.status(), 200, "capacity is back");
}

#[tokio::test]
async fn a_request_past_the_time_limit_gets_a_json_504() {
    let app = spawn_app_with(None, |s| s.server.request_timeout_ms = 200).await;
    app.origin.set_delay(1_000);
    assert_error(app.metrics("1").await, 504, "timeout").await;
}

#[tokio::test]
async fn oversized_origin_answers_are_passed_through_but_not_cached() {
    let app = spawn_app_with(None, |s| s.cache.max_entry_bytes = 100).await;
    for _ in 0..2 {
        let resp = app.metrics("1").await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            header(&resp, "cache-status"),
            "runcache; fwd=miss; detail=\"too-large, memory-fallback\""
        );
        assert!(resp.bytes().await.expect("body").len() > 100);
    }
    assert_eq!(app.origin.calls("/api/v1/models/train/1/metrics"), 2);

    let refused = spawn_app_with(None, |s| s.origin.max_response_bytes = 100).await;
    assert_error(refused.metrics("1").await, 502, "origin_error").await;
}

#[tokio::test]
async fn admin_actions_and_events_leave_audit_lines() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.metrics("audit-run").await;
    app.admin(
        Method::DELETE,
        "/cache/clear?pattern=model:metrics:audit*",
        None,
    )
    .await;
    app.admin(
        Method::POST,
        "/cache/invalidate",
        Some(json!({"model_run_id": "audit-run"})),
    )
    .await;
    app.admin(
        Method::POST,
        "/cache/warm",
        Some(json!({"model_run_ids": ["audit-run"]})),
    )
    .await;
    app.event("model-deleted", json!("audit-run")).await;
    app.admin(Method::DELETE, "/cache/clear", None).await;

    let token_id = app.state.admin_token_id.clone();
    let audit: Vec<String> = logs()
        .lines()
        .filter(|l| l.contains("\"target\":\"audit\"") && l.contains(&token_id))
        .map(str::to_owned)
        .collect();
    for action in ["clear", "invalidate", "warm", "model-deleted"] {
        assert!(
            audit.iter().any(|l| l.contains(&format!("\"action\":\"{action}\"")) && l.contains("127.0.0.1")),
            "no audit line for {action}"
        );
    }
    assert!(logs().contains("clear of every entry requested"));
}

#[tokio::test]
async fn secrets_never_reach_logs_debug_output_or_stats() {
    let token = "admin-tok-7f3a9c2e5b1d";
    let secret = "whsec-9d8c7b6a5f4e";
    let password = "redis-pw-1a2b3c4d";
    let redis_url = format!(
        "redis://:{password}@127.0.0.1:{}",
        crate::helpers::free_port()
    );
    let app = spawn_app_with(None, |s| {
        s.admin.token = Some(secrecy::SecretString::from(token));
        s.events.secret = Some(secrecy::SecretString::from(secret));
        s.redis.url = secrecy::SecretString::from(redis_url.clone());
    })
    .await;
    let ok = app
        .client
        .get(app.url("/cache/stats"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    let stats = ok.text().await.expect("stats");
    let wrong = app
        .client
        .get(app.url("/cache/stats"))
        .bearer_auth(format!("{token}x"))
        .send()
        .await
        .expect("request");
    let wrong_body = wrong.text().await.expect("body");
    let event = app
        .client
        .post(app.url("/events/training-completed"))
        .bearer_auth(token)
        .json(&json!({"model_run_id": "1"}))
        .send()
        .await
        .expect("request");
    assert_eq!(event.status(), 200);
    app.metrics("1").await;

    let debug = format!("{:?}", app.state.settings);
    let logged = logs();
    assert!(logged.contains("runcache listening"), "logs are captured");
    for (name, value) in [
        ("token", token),
        ("events secret", secret),
        ("redis password", password),
    ] {
        assert!(!logged.contains(value), "the {name} is in the logs");
        assert!(!debug.contains(value), "the {name} is in Debug output");
        assert!(!stats.contains(value), "the {name} is in /cache/stats");
        assert!(
            !wrong_body.contains(value),
            "the {name} is in an error body"
        );
    }
    assert!(
        logged.contains("redis://:***@127.0.0.1"),
        "the redacted URL is what gets logged"
    );
}

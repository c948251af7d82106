//! Write-through invalidation (`[invalidate.*]`, SPEC section 9), against a real Redis and the
//! test origin's `/api/v1/writes/` routes: a 2xx invalidates what the write names before its
//! answer is returned, a 4xx nothing, an unknown outcome as if it had succeeded.

use std::sync::atomic::Ordering;

use runcache::config::Settings;
use runcache::domain::WriteRuleSpec;
use runcache::domain::write_rule::OtherwiseSpec;
use serde_json::{Value, json};

use crate::helpers::*;

fn rule(method: &str, path: &str, tags: &[&str], otherwise_views: &[&str]) -> WriteRuleSpec {
    WriteRuleSpec {
        method: Some(method.into()),
        path: Some(path.into()),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        otherwise: OtherwiseSpec {
            tags: Vec::new(),
            views: otherwise_views.iter().map(|v| (*v).to_owned()).collect(),
        },
        ..WriteRuleSpec::default()
    }
}

/// The rules these tests use: a run named by the body, by the answer, and by the path.
fn with_rules(s: &mut Settings) {
    s.invalidate.insert(
        "log".into(),
        rule(
            "POST",
            "/api/v1/writes/log",
            &["run:{body.run_id}"],
            &["comparison"],
        ),
    );
    s.invalidate.insert(
        "create".into(),
        rule(
            "POST",
            "/api/v1/writes/create",
            &["run:{response.run_id}"],
            &["metrics"],
        ),
    );
    s.invalidate.insert(
        "artifact".into(),
        rule(
            "PUT",
            "/api/v1/writes/{run}/artifacts/*",
            &["run:{run}"],
            &[],
        ),
    );
    s.origin.timeout_ms = 500;
}

async fn x_cache(app: &TestApp, id: &str) -> String {
    header(&app.metrics(id).await, "x-cache").to_owned()
}

async fn write(app: &TestApp, path: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .header("authorization", "Bearer writer")
        .json(&body)
        .send()
        .await
        .expect("write")
}

#[tokio::test]
async fn a_2xx_write_invalidates_the_run_its_body_names_before_it_answers() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), with_rules).await;
    for id in ["8", "9"] {
        app.metrics(id).await;
        assert_eq!(x_cache(&app, id).await, "HIT");
    }
    app.compare(json!(["1", "2"])).await;

    let resp = write(
        &app,
        "/api/v1/writes/log",
        json!({"run_id": "8", "value": 1.5}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-origin-write"), "yes");
    assert_eq!(
        header(&resp, "cache-status"),
        "runcache; fwd=bypass; detail=pass"
    );
    assert_ne!(header(&resp, "x-invalidated"), "0");
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"ok": true, "run_id": "8", "experiment_id": "7"})
    );
    // The origin got the write as it was sent.
    assert_eq!(app.origin.calls("POST /api/v1/writes/log"), 1);
    assert_eq!(
        app.origin.last_body(),
        Some(json!({"run_id": "8", "value": 1.5}))
    );
    assert_eq!(app.origin.last_headers()["authorization"], "Bearer writer");

    // Precise: run 8 goes, run 9 and the comparison (its template named something) stay.
    assert_eq!(x_cache(&app, "8").await, "MISS");
    assert_eq!(x_cache(&app, "9").await, "HIT");
    assert_eq!(
        header(&app.compare(json!(["1", "2"])).await, "x-cache"),
        "HIT"
    );
}

#[tokio::test]
async fn a_write_through_one_instance_is_seen_by_a_read_on_another() {
    let redis = TestRedis::start().await;
    let a = spawn_app_with(Some(&redis), with_rules).await;
    let mut settings = test_settings(&a.origin.url, &redis.url());
    with_rules(&mut settings);
    settings.cache.prefix = a.prefix.clone();
    let b = spawn_with_settings(settings, a.origin.clone()).await;
    b.metrics("8").await;
    assert_eq!(x_cache(&b, "8").await, "HIT");

    assert_eq!(
        write(&a, "/api/v1/writes/log", json!({"run_id": 8}))
            .await
            .status(),
        200
    );
    // The read starts after the write's answer: on the other instance too, it is a miss.
    assert_eq!(x_cache(&b, "8").await, "MISS");
}

#[tokio::test]
async fn a_refused_write_invalidates_nothing_and_its_answer_passes_unchanged() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), with_rules).await;
    app.metrics("8").await;
    app.origin.control.write_status.store(409, Ordering::SeqCst);

    let resp = write(&app, "/api/v1/writes/log", json!({"run_id": "8"})).await;
    assert_eq!(resp.status(), 409);
    assert!(resp.headers().get("x-invalidated").is_none());
    assert_eq!(header(&resp, "x-origin-write"), "yes");
    // The origin's own error body, not runcache's.
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"ok": false, "run_id": "8", "experiment_id": "7"})
    );
    assert_eq!(x_cache(&app, "8").await, "HIT");
}

#[tokio::test]
async fn a_write_whose_outcome_is_unknown_invalidates_as_if_it_succeeded() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), with_rules).await;

    // A 5xx: without `gateway.pass_through`, a 502 as for views (SPEC section 1); the run goes.
    app.metrics("8").await;
    app.origin.control.write_status.store(503, Ordering::SeqCst);
    let resp = write(&app, "/api/v1/writes/log", json!({"run_id": "8"})).await;
    assert_error(resp, 502, "origin_error").await;
    assert_eq!(x_cache(&app, "8").await, "MISS");

    // A time-out: the origin may have applied it. runcache answers 504, and the run goes.
    app.origin.control.write_status.store(0, Ordering::SeqCst);
    app.metrics("8").await;
    assert_eq!(x_cache(&app, "8").await, "HIT");
    app.origin.set_delay(1500);
    let resp = write(&app, "/api/v1/writes/log", json!({"run_id": "8"})).await;
    app.origin.set_delay(0);
    assert_eq!(resp.status(), 504);
    assert_eq!(x_cache(&app, "8").await, "MISS");

    // An answer that never came names no run: the rule's `otherwise` goes instead (every
    // metrics entry), since the run the answer would have named is unknown.
    app.metrics("5").await;
    assert_eq!(x_cache(&app, "5").await, "HIT");
    app.origin.control.write_status.store(500, Ordering::SeqCst);
    let resp = write(&app, "/api/v1/writes/create", json!({"run_id": "6"})).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(x_cache(&app, "5").await, "MISS");
}

#[tokio::test]
async fn tags_come_from_the_answer_the_path_or_otherwise() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), with_rules).await;
    for id in ["3", "4"] {
        app.metrics(id).await;
    }
    // From the answer: the origin echoes the run it created.
    let resp = write(&app, "/api/v1/writes/create", json!({"run_id": "3"})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(x_cache(&app, "3").await, "MISS");
    assert_eq!(x_cache(&app, "4").await, "HIT");

    // From the path, under a `*` rest; the body (larger than `server.max_body_bytes`) is
    // streamed, since no rule reads it.
    let resp = app
        .client
        .put(app.url("/api/v1/writes/4/artifacts/model/weights.bin"))
        .body(vec![7u8; 2 * 1024 * 1024])
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        app.origin
            .calls("PUT /api/v1/writes/4/artifacts/model/weights.bin"),
        1
    );
    assert_eq!(x_cache(&app, "4").await, "MISS");

    // A body that names no run: the rule's `otherwise` views go whole (the comparisons), and
    // the metrics stay.
    app.compare(json!(["1", "2"])).await;
    assert_eq!(
        header(&app.compare(json!(["1", "2"])).await, "x-cache"),
        "HIT"
    );
    let resp = write(&app, "/api/v1/writes/log", json!({"value": 1})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&app.compare(json!(["1", "2"])).await, "x-cache"),
        "MISS"
    );
    assert_eq!(x_cache(&app, "4").await, "HIT");
}

#[tokio::test]
async fn the_shipped_delete_rule_can_be_turned_off() {
    let app = spawn_app_with(None, |s| {
        s.invalidate
            .get_mut("delete_run")
            .expect("shipped rule")
            .enabled = Some(false);
    })
    .await;
    let resp = app
        .client
        .delete(app.url("/api/v1/models/train/8"))
        .send()
        .await
        .expect("delete");
    assert_error(resp, 404, "not_found").await;
    assert_eq!(app.origin.calls("DELETE /api/v1/models/train/8"), 0);
}

/// A table learning run → experiment from the `create` rule's answers, and a rule that
/// invalidates the run the lookup names (the test origin's answers say experiment `7`; the
/// metrics view is tagged `run:…`, so `run:7` stands for the experiment's entries).
fn with_lookup(s: &mut Settings) {
    with_rules(s);
    s.lookups.insert(
        "run_exp".into(),
        runcache::domain::LookupSpec {
            learn: vec![runcache::domain::lookup::LearnSpec {
                rule: Some("create".into()),
                from: Some("response".into()),
                key: Some("run_id".into()),
                value: Some("experiment_id".into()),
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    s.invalidate.insert(
        "log_exp".into(),
        rule(
            "POST",
            "/api/v1/writes/log-exp",
            &["run:{lookup.run_exp[body.run_id]}"],
            &["metrics"],
        ),
    );
}

#[tokio::test]
async fn a_lookup_learned_from_answers_names_what_the_write_does_not_and_is_shared() {
    let redis = TestRedis::start().await;
    let a = spawn_app_with(Some(&redis), with_lookup).await;
    let mut settings = test_settings(&a.origin.url, &redis.url());
    with_lookup(&mut settings);
    settings.cache.prefix = a.prefix.clone();
    let b = spawn_with_settings(settings, a.origin.clone()).await;
    for app in [&a, &b] {
        for id in ["7", "8"] {
            app.metrics(id).await;
            assert_eq!(x_cache(app, id).await, "HIT");
        }
    }

    // Nothing learned yet: the lookup finds nothing, and every metrics entry goes (otherwise).
    assert_eq!(
        write(&a, "/api/v1/writes/log-exp", json!({"run_id": "abc"}))
            .await
            .status(),
        200
    );
    assert_eq!(x_cache(&a, "8").await, "MISS");
    assert_eq!(x_cache(&a, "7").await, "MISS");

    // A create through `a` teaches abc → 7, here and (in the background) in Redis.
    assert_eq!(
        write(&a, "/api/v1/writes/create", json!({"run_id": "abc"}))
            .await
            .status(),
        200
    );
    let hash = format!("{}:_lookup:{{run_exp}}", a.prefix);
    wait_for(|| async {
        redis
            .cmd::<Option<String>>(&["HGET", &hash, "abc"])
            .await
            .ok()
            .flatten()
            .is_some_and(|v| v.ends_with(".\"7\""))
    })
    .await;

    // Through `b`, which never saw the create: the lookup comes from Redis, and only run 7 goes.
    for id in ["7", "8"] {
        b.metrics(id).await;
        assert_eq!(x_cache(&b, id).await, "HIT");
    }
    assert_eq!(
        write(&b, "/api/v1/writes/log-exp", json!({"run_id": "abc"}))
            .await
            .status(),
        200
    );
    assert_eq!(x_cache(&b, "7").await, "MISS");
    assert_eq!(x_cache(&b, "8").await, "HIT");

    // What Redis holds is untrusted: a value without this deployment's HMAC (however well
    // formed: trusted, it would send the invalidation to run 7 alone and leave run 8's entry)
    // is ignored, and the write falls back to `otherwise` rather than trusting it.
    let _: i64 = redis
        .cmd(&["HSET", &hash, "forged", "\"7\""])
        .await
        .expect("hset");
    b.metrics("8").await;
    assert_eq!(x_cache(&b, "8").await, "HIT");
    assert_eq!(
        write(&b, "/api/v1/writes/log-exp", json!({"run_id": "forged"}))
            .await
            .status(),
        200
    );
    assert_eq!(x_cache(&b, "8").await, "MISS");
}

#[tokio::test]
async fn a_write_is_matched_as_the_origin_reads_its_path_and_its_body() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), with_rules).await;
    for id in ["8", "9"] {
        app.metrics(id).await;
        assert_eq!(x_cache(&app, id).await, "HIT");
    }
    // `l%6Fg` is the origin's `log`: it must not pass uninvalidated.
    let resp = write(&app, "/api/v1/writes/l%6Fg", json!({"run_id": "8"})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(x_cache(&app, "8").await, "MISS");
    // A body encoded twice (a JSON string holding the JSON), as old MLflow clients send it.
    let resp = app
        .client
        .post(app.url("/api/v1/writes/log"))
        .header("content-type", "application/json")
        .body(serde_json::to_string(&json!({"run_id": "9"}).to_string()).expect("json"))
        .send()
        .await
        .expect("write");
    assert_eq!(resp.status(), 200);
    assert_eq!(x_cache(&app, "9").await, "MISS");
}

#[tokio::test]
async fn every_rule_a_write_matches_invalidates_what_it_names() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| {
        with_rules(s);
        // Less specific than `log`, on the same path: both apply.
        s.invalidate.insert(
            "any_write".into(),
            rule("POST", "/api/v1/writes/*", &["run:7"], &[]),
        );
    })
    .await;
    for id in ["7", "8", "9"] {
        app.metrics(id).await;
    }
    let resp = write(&app, "/api/v1/writes/log", json!({"run_id": "8"})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(x_cache(&app, "7").await, "MISS");
    assert_eq!(x_cache(&app, "8").await, "MISS");
    assert_eq!(x_cache(&app, "9").await, "HIT");
}

#[tokio::test]
async fn a_client_gone_once_its_write_is_sent_cannot_cancel_the_invalidation() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| {
        with_rules(s);
        s.origin.timeout_ms = 5000;
    })
    .await;
    app.metrics("8").await;
    assert_eq!(x_cache(&app, "8").await, "HIT");
    app.origin.set_delay(600);
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(150))
        .build()
        .expect("client");
    let gone = impatient
        .post(app.url("/api/v1/writes/log"))
        .json(&json!({"run_id": "8"}))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up before the answer");
    // The origin applies the write after the client left; its invalidation still happens.
    wait_for(|| async { app.origin.calls("POST /api/v1/writes/log") == 1 }).await;
    tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    app.origin.set_delay(0);
    assert_eq!(x_cache(&app, "8").await, "MISS");
}

/// A write body that breaks off mid-way (a malformed chunk here) is a `400`, not a `413`:
/// only a body over the read limit is too large. Nothing reaches the origin.
#[tokio::test]
async fn a_write_body_that_cannot_be_read_is_a_400_not_a_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), with_rules).await;
    let addr = app.url("").trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    s.write_all(
        b"POST /api/v1/writes/log HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\n{\"ru\r\nzz\r\n",
    )
    .await
    .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        s.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid_argument"), "{answer}");
    assert_eq!(app.origin.calls("/api/v1/writes/log"), 0);
}

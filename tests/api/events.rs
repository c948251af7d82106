//! Training events invalidate precisely, and need the admin token.

use serde_json::{Value, json};

use crate::helpers::{TestRedis, assert_error, header, spawn_app};

#[tokio::test]
async fn training_completed_drops_the_run_and_only_its_comparisons() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.metrics("1").await;
    app.get("/api/v1/models/train/1/feature-importance").await;
    app.get("/api/v1/models/train/1/feature-importance?top_n=5")
        .await;
    app.compare(json!(["1", "2"])).await;
    app.compare(json!(["3", "1", "4"])).await;
    app.compare(json!(["2", "3"])).await;
    app.metrics("2").await;
    app.metrics("10").await;

    let resp = app.event("training-completed", json!("1")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"invalidated": 5})
    );

    assert_eq!(header(&app.metrics("1").await, "x-cache"), "MISS");
    assert_eq!(
        header(
            &app.get("/api/v1/models/train/1/feature-importance?top_n=5")
                .await,
            "x-cache"
        ),
        "MISS"
    );
    assert_eq!(
        header(&app.compare(json!(["2", "1"])).await, "x-cache"),
        "MISS"
    );
    assert_eq!(
        header(&app.compare(json!(["2", "3"])).await, "x-cache"),
        "HIT",
        "unrelated comparison survives"
    );
    assert_eq!(header(&app.metrics("2").await, "x-cache"), "HIT");
    assert_eq!(
        header(&app.metrics("10").await, "x-cache"),
        "HIT",
        "run 10 is not run 1"
    );
}

#[tokio::test]
async fn all_three_events_accept_numbers_and_strings() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    for (kind, id) in [
        ("training-completed", json!(11)),
        ("training-failed", json!("12")),
        ("model-deleted", json!(13)),
    ] {
        let run = id.to_string().trim_matches('"').to_owned();
        app.metrics(&run).await;
        let resp = app.event(kind, id).await;
        assert_eq!(resp.status(), 200, "{kind}");
        assert_eq!(
            resp.json::<Value>().await.expect("json")["invalidated"],
            1,
            "{kind}"
        );
        assert_eq!(
            header(&app.metrics(&run).await, "x-cache"),
            "MISS",
            "{kind}"
        );
    }
    let again = app.event("model-deleted", json!(14)).await;
    assert_eq!(again.json::<Value>().await.expect("json")["invalidated"], 0);
}

#[tokio::test]
async fn events_need_the_token_and_a_valid_run_id() {
    let app = spawn_app(None).await;
    let url = app.url("/events/training-completed");
    let none = app
        .client
        .post(&url)
        .json(&json!({"model_run_id": "1"}))
        .send()
        .await
        .expect("request");
    assert_eq!(header(&none, "www-authenticate"), "Bearer");
    assert_error(none, 401, "unauthorized").await;
    let wrong = app
        .client
        .post(&url)
        .bearer_auth("nope")
        .json(&json!({"model_run_id": "1"}))
        .send()
        .await
        .expect("request");
    assert_error(wrong, 401, "unauthorized").await;
    for body in [
        json!({}),
        json!({"model_run_id": ".."}),
        json!({"model_run_id": -1}),
        json!({"model_run_id": true}),
    ] {
        let resp = app
            .admin(reqwest::Method::POST, "/events/training-failed", Some(body))
            .await;
        assert_error(resp, 400, "invalid_argument").await;
    }
}

fn sign(secret: &str, ts: i64, body: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{ts}.{body}").as_bytes());
    format!(
        "sha256={}",
        runcache::domain::hex(&mac.finalize().into_bytes())
    )
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

async fn signed(
    app: &crate::helpers::TestApp,
    ts: i64,
    signature: &str,
    body: &str,
) -> reqwest::Response {
    app.client
        .post(app.url("/events/training-completed"))
        .header("x-runcache-timestamp", ts.to_string())
        .header("x-runcache-signature", signature)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn signed_events_are_applied_once_and_accepted_only_when_valid_and_fresh() {
    let app = crate::helpers::spawn_app_with(None, |s| {
        s.events.secret = Some(secrecy::SecretString::from("whsec-test"));
    })
    .await;
    app.metrics("42").await;
    let body = r#"{"model_run_id": "42"}"#;
    let ts = now();
    let good = sign("whsec-test", ts, body);

    let ok = signed(&app, ts, &good, body).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.json::<Value>().await.expect("json"),
        json!({"invalidated": 1})
    );

    // Delivered again (a sender that lost the answer retries): the same answer, and nothing
    // is applied twice.
    app.metrics("42").await;
    let invalidations = app.stats().await["stats"]["invalidations"].clone();
    let again = signed(&app, ts, &good, body).await;
    assert_eq!(again.status(), 200);
    assert_eq!(
        again.json::<Value>().await.expect("json"),
        json!({"invalidated": 1})
    );
    assert_eq!(app.stats().await["stats"]["invalidations"], invalidations);
    assert_eq!(header(&app.metrics("42").await, "x-cache"), "HIT");
    let bad = sign("wrong-secret", ts, body);
    assert_error(signed(&app, ts, &bad, body).await, 401, "unauthorized").await;
    let tampered = r#"{"model_run_id": "43"}"#;
    let fresh_sig = sign("whsec-test", ts + 1, body);
    assert_error(
        signed(&app, ts + 1, &fresh_sig, tampered).await,
        401,
        "unauthorized",
    )
    .await;
    // Well outside the 300 s tolerance, from the clock now: this test may take seconds on a
    // loaded host, and a timestamp taken at its start plus 301 s would be within it by then.
    for skew in [-310, 310] {
        let old = now() + skew;
        let msg = assert_error(
            signed(&app, old, &sign("whsec-test", old, body), body).await,
            401,
            "unauthorized",
        )
        .await;
        assert!(msg.contains("tolerance"), "{msg}");
    }
    let missing = app
        .client
        .post(app.url("/events/training-completed"))
        .body(body.to_owned())
        .send()
        .await
        .expect("request");
    assert_error(missing, 401, "unauthorized").await;
    let half = app
        .client
        .post(app.url("/events/training-completed"))
        .header("x-runcache-timestamp", ts.to_string())
        .body(body.to_owned())
        .send()
        .await
        .expect("request");
    assert_error(half, 401, "unauthorized").await;
    // The bearer token keeps working next to signatures.
    assert_eq!(
        app.event("training-failed", json!("42")).await.status(),
        200
    );
}

#[tokio::test]
async fn signatures_are_refused_when_no_secret_is_configured() {
    let app = crate::helpers::spawn_app(None).await;
    let body = r#"{"model_run_id": "1"}"#;
    let ts = now();
    assert_error(
        signed(&app, ts, &sign("anything", ts, body), body).await,
        401,
        "unauthorized",
    )
    .await;
}

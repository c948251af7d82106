//! Defect 6: signed events are single-use once applied; events have their own rate limit.

use super::*;

fn sign(secret: &str, ts: i64, body: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{ts}.{body}").as_bytes());
    format!(
        "sha256={}",
        runcache::domain::hex(&mac.finalize().into_bytes())
    )
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Delivers a signed `training-completed` event.
async fn signed(app: &TestApp, ts: i64, signature: &str, body: &str) -> Seen {
    let resp = app
        .client
        .post(app.url("/events/training-completed"))
        .header("x-runcache-timestamp", ts.to_string())
        .header("x-runcache-signature", signature)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request");
    Seen::of(resp).await
}

const SECRET: &str = "whsec-regress";

async fn signing_app(redis: &TestRedis) -> TestApp {
    spawn_app_with(Some(redis), |s| {
        s.events.secret = Some(secrecy::SecretString::from(SECRET));
    })
    .await
}

/// Defect 6: the signature is recorded as used before the invalidation is applied, so a sender
/// retrying an event that failed (5xx) is refused as a replay. The run's generation counter is
/// made a non-integer so the first delivery fails; once repaired, the exact same signed
/// request must be applied (200).
#[tokio::test]
async fn a_signed_event_that_failed_can_be_delivered_again() {
    let redis = TestRedis::start().await;
    let app = signing_app(&redis).await;
    app.metrics("42").await;
    let gen_key = format!("{}:_gen:v1:run:42", app.prefix);
    let set: String = redis
        .cmd(&["SET", &gen_key, "not-a-number"])
        .await
        .expect("SET");
    assert_eq!(set, "OK");

    let body = r#"{"model_run_id": "42"}"#;
    let ts = now_secs();
    let signature = sign(SECRET, ts, body);
    let failed = signed(&app, ts, &signature, body).await;
    assert!(
        (500..600).contains(&failed.status),
        "setup: the first delivery must fail: {failed:?}"
    );

    let _: i64 = redis.cmd(&["DEL", &gen_key]).await.expect("DEL");
    let retried = signed(&app, ts, &signature, body).await;
    assert_eq!(
        retried.status, 200,
        "a signature counts as used only once its invalidation is applied: {retried:?}"
    );
    assert!(retried.json()["invalidated"].is_u64(), "{retried:?}");
    assert_eq!(
        header(&app.metrics("42").await, "x-cache"),
        "MISS",
        "the retried event was applied"
    );
}

/// Defect 6: a second delivery of an applied signed event (a sender that lost the answer) is
/// answered 200 with the same body as the first, and applies nothing again.
#[tokio::test]
async fn a_signed_event_delivered_twice_is_answered_alike_and_applied_once() {
    let redis = TestRedis::start().await;
    let app = signing_app(&redis).await;
    app.metrics("42").await;
    let body = r#"{"model_run_id": "42"}"#;
    let ts = now_secs();
    let signature = sign(SECRET, ts, body);
    let first = signed(&app, ts, &signature, body).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.json(), json!({"invalidated": 1}));
    let invalidations = app.stats().await["stats"]["invalidations"].clone();

    let again = signed(&app, ts, &signature, body).await;
    assert_eq!(
        again.status, 200,
        "an applied signed event delivered again must be answered 200: {again:?}"
    );
    assert_eq!(
        again.body, first.body,
        "the same answer as the first delivery"
    );
    assert_eq!(
        app.stats().await["stats"]["invalidations"],
        invalidations,
        "the second delivery applied the invalidation again"
    );
}

/// Defect 6: events share the admin rate limit (20/s, burst 40). A training sweep finishing
/// 300 runs at once, from one client, must have every event applied.
#[tokio::test]
async fn a_sweep_of_300_events_from_one_client_is_not_rate_limited() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    let events = (0..300).map(|i| app.event("training-completed", json!(format!("sweep-{i}"))));
    let statuses: Vec<u16> = futures_util::future::join_all(events)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    let refused: Vec<&u16> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        refused.is_empty(),
        "{} of 300 events were not applied (statuses {:?})",
        refused.len(),
        {
            let mut distinct = refused.clone();
            distinct.dedup();
            distinct
        }
    );
}

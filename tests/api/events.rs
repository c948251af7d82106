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

//! The memory tier: no Redis at start, Redis killed mid-test, Redis back, and invalidations
//! made during the outage replayed before Redis serves again.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestRedis, header, spawn_app, wait_for};

#[tokio::test]
async fn without_redis_the_memory_tier_serves_and_says_so() {
    let app = spawn_app(None).await;
    let first = app.metrics("1").await;
    assert_eq!(header(&first, "x-cache"), "MISS");
    assert_eq!(
        header(&first, "cache-status"),
        "runcache; fwd=miss; stored; detail=memory-fallback"
    );
    let second = app.metrics("1").await;
    assert_eq!(header(&second, "x-cache"), "HIT");
    assert!(header(&second, "cache-status").ends_with("detail=memory-fallback"));
    assert_eq!(app.origin.calls("/api/v1/models/train/1/metrics"), 1);

    let s = app.stats().await;
    assert_eq!(s["backend"], "memory");
    assert!(s["redis"].is_null());
    assert_eq!(s["memory"]["entries"], 1);
    assert_eq!(s["stats"]["keys"], 1);

    let resp = app.event("training-completed", json!("1")).await;
    assert_eq!(resp.json::<Value>().await.expect("json")["invalidated"], 1);
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "MISS");
}

#[tokio::test]
async fn redis_dying_mid_test_falls_back_and_recovers() {
    let mut redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.metrics("1").await;
    assert_eq!(app.stats().await["backend"], "redis");

    redis.kill();
    // Every request still succeeds: from the origin while the failures last less than
    // `redis.circuit_window_ms`, then from memory once the circuit opens.
    for _ in 0..3 {
        let resp = app.metrics("2").await;
        assert_eq!(resp.status(), 200);
    }
    wait_for(|| async { app.stats().await["backend"] == "memory" }).await;
    app.metrics("2").await;
    let hit = app.metrics("2").await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    assert!(header(&hit, "cache-status").contains("memory-fallback"));
    assert_eq!(app.stats().await["backend"], "memory");

    redis.restart().await;
    wait_for(|| async { app.stats().await["backend"] == "redis" }).await;
    let back = app.metrics("3").await;
    assert_eq!(header(&back, "cache-status"), "runcache; fwd=miss; stored");
    assert_eq!(
        redis
            .keys(&format!("{}:v1:model:metrics:3", app.prefix))
            .await
            .len(),
        1,
        "stored in redis again"
    );
}

#[tokio::test]
async fn an_invalidation_during_an_outage_is_replayed_before_redis_serves() {
    let mut redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.metrics("1").await;
    app.compare(json!(["1", "2"])).await;
    let _: () = redis::cmd("SAVE")
        .query_async(&mut redis.conn().await)
        .await
        .expect("SAVE");

    redis.kill();
    let resp = app.event("model-deleted", json!("1")).await;
    assert_eq!(resp.status(), 200);
    assert!(app.stats().await["pending_invalidations"].as_u64() > Some(0));

    // Redis comes back from the snapshot: the invalidated entries are in it again.
    redis.restart().await;
    wait_for(|| async { app.stats().await["backend"] == "redis" }).await;
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "MISS");
    assert_eq!(
        header(&app.compare(json!(["2", "1"])).await, "x-cache"),
        "MISS"
    );
    assert_eq!(app.stats().await["pending_invalidations"], 0);

    // A clear during an outage is replayed too.
    let _: () = redis::cmd("SAVE")
        .query_async(&mut redis.conn().await)
        .await
        .expect("SAVE");
    redis.kill();
    let clear = app
        .admin(Method::DELETE, "/cache/clear?pattern=model:*", None)
        .await;
    assert_eq!(clear.status(), 200);
    redis.restart().await;
    wait_for(|| async { app.stats().await["backend"] == "redis" }).await;
    assert!(redis.keys(&format!("{}:v1:*", app.prefix)).await.is_empty());
}

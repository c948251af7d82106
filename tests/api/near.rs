//! The L1 near cache: hits served in process without a Redis round trip, kept coherent
//! across instances through Redis pub/sub.

use serde_json::json;

use crate::helpers::*;

/// Waits until the app's near-cache subscription is live (it serves only then).
async fn near_live(app: &TestApp) {
    wait_for(|| async { app.state.store.near().is_some_and(|n| n.cache.is_live()) }).await;
}

/// Two instances on one Redis and one origin, with public views (so each instance serves
/// an entry without first validating the caller with the origin).
async fn two_instances(redis: &TestRedis) -> (TestApp, TestApp) {
    let (a, b) = crate::helpers::two_public_instances(redis).await;
    near_live(&a).await;
    near_live(&b).await;
    (a, b)
}

/// Reads `id`'s metrics on `app` until the read is served by the near cache: a HIT that
/// sends no command to Redis. Returns the number of origin calls so far.
async fn hit_from_near_cache(app: &TestApp, id: &str) {
    // The first read may be a miss, the second reads Redis and keeps the entry.
    for _ in 0..2 {
        assert_eq!(app.metrics(id).await.status(), 200);
    }
    let before = app.state.store.tiered().redis_calls();
    let resp = app.metrics(id).await;
    assert_eq!(header(&resp, "x-cache"), "HIT");
    assert_eq!(
        app.state.store.tiered().redis_calls(),
        before,
        "a near-cache hit sends nothing to redis"
    );
}

#[tokio::test]
async fn an_event_on_one_instance_makes_the_next_read_on_another_a_miss() {
    let redis = TestRedis::start().await;
    let (a, b) = two_instances(&redis).await;
    let path = "/api/v1/models/train/7/metrics";
    hit_from_near_cache(&a, "7").await;
    hit_from_near_cache(&b, "7").await;
    assert_eq!(a.origin.calls(path), 1);

    let resp = a.event("training-completed", json!("7")).await;
    assert_eq!(resp.status(), 200);
    // No waiting: the event is answered only once every instance has dropped its copy.
    let resp = b.metrics("7").await;
    assert_eq!(header(&resp, "x-cache"), "MISS");
    assert_eq!(a.origin.calls(path), 2);

    // A pattern clear on B reaches A's near cache the same way.
    hit_from_near_cache(&a, "7").await;
    let resp = b
        .admin(
            reqwest::Method::DELETE,
            "/cache/clear?pattern=model:metrics:*",
            None,
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&a.metrics("7").await, "x-cache"), "MISS");

    let l1 = &a.stats().await["l1"];
    assert_eq!(l1["enabled"], true);
    assert_eq!(l1["subscribed"], true);
    assert!(l1["hits"].as_u64().unwrap_or(0) >= 2, "{l1}");
    assert!(l1["invalidations"].as_u64().unwrap_or(0) >= 1, "{l1}");
    assert_eq!(l1["ack_timeouts"], 0);
}

#[tokio::test]
async fn a_comparison_dropped_on_one_instance_is_gone_from_the_other() {
    let redis = TestRedis::start().await;
    let (a, b) = two_instances(&redis).await;
    for _ in 0..3 {
        assert_eq!(b.compare(json!(["5", "6"])).await.status(), 200);
    }
    let before = b.state.store.tiered().redis_calls();
    assert_eq!(
        header(&b.compare(json!(["5", "6"])).await, "x-cache"),
        "HIT"
    );
    assert_eq!(b.state.store.tiered().redis_calls(), before);

    assert_eq!(a.event("model-deleted", json!(6)).await.status(), 200);
    assert_eq!(
        header(&b.compare(json!(["5", "6"])).await, "x-cache"),
        "MISS"
    );
}

#[tokio::test]
async fn a_lost_subscription_empties_the_near_cache_until_resubscribed() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    near_live(&app).await;
    hit_from_near_cache(&app, "9").await;
    let near = app.state.store.near().expect("l1 is on by default");
    let flushes = near.cache.counts().flushes;

    // Redis drops the subscriber connection: messages could be missed from now on.
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis.conn().await)
        .await
        .expect("client kill");
    // Emptied when lost, and again when the new subscription is up.
    wait_for(|| async { near.cache.counts().flushes >= flushes + 2 && near.cache.is_live() }).await;
    assert_eq!(near.cache.counts().entries, 0);

    let before = app.state.store.tiered().redis_calls();
    assert_eq!(header(&app.metrics("9").await, "x-cache"), "HIT");
    assert!(
        app.state.store.tiered().redis_calls() > before,
        "after a lost subscription the entry is read from redis again"
    );
}

#[tokio::test]
async fn no_entry_outlives_the_near_cache_lifetime_cap() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| s.l1.max_lifetime_ms = 300).await;
    near_live(&app).await;
    hit_from_near_cache(&app, "11").await;

    // Deleted behind runcache's back: no invalidation message tells the near cache. The
    // entry would otherwise be served for its whole TTL (an hour); the cap ends that.
    let key = format!("{}:v1:model:metrics:11", app.prefix);
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut redis.conn().await)
        .await
        .expect("del");
    wait_for(|| async { header(&app.metrics("11").await, "x-cache") == "MISS" }).await;
    assert_eq!(app.origin.calls("/api/v1/models/train/11/metrics"), 2);
}

#[tokio::test]
async fn with_l1_disabled_every_hit_reads_redis() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| s.l1.enabled = false).await;
    assert!(app.state.store.near().is_none());
    for _ in 0..3 {
        app.metrics("12").await;
    }
    let before = app.state.store.tiered().redis_calls();
    assert_eq!(header(&app.metrics("12").await, "x-cache"), "HIT");
    assert!(app.state.store.tiered().redis_calls() > before);
    assert_eq!(app.stats().await["l1"]["enabled"], false);
}

/// Status, headers (but the request id and date) and body.
async fn answer(resp: reqwest::Response) -> (u16, Vec<(String, String)>, bytes::Bytes) {
    let status = resp.status().as_u16();
    let mut headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "x-request-id" | "date"))
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    headers.sort();
    (status, headers, resp.bytes().await.expect("body"))
}

#[tokio::test]
async fn the_hit_lane_answers_exactly_as_the_full_path() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    near_live(&app).await;
    let path = "/api/v1/models/train/21/feature-importance?top_n=5";
    for _ in 0..2 {
        app.get(path).await;
    }
    let get = |extra: Option<(&'static str, String)>| {
        let mut req = app.client.get(app.url(path));
        if let Some((k, v)) = extra {
            req = req.header(k, v);
        }
        req.send()
    };
    // No Accept-Encoding: the hit lane may answer. `identity`: it steps aside (compression is
    // the full path's), and the full path sends nothing compressed.
    let lane_hits = || app.state.store.near_counts().lane_hits;
    let before = lane_hits();
    let lane = answer(get(None).await.expect("lane")).await;
    assert_eq!(lane_hits(), before + 1, "answered by the hit lane");
    let full = answer(
        get(Some(("accept-encoding", "identity".into())))
            .await
            .expect("full"),
    )
    .await;
    assert_eq!(lane_hits(), before + 1, "answered by the full path");
    assert_eq!(lane.0, 200);
    assert_eq!(lane, full);

    let etag = lane
        .1
        .iter()
        .find(|(k, _)| k == "etag")
        .map(|(_, v)| v.clone())
        .expect("etag");
    let lane = answer(
        get(Some(("if-none-match", etag.clone())))
            .await
            .expect("304"),
    )
    .await;
    assert_eq!(lane.0, 304);
    assert!(lane.2.is_empty());

    // The client's request id is kept; without one, each answer gets a new one.
    let resp = get(Some(("x-request-id", "abc-123".into())))
        .await
        .expect("id");
    assert_eq!(header(&resp, "x-request-id"), "abc-123");
    let a = get(None).await.expect("a");
    let b = get(None).await.expect("b");
    assert_eq!(header(&a, "x-request-id").len(), 36);
    assert_ne!(header(&a, "x-request-id"), header(&b, "x-request-id"));
    let stats = app.stats().await;
    assert!(stats["stats"]["hits"].as_u64().unwrap_or(0) >= 6, "{stats}");
}

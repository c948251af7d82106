//! The memory tier: no Redis at start, Redis killed mid-test, Redis back, and invalidations
//! made during the outage replayed before Redis serves again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{
    TestRedis, header, spawn_app, spawn_app_with, spawn_with_settings, test_settings, wait_for,
};

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
    // Every request still succeeds: from memory once the circuit opens (at the first
    // refused connection), from the origin before.
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

/// Issue 20, item 10: a killed Redis refuses connections at once, which proves it gone. The
/// first request that finds it so opens the circuit (no streak window to wait out), and
/// `/cache/stats` says so at once; that request's answer is kept in the memory tier.
#[tokio::test]
async fn a_refused_connection_opens_the_circuit_at_once() {
    let mut redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    assert_eq!(app.metrics("1").await.status(), 200);
    assert_eq!(app.stats().await["redis_reachable"], true);

    redis.kill();
    let first = app.metrics("2").await;
    assert_eq!(first.status(), 200);
    let stats = app.stats().await;
    assert_eq!(
        (stats["redis_reachable"].clone(), stats["backend"].clone()),
        (json!(false), json!("memory")),
        "one request after the kill; cache-status was {:?}",
        header(&first, "cache-status")
    );
    let second = app.metrics("2").await;
    assert_eq!(header(&second, "x-cache"), "HIT");
    assert_eq!(app.origin.calls("/api/v1/models/train/2/metrics"), 1);
}

/// Issue 20, item 10: Redis SIGKILLed under load on 100 hot keys. Today every request in the
/// circuit's streak window went to the origin and stored nothing (`detail=store-failed`):
/// hundreds of origin calls. What is owed is about one fetch per hot key, the cost of filling
/// the memory tier. Each key is read at least five times after the kill; the origin may see
/// at most two calls per key.
#[tokio::test]
async fn a_redis_killed_under_load_costs_the_origin_about_one_call_per_hot_key() {
    const KEYS: usize = 100;
    const WORKERS: usize = 16;
    let mut redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    for i in 0..KEYS {
        assert_eq!(app.metrics(&format!("hot-{i}")).await.status(), 200);
    }
    assert_eq!(app.origin.total_calls(), KEYS);
    // A miss takes a while, as a real backend's does, so misses overlap under load.
    app.origin.set_delay(20);

    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let reads_after: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let failed = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (client, base) = (app.client.clone(), app.address.clone());
            let (killed, stop, reads_after, failed) = (
                killed.clone(),
                stop.clone(),
                reads_after.clone(),
                failed.clone(),
            );
            tokio::spawn(async move {
                let mut i = w * 7;
                while !stop.load(Ordering::Relaxed) {
                    let key = i % KEYS;
                    i += 1;
                    let after = killed.load(Ordering::Acquire);
                    let url = format!("{base}/api/v1/models/train/hot-{key}/metrics");
                    match client.get(url).send().await {
                        Ok(r) if r.status() == 200 => {}
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if after {
                        reads_after[key].fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    // Under load on Redis first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = app.origin.total_calls();
    killed.store(true, Ordering::Release);
    redis.kill();
    wait_for(|| async { reads_after.iter().all(|n| n.load(Ordering::Relaxed) >= 5) }).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    let calls = app.origin.total_calls() - before;
    let reads: u64 = reads_after.iter().map(|n| n.load(Ordering::Relaxed)).sum();
    println!("after the kill: {reads} reads of {KEYS} hot keys, {calls} origin calls");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed");
    assert!(
        calls <= 2 * KEYS,
        "{calls} origin calls for {KEYS} hot keys ({reads} reads) after redis died"
    );
    assert_eq!(app.stats().await["backend"], "memory");
}

/// Issue 20, item 10, promise 1 for what goes to memory instead of Redis: an answer whose
/// fetch began before an invalidation is never kept in the memory tier, whether the
/// invalidation reached Redis before it died (memory never saw it) or came after (memory and
/// journal). Reads after the invalidations get the new data.
#[tokio::test]
async fn an_answer_fetched_across_an_invalidation_is_not_kept_in_memory_when_redis_dies() {
    let mut redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.origin.set_delay(1500);
    let slow = |run: &'static str| {
        let (client, url) = (
            app.client.clone(),
            app.url(&format!("/api/v1/models/train/{run}/metrics")),
        );
        tokio::spawn(async move {
            client
                .get(url)
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        })
    };
    let (one, two) = (slow("1"), slow("2"));
    wait_for(|| async {
        app.origin.calls("/api/v1/models/train/1/metrics") == 1
            && app.origin.calls("/api/v1/models/train/2/metrics") == 1
    })
    .await;
    // Both answers are computed from revision 0; the data changes while they are.
    app.origin.set_revision(1);
    // Run 1's invalidation reaches Redis, then Redis dies.
    assert_eq!(
        app.event("training-completed", json!("1")).await.status(),
        200
    );
    redis.kill();
    // Run 2's is made with Redis dead (memory tier and journal).
    app.origin.set_delay(0);
    assert_eq!(app.metrics("3").await.status(), 200);
    assert_eq!(
        app.event("training-completed", json!("2")).await.status(),
        200
    );
    assert_eq!((one.await.expect("1"), two.await.expect("2")), (200, 200));

    for run in ["1", "2"] {
        for _ in 0..2 {
            let resp = app.metrics(run).await;
            let status = header(&resp, "cache-status").to_owned();
            let body: Value = resp.json().await.expect("json");
            assert_eq!(
                body["revision"], 1,
                "run {run}: the answer fetched before its invalidation was served ({status})"
            );
        }
    }
}

/// Issue 20, item 10, promise 1 across instances: an instance that does not hear the others'
/// invalidations (`l1.enabled = false`: no bus) never keeps in memory an answer fetched under
/// Redis, since another instance's invalidation made through Redis meanwhile would reach it
/// by no path once Redis is gone. (A's bound is widened so that only this keeps it safe.)
#[tokio::test]
async fn an_instance_deaf_to_the_others_keeps_nothing_fetched_under_redis_in_memory() {
    across_an_invalidation_by_another_instance(false).await;
}

/// The same with the bus: the other instance's invalidation is heard, and the answer fetched
/// across it is not kept.
#[tokio::test]
async fn an_invalidation_heard_on_the_bus_keeps_an_answer_fetched_across_it_out_of_memory() {
    across_an_invalidation_by_another_instance(true).await;
}

/// A fetches run 1 under Redis; B invalidates it through Redis; Redis dies before A's answer
/// is stored. A's next read must get the new data.
async fn across_an_invalidation_by_another_instance(l1: bool) {
    let mut redis = TestRedis::start().await;
    let a = spawn_app_with(Some(&redis), |s| {
        s.auth.frontend = "none".into();
        s.l1.enabled = l1;
        s.memory.degraded_max_age_ms = 60_000;
    })
    .await;
    let mut settings = test_settings(&a.origin.url, &redis.url());
    settings.auth.frontend = "none".into();
    settings.l1.enabled = l1;
    settings.cache.prefix = a.prefix.clone();
    let b = spawn_with_settings(settings, a.origin.clone()).await;
    wait_for(|| async {
        a.state.store.tiered().peers().any() && b.state.store.tiered().peers().any()
    })
    .await;
    if l1 {
        wait_for(|| async {
            [&a, &b]
                .iter()
                .all(|x| x.state.store.near().is_some_and(|n| n.cache.is_live()))
        })
        .await;
    }

    a.origin.set_delay(1000);
    let slow = {
        let (client, url) = (a.client.clone(), a.url("/api/v1/models/train/1/metrics"));
        tokio::spawn(async move { client.get(url).send().await.expect("request").status() })
    };
    wait_for(|| async { a.origin.calls("/api/v1/models/train/1/metrics") == 1 }).await;
    a.origin.set_revision(1);
    // B's invalidation goes to Redis (and, with the bus, to A).
    assert_eq!(
        b.event("training-completed", json!("1")).await.status(),
        200
    );
    redis.kill();
    a.origin.set_delay(0);
    assert_eq!(a.metrics("2").await.status(), 200);
    assert_eq!(slow.await.expect("slow").as_u16(), 200);

    let resp = a.metrics("1").await;
    let status = header(&resp, "cache-status").to_owned();
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body["revision"], 1,
        "A kept the answer B's acknowledged event invalidated (l1 {l1}; {status})"
    );
}

//! Defect 2: a request never joins a fetch, or a refresh, that began before an invalidation it must see.

use super::*;

/// Defect 2 (a): a request that misses after an acknowledged invalidation joined the miss
/// flight that began before it. R1 starts a slow fetch (the origin computes revision 0); the
/// run changes (revision 1) and its event is acknowledged; R2, sent after the 200, must get
/// revision 1.
#[tokio::test]
async fn a_miss_after_an_acknowledged_event_does_not_join_a_fetch_that_began_before_it() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.origin.set_delay(600);
    let client = app.client.clone();
    let url = app.url("/api/v1/models/train/7/metrics");
    let r1 = tokio::spawn(async move { client.get(url).send().await });
    wait_for(|| async { app.origin.total_calls() == 1 }).await;

    app.origin.set_revision(1);
    let event = app.event("training-completed", json!("7")).await;
    assert_eq!(event.status(), 200);
    assert!(
        !r1.is_finished(),
        "setup: R1's fetch must still be in flight"
    );
    let r2 = Seen::of(app.metrics("7").await).await;
    let r1 = Seen::of(r1.await.expect("task").expect("R1")).await;
    assert_eq!(r1.revision(), Some(0), "R1 began before the change: {r1:?}");
    assert_eq!(
        r2.revision(),
        Some(1),
        "R2 was sent after the event was acknowledged and must see the new revision, not \
         share R1's pre-event fetch: {r2:?}"
    );
}

/// Defect 2 (b): a read that misses after an acknowledged invalidation joined the background
/// refresh (stale-while-revalidate) that began before it, whose answer is always the OLD
/// entry, as a HIT. After the event's 200 a read must get the new revision.
#[tokio::test]
async fn a_read_after_an_acknowledged_event_does_not_join_a_refresh_that_began_before_it() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| {
        s.views.metrics.ttl = runcache::config::Ttl(Duration::from_secs(1));
        s.views.metrics.grace = 60;
        s.views.metrics.stale_if_error = 0;
        s.refresh.min_hits = 0;
    })
    .await;
    let first = Seen::of(app.metrics("7").await).await;
    assert_eq!(
        (first.x_cache.as_str(), first.revision()),
        ("MISS", Some(0))
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    app.origin.set_delay(600);
    let stale = Seen::of(app.metrics("7").await).await;
    assert_eq!(stale.x_cache, "STALE", "{stale:?}");
    // The background refresh has reached the origin, which answers from revision 0.
    wait_for(|| async { app.origin.total_calls() == 2 }).await;
    app.origin.set_revision(1);
    let event = app.event("training-completed", json!("7")).await;
    assert_eq!(event.status(), 200);

    let read = Seen::of(app.metrics("7").await).await;
    assert_eq!(
        read.revision(),
        Some(1),
        "read after the acknowledged event must not be the refresh's (old) entry: {read:?}"
    );
}

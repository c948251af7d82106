//! Frontend access control (`auth.frontend`): the origin accepts token A and refuses token B
//! for run "secure", and answers anonymous callers 401. A cached answer must never reach
//! credentials the origin has not accepted for it.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{
    TestApp, TestRedis, assert_error, header, spawn_app, spawn_app_with, spawn_with_settings,
    test_settings,
};

const SECURE: &str = "/api/v1/models/train/secure/metrics";

async fn get_as(app: &TestApp, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = app.client.get(app.url(path));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    req.send().await.expect("request")
}

#[tokio::test]
async fn a_cached_answer_never_reaches_refused_credentials() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;

    let a1 = get_as(&app, SECURE, Some("A")).await;
    assert_eq!(a1.status(), 200);
    assert_eq!(header(&a1, "x-cache"), "MISS");
    let a2 = get_as(&app, SECURE, Some("A")).await;
    assert_eq!(
        header(&a2, "x-cache"),
        "HIT",
        "A's second request within the window is a hit"
    );

    let b = get_as(&app, SECURE, Some("B")).await;
    assert_eq!(
        b.status(),
        403,
        "B gets the origin's refusal, not the cached body"
    );
    assert_eq!(header(&b, "x-cache"), "MISS");
    assert_eq!(
        b.json::<Value>().await.expect("json"),
        json!({"detail": "forbidden"})
    );

    let anonymous = get_as(&app, SECURE, None).await;
    assert_eq!(
        anonymous.status(),
        401,
        "no header gets what the origin tells anonymous callers"
    );
    assert_eq!(header(&anonymous, "www-authenticate"), "Bearer");

    // A's ETag does not turn into a 304 for B either.
    let etag = header(&get_as(&app, SECURE, Some("A")).await, "etag").to_owned();
    let conditional = app
        .client
        .get(app.url(SECURE))
        .header("authorization", "Bearer B")
        .header("if-none-match", etag)
        .send()
        .await
        .expect("request");
    assert_eq!(conditional.status(), 403);
    assert_eq!(
        app.origin.calls(SECURE),
        4,
        "A once, B twice, anonymous once"
    );
}

#[tokio::test]
async fn credentials_are_never_stored_in_redis_in_the_clear() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    get_as(&app, SECURE, Some("A-very-secret-token")).await;
    get_as(
        &app,
        "/api/v1/models/train/1/metrics",
        Some("A-very-secret-token"),
    )
    .await;
    let mut conn = redis.conn().await;
    for key in redis.keys("*").await {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("DUMP");
        let dump = String::from_utf8_lossy(&dump.unwrap_or_default()).into_owned();
        assert!(
            !dump.contains("A-very-secret-token"),
            "{key} holds the credential"
        );
    }
}

#[tokio::test]
async fn coalescing_is_per_entry_and_credential() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.origin.set_delay(300);
    let (a, b) = tokio::join!(
        get_as(&app, SECURE, Some("A")),
        get_as(&app, SECURE, Some("B"))
    );
    assert_eq!(a.status(), 200);
    assert_eq!(b.status(), 403, "B never waits on A's answer");
    assert_eq!(app.origin.calls(SECURE), 2);

    let many = futures_util::future::join_all(
        (0..10).map(|_| get_as(&app, "/api/v1/models/train/c/metrics", Some("A"))),
    )
    .await;
    assert!(many.iter().all(|r| r.status() == 200));
    assert_eq!(
        app.origin.calls("/api/v1/models/train/c/metrics"),
        1,
        "same credential: one fetch"
    );
}

#[tokio::test]
async fn a_stale_copy_is_only_served_to_accepted_credentials() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| {
        s.views.metrics.ttl = runcache::config::Ttl(std::time::Duration::from_secs(1));
        s.views.metrics.grace = 0;
        s.views.metrics.stale_if_error = 60;
    })
    .await;
    get_as(&app, "/api/v1/models/train/9/metrics", Some("A")).await;
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    app.origin.set_fail(503);
    let a = get_as(&app, "/api/v1/models/train/9/metrics", Some("A")).await;
    assert_eq!(header(&a, "x-cache"), "STALE");
    let c = get_as(&app, "/api/v1/models/train/9/metrics", Some("C")).await;
    assert_error(c, 502, "origin_error").await;
}

#[tokio::test]
async fn another_instance_revalidates_before_serving() {
    let redis = TestRedis::start().await;
    let a = spawn_app(Some(&redis)).await;
    let mut settings = test_settings(&a.origin.url, &redis.url());
    settings.cache.prefix = a.prefix.clone();
    let b = spawn_with_settings(settings, a.origin.clone()).await;
    assert_eq!(
        header(&get_as(&a, SECURE, Some("A")).await, "x-cache"),
        "MISS"
    );
    // The entry is in the shared Redis, but b has never seen the origin accept A.
    let first = get_as(&b, SECURE, Some("A")).await;
    assert_eq!(header(&first, "x-cache"), "MISS");
    assert_eq!(
        header(&get_as(&b, SECURE, Some("A")).await, "x-cache"),
        "HIT"
    );
    assert_eq!(a.origin.calls(SECURE), 2);
}

#[tokio::test]
async fn warming_counts_for_anonymous_callers_only() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    let warm = app
        .admin(
            Method::POST,
            "/cache/warm",
            Some(json!({"model_run_ids": ["5"]})),
        )
        .await;
    assert_eq!(warm.status(), 200);
    assert!(
        !app.origin.last_headers().contains_key("authorization"),
        "the admin token is never forwarded"
    );
    assert_eq!(
        header(
            &get_as(&app, "/api/v1/models/train/5/metrics", None).await,
            "x-cache"
        ),
        "HIT"
    );
    assert_eq!(
        header(
            &get_as(&app, "/api/v1/models/train/5/metrics", Some("A")).await,
            "x-cache"
        ),
        "MISS"
    );
}

#[tokio::test]
async fn with_auth_none_views_are_public() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| s.auth.frontend = "none".into()).await;
    get_as(&app, SECURE, Some("A")).await;
    let b = get_as(&app, SECURE, Some("B")).await;
    assert_eq!(b.status(), 200);
    assert_eq!(header(&b, "x-cache"), "HIT");
}

/// The memory tier's entry remembers the credential it last found accepted, so one caller's
/// hits skip the lookup (as a near-cache copy does). An acceptance withdrawn while it is
/// remembered (here by a refresh-ahead the origin refuses) is forgotten by the entry too:
/// the caller's next request goes to the origin, not to the entry.
#[tokio::test]
async fn a_withdrawn_acceptance_is_forgotten_by_the_memory_tier_entry() {
    let app = spawn_app_with(None, |s| {
        // Every hit is hot and within its refresh window: each one refreshes in the
        // background with the caller's credentials.
        s.refresh.min_hits = 1;
        s.refresh.ahead_percent = 100;
    })
    .await;
    const HIDDEN: &str = "/api/v1/models/train/hidden/metrics";
    let first = get_as(&app, HIDDEN, Some("A")).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-cache"), "MISS");
    let settled = || async {
        crate::helpers::wait_for(|| async { app.state.tasks.is_empty() }).await;
    };
    let hit = get_as(&app, HIDDEN, Some("A")).await;
    assert_eq!(header(&hit, "x-cache"), "HIT", "remembered from here on");
    settled().await;
    app.origin.hide_from("A");
    // Served from the entry; its refresh is refused, which withdraws A's acceptance.
    let hit = get_as(&app, HIDDEN, Some("A")).await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    settled().await;
    let calls = app.origin.calls(HIDDEN);
    let after = get_as(&app, HIDDEN, Some("A")).await;
    assert_eq!(after.status(), 404, "the origin's answer, not the entry");
    assert_eq!(app.origin.calls(HIDDEN), calls + 1);
}

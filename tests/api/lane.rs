//! The hit lane answers exactly as the full path does. Every request shape (plain,
//! `If-None-Match`, each `Accept-Encoding`, CORS, each `auth.frontend` mode, credentials the
//! origin accepted or not) in every cache state (a near-cache copy, an entry only in Redis,
//! nothing cached, a stale entry) is sent twice from the same state: once through the service
//! that `runcache` serves (the hit lane in front of the router) and once through the router
//! alone. Status, every header but the request id and the date, and the body must be equal.

use std::time::Duration;

use axum::body::Body;
use http::{Request, StatusCode};
use serde_json::json;
use tower::ServiceExt;

use crate::helpers::{TestApp, TestRedis, spawn_app_with, wait_for};

/// What an answer says, minus what differs between any two answers.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: StatusCode,
    headers: Vec<(String, String)>,
    body: bytes::Bytes,
}

async fn answer(resp: axum::response::Response) -> Answer {
    let status = resp.status();
    let mut headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "x-request-id" | "date"))
        .map(|(k, v)| {
            let v = v.to_str().expect("ascii header").to_owned();
            (k.as_str().to_owned(), v)
        })
        .collect();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    // What hyper adds on the wire when a response does not say it itself.
    if !headers.iter().any(|(k, _)| k == "content-length") && status != StatusCode::NOT_MODIFIED {
        headers.push(("content-length".into(), body.len().to_string()));
    }
    headers.sort();
    Answer {
        status,
        headers,
        body,
    }
}

/// `Age` and the `ttl` of `Cache-Status` count whole seconds: two answers a few
/// milliseconds apart may straddle a second. Compared within one second.
fn same(a: &Answer, b: &Answer) -> bool {
    let seconds = |v: &str| -> Option<i64> {
        let digits: String = v
            .split("ttl=")
            .nth(1)
            .unwrap_or(v)
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    a.status == b.status
        && a.body == b.body
        && a.headers.len() == b.headers.len()
        && a.headers
            .iter()
            .zip(&b.headers)
            .all(|((ka, va), (kb, vb))| {
                ka == kb
                    && (va == vb
                        || (matches!(ka.as_str(), "age" | "cache-status")
                            && va.split("ttl=").next() == vb.split("ttl=").next()
                            && seconds(va)
                                .zip(seconds(vb))
                                .is_some_and(|(x, y)| (x - y).abs() <= 1)))
            })
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// A fresh copy in this instance's near cache.
    NearCopy,
    /// A fresh entry in Redis only (the near cache was emptied).
    RedisOnly,
    /// Nothing cached (the run was just invalidated).
    Cold,
    /// Past its TTL, within grace: served stale while one refresh runs.
    Stale,
}

const PATH: &str = "/api/v1/models/train/lane/feature-importance?top_n=5";

fn request(headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = Request::get(PATH);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Body::empty()).expect("request")
}

/// Puts the entry in `state` for a caller sending `headers` (`Stale` is reached for every
/// shape at once by [`compare_stale`]).
async fn prepare(app: &TestApp, state: State, headers: &[(&str, &str)]) {
    // A refresh started by the previous comparison must not land in this one.
    wait_for(|| async { app.state.tasks.is_empty() }).await;
    // Every state starts from a fresh fetch: the entry lives 1 s, and must not age from fresh
    // to stale between the two requests of a comparison.
    let resp = app.event("training-completed", json!("lane")).await;
    assert_eq!(resp.status(), 200);
    match state {
        State::NearCopy => warm(app, headers).await,
        State::RedisOnly => {
            warm(app, headers).await;
            if let Some(near) = app.state.store.near() {
                near.cache.flush();
            }
        }
        State::Cold | State::Stale => {}
    }
}

/// Three reads through the full path: a miss, then hits (a near-cache copy).
async fn warm(app: &TestApp, headers: &[(&str, &str)]) {
    for _ in 0..3 {
        let resp = runcache::build_app(app.state.clone())
            .oneshot(request(headers))
            .await
            .expect("infallible");
        assert!(!resp.status().is_server_error(), "{}", resp.status());
    }
}

async fn through_router(app: &TestApp, headers: &[(&str, &str)]) -> Answer {
    let resp = runcache::build_app(app.state.clone())
        .oneshot(request(headers))
        .await
        .expect("infallible");
    answer(resp).await
}

async fn through_service(app: &TestApp, headers: &[(&str, &str)]) -> Answer {
    let resp = runcache::http::build_service(app.state.clone())
        .oneshot(request(headers))
        .await
        .expect("infallible");
    answer(resp).await
}

fn assert_same(state: State, headers: &[(&str, &str)], full: &Answer, served: &Answer) {
    assert!(
        same(full, served),
        "{state:?} {headers:?}:\nfull path: {full:?}\nserved:    {served:?}"
    );
}

/// Sends `headers` through the router and through the served service, each from `state`.
async fn compare(app: &TestApp, state: State, headers: &[(&str, &str)]) {
    prepare(app, state, headers).await;
    let full = through_router(app, headers).await;
    prepare(app, state, headers).await;
    let served = through_service(app, headers).await;
    assert_same(state, headers, &full, &served);
}

/// The same from a stale entry, for every shape after one wait past the TTL. The origin is
/// slowed meanwhile, so the one refresh the first stale answer starts does not land before
/// the last comparison.
async fn compare_stale(app: &TestApp, shapes: &[&[(&str, &str)]]) {
    prepare(app, State::Stale, &[]).await;
    for shape in shapes {
        warm(app, shape).await;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    app.origin.set_delay(3_000);
    for shape in shapes {
        let full = through_router(app, shape).await;
        let served = through_service(app, shape).await;
        assert_same(State::Stale, shape, &full, &served);
        let x_cache = full.headers.iter().find(|(k, _)| k == "x-cache");
        assert!(
            full.status != StatusCode::OK || x_cache.is_some_and(|(_, v)| v == "STALE"),
            "setup: a stale answer for {shape:?}: {full:?}"
        );
    }
    app.origin.set_delay(0);
}

async fn lane_app(
    redis: &TestRedis,
    tweak: impl FnOnce(&mut runcache::config::Settings),
) -> TestApp {
    let app = spawn_app_with(Some(redis), |s| {
        s.views.feature_importance.ttl = runcache::config::Ttl(Duration::from_secs(1));
        s.views.feature_importance.grace = 60;
        s.refresh.min_hits = 0;
        tweak(s);
    })
    .await;
    wait_for(|| async { app.state.store.near().is_some_and(|n| n.cache.is_live()) }).await;
    app.origin
        .control
        .same_bodies
        .store(true, std::sync::atomic::Ordering::SeqCst);
    app
}

const STATES: [State; 3] = [State::NearCopy, State::RedisOnly, State::Cold];

#[tokio::test]
async fn the_hit_lane_and_the_full_path_answer_alike_in_every_state() {
    let redis = TestRedis::start().await;
    let shapes: [&[(&str, &str)]; 9] = [
        &[],
        &[("if-none-match", "\"nope\"")],
        &[("if-none-match", "*")],
        &[("accept-encoding", "gzip")],
        &[("accept-encoding", "br")],
        &[("accept-encoding", "identity")],
        &[("authorization", "Bearer A")],
        &[("authorization", "Bearer B"), ("accept-encoding", "gzip")],
        &[("x-request-id", "given-id"), ("accept", "application/json")],
    ];
    for (mode, tweak) in [
        (
            "forward",
            (|_: &mut runcache::config::Settings| {}) as fn(&mut _),
        ),
        ("none", |s: &mut runcache::config::Settings| {
            s.auth.frontend = "none".into()
        }),
        ("cors", |s: &mut runcache::config::Settings| {
            s.cors.allowed_origins = vec!["https://app.example".into()];
        }),
    ] {
        let app = lane_app(&redis, tweak).await;
        for state in STATES {
            for shape in shapes {
                compare(&app, state, shape).await;
            }
        }
        compare_stale(&app, &shapes).await;
        let lane_hits = app.state.store.near_counts().lane_hits;
        let lane_served = app
            .state
            .stats
            .lane_served
            .load(std::sync::atomic::Ordering::Relaxed);
        if mode == "cors" {
            assert_eq!(lane_hits, 0, "the lane stays closed with CORS configured");
            assert_eq!(lane_served, 0, "the lane stays closed with CORS configured");
        } else {
            assert!(lane_hits > 0, "{mode}: the lane answered some from copies");
            assert!(
                lane_served > 0,
                "{mode}: the lane served some from Redis, stale or cold"
            );
        }
    }
}

#[tokio::test]
async fn with_jwt_the_hit_lane_steps_aside_and_answers_alike() {
    use jsonwebtoken::{EncodingKey, Header};
    let redis = TestRedis::start().await;
    let app = lane_app(&redis, |s| {
        s.auth.frontend = "jwt".into();
        s.auth.jwt_secret = Some(secrecy::SecretString::from("lane-secret"));
    })
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let jwt = jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": "u", "exp": exp}),
        &EncodingKey::from_secret(b"lane-secret"),
    )
    .expect("encode");
    let bearer = format!("Bearer {jwt}");
    let shapes = [
        &[][..],
        &[("authorization", bearer.as_str())][..],
        &[("authorization", "Bearer not-a-jwt")][..],
    ];
    for state in STATES {
        for shape in shapes {
            compare(&app, state, shape).await;
        }
    }
    compare_stale(&app, &shapes).await;
    assert_eq!(app.state.store.near_counts().lane_hits, 0);
    assert_eq!(
        app.state
            .stats
            .lane_served
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// A failing origin behind a cold entry: the lane's error answer is the full path's (JSON,
/// `Vary` as the compression layer leaves it), and the origin got the request id runcache
/// generated, as it does through the router.
#[tokio::test]
async fn an_origin_failure_is_answered_alike_and_the_origin_gets_the_request_id() {
    let redis = TestRedis::start().await;
    let app = lane_app(&redis, |s| s.auth.frontend = "none".into()).await;
    app.origin.set_fail(500);
    for shape in [&[][..], &[("if-none-match", "*")][..]] {
        compare(&app, State::Cold, shape).await;
    }
    let served = through_service(&app, &[]).await;
    assert_eq!(served.status, StatusCode::BAD_GATEWAY, "{served:?}");
    assert!(
        app.origin.last_headers().contains_key("x-request-id"),
        "the origin got no request id"
    );
    assert!(
        app.state
            .stats
            .lane_served
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

/// With no Redis, the lane answers the memory tier's fresh entries itself, without a task
/// switch: exactly as the full path does in every state, and never once an invalidation was
/// acknowledged.
#[tokio::test]
async fn the_hit_lane_answers_memory_tier_hits_alike_and_never_after_an_invalidation() {
    let app = spawn_app_with(None, |s| {
        s.views.feature_importance.ttl = runcache::config::Ttl(Duration::from_secs(1));
        s.views.feature_importance.grace = 60;
        s.refresh.min_hits = 0;
    })
    .await;
    app.origin
        .control
        .same_bodies
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(app.state.store.near().is_none_or(|n| !n.cache.is_live()));
    let shapes: [&[(&str, &str)]; 4] = [
        &[],
        &[("if-none-match", "*")],
        &[("accept-encoding", "gzip")],
        &[("authorization", "Bearer A")],
    ];
    for state in [State::NearCopy, State::Cold] {
        for shape in shapes {
            compare(&app, state, shape).await;
        }
    }
    compare_stale(&app, &shapes).await;

    // The lane's own entry, on the view's own resolution of the request.
    let (path, query) = PATH.split_once('?').expect("query");
    let def = app
        .state
        .views
        .table()
        .route(&http::Method::GET, path)
        .expect("a view");
    let resolved = def.resolve(path, Some(query), None).expect("resolves");
    let lane_hit = || {
        app.state.views.lane_hit(
            def.view,
            &resolved.key,
            &resolved.tags,
            None,
            |_| true,
            || panic!("no refresh-ahead with refresh.min_hits = 0"),
        )
    };
    prepare(&app, State::NearCopy, &[]).await;
    let hit = lane_hit().expect("a fresh memory-tier entry is answered by the lane");
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    // What an invalidation's bumps do, without its deletes: the entry stays in memory, and
    // its stamp no longer serves.
    use runcache::store::Store as _;
    let deps = app.state.keys.deps("v1", def.view, &resolved.tags, false);
    let bump = runcache::store::Invalidation {
        bump: deps.counters()[1..].to_vec(),
        ..Default::default()
    };
    app.state.store.invalidate(&bump).await.expect("bump");
    assert!(
        lane_hit().is_none(),
        "an entry whose counters moved is never answered by the lane"
    );
    prepare(&app, State::NearCopy, &[]).await;
    assert!(lane_hit().is_some(), "fetched again, it is answered");
    let resp = app.event("training-completed", json!("lane")).await;
    assert_eq!(resp.status(), 200);
    assert!(
        lane_hit().is_none(),
        "an entry invalidated while reads go to memory is never answered by the lane"
    );
    let calls = app
        .origin
        .calls("/api/v1/models/train/lane/feature-importance");
    let after = through_service(&app, &[]).await;
    let x_cache = after.headers.iter().find(|(k, _)| k == "x-cache");
    assert!(x_cache.is_some_and(|(_, v)| v == "MISS"), "{after:?}");
    assert_eq!(
        app.origin
            .calls("/api/v1/models/train/lane/feature-importance"),
        calls + 1
    );
}

/// Answers of `shape` through the lane and through the router, from the same state, and
/// whether the lane answered itself (its counters moved).
async fn lane_and_router(app: &TestApp, shape: &[(&str, &str)]) -> (Answer, Answer, bool) {
    let counted = || {
        let near = app
            .state
            .store
            .near()
            .map_or(0, |n| n.cache.counts().lane_hits);
        near + app
            .state
            .stats
            .lane_served
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let before = counted();
    let served = through_service(app, shape).await;
    let answered = counted() > before;
    let full = through_router(app, shape).await;
    (full, served, answered)
}

/// A request that accepts gzip is answered by the lane itself once the body's gzip copy is
/// kept (a near-cache copy, and a memory-tier entry), exactly as the full path answers it;
/// before that, and for a conditional request or one refusing gzip, the full path answers.
#[tokio::test]
async fn the_hit_lane_sends_kept_gzip_copies_as_the_full_path_does() {
    let redis = TestRedis::start().await;
    for with_redis in [true, false] {
        let app = if with_redis {
            lane_app(&redis, |_| {}).await
        } else {
            spawn_app_with(None, |s| s.refresh.min_hits = 0).await
        };
        app.origin
            .control
            .same_bodies
            .store(true, std::sync::atomic::Ordering::SeqCst);
        app.origin
            .control
            .pad_bytes
            .store(4096, std::sync::atomic::Ordering::SeqCst);
        let gzip: &[(&str, &str)] = &[("accept-encoding", "gzip, deflate, br")];
        // A miss, then hits without Accept-Encoding: no copy is kept yet.
        warm(&app, &[]).await;
        assert!(app.state.precompressed.is_empty());
        let (full, served, answered) = lane_and_router(&app, gzip).await;
        assert!(
            !answered,
            "no copy kept: the full path answers (and makes it)"
        );
        assert_same(State::NearCopy, gzip, &full, &served);
        assert_eq!(app.state.precompressed.len(), 1);
        let (full, served, answered) = lane_and_router(&app, gzip).await;
        assert!(answered, "redis {with_redis}: the lane sends the kept copy");
        assert_same(State::NearCopy, gzip, &full, &served);
        let encoding = served.headers.iter().find(|(k, _)| k == "content-encoding");
        assert_eq!(
            encoding.map(|(_, v)| v.as_str()),
            Some("gzip"),
            "{served:?}"
        );
        let etag = served.headers.iter().find(|(k, _)| k == "etag");
        assert!(etag.is_some_and(|(_, v)| v.starts_with("W/")), "{served:?}");
        let mut plain = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&served.body[..]),
            &mut plain,
        )
        .expect("gunzip");
        assert!(plain.len() > 4096);
        assert_eq!(
            app.state.precompressed.len(),
            1,
            "the copy is not made again"
        );
        for shape in [
            &[("accept-encoding", "gzip"), ("if-none-match", "*")][..],
            &[("accept-encoding", "gzip;q=0, br")],
            &[("accept-encoding", "identity")],
        ] {
            let (full, served, answered) = lane_and_router(&app, shape).await;
            assert!(!answered, "{shape:?} is the full path's");
            assert_same(State::NearCopy, shape, &full, &served);
        }
        // An invalidated entry is never answered from its copy.
        let resp = app.event("training-completed", json!("lane")).await;
        assert_eq!(resp.status(), 200);
        let (_, served, answered) = lane_and_router(&app, gzip).await;
        assert!(!answered);
        let x_cache = served.headers.iter().find(|(k, _)| k == "x-cache");
        assert!(x_cache.is_some_and(|(_, v)| v == "MISS"), "{served:?}");
    }
}

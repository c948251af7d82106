//! A request with two `Authorization` headers (issue 20, defect 9): it was checked as the
//! first one while both went to the origin, so a credential the origin accepted could carry
//! another one past the cache (or the admin check). Every route that reads `Authorization`
//! refuses it with `400 invalid_argument`, before any cache or origin work.

use reqwest::Method;
use serde_json::json;

use crate::helpers::{TOKEN, TestApp, TestRedis, assert_error, header, spawn_app};

const SECURE: &str = "/api/v1/models/train/secure/metrics";

/// `method path` with one `Authorization` line per entry of `auth`.
async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    auth: &[&str],
    body: Option<serde_json::Value>,
) -> reqwest::Response {
    let mut req = app.client.request(method, app.url(path));
    for a in auth {
        req = req.header("authorization", *a);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.expect("request")
}

#[tokio::test]
async fn two_authorization_headers_are_refused_on_every_route_that_reads_it() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    // Token A may read run "secure"; B may not. A's entry is cached, and its hits are fresh
    // in the near cache (the hit lane answers them before routing).
    for expected in ["MISS", "HIT", "HIT"] {
        let resp = send(&app, Method::GET, SECURE, &["Bearer A"], None).await;
        assert_eq!(
            (resp.status().as_u16(), header(&resp, "x-cache")),
            (200, expected)
        );
    }
    let calls = app.origin.total_calls();

    let views = [
        (Method::GET, SECURE.to_owned(), None),
        (Method::GET, format!("{SECURE}?use_cache=true"), None),
        (
            Method::GET,
            "/api/v1/models/train/secure/feature-importance?top_n=3".to_owned(),
            None,
        ),
        (
            Method::POST,
            "/api/v1/models/compare".to_owned(),
            Some(json!({"model_run_ids": ["secure", "7"]})),
        ),
        (
            Method::DELETE,
            "/api/v1/models/train/secure".to_owned(),
            None,
        ),
    ];
    for (method, path, body) in views {
        for pair in [["Bearer A", "Bearer B"], ["Bearer B", "Bearer A"]] {
            let resp = send(&app, method.clone(), &path, &pair, body.clone()).await;
            assert_error(resp, 400, "invalid_argument").await;
        }
    }
    assert_eq!(
        app.origin.total_calls(),
        calls,
        "a request with two credentials reached the origin"
    );

    let admin = format!("Bearer {TOKEN}");
    let routes = [
        (Method::GET, "/cache/stats", None),
        (Method::DELETE, "/cache/clear?pattern=x", None),
        (
            Method::POST,
            "/cache/invalidate",
            Some(json!({"model_run_id": "secure"})),
        ),
        (
            Method::POST,
            "/events/training-completed",
            Some(json!({"model_run_id": "secure"})),
        ),
    ];
    for (method, path, body) in routes {
        for pair in [[admin.as_str(), "Bearer x"], ["Bearer x", admin.as_str()]] {
            let resp = send(&app, method.clone(), path, &pair, body.clone()).await;
            assert_error(resp, 400, "invalid_argument").await;
        }
    }
    // Nothing was invalidated: A's entry is still a HIT.
    let resp = send(&app, Method::GET, SECURE, &["Bearer A"], None).await;
    assert_eq!(header(&resp, "x-cache"), "HIT");
}

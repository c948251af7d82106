//! `server.admin_prefix` in a gateway: runcache's own routes move under the prefix, the
//! origin keeps its paths (the real binary, a real `redis-server`, the origin of
//! `gateway_origin.rs`).

use serde_json::{Value, json};

use crate::gateway::{PASS, client, start, x_cache};
use crate::helpers::{TOKEN, TestRedis, assert_error, header};

#[tokio::test]
async fn the_admin_prefix_moves_runcache_s_routes_out_of_the_origin_s_way() {
    let redis = TestRedis::start().await;
    let prefix = ("RUNCACHE__SERVER__ADMIN_PREFIX", "/_runcache");
    let (bin, origin) = start(&redis, &[PASS, prefix]).await;
    let c = client();
    let resp = c
        .get(bin.url("/_runcache/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"status": "ok"})
    );
    // Ready once its start-up work is done (the harness waited only for an answer on
    // `/health`, which is now the origin's).
    crate::helpers::wait_for(|| async {
        c.get(bin.url("/_runcache/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let resp = c
        .get(bin.url("/health"))
        .send()
        .await
        .expect("origin's health");
    assert_eq!(header(&resp, "x-echo-path"), "/health");
    assert_eq!(
        header(&resp, "cache-status"),
        "runcache; fwd=bypass; detail=pass"
    );

    // Admin routes need the token under the prefix; the old path is the origin's.
    let stats = bin.url("/_runcache/cache/stats");
    assert_error(
        c.get(&stats).send().await.expect("stats"),
        401,
        "unauthorized",
    )
    .await;
    let resp = c
        .get(&stats)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("stats");
    assert_eq!(resp.status(), 200);
    let resp = c
        .get(bin.url("/cache/stats"))
        .send()
        .await
        .expect("origin's");
    assert_eq!(header(&resp, "x-echo-path"), "/cache/stats");
    let resp = c
        .get(bin.url("/_runcache/nope"))
        .send()
        .await
        .expect("nope");
    assert_error(resp, 404, "not_found").await;
    assert_eq!(origin.calls_to("/_runcache/nope"), 0);

    // The views stay on the origin's paths; events move.
    let view = bin.url("/api/v1/models/train/42/metrics");
    assert_eq!(x_cache(&c, &view).await, "MISS");
    assert_eq!(x_cache(&c, &view).await, "HIT");
    let resp = c
        .post(bin.url("/_runcache/events/training-completed"))
        .bearer_auth(TOKEN)
        .json(&json!({"model_run_id": "42"}))
        .send()
        .await
        .expect("event");
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"invalidated": 1})
    );
    assert_eq!(x_cache(&c, &view).await, "MISS");

    // Operations, docs and the dashboard follow the prefix, and the document says so.
    let text = c
        .get(bin.url("/_runcache/metrics"))
        .send()
        .await
        .expect("metrics");
    assert!(text.text().await.expect("text").contains("runcache_"));
    let doc: Value = c
        .get(bin.url("/_runcache/openapi.json"))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    let paths = doc["paths"].as_object().expect("paths");
    for p in [
        "/_runcache/cache/stats",
        "/_runcache/health",
        "/_runcache/events/training-completed",
    ] {
        assert!(paths.contains_key(p), "{p} in the document");
    }
    assert!(paths.contains_key("/api/v1/models/train/{model_run_id}/metrics"));
    assert!(!paths.contains_key("/health") && !paths.contains_key("/cache/stats"));
    let docs = c
        .get(bin.url("/_runcache/docs/"))
        .send()
        .await
        .expect("docs");
    assert_eq!(docs.status(), 200);
    let page = c
        .get(bin.url("/_runcache/dashboard"))
        .send()
        .await
        .expect("dashboard");
    assert_eq!(page.status(), 200);
    let js = c
        .get(bin.url("/_runcache/dashboard/assets/dashboard.js"))
        .send()
        .await;
    assert_eq!(js.expect("asset").status(), 200);
}

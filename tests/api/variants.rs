//! Which requests share a `Vary` variant (issue 20, defect 8), on Redis and on the memory tier.

use serde_json::Value;

use crate::helpers::{TestApp, TestRedis, header, spawn_app_with};

const METRICS: &str = "/api/v1/models/train/7/metrics";

/// Public views that forward `X-Tenant`, in front of an origin whose answers vary on `vary`.
async fn tenant_app(redis: Option<&TestRedis>, vary: &str) -> TestApp {
    let app = spawn_app_with(redis, |s| {
        s.auth.frontend = "none".into();
        s.origin.forward_headers.push("x-tenant".into());
    })
    .await;
    app.origin.set_headers(&[("vary", vary)]);
    app
}

/// `X-Cache` and the origin fetch that made the body, for a read with `header: value`.
async fn read(app: &TestApp, path: &str, name: &str, value: &str) -> (String, u64) {
    let resp = app
        .client
        .get(app.url(path))
        .header(name, value)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let x_cache = header(&resp, "x-cache").to_owned();
    let body: Value = resp.json().await.expect("json");
    (x_cache, body["fetch"].as_u64().expect("fetch"))
}

/// The variant of one value is not given to another that only looks alike: `ACME`, `acme`
/// and `Ac me` each got the body the origin made for `Acme` as a HIT (values were
/// lower-cased and their spaces removed for every header). Accept headers, case-insensitive
/// by definition, still share a variant across case and spacing.
async fn tenants_get_their_own_variants(redis: Option<&TestRedis>) {
    let app = tenant_app(redis, "X-Tenant").await;
    let (x, acme) = read(&app, METRICS, "x-tenant", "Acme").await;
    assert_eq!(x, "MISS");
    assert_eq!(
        read(&app, METRICS, "x-tenant", "Acme").await,
        ("HIT".into(), acme)
    );
    for other in ["ACME", "acme", "Ac me"] {
        let (x, fetch) = read(&app, METRICS, "x-tenant", other).await;
        assert_eq!(
            (x.as_str(), fetch == acme),
            ("MISS", false),
            "{other:?} was given the body made for \"Acme\""
        );
    }
    assert_eq!(
        read(&app, METRICS, "x-tenant", "Acme").await,
        ("HIT".into(), acme)
    );
    // At most the whitespace around commas is collapsed.
    let (x, list) = read(&app, METRICS, "x-tenant", "a,b").await;
    assert_eq!(x, "MISS");
    assert_eq!(
        read(&app, METRICS, "x-tenant", "a , b").await,
        ("HIT".into(), list)
    );

    let app = tenant_app(redis, "Accept").await;
    let (x, json) = read(&app, METRICS, "accept", "application/json").await;
    assert_eq!(x, "MISS");
    assert_eq!(
        read(&app, METRICS, "accept", "Application/JSON").await,
        ("HIT".into(), json)
    );
}

#[tokio::test]
async fn a_variant_goes_only_to_the_same_bytes_on_redis() {
    let redis = TestRedis::start().await;
    tenants_get_their_own_variants(Some(&redis)).await;
}

#[tokio::test]
async fn a_variant_goes_only_to_the_same_bytes_on_the_memory_tier() {
    tenants_get_their_own_variants(None).await;
}

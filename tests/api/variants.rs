//! Which requests share a `Vary` variant (issue 20, defect 8), on Redis and on the memory tier.

use serde_json::Value;

use crate::helpers::{
    TestApp, TestRedis, header, spawn_app_with, spawn_with_settings, test_settings,
};

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

/// Issue 20, item 13b, measured: `Vary: Authorization` variants are keyed by the credential's
/// keyed hash, and that key is per process, so each instance stores its own variant of one
/// user. The bound (`cache.max_variants`, 8) counts the variants listed in the entry's marker,
/// which the instances share through Redis: without the near cache it fills at exactly 8
/// (user, instance) pairs, 8 / instances users. With the near cache, an instance appends to
/// the copy of the marker it holds (up to `l1.max_lifetime_ms` old) and overwrites what
/// another appended meanwhile, so the bound is approximate: at most 8 per instance. Past
/// it, answers are passed through (`too-many-variants`); every HIT is the body fetched for
/// that user on that instance, whatever the count.
#[tokio::test]
async fn vary_authorization_fills_the_variant_bound_per_instance() {
    let redis = TestRedis::start().await;
    for (instances, l1) in [
        (1usize, false),
        (2, false),
        (3, false),
        (2, true),
        (3, true),
    ] {
        let first = spawn_app_with(Some(&redis), |s| s.l1.enabled = l1).await;
        first.origin.set_headers(&[("vary", "Authorization")]);
        let mut apps = vec![first];
        while apps.len() < instances {
            let mut settings = test_settings(&apps[0].origin.url, &redis.url());
            settings.cache.prefix = apps[0].prefix.clone();
            settings.l1.enabled = l1;
            let origin = apps[0].origin.clone();
            apps.push(spawn_with_settings(settings, origin).await);
        }
        let bound = apps[0].state.settings.cache.max_variants;
        let (mut stored, mut fully_cached_users) = (0, 0);
        for user in 0..12 {
            let token = format!("Bearer user-{user}");
            let mut everywhere = true;
            for app in &apps {
                let (x, fetched) = read(app, METRICS, "authorization", &token).await;
                assert_eq!(x, "MISS", "user {user} had not read on this instance");
                let (x, again) = read(app, METRICS, "authorization", &token).await;
                if x == "HIT" {
                    assert_eq!(again, fetched, "a HIT made for another request");
                    stored += 1;
                } else {
                    assert_eq!(x, "MISS");
                    everywhere = false;
                }
            }
            fully_cached_users += usize::from(everywhere);
        }
        let case = format!("{instances} instance(s), near cache {l1}");
        if l1 {
            assert!(
                (bound..=bound * instances).contains(&stored),
                "{case}: {stored}"
            );
        } else {
            assert_eq!(stored, bound, "{case}");
            assert_eq!(fully_cached_users, bound / instances, "{case}");
        }
        let mut refused = 0;
        for app in &apps {
            refused += app.stats().await["stats"]["variants_refused"]
                .as_u64()
                .expect("variants_refused");
        }
        // Both reads of a (user, instance) pair past the bound were passed through.
        assert_eq!(refused as usize, 2 * (12 * instances - stored), "{case}");
    }
}

/// `Vary: Origin` from a CORS middleware (MLflow sends it on every read): runcache does not
/// forward `Origin`, so such an answer is never stored, unless `origin.ignore_vary` says the
/// bodies do not depend on it; then every caller shares one entry, whatever its `Origin`.
#[tokio::test]
async fn a_vary_field_the_operator_ignores_does_not_split_or_refuse_entries() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| s.auth.frontend = "none".into()).await;
    app.origin.set_headers(&[("vary", "Origin")]);
    assert_eq!(
        read(&app, METRICS, "origin", "https://a.example").await.0,
        "MISS"
    );
    let (x, _) = read(&app, METRICS, "origin", "https://a.example").await;
    assert_eq!(x, "MISS", "not stored: Origin is not forwarded");

    let app = spawn_app_with(Some(&redis), |s| {
        s.auth.frontend = "none".into();
        s.origin.ignore_vary = vec!["Origin".into()];
    })
    .await;
    app.origin.set_headers(&[("vary", "Origin")]);
    let (x, first) = read(&app, METRICS, "origin", "https://a.example").await;
    assert_eq!(x, "MISS");
    let (x, again) = read(&app, METRICS, "origin", "https://b.example").await;
    assert_eq!((x.as_str(), again), ("HIT", first));

    let mut s = test_settings(&app.origin.url, &redis.url());
    s.origin.ignore_vary = vec!["Authorization".into()];
    let e = s.validate().expect_err("a credential is never ignored");
    assert!(e.to_string().contains("origin.ignore_vary"), "{e}");
}

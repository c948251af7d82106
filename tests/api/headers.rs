//! What runcache does with the origin's headers: end-to-end ones reach the client on misses
//! and passed-through answers, hop-by-hop ones end at runcache, entries keep the configured
//! representation headers, and a `Set-Cookie` goes to its own requester only.

use crate::helpers::{TestApp, header, spawn_app_with};

const METRICS: &str = "/api/v1/models/train/7/metrics";

/// Views public (`auth.frontend = none`): these tests are about headers, not credentials,
/// and public views share one fetch between concurrent readers.
async fn public_app() -> TestApp {
    spawn_app_with(None, |s| s.auth.frontend = "none".into()).await
}

fn all(resp: &reqwest::Response, name: &str) -> Vec<String> {
    resp.headers()
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("text").to_owned())
        .collect()
}

#[tokio::test]
async fn location_and_retry_after_are_passed_through() {
    let app = public_app().await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    app.origin.set_headers(&[("location", "/login?next=7")]);
    app.origin.set_fail(302);
    let resp = no_redirects
        .get(app.url(METRICS))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 302);
    assert_eq!(header(&resp, "location"), "/login?next=7");

    app.origin.set_headers(&[("retry-after", "7")]);
    app.origin.set_fail(429);
    let resp = app.get(METRICS).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "retry-after"), "7");
}

#[tokio::test]
async fn end_to_end_headers_pass_hop_by_hop_ones_stop_and_entries_keep_the_stored_set() {
    let app = public_app().await;
    app.origin.set_headers(&[
        ("x-origin-trace", "abc"),
        ("content-language", "fr"),
        ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
        ("link", "</api/v1/models/train/7>; rel=\"up\""),
        ("connection", "x-hop"),
        ("x-hop", "named by connection"),
        ("keep-alive", "timeout=5"),
        ("proxy-authenticate", "Basic"),
        ("etag", "\"the-origin's\""),
    ]);
    *app.origin.control.cache_control.lock().expect("lock") = Some("max-age=600".into());

    let miss = app.get(METRICS).await;
    assert_eq!(header(&miss, "x-cache"), "MISS");
    assert_eq!(header(&miss, "x-origin-trace"), "abc");
    assert_eq!(header(&miss, "content-language"), "fr");
    assert_eq!(header(&miss, "cache-control"), "max-age=600");
    for gone in ["x-hop", "keep-alive", "proxy-authenticate"] {
        assert!(
            miss.headers().get(gone).is_none(),
            "{gone} reached the client"
        );
    }
    assert_eq!(all(&miss, "etag").len(), 1, "one ETag: runcache's");
    assert_ne!(header(&miss, "etag"), "\"the-origin's\"");

    let hit = app.get(METRICS).await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    // The stored set (cache.stored_headers), not the rest.
    assert_eq!(header(&hit, "content-language"), "fr");
    assert_eq!(
        header(&hit, "last-modified"),
        "Tue, 01 Dec 2026 10:00:00 GMT"
    );
    assert_eq!(header(&hit, "link"), "</api/v1/models/train/7>; rel=\"up\"");
    assert_eq!(header(&hit, "cache-control"), "max-age=600");
    assert!(hit.headers().get("x-origin-trace").is_none());
    assert!(hit.headers().get("x-hop").is_none());

    // A 304 carries the Cache-Control of the 200 it stands for.
    let etag = header(&hit, "etag").to_owned();
    let not_modified = app
        .client
        .get(app.url(METRICS))
        .header("if-none-match", etag)
        .send()
        .await
        .expect("request");
    assert_eq!(not_modified.status(), 304);
    assert_eq!(header(&not_modified, "cache-control"), "max-age=600");
}

#[tokio::test]
async fn a_set_cookie_answer_goes_to_its_requester_only_and_is_never_stored() {
    let app = public_app().await;
    app.origin
        .set_next_headers(&[("set-cookie", "session=for-the-first-reader; HttpOnly")]);
    let first = app.get(METRICS).await;
    assert_eq!(first.status(), 200);
    assert_eq!(
        all(&first, "set-cookie"),
        ["session=for-the-first-reader; HttpOnly"]
    );
    let status = header(&first, "cache-status");
    assert!(status.contains("set-cookie"), "{status}");

    // Not stored: the second reader is a miss of its own, without the cookie.
    let second = app.get(METRICS).await;
    assert_eq!(header(&second, "x-cache"), "MISS");
    assert!(second.headers().get("set-cookie").is_none());
    assert_eq!(app.origin.calls(METRICS), 2);
    let third = app.get(METRICS).await;
    assert_eq!(header(&third, "x-cache"), "HIT");
    assert!(third.headers().get("set-cookie").is_none());
}

#[tokio::test]
async fn readers_that_joined_a_fetch_whose_answer_set_a_cookie_do_not_get_it() {
    let app = public_app().await;
    app.origin.set_delay(300);
    app.origin
        .set_next_headers(&[("set-cookie", "session=one-reader")]);
    let readers: Vec<_> = (0..5)
        .map(|_| {
            let (client, url) = (app.client.clone(), app.url(METRICS));
            tokio::spawn(async move { client.get(url).send().await.expect("request") })
        })
        .collect();
    let mut with_cookie = 0;
    for r in readers {
        let resp = r.await.expect("reader");
        assert_eq!(resp.status(), 200);
        with_cookie += usize::from(resp.headers().contains_key("set-cookie"));
    }
    assert_eq!(
        with_cookie, 1,
        "the cookie reached readers other than its own"
    );
}

/// An origin whose metrics answers vary on `Accept-Language` (forwarded by default).
fn vary_on_language(app: &TestApp) {
    app.origin
        .control
        .echo_language
        .store(true, std::sync::atomic::Ordering::SeqCst);
    app.origin.set_headers(&[("vary", "Accept-Language")]);
}

async fn in_language(app: &TestApp, path: &str, lang: &str) -> (String, String, String) {
    let resp = app
        .client
        .get(app.url(path))
        .header("accept-language", lang)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let x_cache = header(&resp, "x-cache").to_owned();
    let vary = all(&resp, "vary").join(", ").to_ascii_lowercase();
    let body: serde_json::Value = resp.json().await.expect("json");
    (
        x_cache,
        body["lang"].as_str().unwrap_or("").to_owned(),
        vary,
    )
}

#[tokio::test]
async fn each_language_gets_its_own_variant_and_an_event_drops_them_all() {
    let redis = crate::helpers::TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| s.auth.frontend = "none".into()).await;
    vary_on_language(&app);

    let (x, lang, vary) = in_language(&app, METRICS, "fr").await;
    assert_eq!((x.as_str(), lang.as_str()), ("MISS", "fr"));
    assert!(vary.contains("accept-language"), "{vary}");
    let (x, lang, _) = in_language(&app, METRICS, "en").await;
    assert_eq!(
        (x.as_str(), lang.as_str()),
        ("MISS", "en"),
        "a French body went to an English reader"
    );
    let (x, lang, vary) = in_language(&app, METRICS, "fr").await;
    assert_eq!((x.as_str(), lang.as_str()), ("HIT", "fr"));
    assert!(
        vary.contains("accept-language"),
        "hits say what they vary on: {vary}"
    );
    // Normalised: case and spaces do not make a new variant.
    let (x, lang, _) = in_language(&app, METRICS, " EN").await;
    assert_eq!((x.as_str(), lang.as_str()), ("HIT", "en"));
    assert_eq!(app.origin.calls(METRICS), 2);

    let ev = app
        .event("training-completed", serde_json::json!("7"))
        .await;
    assert_eq!(ev.status(), 200);
    for lang in ["fr", "en"] {
        let (x, got, _) = in_language(&app, METRICS, lang).await;
        assert_eq!(
            (x.as_str(), got.as_str()),
            ("MISS", lang),
            "a variant survived the event"
        );
    }
}

#[tokio::test]
async fn a_key_invalidation_drops_every_variant() {
    let redis = crate::helpers::TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| s.auth.frontend = "none".into()).await;
    vary_on_language(&app);
    for lang in ["fr", "en", "fr", "en"] {
        in_language(&app, METRICS, lang).await;
    }
    assert_eq!(app.origin.calls(METRICS), 2);
    let inv = app
        .admin(
            reqwest::Method::POST,
            "/cache/invalidate",
            Some(serde_json::json!({"keys": ["model:metrics:7"]})),
        )
        .await;
    assert_eq!(inv.status(), 200);
    for lang in ["fr", "en"] {
        let (x, _, _) = in_language(&app, METRICS, lang).await;
        assert_eq!(
            x, "MISS",
            "the {lang} variant survived the key invalidation"
        );
    }
}

#[tokio::test]
async fn vary_star_and_headers_that_are_not_forwarded_are_never_stored() {
    for vary in ["*", "X-Tenant", "Accept-Language, *", "Cookie"] {
        let app = public_app().await;
        app.origin.set_headers(&[("vary", vary)]);
        for _ in 0..2 {
            let resp = app.get(METRICS).await;
            assert_eq!(header(&resp, "x-cache"), "MISS", "Vary: {vary} was stored");
            assert!(header(&resp, "cache-status").contains("vary"));
        }
    }
}

#[tokio::test]
async fn variants_past_the_bound_are_passed_through_and_counted() {
    let app = spawn_app_with(None, |s| {
        s.auth.frontend = "none".into();
        s.cache.max_variants = 2;
    })
    .await;
    vary_on_language(&app);
    for lang in ["fr", "en"] {
        in_language(&app, METRICS, lang).await;
    }
    for _ in 0..2 {
        let (x, lang, _) = in_language(&app, METRICS, "de").await;
        assert_eq!((x.as_str(), lang.as_str()), ("MISS", "de"));
    }
    let (x, _, _) = in_language(&app, METRICS, "fr").await;
    assert_eq!(x, "HIT");
    assert_eq!(app.stats().await["stats"]["variants_refused"], 2);
}

/// `Vary: Authorization` is stored per credential, keyed by the credential's keyed hash: no
/// key in Redis is derived from the token itself.
#[tokio::test]
async fn vary_on_authorization_is_one_variant_per_credential() {
    let redis = crate::helpers::TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |_| {}).await;
    app.origin.set_headers(&[("vary", "Authorization")]);
    let read = |token: &'static str| {
        let (client, url) = (app.client.clone(), app.url(METRICS));
        async move {
            let resp = client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("request");
            assert_eq!(resp.status(), 200);
            header(&resp, "x-cache").to_owned()
        }
    };
    for token in ["token-of-alice", "token-of-bob"] {
        assert_eq!(read(token).await, "MISS");
        assert_eq!(read(token).await, "HIT", "{token}");
    }
    let keys = redis.keys(&format!("{}:*", app.prefix)).await;
    assert_eq!(
        keys.iter().filter(|k| k.contains(":vary-")).count(),
        2,
        "{keys:?}"
    );
    let tag = |t: &str| format!("{:016x}", xxhash_rust::xxh3::xxh3_64(t.as_bytes()));
    for k in &keys {
        assert!(
            !k.contains("alice") && !k.contains(&tag("Bearer token-of-alice")),
            "{k}"
        );
    }
}

#[tokio::test]
async fn vary_accept_encoding_alone_needs_no_variants() {
    let app = public_app().await;
    app.origin.set_headers(&[("vary", "Accept-Encoding")]);
    assert_eq!(header(&app.get(METRICS).await, "x-cache"), "MISS");
    assert_eq!(header(&app.get(METRICS).await, "x-cache"), "HIT");
}

#[tokio::test]
async fn readers_that_joined_the_first_fetch_with_other_values_get_their_own_variant() {
    four_languages_at_once(None).await;
}

/// Review of the Vary fix: an answer that varies but is not stored (here `no-store`) was
/// given to every reader that joined its fetch.
#[tokio::test]
async fn readers_that_joined_an_unstored_varying_answer_get_their_own() {
    four_languages_at_once(Some("no-store")).await;
}

/// An origin's absurd stale window is capped, not a panic that leaves its fetch behind.
#[tokio::test]
async fn an_absurd_stale_window_from_the_origin_is_capped() {
    let app = public_app().await;
    set_cache_control(
        &app,
        "max-age=60, stale-while-revalidate=18446744073709551615",
    );
    for _ in 0..2 {
        assert_eq!(app.get(METRICS).await.status(), 200);
    }
    assert_eq!(header(&app.get(METRICS).await, "x-cache"), "HIT");
}

async fn four_languages_at_once(cache_control: Option<&str>) {
    let app = public_app().await;
    vary_on_language(&app);
    if let Some(cc) = cache_control {
        set_cache_control(&app, cc);
    }
    app.origin.set_delay(300);
    let readers: Vec<_> = ["fr", "en", "de", "fr"]
        .into_iter()
        .map(|lang| {
            let (client, url) = (app.client.clone(), app.url(METRICS));
            tokio::spawn(async move {
                let resp = client
                    .get(url)
                    .header("accept-language", lang)
                    .send()
                    .await
                    .expect("request");
                let body: serde_json::Value = resp.json().await.expect("json");
                (lang, body["lang"].as_str().unwrap_or("").to_owned())
            })
        })
        .collect();
    for r in readers {
        let (asked, got) = r.await.expect("reader");
        assert_eq!(asked, got, "a reader got another language's body");
    }
}

fn set_cache_control(app: &TestApp, cc: &str) {
    *app.origin.control.cache_control.lock().expect("lock") = Some(cc.into());
}

/// Lets an entry stored with `max-age=1` expire.
async fn let_it_expire() {
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
}

#[tokio::test]
async fn must_revalidate_entries_are_never_served_stale_when_the_origin_fails() {
    for (cc, expected) in [
        ("max-age=1, must-revalidate", 502),
        ("max-age=1, proxy-revalidate", 502),
        // The configured stale-if-error (300 s) applies without them.
        ("max-age=1", 200),
    ] {
        let app = spawn_app_with(None, |s| {
            s.auth.frontend = "none".into();
            s.views.metrics.grace = 0;
        })
        .await;
        set_cache_control(&app, cc);
        assert_eq!(app.get(METRICS).await.status(), 200);
        let_it_expire().await;
        app.origin.set_fail(503);
        let resp = app.get(METRICS).await;
        assert_eq!(
            resp.status(),
            expected,
            "Cache-Control: {cc}: {:?}",
            resp.headers()
        );
        if expected == 200 {
            assert_eq!(header(&resp, "x-cache"), "STALE");
        }
    }
}

#[tokio::test]
async fn the_origins_stale_while_revalidate_overrides_the_configured_window() {
    // Configured: no grace; the origin grants 30 s.
    let app = spawn_app_with(None, |s| {
        s.auth.frontend = "none".into();
        s.views.metrics.grace = 0;
    })
    .await;
    set_cache_control(&app, "max-age=1, stale-while-revalidate=30");
    app.get(METRICS).await;
    let_it_expire().await;
    let resp = app.get(METRICS).await;
    assert_eq!(header(&resp, "x-cache"), "STALE");
    assert_eq!(
        header(&resp, "cache-status"),
        "runcache; fwd=stale; hit; detail=memory-fallback"
    );

    // Configured: 60 s of grace; the origin grants none.
    let app = spawn_app_with(None, |s| {
        s.auth.frontend = "none".into();
        s.views.metrics.grace = 60;
        s.views.metrics.stale_if_error = 0;
    })
    .await;
    set_cache_control(&app, "max-age=1, stale-while-revalidate=0");
    app.get(METRICS).await;
    let_it_expire().await;
    assert_eq!(header(&app.get(METRICS).await, "x-cache"), "MISS");
}

#[tokio::test]
async fn s_maxage_wins_over_max_age() {
    let app = public_app().await;
    set_cache_control(&app, "max-age=1, s-maxage=600");
    app.get(METRICS).await;
    let_it_expire().await;
    assert_eq!(header(&app.get(METRICS).await, "x-cache"), "HIT");
}

#[tokio::test]
async fn if_modified_since_is_answered_304_next_to_etags() {
    let app = public_app().await;
    app.origin
        .set_headers(&[("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT")]);
    app.get(METRICS).await;
    let ask = |ims: &'static str| {
        let (client, url) = (app.client.clone(), app.url(METRICS));
        async move {
            client
                .get(url)
                .header("if-modified-since", ims)
                .send()
                .await
                .expect("request")
                .status()
        }
    };
    assert_eq!(ask("Tue, 01 Dec 2026 10:00:00 GMT").await, 304);
    assert_eq!(ask("Wed, 02 Dec 2026 10:00:00 GMT").await, 304);
    assert_eq!(ask("Mon, 30 Nov 2026 10:00:00 GMT").await, 200);
    assert_eq!(ask("not a date").await, 200);
    // If-None-Match decides when both are sent.
    let resp = app
        .client
        .get(app.url(METRICS))
        .header("if-none-match", "\"other\"")
        .header("if-modified-since", "Wed, 02 Dec 2026 10:00:00 GMT")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
}

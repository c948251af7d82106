//! The gateway (SPEC section 9): `gateway.pass_through` streams every request that matches no
//! view and no runcache route to the origin and back unchanged, and `server.admin_prefix`
//! moves runcache's own routes out of the origin's way. Against the real binary (configured
//! through its environment, as an operator does), a real `redis-server`, and an origin of
//! this file's own that records what it is sent.

use std::time::Instant;

use axum::body::Bytes;
use futures_util::StreamExt;
use http::header;
use serde_json::{Value, json};

use crate::gateway_origin::{BIG, Origin, big_stream, check_big, peak_rss, ticks};
use crate::helpers::{Binary, TestRedis, assert_error, header};

/// runcache on `redis` in front of a fresh [`Origin`], with `envs`.
pub async fn start(redis: &TestRedis, envs: &[(&str, &str)]) -> (Binary, Origin) {
    let origin = Origin::start().await;
    let redis_url = redis.url();
    let mut all = vec![("RUNCACHE__REDIS__URL", redis_url.as_str())];
    all.extend_from_slice(envs);
    let bin = Binary::start(&origin.url, &all).await;
    (bin, origin)
}

/// The `X-Cache` of a plain GET of `url`.
pub async fn x_cache(c: &reqwest::Client, url: &str) -> String {
    let resp = c.get(url).send().await.expect("request");
    header(&resp, "x-cache").to_owned()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// A GET of a view that takes no body, sent with one (`Content-Length`, or chunked).
async fn get_with_body(client: &reqwest::Client, url: &str, chunked: bool) -> reqwest::Response {
    let body = if chunked {
        reqwest::Body::wrap_stream(futures_util::stream::iter([Ok::<_, std::io::Error>(
            Bytes::from_static(b"{\"run_id\": \"other\"}"),
        )]))
    } else {
        reqwest::Body::from("{\"run_id\": \"other\"}")
    };
    let mut req = client.get(url).body(body);
    if chunked {
        // hyper sends no body with a GET of unknown length unless told to.
        req = req.header(header::TRANSFER_ENCODING, "chunked");
    }
    req.send().await.expect("request")
}

#[tokio::test]
async fn a_get_view_sent_a_body_is_refused_and_never_answered_from_the_cache() {
    let redis = TestRedis::start().await;
    let (bin, origin) = start(&redis, &[]).await;
    let c = client();
    let url = bin.url("/api/v1/models/train/42/metrics");
    // Cached, and in the near cache: the hit lane would answer it.
    assert_eq!(x_cache(&c, &url).await, "MISS");
    assert_eq!(x_cache(&c, &url).await, "HIT");
    for chunked in [false, true] {
        let resp = get_with_body(&c, &url, chunked).await;
        assert_eq!(header(&resp, "x-cache"), "", "chunked {chunked}");
        let message = assert_error(resp, 400, "invalid_argument").await;
        assert!(message.contains("body"), "{message}");
    }
    let fresh = bin.url("/api/v1/models/train/43/metrics");
    assert_error(
        get_with_body(&c, &fresh, false).await,
        400,
        "invalid_argument",
    )
    .await;
    assert_eq!(origin.calls_to("/api/v1/models/train/43/metrics"), 0);
    assert_eq!(origin.calls_to("/api/v1/models/train/42/metrics"), 1);
}

#[tokio::test]
async fn a_get_view_sent_a_body_with_on_invalid_pass_goes_to_the_origin_uncached() {
    let redis = TestRedis::start().await;
    let (bin, origin) = start(&redis, &[("RUNCACHE__VIEWS__METRICS__ON_INVALID", "pass")]).await;
    let c = client();
    let url = bin.url("/api/v1/models/train/42/metrics");
    assert_eq!(x_cache(&c, &url).await, "MISS");
    assert_eq!(x_cache(&c, &url).await, "HIT");
    for chunked in [false, true] {
        let resp = get_with_body(&c, &url, chunked).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-cache"), "BYPASS", "chunked {chunked}");
        let seen = origin.last();
        assert_eq!(seen.method, "GET");
        assert_eq!(
            &seen.body[..],
            b"{\"run_id\": \"other\"}",
            "chunked {chunked}"
        );
    }
    // A request with a body stores nothing: the next plain GET of another run is a miss.
    let fresh = bin.url("/api/v1/models/train/43/metrics");
    let resp = get_with_body(&c, &fresh, false).await;
    assert_eq!(header(&resp, "x-cache"), "BYPASS");
    assert_eq!(x_cache(&c, &fresh).await, "MISS");
    assert_eq!(origin.calls_to("/api/v1/models/train/42/metrics"), 3);
    assert_eq!(origin.calls_to("/api/v1/models/train/43/metrics"), 2);
}

pub const PASS: (&str, &str) = ("RUNCACHE__GATEWAY__PASS_THROUGH", "true");

/// Every byte value, and a run of text: a body that only comes back whole and in order.
fn odd_body(seed: u8) -> Vec<u8> {
    let mut body: Vec<u8> = (0..=255u8).map(|b| b.wrapping_add(seed)).collect();
    body.extend_from_slice(b"\r\n0\r\n\r\n{\"not\": \"json\"");
    body
}

#[tokio::test]
async fn every_method_passes_through_byte_for_byte_with_its_end_to_end_headers() {
    let redis = TestRedis::start().await;
    let (bin, origin) = start(&redis, &[PASS]).await;
    let c = client();
    let target = "/api/2.0/mlflow/x%2Fy/runs%20search?b=2&a=1&a=%20x&empty=&flag&q=%E2%9C%93";
    for (i, method) in ["GET", "POST", "PUT", "PATCH", "DELETE"]
        .into_iter()
        .enumerate()
    {
        let body = odd_body(i as u8);
        let resp = c
            .request(method.parse().expect("method"), bin.url(target))
            .header(header::AUTHORIZATION, "Bearer user-token")
            .header(header::COOKIE, "session=abc; theme=dark")
            .header("x-mlflow-workspace", "team-a")
            .header(header::CONTENT_TYPE, "application/x-odd")
            .header(header::RANGE, "bytes=0-99")
            .header(header::IF_NONE_MATCH, "\"v1\"")
            .header(header::USER_AGENT, "mlflow-python-client/3.17.2")
            .header(header::ACCEPT_ENCODING, "gzip")
            // Hop-by-hop: none of these may reach the origin.
            .header(header::CONNECTION, "x-hop-req")
            .header("x-hop-req", "named by Connection")
            .header("keep-alive", "timeout=5")
            .header(header::TE, "trailers")
            .header("proxy-authorization", "Basic cHJveHk6c2VjcmV0")
            .header(header::UPGRADE, "h2c")
            .body(body.clone())
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200, "{method}");
        let h = resp.headers().clone();
        let got = resp.bytes().await.expect("body");
        assert_eq!(
            &got[..],
            &body[..],
            "{method}: the answer's body, byte for byte"
        );

        let seen = origin.last();
        assert_eq!(seen.method, method);
        assert_eq!(seen.target, target, "{method}: path and query as sent");
        assert_eq!(
            &seen.body[..],
            &body[..],
            "{method}: the request's body, byte for byte"
        );
        let sent = |name: &str| {
            seen.headers
                .get(name)
                .map(|v| v.to_str().expect("ascii").to_owned())
        };
        for (name, value) in [
            ("authorization", "Bearer user-token"),
            ("cookie", "session=abc; theme=dark"),
            ("x-mlflow-workspace", "team-a"),
            ("content-type", "application/x-odd"),
            ("range", "bytes=0-99"),
            ("if-none-match", "\"v1\""),
            ("user-agent", "mlflow-python-client/3.17.2"),
            ("accept-encoding", "gzip"),
        ] {
            assert_eq!(
                sent(name).as_deref(),
                Some(value),
                "{method}: {name} forwarded"
            );
        }
        assert_eq!(sent("content-length"), Some(body.len().to_string()));
        assert_eq!(
            sent("host").as_deref(),
            Some(origin.host()),
            "Host is the origin's"
        );
        for name in [
            "connection",
            "x-hop-req",
            "keep-alive",
            "te",
            "proxy-authorization",
            "upgrade",
        ] {
            assert_eq!(
                sent(name),
                None,
                "{method}: {name} must not reach the origin"
            );
        }
        assert!(
            sent("x-request-id").is_some(),
            "runcache's request id goes along"
        );

        let answered = |name: &str| {
            h.get_all(name)
                .iter()
                .map(|v| v.to_str().expect("ascii").to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            answered("etag"),
            ["\"origin-etag\""],
            "{method}: a strong ETag stays"
        );
        assert_eq!(answered("set-cookie"), ["a=1; Path=/", "b=2; HttpOnly"]);
        assert_eq!(answered("x-origin"), ["yes"]);
        assert_eq!(answered("cache-control"), ["no-cache"]);
        assert_eq!(answered("content-type"), ["application/octet-stream"]);
        assert_eq!(answered("content-length"), [body.len().to_string()]);
        assert_eq!(
            answered("content-encoding"),
            Vec::<String>::new(),
            "never compressed"
        );
        assert_eq!(answered("x-echo-path"), [target]);
        assert_eq!(
            answered("cache-status"),
            ["runcache; fwd=bypass; detail=pass"]
        );
        assert_eq!(answered("x-cache"), ["BYPASS"]);
        for name in [
            "connection",
            "x-hop-resp",
            "keep-alive",
            "proxy-authenticate",
        ] {
            assert!(
                answered(name).is_empty(),
                "{method}: {name} must not reach the client"
            );
        }
    }
    // A HEAD, and a GET without a body: no body is invented for them.
    let resp = c
        .head(bin.url("/some/file.bin"))
        .send()
        .await
        .expect("head");
    assert_eq!(resp.status(), 200);
    assert_eq!(origin.last().method, "HEAD");
    let resp = c.get(bin.url("/some/file.bin")).send().await.expect("get");
    assert_eq!(resp.status(), 200);
    let seen = origin.last();
    assert!(seen.body.is_empty());
    assert!(seen.headers.get("transfer-encoding").is_none());
    assert!(seen.headers.get("content-length").is_none());
}

#[tokio::test]
async fn origin_errors_and_redirects_pass_through_unchanged() {
    let redis = TestRedis::start().await;
    let (bin, origin) = start(&redis, &[PASS]).await;
    let c = client();
    for code in [404u16, 500, 503, 401] {
        let resp = c
            .post(bin.url(&format!("/status/{code}?x=1")))
            .header(header::ACCEPT_ENCODING, "gzip, br")
            .body("{}")
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), code);
        assert_eq!(header(&resp, "content-type"), "text/plain; charset=utf-8");
        assert_eq!(header(&resp, "x-origin"), "yes");
        assert_eq!(header(&resp, "retry-after"), "7");
        assert_eq!(header(&resp, "content-encoding"), "");
        assert_eq!(
            header(&resp, "cache-status"),
            "runcache; fwd=bypass; detail=pass"
        );
        let body = resp.text().await.expect("body");
        assert_eq!(
            body,
            format!("origin says {code} at 10.1.2.3 ({})", "padding ".repeat(8)),
            "not made a JSON error"
        );
    }
    let resp = c.get(bin.url("/redirect")).send().await.expect("request");
    assert_eq!(resp.status(), 302, "a redirect is passed, not followed");
    assert_eq!(header(&resp, "location"), "/elsewhere?from=redirect");
    assert_eq!(resp.text().await.expect("body"), "moved");
    assert_eq!(origin.calls_to("/elsewhere"), 0);
}

#[tokio::test]
async fn an_origin_that_cannot_be_reached_is_a_json_502() {
    let redis = TestRedis::start().await;
    let closed = format!("http://127.0.0.1:{}", crate::helpers::free_port());
    let redis_url = redis.url();
    let bin = Binary::start(
        &closed,
        &[PASS, ("RUNCACHE__REDIS__URL", redis_url.as_str())],
    )
    .await;
    let resp = client()
        .put(bin.url("/artifacts/model.bin"))
        .body(vec![7u8; 1000])
        .send()
        .await
        .expect("request");
    assert_error(resp, 502, "origin_error").await;
}

#[tokio::test]
async fn a_200_mb_upload_and_download_pass_through_in_bounded_memory() {
    let redis = TestRedis::start().await;
    let (bin, _origin) = start(&redis, &[PASS]).await;
    let c = reqwest::Client::new();
    // Warm: the pools and buffers a first pass-through sets up count in the baseline.
    for _ in 0..3 {
        let resp = c
            .put(bin.url("/warm"))
            .body(vec![1u8; 256 * 1024])
            .send()
            .await;
        assert_eq!(resp.expect("warm").status(), 200);
    }
    let before = peak_rss(bin.pid());

    let started = Instant::now();
    let resp = c
        .put(bin.url("/big/upload"))
        .header(header::CONTENT_LENGTH, BIG)
        .body(reqwest::Body::wrap_stream(big_stream(BIG)))
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    let seen: Value = resp.json().await.expect("json");
    assert_eq!(seen["received"], BIG, "every byte, in order");
    assert_eq!(seen["content_length"], BIG.to_string());
    let upload = started.elapsed();
    let after_upload = peak_rss(bin.pid());

    let started = Instant::now();
    let resp = c
        .get(bin.url("/big/download"))
        .send()
        .await
        .expect("download");
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-length"), BIG.to_string());
    assert_eq!(
        header(&resp, "cache-status"),
        "runcache; fwd=bypass; detail=pass"
    );
    let received = check_big(resp.bytes_stream().boxed()).await;
    assert_eq!(received, BIG, "every byte, in order");
    let download = started.elapsed();
    let after = peak_rss(bin.pid());

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "pass-through of {} MB: runcache's peak RSS (VmHWM) {:.1} MiB before, {:.1} MiB after \
         the upload ({:?}), {:.1} MiB after the download ({:?}): +{:.1} MiB",
        BIG / 1_000_000,
        mib(before),
        mib(after_upload),
        upload,
        mib(after),
        download,
        mib(after - before),
    );
    assert!(
        after - before < 64 * 1024 * 1024,
        "the peak resident set grew by {:.1} MiB",
        mib(after - before)
    );
}

#[tokio::test]
async fn without_pass_through_unknown_routes_are_404_and_405_as_before() {
    let redis = TestRedis::start().await;
    let (bin, origin) = start(&redis, &[]).await;
    let c = client();
    let resp = c
        .get(bin.url("/api/2.0/mlflow/runs/get?run_id=1"))
        .send()
        .await;
    assert_error(resp.expect("request"), 404, "not_found").await;
    let resp = c
        .post(bin.url("/api/v1/models/train/42/metrics"))
        .send()
        .await;
    let resp = resp.expect("request");
    assert_eq!(header(&resp, "allow"), "GET");
    assert_error(resp, 405, "method_not_allowed").await;
    // The run's DELETE is a route; its GET is no view.
    let resp = c.get(bin.url("/api/v1/models/train/42")).send().await;
    assert_error(resp.expect("request"), 405, "method_not_allowed").await;
    // Only runcache's readiness probe (`origin.health_path`) reached the origin.
    assert!(
        origin.seen().iter().all(|s| s.target == "/health"),
        "nothing else reached the origin"
    );
}

#[tokio::test]
async fn with_pass_through_what_is_no_view_reaches_the_origin() {
    let redis = TestRedis::start().await;
    let (bin, origin) = start(&redis, &[PASS]).await;
    let c = client();
    // A view's path with another method, and a route's path with another method.
    let resp = c
        .post(bin.url("/api/v1/models/train/42/metrics"))
        .body("x")
        .send()
        .await;
    assert_eq!(
        header(&resp.expect("request"), "x-echo-path"),
        "/api/v1/models/train/42/metrics"
    );
    assert_eq!(origin.last().method, "POST");
    let resp = c.get(bin.url("/api/v1/models/train/42")).send().await;
    assert_eq!(
        header(&resp.expect("request"), "x-echo-path"),
        "/api/v1/models/train/42"
    );
    // runcache's own paths stay runcache's.
    let resp = c.get(bin.url("/health")).send().await.expect("health");
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"status": "ok"})
    );
    let resp = c.get(bin.url("/cache/nope")).send().await;
    assert_error(resp.expect("request"), 404, "not_found").await;
    let resp = c.post(bin.url("/health")).send().await;
    assert_error(resp.expect("request"), 405, "method_not_allowed").await;
    assert!(
        origin
            .seen()
            .iter()
            .all(|s| s.method == "GET" || s.target != "/health")
    );
    assert_eq!(origin.calls_to("/cache/nope"), 0);
}

#[tokio::test]
async fn time_outs_bound_pauses_not_transfers() {
    let redis = TestRedis::start().await;
    // 500 ms: every pause of either body, and the wait for the answer once the request is sent.
    let (bin, origin) = start(&redis, &[PASS, ("RUNCACHE__ORIGIN__TIMEOUT_MS", "500")]).await;
    let c = client();
    let ms = std::time::Duration::from_millis;
    // Transfers longer than the time-out that never pause that long pass whole.
    let resp = c
        .get(bin.url("/slow/body"))
        .send()
        .await
        .expect("slow body");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("whole body"), "tick\n".repeat(15));
    let resp = c
        .post(bin.url("/slow/upload"))
        .body(reqwest::Body::wrap_stream(ticks(15, ms(100))))
        .send()
        .await
        .expect("slow upload");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("echo"), "tick\n".repeat(15));
    assert_eq!(&origin.last().body[..], "tick\n".repeat(15).as_bytes());
    // An origin that does not answer in time.
    let resp = c
        .get(bin.url("/slow/head"))
        .send()
        .await
        .expect("slow head");
    assert_error(resp, 504, "origin_timeout").await;
    // An answer whose body stops is cut: the client sees it end early.
    let resp = c
        .get(bin.url("/stall/body"))
        .send()
        .await
        .expect("stalled body");
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.is_err(), "a cut body is not a whole one");
    // A client whose body stops.
    let resp = c
        .post(bin.url("/stalled/upload"))
        .body(reqwest::Body::wrap_stream(ticks(2, ms(3000))))
        .send()
        .await
        .expect("stalled upload");
    assert_error(resp, 504, "timeout").await;
}

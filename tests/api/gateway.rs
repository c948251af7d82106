//! The gateway (SPEC section 9): `gateway.pass_through` streams every request that matches no
//! view and no runcache route to the origin and back unchanged, and `server.admin_prefix`
//! moves runcache's own routes out of the origin's way. Against the real binary (configured
//! through its environment, as an operator does), a real `redis-server`, and an origin of
//! this file's own that records what it is sent.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, put};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use crate::helpers::{Binary, TestRedis, assert_error, header};

/// What the origin was sent.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    /// Path and query, as received.
    target: String,
    headers: HeaderMap,
    body: Bytes,
}

/// The origin: every request is recorded; most are echoed.
#[derive(Clone, Default)]
struct Origin {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Origin {
    async fn start() -> (String, Self) {
        let origin = Self::default();
        let app = Router::new()
            .route("/status/{code}", any(status))
            .route("/redirect", any(redirect))
            .route("/big/download", get(download))
            .route("/big/upload", put(upload))
            .fallback(echo)
            .with_state(origin.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind origin");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, origin)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    fn last(&self) -> Seen {
        self.seen().pop().expect("the origin was called")
    }

    fn calls_to(&self, path: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.target.split('?').next() == Some(path))
            .count()
    }

    async fn record(&self, req: Request) -> Seen {
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, 16 * 1024 * 1024)
            .await
            .expect("body");
        let seen = Seen {
            method: parts.method.to_string(),
            target: parts
                .uri
                .path_and_query()
                .map_or_else(String::new, |p| p.as_str().to_owned()),
            headers: parts.headers,
            body,
        };
        self.seen.lock().expect("lock").push(seen.clone());
        seen
    }
}

/// The origin's own headers, end-to-end and hop-by-hop, on every answer of [`echo`].
fn origin_headers(h: &mut HeaderMap) {
    for (name, value) in [
        ("etag", "\"origin-etag\""),
        ("set-cookie", "a=1; Path=/"),
        ("set-cookie", "b=2; HttpOnly"),
        ("x-origin", "yes"),
        ("cache-control", "no-cache"),
        ("connection", "x-hop-resp"),
        ("x-hop-resp", "must not reach the client"),
        ("keep-alive", "timeout=5"),
        ("proxy-authenticate", "Basic"),
    ] {
        h.append(
            http::HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
}

/// Answers the request's body, byte for byte, with [`origin_headers`] and `x-echo-path`;
/// the views' paths (`/api/v1/models/…`) without them, so that their answers may be stored.
async fn echo(State(o): State<Origin>, req: Request) -> Response {
    let seen = o.record(req).await;
    let mut resp = Response::new(Body::from(seen.body.clone()));
    let h = resp.headers_mut();
    if !seen.target.starts_with("/api/v1/models/") {
        origin_headers(h);
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        "x-echo-path",
        HeaderValue::from_str(&seen.target).expect("path"),
    );
    resp
}

/// `/status/{code}`: that status, a text body and a header of the origin's.
async fn status(State(o): State<Origin>, Path(code): Path<u16>, req: Request) -> Response {
    o.record(req).await;
    let status = StatusCode::from_u16(code).expect("status");
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::HeaderName::from_static("x-origin"), "yes"),
            (header::RETRY_AFTER, "7"),
        ],
        format!("origin says {code} at 10.1.2.3"),
    )
        .into_response()
}

async fn redirect(State(o): State<Origin>, req: Request) -> Response {
    o.record(req).await;
    (
        StatusCode::FOUND,
        [(header::LOCATION, "/elsewhere?from=redirect")],
        "moved",
    )
        .into_response()
}

/// The byte at offset `p` of a big body: a period of 251 (a prime, so a lost or repeated
/// chunk of any usual size shows).
const PERIOD: usize = 251;

/// `PERIOD` rounds of the pattern past 1 MiB: any chunk up to 1 MiB is a slice of it.
fn pattern() -> Bytes {
    (0..(1 << 20) + PERIOD).map(|i| (i % PERIOD) as u8).collect()
}

/// `len` bytes of the pattern, in 64 KiB chunks sliced from one buffer (nothing is held).
fn big_stream(len: u64) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let pattern = pattern();
    futures_util::stream::unfold(0u64, move |sent| {
        let pattern = pattern.clone();
        async move {
            if sent >= len {
                return None;
            }
            let n = (len - sent).min(64 * 1024) as usize;
            let at = (sent % PERIOD as u64) as usize;
            Some((Ok(pattern.slice(at..at + n)), sent + n as u64))
        }
    })
}

/// Reads `body` to its end, checking every byte against the pattern; its length.
async fn check_big<S, E>(mut body: S) -> u64
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Debug,
{
    let pattern = pattern();
    let mut at = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("chunk");
        for part in chunk.chunks(1 << 20) {
            let from = (at % PERIOD as u64) as usize;
            assert!(
                part == &pattern[from..from + part.len()],
                "bytes differ at offset {at}"
            );
            at += part.len() as u64;
        }
    }
    at
}

/// 200 MB.
const BIG: u64 = 200 * 1000 * 1000;

async fn download() -> Response {
    let mut resp = Response::new(Body::from_stream(big_stream(BIG)));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(BIG));
    resp
}

async fn upload(headers: HeaderMap, body: Body) -> Response {
    let len = check_big(body.into_data_stream()).await;
    axum::Json(json!({
        "received": len,
        "content_length": headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()),
    }))
    .into_response()
}

/// The peak resident set of process `pid` (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmHWM kB");
    kb * 1024
}

/// runcache on `redis` in front of a fresh [`Origin`], with `envs`.
async fn start(redis: &TestRedis, envs: &[(&str, &str)]) -> (Binary, Origin) {
    let (url, origin) = Origin::start().await;
    let redis_url = redis.url();
    let mut all = vec![("RUNCACHE__REDIS__URL", redis_url.as_str())];
    all.extend_from_slice(envs);
    let bin = Binary::start(&url, &all).await;
    (bin, origin)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// A GET of a view that takes no body, sent with one (`Content-Length`, or chunked).
async fn get_with_body(
    client: &reqwest::Client,
    url: &str,
    chunked: bool,
) -> reqwest::Response {
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
    assert_eq!(header(&c.get(&url).send().await.expect("miss"), "x-cache"), "MISS");
    assert_eq!(header(&c.get(&url).send().await.expect("hit"), "x-cache"), "HIT");
    for chunked in [false, true] {
        let resp = get_with_body(&c, &url, chunked).await;
        assert_eq!(header(&resp, "x-cache"), "", "chunked {chunked}");
        let message = assert_error(resp, 400, "invalid_argument").await;
        assert!(message.contains("body"), "{message}");
    }
    let fresh = bin.url("/api/v1/models/train/43/metrics");
    assert_error(get_with_body(&c, &fresh, false).await, 400, "invalid_argument").await;
    assert_eq!(origin.calls_to("/api/v1/models/train/43/metrics"), 0);
    assert_eq!(origin.calls_to("/api/v1/models/train/42/metrics"), 1);
}

#[tokio::test]
async fn a_get_view_sent_a_body_with_on_invalid_pass_goes_to_the_origin_uncached() {
    let redis = TestRedis::start().await;
    let (bin, origin) = start(&redis, &[("RUNCACHE__VIEWS__METRICS__ON_INVALID", "pass")]).await;
    let c = client();
    let url = bin.url("/api/v1/models/train/42/metrics");
    assert_eq!(header(&c.get(&url).send().await.expect("miss"), "x-cache"), "MISS");
    assert_eq!(header(&c.get(&url).send().await.expect("hit"), "x-cache"), "HIT");
    for chunked in [false, true] {
        let resp = get_with_body(&c, &url, chunked).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-cache"), "BYPASS", "chunked {chunked}");
        let seen = origin.last();
        assert_eq!(seen.method, "GET");
        assert_eq!(&seen.body[..], b"{\"run_id\": \"other\"}", "chunked {chunked}");
    }
    // A request with a body stores nothing: the next plain GET of another run is a miss.
    let fresh = bin.url("/api/v1/models/train/43/metrics");
    let resp = get_with_body(&c, &fresh, false).await;
    assert_eq!(header(&resp, "x-cache"), "BYPASS");
    assert_eq!(header(&c.get(&fresh).send().await.expect("miss"), "x-cache"), "MISS");
    assert_eq!(origin.calls_to("/api/v1/models/train/42/metrics"), 3);
    assert_eq!(origin.calls_to("/api/v1/models/train/43/metrics"), 2);
}

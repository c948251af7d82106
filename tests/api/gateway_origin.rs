//! The origin of the gateway tests (`gateway.rs`): it records every request it is sent and
//! echoes most of them, answers given statuses and a redirect, and sends and takes 200 MB
//! bodies checked byte for byte without holding them.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, put};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::json;

/// What the origin was sent.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query, as received.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The origin: every request is recorded; most are echoed.
#[derive(Clone, Default)]
pub struct Origin {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Origin {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind origin");
        let origin = Self {
            url: format!("http://{}", listener.local_addr().expect("addr")),
            seen: Arc::default(),
        };
        let app = Router::new()
            .route("/status/{code}", any(status))
            .route("/redirect", any(redirect))
            .route("/big/download", get(download))
            .route("/big/upload", put(upload))
            .route("/slow/head", get(slow_head))
            .route("/slow/body", get(slow_body))
            .route("/stall/body", get(stalled_body))
            .fallback(echo)
            .with_state(origin.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        origin
    }

    /// The `Host` it is sent.
    pub fn host(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    pub fn last(&self) -> Seen {
        self.seen().pop().expect("the origin was called")
    }

    pub fn calls_to(&self, path: &str) -> usize {
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

/// `/status/{code}`: that status, a text body (long enough to be compressed, were it not the
/// origin's) and headers of the origin's.
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
        format!("origin says {code} at 10.1.2.3 ({})", "padding ".repeat(8)),
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
    (0..(1 << 20) + PERIOD)
        .map(|i| (i % PERIOD) as u8)
        .collect()
}

/// `len` bytes of the pattern, in 64 KiB chunks sliced from one buffer (nothing is held).
pub fn big_stream(len: u64) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
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
pub async fn check_big<S, E>(mut body: S) -> u64
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
pub const BIG: u64 = 200 * 1000 * 1000;

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
pub fn peak_rss(pid: u32) -> u64 {
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

/// `n` chunks `tick\n`, one every `every`, after a first one sent at once.
pub fn ticks(
    n: usize,
    every: std::time::Duration,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(0, move |i| async move {
        if i == n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(every).await;
        }
        Some((Ok(Bytes::from_static(b"tick\n")), i + 1))
    })
}

/// Answers after 3 s.
async fn slow_head() -> &'static str {
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    "late"
}

/// 15 ticks 100 ms apart: 1.4 s in all, never a pause of more than 100 ms.
async fn slow_body() -> Response {
    Response::new(Body::from_stream(ticks(
        15,
        std::time::Duration::from_millis(100),
    )))
}

/// A tick, then 3 s of silence, then another.
async fn stalled_body() -> Response {
    Response::new(Body::from_stream(ticks(
        2,
        std::time::Duration::from_secs(3),
    )))
}

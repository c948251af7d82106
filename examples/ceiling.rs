//! The framework's ceilings for `bench/run.sh`, on the same tokio runtime runcache uses, with
//! no middleware:
//! - bare: an axum handler answering every GET with one static JSON body;
//! - one GET: the same handler making one `GET` on a multiplexed Redis connection per
//!   request and answering with its value, the least any Redis-backed hit costs.
//!
//! `cargo run --release --example ceiling -- 127.0.0.1:9000 2048 [redis://127.0.0.1:6379]`
//!
//! With `CEILING_BODY=json` the body is a metric history (`{"metrics":[{"key":…},…]}`) of about
//! `size` bytes, which compresses as real answers do; `bench/bodies.py` uses it as both the
//! origin of large bodies and the bare ceiling they are measured against. Without Redis, a
//! request that accepts gzip gets a gzip copy made once at start (`Content-Encoding: gzip`):
//! what the least work to send a compressed answer is.

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9000".to_owned());
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2048);
    let redis_url = args.next();
    let json = std::env::var("CEILING_BODY").as_deref() == Ok("json");
    let body = if json {
        metric_history(size)
    } else {
        // A JSON string of `size` bytes: `"xxxx…"`.
        let mut body = vec![b'x'; size.max(2)];
        body[0] = b'"';
        body[size.max(2) - 1] = b'"';
        Bytes::from(body)
    };
    let app = match redis_url {
        // The bare ceiling: nothing but the answer (its cost is what every runcache tier is
        // measured against, so it reads no header).
        None if !json => Router::new().fallback(get(move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body) }
        })),
        None => {
            let gzipped = gzip(&body)?;
            Router::new().fallback(get(move |req: Request| {
                let accepts_gzip = req
                    .headers()
                    .get(header::ACCEPT_ENCODING)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("gzip"));
                let (body, encoding) = if accepts_gzip {
                    (gzipped.clone(), "gzip")
                } else {
                    (body.clone(), "identity")
                };
                async move {
                    let mut resp =
                        ([(header::CONTENT_TYPE, "application/json")], body).into_response();
                    if encoding == "gzip" {
                        resp.headers_mut()
                            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                    }
                    resp
                }
            }))
        }
        Some(url) => {
            let client = redis::Client::open(url).map_err(std::io::Error::other)?;
            let conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(std::io::Error::other)?;
            let key = "runcache-bench:ceiling";
            let mut setup = conn.clone();
            redis::cmd("SET")
                .arg(key)
                .arg(body.as_ref())
                .query_async::<()>(&mut setup)
                .await
                .map_err(std::io::Error::other)?;
            Router::new().fallback(get(move || {
                let mut conn = conn.clone();
                async move {
                    match redis::cmd("GET")
                        .arg(key)
                        .query_async::<Option<Vec<u8>>>(&mut conn)
                        .await
                    {
                        Ok(Some(value)) => (
                            [(header::CONTENT_TYPE, "application/json")],
                            Bytes::from(value),
                        )
                            .into_response(),
                        _ => StatusCode::BAD_GATEWAY.into_response(),
                    }
                }
            }))
        }
    };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, app).await
}

/// A metric history of about `size` bytes: steps with pseudo-random values (a fixed
/// sequence), so that it compresses about as well as a real one (5 to 6 times).
fn metric_history(size: usize) -> Bytes {
    use std::fmt::Write;
    let mut out = String::with_capacity(size + 128);
    out.push_str(r#"{"metrics":["#);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut step = 0u64;
    while out.len() + 2 < size {
        // xorshift64: deterministic, and as incompressible as measured values.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if step > 0 {
            out.push(',');
        }
        let value = (x % 1_000_000) as f64 / 1_000_000.0;
        let _ = write!(
            out,
            r#"{{"key":"loss","value":{value},"timestamp":{},"step":{step}}}"#,
            1_700_000_000_000u64 + step * 1_000 + x % 1_000
        );
        step += 1;
    }
    out.push_str("]}");
    Bytes::from(out)
}

/// The gzip form of `body`, as runcache makes its copies (default level).
fn gzip(body: &[u8]) -> std::io::Result<Bytes> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body)?;
    Ok(Bytes::from(encoder.finish()?))
}

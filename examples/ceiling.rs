//! The framework's ceilings for `bench/run.sh`, on the same tokio runtime runcache uses, with
//! no middleware:
//! - bare: an axum handler answering every GET with one static JSON body;
//! - one GET: the same handler making one `GET` on a multiplexed Redis connection per
//!   request and answering with its value, the least any Redis-backed hit costs.
//!
//! `cargo run --release --example ceiling -- 127.0.0.1:9000 2048 [redis://127.0.0.1:6379]`

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9000".to_owned());
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2048);
    let redis_url = args.next();
    // A JSON string of `size` bytes: `"xxxx…"`.
    let mut body = vec![b'x'; size.max(2)];
    body[0] = b'"';
    body[size.max(2) - 1] = b'"';
    let body = Bytes::from(body);
    let app = match redis_url {
        None => Router::new().fallback(get(move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body) }
        })),
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

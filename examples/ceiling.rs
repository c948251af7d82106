//! The framework's ceiling for `bench/run.sh`: a bare axum handler answering every GET with
//! one static JSON body, on the same tokio runtime runcache uses, with no middleware.
//!
//! `cargo run --release --example ceiling -- 127.0.0.1:9000 2048`

use axum::Router;
use axum::http::header;
use axum::routing::get;
use bytes::Bytes;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9000".to_owned());
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2048);
    // A JSON string of `size` bytes: `"xxxx…"`.
    let mut body = vec![b'x'; size.max(2)];
    body[0] = b'"';
    body[size.max(2) - 1] = b'"';
    let body = Bytes::from(body);
    let app = Router::new().fallback(get(move || {
        let body = body.clone();
        async move { ([(header::CONTENT_TYPE, "application/json")], body) }
    }));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, app).await
}

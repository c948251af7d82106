//! Accepting connections: a header read time-out, a bound on open connections, and a
//! graceful drain. `axum::serve` sets neither of the first two (hyper's header time-out needs
//! a timer it does not give), so a client that trickles its request head one byte at a time
//! kept its connection for ever.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::{Service, ServiceExt};

/// How connections are held.
#[derive(Debug, Clone, Copy)]
pub struct ConnOptions {
    /// How long a client may take to send a request head, counted from when the connection
    /// opened or finished its previous response (so it is also the keep-alive idle time-out).
    pub header_read_timeout: Duration,
    /// Connections open at once; past it, new ones wait in the listen backlog.
    pub max_connections: usize,
}

/// Serves `make(peer)` on every connection `listener` accepts until `shutdown` resolves; then
/// stops accepting and returns once every open connection has finished its current request
/// (idle ones close at once).
pub async fn serve<F, S>(
    listener: TcpListener,
    make: F,
    opts: ConnOptions,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn(SocketAddr) -> S,
    S: Service<http::Request<Body>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most often: wait rather than spin (as
                    // axum::serve does).
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = make(peer);
        let hyper_service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
            service.clone().oneshot(req.map(Body::new))
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), hyper_service));
        tokio::spawn(async move {
            // A connection's errors (reset, header time-out, bad request) are the client's.
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection closed");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

//! Limits that keep the service up under abuse or overload: header count and size (431),
//! a global concurrency limit with load shedding (503 and `Retry-After`), and a per-client
//! rate limit on admin routes and events (429 and `Retry-After`).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderValue, StatusCode, header};
use tokio::sync::Semaphore;

use crate::error::{codes, error_response};

/// Limit settings, shared by the middleware.
#[derive(Debug)]
pub struct Limits {
    max_headers: usize,
    max_header_bytes: usize,
    inflight: Arc<Semaphore>,
    admin_rate: f64,
    admin_burst: f64,
    buckets: moka::sync::Cache<IpAddr, Arc<Mutex<Bucket>>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Limits {
    /// Limits from settings: header count and bytes, requests in flight, admin requests per
    /// second and burst per client address.
    pub fn new(
        max_headers: usize,
        max_header_bytes: usize,
        max_inflight: usize,
        admin_rate: u32,
        admin_burst: u32,
    ) -> Self {
        Self {
            max_headers,
            max_header_bytes,
            inflight: Arc::new(Semaphore::new(max_inflight.max(1))),
            admin_rate: f64::from(admin_rate.max(1)),
            admin_burst: f64::from(admin_burst.max(1)),
            buckets: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    /// Whether the header section is within `server.max_headers` and
    /// `server.max_header_bytes`.
    pub fn headers_within(&self, headers: &http::HeaderMap) -> bool {
        let header_bytes: usize = headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        headers.len() <= self.max_headers && header_bytes <= self.max_header_bytes
    }

    /// Whether a request may start now without being shed (`server.max_concurrent_requests`).
    pub fn has_room(&self) -> bool {
        self.inflight.available_permits() > 0
    }

    /// Takes one token for `ip`; `Err(wait)` when the bucket is empty.
    fn take(&self, ip: IpAddr) -> Result<(), Duration> {
        let bucket = self.buckets.get_with(ip, || {
            Arc::new(Mutex::new(Bucket {
                tokens: self.admin_burst,
                at: Instant::now(),
            }))
        });
        let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.admin_rate)
            .min(self.admin_burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.admin_rate))
        }
    }
}

fn with_retry_after(mut resp: Response, wait: Duration) -> Response {
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// Whether `path` is an admin route or an event hook.
pub fn is_admin(path: &str) -> bool {
    path.starts_with("/cache/")
        || path.starts_with("/events/")
        || path.starts_with("/api/v1/models/cache/")
}

/// The client address, when the server provides it.
pub fn peer(req_extensions: &http::Extensions) -> Option<SocketAddr> {
    req_extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

/// Refuses oversized header sections, then sheds load past the in-flight limit (health and
/// readiness probes are exempt, so an overloaded instance is not taken for a dead one), then
/// rate-limits admin routes and events per client address.
pub async fn enforce(State(limits): State<Arc<Limits>>, req: Request, next: Next) -> Response {
    if !limits.headers_within(req.headers()) {
        return error_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            codes::HEADERS_TOO_LARGE,
            format!(
                "request headers exceed {} fields or {} bytes",
                limits.max_headers, limits.max_header_bytes
            ),
        );
    }
    let path = req.uri().path();
    let probe = matches!(path, "/health" | "/ready");
    let permit = if probe {
        None
    } else {
        match limits.inflight.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let resp = error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::UNAVAILABLE,
                    "too many requests in flight; retry shortly",
                );
                return with_retry_after(resp, Duration::from_secs(1));
            }
        }
    };
    if is_admin(path) {
        let ip = peer(req.extensions()).map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        if let Err(wait) = limits.take(ip) {
            let resp = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                codes::RATE_LIMITED,
                "too many admin or event requests; retry later",
            );
            return with_retry_after(resp, wait);
        }
    }
    let resp = next.run(req).await;
    drop(permit);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_the_configured_rate() {
        let limits = Limits::new(64, 16_384, 10, 10, 2);
        let ip = IpAddr::from([127, 0, 0, 1]);
        assert!(limits.take(ip).is_ok());
        assert!(limits.take(ip).is_ok());
        let wait = limits.take(ip).expect_err("burst used up");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(
            limits.take(IpAddr::from([127, 0, 0, 2])).is_ok(),
            "per client"
        );
        std::thread::sleep(Duration::from_millis(120));
        assert!(limits.take(ip).is_ok());
    }

    #[test]
    fn admin_paths_are_recognised() {
        assert!(is_admin("/cache/stats"));
        assert!(is_admin("/events/model-deleted"));
        assert!(is_admin("/api/v1/models/cache/clear"));
        assert!(!is_admin("/api/v1/models/compare"));
    }
}

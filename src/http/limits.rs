//! The middleware that applies [`crate::security::Limits`]: header count and size (431), a
//! global concurrency limit with load shedding (503 and `Retry-After`; probes exempt), and
//! per-client rate limits on admin routes and, separately and far higher, on events (429 and
//! `Retry-After`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderValue, StatusCode, header};

use crate::error::{codes, error_response};
use crate::security::limits::rate_class;
use crate::security::{Limits, RateClass};

fn with_retry_after(mut resp: Response, wait: Duration) -> Response {
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// Whether `path` is an admin route or an event hook (both rate-limited).
pub fn is_admin(path: &str) -> bool {
    rate_class(path).is_some()
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
        let (fields, bytes) = limits.header_limits();
        return error_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            codes::HEADERS_TOO_LARGE,
            format!("request headers exceed {fields} fields or {bytes} bytes"),
        );
    }
    // Relative to `server.admin_prefix`: `None` is a path of the origin's.
    let own = limits.own_path(req.uri().path());
    let probe = matches!(own, Some("/health" | "/ready"));
    let permit = if probe {
        None
    } else {
        match limits.admit() {
            Some(p) => Some(p),
            None => {
                let resp = error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::UNAVAILABLE,
                    "too many requests in flight; retry shortly",
                );
                return with_retry_after(resp, Duration::from_secs(1));
            }
        }
    };
    if let Some(class) = own.and_then(rate_class) {
        let ip = peer(req.extensions()).map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        if let Err(wait) = limits.take(class, ip) {
            let what = match class {
                RateClass::Admin => "too many admin requests; retry later",
                RateClass::Event => "too many events; retry later",
            };
            let resp = error_response(StatusCode::TOO_MANY_REQUESTS, codes::RATE_LIMITED, what);
            return with_retry_after(resp, wait);
        }
    }
    let resp = next.run(req).await;
    drop(permit);
    resp
}

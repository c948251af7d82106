//! The client for the backend being cached: reqwest with connect and request time-outs,
//! a bounded response size, and an explicit list of forwarded request headers. The
//! pass-through of everything else, streamed, is [`stream`]'s.

pub mod stream;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};

use crate::config::{OriginSettings, ms};
use crate::domain::headers::{is_hop_by_hop, is_set_by_runcache};

/// What went wrong talking to the origin.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OriginError {
    /// No answer within `origin.timeout_ms`.
    #[error("origin timed out")]
    Timeout,
    /// Connection refused, reset, DNS failure, TLS failure.
    #[error("origin unreachable: {0}")]
    Unreachable(String),
    /// The origin answered with a server error.
    #[error("origin answered {0}")]
    Status(StatusCode),
    /// The body exceeded `origin.max_response_bytes`.
    #[error("origin response exceeds {0} bytes")]
    TooLarge(usize),
}

impl OriginError {
    /// Whether the failure was a time-out (504) rather than an error (502).
    pub fn is_timeout(&self) -> bool {
        matches!(self, OriginError::Timeout)
    }
}

/// A request to send to the origin.
#[derive(Debug, Clone)]
pub struct OriginRequest {
    /// HTTP method.
    pub method: Method,
    /// Path and query, appended to `origin.base_url`; built from validated parts only.
    pub path_and_query: String,
    /// JSON body, if any.
    pub body: Option<Bytes>,
    /// Headers to forward (already filtered by [`OriginClient::forwarded_headers`]).
    pub headers: HeaderMap,
}

/// The origin's answer, fully read.
#[derive(Debug, Clone)]
pub struct OriginResponse {
    /// Status code.
    pub status: StatusCode,
    /// `Content-Type`, passed through unchanged.
    pub content_type: Option<HeaderValue>,
    /// `Cache-Control`, which decides whether and how long to store.
    pub cache_control: Option<String>,
    /// `Vary`, every field line joined, which decides how it is stored.
    pub vary: Option<String>,
    /// The origin's end-to-end headers but those runcache sets itself (see [`end_to_end`]):
    /// what a client is passed when the answer is not served from the cache.
    pub headers: HeaderMap,
    /// The body, byte for byte.
    pub body: Bytes,
}

/// The end-to-end headers of an origin answer: hop-by-hop headers, `Proxy-*`, whatever
/// `Connection` names, and the headers runcache sets itself are dropped; everything else
/// (`Location`, `Retry-After`, `Cache-Control`, `Set-Cookie`, `WWW-Authenticate`, …) is kept.
pub fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    without(headers, is_set_by_runcache)
}

/// `headers` without the hop-by-hop ones (RFC 9110 section 7.6.1): `Connection`,
/// `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, `Proxy-*`, and whatever
/// `Connection` names. What a pass-through forwards, both ways.
pub fn without_hop_by_hop(headers: &HeaderMap) -> HeaderMap {
    without(headers, |_| false)
}

/// `headers` without the hop-by-hop ones and those `also` names (lower case).
fn without(headers: &HeaderMap, also: impl Fn(&str) -> bool) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        if is_hop_by_hop(n) || also(n) || named.iter().any(|c| c == n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// HTTP client for the origin. Cloning shares the connection pool.
#[derive(Debug, Clone)]
pub struct OriginClient {
    client: reqwest::Client,
    base_url: String,
    health_url: String,
    max_body: usize,
    forward: Vec<HeaderName>,
    ignore_vary: Vec<String>,
}

impl OriginClient {
    /// Builds the client from settings (validated beforehand).
    pub fn new(settings: &OriginSettings) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(ms(settings.connect_timeout_ms))
            .timeout(ms(settings.timeout_ms))
            .pool_idle_timeout(ms(settings.pool_idle_timeout_ms))
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("runcache/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let base_url = settings.base_url.trim_end_matches('/').to_owned();
        Ok(Self {
            client,
            health_url: format!("{base_url}{}", settings.health_path),
            base_url,
            max_body: settings.max_response_bytes,
            forward: settings
                .forward_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
                .collect(),
            ignore_vary: settings
                .ignore_vary
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        })
    }

    /// Whether `name` (lower case) is a `Vary` field the origin's bodies never depend on
    /// (`origin.ignore_vary`).
    pub fn ignores_vary(&self, name: &str) -> bool {
        self.ignore_vary.iter().any(|h| h == name)
    }

    /// Whether `name` (lower case) is one of the headers forwarded to the origin.
    pub fn forwards(&self, name: &str) -> bool {
        self.forward.iter().any(|h| h.as_str() == name)
    }

    /// The configured headers of `incoming`, to be forwarded. Walks the request's headers
    /// (a handful) rather than looking each configured name up in them: every view request
    /// builds this, hits included.
    pub fn forwarded_headers(&self, incoming: &HeaderMap) -> HeaderMap {
        forwarded(&self.forward, incoming)
    }

    /// Sends `req` and reads the whole body, refusing bodies above the limit.
    #[tracing::instrument(name = "origin", skip_all, fields(method = %req.method, path = %req.path_and_query))]
    pub async fn send(&self, req: OriginRequest) -> Result<OriginResponse, OriginError> {
        let url = format!("{}{}", self.base_url, req.path_and_query);
        let typed = req.headers.contains_key(header::CONTENT_TYPE);
        let mut builder = self.client.request(req.method, url).headers(req.headers);
        if let Some(body) = req.body {
            // A view's body is JSON it built; a write's keeps the client's content type.
            if !typed {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
            }
            builder = builder.body(body);
        }
        let mut resp = builder.send().await.map_err(map_err)?;
        if resp
            .content_length()
            .is_some_and(|n| n > self.max_body as u64)
        {
            return Err(OriginError::TooLarge(self.max_body));
        }
        let headers = resp.headers();
        let content_type = headers.get(header::CONTENT_TYPE).cloned();
        let passed = end_to_end(headers);
        let cache_control = headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        let vary = headers
            .get_all(header::VARY)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        let status = resp.status();
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(map_err)? {
            if body.len() + chunk.len() > self.max_body {
                return Err(OriginError::TooLarge(self.max_body));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(OriginResponse {
            status,
            content_type,
            cache_control: (!cache_control.is_empty()).then_some(cache_control),
            vary: (!vary.is_empty()).then_some(vary),
            headers: passed,
            body: body.freeze(),
        })
    }

    /// Whether the origin answers HTTP at all on `origin.health_path` (any status counts).
    pub async fn is_reachable(&self, timeout: Duration) -> bool {
        self.client
            .get(&self.health_url)
            .timeout(timeout)
            .send()
            .await
            .is_ok()
    }
}

fn map_err(e: reqwest::Error) -> OriginError {
    if e.is_timeout() {
        OriginError::Timeout
    } else {
        // The reqwest message goes to logs, never to clients; without its URL, which may
        // carry `origin.base_url`'s credentials.
        OriginError::Unreachable(e.without_url().to_string())
    }
}

/// The headers of `incoming` named in `forward`, each with all its values in order.
fn forwarded(forward: &[HeaderName], incoming: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in incoming {
        if forward.contains(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The headers `pairs` name, in order (a name repeated keeps each value).
    fn header_map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_configured_request_headers_are_forwarded_with_every_value() {
        let forward = [
            header::AUTHORIZATION,
            HeaderName::from_static("x-tenant"),
            header::ACCEPT_LANGUAGE,
        ];
        let incoming = header_map(&[
            ("host", "runcache"),
            ("x-tenant", "a"),
            ("authorization", "Bearer t"),
            ("cookie", "s=1"),
            ("x-tenant", "b"),
        ]);
        let out = forwarded(&forward, &incoming);
        assert_eq!(out.len(), 3);
        let tenants: Vec<_> = out.get_all("x-tenant").iter().collect();
        assert_eq!(tenants, ["a", "b"]);
        assert_eq!(out[header::AUTHORIZATION], "Bearer t");
        assert!(!out.contains_key(header::COOKIE) && !out.contains_key(header::HOST));
    }

    #[test]
    fn only_end_to_end_headers_pass() {
        let h = header_map(&[
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("upgrade", "h2c"),
            ("proxy-authenticate", "Basic"),
            ("proxy-foo", "1"),
            ("x-hop", "named by connection"),
            ("content-length", "3"),
            ("etag", "\"origin\""),
            ("date", "Tue, 01 Dec 2026 00:00:00 GMT"),
            ("location", "/elsewhere"),
            ("retry-after", "7"),
            ("cache-control", "private"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("www-authenticate", "Bearer"),
        ]);
        let out = end_to_end(&h);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            [
                "location",
                "retry-after",
                "cache-control",
                "set-cookie",
                "www-authenticate"
            ]
        );
        assert_eq!(out.get_all("set-cookie").iter().count(), 2);

        // A pass-through keeps what runcache would otherwise set itself.
        let passed = without_hop_by_hop(&h);
        let names: Vec<&str> = passed.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            [
                "content-length",
                "etag",
                "date",
                "location",
                "retry-after",
                "cache-control",
                "set-cookie",
                "www-authenticate"
            ]
        );
    }
}

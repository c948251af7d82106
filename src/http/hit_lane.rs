//! The hit lane: plain `GET`s of the views (any `GET` view of the view table) are answered
//! before routing and the middleware stack, which otherwise cost several times the cache lookup
//! itself (see the README's Performance section). A fresh near-cache copy, or a fresh entry of
//! the memory tier while reads go there (no Redis, or its circuit open), is answered at once,
//! without a task switch; any other such request (an entry in Redis, a stale entry, a miss) is
//! served by the same read-through, with what the stack would have given it: its
//! place among the requests in flight, the request time-out, the panic catcher, the request's
//! span and access line, and JSON errors. Everything else, and every request the lane is not
//! certain to answer exactly as the full path would, goes to the router untouched.
//!
//! What the lane keeps from the full path: the same answer and headers (it calls the same
//! read-through and `respond` code), `X-Request-Id` (the client's or a new one), header limits
//! and load shedding (it steps aside so the full path refuses), access control (`forward` and
//! `none`; `jwt` requests take the full path), statistics, refresh-ahead counting, and the
//! access line when `tower_http` logs at `info`. It validates, keys and answers a request
//! exactly as the full path does, because both call the view's one resolver
//! ([`crate::domain::ViewDef::resolve`]) and the same read-through. What makes it step aside:
//! another method, a path of no `GET` view, a request its view refuses (the full path answers
//! the `400`), a request with a body (`Content-Length` or `Transfer-Encoding`: no `GET` view
//! takes one, so the full path refuses it or passes it uncached), an `Accept-Encoding` header
//! (compression is the full path's) unless the request is unconditional, accepts gzip and
//! the entry's gzip copy is already kept (sent as the full path sends it), two
//! `Authorization` headers (the full path refuses them), CORS being configured, or anything
//! but a fresh near-cache or memory-tier hit.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use futures_util::future::{Either, Ready, ready};
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use tower::Service;
use tracing::Instrument;

use super::{FastRequestId, X_REQUEST_ID};
use crate::domain::{FrontendAuth, Resolved};
use crate::error::{AppError, codes, error_response};
use crate::serve::ViewRequest;
use crate::state::AppState;
use dashmap::DashMap;
use std::sync::Arc;

/// Most requests the lane remembers resolving (see [`HitLane::resolve`]); past it, it
/// forgets them all and starts again.
const MAX_RESOLUTIONS: usize = 10_000;

/// A view's index in the table and the request its resolver made of a URI.
type Known = Arc<(usize, Resolved)>;

/// Requests resolved, by URI (see [`HitLane::resolve`]). The hasher is seeded per process
/// (clients choose the URIs, so it must not be predictable) and, unlike SipHash, cheap next
/// to the rest of a near-cache hit.
type Resolutions = DashMap<Box<str>, Known, foldhash::fast::RandomState>;

/// The router, with the hit lane in front of it.
#[derive(Clone)]
pub struct HitLane<S> {
    state: AppState,
    /// Requests resolved, by URI (path and query): a view's resolver is pure, so a URI
    /// resolves the same way every time, and a cache's hot URIs are few. Resolving is most of
    /// what a near-cache hit costs without it.
    resolutions: Arc<Resolutions>,
    ids: FastRequestId,
    open: bool,
    /// The client's address, given to requests that take the full path (the admin rate
    /// limit reads it); the lane itself never needs it, and inserting it costs an allocation.
    peer: Option<ConnectInfo<SocketAddr>>,
    inner: S,
}

impl<S: Clone> HitLane<S> {
    /// The lane of one connection, knowing its peer.
    pub fn for_peer(&self, peer: SocketAddr) -> Self {
        let mut lane = self.clone();
        lane.peer = Some(ConnectInfo(peer));
        lane
    }
}

impl<S> HitLane<S> {
    /// Puts the lane in front of `inner` (the full router). The lane stays closed when CORS
    /// is configured or views are protected by JWTs.
    pub(super) fn new(state: AppState, ids: FastRequestId, inner: S) -> Self {
        let open = state.settings.cors.allowed_origins.is_empty()
            && state.settings.auth.mode() != FrontendAuth::Jwt;
        Self {
            state,
            resolutions: Arc::new(DashMap::with_hasher(foldhash::fast::RandomState::default())),
            ids,
            open,
            peer: None,
            inner,
        }
    }

    /// The view of a `GET` of `uri` and the request its resolver makes of it, remembered by
    /// URI. `None`: no view takes it, or its view refuses it (the full path then answers).
    fn resolve(&self, uri: &Uri) -> Option<Known> {
        let target = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
        if let Some(known) = self.resolutions.get(target) {
            return Some(known.value().clone());
        }
        let def = self.state.views.table().route(&Method::GET, uri.path())?;
        let resolved = def.resolve(uri.path(), uri.query(), None).ok()?;
        let known = Arc::new((def.view.index(), resolved));
        // Keyed by credential per request: nothing to remember.
        if !def.per_credential {
            if self.resolutions.len() >= MAX_RESOLUTIONS {
                self.resolutions.clear();
            }
            self.resolutions.insert(target.into(), known.clone());
        }
        Some(known)
    }

    /// What the lane does with `req`, a `GET` while the lane is open: answers it from a
    /// near-cache copy, serves it on its own (with the permit of its place among the
    /// requests in flight), or leaves it to the router.
    fn route(&self, req: &Request<Body>, heads: Heads) -> Route {
        let headers = req.headers();
        // With `Accept-Encoding`, only an unconditional request that accepts gzip: the lane
        // answers it from a kept gzip copy, or leaves it to the full path (its compression).
        let encoded = heads.accept_encoding;
        if encoded && (heads.conditional || !crate::serve::precompressed::accepts_gzip(headers)) {
            return Route::Pass;
        }
        // Two `Authorization` headers: the full path refuses them (`views::admit`). A body:
        // the full path refuses it, or passes it uncached (`views::declares_body`).
        if heads.declares_body
            || heads.authorizations > 1
            || !self.state.limits.headers_within(headers)
        {
            return Route::Pass;
        }
        // The view's own resolver: what it refuses, the full path refuses (or passes) too.
        let Some(known) = self.resolve(req.uri()) else {
            return Route::Pass;
        };
        let views = &self.state.views;
        let def = &views.table().views()[known.0];
        let mut resolved = std::borrow::Cow::Borrowed(&known.1);
        if def.per_credential {
            views.personalise(def, resolved.to_mut(), headers);
        }
        if resolved.use_cache
            && self.state.limits.has_room()
            && let Some(resp) = self.cached_hit(req, def, &resolved, encoded, &heads)
        {
            return Route::Answered(resp);
        }
        // Anything else that may be compressed is the full path's.
        if encoded {
            return Route::Pass;
        }
        // Past the in-flight limit the full path sheds the request, as it always has.
        match self.state.limits.admit() {
            Some(permit) => Route::Serve(Owned {
                request: ViewRequest::resolved(
                    def,
                    resolved.into_owned(),
                    views.origin().forwarded_headers(headers),
                ),
                permit,
                heads,
            }),
            None => Route::Pass,
        }
    }

    /// A fresh near-cache copy of `resolved`'s entry, or a fresh memory-tier entry when reads
    /// go there, answered; the request the full path would serve is built only if
    /// refresh-ahead needs it. For a request that accepts gzip (`encoded`), only an entry
    /// whose gzip copy is kept, sent as that copy, as the full path sends it.
    fn cached_hit(
        &self,
        req: &Request<Body>,
        def: &crate::domain::ViewDef,
        resolved: &Resolved,
        encoded: bool,
        heads: &Heads,
    ) -> Option<Response> {
        let headers = req.headers();
        let started = Instant::now();
        let views = &self.state.views;
        let mut gzipped = None;
        let accept = |entry: &crate::store::CacheEntry| {
            if !encoded {
                return true;
            }
            gzipped = super::views::kept_gzip(&self.state, entry, headers);
            gzipped.is_some()
        };
        let answer = views.lane_hit(
            def.view,
            &resolved.key,
            &resolved.tags,
            heads.authorization(headers),
            accept,
            || {
                ViewRequest::resolved(
                    def,
                    resolved.clone(),
                    views.origin().forwarded_headers(headers),
                )
            },
        )?;
        let mut resp = super::views::respond_to(answer, heads.conditional(headers), true);
        if let Some(gz) = gzipped {
            // As the full path: the gzip copy, and the weak ETag of a compressed form.
            super::views::send_gzipped(&mut resp, gz);
            resp = super::weaken_etag_when_compressed(resp);
        }
        let request_id = heads.request_id();
        if tracing::enabled!(target: "tower_http::trace::on_response", tracing::Level::INFO) {
            access_line(req, &request_id, &resp, started);
        }
        resp.headers_mut().insert(X_REQUEST_ID, request_id);
        Some(resp)
    }
}

/// What [`HitLane::route`] decided.
// Returned once per request, by value: boxing the request to serve would cost an
// allocation on every Redis hit to save a copy of a few hundred bytes.
#[allow(clippy::large_enum_variant)]
enum Route {
    /// Answered from a near-cache copy.
    Answered(Response),
    /// Served by the lane, asynchronously.
    Serve(Owned),
    /// Left to the router.
    Pass,
}

/// A lane request that outlives the borrow of its request, with its in-flight permit.
struct Owned {
    request: ViewRequest,
    permit: tokio::sync::OwnedSemaphorePermit,
    heads: Heads,
}

/// What the lane needs of a request's headers, from one walk over them (a request has few;
/// looking up each name the lane asks about, most of them absent, cost more than the cache
/// lookup of a hit).
#[derive(Debug, Default)]
struct Heads {
    /// The request's first `X-Request-Id`, or the one the lane gave it.
    request_id: Option<HeaderValue>,
    /// It sent `Accept-Encoding`.
    accept_encoding: bool,
    /// It sent `If-None-Match` or `If-Modified-Since`.
    conditional: bool,
    /// It declares a body, as [`super::views::declares_body`] decides.
    declares_body: bool,
    /// How many `Authorization` headers it sent.
    authorizations: usize,
}

impl Heads {
    fn of(headers: &http::HeaderMap) -> Self {
        let mut heads = Heads::default();
        for (name, value) in headers {
            if name == header::ACCEPT_ENCODING {
                heads.accept_encoding = true;
            } else if name == header::IF_NONE_MATCH || name == header::IF_MODIFIED_SINCE {
                heads.conditional = true;
            } else if name == header::TRANSFER_ENCODING {
                heads.declares_body = true;
            } else if name == header::CONTENT_LENGTH {
                heads.declares_body |= value.as_bytes() != b"0";
            } else if name == header::AUTHORIZATION {
                heads.authorizations += 1;
            } else if name == X_REQUEST_ID && heads.request_id.is_none() {
                heads.request_id = Some(value.clone());
            }
        }
        heads
    }

    /// The request's `X-Request-Id` (the lane gives every request one before routing it).
    fn request_id(&self) -> HeaderValue {
        self.request_id
            .clone()
            .unwrap_or_else(|| HeaderValue::from_static("-"))
    }

    /// The request's `Authorization`, if it sent one.
    fn authorization<'h>(&self, headers: &'h http::HeaderMap) -> Option<&'h HeaderValue> {
        if self.authorizations == 0 {
            return None;
        }
        headers.get(header::AUTHORIZATION)
    }

    /// Its headers, when they make the request conditional (see
    /// [`super::views::respond_to`]).
    fn conditional<'h>(&self, headers: &'h http::HeaderMap) -> Option<&'h http::HeaderMap> {
        self.conditional.then_some(headers)
    }
}

/// Serves `req` as the router and its stack would: the view handler's work (the caller's
/// admission, the read-through, the answer) under the request time-out, in the request's span,
/// with a panic answered `500` and errors as JSON, then the access line and `X-Request-Id`.
async fn serve(state: AppState, req: Request<Body>, lane: Owned) -> Response {
    let started = Instant::now();
    let headers = req.headers();
    let request_id = lane.heads.request_id();
    // The span the router's trace layer opens (disabled, and nearly free, below `info`).
    let id = request_id.to_str().unwrap_or("-");
    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id);
    // Boxed: the read-through's future is several kilobytes, and each wrapper below (the
    // time-out, the span, the panic guard) would otherwise copy all of it when it is built.
    let work = Box::pin(async {
        if let Err(e) = super::views::admit(&state, headers) {
            return e.into_response();
        }
        match state.views.serve(lane.request).await {
            Ok(answer) => super::views::respond_to(answer, lane.heads.conditional(headers), true),
            Err(e) => AppError::from(e).into_response(),
        }
    });
    let limit = Duration::from_millis(state.settings.server.request_timeout_ms);
    // As the router's time-out layer: the deadline is looked at before the work, so an
    // answer that comes at the deadline is a time-out there too.
    let timed = async {
        let deadline = tokio::time::sleep(limit);
        tokio::select! {
            biased;
            () = deadline => None,
            resp = work => Some(resp),
        }
    };
    let guarded = AssertUnwindSafe(timed.instrument(span))
        .catch_unwind()
        .await;
    let mut resp = match guarded {
        Ok(answered) => {
            let resp = answered.unwrap_or_else(|| {
                let mut timed_out = Response::new(Body::empty());
                *timed_out.status_mut() = StatusCode::GATEWAY_TIMEOUT;
                timed_out
            });
            super::weaken_etag_when_compressed(super::json_errors(vary_as_compression_would(resp)))
        }
        Err(_panic) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            codes::INTERNAL,
            "internal error",
        ),
    };
    drop(lane.permit);
    state
        .stats
        .lane_served
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if tracing::enabled!(target: "tower_http::trace::on_response", tracing::Level::INFO) {
        access_line(&req, &request_id, &resp, started);
    }
    resp.headers_mut().insert(X_REQUEST_ID, request_id);
    resp
}

/// What the router's compression layer does to an answer it leaves uncompressed (the lane
/// takes no request with `Accept-Encoding`): one it would have compressed for a client that
/// asked says so in `Vary` (error bodies, for instance; view answers already do).
fn vary_as_compression_would(mut resp: Response) -> Response {
    use tower_http::compression::predicate::{DefaultPredicate, Predicate};
    // Without an allocation: this runs on every answer the lane serves. Looked at first:
    // view answers already say it, and then the predicate (a few hundred instructions) is
    // not asked.
    let varies = resp.headers().get_all(header::VARY).iter().any(|v| {
        v.as_bytes()
            .windows(b"accept-encoding".len())
            .any(|w| w.eq_ignore_ascii_case(b"accept-encoding"))
    });
    if varies {
        return resp;
    }
    let headers = resp.headers();
    let compressible = !headers.contains_key(header::CONTENT_ENCODING)
        && !headers.contains_key(header::CONTENT_RANGE)
        && DefaultPredicate::new().should_compress(&resp);
    if compressible {
        resp.headers_mut()
            .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    resp
}

/// The access line the full path's trace layer writes, in the same span and fields.
fn access_line(req: &Request<Body>, request_id: &HeaderValue, resp: &Response, started: Instant) {
    let id = request_id.to_str().unwrap_or("-");
    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id);
    let _entered = span.enter();
    tracing::info!(
        target: "tower_http::trace::on_response",
        latency = %format_args!("{} ms", started.elapsed().as_millis()),
        status = resp.status().as_u16(),
        "finished processing request"
    );
}

/// The lane's own serving of a request (see [`serve`]).
type Served = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<S> Service<Request<Body>> for HitLane<S>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, Either<Served, S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // As the router's first layer does: the id is in the request before anything else
        // (header limits count it, and a fetch forwards it to the origin). The walk over the
        // headers is for requests the lane may take; any other only needs the id.
        let route = if self.open && req.method() == Method::GET {
            let mut heads = Heads::of(req.headers());
            if heads.request_id.is_none() {
                let id = self.ids.next();
                req.headers_mut().insert(X_REQUEST_ID, id.clone());
                heads.request_id = Some(id);
            }
            self.route(&req, heads)
        } else {
            if !req.headers().contains_key(X_REQUEST_ID) {
                req.headers_mut().insert(X_REQUEST_ID, self.ids.next());
            }
            Route::Pass
        };
        match route {
            Route::Answered(resp) => Either::Left(ready(Ok(resp))),
            Route::Serve(lane) => {
                let served = serve(self.state.clone(), req, lane);
                Either::Right(Either::Left(Box::pin(served.map(Ok))))
            }
            Route::Pass => {
                if let Some(peer) = self.peer {
                    req.extensions_mut().insert(peer);
                }
                Either::Right(Either::Right(self.inner.call(req)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads(pairs: &[(&'static str, &'static str)]) -> Heads {
        let mut headers = http::HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        Heads::of(&headers)
    }

    #[test]
    fn one_walk_finds_what_the_lookups_found() {
        let plain = heads(&[("host", "h"), ("content-length", "0")]);
        assert!(!plain.accept_encoding && !plain.conditional && !plain.declares_body);
        assert_eq!((plain.authorizations, plain.request_id), (0, None));

        let all = heads(&[
            ("accept-encoding", "gzip"),
            ("if-modified-since", "Sun, 06 Dec 2026 10:00:00 GMT"),
            ("authorization", "Bearer a"),
            ("authorization", "Bearer b"),
            ("x-request-id", "first"),
            ("x-request-id", "second"),
            ("content-length", "0"),
            ("content-length", "3"),
        ]);
        assert!(all.accept_encoding && all.conditional && all.declares_body);
        assert_eq!(all.authorizations, 2);
        assert_eq!(all.request_id(), "first");

        assert!(heads(&[("if-none-match", "\"x\"")]).conditional);
        assert!(heads(&[("transfer-encoding", "chunked")]).declares_body);
        assert_eq!(heads(&[]).request_id(), "-");
    }
}

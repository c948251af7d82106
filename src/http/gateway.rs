//! The gateway's pass-through (`gateway.pass_through`, SPEC section 9): a request that matches
//! no view and no route of runcache's goes to the origin as it came (method, path, query,
//! body, end-to-end headers), and the origin's answer comes back as it went, both streamed
//! ([`crate::origin::stream`]). The answer says so: `X-Cache: BYPASS` and
//! `Cache-Status: runcache; fwd=bypass; detail=pass`; it is marked as the origin's, so the
//! layer stack neither turns its errors into JSON nor compresses it nor weakens its `ETag`.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, StatusCode};
use tower_http::compression::predicate::Predicate;

use super::{OriginAnswer, views};
use crate::error::{AppError, codes, error_response};
use crate::origin::stream::PassError;
use crate::state::AppState;

/// Marks a passed-through answer: its body and headers are the origin's and must reach the
/// client as they are (see `http::edge` and the compression predicate).
#[derive(Debug, Clone, Copy)]
pub struct PassedThrough;

/// Compression leaves a passed-through answer alone: its body is the origin's, byte for byte.
#[derive(Debug, Clone, Copy)]
pub(super) struct NotPassedThrough;

impl Predicate for NotPassedThrough {
    fn should_compress<B: http_body::Body>(&self, response: &http::Response<B>) -> bool {
        response.extensions().get::<PassedThrough>().is_none()
    }
}

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Whether `path` may be passed through: the gateway is on and the path is not under
/// runcache's own routes (`server.admin_prefix`, or SPEC section 1's paths without one).
pub(super) fn passes(state: &AppState, path: &str) -> bool {
    state.gateway.is_some() && !state.prefix.owns(path)
}

/// Streams `req` to the origin and its answer back. Without a gateway, a `404`.
pub(super) async fn pass(state: &AppState, req: Request) -> Response {
    let Some(client) = &state.gateway else {
        return error_response(StatusCode::NOT_FOUND, codes::NOT_FOUND, "no such route");
    };
    let (parts, body) = req.into_parts();
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let body = views::declares_body(&parts.headers).then(|| body.into_data_stream());
    match client
        .send(parts.method, target, &parts.headers, body)
        .await
    {
        Ok(answer) => {
            let mut resp = Response::new(Body::from_stream(answer.body));
            *resp.status_mut() = answer.status;
            *resp.headers_mut() = answer.headers;
            let h = resp.headers_mut();
            h.insert(X_CACHE, HeaderValue::from_static("BYPASS"));
            // A list (RFC 9211): a cache in front of the origin keeps its own member.
            h.append(
                CACHE_STATUS,
                HeaderValue::from_static("runcache; fwd=bypass; detail=pass"),
            );
            resp.extensions_mut().insert(OriginAnswer);
            resp.extensions_mut().insert(PassedThrough);
            resp
        }
        Err(PassError::Origin(e)) => AppError::from(e).into_response(),
        Err(PassError::ClientStalled) => {
            // What the request time-out gives a request that takes too long (see `json_errors`).
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = StatusCode::GATEWAY_TIMEOUT;
            resp
        }
    }
}

/// The router's answer to a path it has with a method it has not: passed through when the
/// path is the origin's (the `DELETE` of a run has a `GET` at the origin), a `405` otherwise.
pub(super) async fn method_not_allowed(State(state): State<AppState>, req: Request) -> Response {
    if passes(&state, req.uri().path()) {
        return pass(&state, req).await;
    }
    super::method_not_allowed().await
}

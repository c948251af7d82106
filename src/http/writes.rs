//! Writes of the `[invalidate.*]` rules (SPEC section 9), served by the router's fallback:
//! the write goes to the origin, and what it changed is invalidated before its answer is
//! returned, so that every read that starts after the answer, on any instance, sees it.
//!
//! - A `2xx` invalidates the rule's tags over the write's path, query, body and answer.
//! - A `4xx` invalidates nothing: the origin refused the write.
//! - Any other outcome (a `5xx`, a `3xx`, a time-out, a connection lost) may have changed
//!   the data: it invalidates as if the write had succeeded, without an answer to read (the
//!   rule's `otherwise` stands in for what the answer would have named). An extra
//!   invalidation is always safe; a missed one is not.
//!
//! The origin's answer is passed through unchanged (status, end-to-end headers, body), with
//! `X-Invalidated` (entries dropped) and `Cache-Status: runcache; fwd=bypass; detail=pass`.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, header};
use serde_json::Value;

use super::{OriginAnswer, RawBody};
use crate::domain::lookup::Source;
use crate::domain::template::Inputs;
use crate::domain::{Invalidates, WriteRule, write_rule};
use crate::error::{AppError, Result};
use crate::invalidation::Cause;
use crate::origin::{OriginRequest, OriginResponse, end_to_end};
use crate::state::AppState;

const X_INVALIDATED: HeaderName = HeaderName::from_static("x-invalidated");
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// The request headers a write carries to the origin: every end-to-end header but `Host`
/// (the origin's own) and `Content-Length` (the client sets it for the body it sends).
fn forwarded(headers: &HeaderMap) -> HeaderMap {
    let mut out = end_to_end(headers);
    out.remove(header::HOST);
    out.remove(header::CONTENT_LENGTH);
    out
}

/// Serves a write of `rule` (see the module's documentation).
pub(super) async fn serve(state: &AppState, rule: &WriteRule, req: Request) -> Result<Response> {
    let params = match rule.captures(req.uri().path()) {
        Some(Ok(params)) => params,
        Some(Err(why)) => return Err(AppError::InvalidArgument(why)),
        None => return Err(AppError::NotFound("no such route".into())),
    };
    // Forwarded to the origin, whose answer decides the invalidation: one credential only.
    super::views::one_authorization(req.headers())?;
    // A starting instance could not invalidate behind the origin's write (see
    // `Invalidator::new`): nothing is sent to the origin until it can.
    state.invalidator.ready()?;
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let query = write_rule::query_map(req.uri().query());
    let headers = forwarded(req.headers());
    let method = req.method().clone();
    let body = RawBody::from_request(req, state).await?.0;
    let source = Source::Rule(rule.name.clone());
    let lookups = state.views.lookups();
    let learns = lookups.learns_from(&source);
    let json_body: Option<Value> = if rule.reads_body || learns {
        serde_json::from_slice(&body).ok()
    } else {
        None
    };
    let sent = state
        .views
        .origin()
        .send(OriginRequest {
            method,
            path_and_query,
            body: (!body.is_empty()).then_some(body),
            headers,
        })
        .await;
    let answer: Option<Value> = match &sent {
        Ok(resp) if (rule.reads_response || learns) && resp.status.is_success() => {
            serde_json::from_slice(&resp.body).ok()
        }
        _ => None,
    };
    let mut inputs = Inputs {
        params: &params,
        query: &query,
        body: json_body.as_ref(),
        response: answer.as_ref(),
        lookups: None,
    };
    if learns && answer.is_some() {
        lookups.learn(&source, &inputs);
    }
    let wanted = rule.lookups(&inputs);
    let found = if wanted.is_empty() {
        None
    } else {
        Some(lookups.find(&wanted).await)
    };
    inputs.lookups = found.as_ref();
    let invalidates = match &sent {
        Ok(resp) if resp.status.is_success() => Some(rule.invalidates(&inputs)),
        Ok(resp) if resp.status.is_client_error() => None,
        _ => Some(rule.invalidates_without_answer(&inputs)),
    };
    let invalidated = match invalidates {
        Some(what) => Some(invalidate(state, rule, &what).await),
        None => None,
    };
    let resp = sent?;
    Ok(passed(resp, invalidated.flatten()))
}

/// Applies `what`; the entries dropped, or `None` if it failed. The origin has applied the
/// write (or may have): failing the request now would invite a retry of a write that
/// succeeded, so a failure is logged and counted, not returned. An invalidation fails only
/// when neither Redis nor the fallback could take it (see `Invalidator`).
async fn invalidate(state: &AppState, rule: &WriteRule, what: &Invalidates) -> Option<u64> {
    let mut total = 0;
    if !what.tags.is_empty() {
        match state.invalidator.tags(&what.tags, Cause::Write).await {
            Ok(n) => total += n,
            Err(e) => {
                tracing::error!(rule = %rule.name, tags = ?what.tags, error = %e, "invalidation after a write failed");
                return None;
            }
        }
    }
    if !what.views.is_empty() {
        match state
            .invalidator
            .namespaces(&what.views, Cause::Write)
            .await
        {
            Ok(n) => total += n,
            Err(e) => {
                tracing::error!(rule = %rule.name, error = %e, "invalidation after a write failed");
                return None;
            }
        }
    }
    Some(total)
}

/// The origin's answer as the client gets it.
fn passed(resp: OriginResponse, invalidated: Option<u64>) -> Response {
    let mut out = HeaderMap::new();
    if let Some(ct) = resp.content_type {
        out.insert(header::CONTENT_TYPE, ct);
    }
    out.extend(resp.headers);
    if let Some(n) = invalidated {
        out.insert(X_INVALIDATED, HeaderValue::from(n));
    }
    out.insert(
        CACHE_STATUS,
        HeaderValue::from_static("runcache; fwd=bypass; detail=pass"),
    );
    let status = resp.status;
    let mut response = (status, out, Body::from(resp.body)).into_response();
    response.extensions_mut().insert(OriginAnswer);
    response
}

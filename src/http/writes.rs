//! Writes of the `[invalidate.*]` rules (SPEC section 9), served by the router's fallback:
//! the write goes to the origin, and what it changed is invalidated before its answer is
//! returned, so that every read that starts after the answer, on any instance, sees it.
//!
//! - A `2xx` invalidates the tags of every rule the write matches, over its path, query,
//!   body and answer.
//! - A `4xx` invalidates nothing: the origin refused the write.
//! - Any other outcome (a `5xx`, a `3xx`, a time-out, a connection lost) may have changed
//!   the data: it invalidates as if the write had succeeded, without an answer to read (the
//!   rules' `otherwise` stands in for what the answer would have named). An extra
//!   invalidation is always safe; a missed one is not.
//!
//! The write is sent and its invalidation applied in a task of its own, so that a client
//! that goes away once the request is sent cannot cancel the invalidation. Bodies are
//! streamed both ways, unless a rule reads them (JSON, read whole up to [`READ_LIMIT`]).
//! The origin's answer is passed through (status, end-to-end headers, body), with
//! `X-Invalidated` (entries dropped) and `Cache-Status: runcache; fwd=bypass; detail=pass`;
//! without `gateway.pass_through`, an origin `5xx` is a `502` with runcache's JSON error, as
//! for views (SPEC section 1).

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{Map, Value};

use super::OriginAnswer;
use crate::domain::lookup::Source;
use crate::domain::template::Inputs;
use crate::domain::{Invalidates, WriteRule, write_rule};
use crate::error::{AppError, Result, codes, error_response};
use crate::invalidation::Cause;
use crate::origin::OriginError;
use crate::origin::stream::{BodyStream, PassError};
use crate::state::AppState;

const X_INVALIDATED: HeaderName = HeaderName::from_static("x-invalidated");
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Largest request body or answer a rule reads (as JSON) to name its tags; a larger answer
/// is passed on unread, and its rules' `otherwise` stands in. A larger request body is a
/// `413`: it is not sent.
pub(super) const READ_LIMIT: usize = 16 * 1024 * 1024;

/// What one rule of a write names, with the path parameters it captured.
struct Matched {
    rule: WriteRule,
    params: Map<String, Value>,
}

/// Serves a write of `rules` (every rule matching it, the most specific first; `path` is
/// the path they matched, percent-decoded if that is how they matched it).
pub(super) async fn serve(
    state: &AppState,
    rules: Vec<WriteRule>,
    path: &str,
    req: Request,
) -> Result<Response> {
    let mut matched = Vec::with_capacity(rules.len());
    for (i, rule) in rules.into_iter().enumerate() {
        match rule.captures(path) {
            Some(Ok(params)) => matched.push(Matched { rule, params }),
            // The most specific rule's validators decide (a `400`, never sent).
            Some(Err(why)) if i == 0 => return Err(AppError::InvalidArgument(why)),
            // Another rule's parameters it cannot read: its templates over them name
            // nothing, and its `otherwise` stands in (every view, for a rule without one).
            _ => matched.push(Matched {
                rule,
                params: Map::new(),
            }),
        }
    }
    // Forwarded to the origin, whose answer decides the invalidation: one credential only.
    super::views::one_authorization(req.headers())?;
    // A starting instance could not invalidate behind the origin's write (see
    // `Invalidator::new`): nothing is sent to the origin until it can.
    state.invalidator.ready()?;
    let lookups = state.views.lookups();
    let learns = matched
        .iter()
        .any(|m| lookups.learns_from(&Source::Rule(m.rule.name.clone())));
    let reads_body = learns || matched.iter().any(|m| m.rule.reads_body);
    let reads_answer = learns || matched.iter().any(|m| m.rule.reads_response);

    let (parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    let query = write_rule::query_map(parts.uri.query());
    let sends_body = super::views::declares_body(&parts.headers);
    let (upload, json_body): (Option<BodyStream>, Option<Value>) = if reads_body && sends_body {
        let bytes = axum::body::to_bytes(body, READ_LIMIT).await.map_err(|e| {
            // Only a body over the limit is too large; one the client stopped sending is not.
            if e.into_inner().is::<http_body_util::LengthLimitError>() {
                AppError::PayloadTooLarge(format!(
                    "a write whose tags are in its body is read whole, up to {READ_LIMIT} bytes"
                ))
            } else {
                AppError::InvalidArgument("the request body could not be read".into())
            }
        })?;
        let json = read_json(&bytes);
        let once: BodyStream = Box::pin(futures_util::stream::once(async move { Ok(bytes) }));
        (Some(once), json)
    } else if sends_body {
        let stream: BodyStream = Box::pin(
            body.into_data_stream()
                .map(|r| r.map_err(|e| Box::new(e) as crate::origin::stream::BoxError)),
        );
        (Some(stream), None)
    } else {
        (None, None)
    };

    // In a task of its own: a client gone once the request is sent does not cancel it.
    let task_state = state.clone();
    let headers = parts.headers.clone();
    let method = parts.method.clone();
    let work = tokio::spawn(async move {
        let state = task_state;
        let sent = state.writes.send(method, &target, &headers, upload).await;
        let (sent, answer, unread) = match sent {
            Ok(streamed) if reads_answer && streamed.status.is_success() => {
                let (answer, rest) = read_answer(streamed.body).await;
                (Ok((streamed.status, streamed.headers)), answer, Some(rest))
            }
            Ok(streamed) => (
                Ok((streamed.status, streamed.headers)),
                None,
                Some(streamed.body),
            ),
            Err(e) => (Err(e), None, None),
        };
        let outcome = match &sent {
            Ok((status, _)) if status.is_success() => Outcome::Applied,
            Ok((status, _)) if status.is_client_error() => Outcome::Refused,
            _ => Outcome::Unknown,
        };
        let invalidated = invalidate_all(
            &state,
            &matched,
            &query,
            json_body.as_ref(),
            answer.as_ref(),
            outcome,
        )
        .await;
        (sent, unread, invalidated)
    });
    let (sent, body, invalidated) = work
        .await
        .map_err(|e| AppError::Internal(anyhow::anyhow!("a write's task failed: {e}")))?;
    let invalidated = match invalidated {
        Ok(n) => n,
        Err(failed) => return Ok(failed),
    };
    let (status, headers) = match sent {
        Ok(head) => head,
        Err(PassError::Origin(e)) => return Err(e.into()),
        Err(PassError::ClientStalled) => {
            return Err(AppError::Origin(OriginError::Timeout));
        }
    };
    if status.is_server_error() && state.gateway.is_none() {
        return Err(OriginError::Status(status).into());
    }
    Ok(passed(status, headers, body, invalidated))
}

/// How the origin took a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A `2xx`.
    Applied,
    /// A `4xx`: nothing changed.
    Refused,
    /// Anything else: it may have changed.
    Unknown,
}

/// A body as a rule reads it: JSON, or a JSON string holding JSON (older MLflow clients
/// encode their bodies twice, and MLflow decodes them a second time).
fn read_json(bytes: &[u8]) -> Option<Value> {
    match serde_json::from_slice::<Value>(bytes).ok()? {
        Value::String(inner) => serde_json::from_str(&inner).ok(),
        other => Some(other),
    }
}

/// Reads up to [`READ_LIMIT`] of an answer: the JSON it holds, if it was read whole, and the
/// body to pass on (what was read, then the rest).
async fn read_answer(mut body: BodyStream) -> (Option<Value>, BodyStream) {
    let mut read = BytesMut::new();
    loop {
        match body.next().await {
            Some(Ok(chunk)) => {
                read.extend_from_slice(&chunk);
                if read.len() > READ_LIMIT {
                    let head: BodyStream = Box::pin(futures_util::stream::once({
                        let read = read.freeze();
                        async move { Ok(read) }
                    }));
                    return (None, Box::pin(head.chain(body)));
                }
            }
            Some(Err(e)) => {
                let read = read.freeze();
                let failed: BodyStream = Box::pin(futures_util::stream::iter([Ok(read), Err(e)]));
                return (None, failed);
            }
            None => break,
        }
    }
    let read: Bytes = read.freeze();
    let json = serde_json::from_slice(&read).ok();
    (
        json,
        Box::pin(futures_util::stream::once(async move { Ok(read) })),
    )
}

/// Applies what the write's rules name for `outcome`, and teaches the lookup tables what a
/// `2xx` answer shows. The entries dropped; or, if the invalidation failed, the answer the
/// client gets instead of the origin's.
async fn invalidate_all(
    state: &AppState,
    matched: &[Matched],
    query: &Map<String, Value>,
    body: Option<&Value>,
    answer: Option<&Value>,
    outcome: Outcome,
) -> std::result::Result<Option<u64>, Response> {
    if outcome == Outcome::Refused {
        return Ok(None);
    }
    let lookups = state.views.lookups();
    let mut what = Invalidates::default();
    for m in matched {
        let mut inputs = Inputs {
            params: &m.params,
            query,
            body,
            response: if outcome == Outcome::Applied {
                answer
            } else {
                None
            },
            lookups: None,
        };
        let source = Source::Rule(m.rule.name.clone());
        if outcome == Outcome::Applied && answer.is_some() && lookups.learns_from(&source) {
            lookups.learn(&source, &inputs);
        }
        let wanted = m.rule.lookups(&inputs);
        let found = if wanted.is_empty() {
            None
        } else {
            Some(lookups.find(&wanted).await)
        };
        inputs.lookups = found.as_ref();
        let named = m.rule.invalidates(&inputs);
        what.tags.extend(named.tags);
        what.views.extend(named.views);
    }
    what.tags.sort_unstable();
    what.tags.dedup();
    what.views.sort_by_key(|v| v.index());
    what.views.dedup();
    invalidate(state, &matched[0].rule.name, &what)
        .await
        .map(Some)
}

/// Applies `what`: the entries dropped. If that fails (neither Redis nor the fallback took
/// it), every view is dropped instead; if that fails too, the client is told the write was
/// applied but may not be seen yet (`503`), rather than given the origin's answer as if all
/// were well.
async fn invalidate(
    state: &AppState,
    rule: &str,
    what: &Invalidates,
) -> std::result::Result<u64, Response> {
    let mut total = 0;
    let mut failed = None;
    if !what.tags.is_empty() {
        match state.invalidator.tags(&what.tags, Cause::Write).await {
            Ok(n) => total += n,
            Err(e) => failed = Some(e),
        }
    }
    if failed.is_none() && !what.views.is_empty() {
        match state
            .invalidator
            .namespaces(&what.views, Cause::Write)
            .await
        {
            Ok(n) => total += n,
            Err(e) => failed = Some(e),
        }
    }
    let Some(e) = failed else {
        return Ok(total);
    };
    tracing::error!(rule, tags = ?what.tags, error = %e, "invalidation after a write failed; dropping every view");
    match state.invalidator.views_of_kinds(&[], Cause::Write).await {
        Ok(n) => Ok(n),
        Err(e) => {
            tracing::error!(rule, error = %e, "invalidation after a write failed altogether");
            Err(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::UNAVAILABLE,
                "the origin took the write, but runcache could not invalidate what it changed: cached reads may not show it yet",
            ))
        }
    }
}

/// The origin's answer as the client gets it.
fn passed(
    status: StatusCode,
    mut headers: HeaderMap,
    body: Option<BodyStream>,
    invalidated: Option<u64>,
) -> Response {
    if let Some(n) = invalidated {
        headers.insert(X_INVALIDATED, HeaderValue::from(n));
    }
    headers.append(
        CACHE_STATUS,
        HeaderValue::from_static("runcache; fwd=bypass; detail=pass"),
    );
    let body = match body {
        Some(stream) => Body::from_stream(stream),
        None => Body::empty(),
    };
    let mut response = (status, body).into_response();
    *response.headers_mut() = headers;
    response.extensions_mut().insert(OriginAnswer);
    response
        .extensions_mut()
        .insert(super::gateway::PassedThrough);
    response
}

//! Every cached view of the view table, on the origin's own paths, through one handler: the
//! view's validators, key and tags ([`ViewDef::resolve`]), the read-through, the answer
//! (`respond`). And the `DELETE` of a run passed through to the origin.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::extract::{FromRequest, Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;

use super::{OriginAnswer, RawBody, etag_match};
use crate::domain::{MAX_INTEGER_ID, OnInvalid, RUN_ID_PATTERN, RawRunId, ViewDef, parse_run_id};
use crate::error::{AppError, Result, codes, error_response};
use crate::origin::OriginRequest;
use crate::security::single_authorization;
use crate::serve::{ViewRequest, ViewResponse};
use crate::state::AppState;

/// Routes of this resource written as code: none. The views (and the writes of the
/// `[invalidate.*]` rules) are served by `serve_or_not_found`, the router's fallback, from
/// the view table and the rules.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
}

/// A request with more than one `Authorization` header stops here (400): the cache would
/// check one credential while the origin is sent both. In `auth.frontend = jwt`, a request
/// without a valid bearer JWT stops here too (401).
pub(super) fn admit(state: &AppState, headers: &HeaderMap) -> Result<()> {
    let authorization = one_authorization(headers)?;
    state
        .views
        .access()
        .admit(authorization)
        .map_err(AppError::Unauthorized)
}

/// The request's one `Authorization` header, if any; two or more are a `400`.
pub(super) fn one_authorization(headers: &HeaderMap) -> Result<Option<&HeaderValue>> {
    single_authorization(headers).map_err(|e| AppError::InvalidArgument(e.to_owned()))
}

/// The OpenAPI schema of a run id in a JSON body: a string matching
/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`, or a non-negative integer (`42` is the id `"42"`).
/// Documentation only: bodies hold ids as JSON values, checked by [`run_id_from_json`].
pub struct RunId;

impl utoipa::PartialSchema for RunId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .description(Some(
                "A run id: a string of 1-128 characters of A-Z, a-z, 0-9, `_`, `.`, `-` not \
                 starting with `.` or `-`, or a non-negative integer (`42` is the id `\"42\"`).",
            ))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(RUN_ID_PATTERN)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0))
                    .maximum(Some(MAX_INTEGER_ID as f64)),
            )
            .into()
    }
}

impl ToSchema for RunId {}

/// A run id from a JSON body, through the one parser ([`parse_run_id`]): a string, or a
/// non-negative integer (`42` and `42.0` are the id `"42"`).
pub fn run_id_from_json(value: &Value) -> Result<String> {
    parse_run_id(RawRunId::Json(value)).map_err(AppError::InvalidArgument)
}

/// Whether `r` has a `Last-Modified` no later than the request's `If-Modified-Since`.
fn not_modified_since(r: &ViewResponse, request_headers: &HeaderMap) -> bool {
    let date = |v: &HeaderValue| httpdate::parse_http_date(v.to_str().ok()?).ok();
    let Some(since) = request_headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(date)
    else {
        return false;
    };
    r.status == StatusCode::OK
        && r.headers
            .iter()
            .find(|(n, _)| n == header::LAST_MODIFIED)
            .and_then(|(_, v)| date(v))
            .is_some_and(|modified| modified <= since)
}

/// The validator a `304` carries: the form of the representation the client holds. A client
/// that got a compressed body holds its weak ETag (see `http::weaken_etag_when_compressed`),
/// and a 304 has no body for that rule to see, so the tag it sent decides.
fn not_modified_etag(matched: &str, etag: HeaderValue) -> HeaderValue {
    let strong = etag.to_str().is_ok_and(|e| !e.starts_with("W/"));
    if strong && matched.starts_with("W/") {
        HeaderValue::from_str(&format!("W/{}", etag.to_str().unwrap_or_default())).unwrap_or(etag)
    } else {
        etag
    }
}

/// Builds the HTTP answer: cache headers, `304` on a matching `If-None-Match`, and the
/// origin's own 4xx bodies marked so they pass through untouched. The response is built in
/// place with room for every header, and header values stored with the entry are shared, so
/// a hit copies no header bytes (see the README's Performance section).
pub(super) fn respond(r: ViewResponse, request_headers: &HeaderMap, get: bool) -> Response {
    let conditional = request_headers.contains_key(header::IF_NONE_MATCH)
        || request_headers.contains_key(header::IF_MODIFIED_SINCE);
    respond_to(r, conditional.then_some(request_headers), get)
}

/// [`respond`] for a request whose headers are `conditional` when it sent `If-None-Match` or
/// `If-Modified-Since`, `None` otherwise (the hit lane knows which from its one walk over
/// them, and a hit then looks none up).
pub(super) fn respond_to(r: ViewResponse, conditional: Option<&HeaderMap>, get: bool) -> Response {
    let matched = conditional.and_then(|request_headers| {
        let etag = r.etag.as_ref()?;
        request_headers
            .get(header::IF_NONE_MATCH)
            .and_then(|inm| etag_match(inm, etag.to_str().unwrap_or_default()))
    });
    // If-Modified-Since counts only without If-None-Match, and only for GET (RFC 9110
    // section 13.1.3).
    let not_modified = matched.is_some()
        || conditional.is_some_and(|request_headers| {
            get && !request_headers.contains_key(header::IF_NONE_MATCH)
                && not_modified_since(&r, request_headers)
        });
    let mut resp = if not_modified {
        Response::new(Body::new(NotModifiedBody))
    } else {
        Response::new(Body::from(r.body.clone()))
    };
    let headers = resp.headers_mut();
    headers.reserve(8);
    headers.insert(X_CACHE, HeaderValue::from_static(r.x_cache()));
    if let Ok(v) = r.cache_status_value() {
        headers.insert(CACHE_STATUS, v);
    }
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if let Some(age) = r.age() {
        headers.insert(header::AGE, HeaderValue::from(age));
    }
    if let Some(etag) = r.etag {
        let etag = match matched {
            Some(tag) => not_modified_etag(tag, etag),
            None => etag,
        };
        headers.insert(header::ETAG, etag);
    }
    if not_modified {
        // What a 304 must carry of the 200 it stands for (RFC 9110 section 15.4.5).
        for (name, value) in r.headers.iter() {
            if matches!(
                name.as_str(),
                "cache-control" | "expires" | "content-location" | "vary"
            ) {
                headers.append(name.clone(), value.clone());
            }
        }
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        return resp;
    }
    if let Some(ct) = r.content_type {
        headers.insert(header::CONTENT_TYPE, ct);
    }
    for (name, value) in r.headers.iter() {
        headers.append(name.clone(), value.clone());
    }
    *resp.status_mut() = r.status;
    // Only an error status is ever looked at for the mark (`json_errors`), and inserting the
    // first extension allocates its map: a hit, a 2xx, goes without.
    if r.status.is_client_error() || r.status.is_server_error() {
        resp.extensions_mut().insert(OriginAnswer);
    }
    resp
}

/// The body of a `304`: nothing, of a length it does not claim. An empty body of exact size
/// would make axum add `Content-Length: 0`, which a 304 must not carry unless the 200 would
/// have been empty (RFC 9110 section 8.6); nginx and Varnish send none either.
struct NotModifiedBody;

impl http_body::Body for NotModifiedBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::task::Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        true
    }
}

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

async fn serve(state: &AppState, req: ViewRequest, headers: &HeaderMap) -> Result<Response> {
    let get = req.origin.method == Method::GET;
    let answer = state.views.serve(req).await?;
    let gzipped = gzip_copy(state, &answer, headers).await;
    let mut resp = respond(answer, headers, get);
    if let Some(gz) = gzipped
        && resp.status() == StatusCode::OK
    {
        send_gzipped(&mut resp, gz);
    }
    Ok(resp)
}

/// For a hit (or stale answer) from the cache that the client may get gzipped, the gzip copy
/// made once for its ETag (see `precompressed`); the compression layer leaves an answer that
/// has its `Content-Encoding` alone. A large body's copy is made off the async workers.
async fn gzip_copy(
    state: &AppState,
    answer: &ViewResponse,
    headers: &HeaderMap,
) -> Option<bytes::Bytes> {
    let from_cache = matches!(answer.x_cache(), "HIT" | "STALE");
    if !from_cache
        || !gzip_wanted(
            state,
            answer.status,
            answer.content_type.as_ref(),
            &answer.headers,
            &answer.body,
            headers,
        )
    {
        return None;
    }
    let etag = answer.etag.clone()?;
    let mark = &answer.copy_mark;
    if let Some(copy) = state.precompressed.cached(&etag, &answer.body, mark) {
        return Some(copy);
    }
    let store = state.precompressed.clone();
    let body = answer.body.clone();
    if body.len() < 64 * 1024 {
        return store.make(&etag, &body, mark);
    }
    let mark = mark.clone();
    tokio::task::spawn_blocking(move || store.make(&etag, &body, &mark))
        .await
        .ok()
        .flatten()
}

/// Whether a cached answer (`status`, `content_type`, the `stored` origin headers, `body`) is
/// sent from a gzip copy to a request with `headers`: what [`gzip_copy`] and the hit lane
/// decide by.
fn gzip_wanted(
    state: &AppState,
    status: StatusCode,
    content_type: Option<&HeaderValue>,
    stored: &crate::store::Headers,
    body: &bytes::Bytes,
    headers: &HeaderMap,
) -> bool {
    status == StatusCode::OK
        && state.precompressed.wanted(body)
        && crate::serve::precompressed::compressible(content_type)
        && !stored.iter().any(|(n, _)| n == header::CONTENT_ENCODING)
        && crate::serve::precompressed::accepts_gzip(headers)
}

/// The gzip copy of `entry`'s body already kept for a request with `headers`, when the full
/// path would send one (see [`gzip_copy`]); `None` when it would not, or no copy is kept
/// yet (the full path makes it).
pub(super) fn kept_gzip(
    state: &AppState,
    entry: &crate::store::CacheEntry,
    headers: &HeaderMap,
) -> Option<bytes::Bytes> {
    let content_type = Some(&entry.content_type).filter(|v| !v.is_empty());
    let status = StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK);
    if !gzip_wanted(
        state,
        status,
        content_type,
        &entry.headers,
        &entry.body,
        headers,
    ) {
        return None;
    }
    state
        .precompressed
        .cached(&entry.etag, &entry.body, &entry.copy_mark)
}

/// `resp` (a `200` of a cached answer) sent as `gz`, its gzip copy, as [`serve`] sends it.
pub(super) fn send_gzipped(resp: &mut Response, gz: bytes::Bytes) {
    resp.headers_mut().remove(header::CONTENT_LENGTH);
    resp.headers_mut()
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    *resp.body_mut() = Body::from(gz);
}

/// The view a request is for: its method and path in the view table (`HEAD` as `GET`).
pub(super) fn view_of<'a>(state: &'a AppState, method: &Method, path: &str) -> Option<&'a ViewDef> {
    let table = state.views.table();
    if method == Method::HEAD {
        return table.route(&Method::GET, path);
    }
    table.route(method, path)
}

/// The router's fallback: a write of an `[invalidate.*]` rule is served by `writes::serve`;
/// a request of a configured view by the view (within `server.request_timeout_ms`, as the
/// routes are); with `gateway.pass_through`, any other request that is not under runcache's
/// own paths is passed through; otherwise a path of a view with another method is a `405`
/// naming the methods it has, and anything else a `404`.
pub(super) async fn serve_or_not_found(State(state): State<AppState>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    // A write is matched on its path as the origin will read it, percent-decoded too: a
    // `runs/set%2Dtag` is MLflow's `runs/set-tag`, and must not pass uninvalidated.
    let mut rules = state.rules.matching(req.method(), &path);
    let mut rule_path = path.clone();
    if rules.is_empty()
        && let Ok(decoded) = percent_encoding::percent_decode_str(&path).decode_utf8()
        && decoded != path
    {
        rules = state.rules.matching(req.method(), &decoded);
        rule_path = decoded.into_owned();
    }
    if !rules.is_empty() {
        let rules: Vec<_> = rules.into_iter().cloned().collect();
        return match super::writes::serve(&state, rules, &rule_path, req).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        };
    }
    match view_of(&state, req.method(), &path) {
        Some(def) => {
            let def = def.clone();
            let limit = std::time::Duration::from_millis(state.settings.server.request_timeout_ms);
            match tokio::time::timeout(limit, serve_view(&state, &def, req)).await {
                Ok(Ok(resp)) => resp,
                Ok(Err(e)) => e.into_response(),
                // As the routes' time-out layer answers (made JSON by `http::json_errors`).
                Err(_) => StatusCode::GATEWAY_TIMEOUT.into_response(),
            }
        }
        None if super::gateway::passes(&state, &path) => super::gateway::pass(&state, req).await,
        None => {
            let allowed: BTreeSet<&str> = state
                .views
                .table()
                .views()
                .iter()
                .filter(|d| d.captures(&path).is_some())
                .map(|d| d.method.as_str())
                .chain(
                    state
                        .rules
                        .rules()
                        .iter()
                        .filter(|r| r.captures(&path).is_some())
                        .map(|r| r.method.as_str()),
                )
                .collect();
            if allowed.is_empty() {
                return error_response(StatusCode::NOT_FOUND, codes::NOT_FOUND, "no such route");
            }
            let mut resp = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                codes::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            );
            let allow = allowed.into_iter().collect::<Vec<_>>().join(",");
            if let Ok(v) = HeaderValue::from_str(&allow) {
                resp.headers_mut().insert(header::ALLOW, v);
            }
            resp
        }
    }
}

/// Whether a request declares a body (`Content-Length` other than 0, or `Transfer-Encoding`).
/// A view that takes none and is sent one must not answer it from the cache: the origin may
/// read it (MLflow reads a `GET`'s JSON body when its query is empty), so the key would not
/// cover all that the answer depends on.
pub(super) fn declares_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes() != b"0")
}

/// Serves `req` by `def`: the caller's admission, the view's validation (a `400`, or with
/// `on_invalid = "pass"` the request as it is to the origin, uncached), the read-through. A
/// request with a body for a view that takes none is an invalid request of that view.
async fn serve_view(state: &AppState, def: &ViewDef, req: Request) -> Result<Response> {
    admit(state, req.headers())?;
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let headers = req.headers().clone();
    let unexpected_body = !def.takes_body && declares_body(&headers);
    if unexpected_body && def.on_invalid != OnInvalid::Pass {
        return Err(AppError::InvalidArgument(format!(
            "view {} takes no request body",
            def.view.name()
        )));
    }
    let body = if def.takes_body || unexpected_body {
        Some(RawBody::from_request(req, state).await?.0)
    } else {
        None
    };
    let resolved = if unexpected_body {
        Err(format!("view {} takes no request body", def.view.name()))
    } else {
        def.resolve(&path, query.as_deref(), body.as_deref())
    };
    let view_request = match resolved {
        Ok(resolved) => state.views.request(def, resolved, &headers),
        Err(why) if def.on_invalid == OnInvalid::Pass => {
            tracing::debug!(view = def.view.name(), reason = %why, "invalid request passed to the origin uncached");
            let path_and_query = match &query {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            ViewRequest {
                view: def.view,
                logical_key: String::new(),
                tags: Vec::new(),
                origin: OriginRequest {
                    method: def.method.clone(),
                    path_and_query,
                    body,
                    headers: state.views.origin().forwarded_headers(&headers),
                },
                use_cache: false,
                variant: None,
            }
        }
        Err(why) => return Err(AppError::InvalidArgument(why)),
    };
    serve(state, view_request, &headers).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_integral_float_is_read_exactly_up_to_the_largest_id() {
        // Parsed from text, as a request body is: a parser that is not correctly rounded reads
        // 2173985236552219.0 as 2173985236552219.25 (one unit in the last place off), and
        // refused an id that JSON Schema calls an integer (schemathesis found it).
        for (text, id) in [
            ("2173985236552219.0", "2173985236552219"),
            ("9007199254740991.0", "9007199254740991"),
            ("506.0", "506"),
        ] {
            let value: Value = serde_json::from_str(text).expect("json");
            assert_eq!(run_id_from_json(&value).expect(text), id);
        }
    }

    #[test]
    fn documented_run_id_patterns_are_the_validators() {
        let api = crate::http::routes_and_api(
            &crate::http::tests::shipped_table(),
            &crate::http::tests::shipped_kinds(),
            &crate::http::tests::shipped_rules(),
            &crate::domain::AdminPrefix::default(),
        )
        .api;
        let doc = serde_json::to_value(&api).expect("serialise the OpenAPI document");
        let mut seen = 0;
        for item in doc["paths"].as_object().expect("paths").values() {
            for op in item.as_object().expect("path item").values() {
                for param in op["parameters"].as_array().into_iter().flatten() {
                    if param["name"] == "model_run_id" {
                        assert_eq!(param["schema"]["pattern"], RUN_ID_PATTERN);
                        seen += 1;
                    }
                }
            }
        }
        assert_eq!(seen, 3, "the three views with a run id in their path");
        assert_eq!(
            doc["components"]["schemas"]["RunId"]["oneOf"][0]["pattern"],
            RUN_ID_PATTERN
        );
    }

    #[test]
    fn if_none_match_compares_weakly() {
        let etag = "\"abc\"";
        for inm in ["\"abc\"", "W/\"abc\"", "\"x\", W/\"abc\"", "*"] {
            assert!(
                etag_match(&HeaderValue::from_static(inm), etag).is_some(),
                "{inm}"
            );
        }
        assert!(etag_match(&HeaderValue::from_static("\"abd\""), etag).is_none());
    }

    #[test]
    fn a_304_carries_the_form_of_the_tag_the_client_holds() {
        let strong = || HeaderValue::from_static("\"abc\"");
        assert_eq!(not_modified_etag("W/\"abc\"", strong()), "W/\"abc\"");
        assert_eq!(not_modified_etag("\"abc\"", strong()), "\"abc\"");
        assert_eq!(not_modified_etag("*", strong()), "\"abc\"");
        let weak = HeaderValue::from_static("W/\"abc\"");
        assert_eq!(not_modified_etag("\"abc\"", weak), "W/\"abc\"");
    }
}

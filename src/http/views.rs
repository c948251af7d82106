//! The three cached model-run views, on the origin's own paths, and the `DELETE` of a run
//! passed through to the origin.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use serde::Deserialize;
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{AppJson, AppQuery, OriginAnswer, etag_match, parse_use_cache};
use crate::domain::{MAX_INTEGER_ID, RUN_ID_PATTERN, RawRunId, parse_run_id};
use crate::error::{AppError, ErrorBody, Result};
use crate::invalidation::Cause;
use crate::origin::{OriginError, OriginRequest};
use crate::security::single_authorization;
use crate::serve::{ViewRequest, ViewResponse};
use crate::state::AppState;

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_metrics))
        .routes(routes!(get_feature_importance))
        .routes(routes!(create_comparison))
        .routes(routes!(delete_run))
}

/// Query of the metrics and comparison views.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ViewQuery {
    /// `false`: fetch from the origin and neither read nor write the cache (default `true`).
    #[param(value_type = Option<bool>)]
    pub use_cache: Option<String>,
}

/// Query of the feature-importance view.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FeatureImportanceQuery {
    /// Only the `top_n` most important features, 1-1000 (default: all).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub top_n: Option<String>,
    /// `false`: fetch from the origin and neither read nor write the cache (default `true`).
    #[param(value_type = Option<bool>)]
    pub use_cache: Option<String>,
}

/// Body of a comparison.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompareBody {
    /// 2-50 distinct run ids (strings, or non-negative integers); order and duplicates do not
    /// matter (at most 200 entries before de-duplication).
    #[schema(value_type = Vec<RunId>, min_items = 2, max_items = 200, example = json!(["41", "42"]))]
    pub model_run_ids: Vec<Value>,
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
fn one_authorization(headers: &HeaderMap) -> Result<Option<&HeaderValue>> {
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

/// Validates a run id given as a path segment.
fn run_id(raw: String) -> Result<String> {
    parse_run_id(RawRunId::Text(&raw)).map_err(AppError::InvalidArgument)
}

/// A run id from a JSON body, through the one parser ([`parse_run_id`]): a string, or a
/// non-negative integer (`42` and `42.0` are the id `"42"`).
pub fn run_id_from_json(value: &Value) -> Result<String> {
    parse_run_id(RawRunId::Json(value)).map_err(AppError::InvalidArgument)
}

/// Normalises comparison ids: strings, de-duplicated, sorted in byte order, 2..=`max`.
pub fn normalise_run_ids(values: &[Value], max: usize) -> Result<Vec<String>> {
    if values.len() > max * 4 {
        return Err(AppError::InvalidArgument(format!(
            "model_run_ids must hold between 2 and {max} distinct ids"
        )));
    }
    let ids: BTreeSet<String> = values.iter().map(run_id_from_json).collect::<Result<_>>()?;
    if !(2..=max).contains(&ids.len()) {
        return Err(AppError::InvalidArgument(format!(
            "model_run_ids must hold between 2 and {max} distinct ids (got {})",
            ids.len()
        )));
    }
    Ok(ids.into_iter().collect())
}

fn parse_top_n(raw: Option<&str>) -> Result<Option<u32>> {
    raw.map(|s| {
        s.parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| AppError::InvalidArgument("top_n must be between 1 and 1000".into()))
    })
    .transpose()
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
    let matched = r.etag.as_ref().and_then(|etag| {
        request_headers
            .get(header::IF_NONE_MATCH)
            .and_then(|inm| etag_match(inm, etag.to_str().unwrap_or_default()))
    });
    // If-Modified-Since counts only without If-None-Match, and only for GET (RFC 9110
    // section 13.1.3).
    let not_modified = matched.is_some()
        || (get
            && !request_headers.contains_key(header::IF_NONE_MATCH)
            && not_modified_since(&r, request_headers));
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
    resp.extensions_mut().insert(OriginAnswer);
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
    Ok(respond(answer, headers, get))
}

/// A run's training metrics.
#[utoipa::path(
    get,
    path = "/api/v1/models/train/{model_run_id}/metrics",
    tag = "views",
    params(
        ("model_run_id" = String, Path, description = "Run id, `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`",
            pattern = "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"),
        ("If-None-Match" = Option<String>, Header, example = "*",
            description = "ETags (strong or weak) or `*`: a match is answered `304` with no body"),
        ViewQuery,
    ),
    responses(
        (status = 200, description = "The origin's body, byte for byte, with its content type", body = Value, content_type = "application/json",
            headers(("X-Cache" = String, description = "HIT, MISS, BYPASS or STALE"), ("Cache-Status" = String, description = "RFC 9211"),
                ("ETag" = String, description = "Strong; weak (`W/`) when the body is compressed"), ("Age" = u64, description = "Seconds since the entry was stored (hits)"))),
        (status = 304, description = "If-None-Match matched: no body", headers(("ETag" = String))),
        (status = 400, description = "Invalid id or query", body = ErrorBody),
        (status = 401, description = "Credentials refused: the origin's answer, passed through (`auth.frontend = forward`), or an ErrorBody for a missing or invalid JWT (`jwt`)", body = Value, content_type = "application/json"),
        (status = 403, description = "The origin refused the request's credentials: its answer, passed through", body = Value, content_type = "application/json"),
        (status = 404, description = "The origin's 404, passed through", body = Value, content_type = "application/json"),
        (status = 422, description = "The origin's 422, passed through", body = Value, content_type = "application/json"),
        (status = 502, description = "Origin failed", body = ErrorBody),
        (status = 504, description = "Origin timed out", body = ErrorBody),
    )
)]
pub async fn get_metrics(
    State(state): State<AppState>,
    Path(id): Path<String>,
    AppQuery(q): AppQuery<ViewQuery>,
    headers: HeaderMap,
) -> Result<Response> {
    admit(&state, &headers)?;
    let id = run_id(id)?;
    let use_cache = parse_use_cache(q.use_cache.as_deref())?;
    let forwarded = state.views.origin().forwarded_headers(&headers);
    serve(
        &state,
        ViewRequest::metrics(&id, forwarded, use_cache),
        &headers,
    )
    .await
}

/// A run's feature importance, optionally only the top N features.
#[utoipa::path(
    get,
    path = "/api/v1/models/train/{model_run_id}/feature-importance",
    tag = "views",
    params(
        ("model_run_id" = String, Path, description = "Run id, `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`",
            pattern = "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"),
        ("If-None-Match" = Option<String>, Header, example = "*",
            description = "ETags (strong or weak) or `*`: a match is answered `304` with no body"),
        FeatureImportanceQuery,
    ),
    responses(
        (status = 200, description = "The origin's body, byte for byte, with its content type", body = Value, content_type = "application/json",
            headers(("X-Cache" = String, description = "HIT, MISS, BYPASS or STALE"), ("Cache-Status" = String, description = "RFC 9211"),
                ("ETag" = String, description = "Strong; weak (`W/`) when the body is compressed"), ("Age" = u64, description = "Seconds since the entry was stored (hits)"))),
        (status = 304, description = "If-None-Match matched: no body", headers(("ETag" = String))),
        (status = 400, description = "Invalid id, top_n or query", body = ErrorBody),
        (status = 401, description = "Credentials refused: the origin's answer, passed through (`auth.frontend = forward`), or an ErrorBody for a missing or invalid JWT (`jwt`)", body = Value, content_type = "application/json"),
        (status = 403, description = "The origin refused the request's credentials: its answer, passed through", body = Value, content_type = "application/json"),
        (status = 404, description = "The origin's 404, passed through", body = Value, content_type = "application/json"),
        (status = 422, description = "The origin's 422, passed through", body = Value, content_type = "application/json"),
        (status = 502, description = "Origin failed", body = ErrorBody),
        (status = 504, description = "Origin timed out", body = ErrorBody),
    )
)]
pub async fn get_feature_importance(
    State(state): State<AppState>,
    Path(id): Path<String>,
    AppQuery(q): AppQuery<FeatureImportanceQuery>,
    headers: HeaderMap,
) -> Result<Response> {
    admit(&state, &headers)?;
    let id = run_id(id)?;
    let top_n = parse_top_n(q.top_n.as_deref())?;
    let use_cache = parse_use_cache(q.use_cache.as_deref())?;
    let forwarded = state.views.origin().forwarded_headers(&headers);
    let req = ViewRequest::feature_importance(&id, top_n, forwarded, use_cache);
    serve(&state, req, &headers).await
}

/// A comparison of runs; the same whatever the order or repetition of the ids.
#[utoipa::path(
    post,
    path = "/api/v1/models/compare",
    tag = "views",
    params(
        ("If-None-Match" = Option<String>, Header, example = "*",
            description = "ETags (strong or weak) or `*`: a match is answered `304` with no body"),
        ViewQuery,
    ),
    request_body = CompareBody,
    responses(
        (status = 200, description = "The origin's body, byte for byte, with its content type", body = Value, content_type = "application/json",
            headers(("X-Cache" = String, description = "HIT, MISS, BYPASS or STALE"), ("Cache-Status" = String, description = "RFC 9211"),
                ("ETag" = String, description = "Strong; weak (`W/`) when the body is compressed"), ("Age" = u64, description = "Seconds since the entry was stored (hits)"))),
        (status = 304, description = "If-None-Match matched: no body", headers(("ETag" = String))),
        (status = 400, description = "Invalid ids, body or query", body = ErrorBody),
        (status = 401, description = "Credentials refused: the origin's answer, passed through (`auth.frontend = forward`), or an ErrorBody for a missing or invalid JWT (`jwt`)", body = Value, content_type = "application/json"),
        (status = 403, description = "The origin refused the request's credentials: its answer, passed through", body = Value, content_type = "application/json"),
        (status = 404, description = "The origin's 404 (a run it does not know), passed through", body = Value, content_type = "application/json"),
        (status = 413, description = "Body larger than `server.max_body_bytes`", body = ErrorBody),
        (status = 422, description = "The origin's 422, passed through", body = Value, content_type = "application/json"),
        (status = 502, description = "Origin failed", body = ErrorBody),
        (status = 504, description = "Origin timed out", body = ErrorBody),
    )
)]
pub async fn create_comparison(
    State(state): State<AppState>,
    AppQuery(q): AppQuery<ViewQuery>,
    headers: HeaderMap,
    AppJson(body): AppJson<CompareBody>,
) -> Result<Response> {
    admit(&state, &headers)?;
    let use_cache = parse_use_cache(q.use_cache.as_deref())?;
    let ids = normalise_run_ids(&body.model_run_ids, state.settings.views.comparison.max_ids)?;
    let forwarded = state.views.origin().forwarded_headers(&headers);
    serve(
        &state,
        ViewRequest::comparison(ids, forwarded, use_cache),
        &headers,
    )
    .await
}

/// Deletes a run at the origin; on a 2xx answer its entries are invalidated as for a
/// `model-deleted` event (`X-Invalidated` says how many).
#[utoipa::path(
    delete,
    path = "/api/v1/models/train/{model_run_id}",
    tag = "views",
    params(
        ("model_run_id" = String, Path, description = "Run id, `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`",
            pattern = "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"),
    ),
    responses(
        (status = 200, description = "The origin's answer, passed through", body = Value, content_type = "application/json",
            headers(("X-Invalidated" = u64, description = "Entries invalidated"))),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 401, description = "The origin refused the request's credentials: its answer, passed through", body = Value, content_type = "application/json"),
        (status = 403, description = "The origin refused the request's credentials: its answer, passed through", body = Value, content_type = "application/json"),
        (status = 404, description = "The origin's 404, passed through", body = Value, content_type = "application/json"),
        (status = 422, description = "The origin's 422, passed through", body = Value, content_type = "application/json"),
        (status = 502, description = "Origin failed", body = ErrorBody),
        (status = 504, description = "Origin timed out", body = ErrorBody),
    )
)]
pub async fn delete_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    let id = run_id(id)?;
    // Forwarded to the origin, whose answer decides the invalidation: one credential only.
    one_authorization(&headers)?;
    // A starting instance could not invalidate behind the origin's delete (see
    // `Invalidator::new`): nothing is sent to the origin until it can.
    state.invalidator.ready()?;
    let resp = state
        .views
        .origin()
        .send(OriginRequest {
            method: Method::DELETE,
            path_and_query: format!("/api/v1/models/train/{id}"),
            body: None,
            headers: state.views.origin().forwarded_headers(&headers),
        })
        .await?;
    if resp.status.is_server_error() {
        return Err(OriginError::Status(resp.status).into());
    }
    let mut out = HeaderMap::new();
    if resp.status.is_success() {
        // The origin has deleted the run: failing the request now would invite a retry of a
        // delete that succeeded, so an invalidation failure is logged, not returned.
        match state.invalidator.run(&id, Cause::RunDeleted).await {
            Ok(n) => {
                out.insert("x-invalidated", HeaderValue::from(n));
            }
            Err(e) => tracing::error!(error = %e, run_id = %id, "invalidation after delete failed"),
        }
    }
    if let Some(ct) = resp.content_type {
        out.insert(header::CONTENT_TYPE, ct);
    }
    out.extend(resp.headers);
    let mut response = (resp.status, out, resp.body).into_response();
    response.extensions_mut().insert(OriginAnswer);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
    fn comparison_ids_are_normalised() {
        let ids = normalise_run_ids(&[json!("b"), json!(42), json!("a"), json!("42")], 50)
            .expect("valid");
        assert_eq!(ids, ["42", "a", "b"]);
    }

    #[test]
    fn comparison_limits_apply_after_dedup() {
        assert!(normalise_run_ids(&[json!("1"), json!(1)], 50).is_err());
        let many: Vec<Value> = (0..51).map(|i| json!(i)).collect();
        assert!(normalise_run_ids(&many, 50).is_err());
        assert!(normalise_run_ids(&many[..50], 50).is_ok());
        for bad in [
            json!(-1),
            json!(1.5),
            json!(null),
            json!(["x"]),
            json!(".."),
        ] {
            assert!(
                normalise_run_ids(&[json!("1"), bad.clone()], 50).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn top_n_bounds() {
        assert_eq!(parse_top_n(None).expect("none"), None);
        assert_eq!(parse_top_n(Some("10")).expect("10"), Some(10));
        for bad in ["0", "1001", "-1", "abc", ""] {
            assert!(parse_top_n(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn documented_run_id_patterns_are_the_validators() {
        let (_, api) = crate::http::routes_and_api();
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

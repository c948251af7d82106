//! The HTTP surface: resource routers merged into one, the layer stack, JSON extractors whose
//! rejections use our error format, and the OpenAPI document.

pub mod admin;
pub mod auth;
pub mod conn;
pub mod dashboard;
pub mod events;
pub mod gateway;
pub mod hit_lane;
pub mod limits;
pub mod ops;
pub mod stats;
mod view_docs;
pub mod views;
mod writes;

use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use axum::{Router, middleware};
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Method, StatusCode, header};
use serde::de::DeserializeOwned;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{DefaultPredicate, Predicate as _};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::domain::AdminPrefix;
use crate::error::{AppError, codes, error_response};
use crate::state::AppState;

/// Root of the OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "runcache", description = "HTTP cache in front of an ML platform's model-run views"),
    tags(
        (name = "views", description = "Cached model-run views (the origin's own paths)"),
        (name = "admin", description = "Cache administration (bearer token)"),
        (name = "events", description = "Invalidation hooks fired by the training system (bearer token)"),
        (name = "ops", description = "Health, readiness, metrics, API documentation"),
    ),
    paths(ops::get_openapi_json, ops::get_docs),
    components(schemas(crate::error::ErrorBody, crate::error::ErrorDetail)),
    modifiers(&BearerScheme),
)]
struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "signature",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Runcache-Signature",
                "sha256=<hex of HMAC-SHA256(events.secret, \"<timestamp>.<raw body>\")>, with X-Runcache-Timestamp: <unix seconds>",
            ))),
        );
        components.add_security_scheme(
            "peer_signature",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Runcache-Signature",
                "sha256=<hex of HMAC-SHA256(peers.secret, \"<timestamp>.<raw body>\")>, with X-Runcache-Timestamp: <unix seconds>; the body names the sending instance",
            ))),
        );
    }
}

/// Documents, on every operation, the answers that the layer stack gives whatever the handler:
/// `431` (header limits), `503` with `Retry-After` (load shedding; `/health` and `/ready` are
/// exempt), `504` (whole-request time-out), and `429` with `Retry-After` on admin routes and
/// events (rate limit). A status an operation already documents keeps its own description.
fn document_layer_responses(api: &mut utoipa::openapi::OpenApi, prefix: &AdminPrefix) {
    use utoipa::openapi::header::HeaderBuilder;
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    use utoipa::openapi::{Content, Ref, ResponseBuilder};

    let error = |description: &str, retry_after: bool| {
        let mut r = ResponseBuilder::new().description(description).content(
            "application/json",
            Content::new(Some(Ref::from_schema_name("ErrorBody"))),
        );
        if retry_after {
            r = r.header(
                "Retry-After",
                HeaderBuilder::new()
                    .schema(Some(ObjectBuilder::new().schema_type(Type::Integer)))
                    .description(Some("Seconds to wait before retrying"))
                    .build(),
            );
        }
        r.build()
    };
    let shared = [
        (
            "HeadersTooLarge",
            error(
                "Too many request header fields, or too many header bytes (`server.max_headers`, `server.max_header_bytes`)",
                false,
            ),
        ),
        (
            "Overloaded",
            error(
                "Too many requests in flight (`server.max_concurrent_requests`): shed, retry after `Retry-After`",
                true,
            ),
        ),
        (
            "RequestTimeout",
            error(
                "The request took longer than `server.request_timeout_ms`",
                false,
            ),
        ),
        (
            "RateLimited",
            error(
                "Too many admin or event requests from this client (`server.admin_rate_per_sec`, `server.admin_burst`): retry after `Retry-After`",
                true,
            ),
        ),
    ];
    let components = api.components.get_or_insert_with(Default::default);
    for (name, response) in shared {
        components
            .responses
            .insert(name.to_owned(), response.into());
    }

    for (path, item) in api.paths.paths.iter_mut() {
        let own = prefix.strip(path);
        let probe = matches!(own, Some("/health" | "/ready"));
        let admin = own.is_some_and(limits::is_admin);
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in operations.into_iter().flatten() {
            let responses = &mut op.responses.responses;
            let mut add = |status: &str, name: &str| {
                responses
                    .entry(status.to_owned())
                    .or_insert_with(|| Ref::from_response_name(name).into());
            };
            add("431", "HeadersTooLarge");
            add("504", "RequestTimeout");
            if !probe {
                add("503", "Overloaded");
            }
            if admin {
                add("429", "RateLimited");
            }
        }
    }
}

/// runcache's own routes (admin, events, operations, dashboard; the docs page is mounted by
/// [`build_router`]): what `server.admin_prefix` moves.
fn owned_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(admin::router())
        .merge(OpenApiRouter::from(events::router()))
        .merge(ops::router())
        .merge(stats::router())
        .merge(dashboard::router())
}

/// The routes, apart: runcache's own (relative to `server.admin_prefix`) and those on the
/// origin's paths (the `DELETE` of a run; the views are served by the router's fallback,
/// [`views::serve_or_not_found`]), and the OpenAPI document of both with every view of
/// `table` and every event kind, its paths where they are served.
struct Routes {
    owned: Router<AppState>,
    origin_paths: Router<AppState>,
    api: utoipa::openapi::OpenApi,
}

fn routes_and_api(
    table: &crate::domain::ViewTable,
    kinds: &crate::domain::EventKinds,
    rules: &crate::domain::WriteRules,
    prefix: &AdminPrefix,
) -> Routes {
    let (owned, mut api) = owned_router().split_for_parts();
    events::document(kinds, &mut api);
    if !prefix.is_empty() {
        let paths = std::mem::take(&mut api.paths.paths);
        api.paths.paths = paths
            .into_iter()
            .map(|(path, item)| (prefix.join(&path), item))
            .collect();
    }
    let (origin_paths, views_api) = views::router().split_for_parts();
    api.merge(views_api);
    view_docs::document(table, &mut api);
    view_docs::document_rules(rules, &mut api);
    document_layer_responses(&mut api, prefix);
    Routes {
        owned,
        origin_paths,
        api,
    }
}

/// The OpenAPI document of `table`'s views, `kinds`' events, `rules`' writes and runcache's
/// own routes (under `prefix`), as YAML.
pub fn openapi_yaml_for(
    table: &crate::domain::ViewTable,
    kinds: &crate::domain::EventKinds,
    rules: &crate::domain::WriteRules,
    prefix: &AdminPrefix,
) -> String {
    routes_and_api(table, kinds, rules, prefix)
        .api
        .to_yaml()
        .unwrap_or_default()
}

/// The OpenAPI document of the shipped view table (`config/default.toml` alone, whatever the
/// environment says): what `openapi.yaml` holds.
pub fn openapi_yaml() -> String {
    let shipped =
        crate::config::Settings::load_from(None, Some(Default::default())).and_then(|s| {
            Ok((
                s.view_table()?,
                s.event_kinds()?,
                s.write_rules()?,
                s.admin_prefix()?,
            ))
        });
    match shipped {
        Ok((table, kinds, rules, prefix)) => openapi_yaml_for(&table, &kinds, &rules, &prefix),
        Err(e) => format!("# the shipped configuration is invalid: {e}\n"),
    }
}

/// Every route, with the layer stack, bound to `state`. Does no I/O.
///
/// Layers, outside to inside: request id (set) → trace span → request id (propagate) →
/// panic catcher → edge (limits, JSON errors, weak ETag on compressed bodies) → CORS →
/// compression (never of a passed-through answer) → body limit → request time-out (on the
/// routes; the fallback applies it to the views itself, and a pass-through has its own,
/// [`crate::origin::stream`]).
pub fn build_app(state: AppState) -> Router {
    build_router(state, FastRequestId::new())
}

/// What `runcache` serves: the [`hit_lane::HitLane`] in front of [`build_app`]'s router,
/// sharing one request-id generator.
pub fn build_service(state: AppState) -> hit_lane::HitLane<Router> {
    let ids = FastRequestId::new();
    let router = build_router(state.clone(), ids.clone());
    hit_lane::HitLane::new(state, ids, router)
}

fn build_router(state: AppState, ids: FastRequestId) -> Router {
    let prefix = state.prefix.clone();
    let Routes {
        owned,
        origin_paths,
        api,
    } = routes_and_api(state.views.table(), &state.kinds, &state.rules, &prefix);
    let settings = state.settings.clone();
    let limits = state.limits.clone();
    let docs = SwaggerUi::new(prefix.join("/docs")).url(prefix.join("/openapi.json"), api);
    let router = if prefix.is_empty() {
        owned.merge(origin_paths)
    } else {
        // Nothing under the prefix is the origin's: unknown paths there are runcache's 404s.
        let owned = owned
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed);
        Router::new()
            .nest(prefix.as_str(), owned)
            .merge(origin_paths)
    };
    let router = router
        .merge(docs)
        .fallback(views::serve_or_not_found)
        .method_not_allowed_fallback(gateway::method_not_allowed)
        // On the routes only: the fallback bounds the views itself, and a pass-through is
        // bounded by its own time-outs (an upload may take longer than any request should).
        .route_layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            Duration::from_millis(settings.server.request_timeout_ms),
        ))
        .with_state(state);

    let cors = cors_layer(&settings.cors.allowed_origins);
    let stack = ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(ids))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
                })
                // One access line per request (status, latency) inside the span that carries
                // the request id; `RUST_LOG=tower_http=warn` turns it off.
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO))
                .on_failure(()),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(CatchPanicLayer::custom(|_| {
            error_response(StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL, "internal error")
        }))
        .layer(middleware::from_fn_with_state(limits, edge))
        .option_layer(cors)
        .layer(CompressionLayer::new().compress_when(DefaultPredicate::new().and(gateway::NotPassedThrough)))
        .layer(DefaultBodyLimit::max(settings.server.max_body_bytes));
    router.layer(stack)
}

fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_NONE_MATCH,
                header::ACCEPT_LANGUAGE,
                http::HeaderName::from_static("x-request-id"),
                http::HeaderName::from_static("traceparent"),
            ])
            .expose_headers([
                http::HeaderName::from_static("x-cache"),
                http::HeaderName::from_static("cache-status"),
                header::AGE,
                header::ETAG,
                http::HeaderName::from_static("x-request-id"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// Which `If-None-Match` tag matches `etag`, if any. Weak comparison (RFC 9110 13.1.2): `W/`
/// is ignored.
pub(crate) fn etag_match<'a>(if_none_match: &'a HeaderValue, etag: &str) -> Option<&'a str> {
    let list = if_none_match.to_str().ok()?;
    let opaque = etag.trim_start_matches("W/");
    list.split(',')
        .map(str::trim)
        .find(|tag| *tag == "*" || tag.trim_start_matches("W/") == opaque)
}

/// Request limits on the way in; on the way out, JSON error bodies and weak ETags on
/// compressed bodies (never on a passed-through answer, which is the origin's as it is). One
/// middleware rather than three: each axum middleware boxes and moves the future it wraps, on
/// every request.
async fn edge(
    state: axum::extract::State<std::sync::Arc<crate::security::Limits>>,
    req: Request,
    next: middleware::Next,
) -> Response {
    let resp = limits::enforce(state, req, next).await;
    if resp.extensions().get::<gateway::PassedThrough>().is_some() {
        return resp;
    }
    weaken_etag_when_compressed(json_errors(resp))
}

/// Request ids in the UUID v4 format, without a `getrandom` system call per request: a
/// per-process random key hashed with a counter (unique, and not guessable from another id).
#[derive(Debug, Clone)]
pub struct FastRequestId {
    key: u64,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FastRequestId {
    /// A generator with a fresh random key.
    pub fn new() -> Self {
        let mut seed = [0u8; 8];
        if getrandom::fill(&mut seed).is_err() {
            seed = uuid::Uuid::new_v4().as_u64_pair().0.to_le_bytes();
        }
        Self {
            key: u64::from_le_bytes(seed),
            counter: std::sync::Arc::default(),
        }
    }

    /// The next id.
    pub fn next(&self) -> HeaderValue {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bits = xxhash_rust::xxh3::xxh3_128_with_seed(&n.to_le_bytes(), self.key);
        let id = uuid::Builder::from_random_bytes(bits.to_le_bytes()).into_uuid();
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let text = id.hyphenated().encode_lower(&mut buf);
        // Hex digits and hyphens: always a valid header value.
        HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
}

impl Default for FastRequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl MakeRequestId for FastRequestId {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        Some(RequestId::new(self.next()))
    }
}

/// `X-Request-Id`.
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Marks a response that is the origin's own answer, passed through unchanged (views mark only
/// their error statuses, the only ones `json_errors` looks at).
#[derive(Debug, Clone, Copy)]
pub struct OriginAnswer;

/// Turns any error response that is not already JSON (time-outs, panics, 405s from layers)
/// into our JSON error body; origin answers passed through are left alone.
fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error())
        || resp.extensions().get::<OriginAnswer>().is_some()
        || resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
    {
        return resp;
    }
    let (code, message) = match status {
        StatusCode::NOT_FOUND => (codes::NOT_FOUND, "no such route"),
        StatusCode::METHOD_NOT_ALLOWED => (
            codes::METHOD_NOT_ALLOWED,
            "method not allowed on this route",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (codes::PAYLOAD_TOO_LARGE, "request body too large"),
        StatusCode::TOO_MANY_REQUESTS => (codes::RATE_LIMITED, "too many requests"),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
            (codes::HEADERS_TOO_LARGE, "request headers too large")
        }
        StatusCode::GATEWAY_TIMEOUT => (codes::TIMEOUT, "the request took too long"),
        StatusCode::SERVICE_UNAVAILABLE => (codes::UNAVAILABLE, "service unavailable"),
        s if s.is_client_error() => (codes::INVALID_ARGUMENT, "bad request"),
        _ => (codes::INTERNAL, "internal error"),
    };
    let mut out = error_response(status, code, message);
    for name in [header::ALLOW, header::VARY, header::RETRY_AFTER] {
        if let Some(v) = resp.headers().get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

/// A compressed body is a different representation: its ETag becomes weak, as nginx does.
fn weaken_etag_when_compressed(mut resp: Response) -> Response {
    if resp.headers().contains_key(header::CONTENT_ENCODING) {
        let weak = resp
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.starts_with("W/"))
            .and_then(|v| HeaderValue::from_str(&format!("W/{v}")).ok());
        if let Some(weak) = weak {
            resp.headers_mut().insert(header::ETAG, weak);
        }
    }
    resp
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, codes::NOT_FOUND, "no such route")
}

async fn method_not_allowed() -> Response {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        codes::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

/// Raw body extractor: our error format, 413 above the body limit.
#[derive(Debug, Clone, Default)]
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = AppError;

    async fn from_request(req: Request<Body>, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    AppError::PayloadTooLarge("request body too large".into())
                } else {
                    AppError::InvalidArgument("could not read the request body".into())
                }
            })
    }
}

/// Parses a JSON body (whatever its declared content type) with our error format.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    serde_json::from_slice(bytes)
        .map_err(|e| AppError::InvalidArgument(format!("invalid JSON body: {e}")))
}

/// JSON body extractor: any content type, our error format, 413 above the body limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for AppJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request<Body>, state: &S) -> Result<Self, Self::Rejection> {
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        parse_json(&bytes).map(AppJson)
    }
}

/// Query extractor with our error format.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for AppQuery<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| AppQuery(q.0))
            .map_err(|e: QueryRejection| AppError::InvalidArgument(e.body_text()))
    }
}

/// The status of an answer as an `IntoResponse` helper for JSON bodies.
pub fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    (status, axum::Json(body)).into_response()
}

#[cfg(test)]
pub(crate) mod tests {
    /// The shipped view table (`config/default.toml`).
    pub(crate) fn shipped_table() -> crate::domain::ViewTable {
        crate::config::Settings::load_from(None, Some(Default::default()))
            .expect("default settings")
            .view_table()
            .expect("the shipped views")
    }

    /// The shipped write rules.
    pub(crate) fn shipped_rules() -> crate::domain::WriteRules {
        crate::config::Settings::load_from(None, Some(Default::default()))
            .expect("default settings")
            .write_rules()
            .expect("the shipped rules")
    }

    /// The shipped event kinds.
    pub(crate) fn shipped_kinds() -> crate::domain::EventKinds {
        crate::config::Settings::load_from(None, Some(Default::default()))
            .expect("default settings")
            .event_kinds()
            .expect("the shipped kinds")
    }
}

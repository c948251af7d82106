//! Operations routes, without auth: liveness, readiness, Prometheus metrics.
//! (`/openapi.json` and `/docs` are mounted in `http::build_app`; only their documentation
//! is here.)

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::json;
use crate::metrics::names;
use crate::state::AppState;
use crate::store::Tier;

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_health))
        .routes(routes!(get_ready))
        .routes(routes!(get_metrics))
}

/// Liveness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// The process is up.
#[utoipa::path(get, path = "/health", tag = "ops", responses((status = 200, description = "Alive", body = Health)))]
pub async fn get_health() -> Response {
    json(
        StatusCode::OK,
        &Health {
            status: "ok".into(),
        },
    )
}

/// Reachability of a dependency, as the last background probe found it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Reachability {
    /// Answered within the probe time-out (`false` until the first probe finished).
    pub reachable: bool,
    /// How long ago that probe finished, in ms (`null` before the first one).
    pub checked_ms_ago: Option<u64>,
}

/// Readiness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// `ready`, or `starting` (503) until start-up work is done.
    pub status: String,
    /// Store in use: `redis` or `memory`.
    pub store: String,
    /// Key version in use.
    pub version: String,
    /// Redis, as last probed (every `server.ready_probe_interval_ms`).
    pub redis: Reachability,
    /// The origin, as last probed (any HTTP answer counts).
    pub origin: Reachability,
}

/// Probes Redis and the origin once, and records what it found for `/ready`.
pub async fn probe_readiness(state: &AppState) {
    let probe = Duration::from_millis(state.settings.redis.connect_timeout_ms.max(200));
    let (redis, origin) = tokio::join!(
        async {
            tokio::time::timeout(probe, state.store.tiered().redis_reachable())
                .await
                .unwrap_or(false)
        },
        state.views.origin().is_reachable(Duration::from_secs(1)),
    );
    state.readiness.record(redis, origin);
}

/// Ready to serve. A Redis or origin outage is reported but stays `200`: the instance still
/// serves (from memory, or stale entries), so it must stay in rotation. Reachability comes from
/// a background probe, never from this request.
#[utoipa::path(get, path = "/ready", tag = "ops",
    responses((status = 200, description = "Serving (dependencies' reachability reported)", body = Ready),
        (status = 503, description = "Still starting", body = Ready)))]
pub async fn get_ready(State(state): State<AppState>) -> Response {
    let last = state.readiness.last();
    let reach = |pick: fn((bool, bool, u64)) -> bool| Reachability {
        reachable: last.is_some_and(pick),
        checked_ms_ago: last.map(|(_, _, ago)| ago),
    };
    let (redis, origin) = (reach(|l| l.0), reach(|l| l.1));
    let started = state.started.load(Ordering::Acquire);
    let body = Ready {
        status: if started { "ready" } else { "starting" }.into(),
        store: state.store.tiered().tier().as_str().into(),
        version: state.version.get().as_str().to_owned(),
        redis,
        origin,
    };
    let status = if started {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &body)
}

/// Prometheus metrics, text format.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text exposition format (version 0.0.4)", body = String, content_type = "text/plain")))]
pub async fn get_metrics(State(state): State<AppState>) -> Response {
    let memory = state.store.tiered().memory();
    metrics::gauge!(names::REDIS_UP).set(if state.store.tiered().tier() == Tier::Redis {
        1.0
    } else {
        0.0
    });
    metrics::gauge!(names::MEMORY_ENTRIES).set(memory.entry_count() as f64);
    metrics::gauge!(names::MEMORY_BYTES).set(memory.weighted_size() as f64);
    metrics::gauge!(names::NEAR_CACHE_BYTES).set(state.store.near_counts().bytes as f64);
    metrics::gauge!(names::PENDING_INVALIDATIONS)
        .set(state.store.tiered().pending_invalidations() as f64);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        state.prometheus.render(),
    )
        .into_response()
}

/// This OpenAPI document, as JSON (`openapi.yaml` holds the same as YAML).
// Documentation only: the route is served by utoipa-swagger-ui, mounted in `http::build_app`.
#[utoipa::path(get, path = "/openapi.json", tag = "ops",
    responses((status = 200, description = "OpenAPI 3.1 document", body = Object, content_type = "application/json")))]
pub fn get_openapi_json() {}

/// Interactive API documentation (Swagger UI).
// Documentation only: the route is served by utoipa-swagger-ui, mounted in `http::build_app`.
#[utoipa::path(get, path = "/docs", tag = "ops",
    responses(
        (status = 200, description = "The Swagger UI page (at `/docs/`)", body = String, content_type = "text/html"),
        (status = 303, description = "Redirect to `/docs/`", headers(("Location" = String, description = "`/docs/`"))),
    ))]
pub fn get_docs() {}

//! Admin routes (bearer token): statistics, pattern clears, invalidation, warming and the
//! shared key version. `/api/v1/models/cache/{stats,clear}` are aliases for backend clients.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use axum::extract::State;
use axum::response::Response;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::AdminAuth;
use super::views::run_id_from_json;
use super::{AppJson, AppQuery, json};
use crate::cache::fallback::TierCounts;
use crate::cache::policy::TtlTier;
use crate::cache::read_through::WarmReport;
use crate::cache::redis::RedisInfo;
use crate::cache::snapshot::SnapshotStatus;
use crate::cache::{Store, Tier, View, validate_logical_key, validate_pattern, validate_version};
use crate::error::{AppError, ErrorBody, Result};
use crate::invalidation::{Cause, VersionSwitch};
use crate::metrics::stats::ViewStats;
use crate::state::AppState;

/// Most runs one `/cache/warm` call may name.
const MAX_WARM_IDS: usize = 100;
/// Most keys one `/cache/invalidate` call may name.
const MAX_INVALIDATE_KEYS: usize = 1000;

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_stats))
        .routes(routes!(get_stats_alias))
        .routes(routes!(clear_cache))
        .routes(routes!(clear_cache_alias))
        .routes(routes!(create_invalidation))
        .routes(routes!(create_warmup))
        .routes(routes!(switch_version))
}

/// Counters over every view.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsBody {
    /// Requests served from the cache.
    pub hits: u64,
    /// Requests fetched from the origin.
    pub misses: u64,
    /// hits / (hits + misses) × 100.
    pub hit_rate_percent: f64,
    /// Cached-view requests answered, whatever the outcome.
    pub total_requests: u64,
    /// `use_cache=false` requests.
    pub bypasses: u64,
    /// Expired copies served.
    pub stale_served: u64,
    /// Entries written.
    pub sets: u64,
    /// Entries deleted by invalidations and clears.
    pub deletes: u64,
    /// Invalidation operations.
    pub invalidations: u64,
    /// Origin requests made.
    pub origin_fetches: u64,
    /// Origin requests that failed.
    pub origin_errors: u64,
    /// Misses that waited for another request's origin fetch.
    pub coalesced: u64,
    /// Mean request latency.
    pub avg_latency_ms: f64,
    /// Median request latency.
    pub p50_latency_ms: f64,
    /// 95th percentile request latency.
    pub p95_latency_ms: f64,
    /// 99th percentile request latency.
    pub p99_latency_ms: f64,
    /// Entries of the current version in the store in use.
    pub keys: u64,
    /// Origin time the hits avoided (hits × mean origin latency, per view).
    pub time_saved_ms_estimate: f64,
    /// Entries filled by warming.
    pub warmed: u64,
    /// Entries warming could not fill.
    pub warm_errors: u64,
    /// Refresh-ahead fetches, all results.
    pub refreshes: u64,
    /// Refreshes that found the content unchanged (TTL extended, nothing rewritten).
    pub refresh_unchanged: u64,
    /// Refreshes that found new content.
    pub refresh_changed: u64,
    /// Refreshes that found the run gone.
    pub refresh_gone: u64,
    /// Refreshes that failed.
    pub refresh_errors: u64,
}

/// Counters of one view.
#[derive(Debug, Serialize, ToSchema)]
pub struct ViewStatsBody {
    /// Served from the cache.
    pub hits: u64,
    /// Fetched from the origin.
    pub misses: u64,
    /// hits / (hits + misses) × 100.
    pub hit_rate_percent: f64,
    /// `use_cache=false`.
    pub bypasses: u64,
    /// Expired copies served.
    pub stale_served: u64,
    /// Answered with an error.
    pub errors: u64,
    /// Origin requests.
    pub origin_fetches: u64,
    /// Failed origin requests.
    pub origin_errors: u64,
    /// Mean origin latency.
    pub avg_origin_latency_ms: f64,
    /// Mean request latency.
    pub avg_latency_ms: f64,
    /// 95th percentile request latency.
    pub p95_latency_ms: f64,
    /// Requests that waited for another request's fetch.
    pub coalesced: u64,
    /// Refreshes that found the content unchanged.
    pub refresh_unchanged: u64,
    /// Refreshes that found new content.
    pub refresh_changed: u64,
    /// Configured TTL in seconds.
    pub ttl_seconds: u64,
}

/// The memory tier's size.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemoryBody {
    /// Entries held.
    pub entries: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Byte bound.
    pub max_bytes: u64,
    /// Entries evicted to stay within the bound.
    pub evictions: u64,
    /// Entries expired.
    pub expirations: u64,
    /// Snapshots (absent when `memory.snapshot_path` is unset).
    pub snapshot: Option<SnapshotStatus>,
}

/// Configuration figures shown in stats.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigBody {
    /// Key prefix.
    pub prefix: String,
    /// TTL tiers in seconds.
    pub ttl_very_short: u64,
    /// 900
    pub ttl_short: u64,
    /// 1800
    pub ttl_medium: u64,
    /// 3600
    pub ttl_long: u64,
    /// 7200
    pub ttl_very_long: u64,
    /// 86400
    pub ttl_day: u64,
    /// 604800
    pub ttl_week: u64,
}

/// `GET /cache/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsResponse {
    /// The cache can serve and store (always true: memory backs Redis).
    pub available: bool,
    /// Store in use: `redis` or `memory`.
    pub backend: String,
    /// Key version in use.
    pub version: String,
    /// Whether Redis is in use.
    pub redis_reachable: bool,
    /// Invalidations made during a Redis outage, waiting to be replayed.
    pub pending_invalidations: u64,
    /// Totals.
    pub stats: StatsBody,
    /// Per-view breakdown, keyed `metrics`, `feature_importance`, `comparison`.
    pub views: BTreeMap<String, ViewStatsBody>,
    /// Redis INFO figures (absent while on memory).
    pub redis: Option<RedisInfo>,
    /// Memory tier size.
    pub memory: MemoryBody,
    /// Operations and errors per tier, and circuit openings.
    pub store: TierCounts,
    /// TTL tiers and prefix.
    pub config: ConfigBody,
    /// Summary.
    pub message: String,
}

fn rate(hits: u64, misses: u64) -> f64 {
    let total = hits + misses;
    if total == 0 {
        0.0
    } else {
        (hits as f64 * 10_000.0 / total as f64).round() / 100.0
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn view_body(v: &ViewStats, ttl_seconds: u64) -> ViewStatsBody {
    let hits = v.hits.load(Relaxed);
    let misses = v.misses.load(Relaxed);
    ViewStatsBody {
        hits,
        misses,
        hit_rate_percent: rate(hits, misses),
        bypasses: v.bypasses.load(Relaxed),
        stale_served: v.stale_served.load(Relaxed),
        errors: v.errors.load(Relaxed),
        origin_fetches: v.origin_fetches.load(Relaxed),
        origin_errors: v.origin_errors.load(Relaxed),
        avg_origin_latency_ms: round2(v.mean_origin_ms()),
        avg_latency_ms: round2(v.latency.mean_ms()),
        p95_latency_ms: round2(v.latency.quantile_ms(0.95)),
        coalesced: v.coalesced.load(Relaxed),
        refresh_unchanged: v.refresh_unchanged.load(Relaxed),
        refresh_changed: v.refresh_changed.load(Relaxed),
        ttl_seconds,
    }
}

async fn stats(state: &AppState) -> StatsResponse {
    let s = &state.stats;
    let version = state.version.get();
    let tier = state.store.tier();
    let keys = state
        .store
        .count_matching(&state.keys.entry_pattern(&version, "*"))
        .await
        .unwrap_or(0);
    let redis = match tier {
        Tier::Redis => state.store.redis().info().await.ok(),
        Tier::Memory => None,
    };
    let memory = state.store.memory();
    memory.run_pending_tasks().await;
    let hits = s.sum(|v| &v.hits);
    let misses = s.sum(|v| &v.misses);
    let ttls = [
        state.settings.views.metrics.ttl.0.as_secs(),
        state.settings.views.feature_importance.ttl.0.as_secs(),
        state.settings.views.comparison.ttl.0.as_secs(),
    ];
    let tier_secs = |t: TtlTier| t.secs();
    StatsResponse {
        available: true,
        backend: tier.as_str().to_owned(),
        version: version.as_str().to_owned(),
        redis_reachable: tier == Tier::Redis,
        pending_invalidations: state.store.pending_invalidations().await as u64,
        stats: StatsBody {
            hits,
            misses,
            hit_rate_percent: rate(hits, misses),
            total_requests: s.latency.count(),
            bypasses: s.sum(|v| &v.bypasses),
            stale_served: s.sum(|v| &v.stale_served),
            sets: s.sets.load(Relaxed),
            deletes: s.deletes.load(Relaxed),
            invalidations: s.invalidations.load(Relaxed),
            origin_fetches: s.sum(|v| &v.origin_fetches),
            origin_errors: s.sum(|v| &v.origin_errors),
            coalesced: s.sum(|v| &v.coalesced),
            avg_latency_ms: round2(s.latency.mean_ms()),
            p50_latency_ms: round2(s.latency.quantile_ms(0.50)),
            p95_latency_ms: round2(s.latency.quantile_ms(0.95)),
            p99_latency_ms: round2(s.latency.quantile_ms(0.99)),
            keys,
            time_saved_ms_estimate: round2(
                View::ALL.iter().map(|v| s.view(*v).time_saved_ms()).sum(),
            ),
            warmed: s.warmed.load(Relaxed),
            warm_errors: s.warm_errors.load(Relaxed),
            refreshes: s.sum(|v| &v.refresh_unchanged)
                + s.sum(|v| &v.refresh_changed)
                + s.sum(|v| &v.refresh_gone)
                + s.sum(|v| &v.refresh_errors),
            refresh_unchanged: s.sum(|v| &v.refresh_unchanged),
            refresh_changed: s.sum(|v| &v.refresh_changed),
            refresh_gone: s.sum(|v| &v.refresh_gone),
            refresh_errors: s.sum(|v| &v.refresh_errors),
        },
        views: View::ALL
            .iter()
            .map(|v| (v.name().to_owned(), view_body(s.view(*v), ttls[v.index()])))
            .collect(),
        redis,
        memory: MemoryBody {
            entries: memory.entry_count(),
            bytes: memory.weighted_size(),
            max_bytes: memory.max_bytes(),
            evictions: memory.removals().evicted.load(Relaxed),
            expirations: memory.removals().expired.load(Relaxed),
            snapshot: state.snapshots.as_ref().map(|s| s.status()),
        },
        store: state.store.counts(),
        config: ConfigBody {
            prefix: state.keys.prefix().to_owned(),
            ttl_very_short: tier_secs(TtlTier::VeryShort),
            ttl_short: tier_secs(TtlTier::Short),
            ttl_medium: tier_secs(TtlTier::Medium),
            ttl_long: tier_secs(TtlTier::Long),
            ttl_very_long: tier_secs(TtlTier::VeryLong),
            ttl_day: tier_secs(TtlTier::Day),
            ttl_week: tier_secs(TtlTier::Week),
        },
        message: format!(
            "Cache statistics retrieved successfully ({} backend, {} entries)",
            tier.as_str(),
            keys
        ),
    }
}

/// Cache statistics.
#[utoipa::path(get, path = "/cache/stats", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = StatsResponse), (status = 401, body = ErrorBody)))]
pub async fn get_stats(_: AdminAuth, State(state): State<AppState>) -> Response {
    json(StatusCode::OK, &stats(&state).await)
}

/// Alias of `GET /cache/stats`.
#[utoipa::path(get, path = "/api/v1/models/cache/stats", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = StatsResponse), (status = 401, body = ErrorBody)))]
pub async fn get_stats_alias(auth: AdminAuth, state: State<AppState>) -> Response {
    get_stats(auth, state).await
}

/// Query of a clear.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ClearQuery {
    /// Glob over logical keys (`*`, `?`), e.g. `model:metrics:*`. Absent: every entry.
    pub pattern: Option<String>,
}

/// Result of a clear.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClearResponse {
    /// Summary.
    pub message: String,
    /// Entries deleted.
    pub deleted_count: u64,
    /// The pattern applied.
    pub pattern: String,
}

/// Deletes the entries of the current version whose logical key matches `pattern`
/// (SCAN in batches; only this service's prefix and version are touched).
#[utoipa::path(delete, path = "/cache/clear", tag = "admin", security(("bearer" = [])), params(ClearQuery),
    responses((status = 200, body = ClearResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn clear_cache(
    _: AdminAuth,
    State(state): State<AppState>,
    AppQuery(q): AppQuery<ClearQuery>,
) -> Result<Response> {
    let pattern = q.pattern.unwrap_or_else(|| "*".to_owned());
    validate_pattern(&pattern).map_err(AppError::InvalidArgument)?;
    let deleted_count = state.invalidator.pattern(&pattern, Cause::Clear).await?;
    tracing::info!(pattern = %pattern, deleted_count, "cache cleared");
    Ok(json(
        StatusCode::OK,
        &ClearResponse {
            message: format!("Cleared {deleted_count} cache entries matching pattern: {pattern}"),
            deleted_count,
            pattern,
        },
    ))
}

/// Alias of `DELETE /cache/clear`.
#[utoipa::path(delete, path = "/api/v1/models/cache/clear", tag = "admin", security(("bearer" = [])), params(ClearQuery),
    responses((status = 200, body = ClearResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn clear_cache_alias(
    auth: AdminAuth,
    state: State<AppState>,
    query: AppQuery<ClearQuery>,
) -> Result<Response> {
    clear_cache(auth, state, query).await
}

/// What to invalidate: exactly one of the three fields.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvalidateBody {
    /// A run: its metrics, feature importance and comparisons.
    #[schema(value_type = Option<Object>, example = json!("42"))]
    pub model_run_id: Option<Value>,
    /// A whole view: `metrics`, `feature_importance` or `comparison`.
    pub namespace: Option<String>,
    /// Logical keys, e.g. `model:metrics:42`.
    pub keys: Option<Vec<String>>,
}

/// Result of an invalidation.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvalidatedResponse {
    /// Entries dropped.
    pub invalidated: u64,
}

/// Invalidates a run, a namespace or a list of keys.
#[utoipa::path(post, path = "/cache/invalidate", tag = "admin", security(("bearer" = [])), request_body = InvalidateBody,
    responses((status = 200, body = InvalidatedResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn create_invalidation(
    _: AdminAuth,
    State(state): State<AppState>,
    AppJson(body): AppJson<InvalidateBody>,
) -> Result<Response> {
    let invalidated = match (&body.model_run_id, &body.namespace, &body.keys) {
        (Some(id), None, None) => {
            let id = run_id_from_json(id)?;
            state.invalidator.run(&id, Cause::Admin).await?
        }
        (None, Some(ns), None) => {
            let view = View::from_name(ns).ok_or_else(|| {
                AppError::InvalidArgument(
                    "namespace must be one of metrics, feature_importance, comparison".into(),
                )
            })?;
            let pattern = format!("model:{}:*", view.name());
            state.invalidator.pattern(&pattern, Cause::Admin).await?
        }
        (None, None, Some(keys)) => {
            if keys.is_empty() || keys.len() > MAX_INVALIDATE_KEYS {
                return Err(AppError::InvalidArgument(format!(
                    "keys must hold between 1 and {MAX_INVALIDATE_KEYS} keys"
                )));
            }
            for k in keys {
                validate_logical_key(k).map_err(AppError::InvalidArgument)?;
            }
            state.invalidator.keys(keys).await?
        }
        _ => {
            return Err(AppError::InvalidArgument(
                "give exactly one of model_run_id, namespace, keys".into(),
            ));
        }
    };
    Ok(json(StatusCode::OK, &InvalidatedResponse { invalidated }))
}

/// Runs to warm.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmBody {
    /// 1-100 run ids (strings or non-negative integers).
    #[schema(value_type = Vec<Object>, example = json!(["41", "42"]))]
    pub model_run_ids: Vec<Value>,
}

/// Fetches and stores the metrics and feature importance of runs not cached yet.
#[utoipa::path(post, path = "/cache/warm", tag = "admin", security(("bearer" = [])), request_body = WarmBody,
    responses((status = 200, body = WarmReport), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn create_warmup(
    _: AdminAuth,
    State(state): State<AppState>,
    AppJson(body): AppJson<WarmBody>,
) -> Result<Response> {
    if body.model_run_ids.is_empty() || body.model_run_ids.len() > MAX_WARM_IDS {
        return Err(AppError::InvalidArgument(format!(
            "model_run_ids must hold between 1 and {MAX_WARM_IDS} ids"
        )));
    }
    let mut ids: Vec<String> = body
        .model_run_ids
        .iter()
        .map(run_id_from_json)
        .collect::<Result<_>>()?;
    ids.sort();
    ids.dedup();
    let report = state
        .views
        .warm(&ids, state.settings.warm.concurrency)
        .await;
    tracing::info!(
        warmed = report.warmed,
        skipped = report.skipped,
        failed = report.failed.len(),
        "warm-up done"
    );
    Ok(json(StatusCode::OK, &report))
}

/// The version to switch to.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VersionBody {
    /// `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`, e.g. `v2`.
    pub version: String,
}

/// Switches the key version for every instance on the same Redis; every older entry becomes
/// unreachable, and entries stored under the new version earlier are cleared first.
#[utoipa::path(post, path = "/cache/version", tag = "admin", security(("bearer" = [])), request_body = VersionBody,
    responses((status = 200, body = VersionSwitch), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 503, description = "Redis, where the version lives, is unreachable", body = ErrorBody)))]
pub async fn switch_version(
    _: AdminAuth,
    State(state): State<AppState>,
    AppJson(body): AppJson<VersionBody>,
) -> Result<Response> {
    validate_version(&body.version).map_err(AppError::InvalidArgument)?;
    let switched = state.invalidator.switch_version(&body.version).await?;
    Ok(json(StatusCode::OK, &switched))
}

//! `GET /cache/stats` (and its alias `/api/v1/models/cache/stats`): counters, latency
//! percentiles, the per-view breakdown, Redis INFO figures, the memory tier and snapshots,
//! the hottest keys and the recent admin actions; and `GET /cache/stats/history`, the
//! periodic samples behind the dashboard's charts.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use axum::extract::State;
use axum::response::Response;
use http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppQuery;
use super::auth::AdminAuth;
use super::json;
use crate::domain::TtlTier;
use crate::error::{AppError, ErrorBody};
use crate::metrics::audit::AuditRecord;
use crate::metrics::history::{Reading, Sample};
use crate::metrics::stats::{ViewStats, hit_rate, quantile_of, round2};
use crate::state::AppState;
use crate::store::Tier;
use crate::store::near::NearCounts;
use crate::store::redis::RedisInfo;
use crate::store::snapshot::SnapshotStatus;
use crate::store::tiered::TierCounts;

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_stats))
        .routes(routes!(get_stats_alias))
        .routes(routes!(get_stats_history))
}

/// Hot keys shown in `/cache/stats`.
const HOT_KEYS: usize = 10;

/// One of the most read keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct HotKey {
    /// Logical key, e.g. `model:metrics:42`.
    pub key: String,
    /// Reads this instance counted recently (a key is forgotten 10 minutes after its last
    /// read); refresh-ahead refreshes a key from `refresh.min_hits` reads.
    pub reads: u32,
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
    /// Origin answers with `Vary` not stored because their entry already had
    /// `cache.max_variants` variants.
    pub variants_refused: u64,
    /// View requests the hit lane served without the router, other than from a near-cache
    /// copy (those are `l1.lane_hits`): entries in Redis or the memory tier, misses.
    pub lane_served: u64,
    /// Event-stream entries set aside in the dead-letter stream after
    /// `events.max_deliveries` failed deliveries (read them with `XRANGE`).
    pub stream_dead_lettered: u64,
    /// Mean request latency.
    pub avg_latency_ms: f64,
    /// Median request latency.
    pub p50_latency_ms: f64,
    /// 95th percentile request latency.
    pub p95_latency_ms: f64,
    /// 99th percentile request latency.
    pub p99_latency_ms: f64,
    /// Entries of the current version in the store in use (see `keys_method`).
    pub keys: u64,
    /// How `keys` was counted: `scan` (one SCAN of Redis at a time, at most every 10 s,
    /// whatever the number of callers; `keys_age_ms` old), `memory` (counted now) or
    /// `pending` (no SCAN of this version has finished yet; `keys` is 0).
    pub keys_method: String,
    /// Milliseconds since `keys` was counted.
    pub keys_age_ms: u64,
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
    /// Refreshes the origin refused to the refreshing credential.
    pub refresh_refused: u64,
    /// Keys backing off after failed refreshes (bounded, forgotten after
    /// `refresh.max_backoff_secs`).
    pub refresh_backoff_keys: u64,
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
    /// Counters the memory tier holds (none while Redis serves; bounded).
    pub generations: u64,
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
    /// The in-process near cache in front of Redis (`l1.*`).
    pub l1: NearCounts,
    /// TTL tiers and prefix.
    pub config: ConfigBody,
    /// The most read keys of the current version on this instance, most read first (at most
    /// 10; from the refresh-ahead read counters, which count fresh hits while
    /// `refresh.min_hits` is above 0). Recomputed at each history sample
    /// (`admin.history_interval_ms`), off the request path.
    pub hot_keys: Vec<HotKey>,
    /// The last admin actions and events this instance applied, newest first (at most
    /// `admin.recent_actions`; each is also an `audit` log line).
    pub recent_actions: Vec<AuditRecord>,
    /// Summary.
    pub message: String,
}

/// The hit rate `/cache/stats` shows: 0 with neither hits nor misses.
fn rate(hits: u64, misses: u64) -> f64 {
    hit_rate(hits, misses).unwrap_or(0.0)
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
    let tiered = state.store.tiered();
    let tier = tiered.tier();
    let counted = tiered.key_count(&version).await;
    let redis = tiered.info().await;
    let memory = tiered.memory();
    // The memory tier's sizes are exact as they are (expired entries count until the
    // housekeeping sweep, at most 5 s): its sweep walks every entry and stays off this route.
    if let Some(near) = state.store.near() {
        near.cache.run_pending_tasks();
    }
    // The totals the history samples too, read the same way.
    let r = reading(state);
    let quantile = |q| round2(quantile_of(&r.latency, q).unwrap_or(0.0));
    let table = state.views.table();
    let tier_secs = |t: TtlTier| t.secs();
    StatsResponse {
        available: true,
        backend: tier.as_str().to_owned(),
        version: version.as_str().to_owned(),
        redis_reachable: tier == Tier::Redis,
        pending_invalidations: r.pending_journal,
        stats: StatsBody {
            hits: r.hits,
            misses: r.misses,
            hit_rate_percent: rate(r.hits, r.misses),
            total_requests: r.requests,
            bypasses: s.sum(|v| &v.bypasses),
            stale_served: r.stale_served,
            sets: s.sets.load(Relaxed),
            deletes: s.deletes.load(Relaxed),
            invalidations: s.invalidations.load(Relaxed),
            origin_fetches: r.origin_fetches,
            origin_errors: r.origin_errors,
            coalesced: r.coalesced,
            variants_refused: s.variants_refused.load(Relaxed),
            lane_served: s.lane_served.load(Relaxed),
            stream_dead_lettered: s.stream_dead_lettered.load(Relaxed),
            avg_latency_ms: round2(s.latency.mean_ms()),
            p50_latency_ms: quantile(0.50),
            p95_latency_ms: quantile(0.95),
            p99_latency_ms: quantile(0.99),
            keys: counted.keys,
            keys_method: counted.method.to_owned(),
            keys_age_ms: counted.age_ms,
            time_saved_ms_estimate: round2(
                s.views().iter().map(|v| s.view(*v).time_saved_ms()).sum(),
            ),
            warmed: s.warmed.load(Relaxed),
            warm_errors: s.warm_errors.load(Relaxed),
            refreshes: s.sum(|v| &v.refresh_unchanged)
                + s.sum(|v| &v.refresh_changed)
                + s.sum(|v| &v.refresh_gone)
                + s.sum(|v| &v.refresh_refused)
                + s.sum(|v| &v.refresh_errors),
            refresh_unchanged: s.sum(|v| &v.refresh_unchanged),
            refresh_changed: s.sum(|v| &v.refresh_changed),
            refresh_gone: s.sum(|v| &v.refresh_gone),
            refresh_refused: s.sum(|v| &v.refresh_refused),
            refresh_errors: s.sum(|v| &v.refresh_errors),
            refresh_backoff_keys: state.views.refresh_backoff_keys(),
        },
        views: s
            .views()
            .iter()
            .map(|v| {
                (
                    v.name().to_owned(),
                    view_body(s.view(*v), table.get(*v).ttl_secs),
                )
            })
            .collect(),
        redis,
        memory: MemoryBody {
            entries: r.memory_entries,
            bytes: r.memory_bytes,
            max_bytes: memory.max_bytes(),
            evictions: memory.removals().evicted.load(Relaxed),
            expirations: memory.removals().expired.load(Relaxed),
            generations: memory.counter_count(),
            snapshot: state.snapshots.as_ref().map(|s| s.status()),
        },
        store: tiered.counts(),
        l1: state.store.near_counts(),
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
        hot_keys: state
            .history
            .hot()
            .into_iter()
            .map(|(key, reads)| HotKey { key, reads })
            .collect(),
        recent_actions: state.audit.recent(),
        message: format!(
            "Cache statistics retrieved successfully ({} backend, {} entries)",
            tier.as_str(),
            counted.keys
        ),
    }
}

/// Cache statistics.
#[utoipa::path(get, path = "/cache/stats", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "Statistics", body = StatsResponse),
        (status = 400, description = "More than one Authorization header", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody)))]
pub async fn get_stats(_: AdminAuth, State(state): State<AppState>) -> Response {
    json(StatusCode::OK, &stats(&state).await)
}

/// Alias of `GET /cache/stats`.
#[utoipa::path(get, path = "/api/v1/models/cache/stats", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "Statistics", body = StatsResponse),
        (status = 400, description = "More than one Authorization header", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody)))]
pub async fn get_stats_alias(auth: AdminAuth, state: State<AppState>) -> Response {
    get_stats(auth, state).await
}

/// Takes one history sample, then recomputes the most read keys of the current version on a
/// blocking thread: walking up to 100 000 counters must not hold a request worker.
pub async fn sample(state: &AppState) {
    state.history.push(reading(state));
    let counters = state.store.counters().clone();
    let keys = state.keys.clone();
    let version = state.version.get();
    let hot = tokio::task::spawn_blocking(move || {
        counters
            .hottest(HOT_KEYS, |k| keys.logical(&version, k).is_some())
            .into_iter()
            .filter_map(|(k, reads)| Some((keys.logical(&version, &k)?.to_owned(), reads)))
            .collect()
    })
    .await;
    if let Ok(hot) = hot {
        state.history.set_hot(hot);
    }
}

/// The figures a history sample is made of, read now. Every one is an atomic load or a
/// gauge the store keeps: sampling adds nothing to the request path.
pub fn reading(state: &AppState) -> Reading {
    let s = &state.stats;
    let tiered = state.store.tiered();
    let memory = tiered.memory();
    let tier = tiered.tier();
    Reading {
        at_ms: crate::domain::policy::now_ms(),
        mono_ms: state.history.mono_ms(),
        requests: s.latency.count(),
        hits: s.sum(|v| &v.hits),
        misses: s.sum(|v| &v.misses),
        stale_served: s.sum(|v| &v.stale_served),
        coalesced: s.sum(|v| &v.coalesced),
        origin_fetches: s.sum(|v| &v.origin_fetches),
        origin_errors: s.sum(|v| &v.origin_errors),
        latency: s.latency.counts(),
        backend: tier.as_str(),
        circuit_open: tier == Tier::Memory,
        redis_reachable: state.readiness.last().map(|(redis, _, _)| redis),
        memory_bytes: memory.weighted_size(),
        memory_entries: memory.entry_count(),
        near_bytes: state.store.near_counts().bytes,
        pending_journal: tiered.pending_invalidations() as u64,
    }
}

/// Query of `GET /cache/stats/history`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Only the samples taken after this time (Unix milliseconds): a page that polls passes
    /// the `t_ms` of the last sample it has. Absent: every sample kept.
    // i64, as the OpenAPI `int64` format says: a value past it is refused, not wrapped.
    #[param(minimum = 0)]
    pub since: Option<i64>,
}

/// `GET /cache/stats/history`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryResponse {
    /// Configured time between samples (`admin.history_interval_ms`).
    pub interval_ms: u64,
    /// Samples kept at most (`admin.history_samples`); older ones are dropped.
    pub capacity: u64,
    /// Key version in use now.
    pub version: String,
    /// This instance's id (the samples are its own: each instance keeps its history).
    pub instance: String,
    /// When this instance started, in Unix milliseconds; a restart starts a new history.
    pub started_ms: u64,
    /// The samples, oldest first. The first one, taken at start, has `interval_ms` 0.
    pub samples: Vec<Sample>,
}

/// Periodic samples of the headline figures: request and hit rate, latency percentiles, origin
/// rate and errors, stale serves, coalesced waiters, store and circuit state, memory-tier and
/// near-cache bytes, and the pending journal. Each sample covers the interval before it.
#[utoipa::path(get, path = "/cache/stats/history", tag = "admin", security(("bearer" = [])),
    params(HistoryQuery),
    responses((status = 200, description = "Samples, oldest first", body = HistoryResponse),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody)))]
pub async fn get_stats_history(
    _: AdminAuth,
    State(state): State<AppState>,
    AppQuery(q): AppQuery<HistoryQuery>,
) -> Result<Response, AppError> {
    let since = match q.since {
        None => 0,
        Some(t) => u64::try_from(t).map_err(|_| {
            AppError::InvalidArgument(
                "since must be a time in Unix milliseconds, at least 0".into(),
            )
        })?,
    };
    let h = &state.history;
    Ok(json(
        StatusCode::OK,
        &HistoryResponse {
            interval_ms: h.interval_ms(),
            capacity: h.capacity() as u64,
            version: state.version.get().as_str().to_owned(),
            instance: state.store.tiered().peers().id().to_owned(),
            started_ms: h.started_ms(),
            samples: h.since(since),
        },
    ))
}

//! Metrics: Prometheus names (constants with help text), the process-wide recorder, per-view
//! handles registered once at start (so recording is an atomic add), and `/cache/stats` counters.

pub mod audit;
pub mod history;
pub mod stats;

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::domain::View;
pub use stats::{Outcome, Stats};

/// Metric names.
pub mod names {
    /// Cached-view requests by view and result (hit, miss, bypass, stale, error).
    pub const VIEW_REQUESTS_TOTAL: &str = "runcache_view_requests_total";
    /// Cached-view request latency by view.
    pub const VIEW_REQUEST_DURATION: &str = "runcache_view_request_duration_seconds";
    /// Origin requests by view and outcome (ok, error).
    pub const ORIGIN_REQUESTS_TOTAL: &str = "runcache_origin_requests_total";
    /// Origin latency by view.
    pub const ORIGIN_REQUEST_DURATION: &str = "runcache_origin_request_duration_seconds";
    /// Entries written to the cache.
    pub const CACHE_SETS_TOTAL: &str = "runcache_cache_sets_total";
    /// Invalidation operations by cause.
    pub const INVALIDATIONS_TOTAL: &str = "runcache_invalidations_total";
    /// Entries dropped by invalidations, by cause.
    pub const ENTRIES_DELETED_TOTAL: &str = "runcache_entries_deleted_total";
    /// Switches from Redis to the memory tier.
    pub const CACHE_FALLBACK_TOTAL: &str = "runcache_cache_fallback_total";
    /// 1 while Redis is in use, 0 while serving from memory.
    pub const REDIS_UP: &str = "runcache_redis_up";
    /// 1 while the circuit around Redis is open (serving from memory).
    pub const CIRCUIT_OPEN: &str = "runcache_circuit_open";
    /// Store operations by tier (`redis`, `memory`).
    pub const STORE_OPERATIONS_TOTAL: &str = "runcache_store_operations_total";
    /// Failed store operations by tier.
    pub const STORE_ERRORS_TOTAL: &str = "runcache_store_errors_total";
    /// Memory-tier entries removed by cause (`size`: evicted, `expired`).
    pub const MEMORY_REMOVALS_TOTAL: &str = "runcache_memory_removals_total";
    /// Requests that waited for another request's origin fetch, by view.
    pub const COALESCED_TOTAL: &str = "runcache_coalesced_total";
    /// Refresh-ahead fetches by view and result (`unchanged`, `changed`, `gone`, `refused`,
    /// `error`).
    pub const REFRESHES_TOTAL: &str = "runcache_refreshes_total";
    /// Entries filled by warming.
    pub const WARMED_TOTAL: &str = "runcache_warmed_total";
    /// Entries warming could not fill.
    pub const WARM_ERRORS_TOTAL: &str = "runcache_warm_errors_total";
    /// Entries in the memory tier.
    pub const MEMORY_ENTRIES: &str = "runcache_memory_entries";
    /// Bytes in the memory tier.
    pub const MEMORY_BYTES: &str = "runcache_memory_bytes";
    /// Origin answers not stored because their entry had `cache.max_variants` variants.
    pub const VARIANTS_REFUSED_TOTAL: &str = "runcache_variants_refused_total";

    /// Event-stream entries handled, by outcome (`applied`, `invalid`).
    pub const STREAM_EVENTS_TOTAL: &str = "runcache_stream_events_total";
    /// Entries taken over from consumers that left them pending (a dead instance's).
    pub const STREAM_CLAIMED_TOTAL: &str = "runcache_stream_claimed_total";
    /// Gaps found in the event stream (entries trimmed before they were read), each handled
    /// by dropping every entry.
    pub const STREAM_GAPS_TOTAL: &str = "runcache_stream_gaps_total";
    /// Event-stream entries set aside in the dead-letter stream after `events.max_deliveries`
    /// failed deliveries (each replaced by an invalidation of every view it could touch).
    pub const STREAM_DEAD_LETTERED_TOTAL: &str = "runcache_stream_dead_lettered_total";
    /// Entries added to the stream and not yet delivered to the consumer group (`XINFO GROUPS`
    /// `lag`; -1 while Redis cannot tell).
    pub const STREAM_LAG: &str = "runcache_stream_lag";
    /// Entries delivered to the group and not yet acknowledged, by any instance.
    pub const STREAM_PENDING: &str = "runcache_stream_pending";
    /// Bytes in the near cache (in-process copies of Redis entries).
    pub const NEAR_CACHE_BYTES: &str = "runcache_near_cache_bytes";
    /// Invalidations journaled while Redis was unreachable, waiting to be replayed.
    pub const PENDING_INVALIDATIONS: &str = "runcache_pending_invalidations";

    /// Every family above: each is exported from start-up, at 0 for its known label values.
    pub const ALL: [&str; 28] = [
        VIEW_REQUESTS_TOTAL,
        VIEW_REQUEST_DURATION,
        ORIGIN_REQUESTS_TOTAL,
        ORIGIN_REQUEST_DURATION,
        CACHE_SETS_TOTAL,
        INVALIDATIONS_TOTAL,
        ENTRIES_DELETED_TOTAL,
        CACHE_FALLBACK_TOTAL,
        REDIS_UP,
        CIRCUIT_OPEN,
        STORE_OPERATIONS_TOTAL,
        STORE_ERRORS_TOTAL,
        MEMORY_REMOVALS_TOTAL,
        COALESCED_TOTAL,
        REFRESHES_TOTAL,
        WARMED_TOTAL,
        WARM_ERRORS_TOTAL,
        MEMORY_ENTRIES,
        MEMORY_BYTES,
        VARIANTS_REFUSED_TOTAL,
        STREAM_EVENTS_TOTAL,
        STREAM_CLAIMED_TOTAL,
        STREAM_GAPS_TOTAL,
        STREAM_DEAD_LETTERED_TOTAL,
        STREAM_LAG,
        STREAM_PENDING,
        NEAR_CACHE_BYTES,
        PENDING_INVALIDATIONS,
    ];
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the process-wide Prometheus recorder once and returns its handle.
/// Later calls (several apps in one test process) share the first recorder.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed; then ours renders empty, which is
            // visible on /metrics rather than fatal.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        names::VIEW_REQUESTS_TOTAL,
        "Cached-view requests by view and result"
    );
    describe_histogram!(
        names::VIEW_REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Cached-view request latency"
    );
    describe_counter!(
        names::ORIGIN_REQUESTS_TOTAL,
        "Origin requests by view and outcome"
    );
    describe_histogram!(
        names::ORIGIN_REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Origin request latency"
    );
    describe_counter!(names::CACHE_SETS_TOTAL, "Entries written to the cache");
    describe_counter!(
        names::INVALIDATIONS_TOTAL,
        "Invalidation operations by cause"
    );
    describe_counter!(
        names::ENTRIES_DELETED_TOTAL,
        "Entries dropped by invalidations, by cause"
    );
    describe_counter!(
        names::CACHE_FALLBACK_TOTAL,
        "Switches from Redis to the memory tier"
    );
    describe_gauge!(
        names::REDIS_UP,
        "1 while Redis is in use, 0 while serving from memory"
    );
    describe_gauge!(
        names::CIRCUIT_OPEN,
        "1 while the circuit around Redis is open (serving from memory)"
    );
    describe_counter!(names::STORE_OPERATIONS_TOTAL, "Store operations by tier");
    describe_counter!(names::STORE_ERRORS_TOTAL, "Failed store operations by tier");
    describe_counter!(
        names::MEMORY_REMOVALS_TOTAL,
        "Memory-tier entries removed, by cause (size, expired)"
    );
    describe_counter!(
        names::COALESCED_TOTAL,
        "Requests that waited for another request's origin fetch"
    );
    describe_counter!(
        names::REFRESHES_TOTAL,
        "Refresh-ahead fetches by view and result"
    );
    describe_counter!(names::WARMED_TOTAL, "Entries filled by warming");
    describe_counter!(names::WARM_ERRORS_TOTAL, "Entries warming could not fill");
    describe_counter!(
        names::VARIANTS_REFUSED_TOTAL,
        "Origin answers not stored because their entry had cache.max_variants variants"
    );
    describe_gauge!(names::MEMORY_ENTRIES, "Entries in the memory tier");
    describe_counter!(
        names::STREAM_EVENTS_TOTAL,
        "Event-stream entries handled, by outcome (applied, invalid)"
    );
    describe_counter!(
        names::STREAM_CLAIMED_TOTAL,
        "Event-stream entries taken over from consumers that left them pending"
    );
    describe_counter!(
        names::STREAM_GAPS_TOTAL,
        "Gaps found in the event stream (entries trimmed before they were read)"
    );
    describe_counter!(
        names::STREAM_DEAD_LETTERED_TOTAL,
        "Event-stream entries set aside in the dead-letter stream after max_deliveries failed deliveries"
    );
    describe_gauge!(
        names::STREAM_LAG,
        "Event-stream entries not yet delivered to the consumer group (-1: unknown)"
    );
    describe_gauge!(
        names::STREAM_PENDING,
        "Event-stream entries delivered and not yet acknowledged"
    );
    for outcome in ["applied", "invalid"] {
        metrics::counter!(names::STREAM_EVENTS_TOTAL, "outcome" => outcome).increment(0);
    }
    metrics::gauge!(names::STREAM_LAG).set(0.0);
    metrics::gauge!(names::STREAM_PENDING).set(0.0);
    // Label-less counters are registered at zero, so dashboards see them before the first event.
    for name in [
        names::CACHE_SETS_TOTAL,
        names::CACHE_FALLBACK_TOTAL,
        names::WARMED_TOTAL,
        names::WARM_ERRORS_TOTAL,
        names::VARIANTS_REFUSED_TOTAL,
        names::STREAM_CLAIMED_TOTAL,
        names::STREAM_GAPS_TOTAL,
        names::STREAM_DEAD_LETTERED_TOTAL,
    ] {
        metrics::counter!(name).increment(0);
    }
    describe_gauge!(
        names::MEMORY_BYTES,
        metrics::Unit::Bytes,
        "Bytes in the memory tier"
    );
    describe_gauge!(
        names::NEAR_CACHE_BYTES,
        metrics::Unit::Bytes,
        "Bytes in the near cache (in-process copies of Redis entries)"
    );
    describe_gauge!(
        names::PENDING_INVALIDATIONS,
        "Invalidations journaled while Redis was unreachable, waiting to be replayed"
    );
    metrics::gauge!(names::NEAR_CACHE_BYTES).set(0.0);
    metrics::gauge!(names::PENDING_INVALIDATIONS).set(0.0);
}

/// Prometheus handles of one view, registered once so the request path only adds atomically.
#[derive(Debug)]
pub struct ViewHandles {
    results: [Counter; 5],
    durations: [Histogram; 5],
    origin_ok: Counter,
    origin_error: Counter,
    origin_duration: Histogram,
    coalesced: Counter,
    refreshes: [Counter; 5],
}

/// Results of a refresh-ahead fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshResult {
    /// Same content (volatile fields ignored): the TTL was extended, nothing rewritten.
    Unchanged,
    /// New content: stored, and the run's dependent entries invalidated.
    Changed,
    /// The origin no longer has the run: its entries were removed.
    Gone,
    /// The origin refused the refreshing credential (401, 403, or a 404 that hides the run
    /// from it): its acceptance is withdrawn, nothing else changes.
    Refused,
    /// The fetch failed; the entry stays servable and the key backs off.
    Error,
}

impl RefreshResult {
    const ALL: [RefreshResult; 5] = [
        RefreshResult::Unchanged,
        RefreshResult::Changed,
        RefreshResult::Gone,
        RefreshResult::Refused,
        RefreshResult::Error,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshResult::Unchanged => "unchanged",
            RefreshResult::Changed => "changed",
            RefreshResult::Gone => "gone",
            RefreshResult::Refused => "refused",
            RefreshResult::Error => "error",
        }
    }
}

const OUTCOMES: [Outcome; 5] = [
    Outcome::Hit,
    Outcome::Miss,
    Outcome::Bypass,
    Outcome::Stale,
    Outcome::Error,
];

impl ViewHandles {
    /// Registers the handles of `view`.
    pub fn register(view: View) -> Self {
        let v = view.name();
        Self {
            results: OUTCOMES.map(|o| {
                metrics::counter!(names::VIEW_REQUESTS_TOTAL, "view" => v, "result" => o.as_str())
            }),
            durations: OUTCOMES.map(|o| {
                metrics::histogram!(names::VIEW_REQUEST_DURATION, "view" => v, "result" => o.as_str())
            }),
            origin_ok: metrics::counter!(names::ORIGIN_REQUESTS_TOTAL, "view" => v, "outcome" => "ok"),
            origin_error: metrics::counter!(names::ORIGIN_REQUESTS_TOTAL, "view" => v, "outcome" => "error"),
            origin_duration: metrics::histogram!(names::ORIGIN_REQUEST_DURATION, "view" => v),
            coalesced: metrics::counter!(names::COALESCED_TOTAL, "view" => v),
            refreshes: RefreshResult::ALL.map(|r| {
                metrics::counter!(names::REFRESHES_TOTAL, "view" => v, "result" => r.as_str())
            }),
        }
    }

    fn request(&self, outcome: Outcome, elapsed: Duration) {
        let i = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(0);
        self.results[i].increment(1);
        self.durations[i].record(elapsed.as_secs_f64());
    }

    fn coalesced(&self) {
        self.coalesced.increment(1);
    }

    fn refresh(&self, result: RefreshResult) {
        let i = RefreshResult::ALL
            .iter()
            .position(|r| *r == result)
            .unwrap_or(0);
        self.refreshes[i].increment(1);
    }

    fn origin(&self, elapsed: Duration, failed: bool) {
        if failed {
            self.origin_error.increment(1);
        } else {
            self.origin_ok.increment(1);
        }
        self.origin_duration.record(elapsed.as_secs_f64());
    }
}

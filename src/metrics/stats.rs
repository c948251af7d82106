//! Lock-free request statistics behind `/cache/stats`: atomic counters and a fixed-bucket
//! latency histogram. Recording is a handful of relaxed atomic adds: no lock, no allocation.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::domain::View;

/// How a cached-view request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the cache.
    Hit,
    /// Fetched from the origin (stored or not).
    Miss,
    /// `use_cache=false`: origin only.
    Bypass,
    /// An expired copy was served.
    Stale,
    /// Answered with an error (origin failure, time-out).
    Error,
}

impl Outcome {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Bypass => "bypass",
            Outcome::Stale => "stale",
            Outcome::Error => "error",
        }
    }
}

const LINEAR: usize = 16;
const SUB_BITS: u32 = 3;
const MAX_EXP: u32 = 40;
const BUCKETS: usize = LINEAR + ((MAX_EXP - 3) as usize) * (1 << SUB_BITS);

/// Log-linear histogram of microseconds: exact below 16 µs, then 8 buckets per power of two
/// (at most 12.5 % relative error), up to about 12 days.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

fn bucket_of(us: u64) -> usize {
    if us < LINEAR as u64 {
        return us as usize;
    }
    let exp = (63 - us.leading_zeros()).min(MAX_EXP);
    let sub = ((us >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1)) as usize;
    (LINEAR + (exp as usize - 4) * (1 << SUB_BITS) + sub).min(BUCKETS - 1)
}

/// Midpoint of a bucket, in microseconds.
fn bucket_value(index: usize) -> f64 {
    if index < LINEAR {
        return index as f64;
    }
    let exp = (index - LINEAR) / (1 << SUB_BITS) + 4;
    let sub = (index - LINEAR) % (1 << SUB_BITS);
    let width = 1u64 << (exp as u32 - SUB_BITS);
    let low = (1u64 << exp) + sub as u64 * width;
    low as f64 + width as f64 / 2.0
}

impl Histogram {
    /// Records one duration.
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(us)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Mean in milliseconds (0 when empty).
    pub fn mean_ms(&self) -> f64 {
        let n = self.count();
        if n == 0 {
            0.0
        } else {
            self.sum_us.load(Relaxed) as f64 / n as f64 / 1000.0
        }
    }

    /// The `q` quantile (0..=1) in milliseconds (0 when empty).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        quantile_of(&self.counts(), q).unwrap_or(0.0)
    }

    /// A copy of the bucket counts: subtracting two copies gives the histogram of what was
    /// recorded in between (see [`quantile_of`]).
    pub fn counts(&self) -> Vec<u64> {
        self.buckets.iter().map(|b| b.load(Relaxed)).collect()
    }
}

/// The `q` quantile (0..=1), in milliseconds, of bucket counts taken from
/// [`Histogram::counts`] (or a difference of two); `None` when they hold nothing.
pub fn quantile_of(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(bucket_value(i) / 1000.0);
        }
    }
    None
}

/// `v` rounded to two decimals, as every figure in `/cache/stats` is.
pub fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// hits / (hits + misses) × 100, to two decimals; `None` with neither.
pub fn hit_rate(hits: u64, misses: u64) -> Option<f64> {
    let total = hits + misses;
    (total > 0).then(|| round2(hits as f64 * 100.0 / total as f64))
}

/// Counters of one view.
#[derive(Debug, Default)]
pub struct ViewStats {
    /// Served from the cache.
    pub hits: AtomicU64,
    /// Fetched from the origin.
    pub misses: AtomicU64,
    /// `use_cache=false`.
    pub bypasses: AtomicU64,
    /// Expired copies served.
    pub stale_served: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Origin requests made.
    pub origin_fetches: AtomicU64,
    /// Origin requests that failed (time-out, unreachable, 5xx, too large).
    pub origin_errors: AtomicU64,
    /// Misses that waited for another request's origin fetch.
    pub coalesced: AtomicU64,
    /// Microseconds spent waiting for the origin.
    pub origin_time_us: AtomicU64,
    /// Whole-request latency.
    pub latency: Histogram,
    /// Refresh-ahead fetches that found the content unchanged.
    pub refresh_unchanged: AtomicU64,
    /// Refresh-ahead fetches that found new content.
    pub refresh_changed: AtomicU64,
    /// Refresh-ahead fetches that found the run gone (404).
    pub refresh_gone: AtomicU64,
    /// Refresh-ahead fetches the origin refused to the refreshing credential.
    pub refresh_refused: AtomicU64,
    /// Refresh-ahead fetches that failed.
    pub refresh_errors: AtomicU64,
}

impl ViewStats {
    /// Requests answered, whatever the outcome.
    pub fn total(&self) -> u64 {
        self.latency.count()
    }

    /// Mean origin latency in milliseconds.
    pub fn mean_origin_ms(&self) -> f64 {
        let n = self.origin_fetches.load(Relaxed);
        if n == 0 {
            0.0
        } else {
            self.origin_time_us.load(Relaxed) as f64 / n as f64 / 1000.0
        }
    }

    /// Origin time the hits avoided: hits × mean origin latency.
    pub fn time_saved_ms(&self) -> f64 {
        self.hits.load(Relaxed) as f64 * self.mean_origin_ms()
    }
}

/// Every counter behind `/cache/stats`, mirrored into Prometheus handles registered once.
#[derive(Debug)]
pub struct Stats {
    views: Box<[ViewStats]>,
    prom: Box<[super::ViewHandles]>,
    names: Box<[View]>,
    /// Entries written.
    pub sets: AtomicU64,
    /// Entries deleted by invalidations and clears.
    pub deletes: AtomicU64,
    /// Invalidation operations (events, admin invalidations, clears, version switches).
    pub invalidations: AtomicU64,
    /// Whole-request latency over every view.
    pub latency: Histogram,
    /// Entries filled by warming.
    pub warmed: AtomicU64,
    /// Entries warming could not fill.
    pub warm_errors: AtomicU64,
    /// Origin answers not stored because their entry already had `cache.max_variants`
    /// variants.
    pub variants_refused: AtomicU64,
    /// View requests the hit lane served without the router, other than from a near-cache
    /// copy (those are `l1.lane_hits`).
    pub lane_served: AtomicU64,
    /// Event-stream entries set aside in the dead-letter stream.
    pub stream_dead_lettered: AtomicU64,
}

impl Stats {
    /// Counters for `views` (the view table's handles, in table order), each exported from
    /// the start, at 0.
    pub fn new(views: &[View]) -> Self {
        Self {
            views: views.iter().map(|_| ViewStats::default()).collect(),
            prom: views
                .iter()
                .map(|v| super::ViewHandles::register(*v))
                .collect(),
            names: views.into(),
            sets: AtomicU64::new(0),
            deletes: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            latency: Histogram::default(),
            warmed: AtomicU64::new(0),
            warm_errors: AtomicU64::new(0),
            variants_refused: AtomicU64::new(0),
            lane_served: AtomicU64::new(0),
            stream_dead_lettered: AtomicU64::new(0),
        }
    }
}

impl Stats {
    /// The views counted, in table order.
    pub fn views(&self) -> &[View] {
        &self.names
    }

    /// One view's counters.
    pub fn view(&self, view: View) -> &ViewStats {
        &self.views[view.index()]
    }

    /// Records an answered view request.
    pub fn record_request(&self, view: View, outcome: Outcome, elapsed: Duration) {
        let v = self.view(view);
        let counter = match outcome {
            Outcome::Hit => &v.hits,
            Outcome::Miss => &v.misses,
            Outcome::Bypass => &v.bypasses,
            Outcome::Stale => &v.stale_served,
            Outcome::Error => &v.errors,
        };
        counter.fetch_add(1, Relaxed);
        v.latency.record(elapsed);
        self.latency.record(elapsed);
        self.prom[view.index()].request(outcome, elapsed);
    }

    /// Records one origin request and whether it failed.
    pub fn record_origin(&self, view: View, elapsed: Duration, failed: bool) {
        let v = self.view(view);
        v.origin_fetches.fetch_add(1, Relaxed);
        v.origin_time_us
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
        if failed {
            v.origin_errors.fetch_add(1, Relaxed);
        }
        self.prom[view.index()].origin(elapsed, failed);
    }

    /// Records a request that waited for another request's fetch.
    pub fn record_coalesced(&self, view: View) {
        self.view(view).coalesced.fetch_add(1, Relaxed);
        self.prom[view.index()].coalesced();
    }

    /// Records the result of a refresh-ahead fetch.
    pub fn record_refresh(&self, view: View, result: super::RefreshResult) {
        use super::RefreshResult as R;
        let v = self.view(view);
        let counter = match result {
            R::Unchanged => &v.refresh_unchanged,
            R::Changed => &v.refresh_changed,
            R::Gone => &v.refresh_gone,
            R::Refused => &v.refresh_refused,
            R::Error => &v.refresh_errors,
        };
        counter.fetch_add(1, Relaxed);
        self.prom[view.index()].refresh(result);
    }

    /// Records a warm-up's results.
    pub fn record_warm(&self, warmed: u64, errors: u64) {
        self.warmed.fetch_add(warmed, Relaxed);
        self.warm_errors.fetch_add(errors, Relaxed);
        metrics::counter!(super::names::WARMED_TOTAL).increment(warmed);
        metrics::counter!(super::names::WARM_ERRORS_TOTAL).increment(errors);
    }

    /// Records entries deleted by one invalidation of `cause` (event, admin, clear, version).
    pub fn record_invalidation(&self, cause: &'static str, deleted: u64) {
        self.record_invalidations(cause, 1, deleted);
    }

    /// Records `ops` invalidations of `cause` applied together, which deleted `deleted`
    /// entries in all (a batch of events from the stream).
    pub fn record_invalidations(&self, cause: &'static str, ops: u64, deleted: u64) {
        self.invalidations.fetch_add(ops, Relaxed);
        self.deletes.fetch_add(deleted, Relaxed);
        metrics::counter!(super::names::INVALIDATIONS_TOTAL, "cause" => cause).increment(ops);
        metrics::counter!(super::names::ENTRIES_DELETED_TOTAL, "cause" => cause).increment(deleted);
    }

    /// Records an answer not stored because its entry had every variant it may have.
    pub fn record_variant_refused(&self) {
        self.variants_refused.fetch_add(1, Relaxed);
        metrics::counter!(super::names::VARIANTS_REFUSED_TOTAL).increment(1);
    }

    /// Records an event-stream entry set aside in the dead-letter stream.
    pub fn record_dead_letter(&self) {
        self.stream_dead_lettered.fetch_add(1, Relaxed);
        metrics::counter!(super::names::STREAM_DEAD_LETTERED_TOTAL).increment(1);
    }

    /// Records one entry written.
    pub fn record_set(&self) {
        self.sets.fetch_add(1, Relaxed);
        metrics::counter!(super::names::CACHE_SETS_TOTAL).increment(1);
    }

    /// Sum of one counter over every view.
    pub fn sum(&self, field: impl Fn(&ViewStats) -> &AtomicU64) -> u64 {
        self.views.iter().map(|v| field(v).load(Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_bucket_error() {
        let h = Histogram::default();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile_ms(0.50);
        let p99 = h.quantile_ms(0.99);
        assert!((45.0..=56.0).contains(&p50), "{p50}");
        assert!((88.0..=112.0).contains(&p99), "{p99}");
        assert!((h.mean_ms() - 50.5).abs() < 0.01);
    }

    #[test]
    fn buckets_cover_the_range_monotonically() {
        let mut last = 0;
        for us in [0u64, 1, 15, 16, 17, 100, 1_000, 1_000_000, u64::MAX] {
            let b = bucket_of(us);
            assert!(b >= last && b < BUCKETS, "{us} -> {b}");
            last = b;
        }
    }

    #[test]
    fn empty_histogram_reports_zero() {
        let h = Histogram::default();
        assert_eq!(h.quantile_ms(0.5), 0.0);
        assert_eq!(h.mean_ms(), 0.0);
    }
}

//! `/cache/stats/history`: a ring of periodic samples of the headline figures, so that the
//! operator page has charts the moment it opens. A background task takes a [`Reading`] of
//! the cumulative counters every `admin.history_interval_ms`; each sample is the difference
//! from the previous reading (rates, interval percentiles) plus the gauges of the moment.
//! Nothing here runs on the request path: the counters it reads are the atomics that
//! requests already update.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;
use utoipa::ToSchema;

use super::stats::{hit_rate, quantile_of, round2};

/// Cumulative counters and current gauges, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    /// When, in Unix milliseconds (shown; the wall clock may step).
    pub at_ms: u64,
    /// When, in milliseconds of a monotonic clock: intervals are measured with it.
    pub mono_ms: u64,
    /// Cached-view requests answered so far.
    pub requests: u64,
    /// Of which served from the cache.
    pub hits: u64,
    /// Of which fetched from the origin.
    pub misses: u64,
    /// Expired copies served so far.
    pub stale_served: u64,
    /// Requests that waited for another request's fetch so far.
    pub coalesced: u64,
    /// Origin requests so far.
    pub origin_fetches: u64,
    /// Failed origin requests so far.
    pub origin_errors: u64,
    /// Request-latency bucket counts ([`super::stats::Histogram::counts`]).
    pub latency: Vec<u64>,
    /// Store in use: `redis` or `memory`.
    pub backend: &'static str,
    /// Whether the circuit around Redis is open (serving from memory).
    pub circuit_open: bool,
    /// What the last background probe found (`None` before the first).
    pub redis_reachable: Option<bool>,
    /// Memory-tier bytes.
    pub memory_bytes: u64,
    /// Memory-tier entries.
    pub memory_entries: u64,
    /// Near-cache bytes.
    pub near_bytes: u64,
    /// Invalidations journaled while Redis was unreachable, not yet replayed.
    pub pending_journal: u64,
}

/// One sample: what happened since the previous one, and the gauges at its end.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Sample {
    /// End of the interval, in Unix milliseconds.
    pub t_ms: u64,
    /// Length of the interval in milliseconds (0 for the first sample, taken at start).
    pub interval_ms: u64,
    /// Cached-view requests answered in the interval.
    pub requests: u64,
    /// Requests per second over the interval; `null` for the first sample.
    pub request_rate: Option<f64>,
    /// Hits in the interval.
    pub hits: u64,
    /// Misses in the interval.
    pub misses: u64,
    /// hits / (hits + misses) × 100 over the interval; `null` with neither.
    pub hit_rate_percent: Option<f64>,
    /// Median request latency over the interval; `null` with no request.
    pub p50_ms: Option<f64>,
    /// 95th percentile request latency over the interval.
    pub p95_ms: Option<f64>,
    /// 99th percentile request latency over the interval.
    pub p99_ms: Option<f64>,
    /// Origin requests in the interval.
    pub origin_fetches: u64,
    /// Origin requests per second over the interval; `null` for the first sample.
    pub origin_rate: Option<f64>,
    /// Failed origin requests in the interval.
    pub origin_errors: u64,
    /// Expired copies served in the interval.
    pub stale_served: u64,
    /// Requests that waited for another request's fetch in the interval.
    pub coalesced: u64,
    /// Store in use at the end: `redis` or `memory`.
    pub backend: &'static str,
    /// Circuit around Redis at the end: `closed` (on Redis) or `open` (on memory).
    pub circuit: &'static str,
    /// Whether the last background probe reached Redis (`null` before the first probe).
    pub redis_reachable: Option<bool>,
    /// Memory-tier bytes at the end.
    pub memory_bytes: u64,
    /// Memory-tier entries at the end.
    pub memory_entries: u64,
    /// Near-cache bytes at the end.
    pub near_bytes: u64,
    /// Journaled invalidations waiting for Redis at the end.
    pub pending_journal: u64,
}

fn per_sec(n: u64, ms: u64) -> Option<f64> {
    (ms > 0).then(|| (n as f64 * 1000.0 / ms as f64 * 100.0).round() / 100.0)
}

impl Sample {
    /// The sample ending at `now`, given the reading before it (none: the first sample).
    pub fn between(before: Option<&Reading>, now: &Reading) -> Self {
        let empty = Reading::default();
        let b = before.unwrap_or(&empty);
        let first = before.is_none();
        let d = |f: fn(&Reading) -> u64| {
            if first {
                0
            } else {
                f(now).saturating_sub(f(b))
            }
        };
        let interval_ms = if first {
            0
        } else {
            now.mono_ms.saturating_sub(b.mono_ms)
        };
        let hits = d(|r| r.hits);
        let misses = d(|r| r.misses);
        let requests = d(|r| r.requests);
        let origin_fetches = d(|r| r.origin_fetches);
        let latency: Vec<u64> = if first {
            Vec::new()
        } else {
            now.latency
                .iter()
                .enumerate()
                .map(|(i, c)| c.saturating_sub(b.latency.get(i).copied().unwrap_or(0)))
                .collect()
        };
        let q = |q: f64| quantile_of(&latency, q).map(round2);
        Sample {
            t_ms: now.at_ms,
            interval_ms,
            requests,
            request_rate: per_sec(requests, interval_ms),
            hits,
            misses,
            hit_rate_percent: hit_rate(hits, misses),
            p50_ms: q(0.50),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            origin_fetches,
            origin_rate: per_sec(origin_fetches, interval_ms),
            origin_errors: d(|r| r.origin_errors),
            stale_served: d(|r| r.stale_served),
            coalesced: d(|r| r.coalesced),
            backend: now.backend,
            circuit: if now.circuit_open { "open" } else { "closed" },
            redis_reachable: now.redis_reachable,
            memory_bytes: now.memory_bytes,
            memory_entries: now.memory_entries,
            near_bytes: now.near_bytes,
            pending_journal: now.pending_journal,
        }
    }
}

#[derive(Debug, Default)]
struct Ring {
    samples: VecDeque<Sample>,
    last: Option<Reading>,
}

/// The last `capacity` samples of one instance, and its most read keys as of the last sample.
#[derive(Debug)]
pub struct History {
    ring: Mutex<Ring>,
    hot: Mutex<Vec<(String, u32)>>,
    capacity: usize,
    interval_ms: u64,
    started_ms: u64,
    clock: std::time::Instant,
}

impl History {
    /// A ring of `capacity` samples (at least one) taken every `interval_ms`.
    pub fn new(capacity: usize, interval_ms: u64) -> Self {
        let capacity = capacity.max(1);
        Self {
            ring: Mutex::new(Ring {
                samples: VecDeque::with_capacity(capacity),
                last: None,
            }),
            hot: Mutex::default(),
            capacity,
            interval_ms,
            started_ms: crate::domain::policy::now_ms(),
            clock: std::time::Instant::now(),
        }
    }

    /// When this ring (this process) started, in Unix milliseconds: a page that sees it
    /// change knows the instance restarted and its series start again.
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// Milliseconds of the monotonic clock readings are stamped with.
    pub fn mono_ms(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Replaces the most read keys (computed off the request path by the sampler).
    pub fn set_hot(&self, hot: Vec<(String, u32)>) {
        *self.hot.lock().unwrap_or_else(PoisonError::into_inner) = hot;
    }

    /// The most read keys as of the last sample.
    pub fn hot(&self) -> Vec<(String, u32)> {
        self.hot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Samples kept at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Configured time between samples.
    pub fn interval_ms(&self) -> u64 {
        self.interval_ms
    }

    /// Adds the sample ending with `now`, dropping the oldest when full.
    pub fn push(&self, now: Reading) {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let sample = Sample::between(ring.last.as_ref(), &now);
        if ring.samples.len() == self.capacity {
            ring.samples.pop_front();
        }
        ring.samples.push_back(sample);
        ring.last = Some(now);
    }

    /// The samples that end after `since_ms` (all with 0), in the order they were taken. A
    /// filter rather than a search: after a step of the wall clock, `t_ms` is not sorted.
    pub fn since(&self, since_ms: u64) -> Vec<Sample> {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.samples
            .iter()
            .filter(|s| s.t_ms > since_ms)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::stats::Histogram;

    fn reading(at_ms: u64, hits: u64, misses: u64, latency: &Histogram) -> Reading {
        Reading {
            at_ms,
            mono_ms: at_ms,
            requests: hits + misses,
            hits,
            misses,
            latency: latency.counts(),
            backend: "redis",
            ..Reading::default()
        }
    }

    #[test]
    fn a_sample_is_the_difference_from_the_previous_reading() {
        let h = Histogram::default();
        let history = History::new(10, 5000);
        history.push(reading(1_000, 0, 0, &h));
        for _ in 0..90 {
            h.record(Duration::from_millis(1));
        }
        for _ in 0..10 {
            h.record(Duration::from_millis(100));
        }
        history.push(reading(6_000, 90, 10, &h));
        // The next interval sees only fast requests: its p99 must not remember the slow ones.
        for _ in 0..50 {
            h.record(Duration::from_millis(2));
        }
        history.push(reading(11_000, 140, 10, &h));
        let s = history.since(0);
        assert_eq!(s.len(), 3);
        assert_eq!(
            (s[0].requests, s[0].hit_rate_percent, s[0].p50_ms),
            (0, None, None)
        );
        assert_eq!(s[1].requests, 100);
        assert_eq!(s[0].request_rate, None);
        assert_eq!(s[1].request_rate, Some(20.0));
        assert_eq!(s[1].hit_rate_percent, Some(90.0));
        let p99 = s[1].p99_ms.expect("p99");
        assert!((88.0..=112.0).contains(&p99), "{p99}");
        assert_eq!(s[2].hit_rate_percent, Some(100.0));
        let p99 = s[2].p99_ms.expect("p99");
        assert!((1.5..=2.5).contains(&p99), "{p99}");
        assert_eq!(s[2].circuit, "closed");
    }

    #[test]
    fn the_ring_keeps_the_newest_and_answers_since_a_time() {
        let h = Histogram::default();
        let history = History::new(3, 1000);
        for i in 1..=5 {
            history.push(reading(i * 1000, i, 0, &h));
        }
        let all: Vec<u64> = history.since(0).iter().map(|s| s.t_ms).collect();
        assert_eq!(all, [3000, 4000, 5000]);
        let newer: Vec<u64> = history.since(4000).iter().map(|s| s.t_ms).collect();
        assert_eq!(newer, [5000]);
        assert!(history.since(5000).is_empty());
    }
}

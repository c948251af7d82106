//! Limits that keep the service up under abuse or overload: header count and size, requests
//! in flight, and per-client token buckets, one class for admin routes and one for events
//! (a training sweep fires one event per run for hundreds of runs at once, far more than an
//! operator's curl). The HTTP middleware that applies them is `http::limits`.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::domain::AdminPrefix;

/// Which token bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateClass {
    /// `/cache/*` and its aliases.
    Admin,
    /// `/events/*` and peer invalidations.
    Event,
}

/// A rate and a burst, in requests per second and requests.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: u32,
    /// Most tokens held.
    pub burst: u32,
}

/// Limit settings and state, shared by the middleware and the hit lane.
#[derive(Debug)]
pub struct Limits {
    max_headers: usize,
    max_header_bytes: usize,
    inflight: Arc<Semaphore>,
    admin: Rate,
    event: Rate,
    buckets: moka::sync::Cache<(RateClass, IpAddr), Arc<Mutex<Bucket>>>,
    prefix: AdminPrefix,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Limits {
    /// Limits from settings: header count and bytes, requests in flight, and the admin and
    /// event rates per client address.
    pub fn new(
        max_headers: usize,
        max_header_bytes: usize,
        max_inflight: usize,
        admin: Rate,
        event: Rate,
    ) -> Self {
        Self {
            max_headers,
            max_header_bytes,
            inflight: Arc::new(Semaphore::new(max_inflight.max(1))),
            admin,
            event,
            buckets: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
            prefix: AdminPrefix::default(),
        }
    }

    /// The same limits, for runcache's routes under `prefix` (`server.admin_prefix`).
    pub fn with_prefix(mut self, prefix: AdminPrefix) -> Self {
        self.prefix = prefix;
        self
    }

    /// `path` as runcache's own routes see it (without `server.admin_prefix`), if it is
    /// under the prefix: which probes are exempt from shedding and which routes are
    /// rate-limited.
    pub fn own_path<'a>(&self, path: &'a str) -> Option<&'a str> {
        self.prefix.strip(path)
    }

    /// `server.max_headers` and `server.max_header_bytes`.
    pub fn header_limits(&self) -> (usize, usize) {
        (self.max_headers, self.max_header_bytes)
    }

    /// Whether the header section is within `server.max_headers` and
    /// `server.max_header_bytes`.
    pub fn headers_within(&self, headers: &http::HeaderMap) -> bool {
        let header_bytes: usize = headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        headers.len() <= self.max_headers && header_bytes <= self.max_header_bytes
    }

    /// Whether a request may start now without being shed (`server.max_concurrent_requests`).
    pub fn has_room(&self) -> bool {
        self.inflight.available_permits() > 0
    }

    /// A place among the requests in flight, or `None` when the service is full.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.inflight.clone().try_acquire_owned().ok()
    }

    /// Takes one token of `class` for `ip`; `Err(wait)` when the bucket is empty.
    pub fn take(&self, class: RateClass, ip: IpAddr) -> Result<(), Duration> {
        let rate = match class {
            RateClass::Admin => self.admin,
            RateClass::Event => self.event,
        };
        let per_sec = f64::from(rate.per_sec.max(1));
        let burst = f64::from(rate.burst.max(1));
        let bucket = self.buckets.get_with((class, ip), || {
            Arc::new(Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }))
        });
        let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * per_sec).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / per_sec))
        }
    }
}

/// The rate class of `path`, if it is rate-limited: admin routes, and events with peer
/// invalidations (which have their own, much larger, allowance).
pub fn rate_class(path: &str) -> Option<RateClass> {
    if path.starts_with("/events/") || path == PEER_PATH {
        Some(RateClass::Event)
    } else if path.starts_with("/cache/") || path.starts_with("/api/v1/models/cache/") {
        Some(RateClass::Admin)
    } else {
        None
    }
}

/// Where instances send each other invalidations made while Redis is unreachable.
pub const PEER_PATH: &str = "/cache/peer-invalidation";

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::new(
            64,
            16_384,
            10,
            Rate {
                per_sec: 10,
                burst: 2,
            },
            Rate {
                per_sec: 1000,
                burst: 500,
            },
        )
    }

    #[test]
    fn buckets_refill_at_the_configured_rate() {
        let limits = limits();
        let ip = IpAddr::from([127, 0, 0, 1]);
        assert!(limits.take(RateClass::Admin, ip).is_ok());
        assert!(limits.take(RateClass::Admin, ip).is_ok());
        let wait = limits
            .take(RateClass::Admin, ip)
            .expect_err("burst used up");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(
            limits
                .take(RateClass::Admin, IpAddr::from([127, 0, 0, 2]))
                .is_ok(),
            "per client"
        );
        std::thread::sleep(Duration::from_millis(120));
        assert!(limits.take(RateClass::Admin, ip).is_ok());
    }

    #[test]
    fn events_have_their_own_allowance() {
        let limits = limits();
        let ip = IpAddr::from([127, 0, 0, 1]);
        while limits.take(RateClass::Admin, ip).is_ok() {}
        for _ in 0..300 {
            assert!(limits.take(RateClass::Event, ip).is_ok());
        }
    }

    #[test]
    fn rate_classes_follow_the_paths() {
        assert_eq!(rate_class("/cache/stats"), Some(RateClass::Admin));
        assert_eq!(
            rate_class("/api/v1/models/cache/clear"),
            Some(RateClass::Admin)
        );
        assert_eq!(rate_class("/events/model-deleted"), Some(RateClass::Event));
        assert_eq!(rate_class(PEER_PATH), Some(RateClass::Event));
        assert_eq!(rate_class("/api/v1/models/compare"), None);
    }
}

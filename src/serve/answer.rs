//! The answer to a cached-view request and how it was produced (`X-Cache`, `Cache-Status`).

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

/// How the answer was produced, for `X-Cache` and `Cache-Status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// From the cache.
    Hit {
        /// Seconds of freshness left.
        ttl: u64,
        /// Seconds since stored.
        age: u64,
        /// Waited for another request's (or instance's) fetch.
        collapsed: bool,
    },
    /// From the origin.
    Miss {
        /// Stored for later hits.
        stored: bool,
        /// Why it was not stored (`no-store`, `status`, …).
        detail: Option<&'static str>,
        /// Waited for another request's fetch instead of fetching.
        collapsed: bool,
    },
    /// An expired copy.
    Stale {
        /// Seconds since stored.
        age: u64,
        /// `true`: within the grace period while one background refresh runs;
        /// `false`: served because the origin failed (stale-if-error).
        revalidating: bool,
    },
    /// From the origin because of `use_cache=false`.
    Bypass,
}

use crate::store::Headers;

/// The answer to a cached-view request.
#[derive(Debug, Clone)]
pub struct ViewResponse {
    /// Status to send (the origin's 2xx/4xx; 304 is decided by the handler).
    pub status: StatusCode,
    /// Origin `Content-Type`.
    pub content_type: Option<HeaderValue>,
    /// The origin's headers sent with it: all of its end-to-end headers when it comes
    /// straight from the origin, the stored ones (`cache.stored_headers`) when from the cache.
    pub headers: Headers,
    /// For an answer fetched for an entry the origin varies: the request headers it varies
    /// on and the hash of their values it was fetched with (a request that joined its fetch
    /// with other values may not be given it).
    pub variant: Option<(std::sync::Arc<[String]>, u64)>,
    /// Body, byte for byte as the origin sent it.
    pub body: Bytes,
    /// For an answer from an entry: which compressed copy its body is known to equal (see
    /// `precompressed`).
    pub copy_mark: crate::store::CopyMark,
    /// Strong ETag (quoted) for 200 answers.
    pub etag: Option<HeaderValue>,
    /// Cache outcome.
    pub outcome: CacheOutcome,
    /// Served while Redis is unreachable (from or into the memory tier).
    pub degraded: bool,
}

impl ViewResponse {
    /// `X-Cache` value.
    pub fn x_cache(&self) -> &'static str {
        match self.outcome {
            CacheOutcome::Hit { .. } => "HIT",
            CacheOutcome::Miss { .. } => "MISS",
            CacheOutcome::Stale { .. } => "STALE",
            CacheOutcome::Bypass => "BYPASS",
        }
    }

    /// `Cache-Status` value (RFC 9211).
    pub fn cache_status(&self) -> String {
        let mut details: Vec<&str> = Vec::new();
        let mut s = match &self.outcome {
            CacheOutcome::Hit { ttl, .. } => {
                let mut s = String::with_capacity(48);
                s.push_str("runcache; hit; ttl=");
                crate::domain::push_decimal(&mut s, *ttl);
                s
            }
            CacheOutcome::Miss { stored: true, .. } => "runcache; fwd=miss; stored".to_owned(),
            CacheOutcome::Miss { detail, .. } => {
                details.extend(detail.iter());
                "runcache; fwd=miss".to_owned()
            }
            CacheOutcome::Stale { revalidating, .. } => {
                if !revalidating {
                    details.push("stale-if-error");
                }
                "runcache; fwd=stale; hit".to_owned()
            }
            CacheOutcome::Bypass => "runcache; fwd=bypass".to_owned(),
        };
        if matches!(
            self.outcome,
            CacheOutcome::Hit {
                collapsed: true,
                ..
            } | CacheOutcome::Miss {
                collapsed: true,
                ..
            }
        ) {
            s.push_str("; collapsed");
        }
        if self.degraded && !matches!(self.outcome, CacheOutcome::Bypass) {
            details.push("memory-fallback");
        }
        // One `detail` parameter: a structured-field parser keeps only the last of repeats.
        match details.as_slice() {
            [] => {}
            [one] => {
                s.push_str("; detail=");
                s.push_str(one);
            }
            many => s.push_str(&format!("; detail=\"{}\"", many.join(", "))),
        }
        s
    }

    /// `Cache-Status` as a header value, built without copying the text again.
    pub fn cache_status_value(&self) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
        HeaderValue::from_maybe_shared(Bytes::from(self.cache_status()))
    }

    /// Whether it carries `Set-Cookie`: then it goes to its own requester only (never stored,
    /// never shared with requests that joined its fetch), as Varnish and nginx do.
    pub fn sets_cookie(&self) -> bool {
        self.headers
            .iter()
            .any(|(n, _)| n == http::header::SET_COOKIE)
    }

    /// `Age` in seconds, on hits and stale answers.
    pub fn age(&self) -> Option<u64> {
        match self.outcome {
            CacheOutcome::Hit { age, .. } | CacheOutcome::Stale { age, .. } => Some(age),
            _ => None,
        }
    }

    pub(super) fn collapsed(mut self) -> Self {
        match &mut self.outcome {
            CacheOutcome::Hit { collapsed, .. } | CacheOutcome::Miss { collapsed, .. } => {
                *collapsed = true;
            }
            _ => {}
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(outcome: CacheOutcome, degraded: bool) -> ViewResponse {
        ViewResponse {
            status: StatusCode::OK,
            content_type: None,
            headers: Headers::default(),
            variant: None,
            body: Bytes::new(),
            copy_mark: crate::store::CopyMark::default(),
            etag: None,
            outcome,
            degraded,
        }
    }

    #[test]
    fn cache_status_names_the_outcome_and_one_detail() {
        let hit = |ttl, collapsed, degraded| {
            let outcome = CacheOutcome::Hit {
                ttl,
                age: 3,
                collapsed,
            };
            answer(outcome, degraded)
                .cache_status_value()
                .expect("valid")
        };
        assert_eq!(hit(7, false, false), "runcache; hit; ttl=7");
        assert_eq!(
            hit(7, false, true),
            "runcache; hit; ttl=7; detail=memory-fallback"
        );
        assert_eq!(
            hit(0, true, true),
            "runcache; hit; ttl=0; collapsed; detail=memory-fallback"
        );
        let stale = answer(
            CacheOutcome::Stale {
                age: 9,
                revalidating: false,
            },
            true,
        );
        assert_eq!(
            stale.cache_status(),
            "runcache; fwd=stale; hit; detail=\"stale-if-error, memory-fallback\""
        );
    }
}

//! Pure freshness rules: TTL tiers, each view's windows, the origin's `Cache-Control`, age and
//! remaining TTL. Everything takes `now` explicitly so tests never sleep.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Named TTL tiers (SPEC section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtlTier {
    /// 300 s
    VeryShort,
    /// 900 s
    Short,
    /// 1800 s
    Medium,
    /// 3600 s
    Long,
    /// 7200 s
    VeryLong,
    /// 86400 s
    Day,
    /// 604800 s
    Week,
}

impl TtlTier {
    /// Every tier, shortest first.
    pub const ALL: [TtlTier; 7] = [
        TtlTier::VeryShort,
        TtlTier::Short,
        TtlTier::Medium,
        TtlTier::Long,
        TtlTier::VeryLong,
        TtlTier::Day,
        TtlTier::Week,
    ];

    /// Tier names as written in config.
    pub const NAMES: [&'static str; 7] = [
        "VERY_SHORT",
        "SHORT",
        "MEDIUM",
        "LONG",
        "VERY_LONG",
        "DAY",
        "WEEK",
    ];

    /// Parses a tier name, case-insensitively.
    pub fn parse(name: &str) -> Option<TtlTier> {
        let upper = name.trim().to_ascii_uppercase();
        Self::NAMES
            .iter()
            .position(|n| *n == upper)
            .map(|i| Self::ALL[i])
    }

    /// The tier's length in seconds.
    pub fn secs(self) -> u64 {
        match self {
            TtlTier::VeryShort => 300,
            TtlTier::Short => 900,
            TtlTier::Medium => 1800,
            TtlTier::Long => 3600,
            TtlTier::VeryLong => 7200,
            TtlTier::Day => 86_400,
            TtlTier::Week => 604_800,
        }
    }

    /// Name used under `config` in `/cache/stats` (`ttl_very_short` …).
    pub fn stats_name(self) -> &'static str {
        match self {
            TtlTier::VeryShort => "ttl_very_short",
            TtlTier::Short => "ttl_short",
            TtlTier::Medium => "ttl_medium",
            TtlTier::Long => "ttl_long",
            TtlTier::VeryLong => "ttl_very_long",
            TtlTier::Day => "ttl_day",
            TtlTier::Week => "ttl_week",
        }
    }
}

/// Freshness rules of one view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewPolicy {
    /// Freshness lifetime.
    pub ttl: Duration,
    /// How long past its TTL an entry is served while one background refresh runs.
    pub grace: Duration,
    /// How long past its TTL an entry may be served when the origin fails.
    pub stale_if_error: Duration,
}

/// The longest stale window an origin's `Cache-Control` may set.
pub const MAX_ORIGIN_WINDOW_SECS: u64 = 7 * 86_400;

impl ViewPolicy {
    /// How long an entry is kept past its TTL, to be served stale.
    pub fn stale_window(&self) -> Duration {
        self.grace.max(self.stale_if_error)
    }

    /// The policy of one origin answer: its own `stale-while-revalidate` and
    /// `stale-if-error` (RFC 5861) replace the configured windows, and `must-revalidate` or
    /// `proxy-revalidate` (RFC 9111 section 5.2.2.2 and .8) turn stale serving off.
    pub fn for_answer(self, cache_control: Option<&str>) -> Self {
        let mut p = self;
        let Some(cc) = cache_control else {
            return p;
        };
        let mut revalidate = false;
        for directive in cc.split(',') {
            let directive = directive.trim();
            let (name, value) = match directive.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (directive, None),
            };
            // Capped at a week: an origin's window is trusted, its arithmetic is not.
            let secs = || {
                value
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s.min(MAX_ORIGIN_WINDOW_SECS)))
            };
            match name.to_ascii_lowercase().as_str() {
                "must-revalidate" | "proxy-revalidate" => revalidate = true,
                "stale-while-revalidate" => p.grace = secs().unwrap_or(p.grace),
                "stale-if-error" => p.stale_if_error = secs().unwrap_or(p.stale_if_error),
                _ => {}
            }
        }
        if revalidate {
            p.grace = Duration::ZERO;
            p.stale_if_error = Duration::ZERO;
        }
        p
    }
}

/// How cached views are protected (`auth.frontend`, SPEC section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendAuth {
    /// Serve a hit only to credentials the origin accepted for the entry.
    Forward,
    /// Verify the bearer JWT locally; any valid token may read cached views.
    Jwt,
    /// Public views.
    None,
}

/// What the origin's `Cache-Control` allows a shared cache to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storability {
    /// Store for at most this long (the configured TTL, shortened by `s-maxage`/`max-age`).
    Store(Duration),
    /// Do not store (`no-store`, `private`, `no-cache`, or a zero lifetime).
    DoNotStore(&'static str),
}

/// Applies the origin's `Cache-Control` to the configured TTL. `s-maxage` wins over
/// `max-age` for a shared cache; either only ever shortens the TTL.
pub fn storability(cache_control: Option<&str>, configured: Duration) -> Storability {
    let Some(cc) = cache_control else {
        return Storability::Store(configured);
    };
    let mut max_age = None;
    let mut s_maxage = None;
    for directive in cc.split(',') {
        let directive = directive.trim();
        let (name, value) = match directive.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (directive, None),
        };
        match name.to_ascii_lowercase().as_str() {
            "no-store" => return Storability::DoNotStore("no-store"),
            "private" => return Storability::DoNotStore("private"),
            "no-cache" => return Storability::DoNotStore("no-cache"),
            // A malformed value means "stale already" (RFC 9111 section 4.2.1).
            "max-age" => max_age = Some(value.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)),
            "s-maxage" => s_maxage = Some(value.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)),
            _ => {}
        }
    }
    let ttl = match s_maxage.or(max_age) {
        Some(secs) => configured.min(Duration::from_secs(secs)),
        None => configured,
    };
    if ttl.is_zero() {
        Storability::DoNotStore("max-age=0")
    } else {
        Storability::Store(ttl)
    }
}

/// Current time in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whole seconds since `stored_at_ms` (the `Age` header).
pub fn age_secs(stored_at_ms: u64, now_ms: u64) -> u64 {
    now_ms.saturating_sub(stored_at_ms) / 1000
}

/// Whole seconds of freshness left, or `None` once expired.
pub fn remaining_ttl_secs(stored_at_ms: u64, ttl_secs: u64, now_ms: u64) -> Option<u64> {
    let expires_ms = stored_at_ms.saturating_add(ttl_secs.saturating_mul(1000));
    (now_ms < expires_ms).then(|| (expires_ms - now_ms).div_ceil(1000))
}

/// Where an entry stands at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Within its TTL; seconds left.
    Fresh {
        /// Whole seconds of freshness left.
        ttl: u64,
    },
    /// Past its TTL but within the grace period: serve it and refresh in the background.
    Revalidate,
    /// Past the grace period but within stale-if-error: fetch, and serve it if that fails.
    StaleIfError,
    /// Not servable.
    Expired,
}

/// Classifies an entry stored at `stored_at_ms` with `ttl_secs` of freshness (RFC 5861).
pub fn freshness(
    stored_at_ms: u64,
    ttl_secs: u64,
    now_ms: u64,
    grace: Duration,
    stale_if_error: Duration,
) -> Freshness {
    if let Some(ttl) = remaining_ttl_secs(stored_at_ms, ttl_secs, now_ms) {
        return Freshness::Fresh { ttl };
    }
    let expired_at = stored_at_ms.saturating_add(ttl_secs.saturating_mul(1000));
    let past = Duration::from_millis(now_ms.saturating_sub(expired_at));
    if past < grace {
        Freshness::Revalidate
    } else if past < stale_if_error {
        Freshness::StaleIfError
    } else {
        Freshness::Expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn the_origins_stale_directives_replace_the_configured_windows() {
        let configured = ViewPolicy {
            ttl: HOUR,
            grace: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(300),
        };
        let p = configured.for_answer(Some(
            "max-age=60, stale-while-revalidate=5, stale-if-error=9",
        ));
        assert_eq!(
            (p.grace, p.stale_if_error),
            (Duration::from_secs(5), Duration::from_secs(9))
        );
        for cc in [
            "max-age=60, must-revalidate",
            "proxy-revalidate, stale-if-error=9",
        ] {
            let p = configured.for_answer(Some(cc));
            assert_eq!(
                (p.grace, p.stale_if_error),
                (Duration::ZERO, Duration::ZERO),
                "{cc}"
            );
        }
        assert_eq!(configured.for_answer(Some("max-age=60")), configured);
        let huge = configured.for_answer(Some("stale-while-revalidate=18446744073709551615"));
        assert_eq!(huge.grace, Duration::from_secs(MAX_ORIGIN_WINDOW_SECS));
        assert_eq!(configured.for_answer(None), configured);
    }

    #[test]
    fn tiers_parse_by_name_and_have_spec_lengths() {
        assert_eq!(TtlTier::parse("long"), Some(TtlTier::Long));
        assert_eq!(TtlTier::parse("VERY_SHORT").map(TtlTier::secs), Some(300));
        assert_eq!(TtlTier::parse("WEEK").map(TtlTier::secs), Some(604_800));
        assert_eq!(TtlTier::parse("LONGER"), None);
    }

    #[test]
    fn origin_cache_control_only_shortens() {
        assert_eq!(storability(None, HOUR), Storability::Store(HOUR));
        assert_eq!(
            storability(Some("public, max-age=60"), HOUR),
            Storability::Store(Duration::from_secs(60))
        );
        assert_eq!(
            storability(Some("max-age=99999"), HOUR),
            Storability::Store(HOUR)
        );
        assert_eq!(
            storability(Some("max-age=600, s-maxage=30"), HOUR),
            Storability::Store(Duration::from_secs(30))
        );
    }

    #[test]
    fn origin_can_forbid_storing() {
        for cc in [
            "no-store",
            "private",
            "Private, max-age=60",
            "no-cache",
            "max-age=0",
            "max-age=abc",
        ] {
            assert!(
                matches!(storability(Some(cc), HOUR), Storability::DoNotStore(_)),
                "{cc}"
            );
        }
    }

    #[test]
    fn freshness_windows() {
        let grace = Duration::from_secs(10);
        let sie = Duration::from_secs(60);
        assert_eq!(
            freshness(0, 60, 30_000, grace, sie),
            Freshness::Fresh { ttl: 30 }
        );
        assert_eq!(freshness(0, 60, 65_000, grace, sie), Freshness::Revalidate);
        assert_eq!(
            freshness(0, 60, 100_000, grace, sie),
            Freshness::StaleIfError
        );
        assert_eq!(freshness(0, 60, 121_000, grace, sie), Freshness::Expired);
        assert_eq!(
            freshness(0, 60, 61_000, Duration::ZERO, Duration::ZERO),
            Freshness::Expired
        );
    }

    #[test]
    fn age_and_remaining_ttl() {
        assert_eq!(age_secs(1_000, 62_500), 61);
        assert_eq!(remaining_ttl_secs(0, 60, 10_000), Some(50));
        assert_eq!(remaining_ttl_secs(0, 60, 59_001), Some(1));
        assert_eq!(remaining_ttl_secs(0, 60, 60_000), None);
    }
}

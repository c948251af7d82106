//! Settings: `config/default.toml`, then the file named by `RUNCACHE_CONFIG`, then
//! `RUNCACHE__SECTION__KEY` environment variables. Loaded once in `main`, validated, passed down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use secrecy::ExposeSecret;
use serde::{Deserialize, Deserializer};

use crate::domain::peer_addr::PeerAllowList;
use crate::domain::{
    AdminPrefix, EventKinds, RawRunId, ViewPolicy, ViewTable, parse_run_id, validate_run_id,
    validate_version,
};
use crate::security::JwtVerifier;

/// Why settings could not be loaded. The message names the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or a value could not be parsed.
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    /// A value parsed but is not acceptable.
    #[error("invalid setting {key}: {reason}")]
    Invalid {
        /// Dotted setting name, e.g. `views.metrics.ttl`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A value of a table keyed by name (a view, an event kind) is not acceptable.
    #[error("invalid setting {key}: {reason}")]
    InvalidEntry {
        /// Dotted setting name, e.g. `views.ranking.key`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// The whole settings tree; see `config/default.toml` for every key and its default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Listener and request limits.
    pub server: ServerSettings,
    /// The backend being cached.
    pub origin: OriginSettings,
    /// Passing everything else to the origin.
    pub gateway: GatewaySettings,
    /// The shared Redis store.
    pub redis: RedisSettings,
    /// Key prefix, version and negative caching.
    pub cache: CacheSettings,
    /// The view table (`[views.<name>]`): every cached route.
    pub views: ViewsSettings,
    /// The in-process fallback store.
    pub memory: MemorySettings,
    /// The in-process near cache in front of Redis.
    pub l1: L1Settings,
    /// Warming at start and through `/cache/warm`.
    pub warm: WarmSettings,
    /// Admin credentials.
    pub admin: AdminSettings,
    /// Event signing.
    pub events: EventsSettings,
    /// Frontend access control.
    pub auth: AuthSettings,
    /// Cross-origin browser access.
    pub cors: CorsSettings,
    /// Request coalescing.
    pub coalesce: CoalesceSettings,
    /// The outage journal.
    pub journal: JournalSettings,
    /// Refresh-ahead.
    pub refresh: RefreshSettings,
    /// Log output.
    pub log: LogSettings,
    /// Direct invalidations between instances.
    pub peers: PeersSettings,
    /// Write-through invalidation rules (`[invalidate.<name>]`, SPEC section 9).
    #[serde(default)]
    pub invalidate: std::collections::BTreeMap<String, crate::domain::WriteRuleSpec>,
    /// Lookup tables learned from answers (`[lookups.<name>]`, SPEC section 9).
    #[serde(default)]
    pub lookups: std::collections::BTreeMap<String, crate::domain::LookupSpec>,
}

pub use crate::domain::view::Ttl;

/// Run ids in config may be written as strings or non-negative integers, read by the one
/// run-id parser (a TOML `42.0`, or an environment variable `42.0` that the loader reads as a
/// number, is the id `"42"`, as in a JSON body).
fn run_ids<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Vec::<serde_json::Value>::deserialize(d)?
        .iter()
        .map(|v| parse_run_id(RawRunId::Json(v)).map_err(serde::de::Error::custom))
        .collect()
}

/// The `redis.url` that `config/default.toml` ships.
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Environment keys whose values are comma-separated lists.
const LIST_KEYS: [&str; 8] = [
    "cors.allowed_origins",
    "origin.ignore_vary",
    "peers.allowed",
    "redis.cluster_urls",
    "redis.sentinel_urls",
    "warm.model_run_ids",
    "origin.forward_headers",
    "refresh.volatile_fields",
];

impl Settings {
    /// Loads `config/default.toml`, the `RUNCACHE_CONFIG` file if set, and the process
    /// environment, then validates.
    pub fn load() -> Result<Self, ConfigError> {
        let overlay = std::env::var("RUNCACHE_CONFIG").ok();
        Self::load_from(overlay.as_deref(), None)
    }

    /// Like [`Settings::load`], with the overlay file and the environment given explicitly
    /// (`env: None` reads the process environment), so tests need not touch globals.
    pub fn load_from(
        overlay: Option<&str>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(
            config::File::from(std::path::Path::new("config/default.toml")).required(true),
        );
        if let Some(path) = overlay {
            builder = builder.add_source(config::File::from(std::path::Path::new(path)));
        }
        let mut environment = config::Environment::with_prefix("RUNCACHE")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",");
        for key in LIST_KEYS {
            environment = environment.with_list_parse_key(key);
        }
        let settings: Settings = builder
            .add_source(environment.source(env))
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Whether Redis was left unconfigured (single mode on the shipped `redis.url`, a Redis on
    /// this host that a newcomer may not run): then finding no Redis at start is the default
    /// set-up, the embedded store, rather than a Redis that was asked for and is down. A Redis
    /// that answered once and then fails is a fallback either way.
    pub fn redis_left_at_default(&self) -> bool {
        self.redis.mode == "single" && self.redis.url.expose_secret() == DEFAULT_REDIS_URL
    }

    /// `peers.allowed`, parsed.
    pub fn peer_allow_list(&self) -> Result<PeerAllowList, ConfigError> {
        PeerAllowList::parse(&self.peers.allowed).map_err(|e| invalid("peers.allowed", e))
    }

    fn validate_redis_mode(&self) -> Result<(), ConfigError> {
        let r = &self.redis;
        let urls_ok =
            |key: &'static str, urls: &[secrecy::SecretString]| -> Result<(), ConfigError> {
                for url in urls {
                    let u = url.expose_secret();
                    if !(u.starts_with("redis://") || u.starts_with("rediss://"))
                        || redis::Client::open(u).is_err()
                    {
                        return Err(invalid(
                            key,
                            "every entry must be a redis:// (or rediss://) URL",
                        ));
                    }
                }
                Ok(())
            };
        urls_ok("redis.cluster_urls", &r.cluster_urls)?;
        urls_ok("redis.sentinel_urls", &r.sentinel_urls)?;
        match r.mode.as_str() {
            "single" => Ok(()),
            "sentinel" => {
                if r.sentinel_urls.is_empty() {
                    return Err(invalid(
                        "redis.sentinel_urls",
                        "must name at least one sentinel with redis.mode = \"sentinel\"",
                    ));
                }
                match &r.master_name {
                    Some(name) if !name.is_empty() && !name.contains(char::is_whitespace) => Ok(()),
                    _ => Err(invalid(
                        "redis.master_name",
                        "must be set (without spaces) with redis.mode = \"sentinel\"",
                    )),
                }
            }
            "cluster" if r.cluster_urls.is_empty() => Err(invalid(
                "redis.cluster_urls",
                "must name at least one node with redis.mode = \"cluster\"",
            )),
            "cluster" => Ok(()),
            other => Err(invalid(
                "redis.mode",
                format!("{other:?} is not single, cluster or sentinel"),
            )),
        }
    }

    fn validate_stream(&self) -> Result<(), ConfigError> {
        let e = &self.events;
        let name_ok = |s: &str| !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control);
        if let Some(stream) = &e.stream
            && !name_ok(stream)
        {
            return Err(invalid(
                "events.stream",
                "must be 1 to 256 characters, none of them control characters",
            ));
        }
        for (key, value) in [
            ("events.stream_group", Some(&e.stream_group)),
            ("events.stream_consumer", e.stream_consumer.as_ref()),
        ] {
            if let Some(v) = value
                && !name_ok(v)
            {
                return Err(invalid(
                    key,
                    "must be 1 to 256 characters, none of them control characters",
                ));
            }
        }
        if e.stream.as_deref().is_some_and(|s| s.contains("{}")) {
            return Err(invalid(
                "events.stream",
                "must not contain an empty hash tag `{}` (its side keys could not share its slot)",
            ));
        }
        if e.stream_batch > 10_000 {
            return Err(invalid("events.stream_batch", "must be at most 10000"));
        }
        if e.stream_block_ms > 60_000 {
            return Err(invalid("events.stream_block_ms", "must be at most 60000"));
        }
        if e.max_deliveries > 1_000 {
            return Err(invalid("events.max_deliveries", "must be at most 1000"));
        }
        Ok(())
    }

    /// Checks every value that parsing alone cannot; fails on the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.socket_addr()?;
        self.stored_headers()?;
        let base = reqwest::Url::parse(&self.origin.base_url)
            .map_err(|e| invalid("origin.base_url", e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
            return Err(invalid(
                "origin.base_url",
                "must be an http(s) URL with a host",
            ));
        }
        if !self.warm.recent_path.starts_with('/') || self.warm.recent_path.contains(['?', '#']) {
            return Err(invalid(
                "warm.recent_path",
                "must be a path starting with '/', without a query",
            ));
        }
        if self.warm.recent_runs > 1000 {
            return Err(invalid("warm.recent_runs", "must be at most 1000"));
        }
        if !self.origin.health_path.starts_with('/') {
            return Err(invalid("origin.health_path", "must start with '/'"));
        }
        for name in &self.origin.forward_headers {
            http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                invalid(
                    "origin.forward_headers",
                    format!("{name:?} is not a header name"),
                )
            })?;
        }
        for name in &self.origin.ignore_vary {
            let lower = name.to_ascii_lowercase();
            if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
                return Err(invalid(
                    "origin.ignore_vary",
                    format!("{name:?} is not a header name"),
                ));
            }
            // A body that varies on a credential must never be shared between callers.
            if matches!(
                lower.as_str(),
                "authorization" | "cookie" | "proxy-authorization"
            ) {
                return Err(invalid(
                    "origin.ignore_vary",
                    format!(
                        "{name:?} names a credential: an answer that varies on it is never shared"
                    ),
                ));
            }
        }
        let url = self.redis.url.expose_secret();
        if !url.starts_with("redis://") && !url.starts_with("rediss://") {
            return Err(invalid(
                "redis.url",
                "must start with redis:// (or rediss:// for TLS)",
            ));
        }
        if let Some(path) = &self.redis.tls_ca_file {
            if !url.starts_with("rediss://") {
                return Err(invalid(
                    "redis.tls_ca_file",
                    "is set, but redis.url is not rediss://",
                ));
            }
            if !std::path::Path::new(path).is_file() {
                return Err(invalid(
                    "redis.tls_ca_file",
                    format!("{path:?} is not a readable file"),
                ));
            }
        }
        redis::Client::open(url).map_err(|_| invalid("redis.url", "is not a valid Redis URL"))?;
        self.validate_redis_mode()?;
        let positive = [
            ("server.request_timeout_ms", self.server.request_timeout_ms),
            ("origin.connect_timeout_ms", self.origin.connect_timeout_ms),
            ("origin.timeout_ms", self.origin.timeout_ms),
            ("redis.command_timeout_ms", self.redis.command_timeout_ms),
            ("redis.connect_timeout_ms", self.redis.connect_timeout_ms),
            ("redis.probe_interval_ms", self.redis.probe_interval_ms),
            ("redis.version_poll_ms", self.redis.version_poll_ms),
            ("redis.pool_timeout_ms", self.redis.pool_timeout_ms),
            (
                "redis.pool_create_timeout_ms",
                self.redis.pool_create_timeout_ms,
            ),
            (
                "redis.pool_recycle_timeout_ms",
                self.redis.pool_recycle_timeout_ms,
            ),
            ("redis.pool_max_size", self.redis.pool_max_size as u64),
            ("redis.scan_batch", self.redis.scan_batch as u64),
            ("server.max_body_bytes", self.server.max_body_bytes as u64),
            (
                "origin.max_response_bytes",
                self.origin.max_response_bytes as u64,
            ),
            ("warm.concurrency", self.warm.concurrency as u64),
            ("server.max_headers", self.server.max_headers as u64),
            (
                "server.max_header_bytes",
                self.server.max_header_bytes as u64,
            ),
            (
                "server.max_concurrent_requests",
                self.server.max_concurrent_requests as u64,
            ),
            (
                "server.admin_rate_per_sec",
                u64::from(self.server.admin_rate_per_sec),
            ),
            ("server.admin_burst", u64::from(self.server.admin_burst)),
            ("cache.max_entry_bytes", self.cache.max_entry_bytes as u64),
            ("coalesce.wait_timeout_ms", self.coalesce.wait_timeout_ms),
            ("coalesce.lock_ttl_ms", self.coalesce.lock_ttl_ms),
            ("coalesce.lock_poll_ms", self.coalesce.lock_poll_ms),
            ("refresh.concurrency", self.refresh.concurrency as u64),
            (
                "memory.snapshot_every_changes",
                self.memory.snapshot_every_changes,
            ),
            (
                "memory.snapshot_interval_secs",
                self.memory.snapshot_interval_secs,
            ),
            ("refresh.max_backoff_secs", self.refresh.max_backoff_secs),
            ("l1.max_lifetime_ms", self.l1.max_lifetime_ms),
            (
                "server.event_rate_per_sec",
                u64::from(self.server.event_rate_per_sec),
            ),
            ("server.event_burst", u64::from(self.server.event_burst)),
            ("server.peer_timeout_ms", self.server.peer_timeout_ms),
            (
                "server.ready_probe_interval_ms",
                self.server.ready_probe_interval_ms,
            ),
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
            ),
            ("server.max_connections", self.server.max_connections as u64),
            ("cache.max_variants", self.cache.max_variants as u64),
            (
                "redis.circuit_failures",
                u64::from(self.redis.circuit_failures),
            ),
            ("journal.max_ops", self.journal.max_ops as u64),
            ("l1.ack_timeout_ms", self.l1.ack_timeout_ms),
            ("events.stream_block_ms", self.events.stream_block_ms),
            (
                "events.stream_claim_idle_ms",
                self.events.stream_claim_idle_ms,
            ),
            ("events.stream_batch", self.events.stream_batch as u64),
            ("peers.down_ms", self.peers.down_ms),
            ("events.max_deliveries", self.events.max_deliveries),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(invalid(key, "must be greater than 0"));
        }
        self.validate_stream()?;
        self.admin_prefix()?;
        match self.auth.frontend.as_str() {
            "forward" | "none" => {}
            "jwt" => {
                self.jwt_verifier()?;
            }
            other => {
                return Err(invalid(
                    "auth.frontend",
                    format!("{other:?} is not forward, jwt or none"),
                ));
            }
        }
        let a = &self.admin;
        if !(100..=3_600_000).contains(&a.history_interval_ms) {
            return Err(invalid(
                "admin.history_interval_ms",
                "must be between 100 and 3600000",
            ));
        }
        if !(1..=100_000).contains(&a.history_samples) {
            return Err(invalid(
                "admin.history_samples",
                "must be between 1 and 100000",
            ));
        }
        if !(1..=10_000).contains(&a.recent_actions) {
            return Err(invalid(
                "admin.recent_actions",
                "must be between 1 and 10000",
            ));
        }
        if self.auth.validation_ttl == 0 {
            return Err(invalid("auth.validation_ttl", "must be greater than 0"));
        }
        if !(1..=100).contains(&self.refresh.ahead_percent) {
            return Err(invalid(
                "refresh.ahead_percent",
                "must be between 1 and 100",
            ));
        }
        if self.l1.enabled && self.l1.max_bytes < 1024 * 1024 {
            return Err(invalid("l1.max_bytes", "must be at least 1048576 (1 MiB)"));
        }
        if self.memory.max_bytes < 1024 * 1024 {
            return Err(invalid(
                "memory.max_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        let prefix_ok = !self.cache.prefix.is_empty()
            && self.cache.prefix.len() <= 64
            && self
                .cache
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !prefix_ok {
            return Err(invalid(
                "cache.prefix",
                "must be 1-64 characters of A-Z, a-z, 0-9, '_', '-', '.'",
            ));
        }
        validate_version(&self.cache.version).map_err(|e| invalid("cache.version", e))?;
        self.view_table()?;
        self.event_kinds()?;
        self.write_rules()?;
        for id in &self.warm.model_run_ids {
            validate_run_id(id).map_err(|e| invalid("warm.model_run_ids", e))?;
        }
        // The receiver of a peer invalidation first tries Redis (up to one command time-out)
        // and answers after it has journaled: a sender that gives up sooner never hears it.
        if self.server.peer_timeout_ms <= self.redis.command_timeout_ms {
            return Err(invalid(
                "server.peer_timeout_ms",
                format!(
                    "must be greater than redis.command_timeout_ms ({})",
                    self.redis.command_timeout_ms
                ),
            ));
        }
        let allowed = self.peer_allow_list()?;
        if let Some(secret) = &self.peers.secret {
            if secret.expose_secret().len() < 16 {
                return Err(invalid("peers.secret", "must be at least 16 characters"));
            }
            // A peer signature would otherwise also be a valid signed event, and back.
            if self
                .events
                .secret
                .as_ref()
                .is_some_and(|e| e.expose_secret() == secret.expose_secret())
            {
                return Err(invalid("peers.secret", "must differ from events.secret"));
            }
        }
        if let Some(url) = &self.server.advertise_url
            && let Err(why) = allowed.check_url(url)
        {
            return Err(invalid(
                "server.advertise_url",
                format!(
                    "must be a bare http(s)://host[:port] on a host in peers.allowed, or other instances never tell this one of invalidations ({why})"
                ),
            ));
        }
        if let Some(url) = &self.server.advertise_url {
            let parsed = reqwest::Url::parse(url)
                .map_err(|e| invalid("server.advertise_url", e.to_string()))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                return Err(invalid(
                    "server.advertise_url",
                    "must be an http(s) URL with a host",
                ));
            }
        }
        for origin in &self.cors.allowed_origins {
            if origin != "*" && http::HeaderValue::from_str(origin).is_err() {
                return Err(invalid(
                    "cors.allowed_origins",
                    format!("{origin:?} is not valid"),
                ));
            }
        }
        Ok(())
    }

    /// `server.admin_prefix`, checked.
    pub fn admin_prefix(&self) -> Result<AdminPrefix, ConfigError> {
        AdminPrefix::parse(&self.server.admin_prefix).map_err(|e| invalid("server.admin_prefix", e))
    }

    /// The view table, checked: one line naming the view and the field on error. No view may
    /// take a path of runcache's own routes (under `server.admin_prefix`).
    pub fn view_table(&self) -> Result<ViewTable, ConfigError> {
        let reserved = self.admin_prefix()?.reserved();
        let reserved: Vec<&str> = reserved.iter().map(String::as_str).collect();
        ViewTable::compile_with(&self.views.all(), &reserved).map_err(|e| {
            ConfigError::InvalidEntry {
                key: e.setting,
                reason: e.reason,
            }
        })
    }

    /// The freshness rules of the views, indexed by `View::index` (the table's order).
    pub fn view_policies(&self) -> Vec<ViewPolicy> {
        self.view_table()
            .map(|t| {
                t.views()
                    .iter()
                    .map(|d| ViewPolicy {
                        ttl: Duration::from_secs(d.ttl_secs),
                        grace: Duration::from_secs(d.grace_secs),
                        stale_if_error: Duration::from_secs(d.stale_if_error_secs),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The write-through invalidation rules (`[invalidate.*]`), checked against the view
    /// table: one line naming the rule and the field on error.
    pub fn write_rules(&self) -> Result<crate::domain::WriteRules, ConfigError> {
        let lookups = self.lookups()?;
        crate::domain::WriteRules::compile(&self.invalidate, &self.view_table()?, &lookups.names())
            .map_err(|e| ConfigError::InvalidEntry {
                key: e.setting,
                reason: e.reason,
            })
    }

    /// The lookup tables (`[lookups.*]`), checked against the views and the enabled rules.
    pub fn lookups(&self) -> Result<crate::domain::Lookups, ConfigError> {
        let rules = self
            .invalidate
            .iter()
            .filter(|(_, r)| r.enabled != Some(false))
            .map(|(name, _)| name.clone())
            .collect();
        crate::domain::Lookups::compile(&self.lookups, &self.view_table()?, &rules).map_err(|e| {
            ConfigError::InvalidEntry {
                key: e.setting,
                reason: e.reason,
            }
        })
    }

    /// `events.kinds`, checked.
    pub fn event_kinds(&self) -> Result<EventKinds, ConfigError> {
        EventKinds::compile(&self.events.kinds)
            .map_err(|(key, reason)| ConfigError::InvalidEntry { key, reason })
    }

    /// `cache.stored_headers` as header names, lower case. Refused: a name that is not one,
    /// and headers that must never be replayed from the cache: hop-by-hop ones, `Set-Cookie`,
    /// and those runcache sets itself.
    pub fn stored_headers(&self) -> Result<Vec<http::HeaderName>, ConfigError> {
        // Never replayed from the cache besides the hop-by-hop headers and runcache's own:
        // a cookie, what says how the body is encoded, credentials, and `Vary` (a variant
        // gets the one it was stored under).
        const REFUSED: [&str; 5] = [
            "vary",
            "set-cookie",
            "content-encoding",
            "www-authenticate",
            "authorization",
        ];
        self.cache
            .stored_headers
            .iter()
            .map(|h| {
                let name = http::HeaderName::from_bytes(h.trim().to_ascii_lowercase().as_bytes())
                    .map_err(|_| invalid("cache.stored_headers", format!("{h:?} is not a header name")))?;
                let n = name.as_str();
                if REFUSED.contains(&n)
                    || crate::domain::headers::is_hop_by_hop(n)
                    || crate::domain::headers::is_set_by_runcache(n)
                {
                    return Err(invalid(
                        "cache.stored_headers",
                        format!("{h:?} is never stored (hop-by-hop, a cookie, or set by runcache itself)"),
                    ));
                }
                Ok(name)
            })
            .collect()
    }

    /// The JWT verifier of `auth.frontend = jwt` (`None` in other modes).
    pub fn jwt_verifier(&self) -> Result<Option<JwtVerifier>, ConfigError> {
        let a = &self.auth;
        if a.frontend != "jwt" {
            return Ok(None);
        }
        let pem = match &a.jwt_public_key_path {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                invalid(
                    "auth.jwt_public_key_path",
                    format!("cannot read {path:?}: {e}"),
                )
            })?),
            None => None,
        };
        JwtVerifier::new(
            &a.jwt_algorithm,
            a.jwt_secret.as_ref().map(|s| s.expose_secret().as_bytes()),
            pem.as_deref(),
            a.jwt_audience.as_deref(),
            a.jwt_issuer.as_deref(),
            a.jwt_leeway_secs,
        )
        .map(Some)
        .map_err(|e| invalid("auth.jwt_algorithm", e))
    }

    /// The listen address.
    pub fn socket_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.addr.parse().map_err(|_| {
            invalid(
                "server.addr",
                format!("{:?} is not host:port", self.server.addr),
            )
        })
    }

    /// `redis.url` with any password replaced by `***`, safe for logs.
    pub fn redis_url_redacted(&self) -> String {
        redact_url(self.redis.url.expose_secret())
    }

    /// `origin.base_url` with any credential replaced by `***`, safe for logs.
    pub fn origin_url_redacted(&self) -> String {
        redact_url(&self.origin.base_url)
    }
}

/// Replaces what may be a credential in a URL with `***`: the password, a lone user name
/// (`https://token@host`, a common way to pass an API key), and the query.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            } else if !parsed.username().is_empty() {
                let _ = parsed.set_username("***");
            }
            if parsed.query().is_some() {
                parsed.set_query(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparseable url>".to_owned(),
    }
}

/// Milliseconds to a `Duration`.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

mod sections;
#[cfg(test)]
mod tests;

pub use sections::*;

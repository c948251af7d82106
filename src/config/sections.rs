//! The settings tree's sections, one struct per `[section]` of `config/default.toml`.

use secrecy::SecretString;
use serde::Deserialize;

use super::run_ids;
use crate::domain::ViewSpec;

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Listen address, `host:port` (default `127.0.0.1:8080`).
    pub addr: String,
    /// Whole-request time-out in ms (default 30000).
    pub request_timeout_ms: u64,
    /// Largest request body in bytes (default 65536).
    pub max_body_bytes: usize,
    /// Grace period for in-flight requests on shutdown, in ms (default 30000).
    pub shutdown_timeout_ms: u64,
    /// Most request header fields (default 64; 431 above).
    pub max_headers: usize,
    /// Most bytes of request headers (default 16384; 431 above).
    pub max_header_bytes: usize,
    /// Requests in flight before new ones are shed with 503 (default 1024).
    pub max_concurrent_requests: usize,
    /// Admin requests per second per client address (default 20; 429 above).
    pub admin_rate_per_sec: u32,
    /// Burst of admin requests per client address (default 40).
    pub admin_burst: u32,
    /// Event requests (and peer invalidations) per second per client address (default 1000;
    /// 429 above): a training sweep sends one per run.
    pub event_rate_per_sec: u32,
    /// Burst of event requests per client address (default 2000).
    pub event_burst: u32,
    /// The URL other instances reach this one at, for invalidations made while Redis is
    /// unreachable (default unset: `http://` and the address actually bound).
    pub advertise_url: Option<String>,
    /// Time-out of one direct invalidation sent to another instance, in ms (default 750).
    pub peer_timeout_ms: u64,
    /// How often Redis and the origin are probed for `/ready`, in ms (default 2000).
    pub ready_probe_interval_ms: u64,
    /// How long a client may take to send a request head, in ms, counted from when its
    /// connection opened or went idle after a response (default 30000): it is also the
    /// keep-alive idle time-out.
    pub header_read_timeout_ms: u64,
    /// Client connections open at once; more wait in the listen backlog (default 4096).
    pub max_connections: usize,
    /// Path prefix of every route runcache owns: admin, events, operations, docs, dashboard
    /// (default empty: SPEC section 1's paths). Checked by [`crate::domain::AdminPrefix`].
    pub admin_prefix: String,
}

/// `[origin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginSettings {
    /// Base URL of the backend (default `http://127.0.0.1:8000`).
    pub base_url: String,
    /// Connect time-out in ms (default 2000).
    pub connect_timeout_ms: u64,
    /// Whole origin request time-out in ms (default 10000).
    pub timeout_ms: u64,
    /// Largest origin body in bytes (default 8 MiB).
    pub max_response_bytes: usize,
    /// Request headers forwarded to the origin (lowercase names).
    pub forward_headers: Vec<String>,
    /// `Vary` fields the origin's bodies never depend on (lowercase names; default none):
    /// left out when an answer's variants are worked out.
    #[serde(default)]
    pub ignore_vary: Vec<String>,
    /// Path probed by `/ready` (default `/health`).
    pub health_path: String,
    /// Idle pooled connection lifetime in ms (default 90000).
    pub pool_idle_timeout_ms: u64,
    /// Idle connections kept per host (default 32).
    pub pool_max_idle_per_host: usize,
}

/// `[gateway]`: everything that is not a view or a route of runcache's (SPEC section 9).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    /// Whether a request that matches no view and no runcache route is streamed to the origin
    /// and back unchanged (default `false`: it is a `404` or `405`).
    pub pass_through: bool,
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// Redis URL; may carry a password, hence secret (default `redis://127.0.0.1:6379`;
    /// `rediss://` for TLS).
    pub url: SecretString,
    /// PEM file of the certificate authorities a `rediss://` server is verified against
    /// (default unset: the system's roots).
    pub tls_ca_file: Option<String>,
    /// `single` (default: `url`), `cluster` or `sentinel`.
    pub mode: String,
    /// Seed nodes of a Redis Cluster (`mode = "cluster"`).
    pub cluster_urls: Vec<SecretString>,
    /// Sentinel addresses (`mode = "sentinel"`); each may carry the sentinels' own password.
    pub sentinel_urls: Vec<SecretString>,
    /// The name the sentinels monitor the master under (`mode = "sentinel"`).
    pub master_name: Option<String>,
    /// Per-command time-out on the request path, in ms (default 250).
    pub command_timeout_ms: u64,
    /// Connect time-out in ms (default 500).
    pub connect_timeout_ms: u64,
    /// Probe period while Redis is unreachable, in ms (default 1000).
    pub probe_interval_ms: u64,
    /// Period of re-reading the shared key version, in ms (default 500).
    pub version_poll_ms: u64,
    /// Admin connection pool size (default 4).
    pub pool_max_size: usize,
    /// Wait for a pooled admin connection, in ms (default 1000).
    pub pool_timeout_ms: u64,
    /// Opening a pooled admin connection, in ms (default 1000).
    pub pool_create_timeout_ms: u64,
    /// Health check of an idle pooled connection, in ms (default 500).
    pub pool_recycle_timeout_ms: u64,
    /// SCAN COUNT per step (default 500).
    pub scan_batch: usize,
    /// Consecutive failed Redis commands that open the circuit… (default 5)
    pub circuit_failures: u32,
    /// …provided the failures have gone on this long, in ms (default 1000): one slow reply
    /// or a short burst of time-outs never sends the instance to its memory tier.
    pub circuit_window_ms: u64,
}

/// `[cache]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    /// Physical key prefix (default `runcache`).
    pub prefix: String,
    /// Starting key version when Redis holds none (default `v1`).
    pub version: String,
    /// Seconds an origin 404 is cached; 0 disables (default 0).
    pub not_found_ttl: u64,
    /// Largest body stored; larger origin answers are passed through but not cached
    /// (default 1 MiB).
    pub max_entry_bytes: usize,
    /// Origin headers stored with an entry and sent on its hits, besides `Content-Type`
    /// (default `Content-Language`, `Content-Disposition`, `Link`, `Cache-Control`,
    /// `Last-Modified`, `Expires`).
    pub stored_headers: Vec<String>,
    /// Most variants stored per entry for an origin that answers with `Vary` (default 8).
    pub max_variants: usize,
    /// Bytes of gzip copies of cached answers kept per instance, so that a hit is not
    /// compressed again on every request (default 64 MiB; 0: compressed on each hit).
    pub compressed_max_bytes: usize,
}

/// `[views]`: the view table. The three views of SPEC section 1 are named fields, so that
/// code (tests above all) reaches them directly; every other `[views.<name>]` table lands in
/// `others`. All are checked alike ([`super::Settings::view_table`]).
#[derive(Debug, Clone, Deserialize)]
pub struct ViewsSettings {
    /// `GET …/metrics`.
    pub metrics: ViewSpec,
    /// `GET …/feature-importance`.
    pub feature_importance: ViewSpec,
    /// `POST /api/v1/models/compare`.
    pub comparison: ViewSpec,
    /// Every other view, by name.
    #[serde(flatten)]
    pub others: std::collections::BTreeMap<String, ViewSpec>,
}

impl ViewsSettings {
    /// Every view, by name.
    pub fn all(&self) -> std::collections::BTreeMap<String, ViewSpec> {
        let mut all = self.others.clone();
        all.insert("metrics".into(), self.metrics.clone());
        all.insert("feature_importance".into(), self.feature_importance.clone());
        all.insert("comparison".into(), self.comparison.clone());
        all
    }
}

/// `[memory]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySettings {
    /// Byte bound of the in-process store (default 256 MiB).
    pub max_bytes: u64,
    /// Where the in-process store is snapshotted (default unset: no snapshots).
    pub snapshot_path: Option<String>,
    /// Snapshot after this many changes (default 1000).
    pub snapshot_every_changes: u64,
    /// Or after this many seconds with at least one change (default 60).
    pub snapshot_interval_secs: u64,
    /// While serving from memory and knowing of other instances, the oldest entry served, in
    /// ms (default 2000): an invalidation that could reach this instance by no other path is
    /// late by at most this.
    pub degraded_max_age_ms: u64,
}

/// `[l1]`: the in-process near cache in front of Redis.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L1Settings {
    /// Whether hot entries read from Redis are kept in process too (default `true`).
    pub enabled: bool,
    /// Byte bound of the near cache (default 64 MiB).
    pub max_bytes: u64,
    /// Longest an entry stays in the near cache, in ms: the worst-case staleness if an
    /// invalidation message is lost while the subscription still looks healthy (default 2000).
    pub max_lifetime_ms: u64,
    /// How long an invalidation waits for every instance to confirm it dropped its near-cache
    /// copies, in ms (default 250).
    pub ack_timeout_ms: u64,
}

/// `[warm]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmSettings {
    /// Runs warmed in the background at start (default none).
    #[serde(deserialize_with = "run_ids")]
    pub model_run_ids: Vec<String>,
    /// Origin requests a warm-up runs at once (default 4).
    pub concurrency: usize,
    /// How many of the origin's most recent runs to warm at start (default 0: none).
    pub recent_runs: usize,
    /// Origin path listing recent runs, called as `{path}?limit={recent_runs}`
    /// (default `/api/v1/models/runs`).
    pub recent_path: String,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Bearer token for admin routes and events; generated at start when unset.
    pub token: Option<SecretString>,
    /// Time between two samples of `/cache/stats/history`, in ms (default 5000).
    pub history_interval_ms: u64,
    /// Samples `/cache/stats/history` keeps (default 720: an hour at 5 s).
    pub history_samples: usize,
    /// Admin actions, and events, kept in memory (each) for `/cache/stats` (default 50).
    pub recent_actions: usize,
}

/// `[coalesce]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoalesceSettings {
    /// How long a request waits for a fetch it started or joined, in ms (default 15000).
    pub wait_timeout_ms: u64,
    /// Lifetime of the cross-instance fetch lock in Redis, in ms (default 12000).
    pub lock_ttl_ms: u64,
    /// How often an instance waiting on another's lock looks for the entry, in ms (default 25).
    pub lock_poll_ms: u64,
}

/// `[refresh]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshSettings {
    /// Reads (per instance, recently) that make an entry hot; 0 disables (default 3).
    pub min_hits: u32,
    /// Refresh within this last share of the TTL, in percent (default 10).
    pub ahead_percent: u8,
    /// Refreshes running at once (default 4).
    pub concurrency: usize,
    /// Largest random delay before a refresh, in ms (default 1000).
    pub jitter_ms: u64,
    /// Longest back-off after failed refreshes of one key, in seconds (default 300).
    pub max_backoff_secs: u64,
    /// JSON fields ignored when comparing bodies (default `generated_at`, `timestamp`).
    pub volatile_fields: Vec<String>,
}

/// `[journal]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalSettings {
    /// File where invalidations made during a Redis outage are kept until replayed
    /// (default `data/journal.log`); empty keeps them in memory only.
    pub path: String,
    /// Pending operations before the journal collapses into one invalidation of every entry
    /// (default 10000).
    pub max_ops: usize,
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// How cached views are protected: `forward` (default), `jwt` or `none`.
    pub frontend: String,
    /// How long the origin's acceptance of a credential for an entry is trusted, in seconds
    /// (default 60).
    pub validation_ttl: u64,
    /// `jwt` mode: `HS256` (default), `RS256` or `ES256`.
    pub jwt_algorithm: String,
    /// `jwt` mode with HS256: the shared secret.
    pub jwt_secret: Option<SecretString>,
    /// `jwt` mode with RS256/ES256: path of the PEM public key.
    pub jwt_public_key_path: Option<String>,
    /// `jwt` mode: required `aud`, if set.
    pub jwt_audience: Option<String>,
    /// `jwt` mode: required `iss`, if set.
    pub jwt_issuer: Option<String>,
    /// `jwt` mode: clock leeway for `exp` and `nbf`, in seconds (default 0).
    pub jwt_leeway_secs: u64,
}

impl AuthSettings {
    /// The parsed mode (validated by [`super::Settings::validate`]).
    pub fn mode(&self) -> crate::domain::FrontendAuth {
        use crate::domain::FrontendAuth;
        match self.frontend.as_str() {
            "none" => FrontendAuth::None,
            "jwt" => FrontendAuth::Jwt,
            _ => FrontendAuth::Forward,
        }
    }
}

/// `[events]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSettings {
    /// HMAC-SHA256 key for signed events; unset: signatures are off (bearer token only).
    pub secret: Option<SecretString>,
    /// How far a signed event's timestamp may be from this clock, either way, in seconds
    /// (default 300).
    pub tolerance_secs: u64,
    /// Redis stream read for events through a consumer group, for example `runcache:events`
    /// (default unset: off).
    pub stream: Option<String>,
    /// The consumer group every instance reads the stream through (default `runcache`).
    pub stream_group: String,
    /// This instance's consumer name in the group (default unset: its advertised URL, which
    /// stays the same across restarts, so a restarted instance finds its own pending entries).
    pub stream_consumer: Option<String>,
    /// Longest wait for new entries before the loop checks again, in ms (default 2000).
    pub stream_block_ms: u64,
    /// Entries another consumer has left pending this long are taken over, in ms
    /// (default 30000): longer than any invalidation takes, or live instances would steal
    /// each other's work (harmless, since applying an event twice is, but wasted).
    pub stream_claim_idle_ms: u64,
    /// Entries read per step (default 100).
    pub stream_batch: usize,
    /// Event kinds and the tags each invalidates, as templates over the event's fields
    /// (SPEC section 8, "Events by tag").
    pub kinds: std::collections::BTreeMap<String, Vec<String>>,
    /// Deliveries of one stream entry (the count in `XPENDING`) after which an entry whose
    /// invalidation still fails is set aside in the dead-letter stream, with the error, and
    /// replaced by a conservative invalidation of every view the event could touch
    /// (default 5, 1 to 1000).
    pub max_deliveries: u64,
}

/// `[peers]`: direct invalidations between instances (SPEC section 2, "Peers never trust the
/// registry").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeersSettings {
    /// HMAC-SHA256 key that direct invalidations are signed with; every instance of a
    /// deployment shares it (default unset: derived from `admin.token`, which is never sent).
    pub secret: Option<SecretString>,
    /// Hosts, IP addresses or CIDR ranges a registered address may name (default: loopback
    /// and private ranges).
    pub allowed: Vec<String>,
    /// How long an instance that did not answer a direct invalidation is skipped before it
    /// is tried again, in ms (default 30000).
    pub down_ms: u64,
}

/// `[cors]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSettings {
    /// Allowed browser origins; `["*"]` for any; empty for no CORS headers.
    pub allowed_origins: Vec<String>,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Output format.
    pub format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

//! Application state: cheap handles shared by every handler and background task.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::{ExposeSecret, SecretString};

use crate::cache::fallback::Near;
use crate::cache::memory::MemoryStore;
use crate::cache::near::NearCache;
use crate::cache::near::bus::Bus;
use crate::cache::read_through::{CoalesceOptions, ReadThroughOptions, RefreshOptions};
use crate::cache::redis::{RedisOptions, RedisStore};
use crate::cache::snapshot::Snapshotter;
use crate::cache::{FallbackStore, KeyVersion, Keyspace, ReadThrough};
use crate::config::{Settings, ms};
use crate::http::auth::SeenSignatures;
use crate::http::limits::Limits;
use crate::invalidation::Invalidator;
use crate::metrics::Stats;
use crate::origin::OriginClient;

/// Everything handlers need, behind one `Arc`: axum clones the state for every request (and
/// every `State` extractor), so a clone must be one reference count, not one per field.
#[derive(Clone)]
pub struct AppState(Arc<AppStateInner>);

impl std::ops::Deref for AppState {
    type Target = AppStateInner;

    fn deref(&self) -> &AppStateInner {
        &self.0
    }
}

/// The handles inside [`AppState`].
pub struct AppStateInner {
    /// Validated settings.
    pub settings: Arc<Settings>,
    /// Redis with the memory fallback.
    pub store: Arc<FallbackStore>,
    /// Read-through serving of the views.
    pub views: ReadThrough,
    /// Invalidation by run, key, pattern and version.
    pub invalidator: Invalidator,
    /// `/cache/stats` counters.
    pub stats: Arc<Stats>,
    /// The key version in use.
    pub version: Arc<KeyVersion>,
    /// Physical key layout.
    pub keys: Keyspace,
    /// Token for admin routes and events (configured or generated).
    pub admin_token: Arc<SecretString>,
    /// Whether `admin_token` was generated at start (and must be logged once).
    pub token_generated: bool,
    /// How the admin token is named in audit lines (a short hash).
    pub admin_token_id: String,
    /// Event signatures already used (replay protection).
    pub seen_signatures: SeenSignatures,
    /// Header, concurrency and admin-rate limits.
    pub limits: Arc<Limits>,
    /// Prometheus renderer.
    pub prometheus: PrometheusHandle,
    /// Memory-tier snapshots, when `memory.snapshot_path` is set.
    pub snapshots: Option<Arc<Snapshotter>>,
    /// Set once start-up work (first Redis probe, version sync) is done; `/ready` is 503 before.
    pub started: Arc<AtomicBool>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("store", &self.store.tier())
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Builds the state from validated settings. Does no I/O: Redis connects lazily.
    pub fn new(settings: Settings) -> anyhow::Result<Self> {
        let prometheus = crate::metrics::install();
        let keys = Keyspace::new(settings.cache.prefix.clone());
        let redis = RedisStore::new(&RedisOptions {
            url: settings.redis.url.expose_secret().to_owned(),
            command_timeout: ms(settings.redis.command_timeout_ms),
            connect_timeout: ms(settings.redis.connect_timeout_ms),
            pool_max_size: settings.redis.pool_max_size,
            pool_timeout: ms(settings.redis.pool_timeout_ms),
            pool_create_timeout: ms(settings.redis.pool_create_timeout_ms),
            pool_recycle_timeout: ms(settings.redis.pool_recycle_timeout_ms),
            scan_batch: settings.redis.scan_batch,
            gen_ttl: gen_ttl(&settings),
        })
        .context("set up the redis client")?;
        let memory = MemoryStore::new(settings.memory.max_bytes);
        // Every entry of every version of this service (never its _meta or _tags keys).
        let all_entries = format!("{}:[^_]*", keys.prefix());
        let journal = Some(settings.journal.path.trim())
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from);
        let near = settings.l1.enabled.then(|| Near {
            cache: Arc::new(NearCache::new(
                settings.l1.max_bytes,
                ms(settings.l1.max_lifetime_ms),
            )),
            bus: Arc::new(Bus::new(
                &settings.cache.prefix,
                ms(settings.l1.ack_timeout_ms),
                ms(settings.redis.probe_interval_ms),
            )),
        });
        let store = Arc::new(FallbackStore::new(
            redis,
            memory,
            all_entries,
            journal,
            near,
        ));
        let version = Arc::new(KeyVersion::new(&settings.cache.version));
        let stats = Arc::new(Stats::default());
        let origin = OriginClient::new(&settings.origin).context("build the origin client")?;
        let views = ReadThrough::new(
            store.clone(),
            origin,
            keys.clone(),
            version.clone(),
            stats.clone(),
            ReadThroughOptions {
                policies: settings.view_policies(),
                not_found_ttl: Duration::from_secs(settings.cache.not_found_ttl),
                coalesce: CoalesceOptions {
                    wait: ms(settings.coalesce.wait_timeout_ms),
                    lock_ttl: ms(settings.coalesce.lock_ttl_ms),
                    lock_poll: ms(settings.coalesce.lock_poll_ms),
                },
                refresh: RefreshOptions {
                    min_hits: settings.refresh.min_hits,
                    ahead_percent: settings.refresh.ahead_percent,
                    concurrency: settings.refresh.concurrency,
                    jitter: ms(settings.refresh.jitter_ms),
                    max_backoff: Duration::from_secs(settings.refresh.max_backoff_secs),
                    volatile_fields: settings.refresh.volatile_fields.clone(),
                },
                auth: settings.auth.mode(),
                jwt: settings.jwt_verifier()?.map(Arc::new),
                validation_ttl: Duration::from_secs(settings.auth.validation_ttl),
                max_entry_bytes: settings.cache.max_entry_bytes,
            },
        );
        let invalidator =
            Invalidator::new(store.clone(), keys.clone(), version.clone(), stats.clone());
        let (admin_token, token_generated) = match &settings.admin.token {
            Some(t) => (t.clone(), false),
            None => (SecretString::from(generate_token()), true),
        };
        let snapshots = settings.memory.snapshot_path.as_deref().map(|p| {
            Arc::new(Snapshotter::new(
                p.into(),
                settings.memory.snapshot_every_changes,
                Duration::from_secs(settings.memory.snapshot_interval_secs),
            ))
        });
        let seen_signatures = SeenSignatures::new(settings.events.tolerance_secs);
        let limits = Arc::new(Limits::new(
            settings.server.max_headers,
            settings.server.max_header_bytes,
            settings.server.max_concurrent_requests,
            settings.server.admin_rate_per_sec,
            settings.server.admin_burst,
        ));
        Ok(Self(Arc::new(AppStateInner {
            settings: Arc::new(settings),
            store,
            views,
            invalidator,
            stats,
            version,
            keys,
            admin_token_id: crate::http::auth::token_id(admin_token.expose_secret()),
            admin_token: Arc::new(admin_token),
            token_generated,
            seen_signatures,
            limits,
            prometheus,
            snapshots,
            started: Arc::new(AtomicBool::new(false)),
        })))
    }
}

/// Generation counters must outlive every entry stamped with them: twice the longest
/// retention, and at least a day.
fn gen_ttl(settings: &Settings) -> Duration {
    let longest = settings
        .view_policies()
        .iter()
        .map(|p| p.ttl + p.grace.max(p.stale_if_error))
        .max()
        .unwrap_or_default();
    (longest * 2).max(Duration::from_secs(86_400))
}

/// 32 random bytes, hex-encoded.
fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness is a broken host; a v4 UUID pair still comes from a CSPRNG-seeded source.
        let a = uuid::Uuid::new_v4();
        let b = uuid::Uuid::new_v4();
        bytes[..16].copy_from_slice(a.as_bytes());
        bytes[16..].copy_from_slice(b.as_bytes());
    }
    crate::cache::hex(&bytes)
}

//! Application state: cheap handles shared by every handler and background task. This is
//! where the layers are wired together (store → serve → http).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::{ExposeSecret, SecretSlice, SecretString};

use crate::config::{Settings, ms};
use crate::domain::policy::MAX_ORIGIN_WINDOW_SECS;
use crate::domain::{AdminPrefix, ViewTable};
use crate::invalidation::Invalidator;
use crate::metrics::Stats;
use crate::metrics::audit::AuditTrail;
use crate::metrics::history::History;
use crate::origin::OriginClient;
use crate::origin::stream::StreamClient;
use crate::security::limits::Rate;
use crate::security::signature::derive_key;
use crate::security::{Deliveries, Limits};
use crate::serve::{CoalesceOptions, Parts, ReadThrough, ReadThroughOptions, RefreshOptions};
use crate::store::counters::ReadCounters;
use crate::store::memory::MemoryStore;
use crate::store::near::bus::Bus;
use crate::store::near::{Near, NearCache};
use crate::store::redis::sentinel::SentinelOptions;
use crate::store::redis::{RedisOptions, RedisStore};
use crate::store::snapshot::Snapshotter;
use crate::store::tiered::circuit::CircuitOptions;
use crate::store::tiered::peers::{PeerOptions, Peers};
use crate::store::tiered::{FallbackStore, TieredOptions};
use crate::store::{KeyVersion, Keyspace, NearStore};
use crate::tasks::Tasks;

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
    /// The event kinds (`events.kinds`), checked.
    pub kinds: Arc<crate::domain::EventKinds>,
    /// The write-through invalidation rules (`[invalidate.*]`), checked.
    pub rules: Arc<crate::domain::WriteRules>,
    /// Gzip copies of cached answers, made once (see `serve::precompressed`).
    pub precompressed: Arc<crate::serve::precompressed::Precompressed>,
    /// Validated settings.
    pub settings: Arc<Settings>,
    /// The store: Redis with the memory fallback, and the near cache in front.
    pub store: Arc<NearStore>,
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
    /// The key direct invalidations from other instances are signed with (`peers.secret`, or
    /// derived from the admin token).
    pub peer_secret: SecretSlice<u8>,
    /// Whether `admin_token` was generated at start (and must be logged once).
    pub token_generated: bool,
    /// How the admin token is named in audit lines (a short hash).
    pub admin_token_id: String,
    /// Signed event deliveries (each applied at most once).
    pub deliveries: Deliveries,
    /// Header, concurrency and rate limits.
    pub limits: Arc<Limits>,
    /// Prometheus renderer.
    pub prometheus: PrometheusHandle,
    /// Memory-tier snapshots, when `memory.snapshot_path` is set.
    pub snapshots: Option<Arc<Snapshotter>>,
    /// Background work (fetches, refreshes, clean-ups), awaited at shutdown.
    pub tasks: Tasks,
    /// Set once start-up work (first Redis probe, version sync) is done; `/ready` is 503 before.
    pub started: Arc<AtomicBool>,
    /// What the last background probe of Redis and the origin found (`/ready` reports it).
    pub readiness: Readiness,
    /// Periodic samples of the headline figures (`/cache/stats/history`).
    pub history: Arc<History>,
    /// Admin actions and events: logged, and the last few kept for `/cache/stats`.
    pub audit: Arc<AuditTrail>,
    /// Where runcache's own routes are served (`server.admin_prefix`).
    pub prefix: AdminPrefix,
    /// The pass-through client, when `gateway.pass_through` is on.
    pub gateway: Option<StreamClient>,
    /// The client of the `[invalidate.*]` rules' writes (streamed, as passed-through requests).
    pub writes: StreamClient,
}

/// The last background probe of Redis and the origin. `/ready` answers from it rather than
/// calling them itself, so that a load balancer polling `/ready` cannot multiply its traffic
/// into theirs.
#[derive(Debug, Default)]
pub struct Readiness {
    redis: AtomicBool,
    origin: AtomicBool,
    /// When the last probe finished, in Unix ms (0: none yet).
    at_ms: AtomicU64,
}

impl Readiness {
    /// Records a probe's results.
    pub fn record(&self, redis: bool, origin: bool) {
        self.redis.store(redis, Ordering::Relaxed);
        self.origin.store(origin, Ordering::Relaxed);
        self.at_ms
            .store(crate::domain::policy::now_ms(), Ordering::Release);
    }

    /// `(redis reachable, origin reachable, ms since the probe)`; `None` before the first one.
    pub fn last(&self) -> Option<(bool, bool, u64)> {
        let at = self.at_ms.load(Ordering::Acquire);
        (at != 0).then(|| {
            (
                self.redis.load(Ordering::Relaxed),
                self.origin.load(Ordering::Relaxed),
                crate::domain::policy::now_ms().saturating_sub(at),
            )
        })
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("store", &self.store.tiered().tier())
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Builds the state from validated settings. Does no network I/O: Redis connects lazily.
    pub fn new(settings: Settings) -> anyhow::Result<Self> {
        let prometheus = crate::metrics::install();
        let table = Arc::new(settings.view_table()?);
        let keys = if settings.redis.mode == "cluster" {
            Keyspace::clustered(settings.cache.prefix.clone())
        } else {
            Keyspace::new(settings.cache.prefix.clone())
        }
        .with_views(&table);
        let (admin_token, token_generated) = match &settings.admin.token {
            Some(t) => (t.clone(), false),
            None => (SecretString::from(crate::security::generate_token()), true),
        };
        let admin_token = Arc::new(admin_token);
        let version = Arc::new(KeyVersion::new(&settings.cache.version));
        let tasks = Tasks::new();
        let peer_secret = match &settings.peers.secret {
            Some(secret) => secret.expose_secret().as_bytes().to_vec(),
            None => derive_key(admin_token.expose_secret().as_bytes(), PEER_KEY_PURPOSE),
        };
        let store = Arc::new(build_store(
            &settings,
            &keys,
            &version,
            &peer_secret,
            &settings.admin_prefix()?,
        )?);
        let stats = Arc::new(Stats::new(&table.handles()));
        let origin = OriginClient::new(&settings.origin).context("build the origin client")?;
        let gateway = match settings.gateway.pass_through {
            true => {
                Some(StreamClient::new(&settings.origin).context("build the pass-through client")?)
            }
            false => None,
        };
        let writes = StreamClient::new(&settings.origin).context("build the writes' client")?;
        let prefix = settings.admin_prefix()?;
        let started = Arc::new(AtomicBool::new(false));
        let invalidator = Invalidator::new(
            table.clone(),
            store.clone(),
            store.clone(),
            keys.clone(),
            version.clone(),
            stats.clone(),
            tasks.clone(),
            started.clone(),
        );
        let lookups = Arc::new(crate::serve::lookups::LookupService::new(
            Arc::new(settings.lookups()?),
            store.clone(),
            keys.clone(),
            tasks.clone(),
            &derive_key(&peer_secret, LOOKUP_KEY_PURPOSE),
        ));
        let views = ReadThrough::new(
            Parts {
                lookups,
                store: store.clone(),
                locks: store.clone(),
                origin,
                keys: keys.clone(),
                version: version.clone(),
                stats: stats.clone(),
                invalidator: invalidator.clone(),
                counters: store.counters().clone(),
                tasks: tasks.clone(),
            },
            read_through_options(&settings, table)?,
        );
        let snapshots = settings.memory.snapshot_path.as_deref().map(|p| {
            Arc::new(Snapshotter::new(
                p.into(),
                settings.memory.snapshot_every_changes,
                Duration::from_secs(settings.memory.snapshot_interval_secs),
            ))
        });
        let history = Arc::new(History::new(
            settings.admin.history_samples,
            settings.admin.history_interval_ms,
        ));
        let audit = Arc::new(AuditTrail::new(settings.admin.recent_actions));
        let server = &settings.server;
        let limits = Arc::new(
            Limits::new(
                server.max_headers,
                server.max_header_bytes,
                server.max_concurrent_requests,
                Rate {
                    per_sec: server.admin_rate_per_sec,
                    burst: server.admin_burst,
                },
                Rate {
                    per_sec: server.event_rate_per_sec,
                    burst: server.event_burst,
                },
            )
            .with_prefix(prefix.clone()),
        );
        let kinds = Arc::new(settings.event_kinds()?);
        let rules = Arc::new(settings.write_rules()?);
        let precompressed = Arc::new(crate::serve::precompressed::Precompressed::new(
            settings.cache.compressed_max_bytes,
        ));
        Ok(Self(Arc::new(AppStateInner {
            kinds,
            rules,
            precompressed,
            deliveries: Deliveries::new(settings.events.tolerance_secs),
            settings: Arc::new(settings),
            store,
            views,
            invalidator,
            stats,
            version,
            keys,
            admin_token_id: crate::security::token_id(admin_token.expose_secret()),
            admin_token,
            peer_secret: SecretSlice::from(peer_secret),
            token_generated,
            limits,
            prometheus,
            snapshots,
            tasks,
            started,
            readiness: Readiness::default(),
            history,
            audit,
            prefix,
            gateway,
            writes,
        })))
    }
}

/// What the key of direct invalidations is derived from `admin.token` for, when
/// `peers.secret` is unset: every instance sharing the token derives the same key, and the
/// key reveals nothing of the token.
const PEER_KEY_PURPOSE: &str = "runcache peers.secret v1";

/// What the HMAC key of shared lookup values is derived for (from the peers' secret).
const LOOKUP_KEY_PURPOSE: &str = "runcache lookups v1";

/// Redis, the memory tier, the tiered store over them, and the near cache in front.
fn build_store(
    settings: &Settings,
    keys: &Keyspace,
    version: &Arc<KeyVersion>,
    peer_secret: &[u8],
    prefix: &AdminPrefix,
) -> anyhow::Result<NearStore> {
    let r = &settings.redis;
    let redis = RedisStore::new(
        &RedisOptions {
            url: r.url.expose_secret().to_owned(),
            tls_roots: match &r.tls_ca_file {
                Some(path) => Some(
                    std::fs::read(path)
                        .with_context(|| format!("redis.tls_ca_file: cannot read {path}"))?,
                ),
                None => None,
            },
            command_timeout: ms(r.command_timeout_ms),
            connect_timeout: ms(r.connect_timeout_ms),
            pool_max_size: r.pool_max_size,
            pool_timeout: ms(r.pool_timeout_ms),
            pool_create_timeout: ms(r.pool_create_timeout_ms),
            pool_recycle_timeout: ms(r.pool_recycle_timeout_ms),
            scan_batch: r.scan_batch,
            gen_ttl: gen_ttl(settings),
            sentinel: (r.mode == "sentinel").then(|| SentinelOptions {
                urls: r
                    .sentinel_urls
                    .iter()
                    .map(|u| u.expose_secret().to_owned())
                    .collect(),
                master_name: r.master_name.clone().unwrap_or_default(),
            }),
            cluster_urls: (r.mode == "cluster").then(|| {
                r.cluster_urls
                    .iter()
                    .map(|u| u.expose_secret().to_owned())
                    .collect()
            }),
        },
        keys.clone(),
    )
    .context("set up the redis client")?;
    let memory = MemoryStore::new(
        settings.memory.max_bytes,
        settings.cache.max_entry_bytes as u64,
        keys.clone(),
    );
    let journal_path = Some(settings.journal.path.trim())
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from);
    let peers = Peers::new(PeerOptions {
        secret: SecretSlice::from(peer_secret.to_vec()),
        allowed: settings.peer_allow_list()?,
        timeout: ms(settings.server.peer_timeout_ms),
        down: ms(settings.peers.down_ms),
        path: prefix.join(crate::security::limits::PEER_PATH),
    })
    .context("build the client for other instances")?;
    let instance = peers.id().to_owned();
    let tiered = Arc::new(FallbackStore::new(
        redis,
        memory,
        keys.clone(),
        version.clone(),
        peers,
        TieredOptions {
            journal_path,
            journal_max_ops: settings.journal.max_ops,
            circuit: CircuitOptions {
                failures: r.circuit_failures,
                window: ms(r.circuit_window_ms),
            },
            degraded_max_age: ms(settings.memory.degraded_max_age_ms),
        },
    ));
    let l1 = &settings.l1;
    let near = l1.enabled.then(|| Near {
        cache: Arc::new(NearCache::new(l1.max_bytes, ms(l1.max_lifetime_ms))),
        bus: Arc::new(Bus::new(
            &settings.cache.prefix,
            instance,
            ms(l1.ack_timeout_ms),
            ms(r.probe_interval_ms),
        )),
    });
    Ok(NearStore::new(tiered, near, ReadCounters::default()))
}

fn read_through_options(
    settings: &Settings,
    table: Arc<ViewTable>,
) -> anyhow::Result<ReadThroughOptions> {
    Ok(ReadThroughOptions {
        table,
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
        stored_headers: settings.stored_headers()?,
        max_variants: settings.cache.max_variants,
        embedded_by_default: settings.redis_left_at_default(),
    })
}

/// Generation counters must outlive every entry stamped with them, or a counter that expires
/// (back to 0) makes an entry it hid current again: twice the longest retention, and at least
/// a day. An entry's retention is its TTL (a view's, or `cache.not_found_ttl`) plus its stale
/// window, and the origin's own `stale-while-revalidate` or `stale-if-error` may set that
/// window up to a week ([`MAX_ORIGIN_WINDOW_SECS`]), whatever the configured ones say.
fn gen_ttl(settings: &Settings) -> Duration {
    let origin_window = Duration::from_secs(MAX_ORIGIN_WINDOW_SECS);
    let longest = settings
        .view_policies()
        .iter()
        .map(|p| {
            p.ttl.max(Duration::from_secs(settings.cache.not_found_ttl))
                + p.stale_window().max(origin_window)
        })
        .max()
        .unwrap_or_default();
    (longest * 2).max(Duration::from_secs(86_400))
}

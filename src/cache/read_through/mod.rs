//! Read-through serving of one cached view: look up, fetch from the origin on a miss, store
//! what the origin allows, and describe the answer (`X-Cache`, `Cache-Status`, `Age`, `ETag`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

use futures_util::FutureExt;

mod answer;
mod refresh;
mod warm;

pub use answer::{CacheOutcome, ViewResponse};
pub use refresh::{RefreshOptions, content_hash};
pub use warm::{WarmFailure, WarmReport};

use super::access::{AccessControl, Credential, FrontendAuth, JwtVerifier};
use super::coalesce::Flights;
use super::near::NearSlot;
use super::policy::{self, Freshness, Storability};
use super::{CacheEntry, FallbackStore, KeyVersion, Keyspace, Store, Tier, View};
use crate::invalidation::Invalidator;
use crate::metrics::{Outcome, Stats};
use crate::origin::{OriginClient, OriginError, OriginRequest, OriginResponse};

/// One cached-view request, validated and normalised by the handler.
#[derive(Debug, Clone)]
pub struct ViewRequest {
    /// Which view.
    pub view: View,
    /// Logical key, e.g. `model:metrics:42`.
    pub logical_key: String,
    /// Runs this entry depends on (its tags).
    pub run_ids: Vec<String>,
    /// What to send to the origin on a miss.
    pub origin: OriginRequest,
    /// `false`: go to the origin, neither read nor write the cache.
    pub use_cache: bool,
}

impl ViewRequest {
    /// `GET /api/v1/models/train/{run_id}/metrics` (`run_id` already validated).
    pub fn metrics(run_id: &str, headers: HeaderMap, use_cache: bool) -> Self {
        Self {
            view: View::Metrics,
            logical_key: super::metrics_key(run_id),
            run_ids: vec![run_id.to_owned()],
            origin: OriginRequest {
                method: Method::GET,
                path_and_query: format!("/api/v1/models/train/{run_id}/metrics"),
                body: None,
                headers,
            },
            use_cache,
        }
    }

    /// `GET /api/v1/models/train/{run_id}/feature-importance[?top_n=N]` (validated inputs).
    pub fn feature_importance(
        run_id: &str,
        top_n: Option<u32>,
        headers: HeaderMap,
        use_cache: bool,
    ) -> Self {
        let query = top_n.map(|n| format!("?top_n={n}")).unwrap_or_default();
        Self {
            view: View::FeatureImportance,
            logical_key: super::feature_importance_key(run_id, top_n),
            run_ids: vec![run_id.to_owned()],
            origin: OriginRequest {
                method: Method::GET,
                path_and_query: format!("/api/v1/models/train/{run_id}/feature-importance{query}"),
                body: None,
                headers,
            },
            use_cache,
        }
    }

    /// `POST /api/v1/models/compare` for ids already normalised (strings, unique, sorted):
    /// the origin receives exactly the list the key is hashed from.
    pub fn comparison(run_ids: Vec<String>, headers: HeaderMap, use_cache: bool) -> Self {
        let body = serde_json::json!({ "model_run_ids": run_ids });
        Self {
            view: View::Comparison,
            logical_key: super::comparison_key(&run_ids),
            origin: OriginRequest {
                method: Method::POST,
                path_and_query: "/api/v1/models/compare".to_owned(),
                body: Some(Bytes::from(body.to_string())),
                headers,
            },
            run_ids,
            use_cache,
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

/// Request coalescing settings.
#[derive(Debug, Clone, Copy)]
pub struct CoalesceOptions {
    /// How long a request waits for a fetch (its own or the one it joined).
    pub wait: Duration,
    /// Lifetime of the cross-instance fetch lock in Redis.
    pub lock_ttl: Duration,
    /// How often an instance that lost the lock looks for the winner's entry.
    pub lock_poll: Duration,
}

/// Tuning of the read-through cache.
#[derive(Debug, Clone)]
pub struct ReadThroughOptions {
    /// Freshness rules, indexed by [`View::index`].
    pub policies: [ViewPolicy; 3],
    /// How long an origin 404 is stored (zero: never).
    pub not_found_ttl: Duration,
    /// Request coalescing.
    pub coalesce: CoalesceOptions,
    /// Refresh-ahead.
    pub refresh: RefreshOptions,
    /// Frontend access control.
    pub auth: FrontendAuth,
    /// The JWT verifier of `jwt` mode.
    pub jwt: Option<Arc<JwtVerifier>>,
    /// How long an origin acceptance of a credential for an entry is trusted.
    pub validation_ttl: Duration,
    /// Largest body stored; larger answers are passed through.
    pub max_entry_bytes: usize,
}

/// The per-request context of a lookup.
#[derive(Debug, Clone)]
struct Ctx {
    key: String,
    /// The caller's credentials (keyed hash).
    cred: Credential,
    /// Single-flight key: the entry, plus the credential in `forward` mode.
    flight: String,
    deps: Vec<String>,
    version: Arc<String>,
    policy: ViewPolicy,
}

/// Read-through cache for the views. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ReadThrough {
    store: Arc<FallbackStore>,
    origin: OriginClient,
    keys: Keyspace,
    version: Arc<KeyVersion>,
    stats: Arc<Stats>,
    policies: [ViewPolicy; 3],
    not_found_ttl: Duration,
    coalesce: CoalesceOptions,
    flights: Arc<Flights<ViewResponse>>,
    refresher: Arc<refresh::Refresher>,
    invalidator: Invalidator,
    access: Arc<AccessControl>,
    max_entry_bytes: usize,
}

impl ReadThrough {
    /// Builds the read-through cache.
    pub fn new(
        store: Arc<FallbackStore>,
        origin: OriginClient,
        keys: Keyspace,
        version: Arc<KeyVersion>,
        stats: Arc<Stats>,
        options: ReadThroughOptions,
    ) -> Self {
        let invalidator =
            Invalidator::new(store.clone(), keys.clone(), version.clone(), stats.clone());
        Self {
            store,
            origin,
            keys,
            version,
            stats,
            policies: options.policies,
            not_found_ttl: options.not_found_ttl,
            coalesce: options.coalesce,
            flights: Arc::default(),
            refresher: Arc::new(refresh::Refresher::new(options.refresh)),
            invalidator,
            access: Arc::new(AccessControl::new(
                options.auth,
                options.validation_ttl,
                options.jwt,
            )),
            max_entry_bytes: options.max_entry_bytes,
        }
    }

    /// Frontend access control.
    pub fn access(&self) -> &AccessControl {
        &self.access
    }

    /// The origin client (for pass-through requests).
    pub fn origin(&self) -> &OriginClient {
        &self.origin
    }

    /// Serves `req` and records it in the statistics before returning, so a client that has
    /// its answer sees it counted.
    #[tracing::instrument(name = "view", skip_all, fields(view = req.view.name(), key = %req.logical_key))]
    pub async fn serve(&self, req: ViewRequest) -> Result<ViewResponse, OriginError> {
        let started = Instant::now();
        let view = req.view;
        let result = self.serve_inner(req).await;
        let outcome = match &result {
            Ok(r) => match r.outcome {
                CacheOutcome::Hit { .. } => Outcome::Hit,
                CacheOutcome::Miss { .. } => Outcome::Miss,
                CacheOutcome::Stale { .. } => Outcome::Stale,
                CacheOutcome::Bypass => Outcome::Bypass,
            },
            Err(_) => Outcome::Error,
        };
        self.stats.record_request(view, outcome, started.elapsed());
        result
    }

    fn context(&self, req: &ViewRequest) -> Ctx {
        let version = self.version.get();
        let key = self.keys.entry(&version, &req.logical_key);
        let cred = self.credential(req);
        self.context_for(req, version, key, cred)
    }

    fn credential(&self, req: &ViewRequest) -> Credential {
        self.access
            .credential(req.origin.headers.get(http::header::AUTHORIZATION))
    }

    /// The rest of the context of `key`, once the near cache could not answer.
    fn context_for(
        &self,
        req: &ViewRequest,
        version: Arc<String>,
        key: String,
        cred: Credential,
    ) -> Ctx {
        let mut deps = Vec::with_capacity(1 + req.run_ids.len());
        deps.push(self.keys.view_gen(&version, req.view));
        deps.extend(req.run_ids.iter().map(|id| self.keys.run_gen(&version, id)));
        Ctx {
            flight: self.access.flight_key(&key, cred),
            cred,
            key,
            deps,
            version,
            policy: self.policies[req.view.index()],
        }
    }

    /// The current (not invalidated) entry of `ctx`, if any; a store error is a miss.
    /// A fresh entry read from Redis is also kept in the near cache.
    async fn lookup(&self, ctx: &Ctx) -> Option<CacheEntry> {
        let epoch = self.store.near_epoch();
        match self.store.get(&ctx.key, &ctx.deps).await {
            Ok(lookup) => {
                let entry = lookup.current()?;
                if self.store.near().is_some() {
                    let fresh_until = entry
                        .stored_at_ms
                        .saturating_add(entry.ttl_secs.saturating_mul(1000));
                    let fresh_for =
                        Duration::from_millis(fresh_until.saturating_sub(policy::now_ms()));
                    let hits = self.hit_counter(&ctx.key);
                    self.store
                        .near_keep(&ctx.key, &entry, &ctx.deps, hits, fresh_for, epoch);
                }
                Some(entry)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cache read failed; treating as a miss");
                None
            }
        }
    }

    pub(crate) async fn serve_inner(&self, req: ViewRequest) -> Result<ViewResponse, OriginError> {
        if !req.use_cache {
            let resp = self.fetch(req.view, req.origin).await?;
            return Ok(passthrough(resp, CacheOutcome::Bypass, false));
        }
        let version = self.version.get();
        let key = self.keys.entry(&version, &req.logical_key);
        let cred = self.credential(&req);
        // A cached copy (fresh, stale or as a fallback) goes only to credentials the origin
        // accepted for it; others are a MISS that asks the origin.
        let servable = self.access.may_serve(&key, cred);
        // The hot path: a fresh near-cache copy, served without a Redis round trip and
        // without building the rest of the context.
        if servable
            && let Some(slot) = self.store.near_get(&key)
            && let Some(hit) = self.serve_slot(&key, &slot, false, || req.clone())
        {
            return Ok(hit);
        }
        let ctx = self.context_for(&req, version, key, cred);
        // Boxed: the store and origin paths are large futures, and every layer above would
        // otherwise move them around on each request, hits from the near cache included.
        self.serve_from_store(req, ctx, servable).boxed().await
    }

    /// The near-cache copy `slot` of `key` as a hit if it is still fresh, counted for
    /// refresh-ahead (`req` is built only when a refresh must be scheduled). The caller has
    /// checked access.
    fn serve_slot(
        &self,
        key: &str,
        slot: &NearSlot,
        lane: bool,
        req: impl FnOnce() -> ViewRequest,
    ) -> Option<ViewResponse> {
        let entry = &slot.entry;
        let now = policy::now_ms();
        let ttl = policy::remaining_ttl_secs(entry.stored_at_ms, entry.ttl_secs, now)?;
        if let Some(near) = self.store.near() {
            near.cache.served(lane);
        }
        self.note_hit(key, entry, ttl, Some(&slot.hits), req);
        let age = policy::age_secs(entry.stored_at_ms, now);
        Some(self.entry_response(
            entry,
            CacheOutcome::Hit {
                ttl,
                age,
                collapsed: false,
            },
        ))
    }

    /// The hit lane's entry (see `http::hit_lane`): answers from the near cache, before any
    /// routing or middleware, when it holds a fresh copy of `logical_key` that a caller with
    /// `authorization` may be served, and counts the hit. `None`: nothing was served or
    /// counted, and the request takes the full path. `req` is built only if refresh-ahead
    /// needs it.
    pub fn near_hit(
        &self,
        view: View,
        logical_key: &str,
        authorization: Option<&http::HeaderValue>,
        req: impl FnOnce() -> ViewRequest,
    ) -> Option<ViewResponse> {
        let started = Instant::now();
        let key = self.keys.entry(&self.version.current(), logical_key);
        let cred = self.access.credential(authorization);
        let slot = self.store.near_get(&key)?;
        if !self.slot_may_serve(&key, &slot, cred) {
            return None;
        }
        let hit = self.serve_slot(&key, &slot, true, req)?;
        self.stats
            .record_request(view, Outcome::Hit, started.elapsed());
        Some(hit)
    }

    /// [`AccessControl::may_serve`], remembering the answer in the slot so that one caller's
    /// repeated hits skip the lookup (an acceptance is never withdrawn before it expires).
    fn slot_may_serve(&self, key: &str, slot: &NearSlot, cred: Credential) -> bool {
        if self.access.mode() != FrontendAuth::Forward {
            return self.access.may_serve(key, cred);
        }
        let now = Instant::now();
        if let Some(known) = slot.validated.load().as_deref()
            && known.0 == cred
            && now < known.1
        {
            return true;
        }
        match self.access.accepted_until(key, cred) {
            Some(until) => {
                slot.validated.store(Some(Arc::new((cred, until))));
                true
            }
            None => false,
        }
    }

    async fn serve_from_store(
        &self,
        req: ViewRequest,
        ctx: Ctx,
        servable: bool,
    ) -> Result<ViewResponse, OriginError> {
        let mut fallback = None;
        if let Some(entry) = self.lookup(&ctx).await.filter(|_| servable) {
            // After the lookup: the entry's store time may be derived from the key's
            // remaining life at the moment it was read.
            let now = policy::now_ms();
            let age = policy::age_secs(entry.stored_at_ms, now);
            match policy::freshness(
                entry.stored_at_ms,
                entry.ttl_secs,
                now,
                ctx.policy.grace,
                ctx.policy.stale_if_error,
            ) {
                Freshness::Fresh { ttl } => {
                    self.note_hit(&ctx.key, &entry, ttl, None, || req.clone());
                    return Ok(self.entry_response(
                        &entry,
                        CacheOutcome::Hit {
                            ttl,
                            age,
                            collapsed: false,
                        },
                    ));
                }
                Freshness::Revalidate => {
                    // One background refresh per key: a running one is joined, not repeated.
                    if !self.flights.is_running(&ctx.flight) {
                        drop(self.refresh_now(req, ctx, entry.clone()));
                    }
                    return Ok(self.entry_response(
                        &entry,
                        CacheOutcome::Stale {
                            age,
                            revalidating: true,
                        },
                    ));
                }
                Freshness::StaleIfError => fallback = Some(entry),
                Freshness::Expired => {}
            }
        }
        let view = req.view;
        let (flight, joined) = self.start_fetch(req, ctx);
        let result = tokio::time::timeout(self.coalesce.wait, flight)
            .await
            .unwrap_or(Err(OriginError::Timeout));
        if joined {
            self.stats.record_coalesced(view);
        }
        match (result, fallback) {
            (Ok(resp), _) if joined => Ok(resp.collapsed()),
            (Ok(resp), _) => Ok(resp),
            (Err(e), Some(entry)) => {
                tracing::warn!(error = %e, "origin failed; serving a stale copy (stale-if-error)");
                let age = policy::age_secs(entry.stored_at_ms, policy::now_ms());
                Ok(self.entry_response(
                    &entry,
                    CacheOutcome::Stale {
                        age,
                        revalidating: false,
                    },
                ))
            }
            (Err(e), None) => Err(e),
        }
    }

    /// Joins the fetch of `ctx.key`, or starts one in its own task.
    fn start_fetch(
        &self,
        req: ViewRequest,
        ctx: Ctx,
    ) -> (
        impl Future<Output = Result<ViewResponse, OriginError>> + use<>,
        bool,
    ) {
        let key = ctx.flight.clone();
        let this = self.clone();
        self.flights.join_or_start(&key, move || {
            async move { this.fetch_and_store(req, ctx).await }.boxed()
        })
    }

    /// The leader's work: re-check the cache, take the cross-instance lock (or wait for the
    /// instance holding it), fetch, store.
    async fn fetch_and_store(
        &self,
        req: ViewRequest,
        ctx: Ctx,
    ) -> Result<ViewResponse, OriginError> {
        // Credentials the origin has not accepted for this entry must be put to it: no
        // re-check of the cache, and no waiting for another instance's copy.
        let servable = self.access.may_serve(&ctx.key, ctx.cred);
        if servable && let Some(hit) = self.fresh_hit(&ctx).await {
            return Ok(hit);
        }
        // Generations are read before the origin is asked: an invalidation that lands while
        // the fetch is in flight bumps them, and the entry stored below is never served.
        let gens = match self.store.generations(&ctx.deps).await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read generations; answering without storing");
                return self
                    .fetch(req.view, req.origin)
                    .await
                    .map(|r| self.passthrough_miss(r, Some("store-failed")));
            }
        };
        let token = uuid::Uuid::new_v4().to_string();
        let lock = self.keys.fetch_lock(&ctx.version, &req.logical_key);
        let locked = if servable {
            match self.acquire_lock(&ctx, &lock, &token).await {
                Ok(locked) => locked,
                Err(hit) => {
                    self.stats.record_coalesced(req.view);
                    return Ok(hit);
                }
            }
        } else {
            false
        };
        let result = self.fetch_store_stamped(req, &ctx, gens).await;
        if locked && let Err(e) = self.store.redis().unlock(&lock, &token).await {
            tracing::debug!(error = %e, "fetch lock not released; it expires by itself");
        }
        result
    }

    /// A fresh, current entry of `ctx` as a hit.
    async fn fresh_hit(&self, ctx: &Ctx) -> Option<ViewResponse> {
        let entry = self.lookup(ctx).await?;
        let now = policy::now_ms();
        let ttl = policy::remaining_ttl_secs(entry.stored_at_ms, entry.ttl_secs, now)?;
        let age = policy::age_secs(entry.stored_at_ms, now);
        Some(self.entry_response(
            &entry,
            CacheOutcome::Hit {
                ttl,
                age,
                collapsed: false,
            },
        ))
    }

    /// Takes the cross-instance lock of `ctx` (only on Redis). `Ok(false)`: no lock (memory
    /// tier, Redis error, or waited the lock's lifetime out). `Err(hit)`: the instance holding
    /// the lock stored the entry meanwhile.
    async fn acquire_lock(&self, ctx: &Ctx, lock: &str, token: &str) -> Result<bool, ViewResponse> {
        let deadline = Instant::now() + self.coalesce.lock_ttl;
        while self.store.tier() == Tier::Redis {
            match self
                .store
                .redis()
                .try_lock(lock, token, self.coalesce.lock_ttl)
                .await
            {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(_) => return Ok(false),
            }
            if Instant::now() >= deadline {
                tracing::warn!("fetch lock held past its lifetime; fetching anyway");
                return Ok(false);
            }
            tokio::time::sleep(self.coalesce.lock_poll).await;
            if let Some(hit) = self.fresh_hit(ctx).await {
                return Err(hit.collapsed());
            }
        }
        Ok(false)
    }

    async fn fetch_store_stamped(
        &self,
        req: ViewRequest,
        ctx: &Ctx,
        gens: Vec<u64>,
    ) -> Result<ViewResponse, OriginError> {
        let resp = self.fetch(req.view, req.origin).await?;
        if matches!(
            resp.status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ) {
            // Refused: passed through, and nothing cached is revealed to these credentials.
            return Ok(self.passthrough_miss(resp, Some("refused")));
        }
        self.access.accepted(&ctx.key, ctx.cred);
        if resp.body.len() > self.max_entry_bytes {
            return Ok(self.passthrough_miss(resp, Some("too-large")));
        }
        let configured = match resp.status {
            StatusCode::OK => ctx.policy.ttl,
            StatusCode::NOT_FOUND if !self.not_found_ttl.is_zero() => self.not_found_ttl,
            _ => return Ok(self.passthrough_miss(resp, Some("status"))),
        };
        let ttl = match policy::storability(resp.cache_control.as_deref(), configured) {
            Storability::Store(ttl) => ttl,
            Storability::DoNotStore(why) => return Ok(self.passthrough_miss(resp, Some(why))),
        };
        let www_authenticate = resp.www_authenticate.clone();
        let (entry, retention) = self.new_entry(req.run_ids.as_slice(), ctx, resp, ttl, gens);
        let stored = match self.store.set(&ctx.key, &entry, retention).await {
            Ok(()) => {
                self.stats.record_set();
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cache write failed; answering without storing");
                false
            }
        };
        let detail = (!stored).then_some("store-failed");
        let mut out = self.entry_response(
            &entry,
            CacheOutcome::Miss {
                stored,
                detail,
                collapsed: false,
            },
        );
        out.www_authenticate = www_authenticate;
        Ok(out)
    }

    /// The entry for the origin's answer `resp`: tagged with its runs, stamped with the
    /// generations read before the fetch, kept past its TTL for as long as it may be served
    /// stale. Returns it with that retention.
    fn new_entry(
        &self,
        run_ids: &[String],
        ctx: &Ctx,
        resp: OriginResponse,
        ttl: Duration,
        gens: Vec<u64>,
    ) -> (CacheEntry, Duration) {
        let tags = run_ids
            .iter()
            .map(|id| self.keys.run_tag(&ctx.version, id))
            .collect();
        let content_type = resp
            .content_type
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut entry = CacheEntry::new(
            resp.status.as_u16(),
            content_type,
            resp.body,
            policy::now_ms(),
            ttl,
            tags,
        );
        entry.gens = gens;
        let stale_window = ctx.policy.grace.max(ctx.policy.stale_if_error);
        entry.stale_ms = u64::try_from(stale_window.as_millis()).unwrap_or(u64::MAX);
        (entry, ttl + stale_window)
    }

    /// Fetches from the origin, counting it; a 5xx becomes an error.
    async fn fetch(&self, view: View, req: OriginRequest) -> Result<OriginResponse, OriginError> {
        let started = Instant::now();
        let result = self.origin.send(req).await;
        let result = match result {
            Ok(r) if r.status.is_server_error() => Err(OriginError::Status(r.status)),
            other => other,
        };
        self.stats
            .record_origin(view, started.elapsed(), result.is_err());
        result
    }

    /// The answer for `entry`: its body and header values are shared, not copied.
    fn entry_response(&self, entry: &CacheEntry, outcome: CacheOutcome) -> ViewResponse {
        let status = StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK);
        ViewResponse {
            status,
            content_type: Some(entry.content_type.clone()).filter(|v| !v.is_empty()),
            www_authenticate: None,
            etag: (status == StatusCode::OK).then(|| entry.etag.clone()),
            body: entry.body.clone(),
            outcome,
            degraded: self.store.tier() == Tier::Memory,
        }
    }

    fn passthrough_miss(&self, resp: OriginResponse, detail: Option<&'static str>) -> ViewResponse {
        let degraded = self.store.tier() == Tier::Memory;
        passthrough(
            resp,
            CacheOutcome::Miss {
                stored: false,
                detail,
                collapsed: false,
            },
            degraded,
        )
    }
}

fn passthrough(resp: OriginResponse, outcome: CacheOutcome, degraded: bool) -> ViewResponse {
    let etag = (resp.status == StatusCode::OK).then(|| super::strong_etag(&resp.body));
    ViewResponse {
        status: resp.status,
        content_type: resp.content_type,
        www_authenticate: resp.www_authenticate,
        body: resp.body,
        etag,
        outcome,
        degraded,
    }
}

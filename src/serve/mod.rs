//! Serving the views: read-through (hit, stale, miss, bypass), coalescing, refresh-ahead,
//! warming and frontend access control. Depends on the store only through its traits
//! ([`Store`], [`FetchLock`]), on the origin client and on the invalidator; it never sees a
//! tier.
//!
//! - [`request`]: what a view request asks for; `answer`: the answer and its cache headers;
//! - `fetch`: a miss, from the cross-instance lock to the conditional store;
//! - [`coalesce`]: single flight, by stamp; [`access`]: who may be served what;
//! - [`refresh`]: refresh-ahead with change detection; `warm`: warming.

pub mod access;
mod answer;
pub mod coalesce;
mod fetch;
pub mod lookups;
pub mod precompressed;
pub mod refresh;
pub mod request;
mod vary;
mod warm;

use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use http::StatusCode;

pub use answer::{CacheOutcome, ViewResponse};
pub use refresh::{RefreshOptions, content_hash};
pub use request::{CoalesceOptions, ReadThroughOptions, ViewRequest};
pub use warm::{WarmFailure, WarmReport};

use self::access::AccessControl;
use self::coalesce::Flights;
use crate::domain::policy::{self, Freshness};
use crate::domain::{FrontendAuth, Resolved, View, ViewDef, ViewPolicy, ViewTable};
use crate::invalidation::Invalidator;
use crate::metrics::{Outcome, Stats};
use crate::origin::{OriginClient, OriginError, OriginResponse};
use crate::security::Credential;
use crate::store::counters::ReadCounters;
use crate::store::entry::strong_etag;
use crate::store::{
    CacheEntry, Deps, FetchLock, KeyVersion, Keyspace, NearSlot, Stamp, Store, StoreError, Tier,
};
use crate::tasks::Tasks;

/// The per-request context of a lookup.
#[derive(Debug, Clone)]
struct Ctx {
    key: String,
    /// The caller's credentials (keyed hash).
    cred: Credential,
    deps: Deps,
    version: Arc<String>,
    policy: ViewPolicy,
    /// For a view that learns tags from its answers: the sets of its request's own tags (an
    /// entry's other sets are learned, and their generations are checked too). `None` for
    /// any other view.
    learns: Option<Arc<[String]>>,
}

/// What the serving layer is built from.
pub struct Parts {
    /// Where entries live.
    pub store: Arc<dyn Store>,
    /// The cross-instance fetch lock.
    pub locks: Arc<dyn FetchLock>,
    /// The backend.
    pub origin: OriginClient,
    /// Physical key layout.
    pub keys: Keyspace,
    /// The key version in use.
    pub version: Arc<KeyVersion>,
    /// Counters for `/cache/stats`.
    pub stats: Arc<Stats>,
    /// Invalidations (refresh-ahead invalidates what changed).
    pub invalidator: Invalidator,
    /// Per-key read counts (shared with the near cache's copies).
    pub counters: ReadCounters,
    /// Background work, awaited at shutdown.
    pub tasks: Tasks,
    /// The lookup tables, learned from the views' answers (and read by write rules).
    pub lookups: Arc<lookups::LookupService>,
}

/// Read-through cache for the views. Cheap to clone.
#[derive(Clone)]
pub struct ReadThrough {
    store: Arc<dyn Store>,
    locks: Arc<dyn FetchLock>,
    origin: OriginClient,
    keys: Keyspace,
    version: Arc<KeyVersion>,
    stats: Arc<Stats>,
    table: Arc<ViewTable>,
    policies: Arc<[ViewPolicy]>,
    not_found_ttl: std::time::Duration,
    coalesce: CoalesceOptions,
    flights: Arc<Flights<ViewResponse>>,
    refresher: Arc<refresh::Refresher>,
    invalidator: Invalidator,
    access: Arc<AccessControl>,
    max_entry_bytes: usize,
    stored_headers: Arc<[http::HeaderName]>,
    max_variants: usize,
    embedded_by_default: bool,
    lookups: Arc<lookups::LookupService>,
    /// Set once an answer came from Redis (see [`Self::degraded`]).
    redis_seen: Arc<std::sync::atomic::AtomicBool>,
    tasks: Tasks,
}

impl std::fmt::Debug for ReadThrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadThrough").finish_non_exhaustive()
    }
}

impl ReadThrough {
    /// Builds the read-through cache.
    pub fn new(parts: Parts, options: ReadThroughOptions) -> Self {
        Self {
            flights: Arc::new(Flights::new(parts.tasks.clone())),
            refresher: Arc::new(refresh::Refresher::new(options.refresh, parts.counters)),
            store: parts.store,
            locks: parts.locks,
            origin: parts.origin,
            keys: parts.keys,
            version: parts.version,
            stats: parts.stats,
            table: options.table,
            policies: options.policies.into(),
            not_found_ttl: options.not_found_ttl,
            coalesce: options.coalesce,
            invalidator: parts.invalidator,
            access: Arc::new(AccessControl::new(
                options.auth,
                options.validation_ttl,
                options.jwt,
            )),
            max_entry_bytes: options.max_entry_bytes,
            stored_headers: options.stored_headers.into(),
            max_variants: options.max_variants,
            embedded_by_default: options.embedded_by_default,
            lookups: parts.lookups,
            redis_seen: Arc::default(),
            tasks: parts.tasks,
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

    /// The view table.
    pub fn table(&self) -> &ViewTable {
        &self.table
    }

    /// The lookup tables.
    pub fn lookups(&self) -> &lookups::LookupService {
        &self.lookups
    }

    /// The request `resolved` by `def`, as the cache serves it: the headers the origin is
    /// sent, and the caller's credential in its key where the view asks for it
    /// ([`Self::personalise`]).
    pub fn request(
        &self,
        def: &ViewDef,
        mut resolved: Resolved,
        headers: &http::HeaderMap,
    ) -> ViewRequest {
        self.personalise(def, &mut resolved, headers);
        ViewRequest::resolved(def, resolved, self.origin.forwarded_headers(headers))
    }

    /// For a view whose entries are per credential, puts the caller's credential (a keyed
    /// hash, never the credential) in the key of `resolved`.
    pub fn personalise(&self, def: &ViewDef, resolved: &mut Resolved, headers: &http::HeaderMap) {
        if def.per_credential {
            let cred = self
                .access
                .credential(headers.get(http::header::AUTHORIZATION));
            resolved.key.push_str(":cred-");
            resolved.key.push_str(&cred.tag());
        }
    }

    /// Keys in refresh back-off (for `/cache/stats`).
    pub fn refresh_backoff_keys(&self) -> u64 {
        self.refresher.backoff_keys()
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

    fn credential(&self, req: &ViewRequest) -> Credential {
        self.access
            .credential(req.origin.headers.get(http::header::AUTHORIZATION))
    }

    /// The context of `req` under `version`, once the near cache could not answer.
    fn context_for(
        &self,
        req: &ViewRequest,
        version: Arc<String>,
        key: String,
        cred: Credential,
    ) -> Ctx {
        let learns = self.table.get(req.view).learns_tags().then(|| {
            req.tags
                .iter()
                .map(|t| self.keys.tag_set(&version, t))
                .collect::<Arc<[String]>>()
        });
        Ctx {
            learns,
            deps: self.keys.deps(
                &version,
                req.view,
                &req.tags,
                self.table.get(req.view).learns_tags(),
            ),
            cred,
            key,
            version,
            policy: self.policies[req.view.index()],
        }
    }

    fn context(&self, req: &ViewRequest) -> Ctx {
        let version = self.version.get();
        let key = self.keys.entry(&version, &req.logical_key);
        let cred = self.credential(req);
        self.context_for(req, version, key, cred)
    }

    pub(crate) async fn serve_inner(&self, req: ViewRequest) -> Result<ViewResponse, OriginError> {
        if !req.use_cache {
            // Boxed, as every path but a hit's below: what a hit's future holds is moved.
            let resp = self.fetch(req.view, req.origin).boxed().await?;
            return Ok(passthrough(resp, CacheOutcome::Bypass, false));
        }
        let version = self.version.get();
        let key = self.keys.entry(&version, &req.logical_key);
        let cred = self.credential(&req);
        // The hot path: a fresh near-cache copy this caller may be served, without a Redis
        // round trip and without building the rest of the context.
        if let Some(slot) = self.store.peek(&key) {
            if slot.entry.vary.is_some() {
                return self.serve_variant(req, slot.entry.clone()).boxed().await;
            }
            if self.slot_may_serve(&key, &slot, cred)
                && let Some(hit) = self.serve_slot(&key, &slot, false, |_| true, || req.clone())
            {
                return Ok(hit);
            }
        }
        let ctx = self.context_for(&req, version, key, cred);
        // Boxed: the store and origin paths are large futures, and every layer above would
        // otherwise move them around on each request, hits from the near cache included.
        self.serve_from_store(req, ctx).boxed().await
    }

    /// The near-cache copy `slot` of `key` as a hit if it is still fresh and `accept` takes
    /// it, counted for refresh-ahead (`req` is built only when a refresh must be scheduled).
    /// The caller has checked access.
    fn serve_slot(
        &self,
        key: &str,
        slot: &NearSlot,
        lane: bool,
        accept: impl FnOnce(&CacheEntry) -> bool,
        req: impl FnOnce() -> ViewRequest,
    ) -> Option<ViewResponse> {
        let entry = &slot.entry;
        // A Vary marker is no answer (see `vary`).
        if entry.vary.is_some() {
            return None;
        }
        let now = policy::now_ms();
        let ttl = policy::remaining_ttl_secs(entry.stored_at_ms, entry.ttl_secs, now)?;
        if !accept(entry) {
            return None;
        }
        self.store.copy_served(lane);
        self.note_hit(key, entry, ttl, Some(&slot.hits), req);
        Some(self.hit(entry, ttl, now, false))
    }

    /// The hit lane's entry (see `http::hit_lane`): answers, before any routing or middleware,
    /// a fresh near-cache copy of `logical_key`, or (when reads go to the memory tier) a fresh
    /// memory-tier entry of it, that a caller with `authorization` may be served, and counts
    /// the hit. `None`: nothing was served or counted, and the request takes the full path.
    /// `tags` are the request's; `accept` sees the entry last, and may still refuse it (the
    /// lane answers a gzip request only when the body's compressed copy is kept); `req` is
    /// built only if refresh-ahead needs it.
    pub fn lane_hit(
        &self,
        view: View,
        logical_key: &str,
        tags: &[String],
        authorization: Option<&http::HeaderValue>,
        accept: impl FnOnce(&CacheEntry) -> bool,
        req: impl FnOnce() -> ViewRequest,
    ) -> Option<ViewResponse> {
        let started = Instant::now();
        let version = self.version.current();
        let key = self.keys.entry(&version, logical_key);
        let cred = self.access.credential(authorization);
        let hit = match self.store.peek(&key) {
            Some(slot) => {
                if !self.slot_may_serve(&key, &slot, cred) {
                    return None;
                }
                self.serve_slot(&key, &slot, true, accept, req)?
            }
            None => {
                let hit = self.memory_hit(view, &version, &key, tags, cred, accept, req)?;
                self.stats
                    .lane_served
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                hit
            }
        };
        self.stats
            .record_request(view, Outcome::Hit, started.elapsed());
        Some(hit)
    }

    /// A fresh memory-tier entry of `key` as a hit, when reads go to the memory tier now: the
    /// read and the checks [`Self::serve_from_store`] makes (the entry's stamp against the
    /// current one, access, a `Vary` marker, freshness), without I/O. Anything else (an entry
    /// with learned tags, whose generations take a second read; a stale or missing entry)
    /// is `None`, for the full path.
    #[allow(clippy::too_many_arguments)]
    fn memory_hit(
        &self,
        view: View,
        version: &str,
        key: &str,
        tags: &[String],
        cred: Credential,
        accept: impl FnOnce(&CacheEntry) -> bool,
        req: impl FnOnce() -> ViewRequest,
    ) -> Option<ViewResponse> {
        if !self.store.reads_memory() || self.table.get(view).learns_tags() {
            return None;
        }
        let deps = || self.keys.deps(version, view, tags, false);
        let hit = self.store.memory_servable(key, &deps)??;
        let entry = hit.entry();
        if entry.vary.is_some()
            || !self.may_serve_remembered(key, entry.status, hit.validated(), cred)
        {
            return None;
        }
        let now = policy::now_ms();
        let Freshness::Fresh { ttl } = freshness(entry, self.policies[view.index()], now) else {
            return None;
        };
        if !accept(entry) {
            return None;
        }
        self.note_hit(key, entry, ttl, None, req);
        Some(self.hit(entry, ttl, now, false))
    }

    /// [`AccessControl::may_serve`], remembering the answer in the slot so that one caller's
    /// repeated hits skip the lookup (a withdrawal forgets it: [`Self::revoke`]).
    fn slot_may_serve(&self, key: &str, slot: &NearSlot, cred: Credential) -> bool {
        self.may_serve_remembered(key, slot.entry.status, &slot.validated, cred)
    }

    /// [`AccessControl::may_serve`] for an entry holding `status`, remembering the answer in
    /// `validated` (a near-cache copy's, a memory-tier entry's) so that one caller's repeated
    /// hits skip the lookup (a withdrawal forgets it: [`Self::revoke`]).
    fn may_serve_remembered(
        &self,
        key: &str,
        status: u16,
        validated: &crate::store::Validated,
        cred: Credential,
    ) -> bool {
        if self.access.mode() != FrontendAuth::Forward {
            return self.access.may_serve(key, cred, status);
        }
        let now = Instant::now();
        if let Some(known) = validated.load().as_deref()
            && known.0 == cred
            && now < known.1
        {
            return true;
        }
        match self.access.accepted_until(key, cred, status) {
            Some(until) => {
                validated.store(Some(Arc::new((cred, until))));
                // A revocation between the lookup and the store would be undone by it: look
                // once more, after the store.
                if self.access.accepted_until(key, cred, status).is_none() {
                    validated.store(None);
                    return false;
                }
                true
            }
            None => false,
        }
    }

    /// Withdraws the acceptance of `ctx`'s credential for its entry, and the one a near-cache
    /// copy or memory-tier entry of it remembers (see [`Self::may_serve_remembered`]).
    fn revoke(&self, ctx: &Ctx) {
        self.access.revoke(&ctx.key, ctx.cred);
        self.store.forget_validated(&ctx.key);
    }

    /// The dependencies of an entry of `ctx` in the tag sets `tag_sets`: for a view that
    /// learns tags from its answers, its own and the generations of the tags it learned, which
    /// every read checks as it checks the others (so that an invalidation whose counters
    /// reached Redis drops it even if its deletes did not). `None` for any other view.
    fn learned_deps(&self, ctx: &Ctx, tag_sets: &[String]) -> Option<Deps> {
        let own = ctx.learns.as_ref()?;
        Some(
            ctx.deps.extended(
                tag_sets
                    .iter()
                    .filter(|set| !own.contains(set))
                    .filter_map(|set| self.keys.gen_of_set(set)),
            ),
        )
    }

    /// The entry of `ctx` if it may be served, and the current stamp of its dependencies.
    /// An entry with learned tags is checked against their generations too, read after it.
    async fn lookup(&self, ctx: &Ctx) -> Result<(Option<Box<CacheEntry>>, Stamp), StoreError> {
        let lookup = self.store.get(&ctx.key, &ctx.deps).await?;
        let Some(deps) = lookup
            .entry
            .as_ref()
            .and_then(|e| self.learned_deps(ctx, &e.tags))
        else {
            return Ok(lookup.servable());
        };
        let current = lookup.current;
        let learned = self.store.stamp(&deps).await?;
        let entry = lookup.entry.filter(|e| e.stamp.serves(&learned));
        Ok((entry, current))
    }

    async fn serve_from_store(
        &self,
        req: ViewRequest,
        ctx: Ctx,
    ) -> Result<ViewResponse, OriginError> {
        let (entry, stamp) = match self.lookup(&ctx).await {
            Ok((entry, stamp)) => {
                if let Some(marker) = entry.as_ref().filter(|e| e.vary.is_some()) {
                    return self.serve_variant(req, (**marker).clone()).boxed().await;
                }
                (entry, Some(stamp))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cache read failed; fetching without storing");
                (None, None)
            }
        };
        let mut fallback = None;
        // A cached copy (fresh, stale or as a fallback) goes only to credentials the origin
        // accepted for it; others are a MISS that asks the origin.
        if let Some(entry) = entry.filter(|e| self.access.may_serve(&ctx.key, ctx.cred, e.status)) {
            // After the lookup: the entry's store time may be derived from the key's
            // remaining life at the moment it was read.
            let now = policy::now_ms();
            match freshness(&entry, ctx.policy, now) {
                Freshness::Fresh { ttl } => {
                    self.note_hit(&ctx.key, &entry, ttl, None, || req.clone());
                    return Ok(self.hit(&entry, ttl, now, false));
                }
                Freshness::Revalidate => {
                    self.revalidate(req, ctx, (*entry).clone());
                    return Ok(self.entry_response(
                        &entry,
                        CacheOutcome::Stale {
                            age: policy::age_secs(entry.stored_at_ms, now),
                            revalidating: true,
                        },
                    ));
                }
                Freshness::StaleIfError => fallback = Some(entry),
                Freshness::Expired => {}
            }
        }
        // Boxed: a hit never gets here, and the fill's future (origin, single flight, time-out)
        // would otherwise be part of every hit's, and moved with it.
        self.fill(req, ctx, stamp, fallback).boxed().await
    }

    /// Answers `req` from the origin after a lookup that found no copy to serve: through the
    /// single flight when the store told the entry's `stamp` (storing the answer), alone
    /// otherwise; `fallback` is a stale copy served if the origin fails (stale-if-error).
    async fn fill(
        &self,
        req: ViewRequest,
        ctx: Ctx,
        stamp: Option<Stamp>,
        fallback: Option<Box<CacheEntry>>,
    ) -> Result<ViewResponse, OriginError> {
        let view = req.view;
        let result = match stamp {
            Some(stamp) => {
                let origin_req = req.origin.clone();
                let cred = ctx.cred;
                let (flight, joined) = self.start_fetch(req, ctx, stamp);
                if joined {
                    self.stats.record_coalesced(view);
                }
                let result = tokio::time::timeout(self.coalesce.wait, flight)
                    .await
                    .unwrap_or(Err(OriginError::Timeout));
                match result {
                    Ok(r) if joined => match vary::not_for_joiner(&r, &origin_req.headers, cred) {
                        Some(why) => self
                            .fetch(view, origin_req)
                            .await
                            .map(|r| self.passthrough_miss(r, Some(why))),
                        None => Ok(r.collapsed()),
                    },
                    other => other,
                }
            }
            // The store could not say what the entry depends on: answer from the origin,
            // alone (nothing safe to join) and without storing.
            None => self
                .fetch(req.view, req.origin)
                .await
                .map(|r| self.passthrough_miss(r, Some("store-failed"))),
        };
        match (result, fallback) {
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

    /// `entry` as a fresh hit with `ttl` seconds left.
    fn hit(&self, entry: &CacheEntry, ttl: u64, now: u64, collapsed: bool) -> ViewResponse {
        self.entry_response(
            entry,
            CacheOutcome::Hit {
                ttl,
                age: policy::age_secs(entry.stored_at_ms, now),
                collapsed,
            },
        )
    }

    /// Whether an answer now comes from the memory tier standing in for Redis
    /// (`Cache-Status: …; detail=memory-fallback`). The embedded store of the default set-up,
    /// before any Redis answered, stands in for nothing.
    fn degraded(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.store.source().tier == Tier::Redis {
            if !self.redis_seen.load(Relaxed) {
                self.redis_seen.store(true, Relaxed);
            }
            return false;
        }
        !self.embedded_by_default || self.redis_seen.load(Relaxed)
    }

    /// The answer for `entry`: its body and header values are shared, not copied.
    fn entry_response(&self, entry: &CacheEntry, outcome: CacheOutcome) -> ViewResponse {
        let status = StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK);
        ViewResponse {
            status,
            content_type: Some(entry.content_type.clone()).filter(|v| !v.is_empty()),
            headers: entry.headers.clone(),
            variant: None,
            etag: (status == StatusCode::OK).then(|| entry.etag.clone()),
            body: entry.body.clone(),
            copy_mark: entry.copy_mark.clone(),
            outcome,
            degraded: self.degraded(),
        }
    }

    fn passthrough_miss(&self, resp: OriginResponse, detail: Option<&'static str>) -> ViewResponse {
        passthrough(
            resp,
            CacheOutcome::Miss {
                stored: false,
                detail,
                collapsed: false,
            },
            self.degraded(),
        )
    }
}

/// Where `entry` stands at `now` under its view's policy (and the origin's own stale windows,
/// if it gave any): what every read of a stored entry decides by.
fn freshness(entry: &CacheEntry, view: ViewPolicy, now: u64) -> Freshness {
    let p = fetch::entry_policy(entry, view);
    policy::freshness(
        entry.stored_at_ms,
        entry.ttl_secs,
        now,
        p.grace,
        p.stale_if_error,
    )
}

fn passthrough(resp: OriginResponse, outcome: CacheOutcome, degraded: bool) -> ViewResponse {
    let etag = (resp.status == StatusCode::OK).then(|| strong_etag(&resp.body));
    ViewResponse {
        status: resp.status,
        content_type: resp.content_type,
        headers: crate::store::headers_of(&resp.headers),
        variant: None,
        body: resp.body,
        copy_mark: crate::store::CopyMark::default(),
        etag,
        outcome,
        degraded,
    }
}

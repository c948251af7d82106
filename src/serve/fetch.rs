//! A miss, as the leader of its flight does it: re-check the cache, take the cross-instance
//! lock (or wait for the instance holding it), fetch from the origin, and store the answer
//! only if the origin allows it and nothing it depends on moved since its stamp was read.

use std::time::{Duration, Instant};

use futures_util::FutureExt;
use http::StatusCode;

use super::{CacheOutcome, Ctx, ReadThrough, ViewRequest, ViewResponse};
use crate::domain::policy::{self, Storability};
use crate::domain::{View, ViewPolicy};
use crate::origin::{OriginError, OriginRequest, OriginResponse};
use std::sync::Arc;

use super::request::VariantOf;
use super::vary::{self, Spec};
use crate::store::{CacheEntry, Deps, Lock, Stamp, VaryMarker};

/// The stale windows an entry records when its answer set its own (see [`CacheEntry::windows`]).
/// What [`ReadThrough::learned_stamp`] found.
pub(super) enum Learned {
    /// The view learns no tags: the entry is stored under the request's dependencies.
    No,
    /// The dependencies and stamp to store under.
    Yes(Deps, Stamp),
    /// They could not be read (or were read from another tier): not stored.
    Unknown,
}

pub(super) fn windows_of(answer: ViewPolicy, view: ViewPolicy) -> Option<(u64, u64)> {
    (answer != view).then_some((answer.grace.as_secs(), answer.stale_if_error.as_secs()))
}

/// The stale windows that apply to `entry` under `view`'s policy.
pub(super) fn entry_policy(entry: &CacheEntry, view: ViewPolicy) -> ViewPolicy {
    match entry.windows {
        Some((grace, if_error)) => ViewPolicy {
            grace: Duration::from_secs(grace),
            stale_if_error: Duration::from_secs(if_error),
            ..view
        },
        None => view,
    }
}

impl ReadThrough {
    /// Joins the fetch of `ctx`'s entry if one running saw at least `stamp`, or starts one in
    /// a tracked task.
    pub(super) fn start_fetch(
        &self,
        req: ViewRequest,
        ctx: Ctx,
        stamp: Stamp,
    ) -> (
        impl Future<Output = Result<ViewResponse, OriginError>> + use<>,
        bool,
    ) {
        // Made here, not with the context: a hit never needs it.
        let key = self.access.flight_key(&ctx.key, ctx.cred);
        let this = self.clone();
        let started_under = stamp.clone();
        self.flights.join_or_start(&key, &stamp, move || {
            async move { this.fetch_and_store(req, ctx, started_under).await }.boxed()
        })
    }

    /// A fresh copy of `ctx`'s entry that its caller may be served, as a hit.
    fn fresh_for(&self, ctx: &Ctx, entry: &CacheEntry) -> Option<ViewResponse> {
        // A Vary marker is no answer: the flight goes on to the origin.
        if entry.vary.is_some() {
            return None;
        }
        if !self.access.may_serve(&ctx.key, ctx.cred, entry.status) {
            return None;
        }
        let now = policy::now_ms();
        let ttl = policy::remaining_ttl_secs(entry.stored_at_ms, entry.ttl_secs, now)?;
        Some(self.hit(entry, ttl, now, false))
    }

    /// The current entry of `ctx` as a fresh hit, or the current stamp to fetch under.
    async fn recheck(&self, ctx: &Ctx) -> Result<ViewResponse, Option<Stamp>> {
        match self.lookup(ctx).await {
            Ok((entry, current)) => match entry.and_then(|e| self.fresh_for(ctx, &e)) {
                Some(hit) => Ok(hit),
                None => Err(Some(current)),
            },
            Err(_) => Err(None),
        }
    }

    async fn fetch_and_store(
        &self,
        req: ViewRequest,
        ctx: Ctx,
        mut stamp: Stamp,
    ) -> Result<ViewResponse, OriginError> {
        // Another flight may have stored the entry since the lookup; a newer stamp, read
        // before the origin is asked, is as good as the first.
        match self.recheck(&ctx).await {
            Ok(hit) => return Ok(hit),
            Err(Some(current)) => stamp = current,
            Err(None) => {}
        }
        // Credentials the origin has not accepted for this entry must be put to it: no
        // waiting for another instance's copy.
        let token = uuid::Uuid::new_v4().to_string();
        let lock = self.keys.fetch_lock(&ctx.version, &req.logical_key);
        let locked = if self.access.knows(&ctx.key, ctx.cred) {
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
        let result = self.fetch_store(req, &ctx, stamp).await;
        if locked {
            self.release(lock, token).await;
        }
        result
    }

    /// Releases a fetch lock; if that fails, tries again in the background for about six
    /// seconds, since every other instance waiting for this entry polls the lock until it
    /// goes, and a `SET NX` that timed out while Redis hung runs once it resumes.
    pub(super) async fn release(&self, lock: String, token: String) {
        if self.locks.unlock(&lock, &token).await.is_ok() {
            return;
        }
        let locks = self.locks.clone();
        self.tasks.spawn(async move {
            for attempt in 0..6u32 {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                if locks.unlock(&lock, &token).await.is_ok() {
                    return;
                }
            }
            tracing::debug!("fetch lock not released; it expires by itself");
        });
    }

    /// Takes the cross-instance lock of `ctx`. `Ok(true)`: this fetch holds it, or may (a
    /// `SET NX` that timed out can still have run): release it afterwards. `Ok(false)`: no
    /// lock to release (no shared store in use, or the holder's lifetime was waited out).
    /// `Err(hit)`: the instance holding the lock stored the entry meanwhile.
    async fn acquire_lock(&self, ctx: &Ctx, lock: &str, token: &str) -> Result<bool, ViewResponse> {
        let deadline = Instant::now() + self.coalesce.lock_ttl;
        let mut waited = false;
        loop {
            match self
                .locks
                .try_lock(lock, token, self.coalesce.lock_ttl)
                .await
            {
                Ok(Lock::Taken) | Err(_) => {
                    // The holder may have stored its entry and released the lock between
                    // this fetch's last look and its `SET NX`: look once more, holding it.
                    if waited && let Ok(hit) = self.recheck(ctx).await {
                        self.release(lock.to_owned(), token.to_owned()).await;
                        return Err(hit.collapsed());
                    }
                    return Ok(true);
                }
                Ok(Lock::Unshared) => return Ok(false),
                Ok(Lock::Held) => waited = true,
            }
            if Instant::now() >= deadline {
                tracing::warn!("fetch lock held past its lifetime; fetching anyway");
                return Ok(false);
            }
            tokio::time::sleep(self.coalesce.lock_poll).await;
            if let Ok(hit) = self.recheck(ctx).await {
                return Err(hit.collapsed());
            }
        }
    }

    /// How long `resp` may be stored for `policy`, or why it may not be.
    pub(super) fn storable(
        &self,
        resp: &OriginResponse,
        policy: ViewPolicy,
    ) -> Result<Duration, &'static str> {
        let configured = match resp.status {
            StatusCode::OK => policy.ttl,
            StatusCode::NOT_FOUND if !self.not_found_ttl.is_zero() => self.not_found_ttl,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Err("refused"),
            _ => return Err("status"),
        };
        if resp.body.len() > self.max_entry_bytes {
            return Err("too-large");
        }
        // A cookie is for its requester alone (Varnish and nginx do not store such answers
        // either).
        if resp.headers.contains_key(http::header::SET_COOKIE) {
            return Err("set-cookie");
        }
        // A body the origin encoded would be served later without its encoding.
        if resp
            .headers
            .get(http::header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
        {
            return Err("encoded");
        }
        match policy::storability(resp.cache_control.as_deref(), configured) {
            Storability::Store(ttl) => Ok(ttl),
            Storability::DoNotStore(why) => Err(why),
        }
    }

    async fn fetch_store(
        &self,
        req: ViewRequest,
        ctx: &Ctx,
        stamp: Stamp,
    ) -> Result<ViewResponse, OriginError> {
        let req_headers = req.origin.headers.clone();
        let resp = self.fetch(req.view, req.origin.clone()).await?;
        let passed = crate::store::headers_of(&resp.headers);
        let spec = vary::spec(resp.vary.as_deref(), &self.origin);
        // What requests that joined this fetch must match to be given its answer, stored or
        // not (see `vary::not_for_joiner`).
        let variant = vary::shared_with(&spec, &req_headers, ctx.cred);
        // A variant whose origin now varies on other headers than its marker names would be
        // stored under a key that does not say what it varies on.
        let marker_moved = matches!((&spec, &req.variant), (Spec::Fields(f), Some(of))
            if of.marker.vary.as_ref().is_some_and(|m| &m.headers != f));
        let tags = self.entry_tags(&req, ctx, &resp.body);
        let storable = match (&spec, &tags) {
            (Spec::Unstorable, _) => Err("vary"),
            // Variants live behind a marker; an entry with learned tags keeps none.
            (Spec::Fields(_), _) if ctx.learns.is_some() => Err("vary"),
            _ if marker_moved => Err("vary"),
            (_, Err(why)) => Err(*why),
            _ => self.storable(&resp, ctx.policy),
        };
        let tags = tags.unwrap_or_default();
        let ttl = match storable {
            Ok(ttl) => ttl,
            Err(why) => {
                // Only an answer that would itself be stored accepts credentials for the
                // entry: this one withdraws any acceptance, and nothing cached is revealed.
                self.revoke(ctx);
                let mut out = self.passthrough_miss(resp, Some(why));
                out.variant = variant;
                return Ok(out);
            }
        };
        // An answer that varies is stored as a variant: under the marker it was read
        // through, or, the first time, under a new marker left at the entry's key.
        let mut variant_ctx = None;
        if let Spec::Fields(fields) = &spec {
            let hash = vary::hash(fields, &req_headers, ctx.cred);
            match &req.variant {
                Some(of) => self.note_variant(ctx, of).await,
                None => {
                    let marker = vary::new_marker(fields.clone(), hash);
                    let logical = vary::key(&req.logical_key, marker.nonce, hash);
                    let answer_policy = ctx.policy.for_answer(resp.cache_control.as_deref());
                    if !self
                        .put_marker(tags.clone(), marker, ttl, stamp.clone(), answer_policy, ctx)
                        .await
                    {
                        let mut out = self.passthrough_miss(resp, Some("superseded"));
                        out.variant = variant;
                        return Ok(out);
                    }
                    let key = self.keys.entry(&ctx.version, &logical);
                    variant_ctx = Some(Ctx { key, ..ctx.clone() });
                }
            }
        }
        let ctx = variant_ctx.as_ref().unwrap_or(ctx);
        if resp.status.is_success() {
            self.access.accept(&ctx.key, ctx.cred, resp.status.as_u16());
        } else {
            // A 404 kept for negative caching: stored, but only a 2xx accepts (SPEC 4).
            self.revoke(ctx);
        }
        let learned = self.learned_stamp(ctx, &tags, &stamp).await;
        let (mut entry, retention) = self.new_entry(tags, ctx, resp, ttl, stamp);
        // Its hits tell downstream caches what it varies on.
        entry = vary::with_vary_header(entry, &spec);
        let put = match learned {
            Learned::No => self.store.put(&ctx.key, &entry, &ctx.deps, retention).await,
            Learned::Yes(deps, stamp) => {
                entry.stamp = stamp;
                self.store.put(&ctx.key, &entry, &deps, retention).await
            }
            Learned::Unknown => Ok(false),
        };
        let (stored, detail) = match put {
            Ok(true) => {
                self.stats.record_set();
                (true, None)
            }
            // Something it depends on moved while it was fetched (or the tier changed):
            // answered to those who asked before, never stored for later readers.
            Ok(false) => (false, Some("superseded")),
            Err(e) => {
                tracing::warn!(error = %e, "cache write failed; answering without storing");
                (false, Some("store-failed"))
            }
        };
        let mut out = self.entry_response(
            &entry,
            CacheOutcome::Miss {
                stored,
                detail,
                collapsed: false,
            },
        );
        // Its requester gets every end-to-end header the origin sent; later hits, the
        // stored ones.
        out.headers = passed;
        out.variant = variant;
        Ok(out)
    }

    /// Leaves the Vary marker `marker` at `ctx`'s key, stamped and kept as its variants are.
    /// `false`: something it depends on moved since `stamp` was read, or the store failed.
    async fn put_marker(
        &self,
        tags: Vec<String>,
        marker: VaryMarker,
        ttl: Duration,
        stamp: Stamp,
        answer_policy: ViewPolicy,
        ctx: &Ctx,
    ) -> bool {
        let mut entry = CacheEntry::marker(marker, policy::now_ms(), ttl, tags, stamp);
        let stale_window = answer_policy.stale_window();
        entry.stale_ms = u64::try_from(stale_window.as_millis()).unwrap_or(u64::MAX);
        matches!(
            self.store
                .put(
                    &ctx.key,
                    &entry,
                    &ctx.deps,
                    ttl.saturating_add(stale_window)
                )
                .await,
            Ok(true)
        )
    }

    /// Records a variant new to the marker it was read through (best effort: a marker moved
    /// meanwhile keeps its own list, which only bounds how many variants are stored).
    async fn note_variant(&self, ctx: &Ctx, of: &VariantOf) {
        let Some(marker) = of.marker.vary.as_deref() else {
            return;
        };
        if marker.variants.contains(&of.hash) {
            return;
        }
        let mut updated = marker.clone();
        updated.variants.push(of.hash);
        let mut entry = of.marker.clone();
        entry.vary = Some(Arc::new(updated));
        let Some(base) = self.keys.variant_base(&ctx.key) else {
            return;
        };
        let retention = Duration::from_secs(entry.ttl_secs)
            .saturating_add(Duration::from_millis(entry.stale_ms));
        let _ = self.store.put(&base, &entry, &ctx.deps, retention).await;
    }

    /// For a view that learns tags from its answers: the dependencies an entry in `tag_sets`
    /// is stored under, and `stamp` (read before its fetch) extended with the generations of
    /// the learned tags, read now. Read after the fetch, they may already include an
    /// invalidation that overlapped it: the store then fails on the learned-tags sequence,
    /// which `stamp` read before the fetch and every tag invalidation bumps before its tags
    /// (see `Keyspace::deps`).
    pub(super) async fn learned_stamp(
        &self,
        ctx: &Ctx,
        tag_sets: &[String],
        stamp: &Stamp,
    ) -> Learned {
        let Some(deps) = self.learned_deps(ctx, tag_sets) else {
            return Learned::No;
        };
        match self.store.stamp(&deps).await {
            Ok(later) => match stamp.extended_by(&later) {
                Some(extended) => Learned::Yes(deps, extended),
                None => Learned::Unknown,
            },
            Err(_) => Learned::Unknown,
        }
    }

    /// The tag sets an entry for `req` holding `answer` joins: those of its request's tags,
    /// and those its view learns from the answer (see `Keyspace::deps` for why they need no
    /// counter). An answer naming more tags than a view may learn is not stored.
    pub(super) fn entry_tags(
        &self,
        req: &ViewRequest,
        ctx: &Ctx,
        answer: &[u8],
    ) -> Result<Vec<String>, &'static str> {
        let learned = self
            .table
            .get(req.view)
            .response_tags_of(answer)
            .map_err(|_| "too-many-tags")?;
        let mut tags: Vec<String> = req
            .tags
            .iter()
            .chain(&learned)
            .map(|t| self.keys.tag_set(&ctx.version, t))
            .collect();
        tags.sort_unstable();
        tags.dedup();
        Ok(tags)
    }

    /// The entry for the origin's answer `resp`: in the tag sets `tags`, stamped with what was
    /// read before the fetch, kept past its TTL for as long as it may be served stale.
    /// Returns it with that retention.
    pub(super) fn new_entry(
        &self,
        tags: Vec<String>,
        ctx: &Ctx,
        resp: OriginResponse,
        ttl: Duration,
        stamp: Stamp,
    ) -> (CacheEntry, Duration) {
        let content_type = resp
            .content_type
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let resp_headers = resp.headers;
        let answer_policy = ctx.policy.for_answer(resp.cache_control.as_deref());
        let mut entry = CacheEntry::new(
            resp.status.as_u16(),
            content_type,
            resp.body,
            policy::now_ms(),
            ttl,
            tags,
            stamp,
        );
        entry = entry.with_headers(self.stored_subset(&resp_headers));
        let stale_window = answer_policy.stale_window();
        entry.stale_ms = u64::try_from(stale_window.as_millis()).unwrap_or(u64::MAX);
        entry.windows = windows_of(answer_policy, ctx.policy);
        (entry, ttl.saturating_add(stale_window))
    }

    /// The headers of `headers` that entries keep (`cache.stored_headers`).
    pub(super) fn stored_subset(
        &self,
        headers: &http::HeaderMap,
    ) -> Vec<(http::HeaderName, http::HeaderValue)> {
        self.stored_headers
            .iter()
            .flat_map(|name| {
                headers
                    .get_all(name)
                    .iter()
                    .map(|v| (name.clone(), v.clone()))
            })
            .collect()
    }

    /// Fetches from the origin, counting it; a 5xx becomes an error.
    pub(super) async fn fetch(
        &self,
        view: View,
        req: OriginRequest,
    ) -> Result<OriginResponse, OriginError> {
        let started = Instant::now();
        let source = crate::domain::lookup::Source::View(view);
        let learns = self.lookups.learns_from(&source);
        let asked = learns.then(|| (req.path_and_query.clone(), req.body.clone()));
        let result = self.origin.send(req).await;
        let result = match result {
            Ok(r) if r.status.is_server_error() => Err(OriginError::Status(r.status)),
            other => other,
        };
        self.stats
            .record_origin(view, started.elapsed(), result.is_err());
        if let (Some((path_and_query, body)), Ok(resp)) = (asked, &result)
            && resp.status.is_success()
        {
            self.learn(&source, &path_and_query, body.as_deref(), &resp.body);
        }
        result
    }

    /// Teaches the lookup tables what a view's 2xx answer shows.
    fn learn(
        &self,
        source: &crate::domain::lookup::Source,
        path_and_query: &str,
        body: Option<&[u8]>,
        answer: &[u8],
    ) {
        let Ok(answer) = serde_json::from_slice::<serde_json::Value>(answer) else {
            return;
        };
        let body: Option<serde_json::Value> = body.and_then(|b| serde_json::from_slice(b).ok());
        let query =
            crate::domain::write_rule::query_map(path_and_query.split_once('?').map(|(_, q)| q));
        let empty = serde_json::Map::new();
        self.lookups.learn(
            source,
            &crate::domain::template::Inputs {
                params: &empty,
                query: &query,
                body: body.as_ref(),
                response: Some(&answer),
                lookups: None,
            },
        );
    }
}

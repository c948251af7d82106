//! Read-through serving of one cached view: look up, fetch from the origin on a miss, store
//! what the origin allows, and describe the answer (`X-Cache`, `Cache-Status`, `Age`, `ETag`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use super::policy::{self, Storability};
use super::{CacheEntry, FallbackStore, KeyVersion, Keyspace, Store, View};
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

/// What a warm-up did.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct WarmReport {
    /// Entries fetched from the origin and stored.
    pub warmed: u64,
    /// Entries already cached, left alone.
    pub skipped: u64,
    /// Entries that could not be fetched or stored.
    pub failed: Vec<WarmFailure>,
}

/// One entry a warm-up could not fill.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct WarmFailure {
    /// The run.
    pub model_run_id: String,
    /// The view (`metrics` or `feature_importance`).
    pub view: String,
    /// Why.
    pub error: String,
}

/// How the answer was produced, for `X-Cache` and `Cache-Status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// From the cache; seconds of freshness left and age in seconds.
    Hit {
        /// Remaining TTL.
        ttl: u64,
        /// Seconds since stored.
        age: u64,
    },
    /// From the origin; whether it was stored, and why not.
    Miss {
        /// Stored for later hits.
        stored: bool,
        /// Why it was not stored (`no-store`, `status`, …).
        detail: Option<&'static str>,
    },
    /// From the origin because of `use_cache=false`.
    Bypass,
}

/// The answer to a cached-view request.
#[derive(Debug, Clone)]
pub struct ViewResponse {
    /// Status to send (the origin's 2xx/4xx, or 304 is decided by the handler).
    pub status: StatusCode,
    /// Origin `Content-Type`.
    pub content_type: Option<HeaderValue>,
    /// Origin `WWW-Authenticate` on a passed-through 401.
    pub www_authenticate: Option<HeaderValue>,
    /// Body, byte for byte as the origin sent it.
    pub body: Bytes,
    /// Strong ETag (quoted) for 200 answers.
    pub etag: Option<String>,
    /// Cache outcome.
    pub outcome: CacheOutcome,
    /// Tier that served or stored it, when it matters (`memory` while degraded).
    pub degraded: bool,
}

impl ViewResponse {
    /// `X-Cache` value.
    pub fn x_cache(&self) -> &'static str {
        match self.outcome {
            CacheOutcome::Hit { .. } => "HIT",
            CacheOutcome::Miss { .. } => "MISS",
            CacheOutcome::Bypass => "BYPASS",
        }
    }

    /// `Cache-Status` value (RFC 9211).
    pub fn cache_status(&self) -> String {
        let mut s = match &self.outcome {
            CacheOutcome::Hit { ttl, .. } => format!("runcache; hit; ttl={ttl}"),
            CacheOutcome::Miss { stored: true, .. } => "runcache; fwd=miss; stored".to_owned(),
            CacheOutcome::Miss {
                stored: false,
                detail,
            } => match detail {
                Some(d) => format!("runcache; fwd=miss; detail={d}"),
                None => "runcache; fwd=miss".to_owned(),
            },
            CacheOutcome::Bypass => "runcache; fwd=bypass".to_owned(),
        };
        if self.degraded && !matches!(self.outcome, CacheOutcome::Bypass) {
            s.push_str("; detail=memory-fallback");
        }
        s
    }

    /// `Age` in seconds, on hits only.
    pub fn age(&self) -> Option<u64> {
        match self.outcome {
            CacheOutcome::Hit { age, .. } => Some(age),
            _ => None,
        }
    }
}

/// Read-through cache for the views. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ReadThrough {
    store: Arc<FallbackStore>,
    origin: OriginClient,
    keys: Keyspace,
    version: Arc<KeyVersion>,
    stats: Arc<Stats>,
    ttls: [Duration; 3],
    not_found_ttl: Duration,
}

impl ReadThrough {
    /// Builds the read-through cache; `ttls` are indexed by [`View::index`].
    pub fn new(
        store: Arc<FallbackStore>,
        origin: OriginClient,
        keys: Keyspace,
        version: Arc<KeyVersion>,
        stats: Arc<Stats>,
        ttls: [Duration; 3],
        not_found_ttl: Duration,
    ) -> Self {
        Self {
            store,
            origin,
            keys,
            version,
            stats,
            ttls,
            not_found_ttl,
        }
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
                CacheOutcome::Bypass => Outcome::Bypass,
            },
            Err(_) => Outcome::Error,
        };
        self.stats.record_request(view, outcome, started.elapsed());
        result
    }

    async fn serve_inner(&self, req: ViewRequest) -> Result<ViewResponse, OriginError> {
        if !req.use_cache {
            let resp = self.fetch(req.view, req.origin).await?;
            return Ok(passthrough(resp, CacheOutcome::Bypass, false));
        }
        let version = self.version.get();
        let key = self.keys.entry(&version, &req.logical_key);
        let now = policy::now_ms();
        match self.store.get(&key).await {
            Ok(Some(entry)) => {
                if let Some(ttl) =
                    policy::remaining_ttl_secs(entry.stored_at_ms, entry.ttl_secs, now)
                {
                    let age = policy::age_secs(entry.stored_at_ms, now);
                    return Ok(self.entry_response(entry, CacheOutcome::Hit { ttl, age }));
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cache read failed; treating as a miss"),
        }

        let resp = self.fetch(req.view, req.origin).await?;
        let configured = match resp.status {
            StatusCode::OK => self.ttls[req.view.index()],
            StatusCode::NOT_FOUND if !self.not_found_ttl.is_zero() => self.not_found_ttl,
            _ => return Ok(self.passthrough_miss(resp, Some("status"))),
        };
        let ttl = match policy::storability(resp.cache_control.as_deref(), configured) {
            Storability::Store(ttl) => ttl,
            Storability::DoNotStore(why) => return Ok(self.passthrough_miss(resp, Some(why))),
        };
        let tags = req
            .run_ids
            .iter()
            .map(|id| self.keys.run_tag(&version, id))
            .collect();
        let content_type = resp
            .content_type
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let entry = CacheEntry::new(
            resp.status.as_u16(),
            content_type,
            resp.body,
            now,
            ttl,
            tags,
        );
        let stored = match self.store.set(&key, &entry, ttl).await {
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
        let mut out = self.entry_response(entry, CacheOutcome::Miss { stored, detail });
        out.www_authenticate = resp.www_authenticate;
        Ok(out)
    }

    /// Fetches and stores the metrics and feature importance of `run_ids` that are not cached
    /// yet, at most `concurrency` origin requests at a time. Anonymous: no client header is
    /// forwarded, so warming never leaks the admin token to the origin.
    pub async fn warm(&self, run_ids: &[String], concurrency: usize) -> WarmReport {
        let mut requests = Vec::with_capacity(run_ids.len() * 2);
        for id in run_ids {
            requests.push(ViewRequest::metrics(id, HeaderMap::new(), true));
            requests.push(ViewRequest::feature_importance(
                id,
                None,
                HeaderMap::new(),
                true,
            ));
        }
        let results: Vec<(ViewRequest, Result<bool, String>)> =
            futures_util::stream::iter(requests)
                .map(|req| async move {
                    let key = self.keys.entry(&self.version.get(), &req.logical_key);
                    if let Ok(Some(_)) = self.store.get(&key).await {
                        return (req, Ok(false));
                    }
                    let result = match self.serve_inner(req.clone()).await {
                        Ok(r) => match r.outcome {
                            CacheOutcome::Miss { stored: true, .. } => Ok(true),
                            CacheOutcome::Hit { .. } => Ok(false),
                            _ => Err(format!(
                                "not stored (origin answered {})",
                                r.status.as_u16()
                            )),
                        },
                        // Not the raw error: it can name internal hosts.
                        Err(OriginError::Unreachable(_)) => Err("origin unreachable".to_owned()),
                        Err(e) => Err(e.to_string()),
                    };
                    (req, result)
                })
                .buffer_unordered(concurrency.max(1))
                .collect()
                .await;
        let mut report = WarmReport::default();
        for (req, result) in results {
            match result {
                Ok(true) => report.warmed += 1,
                Ok(false) => report.skipped += 1,
                Err(error) => report.failed.push(WarmFailure {
                    model_run_id: req.run_ids.first().cloned().unwrap_or_default(),
                    view: req.view.name().to_owned(),
                    error,
                }),
            }
        }
        report
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

    fn entry_response(&self, entry: CacheEntry, outcome: CacheOutcome) -> ViewResponse {
        let status = StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK);
        ViewResponse {
            status,
            content_type: HeaderValue::from_str(&entry.content_type)
                .ok()
                .filter(|v| !v.is_empty()),
            www_authenticate: None,
            etag: (status == StatusCode::OK).then_some(entry.etag),
            body: entry.body,
            outcome,
            degraded: self.store.tier() == super::Tier::Memory,
        }
    }

    fn passthrough_miss(&self, resp: OriginResponse, detail: Option<&'static str>) -> ViewResponse {
        let degraded = self.store.tier() == super::Tier::Memory;
        passthrough(
            resp,
            CacheOutcome::Miss {
                stored: false,
                detail,
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

//! What a cached-view request asks for, validated and normalised by the handler, and the
//! serving layer's tuning.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};

use super::refresh::RefreshOptions;
use crate::domain::{
    FrontendAuth, View, ViewPolicy, comparison_key, feature_importance_key, metrics_key,
};
use crate::origin::OriginRequest;
use crate::security::JwtVerifier;

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
    /// Set when this is the request for one variant of an entry the origin varies (see
    /// `serve::vary`): its logical key is then the variant's.
    pub variant: Option<Arc<VariantOf>>,
}

/// The variant of an entry a request is for.
#[derive(Debug)]
pub struct VariantOf {
    /// The marker, as read from the entry's own key.
    pub marker: crate::store::CacheEntry,
    /// The variant's hash (of the request headers the marker names).
    pub hash: u64,
}

impl ViewRequest {
    /// `GET /api/v1/models/train/{run_id}/metrics` (`run_id` already validated).
    pub fn metrics(run_id: &str, headers: HeaderMap, use_cache: bool) -> Self {
        Self {
            view: View::Metrics,
            logical_key: metrics_key(run_id),
            run_ids: vec![run_id.to_owned()],
            origin: OriginRequest {
                method: Method::GET,
                path_and_query: format!("/api/v1/models/train/{run_id}/metrics"),
                body: None,
                headers,
            },
            use_cache,
            variant: None,
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
            logical_key: feature_importance_key(run_id, top_n),
            run_ids: vec![run_id.to_owned()],
            origin: OriginRequest {
                method: Method::GET,
                path_and_query: format!("/api/v1/models/train/{run_id}/feature-importance{query}"),
                body: None,
                headers,
            },
            use_cache,
            variant: None,
        }
    }

    /// `POST /api/v1/models/compare` for ids already normalised (strings, unique, sorted):
    /// the origin receives exactly the list the key is hashed from.
    pub fn comparison(run_ids: Vec<String>, headers: HeaderMap, use_cache: bool) -> Self {
        let body = serde_json::json!({ "model_run_ids": run_ids });
        Self {
            view: View::Comparison,
            logical_key: comparison_key(&run_ids),
            origin: OriginRequest {
                method: Method::POST,
                path_and_query: "/api/v1/models/compare".to_owned(),
                body: Some(Bytes::from(body.to_string())),
                headers,
            },
            run_ids,
            use_cache,
            variant: None,
        }
    }
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
    /// Origin headers stored with an entry (`cache.stored_headers`), lower case.
    pub stored_headers: Vec<http::HeaderName>,
    /// Most variants per entry (`cache.max_variants`).
    pub max_variants: usize,
}

//! What a cached-view request asks for, validated and normalised by the handler, and the
//! serving layer's tuning.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};

use super::refresh::RefreshOptions;
use crate::domain::{FrontendAuth, Resolved, View, ViewDef, ViewPolicy, ViewTable};
use crate::origin::OriginRequest;
use crate::security::JwtVerifier;

/// One cached-view request, validated and normalised by its view ([`ViewDef::resolve`]).
#[derive(Debug, Clone)]
pub struct ViewRequest {
    /// Which view.
    pub view: View,
    /// Logical key, e.g. `model:metrics:42`.
    pub logical_key: String,
    /// The tags of the request (`run:42`): what its entry depends on.
    pub tags: Vec<String>,
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
    /// The request `resolved` by `def`, with the headers forwarded to the origin.
    pub fn resolved(def: &ViewDef, resolved: Resolved, headers: HeaderMap) -> Self {
        Self {
            view: def.view,
            logical_key: resolved.key,
            tags: resolved.tags,
            origin: OriginRequest {
                method: def.method.clone(),
                path_and_query: resolved.path_and_query,
                body: resolved.body.map(Bytes::from),
                headers,
            },
            use_cache: resolved.use_cache,
            variant: None,
        }
    }

    /// A request of `view` at `path` (with no query or body) as its handler would resolve it,
    /// e.g. for warming.
    pub fn of_path(table: &ViewTable, method: &Method, path: &str) -> Option<Self> {
        let def = table.route(method, path)?;
        let resolved = def.resolve(path, None, None).ok()?;
        Some(Self::resolved(def, resolved, HeaderMap::new()))
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
    /// The view table.
    pub table: Arc<ViewTable>,
    /// Freshness rules, indexed by [`View::index`].
    pub policies: Vec<ViewPolicy>,
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
    /// Whether Redis was left unconfigured (single mode on the shipped `redis.url`): then an
    /// answer from the memory tier before any Redis answered is the embedded store, the
    /// default set-up, and is not labelled a fallback.
    pub embedded_by_default: bool,
}

//! Invalidation by run, by logical keys, by pattern and by version switch, applied to every
//! tier (see `FallbackStore::invalidate`). Callable from handlers and background tasks alike.

use std::sync::Arc;

use serde::Serialize;

use crate::cache::{
    FallbackStore, KeyVersion, Keyspace, Store, StoreError, Tier, View, feature_importance_key,
    metrics_key,
};

/// The views every key of which `pattern` matches.
fn covered_views(pattern: &str) -> Vec<View> {
    if pattern == "*" || pattern == "model:*" {
        return View::ALL.to_vec();
    }
    View::ALL
        .into_iter()
        .filter(|v| {
            pattern
                .strip_prefix("model:")
                .and_then(|rest| rest.strip_prefix(v.name()))
                .is_some_and(|rest| rest == ":*" || rest == "*")
        })
        .collect()
}
use crate::metrics::Stats;

/// Why entries are being dropped (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A training event (`/events/*`).
    Event,
    /// A `DELETE` of a run passed through to the origin.
    RunDeleted,
    /// `POST /cache/invalidate`.
    Admin,
    /// `DELETE /cache/clear`.
    Clear,
    /// `POST /cache/version`.
    Version,
    /// Refresh-ahead found the run changed or gone.
    Refresh,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Cause::Event => "event",
            Cause::RunDeleted => "run_deleted",
            Cause::Admin => "admin",
            Cause::Clear => "pattern",
            Cause::Version => "version",
            Cause::Refresh => "refresh",
        }
    }
}

/// Result of a version switch.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VersionSwitch {
    /// The version now in use.
    pub version: String,
    /// The version used before.
    pub previous: String,
    /// Entries left under the new version by an earlier use of it, deleted before switching.
    pub cleared: u64,
}

/// Applies invalidations. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Invalidator {
    store: Arc<FallbackStore>,
    keys: Keyspace,
    version: Arc<KeyVersion>,
    stats: Arc<Stats>,
}

impl Invalidator {
    /// Builds an invalidator over `store`.
    pub fn new(
        store: Arc<FallbackStore>,
        keys: Keyspace,
        version: Arc<KeyVersion>,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            store,
            keys,
            version,
            stats,
        }
    }

    fn record(&self, cause: Cause, result: Result<u64, StoreError>) -> Result<u64, StoreError> {
        if let Ok(n) = result {
            self.stats.record_invalidation(cause.as_str(), n);
        }
        result
    }

    /// Drops a run's metrics, every feature-importance variant, and precisely the
    /// comparisons that include it (through the run's tag set). Returns entries dropped.
    pub async fn run(&self, run_id: &str, cause: Cause) -> Result<u64, StoreError> {
        let result = async {
            let v = self.version.get();
            // First the generation: a fetch already in flight for this run stores an entry
            // stamped with the old one, which is never served.
            self.store.bump(&[self.keys.run_gen(&v, run_id)]).await?;
            // The base keys are deleted directly too, so a lost tag set cannot keep them alive.
            let direct = [
                self.keys.entry(&v, &metrics_key(run_id)),
                self.keys.entry(&v, &feature_importance_key(run_id, None)),
            ];
            let a = self.store.delete(&direct).await?;
            let b = self
                .store
                .delete_tagged(&self.keys.run_tag(&v, run_id))
                .await?;
            Ok(a + b)
        }
        .await;
        match &result {
            Ok(n) => tracing::info!(
                run_id,
                cause = cause.as_str(),
                invalidated = n,
                "run invalidated"
            ),
            Err(e) => {
                tracing::warn!(run_id, cause = cause.as_str(), error = %e, "run invalidation failed")
            }
        }
        self.record(cause, result)
    }

    /// Drops the named logical keys of the current version.
    pub async fn keys(&self, logical: &[String]) -> Result<u64, StoreError> {
        let v = self.version.get();
        let physical: Vec<String> = logical.iter().map(|k| self.keys.entry(&v, k)).collect();
        let result = self.store.delete(&physical).await;
        self.record(Cause::Admin, result)
    }

    /// Drops the entries of the current version whose logical key matches `pattern`
    /// (validated: only `*` and `?` are special), in SCAN batches. A pattern covering whole
    /// views (`*`, `model:*`, `model:{view}:*`) also bumps their generations, so fetches in
    /// flight cannot store for later readers; other patterns delete only.
    pub async fn pattern(&self, pattern: &str, cause: Cause) -> Result<u64, StoreError> {
        let v = self.version.get();
        let result = async {
            let gens: Vec<String> = covered_views(pattern)
                .into_iter()
                .map(|view| self.keys.view_gen(&v, view))
                .collect();
            self.store.bump(&gens).await?;
            self.store
                .delete_matching(&self.keys.entry_pattern(&v, pattern))
                .await
        }
        .await;
        self.record(cause, result)
    }

    /// Switches every instance to `new`: entries stored under `new` earlier are deleted first
    /// (a switch never revives them), then the shared version is written; older entries become
    /// unreachable at once and are deleted in the background. Needs Redis, where the version
    /// lives.
    pub async fn switch_version(&self, new: &str) -> Result<VersionSwitch, StoreError> {
        if self.store.tier() != Tier::Redis {
            return Err(StoreError::Unavailable(
                "the key version lives in redis, which is unreachable".into(),
            ));
        }
        let previous = self.version.get();
        if previous.as_str() == new {
            return Ok(VersionSwitch {
                version: new.to_owned(),
                previous: new.to_owned(),
                cleared: 0,
            });
        }
        let redis = self.store.redis();
        let cleared = redis
            .delete_matching(&self.keys.entry_pattern(new, "*"))
            .await?;
        redis.delete_matching(&self.keys.tag_pattern(new)).await?;
        redis
            .set_string(&self.keys.version_key(), new, false)
            .await?;
        self.version.set(new);
        self.store.memory().clear();
        // Other instances adopt the version at their next poll; their near caches (which
        // could hold entries of `new` from an earlier use of it) are emptied now.
        self.store.flush_near_everywhere().await;
        self.stats
            .record_invalidation(Cause::Version.as_str(), cleared);
        tracing::info!(version = new, previous = %previous, cleared, "key version switched");

        let store = self.store.clone();
        let keys = self.keys.clone();
        let old = previous.clone();
        tokio::spawn(async move {
            let entries = store
                .redis()
                .delete_matching(&keys.entry_pattern(&old, "*"))
                .await;
            let tags = store.redis().delete_matching(&keys.tag_pattern(&old)).await;
            let _ = store.redis().delete_matching(&keys.gen_pattern(&old)).await;
            match (entries, tags) {
                (Ok(n), Ok(_)) => {
                    tracing::info!(version = %old, deleted = n, "old version's entries deleted")
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(version = %old, error = %e, "deleting the old version's entries failed; they stay unreachable and expire by TTL")
                }
            }
        });
        Ok(VersionSwitch {
            version: new.to_owned(),
            previous: previous.as_str().to_owned(),
            cleared,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_view_patterns_are_recognised() {
        assert_eq!(covered_views("*"), View::ALL.to_vec());
        assert_eq!(covered_views("model:*"), View::ALL.to_vec());
        assert_eq!(covered_views("model:metrics:*"), [View::Metrics]);
        assert_eq!(covered_views("model:comparison*"), [View::Comparison]);
        assert!(covered_views("model:metrics:4*").is_empty());
        assert!(covered_views("model:metrics:?").is_empty());
    }
}

//! Invalidation by tag (`run:42`, `dataset:7`), by logical keys, by pattern and by version
//! switch. Each becomes one
//! [`Invalidation`] applied by the store to every tier (and every instance) before it is
//! acknowledged, and each bumps a counter that the entries it drops depend on, so that a
//! fetch in flight cannot store an entry behind it: a tag's generation, a view's, or the clear
//! sequence for keys and narrower patterns (and the learned-tags sequence for all but view
//! switches: see `Keyspace::deps`). Callable from handlers and background tasks alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::domain::{View, ViewTable};
use crate::metrics::Stats;
use crate::store::{Invalidation, KeyVersion, Keyspace, Shared, Store, StoreError, Tier};
use crate::tasks::Tasks;

pub mod dead_letter;
pub mod stream;

/// Why entries are being dropped (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A training event (`/events/*`).
    Event,
    /// A write of an `[invalidate.*]` rule passed through to the origin (the `DELETE` of a
    /// run among them).
    Write,
    /// `POST /cache/invalidate`.
    Admin,
    /// `DELETE /cache/clear`.
    Clear,
    /// `POST /cache/version`.
    Version,
    /// Refresh-ahead found the run changed or gone.
    Refresh,
    /// Another instance's invalidation, made while it could not reach Redis.
    Peer,
    /// Events trimmed from the event stream before any instance read them: everything goes.
    StreamGap,
    /// An event-stream entry that kept failing, set aside in the dead-letter stream: every
    /// view its kind's tags can touch goes instead.
    StreamDeadLetter,
}

impl Cause {
    /// Every cause, for metrics registered at zero.
    pub const ALL: [Cause; 9] = [
        Cause::Event,
        Cause::Write,
        Cause::Admin,
        Cause::Clear,
        Cause::Version,
        Cause::Refresh,
        Cause::Peer,
        Cause::StreamGap,
        Cause::StreamDeadLetter,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Event => "event",
            Cause::Write => "write",
            Cause::Admin => "admin",
            Cause::Clear => "pattern",
            Cause::Version => "version",
            Cause::Refresh => "refresh",
            Cause::Peer => "peer",
            Cause::StreamGap => "stream_gap",
            Cause::StreamDeadLetter => "stream_dead_letter",
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
#[derive(Clone)]
pub struct Invalidator {
    table: Arc<ViewTable>,
    /// `(literal, kind)` of the views whose base key is `literal ID` for a tag `kind:ID`:
    /// deleted directly by a tag invalidation, so that a lost tag set cannot keep them.
    base_keys: Arc<[(String, String)]>,
    store: Arc<dyn Store>,
    shared: Arc<dyn Shared>,
    keys: Keyspace,
    version: Arc<KeyVersion>,
    stats: Arc<Stats>,
    tasks: Tasks,
    /// Set once start-up is done (see [`Invalidator::new`]).
    started: Arc<AtomicBool>,
}

impl std::fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidator").finish_non_exhaustive()
    }
}

impl Invalidator {
    /// Builds an invalidator over `store` (with its shared side `shared`); background
    /// clean-ups run on `tasks`. Until `started` is set, it acknowledges nothing: a starting
    /// instance may not have reached Redis yet, nor read who the other instances are, so an
    /// invalidation it journaled could reach nobody else before its answer.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        table: Arc<ViewTable>,
        store: Arc<dyn Store>,
        shared: Arc<dyn Shared>,
        keys: Keyspace,
        version: Arc<KeyVersion>,
        stats: Arc<Stats>,
        tasks: Tasks,
        started: Arc<AtomicBool>,
    ) -> Self {
        // Every cause is exported from the start, so that `rate()` and alerts see a 0 rather
        // than nothing before the first invalidation.
        for cause in Cause::ALL {
            let c = cause.as_str();
            metrics::counter!(crate::metrics::names::INVALIDATIONS_TOTAL, "cause" => c)
                .increment(0);
            metrics::counter!(crate::metrics::names::ENTRIES_DELETED_TOTAL, "cause" => c)
                .increment(0);
        }
        let base_keys = table
            .views()
            .iter()
            .filter_map(|d| d.keyed_by_tag())
            .filter(|(_, _, whole)| *whole)
            .map(|(literal, kind, _)| (literal.to_owned(), kind.to_owned()))
            .collect::<Vec<_>>()
            .into();
        Self {
            table,
            base_keys,
            store,
            shared,
            keys,
            version,
            stats,
            tasks,
            started,
        }
    }

    /// Refuses while the instance is starting (see [`Invalidator::new`]): the caller gets a
    /// `503` and retries, as it would against an instance not yet listening. Work that must
    /// not start unless its invalidation can follow (a `DELETE` passed to the origin) asks
    /// first.
    pub fn ready(&self) -> Result<(), StoreError> {
        if self.started.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(StoreError::Unavailable(
                "runcache is still starting; retry shortly".into(),
            ))
        }
    }

    async fn apply(&self, inv: Invalidation, cause: Cause) -> Result<u64, StoreError> {
        self.apply_counted(inv, cause, 1).await
    }

    /// Applies `inv`, which does the work of `ops` invalidations, and counts them.
    async fn apply_counted(
        &self,
        inv: Invalidation,
        cause: Cause,
        ops: u64,
    ) -> Result<u64, StoreError> {
        self.ready()?;
        let result = self.store.invalidate(&inv).await;
        if let Ok(n) = result {
            self.stats.record_invalidations(cause.as_str(), ops, n);
        }
        result
    }

    /// The view table.
    pub fn table(&self) -> &ViewTable {
        &self.table
    }

    /// Drops a run's entries: `run:ID` ([`Invalidator::tags`]).
    pub async fn run(&self, run_id: &str, cause: Cause) -> Result<u64, StoreError> {
        self.tags(&[crate::domain::concat(&["run:", run_id])], cause)
            .await
    }

    /// Drops, precisely, every entry that carries one of `tags` (`run:42`, `dataset:7`), by
    /// its request or by its answer, in one invalidation: one round of counter bumps (and of
    /// `WAIT` where it applies), one publication to the near caches. First the learned-tags
    /// sequence and the tags' generations are bumped, so that every entry that depends on them
    /// is unservable at once and a fetch already in flight cannot store; then the tags' sets
    /// are emptied and the views' base keys deleted directly. Its cost does not grow with
    /// unrelated keys. Applying it again is harmless. Returns the entries dropped.
    pub async fn tags(&self, tags: &[String], cause: Cause) -> Result<u64, StoreError> {
        let v = self.version.get();
        let mut tags: Vec<&str> = tags.iter().map(String::as_str).collect();
        tags.sort_unstable();
        tags.dedup();
        let mut inv = Invalidation::default();
        inv.bump.push(self.keys.learned(&v));
        for tag in &tags {
            inv.bump.push(self.keys.tag_gen(&v, tag));
            if let Some((kind, id)) = tag.split_once(':') {
                for (literal, k) in self.base_keys.iter() {
                    if k == kind {
                        inv.delete
                            .push(self.keys.entry(&v, &crate::domain::concat(&[literal, id])));
                    }
                }
            }
            inv.tagged.push(self.keys.tag_set(&v, tag));
        }
        let result = self.apply_counted(inv, cause, tags.len() as u64).await;
        match &result {
            Ok(n) => tracing::info!(
                tags = ?tags,
                cause = cause.as_str(),
                invalidated = n,
                "tags invalidated"
            ),
            Err(e) => {
                tracing::warn!(tags = ?tags, cause = cause.as_str(), error = %e, "tag invalidation failed")
            }
        }
        result
    }

    /// Drops every view whose entries carry tags of `kinds` (`run`), whole, as a namespace
    /// invalidation of each (every view when `kinds` is empty). What replaces a tag
    /// invalidation that cannot be applied (an event-stream entry that keeps failing): it does
    /// not depend on the tags' own keys, which may be what fails.
    pub async fn views_of_kinds(&self, kinds: &[String], cause: Cause) -> Result<u64, StoreError> {
        let views: Vec<View> = if kinds.is_empty() {
            self.table.handles()
        } else {
            let mut v: Vec<View> = kinds
                .iter()
                .flat_map(|k| self.table.tagged_with_kind(k))
                .collect();
            v.sort_by_key(|view| view.index());
            v.dedup();
            v
        };
        self.namespaces(&views, cause).await
    }

    /// Drops every entry of `views` (the namespace invalidation of `/cache/invalidate`):
    /// their generations and clear sequences are bumped, then their keys deleted by pattern.
    pub async fn namespaces(&self, views: &[View], cause: Cause) -> Result<u64, StoreError> {
        if views.is_empty() {
            return Ok(0);
        }
        let v = self.version.get();
        let mut bump: Vec<String> = views
            .iter()
            .map(|&view| self.keys.view_gen(&v, view))
            .collect();
        bump.extend(self.keys.clears_for(&v, views));
        let matching = views
            .iter()
            .map(|&view| {
                let literal = self.table.get(view).key.literal_prefix();
                self.keys
                    .entry_pattern(&v, &crate::domain::concat(&[literal, "*"]))
            })
            .collect();
        let inv = Invalidation {
            bump,
            matching,
            ..Invalidation::default()
        };
        self.apply_counted(inv, cause, views.len() as u64).await
    }

    /// Counts an event-stream entry set aside in the dead-letter stream.
    pub fn record_dead_letter(&self) {
        self.stats.record_dead_letter();
    }

    /// Drops the named logical keys of the current version. The clear sequence is bumped, so
    /// that no fetch that overlapped the invalidation stores one of them behind it.
    pub async fn keys(&self, logical: &[String], cause: Cause) -> Result<u64, StoreError> {
        let v = self.version.get();
        let mut views: Vec<View> = logical
            .iter()
            .flat_map(|k| self.table.matched_by(k))
            .collect();
        views.sort_by_key(|view| view.index());
        views.dedup();
        let inv = Invalidation {
            bump: self.keys.clears_for(&v, &views),
            delete: logical.iter().map(|k| self.keys.entry(&v, k)).collect(),
            ..Invalidation::default()
        };
        self.apply(inv, cause).await
    }

    /// Drops the entries of the current version whose logical key matches `pattern`
    /// (validated: only `*` and `?` are special), in SCAN batches. A pattern covering whole
    /// views (`*`, `model:*`, `model:{view}:*`) also bumps their generations; every pattern
    /// bumps the clear sequence, so fetches in flight cannot store behind it.
    pub async fn pattern(&self, pattern: &str, cause: Cause) -> Result<u64, StoreError> {
        let v = self.version.get();
        let mut bump: Vec<String> = self
            .table
            .covered_by(pattern)
            .into_iter()
            .map(|view| self.keys.view_gen(&v, view))
            .collect();
        bump.extend(self.keys.clears_for(&v, &self.table.matched_by(pattern)));
        let inv = Invalidation {
            bump,
            matching: vec![self.keys.entry_pattern(&v, pattern)],
            ..Invalidation::default()
        };
        self.apply(inv, cause).await
    }

    /// Counts the entries of the current version whose logical key matches `pattern`, and
    /// drops nothing (a clear's dry run).
    pub async fn count(&self, pattern: &str) -> Result<u64, StoreError> {
        let v = self.version.get();
        self.shared
            .count_matching(&self.keys.entry_pattern(&v, pattern))
            .await
    }

    /// Drops every entry of the current version, as a clear of `*` does, and empties every
    /// near cache: for when invalidations may have been lost and nobody can say which.
    pub async fn everything(&self, cause: Cause) -> Result<u64, StoreError> {
        let n = self.pattern("*", cause).await?;
        self.shared.flush_copies().await;
        Ok(n)
    }

    /// Counts an invalidation another instance sent while it could not reach Redis (the store
    /// has applied it: `dropped` entries went).
    pub fn record_peer(&self, dropped: u64) {
        self.stats
            .record_invalidation(Cause::Peer.as_str(), dropped);
    }

    /// Switches every instance to `new`: every entry of the current version becomes
    /// unservable at once (its view counters are bumped), entries stored under `new` earlier
    /// are deleted (a switch never revives them), then the shared version is written and
    /// every near cache emptied; old entries are deleted in the background. Needs Redis, where
    /// the version lives.
    pub async fn switch_version(&self, new: &str) -> Result<VersionSwitch, StoreError> {
        self.ready()?;
        if self.store.source().tier != Tier::Redis {
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
        let all = self.table.handles();
        let mut bump: Vec<String> = all
            .iter()
            .map(|&view| self.keys.view_gen(&previous, view))
            .collect();
        bump.extend(self.keys.clears_for(&previous, &all));
        bump.extend(self.keys.clears_for(new, &all));
        let inv = Invalidation {
            bump,
            matching: vec![
                self.keys.entry_pattern(new, "*"),
                self.keys.tag_pattern(new),
            ],
            ..Invalidation::default()
        };
        let cleared = self.store.invalidate(&inv).await?;
        self.shared
            .meta_set(&self.keys.version_key(), new, false)
            .await?;
        self.version.set(new);
        // Other instances adopt the version at their next poll; their near caches (which
        // could hold entries of `new` from an earlier use of it) are emptied now.
        self.shared.flush_copies().await;
        self.stats
            .record_invalidation(Cause::Version.as_str(), cleared);
        tracing::info!(version = new, previous = %previous, cleared, "key version switched");

        let shared = self.shared.clone();
        let keys = self.keys.clone();
        let old = previous.clone();
        self.tasks.spawn(async move {
            let entries = shared.purge(&keys.entry_pattern(&old, "*")).await;
            let tags = shared.purge(&keys.tag_pattern(&old)).await;
            // The old version's counters stay until they expire (they outlive every entry):
            // without them an old entry that a purge missed would look current again.
            match (entries, tags) {
                (Ok(n), Ok(_)) => {
                    tracing::info!(version = %old, deleted = n, "old version's entries deleted")
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(version = %old, error = %e, "deleting the old version's entries failed; they stay unservable and expire by TTL")
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

//! The physical key layout. Entries are `{prefix}:{version}:{logical}`; everything else lives
//! under `{prefix}:_…` (versions cannot start with `_`, so the two never collide, and a clear
//! of `*` only ever sees entries):
//! - `{prefix}:_gen:{version}:ns:{view}` and `…:{tag}` (`…:run:42`): generation counters an
//!   entry depends on; `…:clears`: the clear sequence (see [`super::Stamp`]); `…:learned`: the
//!   sequence every tag invalidation bumps, which a store of an entry with answer-learned tags
//!   is checked against (see [`Keyspace::deps`]);
//! - `{prefix}:_tags:{version}:{tag}`: the set of entries that carry a tag (`run:42`);
//! - `{prefix}:_lock:{version}:{logical}`: cross-instance fetch locks;
//! - `{prefix}:_meta:version`, `…:marker`: the shared version and this keyspace's marker;
//! - `{prefix}:_instances`: the instances registered while Redis is reachable.
//!
//! On a Redis Cluster ([`Keyspace::clustered`]) every key ends with a hash tag, so that what
//! one operation must touch together shares a slot (logical keys do not change):
//! - a tag's generation counter and tag set end with `{TAG}` (`{run:42}`), and so do the
//!   entries of a view keyed `literal{param}…` and tagged `kind:{param}` (a run's metrics,
//!   every feature-importance variant, their Vary variants, their fetch locks), read from the
//!   view table ([`Keyspace::with_views`]);
//! - an entry whose key is `literal{sha256(…)}` ends with `{cmp:HASH}` (a comparison spans
//!   runs: see [`super::Deps`]);
//! - the view counters, the clear sequences, the version, the marker and the registry end
//!   with `{PREFIX}`, one slot;
//! - any other logical key (named by an admin `keys` invalidation) ends with `{k:KEY}`.
//!
//! A logical key never holds `{` or `}`, so the logical part of a physical key is what comes
//! before its first `{`, and a glob over logical keys becomes a glob over physical ones by
//! appending `{*` ([`Keyspace::entry_pattern`]): it matches exactly the entries whose logical
//! key the glob matches.

use std::sync::Arc;

use crate::domain::{View, ViewTable, concat, template::Piece};

use super::Deps;

/// Builds physical keys under one prefix.
#[derive(Debug, Clone)]
pub struct Keyspace {
    prefix: String,
    /// `{prefix}` on a Redis Cluster (the slot of the global keys), empty otherwise.
    global_tag: String,
    /// How the views' logical keys map to cluster slots, longest literal first.
    routes: Arc<[Route]>,
    /// The views (whose counters stand for everything: see [`Keyspace::views`]).
    views: Arc<[View]>,
    /// The counter keys shared by every entry of the version last asked for: built once per
    /// version and view instead of on every read (see [`Keyspace::deps`]).
    shared: Arc<arc_swap::ArcSwap<SharedKeys>>,
}

/// The counter keys of one version that do not depend on an entry's tags.
#[derive(Debug, Default)]
struct SharedKeys {
    version: String,
    clears: String,
    learned: String,
    /// By view index, with the view's name; `None` for a view not asked for yet.
    view_gens: Vec<Option<(&'static str, String)>>,
}

/// How the logical keys starting with `literal` map to a cluster slot.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// `literal ID…` is in the slot of tag `kind:ID`.
    Tag { literal: String, kind: String },
    /// `literal HASH` is in slot `{cmp:HASH}`.
    Hash { literal: String },
}

impl Route {
    fn literal(&self) -> &str {
        match self {
            Route::Tag { literal, .. } | Route::Hash { literal } => literal,
        }
    }
}

/// The slot tag a physical key of a cluster keyspace hashes by: the text between its first
/// `{` and the next `}` when that is not empty (as Redis Cluster does), else the whole key.
pub fn hash_part(key: &str) -> &str {
    key.find('{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.find('}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key)
}

impl Keyspace {
    /// A keyspace under `prefix` (validated by settings), for one Redis (single or sentinel).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            global_tag: String::new(),
            routes: Arc::from([]),
            views: Arc::from([]),
            shared: Arc::default(),
        }
    }

    /// The keyspace with the slot routes of `table`'s views (used on a cluster only).
    pub fn with_views(mut self, table: &ViewTable) -> Self {
        let mut routes: Vec<Route> = Vec::new();
        for def in table.views() {
            if let Some((literal, kind, _)) = def.keyed_by_tag() {
                routes.push(Route::Tag {
                    literal: literal.to_owned(),
                    kind: kind.to_owned(),
                });
            } else if let [Piece::Literal(l), Piece::Field { hashed: true, .. }] = def.key.pieces()
            {
                routes.push(Route::Hash { literal: l.clone() });
            }
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.literal().len()));
        routes.dedup();
        self.routes = routes.into();
        self.views = table.handles().into();
        self
    }

    /// The views of the table the keyspace was given ([`Keyspace::with_views`]).
    pub fn views(&self) -> &[View] {
        &self.views
    }

    /// A keyspace under `prefix` for a Redis Cluster: every key carries a hash tag (see the
    /// module documentation).
    pub fn clustered(prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        let global_tag = concat(&["{", &prefix, "}"]);
        Self {
            prefix,
            global_tag,
            routes: Arc::from([]),
            views: Arc::from([]),
            shared: Arc::default(),
        }
    }

    /// Whether keys carry cluster hash tags.
    pub fn is_clustered(&self) -> bool {
        !self.global_tag.is_empty()
    }

    /// The hash tag of a logical key (empty outside a cluster): the slot its view's route
    /// names, else `{k:KEY}`.
    fn tag_of(&self, logical: &str) -> String {
        if !self.is_clustered() {
            return String::new();
        }
        for route in self.routes.iter() {
            let Some(rest) = logical.strip_prefix(route.literal()) else {
                continue;
            };
            match route {
                Route::Tag { kind, .. } => {
                    let id = rest.split(':').next().unwrap_or_default();
                    if !id.is_empty() {
                        return concat(&["{", kind, ":", id, "}"]);
                    }
                }
                Route::Hash { .. } if !rest.is_empty() && !rest.contains(':') => {
                    return concat(&["{cmp:", rest, "}"]);
                }
                Route::Hash { .. } => {}
            }
        }
        concat(&["{k:", logical, "}"])
    }

    /// The hash tag of a tag's keys (empty outside a cluster).
    fn tag_suffix(&self, tag: &str) -> String {
        if self.is_clustered() {
            concat(&["{", tag, "}"])
        } else {
            String::new()
        }
    }

    /// The configured prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Physical key of an entry.
    pub fn entry(&self, version: &str, logical: &str) -> String {
        if !self.is_clustered() {
            return concat(&[&self.prefix, ":", version, ":", logical]);
        }
        concat(&[
            &self.prefix,
            ":",
            version,
            ":",
            logical,
            &self.tag_of(logical),
        ])
    }

    /// Physical glob over entries of `version` whose logical key matches `pattern`.
    pub fn entry_pattern(&self, version: &str, pattern: &str) -> String {
        let tags = if self.is_clustered() { "{*" } else { "" };
        concat(&[&self.prefix, ":", version, ":", pattern, tags])
    }

    /// The entry a variant key (`{entry}:vary-…`) belongs to.
    pub fn variant_base(&self, variant: &str) -> Option<String> {
        let logical_end = variant.find('{').unwrap_or(variant.len());
        let (base, _) = variant[..logical_end].rsplit_once(":vary-")?;
        Some(concat(&[base, &variant[logical_end..]]))
    }

    /// Whether `physical` is an entry key (of any version) of this keyspace.
    pub fn is_entry(&self, physical: &str) -> bool {
        physical
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix(':'))
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('_'))
    }

    /// Physical glob over every key of this prefix (entries and internal keys alike).
    pub fn everything_pattern(&self) -> String {
        concat(&[&self.prefix, ":*"])
    }

    /// Physical key of the lookup table `table` (a hash; one slot in a cluster). Not
    /// versioned: a table maps ids to what never changes for them.
    pub fn lookup(&self, table: &str) -> String {
        concat(&[&self.prefix, ":_lookup:{", table, "}"])
    }

    /// Physical key of the set listing every entry that carries `tag` (`run:42`).
    pub fn tag_set(&self, version: &str, tag: &str) -> String {
        concat(&[
            &self.prefix,
            ":_tags:",
            version,
            ":",
            tag,
            &self.tag_suffix(tag),
        ])
    }

    /// The generation counter of the tag whose set is `tag_set` (a key of [`Self::tag_set`]).
    pub fn gen_of_set(&self, tag_set: &str) -> Option<String> {
        let rest = tag_set
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":_tags:")?;
        Some(concat(&[&self.prefix, ":_gen:", rest]))
    }

    /// Physical key of the set of a run's entries: the tag set of `run:ID`.
    pub fn run_tag(&self, version: &str, run_id: &str) -> String {
        self.tag_set(version, &concat(&["run:", run_id]))
    }

    /// Physical glob over every tag set of `version`.
    pub fn tag_pattern(&self, version: &str) -> String {
        concat(&[&self.prefix, ":_tags:", version, ":*"])
    }

    /// Physical key of a tag's generation counter.
    pub fn tag_gen(&self, version: &str, tag: &str) -> String {
        concat(&[
            &self.prefix,
            ":_gen:",
            version,
            ":",
            tag,
            &self.tag_suffix(tag),
        ])
    }

    /// Physical key of the learned-tags sequence of `version`: bumped by every tag
    /// invalidation, clear and key invalidation, and checked by the store of an entry whose
    /// tags are learned from its answer (see [`Keyspace::deps`]).
    pub fn learned(&self, version: &str) -> String {
        concat(&[
            &self.prefix,
            ":_gen:",
            version,
            ":learned",
            &self.global_tag,
        ])
    }

    /// Physical key of a view's generation counter.
    pub fn view_gen(&self, version: &str, view: View) -> String {
        concat(&[
            &self.prefix,
            ":_gen:",
            version,
            ":ns:",
            view.name(),
            &self.global_tag,
        ])
    }

    /// Physical key of the clear sequence of `version`: bumped by every clear and key
    /// invalidation, which delete rather than bump the counters entries depend on.
    pub fn clears(&self, version: &str) -> String {
        concat(&[&self.prefix, ":_gen:", version, ":clears", &self.global_tag])
    }

    /// On a cluster, the clear sequence of one view: there an entry cannot be written in one
    /// atomic step with the global counters it depends on (they live in another slot), so a
    /// read checks the clear sequence of its view as it checks its generation counters.
    fn view_clears(&self, version: &str, view: View) -> String {
        concat(&[
            &self.prefix,
            ":_gen:",
            version,
            ":clears:",
            view.name(),
            &self.global_tag,
        ])
    }

    /// The clear sequences a clear or key invalidation of entries of `views` bumps: the
    /// version's one, and on a cluster each view's.
    pub fn clears_for(&self, version: &str, views: &[View]) -> Vec<String> {
        let mut out = vec![self.learned(version), self.clears(version)];
        if self.is_clustered() {
            out.extend(views.iter().map(|&v| self.view_clears(version, v)));
        }
        out
    }

    /// Physical glob over every generation counter of `version`.
    pub fn gen_pattern(&self, version: &str) -> String {
        concat(&[&self.prefix, ":_gen:", version, ":*"])
    }

    /// The counters an entry of `view` tagged `tags` depends on, under `version`.
    /// On a cluster the view's clear sequence is one of the counters (checked on every read)
    /// and is the clear sequence of the stamp too.
    ///
    /// An entry whose tags are also learned from its answer (`learns`) cannot depend on
    /// those tags' counters before its fetch, when they are unknown. Its stamp's clear
    /// sequence is the learned-tags sequence ([`Keyspace::learned`]), which every tag
    /// invalidation, clear and key invalidation bumps before anything else: the entry is
    /// stored with the learned tags' generations read after its fetch (`Deps::extended`), and
    /// only if that sequence did not move since the fetch began, so that no invalidation that
    /// overlapped the fetch is already in the generations it is stored with. Every read then
    /// checks those generations too (the serving layer reads them after the entry), so an
    /// invalidation whose counters reached Redis drops the entry even when its deletes did not
    /// (a `WAIT` that timed out: it is journaled and sent to the other instances instead). On
    /// a cluster the counters of other slots are read after the store, not with it, so there
    /// the sequence is also one of the counters every read checks: any tag invalidation drops
    /// every such entry (coarser, and as safe).
    pub fn deps(&self, version: &str, view: View, tags: &[String], learns: bool) -> Deps {
        let mut counters = Vec::with_capacity(3 + tags.len());
        let clears = self.with_shared_keys(version, view, |shared, view_gen| {
            counters.push(view_gen.to_owned());
            if self.is_clustered() {
                let clears = self.view_clears(version, view);
                counters.push(clears.clone());
                if learns {
                    counters.push(shared.learned.clone());
                }
                clears
            } else if learns {
                shared.learned.clone()
            } else {
                shared.clears.clone()
            }
        });
        counters.extend(tags.iter().map(|t| self.tag_gen(version, t)));
        Deps { counters, clears }
    }

    /// `f` of the shared counter keys of `version` and of `view`'s generation counter: the
    /// ones kept if they are, else built and kept (a version change replaces them all; two
    /// threads building at once only build twice). Read through a guard, so a hit touches no
    /// reference count shared between threads.
    fn with_shared_keys<R>(
        &self,
        version: &str,
        view: View,
        f: impl FnOnce(&SharedKeys, &str) -> R,
    ) -> R {
        fn view_gen<'k>(k: &'k SharedKeys, version: &str, view: View) -> Option<&'k str> {
            match k.view_gens.get(view.index()) {
                Some(Some((name, key))) if k.version == version && *name == view.name() => {
                    Some(key)
                }
                _ => None,
            }
        }
        let kept = self.shared.load();
        if let Some(key) = view_gen(&kept, version, view) {
            return f(&kept, key);
        }
        let mut view_gens = if kept.version == version {
            kept.view_gens.clone()
        } else {
            Vec::new()
        };
        drop(kept);
        if view_gens.len() <= view.index() {
            view_gens.resize(view.index() + 1, None);
        }
        view_gens[view.index()] = Some((view.name(), self.view_gen(version, view)));
        let built = SharedKeys {
            version: version.to_owned(),
            clears: self.clears(version),
            learned: self.learned(version),
            view_gens,
        };
        let out = f(&built, view_gen(&built, version, view).unwrap_or_default());
        self.shared.store(Arc::new(built));
        out
    }

    /// Physical key of the cross-instance fetch lock of an entry.
    pub fn fetch_lock(&self, version: &str, logical: &str) -> String {
        concat(&[
            &self.prefix,
            ":_lock:",
            version,
            ":",
            logical,
            &self.tag_of(logical),
        ])
    }

    /// Physical glob over every fetch lock.
    pub fn lock_pattern(&self) -> String {
        concat(&[&self.prefix, ":_lock:*"])
    }

    /// Physical key holding the shared key version.
    pub fn version_key(&self) -> String {
        concat(&[&self.prefix, ":_meta:version", &self.global_tag])
    }

    /// Physical key marking that this keyspace exists in a Redis: written when runcache first
    /// reaches a Redis process, so a restarted Redis that still holds it came back from a
    /// snapshot (and may hold entries that later invalidations had removed).
    pub fn marker_key(&self) -> String {
        concat(&[&self.prefix, ":_meta:marker", &self.global_tag])
    }

    /// Physical key of the registry of instances (a sorted set scored by last-seen time).
    pub fn instances_key(&self) -> String {
        concat(&[&self.prefix, ":_instances", &self.global_tag])
    }

    /// The logical part of a physical entry key, if it belongs to `version`.
    pub fn logical<'a>(&self, version: &str, physical: &'a str) -> Option<&'a str> {
        let logical = physical
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(':')?
            .strip_prefix(version)?
            .strip_prefix(':')?;
        Some(logical.split_once('{').map_or(logical, |(l, _)| l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(index: usize, name: &'static str) -> View {
        View::new(index, name)
    }

    /// The shipped view table.
    fn shipped() -> ViewTable {
        crate::config::Settings::load_from(None, Some(Default::default()))
            .expect("default settings")
            .view_table()
            .expect("the shipped views")
    }

    #[test]
    fn keyspace_separates_entries_tags_and_meta() {
        let ks = Keyspace::new("runcache");
        assert_eq!(
            ks.entry("v1", "model:metrics:1"),
            "runcache:v1:model:metrics:1"
        );
        assert_eq!(ks.tag_set("v1", "run:1"), "runcache:_tags:v1:run:1");
        assert_eq!(
            ks.logical("v1", "runcache:v1:model:metrics:1"),
            Some("model:metrics:1")
        );
        assert_eq!(ks.logical("v2", "runcache:v1:model:metrics:1"), None);
        assert!(
            !wildmatch::WildMatch::new(&ks.entry_pattern("v1", "*"))
                .matches(&ks.tag_set("v1", "run:1"))
        );
        assert!(ks.is_entry("runcache:v2:model:metrics:1"));
        for internal in [
            ks.tag_set("v1", "run:1"),
            ks.tag_gen("v1", "run:1"),
            ks.clears("v1"),
            ks.version_key(),
            ks.instances_key(),
            "runcacheX:v1:a".to_owned(),
            "other:v1:a".to_owned(),
        ] {
            assert!(!ks.is_entry(&internal), "{internal}");
        }
    }

    #[test]
    fn deps_name_the_view_then_each_run() {
        let ks = Keyspace::new("p");
        let deps = ks.deps(
            "v1",
            view(2, "comparison"),
            &["run:1".into(), "run:2".into()],
            false,
        );
        assert_eq!(
            deps.counters(),
            [
                "p:_gen:v1:ns:comparison",
                "p:_gen:v1:run:1",
                "p:_gen:v1:run:2"
            ]
        );
        assert_eq!(deps.clears_key(), "p:_gen:v1:clears");
    }

    #[test]
    fn deps_kept_per_version_follow_the_version_and_the_view() {
        let ks = Keyspace::new("p");
        let (metrics, fi) = (view(0, "metrics"), view(1, "fi"));
        // Each asked for twice in turn: a kept key must be the one it would build now.
        for (version, v, learns) in [
            ("v1", metrics, false),
            ("v1", fi, false),
            ("v1", metrics, true),
            ("v2", fi, false),
            ("v1", fi, false),
            ("v1", metrics, false),
        ] {
            for _ in 0..2 {
                let deps = ks.deps(version, v, &["run:1".into()], learns);
                assert_eq!(
                    deps.counters(),
                    [ks.view_gen(version, v), ks.tag_gen(version, "run:1")]
                );
                let clears = if learns {
                    ks.learned(version)
                } else {
                    ks.clears(version)
                };
                assert_eq!(deps.clears_key(), clears);
            }
        }
        // Another table's view at a kept index is not taken for it.
        let other = ks.deps("v1", view(0, "other"), &[], false);
        assert_eq!(other.counters(), [ks.view_gen("v1", view(0, "other"))]);
    }

    #[test]
    fn a_cluster_keyspace_puts_a_run_in_one_slot_and_globs_still_match_logical_keys() {
        let ks = Keyspace::clustered("rc").with_views(&shipped());
        let metrics = ks.entry("v1", "model:metrics:42");
        let fi = ks.entry("v1", "model:feature_importance:42:top_5");
        assert_eq!(metrics, "rc:v1:model:metrics:42{run:42}");
        for key in [
            &fi,
            &ks.tag_gen("v1", "run:42"),
            &ks.tag_set("v1", "run:42"),
            &ks.fetch_lock("v1", "model:metrics:42"),
            &ks.entry("v1", "model:metrics:42:vary-00ff"),
        ] {
            assert_eq!(hash_part(key), "run:42", "{key}");
        }
        for key in [
            ks.view_gen("v1", view(0, "metrics")),
            ks.clears("v1"),
            ks.version_key(),
            ks.marker_key(),
            ks.instances_key(),
        ] {
            assert_eq!(hash_part(&key), "rc", "{key}");
        }
        let cmp = ks.entry("v1", "model:comparison:abc");
        assert_eq!(hash_part(&cmp), "cmp:abc");
        assert_eq!(hash_part(&ks.entry("v1", "other")), "k:other");
        assert_eq!(hash_part("no-tag"), "no-tag");
        assert_eq!(hash_part("empty{}tag"), "empty{}tag");
        assert_eq!(ks.logical("v1", &metrics), Some("model:metrics:42"));
        assert_eq!(
            ks.variant_base(&ks.entry("v1", "model:metrics:42:vary-00ff")),
            Some(metrics.clone())
        );
        let glob = |p: &str| wildmatch::WildMatch::new(&ks.entry_pattern("v1", p));
        for (pattern, logical, expected) in [
            ("*", "model:metrics:42", true),
            ("model:metrics:4?", "model:metrics:42", true),
            ("model:metrics:4?", "model:metrics:421", false),
            ("model:*:42", "model:feature_importance:42", true),
            ("model:*2", "model:metrics:43", false),
            ("model:metrics:42", "model:metrics:42", true),
            ("model:metrics:4", "model:metrics:42", false),
        ] {
            assert_eq!(
                glob(pattern).matches(&ks.entry("v1", logical)),
                expected,
                "{pattern} against {logical}"
            );
        }
        assert!(!glob("*").matches(&ks.tag_set("v1", "run:42")));
    }

    #[test]
    fn on_a_cluster_a_view_clear_sequence_is_checked_like_a_counter() {
        let ks = Keyspace::clustered("p");
        let deps = ks.deps("v1", view(0, "metrics"), &["run:1".into()], false);
        assert_eq!(
            deps.counters(),
            [
                "p:_gen:v1:ns:metrics{p}",
                "p:_gen:v1:clears:metrics{p}",
                "p:_gen:v1:run:1{run:1}"
            ]
        );
        assert_eq!(deps.clears_key(), "p:_gen:v1:clears:metrics{p}");
        assert_eq!(
            ks.clears_for("v1", &[view(2, "comparison")]),
            [
                "p:_gen:v1:learned{p}",
                "p:_gen:v1:clears{p}",
                "p:_gen:v1:clears:comparison{p}"
            ]
        );
        assert_eq!(
            Keyspace::new("p").clears_for("v1", &[view(0, "metrics")]),
            ["p:_gen:v1:learned", "p:_gen:v1:clears"]
        );
    }
}

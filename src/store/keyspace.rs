//! The physical key layout. Entries are `{prefix}:{version}:{logical}`; everything else lives
//! under `{prefix}:_…` (versions cannot start with `_`, so the two never collide, and a clear
//! of `*` only ever sees entries):
//! - `{prefix}:_gen:{version}:ns:{view}` and `…:run:{id}`: generation counters an entry
//!   depends on; `…:clears`: the clear sequence (see [`super::Stamp`]);
//! - `{prefix}:_tags:{version}:run:{id}`: the set of entries that depend on a run;
//! - `{prefix}:_lock:{version}:{logical}`: cross-instance fetch locks;
//! - `{prefix}:_meta:version`, `…:marker`: the shared version and this keyspace's marker;
//! - `{prefix}:_instances`: the instances registered while Redis is reachable.
//!
//! On a Redis Cluster ([`Keyspace::clustered`]) every key ends with a hash tag, so that what
//! one operation must touch together shares a slot (logical keys do not change):
//! - a run's entries (metrics, every feature-importance variant, their Vary variants), its
//!   generation counter, its tag set and its fetch locks end with `{run:ID}`;
//! - a comparison ends with `{cmp:HASH}` (it spans runs: see [`super::Deps`]);
//! - the view counters, the clear sequences, the version, the marker and the registry end
//!   with `{PREFIX}`, one slot;
//! - any other logical key (named by an admin `keys` invalidation) ends with `{k:KEY}`.
//!
//! A logical key never holds `{` or `}`, so the logical part of a physical key is what comes
//! before its first `{`, and a glob over logical keys becomes a glob over physical ones by
//! appending `{*` ([`Keyspace::entry_pattern`]): it matches exactly the entries whose logical
//! key the glob matches.

use crate::domain::{View, concat};

use super::Deps;

/// Builds physical keys under one prefix.
#[derive(Debug, Clone)]
pub struct Keyspace {
    prefix: String,
    /// `{prefix}` on a Redis Cluster (the slot of the global keys), empty otherwise.
    global_tag: String,
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
        }
    }

    /// A keyspace under `prefix` for a Redis Cluster: every key carries a hash tag (see the
    /// module documentation).
    pub fn clustered(prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        let global_tag = concat(&["{", &prefix, "}"]);
        Self { prefix, global_tag }
    }

    /// Whether keys carry cluster hash tags.
    pub fn is_clustered(&self) -> bool {
        !self.global_tag.is_empty()
    }

    /// The hash tag of a logical key (empty outside a cluster).
    fn tag_of(&self, logical: &str) -> String {
        if !self.is_clustered() {
            return String::new();
        }
        let mut parts = logical.splitn(4, ':');
        let (model, view, id) = (parts.next(), parts.next(), parts.next());
        match (model, view, id) {
            (Some("model"), Some("metrics" | "feature_importance"), Some(id)) if !id.is_empty() => {
                concat(&["{run:", id, "}"])
            }
            (Some("model"), Some("comparison"), Some(hash)) if !hash.is_empty() => {
                concat(&["{cmp:", hash, "}"])
            }
            _ => concat(&["{k:", logical, "}"]),
        }
    }

    /// The hash tag of a run's keys (empty outside a cluster).
    fn run_tag_suffix(&self, run_id: &str) -> String {
        if self.is_clustered() {
            concat(&["{run:", run_id, "}"])
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

    /// Physical key of the set listing every entry that depends on a run.
    pub fn run_tag(&self, version: &str, run_id: &str) -> String {
        concat(&[
            &self.prefix,
            ":_tags:",
            version,
            ":run:",
            run_id,
            &self.run_tag_suffix(run_id),
        ])
    }

    /// Physical glob over every tag set of `version`.
    pub fn tag_pattern(&self, version: &str) -> String {
        concat(&[&self.prefix, ":_tags:", version, ":*"])
    }

    /// Physical key of a run's generation counter.
    pub fn run_gen(&self, version: &str, run_id: &str) -> String {
        concat(&[
            &self.prefix,
            ":_gen:",
            version,
            ":run:",
            run_id,
            &self.run_tag_suffix(run_id),
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
        let mut out = vec![self.clears(version)];
        if self.is_clustered() {
            out.extend(views.iter().map(|&v| self.view_clears(version, v)));
        }
        out
    }

    /// Physical glob over every generation counter of `version`.
    pub fn gen_pattern(&self, version: &str) -> String {
        concat(&[&self.prefix, ":_gen:", version, ":*"])
    }

    /// The counters an entry of `view` over `run_ids` depends on, under `version`.
    /// On a cluster the view's clear sequence is one of the counters (checked on every read)
    /// and is the clear sequence of the stamp too.
    pub fn deps(&self, version: &str, view: View, run_ids: &[String]) -> Deps {
        let mut counters = Vec::with_capacity(2 + run_ids.len());
        counters.push(self.view_gen(version, view));
        let clears = if self.is_clustered() {
            let clears = self.view_clears(version, view);
            counters.push(clears.clone());
            clears
        } else {
            self.clears(version)
        };
        counters.extend(run_ids.iter().map(|id| self.run_gen(version, id)));
        Deps { counters, clears }
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

    #[test]
    fn keyspace_separates_entries_tags_and_meta() {
        let ks = Keyspace::new("runcache");
        assert_eq!(
            ks.entry("v1", "model:metrics:1"),
            "runcache:v1:model:metrics:1"
        );
        assert_eq!(ks.run_tag("v1", "1"), "runcache:_tags:v1:run:1");
        assert_eq!(
            ks.logical("v1", "runcache:v1:model:metrics:1"),
            Some("model:metrics:1")
        );
        assert_eq!(ks.logical("v2", "runcache:v1:model:metrics:1"), None);
        assert!(
            !wildmatch::WildMatch::new(&ks.entry_pattern("v1", "*"))
                .matches(&ks.run_tag("v1", "1"))
        );
        assert!(ks.is_entry("runcache:v2:model:metrics:1"));
        for internal in [
            ks.run_tag("v1", "1"),
            ks.run_gen("v1", "1"),
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
        let deps = ks.deps("v1", View::Comparison, &["1".into(), "2".into()]);
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
    fn a_cluster_keyspace_puts_a_run_in_one_slot_and_globs_still_match_logical_keys() {
        let ks = Keyspace::clustered("rc");
        let metrics = ks.entry("v1", "model:metrics:42");
        let fi = ks.entry("v1", "model:feature_importance:42:top_5");
        assert_eq!(metrics, "rc:v1:model:metrics:42{run:42}");
        for key in [
            &fi,
            &ks.run_gen("v1", "42"),
            &ks.run_tag("v1", "42"),
            &ks.fetch_lock("v1", "model:metrics:42"),
            &ks.entry("v1", "model:metrics:42:vary-00ff"),
        ] {
            assert_eq!(hash_part(key), "run:42", "{key}");
        }
        for key in [
            ks.view_gen("v1", View::Metrics),
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
        assert!(!glob("*").matches(&ks.run_tag("v1", "42")));
    }

    #[test]
    fn on_a_cluster_a_view_clear_sequence_is_checked_like_a_counter() {
        let ks = Keyspace::clustered("p");
        let deps = ks.deps("v1", View::Metrics, &["1".into()]);
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
            ks.clears_for("v1", &[View::Comparison]),
            ["p:_gen:v1:clears{p}", "p:_gen:v1:clears:comparison{p}"]
        );
        assert_eq!(
            Keyspace::new("p").clears_for("v1", &View::ALL),
            ["p:_gen:v1:clears"]
        );
    }
}

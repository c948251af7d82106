//! The physical key layout. Entries are `{prefix}:{version}:{logical}`; everything else lives
//! under `{prefix}:_…` (versions cannot start with `_`, so the two never collide, and a clear
//! of `*` only ever sees entries):
//! - `{prefix}:_gen:{version}:ns:{view}` and `…:run:{id}`: generation counters an entry
//!   depends on; `…:clears`: the clear sequence (see [`super::Stamp`]);
//! - `{prefix}:_tags:{version}:run:{id}`: the set of entries that depend on a run;
//! - `{prefix}:_lock:{version}:{logical}`: cross-instance fetch locks;
//! - `{prefix}:_meta:version`, `…:marker`: the shared version and this keyspace's marker;
//! - `{prefix}:_instances`: the instances registered while Redis is reachable.

use crate::domain::{View, concat};

use super::Deps;

/// Builds physical keys under one prefix.
#[derive(Debug, Clone)]
pub struct Keyspace {
    prefix: String,
}

impl Keyspace {
    /// A keyspace under `prefix` (validated by settings).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The configured prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Physical key of an entry.
    pub fn entry(&self, version: &str, logical: &str) -> String {
        concat(&[&self.prefix, ":", version, ":", logical])
    }

    /// Physical glob over entries of `version` whose logical key matches `pattern`.
    pub fn entry_pattern(&self, version: &str, pattern: &str) -> String {
        concat(&[&self.prefix, ":", version, ":", pattern])
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
        concat(&[&self.prefix, ":_tags:", version, ":run:", run_id])
    }

    /// Physical glob over every tag set of `version`.
    pub fn tag_pattern(&self, version: &str) -> String {
        concat(&[&self.prefix, ":_tags:", version, ":*"])
    }

    /// Physical key of a run's generation counter.
    pub fn run_gen(&self, version: &str, run_id: &str) -> String {
        concat(&[&self.prefix, ":_gen:", version, ":run:", run_id])
    }

    /// Physical key of a view's generation counter.
    pub fn view_gen(&self, version: &str, view: View) -> String {
        concat(&[&self.prefix, ":_gen:", version, ":ns:", view.name()])
    }

    /// Physical key of the clear sequence of `version`: bumped by every clear and key
    /// invalidation, which delete rather than bump the counters entries depend on.
    pub fn clears(&self, version: &str) -> String {
        concat(&[&self.prefix, ":_gen:", version, ":clears"])
    }

    /// Physical glob over every generation counter of `version`.
    pub fn gen_pattern(&self, version: &str) -> String {
        concat(&[&self.prefix, ":_gen:", version, ":*"])
    }

    /// The counters an entry of `view` over `run_ids` depends on, under `version`.
    pub fn deps(&self, version: &str, view: View, run_ids: &[String]) -> Deps {
        let mut counters = Vec::with_capacity(1 + run_ids.len());
        counters.push(self.view_gen(version, view));
        counters.extend(run_ids.iter().map(|id| self.run_gen(version, id)));
        Deps {
            counters,
            clears: self.clears(version),
        }
    }

    /// Physical key of the cross-instance fetch lock of an entry.
    pub fn fetch_lock(&self, version: &str, logical: &str) -> String {
        concat(&[&self.prefix, ":_lock:", version, ":", logical])
    }

    /// Physical glob over every fetch lock.
    pub fn lock_pattern(&self) -> String {
        concat(&[&self.prefix, ":_lock:*"])
    }

    /// Physical key holding the shared key version.
    pub fn version_key(&self) -> String {
        concat(&[&self.prefix, ":_meta:version"])
    }

    /// Physical key marking that this keyspace exists in a Redis: written when runcache first
    /// reaches a Redis process, so a restarted Redis that still holds it came back from a
    /// snapshot (and may hold entries that later invalidations had removed).
    pub fn marker_key(&self) -> String {
        concat(&[&self.prefix, ":_meta:marker"])
    }

    /// Physical key of the registry of instances (a sorted set scored by last-seen time).
    pub fn instances_key(&self) -> String {
        concat(&[&self.prefix, ":_instances"])
    }

    /// The logical part of a physical entry key, if it belongs to `version`.
    pub fn logical<'a>(&self, version: &str, physical: &'a str) -> Option<&'a str> {
        physical
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(':')?
            .strip_prefix(version)?
            .strip_prefix(':')
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
}

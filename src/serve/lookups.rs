//! The lookup tables at run time (`[lookups.*]`, see [`crate::domain::lookup`]): learned
//! from the origin's 2xx answers, held in this instance's memory and in a Redis hash that
//! every instance shares, both bounded, and read by the write rules' templates.
//!
//! Redis is read only on a local miss, and what it gives back is untrusted (anything that can
//! write to it could forge it): each value is stored with an HMAC over the table, the key and
//! the value, under a key derived from `peers.secret` (which every instance shares), and a
//! value whose HMAC does not check, or that is not a short scalar, is ignored. A lookup that
//! finds nothing, or a Redis that cannot answer, leaves the template naming nothing, and the
//! rule's `otherwise` is invalidated instead: never less.

use std::sync::Arc;

use dashmap::DashMap;
use serde_json::{Map, Value};

use crate::domain::lookup::{self, Lookups, Source};
use crate::domain::template::Inputs;
use crate::security::secrets_match;
use crate::security::signature::mac_hex;
use crate::store::{Keyspace, Shared};
use crate::tasks::Tasks;

/// The tables, this instance's copies, and the shared ones.
pub struct LookupService {
    spec: Arc<Lookups>,
    /// One map per table (in `spec`'s order): key as a tag writes it, to the value.
    local: Vec<DashMap<String, Value>>,
    shared: Arc<dyn Shared>,
    keys: Keyspace,
    tasks: Tasks,
    /// The HMAC key of the values shared through Redis.
    mac_key: Arc<[u8]>,
}

impl std::fmt::Debug for LookupService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LookupService")
            .field("tables", &self.spec.names())
            .finish_non_exhaustive()
    }
}

impl LookupService {
    /// The service for `spec`, sharing through `shared`; values in Redis are signed with
    /// `mac_key` (every instance must have the same).
    pub fn new(
        spec: Arc<Lookups>,
        shared: Arc<dyn Shared>,
        keys: Keyspace,
        tasks: Tasks,
        mac_key: &[u8],
    ) -> Self {
        let local = spec.tables().iter().map(|_| DashMap::new()).collect();
        Self {
            spec,
            local,
            shared,
            keys,
            tasks,
            mac_key: mac_key.into(),
        }
    }

    /// The form a value is shared in: `<hex HMAC>.<JSON>`.
    fn signed(&self, table: &str, key: &str, json: &str) -> String {
        let mac = mac_hex(
            &self.mac_key,
            &[table.as_bytes(), key.as_bytes(), json.as_bytes()],
        );
        format!("{mac}.{json}")
    }

    /// The JSON of a shared value, if its HMAC checks.
    fn verified<'t>(&self, table: &str, key: &str, text: &'t str) -> Option<&'t str> {
        let (mac, json) = text.split_once('.')?;
        let expected = mac_hex(
            &self.mac_key,
            &[table.as_bytes(), key.as_bytes(), json.as_bytes()],
        );
        secrets_match(mac.as_bytes(), expected.as_bytes()).then_some(json)
    }

    /// Whether a 2xx answer of `source` teaches something (only then is it parsed).
    pub fn learns_from(&self, source: &Source) -> bool {
        self.spec.learns_from(source)
    }

    /// Learns what a 2xx answer of `source` over `inputs` shows: at once in this instance,
    /// and in Redis in the background.
    pub fn learn(&self, source: &Source, inputs: &Inputs<'_>) {
        let learned = self.spec.learned(source, inputs);
        if learned.is_empty() {
            return;
        }
        let mut shared = Vec::new();
        for (table, key, value) in learned {
            let Some(i) = self.index(&table) else {
                continue;
            };
            let max = self.spec.tables()[i].max_entries;
            let local = &self.local[i];
            if local.get(&key).is_some_and(|v| *v == value) {
                continue;
            }
            if local.len() >= max {
                local.clear();
            }
            let signed = self.signed(&table, &key, &value.to_string());
            shared.push((self.keys.lookup(&table), key.clone(), signed, max));
            local.insert(key, value);
        }
        if shared.is_empty() {
            return;
        }
        let store = self.shared.clone();
        self.tasks.spawn(async move {
            for (hash, key, value, max) in shared {
                if let Err(e) = store.lookup_put(&hash, &key, &value, max).await {
                    tracing::debug!(error = %e, "a learned lookup was not shared");
                    return;
                }
            }
        });
    }

    /// What the tables hold for `wanted` (table, key as a tag writes it), as a rule's
    /// templates read it: `{table: {key: value}}`. What neither this instance nor Redis
    /// knows is absent.
    pub async fn find(&self, wanted: &[(String, String)]) -> Map<String, Value> {
        let mut out: Map<String, Value> = Map::new();
        for (table, key) in wanted {
            let Some(i) = self.index(table) else {
                continue;
            };
            let local = self.local[i].get(key).map(|v| v.clone());
            let found = match local {
                Some(v) => Some(v),
                None => self.read_shared(i, table, key).await,
            };
            if let Some(v) = found {
                let entry = out
                    .entry(table.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(m) = entry {
                    m.insert(key.clone(), v);
                }
            }
        }
        out
    }

    /// A value from Redis, checked (untrusted) and kept locally.
    async fn read_shared(&self, i: usize, table: &str, key: &str) -> Option<Value> {
        let text = match self.shared.lookup_get(&self.keys.lookup(table), key).await {
            Ok(found) => found?,
            Err(e) => {
                tracing::debug!(error = %e, table, "lookup not read from Redis");
                return None;
            }
        };
        let Some(json) = self.verified(table, key, &text) else {
            tracing::warn!(
                table,
                "a lookup value in Redis is not signed with this deployment's key: ignored"
            );
            return None;
        };
        let value: Value = serde_json::from_str(json).ok()?;
        if !lookup::usable(&value) {
            tracing::warn!(
                table,
                "a lookup value in Redis is not a short scalar: ignored"
            );
            return None;
        }
        let local = &self.local[i];
        if local.len() >= self.spec.tables()[i].max_entries {
            local.clear();
        }
        local.insert(key.to_owned(), value.clone());
        Some(value)
    }

    fn index(&self, table: &str) -> Option<usize> {
        self.spec.tables().iter().position(|t| t.name == table)
    }
}

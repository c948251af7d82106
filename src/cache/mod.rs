//! The cache: key layout, entries and their encoding, the `Store` trait and its tiers
//! (Redis, memory, and the fallback that switches between them), and read-through serving.

pub mod access;
pub mod coalesce;
pub mod fallback;
pub mod memory;
pub mod near;
pub mod policy;
pub mod read_through;
pub mod redis;
pub mod snapshot;
pub mod version;

use std::borrow::Cow;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderValue;
use serde::{Deserialize, Serialize};

use policy::now_ms;

pub use fallback::FallbackStore;
pub use memory::MemoryStore;
pub use read_through::ReadThrough;
pub use redis::RedisStore;
pub use version::KeyVersion;

/// Longest accepted logical key or clear pattern.
pub const MAX_KEY_LEN: usize = 512;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached in time (connection refused, time-out, broken pipe).
    #[error("redis is unavailable: {0}")]
    Unavailable(String),
    /// The store answered, but not as expected.
    #[error("redis command failed: {0}")]
    Command(String),
    /// A stored value could not be decoded.
    #[error("stored entry is corrupt: {0}")]
    Corrupt(&'static str),
}

impl StoreError {
    /// Whether the store should be considered down (as opposed to one bad answer).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Which tier answered or holds an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// The shared Redis.
    Redis,
    /// The bounded in-process store.
    Memory,
}

impl Tier {
    /// Lowercase name, as reported in stats and `/ready`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Redis => "redis",
            Tier::Memory => "memory",
        }
    }
}

/// The three cached views.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    /// `GET /api/v1/models/train/{id}/metrics`
    Metrics,
    /// `GET /api/v1/models/train/{id}/feature-importance`
    FeatureImportance,
    /// `POST /api/v1/models/compare`
    Comparison,
}

impl View {
    /// Every view, in a stable order.
    pub const ALL: [View; 3] = [View::Metrics, View::FeatureImportance, View::Comparison];

    /// The view's namespace in logical keys and its name in stats and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            View::Metrics => "metrics",
            View::FeatureImportance => "feature_importance",
            View::Comparison => "comparison",
        }
    }

    /// Parses a namespace name as used by `/cache/invalidate`.
    pub fn from_name(name: &str) -> Option<View> {
        View::ALL.into_iter().find(|v| v.name() == name)
    }

    /// Index into per-view arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Logical key of a run's metrics.
pub fn metrics_key(run_id: &str) -> String {
    concat(&["model:metrics:", run_id])
}

/// Logical key of a run's feature importance, optionally limited to the top `n`.
pub fn feature_importance_key(run_id: &str, top_n: Option<u32>) -> String {
    let mut key = concat(&["model:feature_importance:", run_id]);
    if let Some(n) = top_n {
        key.push_str(":top_");
        push_decimal(&mut key, u64::from(n));
    }
    key
}

/// `parts` joined, in one allocation of the right size (keys are built on every request;
/// `format!` costs more than the copying).
pub fn concat(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + 12);
    for p in parts {
        out.push_str(p);
    }
    out
}

/// Appends `n` in decimal.
pub fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

/// Logical key of a comparison of `ids`, which must already be normalised (sorted, unique).
/// The hash is SHA-256 over the JSON array of the ids, the exact list sent to the origin.
pub fn comparison_key(ids: &[String]) -> String {
    use sha2::{Digest, Sha256};
    let canonical = serde_json::to_vec(ids).unwrap_or_default();
    format!("model:comparison:{}", hex(&Sha256::digest(&canonical)))
}

/// Strong validator (quoted) from a 128-bit hash of the body.
pub fn strong_etag(body: &[u8]) -> HeaderValue {
    let tag = format!("\"{:032x}\"", xxhash_rust::xxh3::xxh3_128(body));
    // Quotes and hex digits only: always a valid header value.
    HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

/// `value` as a header value; a value that cannot be one (never the case for a value that
/// came from a header) becomes empty.
fn header_value(value: &str) -> HeaderValue {
    // The usual content types as static values: cloning those for every hit touches no
    // reference count shared between the worker threads.
    for common in ["application/json", "application/json; charset=utf-8"] {
        if value == common {
            return HeaderValue::from_static(common);
        }
    }
    HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

/// Whether `id` is a model run id: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn is_run_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    let first_ok = bytes
        .first()
        .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
    let rest_ok = bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    first_ok && rest_ok && bytes.len() <= 128
}

/// Checks a model run id: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn validate_run_id(id: &str) -> Result<(), String> {
    if is_run_id(id) {
        Ok(())
    } else {
        Err(format!(
            "model_run_id {:?} is invalid: use 1-128 characters of A-Z, a-z, 0-9, '_', '.', '-', not starting with '.' or '-'",
            truncate(id, 40)
        ))
    }
}

/// Checks a key version name: `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`.
pub fn validate_version(v: &str) -> Result<(), String> {
    let bytes = v.as_bytes();
    let ok = bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.len() <= 64
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "version {:?} is invalid: use 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-', starting with a letter or digit",
            truncate(v, 40)
        ))
    }
}

/// Checks a logical key named by `/cache/invalidate`: 1-512 characters of
/// `A-Z a-z 0-9 _ . - :`, no glob characters.
pub fn validate_logical_key(key: &str) -> Result<(), String> {
    if !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(is_key_byte) {
        Ok(())
    } else {
        Err(format!(
            "key {:?} is invalid: use 1-{MAX_KEY_LEN} characters of A-Z, a-z, 0-9, '_', '.', '-', ':'",
            truncate(key, 40)
        ))
    }
}

/// Checks a clear pattern: like a logical key, plus the globs `*` and `?`. Character classes
/// and escapes are refused, so the pattern means the same to Redis and to the memory tier and
/// can never reach outside this service's prefix and version.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    let ok = !pattern.is_empty()
        && pattern.len() <= MAX_KEY_LEN
        && pattern
            .bytes()
            .all(|b| is_key_byte(b) || b == b'*' || b == b'?');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "pattern {:?} is invalid: use 1-{MAX_KEY_LEN} characters of A-Z, a-z, 0-9, '_', '.', '-', ':' and the wildcards '*' and '?'",
            truncate(pattern, 40)
        ))
    }
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':')
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Builds physical keys: `{prefix}:{version}:{logical}` for entries,
/// `{prefix}:_tags:{version}:run:{id}` for the per-run tag sets, `{prefix}:_gen:{version}:…`
/// for generation counters and `{prefix}:_lock:{version}:…` for fetch locks (all outside the
/// entries' keyspace, so a clear of `*` counts only entries), and `{prefix}:_meta:version` for
/// the shared version. Versions cannot start with `_`, so these never collide.
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
        format!("{}:{version}:{pattern}", self.prefix)
    }

    /// Physical key of the set listing every entry that depends on a run.
    pub fn run_tag(&self, version: &str, run_id: &str) -> String {
        format!("{}:_tags:{version}:run:{run_id}", self.prefix)
    }

    /// Physical glob over every tag set of `version`.
    pub fn tag_pattern(&self, version: &str) -> String {
        format!("{}:_tags:{version}:*", self.prefix)
    }

    /// Physical key of a run's generation counter.
    pub fn run_gen(&self, version: &str, run_id: &str) -> String {
        format!("{}:_gen:{version}:run:{run_id}", self.prefix)
    }

    /// Physical key of a view's generation counter.
    pub fn view_gen(&self, version: &str, view: View) -> String {
        format!("{}:_gen:{version}:ns:{}", self.prefix, view.name())
    }

    /// Physical glob over every generation counter of `version`.
    pub fn gen_pattern(&self, version: &str) -> String {
        format!("{}:_gen:{version}:*", self.prefix)
    }

    /// Physical key of the cross-instance fetch lock of an entry.
    pub fn fetch_lock(&self, version: &str, logical: &str) -> String {
        format!("{}:_lock:{version}:{logical}", self.prefix)
    }

    /// Physical key holding the shared key version.
    pub fn version_key(&self) -> String {
        format!("{}:_meta:version", self.prefix)
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

/// A stored origin answer: the body byte for byte, plus what is needed to serve it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// Origin status (200, or 404 when negative caching is on).
    pub status: u16,
    /// Origin `Content-Type` (empty when the origin sent none), ready to be sent: a hit
    /// copies no header bytes.
    pub content_type: HeaderValue,
    /// Strong validator, quoted (`"…"`), from the body's hash, computed once when stored.
    pub etag: HeaderValue,
    /// When it was stored, in Unix milliseconds.
    pub stored_at_ms: u64,
    /// Freshness lifetime in seconds.
    pub ttl_secs: u64,
    /// How long it is kept past its TTL (to be served stale), in milliseconds.
    pub stale_ms: u64,
    /// Physical keys of the tag sets this entry belongs to.
    pub tags: Vec<String>,
    /// The generations of its dependencies (namespace, then runs) read before the origin
    /// fetch began; the entry is served only while they are still current.
    pub gens: Vec<u64>,
    /// The origin's body.
    pub body: Bytes,
}

#[derive(Serialize, Deserialize)]
struct EntryMeta<'a> {
    s: u16,
    #[serde(borrow)]
    ct: Cow<'a, str>,
    #[serde(borrow)]
    et: Cow<'a, str>,
    at: u64,
    ttl: u64,
    #[serde(default)]
    st: u64,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    g: Vec<u64>,
}

const ENTRY_MAGIC: &[u8; 3] = b"RC1";

impl CacheEntry {
    /// Builds an entry for `body`, computing its strong ETag once, here, not on every hit.
    pub fn new(
        status: u16,
        content_type: String,
        body: Bytes,
        stored_at_ms: u64,
        ttl: Duration,
        tags: Vec<String>,
    ) -> Self {
        Self {
            status,
            content_type: header_value(&content_type),
            etag: strong_etag(&body),
            stored_at_ms,
            ttl_secs: ttl.as_secs(),
            stale_ms: 0,
            tags,
            gens: Vec::new(),
            body,
        }
    }

    /// Serialises as `RC1`, a 4-byte metadata length, JSON metadata, then the raw body, so the
    /// body is never re-encoded.
    pub fn encode(&self) -> Bytes {
        let meta = EntryMeta {
            s: self.status,
            ct: Cow::Borrowed(self.content_type.to_str().unwrap_or_default()),
            et: Cow::Borrowed(self.etag.to_str().unwrap_or_default()),
            at: self.stored_at_ms,
            ttl: self.ttl_secs,
            st: self.stale_ms,
            tags: self.tags.clone(),
            g: self.gens.clone(),
        };
        let meta = serde_json::to_vec(&meta).unwrap_or_default();
        let mut out = BytesMut::with_capacity(7 + meta.len() + self.body.len());
        out.put_slice(ENTRY_MAGIC);
        out.put_u32(meta.len() as u32);
        out.put_slice(&meta);
        out.put_slice(&self.body);
        out.freeze()
    }

    /// Inverse of [`CacheEntry::encode`].
    pub fn decode(mut raw: Bytes) -> Result<Self, StoreError> {
        if raw.len() < 7 || &raw[..3] != ENTRY_MAGIC {
            return Err(StoreError::Corrupt("bad header"));
        }
        raw.advance(3);
        let meta_len = raw.get_u32() as usize;
        if raw.len() < meta_len {
            return Err(StoreError::Corrupt("truncated metadata"));
        }
        let meta_bytes = raw.split_to(meta_len);
        let meta: EntryMeta<'_> =
            serde_json::from_slice(&meta_bytes).map_err(|_| StoreError::Corrupt("bad metadata"))?;
        Ok(Self {
            status: meta.s,
            content_type: header_value(&meta.ct),
            etag: HeaderValue::from_str(&meta.et).map_err(|_| StoreError::Corrupt("bad etag"))?,
            stored_at_ms: meta.at,
            ttl_secs: meta.ttl,
            stale_ms: meta.st,
            tags: meta.tags,
            gens: meta.g,
            body: raw,
        })
    }

    /// Whether the entry was computed under the generations `current` (missing values on
    /// either side count as 0, the generation of a counter never bumped).
    pub fn is_current(&self, current: &[u64]) -> bool {
        let n = self.gens.len().max(current.len());
        (0..n).all(|i| self.gens.get(i).unwrap_or(&0) == current.get(i).unwrap_or(&0))
    }

    /// Approximate bytes held in memory, for the byte-bounded memory tier.
    pub fn weight(&self) -> usize {
        self.body.len()
            + self.content_type.len()
            + self.etag.len()
            + self.tags.iter().map(String::len).sum::<usize>()
            + 64
    }
}

/// An entry read together with the current generations of its dependencies.
#[derive(Debug, Clone, Default)]
pub struct Lookup {
    /// The stored entry, if any.
    pub entry: Option<CacheEntry>,
    /// Current generations of the dependencies asked for, in order.
    pub gens: Vec<u64>,
    /// Time the store will keep the entry (Redis `PTTL`), when the store knows it.
    pub expires_in: Option<Duration>,
}

impl Lookup {
    /// The entry, unless an invalidation happened after its fetch began. Where the store
    /// reports the key's remaining life, `stored_at_ms` is taken from it, so an entry whose
    /// life was extended by an unchanged refresh (without rewriting it) counts as fresh again.
    pub fn current(self) -> Option<CacheEntry> {
        let gens = self.gens;
        let mut entry = self.entry.filter(|e| e.is_current(&gens))?;
        if let Some(left) = self.expires_in {
            let left_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
            let fresh_left = left_ms.saturating_sub(entry.stale_ms);
            entry.stored_at_ms = (now_ms() + fresh_left)
                .saturating_sub(entry.ttl_secs.saturating_mul(1000))
                .max(entry.stored_at_ms);
        }
        Some(entry)
    }
}

/// A cache tier. Keys are physical keys; patterns are physical globs using only `*` and `?`.
/// Every method touches at most one key per command, so the Redis tier stays cluster-ready.
#[async_trait]
pub trait Store: Send + Sync {
    /// Reads an entry and the generations of `deps` (one round trip on Redis).
    async fn get(&self, key: &str, deps: &[String]) -> Result<Lookup, StoreError>;
    /// Reads the generations of `deps` (0 for a counter never bumped).
    async fn generations(&self, deps: &[String]) -> Result<Vec<u64>, StoreError>;
    /// Bumps the generations of `deps`, making every entry computed under the old ones
    /// unservable, including entries stored later by fetches that began before.
    async fn bump(&self, deps: &[String]) -> Result<(), StoreError>;
    /// Extends the life of `key` to `retention` from now without rewriting its value
    /// (`entry` is the same entry with `stored_at_ms` moved to now). Returns whether it existed.
    async fn touch(
        &self,
        key: &str,
        entry: &CacheEntry,
        retention: Duration,
    ) -> Result<bool, StoreError>;
    /// Writes an entry for `ttl` and adds its key to each of `entry.tags`.
    async fn set(&self, key: &str, entry: &CacheEntry, ttl: Duration) -> Result<(), StoreError>;
    /// Deletes keys; returns how many existed.
    async fn delete(&self, keys: &[String]) -> Result<u64, StoreError>;
    /// Deletes every entry listed in the tag set `tag`, and the set; returns entries deleted.
    async fn delete_tagged(&self, tag: &str) -> Result<u64, StoreError>;
    /// Deletes every key matching `pattern`, in batches; returns how many.
    async fn delete_matching(&self, pattern: &str) -> Result<u64, StoreError>;
    /// Counts the keys matching `pattern`.
    async fn count_matching(&self, pattern: &str) -> Result<u64, StoreError>;
    /// Checks the tier answers.
    async fn health_check(&self) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips_byte_for_byte() {
        let body = Bytes::from_static(b"{\"a\": 1,  \"b\":[2]}\n");
        let e = CacheEntry::new(
            200,
            "application/json; charset=utf-8".into(),
            body.clone(),
            1_700_000_000_000,
            Duration::from_secs(60),
            vec!["runcache:_tags:v1:run:1".into()],
        );
        let back = CacheEntry::decode(e.encode()).expect("decodes");
        assert_eq!(back, e);
        assert_eq!(back.body, body);
        let etag = e.etag.to_str().expect("ascii");
        assert!(etag.starts_with('"') && etag.ends_with('"') && etag.len() == 34);
    }

    #[test]
    fn garbage_does_not_decode() {
        assert!(CacheEntry::decode(Bytes::from_static(b"hello world")).is_err());
        assert!(CacheEntry::decode(Bytes::from_static(b"RC1\0\0\0\xffab")).is_err());
    }

    #[test]
    fn run_ids_follow_the_spec_pattern() {
        for ok in ["42", "run_1", "a.b-c", "_x", &"a".repeat(128)] {
            assert!(validate_run_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "-a",
            ".a",
            "a/b",
            "a b",
            "a*",
            &"a".repeat(129),
            "é",
        ] {
            assert!(validate_run_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns_refuse_classes_and_escapes() {
        assert!(validate_pattern("model:metrics:*").is_ok());
        assert!(validate_pattern("model:?:1").is_ok());
        for bad in ["", "model:[ab]", "a\\*", "a b", "x{y}"] {
            assert!(validate_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_built_as_documented() {
        assert_eq!(metrics_key("42"), "model:metrics:42");
        assert_eq!(
            feature_importance_key("a.b", Some(1000)),
            "model:feature_importance:a.b:top_1000"
        );
        assert_eq!(
            feature_importance_key("7", None),
            "model:feature_importance:7"
        );
        let mut s = String::new();
        for n in [0, 9, 10, 1234567890123, u64::MAX] {
            s.clear();
            push_decimal(&mut s, n);
            assert_eq!(s, n.to_string());
        }
    }

    #[test]
    fn comparison_key_depends_only_on_the_normalised_list() {
        let a = comparison_key(&["1".into(), "2".into()]);
        let b = comparison_key(&["1".into(), "3".into()]);
        assert_ne!(a, b);
        assert!(a.starts_with("model:comparison:") && a.len() == "model:comparison:".len() + 64);
    }

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
    }
}

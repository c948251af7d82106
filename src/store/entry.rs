//! A stored origin answer and its encoding: `RC3`, an 8-byte extension of its freshness, a
//! 4-byte metadata length, the metadata in postcard (a compact binary serde format), then the
//! raw body, so the body is never re-encoded. Entries written as `RC2` (no extension) and
//! `RC1` (JSON metadata, before 2026-12-06) are still read.

use std::borrow::Cow;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use super::{Source, Stamp, StoreError};

/// Origin headers kept with an answer, shared rather than copied on every hit. None is no
/// allocation and no reference count: most answers carry none, and a count shared by every
/// worker thread would be touched on each of their hits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Option<Arc<[(HeaderName, HeaderValue)]>>);

impl Headers {
    /// Each name and value, in order.
    pub fn iter(&self) -> impl Iterator<Item = &(HeaderName, HeaderValue)> {
        self.0.iter().flat_map(|h| h.iter())
    }

    /// A copy, to be extended.
    pub fn to_vec(&self) -> Vec<(HeaderName, HeaderValue)> {
        self.iter().cloned().collect()
    }
}

impl FromIterator<(HeaderName, HeaderValue)> for Headers {
    fn from_iter<I: IntoIterator<Item = (HeaderName, HeaderValue)>>(iter: I) -> Self {
        let all: Vec<_> = iter.into_iter().collect();
        Self((!all.is_empty()).then(|| all.into()))
    }
}

/// `map` as [`Headers`].
pub fn headers_of(map: &http::HeaderMap) -> Headers {
    map.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
}

/// Smallest body whose entry carries a [`CopyMark`]: comparing a smaller one costs less than
/// sharing the mark between the entry's clones on each hit.
pub const MARKED_FROM_BYTES: usize = 16 * 1024;

/// A memo shared by an entry's clones: the id of the compressed copy (`serve::precompressed`)
/// its body was found equal to, byte for byte, so that its later hits do not compare or read
/// the body again. Never stored, never part of what an entry is: two entries that differ only
/// in it are equal.
#[derive(Debug, Clone, Default)]
pub struct CopyMark(Option<Arc<AtomicU64>>);

impl CopyMark {
    /// A mark for an entry of `body`: none for a body too small to be compressed ahead.
    fn for_body(body: &Bytes) -> Self {
        Self((body.len() >= MARKED_FROM_BYTES).then(|| Arc::new(AtomicU64::new(0))))
    }

    /// The id of the copy the body was found equal to (0: none yet, or no mark).
    pub fn get(&self) -> u64 {
        self.0.as_ref().map_or(0, |m| m.load(Ordering::Acquire))
    }

    /// Records that the body equals that of the copy `id`: call it only once that is known.
    pub fn set(&self, id: u64) {
        if let Some(m) = &self.0 {
            m.store(id, Ordering::Release);
        }
    }
}

impl PartialEq for CopyMark {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for CopyMark {}

/// A stored origin answer: the body byte for byte, plus what is needed to serve it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// Origin status (200, or 404 when negative caching is on).
    pub status: u16,
    /// Origin `Content-Type` (empty when the origin sent none), ready to be sent: a hit
    /// copies no header bytes.
    pub content_type: HeaderValue,
    /// The origin headers kept with it (`cache.stored_headers`), sent on every hit.
    pub headers: Headers,
    /// Strong validator, quoted (`"…"`), from the body's hash, computed once when stored.
    pub etag: HeaderValue,
    /// When its data was fetched from the origin (or, after an unchanged refresh, confirmed),
    /// in Unix milliseconds.
    pub stored_at_ms: u64,
    /// Freshness lifetime in seconds.
    pub ttl_secs: u64,
    /// How long it is kept past its TTL (to be served stale), in milliseconds.
    pub stale_ms: u64,
    /// The origin's own stale windows for it, in seconds (while revalidating, if error), when
    /// its `Cache-Control` set them (`must-revalidate`: both 0); `None`: the view's.
    pub windows: Option<(u64, u64)>,
    /// Physical keys of the tag sets this entry belongs to.
    pub tags: Vec<String>,
    /// The invalidation state read before its origin fetch began.
    pub stamp: Stamp,
    /// The origin's body.
    pub body: Bytes,
    /// Set on a Vary marker: an entry that is no answer, kept where an answer that the origin
    /// sent with `Vary` would be. Its variants are entries of their own (see
    /// `serve::vary`).
    pub vary: Option<Arc<VaryMarker>>,
    /// Which compressed copy its body is known to equal (shared by its clones).
    pub copy_mark: CopyMark,
}

/// What a Vary marker records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaryMarker {
    /// The request headers the origin's answers vary on, lower case, sorted.
    pub headers: Vec<String>,
    /// Drawn when the marker is made: variants are keyed under it, so that a marker deleted
    /// (by a key or pattern invalidation) takes every variant made under it with it.
    pub nonce: u64,
    /// Hashes of the variants stored under it (at most `cache.max_variants`; approximate
    /// under concurrent writes, which may each add one).
    pub variants: Vec<u64>,
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
    #[serde(default)]
    c: u64,
    /// When the stamp was read (0 in entries written before it was recorded: as old as can
    /// be).
    #[serde(default)]
    sa: u64,
    /// Stored origin headers, as name and value.
    #[serde(default)]
    h: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// A Vary marker's record. Always written: postcard reads fields by position, so none
    /// may be skipped (`default` only serves `RC1` entries written without it).
    #[serde(default)]
    vy: Option<VaryMarker>,
    /// The origin's stale windows.
    #[serde(default)]
    sw: Option<(u64, u64)>,
}

/// Entries with postcard metadata behind a fixed-width freshness extension: what
/// [`CacheEntry::encode`] writes. A hit decodes its entry's metadata on every Redis read, and
/// postcard takes a fraction of JSON's time.
pub const ENTRY_MAGIC: &[u8; 3] = b"RC3";
/// Where the extension lies in an `RC3` value: 8 bytes, big-endian, the Unix millisecond its
/// freshness was extended to (0: never). An unchanged refresh overwrites it in place
/// (`SETRANGE`), so a read learns of the extension from the value alone, with no `PTTL`.
pub const EXTENDED_TO_AT: usize = 3;
/// Entries with postcard metadata and no extension, written before `RC3`: still read.
const ENTRY_MAGIC_V2: &[u8; 3] = b"RC2";
/// Entries with JSON metadata, written before `RC2`: still read, so that entries and
/// snapshots written by an earlier version stay servable.
const ENTRY_MAGIC_JSON: &[u8; 3] = b"RC1";

/// The store time of an entry stored at `at` (ms) with a TTL of `ttl_secs` whose freshness
/// was extended to `extended_to` (ms, 0: never): as if stored when the extension's fresh life
/// began, as an unchanged refresh confirmed it; never before `at`, and never after now (the
/// value is read back from Redis, which anything able to write there could forge).
fn extended_store_time(at: u64, ttl_secs: u64, extended_to: u64) -> u64 {
    if extended_to == 0 {
        return at;
    }
    let from = extended_to.saturating_sub(ttl_secs.saturating_mul(1000));
    from.min(crate::domain::policy::now_ms()).max(at)
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

impl CacheEntry {
    /// Builds an entry for `body` fetched under `stamp`, computing its strong ETag once,
    /// here, not on every hit.
    pub fn new(
        status: u16,
        content_type: &str,
        body: Bytes,
        stored_at_ms: u64,
        ttl: Duration,
        tags: Vec<String>,
        stamp: Stamp,
    ) -> Self {
        Self {
            status,
            content_type: header_value(content_type),
            headers: Headers::default(),
            etag: strong_etag(&body),
            stored_at_ms,
            ttl_secs: ttl.as_secs(),
            stale_ms: 0,
            windows: None,
            tags,
            stamp,
            copy_mark: CopyMark::for_body(&body),
            body,
            vary: None,
        }
    }

    /// A Vary marker for `marker`, stamped and tagged as the answers it stands for.
    pub fn marker(
        marker: VaryMarker,
        stored_at_ms: u64,
        ttl: Duration,
        tags: Vec<String>,
        stamp: Stamp,
    ) -> Self {
        let mut entry = Self::new(200, "", Bytes::new(), stored_at_ms, ttl, tags, stamp);
        entry.vary = Some(Arc::new(marker));
        entry
    }

    /// Serialises as `RC3`, no extension, a 4-byte metadata length, postcard metadata, then the
    /// raw body. The stamp's source is not written: an entry read back belongs to the store it
    /// is read from.
    pub fn encode(&self) -> Bytes {
        let meta = EntryMeta {
            s: self.status,
            ct: Cow::Borrowed(self.content_type.to_str().unwrap_or_default()),
            et: Cow::Borrowed(self.etag.to_str().unwrap_or_default()),
            at: self.stored_at_ms,
            ttl: self.ttl_secs,
            st: self.stale_ms,
            tags: self.tags.clone(),
            g: self.stamp.counters().to_vec(),
            c: self.stamp.clears(),
            sa: self.stamp.read_at_ms(),
            // Only values that are text are kept (see `with_headers`).
            h: self
                .headers
                .iter()
                .filter_map(|(n, v)| {
                    Some((Cow::Borrowed(n.as_str()), Cow::Borrowed(v.to_str().ok()?)))
                })
                .collect(),
            vy: self.vary.as_deref().cloned(),
            sw: self.windows,
        };
        let meta = postcard::to_allocvec(&meta).unwrap_or_default();
        let mut out = BytesMut::with_capacity(15 + meta.len() + self.body.len());
        out.put_slice(ENTRY_MAGIC);
        out.put_u64(0);
        out.put_u32(meta.len() as u32);
        out.put_slice(&meta);
        out.put_slice(&self.body);
        out.freeze()
    }

    /// Inverse of [`CacheEntry::encode`], for an entry read from `source`. An extension of its
    /// freshness (see [`EXTENDED_TO_AT`]) moves its store time on, never past now.
    pub fn decode(mut raw: Bytes, source: Source) -> Result<Self, StoreError> {
        let (json, header) = match raw.get(..3) {
            Some(m) if m == ENTRY_MAGIC => (false, 15),
            Some(m) if m == ENTRY_MAGIC_V2 => (false, 7),
            Some(m) if m == ENTRY_MAGIC_JSON => (true, 7),
            _ => return Err(StoreError::Corrupt("bad header")),
        };
        if raw.len() < header {
            return Err(StoreError::Corrupt("bad header"));
        }
        raw.advance(3);
        let extended_to = if header == 15 { raw.get_u64() } else { 0 };
        let meta_len = raw.get_u32() as usize;
        if raw.len() < meta_len {
            return Err(StoreError::Corrupt("truncated metadata"));
        }
        let meta_bytes = raw.split_to(meta_len);
        let meta: EntryMeta<'_> = if json {
            serde_json::from_slice(&meta_bytes).map_err(|_| StoreError::Corrupt("bad metadata"))?
        } else {
            // The whole metadata, nothing after it: a value that decodes with bytes to spare
            // is not one this code wrote.
            match postcard::take_from_bytes(&meta_bytes) {
                Ok((meta, [])) => meta,
                _ => return Err(StoreError::Corrupt("bad metadata")),
            }
        };
        let headers = meta
            .h
            .iter()
            .map(|(n, v)| {
                Ok((
                    HeaderName::from_bytes(n.as_bytes())
                        .map_err(|_| StoreError::Corrupt("bad header name"))?,
                    HeaderValue::from_str(v)
                        .map_err(|_| StoreError::Corrupt("bad header value"))?,
                ))
            })
            .collect::<Result<Headers, StoreError>>()?;
        Ok(Self {
            status: meta.s,
            content_type: header_value(&meta.ct),
            headers,
            etag: HeaderValue::from_str(&meta.et).map_err(|_| StoreError::Corrupt("bad etag"))?,
            stored_at_ms: extended_store_time(meta.at, meta.ttl, extended_to),
            ttl_secs: meta.ttl,
            stale_ms: meta.st,
            windows: meta.sw,
            tags: meta.tags,
            stamp: Stamp::read_at(source, meta.g, meta.c, meta.sa),
            copy_mark: CopyMark::for_body(&raw),
            body: raw,
            vary: meta.vy.map(Arc::new),
        })
    }

    /// Keeps `headers` (text values only: the codec stores text) with it.
    pub fn with_headers(
        mut self,
        headers: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
    ) -> Self {
        self.headers = headers
            .into_iter()
            .filter(|(_, v)| v.to_str().is_ok())
            .collect();
        self
    }

    /// When it stops being fresh, in Unix milliseconds.
    pub fn fresh_until_ms(&self) -> u64 {
        self.stored_at_ms
            .saturating_add(self.ttl_secs.saturating_mul(1000))
    }

    /// Approximate bytes held in memory, for the byte-bounded tiers.
    pub fn weight(&self) -> usize {
        self.body.len()
            + self.content_type.len()
            + self.etag.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len())
                .sum::<usize>()
            + self.tags.iter().map(String::len).sum::<usize>()
            + 8 * self.stamp.counters().len()
            + 64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Tier;

    #[test]
    fn entry_round_trips_byte_for_byte() {
        let source = Source {
            tier: Tier::Redis,
            incarnation: 3,
        };
        let body = Bytes::from_static(b"{\"a\": 1,  \"b\":[2]}\n");
        let e = CacheEntry::new(
            200,
            "application/json; charset=utf-8",
            body.clone(),
            1_700_000_000_000,
            Duration::from_secs(60),
            vec!["runcache:_tags:v1:run:1".into()],
            Stamp::new(source, vec![1, 2], 7),
        );
        let back = CacheEntry::decode(e.encode(), source).expect("decodes");
        assert_eq!(back, e);
        assert_eq!(back.body, body);
        let etag = e.etag.to_str().expect("ascii");
        assert!(etag.starts_with('"') && etag.ends_with('"') && etag.len() == 34);
    }

    #[test]
    fn garbage_does_not_decode() {
        let source = Source {
            tier: Tier::Redis,
            incarnation: 0,
        };
        assert!(CacheEntry::decode(Bytes::from_static(b"hello world"), source).is_err());
        assert!(CacheEntry::decode(Bytes::from_static(b"RC1\0\0\0\xffab"), source).is_err());
        assert!(CacheEntry::decode(Bytes::from_static(b"RC2\0\0\0\xffab"), source).is_err());
        assert!(CacheEntry::decode(Bytes::from_static(b"RC2\0\0\0\x02\xff\xff"), source).is_err());
        assert!(CacheEntry::decode(Bytes::from_static(b"RC3\0\0\0\0\0\0\0"), source).is_err());
        assert!(CacheEntry::decode(Bytes::from_static(b"RC"), source).is_err());
    }

    fn source() -> Source {
        Source {
            tier: Tier::Redis,
            incarnation: 1,
        }
    }

    /// A full entry: stored headers, stale windows, and a Vary marker's record.
    fn full_entry() -> CacheEntry {
        let mut e = CacheEntry::new(
            404,
            "text/plain",
            Bytes::from_static(b"not here"),
            1_700_000_000_123,
            Duration::from_secs(30),
            vec!["p:_tags:v1:run:1".into(), "p:_tags:v1:run:2".into()],
            Stamp::read_at(source(), vec![4, 0, 9], 2, 1_700_000_000_100),
        );
        e.headers = [(
            HeaderName::from_static("x-origin"),
            HeaderValue::from_static("a b"),
        )]
        .into_iter()
        .collect();
        e.windows = Some((5, 60));
        e.stale_ms = 65_000;
        e.vary = Some(Arc::new(VaryMarker {
            headers: vec!["accept-language".into()],
            nonce: 77,
            variants: vec![1, 2, 3],
        }));
        e
    }

    #[test]
    fn every_field_round_trips_and_the_metadata_is_binary() {
        let e = full_entry();
        let raw = e.encode();
        assert_eq!(&raw[..3], b"RC3");
        assert_eq!(raw[EXTENDED_TO_AT..EXTENDED_TO_AT + 8], [0; 8]);
        assert_eq!(
            CacheEntry::decode(raw.clone(), source()).expect("decodes"),
            e
        );
        // Metadata that decodes with bytes to spare, or is cut short, is no entry.
        let meta_len = u32::from_be_bytes([raw[11], raw[12], raw[13], raw[14]]) as usize;
        let mut longer = raw[..15].to_vec();
        longer[11..15].copy_from_slice(&((meta_len + 1) as u32).to_be_bytes());
        longer.extend_from_slice(&raw[15..15 + meta_len]);
        longer.push(0);
        assert!(CacheEntry::decode(Bytes::from(longer), source()).is_err());
        let mut shorter = raw[..15].to_vec();
        shorter[11..15].copy_from_slice(&((meta_len - 1) as u32).to_be_bytes());
        shorter.extend_from_slice(&raw[15..15 + meta_len - 1]);
        assert!(CacheEntry::decode(Bytes::from(shorter), source()).is_err());
        // The same entry as RC2 wrote it (no extension) still decodes.
        let mut v2 = b"RC2".to_vec();
        v2.extend_from_slice(&raw[11..]);
        assert_eq!(
            CacheEntry::decode(Bytes::from(v2), source()).expect("decodes"),
            e
        );
    }

    /// An extension written in place moves the store time on, as the refresh that confirmed
    /// the entry unchanged would have stored it; one in the future is held to now.
    #[test]
    fn an_extension_written_in_place_moves_the_store_time() {
        let e = full_entry();
        let extended = |to: u64| {
            let mut raw = e.encode().to_vec();
            raw[EXTENDED_TO_AT..EXTENDED_TO_AT + 8].copy_from_slice(&to.to_be_bytes());
            CacheEntry::decode(Bytes::from(raw), source()).expect("decodes")
        };
        let now = crate::domain::policy::now_ms();
        let back = extended(now - 10_000 + 30_000);
        assert_eq!(back.stored_at_ms, now - 10_000);
        assert_eq!(back.fresh_until_ms(), now + 20_000);
        assert_eq!(back.body, e.body);
        // Never before the entry's own store time, never after now.
        assert_eq!(extended(5).stored_at_ms, e.stored_at_ms);
        let forged = extended(u64::MAX).stored_at_ms;
        assert!(forged >= now && forged <= crate::domain::policy::now_ms());
    }

    /// Entries and snapshots written before `RC2` (JSON metadata) are still read.
    #[test]
    fn an_entry_written_as_rc1_still_decodes() {
        let e = full_entry();
        let meta = serde_json::json!({
            "s": 404, "ct": "text/plain", "et": e.etag.to_str().expect("ascii"),
            "at": 1_700_000_000_123_u64, "ttl": 30, "st": 65_000,
            "tags": ["p:_tags:v1:run:1", "p:_tags:v1:run:2"], "g": [4, 0, 9], "c": 2,
            "sa": 1_700_000_000_100_u64, "h": [["x-origin", "a b"]],
            "vy": {"headers": ["accept-language"], "nonce": 77, "variants": [1, 2, 3]},
            "sw": [5, 60],
        });
        let meta = serde_json::to_vec(&meta).expect("json");
        let mut raw = b"RC1".to_vec();
        raw.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        raw.extend_from_slice(&meta);
        raw.extend_from_slice(b"not here");
        assert_eq!(
            CacheEntry::decode(Bytes::from(raw), source()).expect("decodes"),
            e
        );
        // Without the fields RC1 left out when empty.
        let meta = br#"{"s":200,"ct":"","et":"\"x\"","at":1,"ttl":2}"#;
        let mut raw = b"RC1".to_vec();
        raw.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        raw.extend_from_slice(meta);
        let old = CacheEntry::decode(Bytes::from(raw), source()).expect("decodes");
        assert_eq!((old.status, old.vary, old.windows), (200, None, None));
    }
}

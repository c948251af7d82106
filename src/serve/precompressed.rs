//! Compressed bodies of cached answers, made once: a hit of a large body (an MLflow search
//! page is about 420 KB, 40 KB gzipped) would otherwise be compressed again by the
//! compression layer on every request. Found by the answer's strong ETag, and kept with the
//! bytes it was made from: a copy is given only for the same bytes (the ETag is a fast hash,
//! not a proof; one body is never answered with another's copy). Bounded in bytes (both
//! forms count), and emptied whole when full (what is hot is compressed again at once).
//!
//! Finding that the bytes are the same costs nothing when they are the very buffer the copy
//! was made from. Otherwise (the entries of one answer for several credentials, of URLs that
//! answer alike, a near-cache copy read again from Redis) the bytes of a large body (16 KiB
//! or more) are compared once per entry, and the entry's [`CopyMark`] remembers the copy's
//! id: its later hits neither compare nor read the body. A copy made again under the same
//! ETag has a new id. A smaller body is compared each time, which costs less than the mark.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, HeaderValue, header};

use crate::store::CopyMark;

/// Smallest body worth compressing ahead (below it the layer's own compression is cheap).
pub const MIN_BYTES: usize = 1024;

/// One body's gzip form.
#[derive(Debug)]
struct Copy {
    /// Unique to this copy (never 0: a [`CopyMark`]'s "none").
    id: u64,
    /// The bytes it was made from.
    identity: Bytes,
    gz: Bytes,
}

/// The compressed copies.
#[derive(Debug)]
pub struct Precompressed {
    /// By ETag.
    gzip: DashMap<HeaderValue, Copy>,
    held: AtomicUsize,
    max_bytes: usize,
    next_id: AtomicU64,
}

impl Precompressed {
    /// Copies of at most `max_bytes` in all (0: none are kept).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            gzip: DashMap::new(),
            held: AtomicUsize::new(0),
            max_bytes,
            next_id: AtomicU64::new(1),
        }
    }

    /// The gzip copy of `body` (whose strong ETag is `etag`) made for an earlier request, if
    /// it was made from the same bytes: the same buffer, a body `mark` says equals it, or
    /// (once per entry, then marked) equal bytes.
    pub fn cached(&self, etag: &HeaderValue, body: &Bytes, mark: &CopyMark) -> Option<Bytes> {
        let copy = self.gzip.get(etag)?;
        if copy.identity.len() != body.len() {
            return None;
        }
        if copy.identity.as_ptr() == body.as_ptr() || mark.get() == copy.id {
            return Some(copy.gz.clone());
        }
        if copy.identity[..] != body[..] {
            return None;
        }
        mark.set(copy.id);
        Some(copy.gz.clone())
    }

    /// Whether `body` is worth a copy.
    pub fn wanted(&self, body: &Bytes) -> bool {
        self.max_bytes > 0 && body.len() >= MIN_BYTES
    }

    /// Makes (and keeps) the gzip copy of `body`. `None` when it would not be kept, or
    /// compresses badly. Blocking: a large body is compressed off the async workers.
    pub fn make(&self, etag: &HeaderValue, body: &Bytes, mark: &CopyMark) -> Option<Bytes> {
        if !self.wanted(body) {
            return None;
        }
        let mut encoder = flate2::write::GzEncoder::new(
            Vec::with_capacity(body.len() / 4),
            flate2::Compression::default(),
        );
        encoder.write_all(body).ok()?;
        let compressed = Bytes::from(encoder.finish().ok()?);
        let size = compressed.len() + body.len();
        // Not worth its bytes: served as it is.
        if compressed.len() * 10 > body.len() * 9 || size > self.max_bytes {
            return None;
        }
        if self.held.fetch_add(size, Ordering::Relaxed) + size > self.max_bytes {
            self.gzip.clear();
            self.held.store(size, Ordering::Relaxed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let copy = Copy {
            id,
            identity: body.clone(),
            gz: compressed.clone(),
        };
        let replaced = self.gzip.insert(etag.clone(), copy);
        mark.set(id);
        if let Some(old) = replaced {
            // Saturating: a clear in between may already have forgotten it.
            let freed = old.identity.len() + old.gz.len();
            let _ = self
                .held
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                    Some(h.saturating_sub(freed))
                });
        }
        Some(compressed)
    }

    /// [`Self::cached`], else [`Self::make`] (what a request does, in two steps: see
    /// `http::views::gzip_copy`).
    #[cfg(test)]
    fn gzip(&self, etag: &HeaderValue, body: &Bytes, mark: &CopyMark) -> Option<Bytes> {
        self.cached(etag, body, mark)
            .or_else(|| self.make(etag, body, mark))
    }

    /// Copies held (for tests and stats).
    pub fn len(&self) -> usize {
        self.gzip.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.gzip.is_empty()
    }
}

/// Whether the request accepts gzip (`gzip` or `*` with a non-zero quality).
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or_default().trim();
            let zero = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !zero
        })
}

/// Whether a body of `content_type` is text worth compressing (JSON, text).
pub fn compressible(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|v| v.to_str().ok())
        .map(|v| v.to_ascii_lowercase())
        .is_some_and(|v| {
            v.starts_with("application/json") || v.starts_with("text/") || v.contains("+json")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_compressed_once_and_kept_by_its_etag() {
        let store = Precompressed::new(1 << 20);
        let body = Bytes::from(format!("{{\"runs\": [{}]}}", "{\"a\": 1},".repeat(500)));
        let etag = HeaderValue::from_static("\"abc\"");
        let none = CopyMark::default();
        let first = store.gzip(&etag, &body, &none).expect("compressed");
        assert!(first.len() * 5 < body.len());
        let again = store.gzip(&etag, &body, &none).expect("kept");
        assert_eq!(
            first.as_ptr(),
            again.as_ptr(),
            "the same copy, not a new one"
        );
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&first[..]), &mut out)
            .expect("gunzip");
        assert_eq!(out, body);
        // Other bytes under the same ETag (a collision of the fast hash) never get this copy.
        let other = Bytes::from(format!("{{\"runs\": [{}]}}", "{\"b\": 2},".repeat(500)));
        assert!(store.cached(&etag, &other, &none).is_none());
        let theirs = store.gzip(&etag, &other, &none).expect("its own copy");
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&theirs[..]), &mut out)
            .expect("gunzip");
        assert_eq!(out, other);
        // Small bodies and full stores.
        assert!(
            store
                .gzip(&etag, &Bytes::from_static(b"{}"), &none)
                .is_none()
        );
        let tiny = Precompressed::new(0);
        assert!(tiny.gzip(&etag, &body, &none).is_none());
    }

    /// An entry whose bytes lie in another buffer than the copy's source.
    fn entry_of(body: &[u8]) -> crate::store::CacheEntry {
        let source = crate::store::Source {
            tier: crate::store::Tier::Memory,
            incarnation: 0,
        };
        let stamp = crate::store::Stamp::new(source, vec![0], 0);
        let ttl = std::time::Duration::from_secs(60);
        crate::store::CacheEntry::new(
            200,
            "application/json",
            body.to_vec().into(),
            0,
            ttl,
            vec![],
            stamp,
        )
    }

    #[test]
    fn equal_bytes_elsewhere_are_compared_once_per_entry_and_never_trusted_blindly() {
        let store = Precompressed::new(1 << 20);
        let body = Bytes::from(format!("{{\"runs\": [{}]}}", "{\"a\": 1},".repeat(2000)));
        assert!(body.len() >= crate::store::entry::MARKED_FROM_BYTES);
        let etag = HeaderValue::from_static("\"abc\"");
        let maker = entry_of(&body);
        let gz = store
            .gzip(&etag, &maker.body, &maker.copy_mark)
            .expect("made");
        assert_ne!(
            maker.copy_mark.get(),
            0,
            "the entry it was made for is marked"
        );
        // Another entry of the same bytes (another credential's, say): compared, then marked.
        let other = entry_of(&body);
        assert_ne!(other.body.as_ptr(), maker.body.as_ptr());
        assert_eq!(other.copy_mark.get(), 0);
        let got = store
            .cached(&etag, &other.body, &other.copy_mark)
            .expect("equal bytes");
        assert_eq!(got.as_ptr(), gz.as_ptr());
        assert_eq!(other.copy_mark.get(), maker.copy_mark.get());
        // The mark is shared by the entry's clones (the memory tier's, the near cache's).
        assert_eq!(other.clone().copy_mark.get(), maker.copy_mark.get());
        // A copy made again under the ETag, from other bytes (a collision of the fast hash):
        // a new id, so the old mark proves nothing and the bytes are compared.
        let collider = Bytes::from(format!("{{\"runs\": [{}]}}", "{\"b\": 2},".repeat(2000)));
        let collided = entry_of(&collider);
        store
            .make(&etag, &collided.body, &collided.copy_mark)
            .expect("made");
        assert_ne!(collided.copy_mark.get(), other.copy_mark.get());
        assert!(store.cached(&etag, &other.body, &other.copy_mark).is_none());
        assert!(store.cached(&etag, &maker.body, &maker.copy_mark).is_none());
        // A small body carries no mark (it is compared, which costs less), and setting it
        // does nothing.
        let small = entry_of(&body[..1024]);
        small.copy_mark.set(7);
        assert_eq!(small.copy_mark.get(), 0);
    }

    #[test]
    fn gzip_is_accepted_unless_refused() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_str(v).expect("v"),
            );
            m
        };
        assert!(accepts_gzip(&h("gzip, deflate")));
        assert!(accepts_gzip(&h("br;q=1.0, gzip;q=0.5")));
        assert!(accepts_gzip(&h("*")));
        assert!(!accepts_gzip(&h("gzip;q=0")));
        assert!(!accepts_gzip(&h("br")));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}

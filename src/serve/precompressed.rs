//! Compressed bodies of cached answers, made once: a hit of a large body (an MLflow search
//! page is about 420 KB, 40 KB gzipped) would otherwise be compressed again by the
//! compression layer on every request. Found by the answer's strong ETag, and kept with the
//! bytes it was made from: a copy is given only for the same bytes (the ETag is a fast hash,
//! not a proof; one body is never answered with another's copy). Bounded in bytes (both
//! forms count), and emptied whole when full (what is hot is compressed again at once).

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, HeaderValue, header};

/// Smallest body worth compressing ahead (below it the layer's own compression is cheap).
pub const MIN_BYTES: usize = 1024;

/// The compressed copies.
#[derive(Debug)]
pub struct Precompressed {
    /// By ETag: the identity body and its gzip form.
    gzip: DashMap<HeaderValue, (Bytes, Bytes)>,
    held: AtomicUsize,
    max_bytes: usize,
}

impl Precompressed {
    /// Copies of at most `max_bytes` in all (0: none are kept).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            gzip: DashMap::new(),
            held: AtomicUsize::new(0),
            max_bytes,
        }
    }

    /// The gzip copy of `body` (whose strong ETag is `etag`) made for an earlier request, if
    /// it was made from the same bytes.
    pub fn cached(&self, etag: &HeaderValue, body: &Bytes) -> Option<Bytes> {
        let copy = self.gzip.get(etag)?;
        let (identity, gz) = copy.value();
        let same = identity.len() == body.len()
            && (identity.as_ptr() == body.as_ptr() || identity[..] == body[..]);
        same.then(|| gz.clone())
    }

    /// Whether `body` is worth a copy.
    pub fn wanted(&self, body: &Bytes) -> bool {
        self.max_bytes > 0 && body.len() >= MIN_BYTES
    }

    /// Makes (and keeps) the gzip copy of `body`. `None` when it would not be kept, or
    /// compresses badly. Blocking: a large body is compressed off the async workers.
    pub fn make(&self, etag: &HeaderValue, body: &Bytes) -> Option<Bytes> {
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
        if let Some((old_identity, old_gz)) = self
            .gzip
            .insert(etag.clone(), (body.clone(), compressed.clone()))
        {
            // Saturating: a clear in between may already have forgotten it.
            let freed = old_identity.len() + old_gz.len();
            let _ = self
                .held
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                    Some(h.saturating_sub(freed))
                });
        }
        Some(compressed)
    }

    /// [`Self::cached`], else [`Self::make`].
    pub fn gzip(&self, etag: &HeaderValue, body: &Bytes) -> Option<Bytes> {
        self.cached(etag, body).or_else(|| self.make(etag, body))
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
        let first = store.gzip(&etag, &body).expect("compressed");
        assert!(first.len() * 5 < body.len());
        let again = store.gzip(&etag, &body).expect("kept");
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
        assert!(store.cached(&etag, &other).is_none());
        let theirs = store.gzip(&etag, &other).expect("its own copy");
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&theirs[..]), &mut out)
            .expect("gunzip");
        assert_eq!(out, other);
        // Small bodies and full stores.
        assert!(store.gzip(&etag, &Bytes::from_static(b"{}")).is_none());
        let tiny = Precompressed::new(0);
        assert!(tiny.gzip(&etag, &body).is_none());
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

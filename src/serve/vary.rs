//! `Vary`: an origin answer that varies on request headers is stored once per variant.
//!
//! The first such answer for an entry leaves a *marker* at the entry's own key: the headers
//! it varies on and a nonce drawn then. Each variant is an entry of its own, at the logical
//! key `{entry}:vary-{nonce}{hash of the header values}` (see `hash`), reached only through the
//! marker. So every invalidation that reaches the entry reaches its variants: events bump
//! the counters both are stamped with, and a key or pattern invalidation deletes the marker,
//! after which the next answer draws a new nonce and the old variants cannot be reached
//! (they expire by their TTL).
//!
//! Only headers runcache forwards can be varied on (the origin sees no other); an answer that
//! varies on another, on `*`, or on `Cookie` is passed through and not stored. A variant of
//! `Authorization` is keyed by the credential's keyed hash, which is per process: such
//! variants are not shared between instances. `Accept-Encoding` is
//! runcache's own business: it compresses itself, so it needs no variants.

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::HeaderMap;

use super::{ReadThrough, ViewRequest, ViewResponse, request::VariantOf};
use crate::origin::{OriginClient, OriginError};
use crate::security::Credential;
use crate::store::{CacheEntry, VaryMarker};

/// What an origin answer's `Vary` asks of its storage.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Spec {
    /// Nothing (no `Vary`, or only `Accept-Encoding`).
    None,
    /// One entry per combination of these request headers (lower case, sorted).
    Fields(Vec<String>),
    /// Not storable: `*`, or a header runcache does not forward.
    Unstorable,
}

/// The storage `vary` asks for, given what `origin` forwards.
pub(super) fn spec(vary: Option<&str>, origin: &OriginClient) -> Spec {
    let Some(vary) = vary else {
        return Spec::None;
    };
    let mut fields: Vec<String> = vary
        .split(',')
        .map(|f| f.trim().to_ascii_lowercase())
        .filter(|f| !f.is_empty() && f != "accept-encoding" && !origin.ignores_vary(f))
        .collect();
    // Cookies have no keyed hash here, and a key must not be derived from a credential.
    if fields
        .iter()
        .any(|f| f == "*" || f == "cookie" || !origin.forwards(f))
    {
        return Spec::Unstorable;
    }
    fields.sort();
    fields.dedup();
    if fields.is_empty() {
        Spec::None
    } else {
        Spec::Fields(fields)
    }
}

/// Headers whose values are case-insensitive by definition (RFC 9110 sections 12.5.1-12.5.4:
/// media ranges, content codings, language ranges, and the parameters and weights between
/// them, around which whitespace is optional): their values are compared lower-cased with
/// whitespace removed. Every other header is compared byte for byte: the origin may well tell
/// `Acme` from `ACME` or `Ac me`.
const CASE_INSENSITIVE: [&str; 3] = ["accept", "accept-language", "accept-encoding"];

/// The hash of `headers`' values of `fields`, each header's lines in order, split at commas.
/// [`CASE_INSENSITIVE`] headers are normalised (`fr-CH, fr;q=0.9` and `FR-ch,fr; q=0.9` are
/// one variant); every other value is kept byte for byte, with at most the spaces and tabs
/// around its commas dropped (`a, b` and `a,b` are one variant; `Ac me`, `ACME` and `Acme`
/// are three). An absent header is its own value. `Authorization` counts as `cred`, its keyed
/// hash: no key is derived from a credential itself (SPEC section 4).
pub(super) fn hash(fields: &[String], headers: &HeaderMap, cred: Credential) -> u64 {
    let mut canonical: Vec<u8> = Vec::new();
    for field in fields {
        canonical.extend_from_slice(field.as_bytes());
        if field == "authorization" {
            canonical.extend_from_slice(b"\n#");
            canonical.extend_from_slice(cred.tag().as_bytes());
            canonical.push(b'\n');
            continue;
        }
        let lines = headers.get_all(field.as_str());
        if lines.iter().next().is_none() {
            canonical.extend_from_slice(b"\n-\n");
            continue;
        }
        let folded = CASE_INSENSITIVE.contains(&field.as_str());
        if folded {
            // One list across lines (RFC 9110 section 5.3), empty elements ignored.
            canonical.extend_from_slice(b"\n=");
            let elements: Vec<Vec<u8>> = lines
                .iter()
                .flat_map(|v| v.as_bytes().split(|b| *b == b','))
                .map(|e| {
                    e.iter()
                        .filter(|b| !b.is_ascii_whitespace())
                        .map(u8::to_ascii_lowercase)
                        .collect::<Vec<u8>>()
                })
                .filter(|e| !e.is_empty())
                .collect();
            canonical.extend_from_slice(&elements.join(&b',')[..]);
            canonical.push(b'\n');
            continue;
        }
        // Byte for byte, each line on its own (two lines are not one line joined: the origin
        // may read only the first), with only the spaces and tabs around commas dropped.
        // Header values hold no line feed, so the separators cannot be forged.
        for line in &lines {
            canonical.extend_from_slice(b"\n=");
            let elements: Vec<&[u8]> = line
                .as_bytes()
                .split(|b| *b == b',')
                .map(|e| e.trim_ascii_start().trim_ascii_end())
                .collect();
            canonical.extend_from_slice(&elements.join(&b',')[..]);
        }
        canonical.push(b'\n');
    }
    xxhash_rust::xxh3::xxh3_64(&canonical)
}

/// What a request that joined the fetch of an answer under `spec` must match to be given
/// it: `None`, nothing; the fields and the hash of the leader's values; or, for an answer
/// that varies on what runcache cannot key (`*`, credentials, headers it does not forward),
/// the `*` field, which nothing matches.
pub(super) fn shared_with(
    spec: &Spec,
    leader: &HeaderMap,
    cred: Credential,
) -> Option<(Arc<[String]>, u64)> {
    match spec {
        Spec::None => None,
        Spec::Fields(fields) => Some((Arc::from(fields.as_slice()), hash(fields, leader, cred))),
        Spec::Unstorable => Some((Arc::from(["*".to_owned()]), 0)),
    }
}

/// Why a request with `headers` and `cred` that joined a fetch may not be given its answer
/// `r` (it then asks the origin for itself), or `None`: it may. A cookie is for the request
/// that fetched it; an answer that varies goes only to requests with the same values.
pub(super) fn not_for_joiner(
    r: &ViewResponse,
    headers: &HeaderMap,
    cred: Credential,
) -> Option<&'static str> {
    if r.sets_cookie() {
        return Some("set-cookie");
    }
    match &r.variant {
        Some((fields, leader))
            if fields.iter().any(|f| f == "*") || hash(fields, headers, cred) != *leader =>
        {
            Some("vary")
        }
        _ => None,
    }
}

/// `entry` with the `Vary` its hits send, when its answer varies (`spec`).
pub(super) fn with_vary_header(entry: CacheEntry, spec: &Spec) -> CacheEntry {
    let Spec::Fields(fields) = spec else {
        return entry;
    };
    let Ok(value) = http::HeaderValue::from_str(&fields.join(", ")) else {
        return entry;
    };
    let mut headers = entry.headers.to_vec();
    headers.push((http::header::VARY, value));
    entry.with_headers(headers)
}

/// The logical key of a variant (only characters the keyspace allows).
pub(super) fn key(base: &str, nonce: u64, hash: u64) -> String {
    format!("{base}:vary-{nonce:016x}{hash:016x}")
}

/// A new marker for `fields`, with its first variant.
pub(super) fn new_marker(fields: Vec<String>, first: u64) -> VaryMarker {
    let mut nonce = [0u8; 8];
    // A nonce from the clock would do as well; randomness keeps two instances apart.
    if getrandom::fill(&mut nonce).is_err() {
        nonce = crate::domain::policy::now_ms().to_le_bytes();
    }
    VaryMarker {
        headers: fields,
        nonce: u64::from_le_bytes(nonce),
        variants: vec![first],
    }
}

/// `req` as the request for the variant of `marker_entry` (whose marker is `marker`) that
/// its headers select.
fn variant_request(
    mut req: ViewRequest,
    marker: &VaryMarker,
    marker_entry: &CacheEntry,
    cred: Credential,
) -> ViewRequest {
    let hash = hash(&marker.headers, &req.origin.headers, cred);
    req.logical_key = key(&req.logical_key, marker.nonce, hash);
    req.variant = Some(Arc::new(VariantOf {
        marker: marker_entry.clone(),
        hash,
    }));
    req
}

impl ReadThrough {
    /// Serves `req` through the marker found at its key: the variant its headers select, or,
    /// when the entry has every variant it may have and this is a new one, the origin's
    /// answer without storing it.
    pub(super) fn serve_variant(
        &self,
        req: ViewRequest,
        marker_entry: CacheEntry,
    ) -> BoxFuture<'_, Result<ViewResponse, OriginError>> {
        // Boxed with its type spelt out: it recurses (once) into `serve_inner`.
        async move { self.serve_variant_inner(req, marker_entry).await }.boxed()
    }

    async fn serve_variant_inner(
        &self,
        req: ViewRequest,
        marker_entry: CacheEntry,
    ) -> Result<ViewResponse, OriginError> {
        // A marker at a variant's key is never written; should one be read, nothing is stored.
        let marker = match (&req.variant, &marker_entry.vary) {
            (None, Some(m)) => m.clone(),
            _ => {
                let resp = self.fetch(req.view, req.origin).await?;
                return Ok(self.passthrough_miss(resp, Some("vary")));
            }
        };
        let cred = self.credential(&req);
        let variant = variant_request(req, &marker, &marker_entry, cred);
        let hash = variant.variant.as_ref().map_or(0, |v| v.hash);
        if !marker.variants.contains(&hash) && marker.variants.len() >= self.max_variants {
            self.stats.record_variant_refused();
            let resp = self.fetch(variant.view, variant.origin).await?;
            return Ok(self.passthrough_miss(resp, Some("too-many-variants")));
        }
        self.serve_inner(variant).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::CredentialHasher;

    fn hash_of(field: &str, lines: &[&str]) -> u64 {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(
                http::HeaderName::from_bytes(field.as_bytes()).expect("name"),
                http::HeaderValue::from_bytes(line.as_bytes()).expect("value"),
            );
        }
        hash(
            &[field.to_owned()],
            &headers,
            CredentialHasher::new().anonymous(),
        )
    }

    #[test]
    fn other_headers_are_compared_byte_for_byte() {
        let acme = hash_of("x-tenant", &["Acme"]);
        for other in ["ACME", "acme", "Ac me", "Acme.", ""] {
            assert_ne!(hash_of("x-tenant", &[other]), acme, "{other:?}");
        }
        assert_ne!(hash_of("x-tenant", &[]), hash_of("x-tenant", &[""]));
        // Only the whitespace around commas is dropped.
        assert_eq!(
            hash_of("x-tenant", &["a, b"]),
            hash_of("x-tenant", &["a,b"])
        );
        assert_eq!(
            hash_of("x-tenant", &["a ,\tb"]),
            hash_of("x-tenant", &["a,b"])
        );
        assert_ne!(hash_of("x-tenant", &["a b"]), hash_of("x-tenant", &["ab"]));
        assert_ne!(
            hash_of("x-tenant", &["a", "b"]),
            hash_of("x-tenant", &["a,b"])
        );
        // Bytes that are not visible ASCII are values too, not an absent header.
        assert_ne!(
            hash_of("x-tenant", &["caf\u{e9}"]),
            hash_of("x-tenant", &[])
        );
    }

    #[test]
    fn accept_headers_are_normalised() {
        for field in ["accept", "accept-language"] {
            let a = hash_of(field, &["fr-CH, fr;q=0.9"]);
            assert_eq!(hash_of(field, &["FR-ch,fr; q=0.9"]), a, "{field}");
            assert_eq!(hash_of(field, &["fr-CH", "fr;q=0.9"]), a, "{field}");
            assert_ne!(hash_of(field, &["fr"]), a, "{field}");
        }
    }
}

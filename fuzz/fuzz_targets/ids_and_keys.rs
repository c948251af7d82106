//! Run ids, logical keys and key versions are accepted exactly when they match their
//! documented grammars, and `CacheEntry::decode` never panics on arbitrary bytes, while
//! `encode` → `decode` round-trips.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use runcache::cache::{
    CacheEntry, MAX_KEY_LEN, validate_logical_key, validate_run_id, validate_version,
};

#[derive(Arbitrary, Debug)]
struct Entry {
    status: u16,
    content_type: String,
    etag: String,
    stored_at_ms: u64,
    ttl_secs: u64,
    stale_ms: u64,
    tags: Vec<String>,
    gens: Vec<u64>,
    body: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    run_id: String,
    key: String,
    version: String,
    entry: Entry,
    raw: Vec<u8>,
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`, by hand.
fn is_run_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`, by hand.
fn is_version(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `[A-Za-z0-9_.:-]{1,512}`, by hand.
fn is_logical_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_KEY_LEN
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b':'))
}

fn check_strings(s: &str) {
    let ok = validate_run_id(s).is_ok();
    assert_eq!(ok, is_run_id(s), "validate_run_id({s:?})");
    if ok {
        assert!(s != "." && s != "..", "accepted run id {s:?}");
    }
    assert_eq!(
        validate_logical_key(s).is_ok(),
        is_logical_key(s),
        "validate_logical_key({s:?})"
    );
    assert_eq!(
        validate_version(s).is_ok(),
        is_version(s),
        "validate_version({s:?})"
    );
}

fn check_decode(raw: Bytes) {
    if let Ok(entry) = CacheEntry::decode(raw) {
        // Whatever decodes re-encodes to something that decodes to the same entry.
        let again = CacheEntry::decode(entry.encode()).expect("re-encoded entry decodes");
        assert_eq!(again, entry);
    }
}

fuzz_target!(|data: &[u8]| {
    // The raw bytes, as a decode input and (lossily) as ids, keys and versions.
    check_decode(Bytes::copy_from_slice(data));
    for magic in [b"RC1", b"RC2", b"RC3"] {
        let mut framed = magic.to_vec();
        framed.extend_from_slice(data);
        check_decode(Bytes::from(framed));
    }
    check_strings(&String::from_utf8_lossy(data));

    let Ok(input) = Input::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    check_strings(&input.run_id);
    check_strings(&input.key);
    check_strings(&input.version);
    check_decode(Bytes::from(input.raw));

    let e = input.entry;
    let entry = CacheEntry {
        status: e.status,
        content_type: e.content_type,
        etag: e.etag,
        stored_at_ms: e.stored_at_ms,
        ttl_secs: e.ttl_secs,
        stale_ms: e.stale_ms,
        tags: e.tags,
        gens: e.gens,
        body: Bytes::from(e.body),
    };
    let encoded = entry.encode();
    assert!(encoded.starts_with(b"RC3"));
    let back = CacheEntry::decode(encoded.clone()).expect("an encoded entry decodes");
    assert_eq!(back, entry);
    // Truncated encodings never panic.
    for cut in [
        0,
        3,
        6,
        7,
        encoded.len() / 2,
        encoded.len().saturating_sub(1),
    ] {
        let _ = CacheEntry::decode(encoded.slice(..cut.min(encoded.len())));
    }
});

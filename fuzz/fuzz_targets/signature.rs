//! `verify_signature` never panics; a correct signature with `now == ts` verifies; changing
//! one hex digit's value never verifies; and every signature string it accepts for a message
//! has the replay key of that message's canonical signature, so the replay guard in
//! `check_event` cannot be side-stepped by re-spelling a captured signature.
#![no_main]

use arbitrary::Arbitrary;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use runcache::http::auth::{replay_key, verify_signature};
use sha2::Sha256;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    secret: &'a [u8],
    timestamp: &'a str,
    signature: &'a str,
    body: &'a [u8],
    now: i64,
    tolerance: u64,
    ts: i64,
    flip_at: u8,
    flip_by: u8,
    edits: Vec<(u16, u8)>,
}

fn mac(secret: &[u8], ts: &str, body: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("{ts}.").as_bytes());
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The header value a correct sender puts in `X-Runcache-Signature`.
fn canonical(secret: &[u8], ts: &str, body: &[u8]) -> String {
    format!("sha256={}", hex(&mac(secret, ts, body)))
}

fuzz_target!(|input: Input<'_>| {
    let Input {
        secret,
        timestamp,
        signature,
        body,
        now,
        tolerance,
        ts,
        flip_at,
        flip_by,
        edits,
    } = input;

    // Arbitrary fields: never panics, and accepts only the canonical signature of a fresh
    // timestamp.
    if verify_signature(secret, timestamp, signature, body, now, tolerance).is_ok() {
        let parsed: i64 = timestamp.trim().parse().expect("accepted a bad timestamp");
        assert!(
            now.abs_diff(parsed) <= tolerance,
            "accepted a stale timestamp"
        );
        assert_eq!(
            replay_key(signature),
            replay_key(&canonical(secret, timestamp.trim(), body)),
            "accepted a non-canonical signature"
        );
    }

    // A correct signature verifies, at any tolerance.
    let ts_str = ts.to_string();
    let good = canonical(secret, &ts_str, body);
    assert_eq!(
        verify_signature(secret, &ts_str, &good, body, ts, 0),
        Ok(())
    );
    assert_eq!(
        verify_signature(secret, &ts_str, &good, body, ts, tolerance),
        Ok(())
    );

    // Changing the value of one hex digit never verifies.
    let pos = "sha256=".len() + usize::from(flip_at) % 64;
    let mut flipped = good.clone().into_bytes();
    let old = char::from(flipped[pos]).to_digit(16).expect("hex digit");
    let new = (old + 1 + u32::from(flip_by) % 15) % 16;
    flipped[pos] = char::from_digit(new, 16).expect("nibble") as u8;
    let flipped = String::from_utf8(flipped).expect("ascii");
    assert!(verify_signature(secret, &ts_str, &flipped, body, ts, tolerance).is_err());

    // Any re-spelling of the correct signature that still verifies must be the same
    // signature as far as the replay guard is concerned.
    let mut edited = good.clone().into_bytes();
    for &(at, byte) in edits.iter().take(4) {
        let at = usize::from(at) % (edited.len() + 1);
        if at == edited.len() {
            edited.push(byte);
        } else {
            edited[at] = byte;
        }
    }
    if let Ok(edited) = String::from_utf8(edited)
        && verify_signature(secret, &ts_str, &edited, body, ts, tolerance).is_ok()
    {
        assert_eq!(
            replay_key(&edited),
            replay_key(&good),
            "{edited:?} verifies like {good:?} but is a different replay key"
        );
    }
});

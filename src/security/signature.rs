//! Signed events, as Stripe and GitHub webhooks are signed: `X-Runcache-Timestamp` and
//! `X-Runcache-Signature: sha256=<hex of HMAC-SHA256(events.secret, "<timestamp>.<raw body>")>`,
//! a timestamp tolerance, and single use: a signature counts as used only once the
//! invalidation it carries has been applied ([`Deliveries`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sha2::Sha256;
use tokio::sync::OnceCell;

/// Header carrying the Unix time a signed event was signed at.
pub const TIMESTAMP_HEADER: &str = "x-runcache-timestamp";
/// Header carrying `sha256=<hex of HMAC-SHA256(events.secret, "<timestamp>.<raw body>")>`.
pub const SIGNATURE_HEADER: &str = "x-runcache-signature";

/// Checks a signed event: the timestamp is within `tolerance_secs` of `now_secs` in either
/// direction, and the signature is the HMAC-SHA256 of `"<timestamp>.<raw body>"`.
pub fn verify_signature(
    secret: &[u8],
    timestamp: &str,
    signature: &str,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: u64,
) -> Result<(), &'static str> {
    use hmac::Mac;
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| "X-Runcache-Timestamp must be Unix seconds")?;
    if now_secs.abs_diff(ts) > tolerance_secs {
        return Err("X-Runcache-Timestamp is outside the accepted tolerance");
    }
    let given = signature
        .trim()
        .strip_prefix("sha256=")
        .and_then(decode_hex)
        .ok_or("X-Runcache-Signature must be sha256=<hex>")?;
    // `verify_slice` compares in constant time.
    keyed(secret, &[timestamp.trim().as_bytes(), b".", body])
        .ok_or("invalid signing key")?
        .verify_slice(&given)
        .map_err(|_| "invalid signature")
}

/// Signs `body` as [`verify_signature`] checks it: `sha256=<hex of HMAC-SHA256(secret,
/// "<timestamp>.<body>")>`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    use hmac::Mac;
    keyed(secret, &[timestamp.as_bytes(), b".", body]).map_or_else(String::new, |mac| {
        format!(
            "sha256={}",
            crate::domain::hex(&mac.finalize().into_bytes())
        )
    })
}

/// A key for one `purpose`, derived from `secret` (HMAC-SHA256 of the purpose under the
/// secret), so that a key given to one party reveals nothing of the secret it came from.
pub fn derive_key(secret: &[u8], purpose: &str) -> Vec<u8> {
    use hmac::Mac;
    keyed(secret, &[purpose.as_bytes()])
        .map_or_else(Vec::new, |mac| mac.finalize().into_bytes().to_vec())
}

/// The hex HMAC-SHA256 of `parts` (each length-prefixed, so that no two lists of parts
/// share one) under `secret`.
pub fn mac_hex(secret: &[u8], parts: &[&[u8]]) -> String {
    use hmac::Mac;
    let lengths: Vec<[u8; 8]> = parts
        .iter()
        .map(|p| (p.len() as u64).to_be_bytes())
        .collect();
    let mut framed: Vec<&[u8]> = Vec::with_capacity(parts.len() * 2);
    for (len, part) in lengths.iter().zip(parts) {
        framed.push(len);
        framed.push(part);
    }
    keyed(secret, &framed).map_or_else(String::new, |mac| {
        crate::domain::hex(&mac.finalize().into_bytes())
    })
}

/// HMAC-SHA256 under `secret`, fed `parts` in order (`None` never happens: HMAC takes a key
/// of any length).
fn keyed(secret: &[u8], parts: &[&[u8]]) -> Option<hmac::Hmac<Sha256>> {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
    for part in parts {
        mac.update(part);
    }
    Some(mac)
}

/// What a used signature is remembered by: trimmed, its hex in lowercase, so that a captured
/// signature cannot be replayed re-spelt (`A-F` for `a-f`), as `verify_signature` takes both.
pub fn replay_key(signature: &str) -> String {
    signature.trim().to_ascii_lowercase()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    // Hex digits only: `u8::from_str_radix` alone would also take a sign (`+a` as `0a`).
    if !s.len().is_multiple_of(2) || s.len() > 256 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// Current Unix time in seconds.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Signed deliveries within the tolerance window, so that each is applied at most once.
///
/// A signature counts as used only once its invalidation has been applied: a delivery that
/// failed (the sender saw a 5xx) may be retried with the same signature. A second delivery
/// of an applied event is answered with the first delivery's figure and applies nothing
/// again, as webhook receivers do; one that arrives while the first is being applied waits
/// for it.
#[derive(Clone)]
pub struct Deliveries {
    seen: moka::sync::Cache<String, Arc<OnceCell<u64>>>,
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries").finish_non_exhaustive()
    }
}

/// The outcome of [`Deliveries::apply_once`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// What the (first) application answered.
    pub invalidated: u64,
    /// Whether this delivery repeated one already applied (nothing was applied now).
    pub repeated: bool,
}

impl Deliveries {
    /// Remembers deliveries for twice the tolerance (clock skew goes both ways).
    pub fn new(tolerance_secs: u64) -> Self {
        Self {
            seen: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(Duration::from_secs(tolerance_secs.saturating_mul(2).max(1)))
                .build(),
        }
    }

    /// Runs `apply` for the delivery signed `signature` unless it was applied already.
    /// A failed `apply` records nothing, so the same delivery may be retried.
    pub async fn apply_once<F, Fut, E>(&self, signature: &str, apply: F) -> Result<Delivery, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<u64, E>>,
    {
        let cell = self
            .seen
            .get_with(replay_key(signature), || Arc::new(OnceCell::new()));
        let mut ran = false;
        let invalidated = *cell
            .get_or_try_init(|| {
                ran = true;
                apply()
            })
            .await?;
        Ok(Delivery {
            invalidated,
            repeated: !ran,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_within_the_tolerance_only() {
        let body = br#"{"model_run_id": "42"}"#;
        let sig = sign(b"s3cret", "1700000000", body);
        assert_eq!(
            verify_signature(b"s3cret", "1700000000", &sig, body, 1_700_000_100, 300),
            Ok(())
        );
        assert_eq!(
            verify_signature(b"s3cret", "1700000000", &sig, body, 1_699_999_800, 300),
            Ok(())
        );
        assert!(verify_signature(b"s3cret", "1700000000", &sig, body, 1_700_000_301, 300).is_err());
        assert!(verify_signature(b"s3cret", "1700000000", &sig, body, 1_699_999_699, 300).is_err());
        assert!(verify_signature(b"other", "1700000000", &sig, body, 1_700_000_000, 300).is_err());
        assert!(
            verify_signature(b"s3cret", "1700000000", &sig, b"{}", 1_700_000_000, 300).is_err()
        );
        for bad in ["", "sha256=", "sha256=zz", "md5=00", "sha256=é0"] {
            assert!(
                verify_signature(b"s3cret", "1700000000", bad, body, 1_700_000_000, 300).is_err(),
                "{bad}"
            );
        }
        assert!(verify_signature(b"s3cret", "soon", &sig, body, 1_700_000_000, 300).is_err());
    }

    /// Found by `fuzz/fuzz_targets/signature.rs`: `+d` was read as the byte `0d`, so a
    /// captured signature re-spelt with `+` passed the replay guard.
    #[test]
    fn signed_hex_digits_do_not_verify() {
        let (secret, ts, body) = (b"\x9b", "-9211221148451176405", b"\xff\xff+\x80\0");
        let sig = sign(secret, ts, body);
        assert_eq!(&sig[35..37], "0d");
        let respelt = format!("{}+{}", &sig[..35], &sig[36..]);
        assert_eq!(
            verify_signature(secret, ts, &sig, body, -9211221148451176405, 0),
            Ok(())
        );
        assert!(verify_signature(secret, ts, &respelt, body, -9211221148451176405, 0).is_err());
    }

    /// Found by `fuzz/fuzz_targets/signature.rs`: upper-case hex verifies too, so the replay
    /// guard must remember a signature by its lower-case form.
    #[test]
    fn upper_case_hex_has_the_same_replay_key() {
        let sig = sign(b"", "-214", b"");
        let upper = format!("{}F{}", &sig[..62], &sig[63..]);
        assert_eq!(&sig[62..63], "f");
        assert_eq!(verify_signature(b"", "-214", &upper, b"", -214, 0), Ok(()));
        assert_eq!(replay_key(&upper), replay_key(&sig));
        let all_upper = format!(" sha256={} ", sig[7..].to_uppercase());
        assert_eq!(
            verify_signature(b"", "-214", &all_upper, b"", -214, 0),
            Ok(())
        );
        assert_eq!(replay_key(&all_upper), replay_key(&sig));
    }

    #[tokio::test]
    async fn a_delivery_is_applied_once_and_only_once_it_succeeded() {
        let deliveries = Deliveries::new(300);
        let failed: Result<Delivery, &str> =
            deliveries.apply_once("sig", || async { Err("down") }).await;
        assert!(failed.is_err());
        let first = deliveries
            .apply_once("sig", || async { Ok::<_, &str>(3) })
            .await;
        assert_eq!(
            first,
            Ok(Delivery {
                invalidated: 3,
                repeated: false
            })
        );
        let again = deliveries
            .apply_once("SIG", || async { Ok::<_, &str>(99) })
            .await;
        assert_eq!(
            again,
            Ok(Delivery {
                invalidated: 3,
                repeated: true
            })
        );
    }
}

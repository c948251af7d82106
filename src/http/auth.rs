//! Authentication of admin routes (bearer token) and events (bearer token, or an HMAC
//! signature as Stripe and GitHub webhooks use). Secrets are compared in constant time.

use axum::extract::FromRequestParts;
use http::header;
use http::request::Parts;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::AppError;
use crate::state::AppState;

/// Proof that the request carried `Authorization: Bearer <admin.token>`.
#[derive(Debug, Clone, Copy)]
pub struct AdminAuth;

/// Compares two secrets in constant time. Hashing first makes the comparison independent of
/// where the first difference is and of the lengths.
pub fn secrets_match(given: &[u8], expected: &[u8]) -> bool {
    Sha256::digest(given)
        .ct_eq(&Sha256::digest(expected))
        .into()
}

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
    use hmac::{Hmac, Mac};
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
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "invalid signing key")?;
    mac.update(timestamp.trim().as_bytes());
    mac.update(b".");
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&given).map_err(|_| "invalid signature")
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

/// Checks `Authorization: Bearer <admin.token>`.
pub fn check_bearer(headers: &http::HeaderMap, state: &AppState) -> Result<(), AppError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(AppError::Unauthorized(
            "missing Authorization: Bearer <token>",
        ))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or(AppError::Unauthorized(
            "expected Authorization: Bearer <token>",
        ))?;
    if secrets_match(
        token.as_bytes(),
        state.admin_token.expose_secret().as_bytes(),
    ) {
        Ok(())
    } else {
        Err(AppError::Unauthorized("invalid token"))
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Authorises an event: a valid, fresh, never-seen signature over the raw body (when
/// `events.secret` is set and the request is signed), or else the admin bearer token.
/// Returns how (`signature` or `token`).
pub fn check_event(
    headers: &http::HeaderMap,
    body: &[u8],
    state: &AppState,
) -> Result<&'static str, AppError> {
    let signed = headers.contains_key(SIGNATURE_HEADER) || headers.contains_key(TIMESTAMP_HEADER);
    let Some(secret) = state.settings.events.secret.as_ref().filter(|_| signed) else {
        return check_bearer(headers, state).map(|()| "token");
    };
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(ts), Some(sig)) = (get(TIMESTAMP_HEADER), get(SIGNATURE_HEADER)) else {
        return Err(AppError::Unauthorized(
            "signed events need both X-Runcache-Timestamp and X-Runcache-Signature",
        ));
    };
    verify_signature(
        secret.expose_secret().as_bytes(),
        ts,
        sig,
        body,
        now_secs(),
        state.settings.events.tolerance_secs,
    )
    .map_err(AppError::Unauthorized)?;
    if !state.seen_signatures.first_use(&replay_key(sig)) {
        return Err(AppError::Unauthorized("signature already used (replay)"));
    }
    Ok("signature")
}

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        check_bearer(&parts.headers, state).map(|()| AdminAuth)
    }
}

/// Who made an admin or event request, for audit lines: the token's id (a short hash, never
/// the token) or `signature`, and the client address.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Client address, or `-` when unknown.
    pub addr: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Caller {
            addr: super::limits::peer(&parts.extensions)
                .map_or_else(|| "-".to_owned(), |a| a.to_string()),
        })
    }
}

/// The id under which the admin token appears in audit lines: the first 8 hex digits of its
/// SHA-256.
pub fn token_id(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    format!("token:{}", &crate::cache::hex(&digest)[..8])
}

/// Writes one audit line (target `audit`).
pub fn audit(who: &str, caller: &Caller, action: &str, target: &str, entries: u64) {
    tracing::info!(target: "audit", who, addr = %caller.addr, action, target, entries, "admin action");
}

/// Signatures accepted within the tolerance window, so a captured signed request cannot be
/// replayed even before its timestamp goes stale.
#[derive(Clone)]
pub struct SeenSignatures {
    seen: moka::sync::Cache<String, ()>,
}

impl std::fmt::Debug for SeenSignatures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeenSignatures").finish_non_exhaustive()
    }
}

impl SeenSignatures {
    /// Remembers signatures for twice the tolerance (clock skew goes both ways).
    pub fn new(tolerance_secs: u64) -> Self {
        Self {
            seen: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(std::time::Duration::from_secs(
                    tolerance_secs.saturating_mul(2).max(1),
                ))
                .build(),
        }
    }

    /// Records `signature`; false when it was seen before.
    pub fn first_use(&self, signature: &str) -> bool {
        self.seen
            .entry(signature.to_owned())
            .or_insert(())
            .is_fresh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], ts: &str, body: &[u8]) -> String {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("key");
        mac.update(format!("{ts}.").as_bytes());
        mac.update(body);
        format!("sha256={}", crate::cache::hex(&mac.finalize().into_bytes()))
    }

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

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(secrets_match(b"abc", b"abc"));
        assert!(!secrets_match(b"abc", b"abd"));
        assert!(!secrets_match(b"abc", b"abcd"));
        assert!(!secrets_match(b"", b"abc"));
    }
}

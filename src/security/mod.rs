//! Security helpers shared by the HTTP edge and the serving layer: constant-time secret
//! comparison, token ids for audit lines, event signatures and their single use
//! ([`signature`]), caller credentials as keyed hashes and local JWT verification
//! ([`credential`]), and the limits that keep the service up under abuse ([`limits`]).
//! Depends on nothing but the domain, so `state` and `http` both build on it.

pub mod credential;
pub mod limits;
pub mod signature;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use credential::{Credential, CredentialHasher, JwtVerifier};
pub use limits::{Limits, RateClass};
pub use signature::{Deliveries, replay_key, verify_signature};

/// The request's `Authorization` header (`None`: absent), or `Err` when it carries more than
/// one: a check would read one of them while the origin is sent both, so a request with two
/// is refused wherever credentials count (views, admin routes, events).
pub fn single_authorization(
    headers: &http::HeaderMap,
) -> Result<Option<&http::HeaderValue>, &'static str> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let first = values.next();
    match values.next() {
        None => Ok(first),
        Some(_) => Err("more than one Authorization header"),
    }
}

/// Compares two secrets in constant time. Hashing first makes the comparison independent of
/// where the first difference is and of the lengths.
pub fn secrets_match(given: &[u8], expected: &[u8]) -> bool {
    Sha256::digest(given)
        .ct_eq(&Sha256::digest(expected))
        .into()
}

/// The id under which a token appears in audit lines: `token:` and the first 8 hex digits of
/// its SHA-256 (never the token).
pub fn token_id(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    format!("token:{}", &crate::domain::hex(&digest)[..8])
}

/// 32 random bytes, hex-encoded (a generated admin token).
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness is a broken host; a v4 UUID pair still comes from a CSPRNG-seeded source.
        let a = uuid::Uuid::new_v4();
        let b = uuid::Uuid::new_v4();
        bytes[..16].copy_from_slice(a.as_bytes());
        bytes[16..].copy_from_slice(b.as_bytes());
    }
    crate::domain::hex(&bytes)
}

/// `Authorization: Bearer <token>`'s token, if the header has that form.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    authorization
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(secrets_match(b"abc", b"abc"));
        assert!(!secrets_match(b"abc", b"abd"));
        assert!(!secrets_match(b"abc", b"abcd"));
        assert!(!secrets_match(b"", b"abc"));
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}

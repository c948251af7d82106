//! Caller credentials: the `Authorization` header (or its absence) as a keyed hash, so a
//! credential is never kept in the clear; and local verification of bearer JWTs
//! (`auth.frontend = jwt`).

use http::HeaderValue;
use sha2::Sha256;

/// A caller's credentials as a keyed hash: never the credential itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Credential(u128);

impl Credential {
    /// Hex form, for single-flight keys.
    pub fn tag(self) -> String {
        format!("{:032x}", self.0)
    }
}

/// Hashes credentials under a random per-process key (HMAC-SHA256), so that neither Redis
/// nor a memory dump ever holds one in the clear, and another process hashes them differently.
pub struct CredentialHasher {
    key: [u8; 32],
    /// The credential of callers without `Authorization`, hashed once.
    anonymous: Credential,
}

impl std::fmt::Debug for CredentialHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialHasher").finish_non_exhaustive()
    }
}

impl Default for CredentialHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl CredentialHasher {
    /// A hasher with a fresh random key.
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        if getrandom::fill(&mut key).is_err() {
            key.copy_from_slice(
                &xxhash_rust::xxh3::xxh3_128(uuid::Uuid::new_v4().as_bytes())
                    .to_le_bytes()
                    .repeat(2),
            );
        }
        Self {
            anonymous: hash(&key, None),
            key,
        }
    }

    /// The keyed hash of an `Authorization` header (or of its absence).
    pub fn credential(&self, authorization: Option<&HeaderValue>) -> Credential {
        match authorization {
            None => self.anonymous,
            some => hash(&self.key, some),
        }
    }

    /// The credential of callers that send no `Authorization` (and of warming).
    pub fn anonymous(&self) -> Credential {
        self.anonymous
    }
}

/// The keyed hash of `authorization` (or its absence) under `key`.
fn hash(key: &[u8; 32], authorization: Option<&HeaderValue>) -> Credential {
    use hmac::{Hmac, Mac};
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return Credential(0);
    };
    match authorization {
        Some(v) => {
            mac.update(b"A");
            mac.update(v.as_bytes());
        }
        None => mac.update(b"-"),
    }
    let bytes = mac.finalize().into_bytes();
    let mut first = [0u8; 16];
    first.copy_from_slice(&bytes[..16]);
    Credential(u128::from_le_bytes(first))
}

/// Local verification of bearer JWTs (`auth.frontend = jwt`).
pub struct JwtVerifier {
    key: jsonwebtoken::DecodingKey,
    validation: jsonwebtoken::Validation,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// A verifier for `algorithm` (`HS256` with `secret`; `RS256`/`ES256` with a PEM public
    /// key), checking `exp` and `nbf` with `leeway_secs`, and `aud`/`iss` when given.
    pub fn new(
        algorithm: &str,
        secret: Option<&[u8]>,
        public_key_pem: Option<&[u8]>,
        audience: Option<&str>,
        issuer: Option<&str>,
        leeway_secs: u64,
    ) -> Result<Self, String> {
        use jsonwebtoken::{Algorithm, DecodingKey};
        let (alg, key) = match algorithm {
            "HS256" => (
                Algorithm::HS256,
                DecodingKey::from_secret(secret.ok_or("HS256 needs auth.jwt_secret")?),
            ),
            "RS256" => (
                Algorithm::RS256,
                DecodingKey::from_rsa_pem(
                    public_key_pem.ok_or("RS256 needs auth.jwt_public_key_path")?,
                )
                .map_err(|e| format!("the RS256 public key is not a valid PEM: {e}"))?,
            ),
            "ES256" => (
                Algorithm::ES256,
                DecodingKey::from_ec_pem(
                    public_key_pem.ok_or("ES256 needs auth.jwt_public_key_path")?,
                )
                .map_err(|e| format!("the ES256 public key is not a valid PEM: {e}"))?,
            ),
            other => return Err(format!("{other:?} is not HS256, RS256 or ES256")),
        };
        let mut validation = jsonwebtoken::Validation::new(alg);
        validation.validate_nbf = true;
        validation.leeway = leeway_secs;
        match audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Self { key, validation })
    }

    /// Verifies `Authorization: Bearer <jwt>`; the error says why, without echoing the token.
    pub fn verify(&self, authorization: Option<&HeaderValue>) -> Result<(), &'static str> {
        use jsonwebtoken::errors::ErrorKind;
        let token = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(super::bearer_token)
            .ok_or("a bearer JWT is required")?;
        jsonwebtoken::decode::<serde_json::Value>(token, &self.key, &self.validation)
            .map(|_| ())
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => "the JWT has expired",
                ErrorKind::ImmatureSignature => "the JWT is not valid yet (nbf)",
                ErrorKind::InvalidAudience => "the JWT audience is not accepted",
                ErrorKind::InvalidIssuer => "the JWT issuer is not accepted",
                ErrorKind::InvalidSignature => "the JWT signature is invalid",
                ErrorKind::MissingRequiredClaim(_) => "the JWT lacks a required claim (exp)",
                _ => "the JWT is invalid",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_keyed_hashes_and_distinct() {
        let a = CredentialHasher::new();
        let b = CredentialHasher::new();
        let token = HeaderValue::from_static("Bearer A");
        assert_eq!(a.credential(Some(&token)), a.credential(Some(&token)));
        assert_ne!(a.credential(Some(&token)), a.anonymous());
        // Another process (another key) hashes the same token differently.
        assert_ne!(a.credential(Some(&token)), b.credential(Some(&token)));
    }
}

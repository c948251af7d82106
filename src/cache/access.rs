//! Frontend access control (SPEC section 4, `auth.frontend`): runcache must never become a
//! way around the origin's access control.
//!
//! In `forward` mode a cached answer is served only to credentials (the `Authorization`
//! header, or its absence) that the origin accepted for that same entry within
//! `auth.validation_ttl`; other credentials go to the origin first. Credentials are kept only
//! as keyed hashes (HMAC-SHA256 under a random per-process key), in memory, per instance.

use std::time::{Duration, Instant};

use http::HeaderValue;
use sha2::Sha256;

/// How cached views are protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrontendAuth {
    /// Serve a hit only to credentials the origin accepted for the entry.
    Forward,
    /// Verify the bearer JWT locally; any valid token may read cached views.
    Jwt,
    /// Public views.
    None,
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
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
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

/// A caller's credentials as a keyed hash: never the credential itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Credential(u128);

impl Credential {
    /// Short hex form, for single-flight keys.
    pub fn tag(self) -> String {
        format!("{:032x}", self.0)
    }
}

/// Which credentials the origin accepted for which entries, recently.
pub struct AccessControl {
    mode: FrontendAuth,
    jwt: Option<std::sync::Arc<JwtVerifier>>,
    key: [u8; 32],
    /// The credential of callers without `Authorization`, hashed once.
    anonymous: Credential,
    validation_ttl: Duration,
    /// When the origin accepted a credential for an entry.
    accepted: moka::sync::Cache<(String, Credential), Instant>,
}

impl std::fmt::Debug for AccessControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessControl")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl AccessControl {
    /// Access control in `mode`, remembering acceptances for `validation_ttl`; `jwt` is the
    /// verifier of `jwt` mode.
    pub fn new(
        mode: FrontendAuth,
        validation_ttl: Duration,
        jwt: Option<std::sync::Arc<JwtVerifier>>,
    ) -> Self {
        let mut key = [0u8; 32];
        if getrandom::fill(&mut key).is_err() {
            key.copy_from_slice(
                &xxhash_rust::xxh3::xxh3_128(uuid::Uuid::new_v4().as_bytes())
                    .to_le_bytes()
                    .repeat(2),
            );
        }
        // Bounded so that instants computed from it cannot overflow.
        let validation_ttl = validation_ttl.clamp(
            Duration::from_secs(1),
            Duration::from_secs(10 * 365 * 86_400),
        );
        Self {
            mode,
            jwt,
            anonymous: hash_credential(&key, None),
            key,
            validation_ttl,
            accepted: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(validation_ttl)
                .build(),
        }
    }

    /// The mode.
    pub fn mode(&self) -> FrontendAuth {
        self.mode
    }

    /// In `jwt` mode, refuses a request without a valid bearer JWT (before any cache or
    /// origin work); other modes admit every request here.
    pub fn admit(&self, authorization: Option<&HeaderValue>) -> Result<(), &'static str> {
        match (&self.mode, &self.jwt) {
            (FrontendAuth::Jwt, Some(v)) => v.verify(authorization),
            (FrontendAuth::Jwt, None) => Err("JWT verification is not configured"),
            _ => Ok(()),
        }
    }

    /// The keyed hash of an `Authorization` header (or of its absence).
    pub fn credential(&self, authorization: Option<&HeaderValue>) -> Credential {
        match authorization {
            None => self.anonymous,
            some => hash_credential(&self.key, some),
        }
    }

    /// The credential of callers that send no `Authorization` (and of warming).
    pub fn anonymous(&self) -> Credential {
        self.credential(None)
    }

    /// Whether a cached copy of `key` may be served to `cred` without asking the origin.
    pub fn may_serve(&self, key: &str, cred: Credential) -> bool {
        match self.mode {
            // jwt: the token was verified locally before we got here.
            FrontendAuth::None | FrontendAuth::Jwt => true,
            FrontendAuth::Forward => self.accepted_until(key, cred).is_some(),
        }
    }

    /// Until when `cred` may be served `key` without asking the origin again (`forward` mode;
    /// `None` when it may not be now). Always `None` in the other modes, which do not ask.
    pub fn accepted_until(&self, key: &str, cred: Credential) -> Option<Instant> {
        let until = self.accepted.get(&(key.to_owned(), cred))? + self.validation_ttl;
        (Instant::now() < until).then_some(until)
    }

    /// Records that the origin accepted `cred` for `key` (it answered, other than 401/403).
    pub fn accepted(&self, key: &str, cred: Credential) {
        if self.mode == FrontendAuth::Forward {
            self.accepted.insert((key.to_owned(), cred), Instant::now());
        }
    }

    /// The single-flight key: per entry and credential in `forward` mode, so an answer is
    /// shared only between requests carrying the same credentials.
    pub fn flight_key(&self, key: &str, cred: Credential) -> String {
        match self.mode {
            FrontendAuth::None => key.to_owned(),
            // jwt too: an origin refusal for one token is never handed to another.
            FrontendAuth::Forward | FrontendAuth::Jwt => format!("{key}#{}", cred.tag()),
        }
    }
}

/// The keyed hash of `authorization` (or its absence) under `key`.
fn hash_credential(key: &[u8; 32], authorization: Option<&HeaderValue>) -> Credential {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_keyed_hashes_and_distinct() {
        let a = AccessControl::new(FrontendAuth::Forward, Duration::from_secs(60), None);
        let b = AccessControl::new(FrontendAuth::Forward, Duration::from_secs(60), None);
        let token = HeaderValue::from_static("Bearer A");
        assert_eq!(a.credential(Some(&token)), a.credential(Some(&token)));
        assert_ne!(a.credential(Some(&token)), a.anonymous());
        // Another process (another key) hashes the same token differently.
        assert_ne!(a.credential(Some(&token)), b.credential(Some(&token)));
    }

    #[test]
    fn forward_serves_only_accepted_credentials() {
        let ac = AccessControl::new(FrontendAuth::Forward, Duration::from_secs(60), None);
        let a = ac.credential(Some(&HeaderValue::from_static("Bearer A")));
        let b = ac.credential(Some(&HeaderValue::from_static("Bearer B")));
        assert!(!ac.may_serve("k", a));
        ac.accepted("k", a);
        assert!(ac.may_serve("k", a));
        assert!(!ac.may_serve("k", b));
        assert!(!ac.may_serve("other", a));
        assert_ne!(ac.flight_key("k", a), ac.flight_key("k", b));
    }

    #[test]
    fn none_serves_everyone() {
        let ac = AccessControl::new(FrontendAuth::None, Duration::from_secs(60), None);
        assert!(ac.may_serve("k", ac.anonymous()));
        assert_eq!(ac.flight_key("k", ac.anonymous()), "k");
    }
}

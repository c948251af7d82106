//! Frontend access control (SPEC section 4, `auth.frontend`): runcache must never become a
//! way around the origin's access control.
//!
//! In `forward` mode a cached answer goes only to credentials (the `Authorization` header, or
//! its absence) that the origin accepted *for that same entry* within `auth.validation_ttl`.
//! Only an answer that would itself be stored accepts: a 2xx that the entry holds, recorded
//! with its status. Any other answer (401, 403, a 404 that hides the run or is kept for
//! negative caching, 429, 3xx, 5xx, `no-store`) withdraws the acceptance. Credentials are kept only as keyed
//! hashes ([`crate::security::credential`]), in memory, per instance.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;

use crate::domain::FrontendAuth;
use crate::security::{Credential, CredentialHasher, JwtVerifier};

/// Which credentials the origin accepted for which entries, recently.
pub struct AccessControl {
    mode: FrontendAuth,
    jwt: Option<Arc<JwtVerifier>>,
    hasher: CredentialHasher,
    validation_ttl: Duration,
    /// When the origin accepted a credential for an entry, and with which status.
    accepted: moka::sync::Cache<Accepted, (Instant, u16), foldhash::fast::RandomState>,
}

/// An entry's key and a credential: what an acceptance is kept under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Accepted(String, Credential);

/// An entry's key and a credential, however held: a hit looks its acceptance up by the key
/// it has (`&str`), without copying it into a `String`.
trait AcceptedKey {
    fn key(&self) -> &str;
    fn cred(&self) -> Credential;
}

impl AcceptedKey for Accepted {
    fn key(&self) -> &str {
        &self.0
    }
    fn cred(&self) -> Credential {
        self.1
    }
}

impl AcceptedKey for (&str, Credential) {
    fn key(&self) -> &str {
        self.0
    }
    fn cred(&self) -> Credential {
        self.1
    }
}

// Hashed and compared as `Accepted`'s derived impls do: the key, then the credential.
impl std::hash::Hash for dyn AcceptedKey + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
        self.cred().hash(state);
    }
}

impl PartialEq for dyn AcceptedKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key() && self.cred() == other.cred()
    }
}

impl Eq for dyn AcceptedKey + '_ {}

impl<'a> std::borrow::Borrow<dyn AcceptedKey + 'a> for Accepted {
    fn borrow(&self) -> &(dyn AcceptedKey + 'a) {
        self
    }
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
        jwt: Option<Arc<JwtVerifier>>,
    ) -> Self {
        // Bounded so that instants computed from it cannot overflow.
        let validation_ttl = validation_ttl.clamp(
            Duration::from_secs(1),
            Duration::from_secs(10 * 365 * 86_400),
        );
        Self {
            mode,
            jwt,
            hasher: CredentialHasher::new(),
            validation_ttl,
            accepted: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(validation_ttl)
                // Seeded per process (keys come from clients); SipHash would cost more than
                // the rest of the look-up a hit makes.
                .build_with_hasher(foldhash::fast::RandomState::default()),
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
        self.hasher.credential(authorization)
    }

    /// The credential of callers that send no `Authorization` (and of warming).
    pub fn anonymous(&self) -> Credential {
        self.hasher.anonymous()
    }

    /// Whether a cached copy of `key` holding `status` may be served to `cred` without
    /// asking the origin.
    pub fn may_serve(&self, key: &str, cred: Credential, status: u16) -> bool {
        match self.mode {
            // jwt: the token was verified locally before we got here.
            FrontendAuth::None | FrontendAuth::Jwt => true,
            FrontendAuth::Forward => self.accepted_until(key, cred, status).is_some(),
        }
    }

    /// Until when `cred` may be served a copy of `key` holding `status` without asking the
    /// origin again (`forward` mode; `None` when it may not be now).
    pub fn accepted_until(&self, key: &str, cred: Credential, status: u16) -> Option<Instant> {
        let (at, accepted_status) = self.accepted.get(&(key, cred) as &dyn AcceptedKey)?;
        let until = at + self.validation_ttl;
        (accepted_status == status && Instant::now() < until).then_some(until)
    }

    /// Whether the origin accepted `cred` for `key` recently, whatever the status (a caller
    /// worth waiting for another instance's copy for).
    pub fn knows(&self, key: &str, cred: Credential) -> bool {
        self.mode != FrontendAuth::Forward
            || self.accepted.contains_key(&(key, cred) as &dyn AcceptedKey)
    }

    /// Records that the origin answered `cred` for `key` with `status`, an answer the entry
    /// holds (it would be stored).
    pub fn accept(&self, key: &str, cred: Credential, status: u16) {
        if self.mode == FrontendAuth::Forward {
            self.accepted
                .insert(Accepted(key.to_owned(), cred), (Instant::now(), status));
        }
    }

    /// Withdraws any acceptance of `cred` for `key`: the origin's last answer to it was not
    /// one the entry holds.
    pub fn revoke(&self, key: &str, cred: Credential) {
        if self.mode == FrontendAuth::Forward {
            self.accepted.invalidate(&(key, cred) as &dyn AcceptedKey);
        }
    }

    /// The single-flight key: per entry and credential unless the views are public, so an
    /// answer is shared only between requests carrying the same credentials.
    pub fn flight_key(&self, key: &str, cred: Credential) -> String {
        match self.mode {
            FrontendAuth::None => key.to_owned(),
            // jwt too: an origin refusal for one token is never handed to another.
            FrontendAuth::Forward | FrontendAuth::Jwt => {
                crate::domain::concat(&[key, "#", &cred.tag()])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_serves_only_credentials_accepted_with_the_entrys_status() {
        let ac = AccessControl::new(FrontendAuth::Forward, Duration::from_secs(60), None);
        let a = ac.credential(Some(&HeaderValue::from_static("Bearer A")));
        let b = ac.credential(Some(&HeaderValue::from_static("Bearer B")));
        assert!(!ac.may_serve("k", a, 200));
        ac.accept("k", a, 200);
        assert!(ac.may_serve("k", a, 200));
        assert!(!ac.may_serve("k", b, 200));
        assert!(!ac.may_serve("other", a, 200));
        ac.accept("k", b, 404);
        assert!(
            !ac.may_serve("k", b, 200),
            "a 404 never unlocks a cached 200"
        );
        assert!(ac.may_serve("k", b, 404));
        ac.revoke("k", a);
        assert!(!ac.may_serve("k", a, 200));
        assert_ne!(ac.flight_key("k", a), ac.flight_key("k", b));
    }

    #[test]
    fn none_serves_everyone() {
        let ac = AccessControl::new(FrontendAuth::None, Duration::from_secs(60), None);
        assert!(ac.may_serve("k", ac.anonymous(), 200));
        assert_eq!(ac.flight_key("k", ac.anonymous()), "k");
    }
}

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
    /// When the origin accepted a credential for an entry, and with which status. An
    /// acceptance older than `validation_ttl` is never used, and [`AccessControl::sweep`]
    /// drops it.
    accepted: AcceptedTable,
}

/// An entry's key and a credential: what an acceptance is kept under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Accepted(String, Credential);

/// An entry's key and a credential as a hit has them: an acceptance is looked up by the key
/// as borrowed, without copying it into a `String`. Its derived `Hash` hashes what
/// `Accepted`'s does, in the same order (a `String` hashes as its `str`).
#[derive(Hash)]
struct AcceptedRef<'a>(&'a str, Credential);

impl quick_cache::Equivalent<Accepted> for AcceptedRef<'_> {
    fn equivalent(&self, key: &Accepted) -> bool {
        self.0 == key.0 && self.1 == key.1
    }
}

/// The table of acceptances: bounded by count, every new acceptance admitted (CLOCK-Pro), and
/// seeded per process (keys come from clients; SipHash would cost more than the rest of the
/// look-up a hit makes).
type AcceptedTable = quick_cache::sync::Cache<
    Accepted,
    (Instant, u16),
    quick_cache::UnitWeighter,
    foldhash::fast::RandomState,
>;

/// How many acceptances are remembered at most; beyond it the table's CLOCK-Pro eviction
/// chooses which go, and their callers are asked for at the origin again.
const MAX_ACCEPTED: u64 = 1_000_000;

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
            accepted: AcceptedTable::with(
                // The table grows as it fills; nothing is allocated for this up front.
                MAX_ACCEPTED as usize,
                MAX_ACCEPTED,
                quick_cache::UnitWeighter,
                foldhash::fast::RandomState::default(),
                Default::default(),
            ),
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
        let (until, accepted_status) = self.accepted_at(key, cred)?;
        (accepted_status == status).then_some(until)
    }

    /// Whether the origin accepted `cred` for `key` recently, whatever the status (a caller
    /// worth waiting for another instance's copy for).
    pub fn knows(&self, key: &str, cred: Credential) -> bool {
        self.mode != FrontendAuth::Forward || self.accepted_at(key, cred).is_some()
    }

    /// Until when the origin's acceptance of `cred` for `key` holds, and the status it was
    /// for; `None` if there is none, or it is older than `validation_ttl`.
    fn accepted_at(&self, key: &str, cred: Credential) -> Option<(Instant, u16)> {
        let (at, status) = self.accepted.get(&AcceptedRef(key, cred))?;
        let until = at + self.validation_ttl;
        (Instant::now() < until).then_some((until, status))
    }

    /// Records that the origin answered `cred` for `key` with `status`, an answer the entry
    /// holds (it would be stored).
    pub fn accept(&self, key: &str, cred: Credential, status: u16) {
        if self.mode == FrontendAuth::Forward {
            self.accepted
                .insert(Accepted(key.to_owned(), cred), (Instant::now(), status));
        }
    }

    /// Drops every acceptance older than `validation_ttl` (they are never used, and would
    /// otherwise stay until the table's bound pushed them out). Walks the whole table, one
    /// shard at a time under its write lock: for the housekeeping task, off the workers.
    pub fn sweep(&self) {
        let now = Instant::now();
        let ttl = self.validation_ttl;
        self.accepted.retain(|_, (at, _)| now < *at + ttl);
    }

    /// How many acceptances the table holds (expired ones until a sweep).
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.accepted.len()
    }

    /// Withdraws any acceptance of `cred` for `key`: the origin's last answer to it was not
    /// one the entry holds.
    pub fn revoke(&self, key: &str, cred: Credential) {
        if self.mode == FrontendAuth::Forward {
            self.accepted.remove(&AcceptedRef(key, cred));
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
    fn an_acceptance_older_than_the_validation_ttl_is_not_used() {
        let ac = AccessControl::new(FrontendAuth::Forward, Duration::from_secs(1), None);
        let a = ac.anonymous();
        ac.accept("k", a, 200);
        assert!(ac.may_serve("k", a, 200) && ac.knows("k", a));
        std::thread::sleep(Duration::from_millis(1_100));
        ac.accept("fresh", a, 200);
        assert!(
            !ac.may_serve("k", a, 200),
            "expired, though still in the table"
        );
        assert!(!ac.knows("k", a));
        assert_eq!(ac.remembered(), 2);
        ac.sweep();
        assert_eq!(ac.remembered(), 1, "the sweep drops only the expired one");
        assert!(ac.may_serve("fresh", a, 200));
    }

    #[test]
    fn none_serves_everyone() {
        let ac = AccessControl::new(FrontendAuth::None, Duration::from_secs(60), None);
        assert!(ac.may_serve("k", ac.anonymous(), 200));
        assert_eq!(ac.flight_key("k", ac.anonymous()), "k");
    }
}

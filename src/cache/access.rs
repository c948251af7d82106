//! Frontend access control (SPEC section 4, `auth.frontend`): runcache must never become a
//! way around the origin's access control.
//!
//! In `forward` mode a cached answer is served only to credentials (the `Authorization`
//! header, or its absence) that the origin accepted for that same entry within
//! `auth.validation_ttl`; other credentials go to the origin first. Credentials are kept only
//! as keyed hashes (HMAC-SHA256 under a random per-process key), in memory, per instance.

use std::time::Duration;

use http::HeaderValue;
use sha2::Sha256;

/// How cached views are protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrontendAuth {
    /// Serve a hit only to credentials the origin accepted for the entry.
    Forward,
    /// Public views.
    None,
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
    key: [u8; 32],
    accepted: moka::sync::Cache<(String, Credential), ()>,
}

impl std::fmt::Debug for AccessControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessControl")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl AccessControl {
    /// Access control in `mode`, remembering acceptances for `validation_ttl`.
    pub fn new(mode: FrontendAuth, validation_ttl: Duration) -> Self {
        let mut key = [0u8; 32];
        if getrandom::fill(&mut key).is_err() {
            key.copy_from_slice(
                &xxhash_rust::xxh3::xxh3_128(uuid::Uuid::new_v4().as_bytes())
                    .to_le_bytes()
                    .repeat(2),
            );
        }
        Self {
            mode,
            key,
            accepted: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(validation_ttl.max(Duration::from_secs(1)))
                .build(),
        }
    }

    /// The mode.
    pub fn mode(&self) -> FrontendAuth {
        self.mode
    }

    /// The keyed hash of an `Authorization` header (or of its absence).
    pub fn credential(&self, authorization: Option<&HeaderValue>) -> Credential {
        use hmac::{Hmac, Mac};
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
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

    /// The credential of callers that send no `Authorization` (and of warming).
    pub fn anonymous(&self) -> Credential {
        self.credential(None)
    }

    /// Whether a cached copy of `key` may be served to `cred` without asking the origin.
    pub fn may_serve(&self, key: &str, cred: Credential) -> bool {
        match self.mode {
            FrontendAuth::None => true,
            FrontendAuth::Forward => self.accepted.contains_key(&(key.to_owned(), cred)),
        }
    }

    /// Records that the origin accepted `cred` for `key` (it answered, other than 401/403).
    pub fn accepted(&self, key: &str, cred: Credential) {
        if self.mode == FrontendAuth::Forward {
            self.accepted.insert((key.to_owned(), cred), ());
        }
    }

    /// The single-flight key: per entry and credential in `forward` mode, so an answer is
    /// shared only between requests carrying the same credentials.
    pub fn flight_key(&self, key: &str, cred: Credential) -> String {
        match self.mode {
            FrontendAuth::None => key.to_owned(),
            FrontendAuth::Forward => format!("{key}#{}", cred.tag()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_keyed_hashes_and_distinct() {
        let a = AccessControl::new(FrontendAuth::Forward, Duration::from_secs(60));
        let b = AccessControl::new(FrontendAuth::Forward, Duration::from_secs(60));
        let token = HeaderValue::from_static("Bearer A");
        assert_eq!(a.credential(Some(&token)), a.credential(Some(&token)));
        assert_ne!(a.credential(Some(&token)), a.anonymous());
        // Another process (another key) hashes the same token differently.
        assert_ne!(a.credential(Some(&token)), b.credential(Some(&token)));
    }

    #[test]
    fn forward_serves_only_accepted_credentials() {
        let ac = AccessControl::new(FrontendAuth::Forward, Duration::from_secs(60));
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
        let ac = AccessControl::new(FrontendAuth::None, Duration::from_secs(60));
        assert!(ac.may_serve("k", ac.anonymous()));
        assert_eq!(ac.flight_key("k", ac.anonymous()), "k");
    }
}

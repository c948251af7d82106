//! The other instances, for invalidations made while Redis is unreachable (SPEC section 2,
//! "Several instances while Redis is unreachable"). While Redis is reachable every instance
//! registers itself (its advertised URL, scored by last-seen time) and reads who else is
//! there; it keeps the last list it read. An invalidation it applies while it cannot reach
//! Redis is also sent straight to each of them (the admin token, a short time-out, bounded
//! retries), and an instance that serves from memory while it knows of others serves no entry
//! older than `memory.degraded_max_age_ms`: what could reach it by no other path is late by at
//! most that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::security::limits::PEER_PATH;
use crate::store::Invalidation;

/// How long an instance counts as present after it was last seen.
pub const SEEN_WINDOW: Duration = Duration::from_secs(10);
/// Attempts per peer for one invalidation.
const ATTEMPTS: u32 = 2;

/// The body of a peer invalidation.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerMessage {
    /// The sending instance's id (1-64 letters and digits).
    #[schema(pattern = "^[A-Za-z0-9]{1,64}$")]
    pub from: String,
    /// What to invalidate (physical keys; see the README's Storage section).
    #[schema(value_type = InvalidationSchema)]
    pub invalidation: Invalidation,
}

/// The OpenAPI schema of an [`Invalidation`] as sent between instances. Documentation only.
pub struct InvalidationSchema;

impl utoipa::PartialSchema for InvalidationSchema {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{
            AdditionalProperties, ArrayBuilder, ObjectBuilder, OneOfBuilder, Type,
        };
        let keys = || ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::String));
        // Tag sets and globs may be one string or a list (older journal lines).
        let one_or_many = || {
            OneOfBuilder::new()
                .item(ObjectBuilder::new().schema_type(Type::String))
                .item(keys())
        };
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "Counters to bump, entries to delete, tag sets whose members are deleted, globs                  whose matches are deleted, or everything; physical keys of this keyspace only.",
            ))
            .property("bump", keys())
            .property("delete", keys())
            .property("delete_tagged", one_or_many())
            .property("delete_matching", one_or_many())
            .property("everything", ObjectBuilder::new().schema_type(Type::Boolean))
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .into()
    }
}

impl utoipa::ToSchema for InvalidationSchema {}

/// This instance's view of the others.
pub struct Peers {
    id: String,
    url: ArcSwapOption<String>,
    /// The others, `(id, url)`.
    others: ArcSwap<Vec<(String, String)>>,
    /// Each other instance's URL and when it was last read from the registry, by id.
    seen: Mutex<HashMap<String, (String, Instant)>>,
    /// Whether the registry has been read at all by this process.
    read: AtomicBool,
    /// Whether, before this process read the registry, others are to be assumed (a
    /// snapshot written while others were known).
    assumed: AtomicBool,
    token: Arc<SecretString>,
    client: reqwest::Client,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("id", &self.id)
            .field("others", &self.others.load().len())
            .finish_non_exhaustive()
    }
}

impl Peers {
    /// Peers of an instance that authenticates to them with `token` (every instance of a
    /// deployment shares `admin.token`) and waits at most `timeout` per attempt.
    pub fn new(token: Arc<SecretString>, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            id: uuid::Uuid::new_v4().simple().to_string(),
            url: ArcSwapOption::empty(),
            others: ArcSwap::from_pointee(Vec::new()),
            seen: Mutex::default(),
            read: AtomicBool::new(false),
            assumed: AtomicBool::new(false),
            token,
            client,
        })
    }

    /// This instance's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Sets the URL other instances reach this one at (known once the listener is bound).
    pub fn advertise(&self, url: String) {
        self.url
            .store(Some(Arc::new(url.trim_end_matches('/').to_owned())));
    }

    /// The URL other instances reach this one at, once known.
    pub fn url(&self) -> Option<String> {
        self.url.load().as_deref().cloned()
    }

    /// The registry member naming this instance, once it has a URL.
    pub fn member(&self) -> Option<String> {
        self.url
            .load()
            .as_deref()
            .map(|url| format!("{}|{url}", self.id))
    }

    /// Takes in the registry's members as read from Redis. An instance stays known for
    /// [`SEEN_WINDOW`] after this instance last read it there, so a registry that is
    /// momentarily short (a Redis restarted empty, before everyone registered again) does not
    /// make this instance forget whom to tell.
    pub fn set_members(&self, members: Vec<String>) {
        self.read.store(true, Ordering::Release);
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (id, url) in members.iter().filter_map(|m| m.split_once('|')) {
            if id != self.id {
                seen.insert(id.to_owned(), (url.to_owned(), now));
            }
        }
        seen.retain(|_, (_, at)| now.duration_since(*at) <= SEEN_WINDOW);
        let mut others: Vec<(String, String)> = seen
            .iter()
            .map(|(id, (url, _))| (id.clone(), url.clone()))
            .collect();
        others.sort();
        self.others.store(Arc::new(others));
    }

    /// Whether this process has read the registry at least once (the others are then what
    /// it says).
    pub fn ever_read(&self) -> bool {
        self.read.load(Ordering::Acquire)
    }

    /// Assume others until the registry is read (the snapshot loaded was written while they
    /// were known).
    pub fn assume_others(&self) {
        self.assumed.store(true, Ordering::Release);
    }

    /// Whether others are assumed until the registry is read.
    pub fn assumed(&self) -> bool {
        self.assumed.load(Ordering::Acquire)
    }

    /// Whether other instances are known.
    pub fn any(&self) -> bool {
        !self.others.load().is_empty()
    }

    /// How many other instances are known.
    pub fn count(&self) -> usize {
        self.others.load().len()
    }

    /// Sends `inv` to every known instance, concurrently; returns how many confirmed.
    pub async fn tell(&self, inv: &Invalidation) -> usize {
        self.tell_all_but(inv, &[]).await
    }

    /// Sends `inv` to every known instance whose id is not in `confirmed`, concurrently;
    /// returns how many confirmed.
    pub async fn tell_all_but(&self, inv: &Invalidation, confirmed: &[String]) -> usize {
        let others: Vec<(String, String)> = self
            .others
            .load()
            .iter()
            .filter(|(id, _)| !confirmed.contains(id))
            .cloned()
            .collect();
        if others.is_empty() {
            return 0;
        }
        let message = PeerMessage {
            from: self.id.clone(),
            invalidation: inv.clone(),
        };
        let body = bytes::Bytes::from(serde_json::to_vec(&message).unwrap_or_default());
        let sends = others
            .iter()
            .map(|(_, url)| self.tell_one(url, body.clone()));
        let confirmed = futures_util::future::join_all(sends)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count();
        if confirmed < others.len() {
            tracing::warn!(
                confirmed,
                known = others.len(),
                "an invalidation did not reach every instance directly; their copies go within memory.degraded_max_age_ms or l1.max_lifetime_ms"
            );
        }
        confirmed
    }

    async fn tell_one(&self, url: &str, body: bytes::Bytes) -> bool {
        for attempt in 0..ATTEMPTS {
            let sent = self
                .client
                .post(format!("{url}{PEER_PATH}"))
                .bearer_auth(self.token.expose_secret())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(resp) if resp.status().is_success() => return true,
                Ok(resp) => {
                    tracing::debug!(
                        status = resp.status().as_u16(),
                        "peer refused an invalidation"
                    );
                    return false;
                }
                Err(e) => tracing::debug!(error = %e, attempt, "peer invalidation not delivered"),
            }
            tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_leaves_this_instance_out() {
        let peers = Peers::new(
            Arc::new(SecretString::from("t")),
            Duration::from_millis(100),
        )
        .expect("client");
        peers.advertise("http://127.0.0.1:1/".into());
        let me = peers.member().expect("member");
        assert!(me.ends_with("|http://127.0.0.1:1"));
        peers.set_members(vec![me, "x|http://127.0.0.1:2".into(), "garbage".into()]);
        assert_eq!(peers.count(), 1);
        assert!(peers.any());
        // A registry read that lacks it (Redis restarted empty) does not forget it.
        peers.set_members(vec![]);
        assert_eq!(peers.count(), 1);
    }
}

//! The other instances, for invalidations made while Redis is unreachable (SPEC section 2,
//! "Several instances while Redis is unreachable"). While Redis is reachable every instance
//! registers itself (its advertised URL, scored by Redis' clock) and reads who else is there;
//! it keeps the last list it read. An invalidation it applies while it cannot reach Redis is
//! also sent straight to each of them (a short time-out, bounded retries), and an instance
//! that serves from memory while it knows of others serves no entry older than
//! `memory.degraded_max_age_ms`: what could reach it by no other path is late by at most that.
//!
//! The registry is a claim, not a credential: anything that can write the Redis can add a
//! member. So a direct invalidation carries no secret, only an HMAC signature under
//! `peers.secret` (over a timestamp and the body, which names the sender), which a listener
//! at a forged address can neither reuse for anything else nor turn into a new invalidation;
//! a member is used only when its address is a bare base URL on a host `peers.allowed`
//! names; and a member that did not answer is skipped for `peers.down_ms`, so a silent one
//! costs one time-out per period, not one per invalidation.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use secrecy::{ExposeSecret, SecretSlice};
use serde::{Deserialize, Serialize};

use crate::domain::peer_addr::PeerAllowList;
use crate::security::limits::PEER_PATH;
use crate::security::signature::{SIGNATURE_HEADER, TIMESTAMP_HEADER, now_secs, sign};
use crate::store::Invalidation;

/// How long an instance counts as present after it was last seen.
pub const SEEN_WINDOW: Duration = Duration::from_secs(10);
/// Attempts per peer for one invalidation when the first is refused at once (a restart); a
/// time-out is not retried.
const ATTEMPTS: u32 = 2;
/// Most members read from the registry at once.
pub const MAX_MEMBERS: usize = 256;
/// Refused registry members remembered so that each is logged once.
const MAX_REFUSED_LOGGED: usize = 1024;

/// The body of a peer invalidation.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerMessage {
    /// The sending instance's id (1-64 letters and digits). The signature covers it.
    #[schema(pattern = "^[A-Za-z0-9]{1,64}$")]
    pub from: String,
    /// This delivery's id (1-64 letters and digits): two invalidations alike, sent within
    /// the same second, are two deliveries, not one delivered twice. Retries of one delivery
    /// keep it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z0-9]{1,64}$")]
    pub delivery: Option<String>,
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

/// How an instance reaches the others.
pub struct PeerOptions {
    /// The key direct invalidations are signed with (`peers.secret`, or one derived from
    /// `admin.token`).
    pub secret: SecretSlice<u8>,
    /// Hosts a registered address may name (`peers.allowed`).
    pub allowed: PeerAllowList,
    /// Time-out of one attempt (`server.peer_timeout_ms`).
    pub timeout: Duration,
    /// How long a member that did not answer is skipped (`peers.down_ms`).
    pub down: Duration,
}

/// This instance's view of the others.
pub struct Peers {
    id: String,
    url: ArcSwapOption<String>,
    /// The others, `(member, url)`.
    others: ArcSwap<Vec<(String, String)>>,
    /// Each other instance's URL and when it was last read from the registry, by id.
    seen: Mutex<HashMap<String, (String, Instant)>>,
    /// Members that did not answer, and until when they are skipped.
    down: Mutex<HashMap<String, Instant>>,
    /// Registry members refused (bad form, or an address outside `peers.allowed`), each
    /// logged once.
    refused: Mutex<HashSet<String>>,
    /// Whether the registry has been read at all by this process.
    read: AtomicBool,
    /// Whether, before this process read the registry, others are to be assumed (a
    /// snapshot written while others were known).
    assumed: AtomicBool,
    secret: SecretSlice<u8>,
    allowed: PeerAllowList,
    down_for: Duration,
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

/// What one direct invalidation came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    /// The peer applied it.
    Confirmed,
    /// The peer answered, but not with a success (a wrong `peers.secret`, a full store).
    Refused,
    /// The peer did not answer (time-out, connection refused): skipped for `peers.down_ms`.
    Silent,
}

impl Peers {
    /// Peers of an instance, reached as `options` say.
    pub fn new(options: PeerOptions) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout)
            .redirect(reqwest::redirect::Policy::none())
            // Straight to the address checked against peers.allowed, never through a proxy
            // named by the environment.
            .no_proxy()
            .build()?;
        Ok(Self {
            id: uuid::Uuid::new_v4().simple().to_string(),
            url: ArcSwapOption::empty(),
            others: ArcSwap::from_pointee(Vec::new()),
            seen: Mutex::default(),
            down: Mutex::default(),
            refused: Mutex::default(),
            read: AtomicBool::new(false),
            assumed: AtomicBool::new(false),
            secret: options.secret,
            allowed: options.allowed,
            down_for: options.down,
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

    /// Whether this instance's own `peers.allowed` takes `url` (other instances with the same
    /// settings would refuse it otherwise).
    pub fn allows(&self, url: &str) -> bool {
        self.allowed.check_url(url).is_ok()
    }

    /// The registry member naming this instance, once it has a URL.
    pub fn member(&self) -> Option<String> {
        self.url
            .load()
            .as_deref()
            .map(|url| format!("{}|{url}", self.id))
    }

    /// Takes in the registry's members as read from Redis: untrusted input. A member is kept
    /// only when it is `<id>|<url>`, the id 1-64 letters and digits and the URL a bare base
    /// URL on a host `peers.allowed` names; others are logged once and ignored. An instance
    /// stays known for [`SEEN_WINDOW`] after this instance last read it there, so a registry
    /// that is momentarily short (a Redis restarted empty, before everyone registered again)
    /// does not make this instance forget whom to tell.
    pub fn set_members(&self, members: Vec<String>) {
        self.read.store(true, Ordering::Release);
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for member in members.iter().take(MAX_MEMBERS) {
            match self.check_member(member) {
                Ok((id, url)) if id != self.id => {
                    seen.insert(id.to_owned(), (url, now));
                }
                Ok(_) => {}
                Err(why) => self.refuse(member, why),
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

    fn check_member<'a>(&self, member: &'a str) -> Result<(&'a str, String), &'static str> {
        let (id, url) = member.split_once('|').ok_or("not <id>|<url>")?;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err("the id is not 1-64 letters and digits");
        }
        Ok((id, self.allowed.check_url(url)?))
    }

    fn refuse(&self, member: &str, why: &'static str) {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        if refused.len() < MAX_REFUSED_LOGGED && refused.insert(member.to_owned()) {
            // What was registered is shown escaped and cut short: it is anyone's text.
            let shown: String = member.chars().take(200).collect();
            tracing::warn!(
                member = ?shown,
                reason = why,
                "ignored an instance registry member: direct invalidations go only to bare http(s) URLs on hosts in peers.allowed"
            );
        }
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

    /// Sends `inv` to every known instance whose id is not in `confirmed` and that is not
    /// skipped as down, concurrently; returns how many confirmed.
    pub async fn tell_all_but(&self, inv: &Invalidation, confirmed: &[String]) -> usize {
        let now = Instant::now();
        let (others, skipped) = {
            let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
            down.retain(|_, until| *until > now);
            let mut skipped = 0usize;
            let others: Vec<(String, String)> = self
                .others
                .load()
                .iter()
                .filter(|(id, _)| !confirmed.contains(id))
                .filter(|(id, _)| {
                    let is_down = down.contains_key(id);
                    skipped += usize::from(is_down);
                    !is_down
                })
                .cloned()
                .collect();
            (others, skipped)
        };
        if others.is_empty() && skipped == 0 {
            return 0;
        }
        let message = PeerMessage {
            from: self.id.clone(),
            delivery: Some(uuid::Uuid::new_v4().simple().to_string()),
            invalidation: inv.clone(),
        };
        let body = bytes::Bytes::from(serde_json::to_vec(&message).unwrap_or_default());
        let sends = others
            .iter()
            .map(|(_, url)| self.tell_one(url, body.clone()));
        let outcomes = futures_util::future::join_all(sends).await;
        let mut confirmed = 0;
        {
            let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
            for ((id, _), told) in others.iter().zip(&outcomes) {
                match told {
                    Told::Confirmed => confirmed += 1,
                    Told::Refused => {}
                    Told::Silent => {
                        down.insert(id.clone(), Instant::now() + self.down_for);
                    }
                }
            }
        }
        if confirmed < others.len() + skipped {
            tracing::warn!(
                confirmed,
                known = others.len() + skipped,
                skipped_as_down = skipped,
                "an invalidation did not reach every instance directly; their copies go within memory.degraded_max_age_ms or l1.max_lifetime_ms"
            );
        }
        confirmed
    }

    async fn tell_one(&self, url: &str, body: bytes::Bytes) -> Told {
        // One signature for every attempt: a retry of a delivery already applied is
        // answered as such and applies nothing twice.
        let timestamp = now_secs().to_string();
        let signature = sign(self.secret.expose_secret(), &timestamp, &body);
        for attempt in 0..ATTEMPTS {
            let sent = self
                .client
                .post(format!("{url}{PEER_PATH}"))
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(TIMESTAMP_HEADER, &timestamp)
                .header(SIGNATURE_HEADER, &signature)
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(resp) if resp.status().is_success() => return Told::Confirmed,
                Ok(resp) => {
                    tracing::warn!(
                        status = resp.status().as_u16(),
                        "another instance refused a direct invalidation (do both share peers.secret?)"
                    );
                    return Told::Refused;
                }
                Err(e) if e.is_timeout() => {
                    tracing::debug!(error = %e, "peer invalidation timed out");
                    return Told::Silent;
                }
                Err(e) => tracing::debug!(error = %e, attempt, "peer invalidation not delivered"),
            }
            tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
        }
        Told::Silent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(allowed: &[&str]) -> Peers {
        Peers::new(PeerOptions {
            secret: SecretSlice::from(b"0123456789abcdef".to_vec()),
            allowed: PeerAllowList::parse(
                &allowed.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
            )
            .expect("allow list"),
            timeout: Duration::from_millis(100),
            down: Duration::from_secs(30),
        })
        .expect("client")
    }

    #[test]
    fn the_list_leaves_this_instance_out() {
        let peers = peers(&["127.0.0.0/8"]);
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

    #[test]
    fn members_outside_the_allowed_hosts_or_of_another_form_are_ignored() {
        let peers = peers(&["127.0.0.0/8", "runcache-2"]);
        peers.set_members(vec![
            "a|http://10.0.0.1:8080".into(),
            "b|http://127.0.0.1:8080/internal/admin".into(),
            "c|http://user:pw@127.0.0.1:8080".into(),
            "d!|http://127.0.0.1:8080".into(),
            "e|gopher://127.0.0.1:70".into(),
            "f|http://runcache-3:8080".into(),
        ]);
        assert_eq!(peers.count(), 0);
        peers.set_members(vec![
            "g|http://127.0.0.9:8080/".into(),
            "h|http://RunCache-2:8080".into(),
        ]);
        assert_eq!(peers.count(), 2);
    }
}

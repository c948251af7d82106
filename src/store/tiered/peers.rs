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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use secrecy::{ExposeSecret, SecretSlice};
use serde::{Deserialize, Serialize};

use crate::domain::is_short_word;
use crate::domain::peer_addr::PeerAllowList;
use crate::security::signature::{SIGNATURE_HEADER, TIMESTAMP_HEADER, now_secs, sign};
use crate::store::Invalidation;

/// How long an instance counts as present after it was last seen.
pub const SEEN_WINDOW: Duration = Duration::from_secs(10);
/// Attempts per peer for one invalidation when the first connection is refused at once (a
/// restart); nothing else is retried.
const ATTEMPTS: u32 = 2;
/// Most members read from the registry at once.
pub const MAX_MEMBERS: usize = 256;
/// Refused registry members remembered (by hash) so that each is logged once.
const MAX_REFUSED_LOGGED: usize = 4096;
/// Longest registry member read; a longer one is anyone's junk.
const MAX_MEMBER_LEN: usize = 512;

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
    /// How long a member that did not answer is not waited for (`peers.down_ms`).
    pub down: Duration,
    /// The path of the peer-invalidation route on every instance (under
    /// `server.admin_prefix`, which a deployment's instances share).
    pub path: String,
}

/// Direct invalidations sent so far, for `/cache/stats`: those an invalidation waited for,
/// by outcome, and those sent without waiting.
#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
pub struct PeerSends {
    /// Waited for, and applied by the other instance.
    pub confirmed: u64,
    /// Waited for, and answered with something other than a success (a different
    /// `peers.secret`?).
    pub refused: u64,
    /// Waited for, and not answered within `server.peer_timeout_ms` (or the connection was
    /// refused): each costs its invalidation up to one time-out.
    pub silent: u64,
    /// Sent without waiting, to a member that did not answer (or answered slowly) within the
    /// last `peers.down_ms`.
    pub in_background: u64,
}

/// A registry member as last read: its `(id, url)` when it may be told, and when.
type Seen = (Option<(String, String)>, Instant);

/// This instance's view of the others.
pub struct Peers {
    id: String,
    url: ArcSwapOption<String>,
    /// The others that can be told, `(id, url)`.
    others: ArcSwap<Vec<(String, String)>>,
    /// Every other member read from the registry within [`SEEN_WINDOW`], told or not.
    known: AtomicUsize,
    /// Each member read, by id (or, for one that cannot be told, by what was registered),
    /// with what can be told of it and when it was last read.
    seen: Mutex<HashMap<String, Seen>>,
    /// Hashes of registry members refused (bad form, or an address outside
    /// `peers.allowed`), each logged once.
    refused: Mutex<HashSet<u64>>,
    /// Whether the registry has been read at all by this process.
    read: AtomicBool,
    /// Whether, before this process read the registry, others are to be assumed (a
    /// snapshot written while others were known).
    assumed: AtomicBool,
    allowed: PeerAllowList,
    sender: Arc<Sender>,
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
    /// The peer did not answer (time-out, connection refused).
    Silent,
}

/// Most keys and globs an invalidation queued for one member holds before it becomes "every
/// entry".
const MAX_QUEUED_KEYS: usize = 10_000;

/// What is known of one member's deliveries.
#[derive(Debug)]
struct Health {
    /// Until when it is not waited for (it did not answer, or refused).
    until: Instant,
    /// Whether a background delivery to it is under way (at most one is).
    in_flight: bool,
    /// What it is to be sent once that delivery is done: every invalidation made meanwhile,
    /// merged into one.
    queued: Option<Invalidation>,
}

/// The sending side, shared with deliveries that run in the background.
struct Sender {
    client: reqwest::Client,
    secret: SecretSlice<u8>,
    down_for: Duration,
    /// This instance's id, which every message names.
    from: String,
    /// The peer-invalidation route's path on every instance.
    path: String,
    /// Per URL, the members not waited for or with a delivery under way.
    health: Mutex<HashMap<String, Health>>,
    confirmed: AtomicU64,
    refused: AtomicU64,
    silent: AtomicU64,
    in_background: AtomicU64,
}

impl Sender {
    /// The body telling `inv`, as a delivery of its own.
    fn body(&self, inv: &Invalidation) -> bytes::Bytes {
        let message = PeerMessage {
            from: self.from.clone(),
            delivery: Some(uuid::Uuid::new_v4().simple().to_string()),
            invalidation: inv.clone(),
        };
        bytes::Bytes::from(serde_json::to_vec(&message).unwrap_or_default())
    }

    /// Delivers `body` to `url`, then records how it went: a member that did not answer, or
    /// answered with a refusal (which applies nothing, so waiting for it never helped), is
    /// not waited for during `peers.down_ms`; it is still sent every invalidation, in the
    /// background. A member that applied it, however slowly, is waited for.
    async fn deliver(&self, url: &str, body: bytes::Bytes, awaited: bool) -> Told {
        let told = self.send(url, body).await;
        if awaited {
            let counter = match told {
                Told::Confirmed => &self.confirmed,
                Told::Refused => &self.refused,
                Told::Silent => &self.silent,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if told == Told::Confirmed {
            if let Some(h) = health.get_mut(url) {
                h.until = now;
            }
        } else {
            health
                .entry(url.to_owned())
                .or_insert(Health {
                    until: now,
                    in_flight: false,
                    queued: None,
                })
                .until = now + self.down_for;
        }
        told
    }

    async fn send(&self, url: &str, body: bytes::Bytes) -> Told {
        // One signature for every attempt: a retry of a delivery already applied is
        // answered as such and applies nothing twice.
        let timestamp = now_secs().to_string();
        let signature = sign(self.secret.expose_secret(), &timestamp, &body);
        for attempt in 0..ATTEMPTS {
            let sent = self
                .client
                .post(format!("{url}{}", self.path))
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(TIMESTAMP_HEADER, &timestamp)
                .header(SIGNATURE_HEADER, &signature)
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(resp) if resp.status().is_success() => return Told::Confirmed,
                Ok(resp) => {
                    tracing::debug!(
                        status = resp.status().as_u16(),
                        "another instance refused a direct invalidation"
                    );
                    return Told::Refused;
                }
                // Only a connection refused at once (a restart) is worth a second attempt.
                Err(e) if e.is_connect() && !e.is_timeout() => {
                    tracing::debug!(error = %e, attempt, "peer invalidation not delivered");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "peer invalidation not delivered");
                    return Told::Silent;
                }
            }
            tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
        }
        Told::Silent
    }
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
        let id = uuid::Uuid::new_v4().simple().to_string();
        Ok(Self {
            id: id.clone(),
            url: ArcSwapOption::empty(),
            others: ArcSwap::from_pointee(Vec::new()),
            known: AtomicUsize::new(0),
            seen: Mutex::default(),
            refused: Mutex::default(),
            read: AtomicBool::new(false),
            assumed: AtomicBool::new(false),
            allowed: options.allowed,
            sender: Arc::new(Sender {
                from: id,
                client,
                path: options.path,
                secret: options.secret,
                down_for: options.down,
                health: Mutex::default(),
                confirmed: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                silent: AtomicU64::new(0),
                in_background: AtomicU64::new(0),
            }),
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
    /// settings would never tell it anything otherwise).
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

    /// Takes in the registry's members as read from Redis: untrusted input. A member is told
    /// of invalidations only when it is `<id>|<url>`, the id 1-64 letters and digits and the
    /// URL a bare base URL on a host `peers.allowed` names; others are logged once and never
    /// sent anything. Every member counts as another instance all the same, so that a
    /// misconfigured `peers.allowed` keeps `memory.degraded_max_age_ms` in force rather than
    /// making each instance believe it is alone (a forged member can only add that bound).
    /// A member stays known for [`SEEN_WINDOW`] after this instance last read it there, so a
    /// registry that is momentarily short (a Redis restarted empty, before everyone
    /// registered again) does not make this instance forget whom to tell.
    pub fn set_members(&self, members: Vec<String>) {
        self.read.store(true, Ordering::Release);
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for member in members.iter().take(MAX_MEMBERS) {
            match self.check_member(member) {
                Ok((id, _)) if id == self.id => {}
                Ok((id, url)) => {
                    seen.insert(id.to_owned(), (Some((id.to_owned(), url)), now));
                }
                Err(why) => {
                    self.refuse(member, why);
                    let key = format!("?{:016x}", xxhash_rust::xxh3::xxh3_64(member.as_bytes()));
                    seen.insert(key, (None, now));
                }
            }
        }
        seen.retain(|_, (_, at)| now.duration_since(*at) <= SEEN_WINDOW);
        let mut others: Vec<(String, String)> =
            seen.values().filter_map(|(tell, _)| tell.clone()).collect();
        others.sort();
        self.known.store(seen.len(), Ordering::Release);
        self.others.store(Arc::new(others));
    }

    fn check_member<'a>(&self, member: &'a str) -> Result<(&'a str, String), &'static str> {
        if member.len() > MAX_MEMBER_LEN {
            return Err("longer than 512 bytes");
        }
        let (id, url) = member.split_once('|').ok_or("not <id>|<url>")?;
        if !is_short_word(id) {
            return Err("the id is not 1-64 letters and digits");
        }
        Ok((id, self.allowed.check_url(url)?))
    }

    fn refuse(&self, member: &str, why: &'static str) {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let hash = xxhash_rust::xxh3::xxh3_64(member.as_bytes());
        if refused.len() < MAX_REFUSED_LOGGED && refused.insert(hash) {
            // What was registered is shown escaped and cut short: it is anyone's text.
            let shown: String = member.chars().take(200).collect();
            tracing::warn!(
                member = ?shown,
                reason = why,
                "an instance registry member is never sent invalidations: they go only to bare http(s) URLs on hosts in peers.allowed"
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

    /// Whether other instances are known (told of invalidations or not).
    pub fn any(&self) -> bool {
        self.count() > 0
    }

    /// How many other instances are known (told of invalidations or not).
    pub fn count(&self) -> usize {
        self.known.load(Ordering::Acquire)
    }

    /// How many other instances are told of invalidations directly.
    pub fn reachable(&self) -> usize {
        self.others.load().len()
    }

    /// Direct invalidations sent so far, by outcome.
    pub fn sends(&self) -> PeerSends {
        let s = &self.sender;
        PeerSends {
            confirmed: s.confirmed.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            silent: s.silent.load(Ordering::Relaxed),
            in_background: s.in_background.load(Ordering::Relaxed),
        }
    }

    /// Sends `inv` to every known instance, concurrently; returns how many confirmed.
    pub async fn tell(&self, inv: &Invalidation) -> usize {
        self.tell_all_but(inv, &[]).await
    }

    /// Sends `inv` to every known instance whose id is not in `confirmed`, concurrently, and
    /// waits for those that answered in time within the last `peers.down_ms`; the others are
    /// sent it in the background (at most one delivery under way per member), so a silent
    /// member costs an invalidation at most one time-out per `peers.down_ms`. Returns how
    /// many confirmed before it returned.
    pub async fn tell_all_but(&self, inv: &Invalidation, confirmed: &[String]) -> usize {
        let others = self.others.load();
        let targets: Vec<&str> = others
            .iter()
            .filter(|(id, _)| !confirmed.contains(id))
            .map(|(_, url)| url.as_str())
            .collect();
        if targets.is_empty() {
            return 0;
        }
        let body = self.sender.body(inv);
        let now = Instant::now();
        let mut awaited = Vec::with_capacity(targets.len());
        let mut background = 0usize;
        {
            let mut health = self.sender.health.lock().unwrap_or_else(|e| e.into_inner());
            health.retain(|_, h| h.in_flight || h.until > now);
            for url in &targets {
                match health.get_mut(*url) {
                    Some(h) if h.until > now => {
                        background += 1;
                        if h.in_flight {
                            // Sent once the delivery under way is done, with any others.
                            h.queued
                                .get_or_insert_with(Invalidation::default)
                                .absorb(inv, MAX_QUEUED_KEYS);
                        } else {
                            h.in_flight = true;
                            self.deliver_in_background(url, body.clone());
                        }
                    }
                    _ => awaited.push(*url),
                }
            }
        }
        let sends = awaited
            .iter()
            .map(|url| self.sender.deliver(url, body.clone(), true));
        let told = futures_util::future::join_all(sends)
            .await
            .into_iter()
            .filter(|t| *t == Told::Confirmed)
            .count();
        if told < targets.len() {
            tracing::warn!(
                confirmed = told,
                known = targets.len(),
                in_background = background,
                "an invalidation did not reach every instance directly before it was acknowledged; their copies go within memory.degraded_max_age_ms or l1.max_lifetime_ms"
            );
        }
        told
    }

    fn deliver_in_background(&self, url: &str, body: bytes::Bytes) {
        let sender = self.sender.clone();
        let url = url.to_owned();
        sender.in_background.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut body = body;
            loop {
                sender.deliver(&url, body, false).await;
                let next = {
                    let mut health = sender.health.lock().unwrap_or_else(|e| e.into_inner());
                    match health.get_mut(&url) {
                        Some(h) => {
                            let next = h.queued.take();
                            h.in_flight = next.is_some();
                            next
                        }
                        None => None,
                    }
                };
                match next {
                    Some(inv) => {
                        sender.in_background.fetch_add(1, Ordering::Relaxed);
                        body = sender.body(&inv);
                    }
                    None => break,
                }
            }
        });
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
            path: crate::security::limits::PEER_PATH.to_owned(),
        })
        .expect("client")
    }

    #[test]
    fn the_list_leaves_this_instance_out() {
        let peers = peers(&["127.0.0.0/8"]);
        peers.advertise("http://127.0.0.1:1/".into());
        let me = peers.member().expect("member");
        assert!(me.ends_with("|http://127.0.0.1:1"));
        peers.set_members(vec![me, "x|http://127.0.0.1:2".into()]);
        assert_eq!((peers.count(), peers.reachable()), (1, 1));
        assert!(peers.any());
        // A registry read that lacks it (Redis restarted empty) does not forget it.
        peers.set_members(vec![]);
        assert_eq!(peers.count(), 1);
    }

    #[test]
    fn members_outside_the_allowed_hosts_or_of_another_form_are_known_but_never_told() {
        let peers = peers(&["127.0.0.0/8", "runcache-2"]);
        peers.set_members(vec![
            "a|http://10.0.0.1:8080".into(),
            "b|http://127.0.0.1:8080/internal/admin".into(),
            "c|http://user:pw@127.0.0.1:8080".into(),
            "d!|http://127.0.0.1:8080".into(),
            "e|gopher://127.0.0.1:70".into(),
            "f|http://runcache-3:8080".into(),
            format!("g|http://127.0.0.1:8080/{}", "x".repeat(600)),
            "garbage".into(),
        ]);
        assert_eq!((peers.count(), peers.reachable()), (8, 0));
        peers.set_members(vec![
            "h|http://127.0.0.9:8080/".into(),
            "i|http://RunCache-2:8080".into(),
        ]);
        assert_eq!((peers.count(), peers.reachable()), (10, 2));
    }
}

//! The invalidation bus that keeps every instance's near cache coherent.
//!
//! An instance that invalidates publishes `{from, id, op}` on `{prefix}:_l1:invalidate`.
//! Every subscribed instance (the sender too) drops what `op` names from its near cache and
//! answers on the sender's own channel `{prefix}:_l1:ack:{from}`. `PUBLISH` reports how many
//! subscribers got the message; the sender waits, at most `l1.ack_timeout_ms`, for that many
//! confirmations, so when an event has been answered no instance still serves what it dropped.
//!
//! Pub/sub connections do not reconnect by themselves: the subscriber loop reconnects with a
//! delay, and the near cache serves only while a subscription is live (it is emptied when one
//! is lost and again when a new one is up, since messages may have been missed in between).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::cache::NearCache;
use crate::store::tiered::FallbackStore;
use crate::store::{Invalidation, StoreError};

/// On a cluster, how long a subscriber count (`PUBSUB NUMSUB` on every node) is used again by
/// later publications of this instance, instead of asking every node for each one. An
/// instance whose subscription began after the count was asked for is not counted, and need
/// not be: it keeps no copy of a read that started less than [`WARM_UP`] after its
/// subscription, so none of a read older than the bumps of any publication that used the
/// count (they come before the publication, and it comes less than `COUNT_REUSE` after the
/// count was asked for). A count found too high (an instance left) costs one wait of
/// `l1.ack_timeout_ms`, after which it is asked for again.
pub const COUNT_REUSE: Duration = Duration::from_secs(1);

/// On a cluster, how long after its subscription an instance keeps no near-cache copy: more
/// than [`COUNT_REUSE`].
pub const WARM_UP: Duration = Duration::from_secs(2);

/// A subscriber count and when it was asked for.
#[derive(Debug, Clone, Copy)]
struct Count {
    asked_at: Instant,
    subscribers: u64,
}

/// What an invalidation message asks of every near cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NearOp {
    /// Drop what this invalidation names.
    Op(Invalidation),
    /// Drop everything (version switch).
    Flush,
}

#[derive(Debug, Serialize, Deserialize)]
struct Message {
    from: String,
    id: u64,
    op: NearOp,
}

#[derive(Default)]
struct Pending {
    /// The instances that confirmed.
    acked: Mutex<Vec<String>>,
    notify: Notify,
}

/// Forgets a pending publication however its wait ends (a request cancelled while waiting
/// for confirmations included).
struct Forget<'a> {
    bus: &'a Bus,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.bus.pending().remove(&self.id);
    }
}

/// Who confirmed a publication.
#[derive(Debug, Clone, Default)]
pub struct Confirmed {
    /// Whether every instance the message reached confirmed it.
    pub all: bool,
    /// The instances that confirmed (ids).
    pub by: Vec<String>,
}

/// This instance's end of the bus.
pub struct Bus {
    instance: String,
    channel: String,
    ack_channel: String,
    ack_prefix: String,
    ack_timeout: Duration,
    retry: Duration,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, Arc<Pending>>>,
    /// On a cluster, the last subscriber count (see [`COUNT_REUSE`]).
    count: Mutex<Option<Count>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("instance", &self.instance)
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// The bus of the service under `prefix`, for the instance `instance` (its id in the
    /// registry of instances too). `ack_timeout` bounds the wait for confirmations; `retry` is
    /// the delay between subscription attempts.
    pub fn new(prefix: &str, instance: String, ack_timeout: Duration, retry: Duration) -> Self {
        let ack_prefix = format!("{prefix}:_l1:ack:");
        Self {
            channel: format!("{prefix}:_l1:invalidate"),
            ack_channel: format!("{ack_prefix}{instance}"),
            ack_prefix,
            instance,
            ack_timeout,
            retry,
            next_id: AtomicU64::new(1),
            pending: Mutex::default(),
            count: Mutex::default(),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Pending>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self) -> std::sync::MutexGuard<'_, Option<Count>> {
        self.count.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many instances a publication on a cluster must be confirmed by: every node's
    /// subscribers, asked for at most once per [`COUNT_REUSE`]. `None` on one Redis, where
    /// `PUBLISH` counts them.
    async fn subscribers(&self, store: &FallbackStore) -> Result<Option<u64>, StoreError> {
        let redis = store.redis();
        if !redis.is_cluster() {
            return Ok(None);
        }
        let known = *self.count();
        if let Some(c) = known.filter(|c| c.asked_at.elapsed() < COUNT_REUSE) {
            return Ok(Some(c.subscribers));
        }
        // Taken before asking: whoever subscribes after this may be missed by the count.
        let asked_at = Instant::now();
        let subscribers = redis.subscribers(&self.channel).await?;
        if let Some(subscribers) = subscribers {
            *self.count() = Some(Count {
                asked_at,
                subscribers,
            });
        }
        Ok(subscribers)
    }

    /// Publishes `op` and waits until every subscribed instance confirmed it dropped its
    /// copies, or `l1.ack_timeout_ms` passed. Returns who confirmed.
    pub async fn publish(&self, store: &FallbackStore, near: &NearCache, op: NearOp) -> Confirmed {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let waiter = Arc::new(Pending::default());
        self.pending().insert(id, waiter.clone());
        let _forget = Forget { bus: self, id };
        let count = |w: &Pending| w.acked.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
        let payload = serde_json::to_string(&Message {
            from: self.instance.clone(),
            id,
            op,
        })
        .unwrap_or_default();
        let published = async {
            let everywhere = self.subscribers(store).await?;
            let here = store.redis().publish(&self.channel, &payload).await?;
            Ok::<_, StoreError>(everywhere.unwrap_or(0).max(here))
        };
        let confirmed = match published.await {
            Ok(receivers) => {
                let wait = async {
                    loop {
                        let notified = waiter.notify.notified();
                        if count(&waiter) >= receivers {
                            return;
                        }
                        notified.await;
                    }
                };
                tokio::time::timeout(self.ack_timeout, wait).await.is_ok()
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish a near-cache invalidation; other instances drop their copies within l1.max_lifetime_ms");
                false
            }
        };
        if !confirmed {
            // The count may be too high (an instance left): asked for again next time.
            *self.count() = None;
            near.ack_timed_out();
        }
        let by = waiter
            .acked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Confirmed { all: confirmed, by }
    }

    fn handle(&self, near: &NearCache, store: &Arc<FallbackStore>, channel: &str, payload: &[u8]) {
        if channel == self.ack_channel {
            // `{id}|{instance}`: which publication, confirmed by whom.
            let ack = std::str::from_utf8(payload)
                .ok()
                .and_then(|s| s.split_once('|'))
                .and_then(|(id, by)| Some((id.parse::<u64>().ok()?, by.to_owned())));
            if let Some((id, by)) = ack
                && let Some(p) = self.pending().get(&id).cloned()
            {
                // One instance subscribed twice (an overlapping resubscription) confirms
                // twice; it counts once.
                let mut acked = p.acked.lock().unwrap_or_else(|e| e.into_inner());
                if !acked.contains(&by) {
                    acked.push(by);
                }
                drop(acked);
                p.notify.notify_one();
            }
            return;
        }
        let Ok(msg) = serde_json::from_slice::<Message>(payload) else {
            tracing::warn!("ignoring a malformed near-cache invalidation message");
            return;
        };
        // The sender applied it locally before publishing; everyone confirms.
        if msg.from != self.instance {
            match &msg.op {
                NearOp::Op(op) => {
                    near.apply(op);
                    // An instance serving from memory meanwhile drops its copies too.
                    store.heard(op);
                }
                NearOp::Flush => near.flush(),
            }
        }
        let store = store.clone();
        let ack_channel = format!("{}{}", self.ack_prefix, msg.from);
        let ack = format!("{}|{}", msg.id, self.instance);
        // Not awaited here: the subscription loop must keep reading while the confirmation
        // goes out (a single PUBLISH, bounded by the command time-out).
        tokio::spawn(async move {
            if let Err(e) = store.redis().publish(&ack_channel, &ack).await {
                tracing::debug!(error = %e, "near-cache confirmation not sent");
            }
        });
    }

    /// Keeps a subscription up until `cancel`: the near cache serves only while it is.
    pub async fn run(
        self: Arc<Self>,
        near: Arc<NearCache>,
        store: Arc<FallbackStore>,
        connect_timeout: Duration,
        cancel: CancellationToken,
    ) {
        let mut was_live = false;
        loop {
            // Where the request path goes now (sentinel mode: the master named last).
            let target = store.redis().dedicated_target();
            let subscribe = async {
                let client = store
                    .redis()
                    .pubsub_client()
                    .map_err(|e| redis::RedisError::from(std::io::Error::other(e.to_string())))?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&self.channel).await?;
                pubsub.subscribe(&self.ack_channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match tokio::time::timeout(connect_timeout, subscribe).await {
                Ok(Ok(pubsub)) => {
                    // On a cluster, publishers may count subscribers from before this one
                    // for a while (see `COUNT_REUSE`): no copies until that has passed.
                    let cluster = store.redis().is_cluster();
                    if cluster {
                        near.hold_copies();
                    }
                    near.set_live(true);
                    store.hearing(true);
                    let warm_up =
                        tokio::time::sleep(if cluster { WARM_UP } else { Duration::ZERO });
                    tokio::pin!(warm_up);
                    let mut warm = !cluster;
                    if was_live {
                        tracing::info!("near-cache subscription restored");
                    }
                    was_live = true;
                    let mut messages = pubsub.into_on_message();
                    let mut moved = tokio::time::interval(self.retry);
                    let lost = loop {
                        tokio::select! {
                            () = cancel.cancelled() => {
                                store.hearing(false);
                                near.set_live(false);
                                return;
                            }
                            () = &mut warm_up, if !warm => {
                                warm = true;
                                near.keep_copies();
                            }
                            msg = messages.next() => match msg {
                                Some(m) => self.handle(&near, &store, m.get_channel_name(), m.get_payload_bytes()),
                                None => break true,
                            },
                            // The request path moved to another master while the old one
                            // stays up: others publish on the new one, so this subscription
                            // moves too, instead of leaving every invalidation to direct calls.
                            _ = moved.tick() => if store.redis().dedicated_target() != target {
                                break false;
                            },
                        }
                    };
                    store.hearing(false);
                    near.set_live(false);
                    if lost {
                        tracing::warn!(
                            "near-cache subscription lost; near cache emptied and off until resubscribed"
                        );
                    } else {
                        tracing::info!(
                            "the request path moved to another redis; near cache emptied and resubscribing there"
                        );
                    }
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "near-cache subscription failed"),
                Err(_) => tracing::debug!("near-cache subscription timed out"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(self.retry) => {}
            }
        }
    }
}

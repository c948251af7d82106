//! Redis Sentinel (`redis.mode = "sentinel"`): the master is whatever the sentinels name now.
//!
//! redis-rs's sentinel client finds the master only when it connects and does not follow a
//! failover (redis-rs #1438), and a demoted master still answers `PING` (deadpool #372). So:
//! - every new connection asks the sentinels for the master's address first
//!   (`SENTINEL get-master-addr-by-name`, the newest configuration epoch among the answers to
//!   that one question), and then asks that server its `ROLE`, refusing a server that is not
//!   a master (yet, or any more);
//! - a watcher subscribed to `+switch-master` on a sentinel drops the request path's
//!   connection the moment the master changes, and the heartbeat checks `ROLE` every second
//!   in case the watcher missed it.
//!
//! After the counter bumps of an invalidation and their `WAIT 1`, the sentinels are asked
//! again and must still name the server the bumps went to (`RedisStore::confirm_master`): the
//! replica that acknowledged may be one they re-point to a master they already promoted. One
//! they no longer name, or fewer than a majority of them answering, counts as an unreachable
//! Redis.
//!
//! The promoted replica is another Redis process, with another `run_id`, holding the
//! keyspace's marker written by the old one: the link takes it for a Redis restored from a
//! snapshot ([`super::link::Restart::Restored`]), so every generation is bumped before any
//! read is served from it. Invalidations the old master acknowledged but never replicated
//! (it may go on accepting writes for seconds after the sentinels gave up on it) are thereby
//! covered: nothing stored before the switch is served after it.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::store::StoreError;

/// How long the sentinels that have not answered yet are waited for once a majority has.
const GRACE: Duration = Duration::from_millis(20);

/// Settings of the sentinel mode.
#[derive(Debug, Clone)]
pub struct SentinelOptions {
    /// Sentinel URLs (`redis://host:26379`, credentials of the sentinels themselves).
    pub urls: Vec<String>,
    /// The monitored master's name.
    pub master_name: String,
}

/// The sentinels, and how to reach the master they name.
pub(crate) struct Sentinels {
    clients: Vec<redis::Client>,
    /// One open connection per sentinel, kept between questions (they are asked after every
    /// replicated invalidation) and dropped when it fails.
    conns: Vec<std::sync::Mutex<Option<redis::aio::MultiplexedConnection>>>,
    master_name: String,
    /// `redis.url`: the credentials, TLS and database of the data nodes; its host and port
    /// are replaced by the master's.
    data_url: reqwest::Url,
    tls_roots: Option<Vec<u8>>,
}

/// What the sentinels asked at once say about the master: the newest configuration among
/// their answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Named {
    /// The newest configuration epoch among the answers.
    pub(crate) epoch: u64,
    /// The master's host in it.
    pub(crate) host: String,
    /// Its port.
    pub(crate) port: u16,
    /// Whether every answer of that epoch names the same address.
    pub(crate) agreed: bool,
    /// How many sentinels answered.
    pub(crate) answered: usize,
}

impl Named {
    /// Whether this names, without disagreement, the server at `addr` (`host:port`, as a
    /// client's address prints).
    pub(crate) fn is(&self, addr: &str) -> bool {
        self.agreed && format!("{}:{}", self.host, self.port) == addr
    }
}

/// `config-epoch` from a `SENTINEL MASTER` reply (a flat list of names and values).
fn parse_epoch(fields: &[String]) -> Option<u64> {
    fields
        .chunks(2)
        .find(|p| p.first().is_some_and(|k| k == "config-epoch"))
        .and_then(|p| p.get(1))?
        .parse()
        .ok()
}

/// The newest configuration among one query's answers `(epoch, host, port)`. Epochs are
/// compared within one query only, never with one seen earlier: sentinels redeployed without
/// their state start again from epoch 0 while naming the right master.
fn newest(answers: &[(u64, String, u16)]) -> Option<Named> {
    let epoch = answers.iter().map(|(e, _, _)| *e).max()?;
    let mut current = answers.iter().filter(|(e, _, _)| *e == epoch);
    let (_, host, port) = current.next()?;
    let agreed = current.all(|(_, h, p)| h == host && p == port);
    Some(Named {
        epoch,
        host: host.clone(),
        port: *port,
        agreed,
        answered: answers.len(),
    })
}

fn open(url: &str, tls_roots: Option<&Vec<u8>>) -> redis::RedisResult<redis::Client> {
    match tls_roots {
        Some(roots) if url.starts_with("rediss://") => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(roots.clone()),
            },
        ),
        _ => redis::Client::open(url),
    }
}

/// `SENTINEL get-master-addr-by-name` and `SENTINEL MASTER`'s fields.
type Reply = (Option<(String, u16)>, Vec<String>);

impl Sentinels {
    pub(crate) fn new(
        opts: &SentinelOptions,
        data_url: &str,
        tls_roots: Option<Vec<u8>>,
    ) -> Result<Self, StoreError> {
        let bad = |what: &str| StoreError::Command(format!("invalid {what}"));
        let clients = opts
            .urls
            .iter()
            .map(|u| open(u, tls_roots.as_ref()).map_err(|_| bad("redis.sentinel_urls entry")))
            .collect::<Result<Vec<_>, _>>()?;
        let data_url = reqwest::Url::parse(data_url).map_err(|_| bad("redis.url"))?;
        Ok(Self {
            conns: clients
                .iter()
                .map(|_| std::sync::Mutex::default())
                .collect(),
            clients,
            master_name: opts.master_name.clone(),
            data_url,
            tls_roots,
        })
    }

    fn held(&self, i: usize) -> Option<redis::aio::MultiplexedConnection> {
        let slot = self.conns.get(i)?;
        slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn hold(&self, i: usize, conn: Option<redis::aio::MultiplexedConnection>) {
        if let Some(slot) = self.conns.get(i) {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = conn;
        }
    }

    /// One sentinel's answer: its configuration epoch for the master and the master's
    /// address. Both in one pipeline, which a sentinel runs without interleaving: during a
    /// failover, the sentinel running it reports the new epoch in `SENTINEL MASTER` while that
    /// reply's address is still the old master's, so the address comes from
    /// `get-master-addr-by-name`, which names the promoted replica from the same moment.
    async fn ask(&self, i: usize) -> Result<(u64, String, u16), String> {
        let Some(client) = self.clients.get(i) else {
            return Err("no such sentinel".to_owned());
        };
        let mut pipe = redis::pipe();
        pipe.cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .cmd("SENTINEL")
            .arg("MASTER")
            .arg(&self.master_name);
        let held = match self.held(i) {
            Some(mut c) => pipe.query_async::<Reply>(&mut c).await.ok(),
            None => None,
        };
        let (addr, fields) = match held {
            Some(reply) => reply,
            // None open, or it went stale (the sentinel restarted): one new connection.
            None => {
                self.hold(i, None);
                let mut c = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| e.to_string())?;
                let reply = pipe
                    .query_async::<Reply>(&mut c)
                    .await
                    .map_err(|e| e.to_string())?;
                self.hold(i, Some(c));
                reply
            }
        };
        let (host, port) =
            addr.ok_or_else(|| "the sentinel does not monitor this master".to_owned())?;
        let epoch =
            parse_epoch(&fields).ok_or_else(|| "unreadable SENTINEL MASTER reply".to_owned())?;
        Ok((epoch, host, port))
    }

    /// What the sentinels say about the master now: every sentinel asked at once, each within
    /// `timeout`, and the newest configuration among their answers taken (see [`newest`]).
    /// Right after a failover only the sentinel that ran it may know the new master while the
    /// others still name the old one, which goes on accepting writes until it is reconfigured
    /// (seconds later): the configuration epoch says which answer is current.
    ///
    /// Once a majority of the sentinels has answered, the others get [`GRACE`] more: a hung
    /// sentinel (a host gone without a reset) would otherwise add the whole `timeout` to every
    /// invalidation, which asks after its `WAIT`. A failover needs a majority's votes, and the
    /// sentinel that runs it is among those answering unless it is cut off from this instance.
    pub(crate) async fn named(&self, timeout: Duration) -> Result<Named, StoreError> {
        let majority = self.majority();
        let mut asks: futures_util::stream::FuturesUnordered<_> = (0..self.clients.len())
            .map(|i| async move { (i, tokio::time::timeout(timeout, self.ask(i)).await) })
            .collect();
        let mut last = String::from("no sentinel configured");
        let mut answers = Vec::new();
        let mut until: Option<tokio::time::Instant> = None;
        loop {
            let next = match until {
                None => asks.next().await,
                Some(at) => match tokio::time::timeout_at(at, asks.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
            };
            let Some((i, answer)) = next else { break };
            match answer {
                Ok(Ok(a)) => answers.push(a),
                Ok(Err(e)) => last = e,
                Err(_) => {
                    self.hold(i, None);
                    last = "sentinel did not answer in time".to_owned();
                }
            }
            if until.is_none() && answers.len() >= majority {
                until = Some(tokio::time::Instant::now() + GRACE);
            }
        }
        newest(&answers)
            .ok_or_else(|| StoreError::Unavailable(format!("no sentinel named the master: {last}")))
    }

    /// A majority of the configured sentinels: what a failover needs to be authorised, so a
    /// confirmation that rests on fewer answers could come from a minority cut off from one.
    pub(crate) fn majority(&self) -> usize {
        self.clients.len() / 2 + 1
    }

    /// The master's address in the newest configuration the sentinels report now.
    pub(crate) async fn master(&self, timeout: Duration) -> Result<(String, u16), StoreError> {
        let named = self.named(timeout).await?;
        if !named.agreed {
            tracing::warn!(
                epoch = named.epoch,
                "sentinels of the same configuration epoch name different masters"
            );
        }
        Ok((named.host, named.port))
    }

    /// A client for the master at `host:port`, with `redis.url`'s credentials and TLS.
    pub(crate) fn client_for(&self, host: &str, port: u16) -> Result<redis::Client, StoreError> {
        let mut url = self.data_url.clone();
        let bad = || StoreError::Command("sentinel gave an unusable master address".into());
        url.set_host(Some(host)).map_err(|_| bad())?;
        url.set_port(Some(port)).map_err(|()| bad())?;
        open(url.as_str(), self.tls_roots.as_ref()).map_err(|_| bad())
    }

    /// Calls `switched` each time a sentinel announces a new master for this master name,
    /// until `cancel`. Subscribes on one sentinel at a time, moving on to the next when it
    /// fails.
    pub(crate) async fn watch(
        &self,
        retry: Duration,
        cancel: CancellationToken,
        switched: impl Fn(),
    ) {
        let prefix = format!("{} ", self.master_name);
        let mut i = 0usize;
        loop {
            let Some(client) = self.clients.get(i % self.clients.len().max(1)) else {
                return;
            };
            i = i.wrapping_add(1);
            let subscribed = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe("+switch-master").await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = tokio::select! {
                () = cancel.cancelled() => return,
                r = tokio::time::timeout(retry * 2, subscribed) => r,
            };
            if let Ok(Ok(pubsub)) = pubsub {
                let mut messages = pubsub.into_on_message();
                loop {
                    let message = tokio::select! {
                        () = cancel.cancelled() => return,
                        m = messages.next() => m,
                    };
                    let Some(message) = message else { break };
                    // `<name> <old-ip> <old-port> <new-ip> <new-port>`
                    let payload: String = message.get_payload().unwrap_or_default();
                    if payload.starts_with(&prefix) {
                        tracing::warn!(switch = %payload, "sentinel switched the master; reconnecting");
                        switched();
                    }
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(retry) => {}
            }
        }
    }
}

/// Whether a `ROLE` reply names a master.
pub(crate) fn is_master(role: &redis::Value) -> bool {
    match role {
        redis::Value::Array(parts) => matches!(
            parts.first(),
            Some(redis::Value::BulkString(b)) if b.as_slice() == b"master"
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_is_reached_with_the_data_urls_credentials() {
        let s = Sentinels::new(
            &SentinelOptions {
                urls: vec!["redis://127.0.0.1:26379".into()],
                master_name: "m".into(),
            },
            "redis://app:secret@placeholder:6379/2",
            None,
        )
        .expect("sentinels");
        let c = s.client_for("10.0.0.7", 6390).expect("client");
        let info = c.get_connection_info();
        assert_eq!(info.addr().to_string(), "10.0.0.7:6390");
        assert_eq!(info.redis_settings().db(), 2);
        assert_eq!(info.redis_settings().username(), Some("app"));
    }

    #[test]
    fn a_sentinel_master_reply_gives_the_epoch() {
        let reply: Vec<String> = [
            "name",
            "m",
            "ip",
            "10.0.0.2",
            "port",
            "6380",
            "flags",
            "master",
            "config-epoch",
            "7",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(parse_epoch(&reply), Some(7));
        assert_eq!(parse_epoch(&reply[..6]), None);
    }

    #[test]
    fn the_newest_epoch_of_one_query_is_taken_however_low() {
        let a = |e: u64, port: u16| (e, "10.0.0.2".to_owned(), port);
        // A sentinel behind the one that ran a failover names the old master.
        let named = newest(&[a(3, 6380), a(4, 6381), a(3, 6380)]).expect("named");
        assert_eq!((named.epoch, named.port, named.agreed), (4, 6381, true));
        assert!(named.is("10.0.0.2:6381"));
        assert!(!named.is("10.0.0.2:6380"));
        assert_eq!(named.answered, 3);
        // Sentinels redeployed without their state: epoch 0 is an answer like any other.
        let named = newest(&[a(0, 6381)]).expect("named");
        assert!(named.is("10.0.0.2:6381"));
        // Two masters in one epoch: nothing is confirmed.
        let named = newest(&[a(5, 6380), a(5, 6381)]).expect("named");
        assert!(!named.agreed);
        assert!(!named.is("10.0.0.2:6380"));
        assert_eq!(newest(&[]), None);
    }

    #[test]
    fn only_a_master_role_is_a_master() {
        let bulk = |s: &str| redis::Value::BulkString(s.as_bytes().to_vec());
        assert!(is_master(&redis::Value::Array(vec![
            bulk("master"),
            redis::Value::Int(0)
        ])));
        assert!(!is_master(&redis::Value::Array(vec![bulk("slave")])));
        assert!(!is_master(&redis::Value::Nil));
    }
}

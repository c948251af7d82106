//! Redis Sentinel (`redis.mode = "sentinel"`): the master is whatever the sentinels name now.
//!
//! redis-rs's sentinel client finds the master only when it connects and does not follow a
//! failover (redis-rs #1438), and a demoted master still answers `PING` (deadpool #372). So:
//! - every new connection asks the sentinels for the master's address first
//!   (`SENTINEL get-master-addr-by-name`), and then asks that server its `ROLE`, refusing a
//!   server that is not a master (yet, or any more);
//! - a watcher subscribed to `+switch-master` on a sentinel drops the request path's
//!   connection the moment the master changes, and the heartbeat checks `ROLE` every second
//!   in case the watcher missed it.
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
    master_name: String,
    /// `redis.url`: the credentials, TLS and database of the data nodes; its host and port
    /// are replaced by the master's.
    data_url: reqwest::Url,
    tls_roots: Option<Vec<u8>>,
    /// The newest configuration epoch acted on.
    epoch: std::sync::atomic::AtomicU64,
}

/// `(config-epoch, ip, port)` from a `SENTINEL MASTER` reply (a flat list of names and values).
fn parse_master(fields: &[String]) -> Option<(u64, String, u16)> {
    let get = |name: &str| {
        fields
            .chunks(2)
            .find(|p| p.first().is_some_and(|k| k == name))
            .and_then(|p| p.get(1))
    };
    Some((
        get("config-epoch")?.parse().ok()?,
        get("ip")?.clone(),
        get("port")?.parse().ok()?,
    ))
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
            clients,
            master_name: opts.master_name.clone(),
            data_url,
            tls_roots,
            epoch: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The master's address in the newest configuration any sentinel reports, every sentinel
    /// asked at once, each within `timeout`. Right after a failover only the sentinel that ran
    /// it knows the new master, while the others still name the old one, which goes on
    /// accepting writes until it is reconfigured (seconds later): the configuration epoch
    /// (`SENTINEL MASTER`'s `config-epoch`) says which answer is current, and an answer older
    /// than one already acted on is never taken.
    pub(crate) async fn master(&self, timeout: Duration) -> Result<(String, u16), StoreError> {
        let asks = self.clients.iter().map(|client| async move {
            let ask = async {
                let mut c = client.get_multiplexed_async_connection().await?;
                redis::cmd("SENTINEL")
                    .arg("MASTER")
                    .arg(&self.master_name)
                    .query_async::<Vec<String>>(&mut c)
                    .await
            };
            match tokio::time::timeout(timeout, ask).await {
                Ok(Ok(fields)) => parse_master(&fields)
                    .ok_or_else(|| "unreadable SENTINEL MASTER reply".to_owned()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("sentinel did not answer in time".to_owned()),
            }
        });
        let answers = futures_util::future::join_all(asks).await;
        let mut last = String::from("no sentinel configured");
        let mut best: Option<(u64, String, u16)> = None;
        for answer in answers {
            match answer {
                Ok((epoch, host, port)) => {
                    if best.as_ref().is_none_or(|(e, _, _)| epoch > *e) {
                        best = Some((epoch, host, port));
                    }
                }
                Err(e) => last = e,
            }
        }
        let Some((epoch, host, port)) = best else {
            return Err(StoreError::Unavailable(format!(
                "no sentinel named the master: {last}"
            )));
        };
        let seen = self
            .epoch
            .fetch_max(epoch, std::sync::atomic::Ordering::AcqRel);
        if epoch < seen {
            return Err(StoreError::Unavailable(format!(
                "the sentinels that answered are behind (configuration epoch {epoch}, {seen} seen)"
            )));
        }
        Ok((host, port))
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
    fn a_sentinel_master_reply_gives_the_epoch_and_address() {
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
        assert_eq!(parse_master(&reply), Some((7, "10.0.0.2".into(), 6380)));
        assert_eq!(parse_master(&reply[..6]), None);
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

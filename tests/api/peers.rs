//! Direct invalidations between instances trust nothing the Redis registry says (SPEC section
//! 2, "Peers never trust the registry"): they carry no secret, go only to addresses
//! `peers.allowed` names, a silent member costs one time-out per `peers.down_ms`, and an
//! instance leaves the registry when it stops.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::helpers::*;

/// One request a capture server received: method, path, headers and body, as text.
#[derive(Debug, Clone)]
struct Captured {
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

/// An HTTP server on `ip` that records every request and answers 200, standing in for
/// whatever a forged registry entry points at.
struct Capture {
    url: String,
    seen: Arc<Mutex<Vec<Captured>>>,
}

impl Capture {
    async fn start(ip: &str) -> Self {
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind capture");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen: Arc<Mutex<Vec<Captured>>> = Arc::default();
        let record = seen.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let record = record.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, 1 << 20)
                    .await
                    .unwrap_or_default();
                record.lock().expect("lock").push(Captured {
                    path: parts.uri.to_string(),
                    headers: parts
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_owned(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect(),
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
                axum::Json(json!({"invalidated": 0}))
            }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, seen }
    }

    fn requests(&self) -> Vec<Captured> {
        self.seen.lock().expect("lock").clone()
    }
}

/// A listener that accepts connections and never answers, counting them.
async fn silent_listener() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(conn);
        }
    });
    (url, accepted)
}

/// Redis' clock in ms, as the registry scores members.
async fn redis_now_ms(redis: &TestRedis) -> u64 {
    let (secs, micros): (String, String) = redis.cmd(&["TIME"]).await.expect("TIME");
    secs.parse::<u64>().expect("secs") * 1000 + micros.parse::<u64>().expect("micros") / 1000
}

/// Adds a member to `app`'s registry as anything that can write the Redis could.
async fn forge_member(redis: &TestRedis, app: &TestApp, member: &str, score: u64) {
    let key = app.state.keys.instances_key();
    let _: i64 = redis
        .cmd(&["ZADD", &key, &score.to_string(), member])
        .await
        .expect("ZADD");
}

/// The key instances sign direct invalidations with when `peers.secret` is unset: derived
/// from the admin token, never the token itself.
fn derived_peer_key() -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(TOKEN.as_bytes()).expect("key");
    mac.update(b"runcache peers.secret v1");
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn direct_invalidations_carry_no_secret_and_go_only_to_allowed_hosts() {
    let redis = TestRedis::start().await;
    // Only 127.0.0.1 is allowed: 127.0.0.3 stands for an address outside peers.allowed (an
    // internal service a forged entry would point at), and is still on loopback.
    let a = spawn_app_with(Some(&redis), |s| {
        s.peers.allowed = vec!["127.0.0.1/32".into()];
    })
    .await;
    let allowed = Capture::start("127.0.0.1").await;
    let outside = Capture::start("127.0.0.3").await;
    let future = Capture::start("127.0.0.1").await;
    let now = redis_now_ms(&redis).await;
    forge_member(&redis, &a, &format!("forged1|{}", allowed.url), now).await;
    forge_member(&redis, &a, &format!("forged2|{}", outside.url), now).await;
    forge_member(
        &redis,
        &a,
        &format!("forged3|{}/internal/admin?x=", allowed.url),
        now,
    )
    .await;
    // A last-seen time far in the future would keep a forged member for ever.
    forge_member(
        &redis,
        &a,
        &format!("forged4|{}", future.url),
        now + 1_000_000_000,
    )
    .await;
    wait_for(|| async { a.state.store.tiered().peers().reachable() >= 1 }).await;
    assert_eq!(
        a.state.store.tiered().peers().reachable(),
        1,
        "only the member on an allowed host, at a bare URL, with a sane last-seen time is told"
    );
    // The members outside peers.allowed or at a URL with a path are known all the same (they
    // keep the memory bound); the one from the future is not.
    assert_eq!(a.state.store.tiered().peers().count(), 3);

    // An ordinary event with Redis healthy: the forged member did not confirm on the
    // near-cache bus, so the instance tells it directly.
    assert_eq!(
        a.event("training-completed", json!("42")).await.status(),
        200
    );
    wait_for(|| async { !allowed.requests().is_empty() }).await;
    assert!(
        outside.requests().is_empty(),
        "an address outside peers.allowed was sent {:?}",
        outside.requests()
    );
    assert!(
        future.requests().is_empty(),
        "a member claiming a future last-seen time was used"
    );
    let key = a.state.keys.instances_key();
    let score: Option<String> = redis
        .cmd(&["ZSCORE", &key, &format!("forged4|{}", future.url)])
        .await
        .expect("ZSCORE");
    assert_eq!(
        score, None,
        "a member from the future stays in the registry"
    );

    let key_hex = hex(&derived_peer_key());
    for req in allowed.requests() {
        assert_eq!(req.path, "/cache/peer-invalidation");
        for (name, value) in &req.headers {
            assert_ne!(name, "authorization", "a peer request carried {value}");
            assert!(
                !value.contains(TOKEN) && !value.contains(&key_hex),
                "header {name} carries a secret"
            );
        }
        assert!(!req.body.contains(TOKEN) && !req.body.contains(&key_hex));
        // It is signed under the derived key, over the timestamp and the body.
        let header = |n: &str| {
            req.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let (ts, sig) = (
            header("x-runcache-timestamp"),
            header("x-runcache-signature"),
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(&derived_peer_key()).expect("key");
        mac.update(format!("{ts}.{}", req.body).as_bytes());
        assert_eq!(sig, format!("sha256={}", hex(&mac.finalize().into_bytes())));
        let body: serde_json::Value = serde_json::from_str(&req.body).expect("json body");
        assert_eq!(body["from"], json!(a.state.store.tiered().peers().id()));
    }
}

#[tokio::test]
async fn peer_invalidations_need_a_valid_signature_or_the_admin_token() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    let prefix = &app.prefix;
    let body = json!({
        "from": "abc123",
        "delivery": "d1",
        "invalidation": {"delete": [format!("{prefix}:v1:model:metrics:1")]}
    })
    .to_string();
    let ts = runcache::security::signature::now_secs().to_string();
    let sign = |key: &[u8], ts: &str| {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("key");
        mac.update(format!("{ts}.{body}").as_bytes());
        format!("sha256={}", hex(&mac.finalize().into_bytes()))
    };
    let post = |headers: Vec<(&'static str, String)>| {
        let mut req = app
            .client
            .post(app.url("/cache/peer-invalidation"))
            .header("content-type", "application/json")
            .body(body.clone());
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.send()
    };
    // Unsigned and without the token; signed with the admin token as key; a stale timestamp.
    assert_error(post(vec![]).await.expect("send"), 401, "unauthorized").await;
    assert_error(
        post(vec![
            ("x-runcache-timestamp", ts.clone()),
            ("x-runcache-signature", sign(TOKEN.as_bytes(), &ts)),
        ])
        .await
        .expect("send"),
        401,
        "unauthorized",
    )
    .await;
    let stale = (runcache::security::signature::now_secs() - 3600).to_string();
    assert_error(
        post(vec![
            ("x-runcache-timestamp", stale.clone()),
            ("x-runcache-signature", sign(&derived_peer_key(), &stale)),
        ])
        .await
        .expect("send"),
        401,
        "unauthorized",
    )
    .await;
    let signed = post(vec![
        ("x-runcache-timestamp", ts.clone()),
        ("x-runcache-signature", sign(&derived_peer_key(), &ts)),
    ])
    .await
    .expect("send");
    assert_eq!(signed.status(), 200);
    // The admin token is still accepted (an operator's own call).
    let bearer = post(vec![("authorization", format!("Bearer {TOKEN}"))])
        .await
        .expect("send");
    assert_eq!(bearer.status(), 200);

    // A signed delivery without its own id could be taken for another alike: refused.
    let bare = json!({
        "from": "abc123",
        "invalidation": {"delete": [format!("{prefix}:v1:model:metrics:1")]}
    })
    .to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(&derived_peer_key()).expect("key");
    mac.update(format!("{ts}.{bare}").as_bytes());
    let resp = app
        .client
        .post(app.url("/cache/peer-invalidation"))
        .header("content-type", "application/json")
        .header("x-runcache-timestamp", ts.clone())
        .header(
            "x-runcache-signature",
            format!("sha256={}", hex(&mac.finalize().into_bytes())),
        )
        .body(bare)
        .send()
        .await
        .expect("send");
    assert_error(resp, 400, "invalid_argument").await;

    // An explicit peers.secret replaces the derived key.
    let other = spawn_app_with(Some(&redis), |s| {
        s.peers.secret = Some(secrecy::SecretString::from("0123456789abcdef0123"));
    })
    .await;
    let ts = runcache::security::signature::now_secs().to_string();
    let send = |key: &[u8]| {
        other
            .client
            .post(other.url("/cache/peer-invalidation"))
            .header("content-type", "application/json")
            .header("x-runcache-timestamp", ts.clone())
            .header("x-runcache-signature", sign(key, &ts))
            .body(
                json!({"from": "abc123", "delivery": "d2", "invalidation": {"delete": [format!("{}:v1:model:metrics:1", other.prefix)]}})
                    .to_string(),
            )
            .send()
    };
    assert_eq!(send(&derived_peer_key()).await.expect("send").status(), 401);
}

#[tokio::test]
async fn a_silent_member_costs_one_time_out_per_down_period_not_one_per_invalidation() {
    let redis = TestRedis::start().await;
    let a = spawn_app(Some(&redis)).await;
    let (url, accepted) = silent_listener().await;
    let now = redis_now_ms(&redis).await;
    forge_member(&redis, &a, &format!("silent|{url}"), now).await;
    wait_for(|| async { a.state.store.tiered().peers().reachable() == 1 }).await;
    for run in 0..5 {
        let resp = a.event("training-completed", json!(run)).await;
        assert_eq!(resp.status(), 200);
    }
    // Only the first invalidation waited for it; the others sent it in the background.
    let sends = a.state.store.tiered().peers().sends();
    assert_eq!(
        (sends.silent, sends.confirmed),
        (1, 0),
        "a member that never answers was waited for more than once within peers.down_ms"
    );
    assert!(sends.in_background >= 1, "{sends:?}");
    // At most one background delivery is under way at a time; what comes meanwhile is merged
    // and sent after it, so every invalidation is still sent: at least the awaited one, one
    // in the background, and the merged rest.
    assert!(accepted.load(Ordering::SeqCst) <= 5);
    wait_for(|| async { accepted.load(Ordering::SeqCst) >= 3 }).await;
    assert_eq!(a.stats().await["store"]["peer_sends"]["silent"], json!(1));
}

#[tokio::test]
async fn a_member_outside_peers_allowed_still_counts_as_another_instance() {
    // Told nothing, but known: the memory tier keeps memory.degraded_max_age_ms for it.
    let redis = TestRedis::start().await;
    let a = spawn_app_with(Some(&redis), |s| {
        s.peers.allowed = vec!["127.0.0.1/32".into()];
    })
    .await;
    let capture = Capture::start("127.0.0.3").await;
    let now = redis_now_ms(&redis).await;
    forge_member(&redis, &a, &format!("elsewhere|{}", capture.url), now).await;
    wait_for(|| async { a.state.store.tiered().peers().any() }).await;
    assert_eq!(a.state.store.tiered().peers().reachable(), 0);
    assert_eq!(
        a.event("training-completed", json!("5")).await.status(),
        200
    );
    assert!(capture.requests().is_empty());
}

#[tokio::test]
async fn an_instance_leaves_the_registry_when_it_stops() {
    let redis = TestRedis::start().await;
    let (a, mut b) = two_public_instances(&redis).await;
    wait_for(|| async { a.state.store.tiered().peers().count() == 1 }).await;
    let key = a.state.keys.instances_key();
    let b_member = b.state.store.tiered().peers().member().expect("member");
    let members: Vec<String> = redis
        .cmd(&["ZRANGE", &key, "0", "-1"])
        .await
        .expect("ZRANGE");
    assert!(members.contains(&b_member));
    b.stop().await;
    let members: Vec<String> = redis
        .cmd(&["ZRANGE", &key, "0", "-1"])
        .await
        .expect("ZRANGE");
    assert!(
        !members.contains(&b_member),
        "a stopped instance is still registered: {members:?}"
    );
    // The registry is scored by Redis' clock.
    let a_member = a.state.store.tiered().peers().member().expect("member");
    let score: String = redis
        .cmd(&["ZSCORE", &key, &a_member])
        .await
        .expect("ZSCORE");
    let score: u64 = score.parse().expect("score");
    let now = redis_now_ms(&redis).await;
    assert!(score <= now && now - score < 10_000, "{score} vs {now}");
}

//! Regression tests for known defects, one or more per defect (numbered as in the defect list
//! each test's doc names). Every test here failed on the code it was written against, for the
//! reason its doc gives, and asserts the behaviour the fix must have (SPEC.md is the contract):
//!
//! 1. a refusal other than 401/403 (404, 429, 3xx, 5xx) must accept nothing;
//! 2. a miss after an acknowledged invalidation must not join a flight that began before it;
//! 3. no entry is served from Redis while the start-up journal replay runs;
//! 4. a generation stamp read from Redis must not validate an entry in the memory tier;
//! 5. slow admin work, or one slow command, must not fail the instance over to memory;
//! 6. a signed event retried after a failure, or delivered twice, is answered 200; events have
//!    their own rate limit;
//! 7. journal file I/O must not block the runtime's workers;
//! 8. the memory tier's generation map and the refresh back-off map stay bounded;
//! 9. a journal overflow must not lose invalidations across a restart;
//! 10. no background fetch writes to Redis after a graceful stop;
//! 11. during an outage an event on one instance reaches the others;
//! 12. a Redis restarted from an older snapshot must not revive invalidated entries.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{
    TestApp, TestOrigin, TestRedis, assert_error, free_port, header, spawn_app, spawn_app_with,
    spawn_with_settings, start_app_unwaited, test_settings, wait_for,
};

const HIDDEN: &str = "/api/v1/models/train/hidden/metrics";

/// A GET of `path` with `Authorization: Bearer {token}` (none for `None`), redirects not
/// followed (runcache passes them through, and so must the test see them).
async fn get_as(app: &TestApp, path: &str, token: Option<&str>) -> reqwest::Response {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut req = client.get(app.url(path));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    req.send().await.expect("request")
}

/// What a response was: status, `X-Cache`, `Cache-Status` and body.
struct Seen {
    status: u16,
    x_cache: String,
    cache_status: String,
    body: String,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The metrics body's padding says nothing.
        let body = self.body.replace(&"x".repeat(200), "x…");
        f.debug_struct("Seen")
            .field("status", &self.status)
            .field("x_cache", &self.x_cache)
            .field("cache_status", &self.cache_status)
            .field("body", &body)
            .finish()
    }
}

impl Seen {
    async fn of(resp: reqwest::Response) -> Self {
        Self {
            status: resp.status().as_u16(),
            x_cache: header(&resp, "x-cache").to_owned(),
            cache_status: header(&resp, "cache-status").to_owned(),
            body: resp.text().await.expect("body"),
        }
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The metrics body's `revision` (`None` for any other body).
    fn revision(&self) -> Option<u64> {
        self.json()["revision"].as_u64()
    }

    /// The metrics body's `fetch` counter (`None` for any other body).
    fn fetch(&self) -> Option<u64> {
        self.json()["fetch"].as_u64()
    }

    fn is_hit(&self) -> bool {
        self.x_cache == "HIT"
    }
}

/// Token A reads run `hidden` twice: a MISS that stores it, then a HIT.
async fn a_reads_hidden(app: &TestApp) -> Seen {
    let first = Seen::of(get_as(app, HIDDEN, Some("A")).await).await;
    assert_eq!(
        (first.status, first.x_cache.as_str()),
        (200, "MISS"),
        "{first:?}"
    );
    let second = Seen::of(get_as(app, HIDDEN, Some("A")).await).await;
    assert_eq!(
        (second.status, second.x_cache.as_str()),
        (200, "HIT"),
        "{second:?}"
    );
    second
}

/// After A's entry is cached, `token` asks twice; the origin's first answer must be
/// `expected`. Returns both answers, A's cached body, and the origin's calls for the run
/// (3 when both of `token`'s requests went to the origin).
async fn a_refused_token_asks_twice(token: &str, expected: u16) -> (Seen, Seen, String, usize) {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    let cached = a_reads_hidden(&app).await;
    let first = Seen::of(get_as(&app, HIDDEN, Some(token)).await).await;
    assert_eq!(
        first.status, expected,
        "first answer for {token}: {first:?}"
    );
    assert_ne!(first.body, cached.body);
    let second = Seen::of(get_as(&app, HIDDEN, Some(token)).await).await;
    (first, second, cached.body, app.origin.calls(HIDDEN))
}

/// Defect 1: a refusal other than 401/403 counts as acceptance. The origin hides run `hidden`
/// from token B with a 404; B's second request must again be the origin's 404, not A's cached
/// 200.
#[tokio::test]
async fn a_404_that_hides_a_run_accepts_nothing() {
    let (first, second, cached, calls) = a_refused_token_asks_twice("B", 404).await;
    assert_eq!(first.x_cache, "MISS", "{first:?}");
    assert_eq!(
        first.json(),
        json!({"detail": "Model run hidden not found"})
    );
    assert_eq!(
        second.status, 404,
        "B's second request must again be the origin's 404, not A's cached answer: {second:?}"
    );
    assert!(!second.is_hit(), "{second:?}");
    assert_ne!(second.body, cached, "A's cached body reached B");
    assert_eq!(second.body, first.body);
    assert_eq!(calls, 3, "A once, B twice");
}

/// Defect 1: a 429 from the origin accepts nothing: the second request of the throttled
/// token is the origin's 429 again, not A's cached 200.
#[tokio::test]
async fn a_429_from_the_origin_accepts_nothing() {
    let (first, second, cached, calls) = a_refused_token_asks_twice("T429", 429).await;
    assert_eq!(first.x_cache, "MISS", "{first:?}");
    assert_eq!(
        second.status, 429,
        "the second request must again be the origin's 429, not A's cached answer: {second:?}"
    );
    assert!(!second.is_hit(), "{second:?}");
    assert_ne!(
        second.body, cached,
        "A's cached body reached a throttled token"
    );
    assert_eq!(calls, 3, "A once, the throttled token twice");
}

/// Defect 1: a redirect from the origin (302 with a `Location`) accepts nothing: the second
/// request is the origin's 302 again, not A's cached 200.
#[tokio::test]
async fn a_redirect_from_the_origin_accepts_nothing() {
    let (first, second, cached, calls) = a_refused_token_asks_twice("T302", 302).await;
    assert_eq!(first.x_cache, "MISS", "{first:?}");
    assert_eq!(
        second.status, 302,
        "the second request must again be the origin's 302, not A's cached answer: {second:?}"
    );
    assert!(!second.is_hit(), "{second:?}");
    assert_ne!(
        second.body, cached,
        "A's cached body reached a redirected token"
    );
    assert_eq!(calls, 3, "A once, the redirected token twice");
}

/// Defect 1 (guard): an origin 503 (runcache's `502 origin_error`) accepts nothing: the
/// second request is a 502 again, never A's cached body. Unlike the 404, 429 and 302 cases
/// this one passes on the code it was written against (a 5xx is turned into an error before
/// acceptance is recorded); it keeps the fix from breaking it.
#[tokio::test]
async fn an_origin_5xx_accepts_nothing() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    let cached = a_reads_hidden(&app).await;
    assert_error(
        get_as(&app, HIDDEN, Some("T503")).await,
        502,
        "origin_error",
    )
    .await;
    let second = Seen::of(get_as(&app, HIDDEN, Some("T503")).await).await;
    assert_eq!(
        second.status, 502,
        "the second request must again be a 502, not A's cached answer: {second:?}"
    );
    assert_ne!(
        second.body, cached.body,
        "A's cached body reached a failing token"
    );
    assert_eq!(second.json()["error"]["code"], "origin_error", "{second:?}");
}

/// Defect 1 (refresh path): A and C are both accepted for run `hidden`; then the origin hides
/// it from A (404) while C still reads it. A refresh-ahead under A's headers gets that 404:
/// it must not invalidate the run for everyone (C's next read is still a HIT), and A is not
/// served the cached body any more (A's next read is the origin's 404).
#[tokio::test]
async fn a_404_for_one_credential_during_a_refresh_invalidates_nothing_for_others() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| {
        s.views.metrics.ttl = runcache::config::Ttl(Duration::from_secs(4));
        s.views.metrics.grace = 0;
        s.views.metrics.stale_if_error = 0;
        s.refresh.min_hits = 2;
        s.refresh.ahead_percent = 50;
        s.refresh.jitter_ms = 0;
        // `fetch` changes on every origin call; ignoring it, a refresh under C is unchanged.
        s.refresh.volatile_fields = vec!["fetch".into()];
    })
    .await;
    let a = Seen::of(get_as(&app, HIDDEN, Some("A")).await).await;
    assert_eq!((a.status, a.x_cache.as_str()), (200, "MISS"), "{a:?}");
    let c = Seen::of(get_as(&app, HIDDEN, Some("C")).await).await;
    assert_eq!((c.status, c.x_cache.as_str()), (200, "MISS"), "{c:?}");
    let a = Seen::of(get_as(&app, HIDDEN, Some("A")).await).await;
    assert!(a.is_hit(), "{a:?}");

    app.origin.hide_from("A");
    // Into the last half of the entry's life: A's read is a hit that starts a refresh under
    // A's headers, and the origin answers it 404.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let a = Seen::of(get_as(&app, HIDDEN, Some("A")).await).await;
    assert!(a.is_hit(), "A is still within its acceptance: {a:?}");
    wait_for(|| async { app.origin.calls(HIDDEN) >= 3 }).await;
    // Let the refresh finish (it is counted in the stats when it has).
    let deadline = Instant::now() + Duration::from_secs(1);
    while app.stats().await["stats"]["refreshes"].as_u64() < Some(1) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let c = Seen::of(get_as(&app, HIDDEN, Some("C")).await).await;
    assert_eq!(
        (c.status, c.x_cache.as_str()),
        (200, "HIT"),
        "a 404 to A's refresh must not invalidate the run for C (and everyone): {c:?}"
    );
    let a = Seen::of(get_as(&app, HIDDEN, Some("A")).await).await;
    assert_eq!(
        a.status, 404,
        "the origin now hides the run from A: A must get its 404, not the cached body: {a:?}"
    );
    assert!(!a.is_hit(), "{a:?}");
}

/// Defect 2 (a): a request that misses after an acknowledged invalidation joined the miss
/// flight that began before it. R1 starts a slow fetch (the origin computes revision 0); the
/// run changes (revision 1) and its event is acknowledged; R2, sent after the 200, must get
/// revision 1.
#[tokio::test]
async fn a_miss_after_an_acknowledged_event_does_not_join_a_fetch_that_began_before_it() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    app.origin.set_delay(600);
    let client = app.client.clone();
    let url = app.url("/api/v1/models/train/7/metrics");
    let r1 = tokio::spawn(async move { client.get(url).send().await });
    wait_for(|| async { app.origin.total_calls() == 1 }).await;

    app.origin.set_revision(1);
    let event = app.event("training-completed", json!("7")).await;
    assert_eq!(event.status(), 200);
    assert!(
        !r1.is_finished(),
        "setup: R1's fetch must still be in flight"
    );
    let r2 = Seen::of(app.metrics("7").await).await;
    let r1 = Seen::of(r1.await.expect("task").expect("R1")).await;
    assert_eq!(r1.revision(), Some(0), "R1 began before the change: {r1:?}");
    assert_eq!(
        r2.revision(),
        Some(1),
        "R2 was sent after the event was acknowledged and must see the new revision, not \
         share R1's pre-event fetch: {r2:?}"
    );
}

/// Defect 2 (b): a read that misses after an acknowledged invalidation joined the background
/// refresh (stale-while-revalidate) that began before it, whose answer is always the OLD
/// entry, as a HIT. After the event's 200 a read must get the new revision.
#[tokio::test]
async fn a_read_after_an_acknowledged_event_does_not_join_a_refresh_that_began_before_it() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| {
        s.views.metrics.ttl = runcache::config::Ttl(Duration::from_secs(1));
        s.views.metrics.grace = 60;
        s.views.metrics.stale_if_error = 0;
        s.refresh.min_hits = 0;
    })
    .await;
    let first = Seen::of(app.metrics("7").await).await;
    assert_eq!(
        (first.x_cache.as_str(), first.revision()),
        ("MISS", Some(0))
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    app.origin.set_delay(600);
    let stale = Seen::of(app.metrics("7").await).await;
    assert_eq!(stale.x_cache, "STALE", "{stale:?}");
    // The background refresh has reached the origin, which answers from revision 0.
    wait_for(|| async { app.origin.total_calls() == 2 }).await;
    app.origin.set_revision(1);
    let event = app.event("training-completed", json!("7")).await;
    assert_eq!(event.status(), 200);

    let read = Seen::of(app.metrics("7").await).await;
    assert_eq!(
        read.revision(),
        Some(1),
        "read after the acknowledged event must not be the refresh's (old) entry: {read:?}"
    );
}

/// Defect 3: journal replay races at start. The start-up probe and the probe interval's first
/// tick run `probe()` at once: one replays the journal, the other finds it empty and closes
/// the circuit, so Redis serves entries the journal is about to invalidate. No read may get
/// the old entry as a HIT before the replay (whose last operations invalidate run `r`) ends.
#[tokio::test]
async fn no_entry_is_served_from_redis_while_the_start_up_replay_runs() {
    let redis = TestRedis::start().await;
    let origin = TestOrigin::start().await;
    let mut settings = test_settings(&origin.url, &redis.url());
    settings.auth.frontend = "none".into();
    let prefix = settings.cache.prefix.clone();
    let mut first = spawn_with_settings(settings, origin.clone()).await;
    let stored = Seen::of(first.metrics("r").await).await;
    assert_eq!((stored.x_cache.as_str(), stored.fetch()), ("MISS", Some(1)));
    first.stop().await;

    // What a previous process left: many invalidations, the last of which drop run r.
    let journal =
        std::env::temp_dir().join(format!("runcache-journal-{}.log", uuid::Uuid::new_v4()));
    let mut text = String::new();
    for i in 0..10_000 {
        text.push_str(&format!(
            "{{\"bump\":[\"{prefix}:_gen:v1:run:filler-{i}\"]}}\n"
        ));
    }
    text.push_str(&format!("{{\"bump\":[\"{prefix}:_gen:v1:run:r\"]}}\n"));
    text.push_str(&format!(
        "{{\"delete\":[\"{prefix}:v1:model:metrics:r\"]}}\n"
    ));
    std::fs::write(&journal, text).expect("journal");

    let mut settings = test_settings(&origin.url, &redis.url());
    settings.auth.frontend = "none".into();
    settings.cache.prefix = prefix;
    settings.journal.path = journal.display().to_string();
    let second = start_app_unwaited(settings, origin.clone()).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    // No read before the app says it serves from Redis (or has finished starting): a read
    // served from memory meanwhile could store a new copy over the old one.
    loop {
        let started = second.state.started.load(Ordering::Acquire);
        let resp = second.admin(Method::GET, "/cache/stats", None).await;
        if resp.status() == 200 {
            let stats: Value = resp.json().await.expect("stats");
            if started || stats["backend"] == "redis" {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the app never served from redis");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut reads = 0;
    let mut old_hits = Vec::new();
    let mut after_start = 0;
    while after_start < 3 && Instant::now() < deadline {
        let started = second.state.started.load(Ordering::Acquire);
        let seen = Seen::of(second.metrics("r").await).await;
        reads += 1;
        if matches!(seen.x_cache.as_str(), "HIT" | "STALE") && seen.fetch() == Some(1) {
            old_hits.push(seen);
        }
        if started {
            after_start += 1;
        }
    }
    let _ = std::fs::remove_file(&journal);
    assert!(
        second.state.started.load(Ordering::Acquire),
        "start-up did not finish within 15 s"
    );
    assert!(
        old_hits.is_empty(),
        "{} of {reads} reads were served run r's invalidated entry from redis before the \
         journal replay had finished; the first: {:?}",
        old_hits.len(),
        old_hits[0]
    );
}

/// Defect 4: generation stamps cross tiers. A's miss reads its stamp from Redis and fetches
/// (slowly); B acknowledges the run's event (Redis generation bumped); Redis dies before A's
/// fetch completes, so A writes the entry into its memory tier, whose counters never saw the
/// bump. A's next read (from memory) must not be the old revision as a HIT.
#[tokio::test]
async fn a_stamp_read_from_redis_does_not_validate_an_entry_in_the_memory_tier() {
    let mut redis = TestRedis::start().await;
    let a = spawn_app_with(Some(&redis), |s| s.auth.frontend = "none".into()).await;
    let mut settings = test_settings(&a.origin.url, &redis.url());
    settings.auth.frontend = "none".into();
    settings.cache.prefix = a.prefix.clone();
    let b = spawn_with_settings(settings, a.origin.clone()).await;

    a.origin.set_delay(1_000);
    let client = a.client.clone();
    let url = a.url("/api/v1/models/train/x/metrics");
    let in_flight = tokio::spawn(async move { client.get(url).send().await });
    wait_for(|| async { a.origin.total_calls() == 1 }).await;
    a.origin.set_revision(1);
    assert_eq!(
        b.event("training-completed", json!("x")).await.status(),
        200
    );
    redis.kill();
    assert!(
        !in_flight.is_finished(),
        "setup: A's fetch must still be in flight when redis dies"
    );
    let first = Seen::of(in_flight.await.expect("task").expect("response")).await;
    assert_eq!(first.revision(), Some(0), "{first:?}");

    a.origin.set_delay(0);
    // The circuit opens once the failures have lasted `redis.circuit_window_ms`.
    wait_for(|| async { a.stats().await["backend"] == "memory" }).await;
    let next = Seen::of(a.metrics("x").await).await;
    assert!(
        next.cache_status.contains("memory-fallback"),
        "setup: served from memory: {next:?}"
    );
    assert!(
        !(next.is_hit() && next.revision() == Some(0)),
        "A's memory tier served the entry fetched before the acknowledged event as a HIT: \
         {next:?}"
    );
}

/// Defect 5 (a): one slow admin call fails the whole instance over to memory. `/cache/stats`
/// SCANs the keyspace through a small pool; with a million unrelated keys, ten concurrent
/// calls time out waiting for the pool, and that opens the request path's circuit. After
/// them, a read must be a HIT from Redis and the circuit must never have opened.
#[tokio::test]
async fn concurrent_stats_over_a_large_keyspace_do_not_open_the_circuit() {
    let redis = TestRedis::start().await;
    let populated: String = redis
        .cmd_unbounded(&["DEBUG", "POPULATE", "1000000", "junk"])
        .await
        .expect("DEBUG POPULATE");
    assert_eq!(populated, "OK");
    let app = spawn_app_with(Some(&redis), |s| s.l1.enabled = false).await;
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "MISS");
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "HIT");

    let calls = (0..10).map(|_| app.admin(Method::GET, "/cache/stats", None));
    let statuses: Vec<u16> = futures_util::future::join_all(calls)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    let read = Seen::of(app.metrics("1").await).await;
    let stats = app.stats().await;
    assert_eq!(
        stats["store"]["circuit_opened"], 0,
        "ten concurrent /cache/stats (answered {statuses:?}) opened the request path's \
         circuit: store {}",
        stats["store"]
    );
    assert!(read.is_hit(), "{read:?}");
    assert!(!read.cache_status.contains("memory-fallback"), "{read:?}");
}

/// Defect 5 (b): a single slow command (Redis busy for 300 ms, longer than the 250 ms command
/// time-out) under a steady load of reads opens the circuit. It must not: no read started after
/// the slow command ended is served as a memory fallback, and the circuit never opened.
#[tokio::test]
async fn one_slow_redis_command_does_not_open_the_circuit() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| s.l1.enabled = false).await;
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "MISS");
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "HIT");

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (client, url, stop) = (
            app.client.clone(),
            app.url("/api/v1/models/train/1/metrics"),
            stop.clone(),
        );
        async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let resp = client.get(&url).send().await.expect("read");
                seen.push((
                    started,
                    resp.status().as_u16(),
                    header(&resp, "cache-status").to_owned(),
                ));
            }
            seen
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let slept: String = redis
        .cmd(&["DEBUG", "SLEEP", "0.3"])
        .await
        .expect("DEBUG SLEEP");
    assert_eq!(slept, "OK");
    let awake = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = load.await.expect("load");

    assert!(seen.iter().all(|(_, status, _)| *status == 200));
    let after: Vec<&String> = seen
        .iter()
        .filter(|(t, _, _)| *t > awake)
        .map(|(_, _, cs)| cs)
        .collect();
    assert!(!after.is_empty(), "reads went on after the slow command");
    let stats = app.stats().await;
    assert_eq!(
        stats["store"]["circuit_opened"], 0,
        "one 300 ms command opened the circuit: store {}",
        stats["store"]
    );
    let degraded = after
        .iter()
        .filter(|cs| cs.contains("memory-fallback"))
        .count();
    assert_eq!(
        degraded,
        0,
        "{degraded} of {} reads started after redis answered again were memory fallbacks",
        after.len()
    );
}

fn sign(secret: &str, ts: i64, body: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{ts}.{body}").as_bytes());
    format!(
        "sha256={}",
        runcache::domain::hex(&mac.finalize().into_bytes())
    )
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Delivers a signed `training-completed` event.
async fn signed(app: &TestApp, ts: i64, signature: &str, body: &str) -> Seen {
    let resp = app
        .client
        .post(app.url("/events/training-completed"))
        .header("x-runcache-timestamp", ts.to_string())
        .header("x-runcache-signature", signature)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request");
    Seen::of(resp).await
}

const SECRET: &str = "whsec-regress";

async fn signing_app(redis: &TestRedis) -> TestApp {
    spawn_app_with(Some(redis), |s| {
        s.events.secret = Some(secrecy::SecretString::from(SECRET));
    })
    .await
}

/// Defect 6: the signature is recorded as used before the invalidation is applied, so a sender
/// retrying an event that failed (5xx) is refused as a replay. The run's generation counter is
/// made a non-integer so the first delivery fails; once repaired, the exact same signed
/// request must be applied (200).
#[tokio::test]
async fn a_signed_event_that_failed_can_be_delivered_again() {
    let redis = TestRedis::start().await;
    let app = signing_app(&redis).await;
    app.metrics("42").await;
    let gen_key = format!("{}:_gen:v1:run:42", app.prefix);
    let set: String = redis
        .cmd(&["SET", &gen_key, "not-a-number"])
        .await
        .expect("SET");
    assert_eq!(set, "OK");

    let body = r#"{"model_run_id": "42"}"#;
    let ts = now_secs();
    let signature = sign(SECRET, ts, body);
    let failed = signed(&app, ts, &signature, body).await;
    assert!(
        (500..600).contains(&failed.status),
        "setup: the first delivery must fail: {failed:?}"
    );

    let _: i64 = redis.cmd(&["DEL", &gen_key]).await.expect("DEL");
    let retried = signed(&app, ts, &signature, body).await;
    assert_eq!(
        retried.status, 200,
        "a signature counts as used only once its invalidation is applied: {retried:?}"
    );
    assert!(retried.json()["invalidated"].is_u64(), "{retried:?}");
    assert_eq!(
        header(&app.metrics("42").await, "x-cache"),
        "MISS",
        "the retried event was applied"
    );
}

/// Defect 6: a second delivery of an applied signed event (a sender that lost the answer) is
/// answered 200 with the same body as the first, and applies nothing again.
#[tokio::test]
async fn a_signed_event_delivered_twice_is_answered_alike_and_applied_once() {
    let redis = TestRedis::start().await;
    let app = signing_app(&redis).await;
    app.metrics("42").await;
    let body = r#"{"model_run_id": "42"}"#;
    let ts = now_secs();
    let signature = sign(SECRET, ts, body);
    let first = signed(&app, ts, &signature, body).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.json(), json!({"invalidated": 1}));
    let invalidations = app.stats().await["stats"]["invalidations"].clone();

    let again = signed(&app, ts, &signature, body).await;
    assert_eq!(
        again.status, 200,
        "an applied signed event delivered again must be answered 200: {again:?}"
    );
    assert_eq!(
        again.body, first.body,
        "the same answer as the first delivery"
    );
    assert_eq!(
        app.stats().await["stats"]["invalidations"],
        invalidations,
        "the second delivery applied the invalidation again"
    );
}

/// Defect 6: events share the admin rate limit (20/s, burst 40). A training sweep finishing
/// 300 runs at once, from one client, must have every event applied.
#[tokio::test]
async fn a_sweep_of_300_events_from_one_client_is_not_rate_limited() {
    let redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    let events = (0..300).map(|i| app.event("training-completed", json!(format!("sweep-{i}"))));
    let statuses: Vec<u16> = futures_util::future::join_all(events)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    let refused: Vec<&u16> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        refused.is_empty(),
        "{} of 300 events were not applied (statuses {:?})",
        refused.len(),
        {
            let mut distinct = refused.clone();
            distinct.dedup();
            distinct
        }
    );
}

/// Defect 7: the journal is written and fsynced under a tokio mutex on a runtime worker. With
/// the journal a FIFO (opening it for writing blocks until a reader appears) and the app on
/// this test's single-threaded runtime, an event blocks in the journal write; `GET /health`
/// must still be answered before the watchdog thread opens the FIFO (~3 s later).
#[tokio::test]
async fn a_blocked_journal_write_does_not_stall_other_requests() {
    let dir = std::env::temp_dir().join(format!("runcache-fifo-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let fifo = dir.join("journal.fifo");
    let journal = fifo.display().to_string();
    // No Redis: every invalidation is journaled. The FIFO is made after start (reading the
    // journal at start would block too).
    let app = spawn_app_with(None, |s| s.journal.path = journal).await;
    // Whatever the app may have created there at start makes way for the FIFO.
    let _ = std::fs::remove_file(&fifo);
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success(), "mkfifo");

    let fired = Arc::new(AtomicBool::new(false));
    let watchdog = std::thread::spawn({
        let (fired, fifo) = (fired.clone(), fifo.clone());
        move || {
            std::thread::sleep(Duration::from_secs(3));
            fired.store(true, Ordering::SeqCst);
            // Read and write: this open never blocks, and while it is open no writer's open
            // blocks either. Kept open for the rest of the process, so nothing can hang later.
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&fifo)
                .expect("open fifo");
            std::mem::forget(f);
        }
    });

    let event = tokio::spawn({
        let (client, url) = (app.client.clone(), app.url("/events/training-completed"));
        async move {
            client
                .post(url)
                .bearer_auth(crate::helpers::TOKEN)
                .json(&json!({"model_run_id": "1"}))
                .send()
                .await
        }
    });
    // Time for the event to reach its journal write.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = app.get("/health").await;
    let answered_after_watchdog = fired.load(Ordering::SeqCst);
    assert_eq!(health.status(), 200);
    let event = event.await.expect("task").expect("event");
    watchdog.join().expect("watchdog");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        event.status(),
        200,
        "the event is applied once the FIFO is open"
    );
    assert!(
        !answered_after_watchdog,
        "GET /health was answered only after the watchdog opened the journal FIFO: the \
         journal write blocked the runtime worker"
    );
}

/// Defect 8: with Redis up, the memory tier's generation map still gets a key for every run
/// ever invalidated. The fix reports `memory.generations` in `/cache/stats`: after 50 events
/// for distinct runs it must be 0.
#[tokio::test]
async fn with_redis_up_the_memory_tier_holds_no_generation_counters() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| {
        // Events share the admin rate limit today (defect 6); this test is about memory.
        s.server.admin_rate_per_sec = 10_000;
        s.server.admin_burst = 10_000;
    })
    .await;
    for i in 0..50 {
        let resp = app
            .event("training-completed", json!(format!("gen-{i}")))
            .await;
        assert_eq!(resp.status(), 200);
    }
    let stats = app.stats().await;
    assert_eq!(stats["backend"], "redis");
    assert_eq!(
        stats["memory"]["generations"],
        json!(0),
        "memory.generations after 50 events with redis up: memory {}",
        stats["memory"]
    );
}

/// Defect 8: the refresh back-off map is pruned only on success. A refresh that fails (origin
/// 503) puts its key in back-off (`stats.refresh_backoff_keys` >= 1); with
/// `refresh.max_backoff_secs = 1` the count returns to 0 within a few seconds, with no
/// successful refresh.
#[tokio::test]
async fn a_failed_refresh_leaves_back_off_when_its_back_off_is_over() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| {
        s.views.metrics.ttl = runcache::config::Ttl(Duration::from_secs(2));
        s.views.metrics.grace = 0;
        s.views.metrics.stale_if_error = 0;
        s.refresh.min_hits = 2;
        s.refresh.ahead_percent = 50;
        s.refresh.jitter_ms = 0;
        s.refresh.max_backoff_secs = 1;
    })
    .await;
    app.metrics("1").await;
    app.metrics("1").await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    app.origin.set_fail(503);
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "HIT");
    wait_for(|| async { app.stats().await["stats"]["refresh_errors"].as_u64() >= Some(1) }).await;
    let stats = app.stats().await;
    assert!(
        stats["stats"]["refresh_backoff_keys"].as_u64() >= Some(1),
        "stats.refresh_backoff_keys after a failed refresh: stats {}",
        stats["stats"]
    );

    // The origin keeps failing and nobody reads: no refresh can succeed.
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut left = stats["stats"]["refresh_backoff_keys"].clone();
    while left != json!(0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = app.stats().await["stats"]["refresh_backoff_keys"].clone();
    }
    assert_eq!(
        left,
        json!(0),
        "the key stayed in back-off long after its 1 s back-off"
    );
}

/// Kills the child (SIGKILL) when dropped, so a failing assertion never leaves a server
/// running.
struct Killed(Option<Child>);

impl Killed {
    /// SIGTERM, and waits for the graceful exit.
    async fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("wait")
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The real binary, memory only (nothing listens on its Redis port), with `snapshot` and
/// `journal`, snapshots written only on a graceful stop, and public views.
fn start_memory_binary(
    port: u16,
    origin: &TestOrigin,
    prefix: &str,
    snapshot: &Path,
    journal: &Path,
) -> Killed {
    let child = Command::new(env!("CARGO_BIN_EXE_runcache"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUNCACHE__SERVER__ADDR", format!("127.0.0.1:{port}"))
        .env("RUNCACHE__ORIGIN__BASE_URL", &origin.url)
        .env(
            "RUNCACHE__REDIS__URL",
            format!("redis://127.0.0.1:{}", free_port()),
        )
        .env("RUNCACHE__ADMIN__TOKEN", "t")
        .env("RUNCACHE__CACHE__PREFIX", prefix)
        .env("RUNCACHE__JOURNAL__PATH", journal.display().to_string())
        .env(
            "RUNCACHE__MEMORY__SNAPSHOT_PATH",
            snapshot.display().to_string(),
        )
        .env("RUNCACHE__MEMORY__SNAPSHOT_EVERY_CHANGES", "100000000")
        .env("RUNCACHE__MEMORY__SNAPSHOT_INTERVAL_SECS", "3600")
        .env("RUNCACHE__AUTH__FRONTEND", "none")
        // Events share the admin rate limit today (defect 6); this test is about the journal.
        .env("RUNCACHE__SERVER__ADMIN_RATE_PER_SEC", "10000")
        .env("RUNCACHE__SERVER__ADMIN_BURST", "10000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start runcache");
    Killed(Some(child))
}

async fn wait_ready(client: &reqwest::Client, base: &str) {
    wait_for(|| async {
        client
            .get(format!("{base}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

async fn binary_metrics(client: &reqwest::Client, base: &str, id: &str) -> Seen {
    let resp = client
        .get(format!("{base}/api/v1/models/train/{id}/metrics"))
        .send()
        .await
        .expect("request");
    Seen::of(resp).await
}

async fn binary_pending(client: &reqwest::Client, base: &str) -> u64 {
    let stats: Value = client
        .get(format!("{base}/cache/stats"))
        .bearer_auth("t")
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    stats["pending_invalidations"].as_u64().expect("pending")
}

/// Defect 9: past 10 000 pending operations the journal becomes one
/// `DeleteMatching("<prefix>:[^_]*")`, a glob the memory tier's matcher does not understand,
/// so a restart's replay into memory deletes nothing. Run 1 snapshots entries a and b (on a
/// graceful stop); run 2 starts with 9 990 journaled operations, applies run a's event (which
/// deletes a from memory and journals it), overflows the journal with further events, and is
/// killed (no further snapshot). Run 3 loads the snapshot and replays the journal: nothing
/// from before the overflow may be served, a (invalidated before the crash) least of all.
#[tokio::test]
async fn a_journal_overflow_loses_no_invalidation_across_a_restart() {
    let origin = TestOrigin::start().await;
    let dir = std::env::temp_dir().join(format!("runcache-overflow-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (snapshot, journal) = (dir.join("memory.snapshot"), dir.join("journal.log"));
    let prefix = format!("ovf-{}", uuid::Uuid::new_v4().simple());
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();

    // Run 1: cache a and b, stop gracefully: the final snapshot holds both.
    let first = start_memory_binary(port, &origin, &prefix, &snapshot, &journal);
    wait_ready(&client, &base).await;
    for id in ["a", "b"] {
        assert_eq!(binary_metrics(&client, &base, id).await.x_cache, "MISS");
    }
    let exit = first.terminate().await;
    assert!(exit.success(), "{exit:?}");
    assert!(snapshot.exists(), "run 1 wrote its final snapshot");

    // Invalidations of other runs left journaled (Redis never came back).
    let mut text = String::new();
    let fillers = 9_990;
    for i in 0..fillers {
        text.push_str(&format!(
            "{{\"bump\":[\"{prefix}:_gen:v1:run:filler-{i}\"]}}\n"
        ));
    }
    std::fs::write(&journal, text).expect("journal");

    // Run 2: run a's event, then more events until the journal overflows; then a crash.
    let second = start_memory_binary(port, &origin, &prefix, &snapshot, &journal);
    wait_ready(&client, &base).await;
    let event = |id: String| {
        client
            .post(format!("{base}/events/training-completed"))
            .bearer_auth("t")
            .json(&json!({ "model_run_id": id }))
            .send()
    };
    assert_eq!(event("a".into()).await.expect("event").status(), 200);
    let mut pending = binary_pending(&client, &base).await;
    assert!(
        pending >= fillers,
        "setup: the journal was loaded: {pending}"
    );
    for i in 0..20 {
        assert_eq!(event(format!("z{i}")).await.expect("event").status(), 200);
        let now = binary_pending(&client, &base).await;
        if now < pending {
            break;
        }
        pending = now;
    }
    drop(second);

    // Run 3: the snapshot from run 1, then the journal replayed into memory.
    let _third = start_memory_binary(port, &origin, &prefix, &snapshot, &journal);
    wait_ready(&client, &base).await;
    let a = binary_metrics(&client, &base, "a").await;
    let b = binary_metrics(&client, &base, "b").await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !a.is_hit(),
        "run a was invalidated (event answered 200) before the crash, yet its snapshotted \
         entry is served after the restart: {a:?}"
    );
    assert!(
        !b.is_hit(),
        "an entry from before the journal overflow is served after the restart: {b:?}"
    );
}

/// Defect 10: fetch tasks are bare `tokio::spawn`s that outlive shutdown. A client gives up on
/// a slow miss (the fetch goes on), the app stops gracefully; after `stop()` has returned,
/// nothing may be written to Redis (stop either waited for the fetch or cancelled it).
#[tokio::test]
async fn no_background_fetch_writes_to_redis_after_a_graceful_stop() {
    let redis = TestRedis::start().await;
    let mut app = spawn_app(Some(&redis)).await;
    app.origin.set_delay(1_500);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .expect("client");
    let gave_up = impatient
        .get(app.url("/api/v1/models/train/1/metrics"))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client gave up: {gave_up:?}");
    wait_for(|| async { app.origin.total_calls() == 1 }).await;
    drop(impatient);

    app.stop().await;
    let written = || async {
        let mut keys = redis.keys(&format!("{}:v1:*", app.prefix)).await;
        keys.extend(redis.keys(&format!("{}:_tags:*", app.prefix)).await);
        keys
    };
    let at_stop = written().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = written().await;
    assert_eq!(
        later, at_stop,
        "keys were written to redis after stop() had returned"
    );
}

/// Defect 11: during an outage each instance serves from its own memory tier and an event
/// reaches only the instance that received it. With A and B registered (both up ~2 s before
/// Redis dies), B caches run y, the run changes, A acknowledges its event: B's next read must
/// not be the old revision.
#[tokio::test]
async fn during_an_outage_an_event_on_one_instance_reaches_the_others() {
    let mut redis = TestRedis::start().await;
    let a = spawn_app_with(Some(&redis), |s| s.auth.frontend = "none".into()).await;
    let mut settings = test_settings(&a.origin.url, &redis.url());
    settings.auth.frontend = "none".into();
    settings.cache.prefix = a.prefix.clone();
    let b = spawn_with_settings(settings, a.origin.clone()).await;
    // Long enough for both to register while Redis is up.
    tokio::time::sleep(Duration::from_secs(2)).await;

    redis.kill();
    wait_for(|| async { a.stats().await["backend"] == "memory" }).await;
    wait_for(|| async { b.stats().await["backend"] == "memory" }).await;
    let cached = Seen::of(b.metrics("y").await).await;
    assert_eq!(
        (cached.x_cache.as_str(), cached.revision()),
        ("MISS", Some(0))
    );
    let hit = Seen::of(b.metrics("y").await).await;
    assert!(
        hit.is_hit() && hit.cache_status.contains("memory-fallback"),
        "{hit:?}"
    );

    a.origin.set_revision(1);
    assert_eq!(
        a.event("training-completed", json!("y")).await.status(),
        200
    );
    let next = Seen::of(b.metrics("y").await).await;
    assert_ne!(
        next.revision(),
        Some(0),
        "B served the revision A's acknowledged event invalidated: {next:?}"
    );
}

/// Defect 12: Redis restarted from an older snapshot (RDB) brings back an entry and the
/// generations from before an acknowledged event. Once the app serves from Redis again, the
/// read must not be the old revision as a HIT.
#[tokio::test]
async fn a_redis_restarted_from_an_older_snapshot_does_not_revive_invalidated_entries() {
    let mut redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "MISS");
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "HIT");
    let copy = redis.save_copy().await;
    app.origin.set_revision(1);
    assert_eq!(
        app.event("training-completed", json!("1")).await.status(),
        200
    );

    redis.restart_from(&copy).await;
    // Read until a read is served from the restarted Redis (the app may first notice the
    // restart and serve from memory while it makes Redis safe again): none may be the old
    // revision as a HIT.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = Seen::of(app.metrics("1").await).await;
        assert!(
            !(read.is_hit() && read.revision() == Some(0)),
            "redis restarted from an older RDB revived the invalidated entry: {read:?}"
        );
        if !read.cache_status.contains("memory-fallback") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "setup: never served from redis again: {read:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.stats().await["backend"], "redis");
}

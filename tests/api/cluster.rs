//! Redis Cluster (`redis.mode = "cluster"`): a real cluster of three primaries (with a
//! replica each where a failover is provoked), formed with `redis-cli --cluster create`.
//! Every view and admin route works against it, pattern clears reach every primary, and an
//! event on one instance is seen by the others.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::helpers::{
    TestApp, TestCluster, assert_failover, closed_redis_url, header, load, spawn_app_with,
    spawn_with_settings, test_settings,
};

pub(crate) fn cluster_mode(cluster: &TestCluster) -> impl FnOnce(&mut runcache::config::Settings) {
    let urls = cluster.urls();
    move |s| {
        s.redis.mode = "cluster".into();
        s.redis.cluster_urls = urls.into_iter().map(SecretString::from).collect();
        s.auth.frontend = "none".into();
        s.events.stream_block_ms = 200;
        s.events.stream_claim_idle_ms = 400;
    }
}

async fn cluster_app(cluster: &TestCluster) -> TestApp {
    spawn_app_with(None, cluster_mode(cluster)).await
}

/// Another instance of `first`'s deployment (its prefix and origin) on the same cluster.
async fn another_instance(cluster: &TestCluster, first: &TestApp) -> TestApp {
    let mut settings = test_settings(&first.origin.url, &closed_redis_url());
    settings.cache.prefix = first.prefix.clone();
    cluster_mode(cluster)(&mut settings);
    spawn_with_settings(settings, first.origin.clone()).await
}

/// Another instance of `first`'s deployment reading the event stream `stream`.
async fn stream_reader(cluster: &TestCluster, first: &TestApp, stream: &str) -> TestApp {
    let mut settings = test_settings(&first.origin.url, &closed_redis_url());
    settings.cache.prefix = first.prefix.clone();
    cluster_mode(cluster)(&mut settings);
    settings.events.stream = Some(stream.to_owned());
    spawn_with_settings(settings, first.origin.clone()).await
}

async fn x_cache(resp: reqwest::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let cache = header(&resp, "x-cache").to_owned();
    let detail = header(&resp, "cache-status").to_owned();
    (status, cache, detail)
}

async fn json_of(resp: reqwest::Response) -> Value {
    resp.json().await.expect("json body")
}

/// An admin call that must succeed; its JSON answer.
async fn admin_ok(app: &TestApp, method: Method, path: &str, body: Option<Value>) -> Value {
    let resp = app.admin(method, path, body).await;
    assert_eq!(resp.status(), 200, "{path}");
    json_of(resp).await
}

#[tokio::test]
async fn every_view_and_admin_route_works_against_a_cluster() {
    let cluster = TestCluster::start(3, 0).await;
    let app = cluster_app(&cluster).await;

    let ready = json_of(app.get("/ready").await).await;
    assert_eq!(ready["store"], "redis", "{ready}");

    // The three views: a miss stored in the cluster, then a hit.
    for path in [
        "/api/v1/models/train/42/metrics",
        "/api/v1/models/train/42/feature-importance?top_n=5",
    ] {
        let (status, cache, detail) = x_cache(app.get(path).await).await;
        assert_eq!((status, cache.as_str()), (200, "MISS"), "{path}: {detail}");
        assert!(detail.contains("stored"), "{path}: {detail}");
        let (_, cache, _) = x_cache(app.get(path).await).await;
        assert_eq!(cache, "HIT", "{path}");
    }
    let (status, cache, _) = x_cache(app.compare(json!([42, "43"])).await).await;
    assert_eq!((status, cache.as_str()), (200, "MISS"));
    let (_, cache, _) = x_cache(app.compare(json!(["43", 42])).await).await;
    assert_eq!(cache, "HIT");

    // An event drops the run's metrics, its feature importance and the comparison with it.
    let resp = app.event("training-completed", json!(42)).await;
    assert_eq!(resp.status(), 200);
    assert!(json_of(resp).await["invalidated"].as_u64().unwrap_or(0) >= 3);
    for path in [
        "/api/v1/models/train/42/metrics",
        "/api/v1/models/train/42/feature-importance?top_n=5",
    ] {
        let (_, cache, _) = x_cache(app.get(path).await).await;
        assert_eq!(cache, "MISS", "{path} after the event");
    }
    let (_, cache, _) = x_cache(app.compare(json!([42, 43])).await).await;
    assert_eq!(cache, "MISS", "the comparison after the event");

    // Keys, namespaces and patterns.
    admin_ok(
        &app,
        Method::POST,
        "/cache/invalidate",
        Some(json!({"keys": ["model:metrics:42"]})),
    )
    .await;
    let (_, cache, _) = x_cache(app.metrics("42").await).await;
    assert_eq!(cache, "MISS", "after a keys invalidation");
    admin_ok(
        &app,
        Method::POST,
        "/cache/invalidate",
        Some(json!({"namespace": "metrics"})),
    )
    .await;
    let (_, cache, _) = x_cache(app.metrics("42").await).await;
    assert_eq!(cache, "MISS", "after a namespace invalidation");
    let (_, cache, _) = x_cache(app.metrics("42").await).await;
    assert_eq!(cache, "HIT");
    let dry = admin_ok(
        &app,
        Method::DELETE,
        "/cache/clear?pattern=model:metrics:4*&dry_run=true",
        None,
    )
    .await;
    assert_eq!(dry["deleted_count"], 1, "{dry}");
    let (_, cache, _) = x_cache(app.metrics("42").await).await;
    assert_eq!(cache, "HIT", "a dry run deletes nothing");
    let body = admin_ok(
        &app,
        Method::DELETE,
        "/cache/clear?pattern=model:metrics:4*",
        None,
    )
    .await;
    assert_eq!(body["deleted_count"], 1, "{body}");
    assert_eq!(body["pattern"], "model:metrics:4*");
    let (_, cache, _) = x_cache(app.metrics("42").await).await;
    assert_eq!(cache, "MISS", "after the clear");

    // Warming, stats and a version switch.
    let resp = app
        .admin(
            Method::POST,
            "/cache/warm",
            Some(json!({"model_run_ids": ["7", "8"]})),
        )
        .await;
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    let (_, cache, _) = x_cache(app.metrics("7").await).await;
    assert_eq!(cache, "HIT", "a warmed run");
    let stats = app.stats().await;
    assert_eq!(stats["backend"], "redis", "{stats}");
    assert!(
        stats["redis"]["used_memory"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
    admin_ok(
        &app,
        Method::POST,
        "/cache/version",
        Some(json!({"version": "v2"})),
    )
    .await;
    let (_, cache, _) = x_cache(app.metrics("7").await).await;
    assert_eq!(cache, "MISS", "after the version switch");
    admin_ok(&app, Method::DELETE, "/cache/clear", None).await;
    let (_, cache, _) = x_cache(app.metrics("7").await).await;
    assert_eq!(cache, "MISS", "after clearing everything");
    assert_eq!(app.stats().await["backend"], "redis");
}

#[tokio::test]
async fn a_pattern_clear_finds_keys_on_every_primary() {
    let cluster = TestCluster::start(3, 0).await;
    let app = cluster_app(&cluster).await;
    let runs: Vec<String> = (0..40).map(|i| format!("run-{i}")).collect();
    for run in &runs {
        let (status, _, _) = x_cache(app.metrics(run).await).await;
        assert_eq!(status, 200);
    }
    let entries = format!("{}:v1:model:metrics:*", app.prefix);
    let primaries = cluster.primary_ports().await;
    assert_eq!(primaries.len(), 3);
    let mut held = 0;
    for port in &primaries {
        let here = cluster.keys_on(*port, &entries).await.len();
        assert!(here > 0, "primary {port} holds none of the 40 runs");
        held += here;
    }
    assert_eq!(held, runs.len());

    let body = admin_ok(
        &app,
        Method::DELETE,
        "/cache/clear?pattern=model:metrics:*",
        None,
    )
    .await;
    assert_eq!(body["deleted_count"], runs.len(), "{body}");
    for port in &primaries {
        assert!(
            cluster.keys_on(*port, &entries).await.is_empty(),
            "entries left on primary {port}"
        );
    }
    let (_, cache, _) = x_cache(app.metrics("run-3").await).await;
    assert_eq!(cache, "MISS");
}

#[tokio::test]
async fn an_event_on_one_instance_is_seen_by_the_next_read_on_every_other() {
    let cluster = TestCluster::start(3, 1).await;
    let a = cluster_app(&cluster).await;
    let b = another_instance(&cluster, &a).await;
    let c = another_instance(&cluster, &a).await;
    for app in [&a, &b, &c] {
        x_cache(app.metrics("5").await).await;
        let (_, cache, _) = x_cache(app.metrics("5").await).await;
        assert_eq!(cache, "HIT");
    }
    // Near-cache copies on b and c are dropped before a's event is answered: whoever reads
    // next, anywhere, gets the new revision.
    for round in 1..=6u64 {
        a.origin.set_revision(round);
        let sender = [&a, &b, &c][round as usize % 3];
        let resp = sender.event("training-completed", json!("5")).await;
        assert_eq!(resp.status(), 200);
        for app in [&b, &c, &a] {
            let resp = app.metrics("5").await;
            let detail = header(&resp, "cache-status").to_owned();
            let body = json_of(resp).await;
            assert_eq!(body["revision"], round, "round {round}: {detail}");
        }
    }
    for app in [&a, &b, &c] {
        let stats = app.stats().await;
        assert_eq!(stats["l1"]["subscribed"], true, "{stats}");
        // Every publication reached everyone and was confirmed: none waited in vain, none
        // failed (the count of subscribers on every node, replicas included, is right).
        assert_eq!(stats["l1"]["ack_timeouts"], 0, "{stats}");
    }
}

#[tokio::test]
async fn a_primary_killed_under_load_fails_no_request_and_serves_nothing_invalidated() {
    let mut cluster = TestCluster::start(3, 1).await;
    let app = cluster_app(&cluster).await;
    for run in ["1", "2", "3"] {
        x_cache(app.metrics(run).await).await;
    }
    assert_eq!(x_cache(app.metrics("1").await).await.1, "HIT");
    // The primary that holds run 1, its replica in sync with it.
    let mut victim = None;
    for port in cluster.primary_ports().await {
        if !cluster.keys_on(port, "*{run:1}").await.is_empty() {
            victim = Some(port);
        }
    }
    let victim = victim.expect("a primary holds run 1");
    let _: i64 = cluster
        .node(victim)
        .cmd_unbounded(&["WAIT", "1", "2000"])
        .await
        .expect("WAIT");

    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(&app, &["1", "2", "3"], stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    cluster.node(victim).kill();

    // Run 1 changes at the origin, and its event is acknowledged during the failover.
    app.origin.set_revision(1);
    let resp = app.event("training-completed", json!("1")).await;
    assert_eq!(resp.status(), 200);
    let acknowledged = Instant::now();

    // The cluster promotes the replica; runcache is back on Redis.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let primaries = cluster.primary_ports().await;
        if primaries.len() == 3 && !primaries.contains(&victim) {
            break;
        }
        assert!(Instant::now() < deadline, "no replica was promoted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let promoted = killed.elapsed();
    loop {
        let ready = json_of(app.get("/ready").await).await;
        if ready["store"] == "redis" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "runcache did not return to redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = killed.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let samples = loader.await.expect("load");

    assert_failover("cluster failover", &samples, acknowledged, promoted, back);
    let resp = app.metrics("1").await;
    assert_eq!(json_of(resp).await["revision"], 1);
    let stats = app.stats().await;
    assert_eq!(stats["backend"], "redis", "{stats}");
}

#[tokio::test]
async fn stream_events_sent_while_no_instance_runs_are_applied_by_the_next_one_on_a_cluster() {
    let cluster = TestCluster::start(3, 0).await;
    let stream = format!("events-{}", uuid::Uuid::new_v4().simple());
    let mut a = cluster_app(&cluster).await;
    let first = stream_reader(&cluster, &a, &stream).await;
    x_cache(a.metrics("7").await).await;
    assert_eq!(x_cache(a.metrics("7").await).await.1, "HIT");

    // Read by the running instance.
    a.origin.set_revision(1);
    let _: String = cluster
        .cmd(&[
            "XADD",
            &stream,
            "MAXLEN",
            "~",
            "1000",
            "*",
            "kind",
            "training-completed",
            "model_run_id",
            "7",
        ])
        .await
        .expect("XADD");
    crate::helpers::wait_for(|| async { json_of(a.metrics("7").await).await["revision"] == 1 })
        .await;

    // Sent while no instance reads the stream: applied by the next one to start.
    let mut first = first;
    first.stop().await;
    a.origin.set_revision(2);
    let _: String = cluster
        .cmd(&[
            "XADD",
            &stream,
            "*",
            "kind",
            "model-deleted",
            "model_run_id",
            "7",
        ])
        .await
        .expect("XADD");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        json_of(a.metrics("7").await).await["revision"],
        1,
        "nobody read the event yet"
    );
    let _next = stream_reader(&cluster, &a, &stream).await;
    crate::helpers::wait_for(|| async { json_of(a.metrics("7").await).await["revision"] == 2 })
        .await;
    // Whatever the stopped instance left pending is taken over and acknowledged.
    crate::helpers::wait_for(|| async {
        let pending: Vec<redis::Value> = cluster
            .cmd(&["XPENDING", &stream, "runcache"])
            .await
            .expect("XPENDING");
        pending.first() == Some(&redis::Value::Int(0))
    })
    .await;
    a.stop().await;
}

/// Moves the slot of `{run:RUN}` from the primary that holds it to `to`, one step at a time
/// as `redis-cli --cluster reshard` does: first the keys `first` picks, then calling
/// `between` while the slot is half-moved (keys on both sides: clients get `ASK`
/// redirections, and `TRYAGAIN` for a command whose keys lie on both), then the rest.
async fn migrate_slot<F, Fut>(
    cluster: &TestCluster,
    run: &str,
    (from, to): (u16, u16),
    first: impl FnOnce(&[String]) -> Vec<String>,
    between: F,
) where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let node = |port: u16| cluster.nodes.iter().find(|n| n.port == port).expect("node");
    let id = |port: u16| async move {
        node(port)
            .cmd::<String>(&["CLUSTER", "MYID"])
            .await
            .expect("CLUSTER MYID")
    };
    let (from_id, to_id) = (id(from).await, id(to).await);
    let slot: i64 = node(from)
        .cmd(&["CLUSTER", "KEYSLOT", &format!("run:{run}")])
        .await
        .expect("CLUSTER KEYSLOT");
    let slot = slot.to_string();
    let _: () = node(to)
        .cmd(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id])
        .await
        .expect("IMPORTING");
    let _: () = node(from)
        .cmd(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id])
        .await
        .expect("MIGRATING");
    let keys: Vec<String> = node(from)
        .cmd(&["CLUSTER", "GETKEYSINSLOT", &slot, "1000"])
        .await
        .expect("GETKEYSINSLOT");
    let first = first(&keys);
    let rest: Vec<String> = keys.into_iter().filter(|k| !first.contains(k)).collect();
    let migrate = |batch: &[String]| {
        let mut args = vec![
            "MIGRATE".to_owned(),
            "127.0.0.1".to_owned(),
            to.to_string(),
            String::new(),
            "0".to_owned(),
            "5000".to_owned(),
            "KEYS".to_owned(),
        ];
        args.extend(batch.iter().cloned());
        args
    };
    let run_migrate = |batch: Vec<String>| {
        let args = migrate(&batch);
        async move {
            if !batch.is_empty() {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let _: redis::Value = node(from).cmd(&args).await.expect("MIGRATE");
            }
        }
    };
    run_migrate(first).await;
    between().await;
    // The rest, and whatever was written meanwhile (a live slot keeps taking writes).
    run_migrate(rest).await;
    let late: Vec<String> = node(from)
        .cmd(&["CLUSTER", "GETKEYSINSLOT", &slot, "1000"])
        .await
        .expect("GETKEYSINSLOT");
    run_migrate(late).await;
    for n in cluster.nodes.iter() {
        let _: () = n
            .cmd(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id])
            .await
            .expect("SETSLOT NODE");
    }
}

/// The primary holding run 9's keys, and another one to move them to.
async fn run_9_and_another_primary(cluster: &TestCluster) -> (u16, u16) {
    let primaries = cluster.primary_ports().await;
    let mut from = None;
    for port in &primaries {
        if !cluster.keys_on(*port, "*{run:9}").await.is_empty() {
            from = Some(*port);
        }
    }
    let from = from.expect("a primary holds run 9");
    let to = *primaries
        .iter()
        .find(|p| **p != from)
        .expect("another primary");
    (from, to)
}

async fn revision_9(app: &TestApp) -> Value {
    json_of(app.metrics("9").await).await["revision"].clone()
}

#[tokio::test]
async fn a_slot_migrating_under_reads_and_events_loses_no_invalidation() {
    let cluster = TestCluster::start(3, 0).await;
    let a = cluster_app(&cluster).await;
    let b = another_instance(&cluster, &a).await;
    for app in [&a, &b] {
        revision_9(app).await;
        revision_9(app).await;
    }
    let restarts_before = [
        a.stats().await["store"]["redis_restarts"].clone(),
        b.stats().await["store"]["redis_restarts"].clone(),
    ];
    let (from, to) = run_9_and_another_primary(&cluster).await;

    // Half-moved: an event on one instance is seen by the other's next read.
    let half = |keys: &[String]| keys[..keys.len() / 2].to_vec();
    migrate_slot(&cluster, "9", (from, to), half, || async {
        a.origin.set_revision(1);
        let resp = a.event("training-completed", json!("9")).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(revision_9(&b).await, 1, "b, with the slot half-moved");
        assert_eq!(revision_9(&a).await, 1, "a, with the slot half-moved");
    })
    .await;

    // Moved: the entries and counters went with the slot; events still reach everyone.
    assert!(!cluster.keys_on(to, "*{run:9}").await.is_empty());
    assert!(cluster.keys_on(from, "*{run:9}").await.is_empty());
    a.origin.set_revision(2);
    let resp = b.event("training-completed", json!("9")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(revision_9(&a).await, 2, "a, after the move");
    assert_eq!(revision_9(&b).await, 2, "b, after the move");
    let (_, cache, _) = x_cache(b.metrics("9").await).await;
    assert_eq!(cache, "HIT", "served from the slot's new primary");
    for (app, before) in [&a, &b].into_iter().zip(restarts_before) {
        let stats = app.stats().await;
        assert_eq!(stats["backend"], "redis", "{stats}");
        assert_eq!(stats["l1"]["subscribed"], true, "{stats}");
        assert_eq!(
            stats["store"]["redis_restarts"], before,
            "a migration is no restart: {stats}"
        );
    }
}

/// A hit reads its entry and its run's counter in one `MGET`. While the slot migrates with the
/// entry already moved and the counter not yet, that `MGET` gets `TRYAGAIN`: the keys are
/// then read one by one, each following its `ASK`, and the entry is still served.
#[tokio::test]
async fn a_hit_whose_keys_a_migration_split_is_still_a_hit() {
    let cluster = TestCluster::start(3, 0).await;
    let app = spawn_app_with(None, |s| {
        cluster_mode(&cluster)(s);
        s.l1.enabled = false;
    })
    .await;
    revision_9(&app).await;
    assert_eq!(x_cache(app.metrics("9").await).await.1, "HIT");
    let (from, to) = run_9_and_another_primary(&cluster).await;
    let entry_only = |keys: &[String]| {
        let entry: Vec<String> = keys
            .iter()
            .filter(|k| k.contains(":model:metrics:9"))
            .cloned()
            .collect();
        assert_eq!(entry.len(), 1, "{keys:?}");
        assert!(
            keys.len() > 1,
            "the run's counter shares the slot: {keys:?}"
        );
        entry
    };
    migrate_slot(&cluster, "9", (from, to), entry_only, || async {
        let (status, cache, detail) = x_cache(app.metrics("9").await).await;
        assert_eq!((status, cache.as_str()), (200, "HIT"), "{detail}");
    })
    .await;
    assert_eq!(x_cache(app.metrics("9").await).await.1, "HIT");
}

/// The node holding the global keys (view counters, clear sequences, the version and the
/// marker) restarts empty, while an entry that a namespace invalidation had made unservable
/// (through the view counter on that node alone) survives on another primary, as a fetch that
/// raced the invalidation would leave it. The counter comes back at 0, which would make the
/// entry current again: the cluster is taken for restored, and nothing from before is served.
#[tokio::test]
async fn a_restarted_primary_holding_the_global_counters_revives_nothing() {
    let mut cluster = TestCluster::start(3, 0).await;
    let app = cluster_app(&cluster).await;
    let global = format!("*{{{}}}", app.prefix);
    let mut global_node = None;
    for port in cluster.primary_ports().await {
        if !cluster.keys_on(port, &global).await.is_empty() {
            global_node = Some(port);
        }
    }
    let global_node = global_node.expect("a primary holds the global keys");
    // A run whose entry lives on another primary.
    let mut run = None;
    for i in 0..50 {
        let id = format!("r{i}");
        x_cache(app.metrics(&id).await).await;
        if cluster
            .keys_on(global_node, &format!("*{{run:{id}}}"))
            .await
            .is_empty()
        {
            run = Some(id);
            break;
        }
    }
    let run = run.expect("a run stored away from the global keys");
    let key = format!("{}:v1:model:metrics:{run}{{run:{run}}}", app.prefix);
    let mut conn = redis::cluster::ClusterClient::new(cluster.urls())
        .expect("cluster client")
        .get_async_connection()
        .await
        .expect("cluster connection");
    let old: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert!(!old.is_empty(), "the entry is stored");

    app.origin.set_revision(1);
    admin_ok(
        &app,
        Method::POST,
        "/cache/invalidate",
        Some(json!({"namespace": "metrics"})),
    )
    .await;
    // The old entry written back behind the invalidation (a racing fetch's store).
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&old)
        .arg("PX")
        .arg(600_000)
        .query_async(&mut conn)
        .await
        .expect("SET");
    assert_eq!(
        json_of(app.metrics(&run).await).await["revision"],
        1,
        "the view counter keeps it unservable"
    );
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&old)
        .arg("PX")
        .arg(600_000)
        .query_async(&mut conn)
        .await
        .expect("SET");

    cluster.node(global_node).restart_empty().await;
    for _ in 0..40 {
        let resp = app.metrics(&run).await;
        assert_eq!(resp.status(), 200);
        let body = json_of(resp).await;
        assert_eq!(
            body["revision"], 1,
            "an entry from before the invalidation was served"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.wait_ok(3, 0).await;
}

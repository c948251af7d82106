//! Defects 3, 4, 5 and 12: the tiered store (start-up replay, stamps across tiers, the circuit breaker, a Redis restored from a snapshot, an evicting Redis).

use super::*;

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
    let (a, b) = crate::helpers::two_public_instances(&redis).await;

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
        if !read.cache_status.contains("memory-fallback")
            && !read.cache_status.contains("store-failed")
        {
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

/// Review of defect 12: the keyspace marker tells a restored Redis from an empty one. Should
/// it go (deleted by hand), a snapshot taken afterwards would come back without it, looking
/// empty, and serve what an acknowledged event invalidated. The heartbeat writes it again.
#[tokio::test]
async fn a_snapshot_taken_after_the_marker_went_is_still_seen_as_a_restore() {
    let mut redis = TestRedis::start().await;
    let app = spawn_app(Some(&redis)).await;
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "MISS");
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "HIT");
    let marker = format!("{}:_meta:marker", app.prefix);
    let deleted: i64 = redis.cmd(&["DEL", &marker]).await.expect("DEL");
    assert_eq!(deleted, 1, "setup: the marker is there");
    // More than a heartbeat (1 s) later, the snapshot is taken.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let copy = redis.save_copy().await;
    app.origin.set_revision(1);
    assert_eq!(
        app.event("training-completed", json!("1")).await.status(),
        200
    );

    redis.restart_from(&copy).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = Seen::of(app.metrics("1").await).await;
        assert!(
            !(read.is_hit() && read.revision() == Some(0)),
            "a snapshot taken after the marker went revived the invalidated entry: {read:?}"
        );
        if !read.cache_status.contains("memory-fallback")
            && !read.cache_status.contains("store-failed")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "setup: never served from redis again: {read:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An evicting Redis may drop the counters that make invalidated entries unservable: it is
/// not used until its policy is `noeviction`.
#[tokio::test]
async fn an_evicting_redis_is_not_used() {
    let redis = TestRedis::start().await;
    let _: () = redis
        .cmd(&[
            "CONFIG",
            "SET",
            "maxmemory",
            "100mb",
            "maxmemory-policy",
            "allkeys-lru",
        ])
        .await
        .expect("CONFIG SET");
    let app = spawn_app(Some(&redis)).await;
    let read = Seen::of(app.metrics("1").await).await;
    assert!(
        read.cache_status.contains("memory-fallback"),
        "served although redis may evict: {read:?}"
    );
    assert_eq!(app.stats().await["backend"], "memory");
    assert!(
        crate::helpers::logs().contains("may evict keys"),
        "the refusal is logged"
    );

    let _: () = redis
        .cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .await
        .expect("CONFIG SET");
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.stats().await["backend"] != "redis" {
        assert!(Instant::now() < deadline, "never returned to redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Review of defect 12: a process that has only its configured `cache.version` must not
/// write it over the version a restored Redis holds (the snapshot was taken after a switch).
#[tokio::test]
async fn a_new_process_recovering_a_restored_redis_keeps_its_version() {
    let mut redis = TestRedis::start().await;
    let origin = TestOrigin::start().await;
    let settings = test_settings(&origin.url, &redis.url());
    let version_key = format!("{}:_meta:version", settings.cache.prefix);
    let mut first = spawn_with_settings(settings.clone(), origin.clone()).await;
    let switched = first
        .admin(
            Method::POST,
            "/cache/version",
            Some(json!({"version": "v2"})),
        )
        .await;
    assert_eq!(switched.status(), 200);
    let copy = redis.save_copy().await;
    first.stop().await;

    redis.restart_from(&copy).await;
    // The new process starts with `cache.version = v1`, the value before the switch.
    let second = spawn_with_settings(settings, origin).await;
    wait_for(|| async { second.stats().await["backend"] == "redis" }).await;
    let stored: Option<String> = redis.cmd(&["GET", &version_key]).await.expect("GET");
    assert_eq!(stored.as_deref(), Some("v2"), "the switch was undone");
    assert_eq!(second.stats().await["version"], "v2");
}

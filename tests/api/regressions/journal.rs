//! Defects 7 and 9: the journal never blocks the runtime, and its overflow loses nothing.

use super::*;

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

//! Memory-tier snapshots: the snapshot cycle with a real `kill -9`, a corrupt file, a final
//! snapshot on graceful shutdown, and removal once Redis serves again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::helpers::{TestOrigin, TestRedis, free_port, header, spawn_app_with, wait_for};

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir()
        .join(format!("runcache-snap-{}", uuid::Uuid::new_v4()))
        .join(name)
}

/// The real binary, memory only (no Redis listening), snapshotting to `snapshot`.
fn start_binary(port: u16, origin: &TestOrigin, snapshot: &Path, every_changes: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_runcache"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUNCACHE__SERVER__ADDR", format!("127.0.0.1:{port}"))
        .env("RUNCACHE__ORIGIN__BASE_URL", &origin.url)
        .env(
            "RUNCACHE__REDIS__URL",
            format!("redis://127.0.0.1:{}", free_port()),
        )
        .env("RUNCACHE__ADMIN__TOKEN", "t")
        .env(
            "RUNCACHE__JOURNAL__PATH",
            snapshot.with_extension("journal").display().to_string(),
        )
        .env(
            "RUNCACHE__MEMORY__SNAPSHOT_PATH",
            snapshot.display().to_string(),
        )
        .env(
            "RUNCACHE__MEMORY__SNAPSHOT_EVERY_CHANGES",
            every_changes.to_string(),
        )
        .env("RUNCACHE__MEMORY__SNAPSHOT_INTERVAL_SECS", "3600")
        // A restart forgets which credentials the origin accepted; public views keep this
        // test about the snapshot alone.
        .env("RUNCACHE__AUTH__FRONTEND", "none")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start runcache")
}

/// Kills the child when dropped, so a failing assertion never leaves a server running.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(client: &reqwest::Client, base: &str, id: &str) -> reqwest::Response {
    client
        .get(format!("{base}/api/v1/models/train/{id}/metrics"))
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn after_kill_9_the_last_snapshot_is_loaded() {
    let origin = TestOrigin::start().await;
    let path = temp_path("memory.snapshot");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();

    let mut first = Killed(start_binary(port, &origin, &path, 2));
    wait_for(|| async {
        client
            .get(format!("{base}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert_eq!(header(&get(&client, &base, "a").await, "x-cache"), "MISS");
    assert_eq!(header(&get(&client, &base, "b").await, "x-cache"), "MISS");
    // Two changes: a snapshot holding a and b is written within a second.
    wait_for(|| async { path.exists() }).await;
    // A third change, not snapshotted yet, then a crash.
    assert_eq!(header(&get(&client, &base, "c").await, "x-cache"), "MISS");
    first.0.kill().expect("kill -9");
    first.0.wait().expect("reap");

    let _second = Killed(start_binary(port, &origin, &path, 2));
    wait_for(|| async {
        client
            .get(format!("{base}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert_eq!(header(&get(&client, &base, "a").await, "x-cache"), "HIT");
    assert_eq!(header(&get(&client, &base, "b").await, "x-cache"), "HIT");
    assert_eq!(
        header(&get(&client, &base, "c").await, "x-cache"),
        "MISS",
        "lost with the crash"
    );
    assert_eq!(origin.calls("/api/v1/models/train/a/metrics"), 1);
    let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
}

#[tokio::test]
async fn a_corrupt_snapshot_is_reported_and_the_service_starts_empty() {
    let path = temp_path("memory.snapshot");
    std::fs::create_dir_all(path.parent().expect("dir")).expect("dir");
    std::fs::write(&path, b"RCSNAP1\nthis is not what runcache wrote").expect("write");
    let snapshot = path.display().to_string();
    let app = spawn_app_with(None, |s| s.memory.snapshot_path = Some(snapshot)).await;

    let stats = app.stats().await;
    let status = &stats["memory"]["snapshot"];
    assert_eq!(status["loaded_entries"], 0);
    assert!(
        status["load_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{status}"
    );
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "MISS");
    assert_eq!(header(&app.metrics("1").await, "x-cache"), "HIT");
    let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
}

#[tokio::test]
async fn graceful_shutdown_writes_a_final_snapshot() {
    let path = temp_path("memory.snapshot");
    let snapshot = path.display().to_string();
    let prefix = format!("snap-{}", uuid::Uuid::new_v4().simple());
    let tweak = |s: &mut runcache::config::Settings| {
        s.auth.frontend = "none".into();
        s.cache.prefix = prefix.clone();
        s.memory.snapshot_path = Some(snapshot.clone());
        s.memory.snapshot_every_changes = 1_000;
        s.memory.snapshot_interval_secs = 3_600;
    };
    let mut first = spawn_app_with(None, tweak).await;
    first.metrics("1").await;
    assert!(!path.exists(), "not due yet");
    first.stop().await;
    assert!(path.exists(), "written on shutdown");

    let second = spawn_app_with(None, tweak).await;
    assert_eq!(
        second.stats().await["memory"]["snapshot"]["loaded_entries"],
        1
    );
    assert_eq!(header(&second.metrics("1").await, "x-cache"), "HIT");
    let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
}

#[tokio::test]
async fn the_snapshot_is_removed_once_redis_serves_again() {
    let path = temp_path("memory.snapshot");
    let snapshot = path.display().to_string();
    let mut on_memory =
        spawn_app_with(None, |s| s.memory.snapshot_path = Some(snapshot.clone())).await;
    on_memory.metrics("1").await;
    on_memory.stop().await;
    assert!(path.exists());

    let redis = TestRedis::start().await;
    let on_redis = spawn_app_with(Some(&redis), |s| {
        s.memory.snapshot_path = Some(snapshot.clone())
    })
    .await;
    wait_for(|| async { !path.exists() }).await;
    assert_eq!(
        header(&on_redis.metrics("1").await, "x-cache"),
        "MISS",
        "redis is the truth"
    );
    let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
}

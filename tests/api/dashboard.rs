//! `/dashboard` and `/cache/stats/history`: the history's shape, the page and its assets, and
//! the page end to end in Debian's headless Chromium (driven by playwright-core from
//! `tests/browser/dashboard.mjs`) against real Redis and the sample origin.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use runcache::sample_origin::{self, SampleOriginOptions};
use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn history_samples_the_headline_figures_every_interval() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| s.admin.history_interval_ms = 200).await;
    let first: Value = app
        .admin(reqwest::Method::GET, "/cache/stats/history", None)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(first["interval_ms"], 200);
    assert_eq!(first["capacity"], 720);
    assert_eq!(first["version"], "v1");
    assert!(first["instance"].as_str().is_some_and(|i| !i.is_empty()));
    assert!(first["started_ms"].as_u64() > Some(0));
    assert!(first["samples"][0]["request_rate"].is_null());
    // The sample taken at start is there at once.
    assert_eq!(first["samples"][0]["interval_ms"], 0);

    for id in ["h1", "h2"] {
        app.metrics(id).await;
        app.metrics(id).await;
        app.metrics(id).await;
    }
    let last_t = first["samples"]
        .as_array()
        .and_then(|s| s.last())
        .map(|s| s["t_ms"].as_u64().expect("t_ms"))
        .expect("a sample");
    // The next samples, and only those, through `since`.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let h: Value = app
            .admin(
                reqwest::Method::GET,
                &format!("/cache/stats/history?since={last_t}"),
                None,
            )
            .await
            .json()
            .await
            .expect("json");
        let seen = h["samples"].as_array().cloned().unwrap_or_default();
        if seen
            .iter()
            .map(|s| s["requests"].as_u64().unwrap_or(0))
            .sum::<u64>()
            >= 6
        {
            break seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no sample counted the requests: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(seen.iter().all(|s| s["t_ms"].as_u64() > Some(last_t)));
    let busy = seen
        .iter()
        .find(|s| s["requests"].as_u64() > Some(0))
        .expect("a sample with requests");
    let (hits, misses) = seen.iter().fold((0, 0), |(h, m), s| {
        (
            h + s["hits"].as_u64().unwrap_or(0),
            m + s["misses"].as_u64().unwrap_or(0),
        )
    });
    assert_eq!((hits, misses), (4, 2), "{seen:?}");
    assert!(busy["p50_ms"].as_f64().is_some() && busy["p99_ms"].as_f64().is_some());
    assert!(busy["request_rate"].as_f64() > Some(0.0));
    assert_eq!(busy["backend"], "redis");
    assert_eq!(busy["circuit"], "closed");
    assert_eq!(busy["pending_journal"], 0);
    for field in [
        "origin_rate",
        "origin_errors",
        "stale_served",
        "coalesced",
        "memory_bytes",
        "near_bytes",
        "redis_reachable",
    ] {
        assert!(busy.get(field).is_some(), "{field} missing: {busy}");
    }

    // Bad queries are JSON errors; the route needs the token.
    let resp = app
        .admin(
            reqwest::Method::GET,
            "/cache/stats/history?since=soon",
            None,
        )
        .await;
    assert_error(resp, 400, "invalid_argument").await;
    for bad in ["-1", "9223372036854775808", "1.5"] {
        let resp = app
            .admin(
                reqwest::Method::GET,
                &format!("/cache/stats/history?since={bad}"),
                None,
            )
            .await;
        assert_error(resp, 400, "invalid_argument").await;
    }
    let resp = app
        .admin(reqwest::Method::GET, "/cache/stats/history?until=1", None)
        .await;
    assert_error(resp, 400, "invalid_argument").await;
    let resp = app.get("/cache/stats/history").await;
    assert_error(resp, 401, "unauthorized").await;
}

#[tokio::test]
async fn stats_show_the_hottest_keys_and_the_recent_admin_actions() {
    let redis = TestRedis::start().await;
    let app = spawn_app_with(Some(&redis), |s| s.admin.history_interval_ms = 100).await;
    for _ in 0..4 {
        app.metrics("hot").await;
    }
    app.metrics("warm").await;
    app.metrics("warm").await;
    app.admin(
        reqwest::Method::POST,
        "/cache/invalidate",
        Some(json!({"model_run_id": "warm"})),
    )
    .await;
    app.event("training-completed", json!("hot")).await;
    // Hot keys are recomputed at each history sample, off the request path.
    wait_for(|| async { app.stats().await["hot_keys"][1]["key"] == "model:metrics:warm" }).await;
    let stats = app.stats().await;
    let hot = stats["hot_keys"].as_array().expect("hot_keys");
    assert_eq!(hot[0]["key"], "model:metrics:hot", "{hot:?}");
    assert!(hot[0]["reads"].as_u64() >= hot[1]["reads"].as_u64());
    let recent = stats["recent_actions"].as_array().expect("recent_actions");
    assert_eq!(recent[0]["action"], "training-completed");
    assert_eq!(recent[0]["target"], "hot");
    assert_eq!(recent[1]["action"], "invalidate");
    assert!(
        recent[1]["who"]
            .as_str()
            .is_some_and(|w| w.starts_with("token:")),
        "{recent:?}"
    );
    assert!(!stats.to_string().contains(TOKEN), "the token leaked");
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_without_a_token() {
    let app = spawn_app(None).await;
    let page = app.get("/dashboard").await;
    assert_eq!(page.status(), 200);
    assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
    let csp = header(&page, "content-security-policy").to_owned();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    let etag = header(&page, "etag").to_owned();
    let html = page.text().await.expect("html");
    assert!(html.contains("dashboard/assets/uPlot.iife.min.js"));
    for (file, kind) in [
        ("dashboard.js", "text/javascript"),
        ("dashboard.css", "text/css"),
        ("uPlot.iife.min.js", "text/javascript"),
        ("uPlot.min.css", "text/css"),
        ("uPlot-LICENSE.txt", "text/plain"),
    ] {
        let resp = app.get(&format!("/dashboard/assets/{file}")).await;
        assert_eq!(resp.status(), 200, "{file}");
        assert!(header(&resp, "content-type").starts_with(kind), "{file}");
        assert_eq!(header(&resp, "x-content-type-options"), "nosniff");
    }
    let again = app
        .client
        .get(app.url("/dashboard"))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("request");
    assert_eq!(again.status(), 304);
    assert_eq!(header(&again, "vary"), "accept-encoding");
    let any = app
        .client
        .get(app.url("/dashboard"))
        .header("if-none-match", "*")
        .send()
        .await
        .expect("request");
    assert_eq!(any.status(), 304);
    // Encoded, so that the client does not resolve the dots before sending.
    for path in [
        "/dashboard/assets/%2e%2e%2f%2e%2e%2fCargo.toml",
        "/dashboard/assets/..%2fdashboard.rs",
    ] {
        assert_error(app.get(path).await, 404, "not_found").await;
    }
    assert_error(app.get("/dashboard/assets/nope.js").await, 404, "not_found").await;
}

/// What the browser test needs, or why it cannot run here.
fn browser_tools() -> Result<(PathBuf, PathBuf), String> {
    let chromium =
        PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned()));
    if !chromium.is_file() {
        return Err(format!(
            "{} is missing (apt-get install -y chromium)",
            chromium.display()
        ));
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !dir.join("node_modules/playwright-core").is_dir() {
        return Err("playwright-core is missing (npm ci --prefix tests/browser)".to_owned());
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Err("node is missing".to_owned());
    }
    Ok((chromium, dir))
}

/// Prints past the test harness's capture, so the screenshot paths show in `cargo test`.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_real_browser() {
    let (chromium, dir) = match browser_tools() {
        Ok(tools) => tools,
        // CI installs both (.ci/run): there, a missing tool is a failure, never a skip.
        Err(why) if std::env::var_os("CI").is_some() => panic!("browser test cannot run: {why}"),
        Err(why) => {
            say(&format!("SKIPPED the browser test: {why}"));
            return;
        }
    };
    let redis = TestRedis::start().await;
    // The sample origin that `runcache demo` runs, served in-process.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind origin");
    let origin_url = format!("http://{}", listener.local_addr().expect("addr"));
    let router = sample_origin::router(SampleOriginOptions {
        delay: Duration::from_millis(20),
    });
    tokio::spawn(async move { axum::serve(listener, router).await });
    let mut settings = test_settings(&origin_url, &redis.url());
    settings.admin.history_interval_ms = 1000;
    let app = spawn_with_settings(settings, TestOrigin::start().await).await;

    let shots = std::env::temp_dir().join(format!(
        "runcache-dashboard-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let url = app.url("");
    let shots_dir = shots.clone();
    let status = tokio::task::spawn_blocking(move || {
        let mut redis = redis;
        let mut child = Command::new("node")
            .arg(dir.join("dashboard.mjs"))
            .current_dir(&dir)
            .env("RUNCACHE_URL", url)
            .env("RUNCACHE_TOKEN", TOKEN)
            .env("SCREENSHOT_DIR", &shots_dir)
            .env("CHROMIUM", chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node");
        let mut to_node = child.stdin.take().expect("stdin");
        let from_node = BufReader::new(child.stdout.take().expect("stdout"));
        for line in from_node.lines() {
            let line = line.expect("read from node");
            match line.trim() {
                "STOP_REDIS" => {
                    redis.kill();
                    writeln!(to_node, "ok").expect("answer node");
                }
                other => say(&format!("[dashboard] {other}")),
            }
        }
        child.wait().expect("node exit")
    })
    .await
    .expect("browser test thread");
    for name in [
        "dashboard-1280.png",
        "dashboard-390.png",
        "dashboard-390-dark.png",
        "dashboard-fallback-1280.png",
    ] {
        let file = shots.join(name);
        if file.is_file() {
            say(&format!("screenshot: {}", file.display()));
        }
    }
    assert!(status.success(), "the browser test failed: {status}");
}

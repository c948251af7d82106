//! Test harness: a real `redis-server` per test (on a free port, killable and restartable),
//! a real in-process origin that counts its calls, and the app itself on port 0.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, StatusCode, header};
use runcache::config::Settings;
use runcache::{AppState, Application};
use secrecy::SecretString;
use serde_json::{Value, json};

// Shared with the checker target, which uses other parts of it.
#[allow(dead_code)]
#[path = "../support/redis.rs"]
mod redis_server;
pub use redis_server::{TestCluster, TestRedis, TestSentinels, free_port};

pub const TOKEN: &str = "test-admin-token";

/// Every log line of every app in this test binary (secrets must never appear in it).
pub static LOGS: LazyLock<Arc<Mutex<Vec<u8>>>> = LazyLock::new(Arc::default);

/// Appends to [`LOGS`], and echoes to stdout when `TEST_LOG` is set.
#[derive(Clone)]
struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().expect("logs").extend_from_slice(buf);
        if std::env::var_os("TEST_LOG").is_some() {
            std::io::stdout().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static TRACING: LazyLock<()> = LazyLock::new(|| {
    let filter = tracing_subscriber::EnvFilter::new("runcache=debug,audit=info,tower_http=debug");
    runcache::telemetry::init_with(runcache::config::LogFormat::Json, filter, || LogSink);
});

/// Everything logged so far, as text.
pub fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().expect("logs")).into_owned()
}

/// What the test origin does; tests change it while the app runs.
#[derive(Default)]
pub struct OriginControl {
    pub calls: Mutex<HashMap<String, usize>>,
    pub total: AtomicUsize,
    pub delay_ms: AtomicU64,
    /// Non-zero: answer every view with this status.
    pub fail_status: AtomicU16,
    pub cache_control: Mutex<Option<String>>,
    pub last_headers: Mutex<Option<HeaderMap>>,
    pub last_body: Mutex<Option<Value>>,
    /// Part of the metrics body: a real content change when bumped.
    pub revision: AtomicU64,
    /// Serve `GET /api/v1/models/runs` (for warming the most recent runs).
    pub list_runs: std::sync::atomic::AtomicBool,
    /// Feature-importance bodies without the fetch counter: every fetch answers the same
    /// bytes (tests that compare two answers fetched apart).
    pub same_bodies: std::sync::atomic::AtomicBool,
    /// Tokens (the part after `Bearer `) from which run `hidden` is hidden: the origin
    /// answers them 404, as it does every token it does not know (see [`enter`]).
    pub hidden_from: Mutex<std::collections::HashSet<String>>,
    /// Calls of `/health` (runcache's readiness probe).
    pub health_calls: AtomicUsize,
    /// Headers added to every view answer (failures included).
    pub extra_headers: Mutex<Vec<(String, String)>>,
    /// Headers added to the next view answer only.
    pub next_headers: Mutex<Vec<(String, String)>>,
    /// Metrics bodies name the request's `Accept-Language` (an origin that varies on it).
    pub echo_language: std::sync::atomic::AtomicBool,
    /// Non-zero: the status of every answer under `/api/v1/writes/` (default 200).
    pub write_status: AtomicU16,
    /// Non-zero: feature-importance bodies carry this many bytes of padding (a body large
    /// enough to be sent from a kept gzip copy).
    pub pad_bytes: AtomicUsize,
}

/// Adds the configured extra headers (and the one-shot ones, consumed) to `resp`.
fn add_extra_headers(c: &OriginControl, resp: &mut Response) {
    let once = std::mem::take(&mut *c.next_headers.lock().expect("lock"));
    let always = c.extra_headers.lock().expect("lock").clone();
    for (name, value) in always.iter().chain(once.iter()) {
        resp.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            value.parse().expect("value"),
        );
    }
}

/// The in-process origin. Clones share it (two instances in front of one origin).
#[derive(Clone)]
pub struct TestOrigin {
    pub url: String,
    pub control: Arc<OriginControl>,
}

impl TestOrigin {
    pub async fn start() -> Self {
        let control = Arc::new(OriginControl::default());
        let app = Router::new()
            .route("/api/v1/models/train/{id}/metrics", get(metrics))
            .route(
                "/api/v1/models/train/{id}/feature-importance",
                get(feature_importance),
            )
            .route(
                "/api/v1/models/train/{id}",
                axum::routing::delete(delete_run),
            )
            .route("/api/v1/models/compare", post(compare))
            .route("/api/v1/writes/{*rest}", axum::routing::any(write))
            .route("/api/v1/models/runs", get(list_runs))
            .route(
                "/health",
                get(|State(c): State<Arc<OriginControl>>| async move {
                    c.health_calls.fetch_add(1, Ordering::SeqCst);
                    "ok"
                }),
            )
            .with_state(control.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind origin");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, control }
    }

    /// Origin calls made for `path` (path without query).
    pub fn calls(&self, path: &str) -> usize {
        *self
            .control
            .calls
            .lock()
            .expect("lock")
            .get(path)
            .unwrap_or(&0)
    }

    pub fn total_calls(&self) -> usize {
        self.control.total.load(Ordering::SeqCst)
    }

    pub fn set_delay(&self, ms: u64) {
        self.control.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Adds `headers` to every view answer from now on.
    pub fn set_headers(&self, headers: &[(&str, &str)]) {
        *self.control.extra_headers.lock().expect("lock") = headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
    }

    /// Adds `headers` to the next view answer only.
    pub fn set_next_headers(&self, headers: &[(&str, &str)]) {
        *self.control.next_headers.lock().expect("lock") = headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
    }

    pub fn set_fail(&self, status: u16) {
        self.control.fail_status.store(status, Ordering::SeqCst);
    }

    pub fn set_cache_control(&self, value: Option<&str>) {
        *self.control.cache_control.lock().expect("lock") = value.map(str::to_owned);
    }

    pub fn last_headers(&self) -> HeaderMap {
        self.control
            .last_headers
            .lock()
            .expect("lock")
            .clone()
            .unwrap_or_default()
    }

    pub fn last_body(&self) -> Option<Value> {
        self.control.last_body.lock().expect("lock").clone()
    }

    /// From now on the origin answers `Bearer {token}` 404 for run `hidden`.
    pub fn hide_from(&self, token: &str) {
        self.control
            .hidden_from
            .lock()
            .expect("lock")
            .insert(token.to_owned());
    }

    /// Sets the metrics body's `revision` (a real content change).
    pub fn set_revision(&self, revision: u64) {
        self.control.revision.store(revision, Ordering::SeqCst);
    }
}

/// Counts the call and applies delay / failure / special ids. `Err` is the answer to send.
async fn enter(
    c: &OriginControl,
    path: String,
    headers: HeaderMap,
    id: &str,
) -> Result<usize, Response> {
    let n = {
        let mut calls = c.calls.lock().expect("lock");
        let n = calls.entry(path).or_insert(0);
        *n += 1;
        *n
    };
    c.total.fetch_add(1, Ordering::SeqCst);
    let own_auth = headers.get("authorization").cloned();
    let hidden_auth = own_auth.clone();
    *c.last_headers.lock().expect("lock") = Some(headers);
    let delay = c.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let fail = c.fail_status.load(Ordering::SeqCst);
    if fail != 0 {
        let status = StatusCode::from_u16(fail).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, "origin exploded at 10.1.2.3").into_response();
        add_extra_headers(c, &mut resp);
        return Err(resp);
    }
    if id == "secure" {
        // Token A may read run "secure"; token B may not; anonymous callers must log in.
        let auth = own_auth;
        match auth.as_ref().map(|v| v.as_bytes()) {
            Some(b"Bearer A") => {}
            Some(_) => {
                return Err(
                    (StatusCode::FORBIDDEN, Json(json!({"detail": "forbidden"}))).into_response(),
                );
            }
            None => {
                return Err((
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    Json(json!({"detail": "not authenticated"})),
                )
                    .into_response());
            }
        }
    }
    if id == "hidden" {
        // Run "hidden": tokens A and C may read it (until hidden from them); the origin hides
        // it from every other caller with a 404, and answers a few tokens otherwise.
        let token = hidden_auth
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let hidden = |t: &str| c.hidden_from.lock().expect("lock").contains(t);
        match token.as_deref() {
            Some(t @ ("A" | "C")) if !hidden(t) => {}
            Some("T429") => {
                return Err((
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, "7")],
                    Json(json!({"detail": "slow down"})),
                )
                    .into_response());
            }
            Some("T302") => {
                return Err((
                    StatusCode::FOUND,
                    [(header::LOCATION, "/login?next=hidden")],
                    Json(json!({"detail": "log in first"})),
                )
                    .into_response());
            }
            Some("T503") => {
                return Err((StatusCode::SERVICE_UNAVAILABLE, "origin overloaded").into_response());
            }
            _ => {
                return Err((
                    StatusCode::NOT_FOUND,
                    Json(json!({"detail": "Model run hidden not found"})),
                )
                    .into_response());
            }
        }
    }
    match id {
        "missing" => Err((
            StatusCode::NOT_FOUND,
            Json(json!({"detail": "Model run missing not found"})),
        )
            .into_response()),
        "forbidden" => Err((
            StatusCode::FORBIDDEN,
            [(header::CONTENT_TYPE, "text/plain")],
            "nope",
        )
            .into_response()),
        _ => Ok(n),
    }
}

fn json_answer(c: &OriginControl, body: String) -> Response {
    let mut resp = (
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response();
    if let Some(cc) = c.cache_control.lock().expect("lock").clone() {
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, cc.parse().expect("header"));
    }
    add_extra_headers(c, &mut resp);
    resp
}

async fn metrics(
    State(c): State<Arc<OriginControl>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/api/v1/models/train/{id}/metrics");
    // The data as it was when the request arrived: a slow answer is computed from it, so a
    // change made while the origin is still answering is not in that answer.
    let revision = c.revision.load(Ordering::SeqCst);
    let lang = c.echo_language.load(Ordering::SeqCst).then(|| {
        headers
            .get("accept-language")
            .map_or("none", |v| v.to_str().unwrap_or("?"))
            .to_owned()
    });
    match enter(&c, path, headers, &id).await {
        Ok(n) if lang.is_some() => json_answer(
            &c,
            format!(
                "{{\"model_run_id\": \"{id}\", \"revision\": {revision}, \"fetch\": {n}, \"lang\": \"{}\"}}",
                lang.unwrap_or_default()
            ),
        ),
        // Deliberately odd spacing: the cache must return these bytes, not re-serialised JSON.
        Ok(n) => json_answer(
            &c,
            format!(
                "{{\"model_run_id\":  \"{id}\", \"accuracy\": 0.93, \"revision\": {revision}, \"fetch\": {n}, \"pad\": \"{}\"}}",
                "x".repeat(200)
            ),
        ),
        Err(r) => r,
    }
}

async fn feature_importance(
    State(c): State<Arc<OriginControl>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/api/v1/models/train/{id}/feature-importance");
    match enter(&c, path, headers, &id).await {
        Ok(n) => {
            let mut body = json!({"model_run_id": id, "top_n": q.get("top_n"), "fetch": n});
            if c.same_bodies.load(Ordering::SeqCst) {
                body["fetch"] = json!(0);
            }
            let pad = c.pad_bytes.load(Ordering::SeqCst);
            if pad > 0 {
                body["pad"] = json!("x".repeat(pad));
            }
            json_answer(&c, body.to_string())
        }
        Err(r) => r,
    }
}

async fn compare(
    State(c): State<Arc<OriginControl>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    *c.last_body.lock().expect("lock") = Some(body.clone());
    match enter(&c, "/api/v1/models/compare".into(), headers, "").await {
        Ok(n) => json_answer(
            &c,
            json!({"compared": body["model_run_ids"], "fetch": n}).to_string(),
        ),
        Err(r) => r,
    }
}

async fn list_runs(
    State(c): State<Arc<OriginControl>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !c.list_runs.load(Ordering::SeqCst) {
        return (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response();
    }
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(10);
    let runs: Vec<Value> = (1..=limit)
        .rev()
        .map(|i| json!({"model_run_id": format!("r{i}")}))
        .collect();
    Json(json!({ "runs": runs })).into_response()
}

async fn delete_run(
    State(c): State<Arc<OriginControl>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match enter(
        &c,
        format!("DELETE /api/v1/models/train/{id}"),
        headers,
        &id,
    )
    .await
    {
        Ok(_) => Json(json!({"deleted": true, "model_run_id": id})).into_response(),
        Err(r) => r,
    }
}

/// Any write under `/api/v1/writes/`: counted as `METHOD path`, its headers and JSON body
/// kept, answered `write_status` (default 200) with `{"ok", "run_id" (the body's),
/// "experiment_id": "7"}` after `delay_ms`.
async fn write(
    State(c): State<Arc<OriginControl>>,
    method: http::Method,
    uri: http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    *c.calls
        .lock()
        .expect("lock")
        .entry(format!("{method} {}", uri.path()))
        .or_insert(0) += 1;
    c.total.fetch_add(1, Ordering::SeqCst);
    *c.last_headers.lock().expect("lock") = Some(headers);
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    *c.last_body.lock().expect("lock") = parsed.clone();
    let delay = c.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = match c.write_status.load(Ordering::SeqCst) {
        0 => StatusCode::OK,
        n => StatusCode::from_u16(n).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    };
    let run_id = parsed.as_ref().and_then(|b| b.get("run_id")).cloned();
    (
        status,
        [("x-origin-write", "yes")],
        Json(json!({"ok": status.is_success(), "run_id": run_id, "experiment_id": "7"})),
    )
        .into_response()
}

/// A running runcache.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub origin: TestOrigin,
    pub state: AppState,
    pub prefix: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Settings every test starts from: the real defaults, then port 0, a per-test prefix, the
/// test origin, and `redis_url` (a closed port when the test wants no Redis).
pub fn test_settings(origin_url: &str, redis_url: &str) -> Settings {
    let mut s = Settings::load_from(None, Some(HashMap::new())).expect("default settings");
    s.server.addr = "127.0.0.1:0".into();
    s.origin.base_url = origin_url.into();
    s.redis.url = SecretString::from(redis_url.to_owned());
    s.redis.probe_interval_ms = 100;
    s.redis.version_poll_ms = 100;
    s.cache.prefix = format!("test-{}", uuid::Uuid::new_v4().simple());
    s.admin.token = Some(SecretString::from(TOKEN));
    s.journal.path = std::env::temp_dir()
        .join(format!("runcache-journal-{}.log", uuid::Uuid::new_v4()))
        .display()
        .to_string();
    s
}

/// A URL where nothing listens.
pub fn closed_redis_url() -> String {
    format!("redis://127.0.0.1:{}", free_port())
}

pub async fn spawn_app(redis: Option<&TestRedis>) -> TestApp {
    spawn_app_with(redis, |_| {}).await
}

pub async fn spawn_app_with(
    redis: Option<&TestRedis>,
    tweak: impl FnOnce(&mut Settings),
) -> TestApp {
    let origin = TestOrigin::start().await;
    let redis_url = redis.map(TestRedis::url).unwrap_or_else(closed_redis_url);
    let mut settings = test_settings(&origin.url, &redis_url);
    tweak(&mut settings);
    spawn_with_settings(settings, origin).await
}

pub async fn spawn_with_settings(settings: Settings, origin: TestOrigin) -> TestApp {
    let test_app = start_app_unwaited(settings, origin).await;
    wait_for(|| async { test_app.state.started.load(Ordering::Acquire) }).await;
    test_app
}

/// Like [`spawn_with_settings`], but returns as soon as the app accepts connections, without
/// waiting for its start-up work (first Redis probe, journal replay, version sync).
pub async fn start_app_unwaited(settings: Settings, origin: TestOrigin) -> TestApp {
    LazyLock::force(&TRACING);
    settings.validate().expect("valid test settings");
    let prefix = settings.cache.prefix.clone();
    let app = Application::build(settings).await.expect("build app");
    let address = format!("http://127.0.0.1:{}", app.port());
    let state = app.state().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    TestApp {
        address,
        client,
        origin,
        state,
        prefix,
        stop: Some(stop),
        task: Some(task),
    }
}

/// Polls `cond` every 20 ms for up to 10 s.
pub async fn wait_for<F, Fut>(cond: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(Instant::now() < deadline, "condition not met within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl TestApp {
    /// Graceful shutdown, awaited.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("app task").expect("app stopped cleanly");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request")
    }

    pub async fn metrics(&self, id: &str) -> reqwest::Response {
        self.get(&format!("/api/v1/models/train/{id}/metrics"))
            .await
    }

    pub async fn compare(&self, ids: Value) -> reqwest::Response {
        self.client
            .post(self.url("/api/v1/models/compare"))
            .json(&json!({ "model_run_ids": ids }))
            .send()
            .await
            .expect("request")
    }

    /// An authenticated admin or event request with a JSON body.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut req = self
            .client
            .request(method, self.url(path))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.expect("request")
    }

    pub async fn event(&self, kind: &str, run_id: Value) -> reqwest::Response {
        self.admin(
            reqwest::Method::POST,
            &format!("/events/{kind}"),
            Some(json!({ "model_run_id": run_id })),
        )
        .await
    }

    pub async fn stats(&self) -> Value {
        let resp = self.admin(reqwest::Method::GET, "/cache/stats", None).await;
        assert_eq!(resp.status(), 200);
        resp.json().await.expect("stats json")
    }
}

pub fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().expect("ascii header"))
        .unwrap_or("")
}

/// Asserts `resp` is our JSON error with `status` and `code`; returns the message.
pub async fn assert_error(resp: reqwest::Response, status: u16, code: &str) -> String {
    assert_eq!(resp.status(), status, "status");
    assert!(
        header(&resp, "content-type").starts_with("application/json"),
        "content-type {:?}",
        header(&resp, "content-type")
    );
    let body: Value = resp.json().await.expect("json error body");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned();
    assert!(!message.is_empty());
    message
}

/// The real `runcache` binary in a fresh working directory of its own that holds only
/// `config/default.toml` (as a fresh clone does: no `data/`), memory only unless `envs`
/// names a Redis, what it prints kept in a file. Killed when dropped, so a failing assertion
/// never leaves a server running.
pub struct Binary {
    child: Option<std::process::Child>,
    /// `http://127.0.0.1:{port}`.
    pub base: String,
    /// Its working directory.
    pub dir: std::path::PathBuf,
    output: std::path::PathBuf,
}

impl Binary {
    /// Starts it against `origin_url` with `envs` on top of the defaults, and waits until
    /// `/health` answers.
    pub async fn start(origin_url: &str, envs: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("runcache-bin-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("config")).expect("working directory");
        std::fs::copy(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"),
            dir.join("config/default.toml"),
        )
        .expect("copy config/default.toml");
        let output = dir.join("output.log");
        let log = std::fs::File::create(&output).expect("log file");
        let port = free_port();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_runcache"));
        cmd.current_dir(&dir)
            .env("RUNCACHE__SERVER__ADDR", format!("127.0.0.1:{port}"))
            .env("RUNCACHE__ORIGIN__BASE_URL", origin_url)
            .env(
                "RUNCACHE__REDIS__URL",
                format!("redis://127.0.0.1:{}", free_port()),
            )
            .env("RUNCACHE__ADMIN__TOKEN", TOKEN)
            .env_remove("RUST_LOG")
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start runcache");
        let bin = Self {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            dir,
            output,
        };
        let client = reqwest::Client::new();
        wait_for(|| async { client.get(bin.url("/health")).send().await.is_ok() }).await;
        bin
    }

    /// `path` on it.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Its process id (while it runs).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    /// Stops it with SIGTERM and waits for it to exit.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let status = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("wait");
    }

    /// Everything it printed (stdout and stderr) so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Two instances with public views (`auth.frontend = none`) on `redis`, one prefix and one
/// origin: what several replicas behind a load balancer share.
pub async fn two_public_instances(redis: &TestRedis) -> (TestApp, TestApp) {
    let a = spawn_app_with(Some(redis), |s| s.auth.frontend = "none".into()).await;
    let mut settings = test_settings(&a.origin.url, &redis.url());
    settings.auth.frontend = "none".into();
    settings.cache.prefix = a.prefix.clone();
    let b = spawn_with_settings(settings, a.origin.clone()).await;
    (a, b)
}

/// Reads the metrics of `runs` in turn through `app` until `stop`, one request at a time,
/// recording each (a failover under load).
pub fn load(
    app: &TestApp,
    runs: &'static [&'static str],
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    let client = app.client.clone();
    let base = app.address.clone();
    tokio::spawn(async move {
        let mut out = Vec::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let run = runs[(i % runs.len() as u64) as usize];
            i += 1;
            let started = Instant::now();
            let resp = client
                .get(format!("{base}/api/v1/models/train/{run}/metrics"))
                .send()
                .await;
            let (status, detail, revision) = match resp {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let detail = header(&r, "cache-status").to_owned();
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    (status, detail, body["revision"].clone())
                }
                Err(_) => (0, String::new(), Value::Null),
            };
            out.push(Sample {
                run,
                started,
                took: started.elapsed(),
                status,
                detail,
                revision,
            });
        }
        out
    })
}

/// One request of [`load`].
pub struct Sample {
    pub run: &'static str,
    pub started: Instant,
    pub took: Duration,
    pub status: u16,
    pub detail: String,
    pub revision: Value,
}

/// Checks a failover under load ([`load`]): prints what happened (`what`: which failover;
/// `promoted` and `back`: when the replica was promoted and runcache back on Redis, after the
/// kill) and asserts that no request failed and that no read of run `"1"` that started after
/// `acknowledged` (its event) returned a revision other than 1.
pub fn assert_failover(
    what: &str,
    samples: &[Sample],
    acknowledged: Instant,
    promoted: Duration,
    back: Duration,
) {
    let failed = samples.iter().filter(|x| x.status != 200).count();
    let from_memory = samples
        .iter()
        .filter(|x| x.detail.contains("memory-fallback"))
        .count();
    let stale = samples
        .iter()
        .filter(|x| x.run == "1" && x.started > acknowledged && x.revision != json!(1))
        .count();
    let longest = samples.iter().map(|x| x.took).max().unwrap_or_default();
    println!(
        "{what}: {} requests, {failed} failed, {from_memory} served from memory, longest {longest:?}; \
         replica promoted after {promoted:?}, runcache back on redis after {back:?}; \
         {stale} reads of the invalidated run served the old revision",
        samples.len()
    );
    assert_eq!(failed, 0, "no request fails during the failover");
    assert_eq!(stale, 0, "nothing invalidated is served after the failover");
    assert!(samples.len() > 20, "the load ran: {}", samples.len());
}

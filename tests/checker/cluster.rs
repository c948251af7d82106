//! The runcache instances under test: in process, on one Redis and one origin, sharing a
//! prefix and an admin token, each with its own journal. An instance restart is a graceful
//! stop followed by a new instance built from the same settings, on the same port when it can
//! be bound again (else on a new one). Readers and the writer look the address up by instance
//! index at every request, so they follow a move.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use runcache::config::{Settings, Ttl};
use runcache::{AppState, Application};
use secrecy::SecretString;

pub const ADMIN_TOKEN: &str = "checker-admin-token";

/// Graceful-stop allowance given to an instance (`server.shutdown_timeout_ms`).
const SHUTDOWN_TIMEOUT_MS: u64 = 2_000;

/// Settings of instance `index`: the real defaults, then what the checker needs.
pub fn instance_settings(
    origin_url: &str,
    redis_url: &str,
    prefix: &str,
    index: usize,
) -> Settings {
    let mut s = Settings::load_from(None, Some(HashMap::new())).expect("default settings");
    s.server.addr = "127.0.0.1:0".into();
    s.server.shutdown_timeout_ms = SHUTDOWN_TIMEOUT_MS;
    s.origin.base_url = origin_url.into();
    s.redis.url = SecretString::from(redis_url.to_owned());
    s.redis.probe_interval_ms = 100;
    s.redis.version_poll_ms = 100;
    s.cache.prefix = prefix.into();
    s.admin.token = Some(SecretString::from(ADMIN_TOKEN));
    s.journal.path = std::env::temp_dir()
        .join(format!("{prefix}-journal-{index}.log"))
        .display()
        .to_string();
    s.l1.enabled = true;
    s.memory.degraded_max_age_ms = crate::check::DEGRADED_MAX_AGE_US / 1_000;
    // Short lives, so refresh-ahead and stale-while-revalidate happen many times a run.
    s.views.metrics.ttl = Ttl(Duration::from_secs(3));
    s.views.metrics.grace = 2;
    s.views.metrics.stale_if_error = 4;
    s.views.feature_importance.ttl = Ttl(Duration::from_secs(2));
    s.views.feature_importance.grace = 1;
    s.views.feature_importance.stale_if_error = 3;
    s.views.comparison.ttl = Ttl(Duration::from_secs(3));
    s.views.comparison.grace = 1;
    s.views.comparison.stale_if_error = 4;
    let ranking = s
        .views
        .others
        .get_mut("model_ranking")
        .expect("the shipped model_ranking view");
    ranking.ttl = Ttl(Duration::from_secs(3));
    ranking.grace = 1;
    ranking.stale_if_error = 4;
    s.refresh.min_hits = 2;
    s.refresh.ahead_percent = 50;
    s.refresh.jitter_ms = 50;
    // Every instance reads the event stream (see `stream.rs`).
    s.events.stream = Some(format!("{prefix}:events"));
    s.events.stream_block_ms = 200;
    s.events.stream_claim_idle_ms = 1_000;
    s.events.max_deliveries = 2;
    s.validate().expect("valid checker settings");
    s
}

struct Running {
    state: AppState,
    port: u16,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Counters of one instance slot, summed over the instances that ran in it.
#[derive(Debug, Default, Clone)]
pub struct SlotTotals {
    pub generations: u64,
    pub near_hits: u64,
    pub near_invalidations: u64,
    pub near_flushes: u64,
    pub ack_timeouts: u64,
    pub circuit_opened: u64,
    pub redis_errors: u64,
    /// Harness observations (an instance that did not stop in time, a port that moved).
    pub notes: Vec<String>,
}

pub struct Slot {
    addr: RwLock<String>,
    settings: Settings,
    running: tokio::sync::Mutex<Option<Running>>,
    totals: Mutex<SlotTotals>,
}

pub struct Cluster {
    pub slots: Vec<Arc<Slot>>,
}

async fn start_instance(mut settings: Settings, port: Option<u16>) -> (Running, Option<String>) {
    let mut note = None;
    let app = match port {
        Some(p) => {
            settings.server.addr = format!("127.0.0.1:{p}");
            match Application::build(settings.clone()).await {
                Ok(app) => app,
                Err(e) => {
                    note = Some(format!("port {p} could not be bound again ({e:#}); moved"));
                    settings.server.addr = "127.0.0.1:0".into();
                    Application::build(settings).await.expect("build instance")
                }
            }
        }
        None => Application::build(settings).await.expect("build instance"),
    };
    let port = app.port();
    let state = app.state().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state.started.load(Ordering::Acquire) {
        assert!(
            Instant::now() < deadline,
            "instance did not start within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (
        Running {
            state,
            port,
            stop,
            task,
        },
        note,
    )
}

impl Slot {
    /// The instance's current base URL.
    pub fn addr(&self) -> String {
        self.addr.read().expect("addr").clone()
    }

    pub fn totals(&self) -> SlotTotals {
        self.totals.lock().expect("totals").clone()
    }

    fn add_totals(&self, state: &AppState) {
        let near = state.store.near_counts();
        let tiers = state.store.tiered().counts();
        let mut t = self.totals.lock().expect("totals");
        t.generations += 1;
        t.near_hits += near.hits;
        t.near_invalidations += near.invalidations;
        t.near_flushes += near.flushes;
        t.ack_timeouts += near.ack_timeouts;
        t.circuit_opened += tiers.circuit_opened;
        t.redis_errors += tiers.redis_errors;
    }

    fn note(&self, note: String) {
        self.totals.lock().expect("totals").notes.push(note);
    }

    /// Graceful stop of the running instance, if any; returns its port.
    async fn stop_running(&self, running: &mut Option<Running>) -> Option<u16> {
        let r = running.take()?;
        self.add_totals(&r.state);
        let _ = r.stop.send(());
        let started = Instant::now();
        let mut task = r.task;
        let limit = Duration::from_millis(SHUTDOWN_TIMEOUT_MS + 5_000);
        match tokio::time::timeout(limit, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => self.note(format!("instance stopped with an error: {e:#}")),
            Ok(Err(e)) => self.note(format!("instance task failed: {e}")),
            Err(_) => {
                task.abort();
                self.note(format!(
                    "instance did not stop within {} ms; aborted",
                    limit.as_millis()
                ));
            }
        }
        let took = started.elapsed();
        if took > Duration::from_millis(SHUTDOWN_TIMEOUT_MS) {
            self.note(format!("graceful stop took {} ms", took.as_millis()));
        }
        Some(r.port)
    }

    /// Stops the instance gracefully, waits `pause`, and starts a new one with the same
    /// settings (same port if possible). Returns a description for the fault record.
    pub async fn restart(&self, pause: Duration) -> String {
        let mut running = self.running.lock().await;
        let port = self.stop_running(&mut running).await;
        tokio::time::sleep(pause).await;
        let (new, note) = start_instance(self.settings.clone(), port).await;
        let detail = format!(
            "stopped port {}, started port {}",
            port.map_or_else(|| "-".into(), |p| p.to_string()),
            new.port
        );
        if let Some(n) = note {
            self.note(n);
        }
        *self.addr.write().expect("addr") = format!("http://127.0.0.1:{}", new.port);
        *running = Some(new);
        detail
    }

    /// Whether the running instance's near-cache subscription is live.
    pub async fn near_live(&self) -> bool {
        let running = self.running.lock().await;
        running
            .as_ref()
            .is_some_and(|r| r.state.store.near().is_some_and(|n| n.cache.is_live()))
    }

    pub async fn stop(&self) {
        let mut running = self.running.lock().await;
        self.stop_running(&mut running).await;
    }
}

impl Cluster {
    pub async fn start(settings: Vec<Settings>) -> Self {
        let mut slots = Vec::new();
        for s in settings {
            let (running, _) = start_instance(s.clone(), None).await;
            slots.push(Arc::new(Slot {
                addr: RwLock::new(format!("http://127.0.0.1:{}", running.port)),
                settings: s,
                running: tokio::sync::Mutex::new(Some(running)),
                totals: Mutex::default(),
            }));
        }
        Self { slots }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn addr(&self, i: usize) -> String {
        self.slots[i].addr()
    }

    /// Waits (up to 10 s) until every instance's near-cache subscription is live.
    pub async fn wait_near_live(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for s in &self.slots {
            while !s.near_live().await {
                assert!(
                    Instant::now() < deadline,
                    "near-cache subscriptions not live within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    pub async fn stop_all(&self) {
        for s in &self.slots {
            s.stop().await;
        }
    }
}

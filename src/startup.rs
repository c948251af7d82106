//! Building and running the application: bind, background tasks, graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Settings, ms};
use crate::http::build_service;
use crate::state::AppState;
use crate::store::Tier;

/// A bound, not yet running, service.
pub struct Application {
    listener: TcpListener,
    port: u16,
    state: AppState,
}

impl Application {
    /// Builds the state and binds `server.addr` (port 0 picks a free port).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let addr = settings.socket_addr()?;
        let state = AppState::new(settings)?;
        if state.token_generated {
            // Logged once, here, so an operator can use the admin routes (as Jupyter does).
            tracing::warn!(
                token = %state.admin_token.expose_secret(),
                "no admin.token configured; generated one for this process (set RUNCACHE__ADMIN__TOKEN to choose it)"
            );
        }
        if state.settings.auth.mode() == crate::domain::FrontendAuth::None {
            tracing::warn!("auth.frontend = none: cached views are public, served to any caller");
        }
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind {addr}"))?;
        let bound = listener.local_addr()?;
        let port = bound.port();
        // Other instances send invalidations made during a Redis outage here.
        let advertised = match &state.settings.server.advertise_url {
            Some(url) => url.clone(),
            None => default_advertise_url(bound, state.settings.redis.url.expose_secret()).await,
        };
        tracing::info!(url = %advertised, "advertised to other instances");
        if !state.store.tiered().peers().allows(&advertised) {
            tracing::warn!(url = %advertised, "the advertised URL's host is not in peers.allowed: instances with these settings ignore it, so none can tell this one of invalidations directly (set server.advertise_url or peers.allowed)");
        }
        state.store.tiered().peers().advertise(advertised);
        Ok(Self {
            listener,
            port,
            state,
        })
    }

    /// The port actually bound.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The shared state (tests read the admin token and counters from it).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish
    /// within `server.shutdown_timeout_ms`, waits (within the same bound) for the background
    /// work they left (fetches, refreshes, clean-ups) and cancels what remains, and stops the
    /// background loops. Nothing of this instance writes to Redis after it returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener, state, ..
        } = self;
        let settings = state.settings.clone();
        tracing::info!(
            addr = %listener.local_addr()?,
            origin = %settings.origin_url_redacted(),
            redis = %settings.redis_url_redacted(),
            "runcache listening"
        );
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        spawn_background(&state, &tasks, &cancel);

        let store = state.store.clone();
        let snapshots = state.snapshots.clone();
        let work = state.tasks.clone();
        let app = build_service(state);
        let stopping = CancellationToken::new();
        let stop_signal = stopping.clone();
        let conn_opts = crate::http::conn::ConnOptions {
            header_read_timeout: ms(settings.server.header_read_timeout_ms),
            max_connections: settings.server.max_connections,
        };
        let server = crate::http::conn::serve(
            listener,
            move |peer| app.for_peer(peer),
            conn_opts,
            async move {
                shutdown.await;
                stop_signal.cancel();
            },
        );
        let grace = ms(settings.server.shutdown_timeout_ms);
        tokio::select! {
            () = server => {},
            () = async { stopping.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!("in-flight requests did not finish within server.shutdown_timeout_ms; stopping");
            }
        }
        let cancelled = work.stop(grace).await;
        if cancelled > 0 {
            tracing::warn!(cancelled, "background work cancelled at shutdown");
        }
        cancel.cancel();
        tasks.close();
        tasks.wait().await;
        let tiered = store.tiered();
        // The heartbeat has stopped: leave the registry, so that the others stop sending
        // this instance invalidations now rather than once it ages out.
        tiered.leave().await;
        if let Some(snap) = snapshots
            && tiered.tier() == Tier::Memory
        {
            snap.maybe_write(tiered.memory(), true, tiered.peers().any())
                .await;
        }
        // Every journal append is already durable; say what the next start will replay.
        let pending = tiered.pending_invalidations();
        if pending > 0 && settings.redis_left_at_default() && tiered.serving_epoch() == 0 {
            // The embedded store all along, by default: nothing went wrong.
            tracing::info!(pending, path = %settings.journal.path, "invalidations journaled; they are replayed to redis should one answer at redis.url");
        } else if pending > 0 {
            tracing::warn!(pending, path = %settings.journal.path, "invalidations still journaled; they are replayed to redis at the next start");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// How other instances reach this one when `server.advertise_url` is unset: the address
/// bound, or, bound to every interface, the address this host reaches Redis from (the other
/// instances reach the same Redis, so they share that network).
async fn default_advertise_url(bound: std::net::SocketAddr, redis_url: &str) -> String {
    if !bound.ip().is_unspecified() {
        return format!("http://{bound}");
    }
    let redis = reqwest::Url::parse(redis_url).ok().and_then(|u| {
        let host = u.host_str()?.trim_matches(['[', ']']).to_owned();
        Some((host, u.port().unwrap_or(6379)))
    });
    let local = match redis {
        Some((host, port)) => tokio::net::lookup_host((host.as_str(), port))
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .and_then(|redis| {
                // Connecting a UDP socket sends nothing; it only picks the local address.
                let any: std::net::SocketAddr = if redis.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let socket = std::net::UdpSocket::bind(any).ok()?;
                socket.connect(redis).ok()?;
                socket.local_addr().ok().map(|a| a.ip())
            }),
        None => None,
    };
    let ip = local.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    format!("http://{}", std::net::SocketAddr::new(ip, bound.port()))
}

/// Runs `tick` every `period` until cancelled, the first time at once.
fn every<F, Fut>(tasks: &TaskTracker, cancel: &CancellationToken, period: Duration, tick: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    every_from(tasks, cancel, Duration::ZERO, period, tick);
}

/// Runs `tick` every `period` until cancelled, the first time after `first`.
fn every_from<F, Fut>(
    tasks: &TaskTracker,
    cancel: &CancellationToken,
    first: Duration,
    period: Duration,
    mut tick: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let cancel = cancel.clone();
    tasks.spawn(async move {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + first, period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = interval.tick() => tick().await,
            }
        }
    });
}

fn spawn_background(state: &AppState, tasks: &TaskTracker, cancel: &CancellationToken) {
    let s = state.clone();
    tasks.spawn(async move {
        // Start-up: restore the memory tier's snapshot (minus what the journal invalidated),
        // find Redis (or stay on memory), adopt the shared version, then warm.
        let tiered = s.store.tiered();
        if let Some(snap) = &s.snapshots {
            if snap.load(tiered.memory(), &s.keys, &s.version.get()).await {
                tiered.peers().assume_others();
            }
            tiered.replay_journal_into_memory();
        }
        let probed = s.store.probe().await;
        // The first readiness probe, so that `/ready` reports reachability from its first
        // 200 (after the store's probe: a ping while it connects would fail).
        crate::http::ops::probe_readiness(&s).await;
        if probed {
            tiered.heartbeat().await;
        } else if s.settings.redis_left_at_default() {
            // No Redis was asked for: the embedded store is the default set-up, not a fault.
            // The probe goes on, so a Redis started there later is taken up (said at info).
            tracing::info!(redis = %s.settings.redis_url_redacted(), "no redis at the default redis.url; serving from the embedded in-process store (set redis.url, or RUNCACHE__REDIS__URL, to use redis)");
        } else {
            tracing::warn!(redis = %s.settings.redis_url_redacted(), "redis unreachable at start; serving from the memory tier and probing in the background");
        }
        match s.version.sync(s.store.as_ref(), &s.keys).await {
            Ok(()) => {}
            // Said just above; the version poll adopts the shared version once Redis answers.
            Err(e) if !probed && e.is_unavailable() => {
                tracing::debug!(error = %e, "shared key version not read: redis unreachable");
            }
            Err(e) => tracing::warn!(error = %e, "could not read the shared key version"),
        }
        s.started.store(true, Ordering::Release);
        // Warming runs after start-up is declared done: it never delays serving.
        let warm = &s.settings.warm;
        let mut ids = warm.model_run_ids.clone();
        if warm.recent_runs > 0
            && let Some(recent) = s.views.recent_runs(&warm.recent_path, warm.recent_runs).await
        {
            ids.extend(recent);
        }
        ids.sort();
        ids.dedup();
        if !ids.is_empty() {
            tracing::info!(runs = ids.len(), "start-up warm-up begins");
            let report = s.views.warm(&ids, warm.concurrency).await;
            tracing::info!(warmed = report.warmed, skipped = report.skipped, failed = report.failed.len(), "start-up warm-up done");
        }
    });

    if let Some(near) = state.store.near() {
        tasks.spawn(near.bus.clone().run(
            near.cache.clone(),
            state.store.tiered().clone(),
            ms(state.settings.redis.connect_timeout_ms),
            cancel.clone(),
        ));
    }

    if let Some(stream) = state.settings.events.stream.clone() {
        let e = &state.settings.events;
        let tiered = state.store.tiered();
        let consumer = e
            .stream_consumer
            .clone()
            .or_else(|| tiered.peers().url())
            .unwrap_or_else(|| tiered.peers().id().to_owned());
        let opts = crate::invalidation::stream::StreamOptions {
            stream,
            group: e.stream_group.clone(),
            consumer,
            block: ms(e.stream_block_ms),
            claim_idle: ms(e.stream_claim_idle_ms),
            batch: e.stream_batch,
            max_deliveries: e.max_deliveries,
            retry: ms(state
                .settings
                .redis
                .probe_interval_ms
                .max(state.settings.redis.connect_timeout_ms)),
            command_timeout: ms(state.settings.redis.command_timeout_ms)
                .max(Duration::from_secs(1)),
            kinds: state.kinds.clone(),
        };
        let intake = crate::invalidation::stream::StreamIntake::new(
            tiered.redis().clone(),
            state.invalidator.clone(),
            opts,
            state.started.clone(),
            state.audit.clone(),
        );
        tasks.spawn(intake.run(cancel.clone()));
    }

    // Sentinel mode: a failover drops the request path's connection at once.
    let redis = state.store.tiered().redis().clone();
    let retry = ms(state.settings.redis.probe_interval_ms);
    let watching = cancel.clone();
    tasks.spawn(async move { redis.follow_master(retry, watching).await });

    // The history's first sample is taken now, so the dashboard has a point from the start.
    state.history.push(crate::http::stats::reading(state));
    let s = state.clone();
    let interval = ms(state.settings.admin.history_interval_ms);
    every_from(tasks, cancel, interval, interval, move || {
        let s = s.clone();
        async move { crate::http::stats::sample(&s).await }
    });

    // The probe runs only while the circuit is open; at most one runs at a time in any case.
    let s = state.clone();
    every(
        tasks,
        cancel,
        ms(s.settings.redis.probe_interval_ms),
        move || {
            let s = s.clone();
            async move {
                if s.store.tiered().tier() == Tier::Memory && s.store.probe().await {
                    s.store.tiered().heartbeat().await;
                    let _ = s.version.sync(s.store.as_ref(), &s.keys).await;
                }
            }
        },
    );

    let s = state.clone();
    every(
        tasks,
        cancel,
        ms(s.settings.redis.version_poll_ms),
        move || {
            let s = s.clone();
            async move {
                if s.store.tiered().tier() == Tier::Redis {
                    let _ = s.version.sync(s.store.as_ref(), &s.keys).await;
                }
            }
        },
    );

    // `/ready` answers from this probe (and from the start-up one before it).
    let s = state.clone();
    let period = ms(s.settings.server.ready_probe_interval_ms);
    every_from(tasks, cancel, period, period, move || {
        let s = s.clone();
        async move { crate::http::ops::probe_readiness(&s).await }
    });

    // Registration, so that during an outage each instance knows whom to tell.
    let s = state.clone();
    every(tasks, cancel, Duration::from_secs(1), move || {
        let s = s.clone();
        async move { s.store.tiered().heartbeat().await }
    });

    if let Some(snap) = state.snapshots.clone() {
        let s = state.clone();
        let discarded = Arc::new(AtomicBool::new(false));
        every(tasks, cancel, Duration::from_secs(1), move || {
            let (s, snap, discarded) = (s.clone(), snap.clone(), discarded.clone());
            async move {
                let tiered = s.store.tiered();
                if tiered.tier() == Tier::Memory {
                    discarded.store(false, Ordering::Relaxed);
                    snap.maybe_write(tiered.memory(), false, tiered.peers().any())
                        .await;
                } else if !discarded.swap(true, Ordering::Relaxed) {
                    snap.discard().await;
                }
            }
        });
    }

    let s = state.clone();
    let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
    every(tasks, cancel, Duration::from_secs(5), move || {
        let s = s.clone();
        let tick = ticks.fetch_add(1, Ordering::Relaxed);
        async move {
            // Expired memory entries are dropped without waiting for a write, idle read
            // counters forgotten, and histogram buckets are folded (the exporter has no upkeep
            // thread of its own).
            s.store.tiered().memory().run_pending_tasks();
            let counters = s.store.counters().clone();
            // Off the workers: a due sweep walks up to 100 000 counters.
            let _ = tokio::task::spawn_blocking(move || counters.sweep()).await;
            if let Some(near) = s.store.near() {
                near.cache.run_pending_tasks();
            }
            // Once a minute, off the workers: the sweep walks up to 1,000,000 acceptances.
            if tick % 12 == 11 {
                let state = s.clone();
                let _ = tokio::task::spawn_blocking(move || state.views.access().sweep()).await;
            }
            s.prometheus.run_upkeep();
        }
    });
}

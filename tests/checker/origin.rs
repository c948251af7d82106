//! The in-process origin: runs `1..=runs`, each with a revision the writer bumps, and rankings
//! `1..=rankings.len()`, each listing a fixed few of those runs with their current revisions
//! (the `model_ranking` view, whose entries learn their `run:` tags from this answer). It
//! reads the revisions when a request arrives, then sleeps a seeded random delay (0–40 ms)
//! before answering, like a backend that reads its database and then serialises slowly.
//! Bodies never depend on the caller's credential; access follows [`Cred::refusal`] (a view
//! over several runs, a comparison or a ranking, is refused when any of them is).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};

use crate::history::Cred;
use crate::rng::{Rng, STREAM_ORIGIN};

/// Largest origin delay, in milliseconds.
pub const MAX_DELAY_MS: u64 = 40;

pub struct OriginState {
    revisions: Vec<AtomicU64>,
    /// The runs ranking `i + 1` lists, best first (see `workload::plan_rankings`).
    rankings: Vec<Vec<u32>>,
    /// The delays, drawn in arrival order (which timing decides) from a seeded stream.
    delays: Mutex<Rng>,
    pub calls: AtomicU64,
    pub refusals: AtomicU64,
}

#[derive(Clone)]
pub struct Origin {
    pub url: String,
    pub state: Arc<OriginState>,
}

impl Origin {
    pub async fn start(seed: u64, runs: u32, rankings: Vec<Vec<u32>>) -> Self {
        let state = Arc::new(OriginState {
            revisions: (0..=runs).map(|_| AtomicU64::new(0)).collect(),
            rankings,
            delays: Mutex::new(Rng::derive(seed, STREAM_ORIGIN, 0)),
            calls: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/api/v1/models/train/{id}/metrics", get(metrics))
            .route(
                "/api/v1/models/train/{id}/feature-importance",
                get(feature_importance),
            )
            .route("/api/v1/models/compare", post(compare))
            .route("/api/v1/models/rankings/{id}", get(ranking))
            .route("/health", get(|| async { "ok" }))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind origin");
        let url = format!("http://{}", listener.local_addr().expect("origin addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, state }
    }

    /// Bumps `run`'s revision; returns the new one.
    pub fn bump(&self, run: u32) -> u64 {
        self.state.revisions[run as usize].fetch_add(1, Ordering::SeqCst) + 1
    }
}

impl OriginState {
    fn revision(&self, run: u32) -> u64 {
        self.revisions[run as usize].load(Ordering::SeqCst)
    }

    fn run(&self, id: &str) -> Option<u32> {
        id.parse::<u32>()
            .ok()
            .filter(|r| *r >= 1 && (*r as usize) < self.revisions.len())
    }

    async fn delay(&self) {
        let ms = self
            .delays
            .lock()
            .expect("origin rng")
            .range(0, MAX_DELAY_MS);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// Counts the call; `Err` is the refusal to send for `runs` (all known runs).
    fn admit(&self, headers: &HeaderMap, runs: &[u32]) -> Result<(), Box<Response>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let auth = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let refusal = match Cred::from_header(auth) {
            None => Some((StatusCode::UNAUTHORIZED, "origin: unknown credentials")),
            Some(cred) => cred.refusal_of(runs).map(|status| {
                if status == 403 {
                    (StatusCode::FORBIDDEN, "origin: forbidden")
                } else {
                    (StatusCode::NOT_FOUND, "origin: not found")
                }
            }),
        };
        match refusal {
            None => Ok(()),
            Some((status, detail)) => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
                Err(Box::new(
                    (status, Json(json!({ "detail": detail }))).into_response(),
                ))
            }
        }
    }
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"detail": "origin: no such run"})),
    )
        .into_response()
}

fn answer(body: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn metrics(
    State(s): State<Arc<OriginState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(run) = s.run(&id) else {
        return not_found();
    };
    if let Err(r) = s.admit(&headers, &[run]) {
        return *r;
    }
    let revision = s.revision(run);
    s.delay().await;
    answer(json!({"model_run_id": id, "revision": revision}))
}

async fn feature_importance(
    State(s): State<Arc<OriginState>>,
    Path(id): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Some(run) = s.run(&id) else {
        return not_found();
    };
    if let Err(r) = s.admit(&headers, &[run]) {
        return *r;
    }
    let revision = s.revision(run);
    let top_n: Option<u32> = q.get("top_n").and_then(|n| n.parse().ok());
    s.delay().await;
    answer(json!({"model_run_id": id, "revision": revision, "top_n": top_n}))
}

async fn compare(
    State(s): State<Arc<OriginState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let ids: Vec<String> = body["model_run_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let runs: Option<Vec<u32>> = ids.iter().map(|id| s.run(id)).collect();
    let Some(runs) = runs.filter(|r| r.len() >= 2) else {
        return not_found();
    };
    if let Err(r) = s.admit(&headers, &runs) {
        return *r;
    }
    let revisions: serde_json::Map<String, Value> = ids
        .iter()
        .zip(&runs)
        .map(|(id, run)| (id.clone(), json!(s.revision(*run))))
        .collect();
    s.delay().await;
    answer(json!({ "revisions": revisions }))
}

async fn ranking(
    State(s): State<Arc<OriginState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(runs) = id
        .parse::<usize>()
        .ok()
        .and_then(|i| s.rankings.get(i.checked_sub(1)?))
    else {
        return not_found();
    };
    if let Err(r) = s.admit(&headers, runs) {
        return *r;
    }
    let listed: Vec<Value> = runs
        .iter()
        .map(|run| json!({"model_run_id": run.to_string(), "revision": s.revision(*run)}))
        .collect();
    s.delay().await;
    answer(json!({ "ranking_id": id, "runs": listed }))
}

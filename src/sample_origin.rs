//! Sample origin: a fake, deliberately slow ML backend for the local demo and docker-compose.
//!
//! It answers the origin paths that runcache fronts (metrics, feature importance, comparisons,
//! run deletion) with realistic JSON whose numbers are deterministic functions of the run id,
//! so a cached body and a fresh one differ only in `generated_at`. Errors use the
//! `{"detail": "..."}` shape of a FastAPI backend. Ids starting with `missing` never exist.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

/// Options for the sample origin.
#[derive(Debug, Clone)]
pub struct SampleOriginOptions {
    /// Artificial latency added to every model-run view.
    pub delay: Duration,
}

impl Default for SampleOriginOptions {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(300),
        }
    }
}

/// Builds the sample origin's router (no binding, no globals).
pub fn router(opts: SampleOriginOptions) -> Router {
    let state = OriginState {
        delay: opts.delay,
        deleted: Arc::default(),
        calls: Arc::default(),
    };
    Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route(
            "/api/v1/models/train/{model_run_id}/metrics",
            get(get_metrics),
        )
        .route(
            "/api/v1/models/train/{model_run_id}/feature-importance",
            get(get_feature_importance),
        )
        .route(
            "/api/v1/models/train/{model_run_id}",
            delete(delete_model_run),
        )
        .route("/api/v1/models/compare", post(create_comparison))
        .route("/api/v1/models/runs", get(list_runs))
        .route(
            "/api/v1/datasets/{dataset_id}/stats",
            get(get_dataset_stats),
        )
        .route(
            "/api/v1/tuning/{tuning_id}/results",
            get(get_tuning_results),
        )
        .route("/api/v1/models/rankings/{ranking_id}", get(get_ranking))
        .route("/_sample/calls", get(view_calls))
        .fallback(|| async { detail(StatusCode::NOT_FOUND, "Not Found") })
        .method_not_allowed_fallback(|| async {
            detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
        })
        .with_state(state)
}

/// Serves the sample origin on `listener` until `shutdown` resolves.
///
/// # Errors
///
/// Returns the I/O error that stopped the server.
pub async fn serve(
    listener: tokio::net::TcpListener,
    opts: SampleOriginOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(opts))
        .with_graceful_shutdown(shutdown)
        .await
}

#[derive(Clone)]
struct OriginState {
    delay: Duration,
    /// Runs deleted through `DELETE`; their views answer 404 from then on.
    deleted: Arc<Mutex<HashSet<String>>>,
    /// View requests that passed validation (what `bench/run.sh` counts in a stampede).
    calls: Arc<AtomicU64>,
}

impl OriginState {
    fn is_gone(&self, id: &str) -> bool {
        id.starts_with("missing") || self.deleted_ids().contains(id)
    }

    /// A panic elsewhere cannot corrupt a set of strings, so a poisoned lock is still usable.
    fn deleted_ids(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.deleted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn slow_down(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

/// `GET /_sample/calls`: how many view requests (metrics, feature importance, comparisons)
/// this origin has answered or is answering, so a benchmark can count origin calls.
async fn view_calls(State(state): State<OriginState>) -> Response {
    Json(json!({ "calls": state.calls.load(Ordering::Relaxed) })).into_response()
}

fn detail(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "detail": message.into() }))).into_response()
}

fn not_found(id: &str) -> Response {
    detail(StatusCode::NOT_FOUND, format!("Model run {id} not found"))
}

async fn get_metrics(State(state): State<OriginState>, Path(id): Path<String>) -> Response {
    state.slow_down().await;
    if state.is_gone(&id) {
        return not_found(&id);
    }
    Json(metrics_body(&id)).into_response()
}

#[derive(Deserialize)]
struct FeatureImportanceQuery {
    top_n: Option<String>,
}

async fn get_feature_importance(
    State(state): State<OriginState>,
    Path(id): Path<String>,
    Query(query): Query<FeatureImportanceQuery>,
) -> Response {
    // Validation comes first and without delay, as FastAPI validates before the handler runs.
    let top_n = match query.top_n.as_deref().map(str::parse::<usize>) {
        None => None,
        Some(Ok(n)) if n >= 1 => Some(n),
        Some(_) => return detail(StatusCode::BAD_REQUEST, "top_n must be a positive integer"),
    };
    state.slow_down().await;
    if state.is_gone(&id) {
        return not_found(&id);
    }
    Json(feature_importance_body(&id, top_n)).into_response()
}

#[derive(Deserialize)]
struct RunsQuery {
    limit: Option<usize>,
}

/// The most recent runs, newest first (ids 100 down to 1, minus deleted ones), for warming.
async fn list_runs(State(state): State<OriginState>, Query(query): Query<RunsQuery>) -> Response {
    let limit = query.limit.unwrap_or(20).min(100);
    let runs: Vec<Value> = (1..=100u32)
        .rev()
        .map(|n| n.to_string())
        .filter(|id| !state.is_gone(id))
        .take(limit)
        .map(|id| json!({ "model_run_id": id, "status": "completed", "model_type": scores(&id).model_type }))
        .collect();
    Json(json!({ "runs": runs, "limit": limit })).into_response()
}

/// `GET /api/v1/datasets/{id}/stats`: a dataset's statistics (deterministic per id).
async fn get_dataset_stats(State(state): State<OriginState>, Path(id): Path<String>) -> Response {
    state.slow_down().await;
    if id.starts_with("missing") {
        return detail(StatusCode::NOT_FOUND, format!("Dataset {id} not found"));
    }
    let mut rng = Rng::new(&id, 7);
    let rows = 10_000 + rng.below(990_000);
    let positive = round4(rng.range(0.05, 0.5));
    Json(json!({
        "dataset_id": id,
        "rows": rows,
        "columns": FEATURES.split_whitespace().count() + 1,
        "missing_rate": round4(rng.range(0.0, 0.08)),
        "class_balance": { "positive": positive, "negative": round4(1.0 - positive) },
        "generated_at": now_rfc3339(),
    }))
    .into_response()
}

/// The runs of a tuning job or ranking `id`: `{id}.1` to `{id}.5`, minus deleted ones, best
/// F1 first.
fn runs_of(state: &OriginState, id: &str) -> Vec<Value> {
    let mut runs: Vec<(String, Scores)> = (1..=5)
        .map(|i| format!("{id}.{i}"))
        .filter(|run| !state.is_gone(run))
        .map(|run| {
            let s = scores(&run);
            (run, s)
        })
        .collect();
    runs.sort_by(|a, b| b.1.f1.total_cmp(&a.1.f1));
    runs.into_iter()
        .enumerate()
        .map(|(rank, (run, s))| {
            json!({ "rank": rank + 1, "model_run_id": run, "model_type": s.model_type,
                    "f1_score": s.f1, "roc_auc": s.roc_auc })
        })
        .collect()
}

/// `GET /api/v1/tuning/{id}/results`: a tuning job's trials, each a run (`{id}.1` …).
async fn get_tuning_results(State(state): State<OriginState>, Path(id): Path<String>) -> Response {
    state.slow_down().await;
    if id.starts_with("missing") {
        return detail(StatusCode::NOT_FOUND, format!("Tuning job {id} not found"));
    }
    let trials = runs_of(&state, &id);
    let best = trials.first().and_then(|t| t.get("model_run_id")).cloned();
    Json(json!({
        "tuning_id": id,
        "trials": trials,
        "best_model_run_id": best,
        "objective": "f1_score",
        "generated_at": now_rfc3339(),
    }))
    .into_response()
}

/// `GET /api/v1/models/rankings/{id}`: the runs of ranking `id`, best first. A run deleted
/// through `DELETE` leaves the ranking.
async fn get_ranking(State(state): State<OriginState>, Path(id): Path<String>) -> Response {
    state.slow_down().await;
    if id.starts_with("missing") {
        return detail(StatusCode::NOT_FOUND, format!("Ranking {id} not found"));
    }
    Json(json!({
        "ranking_id": id,
        "metric": "f1_score",
        "runs": runs_of(&state, &id),
        "generated_at": now_rfc3339(),
    }))
    .into_response()
}

async fn delete_model_run(State(state): State<OriginState>, Path(id): Path<String>) -> Response {
    if id.starts_with("missing") || !state.deleted_ids().insert(id.clone()) {
        return not_found(&id);
    }
    tracing::info!(model_run_id = %id, "sample origin deleted model run");
    Json(json!({ "deleted": true, "model_run_id": id })).into_response()
}

async fn create_comparison(
    State(state): State<OriginState>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let unprocessable = |msg: &str| detail(StatusCode::UNPROCESSABLE_ENTITY, msg);
    let Ok(Json(body)) = body else {
        return unprocessable("request body must be a JSON object with model_run_ids");
    };
    let Some(list) = body.get("model_run_ids").and_then(Value::as_array) else {
        return unprocessable("field required: model_run_ids (a list of ids)");
    };
    let mut ids = Vec::with_capacity(list.len());
    for value in list {
        match value {
            Value::String(s) if !s.is_empty() => ids.push(s.clone()),
            Value::Number(n) if n.is_u64() => ids.push(n.to_string()),
            _ => return unprocessable("model_run_ids must be strings or non-negative integers"),
        }
    }
    if ids.len() < 2 {
        return unprocessable("at least 2 model_run_ids are required for a comparison");
    }
    state.slow_down().await;
    if let Some(gone) = ids.iter().find(|id| state.is_gone(id)) {
        return not_found(gone);
    }
    let scored: Vec<(&String, Scores)> = ids.iter().map(|id| (id, scores(id))).collect();
    let best = scored
        .iter()
        .reduce(|best, cur| if cur.1.f1 > best.1.f1 { cur } else { best })
        .map(|(id, _)| id);
    let comparison: Vec<Value> = scored
        .iter()
        .map(|(id, s)| {
            json!({ "model_run_id": id, "model_type": s.model_type, "accuracy": s.accuracy,
                    "f1_score": s.f1, "roc_auc": s.roc_auc })
        })
        .collect();
    Json(json!({
        "model_run_ids": ids,
        "comparison": comparison,
        "best_model_run_id": best,
        "ranking_metric": "f1_score",
        "generated_at": now_rfc3339(),
    }))
    .into_response()
}

const MODEL_TYPES: [&str; 6] = [
    "xgboost",
    "lightgbm",
    "random_forest",
    "logistic_regression",
    "catboost",
    "neural_network",
];

/// The ~40 input columns of the sample model, separated by whitespace.
const FEATURES: &str = "age income credit_score account_tenure_months num_transactions_30d \
    avg_transaction_amount days_since_last_login num_support_tickets monthly_spend \
    debt_to_income_ratio num_products is_premium_member region_code device_type \
    session_duration_avg page_views_30d email_open_rate click_through_rate \
    days_since_last_purchase total_purchases refund_rate payment_failures_90d \
    employment_length_years home_ownership loan_amount interest_rate num_open_accounts \
    credit_utilization delinquencies_2y inquiries_6m marketing_channel referral_source \
    app_version weekend_activity_ratio night_activity_ratio avg_basket_size \
    discount_usage_rate loyalty_points previous_churn_score customer_segment";

/// Headline scores of a run; shared by the metrics and comparison views so they agree.
struct Scores {
    model_type: &'static str,
    accuracy: f64,
    precision: f64,
    recall: f64,
    f1: f64,
    roc_auc: f64,
    log_loss: f64,
}

fn scores(id: &str) -> Scores {
    let mut rng = Rng::new(id, 1);
    let model_type = MODEL_TYPES[rng.below(MODEL_TYPES.len() as u64) as usize];
    let accuracy = rng.range(0.72, 0.97);
    let precision = (accuracy + rng.range(-0.05, 0.03)).clamp(0.5, 0.995);
    let recall = (accuracy + rng.range(-0.08, 0.03)).clamp(0.5, 0.995);
    Scores {
        model_type,
        accuracy: round4(accuracy),
        precision: round4(precision),
        recall: round4(recall),
        f1: round4(2.0 * precision * recall / (precision + recall)),
        roc_auc: round4((accuracy + rng.range(0.01, 0.05)).min(0.999)),
        log_loss: round4((1.0 - accuracy) * rng.range(1.2, 2.2) + 0.05),
    }
}

fn metrics_body(id: &str) -> Value {
    let s = scores(id);
    let mut rng = Rng::new(id, 2);
    let epochs = 12 + rng.below(19);
    let samples = 5_000 + rng.below(195_000);
    let duration = epochs as f64 * samples as f64 * rng.range(0.00002, 0.00008);
    let start_loss = 0.45 + s.log_loss * 3.0;
    let per_epoch: Vec<Value> = (1..=epochs)
        .map(|epoch| {
            let t = epoch as f64 / epochs as f64;
            let val = s.log_loss + (start_loss - s.log_loss) * ((-4.0 * t).exp() - (-4.0f64).exp());
            let val = val + rng.range(-0.004, 0.004);
            let train = (val - 0.01 - 0.05 * t).max(0.01);
            json!({ "epoch": epoch, "train_loss": round4(train), "val_loss": round4(val) })
        })
        .collect();
    let learning_rate = [0.01, 0.03, 0.05, 0.1, 0.2][rng.below(5) as usize];
    json!({
        "model_run_id": id,
        "status": "completed",
        "model_type": s.model_type,
        "metrics": {
            "accuracy": s.accuracy, "precision": s.precision, "recall": s.recall,
            "f1_score": s.f1, "roc_auc": s.roc_auc, "log_loss": s.log_loss,
        },
        "hyperparameters": {
            "learning_rate": learning_rate,
            "max_depth": 3 + rng.below(8),
            "n_estimators": 100 + 50 * rng.below(19),
            "random_state": 42,
        },
        "training": {
            "epochs": epochs,
            "duration_seconds": (duration * 100.0).round() / 100.0,
            "samples": samples,
            "validation_samples": samples / 5,
        },
        "per_epoch": per_epoch,
        "generated_at": now_rfc3339(),
    })
}

fn feature_importance_body(id: &str, top_n: Option<usize>) -> Value {
    let mut rng = Rng::new(id, 3);
    // Cubing skews the weights so a few features dominate, as SHAP values usually do.
    let mut ranked: Vec<(&str, f64)> = FEATURES
        .split_whitespace()
        .map(|name| (name, rng.unit().powi(3) + 0.001))
        .collect();
    let total: f64 = ranked.iter().map(|(_, w)| w).sum();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    let features: Vec<Value> = ranked
        .iter()
        .take(top_n.unwrap_or(usize::MAX))
        .enumerate()
        .map(|(i, (name, w))| {
            json!({ "feature": name, "importance": round4(w / total), "rank": i + 1 })
        })
        .collect();
    json!({
        "model_run_id": id,
        "method": "shap",
        "features": features,
        "total_features": ranked.len(),
        "generated_at": now_rfc3339(),
    })
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Tiny deterministic generator: FNV-1a of the id seeds a splitmix64 stream.
struct Rng(u64);

impl Rng {
    fn new(id: &str, stream: u64) -> Self {
        let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Self(hash ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1_u64 << 53) as f64
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// Formats `t` as `YYYY-MM-DDTHH:MM:SSZ` (UTC), without a date-time dependency.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let (hour, minute, second) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    const RUNS: &str = "/api/v1/models/train";
    const COMPARE: &str = "/api/v1/models/compare";

    fn app() -> Router {
        router(SampleOriginOptions {
            delay: Duration::ZERO,
        })
    }

    #[tokio::test]
    async fn view_calls_are_counted() {
        let app = app();
        call(&app, "GET", &format!("{RUNS}/7/metrics"), Value::Null).await;
        call(
            &app,
            "GET",
            &format!("{RUNS}/7/feature-importance?top_n=0"),
            Value::Null,
        )
        .await;
        call(
            &app,
            "GET",
            &format!("{RUNS}/7/feature-importance"),
            Value::Null,
        )
        .await;
        let (status, body) = call(&app, "GET", "/_sample/calls", Value::Null).await;
        assert_eq!(status, StatusCode::OK);
        // The invalid top_n is refused before the view runs, so it is not counted.
        assert_eq!(body["calls"], 2);
    }

    /// Sends `body` as JSON unless it is `null`, and parses the answer as JSON.
    async fn call(app: &Router, method: &str, uri: &str, body: Value) -> (StatusCode, Value) {
        let body = if body.is_null() {
            Body::empty()
        } else {
            Body::from(body.to_string())
        };
        let request = Request::builder().method(method).uri(uri);
        let request = request
            .header("content-type", "application/json")
            .body(body);
        let response = app
            .clone()
            .oneshot(request.expect("request"))
            .await
            .expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, serde_json::from_slice(&bytes).expect("json body"))
    }

    #[tokio::test]
    async fn metrics_are_deterministic_apart_from_generated_at() {
        let app = app();
        let uri = format!("{RUNS}/42/metrics");
        let (status, mut first) = call(&app, "GET", &uri, Value::Null).await;
        let (_, mut second) = call(&app, "GET", &uri, Value::Null).await;
        assert_eq!(status, StatusCode::OK);
        let size = first.to_string().len();
        assert!((1000..=3072).contains(&size), "body is {size} bytes");
        let stamp = first["generated_at"].take();
        assert!(
            stamp
                .as_str()
                .is_some_and(|t| t.len() == 20 && t.ends_with('Z'))
        );
        second["generated_at"].take();
        assert_eq!(first, second);
        assert_eq!(first["model_run_id"], "42");
        let (_, other) = call(&app, "GET", &format!("{RUNS}/43/metrics"), Value::Null).await;
        assert_ne!(first["metrics"], other["metrics"]);
    }

    #[tokio::test]
    async fn feature_importance_top_n_truncates_sorted_features() {
        let app = app();
        let uri = format!("{RUNS}/7/feature-importance");
        let (status, top) = call(&app, "GET", &format!("{uri}?top_n=5&x=1"), Value::Null).await;
        let (_, all) = call(&app, "GET", &uri, Value::Null).await;
        assert_eq!(status, StatusCode::OK);
        let (top, all) = (
            &top["features"],
            all["features"].as_array().expect("features"),
        );
        assert_eq!(top.as_array().map(Vec::len), Some(5));
        assert_eq!(all.len(), 40);
        assert_eq!(top[0], all[0]);
        assert_eq!(top[4]["rank"], 5);
        let weights: Vec<f64> = all
            .iter()
            .filter_map(|f| f["importance"].as_f64())
            .collect();
        assert!(weights.windows(2).all(|w| w[0] >= w[1]));
        for bad in ["0", "abc", "-3"] {
            let (status, body) =
                call(&app, "GET", &format!("{uri}?top_n={bad}"), Value::Null).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(body["detail"].is_string());
        }
    }

    #[tokio::test]
    async fn delete_then_views_answer_404() {
        let app = app();
        let (status, body) = call(&app, "DELETE", &format!("{RUNS}/42"), Value::Null).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, json!({ "deleted": true, "model_run_id": "42" }));
        let (status, body) = call(&app, "GET", &format!("{RUNS}/42/metrics"), Value::Null).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, json!({ "detail": "Model run 42 not found" }));
        let (status, _) = call(&app, "DELETE", &format!("{RUNS}/42"), Value::Null).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = call(&app, "POST", COMPARE, json!({ "model_run_ids": ["1", 42] })).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let uri = format!("{RUNS}/missing-1/feature-importance");
        let (status, _) = call(&app, "GET", &uri, Value::Null).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn compare_ranks_by_f1_and_needs_two_ids() {
        let app = app();
        let ids = json!({ "model_run_ids": ["1", 2, "3"] });
        let (status, body) = call(&app, "POST", COMPARE, ids).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["model_run_ids"], json!(["1", "2", "3"]));
        let rows = body["comparison"].as_array().expect("comparison");
        let f1 = |row: &Value| row["f1_score"].as_f64().expect("f1_score");
        let best = rows
            .iter()
            .find(|r| r["model_run_id"] == body["best_model_run_id"]);
        assert_eq!(
            best.map(f1),
            Some(rows.iter().map(f1).fold(f64::MIN, f64::max))
        );
        let (status, body) = call(&app, "POST", COMPARE, json!({ "model_run_ids": ["1"] })).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(body["detail"].is_string());
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        let at = |secs| rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_767_225_599), "2025-12-31T23:59:59Z");
    }
}

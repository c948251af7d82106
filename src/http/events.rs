//! Invalidation hooks fired by the training system. Each drops a run's metrics, every
//! feature-importance variant and precisely the comparisons that include it, before answering.

use axum::extract::State;
use axum::response::Response;
use http::HeaderMap;
use http::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::admin::InvalidatedResponse;
use super::auth::{Caller, EventAuth, audit, check_event};
use super::views::{RunId, run_id_from_json};
use super::{RawBody, json, parse_json};
use crate::error::{ErrorBody, Result};
use crate::invalidation::Cause;
use crate::state::AppState;

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(training_completed))
        .routes(routes!(training_failed))
        .routes(routes!(model_deleted))
}

/// An event about one run. Other fields a training system sends along are ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct EventBody {
    /// The run (a string, or a non-negative integer).
    #[schema(value_type = RunId, example = json!("42"))]
    pub model_run_id: Value,
}

async fn handle(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    raw: &[u8],
    event: &'static str,
) -> Result<Response> {
    // The signature covers the raw bytes, so authentication comes before parsing.
    let via = check_event(headers, raw, state)?;
    let body: EventBody = parse_json(raw)?;
    let id = run_id_from_json(&body.model_run_id)?;
    let invalidate = || state.invalidator.run(&id, Cause::Event);
    let (who, invalidated) = match &via {
        EventAuth::Token => (state.admin_token_id.as_str(), invalidate().await?),
        // A signature counts as used once its invalidation is applied: a delivery that failed
        // may be retried, and a repeated one is answered alike and applies nothing again.
        EventAuth::Signature(sig) => {
            let delivery = state.deliveries.apply_once(sig, invalidate).await?;
            if delivery.repeated {
                tracing::info!(run_id = %id, event, "signed event delivered again; already applied");
                return Ok(json(
                    StatusCode::OK,
                    &InvalidatedResponse {
                        invalidated: delivery.invalidated,
                    },
                ));
            }
            ("signature", delivery.invalidated)
        }
    };
    audit(state, who, caller, event, &id, invalidated);
    Ok(json(StatusCode::OK, &InvalidatedResponse { invalidated }))
}

/// A run finished training.
#[utoipa::path(post, path = "/events/training-completed", tag = "events", security(("bearer" = []), ("signature" = [])), request_body = EventBody,
    responses(
        (status = 200, description = "Invalidated (while Redis is down: in the memory tier, journaled, and sent to the other instances); a signed delivery already applied gets the same answer again", body = InvalidatedResponse),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token, or a bad or stale signature", body = ErrorBody),
        (status = 413, description = "Body larger than `server.max_body_bytes`", body = ErrorBody),
        (status = 503, description = "The store failed", body = ErrorBody)))]
pub async fn training_completed(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    RawBody(raw): RawBody,
) -> Result<Response> {
    handle(&state, &caller, &headers, &raw, "training-completed").await
}

/// A run's training failed.
#[utoipa::path(post, path = "/events/training-failed", tag = "events", security(("bearer" = []), ("signature" = [])), request_body = EventBody,
    responses(
        (status = 200, description = "Invalidated (while Redis is down: in the memory tier, journaled, and sent to the other instances); a signed delivery already applied gets the same answer again", body = InvalidatedResponse),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token, or a bad or stale signature", body = ErrorBody),
        (status = 413, description = "Body larger than `server.max_body_bytes`", body = ErrorBody),
        (status = 503, description = "The store failed", body = ErrorBody)))]
pub async fn training_failed(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    RawBody(raw): RawBody,
) -> Result<Response> {
    handle(&state, &caller, &headers, &raw, "training-failed").await
}

/// A run was deleted.
#[utoipa::path(post, path = "/events/model-deleted", tag = "events", security(("bearer" = []), ("signature" = [])), request_body = EventBody,
    responses(
        (status = 200, description = "Invalidated (while Redis is down: in the memory tier, journaled, and sent to the other instances); a signed delivery already applied gets the same answer again", body = InvalidatedResponse),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token, or a bad or stale signature", body = ErrorBody),
        (status = 413, description = "Body larger than `server.max_body_bytes`", body = ErrorBody),
        (status = 503, description = "The store failed", body = ErrorBody)))]
pub async fn model_deleted(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    RawBody(raw): RawBody,
) -> Result<Response> {
    handle(&state, &caller, &headers, &raw, "model-deleted").await
}

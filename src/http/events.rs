//! Invalidation hooks fired by the training system and other writers (`events.kinds`): each
//! event invalidates its kind's tags (`training-completed`: `run:{model_run_id}`, a run's
//! metrics, every feature-importance variant, precisely the comparisons that include it and
//! the rankings that list it), before answering.

use axum::extract::{Path, State};
use axum::response::Response;
use http::HeaderMap;
use http::StatusCode;
use serde_json::Value;

use super::admin::InvalidatedResponse;
use super::auth::{Caller, EventAuth, audit, check_event};
use super::{RawBody, json, parse_json};
use crate::domain::EventKinds;
use crate::error::{AppError, Result};
use crate::invalidation::Cause;
use crate::state::AppState;

/// Routes of this resource: `POST /events/{kind}` for every kind of `events.kinds`. It is
/// written as a plain route, and documented per kind by `document`.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new().route("/events/{kind}", axum::routing::post(post_event))
}

/// Answers an event: authenticated first (the signature covers the raw bytes), then its kind
/// (`404` when it is not one of `events.kinds`) and fields (`400`), then the invalidation of
/// the kind's tags, applied before the answer.
async fn post_event(
    State(state): State<AppState>,
    Path(kind): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    RawBody(raw): RawBody,
) -> Result<Response> {
    let via = check_event(&headers, &raw, &state)?;
    if !state.kinds.contains(&kind) {
        return Err(AppError::NotFound(format!(
            "no event kind {:?}: the kinds are {}",
            kind.chars().take(64).collect::<String>(),
            state.kinds.names().collect::<Vec<_>>().join(", ")
        )));
    }
    let body: Value = parse_json(&raw)?;
    let event = state
        .kinds
        .read(&kind, &body)
        .ok_or_else(|| AppError::NotFound(format!("no event kind {kind:?}")))?
        .map_err(AppError::InvalidArgument)?;
    let tags = &event.tags;
    let invalidate = || state.invalidator.tags(tags, Cause::Event);
    let target = event.target();
    let (who, invalidated) = match &via {
        EventAuth::Token => (state.admin_token_id.as_str(), invalidate().await?),
        // A signature counts as used once its invalidation is applied: a delivery that failed
        // may be retried, and a repeated one is answered alike and applies nothing again.
        EventAuth::Signature(sig) => {
            let delivery = state.deliveries.apply_once(sig, invalidate).await?;
            if delivery.repeated {
                tracing::info!(tags = %target, event = %kind, "signed event delivered again; already applied");
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
    audit(&state, who, &caller, &kind, &target, invalidated);
    Ok(json(StatusCode::OK, &InvalidatedResponse { invalidated }))
}

/// Documents `POST /events/<kind>` for every configured kind, its body the fields the kind's
/// tags name (each an id).
pub(super) fn document(kinds: &EventKinds, api: &mut utoipa::openapi::OpenApi) {
    use serde_json::json;
    for kind in kinds.names() {
        let fields = kinds.fields(kind);
        let properties: serde_json::Map<String, Value> = fields
            .iter()
            .map(|f| (f.clone(), json!({"$ref": "#/components/schemas/RunId"})))
            .collect();
        let example: serde_json::Map<String, Value> =
            fields.iter().map(|f| (f.clone(), json!("42"))).collect();
        let error = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}});
        let op = json!({
            "tags": ["events"],
            "summary": format!("Event `{kind}`: invalidates {}", kinds.tag_templates(kind).join(", ")),
            "operationId": format!("event_{}", kind.replace('-', "_")),
            "security": [{"bearer": []}, {"signature": []}],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {
                "type": "object", "properties": properties, "required": fields, "example": example,
            }}}},
            "responses": {
                "200": {"description": "Invalidated (while Redis is down: in the memory tier, journaled, and sent to the other instances); a signed delivery already applied gets the same answer again",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InvalidatedResponse"}}}},
                "400": error("Invalid body: a field missing or not an id"),
                "401": error("Missing or wrong bearer token, or a bad or stale signature"),
                "413": error("Body larger than `server.max_body_bytes`"),
                "503": error("The store failed"),
            },
        });
        match serde_json::from_value::<utoipa::openapi::path::Operation>(op) {
            Ok(op) => api.paths.add_path_operation(
                format!("/events/{kind}"),
                vec![utoipa::openapi::path::HttpMethod::Post],
                op,
            ),
            Err(e) => {
                tracing::error!(kind, error = %e, "event kind left out of the OpenAPI document")
            }
        }
    }
}

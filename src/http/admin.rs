//! Admin routes (bearer token): statistics, pattern clears, invalidation, warming and the
//! shared key version. `/api/v1/models/cache/{stats,clear}` are aliases for backend clients.

use axum::extract::State;
use axum::response::Response;
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{AdminAuth, Caller, EventAuth, audit, check_peer};
use super::views::{RunId, run_id_from_json};
use super::{AppJson, AppQuery, RawBody, json, parse_json};
use crate::domain::{
    is_short_word, validate_logical_key, validate_pattern, validate_tag, validate_version,
};
use crate::error::{AppError, ErrorBody, Result};
use crate::invalidation::{Cause, VersionSwitch};
use crate::serve::WarmReport;
use crate::state::AppState;
use crate::store::tiered::peers::PeerMessage;

/// Most runs one `/cache/warm` call may name.
const MAX_WARM_IDS: usize = 100;
/// Most keys one `/cache/invalidate` call may name.
const MAX_INVALIDATE_KEYS: usize = 1000;

/// Most tags one `/cache/invalidate` names: a list one past it still fits in the body limit
/// (64 KiB), so it is refused as too long rather than as too large.
const MAX_INVALIDATE_TAGS: usize = 100;

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(clear_cache))
        .routes(routes!(clear_cache_alias))
        .routes(routes!(create_invalidation))
        .routes(routes!(create_warmup))
        .routes(routes!(switch_version))
        .routes(routes!(apply_peer_invalidation))
}

/// Query of a clear.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ClearQuery {
    /// Glob over logical keys (`*`, `?`), e.g. `model:metrics:*`: 1-512 characters of
    /// A-Z, a-z, 0-9, `_`, `.`, `-`, `:`, `*`, `?`. Absent: every entry.
    #[param(pattern = "^[A-Za-z0-9_.:%*?-]{1,512}$")]
    pub pattern: Option<String>,
    /// `true`: count what would be deleted, and delete nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Result of a clear.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClearResponse {
    /// Summary.
    pub message: String,
    /// Entries deleted.
    pub deleted_count: u64,
    /// The pattern applied.
    pub pattern: String,
}

/// Deletes the entries of the current version whose logical key matches `pattern`
/// (SCAN in batches; only this service's prefix and version are touched). With
/// `dry_run=true`, answers the same body with the number of entries that would be deleted,
/// and deletes nothing.
#[utoipa::path(delete, path = "/cache/clear", tag = "admin", security(("bearer" = [])), params(ClearQuery),
    responses((status = 200, description = "Cleared", body = ClearResponse),
        (status = 400, description = "Invalid pattern or query", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 503, description = "The store failed", body = ErrorBody)))]
pub async fn clear_cache(
    _: AdminAuth,
    caller: Caller,
    State(state): State<AppState>,
    AppQuery(q): AppQuery<ClearQuery>,
) -> Result<Response> {
    let pattern = q.pattern.unwrap_or_else(|| "*".to_owned());
    validate_pattern(&pattern).map_err(AppError::InvalidArgument)?;
    if pattern.bytes().all(|b| b == b'*') {
        tracing::warn!(addr = %caller.addr, "clear of every entry requested");
    }
    if q.dry_run {
        let deleted_count = state.invalidator.count(&pattern).await?;
        return Ok(json(
            StatusCode::OK,
            &ClearResponse {
                message: format!(
                    "Dry run: would clear {deleted_count} cache entries matching pattern: {pattern}"
                ),
                deleted_count,
                pattern,
            },
        ));
    }
    let deleted_count = state.invalidator.pattern(&pattern, Cause::Clear).await?;
    audit(
        &state,
        &state.admin_token_id,
        &caller,
        "clear",
        &pattern,
        deleted_count,
    );
    Ok(json(
        StatusCode::OK,
        &ClearResponse {
            message: format!("Cleared {deleted_count} cache entries matching pattern: {pattern}"),
            deleted_count,
            pattern,
        },
    ))
}

/// Alias of `DELETE /cache/clear`.
#[utoipa::path(delete, path = "/api/v1/models/cache/clear", tag = "admin", security(("bearer" = [])), params(ClearQuery),
    responses((status = 200, description = "Cleared", body = ClearResponse),
        (status = 400, description = "Invalid pattern or query", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 503, description = "The store failed", body = ErrorBody)))]
pub async fn clear_cache_alias(
    auth: AdminAuth,
    caller: Caller,
    state: State<AppState>,
    query: AppQuery<ClearQuery>,
) -> Result<Response> {
    clear_cache(auth, caller, state, query).await
}

/// What to invalidate: exactly one of the four fields.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1, max_properties = 1)]
pub struct InvalidateBody {
    /// A run: its metrics, feature importance and comparisons.
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = Option<RunId>, nullable = false, example = json!("42"))]
    pub model_run_id: Option<Value>,
    /// A whole view, by its name in the view table (`metrics`, `model_ranking`, …).
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = Option<String>, nullable = false, pattern = "^[a-z][a-z0-9_]{0,39}$")]
    pub namespace: Option<String>,
    /// 1-100 tags, as entries carry them (`run:42`, `dataset:7`): every entry that carries
    /// one, by its request or by its answer.
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = Option<Vec<TagName>>, nullable = false, min_items = 1, max_items = 100, example = json!(["run:42", "dataset:7"]))]
    pub tags: Option<Vec<String>>,
    /// 1-1000 logical keys, e.g. `model:metrics:42`.
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = Option<Vec<LogicalKey>>, nullable = false, min_items = 1, max_items = 1000)]
    pub keys: Option<Vec<String>>,
}

/// A field that may be absent but, as the schema says, is never `null`.
fn not_null<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let value = Value::deserialize(d)?;
    if value.is_null() {
        return Err(serde::de::Error::custom("must not be null"));
    }
    T::deserialize(value)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// The OpenAPI schema of a logical key named by `/cache/invalidate` (what
/// [`validate_logical_key`] accepts). Documentation only: bodies hold keys as strings.
pub struct LogicalKey;

impl utoipa::PartialSchema for LogicalKey {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[A-Za-z0-9_.:%-]{1,512}$"))
            .description(Some(
                "A logical key, e.g. `model:metrics:42`: 1-512 characters of A-Z, a-z, 0-9, \
                 `_`, `.`, `-`, `:`, `%`.",
            ))
            .into()
    }
}

impl ToSchema for LogicalKey {}

/// The OpenAPI schema of a tag named by `/cache/invalidate` (what [`validate_tag`] accepts).
/// Documentation only: bodies hold tags as strings.
pub struct TagName;

impl utoipa::PartialSchema for TagName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[a-z][a-z0-9_-]{0,63}:[A-Za-z0-9_.:%-]+$"))
            .max_length(Some(512))
            .description(Some(
                "A tag as entries carry it, `kind:value`, e.g. `run:42`, `dataset:7`.",
            ))
            .into()
    }
}

impl ToSchema for TagName {}

/// Result of an invalidation.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvalidatedResponse {
    /// Entries dropped.
    pub invalidated: u64,
}

/// Invalidates a run, a namespace or a list of keys.
#[utoipa::path(post, path = "/cache/invalidate", tag = "admin", security(("bearer" = [])), request_body = InvalidateBody,
    responses((status = 200, description = "Invalidated", body = InvalidatedResponse),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 413, description = "Body larger than `server.max_body_bytes`", body = ErrorBody),
        (status = 503, description = "The store failed", body = ErrorBody)))]
pub async fn create_invalidation(
    _: AdminAuth,
    caller: Caller,
    State(state): State<AppState>,
    AppJson(body): AppJson<InvalidateBody>,
) -> Result<Response> {
    let given = [
        body.model_run_id.is_some(),
        body.namespace.is_some(),
        body.keys.is_some(),
        body.tags.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(AppError::InvalidArgument(
            "give exactly one of model_run_id, namespace, keys, tags".into(),
        ));
    }
    let (target, invalidated) = match (&body.model_run_id, &body.namespace, &body.keys) {
        (None, None, None) => {
            let tags = body.tags.as_deref().unwrap_or_default();
            if tags.is_empty() || tags.len() > MAX_INVALIDATE_TAGS {
                return Err(AppError::InvalidArgument(format!(
                    "tags must hold between 1 and {MAX_INVALIDATE_TAGS} tags"
                )));
            }
            for t in tags {
                validate_tag(t).map_err(AppError::InvalidArgument)?;
            }
            let n = state.invalidator.tags(tags, Cause::Admin).await?;
            (format!("tags:{}", tags.join(",")), n)
        }
        (Some(id), None, None) => {
            let id = run_id_from_json(id)?;
            let n = state.invalidator.run(&id, Cause::Admin).await?;
            (format!("run:{id}"), n)
        }
        (None, Some(ns), None) => {
            let table = state.views.table();
            let view = table.by_name(ns).map(|d| d.view).ok_or_else(|| {
                AppError::InvalidArgument(format!(
                    "namespace must be the name of a view: {}",
                    table
                        .views()
                        .iter()
                        .map(|d| d.view.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            let n = state.invalidator.namespaces(&[view], Cause::Admin).await?;
            (format!("namespace:{}", view.name()), n)
        }
        (None, None, Some(keys)) => {
            if keys.is_empty() || keys.len() > MAX_INVALIDATE_KEYS {
                return Err(AppError::InvalidArgument(format!(
                    "keys must hold between 1 and {MAX_INVALIDATE_KEYS} keys"
                )));
            }
            for k in keys {
                validate_logical_key(k).map_err(AppError::InvalidArgument)?;
            }
            let n = state.invalidator.keys(keys, Cause::Admin).await?;
            (format!("keys:{}", keys.len()), n)
        }
        _ => {
            return Err(AppError::InvalidArgument(
                "give exactly one of model_run_id, namespace, keys, tags".into(),
            ));
        }
    };
    audit(
        &state,
        &state.admin_token_id,
        &caller,
        "invalidate",
        &target,
        invalidated,
    );
    Ok(json(StatusCode::OK, &InvalidatedResponse { invalidated }))
}

/// Runs to warm.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmBody {
    /// 1-100 run ids (strings or non-negative integers).
    #[schema(value_type = Vec<RunId>, min_items = 1, max_items = 100, example = json!(["41", "42"]))]
    pub model_run_ids: Vec<Value>,
}

/// Fetches and stores the metrics and feature importance of runs not cached yet.
#[utoipa::path(post, path = "/cache/warm", tag = "admin", security(("bearer" = [])), request_body = WarmBody,
    responses((status = 200, description = "What was warmed; origin failures are listed, not raised", body = WarmReport),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 413, description = "Body larger than `server.max_body_bytes`", body = ErrorBody)))]
pub async fn create_warmup(
    _: AdminAuth,
    caller: Caller,
    State(state): State<AppState>,
    AppJson(body): AppJson<WarmBody>,
) -> Result<Response> {
    if body.model_run_ids.is_empty() || body.model_run_ids.len() > MAX_WARM_IDS {
        return Err(AppError::InvalidArgument(format!(
            "model_run_ids must hold between 1 and {MAX_WARM_IDS} ids"
        )));
    }
    let mut ids: Vec<String> = body
        .model_run_ids
        .iter()
        .map(run_id_from_json)
        .collect::<Result<_>>()?;
    ids.sort();
    ids.dedup();
    let report = state
        .views
        .warm(&ids, state.settings.warm.concurrency)
        .await;
    let target = format!("runs:{}", ids.len());
    audit(
        &state,
        &state.admin_token_id,
        &caller,
        "warm",
        &target,
        report.warmed,
    );
    Ok(json(StatusCode::OK, &report))
}

/// The version to switch to.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VersionBody {
    /// `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`, e.g. `v2`.
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", example = "v2")]
    pub version: String,
}

/// Switches the key version for every instance on the same Redis; every older entry becomes
/// unreachable, and entries stored under the new version earlier are cleared first.
#[utoipa::path(post, path = "/cache/version", tag = "admin", security(("bearer" = [])), request_body = VersionBody,
    responses((status = 200, description = "Switched", body = VersionSwitch),
        (status = 400, description = "Invalid version or body", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 413, description = "Body larger than `server.max_body_bytes`", body = ErrorBody),
        (status = 503, description = "Redis, where the version lives, is unreachable", body = ErrorBody)))]
pub async fn switch_version(
    _: AdminAuth,
    caller: Caller,
    State(state): State<AppState>,
    AppJson(body): AppJson<VersionBody>,
) -> Result<Response> {
    validate_version(&body.version).map_err(AppError::InvalidArgument)?;
    let switched = state.invalidator.switch_version(&body.version).await?;
    let target = format!("{}->{}", switched.previous, switched.version);
    audit(
        &state,
        &state.admin_token_id,
        &caller,
        "version",
        &target,
        switched.cleared,
    );
    Ok(json(StatusCode::OK, &switched))
}

/// Applies an invalidation another instance made while it could not reach Redis, or that
/// this instance did not confirm on the near-cache bus (SPEC section 2, "Several instances
/// while Redis is unreachable"). Instances sign what they send under `peers.secret` (as signed
/// events are signed, over the timestamp and the raw body, which names the sender); the admin
/// bearer token is accepted too. An invalidation may only name this service's keyspace, and
/// a signed delivery is applied at most once.
#[utoipa::path(post, path = "/cache/peer-invalidation", tag = "admin", security(("peer_signature" = []), ("bearer" = [])), request_body = PeerMessage,
    responses((status = 200, description = "Applied (to Redis if this instance reaches it, else to its memory tier); a signed delivery already applied gets the same answer again", body = InvalidatedResponse),
        (status = 400, description = "Invalid body, or keys outside this service's keyspace", body = ErrorBody),
        (status = 401, description = "Missing or bad signature (or bearer token), or a timestamp outside the tolerance", body = ErrorBody),
        (status = 413, description = "Body larger than `server.max_body_bytes`", body = ErrorBody),
        (status = 503, description = "The store failed", body = ErrorBody)))]
pub async fn apply_peer_invalidation(
    caller: Caller,
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(raw): RawBody,
) -> Result<Response> {
    // The signature covers the raw bytes, so authentication comes before parsing.
    let via = check_peer(&headers, &raw, &state)?;
    let message: PeerMessage = parse_json(&raw)?;
    if !is_short_word(&message.from) {
        return Err(AppError::InvalidArgument(
            "from must be 1-64 letters and digits".into(),
        ));
    }
    // A signed delivery is applied once: without its own id, two invalidations alike sent in
    // one second would be taken for one.
    let signed = matches!(via, EventAuth::Signature(_));
    match message.delivery.as_deref() {
        Some(d) if !is_short_word(d) => {
            return Err(AppError::InvalidArgument(
                "delivery must be 1-64 letters and digits".into(),
            ));
        }
        None if signed => {
            return Err(AppError::InvalidArgument(
                "a signed peer invalidation needs a delivery id".into(),
            ));
        }
        _ => {}
    }
    if !message.invalidation.is_within(state.keys.prefix()) {
        return Err(AppError::InvalidArgument(
            "the invalidation names keys outside this service's keyspace".into(),
        ));
    }
    let apply = || async {
        let invalidated = state.store.apply_from_peer(&message.invalidation).await?;
        state.invalidator.record_peer(invalidated);
        Ok::<u64, AppError>(invalidated)
    };
    let (who, invalidated) = match &via {
        EventAuth::Token => (state.admin_token_id.as_str(), apply().await?),
        EventAuth::Signature(sig) => {
            let delivery = state.deliveries.apply_once(sig, apply).await?;
            if delivery.repeated {
                return Ok(json(
                    StatusCode::OK,
                    &InvalidatedResponse {
                        invalidated: delivery.invalidated,
                    },
                ));
            }
            ("peer", delivery.invalidated)
        }
    };
    let target = format!("peer:{}", message.from);
    audit(
        &state,
        who,
        &caller,
        "peer-invalidation",
        &target,
        invalidated,
    );
    Ok(json(StatusCode::OK, &InvalidatedResponse { invalidated }))
}

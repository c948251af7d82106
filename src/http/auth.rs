//! Authentication of admin routes (bearer token) and events (bearer token, or an HMAC
//! signature as Stripe and GitHub webhooks use; see [`crate::security::signature`]), and the
//! audit trail of what they did.

use axum::extract::FromRequestParts;
use http::request::Parts;
use secrecy::ExposeSecret;

use crate::error::AppError;
use crate::security::signature::{SIGNATURE_HEADER, TIMESTAMP_HEADER, now_secs};
use crate::security::{bearer_token, secrets_match, single_authorization, verify_signature};
use crate::state::AppState;

/// Proof that the request carried `Authorization: Bearer <admin.token>`.
#[derive(Debug, Clone, Copy)]
pub struct AdminAuth;

/// Checks `Authorization: Bearer <admin.token>` (one `Authorization` header: two are a `400`).
pub fn check_bearer(headers: &http::HeaderMap, state: &AppState) -> Result<(), AppError> {
    let value = single_authorization(headers)
        .map_err(|e| AppError::InvalidArgument(e.to_owned()))?
        .ok_or(AppError::Unauthorized(
            "missing Authorization: Bearer <token>",
        ))?;
    let token = value
        .to_str()
        .ok()
        .and_then(bearer_token)
        .ok_or(AppError::Unauthorized(
            "expected Authorization: Bearer <token>",
        ))?;
    if secrets_match(
        token.as_bytes(),
        state.admin_token.expose_secret().as_bytes(),
    ) {
        Ok(())
    } else {
        Err(AppError::Unauthorized("invalid token"))
    }
}

/// How an event was authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventAuth {
    /// The admin bearer token.
    Token,
    /// A valid, fresh signature over the raw body (its single use is enforced when the
    /// invalidation is applied: see [`crate::security::Deliveries`]).
    Signature(String),
}

/// Authorises an event: a valid, fresh signature over the raw body (when `events.secret` is
/// set and the request is signed), or else the admin bearer token.
pub fn check_event(
    headers: &http::HeaderMap,
    body: &[u8],
    state: &AppState,
) -> Result<EventAuth, AppError> {
    let secret = state
        .settings
        .events
        .secret
        .as_ref()
        .map(|s| s.expose_secret().as_bytes());
    signed_or_bearer(headers, body, secret, state)
}

/// Authorises a direct invalidation from another instance: a valid, fresh signature under
/// the peers' key (`peers.secret`), which is what instances send, or else the admin bearer
/// token (an operator's own call).
pub fn check_peer(
    headers: &http::HeaderMap,
    body: &[u8],
    state: &AppState,
) -> Result<EventAuth, AppError> {
    signed_or_bearer(
        headers,
        body,
        Some(state.peer_secret.expose_secret()),
        state,
    )
}

/// A signature under `secret` when the request is signed and a secret is set, else the admin
/// bearer token.
fn signed_or_bearer(
    headers: &http::HeaderMap,
    body: &[u8],
    secret: Option<&[u8]>,
    state: &AppState,
) -> Result<EventAuth, AppError> {
    // A signed request does not read `Authorization`, but one that carries two is as ambiguous.
    single_authorization(headers).map_err(|e| AppError::InvalidArgument(e.to_owned()))?;
    let signed = headers.contains_key(SIGNATURE_HEADER) || headers.contains_key(TIMESTAMP_HEADER);
    let Some(secret) = secret.filter(|_| signed) else {
        return check_bearer(headers, state).map(|()| EventAuth::Token);
    };
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(ts), Some(sig)) = (get(TIMESTAMP_HEADER), get(SIGNATURE_HEADER)) else {
        return Err(AppError::Unauthorized(
            "signed requests need both X-Runcache-Timestamp and X-Runcache-Signature",
        ));
    };
    verify_signature(
        secret,
        ts,
        sig,
        body,
        now_secs(),
        state.settings.events.tolerance_secs,
    )
    .map_err(AppError::Unauthorized)?;
    Ok(EventAuth::Signature(sig.to_owned()))
}

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        check_bearer(&parts.headers, state).map(|()| AdminAuth)
    }
}

/// Who made an admin or event request, for audit lines: the client address.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Client address, or `-` when unknown.
    pub addr: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Caller {
            addr: super::limits::peer(&parts.extensions)
                .map_or_else(|| "-".to_owned(), |a| a.to_string()),
        })
    }
}

/// Writes one audit line (target `audit`) and keeps it for `/cache/stats`: who (the token's
/// id, never the token, or `signature`), from where, what, on what, and how many entries it
/// dropped.
pub fn audit(
    state: &AppState,
    who: &str,
    caller: &Caller,
    action: &str,
    target: &str,
    entries: u64,
) {
    state
        .audit
        .record(who, &caller.addr, action, target, entries);
}

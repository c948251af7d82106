//! The one HTTP-facing error type, its stable codes and its JSON body
//! `{"error": {"code": "...", "message": "..."}}`.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

use crate::origin::OriginError;
use crate::store::StoreError;

/// Stable error codes clients can branch on.
pub mod codes {
    /// 400: a path, query or body value is invalid.
    pub const INVALID_ARGUMENT: &str = "invalid_argument";
    /// 401: missing or wrong credentials.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// 403: credentials valid but not allowed.
    pub const FORBIDDEN: &str = "forbidden";
    /// 404: no such route or resource.
    pub const NOT_FOUND: &str = "not_found";
    /// 405: the route exists with other methods.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// 413: request body too large.
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// 431: too many or too large request headers.
    pub const HEADERS_TOO_LARGE: &str = "headers_too_large";
    /// 429: too many requests.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// 502: the origin failed or is unreachable.
    pub const ORIGIN_ERROR: &str = "origin_error";
    /// 503: a needed dependency is unavailable.
    pub const UNAVAILABLE: &str = "unavailable";
    /// 504: the origin timed out.
    pub const ORIGIN_TIMEOUT: &str = "origin_timeout";
    /// 504: the whole request took longer than `server.request_timeout_ms`.
    pub const TIMEOUT: &str = "timeout";
    /// 500: anything else.
    pub const INTERNAL: &str = "internal";
}

/// The JSON error body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code, e.g. `invalid_argument`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// 400 `invalid_argument`.
    #[error("{0}")]
    InvalidArgument(String),
    /// 401 `unauthorized`.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 404 `not_found`.
    #[error("{0}")]
    NotFound(String),
    /// 413 `payload_too_large`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 502 `origin_error` or 504 `origin_timeout`.
    #[error(transparent)]
    Origin(#[from] OriginError),
    /// 503 `unavailable`: a store operation that has no fallback failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// 500 `internal`.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl AppError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            AppError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, codes::INVALID_ARGUMENT),
            AppError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, codes::UNAUTHORIZED),
            AppError::NotFound(_) => (StatusCode::NOT_FOUND, codes::NOT_FOUND),
            AppError::PayloadTooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, codes::PAYLOAD_TOO_LARGE)
            }
            AppError::Origin(e) if e.is_timeout() => {
                (StatusCode::GATEWAY_TIMEOUT, codes::ORIGIN_TIMEOUT)
            }
            AppError::Origin(_) => (StatusCode::BAD_GATEWAY, codes::ORIGIN_ERROR),
            AppError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE),
            AppError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL),
        }
    }

    /// The message shown to clients: specific for 4xx, generic for 5xx (whose details,
    /// such as internal addresses, go to the log only).
    fn public_message(&self) -> String {
        match self {
            AppError::Origin(OriginError::Timeout) => "the origin did not answer in time".into(),
            AppError::Origin(OriginError::Status(s)) => {
                format!("the origin answered {}", s.as_u16())
            }
            AppError::Origin(OriginError::TooLarge(n)) => {
                format!("the origin response exceeds the {n}-byte limit")
            }
            AppError::Origin(OriginError::Unreachable(_)) => "the origin is unreachable".into(),
            AppError::Store(StoreError::Unavailable(_) | StoreError::Refused(_)) => {
                "redis is unreachable; this operation needs it".into()
            }
            AppError::Store(_) => "the cache store failed".into(),
            AppError::Internal(_) => "internal error".into(),
            other => other.to_string(),
        }
    }
}

/// Builds the JSON error response for `status` with `code` and `message`.
pub fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.to_owned(),
            message: message.into(),
        },
    };
    (status, Json(body)).into_response()
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = ?self, "request failed");
        }
        let mut resp = error_response(status, code, self.public_message());
        if matches!(self, AppError::Unauthorized(_)) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// `Result` with [`AppError`] as the default error.
pub type Result<T, E = AppError> = std::result::Result<T, E>;

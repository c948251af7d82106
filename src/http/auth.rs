//! Bearer-token authentication for admin routes and events, compared in constant time.

use axum::extract::FromRequestParts;
use http::header;
use http::request::Parts;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::AppError;
use crate::state::AppState;

/// Proof that the request carried `Authorization: Bearer <admin.token>`.
#[derive(Debug, Clone, Copy)]
pub struct AdminAuth;

/// Compares two secrets in constant time. Hashing first makes the comparison independent of
/// where the first difference is and of the lengths.
pub fn secrets_match(given: &[u8], expected: &[u8]) -> bool {
    Sha256::digest(given)
        .ct_eq(&Sha256::digest(expected))
        .into()
}

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or(AppError::Unauthorized(
                "missing Authorization: Bearer <token>",
            ))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(AppError::Unauthorized(
                "expected Authorization: Bearer <token>",
            ))?;
        if secrets_match(
            token.as_bytes(),
            state.admin_token.expose_secret().as_bytes(),
        ) {
            Ok(AdminAuth)
        } else {
            Err(AppError::Unauthorized("invalid token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(secrets_match(b"abc", b"abc"));
        assert!(!secrets_match(b"abc", b"abd"));
        assert!(!secrets_match(b"abc", b"abcd"));
        assert!(!secrets_match(b"", b"abc"));
    }
}

//! The region's one error type, and the one place it becomes HTTP.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::store::StoreError;

/// Why a region call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// No credential, or one the region does not know.
    #[error("missing or unknown credential")]
    Unauthenticated,
    /// The credential may not make this call.
    #[error("{0}")]
    Forbidden(String),
    /// No such thing (or not the caller's: existence is not revealed).
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or names something invalid.
    #[error("{0}")]
    Invalid(String),
    /// The request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// No host has room.
    #[error("{0}")]
    NoCapacity(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RegionError {
    /// HTTP status and EC2-style error code.
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            RegionError::Unauthenticated => (StatusCode::UNAUTHORIZED, "AuthFailure"),
            RegionError::Forbidden(_) => (StatusCode::FORBIDDEN, "UnauthorizedOperation"),
            RegionError::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
            RegionError::Invalid(_) => (StatusCode::BAD_REQUEST, "InvalidParameterValue"),
            RegionError::Conflict(_) => (StatusCode::CONFLICT, "IncorrectState"),
            RegionError::NoCapacity(_) => (StatusCode::SERVICE_UNAVAILABLE, "InsufficientCapacity"),
            RegionError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
        }
    }
}

impl IntoResponse for RegionError {
    fn into_response(self) -> Response {
        let (status, code) = self.status();
        if status.is_server_error() && !matches!(self, RegionError::NoCapacity(_)) {
            log::error!("{self}");
        }
        let mut r = (
            status,
            axum::Json(json!({"error": self.to_string(), "code": code})),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"softcard\""),
            );
        }
        r
    }
}

/// Shorthand for the region's results.
pub type Result<T, E = RegionError> = std::result::Result<T, E>;

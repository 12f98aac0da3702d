//! The one API error type: renders docs/api.md's `{"error": {"code", "message"}}` body with its status.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use crate::actors::ActError;
use crate::store::{ImportError, StoreError};
use serde::Serialize;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

/// An error answer of the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `bad_request`: malformed JSON, bad query parameters.
    #[error("{0}")]
    BadRequest(String),
    /// 400 `bad_csv`: a malformed upload; the message names the line.
    #[error("{0}")]
    BadCsv(String),
    /// 401 `unauthorized`.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// 403 `forbidden`: a state-changing request with the dashboard's session cookie that
    /// does not come from the dashboard's own origin.
    #[error("{0}")]
    Forbidden(String),
    /// 404 `not_found`.
    #[error("{0}")]
    NotFound(String),
    /// 405 `method_not_allowed`: the path exists, the method does not; holds the allowed ones.
    #[error("method not allowed; allowed: {0}")]
    MethodNotAllowed(&'static str),
    /// 409 `invalid_transition`.
    #[error("{0}")]
    InvalidTransition(String),
    /// 413 `too_large`.
    #[error("{0}")]
    TooLarge(String),
    /// 422 `invalid`: well-formed but invalid values.
    #[error("{0}")]
    Invalid(String),
    /// 503 `unavailable`: a dependency is down; the client may retry.
    #[error("{0}")]
    Unavailable(String),
    /// 500 `internal`.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// Every code an answer can carry (the OpenAPI document lists them).
    pub const CODES: [&'static str; 11] = [
        "bad_request",
        "bad_csv",
        "unauthorized",
        "forbidden",
        "not_found",
        "method_not_allowed",
        "invalid_transition",
        "too_large",
        "invalid",
        "unavailable",
        "internal",
    ];

    /// The machine-readable code of the body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::BadCsv(_) => "bad_csv",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::InvalidTransition(_) => "invalid_transition",
            ApiError::TooLarge(_) => "too_large",
            ApiError::Invalid(_) => "invalid",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::BadCsv(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::InvalidTransition(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unauthorized => {
                response.insert_header(("WWW-Authenticate", "Bearer"));
            }
            ApiError::MethodNotAllowed(allowed) => {
                response.insert_header(("Allow", *allowed));
            }
            _ => {}
        }
        response.json(ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
            },
        })
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        // Only an outage is worth a retry (503); anything else the store says is a bug or a
        // corrupt row, and answers 500 with the cause in the log.
        match e {
            StoreError::Conflict(id) => {
                ApiError::InvalidTransition(format!("batch {id} changed concurrently; retry"))
            }
            e if e.is_unavailable() => {
                tracing::error!(error = %e, "Store unavailable.");
                ApiError::Unavailable("database unavailable".into())
            }
            e => {
                tracing::error!(error = %e, "Store error.");
                ApiError::Internal("internal error".into())
            }
        }
    }
}

impl From<ActError> for ApiError {
    fn from(e: ActError) -> Self {
        match e {
            ActError::NotFound(id) => ApiError::NotFound(format!("no batch {id}")),
            ActError::Invalid(t) => ApiError::InvalidTransition(t.to_string()),
            ActError::Store(s) => s.into(),
            ActError::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}

impl From<ImportError<ApiError>> for ApiError {
    fn from(e: ImportError<ApiError>) -> Self {
        match e {
            ImportError::Input(e) => e,
            ImportError::Incomplete => ApiError::BadCsv("the upload was cut short".into()),
            ImportError::NotInitial => {
                ApiError::InvalidTransition("recipients can be added only in state initial".into())
            }
            ImportError::Store(s) => s.into(),
        }
    }
}

/// The machine-readable code of an error answer.
pub struct ErrorCode;

impl PartialSchema for ErrorCode {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "What went wrong, for programs; the message says it for people.",
            ))
            .enum_values(Some(ApiError::CODES))
            .into()
    }
}

impl ToSchema for ErrorCode {}

/// Every 4xx and 5xx answer (docs/api.md "Errors"); `ApiError` renders itself as this.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error of an [`ErrorBody`].
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// What went wrong, for programs.
    #[schema(value_type = ErrorCode)]
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed() {
        let all = [
            ApiError::BadRequest(String::new()),
            ApiError::BadCsv(String::new()),
            ApiError::Unauthorized,
            ApiError::Forbidden(String::new()),
            ApiError::NotFound(String::new()),
            ApiError::MethodNotAllowed("GET"),
            ApiError::InvalidTransition(String::new()),
            ApiError::TooLarge(String::new()),
            ApiError::Invalid(String::new()),
            ApiError::Unavailable(String::new()),
            ApiError::Internal(String::new()),
        ];
        assert_eq!(all.len(), ApiError::CODES.len());
        for e in &all {
            assert!(ApiError::CODES.contains(&e.code()), "{}", e.code());
        }
    }
}

//! Error bodies, as the contract spells them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of every non-validation error.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    /// Human-readable error message.
    pub message: String,
}

/// One violated constraint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// JSON field (or query parameter) that failed validation.
    pub field: String,
    /// What is wrong with it.
    pub error: String,
}

/// Body of a 400 caused by invalid input.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ValidationErrorResponse {
    pub message: String,
    pub errors: Vec<FieldError>,
}

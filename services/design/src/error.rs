//! The design service's errors and their one mapping into gRPC statuses.

use csp_platform::{ApiError, FieldViolation};
use tonic::Status;

/// Why a design operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request breaks field rules.
    #[error("{message}")]
    Invalid {
        /// Summary.
        message: String,
        /// The bad fields.
        violations: Vec<FieldViolation>,
    },
    /// No such design (or the caller may not know it exists).
    #[error("{0}")]
    NotFound(String),
    /// Known to the caller but not theirs to change.
    #[error("{0}")]
    Forbidden(String),
    /// The design changed since the caller read it.
    #[error("the design is at revision {current}, not {expected}; read it again and retry")]
    Stale {
        /// The revision the caller saw.
        expected: i64,
        /// The current revision.
        current: i64,
    },
    /// The design is not in the state the request needs (other than a stale revision).
    #[error("{message}")]
    Precondition {
        /// Summary.
        message: String,
        /// Stable machine-readable reason.
        reason: &'static str,
    },
    /// Others' edits stand in the way (undo, redo): nothing was changed.
    #[error("{message}")]
    Conflict {
        /// Summary, naming the elements.
        message: String,
        /// Stable machine-readable reason.
        reason: &'static str,
        /// The conflicting elements, e.g. "node `a`".
        elements: Vec<String>,
    },
    /// A service this one needs did not answer.
    #[error("{0}")]
    Unavailable(String),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    /// Anything else unexpected.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// INVALID_ARGUMENT for one field.
    pub(crate) fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::fields(vec![FieldViolation::new(field, description)])
    }

    /// INVALID_ARGUMENT listing every violation in its message too.
    pub(crate) fn fields(violations: Vec<FieldViolation>) -> Self {
        Error::Invalid { message: FieldViolation::summary(&violations), violations }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let api = match error {
            Error::Invalid { message, violations } => ApiError::InvalidArgument { message, violations },
            Error::NotFound(m) => ApiError::NotFound(m),
            Error::Forbidden(m) => ApiError::PermissionDenied(m),
            e @ Error::Stale { current, .. } => ApiError::FailedPrecondition {
                message: e.to_string(),
                reason: "STALE_REVISION",
                metadata: vec![("current_revision".into(), current.to_string())],
            },
            Error::Conflict { message, reason, elements } => ApiError::FailedPrecondition {
                message,
                reason,
                metadata: vec![("elements".into(), elements.join(", "))],
            },
            Error::Unavailable(m) => ApiError::Unavailable(m),
            Error::Precondition { message, reason } => {
                ApiError::FailedPrecondition { message, reason, metadata: Vec::new() }
            }
            e @ (Error::Db(_) | Error::Internal(_)) => ApiError::internal(e),
        };
        api.into()
    }
}

//! The executor's errors and their one mapping into gRPC statuses.

use csp_platform::{ApiError, FieldViolation};
use tonic::Status;

/// Why an executor operation failed.
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
    /// No such execution or design (or the caller may not know it exists).
    #[error("{0}")]
    NotFound(String),
    /// Known to the caller but not theirs to act on.
    #[error("{0}")]
    Forbidden(String),
    /// Not in the state the request needs.
    #[error("{message}")]
    Precondition {
        /// Summary.
        message: String,
        /// Stable machine-readable reason.
        reason: &'static str,
    },
    /// A service this one needs did not answer.
    #[error("{0}")]
    Unavailable(String),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    /// The event bus failed.
    #[error("event bus: {0}")]
    Bus(#[from] csp_bus::BusError),
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

    /// Whether it comes from the database or the bus being unavailable, not from what was
    /// asked: worth trying again as it is.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, Error::Db(_) | Error::Unavailable(_) | Error::Bus(csp_bus::BusError::Unavailable(_)))
    }

    pub(crate) fn precondition(reason: &'static str, message: impl Into<String>) -> Self {
        Error::Precondition { message: message.into(), reason }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let api = match error {
            Error::Invalid { message, violations } => ApiError::InvalidArgument { message, violations },
            Error::NotFound(m) => ApiError::NotFound(m),
            Error::Forbidden(m) => ApiError::PermissionDenied(m),
            Error::Precondition { message, reason } => {
                ApiError::FailedPrecondition { message, reason, metadata: Vec::new() }
            }
            Error::Unavailable(m) => ApiError::Unavailable(m),
            Error::Bus(csp_bus::BusError::Unavailable(m)) => ApiError::Unavailable(format!("event bus: {m}")),
            e @ (Error::Db(_) | Error::Bus(_) | Error::Internal(_)) => ApiError::internal(e),
        };
        api.into()
    }
}

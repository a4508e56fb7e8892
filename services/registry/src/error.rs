//! The registry's errors and their one mapping into gRPC statuses.

use csp_platform::{ApiError, FieldViolation};
use tonic::Status;

/// Why a registry operation failed.
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
    /// No such type or version.
    #[error("{0}")]
    NotFound(String),
    /// The type or version exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// Not allowed (built-in types).
    #[error("{0}")]
    Forbidden(String),
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
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let api = match error {
            Error::Invalid { message, violations } => ApiError::InvalidArgument { message, violations },
            Error::NotFound(m) => ApiError::NotFound(m),
            Error::AlreadyExists(m) => ApiError::AlreadyExists(m),
            Error::Forbidden(m) => ApiError::PermissionDenied(m),
            Error::Bus(e) => {
                tracing::warn!(error = %e, "event bus unavailable");
                ApiError::Unavailable("the event bus is unavailable; try again".into())
            }
            e @ (Error::Db(_) | Error::Internal(_)) => ApiError::internal(e),
        };
        api.into()
    }
}

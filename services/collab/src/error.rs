//! The collaboration service's errors and their one mapping into gRPC statuses.

use csp_platform::{ApiError, FieldViolation};
use tonic::Status;

/// Why a collaboration operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The request breaks field rules.
    #[error("{message}")]
    Invalid {
        /// Summary.
        message: String,
        /// The bad fields.
        violations: Vec<FieldViolation>,
    },
    /// No such design or session (or the caller may not know it exists).
    #[error("{0}")]
    NotFound(String),
    /// Known to the caller but not theirs to act on.
    #[error("{0}")]
    Forbidden(String),
    /// A limit was reached.
    #[error("{0}")]
    Exhausted(String),
    /// A service this one needs did not answer.
    #[error("{0}")]
    Unavailable(String),
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

    /// NOT_FOUND for a session id the caller has no live session under.
    pub(crate) fn no_session() -> Self {
        Error::NotFound("no such session: it ended (left or timed out) or is not yours; join again".into())
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let api = match error {
            Error::Invalid { message, violations } => ApiError::InvalidArgument { message, violations },
            Error::NotFound(m) => ApiError::NotFound(m),
            Error::Forbidden(m) => ApiError::PermissionDenied(m),
            Error::Exhausted(message) => ApiError::ResourceExhausted { message, retry_after: None },
            Error::Unavailable(m) => ApiError::Unavailable(m),
            Error::Bus(csp_bus::BusError::Unavailable(m)) => ApiError::Unavailable(format!("event bus: {m}")),
            e @ (Error::Bus(_) | Error::Internal(_)) => ApiError::internal(e),
        };
        api.into()
    }
}

//! The AI service's errors and their one mapping into gRPC statuses.

use std::time::Duration;

use csp_platform::{ApiError, FieldViolation};
use tonic::Status;

use crate::providers::ProviderError;

/// Why an AI operation failed.
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
    /// No such conversation (or not the caller's).
    #[error("{0}")]
    NotFound(String),
    /// Known to the caller but not theirs to act on.
    #[error("{0}")]
    Forbidden(String),
    /// A limit or budget is reached.
    #[error("{message}")]
    Exhausted {
        /// Summary.
        message: String,
        /// When to retry.
        retry_after: Option<Duration>,
    },
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
    /// The provider failed.
    #[error("{route}: {error}")]
    Provider {
        /// `provider/model`.
        route: String,
        /// What went wrong.
        error: ProviderError,
    },
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
            Error::Forbidden(m) => ApiError::PermissionDenied(m),
            Error::Exhausted { message, retry_after } => ApiError::ResourceExhausted { message, retry_after },
            Error::Precondition { message, reason } => {
                ApiError::FailedPrecondition { message, reason, metadata: Vec::new() }
            }
            Error::Provider { route, error } => {
                let message = format!("{route}: {error}");
                match error {
                    ProviderError::RateLimited { retry_after } => ApiError::ResourceExhausted {
                        message: format!("{message}; try again later"),
                        retry_after,
                    },
                    ProviderError::Unavailable(_) | ProviderError::Malformed(_) => {
                        ApiError::Unavailable(message)
                    }
                    ProviderError::BadKey => ApiError::FailedPrecondition {
                        message: format!("{message}; an operator must configure a valid key"),
                        reason: "PROVIDER_KEY_REFUSED",
                        metadata: vec![("provider".into(), route)],
                    },
                    ProviderError::UnknownModel(_) => ApiError::InvalidArgument {
                        violations: vec![FieldViolation::new("model", message.clone())],
                        message,
                    },
                    ProviderError::ContextTooLong => ApiError::InvalidArgument {
                        violations: vec![FieldViolation::new("messages", message.clone())],
                        message,
                    },
                    ProviderError::Rejected(_) => ApiError::FailedPrecondition {
                        message,
                        reason: "PROVIDER_REJECTED",
                        metadata: vec![("provider".into(), route)],
                    },
                }
            }
            Error::Unavailable(m) => ApiError::Unavailable(m),
            Error::Bus(csp_bus::BusError::Unavailable(m)) => ApiError::Unavailable(format!("event bus: {m}")),
            e @ (Error::Db(_) | Error::Bus(_) | Error::Internal(_)) => ApiError::internal(e),
        };
        api.into()
    }
}

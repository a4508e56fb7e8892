//! The auth service's errors and their one mapping into gRPC statuses.

use std::time::Duration;

use csp_platform::{ApiError, FieldViolation};
use tonic::Status;

/// Why an auth operation failed.
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
    /// Wrong login or password (the same answer whichever it was).
    #[error("invalid login or password")]
    InvalidCredentials,
    /// Too many failures: locked until the retry time.
    #[error("too many failed logins; try again in {}s", .0.as_secs().max(1))]
    Locked(Duration),
    /// The account is disabled.
    #[error("this account is disabled")]
    Disabled,
    /// A refresh token or API key that is unknown, expired, revoked or reused.
    #[error("{0}")]
    BadToken(&'static str),
    /// No such entity.
    #[error("{0}")]
    NotFound(String),
    /// Already taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// Not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// A feature flag is off.
    #[error("feature {0} is disabled")]
    FeatureDisabled(&'static str),
    /// Bad configuration (key files).
    #[error("invalid configuration: {0}")]
    Config(String),
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
    pub(crate) fn field(violation: FieldViolation) -> Self {
        Error::Invalid {
            message: format!("invalid {}: {}", violation.field, violation.description),
            violations: vec![violation],
        }
    }

    /// INVALID_ARGUMENT for several fields (none means no error).
    pub(crate) fn fields(violations: Vec<FieldViolation>) -> Result<(), Self> {
        match violations.len() {
            0 => Ok(()),
            1 => {
                Err(Self::field(violations.into_iter().next().unwrap_or_else(|| FieldViolation::new("", ""))))
            }
            _ => Err(Error::Invalid { message: FieldViolation::summary(&violations), violations }),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let api = match error {
            Error::Invalid { message, violations } => ApiError::InvalidArgument { message, violations },
            e @ (Error::InvalidCredentials | Error::Disabled | Error::BadToken(_)) => {
                ApiError::Unauthenticated(e.to_string())
            }
            e @ Error::Locked(retry_after) => {
                ApiError::ResourceExhausted { message: e.to_string(), retry_after: Some(retry_after) }
            }
            Error::NotFound(m) => ApiError::NotFound(m),
            Error::AlreadyExists(m) => ApiError::AlreadyExists(m),
            Error::Forbidden(m) => ApiError::PermissionDenied(m),
            Error::FeatureDisabled(flag) => ApiError::feature_disabled(flag),
            Error::Bus(e) => {
                tracing::warn!(error = %e, "event bus unavailable");
                ApiError::Unavailable("the event bus is unavailable; try again".into())
            }
            e @ (Error::Config(_) | Error::Db(_) | Error::Internal(_)) => ApiError::internal(e),
        };
        api.into()
    }
}

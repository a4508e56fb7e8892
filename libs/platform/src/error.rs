//! The one mapping from domain errors to gRPC statuses.
//!
//! Each crate has its own `thiserror` error enum and converts it into [`ApiError`], whose
//! `From<ApiError> for tonic::Status` adds the standard error details: `BadRequest` field
//! violations, `RetryInfo` (plus a `retry-after` header) for rate limits and lockouts,
//! `ErrorInfo` with a stable reason code. Internal errors are logged with their whole cause
//! chain and reach the caller only as an opaque message carrying the trace id.
//!
//! Nothing a caller sent comes back unbounded: messages, field violations and error metadata
//! are cut to a few hundred bytes here, and [`bound_status_headers`] — applied by every server
//! to every response, whoever built the status — cuts `grpc-message` and drops oversized
//! `grpc-status-details-bin`, so no status header can pass HTTP/2's header limits and take a
//! shared connection (and every other caller's calls on it) down.

use std::{borrow::Cow, error::Error as StdError, fmt, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The domain that `ErrorInfo` details name.
pub const ERROR_DOMAIN: &str = "csp.designer";

/// The longest status message sent, in bytes (before percent-encoding).
pub const MAX_STATUS_MESSAGE: usize = 1024;
/// The largest `grpc-status-details-bin` sent (base64 bytes); larger details are dropped.
pub const MAX_STATUS_DETAILS: usize = 8 * 1024;
/// The longest field path or error metadata value sent, in bytes.
const MAX_FIELD: usize = 128;
/// The longest field violation description sent, in bytes.
const MAX_DESCRIPTION: usize = 256;
/// The most field violations sent.
const MAX_VIOLATIONS: usize = 10;

/// `text` cut to at most `max` bytes on character boundaries, its middle replaced by `…` when
/// cut: the start (what it is about) and the end (usually the reason) are kept.
pub fn bounded(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let room = max.saturating_sub('…'.len_utf8());
    let mut head = room * 2 / 3;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - (room - head);
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    Cow::Owned(format!("{}…{}", &text[..head], &text[tail..]))
}

/// What `grpc-message` percent-encodes (gRPC: everything outside printable ASCII, and `%`).
const MESSAGE_ENCODING: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// Bounds the status headers of a response head or trailers: `grpc-message` cut to
/// [`MAX_STATUS_MESSAGE`], `grpc-status-details-bin` over [`MAX_STATUS_DETAILS`] dropped (the
/// code and the message still say what went wrong).
pub fn bound_status_headers(headers: &mut http::HeaderMap) {
    if let Some(value) = headers.get("grpc-message")
        && value.len() > MAX_STATUS_MESSAGE
    {
        let decoded = percent_encoding::percent_decode(value.as_bytes()).decode_utf8_lossy().into_owned();
        let cut = bounded(&decoded, MAX_STATUS_MESSAGE);
        let encoded = percent_encoding::utf8_percent_encode(&cut, MESSAGE_ENCODING).to_string();
        match http::HeaderValue::from_str(&encoded) {
            Ok(value) => {
                headers.insert("grpc-message", value);
            }
            Err(_) => {
                headers.remove("grpc-message");
            }
        }
    }
    if headers.get("grpc-status-details-bin").is_some_and(|v| v.len() > MAX_STATUS_DETAILS) {
        headers.remove("grpc-status-details-bin");
    }
}

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field, e.g. `node.config` or `password`.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into() }
    }

    /// `invalid request: a: why; b: why`, the message of an INVALID_ARGUMENT naming them all.
    pub fn summary(violations: &[FieldViolation]) -> String {
        let listed: Vec<String> =
            violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect();
        format!("invalid request: {}", listed.join("; "))
    }
}

/// Collects field violations while validating a request.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a violation of `field`.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when nothing was recorded, else INVALID_ARGUMENT carrying every violation.
    pub fn into_result(self, message: &str) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::InvalidArgument { message: message.to_owned(), violations: self.0 })
        }
    }
}

/// A request failure, in the terms of gRPC status codes.
#[derive(Debug)]
pub enum ApiError {
    /// The request is malformed; the violations name the fields.
    InvalidArgument {
        /// Summary.
        message: String,
        /// Each bad field.
        violations: Vec<FieldViolation>,
    },
    /// The entity does not exist, or the caller may not know that it does.
    NotFound(String),
    /// The entity already exists.
    AlreadyExists(String),
    /// The system is not in the state the request requires (e.g. a stale revision).
    FailedPrecondition {
        /// Summary.
        message: String,
        /// Stable machine-readable reason, e.g. `STALE_REVISION`.
        reason: &'static str,
        /// Facts the client needs to recover, e.g. `current_revision`.
        metadata: Vec<(String, String)>,
    },
    /// The caller is known but not allowed.
    PermissionDenied(String),
    /// The caller is not authenticated.
    Unauthenticated(String),
    /// A rate limit or lockout; retry after the given time.
    ResourceExhausted {
        /// Summary.
        message: String,
        /// When to retry.
        retry_after: Option<Duration>,
    },
    /// A dependency is down.
    Unavailable(String),
    /// The feature is switched off or not built.
    Unimplemented(String),
    /// A deadline passed.
    DeadlineExceeded(String),
    /// A bug or an unexpected failure; the cause is logged, never returned.
    Internal(Box<dyn StdError + Send + Sync>),
}

impl ApiError {
    /// An internal error from any error value.
    pub fn internal(error: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        ApiError::Internal(error.into())
    }

    /// INVALID_ARGUMENT for a single field.
    pub fn invalid_field(field: impl Into<String>, description: impl Into<String>) -> Self {
        let violation = FieldViolation::new(field, description);
        ApiError::InvalidArgument {
            message: format!("invalid {}: {}", violation.field, violation.description),
            violations: vec![violation],
        }
    }

    /// UNIMPLEMENTED for a feature switched off by its flag.
    pub fn feature_disabled(flag: &str) -> Self {
        ApiError::Unimplemented(format!(
            "this feature is disabled; set features.{flag}=true (CSP_FEATURES__{}=true) to enable it",
            flag.to_ascii_uppercase()
        ))
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument { .. } => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::FailedPrecondition { .. } => Code::FailedPrecondition,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::ResourceExhausted { .. } => Code::ResourceExhausted,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Unimplemented(_) => Code::Unimplemented,
            ApiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ApiError::Internal(_) => Code::Internal,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::InvalidArgument { message, .. }
            | ApiError::FailedPrecondition { message, .. }
            | ApiError::ResourceExhausted { message, .. } => f.write_str(message),
            ApiError::NotFound(m)
            | ApiError::AlreadyExists(m)
            | ApiError::PermissionDenied(m)
            | ApiError::Unauthenticated(m)
            | ApiError::Unavailable(m)
            | ApiError::Unimplemented(m)
            | ApiError::DeadlineExceeded(m) => f.write_str(m),
            ApiError::Internal(e) => write!(f, "internal error: {e}"),
        }
    }
}

impl StdError for ApiError {}

/// A tonic interceptor that lets calls through when `enabled`, and otherwise answers
/// UNIMPLEMENTED naming the flag (`features.<flag>`).
pub fn feature_gate(
    flag: &'static str,
    enabled: bool,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, Status> + Clone + Send + Sync + 'static {
    move |request| if enabled { Ok(request) } else { Err(ApiError::feature_disabled(flag).into()) }
}

/// Renders an error and its causes as `outer: inner: innermost`.
pub fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        let code = error.code();
        let message = |text: String| bounded(&text, MAX_STATUS_MESSAGE).into_owned();
        match error {
            ApiError::InvalidArgument { message: text, violations } => {
                let mut details = ErrorDetails::new();
                let more = violations.len().saturating_sub(MAX_VIOLATIONS);
                for v in violations.into_iter().take(MAX_VIOLATIONS) {
                    details.add_bad_request_violation(
                        bounded(&v.field, MAX_FIELD),
                        bounded(&v.description, MAX_DESCRIPTION),
                    );
                }
                if more > 0 {
                    details.add_bad_request_violation("", format!("and {more} more"));
                }
                Status::with_error_details(code, message(text), details)
            }
            ApiError::FailedPrecondition { message: text, reason, metadata } => {
                let details = ErrorDetails::with_error_info(
                    reason,
                    ERROR_DOMAIN,
                    metadata
                        .into_iter()
                        .map(|(k, v)| {
                            (bounded(&k, MAX_FIELD).into_owned(), bounded(&v, MAX_FIELD).into_owned())
                        })
                        .collect::<std::collections::HashMap<_, _>>(),
                );
                Status::with_error_details(code, message(text), details)
            }
            ApiError::ResourceExhausted { message: text, retry_after } => {
                let details = ErrorDetails::with_retry_info(retry_after);
                let mut status = Status::with_error_details(code, message(text), details);
                if let Some(after) = retry_after {
                    let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
                    if let Ok(value) = seconds.to_string().parse() {
                        status.metadata_mut().insert("retry-after", value);
                    }
                }
                status
            }
            ApiError::Internal(cause) => {
                let trace_id = crate::telemetry::current_trace_id();
                tracing::error!(error = %error_chain(cause.as_ref()), trace_id = trace_id.as_deref().unwrap_or(""), "internal error");
                match trace_id {
                    Some(id) => Status::internal(format!("internal error (trace {id})")),
                    None => Status::internal("internal error"),
                }
            }
            other => Status::new(code, message(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn nothing_a_caller_sent_comes_back_unbounded() {
        let huge = "é".repeat(50_000);
        let mut v = Violations::new();
        for _ in 0..100 {
            v.add(huge.clone(), huge.clone());
        }
        let status: Status = v.into_result(&huge).unwrap_err().into();
        assert!(status.message().len() <= MAX_STATUS_MESSAGE && status.message().contains('…'));
        assert_eq!(bounded("0123456789", 7), "01…89", "the start and the end are kept");
        assert!(status.details().len() < MAX_STATUS_DETAILS, "{}", status.details().len());
        let bad = status.get_details_bad_request().unwrap();
        assert_eq!(bad.field_violations.len(), MAX_VIOLATIONS + 1);
        assert_eq!(bad.field_violations[MAX_VIOLATIONS].description, "and 90 more");

        let mut headers = http::HeaderMap::new();
        let encoded = percent_encoding::utf8_percent_encode(&huge, MESSAGE_ENCODING).to_string();
        headers.insert("grpc-message", encoded.parse().unwrap());
        headers.insert("grpc-status-details-bin", "A".repeat(100_000).parse().unwrap());
        bound_status_headers(&mut headers);
        let message = headers["grpc-message"].to_str().unwrap();
        let decoded = percent_encoding::percent_decode_str(message).decode_utf8().unwrap();
        assert!(decoded.len() <= MAX_STATUS_MESSAGE && decoded.starts_with("éé") && decoded.contains('…'));
        assert!(headers.get("grpc-status-details-bin").is_none());
    }

    #[test]
    fn field_violations_travel_as_bad_request_details() {
        let mut v = Violations::new();
        v.add("username", "must be 3 to 64 characters");
        v.add("password", "must be at least 12 characters");
        let status: Status = v.into_result("invalid registration").unwrap_err().into();
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status.get_details_bad_request().unwrap();
        let fields: Vec<_> = bad.field_violations.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["username", "password"]);
    }

    #[test]
    fn rate_limits_carry_retry_info_and_header() {
        let status: Status = ApiError::ResourceExhausted {
            message: "account locked".into(),
            retry_after: Some(Duration::from_millis(90_500)),
        }
        .into();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.metadata().get("retry-after").unwrap(), "91");
        let info = status.get_details_retry_info().unwrap();
        assert_eq!(info.retry_delay, Some(Duration::from_millis(90_500)));
    }

    #[test]
    fn stale_revisions_carry_the_current_revision() {
        let status: Status = ApiError::FailedPrecondition {
            message: "design changed".into(),
            reason: "STALE_REVISION",
            metadata: vec![("current_revision".into(), "7".into())],
        }
        .into();
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "STALE_REVISION");
        assert_eq!(info.metadata.get("current_revision").map(String::as_str), Some("7"));
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let cause = std::io::Error::other("password=hunter2 in connection string");
        let status: Status = ApiError::internal(cause).into();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("hunter2"));
    }

    #[test]
    fn disabled_features_name_their_flag() {
        let status: Status = ApiError::feature_disabled("self_signup").into();
        assert_eq!(status.code(), Code::Unimplemented);
        assert!(status.message().contains("features.self_signup"), "{}", status.message());
    }
}

//! The platform every service of the suite stands on.
//!
//! - [`config`]: typed, layered settings (defaults < YAML < environment).
//! - [`telemetry`]: logs, OpenTelemetry tracing, W3C trace-context propagation.
//! - [`server`]: the standard gRPC server (health, reflection, metrics, limits, graceful
//!   shutdown).
//! - [`error`]: the one domain-error → `tonic::Status` mapping, with field details.
//! - [`health`], [`metrics`], [`http`]: the pieces the server is made of.
//! - [`client`]: channels to the other services; [`component`]: one call of a remote component.
//! - [`auth`]: roles and permissions, access-token verification, the auth layer.

pub mod alerts;
pub mod auth;
pub mod client;
pub mod component;
pub mod config;
pub mod error;
pub mod health;
pub mod http;
mod local;
pub mod metrics;
pub mod proxies;
pub mod server;
pub mod telemetry;
pub mod text;

pub use config::{Service, Settings};
pub use error::{ApiError, FieldViolation, Violations};
pub use server::{GrpcServer, ServerError};

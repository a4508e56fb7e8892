//! The gRPC adapter of `csp.auth.v1.AuthService`.
//!
//! Every RPC not implemented yet answers UNIMPLEMENTED (tonic's default for a method the
//! impl leaves out), so clients can tell "not built" from "failed".

use csp_proto::auth::v1::auth_service_server::AuthService;

/// The service's gRPC face.
#[derive(Debug, Default)]
pub(crate) struct AuthApi;

#[tonic::async_trait]
impl AuthService for AuthApi {}

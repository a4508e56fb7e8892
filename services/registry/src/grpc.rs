//! The gRPC adapter of `csp.registry.v1.RegistryService`.
//!
//! Every RPC not implemented yet answers UNIMPLEMENTED (tonic's default for a method the
//! impl leaves out), so clients can tell "not built" from "failed".

use csp_proto::registry::v1::registry_service_server::RegistryService;

/// The service's gRPC face.
#[derive(Debug, Default)]
pub(crate) struct RegistryApi;

#[tonic::async_trait]
impl RegistryService for RegistryApi {}

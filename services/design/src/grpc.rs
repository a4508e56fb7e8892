//! The gRPC adapter of `csp.design.v1.DesignService`.
//!
//! Every RPC not implemented yet answers UNIMPLEMENTED (tonic's default for a method the
//! impl leaves out), so clients can tell "not built" from "failed".

use csp_proto::design::v1::design_service_server::DesignService;

/// The service's gRPC face.
#[derive(Debug, Default)]
pub(crate) struct DesignApi;

#[tonic::async_trait]
impl DesignService for DesignApi {}

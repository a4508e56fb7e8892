//! The gRPC adapter of `csp.collab.v1.CollaborationService`.
//!
//! Every RPC not implemented yet answers UNIMPLEMENTED (tonic's default for a method the
//! impl leaves out), so clients can tell "not built" from "failed".

use csp_proto::collab::v1::collaboration_service_server::CollaborationService;

/// The service's gRPC face.
#[derive(Debug, Default)]
pub(crate) struct CollabApi;

#[tonic::async_trait]
impl CollaborationService for CollabApi {}

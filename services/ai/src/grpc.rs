//! The gRPC adapter of `csp.ai.v1.AiService`.
//!
//! Every RPC not implemented yet answers UNIMPLEMENTED (tonic's default for a method the
//! impl leaves out), so clients can tell "not built" from "failed".

use csp_proto::ai::v1::ai_service_server::AiService;

/// The service's gRPC face.
#[derive(Debug, Default)]
pub(crate) struct AiApi;

#[tonic::async_trait]
impl AiService for AiApi {}

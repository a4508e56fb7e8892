//! The gRPC adapter of `csp.executor.v1.ExecutorService`.
//!
//! Every RPC not implemented yet answers UNIMPLEMENTED (tonic's default for a method the
//! impl leaves out), so clients can tell "not built" from "failed".

use csp_proto::executor::v1::executor_service_server::ExecutorService;

/// The service's gRPC face.
#[derive(Debug, Default)]
pub(crate) struct ExecutorApi;

#[tonic::async_trait]
impl ExecutorService for ExecutorApi {}

//! The gRPC adapter of `csp.executor.v1.ExecutorService`.
//!
//! Starting, cancelling, stepping, resuming and retrying need the `design.execute` permission
//! and editor access to the design; reading and watching need `executions.read` and any access
//! to it. Callers without access get NOT_FOUND.

use std::{pin::Pin, sync::Arc};

use csp_platform::auth::{Permission, require};
use csp_proto::executor::v1::{self as pb, executor_service_server::ExecutorService};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::{clients::Credentials, executions::Executor};

/// The service's gRPC face.
pub(crate) struct ExecutorApi {
    executor: Arc<Executor>,
}

impl ExecutorApi {
    pub(crate) fn new(executor: Arc<Executor>) -> Self {
        Self { executor }
    }
}

fn credentials<T>(request: &Request<T>) -> Credentials {
    request.metadata().get("authorization").cloned()
}

#[tonic::async_trait]
impl ExecutorService for ExecutorApi {
    #[tracing::instrument(skip_all)]
    async fn start_execution(
        &self,
        request: Request<pb::StartExecutionRequest>,
    ) -> Result<Response<pb::StartExecutionResponse>, Status> {
        let p = require(&request, Permission::DesignExecute)?;
        let credentials = credentials(&request);
        let execution = self.executor.start(&p, credentials, request.into_inner()).await?;
        Ok(Response::new(pb::StartExecutionResponse { execution: Some(execution) }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_execution(
        &self,
        request: Request<pb::GetExecutionRequest>,
    ) -> Result<Response<pb::GetExecutionResponse>, Status> {
        require(&request, Permission::ExecutionsRead)?;
        let credentials = credentials(&request);
        let execution = self.executor.get(&credentials, &request.get_ref().execution_id).await?;
        Ok(Response::new(pb::GetExecutionResponse { execution: Some(execution) }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_executions(
        &self,
        request: Request<pb::ListExecutionsRequest>,
    ) -> Result<Response<pb::ListExecutionsResponse>, Status> {
        require(&request, Permission::ExecutionsRead)?;
        let credentials = credentials(&request);
        Ok(Response::new(self.executor.list(&credentials, request.into_inner()).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn cancel_execution(
        &self,
        request: Request<pb::CancelExecutionRequest>,
    ) -> Result<Response<pb::CancelExecutionResponse>, Status> {
        let p = require(&request, Permission::DesignExecute)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let execution = self.executor.cancel(&p, &credentials, &r.execution_id, &r.reason).await?;
        Ok(Response::new(pb::CancelExecutionResponse { execution: Some(execution) }))
    }

    #[tracing::instrument(skip_all)]
    async fn watch_execution(
        &self,
        request: Request<pb::WatchExecutionRequest>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<pb::WatchExecutionResponse, Status>> + Send>>>,
        Status,
    > {
        require(&request, Permission::ExecutionsRead)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let events = self.executor.watch(&credentials, &r.execution_id, &r.after_event_id).await?;
        Ok(Response::new(Box::pin(events)))
    }

    #[tracing::instrument(skip_all)]
    async fn resume_execution(
        &self,
        request: Request<pb::ResumeExecutionRequest>,
    ) -> Result<Response<pb::ResumeExecutionResponse>, Status> {
        require(&request, Permission::DesignExecute)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let execution = self.executor.resume(&credentials, &r.execution_id, r.clear_breakpoints).await?;
        Ok(Response::new(pb::ResumeExecutionResponse { execution: Some(execution) }))
    }

    #[tracing::instrument(skip_all)]
    async fn step_execution(
        &self,
        request: Request<pb::StepExecutionRequest>,
    ) -> Result<Response<pb::StepExecutionResponse>, Status> {
        require(&request, Permission::DesignExecute)?;
        let credentials = credentials(&request);
        let execution = self.executor.step(&credentials, &request.get_ref().execution_id).await?;
        Ok(Response::new(pb::StepExecutionResponse { execution: Some(execution) }))
    }

    #[tracing::instrument(skip_all)]
    async fn retry_execution(
        &self,
        request: Request<pb::RetryExecutionRequest>,
    ) -> Result<Response<pb::RetryExecutionResponse>, Status> {
        let p = require(&request, Permission::DesignExecute)?;
        let credentials = credentials(&request);
        let execution = self.executor.retry(&p, credentials, request.into_inner()).await?;
        Ok(Response::new(pb::RetryExecutionResponse { execution: Some(execution) }))
    }
}

//! The gRPC adapter of `csp.executor.v1.ExecutorService`, and the only place protobuf
//! requests and answers are converted.
//!
//! Starting, cancelling, stepping, resuming and retrying need the `design.execute` permission
//! and editor access to the design; reading and watching need `executions.read` and any access
//! to it. Callers without access get NOT_FOUND. Dead letters are for admins.

use std::{collections::HashMap, pin::Pin, sync::Arc};

use csp_platform::auth::{Permission, require};
use csp_proto::{executor::v1 as pb, json as pbjson};
use futures::{Stream, StreamExt as _};
use pb::executor_service_server::ExecutorService;
use prost::Message as _;
use tonic::{Request, Response, Status};

use crate::{
    clients::Credentials,
    error::Error,
    executions::{
        DeadLetter, Execution, Executor, ListRequest, Messages, RetryRequest, StartRequest, Watched,
    },
    stored::{self, StoredOptions},
};

/// The service's gRPC face.
pub(crate) struct ExecutorApi {
    executor: Arc<Executor>,
}

impl ExecutorApi {
    pub(crate) fn new(executor: Arc<Executor>) -> Self {
        Self { executor }
    }

    fn options(&self, options: Option<&pb::ExecutionOptions>) -> Result<StoredOptions, Error> {
        StoredOptions::from_pb(options, &self.executor.settings().executor).map_err(Error::fields)
    }
}

fn credentials<T>(request: &Request<T>) -> Credentials {
    request.metadata().get("authorization").cloned()
}

fn timestamp(time: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: time.timestamp(), nanos: time.timestamp_subsec_nanos() as i32 }
}

fn messages_from_pb(lists: HashMap<String, prost_types::ListValue>) -> Messages {
    lists
        .into_iter()
        .map(|(node, list)| (node, list.values.into_iter().map(pbjson::from_value).collect()))
        .collect()
}

fn messages_to_pb(messages: &Messages) -> HashMap<String, prost_types::ListValue> {
    messages
        .iter()
        .map(|(node, values)| {
            (
                node.clone(),
                prost_types::ListValue { values: values.iter().cloned().map(pbjson::to_value).collect() },
            )
        })
        .collect()
}

fn execution(e: Execution) -> pb::Execution {
    pb::Execution {
        id: e.id,
        design_id: e.design_id,
        design_revision: e.design_revision,
        status: e.status.to_pb() as i32,
        started_by: e.started_by,
        created_at: Some(timestamp(e.created_at)),
        started_at: e.started_at.map(timestamp),
        finished_at: e.finished_at.map(timestamp),
        inputs: messages_to_pb(&e.inputs),
        outputs: messages_to_pb(&e.outputs),
        error: e.error.map(|f| f.to_pb()),
        nodes: e.nodes.iter().map(stored::StoredNode::to_pb).collect(),
        options: e.options.map(|o| o.to_pb()),
        attempt: e.attempt,
        retry_of: e.retry_of.unwrap_or_default(),
        paused_at_node_id: e.paused_at,
        runner: e.runner,
    }
}

fn dead_letter(d: DeadLetter) -> pb::DeadLetter {
    pb::DeadLetter {
        execution_id: d.execution_id,
        design_id: d.design_id,
        job_id: d.job,
        deliveries: d.deliveries,
        last_error: d.last_error,
        dead_at: Some(timestamp(d.dead_at)),
    }
}

fn watched(id: &str, w: Watched) -> pb::WatchExecutionResponse {
    let mut event = pb::ExecutionEvent::decode(w.payload.as_ref()).unwrap_or_default();
    event.event_id = w.event_id.to_string();
    event.execution_id = id.to_owned();
    pb::WatchExecutionResponse { event: Some(event) }
}

#[tonic::async_trait]
impl ExecutorService for ExecutorApi {
    type WatchExecutionStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchExecutionResponse, Status>> + Send>>;

    #[tracing::instrument(skip_all)]
    async fn start_execution(
        &self,
        request: Request<pb::StartExecutionRequest>,
    ) -> Result<Response<pb::StartExecutionResponse>, Status> {
        let p = require(&request, Permission::DesignExecute)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let start = StartRequest {
            options: self.options(r.options.as_ref())?,
            design_id: r.design_id,
            design_revision: r.design_revision,
            inputs: messages_from_pb(r.inputs),
            idempotency_key: r.idempotency_key,
            run_invalid: r.run_invalid,
        };
        let started = self.executor.start(&p, credentials, start).await?;
        Ok(Response::new(pb::StartExecutionResponse { execution: Some(execution(started)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_execution(
        &self,
        request: Request<pb::GetExecutionRequest>,
    ) -> Result<Response<pb::GetExecutionResponse>, Status> {
        require(&request, Permission::ExecutionsRead)?;
        let credentials = credentials(&request);
        let found = self.executor.get(&credentials, &request.get_ref().execution_id).await?;
        Ok(Response::new(pb::GetExecutionResponse { execution: Some(execution(found)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_executions(
        &self,
        request: Request<pb::ListExecutionsRequest>,
    ) -> Result<Response<pb::ListExecutionsResponse>, Status> {
        require(&request, Permission::ExecutionsRead)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let status = match pb::ExecutionStatus::try_from(r.status) {
            Ok(pb::ExecutionStatus::Unspecified) => None,
            Ok(status) => stored::Status::from_pb(status),
            Err(_) => {
                return Err(Error::field("status", format!("{} is not an ExecutionStatus", r.status)).into());
            }
        };
        let list =
            ListRequest { design_id: r.design_id, page_size: r.page_size, page_token: r.page_token, status };
        let page = self.executor.list(&credentials, list).await?;
        Ok(Response::new(pb::ListExecutionsResponse {
            executions: page.items.into_iter().map(execution).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn cancel_execution(
        &self,
        request: Request<pb::CancelExecutionRequest>,
    ) -> Result<Response<pb::CancelExecutionResponse>, Status> {
        let p = require(&request, Permission::DesignExecute)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let cancelled = self.executor.cancel(&p, &credentials, &r.execution_id, &r.reason).await?;
        Ok(Response::new(pb::CancelExecutionResponse { execution: Some(execution(cancelled)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn watch_execution(
        &self,
        request: Request<pb::WatchExecutionRequest>,
    ) -> Result<Response<Self::WatchExecutionStream>, Status> {
        require(&request, Permission::ExecutionsRead)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let events = self.executor.watch(&credentials, &r.execution_id, &r.after_event_id).await?;
        let id = r.execution_id;
        let events = events.map(move |event| event.map(|w| watched(&id, w)).map_err(Status::from));
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
        let resumed = self.executor.resume(&credentials, &r.execution_id, r.clear_breakpoints).await?;
        Ok(Response::new(pb::ResumeExecutionResponse { execution: Some(execution(resumed)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn step_execution(
        &self,
        request: Request<pb::StepExecutionRequest>,
    ) -> Result<Response<pb::StepExecutionResponse>, Status> {
        require(&request, Permission::DesignExecute)?;
        let credentials = credentials(&request);
        let stepped = self.executor.step(&credentials, &request.get_ref().execution_id).await?;
        Ok(Response::new(pb::StepExecutionResponse { execution: Some(execution(stepped)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn retry_execution(
        &self,
        request: Request<pb::RetryExecutionRequest>,
    ) -> Result<Response<pb::RetryExecutionResponse>, Status> {
        let p = require(&request, Permission::DesignExecute)?;
        let credentials = credentials(&request);
        let r = request.into_inner();
        let options = match r.options.as_ref() {
            Some(options) => Some(self.options(Some(options))?),
            None => None,
        };
        let retry = RetryRequest { execution_id: r.execution_id, from_node_id: r.from_node_id, options };
        let retried = self.executor.retry(&p, credentials, retry).await?;
        Ok(Response::new(pb::RetryExecutionResponse { execution: Some(execution(retried)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let p = require(&request, Permission::ExecutionsRead)?;
        if !p.is_admin() {
            return Err(Error::Forbidden("only admins can list dead letters".into()).into());
        }
        let r = request.into_inner();
        let page = self.executor.dead_letters(r.page_size, &r.page_token).await?;
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: page.items.into_iter().map(dead_letter).collect(),
            next_page_token: page.next_page_token,
        }))
    }
}

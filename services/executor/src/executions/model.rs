//! What the service's operations take and return: executions, requests and pages in the
//! executor's own terms (the gRPC adapter converts them).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use csp_bus::EventId;
use serde_json::Value;

use crate::{
    entity::{dead_letter, execution},
    stored::{Status, StoredFailure, StoredNode, StoredOptions},
};

/// Messages per node: `source.input` inputs, `sink.output` outputs.
pub(crate) type Messages = BTreeMap<String, Vec<Value>>;

/// An execution.
#[derive(Debug, Clone)]
pub(crate) struct Execution {
    pub(crate) id: String,
    pub(crate) design_id: String,
    pub(crate) design_revision: i64,
    pub(crate) status: Status,
    pub(crate) started_by: String,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) started_at: Option<DateTime<Utc>>,
    pub(crate) finished_at: Option<DateTime<Utc>>,
    pub(crate) inputs: Messages,
    /// Empty in listings.
    pub(crate) outputs: Messages,
    pub(crate) error: Option<StoredFailure>,
    pub(crate) nodes: Vec<StoredNode>,
    pub(crate) options: Option<StoredOptions>,
    /// How many times a replica has started it (more than 1: it was taken over).
    pub(crate) attempt: i32,
    pub(crate) retry_of: Option<String>,
    /// The node it is paused at, if paused.
    pub(crate) paused_at: String,
    /// The replica that started its current attempt.
    pub(crate) runner: String,
}

impl Execution {
    /// The stored row as the service shows it; `outputs` may be left out (listings).
    pub(crate) fn of(row: &execution::Model, outputs: bool) -> Self {
        Self {
            id: row.id.clone(),
            design_id: row.design_id.clone(),
            design_revision: row.design_revision,
            status: Status::parse(&row.status),
            started_by: row.started_by.clone(),
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            inputs: serde_json::from_str(&row.inputs).unwrap_or_default(),
            outputs: if outputs {
                serde_json::from_str(&row.outputs).unwrap_or_default()
            } else {
                Messages::new()
            },
            error: row.error.as_deref().and_then(|e| serde_json::from_str(e).ok()),
            nodes: serde_json::from_str(&row.nodes).unwrap_or_default(),
            options: serde_json::from_str(&row.options).ok(),
            attempt: row.attempt,
            retry_of: row.retry_of.clone(),
            paused_at: row.paused_at.clone(),
            runner: row.runner.clone(),
        }
    }
}

/// StartExecution.
#[derive(Debug, Clone)]
pub(crate) struct StartRequest {
    pub(crate) design_id: String,
    /// 0: the current revision.
    pub(crate) design_revision: i64,
    pub(crate) inputs: Messages,
    pub(crate) options: StoredOptions,
    /// Empty: none.
    pub(crate) idempotency_key: String,
    /// Run even when the design's validation reports errors.
    pub(crate) run_invalid: bool,
}

/// RetryExecution.
#[derive(Debug, Clone)]
pub(crate) struct RetryRequest {
    pub(crate) execution_id: String,
    /// Empty: the node that failed.
    pub(crate) from_node_id: String,
    /// `None`: the options of the execution retried.
    pub(crate) options: Option<StoredOptions>,
}

/// ListExecutions.
#[derive(Debug, Clone)]
pub(crate) struct ListRequest {
    pub(crate) design_id: String,
    pub(crate) page_size: i32,
    pub(crate) page_token: String,
    pub(crate) status: Option<Status>,
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub(crate) struct Page<T> {
    pub(crate) items: Vec<T>,
    /// Empty on the last page.
    pub(crate) next_page_token: String,
}

/// A job given up after too many deliveries.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetter {
    pub(crate) execution_id: String,
    pub(crate) design_id: String,
    pub(crate) job: String,
    pub(crate) deliveries: i64,
    pub(crate) last_error: String,
    pub(crate) dead_at: DateTime<Utc>,
}

impl From<dead_letter::Model> for DeadLetter {
    fn from(row: dead_letter::Model) -> Self {
        Self {
            execution_id: row.execution_id,
            design_id: row.design_id,
            job: row.job,
            deliveries: row.deliveries,
            last_error: row.last_error,
            dead_at: row.dead_at,
        }
    }
}

/// One event of an execution's stream, as WatchExecution delivers it: its position and its
/// encoded `ExecutionEvent`.
#[derive(Debug, Clone)]
pub(crate) struct Watched {
    pub(crate) event_id: EventId,
    pub(crate) payload: bytes::Bytes,
}

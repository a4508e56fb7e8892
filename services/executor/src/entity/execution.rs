//! `executions`: one row per execution, with its plan, options, status and result.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "executions")]
pub(crate) struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub(crate) id: String,
    pub(crate) design_id: String,
    pub(crate) design_revision: i64,
    /// `queued`, `running`, `paused`, `succeeded`, `failed`, `cancelled` or `deadlocked`.
    pub(crate) status: String,
    pub(crate) started_by: String,
    pub(crate) created_at: DateTimeUtc,
    pub(crate) started_at: Option<DateTimeUtc>,
    pub(crate) finished_at: Option<DateTimeUtc>,
    /// JSON object: `source.input` node id → messages.
    pub(crate) inputs: String,
    /// JSON object: `sink.output` node id → messages.
    pub(crate) outputs: String,
    /// JSON `stored::Failure`.
    pub(crate) error: Option<String>,
    /// JSON array of `stored::Node`.
    pub(crate) nodes: String,
    /// JSON `stored::Options`.
    pub(crate) options: String,
    /// JSON `runtime::Plan`.
    pub(crate) plan: String,
    pub(crate) attempt: i32,
    pub(crate) retry_of: Option<String>,
    /// The node a retry reruns from.
    pub(crate) retry_from: Option<String>,
    pub(crate) paused_at: String,
    pub(crate) idempotency_key: Option<String>,
    /// Why it was asked to stop (`cancelled by ...`): whichever replica runs it, or claims it
    /// later, ends it CANCELLED with this reason.
    pub(crate) cancel_requested: Option<String>,
    /// Why its last delivery could not run it (for the dead letter, should it come to that).
    pub(crate) last_error: Option<String>,
    /// The replica (consumer name) that started its current attempt.
    pub(crate) runner: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub(crate) enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

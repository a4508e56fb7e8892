//! Queries of the executor schema.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait as _, Condition, ConnectionTrait, DbErr, EntityTrait as _, QueryFilter as _, QueryOrder as _,
    QuerySelect as _, Set,
    sea_query::{Expr, OnConflict},
};
use serde_json::Value;

use crate::{
    entity::{execution, recording},
    stored::Status,
};

/// Stores a new execution; `false` when one with its idempotency key exists already.
pub(crate) async fn insert(db: &impl ConnectionTrait, row: execution::Model) -> Result<bool, DbErr> {
    let inserted = execution::Entity::insert(execution::ActiveModel::from(row))
        .on_conflict(OnConflict::new().do_nothing().to_owned())
        .exec_without_returning(db)
        .await?;
    Ok(inserted == 1)
}

pub(crate) async fn get(db: &impl ConnectionTrait, id: &str) -> Result<Option<execution::Model>, DbErr> {
    execution::Entity::find_by_id(id.to_owned()).one(db).await
}

pub(crate) async fn by_idempotency_key(
    db: &impl ConnectionTrait,
    started_by: &str,
    key: &str,
) -> Result<Option<execution::Model>, DbErr> {
    execution::Entity::find()
        .filter(execution::Column::StartedBy.eq(started_by))
        .filter(execution::Column::IdempotencyKey.eq(key))
        .one(db)
        .await
}

/// A page of a design's executions, newest first, after the `(created_at, id)` cursor.
pub(crate) async fn list(
    db: &impl ConnectionTrait,
    design_id: &str,
    status: Option<Status>,
    after: Option<(DateTime<Utc>, String)>,
    limit: u64,
) -> Result<Vec<execution::Model>, DbErr> {
    let mut select = execution::Entity::find()
        .filter(execution::Column::DesignId.eq(design_id))
        .order_by_desc(execution::Column::CreatedAt)
        .order_by_desc(execution::Column::Id)
        .limit(limit);
    if let Some(status) = status {
        select = select.filter(execution::Column::Status.eq(status.as_str()));
    }
    if let Some((at, id)) = after {
        select = select.filter(Condition::any().add(execution::Column::CreatedAt.lt(at)).add(
            Condition::all().add(execution::Column::CreatedAt.eq(at)).add(execution::Column::Id.lt(id)),
        ));
    }
    select.all(db).await
}

fn live() -> Vec<&'static str> {
    vec![Status::Queued.as_str(), Status::Running.as_str(), Status::Paused.as_str()]
}

/// Marks a queued (or, after a replica died, running) execution as running its `attempt`.
/// `false` when it has ended meanwhile (cancelled while queued).
pub(crate) async fn start(
    db: &impl ConnectionTrait,
    id: &str,
    attempt: i32,
    now: DateTime<Utc>,
) -> Result<bool, DbErr> {
    let result = execution::Entity::update_many()
        .col_expr(execution::Column::Status, Expr::value(Status::Running.as_str()))
        .col_expr(execution::Column::Attempt, Expr::value(attempt))
        .col_expr(execution::Column::StartedAt, Expr::value(Some(now)))
        .col_expr(execution::Column::PausedAt, Expr::value(""))
        .filter(execution::Column::Id.eq(id))
        .filter(execution::Column::Status.is_in(live()))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Running ⇄ paused, while it is live.
pub(crate) async fn set_live_status(
    db: &impl ConnectionTrait,
    id: &str,
    status: Status,
    paused_at: &str,
) -> Result<bool, DbErr> {
    let result = execution::Entity::update_many()
        .col_expr(execution::Column::Status, Expr::value(status.as_str()))
        .col_expr(execution::Column::PausedAt, Expr::value(paused_at))
        .filter(execution::Column::Id.eq(id))
        .filter(execution::Column::Status.is_in(live()))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Per-node summaries of a live execution.
pub(crate) async fn set_nodes(db: &impl ConnectionTrait, id: &str, nodes: &str) -> Result<bool, DbErr> {
    let result = execution::Entity::update_many()
        .col_expr(execution::Column::Nodes, Expr::value(nodes))
        .filter(execution::Column::Id.eq(id))
        .filter(execution::Column::Status.is_in(live()))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Records how an execution ended, unless it had already ended.
pub(crate) async fn finish(
    db: &impl ConnectionTrait,
    id: &str,
    status: Status,
    now: DateTime<Utc>,
    outputs: &str,
    error: Option<String>,
    nodes: &str,
) -> Result<bool, DbErr> {
    let result = execution::Entity::update_many()
        .col_expr(execution::Column::Status, Expr::value(status.as_str()))
        .col_expr(execution::Column::FinishedAt, Expr::value(Some(now)))
        .col_expr(execution::Column::Outputs, Expr::value(outputs))
        .col_expr(execution::Column::Error, Expr::value(error))
        .col_expr(execution::Column::Nodes, Expr::value(nodes))
        .col_expr(execution::Column::PausedAt, Expr::value(""))
        .filter(execution::Column::Id.eq(id))
        .filter(execution::Column::Status.is_in(live()))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Cancels an execution nobody has started yet.
pub(crate) async fn cancel_queued(
    db: &impl ConnectionTrait,
    id: &str,
    now: DateTime<Utc>,
    error: &str,
) -> Result<bool, DbErr> {
    let result = execution::Entity::update_many()
        .col_expr(execution::Column::Status, Expr::value(Status::Cancelled.as_str()))
        .col_expr(execution::Column::FinishedAt, Expr::value(Some(now)))
        .col_expr(execution::Column::Error, Expr::value(Some(error.to_owned())))
        .filter(execution::Column::Id.eq(id))
        .filter(execution::Column::Status.eq(Status::Queued.as_str()))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

pub(crate) async fn save_recordings(
    db: &impl ConnectionTrait,
    id: &str,
    recorded: &BTreeMap<String, Vec<Value>>,
) -> Result<(), DbErr> {
    for (connection, messages) in recorded {
        let row = recording::ActiveModel {
            execution_id: Set(id.to_owned()),
            connection_id: Set(connection.clone()),
            messages: Set(Value::Array(messages.clone()).to_string()),
        };
        recording::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([recording::Column::ExecutionId, recording::Column::ConnectionId])
                    .update_column(recording::Column::Messages)
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

pub(crate) async fn recordings(
    db: &impl ConnectionTrait,
    id: &str,
) -> Result<HashMap<String, Vec<Value>>, DbErr> {
    let rows = recording::Entity::find().filter(recording::Column::ExecutionId.eq(id)).all(db).await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let messages = match serde_json::from_str(&r.messages) {
                Ok(Value::Array(items)) => items,
                _ => Vec::new(),
            };
            (r.connection_id, messages)
        })
        .collect())
}

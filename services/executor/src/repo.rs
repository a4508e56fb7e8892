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
    entity::{dead_letter, execution, recording},
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

/// Marks a queued (or, after its replica stopped, running) execution as running its
/// `attempt`, the one after the attempt it has: `false` when it has ended, another replica
/// has started a later attempt meanwhile, or a cancel is stored with it.
pub(crate) async fn start(
    db: &impl ConnectionTrait,
    id: &str,
    attempt: i32,
    runner: &str,
    now: DateTime<Utc>,
) -> Result<bool, DbErr> {
    let result = execution::Entity::update_many()
        .col_expr(execution::Column::Status, Expr::value(Status::Running.as_str()))
        .col_expr(execution::Column::Attempt, Expr::value(attempt))
        .col_expr(execution::Column::Runner, Expr::value(runner))
        .col_expr(execution::Column::StartedAt, Expr::value(Some(now)))
        .col_expr(execution::Column::PausedAt, Expr::value(""))
        .filter(execution::Column::Id.eq(id))
        .filter(execution::Column::Status.is_in(live()))
        .filter(execution::Column::Attempt.eq(attempt - 1))
        .filter(execution::Column::CancelRequested.is_null())
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Running ⇄ paused, while it is live and at `attempt`.
pub(crate) async fn set_live_status(
    db: &impl ConnectionTrait,
    id: &str,
    attempt: i32,
    status: Status,
    paused_at: &str,
) -> Result<bool, DbErr> {
    let result = execution::Entity::update_many()
        .col_expr(execution::Column::Status, Expr::value(status.as_str()))
        .col_expr(execution::Column::PausedAt, Expr::value(paused_at))
        .filter(execution::Column::Id.eq(id))
        .filter(execution::Column::Status.is_in(live()))
        .filter(execution::Column::Attempt.eq(attempt))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Per-node summaries of a live execution at `attempt`.
pub(crate) async fn set_nodes(
    db: &impl ConnectionTrait,
    id: &str,
    attempt: i32,
    nodes: &str,
) -> Result<bool, DbErr> {
    let result = execution::Entity::update_many()
        .col_expr(execution::Column::Nodes, Expr::value(nodes))
        .filter(execution::Column::Id.eq(id))
        .filter(execution::Column::Status.is_in(live()))
        .filter(execution::Column::Attempt.eq(attempt))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// How an execution ended.
#[derive(Debug, Clone)]
pub(crate) struct Ended {
    pub(crate) status: Status,
    pub(crate) at: DateTime<Utc>,
    pub(crate) outputs: String,
    pub(crate) error: Option<String>,
    pub(crate) nodes: String,
}

/// Records how an execution ended, if it is still live and at `attempt`: `false` when it had
/// ended, or another replica has taken it over (a later attempt).
pub(crate) async fn finish(
    db: &impl ConnectionTrait,
    id: &str,
    attempt: i32,
    ended: &Ended,
) -> Result<bool, DbErr> {
    let result = execution::Entity::update_many()
        .col_expr(execution::Column::Status, Expr::value(ended.status.as_str()))
        .col_expr(execution::Column::FinishedAt, Expr::value(Some(ended.at)))
        .col_expr(execution::Column::Outputs, Expr::value(ended.outputs.as_str()))
        .col_expr(execution::Column::Error, Expr::value(ended.error.clone()))
        .col_expr(execution::Column::Nodes, Expr::value(ended.nodes.as_str()))
        .col_expr(execution::Column::PausedAt, Expr::value(""))
        .filter(execution::Column::Id.eq(id))
        .filter(execution::Column::Status.is_in(live()))
        .filter(execution::Column::Attempt.eq(attempt))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Stores a cancel with a live execution (the first reason wins): `false` if it has ended.
pub(crate) async fn request_cancel(db: &impl ConnectionTrait, id: &str, reason: &str) -> Result<bool, DbErr> {
    let result = execution::Entity::update_many()
        .col_expr(execution::Column::CancelRequested, Expr::value(Some(reason.to_owned())))
        .filter(execution::Column::Id.eq(id))
        .filter(execution::Column::Status.is_in(live()))
        .filter(execution::Column::CancelRequested.is_null())
        .exec(db)
        .await?;
    if result.rows_affected == 1 {
        return Ok(true);
    }
    Ok(get(db, id).await?.is_some_and(|row| !Status::parse(&row.status).is_terminal()))
}

/// The cancels stored with any of `ids`: execution id → reason.
pub(crate) async fn cancels_requested(
    db: &impl ConnectionTrait,
    ids: &[String],
) -> Result<HashMap<String, String>, DbErr> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, Option<String>)> = execution::Entity::find()
        .select_only()
        .column(execution::Column::Id)
        .column(execution::Column::CancelRequested)
        .filter(execution::Column::Id.is_in(ids.iter().cloned()))
        .filter(execution::Column::CancelRequested.is_not_null())
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows.into_iter().filter_map(|(id, reason)| Some((id, reason?))).collect())
}

/// Notes why a delivery of an execution's job could not run it.
pub(crate) async fn note_failure(db: &impl ConnectionTrait, id: &str, error: &str) -> Result<(), DbErr> {
    execution::Entity::update_many()
        .col_expr(execution::Column::LastError, Expr::value(Some(error.to_owned())))
        .filter(execution::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

/// Stores a dead letter (once per execution).
pub(crate) async fn insert_dead_letter(
    db: &impl ConnectionTrait,
    row: dead_letter::Model,
) -> Result<(), DbErr> {
    dead_letter::Entity::insert(dead_letter::ActiveModel::from(row))
        .on_conflict(OnConflict::column(dead_letter::Column::ExecutionId).do_nothing().to_owned())
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// A page of dead letters, newest first, after the `(dead_at, execution id)` cursor.
pub(crate) async fn dead_letters(
    db: &impl ConnectionTrait,
    after: Option<(DateTime<Utc>, String)>,
    limit: u64,
) -> Result<Vec<dead_letter::Model>, DbErr> {
    let mut select = dead_letter::Entity::find()
        .order_by_desc(dead_letter::Column::DeadAt)
        .order_by_desc(dead_letter::Column::ExecutionId)
        .limit(limit);
    if let Some((at, id)) = after {
        select = select.filter(
            Condition::any().add(dead_letter::Column::DeadAt.lt(at)).add(
                Condition::all()
                    .add(dead_letter::Column::DeadAt.eq(at))
                    .add(dead_letter::Column::ExecutionId.lt(id)),
            ),
        );
    }
    select.all(db).await
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

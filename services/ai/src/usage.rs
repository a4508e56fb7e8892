//! Usage records and their totals.
//!
//! Every request to a provider leaves one record: who it was for (and which service made it
//! for them), the design, execution, node and conversation, the provider and model that
//! answered, the tokens (the provider's counts, or estimated here and marked so), the cost,
//! and how it ended (ok, failed, abandoned). Records are written by one task per replica in
//! batches (group commit), off the request's path; `flush` waits until everything recorded so
//! far is stored, and shutdown flushes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait as _, Condition, DatabaseConnection, EntityTrait as _, QueryFilter as _,
    QuerySelect as _, sea_query::Expr,
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    entity::usage_record,
    error::Error,
    model::{Attribution, Operation, Route, Tokens},
};

/// One request's usage, as recorded.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) who: Attribution,
    pub(crate) operation: Operation,
    pub(crate) route: Route,
    pub(crate) tokens: Tokens,
    pub(crate) cost_usd: f64,
    /// "ok", "failed" or "abandoned".
    pub(crate) outcome: &'static str,
    pub(crate) error: &'static str,
    pub(crate) duration: Duration,
    pub(crate) first_token: Option<Duration>,
}

enum Command {
    Record(Box<usage_record::ActiveModel>),
    Flush(oneshot::Sender<()>),
}

/// Records waiting to be written, at most.
const QUEUE: usize = 10_000;

/// How totals are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grouping {
    User,
    Design,
    Execution,
    Model,
}

/// Per period, or over the whole range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Period {
    All,
    Day,
    Month,
}

/// Which records to total.
#[derive(Debug, Clone, Default)]
pub(crate) struct Query {
    pub(crate) user_id: Option<String>,
    pub(crate) design_id: Option<String>,
    pub(crate) execution_id: Option<String>,
    pub(crate) start: Option<DateTime<Utc>>,
    pub(crate) end: Option<DateTime<Utc>>,
}

/// One total.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Total {
    pub(crate) key: String,
    /// The day or month, when totals are per period.
    pub(crate) period: String,
    pub(crate) requests: i64,
    pub(crate) prompt_tokens: i64,
    pub(crate) completion_tokens: i64,
    pub(crate) cost_usd: f64,
    pub(crate) estimated: bool,
}

/// The usage records of the service.
pub(crate) struct UsageStore {
    db: DatabaseConnection,
    commands: mpsc::Sender<Command>,
}

impl UsageStore {
    pub(crate) fn start(db: DatabaseConnection) -> Self {
        let (commands, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write(db.clone(), rx));
        Self { db, commands }
    }

    /// Queues a record (waits only when the queue is full).
    pub(crate) async fn record(&self, record: Record) {
        let now = Utc::now();
        let row = usage_record::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            created_at: Set(now),
            day: Set(now.format("%Y-%m-%d").to_string()),
            month: Set(now.format("%Y-%m").to_string()),
            user_id: Set(record.who.user_id),
            caller_id: Set(record.who.on_behalf_by),
            design_id: Set(record.who.design_id),
            execution_id: Set(record.who.execution_id),
            node_id: Set(record.who.node_id),
            conversation_id: Set(record.who.conversation_id),
            operation: Set(record.operation.as_str().to_owned()),
            provider: Set(record.route.provider),
            model: Set(record.route.model),
            prompt_tokens: Set(record.tokens.prompt as i64),
            completion_tokens: Set(record.tokens.completion as i64),
            cost_usd: Set(record.cost_usd),
            estimated: Set(record.tokens.estimated),
            outcome: Set(record.outcome.to_owned()),
            error: Set(record.error.to_owned()),
            duration_ms: Set(record.duration.as_millis() as i64),
            first_token_ms: Set(record.first_token.map(|d| d.as_millis() as i64)),
        };
        if self.commands.send(Command::Record(Box::new(row))).await.is_err() {
            tracing::error!("the usage writer has stopped; a usage record is lost");
        }
    }

    /// Waits until every record queued so far is stored.
    pub(crate) async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.commands.send(Command::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Totals of the records `query` selects, grouped, largest cost first.
    pub(crate) async fn totals(
        &self,
        query: &Query,
        grouping: Grouping,
        period: Period,
    ) -> Result<Vec<Total>, Error> {
        self.flush().await;
        use usage_record::Column as C;
        let mut condition = Condition::all();
        if let Some(user) = &query.user_id {
            condition = condition.add(C::UserId.eq(user.clone()));
        }
        if let Some(design) = &query.design_id {
            condition = condition.add(C::DesignId.eq(design.clone()));
        }
        if let Some(execution) = &query.execution_id {
            condition = condition.add(C::ExecutionId.eq(execution.clone()));
        }
        if let Some(start) = query.start {
            condition = condition.add(C::CreatedAt.gte(start));
        }
        if let Some(end) = query.end {
            condition = condition.add(C::CreatedAt.lt(end));
        }
        let key = match grouping {
            Grouping::User => Expr::col(C::UserId),
            Grouping::Design => Expr::col(C::DesignId),
            Grouping::Execution => Expr::col(C::ExecutionId),
            Grouping::Model => Expr::cust("provider || '/' || model"),
        };
        let period_column = match period {
            Period::All => Expr::cust("''"),
            Period::Day => Expr::col(C::Day),
            Period::Month => Expr::col(C::Month),
        };
        let mut select = usage_record::Entity::find()
            .select_only()
            .expr_as(key.clone(), "key")
            .expr_as(period_column.clone(), "period")
            .expr_as(Expr::cust("CAST(COUNT(*) AS BIGINT)"), "requests")
            .expr_as(Expr::cust("CAST(SUM(prompt_tokens) AS BIGINT)"), "prompt")
            .expr_as(Expr::cust("CAST(SUM(completion_tokens) AS BIGINT)"), "completion")
            .expr_as(Expr::cust("CAST(SUM(cost_usd) AS DOUBLE PRECISION)"), "cost")
            .expr_as(Expr::cust("CAST(MAX(CASE WHEN estimated THEN 1 ELSE 0 END) AS BIGINT)"), "estimated")
            .filter(condition)
            .group_by(key);
        if period != Period::All {
            select = select.group_by(period_column);
        }
        let rows: Vec<(String, String, i64, i64, i64, f64, i64)> = select.into_tuple().all(&self.db).await?;
        let mut totals: Vec<Total> = rows
            .into_iter()
            .map(|(key, period, requests, prompt_tokens, completion_tokens, cost_usd, estimated)| Total {
                key,
                period,
                requests,
                prompt_tokens,
                completion_tokens,
                cost_usd,
                estimated: estimated > 0,
            })
            .collect();
        totals.sort_by(|a, b| {
            b.cost_usd
                .total_cmp(&a.cost_usd)
                .then_with(|| a.period.cmp(&b.period))
                .then_with(|| a.key.cmp(&b.key))
        });
        Ok(totals)
    }
}

/// The writer: takes what is queued, writes it in one statement, then tells the flushers.
async fn write(db: DatabaseConnection, mut rx: mpsc::Receiver<Command>) {
    let mut batch = Vec::with_capacity(512);
    while rx.recv_many(&mut batch, 512).await > 0 {
        let mut rows = Vec::new();
        let mut flushed = Vec::new();
        for command in batch.drain(..) {
            match command {
                Command::Record(row) => rows.push(*row),
                Command::Flush(done) => flushed.push(done),
            }
        }
        if !rows.is_empty() {
            let mut attempt = 0;
            loop {
                match usage_record::Entity::insert_many(rows.clone()).exec_without_returning(&db).await {
                    Ok(_) => break,
                    Err(error) if attempt < 5 => {
                        attempt += 1;
                        tracing::warn!(%error, attempt, "cannot store usage records; trying again");
                        tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                    }
                    Err(error) => {
                        tracing::error!(%error, records = rows.len(), "usage records could not be stored");
                        break;
                    }
                }
            }
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

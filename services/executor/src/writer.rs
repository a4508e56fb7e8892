//! Group commit: the writes of many executions share transactions.
//!
//! A started execution costs a handful of single-row writes (stored, started, finished), and
//! hundreds of executions start every second. Committing each on its own makes every one wait
//! for its own commit (a WAL flush on PostgreSQL, the one write lock on SQLite). Instead, each
//! write goes to a lane — chosen by execution id, so one execution's writes stay in order — and
//! a lane commits everything that queued up while its previous transaction ran, in one
//! transaction. A caller's write is durable when its `write` returns, as before. Should a
//! batch fail, its writes are retried one by one, so one bad write fails alone.

use std::hash::{BuildHasher as _, RandomState};

use chrono::{DateTime, Utc};
use sea_orm::{DatabaseConnection, DbBackend, DbErr, TransactionTrait as _};
use tokio::sync::{mpsc, oneshot};

use crate::{entity::execution, repo, stored::Status};

/// One write; `write` answers whether it took effect (a row inserted or updated).
#[derive(Debug, Clone)]
pub(crate) enum Write {
    /// A new execution, unless one with its idempotency key exists.
    Insert(Box<execution::Model>),
    /// See [`repo::start`].
    Start { id: String, attempt: i32, at: DateTime<Utc> },
    /// See [`repo::set_live_status`].
    Live { id: String, status: Status, paused_at: String },
    /// See [`repo::set_nodes`].
    Nodes { id: String, nodes: String },
    /// See [`repo::finish`].
    Finish {
        id: String,
        status: Status,
        at: DateTime<Utc>,
        outputs: String,
        error: Option<String>,
        nodes: String,
    },
    /// See [`repo::cancel_queued`].
    CancelQueued { id: String, at: DateTime<Utc>, error: String },
}

impl Write {
    fn execution_id(&self) -> &str {
        match self {
            Write::Insert(row) => &row.id,
            Write::Start { id, .. }
            | Write::Live { id, .. }
            | Write::Nodes { id, .. }
            | Write::Finish { id, .. }
            | Write::CancelQueued { id, .. } => id,
        }
    }

    async fn apply(&self, db: &impl sea_orm::ConnectionTrait) -> Result<bool, DbErr> {
        match self {
            Write::Insert(row) => repo::insert(db, row.as_ref().clone()).await,
            Write::Start { id, attempt, at } => repo::start(db, id, *attempt, *at).await,
            Write::Live { id, status, paused_at } => repo::set_live_status(db, id, *status, paused_at).await,
            Write::Nodes { id, nodes } => repo::set_nodes(db, id, nodes).await,
            Write::Finish { id, status, at, outputs, error, nodes } => {
                repo::finish(db, id, *status, *at, outputs, error.clone(), nodes).await
            }
            Write::CancelQueued { id, at, error } => repo::cancel_queued(db, id, *at, error).await,
        }
    }
}

type Pending = (Write, oneshot::Sender<Result<bool, DbErr>>);

/// Most writes one transaction carries.
const BATCH: usize = 256;

/// The lanes of group commit.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    lanes: Vec<mpsc::Sender<Pending>>,
    hasher: RandomState,
}

impl Writer {
    /// Starts the lanes: several on PostgreSQL (transactions commit in parallel), one on
    /// SQLite (it has one writer anyway).
    pub(crate) fn start(db: DatabaseConnection) -> Self {
        let count = match db.get_database_backend() {
            DbBackend::Sqlite => 1,
            _ => 4,
        };
        let lanes = (0..count)
            .map(|_| {
                let (tx, rx) = mpsc::channel(4 * BATCH);
                tokio::spawn(lane(db.clone(), rx));
                tx
            })
            .collect();
        Self { lanes, hasher: RandomState::new() }
    }

    /// Commits `write` (with whatever else is queued in its lane).
    pub(crate) async fn write(&self, write: Write) -> Result<bool, DbErr> {
        let lane = (self.hasher.hash_one(write.execution_id()) % self.lanes.len() as u64) as usize;
        let (tx, rx) = oneshot::channel();
        let stopped = || DbErr::Custom("the executor is shutting down".into());
        self.lanes.get(lane).ok_or_else(stopped)?.send((write, tx)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn lane(db: DatabaseConnection, mut rx: mpsc::Receiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let size = batch.len();
        metrics::histogram!("csp_executor_write_batch_size").record(size as f64);
        let writes: Vec<&Write> = batch.iter().map(|(write, _)| write).collect();
        match commit(&db, &writes).await {
            Ok(outcomes) => {
                for ((_, reply), outcome) in batch.drain(..).zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) if size == 1 => {
                if let Some((_, reply)) = batch.pop() {
                    let _ = reply.send(Err(e));
                }
            }
            Err(_) => {
                // One bad write must not fail the others: each on its own.
                for (write, reply) in batch.drain(..) {
                    let outcome = commit(&db, &[&write]).await;
                    let _ = reply.send(outcome.map(|o| o.first().copied().unwrap_or(false)));
                }
            }
        }
    }
}

async fn commit(db: &DatabaseConnection, writes: &[&Write]) -> Result<Vec<bool>, DbErr> {
    let txn = db.begin().await?;
    let mut outcomes = Vec::with_capacity(writes.len());
    for write in writes {
        outcomes.push(write.apply(&txn).await?);
    }
    txn.commit().await?;
    Ok(outcomes)
}

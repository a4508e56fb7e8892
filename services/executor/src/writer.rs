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

use crate::{
    entity::execution,
    repo::{self, Ended},
    stored::Status,
};

/// One write; `write` answers whether it took effect (a row inserted or updated). Writes of
/// a running execution name the attempt that makes them: a replica whose execution was taken
/// over (a later attempt started) writes nothing more.
#[derive(Debug, Clone)]
pub(crate) enum Write {
    /// A new execution, unless one with its idempotency key exists.
    Insert(Box<execution::Model>),
    /// See [`repo::start`].
    Start { id: String, attempt: i32, runner: String, at: DateTime<Utc> },
    /// See [`repo::set_live_status`].
    Live { id: String, attempt: i32, status: Status, paused_at: String },
    /// See [`repo::set_nodes`].
    Nodes { id: String, attempt: i32, nodes: String },
    /// See [`repo::finish`].
    Finish { id: String, attempt: i32, ended: Box<Ended> },
    /// See [`repo::cancel_queued`].
    CancelQueued { id: String, at: DateTime<Utc>, error: String },
    /// See [`repo::request_cancel`].
    RequestCancel { id: String, reason: String },
}

impl Write {
    fn execution_id(&self) -> &str {
        match self {
            Write::Insert(row) => &row.id,
            Write::Start { id, .. }
            | Write::Live { id, .. }
            | Write::Nodes { id, .. }
            | Write::Finish { id, .. }
            | Write::CancelQueued { id, .. }
            | Write::RequestCancel { id, .. } => id,
        }
    }

    async fn apply(&self, db: &impl sea_orm::ConnectionTrait) -> Result<bool, DbErr> {
        match self {
            Write::Insert(row) => repo::insert(db, row.as_ref().clone()).await,
            Write::Start { id, attempt, runner, at } => repo::start(db, id, *attempt, runner, *at).await,
            Write::Live { id, attempt, status, paused_at } => {
                repo::set_live_status(db, id, *attempt, *status, paused_at).await
            }
            Write::Nodes { id, attempt, nodes } => repo::set_nodes(db, id, *attempt, nodes).await,
            Write::Finish { id, attempt, ended } => repo::finish(db, id, *attempt, ended).await,
            Write::CancelQueued { id, at, error } => repo::cancel_queued(db, id, *at, error).await,
            Write::RequestCancel { id, reason } => repo::request_cancel(db, id, reason).await,
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
    if let [only] = writes {
        // A statement is a transaction of its own: BEGIN and COMMIT would be two more round
        // trips for nothing.
        return Ok(vec![only.apply(db).await?]);
    }
    let txn = db.begin().await?;
    let mut outcomes = Vec::with_capacity(writes.len());
    for write in writes {
        outcomes.push(write.apply(&txn).await?);
    }
    txn.commit().await?;
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use csp_testkit::TestEnv;

    use super::*;

    fn row(id: &str, key: Option<&str>) -> execution::Model {
        execution::Model {
            id: id.into(),
            design_id: "d".into(),
            design_revision: 1,
            status: Status::Queued.as_str().into(),
            started_by: "alice".into(),
            created_at: Utc::now(),
            started_at: None,
            finished_at: None,
            inputs: "{}".into(),
            outputs: "{}".into(),
            error: None,
            nodes: "[]".into(),
            options: "{}".into(),
            plan: "{}".into(),
            attempt: 0,
            retry_of: None,
            retry_from: None,
            paused_at: String::new(),
            idempotency_key: key.map(Into::into),
            cancel_requested: None,
            last_error: None,
            runner: String::new(),
        }
    }

    fn finish(id: &str, attempt: i32, status: Status, error: Option<&str>) -> Write {
        let ended = Ended {
            status,
            at: Utc::now(),
            outputs: format!(r#"{{"out":["{id}"]}}"#),
            error: error.map(Into::into),
            nodes: "[]".into(),
        };
        Write::Finish { id: id.into(), attempt, ended: Box::new(ended) }
    }

    /// A batch of mixed writes — one execution written several times, a duplicate idempotency
    /// key, a start of an execution cancelled meanwhile — takes effect as the same writes one by
    /// one would, each told whether it did.
    async fn many_writes_in_one_batch_act_as_one_by_one(env: TestEnv) {
        let settings = env.settings();
        let db = csp_store::open::<crate::migration::Migrator>(&settings, crate::SERVICE).await.unwrap();
        let db = db.conn().clone();
        let now = Utc::now();
        let writes = vec![
            Write::Insert(Box::new(row("e1", Some("k1")))),
            Write::Insert(Box::new(row("e2", None))),
            Write::Insert(Box::new(row("e3", None))),
            Write::Insert(Box::new(row("e4", Some("k1")))),
            Write::CancelQueued { id: "e3".into(), at: now, error: "cancelled".into() },
            Write::Start { id: "e1".into(), attempt: 1, runner: "r".into(), at: now },
            Write::Start { id: "e2".into(), attempt: 1, runner: "r".into(), at: now },
            Write::Start { id: "e3".into(), attempt: 1, runner: "r".into(), at: now },
            finish("e1", 1, Status::Succeeded, None),
            finish("e2", 1, Status::Failed, Some("broke")),
            finish("e3", 1, Status::Succeeded, None),
        ];
        let batch: Vec<&Write> = writes.iter().collect();
        let outcomes = commit(&db, &batch).await.unwrap();
        assert_eq!(outcomes, [true, true, true, false, true, true, true, false, true, true, false]);

        let e1 = repo::get(&db, "e1").await.unwrap().unwrap();
        assert_eq!((e1.status.as_str(), e1.attempt, e1.error), ("succeeded", 1, None));
        assert!(e1.started_at.is_some() && e1.finished_at.is_some());
        assert_eq!(e1.outputs, r#"{"out":["e1"]}"#);
        let e2 = repo::get(&db, "e2").await.unwrap().unwrap();
        assert_eq!((e2.status.as_str(), e2.attempt, e2.error.as_deref()), ("failed", 1, Some("broke")));
        let e3 = repo::get(&db, "e3").await.unwrap().unwrap();
        assert_eq!((e3.status.as_str(), e3.attempt, e3.outputs.as_str()), ("cancelled", 0, "{}"));
        assert!(repo::get(&db, "e4").await.unwrap().is_none(), "the second use of a key is refused");

        // Through the lanes, concurrently: every write answered, every row as written.
        let writer = Writer::start(db.clone());
        let ids: Vec<String> = (0..200).map(|i| format!("x{i:03}")).collect();
        let runs = ids.iter().map(|id| {
            let writer = writer.clone();
            async move {
                let inserted = writer.write(Write::Insert(Box::new(row(id, None)))).await.unwrap();
                let started = writer
                    .write(Write::Start { id: id.clone(), attempt: 1, runner: "r".into(), at: now })
                    .await
                    .unwrap();
                let finished = writer.write(finish(id, 1, Status::Succeeded, None)).await.unwrap();
                (inserted, started, finished)
            }
        });
        let answers = futures::future::join_all(runs).await;
        assert!(answers.iter().all(|&a| a == (true, true, true)));
        for id in &ids {
            let row = repo::get(&db, id).await.unwrap().unwrap();
            assert_eq!((row.status.as_str(), row.outputs), ("succeeded", format!(r#"{{"out":["{id}"]}}"#)));
        }
    }

    /// Writes are fenced by attempt: once a later attempt has started (another replica took
    /// the execution over), the earlier attempt's progress and finish take no effect; a cancel
    /// stored with a queued execution keeps it from starting.
    async fn writes_of_a_superseded_attempt_take_no_effect(env: TestEnv) {
        let settings = env.settings();
        let db = csp_store::open::<crate::migration::Migrator>(&settings, crate::SERVICE).await.unwrap();
        let writer = Writer::start(db.conn().clone());
        let now = Utc::now();
        let write = |w: Write| {
            let writer = writer.clone();
            async move { writer.write(w).await.unwrap() }
        };
        assert!(write(Write::Insert(Box::new(row("run", None)))).await);
        assert!(write(Write::Start { id: "run".into(), attempt: 1, runner: "r".into(), at: now }).await);
        assert!(
            !write(Write::Start { id: "run".into(), attempt: 1, runner: "r".into(), at: now }).await,
            "attempt 1 started once"
        );
        assert!(write(Write::Nodes { id: "run".into(), attempt: 1, nodes: "[1]".into() }).await);
        // Taken over: attempt 2.
        assert!(write(Write::Start { id: "run".into(), attempt: 2, runner: "r".into(), at: now }).await);
        let stale =
            Write::Live { id: "run".into(), attempt: 1, status: Status::Paused, paused_at: "n".into() };
        assert!(!write(stale).await);
        assert!(!write(Write::Nodes { id: "run".into(), attempt: 1, nodes: "[\"stale\"]".into() }).await);
        assert!(!write(finish("run", 1, Status::Succeeded, None)).await, "the old owner cannot finish it");
        assert!(write(finish("run", 2, Status::Failed, Some("second"))).await);
        assert!(!write(finish("run", 2, Status::Succeeded, None)).await, "it ends once");
        let row = repo::get(db.conn(), "run").await.unwrap().unwrap();
        assert_eq!((row.status.as_str(), row.attempt, row.nodes.as_str()), ("failed", 2, "[]"));

        assert!(write(Write::Insert(Box::new(super::tests::row("asked", None)))).await);
        assert!(write(Write::RequestCancel { id: "asked".into(), reason: "by ada".into() }).await);
        assert!(
            !write(Write::Start { id: "asked".into(), attempt: 1, runner: "r".into(), at: now }).await,
            "cancelled: never started"
        );
        let cancels = repo::cancels_requested(db.conn(), &["asked".into(), "run".into()]).await.unwrap();
        assert_eq!(cancels.into_iter().collect::<Vec<_>>(), [("asked".to_owned(), "by ada".to_owned())]);
        assert!(
            !write(Write::RequestCancel { id: "run".into(), reason: "late".into() }).await,
            "it has ended"
        );
    }

    csp_testkit::backend_tests!(
        many_writes_in_one_batch_act_as_one_by_one,
        writes_of_a_superseded_attempt_take_no_effect
    );
}

//! Recording a run: its events on the bus, its state and outcome in the database.
//!
//! Every write names the run's attempt and takes effect only while that attempt is the
//! execution's current one; every publication is made on condition that this replica still
//! holds the job. The final status is published — sealing the execution's stream — counted,
//! and the job acknowledged, only when the final write took effect.

use std::{collections::BTreeMap, time::Duration};

use csp_bus::BusError;
use csp_proto::executor::v1 as pb;
use pb::execution_event::Kind as Event;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{
    Executor, Run, Stop,
    events::{Subject, status_changed},
    lock, now,
};
use crate::{
    entity::execution,
    error::Error,
    repo::{self, Ended},
    runtime::{Ending, Outcome},
    stored::{Status, StoredFailure, StoredNode},
    writer::Write,
};

/// How long a run retries a publication while the bus is unavailable before it gives up on it
/// (the final status is then published by whichever replica claims the job next).
const PUBLISH_PATIENCE: Duration = Duration::from_secs(60);
/// How long a run retries a write while the database is unavailable.
const WRITE_PATIENCE: Duration = Duration::from_secs(60);
/// The same, for an RPC that ends an execution nobody runs (a cancel of a queued one).
const CALLER_PATIENCE: Duration = Duration::from_secs(3);

fn patience(run: Option<&Run>, of_a_run: Duration) -> Duration {
    if run.is_some() { of_a_run } else { CALLER_PATIENCE }
}

/// Whether an outcome was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// The final write took effect (its status published, unless the bus stayed away).
    Ended,
    /// Another replica has taken the execution over, or it had ended: nothing was written.
    Fenced,
}

fn fenced(what: &'static str) {
    metrics::counter!("csp_executor_fenced_writes_total", "write" => what).increment(1);
}

/// Retry delays: 50 ms doubling to 2 s.
fn backoff(tries: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << tries.min(6))).min(Duration::from_secs(2))
}

impl Executor {
    /// Publishes events of a run in one bus call, while it holds its job; retries while the
    /// bus is unavailable (a run publishing nothing holds its network back). `false` when
    /// the run lost its job (it is then stopped) or has been silenced.
    pub(super) async fn publish(&self, run: &Run, who: &Subject, kinds: Vec<Event>) -> bool {
        let started = std::time::Instant::now();
        let mut tries = 0;
        loop {
            if run.silenced() {
                return false;
            }
            let appends = who.appends(kinds.clone(), self.events_kept());
            match self.bus.append_held(&run.holder, appends).await {
                Ok(_) => return true,
                Err(BusError::NotHeld { .. } | BusError::Sealed { .. }) => {
                    tracing::warn!(execution_id = %run.id, "another replica has taken this execution over; stopping it here");
                    metrics::counter!("csp_executor_lease_expiries_total").increment(1);
                    fenced("publish");
                    run.stop(Stop::Lost);
                    return false;
                }
                Err(e) if started.elapsed() < PUBLISH_PATIENCE => {
                    if tries == 0 {
                        tracing::warn!(execution_id = %run.id, error = %e, "cannot publish execution events; retrying");
                    }
                    tokio::time::sleep(backoff(tries)).await;
                    tries += 1;
                }
                Err(e) => {
                    tracing::error!(execution_id = %run.id, error = %e, "gave up publishing execution events");
                    return false;
                }
            }
        }
    }

    /// Publishes a running execution's events, and keeps its row in step (paused, metrics).
    /// Events that arrive together are published together, in one bus call; the row is
    /// updated first, so a client seeing an event reads a row at least as new. A fenced write
    /// or a refused publication stops the run: it was taken over.
    pub(super) async fn pump(
        &self,
        run: &Run,
        who: Subject,
        attempt: i32,
        mut events: mpsc::Receiver<Event>,
    ) {
        const BATCH: usize = 256;
        let id = who.id.clone();
        let mut batch = Vec::with_capacity(BATCH);
        // The live status the row has: running since the start was written.
        let mut stored_live = (Status::Running, String::new());
        while events.recv_many(&mut batch, BATCH).await > 0 {
            if run.silenced() {
                // Drained without a word: the network is stopping.
                batch.clear();
                continue;
            }
            let mut live = None;
            let mut snapshot = None;
            for kind in &batch {
                match kind {
                    Event::BreakpointHit(hit) => live = Some((Status::Paused, hit.node_id.as_str())),
                    Event::StatusChanged(s) if s.status == pb::ExecutionStatus::Running as i32 => {
                        live = Some((Status::Running, ""));
                    }
                    Event::Metrics(m) => snapshot = Some(m),
                    _ => {}
                }
            }
            let mut writes = Vec::new();
            if let Some(snapshot) = snapshot {
                let nodes: Vec<StoredNode> = snapshot.nodes.iter().map(StoredNode::of).collect();
                let nodes = serde_json::to_string(&nodes).unwrap_or_default();
                writes.push(Write::Nodes { id: id.clone(), attempt, nodes });
            }
            if let Some((status, paused_at)) = live
                && (status, paused_at) != (stored_live.0, stored_live.1.as_str())
            {
                stored_live = (status, paused_at.to_owned());
                writes.push(Write::Live { id: id.clone(), attempt, status, paused_at: paused_at.to_owned() });
            }
            for write in writes {
                match self.writer.write(write).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(execution_id = %id, attempt, "the execution was taken over by another replica; stopping it here");
                        fenced("progress");
                        run.stop(Stop::Lost);
                    }
                    Err(e) => {
                        tracing::warn!(execution_id = %id, error = %e, "cannot store the execution's state")
                    }
                }
            }
            let kinds = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            self.publish(run, &who, kinds).await;
        }
    }

    /// Records how a run ended.
    pub(super) async fn record(
        &self,
        run: &Run,
        who: &Subject,
        attempt: i32,
        outcome: Outcome,
        carried: BTreeMap<String, Vec<Value>>,
    ) -> Result<Recorded, Error> {
        let status = match outcome.ending {
            Ending::Succeeded => Status::Succeeded,
            Ending::Failed => Status::Failed,
            Ending::Cancelled => Status::Cancelled,
            Ending::Deadlocked => Status::Deadlocked,
        };
        let mut error = outcome.error.clone();
        if let (Some(e), Some(Stop::Cancelled(reason))) = (error.as_mut(), run.stopped()) {
            e.message = reason;
        }
        let mut outputs = carried;
        outputs.extend(outcome.outputs.clone());
        let nodes: Vec<StoredNode> = outcome.nodes.iter().map(StoredNode::of).collect();
        if !outcome.recorded.is_empty() {
            let started = std::time::Instant::now();
            let mut tries = 0;
            while let Err(e) = repo::save_recordings(&self.db, &who.id, &outcome.recorded).await {
                if started.elapsed() >= WRITE_PATIENCE || run.silenced() {
                    return Err(e.into());
                }
                tokio::time::sleep(backoff(tries)).await;
                tries += 1;
            }
        }
        let ended = Ended {
            status,
            at: now(),
            outputs: serde_json::to_string(&outputs).unwrap_or_else(|_| "{}".into()),
            error: error.as_ref().map(|e| serde_json::to_string(&StoredFailure::of(e)).unwrap_or_default()),
            nodes: serde_json::to_string(&nodes).unwrap_or_else(|_| "[]".into()),
        };
        self.conclude(Some(run), who, attempt, ended, error).await
    }

    /// Ends an execution at `attempt`. Only if that write takes effect is the end counted, its
    /// final status published (by the holder of its job, when `run` is given) and the job
    /// acknowledged. The write is retried while the database is unavailable.
    pub(super) async fn conclude(
        &self,
        run: Option<&Run>,
        who: &Subject,
        attempt: i32,
        ended: Ended,
        error: Option<pb::ExecutionError>,
    ) -> Result<Recorded, Error> {
        let status = ended.status;
        let write = Write::Finish { id: who.id.clone(), attempt, ended: Box::new(ended) };
        let started = std::time::Instant::now();
        let mut tries = 0;
        let took_effect = loop {
            match self.writer.write(write.clone()).await {
                Ok(took_effect) => break took_effect,
                Err(e)
                    if started.elapsed() < patience(run, WRITE_PATIENCE)
                        && !run.is_some_and(Run::silenced) =>
                {
                    if tries == 0 {
                        tracing::warn!(execution_id = %who.id, error = %e, "cannot record how the execution ended; retrying");
                    }
                    tokio::time::sleep(backoff(tries)).await;
                    tries += 1;
                }
                Err(e) => return Err(e.into()),
            }
        };
        lock(&self.credentials).remove(&who.id);
        if !took_effect {
            tracing::warn!(execution_id = %who.id, attempt, "not recording an end: the execution was taken over or had ended");
            fenced("finish");
            if let Some(run) = run {
                run.stop(Stop::Lost);
            }
            return Ok(Recorded::Fenced);
        }
        metrics::counter!("csp_executor_executions_total", "status" => status.as_str()).increment(1);
        self.publish_final(run, who, status, error).await;
        Ok(Recorded::Ended)
    }

    /// Publishes an execution's final status (sealing its stream), then acknowledges its job
    /// when `run` holds it. A stream sealed already keeps its one final status.
    pub(super) async fn publish_final(
        &self,
        run: Option<&Run>,
        who: &Subject,
        status: Status,
        error: Option<pb::ExecutionError>,
    ) {
        let kinds = vec![status_changed(status, error)];
        let started = std::time::Instant::now();
        let mut tries = 0;
        loop {
            let appends = who.appends(kinds.clone(), self.events_kept());
            let published = match run {
                Some(run) => self.bus.append_held(&run.holder, appends).await,
                None => self.bus.append_many(appends).await,
            };
            match published {
                Ok(_) | Err(BusError::Sealed { .. }) => break,
                Err(BusError::NotHeld { .. }) => {
                    // Taken over after the end was written: whoever holds the job now finds
                    // the execution ended and publishes its final status.
                    return;
                }
                Err(e) if started.elapsed() < patience(run, PUBLISH_PATIENCE) => {
                    if tries == 0 {
                        tracing::warn!(execution_id = %who.id, error = %e, "cannot publish the final status; retrying");
                    }
                    tokio::time::sleep(backoff(tries)).await;
                    tries += 1;
                }
                Err(e) => {
                    // Left unacknowledged: the replica that claims the job publishes it.
                    tracing::error!(execution_id = %who.id, error = %e, "gave up publishing the final status");
                    return;
                }
            }
        }
        if let Some(run) = run {
            self.ack(run).await;
        }
    }

    /// Publishes the final status of an execution that has ended (its replica stopped before
    /// it could), unless its stream has it already, and acknowledges the job.
    pub(super) async fn republish(&self, run: &Run, row: &execution::Model) {
        let status = Status::parse(&row.status);
        let error = row
            .error
            .as_deref()
            .and_then(|e| serde_json::from_str::<StoredFailure>(e).ok())
            .map(|f| f.to_pb());
        self.publish_final(Some(run), &Subject::of(row), status, error).await;
    }

    /// Acknowledges a run's job, if this replica still holds it.
    pub(super) async fn ack(&self, run: &Run) {
        run.mark_done();
        let started = std::time::Instant::now();
        let mut tries = 0;
        loop {
            match self.bus.ack_held(super::JOBS, super::GROUP, &self.me, &[run.job()]).await {
                Ok(_) => return,
                Err(e) if started.elapsed() < PUBLISH_PATIENCE => {
                    if tries == 0 {
                        tracing::warn!(execution_id = %run.id, error = %e, "cannot acknowledge the job; retrying");
                    }
                    tokio::time::sleep(backoff(tries)).await;
                    tries += 1;
                }
                Err(e) => {
                    tracing::error!(execution_id = %run.id, error = %e, "gave up acknowledging the job");
                    return;
                }
            }
        }
    }
}

//! The worker: takes jobs from the queue and runs their executions; gives up poison jobs;
//! drains on shutdown.
//!
//! A job is delivered at least once, and again when the replica running it stops renewing it
//! (it died, was paused past its lease, or lost the bus): the next replica starts the next
//! attempt, which fences every write of the earlier one. A job delivered
//! `executor.max_deliveries` times without an outcome ends FAILED and is dead-lettered.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use csp_bus::{Delivery, GroupStart};
use csp_proto::executor::v1 as pb;
use pb::execution_event::Kind as Event;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tracing::Instrument as _;

use super::{
    CONTROL, Executor, GROUP, JOBS, Run, Stop,
    events::{Subject, holder, status_changed},
    lock, now,
    recording::Recorded,
};
use crate::{
    clients::Ai,
    entity::{dead_letter, execution},
    error::Error,
    repo::{self, Ended},
    runtime::{Debugger, Network, Plan, Services},
    stored::{Status, StoredFailure, StoredOptions},
    writer::Write,
};

/// What became of a job this replica took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    /// Its execution ended (here, or before) and the job was acknowledged.
    Finished,
    /// Another replica took it over.
    Lost,
    /// Stopped by the drain: the job goes back to the queue.
    HandedBack,
}

impl From<Recorded> for Done {
    fn from(recorded: Recorded) -> Self {
        match recorded {
            Recorded::Ended => Done::Finished,
            Recorded::Fenced => Done::Lost,
        }
    }
}

/// The longest error kept as a job's last one.
const MAX_ERROR_CHARS: usize = 1000;

impl Executor {
    /// Starts reading jobs, claiming those of stopped replicas, renewing leases, following
    /// control commands and keeping the queue (metrics, compaction).
    pub(crate) async fn spawn_workers(self: &Arc<Self>) -> Result<(), Error> {
        describe_metrics();
        super::alerts::register(self);
        self.bus.create_group(JOBS, GROUP, GroupStart::Beginning).await?;
        let control = self.bus.tail(CONTROL, None).await?;
        tokio::spawn(self.clone().take_jobs());
        let this = self.clone();
        tokio::spawn(async move { this.renew_leases().await });
        let this = self.clone();
        tokio::spawn(async move { this.follow_commands(control).await });
        tokio::spawn(self.clone().keep_queue());
        Ok(())
    }

    /// Stops taking jobs and every background task at once (the runs in progress go on).
    pub(crate) fn stop_workers(&self) {
        self.taking.cancel();
        self.workers.cancel();
    }

    /// Stops the replica gracefully: it takes no more jobs; running executions may finish
    /// within `executor.drain_timeout`; the rest are stopped and their jobs handed back, for
    /// another replica to claim at once.
    pub(crate) async fn drain(&self) {
        self.taking.cancel();
        metrics::counter!("csp_executor_drains_total").increment(1);
        let deadline = Instant::now() + self.settings.executor.drain_timeout;
        let running = lock(&self.running).len();
        if running > 0 {
            tracing::info!(running, "draining: letting running executions finish");
        }
        while !lock(&self.running).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rest: Vec<Arc<Run>> = lock(&self.running).values().cloned().collect();
        if !rest.is_empty() {
            tracing::warn!(
                handed_back = rest.len(),
                "executions still running after the drain timeout: handing them back to the other replicas"
            );
            metrics::counter!("csp_executor_handed_back_total").increment(rest.len() as u64);
            for run in &rest {
                run.stop(Stop::HandedBack);
            }
        }
        self.runs.close();
        if tokio::time::timeout(Duration::from_secs(10), self.runs.wait()).await.is_err() {
            // Networks that would not stop: their jobs go back anyway.
            let stuck: Vec<Arc<Run>> = lock(&self.running).values().cloned().collect();
            for run in stuck {
                self.hand_back(&run).await;
            }
            self.announce_handback().await;
        }
        self.workers.cancel();
    }

    /// Takes as many jobs at once as there are free slots: first those whose replica stopped
    /// renewing them (every half lease, or at once when jobs were handed back), then new ones.
    async fn take_jobs(self: Arc<Self>) {
        let lease = self.settings.executor.lease;
        let mut claimed_at = Instant::now();
        loop {
            if self.taking.is_cancelled() {
                return;
            }
            let first = tokio::select! {
                biased;
                () = self.taking.cancelled() => return,
                permit = self.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let mut permits = vec![first];
            while let Ok(more) = self.slots.clone().try_acquire_owned() {
                permits.push(more);
            }
            if claimed_at.elapsed() >= lease / 2 || self.claim_soon.swap(false, Ordering::Relaxed) {
                claimed_at = Instant::now();
                match self.bus.claim_idle(JOBS, GROUP, &self.me, lease, permits.len()).await {
                    Ok(jobs) => {
                        for job in jobs {
                            let Some(permit) = permits.pop() else { break };
                            tracing::warn!(job = %job.event.id, deliveries = job.deliveries, "took over an execution whose replica stopped");
                            metrics::counter!("csp_executor_job_claims_total").increment(1);
                            self.takeovers.fetch_add(1, Ordering::Relaxed);
                            self.dispatch(job, permit);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot claim abandoned executions"),
                }
                if permits.is_empty() {
                    continue;
                }
            }
            let wait = (lease / 2).min(Duration::from_secs(2));
            match self.bus.read_group(JOBS, GROUP, &self.me, permits.len(), wait).await {
                Ok(jobs) => {
                    for (job, permit) in jobs.into_iter().zip(permits.drain(..)) {
                        self.dispatch(job, permit);
                    }
                }
                Err(e) => {
                    drop(permits);
                    tracing::warn!(error = %e, "cannot read the job queue");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = self.taking.cancelled() => return,
                    }
                    if matches!(e, csp_bus::BusError::NoGroup { .. })
                        && let Err(e) = self.bus.create_group(JOBS, GROUP, GroupStart::Beginning).await
                    {
                        tracing::warn!(error = %e, "cannot create the job queue's consumer group");
                    }
                }
            }
        }
    }

    fn dispatch(self: &Arc<Self>, job: Delivery, permit: OwnedSemaphorePermit) {
        metrics::counter!("csp_executor_job_deliveries_total").increment(1);
        if self.taking.is_cancelled() {
            // Delivered as the replica began to stop: straight back to the queue.
            let this = self.clone();
            tokio::spawn(async move {
                let _ = this.bus.release(JOBS, GROUP, &this.me, &[job.event.id]).await;
                this.announce_handback().await;
                drop(permit);
            });
            return;
        }
        self.runs.spawn(self.clone().run_job(job, permit));
    }

    async fn run_job(self: Arc<Self>, job: Delivery, _permit: OwnedSemaphorePermit) {
        let id = String::from_utf8_lossy(&job.event.payload).into_owned();
        let run = Run::new(id.clone(), holder(job.event.id, &self.me));
        {
            let mut running = lock(&self.running);
            if running.contains_key(&id) {
                // Its own job claimed back after a lapse (the bus was away): the run here goes on.
                return;
            }
            running.insert(id.clone(), run.clone());
            metrics::gauge!("csp_executor_running").set(running.len() as f64);
        }
        let span = tracing::info_span!("execution", execution_id = %id, attempt = tracing::field::Empty);
        job.event.follow_trace(&span);
        // The database or the bus away: wait for it, holding the job (it is no fault of the
        // job's, so it costs no delivery).
        let mut tries = 0u32;
        let done = loop {
            match self.clone().execute(&run, job.deliveries).instrument(span.clone()).await {
                Err(e) if e.is_transient() && !run.silenced() => {
                    if tries == 0 {
                        tracing::warn!(execution_id = %id, error = %e, "cannot run the execution yet; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(100u64 << tries.min(4))).await;
                    tries += 1;
                }
                done => break done,
            }
        };
        match done {
            Ok(Done::Finished | Done::Lost) => {}
            Ok(Done::HandedBack) => {
                let line = Event::Log(pb::LogLine {
                    node_id: String::new(),
                    level: "warn".into(),
                    message: format!(
                        "{} is stopping: the execution goes to another replica, which runs it again from the start",
                        self.me
                    ),
                    data: None,
                });
                let who = lock(&run.subject).clone();
                if let Some(who) = who {
                    let appends = who.appends(vec![line], self.events_kept());
                    let _ = self.bus.append_held(&run.holder, appends).await;
                }
                self.hand_back(&run).await;
                self.announce_handback().await;
            }
            Err(e) => self.failed_delivery(&run, job.deliveries, &e).await,
        }
        let mut running = lock(&self.running);
        running.remove(&id);
        metrics::gauge!("csp_executor_running").set(running.len() as f64);
    }

    /// Runs a delivered job's execution, from its start to its recorded end.
    async fn execute(self: Arc<Self>, run: &Arc<Run>, deliveries: u64) -> Result<Done, Error> {
        if deliveries > self.settings.executor.max_deliveries {
            return self.give_up(run, deliveries, None).await;
        }
        // Only a first delivery may trust the row kept at the start: a job delivered again ran
        // (somewhere) since, and the database knows its attempts.
        let here = lock(&self.queued_here).remove(&run.id).filter(|_| deliveries <= 1);
        let (mut row, mut plan) = match here {
            Some((row, plan, _)) => (row, Some(plan)),
            None => match repo::get(&self.db, &run.id).await? {
                Some(row) => (row, None),
                None => {
                    self.ack(run).await;
                    return Ok(Done::Finished);
                }
            },
        };
        let mut tries = 0;
        let (attempt, plan, stored) = loop {
            if Status::parse(&row.status).is_terminal() {
                // Ended while its job changed hands: make sure its stream says so.
                self.republish(run, &row).await;
                return Ok(Done::Finished);
            }
            if let Some(reason) = row.cancel_requested.clone() {
                return Ok(self.cancel_unrun(run, &row, reason).await?.into());
            }
            let plan = match plan.take() {
                Some(plan) => plan,
                None => Arc::new(
                    serde_json::from_str::<Plan>(&row.plan)
                        .map_err(|e| Error::Internal(format!("the stored plan cannot be read: {e}")))?,
                ),
            };
            let stored: StoredOptions = serde_json::from_str(&row.options)
                .map_err(|e| Error::Internal(format!("the stored options cannot be read: {e}")))?;
            let attempt = row.attempt + 1;
            let start = Write::Start { id: run.id.clone(), attempt, runner: self.me.clone(), at: now() };
            if self.writer.write(start).await? {
                break (attempt, plan, stored);
            }
            // Ended, cancelled, or started by another replica since it was read: look again,
            // if the job is still this replica's.
            metrics::counter!("csp_executor_fenced_writes_total", "write" => "start").increment(1);
            if !self.holds(run).await? {
                run.stop(Stop::Lost);
                return Ok(Done::Lost);
            }
            tries += 1;
            if tries >= 3 {
                return Err(Error::Internal("the execution kept changing while it was being started".into()));
            }
            row = repo::get(&self.db, &run.id)
                .await?
                .ok_or_else(|| Error::Internal("the execution vanished".into()))?;
        };
        tracing::Span::current().record("attempt", attempt);
        let who = Subject::of(&row);
        *lock(&run.subject) = Some(who.clone());

        // The run's first events go out with the network's first ones, in one bus call.
        let (tx, mut rx) = mpsc::channel(4096);
        if attempt > 1 {
            let message = if row.runner == self.me || row.runner.is_empty() {
                format!("attempt {attempt}: {} runs it again from the start", self.me)
            } else {
                format!(
                    "attempt {attempt}: {} stopped before it ended; {} runs it again from the start",
                    row.runner, self.me
                )
            };
            let _ = tx.try_send(Event::Log(pb::LogLine {
                node_id: String::new(),
                level: "warn".into(),
                message,
                data: None,
            }));
        }
        let _ = tx.try_send(status_changed(Status::Running, None));
        metrics::counter!("csp_executor_executions_total", "status" => "running").increment(1);

        let mut options = stored.to_runtime(&self.settings.executor);
        options.inputs = serde_json::from_str(&row.inputs).unwrap_or_default();
        options.shards = Some(self.shards.clone());
        let mut carried = BTreeMap::new();
        if let (Some(old), Some(from)) = (&row.retry_of, &row.retry_from) {
            let (replay, outputs) = self.replay_for(old, from, &plan).await?;
            options.replay = replay;
            carried = outputs;
        }
        let credentials = lock(&self.credentials).get(&run.id).map(|(c, _)| c.clone()).unwrap_or_default();
        let ai = Ai::new(&self.settings, self.login.clone(), credentials, &row)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let services = Services {
            ai: Some(Arc::new(ai)),
            execution_id: run.id.clone(),
            traceparent: current_traceparent(),
        };
        let debugger = Debugger::new(stored.breakpoints.clone());
        let _ = run.debugger.set(debugger.clone());
        let network = match Network::build(&plan, options, services, debugger, tx) {
            Ok(network) => network,
            Err(problems) => {
                let mut early = Vec::new();
                while let Ok(event) = rx.try_recv() {
                    early.push(event);
                }
                self.publish(run, &who, early).await;
                let listed: Vec<String> = problems.iter().map(ToString::to_string).collect();
                let failure = StoredFailure {
                    code: "invalid_design".into(),
                    message: format!("the design cannot run: {}", listed.join("; ")),
                    ..Default::default()
                };
                let ended = ended(Status::Failed, "{}", &failure, &row.nodes);
                return Ok(self
                    .conclude(Some(run), &who, attempt, ended, Some(failure.to_pb()))
                    .await?
                    .into());
            }
        };
        // In the execution's span: every event it publishes carries the execution's trace.
        let pump = {
            let (this, run, who) = (self.clone(), run.clone(), who.clone());
            tokio::spawn(async move { this.pump(&run, who, attempt, rx).await }.in_current_span())
        };
        let outcome = network.run(run.network.clone()).await;
        let _ = pump.await;
        match run.stopped() {
            Some(Stop::Lost) => return Ok(Done::Lost),
            Some(Stop::HandedBack) => return Ok(Done::HandedBack),
            _ => {}
        }
        Ok(self.record(run, &who, attempt, outcome, carried).await?.into())
    }

    /// Ends CANCELLED, without running it, an execution whose cancel came while it was queued
    /// or changing hands.
    async fn cancel_unrun(
        &self,
        run: &Run,
        row: &execution::Model,
        reason: String,
    ) -> Result<Recorded, Error> {
        let failure = StoredFailure { code: "cancelled".into(), message: reason, ..Default::default() };
        let ended = ended(Status::Cancelled, &row.outputs, &failure, &row.nodes);
        self.conclude(Some(run), &Subject::of(row), row.attempt, ended, Some(failure.to_pb())).await
    }

    /// A delivery that could not run its execution: the reason is noted, and the job goes back
    /// to the queue after a pause — or, delivered `executor.max_deliveries` times, is given up.
    async fn failed_delivery(&self, run: &Arc<Run>, deliveries: u64, error: &Error) {
        let reason: String = error.to_string().chars().take(MAX_ERROR_CHARS).collect();
        tracing::error!(execution_id = %run.id, deliveries, error = %reason, "the execution could not be run");
        if let Err(e) = repo::note_failure(&self.db, &run.id, &reason).await {
            tracing::warn!(execution_id = %run.id, error = %e, "cannot note why the execution could not be run");
        }
        if deliveries >= self.settings.executor.max_deliveries {
            if let Err(e) = self.give_up(run, deliveries, Some(reason)).await {
                tracing::error!(execution_id = %run.id, error = %e, "cannot give the job up; it is delivered again after the lease");
            }
            return;
        }
        let pause = Duration::from_millis(250u64 << (deliveries.clamp(1, 8) - 1))
            .min(self.settings.executor.lease / 3);
        tokio::time::sleep(pause).await;
        self.hand_back(run).await;
        self.announce_handback().await;
    }

    /// Gives a job up: its execution ends FAILED naming the cause, the job is acknowledged,
    /// and a dead letter keeps it for admins.
    async fn give_up(&self, run: &Run, deliveries: u64, last_error: Option<String>) -> Result<Done, Error> {
        let Some(row) = repo::get(&self.db, &run.id).await? else {
            self.ack(run).await;
            return Ok(Done::Finished);
        };
        if Status::parse(&row.status).is_terminal() {
            self.republish(run, &row).await;
            return Ok(Done::Finished);
        }
        let last = last_error.or_else(|| row.last_error.clone()).unwrap_or_else(|| {
            "the replica running it stopped before it ended, every time (killed, out of memory, or cut off)".into()
        });
        let failure = StoredFailure {
            code: "too_many_deliveries".into(),
            message: format!("given up after {deliveries} deliveries: {last}"),
            ..Default::default()
        };
        tracing::error!(execution_id = %run.id, deliveries, error = %last, "giving the job up: dead letter");
        let ended = ended(Status::Failed, &row.outputs, &failure, &row.nodes);
        let recorded =
            self.conclude(Some(run), &Subject::of(&row), row.attempt, ended, Some(failure.to_pb())).await?;
        if recorded == Recorded::Ended {
            metrics::counter!("csp_executor_dead_letters_total").increment(1);
            let letter = dead_letter::Model {
                execution_id: row.id.clone(),
                design_id: row.design_id.clone(),
                job: run.job().to_string(),
                deliveries: deliveries as i64,
                last_error: last,
                dead_at: now(),
            };
            repo::insert_dead_letter(&self.db, letter).await?;
        }
        Ok(recorded.into())
    }

    /// Every few seconds: the queue's depth as metrics; every minute, the entries every
    /// replica is done with are removed.
    async fn keep_queue(self: Arc<Self>) {
        let mut compacted = Instant::now();
        loop {
            if let Ok(backlog) = self.bus.backlog(JOBS, GROUP).await {
                metrics::gauge!("csp_executor_queue_waiting").set(backlog.waiting as f64);
                metrics::gauge!("csp_executor_queue_pending").set(backlog.pending as f64);
            }
            if compacted.elapsed() >= Duration::from_secs(60) {
                compacted = Instant::now();
                if let Err(e) = self.bus.compact(JOBS, GROUP, Duration::from_secs(3600)).await {
                    tracing::warn!(error = %e, "cannot compact the job queue");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
                () = self.workers.cancelled() => return,
            }
        }
    }
}

/// Describes the worker's metrics, each at zero until it counts something.
fn describe_metrics() {
    let counters = [
        ("csp_executor_job_deliveries_total", "Jobs delivered to this replica (new, claimed or handed back)"),
        (
            "csp_executor_job_claims_total",
            "Jobs this replica took over from a replica that stopped renewing them",
        ),
        (
            "csp_executor_lease_expiries_total",
            "Executions this replica found taken over by another (its lease ran out)",
        ),
        ("csp_executor_drains_total", "Drains (SIGTERM) of this replica"),
        (
            "csp_executor_handed_back_total",
            "Executions handed back to the queue by a drain that ran out of time",
        ),
        ("csp_executor_dead_letters_total", "Jobs given up after executor.max_deliveries deliveries"),
    ];
    for (name, help) in counters {
        metrics::describe_counter!(name, help);
        metrics::counter!(name).increment(0);
    }
    metrics::describe_counter!(
        "csp_executor_fenced_writes_total",
        "Writes and publications refused because another replica had taken the execution over, by kind"
    );
    for write in ["start", "progress", "finish", "publish"] {
        metrics::counter!("csp_executor_fenced_writes_total", "write" => write).increment(0);
    }
    metrics::describe_gauge!(
        "csp_executor_queue_waiting",
        "Jobs queued and not delivered to any replica yet"
    );
    metrics::describe_gauge!(
        "csp_executor_queue_pending",
        "Jobs delivered and not finished (running, or abandoned)"
    );
    metrics::describe_gauge!("csp_executor_running", "Executions this replica runs");
    metrics::describe_counter!(
        "csp_executor_executions_total",
        "Executions queued, and executions ended by final status"
    );
    metrics::describe_histogram!(
        "csp_executor_write_batch_size",
        "Execution state writes committed together in one database transaction"
    );
    crate::runtime::describe_metrics();
}

/// An end with a failure.
fn ended(status: Status, outputs: &str, failure: &StoredFailure, nodes: &str) -> Ended {
    Ended {
        status,
        at: now(),
        outputs: outputs.to_owned(),
        error: Some(serde_json::to_string(failure).unwrap_or_default()),
        nodes: nodes.to_owned(),
    }
}

fn current_traceparent() -> String {
    let mut headers = std::collections::BTreeMap::new();
    csp_platform::telemetry::inject_context(&mut csp_platform::telemetry::MapCarrier(&mut headers));
    headers.remove("traceparent").unwrap_or_default()
}

//! CancelExecution, ResumeExecution and StepExecution, and the control stream that carries
//! them to the replica running the execution.
//!
//! A cancel is stored with the execution first: a queued one ends at once and never starts; a
//! running one is stopped by its replica (told through the control stream, and checking the
//! stored cancels of what it runs every third of a lease in case it missed that); one that
//! changes hands is ended CANCELLED by the replica that claims it, without running it.

use std::{sync::atomic::Ordering, time::Duration};

use csp_bus::{EventId, NewEvent};
use csp_platform::auth::Principal;
use csp_proto::executor::v1 as pb;
use futures::StreamExt as _;
use pb::execution_event::Kind as Event;

use super::{
    CONTROL, Execution, Executor, Stop,
    events::{Subject, decode, is_final, is_final_kind, stream},
    lock, now,
};
use crate::{
    clients::{Access, Credentials},
    error::Error,
    stored::{Status, StoredFailure},
    writer::Write,
};

/// How long an RPC waits for the execution to react (cancelled, paused again, ...).
const REACTION: Duration = Duration::from_secs(10);

/// A request for the replica running an execution, or for every replica.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Command {
    #[serde(default)]
    execution_id: String,
    /// `cancel`, `resume`, `step`; `claim`: jobs were handed back, claim them now.
    action: String,
    #[serde(default)]
    clear: bool,
    #[serde(default)]
    reason: String,
}

impl Executor {
    /// Sends a command to whichever replica runs the execution (this one, directly).
    async fn command(&self, command: Command) -> Result<(), Error> {
        if self.apply(&command) {
            return Ok(());
        }
        let payload = serde_json::to_vec(&command).map_err(|e| Error::Internal(e.to_string()))?;
        self.bus.append(CONTROL, NewEvent::new(payload), Some(10_000)).await?;
        Ok(())
    }

    /// Tells every replica that jobs were handed back: they claim them without waiting.
    pub(super) async fn announce_handback(&self) {
        let command = Command {
            execution_id: String::new(),
            action: "claim".into(),
            clear: false,
            reason: String::new(),
        };
        let Ok(payload) = serde_json::to_vec(&command) else { return };
        if let Err(e) = self.bus.append(CONTROL, NewEvent::new(payload), Some(10_000)).await {
            tracing::warn!(error = %e, "cannot tell the other replicas that jobs were handed back");
        }
    }

    /// Carries out a command if it is for this replica.
    fn apply(&self, command: &Command) -> bool {
        if command.action == "claim" {
            self.claim_soon.store(true, Ordering::Relaxed);
            return true;
        }
        let run = lock(&self.running).get(&command.execution_id).cloned();
        let Some(run) = run else { return false };
        match command.action.as_str() {
            "cancel" => run.stop(Stop::Cancelled(command.reason.clone())),
            "resume" => {
                if let Some(debugger) = run.debugger.get() {
                    let _ = debugger.resume(command.clear);
                }
            }
            "step" => {
                if let Some(debugger) = run.debugger.get() {
                    let _ = debugger.step();
                }
            }
            _ => {}
        }
        true
    }

    /// Follows the control stream until the replica stops.
    pub(super) async fn follow_commands(
        &self,
        mut commands: futures::stream::BoxStream<'static, csp_bus::Result<csp_bus::Event>>,
    ) {
        loop {
            let event = tokio::select! {
                event = commands.next() => event,
                () = self.workers.cancelled() => return,
            };
            match event {
                Some(Ok(event)) => {
                    if let Ok(command) = serde_json::from_slice::<Command>(&event.payload) {
                        self.apply(&command);
                    }
                }
                other => {
                    if let Some(Err(e)) = other {
                        tracing::warn!(error = %e, "lost the control stream; following it again");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if let Ok(fresh) = self.bus.tail(CONTROL, None).await {
                        commands = fresh;
                    }
                }
            }
        }
    }

    /// Waits (a while) for an event after `after` that `done` accepts.
    async fn wait_for(&self, id: &str, after: Option<EventId>, done: impl Fn(&csp_bus::Event) -> bool) {
        let Ok(mut events) = self.bus.tail(&stream(id), Some(after.unwrap_or(EventId::ZERO))).await else {
            return;
        };
        let _ = tokio::time::timeout(REACTION, async {
            while let Some(Ok(event)) = events.next().await {
                if done(&event) {
                    return;
                }
            }
        })
        .await;
    }

    pub(crate) async fn cancel(
        &self,
        p: &Principal,
        credentials: &Credentials,
        id: &str,
        reason: &str,
    ) -> Result<Execution, Error> {
        let row = self.visible(credentials, id, Access::Editor).await?;
        let reason = if reason.is_empty() {
            format!("cancelled by {}", p.username)
        } else {
            format!("cancelled by {}: {}", p.username, reason.chars().take(500).collect::<String>())
        };
        let status = Status::parse(&row.status);
        if status.is_terminal() {
            return Ok(Execution::of(&row, true));
        }
        if status == Status::Queued {
            let failure =
                StoredFailure { code: "cancelled".into(), message: reason.clone(), ..Default::default() };
            let stored = serde_json::to_string(&failure).unwrap_or_default();
            let write = Write::CancelQueued { id: id.to_owned(), at: now(), error: stored };
            if self.writer.write(write).await? {
                metrics::counter!("csp_executor_executions_total", "status" => "cancelled").increment(1);
                self.publish_final(None, &Subject::of(&row), Status::Cancelled, Some(failure.to_pb())).await;
                return self.get(credentials, id).await;
            }
            // Taken by a replica meanwhile: cancel it where it runs.
        }
        let last = self.bus.last_id(&stream(id)).await?;
        if self.writer.write(Write::RequestCancel { id: id.to_owned(), reason: reason.clone() }).await? {
            self.command(Command { execution_id: id.into(), action: "cancel".into(), clear: false, reason })
                .await?;
            self.wait_for(id, last, is_final).await;
        }
        self.get(credentials, id).await
    }

    async fn debug(
        &self,
        credentials: &Credentials,
        id: &str,
        action: &str,
        clear: bool,
    ) -> Result<Execution, Error> {
        let row = self.visible(credentials, id, Access::Editor).await?;
        if Status::parse(&row.status) != Status::Paused {
            return Err(Error::precondition(
                "NOT_PAUSED",
                format!("the execution is {}, not paused at a breakpoint", row.status),
            ));
        }
        let last = self.bus.last_id(&stream(id)).await?;
        self.command(Command {
            execution_id: id.into(),
            action: action.into(),
            clear,
            reason: String::new(),
        })
        .await?;
        let kind = |event: &csp_bus::Event| decode(event).and_then(|e| e.kind);
        if action == "step" {
            self.wait_for(id, last, |e| {
                kind(e).is_some_and(|k| matches!(k, Event::BreakpointHit(_)) || is_final_kind(&k))
            })
            .await;
        } else {
            self.wait_for(id, last, |e| {
                kind(e).is_some_and(|k| {
                    matches!(&k, Event::StatusChanged(s) if s.status == pb::ExecutionStatus::Running as i32)
                        || is_final_kind(&k)
                })
            })
            .await;
        }
        self.get(credentials, id).await
    }

    pub(crate) async fn resume(
        &self,
        credentials: &Credentials,
        id: &str,
        clear: bool,
    ) -> Result<Execution, Error> {
        self.debug(credentials, id, "resume", clear).await
    }

    pub(crate) async fn step(&self, credentials: &Credentials, id: &str) -> Result<Execution, Error> {
        self.debug(credentials, id, "step", false).await
    }
}

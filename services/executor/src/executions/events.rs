//! The bus streams of executions and the events on them.
//!
//! An execution's events go to `execution:<id>`, encoded `ExecutionEvent`s; its status changes
//! also go to `executions-of:<design id>` (for collaborators). The final status seals the
//! execution's stream ([`NewEvent::sealing`]) and every publication of a running execution is
//! guarded by the seal and made on condition that the publishing replica still holds the job
//! ([`csp_bus::EventBus::append_held`]): a replica that lost an execution publishes nothing
//! more of it, and a stream carries at most one final status.

use chrono::Utc;
use csp_bus::{Append, Holder, NewEvent, SEALED_HEADER};
use csp_proto::executor::v1 as pb;
use pb::execution_event::Kind as Event;
use prost::Message as _;

use crate::{entity::execution, stored::Status};

/// The bus stream of an execution's events.
pub fn stream(execution_id: &str) -> String {
    format!("execution:{execution_id}")
}

/// The bus stream of the status changes of every execution of a design (for collaborators).
pub fn design_stream(design_id: &str) -> String {
    format!("executions-of:{design_id}")
}

/// Status changes kept per design stream.
const DESIGN_EVENTS_KEPT: u64 = 1000;

/// Which execution events are about: enough to announce its status changes on its design's
/// stream too.
#[derive(Debug, Clone)]
pub(crate) struct Subject {
    pub(crate) id: String,
    pub(crate) design_id: String,
    pub(crate) started_by: String,
}

impl Subject {
    pub(crate) fn of(row: &execution::Model) -> Self {
        Self { id: row.id.clone(), design_id: row.design_id.clone(), started_by: row.started_by.clone() }
    }

    /// The appends that publish `kinds`: the execution's stream (guarded by its seal; sealed
    /// by a final status), and its status changes on the design's stream.
    pub(crate) fn appends(&self, kinds: Vec<Event>, kept: u64) -> Vec<Append> {
        let by_design = self.design_events(&kinds);
        let own = kinds
            .into_iter()
            .map(|kind| {
                let last = is_final_kind(&kind);
                let event = new_event(kind);
                if last { event.sealing() } else { event }
            })
            .collect();
        std::iter::once(Append::new(stream(&self.id), own, Some(kept)).unless_sealed())
            .chain(by_design)
            .collect()
    }

    /// The status changes among `kinds`, as events of the design's stream (none if none).
    fn design_events(&self, kinds: &[Event]) -> Option<Append> {
        let events: Vec<NewEvent> = kinds
            .iter()
            .filter_map(|kind| match kind {
                Event::StatusChanged(s) => Some(s.status),
                Event::BreakpointHit(_) => Some(pb::ExecutionStatus::Paused as i32),
                _ => None,
            })
            .map(|status| {
                let change = pb::ExecutionStatusChange {
                    execution_id: self.id.clone(),
                    design_id: self.design_id.clone(),
                    status,
                    started_by: self.started_by.clone(),
                    time: Some(timestamp(Utc::now())),
                };
                NewEvent::new(change.encode_to_vec()).with_trace_context()
            })
            .collect();
        (!events.is_empty())
            .then(|| Append::new(design_stream(&self.design_id), events, Some(DESIGN_EVENTS_KEPT)))
    }
}

/// The job a replica holds for an execution.
pub(crate) fn holder(job: csp_bus::EventId, consumer: &str) -> Holder {
    Holder { stream: super::JOBS.into(), group: super::GROUP.into(), consumer: consumer.into(), id: job }
}

pub(crate) fn timestamp(time: chrono::DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: time.timestamp(), nanos: time.timestamp_subsec_nanos() as i32 }
}

/// An execution event as it goes on the bus, with the current trace context.
pub(crate) fn new_event(kind: Event) -> NewEvent {
    let event = pb::ExecutionEvent {
        event_id: String::new(),
        execution_id: String::new(),
        time: Some(timestamp(Utc::now())),
        kind: Some(kind),
    };
    NewEvent::new(event.encode_to_vec()).with_trace_context()
}

pub(crate) fn status_changed(status: Status, error: Option<pb::ExecutionError>) -> Event {
    Event::StatusChanged(pb::StatusChanged { status: status.to_pb() as i32, error })
}

/// Whether an event kind is a final status.
pub(crate) fn is_final_kind(kind: &Event) -> bool {
    matches!(kind, Event::StatusChanged(s) if Status::from_pb(pb::ExecutionStatus::try_from(s.status).unwrap_or_default()).is_some_and(Status::is_terminal))
}

/// Whether an event read from an execution's stream is its last.
pub(crate) fn is_final(event: &csp_bus::Event) -> bool {
    event.headers.contains_key(SEALED_HEADER)
        || decode(event).and_then(|e| e.kind).is_some_and(|kind| is_final_kind(&kind))
}

/// The execution event an event of the bus carries.
pub(crate) fn decode(event: &csp_bus::Event) -> Option<pb::ExecutionEvent> {
    pb::ExecutionEvent::decode(event.payload.as_ref()).ok()
}

//! Where a design's session lives on the bus, and how its entries are encoded.
//!
//! - `collab:<design id>` is a roster (see `csp_bus::roster`): its members are the design's
//!   sessions (value: an encoded `csp.collab.v1.Participant`, lease: the session timeout) and
//!   its stream is the session log, every entry an encoded `csp.collab.v1.CollabEvent`
//!   (without its id, which is the entry's). Joins, leaves and presence change the table and
//!   append their event in one step.
//! - Design changes (`design:<design id>`, from the design service) and execution status
//!   changes (`executions-of:<design id>`, from the executor) are relayed into the log by every
//!   replica following the design; the roster's relay marks let exactly one copy of each land,
//!   design changes in revision order.

use bytes::Bytes;
use csp_bus::{Event, NewEvent};
use csp_proto::{collab::v1 as pb, design::v1 as design, executor::v1 as executor};
use prost::Message as _;

use crate::{
    convert,
    model::{ExecutionStatus, Happening, LogEvent, Ops, Participant},
};

/// The kind of the session rosters (their lease index).
pub(crate) const KIND: &str = "collab";
/// The roster in which replicas report their counters.
pub(crate) const REPLICAS: &str = "collab-replicas:all";
/// Relay source of design changes (key: the revision).
pub(crate) const DESIGN_SOURCE: &str = "design";
/// Relay source of access changes (key: the design stream's event id).
pub(crate) const ACCESS_SOURCE: &str = "access";
/// Relay source of execution status changes (key: the executions stream's event id).
pub(crate) const EXECUTIONS_SOURCE: &str = "executions";

/// The roster (and session log) of a design.
pub(crate) fn name(design_id: &str) -> String {
    format!("{KIND}:{design_id}")
}

/// The design service's stream of a design.
pub(crate) fn design_stream(design_id: &str) -> String {
    format!("design:{design_id}")
}

/// The executor's stream of a design's execution status changes.
pub(crate) fn executions_stream(design_id: &str) -> String {
    format!("executions-of:{design_id}")
}

/// A log entry announcing `what`, stamped now, carrying the current trace context.
pub(crate) fn entry(what: &Happening) -> NewEvent {
    let event = pb::CollabEvent {
        event_id: String::new(),
        time: Some(convert::timestamp(csp_platform::auth::now_millis())),
        kind: Some(convert::happening_to_pb(what)),
    };
    NewEvent::new(event.encode_to_vec()).with_trace_context()
}

/// A log entry relayed from a source event: it keeps that event's trace context.
pub(crate) fn relayed(what: &Happening, source: &Event) -> NewEvent {
    let mut event = entry(what);
    for header in ["traceparent", "tracestate"] {
        if let Some(value) = source.headers.get(header) {
            event.headers.insert(header.to_owned(), value.clone());
        }
    }
    event
}

/// A log entry as an event, `None` when it is not one this service wrote.
pub(crate) fn read(event: &Event) -> Option<LogEvent> {
    let decoded = pb::CollabEvent::decode(event.payload.as_ref()).ok()?;
    Some(LogEvent {
        id: event.id,
        time_ms: convert::millis(&decoded.time),
        what: convert::happening_from_pb(decoded.kind?)?,
    })
}

/// A session's value in the roster.
pub(crate) fn member_value(p: &Participant) -> Bytes {
    convert::participant_to_pb(p).encode_to_vec().into()
}

/// A session from its value in the roster.
pub(crate) fn member(value: &[u8]) -> Option<Participant> {
    convert::participant_from_pb(pb::Participant::decode(value).ok()?)
}

/// An event of the design service's stream.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum DesignEvent {
    Changed { revision: i64, author_id: String, deleted: bool, ops: Ops },
    Access { user_id: String, access: Option<crate::model::Access> },
}

/// An event of the design service's stream, `None` if unreadable.
pub(crate) fn design_event(event: &Event) -> Option<DesignEvent> {
    match event.headers.get("type").map(String::as_str) {
        Some("design.access") => {
            let change = design::DesignAccessChange::decode(event.payload.as_ref()).ok()?;
            Some(DesignEvent::Access {
                access: convert::access_from_pb(change.access),
                user_id: change.user_id,
            })
        }
        Some("design.changed") | None => {
            let change = design::DesignChange::decode(event.payload.as_ref()).ok()?;
            (change.revision > 0).then(|| DesignEvent::Changed {
                revision: change.revision,
                author_id: change.author_id,
                deleted: change.deleted,
                ops: convert::ops_from_pb(change.ops),
            })
        }
        Some(_) => None,
    }
}

/// An event of the executor's stream of a design, `None` if unreadable.
pub(crate) fn execution_event(event: &Event) -> Option<Happening> {
    let change = executor::ExecutionStatusChange::decode(event.payload.as_ref()).ok()?;
    Some(Happening::ExecutionStatus {
        execution_id: change.execution_id,
        status: ExecutionStatus(change.status),
        started_by: change.started_by,
    })
}

//! Conversions between the service's domain types and their protobuf form, for the gRPC
//! adapter and for the session log (whose entries are encoded `csp.collab.v1` messages, so
//! any tool that reads the Redis stream can decode them).

use csp_proto::{collab::v1 as pb, design::v1 as design};
use prost::Message as _;

use crate::model::{
    Access, DesignChange, ExecutionStatus, Happening, LeaveReason, LogEvent, Ops, Outgoing, Participant,
    Presence, SessionId, Snapshot, Viewport,
};

pub(crate) fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

pub(crate) fn millis(t: &Option<prost_types::Timestamp>) -> i64 {
    t.as_ref().map_or(0, |t| t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos / 1_000_000)))
}

pub(crate) fn presence_from_pb(p: pb::Presence) -> Presence {
    Presence {
        cursor: p.cursor.map(|c| (c.x, c.y)),
        selected_nodes: p.selected_node_ids,
        selected_connections: p.selected_connection_ids,
        viewport: p.viewport.map(|v| Viewport {
            x: v.x,
            y: v.y,
            width: v.width,
            height: v.height,
            zoom: v.zoom,
        }),
    }
}

pub(crate) fn presence_to_pb(p: &Presence) -> pb::Presence {
    pb::Presence {
        cursor: p.cursor.map(|(x, y)| pb::Cursor { x, y }),
        selected_node_ids: p.selected_nodes.clone(),
        selected_connection_ids: p.selected_connections.clone(),
        viewport: p.viewport.map(|v| pb::Viewport {
            x: v.x,
            y: v.y,
            width: v.width,
            height: v.height,
            zoom: v.zoom,
        }),
    }
}

pub(crate) fn access_to_pb(access: Option<Access>) -> design::Access {
    match access {
        None => design::Access::Unspecified,
        Some(Access::Viewer) => design::Access::Viewer,
        Some(Access::Editor) => design::Access::Editor,
        Some(Access::Owner) => design::Access::Owner,
    }
}

pub(crate) fn access_from_pb(access: i32) -> Option<Access> {
    match design::Access::try_from(access).unwrap_or_default() {
        design::Access::Unspecified => None,
        design::Access::Viewer => Some(Access::Viewer),
        design::Access::Editor => Some(Access::Editor),
        design::Access::Owner => Some(Access::Owner),
    }
}

fn reason_to_pb(reason: LeaveReason) -> pb::LeaveReason {
    match reason {
        LeaveReason::Left => pb::LeaveReason::Left,
        LeaveReason::TimedOut => pb::LeaveReason::TimedOut,
        LeaveReason::AccessRevoked => pb::LeaveReason::AccessRevoked,
        LeaveReason::DesignDeleted => pb::LeaveReason::DesignDeleted,
    }
}

fn reason_from_pb(reason: i32) -> LeaveReason {
    match pb::LeaveReason::try_from(reason).unwrap_or_default() {
        pb::LeaveReason::TimedOut => LeaveReason::TimedOut,
        pb::LeaveReason::AccessRevoked => LeaveReason::AccessRevoked,
        pb::LeaveReason::DesignDeleted => LeaveReason::DesignDeleted,
        pb::LeaveReason::Left | pb::LeaveReason::Unspecified => LeaveReason::Left,
    }
}

pub(crate) fn participant_to_pb(p: &Participant) -> pb::Participant {
    pb::Participant {
        session_id: p.session.to_string(),
        user_id: p.user_id.clone(),
        display_name: p.display_name.clone(),
        color: p.color.clone(),
        can_edit: p.access.can_edit(),
        presence: Some(presence_to_pb(&p.presence)),
        joined_at: Some(timestamp(p.joined_at_ms)),
        access: access_to_pb(Some(p.access)) as i32,
    }
}

pub(crate) fn participant_from_pb(p: pb::Participant) -> Option<Participant> {
    Some(Participant {
        session: SessionId::parse(&p.session_id)?,
        access: access_from_pb(p.access)?,
        joined_at_ms: millis(&p.joined_at),
        presence: presence_from_pb(p.presence.unwrap_or_default()),
        user_id: p.user_id,
        display_name: p.display_name,
        color: p.color,
    })
}

/// The ops of a change, decoded for the client (they travel encoded, see [`Ops`]).
fn ops_to_pb(ops: &Ops) -> Vec<design::Op> {
    design::DesignChange::decode(ops.0.as_ref()).map(|c| c.ops).unwrap_or_default()
}

/// Ops as they pass through: a `DesignChange` carrying only them.
pub(crate) fn ops_from_pb(ops: Vec<design::Op>) -> Ops {
    Ops(design::DesignChange { ops, ..Default::default() }.encode_to_vec().into())
}

pub(crate) fn happening_to_pb(what: &Happening) -> pb::collab_event::Kind {
    use pb::collab_event::Kind;
    match what {
        Happening::Joined(p) => {
            Kind::ParticipantJoined(pb::ParticipantJoined { participant: Some(participant_to_pb(p)) })
        }
        Happening::Left { session, user_id, reason } => Kind::ParticipantLeft(pb::ParticipantLeft {
            session_id: session.to_string(),
            user_id: user_id.clone(),
            leave_reason: reason_to_pb(*reason) as i32,
        }),
        Happening::Presence { session, presence } => Kind::PresenceChanged(pb::PresenceChanged {
            session_id: session.to_string(),
            presence: Some(presence_to_pb(presence)),
        }),
        Happening::DesignChanged(change) => Kind::DesignChanged(pb::DesignChanged {
            revision: change.revision,
            author_id: change.author_id.clone(),
            deleted: change.deleted,
            ops: ops_to_pb(&change.ops),
            previous_revision: change.previous_revision,
        }),
        Happening::ExecutionStatus { execution_id, status, started_by } => {
            Kind::ExecutionStatusChanged(pb::ExecutionStatusChanged {
                execution_id: execution_id.clone(),
                execution_status: status.0,
                started_by: started_by.clone(),
            })
        }
        Happening::AccessChanged { user_id, access } => Kind::AccessChanged(pb::AccessChanged {
            user_id: user_id.clone(),
            access: access_to_pb(*access) as i32,
        }),
    }
}

/// A log entry's event, `None` for an entry that is not one (malformed or unknown kind).
pub(crate) fn happening_from_pb(kind: pb::collab_event::Kind) -> Option<Happening> {
    use pb::collab_event::Kind;
    Some(match kind {
        Kind::ParticipantJoined(j) => Happening::Joined(participant_from_pb(j.participant?)?),
        Kind::ParticipantLeft(l) => Happening::Left {
            session: SessionId::parse(&l.session_id)?,
            user_id: l.user_id,
            reason: reason_from_pb(l.leave_reason),
        },
        Kind::PresenceChanged(p) => Happening::Presence {
            session: SessionId::parse(&p.session_id)?,
            presence: presence_from_pb(p.presence.unwrap_or_default()),
        },
        Kind::DesignChanged(c) => Happening::DesignChanged(DesignChange {
            revision: c.revision,
            previous_revision: c.previous_revision,
            author_id: c.author_id,
            deleted: c.deleted,
            ops: ops_from_pb(c.ops),
        }),
        Kind::ExecutionStatusChanged(e) => Happening::ExecutionStatus {
            execution_id: e.execution_id,
            status: ExecutionStatus(e.execution_status),
            started_by: e.started_by,
        },
        Kind::AccessChanged(a) => {
            Happening::AccessChanged { user_id: a.user_id, access: access_from_pb(a.access) }
        }
        Kind::Snapshot(_) => return None,
    })
}

pub(crate) fn snapshot_to_pb(s: &Snapshot, heartbeat_seconds: i32, timeout_seconds: i32) -> pb::Snapshot {
    pb::Snapshot {
        session_id: s.session.to_string(),
        participants: s.participants.iter().map(participant_to_pb).collect(),
        design_revision: s.design_revision,
        heartbeat_interval_seconds: heartbeat_seconds,
        resync: s.resync,
        session_timeout_seconds: timeout_seconds,
    }
}

/// What a client stream sends, as the API's event.
pub(crate) fn outgoing_to_pb(
    out: &Outgoing,
    heartbeat_seconds: i32,
    timeout_seconds: i32,
) -> pb::CollabEvent {
    match out {
        Outgoing::Snapshot(s) => pb::CollabEvent {
            event_id: s.at.to_string(),
            time: Some(timestamp(csp_platform::auth::now_millis())),
            kind: Some(pb::collab_event::Kind::Snapshot(snapshot_to_pb(
                s,
                heartbeat_seconds,
                timeout_seconds,
            ))),
        },
        Outgoing::Event(e) => log_event_to_pb(e),
    }
}

pub(crate) fn log_event_to_pb(e: &LogEvent) -> pb::CollabEvent {
    pb::CollabEvent {
        event_id: e.id.to_string(),
        time: Some(timestamp(e.time_ms)),
        kind: Some(happening_to_pb(&e.what)),
    }
}

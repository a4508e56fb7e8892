//! The collaboration service's vocabulary: sessions, participants, presence and the events of
//! a design's session, free of gRPC and storage.

use std::{fmt, sync::Arc};

use bytes::Bytes;
use csp_bus::EventId;
use csp_platform::{FieldViolation, config::CollabSettings};

/// A session id: `<design id>.<32 hex digits>`. It names its design, so that a unary call on
/// any replica finds the session's design without a lookup.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SessionId(Arc<str>);

impl SessionId {
    /// A new session of a design.
    pub(crate) fn new(design_id: &str) -> Self {
        Self(format!("{design_id}.{}", uuid::Uuid::new_v4().simple()).into())
    }

    /// A session id as a client sent it, if it is one.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let (design, random) = text.split_once('.')?;
        let well_formed = uuid::Uuid::parse_str(design).is_ok()
            && design.len() == 36
            && random.len() == 32
            && random.bytes().all(|b| b.is_ascii_hexdigit());
        well_formed.then(|| Self(text.into()))
    }

    /// The design it belongs to.
    pub(crate) fn design_id(&self) -> &str {
        self.0.split_once('.').map_or("", |(design, _)| design)
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a user may do with a design.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Access {
    Viewer,
    Editor,
    Owner,
}

impl Access {
    pub(crate) fn can_edit(self) -> bool {
        self >= Access::Editor
    }
}

/// The visible part of the canvas.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Viewport {
    pub(crate) x: f64,
    pub(crate) y: f64,
    pub(crate) width: f64,
    pub(crate) height: f64,
    pub(crate) zoom: f64,
}

/// Where a participant is and what they selected.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Presence {
    pub(crate) cursor: Option<(f64, f64)>,
    pub(crate) selected_nodes: Vec<String>,
    pub(crate) selected_connections: Vec<String>,
    pub(crate) viewport: Option<Viewport>,
}

/// Canvas coordinates beyond this are refused (as node positions are).
const MAX_COORDINATE: f64 = 1e9;

fn coordinate(v: f64) -> bool {
    v.is_finite() && v.abs() <= MAX_COORDINATE
}

fn element_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

impl Presence {
    /// What is wrong with it, each violation under `field` (e.g. `presence`).
    pub(crate) fn check(&self, limits: &CollabSettings, field: &str) -> Vec<FieldViolation> {
        let mut v = Vec::new();
        if let Some((x, y)) = self.cursor
            && !(coordinate(x) && coordinate(y))
        {
            v.push(FieldViolation::new(format!("{field}.cursor"), "must be finite numbers within ±1e9"));
        }
        if let Some(view) = self.viewport {
            if !(coordinate(view.x) && coordinate(view.y)) {
                v.push(FieldViolation::new(
                    format!("{field}.viewport"),
                    "x and y must be finite numbers within ±1e9",
                ));
            }
            let size = |n: f64| n.is_finite() && (0.0..=MAX_COORDINATE).contains(&n);
            if !(size(view.width) && size(view.height)) {
                v.push(FieldViolation::new(format!("{field}.viewport"), "width and height must be 0 to 1e9"));
            }
            if !(view.zoom.is_finite() && (0.0..=1000.0).contains(&view.zoom)) {
                v.push(FieldViolation::new(
                    format!("{field}.viewport.zoom"),
                    "must be above 0 and at most 1000",
                ));
            }
        }
        let selected = self.selected_nodes.len() + self.selected_connections.len();
        if selected > limits.max_selected {
            v.push(FieldViolation::new(
                format!("{field}.selected_node_ids"),
                format!(
                    "at most {} ids may be selected (nodes and connections together)",
                    limits.max_selected
                ),
            ));
        } else {
            for (name, ids) in [
                ("selected_node_ids", &self.selected_nodes),
                ("selected_connection_ids", &self.selected_connections),
            ] {
                if let Some(i) = ids.iter().position(|id| !element_id(id)) {
                    v.push(FieldViolation::new(
                        format!("{field}.{name}[{i}]"),
                        "must be 1 to 64 letters, digits, '_', '-' or '.'",
                    ));
                }
            }
        }
        v
    }
}

/// One session in a design.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Participant {
    pub(crate) session: SessionId,
    pub(crate) user_id: String,
    pub(crate) display_name: String,
    pub(crate) color: String,
    pub(crate) access: Access,
    pub(crate) presence: Presence,
    /// Milliseconds since the epoch.
    pub(crate) joined_at_ms: i64,
}

/// The colours participants are shown in, distinct at a glance on a light or dark canvas.
const PALETTE: [&str; 12] = [
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#469990",
    "#800000", "#808000", "#000075",
];

/// A user's colour: the same on every replica and in every session (FNV-1a of the user id).
pub(crate) fn color_of(user_id: &str) -> String {
    let hash = user_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    PALETTE[(hash % PALETTE.len() as u64) as usize].to_owned()
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaveReason {
    Left,
    TimedOut,
    AccessRevoked,
    DesignDeleted,
}

/// The edits of a design change, as the design service encoded them: passed through untouched.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Ops(pub(crate) Bytes);

/// A committed change of the design, as relayed into the session's log.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DesignChange {
    pub(crate) revision: i64,
    pub(crate) previous_revision: i64,
    pub(crate) author_id: String,
    pub(crate) deleted: bool,
    pub(crate) ops: Ops,
}

/// An execution's status, as the executor names it (its enum's number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExecutionStatus(pub(crate) i32);

/// One event of a design's session log.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Happening {
    Joined(Participant),
    Left { session: SessionId, user_id: String, reason: LeaveReason },
    Presence { session: SessionId, presence: Presence },
    DesignChanged(DesignChange),
    ExecutionStatus { execution_id: String, status: ExecutionStatus, started_by: String },
    AccessChanged { user_id: String, access: Option<Access> },
}

/// An event read from a design's session log.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LogEvent {
    /// Its position in the log: the event id clients resume after.
    pub(crate) id: EventId,
    /// When it happened (ms since the epoch).
    pub(crate) time_ms: i64,
    pub(crate) what: Happening,
}

/// The state of a design's session at one position of its log.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Snapshot {
    pub(crate) at: EventId,
    pub(crate) session: SessionId,
    pub(crate) participants: Vec<Participant>,
    pub(crate) design_revision: i64,
    pub(crate) resync: bool,
}

/// What a client stream sends.
#[derive(Debug, Clone)]
pub(crate) enum Outgoing {
    Snapshot(Snapshot),
    Event(Arc<LogEvent>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_name_their_design_and_nothing_else_parses() {
        let design = "0192b5c8-7f00-7000-8000-000000000001";
        let id = SessionId::new(design);
        assert_eq!(id.design_id(), design);
        assert_eq!(SessionId::parse(id.as_str()), Some(id.clone()));
        for bad in ["", "x", &format!("{design}."), &format!("{design}.zz"), &"a".repeat(100_000), "a.b"] {
            assert!(SessionId::parse(bad).is_none(), "{bad:.40}");
        }
    }

    #[test]
    fn absurd_presence_is_refused_by_field() {
        let limits = CollabSettings::default();
        let fields = |p: Presence| -> Vec<String> {
            p.check(&limits, "presence").into_iter().map(|v| v.field).collect()
        };
        assert!(fields(Presence { cursor: Some((1.0, -2.0)), ..Default::default() }).is_empty());
        assert_eq!(
            fields(Presence { cursor: Some((f64::NAN, 0.0)), ..Default::default() }),
            ["presence.cursor"]
        );
        assert_eq!(
            fields(Presence { cursor: Some((1e308, 0.0)), ..Default::default() }),
            ["presence.cursor"]
        );
        let many = Presence { selected_nodes: vec!["n".into(); 10_000], ..Default::default() };
        assert_eq!(fields(many), ["presence.selected_node_ids"]);
        let bad_id =
            Presence { selected_connections: vec!["ok".into(), "no spaces".into()], ..Default::default() };
        assert_eq!(fields(bad_id), ["presence.selected_connection_ids[1]"]);
        let view = Viewport { x: 0.0, y: 0.0, width: -1.0, height: 5.0, zoom: f64::INFINITY };
        assert_eq!(
            fields(Presence { viewport: Some(view), ..Default::default() }),
            ["presence.viewport", "presence.viewport.zoom"]
        );
    }

    #[test]
    fn colours_are_stable_per_user() {
        assert_eq!(color_of("ada"), color_of("ada"));
        assert!(color_of("ada").starts_with('#') && color_of("ada").len() == 7);
        let distinct: std::collections::HashSet<String> =
            ["ada", "bob", "cy", "dee", "eve"].iter().map(|u| color_of(u)).collect();
        assert!(distinct.len() >= 3);
    }
}

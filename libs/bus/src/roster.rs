//! Rosters: a stream together with a table of leased members and a few relay marks, changed
//! in one atomic step, so that the table and the stream never disagree.
//!
//! A roster is named like a stream (`collab:<design id>`): the stream carries the events that
//! announce each change of the table. Because a change and its event land together, reading
//! the table and the stream's last id together ([`Rosters::roster_snapshot`]) gives a
//! consistent starting point: the table as of that id, and every later change on the stream.
//!
//! - **Members** have a value (opaque bytes) and a lease. Leases of every roster of one *kind*
//!   (the name up to its first `:`) are indexed together, so any process can find the members
//!   whose lease ran out — also those of a process that died — with
//!   [`Rosters::roster_expired`], and remove them with a [`Change::Expire`] that applies only
//!   if the lease is still out: of several processes sweeping at once, exactly one removes a
//!   member and announces it.
//! - A change applies only to the state it expects (an update or removal of a member that is
//!   gone does nothing), and its event is appended only when it applied.
//! - **Relay marks** let several processes copy events from another source into the roster's
//!   stream with no duplicates and in order: [`Rosters::roster_relay`] appends only when the
//!   event's key is past the source's mark (and, when asked, exactly the next one).
//!
//! Times are the bus's clock (Redis `TIME` on Redis), in milliseconds since the Unix epoch, so
//! leases do not depend on each process's clock. On Redis every write also makes the roster's
//! keys expire after `idle` without writes; the lease index is kept.

use std::{collections::BTreeMap, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{EventId, NewEvent, Result};

/// A change to a roster's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Adds the member or replaces its value.
    Put {
        /// The member.
        member: String,
        /// Its value.
        value: Bytes,
    },
    /// Replaces the value of a member that is still present.
    Update {
        /// The member.
        member: String,
        /// Its new value.
        value: Bytes,
    },
    /// Renews the lease of a member that is still present (with [`Op::lease`]).
    Renew {
        /// The member.
        member: String,
    },
    /// Removes a member that is still present.
    Remove {
        /// The member.
        member: String,
    },
    /// Removes a member whose lease has run out (renewed since: nothing happens).
    Expire {
        /// The member.
        member: String,
    },
}

impl Change {
    /// The member it is about.
    pub fn member(&self) -> &str {
        match self {
            Change::Put { member, .. }
            | Change::Update { member, .. }
            | Change::Renew { member }
            | Change::Remove { member }
            | Change::Expire { member } => member,
        }
    }
}

/// One change with its lease and the event that announces it.
#[derive(Debug, Clone)]
pub struct Op {
    /// The change.
    pub change: Change,
    /// For Put, Update and Renew: the member's lease runs this long from now. `None` keeps the
    /// lease it has (a Put without one never expires).
    pub lease: Option<Duration>,
    /// Appended to the roster's stream when (and only when) the change applies.
    pub event: Option<NewEvent>,
}

impl Op {
    /// A change with no lease and no event.
    pub fn new(change: Change) -> Self {
        Self { change, lease: None, event: None }
    }

    /// With a lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// With an event.
    pub fn event(mut self, event: NewEvent) -> Self {
        self.event = Some(event);
        self
    }
}

/// What one [`Op`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    /// Whether the change applied.
    pub applied: bool,
    /// The id of its event, when one was appended.
    pub event: Option<EventId>,
    /// When the member's lease runs out (ms since the epoch), for a present member with one.
    pub expires_at_ms: Option<u64>,
}

/// One member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id within the roster.
    pub id: String,
    /// Its value.
    pub value: Bytes,
    /// When its lease runs out (ms since the epoch); `None` for a member without a lease.
    pub expires_at_ms: Option<u64>,
}

/// How far a source has been relayed into a roster's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    /// The ordering key of the last event relayed.
    pub key: EventId,
    /// Where in the source that event was (to resume reading the source from).
    pub from: EventId,
}

/// A roster's table and stream position, read together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RosterSnapshot {
    /// Every member, leases run out or not.
    pub members: Vec<Member>,
    /// The last event of the stream; every change after the table is after it.
    pub last_id: Option<EventId>,
    /// The relay marks, by source.
    pub marks: BTreeMap<String, Mark>,
    /// The bus's clock when the snapshot was read (ms since the epoch).
    pub now_ms: u64,
}

/// An event to relay from a source into a roster's stream.
#[derive(Debug, Clone)]
pub struct Relay {
    /// The source's name (one mark per source).
    pub source: String,
    /// The event's ordering key: it is appended only if the key is after the source's mark.
    pub key: EventId,
    /// Where the event is in the source; `None` keeps the mark's position.
    pub from: Option<EventId>,
    /// Whether the key must be exactly the next one (`key.ms == mark.ms + 1`): a relay that
    /// would skip keys is refused with [`Relayed::Gap`]. A source with no mark yet takes any key.
    pub contiguous: bool,
    /// The event; `None` only moves the mark.
    pub event: Option<NewEvent>,
}

/// What a relay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relayed {
    /// Appended (or, without an event, the mark moved); the id when an event was appended.
    Appended(Option<EventId>),
    /// The key was not after the mark: someone relayed it (or a later one) already.
    Stale(Mark),
    /// The key would skip keys after the mark.
    Gap(Mark),
}

/// Bounds of a roster's stream and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RosterLimits {
    /// The stream keeps at most this many events.
    pub cap: u64,
    /// On Redis, the roster's keys expire after this long without a write (zero: never).
    pub idle: Duration,
}

/// The kind of a roster: its name up to the first `:`.
pub fn kind_of(roster: &str) -> &str {
    roster.split_once(':').map_or(roster, |(kind, _)| kind)
}

/// Rosters on a bus. See the module docs.
#[async_trait]
pub trait Rosters: Send + Sync + 'static {
    /// Applies changes in order, in one atomic step, appending the event of each change that
    /// applied; then trims the stream to the cap.
    async fn roster_apply(&self, roster: &str, ops: Vec<Op>, limits: &RosterLimits) -> Result<Vec<Applied>>;

    /// One member, if present.
    async fn roster_member(&self, roster: &str, member: &str) -> Result<Option<Member>>;

    /// The table, the marks and the stream's last id, read together.
    async fn roster_snapshot(&self, roster: &str) -> Result<RosterSnapshot>;

    /// Relays an event into the roster's stream if its key is after the source's mark (see
    /// [`Relay`]), moving the mark; atomic, so of several processes relaying the same source
    /// each event is appended once, in key order.
    async fn roster_relay(&self, roster: &str, relay: Relay, limits: &RosterLimits) -> Result<Relayed>;

    /// Up to `limit` members of rosters of `kind` whose lease has run out, as
    /// `(roster, member)`, longest expired first.
    async fn roster_expired(&self, kind: &str, limit: usize) -> Result<Vec<(String, String)>>;

    /// Members with a live lease per roster of `kind`.
    async fn roster_counts(&self, kind: &str) -> Result<BTreeMap<String, u64>>;
}

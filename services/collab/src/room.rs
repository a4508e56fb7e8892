//! A design's session as one replica follows it: a *room*.
//!
//! A room starts from the session roster (who is there, with their presence, as of one log
//! position) and then follows the session log, applying each event to its state and pushing
//! it to the outbox of every client stream attached here — never waiting on a client (see
//! [`Outbox`]). Three tasks run per room:
//!
//! - **follow**: reads the log (`collab:<design>`) and fans it out;
//! - **relay**: reads the design service's stream and the executor's stream of the design and
//!   copies their events into the log. Every replica following the design does this; the
//!   roster's relay marks let one copy of each land. Design changes go in revision order: one
//!   that arrives before its predecessor waits up to `collab.reorder_wait` for it, then goes
//!   on marked with the revision it follows (clients then read the design again);
//! - **flush**: sends presence updates on, at most one per session per `collab.presence_tick`
//!   (the latest wins), several sessions' in one bus call.
//!
//! Joins, presence and leaves are written to the roster and come back through the log, so a
//! replica's own clients and every other replica's see them the same way, in the same order,
//! once (no echo: a session does not get its own presence back).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use csp_bus::{
    BusError, Event, EventId, SharedBus,
    roster::{Change, Mark, Op, Relay, Relayed, RosterLimits},
};
use csp_platform::config::CollabSettings;
use futures::{StreamExt as _, stream::BoxStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    log::{self, DesignEvent},
    model::{
        DesignChange, Happening, LeaveReason, LogEvent, Ops, Outgoing, Participant, SessionId, Snapshot,
    },
    outbox::{Outbox, Pushed},
    stats::Stats,
};

/// What every room of the service shares.
pub(crate) struct Shared {
    pub(crate) bus: SharedBus,
    pub(crate) settings: CollabSettings,
    pub(crate) limits: RosterLimits,
    pub(crate) stats: Arc<Stats>,
}

impl Shared {
    pub(crate) fn new(bus: SharedBus, settings: CollabSettings, stats: Arc<Stats>) -> Self {
        let limits = RosterLimits { cap: settings.events_kept, idle: settings.log_ttl };
        Self { bus, settings, limits, stats }
    }
}

/// Where a newly attached client starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start {
    /// With a snapshot taken once the room has applied `min` (its own join).
    Snapshot { min: EventId, resync: bool },
    /// With the events after `after` (a resumed stream): replayed from the log up to where the
    /// room is, then live.
    Resume { after: EventId },
}

/// A client attached to a room.
pub(crate) struct Attached {
    pub(crate) id: u64,
    /// Log events to replay first: after `.0`, up to and including `.1`.
    pub(crate) replay: Option<(EventId, EventId)>,
}

/// The room is closing; open it again.
#[derive(Debug)]
pub(crate) struct Closed;

enum Waiting {
    /// Gets a snapshot once the cursor reaches this.
    Snapshot { min: EventId, resync: bool },
    /// Gets the events after this, once the room reaches it.
    Cursor(EventId),
}

struct Client {
    session: SessionId,
    outbox: Arc<Outbox>,
    waiting: Option<Waiting>,
}

#[derive(Default)]
struct State {
    /// The last log event applied.
    cursor: EventId,
    participants: HashMap<SessionId, Participant>,
    /// The design revision the log has reached.
    revision: i64,
    clients: HashMap<u64, Client>,
    next_client: u64,
    waiting: usize,
    closed: bool,
    /// When the last client left (or the room was last used without clients).
    idle_since: Option<Instant>,
}

/// Presence waiting to be sent, per session.
#[derive(Default)]
struct Throttle {
    slots: HashMap<SessionId, Slot>,
}

struct Slot {
    last_sent: Option<Instant>,
    pending: Option<Participant>,
}

/// Work a room hands to the bus after applying events, outside its lock.
#[derive(Default)]
struct Aftermath {
    /// Sessions to end, with why.
    end: Vec<(SessionId, String, LeaveReason)>,
}

/// One design's session on this replica.
pub(crate) struct Room {
    design_id: String,
    log: String,
    shared: Arc<Shared>,
    state: Mutex<State>,
    /// The design revision relayed into the log, as far as this room knows.
    relayed: AtomicI64,
    /// The highest revision a join saw the design at (the relay makes sure the log gets there).
    hinted: AtomicI64,
    hint: Notify,
    throttle: Mutex<Throttle>,
    flush: Notify,
    stop: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits before following a stream again after an error.
const BACKOFF: Duration = Duration::from_millis(500);

impl Room {
    /// Opens a design's room: reads the roster, brings the log up to `revision` if it lags
    /// (no one was following the design), and starts following it.
    pub(crate) async fn open(
        design_id: &str,
        revision: i64,
        shared: Arc<Shared>,
    ) -> Result<Arc<Room>, BusError> {
        let log = log::name(design_id);
        let snapshot = shared.bus.roster_snapshot(&log).await?;
        let mark = snapshot.marks.get(log::DESIGN_SOURCE).copied();
        let mut relayed = mark.map_or(0, |m| m.key.ms as i64);
        let mut state = State {
            cursor: snapshot.last_id.unwrap_or(EventId::ZERO),
            participants: snapshot
                .members
                .iter()
                .filter_map(|m| log::member(&m.value))
                .map(|p| (p.session.clone(), p))
                .collect(),
            revision: relayed,
            idle_since: Some(Instant::now()),
            ..Default::default()
        };
        if revision > relayed {
            // The log lags the design: nobody followed it while it changed. Bring the log up to
            // date (with a change marked as following an older revision, so that clients that
            // knew the older one read the design again; none when nothing was ever relayed).
            let marker = mark.map(|_| {
                log::entry(&Happening::DesignChanged(DesignChange {
                    revision,
                    previous_revision: relayed,
                    author_id: String::new(),
                    deleted: false,
                    ops: Ops::default(),
                }))
            });
            let silent = marker.is_none();
            let relay = Relay {
                source: log::DESIGN_SOURCE.into(),
                key: EventId::new(revision as u64, 0),
                from: None,
                contiguous: false,
                event: marker,
            };
            match shared.bus.roster_relay(&log, relay, &shared.limits).await? {
                Relayed::Appended(_) => {
                    relayed = revision;
                    if silent {
                        state.revision = revision;
                    }
                }
                Relayed::Stale(mark) | Relayed::Gap(mark) => relayed = relayed.max(mark.key.ms as i64),
            }
        }
        let tail = shared.bus.tail(&log, Some(state.cursor)).await?;
        let room = Arc::new(Room {
            design_id: design_id.to_owned(),
            log,
            shared,
            state: Mutex::new(state),
            relayed: AtomicI64::new(relayed),
            hinted: AtomicI64::new(revision),
            hint: Notify::new(),
            throttle: Mutex::new(Throttle::default()),
            flush: Notify::new(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(room.clone().follow(tail));
        tokio::spawn(room.clone().relay(snapshot.marks));
        tokio::spawn(room.clone().flush_presence());
        Ok(room)
    }

    pub(crate) fn log(&self) -> &str {
        &self.log
    }

    pub(crate) fn bus(&self) -> &SharedBus {
        &self.shared.bus
    }

    pub(crate) fn shared_stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Stops following the design.
    pub(crate) fn shut(&self) {
        lock(&self.state).closed = true;
        self.stop.cancel();
    }

    /// Closes the room if no client has been attached for `idle`.
    pub(crate) fn close_if_idle(&self, idle: Duration) -> bool {
        let mut state = lock(&self.state);
        let quiet = state.clients.is_empty() && state.idle_since.is_some_and(|at| at.elapsed() >= idle);
        if quiet {
            state.closed = true;
            drop(state);
            self.stop.cancel();
        }
        quiet
    }

    /// Counts as use: an idle room is kept a while longer.
    pub(crate) fn touch(&self) {
        let mut state = lock(&self.state);
        if state.idle_since.is_some() {
            state.idle_since = Some(Instant::now());
        }
    }

    /// A participant as this room knows it.
    pub(crate) fn participant(&self, session: &SessionId) -> Option<Participant> {
        lock(&self.state).participants.get(session).cloned()
    }

    /// Sessions present, and those of `user_id` among them.
    pub(crate) fn population(&self, user_id: &str) -> (usize, usize) {
        let state = lock(&self.state);
        (state.participants.len(), state.participants.values().filter(|p| p.user_id == user_id).count())
    }

    /// Tells the room a join saw the design at `revision`: if the log has not reached it
    /// within `collab.reorder_wait`, the relay brings it there.
    pub(crate) fn hint(&self, revision: i64) {
        if self.hinted.fetch_max(revision, Ordering::SeqCst) < revision {
            self.hint.notify_one();
        }
    }

    // --- clients ---

    /// Attaches a client's outbox.
    pub(crate) fn attach(
        &self,
        session: SessionId,
        outbox: Arc<Outbox>,
        start: Start,
    ) -> Result<Attached, Closed> {
        let mut state = lock(&self.state);
        if state.closed {
            return Err(Closed);
        }
        let id = state.next_client;
        state.next_client += 1;
        let cursor = state.cursor;
        let mut replay = None;
        let waiting = match start {
            Start::Snapshot { min, resync } if cursor >= min => {
                outbox.restart(Outgoing::Snapshot(snapshot_of(&state, &session, resync)));
                None
            }
            Start::Snapshot { min, resync } => Some(Waiting::Snapshot { min, resync }),
            Start::Resume { after } if after <= cursor => {
                replay = (after < cursor).then_some((after, cursor));
                None
            }
            Start::Resume { after } => Some(Waiting::Cursor(after)),
        };
        state.waiting += usize::from(waiting.is_some());
        state.clients.insert(id, Client { session, outbox, waiting });
        state.idle_since = None;
        self.shared.stats.connected(1);
        Ok(Attached { id, replay })
    }

    /// Detaches a client (its stream ended).
    pub(crate) fn detach(&self, id: u64) {
        let mut state = lock(&self.state);
        if let Some(client) = state.clients.remove(&id) {
            state.waiting -= usize::from(client.waiting.is_some());
            self.shared.stats.connected(-1);
        }
        if state.clients.is_empty() {
            state.idle_since = Some(Instant::now());
        }
    }

    /// Gives a client that fell behind a fresh snapshot in place of what it missed.
    pub(crate) fn resync(&self, id: u64) {
        let state = lock(&self.state);
        if let Some(client) = state.clients.get(&id) {
            client.outbox.restart(Outgoing::Snapshot(snapshot_of(&state, &client.session, true)));
            metrics::counter!("csp_collab_resyncs_total").increment(1);
        }
    }

    // --- presence ---

    /// Queues a session's presence; it goes out within a presence tick (the latest wins).
    pub(crate) fn update_presence(&self, participant: Participant) {
        let coalesced = {
            let mut throttle = lock(&self.throttle);
            let slot = throttle
                .slots
                .entry(participant.session.clone())
                .or_insert(Slot { last_sent: None, pending: None });
            slot.pending.replace(participant).is_some()
        };
        metrics::counter!("csp_collab_presence_updates_total").increment(1);
        if coalesced {
            metrics::counter!("csp_collab_presence_coalesced_total").increment(1);
        }
        self.flush.notify_one();
    }

    async fn flush_presence(self: Arc<Self>) {
        let tick = self.shared.settings.presence_tick;
        loop {
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            let due: Vec<Participant> = {
                let mut throttle = lock(&self.throttle);
                throttle
                    .slots
                    .values_mut()
                    .filter_map(|slot| {
                        slot.pending.as_ref()?;
                        match slot.last_sent {
                            Some(at) if now.duration_since(at) < tick => {
                                next = Some(next.map_or(at + tick, |n| n.min(at + tick)));
                                None
                            }
                            _ => {
                                slot.last_sent = Some(now);
                                slot.pending.take()
                            }
                        }
                    })
                    .collect()
            };
            if !due.is_empty() {
                // The rest of each participant as the room knows it now (its access may have
                // changed since the update was queued).
                let due: Vec<Participant> = {
                    let state = lock(&self.state);
                    due.into_iter()
                        .map(|p| match state.participants.get(&p.session) {
                            Some(current) => Participant { presence: p.presence, ..current.clone() },
                            None => p,
                        })
                        .collect()
                };
                let ops = due
                    .into_iter()
                    .map(|p| {
                        let event = log::entry(&Happening::Presence {
                            session: p.session.clone(),
                            presence: p.presence.clone(),
                        });
                        Op::new(Change::Update {
                            member: p.session.to_string(),
                            value: log::member_value(&p),
                        })
                        .lease(self.shared.settings.session_timeout)
                        .event(event)
                    })
                    .collect();
                if let Err(error) = self.shared.bus.roster_apply(&self.log, ops, &self.shared.limits).await {
                    tracing::warn!(design_id = %self.design_id, %error, "presence could not be sent");
                }
                continue;
            }
            let wait = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.flush.notified() => {}
                _ = wait => {}
            }
        }
    }

    // --- following the log ---

    async fn follow(self: Arc<Self>, tail: BoxStream<'static, csp_bus::Result<Event>>) {
        let mut batches = tail.ready_chunks(256);
        loop {
            let batch = tokio::select! {
                _ = self.stop.cancelled() => return,
                batch = batches.next() => batch,
            };
            let ended = batch.is_none();
            let mut events = Vec::new();
            let mut failed = None;
            for item in batch.into_iter().flatten() {
                match item {
                    Ok(event) => events.push(event),
                    Err(e) => failed = Some(e),
                }
            }
            if !events.is_empty() {
                let aftermath = self.apply(events);
                self.settle(aftermath).await;
            }
            if ended || failed.is_some() {
                if let Some(error) = &failed {
                    tracing::warn!(design_id = %self.design_id, %error, "lost the session log; following it again");
                }
                batches = loop {
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(BACKOFF) => {}
                    }
                    match self.reopen(matches!(failed, Some(BusError::Truncated { .. }))).await {
                        Ok(tail) => break tail.ready_chunks(256),
                        Err(error) => {
                            tracing::warn!(design_id = %self.design_id, %error, "cannot follow the session log")
                        }
                    }
                };
            }
        }
    }

    /// Follows the log again from where the room is; when events were lost (trimmed before
    /// they were read), starts over from the roster and gives every client a fresh snapshot.
    async fn reopen(&self, lost: bool) -> csp_bus::Result<BoxStream<'static, csp_bus::Result<Event>>> {
        if lost {
            let snapshot = self.shared.bus.roster_snapshot(&self.log).await?;
            let mut state = lock(&self.state);
            state.cursor = snapshot.last_id.unwrap_or(EventId::ZERO);
            state.participants = snapshot
                .members
                .iter()
                .filter_map(|m| log::member(&m.value))
                .map(|p| (p.session.clone(), p))
                .collect();
            if let Some(mark) = snapshot.marks.get(log::DESIGN_SOURCE) {
                state.revision = state.revision.max(mark.key.ms as i64);
            }
            for client in state.clients.values() {
                client.outbox.demand_resync();
            }
        }
        let cursor = lock(&self.state).cursor;
        self.shared.bus.tail(&self.log, Some(cursor)).await
    }

    /// Applies log events to the room and fans them out.
    fn apply(&self, events: Vec<Event>) -> Aftermath {
        let mut aftermath = Aftermath::default();
        let mut left = Vec::new();
        let mut state = lock(&self.state);
        for event in events {
            if event.id <= state.cursor {
                continue;
            }
            state.cursor = event.id;
            let Some(decoded) = log::read(&event) else {
                metrics::counter!("csp_collab_malformed_entries_total").increment(1);
                tracing::debug!(design_id = %self.design_id, id = %event.id, "skipped an entry that is not a session event");
                continue;
            };
            let decoded = Arc::new(decoded);
            match &decoded.what {
                Happening::Joined(p) => {
                    state.participants.insert(p.session.clone(), p.clone());
                }
                Happening::Left { session, .. } => {
                    state.participants.remove(session);
                    left.push(session.clone());
                }
                Happening::Presence { session, presence } => {
                    if let Some(p) = state.participants.get_mut(session) {
                        p.presence = presence.clone();
                    }
                }
                Happening::DesignChanged(change) => {
                    state.revision = state.revision.max(change.revision);
                    self.relayed.fetch_max(change.revision, Ordering::SeqCst);
                    if change.deleted {
                        aftermath.end.extend(
                            state
                                .participants
                                .values()
                                .map(|p| (p.session.clone(), p.user_id.clone(), LeaveReason::DesignDeleted)),
                        );
                    }
                }
                Happening::AccessChanged { user_id, access } => match access {
                    Some(access) => {
                        for p in state.participants.values_mut().filter(|p| &p.user_id == user_id) {
                            p.access = *access;
                        }
                    }
                    None => aftermath.end.extend(
                        state
                            .participants
                            .values()
                            .filter(|p| &p.user_id == user_id)
                            .map(|p| (p.session.clone(), p.user_id.clone(), LeaveReason::AccessRevoked)),
                    ),
                },
                Happening::ExecutionStatus { .. } => {}
            }
            self.fan_out(&mut state, &decoded);
        }
        drop(state);
        if !left.is_empty() {
            let mut throttle = lock(&self.throttle);
            for session in left {
                throttle.slots.remove(&session);
            }
        }
        aftermath
    }

    fn fan_out(&self, state: &mut State, event: &Arc<LogEvent>) {
        let stats = &self.shared.stats;
        let (from, ends) = match &event.what {
            Happening::Presence { session, .. } => (Some(session), None),
            Happening::Left { session, .. } => (None, Some(session)),
            _ => (None, None),
        };
        let cursor = state.cursor;
        let mut ready = Vec::new();
        for (id, client) in &mut state.clients {
            match &client.waiting {
                Some(Waiting::Snapshot { min, .. }) => {
                    if cursor >= *min {
                        ready.push(*id);
                    }
                    continue;
                }
                Some(Waiting::Cursor(after)) if event.id <= *after => continue,
                Some(Waiting::Cursor(_)) => {
                    client.waiting = None;
                    state.waiting -= 1;
                }
                None => {}
            }
            if from == Some(&client.session) {
                continue;
            }
            match client.outbox.push(event) {
                Pushed::Overflowed(dropped) => {
                    stats.dropped(dropped);
                }
                Pushed::Queued | Pushed::Coalesced | Pushed::Covered | Pushed::Closed => {}
            }
            if ends == Some(&client.session) {
                client.outbox.close();
            }
        }
        for id in ready {
            let Some(client) = state.clients.get(&id) else { continue };
            let resync = matches!(client.waiting, Some(Waiting::Snapshot { resync: true, .. }));
            let snapshot = snapshot_of(state, &client.session, resync);
            if let Some(client) = state.clients.get_mut(&id) {
                client.outbox.restart(Outgoing::Snapshot(snapshot));
                client.waiting = None;
                state.waiting -= 1;
            }
        }
    }

    /// Ends sessions the log says must end (design deleted, access withdrawn). Every replica
    /// following the design tries; the roster lets one end each and announce it.
    async fn settle(&self, aftermath: Aftermath) {
        if aftermath.end.is_empty() {
            return;
        }
        let ops = aftermath
            .end
            .into_iter()
            .map(|(session, user_id, reason)| {
                let event = log::entry(&Happening::Left { session: session.clone(), user_id, reason });
                Op::new(Change::Remove { member: session.to_string() }).event(event)
            })
            .collect();
        if let Err(error) = self.shared.bus.roster_apply(&self.log, ops, &self.shared.limits).await {
            tracing::warn!(design_id = %self.design_id, %error, "cannot end sessions");
        }
    }

    // --- relaying the design's and the executor's streams ---

    async fn relay(self: Arc<Self>, marks: BTreeMap<String, Mark>) {
        let mut relay = Relayer { marks, waiting: BTreeMap::new(), deadline: None, room: self.clone() };
        let mut sources = relay.open().await;
        loop {
            let deadline = relay.deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let outcome = tokio::select! {
                _ = self.stop.cancelled() => return,
                event = sources.design.next() => relay.design(event).await,
                event = sources.executions.next() => relay.execution(event).await,
                _ = tokio::time::sleep_until(deadline.into()) => relay.drain(true).await,
                _ = self.hint.notified() => {
                    relay.hinted();
                    Ok(())
                }
            };
            if let Err(error) = outcome {
                tracing::warn!(design_id = %self.design_id, %error, "cannot relay into the session log; following again");
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep(BACKOFF) => {}
                }
                if let Ok(snapshot) = self.shared.bus.roster_snapshot(&self.log).await {
                    relay.marks = snapshot.marks;
                }
                sources = relay.open().await;
            }
        }
    }
}

/// A room's state as a snapshot for one client.
fn snapshot_of(state: &State, session: &SessionId, resync: bool) -> Snapshot {
    let mut participants: Vec<Participant> = state.participants.values().cloned().collect();
    participants.sort_by(|a, b| (a.joined_at_ms, &a.session).cmp(&(b.joined_at_ms, &b.session)));
    Snapshot {
        at: state.cursor,
        session: session.clone(),
        participants,
        design_revision: state.revision,
        resync,
    }
}

struct Sources {
    design: BoxStream<'static, csp_bus::Result<Event>>,
    executions: BoxStream<'static, csp_bus::Result<Event>>,
}

/// A design change waiting for the one before it.
struct Held {
    change: DesignChange,
    source: Event,
}

/// The relay task's state.
struct Relayer {
    marks: BTreeMap<String, Mark>,
    /// Changes by revision, not yet relayed.
    waiting: BTreeMap<i64, Held>,
    /// When the first waiting change stops waiting for its predecessor.
    deadline: Option<Instant>,
    room: Arc<Room>,
}

impl Relayer {
    fn mark(&self, source: &str) -> Option<Mark> {
        self.marks.get(source).copied()
    }

    /// Follows the sources from where their last relayed events were (or from now).
    async fn open(&mut self) -> Sources {
        let bus = &self.room.shared.bus;
        let from = [self.mark(log::DESIGN_SOURCE), self.mark(log::ACCESS_SOURCE)]
            .into_iter()
            .flatten()
            .map(|m| m.from)
            .filter(|from| *from != EventId::ZERO)
            .min();
        let design = follow(bus, &log::design_stream(&self.room.design_id), from).await;
        let from = self.mark(log::EXECUTIONS_SOURCE).map(|m| m.from);
        let executions = follow(bus, &log::executions_stream(&self.room.design_id), from).await;
        Sources { design, executions }
    }

    async fn design(&mut self, event: Option<csp_bus::Result<Event>>) -> csp_bus::Result<()> {
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(e)) => return Err(e),
            None => return Err(BusError::Unavailable("the design stream ended".into())),
        };
        match log::design_event(&event) {
            Some(DesignEvent::Changed { revision, author_id, deleted, ops }) => {
                if revision > self.room.relayed.load(Ordering::SeqCst) {
                    let change =
                        DesignChange { revision, previous_revision: revision - 1, author_id, deleted, ops };
                    self.waiting.insert(revision, Held { change, source: event });
                }
                self.drain(false).await
            }
            Some(DesignEvent::Access { user_id, access }) => {
                let known = self.mark(log::ACCESS_SOURCE).map_or(EventId::ZERO, |m| m.key);
                if event.id <= known {
                    return Ok(());
                }
                let what = Happening::AccessChanged { user_id: user_id.clone(), access };
                let relay = Relay {
                    source: log::ACCESS_SOURCE.into(),
                    key: event.id,
                    from: Some(event.id),
                    contiguous: false,
                    event: Some(log::relayed(&what, &event)),
                };
                let outcome = self
                    .room
                    .shared
                    .bus
                    .roster_relay(&self.room.log, relay, &self.room.shared.limits)
                    .await?;
                match outcome {
                    Relayed::Appended(_) => {
                        self.marks.insert(log::ACCESS_SOURCE.into(), Mark { key: event.id, from: event.id });
                        if let Some(access) = access {
                            self.rewrite_access(&user_id, access).await?;
                        }
                    }
                    Relayed::Stale(mark) | Relayed::Gap(mark) => {
                        self.marks.insert(log::ACCESS_SOURCE.into(), mark);
                    }
                }
                Ok(())
            }
            None => {
                metrics::counter!("csp_collab_malformed_entries_total").increment(1);
                Ok(())
            }
        }
    }

    /// Stores a user's new access in their sessions' roster values (the relay that announced
    /// it does this), so rooms opened later start with it.
    async fn rewrite_access(&self, user_id: &str, access: crate::model::Access) -> csp_bus::Result<()> {
        let ops: Vec<Op> = lock(&self.room.state)
            .participants
            .values()
            .filter(|p| p.user_id == user_id)
            .map(|p| {
                let updated = Participant { access, ..p.clone() };
                Op::new(Change::Update { member: p.session.to_string(), value: log::member_value(&updated) })
            })
            .collect();
        if !ops.is_empty() {
            self.room.shared.bus.roster_apply(&self.room.log, ops, &self.room.shared.limits).await?;
        }
        Ok(())
    }

    async fn execution(&mut self, event: Option<csp_bus::Result<Event>>) -> csp_bus::Result<()> {
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(e)) => return Err(e),
            None => return Err(BusError::Unavailable("the executions stream ended".into())),
        };
        let known = self.mark(log::EXECUTIONS_SOURCE).map_or(EventId::ZERO, |m| m.key);
        if event.id <= known {
            return Ok(());
        }
        let Some(what) = log::execution_event(&event) else {
            metrics::counter!("csp_collab_malformed_entries_total").increment(1);
            return Ok(());
        };
        let relay = Relay {
            source: log::EXECUTIONS_SOURCE.into(),
            key: event.id,
            from: Some(event.id),
            contiguous: false,
            event: Some(log::relayed(&what, &event)),
        };
        let mark =
            match self.room.shared.bus.roster_relay(&self.room.log, relay, &self.room.shared.limits).await? {
                Relayed::Appended(_) => Mark { key: event.id, from: event.id },
                Relayed::Stale(mark) | Relayed::Gap(mark) => mark,
            };
        self.marks.insert(log::EXECUTIONS_SOURCE.into(), mark);
        Ok(())
    }

    /// A join saw a newer revision than the log has: wait for it like for a missing change.
    fn hinted(&mut self) {
        if self.room.hinted.load(Ordering::SeqCst) > self.room.relayed.load(Ordering::SeqCst)
            && self.deadline.is_none()
        {
            self.deadline = Some(Instant::now() + self.room.shared.settings.reorder_wait);
        }
    }

    /// Relays waiting changes in revision order; with `force`, the first one goes even if its
    /// predecessor never came (the deadline passed).
    async fn drain(&mut self, mut force: bool) -> csp_bus::Result<()> {
        loop {
            let known = self.room.relayed.load(Ordering::SeqCst);
            self.waiting.retain(|revision, _| *revision > known);
            let hinted = self.room.hinted.load(Ordering::SeqCst);
            let Some(&revision) = self.waiting.keys().next() else {
                // Nothing waits; a join may have seen a revision the log never got.
                if force && hinted > known {
                    self.deadline = None;
                    return self.mark_revision(hinted, known).await;
                }
                if hinted <= known {
                    self.deadline = None;
                } else if self.deadline.is_none() {
                    self.deadline = Some(Instant::now() + self.room.shared.settings.reorder_wait);
                }
                return Ok(());
            };
            let contiguous = revision == known + 1;
            if !contiguous && !force {
                self.deadline.get_or_insert_with(|| Instant::now() + self.room.shared.settings.reorder_wait);
                return Ok(());
            }
            force = false;
            self.deadline = None;
            let Some(Held { mut change, source }) = self.waiting.remove(&revision) else { continue };
            change.previous_revision = known;
            let what = Happening::DesignChanged(change.clone());
            let relay = Relay {
                source: log::DESIGN_SOURCE.into(),
                key: EventId::new(revision as u64, 0),
                from: Some(source.id),
                contiguous,
                event: Some(log::relayed(&what, &source)),
            };
            match self.room.shared.bus.roster_relay(&self.room.log, relay, &self.room.shared.limits).await? {
                Relayed::Appended(_) => {
                    self.room.relayed.fetch_max(revision, Ordering::SeqCst);
                    self.marks.insert(
                        log::DESIGN_SOURCE.into(),
                        Mark { key: EventId::new(revision as u64, 0), from: source.id },
                    );
                }
                Relayed::Stale(mark) => {
                    self.room.relayed.fetch_max(mark.key.ms as i64, Ordering::SeqCst);
                }
                Relayed::Gap(mark) => {
                    // The log is behind what this room thought: wait for the missing ones.
                    self.room.relayed.store(mark.key.ms as i64, Ordering::SeqCst);
                    change.previous_revision = revision - 1;
                    self.waiting.insert(revision, Held { change, source });
                }
            }
        }
    }

    /// Brings the log to `revision` with a change that has no ops (its predecessors were lost).
    async fn mark_revision(&mut self, revision: i64, known: i64) -> csp_bus::Result<()> {
        let what = Happening::DesignChanged(DesignChange {
            revision,
            previous_revision: known,
            author_id: String::new(),
            deleted: false,
            ops: Ops::default(),
        });
        let relay = Relay {
            source: log::DESIGN_SOURCE.into(),
            key: EventId::new(revision as u64, 0),
            from: None,
            contiguous: false,
            event: Some(log::entry(&what)),
        };
        let reached =
            match self.room.shared.bus.roster_relay(&self.room.log, relay, &self.room.shared.limits).await? {
                Relayed::Appended(_) => revision,
                Relayed::Stale(mark) | Relayed::Gap(mark) => mark.key.ms as i64,
            };
        self.room.relayed.fetch_max(reached, Ordering::SeqCst);
        Ok(())
    }
}

/// Follows a source stream after `from` (or from now); one whose kept events no longer reach
/// back that far is followed from now, and one that cannot be read now never yields (the
/// relay retries after an error elsewhere, or the next open).
async fn follow(
    bus: &SharedBus,
    stream: &str,
    from: Option<EventId>,
) -> BoxStream<'static, csp_bus::Result<Event>> {
    match bus.tail(stream, from).await {
        Ok(tail) => tail,
        Err(BusError::Truncated { .. }) => match bus.tail(stream, None).await {
            Ok(tail) => tail,
            Err(error) => futures::stream::once(async move { Err(error) }).boxed(),
        },
        Err(error) => futures::stream::once(async move { Err(error) }).boxed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Presence;

    #[test]
    fn snapshots_list_participants_in_joining_order() {
        let design = "0192b5c8-7f00-7000-8000-000000000001";
        let mut state = State { cursor: EventId::new(5, 1), revision: 3, ..Default::default() };
        for (n, user) in ["b", "a", "c"].iter().enumerate() {
            let session = SessionId::new(design);
            state.participants.insert(
                session.clone(),
                Participant {
                    session,
                    user_id: (*user).into(),
                    display_name: (*user).into(),
                    color: crate::model::color_of(user),
                    access: crate::model::Access::Editor,
                    presence: Presence::default(),
                    joined_at_ms: n as i64,
                },
            );
        }
        let me = SessionId::new(design);
        let snapshot = snapshot_of(&state, &me, false);
        let users: Vec<&str> = snapshot.participants.iter().map(|p| p.user_id.as_str()).collect();
        assert_eq!(users, ["b", "a", "c"]);
        assert_eq!((snapshot.at, snapshot.design_revision, snapshot.session), (EventId::new(5, 1), 3, me));
    }
}

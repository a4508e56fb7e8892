//! The service's operations — join, presence, heartbeat, leave, stats — and the replica's
//! background work: ending sessions whose heartbeats stopped (also those of replicas that
//! died), reporting its counters to the others, and closing rooms nobody uses here.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use csp_bus::{
    EventId, SharedBus,
    roster::{Change, Op, RosterLimits},
};
use csp_platform::{FieldViolation, Settings, auth::Principal, config::ConfigError};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use crate::{
    client::ClientStream,
    designs::{Credentials, Designs},
    error::Error,
    log,
    model::{Happening, LeaveReason, Participant, Presence, SessionId, color_of},
    outbox::Outbox,
    room::{Room, Shared, Start},
    stats::{Report, Stats},
};

/// How often a replica reports its counters, and how long a report counts.
const REPORT_EVERY: Duration = Duration::from_secs(2);
const REPORT_LEASE: Duration = Duration::from_secs(10);
/// Designs listed by GetStats.
const BUSIEST: usize = 100;

/// A Join as the service takes it.
#[derive(Debug, Default)]
pub(crate) struct JoinRequest {
    pub(crate) design_id: String,
    pub(crate) after_event_id: String,
    pub(crate) session_id: String,
    pub(crate) presence: Presence,
}

/// Counters of this replica and of the cluster.
#[derive(Debug, Default)]
pub(crate) struct ClusterStats {
    pub(crate) here: Report,
    pub(crate) cluster: Report,
    pub(crate) replicas: usize,
    pub(crate) sessions: u64,
    /// Sessions per design, busiest first.
    pub(crate) designs: Vec<(String, u64)>,
}

type Rooms = HashMap<String, Arc<OnceCell<Arc<Room>>>>;

/// The collaboration service's state on this replica.
pub(crate) struct Collab {
    shared: Arc<Shared>,
    designs: Designs,
    rooms: Mutex<Rooms>,
    /// This replica's name among the others.
    replica: String,
}

fn lock(rooms: &Mutex<Rooms>) -> std::sync::MutexGuard<'_, Rooms> {
    rooms.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn check_design_id(id: &str, v: &mut Vec<FieldViolation>) {
    if id.is_empty() {
        v.push(FieldViolation::new("design_id", "is required"));
    } else if uuid::Uuid::parse_str(id).is_err() || id.len() != 36 {
        v.push(FieldViolation::new("design_id", "is not a design id (a UUID)"));
    }
}

fn parse_session(text: &str) -> Result<SessionId, Error> {
    if text.is_empty() {
        return Err(Error::field("session_id", "is required"));
    }
    SessionId::parse(text).ok_or_else(|| Error::field("session_id", "is not a session id from Join"))
}

impl Collab {
    pub(crate) fn new(bus: SharedBus, settings: &Settings) -> Result<Arc<Self>, ConfigError> {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "collab".into());
        Ok(Arc::new(Self {
            shared: Arc::new(Shared::new(bus, settings.collab.clone(), Arc::new(Stats::new()))),
            designs: Designs::new(settings)?,
            rooms: Mutex::new(HashMap::new()),
            replica: format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        }))
    }

    fn bus(&self) -> &SharedBus {
        &self.shared.bus
    }

    fn limits(&self) -> &RosterLimits {
        &self.shared.limits
    }

    pub(crate) fn heartbeat_seconds(&self) -> i32 {
        self.shared.settings.heartbeat_interval.as_secs().max(1) as i32
    }

    pub(crate) fn timeout_seconds(&self) -> i32 {
        self.shared.settings.session_timeout.as_secs().max(1) as i32
    }

    /// The design's room on this replica, opened (and brought to `revision`) if needed.
    async fn room(&self, design_id: &str, revision: i64) -> Result<Arc<Room>, Error> {
        let cell = lock(&self.rooms).entry(design_id.to_owned()).or_default().clone();
        let opened = cell.get_or_try_init(|| Room::open(design_id, revision, self.shared.clone())).await;
        match opened {
            Ok(room) => {
                room.hint(revision);
                Ok(room.clone())
            }
            Err(e) => {
                let mut rooms = lock(&self.rooms);
                if rooms.get(design_id).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                    rooms.remove(design_id);
                }
                Err(e.into())
            }
        }
    }

    /// The design's room if this replica follows it.
    fn open_room(&self, design_id: &str) -> Option<Arc<Room>> {
        lock(&self.rooms).get(design_id).and_then(|cell| cell.get().cloned())
    }

    /// A session of the caller, as the room knows it or, failing that, as the roster does.
    async fn own_session(&self, p: &Principal, session: &SessionId) -> Result<Participant, Error> {
        let known = self.open_room(session.design_id()).and_then(|room| room.participant(session));
        let participant = match known {
            Some(participant) => participant,
            None => self
                .bus()
                .roster_member(&log::name(session.design_id()), session.as_str())
                .await?
                .and_then(|m| log::member(&m.value))
                .ok_or_else(Error::no_session)?,
        };
        if participant.user_id != p.user_id {
            return Err(Error::no_session());
        }
        Ok(participant)
    }

    // --- RPCs ---

    /// Enters (or resumes) a session and returns its stream.
    pub(crate) async fn join(
        &self,
        p: &Principal,
        credentials: &Credentials,
        request: JoinRequest,
    ) -> Result<ClientStream, Error> {
        let settings = &self.shared.settings;
        let mut v = Vec::new();
        check_design_id(&request.design_id, &mut v);
        let design_id = request.design_id.as_str();
        let wanted = if request.session_id.is_empty() {
            None
        } else {
            match SessionId::parse(&request.session_id) {
                Some(session) if session.design_id() == design_id => Some(session),
                Some(_) => {
                    v.push(FieldViolation::new("session_id", "is a session of another design"));
                    None
                }
                None => {
                    v.push(FieldViolation::new("session_id", "is not a session id from Join"));
                    None
                }
            }
        };
        let after = if request.after_event_id.is_empty() {
            None
        } else {
            match request.after_event_id.parse::<EventId>() {
                Ok(id) if request.after_event_id.len() <= 41 => Some(id),
                _ => {
                    v.push(FieldViolation::new("after_event_id", "is not an event id from this service"));
                    None
                }
            }
        };
        v.extend(request.presence.check(settings, "presence"));
        if !v.is_empty() {
            return Err(Error::fields(v));
        }

        let (access, revision) = self.designs.access(credentials, design_id).await?;
        let mut room = self.room(design_id, revision).await?;
        let log = room.log().to_owned();
        let lease = settings.session_timeout;

        // Resume the caller's live session, or start a new one.
        let mut resumed = None;
        let member = match &wanted {
            Some(session) => self.bus().roster_member(&log, session.as_str()).await?,
            None => None,
        };
        if let (Some(session), Some(member)) = (wanted, member) {
            let participant = log::member(&member.value).ok_or_else(Error::no_session)?;
            if participant.user_id != p.user_id {
                return Err(Error::no_session());
            }
            let renew = Op::new(Change::Renew { member: session.to_string() }).lease(lease);
            let renewed = self.bus().roster_apply(&log, vec![renew], self.limits()).await?;
            if renewed.first().is_some_and(|a| a.applied) {
                resumed = Some(participant);
            }
        }
        let (session, joined) = match resumed {
            Some(participant) => {
                if request.presence != Presence::default() {
                    room.update_presence(Participant { presence: request.presence, ..participant.clone() });
                }
                (participant.session, None)
            }
            None => {
                let (everyone, yours) = room.population(&p.user_id);
                if everyone >= settings.max_sessions_per_design {
                    return Err(Error::Exhausted(format!(
                        "the design has the most sessions allowed ({}); try again later",
                        settings.max_sessions_per_design
                    )));
                }
                if yours >= settings.max_sessions_per_user {
                    return Err(Error::Exhausted(format!(
                        "you have the most sessions allowed on this design ({}); leave one first",
                        settings.max_sessions_per_user
                    )));
                }
                let participant = Participant {
                    session: SessionId::new(design_id),
                    user_id: p.user_id.clone(),
                    display_name: if p.username.is_empty() { p.user_id.clone() } else { p.username.clone() },
                    color: color_of(&p.user_id),
                    access,
                    presence: request.presence,
                    joined_at_ms: csp_platform::auth::now_millis(),
                };
                let put = Op::new(Change::Put {
                    member: participant.session.to_string(),
                    value: log::member_value(&participant),
                })
                .lease(lease)
                .event(log::entry(&Happening::Joined(participant.clone())));
                let applied = self.bus().roster_apply(&log, vec![put], self.limits()).await?;
                (participant.session, applied.first().and_then(|a| a.event))
            }
        };
        metrics::counter!("csp_collab_joins_total").increment(1);

        let start = match (after, joined) {
            (Some(after), None) => {
                let last = self.bus().last_id(&log).await?.unwrap_or(EventId::ZERO);
                if after > last {
                    // Not a position of this log (it was reset, or the id is made up).
                    Start::Snapshot { min: EventId::ZERO, resync: true }
                } else {
                    Start::Resume { after }
                }
            }
            // The session it asked to resume has ended: a snapshot names the new one.
            (Some(_), Some(joined)) => Start::Snapshot { min: joined, resync: true },
            (None, joined) => Start::Snapshot { min: joined.unwrap_or(EventId::ZERO), resync: false },
        };
        loop {
            let outbox = Outbox::new(settings.send_queue);
            match room.attach(session.clone(), outbox.clone(), start) {
                Ok(attached) => {
                    return Ok(ClientStream {
                        room,
                        id: attached.id,
                        session,
                        outbox,
                        replay: attached.replay,
                    });
                }
                // Closed for being idle just now: open it again.
                Err(_) => room = self.room(design_id, revision).await?,
            }
        }
    }

    /// Moves a session's presence (and keeps it alive).
    pub(crate) async fn update_presence(
        &self,
        p: &Principal,
        session: &str,
        presence: Presence,
    ) -> Result<(), Error> {
        let session = parse_session(session)?;
        let v = presence.check(&self.shared.settings, "presence");
        if !v.is_empty() {
            return Err(Error::fields(v));
        }
        let participant = self.own_session(p, &session).await?;
        let room = match self.open_room(session.design_id()) {
            Some(room) => room,
            None => self.room(session.design_id(), 0).await?,
        };
        room.touch();
        room.update_presence(Participant { presence, ..participant });
        Ok(())
    }

    /// Keeps a session alive; returns when it expires (ms since the epoch).
    pub(crate) async fn heartbeat(&self, p: &Principal, session: &str) -> Result<i64, Error> {
        let session = parse_session(session)?;
        self.own_session(p, &session).await?;
        let renew = Op::new(Change::Renew { member: session.to_string() })
            .lease(self.shared.settings.session_timeout);
        let applied =
            self.bus().roster_apply(&log::name(session.design_id()), vec![renew], self.limits()).await?;
        match applied.first() {
            Some(a) if a.applied => Ok(a.expires_at_ms.unwrap_or_default() as i64),
            _ => Err(Error::no_session()),
        }
    }

    /// Ends a session; everyone sees it leave.
    pub(crate) async fn leave(&self, p: &Principal, session: &str) -> Result<(), Error> {
        let session = parse_session(session)?;
        let participant = self.own_session(p, &session).await?;
        let event = log::entry(&Happening::Left {
            session: session.clone(),
            user_id: participant.user_id,
            reason: LeaveReason::Left,
        });
        let remove = Op::new(Change::Remove { member: session.to_string() }).event(event);
        let applied =
            self.bus().roster_apply(&log::name(session.design_id()), vec![remove], self.limits()).await?;
        if applied.first().is_some_and(|a| a.applied) { Ok(()) } else { Err(Error::no_session()) }
    }

    /// Counters of this replica and of the cluster (admins).
    pub(crate) async fn stats(&self, p: &Principal) -> Result<ClusterStats, Error> {
        if !p.is_admin() {
            return Err(Error::Forbidden("only admins may read the collaboration statistics".into()));
        }
        let here = self.shared.stats.report();
        let replicas = self.bus().roster_snapshot(log::REPLICAS).await?;
        let mut cluster = Report::default();
        let mut reporting = 0;
        for member in &replicas.members {
            if member.expires_at_ms.is_some_and(|at| at <= replicas.now_ms) {
                continue;
            }
            if let Ok(report) = serde_json::from_slice::<Report>(&member.value) {
                reporting += 1;
                cluster.connections += report.connections;
                cluster.events_per_second += report.events_per_second;
                cluster.events_total += report.events_total;
            }
        }
        let counts = self.bus().roster_counts(log::KIND).await?;
        let sessions = counts.values().sum();
        let mut designs: Vec<(String, u64)> = counts
            .into_iter()
            .map(|(roster, n)| {
                (roster.strip_prefix(&format!("{}:", log::KIND)).unwrap_or(&roster).to_owned(), n)
            })
            .collect();
        designs.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        designs.truncate(BUSIEST);
        Ok(ClusterStats { here, cluster, replicas: reporting, sessions, designs })
    }

    // --- background work ---

    /// Runs the replica's background work until `stop`.
    pub(crate) async fn run_background(self: Arc<Self>, stop: CancellationToken) {
        let mut sweep = tokio::time::interval(self.shared.settings.sweep_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut report = tokio::time::interval(REPORT_EVERY);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = sweep.tick() => {
                    if let Err(error) = self.sweep().await {
                        tracing::warn!(%error, "cannot look for timed-out sessions");
                    }
                }
                _ = report.tick() => {
                    if let Err(error) = self.report().await {
                        tracing::warn!(%error, "cannot report this replica's counters");
                    }
                    self.close_idle_rooms();
                }
            }
        }
        for cell in lock(&self.rooms).drain().map(|(_, cell)| cell) {
            if let Some(room) = cell.get() {
                room.shut();
            }
        }
    }

    /// Ends the sessions whose lease ran out, whichever replica held them.
    pub(crate) async fn sweep(&self) -> Result<(), Error> {
        let expired = self.bus().roster_expired(log::KIND, 256).await?;
        let mut by_roster: HashMap<String, Vec<String>> = HashMap::new();
        for (roster, member) in expired {
            by_roster.entry(roster).or_default().push(member);
        }
        for (roster, members) in by_roster {
            let mut ops = Vec::with_capacity(members.len());
            for member in members {
                let user_id = self
                    .bus()
                    .roster_member(&roster, &member)
                    .await?
                    .and_then(|m| log::member(&m.value))
                    .map(|p| p.user_id);
                let mut op = Op::new(Change::Expire { member: member.clone() });
                if let (Some(session), Some(user_id)) = (SessionId::parse(&member), user_id) {
                    op = op.event(log::entry(&Happening::Left {
                        session,
                        user_id,
                        reason: LeaveReason::TimedOut,
                    }));
                }
                ops.push(op);
            }
            self.bus().roster_apply(&roster, ops, self.limits()).await?;
        }
        let gone = self.bus().roster_expired(csp_bus::roster::kind_of(log::REPLICAS), 64).await?;
        let ops: Vec<Op> = gone.into_iter().map(|(_, member)| Op::new(Change::Expire { member })).collect();
        if !ops.is_empty() {
            self.bus().roster_apply(log::REPLICAS, ops, self.limits()).await?;
        }
        Ok(())
    }

    /// Tells the other replicas this one's counters.
    async fn report(&self) -> Result<(), Error> {
        let report = self.shared.stats.report();
        let value = serde_json::to_vec(&report).map_err(|e| Error::Internal(e.to_string()))?;
        let put =
            Op::new(Change::Put { member: self.replica.clone(), value: value.into() }).lease(REPORT_LEASE);
        self.bus().roster_apply(log::REPLICAS, vec![put], self.limits()).await?;
        let sessions: u64 = self.bus().roster_counts(log::KIND).await?.values().sum();
        metrics::gauge!("csp_collab_sessions").set(sessions as f64);
        Ok(())
    }

    fn close_idle_rooms(&self) {
        let idle = self.shared.settings.room_idle;
        lock(&self.rooms).retain(|_, cell| !cell.get().is_some_and(|room| room.close_if_idle(idle)));
    }
}

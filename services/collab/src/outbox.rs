//! A client stream's bounded send queue.
//!
//! A room pushes every event to every client's outbox without ever waiting: a client that
//! does not read cannot slow the room, the replica or the other clients. Up to `capacity`
//! events queue in order. Beyond that, presence is coalesced — one pending update per session,
//! the latest — and the first other event that does not fit drops the queue and marks the
//! client for a resync: it will get a fresh snapshot instead of what it missed. Memory per
//! client is bounded by the capacity plus one presence per participant.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::Notify;

use crate::model::{Happening, LogEvent, Outgoing, SessionId};

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    Queued,
    /// Replaced a pending presence of the same session.
    Coalesced,
    /// The queue overflowed: this many events were dropped, and a resync is due.
    Overflowed(usize),
    /// A resync is already due: the event is covered by the coming snapshot.
    Covered,
    /// The outbox is closed.
    Closed,
}

/// What the client's writer takes next.
#[derive(Debug)]
pub(crate) enum Next {
    Send(Outgoing),
    /// The client fell behind: it needs a fresh snapshot.
    Resync,
    /// Everything was sent and the outbox is closed.
    End,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Outgoing>,
    /// Pending presence, one per session, oldest first.
    presence: Vec<(SessionId, Arc<LogEvent>)>,
    resync: bool,
    closed: bool,
}

/// One client's queue. Pushed to by its room, drained by its stream.
pub(crate) struct Outbox {
    state: Mutex<State>,
    ready: Notify,
    capacity: usize,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self { state: Mutex::new(State::default()), ready: Notify::new(), capacity })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues an event of the log.
    pub(crate) fn push(&self, event: &Arc<LogEvent>) -> Pushed {
        let pushed = {
            let mut s = self.lock();
            if s.closed {
                return Pushed::Closed;
            }
            if s.resync {
                return Pushed::Covered;
            }
            match &event.what {
                Happening::Presence { session, .. }
                    if !s.presence.is_empty() || s.queue.len() >= self.capacity =>
                {
                    // Behind: keep only the latest presence of each session, in arrival order.
                    let replaced =
                        s.presence.iter().position(|(id, _)| id == session).map(|i| s.presence.remove(i));
                    s.presence.push((session.clone(), event.clone()));
                    if replaced.is_some() { Pushed::Coalesced } else { Pushed::Queued }
                }
                _ => {
                    // Pending presence goes first, so nothing is sent out of order.
                    if s.queue.len() + s.presence.len() < self.capacity {
                        let pending = std::mem::take(&mut s.presence);
                        s.queue.extend(pending.into_iter().map(|(_, e)| Outgoing::Event(e)));
                        s.queue.push_back(Outgoing::Event(event.clone()));
                        Pushed::Queued
                    } else {
                        let dropped = s.queue.len() + s.presence.len() + 1;
                        s.queue.clear();
                        s.presence.clear();
                        s.resync = true;
                        Pushed::Overflowed(dropped)
                    }
                }
            }
        };
        self.ready.notify_one();
        pushed
    }

    /// Replaces whatever is queued with a snapshot (the first, or a resync): what follows is
    /// after it.
    pub(crate) fn restart(&self, snapshot: Outgoing) {
        {
            let mut s = self.lock();
            s.queue.clear();
            s.presence.clear();
            s.resync = false;
            s.queue.push_back(snapshot);
        }
        self.ready.notify_one();
    }

    /// Asks for a resync: the queue is dropped and the next snapshot replaces it.
    pub(crate) fn demand_resync(&self) {
        {
            let mut s = self.lock();
            s.queue.clear();
            s.presence.clear();
            s.resync = true;
        }
        self.ready.notify_one();
    }

    /// Sends what is queued, then ends.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// Waits for what to send next.
    pub(crate) async fn next(&self) -> Next {
        loop {
            {
                let mut s = self.lock();
                if s.resync {
                    return Next::Resync;
                }
                if let Some(item) = s.queue.pop_front() {
                    return Next::Send(item);
                }
                if !s.presence.is_empty() {
                    let (_, event) = s.presence.remove(0);
                    return Next::Send(Outgoing::Event(event));
                }
                if s.closed {
                    return Next::End;
                }
            }
            // A push in between stored a permit: no wake-up is lost.
            self.ready.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use csp_bus::EventId;

    use super::*;
    use crate::model::{LeaveReason, Presence};

    const DESIGN: &str = "0192b5c8-7f00-7000-8000-000000000001";

    fn presence(n: u64, session: &SessionId) -> Arc<LogEvent> {
        Arc::new(LogEvent {
            id: EventId::new(n, 0),
            time_ms: 0,
            what: Happening::Presence { session: session.clone(), presence: Presence::default() },
        })
    }

    fn left(n: u64, session: &SessionId) -> Arc<LogEvent> {
        Arc::new(LogEvent {
            id: EventId::new(n, 0),
            time_ms: 0,
            what: Happening::Left {
                session: session.clone(),
                user_id: "u".into(),
                reason: LeaveReason::Left,
            },
        })
    }

    async fn ids(outbox: &Outbox, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        for _ in 0..n {
            match outbox.next().await {
                Next::Send(Outgoing::Event(e)) => out.push(e.id.ms),
                other => panic!("{other:?}"),
            }
        }
        out
    }

    #[tokio::test]
    async fn a_slow_reader_gets_the_latest_presence_in_order() {
        let (a, b) = (SessionId::new(DESIGN), SessionId::new(DESIGN));
        let outbox = Outbox::new(2);
        assert_eq!(outbox.push(&presence(1, &a)), Pushed::Queued);
        assert_eq!(outbox.push(&presence(2, &b)), Pushed::Queued);
        // Full: presence coalesces per session, latest wins, kept in arrival order.
        assert_eq!(outbox.push(&presence(3, &a)), Pushed::Queued);
        assert_eq!(outbox.push(&presence(4, &b)), Pushed::Queued);
        assert_eq!(outbox.push(&presence(5, &a)), Pushed::Coalesced);
        assert_eq!(ids(&outbox, 4).await, [1, 2, 4, 5]);
    }

    #[tokio::test]
    async fn other_events_never_overtake_pending_presence_and_overflow_asks_for_a_resync() {
        let (a, b) = (SessionId::new(DESIGN), SessionId::new(DESIGN));
        let outbox = Outbox::new(3);
        outbox.push(&presence(1, &a));
        outbox.push(&presence(2, &a));
        outbox.push(&presence(3, &a));
        outbox.push(&presence(4, &b)); // pending
        assert_eq!(ids(&outbox, 2).await, [1, 2]);
        // Room for the pending presence and the event, in order.
        assert_eq!(outbox.push(&left(5, &b)), Pushed::Queued);
        assert_eq!(ids(&outbox, 3).await, [3, 4, 5]);

        for n in 6..9 {
            outbox.push(&left(n, &a));
        }
        assert_eq!(outbox.push(&left(9, &a)), Pushed::Overflowed(4));
        assert_eq!(outbox.push(&left(10, &a)), Pushed::Covered);
        assert!(matches!(outbox.next().await, Next::Resync));
        let snapshot = crate::model::Snapshot {
            at: EventId::new(10, 0),
            session: a.clone(),
            participants: Vec::new(),
            design_revision: 1,
            resync: true,
        };
        outbox.restart(Outgoing::Snapshot(snapshot));
        assert!(matches!(outbox.next().await, Next::Send(Outgoing::Snapshot(_))));
        outbox.push(&left(11, &a));
        outbox.close();
        assert_eq!(ids(&outbox, 1).await, [11]);
        assert!(matches!(outbox.next().await, Next::End));
        assert_eq!(outbox.push(&left(12, &a)), Pushed::Closed);
    }
}

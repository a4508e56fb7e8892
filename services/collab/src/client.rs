//! One client's stream of events: a replay from the log first when it resumes, then its
//! outbox; a fresh snapshot whenever it fell behind.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use csp_bus::{BusError, EventId};
use futures::{Stream, stream};

use crate::{
    error::Error,
    log,
    model::{Happening, LogEvent, Outgoing, SessionId},
    outbox::{Next, Outbox},
    room::Room,
};

/// Log events read per page of a replay.
const PAGE: usize = 256;

/// A client attached to a room; detaches when dropped.
pub(crate) struct ClientStream {
    pub(crate) room: Arc<Room>,
    pub(crate) id: u64,
    pub(crate) session: SessionId,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) replay: Option<(EventId, EventId)>,
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        self.room.detach(self.id);
    }
}

struct Replay {
    after: EventId,
    until: EventId,
    ready: VecDeque<Arc<LogEvent>>,
}

struct Cursor {
    client: ClientStream,
    replay: Option<Replay>,
}

fn latency(event: &LogEvent) -> Duration {
    let now = csp_platform::auth::now_millis();
    Duration::from_millis(now.saturating_sub(event.id.ms as i64).max(0) as u64)
}

impl ClientStream {
    /// The session this stream belongs to.
    pub(crate) fn session(&self) -> &SessionId {
        &self.session
    }

    /// The events, in log order, as they become ready. Ends after the session's own
    /// `ParticipantLeft`; fails only when the log cannot be read for a replay.
    pub(crate) fn into_stream(mut self) -> impl Stream<Item = Result<Outgoing, Error>> + Send + 'static {
        let replay = self.replay.take().map(|(after, until)| Replay { after, until, ready: VecDeque::new() });
        stream::unfold(Some(Cursor { client: self, replay }), |state| async move {
            let mut cursor = state?;
            loop {
                if let Some(replay) = &mut cursor.replay {
                    if let Some(event) = replay.ready.pop_front() {
                        cursor.client.room.shared_stats().sent(latency(&event));
                        return Some((Ok(Outgoing::Event(event)), Some(cursor)));
                    }
                    match cursor.client.read_page(replay).await {
                        Ok(true) => continue,
                        Ok(false) => {
                            cursor.replay = None;
                            continue;
                        }
                        Err(Error::Bus(BusError::Truncated { .. })) => {
                            // What it asked for is no longer kept: a fresh snapshot instead.
                            cursor.replay = None;
                            cursor.client.outbox.demand_resync();
                            continue;
                        }
                        Err(e) => return Some((Err(e), None)),
                    }
                }
                match cursor.client.outbox.next().await {
                    Next::Send(out) => {
                        if let Outgoing::Event(event) = &out {
                            cursor.client.room.shared_stats().sent(latency(event));
                        }
                        return Some((Ok(out), Some(cursor)));
                    }
                    Next::Resync => cursor.client.room.resync(cursor.client.id),
                    Next::End => return None,
                }
            }
        })
    }

    /// Reads the next page of a replay; `false` once it is done.
    async fn read_page(&self, replay: &mut Replay) -> Result<bool, Error> {
        if replay.after >= replay.until {
            return Ok(false);
        }
        let bus = self.room.bus();
        let events = bus.read(self.room.log(), Some(replay.after), PAGE).await?;
        if events.is_empty() {
            return Ok(false);
        }
        for event in events {
            if event.id > replay.until {
                replay.after = replay.until;
                break;
            }
            replay.after = event.id;
            let Some(decoded) = log::read(&event) else { continue };
            if matches!(&decoded.what, Happening::Presence { session, .. } if *session == self.session) {
                continue;
            }
            replay.ready.push_back(Arc::new(decoded));
        }
        Ok(true)
    }
}

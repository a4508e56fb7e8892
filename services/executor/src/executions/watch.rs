//! WatchExecution: an execution's events, from where the client left off to its final status.

use std::{sync::Arc, time::Duration};

use csp_bus::EventId;
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;

use super::{
    Executor, Watched,
    events::{is_final, stream},
    lock,
};
use crate::{
    clients::{Access, Credentials},
    error::Error,
    repo,
    stored::Status,
};

/// A watch that hears nothing this long checks whether its execution has ended.
const WATCH_QUIET: Duration = Duration::from_secs(5);

impl Executor {
    pub(crate) async fn watch(
        self: &Arc<Self>,
        credentials: &Credentials,
        id: &str,
        after: &str,
    ) -> Result<impl Stream<Item = Result<Watched, Error>> + Send + 'static, Error> {
        let known = self.design_of.get(id);
        // Whether it has ended. One started here lately has ended if it ended here (its caller's
        // credentials are dropped then); else it is taken as live until a quiet stream says
        // otherwise.
        let mut finished = match known {
            Some(design_id) => {
                self.allowed(credentials, id, &design_id, Access::Viewer).await?;
                !lock(&self.credentials).contains_key(id)
            }
            None => Status::parse(&self.visible(credentials, id, Access::Viewer).await?.status).is_terminal(),
        };
        let after = if after.is_empty() {
            EventId::ZERO
        } else {
            after.parse::<EventId>().map_err(|e| Error::field("after_event_id", e.to_string()))?
        };
        // Ended, and the client has seen its last event: nothing will follow.
        if finished && self.bus.last_id(&stream(id)).await?.is_none_or(|last| last <= after) {
            return Ok(futures::stream::empty().boxed());
        }
        let events = match self.bus.tail(&stream(id), Some(after)).await {
            Ok(events) => events,
            Err(csp_bus::BusError::Truncated { trimmed_up_to, .. }) => {
                return Err(Error::precondition(
                    "EVENTS_TRIMMED",
                    format!(
                        "events up to {trimmed_up_to} are no longer kept (at most {} per execution); GetExecution has the final state",
                        self.events_kept()
                    ),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let id = id.to_owned();
        let db = self.db.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            // Until the final status event. Should that never come (the bus failed as the
            // execution ended), a quiet stream whose execution has ended in the database ends
            // too.
            let mut events = events;
            let mut quiet = tokio::time::interval(WATCH_QUIET);
            quiet.reset();
            let mut heard = false;
            loop {
                tokio::select! {
                    event = events.next() => {
                        heard = true;
                        let event = match event {
                            Some(Ok(event)) => event,
                            Some(Err(e)) => {
                                let _ = tx.send(Err(Error::Unavailable(e.to_string()))).await;
                                return;
                            }
                            None => return,
                        };
                        let end = is_final(&event);
                        let out = Watched { event_id: event.id, payload: event.payload };
                        if tx.send(Ok(out)).await.is_err() || end {
                            return;
                        }
                    }
                    _ = quiet.tick() => {
                        if !std::mem::take(&mut heard) {
                            if !finished {
                                finished = repo::get(&db, &id).await.ok().flatten()
                                    .is_some_and(|row| Status::parse(&row.status).is_terminal());
                            } else {
                                return;
                            }
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }
}

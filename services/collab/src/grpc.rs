//! The gRPC adapter of `csp.collab.v1.CollaborationService`.
//!
//! Every call needs the `collab.join` permission (GetStats: an admin). Joining also needs
//! access to the design, which the design service is asked with the caller's own token:
//! strangers get NOT_FOUND, as from the design service.

use std::{pin::Pin, sync::Arc};

use csp_platform::auth::{Permission, Principal, require};
use csp_proto::collab::v1::{self as pb, collaboration_service_server::CollaborationService};
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    convert,
    designs::Credentials,
    error::Error,
    sessions::{Collab, JoinRequest},
};

/// The service's gRPC face.
pub(crate) struct CollabApi {
    collab: Arc<Collab>,
}

impl CollabApi {
    pub(crate) fn new(collab: Arc<Collab>) -> Self {
        Self { collab }
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn credentials<T>(request: &Request<T>) -> Credentials {
    request.metadata().get("authorization").cloned()
}

fn join_request(r: pb::JoinRequest) -> JoinRequest {
    JoinRequest {
        design_id: r.design_id,
        after_event_id: r.after_event_id,
        session_id: r.session_id,
        presence: convert::presence_from_pb(r.presence.unwrap_or_default()),
    }
}

impl CollabApi {
    /// A session's events as API events.
    async fn events(
        &self,
        p: &Principal,
        credentials: &Credentials,
        request: pb::JoinRequest,
    ) -> Result<(String, impl Stream<Item = Result<pb::CollabEvent, Status>> + Send + 'static), Status> {
        let stream = self.collab.join(p, credentials, join_request(request)).await?;
        let session = stream.session().to_string();
        let (heartbeat, timeout) = (self.collab.heartbeat_seconds(), self.collab.timeout_seconds());
        let events = stream.into_stream().map(move |item| match item {
            Ok(out) => Ok(convert::outgoing_to_pb(&out, heartbeat, timeout)),
            Err(e) => Err(Status::from(e)),
        });
        Ok((session, events))
    }
}

#[tonic::async_trait]
impl CollaborationService for CollabApi {
    type JoinStream = EventStream<pb::JoinResponse>;
    type SessionStream = EventStream<pb::SessionResponse>;

    #[tracing::instrument(skip_all)]
    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<Self::JoinStream>, Status> {
        let p = require(&request, Permission::CollabJoin)?;
        let credentials = credentials(&request);
        let (_, events) = self.events(&p, &credentials, request.into_inner()).await?;
        Ok(Response::new(Box::pin(events.map(|e| e.map(|event| pb::JoinResponse { event: Some(event) })))))
    }

    #[tracing::instrument(skip_all)]
    async fn update_presence(
        &self,
        request: Request<pb::UpdatePresenceRequest>,
    ) -> Result<Response<pb::UpdatePresenceResponse>, Status> {
        let p = require(&request, Permission::CollabJoin)?;
        let r = request.into_inner();
        let presence = convert::presence_from_pb(r.presence.unwrap_or_default());
        self.collab.update_presence(&p, &r.session_id, presence).await?;
        Ok(Response::new(pb::UpdatePresenceResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let p = require(&request, Permission::CollabJoin)?;
        let expires = self.collab.heartbeat(&p, &request.get_ref().session_id).await?;
        Ok(Response::new(pb::HeartbeatResponse { expires_at: Some(convert::timestamp(expires)) }))
    }

    #[tracing::instrument(skip_all)]
    async fn leave(&self, request: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveResponse>, Status> {
        let p = require(&request, Permission::CollabJoin)?;
        self.collab.leave(&p, &request.get_ref().session_id).await?;
        Ok(Response::new(pb::LeaveResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn session(
        &self,
        request: Request<Streaming<pb::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let p = require(&request, Permission::CollabJoin)?;
        let credentials = credentials(&request);
        let mut inbound = request.into_inner();
        let join = match inbound.message().await? {
            Some(pb::SessionRequest { kind: Some(pb::session_request::Kind::Join(join)) }) => join,
            _ => return Err(Error::field("join", "the first message of a session must be a join").into()),
        };
        let (session, events) = self.events(&p, &credentials, join).await?;
        // Events and the answer to a bad client message share the way out.
        let (tx, rx) = mpsc::channel::<Result<pb::SessionResponse, Status>>(64);
        let ended = CancellationToken::new();
        let out = tx.clone();
        let done = ended.clone();
        let forward = tokio::spawn(async move {
            let mut events = Box::pin(events);
            while let Some(event) = events.next().await {
                if out.send(event.map(|event| pb::SessionResponse { event: Some(event) })).await.is_err() {
                    break;
                }
            }
            // The session ended (or the client went): stop reading it too.
            done.cancel();
        });
        let collab = self.collab.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = ended.cancelled() => return,
                    message = inbound.message() => message,
                };
                let outcome = match message {
                    Ok(Some(message)) => match message.kind {
                        Some(pb::session_request::Kind::Presence(presence)) => {
                            collab.update_presence(&p, &session, convert::presence_from_pb(presence)).await
                        }
                        Some(pb::session_request::Kind::Heartbeat(_)) => {
                            collab.heartbeat(&p, &session).await.map(|_| ())
                        }
                        // Ends the stream once the leave comes back through the log; so does
                        // the client closing its side.
                        Some(pb::session_request::Kind::Leave(_)) => {
                            return drop(collab.leave(&p, &session).await);
                        }
                        Some(pb::session_request::Kind::Join(_)) => {
                            Err(Error::field("join", "only the first message of a session is a join"))
                        }
                        None => Err(Error::field("kind", "is required")),
                    },
                    Ok(None) => return drop(collab.leave(&p, &session).await),
                    // The connection is gone: the session lives on until it times out, so a
                    // reconnect can resume it.
                    Err(_) => return forward.abort(),
                };
                if let Err(error) = outcome {
                    forward.abort();
                    let _ = tx.send(Err(error.into())).await;
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all)]
    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let p = require(&request, Permission::CollabJoin)?;
        let stats = self.collab.stats(&p).await?;
        Ok(Response::new(pb::GetStatsResponse {
            connections: stats.here.connections as i32,
            sessions: stats.sessions as i32,
            designs: stats
                .designs
                .into_iter()
                .map(|(design_id, sessions)| pb::DesignStats { design_id, sessions: sessions as i32 })
                .collect(),
            events_per_second: stats.here.events_per_second,
            events_total: stats.here.events_total as i64,
            cluster_connections: stats.cluster.connections as i32,
            cluster_events_per_second: stats.cluster.events_per_second,
            replicas: stats.replicas as i32,
        }))
    }
}

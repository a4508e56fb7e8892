//! Collaboration replicas with a real registry, design service and executor, and clients that
//! join them.

#![allow(dead_code, unreachable_pub)]

use std::{net::SocketAddr, time::Duration};

use csp_platform::{Settings, auth::Role, server::bind};
use csp_proto::{
    collab::v1::{self as pb, collaboration_service_client::CollaborationServiceClient},
    design::v1::{self as dpb, design_service_client::DesignServiceClient},
    executor::v1::executor_service_client::ExecutorServiceClient,
    json,
};
use csp_testkit::{TestEnv, TestIssuer, authed};

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tonic::{Status, transport::Channel};

pub type Client = CollaborationServiceClient<Channel>;

pub struct Replica {
    pub client: Client,
    pub addr: SocketAddr,
    pub stop: CancellationToken,
}

pub struct Harness {
    pub replicas: Vec<Replica>,
    pub designs: DesignServiceClient<Channel>,
    pub executor: ExecutorServiceClient<Channel>,
    pub issuer: TestIssuer,
    pub settings: Settings,
    pub env: TestEnv,
    stop: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
        for replica in &self.replicas {
            replica.stop.cancel();
        }
    }
}

pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

/// Starts a registry, the design service, an executor and `replicas` collaboration replicas.
pub async fn start(env: &TestEnv, replicas: usize, tweak: impl FnOnce(&mut Settings)) -> Harness {
    let issuer = TestIssuer::start().await;
    let mut settings = env.settings();
    issuer.point(&mut settings);
    settings.executor.threads = 1;
    settings.collab.sweep_interval = Duration::from_millis(200);
    tweak(&mut settings);
    let stop = CancellationToken::new();

    let listener = bind("registry", "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let registry = csp_registry::Application::with_listener(&settings, env.bus(), listener).await.unwrap();
    settings.services.registry.address = format!("http://{}", registry.local_addr());
    tokio::spawn(registry.run_until_stopped(stop.clone().cancelled_owned()));

    let listener = bind("design", "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let design = csp_design::Application::with_listener(&settings, env.bus(), listener).await.unwrap();
    let design_addr = design.local_addr();
    settings.services.design.address = format!("http://{design_addr}");
    tokio::spawn(design.run_until_stopped(stop.clone().cancelled_owned()));

    let listener = bind("executor", "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let executor = csp_executor::Application::with_listener(&settings, env.bus(), listener).await.unwrap();
    let executor_addr = executor.local_addr();
    settings.services.executor.address = format!("http://{executor_addr}");
    tokio::spawn(executor.run_until_stopped(stop.clone().cancelled_owned()));

    let mut started = Vec::new();
    for _ in 0..replicas {
        started.push(start_replica(env, &settings).await);
    }
    Harness {
        replicas: started,
        designs: DesignServiceClient::new(connect(design_addr).await),
        executor: ExecutorServiceClient::new(connect(executor_addr).await),
        issuer,
        settings,
        env: env.clone(),
        stop,
    }
}

/// One more collaboration replica, with its own bus connections.
pub async fn start_replica(env: &TestEnv, settings: &Settings) -> Replica {
    let stop = CancellationToken::new();
    let listener = bind("collab", "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let app = csp_collab::Application::with_listener(settings, env.own_bus().await, listener).await.unwrap();
    let addr = app.local_addr();
    tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    Replica { client: CollaborationServiceClient::new(connect(addr).await), addr, stop }
}

impl Harness {
    pub fn designer(&self, user: &str) -> String {
        self.issuer.token(user, &[Role::Designer])
    }

    pub fn viewer(&self, user: &str) -> String {
        self.issuer.token(user, &[Role::Viewer])
    }

    pub fn admin(&self, user: &str) -> String {
        self.issuer.token(user, &[Role::Admin])
    }

    pub fn on(&self, replica: usize) -> Client {
        self.replicas[replica].client.clone()
    }

    pub async fn create(&self, token: &str, name: &str) -> String {
        let request = dpb::CreateDesignRequest { name: name.into(), ..Default::default() };
        self.designs
            .clone()
            .create_design(authed(request, token))
            .await
            .unwrap()
            .into_inner()
            .design
            .unwrap()
            .id
    }

    pub async fn share(&self, token: &str, id: &str, user: &str, access: dpb::Access) {
        let request =
            dpb::ShareDesignRequest { design_id: id.into(), user_id: user.into(), access: access as i32 };
        self.designs.clone().share_design(authed(request, token)).await.unwrap();
    }

    pub async fn unshare(&self, token: &str, id: &str, user: &str) {
        let request = dpb::UnshareDesignRequest { design_id: id.into(), user_id: user.into() };
        self.designs.clone().unshare_design(authed(request, token)).await.unwrap();
    }

    pub async fn revision(&self, token: &str, id: &str) -> i64 {
        let request = dpb::GetDesignRequest { design_id: id.into(), view: dpb::DesignView::Basic as i32 };
        self.designs
            .clone()
            .get_design(authed(request, token))
            .await
            .unwrap()
            .into_inner()
            .design
            .unwrap()
            .revision
    }

    pub async fn apply(
        &self,
        token: &str,
        id: &str,
        revision: i64,
        ops: Vec<dpb::Op>,
    ) -> Result<i64, Status> {
        let request = dpb::ApplyOpsRequest { design_id: id.into(), expected_revision: revision, ops };
        Ok(self.designs.clone().apply_ops(authed(request, token)).await?.into_inner().revision)
    }

    /// Joins on a replica and reads the snapshot.
    pub async fn join(&self, replica: usize, token: &str, design: &str) -> Joined {
        self.join_with(replica, token, pb::JoinRequest { design_id: design.into(), ..Default::default() })
            .await
            .unwrap()
    }

    pub async fn join_with(
        &self,
        replica: usize,
        token: &str,
        request: pb::JoinRequest,
    ) -> Result<Joined, Status> {
        let events = self.on(replica).join(authed(request, token)).await?.into_inner();
        let mut joined = Joined { events, session_id: String::new(), snapshot: None, seen: Vec::new() };
        let first = joined.next().await;
        if let Some(pb::collab_event::Kind::Snapshot(snapshot)) = &first.kind {
            joined.session_id = snapshot.session_id.clone();
            joined.snapshot = Some(snapshot.clone());
        }
        Ok(joined)
    }

    pub async fn presence(&self, replica: usize, token: &str, session: &str, x: f64) -> Result<(), Status> {
        let request = pb::UpdatePresenceRequest { session_id: session.into(), presence: Some(at(x)) };
        self.on(replica).update_presence(authed(request, token)).await?;
        Ok(())
    }

    pub async fn heartbeat(
        &self,
        replica: usize,
        token: &str,
        session: &str,
    ) -> Result<pb::HeartbeatResponse, Status> {
        let request = pb::HeartbeatRequest { session_id: session.into() };
        Ok(self.on(replica).heartbeat(authed(request, token)).await?.into_inner())
    }

    pub async fn leave(&self, replica: usize, token: &str, session: &str) -> Result<(), Status> {
        let request = pb::LeaveRequest { session_id: session.into() };
        self.on(replica).leave(authed(request, token)).await?;
        Ok(())
    }
}

pub fn at(x: f64) -> pb::Presence {
    pb::Presence { cursor: Some(pb::Cursor { x, y: 1.0 }), ..Default::default() }
}

/// A joined stream and everything it received.
pub struct Joined {
    pub events: tonic::Streaming<pb::JoinResponse>,
    pub session_id: String,
    pub snapshot: Option<pb::Snapshot>,
    pub seen: Vec<pb::CollabEvent>,
}

impl Joined {
    /// The next event, failing after 10 s.
    pub async fn next(&mut self) -> pb::CollabEvent {
        match tokio::time::timeout(Duration::from_secs(10), self.events.message()).await {
            Ok(Ok(Some(response))) => {
                let event = response.event.unwrap();
                self.seen.push(event.clone());
                event
            }
            Ok(Ok(None)) => panic!("the stream ended after {} events", self.seen.len()),
            Ok(Err(status)) => panic!("the stream failed: {status:?}"),
            Err(_) => panic!(
                "no event within 10 s; seen: {:#?}",
                self.seen.iter().rev().take(5).collect::<Vec<_>>()
            ),
        }
    }

    /// Reads until an event `wanted` accepts; returns it.
    pub async fn until(&mut self, wanted: impl Fn(&pb::collab_event::Kind) -> bool) -> pb::CollabEvent {
        loop {
            let event = self.next().await;
            if event.kind.as_ref().is_some_and(&wanted) {
                return event;
            }
        }
    }

    /// Waits for the stream to end (after its own leave), failing after 10 s.
    pub async fn ended(&mut self) {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.events.message()).await {
                Ok(Ok(Some(response))) => self.seen.push(response.event.unwrap()),
                Ok(Ok(None)) => return,
                Ok(Err(status)) => panic!("the stream failed: {status:?}"),
                Err(_) => panic!("the stream did not end"),
            }
        }
    }

    pub fn last_id(&self) -> String {
        self.seen.last().map(|e| e.event_id.clone()).unwrap_or_default()
    }
}

pub fn is_joined(kind: &pb::collab_event::Kind) -> Option<&pb::Participant> {
    match kind {
        pb::collab_event::Kind::ParticipantJoined(j) => j.participant.as_ref(),
        _ => None,
    }
}

pub fn is_left(kind: &pb::collab_event::Kind) -> Option<&pb::ParticipantLeft> {
    match kind {
        pb::collab_event::Kind::ParticipantLeft(l) => Some(l),
        _ => None,
    }
}

pub fn is_presence(kind: &pb::collab_event::Kind) -> Option<&pb::PresenceChanged> {
    match kind {
        pb::collab_event::Kind::PresenceChanged(p) => Some(p),
        _ => None,
    }
}

pub fn is_change(kind: &pb::collab_event::Kind) -> Option<&pb::DesignChanged> {
    match kind {
        pb::collab_event::Kind::DesignChanged(c) => Some(c),
        _ => None,
    }
}

pub fn add_node(id: &str, type_id: &str, config: Value) -> dpb::Op {
    dpb::Op {
        op: Some(dpb::op::Op::AddNode(dpb::AddNodeOp {
            node: Some(dpb::Node {
                id: id.into(),
                r#type: type_id.into(),
                config: Some(json::to_struct(config)),
                ..Default::default()
            }),
        })),
    }
}

pub fn link(id: &str, from: &str, to: &str) -> dpb::Op {
    dpb::Op {
        op: Some(dpb::op::Op::AddConnection(dpb::AddConnectionOp {
            connection: Some(dpb::Connection {
                id: id.into(),
                from: Some(dpb::PortAddress { node_id: from.into(), port: "out".into() }),
                to: Some(dpb::PortAddress { node_id: to.into(), port: "in".into() }),
                ..Default::default()
            }),
        })),
    }
}

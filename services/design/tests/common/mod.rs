//! A design service with a real registry and gateway in front, and helpers to drive it.

#![allow(dead_code, unreachable_pub)]

use std::{net::SocketAddr, time::Duration};

use csp_platform::{Settings, auth::Role, server::bind};
use csp_proto::{
    component::v1::{
        DescribeRequest, DescribeResponse, PortSpec as RemotePort, ProcessRequest, ProcessResponse,
        component_runtime_server::{ComponentRuntime, ComponentRuntimeServer},
    },
    design::v1::{self as pb, design_service_client::DesignServiceClient},
    json,
    registry::v1::{self as reg, registry_service_client::RegistryServiceClient},
};
use csp_testkit::{TestEnv, TestIssuer, authed};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::{Status, transport::Channel};
use tonic_types::StatusExt as _;

pub struct Harness {
    /// Straight to the design service.
    pub client: DesignServiceClient<Channel>,
    /// A second connection, as a second browser tab would have.
    pub second: DesignServiceClient<Channel>,
    /// Through the gateway.
    pub gateway: DesignServiceClient<Channel>,
    pub registry: RegistryServiceClient<Channel>,
    pub issuer: TestIssuer,
    pub settings: Settings,
    pub registry_stop: CancellationToken,
    stop: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
        self.registry_stop.cancel();
    }
}

async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

/// Starts a registry, the design service and a gateway on loopback ports.
pub async fn start(env: &TestEnv, tweak: impl FnOnce(&mut Settings)) -> Harness {
    let issuer = TestIssuer::start().await;
    let mut settings = env.settings();
    issuer.point(&mut settings);
    tweak(&mut settings);
    let stop = CancellationToken::new();
    let registry_stop = CancellationToken::new();

    let listener = bind("registry", "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let registry = csp_registry::Application::with_listener(&settings, env.bus(), listener).await.unwrap();
    let registry_addr = registry.local_addr();
    settings.services.registry.address = format!("http://{registry_addr}");
    tokio::spawn(registry.run_until_stopped(registry_stop.clone().cancelled_owned()));

    let listener = bind("design", "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let design = csp_design::Application::with_listener(&settings, env.bus(), listener).await.unwrap();
    let design_addr = design.local_addr();
    settings.services.design.address = format!("http://{design_addr}");
    tokio::spawn(design.run_until_stopped(stop.clone().cancelled_owned()));

    let listener = bind("gateway", "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let gateway = csp_gateway::Application::with_listener(&settings, env.bus(), listener).unwrap();
    let gateway_addr = gateway.local_addr();
    tokio::spawn(gateway.run_until_stopped(stop.clone().cancelled_owned()));

    Harness {
        client: DesignServiceClient::new(connect(design_addr).await).max_decoding_message_size(64 << 20),
        second: DesignServiceClient::new(connect(design_addr).await),
        gateway: DesignServiceClient::new(connect(gateway_addr).await),
        registry: RegistryServiceClient::new(connect(registry_addr).await),
        issuer,
        settings,
        registry_stop,
        stop,
    }
}

impl Harness {
    pub fn designer(&self, user: &str) -> String {
        self.issuer.token(user, &[Role::Designer])
    }

    pub async fn create(&self, token: &str, name: &str) -> pb::Design {
        let request = pb::CreateDesignRequest { name: name.into(), ..Default::default() };
        self.client.clone().create_design(authed(request, token)).await.unwrap().into_inner().design.unwrap()
    }

    pub async fn get(&self, token: &str, id: &str) -> Result<pb::Design, Status> {
        let request = pb::GetDesignRequest { design_id: id.into(), ..Default::default() };
        Ok(self.client.clone().get_design(authed(request, token)).await?.into_inner().design.unwrap())
    }

    pub async fn apply(
        &self,
        token: &str,
        id: &str,
        revision: i64,
        ops: Vec<pb::Op>,
    ) -> Result<pb::ApplyOpsResponse, Status> {
        let request = pb::ApplyOpsRequest { design_id: id.into(), expected_revision: revision, ops };
        Ok(self.client.clone().apply_ops(authed(request, token)).await?.into_inner())
    }

    pub async fn share(&self, token: &str, id: &str, user: &str, access: pb::Access) {
        let request =
            pb::ShareDesignRequest { design_id: id.into(), user_id: user.into(), access: access as i32 };
        self.client.clone().share_design(authed(request, token)).await.unwrap();
    }

    pub async fn validate(&self, token: &str, id: &str) -> Result<pb::ValidateDesignResponse, Status> {
        let request = pb::ValidateDesignRequest { design_id: id.into(), revision: 0 };
        Ok(self.client.clone().validate_design(authed(request, token)).await?.into_inner())
    }

    pub async fn export(&self, token: &str, id: &str) -> String {
        let request = pb::ExportDesignRequest { design_id: id.into(), revision: 0 };
        self.client.clone().export_design(authed(request, token)).await.unwrap().into_inner().document
    }

    pub async fn import(&self, token: &str, document: String) -> Result<pb::Design, Status> {
        let request = pb::ImportDesignRequest { document, name: String::new() };
        Ok(self.client.clone().import_design(authed(request, token)).await?.into_inner().design.unwrap())
    }

    /// Waits until the registry (stopped with `registry_stop`) no longer answers.
    pub async fn wait_for_registry_to_stop(&self) {
        let started = std::time::Instant::now();
        let token = self.designer("probe");
        loop {
            let request = authed(reg::ListCategoriesRequest {}, &token);
            let mut fresh = RegistryServiceClient::new(
                Channel::from_shared(self.settings.services.registry.address.clone()).unwrap().connect_lazy(),
            );
            if fresh.list_categories(request).await.is_err() {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "the registry did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Registers the test remote component `type_id` (typed ports, see [`Sentiment`]).
    pub async fn register_sentiment(&self, type_id: &str) -> CancellationToken {
        self.register_sentiment_behaving(type_id, None).await
    }

    /// [`Self::register_sentiment`], declaring how it uses its ports.
    pub async fn register_sentiment_behaving(
        &self,
        type_id: &str,
        behaviour: Option<reg::PortBehaviour>,
    ) -> CancellationToken {
        let stop = CancellationToken::new();
        let addr = serve_component(stop.clone()).await;
        let draft = reg::ComponentType {
            r#type: type_id.into(),
            version: "1.0.0".into(),
            category: reg::Category::Remote as i32,
            display_name: "Sentiment".into(),
            remote: Some(reg::RemoteEndpoint {
                address: format!("http://{addr}"),
                timeout_ms: 2000,
                ..Default::default()
            }),
            behaviour,
            ..Default::default()
        };
        let registrar = self.issuer.token("registrar", &[Role::Registrar]);
        let request = reg::RegisterComponentTypeRequest { component_type: Some(draft) };
        self.registry.clone().register_component_type(authed(request, &registrar)).await.unwrap();
        stop
    }
}

pub fn node(id: &str, type_id: &str, config: Value) -> pb::Node {
    pb::Node {
        id: id.into(),
        r#type: type_id.into(),
        config: Some(json::to_struct(config)),
        position: Some(pb::Position { x: 10.0, y: 20.0 }),
        ..Default::default()
    }
}

pub fn connection(id: &str, from: &str, out: &str, to: &str, input: &str) -> pb::Connection {
    pb::Connection {
        id: id.into(),
        from: Some(pb::PortAddress { node_id: from.into(), port: out.into() }),
        to: Some(pb::PortAddress { node_id: to.into(), port: input.into() }),
        ..Default::default()
    }
}

pub fn add_node(id: &str, type_id: &str, config: Value) -> pb::Op {
    pb::Op { op: Some(pb::op::Op::AddNode(pb::AddNodeOp { node: Some(node(id, type_id, config)) })) }
}

pub fn add_connection(id: &str, from: &str, out: &str, to: &str, input: &str) -> pb::Op {
    pb::Op {
        op: Some(pb::op::Op::AddConnection(pb::AddConnectionOp {
            connection: Some(connection(id, from, out, to, input)),
        })),
    }
}

pub fn update_node(update: pb::UpdateNodeOp) -> pb::Op {
    pb::Op { op: Some(pb::op::Op::UpdateNode(update)) }
}

pub fn remove_node(id: &str) -> pb::Op {
    pb::Op { op: Some(pb::op::Op::RemoveNode(pb::RemoveNodeOp { node_id: id.into() })) }
}

pub fn rename(name: &str) -> pb::Op {
    pb::Op {
        op: Some(pb::op::Op::UpdateDesign(pb::UpdateDesignOp {
            name: Some(name.into()),
            ..Default::default()
        })),
    }
}

/// `(field, description)` of a status's BadRequest details.
pub fn violations(status: &Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| (v.field, v.description)).collect())
        .unwrap_or_default()
}

/// The reason and `current_revision` of a stale-revision error.
pub fn stale(status: &Status) -> (String, i64) {
    let info = status.get_details_error_info().expect("error info");
    (info.reason, info.metadata["current_revision"].parse().unwrap())
}

/// Node ids with their config, and connection ids with their ends: what a user compares.
pub type Content = (Vec<(String, Value)>, Vec<(String, String, String)>, String);

pub fn content(design: &pb::Design) -> Content {
    let nodes = design
        .nodes
        .iter()
        .map(|n| (n.id.clone(), json::from_struct(n.config.clone().unwrap_or_default())))
        .collect();
    let connections = design
        .connections
        .iter()
        .map(|c| {
            let end = |a: &Option<pb::PortAddress>| {
                a.as_ref().map(|a| format!("{}.{}", a.node_id, a.port)).unwrap_or_default()
            };
            (c.id.clone(), end(&c.from), end(&c.to))
        })
        .collect();
    (nodes, connections, design.name.clone())
}

/// A remote component: a typed `in` (objects with a string `text`) and an `out`.
struct Sentiment;

#[tonic::async_trait]
impl ComponentRuntime for Sentiment {
    type ProcessStream = futures::stream::Empty<Result<ProcessResponse, Status>>;

    /// Only described: designs check connections against it, nothing runs it.
    async fn process(
        &self,
        _request: tonic::Request<tonic::Streaming<ProcessRequest>>,
    ) -> Result<tonic::Response<Self::ProcessStream>, Status> {
        Err(Status::unimplemented("process is not served here"))
    }

    async fn describe(
        &self,
        _request: tonic::Request<DescribeRequest>,
    ) -> Result<tonic::Response<DescribeResponse>, Status> {
        let port = |name: &str, schema: Value, required: bool| RemotePort {
            name: name.into(),
            description: format!("the {name}"),
            schema: Some(json::to_struct(schema)),
            required,
            multiple: false,
        };
        Ok(tonic::Response::new(DescribeResponse {
            display_name: "Sentiment".into(),
            description: "Scores the sentiment of a text.".into(),
            inputs: vec![port(
                "in",
                json!({ "type": "object", "properties": { "text": { "type": "string" } }, "required": ["text"] }),
                true,
            )],
            outputs: vec![port("out", json!({ "type": "object" }), false)],
            config_schema: Some(json::to_struct(json!({ "type": "object" }))),
        }))
    }
}

async fn serve_component(stop: CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<ComponentRuntimeServer<Sentiment>>().await;
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(ComponentRuntimeServer::new(Sentiment))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.cancelled_owned(),
            )
            .await
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    addr
}

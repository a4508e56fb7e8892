//! `design`: GetDesign and ApplyOps per second through the gateway, on designs of 200 nodes
//! stored in PostgreSQL, with changes published on Redis.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use csp_platform::{Settings, auth::Role, server::bind};
use csp_proto::{
    auth::v1::{LoginRequest, auth_service_client::AuthServiceClient},
    design::v1::{self as pb, design_service_client::DesignServiceClient},
    json,
};
use csp_testkit::{TestEnv, authed};
use serde_json::json;
use tokio::sync::oneshot;
use tonic::transport::Channel;

const NODES: usize = 200;
const CLIENTS: usize = 16;
const CONNECTIONS: usize = 4;
const RUN_FOR: Duration = Duration::from_secs(5);

pub(crate) fn run() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let env = crate::external_env().await;
        let outcome = measure(&env).await;
        env.teardown().await;
        outcome
    })
}

/// Starts auth, registry (the design service checks connections against it), design and the
/// gateway; returns the gateway's address and a stop switch.
async fn start(
    env: &TestEnv,
    settings: &mut Settings,
) -> anyhow::Result<(SocketAddr, Vec<oneshot::Sender<()>>)> {
    let mut stops = Vec::new();
    let mut stopper = || {
        let (tx, rx) = oneshot::channel::<()>();
        stops.push(tx);
        async move {
            let _ = rx.await;
        }
    };
    let listener = bind("auth", "127.0.0.1:0".parse()?).await?;
    let auth = csp_auth::Application::with_listener(settings, env.bus(), listener).await?;
    settings.services.auth.address = format!("http://{}", auth.local_addr());
    tokio::spawn(auth.run_until_stopped(stopper()));
    let listener = bind("registry", "127.0.0.1:0".parse()?).await?;
    let registry = csp_registry::Application::with_listener(settings, env.bus(), listener).await?;
    settings.services.registry.address = format!("http://{}", registry.local_addr());
    tokio::spawn(registry.run_until_stopped(stopper()));
    let listener = bind("design", "127.0.0.1:0".parse()?).await?;
    let design = csp_design::Application::with_listener(settings, env.bus(), listener).await?;
    settings.services.design.address = format!("http://{}", design.local_addr());
    tokio::spawn(design.run_until_stopped(stopper()));
    let listener = bind("gateway", "127.0.0.1:0".parse()?).await?;
    let gateway = csp_gateway::Application::with_listener(settings, env.bus(), listener)?;
    let addr = gateway.local_addr();
    tokio::spawn(gateway.run_until_stopped(stopper()));
    Ok((addr, stops))
}

/// A design of `NODES` transform nodes in a chain.
async fn seed(
    client: &mut DesignServiceClient<Channel>,
    token: &str,
    name: &str,
) -> anyhow::Result<(String, i64)> {
    let request = pb::CreateDesignRequest { name: name.into(), ..Default::default() };
    let design = client.create_design(authed(request, token)).await?.into_inner().design.unwrap_or_default();
    let mut ops = Vec::new();
    for i in 0..NODES {
        let node = pb::Node {
            id: format!("n{i}"),
            r#type: "transform.map".into(),
            label: format!("Step {i}"),
            config: Some(json::to_struct(json!({ "expression": format!(".value + {i}") }))),
            position: Some(pb::Position { x: (i % 20) as f64 * 180.0, y: (i / 20) as f64 * 120.0 }),
            size: Some(pb::Size { width: 160.0, height: 80.0 }),
            ..Default::default()
        };
        ops.push(pb::Op { op: Some(pb::op::Op::AddNode(pb::AddNodeOp { node: Some(node) })) });
    }
    for i in 1..NODES {
        let connection = pb::Connection {
            id: format!("c{i}"),
            from: Some(pb::PortAddress { node_id: format!("n{}", i - 1), port: "out".into() }),
            to: Some(pb::PortAddress { node_id: format!("n{i}"), port: "in".into() }),
            ..Default::default()
        };
        ops.push(pb::Op {
            op: Some(pb::op::Op::AddConnection(pb::AddConnectionOp { connection: Some(connection) })),
        });
    }
    let request =
        pb::ApplyOpsRequest { design_id: design.id.clone(), expected_revision: design.revision, ops };
    let applied = client.apply_ops(authed(request, token)).await?.into_inner();
    Ok((design.id, applied.revision))
}

/// Calls per second and latency percentiles of `CLIENTS` loops running for `RUN_FOR`.
struct Rate {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(f, "{:.0}/s (p50 {:.1} ms, p99 {:.1} ms)", self.per_second, ms(self.p50), ms(self.p99))
    }
}

fn rate(mut samples: Vec<Duration>, elapsed: Duration) -> Rate {
    samples.sort();
    let at = |p: f64| {
        samples.get(((samples.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or_default()
    };
    Rate { per_second: samples.len() as f64 / elapsed.as_secs_f64(), p50: at(0.5), p99: at(0.99) }
}

async fn measure(env: &TestEnv) -> anyhow::Result<()> {
    let mut settings = env.settings();
    settings.log.level = "error".into();
    // One user makes every call here: the limiter still runs (its cost is measured), with a
    // bucket large enough never to refuse.
    settings.gateway.rate_limit.user_per_second = 1e9;
    settings.gateway.rate_limit.user_burst = u32::MAX;
    let password = "correct horse battery staple";
    csp_auth::create_user(&settings, "bench", "bench@example.com", password, vec![Role::Designer]).await?;
    let (gateway, stops) = start(env, &mut settings).await?;

    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(Channel::from_shared(format!("http://{gateway}"))?.connect().await?);
    }
    let login = LoginRequest { login: "bench".into(), password: password.into(), api_key: String::new() };
    let token = AuthServiceClient::new(channels[0].clone())
        .login(login)
        .await?
        .into_inner()
        .tokens
        .map(|t| t.access_token)
        .unwrap_or_default();
    let mut designs = Vec::new();
    for i in 0..CLIENTS {
        let mut client = DesignServiceClient::new(channels[i % CONNECTIONS].clone());
        designs.push(seed(&mut client, &token, &format!("Bench {i}")).await?);
    }

    // Reads: each client reads its design over and over.
    let started = Instant::now();
    let readers = designs.iter().enumerate().map(|(i, (id, _))| {
        let mut client = DesignServiceClient::new(channels[i % CONNECTIONS].clone());
        let (id, token) = (id.clone(), token.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while started.elapsed() < RUN_FOR {
                let at = Instant::now();
                let design = client
                    .get_design(authed(
                        pb::GetDesignRequest { design_id: id.clone(), ..Default::default() },
                        &token,
                    ))
                    .await?;
                anyhow::ensure!(
                    design.into_inner().design.is_some_and(|d| d.nodes.len() == NODES),
                    "short read"
                );
                samples.push(at.elapsed());
            }
            Ok::<_, anyhow::Error>(samples)
        })
    });
    let reads = collect(readers).await?;
    let reads = rate(reads, started.elapsed());

    // Writes: each client moves a node of its own design, one revision after the other.
    let started = Instant::now();
    let writers = designs.iter().enumerate().map(|(i, (id, revision))| {
        let mut client = DesignServiceClient::new(channels[i % CONNECTIONS].clone());
        let (id, token, mut revision) = (id.clone(), token.clone(), *revision);
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while started.elapsed() < RUN_FOR {
                let at = Instant::now();
                revision = move_node(&mut client, &token, &id, revision, samples.len()).await?;
                samples.push(at.elapsed());
            }
            Ok::<_, anyhow::Error>(samples)
        })
    });
    let writes = collect(writers).await?;
    let writes = rate(writes, started.elapsed());

    // One editor on one design: the latency a user feels per edit.
    let mut client = DesignServiceClient::new(channels[0].clone());
    let (id, _) = &designs[0];
    let current = client
        .get_design(authed(pb::GetDesignRequest { design_id: id.clone(), ..Default::default() }, &token))
        .await?;
    let mut revision = current.into_inner().design.map(|d| d.revision).unwrap_or_default();
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < RUN_FOR / 2 {
        let at = Instant::now();
        revision = move_node(&mut client, &token, id, revision, samples.len()).await?;
        samples.push(at.elapsed());
    }
    let single = rate(samples, started.elapsed());

    println!(
        "design: GetDesign {reads}, ApplyOps {writes}: {CLIENTS} clients on {CLIENTS} designs of {NODES} nodes \
         through the gateway, PostgreSQL + Redis; one editor on one design: ApplyOps {single}"
    );
    for stop in stops {
        let _ = stop.send(());
    }
    Ok(())
}

async fn move_node(
    client: &mut DesignServiceClient<Channel>,
    token: &str,
    id: &str,
    revision: i64,
    step: usize,
) -> anyhow::Result<i64> {
    let update = pb::UpdateNodeOp {
        node_id: format!("n{}", step % NODES),
        position: Some(pb::Position { x: step as f64, y: 7.0 }),
        ..Default::default()
    };
    let request = pb::ApplyOpsRequest {
        design_id: id.to_owned(),
        expected_revision: revision,
        ops: vec![pb::Op { op: Some(pb::op::Op::UpdateNode(update)) }],
    };
    Ok(client.apply_ops(authed(request, token)).await?.into_inner().revision)
}

async fn collect(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<anyhow::Result<Vec<Duration>>>>,
) -> anyhow::Result<Vec<Duration>> {
    let mut all = Vec::new();
    for result in futures::future::join_all(tasks).await {
        all.extend(result??);
    }
    Ok(all)
}

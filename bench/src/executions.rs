//! `executions`: small executions per second — `source.input` → `transform.set` →
//! `sink.output`, each started with StartExecution and followed with WatchExecution to its end,
//! as a client does — on the embedded default, and on PostgreSQL + Redis with 1, 2 and 3
//! executor replicas sharing the job queue, with the CPU each execution costs; then on the
//! embedded default again with every span recorded, as `csp serve` records them.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use csp_platform::{Settings, auth::Role, server::bind};
use csp_proto::{
    auth::v1::{LoginRequest, auth_service_client::AuthServiceClient},
    design::v1::{self as dpb, design_service_client::DesignServiceClient},
    executor::v1::{self as pb, executor_service_client::ExecutorServiceClient},
    json,
};
use csp_testkit::{TestEnv, authed};
use futures::StreamExt as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Clients, each starting one execution and watching it to its end, then the next.
const CLIENTS: usize = 64;
const CONNECTIONS: usize = 4;
const WARM_UP: Duration = Duration::from_secs(1);
const RUN_FOR: Duration = Duration::from_secs(5);

pub(crate) fn run() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let env = TestEnv::embedded().await;
        let outcome = measure(&env, "embedded").await;
        env.teardown().await;
        outcome?;
        // Replicas share the database and the queue; each has its own Redis connections, as a
        // process of its own would. (One machine: the replicas share its cores.)
        for replicas in 1..=3 {
            let env = crate::external_env().await;
            let label = format!(
                "PostgreSQL + Redis, {replicas} executor replica{}",
                if replicas > 1 { "s" } else { "" }
            );
            let outcome = measure_with(&env, &label, replicas).await;
            env.teardown().await;
            outcome?;
        }
        // Last (the subscriber stays once installed): with tracing as `csp serve` has it —
        // every span recorded (calls, executions, one per node), no exporter.
        let mut settings = Settings::default();
        settings.log.level = "warn".into();
        let _telemetry = csp_platform::telemetry::init(&settings, "csp-bench").map_err(anyhow::Error::msg)?;
        let env = TestEnv::embedded().await;
        let outcome = measure(&env, "embedded, traced").await;
        env.teardown().await;
        outcome
    })
}

/// Starts auth, registry, design and `replicas` executors; returns the auth, design and
/// executor addresses.
async fn start(
    env: &TestEnv,
    settings: &mut Settings,
    stop: &CancellationToken,
    replicas: usize,
) -> anyhow::Result<(SocketAddr, SocketAddr, Vec<SocketAddr>)> {
    let listener = bind("auth", "127.0.0.1:0".parse()?).await?;
    let auth = csp_auth::Application::with_listener(settings, env.bus(), listener).await?;
    let auth_addr = auth.local_addr();
    settings.services.auth.address = format!("http://{auth_addr}");
    tokio::spawn(auth.run_until_stopped(stop.clone().cancelled_owned()));
    let listener = bind("registry", "127.0.0.1:0".parse()?).await?;
    let registry = csp_registry::Application::with_listener(settings, env.bus(), listener).await?;
    settings.services.registry.address = format!("http://{}", registry.local_addr());
    tokio::spawn(registry.run_until_stopped(stop.clone().cancelled_owned()));
    let listener = bind("design", "127.0.0.1:0".parse()?).await?;
    let design = csp_design::Application::with_listener(settings, env.bus(), listener).await?;
    let design_addr = design.local_addr();
    settings.services.design.address = format!("http://{design_addr}");
    tokio::spawn(design.run_until_stopped(stop.clone().cancelled_owned()));
    let mut executors = Vec::new();
    for replica in 0..replicas {
        let listener = bind("executor", "127.0.0.1:0".parse()?).await?;
        let bus = if replica == 0 { env.bus() } else { env.own_bus().await };
        let executor = csp_executor::Application::with_listener(settings, bus, listener).await?;
        executors.push(executor.local_addr());
        tokio::spawn(executor.run_until_stopped(stop.clone().cancelled_owned()));
    }
    Ok((auth_addr, design_addr, executors))
}

fn op(op: dpb::op::Op) -> dpb::Op {
    dpb::Op { op: Some(op) }
}

/// The small design: input → set → output.
async fn seed(designs: &mut DesignServiceClient<Channel>, token: &str) -> anyhow::Result<String> {
    let request = dpb::CreateDesignRequest { name: "Small".into(), ..Default::default() };
    let design = designs.create_design(authed(request, token)).await?.into_inner().design.unwrap_or_default();
    let node = |id: &str, type_id: &str, config: serde_json::Value| {
        op(dpb::op::Op::AddNode(dpb::AddNodeOp {
            node: Some(dpb::Node {
                id: id.into(),
                r#type: type_id.into(),
                config: Some(json::to_struct(config)),
                ..Default::default()
            }),
        }))
    };
    let link = |id: &str, from: &str, to: &str| {
        op(dpb::op::Op::AddConnection(dpb::AddConnectionOp {
            connection: Some(dpb::Connection {
                id: id.into(),
                from: Some(dpb::PortAddress { node_id: from.into(), port: "out".into() }),
                to: Some(dpb::PortAddress { node_id: to.into(), port: "in".into() }),
                ..Default::default()
            }),
        }))
    };
    let ops = vec![
        node("in", "source.input", json!({})),
        node("mark", "transform.set", json!({ "operations": [{ "path": "seen", "value": true }] })),
        node("out", "sink.output", json!({})),
        link("c1", "in", "mark"),
        link("c2", "mark", "out"),
    ];
    let request =
        dpb::ApplyOpsRequest { design_id: design.id.clone(), expected_revision: design.revision, ops };
    designs.apply_ops(authed(request, token)).await?;
    Ok(design.id)
}

/// Starts one execution and watches it to its end; true if it succeeded.
async fn one(
    client: &mut ExecutorServiceClient<Channel>,
    token: &str,
    design: &str,
    n: usize,
) -> anyhow::Result<bool> {
    let request = pb::StartExecutionRequest {
        design_id: design.into(),
        inputs: [(
            "in".to_owned(),
            prost_types::ListValue { values: vec![json::to_value(json!({ "n": n }))] },
        )]
        .into(),
        ..Default::default()
    };
    let execution =
        client.start_execution(authed(request, token)).await?.into_inner().execution.unwrap_or_default();
    let request = pb::WatchExecutionRequest { execution_id: execution.id, after_event_id: String::new() };
    let mut events = client.watch_execution(authed(request, token)).await?.into_inner();
    let mut last = None;
    while let Some(event) = events.next().await {
        if let Some(pb::execution_event::Kind::StatusChanged(changed)) = event?.event.and_then(|e| e.kind) {
            last = Some(changed.status);
        }
    }
    Ok(last == Some(pb::ExecutionStatus::Succeeded as i32))
}

async fn measure(env: &TestEnv, label: &str) -> anyhow::Result<()> {
    measure_with(env, label, 1).await
}

async fn measure_with(env: &TestEnv, label: &str, replicas: usize) -> anyhow::Result<()> {
    let mut settings = env.settings();
    settings.log.level = "error".into();
    let password = "correct horse battery staple";
    csp_auth::create_user(&settings, "bench", "bench@example.com", password, vec![Role::Designer]).await?;
    let stop = CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    let (auth, design_addr, executors) = start(env, &mut settings, &stop, replicas).await?;

    let login = LoginRequest { login: "bench".into(), password: password.into(), api_key: String::new() };
    let auth = Channel::from_shared(format!("http://{auth}"))?.connect().await?;
    let token = AuthServiceClient::new(auth)
        .login(login)
        .await?
        .into_inner()
        .tokens
        .map(|t| t.access_token)
        .unwrap_or_default();
    let mut designs =
        DesignServiceClient::new(Channel::from_shared(format!("http://{design_addr}"))?.connect().await?);
    let design = seed(&mut designs, &token).await?;

    let mut channels = Vec::new();
    // Clients spread over the replicas, as behind a load balancer.
    for i in 0..CONNECTIONS.max(executors.len()) {
        let executor = executors[i % executors.len()];
        channels.push(Channel::from_shared(format!("http://{executor}"))?.connect().await?);
    }
    let started = Instant::now();
    let measuring = started + WARM_UP;
    let cpu_at_start = tokio::spawn(async move {
        tokio::time::sleep_until(measuring.into()).await;
        cpu_time()
    });
    let until = measuring + RUN_FOR;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut client = ExecutorServiceClient::new(channels[i % channels.len()].clone());
        let (token, design) = (token.clone(), design.clone());
        clients.push(tokio::spawn(async move {
            let (mut done, mut failed, mut latencies) = (0u64, 0u64, Vec::new());
            let mut n = 0;
            loop {
                let at = Instant::now();
                if at >= until {
                    break;
                }
                n += 1;
                let ok = one(&mut client, &token, &design, i * 1_000_000 + n).await?;
                if at >= measuring {
                    latencies.push(at.elapsed());
                    if ok {
                        done += 1;
                    } else {
                        failed += 1;
                    }
                }
            }
            anyhow::Ok((done, failed, latencies))
        }));
    }
    let (mut done, mut failed, mut latencies) = (0, 0, Vec::new());
    for client in clients {
        let (d, f, l) = client.await??;
        done += d;
        failed += f;
        latencies.extend(l);
    }
    let cpu = cpu_time().zip(cpu_at_start.await?).map(|(end, start)| end.saturating_sub(start));
    latencies.sort();
    let at = |p: f64| {
        latencies.get(((latencies.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or_default()
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "executions ({label}): {:.0} small executions/s (start to end, p50 {:.1} ms, p99 {:.1} ms, {CLIENTS} clients, {} µs of this process's CPU each{})",
        done as f64 / RUN_FOR.as_secs_f64(),
        ms(at(0.5)),
        ms(at(0.99)),
        cpu.map_or_else(|| "?".into(), |cpu| format!("{:.0}", cpu.as_secs_f64() * 1e6 / done.max(1) as f64)),
        if failed > 0 { format!(", {failed} did not succeed") } else { String::new() },
    );
    Ok(())
}

/// CPU time this process has used (user and system), where /proc tells it.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports in USER_HZ, 100 per second on every mainstream architecture.
    Some(Duration::from_millis(ticks * 10))
}

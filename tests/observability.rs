//! What operators see, checked with their own tools:
//!
//! - one trace per execution, exported over OTLP: a client's call through the gateway, every
//!   service hop, the job's hop through the event bus (the trace context rides in the job
//!   entry) and one span per node of the execution, received by an OTLP/gRPC receiver written
//!   with grpcio and the OpenTelemetry protos (tests/peers/otlp_receiver.py), not by this
//!   project's code;
//! - every process's `/metrics`, after real work, passes `promtool check metrics` (Prometheus's
//!   own exposition linter: HELP text, counter suffixes, base units);
//! - the alert rules of the configuration are judged in each process that has their numbers,
//!   and fire when their thresholds are crossed (`GET /alerts`, `csp_alert_firing`).
//!
//! On PostgreSQL + Redis every target runs as a process of its own (so the hops are real
//! network hops and the job goes through a Redis stream); on the embedded default, `csp serve`
//! runs them all in one process.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::{
    collections::HashMap,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    ADMIN_PASSWORD, Peer, Running, channel, create_admin, csp, design_of, env_vars, http_get, login,
    peers_python,
};
use csp_proto::executor::v1 as pb;
use csp_testkit::{Backend, TestEnv, authed};
use serde_json::{Value, json};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Prometheus's `promtool` (`make test` installs it).
fn promtool() -> Option<PathBuf> {
    let local = Path::new(ROOT).join(".tools/bin/promtool");
    if local.exists() {
        return Some(local);
    }
    if Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Some(PathBuf::from("promtool"));
    }
    assert!(!csp_testkit::external_required(), "promtool is missing: `make test` installs it");
    eprintln!("skipped: promtool is missing (`make test` installs it)");
    None
}

/// The OTLP receiver and the spans it has printed (one JSON object per line).
fn spans_of(receiver: &Peer, trace_id: &str) -> Vec<Value> {
    receiver
        .lines
        .lock()
        .unwrap()
        .iter()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|s| s["trace_id"] == trace_id)
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The system as started: its processes, the gateway's address, and every process's HTTP
/// address (for `/metrics`) by target.
struct System {
    _running: Vec<Running>,
    gateway: SocketAddr,
    targets: Vec<(String, SocketAddr)>,
}

/// Starts the system exporting to `endpoint`.
fn start_system(env: &TestEnv, endpoint: &str) -> System {
    let mut vars = env_vars(env);
    vars.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.to_owned()));
    // Export each batch at once rather than every 5 s (the SDK's standard variable).
    vars.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()));
    // Alerts judged every second; two thresholds any work crosses (any AI spend, any unary
    // call), the others as shipped.
    vars.push(("CSP_ALERTS__INTERVAL_SECONDS".into(), "1".into()));
    vars.push(("CSP_ALERTS__MIN_CALLS".into(), "1".into()));
    vars.push(("CSP_ALERTS__P99_LATENCY_SECONDS".into(), "0".into()));
    vars.push(("CSP_ALERTS__AI_COST_PER_HOUR_USD".into(), "0".into()));
    create_admin(env, &vars);
    if env.backend() == Backend::Embedded {
        let running = Running::start(env.dir(), &vars, &["serve"]);
        let gateway = running.gateway;
        return System { _running: vec![running], gateway, targets: vec![("all".into(), gateway)] };
    }
    let migrate = csp(env.dir()).arg("migrate").envs(vars.iter().cloned()).output().unwrap();
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
    vars.push(("CSP_DATABASE__RUN_MIGRATIONS".into(), "false".into()));
    // The processes must agree on the key that signs access tokens.
    vars.push((
        "SECRET_KEY".into(),
        format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple()),
    ));
    let services = ["auth", "design", "registry", "executor", "collab", "ai"];
    let ports: Vec<u16> = services.iter().map(|_| free_port()).collect();
    for (service, port) in services.iter().zip(&ports) {
        let key = service.to_uppercase();
        vars.push((format!("CSP_SERVICES__{key}__ADDRESS"), format!("http://127.0.0.1:{port}")));
        vars.push((format!("CSP_SERVICES__{key}__LISTEN"), format!("127.0.0.1:{port}")));
    }
    let mut running = Vec::new();
    for service in services {
        let child = csp(env.dir())
            .args(["serve", "--target", service])
            .envs(vars.iter().cloned())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        running.push(Running::of(child));
    }
    let gateway = Running::start(env.dir(), &vars, &["serve", "--target", "gateway"]);
    let addr = gateway.gateway;
    running.push(gateway);
    let mut targets: Vec<(String, SocketAddr)> = services
        .iter()
        .zip(&ports)
        .map(|(s, p)| ((*s).to_owned(), SocketAddr::from(([127, 0, 0, 1], *p))))
        .collect();
    targets.push(("gateway".into(), addr));
    System { _running: running, gateway: addr, targets }
}

/// Waits until the gateway reports every service SERVING.
async fn wait_ready(gateway: SocketAddr) {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    for service in csp_proto::SERVICE_NAMES {
        loop {
            let request = HealthCheckRequest { service: (*service).to_owned() };
            let status = HealthClient::new(channel(gateway).await).check(request).await;
            if status.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32) {
                break;
            }
            assert!(Instant::now() < deadline, "{service} never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn span_named<'a>(spans: &'a [Value], name: &str, server: Option<&str>) -> Vec<&'a Value> {
    spans
        .iter()
        .filter(|s| s["name"] == name && server.is_none_or(|server| s["attributes"]["server"] == server))
        .collect()
}

/// The spans above `span`, nearest first.
fn ancestors<'a>(spans: &'a [Value], span: &Value) -> Vec<&'a Value> {
    let mut chain = Vec::new();
    let mut parent = span["parent_span_id"].clone();
    while let Some(up) = spans.iter().find(|s| s["span_id"] == parent) {
        assert!(chain.len() < spans.len(), "a cycle of spans");
        chain.push(up);
        parent = up["parent_span_id"].clone();
    }
    chain
}

async fn what_operators_see(env: TestEnv) {
    let Some(python) = peers_python() else { return };
    let receiver = Peer::start(&python, "otlp_receiver.py", &[]);
    let system = start_system(&env, &format!("http://127.0.0.1:{}", receiver.port));
    let gateway = system.gateway;
    wait_ready(gateway).await;

    let token = login(gateway, "admin", ADMIN_PASSWORD).await.unwrap().tokens.unwrap().access_token;
    // A service whose first key fetch came before the auth service answered accepts tokens a
    // second later (csp_platform::auth::REFETCH_AFTER_FAILURE); every target is its own
    // process here, started together.
    tokio::time::sleep(csp_platform::auth::REFETCH_AFTER_FAILURE + Duration::from_millis(200)).await;
    let nodes = [
        ("input", "source.input", json!({})),
        ("greet", "transform.template", json!({ "template": "Hello, {{name}}!" })),
        ("chat", "ai.chat", json!({ "prompt_template": "Answer: {{ text }}" })),
        ("result", "sink.output", json!({})),
    ];
    let design = design_of(gateway, &token, &nodes).await;

    // The client starts the trace: its own span id is the root's parent.
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let client_span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let names = ["Ada", "Grace", "Edsger", "Tony", "Barbara"];
    let request = pb::StartExecutionRequest {
        design_id: design,
        inputs: HashMap::from([(
            "input".to_owned(),
            prost_types::ListValue {
                values: names.iter().map(|n| csp_proto::json::to_value(json!({ "name": n }))).collect(),
            },
        )]),
        ..Default::default()
    };
    let mut request = authed(request, &token);
    request.metadata_mut().insert("traceparent", format!("00-{trace_id}-{client_span}-01").parse().unwrap());
    let mut executor = pb::executor_service_client::ExecutorServiceClient::new(channel(gateway).await);
    let id = executor.start_execution(request).await.unwrap().into_inner().execution.unwrap().id;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let request = pb::GetExecutionRequest { execution_id: id.clone() };
        let execution =
            executor.get_execution(authed(request, &token)).await.unwrap().into_inner().execution.unwrap();
        if execution.finished_at.is_some() {
            assert_eq!(execution.status, pb::ExecutionStatus::Succeeded as i32, "{execution:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the execution never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every span of the execution, once exported: the three node spans end last.
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans = spans_of(&receiver, &trace_id);
        // Each process exports on its own schedule: wait for every part of the trace.
        let start = "csp.executor.v1.ExecutorService/StartExecution";
        if span_named(&spans, "execution", None).len() == 1
            && spans.iter().filter(|s| s["attributes"]["node.id"].is_string()).count() >= nodes.len()
            && span_named(&spans, "csp.ai.v1.AiService/Chat", Some("ai")).len() >= names.len()
            && span_named(&spans, start, Some("gateway")).len() == 1
            && span_named(&spans, start, Some("executor")).len() == 1
            && spans.iter().all(|span| {
                let parent = &span["parent_span_id"];
                *parent == client_span || spans.iter().any(|s| s["span_id"] == *parent)
            })
        {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "the trace never arrived whole; received:\n{}",
            spans.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let dump = || spans.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("\n");

    // The gateway's span is the client's child; the executor's is the gateway's.
    let start = "csp.executor.v1.ExecutorService/StartExecution";
    let at_gateway = span_named(&spans, start, Some("gateway"));
    assert_eq!(at_gateway.len(), 1, "{}", dump());
    assert_eq!(at_gateway[0]["parent_span_id"], client_span, "{}", dump());
    let at_executor = span_named(&spans, start, Some("executor"));
    assert_eq!(at_executor.len(), 1, "{}", dump());
    assert_eq!(at_executor[0]["parent_span_id"], at_gateway[0]["span_id"], "{}", dump());
    if env.backend() == Backend::External {
        assert_eq!(at_gateway[0]["service"], "csp-gateway");
        assert_eq!(at_executor[0]["service"], "csp-executor");
    }

    // The execution (run from the job, after the bus hop) descends from the Start call.
    let execution = span_named(&spans, "execution", None)[0];
    assert_eq!(execution["attributes"]["execution_id"], id.as_str());
    assert!(ancestors(&spans, execution).contains(&at_executor[0]), "{}", dump());

    // One span per node (five messages went through each), children of the execution.
    for (node, node_type, _) in &nodes {
        let of_node: Vec<&Value> = spans.iter().filter(|s| s["attributes"]["node.id"] == *node).collect();
        assert_eq!(of_node.len(), 1, "{node}: {}", dump());
        assert_eq!(of_node[0]["attributes"]["node.type"], *node_type);
        assert_eq!(of_node[0]["parent_span_id"], execution["span_id"], "{node}: {}", dump());
    }

    // The AI node's calls to the AI service are its children.
    let chat = spans.iter().find(|s| s["attributes"]["node.id"] == "chat").unwrap();
    let ai_calls = span_named(&spans, "csp.ai.v1.AiService/Chat", Some("ai"));
    assert_eq!(ai_calls.len(), names.len(), "one call per message: {}", dump());
    for call in ai_calls {
        assert!(ancestors(&spans, call).contains(&chat), "{call}\n{}", dump());
    }

    // The executor asked other services on the way (the design, the component types): those
    // hops are in the trace too, and the whole trace is one tree under the client's span.
    let servers: std::collections::BTreeSet<&str> =
        spans.iter().filter_map(|s| s["attributes"]["server"].as_str()).collect();
    assert!(servers.contains("design") || servers.contains("registry"), "{servers:?}: {}", dump());
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s["span_id"].as_str().unwrap()).collect();
    for span in &spans {
        let parent = span["parent_span_id"].as_str().unwrap();
        assert!(parent == client_span || ids.contains(parent), "an orphan span: {span}\n{}", dump());
    }

    // The alerts: each rule judged where its numbers are, the two crossed ones firing.
    let expected: &[(&str, &str, &str)] = &[
        ("ai", "ai_cost_per_hour_usd", "firing"),
        ("executor", "grpc_p99_latency_seconds", "firing"),
        ("executor", "grpc_error_rate", "ok"),
        ("executor", "executor_queue_depth", "ok"),
        ("executor", "executor_takeovers", "ok"),
        ("gateway", "grpc_p99_latency_seconds", "firing"),
    ];
    for (target, alert, state) in expected {
        let addr = system.targets.iter().find(|(t, _)| t == target || t == "all").unwrap().1;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (code, body) = http_get(addr, "/alerts").await;
            assert_eq!(code, 200);
            let report: Value = serde_json::from_str(&body).unwrap();
            let found = report["alerts"].as_array().unwrap().iter().find(|a| a["name"] == *alert).cloned();
            if let Some(found) = found.filter(|a| a["state"] == *state) {
                assert!(found["summary"].as_str().is_some_and(|s| !s.is_empty()));
                assert!(found["value"].is_number(), "{found}");
                if *state == "firing" {
                    assert!(report["firing"].as_u64().unwrap() >= 1, "{report}");
                    let (_, metrics) = http_get(addr, "/metrics").await;
                    let line = format!("csp_alert_firing{{alert=\"{alert}\"}} 1");
                    assert!(metrics.contains(&line), "{target}: {line} is not on /metrics");
                }
                break;
            }
            assert!(Instant::now() < deadline, "{target}: {alert} is not {state}: {report}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Every process's metrics, after that work, as Prometheus's linter reads them.
    let mut exposed = String::new();
    for (target, addr) in &system.targets {
        let (code, metrics) = http_get(*addr, "/metrics").await;
        assert_eq!(code, 200, "{target}");
        exposed.push_str(&metrics);
    }
    // Everything the shipped dashboard and alert rules read is something the system exposes.
    for shipped in
        ["helm/csp-designer/dashboards/csp-designer.json", "helm/csp-designer/templates/prometheusrule.yaml"]
    {
        let text = std::fs::read_to_string(Path::new(ROOT).join(shipped)).unwrap();
        let names: std::collections::BTreeSet<&str> = text
            .match_indices("csp_")
            .map(|(at, _)| {
                let rest = &text[at..];
                &rest[..rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len())]
            })
            .filter(|name| name.len() > "csp_".len() && !name.ends_with('_'))
            .collect();
        assert!(names.len() >= 5, "{shipped}: {names:?}");
        for name in names {
            let present = exposed.lines().any(|line| {
                line.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            });
            assert!(present, "{shipped} reads {name}, which no process exposes");
        }
    }
    if let Some(promtool) = promtool() {
        for (target, addr) in &system.targets {
            let (code, metrics) = http_get(*addr, "/metrics").await;
            assert_eq!(code, 200, "{target}");
            assert!(metrics.contains("csp_grpc_requests_in_flight"), "{target}: {metrics}");
            let mut check = Command::new(&promtool)
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            check.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
            let output = check.wait_with_output().unwrap();
            assert!(
                output.status.success(),
                "{target}: promtool check metrics:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

csp_testkit::backend_tests!(what_operators_see);

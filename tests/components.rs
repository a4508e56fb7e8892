//! Custom components in other languages: `remote.call` to a component written with grpcio in
//! Python (tests/peers/component.py), which — like grpc-python and grpc-go servers — sends its
//! response headers only with its first answer.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use common::{Peer, Running, channel, create_admin, design_of, env_vars, new_designer, peers_python};
use csp_proto::executor::v1 as pb;
use csp_testkit::{TestEnv, authed};
use serde_json::{Value, json};

/// The system, a designer's token and the Python component.
struct Setup {
    csp: Running,
    token: String,
    component: Peer,
}

async fn setup(env: &TestEnv) -> Option<Setup> {
    let python = peers_python()?;
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let component = Peer::start(&python, "component.py", &[proto.to_str().unwrap()]);
    let vars = env_vars(env);
    create_admin(env, &vars);
    let csp = Running::start(env.dir(), &vars, &["serve"]);
    let token = new_designer(csp.gateway).await;
    Some(Setup { csp, token, component })
}

/// Runs `input → python (remote.call) → result` with three messages; the execution's end.
async fn run_component(setup: &Setup, config: Value, options: Option<pb::ExecutionOptions>) -> pb::Execution {
    let mut config = config;
    config["address"] = json!(format!("http://127.0.0.1:{}", setup.component.port));
    let (gateway, token) = (setup.csp.gateway, setup.token.as_str());
    let design = design_of(
        gateway,
        token,
        &[
            ("input", "source.input", json!({})),
            ("python", "remote.call", config),
            ("result", "sink.output", json!({})),
        ],
    )
    .await;
    let mut executor = pb::executor_service_client::ExecutorServiceClient::new(channel(gateway).await);
    let request = pb::StartExecutionRequest {
        design_id: design,
        inputs: HashMap::from([(
            "input".to_owned(),
            prost_types::ListValue {
                values: (1..=3).map(|n| csp_proto::json::to_value(json!({ "n": n }))).collect(),
            },
        )]),
        options,
        ..Default::default()
    };
    let id =
        executor.start_execution(authed(request, token)).await.unwrap().into_inner().execution.unwrap().id;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let request = pb::GetExecutionRequest { execution_id: id.clone() };
        let execution =
            executor.get_execution(authed(request, token)).await.unwrap().into_inner().execution.unwrap();
        if execution.finished_at.is_some() {
            return execution;
        }
        assert!(Instant::now() < deadline, "the execution never ended: {execution:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn outputs(done: &pb::Execution) -> Vec<Value> {
    done.outputs
        .get("result")
        .map_or_else(Vec::new, |list| list.values.iter().cloned().map(csp_proto::json::from_value).collect())
}

/// A component that goes silent is given up on after the node policy's per-message timeout
/// (shorter here than the node's own 30 s), and what it had not answered is retried on a new
/// stream under the node's retry policy: the run succeeds, every message answered once.
async fn a_silent_component_is_retried_under_the_node_policy(env: TestEnv) {
    let Some(setup) = setup(&env).await else { return };
    let policy = pb::NodePolicy {
        timeout: Some(prost_types::Duration { seconds: 0, nanos: 500_000_000 }),
        max_retries: 2,
        ..Default::default()
    };
    let options = pb::ExecutionOptions {
        node_policies: HashMap::from([("python".to_owned(), policy)]),
        ..Default::default()
    };
    let config = json!({ "config": { "k": 1, "stall_first_stream": true }, "timeout_ms": 30_000 });
    let done = run_component(&setup, config, Some(options)).await;
    assert_eq!(done.status, pb::ExecutionStatus::Succeeded as i32, "{:?}", done.error);
    let expected: Vec<Value> =
        (1..=3).map(|n| json!({ "echo": { "n": n }, "by": "python", "k": 1 })).collect();
    assert_eq!(outputs(&done), expected);
    let node = done.nodes.iter().find(|n| n.node_id == "python").unwrap();
    assert!(node.metrics.as_ref().unwrap().retries >= 1, "{node:?}");

    // Without retries, the node's error policy decides: failing the run, saying why.
    let policy = pb::NodePolicy {
        timeout: Some(prost_types::Duration { seconds: 0, nanos: 500_000_000 }),
        ..Default::default()
    };
    let options = pb::ExecutionOptions {
        node_policies: HashMap::from([("python".to_owned(), policy)]),
        ..Default::default()
    };
    // A component of its own: only its first stream stalls.
    let setup = Setup {
        component: Peer::start(
            &peers_python().unwrap(),
            "component.py",
            &[Path::new(env!("CARGO_MANIFEST_DIR")).join("proto").to_str().unwrap()],
        ),
        ..setup
    };
    let config = json!({ "config": { "k": 1, "stall_first_stream": true }, "timeout_ms": 30_000 });
    let done = run_component(&setup, config, Some(options)).await;
    assert_eq!(done.status, pb::ExecutionStatus::Failed as i32);
    assert!(
        done.error.as_ref().unwrap().message.contains("did not answer within 500 ms"),
        "{:?}",
        done.error
    );
}

async fn a_python_component_runs_in_a_design(env: TestEnv) {
    let Some(setup) = setup(&env).await else { return };
    let done = run_component(&setup, json!({ "config": { "k": 7 }, "timeout_ms": 5000 }), None).await;
    assert_eq!(done.status, pb::ExecutionStatus::Succeeded as i32, "{:?}", done.error);
    let expected: Vec<Value> =
        (1..=3).map(|n| json!({ "echo": { "n": n }, "by": "python", "k": 7 })).collect();
    assert_eq!(outputs(&done), expected);
}

csp_testkit::backend_tests!(
    a_python_component_runs_in_a_design,
    a_silent_component_is_retried_under_the_node_policy
);

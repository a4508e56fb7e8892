//! The executor over gRPC, with real registry and design services, on SQLite + the in-memory
//! bus and on PostgreSQL + Redis.

#![allow(clippy::unwrap_used)]

use std::{net::SocketAddr, time::Duration};

use csp_platform::{auth::Role, server::bind};
use csp_proto::{
    design::v1::{self as dpb, design_service_client::DesignServiceClient},
    executor::v1::{self as pb, executor_service_client::ExecutorServiceClient},
    json,
};
use csp_testkit::{TestEnv, TestIssuer, authed};
use futures::StreamExt as _;
use pb::execution_event::Kind as Event;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt as _;

struct Harness {
    executor: ExecutorServiceClient<Channel>,
    designs: DesignServiceClient<Channel>,
    issuer: TestIssuer,
    stop: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

async fn start(env: &TestEnv) -> Harness {
    start_with(env, |_| {}).await
}

async fn start_with(env: &TestEnv, tweak: impl FnOnce(&mut csp_platform::Settings)) -> Harness {
    let issuer = TestIssuer::start().await;
    let mut settings = env.settings();
    issuer.point(&mut settings);
    settings.executor.threads = 2;
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
    tokio::spawn(executor.run_until_stopped(stop.clone().cancelled_owned()));
    Harness {
        executor: ExecutorServiceClient::new(connect(executor_addr).await),
        designs: DesignServiceClient::new(connect(design_addr).await),
        issuer,
        stop,
    }
}

fn node(id: &str, type_id: &str, config: Value) -> dpb::Op {
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

fn link(id: &str, from: &str, out: &str, to: &str, input: &str) -> dpb::Op {
    dpb::Op {
        op: Some(dpb::op::Op::AddConnection(dpb::AddConnectionOp {
            connection: Some(dpb::Connection {
                id: id.into(),
                from: Some(dpb::PortAddress { node_id: from.into(), port: out.into() }),
                to: Some(dpb::PortAddress { node_id: to.into(), port: input.into() }),
                ..Default::default()
            }),
        })),
    }
}

impl Harness {
    fn designer(&self, user: &str) -> String {
        self.issuer.token(user, &[Role::Designer])
    }

    /// A design of `ops`, owned by `token`'s user.
    async fn design(&self, token: &str, ops: Vec<dpb::Op>) -> String {
        let created = self
            .designs
            .clone()
            .create_design(authed(
                dpb::CreateDesignRequest { name: "Run me".into(), ..Default::default() },
                token,
            ))
            .await
            .unwrap()
            .into_inner()
            .design
            .unwrap();
        let request = dpb::ApplyOpsRequest { design_id: created.id.clone(), expected_revision: 1, ops };
        self.designs.clone().apply_ops(authed(request, token)).await.unwrap();
        created.id
    }

    async fn run(&self, token: &str, request: pb::StartExecutionRequest) -> Result<pb::Execution, Status> {
        Ok(self
            .executor
            .clone()
            .start_execution(authed(request, token))
            .await?
            .into_inner()
            .execution
            .unwrap())
    }

    async fn get(&self, token: &str, id: &str) -> pb::Execution {
        let request = pb::GetExecutionRequest { execution_id: id.into() };
        self.executor
            .clone()
            .get_execution(authed(request, token))
            .await
            .unwrap()
            .into_inner()
            .execution
            .unwrap()
    }

    /// Every event from `after` to the end of the execution.
    async fn watch(&self, token: &str, id: &str, after: &str) -> Vec<pb::ExecutionEvent> {
        let request = pb::WatchExecutionRequest { execution_id: id.into(), after_event_id: after.into() };
        let mut stream =
            self.executor.clone().watch_execution(authed(request, token)).await.unwrap().into_inner();
        let mut events = Vec::new();
        while let Some(event) =
            tokio::time::timeout(Duration::from_secs(20), stream.next()).await.expect("events keep coming")
        {
            events.push(event.unwrap().event.unwrap());
        }
        events
    }

    /// Watches until `until` accepts an event; returns the events so far.
    async fn watch_until(
        &self,
        token: &str,
        id: &str,
        until: impl Fn(&Event) -> bool,
    ) -> Vec<pb::ExecutionEvent> {
        let request = pb::WatchExecutionRequest { execution_id: id.into(), after_event_id: String::new() };
        let mut stream =
            self.executor.clone().watch_execution(authed(request, token)).await.unwrap().into_inner();
        let mut events = Vec::new();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(20), stream.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
                .event
                .unwrap();
            let done = event.kind.as_ref().is_some_and(&until);
            events.push(event);
            if done {
                return events;
            }
        }
    }
}

fn status_of(event: &pb::ExecutionEvent) -> Option<pb::ExecutionStatus> {
    match &event.kind {
        Some(Event::StatusChanged(s)) => pb::ExecutionStatus::try_from(s.status).ok(),
        _ => None,
    }
}

fn outputs(execution: &pb::Execution, node: &str) -> Vec<Value> {
    execution
        .outputs
        .get(node)
        .map(|l| l.values.iter().cloned().map(json::from_value).collect())
        .unwrap_or_default()
}

fn inputs(node: &str, values: Vec<Value>) -> std::collections::HashMap<String, prost_types::ListValue> {
    [(node.to_owned(), prost_types::ListValue { values: values.into_iter().map(json::to_value).collect() })]
        .into()
}

/// input → set `seen` → output.
fn marking_design() -> Vec<dpb::Op> {
    vec![
        node("in", "source.input", json!({})),
        node("mark", "transform.set", json!({ "operations": [{ "path": "seen", "value": true }] })),
        node("out", "sink.output", json!({})),
        link("c1", "in", "out", "mark", "in"),
        link("c2", "mark", "out", "out", "in"),
    ]
}

/// Starts an execution, streams it to the end, and reads its result.
async fn an_execution_runs_streams_and_returns_its_outputs(env: TestEnv) {
    let h = start(&env).await;
    let alice = h.designer("alice");
    let design = h.design(&alice, marking_design()).await;
    let request = pb::StartExecutionRequest {
        design_id: design.clone(),
        inputs: inputs("in", vec![json!({ "n": 1 }), json!({ "n": 2 })]),
        ..Default::default()
    };
    let queued = h.run(&alice, request).await.unwrap();
    assert_eq!(queued.status, pb::ExecutionStatus::Queued as i32);
    assert_eq!(queued.design_revision, 2);
    assert_eq!(queued.nodes.len(), 3);

    let events = h.watch(&alice, &queued.id, "").await;
    let statuses: Vec<pb::ExecutionStatus> = events.iter().filter_map(status_of).collect();
    assert_eq!(
        statuses,
        [pb::ExecutionStatus::Queued, pb::ExecutionStatus::Running, pb::ExecutionStatus::Succeeded]
    );
    assert!(events.iter().all(|e| e.execution_id == queued.id && !e.event_id.is_empty() && e.time.is_some()));
    let emitted: Vec<Value> = events
        .iter()
        .filter_map(|e| {
            if let Some(Event::Output(o)) = &e.kind {
                Some(json::from_value(o.payload.clone().unwrap()))
            } else {
                None
            }
        })
        .collect();
    assert_eq!(emitted, [json!({ "n": 1, "seen": true }), json!({ "n": 2, "seen": true })]);
    assert!(events.iter().any(|e| matches!(&e.kind, Some(Event::NodeStatusChanged(n)) if n.node_id == "mark" && n.status == pb::NodeStatus::Completed as i32)));

    let done = h.get(&alice, &queued.id).await;
    assert_eq!(done.status, pb::ExecutionStatus::Succeeded as i32);
    assert_eq!(outputs(&done, "out"), [json!({ "n": 1, "seen": true }), json!({ "n": 2, "seen": true })]);
    assert_eq!(done.attempt, 1);
    assert!(done.started_at.is_some() && done.finished_at.is_some());
    let mark = done.nodes.iter().find(|n| n.node_id == "mark").unwrap();
    assert_eq!(mark.metrics.as_ref().unwrap().messages_in, 2);

    // Its status changes are on its design's stream too, for collaborators.
    let by_design = env.bus().read(&csp_executor::design_stream(&design), None, 100).await.unwrap();
    let changes: Vec<pb::ExecutionStatusChange> =
        by_design.iter().map(|e| prost::Message::decode(e.payload.as_ref()).unwrap()).collect();
    assert!(
        changes
            .iter()
            .all(|c| c.execution_id == queued.id && c.design_id == design && c.started_by == "alice")
    );
    let statuses: Vec<i32> = changes.iter().map(|c| c.status).collect();
    assert_eq!(
        statuses,
        [pb::ExecutionStatus::Queued, pb::ExecutionStatus::Running, pb::ExecutionStatus::Succeeded]
            .map(|s| s as i32)
    );

    // Listed with the design's other executions, newest first.
    let again = h
        .run(&alice, pb::StartExecutionRequest { design_id: design.clone(), ..Default::default() })
        .await
        .unwrap();
    let request = pb::ListExecutionsRequest { design_id: design.clone(), page_size: 1, ..Default::default() };
    let page = h.executor.clone().list_executions(authed(request, &alice)).await.unwrap().into_inner();
    assert_eq!(page.executions[0].id, again.id);
    assert!(page.executions[0].outputs.is_empty(), "listings leave outputs out");
    let request = pb::ListExecutionsRequest {
        design_id: design,
        page_size: 1,
        page_token: page.next_page_token,
        ..Default::default()
    };
    let page = h.executor.clone().list_executions(authed(request, &alice)).await.unwrap().into_inner();
    assert_eq!(page.executions[0].id, queued.id);

    // The same idempotency key returns the same execution.
    let request = pb::StartExecutionRequest {
        design_id: again.design_id.clone(),
        idempotency_key: "k1".into(),
        ..Default::default()
    };
    let first = h.run(&alice, request.clone()).await.unwrap();
    let second = h.run(&alice, request).await.unwrap();
    assert_eq!(first.id, second.id);
}

/// A watcher that disconnects mid-run and reconnects with its last event id misses nothing and
/// sees nothing twice.
async fn a_watch_resumes_where_it_left_off(env: TestEnv) {
    let h = start(&env).await;
    let alice = h.designer("alice");
    let design = h
        .design(
            &alice,
            vec![
                node("tick", "source.sequence", json!({ "count": 30, "interval_ms": 10 })),
                node("log", "sink.log", json!({})),
                link("c1", "tick", "out", "log", "in"),
            ],
        )
        .await;
    let execution =
        h.run(&alice, pb::StartExecutionRequest { design_id: design, ..Default::default() }).await.unwrap();

    let request =
        pb::WatchExecutionRequest { execution_id: execution.id.clone(), after_event_id: String::new() };
    let mut stream = h.executor.clone().watch_execution(authed(request, &alice)).await.unwrap().into_inner();
    let mut seen = Vec::new();
    while seen.len() < 12 {
        seen.push(stream.next().await.unwrap().unwrap().event.unwrap());
    }
    drop(stream); // the client goes away mid-run
    tokio::time::sleep(Duration::from_millis(100)).await;
    let last = seen.last().unwrap().event_id.clone();
    seen.extend(h.watch(&alice, &execution.id, &last).await);

    let everything = h.watch(&alice, &execution.id, "").await;
    let ids = |events: &[pb::ExecutionEvent]| events.iter().map(|e| e.event_id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&seen), ids(&everything), "no gap, no repeat");
    let logs = seen.iter().filter(|e| matches!(e.kind, Some(Event::Log(_)))).count();
    assert_eq!(logs, 30);
    assert_eq!(status_of(seen.last().unwrap()), Some(pb::ExecutionStatus::Succeeded));

    let request =
        pb::WatchExecutionRequest { execution_id: execution.id, after_event_id: "not-an-id".into() };
    let status = h.executor.clone().watch_execution(authed(request, &alice)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// Only the latest events of an execution are kept: a watch from before them is told so
/// (rather than silently missing some), one from within them gets the rest.
async fn a_watch_from_trimmed_events_is_told(env: TestEnv) {
    let h = start_with(&env, |s| s.executor.events_kept = 10).await;
    let alice = h.designer("alice");
    let design = h
        .design(
            &alice,
            vec![
                node("tick", "source.sequence", json!({ "count": 30 })),
                node("log", "sink.log", json!({})),
                link("c1", "tick", "out", "log", "in"),
            ],
        )
        .await;
    let execution =
        h.run(&alice, pb::StartExecutionRequest { design_id: design, ..Default::default() }).await.unwrap();
    let ended = async {
        loop {
            let now = h.get(&alice, &execution.id).await;
            if now.status == pb::ExecutionStatus::Succeeded as i32 {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), ended).await.expect("the execution ends");

    let request =
        pb::WatchExecutionRequest { execution_id: execution.id.clone(), after_event_id: String::new() };
    let outcome = match h.executor.clone().watch_execution(authed(request, &alice)).await {
        Ok(stream) => stream.into_inner().next().await.expect("an answer").map(|_| ()),
        Err(status) => Err(status),
    };
    let status = outcome.expect_err("the first events are gone");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("no longer kept (at most 10 per execution)"), "{}", status.message());
}

/// Cancel stops a running execution promptly; it ends CANCELLED with the reason.
async fn cancel_stops_a_running_execution(env: TestEnv) {
    let h = start(&env).await;
    let alice = h.designer("alice");
    let design = h
        .design(
            &alice,
            vec![
                node("tick", "source.sequence", json!({ "count": 100000, "interval_ms": 5 })),
                node("out", "sink.output", json!({})),
                link("c1", "tick", "out", "out", "in"),
            ],
        )
        .await;
    let execution =
        h.run(&alice, pb::StartExecutionRequest { design_id: design, ..Default::default() }).await.unwrap();
    h.watch_until(&alice, &execution.id, |e| matches!(e, Event::Output(_))).await;
    let started = std::time::Instant::now();
    let request = pb::CancelExecutionRequest { execution_id: execution.id.clone(), reason: "enough".into() };
    let cancelled = h
        .executor
        .clone()
        .cancel_execution(authed(request, &alice))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(cancelled.status, pb::ExecutionStatus::Cancelled as i32);
    let error = cancelled.error.clone().unwrap();
    assert_eq!(error.code, "cancelled");
    assert!(error.message.contains("cancelled by alice: enough"), "{}", error.message);
    assert!(cancelled.nodes.iter().all(|n| n.status == pb::NodeStatus::Cancelled as i32));
    assert!(!outputs(&cancelled, "out").is_empty());
}

/// A design whose processes wait on each other ends DEADLOCKED, naming them.
async fn a_deadlocked_design_ends_deadlocked(env: TestEnv) {
    let h = start(&env).await;
    let alice = h.designer("alice");
    let design = h
        .design(
            &alice,
            vec![
                node("gen", "source.constant", json!({ "value": 1, "count": 50 })),
                node("join", "control.join", json!({ "inputs": ["left", "right"] })),
                node("echo", "transform.map", json!({ "expression": "." })),
                link("to_join", "gen", "out", "join", "left"),
                link("to_echo", "join", "out", "echo", "in"),
                link("back", "echo", "out", "join", "right"),
            ],
        )
        .await;
    // ValidateDesign calls it a certain deadlock: a start is refused unless asked to run anyway.
    let refused = h
        .run(&alice, pb::StartExecutionRequest { design_id: design.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("deadlocks on every run"), "{}", refused.message());
    let request = pb::StartExecutionRequest { design_id: design, run_invalid: true, ..Default::default() };
    let execution = h.run(&alice, request).await.unwrap();
    let events = h.watch(&alice, &execution.id, "").await;
    assert_eq!(status_of(events.last().unwrap()), Some(pb::ExecutionStatus::Deadlocked));
    let done = h.get(&alice, &execution.id).await;
    let error = done.error.unwrap();
    assert_eq!(error.code, "deadlock");
    assert!(error.message.contains("`join` waits to receive on `back` from `echo`"), "{}", error.message);
    assert!(
        error.blocked_connection_ids.contains(&"back".to_owned())
            && error.blocked_connection_ids.contains(&"to_echo".to_owned())
    );
}

/// Breakpoints over the API: the execution pauses, steps, and resumes to the end.
async fn breakpoints_pause_step_and_resume(env: TestEnv) {
    let h = start(&env).await;
    let alice = h.designer("alice");
    let design = h
        .design(
            &alice,
            vec![
                node("seq", "source.sequence", json!({ "start": 1, "count": 3 })),
                node("times", "transform.map", json!({ "expression": ". * 10" })),
                node("out", "sink.output", json!({})),
                link("c1", "seq", "out", "times", "in"),
                link("c2", "times", "out", "out", "in"),
            ],
        )
        .await;
    let options = pb::ExecutionOptions { breakpoints: vec!["times".into()], ..Default::default() };
    let request =
        pb::StartExecutionRequest { design_id: design, options: Some(options), ..Default::default() };
    let execution = h.run(&alice, request).await.unwrap();
    let events = h
        .watch_until(
            &alice,
            &execution.id,
            |e| matches!(e, Event::StatusChanged(s) if s.status == pb::ExecutionStatus::Paused as i32),
        )
        .await;
    let hit = events
        .iter()
        .find_map(|e| if let Some(Event::BreakpointHit(b)) = &e.kind { Some(b.clone()) } else { None })
        .unwrap();
    assert_eq!((hit.node_id.as_str(), json::from_value(hit.payload.unwrap())), ("times", json!(1)));
    let paused = h.get(&alice, &execution.id).await;
    assert_eq!(
        (paused.status, paused.paused_at_node_id.as_str()),
        (pb::ExecutionStatus::Paused as i32, "times")
    );

    let request = pb::StepExecutionRequest { execution_id: execution.id.clone() };
    let stepped = h
        .executor
        .clone()
        .step_execution(authed(request, &alice))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(stepped.status, pb::ExecutionStatus::Paused as i32, "paused again after one step");
    assert!(["times", "out"].contains(&stepped.paused_at_node_id.as_str()), "{}", stepped.paused_at_node_id);

    let request = pb::ResumeExecutionRequest { execution_id: execution.id.clone(), clear_breakpoints: true };
    h.executor.clone().resume_execution(authed(request, &alice)).await.unwrap();
    let events = h.watch(&alice, &execution.id, "").await;
    assert_eq!(status_of(events.last().unwrap()), Some(pb::ExecutionStatus::Succeeded));
    assert_eq!(outputs(&h.get(&alice, &execution.id).await, "out"), [json!(10), json!(20), json!(30)]);

    // Not paused: resume and step are refused.
    let request = pb::StepExecutionRequest { execution_id: execution.id };
    let status = h.executor.clone().step_execution(authed(request, &alice)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

/// A failed execution reruns from the failed node, replaying what came before it.
async fn a_retry_reruns_from_the_failed_node(env: TestEnv) {
    let h = start(&env).await;
    let alice = h.designer("alice");
    let design = h
        .design(
            &alice,
            vec![
                node("seq", "source.sequence", json!({ "count": 3, "field": "n" })),
                node(
                    "bump",
                    "transform.map",
                    json!({ "expression": "if .n == 1 then error(\"one is bad\") else .n + 100 end" }),
                ),
                node("out", "sink.output", json!({})),
                link("c1", "seq", "out", "bump", "in"),
                link("c2", "bump", "out", "out", "in"),
            ],
        )
        .await;
    let options = pb::ExecutionOptions { record_messages: true, ..Default::default() };
    let request = pb::StartExecutionRequest {
        design_id: design.clone(),
        options: Some(options.clone()),
        ..Default::default()
    };
    let failed = h.run(&alice, request).await.unwrap();
    h.watch(&alice, &failed.id, "").await;
    let failed = h.get(&alice, &failed.id).await;
    assert_eq!(failed.status, pb::ExecutionStatus::Failed as i32);
    assert_eq!(failed.error.as_ref().unwrap().node_id, "bump");
    assert!(failed.error.as_ref().unwrap().message.contains("one is bad"));

    // Retry from the failed node, skipping what still fails: the source is not rerun.
    let mut retry_options = options;
    retry_options.node_policies.insert(
        "bump".into(),
        pb::NodePolicy { on_error: pb::ErrorPolicy::Skip as i32, ..Default::default() },
    );
    let request = pb::RetryExecutionRequest {
        execution_id: failed.id.clone(),
        from_node_id: String::new(),
        options: Some(retry_options),
    };
    let retried = h
        .executor
        .clone()
        .retry_execution(authed(request, &alice))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(retried.retry_of, failed.id);
    h.watch(&alice, &retried.id, "").await;
    let retried = h.get(&alice, &retried.id).await;
    assert_eq!(retried.status, pb::ExecutionStatus::Succeeded as i32, "{:?}", retried.error);
    assert_eq!(outputs(&retried, "out"), [json!(100), json!(102)]);
    let seq = retried.nodes.iter().find(|n| n.node_id == "seq").unwrap();
    assert_eq!(seq.status, pb::NodeStatus::Replayed as i32);

    // Without recorded messages there is nothing to replay.
    let request = pb::StartExecutionRequest { design_id: design, ..Default::default() };
    let unrecorded = h.run(&alice, request).await.unwrap();
    h.watch(&alice, &unrecorded.id, "").await;
    let request = pb::RetryExecutionRequest { execution_id: unrecorded.id, ..Default::default() };
    let status = h.executor.clone().retry_execution(authed(request, &alice)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("record_messages"));
}

/// A design calling another runs it as part of itself.
async fn sub_designs_run_inside_their_caller(env: TestEnv) {
    let h = start(&env).await;
    let alice = h.designer("alice");
    let inner = h
        .design(
            &alice,
            vec![
                node("orders", "source.input", json!({ "name": "orders" })),
                node("double", "transform.map", json!({ "expression": ".n * 2" })),
                node("result", "sink.output", json!({ "name": "doubled" })),
                link("i1", "orders", "out", "double", "in"),
                link("i2", "double", "out", "result", "in"),
            ],
        )
        .await;
    let outer = h
        .design(
            &alice,
            vec![
                node("in", "source.input", json!({})),
                node("call", "design.call", json!({ "design_id": inner })),
                node("out", "sink.output", json!({})),
                link("o1", "in", "out", "call", "orders"),
                link("o2", "call", "doubled", "out", "in"),
            ],
        )
        .await;
    let request = pb::StartExecutionRequest {
        design_id: outer,
        inputs: inputs("in", vec![json!({ "n": 2 }), json!({ "n": 5 })]),
        ..Default::default()
    };
    let execution = h.run(&alice, request).await.unwrap();
    assert!(execution.nodes.iter().any(|n| n.node_id == "call/double"), "{:?}", execution.nodes);
    h.watch(&alice, &execution.id, "").await;
    assert_eq!(outputs(&h.get(&alice, &execution.id).await, "out"), [json!(4), json!(10)]);
}

fn violations(status: &Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| (v.field, v.description)).collect())
        .unwrap_or_default()
}

/// Who may do what, and bad requests refused with reasons.
async fn permissions_and_bad_requests(env: TestEnv) {
    let h = start(&env).await;
    let alice = h.designer("alice");
    let bob = h.designer("bob");
    let stranger = h.designer("stranger");
    let design = h
        .design(
            &alice,
            vec![
                node("in", "source.input", json!({})),
                node("out", "sink.output", json!({})),
                link("c", "in", "out", "out", "in"),
            ],
        )
        .await;
    let share = dpb::ShareDesignRequest {
        design_id: design.clone(),
        user_id: "bob".into(),
        access: dpb::Access::Viewer as i32,
    };
    h.designs.clone().share_design(authed(share, &alice)).await.unwrap();
    let execution = h
        .run(&alice, pb::StartExecutionRequest { design_id: design.clone(), ..Default::default() })
        .await
        .unwrap();
    h.watch(&alice, &execution.id, "").await;

    // A viewer reads and watches, but does not run or cancel.
    assert_eq!(h.get(&bob, &execution.id).await.id, execution.id);
    assert!(!h.watch(&bob, &execution.id, "").await.is_empty());
    let status = h
        .run(&bob, pb::StartExecutionRequest { design_id: design.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let request = pb::CancelExecutionRequest { execution_id: execution.id.clone(), reason: String::new() };
    let status = h.executor.clone().cancel_execution(authed(request, &bob)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // A stranger cannot tell it exists.
    let request = pb::GetExecutionRequest { execution_id: execution.id.clone() };
    assert_eq!(
        h.executor.clone().get_execution(authed(request, &stranger)).await.unwrap_err().code(),
        Code::NotFound
    );
    let status = h
        .run(&stranger, pb::StartExecutionRequest { design_id: design.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // Nobody signed in: nothing.
    let request = tonic::Request::new(pb::GetExecutionRequest { execution_id: execution.id.clone() });
    assert_eq!(h.executor.clone().get_execution(request).await.unwrap_err().code(), Code::Unauthenticated);

    // Bad requests name their fields.
    let request = pb::StartExecutionRequest {
        design_id: design.clone(),
        inputs: inputs("nope", vec![json!(1)]),
        ..Default::default()
    };
    let status = h.run(&alice, request).await.unwrap_err();
    assert_eq!(violations(&status)[0].0, "inputs[nope]");
    let options = pb::ExecutionOptions {
        breakpoints: vec!["ghost".into()],
        default_capacity: -1,
        timeout: Some(prost_types::Duration { seconds: 999_999, nanos: 0 }),
        ..Default::default()
    };
    let status = h
        .run(
            &alice,
            pb::StartExecutionRequest {
                design_id: design.clone(),
                options: Some(options),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    let fields: Vec<String> = violations(&status).into_iter().map(|v| v.0).collect();
    assert_eq!(fields, ["options.default_capacity", "options.timeout"]);
    let status = h
        .run(&alice, pb::StartExecutionRequest { design_id: "x".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(violations(&status)[0].0, "design_id");

    // A design that cannot run is refused, with its problems.
    let broken = h
        .design(
            &alice,
            vec![
                node("k", "source.constant", json!({})),
                node("out", "sink.output", json!({})),
                link("c", "k", "out", "out", "in"),
            ],
        )
        .await;
    let status = h
        .run(&alice, pb::StartExecutionRequest { design_id: broken, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("node `k`: invalid configuration") && status.message().contains("/value"),
        "{}",
        status.message()
    );
}

/// Dead letters are for admins: others are refused, admins get a (here empty) page.
async fn dead_letters_are_for_admins(env: TestEnv) {
    let mut h = start(&env).await;
    let designer = h.issuer.token("dora", &[Role::Designer]);
    let status = h
        .executor
        .list_dead_letters(authed(pb::ListDeadLettersRequest::default(), &designer))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let admin = h.issuer.token("root", &[Role::Admin]);
    let page = h
        .executor
        .list_dead_letters(authed(pb::ListDeadLettersRequest::default(), &admin))
        .await
        .unwrap()
        .into_inner();
    assert!(page.dead_letters.is_empty() && page.next_page_token.is_empty());
    let request = pb::ListDeadLettersRequest { page_size: -1, ..Default::default() };
    let status = h.executor.list_dead_letters(authed(request, &admin)).await.unwrap_err();
    assert_eq!(violations(&status)[0].0, "page_size");
}

/// One execution is one trace: every event on its stream, from QUEUED to the end, carries the
/// trace of the call that started it, so a trace viewer shows the run under that call.
async fn every_event_carries_the_trace_of_the_start(env: TestEnv) {
    static TELEMETRY: std::sync::Once = std::sync::Once::new();
    TELEMETRY.call_once(|| {
        let mut settings = csp_platform::Settings::default();
        settings.log.level = "error".into();
        if let Ok(guard) = csp_platform::telemetry::init(&settings, "executor-test") {
            std::mem::forget(guard);
        }
    });
    let h = start(&env).await;
    let alice = h.designer("alice");
    let design = h.design(&alice, marking_design()).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = authed(
        pb::StartExecutionRequest {
            design_id: design,
            inputs: inputs("in", vec![json!({ "n": 1 })]),
            ..Default::default()
        },
        &alice,
    );
    request.metadata_mut().insert("traceparent", format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap());
    let started = h.executor.clone().start_execution(request).await.unwrap().into_inner().execution.unwrap();
    let watched = h.watch(&alice, &started.id, "").await;
    assert_eq!(watched.iter().filter_map(status_of).next_back(), Some(pb::ExecutionStatus::Succeeded));

    let stored = env.bus().read(&csp_executor::stream(&started.id), None, 1000).await.unwrap();
    assert_eq!(stored.len(), watched.len());
    for (event, seen) in stored.iter().zip(&watched) {
        let parent = event.headers.get("traceparent").map(String::as_str).unwrap_or_default();
        assert!(parent.starts_with(&format!("00-{trace}-")), "{:?} carries `{parent}`", seen.kind);
    }
}

fn small_design() -> Vec<dpb::Op> {
    vec![
        node("in", "source.input", json!({})),
        node("out", "sink.output", json!({})),
        link("c1", "in", "out", "out", "in"),
    ]
}

/// The job queue wiped out from under running replicas (a flushed Redis, say): they make its
/// consumer group again, and executions started afterwards run.
async fn a_lost_job_queue_is_made_again(env: TestEnv) {
    let h = start(&env).await;
    let alice = h.designer("alice");
    let design = h.design(&alice, small_design()).await;
    env.bus().delete("executor:jobs").await.unwrap();
    let request = pb::StartExecutionRequest {
        design_id: design,
        inputs: inputs("in", vec![json!(1)]),
        ..Default::default()
    };
    let started = h.run(&alice, request).await.unwrap();
    let events = h.watch(&alice, &started.id, "").await;
    assert_eq!(events.iter().filter_map(status_of).next_back(), Some(pb::ExecutionStatus::Succeeded));
    assert_eq!(outputs(&h.get(&alice, &started.id).await, "out"), [json!(1)]);
}

/// A start whose job the bus refuses is answered UNAVAILABLE, and the execution it stored ends
/// FAILED — in the database and on its stream — instead of waiting forever for a replica.
/// (Redis only: the in-memory bus cannot refuse an append.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_the_bus_refuses_ends_failed() {
    csp_testkit::run(csp_testkit::Backend::External, |env: TestEnv| async move {
        let h = start(&env).await;
        let alice = h.designer("alice");
        let design = h.design(&alice, small_design()).await;
        // The job queue's key turned into a plain value: every append to it fails.
        env.bus().delete("executor:jobs").await.unwrap();
        env.bus().set("executor:jobs", 1, Duration::from_secs(60)).await.unwrap();
        let request = pb::StartExecutionRequest {
            design_id: design.clone(),
            inputs: inputs("in", vec![json!(1)]),
            ..Default::default()
        };
        let status = h.run(&alice, request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");

        let listed = h
            .executor
            .clone()
            .list_executions(authed(
                pb::ListExecutionsRequest { design_id: design, ..Default::default() },
                &alice,
            ))
            .await
            .unwrap()
            .into_inner()
            .executions;
        assert_eq!(listed.len(), 1);
        let stored = h.get(&alice, &listed[0].id).await;
        assert_eq!(stored.status, pb::ExecutionStatus::Failed as i32);
        assert_eq!(stored.error.as_ref().unwrap().code, "unavailable");
        let events = h.watch(&alice, &stored.id, "").await;
        assert_eq!(events.iter().filter_map(status_of).next_back(), Some(pb::ExecutionStatus::Failed));
        env.bus().reset("executor:jobs").await.unwrap();
    })
    .await;
}

csp_testkit::backend_tests!(
    dead_letters_are_for_admins,
    a_lost_job_queue_is_made_again,
    every_event_carries_the_trace_of_the_start,
    a_watch_from_trimmed_events_is_told,
    an_execution_runs_streams_and_returns_its_outputs,
    a_watch_resumes_where_it_left_off,
    cancel_stops_a_running_execution,
    a_deadlocked_design_ends_deadlocked,
    breakpoints_pause_step_and_resume,
    a_retry_reruns_from_the_failed_node,
    sub_designs_run_inside_their_caller,
    permissions_and_bad_requests,
);

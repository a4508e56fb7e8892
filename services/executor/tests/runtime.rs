//! The runtime on its own: every built-in component (AI nodes against a fake AI service,
//! remote calls against a real gRPC component), the error policies, cancellation,
//! deadlocks, breakpoints, deadlines, recording and replay.

#![allow(clippy::unwrap_used)]

use std::{collections::HashMap, time::Duration};

use csp_executor::runtime::{
    Debugger, Ending, Network, OnError, Options, Outcome, Plan, PlanConnection, PlanNode, Policy, Services,
};
use csp_proto::{executor::v1 as pb, json as pbjson};
use pb::execution_event::Kind as Event;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Allocations counted per thread as in the `csp` binary, so jq's memory bound holds here too.
#[global_allocator]
static ALLOCATOR: csp_alloc::Counting<std::alloc::System> = csp_alloc::Counting(std::alloc::System);

fn plan(nodes: &[(&str, &str, Value)], connections: &[(&str, &str, &str, &str)]) -> Plan {
    Plan {
        nodes: nodes
            .iter()
            .map(|(id, t, config)| PlanNode {
                id: (*id).into(),
                type_id: (*t).into(),
                config: config.clone(),
                remote: None,
            })
            .collect(),
        connections: connections
            .iter()
            .enumerate()
            .map(|(i, (from, from_port, to, to_port))| PlanConnection {
                id: format!("c{i}"),
                from: (*from).into(),
                from_port: (*from_port).into(),
                to: (*to).into(),
                to_port: (*to_port).into(),
                capacity: 0,
            })
            .collect(),
    }
}

struct Ran {
    outcome: Outcome,
    events: Vec<Event>,
}

impl Ran {
    fn output(&self, node: &str) -> Vec<Value> {
        self.outcome.outputs.get(node).cloned().unwrap_or_default()
    }

    fn node(&self, id: &str) -> pb::NodeSummary {
        self.outcome.nodes.iter().find(|n| n.node_id == id).cloned().unwrap()
    }
}

/// Builds and runs a plan; `control` gets the debugger and the cancel switch while it runs.
async fn run_with<F, Fut>(plan: &Plan, options: Options, breakpoints: &[&str], control: F) -> Ran
where
    F: FnOnce(std::sync::Arc<Debugger>, CancellationToken, mpsc::UnboundedReceiver<Event>) -> Fut,
    Fut: std::future::Future<Output = Vec<Event>>,
{
    let (tx, mut rx) = mpsc::channel::<Event>(1024);
    let (copy_tx, copy_rx) = mpsc::unbounded_channel();
    let collector = tokio::spawn(async move {
        let mut events = Vec::new();
        while let Some(event) = rx.recv().await {
            let _ = copy_tx.send(event.clone());
            events.push(event);
        }
        events
    });
    let debugger = Debugger::new(breakpoints.iter().map(|b| (*b).to_owned()));
    let network = Network::build(plan, options, Services::default(), debugger.clone(), tx).unwrap();
    let cancel = CancellationToken::new();
    let running = tokio::spawn(network.run(cancel.clone()));
    let seen_by_control = control(debugger, cancel, copy_rx).await;
    let outcome =
        tokio::time::timeout(Duration::from_secs(20), running).await.expect("the run ends").unwrap();
    let mut events = collector.await.unwrap();
    if events.is_empty() {
        events = seen_by_control;
    }
    Ran { outcome, events }
}

async fn run(plan: &Plan, options: Options) -> Ran {
    run_with(plan, options, &[], |_, _, _| async { Vec::new() }).await
}

/// One component between `source.input` nodes (one per input port) and `sink.output` nodes
/// (one per output port).
async fn through(type_id: &str, config: Value, inputs: &[(&str, Vec<Value>)], outputs: &[&str]) -> Ran {
    let mut nodes = vec![("node", type_id, config)];
    let mut connections = Vec::new();
    let mut options = Options::default();
    let input_ids: Vec<String> = inputs.iter().map(|(port, _)| format!("in_{port}")).collect();
    let output_ids: Vec<String> = outputs.iter().map(|port| format!("out_{port}")).collect();
    for ((port, messages), id) in inputs.iter().zip(&input_ids) {
        nodes.push((id.as_str(), "source.input", json!({})));
        connections.push((id.as_str(), "out", "node", *port));
        options.inputs.insert(id.clone(), messages.clone());
    }
    for (port, id) in outputs.iter().zip(&output_ids) {
        nodes.push((id.as_str(), "sink.output", json!({})));
        connections.push(("node", *port, id.as_str(), "in"));
    }
    let ran = run(&plan(&nodes, &connections), options).await;
    assert_eq!(ran.outcome.ending, Ending::Succeeded, "{type_id}: {:?}", ran.outcome.error);
    ran
}

#[tokio::test]
async fn transforms() {
    let ran = through(
        "transform.set",
        json!({ "operations": [
            { "op": "set", "path": "a.b", "value": 1 },
            { "op": "rename", "path": "x", "to": "y" },
            { "op": "delete", "path": "gone" },
            { "op": "copy", "path": "a", "to": "c" },
        ]}),
        &[("in", vec![json!({ "x": 1, "gone": 2 })])],
        &["out"],
    )
    .await;
    assert_eq!(ran.output("out_out"), [json!({ "a": { "b": 1 }, "y": 1, "c": { "b": 1 } })]);

    let ran = through(
        "transform.map",
        json!({ "expression": ".n * 2" }),
        &[("in", vec![json!({ "n": 1 }), json!({ "n": 2 })])],
        &["out"],
    )
    .await;
    assert_eq!(ran.output("out_out"), [json!(2), json!(4)]);
    let ran =
        through("transform.map", json!({ "expression": ".[]" }), &[("in", vec![json!([7, 8])])], &["out"])
            .await;
    assert_eq!(ran.output("out_out"), [json!(7), json!(8)], "every result is sent");

    let ran = through(
        "transform.filter",
        json!({ "expression": ".n > 1" }),
        &[("in", vec![json!({ "n": 1 }), json!({ "n": 2 })])],
        &["out"],
    )
    .await;
    assert_eq!(ran.output("out_out"), [json!({ "n": 2 })]);

    let numbers = vec![json!(1), json!(2), json!(3)];
    let ran = through(
        "transform.reduce",
        json!({ "expression": ".acc + .item", "initial": 0 }),
        &[("in", numbers.clone())],
        &["out"],
    )
    .await;
    assert_eq!(ran.output("out_out"), [json!(6)]);
    let ran = through(
        "transform.reduce",
        json!({ "expression": ".acc + .item", "initial": 0, "emit": "each" }),
        &[("in", numbers)],
        &["out"],
    )
    .await;
    assert_eq!(ran.output("out_out"), [json!(1), json!(3), json!(6)]);

    let ran = through(
        "transform.template",
        json!({ "template": "Hello, {{ name }}!" }),
        &[("in", vec![json!({ "name": "Ada" })])],
        &["out"],
    )
    .await;
    assert_eq!(ran.output("out_out"), [json!("Hello, Ada!")]);
    let ran = through(
        "transform.template",
        json!({ "template": "#{{ message.id }}", "field": "label" }),
        &[("in", vec![json!({ "id": 7 })])],
        &["out"],
    )
    .await;
    assert_eq!(ran.output("out_out"), [json!({ "id": 7, "label": "#7" })]);
}

#[tokio::test]
async fn control() {
    let config = json!({ "cases": [{ "port": "big", "expression": ".n > 10" }, { "port": "even", "expression": ".n % 2 == 0" }] });
    let messages = vec![json!({ "n": 12 }), json!({ "n": 4 }), json!({ "n": 3 })];
    let ran =
        through("control.switch", config.clone(), &[("in", messages.clone())], &["big", "even", "default"])
            .await;
    assert_eq!(ran.output("out_big"), [json!({ "n": 12 })]);
    assert_eq!(ran.output("out_even"), [json!({ "n": 4 })]);
    assert_eq!(ran.output("out_default"), [json!({ "n": 3 })]);
    let mut all = config;
    all["mode"] = json!("all");
    let ran = through("control.switch", all, &[("in", messages)], &["big", "even", "default"]).await;
    assert_eq!(ran.output("out_even"), [json!({ "n": 12 }), json!({ "n": 4 })]);

    let ran = through(
        "control.split",
        json!({ "path": "items" }),
        &[("in", vec![json!({ "items": [1, 2] })])],
        &["out"],
    )
    .await;
    assert_eq!(ran.output("out_out"), [json!(1), json!(2)]);

    let ran = through(
        "control.join",
        json!({ "inputs": ["left", "right"] }),
        &[("left", vec![json!(1), json!(2)]), ("right", vec![json!("a"), json!("b"), json!("c")])],
        &["out"],
    )
    .await;
    assert_eq!(
        ran.output("out_out"),
        [json!({ "left": 1, "right": "a" }), json!({ "left": 2, "right": "b" })]
    );
    let ran = through(
        "control.join",
        json!({ "inputs": ["a", "b"], "into": "array" }),
        &[("a", vec![json!(1)]), ("b", vec![json!(2)])],
        &["out"],
    )
    .await;
    assert_eq!(ran.output("out_out"), [json!([1, 2])]);

    let ran = through(
        "control.alt",
        json!({ "inputs": ["x", "y"] }),
        &[("x", vec![json!(1)]), ("y", vec![json!(2)])],
        &["out"],
    )
    .await;
    let mut got = ran.output("out_out");
    got.sort_by_key(|v| v["port"].as_str().unwrap().to_owned());
    assert_eq!(got, [json!({ "port": "x", "message": 1 }), json!({ "port": "y", "message": 2 })]);
    let ran = through(
        "control.alt",
        json!({ "inputs": ["x", "y"], "tag": false }),
        &[("x", vec![json!(1)]), ("y", vec![json!(2)])],
        &["out"],
    )
    .await;
    assert_eq!(ran.output("out_out").len(), 2);

    let ran = through(
        "control.batch",
        json!({ "size": 2 }),
        &[("in", vec![json!(1), json!(2), json!(3)])],
        &["out"],
    )
    .await;
    assert_eq!(ran.output("out_out"), [json!([1, 2]), json!([3])]);

    let started = std::time::Instant::now();
    let ran =
        through("control.delay", json!({ "delay_ms": 50 }), &[("in", vec![json!(1), json!(2)])], &["out"])
            .await;
    assert_eq!(ran.output("out_out"), [json!(1), json!(2)]);
    assert!(started.elapsed() >= Duration::from_millis(50));
    // A delay holds many messages at once: ten messages of 300 ms take about 300 ms, not 3 s...
    let ten: Vec<Value> = (0..10).map(|i| json!(i)).collect();
    let started = std::time::Instant::now();
    let ran = through("control.delay", json!({ "delay_ms": 300 }), &[("in", ten.clone())], &["out"]).await;
    assert_eq!(ran.output("out_out"), ten);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(2_500), "{took:?}");
    // ... while a throttle spaces them: 20 a second lets ten through over 450 ms or more, in order.
    let started = std::time::Instant::now();
    let ran =
        through("control.delay", json!({ "rate_per_second": 20 }), &[("in", ten.clone())], &["out"]).await;
    assert_eq!(ran.output("out_out"), ten);
    assert!(started.elapsed() >= Duration::from_millis(450), "{:?}", started.elapsed());

    // Several connections into one port merge.
    let p = plan(
        &[
            ("a", "source.constant", json!({ "value": "a", "count": 3 })),
            ("b", "source.constant", json!({ "value": "b", "count": 2 })),
            ("m", "control.merge", json!({})),
            ("out", "sink.output", json!({})),
        ],
        &[("a", "out", "m", "in"), ("b", "out", "m", "in"), ("m", "out", "out", "in")],
    );
    let ran = run(&p, Options::default()).await;
    let mut got = ran.output("out");
    got.sort_by_key(|v| v.as_str().unwrap().to_owned());
    assert_eq!(got, [json!("a"), json!("a"), json!("a"), json!("b"), json!("b")]);
}

#[tokio::test]
async fn sources_sinks_checks_and_metrics() {
    let p = plan(
        &[
            ("seq", "source.sequence", json!({ "start": 5, "count": 3, "step": 2, "field": "n" })),
            ("k", "source.constant", json!({ "value": { "k": "a" }, "count": 2 })),
            ("out", "sink.output", json!({ "limit": 2 })),
            ("kout", "sink.output", json!({})),
            ("log", "sink.log", json!({ "level": "warn", "message": "seen" })),
        ],
        &[("seq", "out", "out", "in"), ("k", "out", "kout", "in"), ("k", "out", "log", "in")],
    );
    let ran = run(&p, Options::default()).await;
    assert_eq!(ran.output("out"), [json!({ "n": 5 }), json!({ "n": 7 })], "limit 2 keeps two");
    assert_eq!(ran.outcome.received["out"], 3);
    assert_eq!(ran.output("kout"), [json!({ "k": "a" }), json!({ "k": "a" })]);
    let logs: Vec<&pb::LogLine> =
        ran.events.iter().filter_map(|e| if let Event::Log(l) = e { Some(l) } else { None }).collect();
    assert_eq!(logs.len(), 2);
    assert_eq!((logs[0].level.as_str(), logs[0].node_id.as_str()), ("warn", "log"));
    assert!(logs[0].message.starts_with("seen {"), "{}", logs[0].message);
    let outputs = ran.events.iter().filter(|e| matches!(e, Event::Output(o) if o.node_id == "out")).count();
    assert_eq!(outputs, 2, "an output event per kept message");

    let ran = through(
        "validate.json_schema",
        json!({ "schema": { "type": "object", "required": ["id"] } }),
        &[("in", vec![json!({ "id": 1 }), json!({ "name": "x" })])],
        &["valid", "invalid"],
    )
    .await;
    assert_eq!(ran.output("out_valid"), [json!({ "id": 1 })]);
    let invalid = &ran.output("out_invalid")[0];
    assert_eq!(invalid["message"], json!({ "name": "x" }));
    assert_eq!(invalid["errors"][0]["pointer"], json!("/id"));

    let ran = through(
        "metrics.counter",
        json!({ "name": "orders", "group_by": ".k" }),
        &[("in", vec![json!({ "k": "a" }), json!({ "k": "b" }), json!({ "k": "a" })])],
        &["out", "counts"],
    )
    .await;
    assert_eq!(ran.output("out_out").len(), 3);
    assert_eq!(ran.output("out_counts"), [json!({ "total": 3, "by_key": { "a": 2, "b": 1 } })]);

    let ran =
        through("metrics.stats", json!({}), &[("in", (1..=4).map(|n| json!(n)).collect())], &["out"]).await;
    assert_eq!(
        ran.output("out_out"),
        [json!({ "count": 4, "sum": 10.0, "min": 1.0, "max": 4.0, "mean": 2.5, "p50": 2.0, "p99": 4.0 })]
    );

    // Metrics of each node.
    let node = ran.node("node");
    let metrics = node.metrics.unwrap();
    assert_eq!((metrics.messages_in, metrics.messages_out), (4, 1));
    assert_eq!(node.status, pb::NodeStatus::Completed as i32);
}

fn failing_map(on_error: OnError) -> (Plan, Options) {
    let p = plan(
        &[
            ("in", "source.input", json!({})),
            ("map", "transform.map", json!({ "expression": ".n + 1" })),
            ("out", "sink.output", json!({})),
            ("errors", "sink.output", json!({})),
        ],
        &[("in", "out", "map", "in"), ("map", "out", "out", "in"), ("map", "error", "errors", "in")],
    );
    let mut options = Options::default();
    options.inputs.insert("in".into(), vec![json!({ "n": 1 }), json!({ "n": "x" }), json!({ "n": 3 })]);
    options.policies.insert("map".into(), Policy { on_error, ..Policy::default() });
    (p, options)
}

#[tokio::test]
async fn error_policies() {
    let (p, options) = failing_map(OnError::Fail);
    let ran = run(&p, options).await;
    assert_eq!(ran.outcome.ending, Ending::Failed);
    let error = ran.outcome.error.clone().unwrap();
    assert_eq!((error.code.as_str(), error.node_id.as_str()), ("node_failed", "map"));
    assert!(error.message.contains(r#""x" + 1"#), "{}", error.message);
    assert_eq!(ran.node("map").status, pb::NodeStatus::Failed as i32);

    let (p, options) = failing_map(OnError::Skip);
    let ran = run(&p, options).await;
    assert_eq!(ran.outcome.ending, Ending::Succeeded);
    assert_eq!(ran.output("out"), [json!(2), json!(4)]);
    assert!(ran.output("errors").is_empty());
    assert_eq!(ran.node("map").metrics.unwrap().errors, 1);
    assert!(
        ran.events
            .iter()
            .any(|e| matches!(e, Event::NodeError(n) if n.action == "skip" && n.node_id == "map"))
    );

    let (p, options) = failing_map(OnError::Route);
    let ran = run(&p, options).await;
    assert_eq!(ran.output("out"), [json!(2), json!(4)]);
    let routed = ran.output("errors");
    assert_eq!(routed.len(), 1);
    assert_eq!(routed[0]["message"], json!({ "n": "x" }));
    assert_eq!((routed[0]["node_id"].clone(), routed[0]["attempts"].clone()), (json!("map"), json!(1)));
    assert!(routed[0]["error"].as_str().unwrap().contains(r#""x" + 1"#));

    // AI nodes without the AI service fail with a reason.
    let ran = through_failing("ai.chat", json!({}), json!("hi")).await;
    assert!(ran.contains("no connection to the AI service"), "{ran}");
}

async fn through_failing(type_id: &str, config: Value, message: Value) -> String {
    let p = plan(
        &[("in", "source.input", json!({})), ("node", type_id, config), ("out", "sink.output", json!({}))],
        &[("in", "out", "node", "in"), ("node", "out", "out", "in")],
    );
    let mut options = Options::default();
    options.inputs.insert("in".into(), vec![message]);
    let ran = run(&p, options).await;
    assert_eq!(ran.outcome.ending, Ending::Failed);
    ran.outcome.error.unwrap().message
}

#[tokio::test]
async fn cancellation_stops_everything_promptly() {
    let p = plan(
        &[
            ("seq", "source.sequence", json!({ "count": 1_000_000, "interval_ms": 1 })),
            ("map", "transform.map", json!({ "expression": "." })),
            ("out", "sink.output", json!({})),
        ],
        &[("seq", "out", "map", "in"), ("map", "out", "out", "in")],
    );
    let started = std::time::Instant::now();
    let ran = run_with(&p, Options::default(), &[], |_, cancel, _| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        cancel.cancel();
        Vec::new()
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(ran.outcome.ending, Ending::Cancelled);
    assert!(
        ran.outcome.nodes.iter().all(|n| n.status == pb::NodeStatus::Cancelled as i32),
        "{:?}",
        ran.outcome.nodes
    );
    assert!(!ran.output("out").is_empty(), "it ran a while");
}

/// `map` with a jq expression between an input and two outputs (its results and its errors).
fn runaway_map(expression: &str, messages: Vec<Value>, on_error: OnError) -> (Plan, Options) {
    let p = plan(
        &[
            ("in", "source.input", json!({})),
            ("map", "transform.map", json!({ "expression": expression })),
            ("out", "sink.output", json!({})),
            ("errors", "sink.output", json!({})),
        ],
        &[("in", "out", "map", "in"), ("map", "out", "out", "in"), ("map", "error", "errors", "in")],
    );
    let mut options = Options::default();
    options.inputs.insert("in".into(), messages);
    options.policies.insert("map".into(), Policy { on_error, ..Policy::default() });
    options.jq.time = Duration::from_millis(300);
    options.jq.outputs = 1_000;
    options.jq.memory = 16 << 20;
    (p, options)
}

#[tokio::test]
async fn runaway_expressions_end_as_the_error_policy_says() {
    // Endless work on one message (time) and endless results (outputs), routed: the other
    // messages go through.
    for (expression, said) in [
        ("last(range(1e18))", "ran longer than 300 ms"),
        ("range(1e18)", "more than 1000 results"),
        (r#"def f: (. + .) | f; "x" | f"#, "held more than 16 MiB"),
    ] {
        let (p, options) = runaway_map(
            &format!("if .n == 2 then {expression} else .n end"),
            vec![json!({ "n": 1 }), json!({ "n": 2 }), json!({ "n": 3 })],
            OnError::Route,
        );
        let ran = run(&p, options).await;
        assert_eq!(ran.outcome.ending, Ending::Succeeded, "{expression}: {:?}", ran.outcome.error);
        assert_eq!(ran.output("out"), [json!(1), json!(3)], "{expression}");
        let routed = ran.output("errors");
        assert_eq!(routed.len(), 1, "{expression}");
        assert_eq!(routed[0]["message"], json!({ "n": 2 }));
        assert!(routed[0]["error"].as_str().unwrap().contains(said), "{expression}: {}", routed[0]["error"]);
    }
    // Under `fail`, the execution fails naming the node and the bound.
    let (p, options) = runaway_map("def f: f; f", vec![json!(1)], OnError::Fail);
    let ran = run(&p, options).await;
    assert_eq!(ran.outcome.ending, Ending::Failed);
    let error = ran.outcome.error.unwrap();
    assert_eq!(error.node_id, "map");
    assert!(error.message.contains("ran longer than 300 ms"), "{}", error.message);
    // A node's timeout shortens the bound.
    let (p, mut options) = runaway_map("last(range(1e18))", vec![json!(1)], OnError::Fail);
    options.policies.get_mut("map").unwrap().timeout = Some(Duration::from_millis(50));
    let ran = run(&p, options).await;
    assert!(ran.outcome.error.unwrap().message.contains("ran longer than 50 ms"));
}

#[tokio::test]
async fn a_cancel_stops_an_expression_that_is_still_running() {
    // One shard, so the runaway expression holds the thread the supervisor runs on as well.
    let shards = csp_executor::runtime::Shards::start(1).unwrap();
    let (p, mut options) = runaway_map("last(range(1e18))", vec![json!(1)], OnError::Fail);
    options.jq.time = Duration::from_secs(600);
    options.shards = Some(shards.clone());
    let started = std::time::Instant::now();
    let ran = run_with(&p, options, &[], |_, cancel, _| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        cancel.cancel();
        Vec::new()
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(ran.outcome.ending, Ending::Cancelled);
    // The shard is free again for the next execution.
    let (p, mut options) = runaway_map(".n", vec![json!({ "n": 7 })], OnError::Fail);
    options.shards = Some(shards);
    let ran = run(&p, options).await;
    assert_eq!(ran.output("out"), [json!(7)]);
}

#[tokio::test]
async fn a_deadline_fails_the_execution() {
    let p = plan(
        &[
            ("k", "source.constant", json!({ "value": 1 })),
            ("d", "control.delay", json!({ "delay_ms": 10_000 })),
            ("out", "sink.output", json!({})),
        ],
        &[("k", "out", "d", "in"), ("d", "out", "out", "in")],
    );
    let ran = run(&p, Options { timeout: Duration::from_millis(200), ..Options::default() }).await;
    assert_eq!(ran.outcome.ending, Ending::Failed);
    assert_eq!(ran.outcome.error.unwrap().code, "timeout");
}

/// The design CheckDeadlock's tests call crossed (services/design/tests/deadlock.rs): with room
/// for one message on the join's `b` the executor deadlocks with the blocked set the checker
/// names; with room for two it completes, as the checker says.
#[tokio::test]
async fn the_crossed_join_deadlocks_as_the_checker_says() {
    for (capacity, deadlocks) in [(1, true), (2, false)] {
        let mut p = plan(
            &[
                ("seq", "source.sequence", json!({ "count": 2 })),
                ("batch", "control.batch", json!({ "size": 2 })),
                ("join", "control.join", json!({ "inputs": ["a", "b"] })),
                ("out", "sink.output", json!({})),
            ],
            &[
                ("seq", "out", "join", "b"),
                ("seq", "out", "batch", "in"),
                ("batch", "out", "join", "a"),
                ("join", "out", "out", "in"),
            ],
        );
        for c in &mut p.connections {
            c.capacity = if c.to_port == "b" { capacity } else { 1 };
        }
        let ran = run(&p, Options { batch: 1, ..Options::default() }).await;
        if deadlocks {
            assert_eq!(ran.outcome.ending, Ending::Deadlocked, "{:?}", ran.outcome.error);
            let mut blocked = ran.outcome.error.unwrap().blocked_node_ids;
            blocked.sort();
            assert_eq!(blocked, ["batch", "join", "out", "seq"]);
        } else {
            assert_eq!(ran.outcome.ending, Ending::Succeeded, "{:?}", ran.outcome.error);
            assert_eq!(ran.output("out").len(), 1);
        }
    }
}

#[tokio::test]
async fn a_cycle_that_cannot_buffer_deadlocks() {
    // join waits for `right`, which only map can send, and map waits for join.
    let p = plan(
        &[
            ("gen", "source.constant", json!({ "value": 1, "count": 100 })),
            ("join", "control.join", json!({ "inputs": ["left", "right"] })),
            ("map", "transform.map", json!({ "expression": "." })),
            ("out", "sink.output", json!({})),
        ],
        &[
            ("gen", "out", "join", "left"),
            ("join", "out", "map", "in"),
            ("map", "out", "join", "right"),
            ("map", "out", "out", "in"),
        ],
    );
    let started = std::time::Instant::now();
    let ran = run(&p, Options::default()).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(ran.outcome.ending, Ending::Deadlocked);
    let error = ran.outcome.error.clone().unwrap();
    assert_eq!(error.code, "deadlock");
    assert!(
        error.blocked_node_ids.contains(&"join".to_owned())
            && error.blocked_node_ids.contains(&"map".to_owned()),
        "{error:?}"
    );
    assert!(
        error.blocked_connection_ids.contains(&"c1".to_owned())
            && error.blocked_connection_ids.contains(&"c2".to_owned()),
        "{error:?}"
    );
    assert!(error.message.contains("`join` waits to receive on `c2` from `map`"), "{}", error.message);
    assert!(error.message.contains("`map` waits to receive on `c1` from `join`"), "{}", error.message);
    assert_eq!(ran.node("join").status, pb::NodeStatus::Blocked as i32);
    assert!(ran.events.iter().any(|e| matches!(e, Event::DeadlockDetected(d) if d.total)));

    // The same cycle next to a branch still working: first a partial deadlock, reported;
    // once the branch is done, the whole execution is deadlocked.
    let mut p = p;
    p.nodes.push(PlanNode {
        id: "slow".into(),
        type_id: "source.sequence".into(),
        config: json!({ "count": 50, "interval_ms": 20 }),
        remote: None,
    });
    p.nodes.push(PlanNode {
        id: "slow_out".into(),
        type_id: "sink.output".into(),
        config: json!({}),
        remote: None,
    });
    p.connections.push(PlanConnection {
        id: "s".into(),
        from: "slow".into(),
        from_port: "out".into(),
        to: "slow_out".into(),
        to_port: "in".into(),
        capacity: 0,
    });
    let ran = run(&p, Options::default()).await;
    let deadlocks: Vec<&pb::DeadlockDetected> = ran
        .events
        .iter()
        .filter_map(|e| if let Event::DeadlockDetected(d) = e { Some(d) } else { None })
        .collect();
    assert!(!deadlocks[0].total, "{deadlocks:?}");
    assert!(deadlocks.last().unwrap().total);
    assert_eq!(ran.outcome.ending, Ending::Deadlocked);
    assert_eq!(ran.output("slow_out").len(), 50, "the independent branch finished");
}

#[tokio::test]
async fn breakpoints_pause_step_and_resume() {
    let p = plan(
        &[
            ("seq", "source.sequence", json!({ "start": 1, "count": 3 })),
            ("map", "transform.map", json!({ "expression": ". * 10" })),
            ("out", "sink.output", json!({})),
        ],
        &[("seq", "out", "map", "in"), ("map", "out", "out", "in")],
    );
    async fn hit(events: &mut mpsc::UnboundedReceiver<Event>) -> pb::BreakpointHit {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap() {
                Event::BreakpointHit(hit) => return hit,
                _ => continue,
            }
        }
    }
    let ran = run_with(&p, Options::default(), &["map"], |debugger, _, mut events| async move {
        let first = hit(&mut events).await;
        assert_eq!((first.node_id.as_str(), first.port.as_str()), ("map", "in"));
        assert_eq!(pbjson::from_value(first.payload.unwrap()), json!(1));
        assert_eq!(debugger.paused().unwrap().node_id, "map");
        // Step: the network moves one message and pauses at the next message any node takes:
        // the next one at `map`, or the one just let through, arriving at `out`.
        debugger.step().unwrap();
        let next = hit(&mut events).await;
        let next = (next.node_id.clone(), pbjson::from_value(next.payload.unwrap()));
        assert!(next == ("map".to_owned(), json!(2)) || next == ("out".to_owned(), json!(10)), "{next:?}");
        // Resume: runs until the next message reaches the breakpoint.
        debugger.resume(false).unwrap();
        let again = hit(&mut events).await;
        assert_eq!(again.node_id, "map");
        // Resume, clearing breakpoints: runs to the end.
        debugger.resume(true).unwrap();
        assert!(debugger.resume(false).is_err(), "not paused any more");
        Vec::new()
    })
    .await;
    assert_eq!(ran.outcome.ending, Ending::Succeeded);
    assert_eq!(ran.output("out"), [json!(10), json!(20), json!(30)]);
    let statuses: Vec<i32> = ran
        .events
        .iter()
        .filter_map(|e| if let Event::StatusChanged(s) = e { Some(s.status) } else { None })
        .collect();
    assert!(statuses.contains(&(pb::ExecutionStatus::Paused as i32)));
}

#[tokio::test]
async fn recorded_messages_replay() {
    let p = plan(
        &[
            ("seq", "source.sequence", json!({ "count": 5 })),
            ("double", "transform.map", json!({ "expression": ". * 2" })),
            ("out", "sink.output", json!({})),
        ],
        &[("seq", "out", "double", "in"), ("double", "out", "out", "in")],
    );
    let ran = run(&p, Options { record_messages: true, ..Options::default() }).await;
    assert_eq!(ran.outcome.recorded["c0"], (0..5).map(|n| json!(n)).collect::<Vec<_>>());
    // Replay the source from the recording; rerun what follows it.
    let mut replay = HashMap::new();
    replay.insert("seq".to_owned(), HashMap::from([("c0".to_owned(), vec![json!(10), json!(20)])]));
    let ran = run(&p, Options { replay, ..Options::default() }).await;
    assert_eq!(ran.output("out"), [json!(20), json!(40)]);
    assert_eq!(ran.node("seq").status, pb::NodeStatus::Replayed as i32);
}

#[tokio::test]
async fn plans_that_cannot_run_are_refused_with_reasons() {
    let p = plan(
        &[
            ("a", "source.constant", json!({})),
            ("b", "acme.unknown", json!({})),
            ("c", "sink.output", json!({})),
        ],
        &[("a", "nope", "c", "in")],
    );
    let (tx, _rx) = mpsc::channel(8);
    let Err(problems) = Network::build(&p, Options::default(), Services::default(), Debugger::new([]), tx)
    else {
        panic!("built")
    };
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert!(
        text.iter().any(|t| t.starts_with("node `a`: invalid configuration") && t.contains("/value")),
        "{text:?}"
    );
    assert!(text.iter().any(|t| t == "node `b`: there is no component type `acme.unknown`"), "{text:?}");
}

mod remote {
    use std::{collections::HashMap, net::SocketAddr, pin::Pin};

    use csp_executor::runtime::RemoteEndpoint;
    use csp_proto::component::v1::{
        self as cpb,
        component_runtime_server::{ComponentRuntime, ComponentRuntimeServer},
    };
    use futures::{Stream, StreamExt as _};
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    /// Fails each message `fail_times` times (retryably, counted by its `id` across streams),
    /// never answers `hang`, else echoes `{id, attempts}`.
    #[derive(Default)]
    struct Flaky {
        attempts: std::sync::Arc<std::sync::Mutex<HashMap<String, i64>>>,
    }

    #[tonic::async_trait]
    impl ComponentRuntime for Flaky {
        type ProcessStream = Pin<Box<dyn Stream<Item = Result<cpb::ProcessResponse, Status>> + Send>>;

        async fn describe(
            &self,
            _: Request<cpb::DescribeRequest>,
        ) -> Result<Response<cpb::DescribeResponse>, Status> {
            Ok(Response::new(cpb::DescribeResponse::default()))
        }

        async fn process(
            &self,
            request: Request<Streaming<cpb::ProcessRequest>>,
        ) -> Result<Response<Self::ProcessStream>, Status> {
            let mut input = request.into_inner();
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            let attempts = self.attempts.clone();
            tokio::spawn(async move {
                while let Some(Ok(request)) = input.next().await {
                    let kind = match request.kind {
                        Some(cpb::process_request::Kind::Message(m)) => {
                            let payload = pbjson::from_value(m.payload.unwrap_or_default());
                            if payload["hang"] == json!(true) {
                                tokio::time::sleep(Duration::from_secs(30)).await;
                                continue;
                            }
                            let n = {
                                let mut attempts = attempts.lock().unwrap();
                                let n = attempts.entry(payload["id"].to_string()).or_default();
                                *n += 1;
                                *n
                            };
                            if n <= payload["fail_times"].as_i64().unwrap_or(0) {
                                cpb::process_response::Kind::Error(cpb::ProcessError {
                                    sequence: m.sequence,
                                    message: format!("try again ({n})"),
                                    retryable: true,
                                })
                            } else {
                                cpb::process_response::Kind::Message(cpb::Message {
                                    port: "out".into(),
                                    payload: Some(pbjson::to_value(
                                        json!({ "id": payload["id"], "attempts": n }),
                                    )),
                                    sequence: m.sequence,
                                })
                            }
                        }
                        Some(cpb::process_request::Kind::InputClosed(_)) => {
                            cpb::process_response::Kind::Done(cpb::Done {})
                        }
                        _ => continue,
                    };
                    if tx.send(Ok(cpb::ProcessResponse { kind: Some(kind) })).await.is_err() {
                        break;
                    }
                }
            });
            Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
        }
    }

    async fn serve() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ComponentRuntimeServer::new(Flaky::default()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    fn remote_plan(addr: SocketAddr) -> Plan {
        let mut p = plan(
            &[
                ("in", "source.input", json!({})),
                ("flaky", "acme.flaky", json!({})),
                ("out", "sink.output", json!({})),
            ],
            &[("in", "out", "flaky", "in"), ("flaky", "out", "out", "in")],
        );
        p.nodes[1].remote = Some(RemoteEndpoint {
            address: format!("http://{addr}"),
            timeout_ms: 300,
            inputs: vec!["in".into()],
            outputs: vec!["out".into()],
        });
        p
    }

    /// An agent's tool served at a remote endpoint: called once per tool call, its answer fed
    /// back to the model.
    #[tokio::test]
    async fn agent_tools_can_be_remote_components() {
        let addr = serve().await;
        let ai = std::sync::Arc::new(FakeAi::default());
        let config = json!({ "tools": [{ "name": "count", "description": "Counts attempts", "remote_address": format!("http://{addr}") }] });
        let ran = through_ai(ai.clone(), "ai.agent", config, json!("count it"), 0).await;
        assert_eq!(ran.ending, Ending::Succeeded, "{:?}", ran.error);
        assert_eq!(ran.outputs["out"][0]["text"], r#"echo: {"attempts":1,"id":null}"#);
    }

    #[tokio::test]
    async fn remote_components_retry_with_back_off_and_time_out() {
        let addr = serve().await;
        let p = remote_plan(addr);
        let mut options = Options::default();
        options.inputs.insert("in".into(), vec![json!({ "id": 1, "fail_times": 2 }), json!({ "id": 2 })]);
        options.policies.insert(
            "flaky".into(),
            Policy { max_retries: 3, initial_backoff: Duration::from_millis(10), ..Policy::default() },
        );
        let started = std::time::Instant::now();
        let ran = run(&p, options.clone()).await;
        assert_eq!(ran.outcome.ending, Ending::Succeeded, "{:?}", ran.outcome.error);
        let mut got = ran.output("out");
        got.sort_by_key(|v| v["id"].as_i64());
        assert_eq!(got, [json!({ "id": 1, "attempts": 3 }), json!({ "id": 2, "attempts": 1 })]);
        assert!(started.elapsed() >= Duration::from_millis(30), "10 ms then 20 ms of back-off");
        let retries: Vec<i32> = ran
            .events
            .iter()
            .filter_map(|e| {
                if let Event::NodeError(n) = e { (n.action == "retry").then_some(n.attempt) } else { None }
            })
            .collect();
        assert_eq!(retries, [1, 2]);
        assert_eq!(ran.node("flaky").metrics.unwrap().retries, 2);

        // Out of retries: the policy decides.
        let p = remote_plan(serve().await);
        options.policies.get_mut("flaky").unwrap().max_retries = 1;
        options.policies.get_mut("flaky").unwrap().on_error = OnError::Skip;
        let ran = run(&p, options.clone()).await;
        assert_eq!(ran.output("out"), [json!({ "id": 2, "attempts": 1 })]);

        // No answer within the endpoint's timeout: retried like any failure that may pass,
        // then the error policy decides — skipped here...
        options.inputs.insert("in".into(), vec![json!({ "id": 3 }), json!({ "hang": true })]);
        let ran = run(&p, options.clone()).await;
        assert_eq!(ran.outcome.ending, Ending::Succeeded, "{:?}", ran.outcome.error);
        assert_eq!(ran.output("out"), [json!({ "id": 3, "attempts": 1 })]);
        let actions: Vec<String> = ran
            .events
            .iter()
            .filter_map(|e| if let Event::NodeError(n) = e { Some(n.action.clone()) } else { None })
            .collect();
        assert_eq!(actions, ["retry", "skip"]);
        // ... and failing the node by default.
        options.policies.get_mut("flaky").unwrap().on_error = OnError::Fail;
        options.inputs.insert("in".into(), vec![json!({ "hang": true })]);
        let ran = run(&p, options).await;
        assert_eq!(ran.outcome.ending, Ending::Failed);
        assert!(ran.outcome.error.unwrap().message.contains("did not answer within 300 ms"));

        // The built-in `remote.call` reaches the same kind of endpoint, named in its config.
        let p = plan(
            &[
                ("in", "source.input", json!({})),
                (
                    "call",
                    "remote.call",
                    json!({ "address": format!("http://{}", serve().await), "config": { "k": 1 } }),
                ),
                ("out", "sink.output", json!({})),
            ],
            &[("in", "out", "call", "in"), ("call", "out", "out", "in")],
        );
        let mut options = Options::default();
        options.inputs.insert("in".into(), vec![json!({ "id": 7 }), json!({ "id": 8, "fail_times": 1 })]);
        options.policies.insert(
            "call".into(),
            Policy { max_retries: 1, initial_backoff: Duration::from_millis(1), ..Policy::default() },
        );
        let ran = run(&p, options).await;
        assert_eq!(ran.outcome.ending, Ending::Succeeded, "{:?}", ran.outcome.error);
        let mut got = ran.output("out");
        got.sort_by_key(|v| v["id"].as_i64());
        assert_eq!(got, [json!({ "id": 7, "attempts": 1 }), json!({ "id": 8, "attempts": 2 })]);

        // Unreachable: a clear reason.
        let ran = run(&remote_plan("127.0.0.1:9".parse().unwrap()), Options::default()).await;
        assert!(
            ran.outcome.error.unwrap().message.contains("cannot reach the component at http://127.0.0.1:9")
        );
    }
}

/// An AI service that answers from what it was asked, and fails the first `fail_first` calls
/// as unavailable.
#[derive(Default)]
struct FakeAi {
    asked: std::sync::Mutex<Vec<String>>,
    fail_first: std::sync::atomic::AtomicUsize,
}

#[tonic::async_trait]
impl csp_executor::runtime::Ai for FakeAi {
    async fn chat(
        &self,
        request: csp_proto::ai::v1::ChatRequest,
    ) -> Result<csp_proto::ai::v1::ChatResponse, csp_executor::runtime::AiError> {
        use std::sync::atomic::Ordering;
        if self.fail_first.load(Ordering::SeqCst) > 0 {
            self.fail_first.fetch_sub(1, Ordering::SeqCst);
            return Err(("the AI service is unavailable".into(), true));
        }
        let said: Vec<String> = request.messages.iter().map(|m| m.content.clone()).collect();
        let tools: Vec<String> = request.tools.iter().map(|t| t.name.clone()).collect();
        self.asked.lock().unwrap().push(format!("chat {said:?} tools {tools:?} node {}", request.node_id));
        // Offered tools and no tool result yet: call the first tool.
        let answered = request.messages.iter().any(|m| m.role == csp_proto::ai::v1::MessageRole::Tool as i32);
        if let (Some(tool), false) = (request.tools.first(), answered) {
            return Ok(csp_proto::ai::v1::ChatResponse {
                message: Some(csp_proto::ai::v1::ChatMessage {
                    role: csp_proto::ai::v1::MessageRole::Assistant as i32,
                    tool_calls: vec![csp_proto::ai::v1::ToolCall {
                        id: "call_1".into(),
                        name: tool.name.clone(),
                        arguments_json: r#"{"price": 3, "qty": 4}"#.into(),
                    }],
                    ..Default::default()
                }),
                finish_reason: "tool_calls".into(),
                usage: Some(csp_proto::ai::v1::Usage { total_tokens: 5, ..Default::default() }),
                ..Default::default()
            });
        }
        Ok(csp_proto::ai::v1::ChatResponse {
            message: Some(csp_proto::ai::v1::ChatMessage {
                content: format!("echo: {}", said.last().cloned().unwrap_or_default()),
                ..Default::default()
            }),
            steps: if request.run_tools { vec![Default::default(), Default::default()] } else { vec![] },
            model: request.model,
            usage: Some(csp_proto::ai::v1::Usage { total_tokens: 7, ..Default::default() }),
            ..Default::default()
        })
    }

    async fn analyze(
        &self,
        request: csp_proto::ai::v1::AnalyzeRequest,
    ) -> Result<csp_proto::ai::v1::AnalyzeResponse, csp_executor::runtime::AiError> {
        self.asked.lock().unwrap().push(format!("analyze {} kinds {:?}", request.text, request.kinds));
        Ok(csp_proto::ai::v1::AnalyzeResponse {
            result: Some(pbjson::to_struct(json!({ "sentiment": { "label": "positive" } }))),
            ..Default::default()
        })
    }

    async fn generate_code(
        &self,
        request: csp_proto::ai::v1::GenerateCodeRequest,
    ) -> Result<csp_proto::ai::v1::GenerateCodeResponse, csp_executor::runtime::AiError> {
        self.asked.lock().unwrap().push(format!("code {} in {}", request.spec, request.language));
        Ok(csp_proto::ai::v1::GenerateCodeResponse {
            code: "def add(a, b): return a + b".into(),
            tests: "assert add(1, 2) == 3".into(),
            documentation: "Adds.".into(),
            ..Default::default()
        })
    }
}

async fn through_ai(
    ai: std::sync::Arc<FakeAi>,
    type_id: &str,
    config: Value,
    message: Value,
    retries: u32,
) -> Outcome {
    let p = plan(
        &[("in", "source.input", json!({})), ("node", type_id, config), ("out", "sink.output", json!({}))],
        &[("in", "out", "node", "in"), ("node", "out", "out", "in")],
    );
    let mut options = Options::default();
    options.inputs.insert("in".into(), vec![message]);
    options.default_policy =
        Policy { max_retries: retries, initial_backoff: Duration::from_millis(1), ..Policy::default() };
    let services = Services { ai: Some(ai), ..Services::default() };
    let (tx, mut rx) = mpsc::channel(1024);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let network = Network::build(&p, options, services, Debugger::new([]), tx).unwrap();
    tokio::time::timeout(Duration::from_secs(20), network.run(CancellationToken::new())).await.unwrap()
}

#[tokio::test]
async fn ai_nodes_ask_the_ai_service() {
    let ai = std::sync::Arc::new(FakeAi::default());
    let config = json!({ "system": "Be brief.", "prompt_template": "Greet {{ name }}", "model": "m1" });
    let ran = through_ai(ai.clone(), "ai.chat", config, json!({ "name": "Ada" }), 0).await;
    assert_eq!(ran.ending, Ending::Succeeded, "{:?}", ran.error);
    assert_eq!(
        ran.outputs["out"],
        [
            json!({ "text": "echo: Greet Ada", "model": "m1", "usage": { "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 7, "cost_usd": 0.0 } })
        ]
    );

    // The agent loop runs here: the model's tool call runs the built-in component, whose
    // result goes back to the model.
    let config = json!({ "tools": [{ "name": "total", "description": "Order total", "component_type": "transform.map", "component_config": { "expression": ".price * .qty" } }] });
    let ran = through_ai(ai.clone(), "ai.agent", config, json!("what is the total?"), 0).await;
    let answer = &ran.outputs["out"][0];
    assert_eq!(answer["text"], "echo: 12", "{:?}", ran.error);
    assert_eq!((answer["steps"].clone(), answer["usage"]["total_tokens"].clone()), (json!(1), json!(12)));

    let config = json!({ "path": "review", "kinds": ["sentiment"] });
    let ran = through_ai(ai.clone(), "ai.analyze", config, json!({ "id": 1, "review": "Lovely" }), 0).await;
    assert_eq!(
        ran.outputs["out"],
        [json!({ "id": 1, "review": "Lovely", "analysis": { "sentiment": { "label": "positive" } } })]
    );

    let config = json!({ "language": "python", "include_tests": false });
    let ran = through_ai(ai.clone(), "ai.codegen", config, json!("add two numbers"), 0).await;
    assert_eq!(
        ran.outputs["out"],
        [
            json!({ "code": "def add(a, b): return a + b", "tests": null, "documentation": "Adds.", "usage": null })
        ]
    );

    assert_eq!(
        *ai.asked.lock().unwrap(),
        [
            r#"chat ["Be brief.", "Greet Ada"] tools [] node node"#,
            r#"chat ["what is the total?"] tools ["total"] node node"#,
            r#"chat ["what is the total?", "", "12"] tools ["total"] node node"#,
            "analyze Lovely kinds [1]",
            "code add two numbers in python",
        ]
        .map(str::to_owned)
    );

    // An unavailable AI service is retried as the policy allows, then fails the execution.
    let flaky = std::sync::Arc::new(FakeAi::default());
    flaky.fail_first.store(2, std::sync::atomic::Ordering::SeqCst);
    let ran = through_ai(flaky.clone(), "ai.chat", json!({}), json!("hi"), 2).await;
    assert_eq!(ran.ending, Ending::Succeeded, "two retries cover two failures: {:?}", ran.error);
    flaky.fail_first.store(2, std::sync::atomic::Ordering::SeqCst);
    let ran = through_ai(flaky, "ai.chat", json!({}), json!("hi"), 1).await;
    assert_eq!(ran.ending, Ending::Failed);
    assert!(ran.error.unwrap().message.contains("the AI service is unavailable"));
}

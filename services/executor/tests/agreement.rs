//! The deadlock checker and the runtime agree: many small random designs, each run through
//! the checker (`csp_components::deadlock`, as CheckDeadlock uses it) and through the real
//! runtime with the same capacities and inputs. Every design called deadlock-free completes;
//! every design called deadlocking ends DEADLOCKED with the same blocked nodes.
//!
//! The designs use the components whose runs do not depend on timing (sequences, maps,
//! joins, batches, sinks: each reads its inputs in a fixed order, a Kahn process network), so
//! one run of the runtime shows what every run does. The runtime moves one message per channel
//! operation (`batch: 1`), as the model does.

#![allow(clippy::unwrap_used)]

use std::{collections::BTreeSet, time::Duration};

use csp_components::deadlock::{self, Model, Process, Verdict};
use csp_executor::runtime::{Debugger, Ending, Network, Options, Plan, PlanConnection, PlanNode, Services};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Designs generated and compared.
const DESIGNS: u64 = 500;
/// Messages a source sends at most (the checker's bound, so the two see the same inputs).
const SOURCE_MESSAGES: u16 = 5;

/// A random design: one or two sequences, one to four of map, join and batch, one sink; every
/// input fed by one connection from a random node (cycles included), capacities 1 to 3.
fn design(rng: &mut StdRng) -> Plan {
    let mut nodes: Vec<(String, &str, Value, Vec<&str>)> = Vec::new();
    for i in 0..rng.random_range(1..=2) {
        let count = rng.random_range(1..=u64::from(SOURCE_MESSAGES));
        nodes.push((format!("seq{i}"), "source.sequence", json!({ "count": count }), vec![]));
    }
    for i in 0..rng.random_range(1..=4) {
        nodes.push(match rng.random_range(0..3) {
            0 => (format!("map{i}"), "transform.map", json!({ "expression": "." }), vec!["in"]),
            1 => (format!("join{i}"), "control.join", json!({ "inputs": ["a", "b"] }), vec!["a", "b"]),
            _ => {
                let size = rng.random_range(1..=3);
                (format!("batch{i}"), "control.batch", json!({ "size": size }), vec!["in"])
            }
        });
    }
    nodes.push(("sink".into(), "sink.output", json!({}), vec!["in"]));
    let mut connections = Vec::new();
    for (position, (id, _, _, inputs)) in nodes.iter().enumerate() {
        for input in inputs {
            // Mostly from a node before this one (a pipeline), sometimes from any (a cycle).
            let upto = if rng.random_bool(0.7) { position } else { nodes.len() - 1 };
            let candidates: Vec<&String> =
                nodes[..upto].iter().filter(|n| n.0 != *id && n.1 != "sink.output").map(|n| &n.0).collect();
            if candidates.is_empty() {
                continue;
            }
            let from = candidates[rng.random_range(0..candidates.len())].clone();
            connections.push(PlanConnection {
                id: format!("c{}", connections.len()),
                from,
                from_port: "out".into(),
                to: id.clone(),
                to_port: (*input).into(),
                capacity: rng.random_range(1..=3),
            });
        }
    }
    Plan {
        nodes: nodes
            .into_iter()
            .map(|(id, type_id, config, _)| PlanNode { id, type_id: type_id.into(), config, remote: None })
            .collect(),
        connections,
    }
}

/// The checker's model of a plan, built as CheckDeadlock builds it from a design.
fn model(plan: &Plan) -> Model {
    let mut processes: Vec<Process> = plan
        .nodes
        .iter()
        .map(|node| {
            let spec = csp_components::builtin(&node.type_id).unwrap();
            let (inputs, outputs) = csp_components::ports_for(spec, &node.config);
            let outputs: Vec<String> = outputs.into_iter().map(|p| p.name).collect();
            Process {
                node_id: node.id.clone(),
                machine: deadlock::machine_for(&node.type_id, &node.config, &outputs, SOURCE_MESSAGES)
                    .unwrap(),
                inputs: vec![Vec::new(); inputs.len()],
                outputs: vec![Vec::new(); outputs.len()],
                assumed: false,
            }
        })
        .collect();
    let mut channels = Vec::new();
    for (c, connection) in plan.connections.iter().enumerate() {
        let index = |id: &str| plan.nodes.iter().position(|n| n.id == id).unwrap();
        let (from, to) = (index(&connection.from), index(&connection.to));
        let spec = csp_components::builtin(&plan.nodes[to].type_id).unwrap();
        let (inputs, _) = csp_components::ports_for(spec, &plan.nodes[to].config);
        let input = inputs.iter().position(|p| p.name == connection.to_port).unwrap();
        let spec = csp_components::builtin(&plan.nodes[from].type_id).unwrap();
        let (_, outputs) = csp_components::ports_for(spec, &plan.nodes[from].config);
        let output = outputs.iter().position(|p| p.name == connection.from_port).unwrap();
        processes[from].outputs[output].push(c);
        processes[to].inputs[input].push(c);
        channels.push(deadlock::Channel {
            connection_id: connection.id.clone(),
            from,
            to,
            capacity: connection.capacity as u16,
        });
    }
    Model { processes, channels }
}

/// How the runtime ends the plan, and the nodes it reports blocked.
async fn run(plan: &Plan) -> (Ending, BTreeSet<String>) {
    let (tx, mut rx) = mpsc::channel(1024);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let options = Options { batch: 1, timeout: Duration::from_secs(30), ..Options::default() };
    let network = Network::build(plan, options, Services::default(), Debugger::new([]), tx).unwrap();
    let outcome = network.run(CancellationToken::new()).await;
    let blocked = outcome.error.map(|e| e.blocked_node_ids.into_iter().collect()).unwrap_or_default();
    (outcome.ending, blocked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_and_the_runtime_agree_on_random_designs() {
    let mut rng = StdRng::seed_from_u64(0x00c5_9de5);
    let plans: Vec<Plan> = (0..DESIGNS).map(|_| design(&mut rng)).collect();
    let (mut free, mut deadlocked) = (0, 0);
    // Several at once: a deadlock takes the runtime's detector a few looks to call.
    for chunk in plans.chunks(16) {
        let runs = futures::future::join_all(chunk.iter().map(run)).await;
        for (plan, (ending, blocked)) in chunk.iter().zip(runs) {
            let described = serde_json::to_string(
                &plan
                    .connections
                    .iter()
                    .map(|c| format!("{}.{} -> {}.{} ({})", c.from, c.from_port, c.to, c.to_port, c.capacity))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            let types: Vec<String> =
                plan.nodes.iter().map(|n| format!("{} {} {}", n.id, n.type_id, n.config)).collect();
            match deadlock::check(&model(plan), 1_000_000, Duration::from_secs(10)) {
                Verdict::Free { .. } => {
                    free += 1;
                    assert_eq!(ending, Ending::Succeeded, "called free: {types:?} {described}");
                }
                Verdict::Deadlock { blocked: predicted, .. } => {
                    deadlocked += 1;
                    let model = model(plan);
                    let predicted: BTreeSet<String> =
                        predicted.iter().map(|b| model.processes[b.process].node_id.clone()).collect();
                    assert_eq!(ending, Ending::Deadlocked, "called deadlocking: {types:?} {described}");
                    assert_eq!(blocked, predicted, "{types:?} {described}");
                }
                Verdict::CapReached { states } => panic!("a small design passed the cap ({states} states)"),
            }
        }
    }
    // Both answers are well represented.
    assert!(free >= 50 && deadlocked >= 50, "{free} free, {deadlocked} deadlocked");
}

/// The SPIN model checker, if installed (CI installs it; elsewhere the test says it skipped).
fn spin() -> bool {
    let found = std::process::Command::new("spin").arg("-V").output().is_ok_and(|o| o.status.success());
    assert!(
        found || std::env::var_os("CI").is_none(),
        "CI needs the SPIN model checker (Debian package spin)"
    );
    found
}

/// Whether SPIN finds an invalid end state (a deadlock) in the Promela export of `model`.
fn spin_finds_a_deadlock(model: &Model) -> bool {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.pml"), deadlock::promela(model)).unwrap();
    let run = |program: &str, args: &[&str]| {
        let output = std::process::Command::new(program).args(args).current_dir(dir.path()).output().unwrap();
        assert!(output.status.success(), "{program}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    run("spin", &["-a", "model.pml"]);
    run("cc", &["-O0", "-DSAFETY", "-DNOFAIR", "-o", "pan", "pan.c"]);
    let report = run("./pan", &["-m100000"]);
    // "errors: 0", or the error found: "pan:1: invalid end state (at depth N)".
    match (report.contains("errors: 0"), report.contains("pan:1: invalid end state")) {
        (true, false) => false,
        (false, true) => true,
        _ => panic!("an unexpected SPIN report:\n{report}\n{}", deadlock::promela(model)),
    }
}

/// The Promela export, verified by SPIN, gives the checker's answer on generated designs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spin_gives_the_checkers_answer_on_random_designs() {
    if !spin() {
        eprintln!("skipped: no spin");
        return;
    }
    let mut rng = StdRng::seed_from_u64(0x5b1d_0c5e);
    let models: Vec<Model> = (0..SPIN_DESIGNS).map(|_| model(&design(&mut rng))).collect();
    // A few at once: each is a C compile.
    let mut checked = Vec::new();
    for chunk in models.chunks(4) {
        let runs = chunk.iter().cloned().map(|model| {
            tokio::task::spawn_blocking(move || {
                let verdict = deadlock::check(&model, 1_000_000, Duration::from_secs(10));
                (matches!(verdict, Verdict::Deadlock { .. }), spin_finds_a_deadlock(&model), model)
            })
        });
        checked.extend(futures::future::join_all(runs).await);
    }
    let mut deadlocks = 0;
    for joined in checked {
        let (ours, spins, model) = joined.unwrap();
        assert_eq!(ours, spins, "the checker and SPIN disagree on:\n{}", deadlock::promela(&model));
        deadlocks += usize::from(ours);
    }
    assert!(deadlocks >= 20 && deadlocks + 20 <= SPIN_DESIGNS as usize, "{deadlocks} deadlocks");
}

/// Designs checked with SPIN (each is compiled: fewer than the runtime's).
const SPIN_DESIGNS: u64 = 300;

/// A generated node: id, type, configuration, inputs (one connection each), data outputs.
type Generated = (String, &'static str, Value, Vec<&'static str>, Vec<&'static str>);

/// A random design with choices: one or two sequences of two messages, two to four of map, join, batch,
/// filter, switch (first matching case, or every one), merge, alt and split, one sink; every
/// input fed from nodes before it (no cycles: a cycle whose messages go round for ever next to
/// a partial deadlock is a deadlock to the checker but not an end state to SPIN), capacities 1
/// or 2.
fn design_with_choices(rng: &mut StdRng) -> Plan {
    let mut nodes: Vec<Generated> = Vec::new();
    for i in 0..rng.random_range(1..=2) {
        nodes.push((format!("seq{i}"), "source.sequence", json!({ "count": 2 }), vec![], vec!["out"]));
    }
    for i in 0..rng.random_range(2..=4) {
        let switch = |mode: &str| {
            let cases = json!([{ "port": "a", "expression": "true" }, { "port": "b", "expression": "true" }]);
            json!({ "cases": cases, "mode": mode })
        };
        nodes.push(match rng.random_range(0..11) {
            0 => (format!("map{i}"), "transform.map", json!({ "expression": "." }), vec!["in"], vec!["out"]),
            1 | 9 => (
                format!("join{i}"),
                "control.join",
                json!({ "inputs": ["a", "b"] }),
                vec!["a", "b"],
                vec!["out"],
            ),
            2 | 10 => (format!("batch{i}"), "control.batch", json!({ "size": 2 }), vec!["in"], vec!["out"]),
            3 => (
                format!("filter{i}"),
                "transform.filter",
                json!({ "expression": "true" }),
                vec!["in"],
                vec!["out"],
            ),
            4 => (
                format!("first{i}"),
                "control.switch",
                switch("first"),
                vec!["in"],
                vec!["a", "b", "default"],
            ),
            5 => {
                (format!("every{i}"), "control.switch", switch("all"), vec!["in"], vec!["a", "b", "default"])
            }
            6 => (format!("merge{i}"), "control.merge", json!({}), vec!["in", "in"], vec!["out"]),
            7 => (
                format!("alt{i}"),
                "control.alt",
                json!({ "inputs": ["a", "b"] }),
                vec!["a", "b"],
                vec!["out"],
            ),
            _ => (format!("split{i}"), "control.split", json!({}), vec!["in"], vec!["out"]),
        });
    }
    nodes.push(("sink".into(), "sink.output", json!({}), vec!["in"], vec![]));
    let mut connections = Vec::new();
    for position in 1..nodes.len() {
        for input in nodes[position].3.clone() {
            let from = &nodes[rng.random_range(0..position)];
            if from.4.is_empty() {
                continue;
            }
            let from_port = from.4[rng.random_range(0..from.4.len())];
            connections.push(PlanConnection {
                id: format!("c{}", connections.len()),
                from: from.0.clone(),
                from_port: from_port.into(),
                to: nodes[position].0.clone(),
                to_port: input.into(),
                capacity: rng.random_range(1..=2),
            });
        }
    }
    Plan {
        nodes: nodes
            .into_iter()
            .map(|(id, type_id, config, _, _)| PlanNode { id, type_id: type_id.into(), config, remote: None })
            .collect(),
        connections,
    }
}

/// Designs with choices checked with SPIN.
const CHOICE_DESIGNS: u64 = 150;

/// SPIN gives the checker's answer on designs whose runs depend on choices (filters,
/// switches, merges, alts, splits): the checker and SPIN both explore every choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spin_gives_the_checkers_answer_on_designs_with_choices() {
    if !spin() {
        eprintln!("skipped: no spin");
        return;
    }
    let mut rng = StdRng::seed_from_u64(0x0c40_1ce5);
    let models: Vec<Model> = (0..CHOICE_DESIGNS).map(|_| model(&design_with_choices(&mut rng))).collect();
    let mut checked = Vec::new();
    for chunk in models.chunks(4) {
        let runs = chunk.iter().cloned().map(|model| {
            tokio::task::spawn_blocking(move || {
                let verdict = deadlock::check(&model, 200_000, Duration::from_secs(20));
                let ours = match verdict {
                    Verdict::CapReached { .. } => None,
                    verdict => Some(matches!(verdict, Verdict::Deadlock { .. })),
                };
                (ours, ours.map(|_| spin_finds_a_deadlock(&model)), model)
            })
        });
        checked.extend(futures::future::join_all(runs).await);
    }
    let (mut deadlocks, mut any_of, mut compared) = (0, 0, 0);
    for joined in checked {
        let (ours, spins, model) = joined.unwrap();
        let Some(ours) = ours else { continue };
        compared += 1;
        assert_eq!(Some(ours), spins, "the checker and SPIN disagree on:\n{}", deadlock::promela(&model));
        deadlocks += usize::from(ours);
        any_of +=
            usize::from(model.processes.iter().any(|p| {
                matches!(p.machine, deadlock::Machine::Serve { writes: deadlock::Writes::AnyOf(_) })
            }));
    }
    assert!(compared >= 140, "only {compared} designs within the search's bound");
    assert!(deadlocks >= 5 && deadlocks + 10 <= compared, "{deadlocks} deadlocks");
    assert!(any_of >= 20, "{any_of} designs with a switch sending to every matching case");
}

//! CheckDeadlock on designs with known answers, through the design service on both backends.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use csp_proto::{design::v1 as pb, registry::v1 as reg};
use csp_testkit::{TestEnv, authed};
use serde_json::json;
use tonic::Code;

/// A connection of `capacity` messages.
fn with_capacity(id: &str, from: &str, out: &str, to: &str, input: &str, capacity: i32) -> pb::Op {
    let connection = pb::Connection { capacity, ..connection(id, from, out, to, input) };
    pb::Op { op: Some(pb::op::Op::AddConnection(pb::AddConnectionOp { connection: Some(connection) })) }
}

/// `seq` sends each of its two messages to the join's `b` first, then to a batch of two that
/// feeds the join's `a`; the join reads `a` first. With room for one message on `b`: the
/// join waits for the batch, the batch for `seq`'s second message, `seq` for room on `b`.
fn crossed(capacity: i32) -> Vec<pb::Op> {
    vec![
        add_node("seq", "source.sequence", json!({ "count": 2 })),
        add_node("batch", "control.batch", json!({ "size": 2 })),
        add_node("join", "control.join", json!({ "inputs": ["a", "b"] })),
        add_node("out", "sink.output", json!({})),
        with_capacity("to_b", "seq", "out", "join", "b", capacity),
        with_capacity("to_batch", "seq", "out", "batch", "in", 1),
        with_capacity("to_a", "batch", "out", "join", "a", 1),
        with_capacity("joined", "join", "out", "out", "in", 1),
    ]
}

/// SPIN's verdict on a Promela model: whether it finds an invalid end state (a deadlock);
/// `None` where SPIN is not installed (CI installs it).
fn spin_finds_a_deadlock(model: &str) -> Option<bool> {
    let installed = std::process::Command::new("spin").arg("-V").output().is_ok_and(|o| o.status.success());
    assert!(
        installed || std::env::var_os("CI").is_none(),
        "CI needs the SPIN model checker (Debian package spin)"
    );
    if !installed {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.pml"), model).unwrap();
    let run = |program: &str, args: &[&str]| {
        let output = std::process::Command::new(program).args(args).current_dir(dir.path()).output().unwrap();
        assert!(output.status.success(), "{program}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    run("spin", &["-a", "model.pml"]);
    run("cc", &["-O0", "-DSAFETY", "-o", "pan", "pan.c"]);
    let report = run("./pan", &[]);
    Some(report.contains("pan:1: invalid end state"))
}

async fn export(h: &Harness, token: &str, id: &str) -> pb::ExportPromelaResponse {
    let request = pb::ExportPromelaRequest { design_id: id.into(), revision: 0 };
    h.client.clone().export_promela(authed(request, token)).await.unwrap().into_inner()
}

async fn check(h: &Harness, token: &str, id: &str, max_states: i64) -> pb::CheckDeadlockResponse {
    let request = pb::CheckDeadlockRequest { design_id: id.into(), revision: 0, max_states };
    h.client.clone().check_deadlock(authed(request, token)).await.unwrap().into_inner()
}

async fn deadlocks_are_found_before_a_run_with_the_shortest_trace(env: TestEnv) {
    let h = start(&env, |_| {}).await;
    let alice = h.designer("alice");

    let design = h.create(&alice, "Crossed").await;
    h.apply(&alice, &design.id, 1, crossed(1)).await.unwrap();
    let found = check(&h, &alice, &design.id, 0).await;
    assert_eq!(found.verdict(), pb::DeadlockVerdict::DeadlockFound);
    let steps: Vec<(&str, &str, &str, &str)> = found
        .trace
        .iter()
        .map(|s| {
            (s.action.as_str(), s.connection_id.as_str(), s.from_node_id.as_str(), s.to_node_id.as_str())
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("send", "to_b", "seq", "join"),
            ("send", "to_batch", "seq", "batch"),
            ("receive", "to_batch", "seq", "batch"),
        ]
    );
    let blocked: Vec<(&str, &str, Vec<&str>)> = found
        .blocked
        .iter()
        .map(|b| {
            (b.node_id.as_str(), b.waiting_to.as_str(), b.connection_ids.iter().map(String::as_str).collect())
        })
        .collect();
    assert_eq!(
        blocked,
        [
            ("batch", "receive", vec!["to_batch"]),
            ("join", "receive", vec!["to_a"]),
            ("out", "receive", vec!["joined"]),
            ("seq", "send", vec!["to_b"]),
        ]
    );
    let full: Vec<(&str, i32, i32)> =
        found.channels.iter().map(|c| (c.connection_id.as_str(), c.messages, c.capacity)).collect();
    assert!(full.contains(&("to_b", 1, 1)), "{full:?}");
    assert!(found.assumed_node_ids.is_empty());
    assert_eq!(found.source_messages, 3);
    // ValidateDesign finds it too: every run of this design deadlocks (each node reads in a
    // fixed order), so it is an error, and StartExecution refuses the design.
    let verdict = h.validate(&alice, &design.id).await.unwrap();
    assert!(!verdict.valid);
    let finding = verdict.findings.iter().find(|f| f.code == "deadlock").expect("a deadlock finding");
    assert_eq!(finding.severity(), pb::Severity::Error);
    assert!(finding.message.contains("`seq` waits to send on `to_b`"), "{}", finding.message);

    // Room for both of seq's messages on `b`: no deadlock, and how much was explored.
    let roomy = h.create(&alice, "Roomy").await;
    h.apply(&alice, &roomy.id, 1, crossed(2)).await.unwrap();
    let free = check(&h, &alice, &roomy.id, 0).await;
    assert_eq!(free.verdict(), pb::DeadlockVerdict::DeadlockFree);
    assert!(free.states_explored > 3, "{}", free.states_explored);
    assert!(free.trace.is_empty() && free.blocked.is_empty());
    let verdict = h.validate(&alice, &roomy.id).await.unwrap();
    assert!(verdict.valid, "{:?}", verdict.findings);

    // The same two designs in Promela: SPIN finds the deadlock, and only in the first.
    let exported = export(&h, &alice, &design.id).await;
    assert_eq!(exported.model.matches("proctype").count(), 4);
    assert!(exported.model.contains("chan c0 = [1] of { bit }"), "{}", exported.model);
    assert!(spin_finds_a_deadlock(&exported.model).unwrap_or(true), "{}", exported.model);
    let exported = export(&h, &alice, &roomy.id).await;
    assert!(!spin_finds_a_deadlock(&exported.model).unwrap_or(false), "{}", exported.model);

    // And in CSPm, for FDR: a buffer per connection of its capacity, a process per node.
    let request = pb::ExportCspmRequest { design_id: design.id.clone(), revision: 0 };
    let cspm = h.client.clone().export_cspm(authed(request, &alice)).await.unwrap().into_inner();
    assert!(cspm.assumed_node_ids.is_empty());
    assert_eq!(cspm.source_messages, 3);
    let script = &cspm.script;
    assert_eq!(script.matches("\nNODE(").count(), 4, "{script}");
    for connection in ["to_b", "to_batch", "to_a", "joined"] {
        assert!(script.contains(&format!("= 1 -- {connection}: ")), "{connection} in {script}");
    }
    assert!(script.lines().any(|l| l.starts_with("NODES = || i : {0..3} @ [ALPHA(i)] NODE(i)")), "{script}");
    assert!(script.trim_end().ends_with("assert SYSTEM :[deadlock free [F]]"), "{script}");
    let request = pb::ExportCspmRequest { design_id: design.id.clone(), revision: 0 };
    let status = h.client.clone().export_cspm(authed(request, &h.designer("carol"))).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "a design one cannot see is not there");
    let request = pb::ExportCspmRequest { design_id: design.id.clone(), revision: -1 };
    let status = h.client.clone().export_cspm(authed(request, &alice)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let details = tonic_types::StatusExt::get_details_bad_request(&status).expect("field details");
    assert_eq!(details.field_violations[0].field, "revision");

    // With a filter on the way to the batch, only some runs deadlock (those where the filter
    // lets both messages through): a warning, and the design may run.
    let filtered = h.create(&alice, "Filtered").await;
    let mut ops = crossed(1);
    ops.retain(|op| !matches!(&op.op, Some(pb::op::Op::AddConnection(c)) if c.connection.as_ref().unwrap().id == "to_batch"));
    ops.push(add_node("keep", "transform.filter", json!({ "expression": "true" })));
    ops.push(with_capacity("to_keep", "seq", "out", "keep", "in", 1));
    ops.push(with_capacity("to_batch", "keep", "out", "batch", "in", 1));
    h.apply(&alice, &filtered.id, 1, ops).await.unwrap();
    let verdict = h.validate(&alice, &filtered.id).await.unwrap();
    assert!(verdict.valid, "{:?}", verdict.findings);
    let finding =
        verdict.findings.iter().find(|f| f.code == "deadlock_possible").expect("a possible deadlock");
    assert_eq!(finding.severity(), pb::Severity::Warning);

    // A search over the caller's cap says so.
    let capped = check(&h, &alice, &roomy.id, 3).await;
    assert_eq!(capped.verdict(), pb::DeadlockVerdict::StateCapReached);
    assert_eq!(capped.states_explored, 3);

    // A custom component declares no behaviour: it is assumed, and the answer says so.
    let _component = h.register_sentiment("acme.sentiment").await;
    let custom = h.create(&alice, "Custom").await;
    h.apply(
        &alice,
        &custom.id,
        1,
        vec![
            add_node("src", "source.constant", json!({ "value": { "text": "hi" } })),
            add_node("score", "acme.sentiment", json!({})),
            add_node("log", "sink.log", json!({})),
            add_connection("c1", "src", "out", "score", "in"),
            add_connection("c2", "score", "out", "log", "in"),
        ],
    )
    .await
    .unwrap();
    let assumed = check(&h, &alice, &custom.id, 0).await;
    assert_eq!(assumed.verdict(), pb::DeadlockVerdict::DeadlockFree);
    assert_eq!(assumed.assumed_node_ids, ["score"]);

    // Bad requests.
    let request = pb::CheckDeadlockRequest { design_id: design.id.clone(), revision: 0, max_states: -1 };
    let status = h.client.clone().check_deadlock(authed(request, &alice)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let bob = h.designer("bob");
    let request = pb::CheckDeadlockRequest { design_id: design.id.clone(), revision: 0, max_states: 0 };
    let status = h.client.clone().check_deadlock(authed(request, &bob)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "a design one cannot see is not there");
}

/// A feedback loop: `seq` sends `count` messages into a merge, the merge to `echo`, and `echo`
/// every message both to a log and back into the merge, every channel holding `capacity`.
fn feedback(count: u64, capacity: i32) -> Vec<pb::Op> {
    vec![
        add_node("seq", "source.sequence", json!({ "count": count })),
        add_node("merge", "control.merge", json!({})),
        add_node("echo", "transform.map", json!({ "expression": "." })),
        add_node("log", "sink.log", json!({})),
        with_capacity("into_loop", "seq", "out", "merge", "in", capacity),
        with_capacity("round", "merge", "out", "echo", "in", capacity),
        with_capacity("back", "echo", "out", "merge", "in", capacity),
        with_capacity("logged", "echo", "out", "log", "in", capacity),
    ]
}

async fn validation_judges_cycles_alts_and_declared_components(env: TestEnv) {
    // The search follows sources for four messages (the loops below need four to fill).
    let h = start(&env, |s| s.design.deadlock.source_messages = 4).await;
    let alice = h.designer("alice");
    let findings = |verdict: &pb::ValidateDesignResponse| -> Vec<(String, String, String)> {
        verdict
            .findings
            .iter()
            .map(|f| (f.code.clone(), f.node_id.clone(), f.connection_id.clone()))
            .collect()
    };

    // The loop holds four messages (one in each of its two channels, one in each process):
    // four entering fill it on every run, an error; the search agrees.
    let tight = h.create(&alice, "Tight loop").await;
    h.apply(&alice, &tight.id, 1, feedback(4, 1)).await.unwrap();
    let verdict = h.validate(&alice, &tight.id).await.unwrap();
    assert!(!verdict.valid);
    assert_eq!(findings(&verdict), [("deadlock".into(), "echo".into(), "back".into())]);
    let message = &verdict.findings[0].message;
    assert!(message.contains("it holds 4") && message.contains("4 enter"), "{message}");
    assert_eq!(check(&h, &alice, &tight.id, 0).await.verdict(), pb::DeadlockVerdict::DeadlockFound);
    assert!(spin_finds_a_deadlock(&export(&h, &alice, &tight.id).await.model).unwrap_or(true));

    // With room for eight in each channel the messages go round for ever: no deadlock, but
    // the run never ends — a warning.
    let roomy = h.create(&alice, "Roomy loop").await;
    h.apply(&alice, &roomy.id, 1, feedback(4, 8)).await.unwrap();
    let verdict = h.validate(&alice, &roomy.id).await.unwrap();
    assert!(verdict.valid, "{:?}", verdict.findings);
    assert_eq!(findings(&verdict), [("endless_cycle".into(), "echo".into(), "back".into())]);
    assert_eq!(check(&h, &alice, &roomy.id, 0).await.verdict(), pb::DeadlockVerdict::DeadlockFree);
    assert!(!spin_finds_a_deadlock(&export(&h, &alice, &roomy.id).await.model).unwrap_or(false));

    // The crossed design with an alt where the join was: the alt takes whichever input is
    // ready, so nothing waits for good.
    let alt = h.create(&alice, "Crossed alt").await;
    let mut ops = crossed(1);
    ops[2] = add_node("join", "control.alt", json!({ "inputs": ["a", "b"] }));
    h.apply(&alice, &alt.id, 1, ops).await.unwrap();
    let verdict = h.validate(&alice, &alt.id).await.unwrap();
    assert!(verdict.valid && verdict.findings.is_empty(), "{:?}", verdict.findings);
    assert_eq!(check(&h, &alice, &alt.id, 0).await.verdict(), pb::DeadlockVerdict::DeadlockFree);
    // An alt between two maps feeding each other: no message ever reaches either.
    let ring = h.create(&alice, "Alt ring").await;
    h.apply(
        &alice,
        &ring.id,
        1,
        vec![
            add_node("alt", "control.alt", json!({ "inputs": ["a", "b"] })),
            add_node("echo", "transform.map", json!({ "expression": "." })),
            add_node("seq", "source.sequence", json!({ "count": 2 })),
            add_node("log", "sink.log", json!({})),
            add_connection("to_echo", "alt", "out", "echo", "in"),
            add_connection("to_a", "echo", "out", "alt", "a"),
            add_connection("to_b", "echo", "out", "alt", "b"),
            add_connection("logged", "seq", "out", "log", "in"),
        ],
    )
    .await
    .unwrap();
    let verdict = h.validate(&alice, &ring.id).await.unwrap();
    let starved = verdict.findings.iter().find(|f| f.code == "deadlock").expect("a certain deadlock");
    assert!(starved.message.contains("never starts"), "{}", starved.message);
    assert_eq!(check(&h, &alice, &ring.id, 0).await.verdict(), pb::DeadlockVerdict::DeadlockFound);

    // A remote component that declares its behaviour at registration is not assumed: one
    // that writes a message per message taken, on a loop like the first, fills it as surely.
    let _declared = h
        .register_sentiment_behaving(
            "acme.declared",
            Some(reg::PortBehaviour {
                read: reg::ReadMode::One as i32,
                write: reg::WriteMode::One as i32,
                buffers: false,
            }),
        )
        .await;
    let remote = h.create(&alice, "Declared loop").await;
    let mut ops = feedback(4, 1);
    ops[2] = add_node("echo", "acme.declared", json!({}));
    h.apply(&alice, &remote.id, 1, ops).await.unwrap();
    let found = check(&h, &alice, &remote.id, 0).await;
    assert!(found.assumed_node_ids.is_empty(), "{:?}", found.assumed_node_ids);
    assert_eq!(found.verdict(), pb::DeadlockVerdict::DeadlockFound);
    let verdict = h.validate(&alice, &remote.id).await.unwrap();
    assert_eq!(findings(&verdict), [("deadlock".into(), "echo".into(), "back".into())]);
    // Undeclared, the same loop may drop messages: possible, not certain.
    let _undeclared = h.register_sentiment("acme.undeclared").await;
    let assumed = h.create(&alice, "Assumed loop").await;
    let mut ops = feedback(4, 1);
    ops[2] = add_node("echo", "acme.undeclared", json!({}));
    h.apply(&alice, &assumed.id, 1, ops).await.unwrap();
    let verdict = h.validate(&alice, &assumed.id).await.unwrap();
    assert_eq!(findings(&verdict), [("deadlock_prone_cycle".into(), "echo".into(), "back".into())]);
    assert_eq!(check(&h, &alice, &assumed.id, 0).await.assumed_node_ids, ["echo"]);
}

csp_testkit::backend_tests!(
    deadlocks_are_found_before_a_run_with_the_shortest_trace,
    validation_judges_cycles_alts_and_declared_components
);

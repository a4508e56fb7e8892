//! Runtime workloads: process networks run in process, as the executor runs them.
//!
//! - `chain10`: `source.sequence` of 1,000,000 `{seq: n}` → ten `transform.set` nodes (node K
//!   sets `stepK = K`) → a counting sink (`sink.output` keeping nothing).
//! - `fan`: the sequence → four branches of three `transform.set` → `control.join` of the four
//!   → the counting sink.
//! - `chain10jq`: chain10 with `transform.map` (`.stepK = K`) instead of `transform.set`.
//! - `latency`: chain10 with at most 100 messages in flight: end-to-end latency of each message,
//!   p50 and p99.

use std::time::Instant;

use csp_executor::runtime::{Debugger, Network, Options, Plan, PlanConnection, PlanNode, Services};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const MESSAGES: u64 = 1_000_000;

fn node(id: &str, type_id: &str, config: Value) -> PlanNode {
    PlanNode { id: id.into(), type_id: type_id.into(), config, remote: None }
}

fn connect(id: &str, from: &str, from_port: &str, to: &str, to_port: &str) -> PlanConnection {
    PlanConnection {
        id: id.into(),
        from: from.into(),
        from_port: from_port.into(),
        to: to.into(),
        to_port: to_port.into(),
        capacity: 0,
    }
}

fn set(k: usize) -> Value {
    json!({ "operations": [{ "op": "set", "path": format!("step{k}"), "value": k }] })
}

/// source → `stages` transforms made by `stage` → counting sink.
fn chain(count: u64, stages: usize, stage: impl Fn(usize) -> PlanNode) -> Plan {
    let mut plan = Plan::default();
    plan.nodes.push(node("source", "source.sequence", json!({ "count": count, "field": "seq" })));
    let mut previous = "source".to_owned();
    for k in 1..=stages {
        let mut n = stage(k);
        n.id = format!("t{k}");
        plan.connections.push(connect(&format!("c{k}"), &previous, "out", &n.id, "in"));
        previous = n.id.clone();
        plan.nodes.push(n);
    }
    plan.nodes.push(node("sink", "sink.output", json!({ "limit": 0 })));
    plan.connections.push(connect("c_sink", &previous, "out", "sink", "in"));
    plan
}

fn fan(count: u64) -> Plan {
    let mut plan = Plan::default();
    plan.nodes.push(node("source", "source.sequence", json!({ "count": count, "field": "seq" })));
    let branches = ["a", "b", "c", "d"];
    plan.nodes.push(node("join", "control.join", json!({ "inputs": branches })));
    for b in branches {
        let mut previous = "source".to_owned();
        for k in 1..=3 {
            let id = format!("{b}{k}");
            plan.nodes.push(node(&id, "transform.set", set(k)));
            plan.connections.push(connect(&format!("{previous}-{id}"), &previous, "out", &id, "in"));
            previous = id;
        }
        plan.connections.push(connect(&format!("{previous}-join"), &previous, "out", "join", b));
    }
    plan.nodes.push(node("sink", "sink.output", json!({ "limit": 0 })));
    plan.connections.push(connect("join-sink", "join", "out", "sink", "in"));
    plan
}

/// Runs a plan to the end; messages per second through the sink.
async fn run(plan: &Plan, options: Options) -> anyhow::Result<(f64, u64)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let network = Network::build(plan, options, Services::default(), Debugger::new([]), tx)
        .map_err(|problems| anyhow::anyhow!("{problems:?}"))?;
    let started = Instant::now();
    let outcome = network.run(CancellationToken::new()).await;
    let elapsed = started.elapsed();
    drain.abort();
    anyhow::ensure!(outcome.error.is_none(), "the run failed: {:?}", outcome.error);
    let received = outcome.received.get("sink").copied().unwrap_or(0);
    Ok((received as f64 / elapsed.as_secs_f64(), received))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

pub(crate) fn chain10() -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let plan = chain(MESSAGES, 10, |k| node("", "transform.set", set(k)));
        run(&plan, Options::default()).await?; // warm up
        let (rate, received) = run(&plan, Options::default()).await?;
        anyhow::ensure!(received == MESSAGES, "lost messages: {received}");
        println!("chain10: {rate:.0} msg/s (1,000,000 messages through 10 transform.set)");
        Ok(())
    })
}

pub(crate) fn fan_workload() -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let plan = fan(MESSAGES);
        let (rate, received) = run(&plan, Options::default()).await?;
        anyhow::ensure!(received == MESSAGES, "lost messages: {received}");
        println!("fan: {rate:.0} msg/s (4 branches of 3 transform.set, joined)");
        Ok(())
    })
}

pub(crate) fn chain10jq() -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let plan = chain(MESSAGES / 4, 10, |k| {
            node("", "transform.map", json!({ "expression": format!(".step{k} = {k}") }))
        });
        let (rate, received) = run(&plan, Options::default()).await?;
        anyhow::ensure!(received == MESSAGES / 4, "lost messages: {received}");
        println!("chain10jq: {rate:.0} msg/s (10 transform.map with jq)");
        Ok(())
    })
}

/// End-to-end latency: messages fed into a `source.input` at the head of chain10, at most
/// 100 in flight, each timed from its send to its arrival at the sink.
pub(crate) fn latency() -> anyhow::Result<()> {
    const TOTAL: usize = 200_000;
    const WINDOW: usize = 100;
    runtime()?.block_on(async {
        let mut plan = chain(0, 10, |k| node("", "transform.set", set(k)));
        plan.nodes[0] = node("source", "source.input", json!({}));
        let (tx, mut events) = tokio::sync::mpsc::channel(4096);
        let drain = tokio::spawn(async move { while events.recv().await.is_some() {} });
        let mut network = Network::build(&plan, Options::default(), Services::default(), Debugger::new([]), tx)
            .map_err(|problems| anyhow::anyhow!("{problems:?}"))?;
        let feed = network.feed("source", WINDOW).ok_or_else(|| anyhow::anyhow!("no feed"))?;
        let mut tap = network.tap("sink").ok_or_else(|| anyhow::anyhow!("no tap"))?;
        let run = tokio::spawn(network.run(CancellationToken::new()));
        let mut sent_at = Vec::with_capacity(TOTAL);
        let mut samples = Vec::with_capacity(TOTAL);
        for i in 0..WINDOW.min(TOTAL) {
            sent_at.push(Instant::now());
            feed.send(json!({ "seq": i })).await?;
        }
        while samples.len() < TOTAL {
            let Some(message) = tap.recv().await else { break };
            let seq = message["seq"].as_u64().unwrap_or_default() as usize;
            samples.push(sent_at[seq].elapsed());
            if sent_at.len() < TOTAL {
                let next = sent_at.len();
                sent_at.push(Instant::now());
                feed.send(json!({ "seq": next })).await?;
            }
        }
        drop(feed);
        run.await?;
        drain.abort();
        anyhow::ensure!(samples.len() == TOTAL, "lost messages");
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
        println!(
            "latency: p50 {:.1} µs, p99 {:.1} µs end to end through 10 transform.set, at most {WINDOW} in flight",
            at(0.5).as_secs_f64() * 1e6,
            at(0.99).as_secs_f64() * 1e6
        );
        Ok(())
    })
}

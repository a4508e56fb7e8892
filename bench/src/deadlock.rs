//! `deadlock`: the deadlock check's search on its own — distinct states per second and time to
//! a verdict — on a 30-node design with buffered channels: a source feeding a merge, a
//! pipeline of 27 transforms, and a switch at the end sending each message either on to a
//! sink or back into the merge (a feedback loop).

use std::time::{Duration, Instant};

use csp_components::deadlock::{self, Channel, Machine, Model, Process, Verdict, Writes};

/// A 30-node pipeline with feedback: `source → merge → t1 … t27 → switch → sink`, the switch's
/// second port back into the merge. Each channel holds `capacity`.
fn pipeline_with_feedback(messages: u16, capacity: u16) -> Model {
    let mut processes = Vec::new();
    let mut channels = Vec::new();
    let source = add(
        &mut processes,
        "source".into(),
        Machine::Source { count: messages, total: Some(u32::from(messages)), ports: 1 },
        0,
        1,
    );
    let merge = add(&mut processes, "merge".into(), Machine::Serve { writes: Writes::Each(1) }, 2, 1);
    let mut last = merge;
    for i in 1..=27 {
        let t = add(&mut processes, format!("t{i}"), Machine::Serve { writes: Writes::Each(1) }, 1, 1);
        connect(&mut processes, &mut channels, (last, 0), (t, 0), capacity);
        last = t;
    }
    let switch =
        add(&mut processes, "switch".into(), Machine::Serve { writes: Writes::OneOrNone(0b11) }, 1, 2);
    let sink = add(&mut processes, "sink".into(), Machine::Serve { writes: Writes::Nothing }, 1, 0);
    connect(&mut processes, &mut channels, (source, 0), (merge, 0), capacity);
    connect(&mut processes, &mut channels, (last, 0), (switch, 0), capacity);
    connect(&mut processes, &mut channels, (switch, 0), (sink, 0), capacity);
    connect(&mut processes, &mut channels, (switch, 1), (merge, 1), capacity);
    Model { processes, channels }
}

/// Adds a process with `inputs` and `outputs` ports; its index.
fn add(processes: &mut Vec<Process>, id: String, machine: Machine, inputs: usize, outputs: usize) -> usize {
    processes.push(Process {
        node_id: id,
        machine,
        inputs: vec![Vec::new(); inputs],
        outputs: vec![Vec::new(); outputs],
        assumed: false,
    });
    processes.len() - 1
}

fn connect(
    processes: &mut [Process],
    channels: &mut Vec<Channel>,
    (from, out): (usize, usize),
    (to, input): (usize, usize),
    capacity: u16,
) {
    let c = channels.len();
    processes[from].outputs[out].push(c);
    processes[to].inputs[input].push(c);
    channels.push(Channel { connection_id: format!("c{c}"), from, to, capacity });
}

/// A 1,000-node design of 100 blocks: a source whose messages go two ways (directly and
/// through a filter) into a join, then into a merge with a feedback loop through a map and a
/// switch that sends each message on to a sink or back, and a map on the way.
fn thousand_nodes() -> Model {
    let mut processes = Vec::new();
    let mut channels = Vec::new();
    let map = Machine::Serve { writes: Writes::Each(1) };
    for b in 0..100 {
        let source = add(
            &mut processes,
            format!("b{b}.source"),
            Machine::Source { count: 3, total: Some(3), ports: 1 },
            0,
            1,
        );
        let filter = add(
            &mut processes,
            format!("b{b}.filter"),
            Machine::Serve { writes: Writes::OneOrNone(1) },
            1,
            1,
        );
        let join = add(&mut processes, format!("b{b}.join"), Machine::Join { ports: 1 }, 2, 1);
        let tap = add(&mut processes, format!("b{b}.tap"), map, 1, 1);
        let merge = add(&mut processes, format!("b{b}.merge"), map, 1, 1);
        let work = add(&mut processes, format!("b{b}.work"), map, 1, 1);
        let more = add(&mut processes, format!("b{b}.more"), map, 1, 1);
        let switch = add(
            &mut processes,
            format!("b{b}.switch"),
            Machine::Serve { writes: Writes::OneOrNone(0b11) },
            1,
            2,
        );
        let last = add(&mut processes, format!("b{b}.last"), map, 1, 1);
        let sink =
            add(&mut processes, format!("b{b}.sink"), Machine::Serve { writes: Writes::Nothing }, 1, 0);
        connect(&mut processes, &mut channels, (source, 0), (join, 0), 4);
        connect(&mut processes, &mut channels, (source, 0), (filter, 0), 4);
        connect(&mut processes, &mut channels, (filter, 0), (join, 1), 4);
        connect(&mut processes, &mut channels, (join, 0), (tap, 0), 4);
        connect(&mut processes, &mut channels, (tap, 0), (merge, 0), 4);
        connect(&mut processes, &mut channels, (merge, 0), (work, 0), 4);
        connect(&mut processes, &mut channels, (work, 0), (more, 0), 4);
        connect(&mut processes, &mut channels, (more, 0), (switch, 0), 4);
        connect(&mut processes, &mut channels, (switch, 1), (merge, 0), 4);
        connect(&mut processes, &mut channels, (switch, 0), (last, 0), 4);
        connect(&mut processes, &mut channels, (last, 0), (sink, 0), 4);
    }
    Model { processes, channels }
}

pub(crate) fn run() -> anyhow::Result<()> {
    let model = thousand_nodes();
    let ruling = deadlock::rules(&model);
    let rounds = 1_000;
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(deadlock::rules(std::hint::black_box(&model)));
    }
    let took = started.elapsed() / rounds;
    println!(
        "deadlock rules ({} nodes, {} connections, {} cycles judged): {:.3} ms per validation",
        model.processes.len(),
        model.channels.len(),
        ruling.cycles.len(),
        took.as_secs_f64() * 1000.0
    );

    for (messages, capacity) in [(2, 2), (3, 2), (4, 2)] {
        let model = pipeline_with_feedback(messages, capacity);
        let started = Instant::now();
        let verdict = deadlock::check(&model, 50_000_000, Duration::from_secs(120));
        let took = started.elapsed();
        let (what, states) = match &verdict {
            Verdict::Free { states } => ("deadlock-free", *states),
            Verdict::Deadlock { states, trace, .. } => {
                println!("  (a deadlock after {} steps)", trace.len());
                ("deadlock found", *states)
            }
            Verdict::CapReached { states } => ("cap reached", *states),
        };
        println!(
            "deadlock (30 nodes, pipeline with feedback, {messages} messages, capacity {capacity}): {what} in {:.1} ms, {states} distinct states, {:.0} states/s",
            took.as_secs_f64() * 1000.0,
            states as f64 / took.as_secs_f64()
        );
    }
    Ok(())
}

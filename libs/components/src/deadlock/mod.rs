//! Deadlock checking of a design before it runs.
//!
//! A design becomes a [`Model`]: one process per node, whose behaviour on its ports is a small
//! state machine ([`Machine`], chosen per component type by [`machine_for`]), and one FIFO per
//! connection with the capacity the executor gives it. Messages are abstracted to tokens:
//! what matters for deadlock is which process waits on which channel, not what it carries;
//! where a component's output depends on data (a filter, a switch, a split), every choice is
//! explored. Sources send a bounded number of messages.
//!
//! [`check`] explores every reachable state breadth first, so the first deadlock it meets is
//! one reached by the fewest communications: its trace is the shortest story of how it
//! happens. A deadlock is a state where no process can move and some have not ended — those
//! are the blocked ones, each waiting to send on a full channel or to receive from empty ones
//! (others may have ended: a partial deadlock).

mod check;
mod cspm;
mod promela;
mod rules;

pub use check::{Blocked, Step, StepAction, Verdict, WaitingTo, check};
pub use cspm::cspm;
pub use promela::promela;
pub use rules::{Count, Cycle, CycleKind, FreeBecause, Ruling, rules};

use serde_json::Value;

/// A node's behaviour on its ports, by what it does in one round. Output ports are named by a
/// bit mask (bit `i`: output port `i`); a node never writes to ports outside its masks (an
/// `error` port carries only failures, which the model leaves out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// Sends `count` messages, each to every port of `ports`, then ends (`source.*`).
    Source {
        /// Messages sent.
        count: u16,
        /// How many every run sends, where the configuration fixes it; the search sends at
        /// most `count` of them (`source.input` sends one per input of the execution: `None`).
        total: Option<u32>,
        /// Where each goes.
        ports: u32,
    },
    /// Takes a message from whichever input has one, then writes as `writes` says; ends when
    /// every input is closed and empty (transforms, sinks, merge, alt).
    Serve {
        /// What one message in makes it write.
        writes: Writes,
    },
    /// Takes one message from each input, in port order, then writes one to every port of
    /// `ports`; ends when the input it waits on is closed and empty (`control.join`).
    Join {
        /// Where each joined message goes.
        ports: u32,
    },
    /// Takes `size` messages (from whichever input has one), then writes one to every port of
    /// `ports`; at the end writes what it still holds (`control.batch`, `transform.reduce`,
    /// `metrics.stats`; `size` 0 holds everything until the end).
    Collect {
        /// Messages per write; 0: only at the end.
        size: u16,
        /// Where each goes.
        ports: u32,
    },
}

/// What a [`Machine::Serve`] writes per message taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// Nothing (sinks).
    Nothing,
    /// One message to every port of the mask (a connection each, in order).
    Each(u32),
    /// One message to one port of the mask, or none (filter, switch).
    OneOrNone(u32),
    /// One message to each port of any set of the mask's ports, or none (a switch sending to
    /// every case that matches). At most [`MAX_ANY_OF`] ports.
    AnyOf(u32),
    /// Up to `max` messages, each to every port of the mask (split, remote calls).
    UpTo {
        /// Most messages per message taken.
        max: u8,
        /// Where each goes.
        ports: u32,
    },
}

/// Most ports of a [`Writes::AnyOf`] (every set of them is a choice of the search).
pub const MAX_ANY_OF: u32 = 5;

impl Machine {
    /// The output ports it writes to, as a mask.
    pub fn writes_to(self) -> u32 {
        match self {
            Self::Source { ports, .. } | Self::Join { ports } | Self::Collect { ports, .. } => ports,
            Self::Serve {
                writes:
                    Writes::Each(ports)
                    | Writes::OneOrNone(ports)
                    | Writes::AnyOf(ports)
                    | Writes::UpTo { ports, .. },
            } => ports,
            Self::Serve { writes: Writes::Nothing } => 0,
        }
    }
}

/// The non-empty sets of the ports of `mask` (of `outputs` ports), each in port order.
pub(crate) fn port_sets(mask: u32, outputs: usize) -> Vec<Vec<usize>> {
    let ports: Vec<usize> = (0..outputs.min(32)).filter(|i| mask & (1 << i) != 0).collect();
    (1u32..1 << ports.len())
        .map(|set| ports.iter().enumerate().filter(|(b, _)| set & (1 << b) != 0).map(|(_, &p)| p).collect())
        .collect()
}

/// A process of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// The node.
    pub node_id: String,
    /// Its behaviour.
    pub machine: Machine,
    /// Per input port, the channels into it.
    pub inputs: Vec<Vec<usize>>,
    /// Per output port, the channels out of it (a message on a port goes to each, in order).
    pub outputs: Vec<Vec<usize>>,
    /// Whether its behaviour was assumed (a component that declares none).
    pub assumed: bool,
}

/// A channel of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    /// The connection.
    pub connection_id: String,
    /// The sending process.
    pub from: usize,
    /// The receiving process.
    pub to: usize,
    /// Messages it holds (at least one).
    pub capacity: u16,
}

/// A design as communicating processes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// One per node.
    pub processes: Vec<Process>,
    /// One per connection.
    pub channels: Vec<Channel>,
}

impl Model {
    /// Whether a deadlock the search found after `trace` happens on every run: each process
    /// reads its inputs in an order of its own (one channel at a time) and writes without
    /// choices, and none is assumed — a Kahn process network, which does the same on every
    /// run — and each source sends a fixed number of messages, all of which the search
    /// followed, or it had not yet sent all the search let it when the deadlock was found
    /// (the same state is then reached with every message it sends).
    pub fn certain(&self, trace: &[Step]) -> bool {
        self.processes.iter().enumerate().all(|(i, p)| {
            let single_inputs = p.inputs.iter().all(|port| port.len() <= 1);
            !p.assumed
                && match p.machine {
                    Machine::Source { count, total: Some(total), .. } => {
                        let sends = trace.iter().filter(|s| s.process == i).count();
                        total == u32::from(count)
                            || sends < usize::from(count) * p.outputs.iter().flatten().count()
                    }
                    Machine::Source { total: None, .. } => false,
                    Machine::Join { .. } => single_inputs,
                    Machine::Collect { .. } => p.inputs.iter().flatten().count() <= 1,
                    Machine::Serve { writes: Writes::Each(_) | Writes::Nothing } => {
                        p.inputs.iter().flatten().count() <= 1
                    }
                    Machine::Serve { .. } => false,
                }
        })
    }
}

/// The behaviour of a node of type `type_id` with `config` and output ports `outputs`, its
/// sources sending at most `source_messages`; `None` for a type that declares none (then
/// [`assumed`] is used).
pub fn machine_for(
    type_id: &str,
    config: &Value,
    outputs: &[String],
    source_messages: u16,
) -> Option<Machine> {
    let count = |key: &str, default: u64| {
        let n = config.get(key).and_then(Value::as_u64).unwrap_or(default);
        n.min(u64::from(source_messages)) as u16
    };
    let total = |key: &str, default: u64| {
        let n = config.get(key).and_then(Value::as_u64).unwrap_or(default);
        u32::try_from(n).ok()
    };
    let size =
        |key: &str, default: u64| config.get(key).and_then(Value::as_u64).unwrap_or(default).min(1024) as u16;
    let data = data_ports(outputs);
    let out = match outputs.iter().position(|p| p == "out") {
        Some(i) if i < 32 => 1 << i,
        _ => data,
    };
    Some(match type_id {
        "source.input" => Machine::Source { count: source_messages, total: None, ports: out },
        "source.constant" => {
            Machine::Source { count: count("count", 1), total: total("count", 1), ports: out }
        }
        "source.sequence" => {
            Machine::Source { count: count("count", 0), total: total("count", 0), ports: out }
        }
        "sink.output" | "sink.log" => Machine::Serve { writes: Writes::Nothing },
        "transform.filter" => Machine::Serve { writes: Writes::OneOrNone(out) },
        "control.switch" if config.get("mode").and_then(Value::as_str) == Some("all") => {
            if data.count_ones() > MAX_ANY_OF {
                return None;
            }
            Machine::Serve { writes: Writes::AnyOf(data) }
        }
        "control.switch" => Machine::Serve { writes: Writes::OneOrNone(data) },
        "control.split" | "remote.call" => Machine::Serve { writes: Writes::UpTo { max: 2, ports: out } },
        "control.join" => Machine::Join { ports: out },
        "control.batch" => Machine::Collect { size: size("size", 1).max(1), ports: out },
        "transform.reduce" => {
            let each = config.get("emit").and_then(Value::as_str) == Some("each");
            Machine::Collect { size: u16::from(each), ports: out }
        }
        "metrics.stats" => Machine::Collect { size: 0, ports: out },
        "transform.set"
        | "transform.map"
        | "transform.template"
        | "control.merge"
        | "control.alt"
        | "control.delay"
        | "validate.json_schema"
        | "metrics.counter"
        | "ai.chat"
        | "ai.analyze"
        | "ai.agent"
        | "ai.codegen" => Machine::Serve { writes: Writes::Each(out) },
        _ => return None,
    })
}

/// The behaviour of a registered component from what it declares: how it reads (`none`: a
/// source, sending at most `source_messages`; `all`: one message from each input in port
/// order; `one`, `any`: whichever input has one) and what it writes per message taken (to
/// every output but `error`; with several outputs, `one` is one of them). One that holds
/// messages back (`buffers`) may write none or several per message taken.
pub fn declared(behaviour: &crate::Behaviour, outputs: &[String], source_messages: u16) -> Machine {
    use crate::{ReadMode, WriteMode};
    let ports = data_ports(outputs);
    let single = ports.count_ones() == 1;
    match behaviour.read {
        ReadMode::None => Machine::Source { count: source_messages, total: None, ports },
        ReadMode::All => Machine::Join { ports },
        ReadMode::One | ReadMode::Any => Machine::Serve {
            writes: match behaviour.write {
                _ if behaviour.buffers => Writes::UpTo { max: 2, ports },
                WriteMode::None => Writes::Nothing,
                WriteMode::One if single => Writes::Each(ports),
                WriteMode::One | WriteMode::AtMostOne => Writes::OneOrNone(ports),
                WriteMode::Many => Writes::UpTo { max: 2, ports },
            },
        },
    }
}

/// Every output port but `error`, as a mask.
fn data_ports(outputs: &[String]) -> u32 {
    outputs.iter().take(32).enumerate().filter(|(_, p)| *p != "error").fold(0, |mask, (i, _)| mask | 1 << i)
}

/// The behaviour assumed for a component that declares none: it may take a message from any
/// input and write any number (up to two) to any of its outputs but `error` — every way it
/// could use its ports.
pub fn assumed(outputs: &[String]) -> Machine {
    Machine::Serve { writes: Writes::UpTo { max: 2, ports: data_ports(outputs) } }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A model from `(node, machine, inputs, outputs)` and `(from, port, to, port, capacity)`.
    fn model(
        nodes: &[(&str, Machine, usize, usize)],
        connections: &[(&str, usize, &str, usize, u16)],
    ) -> Model {
        let index = |id: &str| nodes.iter().position(|n| n.0 == id).unwrap();
        let mut processes: Vec<Process> = nodes
            .iter()
            .map(|(id, machine, inputs, outputs)| Process {
                node_id: (*id).into(),
                machine: *machine,
                inputs: vec![Vec::new(); *inputs],
                outputs: vec![Vec::new(); *outputs],
                assumed: false,
            })
            .collect();
        let mut channels = Vec::new();
        for (i, (from, out, to, input, capacity)) in connections.iter().enumerate() {
            let (from, to) = (index(from), index(to));
            processes[from].outputs[*out].push(i);
            processes[to].inputs[*input].push(i);
            channels.push(Channel { connection_id: format!("c{i}"), from, to, capacity: *capacity });
        }
        Model { processes, channels }
    }

    const SOURCE2: Machine = Machine::Source { count: 2, total: Some(2), ports: 1 };
    const MAP: Machine = Machine::Serve { writes: Writes::Each(1) };
    const SINK: Machine = Machine::Serve { writes: Writes::Nothing };

    fn run(model: &Model) -> Verdict {
        check(model, 1_000_000, Duration::from_secs(10))
    }

    #[test]
    fn pipelines_fan_out_and_joins_are_free() {
        let pipeline = model(
            &[("s", SOURCE2, 0, 1), ("m", MAP, 1, 1), ("k", SINK, 1, 0)],
            &[("s", 0, "m", 0, 1), ("m", 0, "k", 0, 1)],
        );
        assert!(matches!(run(&pipeline), Verdict::Free { states } if states > 3));
        // One port to two branches, joined again.
        let diamond = model(
            &[
                ("s", SOURCE2, 0, 1),
                ("a", MAP, 1, 1),
                ("b", MAP, 1, 1),
                ("j", Machine::Join { ports: 1 }, 2, 1),
                ("k", SINK, 1, 0),
            ],
            &[
                ("s", 0, "a", 0, 1),
                ("s", 0, "b", 0, 1),
                ("a", 0, "j", 0, 1),
                ("b", 0, "j", 1, 1),
                ("j", 0, "k", 0, 1),
            ],
        );
        assert!(matches!(run(&diamond), Verdict::Free { .. }));
        // A join whose inputs carry different numbers of messages ends with the shorter one.
        let uneven = model(
            &[
                ("two", SOURCE2, 0, 1),
                ("one", Machine::Source { count: 1, total: Some(1), ports: 1 }, 0, 1),
                ("j", Machine::Join { ports: 1 }, 2, 1),
                ("k", SINK, 1, 0),
            ],
            &[("two", 0, "j", 0, 1), ("one", 0, "j", 1, 1), ("j", 0, "k", 0, 1)],
        );
        assert!(matches!(run(&uneven), Verdict::Free { .. }));
        // Alt takes whichever input is ready.
        let alt = model(
            &[("a", SOURCE2, 0, 1), ("b", SOURCE2, 0, 1), ("alt", MAP, 2, 1), ("k", SINK, 1, 0)],
            &[("a", 0, "alt", 0, 1), ("b", 0, "alt", 1, 1), ("alt", 0, "k", 0, 1)],
        );
        assert!(matches!(run(&alt), Verdict::Free { .. }));
    }

    /// `s` sends each message to the join's second input, then to a batch of two that feeds
    /// the join's first: the join waits for the batch, the batch for `s`'s second message,
    /// and `s` for room in the join's second input — unless that input holds two.
    fn crossed(capacity: u16) -> Model {
        model(
            &[
                ("s", SOURCE2, 0, 1),
                ("batch", Machine::Collect { size: 2, ports: 1 }, 1, 1),
                ("j", Machine::Join { ports: 1 }, 2, 1),
                ("k", SINK, 1, 0),
                // An unrelated pipeline that finishes: the deadlock is partial.
                ("t", SOURCE2, 0, 1),
                ("u", SINK, 1, 0),
            ],
            &[
                ("s", 0, "j", 1, capacity),
                ("s", 0, "batch", 0, 1),
                ("batch", 0, "j", 0, 1),
                ("j", 0, "k", 0, 1),
                ("t", 0, "u", 0, 1),
            ],
        )
    }

    #[test]
    fn a_join_fed_in_the_wrong_order_deadlocks_with_the_shortest_trace() {
        let Verdict::Deadlock { trace, blocked, fill, .. } = run(&crossed(1)) else {
            panic!("no deadlock found")
        };
        let steps: Vec<(usize, usize, StepAction)> =
            trace.iter().map(|s| (s.process, s.channel, s.action)).collect();
        assert_eq!(
            steps,
            [(0, 0, StepAction::Send), (0, 1, StepAction::Send), (1, 1, StepAction::Receive)],
            "s sends to the join and the batch, the batch takes it; nothing else is needed"
        );
        assert_eq!(
            blocked,
            [
                Blocked { process: 0, waiting_to: WaitingTo::Send, channels: vec![0] },
                Blocked { process: 1, waiting_to: WaitingTo::Receive, channels: vec![1] },
                Blocked { process: 2, waiting_to: WaitingTo::Receive, channels: vec![2] },
                Blocked { process: 3, waiting_to: WaitingTo::Receive, channels: vec![3] },
            ],
            "t and u are not blocked: they end"
        );
        assert_eq!(fill, [1, 0, 0, 0, 0]);
        // Room for both messages on the join's second input: free.
        assert!(matches!(run(&crossed(2)), Verdict::Free { .. }));
    }

    #[test]
    fn a_cycle_without_a_message_deadlocks_at_once() {
        let ring = model(&[("a", MAP, 1, 1), ("b", MAP, 1, 1)], &[("a", 0, "b", 0, 1), ("b", 0, "a", 0, 1)]);
        let Verdict::Deadlock { trace, blocked, .. } = run(&ring) else { panic!("no deadlock found") };
        assert!(trace.is_empty());
        assert_eq!(blocked.len(), 2);
        assert!(blocked.iter().all(|b| b.waiting_to == WaitingTo::Receive));
    }

    #[test]
    fn a_feedback_loop_deadlocks_when_its_buffers_fill() {
        // s feeds a merge; the merge feeds f; f sends every message on and back to the merge.
        // Messages in the loop never leave it, and s keeps adding: the loop fills up.
        let feedback = |capacity: u16, count: u16| {
            model(
                &[
                    ("s", Machine::Source { count, total: Some(u32::from(count)), ports: 1 }, 0, 1),
                    ("merge", MAP, 2, 1),
                    ("f", MAP, 1, 1),
                    ("k", SINK, 1, 0),
                ],
                &[
                    ("s", 0, "merge", 0, 1),
                    ("merge", 0, "f", 0, capacity),
                    ("f", 0, "k", 0, capacity),
                    ("f", 0, "merge", 1, capacity),
                ],
            )
        };
        // The loop holds four: one in each channel, one in each process. Four messages fill
        // it; with room for eight in each channel they circle for ever without a deadlock.
        assert!(matches!(run(&feedback(1, 4)), Verdict::Deadlock { .. }));
        assert!(matches!(run(&feedback(1, 3)), Verdict::Free { .. }));
        assert!(matches!(run(&feedback(8, 4)), Verdict::Free { .. }));
        // Channels of 128 or more: states take two bytes a field, with the same answers.
        assert!(matches!(run(&feedback(200, 4)), Verdict::Free { .. }));
        let mut wide = feedback(1, 4);
        wide.channels[0].capacity = 200;
        assert!(matches!(run(&wide), Verdict::Deadlock { .. }));
    }

    #[test]
    fn the_cspm_script_has_a_process_per_node_and_a_buffer_per_connection() {
        let script = cspm(&crossed(1));
        for line in [
            "datatype Msg = Token",
            "datatype Ch = c0 | c1 | c2 | c3 | c4",
            "CAP(c0) = 1 -- c0: s to j",
            "N0(k) = if k < 2 then SEND(<c0, c1>, N0(k + 1)) else CLOSE(<c0, c1>)",
            "PORT2(0) = {c2}",
            "PORT2(1) = {c0}",
            "NODE(5) = N5({c4})",
            "ALPHA(1) = {| get.c1, eos.c1, gone.c1, put.c2, close.c2 |}",
            "NODES = || i : {0..5} @ [ALPHA(i)] NODE(i)",
            "assert SYSTEM :[deadlock free [F]]",
        ] {
            assert!(script.lines().any(|l| l == line), "no `{line}` in\n{script}");
        }
        assert_eq!(script.matches("NODE(").count(), 6 + 1, "a process per node, and NODES");
        // Every name a node uses is defined.
        for p in 0..6 {
            assert!(script.contains(&format!("\nN{p}(")) || script.contains(&format!("NODE({p}) = CLOSE")));
        }
        // Brackets balance on every line.
        for line in script.lines().filter(|l| !l.starts_with("--")) {
            let code = line.split(" -- ").next().unwrap_or_default();
            for (open, close) in [('(', ')'), ('{', '}')] {
                assert_eq!(code.matches(open).count(), code.matches(close).count(), "{line}");
            }
        }
    }

    /// The machine of every built-in type says what its catalogue entry says: a source reads
    /// nothing, a join reads every input, a component that holds messages collects them, and
    /// each writes as its write mode says.
    #[test]
    fn every_built_in_machine_matches_its_catalogue_behaviour() {
        use crate::{ReadMode, WriteMode};
        for (type_id, spec) in crate::builtins() {
            let outputs: Vec<String> = spec.outputs.iter().map(|p| p.name.clone()).collect();
            let Some(machine) = machine_for(type_id, &serde_json::json!({ "count": 2 }), &outputs, 3) else {
                assert_eq!(type_id, "design.call", "only sub-designs have no machine of their own");
                continue;
            };
            let behaviour = spec.behaviour.expect("built-ins declare their behaviour");
            let agrees = match (behaviour.read, behaviour.write, behaviour.buffers, machine) {
                (ReadMode::None, WriteMode::Many, false, Machine::Source { .. }) => true,
                (ReadMode::All, WriteMode::One, false, Machine::Join { .. }) => true,
                (ReadMode::One | ReadMode::Any, _, true, Machine::Collect { .. }) => true,
                (ReadMode::One | ReadMode::Any, write, false, Machine::Serve { writes }) => matches!(
                    (write, writes),
                    (WriteMode::None, Writes::Nothing)
                        | (WriteMode::One, Writes::Each(_))
                        | (WriteMode::AtMostOne, Writes::OneOrNone(_))
                        | (WriteMode::AtMostOne, Writes::AnyOf(_))
                        | (WriteMode::Many, Writes::UpTo { .. })
                ),
                _ => false,
            };
            assert!(agrees, "{type_id}: {behaviour:?} but {machine:?}");
        }
    }

    #[test]
    fn a_search_over_its_cap_says_so() {
        let many = Machine::Source { count: 60, total: Some(60), ports: 1 };
        let wide = model(
            &[("a", many, 0, 1), ("b", many, 0, 1), ("k", SINK, 2, 0)],
            &[("a", 0, "k", 0, 4), ("b", 0, "k", 1, 4)],
        );
        assert_eq!(check(&wide, 1_000, Duration::from_secs(10)), Verdict::CapReached { states: 1_000 });
        assert!(matches!(run(&wide), Verdict::Free { .. }));
    }
}

//! Structural rules that decide many designs in time linear in their size, before (and often
//! instead of) the search.
//!
//! - **No two paths**: when no two processes are joined by two distinct chains of connections
//!   (the connections, taken without direction, form a forest), no run deadlocks. A deadlock
//!   needs a ring of processes each waiting on the next across a connection, and a process
//!   never waits on the one that waits on it across the same connection (that connection
//!   would have to be both full and empty), so the ring needs a cycle of connections.
//! - **I/O-SEQ** (Welch): a process that, round after round, takes one message from each of
//!   its inputs and then writes one to each of its outputs (a transform, a join, a sink with a
//!   single connection in; a source) is I/O-SEQ. A network of I/O-SEQ processes without a
//!   cycle of connections, every channel holding at least one message, does not deadlock: it
//!   is a Kahn network, so every run does what the round-by-round run in connection order
//!   does, and that one never waits for good.
//! - **Cycles** (each strongly connected set of processes that messages can go round): a
//!   process on a cycle ends only when its inputs close, and those come from the cycle, so
//!   a cycle without a join fed from outside never ends by itself. Then
//!   - if no process on it takes messages from outside (one that reads whichever input is
//!     ready), it never starts: its processes wait for ever on every run (certain);
//!   - if every process on it writes each message it takes to all its outputs (no filter, no
//!     choice), every message that enters stays on the cycle for ever. The cycle holds as many
//!     messages as its channels' capacity plus one per process; once that many have entered,
//!     every process on it waits to send (certain when that many enter on every run, possible
//!     when some runs send that many); fewer circulate for ever and the run never ends. A
//!     process writing two copies back onto the cycle fills it from a single message;
//!   - otherwise every run ends with the cycle waiting for ever once its messages are gone,
//!     or goes round for ever (possible).
//!
//! What the rules leave open, the search decides.

use petgraph::{algo::tarjan_scc, graph::DiGraph};

use super::{Machine, Model, Writes};

/// Messages a channel carries over a run: at least `lo`, at most `hi` (`u64::MAX`: no bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// On every run at least.
    pub lo: u64,
    /// On any run at most.
    pub hi: u64,
}

impl Count {
    const NONE: Self = Self { lo: 0, hi: 0 };
    const UNKNOWN: Self = Self { lo: 0, hi: u64::MAX };

    fn add(self, other: Self) -> Self {
        Self { lo: self.lo.saturating_add(other.lo), hi: self.hi.saturating_add(other.hi) }
    }
}

/// Why the rules call a model deadlock-free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeBecause {
    /// No two processes are joined by two chains of connections.
    NoTwoPaths,
    /// Every process is I/O-SEQ and no connections form a cycle.
    IoSeq,
}

/// What a cycle does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CycleKind {
    /// No process on it takes a message from outside: it never starts.
    Starved,
    /// Every message that enters stays; `enter` of them enter, it `holds` at most.
    Fills {
        /// Messages it holds before every process on it waits to send.
        holds: u64,
        /// Messages that enter it over a run.
        enter: Count,
    },
    /// A process writes more than one copy of a message back onto it: messages multiply.
    Grows {
        /// The process.
        process: usize,
        /// Messages that enter it over a run.
        enter: Count,
    },
    /// Fewer messages enter than it holds, and none leave: they go round for ever.
    Endless {
        /// Messages it holds before every process on it waits to send.
        holds: u64,
        /// Messages that enter it over a run.
        enter: Count,
    },
    /// It never ends by itself (no join on it is fed from outside): once its messages are
    /// gone its processes wait for ever, unless some go round for ever.
    NeverEnds,
}

/// A cycle the rules have something to say about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cycle {
    /// Its processes, in model order.
    pub processes: Vec<usize>,
    /// A channel from one of its processes to another.
    pub channel: usize,
    /// What it does.
    pub kind: CycleKind,
    /// Whether every run deadlocks on it (else some may).
    pub certain: bool,
}

impl Cycle {
    /// Whether a deadlock is possible on it (an endless cycle is not one).
    pub fn deadlocks(&self) -> bool {
        !matches!(self.kind, CycleKind::Endless { .. })
    }
}

/// What the rules decide.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruling {
    /// No run deadlocks, because of this rule.
    pub free: Option<FreeBecause>,
    /// Cycles that can (or do) deadlock or go round for ever.
    pub cycles: Vec<Cycle>,
}

impl Ruling {
    /// Whether the rules decide the model: free, or certain to deadlock.
    pub fn decided(&self) -> bool {
        self.free.is_some() || self.cycles.iter().any(|c| c.certain)
    }
}

/// The rules applied to `model`.
pub fn rules(model: &Model) -> Ruling {
    let live = live_channels(model);
    if no_two_paths(model) {
        return Ruling { free: Some(FreeBecause::NoTwoPaths), cycles: Vec::new() };
    }
    let mut graph = DiGraph::<usize, usize>::with_capacity(model.processes.len(), model.channels.len());
    let nodes: Vec<_> = (0..model.processes.len()).map(|p| graph.add_node(p)).collect();
    for (c, channel) in model.channels.iter().enumerate() {
        if live[c] && channel.from != channel.to {
            graph.add_edge(nodes[channel.from], nodes[channel.to], c);
        }
    }
    // Tarjan's algorithm yields the sets in reverse topological order.
    let mut components = tarjan_scc(&graph);
    components.reverse();
    let mut component_of = vec![0usize; model.processes.len()];
    for (i, component) in components.iter().enumerate() {
        for &n in component {
            component_of[graph[n]] = i;
        }
    }
    let cyclic = components.iter().any(|c| c.len() > 1);
    if !cyclic && live.iter().all(|&l| l) && model.processes.iter().all(io_seq) {
        return Ruling { free: Some(FreeBecause::IoSeq), cycles: Vec::new() };
    }

    // Messages per channel, in topological order; channels out of a cycle are unknown.
    let mut counts = vec![Count::NONE; model.channels.len()];
    let mut cycles = Vec::new();
    for (i, component) in components.iter().enumerate() {
        let members: Vec<usize> = component.iter().map(|&n| graph[n]).collect();
        if members.len() == 1 {
            let p = members[0];
            let out = output_counts(model, p, &counts);
            for (port, channels) in model.processes[p].outputs.iter().enumerate() {
                for &c in channels {
                    counts[c] = if live[c] { out[port] } else { Count::NONE };
                }
            }
            continue;
        }
        let inside = |c: usize| component_of[model.channels[c].from] == i;
        cycles.extend(cycle(model, &members, &live, &counts, &inside));
        for &p in &members {
            for &c in model.processes[p].outputs.iter().flatten() {
                if !inside(c) || component_of[model.channels[c].to] != i {
                    counts[c] = if live[c] { Count::UNKNOWN } else { Count::NONE };
                }
            }
        }
    }
    Ruling { free: None, cycles }
}

/// Per channel, whether its sender ever writes to it (its port is one the sender writes).
fn live_channels(model: &Model) -> Vec<bool> {
    let mut live = vec![false; model.channels.len()];
    for process in &model.processes {
        let mask = process.machine.writes_to();
        for (port, channels) in process.outputs.iter().enumerate() {
            for &c in channels {
                live[c] = port < 32 && mask & (1 << port) != 0;
            }
        }
    }
    live
}

/// Whether the connections, without direction, form a forest.
fn no_two_paths(model: &Model) -> bool {
    let mut parent: Vec<usize> = (0..model.processes.len()).collect();
    fn root(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    for channel in &model.channels {
        let (a, b) = (root(&mut parent, channel.from), root(&mut parent, channel.to));
        if a == b {
            return false;
        }
        parent[a] = b;
    }
    true
}

/// Whether process `p` takes one message from each input and writes one to each output per
/// round.
fn io_seq(p: &super::Process) -> bool {
    let single = p.inputs.iter().all(|port| port.len() == 1);
    match p.machine {
        Machine::Source { .. } => true,
        Machine::Join { .. } => single,
        Machine::Serve { writes: Writes::Each(_) | Writes::Nothing } | Machine::Collect { size: 1, .. } => {
            single && p.inputs.len() == 1
        }
        Machine::Serve { .. } | Machine::Collect { .. } => false,
    }
}

/// What process `p` (not on a cycle) writes to each output port, given what its inputs carry.
fn output_counts(model: &Model, p: usize, counts: &[Count]) -> Vec<Count> {
    let process = &model.processes[p];
    let port_in = |port: &Vec<usize>| port.iter().fold(Count::NONE, |sum, &c| sum.add(counts[c]));
    let total = process.inputs.iter().fold(Count::NONE, |sum, port| sum.add(port_in(port)));
    let written = match process.machine {
        Machine::Source { total: Some(total), .. } => Count { lo: total.into(), hi: total.into() },
        Machine::Source { total: None, .. } => Count::UNKNOWN,
        Machine::Serve { writes: Writes::Each(_) } => total,
        Machine::Serve { writes: Writes::Nothing } => Count::NONE,
        Machine::Serve { writes: Writes::OneOrNone(_) | Writes::AnyOf(_) } => Count { lo: 0, hi: total.hi },
        Machine::Serve { writes: Writes::UpTo { max, .. } } => {
            Count { lo: 0, hi: total.hi.saturating_mul(u64::from(max)) }
        }
        Machine::Join { .. } => {
            let ports = process.inputs.iter().map(port_in);
            Count {
                lo: ports.clone().map(|c| c.lo).min().unwrap_or(0),
                hi: ports.map(|c| c.hi).min().unwrap_or(0),
            }
        }
        Machine::Collect { size: 0, .. } => Count { lo: total.lo.min(1), hi: total.hi.min(1) },
        Machine::Collect { size, .. } => {
            let batches = |n: u64| if n == u64::MAX { n } else { n.div_ceil(u64::from(size)) };
            Count { lo: batches(total.lo), hi: batches(total.hi) }
        }
    };
    let mask = process.machine.writes_to();
    (0..process.outputs.len())
        .map(|port| if port < 32 && mask & (1 << port) != 0 { written } else { Count::NONE })
        .collect()
}

/// What a cycle of `members` does; `None` when a join on it is fed from outside (it can end:
/// the search decides).
fn cycle(
    model: &Model,
    members: &[usize],
    live: &[bool],
    counts: &[Count],
    inside: &dyn Fn(usize) -> bool,
) -> Option<Cycle> {
    let mut processes = members.to_vec();
    processes.sort_unstable();
    let on_cycle = |c: usize| inside(c) && members.contains(&model.channels[c].to);
    let channel = processes
        .iter()
        .flat_map(|&p| model.processes[p].outputs.iter().flatten().copied())
        .find(|&c| live[c] && on_cycle(c))
        .unwrap_or_default();
    let cycle = |kind, certain| Some(Cycle { processes: processes.clone(), channel, kind, certain });

    // Messages entering: over channels from outside into a process that reads whichever input
    // is ready. A join on the cycle fed from outside can end it; then the search decides.
    let mut enter = Count::NONE;
    let mut ends = false;
    for &p in members {
        let process = &model.processes[p];
        match process.machine {
            Machine::Join { .. } => {
                ends |= process.inputs.iter().any(|port| port.iter().all(|&c| !on_cycle(c)));
            }
            _ => {
                for &c in process.inputs.iter().flatten().filter(|&&c| !on_cycle(c) && live[c]) {
                    enter = enter.add(counts[c]);
                }
            }
        }
    }
    if ends {
        return None;
    }
    if enter.hi == 0 {
        return cycle(CycleKind::Starved, true);
    }
    // Every message taken is written to every output (at least one of which is on the cycle).
    let keeps = members
        .iter()
        .all(|&p| matches!(model.processes[p].machine, Machine::Serve { writes: Writes::Each(_) }));
    if !keeps {
        return cycle(CycleKind::NeverEnds, false);
    }
    let grows = members.iter().copied().find(|&p| {
        model.processes[p].outputs.iter().flatten().filter(|&&c| live[c] && on_cycle(c)).count() > 1
    });
    if let Some(process) = grows {
        return cycle(CycleKind::Grows { process, enter }, enter.lo > 0);
    }
    let holds: u64 = processes
        .iter()
        .flat_map(|&p| model.processes[p].outputs.iter().flatten().copied())
        .filter(|&c| on_cycle(c))
        .map(|c| u64::from(model.channels[c].capacity))
        .sum::<u64>()
        + processes.len() as u64;
    if enter.hi >= holds {
        cycle(CycleKind::Fills { holds, enter }, enter.lo >= holds)
    } else {
        cycle(CycleKind::Endless { holds, enter }, false)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::deadlock::{Channel, Process, Verdict, check};

    /// A model from machines with `(inputs, outputs)` port counts and `(from, port, to, port,
    /// capacity)` connections.
    fn model(nodes: &[(Machine, usize, usize)], connections: &[(usize, usize, usize, usize, u16)]) -> Model {
        let mut processes: Vec<Process> = nodes
            .iter()
            .enumerate()
            .map(|(i, (machine, inputs, outputs))| Process {
                node_id: format!("n{i}"),
                machine: *machine,
                inputs: vec![Vec::new(); *inputs],
                outputs: vec![Vec::new(); *outputs],
                assumed: false,
            })
            .collect();
        let mut channels = Vec::new();
        for (c, &(from, out, to, input, capacity)) in connections.iter().enumerate() {
            processes[from].outputs[out].push(c);
            processes[to].inputs[input].push(c);
            channels.push(Channel { connection_id: format!("c{c}"), from, to, capacity });
        }
        Model { processes, channels }
    }

    const fn source(count: u16) -> Machine {
        Machine::Source { count, total: Some(count as u32), ports: 1 }
    }
    const MAP: Machine = Machine::Serve { writes: Writes::Each(1) };
    const SINK: Machine = Machine::Serve { writes: Writes::Nothing };
    const FILTER: Machine = Machine::Serve { writes: Writes::OneOrNone(1) };
    const JOIN: Machine = Machine::Join { ports: 1 };

    fn verdict(model: &Model) -> Verdict {
        check(model, 2_000_000, Duration::from_secs(20))
    }

    #[test]
    fn trees_of_connections_never_deadlock() {
        // Fan-out to a filter and a map, each to a sink: no two paths between any two nodes.
        let tree = model(
            &[(source(3), 0, 1), (FILTER, 1, 1), (MAP, 1, 1), (SINK, 1, 0), (SINK, 1, 0)],
            &[(0, 0, 1, 0, 1), (0, 0, 2, 0, 1), (1, 0, 3, 0, 1), (2, 0, 4, 0, 1)],
        );
        assert_eq!(rules(&tree).free, Some(FreeBecause::NoTwoPaths));
        assert!(matches!(verdict(&tree), Verdict::Free { .. }));
    }

    #[test]
    fn io_seq_networks_without_cycles_never_deadlock() {
        // Two paths from the source to the join, one through a map; the join reads the direct
        // one first.
        let diamond = model(
            &[(source(3), 0, 1), (MAP, 1, 1), (JOIN, 2, 1), (SINK, 1, 0)],
            &[(0, 0, 2, 0, 1), (0, 0, 1, 0, 1), (1, 0, 2, 1, 1), (2, 0, 3, 0, 1)],
        );
        assert_eq!(rules(&diamond).free, Some(FreeBecause::IoSeq));
        assert!(matches!(verdict(&diamond), Verdict::Free { .. }));
        // A filter on one path breaks the rule (and here a deadlock is possible).
        let filtered = model(
            &[(source(3), 0, 1), (FILTER, 1, 1), (JOIN, 2, 1), (SINK, 1, 0)],
            &[(0, 0, 2, 1, 1), (0, 0, 1, 0, 1), (1, 0, 2, 0, 1), (2, 0, 3, 0, 1)],
        );
        assert_eq!(rules(&filtered), Ruling::default());
        assert!(matches!(verdict(&filtered), Verdict::Deadlock { .. }));
    }

    #[test]
    fn cycles_are_judged_by_what_enters_and_what_they_hold() {
        // A ring of two maps: nothing ever enters.
        let ring = model(&[(MAP, 1, 1), (MAP, 1, 1)], &[(0, 0, 1, 0, 1), (1, 0, 0, 0, 1)]);
        let ruling = rules(&ring);
        assert_eq!(ruling.cycles[0].kind, CycleKind::Starved);
        assert!(ruling.cycles[0].certain && ruling.decided());

        // s → merge → f → merge, f also to a sink: every message stays on the loop, which holds
        // one per channel and one per process.
        let feedback = |count: u16, capacity: u16| {
            model(
                &[(source(count), 0, 1), (MAP, 2, 1), (MAP, 1, 1), (SINK, 1, 0)],
                &[(0, 0, 1, 0, 1), (1, 0, 2, 0, capacity), (2, 0, 3, 0, capacity), (2, 0, 1, 1, capacity)],
            )
        };
        let full = rules(&feedback(4, 1));
        let enter = Count { lo: 4, hi: 4 };
        assert_eq!(full.cycles[0].kind, CycleKind::Fills { holds: 4, enter });
        assert!(full.cycles[0].certain);
        assert!(matches!(verdict(&feedback(4, 1)), Verdict::Deadlock { .. }));
        let endless = rules(&feedback(3, 1));
        assert_eq!(endless.cycles[0].kind, CycleKind::Endless { holds: 4, enter: Count { lo: 3, hi: 3 } });
        assert!(!endless.decided());
        assert!(matches!(verdict(&feedback(3, 1)), Verdict::Free { .. }));

        // A split writing two copies back: one message is enough.
        let split = Machine::Serve { writes: Writes::Each(0b11) };
        let grows = model(
            &[(source(1), 0, 1), (MAP, 2, 1), (split, 1, 2)],
            &[(0, 0, 1, 0, 1), (1, 0, 2, 0, 2), (2, 0, 1, 1, 2), (2, 1, 1, 1, 2)],
        );
        let ruling = rules(&grows);
        assert_eq!(ruling.cycles[0].kind, CycleKind::Grows { process: 2, enter: Count { lo: 1, hi: 1 } });
        assert!(ruling.cycles[0].certain);
        assert!(matches!(verdict(&grows), Verdict::Deadlock { .. }));

        // A filter on the loop: its messages may leave, the loop still never ends.
        let leaking = model(
            &[(source(2), 0, 1), (MAP, 2, 1), (FILTER, 1, 1)],
            &[(0, 0, 1, 0, 1), (1, 0, 2, 0, 1), (2, 0, 1, 1, 1)],
        );
        let ruling = rules(&leaking);
        assert_eq!(ruling.cycles[0].kind, CycleKind::NeverEnds);
        assert!(!ruling.cycles[0].certain);
        assert!(matches!(verdict(&leaking), Verdict::Deadlock { .. }));

        // A join on the loop fed from outside can end it: the search decides.
        let joined = model(
            &[(source(2), 0, 1), (JOIN, 2, 1), (MAP, 1, 1)],
            &[(0, 0, 1, 0, 1), (1, 0, 2, 0, 1), (2, 0, 1, 1, 1)],
        );
        assert_eq!(rules(&joined), Ruling::default());
    }

    /// A small generator of random numbers (xorshift), so the test needs no seed from outside.
    struct Random(u64);

    impl Random {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// Random small models, every rule's answer checked against the search's: a model the
    /// rules call free has no reachable deadlock, one with a certain deadlock has one.
    #[test]
    fn the_rules_agree_with_the_search() {
        let mut random = Random(0x5eed_cafe_f00d);
        let (mut free, mut certain, mut decided_by_search) = (0, 0, 0);
        for _ in 0..4_000 {
            let n = 2 + random.below(5);
            let nodes: Vec<(Machine, usize, usize)> = (0..n)
                .map(|i| match (i, random.below(11)) {
                    (0, _) | (_, 0) => (
                        {
                            let count = 1 + random.below(4) as u16;
                            Machine::Source { count, total: Some(u32::from(count)), ports: 1 }
                        },
                        0,
                        1,
                    ),
                    (_, 1) => (JOIN, 2, 1),
                    (_, 2) => (FILTER, 1, 1),
                    (_, 3) => (Machine::Collect { size: 2, ports: 1 }, 1, 1),
                    (_, 4) => (Machine::Serve { writes: Writes::OneOrNone(0b11) }, 1, 2),
                    (_, 5) => (SINK, 1, 0),
                    // An `error` port it never writes to.
                    (_, 6) => (MAP, 1, 2),
                    (_, 7) => (Machine::Serve { writes: Writes::AnyOf(0b11) }, 1, 2),
                    _ => (MAP, 1, 1),
                })
                .collect();
            let mut connections = Vec::new();
            for _ in 0..n + random.below(n) {
                let (from, to) = (random.below(n), random.below(n));
                let (outputs, inputs) = (nodes[from].2, nodes[to].1);
                if from == to || outputs == 0 || inputs == 0 {
                    continue;
                }
                connections.push((from, random.below(outputs), to, random.below(inputs), 1));
            }
            let model = model(&nodes, &connections);
            let ruling = rules(&model);
            let verdict = verdict(&model);
            if ruling.free.is_some() {
                free += 1;
                assert!(matches!(verdict, Verdict::Free { .. }), "{ruling:?} but {verdict:?} in {model:#?}");
            }
            if ruling.cycles.iter().any(|c| c.certain) {
                certain += 1;
                assert!(
                    matches!(verdict, Verdict::Deadlock { .. }),
                    "{ruling:?} but {verdict:?} in {model:#?}"
                );
            }
            if !ruling.decided() {
                decided_by_search += 1;
            }
        }
        assert!(
            free > 300 && certain > 100 && decided_by_search > 300,
            "{free} {certain} {decided_by_search}"
        );
    }
}

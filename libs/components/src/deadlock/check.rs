//! The search: breadth first over the states of a [`Model`].
//!
//! A state is one flat array of small numbers: per process its phase and counters, per channel
//! how many messages it holds and whether its sender has closed it. Steps that only change a
//! process's own state (starting a write, ending after the last input, closing outputs) are
//! taken at once after every communication — they commute with everything else, so the states
//! in between need not be visited. Only sends and receives are steps of the search, and of a
//! trace.
//!
//! That is the search's partial-order reduction: a local step is independent of every other
//! step and cannot be disabled, so taking it alone (a persistent set of one) keeps every
//! deadlock and every trace length. Communications are not reduced further: a partial
//! deadlock can sit beside processes that go round for ever, and persistent sets of
//! communications would need the cycle proviso to keep those, and could lengthen the trace
//! that breadth-first order makes the shortest.
//!
//! States are stored once, encoded, one after another in chunks that never move (a byte per
//! field where every field fits, as in most designs; else two), and found again through a
//! table of their hashes and indices, so growing the table never reads the states.

use std::{
    hash::{Hash as _, Hasher as _},
    time::{Duration, Instant},
};

use hashbrown::HashTable;
use rustc_hash::FxHasher;

use super::{Machine, Model, Writes, port_sets};

/// Fields per process in a state.
const PROCESS: usize = 5;
/// The closed flag of a channel's field.
const CLOSED: u16 = 1 << 15;
/// A write to every port of the mask (rather than to one chosen port).
const ALL_PORTS: u16 = u16::MAX;

/// Steps a deadlock's run is followed past the deadlock, to see who else ends up blocked.
const CONTINUE_AT_MOST: usize = 100_000;

/// Phases of a process.
const READY: u16 = 0;
const WRITING: u16 = 1;
const FINAL_WRITE: u16 = 2;
const ENDED: u16 = 3;

/// One communication of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// The process that acted.
    pub process: usize,
    /// The channel.
    pub channel: usize,
    /// Sent into it or received from it.
    pub action: StepAction,
}

/// What a [`Step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepAction {
    /// A message into the channel.
    Send,
    /// A message out of the channel.
    Receive,
}

/// What a blocked process waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitingTo {
    /// Room in a full channel.
    Send,
    /// A message in one of several empty channels.
    Receive,
}

/// A process stuck in a deadlock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The process.
    pub process: usize,
    /// What it waits for.
    pub waiting_to: WaitingTo,
    /// On which channels.
    pub channels: Vec<usize>,
}

/// The outcome of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every reachable state can move on or has every process ended.
    Free {
        /// Distinct states explored.
        states: u64,
    },
    /// A reachable state where the blocked processes wait forever.
    Deadlock {
        /// Distinct states explored.
        states: u64,
        /// The shortest sequence of communications after which some processes can never move
        /// again.
        trace: Vec<Step>,
        /// The processes blocked for good once the others have gone on as far as they can
        /// (those others have ended).
        blocked: Vec<Blocked>,
        /// How many messages each channel holds then.
        fill: Vec<u16>,
    },
    /// The search stopped at its state or time cap without an answer.
    CapReached {
        /// Distinct states explored.
        states: u64,
    },
}

/// Explores `model` up to `max_states` distinct states and `max_time`.
pub fn check(model: &Model, max_states: u64, max_time: Duration) -> Verdict {
    Search::new(model).run(max_states, max_time)
}

struct Search<'m> {
    model: &'m Model,
    width: usize,
    /// Per process, the channels of a write: `[0]` to every port of its mask, `[1 + i]` to
    /// port `i` alone.
    writes: Vec<Vec<Vec<usize>>>,
    /// Per process, the channels it reads: `[0]` every input; for a join, `[1 + i]` port `i`.
    reads: Vec<Vec<Vec<usize>>>,
    /// Per process, the ways it can write after taking a message.
    branches: Vec<usize>,
    /// Per process that writes to one port of its choice, those ports.
    choices: Vec<Vec<u16>>,
}

/// Buffers reused from state to state.
#[derive(Default)]
struct Scratch {
    /// Successor states, one after another.
    states: Vec<u16>,
    /// The communication leading to each.
    steps: Vec<Step>,
    /// Processes left to settle.
    pending: Vec<usize>,
    /// Per process, whether it is stuck.
    stuck: Vec<bool>,
}

/// States one after another, encoded, in chunks that are never moved or copied as more come.
/// A state whose every field fits takes a byte per field (most designs: capacities under
/// 128, counts under 256), else two.
struct Arena {
    /// Bytes per state.
    size: usize,
    /// Whether a field takes one byte.
    narrow: bool,
    /// The first channel field (the ones before are processes').
    channels_at: usize,
    chunks: Vec<Vec<u8>>,
}

impl Arena {
    /// States per chunk.
    const CHUNK: usize = 1 << 14;

    fn new(width: usize, channels_at: usize, narrow: bool) -> Self {
        Self { size: if narrow { width } else { 2 * width }, narrow, channels_at, chunks: Vec::new() }
    }

    /// `state` encoded into `out`.
    fn encode(&self, state: &[u16], out: &mut Vec<u8>) {
        out.clear();
        if !self.narrow {
            out.extend(state.iter().flat_map(|v| v.to_le_bytes()));
            return;
        }
        let (processes, channels) = state.split_at(self.channels_at);
        out.extend(processes.iter().map(|&v| if v == ALL_PORTS { u8::MAX } else { v as u8 }));
        out.extend(channels.iter().map(|&v| ((v & !CLOSED) as u8) | if v & CLOSED != 0 { 0x80 } else { 0 }));
    }

    /// The state at `index`, decoded into `out`.
    fn decode(&self, index: u32, out: &mut [u16]) {
        let bytes = self.get(index);
        if !self.narrow {
            for (v, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *v = u16::from_le_bytes([pair[0], pair[1]]);
            }
            return;
        }
        for (i, (v, &b)) in out.iter_mut().zip(bytes).enumerate() {
            *v = if i >= self.channels_at {
                u16::from(b & 0x7f) | if b & 0x80 != 0 { CLOSED } else { 0 }
            } else if b == u8::MAX {
                ALL_PORTS
            } else {
                u16::from(b)
            };
        }
    }

    fn push(&mut self, encoded: &[u8]) {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() + self.size <= chunk.capacity() => chunk.extend_from_slice(encoded),
            _ => {
                let mut chunk = Vec::with_capacity(Self::CHUNK * self.size);
                chunk.extend_from_slice(encoded);
                self.chunks.push(chunk);
            }
        }
    }

    fn get(&self, index: u32) -> &[u8] {
        let (chunk, at) = (index as usize / Self::CHUNK, index as usize % Self::CHUNK);
        &self.chunks[chunk][at * self.size..(at + 1) * self.size]
    }
}

/// A [`Step`] in eight bytes (the channel's top bit: a receive), or none.
#[derive(Debug, Clone, Copy)]
struct Packed {
    process: u32,
    channel: u32,
}

impl Packed {
    const NONE: Self = Self { process: u32::MAX, channel: 0 };
    const RECEIVE: u32 = 1 << 31;

    fn of(step: Step) -> Self {
        let action = match step.action {
            StepAction::Send => 0,
            StepAction::Receive => Self::RECEIVE,
        };
        Self { process: step.process as u32, channel: step.channel as u32 | action }
    }

    fn step(self) -> Option<Step> {
        (self.process != u32::MAX).then_some(Step {
            process: self.process as usize,
            channel: (self.channel & !Self::RECEIVE) as usize,
            action: if self.channel & Self::RECEIVE != 0 { StepAction::Receive } else { StepAction::Send },
        })
    }
}

/// A state's hash.
fn hash(state: &[u8]) -> u64 {
    let mut hasher = FxHasher::default();
    state.hash(&mut hasher);
    hasher.finish()
}

impl<'m> Search<'m> {
    fn new(model: &'m Model) -> Self {
        let writes = model
            .processes
            .iter()
            .map(|process| {
                let mask = process.machine.writes_to();
                let all = process
                    .outputs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i < 32 && mask & (1 << i) != 0)
                    .flat_map(|(_, channels)| channels.iter().copied())
                    .collect();
                // To every port, to each one, then (for a choice of sets) to each set.
                let mut writes: Vec<Vec<usize>> =
                    std::iter::once(all).chain(process.outputs.iter().cloned()).collect();
                if let Machine::Serve { writes: Writes::AnyOf(mask) } = process.machine {
                    for set in port_sets(mask, process.outputs.len()) {
                        writes.push(
                            set.iter().flat_map(|&port| process.outputs[port].iter().copied()).collect(),
                        );
                    }
                }
                writes
            })
            .collect();
        let reads = model
            .processes
            .iter()
            .map(|process| {
                let all = process.inputs.iter().flatten().copied().collect();
                std::iter::once(all).chain(process.inputs.iter().cloned()).collect()
            })
            .collect();
        let choices: Vec<Vec<u16>> = model
            .processes
            .iter()
            .map(|process| match process.machine {
                Machine::Serve { writes: Writes::OneOrNone(mask) } => (0..process.outputs.len().min(32))
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| i as u16)
                    .collect(),
                // The sets follow the ports in the write lists.
                Machine::Serve { writes: Writes::AnyOf(mask) } => (0..port_sets(mask, process.outputs.len())
                    .len())
                    .map(|i| (process.outputs.len() + i) as u16)
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        let branches = model
            .processes
            .iter()
            .zip(&choices)
            .map(|(process, choices)| match process.machine {
                Machine::Serve { writes: Writes::OneOrNone(_) | Writes::AnyOf(_) } => 1 + choices.len(),
                Machine::Serve { writes: Writes::UpTo { max, .. } } => 1 + usize::from(max),
                _ => 1,
            })
            .collect();
        Self {
            model,
            width: model.processes.len() * PROCESS + model.channels.len(),
            writes,
            reads,
            branches,
            choices,
        }
    }

    fn run(&self, max_states: u64, max_time: Duration) -> Verdict {
        let started = Instant::now();
        let width = self.width;
        let mut scratch = Scratch::default();
        let mut initial = vec![0u16; width];
        self.settle(&mut initial, &mut scratch.pending);
        // Every state found, in the order found (breadth first: the queue is the tail of
        // this list), in chunks that never move; the table holds each one's hash and index.
        let mut arena = Arena::new(width, self.model.processes.len() * PROCESS, self.narrow());
        let mut encoded = Vec::with_capacity(2 * width);
        arena.encode(&initial, &mut encoded);
        arena.push(&encoded);
        let mut table: HashTable<(u64, u32)> = HashTable::new();
        table.insert_unique(hash(&encoded), (hash(&encoded), 0), |&(h, _)| h);
        // Per state: the state it was reached from and the step.
        let mut parents: Vec<(u32, Packed)> = vec![(0, Packed::NONE)];
        let mut state = vec![0u16; width];
        let mut at = 0u32;
        while (at as usize) < parents.len() {
            if (at & 0xfff) == 0 && started.elapsed() > max_time {
                return Verdict::CapReached { states: parents.len() as u64 };
            }
            arena.decode(at, &mut state);
            self.moves(&state, &mut scratch);
            if self.mark_stuck(&state, &scratch.steps, &mut scratch.stuck) {
                let mut trace = Vec::new();
                let mut cursor = at;
                while let (parent, Some(step)) =
                    (parents[cursor as usize].0, parents[cursor as usize].1.step())
                {
                    trace.push(step);
                    cursor = parent;
                }
                trace.reverse();
                // The stuck stay stuck; the rest go on until nothing can move (or, if some
                // go on for ever, for a while): who is blocked then, and how full the
                // channels are.
                let mut last = state.clone();
                let mut steps = 0;
                while !scratch.steps.is_empty() {
                    let k = scratch.steps.len() - 1;
                    last.copy_from_slice(&scratch.states[k * width..(k + 1) * width]);
                    steps += 1;
                    if steps > CONTINUE_AT_MOST {
                        break;
                    }
                    self.moves(&last, &mut scratch);
                }
                let blocked = if scratch.steps.is_empty() {
                    (0..self.model.processes.len()).filter(|&p| !self.ended(&last, p)).collect()
                } else {
                    self.stuck(&last, &scratch.steps)
                };
                return Verdict::Deadlock {
                    states: parents.len() as u64,
                    trace,
                    blocked: self.blocked(&last, &blocked),
                    fill: (0..self.model.channels.len()).map(|c| self.count(&last, c)).collect(),
                };
            }
            for (k, &step) in scratch.steps.iter().enumerate() {
                let next = &scratch.states[k * width..(k + 1) * width];
                arena.encode(next, &mut encoded);
                let h = hash(&encoded);
                if table.find(h, |&(eh, i)| eh == h && arena.get(i) == encoded.as_slice()).is_some() {
                    continue;
                }
                if parents.len() as u64 >= max_states {
                    return Verdict::CapReached { states: parents.len() as u64 };
                }
                let index = parents.len() as u32;
                arena.push(&encoded);
                table.insert_unique(h, (h, index), |&(h, _)| h);
                parents.push((at, Packed::of(step)));
            }
            at += 1;
        }
        Verdict::Free { states: parents.len() as u64 }
    }

    /// Whether every field of every state fits a byte: channel counts under 128 (the top bit
    /// is the closed flag), process fields under 255 (255 is "every port").
    fn narrow(&self) -> bool {
        let channels = self.model.channels.iter().all(|c| c.capacity < 0x80);
        let processes = self.model.processes.iter().enumerate().all(|(p, process)| {
            let counter = match process.machine {
                Machine::Source { count, .. } => count,
                Machine::Collect { size, .. } => size,
                Machine::Join { .. } => process.inputs.len() as u16,
                Machine::Serve { writes: Writes::UpTo { max, .. } } => u16::from(max),
                Machine::Serve { .. } => 0,
            };
            let writes = self.writes[p].iter().map(Vec::len).max().unwrap_or(0);
            counter < 0xff && writes < 0xff && process.outputs.len() < 0xff
        });
        channels && processes
    }

    fn channel_field(&self, channel: usize) -> usize {
        self.model.processes.len() * PROCESS + channel
    }

    fn count(&self, state: &[u16], channel: usize) -> u16 {
        state[self.channel_field(channel)] & !CLOSED
    }

    fn closed(&self, state: &[u16], channel: usize) -> bool {
        state[self.channel_field(channel)] & CLOSED != 0
    }

    fn ended(&self, state: &[u16], process: usize) -> bool {
        state[process * PROCESS] == ENDED
    }

    /// The processes of `state` that can never move again: each cannot move now, and every
    /// process that could let it (the receiver of the full channel it sends on, the senders of
    /// the empty channels it reads) is one of them. The greatest such set: start from every
    /// process that cannot move and drop those waiting on someone outside, until none is.
    fn stuck(&self, state: &[u16], moves: &[Step]) -> Vec<usize> {
        let mut stuck = Vec::new();
        self.mark_stuck(state, moves, &mut stuck);
        (0..stuck.len()).filter(|&p| stuck[p]).collect()
    }

    /// [`Self::stuck`] as flags in `stuck`; whether any is.
    fn mark_stuck(&self, state: &[u16], moves: &[Step], stuck: &mut Vec<bool>) -> bool {
        let n = self.model.processes.len();
        stuck.clear();
        stuck.extend((0..n).map(|p| !self.ended(state, p)));
        for step in moves {
            stuck[step.process] = false;
        }
        if !stuck.contains(&true) {
            return false;
        }
        loop {
            let mut changed = false;
            for p in 0..n {
                if stuck[p] && !self.waits_only_on(state, p, stuck) {
                    stuck[p] = false;
                    changed = true;
                }
            }
            if !changed {
                return stuck.contains(&true);
            }
        }
    }

    /// Whether every process `p` waits on in `state` is marked in `stuck`.
    fn waits_only_on(&self, state: &[u16], p: usize, stuck: &[bool]) -> bool {
        let base = p * PROCESS;
        if matches!(state[base], WRITING | FINAL_WRITE) {
            let channels = self.write_channels(p, state[base + 2]);
            channels.get(usize::from(state[base + 1])).is_none_or(|&c| stuck[self.model.channels[c].to])
        } else {
            self.reading(state, p)
                .iter()
                .filter(|&&c| !(self.closed(state, c) && self.count(state, c) == 0))
                .all(|&c| stuck[self.model.channels[c].from])
        }
    }

    /// What process `p` waits for in `state`: to send on its next channel, or to receive from
    /// the inputs it reads that are not exhausted.
    fn waiting(&self, state: &[u16], p: usize) -> (WaitingTo, Vec<usize>) {
        let base = p * PROCESS;
        if matches!(state[base], WRITING | FINAL_WRITE) {
            let channels = self.write_channels(p, state[base + 2]);
            (WaitingTo::Send, channels.get(usize::from(state[base + 1])).copied().into_iter().collect())
        } else {
            let channels = self
                .reading(state, p)
                .iter()
                .copied()
                .filter(|&c| !(self.closed(state, c) && self.count(state, c) == 0))
                .collect();
            (WaitingTo::Receive, channels)
        }
    }

    /// The channels a write of process `p` goes to, in order: every port of its mask, or the
    /// one chosen port.
    fn write_channels(&self, p: usize, port: u16) -> &[usize] {
        let index = if port == ALL_PORTS { 0 } else { 1 + usize::from(port) };
        self.writes[p].get(index).map_or(&[], Vec::as_slice)
    }

    /// The inputs process `p` reads from now.
    fn reading(&self, state: &[u16], p: usize) -> &[usize] {
        let index = match self.model.processes[p].machine {
            Machine::Join { .. } => 1 + usize::from(state[p * PROCESS + 4]),
            _ => 0,
        };
        self.reads[p].get(index).map_or(&[], Vec::as_slice)
    }

    /// Takes every step that changes only process-local state (and closes channels), until
    /// none is left.
    fn settle(&self, state: &mut [u16], pending: &mut Vec<usize>) {
        pending.clear();
        pending.extend(0..self.model.processes.len());
        self.settle_pending(state, pending);
    }

    /// [`Self::settle`], starting from the processes in `pending` (those a communication
    /// touched): a process that ends wakes the receivers of its outputs (they may end too) and
    /// the senders of its inputs (their messages are now dropped).
    fn settle_from(&self, state: &mut [u16], pending: &mut Vec<usize>, touched: [usize; 2]) {
        pending.clear();
        pending.extend_from_slice(&touched);
        self.settle_pending(state, pending);
    }

    fn settle_pending(&self, state: &mut [u16], pending: &mut Vec<usize>) {
        while let Some(p) = pending.pop() {
            if !self.settle_one(state, p) {
                continue;
            }
            pending.push(p);
            if self.ended(state, p) {
                let process = &self.model.processes[p];
                pending.extend(process.outputs.iter().flatten().map(|&c| self.model.channels[c].to));
                pending.extend(process.inputs.iter().flatten().map(|&c| self.model.channels[c].from));
            }
        }
    }

    fn settle_one(&self, state: &mut [u16], p: usize) -> bool {
        let base = p * PROCESS;
        let machine = self.model.processes[p].machine;
        match state[base] {
            READY => match machine {
                Machine::Source { count, .. } => {
                    if state[base + 4] < count {
                        state[base + 4] += 1;
                        self.start_write(state, p, ALL_PORTS, 1, WRITING);
                    } else {
                        self.end(state, p);
                    }
                    true
                }
                _ => {
                    let inputs = self.reading(state, p);
                    let exhausted =
                        inputs.iter().all(|&c| self.closed(state, c) && self.count(state, c) == 0);
                    if !exhausted {
                        return false;
                    }
                    match machine {
                        Machine::Collect { .. } if state[base + 4] > 0 => {
                            state[base + 4] = 0;
                            self.start_write(state, p, ALL_PORTS, 1, FINAL_WRITE);
                        }
                        _ => self.end(state, p),
                    }
                    true
                }
            },
            WRITING | FINAL_WRITE => {
                let channels = self.write_channels(p, state[base + 2]);
                let pos = usize::from(state[base + 1]);
                if let Some(&c) = channels.get(pos) {
                    // A channel whose receiver has ended takes and drops the message.
                    if self.ended(state, self.model.channels[c].to) {
                        state[base + 1] += 1;
                        return true;
                    }
                    return false;
                }
                // One message written everywhere it goes.
                let left = state[base + 3].saturating_sub(1);
                if left > 0 {
                    state[base + 1] = 0;
                    state[base + 3] = left;
                } else if state[base] == FINAL_WRITE {
                    self.end(state, p);
                } else {
                    state[base..base + 4].copy_from_slice(&[READY, 0, 0, 0]);
                }
                true
            }
            _ => false,
        }
    }

    fn start_write(&self, state: &mut [u16], p: usize, port: u16, messages: u16, phase: u16) {
        let base = p * PROCESS;
        state[base..base + 4].copy_from_slice(&[phase, 0, port, messages]);
    }

    fn end(&self, state: &mut [u16], p: usize) {
        let base = p * PROCESS;
        state[base..base + 5].copy_from_slice(&[ENDED, 0, 0, 0, 0]);
        for &c in self.model.processes[p].outputs.iter().flatten() {
            let field = self.channel_field(c);
            state[field] |= CLOSED;
        }
    }

    /// Every communication enabled in `state`, with the state it leads to (settled), into
    /// `scratch` (`states` one after another, `steps` the communication of each).
    fn moves(&self, state: &[u16], scratch: &mut Scratch) {
        let Scratch { states: out, steps, pending, .. } = scratch;
        out.clear();
        steps.clear();
        for (p, process) in self.model.processes.iter().enumerate() {
            let base = p * PROCESS;
            match state[base] {
                WRITING | FINAL_WRITE => {
                    let channels = self.write_channels(p, state[base + 2]);
                    let Some(&c) = channels.get(usize::from(state[base + 1])) else { continue };
                    if self.count(state, c) < self.model.channels[c].capacity {
                        let start = out.len();
                        out.extend_from_slice(state);
                        let next = &mut out[start..];
                        next[self.channel_field(c)] += 1;
                        next[base + 1] += 1;
                        self.settle_from(next, pending, [p, self.model.channels[c].to]);
                        steps.push(Step { process: p, channel: c, action: StepAction::Send });
                    }
                }
                READY if !matches!(process.machine, Machine::Source { .. }) => {
                    for &c in self.reading(state, p) {
                        if self.count(state, c) == 0 {
                            continue;
                        }
                        let step = Step { process: p, channel: c, action: StepAction::Receive };
                        for branch in 0..self.branches[p] {
                            let start = out.len();
                            out.extend_from_slice(state);
                            let next = &mut out[start..];
                            next[self.channel_field(c)] -= 1;
                            self.after_receive(next, p, branch);
                            self.settle_from(next, pending, [p, self.model.channels[c].from]);
                            steps.push(step);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// What a process does after taking a message: `branch` says which of the ways it can
    /// write (several where what it writes depends on the message: none, or one per port,
    /// or 1 to `max` messages).
    fn after_receive(&self, state: &mut [u16], p: usize, branch: usize) {
        let base = p * PROCESS;
        let process = &self.model.processes[p];
        match process.machine {
            Machine::Source { .. } | Machine::Serve { writes: Writes::Nothing } => {}
            Machine::Join { .. } => {
                let next = state[base + 4] + 1;
                if usize::from(next) >= process.inputs.len() {
                    state[base + 4] = 0;
                    self.start_write(state, p, ALL_PORTS, 1, WRITING);
                } else {
                    state[base + 4] = next;
                }
            }
            Machine::Collect { size, .. } => {
                let held = state[base + 4] + 1;
                if size > 0 && held >= size {
                    state[base + 4] = 0;
                    self.start_write(state, p, ALL_PORTS, 1, WRITING);
                } else {
                    // Holding everything until the end, only whether it holds any matters.
                    state[base + 4] = if size == 0 { 1 } else { held };
                }
            }
            Machine::Serve { writes: Writes::Each(_) } => self.start_write(state, p, ALL_PORTS, 1, WRITING),
            Machine::Serve { writes: Writes::OneOrNone(_) | Writes::AnyOf(_) } => {
                if branch > 0 {
                    self.start_write(state, p, self.choices[p][branch - 1], 1, WRITING);
                }
            }
            Machine::Serve { writes: Writes::UpTo { .. } } => {
                if branch > 0 {
                    self.start_write(state, p, ALL_PORTS, branch as u16, WRITING);
                }
            }
        }
    }

    /// What each stuck process waits for.
    fn blocked(&self, state: &[u16], stuck: &[usize]) -> Vec<Blocked> {
        stuck
            .iter()
            .map(|&p| {
                let (waiting_to, channels) = self.waiting(state, p);
                Blocked { process: p, waiting_to, channels }
            })
            .collect()
    }
}

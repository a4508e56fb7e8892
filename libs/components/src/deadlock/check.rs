//! The search: breadth first over the states of a [`Model`].
//!
//! A state is one flat array of small numbers: per process its phase and counters, per channel
//! how many messages it holds and whether its sender has closed it. Steps that only change a
//! process's own state (starting a write, ending after the last input, closing outputs) are
//! taken at once after every communication — they commute with everything else, so the states
//! in between need not be visited. Only sends and receives are steps of the search, and of a
//! trace.

use std::{
    collections::VecDeque,
    rc::Rc,
    time::{Duration, Instant},
};

use rustc_hash::FxHashMap;

use super::{Machine, Model, Writes};

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
}

impl<'m> Search<'m> {
    fn new(model: &'m Model) -> Self {
        let writes = model
            .processes
            .iter()
            .map(|process| {
                let mask = match process.machine {
                    Machine::Source { ports, .. }
                    | Machine::Join { ports }
                    | Machine::Collect { ports, .. } => ports,
                    Machine::Serve {
                        writes: Writes::Each(ports) | Writes::OneOrNone(ports) | Writes::UpTo { ports, .. },
                    } => ports,
                    Machine::Serve { writes: Writes::Nothing } => 0,
                };
                let all = process
                    .outputs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i < 32 && mask & (1 << i) != 0)
                    .flat_map(|(_, channels)| channels.iter().copied())
                    .collect();
                std::iter::once(all).chain(process.outputs.iter().cloned()).collect()
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
        Self { model, width: model.processes.len() * PROCESS + model.channels.len(), writes, reads }
    }

    fn run(&self, max_states: u64, max_time: Duration) -> Verdict {
        let started = Instant::now();
        let mut initial = vec![0u16; self.width];
        self.settle(&mut initial);
        let initial: Rc<[u16]> = initial.into();
        let mut seen: FxHashMap<Rc<[u16]>, u32> = FxHashMap::default();
        // Per state: the state it was reached from and the step.
        let mut parents: Vec<(u32, Option<Step>)> = vec![(0, None)];
        let mut states: Vec<Rc<[u16]>> = vec![initial.clone()];
        seen.insert(initial, 0);
        let mut queue = VecDeque::from([0u32]);
        let mut moves = Vec::new();
        while let Some(at) = queue.pop_front() {
            if (at & 0xfff) == 0 && started.elapsed() > max_time {
                return Verdict::CapReached { states: states.len() as u64 };
            }
            let state = states[at as usize].clone();
            moves.clear();
            self.moves(&state, &mut moves);
            if !self.stuck(&state, &moves).is_empty() {
                let mut trace = Vec::new();
                let mut cursor = at;
                while let (parent, Some(step)) = parents[cursor as usize] {
                    trace.push(step);
                    cursor = parent;
                }
                trace.reverse();
                // The stuck stay stuck; the rest go on until nothing can move (or, if some
                // go on for ever, for a while): who is blocked then, and how full the
                // channels are.
                let mut last = state.to_vec();
                let mut more = std::mem::take(&mut moves);
                let mut steps = 0;
                while let Some((next, _)) = more.pop() {
                    last = next;
                    more.clear();
                    steps += 1;
                    if steps > CONTINUE_AT_MOST {
                        break;
                    }
                    self.moves(&last, &mut more);
                }
                let blocked = if more.is_empty() {
                    (0..self.model.processes.len()).filter(|&p| !self.ended(&last, p)).collect()
                } else {
                    self.stuck(&last, &more)
                };
                return Verdict::Deadlock {
                    states: states.len() as u64,
                    trace,
                    blocked: self.blocked(&last, &blocked),
                    fill: (0..self.model.channels.len()).map(|c| self.count(&last, c)).collect(),
                };
            }
            for (next, step) in moves.drain(..) {
                if seen.contains_key(&next[..]) {
                    continue;
                }
                if states.len() as u64 >= max_states {
                    return Verdict::CapReached { states: states.len() as u64 };
                }
                let next: Rc<[u16]> = next.into();
                let index = states.len() as u32;
                seen.insert(next.clone(), index);
                states.push(next);
                parents.push((at, Some(step)));
                queue.push_back(index);
            }
        }
        Verdict::Free { states: states.len() as u64 }
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
    fn stuck(&self, state: &[u16], moves: &[(Vec<u16>, Step)]) -> Vec<usize> {
        let n = self.model.processes.len();
        let mut stuck: Vec<bool> = (0..n).map(|p| !self.ended(state, p)).collect();
        for (_, step) in moves {
            stuck[step.process] = false;
        }
        loop {
            let mut changed = false;
            for p in 0..n {
                if !stuck[p] {
                    continue;
                }
                let (_, channels) = self.waiting(state, p);
                let partners_stuck = channels.iter().all(|&c| {
                    let channel = &self.model.channels[c];
                    let partner = if channel.from == p { channel.to } else { channel.from };
                    stuck[partner]
                });
                if !partners_stuck {
                    stuck[p] = false;
                    changed = true;
                }
            }
            if !changed {
                return (0..n).filter(|&p| stuck[p]).collect();
            }
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
    fn settle(&self, state: &mut [u16]) {
        let all: Vec<usize> = (0..self.model.processes.len()).collect();
        self.settle_from(state, all);
    }

    /// [`Self::settle`], starting from the processes in `pending` (those a communication
    /// touched): a process that ends wakes the receivers of its outputs (they may end too) and
    /// the senders of its inputs (their messages are now dropped).
    fn settle_from(&self, state: &mut [u16], mut pending: Vec<usize>) {
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

    /// Every communication enabled in `state`, with the state it leads to (settled).
    fn moves(&self, state: &[u16], out: &mut Vec<(Vec<u16>, Step)>) {
        for (p, process) in self.model.processes.iter().enumerate() {
            let base = p * PROCESS;
            match state[base] {
                WRITING | FINAL_WRITE => {
                    let channels = self.write_channels(p, state[base + 2]);
                    let Some(&c) = channels.get(usize::from(state[base + 1])) else { continue };
                    if self.count(state, c) < self.model.channels[c].capacity {
                        let mut next = state.to_vec();
                        next[self.channel_field(c)] += 1;
                        next[base + 1] += 1;
                        self.settle_from(&mut next, vec![p, self.model.channels[c].to]);
                        out.push((next, Step { process: p, channel: c, action: StepAction::Send }));
                    }
                }
                READY if !matches!(process.machine, Machine::Source { .. }) => {
                    for &c in self.reading(state, p) {
                        if self.count(state, c) == 0 {
                            continue;
                        }
                        let step = Step { process: p, channel: c, action: StepAction::Receive };
                        let mut taken = state.to_vec();
                        taken[self.channel_field(c)] -= 1;
                        for mut next in self.after_receive(taken, p) {
                            self.settle_from(&mut next, vec![p, self.model.channels[c].from]);
                            out.push((next, step));
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// The states a process can be in after taking a message (several where what it writes
    /// depends on the message).
    fn after_receive(&self, mut state: Vec<u16>, p: usize) -> Vec<Vec<u16>> {
        let base = p * PROCESS;
        let process = &self.model.processes[p];
        match process.machine {
            Machine::Source { .. } => vec![state],
            Machine::Join { .. } => {
                let next = state[base + 4] + 1;
                if usize::from(next) >= process.inputs.len() {
                    state[base + 4] = 0;
                    self.start_write(&mut state, p, ALL_PORTS, 1, WRITING);
                } else {
                    state[base + 4] = next;
                }
                vec![state]
            }
            Machine::Collect { size, .. } => {
                let held = state[base + 4] + 1;
                if size > 0 && held >= size {
                    state[base + 4] = 0;
                    self.start_write(&mut state, p, ALL_PORTS, 1, WRITING);
                } else {
                    state[base + 4] = held;
                }
                vec![state]
            }
            Machine::Serve { writes } => match writes {
                Writes::Nothing => vec![state],
                Writes::Each(_) => {
                    self.start_write(&mut state, p, ALL_PORTS, 1, WRITING);
                    vec![state]
                }
                Writes::OneOrNone(mask) => {
                    let mut branches = vec![state.clone()];
                    for port in (0..process.outputs.len().min(32)).filter(|i| mask & (1 << i) != 0) {
                        let mut branch = state.clone();
                        self.start_write(&mut branch, p, port as u16, 1, WRITING);
                        branches.push(branch);
                    }
                    branches
                }
                Writes::UpTo { max, .. } => {
                    let mut branches = vec![state.clone()];
                    for k in 1..=u16::from(max) {
                        let mut branch = state.clone();
                        self.start_write(&mut branch, p, ALL_PORTS, k, WRITING);
                        branches.push(branch);
                    }
                    branches
                }
            },
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

//! Deadlock detection: a wait-for graph over channel operations.
//!
//! Every node records what it waits for when a channel operation blocks ([`Waits`]): to
//! receive (on any input, or on one port), or to send on one channel. A node waiting to
//! receive can be released by any sender of its open input channels; a node waiting to send,
//! only by that channel's receiver. A set of blocked nodes each of which can only be released
//! by nodes of the set is deadlocked — the greatest such set is found by removing, until
//! nothing changes, every blocked node one of whose possible releasers is not blocked.
//!
//! The detector looks every 100 ms when every live node is blocked, and every 200 ms for
//! partial deadlocks. A verdict is confirmed by a second look
//! a moment later that finds the same nodes blocked with no activity in between.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use super::channel::Channel;

const RUNNING: u64 = 0;
const RECV: u64 = 1 << 32;
const RECV_PORT: u64 = 2 << 32;
const SEND: u64 = 3 << 32;
const DONE: u64 = 4 << 32;
const KIND: u64 = 0xffff_ffff << 32;
const INDEX: u64 = 0xffff_ffff;

/// What a blocked node waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// A message on any input.
    Recv,
    /// A message on this input port.
    RecvPort(usize),
    /// Room on this channel (connection index).
    Send(usize),
}

/// Counts live and blocked nodes. The detector looks often at whether they are equal (cheap)
/// rather than being woken: in a busy pipeline every live node is briefly blocked at each
/// hand-over, and waking the detector each time would cost more than the work.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    live: AtomicUsize,
    blocked: AtomicUsize,
}

impl Tracker {
    /// Whether every live node is blocked right now.
    pub(crate) fn all_blocked(&self) -> bool {
        let live = self.live.load(Ordering::Acquire);
        live > 0 && self.blocked.load(Ordering::Acquire) >= live
    }
}

/// One node's wait state.
#[derive(Debug)]
pub(crate) struct Waits {
    state: AtomicU64,
    activity: AtomicU64,
    tracker: Arc<Tracker>,
}

impl Waits {
    pub(crate) fn new(tracker: Arc<Tracker>) -> Self {
        tracker.live.fetch_add(1, Ordering::SeqCst);
        Self { state: AtomicU64::new(RUNNING), activity: AtomicU64::new(0), tracker }
    }

    /// Records that the node waits; the wait ends when the guard is dropped (also when the
    /// waiting future is dropped).
    pub(crate) fn block(&self, wait: Wait) -> Blocked<'_> {
        let code = match wait {
            Wait::Recv => RECV,
            Wait::RecvPort(p) => RECV_PORT | p as u64,
            Wait::Send(c) => SEND | c as u64,
        };
        self.state.store(code, Ordering::Release);
        self.tracker.blocked.fetch_add(1, Ordering::AcqRel);
        Blocked(self)
    }

    fn unblock(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
        if self.state.swap(RUNNING, Ordering::AcqRel) == DONE {
            self.state.store(DONE, Ordering::Release);
        } else {
            self.tracker.blocked.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The node ended (for any reason).
    pub(crate) fn done(&self) {
        if self.state.swap(DONE, Ordering::SeqCst) != DONE {
            self.tracker.live.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn snapshot(&self) -> (u64, u64) {
        (self.state.load(Ordering::SeqCst), self.activity.load(Ordering::SeqCst))
    }
}

/// A wait in progress.
#[derive(Debug)]
pub(crate) struct Blocked<'a>(&'a Waits);

impl Drop for Blocked<'_> {
    fn drop(&mut self) {
        self.0.unblock();
    }
}

/// A channel as the detector sees it.
#[derive(Debug, Clone)]
pub(crate) struct Edge {
    pub(crate) connection_id: String,
    pub(crate) from: usize,
    pub(crate) to: usize,
    pub(crate) to_port: usize,
    pub(crate) channel: Arc<Channel>,
}

/// The network's shape and its nodes' wait states.
#[derive(Debug)]
pub(crate) struct Graph {
    pub(crate) node_ids: Vec<String>,
    pub(crate) waits: Vec<Arc<Waits>>,
    /// By connection index.
    pub(crate) edges: Vec<Edge>,
    /// Per node, the connection indices into it.
    pub(crate) into: Vec<Vec<usize>>,
}

/// A confirmed deadlock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Deadlock {
    /// The blocked nodes, by id, sorted.
    pub(crate) node_ids: Vec<String>,
    /// The connections they wait on, by id, sorted.
    pub(crate) connection_ids: Vec<String>,
    /// Every live node is blocked.
    pub(crate) total: bool,
    /// The wait-for cycle, for people.
    pub(crate) description: String,
}

type Snapshot = Vec<(u64, u64)>;

impl Graph {
    fn snapshot(&self) -> Snapshot {
        self.waits.iter().map(|w| w.snapshot()).collect()
    }

    /// The nodes a blocked node waits for, with the connection of each wait.
    fn releasers(&self, node: usize, state: u64) -> Option<Vec<(usize, usize)>> {
        match state & KIND {
            RECV | RECV_PORT => {
                let port = (state & KIND == RECV_PORT).then_some((state & INDEX) as usize);
                let mut from = Vec::new();
                for &c in &self.into[node] {
                    let edge = &self.edges[c];
                    if port.is_some_and(|p| p != edge.to_port) {
                        continue;
                    }
                    let (queued, closed) = edge.channel.status();
                    if queued > 0 {
                        return None; // it can go on
                    }
                    if !closed {
                        from.push((edge.from, c));
                    }
                }
                (!from.is_empty()).then_some(from)
            }
            SEND => {
                let c = (state & INDEX) as usize;
                let edge = self.edges.get(c)?;
                edge.channel.is_full().then(|| vec![(edge.to, c)])
            }
            _ => None,
        }
    }

    /// The greatest set of blocked nodes only releasable by each other.
    fn stuck(&self, snapshot: &Snapshot) -> BTreeSet<usize> {
        let mut waiting: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
        for (node, (state, _)) in snapshot.iter().enumerate() {
            if let Some(releasers) = self.releasers(node, *state) {
                waiting.insert(node, releasers);
            }
        }
        loop {
            let free: Vec<usize> = waiting
                .iter()
                .filter(|(_, releasers)| releasers.iter().any(|(r, _)| !waiting.contains_key(r)))
                .map(|(n, _)| *n)
                .collect();
            if free.is_empty() {
                break;
            }
            for n in free {
                waiting.remove(&n);
            }
        }
        waiting.into_keys().collect()
    }

    /// A deadlock if there is one now, confirmed by a second look after `settle`.
    pub(crate) async fn find(&self, settle: std::time::Duration) -> Option<Deadlock> {
        let first = self.snapshot();
        let stuck = self.stuck(&first);
        if stuck.is_empty() {
            return None;
        }
        tokio::time::sleep(settle).await;
        let second = self.snapshot();
        if stuck.iter().any(|&n| first[n] != second[n]) || self.stuck(&second) != stuck {
            return None;
        }
        let live = second.iter().filter(|(state, _)| *state != DONE).count();
        Some(self.describe(&stuck, &second, stuck.len() == live))
    }

    fn describe(&self, stuck: &BTreeSet<usize>, snapshot: &Snapshot, total: bool) -> Deadlock {
        let mut connections = BTreeSet::new();
        let mut edges: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
        for &n in stuck {
            let releasers = self.releasers(n, snapshot[n].0).unwrap_or_default();
            for (r, c) in &releasers {
                if stuck.contains(r) {
                    connections.insert(self.edges[*c].connection_id.clone());
                    edges.entry(n).or_default().push((*r, *c));
                }
            }
        }
        // Follow the first wait of each node from the first stuck node until one repeats.
        let mut path: Vec<usize> = Vec::new();
        let mut at = *stuck.iter().next().unwrap_or(&0);
        while !path.contains(&at) {
            path.push(at);
            match edges.get(&at).and_then(|e| e.first()) {
                Some((next, _)) => at = *next,
                None => break,
            }
        }
        let cycle_start = path.iter().position(|n| *n == at).unwrap_or(0);
        let steps: Vec<String> = path[cycle_start..]
            .iter()
            .filter_map(|n| {
                let (next, c) = edges.get(n)?.first()?;
                let what = if snapshot[*n].0 & KIND == SEND { "send on" } else { "receive on" };
                let direction = if snapshot[*n].0 & KIND == SEND { "to" } else { "from" };
                Some(format!(
                    "`{}` waits to {what} `{}` {direction} `{}`",
                    self.node_ids[*n], self.edges[*c].connection_id, self.node_ids[*next]
                ))
            })
            .collect();
        let mut node_ids: Vec<String> = stuck.iter().map(|n| self.node_ids[*n].clone()).collect();
        node_ids.sort();
        Deadlock {
            node_ids,
            connection_ids: connections.into_iter().collect(),
            total,
            description: steps.join("; "),
        }
    }
}

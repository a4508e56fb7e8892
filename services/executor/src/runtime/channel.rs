//! Bounded channels that move messages in batches.
//!
//! One channel per connection, one sender (the node owning the output port) and one receiver
//! (the node owning the input port). Capacity counts messages. A sender moves as many messages
//! as fit in one lock; a receiver takes what is ready (up to a batch) in one lock and never
//! waits for a batch to fill, so a lone message moves at once and a stream moves in batches.
//!
//! A receiving node owns one [`Inbox`] shared by all its input channels: a sender wakes it when
//! it puts a message into an empty channel or closes one, so a node reading several inputs
//! (merge, alt, join) waits on one thing. Every wait is recorded in the node's [`Waits`] so the
//! deadlock detector can build the wait-for graph.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use futures::task::AtomicWaker;
use serde_json::Value;

use super::deadlock::{Wait, Waits};

/// A message: immutable JSON shared by every receiver of a fan-out; a receiver that changes it
/// clones it only if someone else still holds it (`make_mut`). A `triomphe` Arc: no weak count,
/// so checking that a message is not shared is a load, not a compare-and-swap.
pub type Msg = triomphe::Arc<Value>;

/// A message holding `value`.
#[inline]
pub(crate) fn msg(value: Value) -> Msg {
    triomphe::Arc::new(value)
}

/// The value of a message, copied only if it is shared.
#[inline]
pub(crate) fn into_value(msg: Msg) -> Value {
    triomphe::Arc::unwrap_or_clone(msg)
}

/// Wakes a receiving node.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    waker: AtomicWaker,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Msg>,
    /// The sender is done: once empty, the channel is exhausted.
    closed: bool,
    /// The receiver is gone: messages are dropped.
    dropped: bool,
}

/// One connection's channel.
#[derive(Debug)]
pub(crate) struct Channel {
    /// The connection's index in the plan.
    pub(crate) index: usize,
    capacity: usize,
    state: Mutex<State>,
    /// Wakes the sender waiting for room.
    space: AtomicWaker,
    inbox: Arc<Inbox>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Channel {
    pub(crate) fn new(index: usize, capacity: usize, inbox: Arc<Inbox>) -> Self {
        Self {
            index,
            capacity: capacity.max(1),
            state: Mutex::new(State { queue: VecDeque::with_capacity(capacity.max(1)), ..State::default() }),
            space: AtomicWaker::new(),
            inbox,
        }
    }

    /// Moves every message of `batch` into the channel, waiting for room as needed. When the
    /// receiver is gone the messages are dropped and `false` is returned.
    pub(crate) async fn send(&self, batch: &mut Vec<Msg>, waits: &Waits) -> bool {
        loop {
            let wake = {
                let mut state = lock(&self.state);
                if state.dropped {
                    batch.clear();
                    return false;
                }
                let room = self.capacity.saturating_sub(state.queue.len());
                let n = room.min(batch.len());
                let was_empty = state.queue.is_empty();
                state.queue.extend(batch.drain(..n));
                was_empty && n > 0
            };
            if wake {
                self.inbox.waker.wake();
            }
            if batch.is_empty() {
                return true;
            }
            // Full: wait for the receiver to take some.
            let _blocked = waits.block(Wait::Send(self.index));
            std::future::poll_fn(|cx| {
                self.space.register(cx.waker());
                let state = lock(&self.state);
                if state.dropped || state.queue.len() < self.capacity {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            })
            .await;
        }
    }

    /// The sender is done.
    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
        self.inbox.waker.wake();
    }

    /// The receiver is gone: drop what is queued and whatever comes.
    pub(crate) fn drop_receiver(&self) {
        {
            let mut state = lock(&self.state);
            state.dropped = true;
            state.queue.clear();
        }
        self.space.wake();
    }

    /// Takes up to `max` ready messages into `out`. `None`: nothing ready; `Some(false)`: took
    /// some; `Some(true)`: closed and empty.
    fn take(&self, out: &mut Vec<Msg>, max: usize) -> Option<bool> {
        let mut state = lock(&self.state);
        if state.queue.is_empty() {
            return state.closed.then_some(true);
        }
        let was_full = state.queue.len() >= self.capacity;
        let n = max.min(state.queue.len());
        out.extend(state.queue.drain(..n));
        drop(state);
        if was_full {
            self.space.wake();
        }
        Some(false)
    }

    /// For the deadlock detector: `(queued, closed)`.
    pub(crate) fn status(&self) -> (usize, bool) {
        let state = lock(&self.state);
        (state.queue.len(), state.closed)
    }

    /// For the deadlock detector: whether the channel is full.
    pub(crate) fn is_full(&self) -> bool {
        lock(&self.state).queue.len() >= self.capacity
    }
}

/// What a receive got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Received {
    /// Messages from this input port (index).
    Port(usize),
    /// Every channel of the ports asked about is closed and empty.
    Closed,
}

/// A node's input side: every channel into it, with the port each feeds.
#[derive(Debug)]
pub(crate) struct Inputs {
    inbox: Arc<Inbox>,
    channels: Vec<(usize, Arc<Channel>)>,
    exhausted: Vec<bool>,
    cursor: usize,
}

impl Inputs {
    pub(crate) fn new(inbox: Arc<Inbox>, channels: Vec<(usize, Arc<Channel>)>) -> Self {
        let exhausted = vec![false; channels.len()];
        Self { inbox, channels, exhausted, cursor: 0 }
    }

    /// One pass over the channels of `port` (all ports when `None`), from the cursor (fair) or
    /// from the first (ordered by port).
    fn scan(
        &mut self,
        port: Option<usize>,
        ordered: bool,
        out: &mut Vec<Msg>,
        max: usize,
    ) -> Option<Received> {
        let n = self.channels.len();
        let mut open = 0;
        for k in 0..n {
            let i = if ordered { k } else { (self.cursor + k) % n };
            let (p, channel) = &self.channels[i];
            if self.exhausted[i] || port.is_some_and(|want| want != *p) {
                continue;
            }
            match channel.take(out, max) {
                Some(false) => {
                    self.cursor = i + 1;
                    return Some(Received::Port(*p));
                }
                Some(true) => self.exhausted[i] = true,
                None => open += 1,
            }
        }
        (open == 0).then_some(Received::Closed)
    }

    /// Waits for messages on any input (or on `port` only), taking up to `max` from one
    /// channel. With `ordered`, earlier ports (and earlier channels) win when several are ready.
    pub(crate) async fn recv(
        &mut self,
        port: Option<usize>,
        ordered: bool,
        out: &mut Vec<Msg>,
        max: usize,
        waits: &Waits,
        record: bool,
    ) -> Received {
        if let Some(got) = self.scan(port, ordered, out, max) {
            return got;
        }
        let inbox = self.inbox.clone();
        // Recorded only once the node really waits. A wait with a timer of the node's own
        // (batch, delay) is not a block: the timer releases it.
        let mut blocked = None;
        std::future::poll_fn(|cx| {
            inbox.waker.register(cx.waker());
            match self.scan(port, ordered, out, max) {
                Some(got) => std::task::Poll::Ready(got),
                None => {
                    if record && blocked.is_none() {
                        blocked = Some(waits.block(match port {
                            Some(p) => Wait::RecvPort(p),
                            None => Wait::Recv,
                        }));
                    }
                    std::task::Poll::Pending
                }
            }
        })
        .await
    }
}

impl Drop for Inputs {
    fn drop(&mut self) {
        for (_, channel) in &self.channels {
            channel.drop_receiver();
        }
    }
}

/// A node's output side: per output port, the channels it feeds. Only a node that ends
/// normally closes them: a process stopped (cancelled, failed) leaves them open, so what is
/// downstream does not mistake the stop for the end of its input.
#[derive(Debug)]
pub(crate) struct Outputs {
    ports: Vec<Vec<Arc<Channel>>>,
}

impl Outputs {
    pub(crate) fn new(ports: Vec<Vec<Arc<Channel>>>) -> Self {
        Self { ports }
    }

    /// Sends `batch` on `port`: to each of its connections (sharing the messages). Returns the
    /// number of messages sent (per connection).
    pub(crate) async fn send(
        &self,
        port: usize,
        batch: &mut Vec<Msg>,
        spare: &mut Vec<Msg>,
        waits: &Waits,
    ) -> usize {
        let n = batch.len();
        let Some(channels) = self.ports.get(port) else {
            batch.clear();
            return 0;
        };
        match channels.as_slice() {
            [] => batch.clear(),
            [only] => {
                only.send(batch, waits).await;
            }
            many => {
                for channel in &many[..many.len() - 1] {
                    spare.clear();
                    spare.extend(batch.iter().cloned());
                    channel.send(spare, waits).await;
                }
                many[many.len() - 1].send(batch, waits).await;
            }
        }
        n
    }

    /// Sends `batch` on one connection of `port` only (replaying recorded messages).
    pub(crate) async fn send_to(
        &self,
        port: usize,
        connection: usize,
        batch: &mut Vec<Msg>,
        waits: &Waits,
    ) -> bool {
        match self.ports.get(port).and_then(|channels| channels.iter().find(|c| c.index == connection)) {
            Some(channel) => channel.send(batch, waits).await,
            None => {
                batch.clear();
                false
            }
        }
    }

    /// Closes every output channel.
    pub(crate) fn close(&self) {
        for channel in self.ports.iter().flatten() {
            channel.close();
        }
    }
}

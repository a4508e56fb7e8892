//! The process of each node: takes a batch from its inputs, runs its component on each message
//! (with the node's policy: retries with back-off, then fail, skip or route to `error`), sends
//! what came out, and when its inputs are exhausted, finishes and closes its outputs.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use csp_proto::{executor::v1 as pb, json as pbjson};
use pb::execution_event::Kind as Event;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{
    OnError, Policy,
    channel::{Inputs, Msg, Outputs, Received},
    components::{AsyncTransform, Emit, Failure, Join, Source, Transform},
    deadlock::Waits,
    debug::{Debugger, Paused},
    stats::NodeStats,
};

/// Messages recorded per connection, for RetryExecution.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    pub(crate) limit: usize,
    pub(crate) count: std::sync::atomic::AtomicUsize,
    pub(crate) messages: Mutex<std::collections::HashMap<usize, Vec<Value>>>,
}

/// What every node of an execution shares.
pub(crate) struct Shared {
    pub(crate) debugger: Arc<Debugger>,
    pub(crate) events: mpsc::Sender<Event>,
    pub(crate) batch: usize,
    pub(crate) trace: bool,
    pub(crate) recorder: Option<Recorder>,
    pub(crate) node_ids: Vec<String>,
    /// Per connection: its id and its receiving node.
    pub(crate) connections: Vec<(String, usize)>,
}

impl Shared {
    pub(crate) async fn emit(&self, event: Event) {
        let _ = self.events.send(event).await;
    }
}

/// Why a node stopped the execution.
#[derive(Debug, Clone)]
pub(crate) struct NodeFailed(pub(crate) String);

/// One node's process.
pub(crate) struct Driver {
    pub(crate) idx: usize,
    pub(crate) id: String,
    pub(crate) inputs: Inputs,
    pub(crate) input_names: Vec<String>,
    pub(crate) outputs: Outputs,
    /// Per output port, the connection indices it feeds.
    pub(crate) out_connections: Vec<Vec<usize>>,
    pub(crate) waits: Arc<Waits>,
    pub(crate) stats: Arc<NodeStats>,
    pub(crate) policy: Policy,
    pub(crate) error_port: Option<usize>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) spare: Vec<Msg>,
}

/// One batch in this many is timed for the processing-time metrics.
const TIME_EVERY: u64 = 4;

fn backoff(policy: &Policy, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    policy.initial_backoff.saturating_mul(factor).min(policy.max_backoff)
}

impl Driver {
    /// Sends everything `emit` holds, and its events.
    pub(crate) async fn flush(&mut self, emit: &mut Emit) {
        for port in 0..emit.ports.len() {
            if emit.ports[port].is_empty() {
                continue;
            }
            if self.shared.trace || self.shared.recorder.is_some() {
                self.observe(port, &emit.ports[port]).await;
            }
            let mut batch = std::mem::take(&mut emit.ports[port]);
            let n = self.outputs.send(port, &mut batch, &mut self.spare, &self.waits).await;
            emit.ports[port] = batch;
            self.stats.messages_out.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        for event in emit.events.drain(..) {
            self.shared.emit(event).await;
        }
    }

    /// Records and traces messages about to leave by `port`.
    async fn observe(&self, port: usize, messages: &[Msg]) {
        let Some(connections) = self.out_connections.get(port) else { return };
        if let Some(recorder) = &self.shared.recorder {
            use std::sync::atomic::Ordering;
            let room = recorder.limit.saturating_sub(recorder.count.load(Ordering::Relaxed));
            let wanted = messages.len() * connections.len();
            if room >= wanted && wanted > 0 {
                recorder.count.fetch_add(wanted, Ordering::Relaxed);
                let mut recorded =
                    recorder.messages.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for c in connections {
                    recorded.entry(*c).or_default().extend(messages.iter().map(|m| (**m).clone()));
                }
            }
        }
        if self.shared.trace {
            for c in connections {
                let (connection_id, to) = &self.shared.connections[*c];
                for m in messages {
                    self.shared
                        .emit(Event::MessageMoved(pb::MessageMoved {
                            connection_id: connection_id.clone(),
                            from_node_id: self.id.clone(),
                            to_node_id: self.shared.node_ids[*to].clone(),
                            payload: Some(pbjson::to_value((**m).clone())),
                        }))
                        .await;
                }
            }
        }
    }

    pub(crate) async fn node_error(&self, message: &str, attempt: u32, action: &str) {
        self.shared
            .emit(Event::NodeError(pb::NodeError {
                node_id: self.id.clone(),
                message: message.to_owned(),
                attempt: attempt as i32,
                action: action.into(),
            }))
            .await;
    }

    /// Holds a message at a breakpoint until the user lets it through.
    pub(crate) async fn hold(&mut self, port: usize, msg: &Msg, emit: &mut Emit) {
        self.flush(emit).await;
        let paused = Paused {
            node_id: self.id.clone(),
            port: self.input_names.get(port).cloned().unwrap_or_default(),
            payload: (**msg).clone(),
        };
        let shared = self.shared.clone();
        let (id, port_name, payload) = (self.id.clone(), paused.port.clone(), paused.payload.clone());
        let on_pause = {
            let shared = shared.clone();
            let id = id.clone();
            // The hit first: whoever sees the execution paused can find where.
            async move {
                shared
                    .emit(Event::BreakpointHit(pb::BreakpointHit {
                        node_id: id.clone(),
                        port: port_name,
                        payload: Some(pbjson::to_value(payload)),
                    }))
                    .await;
                shared
                    .emit(Event::NodeStatusChanged(pb::NodeStatusChanged {
                        node_id: id,
                        status: pb::NodeStatus::Paused as i32,
                        error: String::new(),
                    }))
                    .await;
                shared
                    .emit(Event::StatusChanged(pb::StatusChanged {
                        status: pb::ExecutionStatus::Paused as i32,
                        error: None,
                    }))
                    .await;
            }
        };
        let on_release = async move {
            shared
                .emit(Event::NodeStatusChanged(pb::NodeStatusChanged {
                    node_id: id,
                    status: pb::NodeStatus::Running as i32,
                    error: String::new(),
                }))
                .await;
            shared
                .emit(Event::StatusChanged(pb::StatusChanged {
                    status: pb::ExecutionStatus::Running as i32,
                    error: None,
                }))
                .await;
        };
        self.shared.debugger.clone().hold(paused, on_pause, on_release).await;
    }

    /// What the policy says once a message has failed for good.
    pub(crate) async fn give_up(
        &mut self,
        error: String,
        msg: Msg,
        attempt: u32,
        emit: &mut Emit,
    ) -> Result<(), NodeFailed> {
        self.stats.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.policy.on_error {
            OnError::Fail => {
                self.node_error(&error, attempt, "fail").await;
                Err(NodeFailed(error))
            }
            OnError::Skip => {
                self.node_error(&error, attempt, "skip").await;
                Ok(())
            }
            OnError::Route => {
                self.node_error(&error, attempt, "route").await;
                if let Some(port) = self.error_port {
                    emit.value(
                        port,
                        json!({ "message": &*msg, "error": error, "node_id": self.id, "attempts": attempt }),
                    );
                }
                Ok(())
            }
        }
    }

    pub(crate) async fn retry_wait(&self, error: &str, attempt: u32) {
        self.stats.retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.node_error(error, attempt, "retry").await;
        tokio::time::sleep(backoff(&self.policy, attempt)).await;
    }

    /// A synchronous component on one message, with the node's policy.
    async fn one(
        &mut self,
        comp: &mut dyn Transform,
        port: usize,
        msg: Msg,
        emit: &mut Emit,
    ) -> Result<(), NodeFailed> {
        let mut attempt = 1;
        let mut msg = msg;
        loop {
            match comp.process(port, msg, emit) {
                Ok(()) => return Ok(()),
                Err(Failure { error, message, retryable }) => {
                    if retryable && attempt <= self.policy.max_retries {
                        self.retry_wait(&error, attempt).await;
                        attempt += 1;
                        msg = message;
                        continue;
                    }
                    return self.give_up(error, message, attempt, emit).await;
                }
            }
        }
    }

    /// An asynchronous component on one message, with the node's timeout and policy.
    async fn one_async(
        &mut self,
        comp: &mut dyn AsyncTransform,
        port: usize,
        msg: Msg,
        emit: &mut Emit,
    ) -> Result<(), NodeFailed> {
        let mut attempt = 1;
        loop {
            let outcome = match self.policy.timeout {
                Some(limit) => match tokio::time::timeout(limit, comp.process(port, &msg, emit)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err((format!("timed out after {} ms", limit.as_millis()), true)),
                },
                None => comp.process(port, &msg, emit).await,
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err((error, retryable)) => {
                    if retryable && attempt <= self.policy.max_retries {
                        self.retry_wait(&error, attempt).await;
                        attempt += 1;
                        continue;
                    }
                    return self.give_up(error, msg, attempt, emit).await;
                }
            }
        }
    }

    pub(crate) fn outputs_len(&self) -> usize {
        self.out_connections.len()
    }

    /// A source: fills batches until it runs dry.
    pub(crate) async fn run_source(mut self, mut source: Box<dyn Source>) -> Result<(), NodeFailed> {
        let mut emit = Emit::new(self.outputs_len());
        let interval = source.interval();
        let max = if interval.is_some() { 1 } else { self.shared.batch };
        loop {
            let started = Instant::now();
            let more = source.fill(&mut emit, max);
            let n: usize = emit.ports.iter().map(Vec::len).sum();
            self.stats.record(n as u64, started.elapsed().as_nanos() as u64);
            self.flush(&mut emit).await;
            if !more {
                break;
            }
            if let Some(pause) = interval {
                tokio::time::sleep(pause).await;
            }
        }
        self.outputs.close();
        Ok(())
    }

    /// A synchronous component, in batches.
    pub(crate) async fn run_transform(mut self, mut comp: Box<dyn Transform>) -> Result<(), NodeFailed> {
        let mut emit = Emit::new(self.outputs_len());
        let mut batch: Vec<Msg> = Vec::with_capacity(self.shared.batch);
        let ordered = comp.ordered();
        let max = self.shared.batch;
        let mut batches = 0u64;
        loop {
            let received = if !comp.accepting() {
                if let Some(at) = comp.deadline() {
                    tokio::time::sleep_until(at.into()).await;
                }
                comp.on_timer(Instant::now(), &mut emit);
                self.flush(&mut emit).await;
                continue;
            } else if let Some(at) = comp.deadline() {
                tokio::select! {
                    received = self.inputs.recv(None, ordered, &mut batch, max, &self.waits, false) => received,
                    () = tokio::time::sleep_until(at.into()) => {
                        comp.on_timer(Instant::now(), &mut emit);
                        self.flush(&mut emit).await;
                        continue;
                    }
                }
            } else {
                self.inputs.recv(None, ordered, &mut batch, max, &self.waits, true).await
            };
            let Received::Port(port) = received else { break };
            let n = batch.len() as u64;
            self.stats.messages_in.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            // Processing time is sampled: one batch in TIME_EVERY is timed, the first among them.
            let started = batches.is_multiple_of(TIME_EVERY).then(Instant::now);
            batches += 1;
            let mut held = false;
            for msg in batch.drain(..) {
                if self.shared.debugger.stops_at(&self.id) {
                    self.hold(port, &msg, &mut emit).await;
                    held = true;
                }
                self.one(comp.as_mut(), port, msg, &mut emit).await?;
            }
            if let Some(started) = started
                && !held
            {
                self.stats.record_sample(n, started.elapsed().as_nanos() as u64, TIME_EVERY);
            }
            self.flush(&mut emit).await;
        }
        // Inputs done; a component still holding messages (delay) sends them when due.
        while comp.holding() {
            match comp.deadline() {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => break,
            }
            comp.on_timer(Instant::now(), &mut emit);
            self.flush(&mut emit).await;
        }
        comp.finish(&mut emit).map_err(NodeFailed)?;
        self.flush(&mut emit).await;
        self.outputs.close();
        Ok(())
    }

    /// A component that waits on the outside world: one message at a time.
    pub(crate) async fn run_async(mut self, mut comp: Box<dyn AsyncTransform>) -> Result<(), NodeFailed> {
        let mut emit = Emit::new(self.outputs_len());
        let mut batch: Vec<Msg> = Vec::with_capacity(self.shared.batch);
        let max = self.shared.batch;
        loop {
            let Received::Port(port) =
                self.inputs.recv(None, false, &mut batch, max, &self.waits, true).await
            else {
                break;
            };
            self.stats.messages_in.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let mut work = std::mem::take(&mut batch);
            for msg in work.drain(..) {
                if self.shared.debugger.stops_at(&self.id) {
                    self.hold(port, &msg, &mut emit).await;
                }
                let started = Instant::now();
                self.one_async(comp.as_mut(), port, msg, &mut emit).await?;
                self.stats.record(1, started.elapsed().as_nanos() as u64);
                self.flush(&mut emit).await;
            }
            batch = work;
        }
        self.outputs.close();
        Ok(())
    }

    /// `control.join`: one message from each input in turn.
    pub(crate) async fn run_join(mut self, join: Join) -> Result<(), NodeFailed> {
        let mut emit = Emit::new(self.outputs_len());
        let ports = self.input_names.len();
        let mut queues: Vec<std::collections::VecDeque<Msg>> =
            (0..ports).map(|_| Default::default()).collect();
        let mut batch: Vec<Msg> = Vec::with_capacity(self.shared.batch);
        let max = self.shared.batch;
        'outer: loop {
            for (port, queue) in queues.iter_mut().enumerate() {
                if queue.is_empty() {
                    match self.inputs.recv(Some(port), false, &mut batch, max, &self.waits, true).await {
                        Received::Port(_) => {
                            self.stats
                                .messages_in
                                .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
                            queue.extend(batch.drain(..));
                        }
                        Received::Closed => break 'outer,
                    }
                }
            }
            let started = Instant::now();
            let mut n = 0;
            while queues.iter().all(|q| !q.is_empty()) {
                let parts: Vec<Msg> =
                    queues.iter_mut().filter_map(std::collections::VecDeque::pop_front).collect();
                if self.shared.debugger.stops_at(&self.id)
                    && let Some(first) = parts.first()
                {
                    let first = first.clone();
                    self.hold(0, &first, &mut emit).await;
                }
                emit.value(join.out, join.join(parts));
                n += 1;
            }
            self.stats.record(n, started.elapsed().as_nanos() as u64);
            self.flush(&mut emit).await;
        }
        let left: usize = queues.iter().map(std::collections::VecDeque::len).sum();
        if left > 0 {
            self.shared
                .emit(Event::Log(pb::LogLine {
                    node_id: self.id.clone(),
                    level: "warn".into(),
                    message: format!(
                        "an input closed; {left} message(s) on the other inputs were never joined"
                    ),
                    data: None,
                }))
                .await;
        }
        self.outputs.close();
        Ok(())
    }

    /// A node of an earlier execution: its recorded messages, per connection.
    pub(crate) async fn run_replay(
        self,
        recorded: std::collections::HashMap<usize, Vec<Value>>,
    ) -> Result<(), NodeFailed> {
        for (port, connections) in self.out_connections.clone().iter().enumerate() {
            for c in connections {
                let Some(messages) = recorded.get(c) else { continue };
                for chunk in messages.chunks(self.shared.batch.max(1)) {
                    let mut batch: Vec<Msg> = chunk.iter().cloned().map(super::channel::msg).collect();
                    let n = batch.len();
                    self.outputs.send_to(port, *c, &mut batch, &self.waits).await;
                    self.stats.messages_out.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        self.outputs.close();
        Ok(())
    }

    /// A source fed from outside the network.
    pub(crate) async fn run_feed(mut self, mut rx: mpsc::Receiver<Value>) -> Result<(), NodeFailed> {
        let mut emit = Emit::new(self.outputs_len());
        let mut values = Vec::with_capacity(self.shared.batch);
        while rx.recv_many(&mut values, self.shared.batch).await > 0 {
            for value in values.drain(..) {
                emit.value(0, value);
            }
            self.flush(&mut emit).await;
        }
        self.outputs.close();
        Ok(())
    }

    /// The node's index.
    pub(crate) fn index(&self) -> usize {
        self.idx
    }
}

//! The CSP runtime: a design revision as a process network.
//!
//! [`Network::build`] turns a [`Plan`] (nodes with their configuration, connections between
//! named ports) into one process per node and one bounded channel per connection;
//! [`Network::run`] runs the processes concurrently and supervises them: the first node to fail
//! (under the `fail` policy) stops the execution, cancellation and the deadline stop it, and
//! the deadlock detector ends it when every live process is blocked on another (a partial
//! deadlock is reported as an event). The outcome carries each node's status and metrics, the
//! messages of `sink.output` nodes and, when asked, every message that crossed a connection.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use csp_proto::executor::v1 as pb;
use pb::execution_event::Kind as Event;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub(crate) mod channel;
pub mod components;
mod deadlock;
pub mod debug;
mod node;
mod remote;
mod stats;

pub use channel::Msg;
pub use components::ai::{Ai, AiError};
pub use debug::{Debugger, NotPaused, Paused};
use node::{Driver, NodeFailed, Recorder, Shared};

/// Threads that run process networks, each a single-threaded runtime ("shard").
///
/// Every process of one execution runs on one shard, the shards taking turns between
/// executions: the processes are concurrent (they interleave at every channel operation), and a
/// message stays in one core's cache from source to sink. Spreading one execution over cores
/// was measured slower for small JSON messages than keeping it on one (chain10: 0.59M against
/// 1.0M msg/s; fan: 0.34M against 0.65M) — moving a message's many small allocations between
/// caches costs more than the work on it. Concurrent executions use every core.
#[derive(Debug)]
pub struct Shards {
    handles: Vec<tokio::runtime::Handle>,
    next: std::sync::atomic::AtomicUsize,
}

impl Shards {
    /// Starts `count` shard threads (at least one).
    pub fn start(count: usize) -> std::io::Result<Arc<Self>> {
        let mut handles = Vec::new();
        for i in 0..count.max(1) {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new().name(format!("csp-shard-{i}")).spawn(move || {
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => {
                        let _ = tx.send(Ok(runtime.handle().clone()));
                        runtime.block_on(std::future::pending::<()>());
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
            handles.push(rx.recv().map_err(std::io::Error::other)??);
        }
        Ok(Arc::new(Self { handles, next: std::sync::atomic::AtomicUsize::new(0) }))
    }

    /// One shard per available core, started on first use.
    pub fn global() -> Arc<Self> {
        static GLOBAL: std::sync::OnceLock<Arc<Shards>> = std::sync::OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
                Shards::start(cores).unwrap_or_else(|e| panic!("cannot start the runtime's threads: {e}"))
            })
            .clone()
    }

    /// The shard of the next execution.
    fn pick(&self) -> &tokio::runtime::Handle {
        let next = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.handles[next % self.handles.len()]
    }

    /// How many shards there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never: at least one is started).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

/// A node to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanNode {
    /// Unique within the plan (sub-design nodes are `call/inner`).
    pub id: String,
    /// Component type id.
    #[serde(rename = "type")]
    pub type_id: String,
    /// The configuration as written in the design (defaults are applied when built).
    #[serde(default)]
    pub config: Value,
    /// For custom types: the endpoint that runs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteEndpoint>,
}

/// A remote component's endpoint and ports, from the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteEndpoint {
    /// `http://host:port`.
    pub address: String,
    /// Per-message timeout.
    pub timeout_ms: u64,
    /// Input port names.
    pub inputs: Vec<String>,
    /// Output port names.
    pub outputs: Vec<String>,
}

/// A connection to run: a bounded channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanConnection {
    /// Unique within the plan.
    pub id: String,
    /// Sending node id.
    pub from: String,
    /// Its output port.
    pub from_port: String,
    /// Receiving node id.
    pub to: String,
    /// Its input port.
    pub to_port: String,
    /// Capacity in messages; 0 means the execution's default.
    #[serde(default)]
    pub capacity: i32,
}

/// What to run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The processes.
    pub nodes: Vec<PlanNode>,
    /// The channels.
    pub connections: Vec<PlanConnection>,
}

/// What a node does with a message that failed after its retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Fail the execution.
    #[default]
    Fail,
    /// Drop the message and carry on.
    Skip,
    /// Send it, with the error, to the node's `error` port.
    Route,
}

/// How a node handles time and failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Per-message timeout of components that wait (AI, remote calls).
    pub timeout: Option<Duration>,
    /// Retries of a failure that may pass (timeouts, errors marked retryable).
    pub max_retries: u32,
    /// First retry delay; doubles per retry.
    pub initial_backoff: Duration,
    /// Upper bound of the retry delay.
    pub max_backoff: Duration,
    /// After the retries.
    pub on_error: OnError,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            timeout: Some(Duration::from_secs(60)),
            max_retries: 0,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            on_error: OnError::Fail,
        }
    }
}

/// How to run a plan.
#[derive(Debug, Clone)]
pub struct Options {
    /// Capacity of connections that declare none.
    pub default_capacity: usize,
    /// Deadline of the whole execution.
    pub timeout: Duration,
    /// Policy of nodes without one of their own.
    pub default_policy: Policy,
    /// Policies by node id.
    pub policies: HashMap<String, Policy>,
    /// Record every message that crosses a connection (for retries).
    pub record_messages: bool,
    /// Most messages recorded in all.
    pub max_recorded_messages: usize,
    /// An event per message moved.
    pub trace_messages: bool,
    /// Messages of `source.input` nodes, by node id.
    pub inputs: HashMap<String, Vec<Value>>,
    /// Nodes not to run but to replay: their recorded messages, by connection id.
    pub replay: HashMap<String, HashMap<String, Vec<Value>>>,
    /// Messages moved per channel operation, at most.
    pub batch: usize,
    /// Where the processes run; `None`: [`Shards::global`].
    pub shards: Option<Arc<Shards>>,
    /// What a jq expression may spend on one message (the time is the node's `timeout_ms`
    /// instead when that is shorter).
    pub jq: csp_components::jq::Limits,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            default_capacity: 16,
            timeout: Duration::from_secs(3600),
            default_policy: Policy::default(),
            policies: HashMap::new(),
            record_messages: false,
            max_recorded_messages: 100_000,
            trace_messages: false,
            inputs: HashMap::new(),
            replay: HashMap::new(),
            batch: 32,
            shards: None,
            jq: csp_components::jq::Limits::default(),
        }
    }
}

/// What the components may call.
#[derive(Clone, Default)]
pub struct Services {
    /// The AI service.
    pub ai: Option<Arc<dyn Ai>>,
    /// Execution id, for remote components.
    pub execution_id: String,
    /// W3C traceparent of the execution, for remote components.
    pub traceparent: String,
}

/// A reason the plan cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The node concerned, if any.
    pub node_id: String,
    /// The connection concerned, if any.
    pub connection_id: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.node_id.is_empty(), self.connection_id.is_empty()) {
            (false, _) => write!(f, "node `{}`: {}", self.node_id, self.message),
            (true, false) => write!(f, "connection `{}`: {}", self.connection_id, self.message),
            _ => f.write_str(&self.message),
        }
    }
}

/// How an execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Every process ended normally.
    Succeeded,
    /// A node failed, or the deadline passed.
    Failed,
    /// Cancelled.
    Cancelled,
    /// Every live process was blocked on another.
    Deadlocked,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// How it ended.
    pub ending: Ending,
    /// Why it failed or deadlocked.
    pub error: Option<pb::ExecutionError>,
    /// Every node's status and metrics.
    pub nodes: Vec<pb::NodeSummary>,
    /// Messages kept by each `sink.output` node.
    pub outputs: BTreeMap<String, Vec<Value>>,
    /// Messages received by each `sink.output` node (kept or not).
    pub received: BTreeMap<String, u64>,
    /// With `record_messages`: the messages of each connection, by connection id.
    pub recorded: BTreeMap<String, Vec<Value>>,
}

enum Work {
    Source(Box<dyn components::Source>),
    Transform(Box<dyn components::Transform>),
    Async(Box<dyn components::AsyncTransform>),
    Join(components::Join),
    Remote(remote::Remote),
    Replay(HashMap<usize, Vec<Value>>),
    Feed(mpsc::Receiver<Value>),
}

/// A network ready to run.
pub struct Network {
    drivers: Vec<(Driver, Work)>,
    shards: Arc<Shards>,
    graph: Arc<deadlock::Graph>,
    tracker: Arc<deadlock::Tracker>,
    types: Arc<[String]>,
    stats: Vec<Arc<stats::NodeStats>>,
    collected: Vec<(String, Arc<components::Collected>)>,
    shared: Arc<Shared>,
    timeout: Duration,
    /// Fired when the network must stop, and seen by work that does not yield (jq runs).
    stop: CancellationToken,
}

/// Resolved ports of a node: `(inputs, outputs)`.
fn ports(node: &PlanNode) -> Result<(Vec<String>, Vec<String>, Value), String> {
    if let Some(remote) = &node.remote {
        let mut outputs = remote.outputs.clone();
        if !outputs.iter().any(|p| p == "error") {
            outputs.push("error".into());
        }
        return Ok((remote.inputs.clone(), outputs, node.config.clone()));
    }
    let spec = csp_components::builtin(&node.type_id)
        .ok_or_else(|| format!("there is no component type `{}`", node.type_id))?;
    let config = if node.config.is_null() { Value::Object(Default::default()) } else { node.config.clone() };
    let effective = csp_components::validate_config(spec, &config).map_err(|violations| {
        let listed: Vec<String> = violations
            .iter()
            .map(|v| {
                if v.pointer.is_empty() { v.message.clone() } else { format!("{} {}", v.pointer, v.message) }
            })
            .collect();
        format!("invalid configuration: {}", listed.join("; "))
    })?;
    let (inputs, outputs) = csp_components::ports_for(spec, &effective);
    Ok((
        inputs.into_iter().map(|p| p.name).collect(),
        outputs.into_iter().map(|p| p.name).collect(),
        effective,
    ))
}

impl Network {
    /// Checks the plan and sets up its processes and channels. `events` receives the
    /// execution's events as they happen.
    pub fn build(
        plan: &Plan,
        options: Options,
        services: Services,
        debugger: Arc<Debugger>,
        events: mpsc::Sender<Event>,
    ) -> Result<Network, Vec<Problem>> {
        let mut problems = Vec::new();
        let index: HashMap<&str, usize> =
            plan.nodes.iter().enumerate().map(|(i, n)| (n.id.as_str(), i)).collect();
        if index.len() != plan.nodes.len() {
            problems.push(Problem {
                node_id: String::new(),
                connection_id: String::new(),
                message: "node ids repeat".into(),
            });
        }
        let mut resolved = Vec::with_capacity(plan.nodes.len());
        for node in &plan.nodes {
            match ports(node) {
                Ok(ports) => resolved.push(Some(ports)),
                Err(message) => {
                    problems.push(Problem {
                        node_id: node.id.clone(),
                        connection_id: String::new(),
                        message,
                    });
                    resolved.push(None);
                }
            }
        }
        // Channels.
        let inboxes: Vec<Arc<channel::Inbox>> = plan.nodes.iter().map(|_| Arc::default()).collect();
        let mut into: Vec<Vec<(usize, Arc<channel::Channel>)>> = vec![Vec::new(); plan.nodes.len()];
        let mut out_ports: Vec<Vec<Vec<Arc<channel::Channel>>>> = resolved
            .iter()
            .map(|r| r.as_ref().map_or_else(Vec::new, |(_, outputs, _)| vec![Vec::new(); outputs.len()]))
            .collect();
        let mut out_connections: Vec<Vec<Vec<usize>>> =
            out_ports.iter().map(|ports| vec![Vec::new(); ports.len()]).collect();
        let mut edges = Vec::new();
        let mut into_edges: Vec<Vec<usize>> = vec![Vec::new(); plan.nodes.len()];
        for (c, connection) in plan.connections.iter().enumerate() {
            let problem = |message: String| Problem {
                node_id: String::new(),
                connection_id: connection.id.clone(),
                message,
            };
            let (Some(&from), Some(&to)) =
                (index.get(connection.from.as_str()), index.get(connection.to.as_str()))
            else {
                problems.push(problem(format!(
                    "joins `{}` to `{}`, which are not both nodes",
                    connection.from, connection.to
                )));
                continue;
            };
            let (Some((_, from_outputs, _)), Some((to_inputs, _, _))) = (&resolved[from], &resolved[to])
            else {
                continue;
            };
            let Some(out_port) = from_outputs.iter().position(|p| *p == connection.from_port) else {
                problems
                    .push(problem(format!("`{}` has no output `{}`", connection.from, connection.from_port)));
                continue;
            };
            let Some(in_port) = to_inputs.iter().position(|p| *p == connection.to_port) else {
                problems.push(problem(format!("`{}` has no input `{}`", connection.to, connection.to_port)));
                continue;
            };
            let capacity =
                if connection.capacity > 0 { connection.capacity as usize } else { options.default_capacity };
            let channel = Arc::new(channel::Channel::new(c, capacity, inboxes[to].clone()));
            into[to].push((in_port, channel.clone()));
            out_ports[from][out_port].push(channel.clone());
            out_connections[from][out_port].push(c);
            into_edges[to].push(edges.len());
            edges.push(deadlock::Edge {
                connection_id: connection.id.clone(),
                from,
                to,
                to_port: in_port,
                channel,
            });
        }
        if !problems.is_empty() {
            return Err(problems);
        }

        let tracker = Arc::new(deadlock::Tracker::default());
        let recorder = options
            .record_messages
            .then(|| Recorder { limit: options.max_recorded_messages, ..Recorder::default() });
        let shared = Arc::new(Shared {
            debugger,
            events,
            batch: options.batch.max(1),
            trace: options.trace_messages,
            recorder,
            node_ids: plan.nodes.iter().map(|n| n.id.clone()).collect(),
            connections: plan
                .connections
                .iter()
                .map(|c| (c.id.clone(), index.get(c.to.as_str()).copied().unwrap_or(0)))
                .collect(),
        });
        let connection_index: HashMap<&str, usize> =
            plan.connections.iter().enumerate().map(|(i, c)| (c.id.as_str(), i)).collect();

        let stop = CancellationToken::new();
        let stop_check: csp_components::jq::StopCheck = {
            let stop = stop.clone();
            Arc::new(move || stop.is_cancelled())
        };
        let mut drivers = Vec::new();
        let mut waits = Vec::new();
        let mut all_stats = Vec::new();
        let mut collected = Vec::new();
        let mut problems = Vec::new();
        for (i, (node, resolved)) in plan.nodes.iter().zip(resolved).enumerate() {
            let Some((input_names, output_names, effective)) = resolved else { continue };
            let node_waits = Arc::new(deadlock::Waits::new(tracker.clone()));
            let node_stats = Arc::new(stats::NodeStats::default());
            let sink = components::Collected::new(
                effective.get("limit").and_then(Value::as_u64).unwrap_or(10_000) as usize,
            );
            if node.type_id == "sink.output" && !options.replay.contains_key(&node.id) {
                collected.push((node.id.clone(), sink.clone()));
            }
            let work = if let Some(recorded) = options.replay.get(&node.id) {
                Ok(Work::Replay(
                    recorded
                        .iter()
                        .filter_map(|(c, messages)| {
                            Some((*connection_index.get(c.as_str())?, messages.clone()))
                        })
                        .collect(),
                ))
            } else if let Some(endpoint) = &node.remote {
                Ok(Work::Remote(remote::Remote::new(
                    endpoint.clone(),
                    &node.id,
                    effective.clone(),
                    &services,
                    &input_names,
                    &output_names,
                )))
            } else if node.type_id == "remote.call" {
                // The built-in remote call: its configuration names the endpoint, and its
                // `config` is what the component gets.
                let endpoint = RemoteEndpoint {
                    address: effective.get("address").and_then(Value::as_str).unwrap_or_default().to_owned(),
                    timeout_ms: effective.get("timeout_ms").and_then(Value::as_u64).unwrap_or(30_000),
                    inputs: input_names.clone(),
                    outputs: output_names.iter().filter(|p| *p != "error").cloned().collect(),
                };
                let config =
                    effective.get("config").cloned().unwrap_or_else(|| Value::Object(Default::default()));
                Ok(Work::Remote(remote::Remote::new(
                    endpoint,
                    &node.id,
                    config,
                    &services,
                    &input_names,
                    &output_names,
                )))
            } else {
                let jq_time = options
                    .policies
                    .get(&node.id)
                    .unwrap_or(&options.default_policy)
                    .timeout
                    .map_or(options.jq.time, |t| t.min(options.jq.time));
                let cx = components::Context {
                    jq: components::JqBounds {
                        limits: csp_components::jq::Limits { time: jq_time, ..options.jq },
                        stop: stop_check.clone(),
                    },
                    node_id: &node.id,
                    inputs: &input_names,
                    outputs: &output_names,
                    input_messages: options.inputs.get(&node.id).cloned().unwrap_or_default(),
                    collected: sink,
                    ai: services.ai.clone(),
                };
                components::instantiate(&node.type_id, &effective, cx).map(|kind| match kind {
                    components::Kind::Source(s) => Work::Source(s),
                    components::Kind::Transform(t) => Work::Transform(t),
                    components::Kind::Async(a) => Work::Async(a),
                    components::Kind::Join(j) => Work::Join(j),
                })
            };
            let work = match work {
                Ok(work) => work,
                Err(message) => {
                    problems.push(Problem {
                        node_id: node.id.clone(),
                        connection_id: String::new(),
                        message,
                    });
                    continue;
                }
            };
            let policy =
                options.policies.get(&node.id).cloned().unwrap_or_else(|| options.default_policy.clone());
            let error_port = output_names.iter().position(|p| p == "error");
            let driver = Driver {
                idx: i,
                id: node.id.clone(),
                inputs: channel::Inputs::new(inboxes[i].clone(), std::mem::take(&mut into[i])),
                input_names,
                outputs: channel::Outputs::new(std::mem::take(&mut out_ports[i])),
                out_connections: std::mem::take(&mut out_connections[i]),
                waits: node_waits.clone(),
                stats: node_stats.clone(),
                policy,
                error_port,
                shared: shared.clone(),
                spare: Vec::new(),
            };
            waits.push(node_waits);
            all_stats.push(node_stats);
            drivers.push((driver, work));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let graph = Arc::new(deadlock::Graph {
            node_ids: plan.nodes.iter().map(|n| n.id.clone()).collect(),
            waits,
            // Without problems there is one edge per connection, in connection order: the
            // detector finds a send's channel by its connection index.
            edges,
            into: into_edges,
        });
        let shards = options.shards.clone().unwrap_or_else(Shards::global);
        Ok(Network {
            drivers,
            shards,
            graph,
            tracker,
            types: plan.nodes.iter().map(|n| n.type_id.clone()).collect(),
            stats: all_stats,
            collected,
            shared,
            timeout: options.timeout,
            stop,
        })
    }

    /// Streams messages into a `source.input` node instead of its fixed inputs, up to
    /// `capacity` queued; the node ends when the sender is dropped.
    pub fn feed(&mut self, node_id: &str, capacity: usize) -> Option<mpsc::Sender<Value>> {
        let (driver, work) = self.drivers.iter_mut().find(|(d, _)| d.id == node_id)?;
        if !matches!(work, Work::Source(_)) || !driver.input_names.is_empty() {
            return None;
        }
        let (tx, rx) = mpsc::channel(capacity.max(1));
        *work = Work::Feed(rx);
        Some(tx)
    }

    /// Hands every message a `sink.output` node receives to the returned receiver as well.
    pub fn tap(&mut self, node_id: &str) -> Option<mpsc::UnboundedReceiver<Value>> {
        let (_, collected) = self.collected.iter().find(|(id, _)| id == node_id)?;
        let (tx, rx) = mpsc::unbounded_channel();
        collected.tap.set(tx).ok()?;
        Some(rx)
    }

    /// Runs every process until the network ends, fails, deadlocks, times out or `cancel`
    /// fires.
    ///
    /// The whole network — its processes and the supervisor that watches them — runs on one
    /// shard, so the only hand-offs between threads are the start, the events and the end.
    pub async fn run(self, cancel: CancellationToken) -> Outcome {
        let shard = self.shards.pick().clone();
        // Dropping this future stops the network, as it would if it ran here. The stop is
        // passed on from here, not from the shard: work that does not yield (a jq run) holds
        // the shard's thread until it sees the stop itself.
        let stop = self.stop.clone();
        let _stop_when_dropped = stop.clone().drop_guard();
        // Shared, not copied: for the outcome of a crash only.
        let (shared, types) = (self.shared.clone(), self.types.clone());
        // The network's spans (one per node) are children of the caller's (the execution's).
        let span = tracing::Span::current();
        let mut supervisor = shard.clone().spawn(self.supervise(stop.clone(), shard).instrument(span));
        let joined = tokio::select! {
            joined = &mut supervisor => joined,
            () = cancel.cancelled() => {
                stop.cancel();
                supervisor.await
            }
        };
        match joined {
            Ok(outcome) => outcome,
            Err(crashed) => {
                tracing::error!(error = %crashed, "the execution's supervisor crashed");
                Outcome {
                    ending: Ending::Failed,
                    error: Some(pb::ExecutionError {
                        code: "internal".into(),
                        message: format!("the execution crashed: {crashed}"),
                        ..Default::default()
                    }),
                    nodes: shared
                        .node_ids
                        .iter()
                        .zip(types.iter())
                        .map(|(node_id, r#type)| pb::NodeSummary {
                            node_id: node_id.clone(),
                            r#type: r#type.clone(),
                            status: pb::NodeStatus::Cancelled as i32,
                            ..Default::default()
                        })
                        .collect(),
                    outputs: BTreeMap::new(),
                    received: BTreeMap::new(),
                    recorded: BTreeMap::new(),
                }
            }
        }
    }

    async fn supervise(self, cancel: CancellationToken, shard: tokio::runtime::Handle) -> Outcome {
        let Network { drivers, shards: _, graph, tracker, types, stats, collected, shared, timeout, stop: _ } =
            self;
        let n = types.len();
        let mut status = vec![pb::NodeStatus::Pending; n];
        let mut errors = vec![String::new(); n];
        let mut replayed = vec![false; n];
        let mut tasks = JoinSet::new();
        let mut task_nodes = HashMap::new();
        let node_status = |id: &str, s: pb::NodeStatus, error: &str| {
            Event::NodeStatusChanged(pb::NodeStatusChanged {
                node_id: id.to_owned(),
                status: s as i32,
                error: error.to_owned(),
            })
        };
        for (driver, work) in drivers {
            let idx = driver.index();
            let waits = driver.waits.clone();
            let is_replay = matches!(work, Work::Replay(_));
            replayed[idx] = is_replay;
            status[idx] = if is_replay { pb::NodeStatus::Replayed } else { pb::NodeStatus::Running };
            shared.emit(node_status(&shared.node_ids[idx], status[idx], "")).await;
            // One span per node per execution (not per message), for the whole of its process.
            let span = tracing::info_span!(
                "node",
                otel.name = %format_args!("node {}", shared.node_ids[idx]),
                node.id = %shared.node_ids[idx],
                node.type = %types[idx],
                node.replayed = is_replay,
                otel.status_code = tracing::field::Empty,
                otel.status_message = tracing::field::Empty,
            );
            let handle = tasks.spawn_on(
                async move {
                    let result = match work {
                        Work::Source(s) => driver.run_source(s).await,
                        Work::Transform(t) => driver.run_transform(t).await,
                        Work::Async(a) => driver.run_async(a).await,
                        Work::Join(j) => driver.run_join(j).await,
                        Work::Remote(r) => r.run(driver).await,
                        Work::Replay(recorded) => driver.run_replay(recorded).await,
                        Work::Feed(rx) => driver.run_feed(rx).await,
                    };
                    waits.done();
                    if let Err(NodeFailed(error)) = &result {
                        let span = tracing::Span::current();
                        span.record("otel.status_code", "ERROR");
                        span.record("otel.status_message", error.as_str());
                    }
                    (idx, result)
                }
                .instrument(span),
                &shard,
            );
            task_nodes.insert(handle.id(), idx);
        }

        let deadline = tokio::time::Instant::now() + timeout;
        let mut look = tokio::time::interval(Duration::from_millis(100));
        let mut looks = 0u64;
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut report = tokio::time::interval(Duration::from_secs(1));
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        report.tick().await;
        let mut reported: HashSet<Vec<String>> = HashSet::new();
        let mut blocked: Vec<String> = Vec::new();
        let mut exported = vec![pb::NodeMetrics::default(); n];
        let summaries = |status: &[pb::NodeStatus], errors: &[String]| -> Vec<pb::NodeSummary> {
            (0..n)
                .map(|i| pb::NodeSummary {
                    node_id: shared.node_ids[i].clone(),
                    r#type: types[i].clone(),
                    status: status[i] as i32,
                    metrics: stats.get(i).map(|s| s.to_pb()),
                    error: errors[i].clone(),
                })
                .collect()
        };

        let ending: Option<(Ending, pb::ExecutionError)> = loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    break Some((Ending::Cancelled, pb::ExecutionError {
                        code: "cancelled".into(),
                        message: "the execution was cancelled".into(),
                        ..Default::default()
                    }));
                }
                joined = tasks.join_next() => match joined {
                    None => break None,
                    Some(Ok((idx, Ok(())))) => {
                        if !replayed[idx] {
                            status[idx] = pb::NodeStatus::Completed;
                            shared.emit(node_status(&shared.node_ids[idx], status[idx], "")).await;
                        }
                    }
                    Some(Ok((idx, Err(NodeFailed(error))))) => {
                        status[idx] = pb::NodeStatus::Failed;
                        errors[idx] = error.clone();
                        shared.emit(node_status(&shared.node_ids[idx], status[idx], &error)).await;
                        let id = shared.node_ids[idx].clone();
                        break Some((Ending::Failed, pb::ExecutionError {
                            code: "node_failed".into(),
                            message: format!("`{id}` failed: {error}"),
                            node_id: id,
                            ..Default::default()
                        }));
                    }
                    Some(Err(crashed)) => {
                        let idx = task_nodes.get(&crashed.id()).copied().unwrap_or(0);
                        let error = if crashed.is_panic() { "the process crashed".to_owned() } else { crashed.to_string() };
                        tracing::error!(node = %shared.node_ids[idx], %error, "node process crashed");
                        status[idx] = pb::NodeStatus::Failed;
                        errors[idx] = error.clone();
                        let id = shared.node_ids[idx].clone();
                        break Some((Ending::Failed, pb::ExecutionError {
                            code: "internal".into(),
                            message: format!("`{id}` failed: {error}"),
                            node_id: id,
                            ..Default::default()
                        }));
                    }
                },
                () = tokio::time::sleep_until(deadline) => {
                    break Some((Ending::Failed, pb::ExecutionError {
                        code: "timeout".into(),
                        message: format!("the execution did not finish within {} s", timeout.as_secs_f64()),
                        ..Default::default()
                    }));
                }
                _ = look.tick() => {
                    looks += 1;
                    if !tracker.all_blocked() && !looks.is_multiple_of(2) {
                        continue;
                    }
                    if let Some(found) = graph.find(Duration::from_millis(30)).await {
                        if found.total {
                            break Some(deadlocked(&shared, found, &mut blocked).await);
                        }
                        if reported.insert(found.node_ids.clone()) {
                            shared.emit(Event::DeadlockDetected(deadlock_event(&found))).await;
                        }
                    }
                }
                _ = report.tick() => {
                    export_metrics(&types, &stats, &mut exported);
                    shared.emit(Event::Metrics(pb::MetricsSnapshot { nodes: summaries(&status, &errors) })).await;
                }
            }
        };

        let (ending, error) = match ending {
            None => (Ending::Succeeded, None),
            Some((ending, error)) => {
                shared.debugger.disarm();
                tasks.abort_all();
                while let Some(joined) = tasks.join_next().await {
                    if let Ok((idx, result)) = joined
                        && status[idx] == pb::NodeStatus::Running
                    {
                        status[idx] = match result {
                            Ok(()) => pb::NodeStatus::Completed,
                            Err(NodeFailed(e)) => {
                                errors[idx] = e;
                                pb::NodeStatus::Failed
                            }
                        };
                    }
                }
                for (i, s) in status.iter_mut().enumerate() {
                    if *s == pb::NodeStatus::Running || *s == pb::NodeStatus::Pending {
                        *s = if blocked.contains(&shared.node_ids[i]) {
                            pb::NodeStatus::Blocked
                        } else {
                            pb::NodeStatus::Cancelled
                        };
                        shared.emit(node_status(&shared.node_ids[i], *s, "")).await;
                    }
                }
                (ending, Some(error))
            }
        };
        export_metrics(&types, &stats, &mut exported);
        let recorded = shared
            .recorder
            .as_ref()
            .map(|r| {
                let messages = std::mem::take(
                    &mut *r.messages.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
                );
                messages.into_iter().map(|(c, m)| (shared.connections[c].0.clone(), m)).collect()
            })
            .unwrap_or_default();
        Outcome {
            ending,
            error,
            nodes: summaries(&status, &errors),
            received: collected.iter().map(|(id, c)| (id.clone(), c.received())).collect(),
            outputs: collected.into_iter().map(|(id, c)| (id, c.take())).collect(),
            recorded,
        }
    }
}

fn deadlock_event(found: &deadlock::Deadlock) -> pb::DeadlockDetected {
    pb::DeadlockDetected {
        node_ids: found.node_ids.clone(),
        connection_ids: found.connection_ids.clone(),
        total: found.total,
        description: found.description.clone(),
    }
}

async fn deadlocked(
    shared: &Shared,
    found: deadlock::Deadlock,
    blocked: &mut Vec<String>,
) -> (Ending, pb::ExecutionError) {
    shared.emit(Event::DeadlockDetected(deadlock_event(&found))).await;
    blocked.clone_from(&found.node_ids);
    (
        Ending::Deadlocked,
        pb::ExecutionError {
            code: "deadlock".into(),
            message: format!("every live process is blocked: {}", found.description),
            node_id: String::new(),
            blocked_node_ids: found.node_ids,
            blocked_connection_ids: found.connection_ids,
        },
    )
}

/// Describes the runtime's metrics (HELP text on `/metrics`).
pub(crate) fn describe_metrics() {
    let counters = [
        ("csp_executor_node_messages_total", "Messages received by nodes, by component type"),
        ("csp_executor_node_sent_total", "Messages sent by nodes, by component type"),
        ("csp_executor_node_errors_total", "Messages that failed in nodes, by component type"),
        ("csp_executor_node_retries_total", "Retries of failed messages, by component type"),
        (
            "csp_executor_counted_messages_total",
            "Messages counted by `metrics.counter` nodes, by counter name",
        ),
    ];
    for (name, help) in counters {
        metrics::describe_counter!(name, help);
    }
    metrics::describe_gauge!(
        "csp_executor_node_busy_seconds",
        metrics::Unit::Seconds,
        "Time nodes spent processing messages, by component type (only grows: use rate())"
    );
    metrics::describe_histogram!(
        "csp_executor_node_processing_p99_seconds",
        metrics::Unit::Seconds,
        "Each execution's p99 time to process one message, by component type"
    );
}

/// Adds what the nodes did since the last call to the Prometheus counters, by component type.
fn export_metrics(types: &[String], stats: &[Arc<stats::NodeStats>], last: &mut [pb::NodeMetrics]) {
    for ((type_id, node), last) in types.iter().zip(stats).zip(last.iter_mut()) {
        let now = node.to_pb();
        let delta = |a: i64, b: i64| (a - b).max(0) as u64;
        let labels = [("type", type_id.clone())];
        metrics::counter!("csp_executor_node_messages_total", &labels[..])
            .increment(delta(now.messages_in, last.messages_in));
        metrics::counter!("csp_executor_node_sent_total", &labels[..])
            .increment(delta(now.messages_out, last.messages_out));
        metrics::counter!("csp_executor_node_errors_total", &labels[..])
            .increment(delta(now.errors, last.errors));
        metrics::counter!("csp_executor_node_retries_total", &labels[..])
            .increment(delta(now.retries, last.retries));
        let busy = (now.processing_total_us - last.processing_total_us).max(0.0);
        metrics::gauge!("csp_executor_node_busy_seconds", &labels[..]).increment(busy / 1e6);
        if now.messages_in > last.messages_in {
            metrics::histogram!("csp_executor_node_processing_p99_seconds", &labels[..])
                .record(now.processing_p99_us / 1e6);
        }
        *last = now;
    }
}

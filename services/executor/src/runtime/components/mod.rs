//! The built-in components, as the runtime runs them.
//!
//! Most components are [`Transform`]s: synchronous, one message in, any number out, driven in
//! batches by the runtime (no allocation or `await` per message). Components that wait on the
//! outside world (AI, remote endpoints) are [`AsyncTransform`]s; sources are [`Source`]s; join
//! reads its inputs in turn and has a driver of its own.

use std::{sync::Arc, time::Instant};

use csp_proto::executor::v1 as pb;
use serde_json::Value;

use super::channel::Msg;

pub(crate) mod ai;
mod control;
mod paths;
mod sinks;
mod sources;
mod transforms;

pub(crate) use control::Join;
pub(crate) use sinks::Collected;

/// What a component produced while handling a batch: messages per output port, and events.
#[derive(Debug, Default)]
pub(crate) struct Emit {
    pub(crate) ports: Vec<Vec<Msg>>,
    pub(crate) events: Vec<pb::execution_event::Kind>,
}

impl Emit {
    pub(crate) fn new(outputs: usize) -> Self {
        Self { ports: (0..outputs).map(|_| Vec::with_capacity(32)).collect(), events: Vec::new() }
    }

    /// Sends a message on output `port`.
    #[inline]
    pub(crate) fn push(&mut self, port: usize, msg: Msg) {
        if let Some(buffer) = self.ports.get_mut(port) {
            buffer.push(msg);
        }
    }

    /// Sends a new value on output `port`.
    #[inline]
    pub(crate) fn value(&mut self, port: usize, value: Value) {
        self.push(port, super::channel::msg(value));
    }

    /// Reports an event.
    pub(crate) fn event(&mut self, kind: pb::execution_event::Kind) {
        self.events.push(kind);
    }
}

/// A message a component could not handle.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) error: String,
    /// The message as it arrived, for retries and the `error` port.
    pub(crate) message: Msg,
    /// Whether another try may succeed (timeouts, remote errors said to be transient).
    pub(crate) retryable: bool,
}

impl Failure {
    pub(crate) fn new(error: impl Into<String>, message: Msg) -> Self {
        Self { error: error.into(), message, retryable: false }
    }
}

/// A synchronous component.
pub(crate) trait Transform: Send {
    /// Handles one message that arrived on input `port` (index).
    fn process(&mut self, port: usize, msg: Msg, out: &mut Emit) -> Result<(), Failure>;

    /// Every input closed: send what is held back.
    fn finish(&mut self, _out: &mut Emit) -> Result<(), String> {
        Ok(())
    }

    /// Reads inputs in port order (priority) rather than fairly.
    fn ordered(&self) -> bool {
        false
    }

    /// When [`Transform::on_timer`] must run next, if ever.
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// A deadline passed.
    fn on_timer(&mut self, _now: Instant, _out: &mut Emit) {}

    /// Whether it takes messages now (a delay holding its maximum does not).
    fn accepting(&self) -> bool {
        true
    }

    /// Whether it still holds messages that its timer will send.
    fn holding(&self) -> bool {
        false
    }
}

/// A component that waits on something outside the process network.
#[tonic::async_trait]
pub(crate) trait AsyncTransform: Send {
    /// Handles one message that arrived on input `port`; `Err((error, retryable))`.
    async fn process(&mut self, port: usize, msg: &Msg, out: &mut Emit) -> Result<(), (String, bool)>;
}

/// A component without inputs.
pub(crate) trait Source: Send {
    /// Adds up to `max` messages to `out`; `false` once there are no more.
    fn fill(&mut self, out: &mut Emit, max: usize) -> bool;

    /// A pause between messages, if any (then one message per fill).
    fn interval(&self) -> Option<std::time::Duration> {
        None
    }
}

/// How a node runs.
pub(crate) enum Kind {
    Source(Box<dyn Source>),
    Transform(Box<dyn Transform>),
    Async(Box<dyn AsyncTransform>),
    Join(Join),
}

/// What a jq expression of a node may spend on one message, and how it learns that the
/// network is stopping.
#[derive(Clone)]
pub(crate) struct JqBounds {
    pub(crate) limits: csp_components::jq::Limits,
    pub(crate) stop: csp_components::jq::StopCheck,
}

/// What a component needs from its surroundings.
pub(crate) struct Context<'a> {
    /// Bounds of the node's jq expressions.
    pub(crate) jq: JqBounds,
    pub(crate) node_id: &'a str,
    /// Resolved port names.
    pub(crate) inputs: &'a [String],
    pub(crate) outputs: &'a [String],
    /// Messages for `source.input` nodes.
    pub(crate) input_messages: Vec<Value>,
    /// Where `sink.output` keeps its messages.
    pub(crate) collected: Arc<Collected>,
    /// Calls to the AI service, if the runtime has them.
    pub(crate) ai: Option<Arc<dyn ai::Ai>>,
}

impl Context<'_> {
    pub(crate) fn output(&self, name: &str) -> Result<usize, String> {
        self.outputs.iter().position(|p| p == name).ok_or_else(|| format!("no output port `{name}`"))
    }
}

fn text<'a>(config: &'a Value, key: &str) -> Option<&'a str> {
    config.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn jq(config: &Value, key: &str, bounds: &JqBounds) -> Result<csp_components::jq::Filter, String> {
    let code = text(config, key).ok_or_else(|| format!("`{key}` is required"))?;
    let filter = csp_components::jq::compile(code)
        .map_err(|e| format!("`{key}` is not a valid jq expression: {e}"))?;
    Ok(bounds.bounded(filter))
}

impl JqBounds {
    pub(crate) fn bounded(&self, filter: csp_components::jq::Filter) -> csp_components::jq::Filter {
        filter.bounded(self.limits, Some(self.stop.clone()))
    }
}

/// The component for a built-in type with a valid (effective) configuration.
pub(crate) fn instantiate(type_id: &str, config: &Value, cx: Context<'_>) -> Result<Kind, String> {
    Ok(match type_id {
        "source.input" => Kind::Source(Box::new(sources::Input::new(cx.input_messages))),
        "source.constant" => Kind::Source(Box::new(sources::Constant::new(config))),
        "source.sequence" => Kind::Source(Box::new(sources::Sequence::new(config))),
        "sink.output" => Kind::Transform(Box::new(sinks::Output::new(cx.node_id, cx.collected))),
        "sink.log" => Kind::Transform(Box::new(sinks::Log::new(cx.node_id, config))),
        "transform.set" => Kind::Transform(Box::new(transforms::Set::new(config, cx.output("out")?)?)),
        "transform.map" => Kind::Transform(Box::new(transforms::Map::new(
            jq(config, "expression", &cx.jq)?,
            cx.output("out")?,
        ))),
        "transform.filter" => Kind::Transform(Box::new(transforms::Filter::new(
            jq(config, "expression", &cx.jq)?,
            cx.output("out")?,
        ))),
        "transform.reduce" => Kind::Transform(Box::new(transforms::Reduce::new(
            config,
            jq(config, "expression", &cx.jq)?,
            cx.output("out")?,
        ))),
        "transform.template" => {
            Kind::Transform(Box::new(transforms::Template::new(config, cx.output("out")?)?))
        }
        "control.switch" => Kind::Transform(Box::new(control::Switch::new(config, &cx)?)),
        "control.split" => Kind::Transform(Box::new(control::Split::new(config, cx.output("out")?))),
        "control.merge" => Kind::Transform(Box::new(control::Merge { out: cx.output("out")? })),
        "control.alt" => Kind::Transform(Box::new(control::Alt::new(config, &cx)?)),
        "control.join" => Kind::Join(Join::new(config, &cx)?),
        "control.batch" => Kind::Transform(Box::new(control::Batch::new(config, cx.output("out")?))),
        "control.delay" => Kind::Transform(Box::new(control::Delay::new(config, cx.output("out")?))),
        "validate.json_schema" => Kind::Transform(Box::new(transforms::Validate::new(config, &cx)?)),
        "metrics.counter" => Kind::Transform(Box::new(sinks::Counter::new(config, &cx)?)),
        "metrics.stats" => Kind::Transform(Box::new(sinks::Stats::new(config, cx.output("out")?))),
        "ai.chat" | "ai.analyze" | "ai.agent" | "ai.codegen" => {
            let out = cx.output("out")?;
            Kind::Async(Box::new(ai::AiNode::new(type_id, config, cx.node_id, cx.ai, out)))
        }
        other => return Err(format!("the runtime has no component `{other}`")),
    })
}

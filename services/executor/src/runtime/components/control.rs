//! `control.*`.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use csp_components::jq;
use serde_json::{Map as JsonMap, Value, json};

use super::{Context, Emit, Failure, Transform, paths::Path, text};
use crate::runtime::channel::{Msg, into_value};

/// `control.switch`: the output of the first (or every) case whose predicate holds, else
/// `default`.
pub(crate) struct Switch {
    cases: Vec<(usize, jq::Filter)>,
    all: bool,
    default: usize,
}

impl Switch {
    pub(crate) fn new(config: &Value, cx: &Context<'_>) -> Result<Self, String> {
        let cases = config
            .get("cases")
            .and_then(Value::as_array)
            .ok_or("`cases` is required")?
            .iter()
            .enumerate()
            .map(|(i, case)| {
                let port = cx.output(text(case, "port").unwrap_or_default())?;
                let code = text(case, "expression").unwrap_or_default();
                let filter =
                    cx.jq.bounded(jq::compile(code).map_err(|e| format!("`cases[{i}].expression`: {e}"))?);
                Ok((port, filter))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self { cases, all: text(config, "mode") == Some("all"), default: cx.output("default")? })
    }
}

impl Transform for Switch {
    fn process(&mut self, _port: usize, msg: Msg, out: &mut Emit) -> Result<(), Failure> {
        let mut matched = false;
        for (port, filter) in &self.cases {
            match filter.test(&msg) {
                Ok(true) => {
                    out.push(*port, msg.clone());
                    matched = true;
                    if !self.all {
                        break;
                    }
                }
                Ok(false) => {}
                Err(e) => return Err(Failure::new(e, msg)),
            }
        }
        if !matched {
            out.push(self.default, msg);
        }
        Ok(())
    }
}

/// `control.split`: each element of an array as a message.
pub(crate) struct Split {
    path: Option<Path>,
    out: usize,
}

impl Split {
    pub(crate) fn new(config: &Value, out: usize) -> Self {
        Self { path: text(config, "path").map(Path::parse), out }
    }
}

impl Transform for Split {
    fn process(&mut self, _port: usize, msg: Msg, out: &mut Emit) -> Result<(), Failure> {
        let items = match &self.path {
            Some(path) => path.get(&msg),
            None => Some(&*msg),
        };
        match items {
            Some(Value::Array(items)) => {
                for item in items {
                    out.value(self.out, item.clone());
                }
                Ok(())
            }
            _ => {
                let at = self.path.as_ref().map_or("the message".to_owned(), |p| format!("`{}`", p.as_str()));
                Err(Failure::new(format!("{at} is not an array"), msg))
            }
        }
    }
}

/// `control.merge`: every message, in arrival order.
pub(crate) struct Merge {
    pub(crate) out: usize,
}

impl Transform for Merge {
    #[inline]
    fn process(&mut self, _port: usize, msg: Msg, out: &mut Emit) -> Result<(), Failure> {
        out.push(self.out, msg);
        Ok(())
    }
}

/// `control.alt`: whichever input is ready (fairly, or by priority), tagged with its input.
pub(crate) struct Alt {
    names: Vec<String>,
    ordered: bool,
    tag: bool,
    out: usize,
}

impl Alt {
    pub(crate) fn new(config: &Value, cx: &Context<'_>) -> Result<Self, String> {
        Ok(Self {
            names: cx.inputs.to_vec(),
            ordered: text(config, "priority") == Some("ordered"),
            tag: config.get("tag").and_then(Value::as_bool).unwrap_or(true),
            out: cx.output("out")?,
        })
    }
}

impl Transform for Alt {
    fn process(&mut self, port: usize, msg: Msg, out: &mut Emit) -> Result<(), Failure> {
        if self.tag {
            let name = self.names.get(port).cloned().unwrap_or_default();
            out.value(self.out, json!({ "port": name, "message": &*msg }));
        } else {
            out.push(self.out, msg);
        }
        Ok(())
    }

    fn ordered(&self) -> bool {
        self.ordered
    }
}

/// `control.join`: one message from each input, in turn, sent together. It has a driver of its
/// own (see the runtime): it reads port by port.
pub(crate) struct Join {
    pub(crate) names: Vec<String>,
    pub(crate) array: bool,
    pub(crate) out: usize,
}

impl Join {
    pub(crate) fn new(config: &Value, cx: &Context<'_>) -> Result<Self, String> {
        Ok(Self {
            names: cx.inputs.to_vec(),
            array: text(config, "into") == Some("array"),
            out: cx.output("out")?,
        })
    }

    /// One joined message from one message per input, in port order.
    pub(crate) fn join(&self, parts: Vec<Msg>) -> Value {
        let owned = parts.into_iter().map(into_value);
        if self.array {
            Value::Array(owned.collect())
        } else {
            Value::Object(self.names.iter().cloned().zip(owned).collect::<JsonMap<String, Value>>())
        }
    }
}

/// `control.batch`: arrays of `size`, or what there is after `timeout_ms`.
pub(crate) struct Batch {
    size: usize,
    timeout: Option<Duration>,
    held: Vec<Value>,
    since: Option<Instant>,
    out: usize,
}

impl Batch {
    pub(crate) fn new(config: &Value, out: usize) -> Self {
        let size = config.get("size").and_then(Value::as_u64).unwrap_or(1).max(1) as usize;
        let timeout =
            config.get("timeout_ms").and_then(Value::as_u64).filter(|t| *t > 0).map(Duration::from_millis);
        Self { size, timeout, held: Vec::with_capacity(size.min(4096)), since: None, out }
    }

    fn send(&mut self, out: &mut Emit) {
        if !self.held.is_empty() {
            let batch = std::mem::replace(&mut self.held, Vec::with_capacity(self.size.min(4096)));
            out.value(self.out, Value::Array(batch));
        }
        self.since = None;
    }
}

impl Transform for Batch {
    fn process(&mut self, _port: usize, msg: Msg, out: &mut Emit) -> Result<(), Failure> {
        if self.held.is_empty() {
            self.since = Some(Instant::now());
        }
        self.held.push(into_value(msg));
        if self.held.len() >= self.size {
            self.send(out);
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Emit) -> Result<(), String> {
        self.send(out);
        Ok(())
    }

    fn deadline(&self) -> Option<Instant> {
        Some(self.since? + self.timeout?)
    }

    fn on_timer(&mut self, _now: Instant, out: &mut Emit) {
        self.send(out);
    }
}

/// Messages a delay holds at most; beyond it, it stops taking messages (back-pressure).
const DELAY_HOLD: usize = 4096;

/// `control.delay`: each message held for `delay_ms` (plus up to `jitter_ms`), many at once;
/// with `rate_per_second`, no two messages closer than `1 / rate` apart, in order (a throttle).
pub(crate) struct Delay {
    delay: Duration,
    jitter_ms: u64,
    /// The least time between two messages (the throttle), if any.
    spacing: Option<Duration>,
    /// When the throttle lets the next message through.
    next_slot: Instant,
    held: VecDeque<(Instant, Msg)>,
    out: usize,
}

impl Delay {
    pub(crate) fn new(config: &Value, out: usize) -> Self {
        let spacing = config
            .get("rate_per_second")
            .and_then(Value::as_f64)
            .filter(|rate| *rate > 0.0)
            .map(|rate| Duration::from_secs_f64(1.0 / rate));
        Self {
            delay: Duration::from_millis(config.get("delay_ms").and_then(Value::as_u64).unwrap_or(0)),
            jitter_ms: config.get("jitter_ms").and_then(Value::as_u64).unwrap_or(0),
            spacing,
            next_slot: Instant::now(),
            held: VecDeque::new(),
            out,
        }
    }
}

impl Transform for Delay {
    fn process(&mut self, _port: usize, msg: Msg, _out: &mut Emit) -> Result<(), Failure> {
        let jitter = if self.jitter_ms > 0 { rand::random_range(0..=self.jitter_ms) } else { 0 };
        let mut due = Instant::now() + self.delay + Duration::from_millis(jitter);
        if let Some(spacing) = self.spacing {
            due = due.max(self.next_slot);
            self.next_slot = due + spacing;
        }
        // Keep the queue ordered by due time (jitter may reorder).
        let at = self.held.iter().rposition(|(d, _)| *d <= due).map_or(0, |i| i + 1);
        self.held.insert(at, (due, msg));
        Ok(())
    }

    fn deadline(&self) -> Option<Instant> {
        self.held.front().map(|(due, _)| *due)
    }

    fn on_timer(&mut self, now: Instant, out: &mut Emit) {
        while self.held.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, msg)) = self.held.pop_front() {
                out.push(self.out, msg);
            }
        }
    }

    fn accepting(&self) -> bool {
        self.held.len() < DELAY_HOLD
    }

    fn holding(&self) -> bool {
        !self.held.is_empty()
    }
}

//! `source.input`, `source.constant`, `source.sequence`.

use std::time::Duration;

use serde_json::{Map, Value};

use super::{Emit, Source};

/// The execution's input messages for this node.
pub(crate) struct Input {
    messages: std::vec::IntoIter<Value>,
}

impl Input {
    pub(crate) fn new(messages: Vec<Value>) -> Self {
        Self { messages: messages.into_iter() }
    }
}

impl Source for Input {
    fn fill(&mut self, out: &mut Emit, max: usize) -> bool {
        for _ in 0..max {
            match self.messages.next() {
                Some(value) => out.value(0, value),
                None => return false,
            }
        }
        true
    }
}

/// The same message, `count` times (shared, not copied).
pub(crate) struct Constant {
    value: crate::runtime::channel::Msg,
    left: u64,
}

impl Constant {
    pub(crate) fn new(config: &Value) -> Self {
        Self {
            value: crate::runtime::channel::msg(config.get("value").cloned().unwrap_or(Value::Null)),
            left: config.get("count").and_then(Value::as_u64).unwrap_or(1),
        }
    }
}

impl Source for Constant {
    fn fill(&mut self, out: &mut Emit, max: usize) -> bool {
        let n = (max as u64).min(self.left);
        for _ in 0..n {
            out.push(0, self.value.clone());
        }
        self.left -= n;
        self.left > 0
    }
}

/// start, start+step, ... as numbers or `{field: n}`.
pub(crate) struct Sequence {
    next: i64,
    step: i64,
    left: u64,
    field: Option<String>,
    interval: Option<Duration>,
}

impl Sequence {
    pub(crate) fn new(config: &Value) -> Self {
        Self {
            next: config.get("start").and_then(Value::as_i64).unwrap_or(0),
            step: config.get("step").and_then(Value::as_i64).unwrap_or(1),
            left: config.get("count").and_then(Value::as_u64).unwrap_or(0),
            field: config.get("field").and_then(Value::as_str).map(str::to_owned),
            interval: config
                .get("interval_ms")
                .and_then(Value::as_u64)
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis),
        }
    }
}

impl Source for Sequence {
    fn fill(&mut self, out: &mut Emit, max: usize) -> bool {
        let n = (max as u64).min(self.left);
        for _ in 0..n {
            let number = Value::from(self.next);
            let value = match &self.field {
                Some(field) => {
                    let mut map = Map::new();
                    map.insert(field.clone(), number);
                    Value::Object(map)
                }
                None => number,
            };
            out.value(0, value);
            self.next = self.next.wrapping_add(self.step);
        }
        self.left -= n;
        self.left > 0
    }

    fn interval(&self) -> Option<Duration> {
        self.interval
    }
}

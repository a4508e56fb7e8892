//! `sink.output`, `sink.log`, `metrics.counter`, `metrics.stats`.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use csp_components::jq;
use csp_proto::{executor::v1 as pb, json as pbjson};
use serde_json::{Value, json};

use super::{Context, Emit, Failure, Transform, paths::Path, text};
use crate::runtime::channel::{Msg, into_value};

/// The messages a `sink.output` node keeps: the execution's result.
#[derive(Debug)]
pub(crate) struct Collected {
    limit: usize,
    values: Mutex<Vec<Value>>,
    received: AtomicU64,
    /// Also hands every message to whoever listens (see `Network::tap`).
    pub(crate) tap: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Value>>,
}

impl Collected {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            values: Mutex::new(Vec::new()),
            received: AtomicU64::new(0),
            tap: std::sync::OnceLock::new(),
        })
    }

    /// The kept messages.
    pub(crate) fn take(&self) -> Vec<Value> {
        std::mem::take(&mut *self.values.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// How many arrived (kept or not).
    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// `sink.output`.
pub(crate) struct Output {
    node_id: String,
    collected: Arc<Collected>,
    kept: usize,
}

impl Output {
    pub(crate) fn new(node_id: &str, collected: Arc<Collected>) -> Self {
        Self { node_id: node_id.to_owned(), collected, kept: 0 }
    }
}

impl Transform for Output {
    #[inline]
    fn process(&mut self, _port: usize, msg: Msg, out: &mut Emit) -> Result<(), Failure> {
        self.collected.received.fetch_add(1, Ordering::Relaxed);
        if let Some(tap) = self.collected.tap.get() {
            let _ = tap.send((*msg).clone());
        }
        if self.kept < self.collected.limit {
            self.kept += 1;
            let value = into_value(msg);
            out.event(pb::execution_event::Kind::Output(pb::OutputEmitted {
                node_id: self.node_id.clone(),
                payload: Some(pbjson::to_value(value.clone())),
            }));
            self.collected.values.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(value);
        }
        Ok(())
    }
}

/// `sink.log`: a log line event per message.
pub(crate) struct Log {
    node_id: String,
    level: String,
    text: String,
}

impl Log {
    pub(crate) fn new(node_id: &str, config: &Value) -> Self {
        Self {
            node_id: node_id.to_owned(),
            level: text(config, "level").unwrap_or("info").to_owned(),
            text: text(config, "message").unwrap_or_default().to_owned(),
        }
    }
}

impl Transform for Log {
    fn process(&mut self, _port: usize, msg: Msg, out: &mut Emit) -> Result<(), Failure> {
        let message = if self.text.is_empty() { msg.to_string() } else { format!("{} {}", self.text, msg) };
        out.event(pb::execution_event::Kind::Log(pb::LogLine {
            node_id: self.node_id.clone(),
            level: self.level.clone(),
            message: message.chars().take(2000).collect(),
            data: Some(pbjson::to_value((*msg).clone())),
        }));
        Ok(())
    }
}

/// Messages counted between updates of the Prometheus counter.
const COUNTER_FLUSH: u64 = 1024;

/// `metrics.counter`: counts (by key), passes messages on, sends the counts at the end.
pub(crate) struct Counter {
    name: String,
    group_by: Option<jq::Filter>,
    total: u64,
    unflushed: u64,
    by_key: BTreeMap<String, u64>,
    out: usize,
    counts: usize,
}

impl Counter {
    pub(crate) fn new(config: &Value, cx: &Context<'_>) -> Result<Self, String> {
        let group_by = match text(config, "group_by") {
            Some(code) => Some(cx.jq.bounded(jq::compile(code).map_err(|e| format!("`group_by`: {e}"))?)),
            None => None,
        };
        Ok(Self {
            name: text(config, "name").unwrap_or("messages").to_owned(),
            group_by,
            total: 0,
            unflushed: 0,
            by_key: BTreeMap::new(),
            out: cx.output("out")?,
            counts: cx.output("counts")?,
        })
    }

    fn flush_metric(&mut self) {
        if self.unflushed > 0 {
            metrics::counter!("csp_executor_counted_messages_total", "name" => self.name.clone())
                .increment(self.unflushed);
            self.unflushed = 0;
        }
    }
}

impl Transform for Counter {
    fn process(&mut self, _port: usize, msg: Msg, out: &mut Emit) -> Result<(), Failure> {
        if let Some(filter) = &self.group_by {
            let mut key = None;
            if let Err(e) = filter.each(&msg, |value| {
                key = Some(match value {
                    Value::String(s) => s,
                    other => other.to_string(),
                });
                false
            }) {
                return Err(Failure::new(e, msg));
            }
            *self.by_key.entry(key.unwrap_or_else(|| "null".into())).or_default() += 1;
        }
        self.total += 1;
        self.unflushed += 1;
        if self.unflushed >= COUNTER_FLUSH {
            self.flush_metric();
        }
        out.push(self.out, msg);
        Ok(())
    }

    fn finish(&mut self, out: &mut Emit) -> Result<(), String> {
        self.flush_metric();
        out.value(self.counts, json!({ "total": self.total, "by_key": self.by_key }));
        Ok(())
    }
}

/// Values kept exactly for percentiles; beyond, a uniform sample of this many.
const STATS_KEEP: usize = 100_000;

/// `metrics.stats`: count, sum, min, max, mean, p50, p99 of numbers.
pub(crate) struct Stats {
    path: Option<Path>,
    every: Option<u64>,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    sample: Vec<f64>,
    out: usize,
}

impl Stats {
    pub(crate) fn new(config: &Value, out: usize) -> Self {
        Self {
            path: text(config, "path").map(Path::parse),
            every: config.get("every").and_then(Value::as_u64).filter(|n| *n > 0),
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sample: Vec::new(),
            out,
        }
    }

    fn summary(&mut self) -> Value {
        self.sample.sort_by(f64::total_cmp);
        let quantile = |q: f64| -> f64 {
            if self.sample.is_empty() {
                return 0.0;
            }
            let rank = ((self.sample.len() as f64 * q).ceil() as usize).clamp(1, self.sample.len());
            self.sample[rank - 1]
        };
        let (p50, p99) = (quantile(0.5), quantile(0.99));
        let empty = self.count == 0;
        json!({
            "count": self.count,
            "sum": self.sum,
            "min": if empty { 0.0 } else { self.min },
            "max": if empty { 0.0 } else { self.max },
            "mean": if empty { 0.0 } else { self.sum / self.count as f64 },
            "p50": p50,
            "p99": p99,
        })
    }
}

impl Transform for Stats {
    fn process(&mut self, _port: usize, msg: Msg, out: &mut Emit) -> Result<(), Failure> {
        let number = match &self.path {
            Some(path) => path.get(&msg).and_then(Value::as_f64),
            None => msg.as_f64(),
        };
        let Some(x) = number else {
            let at = self.path.as_ref().map_or("the message".to_owned(), |p| format!("`{}`", p.as_str()));
            return Err(Failure::new(format!("{at} is not a number"), msg));
        };
        self.count += 1;
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        if self.sample.len() < STATS_KEEP {
            self.sample.push(x);
        } else {
            let slot = rand::random_range(0..self.count) as usize;
            if slot < STATS_KEEP {
                self.sample[slot] = x;
            }
        }
        if self.every.is_some_and(|every| self.count.is_multiple_of(every)) {
            let summary = self.summary();
            out.value(self.out, summary);
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Emit) -> Result<(), String> {
        let summary = self.summary();
        out.value(self.out, summary);
        Ok(())
    }
}

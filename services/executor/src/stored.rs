//! How executions are stored: JSON mirrors of the API's messages, and the conversions between
//! them, the API and the runtime.

use std::{collections::BTreeMap, time::Duration};

use csp_platform::{FieldViolation, config::ExecutorSettings};
use csp_proto::executor::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::runtime::{OnError, Options, Policy};

/// An execution's status, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Queued,
    Running,
    Paused,
    Succeeded,
    Failed,
    Cancelled,
    Deadlocked,
}

impl Status {
    pub(crate) const ALL: [Status; 7] = [
        Status::Queued,
        Status::Running,
        Status::Paused,
        Status::Succeeded,
        Status::Failed,
        Status::Cancelled,
        Status::Deadlocked,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Deadlocked => "deadlocked",
        }
    }

    pub(crate) fn parse(text: &str) -> Status {
        Status::ALL.into_iter().find(|s| s.as_str() == text).unwrap_or(Status::Failed)
    }

    pub(crate) fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled | Status::Deadlocked)
    }

    pub(crate) fn to_pb(self) -> pb::ExecutionStatus {
        match self {
            Status::Queued => pb::ExecutionStatus::Queued,
            Status::Running => pb::ExecutionStatus::Running,
            Status::Paused => pb::ExecutionStatus::Paused,
            Status::Succeeded => pb::ExecutionStatus::Succeeded,
            Status::Failed => pb::ExecutionStatus::Failed,
            Status::Cancelled => pb::ExecutionStatus::Cancelled,
            Status::Deadlocked => pb::ExecutionStatus::Deadlocked,
        }
    }

    pub(crate) fn from_pb(status: pb::ExecutionStatus) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.to_pb() == status)
    }
}

/// A node policy, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredPolicy {
    timeout_ms: Option<u64>,
    max_retries: u32,
    initial_backoff_ms: u64,
    max_backoff_ms: u64,
    on_error: OnError,
}

impl Default for StoredPolicy {
    fn default() -> Self {
        Self::of(&Policy::default())
    }
}

impl StoredPolicy {
    fn of(policy: &Policy) -> Self {
        Self {
            timeout_ms: policy.timeout.map(|t| t.as_millis() as u64),
            max_retries: policy.max_retries,
            initial_backoff_ms: policy.initial_backoff.as_millis() as u64,
            max_backoff_ms: policy.max_backoff.as_millis() as u64,
            on_error: policy.on_error,
        }
    }

    fn to_runtime(&self) -> Policy {
        Policy {
            timeout: self.timeout_ms.map(Duration::from_millis),
            max_retries: self.max_retries,
            initial_backoff: Duration::from_millis(self.initial_backoff_ms),
            max_backoff: Duration::from_millis(self.max_backoff_ms),
            on_error: self.on_error,
        }
    }

    fn to_pb(&self) -> pb::NodePolicy {
        pb::NodePolicy {
            timeout: self.timeout_ms.map(|ms| duration(Duration::from_millis(ms))),
            max_retries: self.max_retries as i32,
            initial_backoff: Some(duration(Duration::from_millis(self.initial_backoff_ms))),
            max_backoff: Some(duration(Duration::from_millis(self.max_backoff_ms))),
            on_error: match self.on_error {
                OnError::Fail => pb::ErrorPolicy::Fail,
                OnError::Skip => pb::ErrorPolicy::Skip,
                OnError::Route => pb::ErrorPolicy::Route,
            } as i32,
        }
    }
}

/// Execution options, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredOptions {
    pub(crate) default_capacity: u32,
    pub(crate) timeout_ms: u64,
    pub(crate) default_policy: StoredPolicy,
    pub(crate) node_policies: BTreeMap<String, StoredPolicy>,
    pub(crate) breakpoints: Vec<String>,
    pub(crate) record_messages: bool,
    pub(crate) trace_messages: bool,
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// A protobuf duration as a `Duration`, if it is one (not negative, nanos in range).
fn from_pb_duration(d: &prost_types::Duration) -> Option<Duration> {
    (d.seconds >= 0 && (0..1_000_000_000).contains(&d.nanos))
        .then(|| Duration::new(d.seconds as u64, d.nanos as u32))
}

/// Most retries a node may ask for.
const MAX_RETRIES: i32 = 100;
/// Largest channel capacity.
const MAX_CAPACITY: i32 = 1_000_000;

fn policy_from_pb(p: &pb::NodePolicy, field: &str, v: &mut Vec<FieldViolation>) -> StoredPolicy {
    let base = Policy::default();
    let mut get =
        |d: &Option<prost_types::Duration>, name: &str, default: Option<Duration>| -> Option<Duration> {
            match d {
                None => default,
                Some(d) => match from_pb_duration(d) {
                    Some(d) if d.is_zero() && name == "timeout" => {
                        v.push(FieldViolation::new(
                            format!("{field}.{name}"),
                            "must be positive; leave it unset for the default",
                        ));
                        default
                    }
                    Some(d) => Some(d),
                    None => {
                        v.push(FieldViolation::new(format!("{field}.{name}"), "must be a positive duration"));
                        default
                    }
                },
            }
        };
    let timeout = get(&p.timeout, "timeout", base.timeout);
    let initial = get(&p.initial_backoff, "initial_backoff", Some(base.initial_backoff)).unwrap_or_default();
    let max = get(&p.max_backoff, "max_backoff", Some(base.max_backoff)).unwrap_or_default();
    if !(0..=MAX_RETRIES).contains(&p.max_retries) {
        v.push(FieldViolation::new(format!("{field}.max_retries"), format!("must be 0 to {MAX_RETRIES}")));
    }
    let on_error = match pb::ErrorPolicy::try_from(p.on_error) {
        Ok(pb::ErrorPolicy::Unspecified | pb::ErrorPolicy::Fail) => OnError::Fail,
        Ok(pb::ErrorPolicy::Skip) => OnError::Skip,
        Ok(pb::ErrorPolicy::Route) => OnError::Route,
        Err(_) => {
            v.push(FieldViolation::new(
                format!("{field}.on_error"),
                format!("{} is not an ErrorPolicy", p.on_error),
            ));
            OnError::Fail
        }
    };
    StoredPolicy {
        timeout_ms: timeout.map(|t| t.as_millis() as u64),
        max_retries: p.max_retries.clamp(0, MAX_RETRIES) as u32,
        initial_backoff_ms: initial.as_millis() as u64,
        max_backoff_ms: max.max(initial).as_millis() as u64,
        on_error,
    }
}

impl StoredOptions {
    /// The options of a request, checked; node ids are checked against the plan elsewhere.
    pub(crate) fn from_pb(
        options: Option<&pb::ExecutionOptions>,
        settings: &ExecutorSettings,
    ) -> Result<Self, Vec<FieldViolation>> {
        let default = pb::ExecutionOptions::default();
        let o = options.unwrap_or(&default);
        let mut v = Vec::new();
        if !(0..=MAX_CAPACITY).contains(&o.default_capacity) {
            v.push(FieldViolation::new(
                "options.default_capacity",
                format!("must be 0 (16) to {MAX_CAPACITY}"),
            ));
        }
        let timeout = match &o.timeout {
            None => settings.max_duration,
            Some(d) => match from_pb_duration(d) {
                Some(d) if !d.is_zero() && d <= settings.max_duration => d,
                _ => {
                    v.push(FieldViolation::new(
                        "options.timeout",
                        format!("must be positive and at most {} s", settings.max_duration.as_secs()),
                    ));
                    settings.max_duration
                }
            },
        };
        let default_policy = match &o.default_policy {
            Some(p) => policy_from_pb(p, "options.default_policy", &mut v),
            None => StoredPolicy::default(),
        };
        let node_policies = o
            .node_policies
            .iter()
            .map(|(node, p)| {
                (node.clone(), policy_from_pb(p, &format!("options.node_policies[{node}]"), &mut v))
            })
            .collect();
        if !v.is_empty() {
            return Err(v);
        }
        Ok(Self {
            default_capacity: if o.default_capacity == 0 { 16 } else { o.default_capacity as u32 },
            timeout_ms: timeout.as_millis() as u64,
            default_policy,
            node_policies,
            breakpoints: o.breakpoints.clone(),
            record_messages: o.record_messages,
            trace_messages: o.trace_messages,
        })
    }

    pub(crate) fn to_pb(&self) -> pb::ExecutionOptions {
        pb::ExecutionOptions {
            default_capacity: self.default_capacity as i32,
            timeout: Some(duration(Duration::from_millis(self.timeout_ms))),
            default_policy: Some(self.default_policy.to_pb()),
            node_policies: self.node_policies.iter().map(|(k, p)| (k.clone(), p.to_pb())).collect(),
            breakpoints: self.breakpoints.clone(),
            record_messages: self.record_messages,
            trace_messages: self.trace_messages,
        }
    }

    /// The runtime's options (inputs and replays are added by the caller).
    pub(crate) fn to_runtime(&self, settings: &ExecutorSettings) -> Options {
        Options {
            default_capacity: self.default_capacity as usize,
            timeout: Duration::from_millis(self.timeout_ms),
            default_policy: self.default_policy.to_runtime(),
            policies: self.node_policies.iter().map(|(k, p)| (k.clone(), p.to_runtime())).collect(),
            record_messages: self.record_messages,
            max_recorded_messages: settings.max_recorded_messages,
            trace_messages: self.trace_messages,
            jq: csp_components::jq::Limits {
                time: settings.jq.max_time,
                memory: settings.jq.max_memory_bytes,
                outputs: settings.jq.max_outputs,
                ..Default::default()
            },
            ..Options::default()
        }
    }
}

/// Node metrics, as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredMetrics {
    messages_in: i64,
    messages_out: i64,
    errors: i64,
    retries: i64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    total_us: f64,
}

/// A node summary, as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredNode {
    node_id: String,
    #[serde(rename = "type")]
    type_id: String,
    status: i32,
    #[serde(default)]
    metrics: StoredMetrics,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    error: String,
}

impl StoredNode {
    pub(crate) fn of(n: &pb::NodeSummary) -> Self {
        let m = n.metrics.unwrap_or_default();
        Self {
            node_id: n.node_id.clone(),
            type_id: n.r#type.clone(),
            status: n.status,
            metrics: StoredMetrics {
                messages_in: m.messages_in,
                messages_out: m.messages_out,
                errors: m.errors,
                retries: m.retries,
                p50_us: m.processing_p50_us,
                p99_us: m.processing_p99_us,
                max_us: m.processing_max_us,
                total_us: m.processing_total_us,
            },
            error: n.error.clone(),
        }
    }

    pub(crate) fn to_pb(&self) -> pb::NodeSummary {
        let m = &self.metrics;
        pb::NodeSummary {
            node_id: self.node_id.clone(),
            r#type: self.type_id.clone(),
            status: self.status,
            metrics: Some(pb::NodeMetrics {
                messages_in: m.messages_in,
                messages_out: m.messages_out,
                errors: m.errors,
                retries: m.retries,
                processing_p50_us: m.p50_us,
                processing_p99_us: m.p99_us,
                processing_max_us: m.max_us,
                processing_total_us: m.total_us,
            }),
            error: self.error.clone(),
        }
    }
}

/// Why an execution failed, as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredFailure {
    pub(crate) code: String,
    pub(crate) message: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) node_id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) blocked_node_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) blocked_connection_ids: Vec<String>,
}

impl StoredFailure {
    pub(crate) fn of(e: &pb::ExecutionError) -> Self {
        Self {
            code: e.code.clone(),
            message: e.message.clone(),
            node_id: e.node_id.clone(),
            blocked_node_ids: e.blocked_node_ids.clone(),
            blocked_connection_ids: e.blocked_connection_ids.clone(),
        }
    }

    pub(crate) fn to_pb(&self) -> pb::ExecutionError {
        pb::ExecutionError {
            code: self.code.clone(),
            message: self.message.clone(),
            node_id: self.node_id.clone(),
            blocked_node_ids: self.blocked_node_ids.clone(),
            blocked_connection_ids: self.blocked_connection_ids.clone(),
        }
    }
}

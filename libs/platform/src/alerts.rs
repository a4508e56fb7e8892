//! Alerts evaluated in the process: the rules of `alerts.*` in the configuration, judged every
//! `alerts.interval_seconds` on what this process can see, reported on `GET /alerts` (JSON) and
//! as `csp_alert_firing{alert}` / `csp_alert_value{alert}`.
//!
//! Every server judges its calls ([`ErrorRate`], [`UnaryLatency`]); a service adds its own
//! [`Check`]s with [`register`] (the executor: its queue and takeovers; the AI service: the
//! spend of the last hour). The Helm chart's PrometheusRule carries the same rules with the
//! same thresholds, for a Prometheus that sees every replica.
//!
//! One evaluator runs per process, whatever the number of servers in it.

use std::{
    collections::VecDeque,
    sync::{Mutex, OnceLock, RwLock},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use serde::Serialize;

use crate::{
    config::AlertSettings,
    metrics::{CallCounts, LATENCY_BUCKETS, call_counts},
};

/// Something judged periodically against a threshold.
#[async_trait]
pub trait Check: Send + 'static {
    /// The rule's name (a metric label): `grpc_error_rate`, `executor_queue_depth`, ...
    fn name(&self) -> &'static str;
    /// What it means when it fires, for whoever is paged.
    fn summary(&self) -> &'static str;
    /// The value above which it fires.
    fn threshold(&self) -> f64;
    /// The current value, or `None` when there is nothing to judge yet (too few calls, the
    /// source unavailable).
    async fn measure(&mut self) -> Option<f64>;
    /// Whether what it watches is gone (a service shut down): it is then dropped.
    fn retired(&self) -> bool {
        false
    }
}

/// One rule's last judgement, as `GET /alerts` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AlertState {
    /// The rule.
    pub name: &'static str,
    /// What it means.
    pub summary: &'static str,
    /// `firing`, `ok`, or `no_data`.
    pub state: &'static str,
    /// The last value measured.
    pub value: Option<f64>,
    /// The threshold.
    pub threshold: f64,
    /// When the state last changed (RFC 3339).
    pub since: String,
}

struct Registry {
    /// Checks registered and not yet taken by the evaluator.
    pending: Mutex<Vec<Box<dyn Check>>>,
    states: RwLock<Vec<AlertState>>,
    started: OnceLock<()>,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry {
        pending: Mutex::new(Vec::new()),
        states: RwLock::new(Vec::new()),
        started: OnceLock::new(),
    })
}

/// Adds a rule to this process's evaluation (from the next round on).
pub fn register(check: impl Check) {
    let mut pending = match registry().pending.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    pending.push(Box::new(check));
}

/// Starts this process's evaluator (once; later calls do nothing), with the call rules every
/// server has. Call it inside the tokio runtime.
pub fn start(settings: &AlertSettings) {
    if !settings.enabled || registry().started.set(()).is_err() {
        return;
    }
    metrics::describe_gauge!("csp_alert_firing", "Whether an alert rule fires (1) in this process, by rule");
    metrics::describe_gauge!(
        "csp_alert_value",
        "The value an alert rule last measured in this process, by rule"
    );
    let window = Duration::from_secs(settings.window_seconds);
    register(ErrorRate {
        history: History::new(window, call_counts()),
        threshold: settings.error_rate,
        min_calls: settings.min_calls,
    });
    register(UnaryLatency {
        history: History::new(window, call_counts()),
        threshold: settings.p99_latency_seconds,
        min_calls: settings.min_calls,
    });
    let every = Duration::from_secs(settings.interval_seconds);
    tokio::spawn(async move {
        let mut checks: Vec<Box<dyn Check>> = Vec::new();
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if let Ok(mut pending) = registry().pending.lock() {
                checks.append(&mut pending);
            }
            checks.retain(|check| !check.retired());
            evaluate(&mut checks).await;
        }
    });
}

async fn evaluate(checks: &mut [Box<dyn Check>]) {
    let mut judged = Vec::with_capacity(checks.len());
    for check in checks.iter_mut() {
        let value = check.measure().await;
        let state = match value {
            Some(v) if v > check.threshold() => "firing",
            Some(_) => "ok",
            None => "no_data",
        };
        metrics::gauge!("csp_alert_firing", "alert" => check.name()).set(if state == "firing" {
            1.0
        } else {
            0.0
        });
        if let Some(v) = value {
            metrics::gauge!("csp_alert_value", "alert" => check.name()).set(v);
        }
        judged.push((check.name(), check.summary(), state, value, check.threshold()));
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut states = match registry().states.write() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    let previous = std::mem::take(&mut *states);
    for (name, summary, state, value, threshold) in judged {
        let before = previous.iter().find(|s| s.name == name);
        let since = match before {
            Some(before) if before.state == state => before.since.clone(),
            _ => {
                if state == "firing" {
                    tracing::warn!(
                        alert = name,
                        value = value.unwrap_or_default(),
                        threshold,
                        "alert firing: {summary}"
                    );
                } else if before.is_some_and(|b| b.state == "firing") {
                    tracing::info!(alert = name, "alert resolved");
                }
                now.clone()
            }
        };
        states.push(AlertState { name, summary, state, value, threshold, since });
    }
}

/// The last judgement of every rule of this process.
pub fn states() -> Vec<AlertState> {
    match registry().states.read() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

/// The body of `GET /alerts`.
pub fn report() -> serde_json::Value {
    let states = states();
    let firing = states.iter().filter(|s| s.state == "firing").count();
    serde_json::json!({ "firing": firing, "alerts": states })
}

/// Readings of a counter over the last `window`: the change between the oldest kept reading
/// and the newest.
pub struct History<T> {
    window: Duration,
    readings: VecDeque<(Instant, T)>,
}

impl<T: Clone> History<T> {
    /// A history over `window` that starts with `reading` (the counter's value now).
    pub fn new(window: Duration, reading: T) -> Self {
        Self { window, readings: VecDeque::from([(Instant::now(), reading)]) }
    }

    /// Records `now`'s reading; returns the oldest reading still within the window (the
    /// reading itself when it is the first).
    pub fn push(&mut self, reading: T) -> T {
        self.push_at(Instant::now(), reading)
    }

    fn push_at(&mut self, now: Instant, reading: T) -> T {
        self.readings.push_back((now, reading));
        // Keep one reading at or beyond the window's start, so the change spans the window.
        while self.readings.len() > 1 && self.readings[1].0 + self.window <= now {
            self.readings.pop_front();
        }
        self.readings[0].1.clone()
    }
}

/// Fires when too many of the calls of the window failed on the server's side.
pub struct ErrorRate {
    history: History<CallCounts>,
    threshold: f64,
    min_calls: u64,
}

#[async_trait]
impl Check for ErrorRate {
    fn name(&self) -> &'static str {
        "grpc_error_rate"
    }

    fn summary(&self) -> &'static str {
        "gRPC calls are failing on the server's side (Internal, Unavailable, Unknown, DataLoss, DeadlineExceeded)"
    }

    fn threshold(&self) -> f64 {
        self.threshold
    }

    async fn measure(&mut self) -> Option<f64> {
        let now = call_counts();
        let then = self.history.push(now.clone());
        let calls = now.calls.saturating_sub(then.calls);
        let failures = now.failures.saturating_sub(then.failures);
        (calls >= self.min_calls.max(1)).then(|| failures as f64 / calls as f64)
    }
}

/// Fires when the p99 of the window's unary calls is too slow.
pub struct UnaryLatency {
    history: History<CallCounts>,
    threshold: f64,
    min_calls: u64,
}

#[async_trait]
impl Check for UnaryLatency {
    fn name(&self) -> &'static str {
        "grpc_p99_latency_seconds"
    }

    fn summary(&self) -> &'static str {
        "The p99 duration of unary gRPC calls is above its threshold"
    }

    fn threshold(&self) -> f64 {
        self.threshold
    }

    async fn measure(&mut self) -> Option<f64> {
        let now = call_counts();
        let then = self.history.push(now.clone());
        let buckets: Vec<u64> = now
            .unary
            .iter()
            .zip(then.unary.iter().chain(std::iter::repeat(&0)))
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        let total: u64 = buckets.iter().sum();
        (total >= self.min_calls.max(1)).then(|| quantile(0.99, &buckets))
    }
}

/// The `q` quantile of bucketed counts, as Prometheus's `histogram_quantile` computes it
/// (linear within the bucket; the largest finite bound when it falls above it).
pub fn quantile(q: f64, buckets: &[u64]) -> f64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, count) in buckets.iter().enumerate() {
        if (below + count) as f64 >= rank && *count > 0 {
            let Some(upper) = LATENCY_BUCKETS.get(i) else {
                return LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1];
            };
            let lower = if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] };
            return lower + (upper - lower) * (rank - below as f64) / *count as f64;
        }
        below += count;
    }
    LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_as_prometheus_does() {
        let mut buckets = vec![0u64; LATENCY_BUCKETS.len() + 1];
        // 100 calls between 0.5 s and 1 s: the p99 is 99% of the way through that bucket.
        buckets[12] = 100;
        assert!((quantile(0.99, &buckets) - 0.995).abs() < 1e-9);
        // One call above the largest bound among 50 fast ones: the p99 is that bound.
        let mut buckets = vec![0u64; LATENCY_BUCKETS.len() + 1];
        buckets[0] = 50;
        buckets[LATENCY_BUCKETS.len()] = 1;
        assert_eq!(quantile(0.99, &buckets), 30.0);
        assert_eq!(quantile(0.5, &buckets), 0.0001 * (25.5 / 50.0));
    }

    #[test]
    fn a_history_spans_its_window() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut history = History { window: Duration::from_millis(40), readings: VecDeque::new() };
        assert_eq!(history.push_at(at(0), 1), 1);
        assert_eq!(history.push_at(at(25), 2), 1);
        // 2 is not yet a window old: the change must span the whole window, so 1 stays.
        assert_eq!(history.push_at(at(50), 3), 1);
        assert_eq!(history.push_at(at(75), 4), 2);
        assert_eq!(history.push_at(at(500), 5), 4);
    }
}

//! The executor's alert rules (see `csp_platform::alerts`): executions waiting for a replica,
//! and executions taken over from replicas that stopped renewing them.

use std::{
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use async_trait::async_trait;
use csp_platform::alerts::{Check, History};

use super::{Executor, GROUP, JOBS};

/// Registers the executor's rules with this process's evaluator.
pub(super) fn register(executor: &Arc<Executor>) {
    let alerts = &executor.settings.alerts;
    csp_platform::alerts::register(QueueDepth {
        executor: Arc::downgrade(executor),
        threshold: alerts.queue_depth as f64,
    });
    csp_platform::alerts::register(Takeovers {
        executor: Arc::downgrade(executor),
        history: History::new(
            Duration::from_secs(alerts.window_seconds),
            executor.takeovers.load(Ordering::Relaxed),
        ),
        threshold: alerts.takeovers as f64,
    });
}

/// Executions queued and not delivered to any replica (the whole cluster's queue).
struct QueueDepth {
    executor: Weak<Executor>,
    threshold: f64,
}

#[async_trait]
impl Check for QueueDepth {
    fn name(&self) -> &'static str {
        "executor_queue_depth"
    }

    fn summary(&self) -> &'static str {
        "Executions are waiting for an executor replica: add replicas, or look for stuck ones"
    }

    fn threshold(&self) -> f64 {
        self.threshold
    }

    async fn measure(&mut self) -> Option<f64> {
        let executor = self.executor.upgrade()?;
        let backlog = executor.bus.backlog(JOBS, GROUP).await.ok()?;
        Some(backlog.waiting as f64)
    }

    fn retired(&self) -> bool {
        self.executor.strong_count() == 0
    }
}

/// Executions this replica took over in the window: each one had a replica that stopped
/// renewing it (killed, frozen, cut off) or ran out of drain time.
struct Takeovers {
    executor: Weak<Executor>,
    history: History<u64>,
    threshold: f64,
}

#[async_trait]
impl Check for Takeovers {
    fn name(&self) -> &'static str {
        "executor_takeovers"
    }

    fn summary(&self) -> &'static str {
        "Executions were taken over from an executor replica that was lost (killed, frozen or cut off) or ran out of drain time; they ran again from the start"
    }

    fn threshold(&self) -> f64 {
        self.threshold
    }

    async fn measure(&mut self) -> Option<f64> {
        let now = self.executor.upgrade()?.takeovers.load(Ordering::Relaxed);
        let then = self.history.push(now);
        Some(now.saturating_sub(then) as f64)
    }

    fn retired(&self) -> bool {
        self.executor.strong_count() == 0
    }
}

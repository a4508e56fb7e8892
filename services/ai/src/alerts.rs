//! The AI service's alert rule (see `csp_platform::alerts`): the spend of the last hour across
//! every replica, from the durable usage records.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use csp_platform::alerts::Check;

use crate::{
    calls::Engine,
    usage::{Grouping, Period, Query},
};

/// Registers the AI service's rule with this process's evaluator.
pub(crate) fn register(engine: &Arc<Engine>, threshold_usd: f64) {
    csp_platform::alerts::register(CostPerHour { engine: Arc::downgrade(engine), threshold: threshold_usd });
}

struct CostPerHour {
    engine: Weak<Engine>,
    threshold: f64,
}

#[async_trait]
impl Check for CostPerHour {
    fn name(&self) -> &'static str {
        "ai_cost_per_hour_usd"
    }

    fn summary(&self) -> &'static str {
        "AI providers cost more in the last hour (US dollars, every replica) than the threshold"
    }

    fn threshold(&self) -> f64 {
        self.threshold
    }

    async fn measure(&mut self) -> Option<f64> {
        let engine = self.engine.upgrade()?;
        let query =
            Query { start: Some(chrono::Utc::now() - chrono::Duration::hours(1)), ..Default::default() };
        let totals = engine.usage.totals(&query, Grouping::Model, Period::All).await.ok()?;
        Some(totals.iter().map(|t| t.cost_usd).sum())
    }

    fn retired(&self) -> bool {
        self.engine.strong_count() == 0
    }
}

//! Per-user limits and spend budgets, held across replicas by reserve-then-settle on the bus
//! (Redis in a cluster): before a call its worst case — prompt tokens plus the most output it
//! may produce, at the price of the dearest model it may fall back to — is taken from every
//! counter it counts against, all or none, in one atomic step; after the call the counters are
//! settled to what it really used. Replicas together never pass a limit.
//!
//! Counters are per calendar window (UTC): requests per user per minute, tokens per user per
//! day, and the optional spend budgets per user and per design per day and per month (in
//! micro-dollars).

use std::time::Duration;

use chrono::{Datelike as _, Duration as Days, TimeZone as _, Timelike as _, Utc};
use csp_bus::{Adjust, Claim, Reserved, SharedBus};
use csp_platform::config::AiLimits;

use crate::{error::Error, model::Attribution};

/// What a reservation took, to settle it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reservation {
    tokens: Vec<String>,
    spend: Vec<String>,
    reserved_tokens: u64,
    reserved_micros: u64,
}

/// The limits of the service.
pub(crate) struct Limits {
    bus: SharedBus,
    settings: AiLimits,
}

fn micros(usd: f64) -> u64 {
    (usd.max(0.0) * 1_000_000.0).ceil() as u64
}

/// A counter's window: its key suffix, when it ends, and how long the counter lives.
struct Window {
    suffix: String,
    ends_in: Duration,
    ttl: Duration,
}

fn windows() -> (Window, Window, Window) {
    let now = Utc::now();
    let minute_end = now.with_second(0).and_then(|t| t.with_nanosecond(0)).unwrap_or(now) + Days::minutes(1);
    let day_start = Utc.with_ymd_and_hms(now.year(), now.month(), now.day(), 0, 0, 0).single().unwrap_or(now);
    let day_end = day_start + Days::days(1);
    let (year, month) = if now.month() == 12 { (now.year() + 1, 1) } else { (now.year(), now.month() + 1) };
    let month_end = Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0).single().unwrap_or(day_end);
    let until = |end: chrono::DateTime<Utc>| (end - now).to_std().unwrap_or_default();
    (
        Window {
            suffix: now.format("%Y%m%d%H%M").to_string(),
            ends_in: until(minute_end),
            ttl: Duration::from_secs(120),
        },
        Window {
            suffix: now.format("%Y%m%d").to_string(),
            ends_in: until(day_end),
            ttl: Duration::from_secs(26 * 3600),
        },
        Window {
            suffix: now.format("%Y%m").to_string(),
            ends_in: until(month_end),
            ttl: Duration::from_secs(32 * 24 * 3600),
        },
    )
}

impl Limits {
    pub(crate) fn new(bus: SharedBus, settings: AiLimits) -> Self {
        Self { bus, settings }
    }

    /// Takes a call's worst case from every counter it counts against, or refuses it with
    /// RESOURCE_EXHAUSTED saying which limit and when to retry.
    pub(crate) async fn reserve(
        &self,
        who: &Attribution,
        tokens: u64,
        cost_usd: f64,
    ) -> Result<Reservation, Error> {
        let (minute, day, month) = windows();
        let l = &self.settings;
        let user = &who.user_id;
        let mut claims = vec![
            (
                Claim {
                    key: format!("ai:requests:{user}:{}", minute.suffix),
                    amount: 1,
                    limit: l.requests_per_minute,
                    ttl: minute.ttl,
                },
                format!("{} requests a minute", l.requests_per_minute),
                minute.ends_in,
            ),
            (
                Claim {
                    key: format!("ai:tokens:{user}:{}", day.suffix),
                    amount: tokens,
                    limit: l.tokens_per_day,
                    ttl: day.ttl,
                },
                format!("{} tokens a day", l.tokens_per_day),
                day.ends_in,
            ),
        ];
        let cost = micros(cost_usd);
        let mut budgets = vec![
            (format!("user:{user}"), l.user_spend_per_day_usd, &day, "a day for you"),
            (format!("user:{user}"), l.user_spend_per_month_usd, &month, "a month for you"),
        ];
        if !who.design_id.is_empty() {
            budgets.push((
                format!("design:{}", who.design_id),
                l.design_spend_per_day_usd,
                &day,
                "a day for this design",
            ));
            budgets.push((
                format!("design:{}", who.design_id),
                l.design_spend_per_month_usd,
                &month,
                "a month for this design",
            ));
        }
        for (whose, budget, window, what) in budgets {
            if let Some(budget) = budget {
                claims.push((
                    Claim {
                        key: format!("ai:spend:{whose}:{}", window.suffix),
                        amount: cost,
                        limit: micros(budget),
                        ttl: window.ttl,
                    },
                    format!("${budget:.2} {what}"),
                    window.ends_in,
                ));
            }
        }
        let only: Vec<Claim> = claims.iter().map(|(c, _, _)| c.clone()).collect();
        match self.bus.reserve(&only).await? {
            Reserved::Granted => Ok(Reservation {
                tokens: vec![claims[1].0.key.clone()],
                spend: claims[2..].iter().map(|(c, _, _)| c.key.clone()).collect(),
                reserved_tokens: tokens,
                reserved_micros: cost,
            }),
            Reserved::Refused(i) => {
                let (claim, what, ends_in) = &claims[i];
                let worst = if i == 0 {
                    String::new()
                } else if i == 1 {
                    format!(" (this request may use up to {} tokens)", claim.amount)
                } else {
                    format!(" (this request may cost up to ${:.4})", claim.amount as f64 / 1_000_000.0)
                };
                Err(Error::Exhausted {
                    message: format!("the limit of {what} is reached{worst}"),
                    retry_after: Some(*ends_in),
                })
            }
        }
    }

    /// Settles a reservation to what the call really used.
    pub(crate) async fn settle(&self, reservation: Reservation, tokens: u64, cost_usd: f64) {
        let ttl = Duration::from_secs(32 * 24 * 3600);
        let token_delta = tokens as i64 - reservation.reserved_tokens as i64;
        let spend_delta = micros(cost_usd) as i64 - reservation.reserved_micros as i64;
        let mut changes: Vec<Adjust> =
            reservation.tokens.into_iter().map(|key| Adjust { key, delta: token_delta, ttl }).collect();
        changes.extend(reservation.spend.into_iter().map(|key| Adjust { key, delta: spend_delta, ttl }));
        changes.retain(|c| c.delta != 0);
        if let Err(error) = self.bus.adjust(&changes).await {
            tracing::warn!(%error, "cannot settle an AI reservation; the limits stay stricter until their window ends");
        }
    }
}

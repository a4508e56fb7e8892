//! Every call to a provider goes through here: the context window is checked, the worst case
//! is reserved against the limits, the provider is called with a timeout, retried with
//! jittered back-off on a rate limit or a failure (honouring `Retry-After`), and, when it
//! still fails, the configured fallbacks are tried in order; the answer says which provider
//! and model answered. Then the reservation is settled, one usage record is written and the
//! metrics counted — also for a stream the client abandons or that breaks midway, with the
//! tokens received so far estimated.
//!
//! Metrics: `csp_ai_requests_total{provider,model,outcome}`,
//! `csp_ai_tokens_total{provider,model,kind}`, `csp_ai_cost_usd{provider,model}` (US
//! dollars), `csp_ai_request_duration_seconds{provider,model}` and
//! `csp_ai_time_to_first_token_seconds{provider,model}`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use csp_platform::config::AiSettings;
use futures::{Stream, StreamExt as _};
use rand::Rng as _;

use crate::{
    catalog::Catalog,
    error::Error,
    limits::{Limits, Reservation},
    model::{Attribution, Operation, Piece, Reply, Route, Tokens},
    providers::{PieceStream, ProviderError, ProviderRequest},
    tokens,
    usage::{Record, UsageStore},
};

/// The longest a `Retry-After` is waited out; beyond it the call fails with it.
const MAX_WAIT: Duration = Duration::from_secs(20);
/// First back-off step.
const BACKOFF: Duration = Duration::from_millis(250);

/// The service's core: catalog, limits, usage.
pub(crate) struct Engine {
    pub(crate) catalog: Catalog,
    pub(crate) limits: Limits,
    pub(crate) usage: UsageStore,
    pub(crate) settings: AiSettings,
}

/// One call to make.
pub(crate) struct Call {
    pub(crate) who: Attribution,
    pub(crate) operation: Operation,
    pub(crate) route: Route,
    pub(crate) request: ProviderRequest,
}

/// One piece of a streamed answer, as the service passes it on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Chunk {
    Text(String),
    ToolCall(crate::model::ToolCall),
    /// The last piece: why it stopped, and what it used (estimated when the provider said not).
    Done {
        finish_reason: String,
        tokens: Tokens,
        cost_usd: f64,
    },
}

/// What a call got.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) reply: Reply,
    pub(crate) tokens: Tokens,
    pub(crate) cost_usd: f64,
    pub(crate) route: Route,
}

pub(crate) fn describe() {
    metrics::describe_counter!(
        "csp_ai_requests_total",
        "Requests to AI providers, by provider, model and outcome"
    );
    metrics::describe_counter!(
        "csp_ai_tokens_total",
        "Tokens used, by provider, model and kind (prompt, completion)"
    );
    metrics::describe_gauge!(
        "csp_ai_cost_usd",
        "Cost of AI requests in US dollars since the process started, by provider and model (only grows: use increase())"
    );
    metrics::describe_histogram!(
        "csp_ai_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time of a request to an AI provider, retries and fallbacks included"
    );
    metrics::describe_histogram!(
        "csp_ai_time_to_first_token_seconds",
        metrics::Unit::Seconds,
        "Time from a streamed request to its first piece"
    );
}

fn count(route: &Route, outcome: &'static str, tokens: Tokens, cost: f64, took: Duration) {
    let (p, m) = (route.provider.clone(), route.model.clone());
    metrics::counter!("csp_ai_requests_total", "provider" => p.clone(), "model" => m.clone(), "outcome" => outcome)
        .increment(1);
    metrics::counter!("csp_ai_tokens_total", "provider" => p.clone(), "model" => m.clone(), "kind" => "prompt")
        .increment(tokens.prompt);
    metrics::counter!("csp_ai_tokens_total", "provider" => p.clone(), "model" => m.clone(), "kind" => "completion")
        .increment(tokens.completion);
    metrics::gauge!("csp_ai_cost_usd", "provider" => p.clone(), "model" => m.clone()).increment(cost);
    metrics::histogram!("csp_ai_request_duration_seconds", "provider" => p, "model" => m)
        .record(took.as_secs_f64());
}

/// The wait before attempt `n` (from 1): full jitter over an exponential step, or what the
/// provider asked for.
fn backoff(n: u32, asked: Option<Duration>) -> Duration {
    let step = BACKOFF.saturating_mul(1 << n.min(6)).min(Duration::from_secs(8));
    let jittered = Duration::from_millis(rand::rng().random_range(0..=step.as_millis() as u64));
    asked.map_or(jittered, |asked| asked.max(jittered))
}

impl Engine {
    /// The output tokens a request may use at most.
    fn max_output(&self, request: &ProviderRequest) -> u32 {
        match request.max_tokens {
            0 => self.settings.max_output_tokens,
            n => n.min(self.settings.max_output_tokens),
        }
    }

    /// Checks the context window and reserves the worst case of the whole fallback chain.
    async fn prepare(&self, call: &mut Call) -> Result<(Vec<Route>, u64, Reservation), Error> {
        call.request.max_tokens = self.max_output(&call.request);
        let prompt = tokens::messages(&call.request.messages)
            + call
                .request
                .tools
                .iter()
                .map(|t| tokens::count(&t.name) + tokens::count(&t.parameters.to_string()))
                .sum::<u64>();
        let window = u64::from(self.catalog.model(&call.route).context_window);
        if prompt + u64::from(call.request.max_tokens) > window {
            return Err(Error::field(
                "messages",
                format!(
                    "about {prompt} tokens of messages and up to {} of reply do not fit {}'s context window of {window} tokens",
                    call.request.max_tokens, call.route
                ),
            ));
        }
        let chain = self.catalog.chain(&call.route);
        let worst = Tokens { prompt, completion: u64::from(call.request.max_tokens), estimated: true };
        let cost = chain.iter().map(|r| self.catalog.cost(r, worst)).fold(0.0, f64::max);
        let reservation = self.limits.reserve(&call.who, worst.total(), cost).await?;
        Ok((chain, prompt, reservation))
    }

    /// One attempt loop on one route: timeouts, retries, back-off.
    async fn attempts<T, F, Fut>(&self, route: &Route, mut attempt: F) -> Result<T, ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let mut n = 0;
        loop {
            let outcome = match tokio::time::timeout(self.settings.request_timeout, attempt()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(ProviderError::Unavailable("no answer in time".into())),
            };
            match outcome {
                Err(error) if error.retryable() && n < self.settings.max_retries => {
                    n += 1;
                    let asked = match &error {
                        ProviderError::RateLimited { retry_after } => *retry_after,
                        _ => None,
                    };
                    if asked.is_some_and(|a| a > MAX_WAIT) {
                        return Err(error);
                    }
                    let wait = backoff(n, asked);
                    tracing::info!(%route, attempt = n, wait_ms = wait.as_millis() as u64, error = %error, "retrying an AI call");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    /// Tries the chain in order; a route that cannot answer (down, no key, unknown model)
    /// hands over to the next.
    async fn first_answer<T, F, Fut>(
        &self,
        chain: &[Route],
        request: &ProviderRequest,
        call: F,
    ) -> Result<(T, Route), Error>
    where
        F: Fn(Arc<dyn crate::providers::Provider>, ProviderRequest) -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let mut last: Option<(Route, ProviderError)> = None;
        for route in chain {
            let Some(provider) = self.catalog.provider(&route.provider) else { continue };
            if !provider.available() {
                last.get_or_insert((route.clone(), ProviderError::BadKey));
                continue;
            }
            let mut attempt = request.clone();
            attempt.model.clone_from(&route.model);
            match self.attempts(route, || call(provider.clone(), attempt.clone())).await {
                Ok(answer) => return Ok((answer, route.clone())),
                Err(error) => {
                    let hand_over = error.retryable()
                        || matches!(
                            error,
                            ProviderError::BadKey
                                | ProviderError::UnknownModel(_)
                                | ProviderError::Malformed(_)
                        );
                    if chain.len() > 1 {
                        tracing::warn!(%route, error = %error, "an AI provider failed; trying the next");
                    }
                    last = Some((route.clone(), error));
                    if !hand_over {
                        break;
                    }
                }
            }
        }
        let (route, error) = last.unwrap_or((
            chain[0].clone(),
            ProviderError::Unavailable("no provider of this model is configured".into()),
        ));
        if matches!(error, ProviderError::BadKey)
            && self.catalog.provider(&route.provider).is_some_and(|p| !p.available())
        {
            return Err(Error::Precondition {
                message: format!("{route}: the provider has no API key configured"),
                reason: "PROVIDER_NOT_CONFIGURED",
            });
        }
        Err(Error::Provider { route: route.to_string(), error })
    }

    /// A reply, its usage recorded and settled.
    pub(crate) async fn complete(self: &Arc<Self>, mut call: Call) -> Result<Answer, Error> {
        let started = Instant::now();
        let (chain, prompt, reservation) = self.prepare(&mut call).await?;
        let outcome = self
            .first_answer(&chain, &call.request, |provider, request| async move {
                provider.complete(&request).await
            })
            .await;
        match outcome {
            Ok((reply, route)) => {
                let tokens = reply.tokens.unwrap_or_else(|| Tokens {
                    prompt,
                    completion: tokens::message(&reply.message).saturating_sub(4),
                    estimated: true,
                });
                let cost_usd = self.catalog.cost(&route, tokens);
                self.done(
                    call.who,
                    call.operation,
                    reservation,
                    &route,
                    tokens,
                    cost_usd,
                    "ok",
                    "",
                    started,
                    None,
                )
                .await;
                Ok(Answer { reply, tokens, cost_usd, route })
            }
            Err(error) => Err(self.failed(call, reservation, started, error).await),
        }
    }

    /// Records a call no provider answered (nothing billed) and gives its error back.
    async fn failed(
        self: &Arc<Self>,
        call: Call,
        reservation: Reservation,
        started: Instant,
        error: Error,
    ) -> Error {
        let code = match &error {
            Error::Provider { error, .. } => error.code(),
            _ => "not_configured",
        };
        self.done(
            call.who,
            call.operation,
            reservation,
            &call.route,
            Tokens::default(),
            0.0,
            "failed",
            code,
            started,
            None,
        )
        .await;
        error
    }

    #[allow(clippy::too_many_arguments)]
    async fn done(
        self: &Arc<Self>,
        who: Attribution,
        operation: Operation,
        reservation: Reservation,
        route: &Route,
        tokens: Tokens,
        cost_usd: f64,
        outcome: &'static str,
        error: &'static str,
        started: Instant,
        first_token: Option<Duration>,
    ) {
        let duration = started.elapsed();
        count(route, outcome, tokens, cost_usd, duration);
        let record = Record {
            who,
            operation,
            route: route.clone(),
            tokens,
            cost_usd,
            outcome,
            error,
            duration,
            first_token,
        };
        // The record joins the next batch (queued at once, so a later GetUsage sees it);
        // settling waits for nobody: the reservation holds the worst case until then.
        self.usage.record(record).await;
        let engine = self.clone();
        tokio::spawn(async move { engine.limits.settle(reservation, tokens.total(), cost_usd).await });
    }

    /// A reply as it is generated. Usage is recorded once the stream ends — completed, broken
    /// or dropped by the client.
    pub(crate) async fn stream(
        self: &Arc<Self>,
        mut call: Call,
    ) -> Result<(Route, impl Stream<Item = Result<Chunk, Error>> + Send + 'static), Error> {
        let started = Instant::now();
        let (chain, prompt, reservation) = match self.prepare(&mut call).await {
            Ok(prepared) => prepared,
            Err(e) => return Err(e),
        };
        let opened = self
            .first_answer(&chain, &call.request, |provider, request| async move {
                provider.stream(&request).await
            })
            .await;
        let (pieces, route) = match opened {
            Ok(opened) => opened,
            Err(error) => return Err(self.failed(call, reservation, started, error).await),
        };
        let guard = StreamGuard {
            engine: self.clone(),
            who: Some(call.who),
            operation: call.operation,
            reservation: Some(reservation),
            route: route.clone(),
            prompt,
            received: String::new(),
            started,
            first_token: None,
        };
        let stream = futures::stream::unfold(
            (pieces, Some(guard)),
            |(mut pieces, guard): (PieceStream, Option<StreamGuard>)| async move {
                let mut guard = guard?;
                match pieces.next().await {
                    Some(Ok(piece)) => {
                        guard.first_token.get_or_insert_with(|| {
                        let took = guard.started.elapsed();
                        metrics::histogram!("csp_ai_time_to_first_token_seconds", "provider" => guard.route.provider.clone(), "model" => guard.route.model.clone())
                            .record(took.as_secs_f64());
                        took
                    });
                        let chunk = match piece {
                            Piece::Text(text) => {
                                guard.received.push_str(&text);
                                Chunk::Text(text)
                            }
                            Piece::ToolCall(call) => {
                                guard.received.push_str(&call.name);
                                guard.received.push_str(&call.arguments);
                                Chunk::ToolCall(call)
                            }
                            Piece::Done { finish_reason, tokens } => {
                                let tokens = tokens.unwrap_or_else(|| guard.estimate());
                                let cost_usd = guard.engine.catalog.cost(&guard.route, tokens);
                                guard.finish(tokens, "ok", "");
                                return Some((
                                    Ok(Chunk::Done { finish_reason, tokens, cost_usd }),
                                    (pieces, None),
                                ));
                            }
                        };
                        Some((Ok(chunk), (pieces, Some(guard))))
                    }
                    Some(Err(error)) => {
                        // Tokens the provider generated before breaking are still billed.
                        let tokens = guard.estimate();
                        guard.finish(tokens, "failed", error.code());
                        let route = guard.route.to_string();
                        Some((Err(Error::Provider { route, error }), (pieces, None)))
                    }
                    None => {
                        let tokens = guard.estimate();
                        guard.finish(tokens, "failed", "malformed");
                        let error =
                            ProviderError::Malformed("the stream ended without its last piece".into());
                        Some((Err(Error::Provider { route: guard.route.to_string(), error }), (pieces, None)))
                    }
                }
            },
        );
        Ok((route, stream))
    }
}

/// Records a stream's usage once, however it ends; dropped before its end (the client went
/// away), it records what was received as abandoned.
struct StreamGuard {
    engine: Arc<Engine>,
    who: Option<Attribution>,
    operation: Operation,
    reservation: Option<Reservation>,
    route: Route,
    prompt: u64,
    received: String,
    started: Instant,
    first_token: Option<Duration>,
}

impl StreamGuard {
    fn estimate(&self) -> Tokens {
        Tokens { prompt: self.prompt, completion: tokens::count(&self.received), estimated: true }
    }

    fn finish(&mut self, tokens: Tokens, outcome: &'static str, error: &'static str) {
        let (Some(who), Some(reservation)) = (self.who.take(), self.reservation.take()) else { return };
        let engine = self.engine.clone();
        let cost = engine.catalog.cost(&self.route, tokens);
        let (operation, route, started, first_token) =
            (self.operation, self.route.clone(), self.started, self.first_token);
        tokio::spawn(async move {
            engine
                .done(who, operation, reservation, &route, tokens, cost, outcome, error, started, first_token)
                .await;
        });
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.who.is_some() {
            let tokens = self.estimate();
            self.finish(tokens, "abandoned", "");
        }
    }
}

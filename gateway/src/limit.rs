//! Per-client rate limits: a token bucket per signed-in user, and per client address for
//! calls without a token (`gateway.rate_limit`), on the bus — Redis when configured — so that
//! every gateway replica draws from the same buckets.
//!
//! A call over its client's limit is answered RESOURCE_EXHAUSTED with `RetryInfo` (and a
//! `retry-after` header) without reaching any service. The buckets count calls, not messages:
//! a stream is one call. When the bus cannot be reached, calls pass (and the failure is
//! counted): an outage of the limiter's store must not become an outage of the API.

use std::{net::IpAddr, sync::Arc, time::Duration};

use csp_bus::{Rate, SharedBus, Throttled};
use csp_platform::{auth::Principal, config::RateLimitSettings, error::ApiError};
use http::{HeaderMap, Request};
use ipnet::IpNet;
use tonic::{Status, transport::server::TcpConnectInfo};

/// Who a call is counted against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Client {
    /// A signed-in user (by id).
    User(String),
    /// A caller without a token, by address.
    Address(String),
}

/// The limits and where their buckets are kept.
pub(crate) struct RateLimits {
    bus: SharedBus,
    user: Rate,
    anonymous: Rate,
}

impl RateLimits {
    /// The limits of `settings`, or none when they are switched off.
    pub(crate) fn new(settings: &RateLimitSettings, bus: SharedBus) -> Option<Arc<Self>> {
        metrics::describe_counter!(
            "csp_gateway_rate_limited_total",
            "Calls refused for passing their client's rate limit, by client kind (user, address)"
        );
        metrics::describe_counter!(
            "csp_gateway_rate_limit_errors_total",
            "Calls let through because the rate limiter's store did not answer"
        );
        settings.enabled.then(|| {
            Arc::new(Self {
                bus,
                user: Rate { per_second: settings.user_per_second, burst: settings.user_burst },
                anonymous: Rate {
                    per_second: settings.anonymous_per_second,
                    burst: settings.anonymous_burst,
                },
            })
        })
    }

    /// Takes a token for the call's client; RESOURCE_EXHAUSTED when it has none left.
    pub(crate) async fn admit(&self, client: &Client) -> Result<(), Status> {
        let (key, rate, kind) = match client {
            Client::User(id) => (format!("ratelimit:user:{id}"), self.user, "user"),
            Client::Address(address) => (format!("ratelimit:address:{address}"), self.anonymous, "address"),
        };
        match self.bus.throttle(&key, rate).await {
            Ok(Throttled::Allowed) => Ok(()),
            Ok(Throttled::Wait(wait)) => {
                metrics::counter!("csp_gateway_rate_limited_total", "client" => kind).increment(1);
                // Whole milliseconds, at least one: a client told to wait 0 would not.
                let wait = Duration::from_millis(wait.as_millis().max(1) as u64);
                let who = match client {
                    Client::User(_) => format!("{} calls a second per user", rate.per_second),
                    Client::Address(_) => {
                        format!("{} calls a second per address without a token", rate.per_second)
                    }
                };
                Err(ApiError::ResourceExhausted {
                    message: format!("rate limit reached ({who}); retry in {} ms", wait.as_millis()),
                    retry_after: Some(wait),
                }
                .into())
            }
            Err(error) => {
                metrics::counter!("csp_gateway_rate_limit_errors_total").increment(1);
                tracing::warn!(%error, "the rate limiter's store did not answer; the call passes");
                Ok(())
            }
        }
    }
}

/// Who `request` is counted against: its verified user, else its client's address.
pub(crate) fn client_of<B>(request: &Request<B>, trusted: &[IpNet]) -> Client {
    match request.extensions().get::<Arc<Principal>>() {
        Some(principal) => Client::User(principal.user_id.clone()),
        None => Client::Address(client_address(
            request.headers(),
            request.extensions().get::<TcpConnectInfo>(),
            trusted,
        )),
    }
}

/// The client's address: the connection's peer, or what that peer says in `x-forwarded-for`
/// when it is a proxy the gateway trusts (`gateway.trusted_proxies`).
pub(crate) fn client_address(
    headers: &HeaderMap,
    connection: Option<&TcpConnectInfo>,
    trusted: &[IpNet],
) -> String {
    let peer = connection.and_then(TcpConnectInfo::remote_addr).map(|a| a.ip());
    let forwarded = || {
        headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .and_then(|v| v.parse::<IpAddr>().ok())
    };
    let client = match peer {
        Some(peer) if trusted.iter().any(|net| net.contains(&peer)) => forwarded().or(Some(peer)),
        other => other,
    };
    client.map_or_else(|| "unknown".to_owned(), |address| address.to_string())
}

//! Channels to the other services of the suite.
//!
//! Every call between services goes over gRPC, with the caller's trace context in the
//! metadata. Channels connect lazily, so services can start in any order; a call to a service
//! that is down fails with UNAVAILABLE. A call to a server running in this same process
//! (`--target all`) is handed to it directly: see [`crate::local`].

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use tonic::{
    body::Body,
    transport::{Channel, Endpoint},
};
use tower::Service;

use crate::{
    config::{ConfigError, Service as SuiteService, Settings},
    local::{self, LocalServer},
    telemetry::{HeaderCarrier, inject_context},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A channel to one service whose calls carry the current trace context: over the network, or
/// in process when that service runs in this process.
#[derive(Debug)]
pub struct TracedChannel {
    network: Channel,
    /// `host:port` of the configured address, to find the server in this process.
    authority: Arc<str>,
    /// The in-process server made ready by `poll_ready`, used by the next `call`.
    ready_local: Option<LocalServer>,
}

impl Clone for TracedChannel {
    fn clone(&self) -> Self {
        // A clone is not ready: it polls readiness itself.
        Self { network: self.network.clone(), authority: self.authority.clone(), ready_local: None }
    }
}

impl Service<http::Request<Body>> for TracedChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<http::Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.ready_local.is_none() {
            self.ready_local = local::find(&self.authority);
        }
        match &mut self.ready_local {
            Some(server) => server.poll_ready(cx),
            None => self.network.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        inject_context(&mut HeaderCarrier(request.headers_mut()));
        match self.ready_local.take() {
            Some(mut server) => server.call(request),
            None => {
                let call = self.network.call(request);
                Box::pin(async move { call.await.map_err(Into::into) })
            }
        }
    }
}

/// A lazily connecting channel to `service` at its configured address.
pub fn channel(settings: &Settings, service: SuiteService) -> Result<TracedChannel, ConfigError> {
    let address = settings.services.get(service).address.clone();
    let invalid = |message: String| ConfigError::Invalid {
        key: "services.<name>.address",
        message: format!("`{address}` for {service}: {message}"),
    };
    let endpoint = Endpoint::from_shared(address.clone()).map_err(|e| invalid(e.to_string()))?;
    let authority = endpoint
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .ok_or_else(|| invalid("no host".to_owned()))?;
    let network = endpoint
        .connect_timeout(settings.gateway.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(TracedChannel { network, authority: authority.into(), ready_local: None })
}

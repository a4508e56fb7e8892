//! Channels to the other services of the suite.
//!
//! Every call between services goes over gRPC, with the caller's trace context in the
//! metadata. Channels connect lazily, so services can start in any order; a call to a service
//! that is down fails with UNAVAILABLE.

use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::config::{ConfigError, Service, Settings};

/// A channel whose calls carry the current trace context.
pub type TracedChannel =
    InterceptedService<Channel, fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>>;

/// A lazily connecting channel to `service` at its configured address.
pub fn channel(settings: &Settings, service: Service) -> Result<TracedChannel, ConfigError> {
    let address = settings.services.get(service).address.clone();
    let endpoint = Endpoint::from_shared(address.clone()).map_err(|e| ConfigError::Invalid {
        key: "services.<name>.address",
        message: format!("`{address}` for {service}: {e}"),
    })?;
    let channel = endpoint
        .connect_timeout(settings.gateway.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(InterceptedService::new(channel, crate::telemetry::inject_trace_interceptor as fn(_) -> _))
}

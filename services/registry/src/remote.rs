//! Talking to remote components: their `grpc.health.v1` (is it up?) and
//! `csp.component.v1.ComponentRuntime/Describe` (what ports does it have?).

use std::time::Duration;

use csp_proto::component::v1::{
    DescribeRequest, DescribeResponse, component_runtime_client::ComponentRuntimeClient,
};
use tonic::{Code, transport::Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The service name remote components report health under.
const RUNTIME_SERVICE: &str = "csp.component.v1.ComponentRuntime";

async fn channel(address: &str, timeout: Duration) -> Result<tonic::transport::Channel, String> {
    let endpoint =
        Endpoint::from_shared(address.to_owned()).map_err(|e| format!("not a gRPC address: {e}"))?;
    endpoint
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| csp_platform::error::error_chain(&e))
}

/// `Ok` when the endpoint reports SERVING (for the component runtime, or overall).
pub(crate) async fn check(address: &str, timeout: Duration) -> Result<(), String> {
    let mut client = HealthClient::new(channel(address, timeout).await?);
    let ask = |service: &str| HealthCheckRequest { service: service.to_owned() };
    let status = match client.check(ask(RUNTIME_SERVICE)).await {
        Ok(response) => response.into_inner().status,
        Err(status) if status.code() == Code::NotFound => {
            client
                .check(ask(""))
                .await
                .map_err(|s| format!("health check failed: {}", s.message()))?
                .into_inner()
                .status
        }
        Err(status) => {
            return Err(format!("health check failed: {} ({:?})", status.message(), status.code()));
        }
    };
    match ServingStatus::try_from(status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(format!("reports {}", other.as_str_name())),
        Err(_) => Err("reports an unknown status".into()),
    }
}

/// What the component says it is.
pub(crate) async fn describe(address: &str, timeout: Duration) -> Result<DescribeResponse, String> {
    let mut client = ComponentRuntimeClient::new(channel(address, timeout).await?);
    client
        .describe(DescribeRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("Describe failed: {}", s.message()))
}

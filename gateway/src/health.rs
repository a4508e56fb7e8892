//! The gateway's view of its upstreams' health.
//!
//! - `grpc.health.v1` on the gateway answers for every API service name with the status its
//!   service reports: one task per upstream watches the upstream's own health stream and
//!   mirrors it (NOT_SERVING while unreachable).
//! - `GET /health` gathers each upstream's `/health` report (its dependencies included) into
//!   one JSON document; 200 when every upstream is serving, 503 otherwise.

use std::{collections::BTreeMap, time::Duration};

use async_trait::async_trait;
use csp_platform::{Service, Settings, health::HealthReport, health::ServerHealth};
use futures::StreamExt as _;
use http::{Request, Uri};
use http_body_util::BodyExt as _;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use tonic::body::Body;
use tonic_health::{
    ServingStatus,
    pb::{HealthCheckRequest, health_check_response, health_client::HealthClient},
};

/// How long one upstream may take to report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts one mirroring task per upstream; they stop when the gateway drains.
pub(crate) fn spawn_mirrors(settings: &Settings, health: &ServerHealth) -> Result<(), String> {
    for service in Service::ALL {
        let channel = csp_platform::client::channel(settings, service).map_err(|e| e.to_string())?;
        let health = health.clone();
        tokio::spawn(mirror(service, HealthClient::new(channel), health));
    }
    Ok(())
}

async fn mirror(
    service: Service,
    mut client: HealthClient<csp_platform::client::TracedChannel>,
    health: ServerHealth,
) {
    let name = service.grpc_name();
    let mut backoff = Duration::from_millis(200);
    // Until the first answer the upstream is unknown: not serving.
    health.set_mirrored(name, ServingStatus::NotServing).await;
    while !health.is_draining() {
        let request = HealthCheckRequest { service: name.to_owned() };
        match client.watch(request).await {
            Ok(response) => {
                let mut updates = response.into_inner();
                while let Some(update) = updates.next().await {
                    let Ok(update) = update else { break };
                    backoff = Duration::from_millis(200);
                    let status = match health_check_response::ServingStatus::try_from(update.status) {
                        Ok(health_check_response::ServingStatus::Serving) => ServingStatus::Serving,
                        _ => ServingStatus::NotServing,
                    };
                    health.set_mirrored(name, status).await;
                    if health.is_draining() {
                        return;
                    }
                }
            }
            Err(status) => tracing::debug!(%service, %status, "upstream health unavailable"),
        }
        health.set_mirrored(name, ServingStatus::NotServing).await;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// `GET /health` of the gateway.
pub(crate) struct GatewayReport {
    upstreams: Vec<(Service, String)>,
    client: Client<HttpConnector, Body>,
    health: ServerHealth,
}

impl GatewayReport {
    pub(crate) fn new(
        settings: &Settings,
        client: Client<HttpConnector, Body>,
        health: ServerHealth,
    ) -> Self {
        let upstreams =
            Service::ALL.into_iter().map(|s| (s, settings.services.get(s).address.clone())).collect();
        Self { upstreams, client, health }
    }

    async fn upstream_report(&self, address: &str) -> Result<serde_json::Value, String> {
        let uri: Uri =
            format!("{}/health", address.trim_end_matches('/')).parse().map_err(|e| format!("{e}"))?;
        let request = Request::get(uri).body(Body::empty()).map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(REPORT_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| csp_platform::error::error_chain(&e))?;
        let body = tokio::time::timeout(REPORT_TIMEOUT, response.into_body().collect())
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| e.to_string())?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("unreadable report: {e}"))
    }
}

#[async_trait]
impl HealthReport for GatewayReport {
    async fn report(&self) -> (bool, serde_json::Value) {
        let reports = futures::future::join_all(
            self.upstreams.iter().map(|(_, address)| self.upstream_report(address)),
        )
        .await;
        let mut upstreams = BTreeMap::new();
        let mut all_serving = !self.health.is_draining();
        for ((service, address), report) in self.upstreams.iter().zip(reports) {
            let entry = match report {
                Ok(report) => {
                    let status =
                        report.get("status").and_then(|s| s.as_str()).unwrap_or("UNKNOWN").to_owned();
                    all_serving &= status == "SERVING";
                    serde_json::json!({
                        "service": service.grpc_name(),
                        "address": address,
                        "status": status,
                        "dependencies": report.get("dependencies").cloned().unwrap_or_default(),
                    })
                }
                Err(reason) => {
                    all_serving = false;
                    serde_json::json!({
                        "service": service.grpc_name(),
                        "address": address,
                        "status": "UNREACHABLE",
                        "error": reason,
                    })
                }
            };
            upstreams.insert(service.name(), entry);
        }
        let body = serde_json::json!({
            "status": if all_serving { "SERVING" } else { "DEGRADED" },
            "gateway": { "draining": self.health.is_draining() },
            "upstreams": upstreams,
        });
        (all_serving, body)
    }
}

//! The edge of the suite: one port for browsers (grpc-web over HTTP/1.1 or h2) and gRPC
//! clients.
//!
//! - Forwards each call by its gRPC service name to that service's address
//!   (`services.<name>.address`), schema-agnostic, streams included ([`forward`]).
//! - Refuses calls to the API without a valid access token (verified locally, see
//!   `csp_platform::auth`), except [`PUBLIC_CALLS`]; the token is forwarded, and the client's
//!   address goes along as `x-forwarded-for`.
//! - CORS for `gateway.cors_origins`; request messages over `gateway.max_message_bytes` get
//!   RESOURCE_EXHAUSTED; unary calls get a bounded deadline.
//! - A token bucket per signed-in user (per address without a token) limits the calls each
//!   client makes, across gateway replicas ([`limit`]).
//! - Serves reflection for the whole API and `grpc.health.v1` for every service name
//!   (mirroring each service's own health), so `grpcurl -plaintext localhost:8080 list` and
//!   `grpc-health-probe` work against the gateway alone.
//! - `GET /health` (every upstream with its dependencies) and `GET /metrics` (Prometheus).
//!
//! Run it alone with `csp serve --target gateway`; see the README for its settings.

use std::{sync::Arc, time::Duration};

use csp_bus::SharedBus;
use csp_platform::{GrpcServer, ServerError, Settings, auth::AuthLayer, server::bind};
use http::{HeaderName, Method};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, util::BoxCloneSyncService};
use tower_http::cors::{AllowOrigin, CorsLayer};

mod forward;
mod health;
mod limit;

/// Calls that need no access token: how one gets a token in the first place. Health and
/// reflection are answered by the gateway itself and are public too.
pub const PUBLIC_CALLS: &[&str] = &[
    "/csp.auth.v1.AuthService/Login",
    "/csp.auth.v1.AuthService/Refresh",
    "/csp.auth.v1.AuthService/Register",
    "/csp.auth.v1.AuthService/GetPublicKeys",
];

/// Why the gateway could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The settings name an unusable upstream.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// The gateway, bound and ready to serve.
pub struct Application {
    server: GrpcServer,
    settings: Settings,
    upstreams: Arc<forward::Upstreams>,
    limits: Option<Arc<limit::RateLimits>>,
}

impl Application {
    /// Binds `gateway.listen` and prepares the gateway.
    pub async fn build(settings: &Settings, bus: SharedBus) -> Result<Self, Error> {
        let listener = bind("gateway", settings.gateway.listen).await?;
        Self::with_listener(settings, bus, listener)
    }

    /// Prepares the gateway on an already bound listener. Must run inside the tokio runtime
    /// (it starts the token verifier's background tasks).
    pub fn with_listener(settings: &Settings, bus: SharedBus, listener: TcpListener) -> Result<Self, Error> {
        let upstreams = Arc::new(forward::Upstreams::new(settings).map_err(Error::Config)?);
        let limits = limit::RateLimits::new(&settings.gateway.rate_limit, bus.clone());
        let verifier =
            csp_bus::revocations::remote_verifier(settings, bus).map_err(|e| Error::Config(e.to_string()))?;
        let server = GrpcServer::new("gateway", listener, settings)?
            .reflect_services(&csp_proto::SERVICE_NAMES)
            .with_auth(AuthLayer::required(verifier, &csp_proto::SERVICE_NAMES, PUBLIC_CALLS));
        let report = health::GatewayReport::new(settings, upstreams.client().clone(), server.health());
        let server = server.with_health_report(Arc::new(report));
        Ok(Self { server, settings: settings.clone(), upstreams, limits })
    }

    /// The address the gateway listens on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.server.local_addr()
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run_until_stopped(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), Error> {
        let Application { server, settings, upstreams, limits } = self;
        health::spawn_mirrors(&settings, &server.health()).map_err(Error::Config)?;
        let cors = cors_layer(&settings);
        server
            .serve_with(
                |routes| BoxCloneSyncService::new(forward::Dispatch::new(upstreams, routes, limits)),
                |inner| {
                    BoxCloneSyncService::new(
                        ServiceBuilder::new()
                            .layer(cors)
                            .layer(tonic_web::GrpcWebLayer::new())
                            .service(inner),
                    )
                },
                shutdown,
            )
            .await?;
        Ok(())
    }
}

/// CORS for grpc-web: the configured origins may POST with the grpc-web headers and read the
/// gRPC status headers.
fn cors_layer(settings: &Settings) -> CorsLayer {
    let origins = &settings.gateway.cors_origins;
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    let headers =
        |names: &[&'static str]| names.iter().map(|n| HeaderName::from_static(n)).collect::<Vec<_>>();
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers(headers(&[
            "content-type",
            "x-grpc-web",
            "x-user-agent",
            "grpc-timeout",
            "authorization",
            "traceparent",
            "tracestate",
        ]))
        .expose_headers(headers(&["grpc-status", "grpc-message", "grpc-status-details-bin", "retry-after"]))
        .max_age(Duration::from_secs(24 * 3600))
}

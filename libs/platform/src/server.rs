//! The standard gRPC server every service (and the gateway) runs.
//!
//! [`GrpcServer`] binds its listener when created — so the real port is known before serving,
//! and tests bind `127.0.0.1:0` without races — then takes the gRPC services and serves them
//! with the suite's common stack:
//!
//! ```text
//! HttpEndpoints               GET /health (JSON), GET /metrics (Prometheus), GET /alerts
//!  └ edge                     (the gateway: CORS, grpc-web)
//!     └ ObserveLayer          server span from `traceparent`, csp_grpc_* metrics
//!        └ AuthLayer          bearer token → Principal in the request (when configured)
//!           └ concurrency     at most `server.concurrency_limit` calls at once
//!              └ routes       the services, grpc.health.v1, reflection v1 + v1alpha
//! ```
//!
//! Every call also gets `server.request_timeout` as its deadline unless the client sent a
//! `grpc-timeout` (for streams the deadline covers the response headers, not the stream).
//!
//! The stack from `ObserveLayer` down is also reachable in process, under the listening
//! address, by clients of this process (see [`crate::local`]) until the server drains.
//!
//! Shutdown: when the shutdown future completes the server reports NOT_SERVING, waits
//! `server.shutdown_delay` (so load balancers stop routing to it), stops accepting, and gives
//! in-flight calls `server.drain_timeout` to finish.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::StreamExt as _;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use http::{Request, Response};
use tokio::net::TcpListener;
use tonic::{
    body::Body,
    server::NamedService,
    service::{Routes, RoutesBuilder},
    transport::server::TcpIncoming,
};
use tower::{
    Layer as _, Service, ServiceBuilder, limit::GlobalConcurrencyLimitLayer, util::BoxCloneSyncService,
};

use crate::{
    auth::AuthLayer,
    config::{ServerSettings, Settings},
    health::{Dependencies, HealthReport, ServerHealth},
    http::HttpEndpointsLayer,
    metrics::ObserveLayer,
};

/// The type-erased HTTP service a server runs: requests in, responses out, never an error
/// (errors are gRPC statuses inside the response).
pub type HttpService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// Why a server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr} for {server}")]
    Bind {
        /// The server that tried.
        server: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error (address in use, permission denied, ...).
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("{server} server failed")]
    Serve {
        /// The server.
        server: &'static str,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The reflection service could not be built from the descriptors.
    #[error("cannot build server reflection: {0}")]
    Reflection(String),
}

/// Binds a TCP listener, naming the server and address in the error.
pub async fn bind(server: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { server, addr, source })
}

/// A gRPC server being assembled. See the module docs.
pub struct GrpcServer {
    name: &'static str,
    listener: TcpListener,
    local_addr: SocketAddr,
    settings: ServerSettings,
    metrics: bool,
    alerts: crate::config::AlertSettings,
    routes: RoutesBuilder,
    served: Vec<&'static str>,
    reflected: Option<Vec<&'static str>>,
    health: ServerHealth,
    report: Option<Arc<dyn HealthReport>>,
    auth: Option<AuthLayer>,
}

impl GrpcServer {
    /// A server named `name` (a metrics label and log field) on an already bound listener.
    pub fn new(name: &'static str, listener: TcpListener, settings: &Settings) -> Result<Self, ServerError> {
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            server: name,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let (reporter, _) = tonic_health::server::health_reporter();
        Ok(Self {
            name,
            listener,
            local_addr,
            settings: settings.server.clone(),
            metrics: settings.metrics.enabled && crate::metrics::install(),
            alerts: settings.alerts.clone(),
            routes: Routes::builder(),
            served: Vec::new(),
            reflected: None,
            health: ServerHealth::new(name, reporter),
            report: None,
            auth: None,
        })
    }

    /// The address actually bound (with the real port when `:0` was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Adds a gRPC service; it is reported in health and reflection under its name.
    pub fn add_service<S, B>(mut self, service: S) -> Self
    where
        S: Service<Request<Body>, Response = Response<B>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<tonic::codegen::StdError>,
    {
        self.served.push(S::NAME);
        self.health.track(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// The probes whose failure makes this server NOT_SERVING.
    pub fn with_dependencies(self, dependencies: Dependencies) -> Self {
        self.health.set_dependencies(dependencies);
        self
    }

    /// Advertise these service names in reflection instead of the served ones (the gateway
    /// advertises the whole API).
    pub fn reflect_services(mut self, names: &[&'static str]) -> Self {
        self.reflected = Some(names.to_vec());
        self
    }

    /// Answer `GET /health` from this report instead of the server's own.
    pub fn with_health_report(mut self, report: Arc<dyn HealthReport>) -> Self {
        self.report = Some(report);
        self
    }

    /// Verify the bearer token of every call with `auth` (see [`crate::auth`]).
    pub fn with_auth(mut self, auth: AuthLayer) -> Self {
        self.auth = Some(auth);
        self
    }

    /// The server's health: its reporter drives `grpc.health.v1`.
    pub fn health(&self) -> ServerHealth {
        self.health.clone()
    }

    /// Serves until `shutdown` completes, then drains. See the module docs.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        self.serve_with(BoxCloneSyncService::new, |service| service, shutdown).await
    }

    /// Like [`serve`](Self::serve), with two hooks for an edge server (the gateway):
    /// `routes_service` turns the local routes into the innermost service (adding a
    /// forwarder), and `edge` wraps everything below `GET /health` and `/metrics` (CORS,
    /// grpc-web), so calls are observed after grpc-web is decoded.
    pub async fn serve_with(
        self,
        routes_service: impl FnOnce(Routes) -> HttpService,
        edge: impl FnOnce(HttpService) -> HttpService,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let GrpcServer {
            name,
            listener,
            local_addr,
            settings,
            metrics,
            alerts,
            mut routes,
            served,
            reflected,
            health,
            report,
            auth,
        } = self;
        let advertised = reflected.unwrap_or_else(|| served.clone());
        add_reflection(&mut routes, &advertised)?;
        routes.add_service(tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.reporter().clone()),
        ));
        let inner = routes_service(routes.routes().prepare());

        let report: Arc<dyn HealthReport> = report.unwrap_or_else(|| Arc::new(health.clone()));
        let limited: HttpService = BoxCloneSyncService::new(
            GlobalConcurrencyLimitLayer::new(settings.concurrency_limit).layer(inner),
        );
        // Text no store can keep is refused by the services (the gateway passes calls on, and
        // the service behind it refuses them).
        let checked: HttpService = if name == "gateway" {
            limited
        } else {
            BoxCloneSyncService::new(
                crate::text::NulTextLayer::new(settings.max_message_bytes).layer(limited),
            )
        };
        let authenticated: HttpService = match auth {
            Some(auth) => BoxCloneSyncService::new(auth.layer(checked)),
            None => checked,
        };
        let trusted = crate::proxies::TrustedProxiesLayer::new(settings.trusted_proxies.clone());
        let observed = BoxCloneSyncService::new(ObserveLayer::new(name).layer(trusted.layer(authenticated)));
        // Callers in this process reach the same stack without the network, until the drain.
        let registration = crate::local::register(local_addr, observed.clone(), settings.request_timeout);
        let service =
            ServiceBuilder::new().layer(HttpEndpointsLayer::new(report, metrics)).service(edge(observed));
        crate::alerts::start(&alerts);
        health.refresh().await;
        let monitor = tokio::spawn(health.clone().monitor(settings.health_check_interval));

        // Connections that outlive the drain timeout are closed through `kill`.
        let kill = CancellationToken::new();
        let incoming = {
            let kill = kill.clone();
            TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60)))
                .map(move |accepted| accepted.map(|stream| Killable::new(stream, kill.clone())))
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .accept_http1(true)
            .timeout(settings.request_timeout)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .serve_with_incoming_shutdown(service, incoming, async {
                let _ = stop_rx.await;
            });
        let mut running = tokio::spawn(server);
        tracing::info!(server = name, addr = %local_addr, services = ?served, "serving");

        tokio::select! {
            joined = &mut running => {
                monitor.abort();
                return flatten(name, joined);
            }
            () = shutdown => {}
        }

        tracing::info!(server = name, "shutting down: reporting NOT_SERVING");
        drop(registration);
        health.begin_drain().await;
        monitor.abort();
        tokio::time::sleep(settings.shutdown_delay).await;
        let _ = stop_tx.send(());
        match tokio::time::timeout(settings.drain_timeout, &mut running).await {
            Ok(joined) => {
                tracing::info!(server = name, "stopped");
                flatten(name, joined)
            }
            Err(_) => {
                tracing::warn!(
                    server = name,
                    drain_timeout_s = settings.drain_timeout.as_secs_f64(),
                    "calls still running after the drain timeout; closing their connections"
                );
                kill.cancel();
                if tokio::time::timeout(Duration::from_secs(1), &mut running).await.is_err() {
                    running.abort();
                }
                Ok(())
            }
        }
    }
}

/// An accepted connection that fails (waking its task) once `killed` fires, so a server can
/// close connections whose calls outlive the drain timeout.
struct Killable {
    stream: TcpStream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Killable {
    fn new(stream: TcpStream, kill: CancellationToken) -> Self {
        Self { stream, killed: Box::pin(kill.cancelled_owned()) }
    }
}

fn aborted() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "server shut down")
}

impl AsyncRead for Killable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.killed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Killable {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.killed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for Killable {
    type ConnectInfo = <TcpStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

fn flatten(
    server: &'static str,
    joined: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), ServerError> {
    match joined {
        Ok(result) => result.map_err(|source| ServerError::Serve { server, source }),
        Err(join) if join.is_cancelled() => Ok(()),
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

/// Adds reflection v1 and v1alpha (grpcurl 1.8 speaks only v1alpha) over the whole descriptor
/// set, advertising `services` plus health and reflection themselves.
fn add_reflection(routes: &mut RoutesBuilder, services: &[&'static str]) -> Result<(), ServerError> {
    let builder = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(csp_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(csp_proto::ERROR_DETAILS_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for name in services {
            builder = builder.with_service_name(*name);
        }
        builder
    };
    routes.add_service(builder().build_v1().map_err(|e| ServerError::Reflection(e.to_string()))?);
    routes.add_service(builder().build_v1alpha().map_err(|e| ServerError::Reflection(e.to_string()))?);
    Ok(())
}

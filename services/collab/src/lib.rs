//! The collaboration service: who is on a design, where their cursors are, what they
//! selected, and every committed change and execution of the design, live, across replicas.
//!
//! Serves `csp.collab.v1.CollaborationService`: Join, UpdatePresence, Heartbeat, Leave,
//! Session, GetStats. See the crate's README for the guarantees and `collab.*` settings.
//!
//! - A design's session is a roster on the event bus (`collab:<design id>`, see `log`): its
//!   members are the sessions, with a lease renewed by heartbeats, and its stream is the log
//!   every client's events come from, the same for every replica.
//! - Each replica follows the designs its clients are on in a *room* (`room`), relaying design
//!   changes and execution status changes into the log and fanning the log out to its clients
//!   through bounded per-client queues (`outbox`).
//! - Every replica ends sessions whose lease ran out, also those of replicas that died.
//!
//! Switched off with `features.collaboration: false`: every RPC then answers UNIMPLEMENTED
//! naming the flag.
//!
//! Run it alone with `csp serve --target collab`: it listens on `services.collab.listen` and
//! reaches the design service at `services.design.address`. It keeps no tables (its migrations
//! are empty, kept for `csp migrate`); its health (`grpc.health.v1`, `GET /health`) follows the
//! event bus.

use std::{future::Future, net::SocketAddr, sync::Arc};

use csp_bus::SharedBus;
use csp_platform::{
    GrpcServer, ServerError, Service, Settings, auth::AuthLayer, config::ConfigError, health::Dependencies,
    server::bind,
};
use csp_proto::collab::v1::collaboration_service_server::CollaborationServiceServer;
use csp_store::StoreError;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

mod client;
mod convert;
mod designs;
mod error;
mod grpc;
mod log;
pub mod migration;
mod model;
mod outbox;
mod room;
mod sessions;
mod stats;

/// This service.
pub const SERVICE: Service = Service::Collab;

/// The bus roster (and session log) of a design: `collab:<design id>`.
pub fn log_name(design_id: &str) -> String {
    log::name(design_id)
}

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The server failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The settings are unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The service, bound and ready to serve.
pub struct Application {
    server: GrpcServer,
    collab: Arc<sessions::Collab>,
}

impl Application {
    /// Binds `services.collab.listen` and prepares the service.
    pub async fn build(settings: &Settings, bus: SharedBus) -> Result<Self, Error> {
        let listener = bind(SERVICE.name(), settings.services.get(SERVICE).listen).await?;
        Self::with_listener(settings, bus, listener).await
    }

    /// Prepares the service on an already bound listener.
    pub async fn with_listener(
        settings: &Settings,
        bus: SharedBus,
        listener: TcpListener,
    ) -> Result<Self, Error> {
        stats::describe();
        let collab = sessions::Collab::new(bus.clone(), settings)?;
        let api = CollaborationServiceServer::new(grpc::CollabApi::new(collab.clone()))
            .max_decoding_message_size(settings.server.max_message_bytes)
            .max_encoding_message_size(settings.server.max_message_bytes);
        let verifier = csp_bus::revocations::remote_verifier(settings, bus.clone())?;
        let server = GrpcServer::new(SERVICE.name(), listener, settings)?
            .with_dependencies(Dependencies::new().with(csp_bus::probe(bus)))
            .with_auth(AuthLayer::optional(verifier))
            .add_service(InterceptedService::new(
                api,
                csp_platform::error::feature_gate("collaboration", settings.features.collaboration),
            ));
        Ok(Self { server, collab })
    }

    /// The address the service listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let stop = CancellationToken::new();
        let background = tokio::spawn(self.collab.clone().run_background(stop.clone()));
        let served = self.server.serve(shutdown).await;
        stop.cancel();
        let _ = background.await;
        served?;
        Ok(())
    }
}

/// Applies the service's pending migrations (`csp migrate`); it has none.
pub async fn migrate(settings: &Settings) -> Result<(), Error> {
    csp_store::connect(settings, SERVICE).await?.migrate::<migration::Migrator>().await?;
    Ok(())
}

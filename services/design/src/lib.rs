//! The design service: designs, nodes, connections, revisions, validation and sharing.
//!
//! Serves `csp.design.v1.DesignService`: CreateDesign, GetDesign, ListDesigns, UpdateDesign, DeleteDesign, DuplicateDesign, AddNode, UpdateNode, RemoveNode, AddConnection, RemoveConnection, ApplyOps, ListRevisions, GetRevision, DiffRevisions, RestoreRevision, ValidateDesign, CheckDeadlock, ExportDesign, ImportDesign, ExportCspm, ExportPromela, ShareDesign, UnshareDesign, TransferOwnership, CreateFromTemplate, Undo, Redo.
//!
//! - Every change goes through one commit pipeline (see `designs`): it takes the revision the
//!   caller saw, answers FAILED_PRECONDITION with the current revision when it is stale, stores
//!   the normalised ops as the next revision (with a full snapshot every
//!   `design.snapshot_every` revisions, so an old revision costs at most that many replays) and
//!   publishes a `csp.design.v1.DesignChange` on the bus stream `design:<id>`.
//! - ValidateDesign, AddConnection and ApplyOps (for the connections they add) ask the
//!   registry (`services.registry.address`) with the caller's token.
//! - The export format is documented in this crate's README.
//!
//! Run it alone with `csp serve --target design`: it listens on `services.design.listen` and
//! keeps its tables in the `design` schema (PostgreSQL) or `<database.data_dir>/design.db`
//! (SQLite). Its health (`grpc.health.v1`, `GET /health`) follows its database and the event
//! bus.

use std::{future::Future, net::SocketAddr};

use csp_bus::SharedBus;
use csp_platform::{
    GrpcServer, ServerError, Service, Settings, auth::AuthLayer, config::ConfigError, health::Dependencies,
    server::bind,
};
use csp_proto::design::v1::design_service_server::DesignServiceServer;
use csp_store::StoreError;
use tokio::net::TcpListener;

mod convert;
mod deadlock;
mod designs;
pub mod document;
mod entity;
mod error;
mod grpc;
pub mod migration;
pub mod model;
mod repo;
mod undo;
mod users;
mod validate;

pub use designs::stream;

/// This service.
pub const SERVICE: Service = Service::Design;

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
}

impl Application {
    /// Binds `services.design.listen` and prepares the service.
    pub async fn build(settings: &Settings, bus: SharedBus) -> Result<Self, Error> {
        let listener = bind(SERVICE.name(), settings.services.get(SERVICE).listen).await?;
        Self::with_listener(settings, bus, listener).await
    }

    /// Prepares the service on an already bound listener: connects its database, applies its
    /// migrations (when `database.run_migrations` is on).
    pub async fn with_listener(
        settings: &Settings,
        bus: SharedBus,
        listener: TcpListener,
    ) -> Result<Self, Error> {
        let db = csp_store::open::<migration::Migrator>(settings, SERVICE).await?;
        let registry = validate::RegistryClient::new(settings)?;
        let users = users::Users::new(settings)?;
        let designs =
            designs::Designs::new(db.conn().clone(), bus.clone(), settings.design.clone(), registry, users);
        let api = DesignServiceServer::new(grpc::DesignApi::new(std::sync::Arc::new(designs)))
            .max_decoding_message_size(settings.server.max_message_bytes)
            .max_encoding_message_size(settings.server.max_message_bytes);
        let verifier = csp_bus::revocations::remote_verifier(settings, bus.clone())?;
        let server = GrpcServer::new(SERVICE.name(), listener, settings)?
            .with_dependencies(Dependencies::new().with(db.probe()).with(csp_bus::probe(bus)))
            .with_auth(AuthLayer::optional(verifier))
            .add_service(api);
        Ok(Self { server })
    }

    /// The address the service listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        self.server.serve(shutdown).await?;
        Ok(())
    }
}

/// Applies the service's pending migrations (`csp migrate`).
pub async fn migrate(settings: &Settings) -> Result<(), Error> {
    csp_store::connect(settings, SERVICE).await?.migrate::<migration::Migrator>().await?;
    Ok(())
}

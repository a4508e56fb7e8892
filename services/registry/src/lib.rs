//! The registry service: the catalogue of component types.
//!
//! Serves `csp.registry.v1.RegistryService`: ListComponentTypes, GetComponentType,
//! ListCategories, ValidateConfig, CheckCompatibility, RegisterComponentType,
//! UpdateComponentType, DeprecateComponentType.
//!
//! - The built-in types come from `csp_components` (the code the executor runs) and are
//!   written to the database at start-up; they cannot be registered over, updated or
//!   deprecated.
//! - Custom types are served by remote endpoints implementing
//!   `csp.component.v1.ComponentRuntime`: registration checks the endpoint's health (and fills
//!   in the ports it describes when none are given); afterwards it is checked every
//!   `registry.health_check_interval` and listed as available or not.
//! - Published versions are immutable; a new version must be greater than every published one.
//! - Reads come from a catalogue in memory, reloaded after every write — on every replica,
//!   through the bus stream `registry:changes`.
//!
//! Run it alone with `csp serve --target registry`: it listens on `services.registry.listen` and
//! keeps its tables in the `registry` schema (PostgreSQL) or `<database.data_dir>/registry.db`
//! (SQLite). Its health (`grpc.health.v1`, `GET /health`) follows its database and the event
//! bus.

use std::{future::Future, net::SocketAddr};

use csp_bus::SharedBus;
use csp_platform::{
    GrpcServer, ServerError, Service, Settings, auth::AuthLayer, config::ConfigError, health::Dependencies,
    server::bind,
};
use csp_proto::registry::v1::registry_service_server::RegistryServiceServer;
use csp_store::StoreError;
use tokio::net::TcpListener;

mod catalog;
mod domain;
mod entity;
mod error;
mod grpc;
pub mod migration;
mod remote;

/// This service.
pub const SERVICE: Service = Service::Registry;

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
    /// The catalogue could not be loaded.
    #[error("loading the component catalogue: {0}")]
    Catalog(#[from] error::Error),
}

/// The service, bound and ready to serve.
pub struct Application {
    server: GrpcServer,
}

impl Application {
    /// Binds `services.registry.listen` and prepares the service.
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
        let registry =
            domain::Registry::new(db.conn().clone(), bus.clone(), settings.registry.clone()).await?;
        tokio::spawn(registry.clone().follow_changes());
        tokio::spawn(registry.clone().monitor_remotes());
        let api = RegistryServiceServer::new(grpc::RegistryApi::new(registry))
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

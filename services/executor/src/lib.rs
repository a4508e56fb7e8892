//! The executor service: runs designs as CSP process networks and streams their events.
//!
//! Serves `csp.executor.v1.ExecutorService`: StartExecution, GetExecution, ListExecutions, CancelExecution, WatchExecution, ResumeExecution, StepExecution, RetryExecution.
//!
//! Run it alone with `csp serve --target executor`: it listens on `services.executor.listen` and
//! keeps its tables in the `executor` schema (PostgreSQL) or `<database.data_dir>/executor.db`
//! (SQLite). Its health (`grpc.health.v1`, `GET /health`) follows its database and the event
//! bus. Jobs travel on the bus stream `executor:jobs` (consumer group `executors`), commands to
//! running executions on `executor:control`, events on `execution:<id>` (status changes also on
//! `executions-of:<design id>`, for collaborators); see README.md. Stopped (SIGTERM), it drains:
//! no more jobs, running executions may finish within `executor.drain_timeout`, the rest go
//! back to the other replicas at once.

use std::{future::Future, net::SocketAddr, sync::Arc};

use csp_bus::SharedBus;
use csp_platform::{
    GrpcServer, ServerError, Service, Settings, auth::AuthLayer, config::ConfigError, health::Dependencies,
    server::bind,
};
use csp_proto::executor::v1::executor_service_server::ExecutorServiceServer;
use csp_store::StoreError;
use tokio::net::TcpListener;

mod clients;
mod entity;
mod error;
mod executions;
mod grpc;
pub mod migration;
mod plan;
mod repo;
pub mod runtime;
mod stored;
mod writer;

pub use executions::{design_stream, stream};

/// This service.
pub const SERVICE: Service = Service::Executor;

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
    /// The runtime's threads could not start.
    #[error("the runtime could not start: {0}")]
    Runtime(String),
    /// The job queue could not be joined.
    #[error("the job queue: {0}")]
    Queue(#[from] error::Error),
}

/// The service, bound and ready to serve. Its workers stop with it (or when it is dropped).
pub struct Application {
    /// Taken when it runs.
    server: Option<GrpcServer>,
    executor: Arc<executions::Executor>,
}

impl Drop for Application {
    fn drop(&mut self) {
        self.executor.stop_workers();
    }
}

impl Application {
    /// Binds `services.executor.listen` and prepares the service.
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
        let executor = executions::Executor::new(db.conn().clone(), bus.clone(), settings)?;
        executor.spawn_workers().await?;
        let api = ExecutorServiceServer::new(grpc::ExecutorApi::new(executor.clone()))
            .max_decoding_message_size(settings.server.max_message_bytes)
            .max_encoding_message_size(settings.server.max_message_bytes);
        let verifier = csp_bus::revocations::remote_verifier(settings, bus.clone())?;
        let server = GrpcServer::new(SERVICE.name(), listener, settings)?
            .with_dependencies(Dependencies::new().with(db.probe()).with(csp_bus::probe(bus)))
            .with_auth(AuthLayer::optional(verifier))
            .add_service(api);
        Ok(Self { server: Some(server), executor })
    }

    /// The address the service listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.as_ref().map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), GrpcServer::local_addr)
    }

    /// Serves until `shutdown` completes, then drains: the server its calls, the worker its
    /// executions (see [`executions`]), side by side.
    pub async fn run_until_stopped(mut self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let executor = self.executor.clone();
        let Some(server) = self.server.take() else { return Ok(()) };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = server.serve(async {
            let _ = stopped.await;
        });
        tokio::pin!(served);
        tokio::select! {
            result = &mut served => {
                executor.stop_workers();
                result?;
                return Ok(());
            }
            () = shutdown => {}
        }
        let _ = stop.send(());
        let (result, ()) = tokio::join!(served, executor.drain());
        result?;
        Ok(())
    }
}

/// Applies the service's pending migrations (`csp migrate`).
pub async fn migrate(settings: &Settings) -> Result<(), Error> {
    csp_store::connect(settings, SERVICE).await?.migrate::<migration::Migrator>().await?;
    Ok(())
}

//! The AI service: model providers, conversations, function calling, usage and cost.
//!
//! Serves `csp.ai.v1.AiService`: Chat, ChatStream, CreateConversation, ListConversations, GetConversation, DeleteConversation, Analyze, GenerateCode, GetUsage, ListModels.
//!
//! - Providers (`providers`): OpenAI and any OpenAI-compatible endpoint (async-openai),
//!   Anthropic's Messages API, and a deterministic offline provider (the default), configured
//!   under `ai.providers` with their models, context windows and prices.
//! - Every call (`calls`) is checked against the context window, reserved against the limits
//!   (`limits`, held across replicas on the bus), retried and fallen back, then settled and
//!   recorded (`usage`).
//!
//! Switched off with `features.ai: false`: every RPC then answers UNIMPLEMENTED naming the
//! flag.
//!
//! Run it alone with `csp serve --target ai`: it listens on `services.ai.listen` and
//! keeps its tables in the `ai` schema (PostgreSQL) or `<database.data_dir>/ai.db`
//! (SQLite). Its health (`grpc.health.v1`, `GET /health`) follows its database and the event
//! bus.

use std::{future::Future, net::SocketAddr, sync::Arc};

use csp_bus::SharedBus;
use csp_platform::{
    GrpcServer, ServerError, Service, Settings, auth::AuthLayer, config::ConfigError, health::Dependencies,
    server::bind,
};
use csp_proto::ai::v1::ai_service_server::AiServiceServer;
use csp_store::StoreError;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

mod alerts;
mod analyze;
mod calls;
mod catalog;
mod conversations;
mod convert;
mod designs;
mod entity;
mod error;
mod grpc;
mod limits;
pub mod migration;
mod model;
mod providers;
mod service;
mod tokens;
mod tools;
mod usage;

/// This service.
pub const SERVICE: Service = Service::Ai;

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
    /// A provider cannot be set up.
    #[error("invalid configuration: {0}")]
    Provider(String),
}

/// The service, bound and ready to serve.
pub struct Application {
    server: GrpcServer,
    ai: Arc<service::Ai>,
}

impl Application {
    /// Binds `services.ai.listen` and prepares the service.
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
        // TLS to providers uses ring (no aws-lc-rs); installed once per process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        calls::describe();
        tokio::task::spawn_blocking(tokens::warm_up);
        let engine = calls::Engine {
            catalog: catalog::Catalog::new(&settings.ai).map_err(Error::Provider)?,
            limits: limits::Limits::new(bus.clone(), settings.ai.limits.clone()),
            usage: usage::UsageStore::start(db.conn().clone()),
            settings: settings.ai.clone(),
        };
        let engine = Arc::new(engine);
        alerts::register(&engine, settings.alerts.ai_cost_per_hour_usd);
        let ai = Arc::new(service::Ai {
            engine,
            conversations: conversations::Conversations::new(db.conn().clone()),
        });
        let api = AiServiceServer::new(grpc::AiApi::new(ai.clone(), designs::Designs::new(settings)?))
            .max_decoding_message_size(settings.server.max_message_bytes)
            .max_encoding_message_size(settings.server.max_message_bytes);
        let verifier = csp_bus::revocations::remote_verifier(settings, bus.clone())?;
        let server = GrpcServer::new(SERVICE.name(), listener, settings)?
            .with_dependencies(Dependencies::new().with(db.probe()).with(csp_bus::probe(bus)))
            .with_auth(AuthLayer::optional(verifier))
            .add_service(InterceptedService::new(
                api,
                csp_platform::error::feature_gate("ai", settings.features.ai),
            ));
        Ok(Self { server, ai })
    }

    /// The address the service listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let served = self.server.serve(shutdown).await;
        // Usage of the calls answered is stored before the process goes.
        self.ai.engine.usage.flush().await;
        served?;
        Ok(())
    }
}

/// Applies the service's pending migrations (`csp migrate`).
pub async fn migrate(settings: &Settings) -> Result<(), Error> {
    csp_store::connect(settings, SERVICE).await?.migrate::<migration::Migrator>().await?;
    Ok(())
}

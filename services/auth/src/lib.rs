//! The auth service: users, credentials, tokens, roles and the audit log.
//!
//! Serves `csp.auth.v1.AuthService`: Register, Login, Refresh, Logout, Me, ChangePassword,
//! GetPublicKeys, CreateUser, ListUsers, UpdateUserRoles, DisableUser, CreateApiKey,
//! RevokeApiKey, ListAuditEvents.
//!
//! - Access tokens: EdDSA (Ed25519) JWTs with `sub`, `roles`, `kid`, `iat`, `nbf`, `exp`, `jti`,
//!   verified by every service locally (see `csp_platform::auth`); keys from
//!   `auth.signing_key_file` / `auth.secret_key` / generated ([`keys`]).
//! - Refresh tokens: opaque, stored hashed, rotated on every use; presenting a rotated one
//!   revokes its whole family.
//! - Passwords: argon2id (`auth.argon2`), rules in [`identity`]; lockout after
//!   `auth.lockout.max_failures` failures per account (and per client address).
//! - Disabling a user, changing a password or roles voids the user's access tokens everywhere
//!   through the bus (`csp_bus::revocations`).
//!
//! Run it alone with `csp serve --target auth`: it listens on `services.auth.listen` and keeps
//! its tables in the `auth` schema (PostgreSQL) or `<database.data_dir>/auth.db` (SQLite). The
//! first admin: `csp admin create-user --username U --email E --role admin`.

use std::{future::Future, net::SocketAddr, sync::Arc};

use csp_bus::SharedBus;
use csp_platform::{
    GrpcServer, ServerError, Service, Settings,
    auth::{AuthLayer, Role, Verifier},
    health::Dependencies,
    server::bind,
};
use csp_proto::auth::v1::auth_service_server::AuthServiceServer;
use csp_store::StoreError;
use tokio::net::TcpListener;

mod domain;
mod entity;
pub mod error;
mod grpc;
mod identity;
pub mod keys;
mod lockout;
pub mod migration;
mod passwords;
mod repo;
mod secrets;

pub use error::Error as AuthError;

/// This service.
pub const SERVICE: Service = Service::Auth;

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The server failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The auth setup (keys, hashing parameters) is unusable.
    #[error(transparent)]
    Auth(#[from] error::Error),
}

/// The service, bound and ready to serve.
pub struct Application {
    server: GrpcServer,
}

impl Application {
    /// Binds `services.auth.listen` and prepares the service.
    pub async fn build(settings: &Settings, bus: SharedBus) -> Result<Self, Error> {
        let listener = bind(SERVICE.name(), settings.services.get(SERVICE).listen).await?;
        Self::with_listener(settings, bus, listener).await
    }

    /// Prepares the service on an already bound listener: connects its database, applies its
    /// migrations (when `database.run_migrations` is on), loads its keys.
    pub async fn with_listener(
        settings: &Settings,
        bus: SharedBus,
        listener: TcpListener,
    ) -> Result<Self, Error> {
        let db = csp_store::open::<migration::Migrator>(settings, SERVICE).await?;
        let keys = keys::KeyRing::load(settings)?;
        // The auth service verifies with its own keys: no call to itself.
        let verifier = Verifier::new(Arc::new(keys.clone()));
        tokio::spawn(csp_bus::revocations::follow(bus.clone(), verifier.clone()));
        let auth = Arc::new(domain::Auth::new(db.conn().clone(), keys, bus.clone(), settings)?);
        let api = AuthServiceServer::new(grpc::AuthApi::new(auth))
            .max_decoding_message_size(settings.server.max_message_bytes)
            .max_encoding_message_size(settings.server.max_message_bytes);
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

/// Whether any user exists yet (a first start has none, and nobody can sign in).
pub async fn has_users(settings: &Settings) -> Result<bool, Error> {
    use sea_orm::EntityTrait as _;
    let db = csp_store::open::<migration::Migrator>(settings, SERVICE).await?;
    let found = entity::user::Entity::find().one(db.conn()).await.map_err(error::Error::from)?;
    Ok(found.is_some())
}

/// Creates a user directly in the database, with the same rules as `CreateUser`
/// (`csp admin create-user`: the way to make the first admin). Returns the user id.
pub async fn create_user(
    settings: &Settings,
    username: &str,
    email: &str,
    password: &str,
    roles: Vec<Role>,
) -> Result<String, Error> {
    let db = csp_store::open::<migration::Migrator>(settings, SERVICE).await?;
    let keys = keys::KeyRing::load(settings)?;
    // No bus is needed to create a user; counters and revocations are not touched.
    let bus: SharedBus = Arc::new(csp_bus::MemoryBus::new());
    let auth = domain::Auth::new(db.conn().clone(), keys, bus, settings)?;
    let input = domain::NewUser {
        username: username.to_owned(),
        email: email.to_owned(),
        password: password.to_owned().into(),
        roles,
        ..Default::default()
    };
    let caller = domain::Caller { principal: None, address: "cli".into() };
    Ok(auth.create(input, &caller).await?.id)
}

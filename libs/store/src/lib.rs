//! Database connections and migrations.
//!
//! Each service owns its tables and reaches no other service's. On PostgreSQL each service
//! connects with `search_path` set to its own schema (`auth`, `design`, ...), created on first
//! connect, so entities carry no schema names. On the embedded default each service has its own
//! SQLite file under `database.data_dir` (WAL mode, foreign keys on).

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use csp_platform::{
    Service, Settings,
    config::{ConfigError, DatabaseTarget},
    health::Probe,
};
use sea_orm::{
    AccessMode, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction,
    DbBackend, DbErr, IsolationLevel, Statement, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use secrecy::ExposeSecret;

pub use sea_orm;
pub use sea_orm_migration;

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configuration does not name a usable database.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database did not accept a connection.
    #[error("cannot connect to the database for {service} ({location}): {reason}")]
    Connect {
        /// The service that tried.
        service: Service,
        /// Where, with any password removed.
        location: String,
        /// Why.
        reason: String,
    },
    /// The SQLite folder could not be created.
    #[error("cannot create the data folder {path}")]
    DataDir {
        /// The folder.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Migrations failed.
    #[error("migrations of {service} failed")]
    Migrate {
        /// The service.
        service: Service,
        /// The database error.
        source: DbErr,
    },
}

/// A service's database connection.
#[derive(Debug, Clone)]
pub struct Db {
    conn: DatabaseConnection,
    service: Service,
    location: String,
}

impl Db {
    /// The sea-orm connection.
    pub fn conn(&self) -> &DatabaseConnection {
        &self.conn
    }

    /// The service that owns it.
    pub fn service(&self) -> Service {
        self.service
    }

    /// `postgres` or `sqlite`.
    pub fn backend_name(&self) -> &'static str {
        match self.conn.get_database_backend() {
            DbBackend::Postgres => "postgres",
            DbBackend::Sqlite => "sqlite",
            _ => "other",
        }
    }

    /// Where the database is, with any password removed (safe to log).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Applies the pending migrations of `M`.
    pub async fn migrate<M: MigratorTrait>(&self) -> Result<(), StoreError> {
        M::up(&self.conn, None)
            .await
            .map_err(|source| StoreError::Migrate { service: self.service, source })?;
        tracing::info!(service = %self.service, location = %self.location, "migrations applied");
        Ok(())
    }

    /// A health probe of this connection.
    pub fn probe(&self) -> Arc<dyn Probe> {
        Arc::new(DbProbe(self.clone()))
    }
}

/// A read-only transaction whose reads all see one committed state: REPEATABLE READ on
/// PostgreSQL (where each statement otherwise sees its own snapshot), a deferred transaction
/// on SQLite (whose WAL readers keep the snapshot of their first read).
pub async fn consistent_read(conn: &DatabaseConnection) -> Result<DatabaseTransaction, DbErr> {
    match conn.get_database_backend() {
        DbBackend::Postgres => {
            conn.begin_with_config(Some(IsolationLevel::RepeatableRead), Some(AccessMode::ReadOnly)).await
        }
        _ => conn.begin().await,
    }
}

/// Connects `service` to its database and, when `database.run_migrations` is on, applies the
/// pending migrations of `M`.
pub async fn open<M: MigratorTrait>(settings: &Settings, service: Service) -> Result<Db, StoreError> {
    let db = connect(settings, service).await?;
    if settings.database.run_migrations {
        db.migrate::<M>().await?;
    }
    Ok(db)
}

/// Connects `service` to its database, creating its schema (PostgreSQL) or file (SQLite).
pub async fn connect(settings: &Settings, service: Service) -> Result<Db, StoreError> {
    let db = &settings.database;
    let (mut options, location, schema) = match db.target()? {
        DatabaseTarget::Postgres(url) => {
            let location = redact(url.expose_secret());
            let mut options = ConnectOptions::new(url.expose_secret().to_owned());
            options.set_schema_search_path(service.name()).set_application_name(format!("csp-{service}"));
            (options, location, Some(service.name()))
        }
        DatabaseTarget::Sqlite(dir) => {
            std::fs::create_dir_all(&dir)
                .map_err(|source| StoreError::DataDir { path: dir.display().to_string(), source })?;
            let path = dir.join(format!("{}.db", service.name()));
            let location = path.display().to_string();
            let mut options = ConnectOptions::new(format!("sqlite://{}?mode=rwc", path.display()));
            options.map_sqlx_sqlite_opts(|opts| {
                opts.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true)
            });
            (options, location, None)
        }
    };
    options
        .max_connections(db.max_connections)
        .min_connections(0)
        .connect_timeout(db.connect_timeout)
        .acquire_timeout(db.connect_timeout)
        .sqlx_logging(false);

    let conn = match Database::connect(options).await {
        Ok(conn) => conn,
        Err(e) => {
            // sqlx retries until its timeout and then says only that; a direct TCP attempt
            // names the real cause (refused, unknown host, ...).
            let reason = match schema.map(|_| tcp_reason(&location)) {
                Some(fut) => fut.await.unwrap_or_else(|| connect_reason(&e)),
                None => connect_reason(&e),
            };
            return Err(StoreError::Connect { service, location: location.clone(), reason });
        }
    };
    if let Some(schema) = schema {
        create_schema(&conn, schema).await.map_err(|e| StoreError::Connect {
            service,
            location: location.clone(),
            reason: connect_reason(&e),
        })?;
    }
    tracing::debug!(%service, %location, "database connected");
    Ok(Db { conn, service, location })
}

async fn create_schema(conn: &DatabaseConnection, schema: &str) -> Result<(), DbErr> {
    let sql = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
    // Two replicas creating the schema at once can collide on the catalogue; the second try
    // sees it exists.
    for attempt in 0..3 {
        match conn.execute_raw(Statement::from_string(DbBackend::Postgres, sql.clone())).await {
            Ok(_) => return Ok(()),
            Err(e) if attempt < 2 => {
                tracing::debug!(error = %e, "retrying schema creation");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Why a TCP connection to the URL's host fails, if it does.
async fn tcp_reason(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let host = parsed.host_str()?.to_owned();
    let port = parsed.port().unwrap_or(5432);
    match tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect((host.as_str(), port)))
        .await
    {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.to_string().to_ascii_lowercase()),
        Err(_) => Some(format!("no answer from {host}:{port}")),
    }
}

/// The innermost useful message of a connection error, without the URL.
fn connect_reason(error: &DbErr) -> String {
    let text = match error {
        DbErr::Conn(inner) => inner.to_string(),
        other => other.to_string(),
    };
    text.trim_start_matches("Connection Error: ").to_owned()
}

/// `postgres://user:secret@host/db` → `postgres://user@host/db`.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Err(_) => "<unparseable url>".into(),
    }
}

struct DbProbe(Db);

#[async_trait]
impl Probe for DbProbe {
    fn name(&self) -> &'static str {
        "database"
    }

    async fn probe(&self) -> Result<String, String> {
        self.0.conn.ping().await.map_err(|e| connect_reason(&e))?;
        Ok(self.0.backend_name().to_owned())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn redaction_removes_passwords() {
        assert_eq!(redact("postgres://app:hunter2@db:5432/csp"), "postgres://app@db:5432/csp");
        assert!(!redact("not a url with hunter2").contains("hunter2"));
    }

    #[tokio::test]
    async fn sqlite_files_are_created_per_service() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.database.data_dir = dir.path().join("nested/data");
        let db = connect(&settings, Service::Design).await.unwrap();
        assert_eq!(db.backend_name(), "sqlite");
        assert!(dir.path().join("nested/data/design.db").exists());
        assert_eq!(db.probe().probe().await.unwrap(), "sqlite");
    }

    #[tokio::test]
    async fn an_unreachable_postgres_is_a_clear_error_without_the_password() {
        let mut settings = Settings::default();
        settings.database.url = Some("postgres://app:hunter2@127.0.0.1:1/csp".to_owned().into());
        settings.database.connect_timeout = Duration::from_secs(2);
        let err = connect(&settings, Service::Auth).await.unwrap_err().to_string();
        assert!(
            err.starts_with("cannot connect to the database for auth (postgres://app@127.0.0.1:1/csp)"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }
}

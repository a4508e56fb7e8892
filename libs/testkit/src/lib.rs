//! Test helpers shared by every crate's integration tests.
//!
//! [`TestEnv`] is an isolated environment: its own SQLite folder, or its own PostgreSQL
//! database; its own in-memory bus, or its own Redis key prefix. [`run`] (usually through
//! [`backend_tests!`]) runs one test body on both backends:
//!
//! - `embedded`: SQLite files in a temporary folder + the in-memory bus — always;
//! - `external`: a fresh database on `CSP_TEST_DATABASE_URL` + Redis at `CSP_TEST_REDIS_URL`
//!   with a unique key prefix — when both are set. When `CI` or `CSP_REQUIRE_EXTERNAL` is set,
//!   missing URLs fail the test instead of skipping it.
//!
//! Teardown drops the database and deletes the keys, also when the body panics.
//!
//! [`TestIssuer`] stands in for the auth service's keys, so services can be tested with real
//! access tokens.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod issuer;

pub use issuer::{TEST_KID, TestIssuer, authed};

use std::{future::Future, panic::AssertUnwindSafe, sync::Arc};

use csp_bus::{MemoryBus, RedisBus, SharedBus};
use csp_platform::Settings;
use csp_store::sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use futures::FutureExt as _;
use secrecy::{ExposeSecret, SecretString};

/// Which backends a [`TestEnv`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite + in-memory bus.
    Embedded,
    /// PostgreSQL + Redis.
    External,
}

/// An isolated environment for one test. Cheap to clone.
#[derive(Clone)]
pub struct TestEnv {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    settings: Settings,
    bus: SharedBus,
    redis: Option<RedisBus>,
    /// The PostgreSQL database created for the test, and the admin URL to drop it with.
    database: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl TestEnv {
    /// The backends in use.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// Settings pointing at this environment's database and Redis prefix, with every listen
    /// address on `127.0.0.1:0` and quick shutdown.
    pub fn settings(&self) -> Settings {
        self.inner.settings.clone()
    }

    /// The environment's bus (one per test, shared by everything the test starts).
    pub fn bus(&self) -> SharedBus {
        self.inner.bus.clone()
    }

    /// A bus of its own for one more replica, as a separate process has: its own Redis
    /// connections (same prefix) on the external backend; the shared in-process bus on the
    /// embedded one (whose services share one process by design).
    pub async fn own_bus(&self) -> SharedBus {
        match &self.inner.redis {
            None => self.bus(),
            Some(_) => {
                let settings = &self.inner.settings;
                let url = settings.redis.url.clone().unwrap();
                Arc::new(
                    RedisBus::connect(&url, &settings.redis.key_prefix, std::time::Duration::from_secs(5))
                        .await
                        .unwrap(),
                )
            }
        }
    }

    /// The environment's folder for files.
    pub fn dir(&self) -> &std::path::Path {
        self.inner._dir.path()
    }

    /// An embedded environment.
    pub async fn embedded() -> TestEnv {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = base_settings();
        settings.database.data_dir = dir.path().join("data");
        TestEnv {
            inner: Arc::new(Inner {
                backend: Backend::Embedded,
                settings,
                bus: Arc::new(MemoryBus::new()),
                redis: None,
                database: None,
                _dir: dir,
            }),
        }
    }

    /// An external environment, or `None` when the URLs are not set (and not required).
    pub async fn external() -> Option<TestEnv> {
        let (Some(database_url), Some(redis_url)) =
            (external_url("CSP_TEST_DATABASE_URL"), external_url("CSP_TEST_REDIS_URL"))
        else {
            return None;
        };
        Some(Self::external_at(&database_url, &redis_url).await)
    }

    /// An environment with its own database on the PostgreSQL server at `database_url` and its
    /// own key prefix on the Redis at `redis_url`. Call [`TestEnv::teardown`] when done.
    pub async fn external_at(database_url: &str, redis_url: &str) -> TestEnv {
        let (database_url, redis_url) = (database_url.to_owned(), redis_url.to_owned());
        let dir = tempfile::tempdir().unwrap();
        let id = uuid::Uuid::new_v4().simple().to_string();

        let name = format!("csp_test_{}", &id[..16]);
        let admin = Database::connect(database_url.as_str())
            .await
            .unwrap_or_else(|e| panic!("CSP_TEST_DATABASE_URL is set but PostgreSQL does not answer: {e}"));
        admin
            .execute_raw(Statement::from_string(DbBackend::Postgres, format!("CREATE DATABASE \"{name}\"")))
            .await
            .unwrap();
        admin.close().await.ok();
        let mut test_url = url::Url::parse(&database_url).unwrap();
        test_url.set_path(&name);

        let prefix = format!("csp-test:{}:", &id[..16]);
        let redis = RedisBus::connect(
            &SecretString::from(redis_url.clone()),
            &prefix,
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|e| panic!("CSP_TEST_REDIS_URL is set but Redis does not answer: {e}"));

        let mut settings = base_settings();
        settings.database.url = Some(SecretString::from(test_url.to_string()));
        settings.redis.url = Some(SecretString::from(redis_url));
        settings.redis.key_prefix = prefix;
        TestEnv {
            inner: Arc::new(Inner {
                backend: Backend::External,
                settings,
                bus: Arc::new(redis.clone()),
                redis: Some(redis),
                database: Some((name, database_url)),
                _dir: dir,
            }),
        }
    }

    /// Drops the environment's database and Redis keys.
    pub async fn teardown(self) {
        if let Some(redis) = &self.inner.redis {
            let _ = redis.purge().await;
        }
        if let Some((name, admin_url)) = &self.inner.database
            && let Ok(admin) = Database::connect(admin_url.as_str()).await
        {
            let _ = admin
                .execute_raw(Statement::from_string(
                    DbBackend::Postgres,
                    format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
                ))
                .await;
            admin.close().await.ok();
        }
    }
}

/// Settings for tests: loopback ports chosen by the OS, no shutdown delay.
fn base_settings() -> Settings {
    let mut settings = Settings::default();
    settings.gateway.listen = "127.0.0.1:0".parse().unwrap();
    for service in csp_platform::Service::ALL {
        settings.services.get_mut(service).listen = "127.0.0.1:0".parse().unwrap();
    }
    settings.server.shutdown_delay = std::time::Duration::ZERO;
    settings.server.drain_timeout = std::time::Duration::from_secs(2);
    settings.log.level = "warn".into();
    settings
}

/// Whether tests must not skip the external backend.
pub fn external_required() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
        || std::env::var_os("CSP_REQUIRE_EXTERNAL").is_some()
}

fn external_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if external_required() => {
            panic!("{var} must be set when CI or CSP_REQUIRE_EXTERNAL is set")
        }
        _ => None,
    }
}

/// Runs `body` in a fresh environment of `backend`, then tears it down (also on panic).
/// Skips (returns) when the external backend is not configured and not required.
pub async fn run<F, Fut>(backend: Backend, body: F)
where
    F: FnOnce(TestEnv) -> Fut,
    Fut: Future<Output = ()>,
{
    let env = match backend {
        Backend::Embedded => TestEnv::embedded().await,
        Backend::External => match TestEnv::external().await {
            Some(env) => env,
            None => {
                eprintln!(
                    "skipped: set CSP_TEST_DATABASE_URL and CSP_TEST_REDIS_URL to run on PostgreSQL + Redis"
                );
                return;
            }
        },
    };
    let outcome = AssertUnwindSafe(body(env.clone())).catch_unwind().await;
    env.teardown().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Generates, for each `async fn name(env: TestEnv)` listed, a module `name` with two tests:
/// `embedded` (SQLite + in-memory bus) and `external` (PostgreSQL + Redis).
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    $crate::run($crate::Backend::Embedded, super::$name).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn external() {
                    $crate::run($crate::Backend::External, super::$name).await;
                }
            }
        )*
    };
}

/// The URL a [`Settings`] points PostgreSQL at, for assertions.
pub fn database_url(settings: &Settings) -> Option<String> {
    settings.database.url.as_ref().map(|u| u.expose_secret().to_owned())
}

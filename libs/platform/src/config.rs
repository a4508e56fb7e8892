//! Typed, layered configuration.
//!
//! Layers, later ones winning: built-in defaults < `config/<environment>.yml` (or the file given
//! with `--config`) < the seed's environment variables (`DATABASE_URL`, `REDIS_URL`, `DB_HOST`,
//! `LOG_LEVEL`, ... see [`SEED_ENV`]) < `CSP_<SECTION>__<KEY>` variables (for example
//! `CSP_GATEWAY__LISTEN=0.0.0.0:9000`). Unknown keys are rejected, every error names the key
//! and where its value came from, and secrets are [`SecretString`]s that never print.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use figment::{Figment, providers::Format};

mod ai;

pub use ai::{AiLimits, AiSettings, ModelSettings, ProviderKind, ProviderSettings, builtin_providers};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_saphyr::figment::Yaml;

/// Seed environment variables (unprefixed) and the configuration key each one sets.
pub const SEED_ENV: &[(&str, &str)] = &[
    ("ENVIRONMENT", "environment"),
    ("LOG_LEVEL", "log.level"),
    ("LOG_FORMAT", "log.format"),
    ("ENABLE_METRICS", "metrics.enabled"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "telemetry.otlp_endpoint"),
    ("DATABASE_URL", "database.url"),
    ("DB_HOST", "database.host"),
    ("DB_PORT", "database.port"),
    ("DB_NAME", "database.name"),
    ("DB_USER", "database.user"),
    ("DB_PASSWORD", "database.password"),
    ("REDIS_URL", "redis.url"),
    ("REDIS_HOST", "redis.host"),
    ("REDIS_PORT", "redis.port"),
    ("REDIS_DB", "redis.db"),
    ("REDIS_PASSWORD", "redis.password"),
    ("SECRET_KEY", "auth.secret_key"),
    ("JWT_ACCESS_TOKEN_EXPIRE_MINUTES", "auth.access_token_expire_minutes"),
    ("OPENAI_API_KEY", "ai.openai_api_key"),
    ("ANTHROPIC_API_KEY", "ai.anthropic_api_key"),
];

/// `CSP_*` variables that are not configuration keys: they belong to the CLI and the tests.
const NON_CONFIG_CSP_VARS: &[&str] =
    &["config", "admin_password", "test_database_url", "test_redis_url", "require_external"];

/// A configuration problem, with the key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or did not match the schema (unknown key, wrong type).
    #[error("invalid configuration: {0}")]
    Load(String),
    /// A value was read but is not acceptable.
    #[error("invalid configuration: {key}: {message}")]
    Invalid {
        /// The dotted key, e.g. `database.url`.
        key: &'static str,
        /// What is wrong with its value.
        message: String,
    },
}

/// Every setting of the suite. Each service reads the sections it needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Name of the environment; selects `config/<environment>.yml`.
    pub environment: String,
    /// Logging.
    pub log: LogSettings,
    /// Distributed tracing.
    pub telemetry: TelemetrySettings,
    /// Prometheus metrics.
    pub metrics: MetricsSettings,
    /// Alert thresholds, evaluated in every process.
    pub alerts: AlertSettings,
    /// The relational database.
    pub database: DatabaseSettings,
    /// Redis (the event bus and counters in distributed mode).
    pub redis: RedisSettings,
    /// Settings shared by every gRPC server.
    pub server: ServerSettings,
    /// Where each service listens and where the others reach it.
    pub services: ServicesSettings,
    /// The edge: grpc-web, CORS, limits.
    pub gateway: GatewaySettings,
    /// Feature flags.
    pub features: FeatureFlags,
    /// Authentication.
    pub auth: AuthSettings,
    /// AI providers.
    pub ai: AiSettings,
    /// The component registry.
    pub registry: RegistrySettings,
    /// The design service.
    pub design: DesignSettings,
    /// The executor.
    pub executor: ExecutorSettings,
    /// The collaboration service.
    pub collab: CollabSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            environment: "development".into(),
            log: LogSettings::default(),
            telemetry: TelemetrySettings::default(),
            metrics: MetricsSettings::default(),
            alerts: AlertSettings::default(),
            database: DatabaseSettings::default(),
            redis: RedisSettings::default(),
            server: ServerSettings::default(),
            services: ServicesSettings::default(),
            gateway: GatewaySettings::default(),
            features: FeatureFlags::default(),
            auth: AuthSettings::default(),
            ai: AiSettings::default(),
            registry: RegistrySettings::default(),
            design: DesignSettings::default(),
            executor: ExecutorSettings::default(),
            collab: CollabSettings::default(),
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A tracing filter directive: `info`, `debug`, `csp_executor=debug,info`, ...
    pub level: String,
    /// `pretty` for people, `json` for log pipelines.
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Pretty }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, one line per event.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// OpenTelemetry export.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// OTLP/gRPC endpoint, e.g. `http://otel-collector:4317`; spans are exported only when set.
    pub otlp_endpoint: Option<String>,
}

/// Prometheus metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Serve `GET /metrics` and record metrics.
    pub enabled: bool,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Alert thresholds. Each process evaluates the rules it has the numbers for (every server:
/// error rate and latency; the executor: the queue and takeovers; the AI service: spend) every
/// `interval_seconds` over the last `window_seconds`, and reports them on `GET /alerts` and as
/// `csp_alert_firing{alert}`. The Helm chart renders the same thresholds into its
/// PrometheusRule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertSettings {
    /// Evaluate the rules at all.
    pub enabled: bool,
    /// Seconds between two evaluations.
    pub interval_seconds: u64,
    /// Seconds of history the rates and the latency are computed over.
    pub window_seconds: u64,
    /// Fires when more than this fraction of the calls in the window failed on the server's
    /// side (Unknown, Internal, Unavailable, DataLoss, DeadlineExceeded)...
    pub error_rate: f64,
    /// ... and the window held at least this many calls.
    pub min_calls: u64,
    /// Fires when the p99 duration of unary calls in the window is above this.
    pub p99_latency_seconds: f64,
    /// Fires when more executions than this wait for a replica.
    pub queue_depth: u64,
    /// Fires when more executions than this were taken over in the window from replicas that
    /// stopped renewing their leases (a replica lost: killed, frozen or cut off).
    pub takeovers: u64,
    /// Fires when the AI spend of the last hour, across replicas, is above this (US dollars).
    pub ai_cost_per_hour_usd: f64,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_seconds: 15,
            window_seconds: 300,
            error_rate: 0.05,
            min_calls: 20,
            p99_latency_seconds: 2.5,
            queue_depth: 1000,
            takeovers: 0,
            ai_cost_per_hour_usd: 25.0,
        }
    }
}

/// The relational database. With neither `url` nor `host`, each service uses its own SQLite
/// file under `data_dir`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `postgres://user:pass@host:5432/db` or `sqlite://path/to/dir`.
    pub url: Option<SecretString>,
    /// PostgreSQL host, used with the fields below when `url` is unset.
    pub host: Option<String>,
    /// PostgreSQL port.
    pub port: u16,
    /// PostgreSQL database name.
    pub name: String,
    /// PostgreSQL user.
    pub user: String,
    /// PostgreSQL password.
    pub password: Option<SecretString>,
    /// Folder of the SQLite files of the embedded default.
    pub data_dir: PathBuf,
    /// Upper bound of each service's connection pool.
    pub max_connections: u32,
    /// How long to wait for a connection before failing.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Apply pending migrations at start-up.
    pub run_migrations: bool,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: None,
            host: None,
            port: 5432,
            name: "csp".into(),
            user: "csp".into(),
            password: None,
            data_dir: PathBuf::from("./data"),
            max_connections: 10,
            connect_timeout: Duration::from_secs(5),
            run_migrations: true,
        }
    }
}

/// Which database a service talks to.
#[derive(Debug, Clone)]
pub enum DatabaseTarget {
    /// A PostgreSQL server; each service uses its own schema.
    Postgres(SecretString),
    /// SQLite files under this folder, one per service.
    Sqlite(PathBuf),
}

impl DatabaseSettings {
    /// Resolves `url`, or `host` and friends, or the SQLite default.
    pub fn target(&self) -> Result<DatabaseTarget, ConfigError> {
        if let Some(url) = &self.url {
            let raw = url.expose_secret();
            if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
                return Ok(DatabaseTarget::Postgres(url.clone()));
            }
            if let Some(path) = raw.strip_prefix("sqlite://").or_else(|| raw.strip_prefix("sqlite:")) {
                let path = path.split('?').next().unwrap_or_default();
                return Ok(DatabaseTarget::Sqlite(PathBuf::from(if path.is_empty() { "." } else { path })));
            }
            return Err(ConfigError::Invalid {
                key: "database.url",
                message: "must start with postgres://, postgresql:// or sqlite://".into(),
            });
        }
        if let Some(host) = &self.host {
            let mut url = url::Url::parse("postgres://localhost")
                .map_err(|e| ConfigError::Invalid { key: "database.host", message: e.to_string() })?;
            url.set_host(Some(host))
                .map_err(|e| ConfigError::Invalid { key: "database.host", message: e.to_string() })?;
            let _ = url.set_port(Some(self.port));
            let _ = url.set_username(&self.user);
            if let Some(password) = &self.password {
                let _ = url.set_password(Some(password.expose_secret()));
            }
            url.set_path(&self.name);
            return Ok(DatabaseTarget::Postgres(SecretString::from(url.to_string())));
        }
        Ok(DatabaseTarget::Sqlite(self.data_dir.clone()))
    }
}

/// Redis. Without `url` or `host` the suite uses its in-process event bus.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://[:password@]host:6379/0`.
    pub url: Option<SecretString>,
    /// Redis host, used with the fields below when `url` is unset.
    pub host: Option<String>,
    /// Redis port.
    pub port: u16,
    /// Redis logical database.
    pub db: u8,
    /// Redis password.
    pub password: Option<SecretString>,
    /// Prefix of every key the suite writes, so several deployments can share a server.
    pub key_prefix: String,
    /// How long to wait for a connection before failing.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: None,
            host: None,
            port: 6379,
            db: 0,
            password: None,
            key_prefix: "csp:".into(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl RedisSettings {
    /// The Redis URL from `url`, or from `host` and friends; `None` means the in-process bus.
    pub fn resolved_url(&self) -> Result<Option<SecretString>, ConfigError> {
        if let Some(url) = &self.url {
            let raw = url.expose_secret();
            if !(raw.starts_with("redis://") || raw.starts_with("rediss://")) {
                return Err(ConfigError::Invalid {
                    key: "redis.url",
                    message: "must start with redis:// or rediss://".into(),
                });
            }
            return Ok(Some(url.clone()));
        }
        let Some(host) = &self.host else {
            return Ok(None);
        };
        let auth = match &self.password {
            Some(p) => format!(":{}@", p.expose_secret()),
            None => String::new(),
        };
        Ok(Some(SecretString::from(format!("redis://{auth}{host}:{}/{}", self.port, self.db))))
    }
}

/// Settings every gRPC server shares.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Deadline of a unary call (or of the first response of a streaming call) when the
    /// client sets none.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Calls served at once per server; further calls wait.
    pub concurrency_limit: usize,
    /// Largest message a server accepts or sends, in bytes.
    pub max_message_bytes: usize,
    /// How long a server reports NOT_SERVING before it stops accepting connections, so load
    /// balancers stop routing to it.
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// How long in-flight calls may take to finish after the server stops accepting.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How often dependencies (database, Redis) are probed for health.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// Peers whose `x-forwarded-for` is believed (the gateway's addresses); from anyone else
    /// the header is dropped, and the connection's own address is the client's. By default
    /// loopback and the private ranges (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7),
    /// where the gateway runs in compose and Kubernetes and which no outside caller has.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            concurrency_limit: 1024,
            max_message_bytes: 4 * 1024 * 1024,
            shutdown_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(10),
            health_check_interval: Duration::from_secs(5),
            trusted_proxies: [
                "127.0.0.0/8",
                "::1/128",
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
                "fc00::/7",
            ]
            .iter()
            .filter_map(|net| net.parse().ok())
            .collect(),
        }
    }
}

/// Where one service listens and where others reach it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEndpoint {
    /// Address to bind when this service runs as its own target.
    pub listen: SocketAddr,
    /// URL the gateway and the other services use to reach it, e.g. `http://design:50052`.
    pub address: String,
}

impl ServiceEndpoint {
    fn on_port(port: u16) -> Self {
        Self { listen: SocketAddr::from(([0, 0, 0, 0], port)), address: format!("http://127.0.0.1:{port}") }
    }
}

/// The endpoints of the six services. Setting one key of an endpoint (say
/// `CSP_SERVICES__EXECUTOR__LISTEN`) keeps the other's default.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "PartialServices")]
pub struct ServicesSettings {
    /// The auth service.
    pub auth: ServiceEndpoint,
    /// The design service.
    pub design: ServiceEndpoint,
    /// The registry service.
    pub registry: ServiceEndpoint,
    /// The executor service.
    pub executor: ServiceEndpoint,
    /// The collaboration service.
    pub collab: ServiceEndpoint,
    /// The AI service.
    pub ai: ServiceEndpoint,
}

/// An endpoint as configured: either key may be left out.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialEndpoint {
    listen: Option<SocketAddr>,
    address: Option<String>,
}

impl PartialEndpoint {
    fn or(self, default: ServiceEndpoint) -> ServiceEndpoint {
        ServiceEndpoint {
            listen: self.listen.unwrap_or(default.listen),
            address: self.address.unwrap_or(default.address),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PartialServices {
    auth: PartialEndpoint,
    design: PartialEndpoint,
    registry: PartialEndpoint,
    executor: PartialEndpoint,
    collab: PartialEndpoint,
    ai: PartialEndpoint,
}

impl From<PartialServices> for ServicesSettings {
    fn from(p: PartialServices) -> Self {
        let d = Self::default();
        Self {
            auth: p.auth.or(d.auth),
            design: p.design.or(d.design),
            registry: p.registry.or(d.registry),
            executor: p.executor.or(d.executor),
            collab: p.collab.or(d.collab),
            ai: p.ai.or(d.ai),
        }
    }
}

impl Default for ServicesSettings {
    fn default() -> Self {
        Self {
            auth: ServiceEndpoint::on_port(50051),
            design: ServiceEndpoint::on_port(50052),
            registry: ServiceEndpoint::on_port(50053),
            executor: ServiceEndpoint::on_port(50054),
            collab: ServiceEndpoint::on_port(50055),
            ai: ServiceEndpoint::on_port(50056),
        }
    }
}

impl ServicesSettings {
    /// The endpoint of one service.
    pub fn get(&self, service: Service) -> &ServiceEndpoint {
        match service {
            Service::Auth => &self.auth,
            Service::Design => &self.design,
            Service::Registry => &self.registry,
            Service::Executor => &self.executor,
            Service::Collab => &self.collab,
            Service::Ai => &self.ai,
        }
    }

    /// The endpoint of one service, for changing it (the `all` target points every address
    /// at the loopback port it bound).
    pub fn get_mut(&mut self, service: Service) -> &mut ServiceEndpoint {
        match service {
            Service::Auth => &mut self.auth,
            Service::Design => &mut self.design,
            Service::Registry => &mut self.registry,
            Service::Executor => &mut self.executor,
            Service::Collab => &mut self.collab,
            Service::Ai => &mut self.ai,
        }
    }
}

/// The edge.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// Address the gateway binds.
    pub listen: SocketAddr,
    /// Origins browsers may call from, e.g. `http://localhost:5173`; `*` allows any. From the
    /// environment, a comma-separated list.
    #[serde(deserialize_with = "string_or_list")]
    pub cors_origins: Vec<String>,
    /// Largest request message forwarded, in bytes; larger ones get RESOURCE_EXHAUSTED.
    pub max_message_bytes: usize,
    /// Deadline given to forwarded calls that carry none.
    #[serde(with = "humantime_serde")]
    pub default_deadline: Duration,
    /// Upper bound of a client-given deadline on unary calls.
    #[serde(with = "humantime_serde")]
    pub max_deadline: Duration,
    /// How long to wait for an upstream connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Calls each client may make.
    pub rate_limit: RateLimitSettings,
    /// Proxies in front of the gateway (a load balancer, an ingress) whose `x-forwarded-for`
    /// names the client; from anyone else it is replaced by the connection's address. None by
    /// default: the gateway is the edge.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// The gateway's per-client rate limit: a token bucket per signed-in user, and per client
/// address for calls without a token, kept on the bus (Redis when configured) so that every
/// gateway replica draws from the same buckets. A call over the limit gets RESOURCE_EXHAUSTED
/// with `RetryInfo` and `retry-after`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    /// Whether calls are limited at all.
    pub enabled: bool,
    /// Calls per second a signed-in user may keep up.
    pub user_per_second: f64,
    /// Calls a signed-in user may make at once after a quiet spell.
    pub user_burst: u32,
    /// Calls per second one address may keep up without a token (sign-in, refresh).
    pub anonymous_per_second: f64,
    /// Calls one address may make at once without a token.
    pub anonymous_burst: u32,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            user_per_second: 1000.0,
            user_burst: 2000,
            anonymous_per_second: 50.0,
            anonymous_burst: 100,
        }
    }
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            cors_origins: vec!["http://localhost:3000".into(), "http://localhost:5173".into()],
            max_message_bytes: 4 * 1024 * 1024,
            default_deadline: Duration::from_secs(30),
            max_deadline: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            rate_limit: RateLimitSettings::default(),
            trusted_proxies: Vec::new(),
        }
    }
}

/// A list, or (from an environment variable) a comma-separated string.
fn string_or_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Either::deserialize(deserializer)? {
        Either::List(list) => list,
        Either::Text(text) => {
            text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
        }
    })
}

/// Feature flags. A disabled feature answers UNIMPLEMENTED with a message naming its flag.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeatureFlags {
    /// Self sign-up through `Register`.
    pub self_signup: bool,
    /// Live collaboration.
    pub collaboration: bool,
    /// The AI service and `ai.*` components.
    pub ai: bool,
}

impl Default for FeatureFlags {
    fn default() -> Self {
        Self { self_signup: false, collaboration: true, ai: true }
    }
}

/// Authentication.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// A PEM (PKCS#8) Ed25519 private key that signs access tokens.
    pub signing_key_file: Option<PathBuf>,
    /// PEM Ed25519 keys (public or private) whose tokens are still accepted: the previous
    /// signing keys during a rotation.
    pub verification_key_files: Vec<PathBuf>,
    /// Seed compatibility: without `signing_key_file`, the signing key is derived from this
    /// secret (so every replica derives the same key). Without either, a key is generated into
    /// `database.data_dir`.
    pub secret_key: Option<SecretString>,
    /// Lifetime of access tokens, in minutes.
    pub access_token_expire_minutes: u32,
    /// Lifetime of refresh tokens (and of a login session), in days.
    pub refresh_token_expire_days: u32,
    /// Minimum password length, in characters.
    pub password_min_length: usize,
    /// Password hashing cost.
    pub argon2: Argon2Settings,
    /// Lockout after repeated failed logins.
    pub lockout: LockoutSettings,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            signing_key_file: None,
            verification_key_files: Vec::new(),
            secret_key: None,
            access_token_expire_minutes: 15,
            refresh_token_expire_days: 30,
            password_min_length: 12,
            argon2: Argon2Settings::default(),
            lockout: LockoutSettings::default(),
        }
    }
}

/// Argon2id cost; the defaults are OWASP's recommended minimum (19 MiB, 2 passes, 1 lane).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Argon2Settings {
    /// Memory per hash, in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for Argon2Settings {
    fn default() -> Self {
        Self { memory_kib: 19_456, iterations: 2, parallelism: 1 }
    }
}

/// Lockout after repeated failed logins.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LockoutSettings {
    /// Failed logins of one account within `window` that lock it.
    pub max_failures: u32,
    /// Failed logins from one client address within `window` that lock the address. Higher
    /// than per account: many people can share one address (offices, NAT).
    pub max_failures_per_address: u32,
    /// The window failures are counted in.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long a lock lasts.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
}

impl Default for LockoutSettings {
    fn default() -> Self {
        Self {
            max_failures: 5,
            max_failures_per_address: 20,
            window: Duration::from_secs(15 * 60),
            duration: Duration::from_secs(15 * 60),
        }
    }
}

/// The component registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySettings {
    /// How often remote components' endpoints are health-checked.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// How long a remote component may take to answer a health check.
    #[serde(with = "humantime_serde")]
    pub health_check_timeout: Duration,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self { health_check_interval: Duration::from_secs(15), health_check_timeout: Duration::from_secs(3) }
    }
}

/// The executor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorSettings {
    /// Executions one replica runs at once; more wait in the queue.
    pub max_concurrent: usize,
    /// A replica renews its hold on each execution it runs; one that has not for this long is
    /// presumed dead, and another replica reruns the execution.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How long a stopping replica (SIGTERM) lets its running executions finish; the rest it
    /// hands back to the other replicas, which rerun them at once.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Deliveries of one job after which it is given up: its execution ends FAILED and the
    /// job is dead-lettered (a design that crashes its replica, a plan that cannot be read).
    pub max_deliveries: u64,
    /// The longest an execution may run (its default deadline, and the largest one allowed).
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
    /// Events kept per execution (older ones are trimmed).
    pub events_kept: u64,
    /// Messages recorded per execution when it records them (for RetryExecution).
    pub max_recorded_messages: usize,
    /// Threads that run process networks; 0 means one per core.
    pub threads: usize,
    /// An API key of a service account (role `service`) the executor signs in with to call
    /// the AI service on behalf of whoever started an execution, however long it runs. Without
    /// one, the starter's own access token is used, and an execution that outlives it (or is
    /// taken over by another replica) cannot call the AI service.
    pub ai_api_key: Option<SecretString>,
    /// What one jq expression may spend on one message before the node's error policy
    /// takes over.
    pub jq: JqSettings,
}

/// Bounds of one run of a jq expression (`transform.map`, `transform.filter`,
/// `transform.reduce`, `control.switch`, `metrics.counter`) on one message.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JqSettings {
    /// Wall-clock time (a node's `timeout_ms` shortens it, never lengthens it).
    #[serde(with = "humantime_serde")]
    pub max_time: Duration,
    /// Memory held at once, in bytes.
    pub max_memory_bytes: usize,
    /// Results.
    pub max_outputs: usize,
}

impl Default for JqSettings {
    fn default() -> Self {
        Self { max_time: Duration::from_secs(1), max_memory_bytes: 256 << 20, max_outputs: 100_000 }
    }
}

impl Default for ExecutorSettings {
    fn default() -> Self {
        Self {
            max_concurrent: 64,
            lease: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(20),
            max_deliveries: 5,
            max_duration: Duration::from_secs(3600),
            events_kept: 100_000,
            max_recorded_messages: 100_000,
            threads: 0,
            ai_api_key: None,
            jq: JqSettings::default(),
        }
    }
}

/// The collaboration service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollabSettings {
    /// A session without a heartbeat (or presence update) for this long is announced as
    /// timed out.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// How often clients are told to send a heartbeat.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A session's presence goes out at most once per tick; updates in between are coalesced
    /// (the latest wins).
    #[serde(with = "humantime_serde")]
    pub presence_tick: Duration,
    /// Events queued per client stream; a client further behind gets its presence coalesced,
    /// then a fresh snapshot instead of the events it missed.
    pub send_queue: usize,
    /// Events kept per design's session log; a client resuming from before them gets a fresh
    /// snapshot.
    pub events_kept: u64,
    /// Sessions per design.
    pub max_sessions_per_design: usize,
    /// Sessions of one user per design (tabs, devices).
    pub max_sessions_per_user: usize,
    /// Selected node and connection ids per presence.
    pub max_selected: usize,
    /// How long a design change that arrives before the one it follows waits for it before
    /// it is sent on with a gap (clients then read the design again).
    #[serde(with = "humantime_serde")]
    pub reorder_wait: Duration,
    /// A design with no client on this replica for this long stops being followed here.
    #[serde(with = "humantime_serde")]
    pub room_idle: Duration,
    /// A design's session log is dropped from Redis after this long without any event.
    #[serde(with = "humantime_serde")]
    pub log_ttl: Duration,
    /// How often each replica looks for sessions whose heartbeats stopped.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Default for CollabSettings {
    fn default() -> Self {
        Self {
            session_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            presence_tick: Duration::from_millis(40),
            send_queue: 512,
            events_kept: 10_000,
            max_sessions_per_design: 200,
            max_sessions_per_user: 20,
            max_selected: 1000,
            reorder_wait: Duration::from_secs(1),
            room_idle: Duration::from_secs(60),
            log_ttl: Duration::from_secs(24 * 3600),
            sweep_interval: Duration::from_secs(1),
        }
    }
}

/// The design service's limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DesignSettings {
    /// Nodes per design.
    pub max_nodes: usize,
    /// Connections per design.
    pub max_connections: usize,
    /// Size of one node's configuration (or a design's metadata), as JSON, in bytes.
    pub max_config_bytes: usize,
    /// Length of a design's name, in characters.
    pub max_name_chars: usize,
    /// Size of an imported document, in bytes. A request is also bound by
    /// `server.max_message_bytes` (and, through the gateway, `gateway.max_message_bytes`).
    pub max_import_bytes: usize,
    /// A full copy of the design is kept every this many revisions, so reading an old
    /// revision replays at most this many edits.
    pub snapshot_every: i64,
    /// Edits each user can undo per design (and undone edits they can redo).
    pub undo_depth: usize,
    /// The deadlock check (CheckDeadlock).
    pub deadlock: DeadlockSettings,
}

/// Bounds of the deadlock check's search.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadlockSettings {
    /// Distinct states explored at most (a request may ask for fewer).
    pub max_states: u64,
    /// Time the search may take.
    #[serde(with = "humantime_serde")]
    pub max_time: Duration,
    /// Messages each source is assumed to send (fewer when its configuration says so).
    pub source_messages: u16,
    /// Capacity of connections that declare none (the executor's default).
    pub default_capacity: u16,
    /// States ValidateDesign explores (it reports a deadlock only if found within them).
    pub validate_max_states: u64,
}

impl Default for DeadlockSettings {
    fn default() -> Self {
        Self {
            max_states: 1_000_000,
            max_time: Duration::from_secs(5),
            source_messages: 3,
            default_capacity: 16,
            validate_max_states: 20_000,
        }
    }
}

impl Default for DesignSettings {
    fn default() -> Self {
        Self {
            max_nodes: 1000,
            max_connections: 5000,
            max_config_bytes: 64 * 1024,
            max_name_chars: 200,
            max_import_bytes: 4 * 1024 * 1024,
            snapshot_every: 20,
            undo_depth: 100,
            deadlock: DeadlockSettings::default(),
        }
    }
}

/// One of the six services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    /// Users, tokens, roles.
    Auth,
    /// Designs and revisions.
    Design,
    /// Component types.
    Registry,
    /// The CSP runtime.
    Executor,
    /// Presence and live edits.
    Collab,
    /// AI providers.
    Ai,
}

impl Service {
    /// Every service, in start-up order (dependencies first).
    pub const ALL: [Service; 6] =
        [Service::Auth, Service::Registry, Service::Design, Service::Executor, Service::Collab, Service::Ai];

    /// Short name: the target name, the PostgreSQL schema and the SQLite file name.
    pub fn name(self) -> &'static str {
        match self {
            Service::Auth => "auth",
            Service::Design => "design",
            Service::Registry => "registry",
            Service::Executor => "executor",
            Service::Collab => "collab",
            Service::Ai => "ai",
        }
    }

    /// The fully-qualified gRPC service name it serves.
    pub fn grpc_name(self) -> &'static str {
        match self {
            Service::Auth => "csp.auth.v1.AuthService",
            Service::Design => "csp.design.v1.DesignService",
            Service::Registry => "csp.registry.v1.RegistryService",
            Service::Executor => "csp.executor.v1.ExecutorService",
            Service::Collab => "csp.collab.v1.CollaborationService",
            Service::Ai => "csp.ai.v1.AiService",
        }
    }

    /// The service serving a fully-qualified gRPC service name.
    pub fn from_grpc_name(name: &str) -> Option<Service> {
        Service::ALL.into_iter().find(|s| s.grpc_name() == name)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Service {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Service::ALL.into_iter().find(|svc| svc.name() == s).ok_or_else(|| format!("unknown service `{s}`"))
    }
}

impl Settings {
    /// Loads the layered configuration from the process environment and, when present,
    /// `config/<environment>.yml` (or `config_file`, which must then exist).
    pub fn load(config_file: Option<&Path>) -> Result<Settings, ConfigError> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        Self::load_from(config_file, Path::new("config"), &env)
    }

    /// [`Settings::load`] with an explicit config folder and environment, for tests.
    pub fn load_from(
        config_file: Option<&Path>,
        config_dir: &Path,
        env: &BTreeMap<String, String>,
    ) -> Result<Settings, ConfigError> {
        let environment = env
            .get("CSP_ENVIRONMENT")
            .or_else(|| env.get("ENVIRONMENT"))
            .cloned()
            .unwrap_or_else(|| "development".into());

        let mut figment = Figment::new();
        match config_file {
            Some(path) => {
                if !path.is_file() {
                    return Err(ConfigError::Load(format!("config file {} does not exist", path.display())));
                }
                figment = figment.merge(Yaml::file_exact(path));
            }
            None => {
                let path = config_dir.join(format!("{environment}.yml"));
                if path.is_file() {
                    figment = figment.merge(Yaml::file_exact(path));
                }
            }
        }

        figment = figment.merge(EnvLayer::seed(env)).merge(EnvLayer::prefixed(env));

        let settings: Settings =
            figment.extract_lossy().map_err(|e| ConfigError::Load(render_figment_error(e)))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the values serde cannot check: URL schemes, filter syntax, limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database.target()?;
        self.redis.resolved_url()?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::Invalid { key: "log.level", message: e.to_string() });
        }
        if self.server.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid {
                key: "server.max_message_bytes",
                message: "must be at least 1024".into(),
            });
        }
        if self.gateway.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid {
                key: "gateway.max_message_bytes",
                message: "must be at least 1024".into(),
            });
        }
        if self.alerts.interval_seconds == 0 || self.alerts.window_seconds < self.alerts.interval_seconds {
            return Err(ConfigError::Invalid {
                key: "alerts.window_seconds",
                message: "interval_seconds must be at least 1 and window_seconds at least interval_seconds"
                    .into(),
            });
        }
        if !(0.0..=1.0).contains(&self.alerts.error_rate) {
            return Err(ConfigError::Invalid {
                key: "alerts.error_rate",
                message: "must be between 0 and 1".into(),
            });
        }
        if self.server.concurrency_limit == 0 {
            return Err(ConfigError::Invalid {
                key: "server.concurrency_limit",
                message: "must be at least 1".into(),
            });
        }
        for origin in &self.gateway.cors_origins {
            if origin != "*" && http::HeaderValue::from_str(origin).is_err() {
                return Err(ConfigError::Invalid {
                    key: "gateway.cors_origins",
                    message: format!("`{origin}` is not a valid origin"),
                });
            }
        }
        for service in Service::ALL {
            let address = &self.services.get(service).address;
            if address.parse::<http::Uri>().map(|u| u.scheme().is_none()).unwrap_or(true) {
                return Err(ConfigError::Invalid {
                    key: service_address_key(service),
                    message: format!("`{address}` is not a URL like http://host:port"),
                });
            }
        }
        if self.auth.access_token_expire_minutes == 0 {
            return Err(ConfigError::Invalid {
                key: "auth.access_token_expire_minutes",
                message: "must be at least 1".into(),
            });
        }
        if self.auth.refresh_token_expire_days == 0 {
            return Err(ConfigError::Invalid {
                key: "auth.refresh_token_expire_days",
                message: "must be at least 1".into(),
            });
        }
        let argon2 = &self.auth.argon2;
        if argon2.iterations == 0 || argon2.parallelism == 0 || argon2.memory_kib < 8 * argon2.parallelism {
            return Err(ConfigError::Invalid {
                key: "auth.argon2",
                message: "memory_kib must be at least 8 × parallelism; iterations and parallelism at least 1"
                    .into(),
            });
        }
        if self.auth.lockout.max_failures == 0 || self.auth.lockout.max_failures_per_address == 0 {
            return Err(ConfigError::Invalid {
                key: "auth.lockout",
                message: "limits must be at least 1".into(),
            });
        }
        let design = &self.design;
        for (key, value) in [
            ("design.max_nodes", design.max_nodes),
            ("design.max_connections", design.max_connections),
            ("design.max_name_chars", design.max_name_chars),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid { key, message: "must be at least 1".into() });
            }
        }
        for (key, value) in [
            ("design.max_config_bytes", design.max_config_bytes),
            ("design.max_import_bytes", design.max_import_bytes),
        ] {
            if value < 1024 {
                return Err(ConfigError::Invalid { key, message: "must be at least 1024".into() });
            }
        }
        let executor = &self.executor;
        if executor.max_concurrent == 0 || executor.events_kept == 0 {
            return Err(ConfigError::Invalid {
                key: "executor",
                message: "max_concurrent and events_kept must be at least 1".into(),
            });
        }
        if executor.lease < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                key: "executor.lease",
                message: "must be at least 1s".into(),
            });
        }
        if executor.max_deliveries < 2 {
            return Err(ConfigError::Invalid {
                key: "executor.max_deliveries",
                message: "must be at least 2 (a job is delivered again when its replica dies)".into(),
            });
        }
        let collab = &self.collab;
        let invalid = |key, message: &str| Err(ConfigError::Invalid { key, message: message.into() });
        if collab.session_timeout < Duration::from_secs(1) {
            return invalid("collab.session_timeout", "must be at least 1s");
        }
        if collab.heartbeat_interval.is_zero() || collab.heartbeat_interval >= collab.session_timeout {
            return invalid("collab.heartbeat_interval", "must be above 0 and below collab.session_timeout");
        }
        if collab.presence_tick < Duration::from_millis(1) || collab.presence_tick > Duration::from_secs(1) {
            return invalid("collab.presence_tick", "must be 1ms to 1s");
        }
        if collab.send_queue < 16 {
            return invalid("collab.send_queue", "must be at least 16");
        }
        if collab.events_kept < 100 {
            return invalid("collab.events_kept", "must be at least 100");
        }
        if collab.max_sessions_per_design == 0
            || collab.max_sessions_per_user == 0
            || collab.max_selected == 0
        {
            return invalid(
                "collab",
                "max_sessions_per_design, max_sessions_per_user and max_selected must be at least 1",
            );
        }
        if collab.sweep_interval.is_zero() || collab.sweep_interval > collab.session_timeout {
            return invalid("collab.sweep_interval", "must be above 0 and at most collab.session_timeout");
        }
        self.ai.validate()?;
        if design.undo_depth < 1 {
            return Err(ConfigError::Invalid {
                key: "design.undo_depth",
                message: "must be at least 1".into(),
            });
        }
        if design.snapshot_every < 1 {
            return Err(ConfigError::Invalid {
                key: "design.snapshot_every",
                message: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

fn service_address_key(service: Service) -> &'static str {
    match service {
        Service::Auth => "services.auth.address",
        Service::Design => "services.design.address",
        Service::Registry => "services.registry.address",
        Service::Executor => "services.executor.address",
        Service::Collab => "services.collab.address",
        Service::Ai => "services.ai.address",
    }
}

/// Environment variables as a figment layer. Built from an explicit map (the process
/// environment in production, a literal map in tests) and reporting, in errors, the variable a
/// bad value came from.
struct EnvLayer {
    name: &'static str,
    data: figment::value::Dict,
    /// Dotted key -> the variable that set it.
    origins: BTreeMap<String, String>,
}

impl EnvLayer {
    /// The seed's unprefixed variables of [`SEED_ENV`].
    fn seed(env: &BTreeMap<String, String>) -> Self {
        Self::build("seed environment variable", env, |var| {
            SEED_ENV.iter().find(|(v, _)| *v == var).map(|(_, key)| (*key).to_owned())
        })
    }

    /// `CSP_SECTION__KEY` variables.
    fn prefixed(env: &BTreeMap<String, String>) -> Self {
        Self::build("environment variable", env, |var| {
            let key = var.strip_prefix("CSP_")?.to_ascii_lowercase();
            (!NON_CONFIG_CSP_VARS.contains(&key.as_str())).then(|| key.replace("__", "."))
        })
    }

    fn build(
        name: &'static str,
        env: &BTreeMap<String, String>,
        key_of: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let mut data = figment::value::Dict::new();
        let mut origins = BTreeMap::new();
        for (var, raw) in env {
            let Some(key) = key_of(var) else { continue };
            // Kept as text: `extract_lossy` turns it into a number or boolean only where the
            // setting is one, so a password of digits stays a string.
            insert_path(&mut data, &key, figment::value::Value::from(raw.clone()));
            origins.insert(key, var.clone());
        }
        Self { name, data, origins }
    }
}

impl figment::Provider for EnvLayer {
    fn metadata(&self) -> figment::Metadata {
        let origins = self.origins.clone();
        figment::Metadata::named(self.name).interpolater(move |_, keys| {
            let key = keys.join(".");
            origins.get(&key).cloned().unwrap_or(key)
        })
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.data.clone()))
    }
}

fn insert_path(dict: &mut figment::value::Dict, key: &str, value: figment::value::Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| figment::value::Value::from(figment::value::Dict::new()));
            if !matches!(entry, figment::value::Value::Dict(..)) {
                *entry = figment::value::Value::from(figment::value::Dict::new());
            }
            if let figment::value::Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

/// Renders every figment error on its own clause, each with the key path and the source.
fn render_figment_error(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let profile = e.profile.clone().unwrap_or_default();
            let source = e
                .metadata
                .as_ref()
                .map(|m| match &m.source {
                    Some(source) => format!(" (from {source})"),
                    None => format!(" (from {} {})", m.name, m.interpolate(&profile, &e.path)),
                })
                .unwrap_or_default();
            let kind = e.kind.to_string();
            if key.is_empty() { format!("{kind}{source}") } else { format!("{key}: {kind}{source}") }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn load(dir: &Path, pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from(None, dir, &env(pairs))
    }

    #[test]
    fn defaults_are_the_embedded_default() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(dir.path(), &[]).unwrap();
        assert!(
            matches!(s.database.target().unwrap(), DatabaseTarget::Sqlite(p) if p == Path::new("./data"))
        );
        assert!(s.redis.resolved_url().unwrap().is_none());
        assert_eq!(s.gateway.listen.port(), 8080);
        assert_eq!(s.auth.access_token_expire_minutes, 15);
    }

    #[test]
    fn yaml_then_seed_env_then_prefixed_env() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("development.yml"),
            "log:\n  level: debug\nauth:\n  access_token_expire_minutes: 60\ngateway:\n  listen: 127.0.0.1:9000\n",
        )
        .unwrap();
        let s = load(
            dir.path(),
            &[("JWT_ACCESS_TOKEN_EXPIRE_MINUTES", "30"), ("CSP_GATEWAY__LISTEN", "127.0.0.1:9100")],
        )
        .unwrap();
        assert_eq!(s.log.level, "debug", "yaml beats defaults");
        assert_eq!(s.auth.access_token_expire_minutes, 30, "seed env beats yaml");
        assert_eq!(s.gateway.listen.port(), 9100, "CSP_ env beats yaml");
    }

    #[test]
    fn one_key_of_a_service_endpoint_keeps_the_other_default() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(dir.path(), &[("CSP_SERVICES__EXECUTOR__LISTEN", "127.0.0.1:0")]).unwrap();
        assert_eq!(s.services.executor.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(s.services.executor.address, "http://127.0.0.1:50054");
        assert_eq!(s.services.design.address, "http://127.0.0.1:50052");
        let wrong = load(dir.path(), &[("CSP_SERVICES__EXECUTOR__LISTN", "127.0.0.1:0")]).unwrap_err();
        assert!(wrong.to_string().contains("listn"), "{wrong}");
    }

    #[test]
    fn lists_come_from_comma_separated_variables() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(dir.path(), &[("CSP_GATEWAY__CORS_ORIGINS", "https://a.example, https://b.example")])
            .unwrap();
        assert_eq!(s.gateway.cors_origins, ["https://a.example", "https://b.example"]);
    }

    #[test]
    fn environment_selects_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("production.yml"), "log:\n  format: json\n").unwrap();
        let s = load(dir.path(), &[("ENVIRONMENT", "production")]).unwrap();
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.environment, "production");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("development.yml"), "database:\n  hots: db\n").unwrap();
        let err = load(dir.path(), &[]).unwrap_err().to_string();
        assert!(err.contains("database"), "{err}");
        assert!(err.contains("hots"), "{err}");
        let err = load(tempfile::tempdir().unwrap().path(), &[("CSP_GATEWAY__LISTN", "x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("listn"), "{err}");
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path(), &[("CSP_GATEWAY__LISTEN", "not-an-address")]).unwrap_err().to_string();
        assert!(err.contains("gateway.listen"), "{err}");
        let err = load(dir.path(), &[("DATABASE_URL", "mysql://x")]).unwrap_err().to_string();
        assert!(err.contains("database.url"), "{err}");
        let err = load(dir.path(), &[("DB_PORT", "seventy")]).unwrap_err().to_string();
        assert!(err.contains("database.port"), "{err}");
        let err = load(dir.path(), &[("LOG_LEVEL", "info,=[")]).unwrap_err().to_string();
        assert!(err.contains("log.level"), "{err}");
    }

    #[test]
    fn malformed_yaml_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("development.yml"), "log: [unclosed\n").unwrap();
        let err = load(dir.path(), &[]).unwrap_err().to_string();
        assert!(err.contains("development.yml"), "{err}");
    }

    #[test]
    fn seed_database_parts_build_a_postgres_url() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(
            dir.path(),
            &[
                ("DB_HOST", "db.internal"),
                ("DB_USER", "app"),
                ("DB_PASSWORD", "12345"),
                ("DB_NAME", "designs"),
            ],
        )
        .unwrap();
        match s.database.target().unwrap() {
            DatabaseTarget::Postgres(url) => {
                assert_eq!(url.expose_secret(), "postgres://app:12345@db.internal:5432/designs")
            }
            other => panic!("expected postgres, got {other:?}"),
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(
            dir.path(),
            &[("DATABASE_URL", "postgres://u:hunter2hunter2@h/db"), ("OPENAI_API_KEY", "sk-live-abcdef")],
        )
        .unwrap();
        let printed = format!("{s:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("sk-live"), "{printed}");
    }

    #[test]
    fn the_documented_example_is_valid_and_matches_the_defaults() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/example.yml");
        let s = Settings::load_from(Some(&example), Path::new("."), &BTreeMap::new()).unwrap();
        let d = Settings::default();
        assert_eq!(format!("{s:?}"), format!("{d:?}"), "config/example.yml documents the defaults");
    }

    #[test]
    fn test_and_cli_variables_are_not_config_keys() {
        let dir = tempfile::tempdir().unwrap();
        load(
            dir.path(),
            &[
                ("CSP_TEST_DATABASE_URL", "postgres://x"),
                ("CSP_ADMIN_PASSWORD", "p"),
                ("CSP_CONFIG", "x.yml"),
            ],
        )
        .unwrap();
    }
}

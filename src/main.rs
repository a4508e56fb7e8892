//! `csp`: one binary for every part of CSP Designer.
//!
//! - `csp serve --target all` runs the six services and the gateway in one process (each on
//!   its own loopback port, talking gRPC to each other as in a cluster);
//!   `csp serve --target <name>` runs one of them.
//! - `csp migrate [--target <name>]` applies database migrations.
//!
//! Settings: see the README (defaults < `config/<environment>.yml` < environment variables).
//! Errors are one line on stderr and a non-zero exit code.

#![allow(clippy::print_stdout)]

use std::{future::Future, path::PathBuf, pin::Pin, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use csp_bus::SharedBus;
use csp_platform::{Service, Settings, server::bind};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "csp", version, about = "CSP Designer: design, run and share process networks")]
struct Cli {
    /// A YAML settings file (default: config/<environment>.yml when present).
    #[arg(long, global = true, env = "CSP_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run services: all of them with the gateway, or one.
    Serve {
        /// all, gateway, auth, design, registry, executor, collab or ai.
        #[arg(long, default_value = "all", value_parser = parse_target)]
        target: Target,
    },
    /// Administration that needs no running server.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Ask a running server for its health (`grpc.health.v1`); exit 0 when it is SERVING, 1
    /// otherwise. For container health checks: it needs no configuration.
    Health {
        /// The server's address (host:port).
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: String,
        /// The service to ask about (e.g. csp.executor.v1.ExecutorService); empty: the server.
        #[arg(long, default_value = "")]
        service: String,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout_seconds: u64,
    },
    /// Apply pending database migrations.
    Migrate {
        /// all, or one service: auth, design, registry, executor, collab or ai.
        #[arg(long, default_value = "all", value_parser = parse_target)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a user directly in the database (the way to make the first admin). The password
    /// is read from CSP_ADMIN_PASSWORD, or from standard input (hidden when it is a terminal).
    CreateUser {
        /// Login name.
        #[arg(long)]
        username: String,
        /// Email address.
        #[arg(long)]
        email: String,
        /// Role to grant (repeat for several): admin, designer, viewer, service, registrar.
        #[arg(long = "role", required = true, value_parser = parse_role)]
        roles: Vec<csp_platform::auth::Role>,
    },
}

fn parse_role(value: &str) -> Result<csp_platform::auth::Role, String> {
    value.parse()
}

/// What `serve` and `migrate` act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    All,
    Gateway,
    Service(Service),
}

fn parse_target(value: &str) -> Result<Target, String> {
    match value {
        "all" => Ok(Target::All),
        "gateway" => Ok(Target::Gateway),
        other => other.parse().map(Target::Service).map_err(|_| {
            format!("unknown target `{other}` (expected all, gateway, auth, design, registry, executor, collab or ai)")
        }),
    }
}

/// See the workspace's Cargo.toml: messages cross worker threads. Counted per thread, so jq runs
/// are bounded by the memory they hold.
#[global_allocator]
static ALLOCATOR: csp_alloc::Counting<mimalloc::MiMalloc> = csp_alloc::Counting(mimalloc::MiMalloc);

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            // One line: clap's first line already says what is wrong.
            let text = e.to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: invalid arguments"));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Health { addr, service, timeout_seconds } = &cli.command {
        return health(addr, service, Duration::from_secs(*timeout_seconds)).await;
    }
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve { target } => {
            let name = match target {
                Target::All => "csp".to_owned(),
                Target::Gateway => "csp-gateway".to_owned(),
                Target::Service(service) => format!("csp-{service}"),
            };
            let _telemetry = csp_platform::telemetry::init(&settings, &name).map_err(anyhow::Error::msg)?;
            serve(settings, target).await
        }
        Command::Admin { command: AdminCommand::CreateUser { username, email, roles } } => {
            let _telemetry =
                csp_platform::telemetry::init(&settings, "csp-admin").map_err(anyhow::Error::msg)?;
            let password = admin_password()?;
            let id = csp_auth::create_user(&settings, &username, &email, &password, roles.clone()).await?;
            let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            println!("created user {username} ({id}) with roles {}", roles.join(", "));
            Ok(())
        }
        Command::Health { .. } => Ok(()),
        Command::Migrate { target } => {
            let _telemetry =
                csp_platform::telemetry::init(&settings, "csp-migrate").map_err(anyhow::Error::msg)?;
            let services = match target {
                Target::All => Service::ALL.to_vec(),
                Target::Service(service) => vec![service],
                Target::Gateway => anyhow::bail!("the gateway has no database"),
            };
            for service in services {
                migrate(&settings, service).await?;
                println!("migrated {service}");
            }
            Ok(())
        }
    }
}

/// `csp health`: one `grpc.health.v1.Health/Check`.
async fn health(addr: &str, service: &str, timeout: Duration) -> anyhow::Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
        let request = HealthCheckRequest { service: service.to_owned() };
        anyhow::Ok(HealthClient::new(channel).check(request).await?.into_inner().status)
    };
    let status = tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| anyhow::anyhow!("{addr} did not answer within {}s", timeout.as_secs()))?
        .with_context(|| format!("{addr} is not healthy"))?;
    if status == ServingStatus::Serving as i32 {
        println!("SERVING");
        return Ok(());
    }
    let name = ServingStatus::try_from(status).map_or("UNKNOWN", |s| s.as_str_name());
    anyhow::bail!("{addr} is {name}")
}

/// The new user's password: CSP_ADMIN_PASSWORD, else one line of standard input.
fn admin_password() -> anyhow::Result<String> {
    if let Ok(password) = std::env::var("CSP_ADMIN_PASSWORD") {
        return Ok(password);
    }
    use std::io::IsTerminal as _;
    if std::io::stdin().is_terminal() {
        return rpassword::prompt_password("password: ").context("reading the password");
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading the password from standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

async fn migrate(settings: &Settings, service: Service) -> anyhow::Result<()> {
    match service {
        Service::Auth => csp_auth::migrate(settings).await?,
        Service::Design => csp_design::migrate(settings).await?,
        Service::Registry => csp_registry::migrate(settings).await?,
        Service::Executor => csp_executor::migrate(settings).await?,
        Service::Collab => csp_collab::migrate(settings).await?,
        Service::Ai => csp_ai::migrate(settings).await?,
    }
    Ok(())
}

type Running = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// Builds one service on `listener` and returns the future that runs it until `stop`.
async fn start_service(
    settings: &Settings,
    service: Service,
    bus: SharedBus,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<Running> {
    macro_rules! start {
        ($krate:ident) => {{
            let app = $krate::Application::with_listener(settings, bus, listener).await?;
            Box::pin(async move {
                app.run_until_stopped(stop.cancelled_owned()).await?;
                Ok(())
            }) as Running
        }};
    }
    Ok(match service {
        Service::Auth => start!(csp_auth),
        Service::Design => start!(csp_design),
        Service::Registry => start!(csp_registry),
        Service::Executor => start!(csp_executor),
        Service::Collab => start!(csp_collab),
        Service::Ai => start!(csp_ai),
    })
}

async fn serve(mut settings: Settings, target: Target) -> anyhow::Result<()> {
    // Before any service is built: services describe their metrics as they start.
    if settings.metrics.enabled {
        csp_platform::metrics::install();
    }
    let gateway_stop = CancellationToken::new();
    let services_stop = CancellationToken::new();
    let mut gateway_task: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    let mut services = JoinSet::new();

    match target {
        Target::Gateway => {
            let bus = csp_bus::connect(&settings).await?;
            let gateway = csp_gateway::Application::build(&settings, bus).await?;
            announce(&settings, gateway.local_addr(), false);
            let stop = gateway_stop.clone();
            gateway_task =
                Some(tokio::spawn(
                    async move { Ok(gateway.run_until_stopped(stop.cancelled_owned()).await?) },
                ));
        }
        Target::Service(service) => {
            if settings.redis.resolved_url()?.is_none() {
                tracing::warn!(
                    %service,
                    "no redis.url: events stay inside this process; other replicas and services will not see them"
                );
            }
            let bus = csp_bus::connect(&settings).await?;
            let listener = bind(service.name(), settings.services.get(service).listen).await?;
            let addr = listener.local_addr()?;
            let running = start_service(&settings, service, bus, listener, services_stop.clone()).await?;
            services.spawn(running);
            println!("{service} listening on {addr}");
        }
        Target::All => {
            // The gateway's port first: if it is taken, fail before starting anything else.
            let gateway_listener = bind("gateway", settings.gateway.listen).await?;
            let bus = csp_bus::connect(&settings).await?;
            let mut listeners = Vec::new();
            for service in Service::ALL {
                let listener = bind(service.name(), ([127, 0, 0, 1], 0).into()).await?;
                let addr = listener.local_addr().context("reading a bound address")?;
                settings.services.get_mut(service).address = format!("http://{addr}");
                listeners.push((service, listener));
            }
            for (service, listener) in listeners {
                let running = start_service(&settings, service, bus.clone(), listener, services_stop.clone())
                    .await
                    .with_context(|| format!("starting {service}"))?;
                services.spawn(running);
            }
            let gateway = csp_gateway::Application::with_listener(&settings, bus, gateway_listener)?;
            announce(&settings, gateway.local_addr(), true);
            if let Ok(false) = csp_auth::has_users(&settings).await {
                println!(
                    "no users yet: create the first admin (it asks for a password; or set CSP_ADMIN_PASSWORD):"
                );
                println!(
                    "     csp admin create-user --username admin --email admin@example.com --role admin"
                );
                println!("     (from a checkout: cargo run --bin csp -- admin create-user ...)");
            }
            let stop = gateway_stop.clone();
            gateway_task =
                Some(tokio::spawn(
                    async move { Ok(gateway.run_until_stopped(stop.cancelled_owned()).await?) },
                ));
        }
    }

    // Run until a signal, or until a part stops on its own (which is an error).
    let mut failure: Option<anyhow::Error> = None;
    tokio::select! {
        () = shutdown_signal() => tracing::info!("shutdown requested"),
        Some(joined) = services.join_next() => {
            failure = Some(flatten(joined).err().unwrap_or_else(|| anyhow::anyhow!("a service stopped unexpectedly")));
        }
        joined = async { match gateway_task.as_mut() { Some(task) => task.await, None => std::future::pending().await } } => {
            gateway_task = None;
            failure = Some(flatten(joined).err().unwrap_or_else(|| anyhow::anyhow!("the gateway stopped unexpectedly")));
        }
    }

    // The gateway drains first, so calls it forwards can still finish; then the services.
    gateway_stop.cancel();
    if let Some(task) = gateway_task
        && let Err(e) = flatten(task.await)
    {
        failure.get_or_insert(e);
    }
    services_stop.cancel();
    while let Some(joined) = services.join_next().await {
        if let Err(e) = flatten(joined) {
            failure.get_or_insert(e);
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn flatten(joined: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match joined {
        Ok(result) => result,
        Err(e) => Err(anyhow::anyhow!("a task failed: {e}")),
    }
}

fn announce(settings: &Settings, addr: std::net::SocketAddr, all: bool) {
    let shown =
        if addr.ip().is_unspecified() { format!("localhost:{}", addr.port()) } else { addr.to_string() };
    println!("gateway listening on http://{shown} (gRPC and grpc-web)");
    if all {
        let storage = match settings.database.target() {
            Ok(csp_platform::config::DatabaseTarget::Sqlite(dir)) => {
                format!("SQLite files in {}", dir.display())
            }
            Ok(csp_platform::config::DatabaseTarget::Postgres(_)) => "PostgreSQL".to_owned(),
            Err(_) => "an unknown database".to_owned(),
        };
        let bus = if settings.redis.resolved_url().ok().flatten().is_some() {
            "Redis"
        } else {
            "the in-process bus"
        };
        println!("all services running on {storage} with {bus}");
        println!("try: grpcurl -plaintext {shown} list");
        println!("     curl http://{shown}/health");
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

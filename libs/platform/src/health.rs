//! Health: dependency probes, the `grpc.health.v1` status they drive, and the JSON report of
//! `GET /health`.
//!
//! A [`Dependencies`] set holds named [`Probe`]s (the database, the event bus). The server
//! probes them periodically; while any is down every service of that server reports
//! NOT_SERVING, and `csp_dependency_up{server,dependency}` says which.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use serde::Serialize;
use tonic_health::{ServingStatus, server::HealthReporter};

/// Something a server needs, checked periodically.
#[async_trait]
pub trait Probe: Send + Sync + 'static {
    /// Short name: `database`, `bus`, ...
    fn name(&self) -> &'static str;

    /// Checks the dependency; `Ok` carries a short description (e.g. `postgres`), `Err` why
    /// it is down. Must not print secrets.
    async fn probe(&self) -> Result<String, String>;
}

/// The last result of one probe.
#[derive(Debug, Clone, Serialize)]
pub struct DependencyState {
    /// Whether the last probe succeeded.
    pub up: bool,
    /// What it is (when up) or why it is down.
    pub detail: String,
    /// How long the last probe took, in milliseconds.
    pub latency_ms: f64,
}

/// The probes of one server and their last results.
#[derive(Clone, Default)]
pub struct Dependencies {
    probes: Vec<Arc<dyn Probe>>,
    state: Arc<RwLock<BTreeMap<&'static str, DependencyState>>>,
}

impl std::fmt::Debug for Dependencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dependencies").field("state", &self.snapshot()).finish()
    }
}

/// The `grpc.health.v1` service name that is SERVING as long as the server runs, whatever its
/// dependencies (and while it drains): for liveness probes, which should restart a stuck
/// process, not every replica when the database is away.
pub const LIVENESS: &str = "liveness";

/// Upper bound of one probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

impl Dependencies {
    /// No dependencies.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a probe.
    pub fn with(mut self, probe: Arc<dyn Probe>) -> Self {
        self.probes.push(probe);
        self
    }

    /// Runs every probe concurrently, records the results, and returns whether all are up.
    pub async fn check_all(&self, server: &'static str) -> bool {
        let results = futures::future::join_all(self.probes.iter().map(|probe| async move {
            let started = Instant::now();
            let result = match tokio::time::timeout(PROBE_TIMEOUT, probe.probe()).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
            };
            (probe.name(), result, started.elapsed())
        }))
        .await;

        let mut all_up = true;
        let mut state = match self.state.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (name, result, elapsed) in results {
            let up = result.is_ok();
            all_up &= up;
            let previous = state.get(name).map(|s| s.up);
            if previous != Some(up) {
                match &result {
                    Ok(detail) => {
                        tracing::info!(server, dependency = name, detail = %detail, "dependency up")
                    }
                    Err(reason) => {
                        tracing::warn!(server, dependency = name, reason = %reason, "dependency down")
                    }
                }
            }
            metrics::gauge!("csp_dependency_up", "server" => server, "dependency" => name).set(if up {
                1.0
            } else {
                0.0
            });
            state.insert(
                name,
                DependencyState {
                    up,
                    detail: match result {
                        Ok(d) | Err(d) => d,
                    },
                    latency_ms: (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0,
                },
            );
        }
        all_up
    }

    /// The last results, by dependency name.
    pub fn snapshot(&self) -> BTreeMap<&'static str, DependencyState> {
        match self.state.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// What `GET /health` answers.
#[async_trait]
pub trait HealthReport: Send + Sync + 'static {
    /// Whether the server is healthy (HTTP 200, else 503) and the JSON body.
    async fn report(&self) -> (bool, serde_json::Value);
}

/// The health of one server: the statuses of the gRPC services it answers for, its
/// dependencies, and whether it is draining. Drives `grpc.health.v1` and answers
/// `GET /health`. Clones share state.
#[derive(Clone)]
pub struct ServerHealth {
    server: &'static str,
    reporter: HealthReporter,
    inner: Arc<HealthInner>,
}

#[derive(Default)]
struct HealthInner {
    /// Services whose status follows the dependencies.
    services: Mutex<BTreeSet<String>>,
    /// Services whose status is set by the owner (the gateway mirrors its upstreams).
    mirrored: Mutex<BTreeMap<String, ServingStatus>>,
    dependencies: Mutex<Dependencies>,
    /// The last status published per name: Watch streams hear only changes.
    published: Mutex<BTreeMap<String, ServingStatus>>,
    draining: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl ServerHealth {
    /// Health of `server`, reported through `reporter`.
    pub fn new(server: &'static str, reporter: HealthReporter) -> Self {
        Self { server, reporter, inner: Arc::new(HealthInner::default()) }
    }

    /// The reporter behind `grpc.health.v1` of this server.
    pub fn reporter(&self) -> &HealthReporter {
        &self.reporter
    }

    /// Reports `service` SERVING while the dependencies are up.
    pub fn track(&self, service: &str) {
        lock(&self.inner.services).insert(service.to_owned());
    }

    /// Replaces the probes.
    pub fn set_dependencies(&self, dependencies: Dependencies) {
        *lock(&self.inner.dependencies) = dependencies;
    }

    /// Sets the status of a service this server answers for but does not serve itself (the
    /// gateway mirrors its upstreams). While draining, everything is NOT_SERVING.
    pub async fn set_mirrored(&self, service: &str, status: ServingStatus) {
        lock(&self.inner.mirrored).insert(service.to_owned(), status);
        let status = if self.is_draining() { ServingStatus::NotServing } else { status };
        self.publish(service, status).await;
    }

    /// Publishes a status if it differs from the last one published for that name, so Watch
    /// streams hear only changes.
    async fn publish(&self, service: &str, status: ServingStatus) {
        let changed = lock(&self.inner.published).insert(service.to_owned(), status) != Some(status);
        if changed {
            self.reporter.set_service_status(service, status).await;
        }
    }

    /// Whether the server is shutting down.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// The last probe results, by dependency name.
    pub fn dependency_states(&self) -> BTreeMap<&'static str, DependencyState> {
        lock(&self.inner.dependencies).snapshot()
    }

    /// Probes the dependencies and sets the tracked services SERVING or NOT_SERVING.
    pub async fn refresh(&self) -> bool {
        self.publish(LIVENESS, ServingStatus::Serving).await;
        let dependencies = lock(&self.inner.dependencies).clone();
        let up = dependencies.check_all(self.server).await;
        let status =
            if up && !self.is_draining() { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.publish("", status).await;
        let services: Vec<String> = lock(&self.inner.services).iter().cloned().collect();
        for service in services {
            self.publish(&service, status).await;
        }
        up
    }

    /// Marks the server as shutting down: every service NOT_SERVING from now on.
    pub async fn begin_drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        let mut names: Vec<String> = lock(&self.inner.services).iter().cloned().collect();
        names.extend(lock(&self.inner.mirrored).keys().cloned());
        self.publish("", ServingStatus::NotServing).await;
        for service in names {
            self.publish(&service, ServingStatus::NotServing).await;
        }
    }

    /// Probes periodically until draining; run it as a task.
    pub async fn monitor(self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if self.is_draining() {
                return;
            }
            self.refresh().await;
        }
    }
}

#[async_trait]
impl HealthReport for ServerHealth {
    async fn report(&self) -> (bool, serde_json::Value) {
        let dependencies = self.dependency_states();
        let draining = self.is_draining();
        let healthy = !draining && dependencies.values().all(|d| d.up);
        let status = if healthy { "SERVING" } else { "NOT_SERVING" };
        let body = serde_json::json!({
            "server": self.server,
            "status": status,
            "draining": draining,
            "services": lock(&self.inner.services).iter().map(|s| (s.clone(), status)).collect::<BTreeMap<_, _>>(),
            "dependencies": dependencies,
        });
        (healthy, body)
    }
}

//! Executions: queued by StartExecution, taken by one replica, watched from any.
//!
//! - [`start`]: StartExecution and RetryExecution read the design (with the caller's
//!   credentials), turn it into a plan, check it builds, store the execution QUEUED and append
//!   a job to the bus stream `executor:jobs`.
//! - [`worker`]: every replica reads jobs in the consumer group `executors`, at most
//!   `executor.max_concurrent` at once, claims those of replicas that stopped renewing them
//!   ([`leases`]), and gives up a job delivered `executor.max_deliveries` times (dead letter).
//!   On SIGTERM it drains: takes no more jobs, lets running executions finish within
//!   `executor.drain_timeout`, and hands the rest back for another replica to claim at once.
//! - [`recording`]: a running execution's events go to `execution:<id>` ([`events`]), its
//!   state to the database; every write names the attempt making it, so a replica whose
//!   execution was taken over writes nothing more, and publishes nothing more (its appends are
//!   conditioned on holding the job). The final status is published, counted and the job
//!   acknowledged only when the final write took effect.
//! - [`control`]: cancel (stored with the execution, so whichever replica runs or claims it
//!   honours it), resume and step reach the replica running it through `executor:control`.
//! - [`watch`]: WatchExecution reads `execution:<id>`, resuming after the last event id a
//!   client saw; [`reads`]: GetExecution, ListExecutions, ListDeadLetters.

mod alerts;
mod control;
mod events;
mod leases;
mod model;
mod reads;
mod recording;
mod start;
#[cfg(test)]
mod tests;
mod watch;
mod worker;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, SubsecRound as _, Utc};
use csp_bus::{EventId, Holder, SharedBus};
use csp_platform::Settings;
use sea_orm::DatabaseConnection;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use events::{design_stream, stream};
pub(crate) use model::{
    DeadLetter, Execution, ListRequest, Messages, Page, RetryRequest, StartRequest, Watched,
};

use crate::{
    clients::{Access, Credentials, Designs, Registry, ServiceLogin},
    entity::execution,
    error::Error,
    repo,
    runtime::{Debugger, Plan, Shards},
    writer::Writer,
};

/// The job queue.
pub(crate) const JOBS: &str = "executor:jobs";
/// The consumer group of the executor replicas.
pub(crate) const GROUP: &str = "executors";
/// Cancel, resume and step requests, for the replica running the execution; hints that jobs
/// were handed back.
pub(crate) const CONTROL: &str = "executor:control";

/// Why an execution running here was stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Cancelled by a user: it ends CANCELLED with this reason.
    Cancelled(String),
    /// Another replica took it over (this one's lease ran out, or its write was fenced): it
    /// ends here without a word.
    Lost,
    /// This replica is stopping: the job goes back to the queue for another replica.
    HandedBack,
}

/// An execution this replica has taken (from delivery to acknowledgement).
pub(crate) struct Run {
    pub(crate) id: String,
    /// Its job, held by this replica.
    pub(crate) holder: Holder,
    /// Stops its process network.
    pub(crate) network: CancellationToken,
    /// Set once its network is built.
    pub(crate) debugger: OnceLock<Arc<Debugger>>,
    stop: Mutex<Option<Stop>>,
    /// Set as its job is acknowledged: a renewal that no longer finds the job is no loss.
    done: AtomicBool,
    /// Whom its events are about, once its row is read.
    pub(crate) subject: Mutex<Option<events::Subject>>,
}

impl Run {
    fn new(id: String, holder: Holder) -> Arc<Self> {
        Arc::new(Self {
            id,
            holder,
            network: CancellationToken::new(),
            debugger: OnceLock::new(),
            stop: Mutex::new(None),
            done: AtomicBool::new(false),
            subject: Mutex::new(None),
        })
    }

    pub(crate) fn mark_done(&self) {
        self.done.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Relaxed)
    }

    pub(crate) fn job(&self) -> EventId {
        self.holder.id
    }

    /// Stops it for `why` (a loss overrides any other reason; otherwise the first stands).
    pub(crate) fn stop(&self, why: Stop) {
        {
            let mut stop = lock(&self.stop);
            match (&*stop, &why) {
                (None, _) | (Some(_), Stop::Lost) => *stop = Some(why),
                _ => {}
            }
        }
        self.network.cancel();
    }

    pub(crate) fn stopped(&self) -> Option<Stop> {
        lock(&self.stop).clone()
    }

    /// Whether it must publish and write nothing more (lost, or handed back).
    pub(crate) fn silenced(&self) -> bool {
        matches!(self.stopped(), Some(Stop::Lost | Stop::HandedBack))
    }
}

/// A design id and revision.
type DesignRevision = (String, i64);

/// A plan and since when it is kept.
type KeptPlan = (Arc<Plan>, Verdict);

/// What ValidateDesign said of a plan's design revision: the errors, if any.
pub(crate) type Verdict = Arc<Vec<String>>;

/// An execution stored by this replica and not taken yet: its row and plan.
type Queued = (execution::Model, Arc<Plan>, Instant);

/// The executor's state.
pub(crate) struct Executor {
    db: DatabaseConnection,
    bus: SharedBus,
    settings: Settings,
    designs: Designs,
    registry: Registry,
    /// The executor's own sign-in for AI calls, when configured.
    login: Option<Arc<ServiceLogin>>,
    shards: Arc<Shards>,
    /// This replica's name in the consumer group.
    me: String,
    /// Executions taken here, by id.
    running: Mutex<HashMap<String, Arc<Run>>>,
    /// Credentials of whoever started executions queued here, for their AI calls (kept in
    /// memory only, never stored).
    credentials: Mutex<HashMap<String, (Credentials, Instant)>>,
    /// Executions stored here and not yet taken: the replica that takes one here need not
    /// read it back.
    queued_here: Mutex<HashMap<String, Queued>>,
    /// Plans by design and revision, recently built (see `plan_for`).
    plans: moka::sync::Cache<DesignRevision, KeptPlan>,
    /// The design of each execution started here lately (it never changes), so that a watch
    /// of one — the usual next call after starting it — needs no database read.
    design_of: moka::sync::Cache<String, String>,
    writer: Writer,
    slots: Arc<Semaphore>,
    /// Cancelled when the replica stops taking jobs (drain).
    taking: CancellationToken,
    /// Cancelled when the replica's background tasks stop.
    workers: CancellationToken,
    /// The tasks running jobs.
    runs: TaskTracker,
    /// Set when another replica handed jobs back: claim them without waiting.
    claim_soon: AtomicBool,
    /// Jobs this replica took over from another (for the takeover alert).
    takeovers: std::sync::atomic::AtomicU64,
    /// Held while jobs are renewed or handed back, so that a renewal never holds a job again
    /// after it was handed back.
    renewing: tokio::sync::Mutex<()>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("no execution `{id}`"))
}

fn check_id(id: &str, field: &str, what: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::field(field, "is required"));
    }
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(Error::field(field, format!("is not {what} id (a UUID)")));
    }
    Ok(())
}

impl Executor {
    pub(crate) fn new(
        db: DatabaseConnection,
        bus: SharedBus,
        settings: &Settings,
    ) -> Result<Arc<Self>, crate::Error> {
        let threads = match settings.executor.threads {
            0 => std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            n => n,
        };
        let shards = Shards::start(threads).map_err(|e| crate::Error::Runtime(e.to_string()))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "executor".into());
        Ok(Arc::new(Self {
            writer: Writer::start(db.clone()),
            queued_here: Mutex::new(HashMap::new()),
            plans: start::plan_cache(),
            design_of: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            db,
            bus,
            designs: Designs::new(settings)?,
            registry: Registry::new(settings)?,
            login: ServiceLogin::new(settings)?.map(Arc::new),
            shards,
            me: format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            running: Mutex::new(HashMap::new()),
            credentials: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(settings.executor.max_concurrent)),
            settings: settings.clone(),
            taking: CancellationToken::new(),
            workers: CancellationToken::new(),
            runs: TaskTracker::new(),
            claim_soon: AtomicBool::new(false),
            takeovers: std::sync::atomic::AtomicU64::new(0),
            renewing: tokio::sync::Mutex::new(()),
        }))
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    fn events_kept(&self) -> u64 {
        self.settings.executor.events_kept
    }

    /// The execution if the caller may see it (viewer of its design); NOT_FOUND otherwise.
    async fn visible(
        &self,
        credentials: &Credentials,
        id: &str,
        need: Access,
    ) -> Result<execution::Model, Error> {
        check_id(id, "execution_id", "an execution")?;
        let row = repo::get(&self.db, id).await?.ok_or_else(|| not_found(id))?;
        self.allowed(credentials, id, &row.design_id, need).await?;
        Ok(row)
    }

    /// Whether the caller may see (or, with `need` editor, control) an execution of a design.
    async fn allowed(
        &self,
        credentials: &Credentials,
        id: &str,
        design_id: &str,
        need: Access,
    ) -> Result<(), Error> {
        match self.designs.access(credentials, design_id).await {
            Ok(access) if access >= need => Ok(()),
            Ok(_) => Err(Error::Forbidden(
                "you can view this design's executions but not run or control them".into(),
            )),
            Err(Error::NotFound(_)) => Err(not_found(id)),
            Err(e) => Err(e),
        }
    }
}

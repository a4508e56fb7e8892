//! Executions: queued by StartExecution, taken by one replica, watched from any.
//!
//! - StartExecution reads the design (with the caller's credentials), turns it into a plan,
//!   checks the plan builds, stores the execution QUEUED and appends a job to the bus stream
//!   `executor:jobs`.
//! - Every replica reads jobs in the consumer group `executors`, at most
//!   `executor.max_concurrent` at once, and renews its hold on each job it runs every third of
//!   `executor.lease`. A job held by a replica that stopped renewing is claimed by another after
//!   the lease and rerun from the start as the next attempt; no execution is left RUNNING.
//! - Events go to the bus stream `execution:<id>` (capped at `executor.events_kept`), from
//!   which WatchExecution reads, resuming after the last event id a client saw.
//! - Cancel, resume and step reach the replica running the execution through `executor:control`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, SubsecRound as _, Utc};
use csp_bus::{Append, Delivery, EventId, GroupStart, NewEvent, SharedBus};
use csp_platform::{FieldViolation, Settings, auth::Principal};
use csp_proto::{executor::v1 as pb, json as pbjson};
use futures::{Stream, StreamExt as _};
use pb::execution_event::Kind as Event;
use prost::Message as _;
use sea_orm::DatabaseConnection;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    clients::{Access, Ai, Credentials, Designs, Registry, ServiceLogin},
    entity::execution,
    error::Error,
    plan, repo,
    runtime::{Debugger, Ending, Network, Outcome, Plan, Services, Shards},
    stored::{Status, StoredFailure, StoredNode, StoredOptions},
    writer::{Write, Writer},
};

/// A watch that hears nothing this long checks whether its execution has ended.
const WATCH_QUIET: Duration = Duration::from_secs(5);

/// How long a built plan is reused: bounds how late a start sees a change of a sub-design it
/// calls or of a custom component's endpoint (the design's own changes make new revisions).
const PLAN_TTL: Duration = Duration::from_secs(30);
/// Most plans kept.
const MAX_PLANS: usize = 1024;

/// The job queue.
pub(crate) const JOBS: &str = "executor:jobs";
/// The consumer group of the executor replicas.
pub(crate) const GROUP: &str = "executors";
/// Cancel, resume and step requests, for the replica running the execution.
pub(crate) const CONTROL: &str = "executor:control";
/// How long an RPC waits for the execution to react (cancelled, paused again, ...).
const REACTION: Duration = Duration::from_secs(10);

/// The bus stream of an execution's events.
pub fn stream(execution_id: &str) -> String {
    format!("execution:{execution_id}")
}

/// The bus stream of the status changes of every execution of a design (for collaborators).
pub fn design_stream(design_id: &str) -> String {
    format!("executions-of:{design_id}")
}

/// Status changes kept per design stream.
const DESIGN_EVENTS_KEPT: u64 = 1000;

/// Which execution events are about: enough to announce its status changes on its design's
/// stream too.
pub(crate) struct Subject {
    id: String,
    design_id: String,
    started_by: String,
}

impl Subject {
    fn of(row: &execution::Model) -> Self {
        Self { id: row.id.clone(), design_id: row.design_id.clone(), started_by: row.started_by.clone() }
    }

    /// The status changes among `kinds`, as events of the design's stream (empty if none).
    fn design_events(&self, kinds: &[Event]) -> Option<Append> {
        let events: Vec<NewEvent> = kinds
            .iter()
            .filter_map(|kind| match kind {
                Event::StatusChanged(s) => Some(s.status),
                Event::BreakpointHit(_) => Some(pb::ExecutionStatus::Paused as i32),
                _ => None,
            })
            .map(|status| {
                let change = pb::ExecutionStatusChange {
                    execution_id: self.id.clone(),
                    design_id: self.design_id.clone(),
                    status,
                    started_by: self.started_by.clone(),
                    time: Some(timestamp(Utc::now())),
                };
                NewEvent::new(change.encode_to_vec()).with_trace_context()
            })
            .collect();
        (!events.is_empty())
            .then(|| Append::new(design_stream(&self.design_id), events, Some(DESIGN_EVENTS_KEPT)))
    }
}

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: time.timestamp(), nanos: time.timestamp_subsec_nanos() as i32 }
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

fn list_value(values: &[Value]) -> prost_types::ListValue {
    prost_types::ListValue { values: values.iter().cloned().map(pbjson::to_value).collect() }
}

fn lists(json: &str) -> HashMap<String, prost_types::ListValue> {
    match serde_json::from_str::<BTreeMap<String, Vec<Value>>>(json) {
        Ok(map) => map.into_iter().map(|(k, v)| (k, list_value(&v))).collect(),
        Err(_) => HashMap::new(),
    }
}

/// An execution as the API shows it; `outputs` may be left out (listings).
pub(crate) fn to_pb(row: &execution::Model, outputs: bool) -> pb::Execution {
    let options: Option<StoredOptions> = serde_json::from_str(&row.options).ok();
    let nodes: Vec<StoredNode> = serde_json::from_str(&row.nodes).unwrap_or_default();
    pb::Execution {
        id: row.id.clone(),
        design_id: row.design_id.clone(),
        design_revision: row.design_revision,
        status: Status::parse(&row.status).to_pb() as i32,
        started_by: row.started_by.clone(),
        created_at: Some(timestamp(row.created_at)),
        started_at: row.started_at.map(timestamp),
        finished_at: row.finished_at.map(timestamp),
        inputs: lists(&row.inputs),
        outputs: if outputs { lists(&row.outputs) } else { HashMap::new() },
        error: row
            .error
            .as_deref()
            .and_then(|e| serde_json::from_str::<StoredFailure>(e).ok())
            .map(|f| f.to_pb()),
        nodes: nodes.iter().map(StoredNode::to_pb).collect(),
        options: options.map(|o| o.to_pb()),
        attempt: row.attempt,
        retry_of: row.retry_of.clone().unwrap_or_default(),
        paused_at_node_id: row.paused_at.clone(),
    }
}

/// An execution running on this replica.
struct Running {
    cancel: CancellationToken,
    debugger: Arc<Debugger>,
    job: EventId,
    reason: Arc<Mutex<Option<String>>>,
}

/// A request for the replica running an execution.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Command {
    execution_id: String,
    action: String,
    #[serde(default)]
    clear: bool,
    #[serde(default)]
    reason: String,
}

/// A design id and revision.
type DesignRevision = (String, i64);

/// A plan and since when it is kept.
type KeptPlan = (Arc<Plan>, Instant);

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
    running: Mutex<HashMap<String, Running>>,
    /// Credentials of whoever started executions queued here, for their AI calls (kept in
    /// memory only, never stored).
    credentials: Mutex<HashMap<String, (Credentials, Instant)>>,
    /// Executions stored here and not yet taken: the replica that takes one here need not
    /// read it back.
    queued_here: Mutex<HashMap<String, Queued>>,
    /// Plans by design and revision, recently built (see `plan_for`).
    plans: Mutex<HashMap<DesignRevision, KeptPlan>>,
    /// The design of each execution started here lately (it never changes), so that a watch
    /// of one — the usual next call after starting it — needs no database read.
    design_of: Mutex<HashMap<String, String>>,
    writer: Writer,
    slots: Arc<Semaphore>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
            plans: Mutex::new(HashMap::new()),
            design_of: Mutex::new(HashMap::new()),
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
        }))
    }

    /// Publishes events of one execution, in order, in one bus call; its status changes also
    /// go to its design's stream.
    async fn events(&self, who: &Subject, kinds: impl IntoIterator<Item = Event>) -> Result<(), Error> {
        let kinds: Vec<Event> = kinds.into_iter().collect();
        let by_design = who.design_events(&kinds);
        let own = Append::new(
            stream(&who.id),
            kinds.into_iter().map(new_event).collect(),
            Some(self.events_kept()),
        );
        self.bus.append_many(std::iter::once(own).chain(by_design).collect()).await?;
        Ok(())
    }

    fn events_kept(&self) -> u64 {
        self.settings.executor.events_kept
    }

    async fn status_event(&self, who: &Subject, status: Status, error: Option<pb::ExecutionError>) {
        if let Err(e) = self.events(who, [status_changed(status, error)]).await {
            tracing::warn!(execution_id = %who.id, error = %e, "could not publish a status change");
        }
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

    // --- StartExecution ---

    pub(crate) async fn start(
        &self,
        p: &Principal,
        credentials: Credentials,
        request: pb::StartExecutionRequest,
    ) -> Result<pb::Execution, Error> {
        check_id(&request.design_id, "design_id", "a design")?;
        if request.design_revision < 0 {
            return Err(Error::field("design_revision", "must be 0 (the current one) or a revision"));
        }
        if request.idempotency_key.chars().count() > 200 {
            return Err(Error::field("idempotency_key", "must be at most 200 characters"));
        }
        let key = (!request.idempotency_key.is_empty()).then(|| request.idempotency_key.clone());
        if let Some(key) = &key
            && let Some(existing) = repo::by_idempotency_key(&self.db, &p.user_id, key).await?
        {
            return self.same_start(existing, &request.design_id);
        }
        let (revision, plan) =
            self.plan_for(&credentials, &request.design_id, request.design_revision).await?;
        let options = StoredOptions::from_pb(request.options.as_ref(), &self.settings.executor)
            .map_err(Error::fields)?;
        let inputs = check_request(&plan, &options, &request.inputs)?;
        let id = uuid::Uuid::now_v7().to_string();
        let pending: Vec<StoredNode> = plan
            .nodes
            .iter()
            .map(|n| {
                StoredNode::of(&pb::NodeSummary {
                    node_id: n.id.clone(),
                    r#type: n.type_id.clone(),
                    status: pb::NodeStatus::Pending as i32,
                    ..Default::default()
                })
            })
            .collect();
        let row = execution::Model {
            id: id.clone(),
            design_id: request.design_id.clone(),
            design_revision: revision,
            status: Status::Queued.as_str().into(),
            started_by: p.user_id.clone(),
            created_at: now(),
            started_at: None,
            finished_at: None,
            inputs: serde_json::to_string(&inputs).unwrap_or_else(|_| "{}".into()),
            outputs: "{}".into(),
            error: None,
            nodes: serde_json::to_string(&pending).unwrap_or_else(|_| "[]".into()),
            options: serde_json::to_string(&options).unwrap_or_else(|_| "{}".into()),
            plan: serde_json::to_string(&plan).map_err(|e| Error::Internal(e.to_string()))?,
            attempt: 0,
            retry_of: None,
            retry_from: None,
            paused_at: String::new(),
            idempotency_key: key.clone(),
        };
        self.enqueue(row, plan, credentials, key.as_deref(), &p.user_id, &request.design_id).await
    }

    /// The plan of a design revision (0: the current one) the caller may run, checked to
    /// build. Plans are kept for [`PLAN_TTL`] by design and revision: a start naming a revision
    /// it has run lately, by a caller whose access is known, asks the design service nothing; a
    /// start of the current revision asks only which revision that is (the basic view).
    async fn plan_for(
        &self,
        credentials: &Credentials,
        design_id: &str,
        revision: i64,
    ) -> Result<(i64, Arc<Plan>), Error> {
        let kept = |revision: i64| {
            let plans = lock(&self.plans);
            plans
                .get(&(design_id.to_owned(), revision))
                .filter(|(_, at)| at.elapsed() < PLAN_TTL)
                .map(|(plan, _)| plan.clone())
        };
        if revision > 0
            && let Some(access) = self.designs.known_access(credentials, design_id)
            && let Some(plan) = kept(revision)
        {
            return match access {
                Access::Editor => Ok((revision, plan)),
                Access::Viewer => Err(Error::Forbidden("you can view this design but not run it".into())),
            };
        }
        let editor = |design: &csp_proto::design::v1::Design| {
            if design.access < csp_proto::design::v1::Access::Editor as i32 {
                return Err(Error::Forbidden("you can view this design but not run it".into()));
            }
            Ok(design.revision)
        };
        if revision == 0 {
            // The current revision is cheap to learn; its plan is often at hand.
            let current = self.designs.current(credentials, design_id).await?;
            if let Some(plan) = kept(editor(&current)?) {
                return Ok((current.revision, plan));
            }
        }
        let design = self.designs.design(credentials, design_id, revision).await?;
        let revision = editor(&design)?;
        if let Some(plan) = kept(revision) {
            return Ok((revision, plan));
        }
        let plan = plan::build(design, &self.designs, &self.registry, credentials).await?;
        // Build it once now, so a design that cannot run is refused here, not queued.
        let defaults = StoredOptions::from_pb(None, &self.settings.executor).map_err(Error::fields)?;
        let mut options = defaults.to_runtime(&self.settings.executor);
        options.shards = Some(self.shards.clone());
        let (tx, _rx) = mpsc::channel(1);
        if let Err(problems) = Network::build(&plan, options, Services::default(), Debugger::new([]), tx) {
            let listed: Vec<String> = problems.iter().map(ToString::to_string).collect();
            return Err(Error::precondition(
                "DESIGN_INVALID",
                format!("the design cannot run: {}", listed.join("; ")),
            ));
        }
        let plan = Arc::new(plan);
        let mut plans = lock(&self.plans);
        if plans.len() >= MAX_PLANS {
            plans.retain(|_, (_, at)| at.elapsed() < PLAN_TTL);
            if plans.len() >= MAX_PLANS {
                plans.clear();
            }
        }
        plans.insert((design_id.to_owned(), revision), (plan.clone(), Instant::now()));
        Ok((revision, plan))
    }

    fn same_start(&self, existing: execution::Model, design_id: &str) -> Result<pb::Execution, Error> {
        if existing.design_id != design_id {
            return Err(Error::field("idempotency_key", "was used to start an execution of another design"));
        }
        Ok(to_pb(&existing, true))
    }

    /// Stores a new execution, announces it and queues its job.
    #[allow(clippy::too_many_arguments)]
    async fn enqueue(
        &self,
        row: execution::Model,
        plan: Arc<Plan>,
        credentials: Credentials,
        key: Option<&str>,
        user: &str,
        design_id: &str,
    ) -> Result<pb::Execution, Error> {
        let id = row.id.clone();
        let inserted = self.writer.write(Write::Insert(Box::new(row.clone()))).await?;
        if !inserted {
            // Two starts with one key raced: the other one won.
            if let Some(key) = key
                && let Some(existing) = repo::by_idempotency_key(&self.db, user, key).await?
            {
                return self.same_start(existing, design_id);
            }
            return Err(Error::Internal(format!("execution {id} could not be stored")));
        }
        {
            let mut queued = lock(&self.queued_here);
            if queued.len() >= 10_000 {
                queued.retain(|_, (_, _, at)| at.elapsed() < Duration::from_secs(60));
            }
            queued.insert(id.clone(), (row.clone(), plan, Instant::now()));
        }
        {
            let mut designs = lock(&self.design_of);
            if designs.len() >= 100_000 {
                designs.clear();
            }
            designs.insert(id.clone(), row.design_id.clone());
        }
        {
            let mut kept = lock(&self.credentials);
            kept.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(24 * 3600));
            kept.insert(id.clone(), (credentials, Instant::now()));
        }
        // The QUEUED event and the job in one call, the event first: whoever takes the job
        // finds the execution's stream begun.
        let who = Subject::of(&row);
        let queued_event = status_changed(Status::Queued, None);
        let by_design = who.design_events(std::slice::from_ref(&queued_event));
        let queued = Append::new(stream(&id), vec![new_event(queued_event)], Some(self.events_kept()));
        let job = Append::new(JOBS, vec![NewEvent::new(id.clone()).with_trace_context()], None);
        if let Err(e) = self.bus.append_many([queued, job].into_iter().chain(by_design).collect()).await {
            // Nobody would ever take it: it ends here rather than stay queued forever (on its
            // stream too, which may hold the QUEUED event: a script is not undone halfway).
            let failure = pb::ExecutionError {
                code: "unavailable".into(),
                message: "the execution could not be queued: the event bus is unavailable".into(),
                ..Default::default()
            };
            if let Err(stored) = self.finish_with(&who, Status::Failed, "{}", Some(failure), &row.nodes).await
            {
                tracing::warn!(execution_id = %id, error = %stored, "cannot record an execution that could not be queued");
            }
            lock(&self.queued_here).remove(&id);
            lock(&self.credentials).remove(&id);
            return Err(e.into());
        }
        metrics::counter!("csp_executor_executions_total", "status" => "queued").increment(1);
        Ok(to_pb(&row, true))
    }

    // --- reads ---

    pub(crate) async fn get(&self, credentials: &Credentials, id: &str) -> Result<pb::Execution, Error> {
        Ok(to_pb(&self.visible(credentials, id, Access::Viewer).await?, true))
    }

    pub(crate) async fn list(
        &self,
        credentials: &Credentials,
        request: pb::ListExecutionsRequest,
    ) -> Result<pb::ListExecutionsResponse, Error> {
        check_id(&request.design_id, "design_id", "a design")?;
        self.designs.access(credentials, &request.design_id).await?;
        let limit = match request.page_size {
            0 => 50,
            n if n < 0 => return Err(Error::field("page_size", "must not be negative")),
            n => n.min(500) as u64,
        };
        let status = match pb::ExecutionStatus::try_from(request.status) {
            Ok(pb::ExecutionStatus::Unspecified) => None,
            Ok(status) => Status::from_pb(status),
            Err(_) => {
                return Err(Error::field("status", format!("{} is not an ExecutionStatus", request.status)));
            }
        };
        let bad_token = || Error::field("page_token", "is not a token from a previous response");
        let after = if request.page_token.is_empty() {
            None
        } else {
            let text = URL_SAFE_NO_PAD
                .decode(&request.page_token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(bad_token)?;
            let (micros, id) = text.split_once('|').ok_or_else(bad_token)?;
            let at =
                micros.parse::<i64>().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(bad_token)?;
            Some((at, id.to_owned()))
        };
        let mut rows = repo::list(&self.db, &request.design_id, status, after, limit + 1).await?;
        let more = rows.len() as u64 > limit;
        rows.truncate(limit as usize);
        let next_page_token = match rows.last() {
            Some(last) if more => {
                URL_SAFE_NO_PAD.encode(format!("{}|{}", last.created_at.timestamp_micros(), last.id))
            }
            _ => String::new(),
        };
        Ok(pb::ListExecutionsResponse {
            executions: rows.iter().map(|r| to_pb(r, false)).collect(),
            next_page_token,
        })
    }

    // --- control ---

    /// Sends a command to whichever replica runs the execution (this one, directly).
    async fn command(&self, command: Command) -> Result<(), Error> {
        if self.apply(&command) {
            return Ok(());
        }
        let payload = serde_json::to_vec(&command).map_err(|e| Error::Internal(e.to_string()))?;
        self.bus.append(CONTROL, NewEvent::new(payload), Some(10_000)).await?;
        Ok(())
    }

    /// Carries out a command if the execution runs here.
    fn apply(&self, command: &Command) -> bool {
        let running = lock(&self.running);
        let Some(run) = running.get(&command.execution_id) else { return false };
        match command.action.as_str() {
            "cancel" => {
                *lock(&run.reason) = Some(command.reason.clone());
                run.cancel.cancel();
            }
            "resume" => {
                let _ = run.debugger.resume(command.clear);
            }
            "step" => {
                let _ = run.debugger.step();
            }
            _ => {}
        }
        true
    }

    /// Waits (a while) for an event after `after` that `done` accepts.
    async fn wait_for(&self, id: &str, after: Option<EventId>, done: impl Fn(&Event) -> bool) {
        let Ok(mut events) = self.bus.tail(&stream(id), Some(after.unwrap_or(EventId::ZERO))).await else {
            return;
        };
        let _ = tokio::time::timeout(REACTION, async {
            while let Some(Ok(event)) = events.next().await {
                if let Ok(decoded) = pb::ExecutionEvent::decode(event.payload.as_ref())
                    && decoded.kind.as_ref().is_some_and(&done)
                {
                    return;
                }
            }
        })
        .await;
    }

    pub(crate) async fn cancel(
        &self,
        p: &Principal,
        credentials: &Credentials,
        id: &str,
        reason: &str,
    ) -> Result<pb::Execution, Error> {
        let row = self.visible(credentials, id, Access::Editor).await?;
        let reason = if reason.is_empty() {
            format!("cancelled by {}", p.username)
        } else {
            format!("cancelled by {}: {}", p.username, reason.chars().take(500).collect::<String>())
        };
        match Status::parse(&row.status) {
            Status::Queued => {
                let failure =
                    StoredFailure { code: "cancelled".into(), message: reason.clone(), ..Default::default() };
                let stored = serde_json::to_string(&failure).unwrap_or_default();
                let write = Write::CancelQueued { id: id.to_owned(), at: now(), error: stored };
                if self.writer.write(write).await? {
                    metrics::counter!("csp_executor_executions_total", "status" => "cancelled").increment(1);
                    self.status_event(&Subject::of(&row), Status::Cancelled, Some(failure.to_pb())).await;
                } else {
                    // Taken by a replica meanwhile.
                    self.command(Command {
                        execution_id: id.into(),
                        action: "cancel".into(),
                        clear: false,
                        reason,
                    })
                    .await?;
                    self.wait_for(id, None, terminal).await;
                }
            }
            Status::Running | Status::Paused => {
                let last = self.bus.last_id(&stream(id)).await?;
                self.command(Command {
                    execution_id: id.into(),
                    action: "cancel".into(),
                    clear: false,
                    reason,
                })
                .await?;
                self.wait_for(id, last, terminal).await;
            }
            _ => {}
        }
        self.get(credentials, id).await
    }

    async fn debug(
        &self,
        credentials: &Credentials,
        id: &str,
        action: &str,
        clear: bool,
    ) -> Result<pb::Execution, Error> {
        let row = self.visible(credentials, id, Access::Editor).await?;
        if Status::parse(&row.status) != Status::Paused {
            return Err(Error::precondition(
                "NOT_PAUSED",
                format!("the execution is {}, not paused at a breakpoint", row.status),
            ));
        }
        let last = self.bus.last_id(&stream(id)).await?;
        self.command(Command {
            execution_id: id.into(),
            action: action.into(),
            clear,
            reason: String::new(),
        })
        .await?;
        if action == "step" {
            self.wait_for(id, last, |e| matches!(e, Event::BreakpointHit(_)) || terminal(e)).await;
        } else {
            self.wait_for(id, last, |e| {
                matches!(e, Event::StatusChanged(s) if s.status == pb::ExecutionStatus::Running as i32)
                    || terminal(e)
            })
            .await;
        }
        self.get(credentials, id).await
    }

    pub(crate) async fn resume(
        &self,
        credentials: &Credentials,
        id: &str,
        clear: bool,
    ) -> Result<pb::Execution, Error> {
        self.debug(credentials, id, "resume", clear).await
    }

    pub(crate) async fn step(&self, credentials: &Credentials, id: &str) -> Result<pb::Execution, Error> {
        self.debug(credentials, id, "step", false).await
    }

    // --- RetryExecution ---

    pub(crate) async fn retry(
        &self,
        p: &Principal,
        credentials: Credentials,
        request: pb::RetryExecutionRequest,
    ) -> Result<pb::Execution, Error> {
        let old = self.visible(&credentials, &request.execution_id, Access::Editor).await?;
        let status = Status::parse(&old.status);
        if !matches!(status, Status::Failed | Status::Cancelled | Status::Deadlocked) {
            return Err(Error::precondition(
                "NOT_FAILED",
                format!(
                    "the execution is {}; only failed, cancelled or deadlocked executions are retried",
                    old.status
                ),
            ));
        }
        let stored: StoredOptions = serde_json::from_str(&old.options)
            .map_err(|e| Error::Internal(format!("stored options: {e}")))?;
        if !stored.record_messages {
            return Err(Error::precondition(
                "NOT_RECORDED",
                "the execution did not record its messages (options.record_messages), so nothing can be replayed",
            ));
        }
        let plan: Plan =
            serde_json::from_str(&old.plan).map_err(|e| Error::Internal(format!("stored plan: {e}")))?;
        let failed_node = old
            .error
            .as_deref()
            .and_then(|e| serde_json::from_str::<StoredFailure>(e).ok())
            .map(|f| f.node_id)
            .unwrap_or_default();
        let from = if request.from_node_id.is_empty() { failed_node } else { request.from_node_id.clone() };
        if from.is_empty() {
            return Err(Error::field("from_node_id", "is required: no node failed in that execution"));
        }
        if !plan.nodes.iter().any(|n| n.id == from) {
            return Err(Error::field("from_node_id", format!("`{from}` is not a node of the execution")));
        }
        let options = match request.options.as_ref() {
            Some(o) => {
                let mut o =
                    StoredOptions::from_pb(Some(o), &self.settings.executor).map_err(Error::fields)?;
                o.record_messages = true;
                o
            }
            None => stored,
        };
        let inputs: BTreeMap<String, Vec<Value>> = serde_json::from_str(&old.inputs).unwrap_or_default();
        check_request(&plan, &options, &HashMap::new())?;
        let row = execution::Model {
            id: uuid::Uuid::now_v7().to_string(),
            design_id: old.design_id.clone(),
            design_revision: old.design_revision,
            status: Status::Queued.as_str().into(),
            started_by: p.user_id.clone(),
            created_at: now(),
            started_at: None,
            finished_at: None,
            inputs: serde_json::to_string(&inputs).unwrap_or_else(|_| "{}".into()),
            outputs: "{}".into(),
            error: None,
            nodes: old.nodes.clone(),
            options: serde_json::to_string(&options).unwrap_or_else(|_| "{}".into()),
            plan: old.plan.clone(),
            attempt: 0,
            retry_of: Some(old.id.clone()),
            retry_from: Some(from),
            paused_at: String::new(),
            idempotency_key: None,
        };
        self.enqueue(row, Arc::new(plan), credentials, None, &p.user_id, &old.design_id).await
    }

    /// For a retry: the recorded messages replayed into the rerun part, and the outputs of the
    /// sinks not rerun.
    async fn replay_for(
        &self,
        old: &str,
        from: &str,
        plan: &Plan,
    ) -> Result<(HashMap<String, HashMap<String, Vec<Value>>>, BTreeMap<String, Vec<Value>>), Error> {
        let mut rerun: HashSet<&str> = HashSet::from([from]);
        loop {
            let before = rerun.len();
            for c in &plan.connections {
                if rerun.contains(c.from.as_str()) {
                    rerun.insert(c.to.as_str());
                }
            }
            if rerun.len() == before {
                break;
            }
        }
        let recorded = repo::recordings(&self.db, old).await?;
        let mut replay: HashMap<String, HashMap<String, Vec<Value>>> = HashMap::new();
        for node in &plan.nodes {
            if rerun.contains(node.id.as_str()) {
                continue;
            }
            let feeds: HashMap<String, Vec<Value>> = plan
                .connections
                .iter()
                .filter(|c| c.from == node.id && rerun.contains(c.to.as_str()))
                .map(|c| (c.id.clone(), recorded.get(&c.id).cloned().unwrap_or_default()))
                .collect();
            replay.insert(node.id.clone(), feeds);
        }
        let old_outputs: BTreeMap<String, Vec<Value>> = match repo::get(&self.db, old).await? {
            Some(row) => serde_json::from_str(&row.outputs).unwrap_or_default(),
            None => BTreeMap::new(),
        };
        let carried = old_outputs.into_iter().filter(|(node, _)| !rerun.contains(node.as_str())).collect();
        Ok((replay, carried))
    }

    // --- WatchExecution ---

    pub(crate) async fn watch(
        self: &Arc<Self>,
        credentials: &Credentials,
        id: &str,
        after: &str,
    ) -> Result<impl Stream<Item = Result<pb::WatchExecutionResponse, tonic::Status>> + Send + 'static, Error>
    {
        let known = lock(&self.design_of).get(id).cloned();
        // Whether it has ended. One started here lately has ended if it ended here (its caller's
        // credentials are dropped then); else it is taken as live until a quiet stream says
        // otherwise.
        let mut finished = match known {
            Some(design_id) => {
                self.allowed(credentials, id, &design_id, Access::Viewer).await?;
                !lock(&self.credentials).contains_key(id)
            }
            None => Status::parse(&self.visible(credentials, id, Access::Viewer).await?.status).is_terminal(),
        };
        let after = if after.is_empty() {
            EventId::ZERO
        } else {
            after.parse::<EventId>().map_err(|e| Error::field("after_event_id", e.to_string()))?
        };
        let events = match self.bus.tail(&stream(id), Some(after)).await {
            Ok(events) => events,
            Err(csp_bus::BusError::Truncated { trimmed_up_to, .. }) => {
                return Err(Error::precondition(
                    "EVENTS_TRIMMED",
                    format!(
                        "events up to {trimmed_up_to} are no longer kept (at most {} per execution); GetExecution has the final state",
                        self.events_kept()
                    ),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let id = id.to_owned();
        let db = self.db.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            // Until the final status event. Should that never come (the bus failed as the
            // execution ended), a quiet stream whose execution has ended in the database ends
            // too.
            let mut events = events;
            let mut quiet = tokio::time::interval(WATCH_QUIET);
            quiet.reset();
            let mut heard = false;
            loop {
                tokio::select! {
                    event = events.next() => {
                        heard = true;
                        let event = match event {
                            Some(Ok(event)) => event,
                            Some(Err(e)) => {
                                let _ = tx.send(Err(tonic::Status::unavailable(e.to_string()))).await;
                                return;
                            }
                            None => return,
                        };
                        let out = response(&id, &event);
                        let end = out.event.as_ref().and_then(|e| e.kind.as_ref()).is_some_and(terminal);
                        if tx.send(Ok(out)).await.is_err() || end {
                            return;
                        }
                    }
                    _ = quiet.tick() => {
                        if !std::mem::take(&mut heard) {
                            if !finished {
                                finished = repo::get(&db, &id).await.ok().flatten()
                                    .is_some_and(|row| Status::parse(&row.status).is_terminal());
                            } else {
                                return;
                            }
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    // --- the worker ---

    /// Starts reading jobs, claiming those of dead replicas, renewing leases, and following
    /// control commands.
    pub(crate) async fn spawn_workers(self: &Arc<Self>) -> Result<(), Error> {
        self.bus.create_group(JOBS, GROUP, GroupStart::Beginning).await?;
        let control = self.bus.tail(CONTROL, None).await?;
        tokio::spawn(self.clone().take_jobs());
        tokio::spawn(self.clone().renew_leases());
        tokio::spawn(self.clone().follow_commands(control));
        Ok(())
    }

    /// Takes as many jobs at once as there are free slots: first, every half lease, those
    /// whose replica stopped renewing them, then new ones.
    async fn take_jobs(self: Arc<Self>) {
        let lease = self.settings.executor.lease;
        let mut claimed_at = Instant::now();
        loop {
            let Ok(first) = self.slots.clone().acquire_owned().await else { return };
            let mut permits = vec![first];
            while let Ok(more) = self.slots.clone().try_acquire_owned() {
                permits.push(more);
            }
            if claimed_at.elapsed() >= lease / 2 {
                claimed_at = Instant::now();
                match self.bus.claim_idle(JOBS, GROUP, &self.me, lease, permits.len()).await {
                    Ok(jobs) => {
                        for job in jobs {
                            let Some(permit) = permits.pop() else { break };
                            tracing::warn!(job = %job.event.id, deliveries = job.deliveries, "took over an execution whose replica stopped");
                            tokio::spawn(self.clone().run_job(job, permit));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot claim abandoned executions"),
                }
                if permits.is_empty() {
                    continue;
                }
            }
            let wait = (lease / 2).min(Duration::from_secs(2));
            match self.bus.read_group(JOBS, GROUP, &self.me, permits.len(), wait).await {
                Ok(jobs) => {
                    for (job, permit) in jobs.into_iter().zip(permits.drain(..)) {
                        tokio::spawn(self.clone().run_job(job, permit));
                    }
                }
                Err(e) => {
                    drop(permits);
                    tracing::warn!(error = %e, "cannot read the job queue");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if matches!(e, csp_bus::BusError::NoGroup { .. })
                        && let Err(e) = self.bus.create_group(JOBS, GROUP, GroupStart::Beginning).await
                    {
                        tracing::warn!(error = %e, "cannot create the job queue's consumer group");
                    }
                }
            }
        }
    }

    async fn renew_leases(self: Arc<Self>) {
        let every = self.settings.executor.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            let jobs: Vec<EventId> = lock(&self.running).values().map(|r| r.job).collect();
            if jobs.is_empty() {
                continue;
            }
            if let Err(e) = self.bus.touch(JOBS, GROUP, &self.me, &jobs).await {
                tracing::warn!(error = %e, "cannot renew the leases of running executions");
            }
        }
    }

    async fn follow_commands(
        self: Arc<Self>,
        mut commands: futures::stream::BoxStream<'static, csp_bus::Result<csp_bus::Event>>,
    ) {
        while let Some(event) = commands.next().await {
            match event {
                Ok(event) => {
                    if let Ok(command) = serde_json::from_slice::<Command>(&event.payload) {
                        self.apply(&command);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lost the control stream; following it again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match self.bus.tail(CONTROL, None).await {
                        Ok(fresh) => commands = fresh,
                        Err(_) => continue,
                    }
                }
            }
        }
    }

    async fn run_job(self: Arc<Self>, job: Delivery, _permit: OwnedSemaphorePermit) {
        let id = String::from_utf8_lossy(&job.event.payload).into_owned();
        let span = tracing::info_span!("execution", execution_id = %id);
        job.event.follow_trace(&span);
        let outcome = tracing::Instrument::instrument(
            self.clone().run_execution(id.clone(), job.event.id, job.deliveries),
            span,
        )
        .await;
        match outcome {
            Ok(()) => {
                if let Err(e) = self.bus.ack(JOBS, GROUP, &[job.event.id]).await {
                    tracing::warn!(execution_id = %id, error = %e, "cannot acknowledge a finished execution");
                }
            }
            // Left pending: another replica (or this one) takes it again after the lease.
            Err(e) => {
                tracing::error!(execution_id = %id, error = %e, "the execution could not be run; it stays queued")
            }
        }
        lock(&self.running).remove(&id);
    }

    async fn run_execution(self: Arc<Self>, id: String, job: EventId, deliveries: u64) -> Result<(), Error> {
        // Only a first delivery may trust the row kept at the start: a job delivered again ran
        // (somewhere) since, and the database knows its attempts.
        let here = lock(&self.queued_here).remove(&id).filter(|_| deliveries <= 1);
        let (row, plan) = match here {
            Some((row, plan, _)) => (row, plan),
            None => match repo::get(&self.db, &id).await? {
                Some(row) => {
                    let plan: Plan = serde_json::from_str(&row.plan)
                        .map_err(|e| Error::Internal(format!("stored plan: {e}")))?;
                    (row, Arc::new(plan))
                }
                None => return Ok(()),
            },
        };
        if Status::parse(&row.status).is_terminal() {
            return Ok(());
        }
        let attempt = row.attempt + 1;
        if !self.writer.write(Write::Start { id: id.clone(), attempt, at: now() }).await? {
            return Ok(());
        }
        // The run's first events go out with the network's first ones, in one bus call.
        let (tx, mut rx) = mpsc::channel(4096);
        if attempt > 1 {
            let _ = tx.try_send(Event::Log(pb::LogLine {
                node_id: String::new(),
                level: "warn".into(),
                message: format!("attempt {attempt}: the replica running this execution stopped; running it again from the start"),
                data: None,
            }));
        }
        let _ = tx.try_send(status_changed(Status::Running, None));
        metrics::counter!("csp_executor_executions_total", "status" => "running").increment(1);

        let stored: StoredOptions = serde_json::from_str(&row.options)
            .map_err(|e| Error::Internal(format!("stored options: {e}")))?;
        let mut options = stored.to_runtime(&self.settings.executor);
        options.inputs = serde_json::from_str(&row.inputs).unwrap_or_default();
        options.shards = Some(self.shards.clone());
        let mut carried = BTreeMap::new();
        if let (Some(old), Some(from)) = (&row.retry_of, &row.retry_from) {
            let (replay, outputs) = self.replay_for(old, from, &plan).await?;
            options.replay = replay;
            carried = outputs;
        }
        let credentials = lock(&self.credentials).get(&id).map(|(c, _)| c.clone()).unwrap_or_default();
        let ai = Ai::new(&self.settings, self.login.clone(), credentials, &row)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let services =
            Services { ai: Some(Arc::new(ai)), execution_id: id.clone(), traceparent: current_traceparent() };
        let debugger = Debugger::new(stored.breakpoints.clone());
        let cancel = CancellationToken::new();
        let network = match Network::build(&plan, options, services, debugger.clone(), tx) {
            Ok(network) => network,
            Err(problems) => {
                let mut early = Vec::new();
                while let Ok(event) = rx.try_recv() {
                    early.push(event);
                }
                if let Err(e) = self.events(&Subject::of(&row), early).await {
                    tracing::warn!(execution_id = %id, error = %e, "cannot publish execution events");
                }
                let listed: Vec<String> = problems.iter().map(ToString::to_string).collect();
                let failure = pb::ExecutionError {
                    code: "invalid_design".into(),
                    message: format!("the design cannot run: {}", listed.join("; ")),
                    ..Default::default()
                };
                return self
                    .finish_with(&Subject::of(&row), Status::Failed, "{}", Some(failure), &row.nodes)
                    .await;
            }
        };
        let reason = Arc::new(Mutex::new(None));
        lock(&self.running)
            .insert(id.clone(), Running { cancel: cancel.clone(), debugger, job, reason: reason.clone() });
        // In the execution's span: every event it publishes carries the execution's trace.
        let pump =
            tokio::spawn(tracing::Instrument::in_current_span(self.clone().pump(Subject::of(&row), rx)));
        let outcome = network.run(cancel).await;
        let _ = pump.await;
        let cancelled_because = lock(&reason).clone();
        self.record(&Subject::of(&row), outcome, carried, cancelled_because).await
    }

    /// Publishes a running execution's events, and keeps its row in step (paused, metrics).
    /// Events that arrive together are published together, in one bus call; the row is
    /// updated first, so a client seeing an event reads a row at least as new.
    async fn pump(self: Arc<Self>, who: Subject, mut events: mpsc::Receiver<Event>) {
        let id = who.id.clone();
        const BATCH: usize = 256;
        let mut batch = Vec::with_capacity(BATCH);
        // The live status the row has: running since the start was written.
        let mut stored_live = (Status::Running, String::new());
        while events.recv_many(&mut batch, BATCH).await > 0 {
            let mut live = None;
            let mut metrics = None;
            for kind in &batch {
                match kind {
                    Event::BreakpointHit(hit) => live = Some((Status::Paused, hit.node_id.as_str())),
                    Event::StatusChanged(s) if s.status == pb::ExecutionStatus::Running as i32 => {
                        live = Some((Status::Running, ""));
                    }
                    Event::Metrics(snapshot) => metrics = Some(snapshot),
                    _ => {}
                }
            }
            let mut stored = Ok(true);
            if let Some(snapshot) = metrics {
                let nodes: Vec<StoredNode> = snapshot.nodes.iter().map(StoredNode::of).collect();
                let nodes = serde_json::to_string(&nodes).unwrap_or_default();
                stored = self.writer.write(Write::Nodes { id: id.clone(), nodes }).await;
            }
            if let Some((status, paused_at)) = live
                && (status, paused_at) != (stored_live.0, stored_live.1.as_str())
            {
                stored_live = (status, paused_at.to_owned());
                let write = Write::Live { id: id.clone(), status, paused_at: paused_at.to_owned() };
                stored = stored.and(self.writer.write(write).await);
            }
            if let Err(e) = stored {
                tracing::warn!(execution_id = %id, error = %e, "cannot store the execution's state");
            }
            if let Err(e) = self.events(&who, batch.drain(..)).await {
                tracing::warn!(execution_id = %id, error = %e, "cannot publish execution events");
            }
        }
    }

    async fn record(
        &self,
        who: &Subject,
        outcome: Outcome,
        carried: BTreeMap<String, Vec<Value>>,
        cancelled_because: Option<String>,
    ) -> Result<(), Error> {
        let status = match outcome.ending {
            Ending::Succeeded => Status::Succeeded,
            Ending::Failed => Status::Failed,
            Ending::Cancelled => Status::Cancelled,
            Ending::Deadlocked => Status::Deadlocked,
        };
        let mut error = outcome.error.clone();
        if let (Some(e), Some(reason)) = (error.as_mut(), cancelled_because) {
            e.message = reason;
        }
        let mut outputs = carried;
        outputs.extend(outcome.outputs.clone());
        let outputs = serde_json::to_string(&outputs).unwrap_or_else(|_| "{}".into());
        let nodes: Vec<StoredNode> = outcome.nodes.iter().map(StoredNode::of).collect();
        let nodes = serde_json::to_string(&nodes).unwrap_or_else(|_| "[]".into());
        if !outcome.recorded.is_empty() {
            repo::save_recordings(&self.db, &who.id, &outcome.recorded).await?;
        }
        self.finish_with(who, status, &outputs, error, &nodes).await
    }

    async fn finish_with(
        &self,
        who: &Subject,
        status: Status,
        outputs: &str,
        error: Option<pb::ExecutionError>,
        nodes: &str,
    ) -> Result<(), Error> {
        let stored = error.as_ref().map(|e| serde_json::to_string(&StoredFailure::of(e)).unwrap_or_default());
        let id = who.id.as_str();
        let write = Write::Finish {
            id: id.to_owned(),
            status,
            at: now(),
            outputs: outputs.to_owned(),
            error: stored,
            nodes: nodes.to_owned(),
        };
        self.writer.write(write).await?;
        metrics::counter!("csp_executor_executions_total", "status" => status.as_str()).increment(1);
        self.status_event(who, status, error).await;
        lock(&self.credentials).remove(id);
        Ok(())
    }
}

/// Whether an event is an execution's last.
fn terminal(event: &Event) -> bool {
    matches!(event, Event::StatusChanged(s) if Status::from_pb(pb::ExecutionStatus::try_from(s.status).unwrap_or_default()).is_some_and(Status::is_terminal))
}

fn response(id: &str, event: &csp_bus::Event) -> pb::WatchExecutionResponse {
    let mut decoded = pb::ExecutionEvent::decode(event.payload.as_ref()).unwrap_or_default();
    decoded.event_id = event.id.to_string();
    decoded.execution_id = id.to_owned();
    pb::WatchExecutionResponse { event: Some(decoded) }
}

/// An execution event as it goes on the bus, with the current trace context.
fn new_event(kind: Event) -> NewEvent {
    let event = pb::ExecutionEvent {
        event_id: String::new(),
        execution_id: String::new(),
        time: Some(timestamp(Utc::now())),
        kind: Some(kind),
    };
    NewEvent::new(event.encode_to_vec()).with_trace_context()
}

fn status_changed(status: Status, error: Option<pb::ExecutionError>) -> Event {
    Event::StatusChanged(pb::StatusChanged { status: status.to_pb() as i32, error })
}

fn current_traceparent() -> String {
    let mut headers = std::collections::BTreeMap::new();
    csp_platform::telemetry::inject_context(&mut csp_platform::telemetry::MapCarrier(&mut headers));
    headers.remove("traceparent").unwrap_or_default()
}

/// Checks a request's node ids (options, inputs) against the plan; returns the inputs.
fn check_request(
    plan: &Plan,
    options: &StoredOptions,
    inputs: &HashMap<String, prost_types::ListValue>,
) -> Result<BTreeMap<String, Vec<Value>>, Error> {
    let ids: HashSet<&str> = plan.nodes.iter().map(|n| n.id.as_str()).collect();
    let sources = plan::inputs(plan);
    let mut v = Vec::new();
    for node in &options.breakpoints {
        if !ids.contains(node.as_str()) {
            v.push(FieldViolation::new(
                "options.breakpoints",
                format!("`{node}` is not a node of the design"),
            ));
        }
    }
    for node in options.node_policies.keys() {
        if !ids.contains(node.as_str()) {
            v.push(FieldViolation::new(
                format!("options.node_policies[{node}]"),
                "is not a node of the design",
            ));
        }
    }
    let mut out = BTreeMap::new();
    for (node, values) in inputs {
        if !sources.contains_key(node.as_str()) {
            let known: Vec<&str> = sources.keys().copied().collect();
            let hint = if known.is_empty() {
                "the design has no source.input node".to_owned()
            } else {
                format!("its inputs are {}", known.join(", "))
            };
            v.push(FieldViolation::new(
                format!("inputs[{node}]"),
                format!("is not a source.input node; {hint}"),
            ));
            continue;
        }
        out.insert(node.clone(), values.values.iter().cloned().map(pbjson::from_value).collect());
    }
    if v.is_empty() { Ok(out) } else { Err(Error::fields(v)) }
}

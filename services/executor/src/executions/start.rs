//! StartExecution and RetryExecution: an execution stored QUEUED and its job queued.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use csp_bus::{Append, NewEvent};
use csp_platform::{FieldViolation, auth::Principal};
use csp_proto::executor::v1 as pb;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{
    Execution, Executor, Messages, RetryRequest, StartRequest, Verdict, check_id,
    events::{Subject, status_changed},
    lock, now,
};
use crate::{
    clients::{Access, Credentials},
    entity::execution,
    error::Error,
    plan,
    repo::{self, Ended},
    runtime::{Debugger, Network, Plan, Services},
    stored::{Status, StoredFailure, StoredNode, StoredOptions},
    writer::Write,
};

/// How long a built plan is reused: bounds how late a start sees a change of a sub-design it
/// calls or of a custom component's endpoint (the design's own changes make new revisions).
const PLAN_TTL: Duration = Duration::from_secs(30);
/// Most plans kept.
const MAX_PLANS: u64 = 1024;

/// Plans recently built, by design and revision: at most [`MAX_PLANS`], each for [`PLAN_TTL`].
pub(super) fn plan_cache() -> moka::sync::Cache<super::DesignRevision, super::KeptPlan> {
    moka::sync::Cache::builder().max_capacity(MAX_PLANS).time_to_live(PLAN_TTL).build()
}

impl Executor {
    pub(crate) async fn start(
        &self,
        p: &Principal,
        credentials: Credentials,
        request: StartRequest,
    ) -> Result<Execution, Error> {
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
            return same_start(&existing, &request.design_id);
        }
        let (revision, plan, errors) =
            self.plan_for(&credentials, &request.design_id, request.design_revision).await?;
        if !errors.is_empty() && !request.run_invalid {
            const LISTED: usize = 10;
            let mut listed: Vec<String> = errors.iter().take(LISTED).cloned().collect();
            if errors.len() > LISTED {
                listed.push(format!("and {} more", errors.len() - LISTED));
            }
            return Err(Error::precondition(
                "DESIGN_INVALID",
                format!(
                    "revision {revision} of the design has {} error{} (ValidateDesign lists them; run_invalid runs it anyway): {}",
                    errors.len(),
                    if errors.len() == 1 { "" } else { "s" },
                    listed.join("; ")
                ),
            ));
        }
        let inputs = check_request(&plan, &request.options, &request.inputs)?;
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
        let row = new_row(
            &p.user_id,
            &request.design_id,
            revision,
            &inputs,
            serde_json::to_string(&pending).unwrap_or_else(|_| "[]".into()),
            &request.options,
            serde_json::to_string(&plan).map_err(|e| Error::Internal(e.to_string()))?,
            key.clone(),
        );
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
    ) -> Result<(i64, Arc<Plan>, Verdict), Error> {
        let kept = |revision: i64| self.plans.get(&(design_id.to_owned(), revision));
        if revision > 0
            && let Some(access) = self.designs.known_access(credentials, design_id)
            && let Some((plan, verdict)) = kept(revision)
        {
            return match access {
                Access::Editor => Ok((revision, plan, verdict)),
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
            if let Some((plan, verdict)) = kept(editor(&current)?) {
                return Ok((current.revision, plan, verdict));
            }
        }
        let design = self.designs.design(credentials, design_id, revision).await?;
        let revision = editor(&design)?;
        if let Some((plan, verdict)) = kept(revision) {
            return Ok((revision, plan, verdict));
        }
        let verdict = Arc::new(self.designs.errors(credentials, design_id, revision).await?);
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
        self.plans.insert((design_id.to_owned(), revision), (plan.clone(), verdict.clone()));
        Ok((revision, plan, verdict))
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
    ) -> Result<Execution, Error> {
        let id = row.id.clone();
        let inserted = self.writer.write(Write::Insert(Box::new(row.clone()))).await?;
        if !inserted {
            // Two starts with one key raced: the other one won.
            if let Some(key) = key
                && let Some(existing) = repo::by_idempotency_key(&self.db, user, key).await?
            {
                return same_start(&existing, design_id);
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
        self.design_of.insert(id.clone(), row.design_id.clone());
        {
            let mut kept = lock(&self.credentials);
            kept.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(24 * 3600));
            kept.insert(id.clone(), (credentials, Instant::now()));
        }
        // The QUEUED event and the job in one call, the event first: whoever takes the job
        // finds the execution's stream begun.
        let who = Subject::of(&row);
        let mut appends = who.appends(vec![status_changed(Status::Queued, None)], self.events_kept());
        appends
            .insert(1, Append::new(super::JOBS, vec![NewEvent::new(id.clone()).with_trace_context()], None));
        if let Err(e) = self.bus.append_many(appends).await {
            // Nobody would ever take it: it ends here rather than stay queued forever (on its
            // stream too, which may hold the QUEUED event: a script is not undone halfway).
            let failure = StoredFailure {
                code: "unavailable".into(),
                message: "the execution could not be queued: the event bus is unavailable".into(),
                ..Default::default()
            };
            let ended = Ended {
                status: Status::Failed,
                at: now(),
                outputs: "{}".into(),
                error: Some(serde_json::to_string(&failure).unwrap_or_default()),
                nodes: row.nodes.clone(),
            };
            if let Err(stored) = self.conclude(None, &who, 0, ended, Some(failure.to_pb())).await {
                tracing::warn!(execution_id = %id, error = %stored, "cannot record an execution that could not be queued");
            }
            lock(&self.queued_here).remove(&id);
            lock(&self.credentials).remove(&id);
            return Err(e.into());
        }
        metrics::counter!("csp_executor_executions_total", "status" => "queued").increment(1);
        Ok(Execution::of(&row, true))
    }

    pub(crate) async fn retry(
        &self,
        p: &Principal,
        credentials: Credentials,
        request: RetryRequest,
    ) -> Result<Execution, Error> {
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
        let options = match request.options {
            Some(mut o) => {
                o.record_messages = true;
                o
            }
            None => stored,
        };
        let inputs: Messages = serde_json::from_str(&old.inputs).unwrap_or_default();
        check_request(&plan, &options, &Messages::new())?;
        let mut row = new_row(
            &p.user_id,
            &old.design_id,
            old.design_revision,
            &inputs,
            old.nodes.clone(),
            &options,
            old.plan.clone(),
            None,
        );
        row.retry_of = Some(old.id.clone());
        row.retry_from = Some(from);
        self.enqueue(row, Arc::new(plan), credentials, None, &p.user_id, &old.design_id).await
    }

    /// For a retry: the recorded messages replayed into the rerun part, and the outputs of the
    /// sinks not rerun.
    pub(super) async fn replay_for(
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
}

fn same_start(existing: &execution::Model, design_id: &str) -> Result<Execution, Error> {
    if existing.design_id != design_id {
        return Err(Error::field("idempotency_key", "was used to start an execution of another design"));
    }
    Ok(Execution::of(existing, true))
}

/// A new execution's row, QUEUED.
#[allow(clippy::too_many_arguments)]
fn new_row(
    user: &str,
    design_id: &str,
    revision: i64,
    inputs: &Messages,
    nodes: String,
    options: &StoredOptions,
    plan: String,
    key: Option<String>,
) -> execution::Model {
    execution::Model {
        id: uuid::Uuid::now_v7().to_string(),
        design_id: design_id.to_owned(),
        design_revision: revision,
        status: Status::Queued.as_str().into(),
        started_by: user.to_owned(),
        created_at: now(),
        started_at: None,
        finished_at: None,
        inputs: serde_json::to_string(inputs).unwrap_or_else(|_| "{}".into()),
        outputs: "{}".into(),
        error: None,
        nodes,
        options: serde_json::to_string(options).unwrap_or_else(|_| "{}".into()),
        plan,
        attempt: 0,
        retry_of: None,
        retry_from: None,
        paused_at: String::new(),
        idempotency_key: key,
        cancel_requested: None,
        last_error: None,
        runner: String::new(),
    }
}

/// Checks a request's node ids (options, inputs) against the plan; returns the inputs.
fn check_request(plan: &Plan, options: &StoredOptions, inputs: &Messages) -> Result<Messages, Error> {
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
        out.insert(node.clone(), values.clone());
    }
    if v.is_empty() { Ok(out) } else { Err(Error::fields(v)) }
}

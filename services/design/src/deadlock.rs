//! CheckDeadlock: a design as communicating processes (see `csp_components::deadlock`), each
//! node's ports as the registry resolves them for its configuration, each connection a FIFO of
//! the capacity the executor gives it, searched for a reachable deadlock.

use std::collections::BTreeMap;

use csp_components::deadlock::{self as model, Machine, Model, Process, StepAction, Verdict, WaitingTo};

use crate::{
    designs::Designs,
    error::Error,
    model::Document,
    validate::{Credentials, Finding, NodeInfo},
};

/// The search's answer, in the design's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checked {
    pub(crate) verdict: Verdict,
    /// The model searched (to name its processes and channels).
    pub(crate) model: Model,
    /// Nodes whose behaviour was assumed.
    pub(crate) assumed: Vec<String>,
    /// Messages each source was assumed to send.
    pub(crate) source_messages: u16,
}

impl Designs {
    /// The model of `document` (its ports resolved by the registry), and the nodes whose
    /// behaviour it assumes.
    pub(crate) async fn model_of(
        &self,
        p: &csp_platform::auth::Principal,
        credentials: &Credentials,
        design_id: &str,
        document: &Document,
    ) -> Result<(Model, Vec<String>), Error> {
        let mut findings = Vec::new();
        let infos = self.resolve(p, credentials, design_id, document, &mut findings).await?;
        let settings = &self.limits.deadlock;
        let model = build(document, &infos, settings.source_messages, settings.default_capacity);
        let assumed = model.processes.iter().filter(|p| p.assumed).map(|p| p.node_id.clone()).collect();
        Ok((model, assumed))
    }

    /// Searches `document` for a deadlock, exploring at most `max_states` (0: the configured
    /// bound; never more than it).
    pub(crate) async fn check_deadlock(
        &self,
        p: &csp_platform::auth::Principal,
        credentials: &Credentials,
        design_id: &str,
        document: &Document,
        max_states: u64,
    ) -> Result<Checked, Error> {
        let settings = self.limits.deadlock.clone();
        let (model, assumed) = self.model_of(p, credentials, design_id, document).await?;
        let max_states = match max_states {
            0 => settings.max_states,
            n => n.min(settings.max_states),
        };
        let searched = model.clone();
        let verdict =
            tokio::task::spawn_blocking(move || model::check(&searched, max_states, settings.max_time))
                .await
                .map_err(|e| Error::Internal(format!("the deadlock search stopped: {e}")))?;
        Ok(Checked { verdict, model, assumed, source_messages: settings.source_messages })
    }
}

impl Designs {
    /// ValidateDesign's deadlock finding: a search of at most `design.deadlock.validate_max_states`
    /// states. A deadlock found is an error (`deadlock`) when every run of the design meets it
    /// (its processes read in fixed orders and write without choices), else a warning
    /// (`deadlock_possible`); no deadlock found within the bound says nothing.
    pub(crate) async fn deadlock_finding(
        &self,
        document: &Document,
        infos: &BTreeMap<String, NodeInfo>,
    ) -> Result<Option<Finding>, Error> {
        let settings = self.limits.deadlock.clone();
        let model = build(document, infos, settings.source_messages, settings.default_capacity);
        let searched = model.clone();
        let max_states = settings.validate_max_states;
        let max_time = settings.max_time.min(std::time::Duration::from_millis(500));
        let verdict = tokio::task::spawn_blocking(move || model::check(&searched, max_states, max_time))
            .await
            .map_err(|e| Error::Internal(format!("the deadlock search stopped: {e}")))?;
        let Verdict::Deadlock { trace, blocked, .. } = verdict else { return Ok(None) };
        let waits: Vec<String> = blocked
            .iter()
            .take(5)
            .map(|b| {
                let on: Vec<&str> =
                    b.channels.iter().map(|&c| model.channels[c].connection_id.as_str()).collect();
                format!(
                    "`{}` waits to {} on `{}`",
                    model.processes[b.process].node_id,
                    waiting(b.waiting_to),
                    on.join("`, `")
                )
            })
            .collect();
        let more = if blocked.len() > 5 { format!(" and {} more", blocked.len() - 5) } else { String::new() };
        let story = format!(
            "after {} message moves {}{more} for ever (CheckDeadlock shows how)",
            trace.len(),
            waits.join(", ")
        );
        let first = blocked.first().map(|b| model.processes[b.process].node_id.clone()).unwrap_or_default();
        Ok(Some(if model.determinate() {
            Finding::error("deadlock", format!("the design deadlocks on every run: {story}")).node(&first)
        } else {
            Finding::warning("deadlock_possible", format!("the design can deadlock: {story}")).node(&first)
        }))
    }
}

/// The model of a design: a process per node whose ports are known, a channel per connection
/// between two of them.
fn build(
    document: &Document,
    infos: &BTreeMap<String, NodeInfo>,
    source_messages: u16,
    default_capacity: u16,
) -> Model {
    let mut index = BTreeMap::new();
    let mut processes = Vec::new();
    for (id, info) in infos {
        let Some(node) = document.nodes.get(id) else { continue };
        let outputs: Vec<String> = info.outputs.iter().map(|p| p.name.clone()).collect();
        let declared = csp_components::builtin(&node.type_id)
            .and_then(|_| model::machine_for(&node.type_id, &node.config, &outputs, source_messages));
        let (machine, assumed) = match declared {
            Some(machine) => (machine, false),
            None => (model::assumed(&outputs), true),
        };
        index.insert(id.as_str(), processes.len());
        processes.push(Process {
            node_id: id.clone(),
            machine,
            inputs: vec![Vec::new(); info.inputs.len()],
            outputs: vec![Vec::new(); info.outputs.len()],
            assumed,
        });
    }
    let mut channels = Vec::new();
    for connection in document.connections.values() {
        let (Some(&from), Some(&to)) =
            (index.get(connection.from.node_id.as_str()), index.get(connection.to.node_id.as_str()))
        else {
            continue;
        };
        let (Some(out), Some(input)) = (
            infos[&connection.from.node_id].outputs.iter().position(|p| p.name == connection.from.port),
            infos[&connection.to.node_id].inputs.iter().position(|p| p.name == connection.to.port),
        ) else {
            continue;
        };
        let capacity = if connection.capacity > 0 {
            u16::try_from(connection.capacity).unwrap_or(u16::MAX >> 1)
        } else {
            default_capacity
        };
        let c = channels.len();
        processes[from].outputs[out].push(c);
        processes[to].inputs[input].push(c);
        channels.push(model::Channel {
            connection_id: connection.id.clone(),
            from,
            to,
            capacity: capacity.clamp(1, u16::MAX >> 1),
        });
    }
    // A source without connections still counts its messages; one reading nothing ends.
    for process in &mut processes {
        if let Machine::Source { count, .. } = &mut process.machine
            && process.outputs.iter().all(Vec::is_empty)
        {
            *count = 0;
        }
    }
    Model { processes, channels }
}

/// A step's action as the API says it.
pub(crate) fn action(action: StepAction) -> &'static str {
    match action {
        StepAction::Send => "send",
        StepAction::Receive => "receive",
    }
}

/// What a blocked process waits to do, as the API says it.
pub(crate) fn waiting(waiting: WaitingTo) -> &'static str {
    match waiting {
        WaitingTo::Send => "send",
        WaitingTo::Receive => "receive",
    }
}

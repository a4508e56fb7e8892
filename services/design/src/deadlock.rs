//! CheckDeadlock: a design as communicating processes (see `csp_components::deadlock`), each
//! node's ports as the registry resolves them for its configuration, each connection a FIFO of
//! the capacity the executor gives it, searched for a reachable deadlock.

use std::collections::BTreeMap;

use csp_components::deadlock::{
    self as model, Count, Cycle, CycleKind, Machine, Model, Process, StepAction, Verdict, WaitingTo,
};

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
    /// ValidateDesign's deadlock findings. First the linear rules (`csp_components::deadlock::rules`):
    /// a cycle that deadlocks on every run is an error (`deadlock`), one that may a warning
    /// (`deadlock_prone_cycle`), one whose messages go round for ever a warning
    /// (`endless_cycle`). Where they cannot decide and `search` holds, a search of at most
    /// `design.deadlock.validate_max_states` states: a deadlock found is an error (`deadlock`)
    /// when every run of the design meets it (see `Model::certain`), else a warning
    /// (`deadlock_possible`); none found within the bound says nothing.
    pub(crate) async fn deadlock_findings(
        &self,
        document: &Document,
        infos: &BTreeMap<String, NodeInfo>,
        search: bool,
    ) -> Result<Vec<Finding>, Error> {
        let settings = self.limits.deadlock.clone();
        let model = build(document, infos, settings.source_messages, settings.default_capacity);
        let ruling = model::rules(&model);
        let mut findings: Vec<Finding> =
            ruling.cycles.iter().map(|cycle| cycle_finding(&model, cycle)).collect();
        if !search || ruling.decided() {
            return Ok(findings);
        }
        let searched = model.clone();
        let max_states = settings.validate_max_states;
        let max_time = settings.max_time.min(std::time::Duration::from_millis(500));
        let verdict = tokio::task::spawn_blocking(move || model::check(&searched, max_states, max_time))
            .await
            .map_err(|e| Error::Internal(format!("the deadlock search stopped: {e}")))?;
        let Verdict::Deadlock { trace, blocked, .. } = verdict else { return Ok(findings) };
        // A cycle the rules already warned about explains the deadlock.
        if findings.iter().any(|f| f.code == "deadlock_prone_cycle") {
            return Ok(findings);
        }
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
        findings.push(if model.certain(&trace) {
            Finding::error("deadlock", format!("the design deadlocks on every run: {story}")).node(&first)
        } else {
            Finding::warning("deadlock_possible", format!("the design can deadlock: {story}")).node(&first)
        });
        Ok(findings)
    }
}

/// What the rules found about a cycle, in the design's terms.
fn cycle_finding(model: &Model, cycle: &Cycle) -> Finding {
    let name = |p: usize| format!("`{}`", model.processes[p].node_id);
    let mut names: Vec<String> = cycle.processes.iter().take(5).map(|&p| name(p)).collect();
    if cycle.processes.len() > 5 {
        names.push(format!("{} more", cycle.processes.len() - 5));
    }
    let names = names.join(", ");
    let count = |enter: Count| match (enter.lo, enter.hi) {
        (lo, hi) if lo == hi => format!("{lo}"),
        (lo, u64::MAX) => format!("at least {lo}"),
        (lo, hi) => format!("{lo} to {hi}"),
    };
    let message = match cycle.kind {
        CycleKind::Starved => format!(
            "no process on the cycle {names} takes a message from outside it (none reads whichever input is \
             ready): the cycle never starts and its processes wait for ever"
        ),
        CycleKind::Fills { holds, enter } => format!(
            "every message that enters the cycle {names} stays on it (each process on it writes every message \
             it takes to all its outputs), and it holds {holds} (its channels' capacity and one per process): \
             {} enter, so once {holds} have, every process on it waits to send for ever",
            count(enter)
        ),
        CycleKind::Grows { process, .. } => format!(
            "{} writes each message it takes back onto the cycle {names} more than once: the messages on it \
             multiply until every process on it waits to send for ever",
            name(process)
        ),
        CycleKind::Endless { holds, enter } => format!(
            "every message that enters the cycle {names} stays on it and goes round for ever ({} enter, it \
             holds {holds}): the run never ends",
            count(enter)
        ),
        CycleKind::NeverEnds => format!(
            "no process on the cycle {names} can end while the others run (none is a join fed from outside \
             it): once no message is left on it, or once it fills, its processes wait for ever"
        ),
    };
    let first = &model.processes[cycle.processes[0]].node_id;
    let finding = if cycle.certain {
        Finding::error("deadlock", format!("the design deadlocks on every run: {message}"))
    } else if cycle.deadlocks() {
        Finding::warning("deadlock_prone_cycle", message)
    } else {
        Finding::warning("endless_cycle", message)
    };
    finding.node(first).connection(&model.channels[cycle.channel].connection_id)
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
        let declared = match csp_components::builtin(&node.type_id) {
            Some(_) => model::machine_for(&node.type_id, &node.config, &outputs, source_messages),
            None => info.behaviour.map(|b| model::declared(&b, &outputs, source_messages)),
        };
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
        if let Machine::Source { count, total, .. } = &mut process.machine
            && process.outputs.iter().all(Vec::is_empty)
        {
            *count = 0;
            *total = Some(0);
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

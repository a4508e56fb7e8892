//! A design revision as a runtime [`Plan`]: sub-designs flattened in, custom types given their
//! endpoints.
//!
//! A `design.call` node is replaced by the nodes of the design it runs, their ids prefixed with
//! the call's (`call/inner`). The sub-design's `source.input` and `sink.output` nodes become
//! relays (`control.merge`): connections into the call's input `x` go to the relay of the
//! `source.input` named `x`, and connections from its output `y` leave from the relay of the
//! `sink.output` named `y`. The call's `error` port carries nothing: nodes inside the sub-design
//! follow their own error policies.

use std::collections::{BTreeMap, HashMap};

use csp_proto::{design::v1 as design, json as pbjson};
use serde_json::Value;

use crate::{
    clients::{Credentials, Designs, Registry},
    error::Error,
    runtime::{Plan, PlanConnection, PlanNode, RemoteEndpoint},
};

/// Sub-designs nest at most this deep.
const MAX_DEPTH: usize = 16;
/// A flattened plan has at most this many nodes.
const MAX_NODES: usize = 10_000;

fn invalid(message: impl Into<String>) -> Error {
    Error::precondition("DESIGN_INVALID", format!("the design cannot run: {}", message.into()))
}

/// The port name a `source.input` / `sink.output` node gives its design.
fn declared_name(node: &design::Node) -> String {
    node.config
        .as_ref()
        .and_then(|c| c.fields.get("name"))
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_else(|| node.id.clone())
}

/// A call's ports: port name → the relay node inside.
#[derive(Default)]
struct Ports {
    inputs: HashMap<String, String>,
    outputs: HashMap<String, String>,
}

struct Builder<'a> {
    designs: &'a Designs,
    registry: &'a Registry,
    credentials: &'a Credentials,
    plan: Plan,
    endpoints: HashMap<(String, String), RemoteEndpoint>,
}

impl Builder<'_> {
    /// Adds a design's nodes and connections under `prefix`; `path` lists the designs being
    /// expanded (to refuse loops). Returns the ports it offers as a sub-design.
    fn add<'b>(
        &'b mut self,
        d: design::Design,
        prefix: String,
        path: Vec<String>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Ports, Error>> + Send + 'b>> {
        Box::pin(async move {
            let nested = !prefix.is_empty();
            let mut ports = Ports::default();
            let mut calls: HashMap<String, Ports> = HashMap::new();
            for node in &d.nodes {
                let id = format!("{prefix}{}", node.id);
                let config =
                    node.config.clone().map(pbjson::from_struct).unwrap_or(Value::Object(Default::default()));
                match node.r#type.as_str() {
                    "design.call" => {
                        let target =
                            config.get("design_id").and_then(Value::as_str).unwrap_or_default().to_owned();
                        let revision = config.get("revision").and_then(Value::as_i64).unwrap_or(0);
                        if path.contains(&target) || target == d.id {
                            let mut cycle = path.clone();
                            cycle.push(target);
                            return Err(invalid(format!(
                                "node `{id}`: sub-designs call each other in a loop: {}",
                                cycle.join(" → ")
                            )));
                        }
                        if path.len() >= MAX_DEPTH {
                            return Err(invalid(format!(
                                "node `{id}`: sub-designs nest deeper than {MAX_DEPTH} levels"
                            )));
                        }
                        let sub = match self.designs.design(self.credentials, &target, revision).await {
                            Ok(sub) => sub,
                            Err(Error::NotFound(_)) => {
                                return Err(invalid(format!(
                                    "node `{id}` runs design `{target}`, which does not exist or you cannot read"
                                )));
                            }
                            Err(e) => return Err(e),
                        };
                        let mut deeper = path.clone();
                        deeper.push(target);
                        let offered = self.add(sub, format!("{id}/"), deeper).await?;
                        calls.insert(node.id.clone(), offered);
                    }
                    "source.input" if nested => {
                        ports.inputs.insert(declared_name(node), id.clone());
                        self.relay(id);
                    }
                    "sink.output" if nested => {
                        ports.outputs.insert(declared_name(node), id.clone());
                        self.relay(id);
                    }
                    type_id => {
                        let remote = if csp_components::builtin(type_id).is_some() {
                            None
                        } else {
                            let key = (type_id.to_owned(), node.type_version.clone());
                            let endpoint = match self.endpoints.get(&key) {
                                Some(found) => found.clone(),
                                None => {
                                    let found = self
                                        .registry
                                        .endpoint(self.credentials, type_id, &node.type_version, &id)
                                        .await?;
                                    self.endpoints.insert(key, found.clone());
                                    found
                                }
                            };
                            Some(endpoint)
                        };
                        self.plan.nodes.push(PlanNode { id, type_id: type_id.to_owned(), config, remote });
                    }
                }
                if self.plan.nodes.len() > MAX_NODES {
                    return Err(invalid(format!("with its sub-designs it has more than {MAX_NODES} nodes")));
                }
            }
            for c in &d.connections {
                let (Some(from), Some(to)) = (&c.from, &c.to) else { continue };
                let source = match calls.get(&from.node_id) {
                    Some(call) => match call.outputs.get(&from.port) {
                        Some(relay) => (relay.clone(), "out".to_owned()),
                        // The call's `error` port: nothing comes out of it.
                        None if from.port == "error" => continue,
                        None => {
                            return Err(invalid(format!(
                                "connection `{prefix}{}`: the design run by `{}` has no output `{}`",
                                c.id, from.node_id, from.port
                            )));
                        }
                    },
                    None => (format!("{prefix}{}", from.node_id), from.port.clone()),
                };
                let target = match calls.get(&to.node_id) {
                    Some(call) => match call.inputs.get(&to.port) {
                        Some(relay) => (relay.clone(), "in".to_owned()),
                        None => {
                            return Err(invalid(format!(
                                "connection `{prefix}{}`: the design run by `{}` has no input `{}`",
                                c.id, to.node_id, to.port
                            )));
                        }
                    },
                    None => (format!("{prefix}{}", to.node_id), to.port.clone()),
                };
                self.plan.connections.push(PlanConnection {
                    id: format!("{prefix}{}", c.id),
                    from: source.0,
                    from_port: source.1,
                    to: target.0,
                    to_port: target.1,
                    capacity: c.capacity,
                });
            }
            Ok(ports)
        })
    }

    fn relay(&mut self, id: String) {
        self.plan.nodes.push(PlanNode {
            id,
            type_id: "control.merge".into(),
            config: Value::Object(Default::default()),
            remote: None,
        });
    }
}

/// The plan of a design (with its sub-designs, read with the caller's credentials).
pub(crate) async fn build(
    root: design::Design,
    designs: &Designs,
    registry: &Registry,
    credentials: &Credentials,
) -> Result<Plan, Error> {
    let id = root.id.clone();
    let mut builder =
        Builder { designs, registry, credentials, plan: Plan::default(), endpoints: HashMap::new() };
    builder.add(root, String::new(), vec![id]).await?;
    Ok(builder.plan)
}

/// The ids of the plan's `source.input` nodes at the top level (not inside sub-designs).
pub(crate) fn inputs(plan: &Plan) -> BTreeMap<&str, ()> {
    plan.nodes
        .iter()
        .filter(|n| n.type_id == "source.input" && !n.id.contains('/'))
        .map(|n| (n.id.as_str(), ()))
        .collect()
}

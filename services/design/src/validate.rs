//! ValidateDesign: the design checked against the component registry (types, configuration
//! schemas, ports and port compatibility, all asked over gRPC with the caller's credentials)
//! and as a graph (dangling required inputs, unreachable nodes, deadlock-prone cycles,
//! duplicate connections, self-loops, sub-designs calling each other).
//!
//! Every finding has a stable `code`:
//!
//! | code | severity | what |
//! |---|---|---|
//! | `empty_design` | warning | no nodes |
//! | `unknown_component_type` | error | the registry has no such type (or version) |
//! | `deprecated_component_type` | warning | the type (version) is deprecated |
//! | `invalid_config` | error | the configuration breaks the type's schema (`pointer` says where) |
//! | `unknown_sub_design` | error | a `design.call` names a design that does not exist or the caller cannot read |
//! | `recursive_sub_design` | error | sub-designs call each other in a loop |
//! | `unknown_port` | error | a connection names a port its node does not have |
//! | `self_loop` | error | a connection from a node to itself |
//! | `duplicate_connection` | error | a second connection between the same two ports |
//! | `port_type_mismatch` | error | the output may send messages the input refuses |
//! | `too_many_connections` | error | several connections into an input that takes one |
//! | `dangling_required_input` | error | a required input with no connection |
//! | `unreachable_node` | warning | no message can ever reach the node |
//! | `deadlock` | error | a deadlock every run meets (see `deadlock.rs`) |
//! | `deadlock_prone_cycle` | warning | a cycle that can fill up or that never ends by itself |
//! | `endless_cycle` | warning | a cycle whose messages go round for ever |
//! | `deadlock_possible` | warning | a deadlock some runs meet, found by a small search |

use std::collections::{BTreeMap, BTreeSet, HashMap};

use csp_components::compat::{self, Verdict};
use csp_platform::{Service, Settings, client::TracedChannel, config::ConfigError};
use csp_proto::{
    json,
    registry::v1::{self as reg, registry_service_client::RegistryServiceClient},
};
use futures::{StreamExt as _, stream};
use serde_json::Value;
use tonic::{Code, Request, Status, metadata::AsciiMetadataValue};
use tonic_types::StatusExt as _;

use crate::{
    designs::Designs,
    error::Error,
    model::{Connection, Document, Node},
};

/// Calls to the registry in flight at once for one validation.
const CONCURRENCY: usize = 16;
/// Designs a chain of sub-designs may nest.
const MAX_NESTING: usize = 16;
/// The type whose nodes run other designs.
pub(crate) const DESIGN_CALL: &str = "design.call";

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Severity {
    Error,
    Warning,
}

/// One problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finding {
    pub(crate) severity: Severity,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) node_id: String,
    pub(crate) connection_id: String,
    pub(crate) port: String,
    pub(crate) pointer: String,
}

impl Finding {
    fn new(severity: Severity, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity,
            code,
            message: message.into(),
            node_id: String::new(),
            connection_id: String::new(),
            port: String::new(),
            pointer: String::new(),
        }
    }

    pub(crate) fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message)
    }

    pub(crate) fn warning(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Warning, code, message)
    }

    pub(crate) fn node(mut self, id: &str) -> Self {
        self.node_id = id.to_owned();
        self
    }

    pub(crate) fn connection(mut self, id: &str) -> Self {
        self.connection_id = id.to_owned();
        self
    }

    fn port(mut self, port: &str) -> Self {
        self.port = port.to_owned();
        self
    }

    fn pointer(mut self, pointer: &str) -> Self {
        self.pointer = pointer.to_owned();
        self
    }
}

/// The caller's `authorization` metadata, forwarded to the registry.
pub(crate) type Credentials = Option<AsciiMetadataValue>;

/// A client of the component registry.
#[derive(Clone)]
pub(crate) struct RegistryClient {
    client: RegistryServiceClient<TracedChannel>,
}

fn registry_error(status: Status) -> Error {
    match status.code() {
        Code::PermissionDenied => {
            Error::Forbidden(format!("the component registry refused: {}", status.message()))
        }
        _ => Error::Unavailable(format!("the component registry did not answer: {}", status.message())),
    }
}

impl RegistryClient {
    pub(crate) fn new(settings: &Settings) -> Result<Self, ConfigError> {
        let client = RegistryServiceClient::new(csp_platform::client::channel(settings, Service::Registry)?)
            .max_decoding_message_size(settings.server.max_message_bytes);
        Ok(Self { client })
    }

    fn request<T>(message: T, credentials: &Credentials) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(std::time::Duration::from_secs(10));
        if let Some(value) = credentials {
            request.metadata_mut().insert("authorization", value.clone());
        }
        request
    }

    /// The type, or `None` with the registry's reason when it has no such type or version.
    async fn component_type(
        &self,
        type_id: &str,
        version: &str,
        credentials: &Credentials,
    ) -> Result<Result<reg::ComponentType, String>, Error> {
        let message = reg::GetComponentTypeRequest { r#type: type_id.into(), version: version.into() };
        match self.client.clone().get_component_type(Self::request(message, credentials)).await {
            Ok(response) => {
                Ok(response.into_inner().component_type.ok_or_else(|| "no type returned".to_owned()))
            }
            Err(status) if matches!(status.code(), Code::NotFound | Code::InvalidArgument) => {
                Ok(Err(status.message().to_owned()))
            }
            Err(status) => Err(registry_error(status)),
        }
    }

    async fn validate_config(
        &self,
        node: &Node,
        credentials: &Credentials,
    ) -> Result<reg::ValidateConfigResponse, Error> {
        let message = reg::ValidateConfigRequest {
            r#type: node.type_id.clone(),
            version: node.type_version.clone(),
            config: Some(json::to_struct(node.config.clone())),
        };
        self.client
            .clone()
            .validate_config(Self::request(message, credentials))
            .await
            .map(tonic::Response::into_inner)
            .map_err(registry_error)
    }

    /// Whether the output may feed the input, as the registry sees it.
    pub(crate) async fn compatibility(
        &self,
        pair: &PortPair,
        credentials: &Credentials,
    ) -> Result<Pairing, Error> {
        let port = |(type_id, version, port): &(String, String, String)| reg::PortRef {
            r#type: type_id.clone(),
            version: version.clone(),
            port: port.clone(),
        };
        let message = reg::CheckCompatibilityRequest { from: Some(port(&pair.0)), to: Some(port(&pair.1)) };
        let r = match self.client.clone().check_compatibility(Self::request(message, credentials)).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::NotFound => return Ok(Pairing::UnknownType),
            Err(status) if status.code() == Code::InvalidArgument => {
                let ports = status
                    .get_details_bad_request()
                    .map(|b| b.field_violations.into_iter().map(|v| (v.field, v.description)).collect())
                    .unwrap_or_else(|| vec![(String::new(), status.message().to_owned())]);
                return Ok(Pairing::UnknownPort(ports));
            }
            Err(status) => return Err(registry_error(status)),
        };
        Ok(Pairing::Known(if !r.compatible {
            Verdict::Incompatible { pointer: r.pointer, reason: r.reason }
        } else if r.checked_at_run_time {
            Verdict::Unchecked { pointer: r.pointer }
        } else {
            Verdict::Compatible
        }))
    }
}

/// What the registry says about a pair of ports.
#[derive(Debug, Clone)]
pub(crate) enum Pairing {
    /// Both ports exist; the verdict on their messages.
    Known(Verdict),
    /// A type (or version) the registry does not have.
    UnknownType,
    /// A port the type does not have: `(field, why)`, fields `from.port` or `to.port`.
    UnknownPort(Vec<(String, String)>),
}

/// `(type, version, port)` of an output and an input.
pub(crate) type PortPair = ((String, String, String), (String, String, String));

/// A port of a node, resolved for its configuration.
#[derive(Debug, Clone)]
pub(crate) struct PortInfo {
    pub(crate) name: String,
    pub(crate) schema: Value,
    pub(crate) required: bool,
    pub(crate) multiple: bool,
    /// Declared by a sub-design: the registry does not know it, so its compatibility is
    /// checked here against the sub-design's schema.
    pub(crate) local: bool,
}

impl PortInfo {
    fn of(port: &reg::Port) -> Self {
        Self {
            name: port.name.clone(),
            schema: port
                .schema
                .clone()
                .map(json::from_struct)
                .unwrap_or_else(|| Value::Object(Default::default())),
            required: port.required,
            multiple: port.multiple,
            local: false,
        }
    }
}

/// A component's declared behaviour on its ports, as the registry says it; `None` where it
/// declares none.
fn behaviour_of(behaviour: Option<&reg::PortBehaviour>) -> Option<csp_components::Behaviour> {
    use csp_components::{ReadMode, WriteMode};
    let b = behaviour?;
    let read = match reg::ReadMode::try_from(b.read).ok()? {
        reg::ReadMode::Unspecified => return None,
        reg::ReadMode::None => ReadMode::None,
        reg::ReadMode::One => ReadMode::One,
        reg::ReadMode::All => ReadMode::All,
        reg::ReadMode::Any => ReadMode::Any,
    };
    let write = match reg::WriteMode::try_from(b.write).ok()? {
        reg::WriteMode::Unspecified => return None,
        reg::WriteMode::None => WriteMode::None,
        reg::WriteMode::One => WriteMode::One,
        reg::WriteMode::AtMostOne => WriteMode::AtMostOne,
        reg::WriteMode::Many => WriteMode::Many,
    };
    Some(csp_components::Behaviour { read, write, buffers: b.buffers })
}

/// What validation learned about a node of a known type.
#[derive(Debug, Clone)]
pub(crate) struct NodeInfo {
    pub(crate) inputs: Vec<PortInfo>,
    pub(crate) outputs: Vec<PortInfo>,
    /// How it uses its ports, where its type declares it.
    pub(crate) behaviour: Option<csp_components::Behaviour>,
    /// The type id and version to ask the registry about the node's ports.
    pub(crate) type_ref: (String, String),
}

impl Designs {
    /// Validates a design's content. `design_id` is the design itself, so sub-designs calling
    /// back into it are found.
    pub(crate) async fn validate(
        &self,
        p: &csp_platform::auth::Principal,
        credentials: &Credentials,
        design_id: &str,
        document: &Document,
    ) -> Result<Vec<Finding>, Error> {
        let mut findings = Vec::new();
        if document.nodes.is_empty() {
            findings.push(Finding::warning("empty_design", "the design has no nodes; it does nothing"));
            return Ok(findings);
        }
        let infos = self.resolve(p, credentials, design_id, document, &mut findings).await?;
        self.connection_findings(credentials, document, &infos, &mut findings).await?;

        // 4. The graph.
        findings.extend(graph_findings(document, &infos));
        // 5. Deadlocks: the linear rules, then a small search where they cannot decide and
        //    nothing else is wrong.
        let search = !findings.iter().any(|f| f.severity == Severity::Error);
        findings.extend(self.deadlock_findings(document, &infos, search).await?);
        findings.sort_by(|a, b| {
            (a.severity, &a.node_id, &a.connection_id, a.code, &a.port, &a.message).cmp(&(
                b.severity,
                &b.node_id,
                &b.connection_id,
                b.code,
                &b.port,
                &b.message,
            ))
        });
        Ok(findings)
    }

    /// Each node's type (from the registry), configuration verdict and ports for that
    /// configuration; what is wrong with them goes to `findings`. Nodes whose type is unknown
    /// are left out.
    pub(crate) async fn resolve(
        &self,
        p: &csp_platform::auth::Principal,
        credentials: &Credentials,
        design_id: &str,
        document: &Document,
        findings: &mut Vec<Finding>,
    ) -> Result<BTreeMap<String, NodeInfo>, Error> {
        // 1. The types, once per (type, version).
        let wanted: BTreeSet<(String, String)> =
            document.nodes.values().map(|n| (n.type_id.clone(), n.type_version.clone())).collect();
        let types: HashMap<(String, String), Result<reg::ComponentType, String>> = stream::iter(wanted)
            .map(|key| async move {
                let found = self.registry.component_type(&key.0, &key.1, credentials).await?;
                Ok::<_, Error>((key, found))
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;

        // 2. Each node's configuration, and its ports for that configuration.
        let known: Vec<Node> = document
            .nodes
            .values()
            .filter(|n| types.get(&(n.type_id.clone(), n.type_version.clone())).is_some_and(Result::is_ok))
            .cloned()
            .collect();
        let verdicts: Vec<(String, reg::ValidateConfigResponse)> = stream::iter(known)
            .map(|node| async move {
                let verdict = self.registry.validate_config(&node, credentials).await?;
                Ok::<_, Error>((node.id, verdict))
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let verdicts: HashMap<String, reg::ValidateConfigResponse> = verdicts.into_iter().collect();

        let mut infos: BTreeMap<String, NodeInfo> = BTreeMap::new();
        for node in document.nodes.values() {
            let key = (node.type_id.clone(), node.type_version.clone());
            let spec = match types.get(&key) {
                Some(Ok(spec)) => spec,
                Some(Err(_)) | None => {
                    let what = if node.type_version.is_empty() {
                        format!("`{}`", node.type_id)
                    } else {
                        format!("`{}` version {}", node.type_id, node.type_version)
                    };
                    findings.push(
                        Finding::error(
                            "unknown_component_type",
                            format!("the registry has no component type {what}"),
                        )
                        .node(&node.id),
                    );
                    continue;
                }
            };
            if spec.deprecated {
                let why = if spec.deprecation_message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", spec.deprecation_message)
                };
                findings.push(
                    Finding::warning(
                        "deprecated_component_type",
                        format!("`{}` {} is deprecated{why}", spec.r#type, spec.version),
                    )
                    .node(&node.id),
                );
            }
            let Some(verdict) = verdicts.get(&node.id) else { continue };
            for v in &verdict.violations {
                let at = if v.pointer.is_empty() {
                    "the configuration".to_owned()
                } else {
                    format!("`{}`", v.pointer)
                };
                findings.push(
                    Finding::error("invalid_config", format!("{at} {}", v.message))
                        .node(&node.id)
                        .pointer(&v.pointer),
                );
            }
            let mut info = NodeInfo {
                inputs: verdict.inputs.iter().map(PortInfo::of).collect(),
                outputs: verdict.outputs.iter().map(PortInfo::of).collect(),
                behaviour: behaviour_of(spec.behaviour.as_ref()),
                type_ref: (spec.r#type.clone(), node.type_version.clone()),
            };
            if !verdict.valid && verdict.inputs.is_empty() && verdict.outputs.is_empty() {
                // Ports unknown for an invalid configuration: fall back to the declared ones.
                info.inputs = spec.inputs.iter().map(PortInfo::of).collect();
                info.outputs = spec.outputs.iter().map(PortInfo::of).collect();
            }
            if node.type_id == DESIGN_CALL && verdict.valid {
                self.sub_design(p, design_id, node, &mut info, findings).await?;
            }
            infos.insert(node.id.clone(), info);
        }
        Ok(infos)
    }

    /// 3. Connections: ports, then compatibility of each distinct pair of ports.
    async fn connection_findings(
        &self,
        credentials: &Credentials,
        document: &Document,
        infos: &BTreeMap<String, NodeInfo>,
        findings: &mut Vec<Finding>,
    ) -> Result<(), Error> {
        let mut pairs: BTreeSet<PortPair> = BTreeSet::new();
        let mut local: Vec<(&Connection, Value, Value)> = Vec::new();
        let mut checkable: Vec<(&Connection, PortPair)> = Vec::new();
        for c in document.connections.values() {
            let (Some(from), Some(to)) = (infos.get(&c.from.node_id), infos.get(&c.to.node_id)) else {
                continue;
            };
            let (Some(out), Some(input)) = (
                from.outputs.iter().find(|p| p.name == c.from.port),
                to.inputs.iter().find(|p| p.name == c.to.port),
            ) else {
                continue;
            };
            if out.local || input.local {
                local.push((c, out.schema.clone(), input.schema.clone()));
            } else {
                let pair = (
                    (from.type_ref.0.clone(), from.type_ref.1.clone(), out.name.clone()),
                    (to.type_ref.0.clone(), to.type_ref.1.clone(), input.name.clone()),
                );
                pairs.insert(pair.clone());
                checkable.push((c, pair));
            }
        }
        let compat: HashMap<PortPair, Pairing> = stream::iter(pairs)
            .map(|pair| async move {
                let verdict = self.registry.compatibility(&pair, credentials).await?;
                Ok::<_, Error>((pair, verdict))
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let mut verdicts: Vec<(&Connection, Verdict)> = checkable
            .into_iter()
            .filter_map(|(c, pair)| match compat.get(&pair) {
                Some(Pairing::Known(verdict)) => Some((c, verdict.clone())),
                _ => None,
            })
            .collect();
        verdicts.extend(local.into_iter().map(|(c, out, input)| (c, compat::check(&out, &input))));
        for (c, verdict) in verdicts {
            if let Verdict::Incompatible { pointer, reason } = verdict {
                findings.push(
                    Finding::error("port_type_mismatch", mismatch(c, &pointer, &reason))
                        .connection(&c.id)
                        .node(&c.to.node_id)
                        .port(&c.to.port)
                        .pointer(&pointer),
                );
            }
        }
        Ok(())
    }

    /// Resolves a `design.call` node's ports from the design it runs, and checks that the
    /// designs it reaches never call back into one another.
    async fn sub_design(
        &self,
        p: &csp_platform::auth::Principal,
        root: &str,
        node: &Node,
        info: &mut NodeInfo,
        findings: &mut Vec<Finding>,
    ) -> Result<(), Error> {
        let target = node.config.get("design_id").and_then(Value::as_str).unwrap_or_default().to_owned();
        let revision = node.config.get("revision").and_then(Value::as_i64).unwrap_or(0);
        let Some(called) = self.readable(p, &target, revision).await? else {
            findings.push(
                Finding::error("unknown_sub_design", format!("no design `{target}` (or you cannot read it)"))
                    .node(&node.id)
                    .pointer("/design_id"),
            );
            return Ok(());
        };
        let (inputs, outputs) = declared_ports(&called);
        info.inputs = inputs;
        info.outputs.splice(0..0, outputs);

        // Depth-first over the designs this one reaches, with the path that reached each.
        let mut stack: Vec<(Vec<String>, Document)> = vec![(vec![root.to_owned(), target], called)];
        let mut loads = 0;
        while let Some((path, document)) = stack.pop() {
            for callee in calls(&document) {
                if let Some(start) = path.iter().position(|id| *id == callee.0) {
                    let mut cycle = path[start..].to_vec();
                    cycle.push(callee.0.clone());
                    findings.push(
                        Finding::error(
                            "recursive_sub_design",
                            format!("sub-designs call each other in a loop: {}", cycle.join(" → ")),
                        )
                        .node(&node.id)
                        .pointer("/design_id"),
                    );
                    return Ok(());
                }
                if path.len() >= MAX_NESTING || loads >= 4 * MAX_NESTING {
                    findings.push(
                        Finding::error(
                            "recursive_sub_design",
                            format!(
                                "sub-designs nest deeper than {MAX_NESTING} levels: {}",
                                path.join(" → ")
                            ),
                        )
                        .node(&node.id)
                        .pointer("/design_id"),
                    );
                    return Ok(());
                }
                loads += 1;
                if let Some(next) = self.readable(p, &callee.0, callee.1).await? {
                    let mut longer = path.clone();
                    longer.push(callee.0);
                    stack.push((longer, next));
                }
            }
        }
        Ok(())
    }
}

/// Why a connection's output may send what its input refuses.
pub(crate) fn mismatch(c: &Connection, pointer: &str, reason: &str) -> String {
    let at = if pointer.is_empty() { String::new() } else { format!(" at `{pointer}`") };
    format!(
        "`{}.{}` may send messages `{}.{}` refuses{at}: {reason}",
        c.from.node_id, c.from.port, c.to.node_id, c.to.port
    )
}

/// The designs a design's `design.call` nodes run, with their pinned revisions.
fn calls(document: &Document) -> Vec<(String, i64)> {
    document
        .nodes
        .values()
        .filter(|n| n.type_id == DESIGN_CALL)
        .filter_map(|n| {
            let id = n.config.get("design_id").and_then(Value::as_str)?;
            Some((id.to_owned(), n.config.get("revision").and_then(Value::as_i64).unwrap_or(0)))
        })
        .collect()
}

/// A design's inputs (`source.input` nodes) and outputs (`sink.output` nodes), as the ports
/// of a `design.call` node running it: named by their `name` setting or their node id.
pub(crate) fn declared_ports(document: &Document) -> (Vec<PortInfo>, Vec<PortInfo>) {
    let port = |node: &Node, schema: Value, required: bool| PortInfo {
        name: node
            .config
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(&node.id)
            .to_owned(),
        schema,
        required,
        multiple: true,
        local: true,
    };
    let any = || Value::Object(Default::default());
    let inputs = document
        .nodes
        .values()
        .filter(|n| n.type_id == "source.input")
        .map(|n| port(n, n.config.get("schema").cloned().unwrap_or_else(any), false))
        .collect();
    let outputs = document
        .nodes
        .values()
        .filter(|n| n.type_id == "sink.output")
        .map(|n| port(n, any(), false))
        .collect();
    (inputs, outputs)
}

/// The checks that need only the graph and each node's resolved ports.
pub(crate) fn graph_findings(document: &Document, infos: &BTreeMap<String, NodeInfo>) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut seen_pairs: HashMap<(&str, &str, &str, &str), &str> = HashMap::new();
    let mut into_port: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for c in document.connections.values() {
        if c.from.node_id == c.to.node_id {
            findings.push(
                Finding::error(
                    "self_loop",
                    format!(
                        "`{}` sends to itself: once the channel is full it waits on itself forever",
                        c.from.node_id
                    ),
                )
                .connection(&c.id)
                .node(&c.from.node_id),
            );
        }
        let key = (c.from.node_id.as_str(), c.from.port.as_str(), c.to.node_id.as_str(), c.to.port.as_str());
        if let Some(first) = seen_pairs.get(&key) {
            findings.push(
                Finding::error(
                    "duplicate_connection",
                    format!(
                        "`{}.{}` → `{}.{}` is already connected by `{first}`: every message would arrive twice",
                        c.from.node_id, c.from.port, c.to.node_id, c.to.port
                    ),
                )
                .connection(&c.id)
                .node(&c.to.node_id)
                .port(&c.to.port),
            );
            continue;
        }
        seen_pairs.insert(key, &c.id);
        if let Some(from) = infos.get(&c.from.node_id)
            && !from.outputs.iter().any(|p| p.name == c.from.port)
        {
            findings.push(
                Finding::error(
                    "unknown_port",
                    format!(
                        "`{}` has no output `{}`; {}",
                        c.from.node_id,
                        c.from.port,
                        port_names("outputs", &from.outputs)
                    ),
                )
                .connection(&c.id)
                .node(&c.from.node_id)
                .port(&c.from.port),
            );
        }
        if let Some(to) = infos.get(&c.to.node_id) {
            if to.inputs.iter().any(|p| p.name == c.to.port) {
                into_port.entry((c.to.node_id.as_str(), c.to.port.as_str())).or_default().push(&c.id);
            } else {
                findings.push(
                    Finding::error(
                        "unknown_port",
                        format!(
                            "`{}` has no input `{}`; {}",
                            c.to.node_id,
                            c.to.port,
                            port_names("inputs", &to.inputs)
                        ),
                    )
                    .connection(&c.id)
                    .node(&c.to.node_id)
                    .port(&c.to.port),
                );
            }
        }
    }

    for (id, info) in infos {
        for port in &info.inputs {
            let connected = into_port.get(&(id.as_str(), port.name.as_str()));
            match connected {
                None if port.required => findings.push(
                    Finding::error(
                        "dangling_required_input",
                        format!("input `{}` of `{id}` is required but nothing is connected to it", port.name),
                    )
                    .node(id)
                    .port(&port.name),
                ),
                Some(ids) if ids.len() > 1 && !port.multiple => {
                    for extra in &ids[1..] {
                        findings.push(
                            Finding::error(
                                "too_many_connections",
                                format!(
                                    "input `{}` of `{id}` takes one connection; `{}` is already connected",
                                    port.name, ids[0]
                                ),
                            )
                            .connection(extra)
                            .node(id)
                            .port(&port.name),
                        );
                    }
                }
                _ => {}
            }
        }
    }

    findings.extend(unreachable(document, infos));
    findings
}

fn port_names(kind: &str, ports: &[PortInfo]) -> String {
    if ports.is_empty() {
        format!("it has no {kind}")
    } else {
        format!(
            "its {kind} are {}",
            ports.iter().map(|p| format!("`{}`", p.name)).collect::<Vec<_>>().join(", ")
        )
    }
}

/// Nodes no message can reach: not downstream of any node that produces messages on its own
/// (a node with no inputs).
fn unreachable(document: &Document, infos: &BTreeMap<String, NodeInfo>) -> Vec<Finding> {
    let mut downstream: HashMap<&str, Vec<&str>> = HashMap::new();
    for c in document.connections.values() {
        downstream.entry(c.from.node_id.as_str()).or_default().push(c.to.node_id.as_str());
    }
    let mut reached: BTreeSet<&str> = BTreeSet::new();
    let mut queue: Vec<&str> =
        infos.iter().filter(|(_, i)| i.inputs.is_empty()).map(|(id, _)| id.as_str()).collect();
    // Nodes of unknown types may be sources: do not blame what follows them.
    queue.extend(document.nodes.keys().filter(|id| !infos.contains_key(*id)).map(String::as_str));
    while let Some(id) = queue.pop() {
        if reached.insert(id) {
            queue.extend(downstream.get(id).into_iter().flatten().copied());
        }
    }
    infos
        .keys()
        .filter(|id| !reached.contains(id.as_str()))
        .map(|id| {
            Finding::warning(
                "unreachable_node",
                format!("no message can reach `{id}`: nothing upstream of it produces messages"),
            )
            .node(id)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{Meta, PortAddress, Position, Size};

    fn port(name: &str, required: bool) -> PortInfo {
        PortInfo { name: name.into(), schema: json!({}), required, multiple: false, local: false }
    }

    fn info(inputs: &[&str], outputs: &[&str]) -> NodeInfo {
        NodeInfo {
            inputs: inputs.iter().map(|n| port(n, true)).collect(),
            outputs: outputs.iter().map(|n| port(n, false)).collect(),
            behaviour: None,
            type_ref: ("t.t".into(), String::new()),
        }
    }

    fn doc(nodes: &[&str], connections: &[(&str, &str, &str, &str, &str)]) -> Document {
        let mut d = Document::new(Meta {
            name: "d".into(),
            description: String::new(),
            metadata: json!({}),
            canvas: json!({}),
            is_template: false,
        });
        for id in nodes {
            d.nodes.insert(
                (*id).into(),
                Node {
                    id: (*id).into(),
                    type_id: "t.t".into(),
                    type_version: String::new(),
                    label: String::new(),
                    config: json!({}),
                    position: Position::default(),
                    size: Size::default(),
                    style: json!({}),
                },
            );
        }
        for (id, from, out, to, input) in connections {
            d.connections.insert(
                (*id).into(),
                Connection {
                    id: (*id).into(),
                    from: PortAddress { node_id: (*from).into(), port: (*out).into() },
                    to: PortAddress { node_id: (*to).into(), port: (*input).into() },
                    capacity: 0,
                    style: json!({}),
                },
            );
        }
        d
    }

    fn codes(findings: &[Finding]) -> Vec<(&'static str, String, String)> {
        findings.iter().map(|f| (f.code, f.node_id.clone(), f.connection_id.clone())).collect()
    }

    #[test]
    fn a_clean_pipeline_has_no_findings() {
        let d = doc(&["a", "b", "c"], &[("c1", "a", "out", "b", "in"), ("c2", "b", "out", "c", "in")]);
        let infos = BTreeMap::from([
            ("a".to_owned(), info(&[], &["out"])),
            ("b".to_owned(), info(&["in"], &["out"])),
            ("c".to_owned(), info(&["in"], &[])),
        ]);
        assert!(graph_findings(&d, &infos).is_empty());
    }

    #[test]
    fn graph_mistakes_are_found() {
        let d = doc(
            &["a", "b", "c", "orphan"],
            &[
                ("c1", "a", "out", "b", "in"),
                ("c2", "a", "out", "b", "in"),
                ("c3", "b", "out", "b", "in"),
                ("c4", "a", "nope", "c", "in"),
            ],
        );
        let infos = BTreeMap::from([
            ("a".to_owned(), info(&[], &["out"])),
            ("b".to_owned(), info(&["in"], &["out"])),
            ("c".to_owned(), info(&["in", "side"], &[])),
            ("orphan".to_owned(), info(&["in"], &[])),
        ]);
        let found = codes(&graph_findings(&d, &infos));
        let expect = |code: &'static str, node: &str, connection: &str| {
            assert!(
                found.contains(&(code, node.to_owned(), connection.to_owned())),
                "{code} {node} {connection} missing from {found:?}"
            );
        };
        expect("duplicate_connection", "b", "c2");
        expect("self_loop", "b", "c3");
        expect("unknown_port", "a", "c4");
        expect("too_many_connections", "b", "c3");
        expect("dangling_required_input", "c", "");
        expect("dangling_required_input", "orphan", "");
        expect("unreachable_node", "orphan", "");
    }

    #[test]
    fn sub_design_ports_come_from_its_inputs_and_outputs() {
        let mut d = doc(&["in1", "out1"], &[]);
        d.nodes.get_mut("in1").unwrap().type_id = "source.input".into();
        d.nodes.get_mut("in1").unwrap().config = json!({ "name": "orders", "schema": { "type": "object" } });
        d.nodes.get_mut("out1").unwrap().type_id = "sink.output".into();
        let (inputs, outputs) = declared_ports(&d);
        assert_eq!(inputs[0].name, "orders");
        assert_eq!(inputs[0].schema, json!({ "type": "object" }));
        assert_eq!(outputs[0].name, "out1");
    }
}

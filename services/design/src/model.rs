//! The design document and the edits that change it, free of storage and gRPC.
//!
//! [`Document::apply`] checks an [`Op`] against the document and the limits, applies it, and
//! returns the *normalised* ops that were committed: ids filled in, and a node removal preceded
//! by the removals of its connections — so anyone replaying the ops (collaborators, old
//! revisions) needs no knowledge of the rules. [`diff`] compares two documents field by field;
//! [`ops_between`] computes the edits that turn one into the other (restoring a revision).

use std::collections::{BTreeMap, BTreeSet};

use csp_platform::{FieldViolation, config::DesignSettings};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A point on the canvas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    /// Horizontal.
    pub x: f64,
    /// Vertical.
    pub y: f64,
}

/// A node's box.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Size {
    /// Width.
    pub width: f64,
    /// Height.
    pub height: f64,
}

/// A process of the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Unique within the design.
    pub id: String,
    /// Component type id.
    #[serde(rename = "type")]
    pub type_id: String,
    /// Pinned version; empty means the latest.
    #[serde(default)]
    pub type_version: String,
    /// Label on the canvas.
    #[serde(default)]
    pub label: String,
    /// Configuration (a JSON object).
    #[serde(default = "empty_object")]
    pub config: Value,
    /// Where it sits.
    #[serde(default)]
    pub position: Position,
    /// How big it is.
    #[serde(default)]
    pub size: Size,
    /// Front-end style (a JSON object).
    #[serde(default = "empty_object")]
    pub style: Value,
}

/// A port of a node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortAddress {
    /// The node.
    pub node_id: String,
    /// The port.
    pub port: String,
}

/// A bounded channel between two ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connection {
    /// Unique within the design.
    pub id: String,
    /// Sending output port.
    pub from: PortAddress,
    /// Receiving input port.
    pub to: PortAddress,
    /// Capacity in messages; 0 means the default.
    #[serde(default)]
    pub capacity: i32,
    /// Front-end style (a JSON object).
    #[serde(default = "empty_object")]
    pub style: Value,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// Design-level fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Free-form metadata (a JSON object).
    #[serde(default = "empty_object")]
    pub metadata: Value,
    /// Canvas settings (a JSON object).
    #[serde(default = "empty_object")]
    pub canvas: Value,
    /// Whether others may instantiate it.
    #[serde(default)]
    pub is_template: bool,
}

/// A design's content at one revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// Design-level fields.
    pub meta: Meta,
    /// Nodes by id.
    pub nodes: BTreeMap<String, Node>,
    /// Connections by id.
    pub connections: BTreeMap<String, Connection>,
}

/// One edit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Add a node (an empty id is assigned).
    AddNode {
        /// The node.
        node: Node,
    },
    /// Change the fields that are set.
    UpdateNode {
        /// The node.
        node_id: String,
        /// New label.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        label: Option<String>,
        /// New configuration.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config: Option<Value>,
        /// New position.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        position: Option<Position>,
        /// New size.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<Size>,
        /// New style.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        style: Option<Value>,
        /// New pinned version.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        type_version: Option<String>,
    },
    /// Remove a node (its connections must be removed first; `apply` does that).
    RemoveNode {
        /// The node.
        node_id: String,
    },
    /// Add a connection (an empty id is assigned).
    AddConnection {
        /// The connection.
        connection: Connection,
    },
    /// Change a connection's capacity or style.
    UpdateConnection {
        /// The connection.
        connection_id: String,
        /// New capacity.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        capacity: Option<i32>,
        /// New style.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        style: Option<Value>,
    },
    /// Remove a connection.
    RemoveConnection {
        /// The connection.
        connection_id: String,
    },
    /// Change design-level fields that are set.
    UpdateDesign {
        /// New name.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// New description.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        /// New metadata.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata: Option<Value>,
        /// New canvas settings.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canvas: Option<Value>,
        /// New template flag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        is_template: Option<bool>,
    },
}

/// How deep free-form JSON (configuration, style, metadata) may nest: protobuf decoders refuse
/// deeper messages, so such a design could be stored but never read back.
pub const MAX_DEPTH: usize = 32;

fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Channel capacity limit of one connection.
pub const MAX_CAPACITY: i32 = 1_000_000;

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn valid_port(port: &str) -> bool {
    !port.is_empty() && port.len() <= 32 && port.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn valid_type(type_id: &str) -> bool {
    !type_id.is_empty()
        && type_id.len() <= 100
        && type_id.contains('.')
        && type_id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_'))
}

/// `field.rest`, or `rest` alone at the top level.
fn at(field: &str, rest: &str) -> String {
    if field.is_empty() { rest.to_owned() } else { format!("{field}.{rest}") }
}

/// A fresh id for a node or connection.
pub fn new_id(prefix: &str) -> String {
    let raw = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &raw[..12])
}

/// Limits and field paths for checking edits.
pub struct Rules<'a> {
    /// The configured limits.
    pub limits: &'a DesignSettings,
}

impl Rules<'_> {
    fn object(&self, value: &Value, field: &str, what: &str, v: &mut Vec<FieldViolation>) {
        if !value.is_object() {
            v.push(FieldViolation::new(field, format!("{what} must be a JSON object")));
        } else if depth(value) > MAX_DEPTH {
            v.push(FieldViolation::new(field, format!("must nest at most {MAX_DEPTH} levels deep")));
        } else if value.to_string().len() > self.limits.max_config_bytes {
            v.push(FieldViolation::new(
                field,
                format!("must be at most {} bytes as JSON", self.limits.max_config_bytes),
            ));
        }
    }

    fn text(&self, text: &str, field: &str, max: usize, v: &mut Vec<FieldViolation>) {
        if text.chars().count() > max {
            v.push(FieldViolation::new(field, format!("must be at most {max} characters")));
        }
        if text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            v.push(FieldViolation::new(field, "must not contain control characters"));
        }
    }

    fn finite(&self, numbers: &[f64], field: &str, v: &mut Vec<FieldViolation>) {
        if numbers.iter().any(|n| !n.is_finite() || n.abs() > 1e9) {
            v.push(FieldViolation::new(field, "must be finite numbers within ±1e9"));
        }
    }

    /// Checks a design name.
    pub fn name(&self, name: &str, field: &str, v: &mut Vec<FieldViolation>) {
        if name.trim().is_empty() {
            v.push(FieldViolation::new(field, "is required"));
        }
        self.text(name, field, self.limits.max_name_chars, v);
    }

    /// Checks design-level fields.
    pub fn meta(&self, meta: &Meta, field: &str, v: &mut Vec<FieldViolation>) {
        self.name(&meta.name, &format!("{field}name"), v);
        self.text(&meta.description, &format!("{field}description"), 10_000, v);
        self.object(&meta.metadata, &format!("{field}metadata"), "metadata", v);
        self.object(&meta.canvas, &format!("{field}canvas"), "canvas", v);
    }

    fn node(&self, node: &Node, field: &str, v: &mut Vec<FieldViolation>) {
        if !valid_id(&node.id) {
            v.push(FieldViolation::new(at(field, "id"), "must be 1 to 64 letters, digits, '_', '-' or '.'"));
        }
        if !valid_type(&node.type_id) {
            v.push(FieldViolation::new(
                at(field, "type"),
                "must be a component type id like `transform.map`",
            ));
        }
        if !node.type_version.is_empty() && semver::Version::parse(&node.type_version).is_err() {
            v.push(FieldViolation::new(at(field, "type_version"), "must be empty or a semantic version"));
        }
        self.text(&node.label, &at(field, "label"), 200, v);
        self.object(&node.config, &at(field, "config"), "configuration", v);
        self.object(&node.style, &at(field, "style"), "style", v);
        self.finite(&[node.position.x, node.position.y], &at(field, "position"), v);
        self.finite(&[node.size.width, node.size.height], &at(field, "size"), v);
    }

    fn connection(&self, c: &Connection, field: &str, v: &mut Vec<FieldViolation>) {
        if !valid_id(&c.id) {
            v.push(FieldViolation::new(at(field, "id"), "must be 1 to 64 letters, digits, '_', '-' or '.'"));
        }
        for (end, address) in [("from", &c.from), ("to", &c.to)] {
            if !valid_port(&address.port) {
                v.push(FieldViolation::new(
                    at(field, &format!("{end}.port")),
                    "must be a port name like `out`",
                ));
            }
            if address.node_id.is_empty() {
                v.push(FieldViolation::new(at(field, &format!("{end}.node_id")), "is required"));
            }
        }
        if !(0..=MAX_CAPACITY).contains(&c.capacity) {
            v.push(FieldViolation::new(
                at(field, "capacity"),
                format!("must be 0 (default) to {MAX_CAPACITY}"),
            ));
        }
        self.object(&c.style, &at(field, "style"), "style", v);
    }
}

impl Document {
    /// An empty design.
    pub fn new(meta: Meta) -> Self {
        Self { meta, nodes: BTreeMap::new(), connections: BTreeMap::new() }
    }

    /// Applies one edit, or says what is wrong with it. `field` is where the edit's payload sits
    /// in the request (`ops[2].add_node.node`, `update`, `document.nodes[3]`): violations name
    /// fields under it. On success the normalised ops are appended to `committed`.
    pub fn apply(
        &mut self,
        op: Op,
        rules: &Rules<'_>,
        field: &str,
        committed: &mut Vec<Op>,
    ) -> Result<(), Vec<FieldViolation>> {
        let mut v = Vec::new();
        match op {
            Op::AddNode { mut node } => {
                if node.id.is_empty() {
                    node.id = new_id("n");
                }
                rules.node(&node, field, &mut v);
                if self.nodes.contains_key(&node.id) {
                    v.push(FieldViolation::new(at(field, "id"), format!("a node `{}` exists", node.id)));
                }
                if self.nodes.len() >= rules.limits.max_nodes {
                    v.push(FieldViolation::new(
                        field,
                        format!("a design has at most {} nodes", rules.limits.max_nodes),
                    ));
                }
                if v.is_empty() {
                    self.nodes.insert(node.id.clone(), node.clone());
                    committed.push(Op::AddNode { node });
                }
            }
            Op::UpdateNode { node_id, label, config, position, size, style, type_version } => {
                let Some(current) = self.nodes.get(&node_id) else {
                    return Err(vec![FieldViolation::new(
                        at(field, "node_id"),
                        format!("no node `{node_id}`"),
                    )]);
                };
                let mut updated = current.clone();
                if let Some(label) = &label {
                    updated.label = label.clone();
                }
                if let Some(config) = &config {
                    updated.config = config.clone();
                }
                if let Some(position) = position {
                    updated.position = position;
                }
                if let Some(size) = size {
                    updated.size = size;
                }
                if let Some(style) = &style {
                    updated.style = style.clone();
                }
                if let Some(version) = &type_version {
                    updated.type_version = version.clone();
                }
                rules.node(&updated, field, &mut v);
                if v.is_empty() {
                    self.nodes.insert(node_id.clone(), updated);
                    committed.push(Op::UpdateNode {
                        node_id,
                        label,
                        config,
                        position,
                        size,
                        style,
                        type_version,
                    });
                }
            }
            Op::RemoveNode { node_id } => {
                if !self.nodes.contains_key(&node_id) {
                    return Err(vec![FieldViolation::new(
                        at(field, "node_id"),
                        format!("no node `{node_id}`"),
                    )]);
                }
                let attached: Vec<String> = self
                    .connections
                    .values()
                    .filter(|c| c.from.node_id == node_id || c.to.node_id == node_id)
                    .map(|c| c.id.clone())
                    .collect();
                for connection_id in attached {
                    self.connections.remove(&connection_id);
                    committed.push(Op::RemoveConnection { connection_id });
                }
                self.nodes.remove(&node_id);
                committed.push(Op::RemoveNode { node_id });
            }
            Op::AddConnection { mut connection } => {
                if connection.id.is_empty() {
                    connection.id = new_id("c");
                }
                rules.connection(&connection, field, &mut v);
                if self.connections.contains_key(&connection.id) {
                    v.push(FieldViolation::new(
                        at(field, "id"),
                        format!("a connection `{}` exists", connection.id),
                    ));
                }
                for (end, address) in [("from", &connection.from), ("to", &connection.to)] {
                    if !address.node_id.is_empty() && !self.nodes.contains_key(&address.node_id) {
                        v.push(FieldViolation::new(
                            at(field, &format!("{end}.node_id")),
                            format!("no node `{}`", address.node_id),
                        ));
                    }
                }
                if self.connections.len() >= rules.limits.max_connections {
                    v.push(FieldViolation::new(
                        field,
                        format!("a design has at most {} connections", rules.limits.max_connections),
                    ));
                }
                if v.is_empty() {
                    self.connections.insert(connection.id.clone(), connection.clone());
                    committed.push(Op::AddConnection { connection });
                }
            }
            Op::UpdateConnection { connection_id, capacity, style } => {
                let Some(current) = self.connections.get(&connection_id) else {
                    return Err(vec![FieldViolation::new(
                        at(field, "connection_id"),
                        format!("no connection `{connection_id}`"),
                    )]);
                };
                let mut updated = current.clone();
                if let Some(capacity) = capacity {
                    updated.capacity = capacity;
                }
                if let Some(style) = &style {
                    updated.style = style.clone();
                }
                rules.connection(&updated, field, &mut v);
                if v.is_empty() {
                    self.connections.insert(connection_id.clone(), updated);
                    committed.push(Op::UpdateConnection { connection_id, capacity, style });
                }
            }
            Op::RemoveConnection { connection_id } => {
                if self.connections.remove(&connection_id).is_none() {
                    return Err(vec![FieldViolation::new(
                        at(field, "connection_id"),
                        format!("no connection `{connection_id}`"),
                    )]);
                }
                committed.push(Op::RemoveConnection { connection_id });
            }
            Op::UpdateDesign { name, description, metadata, canvas, is_template } => {
                let mut meta = self.meta.clone();
                if let Some(name) = &name {
                    meta.name = name.clone();
                }
                if let Some(description) = &description {
                    meta.description = description.clone();
                }
                if let Some(metadata) = &metadata {
                    meta.metadata = metadata.clone();
                }
                if let Some(canvas) = &canvas {
                    meta.canvas = canvas.clone();
                }
                if let Some(is_template) = is_template {
                    meta.is_template = is_template;
                }
                rules.meta(
                    &meta,
                    &if field.is_empty() { String::new() } else { format!("{field}.") },
                    &mut v,
                );
                if v.is_empty() {
                    self.meta = meta;
                    committed.push(Op::UpdateDesign { name, description, metadata, canvas, is_template });
                }
            }
        }
        if v.is_empty() { Ok(()) } else { Err(v) }
    }

    /// Applies committed ops (from the revision log); they were checked when committed.
    /// Applies committed ops again (to rebuild an old revision). An op that no longer applies
    /// is an error: a revision rebuilt without it would be a design that never existed.
    pub fn replay(&mut self, ops: &[Op], limits: &DesignSettings) -> Result<(), String> {
        // Replays must not be refused by limits lowered since: check against generous ones.
        let generous = DesignSettings {
            max_nodes: usize::MAX,
            max_connections: usize::MAX,
            max_config_bytes: usize::MAX,
            max_name_chars: usize::MAX,
            ..limits.clone()
        };
        let rules = Rules { limits: &generous };
        let mut sink = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            self.apply(op.clone(), &rules, "", &mut sink)
                .map_err(|e| format!("op {i} no longer applies: {e:?}"))?;
        }
        Ok(())
    }
}

/// A short human summary of a batch of ops: "added 3 nodes, 2 connections; moved 1 node".
pub fn summarize(ops: &[Op]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for op in ops {
        let what = match op {
            Op::AddNode { .. } => "added node",
            Op::UpdateNode {
                config: None,
                label: None,
                style: None,
                type_version: None,
                position: Some(_),
                ..
            } => "moved node",
            Op::UpdateNode { .. } => "changed node",
            Op::RemoveNode { .. } => "removed node",
            Op::AddConnection { .. } => "added connection",
            Op::UpdateConnection { .. } => "changed connection",
            Op::RemoveConnection { .. } => "removed connection",
            Op::UpdateDesign { .. } => "changed design",
        };
        *counts.entry(what).or_default() += 1;
    }
    if counts.is_empty() {
        return "no changes".into();
    }
    counts
        .into_iter()
        .map(|(what, n)| match what {
            "changed design" => "changed the design's details".to_owned(),
            _ => {
                let (verb, noun) = what.split_once(' ').unwrap_or((what, ""));
                format!("{verb} {n} {noun}{}", if n == 1 { "" } else { "s" })
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One field that differs.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldChange {
    /// Path like `config.fields[0].path` or `position.x`.
    pub path: String,
    /// Before (None: absent).
    pub before: Option<Value>,
    /// After (None: absent).
    pub after: Option<Value>,
}

/// How an item differs.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<T> {
    /// Only in the later document.
    Added(T),
    /// Only in the earlier document.
    Removed(T),
    /// In both, different.
    Changed {
        /// Before.
        before: T,
        /// After.
        after: T,
        /// The differing fields.
        fields: Vec<FieldChange>,
    },
}

/// Everything that differs between two documents.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diff {
    /// Design-level fields.
    pub design: Vec<FieldChange>,
    /// Nodes by id.
    pub nodes: Vec<(String, Change<Node>)>,
    /// Connections by id.
    pub connections: Vec<(String, Change<Connection>)>,
}

fn field_changes(before: &Value, after: &Value, path: &str, out: &mut Vec<FieldChange>) {
    match (before, after) {
        (a, b) if a == b => {}
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => field_changes(x, y, &child, out),
                    (x, y) => out.push(FieldChange { path: child, before: x.cloned(), after: y.cloned() }),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                field_changes(x, y, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) => {
            out.push(FieldChange { path: path.to_owned(), before: Some(a.clone()), after: Some(b.clone()) })
        }
    }
}

fn as_json<T: Serialize>(item: &T) -> Value {
    serde_json::to_value(item).unwrap_or(Value::Null)
}

fn diff_maps<T: Clone + PartialEq + Serialize>(
    before: &BTreeMap<String, T>,
    after: &BTreeMap<String, T>,
) -> Vec<(String, Change<T>)> {
    let ids: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let mut out = Vec::new();
    for id in ids {
        match (before.get(id), after.get(id)) {
            (Some(a), Some(b)) if a != b => {
                let mut fields = Vec::new();
                field_changes(&as_json(a), &as_json(b), "", &mut fields);
                out.push((id.clone(), Change::Changed { before: a.clone(), after: b.clone(), fields }));
            }
            (None, Some(b)) => out.push((id.clone(), Change::Added(b.clone()))),
            (Some(a), None) => out.push((id.clone(), Change::Removed(a.clone()))),
            _ => {}
        }
    }
    out
}

/// What differs between two documents, field by field.
pub fn diff(before: &Document, after: &Document) -> Diff {
    let mut design = Vec::new();
    field_changes(&as_json(&before.meta), &as_json(&after.meta), "", &mut design);
    Diff {
        design,
        nodes: diff_maps(&before.nodes, &after.nodes),
        connections: diff_maps(&before.connections, &after.connections),
    }
}

/// Edits that turn `from` into `to` (restoring an old revision as a new one).
pub fn ops_between(from: &Document, to: &Document) -> Vec<Op> {
    let mut ops = Vec::new();
    // Connections that go, or whose endpoints moved (endpoints do not change in place).
    for (id, c) in &from.connections {
        match to.connections.get(id) {
            Some(target) if target.from == c.from && target.to == c.to => {}
            _ => ops.push(Op::RemoveConnection { connection_id: id.clone() }),
        }
    }
    let retyped = |id: &String| to.nodes.get(id).is_some_and(|t| t.type_id != from.nodes[id].type_id);
    for id in from.nodes.keys() {
        if !to.nodes.contains_key(id) || retyped(id) {
            ops.push(Op::RemoveNode { node_id: id.clone() });
        }
    }
    for (id, target) in &to.nodes {
        match from.nodes.get(id) {
            Some(current) if current.type_id == target.type_id => {
                if current != target {
                    ops.push(Op::UpdateNode {
                        node_id: id.clone(),
                        label: (current.label != target.label).then(|| target.label.clone()),
                        config: (current.config != target.config).then(|| target.config.clone()),
                        position: (current.position != target.position).then_some(target.position),
                        size: (current.size != target.size).then_some(target.size),
                        style: (current.style != target.style).then(|| target.style.clone()),
                        type_version: (current.type_version != target.type_version)
                            .then(|| target.type_version.clone()),
                    });
                }
            }
            _ => ops.push(Op::AddNode { node: target.clone() }),
        }
    }
    for (id, target) in &to.connections {
        match from.connections.get(id) {
            Some(current) if current.from == target.from && current.to == target.to => {
                if current != target {
                    ops.push(Op::UpdateConnection {
                        connection_id: id.clone(),
                        capacity: (current.capacity != target.capacity).then_some(target.capacity),
                        style: (current.style != target.style).then(|| target.style.clone()),
                    });
                }
            }
            _ => ops.push(Op::AddConnection { connection: target.clone() }),
        }
    }
    if from.meta != to.meta {
        let (a, b) = (&from.meta, &to.meta);
        ops.push(Op::UpdateDesign {
            name: (a.name != b.name).then(|| b.name.clone()),
            description: (a.description != b.description).then(|| b.description.clone()),
            metadata: (a.metadata != b.metadata).then(|| b.metadata.clone()),
            canvas: (a.canvas != b.canvas).then(|| b.canvas.clone()),
            is_template: (a.is_template != b.is_template).then_some(b.is_template),
        });
    }
    ops
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn limits() -> DesignSettings {
        DesignSettings { max_nodes: 3, ..DesignSettings::default() }
    }

    fn node(id: &str, type_id: &str) -> Node {
        Node {
            id: id.into(),
            type_id: type_id.into(),
            type_version: String::new(),
            label: String::new(),
            config: json!({}),
            position: Position::default(),
            size: Size::default(),
            style: json!({}),
        }
    }

    fn connection(id: &str, from: &str, to: &str) -> Connection {
        Connection {
            id: id.into(),
            from: PortAddress { node_id: from.into(), port: "out".into() },
            to: PortAddress { node_id: to.into(), port: "in".into() },
            capacity: 0,
            style: json!({}),
        }
    }

    fn doc() -> Document {
        Document::new(Meta {
            name: "d".into(),
            description: String::new(),
            metadata: json!({}),
            canvas: json!({}),
            is_template: false,
        })
    }

    #[test]
    fn removing_a_node_removes_its_connections_explicitly() {
        let limits = limits();
        let rules = Rules { limits: &limits };
        let mut d = doc();
        let mut committed = Vec::new();
        for op in [
            Op::AddNode { node: node("a", "source.constant") },
            Op::AddNode { node: node("b", "sink.log") },
            Op::AddConnection { connection: connection("c1", "a", "b") },
            Op::RemoveNode { node_id: "a".into() },
        ] {
            d.apply(op, &rules, "ops", &mut committed).unwrap();
        }
        assert!(d.connections.is_empty());
        assert_eq!(committed[3], Op::RemoveConnection { connection_id: "c1".into() });
        assert_eq!(committed[4], Op::RemoveNode { node_id: "a".into() });
    }

    #[test]
    fn bad_edits_name_their_fields() {
        let limits = limits();
        let rules = Rules { limits: &limits };
        let mut d = doc();
        let mut committed = Vec::new();
        let err = d
            .apply(
                Op::AddConnection { connection: connection("c", "x", "y") },
                &rules,
                "ops[0].add_connection.connection",
                &mut committed,
            )
            .unwrap_err();
        assert_eq!(err[0].field, "ops[0].add_connection.connection.from.node_id");
        let mut bad = node("a b", "Transform");
        bad.config = json!([1]);
        let fields: Vec<String> = d
            .apply(Op::AddNode { node: bad }, &rules, "node", &mut committed)
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["node.id", "node.type", "node.config"]);
        for id in ["n1", "n2", "n3"] {
            d.apply(Op::AddNode { node: node(id, "sink.log") }, &rules, "x", &mut committed).unwrap();
        }
        let err =
            d.apply(Op::AddNode { node: node("n4", "sink.log") }, &rules, "x", &mut committed).unwrap_err();
        assert!(err[0].description.contains("at most 3 nodes"));
    }

    #[test]
    fn ops_between_restores_exactly() {
        let limits = DesignSettings::default();
        let rules = Rules { limits: &limits };
        let mut old = doc();
        let mut sink = Vec::new();
        for op in [
            Op::AddNode { node: node("a", "source.constant") },
            Op::AddNode { node: node("b", "sink.log") },
            Op::AddConnection { connection: connection("c1", "a", "b") },
        ] {
            old.apply(op, &rules, "", &mut sink).unwrap();
        }
        let mut new = old.clone();
        let mut moved = node("b", "sink.log");
        moved.position = Position { x: 5.0, y: 6.0 };
        new.nodes.insert("b".into(), moved);
        new.nodes.insert("a".into(), node("a", "source.sequence"));
        new.connections.clear();
        new.nodes.insert("z".into(), node("z", "transform.map"));
        new.meta.name = "renamed".into();

        let mut restored = new.clone();
        let ops = ops_between(&new, &old);
        let mut committed = Vec::new();
        for op in ops {
            restored.apply(op, &rules, "", &mut committed).unwrap();
        }
        assert_eq!(restored, old);
        assert!(ops_between(&old, &old).is_empty());
    }

    #[test]
    fn diffs_are_field_by_field() {
        let mut a = doc();
        a.nodes.insert(
            "n".into(),
            Node { config: json!({ "fields": [{ "path": "x" }] }), ..node("n", "transform.set") },
        );
        let mut b = a.clone();
        b.nodes.get_mut("n").unwrap().config = json!({ "fields": [{ "path": "y" }] });
        b.nodes.get_mut("n").unwrap().position.x = 3.0;
        b.meta.name = "other".into();
        let d = diff(&a, &b);
        assert_eq!(d.design[0].path, "name");
        let Change::Changed { fields, .. } = &d.nodes[0].1 else { panic!() };
        let paths: Vec<&str> = fields.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["config.fields[0].path", "position.x"]);
    }

    #[test]
    fn summaries_count_what_happened() {
        let ops = vec![
            Op::AddNode { node: node("a", "sink.log") },
            Op::AddNode { node: node("b", "sink.log") },
            Op::UpdateNode {
                node_id: "a".into(),
                label: None,
                config: None,
                position: Some(Position::default()),
                size: None,
                style: None,
                type_version: None,
            },
        ];
        assert_eq!(summarize(&ops), "added 2 nodes, moved 1 node");
    }
}

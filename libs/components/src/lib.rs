//! The built-in component types, defined once for the registry and the executor.
//!
//! Each [`ComponentSpec`] says what a node of that type is: its id (e.g. `transform.map`),
//! version, category, ports with the JSON Schema of their messages, configuration schema with
//! defaults, documented examples, and its [`Behaviour`] on its ports (what the deadlock checker
//! models). [`builtins`] lists them all; the registry seeds them at start-up, and the executor
//! runs the same ids, so the two cannot disagree.
//!
//! Configuration checks go beyond JSON Schema where a type needs it ([`validate_config`]): jq
//! expressions compile, templates parse, embedded schemas are valid, port names are unique.
//! Some types name their ports in their configuration (`control.switch` cases, `control.join`
//! inputs, `control.alt` inputs): [`ports_for`] resolves them.

use std::{collections::BTreeMap, sync::OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;

mod catalog;
pub mod compat;
pub mod deadlock;
pub mod jq;
pub mod schema;

pub use schema::Violation;

/// Palette category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    /// Produces messages.
    Source,
    /// Consumes messages.
    Sink,
    /// Reshapes messages.
    Transform,
    /// Checks messages.
    Validate,
    /// Counts and summarises messages.
    Metrics,
    /// Calls AI models.
    Ai,
    /// Calls remote components.
    Remote,
    /// Routes messages.
    Control,
}

impl Category {
    /// Every category, in palette order.
    pub const ALL: [Category; 8] = [
        Category::Source,
        Category::Transform,
        Category::Control,
        Category::Validate,
        Category::Metrics,
        Category::Ai,
        Category::Remote,
        Category::Sink,
    ];

    /// Lower-case name: the prefix of built-in type ids in this category.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Source => "source",
            Category::Sink => "sink",
            Category::Transform => "transform",
            Category::Validate => "validate",
            Category::Metrics => "metrics",
            Category::Ai => "ai",
            Category::Remote => "remote",
            Category::Control => "control",
        }
    }

    /// Name shown in the palette.
    pub fn display_name(self) -> &'static str {
        match self {
            Category::Source => "Sources",
            Category::Sink => "Sinks",
            Category::Transform => "Transforms",
            Category::Validate => "Validation",
            Category::Metrics => "Metrics",
            Category::Ai => "AI",
            Category::Remote => "Remote",
            Category::Control => "Control flow",
        }
    }

    /// What components of the category do.
    pub fn description(self) -> &'static str {
        match self {
            Category::Source => "Produce messages: the execution's inputs, constants, sequences.",
            Category::Sink => "Consume messages: the execution's outputs, logs.",
            Category::Transform => "Reshape messages: set fields, jq map, filter and reduce, templates.",
            Category::Validate => "Check messages against a JSON Schema.",
            Category::Metrics => "Count and summarise messages.",
            Category::Ai => "Call AI models: chat, analysis, agents with tools, code generation.",
            Category::Remote => "Call components served by remote gRPC endpoints.",
            Category::Control => {
                "Route messages: switch, split, join, merge, alt, batch, delay, sub-designs."
            }
        }
    }
}

/// How a component takes messages from its inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadMode {
    /// Reads nothing (sources).
    None,
    /// Reads one message at a time.
    One,
    /// Reads one message from each input, then acts (join).
    All,
    /// Reads from whichever input is ready first (merge, alt).
    Any,
}

/// What a component writes per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// Nothing (sinks).
    None,
    /// Exactly one message, to one output.
    One,
    /// Zero or one message (filter, switch).
    AtMostOne,
    /// Any number (split, sequence).
    Many,
}

/// A component's behaviour on its ports, for static analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Behaviour {
    /// How inputs are read.
    pub read: ReadMode,
    /// What is written per step.
    pub write: WriteMode,
    /// Whether messages are held internally before writing (batch, reduce, stats).
    pub buffers: bool,
}

/// A port of a component.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Name, unique among the inputs (or outputs).
    pub name: String,
    /// What flows through it.
    pub description: String,
    /// JSON Schema of its messages; `{}` accepts anything.
    pub schema: Value,
    /// For inputs: the design is invalid while it is unconnected.
    pub required: bool,
    /// Whether it takes several connections.
    pub multiple: bool,
}

impl PortSpec {
    /// An input port.
    pub fn input(name: &str, description: &str, schema: Value, required: bool, multiple: bool) -> Self {
        Self { name: name.into(), description: description.into(), schema, required, multiple }
    }

    /// An output port (outputs may always fan out).
    pub fn output(name: &str, description: &str, schema: Value) -> Self {
        Self { name: name.into(), description: description.into(), schema, required: false, multiple: true }
    }
}

/// A documented configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExampleSpec {
    /// Short title.
    pub title: String,
    /// What it does.
    pub description: String,
    /// A configuration that validates.
    pub config: Value,
    /// A sample input, when meaningful.
    pub input: Option<Value>,
    /// What the sample input produces, when meaningful.
    pub output: Option<Value>,
}

/// A component type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentSpec {
    /// Type id, e.g. `transform.map`.
    pub type_id: String,
    /// Semantic version.
    pub version: String,
    /// Palette category.
    pub category: Category,
    /// Name shown in the palette.
    pub display_name: String,
    /// What it does.
    pub description: String,
    /// Icon name.
    pub icon: String,
    /// Input ports (beyond those the configuration names, see [`ports_for`]).
    pub inputs: Vec<PortSpec>,
    /// Output ports (beyond those the configuration names).
    pub outputs: Vec<PortSpec>,
    /// Whether the configuration names further ports.
    pub dynamic_ports: bool,
    /// JSON Schema of the configuration, with defaults.
    pub config_schema: Value,
    /// Documented configurations.
    pub examples: Vec<ExampleSpec>,
    /// Behaviour on the ports; `None` where a registered component declares none (the
    /// deadlock check then assumes the worst).
    #[serde(default)]
    pub behaviour: Option<Behaviour>,
    /// Search tags.
    pub tags: Vec<String>,
}

/// Every built-in type, by type id.
pub fn builtins() -> &'static BTreeMap<String, ComponentSpec> {
    static BUILTINS: OnceLock<BTreeMap<String, ComponentSpec>> = OnceLock::new();
    BUILTINS.get_or_init(|| catalog::all().into_iter().map(|spec| (spec.type_id.clone(), spec)).collect())
}

/// The built-in type with this id.
pub fn builtin(type_id: &str) -> Option<&'static ComponentSpec> {
    builtins().get(type_id)
}

/// Whether a type id is taken by, or in the namespace of, the built-in types (custom types
/// use their own namespace, e.g. `acme.sentiment`).
pub fn is_reserved(type_id: &str) -> bool {
    let namespace = type_id.split('.').next().unwrap_or_default();
    builtin(type_id).is_some()
        || Category::ALL.iter().any(|c| c.as_str() == namespace)
        || namespace == "design"
}

/// Checks a configuration against a type: its JSON Schema, then the type's own rules. Returns
/// the configuration with schema defaults filled in.
pub fn validate_config(spec: &ComponentSpec, config: &Value) -> Result<Value, Vec<Violation>> {
    let effective = schema::validate(&spec.config_schema, config)?;
    let mut violations = Vec::new();
    if builtin(&spec.type_id).is_some_and(|b| b.version == spec.version) {
        catalog::check(&spec.type_id, &effective, &mut violations);
    }
    if violations.is_empty() { Ok(effective) } else { Err(violations) }
}

/// The ports of a node of this type with this (valid, effective) configuration.
pub fn ports_for(spec: &ComponentSpec, config: &Value) -> (Vec<PortSpec>, Vec<PortSpec>) {
    let mut inputs = spec.inputs.clone();
    let mut outputs = spec.outputs.clone();
    if spec.dynamic_ports {
        catalog::dynamic_ports(&spec.type_id, config, &mut inputs, &mut outputs);
    }
    (inputs, outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_design_type_is_built_in() {
        let expected = [
            "source.input",
            "source.constant",
            "source.sequence",
            "sink.output",
            "sink.log",
            "transform.set",
            "transform.map",
            "transform.filter",
            "transform.reduce",
            "transform.template",
            "control.switch",
            "control.split",
            "control.join",
            "control.merge",
            "control.alt",
            "control.batch",
            "control.delay",
            "validate.json_schema",
            "metrics.counter",
            "metrics.stats",
            "ai.chat",
            "ai.analyze",
            "ai.agent",
            "ai.codegen",
            "remote.call",
            "design.call",
        ];
        let ids: Vec<&str> = builtins().keys().map(String::as_str).collect();
        for id in expected {
            assert!(ids.contains(&id), "{id} missing");
        }
        assert_eq!(ids.len(), expected.len());
    }

    #[test]
    fn specs_are_well_formed() {
        for spec in builtins().values() {
            assert!(semver::Version::parse(&spec.version).is_ok(), "{}", spec.type_id);
            assert!(
                jsonschema::meta::validate(&spec.config_schema).is_ok(),
                "{} config schema",
                spec.type_id
            );
            for port in spec.inputs.iter().chain(&spec.outputs) {
                assert!(
                    jsonschema::meta::validate(&port.schema).is_ok(),
                    "{}.{} schema",
                    spec.type_id,
                    port.name
                );
            }
            assert!(!spec.examples.is_empty(), "{} has no example", spec.type_id);
            for example in &spec.examples {
                if let Err(v) = validate_config(spec, &example.config) {
                    panic!("{} example `{}` is invalid: {v:?}", spec.type_id, example.title);
                }
            }
            let prefix = spec.type_id.split('.').next().unwrap_or_default();
            assert!(prefix == spec.category.as_str() || spec.type_id == "design.call", "{}", spec.type_id);
            assert!(is_reserved(&spec.type_id));
        }
        assert!(!is_reserved("acme.sentiment"));
        assert!(is_reserved("transform.shiny"), "built-in namespaces are reserved");
    }
}

/// The unit tests count allocations as the `csp` binary does, so jq's memory bound is tested.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: csp_alloc::Counting<std::alloc::System> = csp_alloc::Counting(std::alloc::System);

//! Tools: their checks, and running the ones served at a remote endpoint for the agent loop
//! (`run_tools`): one `csp.component.v1.ComponentRuntime.Process` call per tool call — the
//! arguments go in on port `in`, the output comes back as the result.

use std::time::Duration;

use csp_platform::FieldViolation;
use serde_json::{Value, json};

use crate::model::{ToolCall, ToolSpec};

/// A tool as a request names it, with where it runs when the service runs it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tool {
    pub(crate) spec: ToolSpec,
    /// A component type; it runs in the executor's `ai.agent`, not here.
    pub(crate) component_type: String,
    pub(crate) config: Value,
    /// A `ComponentRuntime` endpoint the service calls.
    pub(crate) remote_address: String,
}

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Checks tools; `parameters` defaults to an object with no properties.
pub(crate) fn check(tools: &mut [Tool], run: bool, v: &mut Vec<FieldViolation>) {
    let mut names = std::collections::HashSet::new();
    for (i, tool) in tools.iter_mut().enumerate() {
        let at = |field: &str| format!("tools[{i}].{field}");
        if !name_ok(&tool.spec.name) {
            v.push(FieldViolation::new(at("name"), "must be 1 to 64 letters, digits, '_' or '-'"));
        } else if !names.insert(tool.spec.name.clone()) {
            v.push(FieldViolation::new(at("name"), "is used by another tool"));
        }
        if tool.spec.description.chars().count() > 2000 {
            v.push(FieldViolation::new(at("description"), "must be at most 2000 characters"));
        }
        if tool.spec.parameters.is_null() {
            tool.spec.parameters = json!({ "type": "object", "properties": {} });
        }
        let parameters = &tool.spec.parameters;
        if parameters.get("type") != Some(&json!("object")) {
            v.push(FieldViolation::new(
                at("parameters"),
                "must be a JSON Schema of an object (\"type\": \"object\")",
            ));
        } else if parameters.to_string().len() > 64 * 1024 {
            v.push(FieldViolation::new(at("parameters"), "must be at most 64 KiB as JSON"));
        } else if let Err(e) = jsonschema::meta::validate(parameters) {
            v.push(FieldViolation::new(
                at("parameters"),
                format!("is not a valid JSON Schema: {}", clip(&e.to_string())),
            ));
        }
        if run {
            if !tool.component_type.is_empty() {
                v.push(FieldViolation::new(
                    at("component_type"),
                    "component tools run in a design's ai.agent node; run_tools here needs a remote_address",
                ));
            } else if tool.remote_address.is_empty() {
                v.push(FieldViolation::new(at("remote_address"), "is required to run the tool (run_tools)"));
            } else if url::Url::parse(&tool.remote_address)
                .map(|u| !matches!(u.scheme(), "http" | "https"))
                .unwrap_or(true)
            {
                v.push(FieldViolation::new(
                    at("remote_address"),
                    "must be an http(s) URL of a ComponentRuntime endpoint",
                ));
            }
        }
    }
}

fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

/// Runs one tool call at its endpoint; the result (or what went wrong) as text for the model.
pub(crate) async fn run(tool: &Tool, call: &ToolCall, timeout: Duration) -> String {
    let Ok(arguments) = serde_json::from_str::<Value>(&call.arguments) else {
        return json!({ "error": "the arguments are not JSON" }).to_string();
    };
    match csp_platform::component::call_once(
        &tool.remote_address,
        &tool.spec.name,
        &tool.config,
        arguments,
        timeout,
    )
    .await
    {
        Ok(mut outputs) if outputs.len() == 1 => outputs.remove(0).to_string(),
        Ok(outputs) if outputs.is_empty() => json!({ "error": "the tool sent no result" }).to_string(),
        Ok(outputs) => Value::Array(outputs).to_string(),
        Err(error) => json!({ "error": error }).to_string(),
    }
}

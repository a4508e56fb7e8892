//! Tools: their checks, and running the ones served at a remote endpoint for the agent loop
//! (`run_tools`): one `csp.component.v1.ComponentRuntime.Process` call per tool call — the
//! arguments go in on port `in`, the first output comes back as the result.

use std::time::Duration;

use csp_platform::FieldViolation;
use csp_proto::{
    component::v1::{self as pb, component_runtime_client::ComponentRuntimeClient},
    json as pbjson,
};
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
    match tokio::time::timeout(timeout, call_remote(tool, call)).await {
        Ok(Ok(result)) => result.to_string(),
        Ok(Err(error)) => json!({ "error": error }).to_string(),
        Err(_) => {
            json!({ "error": format!("the tool did not answer within {} s", timeout.as_secs()) }).to_string()
        }
    }
}

async fn call_remote(tool: &Tool, call: &ToolCall) -> Result<Value, String> {
    let arguments: Value =
        serde_json::from_str(&call.arguments).map_err(|_| "the arguments are not JSON".to_owned())?;
    let channel = tonic::transport::Endpoint::from_shared(tool.remote_address.clone())
        .map_err(|_| "the tool's address is not valid".to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("cannot reach the tool: {}", clip(&e.to_string())))?;
    let requests = vec![
        pb::ProcessRequest {
            kind: Some(pb::process_request::Kind::Start(pb::Start {
                execution_id: String::new(),
                node_id: tool.spec.name.clone(),
                config: Some(pbjson::to_struct(if tool.config.is_object() {
                    tool.config.clone()
                } else {
                    json!({})
                })),
                traceparent: String::new(),
            })),
        },
        pb::ProcessRequest {
            kind: Some(pb::process_request::Kind::Message(pb::Message {
                port: "in".into(),
                payload: Some(pbjson::to_value(arguments)),
                sequence: 1,
            })),
        },
        pb::ProcessRequest {
            kind: Some(pb::process_request::Kind::InputClosed(pb::InputClosed { port: "in".into() })),
        },
    ];
    let mut responses = ComponentRuntimeClient::new(channel)
        .process(futures::stream::iter(requests))
        .await
        .map_err(|s| format!("the tool failed: {}", clip(s.message())))?
        .into_inner();
    let mut first = None;
    while let Some(response) =
        responses.message().await.map_err(|s| format!("the tool failed: {}", clip(s.message())))?
    {
        match response.kind {
            Some(pb::process_response::Kind::Message(m)) if first.is_none() => {
                first = Some(m.payload.map(pbjson::from_value).unwrap_or(Value::Null));
            }
            Some(pb::process_response::Kind::Error(e)) => return Err(clip(&e.message)),
            Some(pb::process_response::Kind::Done(_)) => break,
            _ => {}
        }
    }
    first.ok_or_else(|| "the tool sent no result".to_owned())
}

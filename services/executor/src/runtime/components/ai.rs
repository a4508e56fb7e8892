//! `ai.chat`, `ai.analyze`, `ai.agent`, `ai.codegen`: calls to the AI service.

use std::sync::Arc;

use csp_proto::{ai::v1 as pb, json as pbjson};
use serde_json::{Value, json};

use super::{AsyncTransform, Emit, paths::Path, text, transforms::template_context};
use crate::runtime::channel::Msg;

/// A failed call: what went wrong and whether trying again may help.
pub type AiError = (String, bool);

/// The AI service, as the components use it.
#[tonic::async_trait]
pub trait Ai: Send + Sync {
    /// A chat turn (with tools run by the service when asked).
    async fn chat(&self, request: pb::ChatRequest) -> Result<pb::ChatResponse, AiError>;
    /// A structured analysis of a text.
    async fn analyze(&self, request: pb::AnalyzeRequest) -> Result<pb::AnalyzeResponse, AiError>;
    /// Code for a specification.
    async fn generate_code(
        &self,
        request: pb::GenerateCodeRequest,
    ) -> Result<pb::GenerateCodeResponse, AiError>;
}

fn usage(usage: Option<pb::Usage>) -> Value {
    usage.map_or(Value::Null, |u| {
        json!({
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
            "cost_usd": u.cost_usd,
        })
    })
}

fn message(role: pb::MessageRole, content: String) -> pb::ChatMessage {
    pb::ChatMessage { role: role as i32, content, ..Default::default() }
}

/// One AI node.
pub(crate) struct AiNode {
    type_id: String,
    node_id: String,
    config: Value,
    prompt: Option<minijinja::Environment<'static>>,
    ai: Option<Arc<dyn Ai>>,
    out: usize,
}

impl AiNode {
    pub(crate) fn new(
        type_id: &str,
        config: &Value,
        node_id: &str,
        ai: Option<Arc<dyn Ai>>,
        out: usize,
    ) -> Self {
        let prompt = text(config, "prompt_template").and_then(|source| {
            let mut env = minijinja::Environment::new();
            env.add_template_owned("prompt", source.to_owned()).ok()?;
            Some(env)
        });
        Self {
            type_id: type_id.to_owned(),
            node_id: node_id.to_owned(),
            config: config.clone(),
            prompt,
            ai,
            out,
        }
    }

    fn string(&self, key: &str) -> String {
        text(&self.config, key).unwrap_or_default().to_owned()
    }

    fn user_text(&self, msg: &Value) -> Result<String, (String, bool)> {
        match &self.prompt {
            Some(env) => env
                .get_template("prompt")
                .and_then(|t| t.render(minijinja::value::Serde(template_context(msg))))
                .map_err(|e| (format!("the prompt template failed: {e}"), false)),
            None => Ok(match msg {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            }),
        }
    }

    async fn call(&self, ai: &dyn Ai, msg: &Value) -> Result<Value, AiError> {
        let provider = self.string("provider");
        let model = self.string("model");
        match self.type_id.as_str() {
            "ai.chat" => {
                let mut messages = Vec::new();
                let system = self.string("system");
                if !system.is_empty() {
                    messages.push(message(pb::MessageRole::System, system));
                }
                messages.push(message(pb::MessageRole::User, self.user_text(msg)?));
                let reply = ai.chat(self.chat_request(provider, model, messages, Vec::new())).await?;
                let text = reply.message.map(|m| m.content).unwrap_or_default();
                Ok(json!({ "text": text, "model": reply.model, "usage": usage(reply.usage) }))
            }
            "ai.agent" => self.agent(ai, msg, provider, model).await,
            "ai.analyze" => {
                let subject = match text(&self.config, "path") {
                    Some(path) => Path::parse(path).get(msg).cloned().unwrap_or(Value::Null),
                    None => msg.clone(),
                };
                let text = match subject {
                    Value::String(s) => s,
                    Value::Null => return Err(("there is no text to analyse".into(), false)),
                    other => other.to_string(),
                };
                let kinds = self
                    .config
                    .get("kinds")
                    .and_then(Value::as_array)
                    .map(|kinds| {
                        kinds
                            .iter()
                            .filter_map(Value::as_str)
                            .filter_map(|k| {
                                pb::AnalysisKind::from_str_name(&format!(
                                    "ANALYSIS_KIND_{}",
                                    k.to_uppercase()
                                ))
                            })
                            .map(|k| k as i32)
                            .collect()
                    })
                    .unwrap_or_default();
                let labels = self
                    .config
                    .get("labels")
                    .and_then(Value::as_array)
                    .map(|l| l.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                    .unwrap_or_default();
                let reply = ai
                    .analyze(pb::AnalyzeRequest {
                        text,
                        kinds,
                        labels,
                        provider,
                        model,
                        node_id: self.node_id.clone(),
                        ..Default::default()
                    })
                    .await?;
                let analysis = reply.result.map(pbjson::from_struct).unwrap_or(Value::Null);
                let mut out = match msg {
                    Value::Object(map) => Value::Object(map.clone()),
                    other => json!({ "message": other }),
                };
                out["analysis"] = analysis;
                Ok(out)
            }
            _ => {
                let spec = match msg {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let request = pb::GenerateCodeRequest {
                    spec,
                    language: self.string("language"),
                    provider,
                    model,
                    node_id: self.node_id.clone(),
                    ..Default::default()
                };
                let reply = ai.generate_code(request).await?;
                let include_tests = self.config.get("include_tests").and_then(Value::as_bool).unwrap_or(true);
                Ok(json!({
                    "code": reply.code,
                    "tests": if include_tests { Value::String(reply.tests) } else { Value::Null },
                    "documentation": reply.documentation,
                    "usage": usage(reply.usage),
                }))
            }
        }
    }
}

/// A tool of an agent, and where it runs.
struct AgentTool {
    spec: pb::Tool,
    component_type: String,
    config: Value,
    remote_address: String,
}

impl AiNode {
    fn chat_request(
        &self,
        provider: String,
        model: String,
        messages: Vec<pb::ChatMessage>,
        tools: Vec<pb::Tool>,
    ) -> pb::ChatRequest {
        pb::ChatRequest {
            provider,
            model,
            messages,
            tools,
            temperature: self.config.get("temperature").and_then(Value::as_f64),
            max_tokens: self.config.get("max_tokens").and_then(Value::as_i64).unwrap_or(0) as i32,
            node_id: self.node_id.clone(),
            ..Default::default()
        }
    }

    fn tools(&self) -> Vec<AgentTool> {
        self.config
            .get("tools")
            .and_then(Value::as_array)
            .map(|tools| {
                tools
                    .iter()
                    .map(|t| AgentTool {
                        spec: pb::Tool {
                            name: text(t, "name").unwrap_or_default().into(),
                            description: text(t, "description").unwrap_or_default().into(),
                            parameters: t.get("parameters").cloned().map(pbjson::to_struct),
                            ..Default::default()
                        },
                        component_type: text(t, "component_type").unwrap_or_default().into(),
                        config: t.get("component_config").cloned().unwrap_or_else(|| json!({})),
                        remote_address: text(t, "remote_address").unwrap_or_default().into(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The agent loop: the model is offered the tools; each tool it calls runs here (a
    /// built-in component, or a remote one at its address) and its result goes back, until the
    /// model answers without tools or `max_steps` calls were made.
    async fn agent(
        &self,
        ai: &dyn Ai,
        msg: &Value,
        provider: String,
        model: String,
    ) -> Result<Value, AiError> {
        let tools = self.tools();
        let specs: Vec<pb::Tool> = tools.iter().map(|t| t.spec.clone()).collect();
        let max_steps = self.config.get("max_steps").and_then(Value::as_u64).unwrap_or(5).clamp(1, 20);
        let mut messages = Vec::new();
        let system = self.string("system");
        if !system.is_empty() {
            messages.push(message(pb::MessageRole::System, system));
        }
        messages.push(message(pb::MessageRole::User, self.user_text(msg)?));
        let mut total = pb::Usage::default();
        let mut calls = 0;
        for _ in 0..max_steps {
            let reply = ai
                .chat(self.chat_request(provider.clone(), model.clone(), messages.clone(), specs.clone()))
                .await?;
            if let Some(u) = &reply.usage {
                total.prompt_tokens += u.prompt_tokens;
                total.completion_tokens += u.completion_tokens;
                total.total_tokens += u.total_tokens;
                total.cost_usd += u.cost_usd;
                total.estimated |= u.estimated;
            }
            let answer = reply.message.unwrap_or_default();
            if answer.tool_calls.is_empty() {
                return Ok(
                    json!({ "text": answer.content, "model": reply.model, "steps": calls, "usage": usage(Some(total)) }),
                );
            }
            messages.push(answer.clone());
            for call in &answer.tool_calls {
                calls += 1;
                let result = match tools.iter().find(|t| t.spec.name == call.name) {
                    Some(tool) => run_tool(tool, &call.arguments_json).await,
                    None => {
                        json!({ "error": format!("there is no tool named `{}`", call.name.chars().take(64).collect::<String>()) })
                    }
                };
                messages.push(pb::ChatMessage {
                    role: pb::MessageRole::Tool as i32,
                    content: result.to_string(),
                    tool_call_id: call.id.clone(),
                    ..Default::default()
                });
            }
        }
        Err((format!("the agent still asked for tools after {max_steps} steps (max_steps)"), false))
    }
}

/// Runs one tool call; its result, or `{"error": ...}` for the model to read.
async fn run_tool(tool: &AgentTool, arguments: &str) -> Value {
    let Ok(arguments) = serde_json::from_str::<Value>(arguments) else {
        return json!({ "error": "the arguments are not JSON" });
    };
    let outputs = if !tool.remote_address.is_empty() {
        csp_platform::component::call_once(
            &tool.remote_address,
            &tool.spec.name,
            &tool.config,
            arguments,
            std::time::Duration::from_secs(30),
        )
        .await
    } else {
        run_builtin(&tool.component_type, &tool.config, arguments)
    };
    match outputs {
        Ok(mut outputs) if outputs.len() == 1 => outputs.remove(0),
        Ok(outputs) => Value::Array(outputs),
        Err(error) => json!({ "error": error }),
    }
}

/// Runs a built-in component on one message, in place: what it sends on any output.
fn run_builtin(type_id: &str, config: &Value, input: Value) -> Result<Vec<Value>, String> {
    let Some(spec) = csp_components::builtin(type_id) else {
        return Err(format!(
            "`{}` is not a built-in component",
            type_id.chars().take(64).collect::<String>()
        ));
    };
    let config = csp_components::validate_config(spec, config).map_err(|violations| {
        let listed: Vec<String> =
            violations.iter().take(3).map(|v| format!("{}: {}", v.pointer, v.message)).collect();
        format!("the tool's configuration is invalid: {}", listed.join("; "))
    })?;
    let (inputs, outputs) = csp_components::ports_for(spec, &config);
    let inputs: Vec<String> = inputs.into_iter().map(|p| p.name).collect();
    let outputs: Vec<String> = outputs.into_iter().map(|p| p.name).collect();
    let cx = super::Context {
        // A tool call is one message, run in place within the default bounds.
        jq: super::JqBounds {
            limits: csp_components::jq::Limits::default(),
            stop: std::sync::Arc::new(|| false),
        },
        node_id: type_id,
        inputs: &inputs,
        outputs: &outputs,
        input_messages: Vec::new(),
        collected: super::Collected::new(0),
        ai: None,
    };
    let super::Kind::Transform(mut component) = super::instantiate(type_id, &config, cx)? else {
        return Err(format!("`{type_id}` cannot be a tool: it does not take one message and answer"));
    };
    let mut out = Emit::new(outputs.len());
    component.process(0, crate::runtime::channel::msg(input), &mut out).map_err(|f| f.error)?;
    component.finish(&mut out)?;
    Ok(out.ports.into_iter().flatten().map(|m| (*m).clone()).collect())
}

#[tonic::async_trait]
impl AsyncTransform for AiNode {
    async fn process(&mut self, _port: usize, msg: &Msg, out: &mut Emit) -> Result<(), (String, bool)> {
        let Some(ai) = self.ai.clone() else {
            return Err((
                format!("`{}` cannot run: this executor has no connection to the AI service", self.node_id),
                false,
            ));
        };
        let value = self.call(ai.as_ref(), msg).await?;
        out.value(self.out, value);
        Ok(())
    }
}

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
            "ai.chat" | "ai.agent" => {
                let mut messages = Vec::new();
                let system = self.string("system");
                if !system.is_empty() {
                    messages.push(message(pb::MessageRole::System, system));
                }
                messages.push(message(pb::MessageRole::User, self.user_text(msg)?));
                let agent = self.type_id == "ai.agent";
                let tools = if agent {
                    self.config
                        .get("tools")
                        .and_then(Value::as_array)
                        .map(|tools| {
                            tools
                                .iter()
                                .map(|t| pb::Tool {
                                    name: text(t, "name").unwrap_or_default().into(),
                                    description: text(t, "description").unwrap_or_default().into(),
                                    parameters: t.get("parameters").cloned().map(pbjson::to_struct),
                                    component_type: text(t, "component_type").unwrap_or_default().into(),
                                    component_config: t
                                        .get("component_config")
                                        .cloned()
                                        .map(pbjson::to_struct),
                                    remote_address: text(t, "remote_address").unwrap_or_default().into(),
                                })
                                .collect()
                        })
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                let request = pb::ChatRequest {
                    provider,
                    model,
                    messages,
                    tools,
                    run_tools: agent,
                    max_steps: self.config.get("max_steps").and_then(Value::as_i64).unwrap_or(5) as i32,
                    temperature: self.config.get("temperature").and_then(Value::as_f64),
                    max_tokens: self.config.get("max_tokens").and_then(Value::as_i64).unwrap_or(0) as i32,
                    ..Default::default()
                };
                let reply = ai.chat(request).await?;
                let text = reply.message.map(|m| m.content).unwrap_or_default();
                let mut out = json!({ "text": text, "model": reply.model, "usage": usage(reply.usage) });
                if agent {
                    out["steps"] = Value::from(reply.steps.len());
                }
                Ok(out)
            }
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

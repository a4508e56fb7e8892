//! Anthropic's Messages API over HTTP (`reqwest`), streaming with server-sent events
//! (`eventsource-stream`). A JSON answer is asked for the way Anthropic recommends: a tool whose
//! input schema is the wanted schema, which the model is made to call; its input is the answer.

use std::time::Duration;

use async_trait::async_trait;
use eventsource_stream::Eventsource as _;
use futures::{StreamExt as _, stream};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{PieceStream, Provider, ProviderError, ProviderRequest, clip, openai::retry_after};
use crate::model::{Message, Piece, Reply, ResponseFormat, Role, Tokens, ToolCall};

/// Anthropic's public API.
const ANTHROPIC: &str = "https://api.anthropic.com";
const VERSION: &str = "2023-06-01";

/// An Anthropic provider.
pub(crate) struct Anthropic {
    http: reqwest::Client,
    url: String,
    key: Option<SecretString>,
}

impl Anthropic {
    pub(crate) fn new(
        base_url: Option<&str>,
        key: Option<SecretString>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(timeout)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let url = format!("{}/v1/messages", base_url.unwrap_or(ANTHROPIC).trim_end_matches('/'));
        Ok(Self { http, url, key })
    }
}

/// The name of the tool that carries a JSON answer.
fn answer_tool(name: &str) -> String {
    format!("answer_{name}")
}

fn body(request: &ProviderRequest, stream: bool) -> Value {
    let system: Vec<&str> =
        request.messages.iter().filter(|m| m.role == Role::System).map(|m| m.content.as_str()).collect();
    let mut messages: Vec<Value> = Vec::new();
    for m in request.messages.iter().filter(|m| m.role != Role::System) {
        let (role, content) = match m.role {
            Role::Tool => (
                "user",
                vec![json!({ "type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content })],
            ),
            Role::Assistant => {
                let mut blocks = Vec::new();
                if !m.content.is_empty() {
                    blocks.push(json!({ "type": "text", "text": m.content }));
                }
                for call in &m.tool_calls {
                    let input: Value = serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
                    blocks.push(
                        json!({ "type": "tool_use", "id": call.id, "name": call.name, "input": input }),
                    );
                }
                ("assistant", blocks)
            }
            _ => ("user", vec![json!({ "type": "text", "text": m.content })]),
        };
        // Consecutive turns of one role are merged: the API alternates user and assistant.
        match messages.last_mut() {
            Some(last) if last["role"] == role => {
                if let Some(blocks) = last["content"].as_array_mut() {
                    blocks.extend(content);
                }
            }
            _ => messages.push(json!({ "role": role, "content": content })),
        }
    }
    let max_tokens = if request.max_tokens > 0 { request.max_tokens } else { 4096 };
    let mut body = json!({ "model": request.model, "max_tokens": max_tokens, "messages": messages });
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    if let Some(t) = request.temperature {
        body["temperature"] = json!(t.min(1.0));
    }
    let mut tools: Vec<Value> = request
        .tools
        .iter()
        .map(|t| json!({ "name": t.name, "description": t.description, "input_schema": t.parameters }))
        .collect();
    if let ResponseFormat::Json { name, schema } = &request.response {
        let tool = answer_tool(name);
        tools.push(json!({ "name": tool, "description": "Give the answer.", "input_schema": schema }));
        body["tool_choice"] = json!({ "type": "tool", "name": tool });
    }
    if !tools.is_empty() {
        body["tools"] = json!(tools);
    }
    if stream {
        body["stream"] = json!(true);
    }
    body
}

#[derive(Deserialize)]
struct WireError {
    #[serde(default)]
    error: Option<WireErrorBody>,
}

#[derive(Deserialize)]
struct WireErrorBody {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize, Default)]
struct WireUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
}

#[derive(Deserialize)]
struct WireBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Value>,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Vec<WireBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

fn finish(stop: Option<&str>) -> String {
    match stop {
        Some("max_tokens") => "length",
        Some("tool_use") => "tool_calls",
        _ => "stop",
    }
    .into()
}

/// An error answer as a provider error.
async fn refused(response: reqwest::Response, model: &str) -> ProviderError {
    let status = response.status().as_u16();
    let wait = retry_after(response.headers());
    let text = response.text().await.unwrap_or_default();
    let body: Option<WireErrorBody> = serde_json::from_str::<WireError>(&text).ok().and_then(|e| e.error);
    let (kind, message) = body.map(|b| (b.kind, b.message)).unwrap_or_default();
    match status {
        429 => ProviderError::RateLimited { retry_after: wait },
        401 | 403 => ProviderError::BadKey,
        404 if kind == "not_found_error" => ProviderError::UnknownModel(model.to_owned()),
        400 if message.contains("prompt is too long") || message.contains("context") => {
            ProviderError::ContextTooLong
        }
        s if s >= 500 => ProviderError::Unavailable(format!("HTTP {s}")),
        s => ProviderError::Rejected(format!("HTTP {s}: {}", clip(&message))),
    }
}

fn transport(error: &reqwest::Error) -> ProviderError {
    if error.is_timeout() {
        ProviderError::Unavailable("no answer in time".into())
    } else {
        ProviderError::Unavailable(clip(&error.to_string()))
    }
}

impl Anthropic {
    async fn send(
        &self,
        request: &ProviderRequest,
        stream: bool,
    ) -> Result<reqwest::Response, ProviderError> {
        let mut call = self
            .http
            .post(&self.url)
            .header("anthropic-version", VERSION)
            .header("content-type", "application/json")
            .body(body(request, stream).to_string());
        if let Some(key) = &self.key {
            call = call.header("x-api-key", key.expose_secret());
        }
        let response = call.send().await.map_err(|e| transport(&e.without_url()))?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(refused(response, &request.model).await)
        }
    }
}

/// A JSON answer asked through the answer tool comes back as text.
fn unwrap_answer(request: &ProviderRequest, message: &mut Message) {
    if let ResponseFormat::Json { name, .. } = &request.response {
        let tool = answer_tool(name);
        if let Some(i) = message.tool_calls.iter().position(|c| c.name == tool) {
            let call = message.tool_calls.remove(i);
            message.content = call.arguments;
        }
    }
}

#[async_trait]
impl Provider for Anthropic {
    fn available(&self) -> bool {
        self.key.is_some()
    }

    async fn complete(&self, request: &ProviderRequest) -> Result<Reply, ProviderError> {
        let response = self.send(request, false).await?;
        let text = response.text().await.map_err(|e| transport(&e.without_url()))?;
        let wire: WireMessage = serde_json::from_str(&text)
            .map_err(|_| ProviderError::Malformed("the answer is not the expected JSON".into()))?;
        let mut message = Message::new(Role::Assistant, "");
        for block in wire.content {
            match block.kind.as_str() {
                "text" => message.content.push_str(&block.text.unwrap_or_default()),
                "tool_use" => message.tool_calls.push(ToolCall {
                    id: block.id.unwrap_or_default(),
                    name: block.name.unwrap_or_default(),
                    arguments: block.input.unwrap_or_else(|| json!({})).to_string(),
                }),
                _ => {}
            }
        }
        unwrap_answer(request, &mut message);
        let finish_reason = if matches!(request.response, ResponseFormat::Json { .. }) {
            "stop".into()
        } else {
            finish(wire.stop_reason.as_deref())
        };
        Ok(Reply {
            message,
            finish_reason,
            tokens: wire.usage.map(|u| Tokens {
                prompt: u.input_tokens,
                completion: u.output_tokens,
                estimated: false,
            }),
        })
    }

    async fn stream(&self, request: &ProviderRequest) -> Result<PieceStream, ProviderError> {
        let response = self.send(request, true).await?;
        let events = response.bytes_stream().eventsource().boxed();
        let answer = match &request.response {
            ResponseFormat::Json { name, .. } => Some(answer_tool(name)),
            ResponseFormat::Text => None,
        };
        struct State {
            events: futures::stream::BoxStream<
                'static,
                Result<eventsource_stream::Event, eventsource_stream::EventStreamError<reqwest::Error>>,
            >,
            /// The tool use being streamed: id, name, input so far.
            tool: Option<(String, String, String)>,
            answer: Option<String>,
            usage: WireUsage,
            stop: Option<String>,
            done: bool,
        }
        let state =
            State { events, tool: None, answer, usage: WireUsage::default(), stop: None, done: false };
        Ok(stream::unfold(state, |mut s| async move {
            if s.done {
                return None;
            }
            loop {
                let event = match s.events.next().await {
                    Some(Ok(event)) => event,
                    Some(Err(e)) => {
                        s.done = true;
                        return Some((Err(ProviderError::Malformed(clip(&e.to_string()))), s));
                    }
                    None => {
                        s.done = true;
                        return Some((
                            Err(ProviderError::Malformed(
                                "the stream ended before the reply was complete".into(),
                            )),
                            s,
                        ));
                    }
                };
                let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
                    s.done = true;
                    return Some((Err(ProviderError::Malformed("an event is not JSON".into())), s));
                };
                match event.event.as_str() {
                    "message_start" => {
                        if let Some(usage) = data.pointer("/message/usage") {
                            s.usage.input_tokens = usage["input_tokens"].as_u64().unwrap_or(0);
                            s.usage.output_tokens = usage["output_tokens"].as_u64().unwrap_or(0);
                        }
                    }
                    "content_block_start"
                        if data.pointer("/content_block/type") == Some(&json!("tool_use")) =>
                    {
                        let block = &data["content_block"];
                        s.tool = Some((
                            block["id"].as_str().unwrap_or_default().to_owned(),
                            block["name"].as_str().unwrap_or_default().to_owned(),
                            String::new(),
                        ));
                    }
                    "content_block_delta" => match data.pointer("/delta/type").and_then(Value::as_str) {
                        Some("text_delta") => {
                            let text =
                                data.pointer("/delta/text").and_then(Value::as_str).unwrap_or_default();
                            if !text.is_empty() {
                                return Some((Ok(Piece::Text(text.to_owned())), s));
                            }
                        }
                        Some("input_json_delta") => {
                            if let Some(tool) = &mut s.tool {
                                tool.2.push_str(
                                    data.pointer("/delta/partial_json")
                                        .and_then(Value::as_str)
                                        .unwrap_or_default(),
                                );
                            }
                        }
                        _ => {}
                    },
                    "content_block_stop" => {
                        if let Some((id, name, input)) = s.tool.take() {
                            let input = if input.is_empty() { "{}".to_owned() } else { input };
                            // The answer tool's input is the (JSON) text of the reply.
                            if s.answer.as_deref() == Some(name.as_str()) {
                                return Some((Ok(Piece::Text(input)), s));
                            }
                            return Some((Ok(Piece::ToolCall(ToolCall { id, name, arguments: input })), s));
                        }
                    }
                    "message_delta" => {
                        if let Some(stop) = data.pointer("/delta/stop_reason").and_then(Value::as_str) {
                            s.stop = Some(stop.to_owned());
                        }
                        if let Some(out) = data.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                            s.usage.output_tokens = out;
                        }
                    }
                    "message_stop" => {
                        s.done = true;
                        let finish_reason =
                            if s.answer.is_some() { "stop".into() } else { finish(s.stop.as_deref()) };
                        let tokens = Tokens {
                            prompt: s.usage.input_tokens,
                            completion: s.usage.output_tokens,
                            estimated: false,
                        };
                        return Some((Ok(Piece::Done { finish_reason, tokens: Some(tokens) }), s));
                    }
                    "error" => {
                        s.done = true;
                        let kind = data.pointer("/error/type").and_then(Value::as_str).unwrap_or_default();
                        let error = match kind {
                            "overloaded_error" | "api_error" => ProviderError::Unavailable(kind.to_owned()),
                            "rate_limit_error" => ProviderError::RateLimited { retry_after: None },
                            _ => ProviderError::Rejected(clip(
                                data.pointer("/error/message").and_then(Value::as_str).unwrap_or(kind),
                            )),
                        };
                        return Some((Err(error), s));
                    }
                    _ => {}
                }
            }
        })
        .boxed())
    }
}

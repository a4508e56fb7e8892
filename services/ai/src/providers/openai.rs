//! OpenAI's chat completions API, or any endpoint that speaks it (`base_url`), through
//! `async-openai` (its "bring your own types" calls, with the wire format below).
//!
//! async-openai's own retry layer is replaced by one that only reads the answer's status: a
//! 429 (with its `Retry-After`) or a 5xx becomes a [`ProviderError`] here, and the service
//! decides about retries and fallbacks. Streams ask for usage (`stream_options.include_usage`);
//! a stream that ends without a finish reason was cut midway and fails.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use async_openai::{
    Client,
    config::OpenAIConfig,
    error::OpenAIError,
    middleware::{HttpRequestFactory, ReqwestService},
};
use async_trait::async_trait;
use futures::{StreamExt as _, stream};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{PieceStream, Provider, ProviderError, ProviderRequest, clip};
use crate::model::{Message, Piece, Reply, ResponseFormat, Role, Tokens, ToolCall};

/// OpenAI's public API.
const OPENAI: &str = "https://api.openai.com/v1";

/// An OpenAI (or compatible) provider.
pub(crate) struct OpenAi {
    client: Client<OpenAIConfig>,
    has_key: bool,
}

/// A status the service handles itself (429, 5xx), taken out of async-openai's hands.
#[derive(Debug)]
struct Refused {
    status: u16,
    retry_after: Option<Duration>,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}", self.status)
    }
}

impl std::error::Error for Refused {}

/// `Retry-After` as seconds or an HTTP date.
pub(super) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(3600.0)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.signed_duration_since(chrono::Utc::now()).num_milliseconds().max(0);
    Some(Duration::from_millis(wait.min(3_600_000) as u64))
}

/// The HTTP service under async-openai: sends, and turns 429 and 5xx into [`Refused`].
#[derive(Clone)]
struct StatusOnly(ReqwestService);

impl tower::Service<HttpRequestFactory> for StatusOnly {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = Pin<Box<dyn Future<Output = Result<reqwest::Response, OpenAIError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequestFactory) -> Self::Future {
        let sent = self.0.call(request);
        Box::pin(async move {
            let response = sent.await?;
            let status = response.status().as_u16();
            if status == 429 || status >= 500 {
                let retry_after = retry_after(response.headers());
                return Err(OpenAIError::Boxed(Box::new(Refused { status, retry_after })));
            }
            Ok(response)
        })
    }
}

impl OpenAi {
    pub(crate) fn new(base_url: Option<&str>, key: Option<SecretString>, timeout: Duration) -> Self {
        let mut config = OpenAIConfig::new().with_api_base(base_url.unwrap_or(OPENAI).trim_end_matches('/'));
        if let Some(key) = &key {
            config = config.with_api_key(key.expose_secret());
        }
        // Local OpenAI-compatible servers often take no key.
        let has_key = key.is_some() || base_url.is_some();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(timeout)
            .build()
            .unwrap_or_default();
        let client = Client::with_config(config).with_http_service(StatusOnly(ReqwestService::new(http)));
        Self { client, has_key }
    }
}

fn role(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

/// The request body, in OpenAI's wire format.
fn body(request: &ProviderRequest, stream: bool) -> Value {
    let messages: Vec<Value> = request
        .messages
        .iter()
        .map(|m| {
            let mut message = json!({ "role": role(m.role), "content": m.content });
            if !m.tool_calls.is_empty() {
                message["tool_calls"] = m
                    .tool_calls
                    .iter()
                    .map(|c| json!({ "id": c.id, "type": "function", "function": { "name": c.name, "arguments": c.arguments } }))
                    .collect();
            }
            if m.role == Role::Tool {
                message["tool_call_id"] = json!(m.tool_call_id);
            }
            message
        })
        .collect();
    let mut body = json!({ "model": request.model, "messages": messages });
    if request.max_tokens > 0 {
        body["max_tokens"] = json!(request.max_tokens);
    }
    if let Some(t) = request.temperature {
        body["temperature"] = json!(t);
    }
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|t| json!({ "type": "function", "function": { "name": t.name, "description": t.description, "parameters": t.parameters } }))
            .collect();
    }
    if let ResponseFormat::Json { name, schema } = &request.response {
        body["response_format"] =
            json!({ "type": "json_schema", "json_schema": { "name": name, "schema": schema } });
    }
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({ "include_usage": true });
    }
    body
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

impl From<WireUsage> for Tokens {
    fn from(u: WireUsage) -> Self {
        Tokens { prompt: u.prompt_tokens, completion: u.completion_tokens, estimated: false }
    }
}

#[derive(Deserialize)]
struct WireFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct WireToolCall {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    function: Option<WireFunction>,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<WireToolCall>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    message: Option<WireMessage>,
    #[serde(default)]
    delta: Option<WireMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

/// An async-openai failure as a provider error.
fn failed(error: OpenAIError, model: &str) -> ProviderError {
    match error {
        OpenAIError::Boxed(boxed) => match boxed.downcast_ref::<Refused>() {
            Some(Refused { status: 429, retry_after }) => {
                ProviderError::RateLimited { retry_after: *retry_after }
            }
            Some(refused) => ProviderError::Unavailable(refused.to_string()),
            None => ProviderError::Unavailable(clip(&boxed.to_string())),
        },
        OpenAIError::ApiError(response) => {
            let code = response.api_error.code.clone().unwrap_or_default();
            match response.status_code.as_u16() {
                401 | 403 => ProviderError::BadKey,
                404 if code == "model_not_found" || response.api_error.message.contains("model") => {
                    ProviderError::UnknownModel(model.to_owned())
                }
                400 if code == "context_length_exceeded" => ProviderError::ContextTooLong,
                status => {
                    ProviderError::Rejected(format!("HTTP {status}: {}", clip(&response.api_error.message)))
                }
            }
        }
        OpenAIError::Reqwest(e) if e.is_timeout() => ProviderError::Unavailable("no answer in time".into()),
        OpenAIError::Reqwest(e) => ProviderError::Unavailable(clip(&e.without_url().to_string())),
        OpenAIError::JSONDeserialize(..) => {
            ProviderError::Malformed("the answer is not the expected JSON".into())
        }
        OpenAIError::StreamError(e) => ProviderError::Malformed(clip(&e.to_string())),
        other => ProviderError::Unavailable(clip(&other.to_string())),
    }
}

fn tool_calls(calls: Vec<WireToolCall>) -> Vec<ToolCall> {
    calls
        .into_iter()
        .filter_map(|c| {
            let function = c.function?;
            Some(ToolCall {
                id: c.id.unwrap_or_default(),
                name: function.name.unwrap_or_default(),
                arguments: function.arguments.unwrap_or_else(|| "{}".into()),
            })
        })
        .collect()
}

#[async_trait]
impl Provider for OpenAi {
    fn available(&self) -> bool {
        self.has_key
    }

    async fn complete(&self, request: &ProviderRequest) -> Result<Reply, ProviderError> {
        let response: WireResponse = self
            .client
            .chat()
            .create_byot(body(request, false))
            .await
            .map_err(|e| failed(e, &request.model))?;
        let Some(choice) = response.choices.into_iter().next() else {
            return Err(ProviderError::Malformed("the answer has no choices".into()));
        };
        let wire = choice.message.unwrap_or(WireMessage { content: None, tool_calls: Vec::new() });
        let mut message = Message::new(Role::Assistant, wire.content.unwrap_or_default());
        message.tool_calls = tool_calls(wire.tool_calls);
        Ok(Reply {
            message,
            finish_reason: choice.finish_reason.unwrap_or_else(|| "stop".into()),
            tokens: response.usage.map(Tokens::from),
        })
    }

    async fn stream(&self, request: &ProviderRequest) -> Result<PieceStream, ProviderError> {
        let model = request.model.clone();
        let chunks = self
            .client
            .chat()
            .create_stream_byot::<Value, WireResponse>(body(request, true))
            .await
            .map_err(|e| failed(e, &model))?;
        // Tool calls arrive in fragments, by index; they go out whole at the end.
        struct State {
            chunks: futures::stream::BoxStream<'static, Result<WireResponse, OpenAIError>>,
            calls: BTreeMap<usize, (String, String, String)>,
            finish: Option<String>,
            tokens: Option<Tokens>,
            done: bool,
            model: String,
        }
        let state = State {
            chunks: chunks.boxed(),
            calls: BTreeMap::new(),
            finish: None,
            tokens: None,
            done: false,
            model,
        };
        Ok(stream::unfold(state, |mut s| async move {
            if s.done {
                return None;
            }
            loop {
                match s.chunks.next().await {
                    Some(Ok(chunk)) => {
                        if let Some(usage) = chunk.usage {
                            s.tokens = Some(usage.into());
                        }
                        let mut text = String::new();
                        for choice in chunk.choices {
                            if let Some(reason) = choice.finish_reason {
                                s.finish = Some(reason);
                            }
                            let Some(delta) = choice.delta else { continue };
                            text.push_str(&delta.content.unwrap_or_default());
                            for (n, call) in delta.tool_calls.into_iter().enumerate() {
                                let entry = s.calls.entry(call.index.unwrap_or(n)).or_default();
                                if let Some(id) = call.id {
                                    entry.0 = id;
                                }
                                if let Some(f) = call.function {
                                    entry.1.push_str(&f.name.unwrap_or_default());
                                    entry.2.push_str(&f.arguments.unwrap_or_default());
                                }
                            }
                        }
                        if !text.is_empty() {
                            return Some((Ok(Piece::Text(text)), s));
                        }
                    }
                    Some(Err(e)) => {
                        s.done = true;
                        let error = failed(e, &s.model);
                        return Some((Err(error), s));
                    }
                    None => {
                        if let Some((_, (id, name, arguments))) = s.calls.pop_first() {
                            let call = ToolCall {
                                id,
                                name,
                                arguments: if arguments.is_empty() { "{}".into() } else { arguments },
                            };
                            return Some((Ok(Piece::ToolCall(call)), s));
                        }
                        s.done = true;
                        return Some(match s.finish.take() {
                            Some(finish_reason) => (Ok(Piece::Done { finish_reason, tokens: s.tokens }), s),
                            None => (
                                Err(ProviderError::Malformed(
                                    "the stream ended before the reply was complete".into(),
                                )),
                                s,
                            ),
                        });
                    }
                }
            }
        })
        .boxed())
    }
}

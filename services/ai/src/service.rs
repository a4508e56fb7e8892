//! The service's operations: chat (with conversations and the agent loop), streamed chat,
//! analysis, code generation, conversations, usage and models. Requests are checked here;
//! every provider call goes through [`Engine`].

use std::sync::Arc;

use csp_platform::FieldViolation;
use futures::Stream;
use serde_json::Value;

use crate::{
    analyze::{self, Kind},
    calls::{Answer, Call, Chunk, Engine},
    catalog::ModelInfo,
    conversations::{Conversation, Conversations, NewConversation},
    error::Error,
    model::{Attribution, Message, Operation, ResponseFormat, Role, Route, Tokens},
    providers::ProviderRequest,
    tokens,
    tools::{self, Tool},
    usage::{Grouping, Period, Query, Total},
};

/// Steps of the agent loop when a request sets none, and the most it may set.
const DEFAULT_STEPS: u32 = 5;
const MAX_STEPS: u32 = 20;

/// A chat turn as the service takes it.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChatInput {
    pub(crate) provider: String,
    pub(crate) model: String,
    pub(crate) messages: Vec<Message>,
    pub(crate) conversation_id: String,
    pub(crate) tools: Vec<Tool>,
    pub(crate) run_tools: bool,
    pub(crate) max_steps: i32,
    pub(crate) temperature: Option<f64>,
    pub(crate) max_tokens: i32,
}

/// A chat turn's outcome.
#[derive(Debug, Clone)]
pub(crate) struct ChatOutput {
    pub(crate) message: Message,
    /// The agent loop's messages before the reply.
    pub(crate) steps: Vec<Message>,
    pub(crate) finish_reason: String,
    pub(crate) tokens: Tokens,
    pub(crate) cost_usd: f64,
    pub(crate) route: Route,
}

/// An analysis or generated code, with what it took.
#[derive(Debug, Clone)]
pub(crate) struct Structured {
    pub(crate) value: Value,
    pub(crate) tokens: Tokens,
    pub(crate) cost_usd: f64,
    pub(crate) route: Route,
}

/// The AI service.
pub(crate) struct Ai {
    pub(crate) engine: Arc<Engine>,
    pub(crate) conversations: Conversations,
}

fn check_label(value: &str, field: &str, v: &mut Vec<FieldViolation>) {
    if value.len() > 64 || value.chars().any(char::is_control) {
        v.push(FieldViolation::new(field, "must be at most 64 characters, without control characters"));
    }
}

/// Checks the fields every request shares: who it is for.
pub(crate) fn check_attribution(who: &Attribution, v: &mut Vec<FieldViolation>) {
    check_label(&who.design_id, "design_id", v);
    check_label(&who.execution_id, "execution_id", v);
    check_label(&who.node_id, "node_id", v);
}

impl Ai {
    fn check_messages(&self, messages: &[Message], v: &mut Vec<FieldViolation>) {
        if messages.is_empty() {
            v.push(FieldViolation::new("messages", "must hold at least one message"));
        }
        let bytes: usize = messages
            .iter()
            .map(|m| m.content.len() + m.tool_calls.iter().map(|c| c.arguments.len()).sum::<usize>())
            .sum();
        let max = self.engine.settings.max_prompt_bytes;
        if bytes > max {
            v.push(FieldViolation::new(
                "messages",
                format!("hold {bytes} bytes of text; at most {max} are accepted"),
            ));
        }
        for (i, m) in messages.iter().enumerate() {
            if m.role == Role::Tool && m.tool_call_id.is_empty() {
                v.push(FieldViolation::new(
                    format!("messages[{i}].tool_call_id"),
                    "is required for a tool message",
                ));
            }
        }
    }

    fn check_sampling(&self, temperature: Option<f64>, max_tokens: i32, v: &mut Vec<FieldViolation>) {
        if temperature.is_some_and(|t| !t.is_finite() || !(0.0..=2.0).contains(&t)) {
            v.push(FieldViolation::new("temperature", "must be 0 to 2"));
        }
        let max = self.engine.settings.max_output_tokens;
        if max_tokens < 0 || max_tokens as u32 > max {
            v.push(FieldViolation::new("max_tokens", format!("must be 0 (the default) to {max}")));
        }
    }

    fn request(&self, route: &Route, messages: Vec<Message>, input: &ChatInput) -> ProviderRequest {
        ProviderRequest {
            model: route.model.clone(),
            messages,
            tools: input.tools.iter().map(|t| t.spec.clone()).collect(),
            temperature: input.temperature,
            max_tokens: input.max_tokens.max(0) as u32,
            response: ResponseFormat::Text,
        }
    }

    /// The conversation named, its provider and model as defaults, and what a turn sends
    /// before the new messages.
    async fn conversation(
        &self,
        who: &Attribution,
        admin: bool,
        input: &ChatInput,
    ) -> Result<(Option<Conversation>, Vec<Message>), Error> {
        if input.conversation_id.is_empty() {
            return Ok((None, Vec::new()));
        }
        let c = self.conversations.get(&who.user_id, admin, &input.conversation_id).await?;
        let context = self.conversations.context(&c, tokens::messages(&input.messages)).await?;
        Ok((Some(c), context))
    }

    /// A chat turn; with `run_tools`, the agent loop.
    pub(crate) async fn chat(
        &self,
        mut who: Attribution,
        admin: bool,
        mut input: ChatInput,
    ) -> Result<ChatOutput, Error> {
        let mut v = Vec::new();
        check_attribution(&who, &mut v);
        self.check_messages(&input.messages, &mut v);
        self.check_sampling(input.temperature, input.max_tokens, &mut v);
        tools::check(&mut input.tools, input.run_tools, &mut v);
        if input.max_steps < 0 || input.max_steps as u32 > MAX_STEPS {
            v.push(FieldViolation::new(
                "max_steps",
                format!("must be 0 (the default, {DEFAULT_STEPS}) to {MAX_STEPS}"),
            ));
        }
        if !v.is_empty() {
            return Err(Error::fields(v));
        }
        let (conversation, mut context) = self.conversation(&who, admin, &input).await?;
        let (provider, model) = match &conversation {
            Some(c) => (
                if input.provider.is_empty() { c.provider.clone() } else { input.provider.clone() },
                if input.model.is_empty() { c.model.clone() } else { input.model.clone() },
            ),
            None => (input.provider.clone(), input.model.clone()),
        };
        let route = self.engine.catalog.resolve(&provider, &model)?;
        if let Some(c) = &conversation {
            who.conversation_id.clone_from(&c.id);
            if who.design_id.is_empty() {
                who.design_id.clone_from(&c.design_id);
            }
        }
        context.extend(input.messages.iter().cloned());
        let steps_allowed = if input.max_steps == 0 { DEFAULT_STEPS } else { input.max_steps as u32 };
        let mut steps: Vec<Message> = Vec::new();
        let mut tokens = Tokens::default();
        let mut cost_usd = 0.0;
        let mut step = 0;
        let (answer, route) = loop {
            step += 1;
            let mut messages = context.clone();
            messages.extend(steps.iter().cloned());
            let call = Call {
                who: who.clone(),
                operation: Operation::Chat,
                route: route.clone(),
                request: self.request(&route, messages, &input),
            };
            let Answer { reply, tokens: used, cost_usd: cost, route: answered } =
                self.engine.complete(call).await?;
            tokens.prompt += used.prompt;
            tokens.completion += used.completion;
            tokens.estimated |= used.estimated;
            cost_usd += cost;
            if !input.run_tools || reply.message.tool_calls.is_empty() {
                break (reply, answered);
            }
            if step >= steps_allowed {
                return Err(Error::Precondition {
                    message: format!(
                        "the model still asked for tools after {steps_allowed} steps (max_steps); nothing more was run"
                    ),
                    reason: "MAX_STEPS_REACHED",
                });
            }
            steps.push(reply.message.clone());
            for call in &reply.message.tool_calls {
                let result = match input.tools.iter().find(|t| t.spec.name == call.name) {
                    Some(tool) => tools::run(tool, call, self.engine.settings.request_timeout).await,
                    None => serde_json::json!({ "error": format!("there is no tool named `{}`", call.name.chars().take(64).collect::<String>()) }).to_string(),
                };
                steps.push(Message {
                    role: Role::Tool,
                    content: result,
                    tool_calls: Vec::new(),
                    tool_call_id: call.id.clone(),
                });
            }
        };
        if let Some(c) = &conversation {
            let mut kept: Vec<Message> =
                input.messages.iter().filter(|m| m.role != Role::System).cloned().collect();
            kept.extend(steps.iter().cloned());
            kept.push(answer.message.clone());
            self.conversations.append(&c.id, &kept).await?;
        }
        Ok(ChatOutput {
            message: answer.message,
            steps,
            finish_reason: answer.finish_reason,
            tokens,
            cost_usd,
            route,
        })
    }

    /// A chat turn, streamed. Tools may be offered (their calls come back whole), not run.
    pub(crate) async fn chat_stream(
        &self,
        mut who: Attribution,
        admin: bool,
        mut input: ChatInput,
    ) -> Result<(Route, impl Stream<Item = Result<Chunk, Error>> + Send + 'static), Error> {
        let mut v = Vec::new();
        check_attribution(&who, &mut v);
        self.check_messages(&input.messages, &mut v);
        self.check_sampling(input.temperature, input.max_tokens, &mut v);
        tools::check(&mut input.tools, false, &mut v);
        if input.run_tools {
            v.push(FieldViolation::new("chat.run_tools", "is not available on a streamed chat; use Chat"));
        }
        if !input.conversation_id.is_empty() {
            v.push(FieldViolation::new(
                "chat.conversation_id",
                "is not available on a streamed chat; use Chat",
            ));
        }
        if !v.is_empty() {
            return Err(Error::fields(v));
        }
        let (_, context) = self.conversation(&who, admin, &input).await?;
        let route = self.engine.catalog.resolve(&input.provider, &input.model)?;
        who.conversation_id.clear();
        let mut messages = context;
        messages.extend(input.messages.iter().cloned());
        let call = Call {
            who,
            operation: Operation::Stream,
            route: route.clone(),
            request: self.request(&route, messages, &input),
        };
        self.engine.stream(call).await
    }

    /// A structured answer: asked, checked against `schema`, asked again once if malformed.
    async fn structured(
        &self,
        who: Attribution,
        operation: Operation,
        route: Route,
        (mut messages, response): (Vec<Message>, ResponseFormat),
    ) -> Result<Structured, Error> {
        let ResponseFormat::Json { schema, .. } = &response else {
            return Err(Error::Internal("a structured call without a schema".into()));
        };
        let schema = schema.clone();
        let mut tokens = Tokens::default();
        let mut cost_usd = 0.0;
        for attempt in 0..2 {
            let request = ProviderRequest {
                model: route.model.clone(),
                messages: messages.clone(),
                tools: Vec::new(),
                temperature: Some(0.0),
                max_tokens: 0,
                response: response.clone(),
            };
            let answer = self
                .engine
                .complete(Call { who: who.clone(), operation, route: route.clone(), request })
                .await?;
            tokens.prompt += answer.tokens.prompt;
            tokens.completion += answer.tokens.completion;
            tokens.estimated |= answer.tokens.estimated;
            cost_usd += answer.cost_usd;
            match analyze::check(&answer.reply.message.content, &schema) {
                Ok(value) => return Ok(Structured { value, tokens, cost_usd, route: answer.route }),
                Err(problem) if attempt == 0 => {
                    tracing::info!(route = %answer.route, %problem, "a model's JSON did not match its schema; asking again");
                    messages.extend(analyze::ask_again(&answer.reply.message.content, &problem));
                }
                Err(problem) => {
                    return Err(Error::Precondition {
                        message: format!(
                            "{}: the model's answer did not match the required JSON Schema twice ({})",
                            answer.route,
                            problem.chars().take(300).collect::<String>()
                        ),
                        reason: "MODEL_OUTPUT_INVALID",
                    });
                }
            }
        }
        Err(Error::Internal("unreachable".into()))
    }

    /// A structured analysis of a text.
    pub(crate) async fn analyze(
        &self,
        who: Attribution,
        text: &str,
        kinds: Vec<Kind>,
        labels: Vec<String>,
        (provider, model): (&str, &str),
    ) -> Result<Structured, Error> {
        let mut v = Vec::new();
        check_attribution(&who, &mut v);
        if text.trim().is_empty() {
            v.push(FieldViolation::new("text", "is required"));
        } else if text.len() > self.engine.settings.max_prompt_bytes {
            v.push(FieldViolation::new(
                "text",
                format!("must be at most {} bytes", self.engine.settings.max_prompt_bytes),
            ));
        }
        let kinds = if kinds.is_empty() {
            Kind::ALL.iter().copied().filter(|k| *k != Kind::Classification || !labels.is_empty()).collect()
        } else {
            kinds
        };
        if kinds.contains(&Kind::Classification) && labels.is_empty() {
            v.push(FieldViolation::new("labels", "are required to classify"));
        }
        if labels.len() > 50 || labels.iter().any(|l| l.trim().is_empty() || l.chars().count() > 100) {
            v.push(FieldViolation::new("labels", "at most 50, each 1 to 100 characters"));
        }
        if !v.is_empty() {
            return Err(Error::fields(v));
        }
        let route = self.engine.catalog.resolve(provider, model)?;
        self.structured(who, Operation::Analyze, route, analyze::messages(text, &kinds, &labels)).await
    }

    /// Code, tests and documentation for a specification.
    pub(crate) async fn generate_code(
        &self,
        who: Attribution,
        spec: &str,
        language: &str,
        (provider, model): (&str, &str),
    ) -> Result<Structured, Error> {
        let mut v = Vec::new();
        check_attribution(&who, &mut v);
        if spec.trim().is_empty() {
            v.push(FieldViolation::new("spec", "is required"));
        } else if spec.len() > self.engine.settings.max_prompt_bytes {
            v.push(FieldViolation::new(
                "spec",
                format!("must be at most {} bytes", self.engine.settings.max_prompt_bytes),
            ));
        }
        if language.trim().is_empty()
            || language.chars().count() > 32
            || language.chars().any(char::is_control)
        {
            v.push(FieldViolation::new("language", "is required: a language name of at most 32 characters"));
        }
        if !v.is_empty() {
            return Err(Error::fields(v));
        }
        let route = self.engine.catalog.resolve(provider, model)?;
        self.structured(who, Operation::Code, route, analyze::code_messages(spec, language)).await
    }

    /// A new conversation of `owner`.
    pub(crate) async fn create_conversation(
        &self,
        owner: &str,
        mut new: NewConversation,
    ) -> Result<Conversation, Error> {
        let mut v = Vec::new();
        if new.title.chars().count() > 200 {
            v.push(FieldViolation::new("title", "must be at most 200 characters"));
        }
        if new.system_prompt.len() > self.engine.settings.max_prompt_bytes {
            v.push(FieldViolation::new("system_prompt", "is too long"));
        }
        if new.token_budget < 0 {
            v.push(FieldViolation::new("token_budget", "must not be negative"));
        }
        check_label(&new.design_id, "design_id", &mut v);
        if !v.is_empty() {
            return Err(Error::fields(v));
        }
        let route = self.engine.catalog.resolve(&new.provider, &new.model)?;
        let window = self.engine.catalog.model(&route).context_window as i32;
        if new.token_budget == 0 {
            new.token_budget = (self.engine.settings.conversation_token_budget as i32).min(window);
        } else if new.token_budget > window {
            return Err(Error::field(
                "token_budget",
                format!("must fit {route}'s context window of {window} tokens"),
            ));
        }
        new.provider = route.provider;
        new.model = route.model;
        self.conversations.create(owner, new).await
    }

    /// Usage totals.
    pub(crate) async fn usage(
        &self,
        query: &Query,
        grouping: Grouping,
        period: Period,
    ) -> Result<Vec<Total>, Error> {
        self.engine.usage.totals(query, grouping, period).await
    }

    /// The models of a provider (or all).
    pub(crate) fn models(&self, provider: &str) -> Result<Vec<ModelInfo>, Error> {
        if !provider.is_empty() && !self.engine.catalog.knows_provider(provider) {
            return Err(Error::field("provider", "is not a configured provider"));
        }
        Ok(self.engine.catalog.models(provider))
    }
}

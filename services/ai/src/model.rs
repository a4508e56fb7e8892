//! The AI service's vocabulary, free of gRPC and of any one provider's wire format.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// A model's request to run a tool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ToolCall {
    pub(crate) id: String,
    pub(crate) name: String,
    /// A JSON object, as text.
    pub(crate) arguments: String,
}

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Message {
    pub(crate) role: Role,
    pub(crate) content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) tool_call_id: String,
}

impl Message {
    pub(crate) fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into(), tool_calls: Vec::new(), tool_call_id: String::new() }
    }
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolSpec {
    pub(crate) name: String,
    pub(crate) description: String,
    /// JSON Schema of the arguments.
    pub(crate) parameters: Value,
}

/// What the model must answer with.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) enum ResponseFormat {
    /// Free text.
    #[default]
    Text,
    /// One JSON value matching `schema` (named `name` for the provider).
    Json { name: String, schema: Value },
}

/// Tokens a call consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Tokens {
    pub(crate) prompt: u64,
    pub(crate) completion: u64,
    /// Counted here because the provider gave no counts.
    pub(crate) estimated: bool,
}

impl Tokens {
    pub(crate) fn total(&self) -> u64 {
        self.prompt + self.completion
    }
}

/// What a provider answered.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reply {
    pub(crate) message: Message,
    /// "stop", "length" or "tool_calls".
    pub(crate) finish_reason: String,
    /// The provider's token counts, when it gave them.
    pub(crate) tokens: Option<Tokens>,
}

/// One piece of a streamed reply.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Piece {
    Text(String),
    ToolCall(ToolCall),
    Done { finish_reason: String, tokens: Option<Tokens> },
}

/// A provider and one of its models.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Route {
    pub(crate) provider: String,
    pub(crate) model: String,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)
    }
}

/// Whose a request is, for limits, budgets and usage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Attribution {
    /// The user it is for (the caller, or whom a service acts for).
    pub(crate) user_id: String,
    /// The caller, when it acts for someone else.
    pub(crate) on_behalf_by: String,
    pub(crate) design_id: String,
    pub(crate) execution_id: String,
    pub(crate) node_id: String,
    pub(crate) conversation_id: String,
}

/// What kind of call a usage record is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Chat,
    Stream,
    Analyze,
    Code,
}

impl Operation {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Operation::Chat => "chat",
            Operation::Stream => "stream",
            Operation::Analyze => "analyze",
            Operation::Code => "code",
        }
    }
}

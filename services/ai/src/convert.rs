//! Conversions between the service's domain types and the API's protobuf messages.

use chrono::{DateTime, Utc};
use csp_platform::FieldViolation;
use csp_proto::{ai::v1 as pb, json as pbjson};
use serde_json::Value;

use crate::{
    analyze::Kind,
    conversations::Conversation,
    model::{Message, Role, Tokens, ToolCall, ToolSpec},
    service::{ChatInput, ChatOutput},
    tools::Tool,
};

pub(crate) fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: time.timestamp(), nanos: time.timestamp_subsec_nanos() as i32 }
}

pub(crate) fn time(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
}

fn role_to_pb(role: Role) -> pb::MessageRole {
    match role {
        Role::System => pb::MessageRole::System,
        Role::User => pb::MessageRole::User,
        Role::Assistant => pb::MessageRole::Assistant,
        Role::Tool => pb::MessageRole::Tool,
    }
}

pub(crate) fn tool_call_to_pb(c: &ToolCall) -> pb::ToolCall {
    pb::ToolCall { id: c.id.clone(), name: c.name.clone(), arguments_json: c.arguments.clone() }
}

pub(crate) fn message_to_pb(m: &Message, at: Option<DateTime<Utc>>) -> pb::ChatMessage {
    pb::ChatMessage {
        role: role_to_pb(m.role) as i32,
        content: m.content.clone(),
        tool_calls: m.tool_calls.iter().map(tool_call_to_pb).collect(),
        tool_call_id: m.tool_call_id.clone(),
        time: at.map(timestamp),
    }
}

fn message_from_pb(m: pb::ChatMessage, field: &str, v: &mut Vec<FieldViolation>) -> Option<Message> {
    let role = match pb::MessageRole::try_from(m.role).unwrap_or_default() {
        pb::MessageRole::System => Role::System,
        pb::MessageRole::User => Role::User,
        pb::MessageRole::Assistant => Role::Assistant,
        pb::MessageRole::Tool => Role::Tool,
        pb::MessageRole::Unspecified => {
            v.push(FieldViolation::new(format!("{field}.role"), "is required"));
            return None;
        }
    };
    Some(Message {
        role,
        content: m.content,
        tool_calls: m
            .tool_calls
            .into_iter()
            .map(|c| ToolCall { id: c.id, name: c.name, arguments: c.arguments_json })
            .collect(),
        tool_call_id: m.tool_call_id,
    })
}

fn tool_from_pb(t: pb::Tool) -> Tool {
    Tool {
        spec: ToolSpec {
            name: t.name,
            description: t.description,
            parameters: t.parameters.map(pbjson::from_struct).unwrap_or(Value::Null),
        },
        component_type: t.component_type,
        config: t.component_config.map(pbjson::from_struct).unwrap_or(Value::Null),
        remote_address: t.remote_address,
    }
}

/// A chat request's turn; violations name fields under `prefix` (e.g. `chat.`).
pub(crate) fn chat_from_pb(r: pb::ChatRequest, prefix: &str, v: &mut Vec<FieldViolation>) -> ChatInput {
    let messages = r
        .messages
        .into_iter()
        .enumerate()
        .filter_map(|(i, m)| message_from_pb(m, &format!("{prefix}messages[{i}]"), v))
        .collect();
    ChatInput {
        provider: r.provider,
        model: r.model,
        messages,
        conversation_id: r.conversation_id,
        tools: r.tools.into_iter().map(tool_from_pb).collect(),
        run_tools: r.run_tools,
        max_steps: r.max_steps,
        temperature: r.temperature,
        max_tokens: r.max_tokens,
    }
}

pub(crate) fn usage_to_pb(tokens: Tokens, cost_usd: f64) -> pb::Usage {
    pb::Usage {
        prompt_tokens: tokens.prompt as i64,
        completion_tokens: tokens.completion as i64,
        total_tokens: tokens.total() as i64,
        cost_usd,
        estimated: tokens.estimated,
    }
}

pub(crate) fn chat_to_pb(out: ChatOutput) -> pb::ChatResponse {
    pb::ChatResponse {
        message: Some(message_to_pb(&out.message, None)),
        steps: out.steps.iter().map(|m| message_to_pb(m, None)).collect(),
        finish_reason: out.finish_reason,
        usage: Some(usage_to_pb(out.tokens, out.cost_usd)),
        provider: out.route.provider,
        model: out.route.model,
    }
}

pub(crate) fn kinds_from_pb(kinds: &[i32], v: &mut Vec<FieldViolation>) -> Vec<Kind> {
    let mut out = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        let kind = match pb::AnalysisKind::try_from(*kind).unwrap_or_default() {
            pb::AnalysisKind::Sentiment => Kind::Sentiment,
            pb::AnalysisKind::Summary => Kind::Summary,
            pb::AnalysisKind::Keywords => Kind::Keywords,
            pb::AnalysisKind::Classification => Kind::Classification,
            pb::AnalysisKind::Entities => Kind::Entities,
            pb::AnalysisKind::Unspecified => {
                v.push(FieldViolation::new(format!("kinds[{i}]"), "is not a kind of analysis"));
                continue;
            }
        };
        if !out.contains(&kind) {
            out.push(kind);
        }
    }
    out.sort();
    out
}

pub(crate) fn conversation_to_pb(c: &Conversation) -> pb::Conversation {
    pb::Conversation {
        id: c.id.clone(),
        owner_id: c.owner_id.clone(),
        title: c.title.clone(),
        provider: c.provider.clone(),
        model: c.model.clone(),
        system_prompt: c.system_prompt.clone(),
        token_budget: c.token_budget,
        design_id: c.design_id.clone(),
        message_count: c.message_count,
        created_at: Some(timestamp(c.created_at)),
        updated_at: Some(timestamp(c.updated_at)),
    }
}

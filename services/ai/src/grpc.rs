//! The gRPC adapter of `csp.ai.v1.AiService`.
//!
//! Every call needs the `ai.use` permission. A request made on behalf of another user
//! (`on_behalf_of`) needs the `service` role; a design named for accounting must be one the
//! caller may see (asked of the design service with their token), unless a service makes the
//! request. Conversations are their owner's (admins see all); GetUsage shows the caller's own
//! usage, anyone's to admins.

use std::{pin::Pin, sync::Arc};

use csp_platform::{
    FieldViolation,
    auth::{Permission, Principal, Role, require},
};
use csp_proto::{ai::v1 as pb, ai::v1::ai_service_server::AiService, json as pbjson};
use futures::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use crate::{
    calls::Chunk,
    conversations::NewConversation,
    convert,
    designs::{Credentials, Designs},
    error::Error,
    model::Attribution,
    service::Ai,
    usage::{Grouping, Period, Query, Total},
};

/// The service's gRPC face.
pub(crate) struct AiApi {
    ai: Arc<Ai>,
    designs: Designs,
}

impl AiApi {
    pub(crate) fn new(ai: Arc<Ai>, designs: Designs) -> Self {
        Self { ai, designs }
    }

    /// Whose a request is: the caller's, or — for a service — the user it names.
    async fn attribution<T>(
        &self,
        request: &Request<T>,
        p: &Principal,
        (on_behalf_of, design_id, execution_id, node_id): (&str, &str, &str, &str),
    ) -> Result<Attribution, Error> {
        let service = p.roles.contains(&Role::Service);
        let mut who = Attribution {
            user_id: p.user_id.clone(),
            design_id: design_id.to_owned(),
            execution_id: execution_id.to_owned(),
            node_id: node_id.to_owned(),
            ..Default::default()
        };
        if !on_behalf_of.is_empty() {
            if !service {
                return Err(Error::Forbidden(
                    "only services (the `service` role) may make requests on behalf of a user".into(),
                ));
            }
            if on_behalf_of.len() > 64 || on_behalf_of.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(Error::field("on_behalf_of", "is not a user id"));
            }
            who.user_id = on_behalf_of.to_owned();
            who.on_behalf_by.clone_from(&p.user_id);
        }
        if !design_id.is_empty() && !service {
            if uuid::Uuid::parse_str(design_id).is_err() {
                return Err(Error::field("design_id", "is not a design id (a UUID)"));
            }
            let credentials: Credentials = request.metadata().get("authorization").cloned();
            self.designs.check(&p.user_id, &credentials, design_id).await?;
        }
        Ok(who)
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn total_to_pb(t: Total) -> pb::UsageTotal {
    pb::UsageTotal {
        key: t.key,
        requests: t.requests,
        usage: Some(pb::Usage {
            prompt_tokens: t.prompt_tokens,
            completion_tokens: t.completion_tokens,
            total_tokens: t.prompt_tokens + t.completion_tokens,
            cost_usd: t.cost_usd,
            estimated: t.estimated,
        }),
        period: t.period,
    }
}

fn page_size(requested: i32) -> Result<u64, Error> {
    match requested {
        0 => Ok(50),
        n if n < 0 => Err(Error::field("page_size", "must not be negative")),
        n => Ok(n.min(500) as u64),
    }
}

#[tonic::async_trait]
impl AiService for AiApi {
    type ChatStreamStream = EventStream<pb::ChatStreamResponse>;

    #[tracing::instrument(skip_all)]
    async fn chat(&self, request: Request<pb::ChatRequest>) -> Result<Response<pb::ChatResponse>, Status> {
        let p = require(&request, Permission::AiUse)?;
        let r = request.get_ref();
        let who = self
            .attribution(&request, &p, (&r.on_behalf_of, &r.design_id, &r.execution_id, &r.node_id))
            .await?;
        let mut v = Vec::new();
        let input = convert::chat_from_pb(request.into_inner(), "", &mut v);
        if !v.is_empty() {
            return Err(Error::fields(v).into());
        }
        let out = self.ai.chat(who, p.is_admin(), input).await?;
        Ok(Response::new(convert::chat_to_pb(out)))
    }

    #[tracing::instrument(skip_all)]
    async fn chat_stream(
        &self,
        request: Request<pb::ChatStreamRequest>,
    ) -> Result<Response<Self::ChatStreamStream>, Status> {
        let p = require(&request, Permission::AiUse)?;
        let chat = request.get_ref().chat.clone().unwrap_or_default();
        let who = self
            .attribution(
                &request,
                &p,
                (&chat.on_behalf_of, &chat.design_id, &chat.execution_id, &chat.node_id),
            )
            .await?;
        let mut v = Vec::new();
        let input = convert::chat_from_pb(chat, "chat.", &mut v);
        if !v.is_empty() {
            return Err(Error::fields(v).into());
        }
        let (route, chunks) = self.ai.chat_stream(who, p.is_admin(), input).await?;
        let responses = chunks.map(move |chunk| {
            let kind = match chunk? {
                Chunk::Text(text) => pb::chat_stream_response::Kind::Delta(text),
                Chunk::ToolCall(call) => {
                    pb::chat_stream_response::Kind::ToolCall(convert::tool_call_to_pb(&call))
                }
                Chunk::Done { finish_reason, tokens, cost_usd } => {
                    pb::chat_stream_response::Kind::Done(pb::ChatStreamDone {
                        finish_reason,
                        usage: Some(convert::usage_to_pb(tokens, cost_usd)),
                        provider: route.provider.clone(),
                        model: route.model.clone(),
                    })
                }
            };
            Ok(pb::ChatStreamResponse { kind: Some(kind) })
        });
        Ok(Response::new(Box::pin(responses.map(|r: Result<_, Error>| r.map_err(Status::from)))))
    }

    #[tracing::instrument(skip_all)]
    async fn create_conversation(
        &self,
        request: Request<pb::CreateConversationRequest>,
    ) -> Result<Response<pb::CreateConversationResponse>, Status> {
        let p = require(&request, Permission::AiUse)?;
        let r = request.get_ref();
        self.attribution(&request, &p, ("", &r.design_id, "", "")).await?;
        let r = request.into_inner();
        let new = NewConversation {
            title: r.title,
            provider: r.provider,
            model: r.model,
            system_prompt: r.system_prompt,
            token_budget: r.token_budget,
            design_id: r.design_id,
        };
        let c = self.ai.create_conversation(&p.user_id, new).await?;
        Ok(Response::new(pb::CreateConversationResponse {
            conversation: Some(convert::conversation_to_pb(&c)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_conversations(
        &self,
        request: Request<pb::ListConversationsRequest>,
    ) -> Result<Response<pb::ListConversationsResponse>, Status> {
        let p = require(&request, Permission::AiUse)?;
        let r = request.into_inner();
        let (rows, next) = self
            .ai
            .conversations
            .list(&p.user_id, &r.design_id, page_size(r.page_size)?, &r.page_token)
            .await?;
        Ok(Response::new(pb::ListConversationsResponse {
            conversations: rows.iter().map(convert::conversation_to_pb).collect(),
            next_page_token: next,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_conversation(
        &self,
        request: Request<pb::GetConversationRequest>,
    ) -> Result<Response<pb::GetConversationResponse>, Status> {
        let p = require(&request, Permission::AiUse)?;
        let id = &request.get_ref().conversation_id;
        let c = self.ai.conversations.get(&p.user_id, p.is_admin(), id).await?;
        let messages = self.ai.conversations.messages(&c.id).await?;
        Ok(Response::new(pb::GetConversationResponse {
            conversation: Some(convert::conversation_to_pb(&c)),
            messages: messages.iter().map(|(m, _, at)| convert::message_to_pb(m, Some(*at))).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_conversation(
        &self,
        request: Request<pb::DeleteConversationRequest>,
    ) -> Result<Response<pb::DeleteConversationResponse>, Status> {
        let p = require(&request, Permission::AiUse)?;
        self.ai.conversations.delete(&p.user_id, p.is_admin(), &request.get_ref().conversation_id).await?;
        Ok(Response::new(pb::DeleteConversationResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn analyze(
        &self,
        request: Request<pb::AnalyzeRequest>,
    ) -> Result<Response<pb::AnalyzeResponse>, Status> {
        let p = require(&request, Permission::AiUse)?;
        let r = request.get_ref();
        let who = self
            .attribution(&request, &p, (&r.on_behalf_of, &r.design_id, &r.execution_id, &r.node_id))
            .await?;
        let r = request.into_inner();
        let mut v = Vec::new();
        let kinds = convert::kinds_from_pb(&r.kinds, &mut v);
        if !v.is_empty() {
            return Err(Error::fields(v).into());
        }
        let out = self.ai.analyze(who, &r.text, kinds, r.labels, (&r.provider, &r.model)).await?;
        Ok(Response::new(pb::AnalyzeResponse {
            result: Some(pbjson::to_struct(out.value)),
            usage: Some(convert::usage_to_pb(out.tokens, out.cost_usd)),
            provider: out.route.provider,
            model: out.route.model,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn generate_code(
        &self,
        request: Request<pb::GenerateCodeRequest>,
    ) -> Result<Response<pb::GenerateCodeResponse>, Status> {
        let p = require(&request, Permission::AiUse)?;
        let r = request.get_ref();
        let who = self
            .attribution(&request, &p, (&r.on_behalf_of, &r.design_id, &r.execution_id, &r.node_id))
            .await?;
        let r = request.into_inner();
        let out = self.ai.generate_code(who, &r.spec, &r.language, (&r.provider, &r.model)).await?;
        let text = |key: &str| out.value.get(key).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        Ok(Response::new(pb::GenerateCodeResponse {
            code: text("code"),
            tests: text("tests"),
            documentation: text("documentation"),
            usage: Some(convert::usage_to_pb(out.tokens, out.cost_usd)),
            provider: out.route.provider,
            model: out.route.model,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let p = require(&request, Permission::AiUse)?;
        let r = request.into_inner();
        let mut v = Vec::new();
        let user_id = match (r.user_id.as_str(), p.is_admin()) {
            ("", true) => None,
            ("", false) => Some(p.user_id.clone()),
            (named, _) if named == p.user_id => Some(p.user_id.clone()),
            (named, true) => Some(named.to_owned()),
            (_, false) => {
                return Err(Error::Forbidden("only admins may read other users' usage".into()).into());
            }
        };
        let start = r.start_time.as_ref().and_then(convert::time);
        let end = r.end_time.as_ref().and_then(convert::time);
        if r.start_time.is_some() && start.is_none() {
            v.push(FieldViolation::new("start_time", "is not a valid time"));
        }
        if r.end_time.is_some() && end.is_none() {
            v.push(FieldViolation::new("end_time", "is not a valid time"));
        }
        if let (Some(s), Some(e)) = (start, end)
            && e <= s
        {
            v.push(FieldViolation::new("end_time", "must be after start_time"));
        }
        for (field, value) in [("design_id", &r.design_id), ("execution_id", &r.execution_id)] {
            if value.len() > 64 {
                v.push(FieldViolation::new(field, "must be at most 64 characters"));
            }
        }
        if !v.is_empty() {
            return Err(Error::fields(v).into());
        }
        let grouping = match pb::UsageGrouping::try_from(r.group_by).unwrap_or_default() {
            pb::UsageGrouping::Unspecified | pb::UsageGrouping::User => Grouping::User,
            pb::UsageGrouping::Design => Grouping::Design,
            pb::UsageGrouping::Model => Grouping::Model,
            pb::UsageGrouping::Execution => Grouping::Execution,
        };
        let period = match pb::UsagePeriod::try_from(r.period).unwrap_or_default() {
            pb::UsagePeriod::Unspecified => Period::All,
            pb::UsagePeriod::Day => Period::Day,
            pb::UsagePeriod::Month => Period::Month,
        };
        let query = Query {
            user_id,
            design_id: (!r.design_id.is_empty()).then_some(r.design_id),
            execution_id: (!r.execution_id.is_empty()).then_some(r.execution_id),
            start,
            end,
        };
        let totals = self.ai.usage(&query, grouping, period).await?;
        let overall =
            totals.iter().fold(Total { key: "overall".into(), ..Default::default() }, |mut sum, t| {
                sum.requests += t.requests;
                sum.prompt_tokens += t.prompt_tokens;
                sum.completion_tokens += t.completion_tokens;
                sum.cost_usd += t.cost_usd;
                sum.estimated |= t.estimated;
                sum
            });
        Ok(Response::new(pb::GetUsageResponse {
            totals: totals.into_iter().map(total_to_pb).collect(),
            overall: Some(total_to_pb(overall)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        require(&request, Permission::AiUse)?;
        let models = self.ai.models(&request.get_ref().provider)?;
        Ok(Response::new(pb::ListModelsResponse {
            models: models
                .into_iter()
                .map(|m| pb::ModelInfo {
                    provider: m.route.provider,
                    model: m.route.model,
                    context_window: m.settings.context_window.min(i32::MAX as u32) as i32,
                    input_price_per_million: m.settings.input_per_1k * 1000.0,
                    output_price_per_million: m.settings.output_per_1k * 1000.0,
                    supports_tools: m.settings.tools,
                    available: m.available,
                })
                .collect(),
            default_provider: self.ai.engine.catalog.default_provider().to_owned(),
        }))
    }
}

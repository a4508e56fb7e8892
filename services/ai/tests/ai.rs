//! The AI service on the offline provider, on SQLite + the in-memory bus and on PostgreSQL +
//! Redis: chat, streaming, analysis, code, conversations, usage, limits across replicas, and
//! bad input.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{chat, system, user};
use csp_platform::auth::Role;
use csp_proto::{ai::v1 as pb, json as pbjson};
use csp_testkit::{TestEnv, authed};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt as _;

fn fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Chat, a streamed chat, an analysis and code on the offline provider, each recorded with its
/// tokens and cost, and totalled by GetUsage per user, design, model and day.
async fn offline_answers_are_recorded_and_totalled(env: TestEnv) {
    let h = common::start(&env, 1, |_| {}).await;
    let ada = h.designer("ada");
    let design = h.design(&ada).await;
    let mut ai = h.ai();

    let mut request = chat(vec![system("Be brief."), user("What is a bounded channel?")]);
    request.design_id = design.clone();
    let reply = ai.chat(authed(request, &ada)).await.unwrap().into_inner();
    assert_eq!(reply.message.as_ref().unwrap().content, "Offline answer to: What is a bounded channel?");
    assert_eq!(
        (reply.provider.as_str(), reply.model.as_str(), reply.finish_reason.as_str()),
        ("offline", "offline-1", "stop")
    );
    let usage = reply.usage.unwrap();
    assert!(usage.prompt_tokens > 5 && usage.completion_tokens > 3 && !usage.estimated, "{usage:?}");
    assert!(usage.cost_usd > 0.0);

    let request = pb::ChatStreamRequest {
        chat: Some(chat(vec![user("Stream a longer answer about processes and channels, please")])),
    };
    let mut stream = ai.chat_stream(authed(request, &ada)).await.unwrap().into_inner();
    let (mut text, mut done) = (String::new(), None);
    while let Some(piece) = stream.message().await.unwrap() {
        match piece.kind.unwrap() {
            pb::chat_stream_response::Kind::Delta(delta) => text.push_str(&delta),
            pb::chat_stream_response::Kind::Done(d) => done = Some(d),
            pb::chat_stream_response::Kind::ToolCall(_) => panic!("no tools were offered"),
        }
    }
    assert!(text.starts_with("Offline answer to: Stream a longer answer"), "{text}");
    let done = done.expect("a last piece");
    assert_eq!((done.finish_reason.as_str(), done.provider.as_str()), ("stop", "offline"));
    assert!(done.usage.unwrap().completion_tokens > 5);

    let request = pb::AnalyzeRequest {
        text: "I love the new editor. Grace Hopper demoed it in London and the team was delighted.".into(),
        labels: vec!["praise".into(), "complaint".into()],
        design_id: design.clone(),
        ..Default::default()
    };
    let analysis = ai.analyze(authed(request, &ada)).await.unwrap().into_inner();
    let result = pbjson::from_struct(analysis.result.unwrap());
    assert_eq!(result["sentiment"]["label"], "positive");
    assert_eq!(result["classification"]["label"], "praise");
    assert!(result["summary"].as_str().unwrap().starts_with("I love the new editor"));
    assert!(result["keywords"].as_array().unwrap().len() >= 3);
    let entities = result["entities"].as_array().unwrap();
    assert!(entities.contains(&json!({ "text": "London", "type": "location" })), "{entities:?}");
    assert!(entities.contains(&json!({ "text": "Grace Hopper", "type": "person" })), "{entities:?}");

    let request = pb::GenerateCodeRequest {
        spec: "Return the input unchanged.".into(),
        language: "rust".into(),
        ..Default::default()
    };
    let code = ai.generate_code(authed(request, &ada)).await.unwrap().into_inner();
    assert!(code.code.contains("pub fn solution"), "{}", code.code);
    assert!(code.tests.contains("#[test]"));
    assert!(code.documentation.contains("rust"));

    // Four requests, all Ada's; two on the design.
    let usage = |request: pb::GetUsageRequest| {
        let mut ai = ai.clone();
        let token = ada.clone();
        async move { ai.get_usage(authed(request, &token)).await.unwrap().into_inner() }
    };
    let mine = usage(pb::GetUsageRequest::default()).await;
    assert_eq!(mine.totals.len(), 1);
    assert_eq!((mine.totals[0].key.as_str(), mine.totals[0].requests), ("ada", 4));
    let total = mine.overall.unwrap().usage.unwrap();
    assert!(total.cost_usd > 0.0 && total.total_tokens == total.prompt_tokens + total.completion_tokens);
    let by_design = usage(pb::GetUsageRequest {
        design_id: design.clone(),
        group_by: pb::UsageGrouping::Design as i32,
        ..Default::default()
    })
    .await;
    assert_eq!((by_design.totals[0].key.as_str(), by_design.totals[0].requests), (design.as_str(), 2));
    let by_model = usage(pb::GetUsageRequest {
        group_by: pb::UsageGrouping::Model as i32,
        period: pb::UsagePeriod::Day as i32,
        ..Default::default()
    })
    .await;
    assert_eq!(by_model.totals[0].key, "offline/offline-1");
    assert_eq!(by_model.totals[0].period, chrono::Utc::now().format("%Y-%m-%d").to_string());

    // Others see only their own usage; admins see everyone's.
    let bob = h.designer("bob");
    let theirs = ai
        .get_usage(authed(pb::GetUsageRequest { user_id: "ada".into(), ..Default::default() }, &bob))
        .await
        .unwrap_err();
    assert_eq!(theirs.code(), Code::PermissionDenied);
    let admin = h.issuer.token("root", &[Role::Admin]);
    let all = ai
        .get_usage(authed(pb::GetUsageRequest { user_id: "ada".into(), ..Default::default() }, &admin))
        .await
        .unwrap();
    assert_eq!(all.into_inner().totals[0].requests, 4);

    let models = ai.list_models(authed(pb::ListModelsRequest::default(), &ada)).await.unwrap().into_inner();
    assert_eq!(models.default_provider, "offline");
    let offline = models.models.iter().find(|m| m.provider == "offline").unwrap();
    assert!(offline.available && offline.context_window == 32_768);
    let gpt = models.models.iter().find(|m| m.model == "gpt-4o").unwrap();
    assert!(!gpt.available, "no key configured");
    assert!((gpt.input_price_per_million - 2.5).abs() < 1e-9);
}

/// A conversation keeps its history and sends back what fits its budget.
async fn conversations_keep_and_trim_their_history(env: TestEnv) {
    let h = common::start(&env, 1, |_| {}).await;
    let ada = h.designer("ada");
    let mut ai = h.ai();
    let request = pb::CreateConversationRequest {
        title: "Notes".into(),
        system_prompt: "You keep notes.".into(),
        token_budget: 120,
        ..Default::default()
    };
    let conversation =
        ai.create_conversation(authed(request, &ada)).await.unwrap().into_inner().conversation.unwrap();
    assert_eq!(
        (conversation.provider.as_str(), conversation.model.as_str(), conversation.token_budget),
        ("offline", "offline-1", 120)
    );
    let mut prompts = Vec::new();
    for n in 0..6 {
        let mut request = chat(vec![user(&format!("Note {n}: {}", "words ".repeat(15)))]);
        request.conversation_id = conversation.id.clone();
        let reply = ai.chat(authed(request, &ada)).await.unwrap().into_inner();
        prompts.push(reply.usage.unwrap().prompt_tokens);
    }
    assert!(prompts[1] > prompts[0], "history is sent: {prompts:?}");
    assert!(prompts.iter().all(|p| *p <= 130), "and trimmed to the budget: {prompts:?}");
    let got = ai
        .get_conversation(authed(
            pb::GetConversationRequest { conversation_id: conversation.id.clone() },
            &ada,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.messages.len(), 12, "every message is kept");
    assert_eq!(got.conversation.unwrap().message_count, 12);
    assert!(got.messages[11].time.is_some());

    let bob = h.designer("bob");
    let foreign = ai
        .get_conversation(authed(
            pb::GetConversationRequest { conversation_id: conversation.id.clone() },
            &bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound);
    let listed = ai
        .list_conversations(authed(pb::ListConversationsRequest::default(), &ada))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.conversations.len(), 1);
    ai.delete_conversation(authed(
        pb::DeleteConversationRequest { conversation_id: conversation.id.clone() },
        &ada,
    ))
    .await
    .unwrap();
    let gone = ai
        .get_conversation(authed(pb::GetConversationRequest { conversation_id: conversation.id }, &ada))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

/// Two replicas, one Redis (or one in-process bus): concurrent requests from both never
/// settle more tokens than a user's daily budget; the refused ones are RESOURCE_EXHAUSTED with
/// a time to retry.
async fn limits_hold_across_replicas(env: TestEnv) {
    const BUDGET: u64 = 600;
    let h = common::start(&env, 2, |s| {
        s.ai.limits.tokens_per_day = BUDGET;
        s.ai.limits.requests_per_minute = 1_000;
    })
    .await;
    let ada = h.designer("ada");
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let mut ai = h.replicas[i % 2].clone();
            let token = ada.clone();
            tokio::spawn(async move {
                let mut request =
                    chat(vec![user(&format!("Question number {i} about the limits of the service"))]);
                request.max_tokens = 100;
                ai.chat(authed(request, &token)).await
            })
        })
        .collect();
    let (mut granted, mut refused) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => granted += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("600 tokens a day"), "{}", status.message());
                assert!(status.get_details_retry_info().unwrap().retry_delay.unwrap() > Duration::ZERO);
                refused += 1;
            }
        }
    }
    assert!(granted > 0 && refused > 0, "{granted} granted, {refused} refused");
    let usage = h.replicas[0]
        .clone()
        .get_usage(authed(pb::GetUsageRequest::default(), &ada))
        .await
        .unwrap()
        .into_inner();
    let spent = usage.overall.unwrap().usage.unwrap().total_tokens as u64;
    let usage1 = h.replicas[1]
        .clone()
        .get_usage(authed(pb::GetUsageRequest::default(), &ada))
        .await
        .unwrap()
        .into_inner();
    let requests = usage1.overall.unwrap().requests;
    assert_eq!(requests, granted, "one usage record per answered request");
    assert!(spent <= BUDGET, "{spent} tokens settled against a budget of {BUDGET}");
}

/// Bad input: a clear status naming the field, bounded, and no echo of the input.
async fn bad_input_gets_clear_statuses(env: TestEnv) {
    let h = common::start(&env, 1, |_| {}).await;
    let ada = h.designer("ada");
    let mut ai = h.ai();
    let call = |request: pb::ChatRequest| {
        let mut ai = ai.clone();
        let token = ada.clone();
        async move { ai.chat(authed(request, &token)).await.unwrap_err() }
    };
    let mut unknown = chat(vec![user("hi")]);
    unknown.provider = "nope".into();
    assert_eq!(fields(&call(unknown).await), ["provider"]);
    let mut unknown = chat(vec![user("hi")]);
    unknown.model = "gpt-99".into();
    assert_eq!(fields(&call(unknown).await), ["model"]);
    assert_eq!(fields(&call(chat(vec![])).await), ["messages"]);
    // Beyond the server's message limit: refused before it is read, clearly.
    let ten = call(chat(vec![user(&"x".repeat(10 * 1024 * 1024))])).await;
    assert!(matches!(ten.code(), Code::OutOfRange | Code::ResourceExhausted), "{ten:?}");
    let huge = call(chat(vec![user(&"x".repeat(2 * 1024 * 1024))])).await;
    assert_eq!((huge.code(), fields(&huge)), (Code::InvalidArgument, vec!["messages".to_owned()]));
    assert!(huge.message().len() < 300);
    // Fits the byte limit, not the model's context window.
    let long = call(chat(vec![user(&"lorem ipsum dolor ".repeat(45_000))])).await;
    assert_eq!(fields(&long), ["messages"]);
    assert!(long.message().contains("context window"), "{}", long.message());
    let mut bad_tool = chat(vec![user("hi")]);
    bad_tool.tools = vec![pb::Tool {
        name: "look up".into(),
        parameters: Some(pbjson::to_struct(
            json!({ "type": "object", "properties": { "a": { "type": 12 } } }),
        )),
        ..Default::default()
    }];
    assert_eq!(fields(&call(bad_tool).await), ["tools[0].name", "tools[0].parameters"]);
    let mut wild = chat(vec![user("hi")]);
    wild.temperature = Some(5.0);
    wild.max_steps = 100;
    wild.max_tokens = -1;
    assert_eq!(fields(&call(wild).await), ["temperature", "max_tokens", "max_steps"]);
    let mut unrun = chat(vec![user("hi")]);
    unrun.run_tools = true;
    unrun.tools =
        vec![pb::Tool { name: "total".into(), component_type: "transform.map".into(), ..Default::default() }];
    assert_eq!(fields(&call(unrun).await), ["tools[0].component_type"]);

    // Acting for someone else takes the service role; attributing to a design, seeing it.
    let mut impostor = chat(vec![user("hi")]);
    impostor.on_behalf_of = "bob".into();
    assert_eq!(call(impostor).await.code(), Code::PermissionDenied);
    let bobs = h.design(&h.designer("bob")).await;
    let mut foreign = chat(vec![user("hi")]);
    foreign.design_id = bobs.clone();
    assert_eq!(call(foreign).await.code(), Code::NotFound);
    let service = h.issuer.token("executor", &[Role::Service]);
    let mut on_behalf = chat(vec![user("hi")]);
    on_behalf.on_behalf_of = "bob".into();
    on_behalf.design_id = bobs.clone();
    on_behalf.execution_id = "exec-1".into();
    on_behalf.node_id = "ask".into();
    ai.chat(authed(on_behalf, &service)).await.unwrap();
    let admin = h.issuer.token("root", &[Role::Admin]);
    let request = pb::GetUsageRequest {
        execution_id: "exec-1".into(),
        group_by: pb::UsageGrouping::User as i32,
        ..Default::default()
    };
    let usage = ai.get_usage(authed(request, &admin)).await.unwrap().into_inner();
    assert_eq!(usage.totals[0].key, "bob", "counted as the user the service acted for");

    let analyze = ai
        .analyze(authed(
            pb::AnalyzeRequest {
                text: "x".into(),
                kinds: vec![pb::AnalysisKind::Classification as i32],
                ..Default::default()
            },
            &ada,
        ))
        .await
        .unwrap_err();
    assert_eq!(fields(&analyze), ["labels"]);
    let code = ai.generate_code(authed(pb::GenerateCodeRequest::default(), &ada)).await.unwrap_err();
    assert_eq!(fields(&code), ["spec", "language"]);
    let stream = ai
        .chat_stream(authed(
            pb::ChatStreamRequest {
                chat: Some(pb::ChatRequest { run_tools: true, ..chat(vec![user("hi")]) }),
            },
            &ada,
        ))
        .await
        .err()
        .unwrap();
    assert_eq!(fields(&stream), ["chat.run_tools"]);
}

csp_testkit::backend_tests!(
    offline_answers_are_recorded_and_totalled,
    conversations_keep_and_trim_their_history,
    limits_hold_across_replicas,
    bad_input_gets_clear_statuses,
);

//! The provider adapters against local servers speaking each provider's real wire format —
//! OpenAI's chat completions (through async-openai) and Anthropic's Messages API: replies,
//! tool calls, SSE streams with usage, error bodies, 429 with Retry-After, streams cut midway,
//! hangs, fallbacks — and the agent loop with a tool served over gRPC.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{Answer, Upstream, chat, system, user};
use csp_platform::config::{ModelSettings, ProviderKind, ProviderSettings};
use csp_proto::{
    ai::v1 as pb,
    component::v1::{
        self as cpb,
        component_runtime_server::{ComponentRuntime, ComponentRuntimeServer},
    },
    json as pbjson,
};
use csp_testkit::{TestEnv, authed};
use secrecy::SecretString;
use serde_json::{Value, json};
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

const KEY: &str = "sk-test-do-not-leak-1234";

fn provider(kind: ProviderKind, base_url: String, model: &str) -> ProviderSettings {
    ProviderSettings {
        kind,
        base_url: Some(base_url),
        api_key: Some(SecretString::from(KEY.to_owned())),
        api_key_file: None,
        default_model: model.into(),
        models: BTreeMap::from([(
            model.to_owned(),
            ModelSettings { context_window: 100_000, input_per_1k: 0.001, output_per_1k: 0.002, tools: true },
        )]),
    }
}

/// An AI replica whose providers `oa` (OpenAI format) and `an` (Anthropic format) are the
/// given fake upstreams.
async fn start(
    env: &TestEnv,
    openai: &Upstream,
    anthropic: &Upstream,
    tweak: impl FnOnce(&mut csp_platform::Settings),
) -> common::Harness {
    let (oa, an) = (format!("{}/v1", openai.url()), anthropic.url());
    common::start(env, 1, |s| {
        s.ai.providers.insert("oa".into(), provider(ProviderKind::Openai, oa, "m1"));
        s.ai.providers.insert("an".into(), provider(ProviderKind::Anthropic, an, "c1"));
        s.ai.default_provider = "oa".into();
        s.ai.request_timeout = Duration::from_secs(2);
        tweak(s);
    })
    .await
}

fn openai_reply(content: &str, prompt: u64, completion: u64) -> Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m1",
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": "stop" }],
        "usage": { "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion }
    })
}

fn openai_chunk(delta: Value, finish: Option<&str>) -> (&'static str, String) {
    ("", json!({ "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m1", "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] }).to_string())
}

fn openai_usage_chunk(prompt: u64, completion: u64) -> (&'static str, String) {
    ("", json!({ "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m1", "choices": [], "usage": { "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion } }).to_string())
}

fn openai_error(status: u16, message: &str, code: &str) -> Answer {
    Answer::Json(
        status,
        vec![],
        json!({ "error": { "message": message, "type": "invalid_request_error", "param": null, "code": code } }),
    )
}

fn anthropic_reply(blocks: Value, stop: &str, input: u64, output: u64) -> Value {
    json!({ "id": "msg_1", "type": "message", "role": "assistant", "model": "c1", "content": blocks, "stop_reason": stop, "usage": { "input_tokens": input, "output_tokens": output } })
}

fn event(name: &'static str, data: Value) -> (&'static str, String) {
    (name, data.to_string())
}

async fn streamed(
    h: &common::Harness,
    token: &str,
    request: pb::ChatRequest,
) -> (String, Vec<pb::ToolCall>, Result<pb::ChatStreamDone, Status>) {
    let mut stream = h
        .ai()
        .chat_stream(authed(pb::ChatStreamRequest { chat: Some(request) }, token))
        .await
        .unwrap()
        .into_inner();
    let (mut text, mut calls) = (String::new(), Vec::new());
    loop {
        match stream.message().await {
            Ok(Some(piece)) => match piece.kind.unwrap() {
                pb::chat_stream_response::Kind::Delta(delta) => text.push_str(&delta),
                pb::chat_stream_response::Kind::ToolCall(call) => calls.push(call),
                pb::chat_stream_response::Kind::Done(done) => return (text, calls, Ok(done)),
            },
            Ok(None) => return (text, calls, Err(Status::internal("ended without a last piece"))),
            Err(status) => return (text, calls, Err(status)),
        }
    }
}

async fn usage(h: &common::Harness, token: &str) -> pb::Usage {
    h.ai()
        .get_usage(authed(pb::GetUsageRequest::default(), token))
        .await
        .unwrap()
        .into_inner()
        .overall
        .unwrap()
        .usage
        .unwrap()
}

fn reason(status: &Status) -> String {
    status.get_details_error_info().map(|i| i.reason).unwrap_or_default()
}

/// OpenAI's wire format: a reply with usage, tool calls, a stream with usage and fragmented
/// tool calls, and the error bodies, each mapped to a clear status without the key.
async fn openai_replies_streams_and_errors(env: TestEnv) {
    let openai = Upstream::start(vec![
        Answer::Json(200, vec![], openai_reply("Hello from upstream", 11, 7)),
        Answer::Json(200, vec![], json!({
            "id": "x", "object": "chat.completion", "created": 1, "model": "m1",
            "choices": [{ "index": 0, "finish_reason": "tool_calls", "message": { "role": "assistant", "content": null,
                "tool_calls": [{ "id": "call_1", "type": "function", "function": { "name": "lookup", "arguments": "{\"order\":42}" } }] } }],
            "usage": { "prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29 }
        })),
        Answer::Sse(vec![
            openai_chunk(json!({ "role": "assistant", "content": "" }), None),
            openai_chunk(json!({ "content": "Hel" }), None),
            openai_chunk(json!({ "content": "lo!" }), None),
            openai_chunk(json!({}), Some("stop")),
            openai_usage_chunk(13, 2),
            ("", "[DONE]".into()),
        ], false),
        Answer::Sse(vec![
            openai_chunk(json!({ "tool_calls": [{ "index": 0, "id": "call_9", "type": "function", "function": { "name": "look", "arguments": "" } }] }), None),
            openai_chunk(json!({ "tool_calls": [{ "index": 0, "function": { "name": "up", "arguments": "{\"a\":" } }] }), None),
            openai_chunk(json!({ "tool_calls": [{ "index": 0, "function": { "arguments": "1}" } }] }), None),
            openai_chunk(json!({}), Some("tool_calls")),
            openai_usage_chunk(30, 12),
            ("", "[DONE]".into()),
        ], false),
        openai_error(401, "Incorrect API key provided: sk-test-do-*****1234", "invalid_api_key"),
        openai_error(404, "The model `m1` does not exist", "model_not_found"),
        openai_error(400, "This model's maximum context length is 8192 tokens", "context_length_exceeded"),
        Answer::Json(429, vec![("retry-after", "120".into())], json!({ "error": { "message": "Rate limit reached", "type": "requests", "param": null, "code": "rate_limit_exceeded" } })),
        Answer::Sse((0..60).map(|i| openai_chunk(json!({ "content": format!("word{i} ") }), None)).collect(), false),
        Answer::Sse(vec![openai_chunk(json!({ "content": "fine so far" }), None), ("", "{not json".into())], false),
    ])
    .await;
    let anthropic = Upstream::start(vec![]).await;
    let h = start(&env, &openai, &anthropic, |_| {}).await;
    let ada = h.designer("ada");

    let reply =
        h.ai().chat(authed(chat(vec![system("Be kind."), user("Hi")]), &ada)).await.unwrap().into_inner();
    assert_eq!(reply.message.unwrap().content, "Hello from upstream");
    let used = reply.usage.unwrap();
    assert_eq!(
        (used.prompt_tokens, used.completion_tokens, used.estimated),
        (11, 7, false),
        "the provider's counts"
    );
    assert!((used.cost_usd - (11.0 * 0.001 + 7.0 * 0.002) / 1000.0).abs() < 1e-12);
    assert_eq!((reply.provider.as_str(), reply.model.as_str()), ("oa", "m1"));
    let sent = &openai.received()[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
    assert_eq!(sent.body["messages"][0], json!({ "role": "system", "content": "Be kind." }));

    let mut request = chat(vec![user("Where is order 42?")]);
    request.tools = vec![pb::Tool {
        name: "lookup".into(),
        description: "Find an order".into(),
        parameters: Some(pbjson::to_struct(
            json!({ "type": "object", "properties": { "order": { "type": "integer" } } }),
        )),
        ..Default::default()
    }];
    let reply = h.ai().chat(authed(request, &ada)).await.unwrap().into_inner();
    assert_eq!(reply.finish_reason, "tool_calls");
    let call = &reply.message.unwrap().tool_calls[0];
    assert_eq!(
        (call.id.as_str(), call.name.as_str(), call.arguments_json.as_str()),
        ("call_1", "lookup", "{\"order\":42}")
    );
    assert_eq!(openai.received()[1].body["tools"][0]["function"]["name"], "lookup");

    let (text, _, done) = streamed(&h, &ada, chat(vec![user("Say hello")])).await;
    assert_eq!(text, "Hello!");
    let done = done.unwrap();
    let used = done.usage.unwrap();
    assert_eq!(
        (used.prompt_tokens, used.completion_tokens, used.estimated),
        (13, 2, false),
        "usage asked for in the stream"
    );
    assert_eq!(openai.received()[2].body["stream_options"], json!({ "include_usage": true }));

    let (_, calls, done) = streamed(&h, &ada, chat(vec![user("Look it up")])).await;
    assert_eq!(done.unwrap().finish_reason, "tool_calls");
    assert_eq!(
        (calls[0].id.as_str(), calls[0].name.as_str(), calls[0].arguments_json.as_str()),
        ("call_9", "lookup", "{\"a\":1}")
    );

    let bad_key = h.ai().chat(authed(chat(vec![user("hi")]), &ada)).await.unwrap_err();
    assert_eq!(
        (bad_key.code(), reason(&bad_key).as_str()),
        (Code::FailedPrecondition, "PROVIDER_KEY_REFUSED")
    );
    assert!(
        !bad_key.message().contains("sk-test") && !bad_key.message().contains("1234"),
        "{}",
        bad_key.message()
    );
    let no_model = h.ai().chat(authed(chat(vec![user("hi")]), &ada)).await.unwrap_err();
    assert_eq!(no_model.code(), Code::InvalidArgument);
    assert_eq!(no_model.get_details_bad_request().unwrap().field_violations[0].field, "model");
    let too_long = h.ai().chat(authed(chat(vec![user("hi")]), &ada)).await.unwrap_err();
    assert_eq!(too_long.get_details_bad_request().unwrap().field_violations[0].field, "messages");

    // The upstream's rate limit, with no fallback and too long a wait to sit out: passed on
    // with the provider's own time to retry.
    let started = Instant::now();
    let limited = h.ai().chat(authed(chat(vec![user("hi")]), &ada)).await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(limited.get_details_retry_info().unwrap().retry_delay, Some(Duration::from_secs(120)));

    // A client that goes away mid-stream: what it was sent is recorded, as abandoned.
    let before = h
        .ai()
        .get_usage(authed(pb::GetUsageRequest::default(), &ada))
        .await
        .unwrap()
        .into_inner()
        .overall
        .unwrap();
    let request = pb::ChatStreamRequest { chat: Some(chat(vec![user("a long story")])) };
    let mut stream = h.ai().chat_stream(authed(request, &ada)).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after = h
            .ai()
            .get_usage(authed(pb::GetUsageRequest::default(), &ada))
            .await
            .unwrap()
            .into_inner()
            .overall
            .unwrap();
        if after.requests == before.requests + 1 {
            let used = after.usage.unwrap();
            assert!(used.estimated && used.completion_tokens > before.usage.unwrap().completion_tokens);
            break;
        }
        assert!(Instant::now() < deadline, "an abandoned stream left no usage record");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A malformed event ends the stream with a clear status.
    let (text, _, done) = streamed(&h, &ada, chat(vec![user("hi")])).await;
    assert_eq!(text, "fine so far");
    let status = done.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("could not be read"), "{}", status.message());
}

/// 429s are retried after their Retry-After; one that asks too long a wait hands over to the
/// fallback; a stream cut midway still records the tokens it used; a hang is cut off in time; a
/// failing provider hands over to its fallback, and the answer says who answered.
async fn openai_rate_limits_cuts_hangs_and_fallbacks(env: TestEnv) {
    let limited = |seconds: &str| {
        Answer::Json(
            429,
            vec![("retry-after", seconds.to_owned())],
            json!({ "error": { "message": "Rate limit reached", "type": "requests", "param": null, "code": "rate_limit_exceeded" } }),
        )
    };
    let openai = Upstream::start(vec![
        limited("1"),
        Answer::Json(200, vec![], openai_reply("after waiting", 5, 2)),
        limited("120"),
        Answer::Sse(
            vec![
                openai_chunk(json!({ "content": "partial answer that was " }), None),
                openai_chunk(json!({ "content": "cut" }), None),
            ],
            true,
        ),
        Answer::Hang(Duration::from_secs(30)),
        Answer::Json(503, vec![], json!({ "error": { "message": "overloaded" } })),
    ])
    .await;
    let anthropic = Upstream::start(vec![Answer::Json(
        200,
        vec![],
        anthropic_reply(json!([{ "type": "text", "text": "from the fallback" }]), "end_turn", 8, 3),
    )])
    .await;
    let h = start(&env, &openai, &anthropic, |s| {
        s.ai.fallbacks.insert("oa/m1".into(), vec!["an/c1".into()]);
    })
    .await;
    let ada = h.designer("ada");

    let started = Instant::now();
    let reply = h.ai().chat(authed(chat(vec![user("hi")]), &ada)).await.unwrap().into_inner();
    assert_eq!(reply.message.unwrap().content, "after waiting");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After was honoured: {:?}",
        started.elapsed()
    );
    assert_eq!(openai.received().len(), 2);

    // A 429 asking for two minutes is not waited out: the fallback answers at once.
    let started = Instant::now();
    let reply = h.ai().chat(authed(chat(vec![user("hi")]), &ada)).await.unwrap().into_inner();
    assert_eq!(reply.provider, "an");
    assert!(started.elapsed() < Duration::from_secs(5));

    let before = usage(&h, &ada).await;
    let (text, _, done) = streamed(&h, &ada, chat(vec![user("tell me")])).await;
    assert_eq!(text, "partial answer that was cut");
    assert!(done.is_err(), "a cut stream fails");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = usage(&h, &ada).await;
    assert!(after.completion_tokens > before.completion_tokens, "the tokens it generated are recorded");
    assert!(after.estimated, "and marked estimated");

    // A hang: cut at the request timeout (2 s), retried, then the fallback answers.
    let started = Instant::now();
    let reply = h.ai().chat(authed(chat(vec![user("hi")]), &ada)).await.unwrap().into_inner();
    assert_eq!(
        (reply.provider.as_str(), reply.model.as_str()),
        ("an", "c1"),
        "the answer says the fallback answered"
    );
    assert_eq!(reply.message.unwrap().content, "from the fallback");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(15), "{took:?}");
}

/// Anthropic's wire format: a reply with usage, tool use, a stream with usage, JSON through
/// its answer tool, and its errors.
async fn anthropic_replies_streams_and_errors(env: TestEnv) {
    let openai = Upstream::start(vec![]).await;
    let anthropic = Upstream::start(vec![
        Answer::Json(200, vec![], anthropic_reply(json!([{ "type": "text", "text": "Bonjour" }]), "end_turn", 12, 4)),
        Answer::Json(200, vec![], anthropic_reply(json!([{ "type": "text", "text": "Checking." }, { "type": "tool_use", "id": "toolu_1", "name": "lookup", "input": { "order": 7 } }]), "tool_use", 30, 10)),
        Answer::Sse(vec![
            event("message_start", json!({ "type": "message_start", "message": { "id": "m", "type": "message", "role": "assistant", "content": [], "usage": { "input_tokens": 25, "output_tokens": 1 } } })),
            event("content_block_start", json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } })),
            event("ping", json!({ "type": "ping" })),
            event("content_block_delta", json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": "Hello" } })),
            event("content_block_delta", json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": " there" } })),
            event("content_block_stop", json!({ "type": "content_block_stop", "index": 0 })),
            event("message_delta", json!({ "type": "message_delta", "delta": { "stop_reason": "end_turn" }, "usage": { "output_tokens": 6 } })),
            event("message_stop", json!({ "type": "message_stop" })),
        ], false),
        Answer::Json(200, vec![], anthropic_reply(json!([{ "type": "tool_use", "id": "toolu_2", "name": "answer_analysis", "input": { "sentiment": { "label": "negative", "score": -0.8 } } }]), "tool_use", 40, 15)),
        Answer::Json(401, vec![], json!({ "type": "error", "error": { "type": "authentication_error", "message": "invalid x-api-key" } })),
        Answer::Sse(vec![
            event("message_start", json!({ "type": "message_start", "message": { "usage": { "input_tokens": 9, "output_tokens": 1 } } })),
            event("content_block_delta", json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": "half" } })),
        ], true),
    ])
    .await;
    let h = start(&env, &openai, &anthropic, |s| s.ai.default_provider = "an".into()).await;
    let ada = h.designer("ada");

    let reply = h
        .ai()
        .chat(authed(chat(vec![system("French, please."), user("Hello")]), &ada))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message.unwrap().content, "Bonjour");
    let used = reply.usage.unwrap();
    assert_eq!((used.prompt_tokens, used.completion_tokens, used.estimated), (12, 4, false));
    let sent = &anthropic.received()[0];
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!((sent.header("x-api-key"), sent.header("anthropic-version")), (Some(KEY), Some("2023-06-01")));
    assert_eq!(sent.body["system"], "French, please.");
    assert_eq!(
        sent.body["messages"],
        json!([{ "role": "user", "content": [{ "type": "text", "text": "Hello" }] }])
    );

    let mut request = chat(vec![user("Order 7?")]);
    request.tools =
        vec![pb::Tool { name: "lookup".into(), description: "Find".into(), ..Default::default() }];
    let reply = h.ai().chat(authed(request, &ada)).await.unwrap().into_inner();
    assert_eq!(reply.finish_reason, "tool_calls");
    let message = reply.message.unwrap();
    assert_eq!(message.content, "Checking.");
    assert_eq!(
        (message.tool_calls[0].name.as_str(), message.tool_calls[0].arguments_json.as_str()),
        ("lookup", "{\"order\":7}")
    );
    assert_eq!(
        anthropic.received()[1].body["tools"][0]["input_schema"],
        json!({ "type": "object", "properties": {} })
    );

    let (text, _, done) = streamed(&h, &ada, chat(vec![user("Greet me")])).await;
    assert_eq!(text, "Hello there");
    let used = done.unwrap().usage.unwrap();
    assert_eq!(
        (used.prompt_tokens, used.completion_tokens),
        (25, 6),
        "usage from message_start and message_delta"
    );

    let request = pb::AnalyzeRequest {
        text: "This broke again.".into(),
        kinds: vec![pb::AnalysisKind::Sentiment as i32],
        ..Default::default()
    };
    let analysis = h.ai().analyze(authed(request, &ada)).await.unwrap().into_inner();
    assert_eq!(pbjson::from_struct(analysis.result.unwrap())["sentiment"]["label"], "negative");
    assert_eq!(
        anthropic.received()[3].body["tool_choice"],
        json!({ "type": "tool", "name": "answer_analysis" })
    );

    let bad_key = h.ai().chat(authed(chat(vec![user("hi")]), &ada)).await.unwrap_err();
    assert_eq!(reason(&bad_key), "PROVIDER_KEY_REFUSED");
    let (text, _, done) = streamed(&h, &ada, chat(vec![user("hi")])).await;
    assert_eq!(text, "half");
    assert_eq!(done.unwrap_err().code(), Code::Unavailable);
}

/// Analyze asks again once when the JSON does not match its schema, then gives up clearly.
async fn malformed_answers_are_asked_again_once(env: TestEnv) {
    let json_reply = |text: &str| Answer::Json(200, vec![], openai_reply(text, 10, 5));
    let openai = Upstream::start(vec![
        json_reply("Sure! The sentiment is positive."),
        json_reply(r#"{"sentiment": {"label": "positive", "score": 0.9}}"#),
        json_reply(r#"{"sentiment": {"label": "thrilled"}}"#),
        json_reply("still not JSON"),
    ])
    .await;
    let anthropic = Upstream::start(vec![]).await;
    let h = start(&env, &openai, &anthropic, |_| {}).await;
    let ada = h.designer("ada");
    let request = pb::AnalyzeRequest {
        text: "Great!".into(),
        kinds: vec![pb::AnalysisKind::Sentiment as i32],
        ..Default::default()
    };
    let analysis = h.ai().analyze(authed(request.clone(), &ada)).await.unwrap().into_inner();
    assert_eq!(pbjson::from_struct(analysis.result.unwrap())["sentiment"]["label"], "positive");
    assert_eq!(analysis.usage.unwrap().prompt_tokens, 20, "both attempts are counted");
    let asked_again = &openai.received()[1].body["messages"];
    assert!(asked_again[3]["content"].as_str().unwrap().contains("does not match"), "{asked_again}");
    assert_eq!(openai.received()[0].body["response_format"]["type"], "json_schema");

    let failed = h.ai().analyze(authed(request, &ada)).await.unwrap_err();
    assert_eq!((failed.code(), reason(&failed).as_str()), (Code::FailedPrecondition, "MODEL_OUTPUT_INVALID"));
}

type Answers = std::pin::Pin<Box<dyn futures::Stream<Item = Result<cpb::ProcessResponse, Status>> + Send>>;

/// A tool served over gRPC (ComponentRuntime) doubles a number.
struct Doubler;

#[tonic::async_trait]
impl ComponentRuntime for Doubler {
    type ProcessStream = Answers;

    async fn describe(
        &self,
        _: tonic::Request<cpb::DescribeRequest>,
    ) -> Result<tonic::Response<cpb::DescribeResponse>, Status> {
        Ok(tonic::Response::new(cpb::DescribeResponse::default()))
    }

    async fn process(
        &self,
        request: tonic::Request<tonic::Streaming<cpb::ProcessRequest>>,
    ) -> Result<tonic::Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let mut out = Vec::new();
        while let Some(message) = inbound.message().await? {
            if let Some(cpb::process_request::Kind::Message(m)) = message.kind {
                let n = pbjson::from_value(m.payload.unwrap_or_default())["n"].as_f64().unwrap_or(0.0);
                out.push(Ok(cpb::ProcessResponse {
                    kind: Some(cpb::process_response::Kind::Message(cpb::Message {
                        port: "out".into(),
                        payload: Some(pbjson::to_value(json!({ "doubled": n * 2.0 }))),
                        sequence: m.sequence,
                    })),
                }));
            }
        }
        out.push(Ok(cpb::ProcessResponse { kind: Some(cpb::process_response::Kind::Done(cpb::Done {})) }));
        Ok(tonic::Response::new(Box::pin(futures::stream::iter(out))))
    }
}

async fn serve_tool() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ComponentRuntimeServer::new(Doubler))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// The agent loop runs tools served at remote endpoints and feeds their results back; a
/// model that never stops asking for tools is stopped at max_steps.
async fn the_agent_loop_runs_remote_tools_and_stops(env: TestEnv) {
    let tool_call = || {
        Answer::Json(
            200,
            vec![],
            json!({
                "id": "x", "object": "chat.completion", "created": 1, "model": "m1",
                "choices": [{ "index": 0, "finish_reason": "tool_calls", "message": { "role": "assistant", "content": null,
                    "tool_calls": [{ "id": "call_1", "type": "function", "function": { "name": "double", "arguments": "{\"n\": 21}" } }] } }],
                "usage": { "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15 }
            }),
        )
    };
    let openai = Upstream::start(vec![
        tool_call(),
        Answer::Json(200, vec![], openai_reply("It is 42.", 30, 4)),
        tool_call(),
    ])
    .await;
    let anthropic = Upstream::start(vec![]).await;
    let h = start(&env, &openai, &anthropic, |_| {}).await;
    let ada = h.designer("ada");
    let tool = pb::Tool {
        name: "double".into(),
        description: "Doubles n".into(),
        parameters: Some(pbjson::to_struct(
            json!({ "type": "object", "properties": { "n": { "type": "number" } }, "required": ["n"] }),
        )),
        remote_address: format!("http://{}", serve_tool().await),
        ..Default::default()
    };
    let mut request = chat(vec![user("What is 21 doubled?")]);
    request.tools = vec![tool.clone()];
    request.run_tools = true;
    let reply = h.ai().chat(authed(request.clone(), &ada)).await.unwrap().into_inner();
    assert_eq!(reply.message.unwrap().content, "It is 42.");
    assert_eq!(reply.steps.len(), 2, "the model's call and the tool's result");
    let result: Value = serde_json::from_str(&reply.steps[1].content).unwrap();
    assert_eq!(result["doubled"].as_f64(), Some(42.0), "the tool's result is fed back");
    let fed_back = &openai.received()[1].body["messages"];
    assert_eq!(fed_back[2]["role"], "tool");
    assert_eq!(fed_back[2]["tool_call_id"], "call_1");
    assert_eq!(reply.usage.unwrap().prompt_tokens, 40, "every step is counted");

    request.max_steps = 3;
    let endless = h.ai().chat(authed(request, &ada)).await.unwrap_err();
    assert_eq!((endless.code(), reason(&endless).as_str()), (Code::FailedPrecondition, "MAX_STEPS_REACHED"));

    // Offline, the same loop: the offline model calls the tool, then answers with its result.
    let mut offline = chat(vec![user("Please double 5")]);
    offline.provider = "offline".into();
    offline.tools = vec![tool];
    offline.run_tools = true;
    let reply = h.ai().chat(authed(offline, &ada)).await.unwrap().into_inner();
    assert!(reply.message.unwrap().content.contains("doubled"), "the tool's result is used");
}

csp_testkit::backend_tests!(
    openai_replies_streams_and_errors,
    openai_rate_limits_cuts_hangs_and_fallbacks,
    anthropic_replies_streams_and_errors,
    malformed_answers_are_asked_again_once,
    the_agent_loop_runs_remote_tools_and_stops,
);

//! `ai`: the AI service's own overhead. A local upstream speaks OpenAI's chat completions and
//! answers at once; chats are sent at a fixed rate (200, then 1,000 a second) straight to it
//! with an HTTP client, then through the AI service (gRPC, with its limits on Redis and usage
//! records on PostgreSQL), and the latency percentiles are compared. Then the same for the
//! time to the first token of a streamed reply.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use csp_platform::{
    auth::Role,
    config::{ModelSettings, ProviderKind, ProviderSettings},
    server::bind,
};
use csp_proto::ai::v1::{self as pb, ai_service_client::AiServiceClient};
use csp_testkit::{TestIssuer, authed};
use futures::StreamExt as _;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const RATES: [u64; 2] = [200, 1000];
const RUN_FOR: Duration = Duration::from_secs(5);
const WARM_UP: Duration = Duration::from_secs(1);

fn completion() -> Bytes {
    Bytes::from(
        json!({
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "m1",
            "choices": [{ "index": 0, "message": { "role": "assistant", "content": "ok" }, "finish_reason": "stop" }],
            "usage": { "prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13 }
        })
        .to_string(),
    )
}

fn chunks() -> Vec<Bytes> {
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        format!(
            "data: {}\n\n",
            json!({ "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m1", "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] })
        )
    };
    vec![
        Bytes::from(chunk(json!({ "content": "ok" }), None)),
        Bytes::from(chunk(json!({}), Some("stop"))),
        Bytes::from(format!(
            "data: {}\n\n",
            json!({ "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m1", "choices": [], "usage": { "prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13 } })
        )),
        Bytes::from_static(b"data: [DONE]\n\n"),
    ]
}

/// The upstream: OpenAI's wire format, answering at once.
async fn upstream() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let _ = socket.set_nodelay(true);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|request: hyper::Request<hyper::body::Incoming>| async move {
                        let body =
                            request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let stream = serde_json::from_slice::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|b| b["stream"].as_bool())
                            .unwrap_or(false);
                        let response = if stream {
                            let frames = futures::stream::iter(
                                chunks().into_iter().map(|c| Ok::<_, Infallible>(Frame::data(c))),
                            );
                            hyper::Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(http_body_util::BodyExt::boxed(StreamBody::new(frames)))
                        } else {
                            hyper::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(completion()).map_err(|e| match e {}).boxed())
                        };
                        Ok::<_, Infallible>(response.unwrap_or_default())
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Sends `call` at `rate` a second for the warm-up and the run; the latencies of the run's
/// answered calls, and how many the run sent.
async fn at_rate<F, Fut>(rate: u64, call: F) -> (Vec<Duration>, usize)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<Duration>> + Send + 'static,
{
    let call = Arc::new(call);
    let samples: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut sent = 0;
    while started.elapsed() < WARM_UP + RUN_FOR {
        tick.tick().await;
        let counted = started.elapsed() >= WARM_UP;
        sent += usize::from(counted);
        let (call, samples) = (call.clone(), samples.clone());
        tasks.push(tokio::spawn(async move {
            if let Some(took) = call().await
                && counted
            {
                samples.lock().map(|mut s| s.push(took)).ok();
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let mut samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    samples.sort();
    (samples, sent)
}

fn pct(samples: &[Duration], p: f64) -> Duration {
    samples.get(((samples.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn run() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let env = crate::external_env().await;
        let outcome = measure(&env).await;
        env.teardown().await;
        outcome
    })
}

async fn measure(env: &csp_testkit::TestEnv) -> anyhow::Result<()> {
    let upstream = upstream().await?;
    let issuer = TestIssuer::start().await;
    let mut settings = env.settings();
    issuer.point(&mut settings);
    settings.log.level = "error".into();
    settings.ai.providers.insert(
        "fake".into(),
        ProviderSettings {
            kind: ProviderKind::Openai,
            base_url: Some(format!("http://{upstream}/v1")),
            api_key: Some("sk-bench".to_owned().into()),
            api_key_file: None,
            default_model: "m1".into(),
            models: BTreeMap::from([(
                "m1".to_owned(),
                ModelSettings {
                    context_window: 100_000,
                    input_per_1k: 0.001,
                    output_per_1k: 0.002,
                    tools: true,
                },
            )]),
        },
    );
    settings.ai.default_provider = "fake".into();
    settings.ai.limits.requests_per_minute = 1_000_000;
    settings.ai.limits.tokens_per_day = 1_000_000_000_000;
    let stop = CancellationToken::new();
    let listener = bind("ai", "127.0.0.1:0".parse()?).await?;
    let app = csp_ai::Application::with_listener(&settings, env.bus(), listener).await?;
    let addr = app.local_addr();
    tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    let token = Arc::new(issuer.token("bench", &[Role::Designer]));
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(AiServiceClient::new(
            tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?,
        ));
    }
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let body = json!({ "model": "m1", "messages": [{ "role": "user", "content": "How are you today?" }] });
    let url = format!("http://{upstream}/v1/chat/completions");
    let request = || pb::ChatRequest {
        messages: vec![pb::ChatMessage {
            role: pb::MessageRole::User as i32,
            content: "How are you today?".into(),
            ..Default::default()
        }],
        max_tokens: 16,
        ..Default::default()
    };

    for rate in RATES {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        let (direct, _) = at_rate(rate, move || {
            let (http, url, body) = (http.clone(), url.clone(), body.clone());
            async move {
                let started = Instant::now();
                let response = http.post(&url).json(&body).send().await.ok()?;
                response.bytes().await.ok()?;
                Some(started.elapsed())
            }
        })
        .await;
        let (clients_c, token_c) = (clients.clone(), token.clone());
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (through, sent) = at_rate(rate, move || {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut client = clients_c[i % clients_c.len()].clone();
            let (token, request) = (token_c.clone(), request());
            async move {
                let started = Instant::now();
                client.chat(authed(request, &token)).await.ok()?;
                Some(started.elapsed())
            }
        })
        .await;
        println!(
            "ai: {rate} chats/s for {}s through the service (PostgreSQL + Redis): overhead over the upstream p50 {:.2} ms, p99 {:.2} ms (upstream alone p50 {:.2} / p99 {:.2} ms; through the service {:.2} / {:.2} ms; {} of {} answered)",
            RUN_FOR.as_secs(),
            ms(pct(&through, 0.5)) - ms(pct(&direct, 0.5)),
            ms(pct(&through, 0.99)) - ms(pct(&direct, 0.99)),
            ms(pct(&direct, 0.5)),
            ms(pct(&direct, 0.99)),
            ms(pct(&through, 0.5)),
            ms(pct(&through, 0.99)),
            through.len(),
            sent,
        );
    }

    // Time to first token, streamed, at 200 a second.
    let stream_body = json!({ "model": "m1", "stream": true, "messages": [{ "role": "user", "content": "How are you today?" }] });
    let (http_s, url_s) = (http.clone(), url.clone());
    let (direct, _) = at_rate(200, move || {
        let (http, url, body) = (http_s.clone(), url_s.clone(), stream_body.clone());
        async move {
            let started = Instant::now();
            let response = http.post(&url).json(&body).send().await.ok()?;
            let mut bytes = response.bytes_stream();
            bytes.next().await?.ok()?;
            let first = started.elapsed();
            while bytes.next().await.is_some() {}
            Some(first)
        }
    })
    .await;
    let (clients_s, token_s) = (clients.clone(), token.clone());
    let (through, _) = at_rate(200, move || {
        let mut client = clients_s[0].clone();
        let token = token_s.clone();
        let request = pb::ChatStreamRequest { chat: Some(request()) };
        async move {
            let started = Instant::now();
            let mut stream = client.chat_stream(authed(request, &token)).await.ok()?.into_inner();
            stream.message().await.ok()??;
            let first = started.elapsed();
            while let Ok(Some(_)) = stream.message().await {}
            Some(first)
        }
    })
    .await;
    println!(
        "ai: streamed time to first token at 200/s: overhead p50 {:.2} ms, p99 {:.2} ms (upstream alone {:.2} / {:.2} ms)",
        ms(pct(&through, 0.5)) - ms(pct(&direct, 0.5)),
        ms(pct(&through, 0.99)) - ms(pct(&direct, 0.99)),
        ms(pct(&direct, 0.5)),
        ms(pct(&direct, 0.99)),
    );
    stop.cancel();
    Ok(())
}

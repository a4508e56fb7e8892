//! The gateway against a real upstream: a gRPC server (the suite's standard server) serving a
//! test `ExecutorService` that reports what reached it. The other services' addresses point at
//! a closed port, as if those services were down.

#![allow(clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use csp_platform::{GrpcServer, Settings, server::bind};
use csp_proto::executor::v1::{
    Execution, ExecutionEvent, GetExecutionRequest, GetExecutionResponse, WatchExecutionRequest,
    WatchExecutionResponse,
    executor_service_client::ExecutorServiceClient,
    executor_service_server::{ExecutorService, ExecutorServiceServer},
};
use csp_testkit::authed;
use futures::StreamExt as _;
use http_body_util::BodyExt as _;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// What the upstream saw, and a gate the streaming test opens.
#[derive(Default)]
struct Seen {
    calls: AtomicUsize,
    release: Notify,
}

struct TestExecutor(Arc<Seen>);

type WatchStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<WatchExecutionResponse, Status>> + Send + 'static>>;

fn header(request_metadata: &tonic::metadata::MetadataMap, name: &str) -> String {
    request_metadata.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
}

#[tonic::async_trait]
impl ExecutorService for TestExecutor {
    type WatchExecutionStream = WatchStream;

    /// Echoes the id and reports the trace context and deadline it received.
    async fn get_execution(
        &self,
        request: Request<GetExecutionRequest>,
    ) -> Result<Response<GetExecutionResponse>, Status> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        if request.get_ref().execution_id == "faulty" {
            // An upstream that echoes 100 KB into its status, past HTTP/2's header limits.
            return Err(Status::invalid_argument("x".repeat(100_000)));
        }
        let execution = Execution {
            id: request.get_ref().execution_id.clone(),
            design_id: header(request.metadata(), "traceparent"),
            started_by: header(request.metadata(), "grpc-timeout"),
            retry_of: header(request.metadata(), "x-forwarded-for"),
            ..Default::default()
        };
        Ok(Response::new(GetExecutionResponse { execution: Some(execution) }))
    }

    /// Sends event 1 (carrying the grpc-timeout it saw), waits to be released, sends 2 and 3.
    async fn watch_execution(
        &self,
        request: Request<WatchExecutionRequest>,
    ) -> Result<Response<Self::WatchExecutionStream>, Status> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        let deadline = header(request.metadata(), "grpc-timeout");
        let seen = self.0.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let event = |id: &str, note: &str| {
                Ok(WatchExecutionResponse {
                    event: Some(ExecutionEvent {
                        event_id: id.to_owned(),
                        execution_id: note.to_owned(),
                        ..Default::default()
                    }),
                })
            };
            let _ = tx.send(event("1", &deadline)).await;
            seen.release.notified().await;
            let _ = tx.send(event("2", "")).await;
            let _ = tx.send(event("3", "")).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    csp_proto::unimplemented_rpcs! {
        start_execution(csp_proto::executor::v1::StartExecutionRequest) -> csp_proto::executor::v1::StartExecutionResponse;
        list_executions(csp_proto::executor::v1::ListExecutionsRequest) -> csp_proto::executor::v1::ListExecutionsResponse;
        cancel_execution(csp_proto::executor::v1::CancelExecutionRequest) -> csp_proto::executor::v1::CancelExecutionResponse;
        resume_execution(csp_proto::executor::v1::ResumeExecutionRequest) -> csp_proto::executor::v1::ResumeExecutionResponse;
        step_execution(csp_proto::executor::v1::StepExecutionRequest) -> csp_proto::executor::v1::StepExecutionResponse;
        retry_execution(csp_proto::executor::v1::RetryExecutionRequest) -> csp_proto::executor::v1::RetryExecutionResponse;
        list_dead_letters(csp_proto::executor::v1::ListDeadLettersRequest) -> csp_proto::executor::v1::ListDeadLettersResponse;
    }
}

struct Harness {
    gateway: SocketAddr,
    /// The gateway's settings (a second replica of it starts with them).
    settings: Settings,
    seen: Arc<Seen>,
    token: String,
    _issuer: csp_testkit::TestIssuer,
    upstream_stop: CancellationToken,
    stop: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
        self.upstream_stop.cancel();
    }
}

fn init_telemetry() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut settings = Settings::default();
        settings.log.level = "warn".into();
        if let Ok(guard) = csp_platform::telemetry::init(&settings, "gateway-test") {
            std::mem::forget(guard);
        }
    });
}

async fn closed_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

async fn start() -> Harness {
    start_with(false).await
}

/// With `raw`, the upstream is a bare tonic server, without the suite's standard layers (so
/// without their bounds on statuses): a faulty upstream.
async fn start_with(raw: bool) -> Harness {
    start_in(&csp_testkit::TestEnv::embedded().await, raw, |_| ()).await
}

/// The gateway in front of the test executor, on `env`, its settings changed by `tweak`.
async fn start_in(env: &csp_testkit::TestEnv, raw: bool, tweak: impl FnOnce(&mut Settings)) -> Harness {
    init_telemetry();
    let mut settings = env.settings();
    tweak(&mut settings);
    settings.gateway.max_message_bytes = 64 * 1024;
    settings.gateway.cors_origins = vec!["http://designer.example".into()];

    let seen = Arc::new(Seen::default());
    let upstream_stop = CancellationToken::new();
    let listener = bind("executor", "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    if raw {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<ExecutorServiceServer<TestExecutor>>().await;
        let server = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(ExecutorServiceServer::new(TestExecutor(seen.clone())))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                upstream_stop.clone().cancelled_owned(),
            );
        tokio::spawn(server);
    } else {
        let upstream = GrpcServer::new("executor", listener, &settings)
            .unwrap()
            .add_service(ExecutorServiceServer::new(TestExecutor(seen.clone())));
        tokio::spawn(upstream.serve(upstream_stop.clone().cancelled_owned()));
    }

    let down = closed_port().await;
    for service in csp_platform::Service::ALL {
        settings.services.get_mut(service).address = format!("http://{down}");
    }
    settings.services.executor.address = format!("http://{upstream_addr}");
    let issuer = csp_testkit::TestIssuer::start().await;
    issuer.point(&mut settings);
    let token = issuer.token("user-1", &[csp_platform::auth::Role::Designer]);

    let stop = CancellationToken::new();
    let gateway = csp_gateway::Application::with_listener(
        &settings,
        env.bus(),
        bind("gateway", "127.0.0.1:0".parse().unwrap()).await.unwrap(),
    )
    .unwrap();
    let addr = gateway.local_addr();
    tokio::spawn(gateway.run_until_stopped(stop.clone().cancelled_owned()));

    let harness = Harness {
        gateway: addr,
        seen,
        token,
        _issuer: issuer,
        upstream_stop,
        stop,
        settings: settings.clone(),
    };
    wait_for_status(&harness, "csp.executor.v1.ExecutorService", ServingStatus::Serving).await;
    harness
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

async fn health_of(harness: &Harness, service: &str) -> ServingStatus {
    let mut health = HealthClient::new(channel(harness.gateway).await);
    let response = health.check(HealthCheckRequest { service: service.to_owned() }).await.unwrap();
    ServingStatus::try_from(response.into_inner().status).unwrap()
}

async fn wait_for_status(harness: &Harness, service: &str, want: ServingStatus) {
    for _ in 0..100 {
        if health_of(harness, service).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{service} never became {want:?}");
}

/// A client speaking grpc-web over HTTP/1.1, as a browser does.
fn grpc_web_client(
    addr: SocketAddr,
) -> ExecutorServiceClient<
    tonic_web::GrpcWebClientService<
        Client<hyper_util::client::legacy::connect::HttpConnector, tonic_web::GrpcWebCall<tonic::body::Body>>,
    >,
> {
    let http1 = Client::builder(TokioExecutor::new()).build_http();
    let service = tower::ServiceBuilder::new().layer(tonic_web::GrpcWebClientLayer::new()).service(http1);
    ExecutorServiceClient::with_origin(service, format!("http://{addr}").parse().unwrap())
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = client.get(format!("http://{addr}{path}").parse().unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_reach_the_service_with_trace_context_and_a_deadline() {
    let harness = start().await;
    let mut client = ExecutorServiceClient::new(channel(harness.gateway).await);
    let mut request = authed(GetExecutionRequest { execution_id: "e-1".into() }, &harness.token);
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    request.metadata_mut().insert("traceparent", incoming.parse().unwrap());
    let execution = client.get_execution(request).await.unwrap().into_inner().execution.unwrap();

    assert_eq!(execution.id, "e-1");
    let forwarded = execution.design_id;
    assert!(forwarded.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "same trace: {forwarded}");
    assert!(!forwarded.contains("00f067aa0ba902b7"), "the gateway's own span is the parent: {forwarded}");
    assert_eq!(execution.started_by, "30000m", "unary calls without a deadline get the default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streams_pass_through_as_they_are_produced() {
    let harness = start().await;
    let mut client = ExecutorServiceClient::new(channel(harness.gateway).await);
    let mut stream = client
        .watch_execution(authed(
            WatchExecutionRequest { execution_id: "e".into(), after_event_id: String::new() },
            &harness.token,
        ))
        .await
        .unwrap()
        .into_inner();
    // The first event arrives while the upstream is still holding the rest back.
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.event.as_ref().unwrap().event_id, "1");
    assert_eq!(first.event.unwrap().execution_id, "", "streams get no gateway deadline");
    harness.seen.release.notify_one();
    let rest: Vec<String> = stream.map(|r| r.unwrap().event.unwrap().event_id).collect().await;
    assert_eq!(rest, ["2", "3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_reach_services_and_streams_over_grpc_web() {
    let harness = start().await;
    let mut client = grpc_web_client(harness.gateway);
    let execution = client
        .get_execution(authed(GetExecutionRequest { execution_id: "from-browser".into() }, &harness.token))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(execution.id, "from-browser");

    let mut stream = client
        .watch_execution(authed(
            WatchExecutionRequest { execution_id: "e".into(), after_event_id: String::new() },
            &harness.token,
        ))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.event.unwrap().event_id, "1");
    harness.seen.release.notify_one();
    let rest: Vec<String> = stream.map(|r| r.unwrap().event.unwrap().event_id).collect().await;
    assert_eq!(rest, ["2", "3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_services_are_unimplemented() {
    let harness = start().await;
    let mut grpc = tonic::client::Grpc::new(channel(harness.gateway).await);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/csp.nope.v1.NopeService/Do");
    let codec = tonic_prost::ProstCodec::<GetExecutionRequest, GetExecutionResponse>::default();
    let status = grpc.unary(Request::new(GetExecutionRequest::default()), path, codec).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("csp.nope.v1.NopeService"), "{}", status.message());
    assert_eq!(harness.seen.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_before_reaching_the_service() {
    let harness = start().await;
    let big = GetExecutionRequest { execution_id: "x".repeat(100 * 1024) };

    let mut native = ExecutorServiceClient::new(channel(harness.gateway).await);
    let status = native.get_execution(authed(big.clone(), &harness.token)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    let mut web = grpc_web_client(harness.gateway);
    let status = web.get_execution(authed(big, &harness.token)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    assert_eq!(harness.seen.calls.load(Ordering::SeqCst), 0, "the service never saw them");
    // Just under the limit still passes.
    let fits = GetExecutionRequest { execution_id: "x".repeat(60 * 1024) };
    assert_eq!(
        native
            .get_execution(authed(fits, &harness.token))
            .await
            .unwrap()
            .into_inner()
            .execution
            .unwrap()
            .id
            .len(),
        60 * 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_service_is_unavailable_and_reported() {
    let harness = start().await;
    let mut design = csp_proto::design::v1::design_service_client::DesignServiceClient::new(
        channel(harness.gateway).await,
    );
    let request = csp_proto::design::v1::GetDesignRequest { design_id: "d".into(), ..Default::default() };
    let status = design.get_design(authed(request, &harness.token)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("csp.design.v1.DesignService"), "{}", status.message());

    assert_eq!(health_of(&harness, "csp.design.v1.DesignService").await, ServingStatus::NotServing);
    assert_eq!(health_of(&harness, "").await, ServingStatus::Serving, "the gateway itself is fine");

    let (code, body) = http_get(harness.gateway, "/health").await;
    assert_eq!(code, 503);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["status"], "DEGRADED");
    assert_eq!(report["upstreams"]["design"]["status"], "UNREACHABLE");
    assert_eq!(report["upstreams"]["executor"]["status"], "SERVING");
    assert_eq!(report["upstreams"]["executor"]["dependencies"], serde_json::json!({}));

    // When the executor goes away, its health follows.
    harness.upstream_stop.cancel();
    wait_for_status(&harness, "csp.executor.v1.ExecutorService", ServingStatus::NotServing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_configured_origins_only() {
    let harness = start().await;
    let client = Client::builder(TokioExecutor::new()).build_http::<http_body_util::Empty<bytes::Bytes>>();
    let preflight = |origin: &'static str| {
        http::Request::builder()
            .method("OPTIONS")
            .uri(format!("http://{}/csp.executor.v1.ExecutorService/GetExecution", harness.gateway))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,x-grpc-web,authorization")
            .body(http_body_util::Empty::new())
            .unwrap()
    };
    let allowed = client.request(preflight("http://designer.example")).await.unwrap();
    assert!(allowed.status().is_success());
    assert_eq!(allowed.headers()["access-control-allow-origin"], "http://designer.example");
    let allowed_headers = allowed.headers()["access-control-allow-headers"].to_str().unwrap().to_owned();
    assert!(allowed_headers.contains("x-grpc-web") && allowed_headers.contains("authorization"));

    let denied = client.request(preflight("http://evil.example")).await.unwrap();
    assert!(denied.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_describes_the_whole_api() {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let harness = start().await;
    let mut client = ServerReflectionClient::new(channel(harness.gateway).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses =
        client.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    let mut expected: Vec<String> = csp_proto::SERVICE_NAMES.iter().map(|s| (*s).to_owned()).collect();
    expected.extend(
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
        .map(String::from),
    );
    expected.sort();
    assert_eq!(names, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_forwarded_calls_by_code() {
    let harness = start().await;
    let mut client = ExecutorServiceClient::new(channel(harness.gateway).await);
    client
        .get_execution(authed(GetExecutionRequest { execution_id: "m".into() }, &harness.token))
        .await
        .unwrap();
    let (code, text) = http_get(harness.gateway, "/metrics").await;
    assert_eq!(code, 200);
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("csp_grpc_requests_total{")
                && l.contains(r#"server="gateway""#)
                && l.contains(r#"method="GetExecution""#)
                && l.contains(r#"code="OK""#)
        })
        .unwrap_or_else(|| panic!("no gateway counter for GetExecution in:\n{text}"));
    let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 1.0);
    assert!(text.contains("# TYPE csp_grpc_request_duration_seconds histogram"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_need_a_valid_token_except_the_public_ones() {
    let harness = start().await;
    let mut client = ExecutorServiceClient::new(channel(harness.gateway).await);
    let status = client.get_execution(GetExecutionRequest { execution_id: "e".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("missing access token"), "{status:?}");
    let status =
        client.get_execution(authed(GetExecutionRequest::default(), "not.a.token")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(harness.seen.calls.load(Ordering::SeqCst), 0, "refused at the edge");

    // Login needs no token: it reaches the auth service (here a stand-in that only publishes
    // keys, so it answers UNIMPLEMENTED — but it answered).
    let mut auth =
        csp_proto::auth::v1::auth_service_client::AuthServiceClient::new(channel(harness.gateway).await);
    let status = auth.login(csp_proto::auth::v1::LoginRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    // Health and reflection are public too.
    assert_eq!(health_of(&harness, "").await, ServingStatus::Serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_address_cannot_be_forged() {
    let harness = start().await;
    let mut client = ExecutorServiceClient::new(channel(harness.gateway).await);
    let mut request = authed(GetExecutionRequest { execution_id: "e".into() }, &harness.token);
    request.metadata_mut().insert("x-forwarded-for", "203.0.113.66".parse().unwrap());
    let execution = client.get_execution(request).await.unwrap().into_inner().execution.unwrap();
    assert_eq!(execution.retry_of, "127.0.0.1", "the service sees the real peer");

    // Behind a load balancer the gateway trusts, the balancer's word names the client.
    let env = csp_testkit::TestEnv::embedded().await;
    let behind =
        start_in(&env, false, |s| s.gateway.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()]).await;
    let mut client = ExecutorServiceClient::new(channel(behind.gateway).await);
    let mut request = authed(GetExecutionRequest { execution_id: "e".into() }, &behind.token);
    request.metadata_mut().insert("x-forwarded-for", "203.0.113.66, 10.0.0.1".parse().unwrap());
    let execution = client.get_execution(request).await.unwrap().into_inner().execution.unwrap();
    assert_eq!(execution.retry_of, "203.0.113.66");
}

/// A faulty upstream's oversized status fails that call alone, with a bounded message: the
/// connection the gateway shares with the upstream, and another caller's stream on it, go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_oversized_status_fails_only_its_own_call() {
    let harness = start_with(true).await;
    let mut bystander = ExecutorServiceClient::new(channel(harness.gateway).await);
    let mut stream = bystander
        .watch_execution(authed(
            WatchExecutionRequest { execution_id: "e".into(), after_event_id: String::new() },
            &harness.token,
        ))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.event.unwrap().event_id, "1");

    let mut client = ExecutorServiceClient::new(channel(harness.gateway).await);
    for _ in 0..3 {
        let request = authed(GetExecutionRequest { execution_id: "faulty".into() }, &harness.token);
        let status = client.get_execution(request).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{}",
            &status.message()[..status.message().len().min(100)]
        );
        assert!(
            status.message().len() <= csp_platform::error::MAX_STATUS_MESSAGE,
            "{}",
            status.message().len()
        );
    }
    // Healthy calls still pass, and the bystander's stream ends as the upstream ends it.
    let request = authed(GetExecutionRequest { execution_id: "e-2".into() }, &harness.token);
    assert_eq!(client.get_execution(request).await.unwrap().into_inner().execution.unwrap().id, "e-2");
    harness.seen.release.notify_one();
    let rest: Vec<String> = stream.map(|r| r.unwrap().event.unwrap().event_id).collect().await;
    assert_eq!(rest, ["2", "3"]);
}

/// A browser's grpc-web call over HTTP/1.1 with a message over the limit gets its
/// RESOURCE_EXHAUSTED answer once it has sent its request — not a reset connection while it is
/// still sending — and the connection serves the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_grpc_web_request_is_answered_not_reset() {
    use tokio::io::AsyncWriteExt as _;
    let harness = start().await;
    let mut socket = tokio::net::TcpStream::connect(harness.gateway).await.unwrap();
    let call = |message: &GetExecutionRequest| {
        use prost::Message as _;
        let encoded = message.encode_to_vec();
        let mut body = vec![0u8];
        body.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        body.extend_from_slice(&encoded);
        let head = format!(
            "POST /csp.executor.v1.ExecutorService/GetExecution HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\nauthorization: Bearer {}\r\ncontent-length: {}\r\n\r\n",
            harness.token,
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(&body);
        request
    };
    // 4 MB: far more than the socket buffers hold, so the client is still sending when the
    // gateway has decided.
    let big = call(&GetExecutionRequest { execution_id: "x".repeat(4 * 1024 * 1024) });
    for chunk in big.chunks(64 * 1024) {
        socket.write_all(chunk).await.expect("the gateway reset the connection while the request was sent");
    }
    let first = read_response(&mut socket).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(first.contains("grpc-status: 8") || first.contains("grpc-status:8"), "{first}");

    // The same connection serves the next call.
    socket.write_all(&call(&GetExecutionRequest { execution_id: "e-9".into() })).await.unwrap();
    let second = read_response(&mut socket).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert!(second.contains("e-9"), "{second}");
}

/// Reads one HTTP/1.1 response (headers and a chunked or empty grpc-web body) as text.
async fn read_response(socket: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n =
            tokio::time::timeout(Duration::from_secs(10), socket.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "the connection closed: {}", String::from_utf8_lossy(&buffer));
        buffer.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buffer).to_string();
        if text.contains("\r\n\r\n")
            && text.contains("grpc-status")
            && (text.ends_with("\r\n0\r\n\r\n") || text.contains("content-length: 0"))
        {
            return text;
        }
    }
}

/// Another gateway with the harness's settings, on `env`'s bus: a second replica.
async fn second_gateway(harness: &Harness, env: &csp_testkit::TestEnv) -> SocketAddr {
    let gateway = csp_gateway::Application::with_listener(
        &harness.settings,
        env.bus(),
        bind("gateway", "127.0.0.1:0".parse().unwrap()).await.unwrap(),
    )
    .unwrap();
    let addr = gateway.local_addr();
    tokio::spawn(gateway.run_until_stopped(harness.stop.clone().cancelled_owned()));
    addr
}

/// A token bucket per user (per address without a token), shared by every gateway replica on
/// the same bus: a burst, then RESOURCE_EXHAUSTED with RetryInfo and retry-after, one user's
/// calls never spending another's, and a call passing again once the wait is over.
async fn rate_limits_hold_per_client_across_gateway_replicas(env: csp_testkit::TestEnv) {
    use tonic_types::StatusExt as _;
    let harness = start_in(&env, false, |settings| {
        let limit = &mut settings.gateway.rate_limit;
        (limit.user_per_second, limit.user_burst) = (2.0, 4);
        (limit.anonymous_per_second, limit.anonymous_burst) = (1.0, 2);
    })
    .await;
    let other = second_gateway(&harness, &env).await;
    let mut first = ExecutorServiceClient::new(channel(harness.gateway).await);
    let mut second = ExecutorServiceClient::new(channel(other).await);
    let get = |token: &str| authed(GetExecutionRequest { execution_id: "e".into() }, token);

    // Four calls in a burst, two through each replica, then the bucket is empty on both.
    for i in 0..4 {
        let client = if i % 2 == 0 { &mut first } else { &mut second };
        client.get_execution(get(&harness.token)).await.unwrap();
    }
    let status = second.get_execution(get(&harness.token)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("2 calls a second per user"), "{}", status.message());
    let wait = status.get_details_retry_info().and_then(|r| r.retry_delay).expect("RetryInfo");
    assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500), "{wait:?}");
    assert_eq!(status.metadata().get("retry-after").unwrap(), "1");
    assert!(first.get_execution(get(&harness.token)).await.is_err(), "the other replica refuses too");
    let calls = harness.seen.calls.load(Ordering::SeqCst);
    assert_eq!(calls, 4, "refused calls never reach the service");

    // Another user has a bucket of their own.
    let other_user = harness._issuer.token("user-2", &[csp_platform::auth::Role::Designer]);
    first.get_execution(get(&other_user)).await.unwrap();

    // Once the wait is over, one more call passes.
    tokio::time::sleep(wait + Duration::from_millis(20)).await;
    first.get_execution(get(&harness.token)).await.unwrap();

    // Without a token, by address: two calls reach the auth service (the stand-in here does not
    // sign anyone in), the third is refused before it goes anywhere.
    let mut auth = csp_proto::auth::v1::auth_service_client::AuthServiceClient::new(channel(other).await);
    let login = || csp_proto::auth::v1::LoginRequest {
        login: "who".into(),
        password: "pw".into(),
        ..Default::default()
    };
    for _ in 0..2 {
        let status = auth.login(login()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    }
    let status = auth.login(login()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("per address"), "{}", status.message());
    // Health and reflection are the gateway's own and never limited.
    for _ in 0..10 {
        health_of(&harness, "csp.executor.v1.ExecutorService").await;
    }
}

csp_testkit::backend_tests!(rate_limits_hold_per_client_across_gateway_replicas);

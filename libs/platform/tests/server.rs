//! The standard server: health that follows dependencies, graceful shutdown, reflection.

#![allow(clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use csp_platform::{
    GrpcServer, Settings,
    health::{Dependencies, Probe},
    server::bind,
};
use csp_proto::auth::v1::{
    MeRequest, MeResponse, User,
    auth_service_client::AuthServiceClient,
    auth_service_server::{AuthService, AuthServiceServer},
};
use tonic::{Code, Request, Response, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// `Me` takes as long as the `x-sleep-ms` header asks.
struct Slow;

#[tonic::async_trait]
impl AuthService for Slow {
    async fn me(&self, request: Request<MeRequest>) -> Result<Response<MeResponse>, Status> {
        let millis: u64 =
            request.metadata().get("x-sleep-ms").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(millis)).await;
        Ok(Response::new(MeResponse {
            user: Some(User { id: "u".into(), ..Default::default() }),
            permissions: vec![],
        }))
    }
}

struct Switch(Arc<AtomicBool>);

#[async_trait]
impl Probe for Switch {
    fn name(&self) -> &'static str {
        "database"
    }

    async fn probe(&self) -> Result<String, String> {
        if self.0.load(Ordering::SeqCst) { Ok("test".into()) } else { Err("switched off".into()) }
    }
}

fn settings() -> Settings {
    let mut settings = Settings::default();
    settings.server.health_check_interval = Duration::from_millis(50);
    settings.server.shutdown_delay = Duration::from_millis(300);
    settings.server.drain_timeout = Duration::from_secs(2);
    settings
}

async fn start(
    settings: &Settings,
    up: Arc<AtomicBool>,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = bind("auth", "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let server = GrpcServer::new("auth", listener, settings)
        .unwrap()
        .with_dependencies(Dependencies::new().with(Arc::new(Switch(up))))
        .add_service(AuthServiceServer::new(Slow));
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .serve(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (addr, stop, task)
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

async fn status(addr: SocketAddr, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(channel(addr).await);
    let response = client.check(HealthCheckRequest { service: service.into() }).await.unwrap();
    ServingStatus::try_from(response.into_inner().status).unwrap()
}

async fn eventually(addr: SocketAddr, service: &str, want: ServingStatus) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if status(addr, service).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{service} never became {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_dependencies() {
    let up = Arc::new(AtomicBool::new(false));
    let (addr, stop, task) = start(&settings(), up.clone()).await;
    assert_eq!(status(addr, "csp.auth.v1.AuthService").await, ServingStatus::NotServing);
    assert_eq!(status(addr, "").await, ServingStatus::NotServing);

    up.store(true, Ordering::SeqCst);
    eventually(addr, "csp.auth.v1.AuthService", ServingStatus::Serving).await;
    eventually(addr, "", ServingStatus::Serving).await;

    up.store(false, Ordering::SeqCst);
    eventually(addr, "csp.auth.v1.AuthService", ServingStatus::NotServing).await;
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reports_not_serving_then_lets_calls_finish() {
    let up = Arc::new(AtomicBool::new(true));
    let (addr, stop, task) = start(&settings(), up).await;
    eventually(addr, "csp.auth.v1.AuthService", ServingStatus::Serving).await;

    let mut client = AuthServiceClient::new(channel(addr).await);
    let in_flight = tokio::spawn(async move {
        let mut request = Request::new(MeRequest {});
        request.metadata_mut().insert("x-sleep-ms", "700".parse().unwrap());
        client.me(request).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = Instant::now();
    stop.send(()).unwrap();

    // During the shutdown delay the server still answers, and says it is going away.
    eventually(addr, "csp.auth.v1.AuthService", ServingStatus::NotServing).await;
    assert!(stopping.elapsed() < Duration::from_millis(300));

    let answer = in_flight.await.unwrap();
    assert_eq!(answer.unwrap().into_inner().user.unwrap().id, "u", "the in-flight call finished");
    task.await.unwrap();
    assert!(stopping.elapsed() >= Duration::from_millis(300), "the delay was honoured");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no longer accepting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_longer_than_the_drain_timeout_are_cut() {
    let mut settings = settings();
    settings.server.shutdown_delay = Duration::ZERO;
    settings.server.drain_timeout = Duration::from_millis(300);
    let (addr, stop, task) = start(&settings, Arc::new(AtomicBool::new(true))).await;
    let mut client = AuthServiceClient::new(channel(addr).await);
    let in_flight = tokio::spawn(async move {
        let mut request = Request::new(MeRequest {});
        request.metadata_mut().insert("x-sleep-ms", "10000".parse().unwrap());
        client.me(request).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = Instant::now();
    stop.send(()).unwrap();
    task.await.unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(2), "stopped after the drain timeout");
    assert!(in_flight.await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_are_unimplemented_and_deadlines_apply() {
    let mut settings = settings();
    settings.server.request_timeout = Duration::from_millis(200);
    let (addr, stop, task) = start(&settings, Arc::new(AtomicBool::new(true))).await;
    let mut client = AuthServiceClient::new(channel(addr).await);
    let status = client.login(csp_proto::auth::v1::LoginRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);

    let mut request = Request::new(MeRequest {});
    request.metadata_mut().insert("x-sleep-ms", "2000".parse().unwrap());
    let status = client.me(request).await.unwrap_err();
    assert!(matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded), "{status:?}");
    stop.send(()).unwrap();
    task.await.unwrap();
}

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

    csp_proto::unimplemented_rpcs! {
        register(csp_proto::auth::v1::RegisterRequest) -> csp_proto::auth::v1::RegisterResponse;
        login(csp_proto::auth::v1::LoginRequest) -> csp_proto::auth::v1::LoginResponse;
        refresh(csp_proto::auth::v1::RefreshRequest) -> csp_proto::auth::v1::RefreshResponse;
        logout(csp_proto::auth::v1::LogoutRequest) -> csp_proto::auth::v1::LogoutResponse;
        change_password(csp_proto::auth::v1::ChangePasswordRequest) -> csp_proto::auth::v1::ChangePasswordResponse;
        get_public_keys(csp_proto::auth::v1::GetPublicKeysRequest) -> csp_proto::auth::v1::GetPublicKeysResponse;
        create_user(csp_proto::auth::v1::CreateUserRequest) -> csp_proto::auth::v1::CreateUserResponse;
        list_users(csp_proto::auth::v1::ListUsersRequest) -> csp_proto::auth::v1::ListUsersResponse;
        lookup_users(csp_proto::auth::v1::LookupUsersRequest) -> csp_proto::auth::v1::LookupUsersResponse;
        update_user_roles(csp_proto::auth::v1::UpdateUserRolesRequest) -> csp_proto::auth::v1::UpdateUserRolesResponse;
        disable_user(csp_proto::auth::v1::DisableUserRequest) -> csp_proto::auth::v1::DisableUserResponse;
        create_api_key(csp_proto::auth::v1::CreateApiKeyRequest) -> csp_proto::auth::v1::CreateApiKeyResponse;
        revoke_api_key(csp_proto::auth::v1::RevokeApiKeyRequest) -> csp_proto::auth::v1::RevokeApiKeyResponse;
        list_audit_events(csp_proto::auth::v1::ListAuditEventsRequest) -> csp_proto::auth::v1::ListAuditEventsResponse;
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
    status_on(channel(addr).await, service).await
}

async fn status_on(channel: Channel, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(channel);
    let response = client.check(HealthCheckRequest { service: service.into() }).await.unwrap();
    ServingStatus::try_from(response.into_inner().status).unwrap()
}

/// Waits for `service` to report `want`, asking over one connection (a new connection per
/// check could outlast a short shutdown delay on a busy machine).
async fn eventually(addr: SocketAddr, service: &str, want: ServingStatus) {
    eventually_on(channel(addr).await, service, want).await;
}

async fn eventually_on(channel: Channel, service: &str, want: ServingStatus) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if status_on(channel.clone(), service).await == want {
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
    let mut settings = settings();
    // Long enough that a loaded machine still sees the delay before the listener closes.
    settings.server.shutdown_delay = Duration::from_secs(1);
    let (addr, stop, task) = start(&settings, up).await;
    eventually(addr, "csp.auth.v1.AuthService", ServingStatus::Serving).await;
    // Connected before the shutdown: a new connection may be refused once the delay is over.
    let health = channel(addr).await;

    let mut client = AuthServiceClient::new(channel(addr).await);
    let in_flight = tokio::spawn(async move {
        let mut request = Request::new(MeRequest {});
        request.metadata_mut().insert("x-sleep-ms", "1400".parse().unwrap());
        client.me(request).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = Instant::now();
    stop.send(()).unwrap();

    // During the shutdown delay the server still answers, and says it is going away.
    eventually_on(health, "csp.auth.v1.AuthService", ServingStatus::NotServing).await;
    assert!(stopping.elapsed() < Duration::from_secs(1));

    let answer = in_flight.await.unwrap();
    assert_eq!(answer.unwrap().into_inner().user.unwrap().id, "u", "the in-flight call finished");
    task.await.unwrap();
    assert!(stopping.elapsed() >= Duration::from_secs(1), "the delay was honoured");
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

/// Established TCP connections whose far end is `port` on this machine (Linux `/proc/net`).
fn connections_to(port: u16) -> usize {
    let remote_port = format!(":{port:04X}");
    let established = |line: &&str| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3 && fields[2].ends_with(&remote_port) && fields[3] == "01"
    };
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|table| table.lines().skip(1).filter(established).count())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_in_the_same_process_reaches_the_server_without_a_socket() {
    let mut settings = settings();
    settings.server.shutdown_delay = Duration::ZERO;
    let (addr, stop, task) = start(&settings, Arc::new(AtomicBool::new(true))).await;
    settings.services.auth.address = format!("http://{addr}");
    let mut client = AuthServiceClient::new(
        csp_platform::client::channel(&settings, csp_platform::Service::Auth).unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(50)).await; // the server task is under way

    let user = client.me(Request::new(MeRequest {})).await.unwrap().into_inner().user.unwrap();
    assert_eq!(user.id, "u");
    assert_eq!(connections_to(addr.port()), 0, "the call opened no connection");

    // The caller's deadline holds as over the network.
    let mut request = Request::new(MeRequest {});
    request.set_timeout(Duration::from_millis(100));
    request.metadata_mut().insert("x-sleep-ms", "2000".parse().unwrap());
    let started = Instant::now();
    let status = client.me(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // A server that has stopped is gone for callers in process too.
    stop.send(()).unwrap();
    task.await.unwrap();
    let status = client.me(Request::new(MeRequest {})).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

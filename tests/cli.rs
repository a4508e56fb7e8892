//! Black-box tests of the `csp` binary: started as a user starts it, reached only through the
//! gateway, as a client would.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use common::{
    ADMIN_PASSWORD, Running, channel, create_admin, create_admin_in, csp, design_of, env_vars, http_get,
    login, new_designer,
};

use std::{
    net::SocketAddr,
    path::Path,
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};

use csp_testkit::{Backend, TestEnv};
use futures::StreamExt as _;
use secrecy::ExposeSecret;
use tonic::{Code, Status};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

async fn list_services(addr: SocketAddr) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(channel(addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses =
        client.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    match responses.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// Whether reflection (v1alpha, as grpcurl 1.8 asks) describes `symbol`.
async fn reflection_knows(addr: SocketAddr, symbol: &str) -> bool {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(channel(addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
    };
    let mut responses =
        client.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    matches!(
        responses.next().await.unwrap().unwrap().message_response,
        Some(MessageResponse::FileDescriptorResponse(files)) if !files.file_descriptor_proto.is_empty()
    )
}

async fn serving(addr: SocketAddr, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(channel(addr).await);
    let response = client.check(HealthCheckRequest { service: service.into() }).await.unwrap();
    ServingStatus::try_from(response.into_inner().status).unwrap()
}

/// Waits, as a readiness probe would, until `service` is SERVING on the gateway (which mirrors
/// each upstream's health stream and retries an upstream that is not up yet with a backoff).
async fn wait_serving(addr: SocketAddr, service: &str) {
    let started = Instant::now();
    while serving(addr, service).await != ServingStatus::Serving {
        assert!(started.elapsed() < Duration::from_secs(10), "{service} is not serving");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first-run experience: everything up, discoverable, healthy and measured, then a clean
/// stop on SIGTERM.
async fn the_whole_system_runs_and_stops_cleanly(env: TestEnv) {
    let vars = env_vars(&env);
    create_admin(&env, &vars);
    let mut csp = Running::start(env.dir(), &vars, &["serve"]);
    let addr = csp.gateway;
    let token = login(addr, "admin", ADMIN_PASSWORD).await.unwrap().tokens.unwrap().access_token;

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
    assert_eq!(list_services(addr).await, expected);
    // Error details decode in reflection clients.
    for symbol in ["google.rpc.BadRequest", "google.rpc.ErrorInfo", "google.rpc.RetryInfo"] {
        assert!(reflection_knows(addr, symbol).await, "{symbol}");
    }

    for service in csp_proto::SERVICE_NAMES {
        wait_serving(addr, service).await;
    }

    let (code, body) = http_get(addr, "/health").await;
    assert_eq!(code, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (database, bus) = match env.backend() {
        Backend::Embedded => ("sqlite", "memory"),
        Backend::External => ("postgres", "redis"),
    };
    for service in ["auth", "design", "registry", "executor", "collab", "ai"] {
        let upstream = &report["upstreams"][service];
        assert_eq!(upstream["status"], "SERVING", "{service}: {upstream}");
        // Collaboration keeps nothing in the database: its state lives on the bus.
        let expected = if service == "collab" { serde_json::Value::Null } else { database.into() };
        assert_eq!(upstream["dependencies"]["database"]["detail"], expected, "{service}");
        assert_eq!(upstream["dependencies"]["bus"]["detail"], bus, "{service}");
    }

    // A call reaches its service through the gateway.
    let mut registry =
        csp_proto::registry::v1::registry_service_client::RegistryServiceClient::new(channel(addr).await);
    let request = csp_testkit::authed(csp_proto::registry::v1::ListCategoriesRequest {}, &token);
    let categories = registry.list_categories(request).await.unwrap().into_inner().categories;
    assert_eq!(categories.len(), 8);

    let (code, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.lines().any(|l| l.starts_with("csp_grpc_requests_total{")
            && l.contains(r#"server="registry""#)
            && l.contains(r#"method="ListCategories""#)
            && l.contains(r#"code="OK""#)),
        "the registry counted the call:\n{metrics}"
    );

    let status = csp.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
}

/// `csp migrate` creates each service's storage: a schema per service in PostgreSQL, a file per
/// service in SQLite.
async fn migrate_prepares_every_service(env: TestEnv) {
    let vars = env_vars(&env);
    let output = csp(env.dir())
        .arg("migrate")
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    for service in ["auth", "design", "registry", "executor", "collab", "ai"] {
        assert!(stdout.contains(&format!("migrated {service}")), "{stdout}");
        match env.backend() {
            Backend::Embedded => assert!(env.dir().join(format!("data/{service}.db")).exists()),
            Backend::External => {
                use csp_store::sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
                let url = env.settings().database.url.unwrap().expose_secret().to_owned();
                let db = Database::connect(url.as_str()).await.unwrap();
                let row = db
                    .query_one_raw(Statement::from_string(
                        DbBackend::Postgres,
                        format!(
                            "SELECT count(*) AS n FROM information_schema.tables \
                             WHERE table_schema = '{service}' AND table_name = 'seaql_migrations'"
                        ),
                    ))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(row.try_get::<i64>("", "n").unwrap(), 1, "{service} has its own schema");
                db.close().await.unwrap();
            }
        }
    }
}

/// A new user's first session, as a client sees it through the gateway: the admin creates a
/// designer, who logs in, refreshes, and is disabled — after which the gateway (which verifies
/// tokens itself, never calling auth) refuses the designer's token.
async fn sessions_and_revocation_through_the_gateway(env: TestEnv) {
    use csp_proto::auth::v1 as pb;
    let vars = env_vars(&env);
    create_admin(&env, &vars);
    let csp = Running::start(env.dir(), &vars, &["serve"]);
    let addr = csp.gateway;
    let admin = login(addr, "admin", ADMIN_PASSWORD).await.unwrap().tokens.unwrap().access_token;
    let mut auth = pb::auth_service_client::AuthServiceClient::new(channel(addr).await);

    let request = pb::CreateUserRequest {
        username: "dora".into(),
        email: "dora@example.com".into(),
        password: "correct horse battery staple".into(),
        roles: vec![pb::Role::Designer as i32],
        ..Default::default()
    };
    let dora =
        auth.create_user(csp_testkit::authed(request, &admin)).await.unwrap().into_inner().user.unwrap();
    let tokens = login(addr, "dora", "correct horse battery staple").await.unwrap().tokens.unwrap();
    let me = auth.me(csp_testkit::authed(pb::MeRequest {}, &tokens.access_token)).await.unwrap().into_inner();
    assert_eq!(me.user.unwrap().username, "dora");

    let renewed =
        auth.refresh(pb::RefreshRequest { refresh_token: tokens.refresh_token.clone() }).await.unwrap();
    let renewed = renewed.into_inner().tokens.unwrap();
    let reused = auth.refresh(pb::RefreshRequest { refresh_token: tokens.refresh_token }).await.unwrap_err();
    assert_eq!(reused.code(), Code::Unauthenticated, "the old refresh token is refused");

    // Dora's token reaches the registry.
    let mut registry =
        csp_proto::registry::v1::registry_service_client::RegistryServiceClient::new(channel(addr).await);
    let call = |token: &str| csp_testkit::authed(csp_proto::registry::v1::ListCategoriesRequest {}, token);
    registry.list_categories(call(&renewed.access_token)).await.unwrap();

    let request = pb::DisableUserRequest { user_id: dora.id, reason: "test".into() };
    auth.disable_user(csp_testkit::authed(request, &admin)).await.unwrap();
    let started = Instant::now();
    loop {
        let status = match registry.list_categories(call(&renewed.access_token)).await {
            Ok(_) => Status::ok(""),
            Err(status) => status,
        };
        if status.code() == Code::Unauthenticated {
            assert!(status.message().contains("revoked"), "{status:?}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the gateway still accepts a disabled user's token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The admin is unaffected.
    registry.list_categories(call(&admin)).await.unwrap();
}

/// A new user's first design, through the gateway: create it, add three nodes and two
/// connections, validate, export, and import the export as a copy.
async fn a_first_design_through_the_gateway(env: TestEnv) {
    use csp_proto::design::v1 as pb;
    let vars = env_vars(&env);
    create_admin(&env, &vars);
    let csp = Running::start(env.dir(), &vars, &["serve"]);
    let addr = csp.gateway;
    let token = new_designer(addr).await;
    let mut designs = pb::design_service_client::DesignServiceClient::new(channel(addr).await);

    let request = pb::CreateDesignRequest { name: "Greeting".into(), ..Default::default() };
    let design = designs
        .create_design(csp_testkit::authed(request, &token))
        .await
        .unwrap()
        .into_inner()
        .design
        .unwrap();
    assert_eq!(design.revision, 1);
    let node = |id: &str, type_id: &str, config: serde_json::Value| pb::AddNodeRequest {
        design_id: design.id.clone(),
        expected_revision: 0,
        node: Some(pb::Node {
            id: id.into(),
            r#type: type_id.into(),
            config: Some(csp_proto::json::to_struct(config)),
            ..Default::default()
        }),
    };
    let mut revision = design.revision;
    for (id, type_id, config) in [
        ("hello", "source.constant", serde_json::json!({ "value": { "name": "world" } })),
        ("greet", "transform.template", serde_json::json!({ "template": "Hello, {{ name }}!" })),
        ("show", "sink.log", serde_json::json!({})),
    ] {
        let request = pb::AddNodeRequest { expected_revision: revision, ..node(id, type_id, config) };
        revision =
            designs.add_node(csp_testkit::authed(request, &token)).await.unwrap().into_inner().revision;
    }
    for (id, from, to) in [("c1", "hello", "greet"), ("c2", "greet", "show")] {
        let request = pb::AddConnectionRequest {
            design_id: design.id.clone(),
            expected_revision: revision,
            connection: Some(pb::Connection {
                id: id.into(),
                from: Some(pb::PortAddress { node_id: from.into(), port: "out".into() }),
                to: Some(pb::PortAddress { node_id: to.into(), port: "in".into() }),
                ..Default::default()
            }),
        };
        revision =
            designs.add_connection(csp_testkit::authed(request, &token)).await.unwrap().into_inner().revision;
    }
    assert_eq!(revision, 6);

    let request = pb::ValidateDesignRequest { design_id: design.id.clone(), revision: 0 };
    let verdict = designs.validate_design(csp_testkit::authed(request, &token)).await.unwrap().into_inner();
    assert!(verdict.valid && verdict.findings.is_empty(), "{:?}", verdict.findings);

    let request = pb::ExportDesignRequest { design_id: design.id.clone(), revision: 0 };
    let exported = designs.export_design(csp_testkit::authed(request, &token)).await.unwrap().into_inner();
    assert_eq!(exported.format_version, 1);
    let request =
        pb::ImportDesignRequest { document: exported.document.clone(), name: "Greeting (copy)".into() };
    let copy = designs
        .import_design(csp_testkit::authed(request, &token))
        .await
        .unwrap()
        .into_inner()
        .design
        .unwrap();
    assert_eq!((copy.name.as_str(), copy.nodes.len(), copy.connections.len()), ("Greeting (copy)", 3, 2));
    let request = pb::ListDesignsRequest::default();
    let listed =
        designs.list_designs(csp_testkit::authed(request, &token)).await.unwrap().into_inner().designs;
    assert_eq!(listed.len(), 2);
}

/// A new user's first run, through the gateway: a design of three nodes, an execution started
/// with inputs, its events streamed to the end, and its outputs read back.
async fn a_first_execution_through_the_gateway(env: TestEnv) {
    use csp_proto::executor::v1 as pb;
    use pb::execution_event::Kind as Event;
    let vars = env_vars(&env);
    create_admin(&env, &vars);
    let csp = Running::start(env.dir(), &vars, &["serve"]);
    let addr = csp.gateway;
    let token = new_designer(addr).await;
    let design = design_of(
        addr,
        &token,
        &[
            ("people", "source.input", serde_json::json!({})),
            ("greet", "transform.template", serde_json::json!({ "template": "Hello, {{ name }}!" })),
            ("result", "sink.output", serde_json::json!({})),
        ],
    )
    .await;

    // As the README checks it before the run: no deadlock.
    {
        use csp_proto::design::v1 as design_pb;
        let mut designs = design_pb::design_service_client::DesignServiceClient::new(channel(addr).await);
        let request =
            design_pb::CheckDeadlockRequest { design_id: design.clone(), revision: 0, max_states: 0 };
        let checked =
            designs.check_deadlock(csp_testkit::authed(request, &token)).await.unwrap().into_inner();
        assert_eq!(checked.verdict(), design_pb::DeadlockVerdict::DeadlockFree);
        assert!(checked.states_explored > 1);
    }

    let mut executor = pb::executor_service_client::ExecutorServiceClient::new(channel(addr).await);
    let names = ["Ada", "Grace"].map(|name| csp_proto::json::to_value(serde_json::json!({ "name": name })));
    let request = pb::StartExecutionRequest {
        design_id: design.clone(),
        inputs: [("people".to_owned(), prost_types::ListValue { values: names.to_vec() })].into(),
        ..Default::default()
    };
    let started = executor
        .start_execution(csp_testkit::authed(request, &token))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(started.design_revision, 2);

    let request =
        pb::WatchExecutionRequest { execution_id: started.id.clone(), after_event_id: String::new() };
    let mut stream =
        executor.watch_execution(csp_testkit::authed(request, &token)).await.unwrap().into_inner();
    let mut statuses = Vec::new();
    let mut emitted = Vec::new();
    while let Some(response) = tokio::time::timeout(Duration::from_secs(30), stream.next()).await.unwrap() {
        match response.unwrap().event.unwrap().kind.unwrap() {
            Event::StatusChanged(changed) => statuses.push(changed.status),
            Event::Output(output) => emitted.push(csp_proto::json::from_value(output.payload.unwrap())),
            _ => {}
        }
    }
    let expected = [serde_json::json!("Hello, Ada!"), serde_json::json!("Hello, Grace!")];
    assert_eq!(emitted, expected, "outputs stream live");
    assert_eq!(
        statuses,
        [pb::ExecutionStatus::Queued, pb::ExecutionStatus::Running, pb::ExecutionStatus::Succeeded]
            .map(|s| s as i32),
        "the stream ends once the execution has"
    );

    let request = pb::GetExecutionRequest { execution_id: started.id.clone() };
    let done = executor
        .get_execution(csp_testkit::authed(request, &token))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(done.status, pb::ExecutionStatus::Succeeded as i32);
    let outputs: Vec<serde_json::Value> =
        done.outputs["result"].values.iter().cloned().map(csp_proto::json::from_value).collect();
    assert_eq!(outputs, expected);
}

/// An executor replica that dies mid-run loses nothing: another replica takes its executions
/// over after the lease and runs them again, and every one ends SUCCEEDED, once.
async fn a_replica_that_dies_loses_no_execution(env: TestEnv) {
    use csp_proto::executor::v1 as pb;
    let mut vars = env_vars(&env);
    vars.push(("CSP_EXECUTOR__LEASE".into(), "2s".into()));
    create_admin(&env, &vars);
    // The replica that will die, started first so it is waiting for jobs; it may run many.
    let mut doomed = vars.clone();
    doomed.push(("CSP_SERVICES__EXECUTOR__LISTEN".into(), "127.0.0.1:0".into()));
    let (mut replica, _) =
        Running::spawn(env.dir(), &doomed, &["serve", "--target", "executor"], "executor listening on ");
    // The whole system, whose executor runs one execution at a time.
    let mut survivor = vars.clone();
    survivor.push(("CSP_EXECUTOR__MAX_CONCURRENT".into(), "1".into()));
    let csp = Running::start(env.dir(), &survivor, &["serve"]);
    let addr = csp.gateway;
    let token = new_designer(addr).await;
    let design = design_of(
        addr,
        &token,
        &[
            ("tick", "source.sequence", serde_json::json!({ "count": 15, "interval_ms": 100 })),
            ("result", "sink.output", serde_json::json!({})),
        ],
    )
    .await;
    let mut executor = pb::executor_service_client::ExecutorServiceClient::new(channel(addr).await);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let request = pb::StartExecutionRequest { design_id: design.clone(), ..Default::default() };
        let started = executor.start_execution(csp_testkit::authed(request, &token)).await.unwrap();
        ids.push(started.into_inner().execution.unwrap().id);
    }
    let get = |id: String| {
        let mut executor = executor.clone();
        let token = token.clone();
        async move {
            let request = pb::GetExecutionRequest { execution_id: id };
            executor
                .get_execution(csp_testkit::authed(request, &token))
                .await
                .unwrap()
                .into_inner()
                .execution
                .unwrap()
        }
    };
    // All three running: at most one here, so at least two on the replica.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut running = 0;
        for id in &ids {
            running += usize::from(get(id.clone()).await.status == pb::ExecutionStatus::Running as i32);
        }
        if running == ids.len() {
            break;
        }
        assert!(Instant::now() < deadline, "the executions did not all start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    replica.kill().unwrap(); // SIGKILL: no goodbye, no lease renewal
    replica.wait().unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut taken_over = 0;
    for id in &ids {
        let done = loop {
            let execution = get(id.clone()).await;
            if execution.finished_at.is_some() {
                break execution;
            }
            assert!(Instant::now() < deadline, "execution {id} never ended: {execution:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(done.status, pb::ExecutionStatus::Succeeded as i32, "{done:?}");
        assert_eq!(done.outputs["result"].values.len(), 15, "the rerun's outputs, once");
        if done.attempt == 2 {
            taken_over += 1;
        } else {
            assert_eq!(done.attempt, 1);
        }
    }
    assert!(taken_over >= 2, "the dead replica's executions were run again ({taken_over} were)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_dies_loses_no_execution_external() {
    // Replicas share PostgreSQL and Redis; the embedded default is one process by design.
    csp_testkit::run(Backend::External, a_replica_that_dies_loses_no_execution).await;
}

csp_testkit::backend_tests!(
    the_whole_system_runs_and_stops_cleanly,
    migrate_prepares_every_service,
    sessions_and_revocation_through_the_gateway,
    a_first_design_through_the_gateway,
    a_first_execution_through_the_gateway,
);

/// Runs the binary to completion with a timeout.
fn run_to_end(dir: &Path, args: &[&str], vars: &[(&str, &str)]) -> (ExitStatus, String) {
    let mut child = csp(dir)
        .args(args)
        .envs(vars.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("csp {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let output = child.wait_with_output().unwrap();
    (output.status, String::from_utf8_lossy(&output.stderr).into_owned())
}

/// One clear line, a non-zero exit, no backtrace.
fn assert_one_line_failure(status: ExitStatus, stderr: &str, expected: &[&str]) {
    assert!(!status.success(), "should fail: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr, got:\n{stderr}");
    assert!(lines[0].starts_with("error:"), "{stderr}");
    for fragment in expected {
        assert!(lines[0].contains(fragment), "`{fragment}` missing from: {}", lines[0]);
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_feature_names_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let vars: Vec<(String, String)> =
        [("CSP_GATEWAY__LISTEN", "127.0.0.1:0"), ("CSP_FEATURES__AI", "false"), ("LOG_LEVEL", "warn")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .to_vec();
    create_admin_in(dir.path(), &vars);
    let mut csp = Running::start(dir.path(), &vars, &["serve"]);
    let token = login(csp.gateway, "admin", ADMIN_PASSWORD).await.unwrap().tokens.unwrap().access_token;
    let mut ai = csp_proto::ai::v1::ai_service_client::AiServiceClient::new(channel(csp.gateway).await);
    let request = csp_testkit::authed(csp_proto::ai::v1::ListModelsRequest::default(), &token);
    let status = ai.list_models(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("features.ai"), "{}", status.message());
    // The service itself is up: switched off is not broken.
    wait_serving(csp.gateway, "csp.ai.v1.AiService").await;
    assert!(csp.terminate().success());
}

/// A first start, with no user yet, says how to create the first admin; once there is one,
/// it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_says_how_to_create_the_first_admin() {
    let dir = tempfile::tempdir().unwrap();
    let vars: Vec<(String, String)> = [("CSP_GATEWAY__LISTEN", "127.0.0.1:0"), ("LOG_LEVEL", "warn")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec();
    let hint = "csp admin create-user --username admin --email admin@example.com --role admin";
    let printed = |csp: &Running| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = csp.stdout.lock().unwrap().clone();
            if lines.iter().any(|l| l.starts_with("all services running")) {
                std::thread::sleep(Duration::from_millis(300));
                return csp.stdout.lock().unwrap().join("\n");
            }
            assert!(Instant::now() < deadline, "{lines:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut csp = Running::start(dir.path(), &vars, &["serve"]);
    let first = printed(&csp);
    assert!(first.contains(hint), "{first}");
    assert!(csp.terminate().success());

    create_admin_in(dir.path(), &vars);
    let mut csp = Running::start(dir.path(), &vars, &["serve"]);
    let again = printed(&csp);
    assert!(!again.contains("create-user"), "{again}");
    assert!(csp.terminate().success());
}

#[test]
fn an_unknown_target_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let (status, stderr) = run_to_end(dir.path(), &["serve", "--target", "frontend"], &[]);
    assert_eq!(status.code(), Some(2));
    assert_one_line_failure(status, &stderr, &["unknown target `frontend`", "executor"]);
}

#[test]
fn a_port_in_use_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, stderr) = run_to_end(dir.path(), &["serve"], &[("CSP_GATEWAY__LISTEN", &addr)]);
    assert_one_line_failure(status, &stderr, &[&format!("cannot listen on {addr} for gateway"), "in use"]);
}

#[test]
fn a_malformed_config_file_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/development.yml"), "gateway:\n  listen: [oops\n").unwrap();
    let (status, stderr) = run_to_end(dir.path(), &["serve"], &[]);
    assert_one_line_failure(status, &stderr, &["invalid configuration", "development.yml"]);
    assert_eq!(status.code(), Some(1));

    std::fs::write(dir.path().join("config/development.yml"), "gateway:\n  lisen: 0.0.0.0:1\n").unwrap();
    let (status, stderr) = run_to_end(dir.path(), &["serve"], &[]);
    assert_one_line_failure(status, &stderr, &["lisen"]);

    let (status, stderr) = run_to_end(dir.path(), &["serve", "--config", "missing.yml"], &[]);
    assert_one_line_failure(status, &stderr, &["missing.yml"]);
}

#[test]
fn a_bad_environment_value_names_its_variable() {
    let dir = tempfile::tempdir().unwrap();
    let (status, stderr) = run_to_end(dir.path(), &["serve"], &[("CSP_GATEWAY__LISTEN", "everywhere")]);
    assert_one_line_failure(status, &stderr, &["gateway.listen", "CSP_GATEWAY__LISTEN"]);
}

#[test]
fn an_unreachable_database_is_one_clear_line_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let (status, stderr) = run_to_end(
        dir.path(),
        &["serve"],
        &[
            ("DATABASE_URL", "postgres://app:hunter2@127.0.0.1:1/csp"),
            ("CSP_DATABASE__CONNECT_TIMEOUT", "2s"),
            ("CSP_GATEWAY__LISTEN", "127.0.0.1:0"),
        ],
    );
    assert_one_line_failure(status, &stderr, &["cannot connect to the database", "127.0.0.1:1"]);
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn an_unreachable_redis_is_one_clear_line_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let (status, stderr) = run_to_end(
        dir.path(),
        &["serve"],
        &[
            ("REDIS_URL", "redis://:hunter2@127.0.0.1:1/0"),
            ("CSP_REDIS__CONNECT_TIMEOUT", "2s"),
            ("CSP_GATEWAY__LISTEN", "127.0.0.1:0"),
        ],
    );
    assert_one_line_failure(status, &stderr, &["cannot connect to the event bus", "127.0.0.1:1"]);
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn the_gateway_has_no_database_to_migrate() {
    let dir = tempfile::tempdir().unwrap();
    let (status, stderr) = run_to_end(dir.path(), &["migrate", "--target", "gateway"], &[]);
    assert_one_line_failure(status, &stderr, &["gateway has no database"]);
}

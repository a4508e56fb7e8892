//! The registry over gRPC, on SQLite + the in-memory bus and on PostgreSQL + Redis.

#![allow(clippy::unwrap_used)]

use std::{net::SocketAddr, time::Duration};

use csp_platform::{auth::Role, server::bind};
use csp_proto::{
    component::v1::{
        DescribeRequest, DescribeResponse, PortSpec as RemotePort, ProcessRequest, ProcessResponse,
        component_runtime_server::{ComponentRuntime, ComponentRuntimeServer},
    },
    json,
    registry::v1::{self as pb, registry_service_client::RegistryServiceClient},
};
use csp_testkit::{TestEnv, TestIssuer, authed};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt as _;

struct Harness {
    client: RegistryServiceClient<Channel>,
    issuer: TestIssuer,
    designer: String,
    registrar: String,
    stop: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(env: &TestEnv) -> Harness {
    let issuer = TestIssuer::start().await;
    let mut settings = env.settings();
    issuer.point(&mut settings);
    settings.registry.health_check_interval = Duration::from_millis(200);
    settings.registry.health_check_timeout = Duration::from_millis(500);
    let listener = bind("registry", "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let app = csp_registry::Application::with_listener(&settings, env.bus(), listener).await.unwrap();
    let addr = app.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    Harness {
        client: RegistryServiceClient::new(channel),
        designer: issuer.token("designer-1", &[Role::Designer]),
        registrar: issuer.token("registrar-1", &[Role::Registrar]),
        issuer,
        stop,
    }
}

fn violations(status: &Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| (v.field, v.description)).collect())
        .unwrap_or_default()
}

async fn validate(h: &mut Harness, type_id: &str, config: Value) -> pb::ValidateConfigResponse {
    let request = pb::ValidateConfigRequest {
        r#type: type_id.into(),
        version: String::new(),
        config: Some(json::to_struct(config)),
    };
    h.client.validate_config(authed(request, &h.designer)).await.unwrap().into_inner()
}

async fn all_types(h: &mut Harness, include_deprecated: bool) -> Vec<pb::ComponentType> {
    let mut types = Vec::new();
    let mut token = String::new();
    loop {
        let request = pb::ListComponentTypesRequest {
            page_size: 7,
            page_token: token,
            include_deprecated,
            ..Default::default()
        };
        let page = h.client.list_component_types(authed(request, &h.designer)).await.unwrap().into_inner();
        types.extend(page.component_types);
        if page.next_page_token.is_empty() {
            return types;
        }
        token = page.next_page_token;
    }
}

/// A bad configuration for every built-in type, and where the registry must point.
fn bad_configs() -> Vec<(&'static str, Value, &'static str)> {
    vec![
        ("source.input", json!({ "name": 5 }), "/name"),
        ("source.constant", json!({ "value": 1, "count": 0 }), "/count"),
        ("source.sequence", json!({ "count": -1 }), "/count"),
        ("sink.output", json!({ "limit": "all" }), "/limit"),
        ("sink.log", json!({ "level": "loud" }), "/level"),
        ("transform.set", json!({ "operations": [{ "op": "set" }] }), "/operations/0/path"),
        ("transform.map", json!({ "expression": ".a |" }), "/expression"),
        ("transform.filter", json!({}), "/expression"),
        ("transform.reduce", json!({ "expression": ".acc + ", "initial": 0 }), "/expression"),
        ("transform.template", json!({ "template": "{% if %}" }), "/template"),
        ("control.switch", json!({ "cases": [] }), "/cases"),
        ("control.split", json!({ "path": "" }), "/path"),
        ("control.join", json!({ "inputs": ["only"] }), "/inputs"),
        ("control.merge", json!({ "colour": "red" }), "/colour"),
        ("control.alt", json!({ "inputs": ["a", "b"], "priority": "random" }), "/priority"),
        ("control.batch", json!({ "size": 0 }), "/size"),
        ("control.delay", json!({ "rate_per_second": 0 }), "/rate_per_second"),
        ("validate.json_schema", json!({ "schema": { "type": "nonsense" } }), "/schema"),
        ("metrics.counter", json!({ "name": "Bad Name" }), "/name"),
        ("metrics.stats", json!({ "every": 0 }), "/every"),
        ("ai.chat", json!({ "temperature": 5 }), "/temperature"),
        ("ai.analyze", json!({ "kinds": ["mood"] }), "/kinds/0"),
        ("ai.agent", json!({ "max_steps": 50 }), "/max_steps"),
        ("ai.codegen", json!({}), "/language"),
        ("remote.call", json!({ "address": "ftp://files" }), "/address"),
        ("design.call", json!({ "design_id": "" }), "/design_id"),
    ]
}

/// Every built-in type accepts its documented examples and rejects a bad configuration,
/// pointing at the bad value.
async fn every_builtin_validates_its_examples_and_points_at_mistakes(env: TestEnv) {
    let mut h = start(&env).await;
    let types = all_types(&mut h, false).await;
    let builtins: Vec<&pb::ComponentType> = types.iter().filter(|t| t.builtin).collect();
    let cases = bad_configs();
    let mut covered: Vec<&str> = cases.iter().map(|(id, _, _)| *id).collect();
    let mut listed: Vec<&str> = builtins.iter().map(|t| t.r#type.as_str()).collect();
    covered.sort();
    listed.sort();
    assert_eq!(covered, listed, "one bad configuration per built-in type");

    for t in &builtins {
        assert!(!t.examples.is_empty(), "{} documents an example", t.r#type);
        for example in &t.examples {
            let config = json::from_struct(example.config.clone().unwrap());
            let verdict = validate(&mut h, &t.r#type, config).await;
            assert!(verdict.valid, "{} example `{}`: {:?}", t.r#type, example.title, verdict.violations);
            assert!(verdict.effective_config.is_some());
        }
    }
    for (type_id, config, pointer) in cases {
        let verdict = validate(&mut h, type_id, config.clone()).await;
        assert!(!verdict.valid, "{type_id} accepted {config}");
        let pointers: Vec<&str> = verdict.violations.iter().map(|v| v.pointer.as_str()).collect();
        assert!(pointers.contains(&pointer), "{type_id}: expected {pointer}, got {:?}", verdict.violations);
    }

    // Defaults are filled in, and configured ports resolved.
    let verdict =
        validate(&mut h, "control.switch", json!({ "cases": [{ "port": "big", "expression": ".n > 9" }] }))
            .await;
    assert_eq!(json::from_struct(verdict.effective_config.unwrap())["mode"], "first");
    let outputs: Vec<&str> = verdict.outputs.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(outputs, ["big", "default", "error"]);
    let verdict = validate(&mut h, "control.join", json!({ "inputs": ["a", "b", "c"] })).await;
    assert_eq!(verdict.inputs.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
}

/// Listing, search, categories, pinned versions and the errors around them.
async fn the_catalogue_can_be_browsed(env: TestEnv) {
    let mut h = start(&env).await;
    let categories = h
        .client
        .list_categories(authed(pb::ListCategoriesRequest {}, &h.designer))
        .await
        .unwrap()
        .into_inner();
    let count_of =
        |c: pb::Category| categories.categories.iter().find(|i| i.category == c as i32).unwrap().count;
    assert_eq!(categories.categories.len(), 8);
    assert_eq!(count_of(pb::Category::Ai), 4);
    assert_eq!(count_of(pb::Category::Source), 3);

    let request =
        pb::ListComponentTypesRequest { category: pb::Category::Transform as i32, ..Default::default() };
    let transforms = h
        .client
        .list_component_types(authed(request, &h.designer))
        .await
        .unwrap()
        .into_inner()
        .component_types;
    let ids: Vec<&str> = transforms.iter().map(|t| t.r#type.as_str()).collect();
    assert_eq!(
        ids,
        ["transform.filter", "transform.map", "transform.reduce", "transform.set", "transform.template"]
    );
    let request = pb::ListComponentTypesRequest { query: "JQ".into(), ..Default::default() };
    let jq = h
        .client
        .list_component_types(authed(request, &h.designer))
        .await
        .unwrap()
        .into_inner()
        .component_types;
    assert!(jq.iter().any(|t| t.r#type == "transform.map") && jq.iter().all(|t| t.r#type != "sink.log"));

    let request = pb::GetComponentTypeRequest { r#type: "control.join".into(), version: "1.0.0".into() };
    let join = h.client.get_component_type(authed(request, &h.designer)).await.unwrap().into_inner();
    let join_type = join.component_type.unwrap();
    assert_eq!(join.versions, ["1.0.0"]);
    assert!(join_type.dynamic_ports);
    assert_eq!(join_type.behaviour.unwrap().read, pb::ReadMode::All as i32);

    let missing = pb::GetComponentTypeRequest { r#type: "transform.nope".into(), version: String::new() };
    assert_eq!(
        h.client.get_component_type(authed(missing, &h.designer)).await.unwrap_err().code(),
        Code::NotFound
    );
    let no_version = pb::GetComponentTypeRequest { r#type: "transform.map".into(), version: "9.9.9".into() };
    assert_eq!(
        h.client.get_component_type(authed(no_version, &h.designer)).await.unwrap_err().code(),
        Code::NotFound
    );
    let bad_version = pb::GetComponentTypeRequest { r#type: "transform.map".into(), version: "one".into() };
    let status = h.client.get_component_type(authed(bad_version, &h.designer)).await.unwrap_err();
    assert_eq!(violations(&status)[0].0, "version");
    let unknown = pb::ValidateConfigRequest { r#type: "acme.nothing".into(), ..Default::default() };
    assert_eq!(
        h.client.validate_config(authed(unknown, &h.designer)).await.unwrap_err().code(),
        Code::NotFound
    );

    // Reading needs a signed-in caller.
    let status = h.client.list_categories(pb::ListCategoriesRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

/// A test remote component: describes a typed `text` input and a `score` output.
struct Sentiment;

#[tonic::async_trait]
impl ComponentRuntime for Sentiment {
    type ProcessStream = futures::stream::Empty<Result<ProcessResponse, Status>>;

    /// Only described: designs check connections against it, nothing runs it.
    async fn process(
        &self,
        _request: tonic::Request<tonic::Streaming<ProcessRequest>>,
    ) -> Result<tonic::Response<Self::ProcessStream>, Status> {
        Err(Status::unimplemented("process is not served here"))
    }

    async fn describe(
        &self,
        _request: tonic::Request<DescribeRequest>,
    ) -> Result<tonic::Response<DescribeResponse>, Status> {
        let port = |name: &str, schema: Value, required: bool| RemotePort {
            name: name.into(),
            description: format!("the {name}"),
            schema: Some(json::to_struct(schema)),
            required,
            multiple: false,
        };
        Ok(tonic::Response::new(DescribeResponse {
            display_name: "Sentiment".into(),
            description: "Scores the sentiment of a text.".into(),
            inputs: vec![port(
                "in",
                json!({ "type": "object", "properties": { "text": { "type": "string" } }, "required": ["text"] }),
                true,
            )],
            outputs: vec![port(
                "out",
                json!({ "type": "object", "properties": { "score": { "type": "number" } }, "required": ["score"] }),
                false,
            )],
            config_schema: Some(json::to_struct(
                json!({ "type": "object", "properties": { "language": { "enum": ["en", "de"] } } }),
            )),
        }))
    }
}

/// Serves the test component (with health) until `stop` fires.
async fn serve_component(stop: CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<ComponentRuntimeServer<Sentiment>>().await;
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(ComponentRuntimeServer::new(Sentiment))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.cancelled_owned(),
            )
            .await
            .unwrap();
    });
    addr
}

fn remote_draft(type_id: &str, version: &str, address: &str) -> pb::ComponentType {
    pb::ComponentType {
        r#type: type_id.into(),
        version: version.into(),
        category: pb::Category::Remote as i32,
        display_name: "Sentiment".into(),
        remote: Some(pb::RemoteEndpoint { address: address.into(), timeout_ms: 2000, ..Default::default() }),
        ..Default::default()
    }
}

async fn availability(h: &mut Harness, type_id: &str) -> i32 {
    let request = pb::GetComponentTypeRequest { r#type: type_id.into(), version: String::new() };
    let t = h.client.get_component_type(authed(request, &h.designer)).await.unwrap().into_inner();
    t.component_type.unwrap().remote.unwrap().availability
}

/// A remote component is registered (its ports come from Describe), listed as available, and
/// as unavailable once its process stops.
async fn remote_components_are_registered_and_watched(env: TestEnv) {
    let mut h = start(&env).await;
    let component_stop = CancellationToken::new();
    let addr = serve_component(component_stop.clone()).await;
    let request = pb::RegisterComponentTypeRequest {
        component_type: Some(remote_draft("acme.sentiment", "1.0.0", &format!("http://{addr}"))),
    };
    let registered =
        h.client.register_component_type(authed(request, &h.registrar)).await.unwrap().into_inner();
    let t = registered.component_type.unwrap();
    assert!(!t.builtin);
    assert_eq!(t.inputs[0].name, "in", "ports filled in from Describe");
    assert_eq!(t.description, "Scores the sentiment of a text.");
    assert_eq!(t.remote.as_ref().unwrap().availability, pb::Availability::Available as i32);
    let request =
        pb::ListComponentTypesRequest { category: pb::Category::Remote as i32, ..Default::default() };
    let remotes = h
        .client
        .list_component_types(authed(request, &h.designer))
        .await
        .unwrap()
        .into_inner()
        .component_types;
    assert!(remotes.iter().any(|t| t.r#type == "acme.sentiment"));

    // Its configuration schema is enforced like a built-in's.
    let verdict = validate(&mut h, "acme.sentiment", json!({ "language": "fr" })).await;
    assert_eq!(verdict.violations[0].pointer, "/language");

    // Typed ports: text output into its input is compatible; a number is not.
    let check = |from_type: &str, from_port: &str| pb::CheckCompatibilityRequest {
        from: Some(pb::PortRef { r#type: from_type.into(), version: String::new(), port: from_port.into() }),
        to: Some(pb::PortRef { r#type: "acme.sentiment".into(), version: String::new(), port: "in".into() }),
    };
    let stats_into_it = h
        .client
        .check_compatibility(authed(check("metrics.stats", "out"), &h.designer))
        .await
        .unwrap()
        .into_inner();
    assert!(!stats_into_it.compatible, "{stats_into_it:?}");
    assert_eq!(stats_into_it.pointer, "/text");
    let untyped = h
        .client
        .check_compatibility(authed(check("source.input", "out"), &h.designer))
        .await
        .unwrap()
        .into_inner();
    assert!(untyped.compatible && untyped.checked_at_run_time, "{untyped:?}");
    let to_sink = pb::CheckCompatibilityRequest {
        from: Some(pb::PortRef {
            r#type: "acme.sentiment".into(),
            version: String::new(),
            port: "out".into(),
        }),
        to: Some(pb::PortRef { r#type: "sink.output".into(), version: String::new(), port: "in".into() }),
    };
    let proven = h.client.check_compatibility(authed(to_sink, &h.designer)).await.unwrap().into_inner();
    assert!(proven.compatible && !proven.checked_at_run_time);
    let wrong_port = pb::CheckCompatibilityRequest {
        from: Some(pb::PortRef {
            r#type: "transform.map".into(),
            version: String::new(),
            port: "nope".into(),
        }),
        to: Some(pb::PortRef { r#type: "sink.output".into(), version: String::new(), port: "in".into() }),
    };
    let status = h.client.check_compatibility(authed(wrong_port, &h.designer)).await.unwrap_err();
    assert!(violations(&status)[0].1.contains("its outputs are out, error"), "{status:?}");

    // The component goes away: within a few checks it is listed as unavailable.
    component_stop.cancel();
    let started = std::time::Instant::now();
    while availability(&mut h, "acme.sentiment").await != pb::Availability::Unavailable as i32 {
        assert!(started.elapsed() < Duration::from_secs(10), "still listed as available");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let request = pb::GetComponentTypeRequest { r#type: "acme.sentiment".into(), version: String::new() };
    let t = h
        .client
        .get_component_type(authed(request, &h.designer))
        .await
        .unwrap()
        .into_inner()
        .component_type
        .unwrap();
    assert!(!t.remote.unwrap().last_error.is_empty());
}

/// Registration, versions and deprecation, with every kind of bad input.
async fn registration_rules(env: TestEnv) {
    let mut h = start(&env).await;
    let stop = CancellationToken::new();
    let addr = format!("http://{}", serve_component(stop.clone()).await);
    let register = |t: pb::ComponentType, token: &str| {
        authed(pb::RegisterComponentTypeRequest { component_type: Some(t) }, token)
    };

    // Designers may not register; registrars may.
    let status = h
        .client
        .register_component_type(register(remote_draft("acme.a", "1.0.0", &addr), &h.designer))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let admin = h.issuer.token("admin-1", &[Role::Admin]);
    h.client
        .register_component_type(register(remote_draft("acme.a", "1.0.0", &addr), &h.registrar))
        .await
        .unwrap();
    h.client
        .register_component_type(register(remote_draft("acme.admins", "1.0.0", &addr), &admin))
        .await
        .unwrap();

    // Bad input, each with its field.
    let mut bad_schema = remote_draft("acme.b", "1.0.0", &addr);
    bad_schema.config_schema =
        Some(json::to_struct(json!({ "type": "object", "properties": { "x": { "type": "colour" } } })));
    let mut bad_port = remote_draft("acme.c", "1.0.0", &addr);
    bad_port.inputs = vec![pb::Port { name: "In Put".into(), ..Default::default() }];
    let mut bad_example = remote_draft("acme.d", "1.0.0", &addr);
    bad_example.config_schema =
        Some(json::to_struct(json!({ "type": "object", "properties": { "n": { "type": "integer" } } })));
    bad_example.examples = vec![pb::Example {
        title: "x".into(),
        config: Some(json::to_struct(json!({ "n": "two" }))),
        ..Default::default()
    }];
    let mut half_behaviour = remote_draft("acme.h", "1.0.0", &addr);
    half_behaviour.behaviour =
        Some(pb::PortBehaviour { read: pb::ReadMode::Any as i32, ..Default::default() });
    let cases: Vec<(pb::ComponentType, &str)> = vec![
        (bad_schema, "component_type.config_schema"),
        (half_behaviour, "component_type.behaviour"),
        (remote_draft("acme.e", "one.two", &addr), "component_type.version"),
        (remote_draft("Acme Thing", "1.0.0", &addr), "component_type.type"),
        (remote_draft("transform.better", "1.0.0", &addr), "component_type.type"),
        (remote_draft("acme.f", "1.0.0", "http://127.0.0.1:1"), "component_type.remote.address"),
        (remote_draft("acme.g", "1.0.0", "not a url"), "component_type.remote.address"),
        (bad_port, "component_type.inputs[0].name"),
        (bad_example, "component_type.examples[0].config/n"),
    ];
    for (draft, field) in cases {
        let status = h.client.register_component_type(register(draft, &h.registrar)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        let v = violations(&status);
        assert!(v.iter().any(|(f, _)| f == field), "{field}: {v:?}");
    }
    let status = h
        .client
        .register_component_type(register(remote_draft("transform.map", "2.0.0", &addr), &h.registrar))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "built-ins cannot be overwritten");
    let status = h
        .client
        .register_component_type(register(remote_draft("acme.a", "1.0.0", &addr), &h.registrar))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "duplicate type");

    // New versions: greater than every published one; published ones never change.
    let update = |t: pb::ComponentType| {
        authed(pb::UpdateComponentTypeRequest { component_type: Some(t) }, &h.registrar)
    };
    let mut v2 = remote_draft("acme.a", "2.0.0", &addr);
    v2.display_name = "Sentiment v2".into();
    h.client.update_component_type(update(v2)).await.unwrap();
    let status =
        h.client.update_component_type(update(remote_draft("acme.a", "2.0.0", &addr))).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    let status =
        h.client.update_component_type(update(remote_draft("acme.a", "1.5.0", &addr))).await.unwrap_err();
    assert_eq!(violations(&status)[0].0, "component_type.version");
    let status =
        h.client.update_component_type(update(remote_draft("acme.zzz", "1.0.0", &addr))).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let request = pb::GetComponentTypeRequest { r#type: "acme.a".into(), version: "1.0.0".into() };
    let v1 = h.client.get_component_type(authed(request, &h.designer)).await.unwrap().into_inner();
    let v1_type = v1.component_type.unwrap();
    assert_eq!(v1_type.display_name, "Sentiment", "1.0.0 is unchanged");
    assert_eq!(v1_type.behaviour, None, "it declared no behaviour: none is made up");
    assert_eq!(v1.versions, ["2.0.0", "1.0.0"]);

    // Deprecation hides the type from listings, not from reads.
    let request = pb::DeprecateComponentTypeRequest {
        r#type: "acme.a".into(),
        version: String::new(),
        message: "use acme.b".into(),
    };
    let deprecated =
        h.client.deprecate_component_type(authed(request, &h.registrar)).await.unwrap().into_inner();
    assert!(deprecated.component_type.unwrap().deprecated);
    assert!(!all_types(&mut h, false).await.iter().any(|t| t.r#type == "acme.a"));
    assert!(
        all_types(&mut h, true)
            .await
            .iter()
            .any(|t| t.r#type == "acme.a" && t.deprecation_message == "use acme.b")
    );
    // Only the registrar of a type, or an admin, changes it: another registrar can neither
    // publish a version (pointing "latest" at their own endpoint) nor deprecate it.
    let intruder = h.issuer.token("registrar-2", &[Role::Registrar]);
    let request =
        pb::UpdateComponentTypeRequest { component_type: Some(remote_draft("acme.a", "9.0.0", &addr)) };
    let status = h.client.update_component_type(authed(request, &intruder)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let request = pb::DeprecateComponentTypeRequest { r#type: "acme.admins".into(), ..Default::default() };
    let status = h.client.deprecate_component_type(authed(request, &h.registrar)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let request = pb::GetComponentTypeRequest { r#type: "acme.a".into(), version: String::new() };
    let latest = h.client.get_component_type(authed(request, &h.designer)).await.unwrap().into_inner();
    assert_eq!(latest.component_type.unwrap().version, "2.0.0", "the intruder's version was not published");
    let request =
        pb::UpdateComponentTypeRequest { component_type: Some(remote_draft("acme.a", "3.0.0", &addr)) };
    h.client.update_component_type(authed(request, &admin)).await.unwrap();

    let request = pb::DeprecateComponentTypeRequest { r#type: "sink.log".into(), ..Default::default() };
    assert_eq!(
        h.client.deprecate_component_type(authed(request, &h.registrar)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    stop.cancel();
}

csp_testkit::backend_tests!(
    every_builtin_validates_its_examples_and_points_at_mistakes,
    the_catalogue_can_be_browsed,
    remote_components_are_registered_and_watched,
    registration_rules,
);

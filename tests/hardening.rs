//! What hostile or careless callers found, each defended against through the gateway as a
//! client would meet it.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use common::{Running, channel, create_admin, design_of, env_vars, new_designer};
use csp_proto::{executor::v1 as pb, registry::v1 as rpb};
use csp_testkit::{TestEnv, authed};
use futures::StreamExt as _;
use serde_json::json;
use tonic::Code;

/// The longest status message a caller may get back.
const MAX_MESSAGE: usize = 1024;

/// A 100 KB string field makes no service echo it into a status (whose header would pass
/// HTTP/2's limits and tear down the connection the gateway shares with that service), and
/// another caller's stream on the same connections goes on undisturbed.
async fn oversized_input_is_not_echoed_and_harms_no_other_caller(env: TestEnv) {
    let vars = env_vars(&env);
    create_admin(&env, &vars);
    let csp = Running::start(env.dir(), &vars, &["serve"]);
    let token = new_designer(csp.gateway).await;
    let design = design_of(
        csp.gateway,
        &token,
        &[
            ("input", "source.input", json!({})),
            ("wait", "control.delay", json!({ "delay_ms": 1500 })),
            ("result", "sink.output", json!({})),
        ],
    )
    .await;
    // One connection to the gateway for everything: the bystander and the attacker share it,
    // and the gateway's connections to the executor and the registry.
    let shared = channel(csp.gateway).await;
    let mut executor = pb::executor_service_client::ExecutorServiceClient::new(shared.clone());
    let request = pb::StartExecutionRequest {
        design_id: design,
        inputs: HashMap::from([(
            "input".to_owned(),
            prost_types::ListValue { values: vec![csp_proto::json::to_value(json!({ "n": 1 }))] },
        )]),
        ..Default::default()
    };
    let id =
        executor.start_execution(authed(request, &token)).await.unwrap().into_inner().execution.unwrap().id;
    let request = pb::WatchExecutionRequest { execution_id: id.clone(), after_event_id: String::new() };
    let mut bystander = executor.watch_execution(authed(request, &token)).await.unwrap().into_inner();

    let huge = "x".repeat(100_000);
    let mut registry = rpb::registry_service_client::RegistryServiceClient::new(shared.clone());
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let request = pb::WatchExecutionRequest { execution_id: id.clone(), after_event_id: huge.clone() };
        statuses
            .push(("WatchExecution", executor.watch_execution(authed(request, &token)).await.map(|_| ())));
        let request = pb::WatchExecutionRequest { execution_id: huge.clone(), after_event_id: String::new() };
        statuses
            .push(("WatchExecution id", executor.watch_execution(authed(request, &token)).await.map(|_| ())));
        let request = rpb::GetComponentTypeRequest { r#type: huge.clone(), version: String::new() };
        statuses.push((
            "GetComponentType",
            registry.get_component_type(authed(request, &token)).await.map(|_| ()),
        ));
        let request = rpb::GetComponentTypeRequest { r#type: "transform.set".into(), version: huge.clone() };
        statuses.push((
            "GetComponentType version",
            registry.get_component_type(authed(request, &token)).await.map(|_| ()),
        ));
        let request = rpb::ValidateConfigRequest { r#type: huge.clone(), ..Default::default() };
        statuses
            .push(("ValidateConfig", registry.validate_config(authed(request, &token)).await.map(|_| ())));
        let port =
            |t: &str| Some(rpb::PortRef { r#type: t.to_owned(), port: huge.clone(), ..Default::default() });
        let request = rpb::CheckCompatibilityRequest { from: port(&huge), to: port("sink.output") };
        statuses.push((
            "CheckCompatibility",
            registry.check_compatibility(authed(request, &token)).await.map(|_| ()),
        ));
    }
    for (call, result) in statuses {
        let status = result.expect_err(call);
        assert!(
            matches!(status.code(), Code::InvalidArgument | Code::NotFound),
            "{call}: {:?} {}",
            status.code(),
            &status.message()[..status.message().len().min(200)]
        );
        assert!(status.message().len() <= MAX_MESSAGE, "{call}: a {} byte message", status.message().len());
        assert!(!status.message().contains(&"x".repeat(2 * MAX_MESSAGE)), "{call}");
        let details = status.details().len();
        assert!(details <= 4 * MAX_MESSAGE, "{call}: {details} bytes of details");
    }

    // The bystander's stream saw the run through to its end.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = None;
    while let Some(item) =
        tokio::time::timeout_at(deadline.into(), bystander.next()).await.expect("the stream ended")
    {
        let event = item.expect("the bystander's stream failed").event.unwrap();
        if let Some(pb::execution_event::Kind::StatusChanged(changed)) = event.kind {
            last = Some(changed.status);
        }
    }
    assert_eq!(last, Some(pb::ExecutionStatus::Succeeded as i32));
}

/// A client that resumes watching an execution after its final event (a reconnect after the
/// end) has its stream closed at once, not after the 5 s a quiet watch waits.
async fn resuming_a_watch_after_the_final_event_closes_at_once(env: TestEnv) {
    let vars = env_vars(&env);
    create_admin(&env, &vars);
    let csp = Running::start(env.dir(), &vars, &["serve"]);
    let token = new_designer(csp.gateway).await;
    let design = design_of(
        csp.gateway,
        &token,
        &[("input", "source.input", json!({})), ("result", "sink.output", json!({}))],
    )
    .await;
    let mut executor = pb::executor_service_client::ExecutorServiceClient::new(channel(csp.gateway).await);
    let request = pb::StartExecutionRequest {
        design_id: design,
        inputs: HashMap::from([(
            "input".to_owned(),
            prost_types::ListValue { values: vec![csp_proto::json::to_value(json!(1))] },
        )]),
        ..Default::default()
    };
    let id =
        executor.start_execution(authed(request, &token)).await.unwrap().into_inner().execution.unwrap().id;
    let request = pb::WatchExecutionRequest { execution_id: id.clone(), after_event_id: String::new() };
    let events: Vec<pb::ExecutionEvent> = executor
        .watch_execution(authed(request, &token))
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap().event.unwrap())
        .collect()
        .await;
    let last = events.last().unwrap();
    assert!(matches!(last.kind, Some(pb::execution_event::Kind::StatusChanged(_))), "{last:?}");

    for after in [last.event_id.clone(), events[events.len() / 2].event_id.clone()] {
        let started = Instant::now();
        let request = pb::WatchExecutionRequest { execution_id: id.clone(), after_event_id: after.clone() };
        let rest: Vec<_> =
            executor.watch_execution(authed(request, &token)).await.unwrap().into_inner().collect().await;
        let position = |id: &str| {
            let (ms, seq) = id.split_once('-').unwrap();
            (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
        };
        let expected = events.iter().filter(|e| position(&e.event_id) > position(&after)).count();
        assert_eq!(rest.len(), expected, "resumed after {after}");
        assert!(started.elapsed() < Duration::from_secs(2), "closed after {:?}", started.elapsed());
    }
}

/// A design that ValidateDesign reports errors for is refused at the start with the errors,
/// unless the caller asks to run it anyway.
async fn a_design_with_errors_does_not_start_unless_asked(env: TestEnv) {
    use tonic_types::StatusExt as _;
    let vars = env_vars(&env);
    create_admin(&env, &vars);
    let csp = Running::start(env.dir(), &vars, &["serve"]);
    let token = new_designer(csp.gateway).await;
    let design = design_of(
        csp.gateway,
        &token,
        &[("input", "source.input", json!({})), ("result", "sink.output", json!({}))],
    )
    .await;
    // `lonely` has nothing on its required input.
    use csp_proto::design::v1 as dpb;
    let mut designs = dpb::design_service_client::DesignServiceClient::new(channel(csp.gateway).await);
    let lonely = dpb::Node {
        id: "lonely".into(),
        r#type: "transform.template".into(),
        config: Some(csp_proto::json::to_struct(json!({ "template": "{{x}}" }))),
        ..Default::default()
    };
    let request = dpb::ApplyOpsRequest {
        design_id: design.clone(),
        expected_revision: 2,
        ops: vec![dpb::Op { op: Some(dpb::op::Op::AddNode(dpb::AddNodeOp { node: Some(lonely) })) }],
    };
    designs.apply_ops(authed(request, &token)).await.unwrap();
    let request = csp_proto::design::v1::ValidateDesignRequest { design_id: design.clone(), revision: 0 };
    let verdict = designs.validate_design(authed(request, &token)).await.unwrap().into_inner();
    assert!(!verdict.valid, "{verdict:?}");

    let mut executor = pb::executor_service_client::ExecutorServiceClient::new(channel(csp.gateway).await);
    let start = |run_invalid: bool| pb::StartExecutionRequest {
        design_id: design.clone(),
        inputs: HashMap::from([(
            "input".to_owned(),
            prost_types::ListValue { values: vec![csp_proto::json::to_value(json!(1))] },
        )]),
        run_invalid,
        ..Default::default()
    };
    // Twice: the verdict is kept with the plan, and a kept plan is refused too.
    for _ in 0..2 {
        let status = executor.start_execution(authed(start(false), &token)).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{}", status.message());
        assert_eq!(status.get_details_error_info().unwrap().reason, "DESIGN_INVALID");
        assert!(status.message().contains("lonely"), "{}", status.message());
    }
    let request = pb::ListExecutionsRequest { design_id: design.clone(), ..Default::default() };
    let listed = executor.list_executions(authed(request, &token)).await.unwrap().into_inner();
    assert!(listed.executions.is_empty(), "nothing was queued: {listed:?}");

    let started = executor.start_execution(authed(start(true), &token)).await.unwrap().into_inner();
    let id = started.execution.unwrap().id;
    let request = pb::WatchExecutionRequest { execution_id: id, after_event_id: String::new() };
    let last = executor
        .watch_execution(authed(request, &token))
        .await
        .unwrap()
        .into_inner()
        .filter_map(|r| async move {
            match r.unwrap().event.unwrap().kind {
                Some(pb::execution_event::Kind::StatusChanged(changed)) => Some(changed.status),
                _ => None,
            }
        })
        .collect::<Vec<_>>()
        .await;
    assert_eq!(last.last(), Some(&(pb::ExecutionStatus::Succeeded as i32)), "ran anyway");
}

/// A design is never transferred to an account that does not exist (it would be nobody's):
/// the design service asks the auth service, and a real user still gets it.
async fn a_design_goes_only_to_a_user_who_exists(env: TestEnv) {
    use csp_proto::design::v1 as dpb;
    use tonic_types::StatusExt as _;
    let vars = env_vars(&env);
    create_admin(&env, &vars);
    let csp = Running::start(env.dir(), &vars, &["serve"]);
    let token = new_designer(csp.gateway).await;
    let admin = common::login(csp.gateway, "admin", common::ADMIN_PASSWORD).await.unwrap().user.unwrap();
    let design = design_of(csp.gateway, &token, &[("input", "source.input", json!({}))]).await;
    let mut designs = dpb::design_service_client::DesignServiceClient::new(channel(csp.gateway).await);
    let nobody = uuid::Uuid::now_v7().to_string();
    for (who, revision) in [(nobody.as_str(), 2), ("not a user id", 2)] {
        let request = dpb::TransferOwnershipRequest {
            design_id: design.clone(),
            expected_revision: revision,
            new_owner_id: who.into(),
        };
        let status = designs.transfer_ownership(authed(request, &token)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{who}: {}", status.message());
        let fields: Vec<String> =
            status.get_details_bad_request().unwrap().field_violations.into_iter().map(|v| v.field).collect();
        assert_eq!(fields, ["new_owner_id"]);
    }
    let request = dpb::TransferOwnershipRequest {
        design_id: design,
        expected_revision: 2,
        new_owner_id: admin.id.clone(),
    };
    let moved =
        designs.transfer_ownership(authed(request, &token)).await.unwrap().into_inner().design.unwrap();
    assert_eq!(moved.owner_id, admin.id);
}

csp_testkit::backend_tests!(
    a_design_goes_only_to_a_user_who_exists,
    a_design_with_errors_does_not_start_unless_asked,
    oversized_input_is_not_echoed_and_harms_no_other_caller,
    resuming_a_watch_after_the_final_event_closes_at_once,
);

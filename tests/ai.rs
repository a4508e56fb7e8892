//! AI, black-box: a design `source.input → ai.chat → ai.analyze → sink.output` runs through the
//! gateway on the offline provider, the executor calling the AI service as its own service
//! account on behalf of whoever started the run; GetUsage then shows the run's tokens and cost
//! attributed to that user, the design and the execution.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::time::{Duration, Instant};

use common::{ADMIN_PASSWORD, Running, channel, create_admin, env_vars, http_get, login, new_designer};
use csp_proto::{
    ai::v1::{self as ai, ai_service_client::AiServiceClient},
    auth::v1::{self as auth, auth_service_client::AuthServiceClient},
    design::v1 as dpb,
    executor::v1::{self as xpb, executor_service_client::ExecutorServiceClient},
    json as pbjson,
};
use csp_testkit::{TestEnv, authed};
use serde_json::json;

fn node(id: &str, type_id: &str, config: serde_json::Value) -> dpb::Op {
    dpb::Op {
        op: Some(dpb::op::Op::AddNode(dpb::AddNodeOp {
            node: Some(dpb::Node {
                id: id.into(),
                r#type: type_id.into(),
                config: Some(pbjson::to_struct(config)),
                ..Default::default()
            }),
        })),
    }
}

fn link(id: &str, from: &str, to: &str) -> dpb::Op {
    dpb::Op {
        op: Some(dpb::op::Op::AddConnection(dpb::AddConnectionOp {
            connection: Some(dpb::Connection {
                id: id.into(),
                from: Some(dpb::PortAddress { node_id: from.into(), port: "out".into() }),
                to: Some(dpb::PortAddress { node_id: to.into(), port: "in".into() }),
                ..Default::default()
            }),
        })),
    }
}

/// A service account with an API key, made by the admin: what `executor.ai_api_key` holds.
async fn service_key(addr: std::net::SocketAddr) -> String {
    let admin = login(addr, "admin", ADMIN_PASSWORD).await.unwrap().tokens.unwrap().access_token;
    let mut users = AuthServiceClient::new(channel(addr).await);
    let request = auth::CreateUserRequest {
        username: "executor".into(),
        email: "executor@example.com".into(),
        roles: vec![auth::Role::Service as i32],
        service_account: true,
        ..Default::default()
    };
    let account = users.create_user(authed(request, &admin)).await.unwrap().into_inner().user.unwrap();
    let request =
        auth::CreateApiKeyRequest { user_id: account.id, name: "executor".into(), ..Default::default() };
    users.create_api_key(authed(request, &admin)).await.unwrap().into_inner().secret
}

async fn an_ai_design_runs_and_its_usage_is_attributed(env: TestEnv) {
    let mut vars = env_vars(&env);
    create_admin(&env, &vars);
    // First run: make the executor's service account; then run with its key.
    let mut first = Running::start(env.dir(), &vars, &["serve"]);
    let key = service_key(first.gateway).await;
    assert!(first.terminate().success());
    vars.push(("CSP_EXECUTOR__AI_API_KEY".into(), key));
    let csp = Running::start(env.dir(), &vars, &["serve"]);
    let addr = csp.gateway;
    let token = new_designer(addr).await;

    let mut designs = dpb::design_service_client::DesignServiceClient::new(channel(addr).await);
    let request = dpb::CreateDesignRequest { name: "Review triage".into(), ..Default::default() };
    let design = designs.create_design(authed(request, &token)).await.unwrap().into_inner().design.unwrap();
    let ops = vec![
        node("reviews", "source.input", json!({})),
        node(
            "reply",
            "ai.chat",
            json!({ "system": "You answer customers.", "prompt_template": "Reply to: {{ text }}" }),
        ),
        node("judge", "ai.analyze", json!({ "kinds": ["sentiment", "keywords"], "path": "text" })),
        node("result", "sink.output", json!({})),
        link("c1", "reviews", "reply"),
        link("c2", "reply", "judge"),
        link("c3", "judge", "result"),
    ];
    let request = dpb::ApplyOpsRequest { design_id: design.id.clone(), expected_revision: 1, ops };
    designs.apply_ops(authed(request, &token)).await.unwrap();

    let mut executor = ExecutorServiceClient::new(channel(addr).await);
    let request = xpb::StartExecutionRequest {
        design_id: design.id.clone(),
        inputs: [(
            "reviews".to_owned(),
            prost_types::ListValue {
                values: vec![pbjson::to_value(json!({ "text": "I love it, the editor is excellent" }))],
            },
        )]
        .into(),
        ..Default::default()
    };
    let execution =
        executor.start_execution(authed(request, &token)).await.unwrap().into_inner().execution.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let request = xpb::GetExecutionRequest { execution_id: execution.id.clone() };
        let got =
            executor.get_execution(authed(request, &token)).await.unwrap().into_inner().execution.unwrap();
        if got.finished_at.is_some() {
            break got;
        }
        assert!(Instant::now() < deadline, "the execution did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done.status, xpb::ExecutionStatus::Succeeded as i32, "{:?}", done.error);
    let out = pbjson::from_value(done.outputs["result"].values[0].clone());
    assert!(out["text"].as_str().unwrap().starts_with("Offline answer to: Reply to: I love it"), "{out}");
    assert_eq!(out["analysis"]["sentiment"]["label"], "positive", "{out}");
    assert!(out["analysis"]["keywords"].as_array().unwrap().len() >= 2, "{out}");

    // Two calls, both counted for the designer — on the design and the execution.
    let mut ai = AiServiceClient::new(channel(addr).await);
    let request = ai::GetUsageRequest {
        execution_id: execution.id.clone(),
        group_by: ai::UsageGrouping::Design as i32,
        ..Default::default()
    };
    let usage = ai.get_usage(authed(request, &token)).await.unwrap().into_inner();
    assert_eq!(usage.totals.len(), 1);
    assert_eq!((usage.totals[0].key.as_str(), usage.totals[0].requests), (design.id.as_str(), 2));
    let total = usage.totals[0].usage.unwrap();
    assert!(total.total_tokens > 20 && total.cost_usd > 0.0, "{total:?}");
    let request = ai::GetUsageRequest { group_by: ai::UsageGrouping::Execution as i32, ..Default::default() };
    let mine = ai.get_usage(authed(request, &token)).await.unwrap().into_inner();
    assert_eq!(mine.totals[0].key, execution.id, "the designer's own usage holds the run");

    let (_, metrics) = http_get(addr, "/metrics").await;
    for line in [
        r#"csp_ai_requests_total{provider="offline",model="offline-1",outcome="ok"} 2"#,
        r#"csp_ai_tokens_total{provider="offline",model="offline-1",kind="prompt"}"#,
        r#"csp_ai_cost_usd{provider="offline",model="offline-1"}"#,
        "csp_ai_request_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(line), "{line} is not on /metrics");
    }
}

csp_testkit::backend_tests!(an_ai_design_runs_and_its_usage_is_attributed);

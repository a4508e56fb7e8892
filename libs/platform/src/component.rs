//! Calling a remote component (`csp.component.v1.ComponentRuntime`) on one message: what an
//! agent's tool call is. Start, the message on `in`, end of input — all sent at once, so
//! servers that answer headers only with their first message (grpc-python, grpc-go) work —
//! then every output until Done.

use std::time::Duration;

use csp_proto::{
    component::v1::{self as pb, component_runtime_client::ComponentRuntimeClient},
    json as pbjson,
};
use serde_json::{Value, json};

fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

/// Runs the component at `address` (named `node_id`, configured with `config`) on one
/// `payload`; its outputs, or what went wrong (safe to show: bounded, no address secrets).
pub async fn call_once(
    address: &str,
    node_id: &str,
    config: &Value,
    payload: Value,
    timeout: Duration,
) -> Result<Vec<Value>, String> {
    let call = async {
        let channel = tonic::transport::Endpoint::from_shared(address.to_owned())
            .map_err(|_| "the component's address is not valid".to_owned())?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("cannot reach the component: {}", clip(&e.to_string())))?;
        let config = if config.is_object() { config.clone() } else { json!({}) };
        let requests = vec![
            pb::ProcessRequest {
                kind: Some(pb::process_request::Kind::Start(pb::Start {
                    execution_id: String::new(),
                    node_id: node_id.to_owned(),
                    config: Some(pbjson::to_struct(config)),
                    traceparent: String::new(),
                })),
            },
            pb::ProcessRequest {
                kind: Some(pb::process_request::Kind::Message(pb::Message {
                    port: "in".into(),
                    payload: Some(pbjson::to_value(payload)),
                    sequence: 1,
                })),
            },
            pb::ProcessRequest {
                kind: Some(pb::process_request::Kind::InputClosed(pb::InputClosed { port: "in".into() })),
            },
        ];
        let failed = |s: tonic::Status| format!("the component failed: {}", clip(s.message()));
        let mut responses = ComponentRuntimeClient::new(channel)
            .process(futures::stream::iter(requests))
            .await
            .map_err(failed)?
            .into_inner();
        let mut outputs = Vec::new();
        while let Some(response) = responses.message().await.map_err(failed)? {
            match response.kind {
                Some(pb::process_response::Kind::Message(m)) => {
                    outputs.push(m.payload.map(pbjson::from_value).unwrap_or(Value::Null));
                }
                Some(pb::process_response::Kind::Error(e)) => return Err(clip(&e.message)),
                Some(pb::process_response::Kind::Done(_)) => break,
                None => {}
            }
        }
        Ok(outputs)
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(format!("the component did not answer within {} s", timeout.as_secs())))
}

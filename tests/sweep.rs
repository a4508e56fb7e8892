//! Every text field of every RPC, given what no store can keep: a NUL byte (PostgreSQL refuses
//! it in text and in JSON), sent through the gateway as a client would. Each call must be
//! refused as INVALID_ARGUMENT (or answered) — never INTERNAL, UNKNOWN or a dropped call.
//!
//! The requests are built from the descriptor set, not from the generated types, so an RPC
//! or field added later is swept too. Known ids (a real design, execution, user) fill the id
//! fields, so that the NUL reaches past the first check of a request.

#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashMap, time::Duration};

use bytes::{Buf as _, BufMut as _, Bytes};
use common::{ADMIN_PASSWORD, Running, channel, create_admin, design_of, env_vars, login};
use csp_testkit::TestEnv;
use futures::StreamExt as _;
use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use serde_json::json;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

/// Messages as they are on the wire.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A length-delimited field.
fn field(out: &mut Vec<u8>, number: i32, value: &[u8]) {
    varint(out, (u64::from(number as u32) << 3) | 2);
    varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// One RPC: its path, whether the client or server streams, its request's string fields.
struct Rpc {
    path: String,
    client_streaming: bool,
    server_streaming: bool,
    fields: Vec<(String, i32)>,
}

fn rpcs() -> Vec<Rpc> {
    let set = prost_types::FileDescriptorSet::decode(csp_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut messages = HashMap::new();
    for file in &set.file {
        for message in &file.message_type {
            messages.insert(format!(".{}.{}", file.package(), message.name()), message.clone());
        }
    }
    let mut rpcs = Vec::new();
    for file in set.file.iter().filter(|f| f.package().starts_with("csp.")) {
        for service in &file.service {
            let full = format!("{}.{}", file.package(), service.name());
            if !csp_proto::SERVICE_NAMES.contains(&full.as_str()) {
                continue;
            }
            for method in &service.method {
                let input = &messages[method.input_type()];
                let fields = input
                    .field
                    .iter()
                    .filter(|f| f.r#type() == Type::String)
                    .filter(|f| matches!(f.label(), Label::Optional | Label::Repeated))
                    .map(|f| (f.name().to_owned(), f.number()))
                    .collect();
                rpcs.push(Rpc {
                    path: format!("/{full}/{}", method.name()),
                    client_streaming: method.client_streaming(),
                    server_streaming: method.server_streaming(),
                    fields,
                });
            }
        }
    }
    // What takes the fixtures away goes last.
    rpcs.sort_by_key(|rpc| {
        let method = rpc.path.rsplit('/').next().unwrap_or_default();
        ["Delete", "Disable", "Revoke", "Transfer", "Cancel", "Unshare", "Logout"]
            .iter()
            .any(|verb| method.starts_with(verb))
    });
    rpcs
}

/// The request's code: what the call ended with (OK when it answered).
async fn call(channel: &tonic::transport::Channel, token: &str, rpc: &Rpc, message: Vec<u8>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path: http::uri::PathAndQuery = rpc.path.parse().unwrap();
    let message = Bytes::from(message);
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert("authorization", format!("Bearer {token}").parse().unwrap());
    let outcome = async {
        if rpc.client_streaming {
            let request = tonic::Request::from_parts(
                metadata,
                Default::default(),
                futures::stream::once(async move { message }).chain(futures::stream::pending()),
            );
            let mut answers = grpc.streaming(request, path, Raw).await?.into_inner();
            answers.message().await.map(|_| ())
        } else if rpc.server_streaming {
            let request = tonic::Request::from_parts(metadata, Default::default(), message);
            let mut answers = grpc.server_streaming(request, path, Raw).await?.into_inner();
            answers.message().await.map(|_| ())
        } else {
            let request = tonic::Request::from_parts(metadata, Default::default(), message);
            grpc.unary(request, path, Raw).await.map(|_| ())
        }
    };
    // A stream that is accepted may wait for more; it has answered by then.
    match tokio::time::timeout(Duration::from_secs(5), outcome).await {
        Ok(Ok(())) | Err(_) => Code::Ok,
        Ok(Err(status)) => status.code(),
    }
}

async fn nul_bytes_in_any_text_field_are_refused_not_stored(env: TestEnv) {
    let vars = env_vars(&env);
    create_admin(&env, &vars);
    let csp = Running::start(env.dir(), &vars, &["serve"]);
    let signed_in = login(csp.gateway, "admin", ADMIN_PASSWORD).await.unwrap();
    let token = signed_in.tokens.unwrap().access_token;
    let admin_id = signed_in.user.unwrap().id;
    let design = design_of(
        csp.gateway,
        &token,
        &[("input", "source.input", json!({})), ("result", "sink.output", json!({}))],
    )
    .await;
    let mut executor = csp_proto::executor::v1::executor_service_client::ExecutorServiceClient::new(
        channel(csp.gateway).await,
    );
    let request =
        csp_proto::executor::v1::StartExecutionRequest { design_id: design.clone(), ..Default::default() };
    let execution = executor
        .start_execution(csp_testkit::authed(request, &token))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap()
        .id;
    // What fills each id field, so that a request gets past its ids to the field under test.
    let known: HashMap<&str, &str> = HashMap::from([
        ("design_id", design.as_str()),
        ("execution_id", execution.as_str()),
        ("user_id", admin_id.as_str()),
        ("new_owner_id", admin_id.as_str()),
    ]);

    let channel = channel(csp.gateway).await;
    let mut failures = Vec::new();
    let mut calls = 0;
    for rpc in rpcs() {
        for (i, (name, number)) in rpc.fields.iter().enumerate() {
            let mut message = Vec::new();
            for (j, (other, other_number)) in rpc.fields.iter().enumerate() {
                if i == j {
                    let bad = match known.get(other.as_str()) {
                        Some(id) => format!("{id}\0"),
                        None => "a\0b".to_owned(),
                    };
                    field(&mut message, *number, bad.as_bytes());
                } else if let Some(id) = known.get(other.as_str()) {
                    field(&mut message, *other_number, id.as_bytes());
                }
            }
            calls += 1;
            let code = call(&channel, &token, &rpc, message).await;
            if matches!(code, Code::Internal | Code::Unknown | Code::Unavailable | Code::DataLoss) {
                failures.push(format!("{} `{name}`: {code:?}", rpc.path));
            }
        }
    }
    assert!(calls > 100, "the sweep covered {calls} fields");
    assert!(failures.is_empty(), "{} of {calls} calls failed:\n{}", failures.len(), failures.join("\n"));

    // Deeper than the top level: text in a node's configuration (JSON, which PostgreSQL keeps
    // as jsonb) and in an execution's inputs.
    use csp_proto::design::v1 as dpb;
    let mut designs = dpb::design_service_client::DesignServiceClient::new(channel.clone());
    let config = csp_proto::json::to_struct(json!({ "expression": "\u{0}" }));
    let node = dpb::Node {
        id: "m".into(),
        r#type: "transform.map".into(),
        config: Some(config),
        ..Default::default()
    };
    let request = dpb::ApplyOpsRequest {
        design_id: design.clone(),
        expected_revision: 0,
        ops: vec![dpb::Op { op: Some(dpb::op::Op::AddNode(dpb::AddNodeOp { node: Some(node) })) }],
    };
    let status = designs.apply_ops(csp_testkit::authed(request, &token)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("ops.add_node.node.config"), "{}", status.message());
    let inputs = HashMap::from([(
        "input".to_owned(),
        prost_types::ListValue { values: vec![csp_proto::json::to_value(json!({ "text": "a\u{0}b" }))] },
    )]);
    let request =
        csp_proto::executor::v1::StartExecutionRequest { design_id: design, inputs, ..Default::default() };
    let status = executor.start_execution(csp_testkit::authed(request, &token)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

csp_testkit::backend_tests!(nul_bytes_in_any_text_field_are_refused_not_stored);

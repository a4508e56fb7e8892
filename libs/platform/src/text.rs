//! Text no store can keep — a NUL byte, which PostgreSQL refuses in `text` and in `jsonb` —
//! refused at the edge of every server, for every RPC at once: INVALID_ARGUMENT naming the
//! field, before any handler runs.
//!
//! The request message of a unary or server-streaming call is read whole (the server's own
//! message limit bounds it) and walked in its wire format with the method's input type from the
//! descriptor set: every `string` field, in nested messages, maps and `google.protobuf.Struct`
//! values too, is checked without decoding the message. What is not well-formed is passed on
//! for the handler's decoder to refuse. Client streams (collaboration sessions, whose text goes
//! to Redis only) are passed on unchecked.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::LazyLock,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};
use http_body_util::BodyExt as _;
use prost::Message as _;
use prost_types::field_descriptor_proto::Type;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::error::ApiError;

/// Nesting followed at most (prost refuses deeper messages anyway).
const MAX_DEPTH: usize = 100;

/// What a field of a message is, for the walk.
#[derive(Debug, Clone)]
enum Field {
    Text(String),
    Message(String, usize),
}

/// Every message type of the descriptor set, and the input type of every method that takes one
/// request message.
#[derive(Debug, Default)]
struct Schemas {
    messages: Vec<HashMap<u32, Field>>,
    inputs: HashMap<String, usize>,
}

static SCHEMAS: LazyLock<Schemas> = LazyLock::new(|| Schemas::from(csp_proto::FILE_DESCRIPTOR_SET));

impl Schemas {
    fn from(encoded: &[u8]) -> Self {
        let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) else { return Self::default() };
        // Full names first, so fields can point at any message.
        let mut index = HashMap::new();
        let mut all = Vec::new();
        fn collect<'a>(
            prefix: &str,
            messages: &'a [prost_types::DescriptorProto],
            index: &mut HashMap<String, usize>,
            all: &mut Vec<&'a prost_types::DescriptorProto>,
        ) {
            for message in messages {
                let name = format!("{prefix}.{}", message.name());
                index.insert(name.clone(), all.len());
                all.push(message);
                collect(&name, &message.nested_type, index, all);
            }
        }
        for file in &set.file {
            let prefix =
                if file.package().is_empty() { String::new() } else { format!(".{}", file.package()) };
            collect(&prefix, &file.message_type, &mut index, &mut all);
        }
        let messages = all
            .iter()
            .map(|message| {
                message
                    .field
                    .iter()
                    .filter_map(|field| {
                        let kind = match field.r#type() {
                            Type::String => Field::Text(field.name().to_owned()),
                            Type::Message => {
                                Field::Message(field.name().to_owned(), *index.get(field.type_name())?)
                            }
                            _ => return None,
                        };
                        Some((field.number() as u32, kind))
                    })
                    .collect()
            })
            .collect();
        let mut inputs = HashMap::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    if method.client_streaming() {
                        continue;
                    }
                    if let Some(&input) = index.get(method.input_type()) {
                        let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                        inputs.insert(path, input);
                    }
                }
            }
        }
        Self { messages, inputs }
    }

    /// The path of the first text field holding a NUL byte in `bytes`, a message of type
    /// `message`; `None` when there is none (or the message is not well-formed).
    fn find_nul(&self, message: usize, bytes: &[u8], depth: usize) -> Option<String> {
        let fields = self.messages.get(message)?;
        let mut rest = bytes;
        while !rest.is_empty() {
            let key = varint(&mut rest)?;
            let number = (key >> 3) as u32;
            match key & 7 {
                0 => {
                    varint(&mut rest)?;
                }
                1 => rest = rest.get(8..)?,
                5 => rest = rest.get(4..)?,
                2 => {
                    let len = usize::try_from(varint(&mut rest)?).ok()?;
                    let value = rest.get(..len)?;
                    rest = &rest[len..];
                    match fields.get(&number) {
                        Some(Field::Text(name)) if value.contains(&0) => return Some(name.clone()),
                        Some(Field::Message(name, nested)) if depth < MAX_DEPTH => {
                            if let Some(inner) = self.find_nul(*nested, value, depth + 1) {
                                return Some(format!("{name}.{inner}"));
                            }
                        }
                        _ => {}
                    }
                }
                _ => return None,
            }
        }
        None
    }
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The text field holding a NUL byte in a gRPC request body of `path`, if any.
#[cfg(test)]
fn nul_in_request(path: &str, body: &[u8]) -> Option<String> {
    nul_in_message(*SCHEMAS.inputs.get(path)?, body)
}

/// The text field holding a NUL byte in a gRPC request body whose message is of type
/// `message`, if any.
fn nul_in_message(message: usize, body: &[u8]) -> Option<String> {
    let schemas = &*SCHEMAS;
    // One frame: a compression flag (compressed messages are not looked into), a length.
    let (&compressed, rest) = body.split_first()?;
    if compressed != 0 {
        return None;
    }
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    schemas.find_nul(message, rest.get(4..4 + len)?, 0)
}

/// Refuses requests whose text holds a NUL byte (see the module docs).
#[derive(Debug, Clone)]
pub struct NulTextLayer {
    max_message_bytes: usize,
}

impl NulTextLayer {
    /// Reads request messages up to `max_message_bytes` (the server's limit): a larger one is
    /// OUT_OF_RANGE (as tonic answers it) before more of it is held.
    pub fn new(max_message_bytes: usize) -> Self {
        Self { max_message_bytes }
    }
}

impl<S> Layer<S> for NulTextLayer {
    type Service = NulText<S>;

    fn layer(&self, inner: S) -> Self::Service {
        NulText { inner, max_message_bytes: self.max_message_bytes }
    }
}

/// The service made by [`NulTextLayer`].
#[derive(Debug, Clone)]
pub struct NulText<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S> Service<Request<Body>> for NulText<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Some(&message) = SCHEMAS.inputs.get(request.uri().path()) else {
            return Box::pin(self.inner.call(request));
        };
        // The clone is ready only after `poll_ready`; the polled one goes to this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // One message and its 5-byte frame header, no more.
        let limit = self.max_message_bytes.saturating_add(5);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes: Bytes = match http_body_util::Limited::new(body, limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) => {
                    let status = match error.downcast::<tonic::Status>() {
                        Ok(status) => *status,
                        // As tonic answers a message over its decoding limit.
                        Err(_) => tonic::Status::out_of_range(format!(
                            "the request message is too large: over the server's limit of {} bytes",
                            limit - 5
                        )),
                    };
                    return Ok(status.into_http());
                }
            };
            if let Some(field) = nul_in_message(message, &bytes) {
                let status: tonic::Status =
                    ApiError::invalid_field(field, "contains a NUL character, which cannot be stored").into();
                return Ok(status.into_http());
            }
            inner.call(Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)))).await
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn framed(message: &impl prost::Message) -> Vec<u8> {
        let encoded = message.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        out.extend_from_slice(&encoded);
        out
    }

    #[test]
    fn a_nul_anywhere_in_a_request_is_found_with_its_field() {
        use csp_proto::design::v1 as pb;
        let clean = pb::CreateDesignRequest { name: "a name".into(), ..Default::default() };
        assert_eq!(nul_in_request("/csp.design.v1.DesignService/CreateDesign", &framed(&clean)), None);
        let named = pb::CreateDesignRequest { name: "a\0name".into(), ..Default::default() };
        assert_eq!(
            nul_in_request("/csp.design.v1.DesignService/CreateDesign", &framed(&named)).as_deref(),
            Some("name")
        );
        // Deep inside: a node's configuration (a Struct) in an op.
        let config = csp_proto::json::to_struct(serde_json::json!({ "expression": "x\u{0}" }));
        let ops = pb::ApplyOpsRequest {
            design_id: "d".into(),
            expected_revision: 1,
            ops: vec![pb::Op {
                op: Some(pb::op::Op::AddNode(pb::AddNodeOp {
                    node: Some(pb::Node { id: "n".into(), config: Some(config), ..Default::default() }),
                })),
            }],
        };
        let found = nul_in_request("/csp.design.v1.DesignService/ApplyOps", &framed(&ops)).unwrap();
        assert!(found.starts_with("ops.add_node.node.config.fields."), "{found}");
        // Bytes fields and unknown paths are not text.
        assert_eq!(nul_in_request("/nobody.Knows/This", &framed(&named)), None);
    }

    /// What answers `request` through the layer (an inner service that answers OK).
    async fn through(max_message_bytes: usize, body: Vec<u8>) -> tonic::Status {
        let inner = tower::service_fn(|_: Request<Body>| async {
            Ok::<_, Infallible>(tonic::Status::ok("reached").into_http())
        });
        let mut service = NulTextLayer::new(max_message_bytes).layer(inner);
        let request = Request::builder()
            .uri("/csp.design.v1.DesignService/CreateDesign")
            .body(Body::new(http_body_util::Full::new(Bytes::from(body))))
            .unwrap();
        let response = service.call(request).await.unwrap();
        tonic::Status::from_header_map(response.headers()).unwrap()
    }

    #[tokio::test]
    async fn a_request_over_the_limit_is_refused_before_it_is_held() {
        use csp_proto::design::v1 as pb;
        let small = framed(&pb::CreateDesignRequest { name: "fits".into(), ..Default::default() });
        assert_eq!(through(1024, small).await.message(), "reached");
        let big = framed(&pb::CreateDesignRequest { name: "x".repeat(4096), ..Default::default() });
        let status = through(1024, big).await;
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        assert!(status.message().contains("limit of 1024 bytes"), "{}", status.message());
        let nul = framed(&pb::CreateDesignRequest { name: "a\0b".into(), ..Default::default() });
        assert_eq!(through(1024, nul).await.code(), tonic::Code::InvalidArgument);
    }
}

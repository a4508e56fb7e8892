//! Forwarding gRPC calls to the service that serves them.
//!
//! The gateway routes on the service part of the request path (`/csp.auth.v1.AuthService/...`)
//! and relays the HTTP/2 exchange — headers, streamed bodies in both directions, trailers —
//! without decoding any message. It holds no copy of any RPC: a new RPC needs no gateway
//! change. What it does look at:
//!
//! - gRPC frame headers (5 bytes each) of the request, to refuse messages over
//!   `gateway.max_message_bytes` with RESOURCE_EXHAUSTED before they reach a service;
//! - the method's streaming shape, from the same descriptor set it serves for reflection, so
//!   unary calls get a default deadline (`gateway.default_deadline`, capped at
//!   `gateway.max_deadline`) while server streams may run as long as their clients want.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf, Bytes};
use csp_platform::{Settings, telemetry};
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Request, Response, Uri, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use prost::Message as _;
use tonic::{Code, Status, body::Body, service::Routes, transport::server::TcpConnectInfo};
use tower::Service;

use crate::limit::{self, RateLimits};

/// The gRPC services the gateway answers itself.
const LOCAL_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Streaming shape of a method.
#[derive(Debug, Clone, Copy, Default)]
struct Shape {
    client_streaming: bool,
    server_streaming: bool,
}

/// Where each service's calls go, and how.
pub(crate) struct Upstreams {
    by_service: HashMap<&'static str, Uri>,
    shapes: HashMap<String, Shape>,
    client: Client<HttpConnector, Body>,
    max_message_bytes: usize,
    default_deadline: Duration,
    max_deadline: Duration,
    /// `gateway.trusted_proxies`.
    trusted_proxies: Vec<ipnet::IpNet>,
}

impl Upstreams {
    pub(crate) fn new(settings: &Settings) -> Result<Self, String> {
        let mut by_service = HashMap::new();
        for service in csp_platform::Service::ALL {
            let address = &settings.services.get(service).address;
            let uri: Uri = address
                .parse()
                .map_err(|e| format!("services.{}.address `{address}`: {e}", service.name()))?;
            if uri.authority().is_none() {
                return Err(format!("services.{}.address `{address}` has no host", service.name()));
            }
            by_service.insert(service.grpc_name(), uri);
        }
        Ok(Self {
            by_service,
            shapes: method_shapes(),
            client: http_client(settings.gateway.connect_timeout),
            max_message_bytes: settings.gateway.max_message_bytes,
            default_deadline: settings.gateway.default_deadline,
            max_deadline: settings.gateway.max_deadline,
            trusted_proxies: settings.gateway.trusted_proxies.clone(),
        })
    }

    /// The HTTP/2 client shared with the health checks.
    pub(crate) fn client(&self) -> &Client<HttpConnector, Body> {
        &self.client
    }
}

/// An HTTP/2 (prior knowledge) client for upstreams.
pub(crate) fn http_client(connect_timeout: Duration) -> Client<HttpConnector, Body> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .http2_only(true)
        // Headers far past what anyone sends are still read, so that a faulty upstream's
        // oversized status fails its own call (bounded on the way out), not the connection
        // every other caller of that upstream shares.
        .http2_max_header_list_size(1 << 20)
        .http2_keep_alive_interval(Some(Duration::from_secs(30)))
        .http2_keep_alive_timeout(Duration::from_secs(10))
        .http2_keep_alive_while_idle(true)
        .build(connector)
}

/// `/package.Service/Method` → shape, for every method the protos declare.
fn method_shapes() -> HashMap<String, Shape> {
    let mut shapes = HashMap::new();
    let Ok(fds) = prost_types::FileDescriptorSet::decode(csp_proto::FILE_DESCRIPTOR_SET) else {
        return shapes;
    };
    for file in fds.file {
        for service in &file.service {
            for method in &service.method {
                shapes.insert(
                    format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                    Shape {
                        client_streaming: method.client_streaming(),
                        server_streaming: method.server_streaming(),
                    },
                );
            }
        }
    }
    shapes
}

/// The service part of a gRPC path.
fn service_of(path: &str) -> Option<&str> {
    path.strip_prefix('/')?.split_once('/').map(|(service, _)| service)
}

/// Routes each call to an upstream, to the gateway's own services, or to UNIMPLEMENTED.
#[derive(Clone)]
pub(crate) struct Dispatch {
    upstreams: Arc<Upstreams>,
    local: Routes,
    limits: Option<Arc<RateLimits>>,
}

impl Dispatch {
    pub(crate) fn new(upstreams: Arc<Upstreams>, local: Routes, limits: Option<Arc<RateLimits>>) -> Self {
        Self { upstreams, local, limits }
    }
}

impl Service<Request<Body>> for Dispatch {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let service = service_of(request.uri().path()).unwrap_or_default().to_owned();
        if let Some(base) = self.upstreams.by_service.get(service.as_str()) {
            let base = base.clone();
            let upstreams = self.upstreams.clone();
            let Some(limits) = self.limits.clone() else {
                return Box::pin(forward(upstreams, base, request));
            };
            return Box::pin(async move {
                if let Err(status) =
                    limits.admit(&limit::client_of(&request, &upstreams.trusted_proxies)).await
                {
                    return Ok(status.into_http());
                }
                forward(upstreams, base, request).await
            });
        }
        if LOCAL_SERVICES.contains(&service.as_str()) {
            let mut local = self.local.clone();
            return Box::pin(async move { local.call(request).await });
        }
        let status = if service.is_empty() {
            Status::unimplemented("not a gRPC path")
        } else {
            Status::unimplemented(format!("unknown service {service}"))
        };
        Box::pin(async move { Ok(status.into_http()) })
    }
}

/// Relays one call to `base` and its response back.
async fn forward(
    upstreams: Arc<Upstreams>,
    base: Uri,
    request: Request<Body>,
) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let shape = upstreams.shapes.get(&path).copied().unwrap_or_default();

    let over_limit = Arc::new(AtomicBool::new(false));
    let mut body = FrameLimit::new(body, upstreams.max_message_bytes, over_limit.clone());
    // For calls with one request message, read its frame header before contacting the
    // service: an oversized message is refused without reaching it. Client streams are
    // checked as they flow (a bidirectional call may wait for the server to speak first).
    let mut prefix = VecDeque::new();
    if !shape.client_streaming {
        while !body.header_seen() {
            match body.frame().await {
                Some(Ok(frame)) => prefix.push_back(frame),
                Some(Err(_)) if over_limit.load(Ordering::SeqCst) => {
                    // Read the rest of the request (bounded) before answering: an HTTP/1.1
                    // client (a browser's grpc-web) still sending would otherwise see its
                    // connection reset instead of the answer.
                    discard(body.into_inner(), DISCARD_LIMIT).await;
                    return Ok(too_large(upstreams.max_message_bytes).into_http());
                }
                Some(Err(status)) => return Ok(status.into_http()),
                None => break,
            }
        }
    }

    let mut uri = base.into_parts();
    uri.path_and_query = parts.uri.path_and_query().cloned();
    parts.uri = match Uri::from_parts(uri) {
        Ok(uri) => uri,
        Err(_) => return Ok(Status::internal("bad upstream address").into_http()),
    };
    parts.version = http::Version::HTTP_2;
    strip_hop_by_hop(&mut parts.headers);
    // The client's address — the connection's, or what a trusted proxy in front said —
    // replacing anything the client claimed.
    let client = limit::client_address(
        &parts.headers,
        parts.extensions.get::<TcpConnectInfo>(),
        &upstreams.trusted_proxies,
    );
    parts.headers.remove("x-forwarded-for");
    if let Ok(value) = HeaderValue::from_str(&client) {
        parts.headers.insert("x-forwarded-for", value);
    }
    parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
    apply_deadline(&mut parts.headers, shape, upstreams.default_deadline, upstreams.max_deadline);
    // The upstream's server span becomes a child of this gateway's span.
    parts.headers.remove("traceparent");
    parts.headers.remove("tracestate");
    telemetry::inject_context(&mut telemetry::HeaderCarrier(&mut parts.headers));

    let outgoing = Request::from_parts(parts, Body::new(Prefixed { prefix, inner: body }));
    match upstreams.client.request(outgoing).await {
        Ok(response) => {
            let (mut parts, incoming) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(
                parts,
                Body::new(UpstreamBody { inner: incoming, over_limit, ended: false }),
            ))
        }
        Err(_) if over_limit.load(Ordering::SeqCst) => Ok(too_large(upstreams.max_message_bytes).into_http()),
        Err(error) => {
            let service = service_of(&path).unwrap_or_default();
            tracing::warn!(%service, error = %csp_platform::error::error_chain(&error), "upstream unreachable");
            Ok(Status::unavailable(format!("{service} is unavailable")).into_http())
        }
    }
}

/// The most of a refused request's body read (and thrown away) before answering.
const DISCARD_LIMIT: usize = 64 * 1024 * 1024;
/// The longest a refused request's body is read for.
const DISCARD_TIME: Duration = Duration::from_secs(10);

/// Reads and drops what is left of a body, up to `limit` bytes and [`DISCARD_TIME`].
async fn discard<B>(body: B, limit: usize)
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    let mut body = body;
    let mut read = 0usize;
    let _ = tokio::time::timeout(DISCARD_TIME, async {
        while read <= limit {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                _ => break,
            }
        }
    })
    .await;
}

fn too_large(max: usize) -> Status {
    Status::resource_exhausted(format!("request message larger than the gateway limit of {max} bytes"))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::HOST,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Sets the default deadline on unary calls that carry none, and caps long ones.
fn apply_deadline(headers: &mut HeaderMap, shape: Shape, default: Duration, max: Duration) {
    if shape.server_streaming || shape.client_streaming {
        return;
    }
    let given = headers.get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
    let deadline = match given {
        Some(given) => given.min(max),
        None => default,
    };
    if given != Some(deadline)
        && let Ok(value) = HeaderValue::from_str(&format!("{}m", deadline.as_millis().max(1)))
    {
        headers.insert("grpc-timeout", value);
    }
}

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

pin_project_lite::pin_project! {
    /// A request body that fails as soon as a gRPC frame header announces a message larger
    /// than the limit.
    struct FrameLimit<B> {
        #[pin]
        inner: B,
        max: usize,
        over_limit: Arc<AtomicBool>,
        header: [u8; 5],
        header_len: usize,
        remaining: usize,
        headers_seen: usize,
    }
}

impl<B> FrameLimit<B> {
    fn new(inner: B, max: usize, over_limit: Arc<AtomicBool>) -> Self {
        Self { inner, max, over_limit, header: [0; 5], header_len: 0, remaining: 0, headers_seen: 0 }
    }

    fn header_seen(&self) -> bool {
        self.headers_seen > 0
    }

    fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> HttpBody for FrameLimit<B>
where
    B: HttpBody<Data = Bytes, Error = Status>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        let frame = match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        if let Some(data) = frame.data_ref() {
            let mut chunk = data.clone();
            while chunk.has_remaining() {
                if *this.remaining > 0 {
                    let n = (*this.remaining).min(chunk.remaining());
                    chunk.advance(n);
                    *this.remaining -= n;
                    continue;
                }
                let n = (5 - *this.header_len).min(chunk.remaining());
                this.header[*this.header_len..*this.header_len + n].copy_from_slice(&chunk[..n]);
                chunk.advance(n);
                *this.header_len += n;
                if *this.header_len == 5 {
                    let len =
                        u32::from_be_bytes([this.header[1], this.header[2], this.header[3], this.header[4]])
                            as usize;
                    *this.header_len = 0;
                    *this.headers_seen += 1;
                    if len > *this.max {
                        this.over_limit.store(true, Ordering::SeqCst);
                        return Poll::Ready(Some(Err(too_large(*this.max))));
                    }
                    *this.remaining = len;
                }
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// Frames already read (while checking the first message), then the rest of the body.
    struct Prefixed<B> {
        prefix: VecDeque<Frame<Bytes>>,
        #[pin]
        inner: B,
    }
}

impl<B> HttpBody for Prefixed<B>
where
    B: HttpBody<Data = Bytes, Error = Status>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if let Some(frame) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.inner.is_end_stream()
    }
}

pin_project_lite::pin_project! {
    /// The upstream's response body; a broken upstream stream ends with a gRPC status in
    /// trailers instead of a reset.
    struct UpstreamBody {
        #[pin]
        inner: hyper::body::Incoming,
        over_limit: Arc<AtomicBool>,
        ended: bool,
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            None => Poll::Ready(None),
            Some(Err(error)) => {
                *this.ended = true;
                let status = if this.over_limit.load(Ordering::SeqCst) {
                    Status::resource_exhausted("request message larger than the gateway limit")
                } else {
                    tracing::debug!(%error, "upstream stream broke");
                    Status::new(Code::Unavailable, "the service closed the stream")
                };
                let mut trailers = HeaderMap::new();
                let _ = status.add_header(&mut trailers);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use http_body_util::Full;

    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("123456789S"), None, "more than 8 digits");
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
    }

    #[test]
    fn unary_calls_get_bounded_deadlines_and_streams_keep_theirs() {
        let unary = Shape::default();
        let stream = Shape { server_streaming: true, ..Shape::default() };
        let (default, max) = (Duration::from_secs(30), Duration::from_secs(300));

        let mut h = HeaderMap::new();
        apply_deadline(&mut h, unary, default, max);
        assert_eq!(h["grpc-timeout"], "30000m");

        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", "1H".parse().unwrap());
        apply_deadline(&mut h, unary, default, max);
        assert_eq!(h["grpc-timeout"], "300000m");

        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", "2S".parse().unwrap());
        apply_deadline(&mut h, unary, default, max);
        assert_eq!(h["grpc-timeout"], "2S", "shorter deadlines are kept as sent");

        let mut h = HeaderMap::new();
        apply_deadline(&mut h, stream, default, max);
        assert!(h.get("grpc-timeout").is_none(), "streams may run as long as the client wants");
    }

    fn framed(lengths: &[usize]) -> Bytes {
        let mut out = Vec::new();
        for &len in lengths {
            out.push(0);
            out.extend_from_slice(&(len as u32).to_be_bytes());
            out.extend(std::iter::repeat_n(7u8, len));
        }
        Bytes::from(out)
    }

    async fn drain(lengths: &[usize], max: usize) -> (Result<(), Status>, bool) {
        let flag = Arc::new(AtomicBool::new(false));
        let body = Body::new(Full::new(framed(lengths)).map_err(|never| match never {}));
        let mut limited = FrameLimit::new(body, max, flag.clone());
        let mut result = Ok(());
        while let Some(frame) = limited.frame().await {
            if let Err(e) = frame {
                result = Err(e);
                break;
            }
        }
        (result, flag.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn frames_within_the_limit_pass_and_larger_ones_fail() {
        assert!(matches!(drain(&[10, 1024, 0], 1024).await, (Ok(()), false)));
        let (result, flagged) = drain(&[10, 1025], 1024).await;
        assert_eq!(result.unwrap_err().code(), Code::ResourceExhausted);
        assert!(flagged);
    }

    #[test]
    fn paths_name_their_service() {
        assert_eq!(service_of("/csp.auth.v1.AuthService/Login"), Some("csp.auth.v1.AuthService"));
        assert_eq!(service_of("/health"), None);
        assert_eq!(service_of(""), None);
    }

    #[test]
    fn every_declared_method_has_a_shape() {
        let shapes = method_shapes();
        assert!(shapes["/csp.executor.v1.ExecutorService/WatchExecution"].server_streaming);
        assert!(shapes["/csp.collab.v1.CollaborationService/Session"].client_streaming);
        assert!(!shapes["/csp.auth.v1.AuthService/Login"].server_streaming);
    }
}

//! Prometheus metrics and the per-call observability layer.
//!
//! [`install`] sets up the process-wide recorder once; [`render`] produces the text exposition
//! for `GET /metrics`. [`ObserveLayer`] wraps a gRPC server: for every call it opens a server
//! span (parented to the caller's `traceparent`) and records
//! `csp_grpc_requests_total{server,service,method,code}`,
//! `csp_grpc_request_duration_seconds{server,service,method}` for unary calls (until the last
//! byte of the response), `csp_grpc_stream_duration_seconds{server,service,method}` for
//! streaming calls (their whole life: a latency they are not) and
//! `csp_grpc_requests_in_flight{server}`. The same calls feed [`call_counts`], which the
//! in-process alert rules read.
//! Paths that are not a known RPC are labelled `unknown`, so a client cannot blow up the
//! label cardinality.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use prost::Message as _;
use tonic::{Code, body::Body};
use tower::{Layer, Service};
use tracing::{Instrument as _, field::Empty};

use crate::telemetry::{HeaderExtractor, set_parent_from};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Latency buckets, in seconds: 100 µs to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];
const BUCKETS: usize = 17;
const _: () = assert!(LATENCY_BUCKETS.len() == BUCKETS);

/// This process's calls since it started, as the alert rules read them (health checks and
/// reflection left out: they are not the product's traffic).
struct CallStats {
    calls: AtomicU64,
    /// Calls that ended with a server-side failure (see [`is_server_failure`]).
    failures: AtomicU64,
    /// Unary calls by latency bucket (the last one: above the largest bound).
    unary: [AtomicU64; BUCKETS + 1],
}

static CALLS: CallStats = CallStats {
    calls: AtomicU64::new(0),
    failures: AtomicU64::new(0),
    unary: [const { AtomicU64::new(0) }; BUCKETS + 1],
};

/// A reading of this process's call counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallCounts {
    /// Calls finished.
    pub calls: u64,
    /// Of which failed on the server's side.
    pub failures: u64,
    /// Unary calls per bucket of [`LATENCY_BUCKETS`], plus one above the largest.
    pub unary: Vec<u64>,
}

/// This process's call counters since it started.
pub fn call_counts() -> CallCounts {
    CallCounts {
        calls: CALLS.calls.load(Ordering::Relaxed),
        failures: CALLS.failures.load(Ordering::Relaxed),
        unary: CALLS.unary.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
    }
}

/// The codes that mean the server failed, not the caller: what the error-rate alert counts.
pub fn is_server_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown | Code::Internal | Code::Unavailable | Code::DataLoss | Code::DeadlineExceeded
    )
}

/// Installs the process-wide Prometheus recorder (once; later calls are no-ops) and describes
/// the shared metrics. Returns whether metrics are being recorded.
pub fn install() -> bool {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?
                .install_recorder()
                .ok()?;
            // Histograms keep raw samples until upkeep folds them into buckets.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            });
            describe();
            Some(handle)
        })
        .is_some()
}

fn describe() {
    metrics::describe_counter!(
        "csp_grpc_requests_total",
        "gRPC calls handled, by server, service, method and status code"
    );
    metrics::describe_histogram!(
        "csp_grpc_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from request to the end of the response of unary calls, by server, service and method"
    );
    metrics::describe_histogram!(
        "csp_grpc_stream_duration_seconds",
        metrics::Unit::Seconds,
        "Lifetime of streaming calls, by server, service and method"
    );
    metrics::describe_gauge!("csp_grpc_requests_in_flight", "gRPC calls being handled, by server");
    metrics::describe_gauge!(
        "csp_dependency_up",
        "Whether a dependency (database, redis, upstream) answered its last health check"
    );
}

/// The Prometheus text exposition of every metric of this process.
pub fn render() -> String {
    match HANDLE.get() {
        Some(Some(handle)) => handle.render(),
        _ => String::new(),
    }
}

/// Every `/package.Service/Method` path declared by the protos, plus health and reflection,
/// and whether the method streams (either way).
fn known_paths() -> &'static HashMap<String, bool> {
    static PATHS: OnceLock<HashMap<String, bool>> = OnceLock::new();
    PATHS.get_or_init(|| {
        let mut paths = HashMap::new();
        for encoded in [
            csp_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(fds) = prost_types::FileDescriptorSet::decode(encoded) else {
                continue;
            };
            for file in fds.file {
                for service in &file.service {
                    for method in &service.method {
                        let streams = method.client_streaming() || method.server_streaming();
                        paths.insert(
                            format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                            streams,
                        );
                    }
                }
            }
        }
        paths
    })
}

/// Splits a known RPC path into (service, method); anything else is `("unknown", "unknown")`.
pub fn rpc_labels(path: &str) -> (&'static str, &'static str) {
    match known_paths().get_key_value(path) {
        Some((known, _)) => {
            let trimmed = &known[1..];
            trimmed.split_once('/').unwrap_or(("unknown", "unknown"))
        }
        None => ("unknown", "unknown"),
    }
}

/// Whether a known RPC path is a streaming method.
fn is_streaming(path: &str) -> bool {
    known_paths().get(path).copied().unwrap_or(false)
}

/// The gRPC status of a response head or trailers, if it carries one.
pub fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

/// Label value of a code, in the names grpc-go and most dashboards use.
fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Wraps a gRPC server with a server span and call metrics. See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct ObserveLayer {
    server: &'static str,
}

impl ObserveLayer {
    /// Labels everything this layer records with `server`.
    pub fn new(server: &'static str) -> Self {
        Self { server }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner, server: self.server }
    }
}

/// The service made by [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    server: &'static str,
}

impl<S, B, ResBody> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: HttpBody<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let is_grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        if !is_grpc {
            let future = self.inner.call(request);
            return Box::pin(async move { Ok(future.await?.map(Body::new)) });
        }

        let (service, method) = rpc_labels(request.uri().path());
        let span = tracing::info_span!(
            "grpc",
            otel.name = %request.uri().path().trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = Empty,
            server = self.server,
        );
        set_parent_from(&span, &HeaderExtractor(request.headers()));
        let streaming = is_streaming(request.uri().path());
        let call = CallRecord::start(self.server, service, method, streaming, span.clone());
        // Enter the span for the synchronous part of `call` too: a forwarding service reads
        // the current trace context there.
        let future = span.in_scope(|| self.inner.call(request)).instrument(span);
        Box::pin(async move {
            let response = future.await?;
            let (mut parts, body) = response.into_parts();
            crate::error::bound_status_headers(&mut parts.headers);
            if let Some(code) = grpc_status(&parts.headers) {
                // Trailers-only response: the call is over.
                call.finish(code);
                return Ok(Response::from_parts(parts, Body::new(body)));
            }
            Ok(Response::from_parts(parts, Body::new(ObservedBody { inner: body, call: Some(call) })))
        })
    }
}

/// One call being measured; records exactly once (on finish, or as cancelled when dropped).
struct CallRecord {
    server: &'static str,
    service: &'static str,
    method: &'static str,
    streaming: bool,
    started: Instant,
    span: tracing::Span,
    done: bool,
}

impl CallRecord {
    fn start(
        server: &'static str,
        service: &'static str,
        method: &'static str,
        streaming: bool,
        span: tracing::Span,
    ) -> Self {
        metrics::gauge!("csp_grpc_requests_in_flight", "server" => server).increment(1.0);
        Self { server, service, method, streaming, started: Instant::now(), span, done: false }
    }

    fn finish(mut self, code: Code) {
        self.record(code);
    }

    fn record(&mut self, code: Code) {
        if self.done {
            return;
        }
        self.done = true;
        let elapsed = self.started.elapsed();
        self.span.record("rpc.grpc.status_code", code as i32);
        metrics::gauge!("csp_grpc_requests_in_flight", "server" => self.server).decrement(1.0);
        metrics::counter!(
            "csp_grpc_requests_total",
            "server" => self.server,
            "service" => self.service,
            "method" => self.method,
            "code" => code_label(code),
        )
        .increment(1);
        let seconds = elapsed.as_secs_f64();
        let duration = if self.streaming {
            "csp_grpc_stream_duration_seconds"
        } else {
            "csp_grpc_request_duration_seconds"
        };
        metrics::histogram!(duration, "server" => self.server, "service" => self.service, "method" => self.method)
            .record(seconds);
        if !self.service.starts_with("grpc.") {
            CALLS.calls.fetch_add(1, Ordering::Relaxed);
            if is_server_failure(code) {
                CALLS.failures.fetch_add(1, Ordering::Relaxed);
            }
            if !self.streaming {
                let bucket = LATENCY_BUCKETS.iter().position(|bound| seconds <= *bound).unwrap_or(BUCKETS);
                CALLS.unary[bucket].fetch_add(1, Ordering::Relaxed);
            }
        }
        if matches!(code, Code::Internal | Code::Unknown | Code::DataLoss) {
            tracing::warn!(parent: &self.span, code = ?code, elapsed_ms = elapsed.as_millis() as u64, "call failed");
        } else {
            tracing::debug!(parent: &self.span, code = ?code, elapsed_ms = elapsed.as_millis() as u64, "call finished");
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        // The response was dropped before its trailers: the client went away.
        self.record(Code::Cancelled);
    }
}

pin_project_lite::pin_project! {
    /// A response body that records the call when its trailers pass.
    struct ObservedBody<B> {
        #[pin]
        inner: B,
        call: Option<CallRecord>,
    }
}

impl<B> HttpBody for ObservedBody<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let mut frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(f)) = &mut frame
            && let Some(trailers) = f.trailers_mut()
        {
            crate::error::bound_status_headers(trailers);
        }
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref()
                    && let Some(call) = this.call.take()
                {
                    call.finish(grpc_status(trailers).unwrap_or(Code::Unknown));
                }
            }
            Some(Err(_)) => {
                if let Some(call) = this.call.take() {
                    call.finish(Code::Unknown);
                }
            }
            None => {
                if let Some(call) = this.call.take() {
                    call.finish(Code::Unknown);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_rpcs_are_labelled_and_the_rest_is_unknown() {
        assert_eq!(rpc_labels("/csp.auth.v1.AuthService/Login"), ("csp.auth.v1.AuthService", "Login"));
        assert_eq!(rpc_labels("/grpc.health.v1.Health/Check"), ("grpc.health.v1.Health", "Check"));
        assert_eq!(rpc_labels("/csp.auth.v1.AuthService/Nope"), ("unknown", "unknown"));
        assert_eq!(rpc_labels("/evil/x".repeat(10).as_str()), ("unknown", "unknown"));
    }
}

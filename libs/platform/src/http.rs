//! `GET /health`, `GET /metrics` and `GET /alerts` on a gRPC port.
//!
//! Every server of the suite answers these two plain HTTP requests on its gRPC port (HTTP/1.1
//! or h2), so probes and scrapers need no second port. Everything else passes through.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::health::HealthReport;

/// Adds `GET /health` and `GET /metrics` in front of a service.
#[derive(Clone)]
pub struct HttpEndpointsLayer {
    report: Arc<dyn HealthReport>,
    metrics: bool,
}

impl HttpEndpointsLayer {
    /// `/health` answers from `report`; `/metrics` is served when `metrics` is on.
    pub fn new(report: Arc<dyn HealthReport>, metrics: bool) -> Self {
        Self { report, metrics }
    }
}

impl<S> Layer<S> for HttpEndpointsLayer {
    type Service = HttpEndpoints<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpEndpoints { inner, report: self.report.clone(), metrics: self.metrics }
    }
}

/// The service made by [`HttpEndpointsLayer`].
#[derive(Clone)]
pub struct HttpEndpoints<S> {
    inner: S,
    report: Arc<dyn HealthReport>,
    metrics: bool,
}

impl<S, B> Service<Request<B>> for HttpEndpoints<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let is_get = request.method() == Method::GET || request.method() == Method::HEAD;
        match (is_get, request.uri().path()) {
            (true, "/health" | "/healthz" | "/readyz") => {
                let report = self.report.clone();
                Box::pin(async move {
                    let (healthy, body) = report.report().await;
                    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                    let mut text = serde_json::to_vec_pretty(&body).unwrap_or_default();
                    text.push(b'\n');
                    Ok(plain(status, "application/json", text))
                })
            }
            (true, "/alerts") => Box::pin(async {
                let mut text = serde_json::to_vec_pretty(&crate::alerts::report()).unwrap_or_default();
                text.push(b'\n');
                Ok(plain(StatusCode::OK, "application/json", text))
            }),
            (true, "/livez") => Box::pin(async { Ok(plain(StatusCode::OK, "text/plain", b"ok\n".to_vec())) }),
            (true, "/metrics") if self.metrics => Box::pin(async {
                Ok(plain(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    crate::metrics::render().into_bytes(),
                ))
            }),
            _ => Box::pin(self.inner.call(request)),
        }
    }
}

fn plain(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Body::new(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response.headers_mut().insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    response
}

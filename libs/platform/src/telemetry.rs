//! Logging and distributed tracing.
//!
//! [`init`] installs the tracing subscriber (pretty or JSON logs filtered by `log.level`) and
//! an OpenTelemetry tracer. Spans are exported over OTLP/gRPC only when
//! `telemetry.otlp_endpoint` is set; trace context is propagated either way, so a call keeps
//! one trace id across the gateway, the services and the event bus.
//!
//! W3C trace context crosses process boundaries as the `traceparent` / `tracestate` headers:
//! [`inject_context`] and [`extract_context`] work on any string map (gRPC metadata, HTTP
//! headers, bus entry headers).

use std::collections::HashMap;

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::{LogFormat, Settings};

/// Flushes and shuts down the tracer provider when dropped.
#[must_use = "spans are flushed when the guard is dropped"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "could not flush spans at shutdown");
        }
    }
}

/// Installs the global subscriber and tracer. Call once per process, inside the tokio runtime
/// (the OTLP exporter spawns its connection on it).
pub fn init(settings: &Settings, service_name: &str) -> Result<TelemetryGuard, String> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let filter = EnvFilter::try_new(&settings.log.level)
        .map_err(|e| format!("invalid configuration: log.level: {e}"))?
        // sqlx logs every statement at INFO; that is noise, and may carry data.
        .add_directive("sqlx=warn".parse().map_err(|e| format!("{e}"))?)
        .add_directive("h2=warn".parse().map_err(|e| format!("{e}"))?);

    let mut builder = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_resource(Resource::builder().with_service_name(service_name.to_owned()).build());
    if let Some(endpoint) = &settings.telemetry.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| format!("invalid configuration: telemetry.otlp_endpoint: {e}"))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let tracer = provider.tracer("csp");
    opentelemetry::global::set_tracer_provider(provider.clone());

    // Log verbosity must not decide what is traced: the OpenTelemetry layer has its own filter,
    // so trace context keeps flowing across hops even with LOG_LEVEL=warn.
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(EnvFilter::new("info,sqlx=warn,h2=warn,hyper=warn,tower=warn"));
    let fmt_layer = match settings.log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Pretty => {
            tracing_subscriber::fmt::layer().compact().with_target(false).with_writer(std::io::stderr).boxed()
        }
    };
    tracing_subscriber::registry()
        .with(fmt_layer.with_filter(filter))
        .with(otel_layer)
        .try_init()
        .map_err(|e| format!("could not install the log subscriber: {e}"))?;

    Ok(TelemetryGuard { provider: Some(provider) })
}

/// Writes the current span's trace context into a carrier (`traceparent`, `tracestate`).
pub fn inject_context(carrier: &mut dyn Injector) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, carrier);
}

/// Reads a trace context from a carrier; an absent or malformed one gives an empty context.
pub fn extract_context(carrier: &dyn Extractor) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(carrier)
}

/// Makes `span` a child of the trace context found in `carrier`, when there is one.
pub fn set_parent_from(span: &tracing::Span, carrier: &dyn Extractor) {
    let context = extract_context(carrier);
    use opentelemetry::trace::TraceContextExt as _;
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// The current span's trace context as a map, for carriers that are not header maps.
pub fn current_context_map() -> HashMap<String, String> {
    let mut map = HashMap::new();
    inject_context(&mut map);
    map
}

/// The current trace id in hex, for log correlation; `None` outside a sampled trace.
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| span_context.trace_id().to_string())
}

/// Adapts an `http::HeaderMap` (and so tonic metadata) as a propagation carrier.
pub struct HeaderCarrier<'a>(pub &'a mut http::HeaderMap);

impl Injector for HeaderCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            self.0.insert(name, value);
        }
    }
}

/// Read-only view of an `http::HeaderMap` as a propagation carrier.
pub struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// A string map (bus entry headers) as a propagation carrier.
pub struct MapCarrier<'a>(pub &'a mut std::collections::BTreeMap<String, String>);

impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// Read-only view of a string map as a propagation carrier.
pub struct MapExtractor<'a>(pub &'a std::collections::BTreeMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_traceparent_round_trips_through_headers() {
        let provider = SdkTracerProvider::builder().build();
        let tracer = provider.tracer("test");
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
        tracing::subscriber::with_default(subscriber, || {
            let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let mut incoming = http::HeaderMap::new();
            incoming.insert("traceparent", parent.parse().unwrap());

            let span = tracing::info_span!("handler");
            set_parent_from(&span, &HeaderExtractor(&incoming));
            let _entered = span.enter();

            assert_eq!(current_trace_id().as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
            let mut outgoing = http::HeaderMap::new();
            inject_context(&mut HeaderCarrier(&mut outgoing));
            let sent = outgoing.get("traceparent").unwrap().to_str().unwrap();
            assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{sent}");
            assert!(!sent.contains("00f067aa0ba902b7"), "a child span id is sent, not the parent's");
        });
    }

    #[test]
    fn garbage_traceparent_is_ignored() {
        let mut incoming = http::HeaderMap::new();
        incoming.insert("traceparent", "not-a-trace".parse().unwrap());
        let context = extract_context(&HeaderExtractor(&incoming));
        use opentelemetry::trace::TraceContextExt as _;
        assert!(!context.span().span_context().is_valid());
    }
}

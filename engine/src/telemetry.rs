//! Tracing for both binaries (`hotprefix-engine` and `hotprefix-router`): the subscriber, the
//! OpenTelemetry layer and OTLP/HTTP export come from `hotprefix-telemetry` (re-exported here);
//! this module adds the HTTP side, W3C trace context (`traceparent`, `tracestate`) taken from
//! incoming requests and given to outgoing ones, and the server span every completion request
//! runs in.
//!
//! The OpenTelemetry layer is installed whether or not spans are exported: an SDK tracer
//! provider without an exporter still gives every request a valid trace and span id, so a trace
//! continues through the router to the engine and log lines carry the trace id either way.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;
use hyper::body::{Frame, SizeHint};
use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::field::Empty;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use hotprefix_telemetry::{TelemetryError, TelemetryGuard, init, otel_layer, traces_endpoint};

/// The trace context a request's headers carry (`traceparent`, `tracestate`); an empty
/// context when they carry none or an invalid one. The W3C propagator is used directly, so what
/// is read and written does not depend on global state; `init` installs the same one globally
/// for other OpenTelemetry users.
fn extract(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract_with_context(&Context::new(), &HeaderExtractor(headers))
}

/// Writes `span`'s trace context into `headers` (`traceparent`, and `tracestate` when the trace
/// has one), so that the next hop's spans become its children. Writes nothing when `span` has no
/// OpenTelemetry context (no OpenTelemetry layer installed).
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// The span a server request runs in: `http.request`, named `METHOD ROUTE` in traces, a root
/// for `tracing` whose OpenTelemetry parent is the caller's span from `headers`. A request
/// without a (valid) `traceparent` starts a new trace. The trace id is recorded as the field
/// `trace_id`, so the request's log lines name it even where no spans are exported. The fields
/// `request_id` and `model` are for the handler to record once it knows them.
pub fn server_span(method: &Method, route: &str, headers: &HeaderMap) -> Span {
    let name = format!("{method} {route}");
    // An explicit root: a server span's parent is the caller, never whatever span happens to be
    // current where the request is picked up.
    let span = tracing::info_span!(
        parent: None,
        "http.request",
        otel.name = %name,
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %method,
        http.route = route,
        http.response.status_code = Empty,
        request_id = Empty,
        model = Empty,
        trace_id = Empty,
    );
    // This fails only without an OpenTelemetry layer (a process that did not call `init`), where
    // the span simply has no trace.
    let _ = span.set_parent(extract(headers));
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
    }
    span
}

/// Axum middleware running a request in its [`server_span`]; the span stays open (and is entered
/// whenever the response body is polled) until the body has been sent, so a streamed response
/// is inside its request's span to the end. Its status is recorded; a 5xx marks the span as
/// an error.
pub async fn trace_http(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
    let span = server_span(req.method(), &route, req.headers());
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Body::new(SpanBody { inner: body, span }))
}

/// A response body that keeps its request's span open until it is dropped, and enters the span
/// while it is polled (which is when a streamed generation runs).
struct SpanBody {
    inner: Body,
    span: Span,
}

impl HttpBody for SpanBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let _entered = this.span.enter();
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    // Forwarded so that a body of known length keeps its `Content-Length`.
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use hotprefix_telemetry::log_layer;
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing::Subscriber;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// A subscriber like `init`'s, logging into a buffer, over a provider without an exporter.
    fn subscriber(json: bool) -> (impl Subscriber + Send + Sync, Arc<Mutex<Vec<u8>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let out = Arc::clone(&buf);
        let writer = move || SharedBuf(Arc::clone(&out));
        let provider = SdkTracerProvider::builder().build();
        let s = tracing_subscriber::registry()
            .with(log_layer(json, writer))
            .with(otel_layer(&provider));
        (s, buf)
    }

    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn headers(traceparent: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = traceparent {
            h.insert("traceparent", v.parse().unwrap());
        }
        h
    }

    fn ids(span: &Span) -> (TraceId, SpanId) {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        (sc.trace_id(), sc.span_id())
    }

    #[test]
    fn a_valid_traceparent_is_continued_and_passed_on_with_a_new_span_id() {
        let (s, _) = subscriber(false);
        tracing::subscriber::with_default(s, || {
            let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let mut h = headers(Some(caller));
            h.insert("tracestate", "vendor=abc".parse().unwrap());
            let span = server_span(&Method::POST, "/v1/completions", &h);
            let (trace, id) = ids(&span);
            assert_eq!(trace.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_ne!(id.to_string(), "00f067aa0ba902b7");
            let mut out = HeaderMap::new();
            inject(&span, &mut out);
            let tp = out.get("traceparent").unwrap().to_str().unwrap();
            assert_eq!(tp, format!("00-{trace}-{id}-01"));
            assert_eq!(out.get("tracestate").unwrap(), "vendor=abc");
        });
    }

    #[test]
    fn a_missing_or_invalid_traceparent_starts_a_new_trace() {
        let (s, _) = subscriber(false);
        tracing::subscriber::with_default(s, || {
            let mut seen = Vec::new();
            for bad in [
                None,
                Some("garbage"),
                Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
                Some("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01"),
                Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ] {
                let span = server_span(&Method::POST, "/v1/completions", &headers(bad));
                let (trace, id) = ids(&span);
                assert!(
                    trace != TraceId::INVALID && id != SpanId::INVALID,
                    "{bad:?}"
                );
                assert_ne!(
                    trace.to_string(),
                    "4bf92f3577b34da6a3ce929d0e0e4736",
                    "{bad:?}"
                );
                let mut out = HeaderMap::new();
                inject(&span, &mut out);
                let tp = out
                    .get("traceparent")
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string();
                assert!(tp.starts_with(&format!("00-{trace}-{id}-")), "{tp}");
                seen.push(trace);
            }
            seen.sort_by_key(|t| t.to_string());
            seen.dedup();
            assert_eq!(seen.len(), 6, "each request starts its own trace");
        });
    }

    #[test]
    fn log_lines_inside_a_request_name_its_trace_id() {
        for json in [false, true] {
            let (s, buf) = subscriber(json);
            tracing::subscriber::with_default(s, || {
                let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
                let span = server_span(&Method::POST, "/v1/completions", &headers(Some(caller)));
                span.record("request_id", "cmpl-1");
                span.in_scope(|| tracing::info!("inside the request"));
            });
            let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
            let line = text
                .lines()
                .find(|l| l.contains("inside the request"))
                .unwrap_or_else(|| panic!("no log line in {text:?}"));
            assert!(
                line.contains("4bf92f3577b34da6a3ce929d0e0e4736") && line.contains("cmpl-1"),
                "{line}"
            );
        }
    }

    #[test]
    fn without_an_opentelemetry_layer_nothing_is_injected() {
        let span = server_span(&Method::POST, "/v1/completions", &headers(None));
        let mut out = HeaderMap::new();
        inject(&span, &mut out);
        assert!(out.is_empty());
    }
}

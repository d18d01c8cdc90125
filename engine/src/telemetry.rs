//! Tracing for both binaries (`hotprefix-engine` and `hotprefix-router`): the `tracing`
//! subscriber (text or JSON logs filtered by `RUST_LOG`), OpenTelemetry spans bridged from
//! `tracing` spans, W3C trace context (`traceparent`, `tracestate`) taken from incoming requests
//! and given to outgoing ones, and, when a collector is configured, export of the spans over
//! OTLP/HTTP (protobuf).
//!
//! The OpenTelemetry layer is installed whether or not spans are exported: an SDK tracer
//! provider without an exporter still gives every request a valid trace and span id, so a trace
//! continues through the router to the engine and log lines carry the trace id either way.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, Method, Uri};
use axum::middleware::Next;
use axum::response::Response;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, global};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use thiserror::Error;
use tracing::field::Empty;
use tracing::{Instrument, Level, Span, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// Time one export request to the collector may take, response included (OTLP's default).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the guard waits at exit for the last spans to be exported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest collector response read; OTLP responses are a few bytes unless spans were refused.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The path OTLP/HTTP collectors take traces on, appended to a base endpoint.
const TRACES_PATH: &str = "/v1/traces";

/// Telemetry that could not be set up.
#[derive(Debug, Error)]
pub enum TelemetryError {
    /// The OTLP endpoint is not a usable `http://` URL.
    #[error("invalid OTLP endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The OTLP exporter refused its configuration.
    #[error("building the OTLP span exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// The exporter's own runtime could not start.
    #[error("starting the OTLP export runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A global subscriber was already installed.
    #[error("installing the tracing subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps tracing running; dropping it exports the spans still queued (for a bounded time) and
/// shuts the tracer provider down. Hold it in `main` until serving has ended.
#[derive(Debug)]
#[must_use = "dropping the guard shuts tracing down"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
    /// The runtime the OTLP client sends on, when exporting.
    export_runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        // The batch processor's thread exports what is queued; past the timeout the spans are
        // lost rather than holding up the process's exit.
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!(error = %e, "flushing traces at exit failed");
        }
        if let Some(rt) = self.export_runtime.take() {
            // Blocking on a runtime's shutdown is not allowed inside another runtime.
            if tokio::runtime::Handle::try_current().is_ok() {
                rt.shutdown_background();
            } else {
                rt.shutdown_timeout(Duration::from_secs(1));
            }
        }
    }
}

/// The full OTLP/HTTP traces URL for an endpoint given as `--otlp-endpoint` or
/// `OTEL_EXPORTER_OTLP_ENDPOINT`: a collector's base URL (`http://collector:4318`), to which
/// `/v1/traces` is appended unless it already ends with it. Only `http://` is accepted: the
/// exporter carries no TLS stack, so traces go to a collector beside the process or in the
/// cluster, which forwards them on.
pub fn traces_endpoint(endpoint: &str) -> Result<Uri, TelemetryError> {
    let bad = |reason: &str| TelemetryError::Endpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let base = endpoint.trim().trim_end_matches('/');
    let full = if base.ends_with(TRACES_PATH) {
        base.to_string()
    } else {
        format!("{base}{TRACES_PATH}")
    };
    let uri: Uri = full
        .parse()
        .map_err(|e: axum::http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "https is not supported; export to a collector over http:// (a local agent or \
                 the cluster's collector), which can forward over TLS",
            ));
        }
        _ => return Err(bad("expected http://host:port")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("expected http://host:port"));
    }
    Ok(uri)
}

/// Installs the global `tracing` subscriber for `service_name` (`hotprefix-engine` or
/// `hotprefix-router`): logs as text or JSON lines on stdout, filtered by `RUST_LOG` (default
/// `info`), and OpenTelemetry spans, exported over OTLP/HTTP to `otlp_endpoint` when one is
/// given. The W3C trace-context propagator is installed globally either way.
///
/// Exporting never affects serving: spans are queued and sent by the SDK's batch processor on
/// its own thread (dropped when the queue is full), and a failed export is logged by the SDK
/// once per batch, not per span.
pub fn init(
    service_name: &str,
    json_logs: bool,
    otlp_endpoint: Option<&str>,
) -> Result<TelemetryGuard, TelemetryError> {
    let resource = Resource::builder()
        .with_service_name(service_name.to_string())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let mut export_runtime = None;
    // An empty endpoint (an unset variable in a manifest) means no export.
    let otlp_endpoint = otlp_endpoint.map(str::trim).filter(|e| !e.is_empty());
    if let Some(endpoint) = otlp_endpoint {
        let url = traces_endpoint(endpoint)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_io()
            .enable_time()
            .build()
            .map_err(TelemetryError::Runtime)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(ExportClient::new(rt.handle().clone()))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url.to_string())
            .with_timeout(EXPORT_TIMEOUT)
            .build()?;
        builder = builder.with_batch_exporter(exporter);
        export_runtime = Some(rt);
    }
    let provider = builder.build();
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(provider.clone());
    tracing_subscriber::registry()
        .with(log_layer(json_logs, std::io::stdout))
        .with(otel_layer(&provider))
        .try_init()?;
    if let Some(endpoint) = otlp_endpoint {
        tracing::info!(
            endpoint,
            service = service_name,
            "exporting traces over OTLP/HTTP"
        );
    }
    Ok(TelemetryGuard {
        provider,
        export_runtime,
    })
}

/// The log layer: text or JSON lines written to `writer`, filtered by `RUST_LOG` (default
/// `info`). The filter is the layer's own, so `RUST_LOG` never decides which spans exist for
/// OpenTelemetry. Span fields, the trace id among them, are printed with every line.
fn log_layer<S, W>(json: bool, writer: W) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let layer: Box<dyn Layer<S> + Send + Sync> = if json {
        Box::new(fmt::layer().json().with_writer(writer))
    } else {
        Box::new(fmt::layer().with_writer(writer))
    };
    layer.with_filter(filter)
}

/// The OpenTelemetry layer over `provider`: turns HotPrefix's own spans at `info` and above
/// into OpenTelemetry spans (and their events into span events). Spans of dependencies and the
/// SDK's own diagnostics stay out of traces, which also keeps an export from tracing itself.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + use<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("hotprefix"))
        .with_filter(filter_fn(|m| {
            m.target().starts_with("hotprefix") && *m.level() <= Level::INFO
        }))
}

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

/// The OTLP exporter's HTTP client: plain HTTP/1.1 over hyper's pooled client.
///
/// The SDK's batch processor polls exports on its own thread with a plain executor, where there
/// is no Tokio reactor for hyper's sockets; so each request runs on a small runtime of the
/// exporter's own (one worker thread) and only its result crosses back. Being separate from the
/// serving runtime, a busy server never delays an export and a stuck collector never occupies a
/// server thread.
#[derive(Debug)]
struct ExportClient {
    client: Client<HttpConnector, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
}

impl ExportClient {
    fn new(runtime: tokio::runtime::Handle) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(EXPORT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        ExportClient { client, runtime }
    }
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: axum::http::Request<Bytes>,
    ) -> Result<axum::http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let (parts, body) = request.into_parts();
        let request = axum::http::Request::from_parts(parts, Full::new(body));
        let sent = self.runtime.spawn(async move {
            let exchange = async {
                let resp = client.request(request).await?;
                let (parts, body) = resp.into_parts();
                let body = Limited::new(body, MAX_RESPONSE_BYTES)
                    .collect()
                    .await?
                    .to_bytes();
                Ok::<_, HttpError>(axum::http::Response::from_parts(parts, body))
            };
            tokio::time::timeout(EXPORT_TIMEOUT, exchange)
                .await
                .map_err(|_| HttpError::from("the OTLP collector did not answer in time"))?
        });
        sent.await?
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{SpanId, TraceId};

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

    #[test]
    fn endpoints_get_the_traces_path_and_must_be_plain_http() {
        for (given, want) in [
            ("http://collector:4318", "http://collector:4318/v1/traces"),
            ("http://collector:4318/", "http://collector:4318/v1/traces"),
            (
                "http://127.0.0.1:4318/v1/traces",
                "http://127.0.0.1:4318/v1/traces",
            ),
            ("http://otel/prefix", "http://otel/prefix/v1/traces"),
        ] {
            assert_eq!(traces_endpoint(given).unwrap().to_string(), want);
        }
        for bad in [
            "https://collector:4318",
            "collector:4318",
            "",
            "http://",
            "ftp://x",
        ] {
            let e = traces_endpoint(bad).unwrap_err();
            assert!(e.to_string().contains("OTLP endpoint"), "{bad}: {e}");
        }
    }

    /// Export over the real client to a local stand-in collector: the batch processor's thread
    /// (no Tokio runtime of its own) sends a protobuf POST to `/v1/traces`.
    #[test]
    fn spans_are_exported_over_otlp_http() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head, then as many body bytes as it announces.
            loop {
                let n = conn.read(&mut chunk).unwrap();
                got.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap();
                    if body.len() >= len || n == 0 {
                        break;
                    }
                }
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
            String::from_utf8_lossy(&got).to_string()
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(ExportClient::new(rt.handle().clone()))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(
                traces_endpoint(&format!("http://{addr}"))
                    .unwrap()
                    .to_string(),
            )
            .build()
            .unwrap();
        let provider = SdkTracerProvider::builder()
            .with_resource(
                Resource::builder()
                    .with_service_name("hotprefix-test")
                    .build(),
            )
            .with_batch_exporter(exporter)
            .build();
        let s = tracing_subscriber::registry().with(otel_layer(&provider));
        tracing::subscriber::with_default(s, || {
            let span = server_span(&Method::POST, "/v1/completions", &HeaderMap::new());
            drop(span);
        });
        provider.force_flush().unwrap();
        let request = collector.join().unwrap();
        assert!(request.starts_with("POST /v1/traces HTTP/1.1"), "{request}");
        assert!(
            request
                .to_ascii_lowercase()
                .contains("content-type: application/x-protobuf")
        );
        assert!(request.contains("hotprefix-test") && request.contains("POST /v1/completions"));
        provider.shutdown().unwrap();
    }
}

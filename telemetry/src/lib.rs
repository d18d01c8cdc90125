//! Logs and OpenTelemetry for every HotPrefix binary (`hotprefix-engine`, `hotprefix-router`,
//! `hotprefix-operator`): the `tracing` subscriber (text or JSON lines on stdout, filtered by
//! `RUST_LOG`), OpenTelemetry spans bridged from HotPrefix's own `tracing` spans, and, when a
//! collector is configured, export of the spans over OTLP/HTTP (protobuf) through a small hyper
//! client of our own.
//!
//! The OpenTelemetry layer is installed whether or not spans are exported: an SDK tracer
//! provider without an exporter still gives every span a valid trace and span id, so log lines
//! carry the trace id either way. The HTTP trace-context parts (W3C `traceparent` taken from
//! requests and given to upstream calls, the server span middleware) are the engine's
//! `telemetry` module, built on this crate; the operator needs none of them, which is why this
//! crate knows nothing of axum or of HTTP servers.
//!
//! It also holds [`shutdown_signal`], the other piece of process setup the three binaries
//! share.

mod export;

use std::time::Duration;

use hyper::Uri;
use opentelemetry::global;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use thiserror::Error;
use tracing::{Level, Subscriber};
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

use crate::export::{EXPORT_TIMEOUT, ExportClient};

/// Time the guard waits at exit for the last spans to be exported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
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
    let uri: Uri = full.parse().map_err(|e| bad(&format!("{e}")))?;
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

/// Installs the global `tracing` subscriber for `service_name` (`hotprefix-engine`,
/// `hotprefix-router` or `hotprefix-operator`): logs as text or JSON lines on stdout, filtered by
/// `RUST_LOG` (default `info`), and OpenTelemetry spans, exported over OTLP/HTTP to
/// `otlp_endpoint` when one is given (an empty one exports nothing, as OpenTelemetry's own
/// variable does). The W3C trace-context propagator is installed globally either way.
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
pub fn log_layer<S, W>(json: bool, writer: W) -> impl Layer<S>
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

/// Resolves on SIGINT or SIGTERM (Ctrl-C, or Kubernetes stopping the pod): what every binary's
/// graceful shutdown waits for. A signal that cannot be listened for is logged and never
/// fires, so the other one still can.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};

    use hyper::body::Bytes;
    use opentelemetry_http::HttpClient as _;

    use super::*;

    #[derive(Clone)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
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

    /// Reads one HTTP/1.1 request (its head, then as many body bytes as it announces).
    fn read_request(conn: &mut std::net::TcpStream) -> String {
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
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
                    .unwrap_or(0);
                if body.len() >= len || n == 0 {
                    break;
                }
            }
        }
        String::from_utf8_lossy(&got).to_string()
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
            ("http://otel:4318/v1/traces/", "http://otel:4318/v1/traces"),
            ("http://otel/prefix", "http://otel/prefix/v1/traces"),
        ] {
            assert_eq!(traces_endpoint(given).unwrap().to_string(), want);
        }
        for bad in [
            "https://collector:4318",
            "collector:4318",
            "",
            "http://",
            "http:// x",
            "ftp://x",
        ] {
            let e = traces_endpoint(bad).unwrap_err();
            assert!(e.to_string().contains("OTLP endpoint"), "{bad}: {e}");
        }
    }

    #[test]
    fn log_lines_are_text_or_json_with_their_span_fields() {
        for json in [false, true] {
            let buf = SharedBuf(Arc::new(Mutex::new(Vec::new())));
            let out = buf.clone();
            let s = tracing_subscriber::registry().with(log_layer(json, move || out.clone()));
            tracing::subscriber::with_default(s, || {
                let span = tracing::info_span!("reconcile", object = "ns/svc");
                span.in_scope(|| tracing::info!(step = 3, "inside the span"));
                tracing::debug!("below the default level");
            });
            let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 1, "only the info line: {text:?}");
            let line = lines[0];
            assert!(line.contains("inside the span") && line.contains("ns/svc"));
            if json {
                assert!(
                    line.starts_with('{') && line.contains(r#""object":"ns/svc""#),
                    "{line}"
                );
            } else {
                // Field names may carry colour codes in text, so only the values are looked for.
                assert!(
                    !line.starts_with('{') && line.contains("reconcile"),
                    "{line}"
                );
            }
        }
    }

    /// Export through `init`'s client to a local stand-in collector: the batch processor's
    /// thread (no Tokio runtime of its own) sends a protobuf POST to `/v1/traces`.
    #[test]
    fn spans_are_exported_over_otlp_http() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let request = read_request(&mut conn);
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
            request
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
            let span = tracing::info_span!(
                "http.request",
                otel.name = "POST /v1/completions",
                otel.kind = "server"
            );
            drop(span);
            // A dependency's span is not ours, so it stays out of the trace.
            let other = tracing::info_span!(target: "hyper", "dependency.span");
            drop(other);
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
        assert!(!request.contains("dependency.span"), "{request}");
        provider.shutdown().unwrap();
    }

    /// A collector answering with more than the response limit gets an error, not an unbounded
    /// read.
    #[test]
    fn an_oversized_collector_response_is_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            read_request(&mut conn);
            let body = vec![b'x'; 128 * 1024];
            let head = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            conn.write_all(head.as_bytes()).unwrap();
            // The client may close as soon as it has read past the limit.
            let _ = conn.write_all(&body);
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let client = ExportClient::new(rt.handle().clone());
        let request = hyper::Request::post(format!("http://{addr}/v1/traces"))
            .body(Bytes::from_static(b"spans"))
            .unwrap();
        let err = rt.block_on(client.send_bytes(request)).unwrap_err();
        assert!(err.to_string().contains("length limit"), "{err}");
        collector.join().unwrap();
    }
}

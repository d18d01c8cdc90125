//! OpenTelemetry across router -> engine, in one process and without a collector: spans go to
//! an in-memory exporter, a real router proxies to a real engine (`random:tiny`) over loopback
//! sockets, and the spans show one trace: the caller's span, the router's request span, its
//! upstream attempt, and the engine's request span, each the parent of the next. A request
//! without a `traceparent` gets a new trace that still spans both processes.
//!
//! Its own test binary: the `tracing` subscriber it installs is global to the process.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use hotprefix_engine::telemetry;
use hotprefix_router::server;
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// The server spans of `trace` once the router's and the engine's have both ended (a span ends
/// when its response body has been sent, a moment after the client has read it).
async fn finished(exporter: &InMemorySpanExporter, trace: TraceId) -> Vec<SpanData> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let spans: Vec<SpanData> = exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|s| s.span_context.trace_id() == trace)
            .collect();
        let servers = spans
            .iter()
            .filter(|s| s.span_kind == SpanKind::Server)
            .count();
        if servers >= 2 || Instant::now() > deadline {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The chain caller -> router request span -> upstream attempt -> engine request span in the
/// finished spans of one trace; returns (router, upstream, engine).
fn chain(spans: &[SpanData]) -> (&SpanData, &SpanData, &SpanData) {
    let [router, engine] = {
        let mut servers: Vec<&SpanData> = spans
            .iter()
            .filter(|s| s.span_kind == SpanKind::Server)
            .collect();
        assert_eq!(servers.len(), 2, "{spans:#?}");
        // The router's is the one whose parent is not one of this process's spans.
        servers.sort_by_key(|s| {
            spans
                .iter()
                .any(|p| p.span_context.span_id() == s.parent_span_id)
        });
        [servers[0], servers[1]]
    };
    let upstream: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_kind == SpanKind::Client)
        .collect();
    assert_eq!(upstream.len(), 1, "one attempt: {spans:#?}");
    let upstream = upstream[0];
    assert_eq!(upstream.parent_span_id, router.span_context.span_id());
    assert!(!upstream.parent_span_is_remote);
    assert_eq!(
        engine.parent_span_id,
        upstream.span_context.span_id(),
        "the engine's span is a child of the router's upstream request"
    );
    assert!(engine.parent_span_is_remote, "it came over the wire");
    (router, upstream, engine)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_engine_spans_continue_the_callers_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing_subscriber::registry()
        .with(telemetry::otel_layer(&provider))
        .init();
    let engine = common::engine().await;
    let mut proxy = common::router(&[
        "--replicas",
        &format!("http://{}", engine.addr),
        "--model",
        "random:tiny",
    ])
    .await;
    let router_addr = proxy.addr;

    // A caller with a trace: router and engine continue it.
    let body =
        json!({"model": "random-tiny", "prompt": "hello there", "max_tokens": 4, "temperature": 0})
            .to_string();
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let resp = common::raw(
        router_addr,
        "POST",
        "/v1/completions",
        &[("traceparent", &traceparent), ("tracestate", "caller=1")],
        &body,
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let trace = TraceId::from_hex(CALLER_TRACE).unwrap();
    let spans = finished(&exporter, trace).await;
    let (router, upstream, engine) = chain(&spans);
    assert_eq!(
        router.parent_span_id,
        SpanId::from_hex(CALLER_SPAN).unwrap(),
        "the router's span is a child of the caller's"
    );
    assert!(router.parent_span_is_remote);
    for s in [router, upstream, engine] {
        assert!(
            s.span_context.is_sampled(),
            "the caller's sampled flag holds"
        );
        assert_eq!(s.span_context.trace_state().header(), "caller=1");
    }
    assert_eq!(router.name, "POST /v1/completions");
    assert_eq!(engine.name, "POST /v1/completions");
    assert_eq!(
        attr(router, "http.route").as_deref(),
        Some("/v1/completions")
    );
    assert_eq!(attr(router, "model").as_deref(), Some("random-tiny"));
    let served_by = resp
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix(&format!("{}:", server::REPLICA_HEADER))
                .map(|v| v.trim().to_string())
        })
        .unwrap();
    assert_eq!(attr(upstream, "replica"), Some(served_by));
    assert_eq!(
        attr(upstream, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(engine, "model").as_deref(), Some("random-tiny"));
    assert_eq!(
        attr(engine, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert!(
        attr(engine, "request_id").is_some_and(|id| id.starts_with("cmpl-")),
        "{engine:#?}"
    );
    // The trace id is also a field of both request spans, which is how log lines name it.
    assert_eq!(attr(router, "trace_id").as_deref(), Some(CALLER_TRACE));
    assert_eq!(attr(engine, "trace_id").as_deref(), Some(CALLER_TRACE));

    // No caller trace, and a streamed chat answer: the router starts a trace, and the engine's
    // span, which lasts until the last event was sent, still joins it.
    exporter.reset();
    let body = json!({
        "model": "random-tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "stream": true,
    })
    .to_string();
    let resp = common::raw(router_addr, "POST", "/v1/chat/completions", &[], &body).await;
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.contains("[DONE]"),
        "{resp}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let trace = loop {
        let spans = exporter.get_finished_spans().unwrap();
        if let Some(s) = spans
            .iter()
            .find(|s| s.span_kind == SpanKind::Server && s.parent_span_id == SpanId::INVALID)
        {
            break s.span_context.trace_id();
        }
        assert!(Instant::now() < deadline, "no root span: {spans:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ne!(trace, TraceId::from_hex(CALLER_TRACE).unwrap());
    let spans = finished(&exporter, trace).await;
    let (router, _, engine) = chain(&spans);
    assert_eq!(router.parent_span_id, SpanId::INVALID, "a new trace");
    assert_eq!(engine.name, "POST /v1/chat/completions");
    assert!(
        attr(engine, "request_id").is_some_and(|id| id.starts_with("chatcmpl-")),
        "{engine:#?}"
    );
    assert!(engine.start_time >= router.start_time);

    proxy.launched.take().unwrap().stop().await;
    provider.shutdown().unwrap();
}

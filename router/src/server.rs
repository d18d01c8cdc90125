//! The router's HTTP server (axum): proxies `/v1/completions` and `/v1/chat/completions` to the
//! replica the policy picks (responses, SSE included, streamed through unbuffered), `/v1/models`,
//! `/health`, `/ready`, `/metrics` and `POST /debug/route`, which explains a decision without
//! sending anything. Errors are OpenAI-shaped JSON.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use hotprefix_engine::api::{ChatRequest, CompletionRequest};
use hotprefix_engine::prompt;
use hotprefix_engine::source::TextModel;
use hotprefix_engine::telemetry;
use hotprefix_protocol::{BlockHash, DEFAULT_BLOCK_SIZE, ReplicaId, Salt, hash_blocks};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::Instrument;
use tracing::field::Empty;

use crate::cluster::RouteRequest;
use crate::metrics::RouterMetrics;
use crate::policy::{Decision, PolicyKind, RoutingPolicy};
use crate::redis_feed::FeedStatus;
use crate::registry::{Flight, Registry};

/// Header naming the replica that served a response.
pub const REPLICA_HEADER: &str = "x-hotprefix-replica";

/// The upstream HTTP client.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client with the given connect timeout.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_connect_timeout(Some(connect_timeout));
    c.set_nodelay(true);
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(c)
}

/// Proxy settings.
#[derive(Clone)]
pub struct ProxyConfig {
    /// Required `Authorization: Bearer` key, if any.
    pub api_key: Option<String>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Other replicas tried when one fails before answering.
    pub retries: usize,
    /// Time limit for an upstream's response headers.
    pub upstream_timeout: Duration,
    /// Header carrying a session key (for `consistent-hash`).
    pub session_header: HeaderName,
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The API key is a secret: say only whether there is one.
        f.debug_struct("ProxyConfig")
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("max_body_bytes", &self.max_body_bytes)
            .field("retries", &self.retries)
            .field("upstream_timeout", &self.upstream_timeout)
            .field("session_header", &self.session_header)
            .finish()
    }
}

/// Everything the handlers share.
#[derive(Clone, Debug)]
pub struct RouterState {
    /// The replicas.
    pub registry: Arc<Registry>,
    /// The configured policy.
    pub policy: Arc<dyn RoutingPolicy>,
    /// Used instead of a prefix-aware policy while summaries are unavailable.
    pub fallback: Arc<dyn RoutingPolicy>,
    /// Tokenizer and chat template of the served model, to hash requests as engines do.
    pub text: Option<Arc<TextModel>>,
    /// The Redis feed, when configured.
    pub feed: Option<Arc<FeedStatus>>,
    /// Upstream client.
    pub client: HttpClient,
    /// Proxy settings.
    pub cfg: Arc<ProxyConfig>,
    /// Metrics.
    pub metrics: Arc<RouterMetrics>,
}

/// An OpenAI-shaped error response.
fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": null, "code": null}});
    (status, axum::Json(body)).into_response()
}

/// The routes.
pub fn app(state: RouterState) -> Router {
    let max = state.cfg.max_body_bytes;
    let guarded = Router::new()
        // Each proxied request runs in a span continuing the caller's trace (`traceparent`).
        .route(
            "/v1/completions",
            post(completions).route_layer(middleware::from_fn(telemetry::trace_http)),
        )
        .route(
            "/v1/chat/completions",
            post(chat_completions).route_layer(middleware::from_fn(telemetry::trace_http)),
        )
        .route("/v1/models", get(models))
        .route("/debug/route", post(debug_route))
        .route_layer(middleware::from_fn_with_state(state.clone(), api_key));
    Router::new()
        .merge(guarded)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        // Bodies are read as bytes and checked against the limit by the handlers' extractor,
        // which turns an oversized body into an OpenAI-shaped 413; a body whose declared
        // length is already too large is refused before any of it is read.
        .layer(DefaultBodyLimit::max(max))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            declared_length,
        ))
        .with_state(state)
}

async fn declared_length(State(s): State<RouterState>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > s.cfg.max_body_bytes as u64) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request body is larger than the limit of {} bytes",
                s.cfg.max_body_bytes
            ),
        );
    }
    next.run(req).await
}

/// Serves until `shutdown` resolves, then lets in-flight requests finish.
pub async fn run(
    listener: TcpListener,
    state: RouterState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn api_key(State(s): State<RouterState>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.cfg.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            return error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing or invalid API key (Authorization: Bearer ...)",
            );
        }
    }
    next.run(req).await
}

/// Compares without an early exit, so response timing does not reveal a key prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn body_error(e: BytesRejection) -> Response {
    error(e.status(), "invalid_request_error", e.body_text())
}

/// What the router knows of a request before routing it.
struct Prepared {
    model: Option<String>,
    tokens: Option<Vec<u32>>,
}

/// Reads the model and, with a tokenizer, the prompt tokens exactly as an engine would. A body
/// the engine would refuse is routed anyway (without prefix information) so that the client
/// gets the engine's precise error.
fn prepare(s: &RouterState, chat: bool, body: &[u8]) -> Prepared {
    let model = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("model").and_then(|m| m.as_str()).map(str::to_string));
    let tokens = s.text.as_ref().and_then(|t| {
        if chat {
            let req: ChatRequest = serde_json::from_slice(body).ok()?;
            prompt::chat_prompt(&t.tokenizer, &t.chat, &req).ok()
        } else {
            let req: CompletionRequest = serde_json::from_slice(body).ok()?;
            prompt::completion_prompt(&t.tokenizer, &req).ok()
        }
    });
    Prepared { model, tokens }
}

/// A decision with what it was made from.
struct Routed {
    decision: Decision,
    policy: PolicyKind,
    fallback: bool,
    blocks: Vec<BlockHash>,
    block_size: usize,
    prompt_tokens: usize,
    /// Candidate ids, best first after the chosen one (the retry order).
    order: Vec<ReplicaId>,
    /// Each candidate's in-flight counters, in `order`.
    flights: Vec<(ReplicaId, String, Arc<Flight>)>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Chooses a replica; `None` when none is available.
fn route(s: &RouterState, p: &Prepared, session: Option<&str>) -> Option<Routed> {
    let snap = s.registry.snapshot();
    let reports = s.feed.as_ref().is_none_or(|f| f.up.load(Ordering::Relaxed));
    let candidates = snap.candidates(p.model.as_deref(), reports);
    if candidates.is_empty() {
        return None;
    }
    // Hash under the scheme the candidates registered (they serve one model, so they share
    // it); without registrations, under the served model's id and the default block size.
    let scheme = candidates
        .iter()
        .find_map(|c| snap.replica(&c.id).and_then(|r| r.scheme));
    let (block_size, salt) = match (scheme, &s.text) {
        (Some(sc), _) => (sc.block_size, sc.salt),
        (None, Some(t)) => (DEFAULT_BLOCK_SIZE, Salt::new(&t.id, None, None)),
        (None, None) => (DEFAULT_BLOCK_SIZE, Salt::NONE),
    };
    let tokens = p.tokens.as_deref().unwrap_or(&[]);
    let blocks = hash_blocks(tokens, block_size.max(1), salt, BlockHash::ROOT);
    let req = RouteRequest {
        blocks: &blocks,
        block_size,
        prompt_tokens: tokens.len(),
        session,
        now_ms: now_ms(),
    };
    // A prefix-aware policy without summaries would only see load: say so, and use the
    // fallback policy, which at least learns from its own decisions.
    let fallback = s.policy.kind() == PolicyKind::HotPrefix && !reports;
    let policy = if fallback { &s.fallback } else { &s.policy };
    let t0 = Instant::now();
    let decision = policy.route(&req, &candidates, snap.index());
    let took = t0.elapsed().as_secs_f64();
    let chosen = &candidates[decision.chosen].id;
    policy.on_sent(&req, chosen);
    s.metrics.decision(
        took,
        decision.reason,
        decision.chosen_score().matched_blocks,
    );
    if fallback {
        s.metrics.fallback("redis-down");
    }
    let mut rest: Vec<usize> = (0..candidates.len())
        .filter(|&i| i != decision.chosen)
        .collect();
    rest.sort_by(|&a, &b| {
        decision.scores[b]
            .score
            .total_cmp(&decision.scores[a].score)
    });
    let order: Vec<ReplicaId> = std::iter::once(decision.chosen)
        .chain(rest)
        .map(|i| candidates[i].id.clone())
        .collect();
    let flights = order
        .iter()
        .filter_map(|id| {
            snap.replica(id)
                .map(|r| (id.clone(), r.url.clone(), r.flight.clone()))
        })
        .collect();
    let policy = policy.kind();
    let prompt_tokens = tokens.len();
    drop(snap);
    Some(Routed {
        decision,
        policy,
        fallback,
        blocks,
        block_size,
        prompt_tokens,
        order,
        flights,
    })
}

async fn completions(
    State(s): State<RouterState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(s, "/v1/completions", false, headers, body).await
}

async fn chat_completions(
    State(s): State<RouterState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(s, "/v1/chat/completions", true, headers, body).await
}

/// Counts a request in flight until dropped (when its response body ends or is abandoned).
struct InFlight(Arc<Flight>);

impl InFlight {
    fn start(f: &Arc<Flight>) -> InFlight {
        f.active.fetch_add(1, Ordering::Relaxed);
        f.since_report.fetch_add(1, Ordering::Relaxed);
        f.sent.fetch_add(1, Ordering::Relaxed);
        InFlight(f.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn generate(
    s: RouterState,
    path: &'static str,
    chat: bool,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    let p = prepare(&s, chat, &body);
    if let Some(m) = &p.model {
        tracing::Span::current().record("model", m.as_str());
    }
    let session = headers
        .get(&s.cfg.session_header)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Some(routed) = route(&s, &p, session.as_deref()) else {
        s.metrics.unavailable();
        s.metrics.request(s.policy.kind().as_str(), "", 503);
        return unavailable(p.model.as_deref());
    };
    let policy = routed.policy.as_str();
    tracing::debug!(
        policy,
        replica = %routed.order[0],
        reason = routed.decision.reason,
        matched = routed.decision.chosen_score().matched_blocks,
        blocks = routed.blocks.len(),
        "routed"
    );
    let attempts = routed.flights.len().min(s.cfg.retries + 1);
    let mut last: Option<Response> = None;
    for (attempt, (id, url, flight)) in routed.flights.iter().take(attempts).enumerate() {
        if attempt > 0 {
            s.metrics.retry();
        }
        let guard = InFlight::start(flight);
        // One client span per attempt, a child of the request's span: the engine's span becomes
        // its child through the `traceparent` injected below, and retries show as siblings.
        let upstream = tracing::info_span!(
            "http.upstream",
            otel.name = %format!("POST {path}"),
            otel.kind = "client",
            otel.status_code = Empty,
            replica = %id,
            attempt,
            http.response.status_code = Empty,
        );
        let mut req = hyper::Request::post(format!("{url}{path}"))
            .header(header::CONTENT_TYPE, "application/json");
        for name in [header::ACCEPT, HeaderName::from_static("x-request-id")] {
            if let Some(v) = headers.get(&name) {
                req = req.header(name, v);
            }
        }
        let Ok(mut req) = req.body(Full::new(body.clone())) else {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "bad request",
            );
        };
        telemetry::inject(&upstream, req.headers_mut());
        let resp = tokio::time::timeout(s.cfg.upstream_timeout, s.client.request(req))
            .instrument(upstream.clone())
            .await;
        match resp {
            Ok(Ok(resp)) => {
                let status = resp.status();
                upstream.record("http.response.status_code", status.as_u16());
                if status.is_server_error() {
                    upstream.record("otel.status_code", "error");
                }
                // An engine that is draining or not ready (503), or that failed (5xx) before
                // sending anything, is retried elsewhere: the client has received nothing.
                // Overload (429) is retried too but is not the replica's fault.
                if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                    if status.is_server_error() {
                        s.registry.mark_failed(id, "5xx");
                    }
                    s.metrics.request(policy, &id.0, status.as_u16());
                    last = Some(relay(resp, id, guard, upstream));
                    continue;
                }
                // Everything else, 4xx included, is the replica doing its job.
                s.registry.mark_ok(id);
                s.metrics.request(policy, &id.0, status.as_u16());
                return relay(resp, id, guard, upstream);
            }
            Ok(Err(e)) => {
                upstream.record("otel.status_code", "error");
                tracing::warn!(replica = %id, error = %e, "upstream request failed");
                s.registry.mark_failed(id, "connect");
                s.metrics.request(policy, &id.0, 502);
            }
            Err(_) => {
                upstream.record("otel.status_code", "error");
                tracing::warn!(replica = %id, "upstream timed out before answering");
                s.registry.mark_failed(id, "timeout");
                s.metrics.request(policy, &id.0, 504);
            }
        }
    }
    last.unwrap_or_else(|| {
        error(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "no replica could take the request; try again",
        )
    })
}

/// Streams an upstream response to the client, chunk by chunk as it arrives, and keeps the
/// request counted in flight, and its upstream span open, until the body ends.
fn relay(
    resp: hyper::Response<hyper::body::Incoming>,
    replica: &ReplicaId,
    guard: InFlight,
    span: tracing::Span,
) -> Response {
    let (mut parts, body) = resp.into_parts();
    if let Ok(v) = HeaderValue::from_str(&replica.0) {
        parts.headers.insert(REPLICA_HEADER, v);
    }
    // Hop-by-hop headers are the server's business, not the client's.
    parts.headers.remove(header::CONNECTION);
    parts.headers.remove(header::TRANSFER_ENCODING);
    let stream = body.into_data_stream().map(move |chunk| {
        let _keep = (&guard, &span);
        chunk.map_err(std::io::Error::other)
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

fn unavailable(model: Option<&str>) -> Response {
    let msg = match model {
        Some(m) => format!("no healthy replica serves the model `{m}`; try again later"),
        None => "no healthy replica is available; try again later".to_string(),
    };
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", msg);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

async fn models(State(s): State<RouterState>) -> Response {
    // Every replica answers the same list for its model; merge the distinct ones.
    let targets: Vec<(ReplicaId, String)> = {
        let snap = s.registry.snapshot();
        snap.candidates(None, false)
            .into_iter()
            .filter_map(|c| snap.replica(&c.id).map(|r| (c.id.clone(), r.url.clone())))
            .collect()
    };
    let mut data: Vec<serde_json::Value> = Vec::new();
    for (id, url) in targets {
        let Ok(req) = hyper::Request::get(format!("{url}/v1/models")).body(Full::new(Bytes::new()))
        else {
            continue;
        };
        let Ok(Ok(resp)) =
            tokio::time::timeout(Duration::from_secs(2), s.client.request(req)).await
        else {
            s.registry.mark_failed(&id, "models");
            continue;
        };
        let Ok(bytes) = resp.into_body().collect().await.map(|b| b.to_bytes()) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        for m in v
            .get("data")
            .and_then(|d| d.as_array())
            .into_iter()
            .flatten()
        {
            if !data.iter().any(|d| d.get("id") == m.get("id")) {
                data.push(m.clone());
            }
        }
    }
    if data.is_empty() {
        return unavailable(None);
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

#[derive(Serialize)]
struct Health<'a> {
    status: &'static str,
    redis: &'static str,
    policy: &'a str,
    replicas: Vec<crate::registry::ReplicaStatus>,
}

async fn health(State(s): State<RouterState>) -> Response {
    let replicas = s.registry.snapshot().statuses();
    let redis = match &s.feed {
        None => "disabled",
        Some(f) if f.up.load(Ordering::Relaxed) => "up",
        Some(_) => "down",
    };
    let healthy = replicas.iter().filter(|r| r.healthy).count();
    // The router itself is alive either way; "degraded" tells operators what is missing.
    let status = if healthy == 0 || redis == "down" {
        "degraded"
    } else {
        "ok"
    };
    axum::Json(Health {
        status,
        redis,
        policy: s.policy.kind().as_str(),
        replicas,
    })
    .into_response()
}

async fn ready(State(s): State<RouterState>) -> Response {
    if s.registry.snapshot().candidates(None, false).is_empty() {
        unavailable(None)
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn metrics(State(s): State<RouterState>) -> Response {
    let replicas = s.registry.snapshot().statuses();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(&replicas, s.feed.as_deref()),
    )
        .into_response()
}

#[derive(Serialize)]
struct RouteExplained {
    policy: &'static str,
    fallback: bool,
    model: Option<String>,
    prompt_tokens: usize,
    block_size: usize,
    blocks: usize,
    chosen: ReplicaId,
    decision: Decision,
}

/// `POST /debug/route`: the body of a completion (`prompt`) or chat (`messages`) request;
/// answers every candidate's score and the choice, sending nothing. The decision counts as
/// made (policies with memory remember it), exactly as a real request would.
async fn debug_route(
    State(s): State<RouterState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    let chat = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .is_some_and(|v| v.get("messages").is_some());
    let p = prepare(&s, chat, &body);
    let session = headers
        .get(&s.cfg.session_header)
        .and_then(|v| v.to_str().ok());
    let Some(r) = route(&s, &p, session) else {
        return unavailable(p.model.as_deref());
    };
    axum::Json(RouteExplained {
        policy: r.policy.as_str(),
        fallback: r.fallback,
        model: p.model,
        prompt_tokens: r.prompt_tokens,
        block_size: r.block_size,
        blocks: r.blocks.len(),
        chosen: r.order[0].clone(),
        decision: r.decision,
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `traceparent` an upstream request carries, for a caller's `traceparent` (if any),
    /// built as `generate` builds it: the request's server span, an attempt span inside it.
    fn upstream_traceparent(incoming: Option<&str>) -> String {
        let mut h = HeaderMap::new();
        if let Some(v) = incoming {
            h.insert("traceparent", HeaderValue::from_str(v).unwrap());
        }
        let server = telemetry::server_span(&axum::http::Method::POST, "/v1/completions", &h);
        let upstream = server.in_scope(|| tracing::info_span!("http.upstream"));
        let mut out = HeaderMap::new();
        telemetry::inject(&upstream, &mut out);
        out.get("traceparent")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    #[test]
    fn traceparent_continues_the_callers_trace_with_a_new_span() {
        use tracing_subscriber::layer::SubscriberExt;
        // A provider without exporter, as the router runs without `--otlp-endpoint`.
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry().with(telemetry::otel_layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let out = upstream_traceparent(Some(incoming));
            let parts: Vec<&str> = out.split('-').collect();
            assert_eq!(parts.len(), 4, "{out}");
            assert_eq!(parts[0], "00");
            assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_ne!(parts[2], "00f067aa0ba902b7");
            assert_eq!(parts[2].len(), 16);
            assert_eq!(parts[3], "01");
            for bad in [None, Some("garbage"), Some("00-0000-00f067aa0ba902b7-01")] {
                let out = upstream_traceparent(bad);
                let parts: Vec<&str> = out.split('-').collect();
                assert_eq!(parts.len(), 4, "{bad:?}: {out}");
                assert_eq!((parts[1].len(), parts[2].len()), (32, 16), "{bad:?}: {out}");
                assert_ne!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736");
            }
        });
    }

    #[test]
    fn keys_compare_in_full() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}

//! The engine's HTTP server (axum): OpenAI-compatible completions and chat completions
//! (streamed as server-sent events or not), the model list, health and readiness probes,
//! Prometheus metrics and the cache debug view. Errors are OpenAI-shaped JSON with a 4xx status
//! for anything the client can fix; internals are logged, never echoed.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatMessageOut, ChatRequest, ChatResponse,
    CompletionChoice, CompletionRequest, CompletionResponse, Delta, ErrorBody, ErrorDetail,
    ModelCard, ModelList, Sampling, Usage,
};
use crate::chat::ChatTemplate;
use crate::engine::{EngineHandle, GenerateParams};
use crate::prompt::{self, PromptError};
use crate::sampling::{SamplingParams, find_stop, streamable_len};
use crate::scheduler::{Event, FinishReason, SubmitError};
use crate::telemetry;
use crate::tokenizer::Tokenizer;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Stop strings allowed per request (OpenAI's limit).
const MAX_STOP_STRINGS: usize = 4;
/// `max_tokens` when the request gives none.
const DEFAULT_MAX_TOKENS: usize = 256;

/// Everything the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The engine thread.
    pub engine: EngineHandle,
    /// The model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The model's chat template.
    pub chat: Arc<ChatTemplate>,
    /// The served model id.
    pub model_id: String,
    /// Token ids that end generation unless `ignore_eos`.
    pub stop_tokens: Vec<u32>,
    /// Unix seconds when the server started.
    pub created: u64,
    /// Whether requests can be served (false before the model is up and while shutting down).
    pub ready: Arc<AtomicBool>,
    next_id: Arc<AtomicU64>,
}

impl AppState {
    /// State for a loaded model served by `engine`.
    pub fn new(
        engine: EngineHandle,
        tokenizer: Tokenizer,
        chat: ChatTemplate,
        model_id: String,
        stop_tokens: Vec<u32>,
    ) -> Self {
        AppState {
            engine,
            tokenizer: Arc::new(tokenizer),
            chat: Arc::new(chat),
            model_id,
            stop_tokens,
            created: unix_now(),
            ready: Arc::new(AtomicBool::new(true)),
            next_id: Arc::new(AtomicU64::new(rand::random::<u32>() as u64)),
        }
    }

    fn request_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:016x}{:08x}", rand::random::<u64>(), n as u32)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An error response: status, OpenAI-shaped body, and `Retry-After` for overload.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    retry_after: Option<u64>,
}

impl From<PromptError> for ApiError {
    fn from(e: PromptError) -> Self {
        ApiError::bad(e.message).param(e.param)
    }
}

impl ApiError {
    fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    message: message.into(),
                    kind: kind.to_string(),
                    param: None,
                    code: None,
                },
            },
            retry_after: None,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn param(mut self, p: &str) -> Self {
        self.body.error.param = Some(p.to_string());
        self
    }

    fn code(mut self, c: &str) -> Self {
        self.body.error.code = Some(c.to_string());
        self
    }

    fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the engine failed to process the request",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body)).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull(_) => {
                let mut a = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    e.to_string(),
                );
                a.retry_after = Some(1);
                a
            }
            SubmitError::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                e.to_string(),
            ),
            SubmitError::ContextLength { .. } | SubmitError::TooLarge { .. } => {
                ApiError::bad(e.to_string()).code("context_length_exceeded")
            }
            SubmitError::BadToken { .. } => ApiError::bad(e.to_string()).param("prompt"),
            SubmitError::EmptyPrompt => ApiError::bad(e.to_string()).param("prompt"),
        }
    }
}

/// Parses a JSON body: malformed JSON is a 400, a well-formed body with missing fields or
/// wrong types a 422, a body over the limit a 413.
fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body =
        body.map_err(|e| ApiError::new(e.status(), "invalid_request_error", e.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                format!("invalid request body: {e}"),
            ),
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::bad(format!("the body is not valid JSON: {e}"))
            }
        }
    })
}

/// The routes, with response counting.
pub fn app(state: AppState) -> Router {
    Router::new()
        // Generation runs in a span continuing the caller's trace (`traceparent`).
        .route(
            "/v1/completions",
            post(completions).route_layer(middleware::from_fn(telemetry::trace_http)),
        )
        .route(
            "/v1/chat/completions",
            post(chat_completions).route_layer(middleware::from_fn(telemetry::trace_http)),
        )
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/debug/cache", get(debug_cache))
        .fallback(not_found)
        // After the routes: it applies to those already added. Without it a wrong method gets
        // axum's empty 405, which OpenAI clients cannot parse.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves `app(state)` on `listener` until `shutdown` resolves; then stops accepting, marks the
/// engine not ready, lets in-flight requests finish for up to `grace`, aborts what is left and
/// stops the engine thread.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (fired_tx, fired_rx) = tokio::sync::watch::channel(false);
    let ready = Arc::clone(&state.ready);
    let engine = state.engine.clone();
    let signal = async move {
        shutdown.await;
        ready.store(false, Ordering::SeqCst);
        tracing::info!("shutting down: no new connections, draining in-flight requests");
        let _ = fired_tx.send(true);
    };
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(signal);
    let watchdog_engine = engine.clone();
    let watchdog = async move {
        let mut rx = fired_rx;
        while !*rx.borrow() {
            if rx.changed().await.is_err() {
                return;
            }
        }
        tokio::time::sleep(grace).await;
        tracing::warn!("shutdown grace period over: aborting in-flight requests");
        watchdog_engine.abort_all("the server is shutting down");
        // Never finish: the server's own completion ends the select below.
        std::future::pending::<()>().await;
    };
    let result = tokio::select! {
        r = server => r,
        () = watchdog => Ok(()),
    };
    let e = engine.clone();
    let _ = tokio::task::spawn_blocking(move || e.stop()).await;
    result
}

async fn count(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    s.engine.metrics().http(&route, resp.status().as_u16());
    resp
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "this route does not accept this method",
    )
}

async fn health(State(s): State<AppState>) -> Response {
    if s.engine.is_alive() {
        (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok"})),
        )
            .into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the engine thread has stopped",
        )
        .into_response()
    }
}

async fn ready(State(s): State<AppState>) -> Response {
    if s.ready.load(Ordering::SeqCst) && s.engine.is_alive() {
        (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ready"})),
        )
            .into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "not ready to serve requests",
        )
        .into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.engine.metrics().render(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct CacheQuery {
    top_k: Option<usize>,
}

async fn debug_cache(
    State(s): State<AppState>,
    q: Result<Query<CacheQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()).param("top_k"))?;
    let top_k = q.top_k.unwrap_or(32).min(1024);
    let report = s
        .engine
        .cache_report(top_k)
        .await
        .ok_or_else(ApiError::internal)?;
    let hottest: Vec<serde_json::Value> = report
        .hottest
        .iter()
        .map(|e| {
            serde_json::json!({
                "hash": format!("{:016x}", e.hash.0),
                "tier": e.tier,
                "hotness": e.hotness,
                "depth_blocks": e.depth,
                "prefix_tokens": e.depth as usize * report.block_size,
            })
        })
        .collect();
    Ok(axum::Json(serde_json::json!({
        "policy": report.policy,
        "block_size": report.block_size,
        "usage": report.usage,
        "stats": report.stats,
        "hottest": hottest,
        "locked_blocks": report.locked_blocks,
        "in_transfer_blocks": report.in_transfer_blocks,
        "waiting": report.waiting,
        "running": report.running,
    }))
    .into_response())
}

fn card(s: &AppState) -> ModelCard {
    ModelCard {
        id: s.model_id.clone(),
        object: "model",
        created: s.created,
        owned_by: "hotprefix",
        max_model_len: s.engine.limits().context,
    }
}

async fn models(State(s): State<AppState>) -> axum::Json<ModelList> {
    axum::Json(ModelList {
        object: "list",
        data: vec![card(&s)],
    })
}

async fn model(
    State(s): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<axum::Json<ModelCard>, ApiError> {
    check_model(&s, &id)?;
    Ok(axum::Json(card(&s)))
}

/// What both endpoints take from a request's sampling fields.
struct Settings {
    max_tokens: usize,
    sampling: SamplingParams,
    stops: Vec<String>,
    stop_tokens: Vec<u32>,
    stream: bool,
    include_usage: bool,
}

/// Sampling settings of a request whose prompt has `prompt_len` tokens.
fn settings(
    s: &AppState,
    p: Sampling,
    chat: bool,
    prompt_len: usize,
) -> Result<Settings, ApiError> {
    if let Some(n) = p.n
        && n != 1
    {
        return Err(ApiError::bad("only n=1 is supported").param("n"));
    }
    for (name, v) in [
        ("presence_penalty", p.presence_penalty),
        ("frequency_penalty", p.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad(format!("{name} is not supported")).param(name));
        }
    }
    if p.logprobs
        .as_ref()
        .is_some_and(|v| !(v.is_null() || *v == serde_json::Value::Bool(false)))
    {
        return Err(ApiError::bad("logprobs are not supported").param("logprobs"));
    }
    let (max, field) = match (chat, p.max_completion_tokens, p.max_tokens) {
        (true, Some(m), _) => (Some(m), "max_completion_tokens"),
        (_, _, m) => (m, "max_tokens"),
    };
    let context = s.engine.limits().context;
    let max_tokens = match max {
        // Unset: up to the default, but never past the context, so a long prompt without
        // max_tokens is answered rather than refused.
        None => DEFAULT_MAX_TOKENS.min(context.saturating_sub(prompt_len).max(1)),
        Some(0) => return Err(ApiError::bad(format!("{field} must be at least 1")).param(field)),
        Some(m) if m > context as u64 => {
            return Err(ApiError::bad(format!(
                "{field} is {m}, more than the model's context of {context} tokens"
            ))
            .param(field));
        }
        Some(m) => m as usize,
    };
    let top_k = match p.top_k {
        None | Some(-1) => None,
        Some(k) if k >= 1 => Some(k as usize),
        Some(k) => {
            return Err(
                ApiError::bad(format!("top_k must be -1 or at least 1, got {k}")).param("top_k"),
            );
        }
    };
    let sampling = SamplingParams {
        temperature: p.temperature.unwrap_or(1.0),
        top_k,
        top_p: p.top_p.unwrap_or(1.0),
        seed: p.seed,
    };
    sampling
        .validate()
        .map_err(|e| ApiError::bad(e.to_string()).param(e.field))?;
    let stops = p.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > MAX_STOP_STRINGS {
        return Err(ApiError::bad(format!(
            "at most {MAX_STOP_STRINGS} stop sequences are allowed"
        ))
        .param("stop"));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::bad("stop sequences must not be empty").param("stop"));
    }
    let vocab = s.engine.limits().vocab;
    let mut stop_tokens = if p.ignore_eos {
        Vec::new()
    } else {
        s.stop_tokens.clone()
    };
    for id in p.stop_token_ids.unwrap_or_default() {
        if id as usize >= vocab {
            return Err(ApiError::bad(format!(
                "stop token id {id} is outside the vocabulary of {vocab}"
            ))
            .param("stop_token_ids"));
        }
        stop_tokens.push(id);
    }
    Ok(Settings {
        max_tokens,
        sampling,
        stops,
        stop_tokens,
        stream: p.stream,
        include_usage: p.stream_options.is_some_and(|o| o.include_usage),
    })
}

fn check_model(s: &AppState, model: &str) -> Result<(), ApiError> {
    if model == s.model_id {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!(
                "the model `{model}` does not exist; this server serves `{}`",
                s.model_id
            ),
        )
        .param("model")
        .code("model_not_found"))
    }
}

/// A piece of a generation as the handlers see it.
enum Piece {
    /// New text.
    Text(String),
    /// The end, with the OpenAI finish reason and usage.
    End(&'static str, Usage),
    /// A failure.
    Fail(ApiError),
}

/// Turns engine events into text: incremental detokenisation (never splitting a UTF-8
/// character), stop strings (the text ends before them, and the request is cancelled), and
/// hold-back of text that could be the start of a stop string.
struct TextGen {
    rx: UnboundedReceiver<Event>,
    tok: Arc<Tokenizer>,
    ids: Vec<u32>,
    prefix_off: usize,
    read_off: usize,
    text: String,
    sent: usize,
    stops: Vec<String>,
    prompt_tokens: usize,
    cached: usize,
    finished: bool,
    /// The end, due after the last text piece was handed out.
    pending_end: Option<(&'static str, Usage)>,
}

impl TextGen {
    fn new(rx: UnboundedReceiver<Event>, s: &AppState, stops: Vec<String>, prompt: usize) -> Self {
        TextGen {
            rx,
            tok: Arc::clone(&s.tokenizer),
            ids: Vec::new(),
            prefix_off: 0,
            read_off: 0,
            text: String::new(),
            sent: 0,
            stops,
            prompt_tokens: prompt,
            cached: 0,
            finished: false,
            pending_end: None,
        }
    }

    /// Appends the text `id` completes, if any (a token may end in the middle of a character).
    fn push_token(&mut self, id: u32) {
        self.ids.push(id);
        let dec = |ids: &[u32]| self.tok.decode(ids, true).unwrap_or_default();
        let prefix = dec(&self.ids[self.prefix_off..self.read_off]);
        let full = dec(&self.ids[self.prefix_off..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            if let Some(new) = full.get(prefix.len()..) {
                self.text.push_str(new);
            }
            self.prefix_off = self.read_off;
            self.read_off = self.ids.len();
        }
    }

    fn usage(&self, completion: usize) -> Usage {
        Usage::new(self.prompt_tokens, completion, self.cached)
    }

    /// The next piece; `None` after the end.
    async fn next(&mut self) -> Option<Piece> {
        if let Some((reason, usage)) = self.pending_end.take() {
            self.finished = true;
            return Some(Piece::End(reason, usage));
        }
        if self.finished {
            return None;
        }
        loop {
            let Some(ev) = self.rx.recv().await else {
                self.finished = true;
                return Some(Piece::Fail(ApiError::internal()));
            };
            match ev {
                Event::Admitted { cached_tokens } => self.cached = cached_tokens,
                Event::Token(id) => {
                    self.push_token(id);
                    if let Some(at) = find_stop(&self.text, &self.stops) {
                        // A stop string: the answer ends before it; cancel the rest.
                        self.text.truncate(at);
                        self.rx.close();
                        let rest = self.text.get(self.sent..).unwrap_or("").to_string();
                        self.sent = self.text.len();
                        let end = ("stop", self.usage(self.ids.len()));
                        if rest.is_empty() {
                            self.finished = true;
                            return Some(Piece::End(end.0, end.1));
                        }
                        // The end follows on the next call.
                        self.pending_end = Some(end);
                        return Some(Piece::Text(rest));
                    }
                    let safe = streamable_len(&self.text, &self.stops);
                    if safe > self.sent {
                        let t = self.text.get(self.sent..safe).unwrap_or("").to_string();
                        self.sent = safe;
                        return Some(Piece::Text(t));
                    }
                }
                Event::Done(f) => {
                    let reason = match f.reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                        FinishReason::Error(msg) => {
                            self.finished = true;
                            tracing::error!(error = %msg, "generation failed");
                            return Some(Piece::Fail(ApiError::internal()));
                        }
                    };
                    self.cached = f.cached_tokens;
                    let rest = self.text.get(self.sent..).unwrap_or("").to_string();
                    self.sent = self.text.len();
                    let usage = Usage::new(f.prompt_tokens, f.completion_tokens, f.cached_tokens);
                    if rest.is_empty() {
                        self.finished = true;
                        return Some(Piece::End(reason, usage));
                    }
                    self.pending_end = Some((reason, usage));
                    return Some(Piece::Text(rest));
                }
                Event::Rejected(e) => {
                    self.finished = true;
                    return Some(Piece::Fail(e.into()));
                }
            }
        }
    }
}

/// The first piece, awaited before any response header is sent, so refusals (queue full,
/// context too long) still become proper error statuses when streaming.
async fn first_piece(g: &mut TextGen) -> Result<Option<Piece>, ApiError> {
    match g.next().await {
        Some(Piece::Fail(e)) => Err(e),
        other => Ok(other),
    }
}

fn sse_json<T: serde::Serialize>(v: &T) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(v).unwrap_or_else(|_| "{}".into()))
}

type ChunkFn =
    dyn Fn(Option<String>, Option<&'static str>, Option<Usage>) -> SseEvent + Send + Sync;

struct SseState {
    g: TextGen,
    first: Option<Piece>,
    queue: VecDeque<SseEvent>,
    done: bool,
    include_usage: bool,
    chunk: Arc<ChunkFn>,
}

/// Builds an SSE response from a generation: `chunk(text, finish, usage)` makes each event's
/// body (a usage-only chunk when `usage` is set). A failure after the headers went out becomes
/// an `error` event. Dropping the response (client gone) drops the generation, which cancels
/// the request in the engine.
fn sse_stream(
    g: TextGen,
    first: Option<Piece>,
    head: Option<SseEvent>,
    include_usage: bool,
    chunk: Arc<ChunkFn>,
) -> Response {
    let state = SseState {
        g,
        first,
        queue: head.into_iter().collect(),
        done: false,
        include_usage,
        chunk,
    };
    let events = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.done {
                return None;
            }
            let piece = match st.first.take() {
                Some(p) => Some(p),
                None => st.g.next().await,
            };
            match piece {
                Some(Piece::Text(t)) => st.queue.push_back((st.chunk)(Some(t), None, None)),
                Some(Piece::End(reason, usage)) => {
                    st.queue.push_back((st.chunk)(None, Some(reason), None));
                    if st.include_usage {
                        st.queue.push_back((st.chunk)(None, None, Some(usage)));
                    }
                    st.queue.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
                Some(Piece::Fail(e)) => {
                    st.queue.push_back(sse_json(&e.body));
                    st.queue.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
                None => {
                    st.queue.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Collects a whole generation: its text, finish reason and usage.
async fn collect(
    g: &mut TextGen,
    first: Option<Piece>,
) -> Result<(String, &'static str, Usage), ApiError> {
    let mut text = String::new();
    let mut piece = first;
    loop {
        let p = match piece.take() {
            Some(p) => p,
            None => match g.next().await {
                Some(p) => p,
                None => return Err(ApiError::internal()),
            },
        };
        match p {
            Piece::Text(t) => text.push_str(&t),
            Piece::End(reason, usage) => return Ok((text, reason, usage)),
            Piece::Fail(e) => return Err(e),
        }
    }
}

async fn completions(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(body)?;
    tracing::Span::current().record("model", req.model.as_str());
    check_model(&s, &req.model)?;
    if req.echo {
        return Err(ApiError::bad("echo is not supported").param("echo"));
    }
    if req.suffix.is_some() {
        return Err(ApiError::bad("suffix is not supported").param("suffix"));
    }
    let prompt = prompt::completion_prompt(&s.tokenizer, &req)?;
    let set = settings(&s, req.sampling, false, prompt.len())?;
    let id = s.request_id("cmpl");
    tracing::Span::current().record("request_id", id.as_str());
    let (g, first) = start(&s, &id, prompt, &set).await?;
    let (model, created) = (s.model_id.clone(), unix_now());
    if set.stream {
        let (id2, model2) = (id.clone(), model.clone());
        let chunk: Arc<ChunkFn> = Arc::new(move |text, finish, usage| {
            sse_json(&CompletionResponse {
                id: id2.clone(),
                object: "text_completion",
                created,
                model: model2.clone(),
                choices: if usage.is_some() {
                    Vec::new()
                } else {
                    vec![CompletionChoice {
                        index: 0,
                        text: text.unwrap_or_default(),
                        finish_reason: finish,
                        logprobs: None,
                    }]
                },
                usage,
            })
        });
        return Ok(sse_stream(g, first, None, set.include_usage, chunk));
    }
    let mut g = g;
    let (text, reason, usage) = collect(&mut g, first).await?;
    Ok(axum::Json(CompletionResponse {
        id,
        object: "text_completion",
        created,
        model,
        choices: vec![CompletionChoice {
            index: 0,
            text,
            finish_reason: Some(reason),
            logprobs: None,
        }],
        usage: Some(usage),
    })
    .into_response())
}

async fn chat_completions(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(body)?;
    tracing::Span::current().record("model", req.model.as_str());
    check_model(&s, &req.model)?;
    let prompt = prompt::chat_prompt(&s.tokenizer, &s.chat, &req)?;
    let set = settings(&s, req.sampling, true, prompt.len())?;
    let id = s.request_id("chatcmpl");
    tracing::Span::current().record("request_id", id.as_str());
    let (g, first) = start(&s, &id, prompt, &set).await?;
    let (model, created) = (s.model_id.clone(), unix_now());
    if set.stream {
        let (id2, model2) = (id.clone(), model.clone());
        let chunk: Arc<ChunkFn> = Arc::new(move |text, finish, usage| {
            sse_json(&ChatChunk {
                id: id2.clone(),
                object: "chat.completion.chunk",
                created,
                model: model2.clone(),
                choices: if usage.is_some() {
                    Vec::new()
                } else {
                    vec![ChatChunkChoice {
                        index: 0,
                        delta: Delta {
                            role: None,
                            content: text,
                        },
                        finish_reason: finish,
                        logprobs: None,
                    }]
                },
                usage,
            })
        });
        // The first chunk names the role, as OpenAI's does.
        let head = sse_json(&ChatChunk {
            id: id.clone(),
            object: "chat.completion.chunk",
            created,
            model: model.clone(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                finish_reason: None,
                logprobs: None,
            }],
            usage: None,
        });
        return Ok(sse_stream(g, first, Some(head), set.include_usage, chunk));
    }
    let mut g = g;
    let (text, reason, usage) = collect(&mut g, first).await?;
    Ok(axum::Json(ChatResponse {
        id,
        object: "chat.completion",
        created,
        model,
        choices: vec![ChatChoice {
            index: 0,
            message: ChatMessageOut {
                role: "assistant",
                content: text,
            },
            finish_reason: Some(reason),
            logprobs: None,
        }],
        usage,
    })
    .into_response())
}

/// Submits a request and waits for its first piece (or refusal).
async fn start(
    s: &AppState,
    id: &str,
    prompt: Vec<u32>,
    set: &Settings,
) -> Result<(TextGen, Option<Piece>), ApiError> {
    if !s.ready.load(Ordering::SeqCst) {
        return Err(SubmitError::ShuttingDown.into());
    }
    let prompt_len = prompt.len();
    let rx = s.engine.submit(GenerateParams {
        id: id.to_string(),
        prompt,
        max_tokens: set.max_tokens,
        sampling: set.sampling.clone(),
        stop_tokens: set.stop_tokens.clone(),
    })?;
    tracing::debug!(request = id, prompt_tokens = prompt_len, "queued");
    let mut g = TextGen::new(rx, s, set.stops.clone(), prompt_len);
    let first = first_piece(&mut g).await?;
    Ok((g, first))
}

//! The HTTP server end to end: servers started in-process on 127.0.0.1:0 and spoken to over real
//! TCP by a small HTTP/1.1 client, so that framing, streaming, status codes, disconnects and
//! shutdown are tested as clients see them. The real model answers the questions whose answers
//! matter (greedy "Paris", cache hits, stop strings, batching); `random:tiny` serves everything
//! else, since it loads and generates fast. Every test ends by checking that the engine is idle
//! with no block left locked or allocated (the shutdown test, whose engine has stopped, checks
//! that instead).

#![allow(clippy::unwrap_used)]

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hotprefix_engine::config::EngineConfig;
use hotprefix_engine::launch::launch;
use hotprefix_engine::server;
use hotprefix_engine::tokenizer::Tokenizer;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Every wait is bounded by this, so that a hang fails the test instead of stalling CI. The real
/// model generates about ten tokens a second on two busy cores; no request here needs a tenth of
/// this.
const WAIT: Duration = Duration::from_secs(120);

/// `random:tiny` as the server names it.
const TINY: &str = "random-tiny";

/// Awaits `f`, failing the test (naming `what`) if it takes longer than [`WAIT`].
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: nothing within {WAIT:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client: one request per connection (`Connection: close`), responses framed
// by chunked encoding, Content-Length or the connection's end, and an incremental reader of
// server-sent events. Hand-written over the socket's own readiness calls (the engine builds
// tokio without `io-util`), so that the tests need no extra dependency and can drop a
// connection at any chosen moment.

/// Writes all of `b`.
async fn write_all(s: &TcpStream, mut b: &[u8]) -> std::io::Result<()> {
    while !b.is_empty() {
        s.writable().await?;
        match s.try_write(b) {
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How the body of a response is delimited.
#[derive(Clone, Copy, Debug)]
enum Framing {
    Chunked,
    Length(usize),
    Close,
}

/// An open response: status and headers read, the body read as it is needed.
struct Conn {
    s: Arc<TcpStream>,
    /// Bytes read from the socket and not yet parsed.
    raw: Vec<u8>,
    eof: bool,
    status: u16,
    headers: Vec<(String, String)>,
    framing: Framing,
    /// Body bytes decoded and not yet consumed.
    buf: Vec<u8>,
    done: bool,
}

/// The head of a request.
fn request_head(addr: SocketAddr, method: &str, path: &str, body_len: Option<usize>) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(n) = body_len {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {n}\r\n"
        ));
    }
    head.push_str("\r\n");
    head
}

/// Sends a request and returns the connection, before any of the response is read.
async fn send_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> TcpStream {
    let s = TcpStream::connect(addr).await.unwrap();
    let head = request_head(addr, method, path, body.map(<[u8]>::len));
    write_all(&s, head.as_bytes()).await.unwrap();
    if let Some(b) = body {
        write_all(&s, b).await.unwrap();
    }
    s
}

impl Conn {
    /// Sends a request and reads the response's status line and headers.
    async fn open(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> Conn {
        let s = send_request(addr, method, path, body).await;
        Conn::read_head(Arc::new(s)).await
    }

    /// Reads more of the socket into `raw`; false at its end.
    async fn read_more(&mut self) -> bool {
        if self.eof {
            return false;
        }
        let mut b = vec![0; 16 * 1024];
        loop {
            self.s.readable().await.unwrap();
            match self.s.try_read(&mut b) {
                Ok(0) => {
                    self.eof = true;
                    return false;
                }
                Ok(n) => {
                    self.raw.extend_from_slice(&b[..n]);
                    return true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("reading the response: {e}"),
            }
        }
    }

    /// The next CRLF-terminated line, without its CRLF.
    async fn read_line(&mut self) -> String {
        loop {
            if let Some(i) = self.raw.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.raw.drain(..i + 2).take(i).collect();
                return String::from_utf8(line).unwrap();
            }
            assert!(
                self.read_more().await,
                "the connection closed inside a line: {:?}",
                String::from_utf8_lossy(&self.raw)
            );
        }
    }

    async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.raw.len() < n {
            assert!(self.read_more().await, "the connection closed early");
        }
        self.raw.drain(..n).collect()
    }

    async fn read_head(s: Arc<TcpStream>) -> Conn {
        let mut c = Conn {
            s,
            raw: Vec::new(),
            eof: false,
            status: 0,
            headers: Vec::new(),
            framing: Framing::Close,
            buf: Vec::new(),
            done: false,
        };
        let line = c.read_line().await;
        let mut parts = line.split_whitespace();
        let version = parts.next().unwrap_or_default();
        assert!(
            version.starts_with("HTTP/1."),
            "not an HTTP/1 status line: {line:?}"
        );
        c.status = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {line:?}"));
        loop {
            let line = c.read_line().await;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {line:?}"));
            c.headers
                .push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        c.framing = if c
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            Framing::Chunked
        } else if let Some(n) = c.header("content-length") {
            Framing::Length(n.parse().unwrap())
        } else {
            Framing::Close
        };
        c
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Reads the next piece of the body into `buf`; false once the body has ended.
    async fn fill(&mut self) -> bool {
        if self.done {
            return false;
        }
        match self.framing {
            Framing::Chunked => {
                let line = self.read_line().await;
                let size = line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size, 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
                if size == 0 {
                    // Trailers, then the blank line that ends the body.
                    while !self.read_line().await.is_empty() {}
                    self.done = true;
                    return false;
                }
                let chunk = self.read_exact(size + 2).await;
                assert_eq!(&chunk[size..], b"\r\n", "a chunk does not end in CRLF");
                self.buf.extend_from_slice(&chunk[..size]);
                true
            }
            Framing::Length(n) => {
                let b = self.read_exact(n).await;
                self.buf.extend_from_slice(&b);
                self.done = true;
                n > 0
            }
            Framing::Close => {
                if self.raw.is_empty() && !self.read_more().await {
                    self.done = true;
                    return false;
                }
                self.buf.append(&mut self.raw);
                true
            }
        }
    }

    /// The rest of the body.
    async fn body(mut self) -> Resp {
        while self.fill().await {}
        Resp {
            status: self.status,
            headers: self.headers,
            body: self.buf,
        }
    }

    /// The data of the next server-sent event, `None` at the end of the body. Comments (the
    /// keep-alives) are skipped.
    async fn next_event(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let block = String::from_utf8(block).unwrap();
                let data: Vec<&str> = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Some(data.join("\n"));
            }
            if !self.fill().await {
                assert!(
                    self.buf.iter().all(u8::is_ascii_whitespace),
                    "the stream ended inside an event: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                return None;
            }
        }
    }
}

/// A whole response.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: the body is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }
}

async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> Resp {
    bounded(&format!("{method} {path}"), async {
        Conn::open(addr, method, path, body).await.body().await
    })
    .await
}

async fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, None).await
}

async fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    request(addr, "POST", path, Some(body.to_string().as_bytes())).await
}

/// A streamed response, read to its end.
#[derive(Debug)]
struct Sse {
    /// The JSON events, in order (`[DONE]` excluded).
    events: Vec<Value>,
    /// Whether the stream ended with `data: [DONE]`.
    done: bool,
}

impl Sse {
    /// The streamed text: chat deltas or completion texts.
    fn text(&self) -> String {
        self.choices()
            .filter_map(|c| c["delta"]["content"].as_str().or(c["text"].as_str()))
            .collect()
    }

    fn choices(&self) -> impl Iterator<Item = &Value> {
        self.events
            .iter()
            .filter_map(|e| e["choices"].as_array())
            .flatten()
    }

    fn finish_reason(&self) -> Option<&str> {
        self.choices().find_map(|c| c["finish_reason"].as_str())
    }

    /// The usage chunk's usage.
    fn usage(&self) -> Option<&Value> {
        self.events
            .iter()
            .map(|e| &e["usage"])
            .find(|u| !u.is_null())
    }

    fn errors(&self) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| e.get("error").is_some())
            .collect()
    }
}

/// Reads the events of an open stream to its end, checking that each is JSON and that
/// `[DONE]` comes last.
async fn read_sse(c: &mut Conn) -> Sse {
    let mut events = Vec::new();
    let mut done = false;
    while let Some(data) = c.next_event().await {
        assert!(!done, "an event after [DONE]: {data}");
        if data == "[DONE]" {
            done = true;
        } else {
            events.push(
                serde_json::from_str(&data)
                    .unwrap_or_else(|e| panic!("an event is not JSON ({e}): {data}")),
            );
        }
    }
    Sse { events, done }
}

/// POSTs a streaming request and reads the whole stream.
async fn stream(addr: SocketAddr, path: &str, body: &Value) -> Sse {
    bounded(&format!("streaming {path}"), async {
        let mut c = Conn::open(addr, "POST", path, Some(body.to_string().as_bytes())).await;
        let status = c.status;
        if status != 200 {
            panic!("status {status}: {}", c.body().await.text());
        }
        assert!(
            c.header("content-type")
                .is_some_and(|t| t.starts_with("text/event-stream")),
            "content-type {:?}",
            c.header("content-type")
        );
        let sse = read_sse(&mut c).await;
        assert!(sse.done, "the stream did not end with [DONE]: {sse:?}");
        sse
    })
    .await
}

/// Checks an OpenAI-shaped error response, `{"error":{"message","type","param","code"}}`, with
/// `status`, and returns its `error`.
fn assert_error(r: &Resp, status: u16, what: &str) -> Value {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{what}: content-type {:?}",
        r.header("content-type")
    );
    let v = r.json();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 1, "{what}: {v}");
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    assert!(
        e["type"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    for k in ["param", "code"] {
        let f = e.get(k).unwrap_or_else(|| panic!("{what}: no {k} in {v}"));
        assert!(f.is_null() || f.is_string(), "{what}: {v}");
    }
    e.clone()
}

/// The sum of a Prometheus metric's samples (over its labels).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics(addr: SocketAddr) -> String {
    let r = get(addr, "/metrics").await;
    assert_eq!(r.status, 200);
    r.text()
}

/// Waits (bounded) until the engine is idle and holds nothing: no request queued or running, no
/// cached block locked or in transfer, no device slot handed out. Returns `/debug/cache`.
async fn assert_idle(addr: SocketAddr) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = get(addr, "/debug/cache").await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let zero = |x: &Value| x.as_u64() == Some(0);
        if zero(&v["locked_blocks"])
            && zero(&v["in_transfer_blocks"])
            && zero(&v["usage"]["device_outstanding"])
            && zero(&v["running"])
            && zero(&v["waiting"])
        {
            let h = get(addr, "/health").await;
            assert_eq!(h.status, 200, "{}", h.text());
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the engine still holds something after 30 s: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `/debug/cache` (bounded) until `ok` holds for it.
async fn wait_cache(addr: SocketAddr, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = get(addr, "/debug/cache").await.json();
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not after 30 s: {v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Servers.

use common::small_config as config;

/// A server of this test's own, on this test's runtime.
struct TestServer {
    addr: SocketAddr,
    state: server::AppState,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    async fn start(cfg: EngineConfig, grace: Duration) -> TestServer {
        let state = tokio::task::spawn_blocking(move || launch(&cfg))
            .await
            .unwrap()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        // Dropping `stop` (a panicking test) also shuts the server down.
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(server::run(listener, state.clone(), shutdown, grace));
        TestServer {
            addr,
            state,
            stop: Some(stop),
            task,
        }
    }

    async fn tiny(extra: &[&str]) -> TestServer {
        TestServer::start(config("random:tiny", extra), Duration::from_secs(5)).await
    }

    /// Triggers the shutdown.
    fn trigger(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Waits for `run` to return (bounded) and checks it returned `Ok`.
    async fn join(self) {
        let r = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("server::run returns within 30 s of the shutdown");
        r.unwrap().unwrap();
    }

    /// The end of every test: nothing leaked, then a clean shutdown.
    async fn finish(mut self) {
        assert_idle(self.addr).await;
        self.trigger();
        self.join().await;
    }
}

/// The real model's server, shared by the tests that need it (loading it takes a while): it runs
/// on a runtime of its own, so that it outlives any one test's runtime.
struct Real {
    addr: SocketAddr,
    model: String,
    tokenizer: Arc<Tokenizer>,
}

fn real_server() -> &'static Real {
    static REAL: OnceLock<Real> = OnceLock::new();
    REAL.get_or_init(|| {
        let cfg = config(common::model_path().to_str().unwrap(), &[]);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let state = launch(&cfg).unwrap();
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let real = Real {
                    addr: listener.local_addr().unwrap(),
                    model: state.model_id.clone(),
                    tokenizer: Arc::clone(&state.tokenizer),
                };
                tx.send(real).unwrap();
                let forever = std::future::pending::<()>();
                server::run(listener, state, forever, Duration::from_secs(1))
                    .await
                    .unwrap();
            });
        });
        rx.recv().expect("the real model's server starts")
    })
}

/// The shared real-model server, held by one test at a time: each test's idle check (and the
/// cache hits it expects) would be disturbed by another's requests.
async fn real() -> (tokio::sync::MutexGuard<'static, ()>, &'static Real) {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let guard = LOCK.lock().await;
    let r = tokio::task::spawn_blocking(real_server).await.unwrap();
    // A test that failed before may have left a cancelled request draining.
    assert_idle(r.addr).await;
    (guard, r)
}

fn chat_body(model: &str, question: &str, max_tokens: usize) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

fn with(mut v: Value, extra: Value) -> Value {
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

fn chat_text(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no message content in {v}"))
        .to_string()
}

fn completion_text(v: &Value) -> String {
    v["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text in {v}"))
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// The real model.

/// Greedy chat: the answer names Paris; a repeat hits the prefix cache; streaming gives the same
/// text, finish reason and usage; `include_usage` adds the usage chunk and only then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_model_chat_streaming_and_cache_hits() {
    let (_g, real) = real().await;
    let addr = real.addr;
    let q = chat_body(&real.model, "What is the capital of France?", 24);

    let r = post(addr, "/v1/chat/completions", &q).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let a = r.json();
    let text = chat_text(&a);
    assert!(text.contains("Paris"), "{text:?}");
    assert!(a["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(a["model"], real.model.as_str());
    assert_eq!(a["choices"][0]["message"]["role"], "assistant");
    let finish = a["choices"][0]["finish_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(finish == "stop" || finish == "length", "{a}");
    let u = &a["usage"];
    let (prompt, completion) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(prompt > 0 && (1..=24).contains(&completion), "{u}");
    assert_eq!(u["total_tokens"].as_u64(), Some(prompt + completion));
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64(), "{u}");

    // The same request again: its prompt's full blocks are cached now.
    let b = post(addr, "/v1/chat/completions", &q).await.json();
    assert_eq!(chat_text(&b), text);
    let cached = b["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached > 0 && cached <= prompt, "{}", b["usage"]);

    // Streamed, with the usage chunk.
    let s = stream(
        addr,
        "/v1/chat/completions",
        &with(
            q.clone(),
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    )
    .await;
    assert_eq!(s.text(), text);
    assert_eq!(s.finish_reason(), Some(finish.as_str()));
    assert!(s.errors().is_empty(), "{s:?}");
    assert_eq!(s.events[0]["choices"][0]["delta"]["role"], "assistant");
    let id = s.events[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for e in &s.events {
        assert_eq!(e["id"], id, "one id per stream");
        assert_eq!(e["object"], "chat.completion.chunk");
        assert_eq!(e["model"], real.model.as_str());
    }
    // The usage chunk comes last, with no choices.
    let last = s.events.last().unwrap();
    assert_eq!(last["choices"], json!([]), "{last}");
    let su = s.usage().unwrap();
    assert_eq!(su, &last["usage"]);
    assert_eq!(su["prompt_tokens"].as_u64(), Some(prompt));
    assert_eq!(su["completion_tokens"].as_u64(), Some(completion));
    assert!(
        su["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{su}"
    );

    // Streamed without it: no usage anywhere.
    let s = stream(
        addr,
        "/v1/chat/completions",
        &with(q.clone(), json!({"stream": true})),
    )
    .await;
    assert_eq!(s.text(), text);
    assert!(s.usage().is_none(), "{s:?}");
    assert_idle(addr).await;
}

/// Completions: a text prompt, the same prompt as token ids and as one-element batches of
/// either, and streamed, all give the same greedy text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_model_completions_text_and_token_ids() {
    let (_g, real) = real().await;
    let addr = real.addr;
    let prompt = "The capital of France is";
    let base = json!({"model": real.model, "prompt": prompt, "max_tokens": 6, "temperature": 0});

    let r = post(addr, "/v1/completions", &base).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let a = r.json();
    let text = completion_text(&a);
    assert!(text.contains("Paris"), "{text:?}");
    assert!(a["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(a["object"], "text_completion");
    let usage = a["usage"].clone();

    let ids = real.tokenizer.encode(prompt).unwrap();
    assert_eq!(usage["prompt_tokens"].as_u64(), Some(ids.len() as u64));
    for p in [json!(ids), json!([prompt]), json!([ids])] {
        let r = post(
            addr,
            "/v1/completions",
            &with(base.clone(), json!({"prompt": p})),
        )
        .await;
        assert_eq!(r.status, 200, "prompt {p}: {}", r.text());
        let v = r.json();
        assert_eq!(completion_text(&v), text, "prompt {p}");
        assert_eq!(v["usage"]["prompt_tokens"], usage["prompt_tokens"]);
    }

    let s = stream(
        addr,
        "/v1/completions",
        &with(
            base.clone(),
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    )
    .await;
    assert_eq!(s.text(), text);
    assert_eq!(s.finish_reason(), a["choices"][0]["finish_reason"].as_str());
    assert!(s.events.iter().all(|e| e["object"] == "text_completion"));
    assert_eq!(
        s.usage().unwrap()["completion_tokens"],
        usage["completion_tokens"]
    );
    assert_idle(addr).await;
}

/// A stop string: the answer is the unstopped answer cut just before it, finish reason "stop",
/// streamed or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_model_stop_string() {
    let (_g, real) = real().await;
    let addr = real.addr;
    let q = chat_body(&real.model, "What is the capital of France?", 24);
    let full = chat_text(&post(addr, "/v1/chat/completions", &q).await.json());
    let at = full.find("Paris").expect("the answer names Paris");
    let expect = &full[..at];

    let stopped = with(q.clone(), json!({"stop": ["Paris", "zzzz-never"]}));
    let r = post(addr, "/v1/chat/completions", &stopped).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(chat_text(&v), expect);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    let s = stream(
        addr,
        "/v1/chat/completions",
        &with(stopped, json!({"stream": true})),
    )
    .await;
    assert_eq!(s.text(), expect);
    assert_eq!(s.finish_reason(), Some("stop"));
    assert_idle(addr).await;
}

/// Four greedy requests sharing a long prefix, run at once on a cold cache, each give the text
/// the same request gives alone (batching and shared prefill change nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_model_concurrent_requests_match_alone() {
    let (_g, real) = real().await;
    let addr = real.addr;
    // A prefix of this run's own, so that the cache starts cold for it.
    let nonce: u32 = rand::rng().random();
    let system = format!(
        "Session {nonce}. You are a helpful, concise assistant for a geography and arithmetic \
         quiz. Answer each question with one short sentence. Do not explain your reasoning. Do \
         not add greetings, caveats or follow-up questions. If a question asks for a capital \
         city, name the city and the country. If a question asks for a sum, give the number in \
         digits. If a question asks for a colour, name one colour. Keep every answer under \
         twenty words. The quiz is marked automatically, so follow these rules exactly and \
         answer in English."
    );
    let questions = [
        "What is the capital of France?",
        "What is the capital of Italy?",
        "What is two plus two?",
        "Name a colour of the sky.",
    ];
    let body = |q: &str| {
        json!({
            "model": real.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
            "temperature": 0,
            "max_tokens": 12,
        })
    };
    let together: Vec<JoinHandle<Value>> = questions
        .iter()
        .map(|q| {
            let b = body(q);
            tokio::spawn(async move { post(addr, "/v1/chat/completions", &b).await.json() })
        })
        .collect();
    let mut concurrent = Vec::new();
    for t in together {
        concurrent.push(t.await.unwrap());
    }
    for (q, c) in questions.iter().zip(&concurrent) {
        let alone = post(addr, "/v1/chat/completions", &body(q)).await.json();
        assert_eq!(
            chat_text(c),
            chat_text(&alone),
            "{q}: concurrent {c} vs alone {alone}"
        );
        // Alone, the shared prefix is cached.
        assert!(
            alone["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap()
                > 0
        );
    }
    assert!(chat_text(&concurrent[0]).contains("Paris"));
    assert_idle(addr).await;
}

// ---------------------------------------------------------------------------------------------
// random:tiny.

/// Probes, the model list and Prometheus metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_models_and_metrics() {
    let srv = TestServer::tiny(&[]).await;
    let addr = srv.addr;
    let h = get(addr, "/health").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    let r = get(addr, "/ready").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");

    let m = get(addr, "/v1/models").await;
    assert_eq!(m.status, 200);
    let m = m.json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], TINY);
    assert_eq!(m["data"][0]["object"], "model");
    assert_eq!(m["data"][0]["max_model_len"], 2048);

    // Without max_tokens, a prompt near the context is answered within it, not refused.
    let ids: Vec<u32> = (0..2040).map(|i| i % 250 + 1).collect();
    let near = json!({"model": TINY, "prompt": ids, "ignore_eos": true});
    let r = post(addr, "/v1/completions", &near).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let usage = &r.json()["usage"];
    assert_eq!(usage["prompt_tokens"], 2040);
    assert_eq!(
        usage["completion_tokens"], 8,
        "the 8 tokens left in the context"
    );

    // Requests, so that the counters and the histogram have samples.
    // Two full blocks of 16 byte tokens, so that the repeat hits the cache.
    let body = json!({"model": TINY, "prompt": "metrics please! ".repeat(2), "max_tokens": 3});
    assert_eq!(post(addr, "/v1/completions", &body).await.status, 200);
    assert_eq!(post(addr, "/v1/completions", &body).await.status, 200);

    let r = get(addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        r.header("content-type")
    );
    let text = r.text();
    for name in [
        "hotprefix_num_requests_waiting",
        "hotprefix_kv_cache_usage_perc",
        "hotprefix_time_to_first_token_seconds_bucket",
        "hotprefix_prefix_cache_hit_tokens_total",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing from\n{text}"
        );
    }
    assert!(metric(&text, "hotprefix_time_to_first_token_seconds_count") >= 2.0);
    // The second identical prompt hit the first's cached block.
    assert!(metric(&text, "hotprefix_prefix_cache_hit_tokens_total") > 0.0);
    // Every other line is `name{labels} value` or `name value`, the value a finite number
    // (Rust would print an infinity as `inf`, which Prometheus cannot read).
    for l in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = l.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        assert!(
            name.starts_with("hotprefix_")
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{l}"
        );
        assert!(
            series == name || (series.ends_with('}') && !series.contains(' ')),
            "{l}"
        );
        assert!(value.parse::<f64>().is_ok_and(f64::is_finite), "{l}");
    }
    srv.finish().await;
}

/// Bad requests get OpenAI-shaped errors with the right status, parameter and code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let srv = TestServer::tiny(&[]).await;
    let addr = srv.addr;
    const CHAT: &str = "/v1/chat/completions";
    const CMPL: &str = "/v1/completions";
    let valid = |path: &str| {
        if path == CHAT {
            json!({"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        } else {
            json!({"model": TINY, "prompt": "hi", "max_tokens": 2})
        }
    };
    let image = json!({"type": "image_url", "image_url": {"url": "https://example.com/x.png"}});
    let check = |what: &str, r: &Resp, status: u16, param: Option<&str>, code: Option<&str>| {
        let e = assert_error(r, status, what);
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{what}: {e}");
        }
        if let Some(c) = code {
            assert_eq!(e["code"], c, "{what}: {e}");
        }
    };

    // Not JSON: 400.
    let raw: [(&str, &[u8]); 4] = [
        ("truncated JSON", b"{\"model\":"),
        ("not JSON", b"hello"),
        ("an empty body", b""),
        ("invalid UTF-8", b"{\"model\": \"\xff\"}"),
    ];
    for (what, body) in raw {
        for path in [CHAT, CMPL] {
            let r = request(addr, "POST", path, Some(body)).await;
            check(what, &r, 400, None, None);
        }
    }
    // A required field missing: 422.
    for (path, field) in [
        (CHAT, "messages"),
        (CHAT, "model"),
        (CMPL, "prompt"),
        (CMPL, "model"),
    ] {
        let mut v = valid(path);
        v.as_object_mut().unwrap().remove(field);
        let r = post(addr, path, &v).await;
        check(&format!("{path} without {field}"), &r, 422, None, None);
    }
    // A valid request with one field changed: (what, path, the field, status). A 400 or 404
    // names the field as `param`.
    let patched = [
        // Wrong types: 422.
        ("messages a string", CHAT, json!({"messages": "hi"}), 422),
        (
            "max_tokens a string",
            CMPL,
            json!({"max_tokens": "ten"}),
            422,
        ),
        ("negative max_tokens", CMPL, json!({"max_tokens": -1}), 422),
        (
            "temperature a string",
            CHAT,
            json!({"temperature": "hot"}),
            422,
        ),
        ("stream a number", CHAT, json!({"stream": 1}), 422),
        ("prompt an object", CMPL, json!({"prompt": {"a": 1}}), 422),
        (
            "no role",
            CHAT,
            json!({"messages": [{"content": "hi"}]}),
            422,
        ),
        // Unknown model: 404.
        ("unknown model", CHAT, json!({"model": "gpt-4"}), 404),
        ("unknown model", CMPL, json!({"model": "gpt-4"}), 404),
        // Values out of range: 400.
        ("max_tokens 0", CMPL, json!({"max_tokens": 0}), 400),
        (
            "max_tokens over the context",
            CHAT,
            json!({"max_tokens": 2049}),
            400,
        ),
        (
            "max_completion_tokens 0",
            CHAT,
            json!({"max_completion_tokens": 0}),
            400,
        ),
        ("temperature 3", CHAT, json!({"temperature": 3}), 400),
        ("temperature -1", CMPL, json!({"temperature": -1}), 400),
        ("top_p 0", CHAT, json!({"top_p": 0}), 400),
        ("top_p 1.5", CMPL, json!({"top_p": 1.5}), 400),
        ("top_k 0", CMPL, json!({"top_k": 0}), 400),
        ("n 2", CHAT, json!({"n": 2}), 400),
        (
            "five stop strings",
            CHAT,
            json!({"stop": ["a", "b", "c", "d", "e"]}),
            400,
        ),
        ("an empty stop string", CMPL, json!({"stop": ""}), 400),
        (
            "stop token not in the vocabulary",
            CMPL,
            json!({"stop_token_ids": [512]}),
            400,
        ),
        (
            "token id not in the vocabulary",
            CMPL,
            json!({"prompt": [1, 2, 512]}),
            400,
        ),
        ("empty prompt", CMPL, json!({"prompt": ""}), 400),
        ("empty token prompt", CMPL, json!({"prompt": []}), 400),
        ("two prompts", CMPL, json!({"prompt": ["a", "b"]}), 400),
        ("no messages", CHAT, json!({"messages": []}), 400),
        (
            "unknown role",
            CHAT,
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            400,
        ),
        (
            "an image",
            CHAT,
            json!({"messages": [{"role": "user", "content": [image]}]}),
            400,
        ),
        // Unsupported features are refused, not ignored: 400.
        (
            "presence_penalty",
            CMPL,
            json!({"presence_penalty": 0.5}),
            400,
        ),
        ("logprobs", CHAT, json!({"logprobs": true}), 400),
        ("echo", CMPL, json!({"echo": true}), 400),
    ];
    for (what, path, field, status) in patched {
        let r = post(addr, path, &with(valid(path), field.clone())).await;
        let name = field.as_object().unwrap().keys().next().unwrap().as_str();
        let param = (status != 422).then_some(name);
        let code = (status == 404).then_some("model_not_found");
        check(&format!("{path}: {what}"), &r, status, param, code);
    }
    // Longer than the context (2048 tokens of a byte each), streamed or not: 400, code
    // context_length_exceeded, before any event is sent.
    let long = "x".repeat(3000);
    let too_long = [
        (CMPL, json!({"prompt": long})),
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": long}]}),
        ),
        (CMPL, json!({"max_tokens": 2048})),
        (CMPL, json!({"prompt": long, "stream": true})),
    ];
    for (path, field) in too_long {
        let r = post(addr, path, &with(valid(path), field)).await;
        check(path, &r, 400, None, Some("context_length_exceeded"));
    }
    // Unknown routes: 404.
    for path in ["/v1/embeddings", "/chat/completions", "/v1/completions/x"] {
        let r = post(addr, path, &valid(CMPL)).await;
        check(path, &r, 404, None, None);
    }
    assert_error(
        &get(addr, "/v1/nothing").await,
        404,
        "GET of an unknown route",
    );
    assert_error(&get(addr, "/").await, 404, "GET /");
    assert_error(
        &get(addr, "/debug/cache?top_k=lots").await,
        400,
        "a bad query",
    );
    // A route with the wrong method: still an OpenAI-shaped error, and `Allow` names the
    // right one.
    let r = get(addr, "/v1/chat/completions").await;
    assert_error(&r, 405, "GET of a POST route");
    assert_eq!(r.header("allow"), Some("POST"));
    assert_error(
        &request(addr, "POST", "/v1/models", Some(b"{}")).await,
        405,
        "POST of a GET route",
    );

    // A body over 8 MiB: 413. The server answers without reading it all and closes, so the body
    // is written concurrently and write errors are expected.
    let big = {
        let mut v = br#"{"model":"random-tiny","prompt":""#.to_vec();
        v.resize(server::MAX_BODY_BYTES + 1024, b'a');
        v.extend_from_slice(br#""}"#);
        v
    };
    let r = bounded("an oversized body", async {
        let s = Arc::new(TcpStream::connect(addr).await.unwrap());
        let head = request_head(addr, "POST", "/v1/completions", Some(big.len()));
        let w = Arc::clone(&s);
        let writer = tokio::spawn(async move {
            let _ = write_all(&w, head.as_bytes()).await;
            let _ = write_all(&w, &big).await;
        });
        let r = Conn::read_head(s).await.body().await;
        writer.abort();
        r
    })
    .await;
    assert_error(&r, 413, "a body over 8 MiB");

    // The engine never saw any of these.
    let m = metrics(addr).await;
    assert_eq!(metric(&m, "hotprefix_prompt_tokens_total"), 0.0, "{m}");
    srv.finish().await;
}

/// With one running slot and room for one waiting request, a third request is refused at once
/// with 429 and `Retry-After`, streaming or not; the waiting one runs when the slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_gets_429_with_retry_after() {
    let srv = TestServer::tiny(&["--max-running", "1", "--max-waiting", "1"]).await;
    let addr = srv.addr;
    // The first request holds the only running slot: its first event means it is running, and
    // its 2000 tokens take seconds.
    let first = running_stream(addr, "hold the slot").await;

    // The second waits for the slot (its answer is pending until it runs).
    let short = json!({"model": TINY, "prompt": "wait for it", "max_tokens": 3});
    let s2 = short.clone();
    let second = tokio::spawn(async move { post(addr, "/v1/completions", &s2).await });
    wait_cache(addr, "the second request queued", |v| {
        v["waiting"] == 1 && v["running"] == 1
    })
    .await;

    for stream in [false, true] {
        let r = post(
            addr,
            "/v1/completions",
            &with(short.clone(), json!({"stream": stream})),
        )
        .await;
        let e = assert_error(&r, 429, "a full queue");
        assert_eq!(e["type"], "rate_limit_error");
        let retry = r.header("retry-after").expect("a Retry-After header");
        assert!(retry.parse::<u64>().is_ok_and(|s| s >= 1), "{retry}");
    }

    // The first client leaving frees the slot for the second.
    drop(first);
    let r = bounded("the queued request", second).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    srv.finish().await;
}

/// A client that disconnects mid-stream cancels its request (it does not run to its end), and
/// everything it held is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_cancels_its_request() {
    let srv = TestServer::tiny(&[]).await;
    let addr = srv.addr;
    let long = json!({"max_tokens": 1900, "ignore_eos": true, "temperature": 0, "stream": true});
    let bodies = [
        (
            "/v1/chat/completions",
            with(
                long.clone(),
                json!({"model": TINY, "messages": [{"role": "user", "content": "talk"}]}),
            ),
        ),
        (
            "/v1/completions",
            with(long.clone(), json!({"model": TINY, "prompt": "talk"})),
        ),
    ];
    for (path, body) in &bodies {
        let before = metric(&metrics(addr).await, "hotprefix_request_cancelled_total");
        let mut c = bounded(
            path,
            Conn::open(addr, "POST", path, Some(body.to_string().as_bytes())),
        )
        .await;
        assert_eq!(c.status, 200);
        for _ in 0..3 {
            bounded("an event", c.next_event()).await.unwrap();
        }
        drop(c);
        assert_idle(addr).await;
        let after = metric(&metrics(addr).await, "hotprefix_request_cancelled_total");
        assert_eq!(
            after,
            before + 1.0,
            "{path}: the request was cancelled, not run to its end"
        );
    }
    srv.finish().await;
}

/// Opens a 2000-token stream of `prompt` on the tiny model and waits for its first event, so
/// the request is known to be running (its tokens take seconds).
async fn running_stream(addr: SocketAddr, prompt: &str) -> Conn {
    let long = json!({
        "model": TINY, "prompt": prompt, "max_tokens": 2000, "ignore_eos": true,
        "temperature": 0, "stream": true,
    });
    let mut c = bounded(
        "a long stream",
        Conn::open(
            addr,
            "POST",
            "/v1/completions",
            Some(long.to_string().as_bytes()),
        ),
    )
    .await;
    assert_eq!(c.status, 200);
    bounded("its first event", c.next_event()).await.unwrap();
    c
}

/// A client that disconnects while its request is queued (no response sent yet) cancels it
/// there, without waiting for it to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_while_queued_cancels_its_request() {
    let srv = TestServer::tiny(&["--max-running", "1"]).await;
    let addr = srv.addr;
    let first = running_stream(addr, "hold the slot").await;
    let long = json!({
        "model": TINY, "prompt": "hold the slot", "max_tokens": 2000, "ignore_eos": true,
    });

    let before = metric(&metrics(addr).await, "hotprefix_request_cancelled_total");
    for stream in [false, true] {
        let body = with(long.clone(), json!({"stream": stream}));
        let queued = send_request(
            addr,
            "POST",
            "/v1/completions",
            Some(body.to_string().as_bytes()),
        )
        .await;
        wait_cache(addr, "the request queued", |v| v["waiting"] == 1).await;
        drop(queued);
        // Gone from the queue while the first still runs.
        let v = wait_cache(addr, "the queued request dropped", |v| v["waiting"] == 0).await;
        assert_eq!(v["running"], 1, "{v}");
    }
    let after = metric(&metrics(addr).await, "hotprefix_request_cancelled_total");
    assert_eq!(after, before + 2.0);
    drop(first);
    srv.finish().await;
}

/// Stop strings with the byte-level tokenizer, where a two-character stop string spans two
/// tokens: the text is the unstopped text cut before the first occurrence, finish reason
/// "stop", streamed or not, as a list or a single string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_the_text_before_them() {
    let srv = TestServer::tiny(&[]).await;
    let addr = srv.addr;
    // Seeded sampling: the same varied text every time.
    let base = json!({
        "model": TINY, "prompt": "Once upon a time", "max_tokens": 128, "temperature": 1.0,
        "seed": 7, "ignore_eos": true,
    });
    let v = post(addr, "/v1/completions", &base).await.json();
    let full = completion_text(&v);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        completion_text(&post(addr, "/v1/completions", &base).await.json()),
        full,
        "seeded sampling repeats"
    );
    let chars: Vec<char> = full.chars().collect();
    let pick = (chars.len() / 3..chars.len().saturating_sub(1))
        .find(|&i| chars[i].is_ascii_alphanumeric() && chars[i + 1].is_ascii_graphic())
        .unwrap_or_else(|| panic!("no two ASCII characters in a row in {full:?}"));
    let stop: String = chars[pick..pick + 2].iter().collect();
    let expect = &full[..full.find(&stop).unwrap()];

    for stops in [json!([stop, "\u{1F600}\u{1F600}never"]), json!(stop)] {
        let req = with(base.clone(), json!({"stop": stops}));
        let v = post(addr, "/v1/completions", &req).await.json();
        assert_eq!(completion_text(&v), expect, "stop {stops}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let s = stream(addr, "/v1/completions", &with(req, json!({"stream": true}))).await;
        assert_eq!(s.text(), expect, "streamed, stop {stops}");
        assert_eq!(s.finish_reason(), Some("stop"));
    }
    // A stop string that never appears changes nothing.
    let req = with(base.clone(), json!({"stop": "\u{1F600}\u{1F600}never"}));
    let s = stream(addr, "/v1/completions", &with(req, json!({"stream": true}))).await;
    assert_eq!(s.text(), full);
    assert_eq!(s.finish_reason(), Some("length"));
    srv.finish().await;
}

/// `--chat-template FILE` replaces the model's template: a chat request's prompt is the
/// file's rendering of the conversation (random:tiny tokenizes byte by byte, so the prompt's
/// length is the rendered text's), not the model's ChatML.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_template_file_replaces_the_models_template() {
    let path = std::env::temp_dir().join(format!(
        "hotprefix-http-{}-template.jinja",
        std::process::id()
    ));
    std::fs::write(
        &path,
        "{% for m in messages %}<<{{ m.role }}>> {{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}<<assistant>> {% endif %}",
    )
    .unwrap();
    let srv = TestServer::tiny(&["--chat-template", path.to_str().unwrap()]).await;
    let _ = std::fs::remove_file(&path);
    let body = json!({
        "model": TINY, "max_tokens": 2, "temperature": 0,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    });
    let r = post(srv.addr, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rendered = "<<system>> Be brief.\n<<user>> hi\n<<assistant>> ";
    assert_eq!(r.json()["usage"]["prompt_tokens"], rendered.len());
    // The model's own template would have given another prompt.
    let chatml = hotprefix_engine::chat::ChatTemplate::chatml()
        .unwrap()
        .render(
            &[
                hotprefix_engine::chat::ChatMessage::new("system", "Be brief."),
                hotprefix_engine::chat::ChatMessage::new("user", "hi"),
            ],
            true,
        )
        .unwrap();
    let own = srv.state.tokenizer.encode_chat(&chatml).unwrap().len();
    assert_ne!(own, rendered.len());
    // Completions take the prompt as it is: no template involved.
    let c = json!({"model": TINY, "prompt": "<<user>> hi", "max_tokens": 1});
    let r = post(srv.addr, "/v1/completions", &c).await;
    assert_eq!(r.json()["usage"]["prompt_tokens"], "<<user>> hi".len());
    srv.finish().await;
}

/// Shutdown while a long stream runs: the server turns not ready and refuses new requests at
/// once, the stream ends (aborted after the short grace period, with an error event and
/// `[DONE]`), and `run` returns promptly with the engine thread stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_aborts_and_run_returns() {
    let mut srv = TestServer::start(config("random:tiny", &[]), Duration::from_millis(300)).await;
    let addr = srv.addr;
    // The shut-down listener takes no new connections; a second one serving the same state
    // shows what the server reports meanwhile.
    let side = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let side_addr = side.local_addr().unwrap();
    let side_task = tokio::spawn(axum::serve(side, server::app(srv.state.clone())).into_future());
    assert_eq!(get(side_addr, "/ready").await.status, 200);

    let mut c = running_stream(addr, "keep going").await;

    let t0 = Instant::now();
    srv.trigger();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = get(side_addr, "/ready").await;
        if r.status == 503 {
            assert_error(&r, 503, "/ready while shutting down");
            break;
        }
        assert!(Instant::now() < deadline, "still ready 5 s after shutdown");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let short = json!({"model": TINY, "prompt": "too late", "max_tokens": 2});
    let r = post(side_addr, "/v1/completions", &short).await;
    assert_error(&r, 503, "a request while shutting down");

    let sse = bounded("the stream's end", read_sse(&mut c)).await;
    assert!(sse.done, "{sse:?}");
    let errors = sse.errors();
    assert!(
        !errors.is_empty() || sse.finish_reason().is_some(),
        "the stream ended with neither a finish reason nor an error: {sse:?}"
    );
    for e in &errors {
        assert_eq!(e["error"]["type"], "server_error", "{e}");
    }
    eprintln!(
        "the stream ended after {} events, {} of them errors, finish reason {:?}",
        sse.events.len(),
        errors.len(),
        sse.finish_reason()
    );
    srv.join().await;
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "run took {took:?} to return"
    );
    // The engine thread has stopped.
    assert_error(
        &get(side_addr, "/health").await,
        503,
        "/health after shutdown",
    );
    side_task.abort();
}

// ---------------------------------------------------------------------------------------------
// Fuzzing: random bodies never get a 5xx, a malformed response or a broken server.

/// Request fields the endpoints know, and some they do not.
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "n",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "user",
    "echo",
    "suffix",
    "tools",
    "response_format",
];

/// Integers at and around every limit the server checks.
const INTS: &[i128] = &[
    -1,
    0,
    1,
    2,
    3,
    4,
    255,
    256,
    257,
    511,
    512,
    2047,
    2048,
    2049,
    65_535,
    4_294_967_295,
    4_294_967_296,
    i64::MAX as i128,
    i64::MIN as i128,
    u64::MAX as i128,
];

const FLOATS: &[f64] = &[
    0.0, -0.0, 1e-40, 0.5, 1.0, 1.5, 2.0, 2.000_001, 2.5, -0.5, 3.4e38, 1e39, -1e308, 1e308,
];

const STRINGS: &[&str] = &[
    "",
    "a",
    "hi",
    TINY,
    "user",
    "system",
    "assistant",
    "developer",
    "tool",
    "text",
    "image_url",
    "\u{0}",
    "é",
    "日本語",
    "\u{1F600}",
    "<|im_start|>",
    "<|im_end|>",
    "\n\n",
    "{{ raise_exception('boom') }}",
    "{% for x in range(99999999) %}{% endfor %}",
    "\u{FFFD}",
];

fn random_string(rng: &mut SmallRng) -> String {
    match rng.random_range(0..4) {
        0 => "long prompt ".repeat(rng.random_range(1..200)),
        1 => (0..rng.random_range(0..24))
            .map(|_| char::from(rng.random_range(0x20u8..0x7f)))
            .collect(),
        _ => STRINGS[rng.random_range(0..STRINGS.len())].to_string(),
    }
}

fn random_value(rng: &mut SmallRng, depth: u32) -> Value {
    let kinds = if depth >= 3 { 6 } else { 8 };
    match rng.random_range(0..kinds) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => {
            let i = INTS[rng.random_range(0..INTS.len())];
            if let Ok(u) = u64::try_from(i) {
                json!(u)
            } else {
                json!(i64::try_from(i).unwrap())
            }
        }
        3 => json!(FLOATS[rng.random_range(0..FLOATS.len())]),
        4 => Value::String(random_string(rng)),
        5 => json!(rng.random_range(0..8u32)),
        6 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..rng.random_range(0..4) {
                let k = if rng.random_bool(0.5) {
                    FIELDS[rng.random_range(0..FIELDS.len())].to_string()
                } else {
                    random_string(rng)
                };
                m.insert(k, random_value(rng, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// A valid request with random (valid) options and a short answer.
fn valid_request(rng: &mut SmallRng, chat: bool) -> Value {
    let mut v = if chat {
        let mut messages = Vec::new();
        if rng.random_bool(0.3) {
            messages.push(json!({"role": "system", "content": random_string(rng)}));
        }
        messages.push(json!({"role": "user", "content": random_string(rng)}));
        json!({"model": TINY, "messages": messages})
    } else if rng.random_bool(0.7) {
        json!({"model": TINY, "prompt": format!("p{}", random_string(rng))})
    } else {
        let ids: Vec<u32> = (0..rng.random_range(1..40))
            .map(|_| rng.random_range(0..512))
            .collect();
        json!({"model": TINY, "prompt": ids})
    };
    v["max_tokens"] = json!(rng.random_range(1..6));
    let options = [
        ("temperature", json!(rng.random_range(0.0..2.0))),
        ("top_p", json!(rng.random_range(0.05..1.0))),
        ("top_k", json!(rng.random_range(1..600))),
        ("seed", json!(rng.random::<u64>())),
        ("stop", json!([random_string(rng)])),
        ("ignore_eos", json!(rng.random::<bool>())),
        ("stream", json!(true)),
        (
            "stream_options",
            json!({"include_usage": rng.random::<bool>()}),
        ),
        ("user", json!("fuzz")),
    ];
    for (k, x) in options {
        if rng.random_bool(0.25) {
            v[k] = x;
        }
    }
    v
}

/// One random mutation of a request: a field removed, set to a random value, or a message (or
/// the prompt) replaced by a random value.
fn mutate(rng: &mut SmallRng, v: &mut Value) {
    let obj = v.as_object_mut().unwrap();
    match rng.random_range(0..4) {
        0 if !obj.is_empty() => {
            let k = obj
                .keys()
                .nth(rng.random_range(0..obj.len()))
                .unwrap()
                .clone();
            obj.remove(&k);
        }
        3 => {
            let x = random_value(rng, 1);
            if let Some(m) = obj.get_mut("messages").and_then(Value::as_array_mut)
                && !m.is_empty()
            {
                let i = rng.random_range(0..m.len());
                let key = ["role", "content"][rng.random_range(0..2)];
                match m[i].as_object_mut() {
                    Some(msg) if rng.random_bool(0.7) => {
                        msg.insert(key.into(), x);
                    }
                    _ => m[i] = x,
                }
            } else {
                obj.insert("prompt".into(), x);
            }
        }
        _ => {
            let k = FIELDS[rng.random_range(0..FIELDS.len())];
            obj.insert(k.into(), random_value(rng, 0));
        }
    }
}

/// A random body for a POST endpoint: raw bytes, any JSON, a corrupted valid request, a valid
/// request, or (mostly) a valid request with a few mutations.
fn fuzz_body(rng: &mut SmallRng, chat: bool) -> Vec<u8> {
    match rng.random_range(0..10) {
        0 => {
            let mut b: Vec<u8> = if rng.random_bool(0.5) {
                br#"{"model":"random-tiny","#.to_vec()
            } else {
                Vec::new()
            };
            b.extend((0..rng.random_range(0..64)).map(|_| rng.random::<u8>()));
            b
        }
        1 => random_value(rng, 0).to_string().into_bytes(),
        2 => {
            let mut b = valid_request(rng, chat).to_string().into_bytes();
            if rng.random_bool(0.5) {
                b.truncate(rng.random_range(0..b.len()));
            } else {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
            b
        }
        3 => valid_request(rng, chat).to_string().into_bytes(),
        _ => {
            let mut v = valid_request(rng, chat);
            for _ in 0..rng.random_range(1..3) {
                mutate(rng, &mut v);
            }
            v.to_string().into_bytes()
        }
    }
}

/// Sends one fuzzed body and checks the answer: never a 5xx; a 200 is a complete JSON answer
/// or a complete event stream without error events; anything else is an OpenAI-shaped error.
async fn fuzz_case(addr: SocketAddr, path: &str, body: &[u8], what: &str) -> u16 {
    bounded(what, async {
        let mut c = Conn::open(addr, "POST", path, Some(body)).await;
        let status = c.status;
        if status >= 500 {
            panic!("{what}: status {status}: {}", c.body().await.text());
        }
        let sse = c
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/event-stream"));
        if status == 200 && sse {
            let s = read_sse(&mut c).await;
            assert!(s.done, "{what}: no [DONE]: {s:?}");
            assert!(s.errors().is_empty(), "{what}: {s:?}");
            assert!(s.finish_reason().is_some(), "{what}: {s:?}");
        } else {
            let r = c.body().await;
            if status == 200 {
                let v = r.json();
                assert!(v["choices"][0]["finish_reason"].is_string(), "{what}: {v}");
            } else {
                assert_error(&r, status, what);
            }
        }
        status
    })
    .await
}

/// Random bodies to both POST endpoints (seeded: `HOTPREFIX_FUZZ_SEED` and
/// `HOTPREFIX_FUZZ_CASES` vary the run): no 5xx, no malformed response, the server stays
/// healthy and nothing is leaked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_bodies_never_break_the_server() {
    let env = |k: &str| std::env::var(k).ok().and_then(|s| s.parse::<u64>().ok());
    let seed = env("HOTPREFIX_FUZZ_SEED").unwrap_or(0x5eed);
    let cases = env("HOTPREFIX_FUZZ_CASES").unwrap_or(300);
    let srv = TestServer::tiny(&[]).await;
    let addr = srv.addr;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    for i in 0..cases {
        let chat = rng.random_bool(0.5);
        // Now and then a body meant for the other endpoint.
        let other = rng.random_bool(0.1);
        let body = fuzz_body(&mut rng, chat ^ other);
        let path = if chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let what = format!(
            "seed {seed} case {i}: POST {path} {}",
            String::from_utf8_lossy(&body)
        );
        let status = fuzz_case(addr, path, &body, &what).await;
        *statuses.entry(status).or_default() += 1;
        if i % 50 == 49 {
            assert_eq!(get(addr, "/health").await.status, 200, "after {what}");
        }
    }
    eprintln!("fuzz seed {seed}: statuses {statuses:?}");
    // The generator reaches the engine, not only the parser.
    assert!(
        statuses.get(&200).copied().unwrap_or(0) as u64 >= cases / 10,
        "{statuses:?}"
    );
    srv.finish().await;
}

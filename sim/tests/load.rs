//! `hotprefix-bench load` against a tiny in-process fake engine: chunked SSE parsing, the
//! metrics, failures that must be counted rather than panic, and workload determinism.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hotprefix_sim::load::{
    Arrival, ClientOptions, LoadRequest, LoadSummary, Popularity, RequestRecord, RunOptions,
    SharedPrefixLoad, SseDecoder, TOKEN_ID_MAX, TOKEN_ID_MIN, Target, TraceLoad, comparison_table,
    parse_hit_tokens, quantile, run, schedule, send_request, summarize, warmup_requests,
};
use hotprefix_sim::trace::Trace;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the fake server writes: bytes, or a pause (so the client sees events arrive apart).
#[derive(Clone, Debug)]
enum Piece {
    Bytes(Vec<u8>),
    Sleep(u64),
}

type Responder = dyn Fn(usize, &Value) -> Vec<Piece> + Send + Sync;

/// Starts a server that answers every connection with `respond(connection number, request
/// body)` and returns its address and the request bodies it received.
async fn fake_server(
    respond: impl Fn(usize, &Value) -> Vec<Piece> + Send + Sync + 'static,
) -> (SocketAddr, Arc<std::sync::Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let respond: Arc<Responder> = Arc::new(respond);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let count = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let (respond, seen, n) = (
                respond.clone(),
                seen2.clone(),
                count.fetch_add(1, Ordering::SeqCst),
            );
            tokio::spawn(async move {
                let _ = handle(sock, n, &*respond, &seen).await;
            });
        }
    });
    (addr, seen)
}

async fn handle(
    mut sock: TcpStream,
    n: usize,
    respond: &Responder,
    seen: &std::sync::Mutex<Vec<Value>>,
) -> std::io::Result<()> {
    // Read the head, then Content-Length bytes of body.
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        let k = sock.read(&mut tmp).await?;
        if k == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..k]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    assert!(head.contains("connection: close"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < head_end + len {
        let k = sock.read(&mut tmp).await?;
        if k == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..k]);
    }
    let body: Value = serde_json::from_slice(&buf[head_end..]).unwrap_or(Value::Null);
    seen.lock().unwrap().push(body.clone());
    for piece in respond(n, &body) {
        match piece {
            Piece::Bytes(b) => {
                sock.write_all(&b).await?;
                sock.flush().await?;
            }
            Piece::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }
    sock.shutdown().await
}

const SSE_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                        cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";

/// The SSE body the engine sends for a completion of `texts`, with a usage chunk.
fn engine_events(texts: &[&str], prompt: u64, cached: u64) -> Vec<String> {
    let mut ev: Vec<String> = texts
        .iter()
        .map(|t| {
            json!({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                   "choices": [{"index": 0, "text": t, "finish_reason": null, "logprobs": null}],
                   "usage": null})
            .to_string()
        })
        .collect();
    ev.push(
        json!({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
               "choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": null}],
               "usage": null})
        .to_string(),
    );
    ev.push(
        json!({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
               "choices": [],
               "usage": {"prompt_tokens": prompt, "completion_tokens": texts.len(),
                         "total_tokens": prompt + texts.len() as u64,
                         "prompt_tokens_details": {"cached_tokens": cached}}})
        .to_string(),
    );
    ev.push("[DONE]".into());
    ev
}

/// `events` as SSE bytes (CRLF line ends when asked, a keep-alive comment first), cut into
/// HTTP chunks of `split` bytes regardless of event boundaries.
fn chunked_sse(events: &[String], split: usize, crlf: bool) -> Vec<Piece> {
    let nl = if crlf { "\r\n" } else { "\n" };
    let mut sse = format!(":{nl}{nl}");
    for e in events {
        sse.push_str(&format!("data: {e}{nl}{nl}"));
    }
    let mut out = vec![Piece::Bytes(SSE_HEAD.as_bytes().to_vec())];
    for part in sse.as_bytes().chunks(split) {
        let mut c = format!("{:x}\r\n", part.len()).into_bytes();
        c.extend_from_slice(part);
        c.extend_from_slice(b"\r\n");
        out.push(Piece::Bytes(c));
    }
    out.push(Piece::Bytes(b"0\r\n\r\n".to_vec()));
    out
}

fn target(addr: SocketAddr) -> Target {
    Target::parse(&format!("http://{addr}")).unwrap()
}

fn opts() -> ClientOptions {
    ClientOptions {
        model: "m".into(),
        timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

fn request(prompt_len: usize, max_tokens: u32) -> LoadRequest {
    LoadRequest {
        arrival_s: 0.0,
        prompt: (0..prompt_len as u32).map(|i| 1000 + i).collect(),
        max_tokens,
        group: Some(7),
    }
}

async fn one(addr: SocketAddr, o: &ClientOptions) -> RequestRecord {
    send_request(&target(addr), o, 3, &request(10, 4), Instant::now()).await
}

#[tokio::test]
async fn client_parses_chunked_sse_split_anywhere() {
    for split in [1, 2, 3, 7, 64, 100_000] {
        for crlf in [false, true] {
            let (addr, seen) = fake_server(move |_, _| {
                chunked_sse(&engine_events(&["a", "b", "c", "d"], 10, 8), split, crlf)
            })
            .await;
            let r = one(addr, &opts()).await;
            assert!(r.ok, "split {split}: {:?}", r.error);
            assert_eq!(r.status, 200);
            assert_eq!(
                (r.prompt_tokens, r.completion_tokens, r.cached_tokens),
                (10, 4, 8)
            );
            assert_eq!(
                (r.index, r.group, r.sent_tokens, r.max_tokens),
                (3, Some(7), 10, 4)
            );
            assert_eq!(r.itl_count, 3, "three gaps between four text events");
            let ttft = r.ttft_s.unwrap();
            assert!(ttft >= 0.0 && ttft <= r.e2e_s());
            let body = seen.lock().unwrap()[0].clone();
            assert_eq!(body["model"], "m");
            assert_eq!(body["prompt"], json!((1000..1010).collect::<Vec<u32>>()));
            assert_eq!(body["max_tokens"], 4);
            assert_eq!(body["stream"], true);
            assert_eq!(body["stream_options"]["include_usage"], true);
            assert_eq!(body["ignore_eos"], true);
            assert_eq!(body["temperature"], 0.0);
        }
    }
}

#[tokio::test]
async fn ttft_and_itl_follow_event_timing() {
    let (addr, _) = fake_server(|_, _| {
        let ev = engine_events(&["x", "y", "z"], 10, 0);
        let mut out = vec![
            Piece::Bytes(SSE_HEAD.as_bytes().to_vec()),
            Piece::Sleep(150),
        ];
        for (i, e) in ev.iter().enumerate() {
            let data = format!("data: {e}\n\n");
            out.push(Piece::Bytes(
                format!("{:x}\r\n{data}\r\n", data.len()).into_bytes(),
            ));
            if i < 2 {
                out.push(Piece::Sleep(60));
            }
        }
        out.push(Piece::Bytes(b"0\r\n\r\n".to_vec()));
        out
    })
    .await;
    let r = one(addr, &opts()).await;
    assert!(r.ok, "{:?}", r.error);
    let ttft = r.ttft_s.unwrap();
    assert!((0.14..1.0).contains(&ttft), "ttft {ttft}");
    let itl = r.itl_sum_s / r.itl_count as f64;
    assert!((0.05..0.5).contains(&itl), "itl {itl}");
    assert!(r.e2e_s() >= ttft + 0.1);
}

#[tokio::test]
async fn a_content_length_sse_body_also_works() {
    let (addr, _) = fake_server(|_, _| {
        let mut body = String::new();
        for e in engine_events(&["hi"], 5, 0) {
            body.push_str(&format!("data: {e}\n\n"));
        }
        vec![Piece::Bytes(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )]
    })
    .await;
    let r = one(addr, &opts()).await;
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(r.completion_tokens, 1);
}

fn status_response(code: u16, reason: &str) -> Vec<Piece> {
    let body = json!({"error": {"message": format!("nope {code}"), "type": "x"}}).to_string();
    vec![Piece::Bytes(
        format!(
            "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )]
}

#[tokio::test]
async fn http_error_statuses_are_failures() {
    for (code, reason) in [(429, "Too Many Requests"), (500, "Internal Server Error")] {
        let (addr, _) = fake_server(move |_, _| status_response(code, reason)).await;
        let r = one(addr, &opts()).await;
        assert!(!r.ok);
        assert_eq!(r.status, code);
        let e = r.error.unwrap();
        assert!(e.contains(&code.to_string()) && e.contains("nope"), "{e}");
        assert_eq!(r.ttft_s, None);
    }
}

#[tokio::test]
async fn connection_refused_is_a_failure() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let r = one(addr, &opts()).await;
    assert!(!r.ok);
    assert_eq!(r.status, 0);
    assert!(r.error.unwrap().contains("cannot connect"));
}

/// Each broken response, and the words its failure must mention.
fn broken_responses() -> Vec<(&'static str, Vec<Piece>, &'static str)> {
    let mut out = Vec::new();
    let mut ev = engine_events(&["a"], 5, 0);
    ev.insert(1, "{not json".into());
    out.push(("bad json", chunked_sse(&ev, 5, false), "malformed"));
    out.push((
        "error event",
        chunked_sse(
            &[
                json!({"error": {"message": "engine failed", "type": "server_error"}}).to_string(),
                "[DONE]".into(),
            ],
            9,
            false,
        ),
        "engine failed",
    ));
    out.push((
        "not an object",
        chunked_sse(&["[1, 2]".into(), "[DONE]".into()], 9, false),
        "not a JSON object",
    ));
    let mut no_done = engine_events(&["a", "b"], 5, 0);
    no_done.pop();
    out.push(("no done", chunked_sse(&no_done, 4, false), "[DONE]"));
    let mut no_usage = engine_events(&["a"], 5, 0);
    no_usage.remove(2);
    out.push(("no usage", chunked_sse(&no_usage, 4, false), "usage"));
    out.push((
        "bad usage",
        chunked_sse(
            &[
                json!({"choices": [], "usage": {"prompt_tokens": "five"}}).to_string(),
                "[DONE]".into(),
            ],
            4,
            false,
        ),
        "usage",
    ));
    let mut cut = chunked_sse(&engine_events(&["a", "b"], 5, 0), 16, false);
    cut.truncate(4);
    out.push(("closed mid-stream", cut, "last chunk"));
    out.push((
        "bad chunk size",
        vec![
            Piece::Bytes(SSE_HEAD.as_bytes().to_vec()),
            Piece::Bytes(b"zz\r\ndata: x\r\n".to_vec()),
        ],
        "chunk size",
    ));
    out.push((
        "chunk without crlf",
        vec![
            Piece::Bytes(SSE_HEAD.as_bytes().to_vec()),
            Piece::Bytes(b"3\r\nabcXY".to_vec()),
        ],
        "CRLF",
    ));
    out.push((
        "huge chunk",
        vec![
            Piece::Bytes(SSE_HEAD.as_bytes().to_vec()),
            Piece::Bytes(b"fffffffff\r\n".to_vec()),
        ],
        "too large",
    ));
    out.push((
        "garbage status line",
        vec![Piece::Bytes(b"SPDY nonsense\r\n\r\n".to_vec())],
        "status line",
    ));
    out.push(("closed at once", vec![], "before the status line"));
    out.push((
        "closed in headers",
        vec![Piece::Bytes(
            b"HTTP/1.1 200 OK\r\ncontent-type: x\r\n".to_vec(),
        )],
        "headers",
    ));
    out.push((
        "json instead of sse",
        vec![Piece::Bytes(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
                .to_vec(),
        )],
        "[DONE]",
    ));
    out
}

#[tokio::test]
async fn malformed_responses_are_failures_not_panics() {
    for (name, pieces, words) in broken_responses() {
        let (addr, _) = fake_server(move |_, _| pieces.clone()).await;
        let r = one(addr, &opts()).await;
        assert!(!r.ok, "{name} must fail");
        let e = r.error.unwrap_or_default();
        assert!(e.contains(words), "{name}: {e}");
    }
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let (addr, _) = fake_server(|_, _| vec![Piece::Sleep(3_000)]).await;
    let o = ClientOptions {
        timeout: Duration::from_millis(200),
        ..opts()
    };
    let started = Instant::now();
    let r = one(addr, &o).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!r.ok);
    assert!(r.error.unwrap().contains("timed out"));
}

/// A server that answers every third connection with 429 and the rest like the engine, with
/// half the prompt cached.
async fn flaky_server() -> SocketAddr {
    fake_server(|n, body| {
        if n % 3 == 2 {
            return status_response(429, "Too Many Requests");
        }
        let prompt = body["prompt"].as_array().map_or(0, Vec::len) as u64;
        let texts: Vec<&str> = vec!["t"; body["max_tokens"].as_u64().unwrap_or(1) as usize];
        chunked_sse(&engine_events(&texts, prompt, prompt / 2), 40, false)
    })
    .await
    .0
}

#[tokio::test]
async fn closed_and_open_loop_runs_count_ok_and_failed() {
    let requests: Vec<LoadRequest> = (0..9).map(|_| request(20, 3)).collect();
    for arrival in [
        Arrival::Closed { concurrency: 3 },
        Arrival::Poisson { rate: 500.0 },
    ] {
        let addr = flaky_server().await;
        let mut reqs = requests.clone();
        schedule(&mut reqs, arrival, 1).unwrap();
        let records = run(
            &target(addr),
            &opts(),
            reqs,
            &RunOptions {
                arrival,
                duration_limit: None,
            },
        )
        .await;
        assert_eq!(
            records.iter().map(|r| r.index).collect::<Vec<_>>(),
            (0..9).collect::<Vec<_>>()
        );
        let s = summarize("x", &records);
        assert_eq!((s.requests, s.ok, s.failed), (9, 6, 3), "{arrival:?}");
        assert_eq!(s.prompt_tokens, 6 * 20);
        assert_eq!(s.cached_tokens, 6 * 10);
        assert_eq!(s.completion_tokens, 6 * 3);
        assert_eq!(s.hit_ratio, Some(0.5));
        assert!(records.iter().filter(|r| !r.ok).all(|r| r.status == 429));
    }
}

#[tokio::test]
async fn the_duration_limit_stops_sending() {
    let addr = flaky_server().await;
    let mut reqs: Vec<LoadRequest> = (0..50).map(|_| request(5, 1)).collect();
    let arrival = Arrival::Poisson { rate: 20.0 };
    schedule(&mut reqs, arrival, 0).unwrap();
    let expected = reqs.iter().filter(|r| r.arrival_s < 0.3).count();
    let records = run(
        &target(addr),
        &opts(),
        reqs,
        &RunOptions {
            arrival,
            duration_limit: Some(Duration::from_millis(300)),
        },
    )
    .await;
    assert_eq!(records.len(), expected);
    assert!(records.len() < 50);
}

fn rec(
    ok: bool,
    send: f64,
    ttft: f64,
    end: f64,
    prompt: u64,
    cached: u64,
    out: u64,
) -> RequestRecord {
    RequestRecord {
        ok,
        send_s: send,
        ttft_s: Some(ttft),
        end_s: end,
        prompt_tokens: prompt,
        cached_tokens: cached,
        completion_tokens: out,
        status: if ok { 200 } else { 500 },
        itl_sum_s: 0.1 * out.saturating_sub(1) as f64,
        itl_count: out.saturating_sub(1),
        ..Default::default()
    }
}

#[test]
fn summary_metrics_are_computed_right() {
    // 100 successful requests with TTFT 1..=100 ms and e2e 10 * TTFT, then two failures that
    // must count as failed and add nothing to the token sums or latencies.
    let mut records: Vec<RequestRecord> = (1..=100)
        .map(|i| {
            let t = f64::from(i) / 1000.0;
            rec(
                true,
                0.0,
                t,
                10.0 * t,
                100,
                if i <= 25 { 100 } else { 0 },
                5,
            )
        })
        .collect();
    records.push(rec(false, 0.5, 1.0, 1.5, 1000, 1000, 50));
    records.push(RequestRecord {
        send_s: 0.2,
        end_s: 2.0,
        error: Some("refused".into()),
        ..Default::default()
    });
    let s = summarize("a", &records);
    assert_eq!((s.requests, s.ok, s.failed), (102, 100, 2));
    assert_eq!(s.prompt_tokens, 10_000);
    assert_eq!(s.cached_tokens, 2_500);
    assert_eq!(s.completion_tokens, 500);
    assert_eq!(s.hit_ratio, Some(0.25));
    let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-9;
    assert!(close(s.ttft_p50_s, 0.050));
    assert!(close(s.ttft_p90_s, 0.090));
    assert!(close(s.ttft_p99_s, 0.099));
    assert!(close(s.ttft_mean_s, 0.0505));
    assert!(close(s.e2e_p50_s, 0.5));
    assert!(close(s.e2e_p99_s, 0.99));
    assert!(close(s.itl_mean_s, 0.1));
    // The run spans from the first send (0 s) to the last end (the failure at 2 s).
    assert!((s.duration_s - 2.0).abs() < 1e-9);
    assert!((s.output_tok_s - 250.0).abs() < 1e-9);
    assert!((s.total_tok_s - 5250.0).abs() < 1e-9);
    assert!((s.request_rate - 50.0).abs() < 1e-9);

    let empty = summarize("e", &[]);
    assert_eq!((empty.requests, empty.ok, empty.failed), (0, 0, 0));
    assert_eq!(empty.hit_ratio, None);
    assert_eq!(empty.ttft_p99_s, None);
    assert_eq!((empty.duration_s, empty.output_tok_s), (0.0, 0.0));

    let all_failed = summarize("f", &records[100..]);
    assert_eq!((all_failed.ok, all_failed.failed), (0, 2));
    assert_eq!(all_failed.ttft_p50_s, None);
    assert_eq!(all_failed.hit_ratio, None);
}

#[test]
fn quantiles_are_nearest_rank() {
    assert_eq!(quantile(&[], 0.5), None);
    assert_eq!(quantile(&[3.0], 0.99), Some(3.0));
    assert_eq!(quantile(&[1.0, 2.0], 0.5), Some(1.0));
    assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.9), Some(4.0));
    assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.0), Some(1.0));
}

#[test]
fn the_comparison_divides_by_the_baseline() {
    let a = LoadSummary {
        label: "hotprefix".into(),
        hit_ratio: Some(0.8),
        ttft_p50_s: Some(0.5),
        output_tok_s: 30.0,
        ..Default::default()
    };
    let b = LoadSummary {
        label: "lru".into(),
        hit_ratio: Some(0.4),
        ttft_p50_s: Some(1.0),
        output_tok_s: 20.0,
        ..Default::default()
    };
    let t = comparison_table(&[a.clone(), b.clone()], "lru").unwrap();
    let ratio_row = t
        .lines()
        .find(|l| l.starts_with("| hotprefix / lru"))
        .unwrap();
    assert!(ratio_row.contains("| 2.00x | 0.50x |"), "{ratio_row}");
    assert!(ratio_row.contains("1.50x"), "{ratio_row}");
    assert_eq!(t.lines().count(), 2 + 2 + 1);
    assert!(comparison_table(&[a, b], "nope").is_err());
}

#[test]
fn generated_workload_is_deterministic_and_shares_prefixes() {
    let g = SharedPrefixLoad {
        groups: 5,
        prefix_tokens: 40,
        suffix_tokens: 9,
        requests: 200,
        popularity: Popularity::Zipf(1.0),
        output_tokens: 3,
        seed: 11,
    };
    let a = g.generate().unwrap();
    assert_eq!(a, g.generate().unwrap());
    let other = SharedPrefixLoad {
        seed: 12,
        ..g.clone()
    }
    .generate()
    .unwrap();
    assert_ne!(a[0].prompt, other[0].prompt);
    assert_eq!(a.len(), 200);
    for r in &a {
        assert_eq!(r.prompt.len(), 49);
        assert_eq!(r.max_tokens, 3);
        assert!(
            r.prompt
                .iter()
                .all(|&t| (TOKEN_ID_MIN..TOKEN_ID_MAX).contains(&t))
        );
    }
    // Same group: identical prefix; different groups: different prefixes; suffixes unique.
    for x in &a {
        for y in &a {
            let same = x.prompt[..40] == y.prompt[..40];
            assert_eq!(same, x.group == y.group);
        }
    }
    let mut suffixes: Vec<&[u32]> = a.iter().map(|r| &r.prompt[40..]).collect();
    suffixes.sort();
    suffixes.dedup();
    assert_eq!(suffixes.len(), a.len());
    // A group's prefix does not depend on how many requests there are or on the skew.
    let fewer = SharedPrefixLoad {
        requests: 3,
        popularity: Popularity::Zipf(0.0),
        ..g.clone()
    }
    .generate()
    .unwrap();
    for r in &fewer {
        let same_group = a.iter().find(|x| x.group == r.group).unwrap();
        assert_eq!(r.prompt[..40], same_group.prompt[..40]);
    }
    // Zipf 1 over 5 groups: group 0 is the most popular, with about 44% of the requests.
    let count = |g: u64| a.iter().filter(|r| r.group == Some(g)).count();
    assert!(count(0) > count(4));
    assert!((60..120).contains(&count(0)), "{}", count(0));
    // A hot set that gets all traffic: only its groups appear.
    let hot = SharedPrefixLoad {
        popularity: Popularity::HotSet {
            groups_fraction: 0.4,
            traffic_fraction: 1.0,
        },
        ..g.clone()
    }
    .generate()
    .unwrap();
    assert!(hot.iter().all(|r| r.group.unwrap() < 2));
    assert!(hot.iter().any(|r| r.group == Some(1)));
    // Bad parameters are refused, not panicked on.
    for bad in [
        SharedPrefixLoad {
            groups: 0,
            ..g.clone()
        },
        SharedPrefixLoad {
            requests: 0,
            ..g.clone()
        },
        SharedPrefixLoad {
            output_tokens: 0,
            ..g.clone()
        },
        SharedPrefixLoad {
            prefix_tokens: 0,
            suffix_tokens: 0,
            ..g.clone()
        },
        SharedPrefixLoad {
            popularity: Popularity::Zipf(f64::NAN),
            ..g.clone()
        },
        SharedPrefixLoad {
            popularity: Popularity::HotSet {
                groups_fraction: 0.0,
                traffic_fraction: 0.5,
            },
            ..g.clone()
        },
    ] {
        assert!(bad.generate().is_err(), "{bad:?}");
    }
}

#[test]
fn warmup_prompts_share_nothing_with_the_workload() {
    let w = warmup_requests(3, 20, 4, 0);
    assert_eq!(w, warmup_requests(3, 20, 4, 0));
    assert_eq!(w.len(), 3);
    assert!(w.iter().all(|r| r.prompt.len() == 20 && r.max_tokens == 4));
    assert!(w[0].prompt[0] != w[1].prompt[0] && w[1].prompt[0] != w[2].prompt[0]);
    let work = SharedPrefixLoad::default().generate().unwrap();
    assert!(
        work.iter()
            .all(|r| w.iter().all(|x| x.prompt[..2] != r.prompt[..2]))
    );
}

#[test]
fn poisson_arrivals_are_deterministic_and_at_the_rate() {
    let base: Vec<LoadRequest> = (0..2000).map(|_| request(1, 1)).collect();
    let times = |seed| {
        let mut r = base.clone();
        schedule(&mut r, Arrival::Poisson { rate: 10.0 }, seed).unwrap();
        r.iter().map(|x| x.arrival_s).collect::<Vec<f64>>()
    };
    let a = times(5);
    assert_eq!(a, times(5));
    assert_ne!(a, times(6));
    assert_eq!(a[0], 0.0);
    assert!(a.windows(2).all(|w| w[0] <= w[1]));
    let mean_gap = a[a.len() - 1] / (a.len() - 1) as f64;
    assert!((0.09..0.11).contains(&mean_gap), "{mean_gap}");
    let mut r = base.clone();
    assert!(schedule(&mut r, Arrival::Poisson { rate: 0.0 }, 0).is_err());
    assert!(schedule(&mut r, Arrival::Closed { concurrency: 0 }, 0).is_err());
    assert!(schedule(&mut r, Arrival::Trace { time_scale: -1.0 }, 0).is_err());
}

#[test]
fn trace_hash_blocks_map_to_the_same_tokens() {
    let trace = Trace::parse(
        "t",
        "{\"timestamp\": 0, \"input_length\": 1100, \"output_length\": 300, \"hash_ids\": [1, 2, 3]}\n\
         {\"timestamp\": 500, \"input_length\": 1024, \"output_length\": 0, \"hash_ids\": [1, 2]}\n\
         {\"timestamp\": 1000, \"input_length\": 2000, \"output_length\": 5, \"hash_ids\": [1, 9]}\n\
         {\"timestamp\": 2000, \"input_length\": 512, \"output_length\": 5, \"hash_ids\": [4]}\n"
            .as_bytes(),
    )
    .unwrap();
    let m = TraceLoad {
        tokens_per_block: 8,
        max_input_tokens: 30,
        max_output_tokens: 32,
        max_requests: None,
        seed: 3,
    };
    let r = m.requests(&trace).unwrap();
    assert_eq!(r, m.requests(&trace).unwrap());
    // 1100 tokens of 512-token blocks at 8 tokens per block: ceil(1100 * 8 / 512) = 18.
    assert_eq!(r[0].prompt.len(), 18);
    assert_eq!(r[1].prompt.len(), 16);
    // 2000 * 8 / 512 = 31.25 -> 32 tokens, capped at 30; two hash ids cover 16 of them, the
    // rest are the request's own.
    assert_eq!(r[2].prompt.len(), 30);
    assert_eq!(r[0].prompt[..16], r[1].prompt[..]);
    assert_eq!(r[0].prompt[..8], r[2].prompt[..8]);
    assert_ne!(r[0].prompt[8..16], r[2].prompt[8..16]);
    assert_ne!(r[0].prompt[..8], r[3].prompt[..8]);
    assert_eq!(
        r.iter().map(|x| x.max_tokens).collect::<Vec<_>>(),
        vec![32, 1, 5, 5]
    );
    assert_eq!(
        r.iter().map(|x| x.arrival_s).collect::<Vec<_>>(),
        vec![0.0, 0.5, 1.0, 2.0]
    );
    assert_eq!(r[2].group, Some(1));
    let two = TraceLoad {
        max_requests: Some(2),
        ..m.clone()
    }
    .requests(&trace)
    .unwrap();
    assert_eq!(two.len(), 2);
    assert!(
        TraceLoad {
            tokens_per_block: 0,
            ..m
        }
        .requests(&trace)
        .is_err()
    );
}

#[test]
fn sse_decoder_joins_data_lines_and_skips_comments() {
    let mut d = SseDecoder::new();
    assert!(d.push(b": keep-alive\n\nevent: x\nda").is_empty());
    assert_eq!(d.push(b"ta: a\ndata:b\r\n\r\ndata: [DONE]\n"), vec!["a\nb"]);
    assert_eq!(d.push(b"\n"), vec!["[DONE]"]);
}

#[test]
fn urls_parse() {
    let t = Target::parse("http://127.0.0.1:8000/").unwrap();
    assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 8000));
    let t = Target::parse("localhost:9").unwrap();
    assert_eq!((t.host.as_str(), t.port), ("localhost", 9));
    assert_eq!(Target::parse("http://example").unwrap().port, 80);
    for bad in ["", "http://", "https://x:1", "http://x:notaport", ":80"] {
        assert!(Target::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn metrics_text_gives_hits_per_tier() {
    let text = "# HELP x\n\
                hotprefix_prefix_cache_hit_tokens_total{model_name=\"m\",tier=\"device\"} 120\n\
                hotprefix_prefix_cache_hit_tokens_total{model_name=\"m\",tier=\"host\"} 48\n\
                hotprefix_prefix_cache_query_tokens_total{model_name=\"m\"} 500\n";
    assert_eq!(parse_hit_tokens(text), (120.0, 48.0));
    assert_eq!(parse_hit_tokens(""), (0.0, 0.0));
}

/// A fake engine that also serves `/v1/models` and `/metrics`, for the binary.
async fn full_fake_engine() -> SocketAddr {
    fake_server(|_, body| {
        if body.is_null() {
            // A GET (no body): the model list answers /v1/models and is harmless elsewhere.
            let b = json!({"object": "list", "data": [{"id": "fake-model"}]}).to_string();
            return vec![Piece::Bytes(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
                    b.len()
                )
                .into_bytes(),
            )];
        }
        assert_eq!(body["model"], "fake-model");
        let prompt = body["prompt"].as_array().map_or(0, Vec::len) as u64;
        chunked_sse(&engine_events(&["a", "b"], prompt, prompt / 4), 13, false)
    })
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_writes_json_and_compares() {
    let addr = full_fake_engine().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_path_buf();
    let url = format!("http://{addr}");
    let result = tokio::task::spawn_blocking(move || {
        let bench = env!("CARGO_BIN_EXE_hotprefix-bench");
        // Run a warms up first; its warm-up request must not appear among the 6 recorded.
        for (label, extra) in [
            ("a", &["--concurrency=2", "--warmup=1"][..]),
            ("b", &["--rate=200"][..]),
        ] {
            let o = std::process::Command::new(bench)
                .args(["load", "--url", &url, "--label", label, "--requests", "6"])
                .args([
                    "--groups",
                    "2",
                    "--prefix-tokens",
                    "8",
                    "--suffix-tokens",
                    "4",
                ])
                .args(["--output-tokens", "2"])
                .args(extra)
                .arg("--json")
                .arg(out.join(format!("{label}.json")))
                .arg("--csv")
                .arg(out.join(format!("{label}.csv")))
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let stdout = String::from_utf8_lossy(&o.stdout);
            assert!(
                stdout.contains(&format!("| {label} | 6 | 0 | 0.250 |")),
                "{stdout}"
            );
            let warmed = String::from_utf8_lossy(&o.stderr).contains("warm-up: 1 request(s)");
            assert_eq!(warmed, label == "a");
        }
        let csv = std::fs::read_to_string(out.join("a.csv")).unwrap();
        assert_eq!(csv.lines().count(), 7);
        let o = std::process::Command::new(bench)
            .args(["load", "--baseline", "a", "--compare"])
            .arg(out.join("a.json"))
            .arg(out.join("b.json"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(stdout.contains("| b / a | - | - | 1.00x |"), "{stdout}");
        // Without --rate or --concurrency a generated workload has no arrival process.
        let o = std::process::Command::new(bench)
            .args(["load", "--url", "http://127.0.0.1:1", "--model", "m"])
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains("--concurrency"));
    })
    .await;
    result.unwrap();
}

//! The router over real sockets in front of real engines (`random:tiny`, in this process):
//! proxying and SSE streaming, the replica header, prefix routing from the router's own
//! decisions, identical block hashes on both sides, API keys, 503 without replicas, and retry on
//! another replica when one is dead.

#![allow(clippy::unwrap_used)]

mod common;

use common::{engine, http, router};
use hotprefix_router::server::REPLICA_HEADER;
use serde_json::{Value, json};

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Decodes a chunked body if needed.
fn dechunk(body: &str) -> String {
    if !body.contains("\r\n") {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

fn completion(prompt: &str, stream: bool) -> String {
    json!({"model": "random-tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": stream}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_proxied_streamed_and_routed_to_the_replica_that_served_their_prefix() {
    let (a, b) = (engine().await, engine().await);
    let replicas = format!("http://{},http://{}", a.addr, b.addr);
    let r = router(&["--replicas", &replicas, "--model", "random:tiny"]).await;
    // Not streamed: the engine's JSON, with the replica named.
    let long = "You are a helpful assistant. ".repeat(20);
    let (status, h, body) = http(
        r.addr,
        "POST",
        "/v1/completions",
        &[],
        &completion(&format!("{long} one"), false),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let first = header(&h, REPLICA_HEADER).unwrap().to_string();
    let v: Value = serde_json::from_str(&dechunk(&body)).unwrap();
    assert_eq!(v["object"], "text_completion");
    // The same long prefix goes to the same replica (the router remembers its decision) and
    // hits its cache there.
    for q in ["two", "three"] {
        let (status, h, body) = http(
            r.addr,
            "POST",
            "/v1/completions",
            &[],
            &completion(&format!("{long} {q}"), false),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(header(&h, REPLICA_HEADER), Some(first.as_str()));
        let v: Value = serde_json::from_str(&dechunk(&body)).unwrap();
        assert!(
            v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap()
                > 0,
            "{v}"
        );
    }
    // Streamed: server-sent events pass through.
    let (status, h, body) = http(
        r.addr,
        "POST",
        "/v1/completions",
        &[],
        &completion("hello", true),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        header(&h, "content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = dechunk(&body);
    assert!(
        body.contains("data: ") && body.contains("data: [DONE]"),
        "{body}"
    );
    // The engine's 4xx comes back unchanged and does not eject anyone.
    let bad = json!({"model": "random-tiny", "prompt": "x", "max_tokens": 0}).to_string();
    let (status, _, body) = http(r.addr, "POST", "/v1/completions", &[], &bad).await;
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = http(r.addr, "GET", "/v1/models", &[], "").await;
    assert_eq!(status, 200);
    assert!(dechunk(&body).contains("random-tiny"));
    // /debug/route explains a decision: both replicas scored.
    let (status, _, body) = http(
        r.addr,
        "POST",
        "/debug/route",
        &[],
        &completion(&format!("{long} four"), false),
    )
    .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&dechunk(&body)).unwrap();
    assert_eq!(v["decision"]["scores"].as_array().unwrap().len(), 2);
    assert_eq!(v["chosen"], first.as_str());
    let (status, _, body) = http(r.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    assert!(body.contains("hotprefix_router_requests_total"), "{body}");
    let (status, _, body) = http(r.addr, "GET", "/health", &[], "").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    r.launched.unwrap().stop().await;
}

/// The prompt tokens of `req` as an engine launched with `flags` (beside `--model
/// random:tiny`) renders and tokenizes it, and as a router launched with the same flags does;
/// each side built by its binary's own configuration and launch code.
async fn both_sides(
    flags: &[&str],
    req: &hotprefix_engine::api::ChatRequest,
) -> (Vec<u32>, Vec<u32>) {
    use clap::Parser;
    let mut args = vec![
        "hotprefix-engine",
        "--model",
        "random:tiny",
        "--backend",
        "cpu",
        "--device-cache-tokens",
        "4096",
    ];
    args.extend_from_slice(flags);
    let cfg = hotprefix_engine::config::EngineArgs::try_parse_from(args)
        .unwrap()
        .validate()
        .unwrap();
    let engine = hotprefix_engine::launch::launch(&cfg).unwrap();
    let mut args = vec!["--replicas", "http://127.0.0.1:9", "--model", "random:tiny"];
    args.extend_from_slice(flags);
    let r = router(&args).await;
    let launched = r.launched.unwrap();
    let text = launched.state.text.clone().unwrap();
    let at_router =
        hotprefix_engine::prompt::chat_prompt(&text.tokenizer, &text.chat, req).unwrap();
    let at_engine =
        hotprefix_engine::prompt::chat_prompt(&engine.tokenizer, &engine.chat, req).unwrap();
    launched.stop().await;
    (at_router, at_engine)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_engine_hash_a_request_into_the_same_blocks() {
    // The router's tokenization (engine code, weights not loaded) and the engine's prompt give
    // the same tokens, hence the same block hashes under the same salt: with the model's own
    // chat template, and with a --chat-template file given to both.
    use hotprefix_engine::api::ChatRequest;
    use hotprefix_engine::source::{ModelSource, load, load_text};
    use hotprefix_protocol::{BlockHash, Salt, hash_blocks};
    let src: ModelSource = "random:tiny".parse().unwrap();
    let text = load_text(&src).unwrap();
    let full = load(&src).unwrap();
    assert_eq!(text.id, full.id);
    let req: ChatRequest = serde_json::from_value(json!({
        "model": "random-tiny",
        "messages": [{"role": "system", "content": "be brief ".repeat(30)}, {"role": "user", "content": "hi"}]
    }))
    .unwrap();
    let salt = Salt::new(&full.id, None, None);
    let blocks = |tokens: &[u32]| hash_blocks(tokens, 16, salt, BlockHash::ROOT);
    let (a, b) = both_sides(&[], &req).await;
    assert_eq!(a, b);
    assert_eq!(blocks(&a), blocks(&b));
    assert!(a.len() >= 32);
    // The model's template, as load and load_text give it.
    assert_eq!(
        a,
        hotprefix_engine::prompt::chat_prompt(&full.tokenizer, &full.chat, &req).unwrap()
    );

    let path = std::env::temp_dir().join(format!(
        "hotprefix-router-proxy-{}-template.jinja",
        std::process::id()
    ));
    std::fs::write(
        &path,
        "{{ bos_token }}{% for m in messages %}### {{ m.role | upper }}\n{{ m.content }}{{ eos_token }}\n\
         {% endfor %}{% if add_generation_prompt %}### ASSISTANT\n{% endif %}",
    )
    .unwrap();
    let (c, d) = both_sides(&["--chat-template", path.to_str().unwrap()], &req).await;
    let _ = std::fs::remove_file(&path);
    assert_eq!(c, d, "both sides render with the override");
    assert_eq!(blocks(&c), blocks(&d));
    assert_ne!(c, a, "the override changed the prompt");
    // The override's text, byte by byte (the byte-level tokenizer), its EOS the model's own
    // special token.
    let eos = full.tokenizer.token_id("<|endoftext|>").unwrap();
    assert!(c.starts_with(&"### SYSTEM\n".bytes().map(u32::from).collect::<Vec<_>>()));
    assert_eq!(c.iter().filter(|&&t| t == eos).count(), 2, "{c:?}");
    let (ca, cc) = (blocks(&a), blocks(&c));
    assert_ne!(ca[0], cc[0], "different prompts, different blocks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_no_replica_and_a_dead_replica() {
    let a = engine().await;
    // A port nothing listens on: a dead replica.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let replicas = format!("http://{dead},http://{}", a.addr);
    let r = router(&[
        "--replicas",
        &replicas,
        "--policy",
        "round-robin",
        "--api-key",
        "k3y",
    ])
    .await;
    let (status, _, body) = http(
        r.addr,
        "POST",
        "/v1/completions",
        &[],
        &completion("hi", false),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"error\""));
    let auth = [("authorization", "Bearer k3y")];
    // Every request succeeds: the dead replica is retried around before any byte was sent,
    // then ejected.
    for _ in 0..4 {
        let (status, h, body) = http(
            r.addr,
            "POST",
            "/v1/completions",
            &auth,
            &completion("hi", false),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            header(&h, REPLICA_HEADER),
            Some(a.addr.to_string().as_str())
        );
    }
    // Probes and metrics need no key.
    let (status, _, body) = http(r.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    assert!(
        body.contains(&format!(
            "hotprefix_router_replica_up{{replica=\"{dead}\"}} 0"
        )),
        "{body}"
    );
    r.launched.unwrap().stop().await;
    // No replica at all: 503 with an OpenAI-shaped error and Retry-After.
    let r = router(&[
        "--replicas",
        &format!("http://{dead}"),
        "--eject-after",
        "1",
    ])
    .await;
    let (status, _, _) = http(
        r.addr,
        "POST",
        "/v1/completions",
        &[],
        &completion("hi", false),
    )
    .await;
    // It either failed to connect (502) or found the replica already ejected by the first
    // health probe (503); from now on it is ejected either way.
    assert!(status == 502 || status == 503, "{status}");
    let (status, h, body) = http(
        r.addr,
        "POST",
        "/v1/completions",
        &[],
        &completion("hi", false),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(header(&h, "retry-after"), Some("1"));
    assert!(body.contains("service_unavailable"));
    // Oversized bodies are refused before routing, on their declared length: the router
    // answers without reading them. (Only the head is sent: a server that refuses a body and
    // closes while unread bytes of it sit in its socket resets the connection, and the client
    // could lose the answer, which says nothing about the router.)
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        9 * 1024 * 1024
    );
    let answer = common::exchange(r.addr, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    r.launched.unwrap().stop().await;
}

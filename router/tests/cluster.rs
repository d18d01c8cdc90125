//! End to end, every part a separate process: a real `redis-server`, engine replicas
//! (`random:tiny`; each is this test executable re-run in engine mode, serving and publishing
//! through `hotprefix_engine::launch::serve`, the same code as the `hotprefix-engine` binary's
//! main) and the real `hotprefix-router` binary. Checks, in order:
//! - requests with two different long system prompts land on different replicas, and later
//!   requests with those prompts go back to them and hit their caches (`cached_tokens`);
//! - Redis killed: the router keeps serving and reports `degraded`; Redis restarted: the engines
//!   republish and the router routes by prefix again;
//! - a replica killed during a load: every request that had not started streaming is answered
//!   by the other one, and the dead replica disappears from the router once its keys expire.
//!
//! `harness = false`: `main` runs the scenarios in sequence (they share the processes).

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hotprefix_testkit::RedisServer;
use serde_json::{Value, json};

/// Environment variable that puts this executable in engine mode; its value is the flags.
const ENGINE_MODE: &str = "HOTPREFIX_E2E_ENGINE_FLAGS";
const SERVICE: &str = "e2e";

fn main() {
    if let Ok(flags) = std::env::var(ENGINE_MODE) {
        engine_main(&flags);
        return;
    }
    let started = Instant::now();
    let mut c = Cluster::start();
    let (a, b) = two_prefixes_land_on_two_replicas_and_hit_their_caches(&c);
    println!("ok: two prefixes, two replicas, cache hits ({a} and {b})");
    redis_down_routing_degrades_and_recovers(&mut c, &a);
    println!("ok: Redis down and back");
    a_killed_replica_loses_no_request_and_expires(&mut c);
    println!("ok: replica killed under load");
    println!("cluster e2e passed in {:.1?}", started.elapsed());
}

/// Engine mode: serve `random:tiny` with the given flags on a free port, print the port, and
/// publish to Redis until SIGTERM (or until killed).
fn engine_main(flags: &str) {
    use clap::Parser;
    let mut args = vec!["hotprefix-engine"];
    args.extend(flags.split(' '));
    let cfg = hotprefix_engine::config::EngineArgs::try_parse_from(args)
        .unwrap()
        .validate()
        .unwrap();
    let target = cfg.publish.as_ref().map(|p| {
        hotprefix_engine::publish::RedisTarget::new(
            &p.url,
            p.password.as_ref(),
            p.ca_file.as_deref(),
        )
        .unwrap()
    });
    let launched = hotprefix_engine::launch::launch_engine(&cfg).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTEN {}", listener.local_addr().unwrap());
        std::io::stdout().flush().unwrap();
        let term = async {
            let mut s =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
            s.recv().await;
        };
        hotprefix_engine::launch::serve(&cfg, launched, target, listener, term)
            .await
            .unwrap();
    });
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Engine {
    id: String,
    proc: Proc,
}

fn spawn_engine(id: &str, redis: &str) -> Engine {
    let flags = format!(
        "--model random:tiny --backend cpu --device-cache-tokens 4096 --threads 1 \
         --redis-url {redis} --service {SERVICE} --replica-id {id}"
    );
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(ENGINE_MODE, flags)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("LISTEN "), "engine said {line:?}");
    Engine {
        id: id.to_string(),
        proc: Proc(child),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Cluster {
    redis: RedisServer,
    engines: Vec<Engine>,
    router: SocketAddr,
    _router: Proc,
}

impl Cluster {
    fn start() -> Cluster {
        let redis = RedisServer::start();
        let engines = vec![
            spawn_engine("e2e-0", &redis.url()),
            spawn_engine("e2e-1", &redis.url()),
        ];
        let router: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let proc = Proc(
            Command::new(env!("CARGO_BIN_EXE_hotprefix-router"))
                .args([
                    "--listen",
                    &router.to_string(),
                    "--redis-url",
                    &redis.url(),
                    "--service",
                    SERVICE,
                    "--model",
                    "random:tiny",
                    // Only the engines' summaries may draw a request to a replica here, not
                    // the router's memory of its own decisions.
                    "--recent-ms",
                    "0",
                    "--health-interval-ms",
                    "500",
                ])
                .env("RUST_LOG", "warn")
                .spawn()
                .unwrap(),
        );
        let c = Cluster {
            redis,
            engines,
            router,
            _router: proc,
        };
        wait_for(
            "the router to see both replicas",
            Duration::from_secs(30),
            || {
                c.health()
                    .map(|h| h["replicas"].as_array().map_or(0, Vec::len))
                    == Some(2)
            },
        );
        c
    }

    fn health(&self) -> Option<Value> {
        let (status, _, body) = http(self.router, "GET", "/health", "").ok()?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    }
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One HTTP/1.1 exchange: (status, the replica header, body). Errors are connection failures.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).to_string();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(std::io::Error::other(format!("no response head: {text:?}")));
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    let replica = head
        .lines()
        .find_map(|l| l.strip_prefix("x-hotprefix-replica: "))
        .unwrap_or("")
        .to_string();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        replica,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].strip_prefix("\r\n").unwrap_or("");
    }
    out
}

fn chat(system: &str, user: &str, stream: bool) -> String {
    json!({
        "model": "random-tiny",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": stream,
    })
    .to_string()
}

fn pirate() -> String {
    "You are a pirate captain who answers every question about the sea. ".repeat(12)
}

fn botanist() -> String {
    "You are a careful botanist who names every plant in Latin first. ".repeat(12)
}

/// (replica, cached tokens) of a non-streamed chat request through the router.
fn ask(c: &Cluster, system: &str, user: &str) -> (String, u64) {
    let (status, replica, body) = http(
        c.router,
        "POST",
        "/v1/chat/completions",
        &chat(system, user, false),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    (
        replica,
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
    )
}

/// The router's choice and the chosen replica's matched blocks, without sending anything;
/// `None` while the router has no replica to choose.
fn explain(c: &Cluster, system: &str, user: &str) -> Option<(String, u64)> {
    let (status, _, body) =
        http(c.router, "POST", "/debug/route", &chat(system, user, false)).ok()?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).unwrap();
    let chosen = v["chosen"].as_str().unwrap().to_string();
    let idx = v["decision"]["chosen"].as_u64().unwrap() as usize;
    Some((
        chosen,
        v["decision"]["scores"][idx]["matched_blocks"]
            .as_u64()
            .unwrap(),
    ))
}

/// Whether the router now sends (`system`, `user`) to `replica` because it holds the prefix.
fn routed_by_prefix(c: &Cluster, system: &str, user: &str, replica: &str) -> bool {
    explain(c, system, user).is_some_and(|(r, m)| r == replica && m > 0)
}

fn two_prefixes_land_on_two_replicas_and_hit_their_caches(c: &Cluster) -> (String, String) {
    let (a, cached) = ask(c, &pirate(), "Where is the treasure?");
    assert_eq!(cached, 0);
    // Once replica `a` has published a summary holding the pirate prompt, the router sends
    // pirate requests there because of it (its memory of decisions is off).
    wait_for(
        "the pirate prefix in a summary",
        Duration::from_secs(15),
        || routed_by_prefix(c, &pirate(), "Which ship?", &a),
    );
    // A new prefix goes to the replica with the emptier cache: the other one.
    let before = explain(c, &botanist(), "Fern?");
    let (b, cached) = ask(c, &botanist(), "What is this fern?");
    assert_ne!(
        a, b,
        "the second prefix should land on the other replica: {before:?}"
    );
    assert_eq!(cached, 0);
    wait_for(
        "the botanist prefix in a summary",
        Duration::from_secs(15),
        || routed_by_prefix(c, &botanist(), "And this moss?", &b),
    );
    // Later requests with either prefix return to its replica and hit its cache.
    for _ in 0..2 {
        let (r, cached) = ask(c, &pirate(), "How deep is the sea?");
        assert_eq!(r, a);
        assert!(cached > 0, "pirate request missed the cache");
        let (r, cached) = ask(c, &botanist(), "Is this tree old?");
        assert_eq!(r, b);
        assert!(cached > 0, "botanist request missed the cache");
    }
    (a, b)
}

fn redis_down_routing_degrades_and_recovers(c: &mut Cluster, a: &str) {
    c.redis.stop();
    wait_for(
        "the router to report Redis down",
        Duration::from_secs(15),
        || {
            c.health()
                .is_some_and(|h| h["redis"] == "down" && h["status"] == "degraded")
        },
    );
    // Still serving, on the fallback policy.
    for q in ["one", "two", "three"] {
        let (status, _, body) = http(
            c.router,
            "POST",
            "/v1/chat/completions",
            &chat(&pirate(), q, false),
        )
        .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    c.redis.restart();
    wait_for(
        "the router to report Redis up",
        Duration::from_secs(20),
        || c.health().is_some_and(|h| h["redis"] == "up"),
    );
    // The engines republish everything: prefix routing works again.
    wait_for(
        "prefix routing after Redis returned",
        Duration::from_secs(20),
        || routed_by_prefix(c, &pirate(), "Back again?", a),
    );
}

fn a_killed_replica_loses_no_request_and_expires(c: &mut Cluster) {
    let victim = c.engines.pop().unwrap();
    let survivor = c.engines[0].id.clone();
    let router = c.router;
    // Four clients, each sending requests in turn with one of four prefixes (so both replicas
    // get work); the victim is killed while they run.
    let clients: Vec<_> = (0..4)
        .map(|k| {
            std::thread::spawn(move || {
                let system = format!("Client {k} speaks. ").repeat(20);
                let mut answered = Vec::new();
                for i in 0..12 {
                    let stream = i % 3 == 2;
                    let r = http(
                        router,
                        "POST",
                        "/v1/chat/completions",
                        &chat(&system, &format!("q{i}"), stream),
                    );
                    answered.push((stream, r));
                }
                answered
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut victim = victim;
    victim.proc.0.kill().unwrap();
    let _ = victim.proc.0.wait();
    let mut ok = 0;
    for t in clients {
        for (stream, r) in t.join().unwrap() {
            match r {
                Ok((200, _, body)) if !stream => {
                    assert!(body.contains("chat.completion"), "{body}");
                    ok += 1;
                }
                // A stream cut by the kill had started (200 headers sent): the client saw the
                // failure mid-stream, which a proxy cannot hide. Anything else must succeed.
                Ok((200, _, _)) => ok += 1,
                other => panic!("a request was lost (stream {stream}): {other:?}"),
            }
        }
    }
    assert!(ok >= 40, "{ok} of 48 answered");
    // Its keys expire (it could not say goodbye): the router drops it.
    wait_for(
        "the dead replica to disappear",
        Duration::from_secs(20),
        || {
            c.health().is_some_and(|h| {
                let ids: Vec<&str> = h["replicas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|r| r["id"].as_str())
                    .collect();
                ids == [survivor.as_str()]
            })
        },
    );
    let (status, replica, _) = http(
        c.router,
        "POST",
        "/v1/chat/completions",
        &chat("hi", "there", false),
    )
    .unwrap();
    assert_eq!((status, replica.as_str()), (200, survivor.as_str()));
}

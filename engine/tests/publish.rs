//! The engine's Redis publisher against a real `redis-server` (started by
//! `hotprefix-testkit` on a free loopback port): the records routers read appear under the
//! documented keys and decode, announcements arrive, a served prompt's blocks show up in the
//! summary, serving goes on while Redis is down and the keys come back after it restarts,
//! passwords work and never reach the logs, TLS with a private CA works, and a clean shutdown
//! (in-process, and of the real binary on SIGTERM) removes the keys. Engines run `random:tiny`
//! in-process on 127.0.0.1:0. Every wait polls with a generous bound instead of sleeping a
//! fixed time, so a loaded machine is slower, never flaky.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hotprefix_engine::backend::cpu::CpuBackend;
use hotprefix_engine::decoder::Decoder;
use hotprefix_engine::launch::{Served, launch_engine};
use hotprefix_engine::metrics::EngineMetrics;
use hotprefix_engine::model::{LlamaConfig, LlamaModel};
use hotprefix_engine::publish::{Publisher, PublisherHandle, RedisTarget};
use hotprefix_engine::sampling::SamplingParams;
use hotprefix_engine::scheduler::{Request, Scheduler, SchedulerConfig};
use hotprefix_engine::server::{self, AppState};
use hotprefix_protocol::cluster::{
    Announcement, HotnessSummary, Keys, LIVENESS_TTL_MS, LoadReport, Registration, SCHEMA_VERSION,
};
use hotprefix_protocol::{BLOCK_HASH_SCHEME, BlockHash, ReplicaId, Salt, hash_blocks};
use hotprefix_testkit::RedisServer;
use redis::aio::MultiplexedConnection;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Bound of every wait: far more than any step needs (publishing runs every 250 ms and the
/// reconnection backoff is at most about 2.4 s), so only a real failure reaches it.
const WAIT: Duration = Duration::from_secs(15);
/// Bound for the real binary to start (it builds its random model) and to stop.
const BINARY_WAIT: Duration = Duration::from_secs(60);
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(50);
const SERVICE: &str = "svc";
const BLOCK: usize = 16;

// ---------------------------------------------------------------------------------------------
// Captured logs: one global subscriber for the whole test binary writes every engine log line
// to a buffer, so tests can check what was (and was not) logged.

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The captured log text so far (installing the capture on first use).
fn logs() -> String {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    let buf = BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(Arc::clone(&buf));
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("hotprefix_engine=debug"))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        buf
    });
    String::from_utf8_lossy(&buf.lock().unwrap()).into_owned()
}

/// Waits until a captured log line mentions `replica=<replica>` and `text`.
async fn wait_for_log(replica: &str, text: &str) {
    let field = format!("replica={replica}");
    let deadline = Instant::now() + WAIT;
    while !logs()
        .lines()
        .any(|l| l.contains(&field) && l.contains(text))
    {
        assert!(
            Instant::now() < deadline,
            "no log line for {replica} with {text:?} within {WAIT:?}:\n{}",
            logs()
        );
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// An engine replica in-process: `random:tiny` behind the HTTP server on 127.0.0.1:0, with its
// publisher.

struct Replica {
    addr: SocketAddr,
    state: AppState,
    served: Served,
    publisher: Option<PublisherHandle>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Replica {
    /// Starts an engine publishing as replica `id` with `redis_flags` (URL, password, CA).
    async fn start(id: &str, redis_flags: &[&str]) -> Replica {
        logs();
        let mut flags = vec!["--service", SERVICE, "--replica-id", id];
        flags.extend_from_slice(redis_flags);
        let cfg = common::small_config("random:tiny", &flags);
        let pcfg = cfg.publish.clone().expect("--redis-url was given");
        let launched = tokio::task::spawn_blocking(move || launch_engine(&cfg))
            .await
            .unwrap()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target =
            RedisTarget::new(&pcfg.url, pcfg.password.as_ref(), pcfg.ca_file.as_deref()).unwrap();
        let state = launched.state;
        let publisher =
            Publisher::new(target, &pcfg, &launched.served, addr).spawn(state.engine.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(server::run(
            listener,
            state.clone(),
            shutdown,
            Duration::from_secs(5),
        ));
        Replica {
            addr,
            state,
            served: launched.served,
            publisher: Some(publisher),
            stop: Some(stop),
            task,
        }
    }

    /// Shuts down as the binary does: the publisher leaves, then the server drains and stops.
    async fn shutdown(mut self) {
        if let Some(p) = self.publisher.take() {
            tokio::time::timeout(WAIT, p.shutdown()).await.unwrap();
        }
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client over the socket's readiness calls (the engine builds tokio without
// `io-util`): one request per connection, the whole response read until the server closes.

async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let exchange = async {
        let s = TcpStream::connect(addr).await.unwrap();
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut out = req.as_bytes();
        while !out.is_empty() {
            s.writable().await.unwrap();
            match s.try_write(out) {
                Ok(n) => out = &out[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("writing the request: {e}"),
            }
        }
        let mut resp = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            s.readable().await.unwrap();
            match s.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => resp.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("reading the response: {e}"),
            }
        }
        let text = String::from_utf8_lossy(&resp).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        (status, text)
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no response within {WAIT:?}"))
}

/// A prompt of `blocks` full blocks of token ids (inside `random:tiny`'s 512-token vocabulary).
fn prompt(blocks: usize, seed: u32) -> Vec<u32> {
    (0..(blocks * BLOCK) as u32)
        .map(|i| (i.wrapping_mul(7).wrapping_add(seed)) % 500 + 1)
        .collect()
}

/// Sends a completion of `tokens` and expects 200.
async fn complete(addr: SocketAddr, tokens: &[u32]) {
    let body = json!({
        "model": "random-tiny",
        "prompt": tokens,
        "max_tokens": 2,
        "temperature": 0,
    })
    .to_string();
    let (status, text) = http(addr, "POST", "/v1/completions", Some(&body)).await;
    assert_eq!(status, 200, "{text}");
}

// ---------------------------------------------------------------------------------------------
// Reading Redis.

async fn connect(redis: &RedisServer) -> MultiplexedConnection {
    tokio::time::timeout(WAIT, redis.client().get_multiplexed_async_connection())
        .await
        .unwrap()
        .unwrap()
}

async fn get(con: &mut MultiplexedConnection, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(key).query_async(con).await.unwrap()
}

/// Polls `key` until it holds a value `decode` accepts and `pred` likes; fails after [`WAIT`].
async fn wait_for<T: std::fmt::Debug>(
    con: &mut MultiplexedConnection,
    key: &str,
    decode: impl Fn(&[u8]) -> T,
    pred: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    loop {
        if let Some(bytes) = get(con, key).await {
            let v = decode(&bytes);
            if pred(&v) {
                return v;
            }
            last = Some(v);
        }
        assert!(
            Instant::now() < deadline,
            "{key}: not as expected within {WAIT:?}; last: {last:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

fn registration(b: &[u8]) -> Registration {
    Registration::decode(b).unwrap()
}

fn load(b: &[u8]) -> LoadReport {
    LoadReport::decode(b).unwrap()
}

fn summary(b: &[u8]) -> HotnessSummary {
    HotnessSummary::decode(b).unwrap()
}

/// Subscribes to the service's announcements; returns the stream of parsed announcements.
async fn announcements(
    redis: &RedisServer,
) -> impl futures_util::Stream<Item = Announcement> + Unpin {
    let mut ps = tokio::time::timeout(WAIT, redis.client().get_async_pubsub())
        .await
        .unwrap()
        .unwrap();
    ps.subscribe(Keys::new(SERVICE).unwrap().channel())
        .await
        .unwrap();
    Box::pin(ps.into_on_message().map(|m| {
        let text: String = m.get_payload().unwrap();
        Announcement::parse(&text).unwrap()
    }))
}

/// Waits for an announcement `want` accepts, failing after [`WAIT`].
async fn expect_announcement(
    stream: &mut (impl futures_util::Stream<Item = Announcement> + Unpin),
    what: &str,
    want: impl Fn(&Announcement) -> bool,
) -> Announcement {
    let found = async {
        while let Some(a) = stream.next().await {
            if want(&a) {
                return a;
            }
        }
        panic!("the announcement stream ended before {what}");
    };
    tokio::time::timeout(WAIT, found)
        .await
        .unwrap_or_else(|_| panic!("no {what} announcement within {WAIT:?}"))
}

fn replica_keys(id: &str) -> (String, String, String, String) {
    let k = Keys::new(SERVICE).unwrap();
    let id = ReplicaId::parse(id).unwrap();
    (k.info(&id), k.load(&id), k.summary(&id), k.replicas())
}

async fn is_member(con: &mut MultiplexedConnection, set: &str, id: &str) -> bool {
    redis::cmd("SISMEMBER")
        .arg(set)
        .arg(id)
        .query_async(con)
        .await
        .unwrap()
}

/// Checks that replica `id` has no keys left and is out of the replica set.
async fn assert_left(con: &mut MultiplexedConnection, id: &str) {
    let (info, load_key, summary_key, set) = replica_keys(id);
    for key in [&info, &load_key, &summary_key] {
        assert_eq!(get(con, key).await, None, "{key} remains after leaving");
    }
    assert!(!is_member(con, &set, id).await, "{id} is still in {set}");
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_published_decodable_and_follow_the_cache() {
    let redis = RedisServer::start();
    let mut con = connect(&redis).await;
    let mut news = announcements(&redis).await;
    let r = Replica::start("r0", &["--redis-url", &redis.url()]).await;
    let (info, load_key, summary_key, set) = replica_keys("r0");

    // The registration says how to reach the replica and how it names prefixes.
    let reg = wait_for(&mut con, &info, registration, |_| true).await;
    assert_eq!(reg.schema, SCHEMA_VERSION);
    assert_eq!(reg.replica.0, "r0");
    assert_eq!(reg.url, format!("http://{}", r.addr));
    assert_eq!(reg.model, "random-tiny");
    assert_eq!(reg.model, r.state.model_id);
    assert_eq!(reg.block_size as usize, BLOCK);
    assert_eq!(reg.salt, Salt::new("random-tiny", None, None));
    assert_eq!(reg.salt, r.served.salt, "the scheduler's own salt");
    assert_eq!(reg.block_hash_scheme, BLOCK_HASH_SCHEME);
    assert_eq!(reg.version, env!("CARGO_PKG_VERSION"));
    assert!(is_member(&mut con, &set, "r0").await);

    // Load and summary: decodable, with the TTL of the contract.
    let l = wait_for(&mut con, &load_key, load, |_| true).await;
    assert_eq!(l.schema, SCHEMA_VERSION);
    assert_eq!(l.device_blocks_total, 2048 / BLOCK as u64);
    assert_eq!(l.host_blocks_total, 4096 / BLOCK as u64);
    let s = wait_for(&mut con, &summary_key, summary, |_| true).await;
    assert_eq!(s.block_size as usize, BLOCK);
    for key in [&info, &load_key, &summary_key] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(
            ttl > 0 && ttl <= LIVENESS_TTL_MS as i64,
            "{key} has PTTL {ttl}"
        );
    }

    // Announcements: the registration once, then loads and summaries with their sequences.
    expect_announcement(&mut news, "register", |a| {
        *a == Announcement::Registered(reg.replica.clone())
    })
    .await;
    expect_announcement(&mut news, "load", |a| matches!(a, Announcement::Load(..))).await;
    expect_announcement(&mut news, "summary", |a| {
        matches!(a, Announcement::Summary(..))
    })
    .await;

    // A served prompt's blocks appear in the summary, named as a router names them.
    let tokens = prompt(8, 3);
    complete(r.addr, &tokens).await;
    let hashes = hash_blocks(&tokens, BLOCK, reg.salt, BlockHash::ROOT);
    let holds_prompt = |s: &HotnessSummary| {
        hashes.iter().enumerate().all(|(i, h)| {
            s.entries
                .iter()
                .any(|e| e.hash == *h && e.depth as usize == i + 1 && e.hotness > 0.0)
        })
    };
    let s2 = wait_for(&mut con, &summary_key, summary, holds_prompt).await;
    assert!(s2.seq > s.seq, "summary sequence numbers increase");
    // Load sequence numbers increase; once idle, the cached prompt's blocks are in use and
    // nothing waits, runs or is left to prefill.
    let l2 = wait_for(&mut con, &load_key, load, |x| {
        x.seq > l.seq
            && x.device_blocks_used >= hashes.len() as u64
            && (x.waiting, x.running, x.pending_prefill_tokens) == (0, 0, 0)
    })
    .await;
    assert_eq!(l2.device_blocks_total, l.device_blocks_total);

    // Redis lost the registration (expiry, flush): it is written and announced again.
    let _: () = redis::cmd("DEL")
        .arg(&info)
        .query_async(&mut con)
        .await
        .unwrap();
    expect_announcement(&mut news, "register again", |a| {
        matches!(a, Announcement::Registered(_))
    })
    .await;
    wait_for(&mut con, &info, registration, |r| *r == reg).await;

    // A clean shutdown deletes the keys and announces it.
    r.shutdown().await;
    expect_announcement(&mut news, "leave", |a| matches!(a, Announcement::Left(_))).await;
    assert_left(&mut con, "r0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_goes_on_while_redis_is_down_and_the_keys_come_back() {
    let mut redis = RedisServer::start();
    let r = Replica::start("r1", &["--redis-url", &redis.url()]).await;
    let (info, load_key, summary_key, set) = replica_keys("r1");
    let before = {
        let mut con = connect(&redis).await;
        wait_for(&mut con, &summary_key, summary, |_| true).await
    };

    tokio::task::block_in_place(|| redis.stop());
    // Requests are served while Redis is gone (and while the publisher retries).
    for seed in 0..3 {
        complete(r.addr, &prompt(4, seed)).await;
    }
    let (status, _) = http(r.addr, "GET", "/health", None).await;
    assert_eq!(status, 200);
    // And while the publisher knows Redis is gone and retries.
    wait_for_log("r1", "publishing to Redis failed").await;
    complete(r.addr, &prompt(4, 9)).await;

    tokio::task::block_in_place(|| redis.restart());
    let mut con = connect(&redis).await;
    // Everything is back within the reconnection backoff plus one interval.
    wait_for(&mut con, &info, registration, |r| r.replica.0 == "r1").await;
    wait_for(&mut con, &load_key, load, |_| true).await;
    let after = wait_for(&mut con, &summary_key, summary, |_| true).await;
    assert!(
        after.seq > before.seq,
        "the sequence goes on across the outage"
    );
    assert!(is_member(&mut con, &set, "r1").await);
    // The blocks of the requests served during the outage are in the summary.
    let hashes = hash_blocks(&prompt(4, 9), BLOCK, r.served.salt, BlockHash::ROOT);
    wait_for(&mut con, &summary_key, summary, |s| {
        hashes
            .iter()
            .all(|h| s.entries.iter().any(|e| e.hash == *h))
    })
    .await;
    r.shutdown().await;
    assert_left(&mut con, "r1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_delays_no_request_and_no_shutdown() {
    let mut redis = RedisServer::start();
    let r = Replica::start("r4", &["--redis-url", &redis.url()]).await;
    let mut con = connect(&redis).await;
    let (info, ..) = replica_keys("r4");
    wait_for(&mut con, &info, registration, |_| true).await;

    // Redis accepts connections but answers nothing: every call of the publisher times out.
    tokio::task::block_in_place(|| redis.pause());
    complete(r.addr, &prompt(3, 1)).await;
    wait_for_log("r4", "publishing to Redis failed").await;
    complete(r.addr, &prompt(3, 2)).await;
    let (status, _) = http(r.addr, "GET", "/health", None).await;
    assert_eq!(status, 200);

    // Shutting down while Redis still hangs gives up on the goodbye after a bounded time.
    let started = Instant::now();
    r.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?} with Redis hung",
        started.elapsed()
    );
    tokio::task::block_in_place(|| redis.resume());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_work_from_the_url_or_the_flag_and_never_reach_the_logs() {
    const PASSWORD: &str = "Pw-9f3e1c77-never-logged";
    const WRONG_IN_URL: &str = "Wrong-5be2-overridden";
    const WRONG: &str = "Wrong-77aa-refused";
    let redis = RedisServer::with_password(PASSWORD);
    let port = redis.port();
    let mut con = connect(&redis).await;

    // The flag overrides a (wrong) password in the URL.
    let url_wrong = format!("redis://:{WRONG_IN_URL}@127.0.0.1:{port}");
    let r = Replica::start(
        "r2",
        &["--redis-url", &url_wrong, "--redis-password", PASSWORD],
    )
    .await;
    let (info, ..) = replica_keys("r2");
    wait_for(&mut con, &info, registration, |_| true).await;

    // The password in the URL alone works too (an ACL user name may come with it).
    let engine = r.state.engine.clone();
    let spawn = |id: &str, url: String| {
        let cfg = common::small_config(
            "random:tiny",
            &[
                "--redis-url",
                &url,
                "--service",
                SERVICE,
                "--replica-id",
                id,
            ],
        );
        let p = cfg.publish.unwrap();
        let target = RedisTarget::new(&p.url, p.password.as_ref(), None).unwrap();
        Publisher::new(target, &p, &r.served, r.addr).spawn(engine.clone())
    };
    let in_url = spawn(
        "r2-url",
        format!("redis://default:{PASSWORD}@127.0.0.1:{port}"),
    );
    let (info_url, ..) = replica_keys("r2-url");
    wait_for(&mut con, &info_url, registration, |_| true).await;

    // A wrong password fails (and is logged as a failure, redacted), serving unaffected.
    let refused = spawn("r2-bad", format!("redis://:{WRONG}@127.0.0.1:{port}"));
    wait_for_log("r2-bad", "publishing to Redis failed").await;
    let (bad_info, ..) = replica_keys("r2-bad");
    assert_eq!(get(&mut con, &bad_info).await, None);
    complete(r.addr, &prompt(2, 1)).await;

    refused.shutdown().await;
    in_url.shutdown().await;
    r.shutdown().await;
    assert_left(&mut con, "r2").await;
    assert_left(&mut con, "r2-url").await;

    let text = logs();
    // The capture saw this test's publishers, with the URL redacted...
    assert!(
        text.contains(&format!("redis://***@127.0.0.1:{port}")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("r2-bad") && l.contains("authentication failed")),
        "{text}"
    );
    // ...and none of the passwords.
    for secret in [PASSWORD, WRONG_IN_URL, WRONG] {
        assert!(!text.contains(secret), "{secret} was logged:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_works() {
    let redis = RedisServer::with_tls();
    assert!(redis.url().starts_with("rediss://"));
    let ca = redis.ca_file().unwrap().to_str().unwrap().to_string();
    let r = Replica::start("r3", &["--redis-url", &redis.url(), "--redis-ca-file", &ca]).await;
    let mut con = connect(&redis).await;
    let (info, load_key, summary_key, _) = replica_keys("r3");
    wait_for(&mut con, &info, registration, |_| true).await;
    wait_for(&mut con, &load_key, load, |_| true).await;
    wait_for(&mut con, &summary_key, summary, |_| true).await;
    r.shutdown().await;
    assert_left(&mut con, "r3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_publishes_and_leaves_on_sigterm() {
    const PASSWORD: &str = "Bin-Pw-41d0-never-logged";
    let redis = RedisServer::with_password(PASSWORD);
    let mut con = connect(&redis).await;
    let mut news = announcements(&redis).await;
    let out_path = std::env::temp_dir().join(format!(
        "hotprefix-publish-binary-{}.log",
        std::process::id()
    ));
    let out = std::fs::File::create(&out_path).unwrap();
    // The password comes from the environment, as from a Kubernetes Secret.
    let mut child = Command::new(env!("CARGO_BIN_EXE_hotprefix-engine"))
        .args([
            "--model",
            "random:tiny",
            "--backend",
            "cpu",
            "--threads",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--device-cache-tokens",
            "2048",
            "--host-cache-tokens",
            "4096",
            "--shutdown-grace-s",
            "2",
            "--service",
            SERVICE,
            "--replica-id",
            "bin-0",
        ])
        .env("HOTPREFIX_REDIS_URL", redis.url_without_password())
        .env("HOTPREFIX_REDIS_PASSWORD", PASSWORD)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let (info, ..) = replica_keys("bin-0");
    let deadline = Instant::now() + BINARY_WAIT;
    let reg = loop {
        if let Some(b) = get(&mut con, &info).await {
            break registration(&b);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the engine exited ({status}):\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "no registration from the binary");
        tokio::time::sleep(POLL).await;
    };
    // The default advertised URL is the bound address: the replica answers there.
    let addr: SocketAddr = reg.url.strip_prefix("http://").unwrap().parse().unwrap();
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    let (status, _) = http(addr, "GET", "/health", None).await;
    assert_eq!(status, 200);
    complete(addr, &prompt(2, 5)).await;

    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    expect_announcement(&mut news, "leave", |a| {
        *a == Announcement::Left(ReplicaId::parse("bin-0").unwrap())
    })
    .await;
    let deadline = Instant::now() + BINARY_WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the engine did not exit on SIGTERM"
        );
        tokio::time::sleep(POLL).await;
    };
    let text = std::fs::read_to_string(&out_path).unwrap();
    let _ = std::fs::remove_file(&out_path);
    assert!(status.success(), "exit {status}:\n{text}");
    assert_left(&mut con, "bin-0").await;
    assert!(text.contains("left Redis"), "{text}");
    assert!(!text.contains(PASSWORD), "the password was logged:\n{text}");
}

/// The scheduler's count of tokens still to prefill, which the load report carries: a queued
/// prompt counts what its cached prefix does not cover, a running one what it has not computed
/// yet, a decoding one nothing.
#[test]
fn pending_prefill_tokens_count_what_is_not_yet_prefilled() {
    let model = LlamaModel::random(LlamaConfig::preset("tiny").unwrap(), 1);
    let mut backend = CpuBackend::new();
    let decoder = Decoder::new(model, &mut backend).unwrap();
    let mut cfg = SchedulerConfig::new(BLOCK, 64, 0, Salt(1));
    cfg.max_batch_tokens = 16;
    let mut s = Scheduler::new(cfg, decoder, backend, Arc::new(EngineMetrics::new("t"))).unwrap();
    let mut streams = Vec::new();
    for (len, seed) in [(40usize, 1u32), (20, 2)] {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        streams.push(rx);
        s.submit(Request {
            id: format!("p{seed}"),
            prompt: prompt(len.div_ceil(BLOCK), seed)[..len].to_vec(),
            max_tokens: 4,
            sampling: SamplingParams::greedy(),
            stop_tokens: Vec::new(),
            events: tx,
        })
        .unwrap();
    }
    assert_eq!(s.pending_prefill_tokens(), 60);
    // One step of 16 tokens prefills the first 16 of the first prompt.
    s.step();
    assert_eq!(s.pending_prefill_tokens(), 44);
    let mut last = 44;
    let mut steps = 0;
    while s.has_work() {
        s.step();
        let now = s.pending_prefill_tokens();
        assert!(now <= last, "{now} after {last}");
        last = now;
        steps += 1;
        assert!(steps < 100, "the requests never finished");
    }
    assert_eq!(s.pending_prefill_tokens(), 0);
    // The first prompt again: its two full blocks that can be matched (the last token is
    // always computed) are cached, so only the other 8 tokens are pending while it waits.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    streams.push(rx);
    s.submit(Request {
        id: "again".into(),
        prompt: prompt(40usize.div_ceil(BLOCK), 1)[..40].to_vec(),
        max_tokens: 1,
        sampling: SamplingParams::greedy(),
        stop_tokens: Vec::new(),
        events: tx,
    })
    .unwrap();
    assert_eq!(s.pending_prefill_tokens(), 40 - 2 * BLOCK);
    while s.has_work() {
        s.step();
    }
    assert_eq!(s.pending_prefill_tokens(), 0);
    s.check_idle().unwrap();
}

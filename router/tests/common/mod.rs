//! Helpers shared by the router's in-process integration tests: a real engine (`random:tiny`)
//! and a real router on loopback ports, and a minimal HTTP/1.1 client that shows exactly what a
//! client receives.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use hotprefix_engine::config::EngineArgs;
use hotprefix_router::config::RouterArgs;
use hotprefix_router::launch::{Launched, launch};
use hotprefix_router::server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// An engine serving `random:tiny` on a loopback port until dropped.
pub struct Engine {
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

pub async fn engine() -> Engine {
    let cfg = EngineArgs::try_parse_from([
        "hotprefix-engine",
        "--model",
        "random:tiny",
        "--backend",
        "cpu",
        "--device-cache-tokens",
        "4096",
    ])
    .unwrap()
    .validate()
    .unwrap();
    let state = hotprefix_engine::launch::launch(&cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(hotprefix_engine::server::run(
        listener,
        state,
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(1),
    ));
    Engine { addr, _stop: tx }
}

/// A router on a loopback port, serving until dropped; `launched` stops its background tasks.
pub struct Router {
    pub addr: SocketAddr,
    pub launched: Option<Launched>,
    _stop: oneshot::Sender<()>,
}

/// A router with `--listen 127.0.0.1:0` and the given flags.
pub async fn router(extra: &[&str]) -> Router {
    let mut args = vec!["hotprefix-router", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let cfg = RouterArgs::try_parse_from(args)
        .unwrap()
        .validate()
        .unwrap();
    let launched = launch(&cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(server::run(listener, launched.state.clone(), async move {
        let _ = rx.await;
    }));
    Router {
        addr,
        launched: Some(launched),
        _stop: tx,
    }
}

/// Sends one request (`connection: close`) and returns the whole raw response.
pub async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> String {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    exchange(addr, req.as_bytes()).await
}

/// Writes `request` as it is and returns everything the server sends back until it closes.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out))
        .await
        .expect("response within 60 s")
        .unwrap();
    String::from_utf8_lossy(&out).to_string()
}

/// One exchange: (status, headers with lower-case names, body as sent, possibly chunked).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let text = raw(addr, method, path, headers, body).await;
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

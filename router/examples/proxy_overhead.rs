//! Latency the router adds on loopback: an open-loop load at a fixed request rate against a
//! minimal upstream (it answers a small completion JSON at once), sent directly and through the
//! router, phase after phase in one process; the difference of the latency percentiles is the
//! proxy's overhead (issue 4's goal: p99 added latency under 1 ms at 2k req/s on this 2-core
//! machine). Everything (load generator, router, upstream) shares the machine's cores, as a
//! sidecar router would.
//!
//! Run: `cargo run --release -p hotprefix-router --example proxy_overhead [SECONDS_PER_PHASE]`.
//! The upstream, the router and the load generator each run on their own single-worker runtime
//! (three threads on the machine's cores). Requests are paced in 1 ms ticks (tokio's timer
//! resolution) and each latency is measured from the moment its request is handed to the
//! client, so the generator's own timer lag is not counted on either path. Tracing is set up as
//! the binary sets it up (request spans built and propagated, no exporter).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::routing::post;
use clap::Parser;
use hotprefix_router::config::RouterArgs;
use hotprefix_router::launch::launch;
use hotprefix_router::server::{self, HttpClient, http_client};
use http_body_util::{BodyExt, Full};
use tokio::sync::Mutex;

const BODY: &str = r#"{"model":"m","prompt":"Say hello to the proxy.","max_tokens":8}"#;
const ANSWER: &str = r#"{"id":"cmpl-1","object":"text_completion","created":0,"model":"m","choices":[{"index":0,"text":" hello","finish_reason":"length"}],"usage":{"prompt_tokens":6,"completion_tokens":8,"total_tokens":14}}"#;

/// Runs `f` on a new thread with its own single-worker runtime, returning what it sends back.
fn on_own_runtime<T: Send + 'static>(
    f: impl FnOnce(
        tokio::sync::oneshot::Sender<T>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
    + Send
    + 'static,
) -> Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build();
        if let Ok(rt) = rt {
            rt.block_on(f(tx));
        }
    });
    rx.blocking_recv()
        .context("a server thread failed to start")
}

async fn upstream() -> Result<SocketAddr> {
    let app = axum::Router::new()
        .route(
            "/v1/completions",
            post(|| async { ([("content-type", "application/json")], ANSWER) }),
        )
        .route("/ready", axum::routing::get(|| async { "ready" }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move { axum::serve(l, app).await });
    Ok(addr)
}

/// Sends `rate` requests per second for `secs` seconds to `target`; returns latencies.
async fn phase(client: &HttpClient, target: SocketAddr, rate: u32, secs: u64) -> Vec<Duration> {
    let lat = Arc::new(Mutex::new(Vec::with_capacity(
        (rate as u64 * secs) as usize,
    )));
    let start = Instant::now();
    let total = rate as u64 * secs;
    let gap = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let at = start + gap * i as u32;
        if at > Instant::now() {
            tokio::time::sleep_until(at.into()).await;
        }
        let (client, lat) = (client.clone(), lat.clone());
        tasks.push(tokio::spawn(async move {
            let at = Instant::now();
            let req = hyper::Request::post(format!("http://{target}/v1/completions"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(BODY.as_bytes())));
            let Ok(req) = req else { return };
            if let Ok(resp) = client.request(req).await
                && resp.status().is_success()
                && resp.into_body().collect().await.is_ok()
            {
                lat.lock().await.push(at.elapsed());
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut v = std::mem::take(&mut *lat.lock().await);
    v.sort();
    v
}

fn pct(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn main() -> Result<()> {
    // As the binary does: logs at `info` (nothing per request) and an SDK tracer provider, so
    // every proxied request builds its spans and propagates its trace context; no exporter.
    let _telemetry = hotprefix_engine::telemetry::init("hotprefix-router", false, None)?;
    let secs: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("SECONDS_PER_PHASE must be a number")?
        .unwrap_or(5);
    let up: SocketAddr = on_own_runtime(|tx| {
        Box::pin(async move {
            if let Ok(addr) = upstream().await {
                let _ = tx.send(addr);
                std::future::pending::<()>().await;
            }
        })
    })?;
    let router: SocketAddr = on_own_runtime(move |tx| {
        Box::pin(async move {
            let Ok(cfg) = RouterArgs::try_parse_from([
                "hotprefix-router",
                "--listen",
                "127.0.0.1:0",
                "--replicas",
                &format!("http://{up}"),
            ])
            .map_err(anyhow::Error::from)
            .and_then(|a| Ok(a.validate()?)) else {
                return;
            };
            let Ok(launched) = launch(&cfg) else { return };
            let Ok(l) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
                return;
            };
            let Ok(addr) = l.local_addr() else { return };
            let _ = tx.send(addr);
            let _ = server::run(l, launched.state.clone(), std::future::pending()).await;
        })
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = http_client(Duration::from_secs(1));
        // Warm both paths' connection pools.
        phase(&client, up, 500, 1).await;
        phase(&client, router, 500, 1).await;
        println!("| req/s | direct p50 | direct p99 | via router p50 | via router p99 | added p50 | added p99 | completed (direct/router) |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        for rate in [1000u32, 2000, 5000] {
            let d = phase(&client, up, rate, secs).await;
            let r = phase(&client, router, rate, secs).await;
            let us = |x: Duration| x.as_secs_f64() * 1e6;
            println!(
                "| {rate} | {:.0} us | {:.0} us | {:.0} us | {:.0} us | {:.0} us | {:.0} us | {}/{} of {} |",
                us(pct(&d, 0.5)),
                us(pct(&d, 0.99)),
                us(pct(&r, 0.5)),
                us(pct(&r, 0.99)),
                us(pct(&r, 0.5)) - us(pct(&d, 0.5)),
                us(pct(&r, 0.99)) - us(pct(&d, 0.99)),
                d.len(),
                r.len(),
                u64::from(rate) * secs
            );
        }
        Ok(())
    })
}

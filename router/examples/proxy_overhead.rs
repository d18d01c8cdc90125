//! Latency the router adds on loopback: an open-loop load at a fixed request rate against a
//! minimal upstream (it answers a small completion JSON at once), sent directly and through the
//! router, phase after phase in one process; the difference of the latency percentiles is the
//! proxy's overhead (issue 4's goal: p99 added latency under 1 ms at 2k req/s on this 2-core
//! machine). Everything (load generator, router, upstream) shares the machine's cores, as a
//! sidecar router would.
//!
//! Run: `cargo run --release -p hotprefix-router --example proxy_overhead [SECONDS_PER_PHASE]`.
//! Latency is measured from each request's scheduled send time, so a stalled sender counts.

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
        tokio::time::sleep_until(at.into()).await;
        let (client, lat) = (client.clone(), lat.clone());
        tasks.push(tokio::spawn(async move {
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
    let secs: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("SECONDS_PER_PHASE must be a number")?
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let up = upstream().await?;
        let cfg = RouterArgs::try_parse_from([
            "hotprefix-router",
            "--listen",
            "127.0.0.1:0",
            "--replicas",
            &format!("http://{up}"),
        ])?
        .validate()?;
        let launched = launch(&cfg)?;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let router = l.local_addr()?;
        let state = launched.state.clone();
        tokio::spawn(async move { server::run(l, state, std::future::pending()).await });
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
        launched.stop().await;
        Ok(())
    })
}

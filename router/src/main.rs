//! `hotprefix-router`: routes OpenAI-style requests to HotPrefix engine replicas until SIGINT
//! or SIGTERM, then lets in-flight requests finish.

use anyhow::Context;
use clap::Parser;
use hotprefix_engine::telemetry;
use hotprefix_router::config::RouterArgs;
use hotprefix_router::launch::launch;
use hotprefix_router::server;

fn main() -> anyhow::Result<()> {
    let cfg = RouterArgs::parse().validate()?;
    // Held to the end of `main`: dropping it exports the last spans.
    let _telemetry = telemetry::init(
        "hotprefix-router",
        cfg.json_logs,
        cfg.otlp_endpoint.as_deref(),
    )
    .context("setting up logs and traces")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let launched = launch(&cfg).context("starting the router")?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        tracing::info!(
            listen = %listener.local_addr()?,
            policy = %cfg.policy.kind,
            redis = cfg.redis.as_ref().map(|r| r.shown_url()).unwrap_or_default(),
            replicas = cfg.replicas.len(),
            "routing"
        );
        let served = server::run(
            listener,
            launched.state.clone(),
            hotprefix_telemetry::shutdown_signal(),
        )
        .await;
        launched.stop().await;
        served.context("serving HTTP")
    })
}

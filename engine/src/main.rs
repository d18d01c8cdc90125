//! `hotprefix-engine`: loads a model and serves the OpenAI-compatible API until SIGINT or
//! SIGTERM, then drains in-flight requests within the grace period. With `--redis-url` it also
//! publishes its registration, load and hotness summary for routers, and leaves Redis as soon as
//! the shutdown starts.

use anyhow::Context;
use clap::Parser;
use hotprefix_engine::config::EngineArgs;
use hotprefix_engine::launch::{self, launch_engine};
use hotprefix_engine::publish::RedisTarget;
use hotprefix_engine::telemetry;

fn main() -> anyhow::Result<()> {
    let cfg = EngineArgs::parse().validate()?;
    // Held to the end of `main`: dropping it exports the last spans.
    let _telemetry = telemetry::init(
        "hotprefix-engine",
        cfg.json_logs,
        cfg.otlp_endpoint.as_deref(),
    )
    .context("setting up logs and traces")?;
    // Checked again here (config validation already built it once) to keep the client.
    let target = match &cfg.publish {
        Some(p) => Some(
            RedisTarget::new(&p.url, p.password.as_ref(), p.ca_file.as_deref())
                .context("setting up Redis publishing")?,
        ),
        None => None,
    };
    let launched = launch_engine(&cfg).context("starting the engine")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        // The HTTP side only parses, tokenises and streams; compute runs on rayon's threads.
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        launch::serve(
            &cfg,
            launched,
            target,
            listener,
            hotprefix_telemetry::shutdown_signal(),
        )
        .await
        .context("serving HTTP")
    })
}

//! Builds a serving engine from a validated [`EngineConfig`]: threads, backend, model,
//! decoder, scheduler, engine thread and the HTTP state. The binary and the HTTP tests share it.

use std::sync::Arc;

use hotprefix_protocol::Salt;
use thiserror::Error;

use crate::backend::cpu::CpuBackend;
use crate::backend::{BackendError, BackendKind, kv_block_bytes};
use crate::config::EngineConfig;
use crate::decoder::Decoder;
use crate::engine::EngineHandle;
use crate::metrics::EngineMetrics;
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerError};
use crate::server::AppState;
use crate::source::{self, SourceError};

/// Why the engine could not start.
#[derive(Debug, Error)]
pub enum LaunchError {
    /// The model could not be loaded.
    #[error(transparent)]
    Model(#[from] SourceError),
    /// The backend refused.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The scheduler or cache refused its configuration.
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// The engine thread could not be started.
    #[error("cannot start the engine thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// What a launched engine serves, as its Redis registration advertises it: routers hash
/// requests with exactly this salt and block size, so they name prefixes as the cache does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// The served model id (as in `/v1/models`).
    pub model: String,
    /// Tokens per KV block.
    pub block_size: usize,
    /// The salt of the scheduler's block hashes.
    pub salt: Salt,
}

/// A started engine: the HTTP state and what it serves.
#[derive(Clone, Debug)]
pub struct Launched {
    /// The state the HTTP server runs on.
    pub state: AppState,
    /// What the engine serves, for publishing.
    pub served: Served,
}

/// Loads the model and starts the engine thread; the returned state serves HTTP.
pub fn launch(cfg: &EngineConfig) -> Result<AppState, LaunchError> {
    launch_engine(cfg).map(|l| l.state)
}

/// [`launch`], also returning what the engine serves (model id, block size, hash salt).
pub fn launch_engine(cfg: &EngineConfig) -> Result<Launched, LaunchError> {
    if let Some(n) = cfg.threads {
        // Only the first configuration of the global pool takes effect (tests launch several
        // engines in one process); later ones keep the existing pool.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    match cfg.backend {
        BackendKind::Cpu => {}
        BackendKind::Auto => {
            tracing::info!("backend auto: this build has no CUDA backend; using the CPU");
        }
        BackendKind::Cuda => {
            return Err(BackendError::Unavailable(
                "--backend cuda: this build has no CUDA backend (use cpu or auto)".into(),
            )
            .into());
        }
    }
    let started = std::time::Instant::now();
    let loaded = source::load(&cfg.model)?;
    let id = cfg
        .served_model_name
        .clone()
        .unwrap_or_else(|| loaded.id.clone());
    let mcfg = loaded.model.cfg.clone();
    let block_bytes = kv_block_bytes(&mcfg, cfg.block_size);
    tracing::info!(
        model = %cfg.model,
        served_as = %id,
        layers = mcfg.layers,
        hidden = mcfg.hidden,
        vocab = mcfg.vocab,
        context = mcfg.context,
        device_kv_mib = block_bytes * u64::from(cfg.device_blocks) / (1 << 20),
        host_kv_mib = block_bytes * u64::from(cfg.host_blocks) / (1 << 20),
        load_s = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    let mut backend = CpuBackend::new();
    let decoder = Decoder::new(loaded.model, &mut backend)?;
    let metrics = Arc::new(EngineMetrics::new(&id));
    // Block hashes name the model, so caches (and routers) never mix two models' KV.
    let salt = Salt::new(&loaded.id, None, None);
    let mut sc = SchedulerConfig::new(cfg.block_size, cfg.device_blocks, cfg.host_blocks, salt);
    sc.policy = cfg.policy;
    sc.hotness = cfg.hotness.clone();
    sc.max_running = cfg.max_running;
    sc.max_batch_tokens = cfg.max_batch_tokens;
    sc.max_waiting = cfg.max_waiting;
    let scheduler = Scheduler::new(sc, decoder, backend, Arc::clone(&metrics))?;
    let engine = EngineHandle::start(scheduler, metrics)?;
    let served = Served {
        model: id.clone(),
        block_size: cfg.block_size,
        salt,
    };
    let state = AppState::new(
        engine,
        loaded.tokenizer,
        loaded.chat,
        id,
        loaded.stop_tokens,
    );
    Ok(Launched { state, served })
}

/// Serves `launched` on `listener` until `shutdown` resolves, publishing to Redis when
/// `publish` is given, then drains in-flight requests within the configured grace period. The
/// publisher leaves Redis as soon as the shutdown starts, not after the drain, so routers stop
/// choosing this replica while it finishes its requests. The binary's `main` is this plus
/// logging and signals; tests that run an engine as a separate process call it too.
pub async fn serve(
    cfg: &EngineConfig,
    launched: Launched,
    publish: Option<crate::publish::RedisTarget>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let bound = listener.local_addr()?;
    let state = launched.state;
    tracing::info!(listen = %bound, model = %state.model_id, "serving");
    let publisher = match (publish, &cfg.publish) {
        (Some(target), Some(p)) => Some(
            crate::publish::Publisher::new(target, p, &launched.served, bound)
                .spawn(state.engine.clone()),
        ),
        _ => None,
    };
    let stopper = publisher.as_ref().map(|p| p.stopper());
    let shutdown = async move {
        shutdown.await;
        if let Some(s) = stopper {
            s.stop();
        }
    };
    let served = crate::server::run(listener, state, shutdown, cfg.shutdown_grace).await;
    if let Some(p) = publisher {
        p.shutdown().await;
    }
    served
}

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

/// Loads the model and starts the engine thread; the returned state serves HTTP.
pub fn launch(cfg: &EngineConfig) -> Result<AppState, LaunchError> {
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
    let mut sc = SchedulerConfig::new(
        cfg.block_size,
        cfg.device_blocks,
        cfg.host_blocks,
        // Block hashes name the model, so caches (and routers) never mix two models' KV.
        Salt::new(&loaded.id, None, None),
    );
    sc.policy = cfg.policy;
    sc.hotness = cfg.hotness.clone();
    sc.max_running = cfg.max_running;
    sc.max_batch_tokens = cfg.max_batch_tokens;
    sc.max_waiting = cfg.max_waiting;
    let scheduler = Scheduler::new(sc, decoder, backend, Arc::clone(&metrics))?;
    let engine = EngineHandle::start(scheduler, metrics)?;
    Ok(AppState::new(
        engine,
        loaded.tokenizer,
        loaded.chat,
        id,
        loaded.stop_tokens,
    ))
}

//! Builds a serving engine from a validated [`EngineConfig`]: threads, backend, model,
//! decoder, scheduler, engine thread and the HTTP state. The binary and the HTTP tests share it.

use std::sync::Arc;

use hotprefix_protocol::Salt;
use thiserror::Error;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, BackendError, BackendKind, kv_block_bytes};
use crate::config::EngineConfig;
use crate::decoder::Decoder;
use crate::engine::EngineHandle;
use crate::metrics::EngineMetrics;
use crate::model::LlamaConfig;
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerError};
use crate::server::AppState;
use crate::source::{self, LoadedModel, SourceError};

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
    // The GPU is opened before the weights load, so `--backend cuda` on a machine without one
    // fails in a second, not after minutes of loading.
    let cuda = match cfg.backend {
        BackendKind::Cpu => None,
        BackendKind::Cuda => Some(CudaBackend::new(cfg.cuda).map_err(|e| match e {
            BackendError::Unavailable(why) => {
                BackendError::Unavailable(format!("--backend cuda: {why}"))
            }
            other => other,
        })?),
        BackendKind::Auto => match CudaBackend::new(cfg.cuda) {
            Ok(b) => Some(b),
            Err(BackendError::Unavailable(why)) => {
                tracing::info!(reason = %why, "backend auto: no usable GPU; using the CPU");
                None
            }
            // A GPU that is there but fails is an error, not a reason to serve a hundred
            // times slower on the CPU.
            Err(e) => return Err(e.into()),
        },
    };
    let started = std::time::Instant::now();
    let mut loaded = source::load(&cfg.model)?;
    source::apply_chat_template(&mut loaded.chat, cfg.chat_template.as_ref())?;
    if let Some(t) = &cfg.chat_template {
        tracing::info!(file = %t.path.display(), "chat template: --chat-template replaces the model's");
    }
    let load_s = started.elapsed().as_secs_f64();
    match cuda {
        Some(backend) => start(cfg, loaded, backend, load_s, |b, m, block_bytes| {
            cuda_device_blocks(cfg, b, m, block_bytes)
        }),
        None => start(cfg, loaded, CpuBackend::new(), load_s, |_, _, _| {
            Ok(cfg.device_blocks)
        }),
    }
}

/// Uploads the weights into `backend`, sizes the device tier with `device_blocks` (called once
/// the weights are in, so a GPU backend can see what memory is left), and starts the scheduler,
/// the engine thread and the HTTP state.
fn start<B: Backend + 'static>(
    cfg: &EngineConfig,
    loaded: LoadedModel,
    mut backend: B,
    load_s: f64,
    device_blocks: impl FnOnce(&B, &LlamaConfig, u64) -> Result<u32, LaunchError>,
) -> Result<Launched, LaunchError> {
    let id = cfg
        .served_model_name
        .clone()
        .unwrap_or_else(|| loaded.id.clone());
    let mcfg = loaded.model.cfg.clone();
    let block_bytes = kv_block_bytes(&mcfg, cfg.block_size, backend.kv_value_bytes());
    let decoder = Decoder::new(loaded.model, &mut backend)?;
    let device_blocks = device_blocks(&backend, &mcfg, block_bytes)?;
    tracing::info!(
        model = %cfg.model,
        served_as = %id,
        backend = backend.name(),
        layers = mcfg.layers,
        hidden = mcfg.hidden,
        vocab = mcfg.vocab,
        context = mcfg.context,
        device_kv_blocks = device_blocks,
        device_kv_mib = block_bytes * u64::from(device_blocks) / (1 << 20),
        host_kv_mib = block_bytes * u64::from(cfg.host_blocks) / (1 << 20),
        load_s,
        "model loaded"
    );
    let metrics = Arc::new(EngineMetrics::new(&id));
    // Block hashes name the model, so caches (and routers) never mix two models' KV.
    let salt = Salt::new(&loaded.id, None, None);
    let mut sc = SchedulerConfig::new(cfg.block_size, device_blocks, cfg.host_blocks, salt);
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

/// Device memory kept back from the KV tier for one step's activations (f32 and bf16 copies of
/// every intermediate of `max_batch_tokens` rows, logits of `max_running` rows, attention
/// partial sums), cuBLAS's workspace and allocator slack.
fn activation_reserve(m: &LlamaConfig, max_batch_tokens: usize, max_running: usize) -> u64 {
    let qd = m.heads * m.head_dim;
    let row = 3 * m.hidden + 2 * qd + 2 * m.kv_dim() + 2 * m.ffn;
    let step = (max_batch_tokens * row * 6) as u64;
    let logits = (max_running * (m.vocab + m.hidden) * 6 * 2) as u64;
    // Twice the step (two steps' tensors may coexist in the stream-ordered pool) and a fixed
    // 512 MiB for the CUDA context's own use, cuBLAS and partial sums.
    2 * (step + logits) + (512 << 20)
}

/// The device tier's blocks on CUDA: as configured, or what `--gpu-memory-fraction` of the
/// device leaves after the weights (already uploaded) and the activation reserve.
fn cuda_device_blocks(
    cfg: &EngineConfig,
    b: &CudaBackend,
    m: &LlamaConfig,
    block_bytes: u64,
) -> Result<u32, LaunchError> {
    if !cfg.device_blocks_auto {
        return Ok(cfg.device_blocks);
    }
    let (free, total) = b.memory()?;
    let budget = (total as f64 * cfg.gpu_memory_fraction) as u64;
    let used = total.saturating_sub(free) as u64;
    let reserve = activation_reserve(m, cfg.max_batch_tokens, cfg.max_running);
    let kv = budget.saturating_sub(used).saturating_sub(reserve);
    let blocks = (kv / block_bytes.max(1)).min(u64::from(u32::MAX)) as u32;
    if blocks < 2 {
        let gib = |v: u64| v as f64 / (1u64 << 30) as f64;
        return Err(BackendError::Alloc(format!(
            "--gpu-memory-fraction {}: {:.1} GiB of {:.1} GiB leaves no room for the KV cache \
             (weights and context take {:.1} GiB, activations {:.1} GiB); raise the fraction or \
             set --device-cache-tokens",
            cfg.gpu_memory_fraction,
            gib(budget),
            gib(total as u64),
            gib(used),
            gib(reserve)
        ))
        .into());
    }
    Ok(blocks)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_activation_reserve_grows_with_the_batch_and_covers_the_fixed_overheads() {
        let m = LlamaConfig::preset("llama-3.1-8b").unwrap();
        let small = activation_reserve(&m, 512, 16);
        let big = activation_reserve(&m, 8192, 256);
        assert!(small > 512 << 20 && small < 2 << 30, "{small}");
        assert!(big > 4 * small, "{big} vs {small}");
    }
}

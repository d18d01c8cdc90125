//! The engine's one configuration path: command-line flags (each also readable from a
//! `HOTPREFIX_*` environment variable) parsed by clap into [`EngineArgs`], then checked and
//! turned into the validated [`EngineConfig`] the components are built from.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use hotprefix_cache::{HotnessConfig, PolicyKind};
use thiserror::Error;

use crate::backend::BackendKind;
use crate::source::ModelSource;

/// A flag value out of range or inconsistent with another.
#[derive(Debug, Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// `hotprefix-engine` flags.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "hotprefix-engine",
    version,
    about = "HotPrefix inference engine: an OpenAI-compatible server with a two-tier, \
             hotness-aware prefix KV cache"
)]
pub struct EngineArgs {
    /// Model: a .gguf file, a Hugging Face directory, or random:<preset> (tiny,
    /// smollm2-135m, llama-3.1-8b).
    #[arg(long, env = "HOTPREFIX_MODEL")]
    pub model: String,
    /// Address to listen on.
    #[arg(long, env = "HOTPREFIX_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Compute backend: cpu, cuda, or auto (CUDA when usable, else CPU).
    #[arg(long, env = "HOTPREFIX_BACKEND", default_value = "auto")]
    pub backend: BackendKind,
    /// Prefix cache policy: hotprefix, lru, lru-offload, reuse-offload.
    #[arg(long, env = "HOTPREFIX_POLICY", default_value = "hotprefix")]
    pub policy: PolicyKind,
    /// Tokens of KV the device tier holds.
    #[arg(long, env = "HOTPREFIX_DEVICE_CACHE_TOKENS", default_value_t = 16_384)]
    pub device_cache_tokens: usize,
    /// Tokens of KV the host tier holds (0: no host tier).
    #[arg(long, env = "HOTPREFIX_HOST_CACHE_TOKENS", default_value_t = 65_536)]
    pub host_cache_tokens: usize,
    /// Tokens per KV block.
    #[arg(long, env = "HOTPREFIX_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Requests running at once.
    #[arg(long, env = "HOTPREFIX_MAX_RUNNING", default_value_t = 16)]
    pub max_running: usize,
    /// Tokens (prefill chunks and decode tokens) per forward step.
    #[arg(long, env = "HOTPREFIX_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Requests allowed to wait; beyond it requests get 429.
    #[arg(long, env = "HOTPREFIX_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// Name the model is served under (default: derived from the model).
    #[arg(long, env = "HOTPREFIX_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Compute threads (default: all cores).
    #[arg(long, env = "HOTPREFIX_THREADS")]
    pub threads: Option<usize>,
    /// Hotness half-life in cache turnovers (churn clock).
    #[arg(long, env = "HOTPREFIX_HALF_LIFE_TURNOVERS", default_value_t = 2.0)]
    pub half_life_turnovers: f64,
    /// Minimum hotness for a device-evicted block to be admitted to the host tier.
    #[arg(long, env = "HOTPREFIX_ADMISSION_FLOOR", default_value_t = 0.5)]
    pub admission_floor: f64,
    /// Seconds between promotions of hot host-only prefixes.
    #[arg(long, env = "HOTPREFIX_PROMOTION_INTERVAL_S", default_value_t = 1.0)]
    pub promotion_interval_s: f64,
    /// Bytes one promotion round may move host to device (0: promotion off).
    #[arg(long, env = "HOTPREFIX_PROMOTION_BUDGET_BYTES", default_value_t = 0)]
    pub promotion_budget_bytes: u64,
    /// Seconds in-flight requests get to finish after a shutdown signal.
    #[arg(long, env = "HOTPREFIX_SHUTDOWN_GRACE_S", default_value_t = 30)]
    pub shutdown_grace_s: u64,
    /// Log format: text or json.
    #[arg(long, env = "HOTPREFIX_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where the model comes from.
    pub model: ModelSource,
    /// Listen address.
    pub listen: SocketAddr,
    /// Backend.
    pub backend: BackendKind,
    /// Cache policy.
    pub policy: PolicyKind,
    /// Hotness knobs.
    pub hotness: HotnessConfig,
    /// Tokens per block.
    pub block_size: usize,
    /// Device tier blocks.
    pub device_blocks: u32,
    /// Host tier blocks.
    pub host_blocks: u32,
    /// Running requests at most.
    pub max_running: usize,
    /// Tokens per step at most.
    pub max_batch_tokens: usize,
    /// Waiting requests at most.
    pub max_waiting: usize,
    /// Served name override.
    pub served_model_name: Option<String>,
    /// Compute threads.
    pub threads: Option<usize>,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
    /// JSON logs.
    pub json_logs: bool,
}

impl EngineArgs {
    /// Checks every value and builds the configuration.
    pub fn validate(self) -> Result<EngineConfig, ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        let model: ModelSource = self
            .model
            .parse()
            .map_err(|e| ConfigError(format!("--model: {e}")))?;
        if !(1..=1024).contains(&self.block_size) {
            return bad(format!("--block-size {} not in 1..=1024", self.block_size));
        }
        let blocks = |tokens: usize, flag: &str| -> Result<u32, ConfigError> {
            u32::try_from(tokens / self.block_size)
                .map_err(|_| ConfigError(format!("{flag} {tokens} is too large")))
        };
        let device_blocks = blocks(self.device_cache_tokens, "--device-cache-tokens")?;
        let host_blocks = blocks(self.host_cache_tokens, "--host-cache-tokens")?;
        if device_blocks < 2 {
            return bad(format!(
                "--device-cache-tokens {} gives fewer than 2 blocks of {}",
                self.device_cache_tokens, self.block_size
            ));
        }
        if self.max_running == 0 || self.max_batch_tokens < self.max_running {
            return bad(format!(
                "--max-running {} must be at least 1 and at most --max-batch-tokens {}",
                self.max_running, self.max_batch_tokens
            ));
        }
        if self.threads == Some(0) {
            return bad("--threads must be at least 1".into());
        }
        let json_logs = match self.log_format.as_str() {
            "text" => false,
            "json" => true,
            other => return bad(format!("--log-format {other:?}: expected text or json")),
        };
        let hotness = HotnessConfig {
            half_life_turnovers: Some(self.half_life_turnovers),
            admission_floor: self.admission_floor,
            promotion_interval_s: self.promotion_interval_s,
            promotion_budget_bytes: self.promotion_budget_bytes,
            ..HotnessConfig::default()
        };
        // The cache checks its own knobs; do it here so a bad flag fails at start-up.
        let mut probe = hotprefix_cache::CacheConfig::new(
            self.policy,
            self.block_size,
            1,
            device_blocks,
            host_blocks,
        );
        probe.hotness = hotness.clone();
        probe.validate().map_err(|e| ConfigError(e.to_string()))?;
        Ok(EngineConfig {
            model,
            listen: self.listen,
            backend: self.backend,
            policy: self.policy,
            hotness,
            block_size: self.block_size,
            device_blocks,
            host_blocks,
            max_running: self.max_running,
            max_batch_tokens: self.max_batch_tokens,
            max_waiting: self.max_waiting,
            served_model_name: self.served_model_name,
            threads: self.threads,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_s),
            json_logs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<EngineConfig, String> {
        let mut all = vec!["hotprefix-engine", "--model", "random:tiny"];
        all.extend_from_slice(args);
        EngineArgs::try_parse_from(all)
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(
            (c.block_size, c.device_blocks, c.host_blocks),
            (16, 1024, 4096)
        );
        assert_eq!(c.policy, PolicyKind::HotPrefix);
        assert_eq!(
            (c.max_running, c.max_batch_tokens, c.max_waiting),
            (16, 512, 256)
        );
        assert!(!c.json_logs);
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        for (args, needle) in [
            (&["--block-size", "0"][..], "--block-size"),
            (
                &["--device-cache-tokens", "16"][..],
                "--device-cache-tokens",
            ),
            (&["--max-running", "600"][..], "--max-running"),
            (&["--threads", "0"][..], "--threads"),
            (&["--log-format", "xml"][..], "--log-format"),
            (&["--policy", "fifo"][..], "fifo"),
            (&["--backend", "tpu"][..], "tpu"),
            (&["--listen", "nowhere"][..], "--listen"),
            (&["--admission-floor=-1"][..], "admission"),
        ] {
            let e = parse(args).expect_err(needle);
            assert!(e.contains(needle), "{args:?}: {e}");
        }
        let e = EngineArgs::try_parse_from(["hotprefix-engine", "--model", "random:gpt-9"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("--model"), "{e}");
    }
}

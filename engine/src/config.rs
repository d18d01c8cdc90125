//! The engine's one configuration path: command-line flags (each also readable from a
//! `HOTPREFIX_*` environment variable) parsed by clap into [`EngineArgs`], then checked and
//! turned into the validated [`EngineConfig`] the components are built from.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use hotprefix_cache::{HotnessConfig, PolicyKind};
use hotprefix_protocol::ReplicaId;
use hotprefix_protocol::cluster::{DEFAULT_SUMMARY_ENTRIES, Keys, MAX_SUMMARY_ENTRIES};
use thiserror::Error;

use crate::backend::BackendKind;
use crate::backend::cuda::plan::AttentionChoice;
use crate::backend::cuda::{CudaOptions, KvCopyMode};
use crate::publish::{PublishConfig, RedisTarget, RedisUrl, Secret};
use crate::source::{ChatTemplateFile, ModelSource};

/// Device-tier tokens when --device-cache-tokens is not given on the CPU backend.
pub const DEFAULT_DEVICE_CACHE_TOKENS: usize = 16_384;

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
    /// Jinja chat template file replacing the model's own (default: the model's template, or
    /// ChatML when it has none). The router must be given the same file.
    #[arg(long, env = "HOTPREFIX_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "HOTPREFIX_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Compute backend: cpu, cuda, or auto (CUDA when usable, else CPU).
    #[arg(long, env = "HOTPREFIX_BACKEND", default_value = "auto")]
    pub backend: BackendKind,
    /// Prefix cache policy: hotprefix, lru, lru-offload, reuse-offload.
    #[arg(long, env = "HOTPREFIX_POLICY", default_value = "hotprefix")]
    pub policy: PolicyKind,
    /// Tokens of KV the device tier holds (default: 16,384 on the CPU; on CUDA, what
    /// --gpu-memory-fraction leaves after the weights and activations).
    #[arg(long, env = "HOTPREFIX_DEVICE_CACHE_TOKENS")]
    pub device_cache_tokens: Option<usize>,
    /// CUDA: fraction of the GPU's memory the engine may use in all (weights, activations and
    /// the device KV tier), when --device-cache-tokens is not given.
    #[arg(long, env = "HOTPREFIX_GPU_MEMORY_FRACTION", default_value_t = 0.9)]
    pub gpu_memory_fraction: f64,
    /// CUDA attention kernel: auto (tensor cores for prefill, CUDA cores for decode), simple
    /// or mma.
    #[arg(long, env = "HOTPREFIX_CUDA_ATTENTION", default_value = "auto")]
    pub cuda_attention: AttentionChoice,
    /// CUDA: how host-tier copies move bytes: memcpy (the copy engines) or kernel (a copy
    /// kernel reading the pinned arena in place).
    #[arg(long, env = "HOTPREFIX_KV_COPY", default_value = "memcpy")]
    pub kv_copy: KvCopyMode,
    /// CUDA: overlap host-tier loads with compute layer by layer (true or false).
    #[arg(long, env = "HOTPREFIX_LAYER_OVERLAP", default_value_t = true, action = clap::ArgAction::Set)]
    pub layer_overlap: bool,
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
    /// Redis to publish this replica's registration, load and hotness summary to, for routers:
    /// redis://[user:password@]host[:port][/db] or rediss://... (TLS). Without it nothing is
    /// published.
    #[arg(long, env = "HOTPREFIX_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<RedisUrl>,
    /// Redis password, overriding the one in --redis-url (e.g. from a Kubernetes Secret).
    #[arg(long, env = "HOTPREFIX_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<Secret>,
    /// PEM file of the CA certificates to trust for rediss:// instead of the system's roots.
    #[arg(long, env = "HOTPREFIX_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// Service name: the replicas of one service share the Redis keys
    /// hotprefix:v1:{service}:... ([A-Za-z0-9._-]).
    #[arg(long, env = "HOTPREFIX_SERVICE", default_value = "default")]
    pub service: String,
    /// This replica's id in Redis ([A-Za-z0-9._-]; default: the host name, which is the pod
    /// name in a StatefulSet).
    #[arg(long, env = "HOTPREFIX_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// URL routers reach this replica at (default: http://{listen address}, with 0.0.0.0
    /// replaced by 127.0.0.1).
    #[arg(long, env = "HOTPREFIX_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Hottest prefix blocks per published hotness summary.
    #[arg(long, env = "HOTPREFIX_SUMMARY_ENTRIES", default_value_t = DEFAULT_SUMMARY_ENTRIES)]
    pub summary_entries: usize,
    /// OpenTelemetry collector to export traces to over OTLP/HTTP (protobuf): its base URL,
    /// http://host:4318 (`/v1/traces` is appended). Without it no spans are exported, but trace
    /// context still propagates and log lines carry trace ids.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where the model comes from.
    pub model: ModelSource,
    /// The chat template replacing the model's (`--chat-template`, read and compiled), or
    /// `None` for the model's own.
    pub chat_template: Option<ChatTemplateFile>,
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
    /// Device tier blocks (the CPU default when `device_blocks_auto`).
    pub device_blocks: u32,
    /// Whether the device tier size was left to the backend (no --device-cache-tokens): the
    /// CUDA backend then sizes it from `gpu_memory_fraction`.
    pub device_blocks_auto: bool,
    /// CUDA: fraction of device memory to use in all.
    pub gpu_memory_fraction: f64,
    /// CUDA backend knobs.
    pub cuda: CudaOptions,
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
    /// Publishing to Redis (`--redis-url` given), or `None`.
    pub publish: Option<PublishConfig>,
    /// OTLP/HTTP collector to export traces to (`--otlp-endpoint`, checked), or `None`.
    pub otlp_endpoint: Option<String>,
}

impl EngineArgs {
    /// Checks every value and builds the configuration.
    pub fn validate(self) -> Result<EngineConfig, ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        let model: ModelSource = self
            .model
            .parse()
            .map_err(|e| ConfigError(format!("--model: {e}")))?;
        let chat_template = self
            .chat_template
            .as_deref()
            .map(ChatTemplateFile::read)
            .transpose()
            .map_err(|e| ConfigError(format!("--chat-template: {e}")))?;
        if !(1..=1024).contains(&self.block_size) {
            return bad(format!("--block-size {} not in 1..=1024", self.block_size));
        }
        let blocks = |tokens: usize, flag: &str| -> Result<u32, ConfigError> {
            u32::try_from(tokens / self.block_size)
                .map_err(|_| ConfigError(format!("{flag} {tokens} is too large")))
        };
        let device_tokens = self
            .device_cache_tokens
            .unwrap_or(DEFAULT_DEVICE_CACHE_TOKENS);
        let device_blocks = blocks(device_tokens, "--device-cache-tokens")?;
        let host_blocks = blocks(self.host_cache_tokens, "--host-cache-tokens")?;
        if device_blocks < 2 {
            return bad(format!(
                "--device-cache-tokens {device_tokens} gives fewer than 2 blocks of {}",
                self.block_size
            ));
        }
        if !(self.gpu_memory_fraction > 0.0 && self.gpu_memory_fraction <= 1.0) {
            return bad(format!(
                "--gpu-memory-fraction {} not in (0, 1]",
                self.gpu_memory_fraction
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
        // An empty value (an unset variable in a manifest) means no export, as OpenTelemetry's
        // own variable does.
        let otlp_endpoint = self.otlp_endpoint.filter(|e| !e.trim().is_empty());
        if let Some(e) = &otlp_endpoint {
            crate::telemetry::traces_endpoint(e)
                .map_err(|e| ConfigError(format!("--otlp-endpoint: {e}")))?;
        }
        let publish = match self.redis_url {
            Some(url) => Some(publish_config(
                url,
                self.redis_password,
                self.redis_ca_file,
                &self.service,
                self.replica_id,
                self.advertise_url,
                self.summary_entries,
            )?),
            None => None,
        };
        Ok(EngineConfig {
            model,
            chat_template,
            listen: self.listen,
            backend: self.backend,
            policy: self.policy,
            hotness,
            block_size: self.block_size,
            device_blocks,
            device_blocks_auto: self.device_cache_tokens.is_none(),
            gpu_memory_fraction: self.gpu_memory_fraction,
            cuda: CudaOptions {
                attention: self.cuda_attention,
                kv_copy: self.kv_copy,
                layer_overlap: self.layer_overlap,
            },
            host_blocks,
            max_running: self.max_running,
            max_batch_tokens: self.max_batch_tokens,
            max_waiting: self.max_waiting,
            served_model_name: self.served_model_name,
            threads: self.threads,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_s),
            json_logs,
            publish,
            otlp_endpoint,
        })
    }
}

/// Checks the publishing flags (only read when `--redis-url` is given).
fn publish_config(
    url: RedisUrl,
    password: Option<Secret>,
    ca_file: Option<PathBuf>,
    service: &str,
    replica_id: Option<String>,
    advertise_url: Option<String>,
    summary_entries: usize,
) -> Result<PublishConfig, ConfigError> {
    // Builds (and drops) the client: a malformed URL, a CA file without TLS or an unreadable
    // one fail at start-up, before the model loads. The error texts are already redacted.
    RedisTarget::new(&url, password.as_ref(), ca_file.as_deref())
        .map_err(|e| ConfigError(e.to_string()))?;
    let keys = Keys::new(service).map_err(|e| ConfigError(format!("--service: {e}")))?;
    let replica = match replica_id {
        Some(id) => id,
        None => host_name().ok_or_else(|| {
            ConfigError("--replica-id: the host name is unknown; give an id".into())
        })?,
    };
    let replica =
        ReplicaId::parse(&replica).map_err(|e| ConfigError(format!("--replica-id: {e}")))?;
    if let Some(u) = &advertise_url
        && !(u.starts_with("http://") || u.starts_with("https://"))
    {
        return Err(ConfigError(format!(
            "--advertise-url {u:?}: expected http://host:port or https://..."
        )));
    }
    let advertise_url = advertise_url.map(bracket_ipv6_host);
    if !(1..=MAX_SUMMARY_ENTRIES).contains(&summary_entries) {
        return Err(ConfigError(format!(
            "--summary-entries {summary_entries} not in 1..={MAX_SUMMARY_ENTRIES}"
        )));
    }
    Ok(PublishConfig {
        url,
        password,
        ca_file,
        keys,
        replica,
        advertise_url,
        summary_entries,
    })
}

/// `http://ADDR:PORT` with ADDR a bare IPv6 address, as `http://$(POD_IP):8000` expands on an
/// IPv6 pod, rewritten with the brackets a URL needs (`http://[fd00::7]:8000`); any other URL
/// is returned as it is.
fn bracket_ipv6_host(url: String) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url;
    };
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    match authority.rsplit_once(':') {
        Some((host, port))
            if host.parse::<std::net::Ipv6Addr>().is_ok()
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            format!("{scheme}://[{host}]:{port}{path}")
        }
        _ => url,
    }
}

/// This machine's host name: `$HOSTNAME` (set in every container, the pod name in
/// Kubernetes), else the kernel's (shells do not always export `HOSTNAME`).
fn host_name() -> Option<String> {
    let from_env = std::env::var("HOSTNAME").ok();
    let from_kernel = || {
        ["/proc/sys/kernel/hostname", "/etc/hostname"]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
    };
    from_env
        .or_else(from_kernel)
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
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
        assert!(
            c.device_blocks_auto,
            "CUDA sizes the device tier unless told"
        );
        assert_eq!(c.gpu_memory_fraction, 0.9);
        assert_eq!(c.cuda, CudaOptions::default());
        let c2 = parse(&["--device-cache-tokens", "4096"]).unwrap();
        assert!(!c2.device_blocks_auto && c2.device_blocks == 256);
        let c3 = parse(&[
            "--cuda-attention",
            "simple",
            "--kv-copy",
            "kernel",
            "--layer-overlap",
            "false",
        ])
        .unwrap();
        assert_eq!(
            c3.cuda,
            CudaOptions {
                attention: AttentionChoice::Simple,
                kv_copy: KvCopyMode::Kernel,
                layer_overlap: false
            }
        );
        assert_eq!(c.policy, PolicyKind::HotPrefix);
        assert_eq!(
            (c.max_running, c.max_batch_tokens, c.max_waiting),
            (16, 512, 256)
        );
        assert!(!c.json_logs);
        assert!(
            c.publish.is_none(),
            "nothing is published without --redis-url"
        );
        let c = parse(&["--otlp-endpoint", "http://otel-collector:4318"]).unwrap();
        assert_eq!(
            c.otlp_endpoint.as_deref(),
            Some("http://otel-collector:4318")
        );
        let c = parse(&["--otlp-endpoint", ""]).unwrap();
        assert_eq!(c.otlp_endpoint, None, "an empty endpoint exports nothing");
    }

    #[test]
    fn publishing_flags_are_checked_and_defaulted() {
        let c = parse(&[
            "--redis-url",
            "redis://:pw@127.0.0.1:6379/2",
            "--replica-id",
            "engine-0",
        ])
        .unwrap();
        assert_eq!(c.publish.unwrap().replica.0, "engine-0");
        let Ok(c) = parse(&["--redis-url", "redis://:pw@127.0.0.1:6379/2"]) else {
            // A host whose name is not a valid replica id needs --replica-id; nothing to check.
            assert!(host_name().is_none_or(|h| ReplicaId::parse(&h).is_err()));
            return;
        };
        let p = c.publish.unwrap();
        assert_eq!(p.keys, Keys::new("default").unwrap());
        assert_eq!(p.summary_entries, DEFAULT_SUMMARY_ENTRIES);
        assert_eq!(p.advertise_url, None);
        assert_eq!(
            p.advertise_url("0.0.0.0:8000".parse().unwrap()),
            "http://127.0.0.1:8000"
        );
        assert_eq!(
            Some(p.replica.0),
            host_name(),
            "the default id is the host name"
        );
        let c = parse(&[
            "--redis-url",
            "rediss://user:pw@redis.example:6380",
            "--redis-password",
            "other",
            "--service",
            "chat",
            "--replica-id",
            "engine-3",
            "--advertise-url",
            "http://10.0.0.7:8000",
            "--summary-entries",
            "100",
        ])
        .unwrap();
        let p = c.publish.unwrap();
        assert_eq!(p.keys, Keys::new("chat").unwrap());
        assert_eq!(p.replica.0, "engine-3");
        assert_eq!(p.summary_entries, 100);
        assert_eq!(p.password.as_ref().map(Secret::expose), Some("other"));
        assert_eq!(
            p.advertise_url("127.0.0.1:1".parse().unwrap()),
            "http://10.0.0.7:8000"
        );
        // Neither the URL's password nor the flag's shows in a configuration dump.
        let dump = format!("{p:?}");
        assert!(!dump.contains("pw") && !dump.contains("other"), "{dump}");
    }

    #[test]
    fn an_advertised_ipv6_pod_address_gets_its_brackets() {
        for (given, advertised) in [
            ("http://fd00::7:8000", "http://[fd00::7]:8000"),
            ("http://2001:db8::1:8000/", "http://[2001:db8::1]:8000/"),
            ("http://[fd00::7]:8000", "http://[fd00::7]:8000"),
            ("http://10.0.0.7:8000", "http://10.0.0.7:8000"),
            ("http://engine-0.chat:8000", "http://engine-0.chat:8000"),
            ("https://engine.example", "https://engine.example"),
        ] {
            let c = parse(&[
                "--redis-url",
                "redis://127.0.0.1",
                "--replica-id",
                "engine-0",
                "--advertise-url",
                given,
            ])
            .unwrap();
            let p = c.publish.unwrap();
            assert_eq!(p.advertise_url.as_deref(), Some(advertised), "{given}");
        }
    }

    #[test]
    fn bad_publishing_flags_are_refused_without_leaking_the_password() {
        let redis = ["--redis-url", "redis://:s3cret@127.0.0.1"];
        for (extra, needle) in [
            (&["--service", "a:b"][..], "--service"),
            (&["--replica-id", "pod 1"][..], "--replica-id"),
            (&["--advertise-url", "10.0.0.1:80"][..], "--advertise-url"),
            (&["--summary-entries", "0"][..], "--summary-entries"),
            (&["--summary-entries", "65537"][..], "--summary-entries"),
            (&["--redis-ca-file", "/etc/hostname"][..], "--redis-ca-file"),
        ] {
            let mut args = redis.to_vec();
            args.extend_from_slice(extra);
            let e = parse(&args).expect_err(needle);
            assert!(e.contains(needle), "{extra:?}: {e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
        for url in ["http://:s3cret@h", "redis://:s3cret@h:99999", "s3cret"] {
            let e = parse(&["--redis-url", url]).expect_err(url);
            assert!(e.contains("--redis-url") && !e.contains("s3cret"), "{e}");
        }
        // Without --redis-url the publishing flags are not read.
        assert!(parse(&["--service", "a:b"]).unwrap().publish.is_none());
    }

    /// A file of this test run under the system's temp directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, bytes: &[u8]) -> TempFile {
            let path = std::env::temp_dir()
                .join(format!("hotprefix-config-{}-{name}", std::process::id()));
            std::fs::write(&path, bytes).unwrap();
            TempFile(path)
        }

        fn arg(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn a_chat_template_file_is_read_and_checked_at_start_up() {
        assert!(
            parse(&[]).unwrap().chat_template.is_none(),
            "the model's own template by default"
        );
        let source = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}";
        let good = TempFile::new("good.jinja", source.as_bytes());
        let c = parse(&["--chat-template", good.arg()]).unwrap();
        let t = c.chat_template.unwrap();
        assert_eq!(
            (t.path.as_path(), t.source.as_str()),
            (good.0.as_path(), source)
        );
        // A configuration dump names the file but does not carry the template.
        let dump = format!("{t:?}");
        assert!(
            dump.contains("good.jinja") && !dump.contains("m.role"),
            "{dump}"
        );

        let syntax = TempFile::new("syntax.jinja", b"{% for m in messages %}{{ m.content }}");
        let binary = TempFile::new("binary.jinja", b"{{ messages }}\xff\xfe");
        let blank = TempFile::new("blank.jinja", b" \n\t\n");
        let huge = TempFile::new(
            "huge.jinja",
            &vec![b'x'; crate::source::MAX_CHAT_TEMPLATE_BYTES as usize + 1],
        );
        let missing = std::env::temp_dir().join("hotprefix-config-no-such-template.jinja");
        let dir = std::env::temp_dir();
        for (path, needle) in [
            (syntax.arg(), "syntax"),
            (binary.arg(), "UTF-8"),
            (blank.arg(), "empty"),
            (huge.arg(), "larger than"),
            (missing.to_str().unwrap(), "No such file"),
            (dir.to_str().unwrap(), "not a regular file"),
        ] {
            let e = parse(&["--chat-template", path]).expect_err(path);
            assert!(
                e.contains("--chat-template") && e.contains(path) && e.contains(needle),
                "{path}: {e}"
            );
        }
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
            (&["--gpu-memory-fraction", "0"][..], "--gpu-memory-fraction"),
            (
                &["--gpu-memory-fraction", "1.5"][..],
                "--gpu-memory-fraction",
            ),
            (&["--cuda-attention", "fast"][..], "fast"),
            (&["--kv-copy", "dma"][..], "dma"),
            (&["--layer-overlap", "maybe"][..], "maybe"),
            (&["--log-format", "xml"][..], "--log-format"),
            (
                &["--otlp-endpoint", "https://collector:4318"][..],
                "--otlp-endpoint",
            ),
            (
                &["--otlp-endpoint", "collector:4318"][..],
                "--otlp-endpoint",
            ),
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

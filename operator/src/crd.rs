//! The `HotPrefixService` custom resource (group `hotprefix.dev`, version `v1alpha1`, short
//! name `hps`): its spec, its status, and the CustomResourceDefinition `crdgen` writes.
//!
//! The schema the API server enforces comes from these types: required fields, enums, bounds
//! (`#[schemars(range)]`) and a few CEL rules (`x-kubernetes-validations`) for cross-field
//! constraints. What a schema cannot check (Kubernetes quantities, URL shapes, secrets kept out
//! of URLs) is checked by `validate.rs`, and a spec failing it is reported in the `Degraded`
//! condition rather than applied.
//!
//! Engine knobs are optional and left to the engine's own defaults when absent, so this file
//! never restates a default that the engine could change; the CRD's field docs name them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    ValidationRule,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group.
pub const GROUP: &str = "hotprefix.dev";
/// The API version.
pub const VERSION: &str = "v1alpha1";
/// The longest name of a HotPrefixService: its children's names add suffixes (the engine pods
/// are `{name}-engine-{ordinal}`, and the StatefulSet's revision label adds a hash), and all of
/// them must stay DNS labels of at most 63 characters.
pub const MAX_NAME_LEN: usize = 40;
/// The longest `spec.model.chatTemplate`, in characters (the schema's `maxLength`): Hugging
/// Face's longest templates are tens of KiB, and the template travels in a ConfigMap, whose
/// data may not exceed 1 MiB.
pub const MAX_CHAT_TEMPLATE_LEN: usize = 65_536;

/// A HotPrefix serving deployment: engine replicas with a two-tier, hotness-aware prefix KV
/// cache, a prefix-aware router in front of them (the OpenAI-compatible endpoint), and the
/// Redis through which engines publish their hotness summaries to the router.
// Clippy reads the printer columns' repeated `type_ = "string"` as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "hotprefix.dev",
    version = "v1alpha1",
    kind = "HotPrefixService",
    namespaced,
    shortname = "hps",
    category = "hotprefix",
    status = "HotPrefixServiceStatus",
    derive = "PartialEq",
    doc = "A HotPrefix serving deployment: engines with a hotness-aware two-tier prefix KV cache, a prefix-aware router (the OpenAI-compatible endpoint) and Redis.",
    scale(
        spec_replicas_path = ".spec.engine.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the service is ready to serve"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Progressing, Ready or Degraded"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Engine replicas ready"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        description = "The router's URL (OpenAI-compatible)"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct HotPrefixServiceSpec {
    /// The model every engine replica serves.
    pub model: ModelSpec,
    /// The engine replicas (a StatefulSet: the pod names are the replica ids in Redis).
    #[serde(default)]
    pub engine: EngineSpec,
    /// The prefix-aware router in front of the engines (a Deployment and the Service that is
    /// the endpoint).
    #[serde(default)]
    pub router: RouterSpec,
    /// The Redis the engines publish their hotness summaries and load to, and the router reads.
    #[serde(default)]
    pub redis: RedisSpec,
    /// OpenTelemetry collector (OTLP/HTTP base URL, `http://host:4318`) the engines and the
    /// router export request spans to. Absent: no export (trace context still propagates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

/// The served model.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Name the model is served under (the OpenAI `model` field). Default: derived from the
    /// model file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where the model comes from: exactly one of `pvc`, `hostPath`, `url`, `random`.
    pub source: ModelSource,
    /// A Jinja chat template replacing the model's own, in Hugging Face's `chat_template`
    /// form (it sees `messages`, `add_generation_prompt`, `bos_token` and `eos_token`).
    /// Engines and router both get it (`--chat-template`, from a ConfigMap mounted read-only),
    /// so they tokenize a conversation alike; changing it restarts the engines one at a time
    /// and the routers. Absent: the model's template (ChatML for a model without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub chat_template: Option<String>,
}

/// Where the model files come from. Engines and router both read them: the router tokenizes
/// requests exactly as the engines do, with the model's own tokenizer and chat template.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ModelSource {
    /// A file or directory on a PersistentVolumeClaim (ReadOnlyMany or ReadWriteMany when pods
    /// run on several nodes).
    Pvc(PvcSource),
    /// A file or directory on every node (for clusters that pre-stage models on nodes).
    HostPath(HostPathSource),
    /// A GGUF file downloaded once by an init container into a cache volume that outlives
    /// restarts (one PersistentVolumeClaim per engine replica).
    Url(UrlSource),
    /// Random weights of a named shape: for smoke tests and benchmarks, not for answers.
    Random(RandomSource),
}

/// A model on a PersistentVolumeClaim.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// The claim, in the HotPrefixService's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub claim_name: String,
    /// Path inside the claim of a `.gguf` file or a Hugging Face model directory.
    #[schemars(length(min = 1))]
    pub path: String,
}

/// A model on the nodes' file system.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostPathSource {
    /// Absolute path of a `.gguf` file or a Hugging Face model directory on the node.
    #[schemars(length(min = 2))]
    pub path: String,
}

/// A Kubernetes quantity (`256Mi`, `20Gi`, `1.5e9`), as the API server parses them, so that a
/// malformed one is refused at `kubectl apply` rather than reported later.
const QUANTITY: &str = r"^[+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";
/// A DNS subdomain name (claims, priority and runtime classes).
const DNS_SUBDOMAIN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// An extended resource name: a DNS-subdomain prefix, a slash and a name.
const QUALIFIED_RESOURCE: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$";

/// A GGUF file downloaded from a URL.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.url.startsWith('https://') || self.url.startsWith('http://')",
        "message": "url must be an http:// or https:// URL"
    }
]))]
pub struct UrlSource {
    /// The file's URL (`https://...`); it must name a `.gguf` file unless `fileName` is given.
    #[schemars(length(min = 8, max = 2048))]
    pub url: String,
    /// Expected SHA-256 of the file (64 hex digits): the download is refused, and a cached
    /// copy downloaded again, when it differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{64}$"))]
    pub sha256: Option<String>,
    /// File name to store it under (must end in `.gguf`). Default: the URL's last path segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    /// Size of each replica's cache volume (a Kubernetes quantity). Default: 20Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY))]
    pub cache_size: Option<String>,
    /// StorageClass of the cache volumes. Default: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// A Secret key holding a bearer token for the download (e.g. a Hugging Face token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret_ref: Option<SecretKeyRef>,
    /// Image of the download init container (needs `sh`, `curl` and `sha256sum`). Default:
    /// the operator's `--downloader-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// Random weights.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RandomSource {
    /// The shape.
    pub preset: RandomPreset,
}

/// The shapes `random:` models come in (the engine's presets).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RandomPreset {
    /// A tiny model for tests.
    #[serde(rename = "tiny")]
    Tiny,
    /// SmolLM2-135M's shape.
    #[serde(rename = "smollm2-135m")]
    Smollm2_135m,
    /// Llama 3.1 8B's shape.
    #[serde(rename = "llama-3.1-8b")]
    Llama31_8b,
}

impl RandomPreset {
    /// The engine's name of the preset.
    pub fn as_str(self) -> &'static str {
        match self {
            RandomPreset::Tiny => "tiny",
            RandomPreset::Smollm2_135m => "smollm2-135m",
            RandomPreset::Llama31_8b => "llama-3.1-8b",
        }
    }
}

/// A key of a Secret in the HotPrefixService's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key in the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// How images are pulled.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Always pull.
    Always,
    /// Pull when the node lacks the image.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// The engine's compute backend.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// CUDA when usable, else the CPU.
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// The CUDA backend (needs `gpus` > 0).
    Cuda,
}

impl Backend {
    /// The engine's `--backend` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        }
    }
}

/// The engine's prefix cache policy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CachePolicy {
    /// Hotness tracking, selective host admission, promotion.
    Hotprefix,
    /// Device tier only, least recently used.
    Lru,
    /// LRU with every evicted block written to the host tier.
    LruOffload,
    /// LRU offloading only blocks that were reused.
    ReuseOffload,
}

impl CachePolicy {
    /// The engine's `--policy` value.
    pub fn as_str(self) -> &'static str {
        match self {
            CachePolicy::Hotprefix => "hotprefix",
            CachePolicy::Lru => "lru",
            CachePolicy::LruOffload => "lru-offload",
            CachePolicy::ReuseOffload => "reuse-offload",
        }
    }
}

/// The engine replicas.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.backend != 'cuda' || self.gpus > 0",
        "message": "backend cuda needs gpus > 0"
    }
]))]
pub struct EngineSpec {
    /// Engine replicas (the scale subresource drives this field).
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1024))]
    pub replicas: i32,
    /// Engine image. Default: the operator's `--engine-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Pull policy of the engine image. Default: Kubernetes' (IfNotPresent unless the tag is
    /// `latest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// GPUs per replica: 1, or 0 for the CPU backend. An engine computes on one GPU (no
    /// tensor parallelism), so more would be reserved and left idle; scale with replicas.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1))]
    pub gpus: i32,
    /// Extended resource name of a GPU.
    #[serde(default = "default_gpu_resource")]
    #[schemars(length(min = 1, max = 253), regex(pattern = QUALIFIED_RESOURCE))]
    pub gpu_resource_name: String,
    /// Compute backend: auto (CUDA when usable, else CPU), cpu, cuda.
    #[serde(default)]
    pub backend: Backend,
    /// CPU and memory requests and limits of the engine container (GPUs come from `gpus`).
    /// The host cache tier lives in this memory: size the memory limit for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Fraction of each GPU's memory the CUDA engine may use in all (weights, activations and
    /// the device KV tier), in (0, 1]; it sizes the device tier when
    /// `cache.deviceCacheTokens` is not given (`--gpu-memory-fraction`). Default: the
    /// engine's (0.9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01, max = 1.0))]
    pub device_memory_fraction: Option<f64>,
    /// The two-tier prefix KV cache.
    #[serde(default)]
    pub cache: CacheSpec,
    /// Continuous batching limits.
    #[serde(default)]
    pub batching: BatchingSpec,
    /// Seconds in-flight requests get to finish when a replica stops (`--shutdown-grace-s`;
    /// the pod's termination grace period adds the preStop delay and a margin). Default: the
    /// engine's (30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub shutdown_grace_seconds: Option<i32>,
    /// Seconds a replica may take to load its model and start serving before it is restarted.
    #[serde(default = "default_startup_seconds")]
    #[schemars(range(min = 10, max = 86400))]
    pub startup_timeout_seconds: i32,
    /// Spread replicas across nodes (a soft topology spread constraint on the node's host
    /// name; `affinity` can add hard rules).
    #[serde(default = "yes")]
    pub spread_across_nodes: bool,
    /// Node selector of the engine pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of the engine pods (GPU nodes are often tainted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Affinity of the engine pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the engine pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub priority_class_name: Option<String>,
    /// RuntimeClass of the engine pods (e.g. `nvidia` where the GPU runtime is not the
    /// default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub runtime_class_name: Option<String>,
    /// Extra environment variables of the engine container; one named like a variable the
    /// operator sets replaces it (every engine flag is a `HOTPREFIX_*` variable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_env: Option<Vec<EnvVar>>,
}

impl Default for EngineSpec {
    fn default() -> Self {
        EngineSpec {
            replicas: 1,
            image: None,
            image_pull_policy: None,
            gpus: 1,
            gpu_resource_name: default_gpu_resource(),
            backend: Backend::Auto,
            resources: None,
            device_memory_fraction: None,
            cache: CacheSpec::default(),
            batching: BatchingSpec::default(),
            shutdown_grace_seconds: None,
            startup_timeout_seconds: default_startup_seconds(),
            spread_across_nodes: true,
            node_selector: None,
            tolerations: None,
            affinity: None,
            priority_class_name: None,
            runtime_class_name: None,
            extra_env: None,
        }
    }
}

/// The engine's two-tier prefix KV cache. Absent fields take the engine's defaults.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// Cache policy: hotprefix, lru, lru-offload, reuse-offload. Default: hotprefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<CachePolicy>,
    /// Tokens per KV block (1 to 1024). Default: 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub block_size: Option<i32>,
    /// Tokens of KV the device (GPU) tier holds (`--device-cache-tokens`). Default: the
    /// engine's (16384 on the CPU; on CUDA, what `deviceMemoryFraction` leaves after the
    /// weights and activations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2))]
    pub device_cache_tokens: Option<i64>,
    /// Tokens of KV the host tier holds (`--host-cache-tokens`; 0: no host tier). Default:
    /// 65536. The tier lives in the engine container's memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub host_cache_tokens: Option<i64>,
    /// Hotness tracking, admission and promotion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotness: Option<HotnessSpec>,
}

/// Hotness knobs of the `hotprefix` policy. Absent fields take the engine's defaults.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HotnessSpec {
    /// Half-life of hotness in cache turnovers. Default: 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.001))]
    pub half_life_turnovers: Option<f64>,
    /// Least hotness for a block evicted from the device to be kept in the host tier.
    /// Default: 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub admission_floor: Option<f64>,
    /// Seconds between promotions of hot host-only prefixes back to the device. Default: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.001))]
    pub promotion_interval_seconds: Option<f64>,
    /// Bytes one promotion round may move from host to device, a Kubernetes quantity
    /// (`256Mi`; 0: promotion off). Default: 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY))]
    pub promotion_budget: Option<String>,
}

/// Continuous batching limits. Absent fields take the engine's defaults.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.maxRunning) || !has(self.maxBatchTokens) || self.maxRunning <= self.maxBatchTokens",
        "message": "maxRunning must not exceed maxBatchTokens"
    }
]))]
pub struct BatchingSpec {
    /// Requests running at once. Default: 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_running: Option<i32>,
    /// Tokens (prefill chunks and decode tokens) per forward step. Default: 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_batch_tokens: Option<i32>,
    /// Requests allowed to wait; beyond it requests get 429. Default: 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_waiting: Option<i32>,
}

/// The router's routing policy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingPolicy {
    /// The replica holding the longest hot prefix, minus a load term.
    Hotprefix,
    /// The least loaded replica.
    LeastLoad,
    /// Replicas in turn.
    RoundRobin,
    /// A hash of the session header.
    ConsistentHash,
    /// An SGLang-style tree of the router's own decisions.
    ApproxTree,
}

impl RoutingPolicy {
    /// The router's `--policy` value.
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingPolicy::Hotprefix => "hotprefix",
            RoutingPolicy::LeastLoad => "least-load",
            RoutingPolicy::RoundRobin => "round-robin",
            RoutingPolicy::ConsistentHash => "consistent-hash",
            RoutingPolicy::ApproxTree => "approx-tree",
        }
    }
}

/// The type of the router's Service.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Also through the cloud's load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// The router.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    /// Router replicas (they share one view through Redis).
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1024))]
    pub replicas: i32,
    /// Router image. Default: the operator's `--router-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Pull policy of the router image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Routing policy: hotprefix, least-load, round-robin, consistent-hash, approx-tree.
    /// Default: hotprefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<RoutingPolicy>,
    /// Weights of the `hotprefix` policy. Absent fields take the router's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<RouterWeights>,
    /// A Secret key holding the API key clients must send as `Authorization: Bearer <key>`.
    /// Absent: no authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// The router's Service: the endpoint.
    #[serde(default)]
    pub service: RouterServiceSpec,
    /// CPU and memory requests and limits of the router container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selector of the router pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of the router pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Affinity of the router pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the router pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub priority_class_name: Option<String>,
    /// Extra environment variables of the router container; one named like a variable the
    /// operator sets replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_env: Option<Vec<EnvVar>>,
}

impl Default for RouterSpec {
    fn default() -> Self {
        RouterSpec {
            replicas: 1,
            image: None,
            image_pull_policy: None,
            policy: None,
            weights: None,
            api_key_secret_ref: None,
            service: RouterServiceSpec::default(),
            resources: None,
            node_selector: None,
            tolerations: None,
            affinity: None,
            priority_class_name: None,
            extra_env: None,
        }
    }
}

/// Weights of the router's `hotprefix` policy (router/src/policy/hotprefix.rs).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
// The router refuses a factor in (0, 1) at start-up, so the API server refuses it first: a
// spec the router would crash-loop on never reaches a pod.
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.hotSpotFactor) || self.hotSpotFactor == 0.0 || self.hotSpotFactor >= 1.0",
        "message": "hotSpotFactor must be 0 (off) or at least 1"
    }
]))]
pub struct RouterWeights {
    /// Credit of a host-tier block relative to a device-tier block, in [0, 1]. Default: 0.9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub host_weight: Option<f64>,
    /// Cost of a token of queued work against a token of saved prefill. Default: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub load_weight: Option<f64>,
    /// Weight of the queueing externality: the saved prefill is credited 1 + this times the
    /// requests queued per replica (0: a request's own wait against its own prefill only).
    /// Default: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub queue_externality: Option<f64>,
    /// Skip the best replica when a request would pay there (queued work plus its prefill)
    /// more than this times the least it would pay at any replica; 0 (never) or at least 1.
    /// Default: 1.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub hot_spot_factor: Option<f64>,
    /// Milliseconds the router's own decisions count as cached. Default: 3000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub recent_ms: Option<i64>,
}

/// The router's Service.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouterServiceSpec {
    /// ClusterIP, NodePort or LoadBalancer.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// The port clients connect to.
    #[serde(default = "default_router_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Annotations of the Service (load balancer settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Default for RouterServiceSpec {
    fn default() -> Self {
        RouterServiceSpec {
            type_: ServiceType::ClusterIP,
            port: default_router_port(),
            annotations: None,
        }
    }
}

/// Redis: deployed by the operator (`managed`) or an existing one (`external`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RedisSpec {
    /// A single Redis Deployment and Service owned by this HotPrefixService. Summaries are
    /// soft state (engines republish them every second), so persistence is off by default.
    Managed(ManagedRedis),
    /// An existing Redis.
    External(ExternalRedis),
}

impl Default for RedisSpec {
    fn default() -> Self {
        RedisSpec::Managed(ManagedRedis::default())
    }
}

/// A Redis the operator deploys.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedRedis {
    /// Redis image. Default: the operator's `--redis-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// CPU and memory requests and limits of the Redis container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// A Secret key holding the password Redis requires (engines and router get it from the
    /// same key). Absent: no password (the Service is reachable inside the cluster only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// Persistence on a PersistentVolumeClaim (append-only file). Off by default.
    #[serde(default)]
    pub persistence: RedisPersistence,
}

/// Persistence of the managed Redis.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisPersistence {
    /// Keep Redis' data on a PersistentVolumeClaim.
    #[serde(default)]
    pub enabled: bool,
    /// Size of the claim (a Kubernetes quantity). Default: 1Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY))]
    pub size: Option<String>,
    /// StorageClass of the claim. Default: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// An existing Redis.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.url.startsWith('redis://') || self.url.startsWith('rediss://')",
        "message": "url must be a redis:// or rediss:// URL"
    },
    {
        "rule": "!has(self.tls) || self.tls || !self.url.startsWith('rediss://')",
        "message": "tls: false contradicts a rediss:// url"
    },
    {
        "rule": "!has(self.caSecretRef) || self.url.startsWith('rediss://') || (has(self.tls) && self.tls)",
        "message": "caSecretRef needs TLS (a rediss:// url or tls: true)"
    }
]))]
pub struct ExternalRedis {
    /// `redis://host:port[/db]` or `rediss://...` (TLS). No password here: use
    /// `passwordSecretRef`.
    #[schemars(length(min = 9, max = 2048))]
    pub url: String,
    /// A Secret key holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// TLS on or off. Default: from the URL's scheme; `true` turns a `redis://` URL into
    /// `rediss://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
    /// A Secret key holding the PEM CA certificates to trust for TLS instead of the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// What the service is doing, in one word (the printer column; conditions say why).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Nothing reconciled yet.
    Pending,
    /// Children created or rolling out, not all ready.
    Progressing,
    /// Every engine replica, the router and Redis are ready.
    Ready,
    /// The spec is invalid, applying failed, or a rollout is stuck.
    Degraded,
}

impl Phase {
    /// The spelling in the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Progressing => "Progressing",
            Phase::Ready => "Ready",
            Phase::Degraded => "Degraded",
        }
    }
}

/// The observed state, written by the operator only.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HotPrefixServiceStatus {
    /// Pending, Progressing, Ready or Degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `Ready`, `Progressing` and `Degraded`, with reasons and messages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Engine replicas that exist (the scale subresource's status replicas).
    #[serde(default)]
    pub replicas: i32,
    /// Engine replicas ready to serve.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Whether the router has an available replica.
    #[serde(default)]
    pub router_ready: bool,
    /// The router Service's URL: the OpenAI-compatible endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Label selector of the engine pods (for the scale subresource, so HPA and KEDA can find
    /// the pods' metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

fn one() -> i32 {
    1
}

fn yes() -> bool {
    true
}

fn default_gpu_resource() -> String {
    "nvidia.com/gpu".to_string()
}

fn default_startup_seconds() -> i32 {
    1800
}

fn default_router_port() -> i32 {
    80
}

/// Fields whose schema is a Kubernetes type (k8s-openapi's): their nested descriptions are
/// Kubernetes' API reference, three quarters of the CRD's size, and are dropped (the fields
/// keep their own description), which keeps the CRD well inside the size `kubectl apply`
/// can store in its last-applied annotation.
const EMBEDDED_KUBERNETES_FIELDS: [&str; 4] = ["affinity", "tolerations", "extraEnv", "resources"];

fn strip_descriptions(schema: &mut JSONSchemaProps) {
    schema.description = None;
    for p in schema.properties.iter_mut().flat_map(|m| m.values_mut()) {
        strip_descriptions(p);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
        strip_descriptions(items);
    }
    if let Some(JSONSchemaPropsOrArray::Schemas(items)) = schema.items.as_mut() {
        items.iter_mut().for_each(strip_descriptions);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(extra)) = schema.additional_properties.as_mut() {
        strip_descriptions(extra);
    }
    for list in [&mut schema.all_of, &mut schema.any_of, &mut schema.one_of] {
        list.iter_mut().flatten().for_each(strip_descriptions);
    }
}

/// Drops the nested descriptions of every [`EMBEDDED_KUBERNETES_FIELDS`] field below `schema`.
fn trim_embedded(schema: &mut JSONSchemaProps) {
    for (name, p) in schema.properties.iter_mut().flat_map(|m| m.iter_mut()) {
        if EMBEDDED_KUBERNETES_FIELDS.contains(&name.as_str()) {
            let own = p.description.take();
            strip_descriptions(p);
            p.description = own;
        } else {
            trim_embedded(p);
        }
    }
}

/// The CustomResourceDefinition, as `crdgen` writes it: the derived one plus a rule on the
/// object's name (see [`MAX_NAME_LEN`]), which only a rule at the root can see, and without
/// the nested descriptions of embedded Kubernetes types.
pub fn definition() -> CustomResourceDefinition {
    let mut crd = HotPrefixService::crd();
    for version in &mut crd.spec.versions {
        let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        if let Some(spec) = schema.properties.as_mut().and_then(|p| p.get_mut("spec")) {
            trim_embedded(spec);
        }
        schema
            .x_kubernetes_validations
            .get_or_insert_with(Vec::new)
            .push(ValidationRule {
                rule: format!(
                    "self.metadata.name.size() <= {MAX_NAME_LEN} && \
                     self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && \
                     !self.metadata.name.matches('-(engine|router|redis)$')"
                ),
                message: Some(format!(
                    "metadata.name must be a DNS label of at most {MAX_NAME_LEN} characters \
                     starting with a letter and not ending in -engine, -router or -redis (the \
                     children's names derive from it)"
                )),
                ..ValidationRule::default()
            });
    }
    crd
}

/// The CustomResourceDefinition as YAML, with the header `crdgen` writes.
pub fn definition_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let body = serde_saphyr::to_string(&definition())?;
    Ok(format!(
        "# Generated by `cargo run -p hotprefix-operator --bin crdgen`; do not edit.\n---\n{body}"
    ))
}

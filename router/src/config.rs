//! The router's command line (every flag also an environment variable) and its validated
//! configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::http::HeaderName;
use clap::Parser;
use hotprefix_engine::publish::{RedisTarget, RedisUrl, Secret};
use hotprefix_engine::source::{ChatTemplateFile, ModelSource};
use hotprefix_protocol::cluster::Keys;

use crate::kubernetes::{KubernetesOptions, PortSpec, is_dns_label, pod_namespace};
use crate::policy::{HotPrefixWeights, PolicyConfig, PolicyKind};
use crate::server::ProxyConfig;

/// `hotprefix-router` flags.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "hotprefix-router",
    version,
    about = "Prefix- and hotness-aware router for HotPrefix engines"
)]
pub struct RouterArgs {
    /// Address to serve on.
    #[arg(long, env = "HOTPREFIX_ROUTER_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Redis with the engines' registrations and summaries (`redis://` or `rediss://`).
    #[arg(long, env = "HOTPREFIX_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Redis password, overriding the URL's (for secrets kept out of URLs).
    #[arg(long, env = "HOTPREFIX_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// PEM file of a private CA for `rediss://`.
    #[arg(long, env = "HOTPREFIX_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// Service whose replicas to route to (the engines' `--service`).
    #[arg(long, env = "HOTPREFIX_SERVICE", default_value = "default")]
    pub service: String,
    /// Static replica base URLs, comma-separated (beside or instead of Redis).
    #[arg(long, env = "HOTPREFIX_REPLICAS", value_delimiter = ',')]
    pub replicas: Vec<String>,
    /// Kubernetes Service of the engines: discover replicas from its EndpointSlices.
    #[arg(long, env = "HOTPREFIX_K8S_SERVICE")]
    pub k8s_service: Option<String>,
    /// Namespace of `--k8s-service` (default: the router pod's own namespace, else `default`).
    #[arg(long, env = "HOTPREFIX_K8S_NAMESPACE")]
    pub k8s_namespace: Option<String>,
    /// The engines' port in those EndpointSlices: a Service port name or a port number.
    #[arg(long, env = "HOTPREFIX_K8S_PORT", default_value = crate::kubernetes::DEFAULT_PORT_NAME)]
    pub k8s_port: String,
    /// Routing policy: hotprefix, least-load, round-robin (and any other listed by --help).
    #[arg(long, env = "HOTPREFIX_POLICY", default_value = "hotprefix")]
    pub policy: String,
    /// The served model (`PATH`, `DIR` or `random:PRESET`), to tokenize requests exactly as the
    /// engines do; without it routing sees no prefixes.
    #[arg(long, env = "HOTPREFIX_MODEL")]
    pub model: Option<String>,
    /// The engines' `--chat-template` file, if they have one: the Jinja chat template that
    /// replaces the model's, so that chat requests are tokenized as the engines tokenize them
    /// (needs `--model`).
    #[arg(long, env = "HOTPREFIX_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// Require `Authorization: Bearer <key>` on /v1 and /debug.
    #[arg(long, env = "HOTPREFIX_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, env = "HOTPREFIX_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Other replicas tried when one fails before answering.
    #[arg(long, env = "HOTPREFIX_RETRIES", default_value_t = 2)]
    pub retries: usize,
    /// Seconds to wait for a replica's response headers (its time to first token).
    #[arg(long, env = "HOTPREFIX_UPSTREAM_TIMEOUT_SECS", default_value_t = 300)]
    pub upstream_timeout_secs: u64,
    /// Milliseconds to wait for a connection to a replica.
    #[arg(long, env = "HOTPREFIX_CONNECT_TIMEOUT_MS", default_value_t = 1000)]
    pub connect_timeout_ms: u64,
    /// Milliseconds between health probes of each replica.
    #[arg(long, env = "HOTPREFIX_HEALTH_INTERVAL_MS", default_value_t = 2000)]
    pub health_interval_ms: u64,
    /// Consecutive failures (probes or requests) that eject a replica.
    #[arg(long, env = "HOTPREFIX_EJECT_AFTER", default_value_t = 2)]
    pub eject_after: u32,
    /// Header carrying a session key, for `consistent-hash`.
    #[arg(long, env = "HOTPREFIX_SESSION_HEADER", default_value = "x-session-id")]
    pub session_header: String,
    /// hotprefix: credit of a host-tier block relative to a device-tier block.
    #[arg(long, env = "HOTPREFIX_HOST_WEIGHT", default_value_t = HotPrefixWeights::default().host_weight)]
    pub host_weight: f64,
    /// hotprefix: cost of a token of queued work against a token of saved prefill.
    #[arg(long, env = "HOTPREFIX_LOAD_WEIGHT", default_value_t = HotPrefixWeights::default().load_weight)]
    pub load_weight: f64,
    /// hotprefix: weight of the queueing externality, the requests a recomputed prefix delays
    /// besides its own (0 = weigh a request's own wait against its own prefill only).
    #[arg(long, env = "HOTPREFIX_QUEUE_EXTERNALITY", default_value_t = HotPrefixWeights::default().queue_externality)]
    pub queue_externality: f64,
    /// hotprefix: skip the best replica when the request would pay there more than this times
    /// the least it would pay anywhere, queue plus prefill (0 = never, else at least 1).
    #[arg(long, env = "HOTPREFIX_HOT_SPOT_FACTOR", default_value_t = HotPrefixWeights::default().hot_spot_factor)]
    pub hot_spot_factor: f64,
    /// hotprefix: milliseconds the router's own decisions count as cached.
    #[arg(long, env = "HOTPREFIX_RECENT_MS", default_value_t = HotPrefixWeights::default().recent_ms)]
    pub recent_ms: u64,
    /// Logs as JSON lines.
    #[arg(long, env = "HOTPREFIX_JSON_LOGS")]
    pub json_logs: bool,
    /// OpenTelemetry collector to export traces to over OTLP/HTTP (protobuf): its base URL,
    /// http://host:4318 (`/v1/traces` is appended). Without it no spans are exported, but trace
    /// context still propagates to the engines and log lines carry trace ids.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// A flag that does not validate.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {msg}")]
pub struct ConfigError {
    /// The flag.
    pub flag: &'static str,
    /// What is wrong.
    pub msg: String,
}

fn err(flag: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        msg: msg.into(),
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Address to serve on.
    pub listen: SocketAddr,
    /// Redis, if any (client built, nothing connected yet).
    pub redis: Option<RedisTarget>,
    /// Key names of the service.
    pub keys: Keys,
    /// Static replica URLs.
    pub replicas: Vec<String>,
    /// Discovery from Kubernetes EndpointSlices, if any.
    pub kubernetes: Option<KubernetesOptions>,
    /// The policy.
    pub policy: PolicyConfig,
    /// The model to tokenize with.
    pub model: Option<ModelSource>,
    /// The chat template replacing the model's (`--chat-template`, read and compiled).
    pub chat_template: Option<ChatTemplateFile>,
    /// Proxy settings.
    pub proxy: ProxyConfig,
    /// Time limit for connecting to a replica.
    pub connect_timeout: Duration,
    /// Health probe period.
    pub health_interval: Duration,
    /// Failures that eject a replica.
    pub eject_after: u32,
    /// JSON logs.
    pub json_logs: bool,
    /// OTLP/HTTP collector to export traces to (`--otlp-endpoint`, checked), or `None`.
    pub otlp_endpoint: Option<String>,
}

impl RouterArgs {
    /// Checks every flag and builds the configuration.
    pub fn validate(self) -> Result<RouterConfig, ConfigError> {
        let kind: PolicyKind = self.policy.parse().map_err(|e: String| err("policy", e))?;
        let weights = HotPrefixWeights {
            host_weight: self.host_weight,
            load_weight: self.load_weight,
            queue_externality: self.queue_externality,
            hot_spot_factor: self.hot_spot_factor,
            recent_ms: self.recent_ms,
            ..HotPrefixWeights::default()
        };
        weights.validate().map_err(|e| {
            err(
                "host-weight/load-weight/queue-externality/hot-spot-factor",
                e,
            )
        })?;
        let keys = Keys::new(&self.service).map_err(|e| err("service", e.to_string()))?;
        for url in &self.replicas {
            if !(url.starts_with("http://") && url.len() > "http://".len()) {
                return Err(err("replicas", format!("{url:?} is not an http:// URL")));
            }
        }
        // Built now so a bad URL or CA file fails at start-up, not in a background task.
        let redis = self
            .redis_url
            .map(|url| {
                RedisTarget::new(
                    &RedisUrl::new(url),
                    self.redis_password.map(Secret::new).as_ref(),
                    self.redis_ca_file.as_deref(),
                )
                .map_err(|e| err("redis-url", e.to_string()))
            })
            .transpose()?;
        let port: PortSpec = self.k8s_port.parse().map_err(|e| err("k8s-port", e))?;
        let kubernetes = match self.k8s_service {
            Some(service) => {
                if !is_dns_label(&service) {
                    return Err(err(
                        "k8s-service",
                        format!("{service:?} is not a Service name"),
                    ));
                }
                // Read the pod's namespace only when discovery is on: it is a file read.
                let namespace = self.k8s_namespace.unwrap_or_else(pod_namespace);
                if !is_dns_label(&namespace) {
                    return Err(err(
                        "k8s-namespace",
                        format!("{namespace:?} is not a namespace name"),
                    ));
                }
                Some(KubernetesOptions {
                    service,
                    namespace,
                    port,
                })
            }
            None => None,
        };
        if redis.is_none() && self.replicas.is_empty() && kubernetes.is_none() {
            return Err(err(
                "replicas",
                "give --replicas, --redis-url or --k8s-service: there is nothing to route to",
            ));
        }
        let model = self
            .model
            .map(|m| {
                m.parse::<ModelSource>()
                    .map_err(|e| err("model", e.to_string()))
            })
            .transpose()?;
        let chat_template = match (self.chat_template, &model) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(err(
                    "chat-template",
                    "needs --model: the template is applied to the model's tokenizer",
                ));
            }
            (Some(path), Some(_)) => Some(
                ChatTemplateFile::read(&path).map_err(|e| err("chat-template", e.to_string()))?,
            ),
        };
        let session_header = HeaderName::try_from(self.session_header.as_str())
            .map_err(|e| err("session-header", e.to_string()))?;
        // An empty value (an unset variable in a manifest) means no export, as OpenTelemetry's
        // own variable does.
        let otlp_endpoint = self.otlp_endpoint.filter(|e| !e.trim().is_empty());
        if let Some(e) = &otlp_endpoint {
            hotprefix_engine::telemetry::traces_endpoint(e)
                .map_err(|e| err("otlp-endpoint", e.to_string()))?;
        }
        if self.max_body_bytes < 1024 {
            return Err(err("max-body-bytes", "must be at least 1024"));
        }
        if self.upstream_timeout_secs == 0
            || self.connect_timeout_ms == 0
            || self.health_interval_ms == 0
        {
            return Err(err(
                "upstream-timeout-secs/connect-timeout-ms/health-interval-ms",
                "must be positive",
            ));
        }
        Ok(RouterConfig {
            listen: self.listen,
            redis,
            keys,
            replicas: self.replicas,
            kubernetes,
            policy: PolicyConfig {
                kind,
                hotprefix: weights,
                ..PolicyConfig::default()
            },
            model,
            chat_template,
            proxy: ProxyConfig {
                api_key: self.api_key.filter(|k| !k.is_empty()),
                max_body_bytes: self.max_body_bytes,
                retries: self.retries,
                upstream_timeout: Duration::from_secs(self.upstream_timeout_secs),
                session_header,
            },
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            health_interval: Duration::from_millis(self.health_interval_ms),
            eject_after: self.eject_after,
            json_logs: self.json_logs,
            otlp_endpoint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<RouterConfig, ConfigError> {
        let mut v = vec!["hotprefix-router"];
        v.extend_from_slice(extra);
        RouterArgs::try_parse_from(v)
            .map_err(|e| err("parse", e.to_string()))?
            .validate()
    }

    #[test]
    fn defaults_and_bad_flags() {
        let c = args(&["--replicas", "http://127.0.0.1:8001,http://127.0.0.1:8002"]).unwrap();
        assert_eq!(c.replicas.len(), 2);
        assert_eq!(c.policy.kind, PolicyKind::HotPrefix);
        assert_eq!(c.listen.port(), 8080);
        assert!(c.proxy.api_key.is_none());
        assert!(c.otlp_endpoint.is_none());
        let c = args(&[
            "--replicas",
            "http://a",
            "--otlp-endpoint",
            "http://otel:4318",
        ])
        .unwrap();
        assert_eq!(c.otlp_endpoint.as_deref(), Some("http://otel:4318"));
        for bad in [
            vec![],
            vec!["--replicas", "127.0.0.1:8001"],
            vec!["--replicas", "http://a", "--policy", "random"],
            vec!["--replicas", "http://a", "--service", "a:b"],
            vec!["--replicas", "http://a", "--host-weight", "5"],
            vec!["--redis-url", "nonsense://x"],
            vec!["--replicas", "http://a", "--model", "/nonexistent.gguf"],
            vec![
                "--replicas",
                "http://a",
                "--otlp-endpoint",
                "https://otel:4318",
            ],
            vec!["--replicas", "http://a", "--otlp-endpoint", "otel:4318"],
        ] {
            assert!(args(&bad).is_err(), "{bad:?}");
        }
        let e = args(&["--redis-url", "nonsense://:hunter2@x"])
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn a_chat_template_needs_the_model_and_a_file_that_compiles() {
        let dir = std::env::temp_dir();
        let path = |name: &str| dir.join(format!("hotprefix-router-{}-{name}", std::process::id()));
        let good = path("good.jinja");
        let bad = path("bad.jinja");
        std::fs::write(&good, "{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
        std::fs::write(&bad, "{% for m in messages %}").unwrap();
        let (good_s, bad_s) = (good.to_str().unwrap(), bad.to_str().unwrap());
        let base = ["--replicas", "http://a", "--model", "random:tiny"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            args(&v)
        };
        assert!(with(&[]).unwrap().chat_template.is_none());
        let c = with(&["--chat-template", good_s]).unwrap();
        assert_eq!(c.chat_template.unwrap().path, good);
        let missing = path("missing.jinja");
        for (extra, needle) in [
            (vec!["--chat-template", bad_s], "syntax"),
            (
                vec!["--chat-template", missing.to_str().unwrap()],
                "No such file",
            ),
        ] {
            let e = with(&extra).unwrap_err();
            assert_eq!(e.flag, "chat-template");
            let text = e.to_string();
            assert!(
                text.starts_with("--chat-template: ") && text.contains(needle),
                "{text}"
            );
        }
        // Without a model there is nothing to apply it to.
        let e = args(&["--replicas", "http://a", "--chat-template", good_s]).unwrap_err();
        assert_eq!(e.flag, "chat-template");
        assert!(e.to_string().contains("--model"), "{e}");
        let _ = std::fs::remove_file(good);
        let _ = std::fs::remove_file(bad);
    }

    #[test]
    fn kubernetes_discovery_flags() {
        // The Service alone is something to route to.
        let c = args(&["--k8s-service", "engine"]).unwrap();
        let k = c.kubernetes.unwrap();
        assert_eq!(k.service, "engine");
        assert_eq!(k.port, PortSpec::Named("http".into()));
        // Outside a cluster there is no service account mount: `default`.
        if !std::path::Path::new(crate::kubernetes::NAMESPACE_FILE).exists() {
            assert_eq!(k.namespace, "default");
        }
        let c = args(&[
            "--k8s-service",
            "engine",
            "--k8s-namespace",
            "serving",
            "--k8s-port",
            "8000",
        ])
        .unwrap();
        let k = c.kubernetes.unwrap();
        assert_eq!(
            (k.namespace.as_str(), k.port),
            ("serving", PortSpec::Number(8000))
        );
        assert!(
            args(&["--replicas", "http://a"])
                .unwrap()
                .kubernetes
                .is_none()
        );
        for bad in [
            vec!["--k8s-service", "Engine"],
            vec!["--k8s-service", "engine", "--k8s-namespace", "a_b"],
            vec!["--k8s-service", "engine", "--k8s-port", "0"],
            vec!["--k8s-service", "engine", "--k8s-port", "Web"],
            // The namespace or port alone discover nothing.
            vec!["--k8s-namespace", "serving"],
        ] {
            assert!(args(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn debug_output_hides_the_redis_password() {
        let c = args(&[
            "--redis-url",
            "redis://:hunter2@127.0.0.1:6379",
            "--redis-password",
            "s3cret",
        ])
        .unwrap();
        let text = format!("{c:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("s3cret"),
            "{text}"
        );
    }
}

//! The variables the operator gives engine and router containers are the binaries' real flags:
//! every `HOTPREFIX_*` variable is looked up among the `env` names of `hotprefix-engine`'s and
//! `hotprefix-router`'s own clap commands, turned into that flag, and the command lines are
//! parsed and validated by the binaries' own code. A renamed flag, a value of the wrong type or
//! a stray variable fails here. Files the containers read from ConfigMap volumes (the chat
//! template) are staged where the mounts would put them, from the ConfigMaps the operator
//! builds, so a flag naming a path that no mount provides fails too.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use hotprefix_engine::config::EngineArgs;
use hotprefix_operator::crd::HotPrefixService;
use hotprefix_operator::render;
use hotprefix_operator::resources::{self, Children, Defaults};
use hotprefix_router::config::RouterArgs;
use hotprefix_router::kubernetes::PortSpec;
use k8s_openapi::api::core::v1::{Container, PodSpec};

/// Variables that are not flags: the pod address the advertise URL is built from.
const NOT_FLAGS: &[&str] = &["POD_IP"];

fn example(name: &str) -> HotPrefixService {
    let text = std::fs::read_to_string(format!(
        "{}/../examples/{name}.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut h = render::parse(&text).unwrap();
    h.metadata.namespace.get_or_insert_with(|| "default".into());
    h
}

/// A directory of this test run standing in for the pods' `/models`.
fn models_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hotprefix-flags-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Maps a `/models/...` path into `root`, creating what the engine expects there: an (empty)
/// `.gguf` file, or a model directory with its `config.json`.
fn stage_model(value: &str, root: &Path) -> String {
    let Some(rest) = value.strip_prefix("/models/") else {
        return value.to_string();
    };
    let p = root.join(rest);
    if rest.ends_with(".gguf") {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"").unwrap();
    } else {
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("config.json"), b"{}").unwrap();
    }
    p.display().to_string()
}

/// The container's environment as the kubelet would give it: `envFrom` ConfigMap entries
/// first, then `env` (later entries win), with Secret and downward-API values replaced by
/// stand-ins and `$(VAR)` references expanded.
fn environment(
    c: &Container,
    config: Option<&BTreeMap<String, String>>,
    pod: &str,
) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut set = |k: String, v: String| match vars.iter_mut().find(|(n, _)| *n == k) {
        Some(e) => e.1 = v,
        None => vars.push((k, v)),
    };
    if c.env_from.is_some() {
        for (k, v) in config.unwrap() {
            set(k.clone(), v.clone());
        }
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                if let Some(s) = &from.secret_key_ref {
                    format!("secret-{}-{}", s.name, s.key)
                } else if let Some(f) = &from.field_ref {
                    match f.field_path.as_str() {
                        "metadata.name" => pod.to_string(),
                        "status.podIP" => "10.1.2.3".to_string(),
                        other => panic!("unexpected field {other}"),
                    }
                } else {
                    panic!("unexpected source of {}", e.name)
                }
            }
            (None, None) => String::new(),
        };
        set(e.name.clone(), value);
    }
    let snapshot = vars.clone();
    vars.into_iter()
        .map(|(k, mut v)| {
            for (name, value) in &snapshot {
                v = v.replace(&format!("$({name})"), value);
            }
            (k, v)
        })
        .collect()
}

/// Writes under `root` the files the container's ConfigMap volumes hold (the ConfigMaps looked
/// up among the operator's children), as the kubelet would mount them; returns each file's
/// path in the pod and where it was staged.
fn stage_config_maps(
    c: &Container,
    pod: &PodSpec,
    children: &Children,
    root: &Path,
) -> BTreeMap<String, PathBuf> {
    let maps: Vec<_> = children
        .chat_template
        .iter()
        .chain([&children.engine_config])
        .collect();
    let mut files = BTreeMap::new();
    for m in c.volume_mounts.iter().flatten() {
        let Some(source) = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .and_then(|v| v.config_map.as_ref())
        else {
            continue;
        };
        assert_eq!(m.read_only, Some(true), "{} is mounted read-only", m.name);
        let cm = maps
            .iter()
            .find(|cm| cm.metadata.name.as_deref() == Some(source.name.as_str()))
            .unwrap_or_else(|| panic!("volume {} names no ConfigMap of the service", m.name));
        let data = cm.data.as_ref().unwrap();
        for item in source.items.iter().flatten() {
            let staged = root
                .join(m.mount_path.trim_start_matches('/'))
                .join(&item.path);
            std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
            std::fs::write(&staged, &data[&item.key]).unwrap();
            files.insert(format!("{}/{}", m.mount_path, item.path), staged);
        }
    }
    files
}

/// The command line a binary with clap command `cmd` would take from `vars`; returns it and
/// the variables that are none of its flags. Values naming a file of `files` (a ConfigMap's,
/// staged) point at the staged copy.
fn command_line(
    cmd: &clap::Command,
    vars: &[(String, String)],
    models: &Path,
    files: &BTreeMap<String, PathBuf>,
) -> (Vec<String>, Vec<String>) {
    let mut args = vec![cmd.get_name().to_string()];
    let mut unknown = Vec::new();
    for (k, v) in vars {
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_env().and_then(|e| e.to_str()) == Some(k.as_str()))
        else {
            unknown.push(k.clone());
            continue;
        };
        let long = arg.get_long().unwrap();
        if arg.get_action().takes_values() {
            let v = if let Some(staged) = files.get(v) {
                staged.display().to_string()
            } else if long == "model" {
                stage_model(v, models)
            } else {
                v.clone()
            };
            args.push(format!("--{long}={v}"));
        } else if v == "true" {
            args.push(format!("--{long}"));
        }
    }
    (args, unknown)
}

fn children(h: &HotPrefixService) -> Children {
    resources::build(h, &Defaults::default()).unwrap()
}

fn engine_pod(c: &Children) -> &PodSpec {
    c.engine_pod().unwrap()
}

fn router_pod(c: &Children) -> &PodSpec {
    c.router_pod().unwrap()
}

fn engine_config(name: &str) -> hotprefix_engine::config::EngineConfig {
    let h = example(name);
    let c = children(&h);
    let pod = format!("{}-engine-0", h.metadata.name.clone().unwrap());
    let container = &engine_pod(&c).containers[0];
    let vars = environment(container, c.engine_config.data.as_ref(), &pod);
    let cmd = EngineArgs::command();
    let models = models_dir(&format!("engine-{name}"));
    let files = stage_config_maps(container, engine_pod(&c), &c, &models);
    let (args, unknown) = command_line(&cmd, &vars, &models, &files);
    // Variables of the user's `extraEnv` (RUST_LOG) are theirs; the operator's own are all
    // HOTPREFIX_* or OTEL_*, and each must be a flag.
    let stray: Vec<&String> = unknown
        .iter()
        .filter(|u| !NOT_FLAGS.contains(&u.as_str()))
        .filter(|u| u.starts_with("HOTPREFIX_") || u.starts_with("OTEL_"))
        .collect();
    assert!(
        stray.is_empty(),
        "no hotprefix-engine flags: {stray:?} (args: {args:?})"
    );
    let parsed = <EngineArgs as clap::Parser>::try_parse_from(&args)
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let cfg = parsed
        .validate()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let _ = std::fs::remove_dir_all(models);
    cfg
}

#[test]
fn engine_flags_of_the_minimal_example_parse_and_validate() {
    let cfg = engine_config("minimal");
    assert_eq!(cfg.listen.to_string(), "0.0.0.0:8000");
    assert!(cfg.json_logs);
    let p = cfg.publish.expect("engines publish to Redis");
    assert_eq!(
        p.replica.0, "smollm2-engine-0",
        "the pod name is the replica id"
    );
    assert_eq!(
        p.keys,
        hotprefix_protocol::cluster::Keys::new("default.smollm2").unwrap()
    );
    assert_eq!(
        p.advertise_url("0.0.0.0:8000".parse().unwrap()),
        "http://10.1.2.3:8000"
    );
    assert!(p.password.is_none());
    assert!(cfg.chat_template.is_none(), "the model's own template");
}

#[test]
fn engine_flags_of_the_full_example_parse_and_validate() {
    let cfg = engine_config("full");
    assert_eq!(cfg.block_size, 16);
    assert_eq!(cfg.device_blocks, 262_144 / 16);
    assert_eq!(cfg.host_blocks, 262_144 / 16);
    assert_eq!(
        (cfg.max_running, cfg.max_batch_tokens, cfg.max_waiting),
        (64, 4096, 512)
    );
    assert_eq!(cfg.hotness.promotion_budget_bytes, 256 << 20);
    assert_eq!(cfg.shutdown_grace.as_secs(), 60);
    assert_eq!(
        cfg.served_model_name.as_deref(),
        Some("llama-3.1-8b-instruct")
    );
    assert_eq!(
        cfg.otlp_endpoint.as_deref(),
        Some("http://otel-collector.observability.svc:4318")
    );
    // The spec's template, read from the mounted ConfigMap.
    let t = cfg.chat_template.expect("the spec's chat template");
    assert_eq!(
        Some(t.source.as_str()),
        example("full").spec.model.chat_template.as_deref()
    );
    let p = cfg.publish.unwrap();
    assert_eq!(p.replica.0, "llama-chat-engine-0");
    assert_eq!(
        p.password
            .as_ref()
            .map(hotprefix_engine::publish::Secret::expose),
        Some("secret-hotprefix-redis-password")
    );
}

#[test]
fn router_flags_of_both_examples_parse_and_validate() {
    for name in ["minimal", "full"] {
        let h = example(name);
        let c = children(&h);
        let container = &router_pod(&c).containers[0];
        let vars = environment(container, None, "router-0");
        let cmd = RouterArgs::command();
        let models = models_dir(&format!("router-{name}"));
        let files = stage_config_maps(container, router_pod(&c), &c, &models);
        let (args, unknown) = command_line(&cmd, &vars, &models, &files);
        assert!(unknown.is_empty(), "not router flags: {unknown:?}");
        let parsed = <RouterArgs as clap::Parser>::try_parse_from(&args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let cfg = parsed
            .validate()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let _ = std::fs::remove_dir_all(models);
        let ns = h.metadata.namespace.clone().unwrap();
        let service = h.metadata.name.clone().unwrap();
        let k = cfg.kubernetes.expect("EndpointSlice discovery is on");
        assert_eq!(k.service, format!("{service}-engine"));
        assert_eq!(k.namespace, ns);
        assert_eq!(k.port, PortSpec::Named("http".into()));
        assert!(cfg.redis.is_some());
        assert_eq!(
            cfg.keys,
            hotprefix_protocol::cluster::Keys::new(&format!("{ns}.{service}")).unwrap()
        );
        assert!(
            cfg.model.is_some(),
            "the router tokenizes with the engines' model"
        );
        assert!(cfg.json_logs);
        assert_eq!(cfg.listen.port(), 8080);
        // The engines' chat template, from the same ConfigMap.
        assert_eq!(
            cfg.chat_template.map(|t| t.source),
            h.spec.model.chat_template
        );
        if name == "full" {
            assert_eq!(
                cfg.proxy.api_key.as_deref(),
                Some("secret-hotprefix-api-key-key")
            );
            assert!((cfg.policy.hotprefix.host_weight - 0.9).abs() < 1e-12);
            assert_eq!(cfg.policy.hotprefix.recent_ms, 3000);
        } else {
            assert!(cfg.proxy.api_key.is_none());
        }
    }
}

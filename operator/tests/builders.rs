//! The builders against golden files (the objects rendered for `examples/minimal.yaml` and
//! `examples/full.yaml`, in `tests/golden/`), and focused checks of what must hold for every
//! spec: GPU resources, probes, security contexts, owner references, selectors that match
//! between StatefulSet, Service and PodDisruptionBudget, secrets only from Secret keys.
//!
//! `UPDATE_GOLDEN=1 cargo test -p hotprefix-operator --test builders` rewrites the golden
//! files after an intended change; review the diff.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use hotprefix_operator::crd::{
    ExternalRedis, HostPathSource, HotPrefixService, ModelSource, PvcSource, RedisSpec,
    SecretKeyRef,
};
use hotprefix_operator::render;
use hotprefix_operator::resources::{self, Children, Defaults};
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, Volume};
use serde_json::Value;

/// The uid the rendered objects' owner references name.
const UID: &str = "6d0f7f0e-4a5c-4b7e-9a51-000000000001";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example_text(name: &str) -> String {
    std::fs::read_to_string(root().join("examples").join(format!("{name}.yaml"))).unwrap()
}

fn example(name: &str) -> HotPrefixService {
    let mut hps = render::parse(&example_text(name)).unwrap();
    hps.metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    hps.metadata.uid = Some(UID.into());
    hps
}

fn build(hps: &HotPrefixService) -> Children {
    resources::build(hps, &Defaults::default()).unwrap()
}

fn golden(name: &str) {
    let got = render::render(
        &example_text(name),
        "default",
        Some(UID),
        &Defaults::default(),
    )
    .unwrap();
    let path = root().join(format!("operator/tests/golden/{name}.yaml"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    if got != want {
        let line = got
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| got.lines().count().min(want.lines().count()));
        panic!(
            "{} differs from the rendered objects at line {} (rerun with UPDATE_GOLDEN=1 \
             after an intended change):\n  golden:   {:?}\n  rendered: {:?}",
            path.display(),
            line + 1,
            want.lines().nth(line),
            got.lines().nth(line)
        );
    }
}

#[test]
fn minimal_example_renders_its_golden_file() {
    golden("minimal");
}

#[test]
fn full_example_renders_its_golden_file() {
    golden("full");
}

fn pod(c: &Children) -> &PodSpec {
    c.engine_pod().unwrap()
}

fn router_pod(c: &Children) -> &PodSpec {
    c.router_pod().unwrap()
}

/// The pod's volume named `name`.
fn volume<'a>(p: &'a PodSpec, name: &str) -> &'a Volume {
    p.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

fn container<'a>(p: &'a PodSpec, name: &str) -> &'a Container {
    p.containers.iter().find(|c| c.name == name).unwrap()
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a EnvVar> {
    c.env.iter().flatten().find(|e| e.name == name)
}

#[test]
fn engine_gets_its_gpus_as_equal_requests_and_limits() {
    let c = build(&example("full"));
    let r = container(pod(&c), "engine").resources.clone().unwrap();
    let gpu = |l: &Option<BTreeMap<String, _>>| {
        l.as_ref().and_then(
            |l: &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>| {
                l.get("nvidia.com/gpu").map(|q| q.0.clone())
            },
        )
    };
    assert_eq!(gpu(&r.requests).as_deref(), Some("1"));
    assert_eq!(gpu(&r.limits).as_deref(), Some("1"));
    // The user's CPU and memory stay.
    assert_eq!(r.limits.unwrap()["memory"].0, "64Gi");
    assert_eq!(
        c.engine_config.data.as_ref().unwrap()["HOTPREFIX_BACKEND"],
        "cuda"
    );
    // Without GPUs: no GPU resource, and the CPU backend whatever `backend` says.
    let c = build(&example("minimal"));
    assert!(container(pod(&c), "engine").resources.is_none());
    assert_eq!(
        c.engine_config.data.as_ref().unwrap()["HOTPREFIX_BACKEND"],
        "cpu"
    );
}

#[test]
fn probes_check_health_and_readiness_on_the_named_port() {
    for name in ["minimal", "full"] {
        let c = build(&example(name));
        let e = container(pod(&c), "engine");
        let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
            let g = p.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(
                g.port,
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("http".into())
            );
            g.path.clone().unwrap()
        };
        assert_eq!(path(&e.readiness_probe), "/ready");
        assert_eq!(path(&e.liveness_probe), "/health");
        assert_eq!(path(&e.startup_probe), "/health");
        // The startup probe covers the whole startup timeout.
        let s = e.startup_probe.as_ref().unwrap();
        let timeout = example(name).spec.engine.startup_timeout_seconds;
        assert!(s.failure_threshold.unwrap() * s.period_seconds.unwrap() >= timeout);
        let r = container(router_pod(&c), "router");
        assert_eq!(path(&r.readiness_probe), "/health");
        assert_eq!(path(&r.liveness_probe), "/health");
        // A stopping pod keeps serving a moment, then drains within its grace period.
        let pre_stop = e.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
        let sleep = pre_stop.sleep.as_ref().unwrap().seconds;
        let grace = pod(&c).termination_grace_period_seconds.unwrap();
        let drain = c
            .engine_config
            .data
            .as_ref()
            .unwrap()
            .get("HOTPREFIX_SHUTDOWN_GRACE_S")
            .map_or(30, |g| g.parse::<i64>().unwrap());
        assert!(grace > sleep + drain, "{grace} <= {sleep} + {drain}");
    }
}

fn pods(c: &Children) -> Vec<&PodSpec> {
    let mut v = vec![pod(c), router_pod(c)];
    if let Some(r) = &c.redis {
        v.push(
            r.deployment
                .spec
                .as_ref()
                .unwrap()
                .template
                .spec
                .as_ref()
                .unwrap(),
        );
    }
    v
}

#[test]
fn every_pod_and_container_runs_unprivileged() {
    for name in ["minimal", "full"] {
        let c = build(&example(name));
        for p in pods(&c) {
            let s = p.security_context.as_ref().unwrap();
            assert_eq!(s.run_as_non_root, Some(true));
            assert!(s.run_as_user.unwrap() > 0);
            assert_eq!(s.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
            for ctr in p
                .containers
                .iter()
                .chain(p.init_containers.iter().flatten())
            {
                let s = ctr.security_context.as_ref().unwrap();
                assert_eq!(s.allow_privilege_escalation, Some(false), "{}", ctr.name);
                assert_eq!(s.read_only_root_filesystem, Some(true), "{}", ctr.name);
                assert_eq!(s.privileged, Some(false), "{}", ctr.name);
                assert_eq!(
                    s.capabilities.as_ref().unwrap().drop.as_deref(),
                    Some(&["ALL".to_string()][..])
                );
            }
        }
        // Only the router talks to the API server.
        assert_eq!(pod(&c).automount_service_account_token, Some(false));
        assert_eq!(router_pod(&c).automount_service_account_token, Some(true));
        assert_eq!(
            router_pod(&c).service_account_name,
            c.router_account.metadata.name
        );
    }
}

#[test]
fn every_child_is_owned_by_the_service_and_labelled_as_managed() {
    for name in ["minimal", "full"] {
        let hps = example(name);
        for obj in build(&hps).objects().unwrap() {
            let meta = &obj["metadata"];
            let what = format!("{} {}", obj["kind"], meta["name"]);
            let owners = meta["ownerReferences"].as_array().unwrap();
            assert_eq!(owners.len(), 1, "{what}");
            let o = &owners[0];
            assert_eq!(o["uid"], UID, "{what}");
            assert_eq!(o["kind"], "HotPrefixService", "{what}");
            assert_eq!(o["apiVersion"], "hotprefix.dev/v1alpha1", "{what}");
            assert_eq!(o["controller"], true, "{what}");
            assert_eq!(o["name"], hps.metadata.name.clone().unwrap(), "{what}");
            assert_eq!(
                meta["labels"]["app.kubernetes.io/managed-by"], "hotprefix-operator",
                "{what}"
            );
            assert_eq!(meta["namespace"], hps.metadata.namespace.clone().unwrap());
            // Nothing holds a finalizer: deleting the service leaves the children to the
            // garbage collector.
            assert!(meta.get("finalizers").is_none(), "{what}");
        }
    }
}

fn selector_of(v: &Value, path: &[&str]) -> BTreeMap<String, String> {
    let mut x = v;
    for p in path {
        x = &x[p];
    }
    serde_json::from_value(x.clone()).unwrap()
}

#[test]
fn selectors_match_between_workloads_services_and_budgets() {
    for name in ["minimal", "full"] {
        let hps = example(name);
        let c = build(&hps);
        let sts = serde_json::to_value(&c.engine).unwrap();
        let svc = serde_json::to_value(&c.engine_service).unwrap();
        let pdb = serde_json::to_value(&c.engine_pdb).unwrap();
        let sel = selector_of(&sts, &["spec", "selector", "matchLabels"]);
        assert_eq!(sel, selector_of(&svc, &["spec", "selector"]));
        assert_eq!(sel, selector_of(&pdb, &["spec", "selector", "matchLabels"]));
        let labels = selector_of(&sts, &["spec", "template", "metadata", "labels"]);
        assert!(
            sel.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "{sel:?} vs {labels:?}"
        );
        // The status's selector (scale subresource) is the same set.
        let s = resources::selector_string(&hps, "engine");
        let parsed: BTreeMap<String, String> = s
            .split(',')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        assert_eq!(parsed, sel);
        // The headless Service names the StatefulSet's pods.
        assert_eq!(sts["spec"]["serviceName"], svc["metadata"]["name"]);
        assert_eq!(svc["spec"]["clusterIP"], "None");
        let dep = serde_json::to_value(&c.router).unwrap();
        let rsvc = serde_json::to_value(&c.router_service).unwrap();
        let rpdb = serde_json::to_value(&c.router_pdb).unwrap();
        let rsel = selector_of(&dep, &["spec", "selector", "matchLabels"]);
        assert_eq!(rsel, selector_of(&rsvc, &["spec", "selector"]));
        assert_eq!(
            rsel,
            selector_of(&rpdb, &["spec", "selector", "matchLabels"])
        );
        assert_ne!(rsel, sel, "router and engine pods are told apart");
        if let Some(r) = &c.redis {
            let d = serde_json::to_value(&r.deployment).unwrap();
            let s = serde_json::to_value(&r.service).unwrap();
            assert_eq!(
                selector_of(&d, &["spec", "selector", "matchLabels"]),
                selector_of(&s, &["spec", "selector"])
            );
        }
        // The router discovers the engines through that Service, by port name.
        let r = container(router_pod(&c), "router");
        assert_eq!(
            env(r, "HOTPREFIX_K8S_SERVICE").unwrap().value,
            c.engine_service.metadata.name
        );
        let port = &c
            .engine_service
            .spec
            .as_ref()
            .unwrap()
            .ports
            .as_ref()
            .unwrap()[0];
        assert_eq!(
            env(r, "HOTPREFIX_K8S_PORT").unwrap().value,
            port.name.clone()
        );
    }
}

#[test]
fn secrets_reach_containers_only_through_secret_key_refs() {
    let c = build(&example("full"));
    let all = serde_json::to_string(&c.objects().unwrap()).unwrap();
    let from_secret = |ctr: &Container, var: &str, secret: &str, key: &str| {
        let e = env(ctr, var).unwrap_or_else(|| panic!("{var} missing"));
        assert!(e.value.is_none(), "{var} is inline");
        let r = e
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!((r.name.as_str(), r.key.as_str()), (secret, key));
    };
    let engine = container(pod(&c), "engine");
    from_secret(
        engine,
        "HOTPREFIX_REDIS_PASSWORD",
        "hotprefix-redis",
        "password",
    );
    let router = container(router_pod(&c), "router");
    from_secret(
        router,
        "HOTPREFIX_REDIS_PASSWORD",
        "hotprefix-redis",
        "password",
    );
    from_secret(router, "HOTPREFIX_API_KEY", "hotprefix-api-key", "key");
    let redis = c.redis.as_ref().unwrap();
    let redis_pod = redis
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let r = container(redis_pod, "redis");
    from_secret(r, "REDIS_PASSWORD", "hotprefix-redis", "password");
    assert!(
        r.args
            .as_ref()
            .unwrap()
            .windows(2)
            .any(|w| w == ["--requirepass", "$(REDIS_PASSWORD)"])
    );
    let data = c.engine_config.data.as_ref().unwrap();
    assert!(
        !data.contains_key("HOTPREFIX_REDIS_PASSWORD") && !data.contains_key("HOTPREFIX_API_KEY")
    );
    assert!(data["HOTPREFIX_REDIS_URL"].starts_with("redis://llama-chat-redis.serving.svc:6379"));
    assert!(!data["HOTPREFIX_REDIS_URL"].contains('@'));
    // No object carries a Secret's data.
    assert!(!all.contains("\"kind\":\"Secret\""));
}

#[test]
fn router_may_only_list_and_watch_endpoint_slices_of_its_namespace() {
    let c = build(&example("full"));
    let rules = c.router_role.rules.clone().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].api_groups.as_deref(),
        Some(&["discovery.k8s.io".to_string()][..])
    );
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["endpointslices".to_string()][..])
    );
    assert_eq!(rules[0].verbs, ["list", "watch"]);
    assert_eq!(c.router_role.metadata.namespace.as_deref(), Some("serving"));
    let b = &c.router_binding;
    assert_eq!(b.role_ref.kind, "Role");
    assert_eq!(Some(b.role_ref.name.clone()), c.router_role.metadata.name);
    let s = &b.subjects.as_ref().unwrap()[0];
    assert_eq!(s.kind, "ServiceAccount");
    assert_eq!(Some(s.name.clone()), c.router_account.metadata.name);
    assert_eq!(
        router_pod(&c).service_account_name,
        c.router_account.metadata.name
    );
}

#[test]
fn a_changed_engine_setting_rolls_the_engines_and_nothing_else_does() {
    let hash = |h: &HotPrefixService| {
        build(h)
            .engine
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()["hotprefix.dev/config-hash"]
            .clone()
    };
    let base = example("full");
    assert_eq!(hash(&base), hash(&base.clone()));
    let mut changed = base.clone();
    changed.spec.engine.cache.host_cache_tokens = Some(1 << 20);
    assert_ne!(hash(&base), hash(&changed));
    let mut routers = base.clone();
    routers.spec.router.replicas = 5;
    assert_eq!(hash(&base), hash(&routers));
}

fn template_annotations(c: &Children) -> [Option<String>; 2] {
    let engine = c.engine.spec.as_ref().unwrap().template.metadata.as_ref();
    let router = c.router.spec.as_ref().unwrap().template.metadata.as_ref();
    [engine, router].map(|m| {
        m.and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get("hotprefix.dev/chat-template-hash"))
            .cloned()
    })
}

#[test]
fn a_chat_template_reaches_engines_and_routers_and_a_change_rolls_both() {
    let h = example("full");
    let c = build(&h);
    let cm = c
        .chat_template
        .as_ref()
        .expect("the full example has a template");
    assert_eq!(
        cm.metadata.name.as_deref(),
        Some("llama-chat-chat-template")
    );
    assert_eq!(
        Some(&cm.data.as_ref().unwrap()["chat_template.jinja"]),
        h.spec.model.chat_template.as_ref()
    );
    let file = "/etc/hotprefix/chat-template/chat_template.jinja";
    // The engine's flag comes with its ConfigMap (so it is part of the config hash), the
    // router's inline; both name the file the read-only mount provides.
    assert_eq!(
        c.engine_config.data.as_ref().unwrap()["HOTPREFIX_CHAT_TEMPLATE"],
        file
    );
    let r = container(router_pod(&c), "router");
    assert_eq!(
        env(r, "HOTPREFIX_CHAT_TEMPLATE").unwrap().value.as_deref(),
        Some(file)
    );
    for p in [pod(&c), router_pod(&c)] {
        let v = volume(p, "chat-template");
        let source = v.config_map.as_ref().unwrap();
        assert_eq!(Some(source.name.clone()), cm.metadata.name);
        assert_eq!(source.items.as_ref().unwrap()[0].key, "chat_template.jinja");
        let m = p.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "chat-template")
            .unwrap();
        assert_eq!(
            (m.mount_path.as_str(), m.read_only),
            ("/etc/hotprefix/chat-template", Some(true))
        );
    }
    // Both pod templates carry the template's hash: another template rolls both, the engine
    // settings staying as they were.
    let [engine_hash, router_hash] = template_annotations(&c);
    assert!(engine_hash.is_some() && router_hash == engine_hash);
    let mut changed = h.clone();
    changed.spec.model.chat_template = Some("{{ messages[0].content }}".into());
    let c2 = build(&changed);
    let [e2, r2] = template_annotations(&c2);
    assert!(e2.is_some() && e2 != engine_hash && r2 == e2);
    assert_eq!(c2.engine_config, c.engine_config);
    // Without one: no ConfigMap, flag, volume or annotation anywhere.
    let mut none = h.clone();
    none.spec.model.chat_template = None;
    for c in [build(&none), build(&example("minimal"))] {
        assert!(c.chat_template.is_none());
        assert_eq!(template_annotations(&c), [None, None]);
        let all = serde_json::to_string(&c.objects().unwrap()).unwrap();
        assert!(
            !all.contains("HOTPREFIX_CHAT_TEMPLATE") && !all.contains("chat-template"),
            "{all}"
        );
    }
}

#[test]
fn extra_env_replaces_a_managed_variable_in_place() {
    let mut h = example("minimal");
    h.spec.engine.extra_env = Some(vec![
        EnvVar {
            name: "HOTPREFIX_ADVERTISE_URL".into(),
            value: Some("http://engine.example:8000".into()),
            ..EnvVar::default()
        },
        EnvVar {
            name: "HOTPREFIX_THREADS".into(),
            value: Some("4".into()),
            ..EnvVar::default()
        },
    ]);
    let c = build(&h);
    let e = container(pod(&c), "engine");
    let names: Vec<&str> = e.env.iter().flatten().map(|v| v.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "HOTPREFIX_REPLICA_ID",
            "POD_IP",
            "HOTPREFIX_ADVERTISE_URL",
            "HOTPREFIX_THREADS"
        ]
    );
    assert_eq!(
        env(e, "HOTPREFIX_ADVERTISE_URL").unwrap().value.as_deref(),
        Some("http://engine.example:8000")
    );
}

#[test]
fn external_redis_gets_no_managed_objects_and_its_tls_settings() {
    let mut h = example("minimal");
    h.spec.redis = RedisSpec::External(ExternalRedis {
        url: "redis://cache.example:6380/3".into(),
        password_secret_ref: Some(SecretKeyRef {
            name: "redis".into(),
            key: "pw".into(),
        }),
        tls: Some(true),
        ca_secret_ref: Some(SecretKeyRef {
            name: "redis-ca".into(),
            key: "ca.pem".into(),
        }),
    });
    let c = build(&h);
    assert!(c.redis.is_none());
    let data = c.engine_config.data.as_ref().unwrap();
    assert_eq!(data["HOTPREFIX_REDIS_URL"], "rediss://cache.example:6380/3");
    assert_eq!(
        data["HOTPREFIX_REDIS_CA_FILE"],
        "/etc/hotprefix/redis-ca/ca.crt"
    );
    for p in [pod(&c), router_pod(&c)] {
        let v = volume(p, "redis-ca");
        let s = v.secret.as_ref().unwrap();
        assert_eq!(s.secret_name.as_deref(), Some("redis-ca"));
        assert_eq!(s.items.as_ref().unwrap()[0].key, "ca.pem");
        let ctr = &p.containers[0];
        assert!(
            ctr.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == "redis-ca"
                    && m.mount_path == "/etc/hotprefix/redis-ca"
                    && m.read_only == Some(true))
        );
    }
    let r = container(router_pod(&c), "router");
    assert_eq!(
        env(r, "HOTPREFIX_REDIS_CA_FILE").unwrap().value.as_deref(),
        Some("/etc/hotprefix/redis-ca/ca.crt")
    );
}

#[test]
fn only_the_services_engines_and_routers_may_reach_the_managed_redis() {
    let c = build(&example("minimal"));
    let redis = c.redis.as_ref().unwrap();
    let spec = redis.network_policy.spec.as_ref().unwrap();
    let pod_labels = redis
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    let selects = |sel: &BTreeMap<String, String>, labels: &BTreeMap<String, String>| {
        sel.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    let own = spec
        .pod_selector
        .as_ref()
        .unwrap()
        .match_labels
        .clone()
        .unwrap();
    assert!(
        selects(&own, &pod_labels),
        "the policy selects the Redis pod"
    );
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_string()][..])
    );
    let rules = spec.ingress.as_ref().unwrap();
    assert_eq!(rules.len(), 1);
    let ports = rules[0].ports.as_ref().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(
        ports[0].port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(6379))
    );
    let peers: Vec<BTreeMap<String, String>> = rules[0]
        .from
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| {
            assert!(p.namespace_selector.is_none() && p.ip_block.is_none());
            p.pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .clone()
                .unwrap()
        })
        .collect();
    let template_labels = |t: &Option<
        k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    >| { t.as_ref().unwrap().labels.clone().unwrap() };
    let engine = template_labels(&c.engine.spec.as_ref().unwrap().template.metadata);
    let router = template_labels(&c.router.spec.as_ref().unwrap().template.metadata);
    assert_eq!(peers.len(), 2);
    assert!(
        peers.iter().any(|p| selects(p, &engine)),
        "engines admitted"
    );
    assert!(
        peers.iter().any(|p| selects(p, &router)),
        "routers admitted"
    );
    // Another service's engines (another instance label) are not.
    let mut other = engine.clone();
    other.insert("app.kubernetes.io/instance".into(), "other".into());
    assert!(peers.iter().all(|p| !selects(p, &other)));
}

#[test]
fn model_sources_mount_where_the_model_flag_points() {
    let c = build(&example("full"));
    let data = c.engine_config.data.as_ref().unwrap();
    assert_eq!(
        data["HOTPREFIX_MODEL"],
        "/models/meta-llama/Llama-3.1-8B-Instruct"
    );
    for p in [pod(&c), router_pod(&c)] {
        let v = volume(p, "model");
        let claim = v.persistent_volume_claim.as_ref().unwrap();
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("models", Some(true))
        );
    }
    let r = container(router_pod(&c), "router");
    assert_eq!(
        env(r, "HOTPREFIX_MODEL").unwrap().value.as_deref(),
        Some(data["HOTPREFIX_MODEL"].as_str())
    );
    // A URL: each engine downloads into its own claim, kept across restarts and scale-downs.
    let c = build(&example("minimal"));
    let sts = c.engine.spec.as_ref().unwrap();
    let claim = &sts.volume_claim_templates.as_ref().unwrap()[0];
    assert_eq!(claim.metadata.name.as_deref(), Some("model"));
    let policy = sts
        .persistent_volume_claim_retention_policy
        .as_ref()
        .unwrap();
    assert_eq!(policy.when_scaled.as_deref(), Some("Retain"));
    let init = &pod(&c).init_containers.as_ref().unwrap()[0];
    assert_eq!(
        env(init, "MODEL_FILE").unwrap().value.as_deref(),
        Some("SmolLM2-135M-Instruct.Q4_1.gguf")
    );
    assert_eq!(
        c.engine_config.data.as_ref().unwrap()["HOTPREFIX_MODEL"],
        "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    // The router downloads into an emptyDir of the cache's size.
    let rv = volume(router_pod(&c), "model");
    assert_eq!(
        rv.empty_dir
            .as_ref()
            .unwrap()
            .size_limit
            .as_ref()
            .unwrap()
            .0,
        "20Gi"
    );
    // A claim path is relative to the claim's root.
    let mut h = example("minimal");
    h.spec.model.source = ModelSource::Pvc(PvcSource {
        claim_name: "models".into(),
        path: "smol/model.gguf".into(),
    });
    let c = build(&h);
    assert_eq!(
        c.engine_config.data.as_ref().unwrap()["HOTPREFIX_MODEL"],
        "/models/smol/model.gguf"
    );
    assert!(pod(&c).init_containers.is_none());
    assert!(
        c.engine
            .spec
            .as_ref()
            .unwrap()
            .volume_claim_templates
            .is_none()
    );
    // A node path is typed, so a node without the model fails the mount with an event rather
    // than getting an empty directory created in its place.
    for (path, kind, mounted) in [
        ("/srv/models/smol.GGUF", "File", "/models/smol.GGUF"),
        ("/srv/models/llama/", "Directory", "/models/llama"),
    ] {
        let mut h = example("minimal");
        h.spec.model.source = ModelSource::HostPath(HostPathSource { path: path.into() });
        let c = build(&h);
        for p in [pod(&c), router_pod(&c)] {
            let v = volume(p, "model");
            let hp = v.host_path.as_ref().unwrap();
            assert_eq!((hp.path.as_str(), hp.type_.as_deref()), (path, Some(kind)));
        }
        assert_eq!(
            c.engine_config.data.as_ref().unwrap()["HOTPREFIX_MODEL"],
            mounted
        );
    }
}

#[test]
fn an_invalid_spec_builds_nothing_and_names_its_field() {
    let mut h = example("full");
    h.spec
        .engine
        .resources
        .as_mut()
        .unwrap()
        .limits
        .as_mut()
        .unwrap()
        .insert(
            "memory".into(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("64 gigs".into()),
        );
    let e = resources::build(&h, &Defaults::default()).unwrap_err();
    assert_eq!(e.field, "spec.engine.resources.limits.memory");
    let mut h = example("minimal");
    h.metadata.namespace = None;
    assert_eq!(
        resources::build(&h, &Defaults::default())
            .unwrap_err()
            .field,
        "metadata.namespace"
    );
}

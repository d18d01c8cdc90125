//! The engine's objects: the ConfigMap of its flags, the headless Service, the StatefulSet and
//! its PodDisruptionBudget.
//!
//! Every `hotprefix-engine` flag is also a `HOTPREFIX_*` environment variable
//! (engine/src/config.rs); the ConfigMap holds the non-secret ones and the pods load it with
//! `envFrom`, while the Redis password arrives from its Secret and the pod's own name and
//! address from the downward API. The pod name is the replica id in Redis, and the router's
//! EndpointSlice discovery uses the same name, so both views of a replica agree.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EnvFromSource, EnvVar, EnvVarSource,
    HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, Service, ServicePort, ServiceSpec, SleepAction,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::model::{PodKind, model_mount};
use super::{
    CHAT_TEMPLATE_HASH_ANNOTATION, CONFIG_HASH_ANNOTATION, Ctx, ENGINE_PORT, PRESTOP_SLEEP_SECONDS,
    config_hash, container_security, env, merge_env, pod_security, pod_storage, secret_env, spread,
};
use crate::crd::Backend;
use crate::quantity;

/// The engine's own default of `--shutdown-grace-s`.
const ENGINE_SHUTDOWN_GRACE_SECONDS: i64 = 30;
/// Seconds between startup probes.
const STARTUP_PERIOD_SECONDS: i32 = 10;

/// The engine's non-secret flags as `HOTPREFIX_*` variables. Knobs the spec leaves out are
/// left out here too, so the engine's own defaults apply.
pub(super) fn config_map(ctx: &Ctx<'_>) -> ConfigMap {
    let spec = &ctx.hps.spec;
    let e = &spec.engine;
    let mut d = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        d.insert(k.to_string(), v);
    };
    let model = model_mount(ctx, PodKind::Engine);
    put("HOTPREFIX_MODEL", model.model);
    if let Some(t) = model.chat_template {
        put("HOTPREFIX_CHAT_TEMPLATE", t);
    }
    put("HOTPREFIX_LISTEN", format!("0.0.0.0:{ENGINE_PORT}"));
    // Without GPUs the CPU backend is the only one; `auto` could pick up a GPU the pod was
    // not allocated on a node whose runtime exposes them all.
    let backend = if e.gpus == 0 { Backend::Cpu } else { e.backend };
    put("HOTPREFIX_BACKEND", backend.as_str().into());
    put("HOTPREFIX_LOG_FORMAT", "json".into());
    put("HOTPREFIX_SERVICE", ctx.names.redis_service_key());
    let (url, _, ca) = ctx.redis_target();
    put("HOTPREFIX_REDIS_URL", url);
    if ca.is_some() {
        put("HOTPREFIX_REDIS_CA_FILE", super::REDIS_CA_FILE.into());
    }
    if let Some(n) = &spec.model.name {
        put("HOTPREFIX_SERVED_MODEL_NAME", n.clone());
    }
    if let Some(f) = e.device_memory_fraction {
        put("HOTPREFIX_GPU_MEMORY_FRACTION", f.to_string());
    }
    let c = &e.cache;
    if let Some(p) = c.policy {
        put("HOTPREFIX_POLICY", p.as_str().into());
    }
    if let Some(b) = c.block_size {
        put("HOTPREFIX_BLOCK_SIZE", b.to_string());
    }
    if let Some(t) = c.device_cache_tokens {
        put("HOTPREFIX_DEVICE_CACHE_TOKENS", t.to_string());
    }
    if let Some(t) = c.host_cache_tokens {
        put("HOTPREFIX_HOST_CACHE_TOKENS", t.to_string());
    }
    if let Some(h) = &c.hotness {
        if let Some(v) = h.half_life_turnovers {
            put("HOTPREFIX_HALF_LIFE_TURNOVERS", v.to_string());
        }
        if let Some(v) = h.admission_floor {
            put("HOTPREFIX_ADMISSION_FLOOR", v.to_string());
        }
        if let Some(v) = h.promotion_interval_seconds {
            put("HOTPREFIX_PROMOTION_INTERVAL_S", v.to_string());
        }
        // Checked by `validate`; an unparsable value never gets here.
        if let Some(b) = h
            .promotion_budget
            .as_deref()
            .and_then(|b| quantity::bytes(b).ok())
        {
            put("HOTPREFIX_PROMOTION_BUDGET_BYTES", b.to_string());
        }
    }
    let b = &e.batching;
    for (k, v) in [
        ("HOTPREFIX_MAX_RUNNING", b.max_running),
        ("HOTPREFIX_MAX_BATCH_TOKENS", b.max_batch_tokens),
        ("HOTPREFIX_MAX_WAITING", b.max_waiting),
    ] {
        if let Some(v) = v {
            put(k, v.to_string());
        }
    }
    if let Some(g) = e.shutdown_grace_seconds {
        put("HOTPREFIX_SHUTDOWN_GRACE_S", g.to_string());
    }
    if let Some(o) = &spec.otlp_endpoint {
        put("OTEL_EXPORTER_OTLP_ENDPOINT", o.clone());
    }
    ConfigMap {
        metadata: ctx.meta(ctx.names.engine(), "engine"),
        data: Some(d),
        ..ConfigMap::default()
    }
}

/// The headless Service of the StatefulSet: stable DNS names for the pods and the
/// EndpointSlices the router discovers replicas from (ready endpoints only).
pub(super) fn service(ctx: &Ctx<'_>) -> Service {
    Service {
        metadata: ctx.meta(ctx.names.engine(), "engine"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(ctx.selector("engine")),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: ENGINE_PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            publish_not_ready_addresses: Some(false),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// A variable from the pod's own fields (downward API).
fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The engine container's resources: the spec's CPU and memory, plus its GPUs as requests and
/// limits of the extended resource (which Kubernetes requires to be equal).
fn resources(ctx: &Ctx<'_>) -> Option<ResourceRequirements> {
    let e = &ctx.hps.spec.engine;
    let mut r = e.resources.clone().unwrap_or_default();
    if e.gpus > 0 {
        let gpus = Quantity(e.gpus.to_string());
        for list in [&mut r.requests, &mut r.limits] {
            list.get_or_insert_with(BTreeMap::new)
                .insert(e.gpu_resource_name.clone(), gpus.clone());
        }
    }
    (r != ResourceRequirements::default()).then_some(r)
}

/// The engines: one pod per replica with a stable name (the replica id in Redis), rolled one
/// at a time on any change of the spec, of the ConfigMap or of the chat template.
pub(super) fn stateful_set(
    ctx: &Ctx<'_>,
    config: &ConfigMap,
    chat_template: Option<&ConfigMap>,
) -> StatefulSet {
    let e = &ctx.hps.spec.engine;
    let mut model = model_mount(ctx, PodKind::Engine);
    let (_, password, ca) = ctx.redis_target();
    let mut vars = vec![
        // The replica id and the URL routers reach the pod at. The id is the pod name, which
        // is also the host name the engine would default to; set explicitly so that nothing
        // (a `hostname` field, a runtime) can make them differ. On an IPv6 pod the URL expands
        // to a bare address, which the engine brackets.
        field_env("HOTPREFIX_REPLICA_ID", "metadata.name"),
        field_env("POD_IP", "status.podIP"),
        env(
            "HOTPREFIX_ADVERTISE_URL",
            format!("http://$(POD_IP):{ENGINE_PORT}"),
        ),
    ];
    if let Some(p) = password {
        vars.push(secret_env("HOTPREFIX_REDIS_PASSWORD", p));
    }
    let (volumes, mounts) = pod_storage(
        std::mem::take(&mut model.volumes),
        std::mem::take(&mut model.mounts),
        ca,
    );
    let grace = e
        .shutdown_grace_seconds
        .map_or(ENGINE_SHUTDOWN_GRACE_SECONDS, i64::from);
    let container = Container {
        name: "engine".into(),
        image: Some(
            e.image
                .clone()
                .unwrap_or_else(|| ctx.defaults.engine_image.clone()),
        ),
        image_pull_policy: e.image_pull_policy.map(|p| p.as_str().into()),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: ctx.names.engine(),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        }]),
        env: Some(merge_env(vars, e.extra_env.as_ref())),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: ENGINE_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        // Model loading can take long: the startup probe gives it `startupTimeoutSeconds`,
        // then liveness takes over. Readiness is `/ready`, which is false while draining.
        startup_probe: Some(http_probe(
            "/health",
            STARTUP_PERIOD_SECONDS,
            (e.startup_timeout_seconds + STARTUP_PERIOD_SECONDS - 1) / STARTUP_PERIOD_SECONDS,
        )),
        liveness_probe: Some(http_probe("/health", 10, 3)),
        readiness_probe: Some(http_probe("/ready", 5, 2)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRESTOP_SLEEP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        resources: resources(ctx),
        security_context: Some(container_security()),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let mut spread_constraints = Vec::new();
    if e.spread_across_nodes {
        spread_constraints.push(spread(ctx, "engine"));
    }
    let pod = PodSpec {
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(pod_security()),
        // The preStop delay, then the engine's drain, then a margin for its exit.
        termination_grace_period_seconds: Some(PRESTOP_SLEEP_SECONDS + grace + 10),
        init_containers: model.init.map(|i| vec![i]),
        containers: vec![container],
        volumes: Some(volumes),
        node_selector: e.node_selector.clone(),
        tolerations: e.tolerations.clone(),
        affinity: e.affinity.clone(),
        priority_class_name: e.priority_class_name.clone(),
        runtime_class_name: e.runtime_class_name.clone(),
        topology_spread_constraints: (!spread_constraints.is_empty()).then_some(spread_constraints),
        ..PodSpec::default()
    };
    let has_claim = model.claim_template.is_some();
    let mut annotations =
        BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_string(), config_hash(config))]);
    if let Some(t) = chat_template {
        annotations.insert(CHAT_TEMPLATE_HASH_ANNOTATION.to_string(), config_hash(t));
    }
    StatefulSet {
        metadata: ctx.meta(ctx.names.engine(), "engine"),
        spec: Some(StatefulSetSpec {
            replicas: Some(e.replicas),
            service_name: Some(ctx.names.engine()),
            // Scaling starts and stops pods in parallel (replicas are independent); updates
            // still roll one pod at a time, each waiting for the previous one to be ready.
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                ..StatefulSetUpdateStrategy::default()
            }),
            selector: LabelSelector {
                match_labels: Some(ctx.selector("engine")),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(ctx.labels("engine")),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            volume_claim_templates: model.claim_template.map(|c| vec![c]),
            // Download caches go with the service, but survive a scale-down so that scaling
            // up again does not download again.
            persistent_volume_claim_retention_policy: has_claim.then(|| {
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Delete".into()),
                    when_scaled: Some("Retain".into()),
                }
            }),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

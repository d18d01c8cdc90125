//! The router's objects: its ServiceAccount with a Role that reads the EndpointSlices of its
//! namespace (and nothing else), the Deployment, and the Service that is the endpoint.
//!
//! The router finds engines two ways at once (router/src/config.rs): their registrations in
//! Redis, and the ready endpoints of the engines' headless Service (`--k8s-service`); a pod
//! name is the replica id in both, so they merge.

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerPort, HTTPGetAction, Lifecycle, LifecycleHandler, PodSpec,
    PodTemplateSpec, Probe, Service, ServiceAccount, ServicePort, ServiceSpec, SleepAction,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::model::{PodKind, model_mount};
use super::{
    CHAT_TEMPLATE_HASH_ANNOTATION, Ctx, PRESTOP_SLEEP_SECONDS, REDIS_CA_FILE, ROUTER_PORT,
    config_hash, container_security, env, merge_env, pod_security, pod_storage, secret_env, spread,
};

/// Seconds a stopping router has to finish in-flight streams.
const ROUTER_GRACE_SECONDS: i64 = 60;

pub(super) fn service_account(ctx: &Ctx<'_>) -> ServiceAccount {
    ServiceAccount {
        metadata: ctx.meta(ctx.names.router(), "router"),
        ..ServiceAccount::default()
    }
}

/// List and watch of EndpointSlices in the router's namespace: exactly what its discovery's
/// watcher does (router/src/kubernetes.rs).
pub(super) fn role(ctx: &Ctx<'_>) -> Role {
    Role {
        metadata: ctx.meta(ctx.names.router(), "router"),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["discovery.k8s.io".into()]),
            resources: Some(vec!["endpointslices".into()]),
            verbs: vec!["list".into(), "watch".into()],
            ..PolicyRule::default()
        }]),
    }
}

pub(super) fn role_binding(ctx: &Ctx<'_>) -> RoleBinding {
    RoleBinding {
        metadata: ctx.meta(ctx.names.router(), "router"),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: ctx.names.router(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: ctx.names.router(),
            namespace: Some(ctx.names.namespace.clone()),
            ..Subject::default()
        }]),
    }
}

fn health_probe(period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/health".into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// The router's flags as `HOTPREFIX_*` variables; secrets from their Secret keys.
fn vars(
    ctx: &Ctx<'_>,
    model: &str,
    chat_template: Option<&str>,
) -> Vec<k8s_openapi::api::core::v1::EnvVar> {
    let spec = &ctx.hps.spec;
    let r = &spec.router;
    let (url, password, ca) = ctx.redis_target();
    let mut v = vec![
        env("HOTPREFIX_ROUTER_LISTEN", format!("0.0.0.0:{ROUTER_PORT}")),
        env("HOTPREFIX_SERVICE", ctx.names.redis_service_key()),
        env("HOTPREFIX_REDIS_URL", url),
    ];
    if let Some(p) = password {
        v.push(secret_env("HOTPREFIX_REDIS_PASSWORD", p));
    }
    if ca.is_some() {
        v.push(env("HOTPREFIX_REDIS_CA_FILE", REDIS_CA_FILE));
    }
    v.extend([
        env("HOTPREFIX_K8S_SERVICE", ctx.names.engine()),
        env("HOTPREFIX_K8S_NAMESPACE", ctx.names.namespace.clone()),
        env("HOTPREFIX_K8S_PORT", "http"),
        env("HOTPREFIX_MODEL", model),
        env("HOTPREFIX_JSON_LOGS", "true"),
    ]);
    if let Some(t) = chat_template {
        v.push(env("HOTPREFIX_CHAT_TEMPLATE", t));
    }
    if let Some(p) = r.policy {
        v.push(env("HOTPREFIX_POLICY", p.as_str()));
    }
    if let Some(w) = &r.weights {
        for (k, x) in [
            ("HOTPREFIX_HOST_WEIGHT", w.host_weight),
            ("HOTPREFIX_LOAD_WEIGHT", w.load_weight),
            ("HOTPREFIX_QUEUE_EXTERNALITY", w.queue_externality),
            ("HOTPREFIX_HOT_SPOT_FACTOR", w.hot_spot_factor),
        ] {
            if let Some(x) = x {
                v.push(env(k, x.to_string()));
            }
        }
        if let Some(ms) = w.recent_ms {
            v.push(env("HOTPREFIX_RECENT_MS", ms.to_string()));
        }
    }
    if let Some(k) = &r.api_key_secret_ref {
        v.push(secret_env("HOTPREFIX_API_KEY", k));
    }
    if let Some(o) = &spec.otlp_endpoint {
        v.push(env("OTEL_EXPORTER_OTLP_ENDPOINT", o.clone()));
    }
    v
}

/// The routers, rolled on any change of the spec or of the chat template (its hash is in the
/// pod template).
pub(super) fn deployment(ctx: &Ctx<'_>, chat_template: Option<&ConfigMap>) -> Deployment {
    let r = &ctx.hps.spec.router;
    let mut model = model_mount(ctx, PodKind::Router);
    let (_, _, ca) = ctx.redis_target();
    let (volumes, mounts) = pod_storage(
        std::mem::take(&mut model.volumes),
        std::mem::take(&mut model.mounts),
        ca,
    );
    let container = Container {
        name: "router".into(),
        image: Some(
            r.image
                .clone()
                .unwrap_or_else(|| ctx.defaults.router_image.clone()),
        ),
        image_pull_policy: r.image_pull_policy.map(|p| p.as_str().into()),
        env: Some(merge_env(
            vars(ctx, &model.model, model.chat_template.as_deref()),
            r.extra_env.as_ref(),
        )),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: ROUTER_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        // `/health` answers while the process serves, even with no engine ready: the Service
        // keeps its endpoints and clients get the router's clear 503 rather than a refused
        // connection. Loading the tokenizer is quick, but a downloaded model takes a while:
        // the startup probe waits as long as an engine would.
        startup_probe: Some(Probe {
            failure_threshold: Some((ctx.hps.spec.engine.startup_timeout_seconds + 9) / 10),
            ..health_probe(10)
        }),
        liveness_probe: Some(health_probe(10)),
        readiness_probe: Some(health_probe(5)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRESTOP_SLEEP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        resources: r.resources.clone(),
        security_context: Some(container_security()),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let pod = PodSpec {
        service_account_name: Some(ctx.names.router()),
        automount_service_account_token: Some(true),
        enable_service_links: Some(false),
        security_context: Some(pod_security()),
        termination_grace_period_seconds: Some(PRESTOP_SLEEP_SECONDS + ROUTER_GRACE_SECONDS),
        init_containers: model.init.map(|i| vec![i]),
        containers: vec![container],
        volumes: Some(volumes),
        node_selector: r.node_selector.clone(),
        tolerations: r.tolerations.clone(),
        affinity: r.affinity.clone(),
        priority_class_name: r.priority_class_name.clone(),
        topology_spread_constraints: Some(vec![spread(ctx, "router")]),
        ..PodSpec::default()
    };
    Deployment {
        metadata: ctx.meta(ctx.names.router(), "router"),
        spec: Some(DeploymentSpec {
            replicas: Some(r.replicas),
            selector: LabelSelector {
                match_labels: Some(ctx.selector("router")),
                ..LabelSelector::default()
            },
            // A new router is ready before an old one stops: the endpoint never has fewer
            // routers than asked for during an update.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(ctx.labels("router")),
                    annotations: chat_template.map(|t| {
                        BTreeMap::from([(
                            CHAT_TEMPLATE_HASH_ANNOTATION.to_string(),
                            config_hash(t),
                        )])
                    }),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The endpoint: the router pods behind a Service named like the HotPrefixService.
pub(super) fn service(ctx: &Ctx<'_>) -> Service {
    let s = &ctx.hps.spec.router.service;
    let mut meta = ctx.meta(ctx.names.endpoint_service(), "router");
    meta.annotations = s.annotations.clone();
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: Some(s.type_.as_str().into()),
            selector: Some(ctx.selector("router")),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: s.port,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

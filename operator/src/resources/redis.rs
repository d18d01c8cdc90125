//! The managed Redis: one pod (a Deployment replaced, not rolled, since two would split the
//! engines' summaries), its Service, and with persistence on a claim for its append-only file.
//! Summaries and registrations are soft state that engines republish every second, so a
//! restart of an unpersisted Redis costs the router a second of summaries, nothing more.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Probe,
    Service, ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Ctx, REDIS_PORT, RedisChildren, container_security, pod_security, secret_env};
use crate::crd::{ManagedRedis, RedisSpec};

/// The default size of the persistence claim.
const DEFAULT_SIZE: &str = "1Gi";

/// The managed Redis' objects, or `None` for an external Redis.
pub(super) fn children(ctx: &Ctx<'_>) -> Option<RedisChildren> {
    let RedisSpec::Managed(m) = &ctx.hps.spec.redis else {
        return None;
    };
    Some(RedisChildren {
        deployment: deployment(ctx, m),
        service: service(ctx),
        volume: m.persistence.enabled.then(|| claim(ctx, m)),
        network_policy: network_policy(ctx),
    })
}

/// Ingress to the Redis pod from this service's engines and routers only, on the Redis port.
/// The managed Redis has no password (it holds soft state only), so the network is what keeps
/// other pods from writing summaries that would steer the routing. It takes effect where the
/// cluster's network plugin enforces NetworkPolicies.
fn network_policy(ctx: &Ctx<'_>) -> NetworkPolicy {
    let from = |component: &str| NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(ctx.selector(component)),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    };
    NetworkPolicy {
        metadata: ctx.meta(ctx.names.redis(), "redis"),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(ctx.selector("redis")),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![from("engine"), from("router")]),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(REDIS_PORT)),
                    protocol: Some("TCP".into()),
                    ..NetworkPolicyPort::default()
                }]),
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

fn claim(ctx: &Ctx<'_>, m: &ManagedRedis) -> PersistentVolumeClaim {
    let size = m
        .persistence
        .size
        .clone()
        .unwrap_or_else(|| DEFAULT_SIZE.into());
    PersistentVolumeClaim {
        metadata: ctx.meta(ctx.names.redis(), "redis"),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: m.persistence.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), Quantity(size))])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

fn probe(period: i32) -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String("redis".into()),
            ..TCPSocketAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

fn deployment(ctx: &Ctx<'_>, m: &ManagedRedis) -> Deployment {
    let persistent = m.persistence.enabled;
    let mut args: Vec<String> = [
        "--port",
        "6379",
        "--protected-mode",
        "no",
        "--dir",
        "/data",
        "--save",
        "",
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect();
    args.extend([
        "--appendonly".into(),
        if persistent { "yes" } else { "no" }.into(),
    ]);
    let mut env = None;
    if let Some(p) = &m.password_secret_ref {
        // The kubelet substitutes the variable; the password is never in the object.
        args.extend(["--requirepass".into(), "$(REDIS_PASSWORD)".into()]);
        env = Some(vec![secret_env("REDIS_PASSWORD", p)]);
    }
    let data = Volume {
        name: "data".into(),
        empty_dir: (!persistent).then(EmptyDirVolumeSource::default),
        persistent_volume_claim: persistent.then(|| PersistentVolumeClaimVolumeSource {
            claim_name: ctx.names.redis(),
            read_only: Some(false),
        }),
        ..Volume::default()
    };
    let container = Container {
        name: "redis".into(),
        image: Some(
            m.image
                .clone()
                .unwrap_or_else(|| ctx.defaults.redis_image.clone()),
        ),
        command: Some(vec!["redis-server".into()]),
        args: Some(args),
        env,
        ports: Some(vec![ContainerPort {
            name: Some("redis".into()),
            container_port: REDIS_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(probe(5)),
        liveness_probe: Some(probe(10)),
        resources: m.resources.clone(),
        security_context: Some(container_security()),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".into(),
            mount_path: "/data".into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    Deployment {
        metadata: ctx.meta(ctx.names.redis(), "redis"),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(ctx.selector("redis")),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..DeploymentStrategy::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(ctx.labels("redis")),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod_security()),
                    containers: vec![container],
                    volumes: Some(vec![data]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

fn service(ctx: &Ctx<'_>) -> Service {
    Service {
        metadata: ctx.meta(ctx.names.redis(), "redis"),
        spec: Some(ServiceSpec {
            selector: Some(ctx.selector("redis")),
            ports: Some(vec![ServicePort {
                name: Some("redis".into()),
                port: REDIS_PORT,
                target_port: Some(IntOrString::String("redis".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

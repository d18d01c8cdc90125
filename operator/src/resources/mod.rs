//! The objects a HotPrefixService consists of, built by pure functions from its spec: no
//! client, no clock, no randomness, so the same spec always gives the same objects (the golden
//! files in `operator/tests/golden/` pin them) and the controller only applies what
//! [`build`] returns.
//!
//! One file per part: `engine.rs` (ConfigMap, headless Service, StatefulSet, PDB),
//! `router.rs` (ServiceAccount, Role, RoleBinding, Deployment, Service, PDB), `redis.rs` (the
//! managed Redis) and `model.rs` (the model's volumes, the download init container and the
//! chat template's ConfigMap, shared by engine and router pods).

mod engine;
mod model;
mod redis;
mod router;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, EmptyDirVolumeSource, EnvVar, EnvVarSource, KeyToPath,
    PersistentVolumeClaim, PodSecurityContext, PodSpec, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Service, ServiceAccount, TopologySpreadConstraint, Volume,
    VolumeMount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use serde::Serialize;

use crate::crd::{HotPrefixService, RedisSpec, SecretKeyRef};
use crate::validate::{self, SpecError};

/// The field manager of every server-side apply, and the value of the `managed-by` label.
pub const MANAGER: &str = "hotprefix-operator";
/// The label naming the application.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// The label naming the HotPrefixService.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// The label naming the part (engine, router, redis).
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// The label naming who manages an object; the controller's watches of its children select on
/// it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The pod template annotation holding a hash of the engine ConfigMap, so that a change of the
/// engine's settings rolls the StatefulSet (one pod at a time).
pub const CONFIG_HASH_ANNOTATION: &str = "hotprefix.dev/config-hash";
/// The pod template annotation (engines and routers) holding a hash of the chat template
/// ConfigMap, so that a changed template rolls both: each reads it once, at start-up.
pub const CHAT_TEMPLATE_HASH_ANNOTATION: &str = "hotprefix.dev/chat-template-hash";
/// The label selector of everything the operator creates.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGER}")
}

/// The user and group the pods run as (distroless' `nonroot`; the project's images use it).
pub const RUN_AS: i64 = 65532;
/// The engine's HTTP port.
pub const ENGINE_PORT: i32 = 8000;
/// The router's HTTP port.
pub const ROUTER_PORT: i32 = 8080;
/// Redis' port.
pub const REDIS_PORT: i32 = 6379;
/// Seconds a stopping pod keeps serving before it is signalled, so that routers and Services
/// stop sending it requests first (its endpoint turns terminating at once, but watchers need a
/// moment to see it).
pub const PRESTOP_SLEEP_SECONDS: i64 = 5;

/// Images and other settings the operator supplies where a spec leaves them out (the
/// operator's flags; the Helm chart sets them to the images of its release).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// The engine image.
    pub engine_image: String,
    /// The router image.
    pub router_image: String,
    /// The managed Redis image.
    pub redis_image: String,
    /// The image of the model download init container (`sh`, `curl`, `sha256sum`).
    pub downloader_image: String,
}

impl Default for Defaults {
    /// The images of this release.
    fn default() -> Self {
        let v = env!("CARGO_PKG_VERSION");
        Defaults {
            engine_image: format!("ghcr.io/hotprefix/hotprefix-engine:{v}"),
            router_image: format!("ghcr.io/hotprefix/hotprefix-router:{v}"),
            redis_image: "docker.io/library/redis:7.4.2-alpine".to_string(),
            downloader_image: "docker.io/curlimages/curl:8.12.1".to_string(),
        }
    }
}

/// The names of a HotPrefixService's children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The HotPrefixService.
    pub service: String,
    /// Its namespace.
    pub namespace: String,
}

impl Names {
    /// Engine ConfigMap, headless Service, StatefulSet and PDB (pods `{engine}-{ordinal}`).
    pub fn engine(&self) -> String {
        format!("{}-engine", self.service)
    }
    /// Router Deployment, ServiceAccount, Role, RoleBinding and PDB.
    pub fn router(&self) -> String {
        format!("{}-router", self.service)
    }
    /// The router's Service, the endpoint: named like the HotPrefixService.
    pub fn endpoint_service(&self) -> String {
        self.service.clone()
    }
    /// Managed Redis Deployment, Service and claim.
    pub fn redis(&self) -> String {
        format!("{}-redis", self.service)
    }
    /// The ConfigMap of the chat template override, mounted by engine and router pods.
    pub fn chat_template(&self) -> String {
        format!("{}-chat-template", self.service)
    }
    /// The Redis key namespace of the engines and router (`hotprefix:v1:{service}:...`): the
    /// namespace and the name, so that services of one name in two namespaces sharing an
    /// external Redis stay apart.
    pub fn redis_service_key(&self) -> String {
        format!("{}.{}", self.namespace, self.service)
    }
    /// The endpoint URL inside the cluster.
    pub fn endpoint_url(&self, port: i32) -> String {
        let host = format!("{}.{}.svc", self.endpoint_service(), self.namespace);
        if port == 80 {
            format!("http://{host}")
        } else {
            format!("http://{host}:{port}")
        }
    }
}

/// The managed Redis' objects.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisChildren {
    /// The Redis Deployment.
    pub deployment: Deployment,
    /// Its Service.
    pub service: Service,
    /// Its data claim, with persistence on.
    pub volume: Option<PersistentVolumeClaim>,
    /// Admits only this service's engines and routers to Redis: whoever can write its
    /// summaries and registrations steers the routing.
    pub network_policy: NetworkPolicy,
}

/// Everything one HotPrefixService consists of.
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    /// The chat template replacing the model's (`spec.model.chatTemplate`), if any.
    pub chat_template: Option<ConfigMap>,
    /// The engine's settings (`HOTPREFIX_*` variables, loaded with `envFrom`).
    pub engine_config: ConfigMap,
    /// The engines' headless Service (stable pod DNS names; the router's EndpointSlices).
    pub engine_service: Service,
    /// The engines.
    pub engine: StatefulSet,
    /// At most one engine down at a time for voluntary disruptions.
    pub engine_pdb: PodDisruptionBudget,
    /// The router's identity.
    pub router_account: ServiceAccount,
    /// Read access to the EndpointSlices of the router's namespace.
    pub router_role: Role,
    /// Binds the role to the router's ServiceAccount.
    pub router_binding: RoleBinding,
    /// The routers.
    pub router: Deployment,
    /// The endpoint.
    pub router_service: Service,
    /// At most one router down at a time for voluntary disruptions.
    pub router_pdb: PodDisruptionBudget,
    /// The managed Redis, if managed.
    pub redis: Option<RedisChildren>,
}

impl Children {
    /// The engines' pod template.
    pub fn engine_pod(&self) -> Option<&PodSpec> {
        self.engine.spec.as_ref()?.template.spec.as_ref()
    }

    /// The routers' pod template.
    pub fn router_pod(&self) -> Option<&PodSpec> {
        self.router.spec.as_ref()?.template.spec.as_ref()
    }

    /// Every object as JSON, in the order they are applied (dependencies first: the router's
    /// identity before its pods, Redis before the engines that publish to it).
    pub fn objects(&self) -> Result<Vec<serde_json::Value>, serde_json::Error> {
        fn v<T: Serialize>(out: &mut Vec<serde_json::Value>, o: &T) -> serde_json::Result<()> {
            out.push(serde_json::to_value(o)?);
            Ok(())
        }
        let mut out = Vec::new();
        v(&mut out, &self.router_account)?;
        v(&mut out, &self.router_role)?;
        v(&mut out, &self.router_binding)?;
        if let Some(r) = &self.redis {
            if let Some(pvc) = &r.volume {
                v(&mut out, pvc)?;
            }
            v(&mut out, &r.network_policy)?;
            v(&mut out, &r.deployment)?;
            v(&mut out, &r.service)?;
        }
        if let Some(t) = &self.chat_template {
            v(&mut out, t)?;
        }
        v(&mut out, &self.engine_config)?;
        v(&mut out, &self.engine_service)?;
        v(&mut out, &self.engine)?;
        v(&mut out, &self.engine_pdb)?;
        v(&mut out, &self.router)?;
        v(&mut out, &self.router_service)?;
        v(&mut out, &self.router_pdb)?;
        Ok(out)
    }

    /// Every object as one multi-document YAML stream.
    pub fn to_yaml(&self) -> Result<String, RenderError> {
        let mut out = String::new();
        for o in self.objects()? {
            out.push_str("---\n");
            out.push_str(&serde_saphyr::to_string(&o)?);
        }
        Ok(out)
    }
}

/// Objects that could not be written out.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// JSON conversion failed.
    #[error("converting to JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// YAML output failed.
    #[error("writing YAML: {0}")]
    Yaml(#[from] serde_saphyr::SerializeError),
}

/// What every builder needs: the object, its names, the owner reference its children carry,
/// and the operator's defaults.
#[derive(Debug)]
pub(crate) struct Ctx<'a> {
    pub hps: &'a HotPrefixService,
    pub names: Names,
    pub owner: Option<OwnerReference>,
    pub defaults: &'a Defaults,
}

impl Ctx<'_> {
    /// Metadata of a child: its name and namespace, the labels of its component, and the
    /// controller owner reference (absent only when rendering an object that has no uid yet).
    pub fn meta(&self, name: String, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.names.namespace.clone()),
            labels: Some(self.labels(component)),
            owner_references: self.owner.clone().map(|o| vec![o]),
            ..ObjectMeta::default()
        }
    }

    /// The labels of a component's objects and pods.
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        let mut l = self.selector(component);
        l.insert(MANAGED_BY_LABEL.into(), MANAGER.into());
        l.insert("app.kubernetes.io/part-of".into(), "hotprefix".into());
        l
    }

    /// The labels selecting a component's pods (a subset of [`Ctx::labels`]).
    pub fn selector(&self, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (NAME_LABEL.to_string(), "hotprefix".to_string()),
            (INSTANCE_LABEL.to_string(), self.names.service.clone()),
            (COMPONENT_LABEL.to_string(), component.to_string()),
        ])
    }

    /// The Redis URL engines and router connect to (never with a password in it), the Secret
    /// key of its password, and the Secret key of its CA certificates.
    pub fn redis_target(&self) -> (String, Option<&SecretKeyRef>, Option<&SecretKeyRef>) {
        match &self.hps.spec.redis {
            RedisSpec::Managed(m) => (
                format!(
                    "redis://{}.{}.svc:{REDIS_PORT}",
                    self.names.redis(),
                    self.names.namespace
                ),
                m.password_secret_ref.as_ref(),
                None,
            ),
            RedisSpec::External(e) => (
                validate::external_redis_url(e),
                e.password_secret_ref.as_ref(),
                e.ca_secret_ref.as_ref(),
            ),
        }
    }
}

/// Builds every child of `hps`, after checking its spec ([`validate::validate`]).
///
/// `hps` must have a namespace. The children's owner reference needs its uid; an object read
/// from a file has none, and its children are built without one (what `hotprefix-operator
/// render` prints).
pub fn build(hps: &HotPrefixService, defaults: &Defaults) -> Result<Children, SpecError> {
    validate::validate(hps)?;
    let Some(namespace) = hps.metadata.namespace.clone() else {
        return Err(SpecError {
            field: "metadata.namespace".into(),
            message: "a HotPrefixService is namespaced; the object has no namespace".into(),
        });
    };
    let ctx = Ctx {
        hps,
        names: Names {
            service: hps.metadata.name.clone().unwrap_or_default(),
            namespace,
        },
        owner: hps.controller_owner_ref(&()),
        defaults,
    };
    let engine_config = engine::config_map(&ctx);
    let chat_template = model::chat_template_config_map(&ctx);
    Ok(Children {
        engine_service: engine::service(&ctx),
        engine: engine::stateful_set(&ctx, &engine_config, chat_template.as_ref()),
        engine_pdb: pdb(&ctx, ctx.names.engine(), "engine"),
        engine_config,
        router_account: router::service_account(&ctx),
        router_role: router::role(&ctx),
        router_binding: router::role_binding(&ctx),
        router: router::deployment(&ctx, chat_template.as_ref()),
        router_service: router::service(&ctx),
        router_pdb: pdb(&ctx, ctx.names.router(), "router"),
        redis: redis::children(&ctx),
        chat_template,
    })
}

/// A PodDisruptionBudget allowing one pod of a component down at a time: drains proceed one
/// pod after another and never block, even with a single replica.
fn pdb(ctx: &Ctx<'_>, name: String, component: &str) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: ctx.meta(name, component),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(ctx.selector(component)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The pod security context of every pod: non-root, fixed ids (volumes are made writable for
/// the group), the runtime's default seccomp profile.
pub(crate) fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        fs_group_change_policy: Some("OnRootMismatch".into()),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// The security context of every container: no privilege, no escalation, no capabilities, a
/// read-only root file system (writable paths are volumes).
pub(crate) fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// A plain environment variable.
pub(crate) fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// An environment variable read from a Secret key: secrets reach containers only this way,
/// never inline in an object.
pub(crate) fn secret_env(name: &str, r: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: r.name.clone(),
                key: r.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The operator's variables with the user's `extraEnv` applied: an extra variable named like
/// one of them replaces it in place (server-side apply refuses a list with two entries of one
/// name), the others are appended in their order.
pub(crate) fn merge_env(mut managed: Vec<EnvVar>, extra: Option<&Vec<EnvVar>>) -> Vec<EnvVar> {
    for e in extra.into_iter().flatten() {
        match managed.iter_mut().find(|m| m.name == e.name) {
            Some(m) => *m = e.clone(),
            None => managed.push(e.clone()),
        }
    }
    managed
}

/// A soft spread of a component's pods across nodes: the scheduler prefers a node without one,
/// but a single-node cluster still runs them all.
pub(crate) fn spread(ctx: &Ctx<'_>, component: &str) -> TopologySpreadConstraint {
    TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "kubernetes.io/hostname".into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(LabelSelector {
            match_labels: Some(ctx.selector(component)),
            ..LabelSelector::default()
        }),
        ..TopologySpreadConstraint::default()
    }
}

/// The label selector of a component's pods as a string (the scale subresource's
/// `status.selector`).
pub fn selector_string(hps: &HotPrefixService, component: &str) -> String {
    let name = hps.metadata.name.clone().unwrap_or_default();
    [
        (COMPONENT_LABEL, component),
        (INSTANCE_LABEL, name.as_str()),
        (NAME_LABEL, "hotprefix"),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={v}"))
    .collect::<Vec<_>>()
    .join(",")
}

/// Where engines and router find the CA certificates of an external Redis.
pub(crate) const REDIS_CA_FILE: &str = "/etc/hotprefix/redis-ca/ca.crt";

/// The volumes, and the serving container's mounts, of every engine and router pod: a writable
/// `/tmp` (the root filesystem is read-only), the model's (`model_volumes`, `model_mounts`), and
/// an external Redis' CA certificates when it has them.
pub(crate) fn pod_storage(
    model_volumes: Vec<Volume>,
    model_mounts: Vec<VolumeMount>,
    ca: Option<&SecretKeyRef>,
) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    }];
    volumes.extend(model_volumes);
    mounts.extend(model_mounts);
    if let Some(ca) = ca {
        let (v, m) = redis_volume(ca);
        volumes.push(v);
        mounts.push(m);
    }
    (volumes, mounts)
}

/// The volume and mount of an external Redis' CA certificates, from their Secret key.
pub(crate) fn redis_volume(ca: &SecretKeyRef) -> (Volume, VolumeMount) {
    (
        Volume {
            name: "redis-ca".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(ca.name.clone()),
                items: Some(vec![KeyToPath {
                    key: ca.key.clone(),
                    path: "ca.crt".into(),
                    ..KeyToPath::default()
                }]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: "redis-ca".into(),
            mount_path: "/etc/hotprefix/redis-ca".into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    )
}

/// The hash of a ConfigMap's data put into the pods' template, as 16 hex digits.
pub(crate) fn config_hash(cm: &ConfigMap) -> String {
    let data = serde_json::to_vec(&cm.data).unwrap_or_default();
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&data))
}

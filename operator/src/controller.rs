//! The controller, shaped like kube-rs' `controller-rs`: [`reconcile`] turns one
//! HotPrefixService into its children (built by `resources::build`, applied with server-side
//! apply under one field manager, each with a controller owner reference so that deleting the
//! service deletes them), then writes the status from the state the API server returned for
//! them and emits Events on transitions; [`error_policy`] requeues a failed reconciliation
//! with a per-object exponential backoff; [`run`] drives both from watches of the
//! HotPrefixServices and of their children.
//!
//! Deletion needs no code: nothing holds a finalizer, so Kubernetes' garbage collector removes
//! the children through their owner references.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::Instrument;

use crate::crd::{HotPrefixService, HotPrefixServiceStatus, Phase};
use crate::metrics::Metrics;
use crate::resources::{self, Children, Defaults, MANAGER, Names, managed_selector};
use crate::status::{self, DEGRADED, Observed, Outcome, READY};

/// The first wait after a failed reconciliation; it doubles with each further failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// The longest wait after failed reconciliations.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// When to look again at a ready service even if nothing changes (drift the watches missed).
pub const RESYNC_READY: Duration = Duration::from_secs(300);
/// When to look again at a service that is not ready yet.
pub const RESYNC_PROGRESSING: Duration = Duration::from_secs(30);

/// A reconciliation that failed; retried after [`error_policy`]'s backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused an object or was unreachable.
    #[error("applying {kind} {name}: {source}")]
    Apply {
        /// The object's kind.
        kind: String,
        /// Its name.
        name: String,
        /// What the client reported.
        #[source]
        source: kube::Error,
    },
    /// A child that is no longer wanted (the managed Redis after a switch to an external one,
    /// the chat template's ConfigMap once the spec has none) could not be removed.
    #[error("removing {kind} {name}: {source}")]
    Prune {
        /// The object's kind.
        kind: String,
        /// Its name.
        name: String,
        /// What the client reported.
        #[source]
        source: kube::Error,
    },
    /// The status could not be written.
    #[error("updating the status: {0}")]
    Status(#[source] kube::Error),
    /// The status could not be encoded.
    #[error("encoding the status: {0}")]
    Encode(#[from] serde_json::Error),
}

impl Error {
    /// The `kind` label of the failure metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "apply",
            Error::Prune { .. } => "prune",
            Error::Status(_) => "status",
            Error::Encode(_) => "encode",
        }
    }
}

/// What every reconciliation shares.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// Images where specs leave them out.
    pub defaults: Defaults,
    /// Emits Events on the HotPrefixServices.
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per `namespace/name`, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context whose Events are reported as `reporter`.
    pub fn new(
        client: Client,
        defaults: Defaults,
        reporter: Reporter,
        metrics: Arc<Metrics>,
    ) -> Arc<Context> {
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            defaults,
            metrics,
            failures: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a failure of `key` and returns how many in a row.
    fn failed(&self, key: &str) -> u32 {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let n = f.entry(key.to_string()).or_default();
        *n = n.saturating_add(1);
        *n
    }

    fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    /// Drops what the context keeps about a HotPrefixService that no longer exists: its phase
    /// in the metrics and its failure count. Nothing holds a finalizer, so a deleted service
    /// is never reconciled; the controller learns it is gone when a requeue or a child's
    /// deletion schedules it and it is not in the store.
    pub fn forget(&self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        self.metrics.forget(&key);
        self.succeeded(&key);
    }
}

fn key(hps: &HotPrefixService) -> String {
    format!("{}/{}", hps.namespace().unwrap_or_default(), hps.name_any())
}

/// The wait after `failures` consecutive failures: [`BACKOFF_BASE`] doubled per failure, at
/// most [`BACKOFF_MAX`].
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << doublings).min(BACKOFF_MAX)
}

/// Applies `obj` with server-side apply (the operator's field manager, forcing ownership of
/// its fields) and returns the object as the API server stored it, status included.
async fn apply<K>(client: &Client, namespace: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned
        + Serialize,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| Error::Apply {
        kind: K::kind(&()).to_string(),
        name,
        source,
    })
}

/// Deletes the child `name` of kind `K` if it exists and `hps` owns it.
async fn prune<K>(client: &Client, hps: &HotPrefixService, name: &str) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let err = |source| Error::Prune {
        kind: K::kind(&()).to_string(),
        name: name.to_string(),
        source,
    };
    let api: Api<K> = Api::namespaced(client.clone(), &hps.namespace().unwrap_or_default());
    let Some(obj) = api.get_opt(name).await.map_err(err)? else {
        return Ok(());
    };
    let uid = hps.metadata.uid.as_deref();
    let owned = obj
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| Some(o.uid.as_str()) == uid);
    if !owned {
        return Ok(());
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// Whether the API server refused a StatefulSet apply because it changes a field that cannot
/// change in place (the claim templates when the model's download cache changes size or
/// storage class, or the model's source changes kind).
fn immutable_statefulset_change(s: &kube::core::Status) -> bool {
    s.is_invalid()
        && s.message
            .contains("updates to statefulset spec for fields other than")
}

/// How long [`recreate_engines`] waits for the old StatefulSet to go.
const RECREATE_WAIT: Duration = Duration::from_secs(30);

/// Replaces the engine StatefulSet whose change the API server cannot apply in place: deletes
/// it orphaning its pods and claims (so serving goes on and cached downloads are kept), waits
/// until it is gone, then applies the new one, which adopts the pods and rolls them one at a
/// time as any template change would.
async fn recreate_engines(
    ctx: &Context,
    hps: &HotPrefixService,
    engine: &StatefulSet,
    why: &str,
) -> Result<StatefulSet, Error> {
    let ns = hps.namespace().unwrap_or_default();
    let name = engine.metadata.name.clone().unwrap_or_default();
    let err = |source| Error::Apply {
        kind: "StatefulSet".into(),
        name: name.clone(),
        source,
    };
    tracing::warn!(statefulset = %name, reason = %why, "engine StatefulSet cannot change in place; recreating it, its pods kept");
    let event = Event {
        type_: EventType::Normal,
        reason: "RecreatingEngines".into(),
        note: Some(format!(
            "StatefulSet {name} is replaced (its pods and claims are kept): {why}"
        )),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &hps.object_ref(&())).await {
        tracing::warn!(error = %e, "emitting an Event failed");
    }
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    match api.delete(&name, &DeleteParams::orphan()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_not_found() => {}
        Err(e) => return Err(err(e)),
    }
    let deadline = Instant::now() + RECREATE_WAIT;
    while api.get_opt(&name).await.map_err(err)?.is_some() {
        if Instant::now() >= deadline {
            return Err(err(kube::Error::Api(Box::new(
                kube::core::Status::failure(
                    &format!("the old StatefulSet was not gone after {RECREATE_WAIT:?}; retrying"),
                    "Timeout",
                ),
            ))));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    apply(&ctx.client, &ns, engine).await
}

/// The children as the API server returned them.
struct Applied {
    engine: StatefulSet,
    router: Deployment,
    router_service: Service,
    redis: Option<Deployment>,
}

/// Applies every child, dependencies first, and removes the managed Redis when the spec
/// switched to an external one and the chat template's ConfigMap when the spec has none.
async fn apply_all(ctx: &Context, hps: &HotPrefixService, c: &Children) -> Result<Applied, Error> {
    let client = &ctx.client;
    let ns = hps.namespace().unwrap_or_default();
    apply(client, &ns, &c.router_account).await?;
    apply(client, &ns, &c.router_role).await?;
    apply(client, &ns, &c.router_binding).await?;
    let redis = match &c.redis {
        Some(r) => {
            if let Some(pvc) = &r.volume {
                apply(client, &ns, pvc).await?;
            }
            // The policy first, so that Redis is never reachable without it.
            apply(client, &ns, &r.network_policy).await?;
            let d = apply(client, &ns, &r.deployment).await?;
            apply(client, &ns, &r.service).await?;
            Some(d)
        }
        None => {
            // A claim of a formerly persistent Redis is left alone: it goes with the service
            // (owner reference), and turning persistence back on finds its data.
            let name = format!("{}-redis", hps.name_any());
            prune::<Deployment>(client, hps, &name).await?;
            prune::<Service>(client, hps, &name).await?;
            prune::<NetworkPolicy>(client, hps, &name).await?;
            None
        }
    };
    // Before the pods that mount it, so that none starts without its template.
    match &c.chat_template {
        Some(t) => {
            apply(client, &ns, t).await?;
        }
        None => {
            let names = Names {
                service: hps.name_any(),
                namespace: ns.clone(),
            };
            prune::<ConfigMap>(client, hps, &names.chat_template()).await?;
        }
    }
    apply(client, &ns, &c.engine_config).await?;
    apply(client, &ns, &c.engine_service).await?;
    let engine = match apply(client, &ns, &c.engine).await {
        Err(Error::Apply {
            source: kube::Error::Api(s),
            ..
        }) if immutable_statefulset_change(&s) => {
            recreate_engines(ctx, hps, &c.engine, &s.message).await?
        }
        r => r?,
    };
    apply(client, &ns, &c.engine_pdb).await?;
    let router = apply(client, &ns, &c.router).await?;
    let router_service = apply(client, &ns, &c.router_service).await?;
    apply(client, &ns, &c.router_pdb).await?;
    Ok(Applied {
        engine,
        router,
        router_service,
        redis,
    })
}

/// The current time, whole seconds (what a condition's transition time keeps).
fn now() -> Time {
    Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now()))
}

/// Writes `status` if it differs from the object's, with server-side apply on the status
/// subresource.
async fn write_status(
    ctx: &Context,
    hps: &HotPrefixService,
    status: &HotPrefixServiceStatus,
) -> Result<(), Error> {
    if hps.status.as_ref() == Some(status) {
        return Ok(());
    }
    let api: Api<HotPrefixService> =
        Api::namespaced(ctx.client.clone(), &hps.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": HotPrefixService::api_version(&()),
        "kind": HotPrefixService::kind(&()),
        "status": serde_json::to_value(status)?,
    });
    api.patch_status(
        &hps.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Status)?;
    Ok(())
}

/// Emits the Events of a status transition: a Warning when `Degraded` turns true or changes
/// its reason, a Normal one when `Ready` turns true. Events are best effort: a failure to emit
/// one is logged, never fails the reconciliation.
async fn emit_events(
    ctx: &Context,
    hps: &HotPrefixService,
    old: Option<&HotPrefixServiceStatus>,
    new: &HotPrefixServiceStatus,
) {
    let was = |t: &str| old.and_then(|s| status::condition(s, t));
    let mut events = Vec::new();
    if let Some(d) = status::condition(new, DEGRADED)
        && d.status == "True"
        && was(DEGRADED).is_none_or(|o| o.status != "True" || o.reason != d.reason)
    {
        events.push(Event {
            type_: EventType::Warning,
            reason: d.reason.clone(),
            note: Some(d.message.clone()),
            action: "Reconcile".into(),
            secondary: None,
        });
    }
    if let Some(r) = status::condition(new, READY)
        && r.status == "True"
        && was(READY).is_none_or(|o| o.status != "True")
    {
        events.push(Event {
            type_: EventType::Normal,
            reason: "Ready".into(),
            note: Some(r.message.clone()),
            action: "Reconcile".into(),
            secondary: None,
        });
    }
    let reference = hps.object_ref(&());
    for e in events {
        if let Err(err) = ctx.recorder.publish(&e, &reference).await {
            tracing::warn!(error = %err, reason = %e.reason, "emitting an Event failed");
        }
    }
}

/// Reconciles one HotPrefixService: builds its children, applies them, writes its status.
///
/// An invalid spec is reported in the status (`Degraded`, reason `InvalidSpec`) and waits for
/// the next change of the object: retrying could not help. A failed apply is reported the same
/// way (reason `ApplyFailed`) and returned as an error, for [`error_policy`] to retry.
pub async fn reconcile(hps: Arc<HotPrefixService>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = tracing::info_span!(
        "reconcile",
        namespace = %hps.namespace().unwrap_or_default(),
        name = %hps.name_any(),
    );
    let started = Instant::now();
    let result = reconcile_inner(&hps, &ctx).instrument(span).await;
    ctx.metrics.reconciled(started.elapsed());
    if result.is_ok() {
        ctx.succeeded(&key(&hps));
    }
    result
}

async fn reconcile_inner(hps: &HotPrefixService, ctx: &Context) -> Result<Action, Error> {
    if hps.metadata.deletion_timestamp.is_some() {
        // The garbage collector removes the children through their owner references.
        ctx.forget(&hps.namespace().unwrap_or_default(), &hps.name_any());
        return Ok(Action::await_change());
    }
    let children = match resources::build(hps, &ctx.defaults) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "invalid spec; nothing applied");
            let message = e.to_string();
            let new = status::compute(hps, Outcome::InvalidSpec(&message), now());
            finish(ctx, hps, &new).await?;
            return Ok(Action::await_change());
        }
    };
    let applied = match apply_all(ctx, hps, &children).await {
        Ok(a) => a,
        Err(e) => {
            let message = e.to_string();
            let new = status::compute(hps, Outcome::ApplyFailed(&message), now());
            if let Err(status_err) = finish(ctx, hps, &new).await {
                tracing::warn!(error = %status_err, "reporting the failed apply failed too");
            }
            return Err(e);
        }
    };
    let observed = Observed {
        engine: &applied.engine,
        router: &applied.router,
        router_service: &applied.router_service,
        redis: applied.redis.as_ref(),
    };
    let new = status::compute(hps, Outcome::Applied(observed), now());
    finish(ctx, hps, &new).await?;
    let ready = new.phase == Some(Phase::Ready);
    tracing::info!(phase = ?new.phase, ready_replicas = new.ready_replicas, "reconciled");
    Ok(Action::requeue(if ready {
        RESYNC_READY
    } else {
        RESYNC_PROGRESSING
    }))
}

/// Writes the new status, emits its Events and records the phase.
async fn finish(
    ctx: &Context,
    hps: &HotPrefixService,
    new: &HotPrefixServiceStatus,
) -> Result<(), Error> {
    write_status(ctx, hps, new).await?;
    emit_events(ctx, hps, hps.status.as_ref(), new).await;
    if let Some(p) = new.phase {
        ctx.metrics.set_phase(key(hps), p.as_str());
    }
    Ok(())
}

/// Requeues a failed reconciliation after [`backoff`] of its consecutive failures.
pub fn error_policy(hps: Arc<HotPrefixService>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.failed(&key(&hps));
    let wait = backoff(failures);
    ctx.metrics.failed(error.metric_label());
    tracing::warn!(
        namespace = %hps.namespace().unwrap_or_default(),
        name = %hps.name_any(),
        error = %error,
        failures,
        retry_in = ?wait,
        "reconciliation failed"
    );
    Action::requeue(wait)
}

/// Which HotPrefixServices the operator manages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (the chart's ClusterRole).
    Cluster,
    /// These namespaces only (the chart's Roles).
    Namespaces(Vec<String>),
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller over `scope` until `shutdown` turns true; reconciliations in flight
/// then finish, none start.
pub async fn run(client: Client, scope: Scope, ctx: Arc<Context>, shutdown: watch::Receiver<bool>) {
    let namespaces: Vec<Option<String>> = match scope {
        Scope::Cluster => vec![None],
        Scope::Namespaces(ns) => ns.into_iter().map(Some).collect(),
    };
    let runs = namespaces.into_iter().map(|ns| {
        let client = client.clone();
        let ctx = ctx.clone();
        let gone = ctx.clone();
        let mut shutdown = shutdown.clone();
        async move {
            let ns = ns.as_deref();
            // Only the operator's own children are watched (and cached).
            let owned = watcher::Config::default().labels(&managed_selector());
            tracing::info!(
                namespace = ns.unwrap_or("(all)"),
                "watching HotPrefixServices"
            );
            Controller::new(
                api::<HotPrefixService>(&client, ns),
                watcher::Config::default(),
            )
            .owns(api::<StatefulSet>(&client, ns), owned.clone())
            .owns(api::<Deployment>(&client, ns), owned.clone())
            .owns(api::<Service>(&client, ns), owned.clone())
            .owns(api::<ConfigMap>(&client, ns), owned.clone())
            .owns(api::<PodDisruptionBudget>(&client, ns), owned.clone())
            .owns(api::<NetworkPolicy>(&client, ns), owned)
            // Children change in bursts (a rollout touches status many times a second).
            .with_config(controller::Config::default().debounce(Duration::from_millis(500)))
            .graceful_shutdown_on(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .run(reconcile, error_policy, ctx)
            .for_each(|r| {
                match r {
                    Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
                    // A deleted service whose requeue or child event came after it went.
                    Err(controller::Error::ObjectNotFound(obj)) => {
                        tracing::debug!(object = %obj, "gone; forgotten");
                        gone.forget(obj.namespace.as_deref().unwrap_or_default(), &obj.name);
                    }
                    Err(e) => tracing::warn!(error = %e, "controller error"),
                }
                std::future::ready(())
            })
            .await;
        }
    });
    futures_util::future::join_all(runs).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_forgotten_service_leaves_the_metrics_and_its_backoff_starts_over() {
        let (service, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let ctx = Context::new(
            Client::new(service, "default"),
            Defaults::default(),
            Reporter::from("test"),
            Arc::new(Metrics::default()),
        );
        ctx.metrics.set_phase("ns/a".into(), "Degraded");
        ctx.metrics.set_phase("ns/b".into(), "Ready");
        assert_eq!(ctx.failed("ns/a"), 1);
        assert_eq!(ctx.failed("ns/a"), 2);
        ctx.forget("ns", "a");
        let text = ctx.metrics.render();
        assert!(
            text.contains("hotprefix_operator_services{phase=\"Degraded\"} 0")
                && text.contains("hotprefix_operator_services{phase=\"Ready\"} 1"),
            "{text}"
        );
        assert_eq!(ctx.failed("ns/a"), 1, "the backoff starts over");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
        assert_eq!(backoff(0), BACKOFF_BASE);
    }
}

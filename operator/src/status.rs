//! The status of a HotPrefixService, computed by a pure function from what reconciling it
//! found: the children's state as the API server returned them from the apply, an invalid
//! spec, or a failed apply. Conditions keep their `lastTransitionTime` while their status
//! stays the same, as Kubernetes' conventions ask.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{HotPrefixService, HotPrefixServiceStatus, Phase};
use crate::resources::{Names, selector_string};

/// The `Ready` condition type.
pub const READY: &str = "Ready";
/// The `Progressing` condition type.
pub const PROGRESSING: &str = "Progressing";
/// The `Degraded` condition type.
pub const DEGRADED: &str = "Degraded";

/// The applied children's state, as the API server returned them.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// The engine StatefulSet.
    pub engine: &'a StatefulSet,
    /// The router Deployment.
    pub router: &'a Deployment,
    /// The router's Service (the endpoint).
    pub router_service: &'a Service,
    /// The managed Redis Deployment, if managed.
    pub redis: Option<&'a Deployment>,
}

/// What reconciling found.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// Everything applied; the children are in this state.
    Applied(Observed<'a>),
    /// The spec is invalid (nothing was applied): the message names the field.
    InvalidSpec(&'a str),
    /// Applying failed (the API server refused or was unreachable).
    ApplyFailed(&'a str),
}

/// One condition's new value.
struct Cond {
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
}

/// How long engines may keep the service `Progressing` before it is reported `Degraded`
/// (StatefulSets have no progress deadline of their own, so a crash-looping engine, an image
/// that cannot be pulled or a GPU that cannot be scheduled would otherwise show as progressing
/// for ever). Generous, because the first start of a large model downloads it.
pub const ENGINE_PROGRESS_DEADLINE_S: i64 = 20 * 60;

/// The engines' rollout state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EngineState {
    replicas: i32,
    ready: i32,
    /// All replicas run the current template and the controller has seen the current spec.
    settled: bool,
}

fn engine_state(sts: &StatefulSet, desired: i32) -> EngineState {
    let s = sts.status.clone().unwrap_or_default();
    let generation = sts.metadata.generation.unwrap_or(0);
    let seen = s.observed_generation.unwrap_or(0) >= generation;
    let updated = s.updated_replicas.unwrap_or(0);
    let same_revision = match (&s.current_revision, &s.update_revision) {
        (Some(c), Some(u)) => c == u,
        _ => desired == 0,
    };
    EngineState {
        replicas: s.replicas,
        ready: s.ready_replicas.unwrap_or(0),
        settled: seen
            && s.replicas == desired
            && (desired == 0 || (updated >= desired && same_revision)),
    }
}

/// (available replicas, rollout complete, stuck past its progress deadline).
fn deployment_state(d: &Deployment) -> (i32, bool, bool) {
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let s = d.status.clone().unwrap_or_default();
    let generation = d.metadata.generation.unwrap_or(0);
    let available = s.available_replicas.unwrap_or(0);
    let complete = s.observed_generation.unwrap_or(0) >= generation
        && s.updated_replicas.unwrap_or(0) >= desired
        && s.replicas.unwrap_or(0) == desired
        && available >= desired;
    let stuck = s.conditions.iter().flatten().any(|c| {
        c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    (available, complete, stuck)
}

/// The URL clients reach the router at: a load balancer's address once it has one, else the
/// Service's name inside the cluster.
pub fn endpoint(names: &Names, service: &Service) -> String {
    let port = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.first())
        .map_or(80, |p| p.port);
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|i| i.first())
        .and_then(|i| i.hostname.clone().or_else(|| i.ip.clone()));
    match ingress {
        Some(host) => {
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            if port == 80 {
                format!("http://{host}")
            } else {
                format!("http://{host}:{port}")
            }
        }
        None => names.endpoint_url(port),
    }
}

/// The new status of `hps` after a reconciliation that found `outcome`, at time `now`.
pub fn compute(hps: &HotPrefixService, outcome: Outcome<'_>, now: Time) -> HotPrefixServiceStatus {
    let old = hps.status.clone().unwrap_or_default();
    let generation = hps.metadata.generation;
    let names = Names {
        service: hps.metadata.name.clone().unwrap_or_default(),
        namespace: hps.metadata.namespace.clone().unwrap_or_default(),
    };
    let mut status = HotPrefixServiceStatus {
        observed_generation: generation,
        selector: Some(selector_string(hps, "engine")),
        // Without fresh observations the last known counts stand.
        replicas: old.replicas,
        ready_replicas: old.ready_replicas,
        router_ready: old.router_ready,
        endpoint: old.endpoint.clone(),
        ..HotPrefixServiceStatus::default()
    };
    let conds = match outcome {
        Outcome::InvalidSpec(msg) => vec![
            cond(READY, false, "InvalidSpec", msg),
            cond(
                PROGRESSING,
                false,
                "InvalidSpec",
                "the spec must be fixed first",
            ),
            cond(DEGRADED, true, "InvalidSpec", msg),
        ],
        Outcome::ApplyFailed(msg) => vec![
            cond(READY, false, "ApplyFailed", msg),
            cond(PROGRESSING, false, "ApplyFailed", "retrying with backoff"),
            cond(DEGRADED, true, "ApplyFailed", msg),
        ],
        Outcome::Applied(o) => {
            let desired = hps.spec.engine.replicas;
            let engine = engine_state(o.engine, desired);
            let (routers, router_done, router_stuck) = deployment_state(o.router);
            let redis = o.redis.map(deployment_state);
            let redis_ready = redis.is_none_or(|(available, _, _)| available > 0);
            status.replicas = engine.replicas;
            status.ready_replicas = engine.ready;
            status.router_ready = routers > 0;
            status.endpoint = Some(endpoint(&names, o.router_service));
            let engines_ready = engine.ready >= desired && engine.settled;
            let ready = if desired == 0 {
                cond(READY, false, "ScaledToZero", "spec.engine.replicas is 0")
            } else if !engines_ready {
                cond(
                    READY,
                    false,
                    "EnginesNotReady",
                    &format!("{} of {desired} engine replicas ready", engine.ready),
                )
            } else if routers == 0 {
                cond(
                    READY,
                    false,
                    "RouterNotReady",
                    "no router replica is available",
                )
            } else if !redis_ready {
                cond(
                    READY,
                    false,
                    "RedisNotReady",
                    "the managed Redis is not available",
                )
            } else {
                cond(
                    READY,
                    true,
                    "Ready",
                    &format!(
                        "{desired} engine replicas, {routers} router replicas and Redis are ready"
                    ),
                )
            };
            let progressing = if engine.replicas != desired {
                cond(
                    PROGRESSING,
                    true,
                    "EngineScaling",
                    &format!("{} engine replicas, {desired} wanted", engine.replicas),
                )
            } else if !engine.settled {
                cond(
                    PROGRESSING,
                    true,
                    "EngineRollout",
                    "engine replicas are being updated one at a time",
                )
            } else if engine.ready < desired {
                cond(
                    PROGRESSING,
                    true,
                    "EnginesStarting",
                    &format!("{} of {desired} engine replicas ready", engine.ready),
                )
            } else if !router_done {
                cond(
                    PROGRESSING,
                    true,
                    "RouterRollout",
                    "the router is being updated",
                )
            } else if !redis.is_none_or(|(_, done, _)| done) {
                cond(
                    PROGRESSING,
                    true,
                    "RedisStarting",
                    "the managed Redis is starting",
                )
            } else {
                cond(PROGRESSING, false, "Complete", "every child is up to date")
            };
            // Seconds the engines have kept the service progressing: since `Progressing` last
            // turned true, while it is still true for an engine reason.
            let engine_stalled_s = match &progressing {
                Cond {
                    status: true,
                    reason: "EngineScaling" | "EngineRollout" | "EnginesStarting",
                    ..
                } => old
                    .conditions
                    .iter()
                    .find(|c| c.type_ == PROGRESSING && c.status == "True")
                    .map(|c| now.0.as_second() - c.last_transition_time.0.as_second()),
                _ => None,
            };
            let degraded = if let Some(s) =
                engine_stalled_s.filter(|s| *s >= ENGINE_PROGRESS_DEADLINE_S)
            {
                cond(
                    DEGRADED,
                    true,
                    "EngineRolloutStuck",
                    &format!(
                        "{} of {desired} engine replicas ready after {} minutes: see the engine \
                         pods' events and logs (kubectl describe pod -l {})",
                        engine.ready,
                        s / 60,
                        selector_string(hps, "engine"),
                    ),
                )
            } else if router_stuck {
                cond(
                    DEGRADED,
                    true,
                    "RouterRolloutStuck",
                    "the router Deployment exceeded its progress deadline",
                )
            } else if redis.is_some_and(|(_, _, stuck)| stuck) {
                cond(
                    DEGRADED,
                    true,
                    "RedisRolloutStuck",
                    "the Redis Deployment exceeded its progress deadline",
                )
            } else {
                cond(DEGRADED, false, "AsExpected", "")
            };
            vec![ready, progressing, degraded]
        }
    };
    status.phase = Some(if conds.iter().any(|c| c.type_ == DEGRADED && c.status) {
        Phase::Degraded
    } else if conds.iter().any(|c| c.type_ == READY && c.status) {
        Phase::Ready
    } else {
        Phase::Progressing
    });
    status.conditions = conds
        .into_iter()
        .map(|c| to_condition(c, &old.conditions, generation, &now))
        .collect();
    status
}

fn cond(type_: &'static str, status: bool, reason: &'static str, message: &str) -> Cond {
    Cond {
        type_,
        status,
        reason,
        message: message.to_string(),
    }
}

fn to_condition(c: Cond, old: &[Condition], generation: Option<i64>, now: &Time) -> Condition {
    let status = if c.status { "True" } else { "False" };
    let since = old
        .iter()
        .find(|o| o.type_ == c.type_ && o.status == status)
        .map_or_else(|| now.clone(), |o| o.last_transition_time.clone());
    Condition {
        type_: c.type_.into(),
        status: status.into(),
        reason: c.reason.into(),
        message: c.message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// The condition of `type_`, if set.
pub fn condition<'a>(status: &'a HotPrefixServiceStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus, StatefulSetStatus};
    use k8s_openapi::jiff::Timestamp;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).expect("a valid time"))
    }

    /// The minimal example with one engine that runs but is not ready, and a ready router.
    fn compute_with_progressing_since(since: i64, now: i64) -> HotPrefixServiceStatus {
        let mut hps = crate::render::parse(include_str!("../../examples/minimal.yaml"))
            .expect("the example parses");
        hps.spec.engine.replicas = 1;
        hps.status = Some(HotPrefixServiceStatus {
            conditions: vec![Condition {
                type_: PROGRESSING.into(),
                status: "True".into(),
                reason: "EnginesStarting".into(),
                message: String::new(),
                last_transition_time: at(since),
                observed_generation: None,
            }],
            ..HotPrefixServiceStatus::default()
        });
        let engine = StatefulSet {
            status: Some(StatefulSetStatus {
                replicas: 1,
                ready_replicas: Some(0),
                updated_replicas: Some(1),
                current_revision: Some("r1".into()),
                update_revision: Some("r1".into()),
                ..StatefulSetStatus::default()
            }),
            ..StatefulSet::default()
        };
        let router = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(1),
                ..DeploymentSpec::default()
            }),
            status: Some(DeploymentStatus {
                replicas: Some(1),
                updated_replicas: Some(1),
                available_replicas: Some(1),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        };
        let service = Service::default();
        let observed = Observed {
            engine: &engine,
            router: &router,
            router_service: &service,
            redis: None,
        };
        compute(&hps, Outcome::Applied(observed), at(now))
    }

    #[test]
    fn engines_that_stay_unready_past_the_deadline_degrade_the_service() {
        let start = 1_800_000_000;
        let early = compute_with_progressing_since(start, start + 60);
        assert_eq!(early.phase, Some(Phase::Progressing));
        let d = condition(&early, DEGRADED).expect("a Degraded condition");
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("False", "AsExpected")
        );
        // Progressing keeps its transition time while it stays true.
        let p = condition(&early, PROGRESSING).expect("a Progressing condition");
        assert_eq!(p.last_transition_time, at(start));

        let late = compute_with_progressing_since(start, start + ENGINE_PROGRESS_DEADLINE_S);
        assert_eq!(late.phase, Some(Phase::Degraded));
        let d = condition(&late, DEGRADED).expect("a Degraded condition");
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "EngineRolloutStuck")
        );
        assert!(
            d.message
                .contains("0 of 1 engine replicas ready after 20 minutes")
                && d.message.contains("app.kubernetes.io/component=engine"),
            "{}",
            d.message
        );
    }
}

//! The reconciler against kube's mock API server (tower-test; no API server runs here): the
//! test side answers every request the controller makes, as an API server would, records it,
//! and the tests check what was asked and what the controller concluded.
//!
//! Children are answered with what server-side apply returns (the applied object, plus the
//! status each scenario wants); the status subresource and Events are echoed; reads of absent
//! objects get 404.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hotprefix_operator::controller::{self, Context, Error};
use hotprefix_operator::crd::{ExternalRedis, HotPrefixService, RedisSpec};
use hotprefix_operator::metrics::Metrics;
use hotprefix_operator::render;
use hotprefix_operator::resources::Defaults;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use serde_json::{Value, json};

/// The longest any exchange may take; a stuck controller fails the test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);
const UID: &str = "0e5f2c7a-9d41-4c3b-8f6e-1a2b3c4d5e6f";

/// One request the controller made.
#[derive(Debug, Clone)]
struct Call {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

impl Call {
    fn is_apply(&self) -> bool {
        self.method == Method::PATCH
            && self.content_type == "application/apply-patch+yaml"
            && !self.path.ends_with("/status")
    }
    fn kind(&self) -> &str {
        self.body["kind"].as_str().unwrap_or_default()
    }
    fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or_default()
    }
}

/// How the mock answers an apply: given the request, a status for the object (or an error
/// response).
type Answer = Box<dyn Fn(&Call) -> Result<Option<Value>, (StatusCode, &'static str)> + Send + Sync>;

/// The mock API server: the other end of the client's tower service, answering until the
/// client is dropped.
struct ApiServerVerifier {
    calls: Arc<Mutex<Vec<Call>>>,
    task: tokio::task::JoinHandle<()>,
}

/// What the API server answers when an apply changes a StatefulSet field that cannot change
/// in place (its text as Kubernetes 1.33 words it).
const IMMUTABLE_STATEFULSET: &str = "spec: Forbidden: updates to statefulset spec for fields \
     other than 'replicas', 'ordinals', 'template', 'updateStrategy', \
     'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden";

fn status_body(code: StatusCode, reason: &str) -> Value {
    // An `Invalid` answer carries the API server's words for an immutable StatefulSet field,
    // which the controller recognises.
    let message = if reason == "Invalid" {
        IMMUTABLE_STATEFULSET.to_string()
    } else {
        format!("mock API server: {reason}")
    };
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    })
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    let mut r = Response::new(Body::from(serde_json::to_vec(body).unwrap()));
    *r.status_mut() = code;
    r
}

impl ApiServerVerifier {
    /// Answers applies with `answer`, and status writes with `hps` holding the written
    /// status (what the API server returns).
    fn start(hps: &HotPrefixService, answer: Answer) -> (kube::Client, ApiServerVerifier) {
        let stored = serde_json::to_value(hps).unwrap();
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = calls.clone();
        let task = tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap();
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap()
                };
                let call = Call {
                    method: parts.method.clone(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    content_type: parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default(),
                    body: body.clone(),
                };
                log.lock().unwrap().push(call.clone());
                let response = if call.path.ends_with("/status") {
                    let mut obj = stored.clone();
                    obj["status"] = body["status"].clone();
                    respond(StatusCode::OK, &obj)
                } else if call.is_apply() {
                    match answer(&call) {
                        Ok(status) => {
                            let mut obj = body.clone();
                            obj["metadata"]["uid"] = json!(format!("uid-{}", call.name()));
                            obj["metadata"]["resourceVersion"] = json!("1");
                            obj["metadata"]["generation"] = json!(1);
                            if let Some(s) = status {
                                obj["status"] = s;
                            }
                            respond(StatusCode::OK, &obj)
                        }
                        Err((code, reason)) => respond(code, &status_body(code, reason)),
                    }
                } else if call.method == Method::POST && call.path.ends_with("/events") {
                    respond(StatusCode::CREATED, &body)
                } else if call.method == Method::DELETE {
                    // The object is gone at once (reads of it get 404 below).
                    respond(
                        StatusCode::OK,
                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Success", "code": 200}),
                    )
                } else if call.method == Method::GET {
                    respond(
                        StatusCode::NOT_FOUND,
                        &status_body(StatusCode::NOT_FOUND, "NotFound"),
                    )
                } else {
                    respond(
                        StatusCode::METHOD_NOT_ALLOWED,
                        &status_body(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
                    )
                };
                send.send_response(response);
            }
        });
        (client, ApiServerVerifier { calls, task })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn applies(&self) -> Vec<Call> {
        self.calls().into_iter().filter(Call::is_apply).collect()
    }

    fn status_patches(&self) -> Vec<Value> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == Method::PATCH && c.path.ends_with("/status"))
            .map(|c| c.body)
            .collect()
    }

    fn events(&self) -> Vec<Value> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == Method::POST && c.path.ends_with("/events"))
            .map(|c| c.body)
            .collect()
    }
}

/// Children as freshly created: nothing ready yet.
fn fresh() -> Answer {
    Box::new(|_| Ok(None))
}

/// Children in the state of a finished rollout with `engines` ready engine replicas.
fn settled(engines: i32) -> Answer {
    Box::new(move |c| {
        Ok(match c.kind() {
            "StatefulSet" => Some(json!({
                "replicas": engines, "readyReplicas": engines, "updatedReplicas": engines,
                "currentRevision": "r1", "updateRevision": "r1", "observedGeneration": 1,
            })),
            "Deployment" => Some(json!({
                "replicas": 1, "availableReplicas": 1, "updatedReplicas": 1,
                "readyReplicas": 1, "observedGeneration": 1,
            })),
            _ => None,
        })
    })
}

fn hps(example: &str, replicas: i32) -> Arc<HotPrefixService> {
    let text = std::fs::read_to_string(format!(
        "{}/../examples/{example}.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut h = render::parse(&text).unwrap();
    h.metadata.namespace = Some("default".into());
    h.metadata.uid = Some(UID.into());
    h.metadata.generation = Some(1);
    h.metadata.resource_version = Some("7".into());
    h.spec.engine.replicas = replicas;
    Arc::new(h)
}

fn context(client: kube::Client) -> Arc<Context> {
    Context::new(
        client,
        Defaults::default(),
        Reporter {
            controller: "hotprefix-operator".into(),
            instance: Some("test".into()),
        },
        Arc::new(Metrics::default()),
    )
}

async fn reconcile(h: &Arc<HotPrefixService>, ctx: &Arc<Context>) -> Result<Action, Error> {
    tokio::time::timeout(STEP, controller::reconcile(h.clone(), ctx.clone()))
        .await
        .expect("reconcile did not finish in time")
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

#[tokio::test]
async fn first_reconcile_creates_every_child_with_server_side_apply() {
    let h = hps("minimal", 2);
    let (client, server) = ApiServerVerifier::start(&h, fresh());
    let ctx = context(client);
    let action = reconcile(&h, &ctx).await.unwrap();
    // Not ready yet: look again soon (the watches of the children also trigger).
    assert_eq!(action, Action::requeue(controller::RESYNC_PROGRESSING));
    let applies = server.applies();
    let kinds: Vec<(&str, &str)> = applies.iter().map(|c| (c.kind(), c.name())).collect();
    assert_eq!(
        kinds,
        [
            ("ServiceAccount", "smollm2-router"),
            ("Role", "smollm2-router"),
            ("RoleBinding", "smollm2-router"),
            ("NetworkPolicy", "smollm2-redis"),
            ("Deployment", "smollm2-redis"),
            ("Service", "smollm2-redis"),
            ("ConfigMap", "smollm2-engine"),
            ("Service", "smollm2-engine"),
            ("StatefulSet", "smollm2-engine"),
            ("PodDisruptionBudget", "smollm2-engine"),
            ("Deployment", "smollm2-router"),
            ("Service", "smollm2"),
            ("PodDisruptionBudget", "smollm2-router"),
        ]
    );
    for c in &applies {
        // One field manager, forcing its fields, in the object's namespace.
        assert!(
            c.query.contains("fieldManager=hotprefix-operator"),
            "{}",
            c.query
        );
        assert!(c.query.contains("force=true"), "{}", c.query);
        assert!(c.path.contains("/namespaces/default/"), "{}", c.path);
        let owner = &c.body["metadata"]["ownerReferences"][0];
        assert_eq!(owner["uid"], UID, "{} {}", c.kind(), c.name());
        assert_eq!(owner["controller"], true);
    }
    let sts = applies.iter().find(|c| c.kind() == "StatefulSet").unwrap();
    assert_eq!(sts.body["spec"]["replicas"], 2);
    assert_eq!(
        sts.path,
        "/apis/apps/v1/namespaces/default/statefulsets/smollm2-engine"
    );
    // The status says what is going on.
    let patches = server.status_patches();
    assert_eq!(patches.len(), 1);
    let s = &patches[0]["status"];
    assert_eq!(patches[0]["kind"], "HotPrefixService");
    assert_eq!(s["phase"], "Progressing");
    assert_eq!(s["observedGeneration"], 1);
    assert_eq!(condition(s, "Ready")["status"], "False");
    assert_eq!(condition(s, "Progressing")["status"], "True");
    assert_eq!(condition(s, "Degraded")["status"], "False");
    assert_eq!(s["endpoint"], "http://smollm2.default.svc");
    assert_eq!(
        s["selector"],
        "app.kubernetes.io/component=engine,app.kubernetes.io/instance=smollm2,app.kubernetes.io/name=hotprefix"
    );
    // Nothing to announce yet, nothing deleted, no finalizer on the service itself.
    assert!(server.events().is_empty());
    assert!(server.calls().iter().all(|c| c.method != Method::DELETE));
    assert!(
        server
            .calls()
            .iter()
            .all(|c| !c.path.contains("/hotprefixservices/") || c.path.ends_with("/status"))
    );
    server.task.abort();
}

#[tokio::test]
async fn status_follows_the_childrens_state_and_ready_is_announced() {
    let h = hps("minimal", 2);
    let (client, server) = ApiServerVerifier::start(&h, settled(2));
    let ctx = context(client);
    let action = reconcile(&h, &ctx).await.unwrap();
    assert_eq!(action, Action::requeue(controller::RESYNC_READY));
    let patches = server.status_patches();
    let s = &patches[0]["status"];
    assert_eq!(s["phase"], "Ready");
    assert_eq!(
        (s["replicas"].clone(), s["readyReplicas"].clone()),
        (json!(2), json!(2))
    );
    assert_eq!(s["routerReady"], true);
    let ready = condition(s, "Ready");
    assert_eq!(ready["status"], "True");
    assert_eq!(condition(s, "Progressing")["reason"], "Complete");
    let events = server.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["reason"], "Ready");
    assert_eq!(events[0]["type"], "Normal");
    assert_eq!(events[0]["regarding"]["uid"], UID);

    // Reconciled again with that status stored: nothing changes, so no status write and no
    // second Event.
    let mut again = (*h).clone();
    again.status = Some(serde_json::from_value(s.clone()).unwrap());
    let again = Arc::new(again);
    let before = server.calls().len();
    reconcile(&again, &ctx).await.unwrap();
    let new: Vec<Call> = server.calls()[before..].to_vec();
    // Applies, and the look-up of a chat template ConfigMap the spec no longer wants (none).
    assert!(
        new.iter()
            .all(|c| c.is_apply()
                || (c.method == Method::GET && c.name() == "smollm2-chat-template")),
        "{new:?}"
    );
    // One engine goes unready: the status says so.
    let (client, server) = ApiServerVerifier::start(
        &again,
        Box::new(|c| {
            Ok(match c.kind() {
                "StatefulSet" => Some(json!({
                    "replicas": 2, "readyReplicas": 1, "updatedReplicas": 2,
                    "currentRevision": "r1", "updateRevision": "r1", "observedGeneration": 1,
                })),
                "Deployment" => Some(json!({"replicas": 1, "availableReplicas": 1,
                "updatedReplicas": 1, "observedGeneration": 1})),
                _ => None,
            })
        }),
    );
    let ctx = context(client);
    reconcile(&again, &ctx).await.unwrap();
    let s = &server.status_patches()[0]["status"];
    assert_eq!(s["phase"], "Progressing");
    assert_eq!(s["readyReplicas"], 1);
    let ready = condition(s, "Ready");
    assert_eq!(ready["reason"], "EnginesNotReady");
    assert_eq!(ready["message"], "1 of 2 engine replicas ready");
    assert_eq!(condition(s, "Progressing")["reason"], "EnginesStarting");
    server.task.abort();
}

#[tokio::test]
async fn a_failed_apply_is_reported_and_requeued_with_growing_backoff() {
    let h = hps("minimal", 1);
    // The StatefulSet is refused until the test lets it through.
    let failing = Arc::new(AtomicBool::new(true));
    let f = failing.clone();
    let (client, server) = ApiServerVerifier::start(
        &h,
        Box::new(move |c| {
            if c.kind() == "StatefulSet" && f.load(Ordering::SeqCst) {
                Err((StatusCode::INTERNAL_SERVER_ERROR, "InternalError"))
            } else {
                Ok(None)
            }
        }),
    );
    let ctx = context(client);
    let err = reconcile(&h, &ctx).await.unwrap_err();
    assert!(
        matches!(err, Error::Apply { ref kind, .. } if kind == "StatefulSet"),
        "{err}"
    );
    // Nothing after the failed object was applied.
    let kinds: Vec<String> = server
        .applies()
        .iter()
        .map(|c| c.kind().to_string())
        .collect();
    assert_eq!(kinds.last().map(String::as_str), Some("StatefulSet"));
    assert!(!kinds.contains(&"PodDisruptionBudget".to_string()));
    let s = &server.status_patches()[0]["status"];
    assert_eq!(s["phase"], "Degraded");
    let degraded = condition(s, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "ApplyFailed");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("StatefulSet smollm2-engine"),
        "{degraded}"
    );
    let events = server.events();
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(events[0]["reason"], "ApplyFailed");
    // The controller's error policy requeues with a backoff that grows per failure.
    let first = controller::error_policy(h.clone(), &err, ctx.clone());
    let second = controller::error_policy(h.clone(), &err, ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_secs(5)));
    assert_eq!(second, Action::requeue(Duration::from_secs(10)));
    let text = ctx.metrics.render();
    assert!(
        text.contains("hotprefix_operator_reconcile_failures_total{kind=\"apply\"} 2"),
        "{text}"
    );
    // A success on the same context resets the backoff: the next failure waits the base again.
    failing.store(false, Ordering::SeqCst);
    reconcile(&h, &ctx).await.unwrap();
    assert_eq!(
        controller::error_policy(h.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(5)),
        "a success resets the backoff"
    );
    server.task.abort();
}

#[tokio::test]
async fn an_engine_change_the_api_server_cannot_apply_in_place_recreates_the_statefulset_keeping_its_pods()
 {
    let h = hps("minimal", 2);
    // The first StatefulSet apply is refused as an immutable-field change; the one after the
    // old object is gone goes through.
    let refused = Arc::new(AtomicBool::new(false));
    let r = refused.clone();
    let (client, server) = ApiServerVerifier::start(
        &h,
        Box::new(move |c| {
            if c.kind() == "StatefulSet" && !r.swap(true, Ordering::SeqCst) {
                Err((StatusCode::UNPROCESSABLE_ENTITY, "Invalid"))
            } else {
                Ok(None)
            }
        }),
    );
    let ctx = context(client);
    reconcile(&h, &ctx).await.unwrap();
    let calls = server.calls();
    let sts = "/apis/apps/v1/namespaces/default/statefulsets/smollm2-engine";
    let at = |pred: &dyn Fn(&Call) -> bool| calls.iter().position(pred).unwrap();
    let refused_at = at(&|c| c.is_apply() && c.path == sts);
    let deleted_at = at(&|c| c.method == Method::DELETE && c.path == sts);
    let checked_at = at(&|c| c.method == Method::GET && c.path == sts);
    let applied_again_at = calls
        .iter()
        .rposition(|c| c.is_apply() && c.path == sts)
        .unwrap();
    assert!(
        refused_at < deleted_at && deleted_at < checked_at && checked_at < applied_again_at,
        "apply, delete, wait until gone, apply again: {calls:#?}"
    );
    // Orphaning: the engines keep serving, and the new StatefulSet adopts them.
    let delete = &calls[deleted_at];
    assert!(
        delete.query.contains("propagationPolicy=Orphan")
            || delete.body["propagationPolicy"] == "Orphan",
        "{delete:?}"
    );
    let events = server.events();
    assert!(
        events.iter().any(|e| e["reason"] == "RecreatingEngines"),
        "{events:?}"
    );
    // The rest was applied after it, and the status does not report a failure.
    assert!(
        server
            .applies()
            .iter()
            .any(|c| c.kind() == "PodDisruptionBudget")
    );
    let patches = server.status_patches();
    let s = &patches.last().unwrap()["status"];
    assert_eq!(condition(s, "Degraded")["status"], "False", "{s}");
    server.task.abort();
}

#[tokio::test]
async fn an_invalid_spec_is_degraded_and_never_applied_or_retried() {
    let mut h = (*hps("minimal", 1)).clone();
    h.spec.engine.cache.hotness = Some(hotprefix_operator::crd::HotnessSpec {
        promotion_budget: Some("plenty".into()),
        ..Default::default()
    });
    let (client, server) = ApiServerVerifier::start(&h, fresh());
    let ctx = context(client);
    let action = reconcile(&Arc::new(h), &ctx).await.unwrap();
    // Retrying cannot fix a spec: wait for the next change of the object.
    assert_eq!(action, Action::await_change());
    assert!(server.applies().is_empty());
    let s = &server.status_patches()[0]["status"];
    assert_eq!(s["phase"], "Degraded");
    let d = condition(s, "Degraded");
    assert_eq!(d["reason"], "InvalidSpec");
    let message = d["message"].as_str().unwrap();
    assert!(
        message.starts_with("spec.engine.cache.hotness.promotionBudget:"),
        "{message}"
    );
    assert!(message.contains("not a Kubernetes quantity"), "{message}");
    assert_eq!(condition(s, "Ready")["reason"], "InvalidSpec");
    assert_eq!(server.events()[0]["reason"], "InvalidSpec");
    server.task.abort();
}

#[tokio::test]
async fn deletion_is_left_to_owner_references() {
    let mut h = (*hps("minimal", 1)).clone();
    let (client, server) = ApiServerVerifier::start(&h, fresh());
    let ctx = context(client);
    h.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    let action = reconcile(&Arc::new(h), &ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    // Nothing to do: no request at all. The children go with the garbage collector, through
    // the controller owner reference every applied child carries (checked above and in
    // tests/builders.rs).
    assert!(server.calls().is_empty(), "{:?}", server.calls());
    server.task.abort();
}

#[tokio::test]
async fn switching_to_an_external_redis_removes_the_managed_one() {
    let mut h = (*hps("minimal", 1)).clone();
    h.spec.redis = RedisSpec::External(ExternalRedis {
        url: "redis://cache.example:6379".into(),
        password_secret_ref: None,
        tls: None,
        ca_secret_ref: None,
    });
    let (client, server) = ApiServerVerifier::start(&h, settled(1));
    let ctx = context(client);
    reconcile(&Arc::new(h), &ctx).await.unwrap();
    assert!(
        server
            .applies()
            .iter()
            .all(|c| !c.name().ends_with("-redis"))
    );
    // The old Redis objects are looked up (this mock has none, so nothing is deleted).
    let gets: Vec<String> = server
        .calls()
        .iter()
        .filter(|c| c.method == Method::GET)
        .map(|c| c.path.clone())
        .collect();
    assert_eq!(
        gets,
        [
            "/apis/apps/v1/namespaces/default/deployments/smollm2-redis",
            "/api/v1/namespaces/default/services/smollm2-redis",
            "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/smollm2-redis",
            "/api/v1/namespaces/default/configmaps/smollm2-chat-template",
        ]
    );
    let s = &server.status_patches()[0]["status"];
    assert_eq!(s["phase"], "Ready");
    server.task.abort();
}

#[tokio::test]
async fn a_chat_template_is_applied_before_the_pods_that_mount_it() {
    let mut h = (*hps("minimal", 1)).clone();
    h.spec.model.chat_template =
        Some("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}".into());
    let (client, server) = ApiServerVerifier::start(&h, settled(1));
    let ctx = context(client);
    reconcile(&Arc::new(h), &ctx).await.unwrap();
    let names: Vec<String> = server
        .applies()
        .iter()
        .map(|c| format!("{} {}", c.kind(), c.name()))
        .collect();
    let at = |n: &str| {
        names
            .iter()
            .position(|x| x == n)
            .unwrap_or_else(|| panic!("{n}: {names:?}"))
    };
    let template = at("ConfigMap smollm2-chat-template");
    assert!(template < at("StatefulSet smollm2-engine"));
    assert!(template < at("Deployment smollm2-router"));
    // Wanted, so nothing is looked up to be removed.
    assert!(
        server
            .calls()
            .iter()
            .all(|c| c.method != Method::GET && c.method != Method::DELETE),
        "{:?}",
        server.calls()
    );
    server.task.abort();
}

#[tokio::test]
async fn a_dropped_chat_template_has_its_configmap_removed() {
    // The mock answers every read with 404; here the ConfigMap exists, owned by the service.
    let h = hps("minimal", 1);
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let stored = serde_json::to_value(&*h).unwrap();
    let log = Arc::new(Mutex::new(Vec::<(Method, String)>::new()));
    let calls = log.clone();
    let task = tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let path = parts.uri.path().to_string();
            calls
                .lock()
                .unwrap()
                .push((parts.method.clone(), path.clone()));
            let cm = path.ends_with("/configmaps/smollm2-chat-template");
            let answer = match parts.method {
                Method::GET if cm => json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "smollm2-chat-template", "namespace": "default",
                        "ownerReferences": [{"apiVersion": "hotprefix.dev/v1alpha1",
                            "kind": "HotPrefixService", "name": "smollm2", "uid": UID,
                            "controller": true}]},
                }),
                Method::DELETE if cm => json!({"kind": "Status", "apiVersion": "v1",
                    "metadata": {}, "status": "Success"}),
                Method::GET => {
                    send.send_response(respond(
                        StatusCode::NOT_FOUND,
                        &status_body(StatusCode::NOT_FOUND, "NotFound"),
                    ));
                    continue;
                }
                _ if path.ends_with("/status") => {
                    let mut obj = stored.clone();
                    let body: Value = serde_json::from_slice(&bytes).unwrap();
                    obj["status"] = body["status"].clone();
                    obj
                }
                _ if bytes.is_empty() => json!({}),
                _ => serde_json::from_slice(&bytes).unwrap(),
            };
            send.send_response(respond(StatusCode::OK, &answer));
        }
    });
    let ctx = context(client);
    reconcile(&h, &ctx).await.unwrap();
    let calls = log.lock().unwrap().clone();
    let cm = "/api/v1/namespaces/default/configmaps/smollm2-chat-template";
    assert!(
        calls.contains(&(Method::GET, cm.to_string()))
            && calls.contains(&(Method::DELETE, cm.to_string())),
        "{calls:?}"
    );
    // Only that one is deleted.
    assert_eq!(
        calls.iter().filter(|(m, _)| *m == Method::DELETE).count(),
        1,
        "{calls:?}"
    );
    task.abort();
}

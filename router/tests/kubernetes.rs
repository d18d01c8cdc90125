//! Replica discovery from EndpointSlices against kube's mock API server (no API server runs
//! here): the test answers the watcher's LIST and WATCH requests itself, as an API server
//! would, and checks the registry after each answer. Also checks that a failing API server is
//! retried rather than ending discovery.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use hotprefix_router::kubernetes::{self, KubernetesOptions, PortSpec};
use hotprefix_router::registry::{Registry, Source};
use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The longest any step may take; a broken watcher fails the test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);

type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// The mock API server: the other end of the kube client's tower service.
struct ApiServerVerifier(ApiServerHandle);

impl ApiServerVerifier {
    /// Waits for the client's next request and returns it with its responder.
    async fn next(
        &mut self,
    ) -> (
        Request<Body>,
        tower_test::mock::SendResponse<Response<Body>>,
    ) {
        tokio::time::timeout(STEP, self.0.next_request())
            .await
            .expect("the watcher sent no request in time")
            .expect("the client was dropped")
    }

    /// Expects the watcher's LIST of the service's slices and answers it with `items` at
    /// resource version `rv`.
    async fn answer_list(&mut self, items: Vec<Value>, rv: &str) {
        let (req, send) = self.next().await;
        let uri = req.uri().to_string();
        assert_eq!(req.method(), http::Method::GET);
        assert!(
            uri.starts_with("/apis/discovery.k8s.io/v1/namespaces/serving/endpointslices?"),
            "{uri}"
        );
        assert!(
            uri.contains("labelSelector=kubernetes.io%2Fservice-name%3Dengine"),
            "{uri}"
        );
        assert!(!uri.contains("watch=true"), "expected a list: {uri}");
        let list = json!({
            "kind": "EndpointSliceList",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": { "resourceVersion": rv },
            "items": items,
        });
        send.send_response(Response::new(Body::from(
            serde_json::to_vec(&list).unwrap(),
        )));
    }

    /// Expects a WATCH from resource version `rv` and answers with `events` (type, object),
    /// one JSON line each; the body then ends, as when the API server closes a watch, and the
    /// watcher starts its next one.
    async fn answer_watch(&mut self, rv: &str, events: &[(&str, Value)]) {
        let (req, send) = self.next().await;
        let uri = req.uri().to_string();
        assert!(uri.contains("watch=true"), "expected a watch: {uri}");
        assert!(uri.contains(&format!("resourceVersion={rv}")), "{uri}");
        assert!(
            uri.contains("labelSelector=kubernetes.io%2Fservice-name%3Dengine"),
            "{uri}"
        );
        let mut body = Vec::new();
        for (kind, object) in events {
            serde_json::to_writer(&mut body, &json!({ "type": kind, "object": object })).unwrap();
            body.push(b'\n');
        }
        send.send_response(Response::new(Body::from(body)));
    }
}

/// An EndpointSlice of the `engine` Service: (pod, address, ready) per endpoint.
fn slice(name: &str, rv: &str, endpoints: &[(&str, &str, bool)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "serving",
            "resourceVersion": rv,
            "labels": { "kubernetes.io/service-name": "engine" },
        },
        "addressType": "IPv4",
        "ports": [
            { "name": "metrics", "port": 9090, "protocol": "TCP" },
            { "name": "http", "port": 8000, "protocol": "TCP" },
        ],
        "endpoints": endpoints.iter().map(|(pod, address, ready)| json!({
            "addresses": [address],
            "conditions": { "ready": ready, "serving": ready, "terminating": false },
            "targetRef": { "kind": "Pod", "name": pod, "namespace": "serving" },
        })).collect::<Vec<_>>(),
    })
}

/// Discovery running against the mock API server, stopped on drop of `stop`.
struct Discovery {
    registry: Arc<Registry>,
    server: ApiServerVerifier,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

fn start() -> Discovery {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let registry = Arc::new(Registry::new(2));
    // A static replica beside discovery: Kubernetes membership changes must leave it alone.
    registry.add_static("http://static:8000");
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(kubernetes::run(
        client,
        KubernetesOptions {
            service: "engine".into(),
            namespace: "serving".into(),
            port: PortSpec::default(),
        },
        registry.clone(),
        async move {
            let _ = rx.await;
        },
    ));
    Discovery {
        registry,
        server: ApiServerVerifier(handle),
        stop,
        task,
    }
}

impl Discovery {
    /// Waits until the registry's replicas are `want` (id, URL, source), all healthy.
    async fn expect(&self, want: &[(&str, &str, Source)]) {
        let want: Vec<(String, String, Source)> = want
            .iter()
            .map(|(id, url, s)| ((*id).into(), (*url).into(), *s))
            .collect();
        let got = || {
            self.registry
                .snapshot()
                .statuses()
                .into_iter()
                .map(|r| {
                    assert!(r.healthy, "{r:?}");
                    (r.id.0, r.url, r.source)
                })
                .collect::<Vec<_>>()
        };
        let deadline = tokio::time::Instant::now() + STEP;
        while got() != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "registry holds {:?}, expected {want:?}",
                got()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops discovery and checks that the task ends.
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(STEP, self.task)
            .await
            .expect("discovery did not stop")
            .unwrap();
    }
}

#[tokio::test]
async fn registry_follows_the_endpoint_slices() {
    let mut d = start();
    d.server
        .answer_list(
            vec![slice(
                "engine-abcde",
                "1",
                &[
                    ("engine-0", "10.0.0.1", true),
                    ("engine-1", "10.0.0.2", true),
                ],
            )],
            "1",
        )
        .await;
    d.expect(&[
        ("engine-0", "http://10.0.0.1:8000", Source::Kubernetes),
        ("engine-1", "http://10.0.0.2:8000", Source::Kubernetes),
        ("static:8000", "http://static:8000", Source::Static),
    ])
    .await;

    // engine-1 stops being ready: it leaves the registry.
    d.server
        .answer_watch(
            "1",
            &[(
                "MODIFIED",
                slice(
                    "engine-abcde",
                    "2",
                    &[
                        ("engine-0", "10.0.0.1", true),
                        ("engine-1", "10.0.0.2", false),
                    ],
                ),
            )],
        )
        .await;
    d.expect(&[
        ("engine-0", "http://10.0.0.1:8000", Source::Kubernetes),
        ("static:8000", "http://static:8000", Source::Static),
    ])
    .await;

    // A second slice appears (the Service grew) and the first one is deleted: the membership
    // is the union of the slices that remain.
    d.server
        .answer_watch(
            "2",
            &[
                (
                    "ADDED",
                    slice("engine-fghij", "3", &[("engine-2", "10.0.0.3", true)]),
                ),
                (
                    "DELETED",
                    slice("engine-abcde", "4", &[("engine-0", "10.0.0.1", true)]),
                ),
            ],
        )
        .await;
    d.expect(&[
        ("engine-2", "http://10.0.0.3:8000", Source::Kubernetes),
        ("static:8000", "http://static:8000", Source::Static),
    ])
    .await;

    // The watcher goes on watching from the last version it saw.
    let (req, _send) = d.server.next().await;
    let uri = req.uri().to_string();
    assert!(
        uri.contains("watch=true") && uri.contains("resourceVersion=4"),
        "{uri}"
    );
    d.stop().await;
}

#[tokio::test]
async fn api_errors_are_retried_with_growing_backoff() {
    let mut d = start();
    // The API server fails the first two lists (as it does while starting, or while RBAC is
    // missing).
    let status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "etcd is unavailable",
        "reason": "InternalError",
        "code": 500,
    });
    let mut gaps = Vec::new();
    let mut failed_at = None;
    for _ in 0..2 {
        let (_, send) = d.server.next().await;
        if let Some(t) = failed_at {
            gaps.push(std::time::Instant::now().duration_since(t));
        }
        let mut response = Response::new(Body::from(serde_json::to_vec(&status).unwrap()));
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        send.send_response(response);
        failed_at = Some(std::time::Instant::now());
    }
    // The task survives and lists again after its backoff.
    d.server
        .answer_list(
            vec![slice(
                "engine-abcde",
                "7",
                &[("engine-0", "10.0.0.1", true)],
            )],
            "7",
        )
        .await;
    gaps.push(failed_at.unwrap().elapsed());
    // kube's default backoff: the first wait is 0.8 s plus up to as much jitter, the second
    // twice that. Waits of the second size show that the watcher's `Init` event, which comes
    // before every list attempt, did not reset the backoff.
    assert!(gaps[0] >= Duration::from_millis(800), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(1600), "{gaps:?}");
    d.expect(&[
        ("engine-0", "http://10.0.0.1:8000", Source::Kubernetes),
        ("static:8000", "http://static:8000", Source::Static),
    ])
    .await;
    assert!(!d.task.is_finished());
    d.stop().await;
}

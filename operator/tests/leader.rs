//! Leader election over a Lease against kube's mock API server: the test answers each request
//! of one candidate in turn, as the API server would for a Lease that another replica holds,
//! lets expire, races for, or that this candidate renews and releases.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hotprefix_operator::leader::{self, Attempt, LeaseLock, LeaseTimings};
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::coordination::v1::Lease;
use kube::client::Body;
use serde_json::{Value, json};

const STEP: Duration = Duration::from_secs(10);
const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/hotprefix-operator";

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Send = tower_test::mock::SendResponse<Response<Body>>;

/// The mock API server, answering one request at a time.
struct ApiServerVerifier(Handle);

impl ApiServerVerifier {
    /// Waits for the next request, checks its method and path, returns its body.
    async fn expect(&mut self, method: Method, path: &str) -> (Value, Send) {
        let (req, send) = tokio::time::timeout(STEP, self.0.next_request())
            .await
            .expect("no request in time")
            .expect("client dropped");
        assert_eq!(req.method(), method, "{}", req.uri());
        assert_eq!(req.uri().path(), path);
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (body, send)
    }

    /// Answers the candidate's GET with `lease` (or 404 when `None`).
    async fn get(&mut self, lease: Option<Value>) {
        let (_, send) = self.expect(Method::GET, PATH).await;
        match lease {
            Some(l) => send.send_response(ok(&l)),
            None => send.send_response(status(StatusCode::NOT_FOUND, "NotFound")),
        }
    }

    /// Expects no further request (the client may be gone).
    async fn quiet(&mut self) {
        let next = tokio::time::timeout(Duration::from_millis(100), self.0.next_request()).await;
        assert!(!matches!(next, Ok(Some(_))), "unexpected request");
    }
}

fn ok(v: &Value) -> Response<Body> {
    Response::new(Body::from(serde_json::to_vec(v).unwrap()))
}

fn status(code: StatusCode, reason: &str) -> Response<Body> {
    let mut r = ok(&json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": reason, "reason": reason, "code": code.as_u16(),
    }));
    *r.status_mut() = code;
    r
}

fn lease(holder: Option<&str>, rv: &str, transitions: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "hotprefix-operator", "namespace": "ops", "resourceVersion": rv},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 1,
            "acquireTime": "2026-01-01T00:00:00.000000Z",
            "renewTime": "2026-01-01T00:00:00.000000Z",
            "leaseTransitions": transitions,
        },
    })
}

fn timings() -> LeaseTimings {
    LeaseTimings {
        lease_duration: Duration::from_secs(1),
        renew_deadline: Duration::from_millis(300),
        retry_period: Duration::from_millis(50),
    }
}

fn candidate(name: &str) -> (LeaseLock, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let api = kube::Api::<Lease>::namespaced(client, "ops");
    (
        LeaseLock::new(api, "hotprefix-operator", name, timings()),
        ApiServerVerifier(handle),
    )
}

#[tokio::test]
async fn an_absent_lease_is_created_held_by_the_candidate() {
    let (mut lock, mut server) = candidate("op-a");
    let attempt = tokio::spawn(async move { lock.try_acquire_or_renew().await.unwrap() });
    server.get(None).await;
    let (body, send) = server
        .expect(
            Method::POST,
            "/apis/coordination.k8s.io/v1/namespaces/ops/leases",
        )
        .await;
    assert_eq!(body["spec"]["holderIdentity"], "op-a");
    assert_eq!(body["spec"]["leaseDurationSeconds"], 1);
    assert_eq!(body["spec"]["leaseTransitions"], 0);
    assert!(body["spec"]["renewTime"].is_string());
    send.send_response(ok(&lease(Some("op-a"), "1", 0)));
    assert_eq!(attempt.await.unwrap(), Attempt::Leader);
}

#[tokio::test]
async fn a_held_lease_is_taken_over_only_after_it_stays_unrenewed() {
    let (mut lock, mut server) = candidate("op-b");
    let task = tokio::spawn(async move {
        let first = lock.try_acquire_or_renew().await.unwrap();
        let second = lock.try_acquire_or_renew().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let third = lock.try_acquire_or_renew().await.unwrap();
        (first, second, third, lock)
    });
    // Held by op-a and fresh: op-b follows and writes nothing.
    server.get(Some(lease(Some("op-a"), "5", 0))).await;
    // op-a renews (a new resourceVersion): the clock starts again.
    server.get(Some(lease(Some("op-a"), "6", 0))).await;
    // The record stays at version 6 for longer than its duration: op-b takes it over with an
    // update guarded by that version.
    server.get(Some(lease(Some("op-a"), "6", 0))).await;
    let (body, send) = server.expect(Method::PUT, PATH).await;
    assert_eq!(body["metadata"]["resourceVersion"], "6");
    assert_eq!(body["spec"]["holderIdentity"], "op-b");
    assert_eq!(body["spec"]["leaseTransitions"], 1);
    assert_ne!(body["spec"]["acquireTime"], "2026-01-01T00:00:00.000000Z");
    send.send_response(ok(&lease(Some("op-b"), "7", 1)));
    let (first, second, third, mut lock) = task.await.unwrap();
    let follower = Attempt::Follower {
        holder: Some("op-a".into()),
    };
    assert_eq!(
        (first, second.clone(), third),
        (follower.clone(), follower, Attempt::Leader)
    );

    // Renewing keeps the acquire time and the transition count.
    let renew = tokio::spawn(async move {
        let r = lock.try_acquire_or_renew().await.unwrap();
        (r, lock)
    });
    let mut held = lease(Some("op-b"), "7", 1);
    held["spec"]["acquireTime"] = json!("2026-01-01T00:00:05.000000Z");
    server.get(Some(held)).await;
    let (body, send) = server.expect(Method::PUT, PATH).await;
    assert_eq!(body["spec"]["acquireTime"], "2026-01-01T00:00:05.000000Z");
    assert_eq!(body["spec"]["leaseTransitions"], 1);
    assert_eq!(body["metadata"]["resourceVersion"], "7");
    send.send_response(ok(&lease(Some("op-b"), "8", 1)));
    let (r, mut lock) = renew.await.unwrap();
    assert_eq!(r, Attempt::Leader);

    // Releasing hands it back at once: no holder, a one-second duration.
    let release = tokio::spawn(async move { lock.release().await.unwrap() });
    server.get(Some(lease(Some("op-b"), "8", 1))).await;
    let (body, send) = server.expect(Method::PUT, PATH).await;
    assert!(body["spec"]["holderIdentity"].is_null(), "{body}");
    assert_eq!(body["spec"]["leaseDurationSeconds"], 1);
    send.send_response(ok(&lease(None, "9", 1)));
    release.await.unwrap();
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once_and_a_lost_race_follows() {
    let (mut lock, mut server) = candidate("op-c");
    let task = tokio::spawn(async move { lock.try_acquire_or_renew().await.unwrap() });
    // No holder: no need to wait for expiry. But another candidate wrote first: 409.
    server.get(Some(lease(None, "3", 2))).await;
    let (body, send) = server.expect(Method::PUT, PATH).await;
    assert_eq!(body["spec"]["holderIdentity"], "op-c");
    assert_eq!(body["spec"]["leaseTransitions"], 3);
    send.send_response(status(StatusCode::CONFLICT, "Conflict"));
    assert_eq!(task.await.unwrap(), Attempt::Follower { holder: None });
}

#[tokio::test]
async fn the_holder_steps_down_when_another_takes_the_lease_or_renewals_fail() {
    // Another replica took it over (the holder's renewals had stalled).
    let (mut lock, mut server) = candidate("op-d");
    let hold = tokio::spawn(async move { leader::hold(&mut lock).await });
    server.get(Some(lease(Some("op-d"), "1", 0))).await;
    let (_, send) = server.expect(Method::PUT, PATH).await;
    send.send_response(ok(&lease(Some("op-d"), "2", 0)));
    server.get(Some(lease(Some("op-e"), "3", 1))).await;
    tokio::time::timeout(STEP, hold).await.unwrap().unwrap();
    server.quiet().await;

    // The API server fails every renewal: the holder gives up after the renew deadline.
    let (mut lock, mut server) = candidate("op-f");
    let hold = tokio::spawn(async move { leader::hold(&mut lock).await });
    let started = std::time::Instant::now();
    loop {
        let next = tokio::time::timeout(STEP, server.0.next_request())
            .await
            .unwrap();
        let Some((_, send)) = next else { break };
        send.send_response(status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError"));
        if hold.is_finished() {
            break;
        }
    }
    tokio::time::timeout(STEP, hold).await.unwrap().unwrap();
    assert!(started.elapsed() >= timings().renew_deadline);
}

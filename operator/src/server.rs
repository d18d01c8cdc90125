//! The operator's HTTP surface: `/health` (the process is up, and whether it leads) and
//! `/metrics` (Prometheus text). `app` builds the router, `run` serves it until shutdown.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct ServerState {
    /// The operator's metrics (leadership included).
    pub metrics: Arc<Metrics>,
}

/// The routes.
pub fn app(state: ServerState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    state: ServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Healthy while the process serves; a standby replica is healthy too (it is waiting for the
/// lease, which is its job).
async fn health(State(s): State<ServerState>) -> Response {
    axum::Json(serde_json::json!({
        "status": "ok",
        "leader": s.metrics.is_leader(),
    }))
    .into_response()
}

async fn metrics(State(s): State<ServerState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper_util::client::legacy::Client;

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let client =
            Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let resp = client
            .get(format!("http://{addr}{path}").parse().unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn health_and_metrics_are_served_until_shutdown() {
        let metrics = Arc::new(Metrics::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let state = ServerState {
            metrics: metrics.clone(),
        };
        let server = tokio::spawn(run(listener, state, async move {
            let _ = rx.await;
        }));
        let (status, body) = get(addr, "/health").await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v, serde_json::json!({"status": "ok", "leader": false}));
        metrics.set_leader(true);
        metrics.reconciled(std::time::Duration::from_millis(3));
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("hotprefix_operator_leader 1"), "{body}");
        assert!(
            body.contains("hotprefix_operator_reconciliations_total 1"),
            "{body}"
        );
        assert_eq!(get(addr, "/nope").await.0, 404);
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}

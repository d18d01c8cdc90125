//! Active health checks: every replica's `/ready` is probed periodically; failures eject a
//! replica (after the registry's threshold) and one success brings it back. Requests that fail
//! to connect count too (in the proxy), so a dead replica is ejected between probes.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::Full;

use crate::registry::Registry;
use crate::server::HttpClient;

/// Probes every replica every `interval` until `shutdown` resolves.
pub async fn run(
    registry: Arc<Registry>,
    client: HttpClient,
    interval: Duration,
    timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        let probes = registry.targets().into_iter().map(|(id, url)| {
            let client = client.clone();
            async move {
                let ok = match hyper::Request::get(format!("{url}/ready"))
                    .body(Full::new(Bytes::new()))
                {
                    Ok(req) => matches!(
                        tokio::time::timeout(timeout, client.request(req)).await,
                        Ok(Ok(r)) if r.status().is_success()
                    ),
                    Err(_) => false,
                };
                (id, ok)
            }
        });
        for (id, ok) in futures_util::future::join_all(probes).await {
            if ok {
                registry.mark_ok(&id);
            } else {
                registry.mark_failed(&id, "probe");
            }
        }
    }
}

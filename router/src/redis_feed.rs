//! Reads the engines' registrations, load reports and hotness summaries from Redis into the
//! [`Registry`]: a full refresh every [`REFRESH_INTERVAL`] plus the records named by update
//! announcements as they arrive. Redis being down never stops routing: the feed marks itself
//! degraded (the router then routes without summaries or load reports), retries with backoff,
//! and catches up with a full refresh when Redis is back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use hotprefix_engine::publish::RedisTarget;
use hotprefix_protocol::ReplicaId;
use hotprefix_protocol::cluster::{
    Announcement, HotnessSummary, Keys, LIVENESS_TTL_MS, LoadReport, Registration,
};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;

use crate::registry::Registry;

/// Full re-read of every replica's records, whatever the announcements said.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(2);
/// Each Redis command's time limit.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The feed's state, shared with `/health` and `/metrics`.
#[derive(Debug, Default)]
pub struct FeedStatus {
    /// Whether the last Redis operation succeeded.
    pub up: AtomicBool,
    /// Full refreshes completed.
    pub refreshes: AtomicU64,
    /// Failed Redis operations.
    pub errors: AtomicU64,
    /// Announcements received.
    pub announcements: AtomicU64,
}

/// Runs the feed until `shutdown` resolves.
pub async fn run(
    target: RedisTarget,
    keys: Keys,
    registry: Arc<Registry>,
    status: Arc<FeedStatus>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(100);
    loop {
        let session = session(target.client(), &keys, &registry, &status);
        tokio::select! {
            () = &mut shutdown => return,
            e = session => {
                // A session that worked for a while starts its retries over from short waits.
                if status.up.swap(false, Ordering::Relaxed) {
                    backoff = Duration::from_millis(100);
                }
                status.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    redis = %target.shown_url(),
                    error = %target.scrub(&e),
                    retry_in = ?backoff,
                    "Redis unavailable; routing without summaries"
                );
            }
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        // Summaries older than the liveness TTL describe caches that have moved on.
        registry.expire_summaries(Duration::from_millis(2 * LIVENESS_TTL_MS));
    }
}

/// A connection's lifetime: subscribe, refresh fully, then apply announcements and refresh
/// periodically until something fails. Returns the failure.
async fn session(
    client: &redis::Client,
    keys: &Keys,
    registry: &Registry,
    status: &FeedStatus,
) -> String {
    let mut conn = match timed(client.get_multiplexed_async_connection()).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut pubsub = match timed(client.get_async_pubsub()).await {
        Ok(p) => p,
        Err(e) => return e,
    };
    if let Err(e) = timed(pubsub.subscribe(keys.channel())).await {
        return e;
    }
    let mut messages = pubsub.into_on_message();
    let mut tick = tokio::time::interval(REFRESH_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = refresh(&mut conn, keys, registry).await {
                    return e;
                }
                status.refreshes.fetch_add(1, Ordering::Relaxed);
                if !status.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("Redis feed up");
                }
            }
            msg = messages.next() => {
                let Some(msg) = msg else {
                    return "the subscription closed".into();
                };
                status.announcements.fetch_add(1, Ordering::Relaxed);
                let Ok(line) = msg.get_payload::<String>() else { continue };
                match Announcement::parse(&line) {
                    Ok(a) => {
                        if let Err(e) = apply(&mut conn, keys, registry, &a).await {
                            return e;
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "ignored announcement"),
                }
            }
        }
    }
}

async fn timed<T>(
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{:?}: {}", e.kind(), e.detail().unwrap_or(""))),
        Err(_) => Err(format!("no answer within {COMMAND_TIMEOUT:?}")),
    }
}

/// Re-reads every registered replica's records; drops replicas whose registration expired.
async fn refresh(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    registry: &Registry,
) -> Result<(), String> {
    let members: Vec<String> = timed(conn.smembers(keys.replicas())).await?;
    let ids: Vec<ReplicaId> = members
        .iter()
        .filter_map(|m| ReplicaId::parse(m).ok())
        .collect();
    let mut live = Vec::with_capacity(ids.len());
    if !ids.is_empty() {
        let info_keys: Vec<String> = ids.iter().map(|id| keys.info(id)).collect();
        let infos: Vec<Option<Vec<u8>>> = timed(conn.mget(&info_keys)).await?;
        for (id, info) in ids.iter().zip(infos) {
            match info.map(|b| Registration::decode(&b)) {
                Some(Ok(reg)) if &reg.replica == id => {
                    registry.register(&reg);
                    live.push(id.clone());
                }
                Some(Ok(_)) | Some(Err(_)) => {
                    tracing::warn!(replica = %id, "unreadable registration ignored");
                }
                None => {
                    // Expired: the replica stopped refreshing. Tidy the set for everyone.
                    let _: Result<i64, String> = timed(conn.srem(keys.replicas(), &id.0)).await;
                }
            }
        }
        for id in &live {
            read_load(conn, keys, registry, id).await?;
            read_summary(conn, keys, registry, id).await?;
        }
    }
    for id in registry.remove_stale_dynamic(Duration::from_millis(LIVENESS_TTL_MS)) {
        tracing::info!(replica = %id, "replica left (registration expired)");
    }
    Ok(())
}

async fn apply(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    registry: &Registry,
    a: &Announcement,
) -> Result<(), String> {
    match a {
        Announcement::Registered(id) => {
            let b: Option<Vec<u8>> = timed(conn.get(keys.info(id))).await?;
            if let Some(Ok(reg)) = b.map(|b| Registration::decode(&b)) {
                registry.register(&reg);
            }
        }
        Announcement::Load(id, _) => read_load(conn, keys, registry, id).await?,
        Announcement::Summary(id, _) => read_summary(conn, keys, registry, id).await?,
        Announcement::Left(id) => {
            if registry.remove_dynamic(id) {
                tracing::info!(replica = %id, "replica left");
            }
        }
    }
    Ok(())
}

async fn read_load(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    registry: &Registry,
    id: &ReplicaId,
) -> Result<(), String> {
    let b: Option<Vec<u8>> = timed(conn.get(keys.load(id))).await?;
    if let Some(b) = b {
        match LoadReport::decode(&b) {
            Ok(l) => {
                registry.set_load(id, l);
            }
            Err(e) => tracing::debug!(replica = %id, error = %e, "unreadable load report"),
        }
    }
    Ok(())
}

async fn read_summary(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    registry: &Registry,
    id: &ReplicaId,
) -> Result<(), String> {
    let b: Option<Vec<u8>> = timed(conn.get(keys.summary(id))).await?;
    if let Some(b) = b {
        match HotnessSummary::decode(&b) {
            Ok(s) => {
                registry.set_summary(id, &s);
            }
            Err(e) => tracing::debug!(replica = %id, error = %e, "unreadable summary"),
        }
    }
    Ok(())
}

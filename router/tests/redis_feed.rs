//! The router's Redis feed against a real `redis-server` with a password and with TLS: records
//! written as the engines write them show up in the router (`/health` lists the replica and its
//! summary), a replica that announces `leave` disappears at once, and the password never
//! appears in the router's `/health` or `/metrics`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use hotprefix_protocol::cluster::{
    Announcement, HotnessSummary, Keys, LIVENESS_TTL_MS, Registration, SCHEMA_VERSION, SummaryEntry,
};
use hotprefix_protocol::{BlockHash, ReplicaId, Salt, Tier};
use hotprefix_testkit::RedisServer;
use serde_json::Value;

/// Writes a replica's registration and a 3-block summary the way the engine's publisher does.
fn publish(redis: &RedisServer, keys: &Keys, id: &ReplicaId) {
    let mut c = redis.connection();
    let reg = Registration {
        schema: SCHEMA_VERSION,
        replica: id.clone(),
        url: "http://127.0.0.1:9".into(),
        model: "m".into(),
        block_size: 16,
        salt: Salt(7),
        block_hash_scheme: 1,
        started_at_ms: 1,
        version: "test".into(),
    };
    let summary = HotnessSummary {
        seq: 1,
        at_ms: 1,
        block_size: 16,
        entries: (1..=3)
            .map(|h| SummaryEntry {
                hash: BlockHash(h),
                tier: Tier::Device,
                hotness: 1.0,
                depth: h as u32,
            })
            .collect(),
    };
    let ttl = LIVENESS_TTL_MS * 4;
    redis::pipe()
        .cmd("SET")
        .arg(keys.info(id))
        .arg(reg.encode())
        .arg("PX")
        .arg(ttl)
        .cmd("SET")
        .arg(keys.summary(id))
        .arg(summary.encode())
        .arg("PX")
        .arg(ttl)
        .cmd("SADD")
        .arg(keys.replicas())
        .arg(&id.0)
        .cmd("PUBLISH")
        .arg(keys.channel())
        .arg(Announcement::Summary(id.clone(), 1).to_string())
        .exec(&mut c)
        .unwrap();
}

fn leave(redis: &RedisServer, keys: &Keys, id: &ReplicaId) {
    let mut c = redis.connection();
    redis::pipe()
        .cmd("DEL")
        .arg(keys.info(id))
        .arg(keys.summary(id))
        .cmd("SREM")
        .arg(keys.replicas())
        .arg(&id.0)
        .cmd("PUBLISH")
        .arg(keys.channel())
        .arg(Announcement::Left(id.clone()).to_string())
        .exec(&mut c)
        .unwrap();
}

async fn health(addr: std::net::SocketAddr) -> Value {
    let (status, _, body) = common::http(addr, "GET", "/health", &[], "").await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

async fn wait_for(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !ok().await {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs a router on `redis` with `flags` and checks it follows a replica in and out.
async fn follows_a_replica(redis: &RedisServer, flags: &[&str], secret: Option<&str>) {
    let keys = Keys::new("feed").unwrap();
    let id = ReplicaId::parse("engine-7").unwrap();
    let mut args = vec!["--service", "feed", "--health-interval-ms", "60000"];
    args.extend_from_slice(flags);
    let r = common::router(&args).await;
    wait_for("the feed to connect", async || {
        health(r.addr).await["redis"] == "up"
    })
    .await;
    publish(redis, &keys, &id);
    wait_for("the replica and its summary", async || {
        let h = health(r.addr).await;
        h["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == "engine-7" && x["summary_blocks"] == 3)
    })
    .await;
    if let Some(secret) = secret {
        let h = health(r.addr).await.to_string();
        let (_, _, metrics) = common::http(r.addr, "GET", "/metrics", &[], "").await;
        assert!(!h.contains(secret) && !metrics.contains(secret));
    }
    // A clean leave removes it at once, without waiting for the keys to expire.
    leave(redis, &keys, &id);
    wait_for("the replica to leave", async || {
        health(r.addr).await["replicas"]
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;
    let mut r = r;
    r.launched.take().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_reads_a_password_protected_redis() {
    let redis = RedisServer::with_password("s3cret-pw");
    // The password given apart from the URL (as from a Kubernetes Secret).
    let url = redis.url_without_password();
    follows_a_replica(
        &redis,
        &["--redis-url", &url, "--redis-password", "s3cret-pw"],
        Some("s3cret-pw"),
    )
    .await;
    // And inside the URL.
    follows_a_replica(&redis, &["--redis-url", &redis.url()], Some("s3cret-pw")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_reads_redis_over_tls_with_a_private_ca() {
    let redis = RedisServer::with_tls();
    let ca = redis.ca_file().unwrap().display().to_string();
    assert!(redis.url().starts_with("rediss://"));
    follows_a_replica(
        &redis,
        &["--redis-url", &redis.url(), "--redis-ca-file", &ca],
        None,
    )
    .await;
}

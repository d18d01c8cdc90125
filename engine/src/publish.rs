//! Publishes this replica to Redis for routers, as `hotprefix_protocol::cluster` specifies:
//! its registration and load report every [`LOAD_INTERVAL_MS`], its hotness summary every
//! [`SUMMARY_INTERVAL_MS`], each with a TTL of [`LIVENESS_TTL_MS`] and an announcement on the
//! service's channel; on shutdown it deletes its keys and announces that it left.
//!
//! Publishing never affects serving: it runs on its own tokio task, reads the engine only
//! through [`EngineHandle::load_report`], bounds every Redis call by a timeout, reconnects with
//! capped exponential backoff, and logs failures at most every [`LOG_EVERY`]. Because every key
//! is rewritten periodically, a Redis that restarted empty has all of them back within one
//! summary interval of the reconnection. The Redis password never reaches a log line or an
//! error: URLs are shown through [`redact_url`] and error texts are scrubbed of it.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hotprefix_protocol::cluster::{
    self, Announcement, HotnessSummary, Keys, LIVENESS_TTL_MS, LOAD_INTERVAL_MS, LoadReport,
    MAX_SUMMARY_ENTRIES, Registration, SCHEMA_VERSION, SUMMARY_INTERVAL_MS, redact_url,
};
use hotprefix_protocol::{BLOCK_HASH_SCHEME, ReplicaId};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo};
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::engine::{CacheReport, EngineHandle};
use crate::launch::Served;

/// How long establishing a connection (TCP, TLS, AUTH) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one command or pipeline may take before the connection is considered broken.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the engine thread may take to answer for its cache report (it answers between
/// steps, so only a very long step delays it).
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time the goodbye (delete keys, leave the set, announce) gets at shutdown, connecting
/// included: shutdown must not hang on an unreachable Redis.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(3);
/// First reconnection delay; doubled after every failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnection delay: short enough that a Redis that comes back is written again
/// within about two seconds, long enough that a dead one costs nothing.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// While Redis keeps failing, one warning per this period (with a count of the rest).
pub const LOG_EVERY: Duration = Duration::from_secs(30);

/// A secret flag value (a password): printed as `***` by `Debug`, so that configuration dumps
/// and panics cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret::new(s))
    }
}

/// A Redis URL, which may hold a user name and password: `Debug` and `Display` show it through
/// [`redact_url`], and show nothing of a value that is not a URL at all (a password pasted into
/// the wrong variable must not be echoed).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    fn shown(&self) -> String {
        if self.0.contains("://") {
            redact_url(&self.0)
        } else {
            "<not a URL>".into()
        }
    }
}

impl RedisUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> RedisUrl {
        RedisUrl(url.into())
    }

    /// The URL with its credentials, for the client only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown())
    }
}

impl FromStr for RedisUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<RedisUrl, Self::Err> {
        Ok(RedisUrl::new(s))
    }
}

/// The validated publishing configuration (`--redis-url` and the flags around it).
#[derive(Clone, Debug)]
pub struct PublishConfig {
    /// Where Redis is: `redis://` or `rediss://`, optionally with `user:password@`.
    pub url: RedisUrl,
    /// Overrides the URL's password (`--redis-password`).
    pub password: Option<Secret>,
    /// A PEM file of CA certificates to trust instead of the system's (`rediss://` only).
    pub ca_file: Option<PathBuf>,
    /// The service's keys.
    pub keys: Keys,
    /// This replica's id.
    pub replica: ReplicaId,
    /// The URL routers reach this replica at; `None`: derived from the bound address.
    pub advertise_url: Option<String>,
    /// Entries per summary, `1..=MAX_SUMMARY_ENTRIES`.
    pub summary_entries: usize,
}

impl PublishConfig {
    /// The URL to advertise: the configured one, else `http://{bound}` with an unspecified
    /// address (`0.0.0.0`, `::`) replaced by loopback.
    pub fn advertise_url(&self, bound: SocketAddr) -> String {
        match &self.advertise_url {
            Some(u) => u.clone(),
            None => default_advertise_url(bound),
        }
    }
}

/// `http://{addr}`, with an unspecified IP (which nobody can connect to) replaced by the
/// loopback address of its family.
pub fn default_advertise_url(addr: SocketAddr) -> String {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{addr}")
}

/// Why publishing could not be set up. Messages show the URL redacted and never the password.
#[derive(Debug, Error)]
pub enum PublishError {
    /// The URL does not name a Redis server this client can reach.
    #[error("--redis-url {url}: {msg}")]
    Url {
        /// The URL, redacted.
        url: String,
        /// What is wrong with it.
        msg: String,
    },
    /// The CA file could not be used.
    #[error("--redis-ca-file {path}: {msg}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        msg: String,
    },
}

/// A Redis server to publish to: the client (URL, password override, trusted CA) plus what
/// logs may say about it.
#[derive(Clone)]
pub struct RedisTarget {
    client: Client,
    shown: String,
    secrets: Arc<Vec<String>>,
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

impl RedisTarget {
    /// Checks the URL and the CA file and builds the client; connects to nothing yet.
    pub fn new(
        url: &RedisUrl,
        password: Option<&Secret>,
        ca_file: Option<&std::path::Path>,
    ) -> Result<RedisTarget, PublishError> {
        // rustls needs a process-wide provider and this workspace builds it with `ring` only.
        // Another component may have installed it already, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let shown = url.to_string();
        let mut secrets: Vec<String> = password
            .map(|p| p.expose().to_string())
            .into_iter()
            .collect();
        let bad_url = |msg: String, secrets: &[String]| PublishError::Url {
            url: shown.clone(),
            msg: scrub(&msg, secrets),
        };
        let scheme = url.expose().split_once("://").map(|(s, _)| s);
        if !matches!(scheme, Some("redis" | "rediss")) {
            return Err(bad_url(
                "expected redis://[user:password@]host[:port][/db] or rediss://...".into(),
                &secrets,
            ));
        }
        let mut info = url
            .expose()
            .into_connection_info()
            .map_err(|e| bad_url(e.to_string(), &secrets))?;
        if let Some(p) = info.redis_settings().password() {
            secrets.push(p.to_string());
        }
        if let Some(p) = password {
            let settings = info.redis_settings().clone().set_password(p.expose());
            info = info.set_redis_settings(settings);
        }
        let client = match ca_file {
            Some(path) => {
                let shown_path = path.display().to_string();
                if scheme != Some("rediss") {
                    return Err(PublishError::CaFile {
                        path: shown_path,
                        msg: "a CA file needs a rediss:// URL".into(),
                    });
                }
                let pem = std::fs::read(path).map_err(|e| PublishError::CaFile {
                    path: shown_path.clone(),
                    msg: e.to_string(),
                })?;
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(PublishError::CaFile {
                        path: shown_path,
                        msg: "no PEM certificate in it".into(),
                    });
                }
                Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
                .map_err(|e| PublishError::CaFile {
                    path: shown_path,
                    msg: scrub(&e.to_string(), &secrets),
                })?
            }
            None => Client::open(info).map_err(|e| bad_url(e.to_string(), &secrets))?,
        };
        secrets.retain(|s| !s.is_empty());
        Ok(RedisTarget {
            client,
            shown,
            secrets: Arc::new(secrets),
        })
    }

    /// The URL as logs show it (credentials redacted).
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    /// The client, for other readers of the same Redis (the router's feed).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// `text` with every secret of this target replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        scrub(text, &self.secrets)
    }

    /// A multiplexed connection, established within [`CONNECT_TIMEOUT`], whose commands time
    /// out after [`OP_TIMEOUT`]. Errors are scrubbed text.
    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT));
        let attempt = self
            .client
            .get_multiplexed_async_connection_with_config(&config);
        // The client's own timeout covers the TCP connect; this one also bounds TLS and AUTH.
        match tokio::time::timeout(CONNECT_TIMEOUT + OP_TIMEOUT, attempt).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(self.scrub(&format!("connecting: {e}"))),
            Err(_) => Err(format!(
                "connecting: no connection within {:?}",
                CONNECT_TIMEOUT + OP_TIMEOUT
            )),
        }
    }
}

/// `text` with each secret replaced by `***`.
fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s.as_str(), "***");
    }
    out
}

/// Runs `pipe` on `con` within [`OP_TIMEOUT`].
async fn run_pipe<T: redis::FromRedisValue>(
    pipe: &redis::Pipeline,
    con: &mut MultiplexedConnection,
    what: &str,
) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, pipe.query_async::<T>(con)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {OP_TIMEOUT:?}")),
    }
}

/// Unix milliseconds now.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The protocol's form of a cache summary entry: hotness as a finite `f32` (saturating at
/// `f32::MAX`; a non-finite or negative value, which the cache never produces, becomes 0 or
/// the maximum so that readers, which refuse non-finite values, still accept the summary) and
/// depth as a `u32` (saturating).
pub fn protocol_entry(e: &hotprefix_cache::SummaryEntry) -> cluster::SummaryEntry {
    let hotness = if e.hotness.is_nan() || e.hotness <= 0.0 {
        0.0
    } else if e.hotness >= f64::from(f32::MAX) {
        f32::MAX
    } else {
        e.hotness as f32
    };
    cluster::SummaryEntry {
        hash: e.hash,
        tier: e.tier,
        hotness,
        depth: u32::try_from(e.depth).unwrap_or(u32::MAX),
    }
}

/// The summary to publish: at most `max_entries` (and never more than readers accept) of the
/// cache's hottest entries, in its order.
pub fn summary_record(
    seq: u64,
    at_ms: u64,
    block_size: usize,
    hottest: &[hotprefix_cache::SummaryEntry],
    max_entries: usize,
) -> HotnessSummary {
    let n = hottest.len().min(max_entries).min(MAX_SUMMARY_ENTRIES);
    HotnessSummary {
        seq,
        at_ms,
        block_size: u32::try_from(block_size).unwrap_or(u32::MAX),
        entries: hottest[..n].iter().map(protocol_entry).collect(),
    }
}

/// The load report of a cache report. Blocks "in use" are those not on a free list: cached
/// blocks count, since they hold prefixes a router may send requests for.
pub fn load_record(seq: u64, at_ms: u64, r: &CacheReport) -> LoadReport {
    let u = &r.usage;
    let sat = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let wide = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    LoadReport {
        schema: SCHEMA_VERSION,
        seq,
        at_ms,
        waiting: sat(r.waiting),
        running: sat(r.running),
        pending_prefill_tokens: wide(r.pending_prefill_tokens),
        device_blocks_used: u64::from(u.device_capacity).saturating_sub(wide(u.device_free)),
        device_blocks_total: u64::from(u.device_capacity),
        host_blocks_used: u64::from(u.host_capacity).saturating_sub(wide(u.host_free)),
        host_blocks_total: u64::from(u.host_capacity),
    }
}

/// Capped exponential backoff with ±20% jitter, so that many engines that lost the same
/// Redis do not reconnect in lockstep.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    rng: u64,
}

impl Backoff {
    /// Starts at [`BACKOFF_MIN`]; `seed` varies the jitter between processes.
    pub fn new(seed: u64) -> Backoff {
        // One SplitMix64 step spreads similar seeds (close clocks, close pids) apart.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Backoff {
            next: BACKOFF_MIN,
            // xorshift must not start at zero.
            rng: (z ^ (z >> 31)) | 1,
        }
    }

    /// The delay before the next attempt; each call doubles the base up to [`BACKOFF_MAX`].
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64: enough randomness for jitter, no dependency.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let jitter = 0.8 + 0.4 * ((self.rng >> 11) as f64 / (1u64 << 53) as f64);
        let d = self.next.mul_f64(jitter);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }

    /// After a success: the next failure waits the minimum again.
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Rate-limited logging of a failing Redis: the first failure of a run of them is a warning,
/// then one warning per [`LOG_EVERY`] with the count in between, and one line when it recovers.
#[derive(Debug, Default)]
pub struct FailureLog {
    failing_since: Option<Instant>,
    last_logged: Option<Instant>,
    suppressed: u64,
    failures: u64,
}

/// What [`FailureLog`] decided about one event.
#[derive(Debug, PartialEq, Eq)]
pub enum LogDecision {
    /// Log a warning, mentioning this many failures not logged since the last one.
    Warn {
        /// Failures since the last warning that were not logged.
        suppressed: u64,
    },
    /// Log nothing (a warning was logged recently).
    Quiet,
    /// Log that Redis works again after this many failures.
    Recovered {
        /// Failures in the run that just ended.
        failures: u64,
    },
    /// Nothing to say: it was not failing.
    Fine,
}

impl FailureLog {
    /// A failure at `now`.
    pub fn failure(&mut self, now: Instant) -> LogDecision {
        self.failures += 1;
        if self.failing_since.is_none() {
            self.failing_since = Some(now);
        }
        match self.last_logged {
            Some(t) if now.duration_since(t) < LOG_EVERY => {
                self.suppressed += 1;
                LogDecision::Quiet
            }
            _ => {
                self.last_logged = Some(now);
                LogDecision::Warn {
                    suppressed: std::mem::take(&mut self.suppressed),
                }
            }
        }
    }

    /// A success.
    pub fn success(&mut self) -> LogDecision {
        if self.failing_since.take().is_none() {
            return LogDecision::Fine;
        }
        let failures = std::mem::take(&mut self.failures);
        self.suppressed = 0;
        self.last_logged = None;
        LogDecision::Recovered { failures }
    }
}

/// Stops a running publisher (cheap to clone; see [`PublisherHandle::stopper`]).
#[derive(Clone, Debug)]
pub struct Stopper(Arc<watch::Sender<bool>>);

impl Stopper {
    /// Asks the publisher to leave: delete its keys, announce `leave` and end.
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

/// A running publisher task.
#[derive(Debug)]
pub struct PublisherHandle {
    stop: Stopper,
    task: JoinHandle<()>,
}

impl PublisherHandle {
    /// A handle that can stop the publisher from elsewhere (the shutdown signal's task).
    pub fn stopper(&self) -> Stopper {
        self.stop.clone()
    }

    /// Stops the publisher and waits, bounded, for it to have left.
    pub async fn shutdown(self) {
        self.stop.stop();
        // The task bounds its goodbye by LEAVE_TIMEOUT; the margin covers a write in flight.
        let limit = LEAVE_TIMEOUT + OP_TIMEOUT + REPORT_TIMEOUT;
        if tokio::time::timeout(limit, self.task).await.is_err() {
            tracing::warn!("the Redis publisher did not stop within {limit:?}");
        }
    }
}

/// The publisher of one replica.
#[derive(Debug)]
pub struct Publisher {
    target: RedisTarget,
    keys: Keys,
    replica: ReplicaId,
    registration: Vec<u8>,
    block_size: usize,
    summary_entries: usize,
    load_seq: u64,
    summary_seq: u64,
    /// Whether the registration has been announced by this process yet.
    announced: bool,
    log: FailureLog,
}

impl Publisher {
    /// A publisher for the engine described by `served`, listening on `bound`.
    pub fn new(
        target: RedisTarget,
        cfg: &PublishConfig,
        served: &Served,
        bound: SocketAddr,
    ) -> Publisher {
        let registration = Registration {
            schema: SCHEMA_VERSION,
            replica: cfg.replica.clone(),
            url: cfg.advertise_url(bound),
            model: served.model.clone(),
            block_size: u32::try_from(served.block_size).unwrap_or(u32::MAX),
            salt: served.salt,
            block_hash_scheme: BLOCK_HASH_SCHEME,
            started_at_ms: now_ms(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        Publisher {
            target,
            keys: cfg.keys.clone(),
            replica: cfg.replica.clone(),
            registration: registration.encode(),
            block_size: served.block_size,
            summary_entries: cfg.summary_entries.clamp(1, MAX_SUMMARY_ENTRIES),
            load_seq: 0,
            summary_seq: 0,
            announced: false,
            log: FailureLog::default(),
        }
    }

    /// Starts publishing on the current tokio runtime until stopped.
    pub fn spawn(self, engine: EngineHandle) -> PublisherHandle {
        let (tx, rx) = watch::channel(false);
        tracing::info!(
            redis = %self.target.shown_url(),
            replica = %self.replica,
            "publishing registration, load and hotness summary to Redis"
        );
        let task = tokio::spawn(self.run(engine, rx));
        PublisherHandle {
            stop: Stopper(Arc::new(tx)),
            task,
        }
    }

    async fn run(mut self, engine: EngineHandle, mut stop: watch::Receiver<bool>) {
        let seed = now_ms() ^ u64::from(std::process::id()).rotate_left(32);
        let mut backoff = Backoff::new(seed);
        let mut con: Option<MultiplexedConnection> = None;
        let mut retry_at = Instant::now();
        let mut next_summary = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(LOAD_INTERVAL_MS));
        // Half a tick early, so that a late tick (after a stall) does not push the summary a
        // whole load interval back.
        let summary_every = Duration::from_millis(SUMMARY_INTERVAL_MS - LOAD_INTERVAL_MS / 2);
        // After a stall, publish once and go on; a burst of catch-up writes helps nobody.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let round = async {
                // The tick's scheduled instant, not the wake-up time: summaries are due on
                // exact multiples of the load interval, not a tick late by a jitter.
                let now = tick.tick().await;
                if con.is_none() {
                    if now < retry_at {
                        return;
                    }
                    match self.target.connect().await {
                        Ok(c) => {
                            con = Some(c);
                            // A new connection may be a new (empty) Redis: rewrite everything.
                            next_summary = now;
                        }
                        Err(e) => {
                            retry_at = Instant::now() + backoff.next_delay();
                            self.failed(&e);
                            return;
                        }
                    }
                }
                let with_summary = now >= next_summary;
                let top_k = if with_summary {
                    self.summary_entries
                } else {
                    0
                };
                let report = tokio::time::timeout(REPORT_TIMEOUT, engine.load_report(top_k));
                let Ok(Some(report)) = report.await else {
                    // The engine is stopping or stuck; its keys then expire, as they should.
                    tracing::debug!("no cache report from the engine; nothing published");
                    return;
                };
                let Some(c) = con.as_mut() else { return };
                match self.publish(c, &report, with_summary).await {
                    Ok(()) => {
                        backoff.reset();
                        self.succeeded();
                        if with_summary {
                            next_summary = now + summary_every;
                        }
                    }
                    Err(e) => {
                        // Drop the connection: the next round reconnects after the backoff.
                        con = None;
                        retry_at = Instant::now() + backoff.next_delay();
                        self.failed(&e);
                    }
                }
            };
            tokio::select! {
                biased;
                _ = stop.wait_for(|stopped| *stopped) => break,
                () = round => {}
            }
        }
        self.leave(con).await;
    }

    fn failed(&mut self, e: &str) {
        let e = self.target.scrub(e);
        match self.log.failure(Instant::now()) {
            LogDecision::Warn { suppressed } => tracing::warn!(
                redis = %self.target.shown_url(),
                replica = %self.replica,
                error = %e,
                failures_not_logged = suppressed,
                "publishing to Redis failed; serving continues, retrying"
            ),
            _ => tracing::debug!(
                redis = %self.target.shown_url(),
                replica = %self.replica,
                error = %e,
                "publishing to Redis failed again"
            ),
        }
    }

    fn succeeded(&mut self) {
        if let LogDecision::Recovered { failures } = self.log.success() {
            tracing::info!(
                redis = %self.target.shown_url(),
                failures,
                "publishing to Redis works again"
            );
        }
    }

    /// Writes the registration and the load report, and the summary when `with_summary`,
    /// each followed by its announcement.
    async fn publish(
        &mut self,
        con: &mut MultiplexedConnection,
        report: &CacheReport,
        with_summary: bool,
    ) -> Result<(), String> {
        let ttl = LIVENESS_TTL_MS;
        let channel = self.keys.channel();
        let info = self.keys.info(&self.replica);
        // The registration rides along with every load report, so that it expires only with
        // the replica; `EXISTS` first tells whether Redis had lost it (expired, or restarted
        // empty), which is when routers need the `register` announcement.
        let mut p = redis::pipe();
        p.cmd("EXISTS").arg(&info);
        p.cmd("SET")
            .arg(&info)
            .arg(&self.registration)
            .arg("PX")
            .arg(ttl)
            .ignore();
        p.cmd("SADD")
            .arg(self.keys.replicas())
            .arg(&self.replica.0)
            .ignore();
        let (existed,): (bool,) = run_pipe(&p, con, "writing the registration").await?;

        let at_ms = now_ms();
        let mut p = redis::pipe();
        if !existed || !self.announced {
            p.cmd("PUBLISH")
                .arg(&channel)
                .arg(Announcement::Registered(self.replica.clone()).to_string())
                .ignore();
        }
        self.load_seq += 1;
        let load = load_record(self.load_seq, at_ms, report);
        p.cmd("SET")
            .arg(self.keys.load(&self.replica))
            .arg(load.encode())
            .arg("PX")
            .arg(ttl)
            .ignore();
        p.cmd("PUBLISH")
            .arg(&channel)
            .arg(Announcement::Load(self.replica.clone(), load.seq).to_string())
            .ignore();
        if with_summary {
            self.summary_seq += 1;
            let summary = summary_record(
                self.summary_seq,
                at_ms,
                self.block_size,
                &report.hottest,
                self.summary_entries,
            );
            p.cmd("SET")
                .arg(self.keys.summary(&self.replica))
                .arg(summary.encode())
                .arg("PX")
                .arg(ttl)
                .ignore();
            p.cmd("PUBLISH")
                .arg(&channel)
                .arg(Announcement::Summary(self.replica.clone(), summary.seq).to_string())
                .ignore();
        }
        run_pipe::<()>(&p, con, "writing the load report and summary").await?;
        self.announced = true;
        Ok(())
    }

    /// Deletes this replica's keys, leaves the replica set and announces `leave`, within
    /// [`LEAVE_TIMEOUT`], connecting first if needed. Best effort: if it fails, the keys
    /// expire within [`LIVENESS_TTL_MS`] anyway.
    async fn leave(&mut self, con: Option<MultiplexedConnection>) {
        let goodbye = async {
            let mut con = match con {
                Some(c) => c,
                None => self.target.connect().await?,
            };
            let mut p = redis::pipe();
            p.cmd("DEL")
                .arg(self.keys.info(&self.replica))
                .arg(self.keys.load(&self.replica))
                .arg(self.keys.summary(&self.replica))
                .ignore();
            p.cmd("SREM")
                .arg(self.keys.replicas())
                .arg(&self.replica.0)
                .ignore();
            p.cmd("PUBLISH")
                .arg(self.keys.channel())
                .arg(Announcement::Left(self.replica.clone()).to_string())
                .ignore();
            run_pipe::<()>(&p, &mut con, "leaving").await
        };
        let outcome = match tokio::time::timeout(LEAVE_TIMEOUT, goodbye).await {
            Ok(r) => r,
            Err(_) => Err(format!("leaving: not done within {LEAVE_TIMEOUT:?}")),
        };
        match outcome {
            Ok(()) => tracing::info!(
                redis = %self.target.shown_url(),
                replica = %self.replica,
                "left Redis: keys deleted, leave announced"
            ),
            Err(e) => tracing::warn!(
                redis = %self.target.shown_url(),
                replica = %self.replica,
                error = %self.target.scrub(&e),
                "could not leave Redis cleanly; the keys expire on their own"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use hotprefix_cache::{CacheStats, Usage};
    use hotprefix_protocol::{BlockHash, Tier};

    use super::*;

    fn entry(hotness: f64, depth: u64) -> hotprefix_cache::SummaryEntry {
        hotprefix_cache::SummaryEntry {
            hash: BlockHash(depth.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            tier: if depth.is_multiple_of(2) {
                Tier::Host
            } else {
                Tier::Device
            },
            hotness,
            depth,
        }
    }

    #[test]
    fn entries_convert_with_saturation_and_stay_decodable() {
        let e = protocol_entry(&entry(3.5, 7));
        assert_eq!((e.hotness, e.depth, e.tier), (3.5, 7, Tier::Device));
        assert_eq!(e.hash, entry(3.5, 7).hash);
        assert_eq!(protocol_entry(&entry(1e300, 1)).hotness, f32::MAX);
        assert_eq!(protocol_entry(&entry(f64::INFINITY, 1)).hotness, f32::MAX);
        assert_eq!(protocol_entry(&entry(f64::NAN, 1)).hotness, 0.0);
        assert_eq!(protocol_entry(&entry(-1.0, 1)).hotness, 0.0);
        assert_eq!(protocol_entry(&entry(1.0, u64::MAX)).depth, u32::MAX);
        assert_eq!(
            protocol_entry(&entry(1.0, u64::from(u32::MAX))).depth,
            u32::MAX
        );
        // Whatever the cache says, the encoded summary decodes.
        let hottest: Vec<_> = [f64::NAN, f64::INFINITY, 1e300, -0.0, 2.0]
            .iter()
            .enumerate()
            .map(|(i, &h)| entry(h, u64::MAX - i as u64))
            .collect();
        let s = summary_record(9, 1234, 16, &hottest, 100);
        let back = HotnessSummary::decode(&s.encode()).unwrap();
        assert_eq!(back, s);
        assert_eq!((back.seq, back.at_ms, back.block_size), (9, 1234, 16));
        assert_eq!(back.entries.len(), 5);
    }

    #[test]
    fn summaries_keep_the_hottest_entries_up_to_the_limits() {
        let hottest: Vec<_> = (1..=10).map(|d| entry(10.0 - d as f64, d)).collect();
        let s = summary_record(1, 0, 32, &hottest, 4);
        let depths: Vec<u32> = s.entries.iter().map(|e| e.depth).collect();
        assert_eq!(
            depths,
            [1, 2, 3, 4],
            "the first (hottest) entries, in order"
        );
        assert_eq!(summary_record(1, 0, 32, &hottest, 0).entries.len(), 0);
        let many: Vec<_> = (0..MAX_SUMMARY_ENTRIES as u64 + 10)
            .map(|d| entry(1.0, d))
            .collect();
        let s = summary_record(1, 0, 32, &many, usize::MAX);
        assert_eq!(s.entries.len(), MAX_SUMMARY_ENTRIES);
        assert!(HotnessSummary::decode(&s.encode()).is_ok());
    }

    #[test]
    fn load_reports_count_used_blocks_and_saturate() {
        let report = CacheReport {
            block_size: 16,
            policy: "hotprefix".into(),
            usage: Usage {
                device_capacity: 100,
                device_free: 40,
                device_cached: 50,
                device_outstanding: 10,
                host_capacity: 400,
                host_free: 390,
                host_held: 0,
                nodes: 60,
            },
            stats: CacheStats::default(),
            hottest: Vec::new(),
            locked_blocks: None,
            in_transfer_blocks: None,
            waiting: usize::MAX,
            running: 3,
            pending_prefill_tokens: 1234,
        };
        let l = load_record(5, 77, &report);
        assert_eq!(l.schema, SCHEMA_VERSION);
        assert_eq!((l.seq, l.at_ms), (5, 77));
        assert_eq!((l.waiting, l.running), (u32::MAX, 3));
        assert_eq!(l.pending_prefill_tokens, 1234);
        assert_eq!((l.device_blocks_used, l.device_blocks_total), (60, 100));
        assert_eq!((l.host_blocks_used, l.host_blocks_total), (10, 400));
        assert_eq!(LoadReport::decode(&l.encode()).unwrap(), l);
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_bounded_jitter_and_resets() {
        let mut b = Backoff::new(42);
        let mut base = BACKOFF_MIN;
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d >= base.mul_f64(0.8) && d <= base.mul_f64(1.2),
                "{d:?} vs {base:?}"
            );
            base = (base * 2).min(BACKOFF_MAX);
        }
        assert!(b.next_delay() <= BACKOFF_MAX.mul_f64(1.2));
        b.reset();
        assert!(b.next_delay() <= BACKOFF_MIN.mul_f64(1.2));
        // Different seeds give different jitter (engines do not reconnect in lockstep).
        let (mut x, mut y) = (Backoff::new(1), Backoff::new(2));
        assert_ne!(x.next_delay(), y.next_delay());
    }

    #[test]
    fn failures_are_logged_once_per_period_and_recovery_once() {
        let mut log = FailureLog::default();
        let t0 = Instant::now();
        assert_eq!(log.success(), LogDecision::Fine);
        assert_eq!(log.failure(t0), LogDecision::Warn { suppressed: 0 });
        for i in 1..10 {
            assert_eq!(log.failure(t0 + Duration::from_secs(i)), LogDecision::Quiet);
        }
        assert_eq!(
            log.failure(t0 + LOG_EVERY + Duration::from_secs(1)),
            LogDecision::Warn { suppressed: 9 }
        );
        assert_eq!(log.success(), LogDecision::Recovered { failures: 11 });
        assert_eq!(log.success(), LogDecision::Fine);
        // A new run of failures warns at once again.
        assert_eq!(
            log.failure(t0 + LOG_EVERY + Duration::from_secs(2)),
            LogDecision::Warn { suppressed: 0 }
        );
    }

    #[test]
    fn secrets_never_show_in_debug_display_or_errors() {
        let url = RedisUrl::new("redis://admin:hunter2@redis:6379/0");
        assert!(!format!("{url:?} {url}").contains("hunter2"));
        let pasted = RedisUrl::new("hunter2");
        assert_eq!(pasted.to_string(), "<not a URL>");
        assert!(format!("{url}").contains("redis:6379"));
        let pw = Secret::new("hunter3");
        assert_eq!(format!("{pw:?}"), "\"***\"");
        let cfg = PublishConfig {
            url: url.clone(),
            password: Some(pw.clone()),
            ca_file: None,
            keys: Keys::new("svc").unwrap(),
            replica: ReplicaId::parse("r0").unwrap(),
            advertise_url: None,
            summary_entries: 10,
        };
        let dump = format!("{cfg:?}");
        assert!(
            !dump.contains("hunter2") && !dump.contains("hunter3"),
            "{dump}"
        );
        let t = RedisTarget::new(&url, Some(&pw), None).unwrap();
        assert!(!format!("{t:?}").contains("hunter"));
        assert_eq!(
            t.scrub("WRONGPASS hunter2 or hunter3"),
            "WRONGPASS *** or ***"
        );
        // Bad URLs are refused without echoing their password.
        for bad in [
            "http://u:hunter2@h",
            "redis://u:hunter2@h:notaport",
            "redis://u:hunter2@h/notadb",
            "hunter2",
        ] {
            let e = RedisTarget::new(&RedisUrl::new(bad), None, None).unwrap_err();
            assert!(!e.to_string().contains("hunter2"), "{e}");
            assert!(e.to_string().contains("--redis-url"), "{e}");
        }
        // A CA file needs TLS, and must hold a certificate.
        let e = RedisTarget::new(
            &RedisUrl::new("redis://h"),
            None,
            Some(std::path::Path::new("/nonexistent")),
        )
        .unwrap_err();
        assert!(e.to_string().contains("rediss://"), "{e}");
        let e = RedisTarget::new(
            &RedisUrl::new("rediss://h"),
            None,
            Some(std::path::Path::new("/nonexistent/ca.pem")),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--redis-ca-file"), "{e}");
    }

    #[test]
    fn advertised_urls_default_to_a_reachable_address() {
        let at = |s: &str| default_advertise_url(s.parse().unwrap());
        assert_eq!(at("0.0.0.0:8000"), "http://127.0.0.1:8000");
        assert_eq!(at("10.1.2.3:80"), "http://10.1.2.3:80");
        assert_eq!(at("[::]:8000"), "http://[::1]:8000");
    }
}

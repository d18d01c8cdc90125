//! HTTP load generator behind `hotprefix-bench load`: turns a shared-prefix workload (generated
//! or mapped from a Mooncake trace) into token-id prompts, replays it against an
//! OpenAI-compatible `/v1/completions` server with streaming, and reports what clients see.
//!
//! # Workloads
//!
//! Prompts are lists of token ids, so no tokenizer is needed and the server caches exactly the
//! prefixes the workload shares. Every id is a pure function of the seed and of *what the
//! token stands for* (a group's prefix position, a trace hash block's position, a request's own
//! suffix position), hashed with SplitMix64 into [`TOKEN_ID_MIN`]..[`TOKEN_ID_MAX`], a range
//! that avoids the special tokens at the bottom of common vocabularies. Two requests therefore
//! share a token-id prefix exactly when they share a prefix in the workload, whatever the
//! order or timing in which they are generated.
//!
//! * [`SharedPrefixLoad`]: `groups` prefixes of `prefix_tokens` tokens; each request picks a
//!   group by Zipf rank or from a hot set, and appends `suffix_tokens` tokens of its own.
//! * [`TraceLoad`]: each 512-token `hash_id` block of a Mooncake trace becomes
//!   `tokens_per_block` tokens (a scale-down, so that the trace's sharing structure fits a
//!   small model on a CPU), prompts are capped at `max_input_tokens` and outputs at
//!   `max_output_tokens`.
//!
//! # Arrivals
//!
//! [`Arrival::Poisson`] is open-loop: requests are sent at exponential gaps drawn from the seed,
//! whether or not earlier ones have finished. [`Arrival::Closed`] keeps `concurrency` requests
//! in flight, each client sending its next request when the previous one ends.
//! [`Arrival::Trace`] replays the trace's own timestamps divided by a time scale.
//!
//! # Client
//!
//! The client is a deliberately small HTTP/1.1 implementation over [`TcpStream`]: one
//! connection per request with `Connection: close`, a `Content-Length` body, and a response
//! body read as chunked, fixed-length or until close. The body is decoded as server-sent
//! events as it arrives, so the time of the first `data:` event that carries text is the
//! time to first token the client really experiences. Every failure (connection refused, a
//! non-200 status, an `error` event, malformed event data, a stream that ends without
//! `data: [DONE]` or without the usage chunk, a timeout) is recorded on the request as a
//! failure; nothing in this module panics on what a server sends.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::trace::Trace;

/// Smallest token id a generated prompt uses.
pub const TOKEN_ID_MIN: u32 = 1000;
/// One past the largest token id a generated prompt uses.
pub const TOKEN_ID_MAX: u32 = 30_000;

/// Longest status or header line (and chunk-size line) accepted from a server. A server that
/// sends more is broken, and reading on would only grow memory.
const MAX_LINE_BYTES: u64 = 64 * 1024;
/// Largest single chunk of a chunked body accepted; SSE events are a few hundred bytes.
const MAX_CHUNK_BYTES: usize = 16 * 1024 * 1024;
/// Most bytes of an error response body kept for the failure message.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
/// Most characters of a server's error text kept in a record, so that one noisy server does
/// not bloat the JSON report.
const MAX_ERROR_CHARS: usize = 300;

/// Why a workload, an option or a report could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A parameter is zero, negative, NaN or otherwise out of its range.
    #[error("{field} must be {expected}, got {value}")]
    InvalidParameter {
        /// The parameter's name.
        field: &'static str,
        /// The allowed range, in words.
        expected: &'static str,
        /// The value given.
        value: String,
    },
    /// The workload has no request to send.
    #[error("the workload has no requests")]
    Empty,
    /// The server URL is not `http://host:port[/]` or `host:port`.
    #[error("cannot use URL {0:?}: expected http://HOST:PORT")]
    BadUrl(String),
    /// A comparison names a baseline label that no report has.
    #[error("baseline label {0:?} is not among the compared runs")]
    UnknownBaseline(String),
    /// A non-streaming request to the server (model list, readiness, metrics) failed.
    #[error("{0}")]
    Http(String),
}

fn invalid(field: &'static str, expected: &'static str, value: impl ToString) -> LoadError {
    LoadError::InvalidParameter {
        field,
        expected,
        value: value.to_string(),
    }
}

/// One request of a load run: the prompt as token ids and how many tokens to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadRequest {
    /// Seconds after the start of the run at which an open-loop run sends it.
    pub arrival_s: f64,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Tokens to generate (`max_tokens`; with `ignore_eos` exactly this many).
    pub max_tokens: u32,
    /// The shared prefix this request belongs to: the group index of a generated workload,
    /// the first hash id of a trace request.
    pub group: Option<u64>,
}

/// SplitMix64's finaliser: a cheap, well-mixed, version-independent hash, so that token ids
/// do not change when the `rand` crate changes its generators.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a token stands for; part of its hash, so that different roles never collide by
/// construction of their inputs.
#[derive(Clone, Copy)]
#[repr(u64)]
enum Role {
    GroupPrefix = 1,
    Suffix = 2,
    TraceBlock = 3,
    TraceTail = 4,
    Warmup = 5,
}

/// The token id at position `pos` of the thing `key` of kind `role`.
fn token_id(seed: u64, role: Role, key: u64, pos: u64) -> u32 {
    let h = splitmix64(splitmix64(splitmix64(seed ^ splitmix64(role as u64)) ^ key) ^ pos);
    let span = u64::from(TOKEN_ID_MAX - TOKEN_ID_MIN);
    // The remainder is below `span`, which fits in u32.
    TOKEN_ID_MIN + u32::try_from(h % span).unwrap_or(0)
}

/// How requests spread over the prefix groups of a [`SharedPrefixLoad`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Popularity {
    /// Group `r` has weight `1 / (r + 1)^s`; `s = 0` is uniform, larger is more skewed.
    Zipf(f64),
    /// The first `ceil(groups_fraction * groups)` groups (at least one) receive
    /// `traffic_fraction` of the requests, uniformly; the others share the rest uniformly.
    HotSet {
        /// Fraction of groups that are hot, in (0, 1].
        groups_fraction: f64,
        /// Fraction of requests that go to the hot groups, in [0, 1].
        traffic_fraction: f64,
    },
}

/// A generated shared-prefix workload: `groups` prefixes, each request one prefix plus its own
/// suffix.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedPrefixLoad {
    /// Number of distinct prefixes.
    pub groups: u32,
    /// Length of every prefix in tokens.
    pub prefix_tokens: u32,
    /// Length of every request's unique suffix in tokens.
    pub suffix_tokens: u32,
    /// Number of requests.
    pub requests: u32,
    /// How requests pick their group.
    pub popularity: Popularity,
    /// Tokens each request generates.
    pub output_tokens: u32,
    /// Seed of the token ids and the group choices.
    pub seed: u64,
}

impl Default for SharedPrefixLoad {
    fn default() -> Self {
        SharedPrefixLoad {
            groups: 8,
            prefix_tokens: 256,
            suffix_tokens: 32,
            requests: 64,
            popularity: Popularity::Zipf(1.0),
            output_tokens: 16,
            seed: 0,
        }
    }
}

impl SharedPrefixLoad {
    /// The requests, all with `arrival_s = 0` (see [`schedule`]).
    pub fn generate(&self) -> Result<Vec<LoadRequest>, LoadError> {
        self.validate()?;
        let mut rng = SmallRng::seed_from_u64(self.seed);
        let prefixes: Vec<Vec<u32>> = (0..self.groups)
            .map(|g| {
                (0..self.prefix_tokens)
                    .map(|i| token_id(self.seed, Role::GroupPrefix, u64::from(g), u64::from(i)))
                    .collect()
            })
            .collect();
        let pick = GroupPicker::new(self.groups, self.popularity);
        let mut out = Vec::with_capacity(self.requests as usize);
        for r in 0..self.requests {
            let g = pick.sample(&mut rng);
            let mut prompt = Vec::with_capacity((self.prefix_tokens + self.suffix_tokens) as usize);
            prompt.extend_from_slice(&prefixes[g as usize]);
            prompt.extend(
                (0..self.suffix_tokens)
                    .map(|i| token_id(self.seed, Role::Suffix, u64::from(r), u64::from(i))),
            );
            out.push(LoadRequest {
                arrival_s: 0.0,
                prompt,
                max_tokens: self.output_tokens,
                group: Some(u64::from(g)),
            });
        }
        Ok(out)
    }

    fn validate(&self) -> Result<(), LoadError> {
        if self.groups == 0 {
            return Err(invalid("--groups", "at least 1", self.groups));
        }
        if self.requests == 0 {
            return Err(invalid("--requests", "at least 1", self.requests));
        }
        if self.output_tokens == 0 {
            return Err(invalid("--output-tokens", "at least 1", self.output_tokens));
        }
        if u64::from(self.prefix_tokens) + u64::from(self.suffix_tokens) == 0 {
            return Err(invalid(
                "--prefix-tokens + --suffix-tokens",
                "at least 1",
                0,
            ));
        }
        match self.popularity {
            Popularity::Zipf(s) if !(s.is_finite() && s >= 0.0) => {
                Err(invalid("--zipf", "finite and >= 0", s))
            }
            Popularity::HotSet {
                groups_fraction,
                traffic_fraction,
            } => {
                if !(groups_fraction > 0.0 && groups_fraction <= 1.0) {
                    return Err(invalid(
                        "--hot-set groups fraction",
                        "in (0, 1]",
                        groups_fraction,
                    ));
                }
                if !(0.0..=1.0).contains(&traffic_fraction) {
                    return Err(invalid(
                        "--hot-set traffic fraction",
                        "in [0, 1]",
                        traffic_fraction,
                    ));
                }
                Ok(())
            }
            Popularity::Zipf(_) => Ok(()),
        }
    }

    /// One line describing the workload, for report headers.
    pub fn describe(&self) -> String {
        let pop = match self.popularity {
            Popularity::Zipf(s) => format!("zipf {s}"),
            Popularity::HotSet {
                groups_fraction,
                traffic_fraction,
            } => format!("hot set {groups_fraction} of groups gets {traffic_fraction} of traffic"),
        };
        format!(
            "shared-prefix: {} requests over {} groups ({pop}), prefix {} + suffix {} tokens, \
             {} output tokens, seed {}",
            self.requests,
            self.groups,
            self.prefix_tokens,
            self.suffix_tokens,
            self.output_tokens,
            self.seed
        )
    }
}

/// Samples group indices for a [`Popularity`].
struct GroupPicker {
    /// Cumulative weights for Zipf, normalised to end at 1.
    cumulative: Vec<f64>,
    hot: Option<(u32, u32, f64)>,
}

impl GroupPicker {
    fn new(groups: u32, popularity: Popularity) -> Self {
        match popularity {
            Popularity::Zipf(s) => {
                let mut acc = 0.0;
                let mut cumulative: Vec<f64> = (0..groups)
                    .map(|r| {
                        acc += 1.0 / f64::from(r + 1).powf(s);
                        acc
                    })
                    .collect();
                for c in &mut cumulative {
                    *c /= acc;
                }
                GroupPicker {
                    cumulative,
                    hot: None,
                }
            }
            Popularity::HotSet {
                groups_fraction,
                traffic_fraction,
            } => {
                let hot = ((groups_fraction * f64::from(groups)).ceil() as u32).clamp(1, groups);
                GroupPicker {
                    cumulative: Vec::new(),
                    hot: Some((hot, groups, traffic_fraction)),
                }
            }
        }
    }

    fn sample(&self, rng: &mut SmallRng) -> u32 {
        let u: f64 = rng.random();
        if let Some((hot, groups, traffic)) = self.hot {
            let v: f64 = rng.random();
            let cold = groups - hot;
            return if u < traffic || cold == 0 {
                ((v * f64::from(hot)) as u32).min(hot - 1)
            } else {
                hot + ((v * f64::from(cold)) as u32).min(cold - 1)
            };
        }
        let i = self.cumulative.partition_point(|&c| c < u);
        u32::try_from(i.min(self.cumulative.len().saturating_sub(1))).unwrap_or(0)
    }
}

/// Maps a Mooncake trace to token-id requests (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct TraceLoad {
    /// Tokens each 512-token hash block becomes.
    pub tokens_per_block: u32,
    /// Longest prompt sent, in tokens (after scaling).
    pub max_input_tokens: u32,
    /// Most tokens generated per request.
    pub max_output_tokens: u32,
    /// Use only the first this many requests of the trace.
    pub max_requests: Option<u32>,
    /// Seed of the token ids.
    pub seed: u64,
}

impl Default for TraceLoad {
    fn default() -> Self {
        TraceLoad {
            tokens_per_block: 16,
            max_input_tokens: 2048,
            max_output_tokens: 32,
            max_requests: None,
            seed: 0,
        }
    }
}

impl TraceLoad {
    /// The trace's requests as token ids, with the trace's arrival times.
    pub fn requests(&self, trace: &Trace) -> Result<Vec<LoadRequest>, LoadError> {
        if self.tokens_per_block == 0 {
            return Err(invalid("--tokens-per-hash-block", "at least 1", 0));
        }
        if self.max_input_tokens == 0 {
            return Err(invalid("--max-input-tokens", "at least 1", 0));
        }
        if self.max_output_tokens == 0 {
            return Err(invalid("--max-output-tokens", "at least 1", 0));
        }
        let take = self
            .max_requests
            .map_or(trace.requests.len(), |n| n as usize);
        let block = u64::from(trace.block_tokens.max(1));
        let tpb = u64::from(self.tokens_per_block);
        let out: Vec<LoadRequest> = trace
            .requests
            .iter()
            .take(take)
            .enumerate()
            .map(|(i, r)| {
                let scaled = (u64::from(r.input_tokens) * tpb).div_ceil(block).max(1);
                let len = scaled.min(u64::from(self.max_input_tokens));
                let prompt = (0..len)
                    .map(|pos| match r.blocks.get((pos / tpb) as usize) {
                        Some(&h) => token_id(self.seed, Role::TraceBlock, h, pos % tpb),
                        // Tokens past the listed blocks have no shared identity: they are this
                        // request's own.
                        None => token_id(self.seed, Role::TraceTail, i as u64, pos),
                    })
                    .collect();
                LoadRequest {
                    arrival_s: r.arrival_s,
                    prompt,
                    max_tokens: r.output_tokens.clamp(1, self.max_output_tokens),
                    group: r.blocks.first().copied(),
                }
            })
            .collect();
        if out.is_empty() {
            return Err(LoadError::Empty);
        }
        Ok(out)
    }

    /// One line describing the mapping, for report headers.
    pub fn describe(&self, trace: &Trace, requests: usize) -> String {
        format!(
            "trace {}: {requests} requests, {} tokens per hash block, prompts capped at {}, \
             outputs capped at {}, seed {}",
            trace.name,
            self.tokens_per_block,
            self.max_input_tokens,
            self.max_output_tokens,
            self.seed
        )
    }
}

/// `n` warm-up requests of `prompt_tokens` tokens each, sharing no token prefix with each
/// other or with any workload (their ids come from a role of their own), so that sending them
/// before a run warms the server (weights paged in, thread pools and buffers up) without
/// warming its prefix cache for the workload.
pub fn warmup_requests(
    n: usize,
    prompt_tokens: usize,
    max_tokens: u32,
    seed: u64,
) -> Vec<LoadRequest> {
    (0..n)
        .map(|i| LoadRequest {
            arrival_s: 0.0,
            prompt: (0..prompt_tokens.max(1))
                .map(|pos| token_id(seed, Role::Warmup, i as u64, pos as u64))
                .collect(),
            max_tokens: max_tokens.max(1),
            group: None,
        })
        .collect()
}

/// When requests are sent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arrival {
    /// Open loop: Poisson arrivals at `rate` requests per second, the first at 0 s.
    Poisson {
        /// Mean requests per second.
        rate: f64,
    },
    /// Closed loop: `concurrency` clients, each sending its next request when the last ends.
    Closed {
        /// Requests in flight.
        concurrency: usize,
    },
    /// Open loop at the requests' own `arrival_s`, divided by `time_scale`.
    Trace {
        /// 2 replays twice as fast.
        time_scale: f64,
    },
}

impl Arrival {
    /// One line describing the arrivals, for report headers.
    pub fn describe(&self) -> String {
        match self {
            Arrival::Poisson { rate } => format!("open loop, Poisson {rate} req/s"),
            Arrival::Closed { concurrency } => format!("closed loop, concurrency {concurrency}"),
            Arrival::Trace { time_scale } => format!("trace timestamps x{time_scale}"),
        }
    }
}

/// Sets every request's `arrival_s` for `arrival`: Poisson gaps drawn from `seed` (in request
/// order, so the same seed gives the same times), or trace times divided by the time scale.
/// Closed-loop runs ignore arrival times, and they are left as they are.
pub fn schedule(
    requests: &mut [LoadRequest],
    arrival: Arrival,
    seed: u64,
) -> Result<(), LoadError> {
    match arrival {
        Arrival::Poisson { rate } => {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(invalid("--rate", "a positive number", rate));
            }
            // A stream separate from the group choices, so that changing the rate does not
            // change which requests are generated.
            let mut rng = SmallRng::seed_from_u64(splitmix64(seed ^ 0xA11_1BA1));
            let mut t = 0.0;
            for (i, r) in requests.iter_mut().enumerate() {
                if i > 0 {
                    let u: f64 = rng.random();
                    t += -(1.0 - u).ln() / rate;
                }
                r.arrival_s = t;
            }
        }
        Arrival::Closed { concurrency } => {
            if concurrency == 0 {
                return Err(invalid("--concurrency", "at least 1", 0));
            }
        }
        Arrival::Trace { time_scale } => {
            if !(time_scale.is_finite() && time_scale > 0.0) {
                return Err(invalid("--time-scale", "a positive number", time_scale));
            }
            for r in requests.iter_mut() {
                r.arrival_s /= time_scale;
            }
        }
    }
    Ok(())
}

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Target {
    /// Parses `http://host:port`, `http://host:port/` or `host:port` (port 80 when absent).
    pub fn parse(url: &str) -> Result<Target, LoadError> {
        let bad = || LoadError::BadUrl(url.to_string());
        if url.starts_with("https://") {
            return Err(bad());
        }
        let rest = url.strip_prefix("http://").unwrap_or(url);
        let authority = rest.split('/').next().unwrap_or("");
        if authority.is_empty() {
            return Err(bad());
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() => (h, p.parse::<u16>().map_err(|_| bad())?),
            Some(_) => return Err(bad()),
            None => (authority, 80),
        };
        Ok(Target {
            host: host.to_string(),
            port,
        })
    }

    fn host_header(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// What every completion request carries besides its prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientOptions {
    /// The served model id.
    pub model: String,
    /// Sampling temperature (0 is greedy).
    pub temperature: f32,
    /// Ask the server to ignore end-of-sequence, so that outputs have exactly `max_tokens`.
    pub ignore_eos: bool,
    /// Longest a request may take from connecting to `[DONE]`.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            model: String::new(),
            temperature: 0.0,
            ignore_eos: true,
            timeout: Duration::from_secs(300),
        }
    }
}

/// What one request saw. Times are seconds; `send_s` and `end_s` count from the start of the
/// run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Position of the request in the workload.
    pub index: usize,
    /// The request's prefix group, if known.
    pub group: Option<u64>,
    /// When the request was sent (connection opened).
    pub send_s: f64,
    /// Time from sending to the first event with text, if one came.
    pub ttft_s: Option<f64>,
    /// When the request ended (last byte read, or the failure).
    pub end_s: f64,
    /// Prompt tokens sent.
    pub sent_tokens: u64,
    /// `max_tokens` asked for.
    pub max_tokens: u64,
    /// `usage.prompt_tokens` (0 when no usage came).
    pub prompt_tokens: u64,
    /// `usage.completion_tokens`.
    pub completion_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: u64,
    /// HTTP status; 0 when no status line was read.
    pub status: u16,
    /// Whether the request completed: status 200, a usage chunk, `[DONE]`, no error.
    pub ok: bool,
    /// What went wrong, for a failed request.
    pub error: Option<String>,
    /// Sum of the gaps between consecutive text events.
    pub itl_sum_s: f64,
    /// Number of such gaps.
    pub itl_count: u64,
}

impl RequestRecord {
    /// Time from sending to the end.
    pub fn e2e_s(&self) -> f64 {
        self.end_s - self.send_s
    }
}

/// Incremental server-sent-events decoder: bytes in, the `data` of each complete event out.
///
/// It follows the SSE rules the client needs: lines end in LF or CRLF (a lone CR, which the
/// standard also allows, is not treated as a line end, since no server of interest emits it);
/// a blank line ends an event; `data:` lines of one event are joined with LF; one space after the colon is
/// dropped; comment lines (starting with `:`, the keep-alives) and other fields are ignored.
#[derive(Debug, Default)]
pub struct SseDecoder {
    line: Vec<u8>,
    data: Option<String>,
}

impl SseDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the data of every event they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            let line = String::from_utf8_lossy(&self.line).into_owned();
            self.line.clear();
            if line.is_empty() {
                if let Some(d) = self.data.take() {
                    events.push(d);
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_str(), ""),
            };
            if field == "data" {
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => self.data = Some(value.to_string()),
                }
            }
        }
        events
    }
}

/// A failure with the status it came with (0 before a status line).
struct Failure {
    status: u16,
    message: String,
}

impl Failure {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
        }
    }
}

/// What the events of one stream have told so far; kept outside the exchange so that a
/// failure late in the stream still reports what came before.
#[derive(Default)]
struct Progress {
    first_text: Option<Instant>,
    last_text: Option<Instant>,
    itl_sum_s: f64,
    itl_count: u64,
    usage: Option<(u64, u64, u64)>,
    done: bool,
}

impl Progress {
    /// Handles one event's data; an error makes the request fail.
    fn on_event(&mut self, data: &str, now: Instant) -> Result<(), String> {
        if data.trim() == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let v: serde_json::Value = serde_json::from_str(data)
            .map_err(|e| format!("malformed SSE data ({e}): {}", clip(data)))?;
        if let Some(err) = v.get("error") {
            let msg = err
                .get("message")
                .and_then(|m| m.as_str())
                .map_or_else(|| err.to_string(), str::to_string);
            return Err(format!("error event: {}", clip(&msg)));
        }
        if !v.is_object() {
            return Err(format!("SSE data is not a JSON object: {}", clip(data)));
        }
        let has_text = v
            .get("choices")
            .and_then(|c| c.as_array())
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    let text = c
                        .get("text")
                        .or_else(|| c.get("delta").and_then(|d| d.get("content")));
                    text.and_then(|t| t.as_str()).is_some_and(|t| !t.is_empty())
                })
            });
        if has_text {
            if let Some(last) = self.last_text {
                self.itl_sum_s += now.duration_since(last).as_secs_f64();
                self.itl_count += 1;
            } else {
                self.first_text = Some(now);
            }
            self.last_text = Some(now);
        }
        match v.get("usage") {
            None | Some(serde_json::Value::Null) => {}
            Some(u) => {
                let field = |k: &str| u.get(k).and_then(|x| x.as_u64());
                let (Some(prompt), Some(completion)) =
                    (field("prompt_tokens"), field("completion_tokens"))
                else {
                    return Err(format!("usage chunk without token counts: {}", clip(data)));
                };
                let cached = u
                    .get("prompt_tokens_details")
                    .and_then(|d| d.get("cached_tokens"))
                    .and_then(|x| x.as_u64())
                    .unwrap_or(0);
                self.usage = Some((prompt, completion, cached));
            }
        }
        Ok(())
    }
}

fn clip(s: &str) -> String {
    if s.chars().count() <= MAX_ERROR_CHARS {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(MAX_ERROR_CHARS).collect();
        t.push_str("...");
        t
    }
}

/// How the response body is delimited.
enum BodyKind {
    Chunked,
    Length(u64),
    UntilClose,
}

/// Reads a response body piece by piece as it arrives.
struct Body<R> {
    reader: R,
    kind: BodyKind,
    finished: bool,
}

async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<String>, String> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(MAX_LINE_BYTES)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| format!("read error: {e}"))?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        if n as u64 >= MAX_LINE_BYTES {
            return Err(format!("line longer than {MAX_LINE_BYTES} bytes"));
        }
        return Err("connection closed mid-line".into());
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

impl<R: AsyncBufRead + Unpin> Body<R> {
    /// The next piece of body bytes; `None` at the end of the body.
    async fn next(&mut self) -> Result<Option<Vec<u8>>, String> {
        if self.finished {
            return Ok(None);
        }
        match &mut self.kind {
            BodyKind::Chunked => {
                let Some(line) = read_line(&mut self.reader).await? else {
                    return Err("connection closed before the last chunk".into());
                };
                let hex = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(hex, 16)
                    .map_err(|_| format!("bad chunk size line {:?}", clip(&line)))?;
                if size == 0 {
                    // Trailers, if any, end at a blank line; a server that closes instead is
                    // fine, the body is complete.
                    while let Some(l) = read_line(&mut self.reader).await? {
                        if l.is_empty() {
                            break;
                        }
                    }
                    self.finished = true;
                    return Ok(None);
                }
                if size > MAX_CHUNK_BYTES {
                    return Err(format!("chunk of {size} bytes is too large"));
                }
                let mut data = vec![0u8; size];
                self.reader
                    .read_exact(&mut data)
                    .await
                    .map_err(|e| format!("connection closed mid-chunk: {e}"))?;
                let mut crlf = [0u8; 2];
                self.reader
                    .read_exact(&mut crlf)
                    .await
                    .map_err(|e| format!("connection closed after a chunk: {e}"))?;
                if &crlf != b"\r\n" {
                    return Err("chunk not followed by CRLF".into());
                }
                Ok(Some(data))
            }
            BodyKind::Length(left) => {
                if *left == 0 {
                    self.finished = true;
                    return Ok(None);
                }
                let data = read_some(&mut self.reader, (*left).min(16 * 1024) as usize).await?;
                if data.is_empty() {
                    return Err(format!("connection closed with {left} body bytes missing"));
                }
                *left -= data.len() as u64;
                Ok(Some(data))
            }
            BodyKind::UntilClose => {
                let data = read_some(&mut self.reader, 16 * 1024).await?;
                if data.is_empty() {
                    self.finished = true;
                    return Ok(None);
                }
                Ok(Some(data))
            }
        }
    }
}

/// Up to `max` bytes, whatever one read returns; empty at the end of the stream.
async fn read_some<R: AsyncRead + Unpin>(reader: &mut R, max: usize) -> Result<Vec<u8>, String> {
    let mut data = vec![0u8; max];
    let n = reader
        .read(&mut data)
        .await
        .map_err(|e| format!("read error: {e}"))?;
    data.truncate(n);
    Ok(data)
}

/// Status and body reader of a response whose headers have been read.
struct Response<R> {
    status: u16,
    body: Body<R>,
}

/// Sends one HTTP/1.1 request with `Connection: close` and reads the status line and headers.
async fn http_request(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<Response<BufReader<TcpStream>>, Failure> {
    let stream = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| {
            Failure::new(
                0,
                format!("cannot connect to {}: {e}", target.host_header()),
            )
        })?;
    // Small writes and small events: Nagle's delay would only distort the latencies measured.
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream);
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: */*\r\n",
        target.host_header()
    );
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    let mut wire = head.into_bytes();
    if let Some(b) = body {
        wire.extend_from_slice(b);
    }
    reader
        .get_mut()
        .write_all(&wire)
        .await
        .map_err(|e| Failure::new(0, format!("cannot send the request: {e}")))?;
    let status_line = read_line(&mut reader)
        .await
        .map_err(|e| Failure::new(0, e))?
        .ok_or_else(|| Failure::new(0, "connection closed before the status line"))?;
    let mut parts = status_line.split_whitespace();
    let status = match (parts.next(), parts.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(code))) if v.starts_with("HTTP/1.") => code,
        _ => {
            return Err(Failure::new(
                0,
                format!("bad status line {:?}", clip(&status_line)),
            ));
        }
    };
    let mut headers: HashMap<String, String> = HashMap::new();
    loop {
        let line = read_line(&mut reader)
            .await
            .map_err(|e| Failure::new(status, e))?
            .ok_or_else(|| Failure::new(status, "connection closed inside the headers"))?;
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let kind = if chunked {
        BodyKind::Chunked
    } else if let Some(len) = headers.get("content-length") {
        BodyKind::Length(
            len.parse()
                .map_err(|_| Failure::new(status, format!("bad Content-Length {len:?}")))?,
        )
    } else {
        BodyKind::UntilClose
    };
    Ok(Response {
        status,
        body: Body {
            reader,
            kind,
            finished: false,
        },
    })
}

/// Reads a whole (small) body, keeping at most `limit` bytes.
async fn read_body<R: AsyncBufRead + Unpin>(
    body: &mut Body<R>,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(piece) = body.next().await? {
        let room = limit.saturating_sub(out.len());
        out.extend_from_slice(&piece[..piece.len().min(room)]);
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// `GET path`; returns the status and body (at most 16 MiB).
pub async fn http_get(
    target: &Target,
    path: &str,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), LoadError> {
    let fut = async {
        let mut resp = http_request(target, "GET", path, None)
            .await
            .map_err(|f| f.message)?;
        let body = read_body(&mut resp.body, MAX_CHUNK_BYTES).await?;
        Ok::<_, String>((resp.status, body))
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(LoadError::Http(format!("GET {path}: {e}"))),
        Err(_) => Err(LoadError::Http(format!(
            "GET {path}: timed out after {timeout:?}"
        ))),
    }
}

/// The served model id: `data[0].id` of `GET /v1/models`.
pub async fn served_model(target: &Target, timeout: Duration) -> Result<String, LoadError> {
    let (status, body) = http_get(target, "/v1/models", timeout).await?;
    if status != 200 {
        return Err(LoadError::Http(format!("GET /v1/models: status {status}")));
    }
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| LoadError::Http(format!("GET /v1/models: bad JSON: {e}")))?;
    v.pointer("/data/0/id")
        .and_then(|x| x.as_str())
        .map(str::to_string)
        .ok_or_else(|| LoadError::Http("GET /v1/models: no data[0].id".into()))
}

/// Polls `GET /ready` until it answers 200 or `limit` passes.
pub async fn wait_ready(target: &Target, limit: Duration) -> Result<(), LoadError> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok((200, _)) = http_get(target, "/ready", left.max(Duration::from_millis(100))).await
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LoadError::Http(format!(
                "{} was not ready within {limit:?}",
                target.host_header()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prefix-cache hit tokens per tier from the engine's Prometheus `/metrics`
/// (`hotprefix_prefix_cache_hit_tokens_total{tier=...}`), as (device, host).
pub async fn server_hit_tokens(
    target: &Target,
    timeout: Duration,
) -> Result<(f64, f64), LoadError> {
    let (status, body) = http_get(target, "/metrics", timeout).await?;
    if status != 200 {
        return Err(LoadError::Http(format!("GET /metrics: status {status}")));
    }
    Ok(parse_hit_tokens(&String::from_utf8_lossy(&body)))
}

/// Sums `hotprefix_prefix_cache_hit_tokens_total` samples by tier label; (device, host).
pub fn parse_hit_tokens(text: &str) -> (f64, f64) {
    let (mut device, mut host) = (0.0, 0.0);
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("hotprefix_prefix_cache_hit_tokens_total{") else {
            continue;
        };
        let value = rest
            .rsplit_once(' ')
            .and_then(|(_, v)| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if rest.contains("tier=\"device\"") {
            device += value;
        } else if rest.contains("tier=\"host\"") {
            host += value;
        }
    }
    (device, host)
}

/// The JSON body of a streaming completion request for `prompt`.
pub fn completion_body(opts: &ClientOptions, prompt: &[u32], max_tokens: u32) -> String {
    serde_json::json!({
        "model": opts.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": opts.temperature,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": opts.ignore_eos,
    })
    .to_string()
}

/// Streams one completion and reads events until `[DONE]`.
async fn exchange(
    target: &Target,
    body: &[u8],
    progress: &mut Progress,
    status: &mut u16,
) -> Result<(), String> {
    let mut resp = http_request(target, "POST", "/v1/completions", Some(body))
        .await
        .map_err(|f| {
            *status = f.status;
            f.message
        })?;
    *status = resp.status;
    if resp.status != 200 {
        let text = read_body(&mut resp.body, MAX_ERROR_BODY_BYTES)
            .await
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                v.pointer("/error/message")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| text.trim().to_string());
        return Err(format!("HTTP {}: {}", resp.status, clip(&msg)));
    }
    let mut sse = SseDecoder::new();
    while let Some(piece) = resp.body.next().await? {
        let now = Instant::now();
        for data in sse.push(&piece) {
            progress.on_event(&data, now)?;
            if progress.done {
                return Ok(());
            }
        }
    }
    Err("stream ended before data: [DONE]".into())
}

/// Sends one request and records what happened; `start` is the start of the run.
pub async fn send_request(
    target: &Target,
    opts: &ClientOptions,
    index: usize,
    req: &LoadRequest,
    start: Instant,
) -> RequestRecord {
    let body = completion_body(opts, &req.prompt, req.max_tokens);
    let sent = Instant::now();
    let mut progress = Progress::default();
    let mut status = 0u16;
    let result = match tokio::time::timeout(
        opts.timeout,
        exchange(target, body.as_bytes(), &mut progress, &mut status),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {:?}", opts.timeout)),
    };
    let end = Instant::now();
    let result = result.and_then(|()| progress.usage.ok_or_else(|| "no usage chunk".to_string()));
    let since = |t: Instant| t.duration_since(start).as_secs_f64();
    let (prompt_tokens, completion_tokens, cached_tokens) = progress.usage.unwrap_or_default();
    RequestRecord {
        index,
        group: req.group,
        send_s: since(sent),
        ttft_s: progress
            .first_text
            .map(|t| t.duration_since(sent).as_secs_f64()),
        end_s: since(end),
        sent_tokens: req.prompt.len() as u64,
        max_tokens: u64::from(req.max_tokens),
        prompt_tokens,
        completion_tokens,
        cached_tokens,
        status,
        ok: result.is_ok(),
        error: result.err(),
        itl_sum_s: progress.itl_sum_s,
        itl_count: progress.itl_count,
    }
}

/// How a run is driven.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOptions {
    /// Arrival process.
    pub arrival: Arrival,
    /// Send no request after this long (requests in flight still finish, bounded by the
    /// request timeout).
    pub duration_limit: Option<Duration>,
}

/// Replays `requests` against `target`; returns one record per request sent, in workload
/// order.
pub async fn run(
    target: &Target,
    opts: &ClientOptions,
    requests: Vec<LoadRequest>,
    run_opts: &RunOptions,
) -> Vec<RequestRecord> {
    let target = Arc::new(target.clone());
    let opts = Arc::new(opts.clone());
    let requests = Arc::new(requests);
    let start = Instant::now();
    let limit = run_opts.duration_limit;
    let past_limit = move || limit.is_some_and(|l| start.elapsed() >= l);
    let mut tasks: JoinSet<Vec<RequestRecord>> = JoinSet::new();
    match run_opts.arrival {
        Arrival::Closed { concurrency } => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..concurrency.max(1) {
                let (target, opts, requests, next) =
                    (target.clone(), opts.clone(), requests.clone(), next.clone());
                tasks.spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        if past_limit() {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(r) = requests.get(i) else { break };
                        out.push(send_request(&target, &opts, i, r, start).await);
                    }
                    out
                });
            }
        }
        Arrival::Poisson { .. } | Arrival::Trace { .. } => {
            for i in 0..requests.len() {
                let at = Duration::from_secs_f64(requests[i].arrival_s.max(0.0));
                if limit.is_some_and(|l| at >= l) {
                    break;
                }
                tokio::time::sleep_until((start + at).into()).await;
                let (target, opts, requests) = (target.clone(), opts.clone(), requests.clone());
                tasks.spawn(async move {
                    vec![send_request(&target, &opts, i, &requests[i], start).await]
                });
            }
        }
    }
    let mut records = Vec::with_capacity(requests.len());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(rs) => records.extend(rs),
            // A request task does not panic by design; if one is lost anyway, it still counts
            // as a failed request rather than vanishing from the report.
            Err(e) => records.push(RequestRecord {
                index: usize::MAX,
                end_s: start.elapsed().as_secs_f64(),
                error: Some(format!("request task failed: {e}")),
                ..Default::default()
            }),
        }
    }
    records.sort_by_key(|r| r.index);
    records
}

/// The numbers a run is judged by.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadSummary {
    /// Name of the run in tables.
    pub label: String,
    /// Requests sent.
    pub requests: u64,
    /// Requests that completed.
    pub ok: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Sum of `usage.prompt_tokens` over completed requests.
    pub prompt_tokens: u64,
    /// Sum of cached prompt tokens over completed requests.
    pub cached_tokens: u64,
    /// Sum of generated tokens over completed requests.
    pub completion_tokens: u64,
    /// `cached_tokens / prompt_tokens`.
    pub hit_ratio: Option<f64>,
    /// TTFT mean over completed requests, seconds.
    pub ttft_mean_s: Option<f64>,
    /// TTFT median.
    pub ttft_p50_s: Option<f64>,
    /// TTFT 90th percentile.
    pub ttft_p90_s: Option<f64>,
    /// TTFT 99th percentile.
    pub ttft_p99_s: Option<f64>,
    /// End-to-end latency median.
    pub e2e_p50_s: Option<f64>,
    /// End-to-end latency 99th percentile.
    pub e2e_p99_s: Option<f64>,
    /// Mean gap between consecutive text events over all completed requests.
    pub itl_mean_s: Option<f64>,
    /// From the first send to the last end, seconds.
    pub duration_s: f64,
    /// Completed requests per second of `duration_s`.
    pub request_rate: f64,
    /// Generated tokens per second of `duration_s`.
    pub output_tok_s: f64,
    /// Prompt plus generated tokens per second of `duration_s`.
    pub total_tok_s: f64,
    /// Device-tier hit tokens the server reported during the run, when scraped.
    #[serde(default)]
    pub server_device_hit_tokens: Option<f64>,
    /// Host-tier hit tokens the server reported during the run, when scraped.
    #[serde(default)]
    pub server_host_hit_tokens: Option<f64>,
}

/// Nearest-rank quantile of sorted values (the simulator's definition), `None` when empty.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Aggregates request records into a summary.
pub fn summarize(label: &str, records: &[RequestRecord]) -> LoadSummary {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok).collect();
    let mut ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_s).collect();
    ttft.sort_by(f64::total_cmp);
    let mut e2e: Vec<f64> = ok.iter().map(|r| r.e2e_s()).collect();
    e2e.sort_by(f64::total_cmp);
    let prompt_tokens: u64 = ok.iter().map(|r| r.prompt_tokens).sum();
    let cached_tokens: u64 = ok.iter().map(|r| r.cached_tokens).sum();
    let completion_tokens: u64 = ok.iter().map(|r| r.completion_tokens).sum();
    let itl_count: u64 = ok.iter().map(|r| r.itl_count).sum();
    let itl_sum: f64 = ok.iter().map(|r| r.itl_sum_s).sum();
    let first = records
        .iter()
        .map(|r| r.send_s)
        .fold(f64::INFINITY, f64::min);
    let last = records
        .iter()
        .map(|r| r.end_s)
        .fold(f64::NEG_INFINITY, f64::max);
    let duration_s = if records.is_empty() {
        0.0
    } else {
        (last - first).max(0.0)
    };
    let per_s = |x: f64| {
        if duration_s > 0.0 {
            x / duration_s
        } else {
            0.0
        }
    };
    LoadSummary {
        label: label.to_string(),
        requests: records.len() as u64,
        ok: ok.len() as u64,
        failed: (records.len() - ok.len()) as u64,
        prompt_tokens,
        cached_tokens,
        completion_tokens,
        hit_ratio: (prompt_tokens > 0).then(|| cached_tokens as f64 / prompt_tokens as f64),
        ttft_mean_s: (!ttft.is_empty()).then(|| ttft.iter().sum::<f64>() / ttft.len() as f64),
        ttft_p50_s: quantile(&ttft, 0.5),
        ttft_p90_s: quantile(&ttft, 0.9),
        ttft_p99_s: quantile(&ttft, 0.99),
        e2e_p50_s: quantile(&e2e, 0.5),
        e2e_p99_s: quantile(&e2e, 0.99),
        itl_mean_s: (itl_count > 0).then(|| itl_sum / itl_count as f64),
        duration_s,
        request_rate: per_s(ok.len() as f64),
        output_tok_s: per_s(completion_tokens as f64),
        total_tok_s: per_s((prompt_tokens + completion_tokens) as f64),
        server_device_hit_tokens: None,
        server_host_hit_tokens: None,
    }
}

/// Describes a run for its report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadSetup {
    /// Server URL.
    pub url: String,
    /// Model id sent.
    pub model: String,
    /// The workload, in words.
    pub workload: String,
    /// The arrival process, in words.
    pub arrival: String,
    /// Seed.
    pub seed: u64,
}

/// What `--json` writes and `--compare` reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// How the run was made.
    pub setup: LoadSetup,
    /// The numbers.
    pub summary: LoadSummary,
    /// Every request.
    #[serde(default)]
    pub records: Vec<RequestRecord>,
}

fn fmt_opt(v: Option<f64>, scale: f64, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{:.*}", digits, x * scale))
}

const TABLE_HEAD: &str = "| run | ok | failed | hit ratio | TTFT p50 (s) | TTFT p90 (s) | \
                          TTFT p99 (s) | e2e p50 (s) | e2e p99 (s) | ITL mean (ms) | \
                          output tok/s | total tok/s | wall (s) |\n\
                          |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";

fn table_row(s: &LoadSummary) -> String {
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} |\n",
        s.label,
        s.ok,
        s.failed,
        fmt_opt(s.hit_ratio, 1.0, 3),
        fmt_opt(s.ttft_p50_s, 1.0, 3),
        fmt_opt(s.ttft_p90_s, 1.0, 3),
        fmt_opt(s.ttft_p99_s, 1.0, 3),
        fmt_opt(s.e2e_p50_s, 1.0, 3),
        fmt_opt(s.e2e_p99_s, 1.0, 3),
        fmt_opt(s.itl_mean_s, 1000.0, 1),
        s.output_tok_s,
        s.total_tok_s,
        s.duration_s,
    )
}

/// A markdown table with one row per summary.
pub fn markdown_table(rows: &[LoadSummary]) -> String {
    let mut out = String::from(TABLE_HEAD);
    for r in rows {
        out.push_str(&table_row(r));
    }
    out
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 && a.is_finite() && b.is_finite() => {
            format!("{:.2}x", a / b)
        }
        _ => "-".to_string(),
    }
}

/// The runs side by side, then one row per other run with its ratios against the run labelled
/// `baseline` (latency ratios below 1 and hit-ratio or throughput ratios above 1 favour the
/// other run).
pub fn comparison_table(rows: &[LoadSummary], baseline: &str) -> Result<String, LoadError> {
    let base = rows
        .iter()
        .find(|r| r.label == baseline)
        .ok_or_else(|| LoadError::UnknownBaseline(baseline.to_string()))?;
    let mut out = markdown_table(rows);
    for r in rows.iter().filter(|r| r.label != baseline) {
        out.push_str(&format!(
            "| {} / {} | - | - | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.label,
            base.label,
            ratio(r.hit_ratio, base.hit_ratio),
            ratio(r.ttft_p50_s, base.ttft_p50_s),
            ratio(r.ttft_p90_s, base.ttft_p90_s),
            ratio(r.ttft_p99_s, base.ttft_p99_s),
            ratio(r.e2e_p50_s, base.e2e_p50_s),
            ratio(r.e2e_p99_s, base.e2e_p99_s),
            ratio(r.itl_mean_s, base.itl_mean_s),
            ratio(Some(r.output_tok_s), Some(base.output_tok_s)),
            ratio(Some(r.total_tok_s), Some(base.total_tok_s)),
            ratio(Some(r.duration_s), Some(base.duration_s)),
        ));
    }
    Ok(out)
}

/// Writes one CSV line per request record, with a header.
pub fn write_records_csv(w: &mut impl Write, records: &[RequestRecord]) -> std::io::Result<()> {
    writeln!(
        w,
        "index,group,send_s,ttft_s,end_s,e2e_s,sent_tokens,max_tokens,prompt_tokens,\
         completion_tokens,cached_tokens,status,ok,itl_mean_s,error"
    )?;
    for r in records {
        let opt = |v: Option<f64>| v.map_or_else(String::new, |x| format!("{x:.6}"));
        let itl = (r.itl_count > 0).then(|| r.itl_sum_s / r.itl_count as f64);
        // The error text is quoted with doubled quotes, the CSV way, since server messages may
        // contain commas.
        let err = r
            .error
            .as_deref()
            .map_or_else(String::new, |e| format!("\"{}\"", e.replace('"', "\"\"")));
        writeln!(
            w,
            "{},{},{:.6},{},{:.6},{:.6},{},{},{},{},{},{},{},{},{}",
            r.index,
            r.group.map_or_else(String::new, |g| g.to_string()),
            r.send_s,
            opt(r.ttft_s),
            r.end_s,
            r.e2e_s(),
            r.sent_tokens,
            r.max_tokens,
            r.prompt_tokens,
            r.completion_tokens,
            r.cached_tokens,
            r.status,
            r.ok,
            opt(itl),
            err
        )?;
    }
    Ok(())
}

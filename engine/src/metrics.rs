//! The engine's Prometheus metrics: gauges the scheduler publishes after every step, counters
//! and latency histograms, rendered in the text exposition format. Names follow vLLM's
//! (`*_num_requests_waiting`, `*_kv_cache_usage_perc`, ...) so gateways and dashboards written
//! for it can scrape these.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::scheduler::{FinishReason, SchedulerStatus};

const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0,
];

/// A Prometheus histogram with fixed bucket bounds (shared with the router's metrics).
#[derive(Debug, Clone)]
pub struct Histogram {
    buckets: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram with these upper bounds (ascending).
    pub fn new(buckets: &'static [f64]) -> Self {
        Histogram {
            buckets,
            counts: vec![0; buckets.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one value.
    pub fn observe(&mut self, v: f64) {
        for (b, c) in self.buckets.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    /// Appends the histogram in the text exposition format.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.buckets.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Debug)]
struct Inner {
    status: SchedulerStatus,
    ttft: Histogram,
    itl: Histogram,
    step: Histogram,
    prompt_tokens: u64,
    generation_tokens: u64,
    step_tokens: u64,
    finished: BTreeMap<&'static str, u64>,
    cancelled: u64,
    preemptions: u64,
    hit_device_tokens: u64,
    hit_host_tokens: u64,
    query_tokens: u64,
    http: BTreeMap<(String, u16), u64>,
    /// (when, prompt tokens, generated tokens) at the start of the throughput window.
    window: (Instant, u64, u64),
    throughput: (f64, f64),
}

/// Everything `/metrics` reports. Shared between the engine thread and the HTTP server.
#[derive(Debug)]
pub struct EngineMetrics {
    model: String,
    inner: Mutex<Inner>,
}

impl EngineMetrics {
    /// Metrics for the served model `model`.
    pub fn new(model: &str) -> Self {
        EngineMetrics {
            model: model.to_string(),
            inner: Mutex::new(Inner {
                status: SchedulerStatus::default(),
                ttft: Histogram::new(&LATENCY_BUCKETS),
                itl: Histogram::new(&LATENCY_BUCKETS),
                step: Histogram::new(&LATENCY_BUCKETS),
                prompt_tokens: 0,
                generation_tokens: 0,
                step_tokens: 0,
                finished: BTreeMap::new(),
                cancelled: 0,
                preemptions: 0,
                hit_device_tokens: 0,
                hit_host_tokens: 0,
                query_tokens: 0,
                http: BTreeMap::new(),
                window: (Instant::now(), 0, 0),
                throughput: (0.0, 0.0),
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The scheduler's latest counts (published after every step).
    pub fn set_status(&self, s: SchedulerStatus) {
        self.with(|m| {
            m.status = s;
            // Tokens per second over windows of at least two seconds.
            let (t0, p0, g0) = m.window;
            let dt = t0.elapsed().as_secs_f64();
            if dt >= 2.0 {
                m.throughput = (
                    (m.prompt_tokens - p0) as f64 / dt,
                    (m.generation_tokens - g0) as f64 / dt,
                );
                m.window = (Instant::now(), m.prompt_tokens, m.generation_tokens);
            }
        });
    }

    /// The scheduler's latest counts.
    pub fn status(&self) -> SchedulerStatus {
        self.with(|m| m.status.clone())
    }

    /// A request was admitted for the first time: its prompt and cache hits per tier.
    pub fn prefix_hit(&self, prompt: usize, device: usize, host: usize) {
        self.with(|m| {
            m.query_tokens += prompt as u64;
            m.hit_device_tokens += device as u64;
            m.hit_host_tokens += host as u64;
        });
    }

    /// A forward step ran over `tokens` rows, `sampled` of which produced logits.
    pub fn step(&self, tokens: usize, _sampled: usize, took: Duration) {
        self.with(|m| {
            m.step_tokens += tokens as u64;
            m.step.observe(took.as_secs_f64());
        });
    }

    /// Time from arrival to a request's first token.
    pub fn first_token(&self, d: Duration) {
        self.with(|m| {
            m.ttft.observe(d.as_secs_f64());
            m.generation_tokens += 1;
        });
    }

    /// Time between two tokens of a request.
    pub fn inter_token(&self, d: Duration) {
        self.with(|m| {
            m.itl.observe(d.as_secs_f64());
            m.generation_tokens += 1;
        });
    }

    /// A request ended.
    pub fn finished(&self, reason: &FinishReason, prompt: usize, _generated: usize) {
        let key = match reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Error(_) => "error",
        };
        self.with(|m| {
            *m.finished.entry(key).or_default() += 1;
            m.prompt_tokens += prompt as u64;
        });
    }

    /// A request was cancelled by its client.
    pub fn cancelled(&self) {
        self.with(|m| m.cancelled += 1);
    }

    /// A running request was preempted.
    pub fn preempted(&self) {
        self.with(|m| m.preemptions += 1);
    }

    /// An HTTP response was sent.
    pub fn http(&self, route: &str, status: u16) {
        self.with(|m| *m.http.entry((route.to_string(), status)).or_default() += 1);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let m = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut o = String::with_capacity(8192);
        let model = &self.model;
        let mut g = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(o, "{name}{{model_name=\"{model}\"{labels}}} {v}");
            }
        };
        let s = &m.status;
        let u = &s.usage;
        let frac = |used: usize, cap: u32| {
            if cap == 0 {
                0.0
            } else {
                used as f64 / f64::from(cap)
            }
        };
        g(
            "hotprefix_num_requests_waiting",
            "gauge",
            "Requests queued for admission.",
            &[("", s.waiting as f64)],
        );
        g(
            "hotprefix_num_requests_running",
            "gauge",
            "Requests admitted (computing or waiting on a host-tier load).",
            &[("", s.running as f64)],
        );
        g(
            "hotprefix_num_requests_loading",
            "gauge",
            "Admitted requests waiting on host-tier loads.",
            &[("", s.loading as f64)],
        );
        g(
            "hotprefix_kv_cache_usage_perc",
            "gauge",
            "Fraction of KV blocks in use, per tier.",
            &[
                (
                    ",tier=\"device\"",
                    frac(u.device_cached + u.device_outstanding, u.device_capacity),
                ),
                (
                    ",tier=\"host\"",
                    frac(u.host_capacity as usize - u.host_free, u.host_capacity),
                ),
            ],
        );
        g(
            "hotprefix_kv_blocks",
            "gauge",
            "KV blocks per tier and state.",
            &[
                (
                    ",tier=\"device\",state=\"capacity\"",
                    f64::from(u.device_capacity),
                ),
                (",tier=\"device\",state=\"cached\"", u.device_cached as f64),
                (
                    ",tier=\"device\",state=\"in_use\"",
                    u.device_outstanding as f64,
                ),
                (",tier=\"device\",state=\"free\"", u.device_free as f64),
                (
                    ",tier=\"host\",state=\"capacity\"",
                    f64::from(u.host_capacity),
                ),
                (",tier=\"host\",state=\"free\"", u.host_free as f64),
            ],
        );
        g(
            "hotprefix_prefix_cache_query_tokens_total",
            "counter",
            "Prompt tokens looked up in the prefix cache at admission.",
            &[("", m.query_tokens as f64)],
        );
        g(
            "hotprefix_prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens served from the prefix cache, per tier.",
            &[
                (",tier=\"device\"", m.hit_device_tokens as f64),
                (",tier=\"host\"", m.hit_host_tokens as f64),
            ],
        );
        let st = &s.stats;
        g(
            "hotprefix_kv_transfer_bytes_total",
            "counter",
            "Bytes of planned KV transfers between tiers.",
            &[
                (",direction=\"host_to_device\"", st.h2d_bytes as f64),
                (",direction=\"device_to_host\"", st.d2h_bytes as f64),
            ],
        );
        g(
            "hotprefix_kv_transfers_in_flight",
            "gauge",
            "KV transfers submitted and not yet complete.",
            &[("", s.transfers_in_flight as f64)],
        );
        g(
            "hotprefix_kv_transfer_failures_total",
            "counter",
            "KV transfers reported failed.",
            &[("", st.failed_transfers as f64)],
        );
        g(
            "hotprefix_cache_evicted_blocks_total",
            "counter",
            "Blocks evicted, per tier.",
            &[
                (",tier=\"device\"", st.device_evicted_blocks as f64),
                (",tier=\"host\"", st.host_evicted_blocks as f64),
            ],
        );
        g(
            "hotprefix_cache_admission_blocks_total",
            "counter",
            "Device-evicted blocks admitted to or rejected from the host tier.",
            &[
                (",decision=\"admitted\"", st.admitted_blocks as f64),
                (",decision=\"rejected\"", st.rejected_blocks as f64),
            ],
        );
        g(
            "hotprefix_cache_promoted_blocks_total",
            "counter",
            "Blocks promoted from the host tier to the device.",
            &[("", st.promoted_blocks as f64)],
        );
        g(
            "hotprefix_cache_write_through_blocks_total",
            "counter",
            "Hot device blocks copied to the host ahead of eviction.",
            &[("", st.write_through_blocks as f64)],
        );
        g(
            "hotprefix_prompt_tokens_total",
            "counter",
            "Prompt tokens of finished requests.",
            &[("", m.prompt_tokens as f64)],
        );
        g(
            "hotprefix_generation_tokens_total",
            "counter",
            "Generated tokens.",
            &[("", m.generation_tokens as f64)],
        );
        g(
            "hotprefix_avg_prompt_throughput_toks_per_s",
            "gauge",
            "Prompt tokens per second over the last window of at least 2 s.",
            &[("", m.throughput.0)],
        );
        g(
            "hotprefix_avg_generation_throughput_toks_per_s",
            "gauge",
            "Generated tokens per second over the last window of at least 2 s.",
            &[("", m.throughput.1)],
        );
        g(
            "hotprefix_step_tokens_total",
            "counter",
            "Tokens (prefill and decode) through forward steps.",
            &[("", m.step_tokens as f64)],
        );
        let reasons: Vec<(String, f64)> = m
            .finished
            .iter()
            .map(|(k, v)| (format!(",finished_reason=\"{k}\""), *v as f64))
            .collect();
        let reasons: Vec<(&str, f64)> = reasons.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        g(
            "hotprefix_request_success_total",
            "counter",
            "Finished requests by reason.",
            &reasons,
        );
        g(
            "hotprefix_request_cancelled_total",
            "counter",
            "Requests cancelled by their client (disconnect or stop string).",
            &[("", m.cancelled as f64)],
        );
        g(
            "hotprefix_num_preemptions_total",
            "counter",
            "Running requests preempted for recompute.",
            &[("", m.preemptions as f64)],
        );
        let http: Vec<(String, f64)> = m
            .http
            .iter()
            .map(|((r, c), v)| (format!(",route=\"{r}\",status=\"{c}\""), *v as f64))
            .collect();
        let http: Vec<(&str, f64)> = http.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        g(
            "hotprefix_http_responses_total",
            "counter",
            "HTTP responses by route and status.",
            &http,
        );
        m.ttft.render(
            &mut o,
            "hotprefix_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
        );
        m.itl.render(
            &mut o,
            "hotprefix_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
        );
        m.step.render(
            &mut o,
            "hotprefix_step_duration_seconds",
            "Duration of one forward step of the batch.",
        );
        o
    }
}

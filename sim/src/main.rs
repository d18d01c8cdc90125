//! `hotprefix-bench`: command line of the simulator (`sim`, `sweep`), the workload generators
//! (`gen`) and the HTTP load generator (`load`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use hotprefix_cache::{HotnessConfig, PolicyKind};
use hotprefix_protocol::cluster::{
    DEFAULT_SUMMARY_ENTRIES, LOAD_INTERVAL_MS, MAX_SUMMARY_ENTRIES, SUMMARY_INTERVAL_MS,
};
use hotprefix_router::policy::HotPrefixWeights;
use hotprefix_sim::cluster::{RouterKind, RoutingConfig, SimConfig, SimResult, simulate};
use hotprefix_sim::cost::{CostModel, GpuSpec, ModelSpec};
use hotprefix_sim::load::{
    Arrival, ClientOptions, LoadReport, LoadSetup, Popularity, RunOptions, SharedPrefixLoad,
    Target, TraceLoad,
};
use hotprefix_sim::optimal::belady;
use hotprefix_sim::report::{
    ResultRow, markdown_table, plot_bars, plot_lines, routing_table, write_csv,
};
use hotprefix_sim::trace::Trace;
use hotprefix_sim::workload::{GeneratedSharedPrefix, ZipfSessions};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Parser, Debug)]
#[command(
    name = "hotprefix-bench",
    version,
    about = "HotPrefix trace-driven simulator and workload generator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Replay one trace through N replicas for each policy and print the comparison table.
    Sim(SimArgs),
    /// Run a grid of device capacities and load levels for each policy; write CSV and plots.
    Sweep(SweepArgs),
    /// Write a generated workload as a Mooncake-format JSONL trace.
    Gen(GenArgs),
    /// Replay a shared-prefix workload against a running engine over HTTP and report what
    /// clients see; or, with --compare, print saved runs side by side.
    Load(Box<LoadArgs>),
}

/// A cache policy or the offline bound.
#[derive(Clone, Copy, Debug, PartialEq)]
enum PolicyArg {
    Cache(PolicyKind),
    Optimal,
}

impl PolicyArg {
    fn name(self) -> &'static str {
        match self {
            PolicyArg::Cache(p) => p.as_str(),
            PolicyArg::Optimal => "optimal",
        }
    }
}

fn parse_policy(s: &str) -> Result<PolicyArg, String> {
    if s == "optimal" {
        return Ok(PolicyArg::Optimal);
    }
    s.parse::<PolicyKind>().map(PolicyArg::Cache).map_err(|_| {
        format!(
            "unknown policy {s:?}; expected hotprefix, lru, lru-offload, reuse-offload or optimal"
        )
    })
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Trace file in Mooncake JSONL format, or `gen:shared-prefix` / `gen:zipf-sessions` for a
    /// generated workload with default parameters and `--seed`.
    #[arg(long)]
    trace: String,
    /// Comma-separated policies: hotprefix, lru, lru-offload, reuse-offload, optimal.
    #[arg(long, value_delimiter = ',', value_parser = parse_policy,
          default_value = "hotprefix,lru,lru-offload,reuse-offload,optimal")]
    policy: Vec<PolicyArg>,
    /// Engine replicas.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    replicas: u32,
    /// Comma-separated routing policies across replicas (`sim` runs each; `sweep` takes one):
    /// hotprefix, least-load, round-robin, consistent-hash, approx-tree (the router's own
    /// policies), or global (the bound: the replicas' compute sharing one cache of the whole
    /// cluster's capacity, least-load dispatch).
    #[arg(long, value_delimiter = ',', default_value = "round-robin")]
    router: Vec<RouterKind>,
    /// Simulated milliseconds between the replicas' hotness summaries, which the `hotprefix`
    /// router reads (0: a fresh summary before every decision, slow).
    #[arg(long, default_value_t = SUMMARY_INTERVAL_MS)]
    summary_interval_ms: u64,
    /// Entries (blocks) per hotness summary.
    #[arg(long, default_value_t = DEFAULT_SUMMARY_ENTRIES)]
    summary_top_k: usize,
    /// Simulated milliseconds between the replicas' load reports (0: the router sees every
    /// replica's queue exactly at every decision).
    #[arg(long, default_value_t = LOAD_INTERVAL_MS)]
    load_interval_ms: u64,
    /// Blocks the `approx-tree` router remembers per replica (default: one replica's device
    /// plus host capacity in blocks).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    approx_tree_blocks: Option<u64>,
    /// Model preset: llama-3.1-8b or qwen2.5-7b.
    #[arg(long, default_value = "llama-3.1-8b")]
    model: ModelSpec,
    /// GPU preset: h100 or h200.
    #[arg(long, default_value = "h100")]
    gpu: GpuSpec,
    /// Seed for generated workloads.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder for results.csv and plots.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Half-life of hotness in seconds, when --half-life-turnovers is 0.
    #[arg(long, default_value_t = HotnessConfig::default().half_life_s)]
    half_life: f64,
    /// Decay hotness on the churn clock with this half-life in cache turnovers; 0 decays on the
    /// wall clock with --half-life seconds instead.
    #[arg(long, default_value_t = HotnessConfig::default().half_life_turnovers.unwrap_or(0.0))]
    half_life_turnovers: f64,
    /// `hotprefix`: minimum decayed hotness for admission to the host tier.
    #[arg(long, default_value_t = HotnessConfig::default().admission_floor)]
    admission_floor: f64,
    /// `hotprefix`: depth weighting scale in tokens (0 turns it off).
    #[arg(long, default_value_t = HotnessConfig::default().depth_weight_tokens)]
    depth_weight_tokens: f64,
    /// `hotprefix`: hotness at which device nodes are written through to host (0 turns it off).
    #[arg(long, default_value_t = HotnessConfig::default().write_through_hotness.unwrap_or(0.0))]
    write_through: f64,
    /// `hotprefix`: bytes promoted host to device per promotion interval (0 turns it off).
    #[arg(long, default_value_t = HotnessConfig::default().promotion_budget_bytes)]
    promotion_budget: u64,
    /// `hotprefix`: let promotion displace device nodes worth 2^MARGIN times less (default:
    /// promotion only fills free device slots).
    #[arg(long)]
    promotion_margin: Option<f64>,
    /// `hotprefix`: ignore queued requests (no look-ahead hints).
    #[arg(long)]
    no_queue_hints: bool,
    /// Turn off layer-wise overlap of host-tier loads with compute.
    #[arg(long)]
    no_overlap: bool,
    /// Most running requests per replica.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    max_running: u64,
    /// Tokens per engine step (chunked-prefill budget).
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..))]
    step_tokens: u64,
    /// Replays per point, each with arrivals jittered by a different seed (seed, seed+1, ...);
    /// TTFTs are pooled and counters averaged.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    repeats: u64,
    /// Delay each arrival by a uniform random amount in [0, JITTER) seconds before time scaling
    /// (the conversation trace's timestamps are rounded to whole seconds). 0 replays the trace
    /// exactly.
    #[arg(long, default_value_t = 0.0)]
    jitter: f64,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
    /// After the results, a table of what routing cost in cache hits, measured against the
    /// replicas' real caches (decisions off the best holder and why, summary coverage,
    /// evictions while queued, blocks held on several replicas).
    #[arg(long)]
    routing_stats: bool,
    /// `hotprefix` router: credit of a host-tier block relative to a device-tier block.
    #[arg(long, default_value_t = HotPrefixWeights::default().host_weight)]
    host_weight: f64,
    /// `hotprefix` router: cost of a token of queued work against a token of saved prefill.
    #[arg(long, default_value_t = HotPrefixWeights::default().load_weight)]
    load_weight: f64,
    /// `hotprefix` router: weight of the queueing externality (0: a request's own wait against
    /// its own prefill only).
    #[arg(long, default_value_t = HotPrefixWeights::default().queue_externality)]
    queue_externality: f64,
    /// `hotprefix` router: skip a replica whose queued work exceeds this times the mean (0 =
    /// never).
    #[arg(long, default_value_t = HotPrefixWeights::default().hot_spot_factor)]
    hot_spot_factor: f64,
    /// `hotprefix` router: weight of the cache-pressure term (new tokens times device use).
    #[arg(long, default_value_t = HotPrefixWeights::default().cache_pressure_weight)]
    cache_pressure_weight: f64,
    /// `hotprefix` router: tokens of slack in hot-spot protection.
    #[arg(long, default_value_t = HotPrefixWeights::default().hot_spot_slack_tokens)]
    hot_spot_slack_tokens: f64,
    /// `hotprefix` router: milliseconds its own decisions count as cached.
    #[arg(long, default_value_t = HotPrefixWeights::default().recent_ms)]
    recent_ms: u64,
}

#[derive(Args, Debug)]
struct SimArgs {
    #[command(flatten)]
    common: Common,
    /// Device KV capacity per replica, tokens (default: what the GPU holds after the weights).
    #[arg(long)]
    device_tokens: Option<u64>,
    /// Host KV capacity per replica, tokens (default: 4x the device capacity).
    #[arg(long)]
    host_tokens: Option<u64>,
    /// Arrival-rate multiplier: 2 replays the trace twice as fast.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
}

#[derive(Args, Debug)]
struct SweepArgs {
    #[command(flatten)]
    common: Common,
    /// Device capacities per replica to sweep, tokens.
    #[arg(long, value_delimiter = ',', required = true)]
    device_tokens: Vec<u64>,
    /// Host capacity as a multiple of the device capacity.
    #[arg(long, default_value_t = 4.0)]
    host_ratio: f64,
    /// Arrival-rate multipliers to sweep.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    time_scale: Vec<f64>,
}

#[derive(Args, Debug)]
struct GenArgs {
    /// Which generator: shared-prefix or zipf-sessions.
    kind: String,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Sim(a) => cmd_sim(a),
        Cmd::Sweep(a) => cmd_sweep(a),
        Cmd::Gen(a) => cmd_gen(a),
        Cmd::Load(a) => cmd_load(*a),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn load_trace(spec: &str, seed: u64) -> Result<Trace> {
    match spec {
        "gen:shared-prefix" => Ok(GeneratedSharedPrefix {
            seed,
            ..Default::default()
        }
        .generate()?),
        "gen:zipf-sessions" => Ok(ZipfSessions {
            seed,
            ..Default::default()
        }
        .generate()?),
        s if s.starts_with("gen:") => {
            bail!("unknown generator {s:?}; expected gen:shared-prefix or gen:zipf-sessions")
        }
        path => Trace::load(Path::new(path)).with_context(|| format!("cannot use trace {path}")),
    }
}

fn check_scale(f: f64) -> Result<()> {
    if !(f.is_finite() && f > 0.0) {
        bail!("--time-scale must be a positive number, got {f}");
    }
    Ok(())
}

/// One point of a run grid.
#[derive(Clone, Copy, Debug)]
struct Point {
    policy: PolicyArg,
    router: RouterKind,
    device_tokens: u64,
    host_tokens: u64,
    time_scale: f64,
}

fn sim_config(c: &Common, p: &Point) -> SimConfig {
    let mut cost = CostModel::new(c.model.clone(), c.gpu.clone());
    cost.layerwise_overlap = !c.no_overlap;
    let hotness = HotnessConfig {
        half_life_s: c.half_life,
        half_life_turnovers: (c.half_life_turnovers > 0.0).then_some(c.half_life_turnovers),
        admission_floor: c.admission_floor,
        depth_weight_tokens: c.depth_weight_tokens,
        write_through_hotness: (c.write_through > 0.0).then_some(c.write_through),
        promotion_budget_bytes: c.promotion_budget,
        promotion_margin: c.promotion_margin,
        queue_hints: !c.no_queue_hints,
        ..HotnessConfig::default()
    };
    SimConfig {
        policy: match p.policy {
            PolicyArg::Cache(k) => k,
            PolicyArg::Optimal => PolicyKind::Lru,
        },
        hotness,
        replicas: c.replicas,
        router: p.router,
        routing: RoutingConfig {
            summary_interval_ms: c.summary_interval_ms,
            summary_top_k: c.summary_top_k,
            load_interval_ms: c.load_interval_ms,
            hotprefix: HotPrefixWeights {
                host_weight: c.host_weight,
                load_weight: c.load_weight,
                queue_externality: c.queue_externality,
                hot_spot_factor: c.hot_spot_factor,
                hot_spot_slack_tokens: c.hot_spot_slack_tokens,
                cache_pressure_weight: c.cache_pressure_weight,
                recent_ms: c.recent_ms,
                ..HotPrefixWeights::default()
            },
            approx_tree_blocks: c
                .approx_tree_blocks
                .map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
            ..RoutingConfig::default()
        },
        cost,
        device_tokens: p.device_tokens,
        host_tokens: p.host_tokens,
        max_running: usize::try_from(c.max_running).unwrap_or(usize::MAX),
        step_tokens: c.step_tokens,
    }
}

/// Merges repeated runs into one result with per-run means: TTFTs pooled (so quantiles are
/// over all requests of all runs), every counter and mean divided by the number of runs.
fn pool(runs: Vec<SimResult>) -> SimResult {
    let n = runs.len().max(1) as u64;
    let nf = n as f64;
    let mut out = SimResult::default();
    for r in runs {
        out.completed += r.completed;
        out.refused += r.refused;
        out.ttft_s.extend(r.ttft_s);
        out.queue_mean_s += r.queue_mean_s;
        out.e2e_mean_s += r.e2e_mean_s;
        out.prompt_tokens += r.prompt_tokens;
        out.device_hit_tokens += r.device_hit_tokens;
        out.host_hit_tokens += r.host_hit_tokens;
        out.output_tokens += r.output_tokens;
        out.makespan_s += r.makespan_s;
        out.cache.add(&r.cache);
        out.wall_s += r.wall_s;
        out.routing.add(&r.routing);
    }
    out.ttft_s.sort_by(f64::total_cmp);
    out.completed /= n;
    out.refused /= n;
    out.queue_mean_s /= nf;
    out.e2e_mean_s /= nf;
    out.prompt_tokens /= n;
    out.device_hit_tokens /= n;
    out.host_hit_tokens /= n;
    out.output_tokens /= n;
    out.makespan_s /= nf;
    out.cache = out.cache.div(n);
    out
}

fn run_point(c: &Common, trace: &Trace, p: &Point, progress: &dyn Fn(u64)) -> Result<ResultRow> {
    let scaled = if p.time_scale == 1.0 {
        trace.clone()
    } else {
        trace.scaled(p.time_scale)
    };
    let cfg = sim_config(c, p);
    let mut row = ResultRow {
        policy: p.policy.name().to_string(),
        router: p.router.to_string(),
        replicas: c.replicas,
        device_tokens: p.device_tokens,
        host_tokens: p.host_tokens,
        time_scale: p.time_scale,
        requests: trace.requests.len() as u64,
        trace: trace.name.clone(),
        model: c.model.name.to_string(),
        gpu: c.gpu.name.to_string(),
        ..Default::default()
    };
    if p.policy == PolicyArg::Optimal {
        let started = std::time::Instant::now();
        let blocks = (p.device_tokens + p.host_tokens) / u64::from(trace.block_tokens.max(1))
            * u64::from(c.replicas);
        let o = belady(&scaled, blocks);
        progress(trace.requests.len() as u64 * c.repeats.max(1));
        row.hit_ratio = o.hit_ratio();
        for v in [
            &mut row.ttft_mean_s,
            &mut row.ttft_p50_s,
            &mut row.ttft_p99_s,
        ] {
            *v = f64::NAN;
        }
        row.device_hit_ratio = f64::NAN;
        row.host_hit_ratio = f64::NAN;
        row.throughput_tok_s = f64::NAN;
        row.e2e_mean_s = f64::NAN;
        row.queue_mean_s = f64::NAN;
        row.sim_wall_s = started.elapsed().as_secs_f64();
        return Ok(row);
    }
    // Each repeat replays an independently jittered copy; TTFTs are pooled, counters averaged.
    let repeats = c.repeats.max(1);
    let mut runs = Vec::with_capacity(repeats as usize);
    for i in 0..repeats {
        let t = if c.jitter > 0.0 {
            scaled.jittered(c.seed.wrapping_add(i), c.jitter)
        } else {
            scaled.clone()
        };
        let r = simulate(&t, &cfg, Some(progress))?;
        progress(r.refused);
        runs.push(r);
    }
    let r = pool(runs);
    row.requests = r.completed;
    row.hit_ratio = r.hit_ratio();
    row.device_hit_ratio = r.device_hit_ratio();
    row.host_hit_ratio = r.host_hit_ratio();
    row.ttft_mean_s = r.ttft_mean();
    row.ttft_p50_s = r.ttft_quantile(0.5);
    row.ttft_p99_s = r.ttft_quantile(0.99);
    row.throughput_tok_s = r.throughput_tok_s();
    row.h2d_bytes = r.cache.h2d_bytes;
    row.d2h_bytes = r.cache.d2h_bytes;
    row.e2e_mean_s = r.e2e_mean_s;
    row.queue_mean_s = r.queue_mean_s;
    row.device_evictions = r.cache.device_evicted_blocks;
    row.host_evictions = r.cache.host_evicted_blocks;
    row.admissions = r.cache.admitted_blocks;
    row.rejections = r.cache.rejected_blocks;
    row.promotions = r.cache.promoted_blocks;
    row.sim_wall_s = r.wall_s;
    if c.routing_stats && c.replicas > 1 {
        row.routing = Some(r.routing.clone());
    }
    if r.refused > 0 {
        eprintln!(
            "warning: {} request(s) of {} are larger than the device tier of {} tokens and were refused",
            r.refused, trace.name, p.device_tokens
        );
    }
    Ok(row)
}

/// Runs every point, using every core, and returns rows in the order of `points`.
fn run_grid(c: &Common, trace: &Trace, points: &[Point]) -> Result<Vec<ResultRow>> {
    let total = trace.requests.len() as u64 * points.len() as u64 * c.repeats.max(1);
    let bar = if c.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_draw_target(if c.quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    if let Ok(style) = ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} requests ({eta} left)",
    ) {
        bar.set_style(style);
    }
    let progress = |n: u64| bar.inc(n);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(points.len().max(1));
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Option<Result<ResultRow>>>> =
        Mutex::new((0..points.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = {
                        let Ok(mut n) = next.lock() else { return };
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some(p) = points.get(i) else { return };
                    let r = run_point(c, trace, p, &progress);
                    if let Ok(mut out) = results.lock() {
                        out[i] = Some(r);
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    let results = results
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a simulation thread panicked"))?;
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("a simulation thread panicked"))))
        .collect()
}

fn check_common(c: &Common) -> Result<()> {
    if !(c.jitter.is_finite() && c.jitter >= 0.0) {
        bail!(
            "--jitter must be a non-negative number of seconds, got {}",
            c.jitter
        );
    }
    if !(c.half_life.is_finite() && c.half_life > 0.0) {
        bail!(
            "--half-life must be a positive number of seconds, got {}",
            c.half_life
        );
    }
    if !(1..=MAX_SUMMARY_ENTRIES).contains(&c.summary_top_k) {
        bail!(
            "--summary-top-k must be in 1..={MAX_SUMMARY_ENTRIES} (what routers accept), got {}",
            c.summary_top_k
        );
    }
    Ok(())
}

fn cmd_sim(a: SimArgs) -> Result<()> {
    check_scale(a.time_scale)?;
    check_common(&a.common)?;
    let trace = load_trace(&a.common.trace, a.common.seed)?;
    let cost = CostModel::new(a.common.model.clone(), a.common.gpu.clone());
    let device_tokens = a
        .device_tokens
        .unwrap_or_else(|| cost.default_device_tokens());
    let host_tokens = a.host_tokens.unwrap_or(device_tokens.saturating_mul(4));
    let mut points = Vec::new();
    for (i, &router) in a.common.router.iter().enumerate() {
        for &policy in &a.common.policy {
            // The offline bound ignores routing: compute it once.
            if policy == PolicyArg::Optimal && i > 0 {
                continue;
            }
            points.push(Point {
                policy,
                router,
                device_tokens,
                host_tokens,
                time_scale: a.time_scale,
            });
        }
    }
    let rows = run_grid(&a.common, &trace, &points)?;
    print_header(
        &trace,
        &a.common,
        &format!(
            "device {device_tokens} tokens, host {host_tokens} tokens, time scale {}",
            a.time_scale
        ),
    );
    print!("{}", markdown_table(&rows));
    if a.common.routing_stats {
        print!("\n{}", routing_table(&rows));
    }
    if let Some(out) = &a.common.out {
        write_results(out, &rows)?;
        plot_policies(out, &rows, a.common.router.len() > 1)?;
        eprintln!("wrote {}", out.join("results.csv").display());
    }
    Ok(())
}

/// The line above a results table: what was replayed, on what, how.
fn print_header(trace: &Trace, c: &Common, setup: &str) {
    let routers: Vec<&str> = c.router.iter().map(|r| r.as_str()).collect();
    println!(
        "trace {} ({} requests), {} x {} on {}, router {}, {setup}\n",
        trace.name,
        trace.requests.len(),
        c.replicas,
        c.model.name,
        c.gpu.name,
        routers.join(","),
    );
}

fn write_results(out: &Path, rows: &[ResultRow]) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_csv(&out.join("results.csv"), rows)?;
    Ok(())
}

/// Bar charts comparing the policies of one grid point; with several routers each bar is
/// named by router and policy.
fn plot_policies(out: &Path, rows: &[ResultRow], by_router: bool) -> Result<()> {
    let sim_rows: Vec<&ResultRow> = rows.iter().filter(|r| r.policy != "optimal").collect();
    let label = |r: &ResultRow| {
        if by_router && r.policy != "optimal" {
            format!("{} / {}", r.router, r.policy)
        } else {
            r.policy.clone()
        }
    };
    let cats: Vec<String> = rows.iter().map(label).collect();
    let hit = |f: fn(&ResultRow) -> f64| {
        rows.iter()
            .map(|r| if f(r).is_nan() { 0.0 } else { f(r) })
            .collect()
    };
    plot_bars(
        &out.join("hit_ratio.png"),
        "Prompt tokens served from cache",
        "hit ratio",
        &cats,
        &[
            ("total".into(), hit(|r| r.hit_ratio)),
            ("device".into(), hit(|r| r.device_hit_ratio)),
            ("host".into(), hit(|r| r.host_hit_ratio)),
        ],
    )?;
    if sim_rows.is_empty() {
        return Ok(());
    }
    let cats: Vec<String> = sim_rows.iter().map(|r| label(r)).collect();
    plot_bars(
        &out.join("ttft.png"),
        "Time to first token",
        "seconds",
        &cats,
        &[
            (
                "mean".into(),
                sim_rows.iter().map(|r| r.ttft_mean_s).collect(),
            ),
            (
                "p50".into(),
                sim_rows.iter().map(|r| r.ttft_p50_s).collect(),
            ),
            (
                "p99".into(),
                sim_rows.iter().map(|r| r.ttft_p99_s).collect(),
            ),
        ],
    )?;
    plot_bars(
        &out.join("bytes.png"),
        "Bytes moved between tiers",
        "GiB",
        &cats,
        &[
            (
                "host to device".into(),
                sim_rows
                    .iter()
                    .map(|r| r.h2d_bytes as f64 / (1u64 << 30) as f64)
                    .collect(),
            ),
            (
                "device to host".into(),
                sim_rows
                    .iter()
                    .map(|r| r.d2h_bytes as f64 / (1u64 << 30) as f64)
                    .collect(),
            ),
        ],
    )?;
    Ok(())
}

fn cmd_sweep(a: SweepArgs) -> Result<()> {
    for &f in &a.time_scale {
        check_scale(f)?;
    }
    check_common(&a.common)?;
    let [router] = a.common.router[..] else {
        bail!("--router takes one router in sweep (its plots are per cache policy)");
    };
    if !(a.host_ratio.is_finite() && a.host_ratio >= 0.0) {
        bail!(
            "--host-ratio must be a non-negative number, got {}",
            a.host_ratio
        );
    }
    let trace = load_trace(&a.common.trace, a.common.seed)?;
    let mut points = Vec::new();
    for &time_scale in &a.time_scale {
        for &device_tokens in &a.device_tokens {
            let host_tokens = (device_tokens as f64 * a.host_ratio) as u64;
            for &policy in &a.common.policy {
                // The offline bound ignores time: compute it once per capacity.
                if policy == PolicyArg::Optimal && time_scale != a.time_scale[0] {
                    continue;
                }
                points.push(Point {
                    policy,
                    router,
                    device_tokens,
                    host_tokens,
                    time_scale,
                });
            }
        }
    }
    let rows = run_grid(&a.common, &trace, &points)?;
    print_header(
        &trace,
        &a.common,
        &format!("host = {}x device", a.host_ratio),
    );
    print!("{}", markdown_table(&rows));
    if a.common.routing_stats {
        print!("\n{}", routing_table(&rows));
    }
    if let Some(out) = &a.common.out {
        write_results(out, &rows)?;
        plot_sweep(out, &rows, &a)?;
        eprintln!("wrote {}", out.join("results.csv").display());
    }
    Ok(())
}

fn plot_sweep(out: &Path, rows: &[ResultRow], a: &SweepArgs) -> Result<()> {
    let names: Vec<&str> = a.common.policy.iter().map(|p| p.name()).collect();
    let series = |f: &dyn Fn(&ResultRow) -> Option<(f64, f64)>| -> Vec<(String, Vec<(f64, f64)>)> {
        names
            .iter()
            .map(|n| {
                let pts = rows
                    .iter()
                    .filter(|r| r.policy == *n)
                    .filter_map(f)
                    .filter(|p| p.1.is_finite())
                    .collect();
                (n.to_string(), pts)
            })
            .filter(|(_, pts): &(String, Vec<(f64, f64)>)| !pts.is_empty())
            .collect()
    };
    let ts0 = a.time_scale[0];
    plot_lines(
        &out.join("hit_ratio_vs_capacity.png"),
        "Hit ratio vs device capacity (host = device x ratio)",
        "device tokens per replica",
        "hit ratio",
        &series(&|r| {
            (r.policy == "optimal" || r.time_scale == ts0)
                .then_some((r.device_tokens as f64, r.hit_ratio))
        }),
        true,
    )?;
    for &ts in &a.time_scale {
        plot_lines(
            &out.join(format!("ttft_vs_capacity_x{ts}.png")),
            &format!("Mean TTFT vs device capacity, time scale {ts}"),
            "device tokens per replica",
            "mean TTFT (s)",
            &series(&|r| (r.time_scale == ts).then_some((r.device_tokens as f64, r.ttft_mean_s))),
            true,
        )?;
    }
    if a.time_scale.len() > 1 {
        for &d in &a.device_tokens {
            plot_lines(
                &out.join(format!("ttft_vs_load_{d}.png")),
                &format!("Mean TTFT vs load, {d} device tokens"),
                "time scale (arrival-rate multiplier)",
                "mean TTFT (s)",
                &series(&|r| {
                    (r.device_tokens == d && r.policy != "optimal")
                        .then_some((r.time_scale, r.ttft_mean_s))
                }),
                false,
            )?;
        }
    }
    Ok(())
}

fn cmd_gen(a: GenArgs) -> Result<()> {
    let trace = load_trace(&format!("gen:{}", a.kind), a.seed)?;
    let f = std::fs::File::create(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let mut w = std::io::BufWriter::new(f);
    trace
        .write_jsonl(&mut w)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    std::io::Write::flush(&mut w)?;
    eprintln!(
        "wrote {} requests to {}",
        trace.requests.len(),
        a.out.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
struct LoadArgs {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Model id to request (default: data[0].id of GET /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// Name of this run in tables and reports.
    #[arg(long, default_value = "run")]
    label: String,
    /// Replay this Mooncake JSONL trace instead of a generated shared-prefix workload.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Generated: number of shared prefixes (groups).
    #[arg(long, default_value_t = 8)]
    groups: u32,
    /// Generated: tokens in each shared prefix.
    #[arg(long, default_value_t = 256)]
    prefix_tokens: u32,
    /// Generated: unique tokens after the prefix in each request.
    #[arg(long, default_value_t = 32)]
    suffix_tokens: u32,
    /// Requests to send (generated: default 64; trace: default all, else the first N).
    #[arg(long)]
    requests: Option<u32>,
    /// Generated: Zipf exponent of group popularity (0 = uniform); ignored with --hot-set.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Generated: FRAC:SHARE, the first FRAC of the groups get SHARE of the requests
    /// (e.g. 0.25:0.9), instead of Zipf popularity.
    #[arg(long, value_parser = parse_hot_set)]
    hot_set: Option<(f64, f64)>,
    /// Generated: tokens each request generates.
    #[arg(long, default_value_t = 16)]
    output_tokens: u32,
    /// Trace: prompt tokens each 512-token hash block becomes.
    #[arg(long, default_value_t = 16)]
    tokens_per_hash_block: u32,
    /// Trace: longest prompt sent, in tokens (after scaling).
    #[arg(long, default_value_t = 2048)]
    max_input_tokens: u32,
    /// Trace: most tokens generated per request.
    #[arg(long, default_value_t = 32)]
    max_output_tokens: u32,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long, conflicts_with = "concurrency")]
    rate: Option<f64>,
    /// Closed loop: keep this many requests in flight.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Trace without --rate or --concurrency: replay its timestamps this many times faster.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Send no request after this many seconds (in-flight ones still finish).
    #[arg(long)]
    duration_limit: Option<f64>,
    /// Seed of token ids, group choices and arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Let generation stop at end-of-sequence (by default `ignore_eos` is sent, so every
    /// output has exactly its max_tokens).
    #[arg(long)]
    allow_eos: bool,
    /// Seconds one request may take before it counts as failed.
    #[arg(long, default_value_t = 300.0)]
    request_timeout: f64,
    /// Send this many warm-up requests (one at a time, as long as the first workload request,
    /// sharing no prefix with the workload) before the measured run.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Wait up to this many seconds for GET /ready to answer 200 before starting.
    #[arg(long, default_value_t = 0.0)]
    wait_ready: f64,
    /// Read the engine's /metrics before and after the run and report its prefix-cache hit
    /// tokens per tier.
    #[arg(long)]
    server_metrics: bool,
    /// Write the summary and every request as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write every request as CSV here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Run nothing: read these result JSON files (comma-separated or repeated) and print them
    /// side by side.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    compare: Vec<PathBuf>,
    /// With --compare: the label the ratio rows divide by (default: the first file's).
    #[arg(long)]
    baseline: Option<String>,
}

fn parse_hot_set(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("expected FRAC:SHARE such as 0.25:0.9, got {s:?}"))?;
    let num = |x: &str| {
        x.trim()
            .parse::<f64>()
            .map_err(|_| format!("expected FRAC:SHARE such as 0.25:0.9, got {s:?}"))
    };
    Ok((num(a)?, num(b)?))
}

fn positive_secs(flag: &str, v: f64) -> Result<std::time::Duration> {
    if !(v.is_finite() && v > 0.0) {
        bail!("{flag} must be a positive number of seconds, got {v}");
    }
    Ok(std::time::Duration::from_secs_f64(v))
}

fn cmd_load(a: LoadArgs) -> Result<()> {
    if !a.compare.is_empty() {
        return cmd_load_compare(&a);
    }
    let target = Target::parse(&a.url)?;
    let timeout = positive_secs("--request-timeout", a.request_timeout)?;
    let duration_limit = a
        .duration_limit
        .map(|d| positive_secs("--duration-limit", d))
        .transpose()?;
    // The workload and its default arrival process.
    let (mut requests, workload, default_arrival) = match &a.trace {
        Some(path) => {
            let trace = Trace::load(path)
                .with_context(|| format!("cannot use trace {}", path.display()))?;
            let mapping = TraceLoad {
                tokens_per_block: a.tokens_per_hash_block,
                max_input_tokens: a.max_input_tokens,
                max_output_tokens: a.max_output_tokens,
                max_requests: a.requests,
                seed: a.seed,
            };
            let reqs = mapping.requests(&trace)?;
            let desc = mapping.describe(&trace, reqs.len());
            (
                reqs,
                desc,
                Some(Arrival::Trace {
                    time_scale: a.time_scale,
                }),
            )
        }
        None => {
            let generator = SharedPrefixLoad {
                groups: a.groups,
                prefix_tokens: a.prefix_tokens,
                suffix_tokens: a.suffix_tokens,
                requests: a.requests.unwrap_or(64),
                popularity: match a.hot_set {
                    Some((groups_fraction, traffic_fraction)) => Popularity::HotSet {
                        groups_fraction,
                        traffic_fraction,
                    },
                    None => Popularity::Zipf(a.zipf),
                },
                output_tokens: a.output_tokens,
                seed: a.seed,
            };
            (generator.generate()?, generator.describe(), None)
        }
    };
    let arrival = match (a.rate, a.concurrency, default_arrival) {
        (Some(rate), _, _) => Arrival::Poisson { rate },
        (None, Some(concurrency), _) => Arrival::Closed { concurrency },
        (None, None, Some(d)) => d,
        (None, None, None) => bail!("give --rate (open loop) or --concurrency (closed loop)"),
    };
    hotprefix_sim::load::schedule(&mut requests, arrival, a.seed)?;
    // One thread is enough to drive a few hundred streams, and it leaves the cores to an
    // engine running on the same machine.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = rt.block_on(async {
        if a.wait_ready > 0.0 {
            hotprefix_sim::load::wait_ready(&target, positive_secs("--wait-ready", a.wait_ready)?)
                .await?;
        }
        let model = match &a.model {
            Some(m) => m.clone(),
            None => hotprefix_sim::load::served_model(&target, timeout)
                .await
                .context("asking the server for its model id (or pass --model)")?,
        };
        if a.warmup > 0 {
            let (len, max_tokens) = requests
                .first()
                .map_or((1, 1), |r| (r.prompt.len(), r.max_tokens));
            let started = std::time::Instant::now();
            let warm = hotprefix_sim::load::warmup_requests(a.warmup, len, max_tokens, a.seed);
            let warm_opts = ClientOptions {
                model: model.clone(),
                temperature: a.temperature,
                ignore_eos: true,
                timeout,
            };
            for (i, r) in warm.iter().enumerate() {
                let rec =
                    hotprefix_sim::load::send_request(&target, &warm_opts, i, r, started).await;
                // A failed warm-up is reported but not fatal: the measured run records its own
                // failures, which is where they belong.
                if let Some(e) = rec.error {
                    eprintln!("warning: warm-up request {i} failed: {e}");
                }
            }
            eprintln!(
                "warm-up: {} request(s) in {:.1} s",
                a.warmup,
                started.elapsed().as_secs_f64()
            );
        }
        let before = if a.server_metrics {
            scrape(&target).await
        } else {
            None
        };
        let opts = ClientOptions {
            model: model.clone(),
            temperature: a.temperature,
            ignore_eos: !a.allow_eos,
            timeout,
        };
        eprintln!(
            "load {}: {} requests, {}, {} on {}",
            a.label,
            requests.len(),
            arrival.describe(),
            model,
            a.url
        );
        let records = hotprefix_sim::load::run(
            &target,
            &opts,
            requests,
            &RunOptions {
                arrival,
                duration_limit,
            },
        )
        .await;
        let mut summary = hotprefix_sim::load::summarize(&a.label, &records);
        if let Some((d0, h0)) = before
            && let Some((d1, h1)) = scrape(&target).await
        {
            summary.server_device_hit_tokens = Some(d1 - d0);
            summary.server_host_hit_tokens = Some(h1 - h0);
        }
        anyhow::Ok(LoadReport {
            setup: LoadSetup {
                url: a.url.clone(),
                model,
                workload: workload.clone(),
                arrival: arrival.describe(),
                seed: a.seed,
            },
            summary,
            records,
        })
    })?;
    println!("{}; {}\n", report.setup.workload, report.setup.arrival);
    print!(
        "{}",
        hotprefix_sim::load::markdown_table(std::slice::from_ref(&report.summary))
    );
    if let (Some(d), Some(h)) = (
        report.summary.server_device_hit_tokens,
        report.summary.server_host_hit_tokens,
    ) {
        println!("\nserver prefix-cache hits: {d} tokens from device, {h} from host");
    }
    let failures: Vec<&str> = report
        .records
        .iter()
        .filter_map(|r| r.error.as_deref())
        .take(3)
        .collect();
    if !failures.is_empty() {
        eprintln!(
            "{} request(s) failed; first errors: {}",
            report.summary.failed,
            failures.join(" | ")
        );
    }
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &a.csv {
        let f = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = std::io::BufWriter::new(f);
        hotprefix_sim::load::write_records_csv(&mut w, &report.records)
            .and_then(|()| std::io::Write::flush(&mut w))
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The engine's hit tokens per tier, or `None` (with a warning) when /metrics cannot be read:
/// the per-tier split is a bonus, and its absence must not fail a run.
async fn scrape(target: &Target) -> Option<(f64, f64)> {
    match hotprefix_sim::load::server_hit_tokens(target, std::time::Duration::from_secs(10)).await {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("warning: cannot read /metrics: {e}");
            None
        }
    }
}

fn cmd_load_compare(a: &LoadArgs) -> Result<()> {
    let mut summaries = Vec::with_capacity(a.compare.len());
    for path in &a.compare {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let report: LoadReport = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a load result JSON file", path.display()))?;
        if summaries.is_empty() {
            println!("{}; {}\n", report.setup.workload, report.setup.arrival);
        }
        summaries.push(report.summary);
    }
    let baseline = match &a.baseline {
        Some(b) => b.clone(),
        None => summaries
            .first()
            .map(|s| s.label.clone())
            .unwrap_or_default(),
    };
    print!(
        "{}",
        hotprefix_sim::load::comparison_table(&summaries, &baseline)?
    );
    for s in &summaries {
        if let (Some(d), Some(h)) = (s.server_device_hit_tokens, s.server_host_hit_tokens) {
            println!(
                "\n{}: server prefix-cache hits {d} tokens from device, {h} from host",
                s.label
            );
        }
    }
    Ok(())
}

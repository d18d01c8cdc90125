//! Deterministic synthetic workload generators that produce Mooncake-style [`Trace`]s.
//!
//! # Block id scheme
//!
//! Generated traces use 512-token blocks ([`MOONCAKE_BLOCK_TOKENS`]) and ids drawn from one
//! counter that starts at 0, like the FAST'25 traces. An id stands for the whole token content
//! of a block *and everything before it*, so the rules are:
//!
//! * a block made only of shared tokens (for example a full block of a system prompt) gets the
//!   id allocated once for that shared content, so every prompt that starts with that content
//!   lists the same leading ids;
//! * a block that contains any token that is not shared, including a block that mixes the tail
//!   of a system prompt with the start of a question, gets a fresh id, and so does every block
//!   after it;
//! * the last block of a prompt may be partial; it still gets an id, so a request has
//!   `ceil(input_tokens / 512)` ids. When a later turn of a conversation fills that block with
//!   more tokens, its content changes and it gets a new id.
//!
//! # Determinism
//!
//! Every generator draws from one [`SmallRng`] seeded with its `seed`, in a fixed order, so the
//! same parameters and seed give the same trace (for a given `rand` version and pointer
//! width), and different seeds give different traces.

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::trace::{MOONCAKE_BLOCK_TOKENS, Trace, TraceRequest};

/// Upper bound on the requests one generator call may produce. It keeps a typo such as an
/// extra zero from allocating tens of gigabytes before failing.
pub const MAX_GENERATED_REQUESTS: u64 = 20_000_000;

/// A conversation ends before a turn whose prompt would exceed this many tokens, the context
/// window of the 128k-context models this project simulates; the first turn is always kept.
pub const SESSION_CONTEXT_LIMIT_TOKENS: u32 = 131_072;

/// Upper bound on the turns of one session, so that a huge `turns_mean` cannot loop for long.
pub const MAX_TURNS_PER_SESSION: u32 = 10_000;

/// Why a generator refused its parameters.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum GenError {
    /// A parameter is zero, negative, NaN or otherwise out of its range.
    #[error("{generator}: {field} must be {expected}, got {value}")]
    InvalidParameter {
        /// Which generator.
        generator: &'static str,
        /// The parameter's field name.
        field: &'static str,
        /// The allowed range, in words.
        expected: &'static str,
        /// The value given.
        value: String,
    },
    /// A prompt would be longer than a `u32` token count can describe.
    #[error("{generator}: prompts of up to {tokens} tokens do not fit in a u32 token count")]
    PromptTooLong {
        /// Which generator.
        generator: &'static str,
        /// The longest possible prompt.
        tokens: u64,
    },
    /// The parameters ask for more requests than [`MAX_GENERATED_REQUESTS`].
    #[error("{generator}: about {requests} requests requested, more than the limit of {max}")]
    TooManyRequests {
        /// Which generator.
        generator: &'static str,
        /// The (expected) number of requests.
        requests: u64,
        /// The limit.
        max: u64,
    },
}

/// The SGLang `bench_serving` "generated-shared-prefix" workload: `groups` system prompts,
/// each followed by `prompts_per_group` unique questions, all requests shuffled across groups
/// and sent as a Poisson process of rate `request_rate`.
///
/// The defaults are SGLang's defaults (64 groups of 16 prompts, 2048-token system prompt,
/// 128-token question, 256 output tokens) at 16 requests per second, seed 0.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratedSharedPrefix {
    /// Number of distinct system prompts.
    pub groups: u32,
    /// Questions per system prompt.
    pub prompts_per_group: u32,
    /// Length of every system prompt in tokens.
    pub system_prompt_tokens: u32,
    /// Length of every question in tokens.
    pub question_tokens: u32,
    /// Output length of every request in tokens.
    pub output_tokens: u32,
    /// Mean arrival rate in requests per second (Poisson arrivals).
    pub request_rate: f64,
    /// Seed of the random number generator.
    pub seed: u64,
}

impl Default for GeneratedSharedPrefix {
    fn default() -> Self {
        GeneratedSharedPrefix {
            groups: 64,
            prompts_per_group: 16,
            system_prompt_tokens: 2048,
            question_tokens: 128,
            output_tokens: 256,
            request_rate: 16.0,
            seed: 0,
        }
    }
}

const GSP: &str = "generated-shared-prefix";
const ZIPF: &str = "zipf-sessions";

impl GeneratedSharedPrefix {
    /// Generates the trace, named `generated-shared-prefix`.
    pub fn generate(&self) -> Result<Trace, GenError> {
        self.validate()?;
        let mut rng = SmallRng::seed_from_u64(self.seed);
        let mut ids = IdAllocator::default();
        let shared_blocks = self.system_prompt_tokens / MOONCAKE_BLOCK_TOKENS;
        // System prompt ids are allocated up front in group order, so that group g's ids do
        // not depend on the shuffle.
        let system_ids: Vec<Vec<u64>> = (0..self.groups)
            .map(|_| ids.fresh_n(shared_blocks as usize))
            .collect();
        let mut order: Vec<u32> = (0..self.groups)
            .flat_map(|g| std::iter::repeat_n(g, self.prompts_per_group as usize))
            .collect();
        order.shuffle(&mut rng);
        // validate() checked that the sum fits in u32.
        let input_tokens = self.system_prompt_tokens + self.question_tokens;
        let total_blocks = input_tokens.div_ceil(MOONCAKE_BLOCK_TOKENS) as usize;
        let mut arrival_s = 0.0;
        let mut requests = Vec::with_capacity(order.len());
        for (i, &group) in order.iter().enumerate() {
            if i > 0 {
                arrival_s += exponential(&mut rng, 1.0 / self.request_rate);
            }
            let mut blocks = Vec::with_capacity(total_blocks);
            blocks.extend_from_slice(&system_ids[group as usize]);
            blocks.extend(ids.fresh_n(total_blocks - blocks.len()));
            requests.push(TraceRequest {
                arrival_s,
                input_tokens,
                output_tokens: self.output_tokens,
                blocks,
            });
        }
        Ok(Trace {
            name: GSP.to_string(),
            block_tokens: MOONCAKE_BLOCK_TOKENS,
            requests,
        })
    }

    fn validate(&self) -> Result<(), GenError> {
        positive_count(GSP, "groups", self.groups)?;
        positive_count(GSP, "prompts_per_group", self.prompts_per_group)?;
        positive_count(GSP, "system_prompt_tokens", self.system_prompt_tokens)?;
        positive_count(GSP, "question_tokens", self.question_tokens)?;
        positive_count(GSP, "output_tokens", self.output_tokens)?;
        positive_rate(GSP, "request_rate", self.request_rate)?;
        let longest = u64::from(self.system_prompt_tokens) + u64::from(self.question_tokens);
        if longest > u64::from(u32::MAX) {
            return Err(GenError::PromptTooLong {
                generator: GSP,
                tokens: longest,
            });
        }
        let requests = u64::from(self.groups) * u64::from(self.prompts_per_group);
        if requests > MAX_GENERATED_REQUESTS {
            return Err(GenError::TooManyRequests {
                generator: GSP,
                requests,
                max: MAX_GENERATED_REQUESTS,
            });
        }
        Ok(())
    }
}

/// Multi-turn chat sessions over Zipf-popular system prompts whose popularity drifts.
///
/// * Sessions start as a Poisson process of rate `session_rate` (the first at 0 s).
/// * Each session picks one of `system_prompts` system prompts (all `system_prompt_tokens`
///   long) by popularity rank: rank `r` (0-based) has weight `1 / (r + 1)^zipf_s`, so
///   `zipf_s = 0` is uniform and larger values concentrate traffic on a few prompts.
/// * Drift: time is cut into epochs of `drift_period_s`. In epoch `e` the prompt at rank `r`
///   is prompt `(r - e) mod system_prompts`, so at every epoch boundary the coldest prompt
///   becomes the hottest and every other prompt moves down one rank. The popular set thus
///   changes over time, gradually rather than all at once, which rewards policies that adapt
///   and penalises ones that cling to old frequency counts. `f64::INFINITY` disables drift.
/// * A session has a geometric number of turns with mean `turns_mean` (at least 1, at most
///   [`MAX_TURNS_PER_SESSION`]); it also ends before a turn whose prompt would exceed
///   [`SESSION_CONTEXT_LIMIT_TOKENS`].
/// * Turn `k`'s prompt is the system prompt, then every earlier turn's user text and output,
///   then the new user text, so its block ids extend the previous turn's. Turns are separated
///   by exponential think times of mean `think_time_mean_s`, counted from the previous turn's
///   arrival (the trace is open-loop: it cannot know how long the response took).
/// * User turn and output lengths are drawn uniformly from `[m - m/2, m + m/2]` (integer
///   division) around their means `m`, which keeps the mean while giving the length variety of
///   real chats; system prompts have the fixed length.
///
/// The defaults (100 prompts, s = 1.0, 2000 sessions at 2 per second, 4 turns on average,
/// 2048-token system prompts, 256-token user turns and outputs, 30 s think time, drift every
/// 300 s, seed 0) give a trace of about 8000 requests whose sessions start over about 1000 s;
/// the last long sessions keep it running for several minutes more (about 1650 s at seed 0).
#[derive(Clone, Debug, PartialEq)]
pub struct ZipfSessions {
    /// Number of distinct system prompts.
    pub system_prompts: u32,
    /// Zipf exponent of system prompt popularity (0 = uniform).
    pub zipf_s: f64,
    /// Number of sessions.
    pub sessions: u32,
    /// Mean number of turns per session (geometric distribution, at least 1).
    pub turns_mean: f64,
    /// Length of every system prompt in tokens.
    pub system_prompt_tokens: u32,
    /// Mean length of a user turn in tokens.
    pub user_turn_tokens: u32,
    /// Mean output length in tokens.
    pub output_tokens: u32,
    /// Mean think time between turns of a session, in seconds.
    pub think_time_mean_s: f64,
    /// Mean session start rate per second (Poisson).
    pub session_rate: f64,
    /// Seconds between popularity rotations; `f64::INFINITY` for none.
    pub drift_period_s: f64,
    /// Seed of the random number generator.
    pub seed: u64,
}

impl Default for ZipfSessions {
    fn default() -> Self {
        ZipfSessions {
            system_prompts: 100,
            zipf_s: 1.0,
            sessions: 2000,
            turns_mean: 4.0,
            system_prompt_tokens: 2048,
            user_turn_tokens: 256,
            output_tokens: 256,
            think_time_mean_s: 30.0,
            session_rate: 2.0,
            drift_period_s: 300.0,
            seed: 0,
        }
    }
}

/// One generated turn together with where it came from: useful to check the workload's
/// structure and for consumers that want session identity (for example session-affinity
/// routing), which the Mooncake format itself does not carry.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionTurn {
    /// Session index, in order of session start.
    pub session: u32,
    /// 0-based turn number within the session.
    pub turn: u32,
    /// Index of the session's system prompt.
    pub prompt: u32,
    /// Drift epoch in which the session started (0 without drift).
    pub epoch: u64,
    /// The request of this turn.
    pub request: TraceRequest,
}

impl ZipfSessions {
    /// Generates the trace, named `zipf-sessions`.
    pub fn generate(&self) -> Result<Trace, GenError> {
        let turns = self.generate_turns()?;
        Ok(Trace {
            name: ZIPF.to_string(),
            block_tokens: MOONCAKE_BLOCK_TOKENS,
            requests: turns.into_iter().map(|t| t.request).collect(),
        })
    }

    /// Generates every turn of every session with its session metadata, sorted by arrival;
    /// [`ZipfSessions::generate`] returns the same requests as a trace.
    pub fn generate_turns(&self) -> Result<Vec<SessionTurn>, GenError> {
        self.validate()?;
        let mut rng = SmallRng::seed_from_u64(self.seed);
        let mut ids = IdAllocator::default();
        let block = u64::from(MOONCAKE_BLOCK_TOKENS);
        let shared_blocks = (self.system_prompt_tokens / MOONCAKE_BLOCK_TOKENS) as usize;
        let system_ids: Vec<Vec<u64>> = (0..self.system_prompts)
            .map(|_| ids.fresh_n(shared_blocks))
            .collect();
        let zipf = ZipfTable::new(self.system_prompts, self.zipf_s);
        let continue_p = 1.0 - 1.0 / self.turns_mean;
        let mut turns = Vec::new();
        let mut start_s = 0.0;
        for session in 0..self.sessions {
            if session > 0 {
                start_s += exponential(&mut rng, 1.0 / self.session_rate);
            }
            let epoch = epoch_at(start_s, self.drift_period_s);
            let rank = zipf.sample(&mut rng);
            let prompt = prompt_for_rank(rank, epoch, self.system_prompts);
            let turn_count = geometric_turns(&mut rng, continue_p);
            // The ids of the full blocks of the conversation so far, and its length; the
            // invariant is context_ids.len() == context_tokens / 512.
            let mut context_ids = system_ids[prompt as usize].clone();
            let mut context_tokens = u64::from(self.system_prompt_tokens);
            let mut arrival_s = start_s;
            for turn in 0..turn_count {
                if turn > 0 {
                    arrival_s += exponential(&mut rng, self.think_time_mean_s);
                }
                let user = around_mean(&mut rng, self.user_turn_tokens);
                let output = around_mean(&mut rng, self.output_tokens);
                let input = context_tokens + u64::from(user);
                if turn > 0 && input > u64::from(SESSION_CONTEXT_LIMIT_TOKENS) {
                    break;
                }
                // The first turn fits by validate(); later turns fit by the context limit.
                let Ok(input_tokens) = u32::try_from(input) else {
                    break;
                };
                let full_blocks = (input / block) as usize;
                let total_blocks = input.div_ceil(block) as usize;
                let mut blocks = Vec::with_capacity(total_blocks);
                blocks.extend_from_slice(&context_ids);
                for index in context_ids.len()..total_blocks {
                    let id = ids.fresh();
                    blocks.push(id);
                    // Full blocks of this prompt are also full blocks of every later turn's
                    // prompt; the trailing partial block is not, because the output fills it.
                    if index < full_blocks {
                        context_ids.push(id);
                    }
                }
                turns.push(SessionTurn {
                    session,
                    turn,
                    prompt,
                    epoch,
                    request: TraceRequest {
                        arrival_s,
                        input_tokens,
                        output_tokens: output,
                        blocks,
                    },
                });
                // The output completes the partial block (giving it new content, hence a new
                // id) and possibly more blocks, which the next turn's prompt will contain.
                context_tokens = input + u64::from(output);
                let context_blocks = (context_tokens / block) as usize;
                let grown = context_blocks.saturating_sub(context_ids.len());
                context_ids.extend(ids.fresh_n(grown));
            }
        }
        // Sessions overlap, so turns must be merged by arrival; the stable sort keeps session
        // order for simultaneous arrivals, keeping the output deterministic.
        turns.sort_by(|a, b| a.request.arrival_s.total_cmp(&b.request.arrival_s));
        Ok(turns)
    }

    fn validate(&self) -> Result<(), GenError> {
        positive_count(ZIPF, "system_prompts", self.system_prompts)?;
        positive_count(ZIPF, "sessions", self.sessions)?;
        positive_count(ZIPF, "system_prompt_tokens", self.system_prompt_tokens)?;
        positive_count(ZIPF, "user_turn_tokens", self.user_turn_tokens)?;
        positive_count(ZIPF, "output_tokens", self.output_tokens)?;
        if !(self.zipf_s.is_finite() && self.zipf_s >= 0.0) {
            return Err(invalid(ZIPF, "zipf_s", "finite and >= 0", self.zipf_s));
        }
        if !(self.turns_mean.is_finite() && self.turns_mean >= 1.0) {
            return Err(invalid(
                ZIPF,
                "turns_mean",
                "finite and >= 1",
                self.turns_mean,
            ));
        }
        positive_rate(ZIPF, "think_time_mean_s", self.think_time_mean_s)?;
        positive_rate(ZIPF, "session_rate", self.session_rate)?;
        // NaN is refused explicitly, and infinity is allowed on purpose (no drift).
        if self.drift_period_s.is_nan() || self.drift_period_s <= 0.0 {
            return Err(invalid(
                ZIPF,
                "drift_period_s",
                "positive (or infinite for no drift)",
                self.drift_period_s,
            ));
        }
        let longest_first =
            u64::from(self.system_prompt_tokens) + u64::from(max_around(self.user_turn_tokens));
        if longest_first > u64::from(u32::MAX) {
            return Err(GenError::PromptTooLong {
                generator: ZIPF,
                tokens: longest_first,
            });
        }
        let expected = f64::from(self.sessions) * self.turns_mean;
        if expected > MAX_GENERATED_REQUESTS as f64 {
            return Err(GenError::TooManyRequests {
                generator: ZIPF,
                requests: expected as u64,
                max: MAX_GENERATED_REQUESTS,
            });
        }
        Ok(())
    }
}

/// Hands out block ids from a counter, so that every fresh id is unique within a trace.
#[derive(Debug, Default)]
struct IdAllocator {
    next: u64,
}

impl IdAllocator {
    fn fresh(&mut self) -> u64 {
        let id = self.next;
        self.next += 1;
        id
    }

    fn fresh_n(&mut self, n: usize) -> Vec<u64> {
        (0..n).map(|_| self.fresh()).collect()
    }
}

/// Cumulative Zipf weights over ranks `0..n`, sampled by binary search.
#[derive(Debug)]
struct ZipfTable {
    cumulative: Vec<f64>,
}

impl ZipfTable {
    fn new(n: u32, s: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (0..n)
            .map(|r| {
                total += 1.0 / f64::from(r + 1).powf(s);
                total
            })
            .collect();
        ZipfTable { cumulative }
    }

    fn sample(&self, rng: &mut SmallRng) -> u32 {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let u = rng.random::<f64>() * total;
        let rank = self.cumulative.partition_point(|&c| c <= u);
        // Rounding can put u at the very top; clamp to the last rank.
        rank.min(self.cumulative.len().saturating_sub(1)) as u32
    }
}

/// The drift epoch that time `t` falls into (always 0 without drift).
fn epoch_at(t: f64, period: f64) -> u64 {
    if period.is_finite() {
        // The float-to-int cast saturates, which is fine for absurdly long traces.
        (t / period).floor() as u64
    } else {
        0
    }
}

/// The prompt that holds popularity rank `rank` in drift epoch `epoch`: each epoch shifts
/// every prompt down one rank and moves the coldest prompt to rank 0.
fn prompt_for_rank(rank: u32, epoch: u64, n: u32) -> u32 {
    let shift = (epoch % u64::from(n)) as u32;
    (rank + n - shift) % n
}

/// An exponential variate of the given mean, by inversion.
fn exponential(rng: &mut SmallRng, mean: f64) -> f64 {
    // 1 - u lies in (0, 1], so the logarithm is finite.
    let u: f64 = rng.random();
    -mean * (1.0 - u).ln()
}

/// A geometric number of turns on {1, 2, ...}: after each turn the session continues with
/// probability `continue_p`, which gives mean `1 / (1 - continue_p)`.
fn geometric_turns(rng: &mut SmallRng, continue_p: f64) -> u32 {
    if continue_p <= 0.0 {
        return 1;
    }
    // Inversion: P(T > k) = continue_p^k, so T = 1 + floor(ln(u) / ln(continue_p)).
    let u = 1.0 - rng.random::<f64>();
    let extra = (u.ln() / continue_p.ln()).floor();
    if extra >= f64::from(MAX_TURNS_PER_SESSION - 1) {
        MAX_TURNS_PER_SESSION
    } else {
        1 + extra as u32
    }
}

/// Largest value `around_mean` can return for mean `m`.
fn max_around(m: u32) -> u32 {
    m.saturating_add(m / 2)
}

/// A length drawn uniformly from `[m - m/2, m + m/2]`.
fn around_mean(rng: &mut SmallRng, m: u32) -> u32 {
    rng.random_range(m - m / 2..=max_around(m))
}

fn invalid(
    generator: &'static str,
    field: &'static str,
    expected: &'static str,
    value: impl ToString,
) -> GenError {
    GenError::InvalidParameter {
        generator,
        field,
        expected,
        value: value.to_string(),
    }
}

fn positive_count(
    generator: &'static str,
    field: &'static str,
    value: u32,
) -> Result<(), GenError> {
    if value == 0 {
        return Err(invalid(generator, field, "at least 1", value));
    }
    Ok(())
}

fn positive_rate(generator: &'static str, field: &'static str, value: f64) -> Result<(), GenError> {
    if !(value.is_finite() && value > 0.0) {
        return Err(invalid(generator, field, "positive and finite", value));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    fn small_gsp() -> GeneratedSharedPrefix {
        GeneratedSharedPrefix {
            groups: 8,
            prompts_per_group: 5,
            system_prompt_tokens: 1300,
            question_tokens: 200,
            output_tokens: 64,
            request_rate: 10.0,
            seed: 7,
        }
    }

    #[test]
    fn gsp_default_has_sglang_shape() {
        let trace = GeneratedSharedPrefix::default().generate().unwrap();
        assert_eq!(trace.requests.len(), 64 * 16);
        assert_eq!(trace.block_tokens, 512);
        assert_eq!(trace.requests[0].arrival_s, 0.0);
        for r in &trace.requests {
            assert_eq!(r.input_tokens, 2048 + 128);
            assert_eq!(r.output_tokens, 256);
            assert_eq!(r.blocks.len(), 5);
        }
        // The trace must be a valid Mooncake trace: write it and parse it back.
        let mut out = Vec::new();
        trace.write_jsonl(&mut out).unwrap();
        let back = Trace::parse("gsp", out.as_slice()).unwrap();
        assert_eq!(back.requests.len(), trace.requests.len());
        for (a, b) in back.requests.iter().zip(&trace.requests) {
            assert!((a.arrival_s - b.arrival_s).abs() < 1e-9);
            assert_eq!(a.blocks, b.blocks);
        }
    }

    #[test]
    fn gsp_prompts_share_exactly_the_full_system_blocks() {
        let gsp = small_gsp();
        let trace = gsp.generate().unwrap();
        let shared = (gsp.system_prompt_tokens / 512) as usize;
        assert_eq!(shared, 2);
        let mut by_group: HashMap<Vec<u64>, Vec<&TraceRequest>> = HashMap::new();
        for r in &trace.requests {
            assert_eq!(r.blocks.len(), 1500_usize.div_ceil(512));
            by_group
                .entry(r.blocks[..shared].to_vec())
                .or_default()
                .push(r);
        }
        assert_eq!(by_group.len(), 8);
        for members in by_group.values() {
            assert_eq!(members.len(), 5);
            // The block mixing the system prompt's tail with the question is unique.
            let third: HashSet<u64> = members.iter().map(|r| r.blocks[shared]).collect();
            assert_eq!(third.len(), 5);
        }
        // Every id past the shared prefix appears exactly once in the whole trace.
        let mut seen = HashSet::new();
        for r in &trace.requests {
            for &id in &r.blocks[shared..] {
                assert!(seen.insert(id), "id {id} reused");
            }
        }
    }

    #[test]
    fn gsp_shuffles_groups_and_uses_poisson_arrivals() {
        let gsp = GeneratedSharedPrefix {
            request_rate: 50.0,
            ..GeneratedSharedPrefix::default()
        };
        let trace = gsp.generate().unwrap();
        // Requests of one group must not come out in a block.
        let firsts: Vec<u64> = trace
            .requests
            .iter()
            .take(16)
            .map(|r| r.blocks[0])
            .collect();
        let distinct: HashSet<u64> = firsts.iter().copied().collect();
        assert!(distinct.len() > 4, "{firsts:?}");
        let mean_gap = trace.duration_s() / (trace.requests.len() - 1) as f64;
        assert!((mean_gap - 0.02).abs() < 0.004, "mean gap {mean_gap}");
        assert!(
            trace
                .requests
                .windows(2)
                .all(|w| w[0].arrival_s <= w[1].arrival_s)
        );
    }

    #[test]
    fn gsp_is_deterministic_under_seed() {
        let a = small_gsp().generate().unwrap();
        let b = small_gsp().generate().unwrap();
        assert_eq!(a, b);
        let c = GeneratedSharedPrefix {
            seed: 8,
            ..small_gsp()
        }
        .generate()
        .unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn gsp_rejects_bad_parameters() {
        let cases = [
            GeneratedSharedPrefix {
                groups: 0,
                ..small_gsp()
            },
            GeneratedSharedPrefix {
                question_tokens: 0,
                ..small_gsp()
            },
            GeneratedSharedPrefix {
                request_rate: f64::NAN,
                ..small_gsp()
            },
            GeneratedSharedPrefix {
                request_rate: -1.0,
                ..small_gsp()
            },
            GeneratedSharedPrefix {
                request_rate: 0.0,
                ..small_gsp()
            },
        ];
        for gsp in cases {
            let e = gsp.generate().unwrap_err();
            assert!(matches!(e, GenError::InvalidParameter { .. }), "{e}");
        }
        let e = GeneratedSharedPrefix {
            groups: 0,
            ..small_gsp()
        }
        .generate()
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "generated-shared-prefix: groups must be at least 1, got 0"
        );
        let e = GeneratedSharedPrefix {
            system_prompt_tokens: u32::MAX,
            ..small_gsp()
        }
        .generate()
        .unwrap_err();
        assert!(matches!(e, GenError::PromptTooLong { .. }));
        let e = GeneratedSharedPrefix {
            groups: 1_000_000,
            prompts_per_group: 1_000,
            ..small_gsp()
        }
        .generate()
        .unwrap_err();
        assert!(matches!(e, GenError::TooManyRequests { .. }));
    }

    fn small_zipf() -> ZipfSessions {
        ZipfSessions {
            system_prompts: 10,
            sessions: 300,
            seed: 3,
            ..ZipfSessions::default()
        }
    }

    #[test]
    fn zipf_default_is_sized_as_documented() {
        let trace = ZipfSessions::default().generate().unwrap();
        let n = trace.requests.len();
        assert!((6_500..9_500).contains(&n), "{n} requests");
        assert!(
            (900.0..2_500.0).contains(&trace.duration_s()),
            "{}",
            trace.duration_s()
        );
        assert!(
            trace
                .requests
                .windows(2)
                .all(|w| w[0].arrival_s <= w[1].arrival_s)
        );
        assert_eq!(trace.requests[0].arrival_s, 0.0);
        for r in &trace.requests {
            assert_eq!(r.blocks.len(), r.input_tokens.div_ceil(512) as usize);
            assert!((128..=384).contains(&r.output_tokens));
        }
    }

    #[test]
    fn zipf_turns_extend_the_previous_turn() {
        let z = small_zipf();
        let turns = z.generate_turns().unwrap();
        let mut sessions: HashMap<u32, Vec<&SessionTurn>> = HashMap::new();
        for t in &turns {
            sessions.entry(t.session).or_default().push(t);
        }
        let mut checked = 0;
        for list in sessions.values_mut() {
            list.sort_by_key(|t| t.turn);
            for (k, t) in list.iter().enumerate() {
                assert_eq!(t.turn as usize, k);
            }
            for pair in list.windows(2) {
                let (prev, next) = (&pair[0].request, &pair[1].request);
                // Turn k+1 starts with all full blocks of turn k's input plus output...
                let context = prev.input_tokens + prev.output_tokens;
                let full_context = (context / 512) as usize;
                assert!(next.input_tokens > context);
                assert!(next.blocks.len() >= full_context);
                // ...the full blocks of turn k's input are literally turn k's ids...
                let full_input = (prev.input_tokens / 512) as usize;
                assert_eq!(next.blocks[..full_input], prev.blocks[..full_input]);
                // ...and the block that was partial in turn k has new content, so a new id.
                if prev.input_tokens % 512 != 0 && full_input < next.blocks.len() {
                    assert!(!prev.blocks.contains(&next.blocks[full_input]));
                }
                assert!(next.arrival_s > prev.arrival_s);
                checked += 1;
            }
            // Turn k+2 shares turn k+1's context blocks that were born from turn k's output.
            for triple in list.windows(3) {
                let (mid, last) = (&triple[1].request, &triple[2].request);
                let full_mid = (mid.input_tokens / 512) as usize;
                assert_eq!(last.blocks[..full_mid], mid.blocks[..full_mid]);
            }
        }
        assert!(checked > 100, "only {checked} turn pairs");
    }

    #[test]
    fn zipf_sessions_with_the_same_prompt_share_its_full_blocks() {
        let z = ZipfSessions {
            system_prompt_tokens: 1800,
            ..small_zipf()
        };
        let turns = z.generate_turns().unwrap();
        let firsts: Vec<&SessionTurn> = turns.iter().filter(|t| t.turn == 0).collect();
        assert_eq!(firsts.len(), 300);
        let mut prefix_of: HashMap<u32, Vec<u64>> = HashMap::new();
        let mut fourth_ids = HashSet::new();
        for t in &firsts {
            let prefix = t.request.blocks[..3].to_vec();
            let known = prefix_of.entry(t.prompt).or_insert_with(|| prefix.clone());
            assert_eq!(*known, prefix);
            // The block mixing the system prompt's tail with user text is per session.
            assert!(fourth_ids.insert(t.request.blocks[3]));
        }
        let distinct: HashSet<Vec<u64>> = prefix_of.values().cloned().collect();
        assert_eq!(distinct.len(), prefix_of.len());
    }

    #[test]
    fn zipf_popularity_follows_rank_and_drifts() {
        let z = ZipfSessions {
            system_prompts: 10,
            zipf_s: 1.2,
            sessions: 4000,
            session_rate: 10.0,
            drift_period_s: 100.0,
            turns_mean: 1.0,
            ..ZipfSessions::default()
        };
        let turns = z.generate_turns().unwrap();
        let mut counts: HashMap<(u64, u32), u32> = HashMap::new();
        for t in &turns {
            *counts.entry((t.epoch, t.prompt)).or_default() += 1;
        }
        let top = |epoch: u64| {
            (0..10)
                .max_by_key(|&p| counts.get(&(epoch, p)).copied().unwrap_or(0))
                .unwrap()
        };
        // Epoch 0: prompt 0 is hottest; epoch 1: the formerly coldest prompt 9 takes over,
        // and prompt 0 is now second.
        assert_eq!(top(0), 0);
        assert_eq!(top(1), 9);
        assert_eq!(top(2), 8);
        let c = |e: u64, p: u32| counts.get(&(e, p)).copied().unwrap_or(0);
        assert!(c(1, 0) > c(1, 1), "{counts:?}");

        let still = ZipfSessions {
            drift_period_s: f64::INFINITY,
            ..z
        };
        let turns = still.generate_turns().unwrap();
        assert!(turns.iter().all(|t| t.epoch == 0));
        let zeros = turns.iter().filter(|t| t.prompt == 0).count();
        let nines = turns.iter().filter(|t| t.prompt == 9).count();
        assert!(zeros > 5 * nines, "{zeros} vs {nines}");
    }

    #[test]
    fn zipf_turn_count_has_the_requested_mean() {
        let z = ZipfSessions {
            sessions: 5000,
            turns_mean: 3.0,
            ..small_zipf()
        };
        let n = z.generate().unwrap().requests.len() as f64;
        assert!((n / 5000.0 - 3.0).abs() < 0.15, "{n}");
        let one = ZipfSessions {
            turns_mean: 1.0,
            ..small_zipf()
        };
        assert_eq!(one.generate().unwrap().requests.len(), 300);
    }

    #[test]
    fn zipf_sessions_stop_at_the_context_limit() {
        let z = ZipfSessions {
            sessions: 20,
            turns_mean: 500.0,
            user_turn_tokens: 2000,
            output_tokens: 2000,
            ..small_zipf()
        };
        let trace = z.generate().unwrap();
        assert!(
            trace
                .requests
                .iter()
                .all(|r| r.input_tokens <= SESSION_CONTEXT_LIMIT_TOKENS)
        );
        assert!(trace.requests.iter().any(|r| r.input_tokens > 100_000));
    }

    #[test]
    fn zipf_is_deterministic_under_seed() {
        let a = small_zipf().generate().unwrap();
        assert_eq!(a, small_zipf().generate().unwrap());
        let b = ZipfSessions {
            seed: 4,
            ..small_zipf()
        }
        .generate()
        .unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn zipf_rejects_bad_parameters() {
        let cases = [
            ZipfSessions {
                system_prompts: 0,
                ..small_zipf()
            },
            ZipfSessions {
                sessions: 0,
                ..small_zipf()
            },
            ZipfSessions {
                zipf_s: -0.5,
                ..small_zipf()
            },
            ZipfSessions {
                zipf_s: f64::NAN,
                ..small_zipf()
            },
            ZipfSessions {
                turns_mean: 0.5,
                ..small_zipf()
            },
            ZipfSessions {
                think_time_mean_s: 0.0,
                ..small_zipf()
            },
            ZipfSessions {
                session_rate: f64::INFINITY,
                ..small_zipf()
            },
            ZipfSessions {
                drift_period_s: 0.0,
                ..small_zipf()
            },
            ZipfSessions {
                drift_period_s: f64::NAN,
                ..small_zipf()
            },
            ZipfSessions {
                output_tokens: 0,
                ..small_zipf()
            },
        ];
        for z in cases {
            let e = z.generate().unwrap_err();
            assert!(matches!(e, GenError::InvalidParameter { .. }), "{e}");
        }
        let e = ZipfSessions {
            drift_period_s: -1.0,
            ..small_zipf()
        }
        .generate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("drift_period_s") && e.contains("-1"), "{e}");
    }

    #[test]
    fn prompt_rotation_moves_coldest_to_top() {
        assert_eq!(prompt_for_rank(0, 0, 5), 0);
        assert_eq!(prompt_for_rank(0, 1, 5), 4);
        assert_eq!(prompt_for_rank(1, 1, 5), 0);
        assert_eq!(prompt_for_rank(0, 5, 5), 0);
        assert_eq!(epoch_at(250.0, 100.0), 2);
        assert_eq!(epoch_at(1e9, f64::INFINITY), 0);
    }
}

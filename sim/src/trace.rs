//! Loading, validating, rescaling and writing Mooncake-format JSONL request traces.
//!
//! A Mooncake trace has one JSON object per line:
//! `{"timestamp": <ms>, "input_length": <tokens>, "output_length": <tokens>, "hash_ids": [..]}`.
//! `hash_ids` are prefix-chained identifiers of 512-token blocks: two requests whose prompts
//! agree on their first `k` blocks list the same first `k` ids, and the last id may stand for
//! a partial block. Unknown extra fields are ignored and blank lines are skipped, so that any
//! trace written in this format (not only the two FAST'25 files) can be replayed.
//!
//! # Validation rule
//!
//! Both FAST'25 traces satisfy `hash_ids.len() == ceil(input_length / 512)` on every line and
//! have non-decreasing integer timestamps starting at 0. The parser is deliberately a little
//! looser than that, so that hand-made or truncated traces still load, but it rejects lines
//! that cannot describe a real request:
//!
//! * `timestamp` must be a finite number (integer or float, in milliseconds);
//! * `input_length` must be a positive integer that fits in `u32`;
//! * `output_length` must be a non-negative integer that fits in `u32` (0 means a
//!   prefill-only request);
//! * `hash_ids` must be non-empty and hold at most `ceil(input_length / 512)` ids, because
//!   every listed block must contain at least one prompt token. Fewer ids are accepted: the
//!   prompt tokens past the listed blocks then simply have no cacheable identity.
//!
//! # Ordering
//!
//! Requests come out sorted by arrival. Out-of-order lines are not an error: a trace merged
//! from several sources is still a valid workload, so the parser stable-sorts by timestamp,
//! which keeps the file order of requests that arrive in the same millisecond. Arrivals are
//! then shifted so that the earliest request arrives at 0 s.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Tokens per hash block in the Mooncake traces.
pub const MOONCAKE_BLOCK_TOKENS: u32 = 512;

/// One request of a trace, with arrival time relative to the first request of its trace.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceRequest {
    /// Arrival time in seconds since the first request of the trace.
    pub arrival_s: f64,
    /// Prompt length in tokens.
    pub input_tokens: u32,
    /// Number of generated tokens.
    pub output_tokens: u32,
    /// Prefix-chained block ids of the prompt, one per `block_tokens` tokens (the last one may
    /// cover a partial block).
    pub blocks: Vec<u64>,
}

/// A whole request trace, sorted by arrival.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    /// Human-readable name, the file stem for a loaded trace.
    pub name: String,
    /// Tokens covered by one block id.
    pub block_tokens: u32,
    /// Requests in non-decreasing arrival order, the first arriving at or after 0 s.
    pub requests: Vec<TraceRequest>,
}

/// Summary numbers of a trace, useful for logging and for sanity-checking generators.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TraceStats {
    /// Number of requests.
    pub requests: u64,
    /// Time between the first and the last arrival.
    pub duration_s: f64,
    /// Sum of prompt tokens over all requests.
    pub input_tokens: u64,
    /// Sum of generated tokens over all requests.
    pub output_tokens: u64,
    /// Sum of block ids over all requests.
    pub blocks: u64,
    /// Number of distinct block ids.
    pub unique_blocks: u64,
    /// Fraction of block references whose id was already seen earlier in the trace, that is,
    /// the block hit ratio an infinitely large cache would reach.
    pub reuse_ratio: f64,
}

/// Why a trace could not be loaded or parsed.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The trace file could not be opened.
    #[error("cannot open trace {}: {source}", path.display())]
    Open {
        /// The file that failed to open.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// Reading a line failed (an I/O error or bytes that are not UTF-8).
    #[error("trace {name}: line {line}: cannot read: {source}")]
    Read {
        /// Trace name.
        name: String,
        /// 1-based line number.
        line: u64,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A line is not a JSON object of the expected shape: bad JSON, a missing field or a field
    /// of the wrong type or range.
    #[error("trace {name}: line {line}: {source}")]
    Json {
        /// Trace name.
        name: String,
        /// 1-based line number.
        line: u64,
        /// The serde_json error, which names the field and column.
        source: serde_json::Error,
    },
    /// A line is well-formed JSON but cannot describe a real request.
    #[error("trace {name}: line {line}: {problem}")]
    Invalid {
        /// Trace name.
        name: String,
        /// 1-based line number.
        line: u64,
        /// What is wrong with the line.
        problem: LineProblem,
    },
    /// The trace has no request at all.
    #[error("trace {name} contains no requests")]
    Empty {
        /// Trace name.
        name: String,
    },
}

/// What makes a syntactically valid line an impossible request.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum LineProblem {
    /// The timestamp is NaN or infinite.
    #[error("timestamp must be a finite number of milliseconds, got {0}")]
    NonFiniteTimestamp(f64),
    /// The prompt is empty or has a negative length.
    #[error("input_length must be positive, got {0}")]
    NonPositiveInput(i64),
    /// The output length is negative.
    #[error("output_length must not be negative, got {0}")]
    NegativeOutput(i64),
    /// A length does not fit in `u32`.
    #[error("{field} {value} is larger than {max}", max = u32::MAX)]
    TooLarge {
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: i64,
    },
    /// The request lists no block at all.
    #[error("hash_ids must not be empty")]
    EmptyHashIds,
    /// More blocks than the prompt can fill.
    #[error(
        "hash_ids has {got} ids but input_length {input} fills at most {max} blocks of \
         {MOONCAKE_BLOCK_TOKENS} tokens"
    )]
    TooManyHashIds {
        /// Number of ids on the line.
        got: usize,
        /// The line's input_length.
        input: u32,
        /// ceil(input_length / 512).
        max: u32,
    },
}

/// The raw shape of one JSONL line. Lengths are read as `i64` so that a negative value gets a
/// specific message instead of serde's generic "expected u32"; unknown fields are ignored.
#[derive(Deserialize)]
struct RawLine {
    timestamp: f64,
    input_length: i64,
    output_length: i64,
    hash_ids: Vec<u64>,
}

/// Number of `block_tokens`-sized blocks needed to hold `tokens` tokens.
pub fn blocks_for(tokens: u32, block_tokens: u32) -> u32 {
    tokens.div_ceil(block_tokens.max(1))
}

impl Trace {
    /// Loads a Mooncake JSONL trace from `path`; the trace is named after the file stem.
    pub fn load(path: &Path) -> Result<Trace, TraceError> {
        let file = std::fs::File::open(path).map_err(|source| TraceError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        // A large buffer matters here: the conversation trace is 3 MB in 12k lines, and the
        // default 8 KiB buffer would mean hundreds of small reads.
        Trace::parse(&name, std::io::BufReader::with_capacity(1 << 20, file))
    }

    /// Parses a Mooncake JSONL trace from `reader`, validating each line (see the module docs).
    pub fn parse(name: &str, mut reader: impl BufRead) -> Result<Trace, TraceError> {
        let mut requests = Vec::new();
        // Timestamps are kept in milliseconds until the end so that the shift to 0 and the
        // conversion to seconds happen once, with a single rounding.
        let mut stamps_ms: Vec<f64> = Vec::new();
        let mut buf = String::new();
        let mut line_no: u64 = 0;
        let mut sorted = true;
        loop {
            buf.clear();
            line_no += 1;
            let n = reader
                .read_line(&mut buf)
                .map_err(|source| TraceError::Read {
                    name: name.to_string(),
                    line: line_no,
                    source,
                })?;
            if n == 0 {
                break;
            }
            let text = buf.trim();
            if text.is_empty() {
                continue;
            }
            let raw: RawLine = serde_json::from_str(text).map_err(|source| TraceError::Json {
                name: name.to_string(),
                line: line_no,
                source,
            })?;
            let request = validate(&raw).map_err(|problem| TraceError::Invalid {
                name: name.to_string(),
                line: line_no,
                problem,
            })?;
            if stamps_ms.last().is_some_and(|&last| raw.timestamp < last) {
                sorted = false;
            }
            stamps_ms.push(raw.timestamp);
            requests.push(request);
        }
        if requests.is_empty() {
            return Err(TraceError::Empty {
                name: name.to_string(),
            });
        }
        if !sorted {
            // A stable sort keeps the file order of requests with equal timestamps, so that
            // the replay order is still fully determined by the file.
            let mut order: Vec<usize> = (0..requests.len()).collect();
            order.sort_by(|&a, &b| stamps_ms[a].total_cmp(&stamps_ms[b]));
            let mut slots: Vec<Option<TraceRequest>> = requests.into_iter().map(Some).collect();
            requests = order.iter().filter_map(|&i| slots[i].take()).collect();
            stamps_ms = order.iter().map(|&i| stamps_ms[i]).collect();
        }
        let first_ms = stamps_ms[0];
        for (request, ms) in requests.iter_mut().zip(&stamps_ms) {
            request.arrival_s = (ms - first_ms) / 1000.0;
        }
        Ok(Trace {
            name: name.to_string(),
            block_tokens: MOONCAKE_BLOCK_TOKENS,
            requests,
        })
    }

    /// Returns a copy whose arrivals are divided by `time_scale`: 2.0 replays the same
    /// requests twice as fast (twice the load), 0.5 half as fast.
    ///
    /// # Panics
    ///
    /// Panics if `time_scale` is not a positive finite number, because every caller obtains it
    /// from validated configuration and a silent fallback would hide a bug.
    pub fn scaled(&self, time_scale: f64) -> Trace {
        assert!(
            time_scale.is_finite() && time_scale > 0.0,
            "time_scale must be positive and finite, got {time_scale}"
        );
        Trace {
            name: self.name.clone(),
            block_tokens: self.block_tokens,
            requests: self
                .requests
                .iter()
                .map(|r| TraceRequest {
                    arrival_s: r.arrival_s / time_scale,
                    ..r.clone()
                })
                .collect(),
        }
    }

    /// A copy whose arrivals are each delayed by a uniform random amount in `[0, max_s)`, drawn
    /// from `seed`, and re-sorted. The Mooncake conversation trace's timestamps are rounded to
    /// whole seconds, which turns its arrivals into artificial bursts of up to 28 simultaneous
    /// requests; jitter within the rounding interval undoes that, and several seeds give
    /// independent replays to average over.
    pub fn jittered(&self, seed: u64, max_s: f64) -> Trace {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut requests: Vec<TraceRequest> = self
            .requests
            .iter()
            .map(|r| TraceRequest {
                arrival_s: r.arrival_s
                    + if max_s > 0.0 {
                        rng.random::<f64>() * max_s
                    } else {
                        0.0
                    },
                ..r.clone()
            })
            .collect();
        requests.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
        Trace {
            name: self.name.clone(),
            block_tokens: self.block_tokens,
            requests,
        }
    }

    /// Writes the trace in the Mooncake JSONL format with millisecond timestamps. Timestamps
    /// that are whole milliseconds (to within a nanosecond of rounding noise) are written as
    /// integers, as in the original traces; others keep their fractional part.
    pub fn write_jsonl(&self, mut w: impl Write) -> std::io::Result<()> {
        let mut line = String::new();
        for r in &self.requests {
            line.clear();
            let ms = r.arrival_s * 1000.0;
            let rounded = ms.round();
            let stamp = if (ms - rounded).abs() < 1e-6 && rounded.abs() < 9.0e15 {
                // The cast is exact: `rounded` is a whole number well inside i64's range.
                serde_json::Value::from(rounded as i64)
            } else {
                serde_json::Value::from(ms)
            };
            line.push_str("{\"timestamp\": ");
            line.push_str(&stamp.to_string());
            line.push_str(", \"input_length\": ");
            line.push_str(&r.input_tokens.to_string());
            line.push_str(", \"output_length\": ");
            line.push_str(&r.output_tokens.to_string());
            line.push_str(", \"hash_ids\": [");
            for (i, id) in r.blocks.iter().enumerate() {
                if i > 0 {
                    line.push_str(", ");
                }
                line.push_str(&id.to_string());
            }
            line.push_str("]}\n");
            w.write_all(line.as_bytes())?;
        }
        w.flush()
    }

    /// Time from the first to the last arrival, in seconds (0 for an empty trace).
    pub fn duration_s(&self) -> f64 {
        match (self.requests.first(), self.requests.last()) {
            (Some(first), Some(last)) => last.arrival_s - first.arrival_s,
            _ => 0.0,
        }
    }

    /// Computes summary numbers of the trace in one pass.
    pub fn stats(&self) -> TraceStats {
        let mut seen = std::collections::HashSet::new();
        let mut stats = TraceStats {
            requests: self.requests.len() as u64,
            duration_s: self.duration_s(),
            ..TraceStats::default()
        };
        let mut reused: u64 = 0;
        for r in &self.requests {
            stats.input_tokens += u64::from(r.input_tokens);
            stats.output_tokens += u64::from(r.output_tokens);
            stats.blocks += r.blocks.len() as u64;
            for &id in &r.blocks {
                if !seen.insert(id) {
                    reused += 1;
                }
            }
        }
        stats.unique_blocks = seen.len() as u64;
        stats.reuse_ratio = if stats.blocks == 0 {
            0.0
        } else {
            reused as f64 / stats.blocks as f64
        };
        stats
    }
}

/// Checks one parsed line against the module's validation rule.
fn validate(raw: &RawLine) -> Result<TraceRequest, LineProblem> {
    if !raw.timestamp.is_finite() {
        return Err(LineProblem::NonFiniteTimestamp(raw.timestamp));
    }
    if raw.input_length <= 0 {
        return Err(LineProblem::NonPositiveInput(raw.input_length));
    }
    if raw.output_length < 0 {
        return Err(LineProblem::NegativeOutput(raw.output_length));
    }
    let input_tokens = u32::try_from(raw.input_length).map_err(|_| LineProblem::TooLarge {
        field: "input_length",
        value: raw.input_length,
    })?;
    let output_tokens = u32::try_from(raw.output_length).map_err(|_| LineProblem::TooLarge {
        field: "output_length",
        value: raw.output_length,
    })?;
    if raw.hash_ids.is_empty() {
        return Err(LineProblem::EmptyHashIds);
    }
    let max = blocks_for(input_tokens, MOONCAKE_BLOCK_TOKENS);
    if raw.hash_ids.len() > max as usize {
        return Err(LineProblem::TooManyHashIds {
            got: raw.hash_ids.len(),
            input: input_tokens,
            max,
        });
    }
    Ok(TraceRequest {
        arrival_s: 0.0,
        input_tokens,
        output_tokens,
        blocks: raw.hash_ids.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONVERSATION: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/traces/mooncake_fast25_conversation_trace.jsonl"
    );
    const SYNTHETIC: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/traces/mooncake_fast25_synthetic_trace.jsonl"
    );

    fn parse_str(text: &str) -> Result<Trace, TraceError> {
        Trace::parse("t", text.as_bytes())
    }

    fn err_text(text: &str) -> String {
        match parse_str(text) {
            Ok(t) => panic!("expected an error, parsed {} requests", t.requests.len()),
            Err(e) => e.to_string(),
        }
    }

    fn check_real(path: &str, lines: usize) {
        let start = std::time::Instant::now();
        let trace = Trace::load(Path::new(path)).unwrap();
        let elapsed = start.elapsed();
        assert_eq!(trace.requests.len(), lines);
        assert_eq!(trace.block_tokens, 512);
        assert_eq!(trace.requests[0].arrival_s, 0.0);
        assert!(
            trace
                .requests
                .windows(2)
                .all(|w| w[0].arrival_s <= w[1].arrival_s)
        );
        for r in &trace.requests {
            assert_eq!(r.blocks.len() as u32, blocks_for(r.input_tokens, 512));
        }
        assert!(trace.duration_s() > 0.0);
        // Debug builds are an order of magnitude slower than release; this bound only
        // catches a pathological parser, the release target is well under 1 s.
        assert!(elapsed.as_secs_f64() < 10.0, "parsing took {elapsed:?}");
    }

    #[test]
    fn parses_conversation_trace() {
        check_real(CONVERSATION, 12031);
        let trace = Trace::load(Path::new(CONVERSATION)).unwrap();
        assert_eq!(trace.name, "mooncake_fast25_conversation_trace");
        assert_eq!(trace.requests[0].input_tokens, 6758);
        assert_eq!(trace.requests[0].output_tokens, 500);
        assert_eq!(trace.requests[0].blocks, (0..14).collect::<Vec<u64>>());
        // The last timestamp of the file is 3536999 ms.
        assert!((trace.duration_s() - 3536.999).abs() < 1e-9);
        let stats = trace.stats();
        assert_eq!(stats.requests, 12031);
        assert!(stats.reuse_ratio > 0.0 && stats.reuse_ratio < 1.0);
    }

    #[test]
    fn parses_synthetic_trace() {
        check_real(SYNTHETIC, 3993);
    }

    #[test]
    fn write_then_parse_round_trips() {
        let trace = Trace::load(Path::new(SYNTHETIC)).unwrap();
        let mut out = Vec::new();
        trace.write_jsonl(&mut out).unwrap();
        let back = Trace::parse(&trace.name, out.as_slice()).unwrap();
        assert_eq!(back, trace);
        // The written file keeps the original integer-millisecond format.
        let first_line = std::str::from_utf8(&out).unwrap().lines().next().unwrap();
        assert!(first_line.starts_with("{\"timestamp\": 0, \"input_length\": 40160,"));
    }

    #[test]
    fn fractional_timestamps_round_trip() {
        let trace = parse_str(
            "{\"timestamp\": 1.5, \"input_length\": 10, \"output_length\": 2, \"hash_ids\": [1]}\n\
             {\"timestamp\": 1002.25, \"input_length\": 10, \"output_length\": 2, \"hash_ids\": [1]}\n",
        )
        .unwrap();
        assert!((trace.requests[1].arrival_s - 1.00075).abs() < 1e-12);
        let mut out = Vec::new();
        trace.write_jsonl(&mut out).unwrap();
        let back = Trace::parse("t", out.as_slice()).unwrap();
        assert!((back.requests[1].arrival_s - 1.00075).abs() < 1e-12);
    }

    #[test]
    fn shifts_to_zero_and_ignores_extra_fields_and_blank_lines() {
        let trace = parse_str(
            "\n{\"timestamp\": 5000, \"input_length\": 600, \"output_length\": 1, \
             \"hash_ids\": [7, 8], \"extra\": {\"nested\": true}}\n\n\
             {\"timestamp\": 7500, \"input_length\": 512, \"output_length\": 0, \"hash_ids\": [7]}\n",
        )
        .unwrap();
        assert_eq!(trace.requests.len(), 2);
        assert_eq!(trace.requests[0].arrival_s, 0.0);
        assert_eq!(trace.requests[1].arrival_s, 2.5);
        assert_eq!(trace.requests[1].output_tokens, 0);
        assert_eq!(trace.duration_s(), 2.5);
    }

    #[test]
    fn out_of_order_lines_are_stable_sorted() {
        let trace = parse_str(
            "{\"timestamp\": 20, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [1]}\n\
             {\"timestamp\": 10, \"input_length\": 2, \"output_length\": 1, \"hash_ids\": [2]}\n\
             {\"timestamp\": 20, \"input_length\": 3, \"output_length\": 1, \"hash_ids\": [3]}\n\
             {\"timestamp\": 10, \"input_length\": 4, \"output_length\": 1, \"hash_ids\": [4]}\n",
        )
        .unwrap();
        let order: Vec<u32> = trace.requests.iter().map(|r| r.input_tokens).collect();
        assert_eq!(order, vec![2, 4, 1, 3]);
        let arrivals: Vec<f64> = trace.requests.iter().map(|r| r.arrival_s).collect();
        assert_eq!(arrivals, vec![0.0, 0.0, 0.01, 0.01]);
    }

    #[test]
    fn scaled_divides_arrivals() {
        let trace = parse_str(
            "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [1]}\n\
             {\"timestamp\": 4000, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [1]}\n",
        )
        .unwrap();
        let fast = trace.scaled(2.0);
        assert_eq!(fast.requests[1].arrival_s, 2.0);
        assert_eq!(fast.duration_s(), 2.0);
        assert_eq!(fast.requests[1].blocks, trace.requests[1].blocks);
        assert_eq!(trace.scaled(0.5).duration_s(), 8.0);
    }

    #[test]
    #[should_panic(expected = "time_scale")]
    fn scaled_rejects_zero() {
        let trace = parse_str(
            "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [1]}",
        )
        .unwrap();
        let _ = trace.scaled(0.0);
    }

    const GOOD: &str =
        "{\"timestamp\": 0, \"input_length\": 1000, \"output_length\": 5, \"hash_ids\": [1, 2]}\n";

    #[test]
    fn bad_json_reports_line() {
        let e = err_text(&format!(
            "{GOOD}\n{GOOD}{{\"timestamp\": 0, \"input_length\": 1,"
        ));
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn missing_field_reports_line_and_field() {
        let e = err_text(&format!(
            "{GOOD}{{\"timestamp\": 0, \"input_length\": 1, \"hash_ids\": [1]}}\n"
        ));
        assert!(e.contains("line 2") && e.contains("output_length"), "{e}");
    }

    #[test]
    fn wrong_type_reports_line() {
        let e = err_text(&format!(
            "{GOOD}{GOOD}{{\"timestamp\": \"soon\", \"input_length\": 1, \"output_length\": 1, \
             \"hash_ids\": [1]}}\n"
        ));
        assert!(e.contains("line 3") && e.contains("invalid type"), "{e}");
        let e = err_text(
            "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [-1]}",
        );
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn non_positive_input_reports_line() {
        let e = err_text(&format!(
            "{GOOD}{{\"timestamp\": 0, \"input_length\": 0, \"output_length\": 1, \"hash_ids\": [1]}}"
        ));
        assert!(
            e.contains("line 2") && e.contains("input_length must be positive"),
            "{e}"
        );
        let e = err_text(
            "{\"timestamp\": 0, \"input_length\": -5, \"output_length\": 1, \"hash_ids\": [1]}",
        );
        assert!(e.contains("line 1") && e.contains("-5"), "{e}");
    }

    #[test]
    fn negative_output_and_oversized_lengths_are_rejected() {
        let e = err_text(
            "{\"timestamp\": 0, \"input_length\": 5, \"output_length\": -1, \"hash_ids\": [1]}",
        );
        assert!(e.contains("line 1") && e.contains("output_length"), "{e}");
        let e = err_text(
            "{\"timestamp\": 0, \"input_length\": 5000000000, \"output_length\": 1, \
             \"hash_ids\": [1]}",
        );
        assert!(e.contains("line 1") && e.contains("larger than"), "{e}");
    }

    #[test]
    fn empty_or_too_many_hash_ids_are_rejected() {
        let e = err_text(&format!(
            "{GOOD}{{\"timestamp\": 0, \"input_length\": 5, \"output_length\": 1, \"hash_ids\": []}}"
        ));
        assert!(
            e.contains("line 2") && e.contains("hash_ids must not be empty"),
            "{e}"
        );
        let e = err_text(&format!(
            "{GOOD}{GOOD}{{\"timestamp\": 0, \"input_length\": 513, \"output_length\": 1, \
             \"hash_ids\": [1, 2, 3]}}"
        ));
        assert!(
            e.contains("line 3") && e.contains("at most 2 blocks"),
            "{e}"
        );
        // Fewer ids than blocks is accepted (see the module docs).
        let trace = parse_str(
            "{\"timestamp\": 0, \"input_length\": 2000, \"output_length\": 1, \"hash_ids\": [1]}",
        )
        .unwrap();
        assert_eq!(trace.requests[0].blocks, vec![1]);
    }

    #[test]
    fn non_finite_timestamp_is_rejected() {
        // JSON has no NaN literal, but an overflowing number parses to infinity in some
        // serde_json configurations; either way the line must be refused with its number.
        let e = err_text(&format!(
            "{GOOD}{{\"timestamp\": 1e400, \"input_length\": 5, \"output_length\": 1, \
             \"hash_ids\": [1]}}"
        ));
        assert!(e.contains("line 2"), "{e}");
        assert_eq!(
            validate(&RawLine {
                timestamp: f64::NAN,
                input_length: 1,
                output_length: 1,
                hash_ids: vec![1],
            })
            .map_err(|p| matches!(p, LineProblem::NonFiniteTimestamp(_))),
            Err(true)
        );
    }

    #[test]
    fn empty_input_is_an_error() {
        assert!(matches!(parse_str(""), Err(TraceError::Empty { .. })));
        assert!(matches!(parse_str("\n  \n"), Err(TraceError::Empty { .. })));
    }

    #[test]
    fn invalid_utf8_reports_line() {
        let mut bytes = GOOD.as_bytes().to_vec();
        bytes.extend_from_slice(&[0xff, 0xfe, b'\n']);
        let e = Trace::parse("t", bytes.as_slice()).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = Trace::load(Path::new("/nonexistent/x.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/x.jsonl"), "{e}");
    }

    #[test]
    fn jitter_is_bounded_deterministic_and_sorted() {
        let t = Trace::parse(
            "t",
            "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [1]}\n\
             {\"timestamp\": 0, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [2]}\n\
             {\"timestamp\": 1000, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [3]}\n"
                .as_bytes(),
        )
        .unwrap();
        let a = t.jittered(7, 1.0);
        assert_eq!(a, t.jittered(7, 1.0));
        assert_ne!(a, t.jittered(8, 1.0));
        assert!(
            a.requests
                .windows(2)
                .all(|w| w[0].arrival_s <= w[1].arrival_s)
        );
        for r in &a.requests {
            let orig = t.requests.iter().find(|o| o.blocks == r.blocks).unwrap();
            assert!(r.arrival_s >= orig.arrival_s && r.arrival_s < orig.arrival_s + 1.0);
        }
        assert_eq!(t.jittered(7, 0.0), t);
    }
}

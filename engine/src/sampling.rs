//! Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded; and stop
//! strings, including how much generated text is safe to stream before a stop string could
//! still be completing.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thiserror::Error;

/// How to pick tokens, as an OpenAI-style request asks.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy; otherwise logits are divided by it. OpenAI's range is [0, 2].
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// Seed for reproducible sampling (`None`: from the operating system).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            seed: None,
        }
    }
}

/// A sampling setting out of range; the message names the field, for a 400 response.
#[derive(Debug, Error, PartialEq)]
#[error("{field} {problem}")]
pub struct SamplingError {
    /// The request field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && (0.0..=2.0).contains(&self.temperature)) {
            return Err(SamplingError {
                field: "temperature",
                problem: format!("must be between 0 and 2, got {}", self.temperature),
            });
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError {
                field: "top_p",
                problem: format!("must be in (0, 1], got {}", self.top_p),
            });
        }
        if self.top_k == Some(0) {
            return Err(SamplingError {
                field: "top_k",
                problem: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// Picks tokens for one sequence.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SmallRng,
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler for validated `params`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => SmallRng::seed_from_u64(s),
            None => SmallRng::from_os_rng(),
        };
        Sampler {
            params,
            rng,
            scratch: Vec::new(),
        }
    }

    /// Whether this sampler always takes the largest logit (so the backend may compute the
    /// argmax itself and send only the token id).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0 || self.params.top_k == Some(1)
    }

    /// The next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if self.is_greedy() || logits.len() <= 1 {
            return crate::model::argmax(logits);
        }
        let c = &mut self.scratch;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (l / p.temperature, i as u32)),
        );
        // Most likely first (ties by token id, so the order is deterministic).
        let by_logit = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if let Some(k) = p.top_k
            && k < c.len()
        {
            c.select_nth_unstable_by(k - 1, by_logit);
            c.truncate(k);
        }
        c.sort_unstable_by(by_logit);
        let max = c[0].0;
        let mut total = 0.0;
        for e in c.iter_mut() {
            e.0 = (e.0 - max).exp();
            total += e.0;
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                acc += e.0 / total;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            total = c.iter().map(|e| e.0).sum();
        }
        let mut r = self.rng.random::<f32>() * total;
        for e in c.iter() {
            if r < e.0 {
                return e.1;
            }
            r -= e.0;
        }
        c[c.len() - 1].1
    }
}

/// Where the earliest of `stops` starts in `text`, if any.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// How much of `text` can be streamed now: everything except a tail that is the beginning of a
/// stop string (which the next tokens could complete). Always a char boundary.
pub fn streamable_len(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for (i, _) in s
            .char_indices()
            .skip(1)
            .chain(std::iter::once((s.len(), ' ')))
        {
            let prefix = &s[..i];
            if i > hold && i <= text.len() && text.ends_with(prefix) {
                hold = i;
            }
        }
    }
    let mut n = text.len() - hold.min(text.len());
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top_k_one_take_the_argmax() {
        let logits = [0.1, 2.0, 1.9, -3.0];
        assert_eq!(Sampler::new(SamplingParams::greedy()).sample(&logits), 1);
        let k1 = SamplingParams {
            top_k: Some(1),
            temperature: 1.5,
            ..Default::default()
        };
        assert_eq!(Sampler::new(k1).sample(&logits), 1);
        let tiny_p = SamplingParams {
            top_p: 1e-6,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(tiny_p);
        assert!((0..50).all(|_| s.sample(&logits) == 1));
    }

    #[test]
    fn sampling_follows_the_softmax_and_is_seeded() {
        // p(1) = 3 / (1 + 3) = 0.75 at temperature 1.
        let logits = [0.0, 3f32.ln()];
        let params = SamplingParams {
            seed: Some(7),
            ..Default::default()
        };
        let mut s = Sampler::new(params.clone());
        let n = 20_000;
        let ones = (0..n).filter(|_| s.sample(&logits) == 1).count();
        let f = ones as f64 / n as f64;
        assert!((f - 0.75).abs() < 0.015, "{f}");
        let a: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..100).map(|_| s.sample(&logits)).collect()
        };
        let mut s = Sampler::new(params);
        let b: Vec<u32> = (0..100).map(|_| s.sample(&logits)).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn top_k_and_top_p_never_pick_outside_their_set() {
        let logits: Vec<f32> = (0..50).map(|i| i as f32 * 0.1).collect();
        let mut s = Sampler::new(SamplingParams {
            top_k: Some(3),
            seed: Some(3),
            ..Default::default()
        });
        assert!((0..500).all(|_| s.sample(&logits) >= 47));
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.2,
            seed: Some(3),
            ..Default::default()
        });
        let picked: std::collections::BTreeSet<u32> =
            (0..2000).map(|_| s.sample(&logits)).collect();
        assert!(picked.iter().all(|&t| t >= 40), "{picked:?}");
    }

    #[test]
    fn out_of_range_settings_name_their_field() {
        let bad = |p: SamplingParams| p.validate().unwrap_err().field;
        assert_eq!(
            bad(SamplingParams {
                temperature: 2.5,
                ..Default::default()
            }),
            "temperature"
        );
        assert_eq!(
            bad(SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            }),
            "temperature"
        );
        assert_eq!(
            bad(SamplingParams {
                top_p: 0.0,
                ..Default::default()
            }),
            "top_p"
        );
        assert_eq!(
            bad(SamplingParams {
                top_k: Some(0),
                ..Default::default()
            }),
            "top_k"
        );
        assert!(SamplingParams::greedy().validate().is_ok());
    }

    #[test]
    fn stop_strings_cut_and_hold_back_partial_matches() {
        let stops = vec!["</s>".to_string(), "\n\nUser:".to_string()];
        assert_eq!(find_stop("Paris.</s>more", &stops), Some(6));
        assert_eq!(find_stop("Paris.", &stops), None);
        assert_eq!(streamable_len("Paris.</", &stops), 6);
        assert_eq!(streamable_len("Paris.\n\nUs", &stops), 6);
        assert_eq!(streamable_len("Paris.", &stops), 6);
        assert_eq!(streamable_len("", &stops), 0);
        let uni = vec!["é!".to_string()];
        assert_eq!(streamable_len("café", &uni), 3);
    }
}

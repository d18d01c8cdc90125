//! The decoder over the CPU backend against the dense reference: same logits within 1e-4 on
//! random and real weights, in both RoPE layouts, and exactly the same numbers for a sequence
//! however it is batched or split into steps.

#![allow(clippy::unwrap_used)]

mod common;

use hotprefix_cache::SlotId;
use hotprefix_engine::backend::cpu::CpuBackend;
use hotprefix_engine::backend::{Backend, KvLayout, SeqSpan, StepBatch};
use hotprefix_engine::decoder::Decoder;
use hotprefix_engine::model::{LlamaConfig, LlamaModel, RopeStyle};

const BS: usize = 16;

fn backend_for(cfg: &LlamaConfig, blocks: usize) -> CpuBackend {
    let mut b = CpuBackend::new();
    b.allocate_kv(
        cfg,
        KvLayout {
            block_size: BS,
            device_blocks: blocks,
            host_blocks: 4,
        },
    )
    .unwrap();
    b
}

/// Runs `tokens` of one sequence through the decoder in steps of the given sizes, blocks
/// `first_slot..`, and returns the logits after each step.
fn run_steps(
    d: &Decoder<CpuBackend>,
    b: &mut CpuBackend,
    tokens: &[u32],
    steps: &[usize],
    first_slot: u32,
) -> Vec<Vec<f32>> {
    let table: Vec<SlotId> = (0..tokens.len().div_ceil(BS) as u32)
        .map(|i| SlotId(first_slot + i))
        .collect();
    let mut start = 0;
    let mut out = Vec::new();
    for &n in steps {
        let batch = StepBatch {
            seqs: vec![SeqSpan {
                rows: 0..n,
                start,
                table: table.clone(),
            }],
            block_size: BS,
        };
        let mut l = d
            .step(b, &tokens[start..start + n], &batch, &[n - 1])
            .unwrap();
        out.push(l.remove(0));
        start += n;
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn reference_logits(m: &LlamaModel, tokens: &[u32]) -> Vec<f32> {
    m.forward(tokens, &mut m.new_kv())
}

#[test]
fn decoder_matches_the_dense_reference_in_both_rope_layouts() {
    for style in [RopeStyle::Interleaved, RopeStyle::HalfSplit] {
        let mut cfg = LlamaConfig::preset("tiny").unwrap();
        cfg.rope_style = style;
        let m = LlamaModel::random(cfg.clone(), 3);
        let tokens: Vec<u32> = (0..70).map(|i| (i * 53 % 512) as u32).collect();
        let want = reference_logits(&m, &tokens);
        let mut b = backend_for(&cfg, 8);
        let d = Decoder::new(m.clone(), &mut b).unwrap();
        let got = run_steps(&d, &mut b, &tokens, &[70], 0);
        assert!(max_diff(&got[0], &want) < 1e-4, "{style:?}");
        // Prefill in chunks then decode one token at a time: same numbers at every step.
        let steps = run_steps(&d, &mut b, &tokens, &[33, 17, 1, 1, 18], 0);
        for (i, end) in [33usize, 50, 51, 52, 70].iter().enumerate() {
            let want = reference_logits(&m, &tokens[..*end]);
            assert!(max_diff(&steps[i], &want) < 1e-4, "{style:?} step {i}");
        }
        assert_eq!(steps[4], got[0], "split into steps or not, bit-identical");
    }
}

#[test]
fn a_sequence_batched_with_others_gets_exactly_its_numbers_alone() {
    let cfg = LlamaConfig::preset("tiny").unwrap();
    let m = LlamaModel::random(cfg.clone(), 5);
    let mut b = backend_for(&cfg, 16);
    let d = Decoder::new(m, &mut b).unwrap();
    let a: Vec<u32> = (0..40).map(|i| (i * 7 % 512) as u32).collect();
    let c: Vec<u32> = (0..25).map(|i| (i * 11 % 512) as u32).collect();
    // Alone: prefill 39, then one decode token.
    let alone = run_steps(&d, &mut b, &a, &[39, 1], 0);
    // Together: `c`'s prefill in the same step as `a`'s decode token.
    run_steps(&d, &mut b, &a[..39], &[39], 0);
    let batch = StepBatch {
        seqs: vec![
            SeqSpan {
                rows: 0..25,
                start: 0,
                table: vec![SlotId(8), SlotId(9)],
            },
            SeqSpan {
                rows: 25..26,
                start: 39,
                table: vec![SlotId(0), SlotId(1), SlotId(2)],
            },
        ],
        block_size: BS,
    };
    let mut tokens = c.clone();
    tokens.push(a[39]);
    let l = d.step(&mut b, &tokens, &batch, &[24, 25]).unwrap();
    assert_eq!(l[1], alone[1], "batched decode is bit-identical to alone");
    let c_alone = run_steps(&d, &mut b, &c, &[25], 12);
    assert_eq!(l[0], c_alone[0]);
}

#[test]
fn decoder_matches_the_reference_on_the_default_model() {
    let loaded = common::load();
    let m = LlamaModel::from_gguf(&loaded.gguf).unwrap();
    let tokens = loaded.prompt("What is the capital of France?");
    let want = reference_logits(&m, &tokens);
    let mut b = backend_for(&m.cfg, 8);
    let d = Decoder::new(m, &mut b).unwrap();
    let got = run_steps(&d, &mut b, &tokens, &[tokens.len()], 0);
    let diff = max_diff(&got[0], &want);
    assert!(diff < 1e-4, "max |diff| {diff}");
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let cfg = LlamaConfig::preset("tiny").unwrap();
    let mut b = backend_for(&cfg, 2);
    let d = Decoder::new(LlamaModel::random(cfg, 1), &mut b).unwrap();
    let batch = |n: usize, blocks: u32| StepBatch {
        seqs: vec![SeqSpan {
            rows: 0..n,
            start: 0,
            table: (0..blocks).map(SlotId).collect(),
        }],
        block_size: BS,
    };
    // More tokens than the table covers, token count mismatch, token outside the vocabulary,
    // slot outside the pool.
    assert!(d.step(&mut b, &[1; 17], &batch(17, 1), &[16]).is_err());
    assert!(d.step(&mut b, &[1; 3], &batch(4, 1), &[2]).is_err());
    assert!(d.step(&mut b, &[9999], &batch(1, 1), &[0]).is_err());
    assert!(d.step(&mut b, &[1; 3], &batch(3, 5), &[2]).is_ok());
    let far = StepBatch {
        seqs: vec![SeqSpan {
            rows: 0..1,
            start: 0,
            table: vec![SlotId(7)],
        }],
        block_size: BS,
    };
    assert!(d.step(&mut b, &[1], &far, &[0]).is_err());
}

//! The default model, end to end on the dense reference path: chat template, tokenizer, forward
//! pass, greedy decoding.

// Helpers outside `#[test]` functions panic on purpose when something is wrong.
#![allow(clippy::unwrap_used)]

mod common;

use hotprefix_engine::model::{KvStore, LlamaModel, argmax};

#[test]
fn greedy_answer_to_the_capital_of_france_names_paris() {
    let m = common::load();
    let model = LlamaModel::from_gguf(&m.gguf).unwrap();
    let c = &model.cfg;
    assert_eq!((c.layers, c.hidden, c.heads, c.kv_heads), (30, 576, 9, 3));
    let ids = m.prompt("What is the capital of France?");
    let mut kv = model.new_kv();
    let mut logits = model.forward(&ids, &mut kv);
    let mut out = Vec::new();
    for _ in 0..16 {
        let next = argmax(&logits);
        if next == m.tok.eos() {
            break;
        }
        out.push(next);
        logits = model.forward(&[next], &mut kv);
    }
    let text = m.tok.decode(&out, true).unwrap();
    eprintln!("greedy answer: {text:?}");
    assert!(text.contains("Paris"), "answer: {text:?}");
    // Every prompt token and every generated token went through the model.
    assert_eq!(kv.len(), ids.len() + out.len());
}

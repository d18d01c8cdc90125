//! The default model, end to end on the dense reference path: chat template, tokenizer, forward
//! pass, greedy decoding.

// Helpers outside `#[test]` functions panic on purpose when something is wrong.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use hotprefix_engine::chat::{ChatMessage, ChatTemplate};
use hotprefix_engine::gguf::GgufFile;
use hotprefix_engine::model::{KvStore, LlamaModel, argmax};
use hotprefix_engine::tokenizer::Tokenizer;

fn model_path() -> PathBuf {
    std::env::var_os("HOTPREFIX_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
            ))
        })
}

#[test]
fn greedy_answer_to_the_capital_of_france_names_paris() {
    let path = model_path();
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        path.display()
    );
    let g = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let chat = ChatTemplate::new(
        g.meta_str("tokenizer.chat_template").unwrap(),
        "",
        "<|im_end|>",
    )
    .unwrap();
    let model = LlamaModel::from_gguf(&g).unwrap();
    assert_eq!(
        (
            model.cfg.layers,
            model.cfg.hidden,
            model.cfg.heads,
            model.cfg.kv_heads
        ),
        (30, 576, 9, 3)
    );
    let prompt = chat
        .render(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    let ids = tok.encode(&prompt).unwrap();
    let mut kv = model.new_kv();
    let mut logits = model.forward(&ids, &mut kv);
    let mut out = Vec::new();
    for _ in 0..16 {
        let next = argmax(&logits);
        if next == tok.eos() {
            break;
        }
        out.push(next);
        logits = model.forward(&[next], &mut kv);
    }
    let text = tok.decode(&out, true).unwrap();
    eprintln!("greedy answer: {text:?}");
    assert!(text.contains("Paris"), "answer: {text:?}");
    assert_eq!(
        kv.len(),
        ids.len() + out.len() - usize::from(out.len() == 16) + usize::from(out.len() == 16)
    );
}

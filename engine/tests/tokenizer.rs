//! The default model's tokenizer, built from its GGUF metadata: special tokens, the SmolLM
//! pre-tokenizer (digits one by one, then GPT-2 byte-level), and lossless round trips.

// Helpers outside `#[test]` functions panic on purpose when something is wrong.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::OnceLock;

use hotprefix_engine::gguf::GgufFile;
use hotprefix_engine::tokenizer::Tokenizer;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::from_gguf(&GgufFile::open(&common::model_path()).unwrap()).unwrap()
    })
}

#[test]
fn special_tokens_are_single_ids() {
    let t = tokenizer();
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(t.eos(), 2);
    let ids = t.encode("<|im_start|>user\nHi<|im_end|>").unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(t.decode(&ids, true).unwrap(), "user\nHi");
    assert_eq!(
        t.decode(&ids, false).unwrap(),
        "<|im_start|>user\nHi<|im_end|>"
    );
}

#[test]
fn words_carry_their_leading_space_and_digits_split() {
    let t = tokenizer();
    let ids = t.encode("Hello world").unwrap();
    let toks: Vec<String> = ids.iter().map(|&i| t.token(i).unwrap()).collect();
    assert_eq!(toks, ["Hello", "Ġworld"]);
    let ids = t.encode("year 2024").unwrap();
    let toks: Vec<String> = ids.iter().map(|&i| t.token(i).unwrap()).collect();
    assert_eq!(toks, ["year", "Ġ", "2", "0", "2", "4"]);
    // " the" is one merged token.
    assert_eq!(t.encode(" the").unwrap().len(), 1);
}

#[test]
fn text_round_trips_exactly() {
    let t = tokenizer();
    for text in [
        "What is the capital of France?",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\r\n",
        "unicode: héllo wörld, 日本語, emoji 🎉, math ∑∫",
        "code: fn main() { println!(\"{}\", 1 + 2); }",
        "",
    ] {
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), text, "{ids:?}");
    }
}

#[test]
fn the_model_chat_template_renders_chatml_with_its_default_system_prompt() {
    use hotprefix_engine::chat::{ChatMessage, ChatTemplate};
    let g = GgufFile::open(&common::model_path()).unwrap();
    let source = g.meta_str("tokenizer.chat_template").unwrap();
    let t = ChatTemplate::new(source, "<|im_start|>", "<|im_end|>").unwrap();
    let prompt = t
        .render(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\
         <|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    let ids = tokenizer().encode(&prompt).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(tokenizer().decode(&ids, false).unwrap(), prompt);
}

//! Shared by the engine's integration tests: where the default model is, and it loaded with its
//! tokenizer and chat template.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;

use hotprefix_engine::chat::{ChatMessage, ChatTemplate};
use hotprefix_engine::gguf::GgufFile;
use hotprefix_engine::tokenizer::Tokenizer;

/// The default model: `$HOTPREFIX_MODEL`, else where `scripts/fetch-model.sh` installs it.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("HOTPREFIX_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
            ))
        });
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        path.display()
    );
    path
}

/// The default model file with its tokenizer and chat template.
pub struct Loaded {
    /// The parsed file.
    pub gguf: GgufFile,
    /// Its tokenizer.
    pub tok: Tokenizer,
    /// Its chat template.
    pub chat: ChatTemplate,
}

/// Reads the default model.
pub fn load() -> Loaded {
    let gguf = GgufFile::open(&model_path()).expect("the default model parses");
    let tok = Tokenizer::from_gguf(&gguf).expect("its tokenizer builds");
    let chat = ChatTemplate::new(
        gguf.meta_str("tokenizer.chat_template")
            .expect("it has a chat template"),
        "",
        "<|im_end|>",
    )
    .expect("its chat template compiles");
    Loaded { gguf, tok, chat }
}

impl Loaded {
    /// Token ids of a one-question chat, ready for the answer.
    pub fn prompt(&self, question: &str) -> Vec<u32> {
        let text = self
            .chat
            .render(&[ChatMessage::new("user", question)], true)
            .expect("renders");
        self.tok.encode(&text).expect("encodes")
    }
}

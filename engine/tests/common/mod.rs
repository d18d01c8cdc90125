//! Shared by the engine's integration tests: where the default model is, and it loaded with its
//! tokenizer and chat template.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;

use clap::Parser;
use hotprefix_engine::chat::{ChatMessage, ChatTemplate};
use hotprefix_engine::config::{EngineArgs, EngineConfig};
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

/// Builds GGUF v3 files in memory, for tests that need files with known contents.
#[derive(Default)]
pub struct GgufWriter {
    kv: Vec<u8>,
    n_kv: u64,
    dir: Vec<u8>,
    data: Vec<u8>,
    n_tensors: u64,
}

impl GgufWriter {
    /// Appends a GGUF string (u64 length, bytes).
    pub fn string(buf: &mut Vec<u8>, s: &str) {
        buf.extend((s.len() as u64).to_le_bytes());
        buf.extend(s.as_bytes());
    }

    /// A metadata entry of GGUF value type `ty` with its encoded `value`.
    pub fn kv(&mut self, key: &str, ty: u32, value: &[u8]) -> &mut Self {
        Self::string(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
        self
    }

    /// A string metadata entry.
    pub fn kv_str(&mut self, key: &str, value: &str) -> &mut Self {
        let mut v = Vec::new();
        Self::string(&mut v, value);
        self.kv(key, 8, &v)
    }

    /// A u32 metadata entry.
    pub fn kv_u32(&mut self, key: &str, value: usize) -> &mut Self {
        self.kv(key, 4, &(value as u32).to_le_bytes())
    }

    /// An f32 metadata entry.
    pub fn kv_f32(&mut self, key: &str, value: f32) -> &mut Self {
        self.kv(key, 6, &value.to_le_bytes())
    }

    /// A tensor of ggml type `ty` with dimensions `dims` (fastest first, as GGUF lists them)
    /// and raw `data`, aligned to 32 bytes.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: &[u8]) -> &mut Self {
        Self::string(&mut self.dir, name);
        self.dir.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.dir.extend(d.to_le_bytes());
        }
        self.dir.extend(ty.to_le_bytes());
        while !self.data.len().is_multiple_of(32) {
            self.data.push(0);
        }
        self.dir.extend((self.data.len() as u64).to_le_bytes());
        self.data.extend(data);
        self.n_tensors += 1;
        self
    }

    /// An F32 tensor of `shape` (slowest first, as Hugging Face lists it).
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) -> &mut Self {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, &dims, 0, &data)
    }

    /// The file.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.dir);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(&self.data);
        out
    }
}

/// An engine configuration as the command line gives it, on the CPU with small caches (2,048
/// device and 4,096 host tokens), plus `extra` flags.
pub fn small_config(model: &str, extra: &[&str]) -> EngineConfig {
    let mut args = vec![
        "hotprefix-engine",
        "--model",
        model,
        "--backend",
        "cpu",
        "--device-cache-tokens",
        "2048",
        "--host-cache-tokens",
        "4096",
    ];
    args.extend_from_slice(extra);
    EngineArgs::try_parse_from(args)
        .expect("the test's flags parse")
        .validate()
        .expect("the test's flags are valid")
}

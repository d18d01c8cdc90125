//! Text to token ids and back, built from a GGUF file's `tokenizer.ggml.*` metadata with the
//! `tokenizers` crate, so the engine and (later) the router tokenise exactly alike.
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE: the vocabulary, the merges, and
//! the pre-tokenizer named by `tokenizer.ggml.pre`). Control and user-defined tokens (types 3
//! and 4) are special tokens: matched whole in the input, never split.

use thiserror::Error;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::gguf::{GgufFile, Value};

/// GGUF token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// Why a tokenizer could not be built or used.
#[derive(Debug, Error)]
pub enum TokenizerError {
    /// Metadata the tokenizer needs is missing or has the wrong type.
    #[error("GGUF tokenizer metadata: {0}")]
    Metadata(String),
    /// A tokenizer kind this engine does not implement.
    #[error("unsupported tokenizer {0:?} (supported: gpt2)")]
    Unsupported(String),
    /// The `tokenizers` crate refused the input.
    #[error("tokenizer: {0}")]
    Tokenizers(String),
}

/// A byte-level BPE tokenizer with the model's special tokens.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos: u32,
    bos: Option<u32>,
    vocab_size: usize,
}

fn strings<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, TokenizerError> {
    match g.metadata.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| TokenizerError::Metadata(format!("{key} holds a non-string")))
            })
            .collect(),
        _ => Err(TokenizerError::Metadata(format!(
            "{key} is missing or not an array"
        ))),
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let model = g.meta_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(TokenizerError::Unsupported(model.to_string()));
        }
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        let merges = strings(g, "tokenizer.ggml.merges")?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        if vocab.len() != tokens.len() {
            return Err(TokenizerError::Metadata(
                "duplicate tokens in the vocabulary".into(),
            ));
        }
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        TokenizerError::Metadata(format!("merge {m:?} is not two tokens"))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre: PreTokenizerWrapper = match g.meta_str("tokenizer.ggml.pre").unwrap_or("default") {
            // SmolLM's tokenizer.json: every digit on its own, then GPT-2's byte-level split.
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            "gpt2" | "default" => byte_level.into(),
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "pre-tokenizer {other}"
                )));
            }
        };
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let types: Vec<u64> = match g.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            _ => Vec::new(),
        };
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|&(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.to_string(), true))
            .collect();
        inner.add_special_tokens(&specials);
        let id = |key: &str| g.meta_u64(key).and_then(|v| u32::try_from(v).ok());
        let eos = id("tokenizer.ggml.eos_token_id").ok_or_else(|| {
            TokenizerError::Metadata("tokenizer.ggml.eos_token_id is missing".into())
        })?;
        let add_bos = matches!(
            g.metadata.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        let bos = if add_bos {
            id("tokenizer.ggml.bos_token_id")
        } else {
            None
        };
        Ok(Tokenizer {
            inner,
            eos,
            bos,
            vocab_size: tokens.len(),
        })
    }

    /// Token ids of `text`; special tokens written in the text are recognised. A BOS token is
    /// prepended when the model asks for one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        ids.extend(self.bos);
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }

    /// The token string of `id` (byte-level form, e.g. `Ġthe`).
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// End-of-sequence token id.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

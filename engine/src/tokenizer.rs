//! Text to token ids and back, built from a GGUF file's `tokenizer.ggml.*` metadata with the
//! `tokenizers` crate, so the engine and (later) the router tokenise exactly alike.
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE: the vocabulary, the merges, and
//! the pre-tokenizer named by `tokenizer.ggml.pre`). Control and user-defined tokens (types 3
//! and 4) are special tokens: matched whole in the input, never split.
//!
//! Two more sources: a Hugging Face `tokenizer.json` ([`Tokenizer::from_file`]), which the
//! `tokenizers` crate reads as it is, and a byte-level fallback for models without a tokenizer
//! of their own, the `random:` presets ([`Tokenizer::bytes`]).

use std::path::Path;

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

    /// Token ids of a rendered chat prompt. Templates usually print the BOS token themselves
    /// (Hugging Face tokenises their output without adding special tokens); the BOS is
    /// prepended only when the model wants one and the text did not start with it, so it is
    /// never doubled.
    pub fn encode_chat(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let Some(b) = self.bos
            && enc.get_ids().first() != Some(&b)
        {
            ids.push(b);
        }
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

/// Which token, if any, [`Tokenizer::encode`] puts before the text of a tokenizer read from a
/// Hugging Face `tokenizer.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddBos<'a> {
    /// No token.
    Never,
    /// This token (which must be in the vocabulary).
    Token(&'a str),
    /// The special token that `tokenizer.json`'s post-processor puts before a text, if it puts
    /// one: what Hugging Face's `encode` does by default, since a fast tokenizer implements
    /// `add_bos_token` with its post-processor.
    AsPostProcessor,
}

/// The special tokens of [`Tokenizer::bytes`], from id 256 on, as far as the vocabulary has
/// room: an end-of-text token (the EOS), then ChatML's markers, so that the default ChatML
/// template's turns are single tokens.
const BYTE_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the others take the
/// characters from U+0100 on, in byte order. The `ByteLevel` pre-tokenizer and decoder use the
/// same table, so a vocabulary of these 256 characters covers every byte.
fn byte_level_chars() -> Vec<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
                next += 1;
                c
            }
        })
        .collect()
}

impl Tokenizer {
    /// Reads a Hugging Face `tokenizer.json` (any model, normaliser, pre-tokenizer and decoder
    /// the `tokenizers` crate implements). `eos` is the end-of-sequence token's text; `bos`
    /// says what [`Tokenizer::encode`] prepends. Both must be in the vocabulary.
    pub fn from_file(path: &Path, eos: &str, bos: AddBos<'_>) -> Result<Tokenizer, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Tokenizers(format!("{}: {e}", path.display())))?;
        let id = |t: &str| {
            inner.token_to_id(t).ok_or_else(|| {
                TokenizerError::Tokenizers(format!(
                    "{}: token {t:?} is not in the vocabulary",
                    path.display()
                ))
            })
        };
        let eos = id(eos)?;
        let bos = match bos {
            AddBos::Never => None,
            AddBos::Token(t) => Some(id(t)?),
            AddBos::AsPostProcessor => {
                // Comparing an encoding with and without special tokens finds what the
                // post-processor adds, whatever form it takes (template, Roberta, ...).
                let ids = |special| {
                    inner
                        .encode("a", special)
                        .map(|e| e.get_ids().to_vec())
                        .map_err(|e| TokenizerError::Tokenizers(e.to_string()))
                };
                let (with, without) = (ids(true)?, ids(false)?);
                match with.split_first() {
                    Some((&first, rest))
                        if with.len() > without.len() && rest.starts_with(&without) =>
                    {
                        Some(first)
                    }
                    _ => None,
                }
            }
        };
        let vocab_size = inner.get_vocab_size(true);
        Ok(Tokenizer {
            inner,
            eos,
            bos,
            vocab_size,
        })
    }

    /// A byte-level tokenizer for models that have none (the `random:` presets): ids 0 to 255
    /// are the bytes, 256 is `<|endoftext|>` (the EOS), and 257 and 258 are `<|im_start|>`
    /// and `<|im_end|>` when `vocab_size` has room for them; higher ids decode to nothing.
    /// Every text round-trips, and any id sequence decodes (invalid UTF-8 becomes U+FFFD).
    /// `vocab_size` is the model's and must be at least 257.
    pub fn bytes(vocab_size: usize) -> Result<Tokenizer, TokenizerError> {
        if vocab_size < 257 {
            return Err(TokenizerError::Tokenizers(format!(
                "a byte-level tokenizer needs a vocabulary of at least 257 tokens, not {vocab_size}"
            )));
        }
        let specials: Vec<&str> = BYTE_SPECIALS
            .iter()
            .copied()
            .take(vocab_size - 256)
            .collect();
        let mut vocab: Vocab = byte_level_chars()
            .into_iter()
            .enumerate()
            .map(|(b, c)| (c.to_string(), b as u32))
            .collect();
        for (i, s) in specials.iter().enumerate() {
            vocab.insert(s.to_string(), 256 + i as u32);
        }
        // Without merges, BPE leaves every byte-level character a token of its own.
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .build()
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        // No regex split and no prefix space: the whole text is one pre-token of bytes.
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let added: Vec<AddedToken> = specials
            .iter()
            .map(|s| AddedToken::from(s.to_string(), true))
            .collect();
        inner.add_special_tokens(&added);
        Ok(Tokenizer {
            inner,
            eos: 256,
            bos: None,
            vocab_size,
        })
    }

    /// The id of the token whose text is `token` (a special token such as `<|im_end|>`, or a
    /// vocabulary entry in its byte-level form).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token [`Tokenizer::encode`] prepends, if any.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }
}

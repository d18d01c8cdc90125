//! Where a served model comes from: a GGUF file, a Hugging Face model directory, or
//! `random:<preset>` (random weights of a named shape, for tests and performance work), parsed
//! from the command line and loaded with its tokenizer, chat template and stop tokens; and the
//! `--chat-template` file that may replace the model's template, for engine and router alike.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;

use crate::chat::{CHATML_TEMPLATE, ChatError, ChatTemplate};
use crate::gguf::{GgufError, GgufFile};
use crate::hf::{self, HfConfig, HfError};
use crate::model::{LlamaConfig, LlamaModel, ModelError};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// The seed of every `random:<preset>` model, so that a preset always has the same weights.
pub const RANDOM_SEED: u64 = 42;

/// Special tokens that end a turn or a text in common chat formats (ChatML, Llama 3, GPT-2 and
/// Qwen2); those present in a model's vocabulary stop generation besides its EOS.
pub const STOP_TOKEN_TEXTS: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|eom_id|>",
];

/// A model named on the command line as `PATH`, `DIR` or `random:PRESET`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A `.gguf` file.
    Gguf(PathBuf),
    /// A Hugging Face model directory (with `config.json`, safetensors weights and
    /// `tokenizer.json`).
    HuggingFace(PathBuf),
    /// Random weights of the named [`LlamaConfig::preset`], seeded with [`RANDOM_SEED`], with
    /// the byte-level tokenizer and the ChatML template.
    Random(String),
}

/// Why a model source could not be parsed or loaded.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The path does not exist.
    #[error("model {0}: no such file or directory")]
    NotFound(PathBuf),
    /// A directory that is not a Hugging Face model.
    #[error("model {0}: a directory without config.json is not a Hugging Face model directory")]
    NoConfig(PathBuf),
    /// A file that is not GGUF.
    #[error("model {0}: expected a .gguf file, a Hugging Face model directory or random:PRESET")]
    NotAModel(PathBuf),
    /// `random:` with a preset that does not exist.
    #[error("model random:{name}: {reason}")]
    UnknownPreset {
        /// The preset asked for.
        name: String,
        /// The error, listing the valid presets.
        reason: String,
    },
    /// The GGUF file could not be read.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The model's shape or weights are unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The Hugging Face directory could not be loaded.
    #[error(transparent)]
    Hf(#[from] HfError),
    /// The tokenizer could not be built.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The chat template does not compile.
    #[error(transparent)]
    Chat(#[from] ChatError),
    /// A `--chat-template` file that cannot be used.
    #[error("chat template file {}: {reason}", path.display())]
    ChatTemplateFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer's ids do not fit the model.
    #[error("model {0}")]
    Mismatch(String),
}

impl FromStr for ModelSource {
    type Err = SourceError;

    /// `random:<preset>`, a path to a `.gguf` file, or a directory holding `config.json`.
    fn from_str(s: &str) -> Result<ModelSource, SourceError> {
        if let Some(name) = s.strip_prefix("random:") {
            return match LlamaConfig::preset(name) {
                Ok(_) => Ok(ModelSource::Random(name.to_string())),
                Err(e) => Err(SourceError::UnknownPreset {
                    name: name.to_string(),
                    reason: e.to_string(),
                }),
            };
        }
        let path = PathBuf::from(s);
        if path.is_dir() {
            if path.join("config.json").is_file() {
                Ok(ModelSource::HuggingFace(path))
            } else {
                Err(SourceError::NoConfig(path))
            }
        } else if path.is_file() {
            let gguf = path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
            if gguf {
                Ok(ModelSource::Gguf(path))
            } else {
                Err(SourceError::NotAModel(path))
            }
        } else {
            Err(SourceError::NotFound(path))
        }
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Gguf(p) | ModelSource::HuggingFace(p) => write!(f, "{}", p.display()),
            ModelSource::Random(name) => write!(f, "random:{name}"),
        }
    }
}

/// A model ready to serve.
#[derive(Debug)]
pub struct LoadedModel {
    /// The weights.
    pub model: LlamaModel,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template (ChatML when the model has none; [`apply_chat_template`] replaces it
    /// by a `--chat-template` file's).
    pub chat: ChatTemplate,
    /// The name it is served under: a GGUF file's name without `.gguf`, in lower case with
    /// dashes, a Hugging Face directory's name, or
    /// `random-<preset>`.
    pub id: String,
    /// Token ids that end generation: the EOS first, then the [`STOP_TOKEN_TEXTS`] in the
    /// vocabulary and a Hugging Face model's `eos_token_id`s; each below the model's vocabulary
    /// size, none twice.
    pub stop_tokens: Vec<u32>,
}

/// `name` in lower case, with every run of other characters than letters, digits, `.` and `_`
/// made one dash: `SmolLM2 135M Instruct` becomes `smollm2-135m-instruct`.
fn slug(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() || c == '.' || c == '_' {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// The last component of `path` (resolved, so that `.` names the directory itself).
fn file_name(path: &Path, strip_extension: bool) -> String {
    let resolved = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let name = if strip_extension {
        resolved.file_stem()
    } else {
        resolved.file_name()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string())
}

/// The stop tokens of a model with `tokenizer` and a vocabulary of `vocab` ids.
fn stop_tokens(tokenizer: &Tokenizer, extra: &[u32], vocab: usize) -> Vec<u32> {
    let mut stops = vec![tokenizer.eos()];
    let named = STOP_TOKEN_TEXTS
        .iter()
        .filter_map(|t| tokenizer.token_id(t));
    for id in named.chain(extra.iter().copied()) {
        if !stops.contains(&id) {
            stops.push(id);
        }
    }
    stops.retain(|&id| (id as usize) < vocab);
    stops
}

/// Checks that every id the tokenizer can produce is a row of the model's embeddings.
fn check_vocab(tokenizer: &Tokenizer, model: &LlamaModel) -> Result<(), SourceError> {
    if tokenizer.vocab_size() > model.cfg.vocab {
        return Err(SourceError::Mismatch(format!(
            "the tokenizer has {} tokens but the model's vocabulary only {}",
            tokenizer.vocab_size(),
            model.cfg.vocab
        )));
    }
    Ok(())
}

/// Loads the model, tokenizer and chat template `source` names.
pub fn load(source: &ModelSource) -> Result<LoadedModel, SourceError> {
    match source {
        ModelSource::Gguf(path) => load_gguf(path),
        ModelSource::HuggingFace(dir) => load_hf(dir),
        ModelSource::Random(name) => load_random(name),
    }
}

fn load_gguf(path: &Path) -> Result<LoadedModel, SourceError> {
    let g = GgufFile::open(path)?;
    let model = LlamaModel::from_gguf(&g)?;
    assemble(model, gguf_text(&g, path)?, &[])
}

/// The model with its text side, once the tokenizer is checked against the vocabulary; the
/// stop tokens are the EOS, the named stop texts and `extra_stops`.
fn assemble(
    model: LlamaModel,
    text: TextModel,
    extra_stops: &[u32],
) -> Result<LoadedModel, SourceError> {
    check_vocab(&text.tokenizer, &model)?;
    let stop_tokens = stop_tokens(&text.tokenizer, extra_stops, model.cfg.vocab);
    Ok(LoadedModel {
        model,
        tokenizer: text.tokenizer,
        chat: text.chat,
        id: text.id,
        stop_tokens,
    })
}

/// The tokenizer, chat template and id of a GGUF file (its header only).
fn gguf_text(g: &GgufFile, path: &Path) -> Result<TextModel, SourceError> {
    let tokenizer = Tokenizer::from_gguf(g)?;
    // Templates print the special tokens' text, which the file gives only as ids.
    let text = |id: Option<u64>| {
        id.and_then(|id| u32::try_from(id).ok())
            .and_then(|id| tokenizer.token(id))
            .unwrap_or_default()
    };
    let bos = text(g.meta_u64("tokenizer.ggml.bos_token_id"));
    let eos = text(Some(u64::from(tokenizer.eos())));
    let chat = own_template(g.meta_str("tokenizer.chat_template"), &bos, &eos)?;
    // The file name, not `general.name`: it names the variant (quantisation included), and
    // it is what users see on disk and pass on the command line.
    let id = Some(slug(&file_name(path, true)))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "model".to_string());
    Ok(TextModel {
        tokenizer,
        chat,
        id,
    })
}

fn load_hf(dir: &Path) -> Result<LoadedModel, SourceError> {
    let cfg = HfConfig::read(dir)?;
    let model = hf::model_from_weights(&cfg, &hf::Weights::open(dir)?)?;
    let text = hf_text(dir, &cfg)?;
    assemble(model, text, &cfg.eos_token_ids)
}

/// The tokenizer, chat template and id of a Hugging Face directory (no weights read).
fn hf_text(dir: &Path, cfg: &HfConfig) -> Result<TextModel, SourceError> {
    let t = hf::load_tokenizer(dir, cfg)?;
    let chat = own_template(
        t.chat_template.as_deref(),
        t.bos_token.as_deref().unwrap_or(""),
        &t.eos_token,
    )?;
    Ok(TextModel {
        tokenizer: t.tokenizer,
        chat,
        id: file_name(dir, false),
    })
}

fn load_random(name: &str) -> Result<LoadedModel, SourceError> {
    let cfg = random_config(name)?;
    let text = random_text(name, &cfg)?;
    assemble(LlamaModel::random(cfg, RANDOM_SEED), text, &[])
}

fn random_config(name: &str) -> Result<LlamaConfig, SourceError> {
    LlamaConfig::preset(name).map_err(|e| SourceError::UnknownPreset {
        name: name.to_string(),
        reason: e.to_string(),
    })
}

/// A random preset's byte-level tokenizer, ChatML and id.
fn random_text(name: &str, cfg: &LlamaConfig) -> Result<TextModel, SourceError> {
    let tokenizer = Tokenizer::bytes(cfg.vocab)?;
    let eos = tokenizer.token(tokenizer.eos()).unwrap_or_default();
    Ok(TextModel {
        chat: own_template(None, "", &eos)?,
        tokenizer,
        id: format!("random-{name}"),
    })
}

/// A model's own chat template `source`, or ChatML for a model without one, printing the
/// model's `bos` and `eos` token texts. ChatML itself prints neither, but a `--chat-template`
/// that replaces it ([`ChatTemplate::with_source`]) may.
fn own_template(source: Option<&str>, bos: &str, eos: &str) -> Result<ChatTemplate, SourceError> {
    Ok(ChatTemplate::new(
        source.unwrap_or(CHATML_TEMPLATE),
        bos,
        eos,
    )?)
}

/// What a model's requests are tokenized with, without its weights: what the router needs to
/// hash a request's blocks exactly as the engine serving that model does.
#[derive(Debug)]
pub struct TextModel {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template.
    pub chat: ChatTemplate,
    /// The id the engine serves the model under (and salts its block hashes with).
    pub id: String,
}

/// Loads the tokenizer, chat template and id of `source`, reading no weights (a GGUF file's
/// header only), with the same code [`load`] uses.
pub fn load_text(source: &ModelSource) -> Result<TextModel, SourceError> {
    match source {
        ModelSource::Gguf(path) => gguf_text(&GgufFile::open(path)?, path),
        ModelSource::HuggingFace(dir) => hf_text(dir, &HfConfig::read(dir)?),
        ModelSource::Random(name) => random_text(name, &random_config(name)?),
    }
}

/// The largest `--chat-template` file read: Hugging Face's longest templates (tool use,
/// several formats in one) are tens of KiB, and a file far beyond that is a wrong path (a model
/// file, say), not a template.
pub const MAX_CHAT_TEMPLATE_BYTES: u64 = 1 << 20;

/// A Jinja chat template read from a file (`--chat-template FILE`) to replace the model's
/// own: read once and compiled when the configuration is validated, so that a missing,
/// unreadable or broken file fails at start-up, and applied to the model by
/// [`apply_chat_template`].
#[derive(Clone, PartialEq, Eq)]
pub struct ChatTemplateFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// The template's source.
    pub source: String,
}

impl fmt::Debug for ChatTemplateFile {
    /// The path and the size: configuration dumps need not carry a whole template.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplateFile")
            .field("path", &self.path)
            .field("bytes", &self.source.len())
            .finish()
    }
}

impl ChatTemplateFile {
    /// Reads `path`: a regular file of at most [`MAX_CHAT_TEMPLATE_BYTES`] of UTF-8 text, not
    /// blank, that compiles as a template.
    pub fn read(path: &Path) -> Result<ChatTemplateFile, SourceError> {
        let bad = |reason: String| SourceError::ChatTemplateFile {
            path: path.to_path_buf(),
            reason,
        };
        // Checked before opening: opening a FIFO would block until something writes to it.
        // (The metadata follows symbolic links, as a mounted ConfigMap's files are.)
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        let mut bytes = Vec::new();
        file.take(MAX_CHAT_TEMPLATE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(e.to_string()))?;
        if bytes.len() as u64 > MAX_CHAT_TEMPLATE_BYTES {
            return Err(bad(format!(
                "larger than {MAX_CHAT_TEMPLATE_BYTES} bytes; is it a template?"
            )));
        }
        let source = String::from_utf8(bytes).map_err(|e| {
            bad(format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ))
        })?;
        if source.trim().is_empty() {
            return Err(bad("empty: a template must render the conversation".into()));
        }
        // Compiled here only to check it; the model's special tokens are not known yet.
        ChatTemplate::new(&source, "", "").map_err(|e| bad(e.to_string()))?;
        Ok(ChatTemplateFile {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Replaces `chat`, a model's template as [`load`] or [`load_text`] gave it, by `template`
/// when one is given, keeping the model's BOS and EOS texts; without one, `chat` stays. The
/// engine and the router both call this on the model they loaded, so a conversation renders
/// into the same prompt on both sides and its blocks get the same hashes.
pub fn apply_chat_template(
    chat: &mut ChatTemplate,
    template: Option<&ChatTemplateFile>,
) -> Result<(), SourceError> {
    if let Some(t) = template {
        *chat = chat
            .with_source(&t.source)
            .map_err(|e| SourceError::ChatTemplateFile {
                path: t.path.clone(),
                reason: e.to_string(),
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ChatMessage;

    #[test]
    fn an_override_replaces_the_template_and_keeps_the_models_special_tokens() {
        let mut text = load_text(&ModelSource::Random("tiny".into())).unwrap();
        let chat = [ChatMessage::new("user", "hi")];
        let own = text.chat.render(&chat, true).unwrap();
        assert_eq!(
            own,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        // No override: the model's template stays.
        apply_chat_template(&mut text.chat, None).unwrap();
        assert_eq!(text.chat.render(&chat, true).unwrap(), own);
        let file = ChatTemplateFile {
            path: "override.jinja".into(),
            source:
                "{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}{% endfor %}\
                     {% if add_generation_prompt %}assistant:{% endif %}"
                    .into(),
        };
        apply_chat_template(&mut text.chat, Some(&file)).unwrap();
        // The override renders, with the tokenizer's EOS text (the byte tokenizer's is
        // <|endoftext|>).
        assert_eq!(
            text.chat.render(&chat, true).unwrap(),
            "user: hi<|endoftext|>assistant:"
        );
        // A template that cannot compile is refused with its file named.
        let broken = ChatTemplateFile {
            path: "broken.jinja".into(),
            source: "{% if %}".into(),
        };
        let e = apply_chat_template(&mut text.chat, Some(&broken)).unwrap_err();
        assert!(e.to_string().contains("broken.jinja"), "{e}");
    }
}

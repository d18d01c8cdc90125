//! Hugging Face model directories: `config.json`, safetensors weights (`model.safetensors`, or
//! shards listed by `model.safetensors.index.json`), `tokenizer.json`, and the special tokens and
//! chat template of `tokenizer_config.json`.
//!
//! Supported architectures: `LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM`,
//! with weights in F32, F16 or BF16, converted to f32 at load. A Hugging Face weight is
//! `[out, in]`, row-major, which is exactly [`Matrix`]'s layout, so matrices are used as stored.
//! Hugging Face keeps the Q and K rows in the checkpoint's original order, so RoPE pairs
//! `(x[i], x[i + d/2])` of each head ([`RopeStyle::HalfSplit`]); GGUF llama files differ only
//! by a permutation of those rows (see the `hf` integration tests, which check the two agree).
//!
//! Settings this decoder does not implement are refused with [`HfError::Unsupported`] rather
//! than giving silently wrong output: `rope_scaling`, activations other than SiLU, and biases
//! other than the Q/K/V ones. A Mistral `sliding_window` (or a Qwen2 one with
//! `use_sliding_window`) caps [`LlamaConfig::context`] at the window: the decoder attends to the
//! whole context, which is exactly what sliding-window attention computes while the context is
//! no longer than the window.
//!
//! Safetensors layout: an 8-byte little-endian header length `N`, `N` bytes of JSON mapping
//! each tensor name to `{dtype, shape, data_offsets: [begin, end]}` (plus an optional
//! `__metadata__` entry), then the data, with offsets relative to its start. Every length,
//! offset and shape is checked against the file and the config before anything is allocated
//! for it, so a truncated or hostile file yields an [`HfError`], never a panic or a huge
//! allocation. Tensors are read one at a time with seek and `read_exact` (memory mapping would
//! need `unsafe`), so the peak memory is the f32 model plus one read buffer.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::Value;
use thiserror::Error;

use crate::gguf::f16_to_f32;
use crate::model::{Layer, LlamaConfig, LlamaModel, Matrix, ModelError, RopeStyle};
use crate::tokenizer::{AddBos, Tokenizer, TokenizerError};

/// The largest safetensors header accepted (the limit of the `safetensors` library itself).
const MAX_HEADER: u64 = 100_000_000;
/// The largest JSON side file (config, tokenizer config, index) read, far above real ones.
const MAX_JSON: u64 = 64 << 20;
/// Bytes read at a time when converting a tensor, so no second copy of a whole tensor exists.
const READ_CHUNK: usize = 1 << 20;

/// Why a Hugging Face model directory could not be loaded.
#[derive(Debug, Error)]
pub enum HfError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file does not parse.
    #[error("{path} is not valid JSON: {source}")]
    Json {
        /// The file.
        path: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// `config.json` lacks a field or has an unusable value.
    #[error("config.json: {0}")]
    Config(String),
    /// A model feature this engine does not implement.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A safetensors file (or the shard index) is malformed.
    #[error("malformed safetensors file {path}: {msg}")]
    Safetensors {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// The directory has no weights in a supported form.
    #[error(
        "no weights in {0}: expected model.safetensors or model.safetensors.index.json \
         (PyTorch .bin checkpoints are not supported)"
    )]
    NoWeights(String),
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor {0:?} is missing from the checkpoint")]
    MissingTensor(String),
    /// A tensor's shape does not match the config.
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?} from config.json")]
    Shape {
        /// The tensor.
        name: String,
        /// Its shape in the file.
        found: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor's element type cannot be converted.
    #[error("tensor {name:?} has dtype {dtype}, which is not supported (F32, F16 and BF16 are)")]
    Dtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// `tokenizer_config.json` lacks what the tokenizer or chat template needs.
    #[error("tokenizer_config.json: {0}")]
    TokenizerConfig(String),
    /// The assembled model is inconsistent.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer could not be built.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> HfError + '_ {
    move |source| HfError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads and parses a JSON file of reasonable size.
fn read_json(path: &Path) -> Result<Value, HfError> {
    let file = File::open(path).map_err(io_error(path))?;
    let len = file.metadata().map_err(io_error(path))?.len();
    if len > MAX_JSON {
        return Err(HfError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(format!("{len} bytes is too large for a JSON file")),
        });
    }
    let mut text = String::new();
    (&file).read_to_string(&mut text).map_err(io_error(path))?;
    serde_json::from_str(&text).map_err(|source| HfError::Json {
        path: path.display().to_string(),
        source,
    })
}

/// A model architecture this loader knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (Llama 2 and 3, SmolLM, TinyLlama, ...).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (Qwen2 and Qwen2.5): Q, K and V projections have biases.
    Qwen2,
}

impl Architecture {
    fn from_class(name: &str) -> Option<Architecture> {
        match name {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            _ => None,
        }
    }

    fn from_model_type(name: &str) -> Option<Architecture> {
        match name {
            "llama" => Some(Architecture::Llama),
            "mistral" => Some(Architecture::Mistral),
            "qwen2" => Some(Architecture::Qwen2),
            _ => None,
        }
    }

    /// `max_position_embeddings` when `config.json` omits it: the `transformers` default of
    /// each config class.
    fn default_context(self) -> usize {
        match self {
            Architecture::Llama => 2048,
            Architecture::Mistral => 4096 * 32,
            Architecture::Qwen2 => 32_768,
        }
    }
}

/// What `config.json` (and `generation_config.json`) say about a model.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    /// The architecture.
    pub arch: Architecture,
    /// The decoder's shape, with [`RopeStyle::HalfSplit`].
    pub llama: LlamaConfig,
    /// Whether the output head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// End-of-sequence ids named by `eos_token_id` in `config.json` and
    /// `generation_config.json` (each may be a number or a list): the tokens generation stops at.
    pub eos_token_ids: Vec<u32>,
}

/// A non-negative integer field; `None` when absent or null.
fn opt_usize(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<usize>, HfError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| HfError::Config(format!("{key} is {v}, not a non-negative integer"))),
    }
}

fn req_usize(obj: &serde_json::Map<String, Value>, key: &str) -> Result<usize, HfError> {
    opt_usize(obj, key)?.ok_or_else(|| HfError::Config(format!("{key} is missing")))
}

fn opt_f64(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<f64>, HfError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| HfError::Config(format!("{key} is {v}, not a number"))),
    }
}

/// Token ids from an `eos_token_id` value: a number, a list of numbers, or null.
fn token_ids(v: Option<&Value>) -> Vec<u32> {
    let id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match v {
        Some(Value::Array(items)) => items.iter().filter_map(id).collect(),
        Some(v) => id(v).into_iter().collect(),
        None => Vec::new(),
    }
}

impl HfConfig {
    /// Parses the text of a `config.json`.
    pub fn parse(json: &str) -> Result<HfConfig, HfError> {
        let v: Value = serde_json::from_str(json).map_err(|source| HfError::Json {
            path: "config.json".into(),
            source,
        })?;
        HfConfig::from_value(&v)
    }

    /// Reads `dir/config.json`, and the stop tokens of `dir/generation_config.json` when it
    /// exists.
    pub fn read(dir: &Path) -> Result<HfConfig, HfError> {
        let mut cfg = HfConfig::from_value(&read_json(&dir.join("config.json"))?)?;
        let generation = dir.join("generation_config.json");
        if generation.is_file() {
            let g = read_json(&generation)?;
            for id in token_ids(g.get("eos_token_id")) {
                if !cfg.eos_token_ids.contains(&id) {
                    cfg.eos_token_ids.push(id);
                }
            }
        }
        Ok(cfg)
    }

    fn from_value(v: &Value) -> Result<HfConfig, HfError> {
        let obj = v
            .as_object()
            .ok_or_else(|| HfError::Config("not a JSON object".into()))?;
        let classes: Vec<&str> = obj
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let model_type = obj.get("model_type").and_then(Value::as_str);
        let arch = classes
            .iter()
            .find_map(|c| Architecture::from_class(c))
            .or_else(|| model_type.and_then(Architecture::from_model_type))
            .ok_or_else(|| {
                HfError::Unsupported(format!(
                    "architectures {classes:?} (model_type {model_type:?}); supported are \
                     LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM"
                ))
            })?;
        if let Some(scaling) = obj.get("rope_scaling").filter(|s| !s.is_null()) {
            return Err(HfError::Unsupported(format!(
                "rope_scaling {scaling} (only plain RoPE is implemented)"
            )));
        }
        for key in ["hidden_act", "hidden_activation"] {
            if let Some(act) = obj.get(key).filter(|a| !a.is_null())
                && act.as_str() != Some("silu")
            {
                return Err(HfError::Unsupported(format!(
                    "{key} {act} (only silu is implemented)"
                )));
            }
        }
        for key in ["mlp_bias", "attention_bias"] {
            // Llama's `attention_bias` adds an output-projection bias too, which this decoder
            // does not have; Qwen2's Q/K/V biases are implied by its architecture instead.
            if obj.get(key).and_then(Value::as_bool) == Some(true) && arch != Architecture::Qwen2 {
                return Err(HfError::Unsupported(format!("{key} is true")));
            }
        }
        let hidden = req_usize(obj, "hidden_size")?;
        let heads = req_usize(obj, "num_attention_heads")?;
        let kv_heads = opt_usize(obj, "num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match opt_usize(obj, "head_dim")? {
            Some(d) => d,
            None if heads > 0 && hidden.is_multiple_of(heads) => hidden / heads,
            None => {
                return Err(HfError::Config(format!(
                    "hidden_size {hidden} is not a multiple of num_attention_heads {heads} \
                     and head_dim is not given"
                )));
            }
        };
        let mut context =
            opt_usize(obj, "max_position_embeddings")?.unwrap_or(arch.default_context());
        // With a context no longer than the window, sliding-window attention sees every
        // earlier position, so the dense decoder's full attention is exact.
        let window = match arch {
            Architecture::Mistral => opt_usize(obj, "sliding_window")?,
            Architecture::Qwen2
                if obj.get("use_sliding_window").and_then(Value::as_bool) == Some(true) =>
            {
                opt_usize(obj, "sliding_window")?
            }
            _ => None,
        };
        if let Some(w) = window.filter(|&w| w > 0) {
            context = context.min(w);
        }
        let llama = LlamaConfig {
            layers: req_usize(obj, "num_hidden_layers")?,
            hidden,
            heads,
            kv_heads,
            head_dim,
            ffn: req_usize(obj, "intermediate_size")?,
            vocab: req_usize(obj, "vocab_size")?,
            rope_base: opt_f64(obj, "rope_theta")?.unwrap_or(10_000.0) as f32,
            eps: opt_f64(obj, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            context,
            rope_style: RopeStyle::HalfSplit,
        };
        llama.validate()?;
        if heads.checked_mul(head_dim).is_none() {
            return Err(HfError::Config(format!(
                "{heads} heads of {head_dim} overflow"
            )));
        }
        let tie_word_embeddings = obj
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(HfConfig {
            arch,
            llama,
            tie_word_embeddings,
            eos_token_ids: token_ids(obj.get("eos_token_id")),
        })
    }
}

/// A safetensors element type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Any other type (readable directory entry, no conversion).
    Other(String),
}

impl Dtype {
    fn parse(s: &str) -> Dtype {
        match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            other => Dtype::Other(other.to_string()),
        }
    }

    /// Bytes per element, for the types the safetensors format defines.
    fn width(&self) -> Option<u64> {
        match self {
            Dtype::F32 => Some(4),
            Dtype::F16 | Dtype::BF16 => Some(2),
            Dtype::Other(s) => match s.as_str() {
                "F64" | "I64" | "U64" => Some(8),
                "I32" | "U32" => Some(4),
                "I16" | "U16" => Some(2),
                "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => Some(1),
                _ => None,
            },
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dtype::Other(s) => f.write_str(s),
            t => write!(f, "{t:?}"),
        }
    }
}

/// One tensor of a safetensors file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, slowest-varying first (a matrix is `[rows, cols]`).
    pub shape: Vec<usize>,
    /// Where the data starts, from the start of the file.
    pub start: u64,
    /// Bytes of data.
    pub len: u64,
}

/// A safetensors file: its checked tensor directory, and the open file to read tensors from.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    tensors: BTreeMap<String, TensorInfo>,
}

/// Checks one header entry against the data section (`data_len` bytes from `data_start`).
fn parse_entry(entry: &Value, data_start: u64, data_len: u64) -> Result<TensorInfo, String> {
    let obj = entry.as_object().ok_or("the entry is not an object")?;
    let dtype = obj
        .get("dtype")
        .and_then(Value::as_str)
        .map(Dtype::parse)
        .ok_or("dtype is missing or not a string")?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or("shape is missing or not a list")?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or("shape holds something other than non-negative integers")?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or("data_offsets is missing or not a list")?;
    let [begin, end] = offsets.as_slice() else {
        return Err("data_offsets is not [begin, end]".into());
    };
    let (Some(begin), Some(end)) = (begin.as_u64(), end.as_u64()) else {
        return Err("data_offsets holds something other than non-negative integers".into());
    };
    if begin > end || end > data_len {
        return Err(format!(
            "data_offsets [{begin}, {end}] lie outside the {data_len} bytes of data"
        ));
    }
    if let Some(width) = dtype.width() {
        let bytes = shape
            .iter()
            .try_fold(width, |acc, &d| acc.checked_mul(d as u64))
            .ok_or("the byte size overflows")?;
        if bytes != end - begin {
            return Err(format!(
                "shape {shape:?} of {dtype} is {bytes} bytes but data_offsets [{begin}, {end}] \
                 hold {}",
                end - begin
            ));
        }
    }
    Ok(TensorInfo {
        dtype,
        shape,
        start: data_start + begin,
        len: end - begin,
    })
}

impl SafetensorsFile {
    /// Opens `path` and reads and checks its header.
    pub fn open(path: &Path) -> Result<SafetensorsFile, HfError> {
        let bad = |msg: String| HfError::Safetensors {
            path: path.display().to_string(),
            msg,
        };
        let file = File::open(path).map_err(io_error(path))?;
        let file_len = file.metadata().map_err(io_error(path))?.len();
        if file_len < 8 {
            return Err(bad(format!(
                "{file_len} bytes cannot hold the 8-byte header length"
            )));
        }
        let mut len_bytes = [0u8; 8];
        (&file).read_exact(&mut len_bytes).map_err(io_error(path))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER || header_len > file_len - 8 {
            return Err(bad(format!(
                "header length {header_len} is larger than the file ({file_len} bytes) or \
                 the {MAX_HEADER}-byte limit"
            )));
        }
        // Bounded by the checks above.
        let mut header = vec![0u8; header_len as usize];
        (&file).read_exact(&mut header).map_err(io_error(path))?;
        let json: Value = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("the header is not JSON: {e}")))?;
        let Value::Object(entries) = json else {
            return Err(bad("the header is not a JSON object".into()));
        };
        let data_start = 8 + header_len;
        let data_len = file_len - data_start;
        let mut tensors = BTreeMap::new();
        for (name, entry) in entries {
            if name == "__metadata__" {
                continue;
            }
            let info = parse_entry(&entry, data_start, data_len)
                .map_err(|m| bad(format!("tensor {name:?}: {m}")))?;
            tensors.insert(name, info);
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            file,
            tensors,
        })
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// Every tensor's name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor named `name` converted to f32, in storage order.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, HfError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| HfError::MissingTensor(name.to_string()))?;
        let width: usize = match t.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::Other(ref d) => {
                return Err(HfError::Dtype {
                    name: name.to_string(),
                    dtype: d.clone(),
                });
            }
        };
        let path = &self.path;
        let mut left = usize::try_from(t.len).map_err(|_| HfError::Safetensors {
            path: path.display().to_string(),
            msg: format!("tensor {name:?} is larger than memory"),
        })?;
        // The header checks bound `len` by the file size, so this allocation is one the
        // weights themselves need.
        let mut out = Vec::with_capacity(left / width);
        let mut f = &self.file;
        f.seek(SeekFrom::Start(t.start)).map_err(io_error(path))?;
        // A multiple of every width, so no element straddles two chunks.
        let mut buf = vec![0u8; READ_CHUNK.min(left)];
        while left > 0 {
            let chunk = &mut buf[..READ_CHUNK.min(left)];
            f.read_exact(chunk).map_err(io_error(path))?;
            match t.dtype {
                Dtype::F32 => out.extend(
                    chunk
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                ),
                Dtype::F16 => out.extend(
                    chunk
                        .chunks_exact(2)
                        .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))),
                ),
                Dtype::BF16 => out.extend(
                    chunk
                        .chunks_exact(2)
                        .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)),
                ),
                Dtype::Other(_) => {}
            }
            left -= chunk.len();
        }
        Ok(out)
    }
}

/// A checkpoint's tensors, from one safetensors file or several shards.
#[derive(Debug)]
pub struct Weights {
    files: Vec<SafetensorsFile>,
    /// Tensor name to the file holding it.
    index: BTreeMap<String, usize>,
}

impl Weights {
    /// Opens `dir/model.safetensors`, or else the shards `dir/model.safetensors.index.json`
    /// lists (each a file in `dir`, and each tensor checked to be in its shard).
    pub fn open(dir: &Path) -> Result<Weights, HfError> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            let file = SafetensorsFile::open(&single)?;
            let index = file.names().map(|n| (n.to_string(), 0)).collect();
            return Ok(Weights {
                files: vec![file],
                index,
            });
        }
        let index_path = dir.join("model.safetensors.index.json");
        if !index_path.is_file() {
            return Err(HfError::NoWeights(dir.display().to_string()));
        }
        let bad = |msg: String| HfError::Safetensors {
            path: index_path.display().to_string(),
            msg,
        };
        let json = read_json(&index_path)?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("weight_map is missing or not an object".into()))?;
        let mut shards: BTreeMap<&str, usize> = BTreeMap::new();
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (tensor, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| bad(format!("the shard of {tensor:?} is not a string")))?;
            // Shards are files beside the index, never paths elsewhere.
            if Path::new(shard).file_name().and_then(|s| s.to_str()) != Some(shard) {
                return Err(bad(format!("shard {shard:?} is not a file name")));
            }
            let i = match shards.get(shard) {
                Some(&i) => i,
                None => {
                    files.push(SafetensorsFile::open(&dir.join(shard))?);
                    shards.insert(shard, files.len() - 1);
                    files.len() - 1
                }
            };
            if files[i].tensor(tensor).is_none() {
                return Err(bad(format!("{tensor:?} is not in its shard {shard:?}")));
            }
            index.insert(tensor.clone(), i);
        }
        Ok(Weights { files, index })
    }

    /// Whether the checkpoint has a tensor named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Every tensor's name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The tensor named `name`, whose shape must be `shape`, converted to f32.
    pub fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, HfError> {
        let file = self
            .index
            .get(name)
            .and_then(|&i| self.files.get(i))
            .ok_or_else(|| HfError::MissingTensor(name.to_string()))?;
        let t = file
            .tensor(name)
            .ok_or_else(|| HfError::MissingTensor(name.to_string()))?;
        if t.shape != shape {
            return Err(HfError::Shape {
                name: name.to_string(),
                found: t.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        file.read_f32(name)
    }
}

/// Builds the model `cfg` describes from `weights`.
pub fn model_from_weights(cfg: &HfConfig, weights: &Weights) -> Result<LlamaModel, HfError> {
    let c = &cfg.llama;
    let overflow = || HfError::Config("the projection sizes overflow".into());
    let (h, f) = (c.hidden, c.ffn);
    let qd = c.heads.checked_mul(c.head_dim).ok_or_else(overflow)?;
    let kvd = c.kv_heads.checked_mul(c.head_dim).ok_or_else(overflow)?;
    for name in weights.names() {
        let qkv_bias = ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
            .iter()
            .any(|b| name.ends_with(b));
        if name.ends_with(".bias") && !qkv_bias {
            return Err(HfError::Unsupported(format!(
                "tensor {name:?}: only the Q, K and V projections may have biases"
            )));
        }
    }
    let matrix = |name: &str, rows: usize, cols: usize| -> Result<Matrix, HfError> {
        Ok(Matrix::new(rows, cols, weights.read(name, &[rows, cols])?)?)
    };
    let vector = |name: &str, len: usize| weights.read(name, &[len]);
    let embed = matrix("model.embed_tokens.weight", c.vocab, h)?;
    // Not pre-sized from the config: a hostile layer count must fail at its first missing
    // tensor, not in the allocator.
    let mut layers = Vec::new();
    for i in 0..c.layers {
        let p = format!("model.layers.{i}");
        let bias = |proj: &str, len: usize| -> Result<Option<Vec<f32>>, HfError> {
            let name = format!("{p}.self_attn.{proj}.bias");
            if weights.contains(&name) {
                vector(&name, len).map(Some)
            } else if cfg.arch == Architecture::Qwen2 {
                Err(HfError::MissingTensor(name))
            } else {
                Ok(None)
            }
        };
        layers.push(Layer {
            attn_norm: vector(&format!("{p}.input_layernorm.weight"), h)?,
            wq: matrix(&format!("{p}.self_attn.q_proj.weight"), qd, h)?,
            wk: matrix(&format!("{p}.self_attn.k_proj.weight"), kvd, h)?,
            wv: matrix(&format!("{p}.self_attn.v_proj.weight"), kvd, h)?,
            bq: bias("q_proj", qd)?,
            bk: bias("k_proj", kvd)?,
            bv: bias("v_proj", kvd)?,
            wo: matrix(&format!("{p}.self_attn.o_proj.weight"), h, qd)?,
            ffn_norm: vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            gate: matrix(&format!("{p}.mlp.gate_proj.weight"), f, h)?,
            up: matrix(&format!("{p}.mlp.up_proj.weight"), f, h)?,
            down: matrix(&format!("{p}.mlp.down_proj.weight"), h, f)?,
        });
    }
    let out_norm = vector("model.norm.weight", h)?;
    // A tied head is the embedding matrix (checkpoints usually omit `lm_head.weight` then);
    // an untied checkpoint without one also falls back to it, as llama.cpp's converter does.
    let output = if cfg.tie_word_embeddings || !weights.contains("lm_head.weight") {
        None
    } else {
        Some(matrix("lm_head.weight", c.vocab, h)?)
    };
    Ok(LlamaModel {
        cfg: c.clone(),
        embed,
        layers,
        out_norm,
        output,
    })
}

/// Loads the model in the Hugging Face directory `dir`.
pub fn load_model(dir: &Path) -> Result<LlamaModel, HfError> {
    let cfg = HfConfig::read(dir)?;
    model_from_weights(&cfg, &Weights::open(dir)?)
}

/// A Hugging Face directory's tokenizer with the strings its chat template uses.
#[derive(Debug)]
pub struct HfTokenizer {
    /// The tokenizer of `tokenizer.json`.
    pub tokenizer: Tokenizer,
    /// The end-of-sequence token's text.
    pub eos_token: String,
    /// The beginning-of-sequence token's text, if the model has one.
    pub bos_token: Option<String>,
    /// The chat template: `tokenizer_config.json`'s `chat_template` (its `default` entry when
    /// it is a list of named templates), else `chat_template.jinja`; `None` without either.
    pub chat_template: Option<String>,
}

/// The text of a special token setting: a string, or an object with `content`.
fn token_text(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<String>, HfError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(HfError::TokenizerConfig(format!(
                "{key} is an object without a string content"
            ))),
        },
        Some(other) => Err(HfError::TokenizerConfig(format!(
            "{key} is {other}, not a token"
        ))),
    }
}

/// `chat_template` as `tokenizer_config.json` holds it: a string, or a list of
/// `{name, template}` of which the `default` one is the chat template.
fn chat_template(obj: &serde_json::Map<String, Value>) -> Result<Option<String>, HfError> {
    match obj.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| {
                HfError::TokenizerConfig(
                    "chat_template is a list without a template named \"default\"".into(),
                )
            }),
        Some(other) => Err(HfError::TokenizerConfig(format!(
            "chat_template is {other}, not a template"
        ))),
    }
}

/// Loads `dir/tokenizer.json` with the special tokens and chat template of
/// `dir/tokenizer_config.json` (and `dir/chat_template.jinja`).
///
/// The EOS is `eos_token`, else the first of `cfg.eos_token_ids`. `encode` prepends
/// `bos_token` when `add_bos_token` is true, nothing when it is false, and otherwise whatever
/// `tokenizer.json`'s post-processor adds: the behaviour of Hugging Face's `encode`.
pub fn load_tokenizer(dir: &Path, cfg: &HfConfig) -> Result<HfTokenizer, HfError> {
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.is_file() {
        read_json(&config_path)?
    } else {
        Value::Object(serde_json::Map::new())
    };
    let obj = config
        .as_object()
        .ok_or_else(|| HfError::TokenizerConfig("not a JSON object".into()))?;
    let path = dir.join("tokenizer.json");
    let bos_token = token_text(obj, "bos_token")?;
    let eos_token = match token_text(obj, "eos_token")? {
        Some(t) => t,
        None => {
            // Only the id is known: look its text up in the tokenizer itself.
            let id = cfg.eos_token_ids.first().copied().ok_or_else(|| {
                HfError::TokenizerConfig("no eos_token, and config.json has no eos_token_id".into())
            })?;
            tokenizers::Tokenizer::from_file(&path)
                .map_err(|e| TokenizerError::Tokenizers(format!("{}: {e}", path.display())))?
                .id_to_token(id)
                .ok_or_else(|| {
                    HfError::TokenizerConfig(format!("eos_token_id {id} is not in the vocabulary"))
                })?
        }
    };
    let add_bos = match obj.get("add_bos_token").and_then(Value::as_bool) {
        Some(true) => AddBos::Token(bos_token.as_deref().ok_or_else(|| {
            HfError::TokenizerConfig("add_bos_token is true but there is no bos_token".into())
        })?),
        Some(false) => AddBos::Never,
        None => AddBos::AsPostProcessor,
    };
    let tokenizer = Tokenizer::from_file(&path, &eos_token, add_bos)?;
    let mut template = chat_template(obj)?;
    let jinja = dir.join("chat_template.jinja");
    if template.is_none() && jinja.is_file() {
        template = Some(std::fs::read_to_string(&jinja).map_err(io_error(&jinja))?);
    }
    Ok(HfTokenizer {
        tokenizer,
        eos_token,
        bos_token,
        chat_template: template,
    })
}

//! Hugging Face model directories and model sources: tiny checkpoints written here (safetensors
//! in F32, BF16 and F16, single and sharded, for the Llama, Mistral and Qwen2 architectures)
//! load into the same decoder as the equivalent GGUF file, malformed files are errors, and the
//! `PATH|DIR|random:PRESET` sources load with their tokenizers, templates and stop tokens.

// Helpers outside `#[test]` functions panic on purpose when something is wrong.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use hotprefix_engine::chat::ChatMessage;
use hotprefix_engine::gguf::GgufFile;
use hotprefix_engine::hf::{self, HfConfig, HfError, SafetensorsFile};
use hotprefix_engine::model::{LlamaModel, RopeStyle};
use hotprefix_engine::source::{self, ModelSource, SourceError};
use hotprefix_engine::tokenizer::Tokenizer;
use serde_json::json;

/// A directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "hotprefix-hf-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, bytes: impl AsRef<[u8]>) {
        std::fs::write(self.0.join(name), bytes).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The tiny shape every checkpoint here has.
const LAYERS: usize = 2;
const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const FFN: usize = 48;
const VOCAB: usize = 300;

/// One named tensor: shape (slowest-varying first) and values.
#[derive(Clone)]
struct Tensor {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `n` values `offset + k * step` for random integers `|k| <= 64`: with `step` a power of two
/// they are exact in F16 and BF16, so every dtype holds the very same weights.
fn values(state: &mut u64, n: usize, offset: f32, step: f32) -> Vec<f32> {
    (0..n)
        .map(|_| offset + ((splitmix(state) % 129) as f32 - 64.0) * step)
        .collect()
}

/// Random Hugging Face tensors of the tiny shape: Q/K/V biases when `biases`, an untied
/// `lm_head.weight` when `lm_head`.
fn hf_tensors(seed: u64, biases: bool, lm_head: bool) -> Vec<Tensor> {
    let mut s = seed;
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, offset: f32, step: f32| {
        let n = shape.iter().product();
        out.push(Tensor {
            name,
            shape,
            values: values(&mut s, n, offset, step),
        });
    };
    let (qd, kvd) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    // Weights up to 1/4 keep activations in range; norms near 1.
    let w = 1.0 / 256.0;
    add(
        "model.embed_tokens.weight".into(),
        vec![VOCAB, HIDDEN],
        0.0,
        w,
    );
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        add(
            format!("{p}.input_layernorm.weight"),
            vec![HIDDEN],
            1.0,
            1.0 / 128.0,
        );
        add(
            format!("{p}.self_attn.q_proj.weight"),
            vec![qd, HIDDEN],
            0.0,
            w,
        );
        add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kvd, HIDDEN],
            0.0,
            w,
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kvd, HIDDEN],
            0.0,
            w,
        );
        if biases {
            add(format!("{p}.self_attn.q_proj.bias"), vec![qd], 0.0, w * 4.0);
            add(
                format!("{p}.self_attn.k_proj.bias"),
                vec![kvd],
                0.0,
                w * 4.0,
            );
            add(
                format!("{p}.self_attn.v_proj.bias"),
                vec![kvd],
                0.0,
                w * 4.0,
            );
        }
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![HIDDEN, qd],
            0.0,
            w,
        );
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![HIDDEN],
            1.0,
            1.0 / 128.0,
        );
        add(
            format!("{p}.mlp.gate_proj.weight"),
            vec![FFN, HIDDEN],
            0.0,
            w,
        );
        add(format!("{p}.mlp.up_proj.weight"), vec![FFN, HIDDEN], 0.0, w);
        add(
            format!("{p}.mlp.down_proj.weight"),
            vec![HIDDEN, FFN],
            0.0,
            w,
        );
    }
    add("model.norm.weight".into(), vec![HIDDEN], 1.0, 1.0 / 128.0);
    if lm_head {
        add("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.0, w);
    }
    out
}

/// IEEE half bits of `v`, exact for the normal values and zeros used here.
fn f16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    if v == 0.0 {
        return sign;
    }
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    assert!((1..31).contains(&exp), "{v} is not a normal half");
    assert_eq!(bits & 0x1fff, 0, "{v} is not exact in half precision");
    sign | ((exp as u16) << 10) | ((bits >> 13) & 0x3ff) as u16
}

/// A safetensors file of `tensors` in `dtype` (`F32`, `F16` or `BF16`).
fn safetensors(tensors: &[Tensor], dtype: &str) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut data = Vec::new();
    for t in tensors {
        let begin = data.len();
        for &v in &t.values {
            match dtype {
                "F32" => data.extend(v.to_le_bytes()),
                "F16" => data.extend(f16_bits(v).to_le_bytes()),
                "BF16" => {
                    assert_eq!(v.to_bits() & 0xffff, 0, "{v} is not exact in bfloat16");
                    data.extend(((v.to_bits() >> 16) as u16).to_le_bytes());
                }
                other => panic!("no writer for {other}"),
            }
        }
        header.insert(
            t.name.clone(),
            json!({"dtype": dtype, "shape": t.shape, "data_offsets": [begin, data.len()]}),
        );
    }
    raw_safetensors(&serde_json::Value::Object(header).to_string(), &data)
}

/// A safetensors file from its header text and data; the header is padded with spaces to a
/// multiple of 8 bytes, as the format's writers do.
fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut header = header.as_bytes().to_vec();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    out
}

/// GPT-2's byte-to-character table (as `Tokenizer::bytes` uses).
fn byte_chars() -> Vec<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut next = 256;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

/// Ids of the test tokenizer's special tokens.
const ENDOFTEXT: u32 = 258;
const IM_START: u32 = 259;
const IM_END: u32 = 260;
const BOS: u32 = 261;

/// A `tokenizer.json`: byte-level BPE over the 256 bytes with two merges, four special tokens,
/// and a post-processor that puts `<s>` first when `bos_template`.
fn tokenizer_json(bos_template: bool) -> String {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::{BPE, Vocab};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, Tokenizer};
    let mut vocab: Vocab = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    vocab.insert("he".into(), 256);
    vocab.insert("ll".into(), 257);
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"];
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), ENDOFTEXT + i as u32);
    }
    let merges = vec![("h".into(), "e".into()), ("l".into(), "l".into())];
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .unwrap();
    let mut t = Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    t.with_decoder(Some(ByteLevelDecoder::default()));
    let added: Vec<AddedToken> = specials
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    t.add_special_tokens(&added);
    if bos_template {
        t.with_post_processor(Some(
            TemplateProcessing::builder()
                .try_single("<s> $A")
                .unwrap()
                .special_tokens(vec![("<s>", BOS)])
                .build()
                .unwrap(),
        ));
    }
    t.to_string(false).unwrap()
}

/// A `config.json` of the tiny shape for `class`, with `extra` fields merged in.
fn config(class: &str, model_type: &str, extra: serde_json::Value) -> String {
    let mut c = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 64,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "rope_scaling": null,
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c.to_string()
}

/// Writes `tensors` into `dir` in `dtype`: one `model.safetensors`, or `shards` files with an
/// index.
fn write_weights(dir: &TempDir, tensors: &[Tensor], dtype: &str, shards: usize) {
    if shards <= 1 {
        dir.write("model.safetensors", safetensors(tensors, dtype));
        return;
    }
    let mut map = serde_json::Map::new();
    let per = tensors.len().div_ceil(shards);
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let name = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        dir.write(&name, safetensors(chunk, dtype));
        for t in chunk {
            map.insert(t.name.clone(), json!(name));
        }
    }
    dir.write(
        "model.safetensors.index.json",
        json!({"metadata": {"total_size": 0}, "weight_map": map}).to_string(),
    );
}

/// A complete Hugging Face directory.
fn hf_dir(
    name: &str,
    config_json: &str,
    tensors: &[Tensor],
    dtype: &str,
    shards: usize,
) -> TempDir {
    let dir = TempDir::new(name);
    dir.write("config.json", config_json);
    write_weights(&dir, tensors, dtype, shards);
    dir.write("tokenizer.json", tokenizer_json(true));
    dir.write(
        "tokenizer_config.json",
        json!({"bos_token": "<s>", "eos_token": "<|im_end|>"}).to_string(),
    );
    dir
}

use common::GgufWriter;

/// Rows of a Q or K projection (or bias) reordered per head as llama.cpp's converter does for
/// llama files: new row `2i` is old row `i`, new row `2i + 1` is old row `i + head_dim / 2`.
fn interleave_rows(values: &[f32], rows: usize) -> Vec<f32> {
    let cols = values.len() / rows;
    let half = HEAD_DIM / 2;
    let mut out = Vec::with_capacity(values.len());
    for r in 0..rows {
        let (head, j) = (r / HEAD_DIM, r % HEAD_DIM);
        let old = head * HEAD_DIM + if j % 2 == 0 { j / 2 } else { j / 2 + half };
        out.extend_from_slice(&values[old * cols..(old + 1) * cols]);
    }
    out
}

/// The GGUF file of `tensors` for `arch` (`llama` or `qwen2`); with `interleave`, Q and K are
/// permuted into the llama layout.
fn gguf_model(tensors: &[Tensor], arch: &str, interleave: bool) -> LlamaModel {
    let mut w = GgufWriter::default();
    w.kv_str("general.architecture", arch);
    w.kv_u32(&format!("{arch}.block_count"), LAYERS);
    w.kv_u32(&format!("{arch}.embedding_length"), HIDDEN);
    w.kv_u32(&format!("{arch}.attention.head_count"), HEADS);
    w.kv_u32(&format!("{arch}.attention.head_count_kv"), KV_HEADS);
    w.kv_u32(&format!("{arch}.feed_forward_length"), FFN);
    w.kv_u32(&format!("{arch}.context_length"), 64);
    w.kv_f32(&format!("{arch}.rope.freq_base"), 10_000.0);
    w.kv_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"), 1e-5);
    for t in tensors {
        let mut name = t
            .name
            .replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("lm_head", "output")
            .replace("model.layers.", "blk.")
            .replace("input_layernorm", "attn_norm")
            .replace("post_attention_layernorm", "ffn_norm");
        for (hf_name, gguf_name) in [
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ] {
            name = name.replace(hf_name, gguf_name);
        }
        let permute = interleave && (name.contains("attn_q") || name.contains("attn_k"));
        let values = if permute {
            interleave_rows(&t.values, t.shape[0])
        } else {
            t.values.clone()
        };
        w.tensor_f32(&name, &t.shape, &values);
    }
    LlamaModel::from_gguf(&GgufFile::parse(w.bytes()).unwrap()).unwrap()
}

/// Logits after a prompt, then after one more token (exercising the KV cache).
fn run(m: &LlamaModel) -> Vec<Vec<f32>> {
    let mut kv = m.new_kv();
    let prompt: Vec<u32> = (0..9).map(|i| (i * 37 + 5) % VOCAB as u32).collect();
    vec![m.forward(&prompt, &mut kv), m.forward(&[123], &mut kv)]
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn half_split_hf_weights_match_the_interleaved_gguf_layout() {
    let tensors = hf_tensors(1, false, false);
    let dir = hf_dir(
        "llama",
        &config(
            "LlamaForCausalLM",
            "llama",
            json!({"tie_word_embeddings": true}),
        ),
        &tensors,
        "F32",
        1,
    );
    let hf = hf::load_model(dir.path()).unwrap();
    assert_eq!(hf.cfg.rope_style, RopeStyle::HalfSplit);
    assert_eq!(
        (hf.cfg.layers, hf.cfg.hidden, hf.cfg.heads, hf.cfg.kv_heads),
        (LAYERS, HIDDEN, HEADS, KV_HEADS)
    );
    assert_eq!(
        (hf.cfg.head_dim, hf.cfg.ffn, hf.cfg.vocab),
        (HEAD_DIM, FFN, VOCAB)
    );
    assert_eq!(
        (hf.cfg.context, hf.cfg.eps, hf.cfg.rope_base),
        (64, 1e-5, 10_000.0)
    );
    let gguf = gguf_model(&tensors, "llama", true);
    assert_eq!(gguf.cfg.rope_style, RopeStyle::Interleaved);
    let (a, b) = (run(&hf), run(&gguf));
    let d = max_diff(&a, &b);
    assert!(d < 1e-5, "logits differ by {d}");
    assert!(a.iter().flatten().all(|x| x.is_finite()));
    // Without the permutation the interleaved decoder rotates the wrong pairs: the test can
    // tell the layouts apart.
    let wrong = max_diff(&a, &run(&gguf_model(&tensors, "llama", false)));
    assert!(wrong > 1e-3, "unpermuted logits differ by only {wrong}");
}

#[test]
fn every_dtype_single_and_sharded_gives_the_same_model() {
    let tensors = hf_tensors(2, false, true);
    let cfg = config(
        "MistralForCausalLM",
        "mistral",
        json!({"sliding_window": 32, "max_position_embeddings": 64}),
    );
    let f32_dir = hf_dir("mistral-f32", &cfg, &tensors, "F32", 1);
    let reference = hf::load_model(f32_dir.path()).unwrap();
    // The sliding window caps the context, so full attention stays exact.
    assert_eq!(reference.cfg.context, 32);
    let logits = run(&reference);
    // The untied head is used: the interleaved GGUF equivalent with `output.weight` agrees.
    let d = max_diff(&logits, &run(&gguf_model(&tensors, "llama", true)));
    assert!(d < 1e-5, "logits differ by {d}");
    for (dtype, shards) in [("BF16", 1), ("F16", 1), ("F32", 3), ("BF16", 2), ("F16", 4)] {
        let dir = hf_dir("mistral", &cfg, &tensors, dtype, shards);
        if shards > 1 {
            assert!(!dir.path().join("model.safetensors").exists());
        }
        let m = hf::load_model(dir.path()).unwrap();
        assert_eq!(run(&m), logits, "{dtype} in {shards} shard(s)");
    }
    // Dropping `lm_head.weight` falls back to the embeddings, which changes the output.
    let tied: Vec<Tensor> = tensors
        .iter()
        .filter(|t| t.name != "lm_head.weight")
        .cloned()
        .collect();
    let dir = hf_dir("mistral-tied", &cfg, &tied, "F32", 1);
    assert_ne!(run(&hf::load_model(dir.path()).unwrap()), logits);
    // A null window means full attention: the context stays at max_position_embeddings.
    let cfg = config(
        "MistralForCausalLM",
        "mistral",
        json!({"sliding_window": null}),
    );
    assert_eq!(HfConfig::parse(&cfg).unwrap().llama.context, 64);
}

#[test]
fn qwen2_biases_are_loaded_and_change_the_output() {
    let tensors = hf_tensors(3, true, false);
    let cfg = config(
        "Qwen2ForCausalLM",
        "qwen2",
        json!({"tie_word_embeddings": true, "use_sliding_window": false, "sliding_window": 16}),
    );
    let dir = hf_dir("qwen2", &cfg, &tensors, "BF16", 2);
    let hf = hf::load_model(dir.path()).unwrap();
    assert_eq!(hf.cfg.context, 64, "the window is off");
    let logits = run(&hf);
    // GGUF qwen2 files keep Hugging Face's row order and carry the same biases.
    let d = max_diff(&logits, &run(&gguf_model(&tensors, "qwen2", false)));
    assert!(d < 1e-5, "logits differ by {d}");
    // The same weights with zero biases give other logits.
    let zeroed: Vec<Tensor> = tensors
        .iter()
        .map(|t| {
            let mut t = t.clone();
            if t.name.ends_with(".bias") {
                t.values.fill(0.0);
            }
            t
        })
        .collect();
    let dir0 = hf_dir("qwen2-zero", &cfg, &zeroed, "BF16", 1);
    let d = max_diff(&logits, &run(&hf::load_model(dir0.path()).unwrap()));
    assert!(d > 1e-3, "biases changed the logits by only {d}");
    // Qwen2 needs its biases.
    let unbiased: Vec<Tensor> = tensors
        .iter()
        .filter(|t| !t.name.ends_with(".bias"))
        .cloned()
        .collect();
    let dir = hf_dir("qwen2-nobias", &cfg, &unbiased, "F32", 1);
    let err = hf::load_model(dir.path()).unwrap_err();
    assert!(
        matches!(&err, HfError::MissingTensor(n) if n.ends_with("q_proj.bias")),
        "{err}"
    );
}

/// Writes `bytes` as the only file of a fresh directory and opens it as safetensors.
fn open_raw(bytes: &[u8]) -> Result<SafetensorsFile, HfError> {
    let dir = TempDir::new("raw");
    dir.write("x.safetensors", bytes);
    SafetensorsFile::open(&dir.path().join("x.safetensors"))
}

#[test]
fn malformed_safetensors_files_are_errors_not_panics() {
    let t = Tensor {
        name: "t".into(),
        shape: vec![2, 3],
        values: vec![0.5; 6],
    };
    let good = safetensors(std::slice::from_ref(&t), "F32");
    let f = open_raw(&good).unwrap();
    assert_eq!(f.tensor("t").unwrap().shape, vec![2, 3]);
    assert_eq!(f.read_f32("t").unwrap(), vec![0.5; 6]);
    assert!(matches!(f.read_f32("u"), Err(HfError::MissingTensor(_))));

    let malformed = |bytes: &[u8], needle: &str| {
        let err = open_raw(bytes).unwrap_err();
        assert!(matches!(err, HfError::Safetensors { .. }), "{err}");
        assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
    };
    malformed(&[1, 2, 3], "cannot hold");
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend(b"{}");
    malformed(&huge, "header length");
    let mut long = 1000u64.to_le_bytes().to_vec();
    long.extend(b"{}      ");
    malformed(&long, "header length");
    malformed(&raw_safetensors("{not json", &[]), "not JSON");
    malformed(&raw_safetensors("[1, 2]", &[]), "not a JSON object");
    let entry = |e: &str| raw_safetensors(&format!("{{\"t\": {e}}}"), &[0u8; 24]);
    malformed(
        &entry(r#"{"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 48]}"#),
        "outside",
    );
    malformed(
        &entry(r#"{"dtype": "F32", "shape": [2, 3], "data_offsets": [16, 8]}"#),
        "outside",
    );
    malformed(
        &entry(r#"{"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 24]}"#),
        "16 bytes",
    );
    malformed(
        &entry(r#"{"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 24]}"#),
        "overflows",
    );
    malformed(
        &entry(r#"{"dtype": "F32", "shape": [-1], "data_offsets": [0, 24]}"#),
        "shape",
    );
    malformed(
        &entry(r#"{"dtype": 7, "shape": [6], "data_offsets": [0, 24]}"#),
        "dtype",
    );
    malformed(
        &entry(r#"{"dtype": "F32", "shape": [6], "data_offsets": [0]}"#),
        "data_offsets",
    );
    malformed(&entry(r#""t""#), "not an object");
    // Truncating the data leaves the offsets past the end.
    malformed(&good[..good.len() - 1], "outside");
    // An unknown dtype is listed but cannot be read.
    let f = open_raw(&entry(
        r#"{"dtype": "Q4", "shape": [6], "data_offsets": [0, 24]}"#,
    ))
    .unwrap();
    let err = f.read_f32("t").unwrap_err();
    assert!(matches!(err, HfError::Dtype { .. }), "{err}");
    // Every single-byte corruption parses or fails, never panics.
    for i in 0..good.len() {
        for b in [0x00, 0xff, b'9', b'"'] {
            let mut bad = good.clone();
            bad[i] = b;
            if let Ok(f) = open_raw(&bad) {
                for name in f.names().map(String::from).collect::<Vec<_>>() {
                    let _ = f.read_f32(&name);
                }
            }
        }
    }
}

#[test]
fn checkpoints_that_do_not_fit_the_config_are_errors() {
    let tensors = hf_tensors(4, false, false);
    let cfg = config("LlamaForCausalLM", "llama", json!({}));
    let load = |tensors: &[Tensor], dtype: &str| {
        let dir = hf_dir("bad", &cfg, tensors, dtype, 1);
        hf::load_model(dir.path()).unwrap_err()
    };
    let without = |name: &str| -> Vec<Tensor> {
        tensors.iter().filter(|t| t.name != name).cloned().collect()
    };
    let err = load(&without("model.layers.1.mlp.up_proj.weight"), "F32");
    assert!(
        matches!(&err, HfError::MissingTensor(n) if n == "model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );
    // A shape that disagrees with the config.
    let mut reshaped = tensors.clone();
    reshaped[0].shape = vec![VOCAB / 2, HIDDEN * 2];
    let err = load(&reshaped, "F32");
    assert!(matches!(err, HfError::Shape { .. }), "{err}");
    // An output-projection bias is not implemented and must not be ignored.
    let mut biased = tensors.clone();
    biased.push(Tensor {
        name: "model.layers.0.self_attn.o_proj.bias".into(),
        shape: vec![HIDDEN],
        values: vec![0.0; HIDDEN],
    });
    assert!(matches!(load(&biased, "F32"), HfError::Unsupported(_)));
    // An unsupported dtype in a needed tensor.
    let dir = hf_dir("i8", &cfg, &tensors, "F32", 1);
    let norm = Tensor {
        name: "model.norm.weight".into(),
        shape: vec![HIDDEN],
        values: vec![],
    };
    let mut rest = safetensors(&without("model.norm.weight"), "F32");
    let header_len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&rest[8..8 + header_len]).unwrap();
    let data_len = rest.len() - 8 - header_len;
    header[&norm.name] =
        json!({"dtype": "I8", "shape": [HIDDEN], "data_offsets": [data_len, data_len + HIDDEN]});
    let mut data = rest.split_off(8 + header_len);
    data.extend([1u8; HIDDEN]);
    dir.write(
        "model.safetensors",
        raw_safetensors(&header.to_string(), &data),
    );
    let err = hf::load_model(dir.path()).unwrap_err();
    assert!(
        matches!(&err, HfError::Dtype { dtype, .. } if dtype == "I8"),
        "{err}"
    );
    // No weights at all.
    let dir = TempDir::new("empty");
    dir.write("config.json", &cfg);
    assert!(matches!(
        hf::load_model(dir.path()),
        Err(HfError::NoWeights(_))
    ));
    // Shard indexes may only name files beside them, holding the tensors they are said to.
    let dir = hf_dir("shards", &cfg, &tensors, "F32", 2);
    let index = dir.path().join("model.safetensors.index.json");
    let original = std::fs::read_to_string(&index).unwrap();
    let first = "model-00001-of-00002.safetensors";
    for (bad, needle) in [
        ("../model-00001-of-00002.safetensors", "not a file name"),
        ("model-00002-of-00002.safetensors", "is not in its shard"),
    ] {
        let text = original.replacen(first, bad, 1);
        std::fs::write(&index, text).unwrap();
        let err = hf::load_model(dir.path()).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn config_json_is_checked() {
    let parse = |extra| HfConfig::parse(&config("LlamaForCausalLM", "llama", extra));
    let c = parse(json!({})).unwrap();
    assert_eq!(c.arch, hf::Architecture::Llama);
    assert!(!c.tie_word_embeddings);
    // Defaults: KV heads = heads, head size = hidden / heads, RoPE base 10000, eps 1e-6.
    let c = HfConfig::parse(
        &json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10,
            "eos_token_id": [5, 7],
        })
        .to_string(),
    )
    .unwrap();
    assert_eq!(
        (
            c.llama.kv_heads,
            c.llama.head_dim,
            c.llama.rope_base,
            c.llama.eps
        ),
        (4, 8, 10_000.0, 1e-6)
    );
    assert_eq!(
        (c.llama.context, c.eos_token_ids.clone()),
        (2048, vec![5, 7])
    );
    // An explicit head size may differ from hidden / heads.
    assert_eq!(parse(json!({"head_dim": 16})).unwrap().llama.head_dim, 16);
    let unsupported = |extra| {
        let err = parse(extra).unwrap_err();
        assert!(matches!(err, HfError::Unsupported(_)), "{err}");
        err.to_string()
    };
    let msg = unsupported(json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}));
    assert!(msg.contains("rope_scaling"), "{msg}");
    unsupported(json!({"hidden_act": "gelu"}));
    unsupported(json!({"attention_bias": true}));
    let msg = unsupported(json!({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}));
    assert!(msg.contains("Qwen2ForCausalLM"), "{msg}");
    // model_type alone identifies the architecture.
    let c = HfConfig::parse(&config("", "qwen2", json!({"architectures": null}))).unwrap();
    assert_eq!(c.arch, hf::Architecture::Qwen2);
    for bad in [
        json!({"hidden_size": null}),
        json!({"num_hidden_layers": -2}),
        json!({"num_attention_heads": 3}),
        json!({"num_key_value_heads": 3}),
        json!({"rope_theta": "big"}),
    ] {
        let err = parse(bad.clone()).unwrap_err();
        assert!(
            matches!(err, HfError::Config(_) | HfError::Model(_)),
            "{bad}: {err}"
        );
    }
    assert!(matches!(HfConfig::parse("{"), Err(HfError::Json { .. })));
}

#[test]
fn hugging_face_directories_load_as_model_sources() {
    let template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}\
                    {% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}";
    let tensors = hf_tensors(5, false, false);
    let cfg = config(
        "LlamaForCausalLM",
        "llama",
        json!({"tie_word_embeddings": true, "eos_token_id": 258}),
    );
    let dir = hf_dir("source", &cfg, &tensors, "F32", 1);
    dir.write(
        "tokenizer_config.json",
        json!({
            "bos_token": {"content": "<s>", "special": true},
            "eos_token": {"content": "<|im_end|>", "special": true},
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": template},
            ],
        })
        .to_string(),
    );
    let src: ModelSource = dir.path().to_str().unwrap().parse().unwrap();
    assert_eq!(src, ModelSource::HuggingFace(dir.path().to_path_buf()));
    let m = source::load(&src).unwrap();
    assert_eq!(&m.id, dir.path().file_name().unwrap().to_str().unwrap());
    assert_eq!(m.tokenizer.eos(), IM_END);
    assert_eq!(m.stop_tokens, vec![IM_END, ENDOFTEXT]);
    // The post-processor's `<s>` is what `encode` prepends.
    assert_eq!(m.tokenizer.bos(), Some(BOS));
    let ids = m.tokenizer.encode("hello<|im_start|>").unwrap();
    assert_eq!(ids, vec![BOS, 256, 257, u32::from(b'o'), IM_START]);
    assert_eq!(m.tokenizer.decode(&ids, true).unwrap(), "hello");
    let prompt = m
        .chat
        .render(&[ChatMessage::new("user", "Hi")], true)
        .unwrap();
    assert_eq!(prompt, "<s>[user] Hi<|im_end|>[assistant] ");
    assert_eq!(m.model.forward(&ids, &mut m.model.new_kv()).len(), VOCAB);
    // `add_bos_token: false`, the EOS only as an id, and the template in chat_template.jinja.
    dir.write(
        "tokenizer_config.json",
        json!({"add_bos_token": false, "bos_token": null}).to_string(),
    );
    dir.write("chat_template.jinja", "{{ messages[0].content }}!");
    let m = source::load(&src).unwrap();
    assert_eq!((m.tokenizer.bos(), m.tokenizer.eos()), (None, ENDOFTEXT));
    assert_eq!(m.stop_tokens, vec![ENDOFTEXT, IM_END]);
    let out = m
        .chat
        .render(&[ChatMessage::new("user", "Hi")], true)
        .unwrap();
    assert_eq!(out, "Hi!");
    // `add_bos_token: true` prepends the named token; without a template, ChatML is used.
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    dir.write(
        "tokenizer_config.json",
        json!({"add_bos_token": true, "bos_token": "<|im_start|>", "eos_token": "<|endoftext|>"})
            .to_string(),
    );
    let m = source::load(&src).unwrap();
    assert_eq!(m.tokenizer.encode("he").unwrap(), vec![IM_START, 256]);
    let out = m
        .chat
        .render(&[ChatMessage::new("user", "Hi")], true)
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // A tokenizer with more tokens than the model has rows is refused.
    let small = config("LlamaForCausalLM", "llama", json!({"vocab_size": 200}));
    let mut tensors = hf_tensors(5, false, false);
    tensors[0] = Tensor {
        name: "model.embed_tokens.weight".into(),
        shape: vec![200, HIDDEN],
        values: vec![0.0; 200 * HIDDEN],
    };
    let dir = hf_dir("small", &small, &tensors, "F32", 1);
    let src: ModelSource = dir.path().to_str().unwrap().parse().unwrap();
    assert!(matches!(source::load(&src), Err(SourceError::Mismatch(_))));
}

#[test]
fn model_source_strings_are_parsed_with_clear_errors() {
    let dir = TempDir::new("sources");
    let parse = |s: &str| s.parse::<ModelSource>();
    assert_eq!(
        parse("random:tiny").unwrap(),
        ModelSource::Random("tiny".into())
    );
    assert_eq!(parse("random:tiny").unwrap().to_string(), "random:tiny");
    let err = parse("random:huge").unwrap_err().to_string();
    assert!(
        err.contains("huge") && err.contains("tiny") && err.contains("smollm2-135m"),
        "{err}"
    );
    assert!(matches!(
        parse("random:"),
        Err(SourceError::UnknownPreset { .. })
    ));
    let missing = dir.path().join("nope.gguf");
    let err = parse(missing.to_str().unwrap()).unwrap_err();
    assert!(matches!(err, SourceError::NotFound(_)), "{err}");
    assert!(err.to_string().contains("nope.gguf"), "{err}");
    let err = parse(dir.path().to_str().unwrap()).unwrap_err();
    assert!(matches!(err, SourceError::NoConfig(_)), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");
    dir.write("weights.bin", b"x");
    let err = parse(dir.path().join("weights.bin").to_str().unwrap()).unwrap_err();
    assert!(matches!(err, SourceError::NotAModel(_)), "{err}");
    dir.write("m.GGUF", b"not really");
    let gguf = dir.path().join("m.GGUF");
    let src = parse(gguf.to_str().unwrap()).unwrap();
    assert_eq!(src, ModelSource::Gguf(gguf));
    // Parsing checks the path; loading reads it.
    assert!(matches!(source::load(&src), Err(SourceError::Gguf(_))));
    dir.write("config.json", "{}");
    assert_eq!(
        parse(dir.path().to_str().unwrap()).unwrap(),
        ModelSource::HuggingFace(dir.path().to_path_buf())
    );
}

#[test]
fn random_tiny_loads_with_the_byte_tokenizer() {
    let m = source::load(&"random:tiny".parse().unwrap()).unwrap();
    assert_eq!(m.id, "random-tiny");
    assert_eq!(m.model.cfg.vocab, 512);
    let t = &m.tokenizer;
    assert_eq!((t.vocab_size(), t.eos(), t.bos()), (512, 256, None));
    assert_eq!(m.stop_tokens, vec![256, 258]);
    for text in [
        "Hello, world!",
        " spaces  and\ttabs\n",
        "héllo 日本語 🎉",
        "",
    ] {
        let ids = t.encode(text).unwrap();
        assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
        assert_eq!(t.decode(&ids, false).unwrap(), text);
    }
    let prompt = m
        .chat
        .render(&[ChatMessage::new("user", "Hi")], true)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = t.encode(&prompt).unwrap();
    assert_eq!(ids[0], 257);
    assert_eq!(ids.iter().filter(|&&i| i == 257).count(), 2);
    assert_eq!(ids.iter().filter(|&&i| i == 258).count(), 1);
    assert_eq!(t.decode(&ids, true).unwrap(), "user\nHi\nassistant\n");
    assert_eq!(t.decode(&ids, false).unwrap(), prompt);
    let logits = m.model.forward(&ids, &mut m.model.new_kv());
    assert!(logits.len() == 512 && logits.iter().all(|x| x.is_finite()));
    // Any id sequence decodes: invalid UTF-8 becomes U+FFFD, unused ids nothing.
    assert_eq!(
        t.decode(&[0xff, u32::from(b'a'), 0xe6], false).unwrap(),
        "\u{fffd}a\u{fffd}"
    );
    assert_eq!(t.decode(&[300, 511, u32::from(b'a')], false).unwrap(), "a");
    // Random weights are the same on every load.
    let again = source::load(&ModelSource::Random("tiny".into())).unwrap();
    assert_eq!(again.model.forward(&ids, &mut again.model.new_kv()), logits);
    // The vocabulary must hold the bytes and the EOS; the ChatML tokens only when it can.
    assert!(Tokenizer::bytes(256).is_err());
    let t = Tokenizer::bytes(257).unwrap();
    assert_eq!(t.token_id("<|endoftext|>"), Some(256));
    assert_eq!(t.token_id("<|im_end|>"), None);
    assert_eq!(t.encode("<|im_end|>").unwrap().len(), 10);
}

#[test]
fn the_default_model_loads_as_a_gguf_source() {
    let path = common::model_path();
    let src: ModelSource = path.to_str().unwrap().parse().unwrap();
    assert_eq!(src, ModelSource::Gguf(path.clone()));
    let m = source::load(&src).unwrap();
    assert_eq!(
        m.id, "smollm2-135m-instruct.q4_1",
        "the file name, in lower case"
    );
    let im_end = m.tokenizer.token_id("<|im_end|>").unwrap();
    assert_eq!(m.stop_tokens[0], m.tokenizer.eos());
    assert!(m.stop_tokens.contains(&im_end), "{:?}", m.stop_tokens);
    assert_eq!(m.model.cfg.vocab, m.tokenizer.vocab_size());
    let prompt = m
        .chat
        .render(&[ChatMessage::new("user", "What is 2+2?")], true)
        .unwrap();
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    let ids = m.tokenizer.encode(&prompt).unwrap();
    assert_eq!(m.tokenizer.decode(&ids, false).unwrap(), prompt);
}

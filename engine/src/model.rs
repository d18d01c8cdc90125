//! A Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) computed densely in
//! f32 on the CPU: the reference every faster path (paged attention over the cache's blocks, the
//! CUDA backend) is checked against, token for token.
//!
//! Weights come from GGUF and are dequantised at load. Layout: a GGUF matrix with dimensions
//! `[in, out]` (fastest first) is `out` rows of `in` values, so `y = W x` is one dot product per
//! row. GGUF's llama conversion permutes the Q and K rows so that RoPE rotates *adjacent* pairs
//! `(x[2i], x[2i+1])`, which is what [`rope`] does.

use thiserror::Error;

use crate::gguf::{GgufError, GgufFile};

/// Why a model could not be loaded.
#[derive(Debug, Error)]
pub enum ModelError {
    /// Reading a tensor failed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A hyperparameter is missing or inconsistent.
    #[error("model: {0}")]
    Invalid(String),
}

/// Shape of a Llama-family model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Transformer blocks.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// SwiGLU inner size.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RoPE base frequency.
    pub rope_base: f32,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Longest context the model was trained for (capped at the sliding window for models
    /// that have one, so attention over the whole context is exact).
    pub context: usize,
    /// How RoPE pairs the dimensions of a head.
    pub rope_style: RopeStyle,
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])`: GGUF llama files, whose converter permutes the Q and K
    /// rows into this order.
    Interleaved,
    /// Pairs `(x[i], x[i + d/2])`: Hugging Face checkpoints and GGUF qwen2 files.
    HalfSplit,
}

impl LlamaConfig {
    /// Reads the `<arch>.*` hyperparameters of a GGUF file (architectures `llama`, which
    /// covers Llama 2/3, SmolLM and Mistral conversions, and `qwen2`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let arch = g.meta_str("general.architecture").unwrap_or("");
        let rope_style = match arch {
            "llama" => RopeStyle::Interleaved,
            // llama.cpp's qwen2 conversion keeps Hugging Face's row order (NEOX-style RoPE).
            "qwen2" => RopeStyle::HalfSplit,
            _ => {
                return Err(ModelError::Invalid(format!(
                    "architecture {arch:?} is not supported (llama and qwen2 are)"
                )));
            }
        };
        let get = |k: &str| {
            g.meta_u64(&format!("{arch}.{k}"))
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| ModelError::Invalid(format!("{arch}.{k} is missing")))
        };
        let hidden = get("embedding_length")?;
        let heads = get("attention.head_count")?;
        let kv_heads = g
            .meta_u64(&format!("{arch}.attention.head_count_kv"))
            .map_or(heads, |v| v as usize);
        let vocab = g
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .ok_or_else(|| ModelError::Invalid("token_embd.weight is missing".into()))?;
        let cfg = LlamaConfig {
            layers: get("block_count")?,
            hidden,
            heads,
            kv_heads,
            head_dim: hidden.checked_div(heads).unwrap_or(0),
            ffn: get("feed_forward_length")?,
            vocab: vocab as usize,
            rope_base: g
                .meta_f64(&format!("{arch}.rope.freq_base"))
                .unwrap_or(10_000.0) as f32,
            eps: g
                .meta_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5) as f32,
            context: get("context_length")?,
            rope_style,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the shape is usable: heads divide the hidden size, KV heads divide the heads,
    /// head size even (RoPE pairs), nothing zero.
    pub fn validate(&self) -> Result<(), ModelError> {
        let c = self;
        let ok = c.layers > 0
            && c.hidden > 0
            && c.heads > 0
            && c.kv_heads > 0
            && c.heads.is_multiple_of(c.kv_heads)
            && c.head_dim > 0
            && c.head_dim.is_multiple_of(2)
            && c.ffn > 0
            && c.vocab > 0
            && c.context > 0
            && c.eps.is_finite()
            && c.rope_base.is_finite()
            && c.rope_base > 0.0;
        if ok {
            Ok(())
        } else {
            Err(ModelError::Invalid(format!("unusable model shape {c:?}")))
        }
    }

    /// Floats in one position's key (or value) row.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// A dense row-major matrix: `rows` outputs of `cols` inputs.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) data: Vec<f32>,
}

impl Matrix {
    /// A `rows` x `cols` matrix from its rows, concatenated.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Matrix, ModelError> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(ModelError::Invalid(format!(
                "{} values do not make a {rows} x {cols} matrix",
                data.len()
            )));
        }
        Ok(Matrix { rows, cols, data })
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Inputs per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The values, row after row.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    fn load(g: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<Matrix, ModelError> {
        let t = g
            .tensor(name)
            .ok_or_else(|| ModelError::Invalid(format!("{name} is missing")))?;
        if t.dims != [cols as u64, rows as u64] {
            return Err(ModelError::Invalid(format!(
                "{name} has dims {:?}, expected [{cols}, {rows}]",
                t.dims
            )));
        }
        Ok(Matrix {
            rows,
            cols,
            data: g.dequantize(name)?,
        })
    }

    /// `out = self * x`.
    fn matvec(&self, x: &[f32], out: &mut [f32]) {
        debug_assert_eq!(x.len(), self.cols);
        debug_assert_eq!(out.len(), self.rows);
        for (o, row) in out.iter_mut().zip(self.data.chunks_exact(self.cols)) {
            *o = dot(row, x);
        }
    }

    /// `out[t] = self * x[t]` for every `cols`-wide row `t` of `x`. Each weight row is used for
    /// all tokens while it is in cache; each output is the same `dot` as in `matvec`.
    fn matmul(&self, x: &[f32], out: &mut [f32]) {
        let n = x.len() / self.cols;
        debug_assert_eq!(out.len(), n * self.rows);
        for (r, row) in self.data.chunks_exact(self.cols).enumerate() {
            for (t, xt) in x.chunks_exact(self.cols).enumerate() {
                out[t * self.rows + r] = dot(row, xt);
            }
        }
    }

    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Dot product in eight independent lanes, so the compiler vectorises it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

fn load_vec(g: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let v = g.dequantize(name)?;
    if v.len() != len {
        return Err(ModelError::Invalid(format!(
            "{name} has {} values, expected {len}",
            v.len()
        )));
    }
    Ok(v)
}

/// One transformer block's weights.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) wq: Matrix,
    pub(crate) wk: Matrix,
    pub(crate) wv: Matrix,
    /// Q, K and V biases (Qwen2 has them; Llama and Mistral do not).
    pub(crate) bq: Option<Vec<f32>>,
    pub(crate) bk: Option<Vec<f32>>,
    pub(crate) bv: Option<Vec<f32>>,
    pub(crate) wo: Matrix,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) gate: Matrix,
    pub(crate) up: Matrix,
    pub(crate) down: Matrix,
}

/// Where a sequence's keys and values live. The decoder writes one position's K and V per
/// layer and reads earlier positions back; dense and paged storage implement it, and since the
/// arithmetic is shared, both give bit-identical logits.
pub trait KvStore {
    /// Positions already stored (the next token's position).
    fn len(&self) -> usize;
    /// Whether no position is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Stores layer `layer`'s key and value rows for position `pos` (at or after `len()`,
    /// written in increasing order per layer).
    fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]);
    /// The key row of `layer` at position `pos` (stored, or written in the current step).
    fn key(&self, layer: usize, pos: usize) -> &[f32];
    /// The value row of `layer` at position `pos`.
    fn value(&self, layer: usize, pos: usize) -> &[f32];
    /// Marks `n` more positions, written by every layer, as stored.
    fn commit(&mut self, n: usize);
}

/// Keys and values of every position so far, per layer, densely.
#[derive(Debug, Default, Clone)]
pub struct DenseKv {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    kv_dim: usize,
}

impl KvStore for DenseKv {
    fn len(&self) -> usize {
        self.len
    }
    fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        // Dense rows are appended, so positions arrive in order.
        debug_assert_eq!(self.k[layer].len(), pos * self.kv_dim);
        self.k[layer].extend_from_slice(k);
        self.v[layer].extend_from_slice(v);
    }
    fn key(&self, layer: usize, pos: usize) -> &[f32] {
        &self.k[layer][pos * self.kv_dim..(pos + 1) * self.kv_dim]
    }
    fn value(&self, layer: usize, pos: usize) -> &[f32] {
        &self.v[layer][pos * self.kv_dim..(pos + 1) * self.kv_dim]
    }
    fn commit(&mut self, n: usize) {
        self.len += n;
    }
}

/// The model with its weights in f32.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    /// Hyperparameters.
    pub cfg: LlamaConfig,
    pub(crate) embed: Matrix,
    pub(crate) layers: Vec<Layer>,
    pub(crate) out_norm: Vec<f32>,
    /// The output head, or `None` when it is tied to the embeddings.
    pub(crate) output: Option<Matrix>,
}

impl LlamaConfig {
    /// The shape named by a `random:<preset>` model source: `tiny` (tests), `smollm2-135m`,
    /// `llama-3.1-8b` (its width and heads; `layers` may be lowered to fit memory).
    pub fn preset(name: &str) -> Result<LlamaConfig, ModelError> {
        let c =
            |layers, hidden, heads, kv_heads, ffn, vocab, rope_base: f32, context| LlamaConfig {
                layers,
                hidden,
                heads,
                kv_heads,
                head_dim: hidden / heads,
                ffn,
                vocab,
                rope_base,
                eps: 1e-5,
                context,
                rope_style: RopeStyle::Interleaved,
            };
        match name {
            "tiny" => Ok(c(2, 64, 4, 2, 128, 512, 10_000.0, 2048)),
            "smollm2-135m" => Ok(c(30, 576, 9, 3, 1536, 49_152, 100_000.0, 8192)),
            "llama-3.1-8b" => Ok(c(32, 4096, 32, 8, 14_336, 128_256, 500_000.0, 131_072)),
            other => Err(ModelError::Invalid(format!(
                "unknown preset {other:?}; expected tiny, smollm2-135m or llama-3.1-8b"
            ))),
        }
    }
}

/// SplitMix64: a tiny, fast, well-mixed generator, so random weights are identical on every
/// platform and need no dependency.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `n` values uniform in `[-scale, scale)`.
fn random_values(state: &mut u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| ((splitmix(state) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
        .collect()
}

impl LlamaModel {
    /// A model of shape `cfg` with random weights from `seed`: the `random:<preset>` source,
    /// for tests and performance work where real weights cannot be carried. Matrices are
    /// scaled by `1/sqrt(fan_in)` and norms are 1, so activations stay in range.
    pub fn random(cfg: LlamaConfig, seed: u64) -> LlamaModel {
        let mut s = seed;
        let mut m = |rows: usize, cols: usize| Matrix {
            rows,
            cols,
            data: random_values(&mut s, rows * cols, 1.0 / (cols as f32).sqrt()),
        };
        let (h, qd, kv, f) = (
            cfg.hidden,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
            cfg.ffn,
        );
        let embed = m(cfg.vocab, h);
        let layers = (0..cfg.layers)
            .map(|_| Layer {
                attn_norm: vec![1.0; h],
                wq: m(qd, h),
                wk: m(kv, h),
                wv: m(kv, h),
                bq: None,
                bk: None,
                bv: None,
                wo: m(h, qd),
                ffn_norm: vec![1.0; h],
                gate: m(f, h),
                up: m(f, h),
                down: m(h, f),
            })
            .collect();
        LlamaModel {
            embed,
            layers,
            out_norm: vec![1.0; h],
            output: None,
            cfg,
        }
    }

    /// Rounds every weight matrix to the nearest bf16 value (norm weights and biases stay f32):
    /// the weights exactly as the CUDA backend holds them, so a CPU run of the rounded model is
    /// the reference its results are compared with.
    pub fn round_matrices_to_bf16(&mut self) {
        let round = |m: &mut Matrix| {
            for x in &mut m.data {
                *x = half::bf16::from_f32(*x).to_f32();
            }
        };
        round(&mut self.embed);
        if let Some(o) = &mut self.output {
            round(o);
        }
        for l in &mut self.layers {
            for m in [
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ] {
                round(m);
            }
        }
    }

    /// Loads and dequantises every weight.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let cfg = LlamaConfig::from_gguf(g)?;
        let (h, qd, kv, f) = (
            cfg.hidden,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
            cfg.ffn,
        );
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let bias = |s: &str, len| {
                let name = format!("blk.{i}.{s}.bias");
                g.tensor(&name).map(|_| load_vec(g, &name, len)).transpose()
            };
            layers.push(Layer {
                attn_norm: load_vec(g, &n("attn_norm"), h)?,
                wq: Matrix::load(g, &n("attn_q"), qd, h)?,
                wk: Matrix::load(g, &n("attn_k"), kv, h)?,
                wv: Matrix::load(g, &n("attn_v"), kv, h)?,
                bq: bias("attn_q", qd)?,
                bk: bias("attn_k", kv)?,
                bv: bias("attn_v", kv)?,
                wo: Matrix::load(g, &n("attn_output"), h, qd)?,
                ffn_norm: load_vec(g, &n("ffn_norm"), h)?,
                gate: Matrix::load(g, &n("ffn_gate"), f, h)?,
                up: Matrix::load(g, &n("ffn_up"), f, h)?,
                down: Matrix::load(g, &n("ffn_down"), h, f)?,
            });
        }
        let output = match g.tensor("output.weight") {
            Some(_) => Some(Matrix::load(g, "output.weight", cfg.vocab, h)?),
            None => None,
        };
        Ok(LlamaModel {
            embed: Matrix::load(g, "token_embd.weight", cfg.vocab, h)?,
            out_norm: load_vec(g, "output_norm.weight", h)?,
            layers,
            output,
            cfg,
        })
    }

    /// An empty KV store for one sequence.
    pub fn new_kv(&self) -> DenseKv {
        DenseKv {
            k: vec![Vec::new(); self.cfg.layers],
            v: vec![Vec::new(); self.cfg.layers],
            len: 0,
            kv_dim: self.cfg.kv_heads * self.cfg.head_dim,
        }
    }

    /// Runs `tokens` after what `kv` holds, appending their keys and values, and returns the
    /// logits of the last one.
    ///
    /// The tokens go through the layers together (layer by layer), so each weight row is read
    /// once per call rather than once per token; every number a token sees is computed by the
    /// same operations in the same order as when it runs alone, so the result does not depend
    /// on how a sequence is split into calls (prefill, chunks, decode steps, cache hits).
    ///
    /// # Panics
    /// If a token id is not below `cfg.vocab` (callers validate ids, see `Runner::generate`).
    pub fn forward(&self, tokens: &[u32], kv: &mut impl KvStore) -> Vec<f32> {
        let c = &self.cfg;
        let n = tokens.len();
        if n == 0 {
            return Vec::new();
        }
        let (h, hd, kvd, qd) = (c.hidden, c.head_dim, c.kv_dim(), c.heads * c.head_dim);
        let base = kv.len();
        let mut x = Vec::with_capacity(n * h);
        for &t in tokens {
            x.extend_from_slice(self.embed.row(t as usize));
        }
        let mut xn = vec![0f32; n * h];
        let (mut q, mut k, mut v) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
        let mut att = vec![0f32; n * qd];
        let mut proj = vec![0f32; n * h];
        let (mut g, mut u) = (vec![0f32; n * c.ffn], vec![0f32; n * c.ffn]);
        let mut scores: Vec<Vec<f32>> = vec![Vec::with_capacity(base + n); c.heads / c.kv_heads];
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm_rows(&x, &layer.attn_norm, c.eps, &mut xn);
            layer.wq.matmul(&xn, &mut q);
            layer.wk.matmul(&xn, &mut k);
            layer.wv.matmul(&xn, &mut v);
            add_bias_rows(&mut q, layer.bq.as_deref());
            add_bias_rows(&mut k, layer.bk.as_deref());
            add_bias_rows(&mut v, layer.bv.as_deref());
            for t in 0..n {
                let pos = base + t;
                for head in q[t * qd..(t + 1) * qd].chunks_exact_mut(hd) {
                    rope_any(head, pos, c.rope_base, c.rope_style);
                }
                for head in k[t * kvd..(t + 1) * kvd].chunks_exact_mut(hd) {
                    rope_any(head, pos, c.rope_base, c.rope_style);
                }
                kv.write(
                    l,
                    pos,
                    &k[t * kvd..(t + 1) * kvd],
                    &v[t * kvd..(t + 1) * kvd],
                );
            }
            // Grouped-query attention, one key/value head at a time: each cached row is read
            // once for all the query heads that share it. Per query head the arithmetic (and
            // its order over positions) is the same as computing that head alone.
            for t in 0..n {
                let pos = base + t;
                for kvh in 0..c.kv_heads {
                    let heads = kvh * group..(kvh + 1) * group;
                    for s in scores.iter_mut().take(group) {
                        s.clear();
                    }
                    for p in 0..=pos {
                        let kp = &kv.key(l, p)[kvh * hd..(kvh + 1) * hd];
                        for (s, head) in scores.iter_mut().zip(heads.clone()) {
                            let qh = &q[t * qd + head * hd..t * qd + (head + 1) * hd];
                            s.push(dot(qh, kp) * scale);
                        }
                    }
                    for s in scores.iter_mut().take(group) {
                        softmax(s);
                    }
                    let out = &mut att[t * qd + kvh * group * hd..t * qd + (kvh + 1) * group * hd];
                    out.fill(0.0);
                    for p in 0..=pos {
                        let vp = &kv.value(l, p)[kvh * hd..(kvh + 1) * hd];
                        for (o, s) in out.chunks_exact_mut(hd).zip(scores.iter()) {
                            let w = s[p];
                            for (oi, &vv) in o.iter_mut().zip(vp) {
                                *oi += w * vv;
                            }
                        }
                    }
                }
            }
            layer.wo.matmul(&att, &mut proj);
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
            rms_norm_rows(&x, &layer.ffn_norm, c.eps, &mut xn);
            layer.gate.matmul(&xn, &mut g);
            layer.up.matmul(&xn, &mut u);
            for (gi, &ui) in g.iter_mut().zip(&u) {
                *gi = *gi / (1.0 + (-*gi).exp()) * ui;
            }
            layer.down.matmul(&g, &mut proj);
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        }
        kv.commit(n);
        let last = &x[(n - 1) * h..];
        let mut normed = vec![0f32; h];
        rms_norm(last, &self.out_norm, c.eps, &mut normed);
        let head = self.output.as_ref().unwrap_or(&self.embed);
        let mut logits = vec![0f32; c.vocab];
        head.matvec(&normed, &mut logits);
        logits
    }
}

/// RMSNorm of every `w.len()`-wide row of `x`.
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    for (row, o) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        rms_norm(row, w, eps, o);
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * inv * wi;
    }
}

/// Adds `bias` to every `bias.len()`-wide row of `x` (no-op without a bias).
pub(crate) fn add_bias_rows(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
    }
}

/// RoPE in either pairing.
pub fn rope_any(x: &mut [f32], pos: usize, base: f32, style: RopeStyle) {
    match style {
        RopeStyle::Interleaved => rope(x, pos, base),
        RopeStyle::HalfSplit => rope_half(x, pos, base),
    }
}

/// Rotates pairs `(x[i], x[i + d/2])` by `pos * base^(-2i/d)` (Hugging Face layout).
pub fn rope_half(x: &mut [f32], pos: usize, base: f32) {
    let d = x.len();
    let half = d / 2;
    for i in 0..half {
        let theta = pos as f32 * base.powf(-((2 * i) as f32) / d as f32);
        let (s, c) = theta.sin_cos();
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = a * s + b * c;
    }
}

/// Rotates adjacent pairs `(x[2i], x[2i+1])` by `pos * base^(-2i/d)` (GGUF llama layout).
pub fn rope(x: &mut [f32], pos: usize, base: f32) {
    let d = x.len();
    for i in 0..d / 2 {
        let theta = pos as f32 * base.powf(-((2 * i) as f32) / d as f32);
        let (s, c) = theta.sin_cos();
        let (a, b) = (x[2 * i], x[2 * i + 1]);
        x[2 * i] = a * c - b * s;
        x[2 * i + 1] = a * s + b * c;
    }
}

fn softmax(v: &mut [f32]) {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    for x in v.iter_mut() {
        *x /= sum;
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_and_keeps_norms() {
        let mut x = vec![1.0, 0.0, 0.0, 1.0];
        rope(&mut x, 0, 10_000.0);
        assert_eq!(x, vec![1.0, 0.0, 0.0, 1.0]);
        rope(&mut x, 1, 10_000.0);
        // First pair turns by 1 radian, second by 1/100.
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
        assert!((x[2] + 0.01f32.sin()).abs() < 1e-6 && (x[3] - 0.01f32.cos()).abs() < 1e-6);
    }

    #[test]
    fn half_split_rope_is_the_interleaved_one_on_permuted_dimensions() {
        // HF checkpoints and GGUF llama files differ by a fixed permutation of each head's
        // dimensions: interleaved position 2i holds half-split i, 2i+1 holds i + d/2.
        let d = 8;
        let x: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
        let perm = |v: &[f32]| -> Vec<f32> {
            (0..d)
                .map(|j| {
                    if j % 2 == 0 {
                        v[j / 2]
                    } else {
                        v[j / 2 + d / 2]
                    }
                })
                .collect()
        };
        let mut half = x.clone();
        rope_half(&mut half, 5, 10_000.0);
        let mut inter = perm(&x);
        rope(&mut inter, 5, 10_000.0);
        assert_eq!(perm(&half), inter);
    }

    #[test]
    fn random_models_are_deterministic_and_finite() {
        let cfg = LlamaConfig::preset("tiny").unwrap();
        let a = LlamaModel::random(cfg.clone(), 42);
        let b = LlamaModel::random(cfg.clone(), 42);
        let c = LlamaModel::random(cfg, 43);
        let run = |m: &LlamaModel| {
            let mut kv = m.new_kv();
            m.forward(&[1, 2, 3, 4], &mut kv)
        };
        let (la, lb, lc) = (run(&a), run(&b), run(&c));
        assert_eq!(la, lb);
        assert_ne!(la, lc);
        assert!(la.iter().all(|x| x.is_finite()));
        assert_eq!(la.len(), 512);
        assert!(LlamaConfig::preset("gpt-5").is_err());
        let big = LlamaConfig::preset("llama-3.1-8b").unwrap();
        assert_eq!((big.head_dim, big.kv_heads * big.head_dim), (128, 1024));
    }

    #[test]
    fn logits_do_not_depend_on_how_a_sequence_is_split_into_calls() {
        let m = LlamaModel::random(LlamaConfig::preset("tiny").unwrap(), 7);
        let tokens: Vec<u32> = (0..23).map(|i| (i * 37 % 512) as u32).collect();
        let whole = m.forward(&tokens, &mut m.new_kv());
        let mut kv = m.new_kv();
        let mut one_by_one = Vec::new();
        for t in &tokens {
            one_by_one = m.forward(std::slice::from_ref(t), &mut kv);
        }
        let mut kv = m.new_kv();
        m.forward(&tokens[..5], &mut kv);
        m.forward(&tokens[5..16], &mut kv);
        let chunked = m.forward(&tokens[16..], &mut kv);
        assert_eq!(whole, one_by_one, "bit-identical whatever the split");
        assert_eq!(whole, chunked);
        assert_eq!(kv.len(), 23);
        assert!(m.forward(&[], &mut kv).is_empty());
    }

    #[test]
    fn dot_softmax_argmax() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        assert_eq!(dot(&a, &a), (0..19).map(|i| (i * i) as f32).sum::<f32>());
        let mut s = vec![1.0, 1.0, 1000.0];
        softmax(&mut s);
        assert!((s[2] - 1.0).abs() < 1e-6);
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
    }
}

//! The Llama-family decoder written once against [`Backend`]: embeddings, RMSNorm, Q/K/V
//! projections (with Qwen2's biases), RoPE in either layout, grouped-query attention over the
//! paged KV blocks, SwiGLU, and a tied or untied output head. It runs one step of a batch:
//! several sequences' new tokens side by side, each attending to its own cached prefix.

use crate::backend::{Backend, BackendError, StepBatch};
use crate::model::{LlamaConfig, LlamaModel};

struct LayerW<B: Backend> {
    attn_norm: B::Vector,
    wq: B::Matrix,
    wk: B::Matrix,
    wv: B::Matrix,
    bq: Option<B::Vector>,
    bk: Option<B::Vector>,
    bv: Option<B::Vector>,
    wo: B::Matrix,
    ffn_norm: B::Vector,
    gate: B::Matrix,
    up: B::Matrix,
    down: B::Matrix,
}

/// A model's weights inside a backend, ready to run steps.
pub struct Decoder<B: Backend> {
    cfg: LlamaConfig,
    embed: B::Matrix,
    layers: Vec<LayerW<B>>,
    out_norm: B::Vector,
    output: Option<B::Matrix>,
}

impl<B: Backend> std::fmt::Debug for Decoder<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").field("cfg", &self.cfg).finish()
    }
}

impl<B: Backend> Decoder<B> {
    /// Moves `model`'s weights into `backend`.
    pub fn new(model: LlamaModel, backend: &mut B) -> Result<Self, BackendError> {
        let mut layers = Vec::with_capacity(model.layers.len());
        for l in model.layers {
            let mut opt = |v: Option<Vec<f32>>| v.map(|v| backend.upload_vector(v)).transpose();
            let (bq, bk, bv) = (opt(l.bq)?, opt(l.bk)?, opt(l.bv)?);
            layers.push(LayerW {
                attn_norm: backend.upload_vector(l.attn_norm)?,
                wq: backend.upload_matrix(l.wq)?,
                wk: backend.upload_matrix(l.wk)?,
                wv: backend.upload_matrix(l.wv)?,
                bq,
                bk,
                bv,
                wo: backend.upload_matrix(l.wo)?,
                ffn_norm: backend.upload_vector(l.ffn_norm)?,
                gate: backend.upload_matrix(l.gate)?,
                up: backend.upload_matrix(l.up)?,
                down: backend.upload_matrix(l.down)?,
            });
        }
        Ok(Decoder {
            embed: backend.upload_matrix(model.embed)?,
            out_norm: backend.upload_vector(model.out_norm)?,
            output: model.output.map(|m| backend.upload_matrix(m)).transpose()?,
            layers,
            cfg: model.cfg,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Runs one step: `tokens` (one per batch row) go through every layer, their keys and
    /// values are written into their sequences' blocks, and the logits of the rows in
    /// `logits_rows` come back, `vocab` values each, in that order.
    pub fn step(
        &self,
        backend: &mut B,
        tokens: &[u32],
        batch: &StepBatch,
        logits_rows: &[usize],
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        let Some(logits) = self.forward(backend, tokens, batch, logits_rows)? else {
            return Ok(Vec::new());
        };
        let flat = backend.to_host(&logits)?;
        Ok(flat
            .chunks_exact(self.cfg.vocab)
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// [`Decoder::step`] for greedy decoding: the index of the largest logit of each row in
    /// `logits_rows` (computed by the backend, so only the token ids leave a GPU).
    pub fn step_greedy(
        &self,
        backend: &mut B,
        tokens: &[u32],
        batch: &StepBatch,
        logits_rows: &[usize],
    ) -> Result<Vec<u32>, BackendError> {
        match self.forward(backend, tokens, batch, logits_rows)? {
            Some(logits) => backend.argmax_rows(&logits, self.cfg.vocab),
            None => Ok(Vec::new()),
        }
    }

    /// The layers, then the logits of `logits_rows` (`None` when there are none).
    fn forward(
        &self,
        backend: &mut B,
        tokens: &[u32],
        batch: &StepBatch,
        logits_rows: &[usize],
    ) -> Result<Option<B::Tensor>, BackendError> {
        let c = &self.cfg;
        let n = tokens.len();
        batch.validate()?;
        if n != batch.rows() {
            return Err(BackendError::Shape(format!(
                "{n} tokens for a batch of {} rows",
                batch.rows()
            )));
        }
        if n == 0 {
            return Ok(None);
        }
        let (h, qd, kvd) = (c.hidden, c.heads * c.head_dim, c.kv_dim());
        let mut x = backend.tensor(n, h)?;
        backend.embed(&self.embed, tokens, &mut x)?;
        let mut xn = backend.tensor(n, h)?;
        let mut q = backend.tensor(n, qd)?;
        let mut k = backend.tensor(n, kvd)?;
        let mut v = backend.tensor(n, kvd)?;
        let mut att = backend.tensor(n, qd)?;
        let mut proj = backend.tensor(n, h)?;
        let mut g = backend.tensor(n, c.ffn)?;
        let mut u = backend.tensor(n, c.ffn)?;
        for (l, w) in self.layers.iter().enumerate() {
            backend.rms_norm(&x, &w.attn_norm, c.eps, &mut xn)?;
            backend.matmul(&xn, &w.wq, &mut q)?;
            backend.matmul(&xn, &w.wk, &mut k)?;
            backend.matmul(&xn, &w.wv, &mut v)?;
            for (t, b) in [(&mut q, &w.bq), (&mut k, &w.bk), (&mut v, &w.bv)] {
                if let Some(b) = b {
                    backend.add_bias(t, b)?;
                }
            }
            backend.rope(&mut q, batch, c.head_dim, c.rope_base, c.rope_style)?;
            backend.rope(&mut k, batch, c.head_dim, c.rope_base, c.rope_style)?;
            backend.write_kv(l, &k, &v, batch)?;
            backend.attention(l, &q, batch, &mut att)?;
            backend.matmul(&att, &w.wo, &mut proj)?;
            backend.add(&mut x, &proj)?;
            backend.rms_norm(&x, &w.ffn_norm, c.eps, &mut xn)?;
            backend.matmul(&xn, &w.gate, &mut g)?;
            backend.matmul(&xn, &w.up, &mut u)?;
            backend.silu_mul(&mut g, &u)?;
            backend.matmul(&g, &w.down, &mut proj)?;
            backend.add(&mut x, &proj)?;
        }
        if logits_rows.is_empty() {
            return Ok(None);
        }
        let last = backend.select_rows(&x, logits_rows)?;
        let mut normed = backend.tensor(logits_rows.len(), h)?;
        backend.rms_norm(&last, &self.out_norm, c.eps, &mut normed)?;
        let mut logits = backend.tensor(logits_rows.len(), c.vocab)?;
        backend.matmul(
            &normed,
            self.output.as_ref().unwrap_or(&self.embed),
            &mut logits,
        )?;
        Ok(Some(logits))
    }
}

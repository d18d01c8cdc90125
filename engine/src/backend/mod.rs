//! The compute seam: every numeric operation of the decoder, the KV block pools of both tiers,
//! and the copies between them. The decoder ([`crate::decoder`]) is written once against
//! [`Backend`]; the CPU backend ([`cpu`]) implements it with `faer` and rayon, and the CUDA
//! backend ([`cuda`]) with cuBLAS and the NVRTC kernels of `kernels/`, without the model or the
//! scheduler changing.

pub mod cpu;
// The only module where `unsafe` is allowed: calls into the CUDA driver, NVRTC and cuBLAS.
#[allow(unsafe_code)]
pub mod cuda;

use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::time::Duration;

use hotprefix_cache::{SlotId, Transfer, TransferId};
use thiserror::Error;

use crate::model::{LlamaConfig, Matrix, RopeStyle};

/// A backend operation failed (on the CPU: bad shapes, which are bugs; on a GPU: launch or
/// memory errors as well).
#[derive(Debug, Error)]
pub enum BackendError {
    /// Operands of the wrong size.
    #[error("backend: shape mismatch: {0}")]
    Shape(String),
    /// The KV pools could not be allocated.
    #[error("backend: cannot allocate {0}")]
    Alloc(String),
    /// The backend named in the configuration is not available here.
    #[error("backend: {0}")]
    Unavailable(String),
    /// A GPU call failed (driver, NVRTC or cuBLAS).
    #[error("backend: CUDA: {0}")]
    Device(String),
}

/// Which backend to run on, as the `--backend` flag names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// f32 on the host's cores.
    Cpu,
    /// NVIDIA GPU through CUDA.
    Cuda,
    /// CUDA when a GPU is usable, the CPU otherwise.
    Auto,
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            "auto" => Ok(BackendKind::Auto),
            other => Err(format!(
                "unknown backend {other:?}; expected cpu, cuda or auto"
            )),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
            BackendKind::Auto => "auto",
        })
    }
}

/// One sequence's part of a step: which rows of the batch are its new tokens, where they go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqSpan {
    /// Rows of the batch holding this sequence's new tokens.
    pub rows: Range<usize>,
    /// Position of the first new token (the number of positions already in its blocks).
    pub start: usize,
    /// Device slots of its blocks, in order; they cover `start + rows.len()` positions.
    pub table: Vec<SlotId>,
}

/// The layout of one forward step: sequences side by side, each with its new tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepBatch {
    /// The sequences, their rows in increasing order and contiguous.
    pub seqs: Vec<SeqSpan>,
    /// Positions per block.
    pub block_size: usize,
}

impl StepBatch {
    /// Rows (tokens) in the step.
    pub fn rows(&self) -> usize {
        self.seqs.last().map_or(0, |s| s.rows.end)
    }

    /// The position of every row.
    pub fn positions(&self) -> Vec<usize> {
        self.seqs
            .iter()
            .flat_map(|s| (0..s.rows.len()).map(move |i| s.start + i))
            .collect()
    }

    /// Checks that rows are contiguous and every table covers its sequence.
    pub fn validate(&self) -> Result<(), BackendError> {
        let mut next = 0;
        for s in &self.seqs {
            let covered = s.table.len() * self.block_size;
            if s.rows.start != next || s.rows.is_empty() || s.start + s.rows.len() > covered {
                return Err(BackendError::Shape(format!(
                    "sequence rows {:?} from position {} with {} blocks of {}",
                    s.rows,
                    s.start,
                    s.table.len(),
                    self.block_size
                )));
            }
            next = s.rows.end;
        }
        Ok(())
    }
}

/// How big the KV pools are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Positions per block.
    pub block_size: usize,
    /// Blocks in the device tier.
    pub device_blocks: usize,
    /// Blocks in the host tier.
    pub host_blocks: usize,
}

/// Bytes one block of KV takes for a model of shape `cfg` stored with `value_bytes` per value
/// (keys and values of every layer): 4 on the CPU backend (f32), 2 on CUDA (bf16).
pub fn kv_block_bytes(cfg: &LlamaConfig, block_size: usize, value_bytes: usize) -> u64 {
    (2 * cfg.layers * block_size * cfg.kv_dim() * value_bytes) as u64
}

/// Numeric operations on row-major activations (`rows` tokens of `cols` values), the KV block
/// pools of both tiers and the copies between them.
///
/// Every call is issued by the scheduler's thread in program order; a backend may run them
/// asynchronously as long as results are observed in that order (`to_host` synchronises).
/// Transfers follow the cache's ordering contract (see [`hotprefix_cache::Transfer`]).
pub trait Backend: Send + fmt::Debug {
    /// Activations: `rows` x `cols` f32 values.
    type Tensor: Send;
    /// A weight matrix in the backend's memory and format.
    type Matrix: Send + Sync;
    /// A weight vector (norm weights, biases).
    type Vector: Send + Sync;

    /// Short name for logs and metrics (`cpu`, `cuda`).
    fn name(&self) -> &'static str;
    /// Bytes per stored KV value: 4 (f32) unless the backend stores them narrower.
    fn kv_value_bytes(&self) -> usize {
        4
    }
    /// Moves a weight matrix into the backend (the CPU backend keeps it as it is).
    fn upload_matrix(&mut self, m: Matrix) -> Result<Self::Matrix, BackendError>;
    /// Moves a weight vector into the backend.
    fn upload_vector(&mut self, v: Vec<f32>) -> Result<Self::Vector, BackendError>;
    /// A zeroed `rows` x `cols` tensor.
    fn tensor(&mut self, rows: usize, cols: usize) -> Result<Self::Tensor, BackendError>;
    /// Row `t` of `out` = row `tokens[t]` of `table`.
    fn embed(
        &mut self,
        table: &Self::Matrix,
        tokens: &[u32],
        out: &mut Self::Tensor,
    ) -> Result<(), BackendError>;
    /// `out` = RMSNorm of each row of `x`, scaled by `w`.
    fn rms_norm(
        &mut self,
        x: &Self::Tensor,
        w: &Self::Vector,
        eps: f32,
        out: &mut Self::Tensor,
    ) -> Result<(), BackendError>;
    /// `out` = `x` times `w` transposed: each output row holds `w`'s row dot products with the
    /// corresponding row of `x`. Rows are independent: a row's result does not depend on the
    /// other rows in the call (batching never changes a sequence's numbers).
    fn matmul(
        &mut self,
        x: &Self::Tensor,
        w: &Self::Matrix,
        out: &mut Self::Tensor,
    ) -> Result<(), BackendError>;
    /// Adds `b` to every row of `x`.
    fn add_bias(&mut self, x: &mut Self::Tensor, b: &Self::Vector) -> Result<(), BackendError>;
    /// Rotates every `head_dim`-wide head of every row by its row's position.
    fn rope(
        &mut self,
        x: &mut Self::Tensor,
        batch: &StepBatch,
        head_dim: usize,
        base: f32,
        style: RopeStyle,
    ) -> Result<(), BackendError>;
    /// `gate` = SiLU(`gate`) * `up`, element-wise.
    fn silu_mul(&mut self, gate: &mut Self::Tensor, up: &Self::Tensor) -> Result<(), BackendError>;
    /// `x` += `y`, element-wise.
    fn add(&mut self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<(), BackendError>;
    /// Stores layer `layer`'s keys and values of every row into the row's block slot in the
    /// device pool.
    fn write_kv(
        &mut self,
        layer: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
        batch: &StepBatch,
    ) -> Result<(), BackendError>;
    /// Causal grouped-query attention of every row's query heads over its sequence's positions
    /// `0..=pos` in the device pool (cached prefix and the step's own tokens, written by
    /// `write_kv` first).
    fn attention(
        &mut self,
        layer: usize,
        q: &Self::Tensor,
        batch: &StepBatch,
        out: &mut Self::Tensor,
    ) -> Result<(), BackendError>;
    /// A new tensor made of the given rows of `x`, in order.
    fn select_rows(
        &mut self,
        x: &Self::Tensor,
        rows: &[usize],
    ) -> Result<Self::Tensor, BackendError>;
    /// The values of `x`, row after row, in host memory.
    fn to_host(&mut self, x: &Self::Tensor) -> Result<Vec<f32>, BackendError>;
    /// The index of the largest value of each `cols`-wide row of `x` (the first one on ties,
    /// as [`crate::model::argmax`]): greedy sampling without copying whole rows of logits to
    /// the host. The default copies them and scans.
    fn argmax_rows(&mut self, x: &Self::Tensor, cols: usize) -> Result<Vec<u32>, BackendError> {
        let v = self.to_host(x)?;
        Ok(v.chunks_exact(cols.max(1))
            .map(crate::model::argmax)
            .collect())
    }

    /// Allocates both KV pools for a model of shape `cfg` (replacing any earlier ones).
    fn allocate_kv(&mut self, cfg: &LlamaConfig, layout: KvLayout) -> Result<(), BackendError>;
    /// Starts a transfer the cache planned. Eviction stores read device slots the cache has
    /// already freed, so they are copied (or ordered before any later write) before this
    /// returns; everything else may complete later, reported by `poll_transfers`.
    fn submit_transfer(&mut self, t: Transfer) -> Result<(), BackendError>;
    /// Transfers finished since the last call, waiting up to `wait` for at least one when none
    /// has finished yet and some are in flight.
    fn poll_transfers(&mut self, wait: Duration) -> Vec<TransferId>;
    /// Transfers submitted and not yet reported by `poll_transfers`.
    fn transfers_in_flight(&self) -> usize;
}

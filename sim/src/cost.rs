//! The cost model: how long prefill, decode steps and tier transfers take on a stated GPU for a
//! stated model. Every constant names its source; none was chosen by looking at policy results.

use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// Shape of a served model, as far as time and memory are concerned.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSpec {
    /// Preset name.
    pub name: &'static str,
    /// Parameters (weights read once per step; 2 FLOPs per parameter per token).
    pub params: f64,
    /// Transformer layers.
    pub layers: u32,
    /// Hidden size (attention FLOPs are `4 * layers * hidden` per query-key pair).
    pub hidden: u32,
    /// KV bytes per token over all layers: `2 (K, V) * layers * kv_heads * head_dim * 2 bytes`.
    pub kv_bytes_per_token: u64,
    /// Bytes per weight (bf16).
    pub weight_bytes_per_param: f64,
}

impl ModelSpec {
    /// Llama-3.1-8B (Hugging Face `meta-llama/Llama-3.1-8B` config.json): 8.03e9 parameters,
    /// 32 layers, hidden 4096, 8 KV heads of dim 128, so KV = 2*32*8*128*2 = 131,072 B/token.
    pub const LLAMA_3_1_8B: ModelSpec = ModelSpec {
        name: "llama-3.1-8b",
        params: 8.03e9,
        layers: 32,
        hidden: 4096,
        kv_bytes_per_token: 2 * 32 * 8 * 128 * 2,
        weight_bytes_per_param: 2.0,
    };

    /// Qwen2.5-7B (Hugging Face `Qwen/Qwen2.5-7B` config.json): 7.62e9 parameters, 28 layers,
    /// hidden 3584, 4 KV heads of dim 128, so KV = 2*28*4*128*2 = 57,344 B/token.
    pub const QWEN_2_5_7B: ModelSpec = ModelSpec {
        name: "qwen2.5-7b",
        params: 7.62e9,
        layers: 28,
        hidden: 3584,
        kv_bytes_per_token: 2 * 28 * 4 * 128 * 2,
        weight_bytes_per_param: 2.0,
    };

    /// Weight bytes.
    pub fn weight_bytes(&self) -> f64 {
        self.params * self.weight_bytes_per_param
    }
}

impl FromStr for ModelSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "llama-3.1-8b" => Ok(ModelSpec::LLAMA_3_1_8B),
            "qwen2.5-7b" => Ok(ModelSpec::QWEN_2_5_7B),
            other => Err(format!(
                "unknown model {other:?}; expected llama-3.1-8b or qwen2.5-7b"
            )),
        }
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// Peak capabilities of a GPU, from its vendor datasheet.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuSpec {
    /// Preset name.
    pub name: &'static str,
    /// Dense bf16 tensor-core peak, FLOP/s.
    pub bf16_flops: f64,
    /// HBM bandwidth, B/s.
    pub hbm_bytes_per_s: f64,
    /// Memory, bytes.
    pub memory_bytes: f64,
    /// Host link bandwidth per direction, B/s.
    pub pcie_bytes_per_s: f64,
}

impl GpuSpec {
    /// NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16, 3.35 TB/s HBM3, 80 GB, PCIe Gen5 x16
    /// (64 GB/s per direction).
    pub const H100: GpuSpec = GpuSpec {
        name: "h100",
        bf16_flops: 989e12,
        hbm_bytes_per_s: 3.35e12,
        memory_bytes: 80e9,
        pcie_bytes_per_s: 64e9,
    };

    /// NVIDIA H200 SXM datasheet: 989 TFLOP/s dense BF16, 4.8 TB/s HBM3e, 141 GB, PCIe Gen5 x16
    /// (64 GB/s per direction).
    pub const H200: GpuSpec = GpuSpec {
        name: "h200",
        bf16_flops: 989e12,
        hbm_bytes_per_s: 4.8e12,
        memory_bytes: 141e9,
        pcie_bytes_per_s: 64e9,
    };
}

impl FromStr for GpuSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "h100" => Ok(GpuSpec::H100),
            "h200" => Ok(GpuSpec::H200),
            other => Err(format!("unknown gpu {other:?}; expected h100 or h200")),
        }
    }
}

/// Achieved fractions of the peaks. These are assumptions, stated once, applied to every policy
/// alike, and fixed before any comparison was run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Efficiency {
    /// Fraction of bf16 peak reached by GEMM-dominated steps. 0.5 is the model FLOPs utilisation
    /// commonly reported for large-batch prefill of 7-8B models on H100 in vLLM and SGLang
    /// (and the CUDA backend's own goal in this project).
    pub compute: f64,
    /// Fraction of HBM bandwidth reached by memory-bound decode steps. 0.8 is typical of
    /// well-tuned decode kernels (STREAM-like copies reach about 90%).
    pub memory: f64,
    /// Fraction of the PCIe peak reached by large pinned copies. 0.8 (about 51 GB/s on Gen5
    /// x16) matches published `nvbandwidth` host-to-device figures for H100 hosts.
    pub pcie: f64,
    /// Fraction of GPU memory the engine may use (weights + KV), like vLLM's
    /// `gpu_memory_utilization` default of 0.9.
    pub memory_fraction: f64,
}

impl Default for Efficiency {
    fn default() -> Self {
        Efficiency {
            compute: 0.5,
            memory: 0.8,
            pcie: 0.8,
            memory_fraction: 0.9,
        }
    }
}

/// One prefill chunk in a step: `new` tokens computed after `context` tokens already in KV.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Chunk {
    /// Tokens computed in this step.
    pub new: u64,
    /// Tokens of context before them (cached prefix plus earlier chunks).
    pub context: u64,
}

/// Time of steps and transfers for one model on one GPU.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CostModel {
    /// The model.
    pub model: ModelSpec,
    /// The GPU.
    pub gpu: GpuSpec,
    /// Achieved fractions.
    pub eff: Efficiency,
    /// Whether host-tier loads overlap layer by layer with the compute that needs them.
    pub layerwise_overlap: bool,
}

impl CostModel {
    /// A cost model with default efficiencies and layer-wise overlap on.
    pub fn new(model: ModelSpec, gpu: GpuSpec) -> Self {
        CostModel {
            model,
            gpu,
            eff: Efficiency::default(),
            layerwise_overlap: true,
        }
    }

    /// KV capacity in tokens of one GPU: usable memory minus weights, divided by KV per token.
    pub fn default_device_tokens(&self) -> u64 {
        let usable = self.gpu.memory_bytes * self.eff.memory_fraction - self.model.weight_bytes();
        (usable.max(0.0) / self.model.kv_bytes_per_token as f64) as u64
    }

    /// FLOPs of one prefill chunk: `2 P n` for the weights plus `4 L h` per query-key pair for
    /// attention (QK^T and AV), where the chunk's `n` queries see `context + 1 .. context + n`
    /// keys (causal).
    pub fn chunk_flops(&self, c: Chunk) -> f64 {
        let n = c.new as f64;
        let pairs = n * c.context as f64 + n * (n + 1.0) / 2.0;
        2.0 * self.model.params * n
            + 4.0 * self.model.layers as f64 * self.model.hidden as f64 * pairs
    }

    /// Duration of one engine step that runs `chunks` of prefill and `decode_contexts.len()`
    /// decode tokens (each seeing its context). Roofline: the larger of compute time and memory
    /// time (weights once, plus the KV each token's attention reads).
    pub fn step_time(&self, chunks: &[Chunk], decode_contexts: &[u64]) -> f64 {
        if chunks.is_empty() && decode_contexts.is_empty() {
            return 0.0;
        }
        let mut flops = 0.0;
        let mut kv_read = 0.0;
        for &c in chunks {
            flops += self.chunk_flops(c);
            kv_read += (c.context + c.new) as f64;
        }
        for &ctx in decode_contexts {
            flops += self.chunk_flops(Chunk {
                new: 1,
                context: ctx,
            });
            kv_read += ctx as f64 + 1.0;
        }
        let bytes = self.model.weight_bytes() + kv_read * self.model.kv_bytes_per_token as f64;
        let compute = flops / (self.gpu.bf16_flops * self.eff.compute);
        let memory = bytes / (self.gpu.hbm_bytes_per_s * self.eff.memory);
        compute.max(memory)
    }

    /// Seconds to move `bytes` over the host link in one direction.
    pub fn transfer_time(&self, bytes: u64) -> f64 {
        bytes as f64 / (self.gpu.pcie_bytes_per_s * self.eff.pcie)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_sizes_match_the_issue() {
        assert_eq!(ModelSpec::LLAMA_3_1_8B.kv_bytes_per_token, 128 * 1024);
        assert_eq!(ModelSpec::QWEN_2_5_7B.kv_bytes_per_token, 56 * 1024);
    }

    #[test]
    fn prefill_is_compute_bound_and_decode_memory_bound() {
        let m = CostModel::new(ModelSpec::LLAMA_3_1_8B, GpuSpec::H100);
        let prefill = m.step_time(
            &[Chunk {
                new: 8192,
                context: 0,
            }],
            &[],
        );
        // 2 * 8.03e9 * 8192 FLOPs plus attention, at 494.5 TFLOP/s: about 0.28 s.
        assert!((0.25..0.32).contains(&prefill), "{prefill}");
        let decode = m.step_time(&[], &[1000]);
        // Weights (16 GB) at 2.68 TB/s: about 6 ms.
        assert!((0.005..0.007).contains(&decode), "{decode}");
        // Batching short-context decodes is nearly free (weights are read once per step), but
        // long contexts make KV reads dominate: 32 x 1000 tokens of KV is 4.2 GB against 16 GB
        // of weights.
        assert!(m.step_time(&[], &[100; 32]) < 1.05 * decode);
        assert!(m.step_time(&[], &[1000; 32]) > 1.2 * decode);
    }

    #[test]
    fn attention_makes_deep_tokens_dearer() {
        let m = CostModel::new(ModelSpec::LLAMA_3_1_8B, GpuSpec::H100);
        let shallow = m.chunk_flops(Chunk {
            new: 512,
            context: 0,
        });
        let deep = m.chunk_flops(Chunk {
            new: 512,
            context: 30_000,
        });
        assert!(deep > 1.9 * shallow && deep < 2.1 * shallow);
    }

    #[test]
    fn loading_a_block_beats_recomputing_it() {
        let m = CostModel::new(ModelSpec::LLAMA_3_1_8B, GpuSpec::H100);
        let load = m.transfer_time(512 * m.model.kv_bytes_per_token);
        let recompute = m.step_time(
            &[Chunk {
                new: 512,
                context: 0,
            }],
            &[],
        );
        assert!(load < recompute, "load {load} recompute {recompute}");
    }

    #[test]
    fn default_capacity_is_what_is_left_after_weights() {
        let m = CostModel::new(ModelSpec::LLAMA_3_1_8B, GpuSpec::H100);
        let t = m.default_device_tokens();
        // (72 GB - 16.06 GB) / 128 KiB = 426,800 tokens.
        assert!((420_000..430_000).contains(&t), "{t}");
    }
}
